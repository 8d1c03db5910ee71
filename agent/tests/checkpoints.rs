//! Checkpoints and crashes, with the real binary, real UDP, a real SQLite file
//! and a real upstream Mosquitto:
//!
//! * a restart (SIGTERM) keeps open windows and anomaly baselines: a window
//!   spanning the restart is reported once, whole, and a spike right after
//!   the restart raises an alert without a new warm-up;
//! * `kill -9` at random moments, 20 times, under continuous load: every
//!   `seq` committed to the outbox arrives upstream, and no window is
//!   reported twice.

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;
use sluice_tests::{Broker, WAIT, free_port, metric, now_ms, start_agent, wait_until};

/// The agent binary under test.
const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn terminate(agent: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while agent.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < WAIT, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything the upstream broker receives under `sluice/<agent>/#`.
async fn upstream(port: u16, agent: &str) -> Arc<Mutex<Vec<Value>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let (id, filter) = (format!("{agent}-upstream-sub"), format!("sluice/{agent}/#"));
    sluice_tests::subscribe(port, &id, &filter, QoS::AtLeastOnce, true, move |p| {
        sink.lock()
            .unwrap()
            .push(serde_json::from_slice(&p.payload).unwrap());
    })
    .await;
    got
}

fn config(
    dir: &std::path::Path,
    agent: &str,
    udp: u16,
    metrics: u16,
    upstream: u16,
    rules: &str,
    interval_ms: u64,
) -> std::path::PathBuf {
    let path = dir.join(format!("{agent}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
agent_id = "{agent}"
workers = 2
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[metrics]
listen = "127.0.0.1:{metrics}"
stats_interval_s = 0
{rules}
[outbox]
path = "{db}"
include_alerts = true
[uplink]
host = "127.0.0.1"
port = {upstream}
max_inflight = 8
reconnect_max_ms = 500
[checkpoint]
interval_ms = {interval_ms}
"#,
            db = dir.join(format!("{agent}.db")).display(),
        ),
    )
    .unwrap();
    path
}

