//! Sequence patterns: condition A followed by condition B within a time
//! bound, or A *not* followed by B within it, as a fixed-memory state
//! machine (simple complex-event processing).
//!
//! Each condition is a [`ThresholdDetector`], with its hysteresis and
//! debounce: an *event* is the moment a condition is raised (a level
//! crossed after `raise_after` readings), not every reading past its level,
//! so a temperature that stays above 80 is one event until it has cleared.
//!
//! - [`Mode::FollowedBy`]: an event of B at most `within` after the latest
//!   event of A (by event time, B's not before A's) raises the pattern once;
//!   A must happen again for it to be raised again. The pattern clears
//!   when B's condition clears. An A left without B past `within` expires
//!   (counted).
//! - [`Mode::NotFollowedBy`]: an event of A arms a deadline (the earliest
//!   unanswered A's time plus `within`); an event of B before it answers A.
//!   Event time reaching the deadline (a reading of either input, or
//!   [`Sequence::advance_to`] from a tick) raises the pattern; the next
//!   event of B clears it.
//!
//! Conditions are judged in arrival order. The bound is kept on event time:
//! a pending A settles (expires, or raises a `NotFollowedBy` pattern) as
//! soon as the largest event time seen on either input passes A's time plus
//! `within`, and a B matches an A only if it is not before it.

use crate::Timestamp;
use crate::anomaly::{AlertState, ThresholdDetector, Transition};
use crate::window::{Rejection, check_finite, check_time};

/// Which input of a pattern a value is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Condition A (`first`).
    First,
    /// Condition B (`then`).
    Then,
}

/// What a pattern looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Mode {
    /// A, then B within the bound.
    FollowedBy,
    /// A, and no B within the bound.
    NotFollowedBy,
}

/// A change of a pattern's alert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// The pattern happened: A's event at `first`, and B's at `at`
    /// (`FollowedBy`), or no B by the deadline `at` (`NotFollowedBy`).
    Raised {
        /// Event time of A's event.
        first: Timestamp,
        /// Event time of B's event, or the deadline that passed.
        at: Timestamp,
    },
    /// The pattern's alert cleared at event time `at`.
    Cleared {
        /// Event time of the reading that cleared it.
        at: Timestamp,
    },
}

/// What a pattern has counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SequenceStats {
    /// Times the pattern was raised.
    pub raised: u64,
    /// Events of A that expired without B (`FollowedBy`), or that B
    /// answered in time (`NotFollowedBy`).
    pub settled: u64,
}

/// A pattern's state: see the [module docs](self).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Sequence {
    first: ThresholdDetector,
    then: ThresholdDetector,
    within: Timestamp,
    mode: Mode,
    /// Event time of the pending event of A.
    armed: Option<Timestamp>,
    raised: bool,
    /// Largest event time seen.
    max_event: Option<Timestamp>,
    stats: SequenceStats,
}

impl Sequence {
    /// A pattern of conditions `first` and `then`, `within` apart at most
    /// (≥ 0, in the unit of the event times).
    pub fn new(
        first: ThresholdDetector,
        then: ThresholdDetector,
        within: Timestamp,
        mode: Mode,
    ) -> Result<Self, crate::window::WindowError> {
        if within < 0 {
            return Err(crate::window::WindowError::NotPositive);
        }
        Ok(Self {
            first,
            then,
            within,
            mode,
            armed: None,
            raised: false,
            max_event: None,
            stats: SequenceStats::default(),
        })
    }

    /// Whether the pattern's alert is raised.
    pub fn state(&self) -> AlertState {
        if self.raised {
            AlertState::Raised
        } else {
            AlertState::Normal
        }
    }

    /// The event time of the pending event of A, if any.
    pub fn armed(&self) -> Option<Timestamp> {
        self.armed
    }

    /// The bound.
    pub fn within(&self) -> Timestamp {
        self.within
    }

    /// Counts so far.
    pub fn stats(&self) -> SequenceStats {
        self.stats
    }

    /// Offers `value`, observed at `ts`, to condition `step`. Returns the
    /// changes of the pattern's alert, oldest first (a deadline that the
    /// new event time passes, then what this value's event does).
    pub fn observe(
        &mut self,
        step: Step,
        ts: Timestamp,
        value: f64,
    ) -> Result<[Option<Change>; 2], Rejection> {
        check_finite(value).and(check_time(ts))?;
        let passed = self.advance_to(ts);
        let detector = match step {
            Step::First => &mut self.first,
            Step::Then => &mut self.then,
        };
        let verdict = detector.observe(value)?;
        let now = match (step, verdict.transition) {
            (Step::First, Some(Transition::Raised)) => {
                self.on_first(ts);
                // An A whose bound event time has already passed (it came
                // late) settles at once.
                self.expire()
            }
            (Step::Then, Some(Transition::Raised)) => self.on_then(ts),
            (Step::Then, Some(Transition::Cleared))
                if self.mode == Mode::FollowedBy && self.raised =>
            {
                self.raised = false;
                Some(Change::Cleared { at: ts })
            }
            _ => None,
        };
        Ok([passed, now])
    }

    fn on_first(&mut self, ts: Timestamp) {
        match self.mode {
            // The latest A gives B the most time.
            Mode::FollowedBy => self.armed = Some(ts),
            // The earliest unanswered A sets the deadline.
            Mode::NotFollowedBy => {
                if self.armed.is_none() {
                    self.armed = Some(ts);
                }
            }
        }
    }

