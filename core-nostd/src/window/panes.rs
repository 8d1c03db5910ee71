//! Time windows built from panes: tumbling and hopping (sliding) windows.
//!
//! A hopping window of length `L` that advances by `S` is cut into panes of
//! length `S` (the "panes" technique of Li et al., 2005). Each value is added
//! to exactly one pane; a window is the merge of its `L / S` panes when it
//! closes. A tumbling window is the case `L = S`. Window `j` covers panes
//! `j - L/S + 1 ..= j`, i.e. the time `[(j + 1)·S − L, (j + 1)·S)`.
//!
//! Pane `p` lives in slot `p mod P`. The panes still open span at most
//! `L/S + ceil(lateness/S)` consecutive indices (proof: a pane stays open until
//! the watermark passes the end of its last window, and the newest pane is at
//! most `lateness` past the watermark), so requiring `P` to be at least that
//! gives every open pane its own slot.

use super::{Closed, Rejection, WindowError, WindowStats, check_finite, check_time};
use crate::aggregate::{Accumulator, Aggregate};
use crate::{MAX_TIMESTAMP, Timestamp};

/// A pane and the index it currently holds, or nothing.
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Pane<A> {
    index: i64,
    acc: A,
}

/// A sliding window of fixed length that advances by a fixed slide, on event
/// time, with an allowed lateness. `P` bounds the panes held at once (see
/// [`HoppingWindow::new`]).
///
/// ```
/// use sluice_core::window::HoppingWindow;
///
/// // 10-unit windows every 5 units, no lateness.
/// let mut w = HoppingWindow::<4>::new(10, 5, 0).unwrap();
/// let mut closed = Vec::new();
/// for ts in [1, 6, 12, 17] {
///     w.push(ts, 1.0, |c| closed.push((c.start, c.end, c.acc.count()))).unwrap();
/// }
/// // The watermark is 17: windows ending at 5, 10 and 15 have closed.
/// assert_eq!(closed, [(-5, 5, 1), (0, 10, 2), (5, 15, 2)]);
/// ```
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HoppingWindow<const P: usize, A: Accumulator = Aggregate> {
    slide: Timestamp,
    /// Panes per window (`L / S`).
    span: i64,
    lateness: Timestamp,
    #[cfg_attr(
        feature = "serde",
        serde(
            with = "super::option_array",
            bound(
                serialize = "A: serde::Serialize",
                deserialize = "A: serde::Deserialize<'de>"
            )
        )
    )]
    panes: [Option<Pane<A>>; P],
    /// The largest event time seen, if any.
    max_event: Option<Timestamp>,
    /// Every window with an index `<=` this has closed.
    closed_through: Option<i64>,
    stats: WindowStats,
    /// Each pane starts as `A::with_params(&params)`. Not saved: whoever
    /// restores a window sets them again ([`Self::set_params`]).
    #[cfg_attr(feature = "serde", serde(skip))]
    params: A::Params,
}

impl<const P: usize, A: Accumulator> HoppingWindow<P, A> {
    /// A window of `length` that advances by `slide` and waits `lateness` for
    /// out-of-order values, all in the unit of the event times.
    ///
    /// Fails unless `length` and `slide` are positive, `length` is a multiple
    /// of `slide`, `lateness` is not negative, and
    /// `P >= length/slide + ceil(lateness/slide)`.
    pub fn new(
        length: Timestamp,
        slide: Timestamp,
        lateness: Timestamp,
    ) -> Result<Self, WindowError> {
        if length <= 0 || slide <= 0 {
            return Err(WindowError::NotPositive);
        }
        if lateness < 0 {
            return Err(WindowError::NegativeLateness);
        }
        if length % slide != 0 {
            return Err(WindowError::LengthNotMultipleOfSlide);
        }
        let span = length / slide;
        let needed = (span as u64).saturating_add((lateness as u64).div_ceil(slide as u64));
        if needed > P as u64 {
            return Err(WindowError::TooFewPanes {
                needed,
                available: P,
            });
        }
        Ok(Self {
            slide,
            span,
            lateness,
            panes: [const { None }; P],
            max_event: None,
            closed_through: None,
            stats: WindowStats::default(),
            params: A::Params::default(),
        })
    }

