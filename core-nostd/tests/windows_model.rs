//! Model-based tests: every window runs beside a naive reference (vectors of
//! the raw values, recomputed from scratch) over random streams with
//! out-of-order and late readings, NaN and infinities, and idle ticks.

#![cfg(not(any(miri, loom)))]

use std::collections::BTreeMap;

use proptest::prelude::*;
use sluice_core::aggregate::{Accumulator, Aggregate};
use sluice_core::window::{
    Closed, CountWindow, DecayingStats, HoppingWindow, Rejection, SessionWindow, TumblingWindow,
    WindowStats,
};

/// A reading, an idle tick, or the end (flush).
#[derive(Debug, Clone)]
enum Action {
    Push(i64, f64),
    Tick(i64),
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        20 => -1e3f64..1e3,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
    ]
}

/// Timestamps that mostly advance, jump now and then, and often go back.
fn actions() -> impl Strategy<Value = Vec<Action>> {
    prop::collection::vec(
        prop_oneof![
            8 => (-30i64..60, value()).prop_map(|(d, v)| Action::Push(d, v)),
            1 => (0i64..80).prop_map(Action::Tick),
        ],
        0..200,
    )
    .prop_map(|steps| {
        let mut now = -50i64;
        steps
            .into_iter()
            .map(|a| match a {
                Action::Push(d, v) => {
                    now += d / 3;
                    Action::Push(now + d, v)
                }
                Action::Tick(d) => Action::Tick(now + d),
            })
            .collect()
    })
}

/// The summary of `points` recomputed from scratch.
#[derive(Debug)]
struct Expected {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: (i64, f64),
    last: (i64, f64),
    mean: f64,
    variance: f64,
}

fn expected(points: &[(i64, f64)]) -> Expected {
    let n = points.len() as f64;
    let sum: f64 = points.iter().map(|p| p.1).sum();
    let mean = sum / n;
    let first = points
        .iter()
        .fold(points[0], |a, &p| if p.0 < a.0 { p } else { a });
    let last = points
        .iter()
        .fold(points[0], |a, &p| if p.0 >= a.0 { p } else { a });
    Expected {
        count: points.len() as u64,
        sum,
        min: points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
        max: points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
        first,
        last,
        mean,
        variance: points.iter().map(|p| (p.1 - mean).powi(2)).sum::<f64>() / n,
    }
}

fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * scale.max(1.0)
}

fn assert_matches(got: &Aggregate, points: &[(i64, f64)]) {
    let e = expected(points);
    let scale = points.iter().map(|p| p.1.abs()).sum::<f64>();
    assert_eq!(got.count(), e.count);
    assert_eq!(got.min(), Some(e.min));
    assert_eq!(got.max(), Some(e.max));
    let (f, l) = (got.first().unwrap(), got.last().unwrap());
    assert_eq!((f.ts, f.value), e.first);
    assert_eq!((l.ts, l.value), e.last);
    assert!(
        close(got.sum(), e.sum, scale),
        "sum {} vs {}",
        got.sum(),
        e.sum
    );
    assert!(close(got.mean().unwrap(), e.mean, scale));
    assert!(
        close(
            got.population_variance().unwrap(),
            e.variance,
            scale * scale
        ),
        "variance {:?} vs {}",
        got.population_variance(),
        e.variance
    );
}

/// A closed window: start, end, its values, and whether flush closed it.
type Emitted = (i64, i64, Vec<(i64, f64)>, bool);

/// The naive hopping window: a list of values per window index.
struct ReferenceHopping {
    slide: i64,
    span: i64,
    lateness: i64,
    max_event: Option<i64>,
    closed_through: Option<i64>,
    open: BTreeMap<i64, Vec<(i64, f64)>>,
    emitted: Vec<Emitted>,
    late: u64,
    non_finite: u64,
    accepted: u64,
}

impl ReferenceHopping {
    fn new(length: i64, slide: i64, lateness: i64) -> Self {
        Self {
            slide,
            span: length / slide,
            lateness,
            max_event: None,
            closed_through: None,
            open: BTreeMap::new(),
            emitted: Vec::new(),
            late: 0,
            non_finite: 0,
            accepted: 0,
        }
    }