fn send(socket: &UdpSocket, port: u16, sensor: &str, ts: i64, value: f64) {
    let line = format!(r#"{{"sensor":"{sensor}","ts":{ts},"value":{value}}}"#);
    // While the agent is down the datagram is refused: that is the load
    // a crash loses, not the outbox's.
    let _ = socket.send_to(line.as_bytes(), ("127.0.0.1", port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_open_windows_and_anomaly_baselines() {
    let broker = Broker::start("cp-upstream");
    let tmp = sluice_tests::temp_dir("cp");
    let dir = tmp.path().to_path_buf();
    let (udp, metrics) = (free_port(), free_port());
    let rules = r#"
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 600000 }
anomaly = { alpha = 0.1, k = 4.0, warmup = 40 }
"#;
    let config = config(&dir, "cp", udp, metrics, broker.port, rules, 60_000);
    let log = dir.join("cp.log");
    let got = upstream(broker.port, "cp").await;
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A ten-minute window, from a round ten minutes ago (so that no wall
    // clock tick closes it during the test).
    let t0 = (now_ms() / 600_000 - 1) * 600_000;

    let mut agent = start_agent(SLUICE, &config, &log);
    // Metrics are served once every source is up.
    wait_until("the agent", &log, || {
        metric(metrics, "sluice_readings_processed_total").is_some()
    })
    .await;
    for i in 0..50 {
        send(&socket, udp, "a", t0 + i, 10.0 + (i % 3) as f64);
    }
    wait_until("the first 50 readings", &log, || {
        metric(metrics, "sluice_readings_processed_total") == Some(50)
    })
    .await;
    terminate(&mut agent);
    // No partial window was reported at shutdown.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(got.lock().unwrap().is_empty(), "{:?}", got.lock().unwrap());

    let mut agent = start_agent(SLUICE, &config, &log);
    wait_until("restored", &log, || {
        metric(metrics, "sluice_checkpoint_restored_series_total") == Some(1)
    })
    .await;
    // A spike right away: the baseline came back warm.
    send(&socket, udp, "a", t0 + 50, 100.0);
    for i in 51..100 {
        send(&socket, udp, "a", t0 + i, 10.0 + (i % 3) as f64);
    }
    wait_until("100 readings", &log, || {
        metric(metrics, "sluice_readings_processed_total") == Some(50)
    })
    .await;
    // The next window begins: the one spanning the restart closes.
    send(&socket, udp, "a", t0 + 600_000, 10.0);
    wait_until("the aggregate", &log, || {
        got.lock().unwrap().iter().any(|v| v.get("count").is_some())
    })
    .await;
    terminate(&mut agent);
    let got = got.lock().unwrap().clone();
    let aggregates: Vec<&Value> = got.iter().filter(|v| v.get("count").is_some()).collect();
    assert_eq!(aggregates.len(), 1, "{aggregates:?}");
    assert_eq!(aggregates[0]["start"], t0);
    assert_eq!(aggregates[0]["count"], 100, "{:?}", aggregates[0]);
    assert_eq!(aggregates[0]["partial"], false);
    assert!(
        got.iter()
            .any(|v| v["state"] == "raised" && v["value"] == 100.0),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_twenty_times_under_load_loses_no_committed_seq_and_reports_no_window_twice() {
    let broker = Broker::start("crash-upstream");
    let tmp = sluice_tests::temp_dir("crash");
    let dir = tmp.path().to_path_buf();
    let (udp, metrics) = (free_port(), free_port());
    let rules = r#"
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 100 }
anomaly = { alpha = 0.05, k = 3.0, warmup = 20 }
"#;
    let config = config(&dir, "crash", udp, metrics, broker.port, rules, 150);
    let log = dir.join("crash.log");
    let got = upstream(broker.port, "crash").await;

    // Continuous load: 8 series, a reading each every 2 ms, event time now.
    // Half the ids are hostile ones that topics must escape, and a ninth,
    // which no topic can carry, is refused at decode.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut i = 0u64;
            let ids = [
                "s0",
                "s1",
                "s2",
                "s3",
                "a/../../alerts/x",
                "bad#id",
                "$SYS",
                "p+q",
                "nul\\u0000id",
            ];
            while !stop.load(Relaxed) {
                for s in ids {
                    send(&socket, udp, s, now_ms(), (i % 5) as f64);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // Kill it at random moments (a seeded SplitMix64 for the delays).
    let mut seed = 0x5eed_u64;
    let mut next = || {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut kills = 0;
    let runs_started = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("sluice running")
            .count()
    };
    while kills < 20 {
        let before = runs_started();
        let mut agent = start_agent(SLUICE, &config, &log);
        // Killed at a random moment once it runs (a loaded machine can
        // take longer to start it than the delays below).
        wait_until("the agent to run", &log, || runs_started() > before).await;
        let delay = 150 + next() % 600;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        agent.kill().unwrap();
        agent.wait().unwrap();
        kills += 1;
    }
    stop.store(true, Relaxed);
    load.join().unwrap();

    // The final run drains the backlog (once the restored windows, idle
    // now, have closed).
    let mut agent = start_agent(SLUICE, &config, &log);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_until("the backlog to drain", &log, || {
        metric(metrics, "sluice_outbox_backlog") == Some(0)
    })
    .await;
    terminate(&mut agent);
    let status = sluice_tests::own_binary(SLUICE)
        .args(["outbox", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    let next_seq: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("next seq: "))
        .unwrap_or_else(|| panic!("{text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(text.contains("backlog: 0 records"), "{text}");
    wait_until("every seq upstream", &log, || {
        let seqs: BTreeSet<i64> = got
            .lock()
            .unwrap()
            .iter()
            .filter_map(|v| v["seq"].as_i64())
            .collect();
        seqs.len() as i64 >= next_seq - 1
    })
    .await;
    let got = got.lock().unwrap().clone();
    let seqs: BTreeSet<i64> = got.iter().filter_map(|v| v["seq"].as_i64()).collect();
    assert_eq!(
        seqs.iter().copied().collect::<Vec<_>>(),
        (1..next_seq).collect::<Vec<_>>(),
        "every committed seq arrived, none missing"
    );
    // No window reported twice: one seq per (series, start).
    let mut windows: BTreeMap<(String, i64), BTreeSet<i64>> = BTreeMap::new();
    for v in got.iter().filter(|v| v.get("count").is_some()) {
        windows
            .entry((
                v["series"].as_str().unwrap().into(),
                v["start"].as_i64().unwrap(),
            ))
            .or_default()
            .insert(v["seq"].as_i64().unwrap());
    }
    let twice: Vec<_> = windows.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(twice.is_empty(), "windows reported twice: {twice:?}");
    // The hostile ids went through under their own names; the refused one
    // never did.
    let series: BTreeSet<&str> = windows.keys().map(|(s, _)| s.as_str()).collect();
    for id in ["a/../../alerts/x", "bad#id", "$SYS", "p+q"] {
        assert!(series.contains(id), "{id} missing: {series:?}");
    }
    assert_eq!(series.len(), 8, "{series:?}");
    assert!(windows.len() > 100, "{} windows", windows.len());
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("state restored from checkpoints"));
    eprintln!(
        "{kills} kills: {} records committed, {} windows, {} duplicates resent",
        next_seq - 1,
        windows.len(),
        got.iter().filter(|v| v["seq"].as_i64().is_some()).count() - seqs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_restored_after_a_crash_is_reported_partial() {
    let broker = Broker::start("partial-upstream");
    let tmp = sluice_tests::temp_dir("partial");
    let dir = tmp.path().to_path_buf();
    let (udp, metrics) = (free_port(), free_port());
    let rules = r#"
[[rules]]
match = "*"
window = { kind = "tumbling", size_ms = 600000 }
"#;
    let config = config(&dir, "crash", udp, metrics, broker.port, rules, 100);
    let log = dir.join("crash.log");
    let got = upstream(broker.port, "crash").await;
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let t0 = (now_ms() / 600_000 - 1) * 600_000;
    let mut agent = start_agent(SLUICE, &config, &log);
    wait_until("the agent", &log, || {
        metric(metrics, "sluice_readings_processed_total").is_some()
    })
    .await;
    for i in 0..20 {
        send(&socket, udp, "a", t0 + i, 1.0);
    }
    wait_until("the readings", &log, || {
        metric(metrics, "sluice_readings_processed_total") == Some(20)
    })
    .await;
    // Two checkpoints later, the readings are surely in one.
    let saved = metric(metrics, "sluice_checkpoints_total").unwrap();
    wait_until("a checkpoint holding them", &log, || {
        metric(metrics, "sluice_checkpoints_total").unwrap() >= saved + 2 * 2
    })
    .await;
    agent.kill().unwrap();
    agent.wait().unwrap();

    let mut agent = start_agent(SLUICE, &config, &log);
    wait_until("restored", &log, || {
        metric(metrics, "sluice_checkpoint_restored_series_total") == Some(1)
    })
    .await;
    for i in 20..25 {
        send(&socket, udp, "a", t0 + i, 1.0);
    }
    send(&socket, udp, "a", t0 + 600_000, 1.0);
    wait_until("the aggregate", &log, || {
        got.lock().unwrap().iter().any(|v| v.get("count").is_some())
    })
    .await;
    terminate(&mut agent);
    let got = got.lock().unwrap().clone();
    let aggregate = got.iter().find(|v| v.get("count").is_some()).unwrap();
    assert_eq!(aggregate["count"], 25, "{aggregate}");
    assert_eq!(aggregate["partial"], true, "{aggregate}");
    assert_eq!(
        aggregate["partial_reason"], "restored_after_crash",
        "{aggregate}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("did not stop cleanly"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_only_mode_does_not_report_a_window_again_after_kill_9() {
    // No outbox: checkpoints (and window marks) in their own file, and
    // aggregates only on the local broker.
    let broker = Broker::start("cponly");
    let tmp = sluice_tests::temp_dir("cponly");
    let dir = tmp.path().to_path_buf();
    let (udp, metrics) = (free_port(), free_port());
    let config = dir.join("cponly.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "cponly"
workers = 1
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[metrics]
listen = "127.0.0.1:{metrics}"
stats_interval_s = 0
[[rules]]
match = "*"
window = {{ kind = "tumbling", size_ms = 600000 }}
[output.mqtt]
host = "127.0.0.1"
port = {port}
[checkpoint]
interval_ms = 600000
path = "{db}"
"#,
            port = broker.port,
            db = dir.join("state.db").display(),
        ),
    )
    .unwrap();
    let log = dir.join("cponly.log");
    let got = Arc::new(Mutex::new(Vec::<Value>::new()));
    {
        let sink = got.clone();
        sluice_tests::subscribe(
            broker.port,
            "cponly-sub",
            "sluice/cponly/agg/#",
            QoS::AtLeastOnce,
            true,
            move |p| {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&p.payload).unwrap());
            },
        )
        .await;
    }
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Ten-minute windows from twenty minutes ago: W, then W + 1.
    let w = (now_ms() / 600_000 - 2) * 600_000;
    let ready = || metric(metrics, "sluice_readings_processed_total").is_some();
    // Run 1: readings in W; SIGTERM saves W, open, in a checkpoint.
    let mut agent = start_agent(SLUICE, &config, &log);
    wait_until("run 1", &log, ready).await;
    for i in 0..10 {
        send(&socket, udp, "a", w + i, 1.0);
    }
    wait_until("the readings", &log, || {
        metric(metrics, "sluice_readings_processed_total") == Some(10)
    })
    .await;
    terminate(&mut agent);
    // Run 2: W restored; a reading in W + 1 closes it and it is reported.
    let mut agent = start_agent(SLUICE, &config, &log);
    wait_until("run 2", &log, ready).await;
    send(&socket, udp, "a", w + 600_000, 1.0);
    wait_until("W reported", &log, || {
        got.lock().unwrap().iter().any(|v| v["start"] == w)
    })
    .await;
    // Its mark commits a moment after it is published; then a crash, long
    // before the next checkpoint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.kill().unwrap();
    agent.wait().unwrap();
    // Run 3: the checkpoint still holds W open, but its mark says it was
    // reported: it must not be reported again.
    let mut agent = start_agent(SLUICE, &config, &log);
    wait_until("run 3", &log, ready).await;
    send(&socket, udp, "a", w + 1_200_000, 1.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    terminate(&mut agent);
    let got = got.lock().unwrap().clone();
    let reports_of_w = got.iter().filter(|v| v["start"] == w).count();
    assert_eq!(reports_of_w, 1, "W reported {reports_of_w} times: {got:?}");
}
