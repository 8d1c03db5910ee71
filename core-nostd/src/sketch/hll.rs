//! HyperLogLog: distinct counting in fixed memory, in the Apache
//! DataSketches HLL layout, so that what a gateway counts merges with what
//! any DataSketches library (Java, C++, Python, Rust; Druid, Pinot, Spark)
//! counts.
//!
//! **Hashing** is DataSketches': an item's bytes go through MurmurHash3
//! x64-128 with seed 9001; the low 64 bits pick one of `m = 2^p` registers
//! and the leading zeros of the high 64 bits (plus one, at most 63) are the
//! value the register keeps the maximum of. An item given as bytes here and
//! as the same bytes (a UTF-8 string, a little-endian integer) to
//! DataSketches lands in the same register with the same value.
//!
//! **Sparse, then dense.** Up to `3·m/32` distinct items the sketch keeps
//! their coupons (26 bits of register address and the value) in a hash
//! table and counts them nearly exactly (the only error is two items sharing
//! a coupon; DataSketches' correction table for that is used). Past that it
//! turns into `m` registers.
//!
//! **Estimators.** A sketch fed only items uses the HIP (historic inverse
//! probability) estimator: every time a register grows, the estimate grows
//! by the inverse of the probability that the item would have changed a
//! register, a running sum that is unbiased with a relative standard error
//! of ≈ 0.8326/√m (p = 12, 4,096 registers: 1.30 %). A sketch that took a
//! merge has lost that history and uses Ertl's improved estimator on its
//! registers (O. Ertl, *New cardinality estimation algorithms for
//! HyperLogLog sketches*, 2017): ≈ 1.04/√m, unbiased from 0 to beyond 2^60
//! items. A merge into an empty sketch copies the other one, history and
//! all.
//!
//! **Memory**: `m` register bytes and the sparse table of `m/2` bytes, in
//! the storage the caller gives (`3·m/2` bytes; [`storage_bytes`]).
//! **Serialized**: the DataSketches HLL format ([`HyperLogLog::write_to`]):
//! a LIST or SET of coupons while sparse, else `HLL_4` (4-bit registers
//! above the smallest, with exceptions): 40 + `m/2` bytes and four per
//! exception (p = 12: about 2,090 bytes).

use super::SketchError;

/// Fewest registers supported (p = 8: 6.5 % error).
pub const MIN_REGISTERS: usize = 1 << 8;
/// Most registers supported (p = 18: 0.16 % error).
pub const MAX_REGISTERS: usize = 1 << 18;
/// DataSketches' hash seed for HLL sketches.
pub const DATASKETCHES_SEED: u32 = 9001;

/// Bytes of storage a sketch of `registers` registers takes: the registers
/// and the sparse table (`3·m/2`).
pub const fn storage_bytes(registers: usize) -> usize {
    registers + registers / 2
}

/// The largest register value (DataSketches caps leading zeros at 62).
const MAX_VALUE: u8 = 63;
/// Low bits of a coupon holding the register address.
const ADDRESS_BITS: u32 = 26;
/// HIP's relative standard error factor (DataSketches' figure).
const HIP_RSE: f64 = 0.832_554_6;
/// The register estimator's (Ertl's, as DataSketches' composite).
const MERGED_RSE: f64 = 1.038_96;
/// The sparse estimate's: DataSketches' bound at its transition point.
const SPARSE_RSE: f64 = 0.409 / 8192.0;

/// The DataSketches coupon of an item: register address (26 bits) and value
/// (6 bits above them).
#[inline]
pub fn coupon(item: &[u8]) -> u32 {
    let (lo, hi) = mur3::murmurhash3_x64_128(item, DATASKETCHES_SEED);
    let value = hi.leading_zeros().min(62) + 1;
    (value << ADDRESS_BITS) | (lo as u32 & ((1 << ADDRESS_BITS) - 1))
}

