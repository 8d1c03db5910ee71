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
//! at least once, and `(agent, epoch, seq)` lets upstream drop duplicates.
//! Acknowledged records are deleted in batches, one each time a window's
//! worth (`max_inflight`) of PUBACKs has come or none is awaited, so a crash
//! sends again fewer than two windows: those in flight, and those
//! acknowledged and not yet deleted.
//!
//! # One record never blocks the lane
//!
//! A record that no broker can take is set aside (moved to the outbox's
//! dead letters, counted, logged) instead of being sent, and the lane goes
//! on: one whose checksum does not match (damaged on disk), whose topic is
//! invalid ([`crate::output::topic::problem`]: a wildcard, a control character, as
//! records written by earlier releases may hold), or that is larger than the
//! client's packet limit. A record the broker itself refuses shows only as a
//! closed connection (MQTT 3.1.1 has no per-message refusal): when
//! [`STRIKES`] sessions in a row fail within [`STEADY`] of their CONNACK
//! with records in flight, the next session sends the records that were in
//! flight at the last failure one at a time, each acknowledged before the
//! next; the one in flight, alone, when the broker closes that session too
//! is set aside, and the session after goes back to the whole window. A
//! broker that drops every connection whatever it is sent could make an
//! innocent record a dead letter this way; it stays in the file, and
//! `sluice outbox retry` queues it again.
//!
//! # A full disk
//!
//! Deleting an acknowledged record writes to the WAL, which a full disk
//! refuses. Such a failure never ends the session: the seqs are kept in
//! memory (`Undeleted`), never sent again, protected from drop-oldest and
//! downsampling, and deleted as soon as a retry (every second, and with each
//! batch of acknowledgements) goes through. So the backlog keeps draining
//! upstream while the disk stays full. Past [`MAX_UNDELETED`] of them the
//! uplink stops sending new records until the deletes go through, which
//! bounds the memory.
//!
//! The reconnect backoff starts afresh only after a session that made
//! progress (a PUBACK, or [`STEADY`] connected): a broker that accepts the
//! connection and drops it at once is retried with a growing delay, not five
//! times a second.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::mpsc;

use crate::config::UplinkConfig;

#[cfg(feature = "kafka")]
#[path = "uplink_kafka.rs"]
mod kafka;
#[cfg(feature = "kafka")]
pub use kafka::nodelay_everywhere;
#[cfg(feature = "nats")]
#[path = "uplink_nats.rs"]
mod nats;
use crate::store::outbox::{Claimed, Outbox, Queued, with_identity};

/// How often the live lane looks for new records when it has none.
const LIVE_LOOK: Duration = Duration::from_millis(20);

/// Sessions in a row that end with the same record oldest and nothing
/// acknowledged, before that record is sent alone to find out whether it is
/// the cause (see the module docs).
pub const STRIKES: u32 = 3;

/// A session connected this long counts as progress for the backoff.
pub const STEADY: Duration = Duration::from_secs(10);

/// Most acknowledged records held in memory while the disk cannot take
/// their deletion (about 40 bytes each) before sending pauses.
pub const MAX_UNDELETED: usize = 200_000;

/// Acknowledged records whose deletion the disk refused (see the module
/// docs), and when it was last tried.
#[derive(Debug)]
struct Undeleted {
    seqs: std::collections::BTreeSet<i64>,
    tried: Instant,
}

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
    /// Records the upstream log acknowledged as duplicates (NATS
    /// JetStream's duplicate window caught a resend).
    pub duplicates: AtomicU64,
    /// Records sent and still waiting for their acknowledgement when their
    /// session ended (a failure, or the agent stopping): the next session
    /// or run sends them again, so a log that cannot drop resends may hold
    /// them twice.
    pub unconfirmed: AtomicU64,
    /// Records waiting in the outbox (after the last commit or ack).
    pub backlog: AtomicU64,
    /// Worker checkpoints committed.
    pub checkpoints: AtomicU64,
    /// Records dropped because the outbox was full.
    pub dropped: AtomicU64,
    /// Records merged into older ones because the outbox was full.
    pub downsampled: AtomicU64,
    /// Records set aside as dead letters by this process.
    pub dead_lettered: AtomicU64,
    /// Records waiting in the dead letters (after the last change).
    pub dead_letters: AtomicU64,
    /// Deletes of acknowledged records that failed (a full disk) and were
    /// retried.
    pub ack_errors: AtomicU64,
    /// Since when (ms since the epoch) the writer has been in one SQLite
    /// call; 0 when it is not in one. The watchdog reads it.
    pub writer_busy_since: std::sync::atomic::AtomicI64,
    /// The same for the uplink's SQLite calls.
    pub uplink_busy_since: std::sync::atomic::AtomicI64,
}

