//! `sluice-bench`: the end-to-end load benchmark (workload W1 of
//! `WORKLOADS.md`), reproducible with one command:
//!
//! ```sh
//! cargo build --release -p sluice --bin sluice
//! cargo run --release -p sluice-benches --bin sluice-bench -- --rate 20000
//! ```
//!
//! It starts a private Mosquitto on a loopback port and, in one run:
//!
//! 1. **broker only**: N sensors publish JSON readings to `sensors/<id>`
//!    (QoS 0, several connections, a fixed rate) and a subscriber receives
//!    them; the latency of every reading, publish to arrival;
//! 2. **through the agent**: the same workload, with the `sluice` binary
//!    subscribed (1-second tumbling windows, EWMA z-score alerts): latency
//!    from the publish of each injected spike to the arrival of the alert it
//!    raises, and from each window's end to the arrival of its aggregate;
//!    the agent's CPU and RSS from `/proc`; its shed and late counts.
//!
//! Latencies are measured from each reading's *intended* send time (the
//! fixed-rate schedule), not from when it was actually sent, so a stalled
//! generator or agent shows up in the figures instead of hiding (coordinated
//! omission). It prints p50/p90/p99/p99.9/max, writes `.hgrm` percentile
//! files and an SVG plot of the distributions, and a JSON summary.
//! `--find-max` raises the rate until the agent falls behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sluice_core::rng::SplitMix64;
use sluice_tests::Broker;

/// Command-line options.
#[derive(Parser, Debug, Clone)]
#[command(about = "End-to-end latency and throughput benchmark of the sluice agent (W1)")]
struct Args {
    /// Readings per second, all sensors together.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Sensors (series), `s-0000` …
    #[arg(long, default_value_t = 1_000)]
    sensors: u32,
    /// Seconds of load per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Publishing connections.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Every this many readings of a sensor, a +15 spike (an anomaly).
    #[arg(long, default_value_t = 500)]
    spike_every: u64,
    /// Agent worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The `sluice` binary (default: next to this one).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Where the .hgrm, .svg and .json results go.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Raise the rate (×1.25 per step, from --rate) until the agent falls
    /// behind; report the highest rate it sustained.
    #[arg(long)]
    find_max: bool,
    /// Skip the broker-only phase.
    #[arg(long)]
    no_baseline: bool,
    /// W3: the agent stores aggregates in its SQLite outbox and forwards them
    /// to a second (upstream) broker, which is stopped this many seconds,
    /// from 5 s into the load; reports the outbox's peak, the drain time,
    /// and seqs missing or duplicated upstream. Needs --seconds ≥ this + 10.
    #[arg(long)]
    outage_seconds: Option<u64>,
    /// An overload burst: this many times the rate (extra publishers, no
    /// spikes) for --burst-seconds, from a third of the way into the load;
    /// reports RSS before and during it and alert latency before, during,
    /// and from 2 s after it.
    #[arg(long)]
    burst_factor: Option<u64>,
    /// Length of the burst.
    #[arg(long, default_value_t = 3)]
    burst_seconds: u64,
    /// Send the burst as UDP datagrams to a UDP source of the agent, from
    /// one sender thread, instead of through the broker: the broker is then
    /// not the limit, and the agent itself can be overloaded.
    #[arg(long)]
    burst_udp: bool,
    /// With --burst-udp: the UDP source's `recv_buffer`, bytes (default:
    /// the system's).
    #[arg(long)]
    burst_recv_buffer: Option<usize>,
    /// With --burst-udp: every this many burst datagrams is a reading of a
    /// critical series (`c-…`, under a rule with `priority = "critical"`);
    /// reports how many the agent sent on in aggregates (none may be shed).
    #[arg(long)]
    critical_every: Option<u64>,
    /// The agent's `ring_capacity` (default: the agent's, 8192).
    #[arg(long)]
    ring_capacity: Option<usize>,
    /// Shed by sampling (keep one in 4) once a ring is this full (a
    /// fraction), instead of the default drop-newest at 0.8: with a small
    /// ring, an overload the agent could otherwise absorb.
    #[arg(long)]
    sample_above: Option<f64>,
    /// Exit non-zero unless the counts are right: every reading the agent
    /// processed is in an aggregate, none shed, and every spike after the
    /// warm-up raised an alert (for CI; never asserts on timings).
    #[arg(long)]
    check: bool,
}

