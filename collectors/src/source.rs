//! What every source shares: the decoding sink that counts, logs and stages.

use std::time::Duration;

use crate::decode::DecodeSink;
use crate::pipe::Handoff;
use crate::reading::Reading;
use crate::stats::{RateLimitedLog, Reason, add};

/// How often each kind of bad input may be logged per source.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Stages decoded readings in the hand-off; counts and logs refusals.
pub(crate) struct Ingest<'a> {
    pub(crate) handoff: &'a mut Handoff,
    pub(crate) log: &'a RateLimitedLog,
}

impl DecodeSink for Ingest<'_> {
    fn reading(&mut self, reading: Reading) {
        let stats = self.handoff.stats();
        add(&stats.decoded, 1);
        stats.skew_ms.store(
            reading.ingest.saturating_sub(reading.ts),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.handoff.stage(reading);
    }

    fn reject(&mut self, reason: Reason, detail: &dyn std::fmt::Display) {
        self.handoff.stats().reject(reason);
        self.log.warn(reason, detail);
    }
}
