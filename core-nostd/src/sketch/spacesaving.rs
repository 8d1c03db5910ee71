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
//! [`crate::hash::hash64`]). The counters are kept as a *stream-summary*
//! (the structure of the paper): in an array sorted by count, in runs of
//! equal counts, each known by its first and last position. A unit update
//! moves its counter to the end of its run (one swap) and from there into
//! the next run or a run of its own: O(1), whatever `k`. An update by `w`
//! passes the runs whose counts it overtakes, one swap each. An
//! open-addressing index (linear probing: a table of the power of two at
//! or above `2k` slots) maps a key to its counter in expected O(1). All of
//! it lives in caller storage of [`SpaceSaving::index_len`] `u32`s.
//!
//! **Memory**: `24·k` bytes for the counters and `4·index_len(k)` (about
//! `24·k` to `32·k`) for the index and the runs.

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
/// let k = 4;
/// let mut top = SpaceSaving::new(
///     [Counter::default(); 4],
///     [0u32; SpaceSaving::<(), ()>::index_len(4)],
/// )
/// .unwrap();
/// for key in [7, 7, 7, 1, 7, 2, 7, 3, 7, 4] {
///     top.insert(key);
/// }
/// let mut out = [Counter::default(); 4];
/// let n = top.top_into(&mut out);
/// assert_eq!(out[0].key, 7);
/// assert!(out[0].count - out[0].error <= 6 && 6 <= out[0].count);
/// assert!(n <= k);
/// ```
#[derive(Clone)]
pub struct SpaceSaving<S, I> {
    /// The counters in use are the last `used`, in ascending order of
    /// count (the free ones before them stand for count 0).
    counters: S,
    /// The table (slot → 1 + the position of its key's counter; 0 is
    /// empty); then per position the slot that points at it; then per
    /// position its run; then per run its first and its last position (a
    /// free run's first is the next free run).
    index: I,
    used: usize,
    total: u64,
    /// The first free run, or [`NO_RUN`].
    free: u32,
    /// log2 of the table's slots.
    table_bits: u32,
}

/// No run (the end of the free list).
const NO_RUN: u32 = u32::MAX;

/// Slots in the index's table for `k` counters.
const fn table_len(k: usize) -> usize {
    (2 * k).next_power_of_two()
}

impl<S, I> SpaceSaving<S, I> {
    /// Index entries for `k` counters: a table of the power of two at or
    /// above `2k` slots, and four entries per counter (its slot, its run,
    /// and a run's first and last position).
    pub const fn index_len(k: usize) -> usize {
        table_len(k) + 4 * k
    }
}

