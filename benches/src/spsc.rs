//! The SPSC contenders behind one interface, so that every benchmark moves
//! items the same way whatever the ring: a producer thread pushes `n` items
//! (spinning while full), a consumer thread pops them (spinning while empty)
//! and folds them into a checksum.

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use sluice_core::ring::{ArrayRing, Consumer, Producer, Ring, Slot, Storage};

/// Slots per ring (heapless: 1023 usable, its capacity for N = 1024).
pub const CAP: usize = 1024;
/// Items per batch in the batched variants.
pub const BATCH: usize = 64;

/// An item the consumer can fold into a checksum.
pub trait Item: Copy + Send + Default + 'static {
    /// The `i`-th item.
    fn make(i: u64) -> Self;
    /// A number to fold into the checksum.
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
pub struct Bytes32([u64; 4]);

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

/// The writing side of a contender.
pub trait Push<T>: Send {
    /// Pushes one item or hands it back.
    fn push(&mut self, v: T) -> Result<(), T>;
    /// Pushes a prefix of `items`; returns its length. Contenders without a
    /// batch API push one at a time.
    fn push_batch(&mut self, items: &[T]) -> usize
    where
        T: Copy,
    {
        items.iter().take_while(|&&v| self.push(v).is_ok()).count()
    }
}

/// The reading side of a contender.
pub trait Pop<T>: Send {
    /// Pops one item.
    fn pop(&mut self) -> Option<T>;
    /// Pops into a prefix of `out`; returns its length.
    fn pop_batch(&mut self, out: &mut [T]) -> usize {
        let mut n = 0;
        while n < out.len() {
            match self.pop() {
                Some(v) => out[n] = v,
                None => break,
            }
            n += 1;
        }
        n
    }
}

impl<T: Item, S: Storage<T> + Send> Push<T> for Producer<&Ring<T, S>> {
    #[inline(always)]
    fn push(&mut self, v: T) -> Result<(), T> {
        self.try_push(v).map_err(|full| full.0)
    }
    #[inline(always)]
    fn push_batch(&mut self, items: &[T]) -> usize {
        self.push_slice(items)
    }
}

impl<T: Item, S: Storage<T> + Send> Pop<T> for Consumer<&Ring<T, S>> {
    #[inline(always)]
    fn pop(&mut self) -> Option<T> {
        self.try_pop()
    }
    #[inline(always)]
    fn pop_batch(&mut self, out: &mut [T]) -> usize {
        self.pop_slice(out)
    }
}

impl<T: Item> Push<T> for rtrb::Producer<T> {
    #[inline(always)]
    fn push(&mut self, v: T) -> Result<(), T> {
        rtrb::Producer::push(self, v).map_err(|rtrb::PushError::Full(v)| v)
    }
    #[inline(always)]
    fn push_batch(&mut self, items: &[T]) -> usize {
        self.push_partial_slice(items).0.len()
    }
}

impl<T: Item> Pop<T> for rtrb::Consumer<T> {
    #[inline(always)]
    fn pop(&mut self) -> Option<T> {
        rtrb::Consumer::pop(self).ok()
    }
    #[inline(always)]
    fn pop_batch(&mut self, out: &mut [T]) -> usize {
        self.pop_partial_slice(out).0.len()
    }
}

impl<T: Item> Push<T> for heapless::spsc::Producer<'_, T> {
    #[inline(always)]
    fn push(&mut self, v: T) -> Result<(), T> {
        self.enqueue(v)
    }
}

impl<T: Item> Pop<T> for heapless::spsc::Consumer<'_, T> {
    #[inline(always)]
    fn pop(&mut self) -> Option<T> {
        self.dequeue()
    }
}

impl<T: Item> Push<T> for &crossbeam_queue::ArrayQueue<T> {
    #[inline(always)]
    fn push(&mut self, v: T) -> Result<(), T> {
        crossbeam_queue::ArrayQueue::push(self, v)
    }
}

impl<T: Item> Pop<T> for &crossbeam_queue::ArrayQueue<T> {
    #[inline(always)]
    fn pop(&mut self) -> Option<T> {
        crossbeam_queue::ArrayQueue::pop(self)
    }
}

