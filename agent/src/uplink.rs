//! Store-and-forward: the writer that appends records to the outbox, and the
//! uplink that forwards them to the upstream broker.
//!
//! Both run on threads of their own, because SQLite calls block. The writer
//! takes records from the output task and appends them in batches (one
//! transaction per batch); when an append fails (a full disk, an I/O error)
//! it keeps the batch, counts the error, and retries with a growing delay,
//! so that appends pause while committed records stay safe and the workers
//! are held back through the bounded channel.
//!
//! The uplink publishes waiting records in `seq` order with QoS 1, at most
//! `max_inflight` unacknowledged at a time, each as its JSON record with
//! `seq` (and the record's `agent`) in it. A record leaves the outbox only
//! when its PUBACK arrives. When the connection fails, the uplink starts a
//! new one and sends again from the oldest unacknowledged record: delivery is
//! at least once, and `(agent, seq)` lets upstream drop duplicates.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::mpsc;

use crate::config::UplinkConfig;
use crate::outbox::{Outbox, with_seq};

/// What store-and-forward counts.
#[derive(Debug, Default)]
pub struct UplinkStats {
    /// Records appended to the outbox.
    pub appended: AtomicU64,
    /// Appends that failed (and were retried).
    pub append_errors: AtomicU64,
    /// Records published upstream (including resends).
    pub sent: AtomicU64,
    /// Records acknowledged upstream (and removed from the outbox).
    pub acked: AtomicU64,
    /// Upstream connections made.
    pub connects: AtomicU64,
    /// Records waiting in the outbox (at the last look).
    pub backlog: AtomicU64,
    /// Worker checkpoints committed.
    pub checkpoints: AtomicU64,
    /// Records dropped because the outbox was full.
    pub dropped: AtomicU64,
    /// Records merged into older ones because the outbox was full.
    pub downsampled: AtomicU64,
}

/// What the output task hands the writer, in the order the workers made it.
#[derive(Debug)]
pub enum ToStore {
    /// A record to forward upstream.
    Record {
        /// Upstream topic.
        topic: String,
        /// JSON body.
        payload: Vec<u8>,
        /// For an aggregate: its series and window end (see `checkpoint`).
        mark: Option<(String, i64)>,
    },
    /// A worker's checkpoint.
    Checkpoint {
        /// The worker.
        worker: usize,
        /// Its encoded state.
        state: Vec<u8>,
    },
}

