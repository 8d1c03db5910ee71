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
    /// Quantiles to report with each window's aggregates (needs a window):
    /// `[0.5, 0.9, 0.99]`, or `{ at = [...], accuracy, range = [lo, hi] }`
    /// to size the sketch for the values to expect. Default: none.
    #[serde(default)]
    pub quantiles: QuantilesRule,
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
    /// How often each value of a label occurred per window, in a
    /// Count-Min sketch: the counts of the `values` named, and with
    /// `sketches = true` the sketch, to ask upstream about any value.
    /// Needs a tumbling window. Default: none.
    pub frequency: Option<FrequencyRule>,
    /// Records carry the `distinct` sketch and the KLL quantile sketch
    /// (`method = "kll"`), base64, in Apache DataSketches' HLL and KLL
    /// formats, and the `frequency` Count-Min sketch in the core's own
    /// format, so that upstream can merge windows and gateways
    /// (`sluice`'s outbox does when it downsamples). Default false.
    #[serde(default)]
    pub sketches: bool,
    /// `critical` series are never shed; `normal` (default) ones may be.
    #[serde(default)]
    pub priority: PriorityKind,
    /// Join each series to the row of its id in this reference table
    /// (`[tables.<name>]`): records carry the row, `calibrate` and
    /// thresholds may use its columns. Default: none.
    pub table: Option<String>,
    /// A series without a row in `table`: `"pass"` (default: it goes on
    /// without one; thresholds from columns do not apply to it),
    /// `"refuse"` (its readings are dropped and counted in
    /// `sluice_table_unmatched_total`) or `"default"` (it takes the row
    /// whose key is `*`).
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Turn each reading's value into `value × scale + offset` (the row's
    /// `scale` and `offset` columns; 1 and 0 when absent) before windows
    /// and detectors see it. Needs `table`. Default false.
    #[serde(default)]
    pub calibrate: bool,
    /// Join each series by the value of this label of its readings instead
    /// of its id (the table's `key` column holds the label's values, e.g.
    /// one row per site). The row follows the label: a reading whose
    /// value differs from the last one's joins the new value's row. A
    /// reading without the label has no row (`on_missing` applies). Needs
    /// `table`. Default: join by series id.
    pub join_label: Option<String>,
    /// Aggregate across the series the rule matches: `"*"` makes them one
    /// group, a label's name one group per value of that label. A group
    /// is then the rule's unit: its windows, sketches and detectors see
    /// the readings of all its members, and its records and alerts name
    /// it (see `group_name`). Needs a window; not with `rate_of_change`.
    /// Default: each series on its own.
    pub group_by: Option<String>,
    /// The series id of the group (`group_by = "*"`), or the part before
    /// `:<value>` in those of a label's groups: 1 to 32 bytes, no `:`.
    /// Default: the rule's `match`.
    pub group_name: Option<String>,
}

/// `quantiles = [0.5, 0.99]`, or as a table
/// `{ at = [0.5, 0.99], accuracy = 0.01, range = [0.1, 1000.0] }` (a
/// DDSketch: relative accuracy) or `{ at = [0.5, 0.99], method = "kll",
/// k = 200 }` (a KLL sketch: rank accuracy, in the DataSketches format).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantilesRule {
    /// The quantiles to report, each in (0, 1).
    pub at: Vec<f64>,
    /// The sketch: `"ddsketch"` (default) or `"kll"`.
    pub method: QuantileMethod,
    /// KLL's `k` (8 to 65,535; default 200: rank error about 1.3 %).
    pub k: Option<u16>,
    /// Relative accuracy of each reported quantile (0.0001 to 0.5).
    /// Default 0.01.
    pub accuracy: f64,
    /// The magnitudes (`0 < lo < hi`) that a window's sketch keeps within
    /// `accuracy` all at once; a window whose values span more folds its
    /// smallest together and says so (`quantiles_collapsed`). Default: 128
    /// buckets a sign, a factor of about 13 at 1 %.
    pub range: Option<[f64; 2]>,
    /// Written as a table (errors then name `quantiles.at`).
    pub table: bool,
    /// `accuracy` was written (it belongs to DDSketch alone).
    pub accuracy_set: bool,
}

/// How a rule's quantiles are sketched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantileMethod {
    /// DDSketch: each quantile within a relative `accuracy` of its value.
    #[default]
    Ddsketch,
    /// KLL (Apache DataSketches' format): each quantile's rank within
    /// about 1.3 % (at `k` = 200) of the requested one, whatever the
    /// values' range; with `sketches = true` records carry the sketch.
    Kll,
}

/// KLL's `k` when the rule does not set one.
pub const DEFAULT_KLL_K: u16 = 200;

/// Accuracy of reported quantiles when the rule does not set one.
pub const DEFAULT_QUANTILE_ACCURACY: f64 = 0.01;

