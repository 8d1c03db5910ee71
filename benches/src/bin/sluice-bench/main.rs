//! `sluice-bench`: the end-to-end load benchmark (workloads W1 and W3, as
//! `benches/README.md` describes them), reproducible with one command:
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

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod agent;
mod burst;
mod load;
mod outage;
mod report;

use clap::Parser;
use hdrhistogram::Histogram;
use sluice_tests::Broker;

use agent::through_agent;
use load::{Workload, broker_only};
use report::{hgrm, kept_up, print_phase, svg};

/// Command-line options.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "sluice-bench",
    version,
    about = "End-to-end latency and throughput benchmark of the sluice agent (W1)",
    long_about = "End-to-end latency and throughput benchmark of the sluice agent (W1).\n\n\
N sensors publish JSON readings at a fixed rate, with a spike every so often, \
through an MQTT broker: first to a subscriber alone (the broker-only \
baseline), then through a sluice agent that the benchmark starts with W1's \
rule or the rules of --config. It reports the latency from each spike's \
publish to its alert and the part of it the agent added, the aggregates' \
delay after their window closes, the agent's CPU, RSS, shed and late counts; \
prints a progress line on a terminal; and writes .hgrm percentile files, an \
SVG plot and a JSON summary to --out.\n\n\
Against a broker in use (--broker), every topic of the run is under \
sluice-bench/<pid>/: subscribers to sensors/+ see none of the load.\n\n\
Exit status: 0 done; 1 --check found wrong counts; 2 a usage or setup \
error, before any load."
)]
pub(crate) struct Args {
    /// Readings per second, all sensors together.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) rate: u64,
    /// Sensors (series), `s-0000` …
    #[arg(long, default_value_t = 1_000)]
    pub(crate) sensors: u32,
    /// Seconds of load per phase.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Publishing connections.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: u32,
    /// Every this many readings of a sensor, a +15 spike (an anomaly).
    #[arg(long, default_value_t = 500)]
    pub(crate) spike_every: u64,
    /// Agent worker threads (default: the configuration's, or 1).
    #[arg(long)]
    pub(crate) workers: Option<usize>,
    /// The broker to run against, HOST:PORT (default: a private Mosquitto
    /// on a free loopback port, which needs `mosquitto` installed). Every
    /// topic of the run is under `sluice-bench/<pid>/`, so a broker in use
    /// can serve: its subscribers to `sensors/+` see none of the load.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) broker: Option<String>,
    /// The agent configuration whose rules to measure (windows, detectors,
    /// sketches, shedding, workers, tables): the benchmark keeps those and
    /// sets its own sources, output topics, metrics, agent_id, and no
    /// outbox, uplink or checkpoints. The load's series are `s-0000`,
    /// `s-0001` …; a rule must match them. Default: W1's rule.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The `sluice` binary (default: the one next to this binary).
    #[arg(long)]
    pub(crate) agent: Option<PathBuf>,
    /// Where the .hgrm, .svg and .json results go.
    #[arg(long, default_value = "sluice-bench-results")]
    pub(crate) out: PathBuf,
    /// Raise the rate (×--step per step, from --rate) until the agent falls
    /// behind, then the same for the broker alone; report the highest rate
    /// each sustained.
    #[arg(long)]
    pub(crate) find_max: bool,
    /// With --find-max: the factor between one rate and the next (finer
    /// steps tell two close maxima apart, at the cost of more runs).
    #[arg(long, default_value_t = 1.25, value_parser = parse_step)]
    pub(crate) step: f64,
    /// Skip the broker-only phase.
    #[arg(long)]
    pub(crate) no_baseline: bool,
    /// W3: the agent stores aggregates in its SQLite outbox and forwards them
    /// to a second (upstream) broker, which is stopped this many seconds,
    /// from 5 s into the load; reports the outbox's peak, the drain time,
    /// and seqs missing or duplicated upstream. Needs --seconds ≥ this + 10.
    #[arg(long)]
    pub(crate) outage_seconds: Option<u64>,
    /// An overload burst: this many times the rate (extra publishers, no
    /// spikes) for --burst-seconds, from a third of the way into the load;
    /// reports RSS before and during it and alert latency before, during,
    /// and from 2 s after it.
    #[arg(long)]
    pub(crate) burst_factor: Option<u64>,
    /// Length of the burst.
    #[arg(long, default_value_t = 3)]
    pub(crate) burst_seconds: u64,
    /// Send the burst as UDP datagrams to a UDP source of the agent, from
    /// one sender thread, instead of through the broker: the broker is then
    /// not the limit, and the agent itself can be overloaded.
    #[arg(long)]
    pub(crate) burst_udp: bool,
    /// With --burst-udp: the UDP source's `recv_buffer`, bytes (default:
    /// the system's).
    #[arg(long)]
    pub(crate) burst_recv_buffer: Option<usize>,
    /// With --burst-udp: every this many burst datagrams is a reading of a
    /// critical series (`c-…`, under a rule with `priority = "critical"`);
    /// reports how many the agent sent on in aggregates (none may be shed).
    #[arg(long)]
    pub(crate) critical_every: Option<u64>,
    /// The agent's `ring_capacity` (default: the agent's, 8192).
    #[arg(long)]
    pub(crate) ring_capacity: Option<usize>,
    /// Shed by sampling (keep one in 4) once a ring is this full (a
    /// fraction), instead of the default drop-newest at 0.8: with a small
    /// ring, an overload the agent could otherwise absorb.
    #[arg(long)]
    pub(crate) sample_above: Option<f64>,
    /// The agent's `aggregate_batch`: aggregates leave in JSON arrays of up
    /// to this many records (default: one message each).
    #[arg(long)]
    pub(crate) aggregate_batch: Option<usize>,
    /// The agent's MQTT source `gather_ms`: how long a dense stream gathers
    /// between reads (default: the agent's, 1; 0 reads at once, for the
    /// lowest latency at about twice the CPU)
    #[arg(long)]
    pub(crate) gather_ms: Option<u64>,
    /// Exit non-zero unless the counts are right: every reading the agent
    /// processed is in an aggregate, none shed, and every spike after the
    /// warm-up raised an alert (for CI; never asserts on timings).
    #[arg(long)]
    pub(crate) check: bool,
}