/// What one phase measured.
#[derive(Debug, Default, serde::Serialize)]
struct Phase {
    rate: u64,
    sent: u64,
    achieved_rate: f64,
    /// Broker only: readings received. Agent: readings it processed.
    received: u64,
    shed: u64,
    late: u64,
    aggregates: u64,
    aggregate_readings: u64,
    spikes: u64,
    spikes_after_warmup: u64,
    alerts: u64,
    spikes_alerted: u64,
    cpu_percent: f64,
    rss_max_kib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    outage: Option<Outage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    burst: Option<Burst>,
    latency_ms: HashMap<String, Percentiles>,
    #[serde(skip)]
    histograms: Vec<(String, Histogram<u64>)>,
}

/// What an overload burst did.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Burst {
    factor: u64,
    seconds: u64,
    /// Extra readings sent during the burst, and their rate.
    extra_sent: u64,
    extra_rate: f64,
    rss_before_kib: u64,
    rss_during_and_after_kib: u64,
    /// Readings the agent shed (all of the run; none before the burst).
    shed: u64,
    /// With --burst-udp: datagrams the kernel dropped because the agent's
    /// socket buffer was full, as the agent counted them
    /// (`sluice_source_kernel_drops_total`) and as the system did (`Udp:
    /// RcvbufErrors` in /proc/net/snmp, during the burst).
    kernel_drops: u64,
    kernel_drops_system: u64,
    /// With --critical-every: critical readings sent in the burst, and
    /// those the agent's aggregates hold.
    critical_sent: u64,
    critical_in_aggregates: u64,
    /// Alert latency (spike → alert) by when the spike was sent.
    alert_before: Percentiles,
    alert_during: Percentiles,
    alert_first_2s_after: Percentiles,
    alert_from_2s_after: Percentiles,
}

