//! Session windows: one window per burst of activity (a machine's run, a
//! visit), closed by a gap with no readings.
//!
//! A session holds readings whose event times lie less than `gap` apart
//! one after the other, and spans less than `max_len` from its first to its
//! last. A reading less than `gap` from an open session (before its first
//! or after its last) joins it, if the session's span stays under
//! `max_len`; a reading within `gap` of two sessions joins them into one
//! (again only under `max_len`; else it joins the earlier). Any other
//! reading starts a session.
//!
//! On event time with the other windows' watermark (the largest event time
//! less the allowed lateness): a session closes once the watermark reaches
//! its last reading plus `gap` (nothing in time can extend it any more) or
//! its first plus `max_len`. A reading that an emitted session would have
//! taken (before that session's last plus `gap`, or, for a session closed
//! at `max_len`, before its first plus `max_len`) is late: counted and
//! refused. A session is emitted as `[first, last + 1)`.
//!
//! **Memory**: `P` open sessions. Without `max_len` cuts, sessions lie at
//! least `gap` apart and stay open while their last reading is within
//! `gap` of the watermark, so at most `lateness / gap + 1` (rounded up) are
//! open at once: 4 for a lateness of 3 gaps. A reading that finds all `P`
//! taken closes the oldest early (emitted with `partial`), so memory stays
//! fixed whatever the input.

use super::{Closed, Rejection, WindowError, WindowStats, check_finite, check_time};
use crate::aggregate::{Accumulator, Aggregate};
use crate::{MAX_TIMESTAMP, Timestamp};

/// An open session.
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Session<A> {
    first: Timestamp,
    last: Timestamp,
    acc: A,
}

/// Session windows over event time, with up to `P` sessions open at once
/// (see the module docs).
///
/// ```
/// use sluice_core::window::SessionWindow;
///
/// // Sessions end after 10 units of silence; no lateness.
/// let mut w = SessionWindow::<2>::new(10, i64::MAX, 0).unwrap();
/// let mut closed = Vec::new();
/// for ts in [0, 4, 9, 30, 33, 50] {
///     w.push(ts, 1.0, |c| closed.push((c.start, c.end, c.acc.count()))).unwrap();
/// }
/// // The watermark is 50: [0, 10) and [30, 34) have closed.
/// assert_eq!(closed, [(0, 10, 3), (30, 34, 2)]);
/// ```
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SessionWindow<const P: usize, A: Accumulator = Aggregate> {
    gap: Timestamp,
    max_len: Timestamp,
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
    sessions: [Option<Session<A>>; P],
    /// The largest event time seen, if any.
    max_event: Option<Timestamp>,
    /// A reading before this would have joined an emitted session: late.
    closed_before: Option<Timestamp>,
    stats: WindowStats,
    /// Each session starts as `A::with_params(&params)`. Not saved.
    #[cfg_attr(feature = "serde", serde(skip))]
    params: A::Params,
}

impl<const P: usize, A: Accumulator> SessionWindow<P, A> {
    /// Sessions that end after `gap` without readings, span less than
    /// `max_len` (`i64::MAX`: unbounded), and wait `lateness` for
    /// out-of-order readings, all in the unit of the event times. Fails
    /// unless `gap` and `max_len` are positive, `lateness` is not negative
    /// and `P` is at least 1.
    pub fn new(
        gap: Timestamp,
        max_len: Timestamp,
        lateness: Timestamp,
    ) -> Result<Self, WindowError> {
        if gap <= 0 || max_len <= 0 {
            return Err(WindowError::NotPositive);
        }
        if lateness < 0 {
            return Err(WindowError::NegativeLateness);
        }
        if P == 0 {
            return Err(WindowError::TooFewPanes {
                needed: 1,
                available: 0,
            });
        }
        Ok(Self {
            gap,
            max_len,
            lateness,
            sessions: [const { None }; P],
            max_event: None,
            closed_before: None,
            stats: WindowStats::default(),
            params: A::Params::default(),
        })
    }

    /// See [`super::HoppingWindow::with_params`].
    pub fn with_params(mut self, params: A::Params) -> Self {
        self.params = params;
        self
    }

    /// See [`super::HoppingWindow::set_params`].
    pub fn set_params(&mut self, params: A::Params) {
        self.params = params;
    }

    /// The parameters new sessions start with.
    pub fn params(&self) -> &A::Params {
        &self.params
    }

    /// The gap that ends a session.
    pub fn gap(&self) -> Timestamp {
        self.gap
    }

    /// The longest span of a session.
    pub fn max_len(&self) -> Timestamp {
        self.max_len
    }

    /// Allowed lateness.
    pub fn lateness(&self) -> Timestamp {
        self.lateness
    }

    /// The watermark, once a reading or a time has been seen.
    pub fn watermark(&self) -> Option<Timestamp> {
        self.max_event.map(|t| t.saturating_sub(self.lateness))
    }

    /// Counts of what happened to the values offered so far.
    pub fn stats(&self) -> WindowStats {
        self.stats
    }

    /// Whether a session is open.
    pub fn has_open(&self) -> bool {
        self.sessions.iter().any(Option::is_some)
    }

