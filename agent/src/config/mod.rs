//! The configuration file: one TOML document.
//!
//! Every struct here rejects unknown keys, documents each field, and takes
//! its defaults from one place (the `default_*` functions and `Default`
//! impls next to it). [`Config::parse`] reads the document with positions,
//! then [`Config::validate`] checks the values; every error, of syntax, type
//! or value, starts with the line and the key's full path
//! (`line 12: rules[0].anomaly.alpha: must be in (0, 1), e.g. 0.01`).
//! Validation errors are written `key: why`, the key relative to the table
//! that checks it, and each enclosing table prefixes its own path. Secrets
//! (MQTT passwords) come from a file or an environment variable, never
//! inline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_collectors::mqtt::{MqttSettings, TlsSettings};
use sluice_collectors::serial::SerialSettings;
use sluice_collectors::udp::UdpSettings;

use crate::pipeline::rules::{DerivedRule, PatternRule, Rule, Rules, TableConfig, Tables};

mod document;

use document::{key_at, retag, with_line};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this gateway in every record and topic. Default: `sluice`.
    #[serde(default = "default_agent_id")]
    pub agent_id: String,
    /// Worker threads that own the series. Default: CPU cores − 1, at least 1.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Readings each source-to-worker ring holds; a power of two. Default 8192.
    #[serde(default = "default_ring_capacity")]
    pub ring_capacity: usize,
    /// Most series each worker keeps state for. When a worker's table is
    /// full, a new series takes the place of the one seen least recently
    /// among those idle for a minute or more (its open windows are emitted
    /// as partial); with none idle, its readings are counted and dropped.
    /// Default 10,000.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// A series not seen for this long (wall time while the agent runs, ms:
    /// the time it was down does not count) is evicted: its open windows
    /// are emitted as partial and its state (baselines included) is
    /// forgotten, counted in `sluice_series_evicted_total`. 0: never.
    /// Default 3,600,000 (an hour).
    #[serde(default = "default_series_idle_ms")]
    pub series_idle_ms: u64,
    /// What to do when readings arrive faster than the workers take them.
    #[serde(default)]
    pub shedding: Shedding,
    /// The sources, by name: `[sources.<name>]` with `kind = "mqtt" | "udp" | "serial"`.
    #[serde(default)]
    pub sources: BTreeMap<String, Source>,
    /// Reference tables, by name: `[tables.<name>]` with `path` (a CSV file
    /// with a header row) and `key` (the column of series ids).
    #[serde(default)]
    pub tables: BTreeMap<String, TableConfig>,
    /// The tables' rows, read by [`Config::load`] (or
    /// [`Config::load_tables`]).
    #[serde(skip)]
    pub table_data: Tables,
    /// What to compute for which series; the first rule whose `match` glob
    /// fits a series key applies. Series that no rule matches are counted
    /// and ignored.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Derived series (`[[derived]]`): a series computed from two others
    /// joined on event time, which rules then match like any series.
    #[serde(default)]
    pub derived: Vec<DerivedRule>,
    /// Sequence patterns (`[[patterns]]`): an alert when a condition is
    /// followed (or not) by another within a time bound.
    #[serde(default)]
    pub patterns: Vec<PatternRule>,
    /// Where aggregates and alerts go.
    #[serde(default)]
    pub output: Output,
    /// Metrics for Prometheus, and periodic stats messages.
    #[serde(default)]
    pub metrics: Metrics,
    /// Store-and-forward: aggregates are committed to a SQLite outbox and
    /// forwarded upstream from it. Absent: aggregates go only to `output`.
    pub outbox: Option<OutboxConfig>,
    /// The upstream broker the outbox forwards to (needed with `outbox`).
    pub uplink: Option<UplinkConfig>,
    /// Checkpoints of window, sketch and detector state, restored at start.
    /// Absent: a restart starts every series afresh.
    pub checkpoint: Option<CheckpointConfig>,
    /// How sensor nodes' records (serial sources with `format = "frames"`)
    /// are merged.
    #[serde(default)]
    pub nodes: NodesConfig,
}

