//! Load shedding: deciding, before any work is spent on a reading, whether to
//! drop it because the ring it is headed for is filling up.
//!
//! Memory and latency stay bounded because the rings are bounded; shedding
//! decides *which* readings are lost when input outruns the workers, and makes
//! sure every loss is counted by reason:
//!
//! * [`ShedPolicy::DropNewest`]: above the high-water mark, drop every new
//!   reading until the consumer catches up. Simple and cheap; whole stretches of
//!   time go missing.
//! * [`ShedPolicy::Sample`]: above the high-water mark, keep one reading in `k`
//!   at random (seeded, so reproducible), and mark the kept ones with `k` so
//!   that counts and sums can be scaled back. Every series keeps being seen, at
//!   a lower rate. A full ring still drops.
//! * [`Priority::Critical`] readings are never shed by policy, and normal
//!   readings never take the last [`critical_reserve`] slots of a ring
//!   (whatever the policy and its high-water mark), so a critical reading
//!   finds room even when sampling has filled the rest. A ring full even so
//!   is the caller's to handle: it waits (the collectors block the source
//!   briefly) rather than drop a critical reading.
//!
//! ```
//! use sluice_core::shed::{Decision, Priority, ShedPolicy, ShedReason, Shedder};
//!
//! let mut shed = Shedder::new(ShedPolicy::DropNewest { high_water: 3 }, 1).unwrap();
//! assert_eq!(shed.decide(2, 4, Priority::Normal), Decision::Keep);
//! assert_eq!(shed.decide(3, 4, Priority::Normal), Decision::Drop(ShedReason::HighWater));
//! assert_eq!(shed.decide(4, 4, Priority::Critical), Decision::Keep);
//! assert_eq!(shed.counters().dropped(), 1);
//! ```

use crate::rng::SplitMix64;

/// How important a reading is to keep under overload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// Shed by the policy under overload.
    #[default]
    Normal,
    /// Never shed by the policy.
    Critical,
}

/// What to do above the high-water mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedPolicy {
    /// Drop every normal reading while the ring holds `high_water` or more.
    DropNewest {
        /// Occupancy at which shedding starts.
        high_water: usize,
    },
    /// While the ring holds `high_water` or more, keep a normal reading with
    /// probability `1 / keep_one_in`; drop all when the ring is full.
    Sample {
        /// Occupancy at which sampling starts.
        high_water: usize,
        /// Keep one reading in this many (at least 1).
        keep_one_in: u32,
    },
}

impl ShedPolicy {
    /// The occupancy at which the policy starts shedding.
    pub fn high_water(&self) -> usize {
        match *self {
            ShedPolicy::DropNewest { high_water } | ShedPolicy::Sample { high_water, .. } => {
                high_water
            }
        }
    }
}

/// The verdict on one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep it; it stands for itself.
    Keep,
    /// Keep it; it was sampled, and stands for `one_in` readings.
    KeepSampled {
        /// The sampling rate it survived: scale counts by this.
        one_in: u32,
    },
    /// Drop it, for this reason.
    Drop(ShedReason),
}

/// Why a reading was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// Drop-newest above the high-water mark.
    HighWater,
    /// Not picked by sampling above the high-water mark.
    Sampled,
    /// The ring was full (for a normal reading: all but its critical
    /// reserve).
    Full,
}

impl ShedReason {
    /// A short name for metrics labels and logs.
    pub const fn as_str(&self) -> &'static str {
        match self {
            ShedReason::HighWater => "high_water",
            ShedReason::Sampled => "sampled",
            ShedReason::Full => "full",
        }
    }
}

/// Counts of every decision, by outcome and reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShedCounters {
    /// Kept normally (below the high-water mark, or critical).
    pub kept: u64,
    /// Kept by sampling.
    pub kept_sampled: u64,
    /// Dropped by drop-newest.
    pub dropped_high_water: u64,
    /// Dropped by sampling.
    pub dropped_sampled: u64,
    /// Dropped because the ring was full.
    pub dropped_full: u64,
}

impl ShedCounters {
    /// Readings dropped, all reasons.
    pub fn dropped(&self) -> u64 {
        self.dropped_high_water + self.dropped_sampled + self.dropped_full
    }

    /// Readings decided on.
    pub fn offered(&self) -> u64 {
        self.kept + self.kept_sampled + self.dropped()
    }

    /// Of the readings that met sampling, the fraction kept (1 if none did).
    pub fn kept_fraction(&self) -> f64 {
        let sampled = self.kept_sampled + self.dropped_sampled;
        if sampled == 0 {
            1.0
        } else {
            self.kept_sampled as f64 / sampled as f64
        }
    }
}

/// A shedding policy's parameters do not make sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedError {
    /// `keep_one_in` is zero.
    ZeroSampleRate,
}

impl core::fmt::Display for ShedError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("keep_one_in must be >= 1")
    }
}

impl core::error::Error for ShedError {}

/// The slots of a ring of `capacity` that only critical readings may take:
/// an eighth, at least one (none for a ring of one slot).
#[inline(always)]
pub const fn critical_reserve(capacity: usize) -> usize {
    if capacity <= 1 {
        0
    } else if capacity < 16 {
        1
    } else {
        capacity / 8
    }
}

