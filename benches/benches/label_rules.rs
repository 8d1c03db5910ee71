//! Per-reading cost of a rule with label sketches, through the agent's own
//! worker (`Worker::process`): W1's rule (a 1-second tumbling window with
//! all aggregates and an EWMA z-score), and the same rule adding a distinct
//! count and a top 10 over a `mac` label (a BLE gateway: 5,000 devices,
//! Zipf-distributed), or quantiles by DDSketch or KLL, or joined to a
//! reference table of 1,000 sensors (calibration and a threshold from a
//! column) against the same threshold written in the rule.
//!
//! `cargo bench -p sluice-benches --bench label_rules`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice::config::Config;
use sluice::output::Record;
use sluice::pipeline::rules::Rules;
use sluice::pipeline::worker::{RulesSlot, Worker, WorkerStats};
use sluice_collectors::reading::Labels;
use sluice_collectors::{Reading, SeriesKey};
use sluice_core::rng::SplitMix64;
use tokio::sync::mpsc;

const READINGS: usize = 100_000;

const BASE: &str = r#"
agent_id = "bench"
[sources.u]
kind = "udp"
bind = "127.0.0.1:0"
[sources.u.json]
labels = ["mac"]
[output]
console = true
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 1000 }
anomaly = { alpha = 0.01, k = 4.0, warmup = 30 }
"#;

fn worker(extra: &str) -> (Worker, mpsc::Receiver<Record>) {
    let mut config = Config::parse(&format!("{BASE}{extra}")).unwrap();
    config.load_tables().unwrap();
    let rules = Arc::new(Rules::of(&config).unwrap());
    let (tx, rx) = mpsc::channel(1 << 16);
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

/// One gateway's readings, one a millisecond, each labelled with a device
/// drawn from 5,000 with weight 1/(i + 1).
fn readings() -> Vec<Reading> {
    let mut rng = SplitMix64::new(3);
    let weights: Vec<f64> = (0..5_000).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let cdf: Vec<f64> = weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect();
    let names: Arc<[Box<str>]> = Arc::from(vec![Box::<str>::from("mac")]);
    (0..READINGS)
        .map(|i| {
            let device = cdf.partition_point(|&c| c < rng.next_f64()).min(4_999);
            let mac = format!("AA:BB:CC:{:02X}:{:02X}:01", device / 256, device % 256);
            Reading {
                series: SeriesKey::try_from("gw-1").unwrap(),
                ts: i as i64,
                value: -70.0 + rng.next_f64() * 10.0,
                ingest: 0,
                weight: 1,
                labels: Labels::new(names.clone(), &[Some(&mac)]).map(Box::new),
            }
        })
        .collect()
}

/// A table of 1,000 sensors, the gateway's among them, for the join row.
fn table() -> String {
    let path = std::env::temp_dir().join(format!("sluice-bench-table-{}.csv", std::process::id()));
    let mut csv = String::from("series,max,scale,offset\n");
    for i in 0..1_000 {
        csv.push_str(&format!("gw-{i},{},1.0,0.5\n", 100 + i));
    }
    std::fs::write(&path, csv).unwrap();
    format!(
        "table = \"sensors\"\ncalibrate = true\nthresholds = [{{ above = \"@max\" }}]\n[tables.sensors]\npath = {:?}\n",
        path.display().to_string()
    )
}

fn per_reading(c: &mut Criterion) {
    let input = readings();
    let joined = table();
    let mut g = c.benchmark_group("label_rule_per_reading");
    g.throughput(Throughput::Elements(READINGS as u64));
    for (name, extra) in [
        ("w1_rule", ""),
        (
            "w1_rule+distinct+top_10",
            "distinct = \"mac\"\ntop_k = { label = \"mac\", k = 10 }\n",
        ),
        ("w1_rule+quantiles_ddsketch", "quantiles = [0.5, 0.99]\n"),
        (
            "w1_rule+threshold_of_same_level",
            "thresholds = [{ above = 101.0 }]\n",
        ),
        ("w1_rule+table_join(calibrate,@max)", joined.as_str()),
        (
            "w1_rule+quantiles_kll_k200",
            "quantiles = { at = [0.5, 0.99], method = \"kll\" }\n",
        ),
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

criterion_group!(label_rules, per_reading);
criterion_main!(label_rules);
