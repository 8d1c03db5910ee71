//! Sketch accuracy against the theory over many seeds, merge equivalence,
//! and serialization (round trips; random and corrupted bytes never panic).

#![cfg(not(any(miri, loom)))]

use proptest::prelude::*;
use sluice_core::rng::SplitMix64;
use sluice_core::sketch::{
    BloomFilter, CountMin, Counter, DdSketch, HyperLogLog, Membership, Reservoir, SketchError,
    SpaceSaving, hll,
};

/// p = 12: 4,096 registers, as DataSketches' HLL_4 at lg_k 12 (2,088
/// bytes serialized).
const M: usize = 4096;
type Hll = HyperLogLog<[u8; hll::storage_bytes(M)]>;
/// The smallest: p = 8.
type Hll256 = HyperLogLog<[u8; hll::storage_bytes(256)]>;

/// Stream `seed`: `n` distinct splitmix64 items (8 bytes each).
fn hll_of(seed: u64, n: u64) -> Hll {
    let mut h = Hll::new();
    let mut rng = SplitMix64::new(seed);
    for _ in 0..n {
        h.insert(&rng.next_u64().to_le_bytes());
    }
    h
}

fn rms(xs: &[f64]) -> f64 {
    (xs.iter().map(|x| x * x).sum::<f64>() / xs.len() as f64).sqrt()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Nearly exact while sparse (up to 3m/32 = 384 items); HIP's noise from
/// there (0.86 % at 1,000, as DataSketches: see below), and its error,
/// 0.8326/√m = 1.30 %, at n = 1e6 over 200 seeds.
#[test]
fn hll_is_nearly_exact_when_small_and_hip_accurate_when_large() {
    assert_eq!(hll_of(0, 0).estimate(), 0.0);
    for (n, bound) in [(1u64, 0.0), (10, 1e-6), (384, 1e-4), (1_000, 0.01)] {
        let errors: Vec<f64> = (0..200)
            .map(|seed| hll_of(seed, n).estimate() / n as f64 - 1.0)
            .collect();
        eprintln!("HLL m={M} n={n}: rms {:.5}", rms(&errors));
        assert!(rms(&errors) <= bound, "n={n}: rms {}", rms(&errors));
    }
    let n = 1_000_000;
    let errors: Vec<f64> = (0..200)
        .map(|seed| hll_of(seed, n).estimate() / n as f64 - 1.0)
        .collect();
    let (r, b, theory) = (rms(&errors), mean(&errors), 0.8326 / (M as f64).sqrt());
    eprintln!("HLL m={M} n={n} 200 seeds: rms {r:.5} (theory {theory:.5}), bias {b:+.5}");
    assert!(r <= theory * 1.1, "rms {r} vs theory {theory}");
    assert!(b.abs() <= 3.0 * theory / (200f64).sqrt(), "bias {b}");
    assert!((hll_of(1, n).relative_error() - theory).abs() < 1e-4);
}

/// 16 sketches of 62,500 items each, merged: Ertl's estimator on the
/// registers, 1.04/√m = 1.62 %.
#[test]
fn hll_merged_sixteen_ways_is_unbiased_at_the_register_error() {
    let errors: Vec<f64> = (0..100)
        .map(|seed| {
            let mut union = Hll::new();
            for part in 0..16 {
                union.merge(&hll_of(seed * 16 + part, 62_500)).unwrap();
            }
            assert!(union.is_merged());
            union.estimate() / 1e6 - 1.0
        })
        .collect();
    let (r, b, theory) = (rms(&errors), mean(&errors), 1.04 / (M as f64).sqrt());
    eprintln!("HLL m={M} 16-way merge of 1e6: rms {r:.5} (theory {theory:.5}), bias {b:+.5}");
    assert!(r <= theory * 1.15, "rms {r} vs theory {theory}");
    assert!(b.abs() <= 3.0 * theory / 10.0, "bias {b}");
}

/// After a 16-way merge of 1e6 items, nothing that DataSketches offers for
/// distinct counts in at most 2.1 KB reaches 1.30 %: its HLL union gives
/// the registers' error (as Sluice's, above), and its CPC sketch, the most
/// accurate per byte (ICON after a union, 0.693/√k), either takes more
/// than 2.1 KB (lg_k 12) or errs more (lg_k 11). (What #14 asked: "≤ 1.30 %
/// after merging, where DataSketches' union gives 1.39 %".)
#[test]
fn no_datasketches_distinct_sketch_within_2_1_kb_reaches_1_30_percent_merged() {
    use datasketches::cpc::{CpcSketch, CpcUnion};
    for lg_k in [11u8, 12] {
        let (mut errors, mut bytes) = (Vec::new(), Vec::new());
        for seed in 0..50u64 {
            let mut union = CpcUnion::new(lg_k).unwrap();
            for part in 0..16 {
                let mut s = CpcSketch::new(lg_k).unwrap();
                let mut rng = SplitMix64::new(seed * 16 + part);
                for _ in 0..62_500 {
                    s.update(rng.next_u64());
                }
                union.update(&s).unwrap();
            }
            let merged = union.to_sketch();
            errors.push(merged.estimate() / 1e6 - 1.0);
            bytes.push(merged.serialize().len() as f64);
        }
        let (r, size) = (rms(&errors), mean(&bytes));
        eprintln!("CPC lg_k={lg_k} 16-way merge of 1e6, 50 seeds: rms {r:.5}, {size:.0} bytes");
        assert!(
            size > 2_100.0 || r > 0.0130,
            "lg_k {lg_k}: {size} bytes, rms {r}"
        );
    }
}

#[test]
fn hll_merge_has_the_registers_of_the_union_and_checks_sizes() {
    for n in [100u64, 30_000] {
        let (mut a, mut b, mut all) = (Hll::new(), Hll::new(), Hll::new());
        let mut rng = SplitMix64::new(n);
        for i in 0..n {
            let item = rng.next_u64().to_le_bytes();
            if i % 3 == 0 {
                a.insert(&item)
            } else {
                b.insert(&item)
            }
            all.insert(&item);
        }
        a.merge(&b).unwrap();
        let bytes = |h: &Hll| {
            let mut buf = vec![0; h.serialized_len()];
            let n = h.write_to(&mut buf).unwrap();
            buf.truncate(n);
            buf
        };
        if n == 100 {
            // Both sparse: the union of the coupons, still HIP-exact.
            assert_eq!(a.estimate(), all.estimate());
        } else {
            // The registers are the union's; only the estimator differs.
            let (mut x, mut y) = (bytes(&a), bytes(&all));
            assert_eq!(x[5] & 16, 16, "merged: out of order");
            (x[5], y[5]) = (0, 0);
            x[8..16].fill(0);
            y[8..16].fill(0);
            assert_eq!(x, y);
        }
    }
    // Merging into an empty sketch copies it, HIP and all.
    let big = hll_of(7, 50_000);
    let mut copy = Hll::new();
    copy.merge(&big).unwrap();
    assert!(!copy.is_merged());
    assert_eq!(copy.estimate(), big.estimate());
    // A larger sketch folds down; a smaller one cannot be merged in.
    let mut small = HyperLogLog::<[u8; hll::storage_bytes(1024)]>::new();
    small.merge(&big).unwrap();
    assert!((small.estimate() / 50_000.0 - 1.0).abs() < 0.15);
    assert!(matches!(
        big.clone().merge(&small),
        Err(SketchError::Incompatible(_))
    ));
}

/// A skewed stream: item i with weight ∝ 1/(i+1), 100,000 draws from 5,000.
fn zipf_stream(seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    let weights: Vec<f64> = (0..5_000).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let cdf: Vec<f64> = weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect();
    (0..100_000)
        .map(|_| {
            let u = rng.next_f64();
            cdf.partition_point(|&c| c < u).min(4_999) as u32
        })
        .collect()
}

#[test]
fn count_min_overestimates_within_epsilon_n_at_least_one_minus_delta_of_the_time() {
    let (eps, delta) = (0.002, 0.01);
    let (w, d) = (
        CountMin::<()>::width_for(eps),
        CountMin::<()>::depth_for(delta),
    );
    assert_eq!((w, d), (1360, 5));
    for seed in 0..5 {
        let stream = zipf_stream(seed);
        let mut exact = vec![0u64; 5_000];
        let mut plain = CountMin::with_storage(vec![0u64; w * d], w, d, seed, false).unwrap();
        let mut conservative = CountMin::with_storage(vec![0u64; w * d], w, d, seed, true).unwrap();
        for &x in &stream {
            exact[x as usize] += 1;
            plain.add(&x.to_le_bytes(), 1);
            conservative.add(&x.to_le_bytes(), 1);
        }
        let bound = plain.error_bound();
        assert_eq!(
            bound,
            eps * stream.len() as f64 * (std::f64::consts::E / eps / w as f64)
        );
        let mut over = 0;
        for (item, &truth) in exact.iter().enumerate() {
            let key = (item as u32).to_le_bytes();
            let (p, c) = (plain.estimate(&key), conservative.estimate(&key));
            assert!(p >= truth && c >= truth, "Count-Min never underestimates");
            assert!(c <= p, "conservative update is never worse");
            if (p - truth) as f64 > bound {
                over += 1;
            }
        }
        eprintln!("Count-Min seed {seed}: {over} of 5000 items over ε·N = {bound}");
        assert!(
            over as f64 <= delta * exact.len() as f64,
            "seed {seed}: {over} items over ε·N"
        );
    }
}

#[test]
fn count_min_rows_are_independent_so_a_heavy_item_cannot_shadow_a_query_in_every_row() {
    // One heavy item (about 99 % of N) among light ones. A query exceeds
    // εN only if it shares a counter with the heavy item in every one of
    // the 8 rows: with independent rows that has probability 64^-8 per
    // query. Rows derived from one hash by double hashing collide in every
    // row far more often (such a query was found at the first seed).
    let (w, d) = (64, 8);
    for seed in 0..3u64 {
        let mut cm = CountMin::with_storage(vec![0u64; w * d], w, d, seed, false).unwrap();
        cm.add(b"heavy", 1_000_000);
        for i in 0..10_000u64 {
            cm.add(&i.to_le_bytes(), 1);
        }
        let bound = cm.error_bound();
        let over = (1_000_000u64..1_200_000)
            .filter(|i| cm.estimate(&i.to_le_bytes()) as f64 > bound)
            .count();
        assert_eq!(over, 0, "seed {seed}: {over} queries over εN = {bound}");
    }
}

#[test]
fn memory_bytes_counts_inline_storage_once_and_outside_storage_once() {
    use core::mem::size_of;
    // Inline arrays are part of the struct: its size is the memory.
    let h = Hll::new();
    assert_eq!(h.memory_bytes(), size_of::<Hll>());
    let cm = CountMin::with_storage([0u64; 64], 16, 4, 1, false).unwrap();
    assert_eq!(cm.memory_bytes(), size_of::<CountMin<[u64; 64]>>());
    let bloom = BloomFilter::with_storage([0u64; 32], 100, 1).unwrap();
    assert_eq!(bloom.memory_bytes(), size_of::<BloomFilter<[u64; 32]>>());
    let dd = DdSketch::with_storage([0u64; 256], 0.01).unwrap();
    assert_eq!(dd.memory_bytes(), size_of::<DdSketch<[u64; 256]>>());
    // Storage elsewhere (a Vec) adds its elements to the struct.
    let cm = CountMin::with_storage(vec![0u64; 64], 16, 4, 1, false).unwrap();
    assert_eq!(cm.memory_bytes(), size_of::<CountMin<Vec<u64>>>() + 64 * 8);
    let h = HyperLogLog::with_storage(vec![0u8; hll::storage_bytes(M)]).unwrap();
    assert_eq!(
        h.memory_bytes(),
        size_of::<HyperLogLog<Vec<u8>>>() + hll::storage_bytes(M)
    );
}

#[test]
fn count_min_says_what_storage_its_bytes_need() {
    let (w, d) = (
        CountMin::<()>::width_for(0.01),
        CountMin::<()>::depth_for(0.01),
    );
    let mut cm = CountMin::with_storage(vec![0u64; w * d], w, d, 7, false).unwrap();
    cm.add(b"a", 3);
    let bytes = bytes_of(cm.serialized_len(), |b| cm.write_to(b));
    assert_eq!(CountMin::<Vec<u64>>::storage_len(&bytes), Ok(w * d));
    let back = CountMin::read_from(&bytes, vec![0u64; w * d]).unwrap();
    assert_eq!(back.estimate(b"a"), 3);
    // Damaged bytes are refused before anything is allocated for them.
    let mut damaged = bytes.clone();
    damaged[12] ^= 0xff;
    assert!(CountMin::<Vec<u64>>::storage_len(&damaged).is_err());
}

#[test]
fn count_min_merge_equals_the_union() {
    let (w, d) = (272, 5);
    let mut a = CountMin::with_storage(vec![0u64; w * d], w, d, 1, false).unwrap();
    let mut b = CountMin::with_storage(vec![0u64; w * d], w, d, 1, false).unwrap();
    let mut all = CountMin::with_storage(vec![0u64; w * d], w, d, 1, false).unwrap();
    for (i, x) in zipf_stream(9).into_iter().enumerate() {
        let key = x.to_le_bytes();
        if i % 2 == 0 {
            a.add(&key, 1)
        } else {
            b.add(&key, 1)
        }
        all.add(&key, 1);
    }
    a.merge(&b).unwrap();
    for x in 0..5_000u32 {
        assert_eq!(a.estimate(&x.to_le_bytes()), all.estimate(&x.to_le_bytes()));
    }
    let narrow = CountMin::with_storage(vec![0u64; 100 * d], 100, d, 1, false).unwrap();
    assert!(a.merge(&narrow).is_err());
}

#[test]
fn bloom_false_positive_rate_is_within_20_percent_of_target() {
    let (n, p) = (10_000u64, 0.01);
    let words = BloomFilter::<()>::words_for(n, p);
    let mut measured = Vec::new();
    for seed in 0..5u64 {
        let mut f = BloomFilter::with_storage(vec![0u64; words], n, seed).unwrap();
        for i in 0..n {
            f.insert(&i.to_le_bytes());
        }
        for i in 0..n {
            assert_eq!(
                f.contains(&i.to_le_bytes()),
                Membership::Maybe,
                "no false negatives"
            );
        }
        let trials = 200_000u64;
        let fp = (n..n + trials)
            .filter(|i| f.contains(&i.to_le_bytes()) == Membership::Maybe)
            .count();
        let rate = fp as f64 / trials as f64;
        // The estimate from the bits set agrees with what was measured.
        assert!(
            (f.estimated_fpr() - rate).abs() < 0.2 * p,
            "estimated {} vs {rate}",
            f.estimated_fpr()
        );
        measured.push(rate);
    }
    let rate = mean(&measured);
    eprintln!("Bloom n={n} p={p}: measured false-positive rate {rate:.5} over {measured:?}");
    assert!(
        (rate - p).abs() <= 0.2 * p,
        "measured false-positive rate {rate}"
    );
}

/// Pearson's χ² of inclusion counts against a uniform expectation.
fn chi_square(counts: &[u64], expected: f64) -> f64 {
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// χ² critical value for 99 degrees of freedom at p = 0.001.
const CHI2_99_P001: f64 = 148.23;

#[test]
fn reservoir_samples_are_uniform() {
    let (n, k, trials) = (100u64, 10usize, 20_000u64);
    for algorithm in ["L", "R", "merged"] {
        let mut counts = vec![0u64; n as usize];
        let mut rng = SplitMix64::new(99);
        for _ in 0..trials {
            let sample: Vec<u64> = match algorithm {
                "L" => {
                    let mut r = Reservoir::new(vec![0u64; k], rng.next_u64()).unwrap();
                    (0..n).for_each(|i| r.offer(i));
                    r.sample().to_vec()
                }
                "R" => {
                    let mut r = Reservoir::algorithm_r(vec![0u64; k], rng.next_u64()).unwrap();
                    (0..n).for_each(|i| r.offer(i));
                    r.sample().to_vec()
                }
                _ => {
                    let mut a = Reservoir::new(vec![0u64; k], rng.next_u64()).unwrap();
                    let mut b = Reservoir::new(vec![0u64; k], rng.next_u64()).unwrap();
                    // Unequal halves: 70 and 30 items.
                    (0..70).for_each(|i| a.offer(i));
                    (70..n).for_each(|i| b.offer(i));
                    a.merge(&b).unwrap();
                    assert_eq!(a.seen(), n);
                    a.sample().to_vec()
                }
            };
            assert_eq!(sample.len(), k);
            for x in sample {
                counts[x as usize] += 1;
            }
        }
        let chi2 = chi_square(&counts, (trials * k as u64) as f64 / n as f64);
        eprintln!(
            "reservoir {algorithm}: χ² = {chi2:.1} (99 dof, p=0.001 critical {CHI2_99_P001})"
        );
        assert!(chi2 < CHI2_99_P001, "algorithm {algorithm}: χ² = {chi2}");
    }
}

#[test]
fn merged_reservoirs_of_two_shards_sample_pairs_independently() {
    // Two shards, each its own reservoir with its own seed, 20 items each;
    // the merge is a uniform 4-subset of the 40 items, so a given pair
    // (shard A's 4th item, shard B's 4th) is in it with probability
    // 4·3/(40·39). Shards seeded alike sample the same positions, so the
    // pair comes up far more often; merging requires no equal seeds.
    let (k, trials) = (4usize, 20_000u64);
    let mut rng = SplitMix64::new(7);
    let mut together = 0u64;
    for _ in 0..trials {
        let mut a = Reservoir::new(vec![0u64; k], rng.next_u64()).unwrap();
        let mut b = Reservoir::new(vec![0u64; k], rng.next_u64()).unwrap();
        (0..20).for_each(|i| a.offer(i));
        (100..120).for_each(|i| b.offer(i));
        a.merge(&b).unwrap();
        let sample = a.sample();
        together += u64::from(sample.contains(&3) && sample.contains(&103));
    }
    let p = 12.0 / 1560.0;
    let (mean, sd) = (trials as f64 * p, (trials as f64 * p * (1.0 - p)).sqrt());
    assert!(
        (together as f64 - mean).abs() < 4.0 * sd,
        "pair sampled together {together} times, expected {mean:.0} ± {sd:.0}"
    );
}

#[test]
fn space_saving_keeps_every_item_above_n_over_k_with_bounded_error() {
    let k = 50;
    let stream = zipf_stream(5);
    let n = stream.len() as u64;
    let mut exact = vec![0u64; 5_000];
    let mut whole = SpaceSaving::new(
        vec![Counter::default(); k],
        vec![0u32; SpaceSaving::<(), ()>::index_len(k)],
    )
    .unwrap();
    let mut left = SpaceSaving::new(
        vec![Counter::default(); k],
        vec![0u32; SpaceSaving::<(), ()>::index_len(k)],
    )
    .unwrap();
    let mut right = SpaceSaving::new(
        vec![Counter::default(); k],
        vec![0u32; SpaceSaving::<(), ()>::index_len(k)],
    )
    .unwrap();
    for (i, &x) in stream.iter().enumerate() {
        exact[x as usize] += 1;
        whole.insert(u64::from(x));
        if i < stream.len() / 3 {
            left.insert(u64::from(x))
        } else {
            right.insert(u64::from(x))
        }
    }
    left.merge(&right).unwrap();
    for summary in [&whole, &left] {
        assert_eq!(summary.total(), n);
        let bound = n / k as u64;
        for (item, &truth) in exact.iter().enumerate() {
            match summary.get(item as u64) {
                Some(c) => {
                    assert!(
                        c.count - c.error <= truth && truth <= c.count,
                        "{c:?} vs {truth}"
                    );
                    assert!(c.error <= bound);
                }
                None => {
                    assert!(truth <= bound, "item {item} ({truth} > N/k) missing");
                    assert!(truth <= summary.untracked_bound());
                }
            }
        }
    }
    let mut top = [Counter::default(); 3];
    assert_eq!(whole.top_into(&mut top), 3);
    assert_eq!(top.map(|c| c.key), [0, 1, 2]);
}

fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
}

#[test]
fn ddsketch_meets_its_relative_error_and_merges_exactly() {
    let alpha = 0.01;
    let mut rng = SplitMix64::new(11);
    // Log-uniform magnitudes over 12 decades, both signs, and some zeros.
    let values: Vec<f64> = (0..20_000)
        .map(|i| {
            if i % 50 == 0 {
                return 0.0;
            }
            let magnitude = 10f64.powf(rng.next_f64() * 12.0 - 6.0);
            if rng.next_u64().is_multiple_of(3) {
                -magnitude
            } else {
                magnitude
            }
        })
        .collect();
    let mut whole = DdSketch::with_storage(vec![0u64; 2 * 2048], alpha).unwrap();
    let mut a = DdSketch::with_storage(vec![0u64; 2 * 2048], alpha).unwrap();
    let mut b = DdSketch::with_storage(vec![0u64; 2 * 2048], alpha).unwrap();
    for (i, &v) in values.iter().enumerate() {
        whole.insert(v);
        if i % 2 == 0 {
            a.insert(v)
        } else {
            b.insert(v)
        };
    }
    a.merge(&b).unwrap();
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(whole.collapsed(), 0);
    for q in [
        0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0,
    ] {
        let exact = exact_quantile(&sorted, q);
        let got = whole.quantile(q).unwrap();
        assert!(
            (got - exact).abs() <= alpha * exact.abs() + 1e-12,
            "q={q}: {got} vs {exact}"
        );
        assert_eq!(
            a.quantile(q),
            Some(got),
            "merged sketch answers like one fed the union"
        );
    }
    assert_eq!(whole.quantile(1.5), None);
}

#[test]
fn ddsketch_counts_each_collapsed_value_once() {
    // 16 buckets per sign; 200 rising values, each ~2.4 buckets above the
    // last: every new one collapses the lowest buckets, and the values
    // collapsed before move up again. Each counts once: at most the 16
    // buckets of the window hold values that kept their accuracy.
    let mut s = DdSketch::with_storage([0u64; 32], 0.01).unwrap();
    let n = 200;
    for k in 0..n {
        s.insert(1.05f64.powi(k));
    }
    assert!(s.collapsed() <= n as u64, "{} of {n}", s.collapsed());
    assert!(s.collapsed() >= n as u64 - 16, "{} of {n}", s.collapsed());
    // The same through a merge, and through the serialized form.
    let mut a = DdSketch::with_storage([0u64; 32], 0.01).unwrap();
    let mut b = DdSketch::with_storage([0u64; 32], 0.01).unwrap();
    for k in 0..n {
        if k % 2 == 0 { &mut a } else { &mut b }.insert(1.05f64.powi(k));
    }
    a.merge(&b).unwrap();
    assert!(
        a.collapsed() <= n as u64,
        "merged: {} of {n}",
        a.collapsed()
    );
    a.insert(1.05f64.powi(n + 5));
    let bytes = bytes_of(a.serialized_len(), |buf| a.write_to(buf));
    let mut back = DdSketch::read_from(&bytes, [0u64; 32]).unwrap();
    assert_eq!(back.collapsed(), a.collapsed());
    back.insert(1.05f64.powi(n + 10));
    assert!(
        back.collapsed() <= n as u64 + 2,
        "read back: {}",
        back.collapsed()
    );
}

#[test]
fn ddsketch_never_answers_a_collapsed_quantile_as_if_it_were_accurate() {
    // 160 buckets per sign at 1 % cover a factor of about 24: heavy tails
    // (Pareto, shape 1) and wide lognormals collapse most of their values.
    // Every answer is either within α of the exact quantile or flagged as
    // collapsed (then the true value is at most the answer).
    let alpha = 0.01;
    for (name, heavy) in [("pareto", true), ("lognormal", false)] {
        let (mut flagged, mut accurate) = (0, 0);
        for seed in 0..20u64 {
            let mut rng = SplitMix64::new(seed);
            let mut values: Vec<f64> = (0..20_000)
                .map(|_| {
                    let u = rng.next_f64().max(1e-300);
                    if heavy {
                        1.0 / u
                    } else {
                        let u2 = rng.next_f64();
                        let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                        (2.0 * z).exp()
                    }
                })
                .collect();
            let mut s = DdSketch::with_storage([0u64; 320], alpha).unwrap();
            values.iter().for_each(|&v| {
                s.insert(v);
            });
            values.sort_by(f64::total_cmp);
            let grid = (1..100).map(|i| i as f64 / 100.0);
            for q in grid.chain([0.999, 0.9995, 0.9999]) {
                let exact = exact_quantile(&values, q);
                let answer = s.quantile_detail(q).unwrap();
                if answer.collapsed {
                    flagged += 1;
                    assert!(answer.value >= exact * (1.0 - alpha), "{name} q={q}");
                } else {
                    accurate += 1;
                    assert!(
                        (answer.value - exact).abs() <= alpha * exact + 1e-9,
                        "{name} seed {seed} q={q}: {} vs {exact}, not flagged",
                        answer.value
                    );
                }
            }
        }
        assert!(
            flagged > 0 && accurate > 0,
            "{name}: {flagged} flagged, {accurate} accurate"
        );
    }
}

#[test]
fn ddsketch_sized_to_cover_a_range_keeps_every_quantile_in_it_within_alpha() {
    // The same wide lognormal (values over about six decades) in a sketch
    // sized by `buckets_to_cover` for the range its values fall in: no
    // quantile collapses, and each is within α.
    for alpha in [0.01, 0.02, 0.05] {
        let half = DdSketch::<Vec<u64>>::buckets_to_cover(alpha, 1e-3, 1e3).unwrap();
        for seed in 0..20u64 {
            let mut rng = SplitMix64::new(seed);
            let mut values: Vec<f64> = (0..20_000)
                .map(|_| {
                    let (u, u2) = (rng.next_f64().max(1e-300), rng.next_f64());
                    let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (2.0 * z).exp().clamp(1e-3, 1e3)
                })
                .collect();
            let mut s = DdSketch::with_storage(vec![0u64; 2 * half], alpha).unwrap();
            values.iter().for_each(|&v| {
                s.insert(v);
            });
            values.sort_by(f64::total_cmp);
            assert_eq!(s.collapsed(), 0, "alpha {alpha} seed {seed}");
            for q in (0..=1000).map(|i| i as f64 / 1000.0) {
                let exact = exact_quantile(&values, q);
                let answer = s.quantile_detail(q).unwrap();
                assert!(
                    !answer.collapsed && (answer.value - exact).abs() <= alpha * exact + 1e-12,
                    "alpha {alpha} seed {seed} q={q}: {answer:?} vs {exact}"
                );
            }
            // Its serialized form says what storage it needs.
            let bytes = bytes_of(s.serialized_len(), |b| s.write_to(b));
            assert_eq!(DdSketch::<Vec<u64>>::storage_len(&bytes).unwrap(), 2 * half);
        }
        // One bucket fewer cannot hold both ends.
        let mut short = DdSketch::with_storage(vec![0u64; 2 * (half - 1)], alpha).unwrap();
        short.insert(1e-3);
        short.insert(1e3);
        assert_eq!(
            short.collapsed(),
            1,
            "alpha {alpha}: {half} buckets are needed"
        );
    }
    assert_eq!(DdSketch::<Vec<u64>>::buckets_to_cover(0.01, 2.0, 1.0), None);
    assert_eq!(DdSketch::<Vec<u64>>::buckets_to_cover(0.01, 0.0, 1.0), None);
    assert_eq!(DdSketch::<Vec<u64>>::buckets_to_cover(1.0, 1.0, 2.0), None);
    assert_eq!(
        DdSketch::<Vec<u64>>::buckets_to_cover(0.01, 5.0, 5.0),
        Some(1)
    );
}

#[test]
fn ddsketch_collapses_the_lowest_buckets_when_out_of_room() {
    // 16 buckets per sign at 1 % cover a factor of about 1.4: values over
    // 1..1e6 must collapse the low ones, and the high quantiles stay exact.
    let mut s = DdSketch::with_storage([0u64; 32], 0.01).unwrap();
    let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 100.0).collect();
    for &v in &values {
        s.insert(v);
    }
    assert!(s.collapsed() > 0);
    let p999 = s.quantile(0.999).unwrap();
    let exact = exact_quantile(&values, 0.999);
    assert!((p999 - exact).abs() <= 0.01 * exact);
    assert_eq!(s.min(), Some(100.0));
    assert_eq!(s.quantile(0.0), Some(100.0));
}