/// A HyperLogLog sketch (see the module docs) over storage `S`.
///
/// ```
/// use sluice_core::sketch::{HyperLogLog, hll};
///
/// const M: usize = HyperLogLog::<[u8; 0]>::registers_for_error(0.02); // 4096
/// let mut h = HyperLogLog::<[u8; hll::storage_bytes(M)]>::new();
/// for i in 0..300u32 {
///     h.insert(&i.to_le_bytes());
///     h.insert(&i.to_le_bytes()); // duplicates do not count
/// }
/// // Sparse up to 3·4096/32 = 384 items: nearly exact.
/// assert!(h.is_sparse());
/// assert!((h.estimate() - 300.0).abs() < 0.01);
/// for i in 300..100_000u32 {
///     h.insert(&i.to_le_bytes());
/// }
/// // Dense: HIP, 1.3 % relative standard error.
/// assert!((h.estimate() / 100_000.0 - 1.0).abs() < 4.0 * h.relative_error());
/// ```
#[derive(Clone)]
pub struct HyperLogLog<S> {
    /// Registers (`m` bytes), then the sparse table (`m/2` bytes, `m/8`
    /// little-endian `u32` coupons, zero for an empty slot).
    storage: S,
    p: u8,
    /// Coupons in the sparse table; [`DENSE`] once the registers are used.
    coupons: u32,
    /// The HIP estimate (meaningful while `!merged`).
    hip: f64,
    /// Σ 2^−value over registers below 32, and over the rest (DataSketches
    /// keeps both, for precision; both are in its serialized form).
    kxq0: f64,
    kxq1: f64,
    /// A merge replaced the registers: HIP no longer applies.
    merged: bool,
}

/// `coupons` once the sketch is dense.
const DENSE: u32 = u32::MAX;

impl<const N: usize> HyperLogLog<[u8; N]> {
    /// An empty sketch in an array of `N` = [`storage_bytes`]`(m)` bytes, `m`
    /// a power of two from 2^8 to 2^18 (anything else fails to compile).
    pub const fn new() -> Self {
        const {
            assert!(
                N.is_multiple_of(3)
                    && (2 * N / 3).is_power_of_two()
                    && 2 * N / 3 >= MIN_REGISTERS
                    && 2 * N / 3 <= MAX_REGISTERS,
                "HyperLogLog storage must be storage_bytes(m), m a power of two from 2^8 to 2^18"
            )
        };
        let m = 2 * N / 3;
        Self {
            storage: [0; N],
            p: m.trailing_zeros() as u8,
            coupons: 0,
            hip: 0.0,
            kxq0: m as f64,
            kxq1: 0.0,
            merged: false,
        }
    }
}

impl<const N: usize> Default for HyperLogLog<[u8; N]> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> HyperLogLog<S> {
    /// The number of registers for a target relative standard error of
    /// the merged (register) estimate: the smallest power of two `m` with
    /// 1.04/√m ≤ `relative_error`, clamped to the supported range. (The
    /// unmerged HIP estimate is 20 % better.)
    pub const fn registers_for_error(relative_error: f64) -> usize {
        let mut m = MIN_REGISTERS;
        // 1.04/√m <= e  <=>  m >= (1.04/e)².
        let needed = (1.04 / relative_error) * (1.04 / relative_error);
        while (m as f64) < needed && m < MAX_REGISTERS {
            m *= 2;
        }
        m
    }
}

impl<S: AsRef<[u8]> + AsMut<[u8]>> HyperLogLog<S> {
    /// An empty sketch over caller storage of [`storage_bytes`]`(m)` bytes,
    /// `m` a power of two from 2^8 to 2^18; the storage is zeroed.
    pub fn with_storage(mut storage: S) -> Result<Self, SketchError> {
        let len = storage.as_ref().len();
        let m = 2 * len / 3;
        if !len.is_multiple_of(3)
            || !m.is_power_of_two()
            || !(MIN_REGISTERS..=MAX_REGISTERS).contains(&m)
        {
            return Err(SketchError::BadParameters(
                "HyperLogLog storage must be storage_bytes(m) bytes, m a power of two from 2^8 to 2^18",
            ));
        }
        storage.as_mut().fill(0);
        Ok(Self {
            storage,
            p: m.trailing_zeros() as u8,
            coupons: 0,
            hip: 0.0,
            kxq0: m as f64,
            kxq1: 0.0,
            merged: false,
        })
    }

    fn m(&self) -> usize {
        1 << self.p
    }

    /// Coupons the sparse table holds before the sketch turns dense
    /// (DataSketches' point: its coupon set at 3/4 of 2^(p−3) slots).
    fn sparse_limit(&self) -> u32 {
        3 << (self.p - 5)
    }

    /// Adds an item (its bytes, as DataSketches would hash them).
    #[inline]
    pub fn insert(&mut self, item: &[u8]) {
        self.insert_coupon(coupon(item));
    }

