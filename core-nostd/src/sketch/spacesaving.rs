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
//! [`crate::hash::hash64`]). The counters form a binary min-heap on their
//! count, and an open-addressing index (linear probing, in caller storage
//! of [`SpaceSaving::index_len`] `u32`s: a table of the power of two at or
//! above `2k` slots, then each counter's slot) maps a key to its counter: an
//! update finds its key in expected O(1) and moves the counter in O(log k)
//! swaps of O(1) each, where a scan of the `k` counters grew with `k`.
//!
//! **Memory**: `24·k` bytes for the counters and `4·index_len(k)` (about
//! `12·k` to `20·k`) for the index.

use super::SketchError;
use super::wire::{Reader, Writer, check_storage, family, varint_len};

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

/// A Space-Saving summary over `k` counters in `S`, indexed by `I`.
///
/// ```
/// use sluice_core::sketch::{Counter, SpaceSaving};
///
/// let mut top = SpaceSaving::new([Counter::default(); 4], [0u32; 12]).unwrap();
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
pub struct SpaceSaving<S, I> {
    /// A min-heap on `count` over `..used`.
    counters: S,
    /// The table (slot → 1 + the position of its key's counter; 0 is
    /// empty), then for each position the slot that points at it.
    index: I,
    used: usize,
    total: u64,
}

/// Slots in the index's table for `k` counters.
const fn table_len(k: usize) -> usize {
    (2 * k).next_power_of_two()
}

impl<S, I> SpaceSaving<S, I> {
    /// Index entries for `k` counters: a table of the power of two at or
    /// above `2k` slots, and one entry per counter.
    pub const fn index_len(k: usize) -> usize {
        table_len(k) + k
    }
}

impl<S: AsRef<[Counter]> + AsMut<[Counter]>, I: AsRef<[u32]> + AsMut<[u32]>> SpaceSaving<S, I> {
    /// An empty summary with `counters.len()` counters; `index` must have
    /// [`Self::index_len`] slots.
    pub fn new(mut counters: S, mut index: I) -> Result<Self, SketchError> {
        let k = counters.as_ref().len();
        if k == 0 || u32::try_from(k).is_err() {
            return Err(SketchError::BadParameters(
                "Space-Saving needs 1 to 2^32 - 1 counters",
            ));
        }
        check_storage(Self::index_len(k), index.as_ref().len())?;
        counters.as_mut().fill(Counter::default());
        index.as_mut().fill(0);
        Ok(Self {
            counters,
            index,
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
        if let Some(pos) = self.find(key) {
            let c = &mut self.counters.as_mut()[pos];
            c.count = c.count.saturating_add(count);
            self.sift_down(pos);
            return;
        }
        if self.used < self.capacity() {
            let pos = self.used;
            self.counters.as_mut()[pos] = Counter {
                key,
                count,
                error: 0,
            };
            self.used += 1;
            self.index_insert(key, pos);
            self.sift_up(pos);
            return;
        }
        // Full: the new key takes over the smallest counter, the heap's root.
        let evicted = self.counters.as_ref()[0];
        self.index_remove(evicted.key);
        self.counters.as_mut()[0] = Counter {
            key,
            count: evicted.count.saturating_add(count),
            error: evicted.count,
        };
        self.index_insert(key, 0);
        self.sift_down(0);
    }

    /// The counter of `key`, if it is tracked. An untracked key occurred at
    /// most [`Self::untracked_bound`] times.
    pub fn get(&self, key: u64) -> Option<Counter> {
        self.find(key).map(|pos| self.counters.as_ref()[pos])
    }

    /// The most an untracked key can have occurred: the smallest count when
    /// every counter is in use, else 0.
    pub fn untracked_bound(&self) -> u64 {
        if self.used < self.capacity() {
            0
        } else {
            self.counters.as_ref()[0].count
        }
    }

    fn mask(&self) -> usize {
        table_len(self.capacity()) - 1
    }

    /// The slot that points at heap position `pos`.
    fn slot_at(&self, pos: usize) -> usize {
        self.index.as_ref()[table_len(self.capacity()) + pos] as usize
    }

    fn set_slot_at(&mut self, pos: usize, slot: usize) {
        let at = table_len(self.capacity()) + pos;
        self.index.as_mut()[at] = slot as u32;
    }

    /// The slot where `key`'s probe starts: Fibonacci hashing (the top bits
    /// of the key times 2^64/φ), one multiply, which spreads small ids and
    /// keeps hashes uniform.
    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        let bits = table_len(self.capacity()).trailing_zeros();
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (63 - bits) >> 1) as usize
    }

