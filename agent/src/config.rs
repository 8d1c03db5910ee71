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
use sluice_core::anomaly::RuleError;
use sluice_core::window::WindowError;

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
    /// What to compute for which series; the first rule whose `match` glob
    /// fits a series key applies. Series that no rule matches are counted
    /// and ignored.
    #[serde(default)]
    pub rules: Vec<Rule>,
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
    pub durability: crate::outbox::Durability,
    /// A damaged file at start: `move_aside` (default: rename it and start
    /// empty) or `refuse` (do not start).
    #[serde(default)]
    pub on_corrupt: crate::outbox::OnCorrupt,
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
    pub on_full: crate::outbox::OnFull,
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

/// The upstream broker.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Broker host.
    pub host: String,
    /// Broker port. Default 8883 with TLS, 1883 without.
    pub port: Option<u16>,
    /// Client id. Default `sluice-<agent_id>-uplink`.
    pub client_id: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// TLS (CA file, optional client certificate and key).
    pub tls: Option<TlsSettings>,
    /// Topic template for forwarded aggregates. Default `sluice/{agent}/agg/{series}`.
    #[serde(default = "default_aggregate_topic")]
    pub aggregate_topic: String,
    /// Topic template for forwarded alerts. Default `sluice/{agent}/alerts/{series}`.
    #[serde(default = "default_alert_topic")]
    pub alert_topic: String,
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

/// What to compute for the series a glob matches.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Glob on series keys: `*` any run of characters, `?` one, `[a-z]` a
    /// class. E.g. `s-*`, `*/temperature`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The window whose aggregates are published; none if absent.
    pub window: Option<WindowRule>,
    /// Quantiles to report with each window's aggregates, each in (0, 1),
    /// e.g. `[0.5, 0.9, 0.99]` (within 1 % of the exact values; needs a
    /// window). Default: none.
    #[serde(default)]
    pub quantiles: Vec<f64>,
    /// An EWMA z-score anomaly rule.
    pub anomaly: Option<AnomalyRule>,
    /// Threshold rules.
    #[serde(default)]
    pub thresholds: Vec<ThresholdRule>,
    /// A rate-of-change rule.
    pub rate_of_change: Option<RateRule>,
    /// Raise an `absent` alert when a series that has reported sends
    /// nothing for this long (ms, on the agent's clock; at least 100);
    /// its next reading clears it. Default: none.
    pub absent_after_ms: Option<u64>,
    /// `critical` series are never shed; `normal` (default) ones may be.
    #[serde(default)]
    pub priority: PriorityKind,
}

/// Shedding priority of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PriorityKind {
    /// May be shed under overload.
    #[default]
    Normal,
    /// Never shed by the policy.
    Critical,
}

/// A window over event time (ms) or a count of readings:
/// `{ kind = "tumbling" | "hopping" | "count" | "decaying", … }`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WindowRule {
    /// Back-to-back windows of `size_ms`.
    Tumbling(TumblingRule),
    /// Windows of `size_ms` every `slide_ms` (a multiple of the slide).
    Hopping(HoppingRule),
    /// Windows of `size` readings.
    Count(CountRule),
    /// An exponentially decaying window (decaying sum, mean and standard
    /// deviation), reported every `every_ms` of event time together with the
    /// plain aggregates of that period.
    Decaying(DecayingRule),
}

/// `kind = "tumbling"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TumblingRule {
    /// Window length, ms.
    pub size_ms: i64,
    /// How long to wait for out-of-order readings, ms (at most 3 windows).
    #[serde(default)]
    pub lateness_ms: i64,
}

/// `kind = "hopping"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HoppingRule {
    /// Window length, ms.
    pub size_ms: i64,
    /// Distance between window starts, ms.
    pub slide_ms: i64,
    /// How long to wait for out-of-order readings, ms.
    #[serde(default)]
    pub lateness_ms: i64,
}

/// `kind = "count"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CountRule {
    /// Readings per window.
    pub size: u64,
}

/// `kind = "decaying"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecayingRule {
    /// Readings after which a reading's weight has halved.
    pub half_life: f64,
    /// Report period, ms.
    pub every_ms: i64,
}

