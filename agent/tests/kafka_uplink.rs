//! `[uplink] kind = "kafka"` against a real Kafka-protocol broker (tansu)
//! on 127.0.0.1: every committed record lands in its series' partition
//! across an outage of the broker, with the key and headers a consumer
//! dedups by; `kill -9` of the agent twenty times under load leaves no gap,
//! and the records stored twice are counted and bounded; the connection
//! speaks TLS with a test CA (and refuses a broker that CA did not sign);
//! the README's Python consumer reads what the agent wrote.
#![cfg(feature = "kafka")]

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use sluice_tests::{KafkaBroker, WAIT, start_agent};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const TOPIC: &str = "sluice.aggregates";
const PARTITIONS: i32 = 3;

/// A configuration forwarding to the broker on `port`
/// ([`sluice_tests::uplink_config`]).
fn config(dir: &Path, agent: &str, udp: u16, port: u16, extra: &str) -> std::path::PathBuf {
    sluice_tests::uplink_config(dir, agent, udp, "kafka", port, extra)
}

async fn client(address: String, tls: Option<&Path>) -> Client {
    let mut builder = ClientBuilder::new(vec![address]);
    if let Some(ca) = tls {
        let settings = sluice_collectors::mqtt::TlsSettings {
            ca_file: ca.to_path_buf(),
            client_cert_file: None,
            client_key_file: None,
        };
        let tls = sluice_collectors::mqtt::rustls_config(&settings).unwrap();
        builder = builder.tls_config(Arc::new(tls));
    }
    builder.build().await.unwrap()
}

/// Creates the aggregates topic with [`PARTITIONS`] partitions.
async fn create_topic(client: &Client) {
    client
        .controller_client()
        .unwrap()
        .create_topic(TOPIC, PARTITIONS, 1, 5_000)
        .await
        .unwrap();
}

/// One record as a consumer reads it.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    partition: i32,
    key: String,
    agent: String,
    epoch: i64,
    seq: i64,
    /// The `seq` in the JSON value (the same identity as the header's).
    value_seq: i64,
    series: String,
}

/// Every record of the topic, partition by partition, in log order.
async fn stored(client: &Client) -> Vec<Stored> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let pc = client
            .partition_client(TOPIC, p, UnknownTopicHandling::Retry)
            .await
            .unwrap();
        let end = pc.get_offset(OffsetAt::Latest).await.unwrap();
        let mut offset = pc.get_offset(OffsetAt::Earliest).await.unwrap();
        while offset < end {
            let (records, _) = pc.fetch_records(offset, 1..1_000_000, 100).await.unwrap();
            for r in records {
                offset = r.offset + 1;
                let h = |name: &str| String::from_utf8(r.record.headers[name].clone()).unwrap();
                let v: serde_json::Value =
                    serde_json::from_slice(r.record.value.as_deref().unwrap()).unwrap();
                out.push(Stored {
                    partition: p,
                    key: String::from_utf8(r.record.key.clone().unwrap()).unwrap(),
                    agent: h("agent"),
                    epoch: h("epoch").parse().unwrap(),
                    seq: h("seq").parse().unwrap(),
                    value_seq: v["seq"].as_i64().unwrap(),
                    series: v["series"].as_str().unwrap().to_string(),
                });
            }
        }
    }
    out
}

