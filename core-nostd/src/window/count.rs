//! Tumbling windows of a fixed number of values.

use super::{Closed, Rejection, WindowError, WindowStats, check_finite};
use crate::Timestamp;
use crate::aggregate::{Accumulator, Aggregate};

/// Back-to-back windows of `n` values each, in arrival order. Event time does
/// not cut these windows (so nothing is ever late); it only dates them.
///
/// ```
/// use sluice_core::window::CountWindow;
///
/// let mut w = CountWindow::<sluice_core::aggregate::Aggregate>::new(3).unwrap();
/// let mut sums = Vec::new();
/// for (ts, v) in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 10.0)] {
///     w.push(ts, v, |c| sums.push(c.acc.sum())).unwrap();
/// }
/// assert_eq!(sums, [6.0]);
/// w.flush(|c| sums.push(c.acc.sum()));
/// assert_eq!(sums, [6.0, 10.0]);
/// ```
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CountWindow<A: Accumulator = Aggregate> {
    size: u64,
    filled: u64,
    earliest: Timestamp,
    latest: Timestamp,
    acc: A,
    stats: WindowStats,
    /// Each window starts as `A::with_params(&params)`. Not saved: whoever
    /// restores a window sets them again ([`Self::set_params`]).
    #[cfg_attr(feature = "serde", serde(skip))]
    params: A::Params,
}

impl<A: Accumulator> CountWindow<A> {
    /// Windows of `size` values; fails if `size` is zero.
    pub fn new(size: u64) -> Result<Self, WindowError> {
        if size == 0 {
            return Err(WindowError::NotPositive);
        }
        Ok(Self {
            size,
            filled: 0,
            earliest: 0,
            latest: 0,
            acc: A::empty(),
            stats: WindowStats::default(),
            params: A::Params::default(),
        })
    }

    /// These windows, each started as `A::with_params(&params)` (the open
    /// one too, if it is empty).
    pub fn with_params(mut self, params: A::Params) -> Self {
        self.set_params(params);
        self
    }

    /// Sets the parameters of the windows started from now on (after a
    /// restore: they are not saved), and of the open one if it is empty.
    pub fn set_params(&mut self, params: A::Params) {
        if self.filled == 0 {
            self.acc = A::with_params(&params);
        }
        self.params = params;
    }

    /// The parameters new windows start with.
    pub fn params(&self) -> &A::Params {
        &self.params
    }

    /// Values per window.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Counts of what happened to the values offered so far.
    pub fn stats(&self) -> WindowStats {
        self.stats
    }

    /// Adds a value; when it completes the window, passes the window to `emit`
    /// and starts the next one. Refuses (and counts) NaN and infinities.
    #[inline]
    pub fn push(
        &mut self,
        ts: Timestamp,
        value: f64,
        emit: impl FnOnce(Closed<A>),
    ) -> Result<(), Rejection> {
        self.push_weighted(ts, value, 1, emit)
    }

    /// [`Self::push`] for a value that stands for `weight` readings: it
    /// takes one place in the window (which counts values received) and
    /// weighs `weight` in its aggregate.
    #[inline]
    pub fn push_weighted(
        &mut self,
        ts: Timestamp,
        value: f64,
        weight: u32,
        emit: impl FnOnce(Closed<A>),
    ) -> Result<(), Rejection> {
        if let Err(why) = check_finite(value) {
            return self.stats.reject(why);
        }
        if self.filled == 0 {
            self.earliest = ts;
            self.latest = ts;
        } else {
            self.earliest = self.earliest.min(ts);
            self.latest = self.latest.max(ts);
        }
        self.acc.add_weighted(ts, value, weight);
        self.filled += 1;
        self.stats.accepted += 1;
        if self.filled == self.size {
            self.close(false, emit);
        }
        Ok(())
    }

    /// Emits the values gathered so far as a partial window (for shutdown).
    pub fn flush(&mut self, emit: impl FnOnce(Closed<A>)) {
        if self.filled > 0 {
            self.close(true, emit);
        }
    }

    fn close(&mut self, partial: bool, emit: impl FnOnce(Closed<A>)) {
        let acc = core::mem::replace(&mut self.acc, A::with_params(&self.params));
        self.filled = 0;
        self.stats.closed += 1;
        emit(Closed {
            start: self.earliest,
            end: self.latest.saturating_add(1),
            acc,
            partial,
        });
    }
}