    /// Adds an item by its [`coupon`].
    pub fn insert_coupon(&mut self, coupon: u32) {
        if self.coupons == DENSE {
            let slot = coupon as usize & (self.m() - 1);
            self.raise(slot, (coupon >> ADDRESS_BITS) as u8);
            return;
        }
        if self.table_insert(coupon) {
            self.coupons += 1;
            if self.coupons > self.sparse_limit() {
                self.densify();
            }
        }
    }

    /// Puts `coupon` in the sparse table; whether it was new.
    fn table_insert(&mut self, coupon: u32) -> bool {
        let m = self.m();
        let slots = m / 8;
        let table = &mut self.storage.as_mut()[m..];
        // Fibonacci hashing of the coupon picks the first slot; linear
        // probing (the table is at most 3/4 full).
        let mut i = (coupon.wrapping_mul(0x9E37_79B1) >> (32 - (self.p - 3))) as usize;
        loop {
            let at = &mut table[4 * i..4 * i + 4];
            let held = u32::from_le_bytes([at[0], at[1], at[2], at[3]]);
            if held == coupon {
                return false;
            }
            if held == 0 {
                at.copy_from_slice(&coupon.to_le_bytes());
                return true;
            }
            i = (i + 1) & (slots - 1);
        }
    }

    /// The coupons of the sparse table.
    fn table(&self) -> impl Iterator<Item = u32> + '_ {
        self.storage.as_ref()[self.m()..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .filter(|&c| c != 0)
    }

    /// Raises register `slot` to `value` if that is higher, keeping the HIP
    /// estimate and the kxq sums.
    #[inline]
    fn raise(&mut self, slot: usize, value: u8) {
        let old = self.storage.as_ref()[slot];
        if value <= old {
            return;
        }
        if !self.merged {
            self.hip += self.m() as f64 / (self.kxq0 + self.kxq1);
        }
        self.move_kxq(old, value);
        self.storage.as_mut()[slot] = value;
    }

    fn move_kxq(&mut self, old: u8, new: u8) {
        if old < 32 {
            self.kxq0 -= inv_pow2(old);
        } else {
            self.kxq1 -= inv_pow2(old);
        }
        if new < 32 {
            self.kxq0 += inv_pow2(new);
        } else {
            self.kxq1 += inv_pow2(new);
        }
    }

    /// Turns the sparse sketch into registers; the HIP estimate starts from
    /// the sparse one (as DataSketches does).
    fn densify(&mut self) {
        if self.coupons == DENSE {
            return;
        }
        let m = self.m();
        let estimate = sparse_estimate(self.coupons);
        self.storage.as_mut()[..m].fill(0);
        self.coupons = DENSE;
        for i in 0..m / 8 {
            let c = &self.storage.as_ref()[m + 4 * i..m + 4 * i + 4];
            let coupon = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if coupon != 0 {
                self.raise(coupon as usize & (m - 1), (coupon >> ADDRESS_BITS) as u8);
            }
        }
        self.storage.as_mut()[m..].fill(0);
        self.hip = estimate;
    }

    /// Whether the sketch still holds coupons (nearly exact).
    pub fn is_sparse(&self) -> bool {
        self.coupons != DENSE
    }

    /// Whether the sketch has taken a merge of registers (its estimate is
    /// then Ertl's, not HIP).
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// The estimated number of distinct items.
    pub fn estimate(&self) -> f64 {
        if self.coupons != DENSE {
            sparse_estimate(self.coupons)
        } else if !self.merged {
            self.hip
        } else {
            self.register_estimate()
        }
    }

    /// Ertl's improved estimator over the registers.
    fn register_estimate(&self) -> f64 {
        let registers = &self.storage.as_ref()[..self.m()];
        let m = registers.len() as f64;
        let q = usize::from(MAX_VALUE) - 1;
        let mut histogram = [0u32; MAX_VALUE as usize + 1];
        for &r in registers {
            histogram[usize::from(r)] += 1;
        }
        let mut z = m * tau(1.0 - f64::from(histogram[q + 1]) / m);
        for k in (1..=q).rev() {
            z = 0.5 * (z + f64::from(histogram[k]));
        }
        z += m * sigma(f64::from(histogram[0]) / m);
        // α∞ = 1 / (2 ln 2).
        const ALPHA_INF: f64 = 0.721_347_520_444_481_7;
        ALPHA_INF * m * m / z
    }

