//! A sensor node's pipeline: what a microcontroller runs per sensor before
//! it sends anything to its gateway.
//!
//! [`NodeSensor`] keeps, in fixed memory, a [`TumblingWindow`] of the
//! sensor's readings, an EWMA [`ZScoreDetector`] on them, and for each
//! window a [`DdSketch`] of the values (quantiles) and a [`HyperLogLog`] of
//! a label's values (distinct count). When a window closes it hands over the
//! window's aggregate and both sketches, ready to encode as
//! [`link`](crate::link) records, and resets the sketches; each alert
//! transition it hands over at once. Readings must come in event-time
//! order (a node samples them so): one that goes back before the open
//! window is refused as late.
//!
//! [`TestSignal`] is the deterministic signal the reference firmware
//! samples, so that a host recomputes exactly what the node saw.

use crate::Timestamp;
use crate::aggregate::Aggregate;
use crate::anomaly::{Hysteresis, RuleError, Transition, ZScoreDetector};
use crate::rng::SplitMix64;
use crate::sketch::{DdSketch, HyperLogLog, SketchError};
use crate::window::{Closed, Rejection, TumblingWindow, WindowError};

/// What a [`NodeSensor`] hands over.
pub enum NodeOutput<'a, const B: usize, const H: usize> {
    /// A window closed: its aggregate, and its sketches (reset after this).
    Window {
        /// The window and its aggregate.
        closed: Closed<Aggregate>,
        /// The window's values.
        quantiles: &'a DdSketch<[u64; B]>,
        /// The window's label values.
        distinct: &'a HyperLogLog<[u8; H]>,
    },
    /// An alert was raised or cleared by the reading at `ts`.
    Alert {
        /// Event time of the reading.
        ts: Timestamp,
        /// Its value.
        value: f64,
        /// Its |z|.
        score: f64,
        /// The level crossed: the raise level, or the clear level.
        level: f64,
        /// Raised (true) or cleared (false).
        raised: bool,
    },
}

/// Why a [`NodeSensor`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NodeError {
    /// The window's length.
    Window(WindowError),
    /// The detector's parameters.
    Detector(RuleError),
    /// A sketch's parameters.
    Sketch(SketchError),
}

/// One sensor's pipeline on a node: a window, a detector and two sketches,
/// `B` quantile buckets (`B/2` a sign) and a HyperLogLog of `H` bytes of storage
/// ([`hll::storage_bytes`](crate::sketch::hll::storage_bytes)).
pub struct NodeSensor<const B: usize, const H: usize> {
    window: TumblingWindow<1>,
    detector: ZScoreDetector,
    quantiles: DdSketch<[u64; B]>,
    distinct: HyperLogLog<[u8; H]>,
}

impl<const B: usize, const H: usize> NodeSensor<B, H> {
    /// A pipeline with windows of `window_ms`, the detector `detector`, and
    /// quantiles within `accuracy` (relative).
    pub fn new(
        window_ms: Timestamp,
        detector: ZScoreDetector,
        accuracy: f64,
    ) -> Result<Self, NodeError> {
        Ok(Self {
            window: TumblingWindow::new(window_ms, 0).map_err(NodeError::Window)?,
            detector,
            quantiles: DdSketch::with_storage([0; B], accuracy).map_err(NodeError::Sketch)?,
            distinct: HyperLogLog::with_storage([0; H]).map_err(NodeError::Sketch)?,
        })
    }

    /// The reference firmware's detector: |z| ≥ 6 raises, below 3 clears
    /// (each after one reading), α = 0.05, from the 50th reading.
    pub fn default_detector() -> ZScoreDetector {
        let levels = match Hysteresis::new(6.0, 3.0, 1, 1) {
            Ok(l) => l,
            Err(_) => unreachable!("constant, valid levels"),
        };
        match ZScoreDetector::new(0.05, 50, levels) {
            Ok(d) => d,
            Err(_) => unreachable!("constant, valid parameters"),
        }
    }