    /// Offers a value observed at `ts`; sessions the new watermark closes
    /// go to `emit`, oldest first. Refuses what the other windows refuse,
    /// and late values (see the module docs).
    #[inline]
    pub fn push(
        &mut self,
        ts: Timestamp,
        value: f64,
        emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        self.push_weighted(ts, value, 1, emit)
    }

    /// [`Self::push`] for a value that stands for `weight` readings.
    pub fn push_weighted(
        &mut self,
        ts: Timestamp,
        value: f64,
        weight: u32,
        mut emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        if let Err(why) = check_finite(value).and(check_time(ts)) {
            return self.stats.reject(why);
        }
        if self.closed_before.is_some_and(|before| ts < before) {
            return self.stats.reject(Rejection::Late);
        }
        self.advance_to(ts, &mut emit);
        // Closing by the new watermark may have emitted the session this
        // value belongs to.
        if self.closed_before.is_some_and(|before| ts < before) {
            return self.stats.reject(Rejection::Late);
        }
        let joins = |s: &Session<A>| {
            ts > s.first.saturating_sub(self.gap)
                && ts < s.last.saturating_add(self.gap)
                && s.last.max(ts).saturating_sub(s.first.min(ts)) < self.max_len
        };
        // The earliest session it joins, and a second one it bridges to.
        let mut first: Option<usize> = None;
        let mut second: Option<usize> = None;
        for (i, s) in self.sessions.iter().enumerate() {
            let Some(s) = s else { continue };
            if !joins(s) {
                continue;
            }
            match first {
                None => first = Some(i),
                Some(f) if s.first < self.session(f).first => {
                    second = Some(f);
                    first = Some(i);
                }
                Some(_) => second = second.or(Some(i)),
            }
        }
        let slot = match first {
            Some(i) => i,
            None => {
                let slot = match self.sessions.iter().position(Option::is_none) {
                    Some(free) => free,
                    None => self.close_oldest(&mut emit),
                };
                self.sessions[slot] = Some(Session {
                    first: ts,
                    last: ts,
                    acc: A::with_params(&self.params),
                });
                slot
            }
        };
        let s = self.sessions[slot].as_mut().expect("joined or just opened");
        s.first = s.first.min(ts);
        s.last = s.last.max(ts);
        s.acc.add_weighted(ts, value, weight);
        // A bridge: the later session merges into the earlier, if the whole
        // stays under `max_len`.
        if let Some(j) = second {
            let (a, b) = (self.session(slot), self.session(j));
            if a.last.max(b.last).saturating_sub(a.first.min(b.first)) < self.max_len {
                let b = self.sessions[j].take().expect("open");
                let a = self.sessions[slot].as_mut().expect("open");
                a.first = a.first.min(b.first);
                a.last = a.last.max(b.last);
                a.acc.merge(&b.acc);
            }
        }
        self.stats.accepted += 1;
        Ok(())
    }

    fn session(&self, i: usize) -> &Session<A> {
        self.sessions[i].as_ref().expect("an open session")
    }

    /// Moves event time forward to `ts` without a value (a quiet series,
    /// from a periodic tick), closing the sessions the new watermark
    /// passes.
    pub fn advance_to(&mut self, ts: Timestamp, mut emit: impl FnMut(Closed<A>)) {
        let ts = ts.clamp(-MAX_TIMESTAMP, MAX_TIMESTAMP);
        if self.max_event.is_some_and(|seen| seen >= ts) {
            return;
        }
        self.max_event = Some(ts);
        let watermark = ts.saturating_sub(self.lateness);
        loop {
            // Oldest first.
            let next = self
                .sessions
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
                .filter(|(_, s)| {
                    watermark >= s.last.saturating_add(self.gap)
                        || watermark >= s.first.saturating_add(self.max_len)
                })
                .min_by_key(|(_, s)| s.first)
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            self.close(i, false, &mut emit);
        }
    }

    /// Closes every open session now, as partial (for shutdown).
    pub fn flush(&mut self, mut emit: impl FnMut(Closed<A>)) {
        while let Some(i) = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.first)))
            .min_by_key(|&(_, first)| first)
            .map(|(i, _)| i)
        {
            self.close(i, true, &mut emit);
        }
    }

    /// Closes the session that started first, early (partial), to make
    /// room; returns its slot.
    fn close_oldest(&mut self, emit: &mut impl FnMut(Closed<A>)) -> usize {
        let i = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.first)))
            .min_by_key(|&(_, first)| first)
            .map_or(0, |(i, _)| i);
        self.close(i, true, emit);
        i
    }

    fn close(&mut self, i: usize, partial: bool, emit: &mut impl FnMut(Closed<A>)) {
        let Some(s) = self.sessions[i].take() else {
            return;
        };
        // What it would still have taken: before its last plus the gap,
        // and (closed at its longest) before its first plus max_len.
        let mut before = s.last.saturating_add(self.gap);
        if s.last.saturating_sub(s.first) < self.max_len {
            before = before.min(s.first.saturating_add(self.max_len));
        }
        // Readings before an open session's first may still join it.
        self.closed_before = Some(self.closed_before.map_or(before, |b| b.max(before)));
        self.stats.closed += 1;
        emit(Closed {
            start: s.first,
            end: s.last.saturating_add(1),
            acc: s.acc,
            partial,
        });
    }
}
