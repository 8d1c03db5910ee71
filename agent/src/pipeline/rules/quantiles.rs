//! A rule's quantile sketches: a DDSketch sized by the rule (relative
//! accuracy over a range of magnitudes, from `sluice-core`), or a KLL
//! sketch (rank accuracy, in Apache DataSketches' format, from the
//! `datasketches` crate: the agent only, the core need not carry it).

use serde::{Deserialize, Serialize};
use sluice_core::Timestamp;
use sluice_core::aggregate::Accumulator;
use sluice_core::sketch::DdSketch;

use datasketches::common::SearchCriteria;
use datasketches::kll::{KllFloat, KllSketch};

use super::{DEFAULT_KLL_K, DEFAULT_QUANTILE_ACCURACY, QuantileMethod, QuantilesRule};

/// Buckets per sign of a window's DDSketch when the rule gives no `range`:
/// at 1 % accuracy they span values within a factor of about 13 of each
/// other before the lowest are merged (see `sluice_core::sketch::DdSketch`).
pub const DEFAULT_QUANTILE_BUCKETS: usize = 128;
/// The most buckets per sign a `range` may ask for: 32 KiB a sketch, and
/// a factor of 10^17 at 1 %.
pub const MAX_QUANTILE_BUCKETS: usize = 2048;

/// The shape of a rule's quantile sketches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantileShape {
    /// A DDSketch.
    Dd {
        /// Relative accuracy.
        accuracy: f64,
        /// Buckets per sign (the sketch holds twice as many).
        buckets: usize,
    },
    /// A KLL sketch of this `k`.
    Kll {
        /// KLL's `k`.
        k: u16,
    },
}

impl Default for QuantileShape {
    fn default() -> Self {
        QuantileShape::Dd {
            accuracy: DEFAULT_QUANTILE_ACCURACY,
            buckets: DEFAULT_QUANTILE_BUCKETS,
        }
    }
}

impl QuantileShape {
    /// The shape `quantiles` asks for, or why it cannot be had (the error
    /// starts with the key it is about).
    pub fn of(rule: &QuantilesRule) -> Result<QuantileShape, String> {
        if rule.method == QuantileMethod::Kll {
            if rule.accuracy_set || rule.range.is_some() {
                return Err(
                    "method: \"kll\" bounds the rank, not the value: accuracy and range are DDSketch's (set k instead)"
                        .into(),
                );
            }
            let k = rule.k.unwrap_or(DEFAULT_KLL_K);
            if k < 8 {
                return Err(format!("k: {k} must be from 8 to 65535 (200: about 1.3 %)"));
            }
            return Ok(QuantileShape::Kll { k });
        }
        if rule.k.is_some() {
            return Err("k: is KLL's: set method = \"kll\" too".into());
        }
        let accuracy = rule.accuracy;
        if !(0.0001..=0.5).contains(&accuracy) {
            return Err(format!(
                "accuracy: {accuracy} must be from 0.0001 to 0.5 (0.01 is 1 %)"
            ));
        }
        let Some([lo, hi]) = rule.range else {
            return Ok(QuantileShape::Dd {
                accuracy,
                buckets: DEFAULT_QUANTILE_BUCKETS,
            });
        };
        if !(lo > 0.0 && lo < hi && hi.is_finite()) {
            return Err(format!(
                "range: [{lo}, {hi}] must be two magnitudes 0 < lo < hi, e.g. [0.1, 1000.0] (a range of negative values is given by its magnitudes)"
            ));
        }
        match DdSketch::<Box<[u64]>>::buckets_to_cover(accuracy, lo, hi) {
            Some(buckets) if buckets <= MAX_QUANTILE_BUCKETS => Ok(QuantileShape::Dd {
                accuracy,
                buckets: buckets.max(2),
            }),
            needed => Err(format!(
                "range: covering [{lo}, {hi}] within {accuracy} takes {} buckets a sign, more than {MAX_QUANTILE_BUCKETS} (32 KiB a window): narrow the range or loosen the accuracy",
                needed.map_or("too many".to_string(), |n| n.to_string())
            )),
        }
    }
}

/// One window's sketch.
#[derive(Clone)]
enum Sketch {
    Dd(DdSketch<Box<[u64]>>),
    Kll(KllSketch<KllFloat<f64>>),
}

/// A quantile and how far it may be off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    /// The value.
    pub value: f64,
    /// DDSketch: the rank fell among values collapsed for lack of buckets
    /// (the value is a bound, not within the accuracy).
    pub collapsed: bool,
}

/// A window's quantile sketch, allocated when its pane takes its first
/// value (so that empty panes cost one pointer), shaped by the rule.
#[derive(Clone, Default)]
pub struct Quantiles(Option<Box<Sketch>>);

/// Checkpointed in each sketch's own format (which carries its shape):
/// the core's versioned, checksummed encoding for a DDSketch (it starts
/// with `SLSK`), DataSketches' for KLL.
impl Serialize for Quantiles {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.0.as_deref().map(Sketch::to_bytes);
        bytes.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Quantiles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<Vec<u8>>::deserialize(d)? {
            None => Ok(Quantiles(None)),
            Some(bytes) => Sketch::from_bytes(&bytes)
                .map(|s| Quantiles(Some(Box::new(s))))
                .map_err(|e| serde::de::Error::custom(format!("quantile sketch: {e}"))),
        }
    }
}