impl<S: AsRef<[Counter]> + AsMut<[Counter]>, I: AsRef<[u32]> + AsMut<[u32]>> SpaceSaving<S, I> {
    /// An empty summary with `counters.len()` counters; `index` must have
    /// [`Self::index_len`] slots.
    pub fn new(mut counters: S, mut index: I) -> Result<Self, SketchError> {
        let k = counters.as_ref().len();
        if k == 0 || u32::try_from(k).is_err() || k == NO_RUN as usize {
            return Err(SketchError::BadParameters(
                "Space-Saving needs 1 to 2^32 - 2 counters",
            ));
        }
        check_storage(Self::index_len(k), index.as_ref().len())?;
        counters.as_mut().fill(Counter::default());
        index.as_mut().fill(0);
        let mut s = Self {
            counters,
            index,
            used: 0,
            total: 0,
            free: NO_RUN,
            table_bits: table_len(k).trailing_zeros(),
        };
        s.free_all_runs();
        Ok(s)
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

    /// The tracked items, in ascending order of count.
    pub fn counters(&self) -> &[Counter] {
        &self.counters.as_ref()[self.first()..]
    }

    /// Adds one occurrence of `key`: O(1).
    #[inline]
    pub fn insert(&mut self, key: u64) {
        self.add(key, 1);
    }

    /// Adds `count` occurrences of `key` (0 counts as nothing): O(1), and
    /// one step more for each run of equal counts it overtakes.
    pub fn add(&mut self, key: u64, count: u64) {
        if count == 0 {
            return;
        }
        self.total = self.total.saturating_add(count);
        if let Some(pos) = self.find(key) {
            self.raise(pos, count);
            return;
        }
        let pos = if self.used < self.capacity() {
            self.take_free(key, 0)
        } else {
            // Full: the new key takes over a counter of the smallest count
            // (the last of the first run: it moves on without a swap),
            // inheriting that count as its error.
            self.take_over(self.run_last(self.run_of(0)), key, 0)
        };
        self.raise(pos, count);
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

    /// Checks the structure's invariants (sorted counts, maximal runs of
    /// equal counts, an index that finds every key): for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let first = self.first();
        let c = self.counters.as_ref();
        for pos in first..self.capacity() {
            if pos > first && c[pos - 1].count > c[pos].count {
                return Err("counts not sorted");
            }
            let run = self.run_of(pos);
            let (lo, hi) = (self.run_first(run), self.run_last(run));
            if !(lo <= pos && pos <= hi) || c[lo].count != c[pos].count {
                return Err("position outside its run");
            }
            if lo > first && c[lo - 1].count == c[lo].count {
                return Err("run not maximal");
            }
            if self.find(c[pos].key) != Some(pos) {
                return Err("index does not find a key");
            }
            if self.index.as_ref()[self.slot_at(pos)] as usize != pos + 1 {
                return Err("slot back-pointer");
            }
        }
        Ok(())
    }

    /// Position of the first counter in use.
    fn first(&self) -> usize {
        self.capacity() - self.used
    }

    fn mask(&self) -> usize {
        (1 << self.table_bits) - 1
    }

    /// Where the index's region `r` (0: slots, 1: runs of positions, 2:
    /// runs' first, 3: runs' last positions) starts.
    #[inline(always)]
    fn region(&self, r: usize) -> usize {
        (1 << self.table_bits) + r * self.capacity()
    }

    /// The slot that points at position `pos`.
    fn slot_at(&self, pos: usize) -> usize {
        self.index.as_ref()[self.region(0) + pos] as usize
    }

    fn set_slot_at(&mut self, pos: usize, slot: usize) {
        let at = self.region(0) + pos;
        self.index.as_mut()[at] = slot as u32;
    }

    fn run_of(&self, pos: usize) -> usize {
        self.index.as_ref()[self.region(1) + pos] as usize
    }

    fn run_first(&self, run: usize) -> usize {
        self.index.as_ref()[self.region(2) + run] as usize
    }

    fn run_last(&self, run: usize) -> usize {
        self.index.as_ref()[self.region(3) + run] as usize
    }

    fn set_run_of(&mut self, pos: usize, run: usize) {
        let at = self.region(1) + pos;
        self.index.as_mut()[at] = run as u32;
    }

    fn set_run(&mut self, run: usize, first: usize, last: usize) {
        let (f, l) = (self.region(2) + run, self.region(3) + run);
        let index = self.index.as_mut();
        index[f] = first as u32;
        index[l] = last as u32;
    }

    /// Every run free.
    fn free_all_runs(&mut self) {
        let k = self.capacity();
        let at = self.region(2);
        for run in 0..k {
            self.index.as_mut()[at + run] = if run + 1 < k { run as u32 + 1 } else { NO_RUN };
        }
        self.free = 0;
    }

    /// A run of position `pos` alone. There is always one free: runs are
    /// at most the counters, and a counter's run is given up before.
    fn new_run(&mut self, pos: usize) {
        let run = self.free as usize;
        debug_assert!(self.free != NO_RUN, "more runs than counters");
        self.free = self.index.as_ref()[self.region(2) + run];
        self.set_run(run, pos, pos);
        self.set_run_of(pos, run);
    }

    fn free_run(&mut self, run: usize) {
        let at = self.region(2) + run;
        self.index.as_mut()[at] = self.free;
        self.free = run as u32;
    }

    /// A new counter for `key` at `count` (at most the smallest in use), in
    /// the free position just before those in use; returns it.
    fn take_free(&mut self, key: u64, count: u64) -> usize {
        let pos = self.first() - 1;
        self.counters.as_mut()[pos] = Counter {
            key,
            count,
            error: count,
        };
        self.used += 1;
        self.index_insert(key, pos);
        let next = pos + 1;
        if next < self.capacity() && self.counters.as_ref()[next].count == count {
            let run = self.run_of(next);
            let last = self.run_last(run);
            self.set_run(run, pos, last);
            self.set_run_of(pos, run);
        } else {
            self.new_run(pos);
        }
        pos
    }

    /// Gives the counter at `pos` to `key`, with its count and `error`
    /// added to that count; returns `pos`.
    fn take_over(&mut self, pos: usize, key: u64, error: u64) -> usize {
        let evicted = self.counters.as_ref()[pos];
        self.index_remove_at(self.slot_at(pos));
        self.counters.as_mut()[pos] = Counter {
            key,
            count: evicted.count,
            error: evicted.count.saturating_add(error),
        };
        self.index_insert(key, pos);
        pos
    }

    /// Adds `w` to the count at `pos` and moves the counter to keep the
    /// array sorted: to the end of its run, then past every run whose
    /// count the new one exceeds, into the run of its new count or a run
    /// of its own.
    fn raise(&mut self, pos: usize, w: u64) {
        let run = self.run_of(pos);
        let (first, last) = (self.run_first(run), self.run_last(run));
        if pos != last {
            self.swap(pos, last);
        }
        // `last` leaves its run.
        if first == last {
            self.free_run(run);
        } else {
            self.set_run(run, first, last - 1);
        }
        let mut at = last;
        let count = self.counters.as_ref()[at].count.saturating_add(w);
        self.counters.as_mut()[at].count = count;
        loop {
            let next = at + 1;
            if next == self.capacity() {
                self.new_run(at);
                return;
            }
            let next_run = self.run_of(next);
            let next_count = self.counters.as_ref()[next].count;
            if next_count > count {
                self.new_run(at);
                return;
            }
            if next_count == count {
                let next_last = self.run_last(next_run);
                self.set_run(next_run, at, next_last);
                self.set_run_of(at, next_run);
                return;
            }
            // Overtaken: that run's last counter takes this place, and the
            // run moves down by one.
            let next_last = self.run_last(next_run);
            self.swap(at, next_last);
            self.set_run(next_run, at, next_last - 1);
            self.set_run_of(at, next_run);
            at = next_last;
        }
    }

    /// The slot where `key`'s probe starts: Fibonacci hashing (the top bits
    /// of the key times 2^64/φ), one multiply, which spreads small ids and
    /// keeps hashes uniform.
    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (63 - self.table_bits) >> 1) as usize
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

