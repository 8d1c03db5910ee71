//! Model-checks the SPSC ring under every interleaving (and every weak-memory
//! outcome loom models) of a producer and a consumer thread.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p sluice-core --test loom --release`.

#![cfg(loom)]

use std::ops::Deref;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use sluice_core::ring::{ArrayRing, Ring};
use stable_deref_trait::{CloneStableDeref, StableDeref};

/// loom's `Arc`, which the stable-deref crate does not know about.
struct Shared<T>(Arc<T>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// SAFETY: loom's `Arc` points at one heap allocation that does not move while
// any clone lives, exactly like `std::sync::Arc`.
unsafe impl<T> StableDeref for Shared<T> {}
// SAFETY: clones of an `Arc` point at the same allocation.
unsafe impl<T> CloneStableDeref for Shared<T> {}

/// Counts drops, so that the model also checks "each value dropped once".
struct Tracked(usize, Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn single_push_pop_transfers_in_order() {
    loom::model(|| {
        let ring = Shared(Arc::new(ArrayRing::<usize, 2>::new()));
        let (mut tx, mut rx) = Ring::try_split(ring).unwrap();
        let producer = thread::spawn(move || {
            for v in 0..3 {
                while tx.try_push(v).is_err() {
                    thread::yield_now();
                }
            }
        });
        let mut expect = 0;
        while expect < 3 {
            match rx.try_pop() {
                Some(v) => {
                    assert_eq!(v, expect);
                    expect += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}

#[test]
fn batches_transfer_and_leftovers_drop_once() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let ring = Shared(Arc::new(ArrayRing::<Tracked, 2>::new()));
        let (mut tx, mut rx) = Ring::try_split(ring).unwrap();
        let producer_drops = drops.clone();
        let producer = thread::spawn(move || {
            let mut items = (0..3).map(|i| Tracked(i, producer_drops.clone()));
            let mut sent = 0;
            while sent < 3 {
                let n = tx.push_iter(&mut items);
                if n == 0 {
                    thread::yield_now();
                }
                sent += n;
            }
        });
        let mut got = 0;
        // Take at most two; the third may still be in the ring at the end.
        while got < 2 {
            rx.pop_each(2 - got, |item| {
                assert_eq!(item.0, got);
                got += 1;
            });
            if got < 2 {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
        drop(rx);
        // The last clone goes: the ring drops whatever is left.
        assert_eq!(drops.load(Ordering::Relaxed), 3);
    });
}

#[test]
fn copy_slices_wrap_around() {
    loom::model(|| {
        let ring = Shared(Arc::new(ArrayRing::<u8, 2>::new()));
        let (mut tx, mut rx) = Ring::try_split(ring).unwrap();
        let producer = thread::spawn(move || {
            let data = [1u8, 2, 3];
            let mut sent = 0;
            while sent < data.len() {
                let n = tx.push_slice(&data[sent..]);
                if n == 0 {
                    thread::yield_now();
                }
                sent += n;
            }
        });
        let mut out = [0u8; 3];
        let mut got = 0;
        while got < 3 {
            let n = rx.pop_slice(&mut out[got..]);
            if n == 0 {
                thread::yield_now();
            }
            got += n;
        }
        assert_eq!(out, [1, 2, 3]);
        producer.join().unwrap();
    });
}