/// `[nodes]`: how node records are merged.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodesConfig {
    /// The gateway's window for node series, ms: a multiple of the nodes'
    /// windows, which it merges. 0 (the default): each node window as it is.
    #[serde(default)]
    pub window_ms: u64,
    /// The quantiles each aggregate gives from the merged value sketches.
    /// Default `[0.5, 0.9, 0.99]`.
    #[serde(default = "default_quantiles")]
    pub quantiles: Vec<f64>,
    /// The name under which the nodes' distinct-count sketch is reported
    /// (`distinct.label`). Default `"tag"`.
    #[serde(default = "default_label")]
    pub distinct_label: String,
}

fn default_quantiles() -> Vec<f64> {
    vec![0.5, 0.9, 0.99]
}

fn default_label() -> String {
    "tag".into()
}

impl Default for NodesConfig {
    fn default() -> Self {
        Self {
            window_ms: 0,
            quantiles: default_quantiles(),
            distinct_label: default_label(),
        }
    }
}

impl NodesConfig {
    /// Checks the settings; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.window_ms > 366 * 86_400_000 {
            return Err("window_ms: at most a year".into());
        }
        if let Some(q) = self.quantiles.iter().find(|q| !(0.0..=1.0).contains(*q)) {
            return Err(format!("quantiles: {q} is not in [0, 1]"));
        }
        if self.distinct_label.is_empty() {
            return Err("distinct_label: must not be empty".into());
        }
        Ok(())
    }
}

/// Checkpoints (see `checkpoint` in the crate docs).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// How often each worker saves its series' state, ms (it also saves on
    /// shutdown). Default 10,000.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub interval_ms: u64,
    /// The SQLite file, needed only without an `[outbox]`: with one, the
    /// checkpoints live in the outbox file, so that a checkpoint and the
    /// records emitted before it commit in one transaction.
    pub path: Option<PathBuf>,
}

const fn default_checkpoint_interval_ms() -> u64 {
    10_000
}

/// The outbox.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// The SQLite file, e.g. `/var/lib/sluice/outbox.db`.
    pub path: PathBuf,
    /// `normal` (default): a commit survives the agent crashing; `full`: it
    /// also survives power loss (an fsync per commit).
    #[serde(default)]
    pub durability: crate::store::outbox::Durability,
    /// A damaged file at start: `move_aside` (default: rename it and start
    /// empty) or `refuse` (do not start).
    #[serde(default)]
    pub on_corrupt: crate::store::outbox::OnCorrupt,
    /// Most records kept; past it the oldest are dropped (counted). Default 1,000,000.
    #[serde(default = "default_outbox_records")]
    pub max_records: u64,
    /// Most payload bytes kept; past it the oldest are dropped. Default 256 MiB.
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes: u64,
    /// When full: `drop_oldest` (default) or `downsample` (merge the oldest
    /// aggregates of a series pairwise into coarser windows; drop only what
    /// cannot be merged).
    #[serde(default)]
    pub on_full: crate::store::outbox::OnFull,
    /// Also store and forward alert events. Default false.
    #[serde(default)]
    pub include_alerts: bool,
}

const fn default_outbox_records() -> u64 {
    1_000_000
}
const fn default_outbox_bytes() -> u64 {
    256 << 20
}

/// What the uplink forwards to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkKind {
    /// An MQTT broker: QoS 1, a record leaves the outbox on its PUBACK.
    #[default]
    Mqtt,
    /// NATS JetStream: a record leaves the outbox on the stream's publish
    /// acknowledgement, and its `Nats-Msg-Id` (agent, epoch, seq) lets the
    /// stream drop a resend. Needs a build with the `nats` feature.
    Nats,
    /// Apache Kafka (or a log that speaks its protocol): a record leaves
    /// the outbox when its partition's leader acknowledges it with `acks =
    /// all`; the key is the series, the headers `agent`, `epoch`, `seq`.
    /// Needs a build with the `kafka` feature.
    Kafka,
}

