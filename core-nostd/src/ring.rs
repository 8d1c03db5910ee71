//! A bounded, lock-free, single-producer single-consumer ring.
//!
//! The ring is how readings cross from a collector task to a worker thread
//! without a lock on the hot path. It never allocates: the slots are either an
//! array inside the [`Ring`] (sized by a const generic, so a ring can live in a
//! `static`) or a slice the caller provides (sized at run time from config).
//!
//! ```
//! use sluice_core::ring::ArrayRing;
//!
//! let mut ring = ArrayRing::<u32, 4>::new();
//! let (mut tx, mut rx) = ring.split();
//! assert_eq!(tx.push_slice(&[1, 2, 3, 4, 5]), 4); // the fifth does not fit
//! assert_eq!(tx.try_push(6).unwrap_err().0, 6); // a full ring hands the value back
//! let mut out = [0; 8];
//! assert_eq!(rx.pop_slice(&mut out), 4);
//! assert_eq!(&out[..4], &[1, 2, 3, 4]);
//! ```
//!
//! # Design
//!
//! `head` is the position of the next slot to read and is written only by the
//! [`Consumer`]; `tail` is the position of the next slot to write and is
//! written only by the [`Producer`]. Both are free-running `usize` counters
//! (they wrap at `usize::MAX`, which takes centuries), so `tail - head` is the
//! occupancy and all `N` slots are usable. `N` is a power of two so that a
//! position maps to a slot with a mask instead of a division.
//!
//! Each handle keeps its own index in a plain field (it is the only writer)
//! and a *cached* copy of the other side's index. It reloads the other side's
//! atomic only when the cache says the ring is full (producer) or empty
//! (consumer). In steady state a push or pop touches one shared cache line
//! (its own index) instead of two.
//!
//! # Memory orderings
//!
//! * The producer writes the slot, then publishes it with a `Release` store of
//!   `tail`. The consumer loads `tail` with `Acquire`, so the slot write
//!   happens-before its read of the slot.
//! * The consumer moves the value out of the slot, then frees it with a
//!   `Release` store of `head`. The producer loads `head` with `Acquire`, so the
//!   consumer's read happens-before the producer overwrites that slot.
//! * A handle reads its *own* index from its private field, so it needs no
//!   atomic load of it at all.
//!
//! Batch operations write or read several slots and then publish them with a
//! single `Release` store, which is what makes them cheaper than a loop of
//! single pushes.
//!
//! # Sharing
//!
//! [`Ring::split`] borrows the ring mutably and hands out handles that borrow
//! it; this is the zero-cost form for scoped threads. [`Ring::try_split`]
//! takes any stable, clonable pointer to the ring (`&'static Ring` for a ring
//! in a `static`, `Arc<Ring>` in std code) and succeeds once per ring, so
//! there is never more than one producer or one consumer.

use core::marker::PhantomData;
use core::mem::MaybeUninit;

use stable_deref_trait::CloneStableDeref;

use crate::sync::{AtomicBool, AtomicUsize, CachePadded, Ordering, UnsafeCell};

/// One slot of a ring: storage for a value that may or may not be present.
///
/// Whether a slot holds a value is known only to the ring's indices, which is
/// why slots are opaque to users; they only create them for caller-provided
/// storage with [`Slot::new`] or [`Slot::array`].
#[repr(transparent)]
pub struct Slot<T>(UnsafeCell<MaybeUninit<T>>);

impl<T> Slot<T> {
    /// An empty slot.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self(UnsafeCell::new(MaybeUninit::uninit()))
    }

    /// An empty slot.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self(UnsafeCell::new(MaybeUninit::uninit()))
    }

    /// An array of `N` empty slots.
    #[cfg(not(loom))]
    pub const fn array<const N: usize>() -> [Self; N] {
        [const { Self::new() }; N]
    }

    /// An array of `N` empty slots.
    #[cfg(loom)]
    pub fn array<const N: usize>() -> [Self; N] {
        core::array::from_fn(|_| Self::new())
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a ring keeps its slots.
///
/// # Safety
///
/// `slots()` must return the same slice (same address, same length) every
/// time it is called on the same value, for as long as the value lives, and
/// nothing else may access those slots while the value is in a [`Ring`].
pub unsafe trait Storage<T> {
    /// The slots. Their number must be a power of two.
    fn slots(&self) -> &[Slot<T>];
}

// SAFETY: an array is inline in the value and owned by it: the same slots on
// every call, and nobody else can reach them.
unsafe impl<T, const N: usize> Storage<T> for [Slot<T>; N] {
    #[inline(always)]
    fn slots(&self) -> &[Slot<T>] {
        self
    }
}

// SAFETY: the exclusive borrow gives the ring sole access to the slice for the
// borrow's lifetime, and a reference always points at the same slice.
unsafe impl<T> Storage<T> for &mut [Slot<T>] {
    #[inline(always)]
    fn slots(&self) -> &[Slot<T>] {
        self
    }
}

/// The error of building a ring on storage whose length is not a non-zero
/// power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityError {
    /// The rejected number of slots.
    pub len: usize,
}