/// Alert when a value is far from its exponentially decaying mean.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyRule {
    /// EWMA smoothing factor α in (0, 1). Default 0.01.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Raise when |z| ≥ k. Default 4.
    #[serde(default = "default_k")]
    pub k: f64,
    /// Clear when |z| < clear_k (≤ k). Default: k.
    pub clear_k: Option<f64>,
    /// Readings that only train the baseline. Default 30.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    /// Consecutive readings at or above k to raise. Default 1.
    #[serde(default = "one")]
    pub raise_after: u32,
    /// Consecutive readings below clear_k to clear. Default 1.
    #[serde(default = "one")]
    pub clear_after: u32,
}

const fn default_alpha() -> f64 {
    0.01
}
const fn default_k() -> f64 {
    4.0
}
const fn default_warmup() -> u64 {
    30
}
const fn one() -> u32 {
    1
}

/// Alert when a value crosses a limit.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    /// Raise at or above this value (set `above` or `below`, not both).
    pub above: Option<f64>,
    /// Raise at or below this value.
    pub below: Option<f64>,
    /// Clear once the value is back past this one (below it for `above`,
    /// above it for `below`). Default: the limit itself.
    pub clear_at: Option<f64>,
    /// Consecutive readings past the limit to raise. Default 1.
    #[serde(default = "one")]
    pub raise_after: u32,
    /// Consecutive readings back to clear. Default 1.
    #[serde(default = "one")]
    pub clear_after: u32,
}

/// Alert when a value changes faster than a limit.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateRule {
    /// Raise when |Δvalue| per second ≥ this.
    pub per_second_above: f64,
    /// Clear when it is below this (≤ the limit). Default: the limit.
    pub clear_below: Option<f64>,
    /// Consecutive readings to raise. Default 1.
    #[serde(default = "one")]
    pub raise_after: u32,
    /// Consecutive readings to clear. Default 1.
    #[serde(default = "one")]
    pub clear_after: u32,
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

