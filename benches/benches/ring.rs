//! Two-thread SPSC throughput: Sluice's ring against rtrb, crossbeam's
//! `ArrayQueue` and heapless's `spsc::Queue`, in the same run, for 8-byte and
//! 32-byte items, one at a time and in batches of 64 (see
//! `sluice_benches::spsc` for how items move).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::spsc::{Bytes32, Contender, Item};

fn group<T: Item>(c: &mut Criterion, name: &str) {
    let mut g = c.benchmark_group(format!("spsc_{name}"));
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    for batched in [false, true] {
        for contender in Contender::ALL {
            if batched && !contender.has_batches() {
                continue;
            }
            let id = format!(
                "{}/{}",
                contender.name(),
                if batched { "batch64" } else { "single" }
            );
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                // One sample moves many items, so thread start-up is amortised.
                b.iter_custom(|iters| contender.run::<T>(iters * 1_000, batched) / 1_000)
            });
        }
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    group::<u64>(c, "u64");
    group::<Bytes32>(c, "32B");
}

criterion_group!(ring, benches);
criterion_main!(ring);
