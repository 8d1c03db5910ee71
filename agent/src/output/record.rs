//! The records the workers produce and the outputs deliver, and the
//! output's counters.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use serde::Serialize;
use sluice_core::Timestamp;

/// A closed window of a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateRecord {
    /// The gateway.
    pub agent: Arc<str>,
    /// The series key (a group's id, for a rule with `group_by`).
    pub series: String,
    /// For a rule with `group_by`: which group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<Box<GroupRecord>>,
    /// For a rule with `table`: the series' row (its columns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<crate::pipeline::rules::Row>,
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
    /// What only some rules ask for: quantiles, a decaying window's
    /// statistics, label sketches (their keys sit here in the JSON).
    #[serde(flatten)]
    pub extras: Option<Box<RecordExtras>>,
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
    /// When the record was made (not serialized).
    #[serde(skip)]
    pub made: Made,
}

/// The parts of an [`AggregateRecord`] that only some rules fill in,
/// boxed together: a window boundary of 10,000 series puts 10,000 records
/// in flight at once, and a record of a rule that asks for none of them
/// (W1's) then takes 232 bytes instead of 400 (a unit test holds it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RecordExtras {
    /// The quantiles the rule asks for (`p50`, `p99`, `p99.9`, …), each
    /// within the rule's accuracy (1 % by default) of the exact value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantiles: Option<std::collections::BTreeMap<String, f64>>,
    /// The quantiles whose rank fell among values the sketch folded
    /// together for lack of buckets (data spanning more than it covers):
    /// each is an upper bound (a lower one for negative values), not within
    /// 1 %. Absent when every quantile keeps its accuracy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quantiles_collapsed: Vec<String>,
    /// With `method = "kll"`: how far each quantile's rank may be from the
    /// requested one (normalized, 99 % confidence; 0.0133 at `k` = 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantiles_rank_error: Option<f64>,
    /// With `method = "kll"` and `sketches = true`: the KLL sketch, base64
    /// (standard alphabet, padded) of Apache DataSketches' KLL doubles
    /// format, for upstream merges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantile_sketch: Option<String>,
    /// For a decaying window: its statistics at the end of the period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decaying: Option<DecayingSummary>,
    /// `distinct`: how many distinct values of a label the window saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distinct: Option<Box<DistinctRecord>>,
    /// `top_k`: the most frequent values of a label in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<Box<TopRecord>>,
    /// `sample`: a uniform sample of the window's readings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<Vec<crate::pipeline::rules::labels::SampleRow>>,
    /// `frequency`: how often values of a label occurred in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency: Option<Box<FrequencyRecord>>,
}

impl RecordExtras {
    /// None of them.
    pub const NONE: RecordExtras = RecordExtras {
        quantiles: None,
        quantiles_collapsed: Vec::new(),
        quantiles_rank_error: None,
        quantile_sketch: None,
        decaying: None,
        distinct: None,
        top_k: None,
        sample: None,
        frequency: None,
    };

    /// Whether it holds nothing (a record then needs no box).
    pub fn is_empty(&self) -> bool {
        self == &Self::NONE
    }
}

impl AggregateRecord {
    /// Its extras ([`RecordExtras::NONE`] when it has none).
    pub fn extras(&self) -> &RecordExtras {
        static NONE: RecordExtras = RecordExtras::NONE;
        self.extras.as_deref().unwrap_or(&NONE)
    }
}

/// `group` in a record: the group a rule with `group_by` aggregated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupRecord {
    /// `group_by`: `"*"`, or the label.
    pub by: String,
    /// The label's value (for a value too long for a series id, as cut in
    /// `series`); absent for `"*"` and for the readings without the label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Sketch bytes as records carry them: base64, standard alphabet, padded.
pub fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The bytes of a sketch as records carry it ([`base64_of`]), if it is
/// base64.
pub fn base64_bytes(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// [`base64_of`] what `write` puts in `len` bytes (a core sketch's
/// `write_to`).
pub fn sketch_base64(
    len: usize,
    write: impl FnOnce(&mut [u8]) -> Result<usize, sluice_core::sketch::SketchError>,
) -> String {
    let mut bytes = vec![0; len];
    let n = write(&mut bytes).unwrap_or(0);
    base64_of(&bytes[..n])
}

/// Standard errors either side of a distinct count's `low` and `high`.
pub const DISTINCT_BOUND_ERRORS: f64 = 2.0;

impl DistinctRecord {
    /// What `sketch` reports about `label`, with the sketch itself if
    /// `with_sketch`.
    pub fn of<S: AsRef<[u8]> + AsMut<[u8]>>(
        label: &str,
        sketch: &sluice_core::sketch::HyperLogLog<S>,
        without_label: u64,
        with_sketch: bool,
    ) -> DistinctRecord {
        let (low, high) = sketch.bounds(DISTINCT_BOUND_ERRORS);
        DistinctRecord {
            label: label.to_owned(),
            estimate: sketch.estimate(),
            rse: sketch.relative_error(),
            low,
            high,
            without_label,
            sketch: with_sketch
                .then(|| sketch_base64(sketch.serialized_len(), |b| sketch.write_to(b))),
        }
    }
}

/// `distinct` in a record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistinctRecord {
    /// The label.
    pub label: String,
    /// Estimated distinct values.
    pub estimate: f64,
    /// The estimate's relative standard error (0.00005 while the sketch
    /// holds 384 values or fewer, nearly exact; 0.013 beyond).
    pub rse: f64,
    /// Bounds at two standard errors (about 95 %).
    pub low: f64,
    /// See `low`.
    pub high: f64,
    /// Readings of the window without the label.
    pub without_label: u64,
    /// With `sketches = true`: the sketch, base64 (standard alphabet,
    /// padded), in the Apache DataSketches HLL format (lg_k 12, seed 9001,
    /// items hashed as their UTF-8 bytes), for upstream merges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sketch: Option<String>,
}