/// Moves `n` items from `tx` to `rx` on two threads, one at a time (or in
/// batches of [`BATCH`]); returns the time from start to the last pop.
pub fn transfer<T: Item>(
    mut tx: impl Push<T>,
    mut rx: impl Pop<T>,
    n: u64,
    batched: bool,
) -> Duration {
    thread::scope(|s| {
        let start = Instant::now();
        s.spawn(move || {
            let mut buf = [T::default(); BATCH];
            let mut sent = 0u64;
            while sent < n {
                if !batched {
                    let mut v = T::make(sent);
                    while let Err(back) = tx.push(v) {
                        v = back;
                        spin_loop();
                    }
                    sent += 1;
                    continue;
                }
                let len = (n - sent).min(BATCH as u64) as usize;
                for (j, v) in buf[..len].iter_mut().enumerate() {
                    *v = T::make(sent + j as u64);
                }
                let mut off = 0;
                while off < len {
                    let k = tx.push_batch(&buf[off..len]);
                    if k == 0 {
                        spin_loop();
                    }
                    off += k;
                }
                sent += len as u64;
            }
        });
        let consumer = s.spawn(move || {
            let mut buf = [T::default(); BATCH];
            let (mut got, mut sum) = (0u64, 0u64);
            while got < n {
                if !batched {
                    match rx.pop() {
                        Some(v) => {
                            sum = sum.wrapping_add(v.key());
                            got += 1;
                        }
                        None => spin_loop(),
                    }
                    continue;
                }
                let k = rx.pop_batch(&mut buf);
                if k == 0 {
                    spin_loop();
                }
                for v in &buf[..k] {
                    sum = sum.wrapping_add(v.key());
                }
                got += k as u64;
            }
            sum
        });
        black_box(consumer.join().unwrap());
        start.elapsed()
    })
}

/// One SPSC implementation, as a benchmark sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// `sluice_core::ring` with its slots inline (`ArrayRing`, boxed).
    Sluice,
    /// `sluice_core::ring` on caller slots from the heap, as the agent sizes
    /// rings from its configuration.
    SluiceHeapSlots,
    /// The `rtrb` crate.
    Rtrb,
    /// `heapless::spsc`.
    Heapless,
    /// `crossbeam_queue::ArrayQueue` (MPMC).
    Crossbeam,
}

impl Contender {
    /// Every contender.
    pub const ALL: [Contender; 5] = [
        Contender::Sluice,
        Contender::SluiceHeapSlots,
        Contender::Rtrb,
        Contender::Heapless,
        Contender::Crossbeam,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Sluice => "sluice",
            Contender::SluiceHeapSlots => "sluice_heap_slots",
            Contender::Rtrb => "rtrb",
            Contender::Heapless => "heapless_spsc",
            Contender::Crossbeam => "crossbeam_arrayqueue",
        }
    }

    /// Whether the contender has a batch API (the others are not run batched).
    pub fn has_batches(self) -> bool {
        matches!(
            self,
            Contender::Sluice | Contender::SluiceHeapSlots | Contender::Rtrb
        )
    }

    /// Builds a fresh ring of [`CAP`] slots and moves `n` items through it.
    pub fn run<T: Item>(self, n: u64, batched: bool) -> Duration {
        match self {
            Contender::Sluice => {
                let ring = Box::new(ArrayRing::<T, CAP>::new());
                let (tx, rx) = Ring::try_split(&*ring).expect("fresh ring");
                transfer(tx, rx, n, batched)
            }
            Contender::SluiceHeapSlots => {
                let mut slots: Vec<Slot<T>> = (0..CAP).map(|_| Slot::new()).collect();
                let ring = Ring::with_storage(&mut slots[..]).expect("power of two");
                let (tx, rx) = Ring::try_split(&ring).expect("fresh ring");
                transfer(tx, rx, n, batched)
            }
            Contender::Rtrb => {
                let (tx, rx) = rtrb::RingBuffer::<T>::new(CAP);
                transfer(tx, rx, n, batched)
            }
            Contender::Heapless => {
                let mut q = Box::new(heapless::spsc::Queue::<T, CAP>::new());
                let (tx, rx) = q.split();
                transfer(tx, rx, n, batched)
            }
            Contender::Crossbeam => {
                let q = crossbeam_queue::ArrayQueue::<T>::new(CAP);
                transfer(&q, &q, n, batched)
            }
        }
    }
}