impl Default for QuantilesRule {
    fn default() -> Self {
        QuantilesRule {
            at: Vec::new(),
            method: QuantileMethod::Ddsketch,
            k: None,
            accuracy: DEFAULT_QUANTILE_ACCURACY,
            range: None,
            table: false,
            accuracy_set: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantilesTable {
    at: Vec<f64>,
    #[serde(default)]
    method: QuantileMethod,
    k: Option<u16>,
    accuracy: Option<f64>,
    range: Option<[f64; 2]>,
}

/// A list or a table, told apart by what the file holds (not by trying
/// each in turn, so that an error inside the table names its key).
impl<'de> Deserialize<'de> for QuantilesRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};

        struct Form;
        impl<'de> serde::de::Visitor<'de> for Form {
            type Value = QuantilesRule;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of quantiles, e.g. [0.5, 0.99], or a table { at = [0.5, 0.99], accuracy = 0.01, range = [0.1, 1000.0] }")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                Ok(QuantilesRule {
                    at: Vec::deserialize(SeqAccessDeserializer::new(seq))?,
                    ..QuantilesRule::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let t = QuantilesTable::deserialize(MapAccessDeserializer::new(map))?;
                Ok(QuantilesRule {
                    at: t.at,
                    method: t.method,
                    k: t.k,
                    accuracy_set: t.accuracy.is_some(),
                    accuracy: t.accuracy.unwrap_or(DEFAULT_QUANTILE_ACCURACY),
                    range: t.range,
                    table: true,
                })
            }
        }
        d.deserialize_any(Form)
    }
}

/// Written as the list when only the quantiles are set (so that settings
/// fingerprints saved before the table form still match).
impl Serialize for QuantilesRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let ddsketch = self.method == QuantileMethod::Ddsketch;
        if ddsketch && self.range.is_none() && self.accuracy == DEFAULT_QUANTILE_ACCURACY {
            return self.at.serialize(s);
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("at", &self.at)?;
        if ddsketch {
            map.serialize_entry("accuracy", &self.accuracy)?;
            if let Some(range) = &self.range {
                map.serialize_entry("range", range)?;
            }
        } else {
            map.serialize_entry("method", &self.method)?;
            map.serialize_entry("k", &self.k.unwrap_or(DEFAULT_KLL_K))?;
        }
        map.end()
    }
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

/// `frequency = { label, epsilon, delta, values }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyRule {
    /// The label.
    pub label: String,
    /// Each count overestimates by at most `epsilon` times the window's
    /// readings with the label (0.0001 to 0.5; default 0.01: 272 counters
    /// a row).
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// ... except with probability `delta` (1e-6 to 0.5; default 0.01: 5
    /// rows).
    #[serde(default = "default_fpr")]
    pub delta: f64,
    /// Values whose counts the record reports (at most 100). Default: none.
    #[serde(default)]
    pub values: Vec<String>,
}

const fn default_epsilon() -> f64 {
    0.01
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
/// `{ kind = "tumbling" | "hopping" | "count" | "decaying" | "session", … }`.
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
    /// A window per burst of readings, closed by `gap_ms` without any (a
    /// machine's run), spanning less than `max_ms`.
    Session(SessionRule),
}

/// `kind = "session"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRule {
    /// The silence that ends a session, ms.
    pub gap_ms: i64,
    /// The longest span of a session, ms (its first reading to its last).
    /// Default: a day.
    #[serde(default = "default_session_max_ms")]
    pub max_ms: i64,
    /// How long to wait for out-of-order readings, ms (at most 3 gaps).
    #[serde(default)]
    pub lateness_ms: i64,
}

const fn default_session_max_ms() -> i64 {
    86_400_000
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
    /// Raise at or above this value (set `above` or `below`, not both), or
    /// the value of a column of the rule's table (`"@max_temp"`).
    pub above: Option<Limit>,
    /// Raise at or below this value (or `"@column"`).
    pub below: Option<Limit>,
    /// Clear once the value is back past this one (below it for `above`,
    /// above it for `below`), or `"@column"`. Default: the limit itself.
    pub clear_at: Option<Limit>,
    /// Consecutive readings past the limit to raise. Default 1.
    #[serde(default = "one")]
    pub raise_after: u32,
    /// Consecutive readings back to clear. Default 1.
    #[serde(default = "one")]
    pub clear_after: u32,
}

/// A threshold's level: a number, or `"@column"` of the rule's table.
#[derive(Debug, Clone, PartialEq)]
pub enum Limit {
    /// This value.
    Value(f64),
    /// The series' row's value in this column.
    Column(String),
}

impl Limit {
    /// The column it reads, if it reads one.
    pub fn column(&self) -> Option<&str> {
        match self {
            Limit::Value(_) => None,
            Limit::Column(c) => Some(c),
        }
    }

    /// Its value for a series joined to `row` (`None`: a column the row
    /// lacks or holds no number in, or no row).
    pub fn resolve(&self, row: Option<&super::tables::Row>) -> Option<f64> {
        match self {
            Limit::Value(x) => Some(*x),
            Limit::Column(c) => super::tables::number(row?, c),
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Value(x) => s.serialize_f64(*x),
            Limit::Column(c) => s.serialize_str(&format!("@{c}")),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Limit;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, or \"@column\" of the rule's table")
            }
            fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Limit, E> {
                Ok(Limit::Value(x))
            }
            fn visit_i64<E: serde::de::Error>(self, x: i64) -> Result<Limit, E> {
                Ok(Limit::Value(x as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, x: u64) -> Result<Limit, E> {
                Ok(Limit::Value(x as f64))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Limit, E> {
                match text.strip_prefix('@') {
                    Some(c) if !c.is_empty() => Ok(Limit::Column(c.to_owned())),
                    _ => Err(E::custom(format!(
                        "{text:?}: a number, or \"@column\" of the rule's table"
                    ))),
                }
            }
        }
        d.deserialize_any(Visit)
    }
}

/// What a series without a row in its rule's table gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// It goes on without a row.
    #[default]
    Pass,
    /// Its readings are dropped, counted.
    Refuse,
    /// It takes the row whose key is `*`.
    Default,
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
