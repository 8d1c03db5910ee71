//! Paired SPSC comparison, robust to the host moving vCPUs around.
//!
//! On a small VM, two-thread ring timings jump between regimes (lock-step
//! cache-line ping-pong, or burst draining) that last for seconds and hit all
//! rings alike, so criterion's one-contender-after-another runs can compare
//! a ring in a fast regime with another in a slow one. Here every *round*
//! runs every contender once, back to back, in a shuffled order, and the
//! ratio to Sluice is taken *within* the round; the report gives the median
//! time and the median paired ratio over the rounds.
//!
//! `cargo bench -p sluice-benches --bench ring_paired` (`ROUNDS` and `ITEMS`
//! in the environment change the defaults of 21 rounds of 2,000,000 items).

use std::time::Duration;

use sluice_benches::spsc::{Bytes32, Contender, Item};
use sluice_core::rng::SplitMix64;

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn compare<T: Item>(item: &str, batched: bool, rounds: u64, items: u64, rng: &mut SplitMix64) {
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| !batched || c.has_batches())
        .collect();
    // times[c][round], in ns per item.
    let mut times = vec![Vec::new(); contenders.len()];
    for _ in 0..rounds {
        let mut order: Vec<usize> = (0..contenders.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &c in &order {
            // The slow MPMC queue moves a tenth of the items.
            let n = if contenders[c] == Contender::Crossbeam {
                items / 10
            } else {
                items
            };
            let t: Duration = contenders[c].run::<T>(n, batched);
            times[c].push(t.as_nanos() as f64 / n as f64);
        }
    }
    let mode = if batched { "batch 64" } else { "single" };
    for (c, contender) in contenders.iter().enumerate() {
        let mut ratios: Vec<f64> = times[c].iter().zip(&times[0]).map(|(t, s)| t / s).collect();
        let (lo, hi) = times[c]
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), &t| (a.min(t), b.max(t)));
        let med = median(&mut times[c].clone());
        println!(
            "| {item} | {mode} | {} | {med:.2} ns | {lo:.2}–{hi:.2} ns | {:.2} |",
            contender.name(),
            median(&mut ratios)
        );
    }
}

fn main() {
    let rounds = env("ROUNDS", 21);
    let items = env("ITEMS", 2_000_000);
    let mut rng = SplitMix64::new(env("SEED", 1));
    println!(
        "{rounds} rounds of {items} items (crossbeam: {}) per contender",
        items / 10
    );
    println!("| item | mode | contender | median | range | median ratio to sluice (paired) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for batched in [false, true] {
        compare::<u64>("u64", batched, rounds, items, &mut rng);
        compare::<Bytes32>("32 B", batched, rounds, items, &mut rng);
    }
}