/// Serializes with `write`, checks the length, and returns the bytes.
fn bytes_of(len: usize, mut write: impl FnMut(&mut [u8]) -> Result<usize, SketchError>) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    assert_eq!(
        write(&mut buf[..len - 1]).unwrap_err(),
        SketchError::BufferTooSmall { needed: len }
    );
    assert_eq!(write(&mut buf).unwrap(), len);
    buf
}

/// One serialized sketch of every family.
fn samples() -> Vec<Vec<u8>> {
    let mut hll = Hll256::new();
    let mut cm = CountMin::with_storage(vec![0u64; 20], 10, 2, 5, true).unwrap();
    let mut bloom = BloomFilter::with_storage(vec![0u64; 4], 20, 5).unwrap();
    let mut res = Reservoir::new(vec![0.0f64; 8], 5).unwrap();
    let mut top = SpaceSaving::new(
        vec![Counter::default(); 4],
        vec![0u32; SpaceSaving::<(), ()>::index_len(4)],
    )
    .unwrap();
    let mut dd = DdSketch::with_storage(vec![0u64; 16], 0.02).unwrap();
    for i in 0..100u32 {
        hll.insert(&i.to_le_bytes());
        cm.add(&(i % 7).to_le_bytes(), 2);
        bloom.insert(&i.to_le_bytes());
        res.offer(f64::from(i) * 0.5);
        top.insert(u64::from(i % 9));
        dd.insert(f64::from(i) - 30.0);
    }
    vec![
        bytes_of(hll.serialized_len(), |b| hll.write_to(b)),
        bytes_of(cm.serialized_len(), |b| cm.write_to(b)),
        bytes_of(bloom.serialized_len(), |b| bloom.write_to(b)),
        bytes_of(res.serialized_len(), |b| res.write_to(b)),
        bytes_of(top.serialized_len(), |b| top.write_to(b)),
        bytes_of(dd.serialized_len(), |b| dd.write_to(b)),
    ]
}