impl core::fmt::Display for CapacityError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ring capacity must be a non-zero power of two, got {}",
            self.len
        )
    }
}

impl core::error::Error for CapacityError {}

/// The error of [`Producer::try_push`] on a full ring; it hands the value back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T> core::fmt::Display for Full<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ring is full")
    }
}

impl<T: core::fmt::Debug> core::error::Error for Full<T> {}

/// A bounded lock-free SPSC ring of `T` over the slots in `S`.
///
/// See the [module docs](self) for the design and the memory orderings.
pub struct Ring<T, S: Storage<T>> {
    /// Next position to read. Written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Next position to write. Written only by the producer.
    tail: CachePadded<AtomicUsize>,
    /// Set once [`Ring::try_split`] has handed out the handles.
    split: AtomicBool,
    storage: S,
    _items: PhantomData<T>,
}

/// A ring whose `N` slots live inside it; `N` must be a power of two.
///
/// ```
/// use sluice_core::ring::{ArrayRing, Ring};
///
/// static RING: ArrayRing<u64, 1024> = ArrayRing::new();
///
/// let (mut tx, mut rx) = Ring::try_split(&RING).expect("first split");
/// assert!(Ring::try_split(&RING).is_none(), "only one producer and consumer, ever");
/// tx.try_push(7).unwrap();
/// assert_eq!(rx.try_pop(), Some(7));
/// ```
pub type ArrayRing<T, const N: usize> = Ring<T, [Slot<T>; N]>;

impl<T, const N: usize> Ring<T, [Slot<T>; N]> {
    /// An empty ring. Fails to compile unless `N` is a non-zero power of two.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        const { assert!(N.is_power_of_two(), "ring capacity must be a power of two") };
        Self {
            head: CachePadded(AtomicUsize::new(0)),
            tail: CachePadded(AtomicUsize::new(0)),
            split: AtomicBool::new(false),
            storage: Slot::array::<N>(),
            _items: PhantomData,
        }
    }

    /// An empty ring. Fails to compile unless `N` is a non-zero power of two.
    #[cfg(loom)]
    pub fn new() -> Self {
        const { assert!(N.is_power_of_two(), "ring capacity must be a power of two") };
        Self {
            head: CachePadded(AtomicUsize::new(0)),
            tail: CachePadded(AtomicUsize::new(0)),
            split: AtomicBool::new(false),
            storage: Slot::array::<N>(),
            _items: PhantomData,
        }
    }
}

impl<T, const N: usize> Default for Ring<T, [Slot<T>; N]> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, S: Storage<T>> Ring<T, S> {
    /// An empty ring over caller-provided slots, whose number must be a
    /// non-zero power of two.
    pub fn with_storage(storage: S) -> Result<Self, CapacityError> {
        let len = storage.slots().len();
        if !len.is_power_of_two() {
            return Err(CapacityError { len });
        }
        Ok(Self {
            head: CachePadded(AtomicUsize::new(0)),
            tail: CachePadded(AtomicUsize::new(0)),
            split: AtomicBool::new(false),
            storage,
            _items: PhantomData,
        })
    }

