//! Property tests of the alert state machine, the detectors and shedding.

#![cfg(not(any(miri, loom)))]

use proptest::prelude::*;
use sluice_core::anomaly::{
    AlertMachine, AlertState, Hysteresis, RateOfChangeDetector, RuleError, ThresholdDetector,
    Transition, ZScoreDetector,
};
use sluice_core::rng::SplitMix64;
use sluice_core::shed::{Decision, Priority, ShedPolicy, ShedReason, Shedder};
use sluice_core::window::Rejection;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Every transition is justified by its debounce run, transitions
    /// alternate, and no qualifying run goes unanswered.
    #[test]
    fn alert_machine_obeys_hysteresis_and_debounce(
        raise_at in 0.0f64..10.0,
        gap in 0.0f64..5.0,
        raise_after in 1u32..5,
        clear_after in 1u32..5,
        scores in prop::collection::vec(-2.0f64..15.0, 0..300),
    ) {
        let clear_below = raise_at - gap;
        let mut m = AlertMachine::new(Hysteresis::new(raise_at, clear_below, raise_after, clear_after).unwrap());
        let (n, k) = (raise_after as usize, clear_after as usize);
        let mut last_transition: Option<usize> = None;
        let mut state = AlertState::Normal;
        for (i, &s) in scores.iter().enumerate() {
            let t = m.observe(s);
            // The run that must trigger a change, counted since the last one.
            let since = last_transition.map_or(0, |t| t + 1);
            let run = |pred: &dyn Fn(f64) -> bool, len: usize| {
                i + 1 >= since + len && scores[i + 1 - len..=i].iter().all(|&x| pred(x))
            };
            match state {
                AlertState::Normal => {
                    let qualifies = run(&|x| x >= raise_at, n);
                    prop_assert_eq!(t, qualifies.then_some(Transition::Raised), "score {} at {}", s, i);
                }
                AlertState::Raised => {
                    let qualifies = run(&|x| x < clear_below, k);
                    prop_assert_eq!(t, qualifies.then_some(Transition::Cleared), "score {} at {}", s, i);
                }
            }
            if let Some(t) = t {
                state = if t == Transition::Raised { AlertState::Raised } else { AlertState::Normal };
                // Flapping bound: a change needs a full debounce run after the last one.
                if let Some(prev) = last_transition {
                    prop_assert!(i - prev >= n.min(k));
                }
                last_transition = Some(i);
            }
            prop_assert_eq!(m.state(), state);
        }
    }

    /// The z-score is computed against the EWMA baseline before the value joins it.
    #[test]
    fn z_score_uses_the_prior_baseline(
        alpha in 0.001f64..0.5,
        warmup in 1u64..40,
        values in prop::collection::vec(-100.0f64..100.0, 1..200),
    ) {
        let levels = Hysteresis::new(4.0, 2.0, 1, 1).unwrap();
        let mut d = ZScoreDetector::new(alpha, warmup, levels).unwrap();
        let lambda = 1.0 - alpha;
        for (i, &v) in values.iter().enumerate() {
            let prior = &values[..i];
            let verdict = d.observe(v).unwrap();
            if (i as u64) < warmup {
                prop_assert_eq!(verdict.score, None);
                continue;
            }
            let weights: Vec<f64> = (0..i).rev().map(|j| lambda.powi(j as i32)).collect();
            let w: f64 = weights.iter().sum();
            let mean = prior.iter().zip(&weights).map(|(x, w)| x * w).sum::<f64>() / w;
            let var = prior.iter().zip(&weights).map(|(x, w)| w * (x - mean).powi(2)).sum::<f64>() / w;
            let z = verdict.score.unwrap();
            if var > 1e-6 {
                let expect = (v - mean) / var.sqrt();
                prop_assert!((z - expect).abs() <= 1e-6 * expect.abs().max(1.0), "z {} vs {}", z, expect);
            }
        }
    }

    /// Shedding: every reading is decided and counted once; critical readings
    /// and readings below the high-water mark (and the critical reserve) are
    /// always kept, and normal readings never enter the reserve.
    #[test]
    fn shedding_counts_every_decision(
        high_water in 0usize..64,
        keep_one_in in 1u32..10,
        sample in any::<bool>(),
        seed in any::<u64>(),
        offers in prop::collection::vec((0usize..=64, any::<bool>()), 0..500),
    ) {
        let policy = if sample {
            ShedPolicy::Sample { high_water, keep_one_in }
        } else {
            ShedPolicy::DropNewest { high_water }
        };
        let mut s = Shedder::new(policy, seed).unwrap();
        let mut dropped = 0u64;
        for &(occupancy, critical) in &offers {
            let priority = if critical { Priority::Critical } else { Priority::Normal };
            let d = s.decide(occupancy, 64, priority);
            let limit = 64 - sluice_core::shed::critical_reserve(64);
            if critical || occupancy < high_water.min(limit) {
                prop_assert_eq!(d, Decision::Keep);
            }
            if !critical && occupancy >= limit {
                prop_assert!(matches!(d, Decision::Drop(_)), "{:?}", d);
            }
            match d {
                Decision::Drop(ShedReason::Full) => prop_assert!(occupancy >= limit),
                Decision::Drop(ShedReason::HighWater) => prop_assert!(!sample),
                Decision::Drop(ShedReason::Sampled) | Decision::KeepSampled { .. } => prop_assert!(sample),
                Decision::Keep => {}
            }
            if matches!(d, Decision::Drop(_)) {
                dropped += 1;
            }
        }
        prop_assert_eq!(s.counters().offered(), offers.len() as u64);
        prop_assert_eq!(s.counters().dropped(), dropped);
    }
}

