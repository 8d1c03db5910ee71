//! Joins of two streams on event time, in fixed memory: the inputs of a
//! derived series.
//!
//! | join | pairs | memory |
//! | --- | --- | --- |
//! | [`WindowJoin`] | the mean of side A and the mean of side B in the same aligned window | two tumbling windows of `P` panes |
//! | [`IntervalJoin`] | each value of A with the latest value of B within ±`within` | two points |
//!
//! A [`WindowJoin`] keeps one watermark for both sides (the largest event
//! time seen on either, minus the allowed lateness), so a window closes on
//! both sides at once: if both sides have values in it, it becomes a
//! [`Pair`]; if one side has none, the other is counted as missing its
//! partner ([`JoinStats::missing_a`], [`JoinStats::missing_b`]) and dropped.
//! A value whose window has closed is late, counted and refused as by any
//! window. The pair's event time is the window's start.
//!
//! An [`IntervalJoin`] is driven by side A: each value of A is paired with
//! the value of B with the largest event time seen so far, if it lies within
//! `within` of A's (before or after); otherwise it is counted in
//! [`JoinStats::missing_b`]. A value of B older than the latest one of B is
//! counted late and kept out. The pair's event time is A's.
//!
//! [`Expr`] computes the derived value from a pair.

use crate::Timestamp;
use crate::aggregate::Aggregate;
use crate::window::{Closed, Rejection, TumblingWindow, WindowError, check_finite, check_time};

/// Which input of a join a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first input (`a` in an [`Expr`]).
    A,
    /// The second input (`b`).
    B,
}

/// What a join did with the values offered to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct JoinStats {
    /// Pairs made.
    pub joined: u64,
    /// Windows (or values of A) that side A had and side B did not.
    pub missing_b: u64,
    /// Windows that side B had and side A did not (window joins only).
    pub missing_a: u64,
    /// Values refused as late (on either side).
    pub late: u64,
    /// Values refused as NaN, infinite, beyond ±[`MAX_VALUE`](crate::MAX_VALUE)
    /// or at an event time beyond ±[`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP).
    pub invalid: u64,
}

/// Two sides that met.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    /// Event time of the pair: the window's start, or A's event time.
    pub ts: Timestamp,
    /// Side A's value (a window's mean).
    pub a: f64,
    /// Side B's value (a window's mean).
    pub b: f64,
    /// Readings behind the pair: A's and B's counts (1 and 1 for an interval join).
    pub count: (u64, u64),
    /// The window was closed early by `flush` (shutdown).
    pub partial: bool,
}

/// Pairs the windows of two streams: see the [module docs](self).
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WindowJoin<const P: usize> {
    a: TumblingWindow<P, Aggregate>,
    b: TumblingWindow<P, Aggregate>,
    stats: JoinStats,
}

impl<const P: usize> WindowJoin<P> {
    /// Windows of `size` that wait `lateness` for out-of-order values; the
    /// same bounds as [`TumblingWindow::new`].
    pub fn new(size: Timestamp, lateness: Timestamp) -> Result<Self, WindowError> {
        Ok(Self {
            a: TumblingWindow::new(size, lateness)?,
            b: TumblingWindow::new(size, lateness)?,
            stats: JoinStats::default(),
        })
    }

    /// Window size.
    pub fn size(&self) -> Timestamp {
        self.a.size()
    }

    /// Counts so far.
    pub fn stats(&self) -> JoinStats {
        let mut s = self.stats;
        s.late = self.a.stats().late + self.b.stats().late;
        s
    }

    /// Whether a value waits in a window that has not closed.
    pub fn has_open(&self) -> bool {
        self.a.has_open() || self.b.has_open()
    }