    /// This window, with its panes started as `A::with_params(&params)`.
    pub fn with_params(mut self, params: A::Params) -> Self {
        self.params = params;
        self
    }

    /// Sets the parameters of the panes started from now on. For a restore
    /// (they are not saved), to the ones the window was made with: panes
    /// already open keep theirs, and a window that spans panes of both is
    /// merged from both.
    pub fn set_params(&mut self, params: A::Params) {
        self.params = params;
    }

    /// The parameters new panes start with.
    pub fn params(&self) -> &A::Params {
        &self.params
    }

    /// Window length.
    pub fn length(&self) -> Timestamp {
        self.span * self.slide
    }

    /// How far a window's start advances from one window to the next.
    pub fn slide(&self) -> Timestamp {
        self.slide
    }

    /// Allowed lateness.
    pub fn lateness(&self) -> Timestamp {
        self.lateness
    }

    /// The current watermark (largest event time minus the allowed lateness),
    /// once a value or a time has been seen.
    pub fn watermark(&self) -> Option<Timestamp> {
        self.max_event.map(|t| t.saturating_sub(self.lateness))
    }

    /// Counts of what happened to the values offered so far.
    pub fn stats(&self) -> WindowStats {
        self.stats
    }

    /// Whether any value waits in a window that has not closed.
    pub fn has_open(&self) -> bool {
        self.panes.iter().any(Option::is_some)
    }

    /// Offers a value observed at event time `ts`. Windows that the new
    /// watermark closes are passed to `emit`, oldest first, before this
    /// returns.
    ///
    /// Refuses NaN and infinities, times beyond ±[`MAX_TIMESTAMP`], and values
    /// whose windows have all closed ([`Rejection::Late`]); each refusal is
    /// counted in [`Self::stats`].
    #[inline]
    pub fn push(
        &mut self,
        ts: Timestamp,
        value: f64,
        emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        self.push_weighted(ts, value, 1, emit)
    }

    /// [`Self::push`] for a value that stands for `weight` readings (kept by
    /// sampling; see [`Accumulator::add_weighted`]).
    #[inline]
    pub fn push_weighted(
        &mut self,
        ts: Timestamp,
        value: f64,
        weight: u32,
        emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        if let Err(why) = check_finite(value).and(check_time(ts)) {
            return self.stats.reject(why);
        }
        // Advancing first keeps the open panes within `P` slots; it cannot make
        // this value late, since its own windows end after `ts`.
        self.advance_to(ts, emit);
        let pane = ts.div_euclid(self.slide);
        // The last window holding this pane is `pane + span - 1`.
        if self
            .closed_through
            .is_some_and(|closed| pane.saturating_add(self.span - 1) <= closed)
        {
            return self.stats.reject(Rejection::Late);
        }
        let slot = &mut self.panes[pane.rem_euclid(P as i64) as usize];
        match slot {
            Some(p) if p.index == pane => p.acc.add_weighted(ts, value, weight),
            _ => {
                debug_assert!(
                    slot.is_none(),
                    "open panes exceed P: construction bound broken"
                );
                let mut acc = A::with_params(&self.params);
                acc.add_weighted(ts, value, weight);
                *slot = Some(Pane { index: pane, acc });
            }
        }
        self.stats.accepted += 1;
        Ok(())
    }

