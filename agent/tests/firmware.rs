//! The same core on the sensor node: the reference firmware runs in QEMU
//! (Cortex-M4, MPS2 AN386), its UART on a pseudo-terminal that the agent's
//! serial source (`format = "frames"`) reads; the agent merges the node's
//! windows and sketches into its own windows and publishes them over MQTT
//! and through its outbox and uplink, like its own aggregates. The test recomputes every reading the node
//! generated and checks what the agent published against it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rumqttc::QoS;
use serde_json::Value;
use sluice_tests::firmware::{Qemu, firmware_elf};
use sluice_tests::{Broker, metric, start_agent, wait_until};

/// What the firmware runs.
use sluice_core::node::reference::{PERIOD_MS, READINGS, SENSORS, SPIKE, signal};
/// The gateway's window here: two node windows.
const GATEWAY_MS: i64 = 2_000;

type Received = Arc<Mutex<Vec<(String, Value)>>>;

async fn subscribe(port: u16, id: &str, filter: &str) -> Received {
    let got: Received = Arc::default();
    let sink = got.clone();
    sluice_tests::subscribe(port, id, filter, QoS::AtLeastOnce, true, move |p| {
        if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
            sink.lock().unwrap().push((p.topic.clone(), v));
        }
    })
    .await;
    got
}

