//! A sensor node's per-reading cost on the host: the reference firmware's
//! pipeline (`NodeSensor`: window, EWMA detector, DDSketch and HyperLogLog,
//! and each closed window's records encoded as link frames) against what a
//! node without it does per reading, formatting it as a JSON line to send
//! raw, in the same run. The firmware's own cost on the Cortex-M4 comes from
//! QEMU (`cargo run --release -p sluice-benches --example firmware_cost`).

use std::hint::black_box;
use std::io::Write;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice_core::link::{MAX_FRAME, Record, SketchKind, encode};
use sluice_core::node::{NodeOutput, NodeSensor, TestSignal};

/// The firmware's sizes (firmware/src/main.rs).
const BUCKETS: usize = 2 * 417;
const HLL_BYTES: usize = 1_536;
/// One window's readings at 100 Hz and 1 s windows, several windows.
const READINGS: usize = 1_000;

fn readings() -> Vec<(i64, f64, u32)> {
    let mut s = TestSignal::new(1, 0, Some(500));
    (0..READINGS as i64)
        .map(|i| {
            let (v, tag) = s.next_reading();
            (1_796_000_000_000 + i * 10, v, tag)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let input = readings();
    let mut g = c.benchmark_group("node_per_reading");
    g.throughput(Throughput::Elements(READINGS as u64));
    let mut frame = [0u8; MAX_FRAME];
    let mut sketch = [0u8; MAX_FRAME];
    g.bench_function(
        "sluice NodeSensor (window, detector, 2 sketches, frames)",
        |b| {
            // A fresh sensor for each run of the readings (its clock only
            // moves forward), made outside the timing.
            let fresh = || -> Box<NodeSensor<BUCKETS, HLL_BYTES>> {
                Box::new(
                    NodeSensor::new(
                        1_000,
                        NodeSensor::<BUCKETS, HLL_BYTES>::default_detector(),
                        0.01,
                    )
                    .unwrap(),
                )
            };
            b.iter_batched_ref(
                fresh,
                |sensor| {
                    let mut bytes = 0usize;
                    for &(ts, v, tag) in &input {
                        let _ = sensor.push(ts, v, &tag.to_le_bytes(), |out| match out {
                            NodeOutput::Window {
                                closed,
                                quantiles,
                                distinct,
                            } => {
                                for kind in [SketchKind::Quantiles, SketchKind::Distinct] {
                                    let n = match kind {
                                        SketchKind::Quantiles => quantiles.write_to(&mut sketch),
                                        SketchKind::Distinct => distinct.write_to(&mut sketch),
                                    }
                                    .unwrap();
                                    let r = Record::Sketch {
                                        series: "node-1/s0",
                                        start: closed.start,
                                        end: closed.end,
                                        kind,
                                        bytes: &sketch[..n],
                                    };
                                    bytes += encode(&r, &mut frame).unwrap();
                                }
                                let r = Record::Window {
                                    series: "node-1/s0",
                                    start: closed.start,
                                    end: closed.end,
                                    aggregate: closed.acc,
                                };
                                bytes += encode(&r, &mut frame).unwrap();
                            }
                            NodeOutput::Alert { .. } => bytes += 1,
                        });
                    }
                    black_box(bytes)
                },
                BatchSize::SmallInput,
            )
        },
    );
    g.bench_function("raw: each reading as a JSON line", |b| {
        let mut line = Vec::with_capacity(128);
        b.iter(|| {
            let mut bytes = 0usize;
            for &(ts, v, tag) in &input {
                line.clear();
                writeln!(
                    line,
                    r#"{{"sensor":"node-1/s0","ts":{ts},"value":{v},"tag":{tag}}}"#
                )
                .unwrap();
                bytes += line.len();
            }
            black_box(bytes)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