impl Sketch {
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            Sketch::Dd(sketch) => {
                let mut buf = vec![0; sketch.serialized_len()];
                let n = sketch.write_to(&mut buf).unwrap_or(0);
                buf.truncate(n);
                buf
            }
            Sketch::Kll(sketch) => sketch.serialize(),
        }
    }

    fn from_bytes(bytes: &[u8]) -> Result<Sketch, String> {
        if !bytes.starts_with(b"SLSK") {
            return KllSketch::deserialize(bytes)
                .map(Sketch::Kll)
                .map_err(|e| e.to_string());
        }
        let len = DdSketch::<Box<[u64]>>::storage_len(bytes).map_err(|e| e.to_string())?;
        if len > 2 * MAX_QUANTILE_BUCKETS {
            return Err(format!("{len} buckets, more than any rule asks for"));
        }
        DdSketch::read_from(bytes, vec![0; len].into_boxed_slice())
            .map(Sketch::Dd)
            .map_err(|e| e.to_string())
    }
}

impl Quantiles {
    /// The value at quantile `q`: within the rule's accuracy of the exact
    /// one (DDSketch, unless `collapsed`), or of rank within the KLL
    /// sketch's rank error of `q`.
    pub fn quantile(&self, q: f64) -> Option<Answer> {
        match self.0.as_deref()? {
            Sketch::Dd(s) => s.quantile_detail(q).map(|a| Answer {
                value: a.value,
                collapsed: a.collapsed,
            }),
            Sketch::Kll(s) => {
                let value = s.quantile(q, SearchCriteria::Inclusive).ok()??;
                Some(Answer {
                    value: value.into_inner(),
                    collapsed: false,
                })
            }
        }
    }

    /// The shape of the sketch, once it holds one.
    pub fn shape(&self) -> Option<QuantileShape> {
        Some(match self.0.as_deref()? {
            Sketch::Dd(s) => QuantileShape::Dd {
                accuracy: s.relative_error(),
                buckets: s.buckets_per_sign(),
            },
            Sketch::Kll(s) => QuantileShape::Kll { k: s.k() },
        })
    }

    /// A KLL sketch's normalized rank error (99 % confidence), if it is one.
    pub fn rank_error(&self) -> Option<f64> {
        match self.0.as_deref()? {
            Sketch::Kll(s) => Some(crate::store::outbox::kll_rank_error(s.min_k())),
            Sketch::Dd(_) => None,
        }
    }

    /// A KLL sketch in DataSketches' format, if it is one.
    pub fn kll_bytes(&self) -> Option<Vec<u8>> {
        match self.0.as_deref()? {
            Sketch::Kll(s) => Some(s.serialize()),
            Sketch::Dd(_) => None,
        }
    }
}

impl Accumulator for Quantiles {
    type Params = QuantileShape;

    fn empty() -> Self {
        Self(None)
    }

    fn with_params(shape: &QuantileShape) -> Self {
        Self(Some(Box::new(match *shape {
            QuantileShape::Dd { accuracy, buckets } => Sketch::Dd(
                DdSketch::with_storage(vec![0; 2 * buckets].into_boxed_slice(), accuracy)
                    .expect("shape validated by QuantileShape::of"),
            ),
            QuantileShape::Kll { k } => {
                Sketch::Kll(KllSketch::new(k).expect("k validated by QuantileShape::of"))
            }
        })))
    }

    fn add(&mut self, _ts: Timestamp, value: f64) {
        // Only a window made without its rule's shape starts empty.
        if self.0.is_none() {
            *self = Self::with_params(&QuantileShape::default());
        }
        match self.0.as_deref_mut() {
            Some(Sketch::Dd(s)) => {
                s.insert(value);
            }
            Some(Sketch::Kll(s)) => {
                // Windows refuse NaN and infinities before this.
                if let Ok(v) = KllFloat::<f64>::new(value) {
                    s.update(v);
                }
            }
            None => {}
        }
    }

    fn merge(&mut self, other: &Self) {
        match (&mut self.0, &other.0) {
            (_, None) => {}
            (None, Some(o)) => self.0 = Some(o.clone()),
            (Some(s), Some(o)) => {
                // The windows of a rule share its shape: the merge cannot
                // fail.
                let merged = match (&mut **s, &**o) {
                    (Sketch::Dd(s), Sketch::Dd(o)) => s.merge(o).is_ok(),
                    (Sketch::Kll(s), Sketch::Kll(o)) => s.merge(o).is_ok(),
                    _ => false,
                };
                debug_assert!(merged, "quantile sketches of different shapes");
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self.0.as_deref() {
            None => true,
            Some(Sketch::Dd(s)) => s.count() == 0,
            Some(Sketch::Kll(s)) => s.is_empty(),
        }
    }
}