    /// The position of `key`'s counter, if it is tracked.
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

    /// Removes the index entry in `slot`, shifting back the entries after
    /// it that would otherwise be cut off from their home slot (no
    /// tombstones).
    fn index_remove_at(&mut self, mut hole: usize) {
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

    /// Swaps the counters at positions `a` and `b`, and their index
    /// entries (not their runs: the caller sets those).
    fn swap(&mut self, a: usize, b: usize) {
        let (sa, sb) = (self.slot_at(a), self.slot_at(b));
        self.counters.as_mut().swap(a, b);
        let index = self.index.as_mut();
        index[sa] = b as u32 + 1;
        index[sb] = a as u32 + 1;
        self.set_slot_at(a, sb);
        self.set_slot_at(b, sa);
    }

    /// Sorts the counters in use and rebuilds the index and the runs after
    /// the counters were changed in place (a merge, or reading a
    /// serialized summary).
    fn rebuild(&mut self) {
        let first = self.first();
        self.counters.as_mut()[first..].sort_unstable_by_key(|c| c.count);
        let table = table_len(self.capacity());
        self.index.as_mut()[..table].fill(0);
        self.free_all_runs();
        for pos in first..self.capacity() {
            let key = self.counters.as_ref()[pos].key;
            self.index_insert(key, pos);
            let c = self.counters.as_ref()[pos].count;
            if pos > first && self.counters.as_ref()[pos - 1].count == c {
                let run = self.run_of(pos - 1);
                let run_first = self.run_first(run);
                self.set_run(run, run_first, pos);
                self.set_run_of(pos, run);
            } else {
                self.new_run(pos);
            }
        }
    }

    /// Copies the tracked items into `out`, largest count first (equal
    /// counts: larger key first); returns how many were copied.
    pub fn top_into(&self, out: &mut [Counter]) -> usize {
        let n = self.used.min(out.len());
        let mut filled = 0;
        let mut end = self.capacity();
        // Runs from the largest count down, each in descending key order.
        while filled < n {
            let run = self.run_of(end - 1);
            let first = self.run_first(run);
            let members = &self.counters.as_ref()[first..end];
            let room = n - filled;
            if members.len() <= room {
                out[filled..filled + members.len()].copy_from_slice(members);
                out[filled..filled + members.len()]
                    .sort_unstable_by_key(|c| core::cmp::Reverse(c.key));
                filled += members.len();
            } else {
                // The `room` largest keys of the run, by selection.
                let mut below = u64::MAX;
                let mut first_pick = true;
                for slot in &mut out[filled..n] {
                    let best = members
                        .iter()
                        .filter(|c| first_pick || c.key < below)
                        .max_by_key(|c| c.key)
                        .copied()
                        .unwrap_or_default();
                    *slot = best;
                    below = best.key;
                    first_pick = false;
                }
                filled = n;
            }
            end = first;
        }
        n
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
        let theirs = other.counters_in_use();
        // Their smallest count when full: what an item they lack may have
        // occurred there at most.
        let their_floor = if other.used < other.counters.as_ref().len() {
            0
        } else {
            theirs.first().map_or(0, |c| c.count)
        };
        let our_floor = self.untracked_bound();
        // Our items: add their count there, or their floor if they lack it.
        for pos in self.first()..self.capacity() {
            let key = self.counters.as_ref()[pos].key;
            let found = other_find(other, key);
            let c = &mut self.counters.as_mut()[pos];
            let (count, error) = found.map_or((their_floor, their_floor), |t| (t.count, t.error));
            c.count = c.count.saturating_add(count);
            c.error = c.error.saturating_add(error);
        }
        // The counts grew by different amounts: sort again.
        self.rebuild();
        // Their items we lack: charged our floor; kept if among the k
        // largest. (One of ours that a candidate replaces had, merged, at
        // least the count its counterpart would come with, and the smallest
        // count only grows: a replaced item never comes back as a
        // candidate.)
        for t in theirs {
            if self.find(t.key).is_some() {
                continue;
            }
            let (count, error) = (
                t.count.saturating_add(our_floor),
                t.error.saturating_add(our_floor),
            );
            if self.used < self.capacity() {
                let pos = self.take_free(t.key, 0);
                self.counters.as_mut()[pos].error = error;
                self.raise(pos, count);
            } else if self.counters.as_ref()[0].count < count {
                let floor = self.counters.as_ref()[0].count;
                let pos = self.take_over(0, t.key, 0);
                self.counters.as_mut()[pos].error = error;
                self.raise(pos, count - floor);
            }
        }
        self.total = self.total.saturating_add(other.total);
        Ok(())
    }

    /// The body: `k`, the counters in use and the total as varints, then
    /// per counter, in a min-heap order (ascending counts are one): its key
    /// (8 bytes), its count as the zigzag varint of its difference from its
    /// parent's, counter `(i − 1) / 2` (the root's from 0; small, as most
    /// counts sit near the smallest), and the hits since
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
        if k == 0 || used > k || u32::try_from(k).is_err() || k == NO_RUN as usize {
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
        // The counters in use are the last `used`.
        counters.copy_within(..used, k - used);
        counters[..k - used].fill(Counter::default());
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
            free: NO_RUN,
            table_bits: table_len(k).trailing_zeros(),
        };
        s.rebuild();
        Ok(s)
    }
}

impl<S: AsRef<[Counter]>, I> SpaceSaving<S, I> {
    /// The counters in use, in ascending order of count.
    fn counters_in_use(&self) -> &[Counter] {
        let c = self.counters.as_ref();
        &c[c.len() - self.used..]
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
