//! Critical readings under sustained overload: a source offers ten times
//! what its worker takes, a tenth of it critical; sampling and drop-newest
//! shed the normal readings, and not one critical reading is lost.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use sluice_collectors::pipe::{Handoff, reading_ring};
use sluice_collectors::{Reading, SourceStats};
use sluice_core::shed::{Priority, ShedPolicy};

/// Runs the overload with `policy`: returns (critical sent, critical
/// received, the source's counters).
fn overload(policy: ShedPolicy) -> (u64, u64, Arc<SourceStats>) {
    let (tx, mut rx) = reading_ring(256).unwrap();
    let stats = Arc::new(SourceStats::default());
    let mut handoff = Handoff::new(vec![tx], policy, 7, stats.clone())
        .unwrap()
        .with_priority(Box::new(|series: &str| {
            if series.starts_with("c-") {
                Priority::Critical
            } else {
                Priority::Normal
            }
        }));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The worker: about 20,000 readings a second.
    let worker = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut critical = 0u64;
            loop {
                let mut took = 0;
                rx.pop_each(8, |r: Reading| {
                    took += 1;
                    if r.series.starts_with("c-") {
                        critical += 1;
                    }
                });
                if took == 0 && done.load(Relaxed) {
                    return critical;
                }
                std::thread::sleep(Duration::from_micros(400));
            }
        })
    };
    // The source: batches of 64 as fast as it can for a second, about ten
    // times the worker's rate at least; one reading in ten critical.
    let (start, mut sent, mut critical_sent) = (Instant::now(), 0u64, 0u64);
    while start.elapsed() < Duration::from_secs(1) || sent < 200_000 {
        for _ in 0..64 {
            let critical = sent % 10 == 0;
            let mut series = sluice_collectors::SeriesKey::new();
            let _ = series.push_str(if critical { "c-1" } else { "n-1" });
            handoff.stage(Reading {
                series,
                ts: sent as i64,
                value: 1.0,
                ingest: 0,
                weight: 1,
                labels: None,
            });
            sent += 1;
            critical_sent += u64::from(critical);
        }
        handoff.flush();
    }
    done.store(true, Relaxed);
    let critical_received = worker.join().unwrap();
    let accounted = stats.delivered.load(Relaxed) + stats.shed_total();
    assert_eq!(accounted, sent, "every reading counted once");
    (critical_sent, critical_received, stats)
}

#[test]
fn ten_times_overload_loses_no_critical_reading_sampling_or_dropping() {
    for policy in [
        ShedPolicy::Sample {
            high_water: 204,
            keep_one_in: 4,
        },
        ShedPolicy::DropNewest { high_water: 204 },
        // A high-water mark at the very top: the reserve still holds.
        ShedPolicy::Sample {
            high_water: 256,
            keep_one_in: 1,
        },
    ] {
        let (sent, received, stats) = overload(policy);
        assert_eq!(received, sent, "{policy:?}: critical readings lost");
        assert!(
            stats.shed_total() > sent,
            "{policy:?}: not an overload ({} shed)",
            stats.shed_total()
        );
    }
}

#[test]
fn a_stuck_worker_costs_the_source_one_wait_not_one_per_critical_reading() {
    // A ring of 16 that nobody drains, and 20 critical readings in a flush.
    let (tx, _rx) = reading_ring(16).unwrap();
    let stats = Arc::new(SourceStats::default());
    let mut handoff = Handoff::new(
        vec![tx],
        ShedPolicy::DropNewest { high_water: 12 },
        7,
        stats.clone(),
    )
    .unwrap()
    .with_priority(Box::new(|_: &str| Priority::Critical));
    for i in 0..20 {
        let mut series = sluice_collectors::SeriesKey::new();
        let _ = series.push_str("c-1");
        handoff.stage(Reading {
            series,
            ts: i,
            value: 1.0,
            ingest: 0,
            weight: 1,
            labels: None,
        });
    }
    handoff.flush();
    // The ring took 16; the first of the other 4 waited CRITICAL_WAIT in
    // vain, and the rest were not waited for (the waits would add up to
    // four times CRITICAL_WAIT).
    assert_eq!(stats.delivered.load(Relaxed), 16);
    assert_eq!(stats.shed_full.load(Relaxed), 4);
    let waited = Duration::from_micros(stats.critical_wait_us.load(Relaxed));
    let one = sluice_collectors::pipe::CRITICAL_WAIT;
    assert!(waited >= one && waited < 3 * one, "waited {waited:?}");
}