    /// Offers `value` of `side` at event time `ts`, standing for `weight`
    /// readings. Pairs that the new watermark completes go to `emit`,
    /// oldest first, before this returns.
    pub fn push(
        &mut self,
        side: Side,
        ts: Timestamp,
        value: f64,
        weight: u32,
        emit: impl FnMut(Pair),
    ) -> Result<(), Rejection> {
        if let Err(why) = check_finite(value).and(check_time(ts)) {
            self.stats.invalid += 1;
            return Err(why);
        }
        self.advance_to(ts, emit);
        let w = match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        };
        // Both sides were advanced to `ts`: this closes nothing.
        w.push_weighted(ts, value, weight, |_| {})
    }

    /// Moves event time to `ts` on both sides (for inputs gone quiet, from
    /// a periodic tick), pairing the windows that close.
    pub fn advance_to(&mut self, ts: Timestamp, emit: impl FnMut(Pair)) {
        // Most readings cross no window boundary: then nothing closes, and
        // the sides only move their event time (no buffers to set up).
        let size = self.a.size();
        if let Some(old) = self.a.watermark() {
            let new = ts
                .clamp(-crate::MAX_TIMESTAMP, crate::MAX_TIMESTAMP)
                .saturating_sub(self.a.lateness());
            if new.div_euclid(size) <= old.div_euclid(size) {
                self.a.advance_to(ts, |_| {});
                self.b.advance_to(ts, |_| {});
                return;
            }
        }
        let (mut a, mut b) = (Closing::<P>::new(), Closing::<P>::new());
        self.a.advance_to(ts, |c| a.push(c));
        self.b.advance_to(ts, |c| b.push(c));
        self.pair(a.iter(), b.iter(), emit);
    }

    /// Closes every open window now, as partial (for shutdown).
    pub fn flush(&mut self, emit: impl FnMut(Pair)) {
        let (mut a, mut b) = (Closing::<P>::new(), Closing::<P>::new());
        self.a.flush(|c| a.push(c));
        self.b.flush(|c| b.push(c));
        self.pair(a.iter(), b.iter(), emit);
    }

    /// Merges two lists of closed windows, each oldest first, by start.
    fn pair<'c>(
        &mut self,
        a: impl Iterator<Item = &'c Closed<Aggregate>>,
        b: impl Iterator<Item = &'c Closed<Aggregate>>,
        mut emit: impl FnMut(Pair),
    ) {
        let (mut a, mut b) = (a.peekable(), b.peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), Some(y)) if x.start == y.start => {
                    if let (Some(ma), Some(mb)) = (x.acc.mean(), y.acc.mean()) {
                        self.stats.joined += 1;
                        emit(Pair {
                            ts: x.start,
                            a: ma,
                            b: mb,
                            count: (x.acc.count(), y.acc.count()),
                            partial: x.partial || y.partial,
                        });
                    }
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.start < y.start => {
                    self.stats.missing_b += 1;
                    a.next();
                }
                (Some(_), None) => {
                    self.stats.missing_b += 1;
                    a.next();
                }
                _ => {
                    self.stats.missing_a += 1;
                    b.next();
                }
            }
        }
    }
}

/// The windows one side closes in one call: at most `P` (one per open pane).
struct Closing<const P: usize> {
    list: [Option<Closed<Aggregate>>; P],
    len: usize,
}

impl<const P: usize> Closing<P> {
    fn new() -> Self {
        Self {
            list: [None; P],
            len: 0,
        }
    }

    fn push(&mut self, c: Closed<Aggregate>) {
        // A tumbling window holds at most P open panes: never full.
        if let Some(slot) = self.list.get_mut(self.len) {
            *slot = Some(c);
            self.len += 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Closed<Aggregate>> {
        self.list[..self.len].iter().flatten()
    }
}

/// Pairs each value of A with the latest of B: see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IntervalJoin {
    within: Timestamp,
    latest_b: Option<(Timestamp, f64)>,
    stats: JoinStats,
}

impl IntervalJoin {
    /// Pairs values of A with a value of B at most `within` apart (≥ 0).
    pub fn new(within: Timestamp) -> Result<Self, WindowError> {
        if within < 0 {
            return Err(WindowError::NotPositive);
        }
        Ok(Self {
            within,
            latest_b: None,
            stats: JoinStats::default(),
        })
    }

    /// The largest gap between paired values.
    pub fn within(&self) -> Timestamp {
        self.within
    }

    /// Counts so far.
    pub fn stats(&self) -> JoinStats {
        self.stats
    }

    /// Offers `value` of `side` at event time `ts`; a value of A returns its
    /// pair, if B has a value close enough in time.
    pub fn push(
        &mut self,
        side: Side,
        ts: Timestamp,
        value: f64,
    ) -> Result<Option<Pair>, Rejection> {
        if let Err(why) = check_finite(value).and(check_time(ts)) {
            self.stats.invalid += 1;
            return Err(why);
        }
        match side {
            Side::B => {
                if self.latest_b.is_some_and(|(at, _)| at > ts) {
                    self.stats.late += 1;
                    return Err(Rejection::Late);
                }
                self.latest_b = Some((ts, value));
                Ok(None)
            }
            Side::A => match self.latest_b {
                Some((at, b)) if at.abs_diff(ts) <= self.within as u64 => {
                    self.stats.joined += 1;
                    Ok(Some(Pair {
                        ts,
                        a: value,
                        b,
                        count: (1, 1),
                        partial: false,
                    }))
                }
                _ => {
                    self.stats.missing_b += 1;
                    Ok(None)
                }
            },
        }
    }
}

/// The value a derived series computes from a pair: a small, total set
/// (no parser, no user code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expr {
    /// `a - b`.
    Difference,
    /// `a + b`.
    Sum,
    /// `a / b` (no value when `b` is 0).
    Ratio,
    /// The smaller of `a` and `b`.
    Min,
    /// The larger of `a` and `b`.
    Max,
    /// `(a + b) / 2`.
    Mean,
}

