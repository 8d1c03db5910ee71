//! What a checkpoint costs at 10,000 series: encoding a worker's state (the
//! worker does this on its own thread, between readings, every
//! `checkpoint.interval_ms`), committing it to a real SQLite file (the writer
//! thread), and decoding and restoring it at start.
//!
//! Each series has W1's rule with quantiles, the heaviest state a rule can
//! hold: a 1-second tumbling window with all aggregates and a p50/p99
//! sketch, and an EWMA z-score detector.
//!
//! `cargo bench -p sluice-benches --bench checkpoint`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use sluice::config::Config;
use sluice::output::Record;
use sluice::pipeline::checkpoint;
use sluice::pipeline::rules::Rules;
use sluice::pipeline::worker::{RulesSlot, Worker, WorkerStats};
use sluice::store::outbox::{Durability, OnCorrupt, Outbox};
use sluice_collectors::{Reading, SeriesKey};
use sluice_core::rng::SplitMix64;
use tokio::sync::mpsc;

const SERIES: usize = 10_000;

const BASE: &str = r#"
agent_id = "bench"
max_series = 20000
[sources.u]
kind = "udp"
bind = "127.0.0.1:0"
[output]
console = true
"#;

/// W1's rule, with quantiles.
const QUANTILES: &str = r#"
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 1000 }
quantiles = [0.5, 0.99]
anomaly = { alpha = 0.01, k = 4.0, warmup = 30 }
"#;

/// W1's rule as it is (for its size only).
const W1: &str = r#"
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 1000 }
anomaly = { alpha = 0.01, k = 4.0, warmup = 30 }
"#;

fn worker(rules: &str) -> (Worker, mpsc::Receiver<Record>) {
    let config = Config::parse(&format!("{BASE}{rules}")).unwrap();
    let rules = Arc::new(Rules::compile(&config.rules).unwrap());
    // Room for every record the warm-up closes, so that `process` never waits.
    let (tx, rx) = mpsc::channel(4 * SERIES);
    let worker = Worker::new(
        "bench".into(),
        rules,
        Arc::new(RulesSlot::default()),
        config.max_series,
        tx,
        Arc::new(WorkerStats::default()),
    );
    (worker, rx)
}

/// A worker holding `SERIES` series, each with a warm baseline and an open
/// window of 20 readings (W1: 20 readings per series per second).
fn warm_worker(rules: &str) -> (Worker, mpsc::Receiver<Record>) {
    let (mut w, mut rx) = worker(rules);
    let mut rng = SplitMix64::new(7);
    for i in 0..40i64 {
        for s in 0..SERIES {
            w.process(Reading {
                series: SeriesKey::try_from(format!("gw-01/sensor-{s:05}").as_str()).unwrap(),
                // Two windows: [0, 1000) closes, [1000, 2000) stays open.
                ts: i * 50,
                value: 20.0 + rng.next_f64() * 2.0 - 1.0,
                ingest: 0,
                weight: 1,
                labels: None,
            });
        }
        while rx.try_recv().is_ok() {}
    }
    (w, rx)
}

fn checkpoints(c: &mut Criterion) {
    for (name, rules) in [("without quantiles (W1)", W1), ("with p50/p99", QUANTILES)] {
        let len = warm_worker(rules).0.checkpoint().len();
        println!(
            "checkpoint of {SERIES} series {name}: {len} bytes ({:.0} per series)",
            len as f64 / SERIES as f64
        );
    }
    let (w, _rx) = warm_worker(QUANTILES);
    let state = w.checkpoint();
    let mut g = c.benchmark_group("checkpoint_10k_series");
    g.sample_size(20);
    g.bench_function("encode", |b| b.iter(|| black_box(w.checkpoint())));

    let dir = std::env::temp_dir().join(format!("sluice-checkpoint-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, durability) in [
        ("commit_normal", Durability::Normal),
        ("commit_full", Durability::Full),
    ] {
        let path = dir.join(format!("{name}.db"));
        let mut outbox = Outbox::open(&path, durability, OnCorrupt::Refuse, u64::MAX, u64::MAX)
            .unwrap()
            .0;
        let rows = [(0usize, state.clone())];
        let mut now = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                now += 1;
                outbox.commit(&[], &[], &rows, now).unwrap()
            })
        });
    }
    g.bench_function("decode_and_restore", |b| {
        b.iter_batched(
            || worker(QUANTILES),
            |(mut fresh, rx)| {
                fresh.restore(checkpoint::decode(&state).unwrap(), &Default::default());
                (fresh, rx)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, checkpoints);
criterion_main!(benches);
