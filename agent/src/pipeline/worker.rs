//! Worker threads: each owns the series sharded to it, alone, and runs their
//! windows and detectors from `sluice-core`.
//!
//! A worker polls its rings (one per source) round-robin, in batches. When
//! they are all empty it sleeps for [`NAP`] if its last pass took more than
//! one reading (more are likely on their way), and otherwise parks; a
//! source unparks it after pushing, so an idle agent costs no CPU. Every
//! 100 ms, and whenever it parks, it *ticks*: each series that has been
//! silent has its event time moved forward by the wall time elapsed since
//! its last reading, less [`IDLE_GRACE`], so its open
//! windows close even if no further reading comes (without trusting the
//! sender's clock to agree with ours). Series state lives in a table capped
//! at `max_series`. A series not seen for `series_idle_ms` is evicted (its
//! open windows emitted as partial, counted); when the table is full, a new
//! series takes the place of the least recently seen one idle for
//! [`EVICTABLE_AFTER`], and only with none is it counted and dropped. So a
//! flood of new ids can fill the table, but never evict a sensor that keeps
//! reporting, and never lock new sensors out for longer than that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sluice_collectors::reading::{Labels, now_ms};
use sluice_collectors::{Reading, ReadingConsumer, SeriesKey};
use sluice_core::Timestamp;
use sluice_core::aggregate::Aggregate;
use sluice_core::anomaly::{AlertState, Transition};
use sluice_core::window::{Closed, DecayingStats, Rejection};
use tokio::sync::mpsc;

use crate::output::{
    AggregateRecord, AlertEvent, DecayingSummary, DistinctRecord, FrequencyRecord, FrequencyValue,
    GroupRecord, LabelRecord, Record, RecordExtras, TopRecord, TopValue, base64_of, sketch_base64,
};
use crate::pipeline::checkpoint::{
    self, DetectorsRef, JoinState, PatternState, SeriesRef, SeriesState, WindowsRef, WindowsState,
};
use crate::pipeline::rules::derived::MAX_INSTANCES;
use crate::pipeline::rules::labels::{FirstSeen, LabelPanes, LabelSpec, LabelWindow, LabelsState};
use crate::pipeline::rules::{
    Derived, Detector, Feed, GROUP_ALL, Join, JoinOp, Pattern, Quantiles, Row, Rules, Window,
};
use sluice_core::join::{JoinStats, Pair, Side};
use sluice_core::pattern::{Change as PatternChange, Sequence, SequenceStats, Step};

/// How often idle series are ticked.
const TICK: Duration = Duration::from_millis(100);
/// How much longer than its previous reading a series' next reading may
/// take in transit without its window closing first, ms. A quiet series'
/// windows close on the agent's clock: its event time is extrapolated by
/// the wall time since its last reading. Without this grace, a reading
/// delayed a few ms more than the one before it, and stamped just before a
/// window's end, found its window already closed and was refused as late:
/// in order, yet lost (3 to 9 in 600,000 at 10,000 sensors reporting every
/// 500 ms on loopback, more with a real network's jitter). It delays only
/// the windows that close for want of readings.
pub const IDLE_GRACE: Timestamp = 100;
/// How long a worker whose last pass took more than one reading sleeps when
/// it finds its rings empty, before it looks again and, finding nothing,
/// parks. Under load a source hands over what each read of its connection
/// brought, tens of microseconds apart, and parking after each cost a futex
/// wait and a wake-up syscall per hand-off (benches/README.md, *Fewer
/// wake-ups*); napping gathers them, at the price of up to this much added
/// latency while busy (the sleeping stage of a backoff idle strategy). An
/// idle worker parks as before.
const NAP: Duration = Duration::from_micros(200);
/// Readings taken from one ring before looking at the next.
const BATCH: usize = 512;
/// A series idle this long (ms) may give its place in a full table to a
/// new one (or sooner, with a shorter `series_idle_ms`).
pub const EVICTABLE_AFTER: Timestamp = 60_000;

/// What a worker counts.
#[derive(Debug)]
pub struct WorkerStats {
    /// Readings processed.
    pub readings: AtomicU64,
    /// Readings refused as late by their window.
    pub late: AtomicU64,
    /// Readings of series that no rule matches.
    pub unmatched: AtomicU64,
    /// Readings refused because their series has no row in its rule's
    /// table (`on_missing = "refuse"`).
    pub table_unmatched: AtomicU64,
    /// Readings dropped because the series table was full (and no series
    /// in it was idle enough to make room).
    pub series_overflow: AtomicU64,
    /// Series evicted: idle for `series_idle_ms`, or the least recently
    /// seen idle one when the table was full.
    pub evicted: AtomicU64,
    /// Series with state now.
    pub series: AtomicU64,
    /// Records dropped because the output task was gone.
    pub output_closed: AtomicU64,
    /// Readings waiting in this worker's rings (at the last tick).
    pub ring_depth: AtomicU64,
    /// Times the worker found its rings empty and parked until a source
    /// woke it (or the next tick).
    pub parks: AtomicU64,
    /// Passes of the worker's loop (at least ten a second while it runs): the
    /// systemd watchdog is pinged only while it moves.
    pub heartbeat: AtomicU64,
    /// Whether the worker is waiting for room in the output channel.
    pub waiting_on_output: AtomicBool,
    /// New label values past a `first_seen` filter's `capacity`: counted,
    /// not alerted (past it the filter misses new values ever more often,
    /// and a flood of new ids would be a flood of alerts).
    pub first_seen_over_capacity: AtomicU64,
    /// Series restored from a checkpoint.
    pub restored: AtomicU64,
    /// Series in a checkpoint not restored (no rule matches them now, or
    /// the series table is full).
    pub restore_dropped: AtomicU64,
    /// Pairs the derived series' joins made.
    pub join_pairs: AtomicU64,
    /// Join windows (or readings of A, for an interval join) whose side A
    /// had no partner on side B.
    pub join_missing_b: AtomicU64,
    /// Join windows whose side B had no partner on side A.
    pub join_missing_a: AtomicU64,
    /// Readings too late for their join window (or older than B's latest).
    pub join_late: AtomicU64,
    /// Pairs whose `expr` has no value (a ratio to 0, beyond ±1e100, or
    /// the first pair of a `rate`).
    pub join_undefined: AtomicU64,
    /// Readings of a derived series' or a pattern's input dropped for a
    /// new value of its `group_by` label past the most it keeps.
    pub groups_overflow: AtomicU64,
    /// Times a pattern was raised.
    pub pattern_raised: AtomicU64,
    /// Events of a pattern's `first` that expired without `then`, or that
    /// `then` answered in time (`absent = true`).
    pub pattern_settled: AtomicU64,
    /// Processing latency, ms: from a reading's ingest to the record it
    /// caused (a closed window or an alert) being handed to the outputs.
    pub latency_ms: Mutex<Histogram<u64>>,
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self {
            readings: AtomicU64::new(0),
            late: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            table_unmatched: AtomicU64::new(0),
            series_overflow: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            series: AtomicU64::new(0),
            output_closed: AtomicU64::new(0),
            ring_depth: AtomicU64::new(0),
            parks: AtomicU64::new(0),
            heartbeat: AtomicU64::new(0),
            waiting_on_output: AtomicBool::new(false),
            first_seen_over_capacity: AtomicU64::new(0),
            restored: AtomicU64::new(0),
            restore_dropped: AtomicU64::new(0),
            join_pairs: AtomicU64::new(0),
            join_missing_b: AtomicU64::new(0),
            join_missing_a: AtomicU64::new(0),
            join_late: AtomicU64::new(0),
            join_undefined: AtomicU64::new(0),
            groups_overflow: AtomicU64::new(0),
            pattern_raised: AtomicU64::new(0),
            pattern_settled: AtomicU64::new(0),
            // 1 ms to 1 hour, 3 significant digits: about 40 KiB.
            latency_ms: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds"),
            ),
        }
    }
}

struct Series {
    /// The rule the state was built from.
    rule: usize,
    windows: Option<Windows>,
    detectors: Vec<Detector>,
    /// Largest event time seen, and the wall time it was seen at.
    last_event: Timestamp,
    last_seen: Timestamp,
    /// An `absent` alert is raised (see `absent_after_ms`). Not saved in
    /// checkpoints: after a restart a series still silent is reported
    /// absent again once `absent_after_ms` has passed since the start.
    absent: bool,
    /// The `first_seen` filter, when the rule asks for one (boxed: its
    /// size comes from the rule).
    first_seen: Option<Box<FirstSeen>>,
    /// Its row in its rule's table, and its calibration (boxed: most
    /// rules join no table).
    joined: Option<Box<Joined>>,
}

/// A series joined to its rule's table.
#[derive(Clone, Debug, PartialEq)]
struct Joined {
    row: Option<Row>,
    calibration: Option<(f64, f64)>,
    /// With `join_label`: the label's value it was joined by (`None`: the
    /// reading had no such label).
    by: Option<Box<str>>,
}

impl Joined {
    /// How `series` of rule `rule` joins (by `label`, the value of its
    /// `join_label`, if it has one), or `Err` if its readings are refused
    /// (`on_missing = "refuse"`).
    fn of(
        rules: &Rules,
        rule: usize,
        series: &str,
        label: Option<&str>,
    ) -> Result<Option<Box<Joined>>, ()> {
        let join = rules.join(rule, series, label);
        match join {
            Join::NoTable => Ok(None),
            Join::Refused => Err(()),
            Join::Row(_) | Join::Missing => Ok(Some(Box::new(Joined {
                calibration: rules.calibration(rule, join.row()),
                row: join.row().cloned(),
                by: rules.join_label(rule).and(label).map(Box::from),
            }))),
        }
    }

    /// The value of rule `rule`'s `join_label` in `reading`, if it joins by one.
    fn label_of<'a>(rules: &Rules, rule: usize, reading: &'a Reading) -> Option<&'a str> {
        let label = rules.join_label(rule)?;
        reading.labels.as_deref()?.get(label)
    }

    fn by(joined: &Option<Box<Joined>>) -> Option<&str> {
        joined.as_deref().and_then(|j| j.by.as_deref())
    }

    fn row(joined: &Option<Box<Joined>>) -> Option<&Row> {
        joined.as_deref().and_then(|j| j.row.as_ref())
    }
}

/// A series' aggregate window and, when its rule asks for quantiles, the
/// quantile window that sees the same readings and so closes in step.
struct Windows {
    aggregate: Window,
    /// Boxed: most rules ask for no quantiles, and an empty box costs 8
    /// bytes where the window would cost ~100 in every series.
    quantiles: Option<Box<Window<Quantiles>>>,
    /// Readings refused as late since the last closed window.
    late: u64,
    /// Largest sampling weight since the last closed window.
    sampled_one_in: u32,
    /// End of the newest window emitted (for checkpoints).
    emitted_end: Option<Timestamp>,
    /// The label sketches of the open windows, when the rule asks for any
    /// (a tumbling window: they close with it).
    labels: Option<Box<(LabelSpec, LabelPanes)>>,
}

/// A closed window on its way to becoming a record.
struct Done {
    closed: Closed<Aggregate>,
    /// For a decaying window, its statistics when the report closed.
    decaying: Option<DecayingStats>,
    quantiles: Option<Quantiles>,
    /// Its label sketches.
    labels: Option<LabelWindow>,
    late: u64,
    sampled_one_in: u32,
}

impl Windows {
    fn new(
        aggregate: Window,
        quantiles: Option<Window<Quantiles>>,
        labels: Option<&LabelSpec>,
    ) -> Windows {
        Windows {
            aggregate,
            quantiles: quantiles.map(Box::new),
            late: 0,
            sampled_one_in: 1,
            emitted_end: None,
            labels: labels.map(|spec| Box::new((spec.clone(), LabelPanes::default()))),
        }
    }

    fn save(&self) -> WindowsRef<'_> {
        WindowsRef {
            aggregate: &self.aggregate,
            quantiles: self.quantiles.as_deref(),
            late: self.late,
            sampled_one_in: self.sampled_one_in,
            emitted_end: self.emitted_end,
        }
    }

    fn restored(s: WindowsState) -> Windows {
        Windows {
            aggregate: s.aggregate,
            quantiles: s.quantiles.map(Box::new),
            late: s.late,
            sampled_one_in: s.sampled_one_in,
            emitted_end: s.emitted_end,
            labels: None,
        }
    }

    /// Runs `step` on both windows and pairs what they closed.
    fn step(
        &mut self,
        out: &mut Vec<Done>,
        mut step: impl FnMut(&mut Window, &mut dyn FnMut(Closed<Aggregate>)),
        mut step_q: impl FnMut(&mut Window<Quantiles>, &mut dyn FnMut(Closed<Quantiles>)),
    ) {
        let mut closed = Vec::new();
        step(&mut self.aggregate, &mut |c| closed.push(c));
        let mut sketches = Vec::new();
        if let Some(q) = &mut self.quantiles {
            step_q(q, &mut |c| sketches.push(c));
        }
        let mut sketches = sketches.into_iter();
        for c in closed {
            self.emitted_end = Some(self.emitted_end.map_or(c.end, |e| e.max(c.end)));
            let q = sketches.next();
            debug_assert!(
                q.as_ref()
                    .is_none_or(|q| (q.start, q.end) == (c.start, c.end))
            );
            let labels = self
                .labels
                .as_deref_mut()
                .map(|(spec, panes)| panes.close(spec, c.start));
            out.push(Done {
                closed: c,
                decaying: self.aggregate.decaying().copied(),
                quantiles: q.map(|q| q.acc),
                labels,
                late: std::mem::take(&mut self.late),
                sampled_one_in: std::mem::replace(&mut self.sampled_one_in, 1),
            });
        }
    }

    fn push(&mut self, reading: &Reading, out: &mut Vec<Done>) -> Result<(), Rejection> {
        let (ts, value, weight) = (reading.ts, reading.value, reading.weight);
        self.sampled_one_in = self.sampled_one_in.max(weight);
        let mut result = Ok(());
        self.step(
            out,
            |w, emit| result = w.push(ts, value, weight, emit),
            |w, emit| {
                let _ = w.push(ts, value, weight, emit);
            },
        );
        match result {
            Err(Rejection::Late) => self.late += 1,
            Ok(()) => {
                if let Some((spec, panes)) = self.labels.as_deref_mut() {
                    panes.add(spec, ts, value, weight, reading.labels.as_deref());
                }
            }
            Err(_) => {}
        }
        result
    }

    fn advance_to(&mut self, ts: Timestamp, out: &mut Vec<Done>) {
        self.step(
            out,
            |w, emit| w.advance_to(ts, emit),
            |w, emit| w.advance_to(ts, emit),
        );
    }

    fn flush(&mut self, out: &mut Vec<Done>) {
        self.step(out, |w, emit| w.flush(emit), |w, emit| w.flush(emit));
    }
}

/// The sending side of a worker.
struct Emitter {
    /// Aggregates, checkpoints and stats, in order. Its room
    /// (`record_queue` in `pipeline/mod.rs`) holds a window boundary's
    /// aggregates: every series closes its window within one tick, 10,000
    /// records at once, more than the output drains in that time. They wait
    /// there while the worker goes on taking readings and raising alerts;
    /// only a full channel makes the worker wait.
    out: mpsc::Sender<Record>,
    /// Where alerts go (ahead of other records; see `output::run`).
    alerts: mpsc::Sender<Record>,
    stats: Arc<WorkerStats>,
}

impl Emitter {
    /// Hands a record to the output task, waiting for room if its channel
    /// is full.
    fn send(&self, record: Record) {
        let channel = match record {
            Record::Alert(_) => &self.alerts,
            _ => &self.out,
        };
        let record = match channel.try_send(record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.stats.output_closed.fetch_add(1, Relaxed);
                return;
            }
            Err(mpsc::error::TrySendError::Full(record)) => record,
        };
        // Waiting on a slow output (a full disk, say) is back-pressure, not
        // a stall: the watchdog does not count it against the heartbeat.
        self.stats.waiting_on_output.store(true, Relaxed);
        if channel.blocking_send(record).is_err() {
            self.stats.output_closed.fetch_add(1, Relaxed);
        }
        self.stats.waiting_on_output.store(false, Relaxed);
    }
}