    /// The estimate less and plus `std_errors` standard errors
    /// ([`Self::relative_error`]): about 95 % of the time the true count
    /// lies between them at 2.
    pub fn bounds(&self, std_errors: f64) -> (f64, f64) {
        let (estimate, spread) = (self.estimate(), std_errors * self.relative_error());
        (estimate * (1.0 - spread), estimate * (1.0 + spread))
    }

    /// The relative standard error of [`Self::estimate`] now: tiny while
    /// sparse, 0.8326/√m with HIP, 1.039/√m after a merge.
    pub fn relative_error(&self) -> f64 {
        let m = crate::math::sqrt(self.m() as f64);
        if self.coupons != DENSE {
            SPARSE_RSE
        } else if self.merged {
            MERGED_RSE / m
        } else {
            HIP_RSE / m
        }
    }

    /// Bytes of memory the sketch uses.
    pub fn memory_bytes(&self) -> usize {
        super::footprint(self, self.storage.as_ref())
    }

    /// The number of registers, `m`.
    pub fn registers(&self) -> usize {
        self.m()
    }

    /// Forgets every item.
    pub fn clear(&mut self) {
        self.storage.as_mut().fill(0);
        self.coupons = 0;
        self.hip = 0.0;
        self.kxq0 = self.m() as f64;
        self.kxq1 = 0.0;
        self.merged = false;
    }

    fn is_empty(&self) -> bool {
        self.coupons == 0
    }

    /// Adds every item `other` has seen. `other` needs at least as many
    /// registers (a larger one is folded down to this size, as DataSketches'
    /// union does). The registers of the result are exactly those of one
    /// sketch fed both streams; its estimate is HIP if `other` was sparse or
    /// this one empty, else Ertl's.
    pub fn merge<T: AsRef<[u8]> + AsMut<[u8]>>(
        &mut self,
        other: &HyperLogLog<T>,
    ) -> Result<(), SketchError> {
        if other.p < self.p {
            return Err(SketchError::Incompatible(
                "the other HyperLogLog has fewer registers",
            ));
        }
        if other.coupons != DENSE {
            for c in other.table() {
                self.insert_coupon(c);
            }
            return Ok(());
        }
        if self.is_empty() && other.p == self.p {
            self.storage
                .as_mut()
                .copy_from_slice(other.storage.as_ref());
            self.coupons = DENSE;
            (self.hip, self.kxq0, self.kxq1, self.merged) =
                (other.hip, other.kxq0, other.kxq1, other.merged);
            return Ok(());
        }
        self.densify();
        self.merged = true;
        let mask = self.m() - 1;
        for (slot, &value) in other.storage.as_ref()[..other.m()].iter().enumerate() {
            self.raise(slot & mask, value);
        }
        Ok(())
    }

    /// Bytes [`Self::write_to`] writes.
    pub fn serialized_len(&self) -> usize {
        if self.coupons == DENSE {
            let (_, _, exceptions) = self.hll4_floor();
            HLL_PREAMBLE + self.m() / 2 + 4 * exceptions
        } else if self.coupons < 8 {
            LIST_PREAMBLE + 4 * self.coupons as usize
        } else {
            SET_PREAMBLE + 4 * self.coupons as usize
        }
    }

    /// The smallest register, how many hold it, and how many are 15 or
    /// more above it (`HLL_4` exceptions).
    fn hll4_floor(&self) -> (u8, u32, usize) {
        let registers = &self.storage.as_ref()[..self.m()];
        let floor = registers.iter().copied().min().unwrap_or(0);
        let at_floor = registers.iter().filter(|&&r| r == floor).count() as u32;
        let exceptions = registers.iter().filter(|&&r| r - floor >= 15).count();
        (floor, at_floor, exceptions)
    }

