//! Mergeable summary statistics of a window: count, sum, min, max, mean,
//! variance, first and last.
//!
//! Every statistic is *mergeable*: the [`Aggregate`] of two partial streams,
//! merged, equals the aggregate of the concatenated stream (exactly for
//! count, min, max, first and last; to floating-point rounding for sum, mean
//! and variance). This is what lets sliding windows be assembled from panes,
//! workers combine shards, and upstream combine gateways.
//!
//! Numerics: the mean and the sum of squared deviations use Welford's update
//! for one value and Chan et al.'s parallel formula for a merge, so the
//! variance does not suffer the catastrophic cancellation of
//! `Σx²/n − mean²` when values are large and close together (such as
//! 1e9 + noise). The sum uses Neumaier's compensated summation.

use crate::Timestamp;

/// Something that summarises the values of a window and can be merged with a
/// summary of another part of the stream.
///
/// Windows are generic over their accumulator so that the agent can carry
/// sketches in a window beside (or instead of) the [`Aggregate`].
pub trait Accumulator: Clone {
    /// What shapes an empty summary, for accumulators whose size or accuracy
    /// is chosen at run time (a sketch's buckets); `()` for the others.
    /// Windows keep one and start each pane with [`Self::with_params`].
    type Params: Clone + Default + PartialEq + core::fmt::Debug;
    /// The summary of no values, with the default parameters.
    fn empty() -> Self;
    /// The summary of no values, shaped by `params`. The default ignores
    /// them.
    fn with_params(params: &Self::Params) -> Self {
        let _ = params;
        Self::empty()
    }
    /// Adds one value observed at event time `ts`. The value is finite: windows
    /// reject NaN and infinities before calling this.
    fn add(&mut self, ts: Timestamp, value: f64);
    /// Adds a value that stands for `weight` readings (kept by sampling one
    /// in `weight`; 0 counts as 1). The default adds it `weight` times;
    /// [`Aggregate`] weighs it in one step.
    fn add_weighted(&mut self, ts: Timestamp, value: f64, weight: u32) {
        for _ in 0..weight.max(1) {
            self.add(ts, value);
        }
    }
    /// Adds everything `other` summarises, as if its values had arrived after
    /// this one's.
    fn merge(&mut self, other: &Self);
    /// Whether no value has been added or merged.
    fn is_empty(&self) -> bool;
}

/// A value with the event time at which it was observed.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Point {
    /// Event time.
    pub ts: Timestamp,
    /// The value.
    pub value: f64,
}

/// Count, sum, min, max, mean, variance, first and last of a set of values.
///
/// ```
/// use sluice_core::aggregate::{Accumulator, Aggregate};
///
/// let mut a = Aggregate::empty();
/// for (ts, v) in [(1, 2.0), (2, 4.0), (3, 4.0), (4, 4.0), (5, 5.0), (6, 5.0), (7, 7.0), (8, 9.0)] {
///     a.add(ts, v);
/// }
/// assert_eq!(a.count(), 8);
/// assert_eq!(a.mean(), Some(5.0));
/// assert_eq!(a.population_variance(), Some(4.0));
/// assert_eq!(a.first().unwrap().value, 2.0);
/// assert_eq!(a.last().unwrap().value, 9.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Aggregate {
    count: u64,
    /// Neumaier sum: `sum + compensation` is the running total.
    sum: f64,
    compensation: f64,
    min: f64,
    max: f64,
    mean: f64,
    /// Sum of squared deviations from the mean (Welford's M2).
    m2: f64,
    /// The value with the smallest event time (the earliest-added one on ties).
    first: Point,
    /// The value with the largest event time (the latest-added one on ties).
    last: Point,
}

impl Default for Aggregate {
    fn default() -> Self {
        Self::empty()
    }
}

impl Aggregate {
    /// How many values.
    #[inline]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their sum (0 when empty).
    #[inline]
    pub fn sum(&self) -> f64 {
        self.sum + self.compensation
    }

    /// The smallest value, if any.
    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    /// The largest value, if any.
    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    /// The arithmetic mean, if any.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// The population variance (divided by n), if any value.
    pub fn population_variance(&self) -> Option<f64> {
        (self.count > 0).then(|| self.m2 / self.count as f64)
    }

    /// The sample variance (divided by n − 1), if at least two values.
    pub fn sample_variance(&self) -> Option<f64> {
        (self.count > 1).then(|| self.m2 / (self.count - 1) as f64)
    }

    /// The sample standard deviation, if at least two values.
    pub fn stddev(&self) -> Option<f64> {
        self.sample_variance().map(crate::math::sqrt)
    }

    /// An aggregate rebuilt from the statistics it reports: `count`
    /// (weighted), `sum`, `mean`, `sample_variance` (0 for one value), `min`,
    /// `max`, and the `first` and `last` points. For merging aggregates that
    /// were reported rather than kept, with [`Accumulator::merge`] (the
    /// outbox merges stored windows so). `None` for a count of 0.
    #[allow(clippy::too_many_arguments)]
    pub fn from_summary(
        count: u64,
        sum: f64,
        mean: f64,
        sample_variance: f64,
        min: f64,
        max: f64,
        first: Point,
        last: Point,
    ) -> Option<Aggregate> {
        (count > 0).then(|| Aggregate {
            count,
            sum,
            compensation: 0.0,
            min,
            max,
            mean,
            m2: if count > 1 {
                sample_variance * (count - 1) as f64
            } else {
                0.0
            },
            first,
            last,
        })
    }

