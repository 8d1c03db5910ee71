//! `[uplink] kind = "nats"` against a real `nats-server -js` on 127.0.0.1:
//! every committed record lands in the stream in order across an outage
//! of the server, `kill -9` of the agent twenty times under load leaves no
//! gap and, thanks to `Nats-Msg-Id`, no record stored twice, and the
//! connection speaks TLS with a test CA (and refuses a server that CA did
//! not sign).
#![cfg(feature = "nats")]

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::{NatsServer, WAIT, start_agent};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// A configuration forwarding to the NATS server on `port`
/// ([`sluice_tests::uplink_config`]).
fn config(dir: &Path, agent: &str, udp: u16, port: u16, extra: &str) -> std::path::PathBuf {
    sluice_tests::uplink_config(dir, agent, udp, "nats", port, extra)
}

/// The stream the tests' records land in: every subject under `sluice.`,
/// with JetStream's default duplicate window (2 minutes).
async fn stream(port: u16) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    async_nats::jetstream::new(client)
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "SLUICE".into(),
            subjects: vec!["sluice.>".into()],
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Every message in the stream, in stream order: (seq of the record, its
/// Nats-Msg-Id, its subject).
async fn stored(port: u16) -> Vec<(i64, String, String)> {
    let mut s = stream(port).await;
    let n = s.info().await.unwrap().state.messages;
    let mut out = Vec::new();
    let first = s.info().await.unwrap().state.first_sequence;
    for at in first..first + n {
        let m = s.get_raw_message(at).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let id = m
            .headers
            .get("Nats-Msg-Id")
            .map(|h| h.to_string())
            .unwrap_or_default();
        out.push((v["seq"].as_i64().unwrap(), id, m.subject.to_string()));
    }
    out
}

async fn wait_for_count(port: u16, n: usize, log: &Path) -> Vec<(i64, String, String)> {
    let start = Instant::now();
    loop {
        let got = stored(port).await;
        if got.len() >= n {
            return got;
        }
        assert!(
            start.elapsed() < WAIT * 2,
            "{} of {n} records in the stream; agent log:\n{}",
            got.len(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_lands_once_and_in_order_across_an_outage_of_the_server() {
    let mut nats = NatsServer::start("outage", "");
    stream(nats.port).await;
    let tmp = sluice_tests::temp_dir("nats-outage");
    let udp_port = sluice_tests::free_port();
    let path = config(tmp.path(), "gw", udp_port, nats.port, "");
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &path, &log);
    std::thread::sleep(Duration::from_millis(500));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Ids a subject must escape into one token.
    let ids = ["s-0", "line1.temp", "a b", "*", ">", "$JS"];
    sluice_tests::send_readings(&udp, udp_port, &ids, 0, 200);
    let got = wait_for_count(nats.port, 200, &log).await;
    assert_eq!(got.len(), 200);
    // The server goes away; the agent keeps committing.
    nats.stop();
    sluice_tests::send_readings(&udp, udp_port, &ids, 200, 300);
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart();
    let got = wait_for_count(nats.port, 500, &log).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got2 = stored(nats.port).await;
    assert_eq!(got2.len(), got.len(), "more arrived after");
    let seqs: Vec<i64> = got.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=500).collect::<Vec<i64>>(),
        "in order, none missing, none twice"
    );
    for (seq, id, subject) in &got {
        assert!(
            id.starts_with("gw:") && id.ends_with(&format!(":{seq}")),
            "{id}"
        );
        assert_eq!(subject.split('.').count(), 4, "{subject}");
        assert!(subject.starts_with("sluice.gw.agg."), "{subject}");
    }
    let subjects: BTreeMap<&str, usize> = got.iter().fold(BTreeMap::new(), |mut m, (_, _, s)| {
        *m.entry(s.as_str()).or_default() += 1;
        m
    });
    assert_eq!(subjects.len(), ids.len(), "{subjects:?}");
    assert!(
        subjects.contains_key("sluice.gw.agg.line1%2Etemp"),
        "{subjects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9s_under_load_leave_no_gap_and_no_record_twice() {
    let nats = NatsServer::start("kill9", "");
    stream(nats.port).await;
    let tmp = sluice_tests::temp_dir("nats-kill9");
    let udp_port = sluice_tests::free_port();
    let path = config(tmp.path(), "k9", udp_port, nats.port, "");
    let log = tmp.path().join("agent.log");
    let sent = sluice_tests::twenty_kill_9s(SLUICE, &path, &log, udp_port);
    // A last run drains what is left: until the outbox is empty.
    let _agent = sluice_tests::drain_outbox(SLUICE, &path, &log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = stored(nats.port).await;
    // Readings sent while an agent was dead are lost before they are
    // committed (UDP); every committed one has a seq, and those must all be
    // in the stream, once each.
    assert!(got.len() >= sent / 2, "{} of {sent} committed", got.len());
    let mut seqs: Vec<i64> = got.iter().map(|(s, _, _)| *s).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), got.len(), "a record stored twice");
    assert_eq!(
        seqs,
        (1..=got.len() as i64).collect::<Vec<i64>>(),
        "a gap; agent log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for (seq, id, _) in &got {
        assert!(
            id.starts_with("k9:") && id.ends_with(&format!(":{seq}")),
            "{id}"
        );
    }
    let crashes = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("ack.before_delete")
        .count();
    assert!(crashes >= 5, "only {crashes} runs reached the crash point");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_speaks_tls_to_nats_and_refuses_a_server_its_ca_did_not_sign() {
    let pki = sluice_tests::temp_dir("nats-pki");
    let (ca, cert, key) = sluice_tests::test_pki(pki.path(), "nats");
    let tls = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        cert.display(),
        key.display()
    );
    let nats = NatsServer::start("tls", &tls);
    let (other_ca, _, _) = sluice_tests::test_pki(pki.path(), "other");
    // The test's own client trusts the test CA.
    let client = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.clone())
        .connect(format!("127.0.0.1:{}", nats.port))
        .await
        .unwrap();
    let mut s = async_nats::jetstream::new(client)
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "SLUICE".into(),
            subjects: vec!["sluice.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let tmp = sluice_tests::temp_dir("nats-tls");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A CA that did not sign the server's certificate: nothing goes.
    let udp_port = sluice_tests::free_port();
    let wrong = config(
        tmp.path(),
        "wrong",
        udp_port,
        nats.port,
        &format!("[uplink.tls]\nca_file = \"{}\"\n", other_ca.display()),
    );
    let log = tmp.path().join("wrong.log");
    let mut agent = start_agent(SLUICE, &wrong, &log);
    std::thread::sleep(Duration::from_millis(300));
    sluice_tests::send_readings(&udp, udp_port, &["s-0"], 0, 5);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.info().await.unwrap().state.messages, 0);
    agent.kill().unwrap();
    agent.wait().unwrap();
    // The right CA: the backlog goes.
    let right = config(
        tmp.path(),
        "wrong",
        udp_port,
        nats.port,
        &format!("[uplink.tls]\nca_file = \"{}\"\n", ca.display()),
    );
    let _agent = start_agent(SLUICE, &right, &log);
    let start = Instant::now();
    while s.info().await.unwrap().state.messages < 5 {
        assert!(
            start.elapsed() < WAIT,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.info().await.unwrap().state.messages, 5);
}

/// A record larger than the server's `max_payload` is set aside as a dead
/// letter (counted, listed by `sluice outbox dead-letters`) instead of
/// holding up the lane: the small records around it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_servers_max_payload_is_set_aside_and_the_lane_goes_on() {
    let nats = NatsServer::start("max-payload", "max_payload: 310\n");
    let mut s = stream(nats.port).await;
    let tmp = sluice_tests::temp_dir("nats-big");
    let udp_port = sluice_tests::free_port();
    let path = config(tmp.path(), "big", udp_port, nats.port, "");
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &path, &log);
    std::thread::sleep(Duration::from_millis(500));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A 64-byte id makes a record (JSON and headers) of about 340 bytes;
    // the short ones stay near 280.
    let long = "x".repeat(64);
    sluice_tests::send_readings(&udp, udp_port, &["s-0", &long, "s-1"], 0, 9);
    let start = Instant::now();
    loop {
        let status = sluice_tests::own_binary(SLUICE)
            .args(["outbox", "status", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout).to_string();
        if text.contains("backlog: 0 records") && s.info().await.unwrap().state.messages == 6 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "{text}; {} in the stream; agent log:\n{}",
            s.info().await.unwrap().state.messages,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let letters = sluice_tests::own_binary(SLUICE)
        .args(["outbox", "dead-letters", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let letters = String::from_utf8_lossy(&letters.stdout);
    assert_eq!(letters.matches("max_payload").count(), 3, "{letters}");
}

/// The README's NATS consumer, run as the README gives it (nats-py, an
/// independent client): it reads every record of the stream from its
/// start, with the subject each id was escaped into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_python_consumer_reads_the_stream() {
    let nats = NatsServer::start("python", "");
    stream(nats.port).await;
    let tmp = sluice_tests::temp_dir("nats-python");
    sluice_tests::readme_script(tmp.path(), "consume_nats.py");
    let udp_port = sluice_tests::free_port();
    let path = config(tmp.path(), "gw", udp_port, nats.port, "");
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &path, &log);
    std::thread::sleep(Duration::from_millis(500));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ids = ["s-0", "line1.temp", "tank 4"];
    sluice_tests::send_readings(&udp, udp_port, &ids, 0, 30);
    wait_for_count(nats.port, 30, &log).await;
    let server = format!("nats://127.0.0.1:{}", nats.port);
    let text = sluice_tests::python(tmp.path(), &["consume_nats.py", &server, "sluice.>"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 30, "{text}");
    let mut seqs = Vec::new();
    for line in lines {
        let (subject, record) = line.split_once(' ').unwrap();
        let v: serde_json::Value = serde_json::from_str(record).unwrap();
        let series = v["series"].as_str().unwrap();
        assert_eq!(
            subject,
            sluice::output::subject::render("sluice.{agent}.agg.{series}", "gw", series)
        );
        seqs.push(v["seq"].as_i64().unwrap());
    }
    assert_eq!(seqs, (1..=30).collect::<Vec<i64>>(), "in stream order");
}
