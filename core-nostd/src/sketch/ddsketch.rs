//! DDSketch: quantiles with a relative value error, in a fixed number of
//! buckets.
//!
//! A positive value `x` goes to bucket `i = ⌈log_γ x⌉` with
//! `γ = (1 + α)/(1 − α)`; the bucket answers with `2γ^i/(γ + 1)`, which is
//! within relative error `α` of every value in it (Masson, Rim and Lee, 2019).
//! Negative values go to a mirrored store, values with `|x| < 1e-9` to a zero
//! count. So every quantile answer `q̃` of a value `x_q` satisfies
//! `|q̃ − x_q| ≤ α·|x_q|`, whatever the distribution.
//!
//! Memory is bounded by a fixed number of buckets `B` per sign. When a store
//! would need more than `B` consecutive buckets, the lowest are *collapsed*
//! into one (for the negative store: the values closest to zero), so only the
//! quantiles among those values lose the guarantee; [`DdSketch::collapsed`]
//! counts the values affected. With α = 1 % and `B = 2048`, values spanning a
//! factor of 10^17 fit without any collapse.
//!
//! The exact minimum, maximum, count and sum are kept as well.
//!
//! **Memory**: `16·B` bytes (B = 2048: 32 KiB).

use super::SketchError;
use super::wire::{Reader, Writer, check_storage, family};

/// Values with a smaller magnitude count as zero.
pub const ZERO_THRESHOLD: f64 = 1e-9;

/// The occupied window of one sign's buckets, in bucket indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Store {
    /// Lowest index the window can hold; it holds `offset..offset + B`.
    offset: i64,
    /// Lowest and highest non-empty indices (meaningless when empty).
    lo: i64,
    hi: i64,
    empty: bool,
    /// Values in the lowest bucket (`lo`) that were moved there by a
    /// collapse (already counted as collapsed). A collapse folds buckets
    /// into the lowest one, so every value that lost its accuracy is there.
    carried: u64,
}

impl Store {
    const EMPTY: Store = Store {
        offset: 0,
        lo: 0,
        hi: 0,
        empty: true,
        carried: 0,
    };

    #[inline(always)]
    fn slot(index: i64, b: usize) -> usize {
        index.rem_euclid(b as i64) as usize
    }

    /// Adds `n` to bucket `index`, `already` of which lost their accuracy
    /// before (a merged sketch's collapsed values); returns how many values
    /// newly lost accuracy to a collapse.
    fn add(&mut self, buckets: &mut [u64], mut index: i64, n: u64, already: u64) -> u64 {
        let b = buckets.len() as i64;
        let mut collapsed = 0;
        if self.empty {
            self.offset = index - b / 2;
            self.lo = index;
            self.hi = index;
            self.empty = false;
        } else if index < self.offset {
            if self.hi - index < b {
                // The buckets leaving the top of the window are above `hi`.
                self.offset = index;
            } else {
                let lowest = self.hi - b + 1;
                collapsed += self.collapse_below(buckets, lowest) + (n - already);
                index = lowest;
                self.carried += n - already;
            }
        } else if index >= self.offset + b {
            collapsed += self.collapse_below(buckets, index - b + 1);
        }
        buckets[Self::slot(index, buckets.len())] += n;
        self.lo = self.lo.min(index);
        self.hi = self.hi.max(index);
        // A merged sketch's collapsed values sit in its lowest bucket, which
        // lands on this store's lowest (its window, B wide, reaches down to
        // there): they stay counted once.
        self.carried += already;
        collapsed
    }