    fn on_then(&mut self, ts: Timestamp) -> Option<Change> {
        match self.mode {
            Mode::FollowedBy => {
                let first = self.armed?;
                if ts < first || ts - first > self.within {
                    return None;
                }
                self.armed = None;
                self.raised = true;
                self.stats.raised += 1;
                Some(Change::Raised { first, at: ts })
            }
            Mode::NotFollowedBy => {
                if self.armed.is_some_and(|first| ts >= first) {
                    self.armed = None;
                    self.stats.settled += 1;
                }
                if self.raised {
                    self.raised = false;
                    return Some(Change::Cleared { at: ts });
                }
                None
            }
        }
    }

    /// Moves event time to `ts` (from a reading, or a tick while the inputs
    /// are quiet): a pending A whose bound it passes expires
    /// (`FollowedBy`) or raises the pattern (`NotFollowedBy`).
    pub fn advance_to(&mut self, ts: Timestamp) -> Option<Change> {
        let ts = ts.clamp(-crate::MAX_TIMESTAMP, crate::MAX_TIMESTAMP);
        if self.max_event.is_some_and(|m| m >= ts) {
            return None;
        }
        self.max_event = Some(ts);
        self.expire()
    }

    /// Settles the pending A if the largest event time seen is past its
    /// bound.
    fn expire(&mut self) -> Option<Change> {
        let first = self.armed?;
        let deadline = first.saturating_add(self.within);
        if self.max_event.is_none_or(|m| m <= deadline) {
            return None;
        }
        self.armed = None;
        match self.mode {
            Mode::FollowedBy => {
                self.stats.settled += 1;
                None
            }
            Mode::NotFollowedBy => {
                self.raised = true;
                self.stats.raised += 1;
                Some(Change::Raised {
                    first,
                    at: deadline,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn above(limit: f64, clear: f64) -> ThresholdDetector {
        ThresholdDetector::above(limit, clear, 1, 1).unwrap()
    }

    fn below(limit: f64, clear: f64) -> ThresholdDetector {
        ThresholdDetector::below(limit, clear, 1, 1).unwrap()
    }

    fn run(seq: &mut Sequence, steps: &[(Step, Timestamp, f64)]) -> Vec<Change> {
        steps
            .iter()
            .flat_map(|&(step, ts, v)| seq.observe(step, ts, v).unwrap())
            .flatten()
            .collect()
    }

    #[test]
    fn a_then_b_within_the_bound_raises_once_and_clears_with_b() {
        // temp > 80 (clears under 75), then pressure < 2 (clears above 2.5).
        let mut seq =
            Sequence::new(above(80.0, 75.0), below(2.0, 2.5), 10_000, Mode::FollowedBy).unwrap();
        use Step::*;
        let got = run(
            &mut seq,
            &[
                (Then, 0, 1.0),       // B before any A: nothing
                (Then, 100, 3.0),     // B clears
                (First, 1_000, 85.0), // A
                (First, 2_000, 90.0), // still A: no new event
                (Then, 5_000, 1.5),   // B within 4 s: raised
                (Then, 6_000, 1.0),   // still B
                (Then, 7_000, 3.0),   // B clears: cleared
                (Then, 8_000, 1.0),   // B again, but A was used: nothing
            ],
        );
        assert_eq!(
            got,
            [
                Change::Raised {
                    first: 1_000,
                    at: 5_000
                },
                Change::Cleared { at: 7_000 },
            ]
        );
        assert_eq!(seq.stats().raised, 1);
    }

    #[test]
    fn b_too_late_or_before_a_does_not_match_and_a_expires() {
        let mut seq =
            Sequence::new(above(80.0, 80.0), below(2.0, 2.0), 1_000, Mode::FollowedBy).unwrap();
        use Step::*;
        let got = run(
            &mut seq,
            &[
                (First, 10_000, 85.0),
                (Then, 11_500, 1.0), // 1.5 s after A: too late (A expired first)
                (Then, 11_600, 3.0),
                (First, 20_000, 70.0),
                (First, 20_100, 85.0),
                (Then, 20_050, 1.0), // before A in event time
            ],
        );
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(seq.stats().settled, 1);
    }

    #[test]
    fn a_not_followed_by_b_raises_at_the_deadline_and_b_clears_it() {
        // A heartbeat request (value 1) must be answered (value 1) in 5 s.
        let mut seq =
            Sequence::new(above(0.5, 0.5), above(0.5, 0.5), 5_000, Mode::NotFollowedBy).unwrap();
        use Step::*;
        let got = run(
            &mut seq,
            &[
                (First, 0, 1.0),
                (First, 100, 0.0),
                (Then, 2_000, 1.0), // answered in time
                (Then, 2_100, 0.0),
                (First, 10_000, 1.0),
                (First, 10_100, 0.0),
            ],
        );
        assert!(got.is_empty());
        // No answer; a tick past the deadline raises it.
        assert_eq!(seq.advance_to(15_000), None);
        assert_eq!(
            seq.advance_to(15_001),
            Some(Change::Raised {
                first: 10_000,
                at: 15_000
            })
        );
        assert_eq!(seq.state(), AlertState::Raised);
        let got = run(&mut seq, &[(Then, 16_000, 1.0)]);
        assert_eq!(got, [Change::Cleared { at: 16_000 }]);
        assert_eq!(
            seq.stats(),
            SequenceStats {
                raised: 1,
                settled: 1
            }
        );
    }

    #[test]
    fn bad_values_are_refused_without_a_change() {
        let mut seq =
            Sequence::new(above(1.0, 1.0), above(1.0, 1.0), 10, Mode::FollowedBy).unwrap();
        assert!(seq.observe(Step::First, 0, f64::NAN).is_err());
        assert!(seq.observe(Step::First, i64::MAX, 1.0).is_err());
        assert!(Sequence::new(above(1.0, 1.0), above(1.0, 1.0), -1, Mode::FollowedBy).is_err());
    }
}