/// The upstream broker or log.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// `"mqtt"` (the default), `"nats"` (JetStream) or `"kafka"`.
    #[serde(default)]
    pub kind: UplinkKind,
    /// Broker (or NATS server) host.
    pub host: String,
    /// Port. Default for MQTT 8883 with TLS, 1883 without; for NATS 4222;
    /// for Kafka 9092.
    pub port: Option<u16>,
    /// Client id (for NATS, the connection's name; for Kafka, `client.id`
    /// as the brokers log it). Default
    /// `sluice-<agent_id>-uplink`.
    pub client_id: Option<String>,
    /// User name (for Kafka, SASL PLAIN's).
    pub username: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// TLS (CA file, optional client certificate and key).
    pub tls: Option<TlsSettings>,
    /// Topic (for NATS, subject) template for forwarded aggregates.
    /// Default `sluice/{agent}/agg/{series}` (NATS: `sluice.{agent}.agg.{series}`;
    /// Kafka: `sluice.aggregates`, no `{series}`: the series is the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_topic: Option<String>,
    /// Topic (for NATS, subject) template for forwarded alerts.
    /// Default `sluice/{agent}/alerts/{series}` (NATS: `sluice.{agent}.alerts.{series}`;
    /// Kafka: `sluice.alerts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_topic: Option<String>,
    /// Records sent and not yet acknowledged, at most. Default 64.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Longest delay between reconnect attempts, ms. Default 30,000.
    #[serde(default = "default_uplink_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

const fn default_max_inflight() -> u16 {
    64
}
const fn default_uplink_reconnect_max_ms() -> u64 {
    30_000
}

impl UplinkConfig {
    /// The template for forwarded aggregates (the kind's default if unset).
    pub fn aggregate_topic(&self) -> String {
        self.aggregate_topic
            .clone()
            .unwrap_or_else(|| match self.kind {
                UplinkKind::Mqtt => default_aggregate_topic(),
                UplinkKind::Nats => "sluice.{agent}.agg.{series}".into(),
                UplinkKind::Kafka => "sluice.aggregates".into(),
            })
    }

    /// The template for forwarded alerts (the kind's default if unset).
    pub fn alert_topic(&self) -> String {
        self.alert_topic.clone().unwrap_or_else(|| match self.kind {
            UplinkKind::Mqtt => default_alert_topic(),
            UplinkKind::Nats => "sluice.{agent}.alerts.{series}".into(),
            UplinkKind::Kafka => "sluice.alerts".into(),
        })
    }

    /// Settings for the MQTT connection.
    pub fn connection(&self, agent_id: &str) -> MqttSettings {
        let port = self
            .port
            .unwrap_or(if self.tls.is_some() { 8883 } else { 1883 });
        let mut s = MqttSettings::new(&self.host, port, vec!["unused".into()]);
        s.client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{agent_id}-uplink"));
        s.username = self.username.clone();
        s.password_file = self.password_file.clone();
        s.password_env = self.password_env.clone();
        s.tls = self.tls.clone();
        s
    }
}

/// Metrics settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Serve Prometheus metrics on `http://<listen>/metrics`; keep it on a
    /// loopback address (`127.0.0.1:9898`). Absent (the default): no endpoint.
    pub listen: Option<std::net::SocketAddr>,
    /// Publish a JSON stats message to `output.mqtt`'s `stats_topic` every
    /// this many seconds; 0 turns it off. Default 60.
    #[serde(default = "default_stats_interval_s")]
    pub stats_interval_s: u64,
}

const fn default_stats_interval_s() -> u64 {
    60
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            listen: None,
            stats_interval_s: default_stats_interval_s(),
        }
    }
}

fn default_agent_id() -> String {
    "sluice".into()
}
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}
const fn default_ring_capacity() -> usize {
    8192
}
const fn default_max_series() -> usize {
    10_000
}
const fn default_series_idle_ms() -> u64 {
    3_600_000
}

/// A source: `[sources.<name>]` with `kind = "mqtt" | "udp" | "serial"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Subscribe to topics on an MQTT broker.
    Mqtt(MqttSettings),
    /// Receive datagrams on a UDP port.
    Udp(UdpSettings),
    /// Read lines from a serial port.
    Serial(SerialSettings),
}

/// `[sources.<name>]` as `document::retag` leaves it.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SourceByKind {
    Mqtt(MqttSettings),
    Udp(UdpSettings),
    Serial(SerialSettings),
}

/// Reads the form `document::retag` leaves (see [`Config::parse`]).
impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match SourceByKind::deserialize(d)? {
            SourceByKind::Mqtt(s) => Source::Mqtt(s),
            SourceByKind::Udp(s) => Source::Udp(s),
            SourceByKind::Serial(s) => Source::Serial(s),
        })
    }
}

