//! A crash at every step of store-and-forward (append, downsample,
//! checkpoint, send, ack), by `SLUICE_CRASH_AT`, then a restart and a
//! drain, checked against a model: every record the outbox had committed
//! arrives upstream, no identity `(epoch, seq)` arrives more often than the
//! in-flight window allows, and no reading is counted in two records.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;
use sluice_tests::{Broker, WAIT, metric, now_ms, start_agent, wait_until};

/// The agent binary under test.
const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// A record as upstream sees it: identity, and the readings it covers (one
/// series, whose values rise with every reading sent).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    epoch: i64,
    seq: i64,
    first: f64,
    last: f64,
}

fn seen(v: &Value) -> Option<Seen> {
    Some(Seen {
        epoch: v["epoch"].as_i64()?,
        seq: v["seq"].as_i64()?,
        first: v["first"].as_f64()?,
        last: v["last"].as_f64()?,
    })
}

/// The records in the outbox file now (committed, not acknowledged), as
/// upstream would see them.
fn committed(db: &Path) -> Vec<Seen> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, epoch, origin_seq, payload FROM records")
        .unwrap();
    stmt.query_map([], |r| {
        let (seq, epoch, origin, payload): (i64, Option<i64>, Option<i64>, Vec<u8>) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        let v: Value = serde_json::from_slice(&payload).unwrap();
        Ok(Seen {
            epoch: epoch.unwrap_or(0),
            seq: origin.unwrap_or(seq),
            first: v["first"].as_f64().unwrap(),
            last: v["last"].as_f64().unwrap(),
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn config(
    dir: &Path,
    udp: u16,
    metrics: u16,
    upstream: u16,
    downsample: bool,
) -> std::path::PathBuf {
    let path = dir.join("crash.toml");
    let full = if downsample {
        "max_records = 150\non_full = \"downsample\""
    } else {
        ""
    };
    std::fs::write(
        &path,
        format!(
            r#"
agent_id = "cr"
workers = 1
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[metrics]
listen = "127.0.0.1:{metrics}"
stats_interval_s = 0
[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}
[outbox]
path = "{db}"
{full}
[uplink]
host = "127.0.0.1"
port = {upstream}
max_inflight = 8
reconnect_max_ms = 300
[checkpoint]
interval_ms = 100
"#,
            db = dir.join("crash.db").display(),
        ),
    )
    .unwrap();
    path
}

/// Sends reading `value` (series `s`, event time now).
fn send(socket: &std::net::UdpSocket, port: u16, value: u64) {
    let line = format!(r#"{{"sensor":"s","ts":{},"value":{value}}}"#, now_ms());
    let _ = socket.send_to(line.as_bytes(), ("127.0.0.1", port));
}

/// Crashes the agent the `n`-th time it reaches `step`, restarts it, and
/// checks upstream against the model (see the module docs).
async fn crash_at(step: &str, n: u64) {
    crash_on(step, n, Link::Fast).await;
}

/// How the agent reaches the upstream broker.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// Directly.
    Fast,
    /// Through a [`sluice_tests::SlowLink`] that hands acknowledgements
    /// back one at a time, so that the in-flight window never empties.
    Slow,
}

/// [`crash_at`] over `link`.
async fn crash_on(step: &str, n: u64, link: Link) {
    let name = match link {
        Link::Fast => step.replace('.', "-"),
        Link::Slow => format!("{}-slow", step.replace('.', "-")),
    };
    let downsample = step.starts_with("downsample");
    let mut upstream = Broker::start_persistent(&format!("crash-{name}"));
    let tmp = sluice_tests::temp_dir(&format!("crash-{name}"));
    let dir = tmp.path().to_path_buf();
    let (udp, metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let (uplink_port, _link) = match link {
        Link::Fast => (upstream.port, None),
        Link::Slow => {
            let port = sluice_tests::free_port();
            (
                port,
                Some(sluice_tests::SlowLink::start(
                    port,
                    upstream.port,
                    4,
                    Duration::from_millis(3),
                )),
            )
        }
    };
    let config = config(&dir, udp, metrics, uplink_port, downsample);
    let got: Arc<Mutex<Vec<Seen>>> = Arc::default();
    {
        let sink = got.clone();
        sluice_tests::subscribe(
            upstream.port,
            &format!("crash-{name}-sub"),
            "sluice/cr/agg/#",
            QoS::AtLeastOnce,
            false,
            move |p| {
                if let Some(s) = serde_json::from_slice(&p.payload)
                    .ok()
                    .as_ref()
                    .and_then(seen)
                {
                    sink.lock().unwrap().push(s);
                }
            },
        )
        .await;
    }
    if downsample {
        // Records pile up past the bound and are merged.
        upstream.stop();
    }
    let log = dir.join("crash.log");
    let mut agent = sluice_tests::ChildGuard(
        sluice_tests::own_binary(SLUICE)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("SLUICE_CRASH_AT", format!("{step}:{n}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut value = 0u64;
    let start = Instant::now();
    loop {
        if let Some(status) = agent.try_wait().unwrap() {
            assert!(!status.success(), "the agent stopped without crashing");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "{step} was never reached:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        for _ in 0..10 {
            value += 1;
            send(&socket, udp, value);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("aborting at {step}")), "{text}");
    // What the crash left: committed records in the file, and what
    // upstream already had.
    let mut must: Vec<Seen> = committed(&dir.join("crash.db"));
    must.extend(got.lock().unwrap().iter().copied());
    if downsample {
        upstream.restart();
        // The restart drains: without the bound, so that what the crash
        // left is forwarded as it is (more merging would rightly change it;
        // the crash is what is tested).
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace("max_records = 150", "max_records = 1000000"),
        )
        .unwrap();
    }
    let _agent = start_agent(SLUICE, &config, &log);
    wait_until("the restarted agent", &log, || {
        metric(metrics, "sluice_outbox_appended_total").is_some()
    })
    .await;
    let after: Vec<u64> = (value + 1..=value + 50).collect();
    for &v in &after {
        send(&socket, udp, v);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let identities = |records: &[Seen]| -> BTreeSet<(i64, i64)> {
        records.iter().map(|s| (s.epoch, s.seq)).collect()
    };
    let covers = |records: &[Seen], v: f64| records.iter().any(|s| s.first <= v && v <= s.last);
    wait_until(
        "every committed record upstream, and the new readings",
        &log,
        || {
            let got = got.lock().unwrap();
            identities(&got).is_superset(&identities(&must))
                && after.iter().all(|&v| covers(&got, v as f64))
        },
    )
    .await;
    wait_until("the outbox drained", &log, || {
        metric(metrics, "sluice_outbox_backlog") == Some(0)
    })
    .await;
    let got = got.lock().unwrap().clone();
    // Every reading a committed record held is in a record upstream.
    for m in &must {
        for v in [m.first, m.last] {
            assert!(
                covers(&got, v),
                "{step}: reading {v} of committed {m:?} is missing"
            );
        }
    }
    // Each identity carries one content, resent at most a window or so.
    let mut by_id: BTreeMap<(i64, i64), Vec<Seen>> = BTreeMap::new();
    for s in &got {
        by_id.entry((s.epoch, s.seq)).or_default().push(*s);
    }
    for (id, copies) in &by_id {
        assert!(
            copies.iter().all(|c| c == &copies[0]),
            "{step}: identity {id:?} arrived with different contents: {copies:?}"
        );
    }
    let duplicates = got.len() - by_id.len();
    assert!(duplicates <= 2 * 8, "{step}: {duplicates} duplicates");
    // No reading in two records: the ranges of distinct identities do not
    // overlap.
    let mut ranges: Vec<(f64, f64)> = by_id.values().map(|c| (c[0].first, c[0].last)).collect();
    ranges.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in ranges.windows(2) {
        assert!(
            pair[0].1 < pair[1].0,
            "{step}: a reading counted twice: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_an_append_commits() {
    crash_at("append.before_commit", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_an_append_commits() {
    crash_at("append.after_commit", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_a_downsampling_commits() {
    crash_at("downsample.before_commit", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_a_checkpoint_commits() {
    crash_at("checkpoint.after_commit", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_records_are_marked_sent() {
    crash_at("send.after_mark", 5).await;
}

/// Over a slow link the in-flight window stays full while acknowledgements
/// trickle in: the records acknowledged and not yet deleted (each sent again
/// after the crash) must still be fewer than a window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_records_are_marked_sent_on_a_slow_link() {
    crash_on("send.after_mark", 15, Link::Slow).await;
}

/// The same, at the delete itself: the batch acknowledged and about to be
/// deleted is at most a window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_acknowledged_records_are_deleted_on_a_slow_link() {
    crash_on("ack.before_delete", 3, Link::Slow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_a_record_is_published() {
    crash_at("send.after_publish", 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_acknowledged_records_are_deleted() {
    crash_at("ack.before_delete", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_acknowledged_records_are_deleted() {
    crash_at("ack.after_delete", 5).await;
}
