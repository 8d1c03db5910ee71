//! Count-Min: approximate frequencies in `width × depth` counters.
//!
//! Each of `depth` rows hashes an item to one of `width` counters and adds
//! its count there; a point query takes the smallest of the item's counters.
//! Collisions only ever add, so the answer never underestimates, and with
//! `width = ⌈e/ε⌉` and `depth = ⌈ln(1/δ)⌉` it overestimates by more than
//! `ε·N` (N = total count) with probability at most `δ` (Cormode and
//! Muthukrishnan, 2005). *Conservative update* raises only the counters that
//! are below the new minimum, which keeps the same bound and is much tighter
//! on skewed streams, but cannot handle negative counts.
//!
//! **Memory**: `8·width·depth` bytes (ε = 1 %, δ = 1 %: 272 × 5, 10.6 KiB).

use super::wire::{Reader, Writer, check_storage, family};
use super::{SketchError, hash_item};
use crate::hash::shard_of;

/// Spreads the rows' salts over the 64 bits (the golden ratio's odd
/// constant).
const ROW_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

/// MurmurHash3's 64-bit finalizer: a bijection in which every input bit
/// affects every output bit.
#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The update byte in the serialized form: bit 0 conservative update,
/// bit 1 set when the rows are hashed independently (every sketch this
/// build writes). A sketch without bit 1 was written before, with double
/// hashing: its counters are in other places, so it is refused.
const INDEPENDENT_ROWS: u8 = 2;

/// A Count-Min sketch over counters in `S` (`width × depth`, row-major).
///
/// ```
/// use sluice_core::sketch::CountMin;
///
/// let (w, d) = (CountMin::<()>::width_for(0.01), CountMin::<()>::depth_for(0.01));
/// let mut cm = CountMin::with_storage(vec![0u64; w * d], w, d, 42, true).unwrap();
/// for i in 0..1000u32 {
///     cm.add(&(i % 10).to_le_bytes(), 1);
/// }
/// let n = cm.estimate(&3u32.to_le_bytes());
/// assert!(n >= 100 && n as f64 <= 100.0 + cm.error_bound());
/// ```
#[derive(Clone)]
pub struct CountMin<S> {
    counters: S,
    width: usize,
    depth: usize,
    seed: u64,
    total: u64,
    conservative: bool,
}

impl<S> CountMin<S> {
    /// The width for additive error ε·N: ⌈e/ε⌉.
    pub const fn width_for(epsilon: f64) -> usize {
        let w = core::f64::consts::E / epsilon;
        let floor = w as usize;
        if (floor as f64) < w { floor + 1 } else { floor }
    }

    /// The depth for failure probability δ: ⌈ln(1/δ)⌉ (at least 1).
    pub const fn depth_for(delta: f64) -> usize {
        let mut depth = 1;
        let mut p = 1.0 / core::f64::consts::E;
        while p > delta && depth < 64 {
            p /= core::f64::consts::E;
            depth += 1;
        }
        depth
    }
}

impl<S: AsRef<[u64]> + AsMut<[u64]>> CountMin<S> {
    /// An empty sketch over caller storage of `width × depth` counters (zeroed
    /// here); `conservative` selects conservative update.
    pub fn with_storage(
        mut storage: S,
        width: usize,
        depth: usize,
        seed: u64,
        conservative: bool,
    ) -> Result<Self, SketchError> {
        if width == 0 || depth == 0 || depth > 64 || u32::try_from(width).is_err() {
            return Err(SketchError::BadParameters(
                "Count-Min width must be 1..2^32 and depth 1..=64",
            ));
        }
        check_storage(width * depth, storage.as_ref().len())?;
        storage.as_mut().fill(0);
        Ok(Self {
            counters: storage,
            width,
            depth,
            seed,
            total: 0,
            conservative,
        })
    }

    /// The counter of `hash` in `row`: the item's hash mixed with the row's
    /// own constant by a bijective 64-bit finalizer, so that the rows of two
    /// items with different hashes are independent. (Double hashing,
    /// `h1 + row·h2`, made two items that met in two rows meet in every
    /// row, so a heavy item could shadow a query in all of them far more
    /// often than δ.)
    #[inline(always)]
    fn cell(&self, hash: u64, row: usize) -> usize {
        let salt = ROW_SALT.wrapping_mul(row as u64 + 1);
        row * self.width + shard_of(fmix64(hash ^ salt), self.width)
    }

    /// Adds `count` occurrences of an item.
    #[inline]
    pub fn add(&mut self, item: &[u8], count: u64) {
        self.add_hash(hash_item(item, self.seed), count);
    }

    /// Adds `count` occurrences of an item by its hash (see
    /// [`crate::hash::hash64`]; use this sketch's seed).
    #[inline]
    pub fn add_hash(&mut self, hash: u64, count: u64) {
        self.total = self.total.saturating_add(count);
        if self.conservative {
            let target = self.estimate_hash(hash).saturating_add(count);
            for row in 0..self.depth {
                let i = self.cell(hash, row);
                let c = &mut self.counters.as_mut()[i];
                *c = (*c).max(target);
            }
        } else {
            for row in 0..self.depth {
                let i = self.cell(hash, row);
                let c = &mut self.counters.as_mut()[i];
                *c = c.saturating_add(count);
            }
        }
    }

