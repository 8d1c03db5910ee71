//! The merger of sensor nodes' records (serial sources with
//! `format = "frames"`): node windows and their sketches become the
//! gateway's aggregates, node alerts its alerts.
//!
//! A node sends, per series and node window, its sketches then the
//! window's aggregate, which commits the node window. The merger adds each
//! node window to the gateway window that holds it (`[nodes] window_ms`, a
//! multiple of the node's; the node's own by default): aggregates by the
//! core's exact merge, quantile sketches (DDSketch) and distinct-count
//! sketches (HyperLogLog) by theirs. A gateway window closes, and goes out
//! like the workers' aggregates (console, MQTT, outbox), when all its node
//! windows arrived, when the series sends a later window (a node window
//! without readings never comes), after it ended by a window's length more
//! on the gateway's clock, or at shutdown (`partial`). A node window that
//! straddles gateway windows, or comes for a window already closed, is
//! counted (`sluice_node_records_refused_total`) and logged, never merged
//! twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use sluice_collectors::node::NodeRecord;
use sluice_core::Timestamp;
use sluice_core::aggregate::{Accumulator, Aggregate};
use sluice_core::link::SketchKind;
use sluice_core::sketch::{DdSketch, HyperLogLog};
use tokio::sync::mpsc;

use crate::config::NodesConfig;
use crate::output::{AggregateRecord, AlertEvent, DistinctRecord, Made, Record, RecordExtras};

/// The merger's counters.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Node windows merged.
    pub windows: AtomicU64,
    /// Gateway windows sent.
    pub merged: AtomicU64,
    /// Alerts forwarded.
    pub alerts: AtomicU64,
    /// Records refused: a window or sketch that straddles gateway windows,
    /// comes late, or does not merge (a damaged or incompatible sketch).
    pub refused: AtomicU64,
}

/// Open gateway windows a series keeps at most; past it, the oldest goes
/// out as partial (a node whose clock jumps about cannot pile them up).
const MAX_OPEN: usize = 8;

/// The largest node sketches the merger takes: a DDSketch of 8,192 buckets
/// (64 KiB; the reference firmware's has 834) and a HyperLogLog of 4,096
/// registers (6 KiB; the firmware's has 1,024). A sketch's header names its
/// size: a larger claim is refused before anything is allocated.
const MAX_QUANTILE_BUCKETS: usize = 8_192;
const MAX_DISTINCT_STORAGE: usize = sluice_core::sketch::hll::storage_bytes(4_096);
/// What the open windows' sketches may take together; past it a new sketch
/// is refused (counted) until windows close.
const SKETCH_BUDGET: usize = 64 << 20;

/// One gateway window of a series, being merged.
struct Open {
    aggregate: Aggregate,
    /// Node windows committed into it.
    parts: u64,
    /// Of how many (gateway window over node window).
    expected: u64,
    /// The gateway window's length, ms.
    len: Timestamp,
    quantiles: Option<DdSketch<Vec<u64>>>,
    distinct: Option<HyperLogLog<Vec<u8>>>,
    /// Bytes its sketches' storage takes (counted in `Merger::sketch_bytes`).
    sketch_bytes: usize,
}

/// Per series: the open gateway windows by start, and where it stands.
#[derive(Default)]
struct Series {
    open: BTreeMap<Timestamp, Open>,
    /// Windows before this start are closed.
    closed_before: Option<Timestamp>,
}

/// Merges node records until `records` closes (its sources stopped), then
/// flushes what is open as partial.
pub async fn run(
    mut records: mpsc::Receiver<NodeRecord>,
    out: mpsc::Sender<Record>,
    alerts: mpsc::Sender<Record>,
    agent: Arc<str>,
    config: NodesConfig,
    max_series: usize,
    stats: Arc<NodeStats>,
) {
    let mut merger = Merger {
        series: HashMap::new(),
        agent,
        config,
        stats,
        last_log: None,
        max_series,
        pending: Vec::new(),
        sketch_bytes: 0,
        sketch_budget: SKETCH_BUDGET,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ready = tokio::select! {
            r = records.recv() => match r {
                Some(r) => merger.take(r),
                None => break,
            },
            _ = tick.tick() => merger.expire(sluice_collectors::reading::now_ms()),
        };
        if !deliver(ready, &out, &alerts).await {
            return;
        }
    }
    deliver(merger.flush(), &out, &alerts).await;
}