impl Expr {
    /// The value of the pair, or `None` when it is undefined (a ratio to 0)
    /// or beyond ±[`MAX_VALUE`](crate::MAX_VALUE).
    pub fn eval(self, a: f64, b: f64) -> Option<f64> {
        let v = match self {
            Expr::Difference => a - b,
            Expr::Sum => a + b,
            Expr::Ratio if b == 0.0 => return None,
            Expr::Ratio => a / b,
            Expr::Min => a.min(b),
            Expr::Max => a.max(b),
            Expr::Mean => a / 2.0 + b / 2.0,
        };
        check_finite(v).ok().map(|()| v)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn windows_of_both_sides_pair_by_start_and_a_lone_side_is_counted() {
        let mut j = WindowJoin::<3>::new(1_000, 500).unwrap();
        let mut out = Vec::new();
        let mut emit = |p: Pair| out.push((p.ts, p.a, p.b));
        j.push(Side::A, 100, 10.0, 1, &mut emit).unwrap();
        j.push(Side::A, 300, 20.0, 1, &mut emit).unwrap();
        j.push(Side::B, 900, 4.0, 1, &mut emit).unwrap();
        // Window [1000, 2000): only A.
        j.push(Side::A, 1_200, 7.0, 1, &mut emit).unwrap();
        // Window [2000, 3000): only B.
        j.push(Side::B, 2_100, 1.0, 1, &mut emit).unwrap();
        j.advance_to(10_000, &mut emit);
        assert_eq!(out, [(0, 15.0, 4.0)]);
        let s = j.stats();
        assert_eq!((s.joined, s.missing_a, s.missing_b), (1, 1, 1));
        // Late on either side.
        assert_eq!(j.push(Side::B, 50, 1.0, 1, |_| {}), Err(Rejection::Late));
        assert_eq!(j.stats().late, 1);
        assert_eq!(
            j.push(Side::A, 0, f64::NAN, 1, |_| {}),
            Err(Rejection::NonFinite)
        );
        assert_eq!(j.stats().invalid, 1);
    }

    #[test]
    fn an_interval_join_pairs_a_with_the_latest_b_within_the_bound() {
        let mut j = IntervalJoin::new(100).unwrap();
        assert_eq!(j.push(Side::A, 0, 1.0), Ok(None));
        j.push(Side::B, 50, 2.0).unwrap();
        let p = j.push(Side::A, 140, 5.0).unwrap().unwrap();
        assert_eq!((p.ts, p.a, p.b), (140, 5.0, 2.0));
        // Out of reach.
        assert_eq!(j.push(Side::A, 151, 5.0), Ok(None));
        // A value of B older than the latest is late.
        assert_eq!(j.push(Side::B, 40, 9.0), Err(Rejection::Late));
        // B ahead of A, within the bound.
        j.push(Side::B, 300, 3.0).unwrap();
        assert_eq!(j.push(Side::A, 200, 1.0).unwrap().map(|p| p.b), Some(3.0));
        let s = j.stats();
        assert_eq!((s.joined, s.missing_b, s.late), (2, 2, 1));
    }

    #[test]
    fn expressions_are_total() {
        assert_eq!(Expr::Difference.eval(5.0, 3.0), Some(2.0));
        assert_eq!(Expr::Sum.eval(5.0, 3.0), Some(8.0));
        assert_eq!(Expr::Ratio.eval(6.0, 3.0), Some(2.0));
        assert_eq!(Expr::Ratio.eval(6.0, 0.0), None);
        assert_eq!(Expr::Min.eval(6.0, 3.0), Some(3.0));
        assert_eq!(Expr::Max.eval(6.0, 3.0), Some(6.0));
        assert_eq!(Expr::Mean.eval(6.0, 3.0), Some(4.5));
        assert_eq!(Expr::Ratio.eval(1e100, 1e-100), None);
        assert_eq!(Expr::Mean.eval(1e100, 1e100), Some(1e100));
    }
}