/// A --step: a factor from 1.01 to 4.
fn parse_step(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (1.01..=4.0).contains(&f) => Ok(f),
        _ => Err(format!("{text}: expected a factor from 1.01 to 4")),
    }
}

/// Ends the run with `message` on standard error and exit status 2 (a
/// usage or setup problem, before any load).
pub(crate) fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2);
}

fn main() {
    let args = Args::parse();
    let agent_bin = args.agent.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("current exe");
        me.with_file_name("sluice")
    });
    if !agent_bin.exists() {
        fail(format_args!(
            "{} not found: build it first (cargo build --release -p sluice --bin sluice) or pass --agent",
            agent_bin.display()
        ));
    }
    // The broker: the one given, or a private Mosquitto.
    let (host, private) = match &args.broker {
        Some(address) => {
            let Some((host, port)) = address.rsplit_once(':') else {
                fail(format_args!("--broker {address}: expected HOST:PORT"));
            };
            let Ok(port) = port.parse::<u16>() else {
                fail(format_args!("--broker {address}: {port} is not a port"));
            };
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            if let Err(e) = std::net::TcpStream::connect_timeout(
                &std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .ok()
                    .and_then(|mut a| a.next())
                    .unwrap_or_else(|| {
                        fail(format_args!("--broker {address}: cannot resolve {host}"))
                    }),
                Duration::from_secs(5),
            ) {
                fail(format_args!("--broker {address}: cannot connect: {e}"));
            }
            (host, Err(port))
        }
        None => {
            if sluice_tests::mosquitto_program().is_none() {
                fail(
                    "no --broker given and mosquitto is not installed (apt-get install mosquitto), so there is no private broker to start: pass --broker HOST:PORT",
                );
            }
            // Nagle off on the broker's side too (Mosquitto leaves it on by
            // default): otherwise a quiet subscriber's delayed ACKs hold
            // back small messages by up to 40 ms, and that would be
            // measured, not Sluice.
            (
                "127.0.0.1".to_string(),
                Ok(Broker::start_configured("bench", "set_tcp_nodelay true\n")),
            )
        }
    };
    load::set_broker_host(&host);
    let port = match &private {
        Ok(broker) => broker.port,
        Err(port) => *port,
    };
    // The configuration is read (and its errors told) before any load.
    if let Err(e) = agent::config_text(&args, port, 0, 0) {
        fail(e);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        fail(format_args!("cannot create {}: {e}", args.out.display()));
    }
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
        written: Default::default(),
    };
    println!(
        "W1: {} sensors, {} s per phase, {} connections, spike every {} readings per sensor; broker {}; rules of {}",
        args.sensors,
        args.seconds,
        args.connections,
        args.spike_every,
        match &private {
            Ok(_) => format!("private Mosquitto on 127.0.0.1:{port}"),
            Err(_) => format!("{host}:{port}, topics under {}", load::topic("")),
        },
        args.config
            .as_ref()
            .map_or("W1 (one worker)".to_string(), |c| c.display().to_string()),
    );
    if args.find_max {
        let mut rate = args.rate;
        let mut best = None;
        loop {
            let p = runtime.block_on(through_agent(workload(rate), port, &args, &agent_bin));
            print_phase("agent", &p);
            if !kept_up(&p) {
                break;
            }
            best = Some(rate);
            rate = (rate as f64 * args.step).round() as u64;
        }
        let mut rate = args.rate;
        let mut broker_best = None;
        loop {
            let p = runtime.block_on(broker_only(workload(rate), port));
            print_phase("broker", &p);
            if (p.received as f64) < 0.999 * p.sent as f64 || p.achieved_rate < 0.97 * rate as f64 {
                break;
            }
            broker_best = Some(rate);
            rate = (rate as f64 * args.step).round() as u64;
        }
        println!(
            "highest sustained rate: agent {}, broker only {} readings/s{}",
            best.map_or("none".into(), |r| r.to_string()),
            broker_best.map_or("none".into(), |r| r.to_string()),
            match (best, broker_best) {
                (Some(a), Some(b)) => format!(
                    " (agent/broker {:.2}; each within a step of ×{} of its true maximum)",
                    a as f64 / b as f64,
                    args.step
                ),
                _ => String::new(),
            }
        );
        return;
    }
    let baseline =
        (!args.no_baseline).then(|| runtime.block_on(broker_only(workload(args.rate), port)));
    if let Some(b) = &baseline {
        print_phase("broker", b);
    }
    let agent = runtime.block_on(through_agent(workload(args.rate), port, &args, &agent_bin));
    print_phase("agent", &agent);
    if let Some(added) = agent.latency_ms.get("added").filter(|a| a.count > 0) {
        println!(
            "  added by the agent (per spike: its alert's arrival − the arrival of the same reading through the broker alone): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms ({} spikes, {} alerts before their probe)",
            added.p50, added.p99, added.p999, added.count, agent.alerts_before_probe
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
        .filter_map(|(n, h)| {
            let label = match n {
                "broker" => "broker only: reading",
                "probe" => "with the agent: spike → its probe (broker only)",
                "alert" => "with the agent: spike → alert",
                "added" => "added by the agent: probe → alert",
                _ => return None,
            };
            Some((label, h))
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
    // The full path: a relative --out is resolved against the directory
    // the benchmark ran in, which the reader of this line may not know.
    let out = std::fs::canonicalize(&args.out).unwrap_or_else(|_| args.out.clone());
    println!(
        "results: {}/{stem}.{{svg,json}} and .hgrm files",
        out.display()
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The manual page the package ships is rendered from the command line
    /// and must match it: `SLUICE_BLESS=1 cargo test -p sluice-benches
    /// --bin sluice-bench` rewrites it after a change to the options.
    #[test]
    fn the_packaged_manual_page_is_current() {
        let at = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/deb/man/sluice-bench.1");
        let mut page = Vec::new();
        clap_mangen::Man::new(
            super::Args::command()
                .name("sluice-bench")
                .version(env!("CARGO_PKG_VERSION")),
        )
        .render(&mut page)
        .unwrap();
        if std::env::var_os("SLUICE_BLESS").is_some() {
            std::fs::write(&at, &page).unwrap();
            return;
        }
        assert!(
            std::fs::read(&at).unwrap_or_default() == page,
            "packaging/deb/man/sluice-bench.1 is not current: SLUICE_BLESS=1 cargo test -p sluice-benches --bin sluice-bench"
        );
    }
}