/// Sends alerts to the alerts' channel and the rest to the records'; false
/// once the output has gone.
async fn deliver(
    records: Vec<Record>,
    out: &mpsc::Sender<Record>,
    alerts: &mpsc::Sender<Record>,
) -> bool {
    for record in records {
        let to = if matches!(record, Record::Alert(_)) {
            alerts
        } else {
            out
        };
        if to.send(record).await.is_err() {
            return false;
        }
    }
    true
}

struct Merger {
    series: HashMap<String, Series>,
    agent: Arc<str>,
    config: NodesConfig,
    stats: Arc<NodeStats>,
    /// When a refusal was last logged (one line per 10 s at most).
    last_log: Option<std::time::Instant>,
    /// Series it keeps at most (the agent's `max_series`).
    max_series: usize,
    /// Windows closed on the way (pushed out by `MAX_OPEN`), to send.
    pending: Vec<Record>,
    /// Bytes the open windows' sketches take (at most `sketch_budget`).
    sketch_bytes: usize,
    /// `SKETCH_BUDGET` (smaller in tests).
    sketch_budget: usize,
}

impl Merger {
    fn refuse(&mut self, series: &str, why: &str) {
        let total = self.stats.refused.fetch_add(1, Relaxed) + 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_log = Some(std::time::Instant::now());
            tracing::warn!(series, refused = total, "node record refused: {why}");
        }
    }

    /// The gateway window `[start, end)` of a node window falls in, with
    /// how many node windows make it.
    fn window_of(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<(Timestamp, Timestamp, u64), String> {
        let node = end - start;
        let gw = if self.config.window_ms == 0 {
            node
        } else {
            self.config.window_ms as Timestamp
        };
        if gw % node != 0 {
            return Err(format!(
                "its window of {node} ms does not divide [nodes] window_ms = {gw}"
            ));
        }
        let at = start.div_euclid(gw) * gw;
        if end > at + gw {
            return Err(format!(
                "its window [{start}, {end}) straddles the gateway's windows of {gw} ms"
            ));
        }
        Ok((at, gw, (gw / node) as u64))
    }

    /// The open window `at` of `series`, or why there is none.
    fn open(
        &mut self,
        series: &str,
        (at, len, expected): (Timestamp, Timestamp, u64),
    ) -> Result<&mut Open, String> {
        if !self.series.contains_key(series) && self.series.len() >= self.max_series {
            // Forget the series with nothing open (a record for one of
            // their closed windows would now start it afresh).
            self.series.retain(|_, s| !s.open.is_empty());
            if self.series.len() >= self.max_series {
                return Err(format!(
                    "the merger holds max_series = {} series with open windows already",
                    self.max_series
                ));
            }
        }
        let s = self.series.entry(series.to_owned()).or_default();
        if s.closed_before.is_some_and(|c| at < c) {
            return Err("its window was already closed (it came late)".into());
        }
        if !s.open.contains_key(&at)
            && s.open.len() >= MAX_OPEN
            && let Some((start, oldest)) = s.open.pop_first()
        {
            let record = self.close(series, start, oldest, true);
            self.pending.extend(record);
        }
        let s = self.series.get_mut(series).expect("inserted above");
        Ok(s.open.entry(at).or_insert_with(|| Open {
            aggregate: Aggregate::empty(),
            parts: 0,
            expected,
            len,
            quantiles: None,
            distinct: None,
            sketch_bytes: 0,
        }))
    }

    fn take(&mut self, record: NodeRecord) -> Vec<Record> {
        let mut out = self.take_one(record);
        out.append(&mut self.pending);
        out
    }

    fn take_one(&mut self, record: NodeRecord) -> Vec<Record> {
        match record {
            NodeRecord::Hello { node, window_ms } => {
                tracing::info!(node, window_ms, "sensor node started");
                Vec::new()
            }
            NodeRecord::Stats {
                readings,
                cycles,
                unsent,
                stack_bytes,
            } => {
                tracing::info!(readings, cycles, unsent, stack_bytes, "sensor node stats");
                Vec::new()
            }
            NodeRecord::Alert {
                series,
                ts,
                value,
                score,
                level,
                raised,
            } => {
                self.stats.alerts.fetch_add(1, Relaxed);
                vec![Record::Alert(Box::new(AlertEvent {
                    agent: self.agent.clone(),
                    series,
                    rule: "zscore",
                    state: if raised { "raised" } else { "cleared" },
                    value,
                    score: Some(score),
                    threshold: level,
                    event_ts: ts,
                    detected_ts: sluice_collectors::reading::now_ms(),
                    label: None,
                    table: None,
                }))]
            }
            NodeRecord::Sketch {
                series,
                start,
                end,
                kind,
                bytes,
            } => {
                if let Err(why) = self.merge_sketch(&series, start, end, kind, &bytes) {
                    self.refuse(&series, &why);
                }
                Vec::new()
            }
            NodeRecord::Window {
                series,
                start,
                end,
                aggregate,
            } => match self.merge_window(&series, start, end, &aggregate) {
                Ok(done) => done,
                Err(why) => {
                    self.refuse(&series, &why);
                    Vec::new()
                }
            },
        }
    }

    fn merge_sketch(
        &mut self,
        series: &str,
        start: Timestamp,
        end: Timestamp,
        kind: SketchKind,
        bytes: &[u8],
    ) -> Result<(), String> {
        let window = self.window_of(start, end)?;
        let budget = self.sketch_budget;
        let left = budget.saturating_sub(self.sketch_bytes);
        let over_budget = || format!("the open windows' sketches take {budget} bytes already");
        let added = match kind {
            SketchKind::Quantiles => {
                let len = DdSketch::<Vec<u64>>::storage_len(bytes).map_err(|e| e.to_string())?;
                if len > MAX_QUANTILE_BUCKETS {
                    return Err(format!(
                        "a DDSketch of {len} buckets (at most {MAX_QUANTILE_BUCKETS})"
                    ));
                }
                let sketch = DdSketch::read_from(bytes, vec![0; len]).map_err(|e| e.to_string())?;
                let open = self.open(series, window)?;
                match &mut open.quantiles {
                    Some(q) => {
                        q.merge(&sketch).map_err(|e| e.to_string())?;
                        0
                    }
                    None if 8 * len > left => return Err(over_budget()),
                    None => {
                        open.quantiles = Some(sketch);
                        8 * len
                    }
                }
            }
            SketchKind::Distinct => {
                let len = HyperLogLog::<Vec<u8>>::storage_len(bytes).map_err(|e| e.to_string())?;
                if len > MAX_DISTINCT_STORAGE {
                    return Err(format!(
                        "a HyperLogLog of {len} bytes (at most {MAX_DISTINCT_STORAGE})"
                    ));
                }
                let sketch =
                    HyperLogLog::read_from(bytes, vec![0; len]).map_err(|e| e.to_string())?;
                let open = self.open(series, window)?;
                match &mut open.distinct {
                    Some(d) => {
                        d.merge(&sketch).map_err(|e| e.to_string())?;
                        0
                    }
                    None if len > left => return Err(over_budget()),
                    None => {
                        open.distinct = Some(sketch);
                        len
                    }
                }
            }
        };
        if let Some(open) = self
            .series
            .get_mut(series)
            .and_then(|s| s.open.get_mut(&window.0))
        {
            open.sketch_bytes += added;
        }
        self.sketch_bytes += added;
        Ok(())
    }

    fn merge_window(
        &mut self,
        series: &str,
        start: Timestamp,
        end: Timestamp,
        aggregate: &Aggregate,
    ) -> Result<Vec<Record>, String> {
        let window = self.window_of(start, end)?;
        let at = window.0;
        let open = self.open(series, window)?;
        open.aggregate.merge(aggregate);
        open.parts += 1;
        let complete = open.parts >= open.expected;
        self.stats.windows.fetch_add(1, Relaxed);
        // Close this window when complete, and any earlier one: the node
        // sends in order, so nothing more comes for them.
        let mut out = Vec::new();
        let s = self.series.get_mut(series).expect("opened above");
        let upto = if complete { at + 1 } else { at };
        let done: Vec<Timestamp> = s.open.range(..upto).map(|(k, _)| *k).collect();
        for k in done {
            if let Some(open) = self.series.get_mut(series).and_then(|s| s.open.remove(&k)) {
                out.extend(self.close(series, k, open, false));
            }
        }
        Ok(out)
    }

    /// Closes the windows whose end is a window's length or more behind
    /// `now` (a node window never came: the node was off, or had no
    /// readings).
    fn expire(&mut self, now: Timestamp) -> Vec<Record> {
        let mut due = Vec::new();
        for (name, s) in &self.series {
            for (&start, open) in &s.open {
                if start + 2 * open.len <= now {
                    due.push((name.clone(), start));
                }
            }
        }
        let mut out = Vec::new();
        for (name, start) in due {
            if let Some(open) = self
                .series
                .get_mut(&name)
                .and_then(|s| s.open.remove(&start))
            {
                out.extend(self.close(&name, start, open, false));
            }
        }
        out
    }

    /// Closes everything open, as partial.
    fn flush(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        let names: Vec<String> = self.series.keys().cloned().collect();
        for name in names {
            let open = std::mem::take(&mut self.series.get_mut(&name).expect("listed").open);
            for (start, o) in open {
                out.extend(self.close(&name, start, o, true));
            }
        }
        out
    }

    fn close(
        &mut self,
        series: &str,
        start: Timestamp,
        open: Open,
        partial: bool,
    ) -> Option<Record> {
        let end = start + open.len;
        self.sketch_bytes -= open.sketch_bytes;
        let s = self.series.entry(series.to_owned()).or_default();
        s.closed_before = Some(s.closed_before.map_or(end, |c| c.max(end)));
        let a = open.aggregate;
        let (Some(first), Some(last)) = (a.first(), a.last()) else {
            // Sketches only, no committed window: nothing to report.
            return None;
        };
        self.stats.merged.fetch_add(1, Relaxed);
        let mut extras = RecordExtras::NONE;
        if let Some(q) = &open.quantiles {
            let mut map = BTreeMap::new();
            for &p in &self.config.quantiles {
                if let Some(v) = q.quantile(p) {
                    map.insert(crate::pipeline::worker::quantile_name(p), v);
                }
            }
            extras.quantiles = Some(map);
        }
        if let Some(d) = &open.distinct {
            let (low, high) = d.bounds(2.0);
            extras.distinct = Some(Box::new(DistinctRecord {
                label: self.config.distinct_label.clone(),
                estimate: d.estimate(),
                rse: d.relative_error(),
                low,
                high,
                without_label: 0,
                sketch: None,
            }));
        }
        Some(Record::Aggregate(Box::new(AggregateRecord {
            agent: self.agent.clone(),
            series: series.to_owned(),
            group: None,
            table: None,
            start,
            end,
            count: a.count(),
            sum: a.sum(),
            mean: a.mean().unwrap_or(0.0),
            min: a.min().unwrap_or(0.0),
            max: a.max().unwrap_or(0.0),
            stddev: a.stddev(),
            first: first.value,
            last: last.value,
            extras: (!extras.is_empty()).then(|| Box::new(extras)),
            late: 0,
            partial: partial || open.parts < open.expected,
            partial_reason: None,
            sampled_one_in: None,
            count_stderr: None,
            made: Made::now(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::node::{NodeOutput, NodeSensor, TestSignal};

    fn merger(window_ms: u64) -> Merger {
        Merger {
            series: HashMap::new(),
            agent: "gw".into(),
            config: NodesConfig {
                window_ms,
                ..NodesConfig::default()
            },
            stats: Arc::default(),
            last_log: None,
            max_series: 1_000,
            pending: Vec::new(),
            sketch_bytes: 0,
            sketch_budget: SKETCH_BUDGET,
        }
    }

    fn window(series: &str, start: Timestamp, value: f64) -> NodeRecord {
        let mut aggregate = Aggregate::empty();
        aggregate.add(start, value);
        NodeRecord::Window {
            series: series.into(),
            start,
            end: start + 1_000,
            aggregate,
        }
    }

    /// What a node sends for `windows` windows of 1 s from `t0`, as the
    /// firmware sends it (sketches, then the window).
    fn node_records(t0: Timestamp, windows: i64) -> Vec<NodeRecord> {
        let mut sensor: NodeSensor<834, 1536> =
            NodeSensor::new(1_000, NodeSensor::<834, 1536>::default_detector(), 0.01).unwrap();
        let mut signal = TestSignal::new(3, 0, None);
        let mut out = Vec::new();
        let mut take = |o: NodeOutput<'_, 834, 1536>| {
            if let NodeOutput::Window {
                closed,
                quantiles,
                distinct,
            } = o
            {
                let mut buf = vec![0u8; 8192];
                let n = quantiles.write_to(&mut buf).unwrap();
                out.push(NodeRecord::Sketch {
                    series: "n/s0".into(),
                    start: closed.start,
                    end: closed.end,
                    kind: SketchKind::Quantiles,
                    bytes: buf[..n].to_vec(),
                });
                let n = distinct.write_to(&mut buf).unwrap();
                out.push(NodeRecord::Sketch {
                    series: "n/s0".into(),
                    start: closed.start,
                    end: closed.end,
                    kind: SketchKind::Distinct,
                    bytes: buf[..n].to_vec(),
                });
                out.push(NodeRecord::Window {
                    series: "n/s0".into(),
                    start: closed.start,
                    end: closed.end,
                    aggregate: closed.acc,
                });
            }
        };
        for i in 0..windows * 100 {
            let (v, tag) = signal.next_reading();
            sensor
                .push(t0 + i * 10, v, &tag.to_le_bytes(), &mut take)
                .unwrap();
        }
        sensor.advance_to(t0 + windows * 1_000, &mut take);
        out
    }

    fn aggregates(records: Vec<Record>) -> Vec<AggregateRecord> {
        records
            .into_iter()
            .filter_map(|r| match r {
                Record::Aggregate(a) => Some(*a),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn two_node_windows_make_one_gateway_window_with_merged_sketches() {
        let mut m = merger(2_000);
        let mut out = Vec::new();
        for r in node_records(10_000, 4) {
            out.extend(m.take(r));
        }
        let aggs = aggregates(out);
        assert_eq!(aggs.len(), 2);
        for a in &aggs {
            assert_eq!(a.count, 200);
            assert_eq!(a.end - a.start, 2_000);
            assert!(!a.partial);
            let q = a.extras().quantiles.as_ref().expect("quantiles");
            assert!(q.contains_key("p50") && q.contains_key("p99"), "{q:?}");
            assert!(a.extras().distinct.is_some());
        }
        assert_eq!(m.stats.refused.load(Relaxed), 0);
        assert_eq!(m.stats.windows.load(Relaxed), 4);
    }

    #[test]
    fn a_flood_of_new_series_is_bounded_and_counted() {
        let mut m = merger(4_000);
        m.max_series = 10;
        for i in 0..100 {
            m.take(window(&format!("flood-{i}"), 0, 1.0));
        }
        assert!(m.series.len() <= 10, "{} series held", m.series.len());
        assert_eq!(m.stats.refused.load(Relaxed), 90);
        // Once their windows closed, their room is taken again.
        m.flush();
        m.take(window("late-comer", 8_000, 1.0));
        assert!(m.series.contains_key("late-comer"));
    }

    #[test]
    fn a_node_clock_gone_wild_holds_a_bounded_number_of_windows() {
        let mut m = merger(0);
        let mut out = Vec::new();
        // Windows far apart in time and going backwards (so that none
        // closes the one before), never complete for a gateway window of
        // 4 s, and far in the future: none expires.
        m.config.window_ms = 4_000;
        let base = (1 << 50) / 4_000 * 4_000;
        for i in 0..100 {
            out.extend(m.take(window("s", base - i * 4_000_000, 1.0)));
        }
        assert!(
            m.series["s"].open.len() <= MAX_OPEN,
            "{}",
            m.series["s"].open.len()
        );
        // Those pushed out went out, as partial; those before a window that
        // went out are late, refused and counted: none is lost unseen.
        let aggs = aggregates(out);
        let refused = m.stats.refused.load(Relaxed) as usize;
        assert_eq!(aggs.len() + m.series["s"].open.len() + refused, 100);
        assert!(!aggs.is_empty());
        assert!(aggs.iter().all(|a| a.partial));
    }

    #[test]
    fn a_late_window_is_refused_not_merged_twice() {
        let mut m = merger(0);
        let out = m.take(window("s", 0, 1.0));
        assert_eq!(aggregates(out).len(), 1);
        assert!(m.take(window("s", 0, 2.0)).is_empty());
        assert_eq!(m.stats.refused.load(Relaxed), 1);
    }

    #[test]
    fn a_straddling_or_damaged_record_is_refused_and_counted() {
        let mut m = merger(2_000);
        // [1000, 2000) fits; [1500, 2500) straddles 2000.
        let mut a = Aggregate::empty();
        a.add(1_500, 1.0);
        m.take(NodeRecord::Window {
            series: "s".into(),
            start: 1_500,
            end: 2_500,
            aggregate: a,
        });
        m.take(NodeRecord::Sketch {
            series: "s".into(),
            start: 0,
            end: 1_000,
            kind: SketchKind::Quantiles,
            bytes: b"SLSK-not-really".to_vec(),
        });
        assert_eq!(m.stats.refused.load(Relaxed), 2);
    }

    #[test]
    fn a_sketch_that_asks_for_huge_storage_is_refused_before_any_allocation() {
        // A valid DDSketch frame whose header claims 2^20 buckets a sign
        // (a hostile node may claim 2^32: 64 GiB).
        let mut sketch = DdSketch::with_storage([0u64; 8], 0.01).unwrap();
        sketch.insert(5.0);
        let mut bytes = vec![0u8; 256];
        let n = sketch.write_to(&mut bytes).unwrap();
        bytes.truncate(n);
        // The body starts at 20: alpha (8 bytes), then the buckets a sign.
        bytes[28..32].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let sum = sluice_core::hash::hash64(&bytes[..n - 4], 0) as u32;
        bytes[n - 4..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(DdSketch::<Vec<u64>>::storage_len(&bytes), Ok(1 << 21));
        let mut m = merger(0);
        m.take(NodeRecord::Sketch {
            series: "s".into(),
            start: 0,
            end: 1_000,
            kind: SketchKind::Quantiles,
            bytes,
        });
        assert_eq!(m.stats.refused.load(Relaxed), 1);
    }

    #[test]
    fn sketches_past_the_budget_are_refused_until_windows_close() {
        let mut m = merger(0);
        // Room for the sketches of two node windows (834 buckets and 1,536
        // bytes each, as the firmware's).
        m.sketch_budget = 2 * (8 * 834 + 1_536);
        let records = node_records(0, 3);
        // Three windows' sketches, none committed yet: the third pair is
        // over the budget.
        for r in records
            .iter()
            .filter(|r| matches!(r, NodeRecord::Sketch { .. }))
        {
            m.take(r.clone());
        }
        assert_eq!(m.stats.refused.load(Relaxed), 2);
        // Committing the windows closes them and gives the room back.
        for r in records
            .iter()
            .filter(|r| matches!(r, NodeRecord::Window { .. }))
        {
            m.take(r.clone());
        }
        assert_eq!(m.sketch_bytes, 0);
        for r in node_records(10_000, 1) {
            m.take(r);
        }
        assert_eq!(m.stats.refused.load(Relaxed), 2);
    }
}
