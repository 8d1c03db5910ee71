//! Store-and-forward under hostile series ids and unsendable records: no id
//! becomes a wildcard, an extra topic level or a `$` topic, and no record
//! that cannot be published blocks the records behind it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rumqttc::QoS;
use serde_json::Value;
use sluice_tests::{Broker, metric, now_ms, start_agent, wait_until};

/// The agent binary under test.
const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// The outbox an earlier release wrote (see `tests/fixtures/README.md`).
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/outbox-0.1.0.db"
);

/// Every message under `filter` on the broker on `port`: topic → payloads.
async fn collect(port: u16, id: &str, filter: &str) -> Arc<Mutex<BTreeMap<String, Vec<Value>>>> {
    let got = Arc::new(Mutex::new(BTreeMap::<String, Vec<Value>>::new()));
    let sink = got.clone();
    sluice_tests::subscribe(port, id, filter, QoS::AtLeastOnce, true, move |p| {
        if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
            sink.lock()
                .unwrap()
                .entry(p.topic.clone())
                .or_default()
                .push(v);
        }
    })
    .await;
    got
}

/// The `sluice outbox …` command on `config`: (exit success, stdout + stderr).
fn outbox_cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = sluice_tests::own_binary(SLUICE)
        .arg("outbox")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run sluice outbox");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What no MQTT topic name can carry: wildcards and control characters.
