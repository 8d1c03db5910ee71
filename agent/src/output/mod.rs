//! What the workers produce, and the task that delivers it: aggregate
//! records and alert events, as JSON over MQTT and/or lines on the console.

mod console;
pub mod kafka;
mod mqtt;
mod record;
pub mod subject;
pub mod topic;

use console::print;
pub use console::{Console, clock};
use mqtt::MqttSink;
pub use record::{
    AggregateRecord, AlertEvent, DecayingSummary, Delays, DistinctRecord, FrequencyRecord,
    FrequencyValue, GroupRecord, LabelRecord, Made, OutputStats, Record, RecordExtras, TopRecord,
    TopValue, base64_bytes, base64_of, sketch_base64,
};

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::MqttOutput;
use crate::store::uplink::ToStore;

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
    /// How a template and ids become a topic (MQTT) or a subject (NATS).
    pub render: fn(&str, &str, &str) -> String,
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
                (self.render)(&self.aggregate_topic, agent, &a.series),
                serde_json::to_vec(a),
                (keeps == Keeps::RecordsAndMarks).then(|| (a.series.clone(), a.end)),
            ),
            (Record::Alert(e), _) => match &self.alert_topic {
                Some(t) => (
                    (self.render)(t, agent, &e.series),
                    serde_json::to_vec(e),
                    None,
                ),
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
///
/// With `aggregate_batch`, aggregates collect in a batch while more records
/// are already waiting in the channel, and the batch leaves when none is
/// (or when it is full): no timer, so a lone record is not held back, and
/// the thousands a window boundary closes go out in a few messages.
async fn deliver(mut lane: Lane) {
    let stats = &lane.stats;
    let mut batch = lane.sink.as_ref().and_then(MqttSink::batch);
    loop {
        let record = match lane.rx.try_recv() {
            Ok(record) => record,
            Err(mpsc::error::TryRecvError::Empty) => {
                if let (Some(sink), Some(batch)) = (&lane.sink, &mut batch) {
                    sink.send_batch(batch, stats, &lane.shutdown).await;
                }
                match lane.rx.recv().await {
                    Some(record) => record,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        if let Record::Checkpoint { worker, state } = record {
            // Only the store takes these.
            if let Some(feed) = &lane.outbox {
                feed.save(worker, state).await;
            }
            continue;
        }
        match &record {
            Record::Aggregate(_) => stats.aggregates.fetch_add(1, Relaxed),
            Record::Alert(e) if e.state != "cleared" => stats.alerts_raised.fetch_add(1, Relaxed),
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
        match (&lane.sink, &mut batch, &record) {
            (Some(sink), Some(batch), Record::Aggregate(a)) => {
                sink.batch_aggregate(batch, a, stats, &lane.shutdown).await;
            }
            (Some(sink), _, _) => {
                sink.publish(&record, stats, &lane.shutdown).await;
                if let Record::Aggregate(a) = &record {
                    stats.aggregate_delay.record(a.made);
                }
            }
            (None, _, _) => {}
        }
    }
    if let Some(sink) = lane.sink {
        if let Some(batch) = &mut batch {
            sink.send_batch(batch, stats, &lane.shutdown).await;
        }
        sink.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::Timestamp;

    fn aggregate(series: &str, end: Timestamp) -> Record {
        Record::Aggregate(Box::new(AggregateRecord {
            agent: "a".into(),
            series: series.into(),
            group: None,
            table: None,
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
            extras: None,
            late: 0,
            partial: false,
            partial_reason: None,
            sampled_one_in: None,
            count_stderr: None,
            made: Made::default(),
        }))
    }

    #[test]
    fn a_console_line_shows_the_distinct_count() {
        let Record::Aggregate(mut a) = aggregate("gw-1", 60_000) else {
            unreachable!()
        };
        a.extras = Some(Box::new(RecordExtras {
            distinct: Some(Box::new(DistinctRecord {
                label: "mac".into(),
                estimate: 4_987.4,
                rse: 0.013,
                low: 4_857.7,
                high: 5_117.1,
                without_label: 0,
                sketch: None,
            })),
            ..RecordExtras::NONE
        }));
        let mut line = Vec::new();
        console::write(&Record::Aggregate(a), &mut line).unwrap();
        let line = String::from_utf8(line).unwrap();
        assert!(line.starts_with("agg   gw-1 "), "{line}");
        assert!(line.trim_end().ends_with("distinct mac=4987"), "{line}");
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
            render: crate::output::topic::render,
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