/// The shedding policy.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shedding {
    /// `drop_newest` (default): above the high-water mark, drop new readings;
    /// `sample`: above it, keep one reading in `keep_one_in` at random.
    pub policy: ShedKind,
    /// Fraction of a ring's capacity at which shedding starts, in (0, 1].
    /// Default 0.8.
    pub high_water: f64,
    /// With `policy = "sample"`: keep one reading in this many. Default 4.
    pub keep_one_in: u32,
}

impl Default for Shedding {
    fn default() -> Self {
        Self {
            policy: ShedKind::DropNewest,
            high_water: 0.8,
            keep_one_in: 4,
        }
    }
}

/// The kind of shedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShedKind {
    /// Drop new readings above the high-water mark.
    DropNewest,
    /// Keep one in `keep_one_in` above the high-water mark.
    Sample,
}

/// Where records go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// Publish aggregates and alerts to an MQTT broker.
    pub mqtt: Option<MqttOutput>,
    /// Print aggregates and alerts on standard output. Default false.
    #[serde(default)]
    pub console: bool,
}

/// The MQTT broker that receives aggregates and alerts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttOutput {
    /// Broker host.
    pub host: String,
    /// Broker port. Default 1883.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Client id. Default `sluice-<agent_id>-out`.
    pub client_id: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// TLS to the broker.
    pub tls: Option<TlsSettings>,
    /// Topic template for alert events; `{agent}` and `{series}` are filled in.
    /// Default `sluice/{agent}/alerts/{series}`.
    #[serde(default = "default_alert_topic")]
    pub alert_topic: String,
    /// Topic template for the retained current alert state of a series.
    /// Default `sluice/{agent}/state/{series}`.
    #[serde(default = "default_state_topic")]
    pub state_topic: String,
    /// Topic template for aggregates. Default `sluice/{agent}/agg/{series}`.
    #[serde(default = "default_aggregate_topic")]
    pub aggregate_topic: String,
    /// Topic for the periodic stats message. Default `sluice/{agent}/stats`.
    #[serde(default = "default_stats_topic")]
    pub stats_topic: String,
    /// QoS of alerts: 0 (at most once) or 1 (at least once, the default).
    #[serde(default = "default_qos1")]
    pub alert_qos: u8,
    /// QoS of aggregates: 0 or 1 (the default).
    #[serde(default = "default_qos1")]
    pub aggregate_qos: u8,
    /// Aggregates in batches: a message holds up to this many records, as
    /// a JSON array, on `aggregate_batch_topic` (and none goes to
    /// `aggregate_topic`). A batch is what waits when the output gets to
    /// it (no timer): one record when they come one at a time, up to this
    /// many, and at most 64 KiB, when a window boundary closes thousands.
    /// Default 0: one message per record.
    #[serde(default)]
    pub aggregate_batch: usize,
    /// Topic of the batches; `{agent}` is filled in. Default
    /// `sluice/{agent}/aggregates`.
    #[serde(default = "default_aggregate_batch_topic")]
    pub aggregate_batch_topic: String,
}

/// Records in one batch message at most (`aggregate_batch`).
pub const MAX_AGGREGATE_BATCH: usize = 10_000;

fn default_aggregate_batch_topic() -> String {
    "sluice/{agent}/aggregates".into()
}

const fn default_mqtt_port() -> u16 {
    1883
}
fn default_alert_topic() -> String {
    "sluice/{agent}/alerts/{series}".into()
}
fn default_state_topic() -> String {
    "sluice/{agent}/state/{series}".into()
}
fn default_stats_topic() -> String {
    "sluice/{agent}/stats".into()
}
fn default_aggregate_topic() -> String {
    "sluice/{agent}/agg/{series}".into()
}
const fn default_qos1() -> u8 {
    1
}

/// What [`Config::preflight`] found; each line starts with the line and key.
#[derive(Debug, Default)]
pub struct Preflight {
    /// What stops the agent at start (a file missing or unreadable, a
    /// password variable not set).
    pub errors: Vec<String>,
    /// What may be fine by the time the agent runs (a serial device not
    /// plugged in yet, a state directory systemd creates).
    pub notes: Vec<String>,
}

