//! The MQTT connections of the live output: one for aggregates and stats,
//! one for alerts, each with its own request queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, QoS};
use tokio_util::sync::CancellationToken;

use super::record::{OutputStats, Record};
use super::topic::render as topic;
use crate::config::MqttOutput;

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

/// Aggregates waiting to leave as one message (`aggregate_batch`): a JSON
/// array being written.
pub(super) struct Batch {
    topic: String,
    max_records: usize,
    max_bytes: usize,
    /// `[` and the records so far, comma-separated (no `]` yet).
    json: Vec<u8>,
    /// When each of those records was made.
    made: Vec<super::Made>,
}

/// The MQTT side of the output task.
pub(super) struct MqttSink {
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
    pub(super) fn connect(
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
        // The client would refuse it in its event loop, which fails the
        // connection: every message in flight on it would be sent again or,
        // at QoS 0, lost. Refused here instead, on its own.
        let size = sluice_collectors::mqtt::publish_size(topic.len(), payload.len());
        let max = sluice_collectors::mqtt::MAX_OUTGOING_PACKET;
        if size > max {
            let n = stats.too_large.fetch_add(1, Relaxed) + 1;
            // The first, and then each time the count doubles.
            if n.is_power_of_two() {
                tracing::warn!(
                    connection = self.name,
                    topic,
                    size,
                    "a message too large for one MQTT packet ({size} bytes, over {max}) is not published; \
                     {n} so far (sluice_output_too_large_total); the outbox, if configured, keeps the record"
                );
            }
            return Ok(());
        }
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

    /// An empty batch, if this connection sends aggregates in batches
    /// (`aggregate_batch`).
    pub(super) fn batch(&self) -> Option<Batch> {
        let s = &self.settings;
        (s.aggregate_batch > 0).then(|| {
            let topic = topic(&s.aggregate_batch_topic, &self.agent, "");
            Batch {
                // The packet's header, the topic and a packet id take their
                // share of the client's largest packet.
                max_bytes: sluice_collectors::mqtt::MAX_OUTGOING_PACKET
                    .saturating_sub(sluice_collectors::mqtt::publish_size(topic.len(), 0)),
                topic,
                max_records: s.aggregate_batch,
                json: Vec::new(),
                made: Vec::new(),
            }
        })
    }

    /// Adds an aggregate to `batch`, sending the batch first if the record
    /// would take it past its bytes, and after if it is then full.
    pub(super) async fn batch_aggregate(
        &self,
        batch: &mut Batch,
        record: &super::AggregateRecord,
        stats: &OutputStats,
        shutdown: &CancellationToken,
    ) {
        let json = serde_json::to_vec(record).unwrap_or_default();
        if !batch.made.is_empty() && batch.json.len() + json.len() + 2 > batch.max_bytes {
            self.send_batch(batch, stats, shutdown).await;
        }
        batch
            .json
            .push(if batch.made.is_empty() { b'[' } else { b',' });
        batch.json.extend_from_slice(&json);
        batch.made.push(record.made);
        if batch.made.len() >= batch.max_records {
            self.send_batch(batch, stats, shutdown).await;
        }
    }

    /// Sends what `batch` holds (nothing if it is empty) as one message.
    pub(super) async fn send_batch(
        &self,
        batch: &mut Batch,
        stats: &OutputStats,
        shutdown: &CancellationToken,
    ) {
        if batch.made.is_empty() {
            return;
        }
        batch.json.push(b']');
        let mut payload = std::mem::take(&mut batch.json);
        // It waits in the client's queue until written, and grew by
        // doubling: up to half of it would wait there unused (about 0.5 MB
        // at a boundary of 10,000 series).
        payload.shrink_to_fit();
        let qos = qos(self.settings.aggregate_qos);
        let sent = self
            .send(batch.topic.clone(), qos, false, payload, shutdown, stats)
            .await;
        self.report(sent, stats);
        for made in batch.made.drain(..) {
            stats.aggregate_delay.record(made);
        }
    }

    pub(super) async fn publish(
        &self,
        record: &Record,
        stats: &OutputStats,
        shutdown: &CancellationToken,
    ) {
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
                // An event with no state (`first_seen`) leaves the retained
                // state alone.
                if e.state == "seen" {
                    return self.report(event, stats);
                }
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
        self.report(result, stats);
    }

    fn report<E: std::fmt::Display>(&self, result: Result<(), E>, stats: &OutputStats) {
        if let Err(e) = result {
            // One line for the first failure; the count says the rest.
            if stats.publish_errors.fetch_add(1, Relaxed) == 0 {
                tracing::warn!(error = %e, "publish failed (further failures are counted in sluice_publish_errors_total)");
            }
        }
    }

    /// Disconnects once what was queued has gone out (bounded wait: a broker
    /// that is gone cannot take it).
    pub(super) async fn close(self) {
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
