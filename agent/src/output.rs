//! What the workers produce, and the task that delivers it: aggregate
//! records and alert events, as JSON over MQTT and/or lines on the console.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, QoS};
use serde::Serialize;
use sluice_core::Timestamp;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::MqttOutput;
use crate::topic::render as topic;
use crate::uplink::ToStore;

/// A closed window of a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateRecord {
    /// The gateway.
    pub agent: Arc<str>,
    /// The series key.
    pub series: String,
    /// Window start, ms since the epoch (inclusive).
    pub start: Timestamp,
    /// Window end, ms since the epoch (exclusive).
    pub end: Timestamp,
    /// Readings in the window.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Their mean.
    pub mean: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// Sample standard deviation (absent for one reading).
    pub stddev: Option<f64>,
    /// The value with the earliest event time.
    pub first: f64,
    /// The value with the latest event time.
    pub last: f64,
    /// The quantiles the rule asks for (`p50`, `p99`, `p99.9`, …), each
    /// within 1 % of the exact value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantiles: Option<std::collections::BTreeMap<String, f64>>,
    /// For a decaying window: its statistics at the end of the period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decaying: Option<DecayingSummary>,
    /// Readings of this series refused as late since the previous record.
    pub late: u64,
    /// Some readings may be missing: it was closed early (by shutdown), or
    /// it was restored after a crash (see `partial_reason`).
    pub partial: bool,
    /// Why `partial`, when it is not a shutdown: `"restored_after_crash"`
    /// for a window that started before the agent restarted from a crash,
    /// whose readings since the last checkpoint were lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_reason: Option<&'static str>,
    /// When shedding sampled this series, the rate it kept (one in this
    /// many). `count`, `sum`, `mean` and `stddev` already estimate the whole
    /// window: each kept reading counts as the readings it stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled_one_in: Option<u32>,
    /// When sampled: the standard error of `count` as an estimate, at most
    /// `sqrt(count · (sampled_one_in − 1))` (exact when every reading of the
    /// window was sampled; smaller when some were kept whole).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count_stderr: Option<f64>,
}

/// The statistics of an exponentially decaying window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DecayingSummary {
    /// Decaying mean.
    pub mean: f64,
    /// Decaying standard deviation.
    pub stddev: f64,
    /// Decaying sum S_t = Σ λ^i x_{t−i}.
    pub sum: f64,
    /// Decaying weight Σ λ^i (tends to 1/(1 − λ)).
    pub weight: f64,
}

/// A raise or clear of an alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    /// The gateway.
    pub agent: Arc<str>,
    /// The series key.
    pub series: String,
    /// The rule: `zscore`, `threshold_above`, `threshold_below`, `rate_of_change`.
    pub rule: &'static str,
    /// `raised` or `cleared`.
    pub state: &'static str,
    /// The reading that changed the state.
    pub value: f64,
    /// Its score: the signed z-score for `zscore` (compared by magnitude),
    /// the value for thresholds, the rate per second for `rate_of_change`.
    pub score: Option<f64>,
    /// The level the score crossed: the raise level for `raised`, the
    /// clear level for `cleared`.
    pub threshold: f64,
    /// Event time of the reading, ms since the epoch.
    pub event_ts: Timestamp,
    /// When the agent detected it, ms since the epoch.
    pub detected_ts: Timestamp,
}

/// Something to deliver.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A closed window.
    Aggregate(AggregateRecord),
    /// An alert change.
    Alert(AlertEvent),
    /// A stats snapshot (see [`crate::metrics::snapshot`]).
    Stats(serde_json::Value),
    /// A worker's checkpoint (for the store only; see `checkpoint`).
    Checkpoint {
        /// The worker.
        worker: usize,
        /// Its encoded state.
        state: Vec<u8>,
    },
}

/// What the output task delivered.
#[derive(Debug, Default)]
pub struct OutputStats {
    /// Aggregates handed to the outputs.
    pub aggregates: AtomicU64,
    /// Alerts raised.
    pub alerts_raised: AtomicU64,
    /// Alerts cleared.
    pub alerts_cleared: AtomicU64,
    /// Publishes that failed (the MQTT client's queue was gone).
    pub publish_errors: AtomicU64,
    /// Live messages dropped because the output broker was unreachable and
    /// the client's queue was full (the outbox stores regardless).
    pub dropped_offline: AtomicU64,
}