async fn wait_for_count(client: &Client, n: usize, log: &Path) -> Vec<Stored> {
    let start = Instant::now();
    loop {
        let got = stored(client).await;
        let distinct: BTreeSet<i64> = got.iter().map(|s| s.seq).collect();
        if distinct.len() >= n {
            return got;
        }
        assert!(
            start.elapsed() < WAIT * 2,
            "{} of {n} records in the topic; agent log:\n{}",
            distinct.len(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a consumer keeps: each `(agent, epoch, seq)` once, the first time
/// it comes (README, "Kafka": the consumer-side rule).
fn dedup(got: &[Stored]) -> Vec<Stored> {
    let mut seen = BTreeSet::new();
    got.iter()
        .filter(|s| seen.insert((s.agent.clone(), s.epoch, s.seq)))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_lands_in_its_series_partition_across_an_outage_of_the_broker() {
    let mut broker = KafkaBroker::start("outage", None);
    let kafka = client(broker.address(), None).await;
    create_topic(&kafka).await;
    let tmp = sluice_tests::temp_dir("kafka-outage");
    let udp_port = sluice_tests::free_port();
    let metrics = sluice_tests::free_port();
    let listen = format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
    let path = config(tmp.path(), "gw", udp_port, broker.port, &listen);
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &path, &log);
    std::thread::sleep(Duration::from_millis(500));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Ids a topic could not hold: they are keys, kept as they are.
    let ids = ["s-0", "line1/temp", "a b", "#", "+", "$SYS"];
    sluice_tests::send_readings(&udp, udp_port, &ids, 0, 200);
    wait_for_count(&kafka, 200, &log).await;
    // The broker goes away; the agent keeps committing.
    broker.stop();
    sluice_tests::send_readings(&udp, udp_port, &ids, 200, 300);
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.restart();
    let kafka = client(broker.address(), None).await;
    wait_for_count(&kafka, 500, &log).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = stored(&kafka).await;
    let kept = dedup(&got);
    let mut seqs: Vec<i64> = kept.iter().map(|s| s.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=500).collect::<Vec<i64>>(), "none missing");
    // What the outage may have stored twice, the agent counted.
    let unconfirmed = sluice_tests::metric(metrics, "sluice_uplink_unconfirmed_total").unwrap();
    assert!(
        (got.len() - kept.len()) as u64 <= unconfirmed,
        "{} stored twice, {unconfirmed} counted",
        got.len() - kept.len()
    );
    for s in &got {
        assert_eq!(s.agent, "gw");
        assert_eq!(s.value_seq, s.seq, "header and value agree");
        assert_eq!(s.key, s.series, "the key is the series, as it was");
        assert_eq!(
            s.partition,
            sluice::output::kafka::partition(s.key.as_bytes(), PARTITIONS),
            "{s:?}"
        );
    }
    // Each series in one partition, in order.
    let mut by_series: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for s in &kept {
        by_series.entry(&s.series).or_default().push(s.seq);
    }
    assert_eq!(by_series.len(), ids.len(), "{by_series:?}");
    for (series, seqs) in &by_series {
        assert!(seqs.is_sorted(), "{series}: {seqs:?}");
    }
    let spread: BTreeSet<i32> = kept.iter().map(|s| s.partition).collect();
    assert!(spread.len() > 1, "all series in one partition: {spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9s_under_load_leave_no_gap_and_few_records_twice() {
    let broker = KafkaBroker::start("kill9", None);
    let kafka = client(broker.address(), None).await;
    create_topic(&kafka).await;
    let tmp = sluice_tests::temp_dir("kafka-kill9");
    let udp_port = sluice_tests::free_port();
    let path = config(tmp.path(), "k9", udp_port, broker.port, "");
    let log = tmp.path().join("agent.log");
    let sent = sluice_tests::twenty_kill_9s(SLUICE, &path, &log, udp_port);
    // A last run drains what is left: until the outbox is empty.
    let _agent = sluice_tests::drain_outbox(SLUICE, &path, &log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = stored(&kafka).await;
    let kept = dedup(&got);
    // Readings sent while an agent was dead are lost before they are
    // committed (UDP); every committed one has a seq, and those must all be
    // in the log.
    assert!(kept.len() >= sent / 2, "{} of {sent} committed", kept.len());
    let mut seqs: Vec<i64> = kept.iter().map(|s| s.seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=kept.len() as i64).collect::<Vec<i64>>(),
        "a gap; agent log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Stored twice: at most what was acknowledged and not yet deleted, or
    // in flight, when each run died (one acknowledgement batch and the
    // window of 16).
    let twice = got.len() - kept.len();
    let crashes = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("ack.before_delete")
        .count();
    assert!(crashes >= 5, "only {crashes} runs reached the crash point");
    assert!(twice > 0, "no run died between acknowledgement and delete");
    assert!(
        twice <= 20 * (16 + 64),
        "{twice} records stored twice in {} stored",
        got.len()
    );
    eprintln!(
        "kill -9 x20: {} records kept, {twice} stored twice ({crashes} runs died between acknowledgement and delete)",
        kept.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_speaks_tls_to_kafka_and_refuses_a_broker_its_ca_did_not_sign() {
    let pki = sluice_tests::temp_dir("kafka-pki");
    let (ca, cert, key) = sluice_tests::test_pki(pki.path(), "kafka");
    let (other_ca, _, _) = sluice_tests::test_pki(pki.path(), "other");
    let broker = KafkaBroker::start("tls", Some((cert, key)));
    // The test's own client trusts the test CA.
    let kafka = client(broker.address(), Some(&ca)).await;
    create_topic(&kafka).await;
    let tmp = sluice_tests::temp_dir("kafka-tls");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A CA that did not sign the broker's certificate: nothing goes.
    let udp_port = sluice_tests::free_port();
    let tls = |ca: &Path| format!("[uplink.tls]\nca_file = \"{}\"\n", ca.display());
    let wrong = config(tmp.path(), "tls", udp_port, broker.port, &tls(&other_ca));
    let log = tmp.path().join("agent.log");
    let mut agent = start_agent(SLUICE, &wrong, &log);
    std::thread::sleep(Duration::from_millis(300));
    sluice_tests::send_readings(&udp, udp_port, &["s-0"], 0, 5);
    let start = Instant::now();
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    while !said().contains("uplink unavailable") {
        assert!(start.elapsed() < WAIT * 2, "{}", said());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(said().contains("invalid peer certificate"), "{}", said());
    assert_eq!(stored(&kafka).await.len(), 0);
    agent.kill().unwrap();
    agent.wait().unwrap();
    // The right CA: the backlog goes.
    let right = config(tmp.path(), "tls", udp_port, broker.port, &tls(&ca));
    let _agent = start_agent(SLUICE, &right, &log);
    let got = wait_for_count(&kafka, 5, &log).await;
    assert_eq!(got.len(), 5);
}

/// The README's consumer example, run as the README gives it (kafka-python,
/// an independent implementation of the protocol): it reads every record
/// the agent wrote with its key and headers, and kafka-python's own
/// default partitioner puts a key where the agent did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_python_consumer_reads_the_records_with_their_keys_and_headers() {
    let broker = KafkaBroker::start("python", None);
    let kafka = client(broker.address(), None).await;
    create_topic(&kafka).await;
    let tmp = sluice_tests::temp_dir("kafka-python");
    sluice_tests::readme_script(tmp.path(), "consume.py");
    let udp_port = sluice_tests::free_port();
    let path = config(tmp.path(), "gw", udp_port, broker.port, "");
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &path, &log);
    std::thread::sleep(Duration::from_millis(500));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ids = ["s-0", "s-1", "pump/3", "tank 4"];
    sluice_tests::send_readings(&udp, udp_port, &ids, 0, 40);
    wait_for_count(&kafka, 40, &log).await;
    let run = |args: &[&str]| sluice_tests::python(tmp.path(), args);
    let text = run(&["consume.py", &broker.address(), TOPIC]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 40, "{text}");
    let mut seqs = BTreeSet::new();
    for line in lines {
        let mut f = line.splitn(2, ' ');
        let p: i32 = f.next().unwrap().parse().unwrap();
        let rest = f.next().unwrap();
        // The key is the series, which may hold a space: the JSON follows
        // the last "{" that starts the record.
        let at = rest.find(" {").unwrap();
        let (key, v) = (&rest[..at], &rest[at + 1..]);
        let v: serde_json::Value = serde_json::from_str(v).unwrap();
        assert_eq!(key, v["series"].as_str().unwrap());
        assert_eq!(v["agent"], "gw");
        assert_eq!(
            p,
            sluice::output::kafka::partition(key.as_bytes(), PARTITIONS)
        );
        seqs.insert(v["seq"].as_i64().unwrap());
    }
    assert_eq!(seqs, (1..=40).collect::<BTreeSet<i64>>());
    // kafka-python's default partitioner (murmur2) agrees on where a key
    // goes: what it chose for each key, against ours.
    let placed = run(&[
        "-c",
        &format!(
            "from kafka import KafkaProducer\n\
             p = KafkaProducer(bootstrap_servers='{}')\n\
             for k in [b'interop-a', b'interop-b', b'interop-c', b'pump/3', b'21']:\n    \
             print(k.decode(), p.send('{TOPIC}', key=k, value=b'{{}}').get(timeout=10).partition)\n",
            broker.address()
        ),
    ]);
    let placed: Vec<&str> = placed.lines().collect();
    assert_eq!(placed.len(), 5, "{placed:?}");
    for line in placed {
        let (k, p) = line.rsplit_once(' ').unwrap();
        assert_eq!(
            p.parse::<i32>().unwrap(),
            sluice::output::kafka::partition(k.as_bytes(), PARTITIONS),
            "{k}"
        );
    }
}

/// A topic that does not exist (yet) holds its records back, says so, and
/// sets none aside, even when the records before it in the same round (for
/// a topic that exists) were never sent: once it is created, every record
/// goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_holds_the_records_back_and_sets_none_aside() {
    let broker = KafkaBroker::start("missing", None);
    let kafka = client(broker.address(), None).await;
    create_topic(&kafka).await;
    let tmp = sluice_tests::temp_dir("kafka-missing");
    let udp_port = sluice_tests::free_port();
    // Aggregates to the topic that exists, alerts to one that does not.
    let path = tmp.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            r#"
agent_id = "gw"
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp_port}"
[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}
thresholds = [{{ above = 0.5 }}]
[outbox]
path = "{db}"
include_alerts = true
[uplink]
kind = "kafka"
host = "127.0.0.1"
port = {port}
max_inflight = 16
reconnect_max_ms = 500
"#,
            db = tmp.path().join("outbox.db").display(),
            port = broker.port,
        ),
    )
    .unwrap();
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(SLUICE, &path, &log);
    std::thread::sleep(Duration::from_millis(500));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    sluice_tests::send_readings(&udp, udp_port, &["s-0", "s-1"], 0, 10);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = Instant::now();
    while !said().contains("\"sluice.alerts\" does not exist on the cluster") {
        assert!(start.elapsed() < WAIT, "{}", said());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More sessions than it takes to suspect a record (STRIKES), at the
    // uplink's backoff of 200 ms doubling to 500.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let letters = sluice_tests::own_binary(SLUICE)
        .args(["outbox", "dead-letters", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let letters = String::from_utf8_lossy(&letters.stdout).to_string();
    assert!(
        letters.contains("0 dead letter(s)"),
        "set aside: {letters}\n{}",
        said()
    );
    kafka
        .controller_client()
        .unwrap()
        .create_topic("sluice.alerts", 1, 1, 5_000)
        .await
        .unwrap();
    // Every aggregate, none set aside.
    let got = wait_for_count(&kafka, 10, &log).await;
    assert_eq!(dedup(&got).len(), 10);
}
