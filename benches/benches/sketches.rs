//! Sketch update rates, and HyperLogLog and Count-Min against existing crates
//! (`datasketches`, `hyperloglogplus`, `pdatastructs`) in the same run at
//! equal memory, with the accuracy of each printed beside the speed.
//!
//! Items are `u64`s. Sluice's HyperLogLog and the `datasketches` crate hash
//! their little-endian bytes with MurmurHash3 (seed 9001), the rest of
//! Sluice's sketches with XXH3; the other crates hash the value with the
//! `BuildHasher` they are given (std's SipHash-1-3 `RandomState` /
//! `DefaultHasher`, their documented default), so the comparison is of each
//! library as a user would run it.

use std::collections::hash_map::RandomState;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hyperloglogplus::{HyperLogLog as _, HyperLogLogPlus};
use pdatastructs::countminsketch::CountMinSketch;
use sluice_core::rng::SplitMix64;
use sluice_core::sketch::{
    BloomFilter, CountMin, Counter, DdSketch, HyperLogLog, Reservoir, SpaceSaving, hll,
};

const N: u64 = 100_000;
/// HLL precision 12: 4096 registers.
const P: u8 = 12;
const M: usize = 1 << P;
type Hll = HyperLogLog<[u8; hll::storage_bytes(M)]>;

/// Relative rms error of estimates over `runs` seeds at cardinality `n`.
fn rms(runs: u64, n: u64, mut estimate: impl FnMut(u64) -> f64) -> f64 {
    let sq: f64 = (0..runs)
        .map(|seed| (estimate(seed) / n as f64 - 1.0).powi(2))
        .sum();
    (sq / runs as f64).sqrt()
}

/// An item as DataSketches' Java and C++ libraries hash it: its bytes only.
struct Raw<'a>(&'a [u8]);

impl std::hash::Hash for Raw<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

fn datasketches_hll() -> datasketches::hll::HllSketch {
    datasketches::hll::HllSketch::new(P, datasketches::hll::HllType::Hll4).unwrap()
}

fn hll(c: &mut Criterion) {
    // Accuracy at n = 1e6 over 30 seeds (splitmix64 items), and the bytes
    // each serializes to.
    let n = 1_000_000;
    let items = |seed: u64| {
        let mut rng = SplitMix64::new(seed);
        (0..n).map(move |_| rng.next_u64())
    };
    let mut sizes = (0, 0);
    let ours = rms(30, n, |seed| {
        let mut h = Hll::new();
        items(seed).for_each(|i| h.insert(&i.to_le_bytes()));
        sizes.0 = h.serialized_len();
        h.estimate()
    });
    let theirs = rms(30, n, |seed| {
        let mut h = datasketches_hll();
        items(seed).for_each(|i| h.update(Raw(&i.to_le_bytes())));
        sizes.1 = h.serialize().len();
        h.estimate()
    });
    let plus = rms(30, n, |seed| {
        let mut h: HyperLogLogPlus<u64, _> = HyperLogLogPlus::new(P, RandomState::new()).unwrap();
        items(seed).for_each(|i| h.insert(&i));
        h.count()
    });
    eprintln!(
        "accuracy: HLL p={P}, n={n}, 30 runs: sluice rms {ours:.4} ({} bytes), datasketches HLL_4 rms {theirs:.4} ({} bytes), hyperloglogplus rms {plus:.4}",
        sizes.0, sizes.1
    );
    let mut g = c.benchmark_group("hll_insert");
    g.throughput(Throughput::Elements(N));
    g.bench_function("sluice", |b| {
        b.iter(|| {
            let mut h = Hll::new();
            (0..N).for_each(|i| h.insert(&i.to_le_bytes()));
            black_box(h.estimate())
        })
    });
    g.bench_function("datasketches", |b| {
        b.iter(|| {
            let mut h = datasketches_hll();
            (0..N).for_each(|i| h.update(Raw(&i.to_le_bytes())));
            black_box(h.estimate())
        })
    });
    g.bench_function("hyperloglogplus", |b| {
        b.iter(|| {
            let mut h: HyperLogLogPlus<u64, _> =
                HyperLogLogPlus::new(P, RandomState::new()).unwrap();
            (0..N).for_each(|i| h.insert(&i));
            black_box(h.count())
        })
    });
    g.finish();
}

/// 100,000 draws from 10,000 items with weight ∝ 1/(i+1).
fn zipf(seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    let w: Vec<f64> = (0..10_000).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = w.iter().sum();
    let cdf: Vec<f64> = w
        .iter()
        .scan(0.0, |a, x| {
            *a += x / total;
            Some(*a)
        })
        .collect();
    (0..N)
        .map(|_| cdf.partition_point(|&c| c < rng.next_f64()).min(9_999) as u64)
        .collect()
}