/// `message` (`key: why`) with the line of the key in `text` before it.
fn with_line(text: &str, message: String) -> String {
    let key = message.split_once(": ").map_or("", |(key, _)| key);
    match line_of(text, key) {
        Some(line) => format!("line {line}: {message}"),
        None => message,
    }
}

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
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
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
        if self.rules.is_empty() {
            return err(
                "rules",
                "define at least one rule: [[rules]] with match = \"<glob>\"",
            );
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate()
                .map_err(|why| ConfigError(format!("rules[{i}].{why}")))?;
        }
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
                    ("uplink.aggregate_topic", &u.aggregate_topic),
                    ("uplink.alert_topic", &u.alert_topic),
                ] {
                    if let Err(e) = crate::topic::check_template(t, true) {
                        return err(key, &e);
                    }
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

impl Rule {
    /// Errors start with the key (below the rule) they are about.
    fn validate(&self) -> Result<(), String> {
        glob::Pattern::new(&self.pattern)
            .map_err(|e| format!("match: bad glob {:?}: {e}", self.pattern))?;
        if let Some(w) = &self.window {
            crate::rules::window_for::<sluice_core::aggregate::Aggregate>(w)
                .map_err(|e| format!("window.{}", window_problem(w, e)))?;
        }
        if !self.quantiles.is_empty() && self.window.is_none() {
            return Err("quantiles: need a window".into());
        }
        if self.quantiles.iter().any(|q| !(*q > 0.0 && *q < 1.0)) {
            return Err("quantiles: each must be in (0, 1), e.g. 0.99".into());
        }
        if self.window.is_none()
            && self.anomaly.is_none()
            && self.thresholds.is_empty()
            && self.rate_of_change.is_none()
            && self.absent_after_ms.is_none()
        {
            return Err("match: the rule computes nothing: add a window, anomaly, thresholds, rate_of_change or absent_after_ms".into());
        }
        if self
            .absent_after_ms
            .is_some_and(|ms| !(100..=i64::MAX as u64 / 2).contains(&ms))
        {
            return Err("absent_after_ms: must be at least 100".into());
        }
        if let Some(a) = &self.anomaly {
            crate::rules::zscore_for(a).map_err(|e| {
                let levels = Levels {
                    raise: ("k", a.k),
                    clear: "clear_k",
                    raise_after: a.raise_after,
                    positive: true,
                };
                format!("anomaly.{}", levels.problem(&e))
            })?;
        }
        for (i, t) in self.thresholds.iter().enumerate() {
            let limit = match (t.above, t.below) {
                (Some(limit), None) => ("above", limit),
                (None, Some(limit)) => ("below", limit),
                _ => {
                    return Err(format!(
                        "thresholds[{i}].above: set exactly one of above and below"
                    ));
                }
            };
            crate::rules::threshold_at(limit.0 == "above", limit.1, t).map_err(|e| {
                let levels = Levels {
                    raise: limit,
                    clear: "clear_at",
                    raise_after: t.raise_after,
                    positive: false,
                };
                format!("thresholds[{i}].{}", levels.problem(&e))
            })?;
        }
        if let Some(r) = &self.rate_of_change {
            crate::rules::rate_for(r).map_err(|e| {
                let levels = Levels {
                    raise: ("per_second_above", r.per_second_above),
                    clear: "clear_below",
                    raise_after: r.raise_after,
                    positive: false,
                };
                format!("rate_of_change.{}", levels.problem(&e))
            })?;
        }
        Ok(())
    }
}

/// A window rule's error, as `key: why` with the key it is about.
fn window_problem(w: &WindowRule, e: WindowError) -> String {
    let key = match (e, w) {
        (WindowError::NotPositive, WindowRule::Hopping(h)) if h.size_ms > 0 => "slide_ms",
        (WindowError::NotPositive, WindowRule::Count(_)) => "size",
        (WindowError::NotPositive, WindowRule::Decaying(_)) => "every_ms",
        (WindowError::LengthNotMultipleOfSlide, _) => "slide_ms",
        (WindowError::NotPositive, _) => "size_ms",
        (WindowError::NegativeLateness | WindowError::TooFewPanes { .. }, _) => "lateness_ms",
        (WindowError::BadDecay, _) => "half_life",
    };
    match e {
        WindowError::LengthNotMultipleOfSlide => {
            format!("{key}: must divide size_ms into whole slides")
        }
        WindowError::BadDecay => format!("{key}: must be > 0 (readings)"),
        e => format!("{key}: {e}"),
    }
}

/// The keys of a detector's levels, to name the one a core error is about.
struct Levels {
    /// The raise level's key and value.
    raise: (&'static str, f64),
    /// The clear level's key.
    clear: &'static str,
    raise_after: u32,
    /// The raise level must be > 0 (a level of |z|).
    positive: bool,
}

impl Levels {
    fn problem(&self, e: &RuleError) -> String {
        let (raise_key, raise) = self.raise;
        if self.positive && raise <= 0.0 && !matches!(e, RuleError::ZeroCount) {
            // Checked after the levels' order in the core: say the first cause.
            return format!("{raise_key}: must be > 0");
        }
        let key = match e {
            RuleError::ClearAboveRaise | RuleError::NotFinite | RuleError::NegativeScore
                if raise.is_nan() || raise.is_infinite() =>
            {
                raise_key
            }
            RuleError::ClearAboveRaise | RuleError::NotFinite | RuleError::NegativeScore => {
                self.clear
            }
            RuleError::ZeroCount if self.raise_after == 0 => "raise_after",
            RuleError::ZeroCount => "clear_after",
            RuleError::Decay(_) => return "alpha: must be in (0, 1), e.g. 0.01".into(),
            RuleError::NotPositive => raise_key,
        };
        match e {
            RuleError::ZeroCount => format!("{key}: must be >= 1"),
            RuleError::ClearAboveRaise if key == self.clear => {
                format!("{key}: must not be past the raise level ({raise_key} = {raise})")
            }
            e => format!("{key}: {e}"),
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
        ] {
            crate::topic::check_template(template, needs_series)
                .map_err(|e| format!("{key}: {e}"))?;
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

/// Tables whose shape `kind` names (`[sources.<name>]`, a rule's `window`)
/// are rewritten from `{ kind = "x", … }` to `{ x = { … } }` (the key `x`
/// keeps the span of the value `"x"`), the form serde reads for
/// [`SourceByKind`] and [`WindowByKind`]. Serde's own internally tagged
/// form would buffer the table, and an error inside it (an unknown key, a
/// bad value) would point at the table, not at the key.
type Located = (std::ops::Range<usize>, Option<&'static str>, String);

fn retag(doc: &mut toml::de::DeTable<'_>) -> Result<(), Located> {
    use toml::de::DeValue;
    if let Some(sources) = doc.get_mut("sources")
        && let DeValue::Table(sources) = sources.get_mut()
    {
        for (_, source) in sources.iter_mut() {
            move_kind(source)?;
        }
    }
    if let Some(rules) = doc.get_mut("rules")
        && let DeValue::Array(rules) = rules.get_mut()
    {
        for rule in rules.iter_mut() {
            if let DeValue::Table(rule) = rule.get_mut()
                && let Some(window) = rule.get_mut("window")
            {
                move_kind(window)?;
            }
        }
    }
    Ok(())
}

fn move_kind(value: &mut toml::Spanned<toml::de::DeValue<'_>>) -> Result<(), Located> {
    use toml::de::{DeTable, DeValue};
    let span = value.span();
    // Not a table: serde says what type was expected.
    let DeValue::Table(table) = value.get_mut() else {
        return Ok(());
    };
    let Some(kind) = table.remove("kind") else {
        return Err((span, Some("kind"), "missing: say which kind this is".into()));
    };
    let kind_span = kind.span();
    let DeValue::String(name) = kind.into_inner() else {
        return Err((kind_span, None, "must be a string".into()));
    };
    let mut wrapped = DeTable::new();
    wrapped.insert(
        toml::Spanned::new(kind_span, name),
        toml::Spanned::new(span.clone(), DeValue::Table(std::mem::take(table))),
    );
    *value = toml::Spanned::new(span, DeValue::Table(wrapped));
    Ok(())
}

/// `[sources.<name>]` as [`retag`] leaves it.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SourceByKind {
    Mqtt(MqttSettings),
    Udp(UdpSettings),
    Serial(SerialSettings),
}

/// Reads the form [`retag`] leaves (see [`Config::parse`]).
impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match SourceByKind::deserialize(d)? {
            SourceByKind::Mqtt(s) => Source::Mqtt(s),
            SourceByKind::Udp(s) => Source::Udp(s),
            SourceByKind::Serial(s) => Source::Serial(s),
        })
    }
}

/// A rule's `window` as [`retag`] leaves it.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WindowByKind {
    Tumbling(TumblingRule),
    Hopping(HoppingRule),
    Count(CountRule),
    Decaying(DecayingRule),
}

/// Reads the form [`retag`] leaves (see [`Config::parse`]).
impl<'de> Deserialize<'de> for WindowRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match WindowByKind::deserialize(d)? {
            WindowByKind::Tumbling(w) => WindowRule::Tumbling(w),
            WindowByKind::Hopping(w) => WindowRule::Hopping(w),
            WindowByKind::Count(w) => WindowRule::Count(w),
            WindowByKind::Decaying(w) => WindowRule::Decaying(w),
        })
    }
}