    /// Serializes into `buf` in the DataSketches HLL format (target type
    /// `HLL_4`; see the module docs); returns the bytes written.
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, SketchError> {
        let needed = self.serialized_len();
        let Some(out) = buf.get_mut(..needed) else {
            return Err(SketchError::BufferTooSmall { needed });
        };
        let mode = |cur: u8| cur | (TARGET_HLL4 << 2);
        if self.coupons != DENSE {
            let list = self.coupons < 8;
            out[0] = if list { 2 } else { 3 };
            out[1] = SERIAL_VERSION;
            out[2] = FAMILY_HLL;
            out[3] = self.p;
            // The coupon table size a DataSketches reader rebuilds: the
            // list's 8, or the smallest set (from 32) at most 3/4 full.
            out[4] = if list {
                3
            } else {
                let mut lg = 5;
                while 4 * self.coupons > 3 << lg {
                    lg += 1;
                }
                lg
            };
            out[5] = COMPACT | if self.is_empty() { EMPTY } else { 0 };
            out[6] = if list { self.coupons as u8 } else { 0 };
            out[7] = mode(if list { MODE_LIST } else { MODE_SET });
            let mut at = if list {
                LIST_PREAMBLE
            } else {
                out[8..12].copy_from_slice(&self.coupons.to_le_bytes());
                SET_PREAMBLE
            };
            for c in self.table() {
                out[at..at + 4].copy_from_slice(&c.to_le_bytes());
                at += 4;
            }
            return Ok(at);
        }
        let (floor, at_floor, _) = self.hll4_floor();
        out[..8].copy_from_slice(&[
            HLL_PREINTS,
            SERIAL_VERSION,
            FAMILY_HLL,
            self.p,
            0,
            COMPACT | if self.merged { OUT_OF_ORDER } else { 0 },
            floor,
            mode(MODE_HLL),
        ]);
        let (hip, registers) = (if self.merged { 0.0 } else { self.hip }, self.m());
        out[8..16].copy_from_slice(&hip.to_le_bytes());
        out[16..24].copy_from_slice(&self.kxq0.to_le_bytes());
        out[24..32].copy_from_slice(&self.kxq1.to_le_bytes());
        out[32..36].copy_from_slice(&at_floor.to_le_bytes());
        let mut aux = HLL_PREAMBLE + registers / 2;
        let mut exceptions = 0u32;
        for (slot, &r) in self.storage.as_ref()[..registers].iter().enumerate() {
            let shifted = r - floor;
            let nibble = if shifted >= 15 {
                let c = (u32::from(r) << ADDRESS_BITS) | slot as u32;
                out[aux..aux + 4].copy_from_slice(&c.to_le_bytes());
                aux += 4;
                exceptions += 1;
                15
            } else {
                shifted
            };
            let byte = &mut out[HLL_PREAMBLE + slot / 2];
            *byte = if slot % 2 == 0 {
                nibble
            } else {
                *byte | nibble << 4
            };
        }
        out[36..40].copy_from_slice(&exceptions.to_le_bytes());
        Ok(aux)
    }

    /// The storage ([`storage_bytes`] of its register count) that
    /// [`Self::read_from`] needs for the DataSketches HLL sketch in
    /// `bytes`, read from its header.
    pub fn storage_len(bytes: &[u8]) -> Result<usize, SketchError> {
        let header = bytes.get(..8).ok_or(SketchError::Corrupt("truncated"))?;
        if header[2] != FAMILY_HLL {
            return Err(SketchError::WrongFamily {
                expected: FAMILY_HLL,
                found: header[2],
            });
        }
        1usize
            .checked_shl(u32::from(header[3]))
            .filter(|m| (MIN_REGISTERS..=MAX_REGISTERS).contains(m))
            .map(storage_bytes)
            .ok_or(SketchError::BadParameters(
                "HyperLogLog lg_k must be from 8 to 18",
            ))
    }