/// The exact `q` quantile's neighbours (ranks floor and ceil of q·(n−1)).
fn exact_quantile(sorted: &[f64], q: f64) -> (f64, f64) {
    let r = q * (sorted.len() - 1) as f64;
    (sorted[r.floor() as usize], sorted[r.ceil() as usize])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_qemu_sends_windows_and_sketches_that_the_gateway_merges_exactly() {
    let dir = sluice_tests::temp_dir("firmware");
    let elf = firmware_elf();
    let broker = Broker::start("firmware");
    let got = subscribe(broker.port, "fw-output", "sluice/fw/#").await;
    // What the uplink forwards from the outbox (store and forward).
    let upstream = subscribe(broker.port, "fw-upstream", "upstream/fw/#").await;
    let qemu = Qemu::start(&elf, &[]);
    let metrics = sluice_tests::free_port();
    let config = dir.path().join("fw.toml");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "fw"

[sources.node]
kind = "serial"
device = "{pty}"
baud = 115200
format = "frames"

[nodes]
window_ms = {GATEWAY_MS}
quantiles = [0.5, 0.9, 0.99]

[output.mqtt]
host = "127.0.0.1"
port = {port}

[outbox]
path = "{outbox}"

[uplink]
host = "127.0.0.1"
port = {port}
aggregate_topic = "upstream/{{agent}}/agg/{{series}}"

[metrics]
listen = "127.0.0.1:{metrics}"
"#,
            pty = qemu.pty.display(),
            port = broker.port,
            outbox = dir.path().join("outbox.db").display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut agent = start_agent(env!("CARGO_BIN_EXE_sluice"), &config, &log);

    let aggregates = || -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.starts_with("sluice/fw/agg/"))
            .map(|(_, v)| v.clone())
            .collect()
    };
    let total = u64::from(SENSORS) * READINGS;
    wait_until("every node reading in a merged aggregate", &log, || {
        aggregates()
            .iter()
            .map(|a| a["count"].as_u64().unwrap())
            .sum::<u64>()
            >= total
    })
    .await;
    let aggs = aggregates();
    assert_eq!(
        metric(metrics, "sluice_node_records_refused_total"),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        aggs.iter()
            .map(|a| a["count"].as_u64().unwrap())
            .sum::<u64>(),
        total,
        "every reading counted once"
    );

    // The node's first reading: its first window starts at a whole second,
    // so the earliest gateway window holds 200 or 100 of a sensor's readings.
    let first = aggs
        .iter()
        .filter(|a| a["series"] == "node-1/s0")
        .min_by_key(|a| a["start"].as_i64().unwrap())
        .unwrap();
    let t0 = first["start"].as_i64().unwrap() + GATEWAY_MS
        - PERIOD_MS * first["count"].as_i64().unwrap();

    // The reference: every reading the node generated, by series and window.
    let mut windows: BTreeMap<(String, i64), Vec<(f64, u32)>> = BTreeMap::new();
    for s in 0..SENSORS {
        let mut signal = signal(s);
        for i in 0..READINGS as i64 {
            let ts = t0 + i * PERIOD_MS;
            windows
                .entry((
                    format!("node-1/s{s}"),
                    ts.div_euclid(GATEWAY_MS) * GATEWAY_MS,
                ))
                .or_default()
                .push(signal.next_reading());
        }
    }
    assert_eq!(
        aggs.len(),
        windows.len(),
        "one aggregate per series and window"
    );
    for a in &aggs {
        let key = (
            a["series"].as_str().unwrap().to_owned(),
            a["start"].as_i64().unwrap(),
        );
        let readings = &windows[&key];
        let values: Vec<f64> = readings.iter().map(|r| r.0).collect();
        let n = values.len();
        assert_eq!(a["end"].as_i64().unwrap(), key.1 + GATEWAY_MS);
        assert_eq!(a["count"].as_u64().unwrap(), n as u64, "{key:?}");
        // Integer readings: sums are exact in f64.
        assert_eq!(
            a["sum"].as_f64().unwrap(),
            values.iter().sum::<f64>(),
            "{key:?}"
        );
        let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(a["min"].as_f64().unwrap(), min);
        assert_eq!(a["max"].as_f64().unwrap(), max);
        assert_eq!(a["first"].as_f64().unwrap(), values[0]);
        assert_eq!(a["last"].as_f64().unwrap(), values[n - 1]);
        let mean = values.iter().sum::<f64>() / n as f64;
        assert!((a["mean"].as_f64().unwrap() - mean).abs() < 1e-9 * mean);
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!(
            (a["stddev"].as_f64().unwrap() - var.sqrt()).abs() < 1e-6,
            "{key:?}"
        );
        // Quantiles from the merged DDSketches: within 1 % of the exact ones.
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
            let got = a["quantiles"][name]
                .as_f64()
                .unwrap_or_else(|| panic!("{name} in {a}"));
            let (lo, hi) = exact_quantile(&sorted, q);
            assert!(
                got >= lo * 0.99 && got <= hi * 1.01,
                "{key:?} {name}: {got} not within 1 % of [{lo}, {hi}]"
            );
        }
        // Distinct tags from the merged HyperLogLogs: at most 64 tags, where
        // the sketch is nearly exact.
        let mut tags: Vec<u32> = readings.iter().map(|r| r.1).collect();
        tags.sort();
        tags.dedup();
        let distinct = &a["distinct"];
        assert_eq!(distinct["label"], "tag");
        let estimate = distinct["estimate"].as_f64().unwrap();
        assert!(
            (estimate - tags.len() as f64).abs() <= 1.0,
            "{key:?}: {estimate} distinct tags, exactly {}",
            tags.len()
        );
        // Complete windows are not partial; the node's first and last,
        // which it filled only half, are.
        let complete = n as i64 == GATEWAY_MS / PERIOD_MS;
        assert_eq!(a["partial"].as_bool().unwrap(), !complete, "{key:?}");
    }

    // The same aggregates went through the outbox and the uplink.
    let forwarded = || -> Vec<(String, i64, u64, f64)> {
        let mut v: Vec<_> = upstream
            .lock()
            .unwrap()
            .iter()
            .map(|(_, a)| {
                (
                    a["series"].as_str().unwrap().to_owned(),
                    a["start"].as_i64().unwrap(),
                    a["count"].as_u64().unwrap(),
                    a["sum"].as_f64().unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        v.dedup();
        v
    };
    wait_until("the aggregates upstream", &log, || {
        forwarded().len() == aggs.len()
    })
    .await;
    let mut published: Vec<_> = aggs
        .iter()
        .map(|a| {
            (
                a["series"].as_str().unwrap().to_owned(),
                a["start"].as_i64().unwrap(),
                a["count"].as_u64().unwrap(),
                a["sum"].as_f64().unwrap(),
            )
        })
        .collect();
    published.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert_eq!(forwarded(), published);

    // The spike raised exactly one alert, on its series, at its time.
    let alerts: Vec<Value> = got
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, v)| t.starts_with("sluice/fw/alerts/") && v["state"] == "raised")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["series"], "node-1/s1");
    assert_eq!(
        alerts[0]["event_ts"].as_i64().unwrap(),
        t0 + SPIKE.1 as i64 * PERIOD_MS
    );
    assert_eq!(alerts[0]["rule"], "zscore");

    // Nothing refused; the node's own account arrived.
    assert_eq!(
        metric(metrics, "sluice_node_records_refused_total"),
        Some(0)
    );
    assert_eq!(
        metric(metrics, "sluice_node_windows_total"),
        Some(SENSORS as u64 * 6)
    );
    wait_until("the node's stats", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&format!("readings={total}"))
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("unsent=0"), "{text}");

    // SIGTERM: the source, the merger and the outputs stop in order, and
    // the agent exits 0 within its shutdown bound (10 s).
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "the agent did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");
    drop(qemu);
}