/// Applies a [`ShedPolicy`] and counts what it decides.
#[derive(Debug, Clone)]
pub struct Shedder {
    policy: ShedPolicy,
    rng: SplitMix64,
    counters: ShedCounters,
}

impl Shedder {
    /// A shedder for `policy`, sampling with a generator seeded by `seed`.
    pub fn new(policy: ShedPolicy, seed: u64) -> Result<Self, ShedError> {
        if let ShedPolicy::Sample { keep_one_in: 0, .. } = policy {
            return Err(ShedError::ZeroSampleRate);
        }
        Ok(Self {
            policy,
            rng: SplitMix64::new(seed),
            counters: ShedCounters::default(),
        })
    }

    /// The policy.
    pub fn policy(&self) -> ShedPolicy {
        self.policy
    }

    /// Decides on one reading headed for a ring that holds `occupancy` of
    /// `capacity`, and counts the decision.
    #[inline]
    pub fn decide(&mut self, occupancy: usize, capacity: usize, priority: Priority) -> Decision {
        let decision = self.verdict(occupancy, capacity, priority);
        let c = &mut self.counters;
        match decision {
            Decision::Keep => c.kept += 1,
            Decision::KeepSampled { .. } => c.kept_sampled += 1,
            Decision::Drop(ShedReason::HighWater) => c.dropped_high_water += 1,
            Decision::Drop(ShedReason::Sampled) => c.dropped_sampled += 1,
            Decision::Drop(ShedReason::Full) => c.dropped_full += 1,
        }
        decision
    }

    #[inline(always)]
    fn verdict(&mut self, occupancy: usize, capacity: usize, priority: Priority) -> Decision {
        // Normal readings stop short of the critical reserve.
        let limit = capacity - critical_reserve(capacity);
        if priority == Priority::Critical || occupancy < self.policy.high_water().min(limit) {
            return Decision::Keep;
        }
        match self.policy {
            ShedPolicy::DropNewest { high_water } if occupancy >= high_water => {
                Decision::Drop(ShedReason::HighWater)
            }
            ShedPolicy::DropNewest { .. } => Decision::Drop(ShedReason::Full),
            ShedPolicy::Sample { .. } if occupancy >= limit => Decision::Drop(ShedReason::Full),
            ShedPolicy::Sample { keep_one_in, .. } => {
                if self.rng.below(u64::from(keep_one_in)) == 0 {
                    Decision::KeepSampled {
                        one_in: keep_one_in,
                    }
                } else {
                    Decision::Drop(ShedReason::Sampled)
                }
            }
        }
    }

    /// Recounts a reading that `decision` kept but that found the ring full
    /// when pushed (a critical reading, or a race with a slow consumer), so
    /// that it is counted as dropped rather than kept.
    pub fn count_full(&mut self, decision: Decision) {
        let c = &mut self.counters;
        match decision {
            Decision::Keep => c.kept = c.kept.saturating_sub(1),
            Decision::KeepSampled { .. } => c.kept_sampled = c.kept_sampled.saturating_sub(1),
            Decision::Drop(_) => return,
        }
        c.dropped_full += 1;
    }

    /// The counts so far.
    pub fn counters(&self) -> ShedCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "statistical test of safe code; slow under Miri")]
    fn sampling_keeps_about_one_in_k_and_is_reproducible() {
        let policy = ShedPolicy::Sample {
            high_water: 0,
            keep_one_in: 4,
        };
        let mut a = Shedder::new(policy, 9).unwrap();
        let mut b = Shedder::new(policy, 9).unwrap();
        for _ in 0..40_000 {
            assert_eq!(
                a.decide(1, 8, Priority::Normal),
                b.decide(1, 8, Priority::Normal)
            );
        }
        let c = a.counters();
        assert_eq!(c.offered(), 40_000);
        // Binomial(40000, 1/4): sd ≈ 87, so ±600 is ~7 sd.
        assert!((9_400..10_600).contains(&c.kept_sampled), "{c:?}");
        assert!((c.kept_fraction() - 0.25).abs() < 0.015);
    }

    #[test]
    fn full_ring_drops_even_when_sampling() {
        let policy = ShedPolicy::Sample {
            high_water: 2,
            keep_one_in: 1,
        };
        let mut s = Shedder::new(policy, 0).unwrap();
        assert_eq!(
            s.decide(2, 4, Priority::Normal),
            Decision::KeepSampled { one_in: 1 }
        );
        // The last slot of 4 is the critical reserve.
        assert_eq!(
            s.decide(3, 4, Priority::Normal),
            Decision::Drop(ShedReason::Full)
        );
        assert_eq!(s.decide(3, 4, Priority::Critical), Decision::Keep);
        assert_eq!(s.decide(4, 4, Priority::Critical), Decision::Keep);
    }

    #[test]
    fn zero_rate_is_an_error() {
        let policy = ShedPolicy::Sample {
            high_water: 2,
            keep_one_in: 0,
        };
        assert_eq!(
            Shedder::new(policy, 0).err(),
            Some(ShedError::ZeroSampleRate)
        );
    }
}
