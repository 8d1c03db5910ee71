//! Anomaly scores and the alert state machine.
//!
//! Every rule turns a reading into a *score* and feeds it to one
//! [`AlertMachine`], which raises an alert after the score has been at or above
//! the raise level for `raise_after` consecutive readings, and clears it after
//! the score has been below the (lower) clear level for `clear_after`
//! consecutive readings. The gap between the levels is the hysteresis, the
//! counts the debounce; together they bound flapping: an alert can change state
//! at most once every `min(raise_after, clear_after)` readings.
//!
//! | rule | score |
//! | --- | --- |
//! | [`ZScoreDetector`] | \|x − mean\| / σ against a decaying (EWMA) baseline, after a warm-up |
//! | [`ThresholdDetector`] | the value itself (above a limit) or its negation (below a limit) |
//! | [`RateOfChangeDetector`] | \|Δvalue\| per time unit between consecutive readings |

use crate::Timestamp;
use crate::window::{DecayingStats, Rejection, WindowError, check_finite};

/// A change of an alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// The alert went from normal to raised.
    Raised,
    /// The alert went from raised to normal.
    Cleared,
}

/// Raise and clear levels and their debounce counts.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Hysteresis {
    raise_at: f64,
    clear_below: f64,
    raise_after: u32,
    clear_after: u32,
}

/// A rule's parameters do not make sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleError {
    /// The clear level is above the raise level, or a level is NaN.
    ClearAboveRaise,
    /// A debounce count is zero.
    ZeroCount,
    /// The baseline's decay is invalid.
    Decay(WindowError),
    /// The rate unit is not positive.
    NotPositive,
    /// A level is infinite.
    NotFinite,
    /// A z-score level is negative (or the raise level zero): |z| is
    /// compared with them.
    NegativeScore,
}

impl core::fmt::Display for RuleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RuleError::ClearAboveRaise => {
                f.write_str("clear level must not be above the raise level")
            }
            RuleError::ZeroCount => f.write_str("raise_after and clear_after must be >= 1"),
            RuleError::Decay(e) => write!(f, "baseline: {e}"),
            RuleError::NotPositive => f.write_str("rate unit must be > 0"),
            RuleError::NotFinite => f.write_str("levels must be finite numbers"),
            RuleError::NegativeScore => {
                f.write_str("k must be > 0 and clear_k >= 0 (they are levels of |z|)")
            }
        }
    }
}

impl core::error::Error for RuleError {}

impl Hysteresis {
    /// Raise after `raise_after` consecutive scores `>= raise_at`; clear after
    /// `clear_after` consecutive scores `< clear_below`.
    pub fn new(
        raise_at: f64,
        clear_below: f64,
        raise_after: u32,
        clear_after: u32,
    ) -> Result<Self, RuleError> {
        if raise_at.is_nan() || clear_below.is_nan() || clear_below > raise_at {
            return Err(RuleError::ClearAboveRaise);
        }
        if raise_at.is_infinite() || clear_below.is_infinite() {
            return Err(RuleError::NotFinite);
        }
        if raise_after == 0 || clear_after == 0 {
            return Err(RuleError::ZeroCount);
        }
        Ok(Self {
            raise_at,
            clear_below,
            raise_after,
            clear_after,
        })
    }

    /// The raise level.
    pub fn raise_at(&self) -> f64 {
        self.raise_at
    }

    /// The clear level.
    pub fn clear_below(&self) -> f64 {
        self.clear_below
    }
}

/// Whether an alert is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum AlertState {
    /// No alert.
    #[default]
    Normal,
    /// The alert is active.
    Raised,
}

/// The raise/clear state machine with hysteresis and debounce.
///
/// ```
/// use sluice_core::anomaly::{AlertMachine, Hysteresis, Transition};
///
/// let mut m = AlertMachine::new(Hysteresis::new(10.0, 5.0, 2, 3).unwrap());
/// assert_eq!(m.observe(12.0), None); // one high score is not enough
/// assert_eq!(m.observe(11.0), Some(Transition::Raised));
/// assert_eq!(m.observe(7.0), None); // below 10 but not below 5: stays raised
/// for _ in 0..2 { assert_eq!(m.observe(1.0), None); }
/// assert_eq!(m.observe(1.0), Some(Transition::Cleared));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AlertMachine {
    levels: Hysteresis,
    state: AlertState,
    /// Consecutive scores pushing towards the other state.
    streak: u32,
}

