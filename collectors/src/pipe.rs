//! The hand-off from a source to the workers: sharding, shedding, and the
//! lock-free rings from `sluice-core`.
//!
//! A source stages the readings of one message, datagram batch or read in a
//! [`Handoff`], then flushes them. Each reading goes to the lane (ring) of
//! the worker that owns its series, `hash(series) % lanes`, after an
//! optional route ([`Handoff::with_route`]) may have given it another
//! series (the agent's groups) or another key to shard by (the agent's
//! derived series, whose inputs meet in one worker). Per lane, the
//! shedding policy decides on every reading *before* it is pushed, from the
//! ring's occupancy at the start of the flush plus what this flush has pushed
//! so far (a conservative estimate: the worker can only have made room). The
//! kept readings are pushed with one batch operation. Every reading ends up
//! counted exactly once: delivered, or shed by reason.
//!
//! Critical readings are never shed: normal ones never take a ring's
//! critical reserve (see `sluice_core::shed`), and a critical reading that
//! finds even that full makes the source wait for the worker, up to
//! [`CRITICAL_WAIT`], rather than drop it; the time waited is counted
//! (`critical_wait_us`). Only a worker stuck for longer than that loses a
//! critical reading (counted as `full`, with an error line).

use std::sync::Arc;

use sluice_core::hash::SeriesHasher;
use sluice_core::ring::{CapacityError, Consumer, Producer, Ring, Slot, Storage};
use sluice_core::shed::{Decision, Priority, ShedError, ShedPolicy, ShedReason, Shedder};

use crate::reading::Reading;
use crate::stats::{SourceStats, add};

/// Ring slots on the heap, sized at run time.
pub struct HeapSlots<T>(Box<[Slot<T>]>);

impl<T> HeapSlots<T> {
    /// `n` empty slots.
    pub fn new(n: usize) -> Self {
        Self((0..n).map(|_| Slot::new()).collect())
    }
}

// SAFETY: the boxed slice is owned by this value and never reallocated, so
// `slots()` returns the same slots every time and nothing else can reach them.
unsafe impl<T> Storage<T> for HeapSlots<T> {
    fn slots(&self) -> &[Slot<T>] {
        &self.0
    }
}

/// A ring of readings on heap slots.
pub type ReadingRing = Ring<Reading, HeapSlots<Reading>>;
/// The collector's end of a reading ring.
pub type ReadingProducer = Producer<Arc<ReadingRing>>;
/// The worker's end of a reading ring.
pub type ReadingConsumer = Consumer<Arc<ReadingRing>>;

/// A ring of `capacity` readings (a power of two), split into its two ends.
pub fn reading_ring(capacity: usize) -> Result<(ReadingProducer, ReadingConsumer), CapacityError> {
    let ring = Arc::new(Ring::with_storage(HeapSlots::new(capacity))?);
    Ok(Ring::try_split(ring).expect("a new ring has never been split"))
}

/// Which series are never shed (a source's own: it may keep state, such
/// as the rules of the latest reload).
pub type PriorityFn = Box<dyn FnMut(&str) -> Priority + Send>;

/// Rewrites a reading's series before it is routed, and may name the hash
/// (by the hand-off's hasher) to pick its lane by instead of its series'
/// (the agent gives the readings of a grouped rule their group's id, and
/// sends the inputs of a derived series to the derived series' worker, so
/// that what must meet meets in one worker).
pub type RouteFn = Box<dyn FnMut(&mut Reading, &SeriesHasher) -> Option<u64> + Send>;

struct Lane {
    producer: ReadingProducer,
    /// The consumer's thread, unparked after a flush that pushed something.
    wake: Option<std::thread::Thread>,
    shedder: Shedder,
    staged: Vec<Reading>,
    kept: Vec<Reading>,
    /// A critical reading waited [`CRITICAL_WAIT`] for room in vain, and the
    /// ring has not moved since: the worker is stuck, so further critical
    /// readings are not waited for (one stall costs the source one wait, not
    /// one per reading; the watchdog restarts a stuck worker).
    stalled: bool,
}

/// The longest a flush waits for room for one critical reading.
pub const CRITICAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Routes, sheds and pushes a source's readings (see the module docs).
pub struct Handoff {
    lanes: Vec<Lane>,
    hasher: SeriesHasher,
    priority: PriorityFn,
    route: Option<RouteFn>,
    stats: Arc<SourceStats>,
}

impl Handoff {
    /// A hand-off into `producers` (one per worker, in worker order) under
    /// `policy`; sampling is seeded with `seed`.
    pub fn new(
        producers: Vec<ReadingProducer>,
        policy: ShedPolicy,
        seed: u64,
        stats: Arc<SourceStats>,
    ) -> Result<Self, ShedError> {
        let lanes = producers
            .into_iter()
            .enumerate()
            .map(|(i, producer)| {
                Ok(Lane {
                    producer,
                    wake: None,
                    shedder: Shedder::new(policy, seed.wrapping_add(i as u64))?,
                    staged: Vec::new(),
                    kept: Vec::new(),
                    stalled: false,
                })
            })
            .collect::<Result<_, ShedError>>()?;
        Ok(Self {
            lanes,
            hasher: SeriesHasher::default(),
            priority: Box::new(|_| Priority::Normal),
            route: None,
            stats,
        })
    }

