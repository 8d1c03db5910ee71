//! Model-based tests of the joins: each runs beside a naive reference
//! (every raw value kept, recomputed from scratch) over random streams of
//! two sides with out-of-order and late values, NaN, and idle ticks.

#![cfg(not(any(miri, loom)))]

use std::collections::BTreeMap;

use proptest::prelude::*;
use sluice_core::join::{IntervalJoin, Pair, Side, WindowJoin};

#[derive(Debug, Clone)]
enum Action {
    Push(Side, i64, f64),
    Tick(i64),
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::A), Just(Side::B)]
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![20 => -1e3f64..1e3, 1 => Just(f64::NAN)]
}

/// Times that mostly advance, often go back, and now and then jump.
fn actions() -> impl Strategy<Value = Vec<Action>> {
    prop::collection::vec(
        prop_oneof![
            8 => (side(), -30i64..60, value()).prop_map(|(s, d, v)| Action::Push(s, d, v)),
            1 => (0i64..80).prop_map(Action::Tick),
        ],
        0..200,
    )
    .prop_map(|steps| {
        let mut now = -50i64;
        steps
            .into_iter()
            .map(|a| match a {
                Action::Push(s, d, v) => {
                    now += d / 3;
                    Action::Push(s, now + d, v)
                }
                Action::Tick(d) => Action::Tick(now + d),
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Each window that both sides have values in (not late, by one
    /// watermark over both) gives one pair of the sides' means, in order of
    /// start; a window of one side only is counted as missing the other.
    #[test]
    fn a_window_join_pairs_what_a_naive_model_pairs(
        actions in actions(),
        size in 1i64..40,
        lateness in 0i64..60,
    ) {
        let p = (1 + (lateness + size - 1) / size) as usize;
        prop_assume!(p <= 8);
        let mut join = WindowJoin::<8>::new(size, lateness).unwrap();
        let mut got: Vec<Pair> = Vec::new();
        // The model: per window start, each side's values.
        let mut windows: BTreeMap<i64, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        let mut max_event: Option<i64> = None;
        let mut late = 0;
        let closed = |w: i64, max: Option<i64>| {
            max.is_some_and(|m| w + size <= m - lateness)
        };
        for a in &actions {
            match *a {
                Action::Push(s, ts, v) => {
                    let r = join.push(s, ts, v, 1, |p| got.push(p));
                    if v.is_nan() {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    max_event = Some(max_event.map_or(ts, |m| m.max(ts)));
                    let w = ts.div_euclid(size) * size;
                    if closed(w, max_event) {
                        prop_assert!(r.is_err());
                        late += 1;
                        continue;
                    }
                    prop_assert!(r.is_ok());
                    let e = windows.entry(w).or_default();
                    match s { Side::A => e.0.push(v), Side::B => e.1.push(v) }
                }
                Action::Tick(ts) => {
                    join.advance_to(ts, |p| got.push(p));
                    max_event = Some(max_event.map_or(ts, |m| m.max(ts)));
                }
            }
        }
        join.flush(|p| got.push(p));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let want: Vec<(i64, f64, f64, bool)> = windows
            .iter()
            .filter(|(_, (a, b))| !a.is_empty() && !b.is_empty())
            .map(|(&w, (a, b))| (w, mean(a), mean(b), !closed(w, max_event)))
            .collect();
        prop_assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!(g.ts, w.0);
            prop_assert!((g.a - w.1).abs() <= 1e-9 * (1.0 + w.1.abs()), "{} vs {}", g.a, w.1);
            prop_assert!((g.b - w.2).abs() <= 1e-9 * (1.0 + w.2.abs()), "{} vs {}", g.b, w.2);
            prop_assert_eq!(g.partial, w.3);
        }
        let s = join.stats();
        prop_assert_eq!(s.joined, want.len() as u64);
        prop_assert_eq!(s.late, late);
        let only_a = windows.values().filter(|(a, b)| !a.is_empty() && b.is_empty()).count();
        let only_b = windows.values().filter(|(a, b)| a.is_empty() && !b.is_empty()).count();
        prop_assert_eq!(s.missing_b, only_a as u64);
        prop_assert_eq!(s.missing_a, only_b as u64);
    }

    /// Each value of A pairs with the newest value of B seen before it (by
    /// event time, late ones kept out) if it is within the bound.
    #[test]
    fn an_interval_join_pairs_what_a_naive_model_pairs(
        actions in actions(),
        within in 0i64..50,
    ) {
        let mut join = IntervalJoin::new(within).unwrap();
        let mut b_seen: Vec<(i64, f64)> = Vec::new();
        let (mut joined, mut missing, mut late) = (0, 0, 0);
        for a in &actions {
            let Action::Push(s, ts, v) = *a else { continue };
            let r = join.push(s, ts, v);
            if v.is_nan() {
                prop_assert!(r.is_err());
                continue;
            }
            let newest = b_seen.iter().copied().max_by_key(|p| p.0);
            match s {
                Side::B => {
                    if newest.is_some_and(|(t, _)| t > ts) {
                        prop_assert!(r.is_err());
                        late += 1;
                    } else {
                        prop_assert_eq!(r, Ok(None));
                        b_seen.push((ts, v));
                    }
                }
                Side::A => {
                    // Ties: the last one pushed at the newest time (`max_by_key` takes the last).
                    let newest = b_seen.iter().copied().max_by_key(|p| p.0);
                    match newest.filter(|(t, _)| (t - ts).abs() <= within) {
                        Some((_, b)) => {
                            joined += 1;
                            let p = r.unwrap().unwrap();
                            prop_assert_eq!((p.ts, p.a, p.b), (ts, v, b));
                        }
                        None => {
                            missing += 1;
                            prop_assert_eq!(r, Ok(None));
                        }
                    }
                }
            }
        }
        let s = join.stats();
        prop_assert_eq!((s.joined, s.missing_b, s.late), (joined, missing, late));
    }
}
