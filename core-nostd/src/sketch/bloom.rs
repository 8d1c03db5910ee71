//! Bloom filter: set membership in `m` bits with no false negatives.
//!
//! Sized from the expected number of items `n` and the false-positive rate
//! `p`: `m = −n·ln p / (ln 2)²` bits and `k = (m/n)·ln 2` hash functions, which
//! minimises the false-positive rate for that memory. The `k` bit positions
//! come from one 64-bit hash by double hashing (Kirsch and Mitzenmacher, 2006),
//! which keeps the same asymptotic rate. The current false-positive rate is
//! estimated from the fraction of bits set, `(set/m)^k`, so a filter fed more
//! than `n` items reports how much worse it has become.
//!
//! **Memory**: `m/8` bytes (n = 10,000 at p = 1 %: 95,851 bits, 11.7 KiB).

use super::wire::{Reader, Writer, check_storage, family};
use super::{SketchError, hash_item};
use crate::hash::shard_of;

/// The answer of [`BloomFilter::contains`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// The item may have been inserted (or this is a false positive).
    Maybe,
    /// The item was certainly never inserted.
    DefinitelyNot,
}

/// A Bloom filter over 64-bit words in `S`.
///
/// ```
/// use sluice_core::sketch::{BloomFilter, Membership};
///
/// let words = BloomFilter::<()>::words_for(1_000, 0.01);
/// let mut f = BloomFilter::with_storage(vec![0u64; words], 1_000, 3).unwrap();
/// f.insert(b"s-0042");
/// assert_eq!(f.contains(b"s-0042"), Membership::Maybe);
/// assert_eq!(f.contains(b"s-9999"), Membership::DefinitelyNot);
/// ```
#[derive(Clone)]
pub struct BloomFilter<S> {
    words: S,
    hashes: u32,
    seed: u64,
}

impl<S> BloomFilter<S> {
    /// 64-bit words for `items` at false-positive rate `p`:
    /// ⌈−n·ln p / (ln 2)² / 64⌉ (at least 1).
    pub fn words_for(items: u64, p: f64) -> usize {
        let ln2 = core::f64::consts::LN_2;
        let bits = -(items.max(1) as f64) * libm::log(p.clamp(1e-12, 0.5)) / (ln2 * ln2);
        (libm::ceil(bits / 64.0) as usize).max(1)
    }
}

impl<S: AsRef<[u64]> + AsMut<[u64]>> BloomFilter<S> {
    /// An empty filter over caller storage (zeroed here), with the number of
    /// hash functions that is optimal for `expected_items` in its size.
    pub fn with_storage(storage: S, expected_items: u64, seed: u64) -> Result<Self, SketchError> {
        let bits = 64.0 * storage.as_ref().len() as f64;
        let k = libm::round(bits / expected_items.max(1) as f64 * core::f64::consts::LN_2);
        Self::with_hashes(storage, k.clamp(1.0, 32.0) as u32, seed)
    }

    /// An empty filter over caller storage (zeroed here) with `hashes` hash
    /// functions (1 to 32).
    pub fn with_hashes(mut storage: S, hashes: u32, seed: u64) -> Result<Self, SketchError> {
        if storage.as_ref().is_empty() {
            return Err(SketchError::BadParameters(
                "Bloom filter needs at least one word",
            ));
        }
        if !(1..=32).contains(&hashes) {
            return Err(SketchError::BadParameters(
                "Bloom filter needs 1 to 32 hashes",
            ));
        }
        storage.as_mut().fill(0);
        Ok(Self {
            words: storage,
            hashes,
            seed,
        })
    }

    fn bits(&self) -> u64 {
        64 * self.words.as_ref().len() as u64
    }

    /// The bit positions of `hash`.
    #[inline(always)]
    fn positions(&self, hash: u64) -> impl Iterator<Item = usize> + use<S> {
        let bits = self.bits() as usize;
        let h2 = hash.rotate_left(32) | 1;
        (0..u64::from(self.hashes))
            .map(move |i| shard_of(hash.wrapping_add(i.wrapping_mul(h2)), bits))
    }

