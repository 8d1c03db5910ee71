//! `sluice demo`: the real pipeline on generated sensors, with nothing
//! installed and no configuration file.
//!
//! Eight sensors send W1-style readings over UDP on 127.0.0.1 to the
//! agent's own UDP source, 20 times a second each: a per-sensor baseline with
//! Gaussian noise and a slow drift, a +15 spike on one sensor every seven
//! seconds, and one sensor that falls silent from 5 to 15 seconds. The agent
//! computes 1-second tumbling windows, EWMA anomaly alerts and an `absent`
//! alert for a silent sensor. The demo shows each second's windows as one
//! row of a table (the mean of each sensor, `-` for none), alerts as lines
//! that stand out between the rows, and a status line every ten seconds,
//! all within 80 columns.

use std::io::IsTerminal;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use sluice_collectors::reading::now_ms;
use sluice_core::rng::SplitMix64;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::output::{Record, clock};
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
absent_after_ms = 3000

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
    let (tap, records) = mpsc::channel(4096);
    let pipeline = tokio::spawn(pipeline::run_tapped(
        config,
        shutdown.clone(),
        Some(started_tx),
        tap,
    ));
    let running = started_rx.await?;
    let addr = running.udp_addrs["demo"];
    crate::outln!("sluice demo: {SENSORS} sensors x {HZ} readings/s over UDP to {addr}.");
    crate::outln!("s-0003 spikes every 7 s; s-0007 falls silent from 5 s to 15 s. Ctrl-C stops.");
    crate::outln!("Each row: every sensor's mean over one 1-second window. Alerts as they come.");
    let color = std::io::stdout().is_terminal();
    let table = tokio::spawn(show(records, color));
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
    let _ = table.await;
    let _ = status.await;
    print_status(&running, "final");
    Ok(running)
}

/// One status line.
fn print_status(r: &Running, label: &str) {
    let s = &r.sources["demo"];
    let o = &r.output;
    crate::outln!(
        "-- {label}: readings {}, rejected {}, shed {}, windows {}, alerts +{} -{}",
        s.decoded.load(Relaxed),
        s.rejected_total(),
        s.shed_total(),
        o.aggregates.load(Relaxed),
        o.alerts_raised.load(Relaxed),
        o.alerts_cleared.load(Relaxed),
    );
}

async fn status(running: Running, shutdown: CancellationToken) {
    let start = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        print_status(&running, &format!("{} s", start.elapsed().as_secs()));
    }
}

/// How long a row waits for the rest of its window's aggregates (they close
/// together, within milliseconds) before it is printed without them.
const ROW_WAIT: Duration = Duration::from_millis(300);
/// Rows between two headers.
const HEADER_EVERY: usize = 20;

/// The table: one row per window, one column per sensor.
struct Table {
    /// The window being filled: its start, when its first aggregate came,
    /// and each sensor's mean.
    row: Option<(i64, Instant, [Option<f64>; SENSORS as usize])>,
    rows: usize,
    color: bool,
}

impl Table {
    fn aggregate(&mut self, a: &crate::output::AggregateRecord) {
        let Some(i) = a
            .series
            .strip_prefix("s-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&i| i < SENSORS as usize)
        else {
            return;
        };
        if self.row.is_some_and(|(start, ..)| start != a.start) {
            self.flush();
        }
        let (_, _, cells) =
            self.row
                .get_or_insert((a.start, Instant::now(), [None; SENSORS as usize]));
        cells[i] = Some(a.mean);
        if cells.iter().all(Option::is_some) {
            self.flush();
        }
    }

    fn flush_if_due(&mut self) {
        if self
            .row
            .is_some_and(|(_, first, _)| first.elapsed() >= ROW_WAIT)
        {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let Some((start, _, cells)) = self.row.take() else {
            return;
        };
        if self.rows.is_multiple_of(HEADER_EVERY) {
            let names: String = (0..SENSORS).map(|i| format!(" s-{i:04}")).collect();
            crate::outln!("\nwindow  {names}");
        }
        self.rows += 1;
        let cells: String = cells
            .iter()
            .map(|c| c.map_or_else(|| format!("{:>7}", "-"), |m| format!("{m:>7.1}")))
            .collect();
        crate::outln!("{}{cells}", clock(start, false));
    }

    fn alert(&mut self, e: &crate::output::AlertEvent) {
        // The row before it first, so that the alert follows its window.
        self.flush_if_due();
        let why = match (e.rule, e.state) {
            ("absent", "raised") => format!("nothing for {:.1} s", e.score.unwrap_or(0.0) / 1000.0),
            ("absent", _) => format!(
                "back after {:.1} s, value {:.1}",
                e.score.unwrap_or(0.0) / 1000.0,
                e.value
            ),
            ("zscore", _) => format!(
                "value {:.1}, |z| {:.1} vs {:.1}",
                e.value,
                e.score.unwrap_or(0.0).abs(),
                e.threshold
            ),
            _ => format!("value {:.1} vs {:.1}", e.value, e.threshold),
        };
        let (mark, on, off) = match (e.state, self.color) {
            ("raised", true) => ("!!", "\x1b[1;31m", "\x1b[0m"),
            ("raised", false) => ("!!", "", ""),
            (_, true) => ("ok", "\x1b[32m", "\x1b[0m"),
            (_, false) => ("ok", "", ""),
        };
        crate::outln!(
            "{on}{mark} {} {} {} {}: {why}{off}",
            clock(e.detected_ts, false),
            e.series,
            e.rule,
            e.state
        );
    }
}

/// Prints what the pipeline emits until it stops.
async fn show(mut records: mpsc::Receiver<Record>, color: bool) {
    let mut table = Table {
        row: None,
        rows: 0,
        color,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            record = records.recv() => match record {
                Some(Record::Aggregate(a)) => table.aggregate(&a),
                Some(Record::Alert(e)) => table.alert(&e),
                Some(_) => {}
                None => {
                    table.flush();
                    return;
                }
            },
            _ = tick.tick() => table.flush_if_due(),
        }
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
        // libm, not f64's methods: see tests/linkage.rs.
        (-2.0 * libm::log(u1)).sqrt() * libm::cos(2.0 * std::f64::consts::PI * u2)
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
            let mut value =
                20.0 + i as f64 + 2.0 * libm::sin(t / 60.0 + i as f64) + gaussian() * 0.5;
            // s-0003 spikes for one reading every 7 seconds (after warm-up).
            if i == 3 && t > 3.0 && (t % 7.0) < 1.0 / HZ as f64 {
                value += 15.0;
            }
            // s-0007 falls silent from 5 to 15 seconds.
            if i == 7 && (5.0..15.0).contains(&t) {
                continue;
            }
            let line = format!(r#"{{"sensor":"s-{i:04}","ts":{ts},"value":{value:.3}}}"#);
            let _ = socket.send_to(line.as_bytes(), addr).await;
        }
    }
}
