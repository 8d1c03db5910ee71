//! The through-the-agent phase: the `sluice` binary on the W1 load, with
//! the W3 outage and the overload burst when asked for.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sluice_tests::Broker;

use crate::Args;
use crate::load::{Spikes, Workload, epoch_us, field_i64, progress, publish_all, subscribe};
use crate::report::{Percentiles, Phase, histogram, percentiles};

/// W1's rule, when no `--config` gives the rules to measure.
const W1_RULES: &str = r#"
max_series = 20000
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 1000 }
anomaly = { alpha = 0.01, k = 4.0, warmup = 30 }
"#;

/// What the benchmark sets in the agent's configuration whatever `--config`
/// says: where readings come from and results go (the benchmark's broker,
/// under its topic root), the metrics it reads, no store-and-forward (the
/// benchmark's readings must not go upstream) and no checkpoints (nor into
/// the state of the agent whose configuration it borrowed).
const REPLACED: [&str; 7] = [
    "agent_id",
    "sources",
    "output",
    "metrics",
    "outbox",
    "uplink",
    "checkpoint",
];

pub(crate) fn metric(port: u16, name: &str) -> u64 {
    sluice_tests::metric(port, name).unwrap_or(0)
}

/// CPU ticks (user + system) and RSS (KiB) of `pid`.
pub(crate) fn proc_sample(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks, rss))
}

pub(crate) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub(crate) fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's configuration for this run: the rules (windows, detectors,
/// sketches, shedding, workers, tables …) of `--config`, or W1's; the
/// benchmark's broker at `port` as source and output, under the run's topic
/// root; metrics on `metrics_port`; and what the options add (workers,
/// sampling, ring size, a critical rule, batched aggregates, the UDP
/// burst's source on `udp_port`).
pub(crate) fn config_text(
    args: &Args,
    port: u16,
    metrics_port: u16,
    udp_port: u16,
) -> Result<String, String> {
    use toml::{Table, Value};
    let (mut config, base_dir) = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let config: Table = text
                .parse()
                .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
            let dir = path
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            (config, dir)
        }
        None => (W1_RULES.parse::<Table>().expect("W1's rules"), None),
    };
    // Settings of the borrowed output that change its cost: kept.
    let kept_output: Table = config
        .get("output")
        .and_then(|o| o.get("mqtt"))
        .and_then(Value::as_table)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "alert_qos" | "aggregate_qos" | "aggregate_batch"
                    )
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    // The labels the sources read: rules may group, join or count by them
    // (the load's readings carry none, so those see one value: none).
    let mut labels: Vec<Value> = Vec::new();
    for source in config
        .get("sources")
        .and_then(Value::as_table)
        .into_iter()
        .flat_map(|s| s.values())
    {
        for label in source
            .get("json")
            .and_then(|j| j.get("labels"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !labels.contains(label) {
                labels.push(label.clone());
            }
        }
    }
    for key in REPLACED {
        config.remove(key);
    }
    // A table's relative path is relative to the file that names it, and
    // the agent reads this configuration from elsewhere.
    if let (Some(dir), Some(tables)) = (
        &base_dir,
        config.get_mut("tables").and_then(Value::as_table_mut),
    ) {
        for (_, table) in tables.iter_mut() {
            if let Some(path) = table.get_mut("path")
                && let Some(relative) = path.as_str().filter(|p| Path::new(p).is_relative())
            {
                *path = Value::String(dir.join(relative).display().to_string());
            }
        }
    }
    let pid = std::process::id();
    let host = crate::load::broker_host();
    let root = crate::load::topic("");
    let mut settings = format!(
        r#"agent_id = "bench"
[sources.sensors]
kind = "mqtt"
host = "{host}"
port = {port}
client_id = "bench-agent-{pid}"
topics = ["{root}sensors/+"]
[output.mqtt]
host = "{host}"
port = {port}
client_id = "bench-agent-out-{pid}"
aggregate_topic = "{root}agg/{{series}}"
aggregate_batch_topic = "{root}aggbatch"
alert_topic = "{root}alerts/{{series}}"
state_topic = "{root}state/{{series}}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
stats_interval_s = 0
"#
    );
    if args.burst_udp {
        settings += &format!("[sources.burst]\nkind = \"udp\"\nbind = \"127.0.0.1:{udp_port}\"\n");
        if let Some(size) = args.burst_recv_buffer {
            settings += &format!("recv_buffer = {size}\n");
        }
    }
    let mut settings: Table = settings.parse().expect("the benchmark's settings");
    if !labels.is_empty()
        && let Some(Value::Table(sensors)) = settings
            .get_mut("sources")
            .and_then(|s| s.get_mut("sensors"))
    {
        let mut json = Table::new();
        json.insert("labels".into(), Value::Array(labels));
        sensors.insert("json".into(), Value::Table(json));
    }
    if let Some(ms) = args.gather_ms
        && let Some(Value::Table(sensors)) = settings
            .get_mut("sources")
            .and_then(|s| s.get_mut("sensors"))
    {
        sensors.insert("gather_ms".into(), Value::Integer(ms as i64));
    }
    for (k, v) in settings {
        config.insert(k, v);
    }
    if let Some(mqtt) = config
        .get_mut("output")
        .and_then(|o| o.get_mut("mqtt"))
        .and_then(Value::as_table_mut)
    {
        mqtt.extend(kept_output);
        if let Some(n) = args.aggregate_batch {
            mqtt.insert("aggregate_batch".into(), Value::Integer(n as i64));
        }
    }
    if let Some(n) = args.workers {
        config.insert("workers".into(), Value::Integer(n as i64));
    }
    if let Some(n) = args.ring_capacity {
        config.insert("ring_capacity".into(), Value::Integer(n as i64));
    }
    if let Some(f) = args.sample_above {
        let shedding: Table = format!("policy = \"sample\"\nhigh_water = {f}\nkeep_one_in = 4")
            .parse()
            .expect("shedding");
        config.insert("shedding".into(), Value::Table(shedding));
    }
    if args.critical_every.is_some() {
        // First match wins: the critical series' rule goes first.
        let critical: Table = "match = \"c-*\"\npriority = \"critical\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }"
            .parse()
            .expect("critical rule");
        let rules = config
            .entry("rules")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(rules) = rules {
            rules.insert(0, Value::Table(critical));
        }
    }
    Ok(toml::to_string(&config).expect("a TOML table serializes"))
}