/// `frequency` in a record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrequencyRecord {
    /// The label.
    pub label: String,
    /// Readings of the window with the label (`N`).
    pub total: u64,
    /// Each count overestimates by at most `bound` = `epsilon` × `total`...
    pub epsilon: f64,
    /// ... except with probability `delta`.
    pub delta: f64,
    /// `epsilon` × `total`.
    pub bound: f64,
    /// The counts of the values the rule names, in its order.
    pub values: Vec<FrequencyValue>,
    /// Readings of the window without the label.
    pub without_label: u64,
    /// With `sketches = true`: the Count-Min sketch, base64 (standard
    /// alphabet, padded) of the core's sketch format (`sluice-core`'s
    /// `sketch` module docs), for upstream merges and queries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sketch: Option<String>,
}

/// One value's count in `frequency`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrequencyValue {
    /// The label value.
    pub value: String,
    /// Its count: never below the true one, above it by at most `bound`
    /// (but with probability `delta`).
    pub count: u64,
}

/// `top_k` in a record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopRecord {
    /// The label.
    pub label: String,
    /// The values, most frequent first.
    pub values: Vec<TopValue>,
    /// Readings of the window without the label.
    pub without_label: u64,
}

/// One value of `top_k`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopValue {
    /// The label value.
    pub value: String,
    /// Its count in the window, an overestimate by at most `overcount`:
    /// the true count is in `[count - overcount, count]`.
    pub count: u64,
    /// See `count`.
    pub overcount: u64,
}

/// A label and its value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelRecord {
    /// The label.
    pub name: String,
    /// Its value.
    pub value: String,
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
    /// The rule: `zscore`, `threshold_above`, `threshold_below`,
    /// `rate_of_change`, `absent`, `first_seen`, `pattern`.
    pub rule: &'static str,
    /// `raised` or `cleared`; `seen` for `first_seen`, an event with no
    /// state (not published as the retained state).
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
    /// For `first_seen`: the label and the value seen for the first time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<LabelRecord>,
    /// For a rule with `table`: the series' row, as aggregate records
    /// carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<crate::pipeline::rules::Row>,
}

/// Something to deliver.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A closed window (boxed: it is much larger than the others).
    Aggregate(Box<AggregateRecord>),
    /// An alert change (boxed too: a record waiting in a channel then
    /// takes 40 bytes, not 176; a window boundary of 10,000 series puts
    /// 10,000 of them in the aggregate channel at once).
    Alert(Box<AlertEvent>),
    /// A stats snapshot (the periodic stats message).
    Stats(serde_json::Value),
    /// A worker's checkpoint (for the store only; see `checkpoint`).
    Checkpoint {
        /// The worker.
        worker: usize,
        /// Its encoded state.
        state: Vec<u8>,
    },
}

/// When a record was made (its window closed), for the output's delay
/// histogram. Not part of what the record says: never serialized, and two
/// records are equal whatever their `Made`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Made(pub Option<std::time::Instant>);

impl Made {
    /// Now.
    pub fn now() -> Made {
        Made(Some(std::time::Instant::now()))
    }
}

impl PartialEq for Made {
    fn eq(&self, _: &Made) -> bool {
        true
    }
}

/// How long aggregates waited between their window's close and their
/// hand-off to the MQTT client (in a batch, the batch's), µs: the queueing
/// in the agent's own output, where a window boundary of many series waits.
pub struct Delays(std::sync::Mutex<hdrhistogram::Histogram<u64>>);

impl Default for Delays {
    /// 1 µs to 10 minutes (longer waits count as 10 minutes), two
    /// significant digits: about 30 KB.
    fn default() -> Delays {
        Delays(std::sync::Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid bounds"),
        ))
    }
}

impl std::fmt::Debug for Delays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Delays")
    }
}

impl Delays {
    /// Records the delay of a record made at `made` (nothing if unknown).
    pub fn record(&self, made: Made) {
        if let (Some(t), Ok(mut h)) = (made.0, self.0.lock()) {
            h.saturating_record(t.elapsed().as_micros().min(u128::from(u64::MAX)) as u64);
        }
    }

    /// Runs `f` on the histogram so far (under its lock: no copy).
    pub fn read<T>(&self, f: impl FnOnce(&hdrhistogram::Histogram<u64>) -> T) -> T {
        match self.0.lock() {
            Ok(h) => f(&h),
            Err(e) => f(&e.into_inner()),
        }
    }
}

/// What the output task delivered.
#[derive(Debug, Default)]
pub struct OutputStats {
    /// From each aggregate's window close to its hand-off to the MQTT
    /// client.
    pub aggregate_delay: Delays,
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
    /// Live messages not published because no MQTT packet can hold them
    /// (over `MAX_OUTGOING_PACKET`).
    pub too_large: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window boundary of 10,000 series puts 10,000 records in the
    /// aggregate channel at once: each takes the size of the largest
    /// variant, so every large one is boxed.
    #[test]
    fn a_record_in_a_channel_stays_small() {
        let size = std::mem::size_of::<Record>();
        println!(
            "size_of::<Record>() = {size}, an alert event unboxed {}",
            std::mem::size_of::<AlertEvent>()
        );
        assert!(size <= 40, "{size} bytes");
        // And the aggregate in its box, without the extras few rules use.
        let aggregate = std::mem::size_of::<AggregateRecord>();
        assert!(
            aggregate <= 232,
            "size_of::<AggregateRecord>() = {aggregate}"
        );
    }
}
