//! Two-thread stress tests of the SPSC ring: every item arrives once, in
//! order, and every value is dropped exactly once (none leaked, none twice).
//! Sizes shrink under Miri, which runs these too.

#![cfg(not(loom))]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use sluice_core::ring::{ArrayRing, Ring, Slot};

const ITEMS: u64 = if cfg!(miri) { 2_000 } else { 4_000_000 };

/// A value that counts its drops.
struct Tracked {
    seq: u64,
    drops: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn single_items_arrive_once_in_order_and_drop_once() {
    let drops = Arc::new(AtomicUsize::new(0));
    let mut ring = ArrayRing::<Tracked, 64>::new();
    let (mut tx, mut rx) = ring.split();
    thread::scope(|s| {
        let drops_tx = drops.clone();
        s.spawn(move || {
            for seq in 0..ITEMS {
                let mut item = Tracked {
                    seq,
                    drops: drops_tx.clone(),
                };
                loop {
                    match tx.try_push(item) {
                        Ok(()) => break,
                        Err(full) => {
                            item = full.0;
                            std::hint::spin_loop();
                        }
                    }
                }
            }
        });
        s.spawn(move || {
            let mut expect = 0;
            while expect < ITEMS {
                if let Some(item) = rx.try_pop() {
                    assert_eq!(item.seq, expect);
                    expect += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
            assert!(rx.try_pop().is_none());
        });
    });
    assert_eq!(drops.load(Ordering::Relaxed) as u64, ITEMS);
}

#[test]
fn batches_over_an_arc_arrive_once_in_order() {
    let drops = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let ring = Arc::new(ArrayRing::<Tracked, 128>::new());
    let (mut tx, mut rx) = Ring::try_split(ring.clone()).expect("first split");
    let (producer_drops, producer_created) = (drops.clone(), created.clone());
    let producer = thread::spawn(move || {
        let mut next = 0u64;
        let mut batch = 1u64;
        while next < ITEMS {
            let end = (next + batch).min(ITEMS);
            let mut items = (next..end).map(|seq| {
                producer_created.fetch_add(1, Ordering::Relaxed);
                Tracked {
                    seq,
                    drops: producer_drops.clone(),
                }
            });
            // Items that do not fit stay in the (lazy) iterator, uncreated.
            next += tx.push_iter(&mut items) as u64;
            batch = batch % 97 + 1;
        }
    });
    let consumer = thread::spawn(move || {
        let mut expect = 0u64;
        while expect < ITEMS {
            rx.pop_each(usize::MAX, |item| {
                assert_eq!(item.seq, expect);
                expect += 1;
            });
        }
    });
    producer.join().unwrap();
    consumer.join().unwrap();
    assert_eq!(created.load(Ordering::Relaxed) as u64, ITEMS);
    assert_eq!(drops.load(Ordering::Relaxed) as u64, ITEMS);
    assert_eq!(ring.len(), 0);
}

#[test]
fn copy_slices_cross_threads_intact() {
    let mut slots: Vec<Slot<u64>> = (0..256).map(|_| Slot::new()).collect();
    let mut ring = Ring::with_storage(&mut slots[..]).unwrap();
    let (mut tx, mut rx) = ring.split();
    thread::scope(|s| {
        s.spawn(move || {
            let mut next = 0u64;
            let mut buf = [0u64; 61];
            while next < ITEMS {
                let n = (ITEMS - next).min(buf.len() as u64) as usize;
                for (i, v) in buf[..n].iter_mut().enumerate() {
                    *v = next + i as u64;
                }
                next += tx.push_slice(&buf[..n]) as u64;
            }
        });
        s.spawn(move || {
            let mut expect = 0u64;
            let mut buf = [0u64; 47];
            while expect < ITEMS {
                let n = rx.pop_slice(&mut buf);
                for v in &buf[..n] {
                    assert_eq!(*v, expect);
                    expect += 1;
                }
            }
        });
    });
}

#[test]
fn dropping_the_ring_drops_what_is_left() {
    let drops = Arc::new(AtomicUsize::new(0));
    {
        let mut ring = ArrayRing::<Tracked, 8>::new();
        let (mut tx, mut rx) = ring.split();
        for seq in 0..8 {
            assert!(
                tx.try_push(Tracked {
                    seq,
                    drops: drops.clone()
                })
                .is_ok()
            );
        }
        // Wrap around so that the leftovers straddle the end of the array.
        for _ in 0..5 {
            drop(rx.try_pop());
        }
        for seq in 8..11 {
            assert!(
                tx.try_push(Tracked {
                    seq,
                    drops: drops.clone()
                })
                .is_ok()
            );
        }
        assert_eq!(drops.load(Ordering::Relaxed), 5);
    }
    assert_eq!(drops.load(Ordering::Relaxed), 11);
}

#[test]
fn a_panicking_consumer_callback_loses_nothing_twice() {
    let drops = Arc::new(AtomicUsize::new(0));
    let mut ring = ArrayRing::<Tracked, 8>::new();
    {
        let (mut tx, mut rx) = ring.split();
        let mut items = (0..6).map(|seq| Tracked {
            seq,
            drops: drops.clone(),
        });
        assert_eq!(tx.push_iter(&mut items), 6);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rx.pop_each(6, |item| {
                if item.seq == 2 {
                    panic!("callback fails on the third item");
                }
            })
        }));
        assert!(result.is_err());
        // Items 0, 1 and 2 were handed out (and dropped); 3..6 remain.
        assert_eq!(drops.load(Ordering::Relaxed), 3);
        assert_eq!(rx.try_pop().map(|i| i.seq), Some(3));
    }
    drop(ring);
    assert_eq!(drops.load(Ordering::Relaxed), 6);
}
