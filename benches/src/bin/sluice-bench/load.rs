//! The W1 load: publishers at a fixed rate (with spikes), a subscriber,
//! and the broker-only baseline phase.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sluice_core::rng::SplitMix64;

use crate::report::{Phase, histogram, percentiles};

/// The broker every phase runs against, and the topic root all of this
/// run's topics sit under: `sluice-bench/<pid>/`, so that a run against a
/// broker in use (`--broker`) neither reaches its subscribers, an agent
/// subscribed to `sensors/+` included, nor takes what they publish.
struct Target {
    host: String,
    root: String,
}

static TARGET: OnceLock<Target> = OnceLock::new();

/// Sets the broker's host, once, before any phase runs.
pub(crate) fn set_broker_host(host: &str) {
    let _ = TARGET.set(Target {
        host: host.to_string(),
        root: format!("sluice-bench/{}/", std::process::id()),
    });
}

fn target() -> &'static Target {
    TARGET.get().expect("set_broker_host runs first")
}

/// The broker's host.
pub(crate) fn broker_host() -> &'static str {
    &target().host
}

/// `rest` under this run's topic root.
pub(crate) fn topic(rest: &str) -> String {
    format!("{}{rest}", target().root)
}

pub(crate) fn epoch_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The fixed-rate workload: which reading goes when, with which value.
#[derive(Clone)]
pub(crate) struct Workload {
    pub(crate) rate: u64,
    pub(crate) sensors: u32,
    pub(crate) connections: u32,
    pub(crate) spike_every: u64,
    pub(crate) duration: Duration,
    /// Wall clock at the schedule's start, µs since the epoch.
    pub(crate) epoch_start_us: i64,
    pub(crate) start: Instant,
    /// Names the publishers' client ids.
    pub(crate) tag: &'static str,
    /// Event time from the actual send time instead of the schedule (for a
    /// burst, which may fall behind its schedule: old event times would be
    /// refused as late instead of loading the agent).
    pub(crate) ts_now: bool,
    /// Readings written so far, all connections (for the progress line).
    pub(crate) written: Arc<AtomicU64>,
}

/// While `running`, rewrites one line on standard error every half second
/// (only on a terminal): the phase, its seconds, the readings written and
/// their rate, and what `more` says. It runs on a thread of its own, so
/// that what `more` reads (the agent's metrics over HTTP) never holds up
/// the generator's tasks.
pub(crate) fn progress(
    phase: &'static str,
    w: &Workload,
    mut more: impl FnMut() -> String + Send + 'static,
) -> Progress {
    use std::io::{IsTerminal, Write};
    let running = Arc::new(AtomicBool::new(true));
    let thread = std::io::stderr().is_terminal().then(|| {
        let (running, written, start) = (running.clone(), w.written.clone(), w.start);
        let seconds = w.duration.as_secs_f64();
        std::thread::spawn(move || {
            while running.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let elapsed = start.elapsed().as_secs_f64();
                let n = written.load(Relaxed);
                let extra = more();
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[K{phase}: {:.0}/{seconds:.0} s, {n} readings written ({:.0}/s){extra}",
                    elapsed.min(seconds),
                    n as f64 / elapsed.max(1e-3)
                );
                let _ = err.flush();
            }
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        })
    });
    Progress { running, thread }
}

