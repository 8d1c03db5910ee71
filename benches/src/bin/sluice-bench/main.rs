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
#[command(about = "End-to-end latency and throughput benchmark of the sluice agent (W1)")]
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
    /// Agent worker threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// The `sluice` binary (default: next to this one).
    #[arg(long)]
    pub(crate) agent: Option<PathBuf>,
    /// Where the .hgrm, .svg and .json results go.
    #[arg(long, default_value = "benches/results")]
    pub(crate) out: PathBuf,
    /// Raise the rate (×1.25 per step, from --rate) until the agent falls
    /// behind; report the highest rate it sustained.
    #[arg(long)]
    pub(crate) find_max: bool,
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
    /// Exit non-zero unless the counts are right: every reading the agent
    /// processed is in an aggregate, none shed, and every spike after the
    /// warm-up raised an alert (for CI; never asserts on timings).
    #[arg(long)]
    pub(crate) check: bool,
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
        written: Default::default(),
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