/// The record of a closed window of `series`, whose state was built by
/// rule `rule` of `rules`.
/// A window that starts before `partial_before` (the restart after a
/// crash) is reported partial: readings since the last checkpoint were lost.
fn aggregate(
    agent: &Arc<str>,
    partial_before: Option<Timestamp>,
    rules: &Rules,
    (series, row): (&str, Option<&Row>),
    rule: usize,
    done: Done,
) -> Record {
    let after_crash = partial_before.is_some_and(|t| done.closed.start < t);
    let a = &done.closed.acc;
    let levels = &rules.config(rule).quantiles.at;
    let mut quantiles_collapsed = Vec::new();
    let sketch = done.quantiles.as_ref().filter(|_| !levels.is_empty());
    let quantiles_rank_error = sketch.and_then(Quantiles::rank_error);
    let quantile_sketch = sketch
        .filter(|_| rules.config(rule).sketches)
        .and_then(Quantiles::kll_bytes)
        .map(|bytes| base64_of(&bytes));
    let quantiles = sketch.map(|q| {
        levels
            .iter()
            .filter_map(|&level| {
                let name = quantile_name(level);
                let answer = q.quantile(level)?;
                if answer.collapsed {
                    quantiles_collapsed.push(name.clone());
                }
                Some((name, answer.value))
            })
            .collect()
    });
    let group = rules.group(rule).and_then(|g| {
        let value = g.parse(series)?;
        Some(Box::new(GroupRecord {
            by: g.by.clone().unwrap_or_else(|| GROUP_ALL.to_owned()),
            value: value.map(str::to_owned),
        }))
    });
    let mut record = AggregateRecord {
        agent: agent.clone(),
        series: series.to_owned(),
        group,
        table: row.cloned(),
        start: done.closed.start,
        end: done.closed.end,
        count: a.count(),
        sum: a.sum(),
        mean: a.mean().unwrap_or(f64::NAN),
        min: a.min().unwrap_or(f64::NAN),
        max: a.max().unwrap_or(f64::NAN),
        stddev: a.stddev(),
        first: a.first().map_or(f64::NAN, |p| p.value),
        last: a.last().map_or(f64::NAN, |p| p.value),
        extras: None,
        late: done.late,
        partial: done.closed.partial || after_crash,
        partial_reason: after_crash.then_some("restored_after_crash"),
        sampled_one_in: (done.sampled_one_in > 1).then_some(done.sampled_one_in),
        count_stderr: (done.sampled_one_in > 1)
            .then(|| (a.count() as f64 * f64::from(done.sampled_one_in - 1)).sqrt()),
        made: crate::output::Made::now(),
    };
    let mut extras = RecordExtras {
        quantiles,
        quantiles_collapsed,
        quantiles_rank_error,
        quantile_sketch,
        decaying: done.decaying.and_then(|d| {
            Some(DecayingSummary {
                mean: d.mean()?,
                stddev: d.stddev()?,
                sum: d.decaying_sum(),
                weight: d.weight(),
            })
        }),
        ..RecordExtras::NONE
    };
    if let (Some(w), Some(spec)) = (done.labels, rules.label_spec(rule)) {
        label_records(&mut extras, w, spec);
    }
    if !extras.is_empty() {
        record.extras = Some(Box::new(extras));
    }
    Record::Aggregate(Box::new(record))
}

/// A quantile's name in records: `p50`, `p99`, `p99.9`.
pub fn quantile_name(level: f64) -> String {
    format!("p{}", (level * 100_000.0).round() / 1000.0)
}

/// What a closed window's label sketches report, into its record.
fn label_records(record: &mut RecordExtras, w: LabelWindow, spec: &LabelSpec) {
    record.distinct = w
        .distinct
        .zip(spec.distinct.as_ref())
        .map(|((h, without), label)| {
            Box::new(DistinctRecord::of(label, &h, without, spec.sketches))
        });
    record.top_k = w
        .top
        .zip(spec.top.as_ref())
        .map(|((top, names, without), (label, k))| {
            let mut counters = top.counters().to_vec();
            counters.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
            Box::new(TopRecord {
                label: label.clone(),
                values: counters
                    .iter()
                    .take(*k)
                    .map(|c| TopValue {
                        value: names
                            .get(&c.key)
                            .map_or_else(String::new, |v| v.to_string()),
                        count: c.count,
                        overcount: c.error,
                    })
                    .collect(),
                without_label: without,
            })
        });
    record.sample = w.sample.map(|s| {
        let mut rows = s.sample().to_vec();
        rows.sort_unstable_by_key(|r| r.ts);
        rows
    });
    record.frequency = w
        .frequency
        .zip(spec.frequency.as_ref())
        .map(|((cm, without), rule)| {
            Box::new(FrequencyRecord {
                label: rule.label.clone(),
                total: cm.total(),
                epsilon: cm.epsilon(),
                delta: cm.delta(),
                bound: cm.error_bound(),
                values: rule
                    .values
                    .iter()
                    .map(|v| FrequencyValue {
                        value: v.clone(),
                        count: cm.estimate(v.as_bytes()),
                    })
                    .collect(),
                without_label: without,
                sketch: spec
                    .sketches
                    .then(|| sketch_base64(cm.serialized_len(), |b| cm.write_to(b))),
            })
        });
}

/// The current rules, replaced on reload; workers pick up a new generation.
#[derive(Default)]
pub struct RulesSlot {
    generation: AtomicU64,
    rules: Mutex<Option<Arc<Rules>>>,
}