/// Phase 2: publisher → broker → agent → broker → subscriber.
pub(crate) async fn through_agent(w: Workload, port: u16, args: &Args, agent_bin: &Path) -> Phase {
    let metrics_port = sluice_tests::free_port();
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("agent.toml");
    // The UDP burst's source.
    let udp_port = sluice_tests::free_port();
    let mut text = config_text(args, port, metrics_port, udp_port).expect("checked in main");
    // W3: an upstream broker, an outbox, and a persistent-session
    // subscriber upstream that sees every seq the uplink got acknowledged.
    let upstream = args
        .outage_seconds
        .map(|_| {
            // No queue limits: Mosquitto's defaults (1,000 queued messages
            // per client) would drop what a drain sends faster than the
            // subscriber takes it, and that would be counted as missing.
            Broker::start_persistent_configured(
                "bench-upstream",
                "set_tcp_nodelay true\nmax_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n",
            )
        });
    let seqs = Arc::new(Mutex::new(Vec::<i64>::new()));
    if let Some(up) = &upstream {
        text += &format!(
            "[outbox]\npath = \"{}\"\n[uplink]\nhost = \"127.0.0.1\"\nport = {}\nreconnect_max_ms = 1000\n",
            dir.join("outbox.db").display(),
            up.port
        );
        let _ = std::fs::remove_file(dir.join("outbox.db"));
        upstream_subscriber(up.port, seqs.clone()).await;
    }
    std::fs::write(&config, text).expect("config");
    let mut agent = std::process::Command::new(agent_bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).expect("log"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin.display()));
    // Up once its metrics answer (they start after every source), plus a
    // moment for its subscription.
    let start = Instant::now();
    while sluice_tests::metric(metrics_port, "sluice_readings_processed_total").is_none() {
        // A configuration the agent refuses ends it at once: say why.
        let exited = agent.try_wait().ok().flatten();
        if exited.is_some() || start.elapsed() > Duration::from_secs(20) {
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            let _ = agent.kill();
            crate::fail(format_args!(
                "the agent {}; its log:\n{log}",
                exited.map_or("did not start within 20 s".to_string(), |s| format!(
                    "exited ({s})"
                ))
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Connected to the broker (it subscribes on the CONNACK), then a moment
    // for the SUBACK.
    while metric(metrics_port, "sluice_source_connects_total") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the agent did not connect to the broker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let spikes = Spikes::default();
    let alert_hist = Arc::new(Mutex::new(histogram()));
    // Each alert's (intended send time of its spike, latency), µs.
    let alert_times = Arc::new(Mutex::new(Vec::<(i64, i64)>::new()));
    let agg_hist = Arc::new(Mutex::new(histogram()));
    // Per spike (sensor, ts): when its probe and its alert arrived, µs.
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let counts = Arc::new(Mutex::new((0u64, 0u64, 0u64, 0u64))); // aggregates, their readings, alerts, spikes alerted
    // Readings of critical series (`c-…`) the aggregates hold.
    let critical_received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (spikes, alert_hist, agg_hist, counts, alert_times, critical, arrivals) = (
            spikes.clone(),
            alert_hist.clone(),
            agg_hist.clone(),
            counts.clone(),
            alert_times.clone(),
            critical_received.clone(),
            arrivals.clone(),
        );
        subscribe(
            port,
            "bench-results",
            &["agg/#", "aggbatch", "alerts/#", "probe/#"],
            stop.clone(),
            move |topic, payload, now| {
                if topic == "aggbatch" {
                    // A batch: each record as if it had come on its own.
                    let records: Vec<serde_json::Value> =
                        serde_json::from_slice(payload).unwrap_or_default();
                    let mut c = counts.lock().unwrap();
                    for r in records {
                        let count = r["count"].as_u64().unwrap_or(0);
                        if r["series"].as_str().is_some_and(|s| s.starts_with("c-")) {
                            critical.fetch_add(count, Relaxed);
                        }
                        c.0 += 1;
                        c.1 += count;
                        if let (Some(end), false) = (r["end"].as_i64(), r["partial"] == true) {
                            let _ = agg_hist
                                .lock()
                                .unwrap()
                                .record((now - end * 1000).max(1) as u64);
                        }
                    }
                    return;
                }
                let sensor = topic
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.strip_prefix("s-"))
                    .and_then(|s| s.parse::<u32>().ok());
                if topic.starts_with("probe/") {
                    if let (Some(sensor), Some(ts)) = (sensor, field_i64(payload, "ts")) {
                        arrivals.lock().unwrap().probes.insert((sensor, ts), now);
                    }
                    return;
                }
                let mut c = counts.lock().unwrap();
                if topic.starts_with("agg/c-") {
                    critical.fetch_add(field_i64(payload, "count").unwrap_or(0) as u64, Relaxed);
                }
                if topic.starts_with("agg/") {
                    c.0 += 1;
                    c.1 += field_i64(payload, "count").unwrap_or(0) as u64;
                    // Windows closed early by the agent's shutdown are partial:
                    // they did not close on time, so they have no latency.
                    let partial = payload.windows(14).any(|w| w == b"\"partial\":true");
                    if let Some(end) = field_i64(payload, "end").filter(|_| !partial) {
                        let _ = agg_hist
                            .lock()
                            .unwrap()
                            .record((now - end * 1000).max(1) as u64);
                    }
                } else if payload.windows(8).any(|w| w == b"\"raised\"") {
                    c.2 += 1;
                    if let (Some(sensor), Some(ts)) = (sensor, field_i64(payload, "event_ts"))
                        && let Some(intended) = spikes.lock().unwrap().get(&(sensor, ts))
                    {
                        c.3 += 1;
                        arrivals.lock().unwrap().alerts.push((sensor, ts, now));
                        let _ = alert_hist
                            .lock()
                            .unwrap()
                            .record((now - intended).max(1) as u64);
                        alert_times
                            .lock()
                            .unwrap()
                            .push((*intended, now - intended));
                    }
                }
            },
        )
        .await
    };
    let pid = agent.id();
    let sampling = Arc::new(AtomicBool::new(true));
    let rss_timeline = Arc::new(Mutex::new(Vec::<(i64, u64)>::new()));
    let sampler = {
        let (sampling, rss_timeline) = (sampling.clone(), rss_timeline.clone());
        tokio::spawn(async move {
            let first = proc_sample(pid);
            let t0 = Instant::now();
            let mut rss_max = first.map_or(0, |s| s.1);
            let mut last = first;
            while sampling.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Some(s) = proc_sample(pid) {
                    rss_max = rss_max.max(s.1);
                    rss_timeline.lock().unwrap().push((epoch_us(), s.1));
                    last = Some(s);
                }
            }
            let ticks = match (first, last) {
                (Some(a), Some(b)) => (b.0 - a.0) as f64,
                _ => 0.0,
            };
            (
                100.0 * ticks / clock_ticks_per_second() / t0.elapsed().as_secs_f64(),
                rss_max,
            )
        })
    };
    let w = Workload {
        start: Instant::now(),
        epoch_start_us: epoch_us(),
        ..w
    };
    // W3: stop the upstream broker 5 s in, for outage_seconds; watch the
    // outbox meanwhile.
    let outage_seconds = args.outage_seconds.unwrap_or(0);
    let outage_task =
        upstream.map(|up| crate::outage::start(up, outage_seconds, seqs.clone(), metrics_port));
    // The overload burst: extra publishers (or one UDP sender) at
    // (factor − 1) × the rate, a third of the way in.
    let burst_task = args
        .burst_factor
        .map(|factor| crate::burst::start(&w, factor, args, port, udp_port));
    let line = {
        let counts = counts.clone();
        progress("through the agent", &w, move || {
            let processed = metric(metrics_port, "sluice_readings_processed_total");
            let (aggregates, _, alerts, _) = *counts.lock().unwrap();
            format!(", agent processed {processed}, {aggregates} aggregates, {alerts} alerts")
        })
    };
    let sent = publish_all(&w, port, "sensors", &spikes, true).await;
    line.end().await;
    let elapsed = w.start.elapsed();
    sampling.store(false, Relaxed);
    let (cpu_percent, rss_max_kib) = sampler.await.unwrap_or((0.0, 0));
    // Let the agent take in what is queued and close the last windows (an
    // idle series' window closes within ~1.1 s), then stop it: SIGTERM
    // closes what is still open as partial, so every reading is counted.
    let mut last = (
        metric(metrics_port, "sluice_readings_processed_total"),
        Instant::now(),
    );
    while last.1.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = metric(metrics_port, "sluice_readings_processed_total");
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let processed = last.0;
    let output_delay = output_delay(metrics_port);
    let shed = metric(metrics_port, "sluice_readings_shed_total");
    let late = metric(metrics_port, "sluice_readings_late_total");
    let mut burst_outcome = None;
    if let (Some(task), Some(factor)) = (burst_task, args.burst_factor) {
        let sent = task.await.expect("burst task");
        burst_outcome = Some(crate::burst::outcome(
            sent,
            factor,
            args.burst_seconds,
            crate::burst::Seen {
                shed,
                kernel_drops: metric(metrics_port, "sluice_source_kernel_drops_total"),
                critical_in_aggregates: critical_received.load(Relaxed),
                alert_times: &alert_times.lock().unwrap(),
                rss_timeline: &rss_timeline.lock().unwrap(),
            },
        ));
    }
    let mut outage = None;
    if let Some(task) = outage_task {
        let watch = task.await.expect("outage task");
        outage = Some(crate::outage::finish(watch, outage_seconds, &seqs, metrics_port).await);
    }
    terminate(&mut agent);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    let _ = task.await;
    let (aggregates, aggregate_readings, alerts, spikes_alerted) = *counts.lock().unwrap();
    let mut phase = Phase {
        rate: w.rate,
        sent: sent.readings,
        achieved_rate: sent.readings as f64 / elapsed.as_secs_f64(),
        received: processed,
        shed,
        late,
        aggregates,
        aggregate_readings,
        spikes: sent.spikes,
        spikes_after_warmup: sent.spikes_after_warmup,
        alerts,
        spikes_alerted,
        cpu_percent,
        rss_max_kib,
        outage,
        burst: burst_outcome,
        ..Phase::default()
    };
    if let Some(d) = output_delay {
        phase.latency_ms.insert("close → out".into(), d);
    }
    let (probe_hist, added_hist, alert_before_probe) =
        arrivals.lock().unwrap().paired(&spikes.lock().unwrap());
    phase.alerts_before_probe = alert_before_probe;
    for (name, h) in [
        ("alert", alert_hist.lock().unwrap().clone()),
        ("probe", probe_hist),
        ("added", added_hist),
        ("aggregate", agg_hist.lock().unwrap().clone()),
    ] {
        phase.latency_ms.insert(name.into(), percentiles(&h));
        phase.histograms.push((name.into(), h));
    }
    let _ = std::fs::remove_dir_all(&dir);
    phase
}

