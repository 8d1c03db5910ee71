//! `sluice demo`: the real pipeline on generated sensors, with nothing
//! installed and no configuration file.
//!
//! Eight sensors send W1-style readings over UDP on 127.0.0.1 to the
//! agent's own UDP source, 20 times a second each: a per-sensor baseline with
//! Gaussian noise and a slow drift, a +15 spike on one sensor every seven
//! seconds, and one sensor that dies (reads 0) after ten seconds. The agent
//! computes 1-second tumbling windows and EWMA anomaly and threshold alerts,
//! and prints them as they happen, with a status line every second.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use sluice_collectors::reading::now_ms;
use sluice_core::rng::SplitMix64;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::{self, Running};

/// The demo's configuration (what `sluice demo --print-config` prints).
pub const CONFIG: &str = r#"# The configuration `sluice demo` runs.
agent_id = "demo"
workers = 1

[sources.demo]
kind = "udp"
bind = "127.0.0.1:0"

[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 1000, lateness_ms = 200 }
anomaly = { alpha = 0.02, k = 5.0, clear_k = 3.0, warmup = 30 }
thresholds = [{ below = 0.5, clear_at = 1.0, raise_after = 5 }]

[output]
console = true
"#;

const SENSORS: u64 = 8;
const HZ: u64 = 20;

/// Runs the demo until `shutdown` (Ctrl-C) or `duration`, whichever is first.
pub async fn run(
    duration: Option<Duration>,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let config = Config::parse(CONFIG)?;
    let (started_tx, started_rx) = oneshot::channel();
    let pipeline = tokio::spawn(pipeline::run(config, shutdown.clone(), Some(started_tx)));
    let running = started_rx.await?;
    let addr = running.udp_addrs["demo"];
    println!(
        "sluice demo: {SENSORS} sensors x {HZ} readings/s over UDP to {addr}; Ctrl-C to stop."
    );
    println!("(s-0003 spikes every 7 s; s-0007 dies after 10 s.)\n");
    let generator = tokio::spawn(generate(addr, shutdown.clone()));
    let status = tokio::spawn(status(running.clone(), shutdown.clone()));
    if let Some(d) = duration {
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stopper.cancel();
        });
    }
    let running = pipeline.await??;
    let _ = generator.await;
    let _ = status.await;
    print_status(&running, "final");
    Ok(running)
}

/// One status line.
fn print_status(r: &Running, label: &str) {
    let s = &r.sources["demo"];
    let late: u64 = r.workers.iter().map(|w| w.late.load(Relaxed)).sum();
    println!(
        "[{label}] received={} decoded={} rejected={} shed={} late={} aggregates={} alerts raised={} cleared={}",
        s.messages.load(Relaxed),
        s.decoded.load(Relaxed),
        s.rejected_total(),
        s.shed_total(),
        late,
        r.output.aggregates.load(Relaxed),
        r.output.alerts_raised.load(Relaxed),
        r.output.alerts_cleared.load(Relaxed),
    );
}

async fn status(running: Running, shutdown: CancellationToken) {
    let start = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        print_status(&running, &format!("{:>3} s", start.elapsed().as_secs()));
    }
}

/// Sends the sensors' readings until shutdown.
async fn generate(addr: std::net::SocketAddr, shutdown: CancellationToken) {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
        return;
    };
    let mut rng = SplitMix64::new(now_ms() as u64);
    let mut gaussian = move || {
        let (u1, u2) = (rng.next_f64().max(1e-12), rng.next_f64());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / HZ));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let t = start.elapsed().as_secs_f64();
        let ts = now_ms();
        for i in 0..SENSORS {
            let mut value = 20.0 + i as f64 + 2.0 * (t / 60.0 + i as f64).sin() + gaussian() * 0.5;
            // s-0003 spikes for one reading every 7 seconds (after warm-up).
            if i == 3 && t > 3.0 && (t % 7.0) < 1.0 / HZ as f64 {
                value += 15.0;
            }
            // s-0007 dies after 10 seconds: it keeps reporting 0.
            if i == 7 && t > 10.0 {
                value = 0.0;
            }
            let line = format!(r#"{{"sensor":"s-{i:04}","ts":{ts},"value":{value:.3}}}"#);
            let _ = socket.send_to(line.as_bytes(), addr).await;
        }
    }
}