    /// The estimated count of an item: never below the truth, and above it by
    /// more than [`Self::error_bound`] with probability at most `δ`.
    #[inline]
    pub fn estimate(&self, item: &[u8]) -> u64 {
        self.estimate_hash(hash_item(item, self.seed))
    }

    /// [`Self::estimate`] by hash.
    #[inline]
    pub fn estimate_hash(&self, hash: u64) -> u64 {
        let counters = self.counters.as_ref();
        (0..self.depth)
            .map(|row| counters[self.cell(hash, row)])
            .min()
            .unwrap_or(0)
    }

    /// ε = e / width.
    pub fn epsilon(&self) -> f64 {
        core::f64::consts::E / self.width as f64
    }

    /// δ = e^(−depth).
    pub fn delta(&self) -> f64 {
        libm::exp(-(self.depth as f64))
    }

    /// The additive error bound ε·N for the current total N.
    pub fn error_bound(&self) -> f64 {
        self.epsilon() * self.total as f64
    }

    /// The total of all counts added.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Counters per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Bytes of memory the sketch uses.
    pub fn memory_bytes(&self) -> usize {
        super::footprint(self, self.counters.as_ref())
    }

    /// Adds everything `other` has counted. Width, depth and seed must match.
    /// (Merging conservative sketches by addition keeps the upper bound.)
    pub fn merge<T: AsRef<[u64]>>(&mut self, other: &CountMin<T>) -> Result<(), SketchError> {
        if (self.width, self.depth) != (other.width, other.depth) {
            return Err(SketchError::Incompatible("different Count-Min dimensions"));
        }
        if self.seed != other.seed {
            return Err(SketchError::Incompatible("different hash seeds"));
        }
        for (a, b) in self
            .counters
            .as_mut()
            .iter_mut()
            .zip(other.counters.as_ref())
        {
            *a = a.saturating_add(*b);
        }
        self.total = self.total.saturating_add(other.total);
        Ok(())
    }

    fn body_len(&self) -> usize {
        4 + 4 + 1 + 8 + 8 * self.counters.as_ref().len()
    }

    /// Bytes [`Self::write_to`] writes.
    pub fn serialized_len(&self) -> usize {
        super::wire::framed_len(self.body_len())
    }

    /// Serializes into `buf`; returns the bytes written.
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, SketchError> {
        let mut w = Writer::start(buf, family::COUNT_MIN, self.seed, self.body_len())?;
        w.u32(self.width as u32);
        w.u32(self.depth as u32);
        w.u8(u8::from(self.conservative) | INDEPENDENT_ROWS);
        w.u64(self.total);
        for &c in self.counters.as_ref() {
            w.u64(c);
        }
        Ok(w.finish())
    }

    /// The storage (`width × depth` counters) that [`Self::read_from`]
    /// needs for the sketch serialized in `bytes`, read from its header (and
    /// never more than `bytes` can hold).
    pub fn storage_len(bytes: &[u8]) -> Result<usize, SketchError> {
        let mut r = Reader::open(bytes, family::COUNT_MIN)?;
        let (width, depth) = (r.u32()? as usize, r.u32()? as usize);
        width
            .checked_mul(depth)
            .filter(|&cells| cells > 0 && cells.saturating_mul(8) <= bytes.len())
            .ok_or(SketchError::Corrupt("Count-Min dimensions out of range"))
    }

    /// Reads a sketch written by [`Self::write_to`] into `storage`, which must
    /// hold `width × depth` counters.
    pub fn read_from(bytes: &[u8], mut storage: S) -> Result<Self, SketchError> {
        let mut r = Reader::open(bytes, family::COUNT_MIN)?;
        let width = r.u32()? as usize;
        let depth = r.u32()? as usize;
        let conservative = match r.u8()? {
            0 | 1 => {
                return Err(SketchError::Incompatible(
                    "a Count-Min written by Sluice 0.1 (double-hashed rows)",
                ));
            }
            INDEPENDENT_ROWS => false,
            b if b == INDEPENDENT_ROWS | 1 => true,
            _ => return Err(SketchError::Corrupt("Count-Min update byte")),
        };
        let total = r.u64()?;
        if width == 0 || depth == 0 || depth > 64 {
            return Err(SketchError::Corrupt("Count-Min dimensions out of range"));
        }
        let cells = width
            .checked_mul(depth)
            .ok_or(SketchError::Corrupt("Count-Min dimensions overflow"))?;
        check_storage(cells, storage.as_ref().len())?;
        if r.remaining() != 8 * cells {
            return Err(SketchError::Corrupt("Count-Min body length"));
        }
        let counters = storage.as_mut();
        for c in counters.iter_mut() {
            *c = r.u64()?;
        }
        // No row can hold more than was added.
        if counters
            .chunks(width)
            .any(|row| row.iter().fold(0u64, |s, &c| s.saturating_add(c)) > total)
        {
            return Err(SketchError::Corrupt("Count-Min row sums exceed the total"));
        }
        let seed = r.seed;
        r.finish()?;
        Ok(Self {
            counters: storage,
            width,
            depth,
            seed,
            total,
            conservative,
        })
    }
}