/// Reads `bytes` as every family; returns which ones accepted them.
fn read_all(bytes: &[u8]) -> [bool; 6] {
    [
        Hll256::read_from(bytes, [0u8; hll::storage_bytes(256)]).is_ok(),
        CountMin::read_from(bytes, vec![0u64; 20]).is_ok(),
        BloomFilter::read_from(bytes, vec![0u64; 4]).is_ok(),
        Reservoir::<f64, _>::read_from(bytes, vec![0.0f64; 8]).is_ok(),
        SpaceSaving::read_from(
            bytes,
            vec![Counter::default(); 4],
            vec![0u32; SpaceSaving::<(), ()>::index_len(4)],
        )
        .is_ok(),
        DdSketch::read_from(bytes, vec![0u64; 16]).is_ok(),
    ]
}

#[test]
fn serialization_round_trips_and_rejects_other_families() {
    for (family, bytes) in samples().iter().enumerate() {
        let mut expected = [false; 6];
        expected[family] = true;
        assert_eq!(read_all(bytes), expected, "family {family}");
    }
    for n in [0u32, 1, 7, 8, 24, 25, 100, 100_000] {
        let mut hll = Hll256::new();
        for i in 0..n {
            hll.insert(&i.to_le_bytes());
        }
        let bytes = bytes_of(hll.serialized_len(), |b| hll.write_to(b));
        let back = Hll256::read_from(&bytes, [0u8; hll::storage_bytes(256)]).unwrap();
        assert_eq!(back.estimate(), hll.estimate(), "n={n}");
        assert_eq!(back.is_sparse(), hll.is_sparse(), "n={n}");
    }
    let bytes = &samples()[0];
    assert_eq!(
        HyperLogLog::read_from(bytes, [0u8; 128]).err(),
        Some(SketchError::StorageMismatch {
            needed: hll::storage_bytes(256),
            got: 128
        })
    );
    let mut dd = DdSketch::with_storage(vec![0u64; 64], 0.01).unwrap();
    for v in [-5.0, 0.0, 1.0, 2.0, 1e6] {
        dd.insert(v);
    }
    let bytes = bytes_of(dd.serialized_len(), |b| dd.write_to(b));
    let back = DdSketch::read_from(&bytes, vec![0u64; 64]).unwrap();
    for q in [0.0, 0.3, 0.5, 0.9, 1.0] {
        assert_eq!(back.quantile(q), dd.quantile(q));
    }
    let mut top = SpaceSaving::new(
        vec![Counter::default(); 4],
        vec![0u32; SpaceSaving::<(), ()>::index_len(4)],
    )
    .unwrap();
    top.add(7, 3);
    let bytes = bytes_of(top.serialized_len(), |b| top.write_to(b));
    assert_eq!(
        SpaceSaving::read_from(
            &bytes,
            vec![Counter::default(); 4],
            vec![0u32; SpaceSaving::<(), ()>::index_len(4)]
        )
        .unwrap()
        .get(7),
        top.get(7)
    );
    assert_eq!(read_all(b"not a sketch at all"), [false; 6]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The stream-summary against the stream itself: every tracked key is
    /// found, no key twice, the guarantees hold, also after merges and
    /// evictions in a small index where probes collide.
    #[test]
    fn space_saving_stream_summary_keeps_the_guarantees(
        k in 1usize..12,
        ops in prop::collection::vec((0u64..40, 1u64..5, any::<bool>()), 1..400),
    ) {
        let new = || SpaceSaving::new(vec![Counter::default(); k], vec![0u32; SpaceSaving::<(), ()>::index_len(k)]).unwrap();
        let (mut a, mut b) = (new(), new());
        let mut truth = std::collections::HashMap::<u64, u64>::new();
        for (i, &(key, count, other)) in ops.iter().enumerate() {
            if other { b.add(key, count) } else { a.add(key, count) }
            *truth.entry(key).or_default() += count;
            prop_assert_eq!(a.check_invariants(), Ok(()));
            prop_assert_eq!(b.check_invariants(), Ok(()));
            if i % 97 == 96 {
                a.merge(&b).unwrap();
                prop_assert_eq!(a.check_invariants(), Ok(()));
                b = new();
            }
            if i % 61 == 60 {
                // Read back from its bytes: the same counters, in order.
                let bytes = bytes_of(a.serialized_len(), |buf| a.write_to(buf));
                let back = SpaceSaving::read_from(&bytes, vec![Counter::default(); k], vec![0u32; SpaceSaving::<(), ()>::index_len(k)]).unwrap();
                prop_assert_eq!(back.check_invariants(), Ok(()));
                let sorted = |s: &[Counter]| { let mut v = s.to_vec(); v.sort_by_key(|c| (c.count, c.key)); v };
                prop_assert_eq!(sorted(back.counters()), sorted(a.counters()));
            }
        }
        a.merge(&b).unwrap();
        prop_assert_eq!(a.check_invariants(), Ok(()));
        // The top, largest count first, equal counts by larger key.
        let mut expected = a.counters().to_vec();
        expected.sort_by_key(|c| std::cmp::Reverse((c.count, c.key)));
        for n in [1, k / 2, k] {
            let mut out = vec![Counter::default(); n];
            let got = a.top_into(&mut out);
            prop_assert_eq!(got, n.min(expected.len()));
            prop_assert_eq!(&out[..got], &expected[..got]);
        }
        let n: u64 = truth.values().sum();
        prop_assert_eq!(a.total(), n);
        let mut keys: Vec<u64> = a.counters().iter().map(|c| c.key).collect();
        keys.sort_unstable();
        keys.dedup();
        prop_assert_eq!(keys.len(), a.counters().len());
        for c in a.counters() {
            prop_assert_eq!(a.get(c.key), Some(*c));
        }
        for (&key, &t) in &truth {
            match a.get(key) {
                Some(c) => prop_assert!(c.count - c.error <= t && t <= c.count, "{:?} vs {}", c, t),
                None => prop_assert!(t <= a.untracked_bound(), "{} untracked above the bound", key),
            }
        }
    }


    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        prop_assert_eq!(read_all(&bytes), [false; 6]);
    }

    #[test]
    fn corrupted_sketches_are_rejected(family in 0usize..6, flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4), cut in any::<prop::sample::Index>()) {
        let original = samples().swap_remove(family);
        let mut bytes = original.clone();
        for (at, bit) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        // Bit flips (unless they cancel out) are caught by the checksum or
        // earlier checks. The HyperLogLog's DataSketches format has no
        // checksum: a flipped register is another valid sketch, but a
        // flip never panics and never passes for another family.
        if bytes != original {
            let read = read_all(&bytes);
            if family == 0 {
                prop_assert!(read[1..].iter().all(|r| !r));
            } else {
                prop_assert_eq!(read, [false; 6]);
            }
        }
        // So is truncation.
        let truncated = &bytes[..cut.index(bytes.len())];
        prop_assert_eq!(read_all(truncated), [false; 6]);
    }
}