    /// Moves event time forward to `ts` without a value (for a series that has
    /// gone quiet, from a periodic tick), closing the windows that the new
    /// watermark passes. Earlier times than already seen change nothing.
    pub fn advance_to(&mut self, ts: Timestamp, emit: impl FnMut(Closed<A>)) {
        let ts = ts.clamp(-MAX_TIMESTAMP, MAX_TIMESTAMP);
        let max_event = match self.max_event {
            Some(seen) if seen >= ts => return,
            _ => ts,
        };
        self.max_event = Some(max_event);
        let watermark = max_event.saturating_sub(self.lateness);
        // Window j ends at (j + 1)·slide; it closes when that is <= watermark.
        let last_to_close = watermark.div_euclid(self.slide).saturating_sub(1);
        if self.closed_through.is_some_and(|c| c >= last_to_close) {
            return;
        }
        self.close_through(last_to_close, false, emit);
    }

    /// Closes every open window now, marking it partial (for shutdown). Values
    /// for these windows that arrive later are refused as late.
    pub fn flush(&mut self, emit: impl FnMut(Closed<A>)) {
        let Some(newest) = self.panes.iter().flatten().map(|p| p.index).max() else {
            return;
        };
        self.close_through(newest.saturating_add(self.span - 1), true, emit);
    }

    /// Emits windows up to index `last` that hold any value, retires their
    /// panes, and records that every window up to `last` has closed.
    fn close_through(&mut self, last: i64, partial: bool, mut emit: impl FnMut(Closed<A>)) {
        let mut next = self
            .closed_through
            .map_or(i64::MIN, |c| c.saturating_add(1));
        while let Some(oldest) = self.panes.iter().flatten().map(|p| p.index).min() {
            // Windows before the oldest pane hold nothing: skip them.
            let window = next.max(oldest);
            if window > last {
                break;
            }
            let first_pane = window.saturating_sub(self.span - 1);
            // The first pane's clone, then a merge of the others (a sketch
            // is copied once instead of merged into an empty one).
            let mut acc: Option<A> = None;
            for pane in first_pane..=window {
                if let Some(p) = &self.panes[pane.rem_euclid(P as i64) as usize]
                    && p.index == pane
                {
                    match &mut acc {
                        None => acc = Some(p.acc.clone()),
                        Some(acc) => acc.merge(&p.acc),
                    }
                }
            }
            let acc = acc.unwrap_or_else(|| A::with_params(&self.params));
            // Pane `first_pane` belongs to no later window.
            let slot = &mut self.panes[first_pane.rem_euclid(P as i64) as usize];
            if slot.as_ref().is_some_and(|p| p.index == first_pane) {
                *slot = None;
            }
            self.stats.closed += 1;
            emit(Closed {
                start: first_pane.saturating_mul(self.slide),
                end: window.saturating_add(1).saturating_mul(self.slide),
                acc,
                partial,
            });
            next = window.saturating_add(1);
        }
        self.closed_through = Some(last);
    }
}

/// Back-to-back windows of fixed length on event time, with an allowed
/// lateness. `P` bounds the windows open at once: at least
/// `1 + ceil(lateness / size)`.
///
/// ```
/// use sluice_core::aggregate::Aggregate;
/// use sluice_core::window::{Closed, TumblingWindow};
///
/// // 1-second windows (timestamps in ms) that wait 500 ms for stragglers.
/// let mut w = TumblingWindow::<2>::new(1_000, 500).unwrap();
/// let mut means = Vec::new();
/// let mut emit = |c: Closed<Aggregate>| means.push((c.start, c.acc.mean()));
/// w.push(100, 1.0, &mut emit).unwrap();
/// w.push(1_200, 5.0, &mut emit).unwrap();
/// w.push(900, 3.0, &mut emit).unwrap(); // out of order, still in time
/// w.push(1_600, 5.0, &mut emit).unwrap(); // watermark 1_100 closes [0, 1000)
/// assert!(w.push(950, 9.0, &mut emit).is_err()); // too late now
/// assert_eq!(means, [(0, Some(2.0))]);
/// assert_eq!(w.stats().late, 1);
/// ```
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TumblingWindow<const P: usize, A: Accumulator = Aggregate>(HoppingWindow<P, A>);