    /// Uses `priority` to tell which series are never shed.
    pub fn with_priority(mut self, priority: PriorityFn) -> Self {
        self.priority = priority;
        self
    }

    /// Passes each reading to `route` before picking its lane (by the hash
    /// `route` returns, or else by its series) and its priority (by its
    /// series).
    pub fn with_route(mut self, route: RouteFn) -> Self {
        self.route = Some(route);
        self
    }

    /// Unparks `threads[i]` whenever a flush pushed readings into lane `i`,
    /// so that an idle worker can park instead of polling its rings.
    pub fn with_wakeups(mut self, threads: Vec<std::thread::Thread>) -> Self {
        for (lane, thread) in self.lanes.iter_mut().zip(threads) {
            lane.wake = Some(thread);
        }
        self
    }

    /// Uses `hasher` to shard series (workers must agree on it).
    pub fn with_hasher(mut self, hasher: SeriesHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// The source's counters.
    pub fn stats(&self) -> &Arc<SourceStats> {
        &self.stats
    }

    /// Stages a reading for the next [`Self::flush`].
    pub fn stage(&mut self, mut reading: Reading) {
        let home = match &mut self.route {
            Some(route) => route(&mut reading, &self.hasher),
            None => None,
        };
        let lane = match (self.lanes.len(), home) {
            (1, _) => 0,
            (n, Some(hash)) => sluice_core::hash::shard_of(hash, n),
            (n, None) => self.hasher.shard(reading.series.as_bytes(), n),
        };
        self.lanes[lane].staged.push(reading);
    }

    /// Sheds and pushes everything staged.
    pub fn flush(&mut self) {
        let priority = &mut self.priority;
        for lane in &mut self.lanes {
            if lane.staged.is_empty() {
                continue;
            }
            let capacity = lane.producer.capacity();
            let mut occupancy = lane.producer.len();
            for mut reading in lane.staged.drain(..) {
                match lane
                    .shedder
                    .decide(occupancy, capacity, priority(&reading.series))
                {
                    Decision::Keep => {}
                    Decision::KeepSampled { one_in } => reading.weight = one_in,
                    Decision::Drop(reason) => {
                        add(
                            match reason {
                                ShedReason::HighWater => &self.stats.shed_high_water,
                                ShedReason::Sampled => &self.stats.shed_sampled,
                                ShedReason::Full => &self.stats.shed_full,
                            },
                            1,
                        );
                        continue;
                    }
                }
                occupancy += 1;
                lane.kept.push(reading);
            }
            // Taken out of the lane (and put back, capacity and all) so that
            // the lane can be borrowed while the leftovers are handled.
            let mut buffer = std::mem::take(&mut lane.kept);
            let mut kept = buffer.drain(..);
            let pushed = lane.producer.push_iter(&mut kept);
            add(&self.stats.delivered, pushed as u64);
            if pushed > 0 {
                add(&self.stats.handoffs, 1);
                lane.stalled = false;
                if let Some(thread) = &lane.wake {
                    thread.unpark();
                }
            }
            // Kept by the policy but the ring was full: a critical reading
            // waits for room (see the module docs); a normal one (the worker
            // fell further behind than estimated) is counted as shed.
            for reading in kept {
                let critical = priority(&reading.series) == Priority::Critical;
                let weight = reading.weight;
                let lost = if critical {
                    wait_for_room(lane, reading, &self.stats)
                } else {
                    true
                };
                if lost {
                    lane.shedder.count_full(match weight {
                        1 => Decision::Keep,
                        one_in => Decision::KeepSampled { one_in },
                    });
                    add(&self.stats.shed_full, 1);
                } else {
                    add(&self.stats.delivered, 1);
                }
            }
            lane.kept = buffer;
        }
    }
}

/// Pushes a critical `reading` into its lane's full ring, waking the
/// worker and waiting (in short sleeps, up to [`CRITICAL_WAIT`]) for room;
/// counts the time waited. Returns whether it was lost (the worker never
/// made room). A lane whose last wait was in vain, and whose ring has not
/// moved since, is not waited for again (see `Lane::stalled`).
fn wait_for_room(lane: &mut Lane, mut reading: Reading, stats: &SourceStats) -> bool {
    let start = std::time::Instant::now();
    let lost = loop {
        match lane.producer.try_push(reading) {
            Ok(()) => {
                lane.stalled = false;
                break false;
            }
            Err(sluice_core::ring::Full(back)) => reading = back,
        }
        if lane.stalled {
            break true;
        }
        if start.elapsed() >= CRITICAL_WAIT {
            lane.stalled = true;
            tracing::error!(
                series = %reading.series,
                "a critical reading found its ring full for {CRITICAL_WAIT:?}: the worker is stuck; dropped (counted as full)"
            );
            break true;
        }
        if let Some(thread) = &lane.wake {
            thread.unpark();
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    };
    add(&stats.critical_wait_us, start.elapsed().as_micros() as u64);
    lost
}