/// Marks `since` busy from now until the guard drops (see
/// [`UplinkStats::writer_busy_since`]).
fn busy(since: &std::sync::atomic::AtomicI64) -> impl Drop + '_ {
    struct Busy<'a>(&'a std::sync::atomic::AtomicI64);
    impl Drop for Busy<'_> {
        fn drop(&mut self) {
            self.0.store(0, Relaxed);
        }
    }
    since.store(sluice_collectors::reading::now_ms().max(1), Relaxed);
    Busy(since)
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
    /// That an aggregate of `series` up to `end` was emitted, when the
    /// store holds checkpoints only (no outbox): the window mark that keeps
    /// a restored checkpoint from emitting the window again.
    Mark {
        /// The series.
        series: String,
        /// Its window's end.
        end: i64,
    },
    /// A worker's checkpoint.
    Checkpoint {
        /// The worker.
        worker: usize,
        /// Its encoded state.
        state: Vec<u8>,
    },
}

/// Commits what arrives on `items` until it closes, then returns the
/// outbox: records, window marks and checkpoints, up to 512 items per
/// transaction.
pub fn run_writer(
    mut outbox: Outbox,
    mut items: mpsc::Receiver<ToStore>,
    stats: Arc<UplinkStats>,
    wake: Option<std::thread::Thread>,
) -> Outbox {
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
                ToStore::Mark { series, end } => marks.push((series, end)),
                ToStore::Checkpoint { worker, state } => checkpoints.push((worker, state)),
            }
            taken += 1;
            if taken < 512 {
                next = items.try_recv().ok();
            }
        }
        let mut delay = Duration::from_millis(50);
        loop {
            let in_call = busy(&stats.writer_busy_since);
            let committed = outbox.commit(
                &records,
                &marks,
                &checkpoints,
                sluice_collectors::reading::now_ms(),
            );
            drop(in_call);
            match committed {
                Ok(done) => {
                    stats.appended.fetch_add(done.seqs.len() as u64, Relaxed);
                    stats.dropped.fetch_add(done.dropped, Relaxed);
                    stats.downsampled.fetch_add(done.downsampled, Relaxed);
                    if let Ok(backlog) = outbox.backlog() {
                        stats.backlog.store(backlog, Relaxed);
                    }
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
    outbox
}

/// Forwards the outbox upstream until `stop` is set.
pub fn run_uplink(
    mut outbox: Outbox,
    config: UplinkConfig,
    agent: String,
    stats: Arc<UplinkStats>,
    stop: Arc<AtomicBool>,
    claimed: Claimed,
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
    if let Ok(s) = outbox.status() {
        stats.dead_letters.store(s.dead_letters, Relaxed);
    }
    // Sessions in a row that connected and failed soon after with records
    // outstanding, and the seqs outstanding at the last such failure.
    let (mut strikes, mut outstanding) = (0u32, None);
    let mut undeleted = Undeleted {
        seqs: Default::default(),
        tried: Instant::now(),
    };
    while !stop.load(Relaxed) {
        let isolate = outstanding.filter(|_| strikes >= STRIKES);
        let mut report = SessionReport::default();
        // One session of the kind's own (the same arguments either way).
        macro_rules! session_of {
            ($session:path) => {
                runtime.block_on($session(
                    &mut outbox,
                    &config,
                    &agent,
                    &stats,
                    &stop,
                    &claimed,
                    isolate,
                    &mut report,
                    &mut undeleted,
                ))
            };
        }
        let result = match config.kind {
            crate::config::UplinkKind::Mqtt => session_of!(session),
            #[cfg(feature = "nats")]
            crate::config::UplinkKind::Nats => session_of!(nats::session),
            // Refused by the configuration's validation.
            #[cfg(not(feature = "nats"))]
            crate::config::UplinkKind::Nats => {
                tracing::error!("uplink kind \"nats\" needs a build with the `nats` feature");
                return;
            }
            #[cfg(feature = "kafka")]
            crate::config::UplinkKind::Kafka => session_of!(kafka::session),
            #[cfg(not(feature = "kafka"))]
            crate::config::UplinkKind::Kafka => {
                tracing::error!("uplink kind \"kafka\" needs a build with the `kafka` feature");
                return;
            }
        };
        stats
            .unconfirmed
            .fetch_add(report.unconfirmed as u64, Relaxed);
        // Whatever was read and not acknowledged is read again next time;
        // what was acknowledged and not deleted stays claimed.
        if let Ok(mut c) = claimed.lock() {
            c.clear();
            c.extend(undeleted.seqs.iter());
        }
        match result {
            Ok(()) => return,
            Err(e) => {
                let steady = report.connected_at.is_some_and(|t| t.elapsed() >= STEADY);
                if report.acked > 0 || steady {
                    // It made progress: start the backoff afresh.
                    delay = Duration::from_millis(200);
                    failures = 0;
                }
                // Was it a record? See the module docs.
                match (report.connected_at, report.outstanding) {
                    (Some(_), Some((lo, hi))) if !steady => {
                        if let Some(alone) = report.alone.filter(|_| isolate.is_some()) {
                            let why = format!(
                                "the broker closed the connection each time it was sent ({} sessions in a row, the last with it alone in flight)",
                                strikes + 1
                            );
                            set_aside(&mut outbox, &stats, &claimed, alone, &why);
                            delay = Duration::from_millis(200);
                            (strikes, outstanding) = (0, None);
                        } else {
                            strikes += 1;
                            outstanding = Some((lo, hi));
                        }
                    }
                    (Some(_), _) => (strikes, outstanding) = (0, None),
                    (None, _) => {}
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

/// What a session saw, for the backoff and the search for a record the
/// broker refuses.
#[derive(Debug, Default)]
struct SessionReport {
    /// When the CONNACK came.
    connected_at: Option<Instant>,
    /// PUBACKs received.
    acked: u64,
    /// The oldest and newest records sent and not acknowledged when the
    /// session ended.
    outstanding: Option<(i64, i64)>,
    /// The record in flight alone when an isolating session ended, if it
    /// had not yet passed the range it isolates.
    alone: Option<i64>,
    /// Records sent and not acknowledged when the session ended.
    unconfirmed: usize,
}

impl SessionReport {
    /// Notes the records still waiting for their acknowledgement as a
    /// session ends (`isolating`: while it sent one at a time), whatever
    /// the kind.
    fn unacknowledged(&mut self, seqs: impl Iterator<Item = i64>, isolating: bool) {
        let (mut lo, mut hi, mut n) = (i64::MAX, i64::MIN, 0);
        for seq in seqs {
            (lo, hi, n) = (lo.min(seq), hi.max(seq), n + 1);
        }
        self.outstanding = (n > 0).then_some((lo, hi));
        self.unconfirmed = n;
        if isolating && n == 1 {
            self.alone = Some(lo);
        }
    }
}

/// Sets the waiting record `seq` aside as a dead letter (see the module
/// docs), counting and logging it.
fn set_aside(outbox: &mut Outbox, stats: &UplinkStats, claimed: &Claimed, seq: i64, why: &str) {
    let _in_call = busy(&stats.uplink_busy_since);
    match outbox.set_aside(seq, why, sluice_collectors::reading::now_ms()) {
        Ok(true) => {
            stats.dead_lettered.fetch_add(1, Relaxed);
            stats.dead_letters.fetch_add(1, Relaxed);
            tracing::warn!(
                seq,
                reason = why,
                "uplink: record set aside as a dead letter; the records behind it go on (see `sluice outbox dead-letters`)"
            );
        }
        Ok(false) => {}
        Err(e) => tracing::error!(seq, error = %e, "uplink: cannot set a record aside"),
    }
    if let Ok(mut c) = claimed.lock() {
        c.remove(&seq);
    }
}

/// Why no broker can take `record` as it is (its packet, `packet` bytes of
/// payload, included), or `None`.
fn unsendable(record: &Queued, packet: &[u8]) -> Option<String> {
    if !record.intact {
        return Some("checksum mismatch: the record was damaged on disk".into());
    }
    if let Some(problem) = crate::output::topic::problem(&record.topic) {
        return Some(format!("invalid topic: {problem}"));
    }
    let size = sluice_collectors::mqtt::publish_size(record.topic.len(), packet.len());
    let max = sluice_collectors::mqtt::MAX_OUTGOING_PACKET;
    (size > max).then(|| format!("a {size}-byte packet, over the uplink's limit of {max} bytes"))
}

/// What every session does once connected, whatever the kind: counts the
/// connection, notes when it came (for the backoff and isolation), reads
/// the backlog, logs, and returns the first seq that is live (records from
/// it on were committed after this connection).
fn connected(
    outbox: &mut Outbox,
    config: &UplinkConfig,
    stats: &UplinkStats,
    report: &mut SessionReport,
    isolate: Option<(i64, i64)>,
) -> Result<i64, String> {
    stats.connects.fetch_add(1, Relaxed);
    report.connected_at = Some(Instant::now());
    let status = outbox.status().map_err(|e| e.to_string())?;
    stats.backlog.store(status.backlog, Relaxed);
    let live_from = status.next_seq;
    let kind = config.kind;
    match isolate {
        Some((lo, hi)) => tracing::warn!(
            upstream = %config.host,
            ?kind,
            backlog_below_seq = live_from,
            "uplink connected; the last {STRIKES} sessions failed soon after connecting: sending seqs {lo}..={hi} one at a time to find a record upstream refuses"
        ),
        None => tracing::info!(
            upstream = %config.host,
            ?kind,
            backlog_below_seq = live_from,
            "uplink connected"
        ),
    }
    Ok(live_from)
}

/// One connection: send, collect acknowledgements, until it fails or `stop`.
/// With `isolate = Some((lo, hi))`, records up to `hi` go one at a time,
/// each acknowledged before the next is sent (see the module docs).
///
/// Two lanes share the in-flight window: the *backlog* (records committed
/// before this connection, oldest first) and *live* records (committed
/// since, also in `seq` order), which may use up to half the window while a
/// backlog drains, so that fresh data is not held back behind an outage's
/// worth of old data. With no backlog, everything goes through the live lane.
#[allow(clippy::too_many_arguments)]
async fn session(
    outbox: &mut Outbox,
    config: &UplinkConfig,
    agent: &str,
    stats: &UplinkStats,
    stop: &AtomicBool,
    claimed: &Claimed,
    isolate: Option<(i64, i64)>,
    report: &mut SessionReport,
    undeleted: &mut Undeleted,
) -> Result<(), String> {
    let mut settings = config.connection(agent);
    settings
        .resolve_password()
        .map_err(|e| format!("uplink.{e}"))?;
    let mut options = settings.options().map_err(|e| format!("uplink.{e}"))?;
    options.set_inflight(config.max_inflight);
    let (client, mut events) = AsyncClient::new(options, usize::from(config.max_inflight) * 2);
    events.set_network_options(sluice_collectors::mqtt::network_options());
    // Wait for the connection before sending anything.
    loop {
        match events.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    let live_from = connected(outbox, config, stats, report, isolate)?;
    let full_window = usize::from(config.max_inflight);
    // Isolating: one record at a time until one past the range is sent.
    let mut isolating = isolate.map(|(_, hi)| hi);
    let mut window = if isolating.is_some() { 1 } else { full_window };
    let mut lanes = Lanes::new(live_from, full_window);
    let mut inflight = InFlight::default();
    let mut acked = Vec::new();
    let mut last_gauge = Instant::now();
    let result = loop {
        if stop.load(Relaxed) {
            let _ = client.try_disconnect();
            break Ok(());
        }
        if !undeleted.seqs.is_empty() && undeleted.tried.elapsed() >= Duration::from_secs(1) {
            record_acks(outbox, stats, claimed, &mut acked, undeleted);
        }
        // The dead letters change beside the agent too (`sluice outbox
        // retry|purge`): the gauge follows within a second.
        if last_gauge.elapsed() >= Duration::from_secs(1) {
            last_gauge = Instant::now();
            if let Ok(n) = outbox.dead_letter_count() {
                stats.dead_letters.store(n, Relaxed);
            }
        }
        // Top up the in-flight window as each PUBACK frees a slot: a steady
        // stream of publishes also carries the TCP ACKs for the broker's
        // PUBACKs, which would otherwise wait out a delayed ACK when the
        // broker leaves Nagle on, as Mosquitto does by default.
        let mut room = window.saturating_sub(inflight.len());
        if undeleted.seqs.len() >= MAX_UNDELETED {
            room = 0;
        }
        while room > 0 {
            let Some(r) = lanes.next(outbox, stats, claimed, undeleted, window)? else {
                break;
            };
            if isolating.is_some_and(|hi| r.seq > hi) {
                // Past the range: back to the whole window.
                (isolating, window) = (None, full_window);
                room = window.saturating_sub(inflight.len());
            }
            let packet = with_identity(r.epoch, r.id_seq, &r.payload);
            if let Some(why) = unsendable(&r, &packet) {
                lanes.finished(r.seq);
                set_aside(outbox, stats, claimed, r.seq, &why);
                continue;
            }
            client
                .try_publish(r.topic, QoS::AtLeastOnce, false, packet)
                .map_err(|e| e.to_string())?;
            inflight.unassigned.push_back(r.seq);
            stats.sent.fetch_add(1, Relaxed);
            room -= 1;
        }
        let idle = inflight.len() == 0;
        let event = tokio::time::timeout(
            if idle {
                LIVE_LOOK
            } else {
                Duration::from_secs(1)
            },
            events.poll(),
        )
        .await;
        match event {
            Err(_) => {}
            Ok(Err(e)) => break Err(e.to_string()),
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                if let Some(seq) = inflight.unassigned.pop_front() {
                    inflight.by_pkid.insert(pkid, seq);
                }
                crate::ops::crash::point("send.after_publish");
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(seq) = inflight.by_pkid.remove(&ack.pkid) {
                    lanes.finished(seq);
                    acked.push(seq);
                    report.acked += 1;
                }
            }
            Ok(Ok(_)) => {}
        }
        if deletes_due(&acked, full_window, inflight.by_pkid.is_empty()) {
            record_acks(outbox, stats, claimed, &mut acked, undeleted);
        }
    };
    report.unacknowledged(inflight.seqs(), isolating.is_some());
    // Acknowledgements that came before a stop or a failure are kept, so
    // that those records are not sent again.
    if !acked.is_empty() {
        record_acks(outbox, stats, claimed, &mut acked, undeleted);
    }
    result
}

/// The records sent and not acknowledged: in order while they wait for
/// their packet id, then by packet id.
#[derive(Default)]
struct InFlight {
    unassigned: VecDeque<i64>,
    by_pkid: HashMap<u16, i64>,
}

impl InFlight {
    fn len(&self) -> usize {
        self.unassigned.len() + self.by_pkid.len()
    }

    fn seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.unassigned.iter().chain(self.by_pkid.values()).copied()
    }
}

/// The two lanes that share the in-flight window (see [`session`]): the
/// backlog (seqs below `live_from`, committed before this session) and the
/// live lane (from `live_from` on). Each holds records read ahead and not
/// yet sent, and the newest seq read (one query a window, not one per
/// PUBACK).
struct Lanes {
    live_from: i64,
    full_window: usize,
    backlog: VecDeque<Queued>,
    backlog_read: i64,
    backlog_done: bool,
    live: VecDeque<Queued>,
    live_read: i64,
    /// Live records sent and not yet acknowledged or set aside.
    live_in_flight: usize,
    last_live_look: Instant,
}

impl Lanes {
    fn new(live_from: i64, full_window: usize) -> Lanes {
        Lanes {
            live_from,
            full_window,
            backlog: VecDeque::new(),
            backlog_read: 0,
            backlog_done: false,
            live: VecDeque::new(),
            live_read: live_from - 1,
            live_in_flight: 0,
            last_live_look: Instant::now() - LIVE_LOOK,
        }
    }

    /// The next record to send: live records while the backlog is done or
    /// while they hold less than half of `window`, else the backlog's
    /// oldest. Records acknowledged and waiting to be deleted
    /// (`undeleted`) are skipped.
    fn next(
        &mut self,
        outbox: &mut Outbox,
        stats: &UplinkStats,
        claimed: &Claimed,
        undeleted: &Undeleted,
        window: usize,
    ) -> Result<Option<Queued>, String> {
        loop {
            if self.backlog_done || self.live_in_flight < window / 2 {
                if self.live.is_empty() && self.last_live_look.elapsed() >= LIVE_LOOK {
                    let _in_call = busy(&stats.uplink_busy_since);
                    let read = outbox
                        .peek_claim(self.live_read, i64::MAX, self.full_window, claimed)
                        .map_err(|e| e.to_string())?;
                    self.last_live_look = Instant::now();
                    if let Some(r) = read.last() {
                        self.live_read = r.seq;
                    }
                    self.live.extend(
                        read.into_iter()
                            .filter(|r| !undeleted.seqs.contains(&r.seq)),
                    );
                }
                if let Some(r) = self.live.pop_front() {
                    self.live_in_flight += 1;
                    return Ok(Some(r));
                }
            }
            if self.backlog_done {
                return Ok(None);
            }
            if self.backlog.is_empty() {
                let _in_call = busy(&stats.uplink_busy_since);
                let read = outbox
                    .peek_claim(self.backlog_read, self.live_from, self.full_window, claimed)
                    .map_err(|e| e.to_string())?;
                match read.last() {
                    Some(r) => self.backlog_read = r.seq,
                    None => {
                        self.backlog_done = true;
                        continue;
                    }
                }
                // Acknowledged already, and waiting to be deleted.
                self.backlog.extend(
                    read.into_iter()
                        .filter(|r| !undeleted.seqs.contains(&r.seq)),
                );
                if self.backlog.is_empty() {
                    continue;
                }
            }
            return Ok(self.backlog.pop_front());
        }
    }

    /// Record `seq` left the window (acknowledged, or set aside).
    fn finished(&mut self, seq: i64) {
        if seq >= self.live_from {
            self.live_in_flight -= 1;
        }
    }
}

/// Whether the acknowledged records (`acked`) are to be deleted now: once a
/// window's worth has come, or none is awaited. So a crash leaves fewer than
/// a window acknowledged and not deleted (each sent again after the
/// restart), however slowly the acknowledgements trickle in; every kind of
/// uplink decides by this.
fn deletes_due(acked: &[i64], full_window: usize, none_awaited: bool) -> bool {
    !acked.is_empty() && (acked.len() >= full_window || none_awaited)
}

/// Deletes the acknowledged records `acked` (and any that a full disk kept
/// from being deleted before) from the outbox, and clears `acked`. What the
/// disk refuses to delete is kept in `undeleted` (see the module docs).
fn record_acks(
    outbox: &mut Outbox,
    stats: &UplinkStats,
    claimed: &Claimed,
    acked: &mut Vec<i64>,
    undeleted: &mut Undeleted,
) {
    let _in_call = busy(&stats.uplink_busy_since);
    stats.acked.fetch_add(acked.len() as u64, Relaxed);
    undeleted.seqs.extend(acked.drain(..));
    undeleted.tried = Instant::now();
    let all: Vec<i64> = undeleted.seqs.iter().copied().collect();
    crate::ops::crash::point("ack.before_delete");
    let deleted = outbox.ack(&all);
    if deleted.is_ok() {
        crate::ops::crash::point("ack.after_delete");
    }
    match deleted {
        Ok(()) => {
            if let Ok(mut c) = claimed.lock() {
                for seq in &all {
                    c.remove(seq);
                }
            }
            if stats.ack_errors.load(Relaxed) > 0 && all.len() > 64 {
                tracing::info!(
                    records = all.len(),
                    "outbox: acknowledged records deleted; the disk has room again"
                );
            }
            undeleted.seqs.clear();
        }
        Err(e) => {
            if stats.ack_errors.fetch_add(1, Relaxed) == 0 || all.len() == MAX_UNDELETED {
                tracing::warn!(
                    error = %e,
                    held = all.len(),
                    "outbox: acknowledged records cannot be deleted (disk full?); their seqs are held in memory, they are not sent again, and the delete is retried every second"
                );
            }
            if let Ok(mut c) = claimed.lock() {
                c.extend(all.iter());
            }
        }
    }
    if let Ok(backlog) = outbox.backlog() {
        stats
            .backlog
            .store(backlog.saturating_sub(undeleted.seqs.len() as u64), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_notes_what_it_left_unacknowledged_whatever_the_kind() {
        let mut report = SessionReport::default();
        report.unacknowledged([7, 3, 9].into_iter(), false);
        assert_eq!(
            (report.outstanding, report.unconfirmed, report.alone),
            (Some((3, 9)), 3, None)
        );
        // One record alone while isolating: that is the record.
        report.unacknowledged([5].into_iter(), true);
        assert_eq!(
            (report.outstanding, report.unconfirmed, report.alone),
            (Some((5, 5)), 1, Some(5))
        );
        let mut report = SessionReport::default();
        report.unacknowledged(std::iter::empty(), true);
        assert_eq!(
            (report.outstanding, report.unconfirmed, report.alone),
            (None, 0, None)
        );
        report.unacknowledged([1, 2].into_iter(), true);
        assert_eq!(report.alone, None, "two in flight: neither is known");
    }
}