#[test]
fn detectors_refuse_non_finite_values_without_changing_state() {
    let levels = Hysteresis::new(1.0, 0.5, 1, 1).unwrap();
    let mut z = ZScoreDetector::new(0.1, 0, levels).unwrap();
    z.observe(1.0).unwrap();
    let before = z;
    assert_eq!(z.observe(f64::NAN), Err(Rejection::NonFinite));
    assert_eq!(z.observe(f64::INFINITY), Err(Rejection::NonFinite));
    assert_eq!(z, before);
    let mut t = ThresholdDetector::above(1.0, 0.5, 1, 1).unwrap();
    assert_eq!(t.observe(f64::NAN), Err(Rejection::NonFinite));
    assert_eq!(t.state(), AlertState::Normal);
    let mut r = RateOfChangeDetector::new(1000, levels).unwrap();
    assert_eq!(r.observe(0, f64::NEG_INFINITY), Err(Rejection::NonFinite));
}

#[test]
fn rate_of_change_scores_per_unit_and_skips_reordered_readings() {
    let levels = Hysteresis::new(5.0, 2.0, 1, 1).unwrap();
    let mut r = RateOfChangeDetector::new(1000, levels).unwrap();
    assert_eq!(r.observe(0, 10.0).unwrap().score, None);
    // +3 in 500 ms is 6 per second.
    let v = r.observe(500, 13.0).unwrap();
    assert_eq!(v.score, Some(6.0));
    assert_eq!(v.transition, Some(Transition::Raised));
    // An older reading is not scored and does not become the reference.
    assert_eq!(r.observe(400, 100.0).unwrap().score, None);
    assert_eq!(r.observe(1500, 14.0).unwrap().score, Some(1.0));
    assert_eq!(r.state(), AlertState::Normal);
}

