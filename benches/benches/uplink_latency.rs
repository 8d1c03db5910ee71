//! Live-path latency of the uplink, per kind: from the moment a record is
//! committed to the outbox (as the writer commits each aggregate) to the
//! moment the upstream broker or log has acknowledged it and the uplink has
//! deleted it from the outbox (`sluice_uplink_acked_total` counts it then).
//! Records are committed one at a time at a steady rate; a monitor thread
//! reads the acknowledged count every 100 µs, and a record's latency is
//! when the count first covered it minus when it was committed (each kind
//! acknowledges a session's records in `seq` order, or within one window).
//!
//! `cargo bench -p sluice-benches --bench uplink_latency [--features nats,kafka]`
//! (`RATE` records/s, default 1,000; `SECONDS`, default 10; needs
//! `mosquitto`, `nats-server` for NATS and tansu for Kafka: `SLUICE_TANSU`).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

#[path = "support/uplink.rs"]
mod uplink;

/// Commits `rate` records a second for `seconds` to a fresh outbox that an
/// uplink of `kind` forwards to `port`, and returns the latencies in µs
/// from each commit to its acknowledgement.
fn run(
    kind: &str,
    port: u16,
    destination: &str,
    (rate, seconds): (u64, u64),
    dir: &std::path::Path,
) -> Histogram<u64> {
    let path = dir.join(format!("latency-{kind}.db"));
    let _ = std::fs::remove_file(&path);
    let mut writer = uplink::open(&path);
    let uplink = uplink::Uplink::start(&path, kind, port, 64);
    let stats = uplink.stats.clone();
    // Connected, and a first record through, before measuring.
    writer
        .append(&[(destination.to_string(), b"{\"warm\":true}".to_vec())], 0)
        .unwrap();
    while stats.acked.load(Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let n = rate * seconds;
    // Commit times, and the monitor that turns acknowledgements into
    // latencies (the warm-up record is acknowledged already).
    let committed = Arc::new(Mutex::new(Vec::<Instant>::with_capacity(n as usize)));
    let monitor = {
        let (committed, stats) = (committed.clone(), stats.clone());
        std::thread::spawn(move || {
            let mut histogram = Histogram::<u64>::new(3).unwrap();
            let deadline = Instant::now() + Duration::from_secs(seconds + 30);
            while histogram.len() < n {
                let acked = stats.acked.load(Relaxed) - 1;
                let now = Instant::now();
                {
                    let committed = committed.lock().unwrap();
                    let upto = acked.min(committed.len() as u64);
                    for at in &committed[histogram.len() as usize..upto as usize] {
                        let us = now.duration_since(*at).as_micros() as u64;
                        histogram.record(us.max(1)).unwrap();
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{} of {n} acknowledged",
                    histogram.len()
                );
                std::thread::sleep(Duration::from_micros(100));
            }
            histogram
        })
    };
    let start = Instant::now();
    let payload = br#"{"series":"s-0042","count":20,"mean":21.37,"min":19.8,"max":23.1}"#;
    for i in 0..n {
        let due = start + Duration::from_micros(i * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        writer
            .append(&[(destination.to_string(), payload.to_vec())], 0)
            .unwrap();
        committed.lock().unwrap().push(Instant::now());
    }
    let histogram = monitor.join().unwrap();
    uplink.stop();
    histogram
}

fn report(kind: &str, h: &Histogram<u64>) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{kind:<24} p50 {:>6.2} ms  p99 {:>6.2} ms  p99.9 {:>6.2} ms  max {:>6.2} ms  ({} records)",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    );
}

fn main() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let load = (env("RATE", 1_000), env("SECONDS", 10));
    let dir = std::env::temp_dir().join(format!("sluice-latency-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "{} records/s for {} s, each committed alone; commit to acknowledgement",
        load.0, load.1
    );
    let broker = sluice_tests::Broker::start("latency-bench");
    let topic = "sluice/gateway-01/agg/s-0042";
    report(
        "MQTT (Mosquitto)",
        &run("mqtt", broker.port, topic, load, &dir),
    );
    #[cfg(feature = "nats")]
    {
        let server = sluice_benches::upstream::nats("latency-bench");
        let h = run(
            "nats",
            server.port,
            "sluice.gateway-01.agg.s-0042",
            load,
            &dir,
        );
        report("NATS JetStream", &h);
    }
    #[cfg(feature = "kafka")]
    {
        let broker = sluice_benches::upstream::kafka("latency-bench");
        let h = run("kafka", broker.port, "sluice.aggregates/s-0042", load, &dir);
        report("Kafka (tansu)", &h);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