    /// Moves the window up to start at `offset`, folding the counts of the
    /// buckets below it into its lowest bucket. Returns the counts folded.
    fn collapse_below(&mut self, buckets: &mut [u64], offset: i64) -> u64 {
        let b = buckets.len();
        let mut moved = 0u64;
        for index in self.lo..offset.min(self.hi + 1) {
            let slot = &mut buckets[Self::slot(index, b)];
            moved = moved.saturating_add(*slot);
            *slot = 0;
        }
        self.offset = offset;
        // The values collapsed before were in the lowest bucket, among those
        // moved now: they count once.
        let newly = if self.lo < offset {
            moved.saturating_sub(self.carried)
        } else {
            0
        };
        if moved > 0 {
            buckets[Self::slot(offset, b)] += moved;
            self.lo = offset;
            self.hi = self.hi.max(offset);
            self.carried = moved;
        } else if self.lo < offset {
            // Everything below was empty; the store is now empty up to `hi`.
            self.lo = offset.min(self.hi);
            if self.hi < offset {
                *self = Store::EMPTY;
            }
        }
        newly
    }

    /// Non-empty `(index, count)` pairs from `lo` to `hi`.
    fn iter<'a>(&self, buckets: &'a [u64]) -> impl DoubleEndedIterator<Item = (i64, u64)> + 'a {
        let (lo, hi) = if self.empty {
            (1, 0)
        } else {
            (self.lo, self.hi)
        };
        let b = buckets.len();
        (lo..=hi)
            .map(move |i| (i, buckets[Store::slot(i, b)]))
            .filter(|&(_, c)| c > 0)
    }
}

/// A quantile, and whether it keeps the relative-error guarantee (see
/// [`DdSketch::quantile_detail`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantileAnswer {
    /// The answer.
    pub value: f64,
    /// The rank fell among values collapsed for lack of buckets: the answer
    /// is a bound (see [`DdSketch::quantile_detail`]), not within α.
    pub collapsed: bool,
}

/// A DDSketch over `2·B` buckets in `S` (the first half positive values, the
/// second negative ones).
///
/// ```
/// use sluice_core::sketch::DdSketch;
///
/// let mut q = DdSketch::with_storage([0u64; 2 * 1024], 0.01).unwrap();
/// for i in 1..=1000 {
///     q.insert(i as f64);
/// }
/// let p99 = q.quantile(0.99).unwrap();
/// assert!((p99 - 990.0).abs() <= 0.01 * 990.0);
/// ```
#[derive(Clone)]
pub struct DdSketch<S> {
    buckets: S,
    alpha: f64,
    ln_gamma: f64,
    positive: Store,
    negative: Store,
    zero: u64,
    count: u64,
    collapsed: u64,
    min: f64,
    max: f64,
    sum: f64,
}

impl<S: AsRef<[u64]> + AsMut<[u64]>> DdSketch<S> {
    /// An empty sketch with relative accuracy `alpha` (0 < α < 1) over caller
    /// storage of `2·B` buckets (an even number, at least 2), zeroed here.
    pub fn with_storage(mut storage: S, alpha: f64) -> Result<Self, SketchError> {
        if !(alpha > 0.0 && alpha < 1.0) {
            return Err(SketchError::BadParameters(
                "DDSketch accuracy must be in (0, 1)",
            ));
        }
        let len = storage.as_ref().len();
        if len < 2 || len % 2 != 0 {
            return Err(SketchError::BadParameters(
                "DDSketch storage must be an even number of buckets, at least 2",
            ));
        }
        storage.as_mut().fill(0);
        Ok(Self {
            buckets: storage,
            alpha,
            ln_gamma: libm::log((1.0 + alpha) / (1.0 - alpha)),
            positive: Store::EMPTY,
            negative: Store::EMPTY,
            zero: 0,
            count: 0,
            collapsed: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
        })
    }