impl RulesSlot {
    /// Publishes new rules to every worker.
    pub fn replace(&self, rules: Arc<Rules>) {
        if let Ok(mut slot) = self.rules.lock() {
            *slot = Some(rules);
            self.generation.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn latest(&self, seen: u64) -> Option<(u64, Arc<Rules>)> {
        let generation = self.generation.load(Relaxed);
        if generation == seen {
            return None;
        }
        let rules = self.rules.lock().ok()?.clone()?;
        Some((generation, rules))
    }
}

/// A worker (see the module docs).
pub struct Worker {
    agent: Arc<str>,
    rules: Arc<Rules>,
    slot: Arc<RulesSlot>,
    generation: u64,
    /// Boxed keys and values: the table's slots stay small (24 bytes), so
    /// its spare capacity costs little at 10,000 series (hashbrown keeps up
    /// to 1.6 slots a series; with `SeriesKey`s inline, 72 bytes each, the
    /// table of 10,000 took 1.3 MB).
    series: HashMap<Box<str>, Box<Series>>,
    max_series: usize,
    emit: Emitter,
    stats: Arc<WorkerStats>,
    /// This worker's index and checkpoint period, when checkpoints are on.
    checkpoints: Option<(usize, Duration)>,
    /// When the agent restarted after a crash with checkpoints on: windows
    /// that start before it are reported partial.
    partial_before: Option<Timestamp>,
    /// Series idle this long (ms) are evicted (`series_idle_ms`).
    idle_evict: Option<Timestamp>,
    /// Series that may make room when the table is full, oldest last:
    /// (last seen, key), from the last scan.
    evictable: Vec<(Timestamp, Box<str>)>,
    /// When that scan was made.
    last_scan: Option<Instant>,
    /// When this worker started, ms: a series counts as idle only since
    /// then, so that the time the agent was down (a restart after a night
    /// off) does not evict the series restored from a checkpoint.
    started: Timestamp,
    /// The derived series' joins whose inputs this worker has seen, by
    /// their index in the rules.
    joins: Vec<Instances<JoinEntry>>,
    /// Pairs made by the last join step (kept to reuse its allocation).
    pairs: Vec<Pair>,
    /// The patterns whose inputs this worker has seen, by their index in
    /// the rules.
    patterns: Vec<Instances<PatternEntry>>,
    /// What the reading being processed feeds (kept to reuse its allocation).
    feeds: Vec<Feed>,
}

/// A derived series' or a pattern's state in the joins' worker: one, or
/// one per value of its `group_by` label (at most [`MAX_INSTANCES`]).
struct Instances<T> {
    one: Option<Box<T>>,
    by: HashMap<Box<str>, Box<T>, foldhash::fast::RandomState>,
}

impl<T> Default for Instances<T> {
    fn default() -> Self {
        Self {
            one: None,
            by: HashMap::default(),
        }
    }
}

impl<T> Instances<T> {
    /// The state of group `key` (`None`: the one, or the group without the
    /// label), made by `make` if new; `None` when `key` is new and the
    /// groups are full.
    fn entry(&mut self, key: Option<&str>, make: impl FnOnce() -> T) -> Option<&mut T> {
        let Some(key) = key else {
            return Some(self.one.get_or_insert_with(|| Box::new(make())));
        };
        if !self.by.contains_key(key) {
            if self.by.len() >= MAX_INSTANCES {
                return None;
            }
            self.by.insert(key.into(), Box::new(make()));
        }
        self.by.get_mut(key).map(|b| &mut **b)
    }

    /// Puts `state` back as group `key`'s.
    fn put(&mut self, key: Option<Box<str>>, state: Box<T>) {
        match key {
            None => self.one = Some(state),
            Some(key) => {
                self.by.insert(key, state);
            }
        }
    }

    /// Every group's state, with its key.
    fn iter(&self) -> impl Iterator<Item = (Option<&str>, &T)> {
        let one = self.one.as_deref().map(|e| (None, e));
        one.into_iter()
            .chain(self.by.iter().map(|(k, e)| (Some(&**k), &**e)))
    }

    /// Every group's state, taken out, with its key.
    fn drain(&mut self) -> impl Iterator<Item = (Option<Box<str>>, Box<T>)> + use<T> {
        let one = self.one.take().map(|e| (None, e));
        let by: Vec<_> = self.by.drain().map(|(k, e)| (Some(k), e)).collect();
        one.into_iter().chain(by)
    }
}

/// Slot `i` of `list`, grown to hold it.
fn slot<T: Default>(list: &mut Vec<T>, i: usize) -> &mut T {
    if list.len() <= i {
        list.resize_with(i + 1, T::default);
    }
    &mut list[i]
}

/// A pattern's state in a worker.
struct PatternEntry {
    seq: Sequence,
    /// Largest event time among its inputs' readings.
    last_event: Timestamp,
    /// Wall time of its last input reading.
    last_seen: Timestamp,
}

/// Counts what a pattern step did (`before` and `after` it).
fn count_pattern(s: &WorkerStats, before: SequenceStats, after: SequenceStats) {
    if after.raised > before.raised {
        s.pattern_raised
            .fetch_add(after.raised - before.raised, Relaxed);
    }
    if after.settled > before.settled {
        s.pattern_settled
            .fetch_add(after.settled - before.settled, Relaxed);
    }
}

/// The derived values of `pairs` (emptied), by `derived`'s expression from
/// the join's previous pair `prev`; those without a value are counted.
fn evaluate(
    derived: &Derived,
    prev: &mut Option<(Timestamp, f64)>,
    pairs: &mut Vec<Pair>,
    stats: &WorkerStats,
) -> Vec<(Timestamp, f64)> {
    let mut values = Vec::with_capacity(pairs.len());
    for p in pairs.drain(..) {
        match derived.expr.value(prev, p.ts, p.a, p.b) {
            Some(v) => values.push((p.ts, v)),
            None => {
                stats.join_undefined.fetch_add(1, Relaxed);
            }
        }
    }
    values
}

/// Counts what a join step did (`before` and `after` it).
fn count_join(s: &WorkerStats, before: JoinStats, after: JoinStats) {
    for (counter, b, a) in [
        (&s.join_pairs, before.joined, after.joined),
        (&s.join_missing_a, before.missing_a, after.missing_a),
        (&s.join_missing_b, before.missing_b, after.missing_b),
        (&s.join_late, before.late, after.late),
    ] {
        if a > b {
            counter.fetch_add(a - b, Relaxed);
        }
    }
}

/// A derived series' join in a worker.
struct JoinEntry {
    op: JoinOp,
    /// The previous pair's event time and expression, for `rate(...)`.
    prev: Option<(Timestamp, f64)>,
    /// Largest event time among its inputs' readings.
    last_event: Timestamp,
    /// Wall time of its last input reading.
    last_seen: Timestamp,
}

impl Worker {
    /// A worker sending records to `out`.
    pub fn new(
        agent: Arc<str>,
        rules: Arc<Rules>,
        slot: Arc<RulesSlot>,
        max_series: usize,
        out: mpsc::Sender<Record>,
        stats: Arc<WorkerStats>,
    ) -> Worker {
        Worker {
            agent,
            rules,
            generation: slot.generation.load(Relaxed),
            slot,
            series: HashMap::new(),
            max_series,
            emit: Emitter {
                alerts: out.clone(),
                out,
                stats: stats.clone(),
            },
            stats,
            checkpoints: None,
            partial_before: None,
            idle_evict: None,
            evictable: Vec::new(),
            last_scan: None,
            started: now_ms(),
            joins: Vec::new(),
            pairs: Vec::new(),
            patterns: Vec::new(),
            feeds: Vec::new(),
        }
    }

    /// Evicts series not seen for `idle` (see `series_idle_ms`).
    pub fn with_series_idle(mut self, idle: Duration) -> Worker {
        self.idle_evict = Some(idle.as_millis() as Timestamp).filter(|&ms| ms > 0);
        self
    }

    /// How long a series must have been idle before a new one may take its
    /// place in a full table: a minute, or `series_idle_ms` if shorter.
    fn evictable_after(&self) -> Timestamp {
        self.idle_evict
            .map_or(EVICTABLE_AFTER, |t| t.min(EVICTABLE_AFTER))
    }

    /// Makes room in a full table at wall time `now`: evicts the series seen
    /// least recently among those idle for [`Self::evictable_after`].
    /// Candidates come from a scan of the table made at most once a second,
    /// so a flood of new ids costs one scan a second, not one per reading.
    fn make_room(&mut self, now: Timestamp) -> bool {
        let after = self.evictable_after();
        loop {
            while let Some((seen, key)) = self.evictable.pop() {
                // Still there, and not seen since the scan.
                if self.series.get(&key).is_some_and(|s| s.last_seen == seen)
                    && now.saturating_sub(seen.max(self.started)) >= after
                {
                    self.evict(&key);
                    return true;
                }
            }
            if self
                .last_scan
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return false;
            }
            self.last_scan = Some(Instant::now());
            self.evictable = self
                .series
                .iter()
                .filter(|(_, s)| now.saturating_sub(s.last_seen.max(self.started)) >= after)
                .map(|(k, s)| (s.last_seen, k.clone()))
                .collect();
            // Oldest last, for `pop`.
            self.evictable
                .sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
            if self.evictable.is_empty() {
                return false;
            }
        }
    }

    /// Evicts series `key` (see [`Self::forget`]), counted.
    fn evict(&mut self, key: &str) {
        let rules = self.rules.clone();
        if self.forget(key, &rules) {
            self.stats.evicted.fetch_add(1, Relaxed);
        }
    }

    /// Forgets series `key`: its open windows are emitted as partial, as
    /// records of `rules` (the rules that built its state). Whether it was
    /// there.
    fn forget(&mut self, key: &str, rules: &Rules) -> bool {
        let Some(mut s) = self.series.remove(key) else {
            return false;
        };
        if let Some(windows) = &mut s.windows {
            let mut done = Vec::new();
            windows.flush(&mut done);
            for d in done {
                self.emit.send(aggregate(
                    &self.agent,
                    self.partial_before,
                    rules,
                    (key, Joined::row(&s.joined)),
                    s.rule,
                    d,
                ));
            }
        }
        self.stats.series.store(self.series.len() as u64, Relaxed);
        true
    }

    /// Sends alerts to `alerts` instead of with the other records.
    pub fn with_alert_channel(mut self, alerts: mpsc::Sender<Record>) -> Worker {
        self.emit.alerts = alerts;
        self
    }

    /// Reports windows that start before `restart` as partial, with the
    /// reason `restored_after_crash`: the agent restarted after a crash, and
    /// the readings since the last checkpoint are lost.
    pub fn with_crash_restart(mut self, restart: Timestamp) -> Worker {
        self.partial_before = Some(restart);
        self
    }

    /// Saves a checkpoint as worker `index` every `every` and at shutdown
    /// (instead of closing open windows as partial).
    pub fn with_checkpoints(mut self, index: usize, every: Duration) -> Worker {
        self.checkpoints = Some((index, every));
        self
    }

    /// Takes back the joins of a checkpoint whose derived series are still
    /// there with the same settings (the others start afresh).
    pub fn restore_joins(&mut self, saved: Vec<JoinState>) {
        for j in saved {
            let Some(d) = self
                .rules
                .derived()
                .iter()
                .position(|d| d.config.name == j.name && d.fingerprint == j.fingerprint)
            else {
                continue;
            };
            let entry = Box::new(JoinEntry {
                op: j.op,
                prev: j.prev,
                last_event: j.last_event,
                last_seen: j.last_seen,
            });
            slot(&mut self.joins, d).put(j.group.map(Box::from), entry);
        }
    }

    /// Takes back the patterns of a checkpoint that are still there with
    /// the same settings (the others start afresh).
    pub fn restore_patterns(&mut self, saved: Vec<PatternState>) {
        for saved in saved {
            let Some(p) =
                self.rules.patterns().iter().position(|p| {
                    p.config.name == saved.name && p.fingerprint == saved.fingerprint
                })
            else {
                continue;
            };
            let entry = Box::new(PatternEntry {
                seq: saved.seq,
                last_event: saved.last_event,
                last_seen: saved.last_seen,
            });
            slot(&mut self.patterns, p).put(saved.group.map(Box::from), entry);
        }
    }

    /// Takes back series state from a checkpoint (see [`crate::pipeline::checkpoint`]).
    /// `marks` tells which windows were emitted after it.
    pub fn restore(&mut self, saved: Vec<SeriesState>, marks: &HashMap<String, Timestamp>) {
        let (mut restored, mut dropped) = (0u64, 0u64);
        for s in saved {
            let Ok(key) = SeriesKey::try_from(s.series.as_str()) else {
                dropped += 1;
                continue;
            };
            let Some(rule) = self.rules.resolve(&key) else {
                dropped += 1;
                continue;
            };
            // (A checkpoint holds no dead series: they are evicted before
            // it is saved. The time the agent was down does not count as
            // idle: see `started`.)
            if self.series.len() >= self.max_series {
                dropped += 1;
                continue;
            }
            let Ok(joined) = Joined::of(&self.rules, rule, &key, s.join_key.as_deref()) else {
                dropped += 1;
                continue;
            };
            let config = self.rules.config(rule);
            let (window_fp, detector_fp) = self.rules.fingerprints(rule);
            let (window, quantiles, _) = self.rules.state(rule);
            let mut detectors = self.rules.detectors_for(rule, Joined::row(&joined));
            let spec = self.rules.label_spec(rule);
            let shape = quantiles.as_ref().map(|q| *q.params());
            let fresh = || window.map(|w| Windows::new(w, quantiles, spec));
            let windows = match s.windows {
                Some(saved) if s.window_fp == window_fp => {
                    let mut w = Windows::restored(saved);
                    // What new panes start with is not saved: the rule's.
                    if let (Some(q), Some(shape)) = (&mut w.quantiles, shape) {
                        q.set_params(shape);
                    }
                    let mark = marks.get(&s.series).copied();
                    match (mark, config.window.as_ref().and_then(checkpoint::lateness)) {
                        // Windows emitted after the checkpoint: close them
                        // again, silently, as they were closed before.
                        (Some(end), Some(lateness)) if Some(end) > w.emitted_end => {
                            let mut discarded = Vec::new();
                            w.advance_to(end.saturating_add(lateness), &mut discarded);
                            w.emitted_end = Some(end);
                            Some(w)
                        }
                        // A count window emitted after it: its readings are
                        // in that record; start afresh.
                        (Some(end), None) if Some(end) > w.emitted_end => fresh(),
                        _ => Some(w),
                    }
                }
                _ => fresh(),
            };
            if s.detector_fp == detector_fp && s.detectors.len() == detectors.len() {
                for (d, saved) in detectors.iter_mut().zip(s.detectors) {
                    d.restore(saved);
                }
            }
            // Label sketches built by the same settings come back; others
            // (and any that do not read back) start afresh.
            let mut windows = windows;
            let mut first_seen = config
                .first_seen
                .as_ref()
                .map(|f| Box::new(FirstSeen::new(f)));
            let saved_labels = s
                .labels
                .filter(|l| l.fingerprint == self.rules.labels_fingerprint(rule));
            if let Some(saved) = saved_labels {
                if let Some(w) = &mut windows {
                    if w.labels.is_none() {
                        w.labels = spec.map(|spec| Box::new((spec.clone(), LabelPanes::default())));
                    }
                    if let Some((spec, panes)) = w.labels.as_deref_mut()
                        && let Some(restored) = saved.panes(spec)
                    {
                        *panes = restored;
                    }
                }
                if let Some(f) = config.first_seen.as_ref().and_then(|f| saved.first_seen(f)) {
                    first_seen = Some(Box::new(f));
                }
            } else if let Some(w) = &mut windows
                && w.labels.is_none()
            {
                w.labels = spec.map(|spec| Box::new((spec.clone(), LabelPanes::default())));
            }
            self.series.insert(
                Box::from(key.as_str()),
                Box::new(Series {
                    rule,
                    joined,
                    windows,
                    detectors,
                    last_event: s.last_event,
                    last_seen: s.last_seen,
                    absent: false,
                    first_seen,
                }),
            );
            restored += 1;
        }
        self.stats.series.store(self.series.len() as u64, Relaxed);
        self.stats.restored.fetch_add(restored, Relaxed);
        self.stats.restore_dropped.fetch_add(dropped, Relaxed);
    }

    /// Sends this worker's checkpoint to the store.
    fn save(&self, index: usize) {
        let state = self.checkpoint();
        self.emit.send(Record::Checkpoint {
            worker: index,
            state,
        });
    }

    /// This worker's state, encoded as a checkpoint (what it saves every
    /// `checkpoint.interval_ms`; see [`crate::pipeline::checkpoint`]).
    pub fn checkpoint(&self) -> Vec<u8> {
        let series = self
            .series
            .iter()
            .map(|(key, s)| {
                let (window_fp, detector_fp) = self.rules.fingerprints(s.rule);
                let panes = s.windows.as_ref().and_then(|w| w.labels.as_deref());
                let labels = (panes.is_some() || s.first_seen.is_some()).then(|| {
                    LabelsState::save(
                        self.rules.labels_fingerprint(s.rule),
                        panes.map(|(_, p)| p),
                        s.first_seen.as_deref(),
                    )
                });
                SeriesRef {
                    series: key,
                    window_fp,
                    detector_fp,
                    windows: s.windows.as_ref().map(Windows::save),
                    detectors: DetectorsRef(&s.detectors),
                    last_event: s.last_event,
                    last_seen: s.last_seen,
                    labels,
                    join_key: Joined::by(&s.joined).map(str::to_owned),
                }
            })
            .collect();
        let joins = self
            .joins
            .iter()
            .zip(self.rules.derived())
            .flat_map(|(groups, d)| {
                groups.iter().map(|(group, entry)| JoinState {
                    name: d.config.name.clone(),
                    fingerprint: d.fingerprint,
                    op: entry.op.clone(),
                    prev: entry.prev,
                    last_event: entry.last_event,
                    last_seen: entry.last_seen,
                    group: group.map(str::to_owned),
                })
            })
            .collect();
        let patterns = self
            .patterns
            .iter()
            .zip(self.rules.patterns())
            .flat_map(|(groups, p)| {
                groups.iter().map(|(group, entry)| PatternState {
                    name: p.config.name.clone(),
                    fingerprint: p.fingerprint,
                    seq: entry.seq.clone(),
                    last_event: entry.last_event,
                    last_seen: entry.last_seen,
                    group: group.map(str::to_owned),
                })
            })
            .collect();
        checkpoint::encode_refs(series, joins, patterns)
    }

    /// Runs until `stop` is set, then drains the rings, closes every open
    /// window as partial, and returns.
    pub fn run(mut self, mut rings: Vec<ReadingConsumer>, stop: Arc<AtomicBool>) {
        let mut last_tick = Instant::now();
        let mut last_save = Instant::now();
        // Whether the last pass took more than one reading.
        let mut busy = false;
        loop {
            self.stats.heartbeat.fetch_add(1, Relaxed);
            let stopping = stop.load(Relaxed);
            // New rules first, so that readings that arrive after a reload
            // are judged by them.
            if let Some((generation, rules)) = self.slot.latest(self.generation) {
                self.generation = generation;
                self.reload(rules);
            }
            let mut taken = 0;
            for ring in &mut rings {
                taken += ring.pop_each(BATCH, |r| self.process(r));
            }
            if taken == 0 && stopping {
                break;
            }
            if last_tick.elapsed() >= TICK {
                let depth: usize = rings.iter_mut().map(|r| r.len()).sum();
                self.stats.ring_depth.store(depth as u64, Relaxed);
                self.tick(now_ms());
                last_tick = Instant::now();
            }
            if let Some((index, every)) = self.checkpoints
                && last_save.elapsed() >= every
            {
                self.save(index);
                last_save = Instant::now();
            }
            if taken == 0 {
                if busy {
                    // More is likely on its way: a sleep lets it gather, and
                    // a source's unpark meanwhile costs it no syscall.
                    std::thread::sleep(NAP);
                } else {
                    self.stats.parks.fetch_add(1, Relaxed);
                    std::thread::park_timeout(TICK);
                }
            }
            // One reading is no sign of more on its way.
            busy = taken > 1;
        }
        match self.checkpoints {
            // Open windows go on in the next run.
            Some((index, _)) => self.save(index),
            None => self.flush(),
        }
    }

    /// Takes one reading, as [`Worker::run`] does for each reading it pops
    /// from its rings (public so that benchmarks can drive a worker).
    pub fn process(&mut self, reading: Reading) {
        self.stats.readings.fetch_add(1, Relaxed);
        if !self.rules.any_feeds() {
            self.take(reading);
            return;
        }
        let mut feeds = std::mem::take(&mut self.feeds);
        self.rules.feeds(&reading.series, &mut feeds);
        let reading = self.take(reading);
        if !feeds.is_empty() {
            let rules = self.rules.clone();
            let labels = reading.labels.as_deref();
            let point = (reading.ts, reading.value, reading.weight);
            for &feed in &feeds {
                match feed {
                    Feed::Derived(d, side) => {
                        let group = rules.derived()[d].group.as_ref();
                        let key = group.and_then(|g| g.value(labels));
                        self.join(d, key, side, point, reading.ingest);
                    }
                    Feed::Pattern(p, step) => {
                        let group = rules.patterns()[p].group.as_ref();
                        let key = group.and_then(|g| g.value(labels));
                        self.step(p, key, step, (point.0, point.1), reading.ingest);
                    }
                }
            }
        }
        self.feeds = feeds;
    }

    /// Offers an input reading's `(ts, value)` to condition `step` of
    /// pattern `p` (its group `key`'s), and sends the alerts it causes.
    fn step(
        &mut self,
        p: usize,
        key: Option<&str>,
        step: Step,
        (ts, value): (Timestamp, f64),
        ingest: Timestamp,
    ) {
        let rules = self.rules.clone();
        let pattern = &rules.patterns()[p];
        let Some(entry) = slot(&mut self.patterns, p).entry(key, || PatternEntry {
            seq: pattern.state(),
            last_event: ts,
            last_seen: ingest,
        }) else {
            self.stats.groups_overflow.fetch_add(1, Relaxed);
            return;
        };
        entry.last_event = entry.last_event.max(ts);
        entry.last_seen = ingest;
        let before = entry.seq.stats();
        // (A bad value was refused by its own series' rule already.)
        let Ok(changes) = entry.seq.observe(step, ts, value) else {
            return;
        };
        count_pattern(&self.stats, before, entry.seq.stats());
        for change in changes.into_iter().flatten() {
            self.pattern_alert(pattern, key, change, value);
        }
    }

    /// Sends the alert of `pattern` (its group `key`'s) for `change`,
    /// caused by a reading of `value` (not used for a deadline that passed).
    fn pattern_alert(
        &self,
        pattern: &Pattern,
        key: Option<&str>,
        change: PatternChange,
        value: f64,
    ) {
        let deadline = pattern.config.absent;
        let (state, value, score, at) = match change {
            PatternChange::Raised { first, at } => (
                "raised",
                // A deadline that passed: no reading raised it.
                if deadline { f64::NAN } else { value },
                Some(at.saturating_sub(first) as f64),
                at,
            ),
            PatternChange::Cleared { at } => ("cleared", value, None, at),
        };
        let series = match &pattern.group {
            Some(g) => g.key_of(key).to_string(),
            None => pattern.config.name.clone(),
        };
        self.emit.send(Record::Alert(Box::new(AlertEvent {
            agent: self.agent.clone(),
            series,
            rule: "pattern",
            state,
            value,
            score,
            threshold: pattern.config.within_ms as f64,
            event_ts: at,
            detected_ts: now_ms(),
            label: None,
            table: None,
        })));
    }

    /// Moves quiet patterns' event time on by the wall time since their
    /// last input (so that a deadline passes while nothing comes).
    fn tick_patterns(&mut self, now: Timestamp) {
        let rules = self.rules.clone();
        for (p, pattern) in rules.patterns().iter().enumerate() {
            let Some(groups) = self.patterns.get_mut(p) else {
                continue;
            };
            let mut changes = Vec::new();
            let entries = groups
                .one
                .iter_mut()
                .map(|e| (None, e))
                .chain(groups.by.iter_mut().map(|(k, e)| (Some(k.clone()), e)));
            for (key, entry) in entries {
                if entry.seq.armed().is_none() {
                    continue;
                }
                let idle = now
                    .saturating_sub(entry.last_seen)
                    .saturating_sub(IDLE_GRACE);
                if idle <= 0 {
                    continue;
                }
                let before = entry.seq.stats();
                let change = entry.seq.advance_to(entry.last_event.saturating_add(idle));
                count_pattern(&self.stats, before, entry.seq.stats());
                if let Some(change) = change {
                    changes.push((key, change));
                }
            }
            for (key, change) in changes {
                self.pattern_alert(pattern, key.as_deref(), change, f64::NAN);
            }
        }
    }

    /// Offers an input reading's `(ts, value, weight)` to derived series
    /// `d`'s join (its group `key`'s), and takes the readings of the
    /// derived series it makes.
    fn join(
        &mut self,
        d: usize,
        key: Option<&str>,
        side: Side,
        (ts, value, weight): (Timestamp, f64, u32),
        ingest: Timestamp,
    ) {
        let derived = &self.rules.derived()[d];
        let Some(entry) = slot(&mut self.joins, d).entry(key, || JoinEntry {
            op: derived.state(),
            prev: None,
            last_event: ts,
            last_seen: ingest,
        }) else {
            self.stats.groups_overflow.fetch_add(1, Relaxed);
            return;
        };
        entry.last_event = entry.last_event.max(ts);
        entry.last_seen = ingest;
        let before = entry.op.stats();
        entry.op.push(side, ts, value, weight, &mut self.pairs);
        count_join(&self.stats, before, entry.op.stats());
        if !self.pairs.is_empty() {
            let values = evaluate(derived, &mut entry.prev, &mut self.pairs, &self.stats);
            let rules = self.rules.clone();
            self.take_values(&rules.derived()[d], key, &values, ingest);
        }
    }

    /// Takes the readings `(ts, value)` of `derived` (its group `key`'s).
    fn take_values(
        &mut self,
        derived: &Derived,
        key: Option<&str>,
        values: &[(Timestamp, f64)],
        ingest: Timestamp,
    ) {
        if values.is_empty() {
            return;
        }
        let (series, labels) = match &derived.group {
            None => (derived.key.clone(), None),
            // A group's readings carry its label, for the patterns (and
            // label rules) that watch them.
            Some(g) => (
                g.key_of(key),
                key.and_then(|value| {
                    let names: Arc<[Box<str>]> = Arc::from(vec![g.by.clone()?.into_boxed_str()]);
                    Labels::new(names, &[Some(value)]).map(Box::new)
                }),
            ),
        };
        let mut feeds = Vec::new();
        // Patterns may watch a derived series (a derived series feeds no
        // other: see `Rules::with_derived`).
        self.rules.feeds(&series, &mut feeds);
        for &(ts, value) in values {
            let reading = self.take(Reading {
                series: series.clone(),
                ts,
                value,
                ingest,
                weight: 1,
                labels: labels.clone(),
            });
            for &feed in &feeds {
                if let Feed::Pattern(i, step) = feed {
                    let rules = self.rules.clone();
                    let group = rules.patterns()[i].group.as_ref();
                    let key = group.and_then(|g| g.value(reading.labels.as_deref()));
                    self.step(i, key, step, (ts, reading.value), ingest);
                }
            }
        }
    }

    /// Moves quiet joins' event time on by the wall time since their last
    /// input (as [`Self::tick`] does for series), or closes every open
    /// join window as partial (`flush`).
    fn tick_joins(&mut self, now: Timestamp, flush: bool) {
        let rules = self.rules.clone();
        let mut pairs = std::mem::take(&mut self.pairs);
        for d in 0..self.joins.len().min(rules.derived().len()) {
            let mut made = Vec::new();
            let groups = &mut self.joins[d];
            let entries = groups
                .one
                .iter_mut()
                .map(|e| (None, e))
                .chain(groups.by.iter_mut().map(|(k, e)| (Some(k.clone()), e)));
            for (key, entry) in entries {
                if !entry.op.has_open() {
                    continue;
                }
                let before = entry.op.stats();
                if flush {
                    entry.op.flush(&mut pairs);
                } else {
                    let idle = now
                        .saturating_sub(entry.last_seen)
                        .saturating_sub(IDLE_GRACE);
                    if idle <= 0 {
                        continue;
                    }
                    entry
                        .op
                        .advance_to(entry.last_event.saturating_add(idle), &mut pairs);
                }
                count_join(&self.stats, before, entry.op.stats());
                if !pairs.is_empty() {
                    let values = evaluate(
                        &rules.derived()[d],
                        &mut entry.prev,
                        &mut pairs,
                        &self.stats,
                    );
                    made.push((key, values));
                }
            }
            for (key, values) in made {
                self.take_values(&rules.derived()[d], key.as_deref(), &values, now);
            }
        }
        self.pairs = pairs;
    }

    /// Keeps each join whose derived series is still there with the same
    /// settings (at its new place); the others close their open windows
    /// (as partial, into their derived series if it is still there) and go.
    fn reload_joins(&mut self, old: &Rules) {
        let joins = std::mem::take(&mut self.joins);
        let mut pairs = std::mem::take(&mut self.pairs);
        for (i, mut groups) in joins.into_iter().enumerate() {
            let Some(before) = old.derived().get(i) else {
                continue;
            };
            let kept = self.rules.derived().iter().position(|d| {
                d.config.name == before.config.name && d.fingerprint == before.fingerprint
            });
            match kept {
                Some(j) => *slot(&mut self.joins, j) = groups,
                None => {
                    for (key, mut entry) in groups.drain() {
                        let stats = entry.op.stats();
                        entry.op.flush(&mut pairs);
                        count_join(&self.stats, stats, entry.op.stats());
                        let values = evaluate(before, &mut entry.prev, &mut pairs, &self.stats);
                        self.take_values(before, key.as_deref(), &values, now_ms());
                    }
                }
            }
        }
        self.pairs = pairs;
    }

    /// Keeps each pattern still there with the same settings (at its new
    /// place); the others go, clearing their alerts that were raised (so
    /// that their retained state does not stay raised).
    fn reload_patterns(&mut self, old: &Rules) {
        let patterns = std::mem::take(&mut self.patterns);
        for (i, mut groups) in patterns.into_iter().enumerate() {
            let Some(before) = old.patterns().get(i) else {
                continue;
            };
            let kept = self.rules.patterns().iter().position(|p| {
                p.config.name == before.config.name && p.fingerprint == before.fingerprint
            });
            match kept {
                Some(j) => *slot(&mut self.patterns, j) = groups,
                None => {
                    for (key, entry) in groups.drain() {
                        if entry.seq.state() == AlertState::Raised {
                            let at = PatternChange::Cleared {
                                at: entry.last_event,
                            };
                            self.pattern_alert(before, key.as_deref(), at, f64::NAN);
                        }
                    }
                }
            }
        }
    }

    /// Takes one reading into its series' state; gives it back with its
    /// value as the series' rule saw it (calibrated by its table), or as it
    /// came when no rule took it.
    fn take(&mut self, reading: Reading) -> Reading {
        if !self.series.contains_key(reading.series.as_str()) {
            if self.series.len() >= self.max_series && !self.make_room(reading.ingest) {
                self.stats.series_overflow.fetch_add(1, Relaxed);
                return reading;
            }
            let Some(rule) = self.rules.resolve(&reading.series) else {
                self.stats.unmatched.fetch_add(1, Relaxed);
                return reading;
            };
            let label = Joined::label_of(&self.rules, rule, &reading);
            let Ok(joined) = Joined::of(&self.rules, rule, &reading.series, label) else {
                self.stats.table_unmatched.fetch_add(1, Relaxed);
                return reading;
            };
            let (window, quantiles, _) = self.rules.state(rule);
            let detectors = self.rules.detectors_for(rule, Joined::row(&joined));
            let spec = self.rules.label_spec(rule);
            self.series.insert(
                Box::from(reading.series.as_str()),
                Box::new(Series {
                    rule,
                    joined,
                    windows: window.map(|w| Windows::new(w, quantiles, spec)),
                    detectors,
                    last_event: reading.ts,
                    last_seen: reading.ingest,
                    absent: false,
                    first_seen: self
                        .rules
                        .config(rule)
                        .first_seen
                        .as_ref()
                        .map(|f| Box::new(FirstSeen::new(f))),
                }),
            );
            self.stats.series.store(self.series.len() as u64, Relaxed);
        }
        let mut records = Vec::new();
        let series = self
            .series
            .get_mut(reading.series.as_str())
            .expect("inserted above");
        // A series joined by a label follows its value: a new value joins
        // its own row (and the detectors take its levels).
        if self.rules.join_label(series.rule).is_some() {
            let label = Joined::label_of(&self.rules, series.rule, &reading);
            if label != Joined::by(&series.joined) {
                let Ok(joined) = Joined::of(&self.rules, series.rule, &reading.series, label)
                else {
                    self.stats.table_unmatched.fetch_add(1, Relaxed);
                    return reading;
                };
                if Joined::row(&joined) != Joined::row(&series.joined) {
                    series.detectors = self.rules.detectors_for(series.rule, Joined::row(&joined));
                }
                series.joined = joined;
            }
        }
        let mut reading = reading;
        if let Some((scale, offset)) = series.joined.as_deref().and_then(|j| j.calibration) {
            reading.value = reading.value * scale + offset;
        }
        let silent_ms = reading.ingest.saturating_sub(series.last_seen);
        series.last_event = series.last_event.max(reading.ts);
        series.last_seen = reading.ingest;
        let rule = series.rule;
        let back = std::mem::take(&mut series.absent);
        if let Some(windows) = &mut series.windows
            && windows.push(&reading, &mut records) == Err(Rejection::Late)
        {
            self.stats.late.fetch_add(1, Relaxed);
        }
        let detected = now_ms();
        let mut alerts = Vec::new();
        if back {
            alerts.push(AlertEvent {
                agent: self.agent.clone(),
                series: reading.series.to_string(),
                rule: "absent",
                state: "cleared",
                value: reading.value,
                score: Some(silent_ms as f64),
                threshold: self.rules.absent_after(rule).unwrap_or(0) as f64,
                event_ts: reading.ts,
                detected_ts: detected,
                label: None,
                table: None,
            });
        }
        if let Some(filter) = &mut series.first_seen
            && let Some(rule_fs) = &self.rules.config(rule).first_seen
            && let Some(value) = reading
                .labels
                .as_deref()
                .and_then(|l| l.get(&rule_fs.label))
            && filter.first_time(value)
        {
            // Past its capacity the filter misses new values more and more
            // often, and a flood of new ids would become a flood of alerts
            // (into the outbox too): counted instead, with one line.
            if filter.over_capacity() {
                self.stats.first_seen_over_capacity.fetch_add(1, Relaxed);
                if !std::mem::replace(&mut filter.warned, true) {
                    tracing::warn!(
                        series = %reading.series,
                        label = %rule_fs.label,
                        capacity = rule_fs.capacity,
                        "first_seen: more new values than the filter's capacity; further ones are counted in sluice_first_seen_over_capacity_total, not alerted"
                    );
                }
            } else {
                alerts.push(AlertEvent {
                    agent: self.agent.clone(),
                    series: reading.series.to_string(),
                    rule: "first_seen",
                    state: "seen",
                    value: reading.value,
                    score: None,
                    threshold: 0.0,
                    event_ts: reading.ts,
                    detected_ts: detected,
                    label: Some(LabelRecord {
                        name: rule_fs.label.clone(),
                        value: value.to_owned(),
                    }),
                    table: None,
                });
            }
        }
        for d in &mut series.detectors {
            if let Some(change) = d.observe(reading.ts, reading.value) {
                alerts.push(AlertEvent {
                    agent: self.agent.clone(),
                    series: reading.series.to_string(),
                    rule: change.rule,
                    state: match change.transition {
                        Transition::Raised => "raised",
                        Transition::Cleared => "cleared",
                    },
                    value: reading.value,
                    score: change.score,
                    threshold: change.threshold,
                    event_ts: reading.ts,
                    detected_ts: detected,
                    label: None,
                    table: None,
                });
            }
        }
        let caused = !records.is_empty() || !alerts.is_empty();
        let row = Joined::row(&series.joined).cloned();
        for d in records {
            let record = aggregate(
                &self.agent,
                self.partial_before,
                &self.rules,
                (&reading.series, row.as_ref()),
                rule,
                d,
            );
            self.emit.send(record);
        }
        for mut a in alerts {
            // The series' row, as its records carry it.
            a.table = row.clone();
            self.emit.send(Record::Alert(Box::new(a)));
        }
        if caused && let Ok(mut h) = self.stats.latency_ms.lock() {
            h.saturating_record(now_ms().saturating_sub(reading.ingest).max(1) as u64);
        }
        reading
    }

    /// Switches to new rules. A series keeps each part of its state (window,
    /// detectors) whose configuration did not change; a series no rule
    /// matches any more is forgotten, its open windows emitted as partial.
    fn reload(&mut self, rules: Arc<Rules>) {
        let old = std::mem::replace(&mut self.rules, rules);
        let mut gone = Vec::new();
        for (key, s) in &mut self.series {
            // A series whose rule now groups (its readings go to groups),
            // and a group whose rule no longer groups it so, are gone too.
            let Some(new) = self
                .rules
                .resolve(key)
                .filter(|&new| old.group(s.rule) == self.rules.group(new))
            else {
                gone.push(key.clone());
                continue;
            };
            let Ok(joined) = Joined::of(&self.rules, new, key, Joined::by(&s.joined)) else {
                gone.push(key.clone());
                continue;
            };
            let (before, after) = (old.config(s.rule), self.rules.config(new));
            let (window, quantiles, _) = self.rules.state(new);
            let spec = self.rules.label_spec(new);
            if before.window != after.window || before.quantiles != after.quantiles {
                s.windows = window.map(|w| Windows::new(w, quantiles, spec));
            } else if old.labels_fingerprint(s.rule) != self.rules.labels_fingerprint(new)
                && let Some(w) = &mut s.windows
            {
                // Only the label sketches changed: they start afresh.
                w.labels = spec.map(|spec| Box::new((spec.clone(), LabelPanes::default())));
            }
            if before.first_seen != after.first_seen {
                s.first_seen = after
                    .first_seen
                    .as_ref()
                    .map(|f| Box::new(FirstSeen::new(f)));
            }
            // A table's edit changes the detectors of the series whose row
            // it changed (their windows go on).
            let same_detectors = before.anomaly == after.anomaly
                && before.thresholds == after.thresholds
                && before.rate_of_change == after.rate_of_change
                && Joined::row(&s.joined) == Joined::row(&joined);
            if !same_detectors {
                s.detectors = self.rules.detectors_for(new, Joined::row(&joined));
            }
            s.joined = joined;
            s.rule = new;
        }
        // Their last records, under the rules that built them.
        for key in gone {
            self.forget(&key, &old);
        }
        self.reload_joins(&old);
        self.reload_patterns(&old);
        self.stats.series.store(self.series.len() as u64, Relaxed);
    }

    /// Closes the windows of series that have gone quiet, sending each
    /// record as it goes (not collecting them: at 10,000 series that list
    /// was the agent's largest allocation).
    fn tick(&mut self, now: Timestamp) {
        if !self.joins.is_empty() {
            self.tick_joins(now, false);
        }
        if !self.patterns.is_empty() {
            self.tick_patterns(now);
        }
        if let Some(idle) = self.idle_evict {
            let gone: Vec<Box<str>> = self
                .series
                .iter()
                .filter(|(_, s)| now.saturating_sub(s.last_seen.max(self.started)) >= idle)
                .map(|(k, _)| k.clone())
                .collect();
            for key in &gone {
                self.evict(key);
            }
        }
        let mut done = Vec::new();
        for (key, s) in &mut self.series {
            if let Some(after) = self.rules.absent_after(s.rule) {
                // Silent since the last reading, or since this worker
                // started (the time the agent was down does not count).
                let silent = now.saturating_sub(s.last_seen.max(self.started));
                if !s.absent && silent >= after {
                    s.absent = true;
                    self.emit.send(Record::Alert(Box::new(AlertEvent {
                        agent: self.agent.clone(),
                        series: key.to_string(),
                        rule: "absent",
                        state: "raised",
                        // No reading raised it (null in JSON).
                        value: f64::NAN,
                        score: Some(now.saturating_sub(s.last_seen) as f64),
                        threshold: after as f64,
                        event_ts: s.last_event,
                        detected_ts: now,
                        label: None,
                        table: Joined::row(&s.joined).cloned(),
                    })));
                }
            }
            let Some(windows) = &mut s.windows else {
                continue;
            };
            let idle = now.saturating_sub(s.last_seen).saturating_sub(IDLE_GRACE);
            if idle <= 0 {
                continue;
            }
            windows.advance_to(s.last_event.saturating_add(idle), &mut done);
            for d in done.drain(..) {
                self.emit.send(aggregate(
                    &self.agent,
                    self.partial_before,
                    &self.rules,
                    (key, Joined::row(&s.joined)),
                    s.rule,
                    d,
                ));
            }
        }
    }

    /// Closes every open window as partial (shutdown).
    fn flush(&mut self) {
        // Joins first: the readings they make go to their derived series.
        self.tick_joins(now_ms(), true);
        let mut done = Vec::new();
        for (key, s) in &mut self.series {
            if let Some(windows) = &mut s.windows {
                windows.flush(&mut done);
                for d in done.drain(..) {
                    self.emit.send(aggregate(
                        &self.agent,
                        self.partial_before,
                        &self.rules,
                        (key, Joined::row(&s.joined)),
                        s.rule,
                        d,
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "agent_id = \"t\"\nmax_series = 2\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[output]\nconsole = true\n";

    fn worker(rules: &str) -> (Worker, mpsc::Receiver<Record>, Arc<WorkerStats>) {
        let config = Config::parse(&format!("{BASE}{rules}")).unwrap();
        let (w, _, rx, stats) = worker_of(&config, config.max_series);
        (w, rx, stats)
    }

    /// A worker of `config`'s rules (joined to its tables, if read), with
    /// a table of `max_series`, and the rules and counters it runs with.
    fn worker_of(
        config: &Config,
        max_series: usize,
    ) -> (Worker, Arc<Rules>, mpsc::Receiver<Record>, Arc<WorkerStats>) {
        let rules = Arc::new(Rules::of(config).unwrap());
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(WorkerStats::default());
        let w = Worker::new(
            "t".into(),
            rules.clone(),
            Arc::new(RulesSlot::default()),
            max_series,
            tx,
            stats.clone(),
        );
        (w, rules, rx, stats)
    }

    fn reading(series: &str, ts: Timestamp, value: f64) -> Reading {
        Reading {
            series: SeriesKey::try_from(series).unwrap(),
            ts,
            value,
            ingest: now_ms(),
            weight: 1,
            labels: None,
        }
    }

    /// The series table keeps up to 1.6 slots a series (hashbrown's spare
    /// capacity): its key and value are pointers, not a 72-byte
    /// `SeriesKey` inline, so that 10,000 series take ~0.4 MB of slots,
    /// not 1.3 MB.
    #[test]
    fn a_slot_of_the_series_table_stays_small() {
        fn slot<K, V, S>(_: &HashMap<K, V, S>) -> usize {
            std::mem::size_of::<(K, V)>()
        }
        let (w, _, _) =
            worker("[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n");
        assert!(slot(&w.series) <= 24, "{} bytes", slot(&w.series));
    }

    fn aggregates(rx: &mut mpsc::Receiver<Record>) -> Vec<AggregateRecord> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            if let Record::Aggregate(a) = r {
                out.push(*a);
            }
        }
        out
    }

    fn seen(series: &str, ingest: Timestamp) -> Reading {
        Reading {
            ingest,
            ..reading(series, ingest, 1.0)
        }
    }

    /// How often a running worker parks when a source hands it
    /// `per_handoff` readings at a time, 200 times, 20 µs after it took the
    /// hand-off before.
    fn parks_for(per_handoff: u64) -> u64 {
        let (w, _rx, stats) =
            worker("[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n");
        let (mut tx, ring) = sluice_collectors::reading_ring(64).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = std::thread::spawn({
            let stop = stop.clone();
            move || w.run(vec![ring], stop)
        });
        for h in 0..HANDOFFS {
            for i in 0..per_handoff {
                let ts = (h * per_handoff + i) as Timestamp;
                assert!(tx.try_push(reading("s", ts, 1.0)).is_ok());
            }
            handle.thread().unpark();
            while stats.readings.load(Relaxed) < (h + 1) * per_handoff {
                std::thread::yield_now();
            }
            let taken = Instant::now();
            while taken.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            }
        }
        stop.store(true, Relaxed);
        handle.thread().unpark();
        handle.join().unwrap();
        let parks = stats.parks.load(Relaxed);
        eprintln!("parked {parks} times for {HANDOFFS} hand-offs of {per_handoff}");
        parks
    }
    const HANDOFFS: u64 = 200;

    /// Under load a source hands over what each read brought, tens of
    /// microseconds apart: a worker that has just taken several readings
    /// waits a little for the next ones instead of parking (and being woken
    /// by a syscall) after every hand-off.
    #[test]
    fn a_busy_worker_does_not_park_between_hand_offs() {
        assert!(parks_for(10) < HANDOFFS / 2);
    }

    /// One reading at a time is no sign of more on its way: the worker
    /// parks after each as before, without a nap's extra wake-up.
    #[test]
    fn a_worker_fed_one_reading_at_a_time_parks_after_each() {
        assert!(parks_for(1) > HANDOFFS / 2);
    }

    #[test]
    fn sampled_readings_count_as_the_readings_they_stand_for() {
        let (mut w, mut rx, _) =
            worker("[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n");
        // Nine readings of 1.0 kept whole, and one of 10.0 kept as one in ten.
        for i in 0..9 {
            w.process(reading("s", i, 1.0));
        }
        w.process(Reading {
            weight: 10,
            ..reading("s", 9, 10.0)
        });
        w.process(reading("s", 1_000, 0.0));
        let got = aggregates(&mut rx);
        let a = &got[0];
        assert_eq!((a.count, a.sum, a.sampled_one_in), (19, 109.0, Some(10)));
        assert!((a.mean - 109.0 / 19.0).abs() < 1e-12, "{a:?}");
        // The bound on the count's error: sqrt(19 · 9).
        assert!((a.count_stderr.unwrap() - (19.0f64 * 9.0).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn a_full_table_makes_room_from_idle_series_never_from_active_ones() {
        let (w, mut rx, stats) = worker(
            "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 600000 }\n",
        );
        let mut w = w.with_series_idle(Duration::from_secs(5));
        let now = now_ms();
        // Idle counts from the worker's start: this one has run a minute.
        w.started = now - 60_000;
        // max_series = 2, both idle: seen 10 s and 8 s ago.
        w.process(seen("a", now - 10_000));
        w.process(seen("b", now - 8_000));
        // A new series takes the place of the one seen least recently, whose
        // open window is emitted as partial.
        w.process(seen("c", now));
        assert_eq!(stats.series_overflow.load(Relaxed), 0);
        assert_eq!(stats.evicted.load(Relaxed), 1);
        let out = aggregates(&mut rx);
        assert_eq!(
            (out.len(), out[0].series.as_str(), out[0].partial),
            (1, "a", true)
        );
        w.process(seen("d", now));
        assert_eq!(stats.evicted.load(Relaxed), 2);
        // c and d report: a flood of new ids cannot take their places.
        for i in 0..1000 {
            w.process(seen(&format!("junk-{i}"), now));
        }
        assert_eq!(stats.series_overflow.load(Relaxed), 1000);
        w.process(seen("c", now + 1));
        w.process(seen("d", now + 1));
        assert_eq!(stats.series.load(Relaxed), 2);
        // Idle past series_idle_ms: evicted by the tick, and not saved.
        w.tick(now + 6_000);
        assert_eq!(stats.series.load(Relaxed), 0);
        assert_eq!(stats.evicted.load(Relaxed), 4);
    }

    #[test]
    fn the_time_the_agent_was_down_does_not_count_as_idle() {
        let (w, _rx, stats) = worker(CHECKPOINTED);
        let mut w = w.with_series_idle(Duration::from_secs(5));
        let now = now_ms();
        // Last seen two hours ago, before a restart (as restored from a
        // checkpoint): idle only since this worker started.
        w.process(seen("a", now - 7_200_000));
        w.tick(now);
        assert_eq!(stats.series.load(Relaxed), 1);
        w.tick(now + 6_000);
        assert_eq!(stats.series.load(Relaxed), 0);
    }

    fn alerts(rx: &mut mpsc::Receiver<Record>) -> Vec<(String, &'static str, &'static str)> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            if let Record::Alert(a) = r {
                out.push((a.series, a.rule, a.state));
            }
        }
        out
    }

    #[test]
    fn a_series_that_falls_silent_raises_absent_once_and_clears_when_it_returns() {
        let (mut w, mut rx, _) = worker("[[rules]]\nmatch = \"*\"\nabsent_after_ms = 3000\n");
        let now = now_ms();
        w.process(seen("a", now));
        w.process(seen("b", now));
        w.tick(now + 2_999);
        assert_eq!(alerts(&mut rx), vec![]);
        w.process(seen("b", now + 2_999));
        w.tick(now + 3_000);
        assert_eq!(alerts(&mut rx), vec![("a".into(), "absent", "raised")]);
        // Once, however often the worker ticks.
        w.tick(now + 60_000);
        assert_eq!(alerts(&mut rx), vec![("b".into(), "absent", "raised")]);
        w.process(seen("a", now + 61_000));
        assert_eq!(alerts(&mut rx), vec![("a".into(), "absent", "cleared")]);
        w.tick(now + 61_100);
        assert_eq!(alerts(&mut rx), vec![]);
    }

    /// The checkpoint `w` sends.
    fn saved(w: &Worker, rx: &mut mpsc::Receiver<Record>) -> Vec<SeriesState> {
        w.save(0);
        loop {
            match rx.try_recv().unwrap() {
                Record::Checkpoint { worker: 0, state } => {
                    return checkpoint::decode(&state).unwrap();
                }
                _ => continue,
            }
        }
    }

    /// A source that reads the label `mac`, and a rule with every label
    /// sketch.
    const LABELLED: &str = "agent_id = \"t\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[sources.u.json]\nlabels = [\"mac\"]\n[output]\nconsole = true\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\ndistinct = \"mac\"\ntop_k = { label = \"mac\", k = 3 }\nfirst_seen = { label = \"mac\" }\nsample = { k = 5 }\nsketches = true\n";

    fn labelled_worker() -> (Worker, mpsc::Receiver<Record>) {
        let (w, _, rx, _) = worker_of(&Config::parse(LABELLED).unwrap(), 10);
        (w, rx)
    }

    fn with_mac(series: &str, ts: Timestamp, mac: Option<&str>) -> Reading {
        let labels = sluice_collectors::reading::Labels::new(Arc::from(vec!["mac".into()]), &[mac]);
        Reading {
            labels: Some(Box::new(labels.unwrap())),
            ..reading(series, ts, 1.0)
        }
    }

    #[test]
    fn a_machines_runs_are_sessions_closed_by_silence_through_a_restore() {
        const RULE: &str = "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"session\", gap_ms = 1000, max_ms = 60000, lateness_ms = 200 }\nquantiles = [0.5]\n";
        let (mut a, mut rx, _) = worker(RULE);
        // A run from 0 to 4,900 every 100 ms (saved half-way), silence,
        // then a run from 20,000 to 20,900.
        for t in (0..2_500).step_by(100) {
            a.process(reading("m", t, 1.0));
        }
        let state = saved(&a, &mut rx);
        let (mut b, mut rx, _) = worker(RULE);
        b.restore(state, &HashMap::new());
        for t in (2_500..5_000)
            .step_by(100)
            .chain((20_000..21_000).step_by(100))
        {
            b.process(reading("m", t, 2.0));
        }
        // The first run closed when event time passed 4,900 + 1,000 + 200.
        let got = aggregates(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].start, got[0].end, got[0].count), (0, 4_901, 50));
        assert_eq!(got[0].sum, 25.0 + 50.0);
        assert_eq!(
            got[0].extras().quantiles.as_ref().unwrap()["p50"].round(),
            1.0
        );
        // The second closes on the agent's clock once the series is quiet.
        b.tick(now_ms() + 10_000);
        let got = aggregates(&mut rx);
        assert_eq!(
            (got[0].start, got[0].end, got[0].count),
            (20_000, 20_901, 10)
        );
    }

    /// A worker of `rules` (TOML after BASE) whose table `sensors` is
    /// `csv`, and the rules it runs.
    fn worker_with_table(
        rules: &str,
        csv: &str,
    ) -> (
        Worker,
        Arc<Rules>,
        mpsc::Receiver<Record>,
        Arc<WorkerStats>,
        std::path::PathBuf,
    ) {
        let dir = std::env::temp_dir().join(format!(
            "sluice-worker-table-{}-{}",
            std::process::id(),
            sluice_core::hash::hash64(format!("{rules}{csv}").as_bytes(), 0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sensors.csv");
        std::fs::write(&path, csv).unwrap();
        let text = format!(
            "agent_id = \"t\"\nmax_series = 100\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[output]\nconsole = true\n[tables.sensors]\npath = {:?}\n{rules}",
            path.display().to_string()
        );
        let mut config = Config::parse(&text).unwrap();
        config.load_tables().unwrap();
        let (w, rules, rx, stats) = worker_of(&config, 100);
        (w, rules, rx, stats, path)
    }

    const TABLE_RULE: &str = "[[rules]]\nmatch = \"t-*\"\ntable = \"sensors\"\ncalibrate = true\nwindow = { kind = \"tumbling\", size_ms = 1000 }\nthresholds = [{ above = \"@max_temp\", clear_at = \"@clear_temp\" }]\n";

    #[test]
    fn each_series_alerts_at_its_rows_limit_and_its_records_carry_the_row() {
        let (mut w, _, mut rx, stats, _) = worker_with_table(
            TABLE_RULE,
            "series,site,max_temp,clear_temp,scale,offset\nt-1,north,50,45,,\nt-2,south,80,,,\nt-3,south,30,,0.5,10\n",
        );
        // Each at 60: over t-1's 50, under t-2's 80; t-3 reads 60 × 0.5 +
        // 10 = 40, over its 30. t-9 has no row: no threshold ("pass").
        for (i, series) in ["t-1", "t-2", "t-3", "t-9"].iter().enumerate() {
            w.process(reading(series, i as Timestamp, 60.0));
        }
        let mut raised = Vec::new();
        let mut aggs = Vec::new();
        for s in ["t-1", "t-2", "t-3", "t-9"] {
            w.process(reading(s, 1_000, 0.0));
        }
        while let Ok(r) = rx.try_recv() {
            match r {
                Record::Alert(e) if e.state == "raised" => {
                    raised.push((e.series, e.value, e.threshold))
                }
                Record::Aggregate(a) => aggs.push(a),
                _ => {}
            }
        }
        assert_eq!(
            raised,
            [
                ("t-1".to_string(), 60.0, 50.0),
                ("t-3".to_string(), 40.0, 30.0)
            ]
        );
        let of = |s: &str| aggs.iter().find(|a| a.series == s).unwrap();
        assert_eq!(of("t-3").sum, 40.0);
        assert_eq!(of("t-1").table.as_ref().unwrap()["site"], "north");
        assert!(of("t-9").table.is_none());
        assert_eq!(stats.table_unmatched.load(Relaxed), 0);
    }

    #[test]
    fn a_series_without_a_row_is_refused_or_takes_the_default_row() {
        let refuse = TABLE_RULE.replace("calibrate = true", "on_missing = \"refuse\"");
        let (mut w, _, mut rx, stats, _) =
            worker_with_table(&refuse, "series,max_temp,clear_temp\nt-1,50,\n");
        w.process(reading("t-9", 0, 99.0));
        w.process(reading("t-9", 10, 99.0));
        assert_eq!(stats.table_unmatched.load(Relaxed), 2);
        assert_eq!(stats.series.load(Relaxed), 0);
        assert!(rx.try_recv().is_err());
        let default = TABLE_RULE.replace("calibrate = true", "on_missing = \"default\"");
        let (mut w, _, mut rx, _, _) =
            worker_with_table(&default, "series,max_temp,clear_temp\nt-1,50,\n*,90,\n");
        w.process(reading("t-9", 0, 95.0));
        let Ok(Record::Alert(e)) = rx.try_recv() else {
            panic!("no alert at the default row's limit");
        };
        assert_eq!((e.series.as_str(), e.threshold), ("t-9", 90.0));
    }

    #[test]
    fn an_edited_table_changes_limits_and_keeps_windows() {
        let (mut w, _, mut rx, _, path) =
            worker_with_table(TABLE_RULE, "series,max_temp,clear_temp\nt-1,50,\n");
        w.process(reading("t-1", 0, 40.0));
        // The table now says 30: the same window goes on, and 40 is over.
        std::fs::write(&path, "series,max_temp,clear_temp\nt-1,30,\n").unwrap();
        let mut config = Config::parse(&format!(
            "agent_id = \"t\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[output]\nconsole = true\n[tables.sensors]\npath = {:?}\n{TABLE_RULE}",
            path.display().to_string()
        ))
        .unwrap();
        config.load_tables().unwrap();
        w.reload(Arc::new(Rules::of(&config).unwrap()));
        w.process(reading("t-1", 10, 40.0));
        w.process(reading("t-1", 1_000, 0.0));
        let mut raised = 0;
        let mut counts = Vec::new();
        while let Ok(r) = rx.try_recv() {
            match r {
                Record::Alert(e) if e.state == "raised" => raised += 1,
                Record::Aggregate(a) => counts.push(a.count),
                _ => {}
            }
        }
        assert_eq!((raised, counts), (1, vec![2]));
    }

    #[test]
    fn a_table_the_rules_cannot_use_is_refused_with_its_line() {
        for (rule, csv, says) in [
            (
                TABLE_RULE.to_string(),
                "series,max\nt-1,1\n",
                "rules[0].thresholds[0].above: table \"sensors\" has no column \"max_temp\"",
            ),
            (
                TABLE_RULE.to_string(),
                "series,max_temp,clear_temp\nt-1,50,60\n",
                "tables.sensors line 2 (t-1): rules[0].thresholds[0]: ",
            ),
            (
                TABLE_RULE.to_string(),
                "series,max_temp,clear_temp,scale\nt-1,50,,big\n",
                "tables.sensors line 2 (t-1): rules[0].calibrate: scale \"big\" is not a number",
            ),
            (
                TABLE_RULE.replace("calibrate = true", "on_missing = \"default\""),
                "series,max_temp,clear_temp\nt-1,50,\n",
                "rules[0].on_missing: \"default\" takes the row whose key is \"*\"",
            ),
        ] {
            let dir = std::env::temp_dir().join(format!(
                "sluice-bad-table-{}-{}",
                std::process::id(),
                sluice_core::hash::hash64(format!("{rule}{csv}").as_bytes(), 0)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("sensors.csv");
            std::fs::write(&path, csv).unwrap();
            let mut config = Config::parse(&format!(
                "agent_id = \"t\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[output]\nconsole = true\n[tables.sensors]\npath = {:?}\n{rule}",
                path.display().to_string()
            ))
            .unwrap();
            let err = config.load_tables().unwrap_err().to_string();
            assert!(err.contains(says), "{csv:?}: {err}");
        }
        for (rule, says) in [
            (
                "[[rules]]\nmatch = \"*\"\nthresholds = [{ above = \"@max\" }]\n",
                "rules[0].thresholds[0].above: \"@max\" reads a column of the rule's table: set table too",
            ),
            (
                "[[rules]]\nmatch = \"*\"\ncalibrate = true\nthresholds = [{ above = 1.0 }]\n",
                "rules[0].calibrate: takes scale and offset from the rule's table: set table too",
            ),
            (
                "[[rules]]\nmatch = \"*\"\ntable = \"x\"\nthresholds = [{ above = 1.0 }]\n",
                "rules[0].table: no [tables.x] in this file",
            ),
            (
                "[[rules]]\nmatch = \"*\"\nthresholds = [{ above = \"max\" }]\n",
                "rules[0].thresholds[0].above: \"max\": a number, or \"@column\"",
            ),
        ] {
            let err = Config::parse(&format!("{BASE}{rule}"))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(says), "{rule}: {err}");
        }
    }

    /// A source that reads the label `site`, a rule grouping by it and one
    /// grouping all its series.
    const GROUPED: &str = "agent_id = \"t\"\nmax_series = 10\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[sources.u.json]\nlabels = [\"site\"]\n[output]\nconsole = true\n[[rules]]\nmatch = \"s-*\"\ngroup_by = \"site\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\nquantiles = [0.5]\nthresholds = [{ above = 100.0 }]\n[[rules]]\nmatch = \"p-*\"\ngroup_by = \"*\"\ngroup_name = \"pumps\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n";

    fn grouped_worker() -> (Worker, Arc<Rules>, mpsc::Receiver<Record>) {
        let (w, rules, rx, _) = worker_of(&Config::parse(GROUPED).unwrap(), 10);
        (w, rules, rx)
    }

    /// A reading of `series` at `site`, routed as a source's hand-off does.
    fn at_site(
        rules: &Rules,
        series: &str,
        ts: Timestamp,
        value: f64,
        site: Option<&str>,
    ) -> Reading {
        let labels =
            sluice_collectors::reading::Labels::new(Arc::from(vec!["site".into()]), &[site]);
        let mut r = Reading {
            labels: Some(Box::new(labels.unwrap())),
            ..reading(series, ts, value)
        };
        rules.route(&mut r, &Default::default());
        r
    }

    #[test]
    fn a_groups_readings_make_one_record_per_window_and_its_alerts_name_it() {
        let (mut w, rules, mut rx) = grouped_worker();
        for (series, ts, value, site) in [
            ("s-1", 10, 1.0, Some("a")),
            ("s-1", 20, 2.0, Some("a")),
            ("s-2", 30, 3.0, Some("a")),
            ("s-3", 40, 10.0, Some("b")),
            ("s-4", 50, 5.0, None),
            ("s-3", 60, 150.0, Some("b")),
            ("p-1", 70, 1.0, Some("a")),
            ("p-2", 80, 2.0, None),
            ("other", 90, 1.0, Some("a")),
        ] {
            w.process(at_site(&rules, series, ts, value, site));
        }
        // Readings of the next window close each group's first.
        for site in [Some("a"), Some("b"), None] {
            w.process(at_site(&rules, "s-9", 1_000, 0.0, site));
        }
        w.process(at_site(&rules, "p-9", 1_000, 0.0, None));
        let mut got = std::collections::BTreeMap::new();
        let mut alerts = Vec::new();
        while let Ok(r) = rx.try_recv() {
            match r {
                Record::Aggregate(a) if a.start == 0 => {
                    let group = a.group.as_ref().map(|g| (g.by.clone(), g.value.clone()));
                    got.insert(a.series.clone(), (a.count, a.sum, group));
                }
                Record::Alert(e) => alerts.push((e.series, e.state, e.value)),
                _ => {}
            }
        }
        let site = |v: Option<&str>| Some(("site".to_string(), v.map(str::to_string)));
        assert_eq!(got["s-*:a"], (3, 6.0, site(Some("a"))));
        assert_eq!(got["s-*:b"], (2, 160.0, site(Some("b"))));
        // Without the label: the group of the rule's name alone.
        assert_eq!(got["s-*"], (1, 5.0, site(None)));
        assert_eq!(got["pumps"], (2, 3.0, Some(("*".to_string(), None))));
        // A series no rule matches stays on its own, unmatched.
        assert!(!got.contains_key("other"));
        assert_eq!(got.len(), 4);
        // Any member's reading drives the group's detectors.
        assert_eq!(
            alerts,
            [
                ("s-*:b".to_string(), "raised", 150.0),
                ("s-*:b".to_string(), "cleared", 0.0)
            ]
        );
    }

    #[test]
    fn a_group_is_checkpointed_and_restored_like_a_series() {
        let (mut a, rules, mut rx) = grouped_worker();
        a.process(at_site(&rules, "s-1", 10, 1.0, Some("a")));
        a.process(at_site(&rules, "s-2", 20, 2.0, Some("a")));
        let state = saved(&a, &mut rx);
        assert_eq!(state.len(), 1);
        assert_eq!(state[0].series, "s-*:a");
        let (mut b, rules, mut rx) = grouped_worker();
        b.restore(state, &HashMap::new());
        b.process(at_site(&rules, "s-3", 30, 3.0, Some("a")));
        b.process(at_site(&rules, "s-3", 1_000, 0.0, Some("a")));
        let got = aggregates(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].series.as_str(), got[0].count, got[0].sum),
            ("s-*:a", 3, 6.0)
        );
    }

    #[test]
    fn group_settings_are_checked_with_the_key() {
        let rule = |extra: &str| {
            format!(
                "{BASE}[[rules]]\nmatch = \"s-*\"\nwindow = {{ kind = \"tumbling\", size_ms = 1000 }}\n{extra}"
            )
        };
        for (extra, says) in [
            (
                "group_by = \"site\"\n",
                "rules[0].group_by: no source reads the label \"site\"",
            ),
            ("group_by = \"\"\n", "rules[0].group_by: name a label"),
            (
                "group_name = \"x\"\n",
                "rules[0].group_name: names the groups of group_by: set group_by too",
            ),
            (
                "group_by = \"*\"\ngroup_name = \"a:b\"\n",
                "rules[0].group_name: \"a:b\" cannot name the rule's groups",
            ),
            (
                "group_by = \"*\"\nrate_of_change = { per_second_above = 1.0 }\n",
                "rules[0].rate_of_change: compares a series' consecutive readings",
            ),
        ] {
            let err = Config::parse(&rule(extra)).err().unwrap().to_string();
            assert!(err.contains(says), "{extra}: {err}");
        }
        let long = format!(
            "{BASE}[[rules]]\nmatch = \"{}*\"\ngroup_by = \"*\"\nwindow = {{ kind = \"count\", size = 10 }}\n",
            "x".repeat(40)
        );
        let err = Config::parse(&long).err().unwrap().to_string();
        assert!(
            err.contains("rules[0].match: ") && err.contains("(set group_name)"),
            "{err}"
        );
        let twice = format!(
            "{BASE}[[rules]]\nmatch = \"a*\"\ngroup_by = \"*\"\ngroup_name = \"g\"\nwindow = {{ kind = \"count\", size = 10 }}\n[[rules]]\nmatch = \"b*\"\ngroup_by = \"*\"\ngroup_name = \"g\"\nwindow = {{ kind = \"count\", size = 10 }}\n"
        );
        let err = Config::parse(&twice).err().unwrap().to_string();
        assert!(
            err.contains("rules[1].group_name: rules[0] already names its groups \"g\""),
            "{err}"
        );
    }

    #[test]
    fn frequency_counts_the_named_values_within_the_bound_through_a_restore() {
        const RULE: &str = "agent_id = \"t\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[sources.u.json]\nlabels = [\"mac\"]\n[output]\nconsole = true\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 100000 }\nfrequency = { label = \"mac\", epsilon = 0.01, delta = 0.01, values = [\"m-0\", \"m-7\", \"never\"] }\nsketches = true\n";
        let make = || {
            let (w, _, rx, _) = worker_of(&Config::parse(RULE).unwrap(), 10);
            (w, rx)
        };
        // Device i sends 1000 / (i + 1) readings, interleaved; ten readings
        // carry no label.
        let mut stream = Vec::new();
        for i in 0..200usize {
            stream.extend(std::iter::repeat_n(Some(format!("m-{i}")), 1000 / (i + 1)));
        }
        stream.extend(std::iter::repeat_n(None, 10));
        let mut rng = sluice_core::rng::SplitMix64::new(9);
        for i in (1..stream.len()).rev() {
            stream.swap(i, rng.next_u64() as usize % (i + 1));
        }
        let (mut a, mut rx) = make();
        let half = stream.len() / 2;
        for (t, mac) in stream[..half].iter().enumerate() {
            a.process(with_mac("gw", t as Timestamp, mac.as_deref()));
        }
        let state = saved(&a, &mut rx);
        let (mut b, mut rx) = make();
        b.restore(state, &HashMap::new());
        for (t, mac) in stream[half..].iter().enumerate() {
            b.process(with_mac("gw", (half + t) as Timestamp, mac.as_deref()));
        }
        b.process(with_mac("gw", 200_000, None));
        let got = aggregates(&mut rx);
        let f = got[0].extras().frequency.as_ref().unwrap();
        let labelled = (stream.len() - 10) as u64;
        assert_eq!((f.total, f.without_label), (labelled, 10));
        assert!((f.bound - f.epsilon * labelled as f64).abs() < 1e-6);
        let truth = |v: &str| stream.iter().filter(|m| m.as_deref() == Some(v)).count() as u64;
        assert_eq!(f.values.len(), 3);
        for fv in &f.values {
            let t = truth(&fv.value);
            assert!(
                t <= fv.count && fv.count as f64 <= t as f64 + f.bound,
                "{fv:?} vs {t}"
            );
        }
        assert_eq!(f.values[0].value, "m-0");
        assert!(f.sketch.is_some());
    }

    /// 500 devices in one window (three of them heavy), ten readings
    /// without the label.
    fn ble_window(w: &mut Worker, from: usize, to: usize) {
        for i in from..to {
            let mac = match i {
                0..500 => format!("m-{i}"),
                500..550 => "m-0".into(),
                550..580 => "m-1".into(),
                580..600 => "m-2".into(),
                _ => {
                    w.process(with_mac("gw", i as Timestamp, None));
                    continue;
                }
            };
            w.process(with_mac("gw", i as Timestamp, Some(&mac)));
        }
    }

    fn first_seen(rx: &mut mpsc::Receiver<Record>) -> (Vec<String>, Vec<AggregateRecord>) {
        let (mut seen, mut aggregates) = (Vec::new(), Vec::new());
        while let Ok(r) = rx.try_recv() {
            match r {
                Record::Alert(e) => {
                    assert_eq!((e.rule, e.state), ("first_seen", "seen"));
                    seen.push(e.label.unwrap().value);
                }
                Record::Aggregate(a) => aggregates.push(*a),
                _ => {}
            }
        }
        (seen, aggregates)
    }

    #[test]
    fn label_sketches_count_distinct_values_top_values_first_sightings_and_sample() {
        let (mut w, mut rx) = labelled_worker();
        ble_window(&mut w, 0, 610);
        // The next window: one known device and one new one.
        w.process(with_mac("gw", 1_000, Some("m-7")));
        w.process(with_mac("gw", 1_001, Some("m-new")));
        let (seen, got) = first_seen(&mut rx);
        // Each device once, the first time only.
        let mut expected: Vec<String> = (0..500).map(|i| format!("m-{i}")).collect();
        expected.push("m-new".into());
        assert_eq!(seen, expected);
        assert_eq!(got.len(), 1);
        let a = &got[0];
        assert_eq!(a.count, 610);
        let d = a.extras().distinct.as_deref().unwrap();
        assert_eq!((d.label.as_str(), d.without_label), ("mac", 10));
        assert!((d.estimate - 500.0).abs() <= 500.0 * 4.0 * d.rse, "{d:?}");
        assert!(d.low <= 500.0 && 500.0 <= d.high, "{d:?}");
        // The sketch is the DataSketches HLL the estimate came from.
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d.sketch.as_ref().unwrap())
            .unwrap();
        let h = sluice_core::sketch::HyperLogLog::read_from(
            &bytes,
            vec![0u8; sluice_core::sketch::hll::storage_bytes(4096)],
        )
        .unwrap();
        assert_eq!(h.estimate(), d.estimate);
        let top = a.extras().top_k.as_deref().unwrap();
        let names: Vec<&str> = top.values.iter().map(|v| v.value.as_str()).collect();
        assert_eq!(names, ["m-0", "m-1", "m-2"]);
        for (v, truth) in top.values.iter().zip([51, 31, 21]) {
            assert!(v.count - v.overcount <= truth && truth <= v.count, "{v:?}");
        }
        assert_eq!(top.without_label, 10);
        let sample = a.extras().sample.as_ref().unwrap();
        assert_eq!(sample.len(), 5);
        assert!(sample.windows(2).all(|p| p[0].ts <= p[1].ts));
        assert!(sample.iter().all(|r| (0..610).contains(&r.ts)));
    }

    #[test]
    fn label_sketches_and_first_seen_go_on_after_a_checkpoint() {
        // Uninterrupted.
        let (mut a, mut rx_a) = labelled_worker();
        ble_window(&mut a, 0, 610);
        a.process(with_mac("gw", 1_000, Some("m-3")));
        let (_, whole) = first_seen(&mut rx_a);
        // Saved half-way, restored into another worker.
        let (mut b, mut rx_b) = labelled_worker();
        ble_window(&mut b, 0, 300);
        let (seen_before, _) = first_seen(&mut rx_b);
        let state = saved(&b, &mut rx_b);
        assert!(state[0].labels.is_some());
        let (mut c, mut rx_c) = labelled_worker();
        c.restore(state, &HashMap::new());
        ble_window(&mut c, 300, 610);
        c.process(with_mac("gw", 1_000, Some("m-3")));
        let (seen_after, resumed) = first_seen(&mut rx_c);
        // Every device reported once across the restart.
        assert_eq!(seen_before.len() + seen_after.len(), 500);
        assert!(seen_after.iter().all(|m| !seen_before.contains(m)));
        let (x, y) = (&whole[0], &resumed[0]);
        assert_eq!(x.count, y.count);
        assert_eq!(x.extras().distinct, y.extras().distinct);
        assert_eq!(x.extras().top_k, y.extras().top_k);
    }

    #[test]
    fn a_flood_of_new_values_raises_at_most_capacity_first_seen_alerts() {
        let config = Config::parse(&LABELLED.replace(
            "first_seen = { label = \"mac\" }",
            "first_seen = { label = \"mac\", capacity = 100 }",
        ))
        .unwrap();
        let rules = Arc::new(Rules::compile(&config.rules).unwrap());
        let (tx, mut rx) = mpsc::channel(4096);
        let stats = Arc::new(WorkerStats::default());
        let mut w = Worker::new(
            "t".into(),
            rules,
            Arc::new(RulesSlot::default()),
            10,
            tx,
            stats.clone(),
        );
        for i in 0..1_000 {
            w.process(with_mac("gw", i, Some(&format!("flood-{i}"))));
        }
        let (seen, _) = first_seen(&mut rx);
        // The filter's capacity bounds the alerts (a few of the first 100
        // may look seen: fpr); the rest are counted, not raised.
        assert!((90..=100).contains(&seen.len()), "{}", seen.len());
        assert!(
            seen.iter()
                .all(|m| m["flood-".len()..].parse::<u32>().unwrap() < 110)
        );
        // Past its capacity the filter still tells some new values apart:
        // those are counted.
        let over = stats.first_seen_over_capacity.load(Relaxed);
        assert!(over > 100, "{over}");
    }

    const CHECKPOINTED: &str = "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\nquantiles = [0.5]\nanomaly = { alpha = 0.1, k = 4.0, warmup = 50 }\n";

    #[test]
    fn a_quiet_series_window_closes_after_the_grace_not_before() {
        let (mut w, mut rx, stats) =
            worker("[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n");
        // Readings stamped 0 and 490, each arriving 1 ms later (ingest).
        for ts in [0, 490] {
            w.process(Reading {
                ingest: 10_000 + ts + 1,
                ..reading("s", ts, 1.0)
            });
        }
        // On the agent's clock the series is past the window's end (at
        // 10,000 + 1,001), but not by the grace: the window stays open...
        w.tick(10_000 + 1_001 + IDLE_GRACE - 1);
        assert!(aggregates(&mut rx).is_empty());
        // ... for a reading stamped 995 that took 30 ms, not 1, to arrive.
        w.process(Reading {
            ingest: 10_000 + 995 + 30,
            ..reading("s", 995, 1.0)
        });
        assert_eq!(stats.late.load(Relaxed), 0);
        // Once quiet beyond the grace, the window closes with all three.
        w.tick(10_000 + 995 + 30 + 5 + IDLE_GRACE);
        let got = aggregates(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].start, got[0].end, got[0].count), (0, 1000, 3));
        assert!(!got[0].partial);
    }

    #[test]
    fn the_borrowed_encoding_is_the_owned_one() {
        let (mut w, _rx, _) = worker(CHECKPOINTED);
        for i in 0..60 {
            w.process(reading("a", i * 5, 10.0 + (i % 3) as f64));
            w.process(reading("b", i * 7, -(i as f64)));
        }
        let bytes = w.checkpoint();
        let owned = checkpoint::decode(&bytes).unwrap();
        assert_eq!(owned.len(), 2);
        assert!(
            owned
                .iter()
                .all(|s| s.windows.as_ref().unwrap().quantiles.is_some())
        );
        assert_eq!(
            checkpoint::encode(checkpoint::Decoded {
                series: owned,
                ..Default::default()
            }),
            bytes
        );
    }

    #[test]
    fn a_restored_worker_goes_on_with_its_windows_and_baselines() {
        let (mut a, mut rx, _) = worker(CHECKPOINTED);
        for i in 0..100 {
            a.process(reading("s", i * 5, 10.0 + (i % 3) as f64));
        }
        let state = saved(&a, &mut rx);
        assert!(aggregates(&mut rx).is_empty());
        let (mut b, mut rx, stats) = worker(CHECKPOINTED);
        b.restore(state, &HashMap::new());
        assert_eq!(stats.restored.load(Relaxed), 1);
        // The baseline is warm (the warm-up is 50 readings): a spike right
        // away is an alert.
        b.process(reading("s", 500, 100.0));
        // The window goes on: 100 + 1 + 99 readings in [0, 1000).
        for i in 101..200 {
            b.process(reading("s", i * 5, 10.0 + (i % 3) as f64));
        }
        b.process(reading("s", 1_000, 10.0));
        let mut alerts = 0;
        let mut got = Vec::new();
        while let Ok(r) = rx.try_recv() {
            match r {
                Record::Alert(e) if e.state == "raised" => alerts += 1,
                Record::Aggregate(a) => got.push(a),
                _ => {}
            }
        }
        assert_eq!(alerts, 1);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].start, got[0].end, got[0].count), (0, 1000, 200));
        assert!((got[0].extras().quantiles.as_ref().unwrap()["p50"] - 11.0).abs() < 0.2);
    }

    #[test]
    fn a_window_emitted_after_the_checkpoint_is_not_emitted_again() {
        let (mut a, mut rx, _) = worker(CHECKPOINTED);
        a.process(reading("s", 10, 1.0));
        let state = saved(&a, &mut rx);
        // After the checkpoint, [0, 1000) closed and its record committed
        // (the mark says so); then a crash.
        let marks = HashMap::from([("s".to_string(), 1000)]);
        let (mut b, mut rx, _) = worker(CHECKPOINTED);
        b.restore(state.clone(), &marks);
        b.process(reading("s", 1_500, 1.0));
        b.process(reading("s", 2_000, 1.0));
        let got = aggregates(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].start, got[0].count), (1000, 1));
        // Without the mark the restored window closes as saved.
        let (mut c, mut rx, _) = worker(CHECKPOINTED);
        c.restore(state, &HashMap::new());
        c.process(reading("s", 1_500, 1.0));
        assert_eq!(aggregates(&mut rx)[0].count, 1);
    }

    #[test]
    fn state_of_a_changed_rule_starts_afresh() {
        let (mut a, mut rx, _) = worker(CHECKPOINTED);
        a.process(reading("s", 10, 1.0));
        let state = saved(&a, &mut rx);
        let (mut b, mut rx, _) = worker(&CHECKPOINTED.replace("1000", "2000"));
        b.restore(state, &HashMap::new());
        b.process(reading("s", 20, 1.0));
        b.process(reading("s", 2_000, 1.0));
        let got = aggregates(&mut rx);
        assert_eq!((got[0].start, got[0].end, got[0].count), (0, 2000, 1));
    }

    #[test]
    fn a_decaying_window_reports_its_statistics_each_period() {
        let (mut w, mut rx, _) = worker(
            "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"decaying\", half_life = 1.0, every_ms = 1000 }\n",
        );
        w.process(reading("a", 100, 4.0));
        w.process(reading("a", 200, 2.0));
        w.process(reading("a", 1_100, 9.0));
        let got = aggregates(&mut rx);
        assert_eq!(got.len(), 1);
        let d = got[0].extras().decaying.unwrap();
        // λ = 0.5: S = 2 + 0.5·4 = 4, W = 1.5, mean = 8/3.
        assert_eq!((got[0].start, got[0].end, got[0].count), (0, 1000, 2));
        assert!((d.mean - 8.0 / 3.0).abs() < 1e-12 && (d.sum - 4.0).abs() < 1e-12);
    }

    #[test]
    fn a_quantile_among_collapsed_values_is_marked_in_the_record() {
        // The sketch's buckets cover a factor of about 13 at 1 %: over
        // 1..=100 the lowest values are folded together, so p5 is only an
        // upper bound, while p50 keeps its 1 %.
        let (mut w, mut rx, _) = worker(
            "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\nquantiles = [0.05, 0.5]\n",
        );
        for i in 0..100 {
            w.process(reading("a", i, f64::from(i as u32 + 1)));
        }
        w.process(reading("a", 1_000, 0.0));
        let got = aggregates(&mut rx);
        assert_eq!(got[0].extras().quantiles_collapsed, vec!["p5".to_string()]);
        let q = got[0].extras().quantiles.as_ref().unwrap();
        assert!(q["p5"] >= 5.0, "an upper bound: {q:?}");
        assert!((q["p50"] - 50.0).abs() <= 0.5 + 0.01 * 50.0, "{q:?}");
    }

    #[test]
    fn quantiles_sized_by_the_rules_range_are_accurate_across_it_and_after_a_restore() {
        // Values log-uniform over six decades: the default sketch covers a
        // factor of about 13, so low quantiles would collapse; sized by
        // `range`, each is within the rule's accuracy, through a hopping
        // window's panes and a checkpoint restore.
        const RULE: &str = "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"hopping\", size_ms = 2000, slide_ms = 1000, lateness_ms = 500 }\nquantiles = { at = [0.01, 0.1, 0.5, 0.99], accuracy = 0.02, range = [0.01, 10000.0] }\n";
        let value = |i: u32| 0.01 * 10f64.powf(6.0 * f64::from(i % 1000) / 999.0);
        let (mut a, mut rx, _) = worker(RULE);
        for i in 0..1000u32 {
            a.process(reading("s", i64::from(i), value(i)));
        }
        let state = saved(&a, &mut rx);
        let (mut b, mut rx, _) = worker(RULE);
        b.restore(state, &HashMap::new());
        for i in 1000..2000u32 {
            b.process(reading("s", i64::from(i), value(i)));
        }
        b.process(reading("s", 2_600, 1.0));
        let got = aggregates(&mut rx);
        let whole = got.iter().find(|a| (a.start, a.end) == (0, 2000)).unwrap();
        assert_eq!(whole.count, 2000);
        assert!(
            whole.extras().quantiles_collapsed.is_empty(),
            "{:?}",
            whole.extras().quantiles_collapsed
        );
        let mut values: Vec<f64> = (0..2000).map(value).collect();
        values.sort_by(f64::total_cmp);
        let q = whole.extras().quantiles.as_ref().unwrap();
        for (name, at) in [("p1", 0.01), ("p10", 0.1), ("p50", 0.5), ("p99", 0.99)] {
            // DDSketch's rank: the value of rank floor(q·(n−1)).
            let exact = values[(at * 1999.0) as usize];
            assert!(
                (q[name] - exact).abs() <= 0.02 * exact,
                "{name}: {} vs {exact}",
                q[name]
            );
        }
    }

    #[test]
    fn kll_quantiles_keep_their_rank_over_any_range_and_python_datasketches_reads_them() {
        // Six decades of values (where the default DDSketch collapses the
        // low ones): KLL keeps each quantile's rank within its error, and
        // the record's sketch reads in Apache DataSketches' Python library
        // to the same quantiles (at ranks that fall between retained
        // items' cumulative weights, where implementations may round an
        // exact tie either way). Through a checkpoint restore.
        const RULE: &str = "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 100000, lateness_ms = 1000 }\nquantiles = { at = [0.01234, 0.50001, 0.98767], method = \"kll\" }\nsketches = true\n";
        let mut rng = sluice_core::rng::SplitMix64::new(3);
        let values: Vec<f64> = (0..20_000)
            .map(|_| 10f64.powf(6.0 * rng.next_f64() - 3.0))
            .collect();
        let (mut a, mut rx, _) = worker(RULE);
        for (i, &v) in values[..10_000].iter().enumerate() {
            a.process(reading("s", i as i64, v));
        }
        let state = saved(&a, &mut rx);
        let (mut b, mut rx, _) = worker(RULE);
        b.restore(state, &HashMap::new());
        for (i, &v) in values[10_000..].iter().enumerate() {
            b.process(reading("s", 10_000 + i as i64, v));
        }
        b.process(reading("s", 200_000, 1.0));
        let got = aggregates(&mut rx);
        assert_eq!(got[0].count, 20_000);
        assert!(got[0].extras().quantiles_collapsed.is_empty());
        let eps = got[0].extras().quantiles_rank_error.unwrap();
        assert!((0.01..0.02).contains(&eps), "{eps}");
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let q = got[0].extras().quantiles.as_ref().unwrap();
        for (name, level) in [
            ("p1.234", 0.01234),
            ("p50.001", 0.50001),
            ("p98.767", 0.98767),
        ] {
            let rank = sorted.partition_point(|&v| v <= q[name]) as f64 / 20_000.0;
            assert!(
                (rank - level).abs() <= eps,
                "{name}: {} at rank {rank}",
                q[name]
            );
        }
        let sketch = got[0].extras().quantile_sketch.as_ref().unwrap();
        let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = "import base64, sys\nfrom datasketches import kll_doubles_sketch\ns = kll_doubles_sketch.deserialize(base64.b64decode(sys.argv[1]))\nprint(s.n, *(repr(s.get_quantile(r)) for r in (0.01234, 0.50001, 0.98767)))\n";
        let out = std::process::Command::new(&python)
            .args(["-c", script, sketch])
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e}"));
        assert!(
            out.status.success(),
            "{python} with the datasketches package (bash .ci/test installs it; SLUICE_PYTHON names its python): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let fields: Vec<&str> = printed.split_whitespace().collect();
        assert_eq!(fields[0], "20000");
        for (field, name) in fields[1..].iter().zip(["p1.234", "p50.001", "p98.767"]) {
            assert_eq!(field.parse::<f64>().unwrap(), q[name], "{name}: {printed}");
        }
    }

    #[test]
    fn a_quantile_range_the_buckets_cannot_cover_is_refused_with_the_key() {
        for (quantiles, says) in [
            (
                "{ at = [0.5], range = [1e-9, 1e9] }",
                "quantiles.range: covering [0.000000001, 1000000000] within 0.01 takes 2074 buckets a sign, more than 2048",
            ),
            (
                "{ at = [0.5], range = [10.0, 1.0] }",
                "quantiles.range: [10, 1] must be two magnitudes 0 < lo < hi",
            ),
            (
                "{ at = [0.5], accuracy = 0.9 }",
                "quantiles.accuracy: 0.9 must be from 0.0001 to 0.5",
            ),
        ] {
            let toml = format!(
                "{BASE}[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"tumbling\", size_ms = 1000 }}\nquantiles = {quantiles}\n"
            );
            let err = Config::parse(&toml).err().unwrap().to_string();
            assert!(err.contains(says), "{quantiles}: {err}");
        }
    }

    #[test]
    fn quantiles_are_reported_and_the_series_table_is_capped() {
        let (mut w, mut rx, stats) = worker(
            "[[rules]]\nmatch = \"s-*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\nquantiles = [0.5, 0.999]\n",
        );
        for i in 0..100 {
            w.process(reading("s-1", i, f64::from(i as u32 + 1)));
        }
        w.process(reading("s-1", 1_000, 0.0));
        let got = aggregates(&mut rx);
        let q = got[0].extras().quantiles.as_ref().unwrap();
        assert!((q["p50"] - 50.0).abs() <= 0.5 + 0.01 * 50.0, "{q:?}");
        // Rank 0.999 · 99 falls on the 99th value.
        assert!((q["p99.9"] - 99.0).abs() <= 0.01 * 99.0, "{q:?}");
        // max_series = 2: a third series is refused; an unmatched one is counted.
        w.process(reading("s-2", 0, 1.0));
        w.process(reading("s-3", 0, 1.0));
        w.process(reading("other", 0, 1.0));
        assert_eq!(stats.series_overflow.load(Relaxed), 2);
        assert_eq!(stats.series.load(Relaxed), 2);
        w.flush();
        let partial = aggregates(&mut rx);
        assert!(partial.iter().all(|a| a.partial));
        assert_eq!(partial.len(), 2);
    }

    const DELTA: &str = "[[rules]]\nmatch = \"boiler/delta\"\nwindow = { kind = \"tumbling\", size_ms = 10000 }\n[[derived]]\nname = \"boiler/delta\"\na = \"boiler/inlet\"\nb = \"boiler/outlet\"\nexpr = \"a - b\"\nwindow_ms = 1000\nlateness_ms = 500\n";

    #[test]
    fn a_derived_series_takes_expr_of_its_inputs_means_per_aligned_window() {
        let (mut w, mut rx, stats) = worker(DELTA);
        // Ten seconds: inlet 2 readings a second, outlet 1; second 3 has no
        // outlet, second 7's inlet arrives late within the lateness.
        let mut want = (0u64, 0.0f64);
        for sec in 0..10i64 {
            let t = sec * 1000;
            let inlet = [50.0 + sec as f64, 52.0 + sec as f64];
            if sec != 7 {
                w.process(reading("boiler/inlet", t + 100, inlet[0]));
            }
            if sec == 8 {
                // Second 7's inlet, after 8.1 s: out of order, within the lateness.
                w.process(reading("boiler/inlet", 7_100, 57.0));
                w.process(reading("boiler/inlet", 7_600, 59.0));
            }
            if sec != 7 {
                w.process(reading("boiler/inlet", t + 600, inlet[1]));
            }
            if sec != 3 {
                w.process(reading("boiler/outlet", t + 300, 40.0));
                want.0 += 1;
                want.1 += (inlet[0] + inlet[1]) / 2.0 - 40.0;
            }
        }
        // Closes the last join window, then the derived series' window.
        w.process(reading("boiler/outlet", 10_600, 40.0));
        w.process(reading("boiler/outlet", 20_600, 40.0));
        w.process(reading("boiler/inlet", 20_600, 40.0));
        w.process(reading("boiler/outlet", 22_000, 40.0));
        let got = aggregates(&mut rx);
        let delta: Vec<_> = got.iter().filter(|a| a.series == "boiler/delta").collect();
        assert_eq!(delta.len(), 1, "{got:?}");
        assert_eq!((delta[0].count, delta[0].start), (want.0, 0));
        assert!(
            (delta[0].sum - want.1).abs() < 1e-9,
            "{} vs {}",
            delta[0].sum,
            want.1
        );
        assert_eq!(stats.join_pairs.load(Relaxed), 10);
        // Second 3 (no outlet), second 10 (no inlet); second 20 paired.
        assert_eq!(stats.join_missing_b.load(Relaxed), 1);
        assert_eq!(stats.join_missing_a.load(Relaxed), 1);
        // Far too late now.
        w.process(reading("boiler/outlet", 5_000, 40.0));
        assert_eq!(stats.join_late.load(Relaxed), 1);
    }

    #[test]
    fn a_join_checkpointed_mid_window_goes_on_after_a_restore() {
        let inputs: Vec<Reading> = (0..10i64)
            .flat_map(|sec| {
                let t = sec * 1000;
                [
                    reading("boiler/inlet", t + 100, 50.0 + sec as f64),
                    reading("boiler/inlet", t + 600, 52.0),
                    reading("boiler/outlet", t + 700, 40.0),
                ]
            })
            .chain([
                reading("boiler/outlet", 20_600, 1.0),
                reading("boiler/inlet", 20_600, 1.0),
                reading("boiler/outlet", 22_000, 1.0),
            ])
            .collect();
        let run = |cut: Option<usize>| {
            let (mut w, mut rx, stats) = worker(DELTA);
            let mut i = 0;
            if let Some(cut) = cut {
                for r in &inputs[..cut] {
                    w.process(r.clone());
                }
                let bytes = w.checkpoint();
                let checkpoint::Decoded { series, joins, .. } =
                    checkpoint::decode_all(&bytes).unwrap();
                assert_eq!(joins.len(), 1);
                let (fresh, rx2, stats2) = worker(DELTA);
                (w, rx) = (fresh, rx2);
                w.restore(series, &HashMap::new());
                w.restore_joins(joins);
                i = cut;
                drop(stats);
                for r in &inputs[i..] {
                    w.process(r.clone());
                }
                return (aggregates(&mut rx), stats2.join_pairs.load(Relaxed));
            }
            for r in &inputs[i..] {
                w.process(r.clone());
            }
            (aggregates(&mut rx), stats.join_pairs.load(Relaxed))
        };
        let (whole, pairs) = run(None);
        let delta = |a: &[AggregateRecord]| {
            a.iter()
                .filter(|a| a.series == "boiler/delta")
                .map(|a| (a.count, a.sum))
                .collect::<Vec<_>>()
        };
        assert_eq!(delta(&whole), [(10, 10.0 * 11.0 + 22.5)]);
        assert_eq!(pairs, 11);
        // Cut in the middle of second 4's join window (inlet seen, outlet not).
        let (restored, later) = run(Some(13));
        assert_eq!(delta(&restored), delta(&whole));
        // Windows 0 to 2 were paired before the cut (watermark 3.6 s).
        assert_eq!(later, 11 - 3);
    }

    const PATTERN: &str = "[[rules]]\nmatch = \"line1/*\"\nwindow = { kind = \"tumbling\", size_ms = 10000 }\n[[patterns]]\nname = \"line1/overheat-then-drop\"\nfirst = { match = \"line1/temp\", above = 80.0, clear_at = 75.0 }\nthen = { match = \"line1/pressure\", below = 2.0, clear_at = 2.5 }\nwithin_ms = 10000\n";

    fn alert_events(rx: &mut mpsc::Receiver<Record>) -> Vec<AlertEvent> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            if let Record::Alert(a) = r {
                out.push(*a);
            }
        }
        out
    }

    #[test]
    fn a_pattern_fires_once_per_occurrence_and_never_otherwise() {
        let (mut w, mut rx, stats) = worker(PATTERN);
        let steps = [
            ("line1/pressure", 0, 1.0),     // B with no A before it
            ("line1/pressure", 500, 3.0),   // B clears
            ("line1/temp", 1_000, 85.0),    // A
            ("line1/temp", 2_000, 90.0),    // still A: not a new event
            ("line1/pressure", 5_000, 1.5), // B within 4 s: raised
            ("line1/pressure", 6_000, 1.0), // still B
            ("line1/pressure", 7_000, 3.0), // B clears: cleared
            ("line1/pressure", 8_000, 1.0), // B again; A was used
            ("line1/pressure", 8_500, 3.0),
            ("line1/temp", 9_000, 70.0),     // A clears
            ("line1/temp", 20_000, 85.0),    // A again
            ("line1/pressure", 31_000, 1.0), // B 11 s later: too late
            ("line1/pressure", 31_500, 3.0),
            ("line1/temp", 32_000, 70.0),
            ("line1/temp", 40_000, 81.0),    // A
            ("line1/pressure", 40_000, 1.9), // B at the same time: raised
        ];
        for (series, ts, v) in steps {
            w.process(reading(series, ts, v));
        }
        let got: Vec<_> = alert_events(&mut rx)
            .into_iter()
            .filter(|a| a.rule == "pattern")
            .map(|a| (a.series, a.state, a.event_ts, a.score))
            .collect();
        let name = "line1/overheat-then-drop".to_string();
        assert_eq!(
            got,
            [
                (name.clone(), "raised", 5_000, Some(4_000.0)),
                (name.clone(), "cleared", 7_000, None),
                (name, "raised", 40_000, Some(0.0)),
            ]
        );
        assert_eq!(stats.pattern_raised.load(Relaxed), 2);
        // The A at 20 s expired.
        assert_eq!(stats.pattern_settled.load(Relaxed), 1);
    }

    #[test]
    fn an_unanswered_request_raises_after_its_bound_on_the_agents_clock_and_survives_a_restart() {
        let config = "[[patterns]]\nname = \"pump/no-flow\"\nfirst = { match = \"pump/on\", above = 0.5 }\nthen = { match = \"pump/flow\", above = 1.0 }\nwithin_ms = 5000\nabsent = true\n";
        let (mut w, mut rx, stats) = worker(config);
        let now = now_ms();
        let at = |series: &str, ts: Timestamp, v: f64| Reading {
            ingest: ts,
            ..reading(series, ts, v)
        };
        // Answered in time.
        w.process(at("pump/on", now - 60_000, 1.0));
        w.process(at("pump/on", now - 59_900, 0.0));
        w.process(at("pump/flow", now - 58_000, 2.0));
        w.process(at("pump/flow", now - 57_000, 0.0));
        // Not answered; the inputs go quiet.
        w.process(at("pump/on", now - 30_000, 1.0));
        w.process(at("pump/on", now - 29_900, 0.0));
        w.tick(now - 29_900 + 4_000);
        assert!(alert_events(&mut rx).is_empty());
        // A checkpoint while it waits, restored into a new worker.
        let saved = checkpoint::decode_all(&w.checkpoint()).unwrap();
        assert_eq!(saved.patterns.len(), 1);
        let (mut w, mut rx, stats2) = worker(config);
        w.restore_patterns(saved.patterns);
        // The agent's clock passes the deadline (30 s ago + 5 s + grace).
        w.tick(now - 29_900 + 5_200);
        let got = alert_events(&mut rx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].rule, got[0].state, got[0].event_ts, got[0].threshold),
            ("pattern", "raised", now - 30_000 + 5_000, 5_000.0)
        );
        assert!(got[0].value.is_nan());
        // The answer comes at last: cleared.
        w.process(at("pump/flow", now - 20_000, 3.0));
        let got = alert_events(&mut rx);
        assert_eq!((got[0].state, got[0].value), ("cleared", 3.0));
        assert_eq!(stats.pattern_settled.load(Relaxed), 1);
        assert_eq!(stats2.pattern_raised.load(Relaxed), 1);
    }

    #[test]
    fn a_sqlite_table_sets_each_series_limit_and_its_alerts_carry_the_row() {
        let dir = std::env::temp_dir().join(format!("sluice-worker-sqlite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("assets.db");
        let _ = std::fs::remove_file(&path);
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(
            "CREATE TABLE sensors (id TEXT, site TEXT, max_temp REAL, active INTEGER);
             INSERT INTO sensors VALUES ('t-1', 'north', 50, 1), ('t-2', 'south', 80, 1), ('t-3', 'east', 10, 0);",
        )
        .unwrap();
        let text = format!(
            "agent_id = \"t\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[output]\nconsole = true\n[tables.sensors]\npath = {:?}\nquery = \"SELECT id AS series, site, max_temp FROM sensors WHERE active = 1\"\n[[rules]]\nmatch = \"t-*\"\ntable = \"sensors\"\non_missing = \"refuse\"\nthresholds = [{{ above = \"@max_temp\" }}]\n",
            path.display().to_string()
        );
        let mut config = Config::parse(&text).unwrap();
        config.load_tables().unwrap();
        let (mut w, _, mut rx, stats) = worker_of(&config, 100);
        for (i, series) in ["t-1", "t-2", "t-3"].iter().enumerate() {
            w.process(reading(series, i as Timestamp, 60.0));
        }
        let raised: Vec<AlertEvent> = alert_events(&mut rx);
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert_eq!(
            (raised[0].series.as_str(), raised[0].threshold),
            ("t-1", 50.0)
        );
        let row = raised[0].table.as_ref().expect("the alert carries the row");
        assert_eq!(row["site"], "north");
        // t-3 is not active: no row, refused.
        assert_eq!(stats.table_unmatched.load(Relaxed), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_table_keyed_by_a_label_sets_each_sites_limit_follows_the_label_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("sluice-worker-sites-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sites.csv");
        std::fs::write(&path, "site,max_temp\nnorth,50\nsouth,80\n").unwrap();
        let text = format!(
            "agent_id = \"t\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\njson = {{ labels = [\"site\"] }}\n[output]\nconsole = true\n[tables.sites]\npath = {:?}\nkey = \"site\"\n[[rules]]\nmatch = \"t-*\"\ntable = \"sites\"\njoin_label = \"site\"\non_missing = \"refuse\"\nthresholds = [{{ above = \"@max_temp\" }}]\n",
            path.display().to_string()
        );
        let mut config = Config::parse(&text).unwrap();
        config.load_tables().unwrap();
        let (mut w, rules, mut rx, stats) = worker_of(&config, 100);
        // 60 is over north's 50, under south's 80; no site: refused.
        w.process(at_site(&rules, "t-1", 0, 60.0, Some("north")));
        w.process(at_site(&rules, "t-2", 0, 60.0, Some("south")));
        w.process(at_site(&rules, "t-3", 0, 60.0, None));
        let got = alert_events(&mut rx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].series.as_str(), got[0].threshold), ("t-1", 50.0));
        assert_eq!(got[0].table.as_ref().unwrap()["site"], "north");
        assert_eq!(stats.table_unmatched.load(Relaxed), 1);
        // t-2 moves north: north's limit applies from its next reading.
        w.process(at_site(&rules, "t-2", 1, 60.0, Some("north")));
        let got = alert_events(&mut rx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].series.as_str(), got[0].threshold), ("t-2", 50.0));
        // Restored, t-1 keeps its row and its raised alert: no new raise.
        let saved = checkpoint::decode_all(&w.checkpoint()).unwrap();
        let (mut w, _, mut rx, stats) = worker_of(&config, 100);
        w.restore(saved.series, &HashMap::new());
        assert_eq!(stats.restore_dropped.load(Relaxed), 0);
        w.process(at_site(&rules, "t-1", 2, 70.0, Some("north")));
        w.process(at_site(&rules, "t-1", 3, 10.0, Some("north")));
        let got = alert_events(&mut rx);
        assert_eq!(
            got.iter()
                .map(|a| (a.series.as_str(), a.state))
                .collect::<Vec<_>>(),
            [("t-1", "cleared")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const BY_SITE: &str = "[sources.s]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\njson = { labels = [\"site\"] }\n[[rules]]\nmatch = \"delta:*\"\nwindow = { kind = \"tumbling\", size_ms = 10000 }\n[[derived]]\nname = \"delta\"\na = \"*/inlet\"\nb = \"*/outlet\"\nexpr = \"a - b\"\nwindow_ms = 1000\ngroup_by = \"site\"\n[[patterns]]\nname = \"hot-then-low\"\nfirst = { match = \"*/inlet\", above = 80.0 }\nthen = { match = \"*/outlet\", below = 10.0 }\nwithin_ms = 5000\ngroup_by = \"site\"\n";

    #[test]
    fn derived_series_and_patterns_by_a_label_keep_one_state_per_value() {
        let (mut w, rules_of, mut rx, stats) = {
            let config = Config::parse(&format!("{BASE}{BY_SITE}")).unwrap();
            let (w, rules, rx, stats) = worker_of(&config, 100);
            (w, rules, rx, stats)
        };
        let at = |series: &str, ts, v, site| at_site(&rules_of, series, ts, v, Some(site));
        // Two sites, ten seconds; north's outlet runs 10 below its inlet,
        // south's 20 below.
        for sec in 0..11i64 {
            for (site, drop) in [("north", 10.0), ("south", 20.0)] {
                w.process(at(&format!("{site}/inlet"), sec * 1000 + 100, 50.0, site));
                w.process(at(
                    &format!("{site}/outlet"),
                    sec * 1000 + 200,
                    50.0 - drop,
                    site,
                ));
            }
        }
        w.process(at("north/inlet", 12_000, 50.0, "north"));
        w.process(at("south/inlet", 12_000, 50.0, "south"));
        let got = aggregates(&mut rx);
        let mut deltas: Vec<_> = got
            .iter()
            .filter(|a| a.series.starts_with("delta"))
            .map(|a| (a.series.as_str(), a.count, a.sum))
            .collect();
        deltas.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(
            deltas,
            [("delta:north", 10, 100.0), ("delta:south", 10, 200.0)]
        );
        assert_eq!(stats.join_pairs.load(Relaxed), 22);
        // North hot, then south low: no pattern; north low: north's.
        w.process(at("north/inlet", 13_000, 90.0, "north"));
        w.process(at("south/outlet", 13_500, 5.0, "south"));
        assert!(alert_events(&mut rx).is_empty());
        w.process(at("north/outlet", 14_000, 5.0, "north"));
        let got = alert_events(&mut rx);
        assert_eq!(
            got.iter()
                .map(|a| (a.series.as_str(), a.state))
                .collect::<Vec<_>>(),
            [("hot-then-low:north", "raised")]
        );
        // A checkpoint keeps each site's join and pattern.
        let saved = checkpoint::decode_all(&w.checkpoint()).unwrap();
        let groups = |v: Vec<Option<String>>| {
            let mut v: Vec<_> = v.into_iter().flatten().collect();
            v.sort();
            v
        };
        assert_eq!(
            groups(saved.joins.iter().map(|j| j.group.clone()).collect()),
            ["north", "south"]
        );
        assert_eq!(
            groups(saved.patterns.iter().map(|p| p.group.clone()).collect()),
            ["north", "south"]
        );
        let config = Config::parse(&format!("{BASE}{BY_SITE}")).unwrap();
        let (mut b, _, mut rx, _) = worker_of(&config, 100);
        b.restore(saved.series, &HashMap::new());
        b.restore_joins(saved.joins);
        b.restore_patterns(saved.patterns);
        // North's low ends: its raised pattern clears in the restored worker.
        b.process(at("north/outlet", 15_000, 50.0, "north"));
        let got = alert_events(&mut rx);
        assert_eq!(
            got.iter()
                .map(|a| (a.series.as_str(), a.state))
                .collect::<Vec<_>>(),
            [("hot-then-low:north", "cleared")]
        );
    }

    #[test]
    fn a_flood_of_label_values_is_bounded_and_counted() {
        let config = Config::parse(&format!("{BASE}{BY_SITE}")).unwrap();
        let (mut w, rules, _rx, stats) = worker_of(&config, 100);
        for i in 0..MAX_INSTANCES + 10 {
            let site = format!("site-{i}");
            w.process(at_site(&rules, "x/inlet", 0, 1.0, Some(&site)));
        }
        // Each reading feeds the derived series and the pattern.
        assert_eq!(stats.groups_overflow.load(Relaxed), 2 * 10);
        assert_eq!(w.joins[0].by.len(), MAX_INSTANCES);
    }

    #[test]
    fn a_rate_derived_series_is_the_change_per_second_of_its_expression() {
        let (mut w, mut rx, stats) = worker(
            "[[rules]]\nmatch = \"gap-rate\"\nwindow = { kind = \"tumbling\", size_ms = 10000 }\n[[derived]]\nname = \"gap-rate\"\na = \"in\"\nb = \"out\"\nexpr = \"rate(a - b)\"\nwindow_ms = 1000\n",
        );
        // The gap widens by 3 a second.
        for sec in 0..12i64 {
            w.process(reading("in", sec * 1000 + 100, 50.0 + 3.0 * sec as f64));
            w.process(reading("out", sec * 1000 + 200, 40.0));
        }
        let got = aggregates(&mut rx);
        let rate: Vec<_> = got
            .iter()
            .filter(|a| a.series == "gap-rate")
            .map(|a| (a.count, a.min, a.max))
            .collect();
        // Pairs at 0..=10 s closed; the first has no rate (counted).
        assert_eq!(rate, [(9, 3.0, 3.0)]);
        assert_eq!(stats.join_undefined.load(Relaxed), 1);
    }
}
