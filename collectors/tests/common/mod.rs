//! Helpers shared by the collectors' tests.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_collectors::pipe::{Handoff, ReadingConsumer, reading_ring};
use sluice_collectors::{Reading, SourceStats};
use sluice_core::shed::ShedPolicy;

/// Waits (bounded) until `done` holds; fails the test with `what` otherwise.
pub async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A hand-off into one ring of `capacity`, with its consumer and counters.
pub fn one_lane(
    capacity: usize,
    policy: ShedPolicy,
) -> (Handoff, ReadingConsumer, Arc<SourceStats>) {
    let (tx, rx) = reading_ring(capacity).unwrap();
    let stats = Arc::new(SourceStats::default());
    let handoff = Handoff::new(vec![tx], policy, 7, stats.clone()).unwrap();
    (handoff, rx, stats)
}

/// Everything in the ring now.
pub fn drain(rx: &mut ReadingConsumer) -> Vec<Reading> {
    let mut out = Vec::new();
    rx.pop_each(usize::MAX, |r| out.push(r));
    out
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    sluice_collectors::reading::now_ms()
}

/// A W1 reading.
pub fn w1(sensor: &str, value: f64) -> String {
    format!(
        r#"{{"sensor":"{sensor}","ts":{},"value":{value}}}"#,
        now_ms()
    )
}

/// Publishes `probe` messages to `topic` until the source has delivered one
/// (its subscription is in place), then drains them from the ring.
pub async fn await_subscription(
    publisher: &sluice_tests::Publisher,
    topic: &str,
    stats: &SourceStats,
    rx: &mut ReadingConsumer,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let start = Instant::now();
    let before = stats.delivered.load(Relaxed);
    while stats.delivered.load(Relaxed) == before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the source never received a probe on {topic}"
        );
        publisher
            .publish(topic, rumqttc::QoS::AtMostOnce, w1("probe", 0.0))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let in-flight probes land, then discard them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drain(rx);
}
