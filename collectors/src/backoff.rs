//! Capped exponential backoff with jitter, for reconnecting and reopening.

use std::time::Duration;

use sluice_core::rng::SplitMix64;

/// Delays that double from `min` up to `max`, each drawn uniformly from the
/// upper half of the current step ("equal jitter"), so that many gateways
/// that lost the same broker do not all come back in the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: SplitMix64,
}

impl Backoff {
    /// Delays from `min` up to `max` (`max` is raised to `min` if smaller).
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max: max.max(min),
            step: min,
            rng: SplitMix64::new(seed),
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let jitter_ns = self.rng.below(half.as_nanos().max(1) as u64);
        half + Duration::from_nanos(jitter_ns)
    }

    /// Starts again from `min` (after a success).
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 3);
        let steps = [100, 200, 400, 800, 1000, 1000];
        for ms in steps {
            let d = b.next_delay();
            let step = Duration::from_millis(ms);
            assert!(d >= step / 2 && d <= step, "{d:?} for step {step:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