fn sendable(topic: &str) -> bool {
    !topic.contains(['+', '#']) && !topic.chars().any(char::is_control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_backlog_with_unsendable_topics_is_forwarded_around_them() {
    let upstream = Broker::start("fixture-upstream");
    let tmp = sluice_tests::temp_dir("fixture");
    let db = tmp.path().join("outbox.db");
    std::fs::copy(FIXTURE, &db).unwrap();
    // What the old release queued, and which of it any broker can take.
    let queued: Vec<(i64, String)> = {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let mut stmt = conn.prepare("SELECT seq, topic FROM records").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let (good, bad): (Vec<_>, Vec<_>) = queued.iter().partition(|(_, t)| sendable(t));
    assert_eq!(
        (good.len(), bad.len()),
        (30, 24),
        "the fixture as documented"
    );
    let metrics = sluice_tests::free_port();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    drop(udp);
    let config = tmp.path().join("fixture.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "fixture"
workers = 1
[sources.field]
kind = "udp"
bind = "127.0.0.1:{udp_port}"
[metrics]
listen = "127.0.0.1:{metrics}"
[[rules]]
match = "*"
window = {{ kind = "tumbling", size_ms = 1000, lateness_ms = 0 }}
quantiles = [0.5]
anomaly = {{ alpha = 0.1, k = 4.0, clear_k = 3.0, warmup = 5 }}
[outbox]
path = "{db}"
[uplink]
host = "127.0.0.1"
port = {port}
max_inflight = 8
reconnect_max_ms = 500
[checkpoint]
interval_ms = 1000
"#,
            db = db.display(),
            port = upstream.port,
        ),
    )
    .unwrap();
    let got = collect(upstream.port, "fixture-sub", "sluice/fixture/#").await;
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &config, &log);
    let want: BTreeSet<i64> = good.iter().map(|(seq, _)| *seq).collect();
    let seqs = || -> BTreeSet<i64> {
        got.lock()
            .unwrap()
            .values()
            .flatten()
            .filter_map(|v| v["seq"].as_i64())
            .collect()
    };
    wait_until(
        "every sendable record of the old backlog upstream",
        &log,
        || seqs().is_superset(&want),
    )
    .await;
    // The others are set aside, counted, and the backlog is empty.
    wait_until("the unsendable records set aside", &log, || {
        metric(metrics, "sluice_outbox_dead_letters") == Some(bad.len() as u64)
            && metric(metrics, "sluice_outbox_backlog") == Some(0)
    })
    .await;
    assert_eq!(seqs(), want, "nothing else went upstream");
    // Each delivered record went to the topic it was queued for.
    for (seq, topic) in &good {
        let got = got.lock().unwrap();
        assert!(
            got.get(topic.as_str())
                .is_some_and(|vs| vs.iter().any(|v| v["seq"] == *seq)),
            "seq {seq} not on {topic:?}"
        );
    }
    // The old checkpoint was restored.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("state restored from checkpoints series=9"),
        "{text}"
    );
    // The dead letters are listed with their reason.
    let (ok, listed) = outbox_cli(&config, &["dead-letters"]);
    assert!(ok, "{listed}");
    for (seq, _) in &bad {
        assert!(
            listed.lines().any(|l| l.starts_with(&format!("{seq} "))),
            "seq {seq} not listed:\n{listed}"
        );
    }
    assert!(listed.contains("wildcard"), "{listed}");
    assert!(listed.contains("control character"), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_become_one_topic_level_live_and_upstream_or_are_refused() {
    let local = Broker::start("ids-local");
    let upstream = Broker::start("ids-upstream");
    let tmp = sluice_tests::temp_dir("ids");
    let metrics = sluice_tests::free_port();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let config = tmp.path().join("ids.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "h"
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp_port}"
[metrics]
listen = "127.0.0.1:{metrics}"
[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}
[output.mqtt]
host = "127.0.0.1"
port = {local}
[outbox]
path = "{db}"
[uplink]
host = "127.0.0.1"
port = {upstream}
reconnect_max_ms = 500
"#,
            local = local.port,
            upstream = upstream.port,
            db = tmp.path().join("outbox.db").display(),
        ),
    )
    .unwrap();
    let live = collect(local.port, "ids-live", "sluice/h/agg/+").await;
    let up = collect(upstream.port, "ids-up", "sluice/h/agg/+").await;
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &config, &log);
    // (id as JSON string body, the id, its topic level); None: refused.
    let ids: [(&str, &str, Option<&str>); 8] = [
        ("s-ok", "s-ok", Some("s-ok")),
        (
            "a/../../alerts/x",
            "a/../../alerts/x",
            Some("a%2F..%2F..%2Falerts%2Fx"),
        ),
        ("bad#id", "bad#id", Some("bad%23id")),
        ("plus+id", "plus+id", Some("plus%2Bid")),
        ("$SYS", "$SYS", Some("%24SYS")),
        ("nul\\u0000id", "nul\0id", None),
        ("ctl\\u0007id", "ctl\u{7}id", None),
        ("bidi\\u202eid", "bidi\u{202e}id", None),
    ];
    let send = |ts: i64| {
        for (json, _, _) in &ids {
            let m = format!(r#"{{"sensor":"{json}","ts":{ts},"value":1}}"#);
            socket
                .send_to(m.as_bytes(), ("127.0.0.1", udp_port))
                .unwrap();
        }
    };
    // Until the source is up: each round is one reading per id.
    let start = std::time::Instant::now();
    while metric(metrics, "sluice_readings_processed_total").unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < sluice_tests::WAIT,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        send(sluice_tests::now_ms());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let want: BTreeSet<String> = ids
        .iter()
        .filter_map(|(_, _, level)| level.map(|l| format!("sluice/h/agg/{l}")))
        .collect();
    for (name, got) in [("live", &live), ("upstream", &up)] {
        wait_until(
            &format!("every sendable id on its own level ({name})"),
            &log,
            || got.lock().unwrap().keys().cloned().collect::<BTreeSet<_>>() == want,
        )
        .await;
        // The payload keeps the id as it was.
        for (_, id, level) in &ids {
            if let Some(level) = level {
                let got = got.lock().unwrap();
                let records = &got[&format!("sluice/h/agg/{level}")];
                assert!(records.iter().all(|v| v["series"] == *id), "{records:?}");
            }
        }
    }
    // The ids no topic can carry are refused at decode, counted, and
    // nothing failed to publish.
    let rounds = got_rounds(&live);
    let text = sluice_tests::http_get(metrics, "/metrics");
    let bad_series: u64 = text
        .lines()
        .filter(|l| l.starts_with("sluice_readings_rejected_total") && l.contains("bad_series"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    assert!(
        bad_series >= 3 * rounds as u64 && bad_series.is_multiple_of(3),
        "{bad_series} refused for {rounds} rounds"
    );
    assert_eq!(metric(metrics, "sluice_publish_errors_total"), Some(0));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("bad_series"),
        "a log line names the reason"
    );
}

/// How many aggregates of `s-ok` arrived (one per round of readings).
fn got_rounds(got: &Mutex<BTreeMap<String, Vec<Value>>>) -> usize {
    got.lock()
        .unwrap()
        .get("sluice/h/agg/s-ok")
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_set_aside_and_the_rest_go_on() {
    // The upstream broker drops the connection of a client that sends a
    // packet over 2,000 bytes: MQTT 3.1.1's only way to refuse a message.
    let upstream = Broker::start_configured("refuse-upstream", "max_packet_size 2000\n");
    let tmp = sluice_tests::temp_dir("refuse");
    let db = tmp.path().join("outbox.db");
    let appended_epoch = {
        let (mut outbox, _) = sluice::store::outbox::Outbox::open(
            &db,
            sluice::store::outbox::Durability::Normal,
            sluice::store::outbox::OnCorrupt::Refuse,
            u64::MAX,
            u64::MAX,
        )
        .unwrap();
        let records: Vec<(String, Vec<u8>)> = (1..=30)
            .map(|i| {
                let pad = if i == 5 { 5000 } else { 10 };
                let body = format!(r#"{{"series":"s","i":{i},"pad":"{}"}}"#, "p".repeat(pad));
                ("sluice/r/agg/s".to_string(), body.into_bytes())
            })
            .collect();
        outbox.append(&records, now_ms()).unwrap();
        outbox.epoch()
    };
    let metrics = sluice_tests::free_port();
    let udp_port = sluice_tests::free_port();
    let config = tmp.path().join("refuse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "r"
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp_port}"
[metrics]
listen = "127.0.0.1:{metrics}"
[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}
[outbox]
path = "{db}"
[uplink]
host = "127.0.0.1"
port = {port}
max_inflight = 8
reconnect_max_ms = 400
"#,
            db = db.display(),
            port = upstream.port,
        ),
    )
    .unwrap();
    let got = collect(upstream.port, "refuse-sub", "sluice/r/agg/#").await;
    let log = tmp.path().join("agent.log");
    let agent = start_agent(SLUICE, &config, &log);
    let want: BTreeSet<i64> = (1..=30).filter(|&i| i != 5).collect();
    let seqs = || -> BTreeSet<i64> {
        got.lock()
            .unwrap()
            .values()
            .flatten()
            .filter_map(|v| v["seq"].as_i64())
            .collect()
    };
    wait_until("every other record upstream", &log, || seqs() == want).await;
    wait_until("the refused record set aside", &log, || {
        metric(metrics, "sluice_outbox_dead_letters") == Some(1)
            && metric(metrics, "sluice_outbox_backlog") == Some(0)
    })
    .await;
    // Found in a bounded number of tries, not by hammering the broker.
    let connects = metric(metrics, "sluice_uplink_connects_total").unwrap();
    assert!(
        connects <= u64::from(sluice::store::uplink::STRIKES) + 3,
        "{connects} connections"
    );
    let (ok, listed) = outbox_cli(&config, &["dead-letters"]);
    assert!(ok, "{listed}");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("5 ") && l.contains("closed the connection")),
        "{listed}"
    );
    // Each record upstream carries the epoch of the run that appended it.
    let epochs: BTreeSet<i64> = got
        .lock()
        .unwrap()
        .values()
        .flatten()
        .filter_map(|v| v["epoch"].as_i64())
        .collect();
    assert_eq!(epochs, BTreeSet::from([appended_epoch]));
    // The agent's own run has a new one.
    let (_, status) = outbox_cli(&config, &["status"]);
    assert!(status.contains("epoch: "), "{status}");
    assert!(
        !status.contains(&format!("epoch: {appended_epoch}")),
        "{status}"
    );
    // Purged for good, from the command line, beside the running agent,
    // whose gauge follows.
    let (ok, purged) = outbox_cli(&config, &["purge", "5"]);
    assert!(
        ok && purged.contains("1 dead letter(s) deleted"),
        "{purged}"
    );
    wait_until("the gauge to follow the purge", &log, || {
        metric(metrics, "sluice_outbox_dead_letters") == Some(0)
    })
    .await;
    drop(agent);
}