    /// How many values the ring holds when full.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.storage.slots().len()
    }

    /// How many values are in the ring right now (a snapshot: the other
    /// threads may change it at once).
    pub fn len(&self) -> usize {
        let tail = self.tail.load(Ordering::Acquire);
        let head = self.head.load(Ordering::Acquire);
        tail.wrapping_sub(head).min(self.capacity())
    }

    /// Whether the ring is empty right now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits the ring into its producer and consumer, borrowing it.
    ///
    /// The mutable borrow guarantees no other handle is alive; the handles
    /// continue where earlier ones stopped.
    pub fn split(&mut self) -> (Producer<&Self>, Consumer<&Self>) {
        // SAFETY: `&mut self` proves no other handle to this ring exists, and
        // the handles borrow the ring, so none can outlive this borrow.
        unsafe { Self::handles(&*self) }
    }

    /// Splits a shared ring into its producer and consumer, once.
    ///
    /// `ring` is any pointer whose clones deref to the same, unmoving ring:
    /// `&'static Ring` for a ring in a `static`, `Arc<Ring>` in std code. The
    /// first call succeeds; every later call returns `None`, so there is never
    /// a second producer or consumer.
    pub fn try_split<P>(ring: P) -> Option<(Producer<P>, Consumer<P>)>
    where
        P: CloneStableDeref<Target = Self>,
    {
        if ring.split.swap(true, Ordering::AcqRel) {
            return None;
        }
        // The flag was clear, so `try_split` never made handles for this ring,
        // and `split(&mut self)` cannot run while `ring` shares it.
        // SAFETY: no other handle exists; `CloneStableDeref` pins both clones here.
        Some(unsafe { Self::handles(ring) })
    }

    /// # Safety
    ///
    /// No other producer or consumer of this ring may be alive, and `ring`
    /// and its clone must deref to the same ring for their whole lives.
    unsafe fn handles<P>(ring: P) -> (Producer<P>, Consumer<P>)
    where
        P: CloneStableDeref<Target = Self>,
    {
        let head = ring.head.load(Ordering::Acquire);
        let tail = ring.tail.load(Ordering::Acquire);
        let mask = ring.capacity() - 1;
        let consumer = Consumer {
            ring: ring.clone(),
            head,
            cached_tail: tail,
            mask,
        };
        let producer = Producer {
            ring,
            tail,
            cached_head: head,
            mask,
        };
        (producer, consumer)
    }

    /// The slot of `position`; `mask` must be `capacity() - 1`.
    #[inline(always)]
    fn slot(&self, position: usize, mask: usize) -> &Slot<T> {
        let slots = self.storage.slots();
        debug_assert_eq!(mask.wrapping_add(1), slots.len());
        // Callers pass `mask == capacity() - 1`, the capacity is a non-zero
        // power of two (checked by `new` and `with_storage`) that `Storage` fixes:
        // SAFETY: hence `position & mask < slots.len()`.
        unsafe { slots.get_unchecked(position & mask) }
    }
}

impl<T, S: Storage<T>> Drop for Ring<T, S> {
    fn drop(&mut self) {
        // `&mut self`: no handle is alive, and whatever ended them (a join, the
        // last `Arc` drop) ordered their writes before this point.
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        let mask = self.capacity().wrapping_sub(1);
        let mut position = head;
        while position != tail {
            self.slot(position, mask).0.with_mut(|value| {
                // SAFETY: positions in head..tail hold values that were
                // written and not yet read, and each is dropped once here.
                unsafe { (*value).assume_init_drop() }
            });
            position = position.wrapping_add(1);
        }
    }
}

// SAFETY: the ring hands values from the producer's thread to the consumer's,
// so it may be shared when values may be sent (`T: Send`). Slot accesses are
// synchronised by the index protocol in the module docs; the indices are
// atomics. The storage moves with the ring, so it must be `Send` too.
unsafe impl<T: Send, S: Storage<T> + Send> Sync for Ring<T, S> {}

/// The writing half of a ring. There is exactly one per ring.
pub struct Producer<P> {
    ring: P,
    /// Our own index; mirrored to `ring.tail` with `Release` after each write.
    tail: usize,
    /// Last value of `ring.head` we loaded; the ring has at least
    /// `capacity - (tail - cached_head)` free slots.
    cached_head: usize,
    mask: usize,
}

/// The reading half of a ring. There is exactly one per ring.
pub struct Consumer<P> {
    ring: P,
    /// Our own index; mirrored to `ring.head` with `Release` after each read.
    head: usize,
    /// Last value of `ring.tail` we loaded; at least `cached_tail - head`
    /// values are ready.
    cached_tail: usize,
    mask: usize,
}

