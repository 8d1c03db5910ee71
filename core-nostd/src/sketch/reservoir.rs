//! Reservoir sampling: a uniform sample of `k` items from a stream of unknown
//! length, in `k` slots.
//!
//! After `n ≥ k` items every item is in the sample with probability `k/n`,
//! and every `k`-subset is equally likely. Two algorithms fill it:
//!
//! * **Algorithm L** (Li, 1994), the default: draws how many items to *skip*
//!   before the next replacement, so it spends `O(k(1 + log(n/k)))` random
//!   numbers instead of one per item; the cost per item is a compare.
//! * **Algorithm R** (Vitter, 1985): one random number per item. Used after a
//!   merge, whose result L's skip state cannot describe.
//!
//! A merge draws how many of the `k` slots come from each side from the
//! hypergeometric distribution (a uniform `k`-subset of the union has that many
//! from each side), then takes that many at random from each sample.
//!
//! The seed only drives the generator: reservoirs to be merged need not
//! share it, and must not. Two shards seeded alike skip the same numbers of
//! items, so they sample the same positions of their streams and their
//! samples are not independent; give each reservoir its own seed (for
//! example from the shard, series and window it samples).
//!
//! **Memory**: `k` items plus a few words.

use super::SketchError;
use super::wire::{Reader, Writer, check_storage, family};
use crate::rng::SplitMix64;

/// How a reservoir decides which items to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Algorithm L: replace at item number `next`; `w` is its running weight.
    L { next: u64, w: f64 },
    /// Algorithm R.
    R,
}

/// An item a reservoir can serialize: fixed-size little-endian bytes.
pub trait SampleItem: Copy + Default {
    /// Bytes per item.
    const SIZE: usize;
    /// Writes the item's `SIZE` bytes.
    fn to_bytes(&self, out: &mut [u8]);
    /// Reads an item from `SIZE` bytes; `None` if they are not a valid item.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

macro_rules! sample_item {
    ($($t:ty),*) => {$(
        impl SampleItem for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            fn to_bytes(&self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn from_bytes(bytes: &[u8]) -> Option<Self> {
                Some(<$t>::from_le_bytes(bytes.try_into().ok()?))
            }
        }
    )*};
}
sample_item!(u32, u64, i64, f64);

/// A uniform sample of up to `k` items, `k` being the storage length.
///
/// ```
/// use sluice_core::sketch::Reservoir;
///
/// let mut r = Reservoir::new([0u64; 8], 1).unwrap();
/// for i in 0..1_000u64 {
///     r.offer(i);
/// }
/// assert_eq!(r.sample().len(), 8);
/// assert_eq!(r.seen(), 1_000);
/// ```
#[derive(Clone)]
pub struct Reservoir<T, S> {
    items: S,
    seen: u64,
    rng: SplitMix64,
    seed: u64,
    mode: Mode,
    _item: core::marker::PhantomData<T>,
}

impl<T: Copy, S: AsRef<[T]> + AsMut<[T]>> Reservoir<T, S> {
    /// An empty reservoir of `storage.len()` slots using Algorithm L, with a
    /// generator seeded by `seed`.
    pub fn new(storage: S, seed: u64) -> Result<Self, SketchError> {
        let mut r = Self::algorithm_r(storage, seed)?;
        r.mode = Mode::L { next: 0, w: 1.0 };
        Ok(r)
    }

    /// An empty reservoir using Algorithm R.
    pub fn algorithm_r(storage: S, seed: u64) -> Result<Self, SketchError> {
        if storage.as_ref().is_empty() {
            return Err(SketchError::BadParameters(
                "reservoir needs at least one slot",
            ));
        }
        Ok(Self {
            items: storage,
            seen: 0,
            rng: SplitMix64::new(seed),
            seed,
            mode: Mode::R,
            _item: core::marker::PhantomData,
        })
    }

    /// The capacity `k`.
    pub fn capacity(&self) -> usize {
        self.items.as_ref().len()
    }

    /// Items offered so far (`n`).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The sample: all items while fewer than `k` were offered, else `k`.
    pub fn sample(&self) -> &[T] {
        &self.items.as_ref()[..self.filled()]
    }

    fn filled(&self) -> usize {
        self.seen.min(self.capacity() as u64) as usize
    }