fn count_min(c: &mut Criterion) {
    // ε = 0.1 %, δ = 1 %: 2719 × 5 counters of 8 bytes in both.
    let (w, d) = (
        CountMin::<()>::width_for(0.001),
        CountMin::<()>::depth_for(0.01),
    );
    let stream = zipf(3);
    let mut exact = vec![0u64; 10_000];
    stream.iter().for_each(|&x| exact[x as usize] += 1);
    let mut ours = CountMin::with_storage(vec![0u64; w * d], w, d, 1, false).unwrap();
    let mut ours_cu = CountMin::with_storage(vec![0u64; w * d], w, d, 1, true).unwrap();
    let mut theirs = CountMinSketch::<u64, u64>::with_params(w, d);
    let mut ds = datasketches::countmin::CountMinSketch::<u64>::new(d as u8, w as u32).unwrap();
    for &x in &stream {
        ours.add(&x.to_le_bytes(), 1);
        ours_cu.add(&x.to_le_bytes(), 1);
        theirs.add(&x);
        ds.update(x);
    }
    let mean_over = |f: &dyn Fn(u64) -> u64| {
        exact
            .iter()
            .enumerate()
            .map(|(i, &t)| (f(i as u64) - t) as f64)
            .sum::<f64>()
            / exact.len() as f64
    };
    eprintln!(
        "accuracy: Count-Min {w}x{d}, zipf n={N}: mean overestimate sluice {:.2}, sluice conservative {:.2}, pdatastructs {:.2}, datasketches {:.2} (ε·N = {:.1})",
        mean_over(&|i| ours.estimate(&i.to_le_bytes())),
        mean_over(&|i| ours_cu.estimate(&i.to_le_bytes())),
        mean_over(&|i| theirs.query_point(&i)),
        mean_over(&|i| ds.estimate(i)),
        ours.error_bound()
    );
    let mut g = c.benchmark_group("count_min_add");
    g.throughput(Throughput::Elements(N));
    g.bench_function("sluice", |b| {
        b.iter(|| {
            let mut s = CountMin::with_storage(vec![0u64; w * d], w, d, 1, false).unwrap();
            stream.iter().for_each(|x| s.add(&x.to_le_bytes(), 1));
            black_box(s.total())
        })
    });
    g.bench_function("sluice_conservative", |b| {
        b.iter(|| {
            let mut s = CountMin::with_storage(vec![0u64; w * d], w, d, 1, true).unwrap();
            stream.iter().for_each(|x| s.add(&x.to_le_bytes(), 1));
            black_box(s.total())
        })
    });
    g.bench_function("pdatastructs", |b| {
        b.iter(|| {
            let mut s = CountMinSketch::<u64, u64>::with_params(w, d);
            stream.iter().for_each(|x| {
                s.add(x);
            });
            black_box(s.query_point(&1))
        })
    });
    g.bench_function("datasketches", |b| {
        b.iter(|| {
            let mut s =
                datasketches::countmin::CountMinSketch::<u64>::new(d as u8, w as u32).unwrap();
            stream.iter().for_each(|&x| s.update(x));
            black_box(s.total_weight())
        })
    });
    g.finish();
}

fn others(c: &mut Criterion) {
    let stream = zipf(4);
    let mut g = c.benchmark_group("sketch_update");
    g.throughput(Throughput::Elements(N));
    g.bench_function("bloom_insert_n10k_p1%", |b| {
        let words = BloomFilter::<()>::words_for(10_000, 0.01);
        b.iter(|| {
            let mut f = BloomFilter::with_storage(vec![0u64; words], 10_000, 1).unwrap();
            stream.iter().for_each(|x| f.insert(&x.to_le_bytes()));
            black_box(f.estimated_fpr())
        })
    });
    g.bench_function("reservoir_L_k100", |b| {
        b.iter(|| {
            let mut r = Reservoir::new(vec![0u64; 100], 1).unwrap();
            stream.iter().for_each(|&x| r.offer(x));
            black_box(r.seen())
        })
    });
    for k in [64usize, 256, 1024] {
        g.bench_function(format!("space_saving_k{k}"), |b| {
            let slots = SpaceSaving::<(), ()>::index_len(k);
            b.iter(|| {
                let mut s =
                    SpaceSaving::new(vec![Counter::default(); k], vec![0u32; slots]).unwrap();
                stream.iter().for_each(|&x| s.insert(x));
                black_box(s.total())
            })
        });
    }
    // DataSketches' frequent items keep up to 3/4 of their map.
    for map in [128usize, 512, 2048] {
        g.bench_function(format!("datasketches_frequent_items_map{map}"), |b| {
            b.iter(|| {
                let mut s =
                    datasketches::frequencies::FrequentItemsSketch::<i64>::new(map).unwrap();
                stream.iter().for_each(|&x| s.update(x as i64));
                black_box(s.total_weight())
            })
        });
    }
    g.bench_function("ddsketch_1%_2x2048", |b| {
        b.iter(|| {
            let mut s = DdSketch::with_storage(vec![0u64; 4096], 0.01).unwrap();
            stream.iter().for_each(|&x| {
                s.insert(x as f64 + 0.5);
            });
            black_box(s.quantile(0.99))
        })
    });
    g.finish();
}

criterion_group!(sketches, hll, count_min, others);
criterion_main!(sketches);