    /// Buckets per sign (half of the storage) that keep every magnitude in
    /// `[lo, hi]` (0 < lo <= hi, finite) within relative accuracy `alpha`
    /// at once: a quantile of values in that range is never collapsed. The
    /// storage is twice this. `None` for parameters out of range.
    ///
    /// ```
    /// use sluice_core::sketch::DdSketch;
    ///
    /// // Six decades at 1 %: 691 buckets a sign.
    /// assert_eq!(DdSketch::<[u64; 0]>::buckets_to_cover(0.01, 1e-2, 1e4), Some(692));
    /// ```
    pub fn buckets_to_cover(alpha: f64, lo: f64, hi: f64) -> Option<usize> {
        if !(alpha > 0.0 && alpha < 1.0 && lo > 0.0 && lo <= hi && hi.is_finite()) {
            return None;
        }
        let ln_gamma = libm::log((1.0 + alpha) / (1.0 - alpha));
        // Indices ceil(ln(v) / ln γ) from lo's to hi's, inclusive.
        let lo_index = libm::ceil(libm::log(lo) / ln_gamma);
        let hi_index = libm::ceil(libm::log(hi) / ln_gamma);
        let n = hi_index - lo_index + 1.0;
        (n.is_finite() && n < usize::MAX as f64 / 4.0).then_some(n as usize)
    }

    /// The storage (`2·B` buckets) that [`Self::read_from`] needs for the
    /// sketch serialized in `bytes`, read from its header.
    pub fn storage_len(bytes: &[u8]) -> Result<usize, SketchError> {
        let mut r = Reader::open(bytes, family::DDSKETCH)?;
        let _alpha = r.f64()?;
        let half = r.u32()? as usize;
        if half == 0 {
            return Err(SketchError::Corrupt("DDSketch parameters out of range"));
        }
        Ok(2 * half)
    }

    /// Buckets per sign (half of the storage).
    pub fn buckets_per_sign(&self) -> usize {
        self.half()
    }

    fn half(&self) -> usize {
        self.buckets.as_ref().len() / 2
    }

    #[inline(always)]
    fn index(&self, magnitude: f64) -> i64 {
        libm::ceil(libm::log(magnitude) / self.ln_gamma) as i64
    }

    fn value(&self, index: i64) -> f64 {
        let gamma = libm::exp(self.ln_gamma);
        2.0 * libm::exp(index as f64 * self.ln_gamma) / (gamma + 1.0)
    }

    /// Adds a value. NaN and infinities are ignored and `false` is returned.
    #[inline]
    pub fn insert(&mut self, value: f64) -> bool {
        self.insert_n(value, 1)
    }

    /// Adds `n` copies of a value; NaN and infinities are ignored (`false`).
    pub fn insert_n(&mut self, value: f64, n: u64) -> bool {
        if !value.is_finite() {
            return false;
        }
        if n == 0 {
            return true;
        }
        let half = self.half();
        let magnitude = libm::fabs(value);
        if magnitude < ZERO_THRESHOLD {
            self.zero += n;
        } else {
            let index = self.index(magnitude);
            let (pos, neg) = self.buckets.as_mut().split_at_mut(half);
            self.collapsed += if value > 0.0 {
                self.positive.add(pos, index, n, 0)
            } else {
                self.negative.add(neg, index, n, 0)
            };
        }
        self.count += n;
        self.sum += value * n as f64;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        true
    }