/// An item as DataSketches hashes it: its bytes, nothing else (the
/// `datasketches` crate feeds `Hash` output to MurmurHash3; `[u8]`'s own
/// `Hash` would add a length prefix that the Java and C++ libraries do not).
struct Raw<'a>(&'a [u8]);

impl std::hash::Hash for Raw<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

/// Stream `seed` into Sluice's sketch and DataSketches' HLL_4 at lg_k 12.
fn both_of(seed: u64, n: u64) -> (Hll, datasketches::hll::HllSketch) {
    let mut ours = Hll::new();
    let mut theirs =
        datasketches::hll::HllSketch::new(12, datasketches::hll::HllType::Hll4).unwrap();
    let mut rng = SplitMix64::new(seed);
    for _ in 0..n {
        let item = rng.next_u64().to_le_bytes();
        ours.insert(&item);
        theirs.update(Raw(&item));
    }
    (ours, theirs)
}

fn serialized(h: &Hll) -> Vec<u8> {
    let mut buf = vec![0; h.serialized_len()];
    let n = h.write_to(&mut buf).unwrap();
    assert_eq!(n, buf.len());
    buf
}

/// The same item gives the same coupon, the same state and the same
/// estimate as DataSketches; each reads what the other writes, in every
/// mode; and their sketches merge.
#[test]
fn hll_is_datasketches_hll_4_byte_for_byte() {
    for n in [0u64, 1, 7, 8, 100, 384, 385, 1_000, 20_000, 300_000] {
        let (ours, theirs) = both_of(n, n);
        let relative = |a: f64, b: f64| {
            if b == 0.0 {
                a.abs()
            } else {
                (a / b - 1.0).abs()
            }
        };
        assert!(
            relative(ours.estimate(), theirs.estimate()) < 1e-12,
            "n={n}: {} vs {}",
            ours.estimate(),
            theirs.estimate()
        );
        let bytes = serialized(&ours);
        let their_bytes = theirs.serialize();
        assert_eq!(bytes.len(), their_bytes.len(), "n={n}");
        // Coupons or exceptions from `at` on, in order.
        let sorted = |b: &[u8], at: usize| {
            let mut c: Vec<&[u8]> = b[at..].chunks(4).collect();
            c.sort();
            c.concat()
        };
        if ours.is_sparse() {
            // Coupons in table order: the same set.
            let at = if n < 8 { 8 } else { 12 };
            assert_eq!(bytes[..at], their_bytes[..at], "n={n}");
            assert_eq!(sorted(&bytes, at), sorted(&their_bytes, at), "n={n}");
        } else {
            // The header (but the HIP and kxq sums, equal to rounding),
            // the registers, and the exceptions (in hash-table order
            // there).
            assert_eq!(bytes[..8], their_bytes[..8], "n={n}");
            let at = 40 + M / 2;
            assert_eq!(bytes[32..at], their_bytes[32..at], "n={n}");
            assert_eq!(sorted(&bytes, at), sorted(&their_bytes, at), "n={n}");
        }
        // DataSketches reads ours; we read theirs.
        let read = datasketches::hll::HllSketch::deserialize(&bytes).unwrap();
        assert!(relative(read.estimate(), ours.estimate()) < 1e-12, "n={n}");
        let back = Hll::read_from(&their_bytes, [0; hll::storage_bytes(M)]).unwrap();
        assert!(
            relative(back.estimate(), theirs.estimate()) < 1e-12,
            "n={n}"
        );
    }
    // HLL_6 and HLL_8 too.
    for kind in [
        datasketches::hll::HllType::Hll6,
        datasketches::hll::HllType::Hll8,
    ] {
        let mut theirs = datasketches::hll::HllSketch::new(12, kind).unwrap();
        let mut ours = Hll::new();
        for i in 0..50_000u32 {
            theirs.update(Raw(&i.to_le_bytes()));
            ours.insert(&i.to_le_bytes());
        }
        let back = Hll::read_from(&theirs.serialize(), [0; hll::storage_bytes(M)]).unwrap();
        let (x, y) = (serialized(&back), serialized(&ours));
        assert_eq!(x[32..40 + M / 2], y[32..40 + M / 2]);
    }
    // A DataSketches union of a Sluice sketch and a DataSketches sketch over
    // overlapping streams estimates their union.
    let mut a = Hll::new();
    let mut b = datasketches::hll::HllSketch::new(12, datasketches::hll::HllType::Hll4).unwrap();
    for i in 0..60_000u32 {
        a.insert(&i.to_le_bytes());
        b.update(Raw(&(i + 30_000).to_le_bytes()));
    }
    let mut union = datasketches::hll::HllUnion::new(12).unwrap();
    union.update(&datasketches::hll::HllSketch::deserialize(&serialized(&a)).unwrap());
    union.update(&b);
    assert!((union.estimate() / 90_000.0 - 1.0).abs() < 0.05);
    let mut ours = Hll::read_from(&b.serialize(), [0; hll::storage_bytes(M)]).unwrap();
    ours.merge(&a).unwrap();
    assert!((ours.estimate() / 90_000.0 - 1.0).abs() < 0.05);
}