    /// Reads a DataSketches HLL sketch (LIST, SET, or HLL in `HLL_4`,
    /// `HLL_6` or `HLL_8`, as any DataSketches library writes them) into
    /// `storage`, which must be [`storage_bytes`] of the sketch's register
    /// count. Every field is checked: foreign or damaged bytes are an
    /// error, never a panic.
    pub fn read_from(bytes: &[u8], storage: S) -> Result<Self, SketchError> {
        let header = bytes.get(..8).ok_or(SketchError::Corrupt("truncated"))?;
        let [preints, version, family, p, lg_arr, flags, state, mode] =
            [0, 1, 2, 3, 4, 5, 6, 7].map(|i| header[i]);
        if family != FAMILY_HLL {
            return Err(SketchError::WrongFamily {
                expected: FAMILY_HLL,
                found: family,
            });
        }
        if version != SERIAL_VERSION {
            return Err(SketchError::UnsupportedVersion(version));
        }
        let registers = 1usize
            .checked_shl(u32::from(p))
            .filter(|m| (MIN_REGISTERS..=MAX_REGISTERS).contains(m))
            .ok_or(SketchError::BadParameters(
                "HyperLogLog lg_k must be from 8 to 18",
            ))?;
        if storage.as_ref().len() != storage_bytes(registers) {
            return Err(SketchError::StorageMismatch {
                needed: storage_bytes(registers),
                got: storage.as_ref().len(),
            });
        }
        let mut sketch = Self::with_storage(storage)?;
        let u32_at = |at: usize| -> Result<u32, SketchError> {
            let b = bytes
                .get(at..at + 4)
                .ok_or(SketchError::Corrupt("truncated"))?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let f64_at = |at: usize| -> Result<f64, SketchError> {
            let b = bytes
                .get(at..at + 8)
                .ok_or(SketchError::Corrupt("truncated"))?;
            Ok(f64::from_le_bytes([
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
            ]))
        };
        let valid = |value: u8| (1..=MAX_VALUE).contains(&value);
        let mut coupons = |count: usize, at: usize| -> Result<(), SketchError> {
            for i in 0..count {
                let c = u32_at(at + 4 * i)?;
                if !valid((c >> ADDRESS_BITS) as u8) {
                    return Err(SketchError::Corrupt(
                        "HyperLogLog coupon value out of range",
                    ));
                }
                sketch.insert_coupon(c);
            }
            Ok(())
        };
        let compact = flags & COMPACT != 0;
        match (mode & 3, preints) {
            (MODE_LIST, 2) => {
                let count = usize::from(state);
                if lg_arr != 3 || count > 8 {
                    return Err(SketchError::Corrupt("HyperLogLog list size"));
                }
                // Compact or not, the coupons come first.
                if flags & EMPTY == 0 {
                    coupons(count, LIST_PREAMBLE)?;
                }
            }
            (MODE_SET, 3) => {
                let count = u32_at(8)? as usize;
                if compact {
                    if count > registers {
                        return Err(SketchError::Corrupt("HyperLogLog coupon count"));
                    }
                    coupons(count, SET_PREAMBLE)?;
                } else {
                    let slots = 1usize
                        .checked_shl(u32::from(lg_arr))
                        .filter(|&s| s <= registers)
                        .ok_or(SketchError::Corrupt("HyperLogLog set size"))?;
                    for i in 0..slots {
                        let c = u32_at(SET_PREAMBLE + 4 * i)?;
                        if c != 0 {
                            if !valid((c >> ADDRESS_BITS) as u8) {
                                return Err(SketchError::Corrupt(
                                    "HyperLogLog coupon value out of range",
                                ));
                            }
                            sketch.insert_coupon(c);
                        }
                    }
                }
            }
            (MODE_HLL, HLL_PREINTS) => {
                let hip = f64_at(8)?;
                let at_floor = u32_at(32)? as usize;
                let aux_count = u32_at(36)? as usize;
                let body = HLL_PREAMBLE;
                sketch.coupons = DENSE;
                match mode >> 2 {
                    TARGET_HLL4 => {
                        let floor = state;
                        let data = bytes
                            .get(body..body + registers / 2)
                            .ok_or(SketchError::Corrupt("truncated"))?;
                        let mut pending = 0usize;
                        for slot in 0..registers {
                            let nibble = (data[slot / 2] >> (4 * (slot % 2))) & 15;
                            if nibble == 15 {
                                pending += 1;
                            } else {
                                sketch.storage.as_mut()[slot] = floor
                                    .checked_add(nibble)
                                    .filter(|&v| v <= MAX_VALUE)
                                    .ok_or(SketchError::Corrupt("HyperLogLog register"))?;
                            }
                        }
                        // Exceptions: compact (count entries) or a hash
                        // table of 2^lg_arr slots, empty ones zero.
                        let aux_slots = if compact {
                            aux_count
                        } else if aux_count == 0 {
                            0
                        } else {
                            1usize
                                .checked_shl(u32::from(lg_arr))
                                .filter(|&s| s <= registers)
                                .ok_or(SketchError::Corrupt("HyperLogLog exception table"))?
                        };
                        if aux_count > registers {
                            return Err(SketchError::Corrupt("HyperLogLog exception count"));
                        }
                        let mut found = 0;
                        for i in 0..aux_slots {
                            let c = u32_at(body + registers / 2 + 4 * i)?;
                            if c == 0 && !compact {
                                continue;
                            }
                            let (slot, value) =
                                (c as usize & (registers - 1), (c >> ADDRESS_BITS) as u8);
                            let nibble = (data[slot / 2] >> (4 * (slot % 2))) & 15;
                            if nibble != 15 || !valid(value) || value < floor {
                                return Err(SketchError::Corrupt("HyperLogLog exception"));
                            }
                            if sketch.storage.as_ref()[slot] != 0 {
                                return Err(SketchError::Corrupt(
                                    "HyperLogLog exception given twice",
                                ));
                            }
                            sketch.storage.as_mut()[slot] = value;
                            found += 1;
                        }
                        if found != pending || found != aux_count {
                            return Err(SketchError::Corrupt("HyperLogLog exception count"));
                        }
                        let held = sketch.storage.as_ref()[..registers]
                            .iter()
                            .filter(|&&r| r == floor)
                            .count();
                        if held != at_floor {
                            return Err(SketchError::Corrupt("HyperLogLog floor count"));
                        }
                    }
                    TARGET_HLL6 => {
                        let len = registers * 3 / 4 + 1;
                        let data = bytes
                            .get(body..body + len)
                            .ok_or(SketchError::Corrupt("truncated"))?;
                        for slot in 0..registers {
                            let bit = slot * 6;
                            let two = u16::from_le_bytes([data[bit / 8], data[bit / 8 + 1]]);
                            sketch.storage.as_mut()[slot] = ((two >> (bit % 8)) & 63) as u8;
                        }
                    }
                    TARGET_HLL8 => {
                        let data = bytes
                            .get(body..body + registers)
                            .ok_or(SketchError::Corrupt("truncated"))?;
                        if data.iter().any(|&v| v > MAX_VALUE) {
                            return Err(SketchError::Corrupt("HyperLogLog register"));
                        }
                        sketch.storage.as_mut()[..registers].copy_from_slice(data);
                    }
                    _ => return Err(SketchError::Corrupt("HyperLogLog register type")),
                }
                // The sums follow from the registers; the HIP estimate is
                // the writer's, if it kept one.
                let (mut kxq0, mut kxq1) = (0.0, 0.0);
                for &r in &sketch.storage.as_ref()[..registers] {
                    if r < 32 {
                        kxq0 += inv_pow2(r);
                    } else {
                        kxq1 += inv_pow2(r);
                    }
                }
                (sketch.kxq0, sketch.kxq1) = (kxq0, kxq1);
                sketch.merged = flags & OUT_OF_ORDER != 0;
                if !sketch.merged {
                    if !(hip.is_finite() && hip >= 0.0) {
                        return Err(SketchError::Corrupt("HyperLogLog HIP estimate"));
                    }
                    sketch.hip = hip;
                }
            }
            _ => return Err(SketchError::Corrupt("HyperLogLog mode")),
        }
        Ok(sketch)
    }
}

const FAMILY_HLL: u8 = 7;
const SERIAL_VERSION: u8 = 1;
const EMPTY: u8 = 4;
const COMPACT: u8 = 8;
const OUT_OF_ORDER: u8 = 16;
const MODE_LIST: u8 = 0;
const MODE_SET: u8 = 1;
const MODE_HLL: u8 = 2;
const TARGET_HLL4: u8 = 0;
const TARGET_HLL6: u8 = 1;
const TARGET_HLL8: u8 = 2;
const HLL_PREINTS: u8 = 10;
const LIST_PREAMBLE: usize = 8;
const SET_PREAMBLE: usize = 12;
const HLL_PREAMBLE: usize = 40;

/// 2^−v, exactly.
fn inv_pow2(v: u8) -> f64 {
    f64::from_bits((1023 - u64::from(v)) << 52)
}

/// DataSketches' estimate from a coupon count: the count corrected for
/// items that shared a coupon (26-bit addresses), interpolated from its
/// table.
fn sparse_estimate(coupons: u32) -> f64 {
    let x = f64::from(coupons);
    if x < 1.0 {
        return 0.0;
    }
    // The straddling interval, then a cubic through four points around it.
    let last = COUPON_X.len() - 1;
    let i = COUPON_X.partition_point(|&v| v <= x).clamp(1, last) - 1;
    let start = i.saturating_sub(1).min(last - 3);
    let (xs, ys) = (&COUPON_X[start..start + 4], &COUPON_Y[start..start + 4]);
    // Lagrange's form, in DataSketches' order of operations, so that a
    // sketch and its copy read by DataSketches agree to the last bit.
    let mut y = 0.0;
    for j in 0..4 {
        let (mut numerator, mut denominator) = (1.0, 1.0);
        for k in (0..4).filter(|&k| k != j) {
            numerator *= x - xs[k];
            denominator *= xs[j] - xs[k];
        }
        y += ys[j] * numerator / denominator;
    }
    y.max(x)
}

/// DataSketches' coupon-count table (`coupon_mapping`): counts …
const COUPON_X: [f64; 40] = [
    0.0, 1.0, 20.0, 400.0, 8000.0, 160000.0, 300000.0, 600000.0, 900000.0, 1200000.0, 1500000.0,
    1800000.0, 2100000.0, 2400000.0, 2700000.0, 3000000.0, 3300000.0, 3600000.0, 3900000.0,
    4200000.0, 4500000.0, 4800000.0, 5100000.0, 5400000.0, 5700000.0, 6000000.0, 6300000.0,
    6600000.0, 6900000.0, 7200000.0, 7500000.0, 7800000.0, 8100000.0, 8400000.0, 8700000.0,
    9000000.0, 9300000.0, 9600000.0, 9900000.0, 10200000.0,
];

/// … and the distinct items they stand for.
const COUPON_Y: [f64; 40] = [
    0.0,
    1.0,
    20.000_000_943_740_26,
    400.000_396_371_338_4,
    8_000.158_929_460_209,
    160_063.606_776_375_96,
    300_223.707_159_766_35,
    600_895.593_385_617,
    902_016.806_512_095_5,
    1_203_588.498_319_951,
    1_505_611.824_552_474_3,
    1_808_087.944_931_906_6,
    2_111_018.023_175_935_3,
    2_414_403.227_014_25,
    2_718_244.728_205_189,
    3_022_543.702_552_454,
    3_327_301.329_921_909,
    3_632_518.794_258_454,
    3_938_197.283_602_969,
    4_244_337.990_109_356,
    4_550_942.110_061_649,
    4_858_010.843_891_189,
    5_165_545.396_193_897,
    5_473_546.975_747_645,
    5_782_016.795_529_650_5,
    6_090_956.072_734_016,
    6_400_366.028_789_296,
    6_710_247.889_376_201,
    7_020_602.884_445_314,
    7_331_432.248_234_972,
    7_642_737.219_289_148,
    7_954_519.040_475_476_5,
    8_266_778.959_003_342,
    8_579_518.226_442_046,
    8_892_738.098_739_047,
    9_206_439.836_238_328,
    9_520_624.703_698_829,
    9_835_293.970_312_92,
    10_150_448.909_725_029,
    10_466_090.800_050_326,
];

/// Ertl's σ(x) = x + Σ_{k≥1} x^(2^k) 2^(k−1), for the empty-register term.
fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let previous = z;
        z += x * y;
        y += y;
        if z == previous {
            return z;
        }
    }
}

