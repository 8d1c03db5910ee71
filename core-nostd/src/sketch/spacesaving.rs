//! Space-Saving: the most frequent items of a stream, in `k` counters.
//!
//! Each counter holds an item, its count and the most that count may
//! overestimate. A new item that finds no counter and no free slot takes over
//! the counter with the smallest count, inheriting that count as its error
//! (Metwally, Agrawal and El Abbadi, 2005). With `k` counters and a stream of
//! `N` items:
//!
//! * every item with true frequency above `N/k` holds a counter;
//! * a counter's count overestimates the true frequency by at most its
//!   `error`, which is at most `N/k`: `count − error ≤ true ≤ count`.
//!
//! Merging adds counts (an item missing from one side is charged that side's
//! smallest count, its largest possible frequency there) and keeps the `k`
//! largest, which preserves both guarantees for the combined stream
//! (Agarwal et al., *Mergeable summaries*, 2012).
//!
//! Items are 64-bit keys: an id, or the hash of a longer key (see
//! [`crate::hash::hash64`]). Updates scan the `k` counters, which for the
//! small `k` of a hot list (tens to hundreds) is faster than a heap.
//!
//! **Memory**: `24·k` bytes.

use super::SketchError;
use super::wire::{Reader, Writer, check_storage, family};

/// One tracked item.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    /// The item.
    pub key: u64,
    /// Its count: never below the true frequency.
    pub count: u64,
    /// How much `count` may overestimate: `count − error ≤ true frequency`.
    pub error: u64,
}

/// A Space-Saving summary over `k` counters in `S`.
///
/// ```
/// use sluice_core::sketch::{Counter, SpaceSaving};
///
/// let mut top = SpaceSaving::new([Counter::default(); 4]).unwrap();
/// for key in [7, 7, 7, 1, 7, 2, 7, 3, 7, 4] {
///     top.insert(key);
/// }
/// let mut out = [Counter::default(); 4];
/// let n = top.top_into(&mut out);
/// assert_eq!(out[0].key, 7);
/// assert!(out[0].count - out[0].error <= 6 && 6 <= out[0].count);
/// assert!(n <= 4);
/// ```
#[derive(Clone)]
pub struct SpaceSaving<S> {
    counters: S,
    used: usize,
    total: u64,
}

impl<S: AsRef<[Counter]> + AsMut<[Counter]>> SpaceSaving<S> {
    /// An empty summary with `storage.len()` counters.
    pub fn new(mut storage: S) -> Result<Self, SketchError> {
        if storage.as_ref().is_empty() {
            return Err(SketchError::BadParameters(
                "Space-Saving needs at least one counter",
            ));
        }
        storage.as_mut().fill(Counter::default());
        Ok(Self {
            counters: storage,
            used: 0,
            total: 0,
        })
    }

    /// The number of counters, `k`.
    pub fn capacity(&self) -> usize {
        self.counters.as_ref().len()
    }

    /// The stream length `N` so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The bound on any count's overestimate: `N/k`.
    pub fn error_bound(&self) -> f64 {
        self.total as f64 / self.capacity() as f64
    }

    /// The tracked items, in no particular order.
    pub fn counters(&self) -> &[Counter] {
        &self.counters.as_ref()[..self.used]
    }

    /// Adds one occurrence of `key`.
    #[inline]
    pub fn insert(&mut self, key: u64) {
        self.add(key, 1);
    }

    /// Adds `count` occurrences of `key`.
    pub fn add(&mut self, key: u64, count: u64) {
        self.total = self.total.saturating_add(count);
        let used = self.used;
        let counters = &mut self.counters.as_mut()[..];
        if let Some(c) = counters[..used].iter_mut().find(|c| c.key == key) {
            c.count = c.count.saturating_add(count);
            return;
        }
        if used < counters.len() {
            counters[used] = Counter {
                key,
                count,
                error: 0,
            };
            self.used += 1;
            return;
        }
        let min = (0..used).min_by_key(|&i| counters[i].count).unwrap_or(0);
        let evicted = counters[min].count;
        counters[min] = Counter {
            key,
            count: evicted.saturating_add(count),
            error: evicted,
        };
    }

    /// The counter of `key`, if it is tracked. An untracked key occurred at
    /// most [`Self::untracked_bound`] times.
    pub fn get(&self, key: u64) -> Option<Counter> {
        self.counters().iter().find(|c| c.key == key).copied()
    }

    /// The most an untracked key can have occurred: the smallest count when
    /// every counter is in use, else 0.
    pub fn untracked_bound(&self) -> u64 {
        if self.used < self.capacity() {
            0
        } else {
            self.counters().iter().map(|c| c.count).min().unwrap_or(0)
        }
    }