/// The dotted path (`rules[1].window.size_ms`) of the deepest key whose
/// name or value covers byte `at` of the document; empty if none does.
fn key_at(table: &toml::de::DeTable<'_>, at: usize) -> String {
    use toml::de::DeValue;
    fn within(table: &toml::de::DeTable<'_>, at: usize, prefix: &str) -> Option<String> {
        for (key, value) in table.iter() {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let deeper = match value.get_ref() {
                DeValue::Table(t) => within(t, at, &path),
                DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                    let path = format!("{path}[{i}]");
                    match item.get_ref() {
                        DeValue::Table(t) => within(t, at, &path),
                        _ => None,
                    }
                    .or_else(|| item.span().contains(&at).then_some(path))
                }),
                _ => None,
            };
            if deeper.is_some() {
                return deeper;
            }
            if key.span().contains(&at) || value.span().contains(&at) {
                return Some(path);
            }
        }
        None
    }
    within(table, at, "").unwrap_or_default()
}

/// The line (1-based) where the dotted key `path` (with `[i]` array indices,
/// as validation errors write it) is defined in `text`, or where its deepest
/// enclosing table or array element is; `None` if not even the first key is.
fn line_of(text: &str, path: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut found: Option<std::ops::Range<usize>> = None;
    for segment in path.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        found = Some(value.span());
        let mut value = value.get_ref();
        if let Some(i) = index {
            let toml::de::DeValue::Array(items) = value else {
                break;
            };
            let Some(item) = items.get(i) else { break };
            found = Some(item.span());
            value = item.get_ref();
        }
        match value {
            toml::de::DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    let span = found?;
    Some(text.get(..span.start)?.matches('\n').count() + 1)
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
