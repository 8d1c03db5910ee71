//! Two-thread SPSC throughput: Sluice's ring against rtrb, crossbeam's
//! `ArrayQueue` and heapless's `spsc::Queue`, in the same run, for 8-byte and
//! 32-byte items, one at a time and in batches of 64.
//!
//! Each sample moves `iters` items from a producer thread to a consumer
//! thread through a ring of 1024 slots (heapless: 1023, its capacity for
//! N = 1024); both sides spin when the ring is full or empty.

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_core::ring::ArrayRing;

const CAP: usize = 1024;
const BATCH: usize = 64;

/// An item the consumer can fold into a checksum.
trait Item: Copy + Send + Default + 'static {
    fn make(i: u64) -> Self;
    fn key(&self) -> u64;
}

impl Item for u64 {
    #[inline(always)]
    fn make(i: u64) -> Self {
        i
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        *self
    }
}

/// A 32-byte item, the size of a small reading.
#[derive(Clone, Copy, Default)]
struct Bytes32([u64; 4]);

impl Item for Bytes32 {
    #[inline(always)]
    fn make(i: u64) -> Self {
        Bytes32([i, i ^ 1, i ^ 2, i ^ 3])
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        self.0[0]
    }
}

/// Runs `producer` and `consumer` on two threads and times the transfer.
fn timed(producer: impl FnOnce() + Send, consumer: impl FnOnce() -> u64 + Send) -> Duration {
    thread::scope(|s| {
        let start = Instant::now();
        s.spawn(producer);
        let sum = s.spawn(consumer).join().unwrap();
        black_box(sum);
        start.elapsed()
    })
}

fn sluice_single<T: Item>(n: u64) -> Duration {
    let mut ring = ArrayRing::<T, CAP>::new();
    let (mut tx, mut rx) = ring.split();
    timed(
        move || {
            for i in 0..n {
                let mut v = T::make(i);
                while let Err(full) = tx.try_push(v) {
                    v = full.0;
                    spin_loop();
                }
            }
        },
        move || {
            let (mut got, mut sum) = (0, 0u64);
            while got < n {
                match rx.try_pop() {
                    Some(v) => {
                        sum = sum.wrapping_add(v.key());
                        got += 1;
                    }
                    None => spin_loop(),
                }
            }
            sum
        },
    )
}

fn sluice_batch<T: Item>(n: u64) -> Duration {
    let mut ring = ArrayRing::<T, CAP>::new();
    let (mut tx, mut rx) = ring.split();
    timed(
        move || {
            let mut buf = [T::default(); BATCH];
            let mut sent = 0u64;
            while sent < n {
                let len = (n - sent).min(BATCH as u64) as usize;
                for (j, v) in buf[..len].iter_mut().enumerate() {
                    *v = T::make(sent + j as u64);
                }
                let mut off = 0;
                while off < len {
                    let k = tx.push_slice(&buf[off..len]);
                    if k == 0 {
                        spin_loop();
                    }
                    off += k;
                }
                sent += len as u64;
            }
        },
        move || {
            let mut buf = [T::default(); BATCH];
            let (mut got, mut sum) = (0, 0u64);
            while got < n {
                let k = rx.pop_slice(&mut buf);
                if k == 0 {
                    spin_loop();
                }
                for v in &buf[..k] {
                    sum = sum.wrapping_add(v.key());
                }
                got += k as u64;
            }
            sum
        },
    )
}

fn rtrb_single<T: Item>(n: u64) -> Duration {
    let (mut tx, mut rx) = rtrb::RingBuffer::<T>::new(CAP);
    timed(
        move || {
            for i in 0..n {
                let mut v = T::make(i);
                while let Err(rtrb::PushError::Full(back)) = tx.push(v) {
                    v = back;
                    spin_loop();
                }
            }
        },
        move || {
            let (mut got, mut sum) = (0, 0u64);
            while got < n {
                match rx.pop() {
                    Ok(v) => {
                        sum = sum.wrapping_add(v.key());
                        got += 1;
                    }
                    Err(_) => spin_loop(),
                }
            }
            sum
        },
    )
}

fn rtrb_batch<T: Item>(n: u64) -> Duration {
    let (mut tx, mut rx) = rtrb::RingBuffer::<T>::new(CAP);
    timed(
        move || {
            let mut buf = [T::default(); BATCH];
            let mut sent = 0u64;
            while sent < n {
                let len = (n - sent).min(BATCH as u64) as usize;
                for (j, v) in buf[..len].iter_mut().enumerate() {
                    *v = T::make(sent + j as u64);
                }
                let mut rest = &buf[..len];
                while !rest.is_empty() {
                    let (pushed, left) = tx.push_partial_slice(rest);
                    if pushed.is_empty() {
                        spin_loop();
                    }
                    rest = left;
                }
                sent += len as u64;
            }
        },
        move || {
            let mut buf = [T::default(); BATCH];
            let (mut got, mut sum) = (0, 0u64);
            while got < n {
                let (popped, _) = rx.pop_partial_slice(&mut buf);
                if popped.is_empty() {
                    spin_loop();
                }
                for v in popped.iter() {
                    sum = sum.wrapping_add(v.key());
                }
                got += popped.len() as u64;
            }
            sum
        },
    )
}

fn crossbeam_single<T: Item>(n: u64) -> Duration {
    let q = crossbeam_queue::ArrayQueue::<T>::new(CAP);
    let q = &q;
    timed(
        move || {
            for i in 0..n {
                let mut v = T::make(i);
                while let Err(back) = q.push(v) {
                    v = back;
                    spin_loop();
                }
            }
        },
        move || {
            let (mut got, mut sum) = (0, 0u64);
            while got < n {
                match q.pop() {
                    Some(v) => {
                        sum = sum.wrapping_add(v.key());
                        got += 1;
                    }
                    None => spin_loop(),
                }
            }
            sum
        },
    )
}

fn heapless_single<T: Item>(n: u64) -> Duration {
    let mut q = heapless::spsc::Queue::<T, CAP>::new();
    let (mut tx, mut rx) = q.split();
    timed(
        move || {
            for i in 0..n {
                let mut v = T::make(i);
                while let Err(back) = tx.enqueue(v) {
                    v = back;
                    spin_loop();
                }
            }
        },
        move || {
            let (mut got, mut sum) = (0, 0u64);
            while got < n {
                match rx.dequeue() {
                    Some(v) => {
                        sum = sum.wrapping_add(v.key());
                        got += 1;
                    }
                    None => spin_loop(),
                }
            }
            sum
        },
    )
}

/// Moves `n` items between two threads and returns the time it took.
type Transfer = fn(u64) -> Duration;

fn group<T: Item>(c: &mut Criterion, name: &str) {
    let mut g = c.benchmark_group(format!("spsc_{name}"));
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    let contenders: [(&str, Transfer); 6] = [
        ("sluice/single", sluice_single::<T>),
        ("rtrb/single", rtrb_single::<T>),
        ("crossbeam_arrayqueue/single", crossbeam_single::<T>),
        ("heapless_spsc/single", heapless_single::<T>),
        ("sluice/batch64", sluice_batch::<T>),
        ("rtrb/batch64", rtrb_batch::<T>),
    ];
    for (id, run) in contenders {
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
            // One sample moves many items, so thread start-up is amortised.
            b.iter_custom(|iters| run(iters * 1_000) / 1_000)
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    group::<u64>(c, "u64");
    group::<Bytes32>(c, "32B");
}

criterion_group!(ring, benches);
criterion_main!(ring);
