//! Per-reading cost of the core's per-series work: a 1-second tumbling window
//! on event time with all aggregates, plus an EWMA z-score with an alert state
//! machine (W1's processing, one series at a time).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_core::anomaly::{Hysteresis, ZScoreDetector};
use sluice_core::rng::SplitMix64;
use sluice_core::window::TumblingWindow;

const READINGS: usize = 100_000;

fn per_reading(c: &mut Criterion) {
    // W1's values: baseline 20, noise, a spike every 500th reading; one reading
    // per millisecond, some arriving up to 50 ms out of order.
    let mut rng = SplitMix64::new(1);
    let readings: Vec<(i64, f64)> = (0..READINGS)
        .map(|i| {
            let jitter = rng.below(50) as i64;
            let spike = if i % 500 == 499 { 15.0 } else { 0.0 };
            (i as i64 - jitter, 20.0 + rng.next_f64() * 2.0 - 1.0 + spike)
        })
        .collect();
    let mut g = c.benchmark_group("per_reading");
    g.throughput(Throughput::Elements(READINGS as u64));
    g.bench_function("tumbling_1s+aggregates+ewma_zscore", |b| {
        b.iter(|| {
            let mut window = TumblingWindow::<2>::new(1_000, 100).unwrap();
            let levels = Hysteresis::new(4.0, 3.0, 1, 1).unwrap();
            let mut score = ZScoreDetector::new(0.01, 30, levels).unwrap();
            let mut closed = 0u64;
            let mut alerts = 0u64;
            for &(ts, v) in &readings {
                let _ = window.push(ts, v, |c| closed += c.acc.count());
                if let Ok(verdict) = score.observe(v) {
                    alerts += u64::from(verdict.transition.is_some());
                }
            }
            black_box((closed, alerts))
        })
    });
    g.bench_function("tumbling_1s+aggregates", |b| {
        b.iter(|| {
            let mut window = TumblingWindow::<2>::new(1_000, 100).unwrap();
            let mut closed = 0u64;
            for &(ts, v) in &readings {
                let _ = window.push(ts, v, |c| closed += c.acc.count());
            }
            black_box(closed)
        })
    });
    g.finish();
}

criterion_group!(pipeline, per_reading);
criterion_main!(pipeline);