/// Error over 200 seeds at equal bytes, against DataSketches' HLL_4 on the
/// same streams: unmerged (HIP both) and merged 16 ways (Ertl's estimator
/// here, the union's composite estimator there).
#[test]
fn hll_error_against_datasketches_on_the_same_streams() {
    let n = 1_000_000u64;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for seed in 0..200 {
        let (a, b) = both_of(seed, n);
        ours.push(a.estimate() / n as f64 - 1.0);
        theirs.push(b.estimate() / n as f64 - 1.0);
    }
    eprintln!(
        "n=1e6, 200 seeds: Sluice rms {:.5}, DataSketches HLL_4 rms {:.5}",
        rms(&ours),
        rms(&theirs)
    );
    assert!(rms(&ours) <= rms(&theirs) * 1.000_001);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for seed in 0..100 {
        let mut union = Hll::new();
        let mut their_union = datasketches::hll::HllUnion::new(12).unwrap();
        for part in 0..16 {
            let (a, b) = both_of(seed * 16 + part, n / 16);
            union.merge(&a).unwrap();
            their_union.update(&b);
        }
        ours.push(union.estimate() / n as f64 - 1.0);
        theirs.push(their_union.estimate() / n as f64 - 1.0);
    }
    eprintln!(
        "n=1e6 in 16 parts, 100 seeds: Sluice merged rms {:.5}, DataSketches union rms {:.5}",
        rms(&ours),
        rms(&theirs)
    );
    assert!(rms(&ours) <= rms(&theirs) * 1.05);
}