/// The agent's own `sluice_output_delay_ms` summary: from each aggregate's
/// window close to its hand-off to the MQTT client (p90 is not in it).
fn output_delay(metrics_port: u16) -> Option<Percentiles> {
    let text = sluice_tests::http_get(metrics_port, "/metrics");
    let value = |key: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    let q = |q: &str| value(&format!("sluice_output_delay_ms{{quantile=\"{q}\"}}"));
    Some(Percentiles {
        count: value("sluice_output_delay_ms_count")? as u64,
        p50: q("0.5")?,
        p90: q("0.9")?,
        p99: q("0.99")?,
        p999: q("0.999")?,
        max: q("1")?,
    })
}

/// When each spike's probe and alert reached the subscriber.
#[derive(Default)]
struct Arrivals {
    /// (sensor, ts) → arrival of the probe, µs since the epoch.
    probes: std::collections::HashMap<(u32, i64), i64>,
    /// (sensor, ts, arrival) of each alert matched to a spike.
    alerts: Vec<(u32, i64, i64)>,
}

impl Arrivals {
    /// The broker's path for the spikes (intended send → probe arrival) and
    /// what the agent added to each alerted spike's (probe arrival → alert
    /// arrival), µs; and how many alerts arrived before their probe (then
    /// recorded as 1 µs: the agent added nothing measurable).
    fn paired(
        &self,
        spikes: &std::collections::HashMap<(u32, i64), i64>,
    ) -> (Histogram<u64>, Histogram<u64>, u64) {
        let (mut probe, mut added, mut early) = (histogram(), histogram(), 0);
        for (key, arrived) in &self.probes {
            if let Some(intended) = spikes.get(key) {
                let _ = probe.record((arrived - intended).max(1) as u64);
            }
        }
        for (sensor, ts, arrived) in &self.alerts {
            if let Some(probe_arrived) = self.probes.get(&(*sensor, *ts)) {
                let d = arrived - probe_arrived;
                if d < 1 {
                    early += 1;
                }
                let _ = added.record(d.max(1) as u64);
            }
        }
        (probe, added, early)
    }
}

/// A persistent-session subscriber to the upstream broker's aggregates: it
/// collects every `seq`, including those queued for it while it was away.
pub(crate) async fn upstream_subscriber(port: u16, seqs: Arc<Mutex<Vec<i64>>>) {
    let mut options = MqttOptions::new(
        format!("bench-upstream-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_clean_session(false);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 1024);
    client
        .subscribe("sluice/bench/agg/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe upstream");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = events.poll().await {
            break;
        }
    }
    tokio::spawn(async move {
        let _client = client;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(seq) = field_i64(&p.payload, "seq") {
                        seqs.lock().unwrap().push(seq);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
}
