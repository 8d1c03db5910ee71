//! W3: the upstream broker stopped for a while and restarted, the outbox
//! watched meanwhile, and what arrived upstream checked against what was
//! committed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_tests::Broker;

use crate::agent::metric;
use crate::report::Outage;

/// The outage, under way: the upstream broker (restarted), the backlog's
/// peak so far and the task watching it, the records committed when the
/// broker came back, and how long their drain took.
pub(crate) struct Watch {
    up: Broker,
    peak: Arc<AtomicU64>,
    watching: Arc<AtomicBool>,
    watch: tokio::task::JoinHandle<()>,
    at_restart: u64,
    drain_seconds: f64,
}

/// Stops `up` 5 s from now for `seconds`, restarts it, and waits until
/// what was committed by then has arrived upstream (`seqs`, collected by the
/// upstream subscriber).
pub(crate) fn start(
    mut up: Broker,
    seconds: u64,
    seqs: Arc<Mutex<Vec<i64>>>,
    metrics_port: u16,
) -> tokio::task::JoinHandle<Watch> {
    let outage = Duration::from_secs(seconds);
    tokio::spawn(async move {
        let peak = Arc::new(AtomicU64::new(0));
        let watching = Arc::new(AtomicBool::new(true));
        let watch = {
            let (peak, watching) = (peak.clone(), watching.clone());
            tokio::spawn(async move {
                while watching.load(Relaxed) {
                    peak.fetch_max(metric(metrics_port, "sluice_outbox_backlog"), Relaxed);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        up = tokio::task::spawn_blocking(move || {
            up.stop();
            up
        })
        .await
        .expect("stop upstream");
        tokio::time::sleep(outage).await;
        let at_restart = metric(metrics_port, "sluice_outbox_appended_total");
        up = tokio::task::spawn_blocking(move || {
            up.restart();
            up
        })
        .await
        .expect("restart upstream");
        let restarted = Instant::now();
        let drained = |upto: u64| {
            let got: std::collections::BTreeSet<i64> =
                seqs.lock().unwrap().iter().copied().collect();
            got.range(1..=upto as i64).count() as u64 >= upto
        };
        while !drained(at_restart) && restarted.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain_seconds = restarted.elapsed().as_secs_f64();
        Watch {
            up,
            peak,
            watching,
            watch,
            at_restart,
            drain_seconds,
        }
    })
}

/// Once the load has stopped: waits for the backlog to empty, and compares
/// what arrived upstream with what was committed.
pub(crate) async fn finish(
    watch: Watch,
    seconds: u64,
    seqs: &Mutex<Vec<i64>>,
    metrics_port: u16,
) -> Outage {
    let Watch {
        up,
        peak,
        watching,
        watch,
        at_restart,
        drain_seconds,
    } = watch;
    // Everything committed arrives upstream: wait for the backlog to empty.
    let start = Instant::now();
    while metric(metrics_port, "sluice_outbox_backlog") > 0
        && start.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    watching.store(false, Relaxed);
    let _ = watch.await;
    let committed = metric(metrics_port, "sluice_outbox_appended_total");
    let got = seqs.lock().unwrap().clone();
    let distinct: std::collections::BTreeSet<i64> = got.iter().copied().collect();
    let outcome = Outage {
        seconds,
        backlog_peak: peak.load(Relaxed),
        backlog_at_restart: at_restart,
        drain_seconds,
        committed,
        upstream_distinct: distinct.len() as u64,
        missing: (1..=committed as i64)
            .filter(|s| !distinct.contains(s))
            .count() as u64,
        duplicates: (got.len() - distinct.len()) as u64,
    };
    drop(up);
    outcome
}
