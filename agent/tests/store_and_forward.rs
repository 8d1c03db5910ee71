//! Store and forward: aggregates go through the SQLite outbox to an upstream
//! broker, in `seq` order, none missing, across an upstream outage and a
//! `kill -9` of the agent.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;
use sluice_tests::{Broker, Publisher, WAIT, metric, now_ms, start_agent, wait_until};

/// The agent binary under test.
const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// A persistent-session subscriber upstream: the broker queues for it while
/// it is away, so it sees everything the agent's uplink got acknowledged:
/// (seq, whether it is the aggregate of a probe), in arrival order.
async fn upstream_subscriber(port: u16) -> Arc<Mutex<Vec<(i64, bool)>>> {
    let seqs = Arc::new(Mutex::new(Vec::new()));
    let sink = seqs.clone();
    sluice_tests::subscribe(
        port,
        "sf-upstream-sub",
        "sluice/sf/agg/#",
        QoS::AtLeastOnce,
        false,
        move |p| {
            if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                assert_eq!(v["agent"], "sf");
                let probe = v["series"] == "probe";
                sink.lock()
                    .unwrap()
                    .push((v["seq"].as_i64().unwrap(), probe));
            }
        },
    )
    .await;
    seqs
}

/// The distinct seqs of the aggregates of agent `agent` that reach the
/// upstream broker on `port` (a clean-session subscriber, listening once
/// this returns).
async fn distinct_seqs(port: u16, agent: &str) -> Arc<Mutex<BTreeSet<i64>>> {
    let seqs = Arc::new(Mutex::new(BTreeSet::new()));
    let sink = seqs.clone();
    let (id, filter) = (
        format!("{agent}-upstream-sub"),
        format!("sluice/{agent}/agg/#"),
    );
    sluice_tests::subscribe(port, &id, &filter, QoS::AtLeastOnce, true, move |p| {
        let v: Value = serde_json::from_slice(&p.payload).unwrap();
        sink.lock().unwrap().insert(v["seq"].as_i64().unwrap());
    })
    .await;
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_committed_is_lost_across_an_upstream_outage_and_kill_9() {
    let local = Broker::start("sf-local");
    let mut upstream = Broker::start_persistent("sf-upstream");
    let tmp = sluice_tests::temp_dir("sf");
    let dir = tmp.path().to_path_buf();
    let config = dir.join("sf.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "sf"
[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {local}
client_id = "sf-in"
topics = ["sensors/+"]
clean_session = false   # the local broker queues for the agent while it is down

[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}   # one aggregate per reading

[outbox]
path = "{db}"

[uplink]
host = "127.0.0.1"
port = {upstream}
max_inflight = 8
reconnect_max_ms = 500
"#,
            local = local.port,
            upstream = upstream.port,
            db = dir.join("outbox.db").display()
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let got = upstream_subscriber(upstream.port).await;
    let mut agent = start_agent(SLUICE, &config, &log);
    let publisher = Publisher::connect(local.port, "sf-publisher");
    let mut sent = 0usize;
    // Ordinary ids and hostile ones that topics must escape.
    let ids = [
        "s-0",
        "s-1",
        "s-2",
        "a/../../alerts/x",
        "bad#id",
        "$SYS",
        "p+q",
    ];
    let send = |n: usize, sent: &mut usize| {
        let batch: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"sensor":"{}","ts":{},"value":{}}}"#,
                    ids[(*sent + i) % ids.len()],
                    now_ms(),
                    *sent + i
                )
            })
            .collect();
        *sent += n;
        batch
    };
    // Until the agent is subscribed locally: readings sent before are lost
    // to a session that does not exist yet, so probe until the first
    // aggregate arrives. Probes are a series of their own: however many the
    // agent got, they are told apart from the counted readings below.
    let start = Instant::now();
    while got.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < WAIT,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let probe = format!(r#"{{"sensor":"probe","ts":{},"value":0}}"#, now_ms());
        publisher
            .publish("sensors/x", QoS::AtLeastOnce, probe)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Phase 1: 100 readings, forwarded live.
    for m in send(100, &mut sent) {
        publisher.publish("sensors/x", QoS::AtLeastOnce, m).await;
    }
    // Phase 2: the upstream broker goes away; the agent keeps committing.
    upstream.stop();
    for m in send(300, &mut sent) {
        publisher.publish("sensors/x", QoS::AtLeastOnce, m).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Phase 3: kill -9 the agent while it holds a backlog, and restart it.
    agent.kill().unwrap();
    agent.wait().unwrap();
    for m in send(100, &mut sent) {
        publisher.publish("sensors/x", QoS::AtLeastOnce, m).await;
    }
    let mut agent = start_agent(SLUICE, &config, &log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Phase 4: the upstream broker returns; the backlog drains.
    upstream.restart();
    // Every seq the outbox ever handed out arrives upstream.
    let counted = |got: &[(i64, bool)]| {
        let readings: BTreeSet<i64> = got.iter().filter(|g| !g.1).map(|g| g.0).collect();
        readings.len()
    };
    wait_until("every seq upstream", &log, || {
        let got = got.lock().unwrap();
        let seqs: BTreeSet<i64> = got.iter().map(|g| g.0).collect();
        counted(&got) >= sent && seqs.iter().copied().eq(1..=seqs.len() as i64)
    })
    .await;
    let got = got.lock().unwrap().clone();
    assert_eq!(
        counted(&got),
        sent,
        "one aggregate per reading, none missing"
    );
    let all: Vec<i64> = got.iter().map(|g| g.0).collect();
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert!(
        distinct.iter().copied().eq(1..=distinct.len() as i64),
        "a gap in the seqs: {distinct:?}"
    );
    // Duplicates only from the in-flight window at the moments of failure.
    let duplicates = all.len() - distinct.len();
    assert!(duplicates <= 3 * 8, "{duplicates} duplicates");
    // And in order within each lane: the backlog and the live records
    // committed since the last connection each go in `seq` order, so the
    // first arrivals are at most two interleaved increasing runs (resends
    // aside). Greedy patience: each seq extends the run with the highest
    // end below it, which needs the fewest runs.
    let mut seen = BTreeSet::new();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &s in all.iter().filter(|s| seen.insert(**s)) {
        match runs.iter_mut().filter(|r| r.1 < s).max_by_key(|r| r.1) {
            Some(run) => run.1 = s,
            None => runs.push((s, s)),
        }
    }
    assert!(
        runs.len() <= 2,
        "seqs arrived out of order beyond the two lanes; runs (first, last): {runs:?}"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    // The operator's view of it.
    let status = sluice_tests::own_binary(SLUICE)
        .args(["outbox", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    let next = distinct.len() + 1;
    assert!(text.contains(&format!("next seq: {next}")), "{text}");
    let verify = sluice_tests::own_binary(SLUICE)
        .args(["outbox", "verify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && String::from_utf8_lossy(&verify.stdout).contains("integrity ok")
    );
    drop(local);
}

fn tls_config(
    dir: &std::path::Path,
    local: u16,
    upstream_tls: u16,
    ca: &std::path::Path,
    metrics: u16,
    name: &str,
) -> std::path::PathBuf {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "tls"
[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {local}
client_id = "tls-in-{name}"
topics = ["sensors/+"]

[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}

[outbox]
path = "{db}"

[uplink]
host = "127.0.0.1"
port = {upstream_tls}
reconnect_max_ms = 500

[uplink.tls]
ca_file = "{ca}"

[metrics]
listen = "127.0.0.1:{metrics}"
"#,
            db = dir.join(format!("{name}.db")).display(),
            ca = ca.display(),
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_speaks_tls_and_refuses_a_broker_its_ca_did_not_sign() {
    let tmp = sluice_tests::temp_dir("sf-tls");
    let dir = tmp.path().to_path_buf();
    let (ca, cert, key) = sluice_tests::test_pki(&dir, "good");
    let (other_ca, _, _) = sluice_tests::test_pki(&dir, "other");
    let local = Broker::start("tls-local");
    let upstream = Broker::start_with("tls-upstream", Some((&ca, &cert, &key)));
    let tls_port = upstream.tls_port.unwrap();
    let publisher = Publisher::connect(local.port, "tls-publisher");

    // The right CA: records arrive upstream over TLS.
    let got = distinct_seqs(upstream.port, "tls").await;
    let metrics = sluice_tests::free_port();
    let config = tls_config(&dir, local.port, tls_port, &ca, metrics, "good");
    let log = dir.join("good.log");
    let mut agent = start_agent(SLUICE, &config, &log);
    let start = Instant::now();
    while got.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < WAIT,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        publisher
            .publish(
                "sensors/x",
                QoS::AtLeastOnce,
                format!(r#"{{"sensor":"a","ts":{},"value":1}}"#, now_ms()),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.kill().unwrap();
    agent.wait().unwrap();

    // A CA that did not sign the upstream broker: no connection, records
    // wait in the outbox, and the log says why.
    let metrics = sluice_tests::free_port();
    let config = tls_config(&dir, local.port, tls_port, &other_ca, metrics, "wrong");
    let log = dir.join("wrong.log");
    let mut agent = start_agent(SLUICE, &config, &log);
    let start = Instant::now();
    while metric(metrics, "sluice_outbox_appended_total").unwrap_or(0) < 3 {
        assert!(
            start.elapsed() < WAIT,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        publisher
            .publish(
                "sensors/x",
                QoS::AtLeastOnce,
                format!(r#"{{"sensor":"b","ts":{},"value":1}}"#, now_ms()),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(metrics, "sluice_uplink_connects_total"), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("uplink unavailable") && text.to_lowercase().contains("certificate"),
        "{text}"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
}

/// An agent `agent` reading UDP on `udp`, one aggregate per reading,
/// committed to the outbox `db` and forwarded to the broker on `upstream`;
/// metrics on `metrics`. Returns the config file's path.
fn udp_outbox_config(
    dir: &std::path::Path,
    agent: &str,
    udp: u16,
    metrics: u16,
    db: &std::path::Path,
    upstream: u16,
) -> std::path::PathBuf {
    let config = dir.join(format!("{agent}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "{agent}"
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[metrics]
listen = "127.0.0.1:{metrics}"
[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}
[outbox]
path = "{db}"
[uplink]
host = "127.0.0.1"
port = {upstream}
"#,
            db = db.display(),
        ),
    )
    .unwrap();
    config
}

/// The agent on `config`, logging to `log`, in a "full disk": no file it
/// writes may grow past `bytes` (RLIMIT_FSIZE makes such writes fail with
/// EFBIG, as a full disk makes them fail with ENOSPC).
fn agent_with_file_size_limit(
    config: &std::path::Path,
    log: &std::path::Path,
    bytes: u64,
) -> sluice_tests::ChildGuard {
    use std::os::unix::process::CommandExt;
    let mut command = sluice_tests::own_binary(SLUICE);
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: setrlimit(2) is async-signal-safe; it runs in the child
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    sluice_tests::ChildGuard(command.spawn().unwrap())
}

/// Space returns: lifts the file size limit of the running `agent`.
fn lift_file_size_limit(agent: &sluice_tests::ChildGuard) {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit(2) on our own child, with a valid limit and no old value.
    let raised = unsafe {
        libc::prlimit(
            agent.id() as i32,
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(raised, 0, "{}", std::io::Error::last_os_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_appends_and_they_resume_when_space_returns() {
    let upstream = Broker::start("full-upstream");
    let tmp = sluice_tests::temp_dir("full");
    let dir = tmp.path().to_path_buf();
    let (udp, metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let config = udp_outbox_config(
        &dir,
        "full",
        udp,
        metrics,
        &dir.join("full.db"),
        upstream.port,
    );
    let log = dir.join("full.log");
    let seqs = distinct_seqs(upstream.port, "full").await;
    // The disk is "full" past 256 KiB per file: RLIMIT_FSIZE makes writes
    // beyond it fail (EFBIG), as a full disk makes them fail (ENOSPC).
    let mut agent = agent_with_file_size_limit(&config, &log, 256 << 10);
    wait_until("the agent", &log, || {
        metric(metrics, "sluice_outbox_appended_total").is_some()
    })
    .await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0u64;
    let start = Instant::now();
    while metric(metrics, "sluice_outbox_append_errors_total").unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < WAIT,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        for _ in 0..50 {
            let line = format!(
                r#"{{"sensor":"s-{}","ts":{},"value":{sent}}}"#,
                sent % 10,
                now_ms()
            );
            socket.send_to(line.as_bytes(), ("127.0.0.1", udp)).unwrap();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let committed_before = metric(metrics, "sluice_outbox_appended_total").unwrap();
    assert!(committed_before > 0);
    // Readings keep coming while appends are paused; the agent lives on.
    for _ in 0..20 {
        for _ in 0..20 {
            let line = format!(r#"{{"sensor":"s-x","ts":{},"value":1}}"#, now_ms());
            socket.send_to(line.as_bytes(), ("127.0.0.1", udp)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(agent.try_wait().unwrap().is_none(), "the agent died");
    assert_eq!(
        metric(metrics, "sluice_outbox_appended_total"),
        Some(committed_before),
        "appends paused"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("outbox append failed"), "{text}");
    // Space returns.
    lift_file_size_limit(&agent);
    wait_until("appends to resume and the backlog to drain", &log, || {
        metric(metrics, "sluice_outbox_appended_total").unwrap_or(0) > committed_before
            && metric(metrics, "sluice_outbox_backlog") == Some(0)
    })
    .await;
    // Every committed record arrived: seqs 1..=appended, no gap.
    let appended = metric(metrics, "sluice_outbox_appended_total").unwrap() as i64;
    let start = Instant::now();
    while seqs.lock().unwrap().len() < appended as usize && start.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let got = seqs.lock().unwrap().clone();
    let missing: Vec<i64> = (1..=appended).filter(|s| !got.contains(s)).collect();
    let extra: Vec<i64> = got
        .iter()
        .copied()
        .filter(|s| !(1..=appended).contains(s))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{appended} appended; upstream lacks {missing:?} and has {extra:?} beyond them"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_records_are_not_held_behind_a_draining_backlog() {
    use sluice::store::outbox::{Durability, OnCorrupt, Outbox};
    let upstream = Broker::start("live-upstream");
    let tmp = sluice_tests::temp_dir("live");
    let dir = tmp.path().to_path_buf();
    // An outage's worth of backlog: 100,000 records.
    let db = dir.join("live.db");
    let backlog = 100_000usize;
    {
        let mut outbox = Outbox::open(
            &db,
            Durability::Normal,
            OnCorrupt::Refuse,
            u64::MAX,
            u64::MAX,
        )
        .unwrap()
        .0;
        let batch: Vec<(String, Vec<u8>)> = (0..1000)
            .map(|_| {
                (
                    "sluice/live/agg/old".to_string(),
                    br#"{"agent":"live","series":"old","count":1}"#.to_vec(),
                )
            })
            .collect();
        for _ in 0..backlog / 1000 {
            outbox.append(&batch, 0).unwrap();
        }
    }
    let (udp, metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let config = udp_outbox_config(&dir, "live", udp, metrics, &db, upstream.port);
    // Upstream: how many old records had arrived when the live one did.
    let old = Arc::new(Mutex::new(0usize));
    let live_at = Arc::new(Mutex::new(None));
    {
        let (old, live_at) = (old.clone(), live_at.clone());
        let filter = "sluice/live/agg/#";
        sluice_tests::subscribe(
            upstream.port,
            "live-upstream-sub",
            filter,
            QoS::AtMostOnce,
            true,
            move |p| {
                if p.topic.ends_with("/old") {
                    *old.lock().unwrap() += 1;
                } else {
                    live_at.lock().unwrap().get_or_insert(*old.lock().unwrap());
                }
            },
        )
        .await;
    }
    let log = dir.join("live.log");
    let mut agent = start_agent(SLUICE, &config, &log);
    // The uplink may start draining before the UDP source is bound, so
    // wait for both: metrics are served once every source is up.
    wait_until("the drain to start and the sources", &log, || {
        *old.lock().unwrap() > 0 && metric(metrics, "sluice_readings_processed_total").is_some()
    })
    .await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let line = format!(r#"{{"sensor":"fresh","ts":{},"value":1}}"#, now_ms());
    socket.send_to(line.as_bytes(), ("127.0.0.1", udp)).unwrap();
    wait_until("the live record", &log, || {
        live_at.lock().unwrap().is_some()
    })
    .await;
    let before = live_at.lock().unwrap().unwrap();
    wait_until("the backlog to drain", &log, || {
        metric(metrics, "sluice_outbox_backlog") == Some(0)
    })
    .await;
    eprintln!("the live record arrived after {before} of {backlog} backlog records");
    assert!(
        before < backlog / 2,
        "the live record waited for {before} of {backlog} backlog records"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_never_waits_on_a_dead_output_broker() {
    // The local output broker is gone for good; the upstream one is fine.
    let upstream = Broker::start("deadout-upstream");
    let tmp = sluice_tests::temp_dir("deadout");
    let dir = tmp.path().to_path_buf();
    let (udp, metrics, dead) = (
        sluice_tests::free_port(),
        sluice_tests::free_port(),
        sluice_tests::free_port(),
    );
    let config = dir.join("deadout.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "deadout"
workers = 1
max_series = 16
ring_capacity = 1024
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[metrics]
listen = "127.0.0.1:{metrics}"
[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}
[output.mqtt]
host = "127.0.0.1"
port = {dead}
[outbox]
path = "{db}"
[uplink]
host = "127.0.0.1"
port = {port}
"#,
            db = dir.join("outbox.db").display(),
            port = upstream.port,
        ),
    )
    .unwrap();
    let log = dir.join("deadout.log");
    let seqs = distinct_seqs(upstream.port, "deadout").await;
    let _agent = start_agent(SLUICE, &config, &log);
    wait_until("the agent", &log, || {
        metric(metrics, "sluice_outbox_appended_total").is_some()
    })
    .await;
    // Far more aggregates than the output client's queue (1,024) and the
    // aggregate channel (16) hold, paced by the agent's own progress (under
    // emulation it is slow) so that the ring never sheds.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let total = 2_500;
    for i in 0..total {
        let m = format!(
            r#"{{"sensor":"s-{}","ts":{},"value":{i}}}"#,
            i % 8,
            now_ms()
        );
        socket.send_to(m.as_bytes(), ("127.0.0.1", udp)).unwrap();
        if i % 200 == 199 {
            wait_until("the agent to take the last 200", &log, || {
                metric(metrics, "sluice_readings_processed_total").unwrap_or(0) > i as u64
            })
            .await;
        }
    }
    wait_until("every aggregate upstream through the outbox", &log, || {
        seqs.lock().unwrap().len() >= total
    })
    .await;
    assert_eq!(metric(metrics, "sluice_readings_shed_total"), Some(0));
    // What the live output could not take is counted, not silently lost.
    let dropped = metric(metrics, "sluice_output_dropped_total").unwrap();
    assert!(dropped > 0, "{dropped}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("sluice_output_dropped_total"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_jams_the_uplink_the_backlog_drains_without_a_flood_of_resends() {
    let upstream = Broker::start("fulldrain-upstream");
    let tmp = sluice_tests::temp_dir("fulldrain");
    let dir = tmp.path().to_path_buf();
    let db = dir.join("fulldrain.db");
    // A backlog of 5,000 records, written while there was room.
    let total = 5_000usize;
    {
        let (mut outbox, _) = sluice::store::outbox::Outbox::open(
            &db,
            sluice::store::outbox::Durability::Normal,
            sluice::store::outbox::OnCorrupt::Refuse,
            u64::MAX,
            u64::MAX,
        )
        .unwrap();
        let records: Vec<(String, Vec<u8>)> = (0..total)
            .map(|i| {
                let body = format!(
                    r#"{{"series":"s-{}","i":{i},"pad":"{}"}}"#,
                    i % 10,
                    "p".repeat(150)
                );
                (
                    format!("sluice/fulldrain/agg/s-{}", i % 10),
                    body.into_bytes(),
                )
            })
            .collect();
        for chunk in records.chunks(500) {
            outbox.append(chunk, now_ms()).unwrap();
        }
    }
    let (udp, metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let config = udp_outbox_config(&dir, "fulldrain", udp, metrics, &db, upstream.port);
    let log = dir.join("fulldrain.log");
    let seqs = distinct_seqs(upstream.port, "fulldrain").await;
    let received = Arc::new(Mutex::new(0usize));
    {
        let received = received.clone();
        sluice_tests::subscribe(
            upstream.port,
            "fulldrain-count",
            "sluice/fulldrain/agg/#",
            QoS::AtLeastOnce,
            true,
            move |_| *received.lock().unwrap() += 1,
        )
        .await;
    }
    // The disk is full from the start: no file may grow past 32 KiB, so the
    // WAL that deletes (acknowledgements) write to fills at once.
    let mut agent = agent_with_file_size_limit(&config, &log, 32 << 10);
    wait_until(
        "the whole backlog upstream while the disk stays full",
        &log,
        || seqs.lock().unwrap().len() >= total,
    )
    .await;
    assert!(agent.try_wait().unwrap().is_none(), "the agent died");
    // Sent about once each: no session torn down and resent over and over.
    let (received, connects) = (
        *received.lock().unwrap(),
        metric(metrics, "sluice_uplink_connects_total").unwrap(),
    );
    assert!(
        received < total + 3 * 64,
        "{received} messages for {total} records"
    );
    assert_eq!(connects, 1, "the session was never torn down");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("acknowledged records cannot be deleted"),
        "{text}"
    );
    // Space returns: the deletes go through and the backlog empties.
    lift_file_size_limit(&agent);
    wait_until("the acknowledged records deleted", &log, || {
        metric(metrics, "sluice_outbox_backlog") == Some(0)
    })
    .await;
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_aside_backlog_is_salvaged_and_forwarded_under_its_own_identity() {
    let upstream = Broker::start("salvage-upstream");
    let tmp = sluice_tests::temp_dir("salvage");
    let dir = tmp.path().to_path_buf();
    let db = dir.join("salvage.db");
    // A backlog of 300 records, never forwarded.
    let epoch = {
        let (mut outbox, _) = sluice::store::outbox::Outbox::open(
            &db,
            sluice::store::outbox::Durability::Normal,
            sluice::store::outbox::OnCorrupt::Refuse,
            u64::MAX,
            u64::MAX,
        )
        .unwrap();
        let epoch = outbox.begin_run().unwrap();
        let records: Vec<(String, Vec<u8>)> = (1..=300)
            .map(|i| {
                let body = format!(r#"{{"series":"s","i":{i},"pad":"{}"}}"#, "p".repeat(300));
                ("sluice/salvage/agg/s".to_string(), body.into_bytes())
            })
            .collect();
        outbox.append(&records, now_ms()).unwrap();
        epoch
    };
    // A leaf page of the records table, half-way through the file, is
    // damaged: the file no longer passes the check at open.
    let mut bytes = std::fs::read(&db).unwrap();
    let page = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
    let leaf = (bytes.len() / page / 2..bytes.len() / page)
        .find(|p| bytes[p * page] == 0x0d)
        .expect("a table leaf page");
    bytes[leaf * page] = 0x00;
    std::fs::write(&db, &bytes).unwrap();
    let (udp, metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let config = udp_outbox_config(&dir, "salvage", udp, metrics, &db, upstream.port);
    let got = Arc::new(Mutex::new(Vec::<Value>::new()));
    {
        let sink = got.clone();
        sluice_tests::subscribe(
            upstream.port,
            "salvage-sub",
            "sluice/salvage/agg/#",
            QoS::AtLeastOnce,
            true,
            move |p| {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&p.payload).unwrap())
            },
        )
        .await;
    }
    let log = dir.join("salvage.log");
    let _agent = start_agent(SLUICE, &config, &log);
    wait_until("the damaged file moved aside", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("moved aside")
    })
    .await;
    let aside = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.contains("corrupt-") && !name.ends_with("-wal") && !name.ends_with("-shm")
        })
        .expect("the file moved aside");
    let out = sluice_tests::own_binary(SLUICE)
        .args(["outbox", "salvage"])
        .arg(&aside)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queued: usize = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(queued > 100 && queued < 300, "{text}");
    assert!(
        text.contains("unreadable: seq"),
        "the damaged page's rows: {text}"
    );
    wait_until("the salvaged records upstream", &log, || {
        got.lock().unwrap().len() >= queued
    })
    .await;
    // Under their identity in the damaged file: its epoch, their seqs there.
    let got = got.lock().unwrap().clone();
    let seqs: BTreeSet<i64> = got.iter().map(|v| v["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs.len(), queued);
    for v in &got {
        assert_eq!(v["epoch"], epoch, "{v}");
        let i = v["i"].as_i64().unwrap();
        assert_eq!(v["seq"], i, "record {i} keeps its seq");
    }
}