/// What W3 measured.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Outage {
    seconds: u64,
    /// Records in the outbox at most (sampled every 250 ms).
    backlog_peak: u64,
    /// Records committed when the upstream broker came back.
    backlog_at_restart: u64,
    /// From the restart until every record committed before it had arrived
    /// upstream.
    drain_seconds: f64,
    /// Records committed in all.
    committed: u64,
    /// Distinct seqs upstream, seqs committed but never arrived, and
    /// arrivals beyond one per seq.
    upstream_distinct: u64,
    missing: u64,
    duplicates: u64,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Percentiles {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// Latency histogram in µs, 1 µs to 10 minutes, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

fn epoch_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The fixed-rate workload: which reading goes when, with which value.
#[derive(Clone)]
struct Workload {
    rate: u64,
    sensors: u32,
    connections: u32,
    spike_every: u64,
    duration: Duration,
    /// Wall clock at the schedule's start, µs since the epoch.
    epoch_start_us: i64,
    start: Instant,
    /// Names the publishers' client ids.
    tag: &'static str,
    /// Event time from the actual send time instead of the schedule (for a
    /// burst, which may fall behind its schedule: old event times would be
    /// refused as late instead of loading the agent).
    ts_now: bool,
}

/// Spikes sent: (sensor, ts ms) → intended send time, µs since the epoch.
type Spikes = Arc<Mutex<HashMap<(u32, i64), i64>>>;

struct Sent {
    readings: u64,
    spikes: u64,
    spikes_after_warmup: u64,
}

/// Publishes connection `c`'s share of the workload: sensors `c, c+C, …`,
/// each reading at its intended time, ts = the intended time.
async fn publish(w: Workload, port: u16, c: u32, topic_prefix: &str, spikes: Spikes) -> Sent {
    let mut options = MqttOptions::new(
        format!("bench-{}-{c}-{}", w.tag, std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_max_packet_size(1 << 16, 1 << 16);
    // A short request queue: a reading waits to be made rather than queued
    // (its event time would age in the queue).
    let (client, mut events) = AsyncClient::new(options, 64);
    events.set_network_options(sluice_collectors::mqtt::network_options());
    let driver = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let mine: Vec<u32> = (c..w.sensors).step_by(w.connections as usize).collect();
    if mine.is_empty() {
        return Sent {
            readings: 0,
            spikes: 0,
            spikes_after_warmup: 0,
        };
    }
    // This connection's rate and the interval between its readings.
    let share = w.rate as f64 * mine.len() as f64 / f64::from(w.sensors);
    let interval_ns = 1e9 / share;
    let total = (share * w.duration.as_secs_f64()) as u64;
    let mut rng = SplitMix64::new(0x5eed ^ u64::from(c));
    let mut per_sensor = vec![0u64; mine.len()];
    let mut sent = Sent {
        readings: 0,
        spikes: 0,
        spikes_after_warmup: 0,
    };
    let mut k = 0u64;
    while k < total {
        let now = w.start.elapsed().as_nanos() as f64;
        while k < total && (k as f64) * interval_ns <= now {
            let i = (k % mine.len() as u64) as usize;
            let sensor = mine[i];
            let n = per_sensor[i];
            per_sensor[i] += 1;
            let intended_us = w.epoch_start_us + ((k as f64) * interval_ns / 1000.0) as i64;
            let ts = if w.ts_now {
                epoch_us() / 1000
            } else {
                intended_us / 1000
            };
            // Gaussian noise, σ = 1 (Box-Muller).
            let (u1, u2) = (rng.next_f64().max(1e-12), rng.next_f64());
            let noise = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            // Every spike_every-th reading of a sensor, each sensor at its
            // own phase, so that spikes spread evenly over time instead of
            // every sensor spiking in the same millisecond.
            let phase = (u64::from(sensor) * 7919) % w.spike_every.max(1);
            let spike = n > 0 && (n + phase).is_multiple_of(w.spike_every);
            let value = 20.0 + f64::from(sensor % 10) + noise + if spike { 15.0 } else { 0.0 };
            if spike {
                sent.spikes += 1;
                // The detector is active after 30 readings.
                if n >= 30 {
                    sent.spikes_after_warmup += 1;
                }
                spikes.lock().unwrap().insert((sensor, ts), intended_us);
            }
            let payload = format!(
                r#"{{"sensor":"s-{sensor:04}","ts":{ts},"value":{value:.3},"t":{intended_us}}}"#
            );
            if client
                .publish(
                    format!("{topic_prefix}/s-{sensor:04}"),
                    QoS::AtMostOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                break;
            }
            sent.readings += 1;
            k += 1;
        }
        if k < total {
            let next = Duration::from_nanos(((k as f64) * interval_ns) as u64);
            tokio::time::sleep_until((w.start + next).into()).await;
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    sent
}

/// Publishes the whole workload; returns what was sent.
async fn publish_all(w: &Workload, port: u16, topic_prefix: &str, spikes: &Spikes) -> Sent {
    let tasks: Vec<_> = (0..w.connections)
        .map(|c| {
            let (w, spikes, prefix) = (w.clone(), spikes.clone(), topic_prefix.to_string());
            tokio::spawn(async move { publish(w, port, c, &prefix, spikes).await })
        })
        .collect();
    let mut total = Sent {
        readings: 0,
        spikes: 0,
        spikes_after_warmup: 0,
    };
    for t in tasks {
        let s = t.await.expect("publisher task");
        total.readings += s.readings;
        total.spikes += s.spikes;
        total.spikes_after_warmup += s.spikes_after_warmup;
    }
    total
}

/// A subscriber that hands every message to `on` with its arrival time (µs
/// since the epoch); stops when `stop` is set.
async fn subscribe(
    port: u16,
    id: &str,
    filters: &[&str],
    stop: Arc<AtomicBool>,
    mut on: impl FnMut(&str, &[u8], i64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let mut options = MqttOptions::new(format!("{id}-{}", std::process::id()), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 1024);
    events.set_network_options(sluice_collectors::mqtt::network_options());
    for f in filters {
        client
            .subscribe(*f, QoS::AtMostOnce)
            .await
            .expect("subscribe");
    }
    let mut acked = 0;
    while acked < filters.len() {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = events.poll().await {
            acked += 1;
        }
    }
    tokio::spawn(async move {
        let _client = client;
        while !stop.load(Relaxed) {
            match tokio::time::timeout(Duration::from_millis(100), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => on(&p.topic, &p.payload, epoch_us()),
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => {}
            }
        }
    })
}

fn field_i64(payload: &[u8], key: &str) -> Option<i64> {
    let text = std::str::from_utf8(payload).ok()?;
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &text[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '-'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Phase 1: publisher → broker → subscriber.
async fn broker_only(w: Workload, port: u16) -> Phase {
    let hist = Arc::new(Mutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (hist, received) = (hist.clone(), received.clone());
        subscribe(
            port,
            "bench-baseline",
            &["baseline/#"],
            stop.clone(),
            move |_, payload, now| {
                if let Some(t) = field_i64(payload, "t") {
                    let _ = hist.lock().unwrap().record((now - t).max(1) as u64);
                    received.fetch_add(1, Relaxed);
                }
            },
        )
        .await
    };
    let w = Workload {
        start: Instant::now(),
        epoch_start_us: epoch_us(),
        ..w
    };
    let sent = publish_all(&w, port, "baseline", &Spikes::default()).await;
    let elapsed = w.start.elapsed();
    // Until every reading has arrived, or a second of silence.
    let mut last = (received.load(Relaxed), Instant::now());
    while received.load(Relaxed) < sent.readings && last.1.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = received.load(Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    stop.store(true, Relaxed);
    let _ = task.await;
    let hist = hist.lock().unwrap().clone();
    let mut phase = Phase {
        rate: w.rate,
        sent: sent.readings,
        achieved_rate: sent.readings as f64 / elapsed.as_secs_f64(),
        received: received.load(Relaxed),
        ..Phase::default()
    };
    phase.latency_ms.insert("broker".into(), percentiles(&hist));
    phase.histograms.push(("broker".into(), hist));
    phase
}

const AGENT_CONFIG: &str = r#"
agent_id = "bench"
workers = {workers}
max_series = 20000
[sources.sensors]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "bench-agent-{pid}"
topics = ["sensors/+"]
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 1000 }
anomaly = { alpha = 0.01, k = 4.0, warmup = 30 }
[output.mqtt]
host = "127.0.0.1"
port = {port}
aggregate_topic = "agg/{series}"
alert_topic = "alerts/{series}"
state_topic = "state/{series}"
[metrics]
listen = "127.0.0.1:{metrics}"
stats_interval_s = 0
"#;

/// Sends `rate` readings a second (event time now, no spikes, sensors in
/// turn) as UDP datagrams to 127.0.0.1:`port` for `duration`, paced every
/// 200 µs; returns how many it sent. Behind schedule it sends what is due
/// at once: the rate is the target's unless this thread cannot keep up.
/// With `critical_every`, every that many datagrams is a reading of a
/// critical series `c-…`; returns (sent, of them critical).
fn udp_burst(
    port: u16,
    rate: u64,
    sensors: u32,
    duration: Duration,
    critical_every: Option<u64>,
) -> (u64, u64) {
    use std::fmt::Write;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    socket.connect(("127.0.0.1", port)).expect("udp connect");
    let mut rng = SplitMix64::new(0xb0_57);
    let (start, mut sent, mut line) = (Instant::now(), 0u64, String::with_capacity(96));
    let mut critical = 0u64;
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let ts = epoch_us() / 1000;
        while sent < due {
            let sensor = sent % u64::from(sensors.max(1));
            let value = 20.0 + (sensor % 10) as f64 + rng.next_f64() * 2.0 - 1.0;
            let prefix = if critical_every.is_some_and(|n| sent % n.max(1) == 0) {
                critical += 1;
                "c"
            } else {
                "s"
            };
            line.clear();
            let _ = write!(
                line,
                r#"{{"sensor":"{prefix}-{sensor:04}","ts":{ts},"value":{value:.3}}}"#
            );
            // A full socket buffer drops it in the kernel (counted there);
            // ECONNREFUSED from an earlier datagram is nothing to stop for.
            let _ = socket.send(line.as_bytes());
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    (sent, critical)
}

/// `Udp: RcvbufErrors` from /proc/net/snmp: datagrams dropped because a
/// socket's receive buffer was full (0 if unreadable).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn metric(port: u16, name: &str) -> u64 {
    sluice_tests::metric(port, name).unwrap_or(0)
}

/// CPU ticks (user + system) and RSS (KiB) of `pid`.
fn proc_sample(pid: u32) -> Option<(u64, u64)> {
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

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn terminate(child: &mut Child) {
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

/// Phase 2: publisher → broker → agent → broker → subscriber.
async fn through_agent(w: Workload, port: u16, args: &Args, agent_bin: &Path) -> Phase {
    let metrics_port = sluice_tests::free_port();
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("agent.toml");
    let mut text = AGENT_CONFIG
        .replace("{workers}", &args.workers.to_string())
        .replace("{port}", &port.to_string())
        .replace("{metrics}", &metrics_port.to_string())
        .replace("{pid}", &std::process::id().to_string());
    // The UDP burst's source.
    let udp_port = sluice_tests::free_port();
    if let Some(f) = args.sample_above {
        text = text.replace(
            "max_series = 20000",
            &format!("max_series = 20000\n[shedding]\npolicy = \"sample\"\nhigh_water = {f}\nkeep_one_in = 4"),
        );
    }
    // After [shedding] went in: top-level keys come before any table.
    if let Some(n) = args.ring_capacity {
        text = text.replace(
            "max_series = 20000",
            &format!("max_series = 20000\nring_capacity = {n}"),
        );
    }
    if args.critical_every.is_some() {
        // First match wins: the critical series' rule goes first.
        text = text.replace(
            "[[rules]]\nmatch = \"*\"",
            "[[rules]]\nmatch = \"c-*\"\npriority = \"critical\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n[[rules]]\nmatch = \"*\"",
        );
    }
    if args.burst_udp {
        text += &format!("[sources.burst]\nkind = \"udp\"\nbind = \"127.0.0.1:{udp_port}\"\n");
        if let Some(size) = args.burst_recv_buffer {
            text += &format!("recv_buffer = {size}\n");
        }
    }
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
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the agent did not start"
        );
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
    let counts = Arc::new(Mutex::new((0u64, 0u64, 0u64, 0u64))); // aggregates, their readings, alerts, spikes alerted
    // Readings of critical series (`c-…`) the aggregates hold.
    let critical_received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (spikes, alert_hist, agg_hist, counts, alert_times, critical) = (
            spikes.clone(),
            alert_hist.clone(),
            agg_hist.clone(),
            counts.clone(),
            alert_times.clone(),
            critical_received.clone(),
        );
        subscribe(
            port,
            "bench-results",
            &["agg/#", "alerts/#"],
            stop.clone(),
            move |topic, payload, now| {
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
                    let sensor = topic
                        .rsplit('/')
                        .next()
                        .and_then(|s| s.strip_prefix("s-"))
                        .and_then(|s| s.parse::<u32>().ok());
                    if let (Some(sensor), Some(ts)) = (sensor, field_i64(payload, "event_ts"))
                        && let Some(intended) = spikes.lock().unwrap().get(&(sensor, ts))
                    {
                        c.3 += 1;
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
    let outage_task = upstream.map(|mut up| {
        let (outage, seqs) = (
            Duration::from_secs(args.outage_seconds.unwrap_or(0)),
            seqs.clone(),
        );
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
            (up, peak, watching, watch, at_restart, drain_seconds)
        })
    });
    // The overload burst: extra publishers (or one UDP sender) at
    // (factor − 1) × the rate.
    let burst_at = w.duration / 3;
    let burst_udp = args.burst_udp;
    let critical_every = args.critical_every;
    let burst_task = args.burst_factor.map(|factor| {
        let extra = Workload {
            rate: w.rate * (factor.max(2) - 1),
            spike_every: u64::MAX,
            duration: Duration::from_secs(args.burst_seconds),
            tag: "burst",
            ts_now: true,
            ..w.clone()
        };
        tokio::spawn(async move {
            tokio::time::sleep_until((extra.start + burst_at).into()).await;
            let extra = Workload {
                start: Instant::now(),
                epoch_start_us: epoch_us(),
                ..extra
            };
            let drops_before = udp_rcvbuf_errors();
            let (sent, critical) = if burst_udp {
                let (rate, sensors, duration) = (extra.rate, extra.sensors, extra.duration);
                tokio::task::spawn_blocking(move || {
                    udp_burst(udp_port, rate, sensors, duration, critical_every)
                })
                .await
                .expect("udp burst")
            } else {
                let sent = publish_all(&extra, port, "sensors", &Spikes::default())
                    .await
                    .readings;
                (sent, 0)
            };
            (
                extra.epoch_start_us,
                epoch_us(),
                sent,
                sent as f64 / extra.start.elapsed().as_secs_f64(),
                udp_rcvbuf_errors().saturating_sub(drops_before),
                critical,
            )
        })
    });
    let sent = publish_all(&w, port, "sensors", &spikes).await;
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
    let shed = metric(metrics_port, "sluice_readings_shed_total");
    let late = metric(metrics_port, "sluice_readings_late_total");
    let mut burst_outcome = None;
    if let (Some(task), Some(factor)) = (burst_task, args.burst_factor) {
        let (from, to, extra_sent, extra_rate, kernel_drops_system, critical_sent) =
            task.await.expect("burst task");
        let kernel_drops = metric(metrics_port, "sluice_source_kernel_drops_total");
        let times = alert_times.lock().unwrap().clone();
        let window = |lo: i64, hi: i64| {
            let mut h = histogram();
            for &(at, latency) in &times {
                if at >= lo && at < hi {
                    let _ = h.record(latency.max(1) as u64);
                }
            }
            percentiles(&h)
        };
        let rss = rss_timeline.lock().unwrap().clone();
        burst_outcome = Some(Burst {
            factor,
            seconds: args.burst_seconds,
            extra_sent,
            extra_rate,
            rss_before_kib: rss
                .iter()
                .filter(|r| r.0 < from)
                .map(|r| r.1)
                .max()
                .unwrap_or(0),
            rss_during_and_after_kib: rss
                .iter()
                .filter(|r| r.0 >= from)
                .map(|r| r.1)
                .max()
                .unwrap_or(0),
            shed,
            kernel_drops,
            kernel_drops_system,
            critical_sent,
            critical_in_aggregates: critical_received.load(Relaxed),
            alert_before: window(i64::MIN, from),
            alert_during: window(from, to),
            alert_first_2s_after: window(to, to + 2_000_000),
            alert_from_2s_after: window(to + 2_000_000, i64::MAX),
        });
    }
    let mut outage = None;
    if let Some(task) = outage_task {
        let (up, peak, watching, watch, at_restart, drain_seconds) =
            task.await.expect("outage task");
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
        outage = Some(Outage {
            seconds: args.outage_seconds.unwrap_or(0),
            backlog_peak: peak.load(Relaxed),
            backlog_at_restart: at_restart,
            drain_seconds,
            committed,
            upstream_distinct: distinct.len() as u64,
            missing: (1..=committed as i64)
                .filter(|s| !distinct.contains(s))
                .count() as u64,
            duplicates: (got.len() - distinct.len()) as u64,
        });
        drop(up);
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
    for (name, h) in [("alert", alert_hist), ("aggregate", agg_hist)] {
        let h = h.lock().unwrap().clone();
        phase.latency_ms.insert(name.into(), percentiles(&h));
        phase.histograms.push((name.into(), h));
    }
    let _ = std::fs::remove_dir_all(&dir);
    phase
}

/// A persistent-session subscriber to the upstream broker's aggregates: it
/// collects every `seq`, including those queued for it while it was away.
async fn upstream_subscriber(port: u16, seqs: Arc<Mutex<Vec<i64>>>) {
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

/// The percentile distribution in HdrHistogram's `.hgrm` text format (ms).
fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - q))
        } else {
            "inf".into()
        };
        out += &format!(
            "{:>12.3} {:>14.12} {:>10} {:>14}\n",
            h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inverse
        );
    }
    out += &format!(
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
    out
}

/// A percentile-distribution plot (latency against percentile on the usual
/// log scale of 1/(1−p)), as SVG.
fn svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 440.0, 70.0, 50.0, 40.0, 40.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max_x = 5.0; // 99.999 %
    let max_ms = series
        .iter()
        .map(|(_, h)| h.value_at_quantile(0.99999) as f64 / 1000.0)
        .fold(0.0f64, f64::max)
        .max(0.001);
    // A round top for the y axis.
    let step = 10f64.powf((max_ms / 5.0).log10().ceil());
    let y_top = (max_ms / step).ceil() * step;
    let x = |q: f64| left + pw * (-(1.0 - q).max(1e-5).log10() / max_x).min(1.0);
    let y = |ms: f64| top + ph * (1.0 - (ms / y_top).min(1.0));
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="14">{title}</text>
"#,
        w / 2.0
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let q = 1.0 - 10f64.powi(-(i as i32));
        let px = x(if i == 0 { 0.0 } else { q });
        s += &format!(
            "<line x1=\"{px:.1}\" y1=\"{top}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#ddd\"/>\n<text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
            top + ph,
            top + ph + 18.0
        );
    }
    for i in 0..=5 {
        let ms = y_top * f64::from(i) / 5.0;
        let py = y(ms);
        s += &format!(
            "<line x1=\"{left}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{ms}</text>\n",
            left + pw,
            left - 6.0,
            py + 4.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">percentile</text>\n<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">latency, ms</text>\n",
        left + pw / 2.0,
        h - 8.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    for (i, (name, hist)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let points: Vec<String> = (0..=500)
            .map(|k| {
                let q = 1.0 - 10f64.powf(-max_x * f64::from(k) / 500.0);
                let q = if k == 0 { 0.0 } else { q };
                let v = hist.value_at_quantile(q) as f64 / 1000.0;
                format!("{:.1},{:.1}", x(q), y(v))
            })
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>\n",
            points.join(" "),
            left + 10.0,
            top + 16.0 + 16.0 * i as f64
        );
    }
    s + "</svg>\n"
}

fn print_phase(label: &str, p: &Phase) {
    println!(
        "{label}: rate {} /s target, {:.0} /s achieved, {} sent, {} received/processed",
        p.rate, p.achieved_rate, p.sent, p.received
    );
    if let Some(o) = &p.outage {
        println!(
            "  W3 outage {} s: outbox peak {} records, {} committed at restart, drained in {:.2} s; {} committed, {} distinct upstream, {} missing, {} duplicates",
            o.seconds,
            o.backlog_peak,
            o.backlog_at_restart,
            o.drain_seconds,
            o.committed,
            o.upstream_distinct,
            o.missing,
            o.duplicates
        );
    }
    if let Some(b) = &p.burst {
        println!(
            "  burst ×{} for {} s: {} extra readings at {:.0} /s; RSS max {:.1} MiB before, {:.1} MiB during and after",
            b.factor,
            b.seconds,
            b.extra_sent,
            b.extra_rate,
            b.rss_before_kib as f64 / 1024.0,
            b.rss_during_and_after_kib as f64 / 1024.0
        );
        println!(
            "    shed by the agent {}; dropped by the kernel from a full UDP socket buffer {} (the agent's count; the system's: {})",
            b.shed, b.kernel_drops, b.kernel_drops_system
        );
        if b.critical_sent > 0 {
            println!(
                "    critical readings: {} sent, {} in aggregates ({} missing)",
                b.critical_sent,
                b.critical_in_aggregates,
                b.critical_sent.saturating_sub(b.critical_in_aggregates)
            );
        }
        for (name, l) in [
            ("before", b.alert_before),
            ("during", b.alert_during),
            ("0-2 s after", b.alert_first_2s_after),
            ("2 s after on", b.alert_from_2s_after),
        ] {
            println!(
                "    alert latency {name:<12}: p50 {:>9.3}  p99 {:>9.3}  max {:>9.3} ms (n={})",
                l.p50, l.p99, l.max, l.count
            );
        }
    }
    if label == "agent" {
        println!(
            "  shed {}, late {}, aggregates {} holding {} readings, spikes {} ({} after warm-up), alerts {} ({} matched to a spike), CPU {:.1} %, RSS max {:.1} MiB",
            p.shed,
            p.late,
            p.aggregates,
            p.aggregate_readings,
            p.spikes,
            p.spikes_after_warmup,
            p.alerts,
            p.spikes_alerted,
            p.cpu_percent,
            p.rss_max_kib as f64 / 1024.0
        );
    }
    let mut names: Vec<_> = p.latency_ms.keys().collect();
    names.sort();
    for name in names {
        let l = p.latency_ms[name];
        println!(
            "  {name:<10} latency ms: p50 {:>8.3}  p90 {:>8.3}  p99 {:>8.3}  p99.9 {:>8.3}  max {:>8.3}  (n={})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
    }
}

/// Whether the agent kept up: no shedding, every reading the broker got
/// processed, aggregates not later than a window.
fn kept_up(p: &Phase) -> bool {
    p.shed == 0
        && p.received as f64 >= 0.999 * p.sent as f64
        && p.achieved_rate >= 0.97 * p.rate as f64
        && p.latency_ms
            .get("aggregate")
            .is_some_and(|l| l.p99 < 1000.0)
}

fn main() {
    let args = Args::parse();
    let agent_bin = args.agent.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("current exe");
        me.with_file_name("sluice")
    });
    assert!(
        agent_bin.exists(),
        "{} not found: build it first (cargo build --release -p sluice --bin sluice) or pass --agent",
        agent_bin.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Nagle off on the broker's side too (Mosquitto leaves it on by
    // default): otherwise a quiet subscriber's delayed ACKs hold back small
    // messages by up to 40 ms, and that would be measured, not Sluice.
    let broker = Broker::start_configured("bench", "set_tcp_nodelay true\n");
    std::fs::create_dir_all(&args.out).expect("out dir");
    let workload = |rate: u64| Workload {
        rate,
        sensors: args.sensors,
        connections: args.connections,
        spike_every: args.spike_every,
        duration: Duration::from_secs(args.seconds),
        epoch_start_us: 0,
        start: Instant::now(),
        tag: "pub",
        ts_now: false,
    };
    println!(
        "W1: {} sensors, {} s per phase, {} connections, spike every {} readings per sensor, agent {} worker(s)",
        args.sensors, args.seconds, args.connections, args.spike_every, args.workers
    );
    if args.find_max {
        let mut rate = args.rate;
        let mut best = None;
        loop {
            let p = runtime.block_on(through_agent(
                workload(rate),
                broker.port,
                &args,
                &agent_bin,
            ));
            print_phase("agent", &p);
            if !kept_up(&p) {
                break;
            }
            best = Some(rate);
            rate = rate * 5 / 4;
        }
        let mut rate = args.rate;
        let mut broker_best = None;
        loop {
            let p = runtime.block_on(broker_only(workload(rate), broker.port));
            print_phase("broker", &p);
            if (p.received as f64) < 0.999 * p.sent as f64 || p.achieved_rate < 0.97 * rate as f64 {
                break;
            }
            broker_best = Some(rate);
            rate = rate * 5 / 4;
        }
        println!(
            "highest sustained rate: agent {}, broker only {} readings/s",
            best.map_or("none".into(), |r| r.to_string()),
            broker_best.map_or("none".into(), |r| r.to_string())
        );
        return;
    }
    let baseline = (!args.no_baseline)
        .then(|| runtime.block_on(broker_only(workload(args.rate), broker.port)));
    if let Some(b) = &baseline {
        print_phase("broker", b);
    }
    let agent = runtime.block_on(through_agent(
        workload(args.rate),
        broker.port,
        &args,
        &agent_bin,
    ));
    print_phase("agent", &agent);
    if let (Some(b), Some(a)) = (
        baseline.as_ref().and_then(|b| b.latency_ms.get("broker")),
        agent.latency_ms.get("alert"),
    ) {
        println!(
            "  added by the agent (alert − broker only): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
            a.p50 - b.p50,
            a.p99 - b.p99,
            a.p999 - b.p999
        );
    }
    // Results.
    let stem = format!("w1-{}s-{}", args.sensors, args.rate);
    let mut all: Vec<(&str, &Histogram<u64>)> = Vec::new();
    if let Some(b) = &baseline {
        for (name, h) in &b.histograms {
            all.push((name.as_str(), h));
        }
    }
    for (name, h) in &agent.histograms {
        all.push((name.as_str(), h));
    }
    for (name, h) in &all {
        std::fs::write(args.out.join(format!("{stem}-{name}.hgrm")), hgrm(h)).expect("hgrm");
    }
    let plotted: Vec<(&str, &Histogram<u64>)> = all
        .iter()
        .copied()
        .filter(|(n, _)| *n != "aggregate")
        .map(|(n, h)| {
            (
                if n == "broker" {
                    "broker only: reading"
                } else {
                    "agent: spike → alert"
                },
                h,
            )
        })
        .collect();
    std::fs::write(
        args.out.join(format!("{stem}.svg")),
        svg(
            &format!(
                "W1, {} sensors, {} readings/s: publish → arrival",
                args.sensors, args.rate
            ),
            &plotted,
        ),
    )
    .expect("svg");
    let summary = serde_json::json!({ "broker_only": baseline, "agent": agent });
    std::fs::write(
        args.out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&summary).expect("json"),
    )
    .expect("json");
    println!(
        "results: {}/{stem}.{{svg,json}} and .hgrm files",
        args.out.display()
    );
    if args.check {
        let mut problems = Vec::new();
        if agent.shed != 0 {
            problems.push(format!("{} readings shed", agent.shed));
        }
        if agent.aggregate_readings != agent.received {
            problems.push(format!(
                "aggregates hold {} readings, the agent processed {}",
                agent.aggregate_readings, agent.received
            ));
        }
        if agent.received != agent.sent {
            problems.push(format!(
                "sent {}, the agent processed {}",
                agent.sent, agent.received
            ));
        }
        // A spike that comes while a chance alarm (|z| > k on noise) is
        // still raised raises nothing new: allow 1 % of them.
        if (agent.spikes_alerted as f64) < 0.99 * agent.spikes_after_warmup as f64 {
            problems.push(format!(
                "{} spikes after warm-up, {} alerts matched to one",
                agent.spikes_after_warmup, agent.spikes_alerted
            ));
        }
        if let Some(b) = &baseline
            && b.received != b.sent
        {
            problems.push(format!(
                "broker only: sent {}, received {}",
                b.sent, b.received
            ));
        }
        if !problems.is_empty() {
            eprintln!("check failed: {}", problems.join("; "));
            std::process::exit(1);
        }
        println!("check: counts are right");
    }
}