    /// A uniform float in (0, 1): never 0, so its logarithm is finite.
    fn open_unit(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Algorithm L's next gap: how many items to pass over before the next
    /// replacement, plus one.
    fn draw_gap(&mut self, w: f64) -> u64 {
        let u = self.open_unit();
        let gap = libm::floor(libm::log(u) / libm::log1p(-w));
        // A huge gap (w tiny) saturates rather than overflowing.
        if gap.is_finite() && gap < 1e18 {
            gap as u64 + 1
        } else {
            u64::MAX / 2
        }
    }

    fn next_weight(&mut self, w: f64) -> f64 {
        let u = self.open_unit();
        w * libm::exp(libm::log(u) / self.capacity() as f64)
    }

    /// Offers one item.
    #[inline]
    pub fn offer(&mut self, item: T) {
        let k = self.capacity() as u64;
        self.seen += 1;
        let n = self.seen;
        if n <= k {
            self.items.as_mut()[(n - 1) as usize] = item;
            if n == k
                && let Mode::L { .. } = self.mode
            {
                let w = self.next_weight(1.0);
                let next = k.saturating_add(self.draw_gap(w));
                self.mode = Mode::L { next, w };
            }
            return;
        }
        match self.mode {
            Mode::L { next, w } => {
                if n == next {
                    let slot = self.rng.below(k) as usize;
                    self.items.as_mut()[slot] = item;
                    let w = self.next_weight(w);
                    let next = n.saturating_add(self.draw_gap(w));
                    self.mode = Mode::L { next, w };
                }
            }
            Mode::R => {
                let j = self.rng.below(n);
                if j < k {
                    self.items.as_mut()[j as usize] = item;
                }
            }
        }
    }

    /// Replaces this sample with a uniform sample of the union of both
    /// streams. Capacities must match; seeds should differ (see the module
    /// docs). Later offers use Algorithm R.
    pub fn merge<U: AsRef<[T]>>(&mut self, other: &Reservoir<T, U>) -> Result<(), SketchError> {
        if self.capacity() != other.items.as_ref().len() {
            return Err(SketchError::Incompatible("different reservoir capacities"));
        }
        let k = self.capacity();
        let (n1, n2) = (self.seen, other.seen);
        let other_filled = n2.min(k as u64) as usize;
        let other_items = &other.items.as_ref()[..other_filled];
        // Draw k (or n1 + n2, if fewer) items without replacement from a
        // population of n1 "ours" and n2 "theirs": x of them are ours.
        let draws = (k as u64).min(n1 + n2);
        let (mut ours_left, mut theirs_left) = (n1, n2);
        let mut x = 0usize;
        for _ in 0..draws {
            if self.rng.below(ours_left + theirs_left) < ours_left {
                ours_left -= 1;
                x += 1;
            } else {
                theirs_left -= 1;
            }
        }
        let y = draws as usize - x;
        // Keep a uniform x-subset of our sample in slots 0..x (partial
        // Fisher–Yates), then fill x..x+y with a uniform y-subset of theirs.
        let filled = self.filled();
        for i in 0..x {
            let j = i + self.rng.below((filled - i) as u64) as usize;
            self.items.as_mut().swap(i, j);
        }
        // A uniform y-subset of theirs by selection sampling (Knuth's
        // Algorithm S): keep item i with probability needed / remaining.
        let mut chosen = 0usize;
        let mut remaining = other_filled;
        for (i, item) in other_items.iter().enumerate() {
            let needed = y - chosen;
            if needed == 0 {
                break;
            }
            if (self.rng.below(remaining as u64) as usize) < needed {
                self.items.as_mut()[x + chosen] = *item;
                chosen += 1;
            }
            remaining = other_filled - i - 1;
        }
        self.seen = n1 + n2;
        self.mode = Mode::R;
        Ok(())
    }
}

impl<T: SampleItem, S: AsRef<[T]> + AsMut<[T]>> Reservoir<T, S> {
    fn body_len(&self) -> usize {
        4 + 4 + 8 + 8 + self.filled() * T::SIZE
    }

    /// Bytes [`Self::write_to`] writes.
    pub fn serialized_len(&self) -> usize {
        super::wire::framed_len(self.body_len())
    }

    /// Serializes the sample and its stream length into `buf`. (The random
    /// generator's state is written too, so a restored reservoir continues
    /// the same sequence.)
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, SketchError> {
        let capacity = u32::try_from(self.capacity())
            .map_err(|_| SketchError::BadParameters("reservoir too large to serialize"))?;
        let mut w = Writer::start(buf, family::RESERVOIR, self.seed, self.body_len())?;
        w.u32(capacity);
        w.u32(T::SIZE as u32);
        w.u64(self.seen);
        w.u64(self.rng.state());
        for item in self.sample() {
            item.to_bytes(w.next(T::SIZE));
        }
        Ok(w.finish())
    }

    /// Reads a reservoir written by [`Self::write_to`] into `storage`, which
    /// must have its capacity. It continues with Algorithm R.
    pub fn read_from(bytes: &[u8], mut storage: S) -> Result<Self, SketchError> {
        let mut r = Reader::open(bytes, family::RESERVOIR)?;
        let capacity = r.u32()? as usize;
        if r.u32()? as usize != T::SIZE {
            return Err(SketchError::Incompatible("different reservoir item size"));
        }
        let seen = r.u64()?;
        let state = r.u64()?;
        if capacity == 0 {
            return Err(SketchError::Corrupt("reservoir capacity is zero"));
        }
        check_storage(capacity, storage.as_ref().len())?;
        let filled = seen.min(capacity as u64) as usize;
        if r.remaining() != filled * T::SIZE {
            return Err(SketchError::Corrupt("reservoir body length"));
        }
        for slot in &mut storage.as_mut()[..filled] {
            *slot =
                T::from_bytes(r.bytes(T::SIZE)?).ok_or(SketchError::Corrupt("reservoir item"))?;
        }
        let seed = r.seed;
        r.finish()?;
        Ok(Self {
            items: storage,
            seen,
            rng: SplitMix64::new(state),
            seed,
            mode: Mode::R,
            _item: core::marker::PhantomData,
        })
    }
}