    /// Copies the tracked items into `out`, largest count first; returns how
    /// many were copied.
    pub fn top_into(&self, out: &mut [Counter]) -> usize {
        let n = self.used.min(out.len());
        let mut sorted_prefix = 0;
        // Selection of the n largest, in order: O(n·k) without allocation.
        let counters = self.counters();
        let mut taken_below: Option<(u64, u64)> = None;
        while sorted_prefix < n {
            let best = counters
                .iter()
                .filter(|c| taken_below.is_none_or(|(count, key)| (c.count, c.key) < (count, key)))
                .max_by_key(|c| (c.count, c.key));
            let Some(best) = best else { break };
            out[sorted_prefix] = *best;
            taken_below = Some((best.count, best.key));
            sorted_prefix += 1;
        }
        sorted_prefix
    }

    /// Adds the summary of another stream. Capacities must match.
    pub fn merge<T: AsRef<[Counter]>>(
        &mut self,
        other: &SpaceSaving<T>,
    ) -> Result<(), SketchError> {
        if self.capacity() != other.counters.as_ref().len() {
            return Err(SketchError::Incompatible(
                "different Space-Saving capacities",
            ));
        }
        let theirs = &other.counters.as_ref()[..other.used];
        let theirs_capacity = other.counters.as_ref().len();
        let their_floor = if other.used < theirs_capacity {
            0
        } else {
            theirs.iter().map(|c| c.count).min().unwrap_or(0)
        };
        let our_floor = self.untracked_bound();
        let used = self.used;
        // Our items: add their count there, or their floor if they lack it.
        for c in &mut self.counters.as_mut()[..used] {
            match theirs.iter().find(|t| t.key == c.key) {
                Some(t) => {
                    c.count = c.count.saturating_add(t.count);
                    c.error = c.error.saturating_add(t.error);
                }
                None => {
                    c.count = c.count.saturating_add(their_floor);
                    c.error = c.error.saturating_add(their_floor);
                }
            }
        }
        // Their items we lack: charged our floor; kept if among the k largest.
        for t in theirs {
            if self.counters.as_ref()[..used]
                .iter()
                .any(|c| c.key == t.key)
            {
                continue;
            }
            let candidate = Counter {
                key: t.key,
                count: t.count.saturating_add(our_floor),
                error: t.error.saturating_add(our_floor),
            };
            let k = self.capacity();
            let counters = self.counters.as_mut();
            if self.used < k {
                counters[self.used] = candidate;
                self.used += 1;
            } else if let Some(min) = (0..k).min_by_key(|&i| counters[i].count)
                && counters[min].count < candidate.count
            {
                counters[min] = candidate;
            }
        }
        self.total = self.total.saturating_add(other.total);
        Ok(())
    }

    fn body_len(&self) -> usize {
        4 + 4 + 8 + 24 * self.used
    }

    /// Bytes [`Self::write_to`] writes.
    pub fn serialized_len(&self) -> usize {
        super::wire::framed_len(self.body_len())
    }

    /// Serializes into `buf`; returns the bytes written.
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, SketchError> {
        let k = u32::try_from(self.capacity())
            .map_err(|_| SketchError::BadParameters("Space-Saving too large to serialize"))?;
        let mut w = Writer::start(buf, family::SPACE_SAVING, 0, self.body_len())?;
        w.u32(k);
        w.u32(self.used as u32);
        w.u64(self.total);
        for c in self.counters() {
            w.u64(c.key);
            w.u64(c.count);
            w.u64(c.error);
        }
        Ok(w.finish())
    }

    /// Reads a summary written by [`Self::write_to`] into `storage`, which
    /// must have its capacity.
    pub fn read_from(bytes: &[u8], mut storage: S) -> Result<Self, SketchError> {
        let mut r = Reader::open(bytes, family::SPACE_SAVING)?;
        let k = r.u32()? as usize;
        let used = r.u32()? as usize;
        let total = r.u64()?;
        if k == 0 || used > k {
            return Err(SketchError::Corrupt("Space-Saving counts out of range"));
        }
        check_storage(k, storage.as_ref().len())?;
        if r.remaining() != 24 * used {
            return Err(SketchError::Corrupt("Space-Saving body length"));
        }
        let counters = storage.as_mut();
        counters.fill(Counter::default());
        for c in &mut counters[..used] {
            *c = Counter {
                key: r.u64()?,
                count: r.u64()?,
                error: r.u64()?,
            };
            if c.error > c.count {
                return Err(SketchError::Corrupt("Space-Saving error above its count"));
            }
        }
        for (i, c) in counters[..used].iter().enumerate() {
            if counters[..i].iter().any(|d| d.key == c.key) {
                return Err(SketchError::Corrupt("Space-Saving key repeated"));
            }
        }
        if r.seed != 0 {
            return Err(SketchError::Corrupt("Space-Saving has no seed"));
        }
        r.finish()?;
        Ok(Self {
            counters: storage,
            used,
            total,
        })
    }
}