/// What only the running agent can check, for `sluice check` to say.
pub const CHECKED_AT_RUN_TIME: &str = "brokers being reachable and accepting the credentials, UDP ports being free to bind, serial devices opening, and the outbox and checkpoint files being writable are checked only when the agent runs";

/// A configuration error, naming the key (and the line, for parse errors).
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a configuration file, and reads its
    /// reference tables (a relative `path` is relative to the file's
    /// directory).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Self::read(path)?;
        config
            .load_tables()
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// [`Self::load`] without reading the tables: for the commands that
    /// need only the outbox, so that a table being edited cannot stop them.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let mut config =
            Self::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        config.resolve_paths(path);
        Ok(config)
    }

    /// Makes the tables' relative paths relative to the directory of the
    /// configuration file at `path`.
    pub fn resolve_paths(&mut self, path: &Path) {
        let dir = path.parent().unwrap_or(Path::new("."));
        for table in self.tables.values_mut() {
            if table.path.is_relative() {
                table.path = dir.join(&table.path);
            }
        }
    }

    /// Reads the reference tables into `table_data` and checks the rules
    /// against them (an error names the table's line, or the rule's key).
    pub fn load_tables(&mut self) -> Result<(), ConfigError> {
        self.table_data = Tables::load(&self.tables).map_err(ConfigError)?;
        Rules::of(self).map_err(ConfigError)?;
        Ok(())
    }

    /// The files whose changes reload the configuration: its tables'.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for t in self.tables.values() {
            files.push(t.path.clone());
            // A SQLite database in WAL mode commits into its -wal file (the
            // database file changes only at a checkpoint).
            if t.table.is_some() || t.query.is_some() {
                let mut wal = t.path.clone().into_os_string();
                wal.push("-wal");
                files.push(wal.into());
            }
        }
        files
    }

    /// Parses and validates a configuration document. Every error names the
    /// key's full path (`rules[0].anomaly.alpha`) and the line it is on
    /// (a key that is missing: the line of its table); syntax errors give
    /// the parser's line and column.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let doc = toml::de::DeTable::parse(text).map_err(|e| ConfigError(e.to_string()))?;
        let mut tree = doc.clone();
        let located = |span: std::ops::Range<usize>, key: Option<&str>, message: &str| {
            let mut path = key_at(doc.get_ref(), span.start);
            if let Some(key) = key {
                path = if path.is_empty() {
                    key.into()
                } else {
                    format!("{path}.{key}")
                };
            }
            let line = text
                .get(..span.start)
                .map_or(1, |t| t.matches('\n').count() + 1);
            ConfigError(if path.is_empty() {
                format!("line {line}: {message}")
            } else {
                format!("line {line}: {path}: {message}")
            })
        };
        retag(tree.get_mut()).map_err(|(span, key, why)| located(span, key, &why))?;
        let config = Config::deserialize(toml::de::Deserializer::from(tree))
            .map_err(|e| located(e.span().unwrap_or(0..0), None, e.message()))?;
        config
            .validate()
            .map_err(|ConfigError(message)| ConfigError(with_line(text, message)))?;
        Ok(config)
    }

    /// Checks, without side effects, what the document alone does not show
    /// and the agent would otherwise find only when it starts: the files a
    /// connection reads (TLS CA, client certificate and key, password files
    /// and variables: each read and parsed as at start), serial devices and
    /// the directory of the outbox or checkpoint file. `text` is the
    /// document, for the lines.
    pub fn preflight(&self, text: &str) -> Preflight {
        let mut found = Preflight::default();
        let mut connections = Vec::new();
        for (name, source) in &self.sources {
            match source {
                Source::Mqtt(m) => connections.push((format!("sources.{name}"), m.clone())),
                Source::Serial(s) if !s.device.exists() => found.notes.push(with_line(
                    text,
                    format!(
                        "sources.{name}.device: {} does not exist now (the source waits for it, retrying with backoff)",
                        s.device.display()
                    ),
                )),
                _ => {}
            }
        }
        if let Some(m) = &self.output.mqtt {
            connections.push(("output.mqtt".into(), m.connection(&self.agent_id)));
        }
        if let Some(u) = &self.uplink {
            connections.push(("uplink".into(), u.connection(&self.agent_id)));
        }
        for (prefix, mut settings) in connections {
            if let Err(e) = settings
                .resolve_password()
                .and_then(|()| settings.options().map(drop))
            {
                found.errors.push(with_line(text, format!("{prefix}.{e}")));
            }
        }
        let files = [
            ("outbox.path", self.outbox.as_ref().map(|o| &o.path)),
            (
                "checkpoint.path",
                self.checkpoint.as_ref().and_then(|c| c.path.as_ref()),
            ),
        ];
        for (key, path) in files {
            if let Some(dir) = path.and_then(|p| p.parent())
                && !dir.as_os_str().is_empty()
                && !dir.is_dir()
            {
                found.notes.push(with_line(
                    text,
                    format!(
                        "{key}: the directory {} does not exist (the service's StateDirectory= creates /var/lib/sluice when it starts; elsewhere create it, or the agent will not start)",
                        dir.display()
                    ),
                ));
            }
        }
        found
    }

    /// The effective configuration, defaults filled in, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// Whether a source reads sensor nodes (a serial source with
    /// `format = "frames"`), whose records the node merger takes.
    pub fn has_nodes(&self) -> bool {
        self.sources.values().any(|s| {
            matches!(s, Source::Serial(s) if s.format == sluice_collectors::serial::SerialFormat::Frames)
        })
    }

    /// Checks every value; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.agent_id.is_empty() || self.agent_id.contains(['/', '+', '#']) {
            return err("agent_id", "must be non-empty, without '/', '+' or '#'");
        }
        if !(1..=256).contains(&self.workers) {
            return err("workers", "must be 1..=256");
        }
        if !self.ring_capacity.is_power_of_two() || !(16..=1 << 24).contains(&self.ring_capacity) {
            return err(
                "ring_capacity",
                "must be a power of two from 16 to 16777216",
            );
        }
        if self.max_series == 0 {
            return err("max_series", "must be > 0");
        }
        let s = &self.shedding;
        if !(s.high_water > 0.0 && s.high_water <= 1.0) {
            return err("shedding.high_water", "must be a fraction in (0, 1]");
        }
        if s.keep_one_in == 0 {
            return err("shedding.keep_one_in", "must be >= 1");
        }
        if let Err(e) = self.nodes.validate() {
            return Err(ConfigError(format!("nodes.{e}")));
        }
        if self.sources.is_empty() {
            return err(
                "sources",
                "define at least one source: [sources.<name>] with kind = \"mqtt\", \"udp\" or \"serial\"",
            );
        }
        for (name, source) in &self.sources {
            let checked = match source {
                Source::Mqtt(m) => m.validate(),
                Source::Udp(u) => u.validate(),
                Source::Serial(s) => s.validate(),
            };
            if let Err(why) = checked {
                return Err(ConfigError(format!("sources.{name}.{why}")));
            }
        }
        for (name, table) in &self.tables {
            table
                .validate()
                .map_err(|why| ConfigError(format!("tables.{name}.{why}")))?;
        }
        // Sensor nodes aggregate for themselves: their records need no rule.
        if self.rules.is_empty() && self.patterns.is_empty() && !self.has_nodes() {
            return err(
                "rules",
                "define at least one rule: [[rules]] with match = \"<glob>\" (or a [[patterns]] entry, or a serial source with format = \"frames\")",
            );
        }
        let labels: Vec<&str> = self
            .sources
            .values()
            .flat_map(|source| match source {
                Source::Mqtt(m) => &m.json.labels,
                Source::Udp(u) => &u.json.labels,
                Source::Serial(s) => &s.json.labels,
            })
            .map(String::as_str)
            .collect();
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate()
                .map_err(|why| ConfigError(format!("rules[{i}].{why}")))?;
            if let Some(name) = &rule.table
                && !self.tables.contains_key(name)
            {
                return err(
                    &format!("rules[{i}].table"),
                    &format!("no [tables.{name}] in this file"),
                );
            }
            if rule.group_by.is_some()
                && let Some(j) = self.rules[..i]
                    .iter()
                    .position(|r| r.group_by.is_some() && r.group_name() == rule.group_name())
            {
                let key = if rule.group_name.is_some() {
                    "group_name"
                } else {
                    "match"
                };
                return err(
                    &format!("rules[{i}].{key}"),
                    &format!(
                        "rules[{j}] already names its groups {:?}: set a group_name of its own",
                        rule.group_name()
                    ),
                );
            }
            for (key, label) in rule.label_uses() {
                if !labels.contains(&label) {
                    return err(
                        &format!("rules[{i}].{key}"),
                        &format!(
                            "no source reads the label {label:?}: add it to a source's json.labels"
                        ),
                    );
                }
            }
        }
        let grouped = self
            .derived
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("derived[{i}]"), &d.group_by))
            .chain(
                self.patterns
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("patterns[{i}]"), &p.group_by)),
            );
        for (entry, by) in grouped {
            if let Some(label) = by
                && !label.is_empty()
                && !labels.contains(&label.as_str())
            {
                return err(
                    &format!("{entry}.group_by"),
                    &format!(
                        "no source reads the label {label:?}: add it to a source's json.labels"
                    ),
                );
            }
        }
        // Each entry, and how they relate (names, no chains).
        Rules::compile(&[])
            .and_then(|r| r.with_derived(&self.derived))
            .and_then(|r| r.with_patterns(&self.patterns))
            .map_err(ConfigError)?;
        if let Some(m) = &self.output.mqtt {
            m.validate()
                .map_err(|why| ConfigError(format!("output.mqtt.{why}")))?;
        }
        match (&self.outbox, &self.uplink) {
            (Some(_), None) => return err("uplink", "an outbox needs an [uplink] to forward to"),
            (None, Some(_)) => {
                return err(
                    "outbox",
                    "an [uplink] forwards from an outbox: set [outbox] path = ...",
                );
            }
            (Some(o), Some(u)) => {
                if o.max_records == 0 {
                    return err("outbox.max_records", "must be > 0");
                }
                if o.max_bytes == 0 {
                    return err("outbox.max_bytes", "must be > 0");
                }
                if u.host.is_empty() {
                    return err("uplink.host", "must not be empty");
                }
                if !(1..=1024).contains(&u.max_inflight) {
                    return err("uplink.max_inflight", "must be 1..=1024");
                }
                for (key, t) in [
                    ("uplink.aggregate_topic", u.aggregate_topic()),
                    ("uplink.alert_topic", u.alert_topic()),
                ] {
                    let checked = match u.kind {
                        UplinkKind::Mqtt => crate::output::topic::check_template(&t, true),
                        UplinkKind::Nats => crate::output::subject::check_template(&t, true),
                        UplinkKind::Kafka => {
                            crate::output::kafka::check_template(&t, &self.agent_id)
                        }
                    };
                    if let Err(e) = checked {
                        return err(key, &e);
                    }
                }
                if u.kind == UplinkKind::Nats && !cfg!(feature = "nats") {
                    return err(
                        "uplink.kind",
                        "\"nats\" needs a sluice built with the `nats` feature (cargo build --features nats); this build does not have it",
                    );
                }
                if u.kind == UplinkKind::Kafka && !cfg!(feature = "kafka") {
                    return err(
                        "uplink.kind",
                        "\"kafka\" needs a sluice built with the `kafka` feature (cargo build --features kafka); this build does not have it",
                    );
                }
                u.connection(&self.agent_id)
                    .validate()
                    .map_err(|e| ConfigError(format!("uplink.{e}")))?;
            }
            (None, None) => {}
        }
        if let Some(c) = &self.checkpoint {
            if c.interval_ms < 100 {
                return err("checkpoint.interval_ms", "must be at least 100");
            }
            match (&self.outbox, &c.path) {
                (None, None) => {
                    return err(
                        "checkpoint.path",
                        "needed without an [outbox] (with one, checkpoints live in its file)",
                    );
                }
                (Some(o), Some(p)) if *p != o.path => {
                    return err(
                        "checkpoint.path",
                        "with an [outbox], checkpoints live in its file (so that a checkpoint commits with the records before it): remove checkpoint.path",
                    );
                }
                _ => {}
            }
        }
        if self.output.mqtt.is_none() && !self.output.console && self.outbox.is_none() {
            return err(
                "output",
                "set [output.mqtt] or output.console = true, or records go nowhere",
            );
        }
        Ok(())
    }

    /// The shedding policy for a ring of `capacity`.
    pub fn shed_policy(&self, capacity: usize) -> sluice_core::shed::ShedPolicy {
        let high_water =
            ((capacity as f64 * self.shedding.high_water).ceil() as usize).clamp(1, capacity);
        match self.shedding.policy {
            ShedKind::DropNewest => sluice_core::shed::ShedPolicy::DropNewest { high_water },
            ShedKind::Sample => sluice_core::shed::ShedPolicy::Sample {
                high_water,
                keep_one_in: self.shedding.keep_one_in,
            },
        }
    }
}

