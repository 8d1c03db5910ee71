//! What a rule asks for: the `[[rules]]` settings as the configuration
//! file writes them. Plain data; what they compile to is in the parent
//! module, and so is their validation.

use serde::{Deserialize, Serialize};

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
    /// Count the distinct values of this label (see `labels` in a source's
    /// JSON mapping) per window: nearly exact up to 384 values, then within
    /// 1.3 % (standard error). Needs a tumbling window. Default: none.
    pub distinct: Option<String>,
    /// The `k` most frequent values of a label per window, with counts.
    /// Needs a tumbling window. Default: none.
    pub top_k: Option<TopKRule>,
    /// Raise a `first_seen` alert the first time a value of a label appears
    /// in a series (for example a new device on a BLE gateway). Default:
    /// none.
    pub first_seen: Option<FirstSeenRule>,
    /// A uniform sample of `k` readings (event time and value) per window.
    /// Needs a tumbling window. Default: none.
    pub sample: Option<SampleRule>,
    /// Records carry the `distinct` sketch, base64, in the Apache
    /// DataSketches HLL format, so that upstream can merge windows and
    /// gateways (`sluice`'s outbox does when it downsamples). Default false.
    #[serde(default)]
    pub sketches: bool,
    /// `critical` series are never shed; `normal` (default) ones may be.
    #[serde(default)]
    pub priority: PriorityKind,
}

/// `top_k = { label, k }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopKRule {
    /// The label.
    pub label: String,
    /// How many values to report (1 to 1,000).
    pub k: usize,
}

/// `first_seen = { label, capacity, fpr }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirstSeenRule {
    /// The label.
    pub label: String,
    /// Distinct values the filter is sized for, per series (memory:
    /// about 1.2 bytes per value at `fpr` 1 %). Default 100,000.
    #[serde(default = "default_capacity")]
    pub capacity: u64,
    /// The chance that a new value goes unreported because it looks like
    /// one seen before, up to `capacity` values. Past `capacity` new
    /// values are counted, not alerted. Default 0.01.
    #[serde(default = "default_fpr")]
    pub fpr: f64,
}

/// `sample = { k }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRule {
    /// Readings kept per window (1 to 1,000).
    pub k: usize,
}

const fn default_capacity() -> u64 {
    100_000
}
const fn default_fpr() -> f64 {
    0.01
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