/// At equal k (DataSketches' frequent items keep up to 3/4 of their map:
/// 192 items in a map of 256, and purge to about half when full), on the
/// same Zipf streams: Space-Saving takes fewer bytes per item it holds
/// (about 10 against 16), and on average over the streams no more bytes,
/// though it always holds its k (DataSketches, just after a purge, holds
/// half as many and takes fewer bytes, with a looser error bound).
#[test]
fn space_saving_serializes_smaller_than_datasketches_frequent_items_at_equal_k() {
    use datasketches::frequencies::FrequentItemsSketch;
    let k = 192;
    let (mut our_total, mut their_total) = (0, 0);
    for seed in 0..5 {
        let stream = zipf_stream(seed);
        let mut ours = SpaceSaving::new(
            vec![Counter::default(); k],
            vec![0u32; SpaceSaving::<(), ()>::index_len(k)],
        )
        .unwrap();
        let mut theirs = FrequentItemsSketch::<i64>::new(256).unwrap();
        for &x in &stream {
            ours.insert(u64::from(x));
            theirs.update(i64::from(x));
        }
        let our_bytes = ours.serialized_len();
        let their_bytes = theirs.serialize().len();
        eprintln!(
            "seed {seed}: Space-Saving k={k}: {our_bytes} bytes, {} counters, error bound {:.0}; DataSketches frequent items, map 256: {their_bytes} bytes, {} items, maximum error {}",
            ours.counters().len(),
            ours.error_bound(),
            theirs.num_active_items(),
            theirs.maximum_error()
        );
        let per_ours = our_bytes as f64 / ours.counters().len() as f64;
        let per_theirs = their_bytes as f64 / theirs.num_active_items() as f64;
        assert!(
            per_ours <= 0.7 * per_theirs,
            "{per_ours} vs {per_theirs} bytes an item"
        );
        (our_total, their_total) = (our_total + our_bytes, their_total + their_bytes);
        // And it reads back.
        let mut buf = vec![0u8; our_bytes];
        ours.write_to(&mut buf).unwrap();
        let back = SpaceSaving::read_from(
            &buf,
            vec![Counter::default(); k],
            vec![0u32; SpaceSaving::<(), ()>::index_len(k)],
        )
        .unwrap();
        for c in ours.counters() {
            assert_eq!(back.get(c.key), Some(*c));
        }
        assert_eq!(back.total(), ours.total());
    }
    assert!(
        our_total <= their_total,
        "{our_total} > {their_total} bytes over 5 streams"
    );
}