    fn emit_through(&mut self, last: i64, partial: bool) {
        while let Some((&j, _)) = self.open.first_key_value() {
            if j > last {
                break;
            }
            let points = self.open.remove(&j).unwrap();
            self.emitted.push((
                (j + 1) * self.slide - self.span * self.slide,
                (j + 1) * self.slide,
                points,
                partial,
            ));
        }
        self.closed_through = Some(self.closed_through.map_or(last, |c| c.max(last)));
    }

    fn tick(&mut self, ts: i64) {
        if self.max_event.is_some_and(|m| m >= ts) {
            return;
        }
        self.max_event = Some(ts);
        let wm = ts - self.lateness;
        // Window j closes when its end (j + 1)·slide <= watermark.
        self.emit_through(wm.div_euclid(self.slide) - 1, false);
    }

    fn push(&mut self, ts: i64, v: f64) {
        if !v.is_finite() {
            self.non_finite += 1;
            return;
        }
        self.tick(ts);
        let pane = ts.div_euclid(self.slide);
        let open: Vec<i64> = (pane..pane + self.span)
            .filter(|&j| self.closed_through.is_none_or(|c| j > c))
            .collect();
        if open.is_empty() {
            self.late += 1;
            return;
        }
        self.accepted += 1;
        for j in open {
            self.open.entry(j).or_default().push((ts, v));
        }
    }

    fn flush(&mut self) {
        self.emit_through(i64::MAX, true);
    }
}

/// The time windows under test, behind one interface.
trait TimeWindow {
    fn push(&mut self, ts: i64, v: f64, emit: &mut Vec<Closed<Aggregate>>)
    -> Result<(), Rejection>;
    fn advance_to(&mut self, ts: i64, emit: &mut Vec<Closed<Aggregate>>);
    fn flush(&mut self, emit: &mut Vec<Closed<Aggregate>>);
    fn stats(&self) -> WindowStats;
    fn has_open(&self) -> bool;
}

macro_rules! time_window {
    ($t:ty) => {
        impl TimeWindow for $t {
            fn push(
                &mut self,
                ts: i64,
                v: f64,
                emit: &mut Vec<Closed<Aggregate>>,
            ) -> Result<(), Rejection> {
                <$t>::push(self, ts, v, |c| emit.push(c))
            }
            fn advance_to(&mut self, ts: i64, emit: &mut Vec<Closed<Aggregate>>) {
                <$t>::advance_to(self, ts, |c| emit.push(c))
            }
            fn flush(&mut self, emit: &mut Vec<Closed<Aggregate>>) {
                <$t>::flush(self, |c| emit.push(c))
            }
            fn stats(&self) -> WindowStats {
                <$t>::stats(self)
            }
            fn has_open(&self) -> bool {
                <$t>::has_open(self)
            }
        }
    };
}
time_window!(HoppingWindow<16>);
time_window!(TumblingWindow<16>);