    /// The index slot holding `key`, if it is tracked.
    fn slot_of(&self, key: u64) -> Option<usize> {
        let (index, counters) = (self.index.as_ref(), self.counters.as_ref());
        let mut slot = self.home(key);
        loop {
            match index[slot] {
                0 => return None,
                p if counters[p as usize - 1].key == key => return Some(slot),
                _ => slot = (slot + 1) & self.mask(),
            }
        }
    }

    /// The heap position of `key`'s counter, if it is tracked.
    fn find(&self, key: u64) -> Option<usize> {
        self.slot_of(key)
            .map(|slot| self.index.as_ref()[slot] as usize - 1)
    }

    fn index_insert(&mut self, key: u64, pos: usize) {
        let mask = self.mask();
        let mut slot = self.home(key);
        let index = self.index.as_mut();
        while index[slot] != 0 {
            slot = (slot + 1) & mask;
        }
        index[slot] = pos as u32 + 1;
        self.set_slot_at(pos, slot);
    }

    /// Removes `key` from the index, shifting back the entries after it that
    /// would otherwise be cut off from their home slot (no tombstones).
    fn index_remove(&mut self, key: u64) {
        let Some(mut hole) = self.slot_of(key) else {
            return;
        };
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let entry = self.index.as_ref()[j];
            if entry == 0 {
                break;
            }
            let home = self.home(self.counters.as_ref()[entry as usize - 1].key);
            // The entry may fill the hole unless its home lies cyclically
            // in (hole, j].
            let between = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !between {
                self.index.as_mut()[hole] = entry;
                self.set_slot_at(entry as usize - 1, hole);
                hole = j;
            }
        }
        self.index.as_mut()[hole] = 0;
    }

    /// Swaps heap positions `a` and `b`, and their index entries.
    fn swap(&mut self, a: usize, b: usize) {
        let (sa, sb) = (self.slot_at(a), self.slot_at(b));
        self.counters.as_mut().swap(a, b);
        let index = self.index.as_mut();
        index[sa] = b as u32 + 1;
        index[sb] = a as u32 + 1;
        self.set_slot_at(a, sb);
        self.set_slot_at(b, sa);
    }

    fn sift_up(&mut self, mut pos: usize) {
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if self.counters.as_ref()[parent].count <= self.counters.as_ref()[pos].count {
                break;
            }
            self.swap(pos, parent);
            pos = parent;
        }
    }

    fn sift_down(&mut self, mut pos: usize) {
        loop {
            let c = self.counters.as_ref();
            let (l, r) = (2 * pos + 1, 2 * pos + 2);
            let mut smallest = pos;
            if l < self.used && c[l].count < c[smallest].count {
                smallest = l;
            }
            if r < self.used && c[r].count < c[smallest].count {
                smallest = r;
            }
            if smallest == pos {
                break;
            }
            self.swap(pos, smallest);
            pos = smallest;
        }
    }

    /// Restores the heap order and rebuilds the index after the counters
    /// were changed in place (a merge, or reading a serialized summary).
    fn rebuild(&mut self) {
        let table = table_len(self.capacity());
        self.index.as_mut()[..table].fill(0);
        for pos in 0..self.used {
            let key = self.counters.as_ref()[pos].key;
            self.index_insert(key, pos);
        }
        for pos in (0..self.used / 2).rev() {
            self.sift_down(pos);
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
    pub fn merge<T: AsRef<[Counter]>, J: AsRef<[u32]>>(
        &mut self,
        other: &SpaceSaving<T, J>,
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
            theirs.first().map_or(0, |c| c.count)
        };
        let our_floor = self.untracked_bound();
        let used = self.used;
        // Our items: add their count there, or their floor if they lack it.
        // (Their heap's root is their smallest count.)
        for pos in 0..used {
            let key = self.counters.as_ref()[pos].key;
            let found = other_find(other, key);
            let c = &mut self.counters.as_mut()[pos];
            match found {
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
        // The counts grew by different amounts: restore the heap order.
        for pos in (0..used / 2).rev() {
            self.sift_down(pos);
        }
        // Their items we lack: charged our floor; kept if among the k
        // largest. (One of ours that a candidate replaces had, merged, at
        // least the count its counterpart would come with, and the root only
        // grows: a replaced item never comes back as a candidate.)
        for t in theirs {
            if self.find(t.key).is_some() {
                continue;
            }
            let candidate = Counter {
                key: t.key,
                count: t.count.saturating_add(our_floor),
                error: t.error.saturating_add(our_floor),
            };
            let k = self.capacity();
            if self.used < k {
                let pos = self.used;
                self.counters.as_mut()[pos] = candidate;
                self.used += 1;
                self.index_insert(candidate.key, pos);
                self.sift_up(pos);
            } else if self.counters.as_ref()[0].count < candidate.count {
                let evicted = self.counters.as_ref()[0].key;
                self.index_remove(evicted);
                self.counters.as_mut()[0] = candidate;
                self.index_insert(candidate.key, 0);
                self.sift_down(0);
            }
        }
        self.total = self.total.saturating_add(other.total);
        Ok(())
    }

    /// The body: `k`, the counters in use and the total as varints, then
    /// per counter, in heap order: its key (8 bytes), its count as the
    /// zigzag varint of its difference from its parent's (the root's from
    /// 0; small, as most counts sit near the smallest), and the hits since
    /// it took its key (`count - error`, a varint). About 10 bytes a counter
    /// where DataSketches' frequent items take 16 an item.
    fn body_len(&self) -> usize {
        varint_len(self.capacity() as u64)
            + varint_len(self.used as u64)
            + varint_len(self.total)
            + (0..self.used)
                .map(|i| {
                    let (delta, hits) = self.encoded(i);
                    8 + varint_len(delta) + varint_len(hits)
                })
                .sum::<usize>()
    }

    /// Counter `i`'s count against its parent's (zigzag) and its hits.
    fn encoded(&self, i: usize) -> (u64, u64) {
        let c = self.counters()[i];
        let parent = if i == 0 {
            0
        } else {
            self.counters()[(i - 1) / 2].count
        };
        let delta = c.count.wrapping_sub(parent) as i64;
        (((delta << 1) ^ (delta >> 63)) as u64, c.count - c.error)
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
        w.varint(u64::from(k));
        w.varint(self.used as u64);
        w.varint(self.total);
        for (i, c) in self.counters().iter().enumerate() {
            let (delta, hits) = self.encoded(i);
            w.u64(c.key);
            w.varint(delta);
            w.varint(hits);
        }
        Ok(w.finish())
    }

    /// Reads a summary written by [`Self::write_to`] into `storage`, which
    /// must have its capacity, and `index`, which must have
    /// [`Self::index_len`] slots for it.
    pub fn read_from(bytes: &[u8], mut storage: S, index: I) -> Result<Self, SketchError> {
        let mut r = Reader::open(bytes, family::SPACE_SAVING)?;
        let k = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
        let used = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
        let total = r.varint()?;
        if k == 0 || used > k || u32::try_from(k).is_err() {
            return Err(SketchError::Corrupt("Space-Saving counts out of range"));
        }
        check_storage(k, storage.as_ref().len())?;
        // Each counter takes at least 10 bytes.
        if r.remaining() < 10 * used {
            return Err(SketchError::Corrupt("Space-Saving body length"));
        }
        let counters = storage.as_mut();
        counters.fill(Counter::default());
        for i in 0..used {
            let key = r.u64()?;
            let zigzag = r.varint()?;
            let delta = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
            let parent = if i == 0 {
                0
            } else {
                counters[(i - 1) / 2].count
            };
            let count = parent.wrapping_add(delta as u64);
            let hits = r.varint()?;
            let c = &mut counters[i];
            *c = Counter {
                key,
                count,
                error: count.wrapping_sub(hits),
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
        check_storage(Self::index_len(k), index.as_ref().len())?;
        let mut s = Self {
            counters: storage,
            index,
            used,
            total,
        };
        s.rebuild();
        Ok(s)
    }
}

/// The counter of `key` in `other`, by its index.
fn other_find<T: AsRef<[Counter]>, J>(other: &SpaceSaving<T, J>, key: u64) -> Option<Counter>
where
    J: AsRef<[u32]>,
{
    let (index, counters) = (other.index.as_ref(), other.counters.as_ref());
    let mask = table_len(counters.len()) - 1;
    let bits = table_len(counters.len()).trailing_zeros();
    let mut slot = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (63 - bits) >> 1) as usize;
    loop {
        match index[slot] {
            0 => return None,
            p if counters[p as usize - 1].key == key => return Some(counters[p as usize - 1]),
            _ => slot = (slot + 1) & mask,
        }
    }
}
