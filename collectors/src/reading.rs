//! The unit of data that crosses from a collector to a worker.

use heapless::String;
use sluice_core::Timestamp;

/// Longest series key, in bytes. Keys are stored inline so that a reading
/// has a fixed size and moves through the rings without allocating; longer
/// keys are rejected with [`crate::Reason::SeriesTooLong`].
pub const MAX_SERIES_LEN: usize = 64;

/// A series key: which sensor (and which of its fields) a value belongs to,
/// e.g. `s-0042` or `s-0042/temperature`.
pub type SeriesKey = String<MAX_SERIES_LEN>;

/// One value of one series at one event time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The series key.
    pub series: SeriesKey,
    /// Event time, milliseconds since the Unix epoch: when the value was
    /// measured, as the sender says (or the ingest time if it says nothing).
    pub ts: Timestamp,
    /// The value; always finite.
    pub value: f64,
    /// Ingest time, milliseconds since the Unix epoch: when Sluice decoded it.
    pub ingest: Timestamp,
    /// How many readings this one stands for: 1, or `k` when shedding kept it
    /// as one in `k` (scale counts and sums by it).
    pub weight: u32,
}

/// Milliseconds since the Unix epoch now, by the system clock.
pub fn now_ms() -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::try_from(now.as_millis()).unwrap_or(Timestamp::MAX)
}