impl<T, S, P> Producer<P>
where
    S: Storage<T>,
    P: CloneStableDeref<Target = Ring<T, S>>,
{
    /// Free slots according to our cache, refreshing it from the consumer's
    /// index when the cache says fewer than `wanted` are free.
    #[inline(always)]
    fn free_at_least(&mut self, wanted: usize) -> usize {
        let capacity = self.mask + 1;
        let mut free = capacity - self.tail.wrapping_sub(self.cached_head);
        if free < wanted {
            // Acquire: pairs with the consumer's Release store of `head`, so
            // its reads of the slots it freed happen before we overwrite them.
            self.cached_head = self.ring.head.load(Ordering::Acquire);
            free = capacity - self.tail.wrapping_sub(self.cached_head);
        }
        free
    }

    /// Makes the values written up to `self.tail` visible to the consumer.
    #[inline(always)]
    fn publish(&self) {
        // Release: pairs with the consumer's Acquire load of `tail`, so the
        // slot writes happen before its reads.
        self.ring.tail.store(self.tail, Ordering::Release);
    }

    /// Pushes `value`, or hands it back in [`Full`] if the ring is full.
    #[inline]
    pub fn try_push(&mut self, value: T) -> Result<(), Full<T>> {
        if self.free_at_least(1) == 0 {
            return Err(Full(value));
        }
        self.ring.slot(self.tail, self.mask).0.with_mut(|slot| {
            // SAFETY: the slot at `tail` is free (the consumer has moved past
            // it, per the Acquire load in `free_at_least`) and only the single
            // producer writes slots, so nobody else accesses it.
            unsafe { slot.write(MaybeUninit::new(value)) }
        });
        self.tail = self.tail.wrapping_add(1);
        self.publish();
        Ok(())
    }

    /// Moves values from `values` into the ring until the ring is full or the
    /// iterator ends, and publishes them all at once. Returns how many were
    /// pushed; values that did not fit stay in the iterator.
    pub fn push_iter<I: Iterator<Item = T>>(&mut self, values: &mut I) -> usize {
        let free = self.free_at_least(usize::MAX);
        // Publishes what was written even if `next()` panics half-way.
        let mut batch = PublishOnDrop {
            producer: self,
            pushed: 0,
        };
        while batch.pushed < free {
            let Some(value) = values.next() else { break };
            let producer = &mut *batch.producer;
            producer
                .ring
                .slot(producer.tail, producer.mask)
                .0
                .with_mut(|slot| {
                    // SAFETY: `pushed < free`, so this slot is free (see
                    // `try_push`), and only the producer writes slots.
                    unsafe { slot.write(MaybeUninit::new(value)) }
                });
            producer.tail = producer.tail.wrapping_add(1);
            batch.pushed += 1;
        }
        batch.pushed
    }

    /// Copies as many of `values` as fit, in order, and publishes them at once.
    /// Returns how many were pushed (a prefix of `values`).
    pub fn push_slice(&mut self, values: &[T]) -> usize
    where
        T: Copy,
    {
        let n = values.len().min(self.free_at_least(values.len()));
        let start = self.tail & self.mask;
        // The run may wrap around the end of the slot array: two pieces.
        let first = n.min(self.mask + 1 - start);
        let slots = self.ring.storage.slots();
        copy_into_slots(&slots[start..start + first], &values[..first]);
        copy_into_slots(&slots[..n - first], &values[first..n]);
        self.tail = self.tail.wrapping_add(n);
        self.publish();
        n
    }

    /// How many values the ring holds (exact from the producer's side at the
    /// moment of the call; the consumer may remove more at once).
    #[inline]
    pub fn len(&mut self) -> usize {
        let capacity = self.mask + 1;
        capacity - self.free_at_least(capacity)
    }

    /// Whether the ring is empty (see [`Producer::len`]).
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    /// How many values can be pushed now without failing.
    #[inline]
    pub fn free(&mut self) -> usize {
        self.free_at_least(usize::MAX)
    }

    /// How many values the ring holds when full.
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }
}

/// Publishes a batch's pushes when dropped, including on unwind.
struct PublishOnDrop<'p, P>
where
    P: ProducerTail,
{
    producer: &'p mut P,
    pushed: usize,
}

/// Lets [`PublishOnDrop`] name the producer without repeating its bounds.
trait ProducerTail {
    fn publish_tail(&self);
}

impl<T, S, P> ProducerTail for Producer<P>
where
    S: Storage<T>,
    P: CloneStableDeref<Target = Ring<T, S>>,
{
    fn publish_tail(&self) {
        self.publish();
    }
}

impl<P: ProducerTail> Drop for PublishOnDrop<'_, P> {
    fn drop(&mut self) {
        if self.pushed > 0 {
            self.producer.publish_tail();
        }
    }
}