/// Runs `real` beside the reference hopping window over `actions`.
fn check(mut real: impl TimeWindow, length: i64, slide: i64, lateness: i64, actions: &[Action]) {
    let mut reference = ReferenceHopping::new(length, slide, lateness);
    let mut got: Vec<Closed<Aggregate>> = Vec::new();
    for action in actions {
        match *action {
            Action::Push(ts, v) => {
                let result = real.push(ts, v, &mut got);
                let late_before = reference.late;
                let nf_before = reference.non_finite;
                reference.push(ts, v);
                let expect = if reference.non_finite > nf_before {
                    Err(Rejection::NonFinite)
                } else if reference.late > late_before {
                    Err(Rejection::Late)
                } else {
                    Ok(())
                };
                assert_eq!(result, expect, "push({ts}, {v})");
            }
            Action::Tick(ts) => {
                real.advance_to(ts, &mut got);
                reference.tick(ts);
            }
        }
        assert_eq!(
            got.len(),
            reference.emitted.len(),
            "windows closed after {action:?}"
        );
    }
    real.flush(&mut got);
    reference.flush();
    assert!(!real.has_open());
    assert_eq!(got.len(), reference.emitted.len());
    for (g, (start, end, points, partial)) in got.iter().zip(&reference.emitted) {
        assert_eq!((g.start, g.end, g.partial), (*start, *end, *partial));
        assert_matches(&g.acc, points);
    }
    let stats = real.stats();
    assert_eq!(stats.late, reference.late);
    assert_eq!(stats.non_finite, reference.non_finite);
    assert_eq!(stats.accepted, reference.accepted);
    assert_eq!(stats.closed, got.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn tumbling_matches_reference(
        size in 1i64..25,
        lateness_windows in 0i64..15,
        lateness_extra in 0i64..25,
        actions in actions(),
    ) {
        let lateness = (lateness_windows * size + lateness_extra).min(size * 15);
        check(TumblingWindow::<16>::new(size, lateness).unwrap(), size, size, lateness, &actions);
    }

    #[test]
    fn hopping_matches_reference(
        slide in 1i64..12,
        span in 1i64..5,
        lateness in 0i64..40,
        actions in actions(),
    ) {
        // Keep within the 16 panes the window type has.
        let lateness = lateness.min(slide * (16 - span));
        let (length, window) = (span * slide, HoppingWindow::<16>::new(span * slide, slide, lateness).unwrap());
        check(window, length, slide, lateness, &actions);
    }

    #[test]
    fn count_window_matches_chunks(
        size in 1u64..10,
        values in prop::collection::vec((0i64..1000, value()), 0..100),
    ) {
        let mut w = CountWindow::<Aggregate>::new(size).unwrap();
        let mut got = Vec::new();
        for &(ts, v) in &values {
            let r = w.push(ts, v, |c| got.push(c));
            prop_assert_eq!(r.is_err(), !v.is_finite());
        }
        w.flush(|c| got.push(c));
        let finite: Vec<_> = values.iter().copied().filter(|p| p.1.is_finite()).collect();
        let chunks: Vec<_> = finite.chunks(size as usize).collect();
        prop_assert_eq!(got.len(), chunks.len());
        for (i, (g, chunk)) in got.iter().zip(&chunks).enumerate() {
            assert_matches(&g.acc, chunk);
            prop_assert_eq!(g.start, chunk.iter().map(|p| p.0).min().unwrap());
            prop_assert_eq!(g.end, chunk.iter().map(|p| p.0).max().unwrap() + 1);
            prop_assert_eq!(g.partial, i + 1 == chunks.len() && chunk.len() < size as usize);
        }
        prop_assert_eq!(w.stats().non_finite, (values.len() - finite.len()) as u64);
    }

    #[test]
    fn decaying_matches_the_definition(
        lambda in 0.05f64..0.999,
        values in prop::collection::vec(-1e3f64..1e3, 1..60),
    ) {
        let mut d = DecayingStats::new(lambda).unwrap();
        for &v in &values {
            d.push(v).unwrap();
        }
        // S = Σ λ^i x_{t-i}, W = Σ λ^i, mean = S/W, var = Σ λ^i (x - mean)² / W.
        let weights: Vec<f64> = (0..values.len()).rev().map(|i| lambda.powi(i as i32)).collect();
        let w: f64 = weights.iter().sum();
        let s: f64 = values.iter().zip(&weights).map(|(x, w)| x * w).sum();
        let mean = s / w;
        let var = values.iter().zip(&weights).map(|(x, w)| w * (x - mean).powi(2)).sum::<f64>() / w;
        let scale = values.iter().map(|x| x.abs()).sum::<f64>();
        prop_assert!(close(d.decaying_sum(), s, scale));
        prop_assert!(close(d.weight(), w, 1.0));
        prop_assert!(close(d.mean().unwrap(), mean, scale));
        prop_assert!(close(d.variance().unwrap(), var, scale * scale));
    }

    #[test]
    fn merge_equals_the_union(
        values in prop::collection::vec((-100i64..100, -1e6f64..1e6), 1..80),
        cut in 0usize..80,
    ) {
        let cut = cut.min(values.len());
        let (a, b) = values.split_at(cut);
        let mut left = Aggregate::empty();
        let mut right = Aggregate::empty();
        let mut whole = Aggregate::empty();
        for &(ts, v) in a { left.add(ts, v); whole.add(ts, v); }
        for &(ts, v) in b { right.add(ts, v); whole.add(ts, v); }
        left.merge(&right);
        assert_matches(&left, &values);
        assert_matches(&whole, &values);
    }
}

/// Sums values times a scale that is a parameter: shows which
/// parameters each pane and window started with.
#[derive(Clone)]
struct Scaled {
    scale: u32,
    sum: f64,
    seen: bool,
}

impl Accumulator for Scaled {
    type Params = u32;
    fn empty() -> Self {
        Self::with_params(&1)
    }
    fn with_params(scale: &u32) -> Self {
        Self {
            scale: *scale,
            sum: 0.0,
            seen: false,
        }
    }
    fn add(&mut self, _ts: sluice_core::Timestamp, value: f64) {
        self.sum += value * f64::from(self.scale);
        self.seen = true;
    }
    fn merge(&mut self, other: &Self) {
        assert_eq!(self.scale, other.scale, "panes of different shapes");
        self.sum += other.sum;
        self.seen |= other.seen;
    }
    fn is_empty(&self) -> bool {
        !self.seen
    }
}

#[test]
fn panes_and_windows_start_with_the_windows_params() {
    let mut w = HoppingWindow::<4, Scaled>::new(10, 5, 0)
        .unwrap()
        .with_params(3);
    let mut closed = Vec::new();
    for ts in [1, 6, 12] {
        w.push(ts, 1.0, |c| closed.push((c.end, c.acc.scale, c.acc.sum)))
            .unwrap();
    }
    // Set again (as after a restore): panes started later take them.
    w.set_params(5);
    assert_eq!(*w.params(), 5);
    w.push(31, 1.0, |c| closed.push((c.end, c.acc.scale, c.acc.sum)))
        .unwrap();
    w.flush(|c| closed.push((c.end, c.acc.scale, c.acc.sum)));
    assert_eq!(
        closed,
        [
            (5, 3, 3.0),
            (10, 3, 6.0),
            (15, 3, 6.0),
            (20, 3, 3.0),
            (35, 5, 5.0),
            (40, 5, 5.0)
        ]
    );

    let mut t = TumblingWindow::<1, Scaled>::new(10, 0)
        .unwrap()
        .with_params(2);
    let mut sums = Vec::new();
    for ts in [1, 2, 11] {
        t.push(ts, 1.0, |c| sums.push((c.acc.scale, c.acc.sum)))
            .unwrap();
    }
    assert_eq!(sums, [(2, 4.0)]);
    assert_eq!(*t.params(), 2);
}

#[test]
fn each_window_starts_with_the_params() {
    // A count window of accumulators shaped by a parameter: the
    // parameter reaches the open window and each later one.
    #[derive(Clone)]
    struct Tagged(u8, u64);
    impl Accumulator for Tagged {
        type Params = u8;
        fn empty() -> Self {
            Tagged(0, 0)
        }
        fn with_params(tag: &u8) -> Self {
            Tagged(*tag, 0)
        }
        fn add(&mut self, _ts: sluice_core::Timestamp, _value: f64) {
            self.1 += 1;
        }
        fn merge(&mut self, other: &Self) {
            self.1 += other.1;
        }
        fn is_empty(&self) -> bool {
            self.1 == 0
        }
    }
    let mut w = CountWindow::<Tagged>::new(2).unwrap().with_params(7);
    let mut got = Vec::new();
    for ts in 0..4 {
        w.push(ts, 1.0, |c| got.push((c.acc.0, c.acc.1))).unwrap();
    }
    assert_eq!(got, [(7, 2), (7, 2)]);
    assert_eq!(*w.params(), 7);
}

/// Readings at times that go back at most `lateness` behind the latest,
/// with gaps of every size: (time, value).
fn session_stream(lateness: i64) -> impl Strategy<Value = Vec<(i64, f64)>> {
    prop::collection::vec((0i64..40, -10i64..=0, -100.0f64..100.0), 1..150).prop_map(move |steps| {
        let mut latest = 0i64;
        steps
            .into_iter()
            .map(|(advance, back, v)| {
                // Mostly small steps, now and then a long silence.
                latest += if advance > 35 {
                    advance * 4
                } else {
                    advance / 4
                };
                let back = (back * lateness / 10).max(-lateness);
                (latest + back, v)
            })
            .collect()
    })
}

/// The sessions of `points` computed offline: sorted by time, cut where
/// two neighbours are `gap` or more apart. (start, end, count, sum).
fn offline_sessions(points: &[(i64, f64)], gap: i64) -> Vec<(i64, i64, u64, f64)> {
    let mut sorted = points.to_vec();
    sorted.sort_by_key(|p| p.0);
    let mut out: Vec<(i64, i64, u64, f64)> = Vec::new();
    for (ts, v) in sorted {
        match out.last_mut() {
            Some(s) if ts - (s.1 - 1) < gap => {
                s.1 = ts + 1;
                s.2 += 1;
                s.3 += v;
            }
            _ => out.push((ts, ts + 1, 1, v)),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Out of order by at most the lateness, nothing is late, and the
    /// sessions emitted (as the watermark passes, then at flush) are those
    /// computed offline from all readings.
    #[test]
    fn sessions_match_the_offline_cut_of_the_same_readings(
        gap in 1i64..30,
        lateness_gaps in 0i64..=3,
        seed_stream in session_stream(10),
    ) {
        let lateness = (gap * lateness_gaps).min(10);
        let stream: Vec<(i64, f64)> = seed_stream;
        let mut w = SessionWindow::<4>::new(gap, i64::MAX, lateness).unwrap();
        let mut got = Vec::new();
        let mut latest = i64::MIN;
        let mut kept = Vec::new();
        for &(ts, v) in &stream {
            // Only what is within the lateness of the latest is offered.
            if ts < latest.saturating_sub(lateness) {
                continue;
            }
            latest = latest.max(ts);
            kept.push((ts, v));
            let r = w.push(ts, v, |c| got.push((c.start, c.end, c.acc.count(), c.acc.sum(), c.partial)));
            prop_assert_eq!(r, Ok(()), "{} at latest {}", ts, latest);
        }
        // Lateness up to 3 gaps opens at most 4 sessions: none closed early.
        prop_assert!(got.iter().all(|s| !s.4), "{:?}", got);
        w.flush(|c| got.push((c.start, c.end, c.acc.count(), c.acc.sum(), c.partial)));
        let mut got: Vec<_> = got.into_iter().map(|(a, b, c, d, _)| (a, b, c, d)).collect();
        got.sort_by_key(|s| s.0);
        let want = offline_sessions(&kept, gap);
        prop_assert_eq!(got.len(), want.len(), "{:?} vs {:?}", got, want);
        for (g, e) in got.iter().zip(&want) {
            prop_assert_eq!((g.0, g.1, g.2), (e.0, e.1, e.2));
            prop_assert!((g.3 - e.3).abs() < 1e-6 * (1.0 + e.3.abs()));
        }
    }
}

#[test]
fn a_session_ends_at_its_longest_and_late_readings_are_refused() {
    let mut w = SessionWindow::<2>::new(10, 25, 0).unwrap();
    let mut got = Vec::new();
    // Every 5: one run, cut at 25 of span.
    for ts in (0..60).step_by(5) {
        w.push(ts, 1.0, |c| got.push((c.start, c.end, c.acc.count())))
            .unwrap();
    }
    w.flush(|c| got.push((c.start, c.end, c.acc.count())));
    assert_eq!(got, [(0, 21, 5), (25, 46, 5), (50, 56, 2)]);

    let mut w = SessionWindow::<2>::new(10, i64::MAX, 0).unwrap();
    let mut got = Vec::new();
    for ts in [0, 5, 30] {
        w.push(ts, 1.0, |c| got.push((c.start, c.end))).unwrap();
    }
    assert_eq!(got, [(0, 6)]);
    // 12 would have joined [0, 5] (closed at 15): late; 16 starts anew.
    assert_eq!(w.push(12, 1.0, |_| ()), Err(Rejection::Late));
    assert_eq!(w.stats().late, 1);
    assert_eq!(w.push(16, 1.0, |c| got.push((c.start, c.end))), Ok(()));
}

#[test]
fn a_reading_between_two_sessions_joins_them_and_too_many_close_the_oldest() {
    // Lateness lets 0 and 18 open two sessions; 9 bridges them.
    let mut w = SessionWindow::<2>::new(10, i64::MAX, 30).unwrap();
    let mut got = Vec::new();
    for ts in [18, 0, 9] {
        w.push(ts, 1.0, |c| {
            got.push((c.start, c.end, c.acc.count(), c.partial))
        })
        .unwrap();
    }
    w.flush(|c| got.push((c.start, c.end, c.acc.count(), c.partial)));
    assert_eq!(got, [(0, 19, 3, true)]);
    // Three apart, two slots: the oldest closes early, as partial.
    let mut w = SessionWindow::<2>::new(10, i64::MAX, 100).unwrap();
    let mut got = Vec::new();
    for ts in [50, 0, 25] {
        w.push(ts, 1.0, |c| got.push((c.start, c.partial))).unwrap();
    }
    assert_eq!(got, [(0, true)]);
    assert!(w.has_open());
}