/// Commits what arrives on `items` until it closes, then returns: records,
/// window marks and checkpoints, up to 512 items per transaction.
pub fn run_writer(
    mut outbox: Outbox,
    mut items: mpsc::Receiver<ToStore>,
    stats: Arc<UplinkStats>,
    wake: Option<std::thread::Thread>,
) {
    let (mut records, mut marks, mut checkpoints) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(first) = items.blocking_recv() {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(item) = next.take() {
            match item {
                ToStore::Record {
                    topic,
                    payload,
                    mark,
                } => {
                    records.push((topic, payload));
                    marks.extend(mark);
                }
                ToStore::Checkpoint { worker, state } => checkpoints.push((worker, state)),
            }
            taken += 1;
            if taken < 512 {
                next = items.try_recv().ok();
            }
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match outbox.commit(
                &records,
                &marks,
                &checkpoints,
                sluice_collectors::reading::now_ms(),
            ) {
                Ok(done) => {
                    stats.appended.fetch_add(done.seqs.len() as u64, Relaxed);
                    stats.dropped.fetch_add(done.dropped, Relaxed);
                    stats.downsampled.fetch_add(done.downsampled, Relaxed);
                    stats
                        .checkpoints
                        .fetch_add(checkpoints.len() as u64, Relaxed);
                    if let Some(wake) = &wake {
                        wake.unpark();
                    }
                    break;
                }
                Err(e) => {
                    if stats.append_errors.fetch_add(1, Relaxed) == 0
                        || delay >= Duration::from_secs(5)
                    {
                        tracing::error!(error = %e, records = records.len(), "outbox append failed; retrying (committed records are safe)");
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        records.clear();
        marks.clear();
        checkpoints.clear();
    }
}

/// Forwards the outbox upstream until `stop` is set.
pub fn run_uplink(
    mut outbox: Outbox,
    config: UplinkConfig,
    agent: String,
    stats: Arc<UplinkStats>,
    stop: Arc<AtomicBool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "uplink cannot start");
            return;
        }
    };
    let max_delay = Duration::from_millis(config.reconnect_max_ms.max(200));
    let mut delay = Duration::from_millis(200);
    let mut failures = 0u64;
    while !stop.load(Relaxed) {
        let connects = stats.connects.load(Relaxed);
        match runtime.block_on(session(&mut outbox, &config, &agent, &stats, &stop)) {
            Ok(()) => return,
            Err(e) => {
                if stats.connects.load(Relaxed) > connects {
                    // It had connected: start the backoff afresh.
                    delay = Duration::from_millis(200);
                    failures = 0;
                }
                failures += 1;
                // One warning per outage, not one per retry.
                if failures == 1 {
                    tracing::warn!(error = %e, "uplink unavailable; records wait in the outbox; retrying");
                } else {
                    tracing::debug!(error = %e, "uplink retry in {delay:?}");
                }
                std::thread::park_timeout(delay);
                delay = (delay * 2).min(max_delay);
            }
        }
    }
}

/// One connection: send, collect acknowledgements, until it fails or `stop`.
async fn session(
    outbox: &mut Outbox,
    config: &UplinkConfig,
    agent: &str,
    stats: &UplinkStats,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut settings = config.connection(agent);
    settings
        .resolve_password()
        .map_err(|e| format!("uplink.{e}"))?;
    let mut options = settings.options().map_err(|e| format!("uplink.{e}"))?;
    options.set_inflight(config.max_inflight);
    let (client, mut events) = AsyncClient::new(options, usize::from(config.max_inflight) * 2);
    // Wait for the connection before sending anything.
    loop {
        match events.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    stats.connects.fetch_add(1, Relaxed);
    tracing::info!(broker = %config.host, "uplink connected");
    // Sent in order, waiting for their packet id; then by packet id.
    let mut unassigned: VecDeque<i64> = VecDeque::new();
    let mut inflight: HashMap<u16, i64> = HashMap::new();
    let mut last_sent = 0i64;
    let mut acked = Vec::new();
    loop {
        if stop.load(Relaxed) {
            let _ = client.try_disconnect();
            return Ok(());
        }
        // Top up the in-flight window from the outbox.
        let room =
            usize::from(config.max_inflight).saturating_sub(unassigned.len() + inflight.len());
        if room > 0 {
            let records = outbox.peek(last_sent, room).map_err(|e| e.to_string())?;
            for r in records {
                client
                    .try_publish(
                        r.topic,
                        QoS::AtLeastOnce,
                        false,
                        with_seq(r.seq, &r.payload),
                    )
                    .map_err(|e| e.to_string())?;
                unassigned.push_back(r.seq);
                last_sent = r.seq;
                stats.sent.fetch_add(1, Relaxed);
            }
        }
        let idle = unassigned.is_empty() && inflight.is_empty();
        let event = tokio::time::timeout(
            Duration::from_millis(if idle { 100 } else { 1000 }),
            events.poll(),
        )
        .await;
        match event {
            Err(_) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                if let Some(seq) = unassigned.pop_front() {
                    inflight.insert(pkid, seq);
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(seq) = inflight.remove(&ack.pkid) {
                    acked.push(seq);
                }
            }
            Ok(Ok(_)) => {}
        }
        if !acked.is_empty() && (acked.len() >= 64 || inflight.is_empty()) {
            outbox.ack(&acked).map_err(|e| e.to_string())?;
            stats.acked.fetch_add(acked.len() as u64, Relaxed);
            acked.clear();
            if let Ok(s) = outbox.status() {
                stats.backlog.store(s.backlog, Relaxed);
            }
        }
    }
}
