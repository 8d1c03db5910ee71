//! The hash of series keys: XXH3-64 with a seed.
//!
//! XXH3 is specified and stable: the same key and seed give the same 64 bits
//! on every platform, endianness and version. That matters beyond speed:
//! workers shard series by it, and sketches hash their items with it, so two
//! gateways (or a gateway before and after an upgrade) must agree on it for
//! their sketches to merge upstream.

/// The seed used when the configuration names none.
pub const DEFAULT_SEED: u64 = 0;

/// The 64-bit XXH3 hash of `bytes` with `seed`.
///
/// ```
/// use sluice_core::hash::hash64;
///
/// assert_eq!(hash64(b"s-0042/temperature", 7), hash64(b"s-0042/temperature", 7));
/// assert_ne!(hash64(b"s-0042/temperature", 7), hash64(b"s-0042/temperature", 8));
/// ```
#[inline]
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

/// Maps a hash to one of `n` shards (Lemire's multiply-shift: uniform, no
/// division). `n` must be non-zero; `shard_of(h, 0)` returns 0.
///
/// ```
/// use sluice_core::hash::{hash64, shard_of};
///
/// let shard = shard_of(hash64(b"s-0001", 0), 3);
/// assert!(shard < 3);
/// ```
#[inline]
pub fn shard_of(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

/// Hashes series keys with a fixed seed, for sharding and sketches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesHasher {
    seed: u64,
}

impl Default for SeriesHasher {
    fn default() -> Self {
        Self::new(DEFAULT_SEED)
    }
}

impl SeriesHasher {
    /// A hasher with `seed`.
    pub const fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The seed.
    pub const fn seed(&self) -> u64 {
        self.seed
    }

    /// The hash of a series key.
    #[inline]
    pub fn hash(&self, key: &[u8]) -> u64 {
        hash64(key, self.seed)
    }

    /// The shard (of `n`) that owns a series key.
    #[inline]
    pub fn shard(&self, key: &[u8], n: usize) -> usize {
        shard_of(self.hash(key), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_xxh3_reference_vectors() {
        // From the xxHash repository's sanity tests (XXH3_64bits_withSeed of
        // the empty input).
        assert_eq!(hash64(b"", 0), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    #[cfg_attr(miri, ignore = "statistical test of safe code; slow under Miri")]
    fn shards_spread_evenly() {
        let mut counts = [0u32; 4];
        for i in 0..40_000u32 {
            counts[shard_of(hash64(&i.to_le_bytes(), 1), 4)] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }
}