/// W1's anomaly rule on W1's signal: baseline 20, σ = 1 Gaussian noise, a +15
/// spike every 500th reading; α = 0.01, 4σ, active after 30 readings. Every
/// spike must alert and, at 4σ, false alarms must be rare (P(|z|>4) ≈ 6e-5).
#[test]
fn w1_spikes_are_detected_and_noise_is_not() {
    let mut rng = SplitMix64::new(7);
    let mut gaussian = || {
        // Box-Muller.
        let (u1, u2) = (rng.next_f64().max(1e-300), rng.next_f64());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let levels = Hysteresis::new(4.0, 4.0, 1, 1).unwrap();
    let mut d = ZScoreDetector::new(0.01, 30, levels).unwrap();
    let (mut caught, mut false_alarms) = (0, 0);
    for i in 1..=50_000u32 {
        let spike = i % 500 == 0;
        let v = 20.0 + gaussian() + if spike { 15.0 } else { 0.0 };
        let z = d.observe(v).unwrap().score.unwrap_or(0.0);
        match (spike, z.abs() >= 4.0) {
            (true, true) => caught += 1,
            (false, true) => false_alarms += 1,
            _ => {}
        }
    }
    assert_eq!(caught, 100);
    // Expected ≈ 3 in 49,900 with a true σ; the EWMA's estimate adds some.
    assert!(false_alarms < 40, "{false_alarms} false alarms");
}

#[test]
fn rules_with_levels_that_cannot_work_are_refused() {
    // Infinite levels, for any detector.
    assert_eq!(
        Hysteresis::new(f64::INFINITY, 1.0, 1, 1).err(),
        Some(RuleError::NotFinite)
    );
    assert_eq!(
        Hysteresis::new(1.0, f64::NEG_INFINITY, 1, 1).err(),
        Some(RuleError::NotFinite)
    );
    // Z-score levels are levels of |z|: k = -1 would raise on every reading.
    let negative = Hysteresis::new(-1.0, -2.0, 1, 1).unwrap();
    assert_eq!(
        ZScoreDetector::new(0.1, 10, negative).err(),
        Some(RuleError::NegativeScore)
    );
    let zero = Hysteresis::new(0.0, 0.0, 1, 1).unwrap();
    assert_eq!(
        ZScoreDetector::new(0.1, 10, zero).err(),
        Some(RuleError::NegativeScore)
    );
    // Thresholds may be negative (a freezer's limit).
    assert!(Hysteresis::new(-18.0, -20.0, 1, 1).is_ok());
    assert!(ZScoreDetector::new(0.1, 10, Hysteresis::new(4.0, 0.0, 1, 1).unwrap()).is_ok());
}

/// A value anywhere in f64's range, finite or not, biased to the extremes.
fn any_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        (-1.0f64..1.0, -310i32..310).prop_map(|(m, e)| m * 10f64.powi(e)),
        Just(f64::MAX),
        Just(-f64::MAX),
        Just(1.7e308),
        Just(1e300),
        Just(1e100),
        Just(f64::MIN_POSITIVE),
        Just(f64::NAN),
        Just(f64::INFINITY),
        -100.0f64..100.0,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 4 } else { 256 }))]

    /// Whatever values arrive, accepted ones are within ±MAX_VALUE, a
    /// window's aggregate stays finite, and a z-score detector is never
    /// stuck: after its baseline has forgotten the extremes, ordinary
    /// readings clear any alert by the normal rule.
    #[test]
    fn extreme_values_never_poison_aggregates_or_detectors(
        values in prop::collection::vec(any_value(), 1..60),
    ) {
        use sluice_core::aggregate::Aggregate;
        use sluice_core::window::TumblingWindow;
        let mut window = TumblingWindow::<4>::new(1_000, 0).unwrap();
        let mut closed = Vec::new();
        let levels = Hysteresis::new(4.0, 3.0, 1, 1).unwrap();
        let mut z = ZScoreDetector::new(0.5, 5, levels).unwrap();
        for (i, &v) in values.iter().enumerate() {
            let pushed = window.push(i as i64, v, |c| closed.push(c));
            prop_assert_eq!(pushed.is_ok(), v.abs() <= sluice_core::MAX_VALUE);
            if let Ok(verdict) = z.observe(v) {
                prop_assert!(verdict.score.is_none_or(|s| !s.is_nan()));
            }
        }
        window.flush(|c| closed.push(c));
        for c in &closed {
            let a: &Aggregate = &c.acc;
            prop_assert!(a.sum().is_finite(), "{:?}", a);
            prop_assert!(a.mean().is_none_or(f64::is_finite), "{:?}", a);
            prop_assert!(a.stddev().is_none_or(f64::is_finite), "{:?}", a);
        }
        // α = 0.5: the baseline halves an extreme's weight per reading.
        for i in 0..2_000 {
            let verdict = z.observe(10.0 + (i % 3) as f64).unwrap();
            prop_assert!(verdict.score.is_none_or(|s| !s.is_nan()));
        }
        prop_assert_eq!(z.state(), AlertState::Normal);
    }
}