impl<T, S, P> Consumer<P>
where
    S: Storage<T>,
    P: CloneStableDeref<Target = Ring<T, S>>,
{
    /// Values ready according to our cache, refreshing it from the producer's
    /// index when the cache says fewer than `wanted` are ready.
    #[inline(always)]
    fn ready_at_least(&mut self, wanted: usize) -> usize {
        let mut ready = self.cached_tail.wrapping_sub(self.head);
        if ready < wanted {
            // Acquire: pairs with the producer's Release store of `tail`, so
            // its slot writes happen before our reads.
            self.cached_tail = self.ring.tail.load(Ordering::Acquire);
            ready = self.cached_tail.wrapping_sub(self.head);
        }
        ready
    }

    /// Frees the slots read up to `self.head` for the producer.
    #[inline(always)]
    fn release(&self) {
        // Release: pairs with the producer's Acquire load of `head`, so our
        // reads of the slots happen before it overwrites them.
        self.ring.head.store(self.head, Ordering::Release);
    }

    /// Pops the oldest value, or `None` if the ring is empty.
    #[inline]
    pub fn try_pop(&mut self) -> Option<T> {
        if self.ready_at_least(1) == 0 {
            return None;
        }
        let value = self.ring.slot(self.head, self.mask).0.with_mut(|slot| {
            // SAFETY: `head < tail` as loaded with Acquire, so the producer
            // wrote this slot and published it; only the single consumer reads
            // slots, and it reads each position once before moving past it.
            unsafe { slot.read().assume_init() }
        });
        self.head = self.head.wrapping_add(1);
        self.release();
        Some(value)
    }

    /// A reference to the oldest value, without removing it.
    pub fn peek(&mut self) -> Option<&T> {
        if self.ready_at_least(1) == 0 {
            return None;
        }
        let value = self.ring.slot(self.head, self.mask).0.with_mut(|slot| {
            // SAFETY: as in `try_pop`, a published value only this consumer
            // accesses; the reference borrows `self` mutably, so the value
            // cannot be popped (and the slot freed) while it lives.
            unsafe { (*slot).assume_init_ref() as *const T }
        });
        // SAFETY: `value` points into the slot, which stays initialised and
        // unaliased for the lifetime of the `&mut self` borrow (see above).
        Some(unsafe { &*value })
    }

    /// Pops up to `max` values, oldest first, passing each to `f`, and frees
    /// their slots with a single store. Returns how many were popped.
    pub fn pop_each(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let n = max.min(self.ready_at_least(max));
        // Frees the slots already read even if `f` panics half-way.
        let mut batch = ReleaseOnDrop {
            consumer: self,
            popped: 0,
        };
        while batch.popped < n {
            let consumer = &mut *batch.consumer;
            let value = consumer
                .ring
                .slot(consumer.head, consumer.mask)
                .0
                .with_mut(|slot| {
                    // SAFETY: `popped < n <= ready`, so the slot holds a published
                    // value (see `try_pop`), read once here.
                    unsafe { slot.read().assume_init() }
                });
            consumer.head = consumer.head.wrapping_add(1);
            batch.popped += 1;
            f(value);
        }
        batch.popped
    }

    /// Copies up to `out.len()` values into `out`, oldest first, and frees
    /// their slots with a single store. Returns how many were popped.
    pub fn pop_slice(&mut self, out: &mut [T]) -> usize
    where
        T: Copy,
    {
        let n = out.len().min(self.ready_at_least(out.len()));
        let start = self.head & self.mask;
        let first = n.min(self.mask + 1 - start);
        let slots = self.ring.storage.slots();
        copy_from_slots(&slots[start..start + first], &mut out[..first]);
        copy_from_slots(&slots[..n - first], &mut out[first..n]);
        self.head = self.head.wrapping_add(n);
        self.release();
        n
    }

    /// How many values are ready (exact from the consumer's side at the
    /// moment of the call; the producer may add more at once).
    #[inline]
    pub fn len(&mut self) -> usize {
        self.ready_at_least(usize::MAX)
    }

    /// Whether no value is ready.
    #[inline]
    pub fn is_empty(&mut self) -> bool {
        self.ready_at_least(1) == 0
    }

    /// How many values the ring holds when full.
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }
}

/// Frees a batch's slots when dropped, including on unwind.
struct ReleaseOnDrop<'c, C: ConsumerHead> {
    consumer: &'c mut C,
    popped: usize,
}

/// Lets [`ReleaseOnDrop`] name the consumer without repeating its bounds.
trait ConsumerHead {
    fn release_head(&self);
}

impl<T, S, P> ConsumerHead for Consumer<P>
where
    S: Storage<T>,
    P: CloneStableDeref<Target = Ring<T, S>>,
{
    fn release_head(&self) {
        self.release();
    }
}

