//! Model-based tests of `Sequence`: over random streams of two inputs with
//! out-of-order times, the pattern is raised and cleared exactly where a
//! reference computed from the whole history says (`FollowedBy`: raised at
//! each B matching a fresh A, cleared at B's next clear; `NotFollowedBy`:
//! raised once event time passes an unanswered A's deadline, cleared at
//! the next B).

#![cfg(not(any(miri, loom)))]

use proptest::prelude::*;
use sluice_core::anomaly::ThresholdDetector;
use sluice_core::pattern::{Change, Mode, Sequence, Step};

fn readings() -> impl Strategy<Value = Vec<(Step, i64, f64)>> {
    prop::collection::vec(
        (
            prop_oneof![Just(Step::First), Just(Step::Then)],
            -20i64..60,
            0f64..100.0,
        ),
        0..150,
    )
    .prop_map(|steps| {
        let mut now = 0i64;
        steps
            .into_iter()
            .map(|(s, d, v)| {
                now += d / 3;
                (s, now + d, v)
            })
            .collect()
    })
}

/// Raised at `limit`, cleared below `clear`, one reading each.
fn condition() -> ThresholdDetector {
    ThresholdDetector::above(50.0, 40.0, 1, 1).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn followed_by_raises_where_the_history_says(
        readings in readings(),
        within in 0i64..80,
    ) {
        let mut seq = Sequence::new(condition(), condition(), within, Mode::FollowedBy).unwrap();
        let mut got = Vec::new();
        for (i, &(step, ts, v)) in readings.iter().enumerate() {
            for c in seq.observe(step, ts, v).unwrap().into_iter().flatten() {
                got.push((i, c));
            }
        }
        // The reference: each condition's raise and clear events, by
        // reading index, from its own readings.
        let events = |which: Step| {
            let mut up = false;
            let mut raised = Vec::new();
            let mut cleared = Vec::new();
            for (i, &(s, _, v)) in readings.iter().enumerate() {
                if s != which { continue; }
                if !up && v >= 50.0 { up = true; raised.push(i); }
                else if up && v < 40.0 { up = false; cleared.push(i); }
            }
            (raised, cleared)
        };
        let (a_raised, _) = events(Step::First);
        let (b_raised, b_cleared) = events(Step::Then);
        let mut want = Vec::new();
        let mut last_match: Option<usize> = None;
        let mut up = false;
        for i in 0..readings.len() {
            if up && b_cleared.contains(&i) {
                up = false;
                want.push((i, Change::Cleared { at: readings[i].1 }));
            }
            if !b_raised.contains(&i) { continue; }
            // The latest A event before it, not used by a match since.
            let Some(&j) = a_raised.iter().rev().find(|&&j| j < i) else { continue };
            if last_match.is_some_and(|m| m > j) { continue; }
            let (a, t) = (readings[j].1, readings[i].1);
            let max = readings[..=i].iter().map(|r| r.1).max().unwrap();
            if t >= a && max <= a + within {
                last_match = Some(i);
                up = true;
                want.push((i, Change::Raised { first: a, at: t }));
            }
        }
        prop_assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn not_followed_by_raises_where_the_history_says(
        readings in readings(),
        within in 0i64..80,
    ) {
        let mut seq = Sequence::new(condition(), condition(), within, Mode::NotFollowedBy).unwrap();
        let mut got = Vec::new();
        for (i, &(step, ts, v)) in readings.iter().enumerate() {
            for c in seq.observe(step, ts, v).unwrap().into_iter().flatten() {
                got.push((i, c));
            }
        }
        // The reference, reading by reading from the history: each
        // condition's raise events, the largest event time so far, and the
        // earliest A not yet answered by a B at or after it.
        let raises = |which: Step| {
            let mut up = false;
            let mut at = vec![false; readings.len()];
            for (i, &(s, _, v)) in readings.iter().enumerate() {
                if s != which { continue; }
                if !up && v >= 50.0 { up = true; at[i] = true; }
                else if up && v < 40.0 { up = false; }
            }
            at
        };
        let (a, b) = (raises(Step::First), raises(Step::Then));
        let mut want = Vec::new();
        let mut pending: Option<i64> = None;
        let mut raised = false;
        let mut max = i64::MIN;
        for i in 0..readings.len() {
            let ts = readings[i].1;
            max = max.max(ts);
            // The deadline passes before this reading's own event counts.
            if let Some(first) = pending && max > first + within {
                pending = None;
                raised = true;
                want.push((i, Change::Raised { first, at: first + within }));
            }
            if b[i] {
                if pending.is_some_and(|first| ts >= first) {
                    pending = None;
                }
                if raised {
                    raised = false;
                    want.push((i, Change::Cleared { at: ts }));
                }
            }
            if a[i] && pending.is_none() {
                pending = Some(ts);
                // Already past its deadline: raised at once.
                if max > ts + within {
                    pending = None;
                    raised = true;
                    want.push((i, Change::Raised { first: ts, at: ts + within }));
                }
            }
        }
        prop_assert_eq!(got, want);
    }
}