impl<const P: usize, A: Accumulator> TumblingWindow<P, A> {
    /// Windows of `size` that wait `lateness` for out-of-order values, in the
    /// unit of the event times. Fails unless `size > 0`, `lateness >= 0` and
    /// `P >= 1 + ceil(lateness / size)`.
    pub fn new(size: Timestamp, lateness: Timestamp) -> Result<Self, WindowError> {
        HoppingWindow::new(size, size, lateness).map(Self)
    }

    /// See [`HoppingWindow::with_params`].
    pub fn with_params(self, params: A::Params) -> Self {
        Self(self.0.with_params(params))
    }

    /// See [`HoppingWindow::set_params`].
    pub fn set_params(&mut self, params: A::Params) {
        self.0.set_params(params);
    }

    /// See [`HoppingWindow::params`].
    pub fn params(&self) -> &A::Params {
        self.0.params()
    }

    /// Window length.
    pub fn size(&self) -> Timestamp {
        self.0.slide()
    }

    /// Allowed lateness.
    pub fn lateness(&self) -> Timestamp {
        self.0.lateness()
    }

    /// See [`HoppingWindow::watermark`].
    pub fn watermark(&self) -> Option<Timestamp> {
        self.0.watermark()
    }

    /// See [`HoppingWindow::stats`].
    pub fn stats(&self) -> WindowStats {
        self.0.stats()
    }

    /// See [`HoppingWindow::has_open`].
    pub fn has_open(&self) -> bool {
        self.0.has_open()
    }

    /// See [`HoppingWindow::push`].
    #[inline]
    pub fn push(
        &mut self,
        ts: Timestamp,
        value: f64,
        emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        self.0.push(ts, value, emit)
    }

    /// See [`HoppingWindow::push_weighted`].
    #[inline]
    pub fn push_weighted(
        &mut self,
        ts: Timestamp,
        value: f64,
        weight: u32,
        emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        self.0.push_weighted(ts, value, weight, emit)
    }

    /// See [`HoppingWindow::advance_to`].
    pub fn advance_to(&mut self, ts: Timestamp, emit: impl FnMut(Closed<A>)) {
        self.0.advance_to(ts, emit)
    }

    /// See [`HoppingWindow::flush`].
    pub fn flush(&mut self, emit: impl FnMut(Closed<A>)) {
        self.0.flush(emit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn too_few_panes_is_an_error() {
        assert_eq!(
            TumblingWindow::<2, Aggregate>::new(1000, 1500).err(),
            Some(WindowError::TooFewPanes {
                needed: 3,
                available: 2
            })
        );
        assert_eq!(
            HoppingWindow::<8, Aggregate>::new(10, 3, 0).err(),
            Some(WindowError::LengthNotMultipleOfSlide)
        );
    }

    #[test]
    fn a_gap_of_many_windows_is_skipped_not_walked() {
        let mut w = TumblingWindow::<1>::new(10, 0).unwrap();
        let mut closed = 0;
        w.push(5, 1.0, |_| closed += 1).unwrap();
        w.push(i64::MAX / 2, 1.0, |_| closed += 1).unwrap();
        assert_eq!(closed, 1);
    }

    #[test]
    fn negative_times_fall_in_their_windows() {
        let mut w = TumblingWindow::<1>::new(10, 0).unwrap();
        let mut got = None;
        w.push(-1, 1.0, |_| ()).unwrap();
        w.push(0, 1.0, |c| got = Some((c.start, c.end))).unwrap();
        assert_eq!(got, Some((-10, 0)));
    }

    #[test]
    fn flush_emits_partial_windows() {
        let mut w = HoppingWindow::<3>::new(20, 10, 0).unwrap();
        let mut got = [(0, 0, false); 2];
        let mut n = 0;
        w.push(15, 1.0, |_| ()).unwrap();
        w.flush(|c| {
            got[n] = (c.start, c.end, c.partial);
            n += 1;
        });
        assert_eq!(got, [(0, 20, true), (10, 30, true)]);
        assert_eq!(w.push(16, 1.0, |_| ()), Err(Rejection::Late));
    }
}