impl<C: ConsumerHead> Drop for ReleaseOnDrop<'_, C> {
    fn drop(&mut self) {
        if self.popped > 0 {
            self.consumer.release_head();
        }
    }
}

/// Copies `src` into the free `slots` (same length).
#[inline(always)]
fn copy_into_slots<T: Copy>(slots: &[Slot<T>], src: &[T]) {
    debug_assert_eq!(slots.len(), src.len());
    #[cfg(not(loom))]
    if !src.is_empty() {
        // `Slot<T>` is `repr(transparent)` over `UnsafeCell<MaybeUninit<T>>`,
        // which has the layout of `T`: the slots are contiguous `T` places.
        // The caller established that they are free and only this producer
        // writes them; `src` is a distinct borrow, so the ranges do not overlap.
        // SAFETY: see above: valid, exclusive, non-overlapping `T` places.
        unsafe {
            let dst = slots.as_ptr() as *mut T;
            core::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        }
    }
    #[cfg(loom)]
    for (slot, value) in slots.iter().zip(src) {
        // SAFETY: the slot is free and only the producer writes it.
        slot.0
            .with_mut(|p| unsafe { p.write(MaybeUninit::new(*value)) });
    }
}

/// Copies the published values in `slots` into `dst` (same length).
#[inline(always)]
fn copy_from_slots<T: Copy>(slots: &[Slot<T>], dst: &mut [T]) {
    debug_assert_eq!(slots.len(), dst.len());
    #[cfg(not(loom))]
    if !dst.is_empty() {
        // As in `copy_into_slots`, the slots are contiguous `T`s; the caller
        // established that they hold published values only this consumer reads.
        // SAFETY: `dst` is a distinct borrow, and `T: Copy` leaves nothing to drop.
        unsafe {
            let src = slots.as_ptr() as *const T;
            core::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len());
        }
    }
    #[cfg(loom)]
    for (slot, out) in slots.iter().zip(dst) {
        // SAFETY: the slot holds a published value only the consumer reads.
        *out = slot.0.with_mut(|p| unsafe { p.read().assume_init() });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fills_to_capacity_and_hands_back_the_value() {
        let mut ring = ArrayRing::<u8, 4>::new();
        let (mut tx, mut rx) = ring.split();
        for i in 0..4 {
            tx.try_push(i).unwrap();
        }
        assert_eq!(tx.try_push(9), Err(Full(9)));
        assert_eq!(tx.len(), 4);
        assert_eq!(rx.try_pop(), Some(0));
        tx.try_push(4).unwrap();
        let mut seen = [0u8; 4];
        let mut i = 0;
        rx.pop_each(10, |v| {
            seen[i] = v;
            i += 1;
        });
        assert_eq!(seen, [1, 2, 3, 4]);
        assert!(rx.is_empty());
    }

    #[test]
    fn slices_wrap_around_the_end() {
        let mut ring = ArrayRing::<u32, 8>::new();
        let (mut tx, mut rx) = ring.split();
        let mut out = [0; 8];
        let mut next = 0u32;
        let mut expect = 0u32;
        for round in 0..50usize {
            let batch: [u32; 5] = core::array::from_fn(|i| next + i as u32);
            let pushed = tx.push_slice(&batch[..1 + round % 5]);
            next += pushed as u32;
            let popped = rx.pop_slice(&mut out[..1 + round % 3]);
            for v in &out[..popped] {
                assert_eq!(*v, expect);
                expect += 1;
            }
        }
        while let Some(v) = rx.try_pop() {
            assert_eq!(v, expect);
            expect += 1;
        }
        assert_eq!(expect, next);
    }

    #[test]
    fn caller_storage_must_be_a_power_of_two() {
        let mut slots: [Slot<u8>; 6] = Slot::array();
        assert_eq!(
            Ring::with_storage(&mut slots[..]).err(),
            Some(CapacityError { len: 6 })
        );
        let mut ring = Ring::with_storage(&mut slots[..4]).unwrap();
        assert_eq!(ring.capacity(), 4);
        let (mut tx, mut rx) = ring.split();
        assert_eq!(tx.push_iter(&mut (0..10)), 4);
        assert_eq!(rx.peek(), Some(&0));
        assert_eq!(rx.len(), 4);
    }

    #[test]
    fn try_split_succeeds_once() {
        let ring = ArrayRing::<u8, 2>::new();
        assert!(Ring::try_split(&ring).is_some());
        assert!(Ring::try_split(&ring).is_none());
    }
}