impl MqttOutput {
    fn validate(&self) -> Result<(), String> {
        if self.host.is_empty() {
            return Err("host: must not be empty".into());
        }
        for (key, template, needs_series) in [
            ("alert_topic", &self.alert_topic, true),
            ("state_topic", &self.state_topic, true),
            ("aggregate_topic", &self.aggregate_topic, true),
            ("stats_topic", &self.stats_topic, false),
            ("aggregate_batch_topic", &self.aggregate_batch_topic, false),
        ] {
            crate::output::topic::check_template(template, needs_series)
                .map_err(|e| format!("{key}: {e}"))?;
        }
        if self.aggregate_batch_topic.contains("{series}") {
            return Err(
                "aggregate_batch_topic: must not contain {series} (a batch holds many series)"
                    .into(),
            );
        }
        if self.aggregate_batch > MAX_AGGREGATE_BATCH {
            return Err(format!(
                "aggregate_batch: {} is more than {MAX_AGGREGATE_BATCH} records a message",
                self.aggregate_batch
            ));
        }
        for (key, qos) in [
            ("alert_qos", self.alert_qos),
            ("aggregate_qos", self.aggregate_qos),
        ] {
            if qos > 1 {
                return Err(format!("{key}: must be 0 or 1"));
            }
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err("password_env: set password_file or password_env, not both".into());
        }
        Ok(())
    }