    /// The value at quantile `q` (0 = minimum, 1 = maximum), within relative
    /// error α of the exact one; `None` when empty or `q` is not in [0, 1].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantile_detail(q).map(|a| a.value)
    }

    /// [`Self::quantile`], saying whether the answer keeps the guarantee: a
    /// rank that falls among the values collapsed for lack of buckets is
    /// answered with the bucket they were folded into, and flagged
    /// (`collapsed`): the true value is then at most the answer for a
    /// positive one (at least, for a negative one), and may be far from it.
    pub fn quantile_detail(&self, q: f64) -> Option<QuantileAnswer> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let exact = |value| {
            Some(QuantileAnswer {
                value,
                collapsed: false,
            })
        };
        // The extremes are kept exactly.
        if q == 0.0 {
            return exact(self.min);
        }
        if q == 1.0 {
            return exact(self.max);
        }
        let rank = q * (self.count - 1) as f64;
        let half = self.half();
        let (pos, neg) = self.buckets.as_ref().split_at(half);
        let mut seen = 0u64;
        let mut found = None;
        // Most negative first: a negative store's collapsed values (closest
        // to zero) are the last of its lowest bucket.
        for (i, c) in self.negative.iter(neg).rev() {
            let before = seen;
            seen += c;
            if seen as f64 > rank {
                let carried = if i == self.negative.lo {
                    self.negative.carried
                } else {
                    0
                };
                let collapsed = rank >= (before + c - carried) as f64;
                found = Some((-self.value(i), collapsed));
                break;
            }
        }
        if found.is_none() {
            seen += self.zero;
            if seen as f64 > rank {
                found = Some((0.0, false));
            }
        }
        if found.is_none() {
            // A positive store's collapsed values (the smallest) are the
            // first of its lowest bucket.
            for (i, c) in self.positive.iter(pos) {
                let before = seen;
                seen += c;
                if seen as f64 > rank {
                    let carried = if i == self.positive.lo {
                        self.positive.carried
                    } else {
                        0
                    };
                    let collapsed = rank < (before + carried) as f64;
                    found = Some((self.value(i), collapsed));
                    break;
                }
            }
        }
        let (value, collapsed) = found.unwrap_or((self.max, false));
        // The exact extremes bound every answer.
        Some(QuantileAnswer {
            value: value.clamp(self.min, self.max),
            collapsed,
        })
    }

    /// The relative accuracy α.
    pub fn relative_error(&self) -> f64 {
        self.alpha
    }

    /// Values added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The exact minimum, if any value.
    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    /// The exact maximum, if any value.
    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    /// The sum of the values.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Values whose bucket was collapsed for lack of room (their quantiles
    /// may exceed the relative error).
    pub fn collapsed(&self) -> u64 {
        self.collapsed
    }

    /// Bytes of memory the sketch uses.
    pub fn memory_bytes(&self) -> usize {
        super::footprint(self, self.buckets.as_ref())
    }

    /// Empties the sketch, keeping its accuracy and storage (for the next
    /// window of a node that reuses one sketch).
    pub fn clear(&mut self) {
        self.buckets.as_mut().fill(0);
        self.positive = Store::EMPTY;
        self.negative = Store::EMPTY;
        self.zero = 0;
        self.count = 0;
        self.collapsed = 0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
        self.sum = 0.0;
    }

    /// Adds every value of `other`. Accuracy and bucket count must match.
    pub fn merge<T: AsRef<[u64]>>(&mut self, other: &DdSketch<T>) -> Result<(), SketchError> {
        if self.alpha.to_bits() != other.alpha.to_bits()
            || self.buckets.as_ref().len() != other.buckets.as_ref().len()
        {
            return Err(SketchError::Incompatible(
                "different DDSketch accuracy or bucket count",
            ));
        }
        let half = self.half();
        let (their_pos, their_neg) = other.buckets.as_ref().split_at(half);
        let (pos, neg) = self.buckets.as_mut().split_at_mut(half);
        // Their collapsed values (in each store's lowest bucket) are counted
        // in `other.collapsed`, and passed on as such. Highest buckets
        // first: by the time their lowest comes, this store's window reaches
        // no lower than it (theirs was full), so it lands on, or collapses
        // into, this store's lowest bucket, where collapsed values are kept.
        let already = |store: &Store, i: i64| if i == store.lo { store.carried } else { 0 };
        for (i, c) in other.positive.iter(their_pos).rev() {
            let known = already(&other.positive, i);
            self.collapsed += self.positive.add(pos, i, c, known);
        }
        for (i, c) in other.negative.iter(their_neg).rev() {
            let known = already(&other.negative, i);
            self.collapsed += self.negative.add(neg, i, c, known);
        }
        self.zero += other.zero;
        self.count += other.count;
        self.collapsed += other.collapsed;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        Ok(())
    }

    fn store_len(store: &Store) -> usize {
        if store.empty {
            0
        } else {
            (store.hi - store.lo + 1) as usize
        }
    }

    fn body_len(&self) -> usize {
        8 + 4
            + 8 * 3
            + 8 * 3
            + 2 * (1 + 8 * 3)
            + 8 * (Self::store_len(&self.positive) + Self::store_len(&self.negative))
    }

    /// Bytes [`Self::write_to`] writes.
    pub fn serialized_len(&self) -> usize {
        super::wire::framed_len(self.body_len())
    }

    /// Serializes into `buf`; returns the bytes written.
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, SketchError> {
        let half = u32::try_from(self.half())
            .map_err(|_| SketchError::BadParameters("DDSketch too large to serialize"))?;
        let mut w = Writer::start(buf, family::DDSKETCH, 0, self.body_len())?;
        w.f64(self.alpha);
        w.u32(half);
        w.u64(self.count);
        w.u64(self.zero);
        w.u64(self.collapsed);
        w.f64(self.min);
        w.f64(self.max);
        w.f64(self.sum);
        let (pos, neg) = self.buckets.as_ref().split_at(self.half());
        for (store, buckets) in [(&self.positive, pos), (&self.negative, neg)] {
            w.u8(u8::from(store.empty));
            w.i64(store.offset);
            w.i64(store.lo);
            w.i64(store.hi);
            if !store.empty {
                for i in store.lo..=store.hi {
                    w.u64(buckets[Store::slot(i, buckets.len())]);
                }
            }
        }
        Ok(w.finish())
    }

    /// Reads a sketch written by [`Self::write_to`] into `storage`, which must
    /// hold `2·B` buckets.
    pub fn read_from(bytes: &[u8], storage: S) -> Result<Self, SketchError> {
        let mut r = Reader::open(bytes, family::DDSKETCH)?;
        let alpha = r.f64()?;
        let half = r.u32()? as usize;
        if !(alpha > 0.0 && alpha < 1.0) || half == 0 {
            return Err(SketchError::Corrupt("DDSketch parameters out of range"));
        }
        check_storage(2 * half, storage.as_ref().len())?;
        let mut s = Self::with_storage(storage, alpha)?;
        s.count = r.u64()?;
        s.zero = r.u64()?;
        s.collapsed = r.u64()?;
        s.min = r.f64()?;
        s.max = r.f64()?;
        s.sum = r.f64()?;
        let mut in_buckets = s.zero;
        let (pos, neg) = s.buckets.as_mut().split_at_mut(half);
        for (store, buckets) in [(&mut s.positive, pos), (&mut s.negative, neg)] {
            let empty = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(SketchError::Corrupt("DDSketch store flag")),
            };
            let (offset, lo, hi) = (r.i64()?, r.i64()?, r.i64()?);
            *store = Store {
                offset,
                lo,
                hi,
                empty,
                carried: 0,
            };
            if empty {
                *store = Store::EMPTY;
                continue;
            }
            let window = offset..offset.saturating_add(half as i64);
            if lo > hi || !window.contains(&lo) || !window.contains(&hi) {
                return Err(SketchError::Corrupt("DDSketch store bounds"));
            }
            for i in lo..=hi {
                let c = r.u64()?;
                buckets[Store::slot(i, half)] = c;
                in_buckets = in_buckets.saturating_add(c);
            }
        }
        if in_buckets != s.count {
            return Err(SketchError::Corrupt("DDSketch bucket counts do not add up"));
        }
        if s.collapsed > s.count {
            return Err(SketchError::Corrupt("DDSketch collapsed count"));
        }
        // Which values were collapsed is not written, only how many: they
        // sit in the lowest bucket of a store whose window is full.
        let mut left = s.collapsed;
        let (pos, neg) = s.buckets.as_ref().split_at(half);
        for (store, buckets) in [(&mut s.positive, pos), (&mut s.negative, neg)] {
            if !store.empty && store.hi - store.lo + 1 == half as i64 {
                store.carried = left.min(buckets[Store::slot(store.lo, half)]);
                left -= store.carried;
            }
        }
        if s.count > 0 && !(s.min <= s.max && s.min.is_finite() && s.max.is_finite()) {
            return Err(SketchError::Corrupt("DDSketch extremes"));
        }
        if !s.sum.is_finite() {
            return Err(SketchError::Corrupt("DDSketch sum"));
        }
        r.finish()?;
        Ok(s)
    }
}