impl AlertMachine {
    /// A machine in the normal state.
    pub fn new(levels: Hysteresis) -> Self {
        Self {
            levels,
            state: AlertState::Normal,
            streak: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> AlertState {
        self.state
    }

    /// The levels.
    pub fn levels(&self) -> &Hysteresis {
        &self.levels
    }

    /// Replaces the levels (a config reload), keeping the state.
    pub fn set_levels(&mut self, levels: Hysteresis) {
        self.levels = levels;
        self.streak = 0;
    }

    /// Feeds one score; returns the transition it caused, if any. A NaN score
    /// counts as "not anomalous".
    #[inline]
    pub fn observe(&mut self, score: f64) -> Option<Transition> {
        let (towards_other, needed) = match self.state {
            AlertState::Normal => (score >= self.levels.raise_at, self.levels.raise_after),
            AlertState::Raised => (
                score < self.levels.clear_below || score.is_nan(),
                self.levels.clear_after,
            ),
        };
        if !towards_other {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        Some(match self.state {
            AlertState::Normal => {
                self.state = AlertState::Raised;
                Transition::Raised
            }
            AlertState::Raised => {
                self.state = AlertState::Normal;
                Transition::Cleared
            }
        })
    }
}

/// What a detector made of one reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The score, or `None` while a baseline is warming up (or for the first
    /// reading of a rate rule).
    pub score: Option<f64>,
    /// The state change this reading caused.
    pub transition: Option<Transition>,
}

/// Scores each value by its distance from a decaying baseline, in standard
/// deviations: z = (x − mean) / σ, with mean and σ from a [`DecayingStats`]
/// *before* the value is added (so a spike does not hide itself).
///
/// The first `warmup` values only train the baseline. A baseline with σ = 0
/// (a constant signal) scores equal values 0 and any other value as infinite.
///
/// ```
/// use sluice_core::anomaly::{Hysteresis, Transition, ZScoreDetector};
///
/// // Alert when |z| >= 4 (clear below 2) with α = 0.01, after 30 values.
/// let mut d = ZScoreDetector::new(0.01, 30, Hysteresis::new(4.0, 2.0, 1, 1).unwrap()).unwrap();
/// for i in 0..100 {
///     let noise = if i % 2 == 0 { 1.0 } else { -1.0 };
///     assert_eq!(d.observe(20.0 + noise).unwrap().transition, None);
/// }
/// let spike = d.observe(35.0).unwrap();
/// assert_eq!(spike.transition, Some(Transition::Raised));
/// assert!(spike.score.unwrap() > 10.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ZScoreDetector {
    baseline: DecayingStats,
    warmup: u64,
    machine: AlertMachine,
    last_z: Option<f64>,
}

impl ZScoreDetector {
    /// A baseline with EWMA smoothing factor `alpha` (λ = 1 − α), scoring from
    /// the `warmup`-th value on, raising and clearing by `levels` on |z|.
    pub fn new(alpha: f64, warmup: u64, levels: Hysteresis) -> Result<Self, RuleError> {
        if levels.raise_at() <= 0.0 || levels.clear_below() < 0.0 {
            return Err(RuleError::NegativeScore);
        }
        Ok(Self {
            baseline: DecayingStats::from_alpha(alpha).map_err(RuleError::Decay)?,
            warmup,
            machine: AlertMachine::new(levels),
            last_z: None,
        })
    }

    /// Scores `value`, then adds it to the baseline. Refuses NaN and infinities
    /// without touching any state.
    #[inline]
    pub fn observe(&mut self, value: f64) -> Result<Verdict, Rejection> {
        check_finite(value)?;
        let z = if self.baseline.count() >= self.warmup.max(1) {
            let mean = self.baseline.mean().unwrap_or(value);
            let sd = self.baseline.stddev().unwrap_or(0.0);
            let delta = value - mean;
            Some(if sd > 0.0 {
                delta / sd
            } else if delta == 0.0 {
                0.0
            } else if delta > 0.0 {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            })
        } else {
            None
        };
        self.baseline.push(value)?;
        self.last_z = z;
        let transition = z.and_then(|z| self.machine.observe(libm::fabs(z)));
        Ok(Verdict {
            score: z,
            transition,
        })
    }

    /// The baseline.
    pub fn baseline(&self) -> &DecayingStats {
        &self.baseline
    }

    /// The z-score of the last value, if it was scored.
    pub fn last_z(&self) -> Option<f64> {
        self.last_z
    }

    /// The alert state machine.
    pub fn machine(&mut self) -> &mut AlertMachine {
        &mut self.machine
    }

