//! Fixed-memory, mergeable sketches.
//!
//! | sketch | answers | guarantee |
//! | --- | --- | --- |
//! | [`HyperLogLog`] | how many distinct items | nearly exact up to 3m/32 items, then relative standard error ≈ 0.83/√m (1.04/√m after a merge) |
//! | [`CountMin`] | how often an item occurred | overestimate ≤ ε·N with probability 1 − δ |
//! | [`BloomFilter`] | was an item seen | no false negatives; false positives ≈ p |
//! | [`Reservoir`] | a uniform sample of k items | every item equally likely |
//! | [`SpaceSaving`] | the most frequent items | count overestimate ≤ N/k; every item above N/k kept |
//! | [`DdSketch`] | quantiles | relative value error ≤ α |
//!
//! Every sketch keeps its state in storage whose size is fixed when it is
//! built: an array (sized by a const, for `static`s and embedded targets) or
//! any `AsRef<[T]> + AsMut<[T]>` the caller provides (a slice, or a `Vec` in
//! std code whose size comes from configuration). Nothing allocates.
//!
//! Every sketch merges with a compatible one (same parameters, and for the
//! sketches that hash items the same seed; anything else is
//! [`SketchError::Incompatible`]; reservoirs, whose seed only drives their
//! generator, need different seeds) and serializes to bytes in
//! the format below, which is what gateways forward upstream to be merged;
//! the [`HyperLogLog`] instead writes and reads the Apache DataSketches HLL
//! format (see [`hll`]), so that any DataSketches library merges it.
//!
//! # Serialized format (version 1, little-endian)
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | magic `SLSK` |
//! | 1 | family (2 Count-Min, 3 Bloom, 4 reservoir, 5 Space-Saving, 6 DDSketch) |
//! | 1 | format version (1) |
//! | 2 | reserved, zero |
//! | 8 | hash seed |
//! | 4 | length of the body that follows |
//! | … | body: the family's parameters, then its state |
//! | 4 | checksum: low 32 bits of XXH3-64 (seed 0) of everything before it |
//!
//! Reading checks the magic, family, version, lengths, checksum and every
//! parameter before it trusts a byte, and reports what is wrong as a
//! [`SketchError`]: foreign, truncated or corrupted bytes never panic.

mod bloom;
mod countmin;
mod ddsketch;
pub mod hll;
mod reservoir;
mod spacesaving;
mod wire;

pub use bloom::{BloomFilter, Membership};
pub use countmin::CountMin;
pub use ddsketch::{DdSketch, QuantileAnswer};
pub use hll::HyperLogLog;
pub use reservoir::{Reservoir, SampleItem};
pub use spacesaving::{Counter, SpaceSaving};

/// What went wrong building, merging or reading a sketch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SketchError {
    /// The parameters are outside what the sketch supports.
    BadParameters(&'static str),
    /// The two sketches have different parameters or seeds.
    Incompatible(&'static str),
    /// The output buffer is too small; `needed` bytes are required.
    BufferTooSmall {
        /// Bytes the serialized sketch takes.
        needed: usize,
    },
    /// The bytes do not start with the sketch magic.
    NotASketch,
    /// The bytes hold a different kind of sketch.
    WrongFamily {
        /// The family this reader wants.
        expected: u8,
        /// The family in the bytes.
        found: u8,
    },
    /// The bytes were written by a format version this build does not read.
    UnsupportedVersion(u8),
    /// The bytes are truncated, fail the checksum, or hold impossible values.
    Corrupt(&'static str),
    /// The storage given to hold the sketch has the wrong size.
    StorageMismatch {
        /// Elements the sketch in the bytes needs.
        needed: usize,
        /// Elements the storage has.
        got: usize,
    },
}

impl core::fmt::Display for SketchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SketchError::BadParameters(why) => write!(f, "bad sketch parameters: {why}"),
            SketchError::Incompatible(why) => write!(f, "sketches cannot be merged: {why}"),
            SketchError::BufferTooSmall { needed } => {
                write!(f, "buffer too small: the sketch needs {needed} bytes")
            }
            SketchError::NotASketch => f.write_str("bytes are not a Sluice sketch (bad magic)"),
            SketchError::WrongFamily { expected, found } => {
                write!(f, "sketch family {found} where {expected} was expected")
            }
            SketchError::UnsupportedVersion(v) => {
                write!(f, "unsupported sketch format version {v}")
            }
            SketchError::Corrupt(why) => write!(f, "corrupt sketch: {why}"),
            SketchError::StorageMismatch { needed, got } => {
                write!(f, "sketch needs storage of {needed} elements, got {got}")
            }
        }
    }
}

impl core::error::Error for SketchError {}

/// The memory a sketch `this` uses whose state lives in `storage`: the
/// struct itself, plus the storage when it lies outside the struct (a `Vec`
/// or a borrowed slice). An inline array is already part of the struct and
/// counts once.
pub(crate) fn footprint<T, E>(this: &T, storage: &[E]) -> usize {
    let size = core::mem::size_of::<T>();
    let start = this as *const T as usize;
    let data = storage.as_ptr() as usize;
    if (start..start + size).contains(&data) {
        size
    } else {
        size + core::mem::size_of_val(storage)
    }
}

/// Hashes an item (any bytes) for a sketch with `seed`.
#[inline(always)]
pub(crate) fn hash_item(item: &[u8], seed: u64) -> u64 {
    crate::hash::hash64(item, seed)
}