    /// The value with the earliest event time (the first added on ties).
    pub fn first(&self) -> Option<Point> {
        (self.count > 0).then_some(self.first)
    }

    /// The value with the latest event time (the last added on ties).
    pub fn last(&self) -> Option<Point> {
        (self.count > 0).then_some(self.last)
    }

    #[inline(always)]
    fn add_to_sum(&mut self, value: f64) {
        // Neumaier's variant of Kahan summation: also exact when `value` is
        // larger in magnitude than the running sum.
        let t = self.sum + value;
        if libm::fabs(self.sum) >= libm::fabs(value) {
            self.compensation += (self.sum - t) + value;
        } else {
            self.compensation += (value - t) + self.sum;
        }
        self.sum = t;
    }
}

impl Accumulator for Aggregate {
    type Params = ();

    fn empty() -> Self {
        let nothing = Point {
            ts: 0,
            value: f64::NAN,
        };
        Self {
            count: 0,
            sum: 0.0,
            compensation: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            mean: 0.0,
            m2: 0.0,
            first: nothing,
            last: nothing,
        }
    }

    #[inline]
    fn add(&mut self, ts: Timestamp, value: f64) {
        self.add_weighted(ts, value, 1);
    }

    /// A value standing for `weight` readings: the count and the sum grow by
    /// `weight` and `weight · value`, and the mean and variance are those of
    /// the readings it stands for (West's weighted Welford update, with
    /// frequency weights), so that a sampled window's statistics are
    /// unbiased estimates of the whole window's.
    #[inline]
    fn add_weighted(&mut self, ts: Timestamp, value: f64, weight: u32) {
        let w = u64::from(weight.max(1));
        let point = Point { ts, value };
        if self.count == 0 {
            self.first = point;
            self.last = point;
        } else {
            if ts < self.first.ts {
                self.first = point;
            }
            if ts >= self.last.ts {
                self.last = point;
            }
        }
        self.count += w;
        self.add_to_sum(value * w as f64);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Welford (West's form for weights).
        let delta = value - self.mean;
        self.mean += delta * (w as f64 / self.count as f64);
        self.m2 += w as f64 * delta * (value - self.mean);
    }

    fn merge(&mut self, other: &Self) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        if other.first.ts < self.first.ts {
            self.first = other.first;
        }
        if other.last.ts >= self.last.ts {
            self.last = other.last;
        }
        // Chan, Golub and LeVeque's pairwise combination.
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let delta = other.mean - self.mean;
        self.mean += delta * (nb / n);
        self.m2 += other.m2 + delta * delta * (na * nb / n);
        // Saturating: merged reported counts (a node's) may be anything.
        self.count = self.count.saturating_add(other.count);
        self.add_to_sum(other.sum);
        self.compensation += other.compensation;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_counts_past_u64_saturates_instead_of_overflowing() {
        let first = Point { ts: 0, value: 1.0 };
        let a = Aggregate::from_summary(u64::MAX / 2 + 1, 1.0, 1.0, 0.0, 1.0, 1.0, first, first)
            .unwrap();
        let mut b = a;
        b.merge(&a);
        assert_eq!(b.count(), u64::MAX);
    }

    #[test]
    fn variance_survives_a_large_offset() {
        // Naive Σx²/n − mean² loses every digit here.
        let mut a = Aggregate::empty();
        for (i, v) in [4.0, 7.0, 13.0, 16.0].iter().enumerate() {
            a.add(i as i64, 1e9 + v);
        }
        assert!((a.sample_variance().unwrap() - 30.0).abs() < 1e-6);
    }

    #[test]
    fn empty_has_no_statistics() {
        let a = Aggregate::empty();
        assert!(a.is_empty());
        assert_eq!(a.mean(), None);
        assert_eq!(a.min(), None);
        assert_eq!(a.first(), None);
        assert_eq!(a.sum(), 0.0);
    }

    #[test]
    fn a_weighted_value_counts_as_the_readings_it_stands_for() {
        // Nine readings of 1.0, and one of 10.0 kept as one in ten.
        let mut weighted = Aggregate::empty();
        let mut expanded = Aggregate::empty();
        for i in 0..9 {
            weighted.add(i, 1.0);
            expanded.add(i, 1.0);
        }
        weighted.add_weighted(9, 10.0, 10);
        for _ in 0..10 {
            expanded.add(9, 10.0);
        }
        assert_eq!(weighted.count(), 19);
        assert_eq!(weighted.sum(), 109.0);
        assert!((weighted.mean().unwrap() - 109.0 / 19.0).abs() < 1e-12);
        let (a, b) = (
            weighted.sample_variance().unwrap(),
            expanded.sample_variance().unwrap(),
        );
        assert!((a - b).abs() < 1e-9 * b, "{a} vs {b}");
        assert_eq!(weighted.max(), Some(10.0));
        // Merging weighted aggregates is the same as merging expanded ones.
        let mut m = weighted;
        m.merge(&weighted);
        assert_eq!(m.count(), 38);
        assert!((m.mean().unwrap() - weighted.mean().unwrap()).abs() < 1e-12);
    }

    #[test]
    fn compensated_sum_keeps_small_terms() {
        let mut a = Aggregate::empty();
        a.add(0, 1e16);
        for i in 0..1000 {
            a.add(i, 1.0);
        }
        a.add(0, -1e16);
        assert_eq!(a.sum(), 1000.0);
    }
}