    /// The current alert state.
    pub fn state(&self) -> AlertState {
        self.machine.state()
    }
}

/// Raises when the value crosses a fixed limit, from above or from below.
///
/// ```
/// use sluice_core::anomaly::{ThresholdDetector, Transition};
///
/// // Too cold below 2.0; back to normal at 3.0 or more; 2 readings each way.
/// let mut d = ThresholdDetector::below(2.0, 3.0, 2, 2).unwrap();
/// assert_eq!(d.observe(1.0).unwrap().transition, None);
/// assert_eq!(d.observe(1.5).unwrap().transition, Some(Transition::Raised));
/// assert_eq!(d.observe(2.5).unwrap().transition, None); // inside the band
/// assert_eq!(d.observe(3.0).unwrap().transition, None); // not above 3.0
/// assert_eq!(d.observe(3.5).unwrap().transition, None);
/// assert_eq!(d.observe(4.0).unwrap().transition, Some(Transition::Cleared));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ThresholdDetector {
    /// +1 for an upper limit, −1 for a lower one: score = sign · value.
    sign: f64,
    machine: AlertMachine,
}

impl ThresholdDetector {
    /// Raises when the value is `>= limit` for `raise_after` readings; clears
    /// when it is `< clear_below` (at most `limit`) for `clear_after` readings.
    pub fn above(
        limit: f64,
        clear_below: f64,
        raise_after: u32,
        clear_after: u32,
    ) -> Result<Self, RuleError> {
        Ok(Self {
            sign: 1.0,
            machine: AlertMachine::new(Hysteresis::new(
                limit,
                clear_below,
                raise_after,
                clear_after,
            )?),
        })
    }

    /// Raises when the value is `<= limit` for `raise_after` readings; clears
    /// when it is `> clear_above` (at least `limit`) for `clear_after` readings.
    pub fn below(
        limit: f64,
        clear_above: f64,
        raise_after: u32,
        clear_after: u32,
    ) -> Result<Self, RuleError> {
        Ok(Self {
            sign: -1.0,
            machine: AlertMachine::new(Hysteresis::new(
                -limit,
                -clear_above,
                raise_after,
                clear_after,
            )?),
        })
    }

    /// The limit, in the value's units.
    pub fn limit(&self) -> f64 {
        self.sign * self.machine.levels().raise_at()
    }

    /// The value the reading must be back past to clear, in the reading's
    /// units (for `above`, values below it clear; for `below`, above it).
    pub fn clear_level(&self) -> f64 {
        self.sign * self.machine.levels().clear_below()
    }

    /// Scores `value` (the score is the value itself); refuses NaN and
    /// infinities without touching any state.
    #[inline]
    pub fn observe(&mut self, value: f64) -> Result<Verdict, Rejection> {
        check_finite(value)?;
        Ok(Verdict {
            score: Some(value),
            transition: self.machine.observe(self.sign * value),
        })
    }

    /// The current alert state.
    pub fn state(&self) -> AlertState {
        self.machine.state()
    }
}

/// Raises when the value changes faster than a limit: score = |Δvalue| per
/// `unit` of event time between consecutive readings.
///
/// A reading not newer than the previous one (out of order, or a duplicate
/// time) is not scored, and does not replace the previous reading.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RateOfChangeDetector {
    unit: Timestamp,
    previous: Option<(Timestamp, f64)>,
    machine: AlertMachine,
}

impl RateOfChangeDetector {
    /// Rates are per `unit` of event time (e.g. 1000 for "per second" with
    /// timestamps in ms); raise and clear by `levels` on |rate|.
    pub fn new(unit: Timestamp, levels: Hysteresis) -> Result<Self, RuleError> {
        if unit <= 0 {
            return Err(RuleError::NotPositive);
        }
        Ok(Self {
            unit,
            previous: None,
            machine: AlertMachine::new(levels),
        })
    }

    /// The raise and clear levels (per `unit`).
    pub fn levels(&self) -> &Hysteresis {
        self.machine.levels()
    }

    /// Scores the change from the previous reading; refuses NaN and infinities
    /// without touching any state.
    #[inline]
    pub fn observe(&mut self, ts: Timestamp, value: f64) -> Result<Verdict, Rejection> {
        check_finite(value)?;
        let rate = match self.previous {
            Some((prev_ts, _)) if ts <= prev_ts => {
                return Ok(Verdict {
                    score: None,
                    transition: None,
                });
            }
            Some((prev_ts, prev)) => {
                let dt = ts.saturating_sub(prev_ts) as f64;
                Some(libm::fabs(value - prev) * self.unit as f64 / dt)
            }
            None => None,
        };
        self.previous = Some((ts, value));
        Ok(Verdict {
            score: rate,
            transition: rate.and_then(|r| self.machine.observe(r)),
        })
    }

    /// The current alert state.
    pub fn state(&self) -> AlertState {
        self.machine.state()
    }
}