    /// Settings for an MQTT connection to this broker.
    pub fn connection(&self, agent_id: &str) -> MqttSettings {
        let mut s = MqttSettings::new(&self.host, self.port, vec!["unused".into()]);
        s.client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{agent_id}-out"));
        s.username = self.username.clone();
        s.password_file = self.password_file.clone();
        s.password_env = self.password_env.clone();
        s.tls = self.tls.clone();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_name_the_key_and_its_line() {
        let text = "agent_id = \"a\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:9\"\nmax_datagram = 0\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n[[rules]]\nmatch = \"x\"\nwindow = { kind = \"tumbling\", size_ms = 0 }\n[output]\nconsole = true\n";
        let e = Config::parse(text).unwrap_err().0;
        assert_eq!(e, "line 5: sources.u.max_datagram: must be 1..=65507");
        let fixed = text.replace("max_datagram = 0", "max_datagram = 100");
        let e = Config::parse(&fixed).unwrap_err().0;
        assert!(e.starts_with("line 11: rules[1].window.size_ms:"), "{e}");
    }

    #[test]
    fn a_window_rule_prints_and_fingerprints_as_before() {
        use crate::pipeline::rules::{TumblingRule, WindowRule};
        // Checkpoints carry a fingerprint of the rule's JSON: a window rule
        // must serialize as it did when it was an internally tagged struct
        // variant, or an upgrade would discard every saved window.
        let rule = WindowRule::Tumbling(TumblingRule {
            size_ms: 1000,
            lateness_ms: 200,
        });
        assert_eq!(
            serde_json::to_string(&rule).unwrap(),
            r#"{"kind":"tumbling","size_ms":1000,"lateness_ms":200}"#
        );
        let effective = Config::parse(
            "[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:9\"\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"hopping\", size_ms = 2000, slide_ms = 1000 }\n[output]\nconsole = true\n",
        )
        .unwrap()
        .to_toml();
        assert!(effective.contains("kind = \"hopping\""), "{effective}");
        assert!(effective.contains("kind = \"udp\""), "{effective}");
        Config::parse(&effective).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = Config::parse("agent_id = \"a\"\nworkerz = 2\n")
            .unwrap_err()
            .0;
        assert!(e.contains("line 2") && e.contains("workerz"), "{e}");
    }
}