    /// Adds a reading at `ts` of `value` whose label is `label`; hands over
    /// the window it closes (before the reading joins the next) and the
    /// alert transition it causes.
    pub fn push(
        &mut self,
        ts: Timestamp,
        value: f64,
        label: &[u8],
        mut emit: impl FnMut(NodeOutput<'_, B, H>),
    ) -> Result<(), Rejection> {
        let Self {
            window,
            detector,
            quantiles,
            distinct,
        } = self;
        window.push(ts, value, |closed| {
            hand_over(closed, quantiles, distinct, &mut emit)
        })?;
        quantiles.insert(value);
        distinct.insert(label);
        if let Ok(verdict) = detector.observe(value)
            && let (Some(t), Some(score)) = (verdict.transition, verdict.score)
        {
            let raised = t == Transition::Raised;
            let levels = detector.machine().levels();
            emit(NodeOutput::Alert {
                ts,
                value,
                score: libm::fabs(score),
                level: if raised {
                    levels.raise_at()
                } else {
                    levels.clear_below()
                },
                raised,
            });
        }
        Ok(())
    }

    /// Closes the open window as if time reached `ts` (the node's clock
    /// moved on without a reading).
    pub fn advance_to(&mut self, ts: Timestamp, mut emit: impl FnMut(NodeOutput<'_, B, H>)) {
        let Self {
            window,
            quantiles,
            distinct,
            ..
        } = self;
        window.advance_to(ts, |closed| {
            hand_over(closed, quantiles, distinct, &mut emit)
        });
    }
}

/// Hands over a closed window with its sketches, then clears them for the
/// next.
fn hand_over<const B: usize, const H: usize>(
    closed: Closed<Aggregate>,
    quantiles: &mut DdSketch<[u64; B]>,
    distinct: &mut HyperLogLog<[u8; H]>,
    emit: &mut impl FnMut(NodeOutput<'_, B, H>),
) {
    emit(NodeOutput::Window {
        closed,
        quantiles,
        distinct,
    });
    quantiles.clear();
    distinct.clear();
}

/// The reference firmware's sensor signal: integer ADC counts around a
/// level (2000 + 100·sensor) with uniform noise of ±20, one spike of +600
/// at a chosen reading, and a label (a tag id, 0–63) per reading, all from
/// one seeded [`SplitMix64`] per sensor.
pub struct TestSignal {
    rng: SplitMix64,
    level: f64,
    spike_at: Option<u64>,
    n: u64,
}

impl TestSignal {
    /// Sensor `sensor`'s signal from `seed`, with a spike at reading
    /// `spike_at` (counting from 0), if any.
    pub fn new(seed: u64, sensor: u32, spike_at: Option<u64>) -> Self {
        Self {
            rng: SplitMix64::new(seed ^ (u64::from(sensor) << 32)),
            level: 2000.0 + 100.0 * f64::from(sensor),
            spike_at,
            n: 0,
        }
    }

    /// The next reading: its value and its tag id.
    pub fn next_reading(&mut self) -> (f64, u32) {
        let noise = self.rng.below(41) as f64 - 20.0;
        let tag = self.rng.below(64) as u32;
        let spike = if Some(self.n) == self.spike_at {
            600.0
        } else {
            0.0
        };
        self.n += 1;
        (self.level + noise + spike, tag)
    }
}

/// The reference firmware's run (`firmware/`), which its test and its
/// benchmark regenerate reading by reading: one place for the numbers.
pub mod reference {
    use super::TestSignal;

    /// Sensors on the node.
    pub const SENSORS: u32 = 4;
    /// Readings a sensor takes (the firmware's default run: 6 s).
    pub const READINGS: u64 = 600;
    /// Sampling period, ms (100 Hz).
    pub const PERIOD_MS: i64 = 10;
    /// Window length, ms (the firmware's default).
    pub const WINDOW_MS: i64 = 1_000;
    /// The signals' seed.
    pub const SEED: u64 = 0x5EED_0001;
    /// Which sensor spikes, at which of its readings.
    pub const SPIKE: (u32, u64) = (1, 250);

    /// Sensor `sensor`'s signal, spike included.
    pub fn signal(sensor: u32) -> TestSignal {
        TestSignal::new(SEED, sensor, (sensor == SPIKE.0).then_some(SPIKE.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn a_window_hands_over_its_aggregate_and_sketches_then_starts_afresh() {
        let mut s: NodeSensor<64, 384> =
            NodeSensor::new(1_000, NodeSensor::<64, 384>::default_detector(), 0.01).unwrap();
        let mut windows = Vec::new();
        let mut signal = TestSignal::new(1, 0, None);
        let mut exact: Vec<(Timestamp, f64, u32)> = Vec::new();
        let mut take = |out: NodeOutput<'_, 64, 384>| {
            if let NodeOutput::Window {
                closed,
                quantiles,
                distinct,
            } = out
            {
                windows.push((closed, quantiles.count(), distinct.estimate()));
            }
        };
        for i in 0..250 {
            let (v, tag) = signal.next_reading();
            let ts = 10_000 + i * 10;
            exact.push((ts, v, tag));
            s.push(ts, v, &tag.to_le_bytes(), &mut take).unwrap();
        }
        s.advance_to(12_500, &mut take);
        assert_eq!(windows.len(), 2);
        for (closed, sketched, distinct) in &windows {
            let inside: Vec<_> = exact
                .iter()
                .filter(|(ts, _, _)| *ts >= closed.start && *ts < closed.end)
                .collect();
            assert_eq!(closed.acc.count(), 100);
            assert_eq!(
                *sketched, 100,
                "the sketch holds the window's readings only"
            );
            assert_eq!(closed.acc.sum(), inside.iter().map(|r| r.1).sum::<f64>());
            let mut tags: Vec<u32> = inside.iter().map(|r| r.2).collect();
            tags.sort();
            tags.dedup();
            assert!((distinct - tags.len() as f64).abs() <= 2.0);
        }
    }

    #[test]
    fn the_spike_raises_one_alert_and_nothing_else_does() {
        let mut s: NodeSensor<64, 384> =
            NodeSensor::new(1_000, NodeSensor::<64, 384>::default_detector(), 0.01).unwrap();
        let mut signal = TestSignal::new(7, 2, Some(300));
        let mut raised = Vec::new();
        for i in 0..1_000 {
            let (v, tag) = signal.next_reading();
            s.push(i * 10, v, &tag.to_le_bytes(), |out| {
                if let NodeOutput::Alert {
                    ts, raised: true, ..
                } = out
                {
                    raised.push(ts);
                }
            })
            .unwrap();
        }
        assert_eq!(raised, [3_000]);
    }
}
