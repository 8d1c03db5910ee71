//! What each source counts, and rate-limited logging of bad input.
//!
//! Counters are atomics shared between the source's task and whoever reports
//! them (metrics, tests); updating one is a relaxed add.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a message or a reading was refused before it reached a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not valid JSON (or not valid UTF-8 in a string).
    Malformed,
    /// A message, line or datagram longer than the configured maximum.
    Oversize,
    /// The JSON document is not an object.
    NotAnObject,
    /// The series key is missing or not a string or number.
    MissingSeries,
    /// The series key is longer than [`crate::MAX_SERIES_LEN`].
    SeriesTooLong,
    /// The series key holds a character the series id policy refuses (a
    /// control character or an invisible bidirectional-text control; see
    /// [`crate::reading::series_problem`]).
    BadSeries,
    /// A configured label holds something other than text or an integer,
    /// text longer than [`crate::reading::MAX_LABEL_LEN`], or a character
    /// the series id policy refuses.
    BadLabel,
    /// No configured value field is present.
    MissingValue,
    /// A value field holds something other than a number.
    NotNumeric,
    /// A value is NaN or infinite (or too large for a float).
    NonFinite,
    /// A value is finite but beyond ±[`sluice_core::MAX_VALUE`] (10¹⁰⁰),
    /// where sums and variances could overflow: a sensor fault.
    OutOfRange,
    /// The timestamp field is missing or cannot be parsed.
    BadTimestamp,
    /// The event time is further in the future than the allowed clock skew.
    TooFarInFuture,
    /// The event time is further in the past than the allowed age.
    TooOld,
    /// A datagram from a sender outside the allow-list.
    SenderNotAllowed,
    /// An empty message: an empty datagram, or a blank line of a datagram
    /// or a serial stream. Counted so that every message is, but not
    /// logged as a warning (blank lines are common and harmless).
    Empty,
}

impl Reason {
    /// Every reason, for reports.
    pub const ALL: [Reason; 16] = [
        Reason::Malformed,
        Reason::Oversize,
        Reason::NotAnObject,
        Reason::MissingSeries,
        Reason::SeriesTooLong,
        Reason::BadSeries,
        Reason::BadLabel,
        Reason::MissingValue,
        Reason::NotNumeric,
        Reason::NonFinite,
        Reason::OutOfRange,
        Reason::BadTimestamp,
        Reason::TooFarInFuture,
        Reason::TooOld,
        Reason::SenderNotAllowed,
        Reason::Empty,
    ];

    /// A short name, for metric labels and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Oversize => "oversize",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingSeries => "missing_series",
            Reason::SeriesTooLong => "series_too_long",
            Reason::BadSeries => "bad_series",
            Reason::BadLabel => "bad_label",
            Reason::MissingValue => "missing_value",
            Reason::NotNumeric => "not_numeric",
            Reason::NonFinite => "non_finite",
            Reason::OutOfRange => "out_of_range",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::TooFarInFuture => "too_far_in_future",
            Reason::TooOld => "too_old",
            Reason::SenderNotAllowed => "sender_not_allowed",
            Reason::Empty => "empty",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one source.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Messages (MQTT publishes, lines, datagram lines) received.
    pub messages: AtomicU64,
    /// Bytes received.
    pub bytes: AtomicU64,
    /// Readings decoded.
    pub decoded: AtomicU64,
    /// Readings handed to a ring.
    pub delivered: AtomicU64,
    /// Batches pushed into a ring (each may wake its worker): `delivered`
    /// over `handoffs` is the readings a hand-off carries.
    pub handoffs: AtomicU64,
    /// Readings shed by the policy above the high-water mark (drop-newest).
    pub shed_high_water: AtomicU64,
    /// Readings shed by sampling.
    pub shed_sampled: AtomicU64,
    /// Readings dropped because the ring was full.
    pub shed_full: AtomicU64,
    /// Time the source waited for room for critical readings in a full
    /// ring, µs (see `pipe`).
    pub critical_wait_us: AtomicU64,
    /// Times the source (re)connected or (re)opened its device.
    pub connects: AtomicU64,
    /// Times the connection or device failed.
    pub disconnects: AtomicU64,
    /// Whether the source is connected (MQTT), has its device open
    /// (serial) or is bound (UDP).
    pub up: std::sync::atomic::AtomicBool,
    /// Datagrams the kernel dropped before the source could read them (a
    /// full UDP receive buffer): the socket's own drop count (`SO_MEMINFO`),
    /// read after each batch. Always 0 for other sources.
    pub kernel_drops: AtomicU64,
    /// Ingest time minus event time of the latest reading, ms (the sender's
    /// clock skew plus transit time).
    pub skew_ms: AtomicI64,
    rejected: [AtomicU64; Reason::ALL.len()],
}

impl SourceStats {
    /// Counts one refusal.
    pub fn reject(&self, reason: Reason) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals for `reason` so far.
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Refusals for every reason so far.
    pub fn rejected_total(&self) -> u64 {
        Reason::ALL.iter().map(|&r| self.rejected(r)).sum()
    }

    /// Readings shed, all reasons.
    pub fn shed_total(&self) -> u64 {
        self.shed_high_water.load(Ordering::Relaxed)
            + self.shed_sampled.load(Ordering::Relaxed)
            + self.shed_full.load(Ordering::Relaxed)
    }
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Logs a warning per reason at most once per interval, with the number of
/// occurrences suppressed since the last line, so that a flood of bad input
/// cannot flood the journal.
#[derive(Debug)]
pub struct RateLimitedLog {
    source: String,
    interval: Duration,
    state: Mutex<[(Option<Instant>, u64); Reason::ALL.len()]>,
}

impl RateLimitedLog {
    /// A log for `source`, one line per reason per `interval`.
    pub fn new(source: impl Into<String>, interval: Duration) -> Self {
        Self {
            source: source.into(),
            interval,
            state: Mutex::new([(None, 0); Reason::ALL.len()]),
        }
    }

    /// Records one refusal; logs it unless this reason was logged within the
    /// interval.
    pub fn warn(&self, reason: Reason, detail: &dyn std::fmt::Display) {
        if reason == Reason::Empty {
            tracing::debug!(source = %self.source, "empty message: {detail}");
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (last, suppressed) = &mut state[reason as usize];
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            *suppressed += 1;
            return;
        }
        tracing::warn!(
            source = %self.source,
            reason = reason.as_str(),
            suppressed = *suppressed,
            "rejected input: {detail}"
        );
        *last = Some(now);
        *suppressed = 0;
    }
}