/// Ertl's τ(x) = (1 − x − Σ_{k≥1} (1 − x^(2^−k))² 2^−k) / 3, for the
/// saturated-register term.
fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = crate::math::sqrt(x);
        let previous = z;
        y *= 0.5;
        z -= (1.0 - x) * (1.0 - x) * y;
        if z == previous {
            return z / 3.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_zero_and_one_is_one() {
        let mut h = HyperLogLog::<[u8; storage_bytes(1024)]>::new();
        assert_eq!(h.estimate(), 0.0);
        h.insert(b"a");
        assert_eq!(h.estimate(), 1.0);
    }

    #[test]
    fn registers_for_error_rounds_up_to_a_power_of_two() {
        assert_eq!(HyperLogLog::<()>::registers_for_error(0.02), 4096);
        assert_eq!(HyperLogLog::<()>::registers_for_error(0.0081), 16_384 * 2);
        assert_eq!(HyperLogLog::<()>::registers_for_error(1.0), MIN_REGISTERS);
        assert_eq!(HyperLogLog::<()>::registers_for_error(1e-9), MAX_REGISTERS);
    }

    #[test]
    fn the_sparse_estimate_follows_the_table() {
        assert_eq!(sparse_estimate(0), 0.0);
        assert_eq!(sparse_estimate(1), 1.0);
        assert_eq!(sparse_estimate(20), 20.000_000_943_740_26);
        let e = sparse_estimate(3_000);
        assert!((3_000.0..3_000.1).contains(&e), "{e}");
    }
}