    /// Adds an item.
    #[inline]
    pub fn insert(&mut self, item: &[u8]) {
        self.insert_hash(hash_item(item, self.seed));
    }

    /// Adds an item by its hash (see [`crate::hash::hash64`]).
    #[inline]
    pub fn insert_hash(&mut self, hash: u64) {
        for bit in self.positions(hash) {
            self.words.as_mut()[bit / 64] |= 1 << (bit % 64);
        }
    }

    /// Whether an item may have been inserted.
    #[inline]
    pub fn contains(&self, item: &[u8]) -> Membership {
        self.contains_hash(hash_item(item, self.seed))
    }

    /// [`Self::contains`] by hash.
    #[inline]
    pub fn contains_hash(&self, hash: u64) -> Membership {
        let words = self.words.as_ref();
        if self
            .positions(hash)
            .all(|bit| words[bit / 64] & (1 << (bit % 64)) != 0)
        {
            Membership::Maybe
        } else {
            Membership::DefinitelyNot
        }
    }

    /// The false-positive rate now, estimated from the bits set: `(set/m)^k`.
    pub fn estimated_fpr(&self) -> f64 {
        let set: u64 = self
            .words
            .as_ref()
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        libm::pow(set as f64 / self.bits() as f64, f64::from(self.hashes))
    }

    /// The number of hash functions, `k`.
    pub fn hashes(&self) -> u32 {
        self.hashes
    }

    /// Bytes of memory the filter uses.
    pub fn memory_bytes(&self) -> usize {
        super::footprint(self, self.words.as_ref())
    }

    /// Adds every item of `other` (bitwise OR). Size, hashes and seed must match.
    pub fn merge<T: AsRef<[u64]>>(&mut self, other: &BloomFilter<T>) -> Result<(), SketchError> {
        if self.words.as_ref().len() != other.words.as_ref().len() || self.hashes != other.hashes {
            return Err(SketchError::Incompatible(
                "different Bloom filter sizes or hash counts",
            ));
        }
        if self.seed != other.seed {
            return Err(SketchError::Incompatible("different hash seeds"));
        }
        for (a, b) in self.words.as_mut().iter_mut().zip(other.words.as_ref()) {
            *a |= *b;
        }
        Ok(())
    }

    fn body_len(&self) -> usize {
        4 + 4 + 8 * self.words.as_ref().len()
    }

    /// Bytes [`Self::write_to`] writes.
    pub fn serialized_len(&self) -> usize {
        super::wire::framed_len(self.body_len())
    }

    /// Serializes into `buf`; returns the bytes written.
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, SketchError> {
        let words = u32::try_from(self.words.as_ref().len())
            .map_err(|_| SketchError::BadParameters("Bloom filter too large to serialize"))?;
        let mut w = Writer::start(buf, family::BLOOM, self.seed, self.body_len())?;
        w.u32(words);
        w.u32(self.hashes);
        for &word in self.words.as_ref() {
            w.u64(word);
        }
        Ok(w.finish())
    }

    /// Reads a filter written by [`Self::write_to`] into `storage`, which must
    /// hold as many words as the filter.
    pub fn read_from(bytes: &[u8], mut storage: S) -> Result<Self, SketchError> {
        let mut r = Reader::open(bytes, family::BLOOM)?;
        let words = r.u32()? as usize;
        let hashes = r.u32()?;
        if words == 0 || !(1..=32).contains(&hashes) {
            return Err(SketchError::Corrupt("Bloom filter parameters out of range"));
        }
        check_storage(words, storage.as_ref().len())?;
        if r.remaining() != 8 * words {
            return Err(SketchError::Corrupt("Bloom filter body length"));
        }
        for word in storage.as_mut() {
            *word = r.u64()?;
        }
        let seed = r.seed;
        r.finish()?;
        Ok(Self {
            words: storage,
            hashes,
            seed,
        })
    }
}