fn qos(n: u8) -> QoS {
    if n == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// How long, after shutdown is requested, records wait for room in the MQTT
/// client's queue before they are dropped (and counted).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The MQTT side of the output task.
struct MqttSink {
    client: AsyncClient,
    /// When shutdown stops waiting for a full queue (set at the first send
    /// after shutdown).
    grace_until: std::sync::OnceLock<tokio::time::Instant>,
    settings: MqttOutput,
    agent: Arc<str>,
    events: tokio::task::JoinHandle<rumqttc::EventLoop>,
    /// Whether the connection is up (between a CONNACK and an error).
    online: Arc<std::sync::atomic::AtomicBool>,
    /// The connection's name in logs: `output` or `output-alerts`.
    name: &'static str,
    /// Messages handed to the client, and those it has written to the
    /// broker: the difference is what its queue still holds.
    handed: AtomicU64,
    written: Arc<AtomicU64>,
}

impl MqttSink {
    /// A connection with `settings`; `suffix` is appended to its client id
    /// (the alert connection's is `-alerts`).
    fn connect(
        settings: &MqttOutput,
        agent: Arc<str>,
        suffix: &str,
        name: &'static str,
    ) -> Result<MqttSink, String> {
        let mut connection = settings.connection(&agent);
        connection.client_id.push_str(suffix);
        connection
            .resolve_password()
            .map_err(|e| format!("output.mqtt.{e}"))?;
        let options = connection
            .options()
            .map_err(|e| format!("output.mqtt.{e}"))?;
        // The request queue bounds what waits for the broker; a full queue
        // makes `publish` wait, which holds the workers back instead of
        // growing memory.
        let (client, mut events) = AsyncClient::new(options, 1024);
        events.set_network_options(sluice_collectors::mqtt::network_options());
        let online = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = online.clone();
        let written = Arc::new(AtomicU64::new(0));
        let wrote = written.clone();
        let events = tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            let mut disconnecting = false;
            loop {
                match events.poll().await {
                    // After our DISCONNECT, the broker closes the connection:
                    // only then has everything before it surely gone out.
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => disconnecting = true,
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                        wrote.fetch_add(1, Relaxed);
                    }
                    Err(_) if disconnecting => break,
                    Ok(Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        delay = Duration::from_millis(200);
                        up.store(true, Relaxed);
                        tracing::info!(connection = name, "output MQTT connected");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        up.store(false, Relaxed);
                        tracing::warn!(connection = name, error = %e, "output MQTT connection failed; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
            events
        });
        Ok(MqttSink {
            client,
            grace_until: std::sync::OnceLock::new(),
            settings: settings.clone(),
            agent,
            events,
            online,
            name,
            handed: AtomicU64::new(0),
            written,
        })
    }

    /// Publishes one message. While the broker is connected it waits when
    /// the client's queue is full (a slow broker holds the workers back).
    /// While it is unreachable, a message that finds the queue full is
    /// dropped and counted instead: the live output never holds up the
    /// outbox, which stores every record before it is published here. Once
    /// shutdown has been requested it waits at most [`SHUTDOWN_GRACE`] in
    /// all; after that a message that finds the queue full is dropped and
    /// counted, so that shutdown stays bounded when the broker is gone.
    async fn send(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        shutdown: &CancellationToken,
        stats: &OutputStats,
    ) -> Result<(), rumqttc::ClientError> {
        if !self.online.load(Relaxed) {
            let queued = self.client.try_publish(topic, qos, retain, payload);
            if queued.is_ok() {
                self.handed.fetch_add(1, Relaxed);
            } else if stats.dropped_offline.fetch_add(1, Relaxed) == 0 {
                tracing::warn!(
                    connection = self.name,
                    "output broker unreachable and its queue full: live records are dropped \
                     (counted in sluice_output_dropped_total); the outbox keeps storing"
                );
            }
            return Ok(());
        }
        let publish = self
            .client
            .publish(topic.clone(), qos, retain, payload.clone());
        if !shutdown.is_cancelled() {
            tokio::select! {
                sent = publish => return self.handed_if(sent),
                _ = shutdown.cancelled() => {}
            }
        }
        let deadline = *self
            .grace_until
            .get_or_init(|| tokio::time::Instant::now() + SHUTDOWN_GRACE);
        match tokio::time::timeout_at(
            deadline,
            self.client
                .publish(topic.clone(), qos, retain, payload.clone()),
        )
        .await
        {
            Ok(sent) => self.handed_if(sent),
            Err(_) => self.handed_if(self.client.try_publish(topic, qos, retain, payload)),
        }
    }

    /// `sent`, counting it as handed to the client if it was.
    fn handed_if(
        &self,
        sent: Result<(), rumqttc::ClientError>,
    ) -> Result<(), rumqttc::ClientError> {
        if sent.is_ok() {
            self.handed.fetch_add(1, Relaxed);
        }
        sent
    }

    async fn publish(&self, record: &Record, stats: &OutputStats, shutdown: &CancellationToken) {
        let s = &self.settings;
        let result = match record {
            Record::Checkpoint { .. } => return,
            Record::Aggregate(a) => {
                let payload = serde_json::to_vec(a).unwrap_or_default();
                let to = topic(&s.aggregate_topic, &self.agent, &a.series);
                self.send(to, qos(s.aggregate_qos), false, payload, shutdown, stats)
                    .await
            }
            Record::Alert(e) => {
                let payload = serde_json::to_vec(e).unwrap_or_default();
                let to = topic(&s.alert_topic, &self.agent, &e.series);
                let event = self
                    .send(
                        to,
                        qos(s.alert_qos),
                        false,
                        payload.clone(),
                        shutdown,
                        stats,
                    )
                    .await;
                // The retained state: what a subscriber that connects later sees.
                let to = topic(&s.state_topic, &self.agent, &e.series);
                let state = self
                    .send(to, qos(s.alert_qos), true, payload, shutdown, stats)
                    .await;
                event.and(state)
            }
            Record::Stats(v) => {
                let payload = serde_json::to_vec(v).unwrap_or_default();
                let to = topic(&s.stats_topic, &self.agent, "");
                self.send(to, QoS::AtMostOnce, true, payload, shutdown, stats)
                    .await
            }
        };
        if let Err(e) = result {
            // One line for the first failure; the count says the rest.
            if stats.publish_errors.fetch_add(1, Relaxed) == 0 {
                tracing::warn!(error = %e, "publish failed (further failures are counted in sluice_publish_errors_total)");
            }
        }
    }

    /// Disconnects once what was queued has gone out (bounded wait: a broker
    /// that is gone cannot take it).
    async fn close(self) {
        let _ = self.client.try_disconnect();
        if tokio::time::timeout(Duration::from_secs(5), self.events)
            .await
            .is_err()
        {
            // A QoS 1 message written again after a reconnect counts twice
            // in `written`: never below zero.
            let lost = self
                .handed
                .load(Relaxed)
                .saturating_sub(self.written.load(Relaxed));
            tracing::warn!(
                connection = self.name,
                lost,
                "output broker unreachable at shutdown: the live records still queued for it are lost (an outbox, if configured, holds the aggregates)"
            );
        }
    }
}

/// Where records for the outbox go: the writer thread's channel, and the
/// upstream topic templates.
pub struct OutboxFeed {
    /// The writer's channel.
    pub items: mpsc::Sender<ToStore>,
    /// What the store keeps.
    pub keeps: Keeps,
    /// Upstream topic template for aggregates.
    pub aggregate_topic: String,
    /// Upstream topic template for alerts, if alerts are stored too.
    pub alert_topic: Option<String>,
}

/// What the store keeps of the records (it always keeps checkpoints when
/// they are on). Three states, not a pair of flags: the pair once let
/// checkpoint-only mode skip its window marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keeps {
    /// The records, to forward (an outbox without checkpoints).
    Records,
    /// The records, and each aggregate's window mark (outbox and
    /// checkpoints: a mark commits with its record).
    RecordsAndMarks,
    /// Only each aggregate's window mark (checkpoints without an outbox), so
    /// that a restored checkpoint never emits a window again.
    Marks,
}

impl Keeps {
    /// What a store with an outbox (`records`) and/or checkpoints keeps.
    pub fn new(records: bool, checkpoints: bool) -> Keeps {
        match (records, checkpoints) {
            (true, true) => Keeps::RecordsAndMarks,
            (true, false) => Keeps::Records,
            (false, _) => Keeps::Marks,
        }
    }
}

impl OutboxFeed {
    /// Queues a worker's checkpoint (moved: it may be megabytes).
    async fn save(&self, worker: usize, state: Vec<u8>) {
        let _ = self.items.send(ToStore::Checkpoint { worker, state }).await;
    }

    /// Queues a record for the outbox (waiting while the writer is behind);
    /// with checkpoints only, an aggregate's window mark.
    async fn store(&self, record: &Record, agent: &str) {
        let item = match (record, self.keeps) {
            (Record::Checkpoint { .. } | Record::Stats(_), _) => return,
            (Record::Aggregate(a), Keeps::Marks) => {
                let mark = ToStore::Mark {
                    series: a.series.clone(),
                    end: a.end,
                };
                let _ = self.items.send(mark).await;
                return;
            }
            (Record::Alert(_), Keeps::Marks) => return,
            (Record::Aggregate(a), keeps) => (
                topic(&self.aggregate_topic, agent, &a.series),
                serde_json::to_vec(a),
                (keeps == Keeps::RecordsAndMarks).then(|| (a.series.clone(), a.end)),
            ),
            (Record::Alert(e), _) => match &self.alert_topic {
                Some(t) => (topic(t, agent, &e.series), serde_json::to_vec(e), None),
                None => return,
            },
        };
        if let (topic, Ok(payload), mark) = item {
            let _ = self
                .items
                .send(ToStore::Record {
                    topic,
                    payload,
                    mark,
                })
                .await;
        }
    }
}

/// `ms` since the epoch as the local time of day, `HH:MM:SS` (and `.mmm`
/// with `millis`); the date is left out: console lines are read as they
/// come.
pub fn clock(ms: Timestamp, millis: bool) -> String {
    let secs = ms.div_euclid(1000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (integers, and a null
    // `tm_zone` pointer that localtime_r overwrites); localtime_r is the
    // thread-safe form and writes only into the `tm` we own.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        (!libc::localtime_r(&secs, &mut tm).is_null()).then_some(tm)
    };
    let (h, m, s) = tm.map_or_else(
        || {
            let day = ms.rem_euclid(86_400_000) / 1000;
            (day / 3600, day / 60 % 60, day % 60)
        },
        |tm| (tm.tm_hour.into(), tm.tm_min.into(), tm.tm_sec.into()),
    );
    if millis {
        format!("{h:02}:{m:02}:{s:02}.{:03}", ms.rem_euclid(1000))
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// Prints records on standard output, one line each.
fn print(record: &Record) {
    match record {
        Record::Stats(_) | Record::Checkpoint { .. } => {}
        Record::Aggregate(a) => {
            println!(
                "agg   {:<24} {}-{}  n={:<4} mean={:>9.3}  min={:>9.3}  max={:>9.3}{}{}",
                a.series,
                clock(a.start, true),
                clock(a.end, true),
                a.count,
                a.mean,
                a.min,
                a.max,
                if a.late > 0 {
                    format!("  late={}", a.late)
                } else {
                    String::new()
                },
                if a.partial { "  (partial)" } else { "" }
            );
        }
        Record::Alert(e) => println!(
            "ALERT {:<7} {:<24} {:<16} value={:.3} score={} threshold={:.3}",
            e.state,
            e.series,
            e.rule,
            e.value,
            e.score.map_or("-".into(), |s| format!("{s:.2}")),
            e.threshold
        ),
    }
}

/// Delivers records until every sender is gone, then closes the outputs.
///
/// Alerts arrive on their own channel (`alerts`) and go out from their own
/// task over their own MQTT connection: the burst of aggregates that closes
/// at every window boundary (one per series) never queues ahead of an alert,
/// in a channel, in this task, or in a client's request queue.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    records: mpsc::Receiver<Record>,
    alerts: mpsc::Receiver<Record>,
    mqtt: Option<&MqttOutput>,
    console: Console,
    agent: Arc<str>,
    stats: Arc<OutputStats>,
    shutdown: CancellationToken,
    outbox: Option<OutboxFeed>,
) -> Result<(), String> {
    let sink = mqtt
        .map(|m| MqttSink::connect(m, agent.clone(), "", "output"))
        .transpose()?;
    let alert_sink = mqtt
        .map(|m| MqttSink::connect(m, agent.clone(), "-alerts", "output-alerts"))
        .transpose()?;
    let outbox = outbox.map(Arc::new);
    let alert_lane = tokio::spawn(deliver(Lane {
        rx: alerts,
        sink: alert_sink,
        console: console.clone(),
        agent: agent.clone(),
        stats: stats.clone(),
        shutdown: shutdown.clone(),
        outbox: outbox.clone(),
    }));
    // Both close at once: each waits (bounded) for its broker.
    deliver(Lane {
        rx: records,
        sink,
        console,
        agent,
        stats,
        shutdown,
        outbox,
    })
    .await;
    alert_lane
        .await
        .map_err(|e| format!("alert output task failed: {e}"))
}

/// What the console gets.
#[derive(Clone, Debug)]
pub enum Console {
    /// Nothing.
    Off,
    /// Each aggregate and alert as a line on standard output
    /// (`output.console = true`).
    Lines,
    /// Each aggregate and alert as a record, for a caller that shows them
    /// its own way (`sluice demo`); dropped if the caller falls behind.
    Tap(mpsc::Sender<Record>),
}

/// One channel's way out: to the outbox, the console and an MQTT connection.
struct Lane {
    rx: mpsc::Receiver<Record>,
    sink: Option<MqttSink>,
    console: Console,
    agent: Arc<str>,
    stats: Arc<OutputStats>,
    shutdown: CancellationToken,
    outbox: Option<Arc<OutboxFeed>>,
}

/// Delivers what comes on `lane.rx` until every sender is gone, then closes
/// the lane's MQTT connection.
async fn deliver(mut lane: Lane) {
    let stats = &lane.stats;
    while let Some(record) = lane.rx.recv().await {
        if let Record::Checkpoint { worker, state } = record {
            // Only the store takes these.
            if let Some(feed) = &lane.outbox {
                feed.save(worker, state).await;
            }
            continue;
        }
        match &record {
            Record::Aggregate(_) => stats.aggregates.fetch_add(1, Relaxed),
            Record::Alert(e) if e.state == "raised" => stats.alerts_raised.fetch_add(1, Relaxed),
            Record::Alert(_) => stats.alerts_cleared.fetch_add(1, Relaxed),
            Record::Stats(_) | Record::Checkpoint { .. } => 0,
        };
        match &lane.console {
            Console::Off => {}
            Console::Lines => print(&record),
            Console::Tap(tap) => {
                if !matches!(record, Record::Stats(_)) {
                    let _ = tap.try_send(record.clone());
                }
            }
        }
        if let Some(feed) = &lane.outbox {
            feed.store(&record, &lane.agent).await;
        }
        if let Some(sink) = &lane.sink {
            sink.publish(&record, stats, &lane.shutdown).await;
        }
    }
    if let Some(sink) = lane.sink {
        sink.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aggregate(series: &str, end: Timestamp) -> Record {
        Record::Aggregate(AggregateRecord {
            agent: "a".into(),
            series: series.into(),
            start: end - 1000,
            end,
            count: 1,
            sum: 1.0,
            mean: 1.0,
            min: 1.0,
            max: 1.0,
            stddev: None,
            first: 1.0,
            last: 1.0,
            quantiles: None,
            decaying: None,
            late: 0,
            partial: false,
            partial_reason: None,
            sampled_one_in: None,
            count_stderr: None,
        })
    }

    /// What the feed hands the writer for one aggregate, when the store
    /// keeps `keeps`.
    fn stored(keeps: Keeps) -> Vec<ToStore> {
        let (items, mut rx) = mpsc::channel(8);
        let feed = OutboxFeed {
            items,
            keeps,
            aggregate_topic: "up/{series}".into(),
            alert_topic: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(feed.store(&aggregate("s", 5000), "a"));
        drop(feed);
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn checkpoint_only_mode_stores_window_marks() {
        match &stored(Keeps::Marks)[..] {
            [ToStore::Mark { series, end }] => assert_eq!((series.as_str(), *end), ("s", 5000)),
            other => panic!("{other:?}"),
        }
        match &stored(Keeps::RecordsAndMarks)[..] {
            [ToStore::Record { topic, mark, .. }] => {
                assert_eq!(topic, "up/s");
                assert_eq!(mark, &Some(("s".to_string(), 5000)));
            }
            other => panic!("{other:?}"),
        }
        match &stored(Keeps::Records)[..] {
            [ToStore::Record { mark: None, .. }] => {}
            other => panic!("{other:?}"),
        }
    }
}
