//! Per-reading cost of derived series (two-way joins), through the agent's
//! own worker (`Worker::process`), on W1's shape: 1,000 sensors under W1's
//! rule (a 1-second tumbling window with all aggregates and an EWMA
//! z-score), each reporting every 100 ms, for 10 s of event time. The same
//! readings with 500 derived series, each `a - b` of two of the sensors
//! (`s-0000` with `s-0001`, …), by aligned 1-second windows or by interval
//! (±200 ms), against none: without a rule over the derived series (the
//! join's own cost), and with W1's rule over them too.
//! And 500 sequence patterns over the same pairs. Also prints the memory a
//! derived series' join state, and a pattern's, take.
//!
//! `cargo bench -p sluice-benches --bench joins`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice::config::Config;
use sluice::output::Record;
use sluice::pipeline::rules::Rules;
use sluice::pipeline::worker::{RulesSlot, Worker, WorkerStats};
use sluice_collectors::{Reading, SeriesKey};
use sluice_core::rng::SplitMix64;
use tokio::sync::mpsc;

const SENSORS: usize = 1_000;
const ROUNDS: usize = 100;

const BASE: &str = r#"
agent_id = "bench"
max_series = 4000
[sources.u]
kind = "udp"
bind = "127.0.0.1:0"
[output]
console = true
[[rules]]
match = "s-*"
window = { kind = "tumbling", size_ms = 1000 }
anomaly = { alpha = 0.01, k = 4.0, warmup = 30 }
"#;

fn derived(join: &str) -> String {
    (0..SENSORS / 2)
        .map(|i| {
            format!(
                "[[derived]]\nname = \"d-{i:04}\"\na = \"s-{:04}\"\nb = \"s-{:04}\"\nexpr = \"a - b\"\n{join}\n",
                2 * i,
                2 * i + 1
            )
        })
        .collect()
}

fn worker(extra: &str) -> (Worker, mpsc::Receiver<Record>) {
    let config = Config::parse(&format!("{BASE}{extra}")).unwrap();
    let rules = Arc::new(Rules::of(&config).unwrap());
    let (tx, rx) = mpsc::channel(1 << 17);
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

/// Every sensor every 100 ms, a few ms apart, for 10 s.
fn readings() -> Vec<Reading> {
    let mut rng = SplitMix64::new(5);
    let keys: Vec<SeriesKey> = (0..SENSORS)
        .map(|i| SeriesKey::try_from(format!("s-{i:04}").as_str()).unwrap())
        .collect();
    (0..ROUNDS)
        .flat_map(|round| {
            let keys = &keys;
            let mut rng = SplitMix64::new(rng.next_u64());
            (0..SENSORS).map(move |i| Reading {
                series: keys[i].clone(),
                ts: (round * 100 + i % 7) as i64,
                value: 20.0 + rng.next_f64() * 5.0,
                ingest: 0,
                weight: 1,
                labels: None,
            })
        })
        .collect()
}

fn per_reading(c: &mut Criterion) {
    let input = readings();
    let aligned = derived("window_ms = 1000");
    let interval = derived("within_ms = 200");
    // The join state of one derived series, by kind: the worker keeps a
    // pointer to its entry (the op, and two times).
    for (kind, extra) in [
        ("aligned, no lateness", aligned.as_str()),
        (
            "aligned, lateness 1 window",
            &derived("window_ms = 1000\nlateness_ms = 1000"),
        ),
        (
            "aligned, lateness 7 windows",
            &derived("window_ms = 1000\nlateness_ms = 7000"),
        ),
        ("interval", interval.as_str()),
    ] {
        let rules = Rules::of(&Config::parse(&format!("{BASE}{extra}")).unwrap()).unwrap();
        let bytes = 8 + 16 + rules.derived()[0].state().size();
        println!(
            "join state, {kind}: {bytes} B per derived series; 1,000: {:.0} KB",
            bytes as f64 * 1000.0 / 1000.0
        );
    }
    // A pattern's state: the entry's pointer, the state machine, two times.
    println!(
        "pattern state: {} B per pattern",
        8 + std::mem::size_of::<sluice_core::pattern::Sequence>() + 16
    );
    // 500 patterns over the same pairs of sensors: s-0000 above 24 then
    // s-0001 below 21 within 500 ms.
    let patterns: String = (0..SENSORS / 2)
        .map(|i| {
            format!(
                "[[patterns]]\nname = \"p-{i:04}\"\nfirst = {{ match = \"s-{:04}\", above = 24.0, clear_at = 23.0 }}\nthen = {{ match = \"s-{:04}\", below = 21.0, clear_at = 22.0 }}\nwithin_ms = 500\n",
                2 * i,
                2 * i + 1
            )
        })
        .collect();
    let mut g = c.benchmark_group("join_per_reading");
    g.throughput(Throughput::Elements(input.len() as u64));
    // W1's rule over the derived series too: each of their readings costs
    // what a sensor's does.
    let rule = "[[rules]]\nmatch = \"d-*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\nanomaly = { alpha = 0.01, k = 4.0, warmup = 30 }\n";
    let (aligned_ruled, interval_ruled) = (format!("{aligned}{rule}"), format!("{interval}{rule}"));
    for (name, extra) in [
        ("w1_rule", ""),
        ("w1_rule+500_derived_aligned_1s", aligned.as_str()),
        ("w1_rule+500_derived_aligned_1s+their_rule", &aligned_ruled),
        ("w1_rule+500_derived_interval_200ms", interval.as_str()),
        (
            "w1_rule+500_derived_interval_200ms+their_rule",
            &interval_ruled,
        ),
        ("w1_rule+500_patterns_500ms", &patterns),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || (worker(extra), input.clone()),
                |((mut w, mut rx), readings)| {
                    for r in readings {
                        w.process(r);
                    }
                    let mut records = 0;
                    while rx.try_recv().is_ok() {
                        records += 1;
                    }
                    black_box(records)
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(joins, per_reading);
criterion_main!(joins);