/// The progress line of [`progress`]; [`Progress::end`] erases it.
pub(crate) struct Progress {
    running: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Stops the line and erases it.
    pub(crate) async fn end(self) {
        self.running.store(false, Relaxed);
        if let Some(thread) = self.thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Spikes sent: (sensor, ts ms) → intended send time, µs since the epoch.
pub(crate) type Spikes = Arc<Mutex<HashMap<(u32, i64), i64>>>;

pub(crate) struct Sent {
    pub(crate) readings: u64,
    pub(crate) spikes: u64,
    pub(crate) spikes_after_warmup: u64,
}

/// A QoS 0 publisher on a plain TCP connection. Packets are encoded by
/// rumqttc's own `mqttbytes`, and every reading due at one wake-up leaves in
/// one write: rumqttc's client writes and flushes each publish on its own (a
/// system call a reading, on a task of its own), which capped four
/// connections at about 78,000 readings/s on the benchmark's two cores, below
/// the rates the benchmark has to reach.
pub(crate) struct RawPublisher {
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl RawPublisher {
    /// Connects as `id` (clean session, keep-alive 60 s) and waits for the
    /// CONNACK.
    pub(crate) async fn connect(port: u16, id: &str) -> std::io::Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect((broker_host(), port)).await?;
        stream.set_nodelay(true)?;
        let mut buf = bytes::BytesMut::with_capacity(1 << 16);
        let mut connect = rumqttc::Connect::new(id);
        connect.keep_alive = 60;
        connect.write(&mut buf).map_err(std::io::Error::other)?;
        stream.write_all(&buf).await?;
        buf.clear();
        loop {
            match rumqttc::mqttbytes::v4::Packet::read(&mut buf, 1 << 16) {
                Ok(rumqttc::mqttbytes::v4::Packet::ConnAck(ack))
                    if ack.code == rumqttc::ConnectReturnCode::Success =>
                {
                    return Ok(Self { stream, buf });
                }
                Ok(other) => {
                    return Err(std::io::Error::other(format!(
                        "expected a CONNACK, got {other:?}"
                    )));
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(std::io::Error::other(format!("{e:?}"))),
            }
        }
    }

    /// Queues one QoS 0 PUBLISH.
    pub(crate) fn push(&mut self, topic: &str, payload: &[u8]) {
        rumqttc::Publish::new(topic, QoS::AtMostOnce, payload)
            .write(&mut self.buf)
            .expect("a topic and payload the benchmark makes fit a packet");
    }

    /// Writes what is queued.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }

    /// Sends DISCONNECT and closes.
    pub(crate) async fn disconnect(mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = rumqttc::Disconnect.write(&mut self.buf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// Publishes connection `c`'s share of the workload: sensors `c, c+C, …`,
/// each reading at its intended time, ts = the intended time. A spike is
/// also published to `probe/<sensor>` right after it (when `probe` is set):
/// the subscriber times the broker's path for that very reading, so that
/// the agent's share of a spike's alert latency is measured per spike
/// instead of as the difference of two runs' percentiles.
pub(crate) async fn publish(
    w: Workload,
    port: u16,
    c: u32,
    topic_prefix: &str,
    spikes: Spikes,
    probe: bool,
) -> Sent {
    let mut client =
        RawPublisher::connect(port, &format!("bench-{}-{c}-{}", w.tag, std::process::id()))
            .await
            .expect("publisher connects to the broker");
    let topic_prefix = topic(topic_prefix);
    let probe_prefix = topic("probe");
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
    let mut flushed = 0u64;
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
            client.push(&format!("{topic_prefix}/s-{sensor:04}"), payload.as_bytes());
            if spike && probe {
                client.push(&format!("{probe_prefix}/s-{sensor:04}"), payload.as_bytes());
            }
            sent.readings += 1;
            k += 1;
        }
        if client.flush().await.is_err() {
            break;
        }
        w.written.fetch_add(k - flushed, Relaxed);
        flushed = k;
        if k < total {
            let next = Duration::from_nanos(((k as f64) * interval_ns) as u64);
            tokio::time::sleep_until((w.start + next).into()).await;
        }
    }
    client.disconnect().await;
    sent
}

/// Publishes the whole workload; returns what was sent.
pub(crate) async fn publish_all(
    w: &Workload,
    port: u16,
    topic_prefix: &str,
    spikes: &Spikes,
    probe: bool,
) -> Sent {
    let tasks: Vec<_> = (0..w.connections)
        .map(|c| {
            let (w, spikes, prefix) = (w.clone(), spikes.clone(), topic_prefix.to_string());
            tokio::spawn(async move { publish(w, port, c, &prefix, spikes, probe).await })
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

/// A subscriber to `filters` under the run's topic root that hands every
/// message to `on` with its topic below the root and its arrival time (µs
/// since the epoch); stops when `stop` is set.
pub(crate) async fn subscribe(
    port: u16,
    id: &str,
    filters: &[&str],
    stop: Arc<AtomicBool>,
    mut on: impl FnMut(&str, &[u8], i64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let mut options = MqttOptions::new(format!("{id}-{}", std::process::id()), broker_host(), port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 1024);
    events.set_network_options(sluice_collectors::mqtt::network_options());
    for f in filters {
        client
            .subscribe(topic(f), QoS::AtMostOnce)
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
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let below = p.topic.strip_prefix(&target().root).unwrap_or(&p.topic);
                    on(below, &p.payload, epoch_us());
                }
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => {}
            }
        }
    })
}

pub(crate) fn field_i64(payload: &[u8], key: &str) -> Option<i64> {
    let text = std::str::from_utf8(payload).ok()?;
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &text[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '-'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Phase 1: publisher → broker → subscriber.
pub(crate) async fn broker_only(w: Workload, port: u16) -> Phase {
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
    let line = {
        let received = received.clone();
        progress("broker only", &w, move || {
            format!(", {} received", received.load(Relaxed))
        })
    };
    let sent = publish_all(&w, port, "baseline", &Spikes::default(), false).await;
    line.end().await;
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
