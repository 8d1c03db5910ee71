//! The MQTT source against a real Mosquitto broker on 127.0.0.1.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{await_subscription, drain, one_lane, w1, wait_for};
use rumqttc::QoS;
use sluice_collectors::Reason;
use sluice_collectors::decode::{JsonMapping, SeriesSource};
use sluice_collectors::mqtt::{MqttSettings, MqttSource, TlsSettings};
use sluice_core::shed::ShedPolicy;
use sluice_tests::{Broker, Publisher, test_pki};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

fn settings(port: u16, topics: &[&str], id: &str) -> MqttSettings {
    let mut s = MqttSettings::new(
        "127.0.0.1",
        port,
        topics.iter().map(|t| t.to_string()).collect(),
    );
    s.client_id = id.into();
    s.reconnect_min_ms = 50;
    s.reconnect_max_ms = 500;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscriptions_route_readings_and_refuse_bad_payloads() {
    let broker = Broker::start("wildcards");
    let (handoff, mut rx, stats) = one_lane(256, ShedPolicy::DropNewest { high_water: 256 });
    let mut s = settings(broker.port, &["sensors/+", "plant/#"], "sluice-wild");
    s.json = JsonMapping {
        series: SeriesSource::TopicSegment(1),
        ..JsonMapping::default()
    };
    let source = MqttSource::new("mqtt-test", s, handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    let publisher = Publisher::connect(broker.port, "publisher");
    await_subscription(&publisher, "sensors/probe", &stats, &mut rx).await;
    let delivered_before = stats.delivered.load(Relaxed);

    publisher
        .publish("sensors/s-1", QoS::AtLeastOnce, w1("ignored", 1.0))
        .await;
    publisher
        .publish("sensors/s-2", QoS::AtMostOnce, w1("ignored", 2.0))
        .await;
    publisher
        .publish("plant/hall/s-3", QoS::AtLeastOnce, w1("ignored", 3.0))
        .await;
    publisher
        .publish("other/s-4", QoS::AtLeastOnce, w1("ignored", 4.0))
        .await; // not subscribed
    publisher
        .publish("sensors/s-5/deeper", QoS::AtLeastOnce, w1("x", 5.0))
        .await; // `+` is one level
    publisher
        .publish("sensors/bad", QoS::AtLeastOnce, "{oops")
        .await;
    publisher
        .publish("sensors/s-6", QoS::AtLeastOnce, w1("ignored", 6.0))
        .await;
    wait_for("four readings", WAIT, || {
        stats.delivered.load(Relaxed) == delivered_before + 4
    })
    .await;
    wait_for("the malformed payload", WAIT, || {
        stats.rejected(Reason::Malformed) == 1
    })
    .await;
    let mut got: Vec<(String, f64)> = drain(&mut rx)
        .iter()
        .map(|r| (r.series.to_string(), r.value))
        .collect();
    got.sort_by(|a, b| a.1.total_cmp(&b.1));
    // `plant/#` takes segment 1 too: "hall".
    assert_eq!(
        got,
        [
            ("s-1".into(), 1.0),
            ("s-2".into(), 2.0),
            ("hall".into(), 3.0),
            ("s-6".into(), 6.0)
        ]
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the source stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_resume_after_the_broker_is_killed_and_restarted() {
    let mut broker = Broker::start("restart");
    let (handoff, mut rx, stats) = one_lane(256, ShedPolicy::DropNewest { high_water: 256 });
    let source = MqttSource::new(
        "mqtt-test",
        settings(broker.port, &["sensors/+"], "sluice-restart"),
        handoff,
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    {
        let publisher = Publisher::connect(broker.port, "publisher-1");
        await_subscription(&publisher, "sensors/probe", &stats, &mut rx).await;
    }
    assert_eq!(stats.connects.load(Relaxed), 1);

    broker.kill();
    wait_for("the source to notice", WAIT, || {
        stats.disconnects.load(Relaxed) >= 1
    })
    .await;
    // It keeps retrying while the broker is away, without crashing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!task.is_finished());
    broker.restart();
    wait_for("the source to reconnect", WAIT, || {
        stats.connects.load(Relaxed) >= 2
    })
    .await;

    // The (clean) session was lost with the broker: the source resubscribed.
    let publisher = Publisher::connect(broker.port, "publisher-2");
    await_subscription(&publisher, "sensors/probe", &stats, &mut rx).await;
    let before = stats.delivered.load(Relaxed);
    publisher
        .publish("sensors/s-1", QoS::AtLeastOnce, w1("after-restart", 7.0))
        .await;
    wait_for("the reading after the restart", WAIT, || {
        stats.delivered.load(Relaxed) == before + 1
    })
    .await;
    assert_eq!(drain(&mut rx)[0].series.as_str(), "after-restart");
    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the source stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca_connects_and_with_a_wrong_one_does_not() {
    let pki = std::env::temp_dir().join(format!("sluice-pki-{}", std::process::id()));
    let (ca, cert, key) = test_pki(&pki, "good");
    let (other_ca, _, _) = test_pki(&pki, "other");
    let broker = Broker::start_with("tls", Some((&ca, &cert, &key)));
    let tls_port = broker.tls_port.unwrap();

    let (handoff, mut rx, stats) = one_lane(64, ShedPolicy::DropNewest { high_water: 64 });
    let mut s = settings(tls_port, &["sensors/+"], "sluice-tls");
    s.tls = Some(TlsSettings {
        ca_file: ca.clone(),
        client_cert_file: None,
        client_key_file: None,
    });
    let source = MqttSource::new("mqtt-tls", s, handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    let publisher = Publisher::connect(broker.port, "publisher-tls");
    await_subscription(&publisher, "sensors/probe", &stats, &mut rx).await;
    publisher
        .publish("sensors/s-1", QoS::AtLeastOnce, w1("over-tls", 1.0))
        .await;
    wait_for("a reading over TLS", WAIT, || {
        drain(&mut rx)
            .iter()
            .any(|r| r.series.as_str() == "over-tls")
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();

    // A CA that did not sign the broker's certificate: refused, retried, never connected.
    let (handoff, _rx, stats) = one_lane(64, ShedPolicy::DropNewest { high_water: 64 });
    let mut s = settings(tls_port, &["sensors/+"], "sluice-tls-wrong");
    s.tls = Some(TlsSettings {
        ca_file: other_ca,
        client_cert_file: None,
        client_key_file: None,
    });
    let source = MqttSource::new("mqtt-tls-wrong", s, handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    wait_for("two refused handshakes", WAIT, || {
        stats.disconnects.load(Relaxed) >= 2
    })
    .await;
    assert_eq!(stats.connects.load(Relaxed), 0);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();

    // A CA file that is missing or holds no certificate is a clear error up front.
    let mut s = settings(tls_port, &["sensors/+"], "x");
    s.tls = Some(TlsSettings {
        ca_file: pki.join("missing.pem"),
        client_cert_file: None,
        client_key_file: None,
    });
    let err = MqttSource::new(
        "x",
        s.clone(),
        one_lane(8, ShedPolicy::DropNewest { high_water: 8 }).0,
    )
    .err()
    .unwrap();
    assert!(
        err.contains("tls.ca_file") && err.contains("missing.pem"),
        "{err}"
    );
    std::fs::write(pki.join("empty.pem"), "").unwrap();
    s.tls = Some(TlsSettings {
        ca_file: pki.join("empty.pem"),
        client_cert_file: None,
        client_key_file: None,
    });
    let err = MqttSource::new(
        "x",
        s,
        one_lane(8, ShedPolicy::DropNewest { high_water: 8 }).0,
    )
    .err()
    .unwrap();
    assert!(err.contains("no certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&pki);
}

#[test]
fn bad_settings_name_their_key() {
    let mut s = MqttSettings::new("127.0.0.1", 1883, vec!["a/#/b".into()]);
    assert!(s.validate().unwrap_err().contains("topics"));
    s.topics = vec!["a/+".into()];
    s.qos = 2;
    assert!(s.validate().unwrap_err().contains("qos"));
    s.qos = 1;
    s.gather_ms = 51;
    assert!(s.validate().unwrap_err().contains("gather_ms"));
    s.gather_ms = 0;
    assert!(s.validate().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_receives_what_was_published_while_away() {
    let broker = Broker::start("persistent");
    let mut s = settings(broker.port, &["sensors/+"], "sluice-persistent");
    s.clean_session = false;
    let publisher = Publisher::connect(broker.port, "publisher-persistent");

    // First run: subscribe (the broker records the session), then stop.
    let (handoff, mut rx, stats) = one_lane(256, ShedPolicy::DropNewest { high_water: 256 });
    let source = MqttSource::new("mqtt-persistent", s.clone(), handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    await_subscription(&publisher, "sensors/probe", &stats, &mut rx).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // While the agent is away, QoS 1 readings are queued for its session.
    for i in 0..20 {
        publisher
            .publish(
                "sensors/s-1",
                QoS::AtLeastOnce,
                w1(&format!("away-{i}"), f64::from(i)),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Second run, same client id: the queued readings arrive, in order.
    let (handoff, mut rx, stats) = one_lane(256, ShedPolicy::DropNewest { high_water: 256 });
    let source = MqttSource::new("mqtt-persistent", s, handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    wait_for("the 20 queued readings", WAIT, || {
        stats.delivered.load(Relaxed) >= 20
    })
    .await;
    let got: Vec<String> = drain(&mut rx)
        .iter()
        .map(|r| r.series.to_string())
        .filter(|s| s.starts_with("away-"))
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("away-{i}")).collect();
    assert_eq!(got, expected);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_a_counted_refusal_and_never_costs_the_session() {
    let broker = Broker::start("oversize");
    let (handoff, mut rx, stats) = one_lane(256, ShedPolicy::DropNewest { high_water: 256 });
    let mut s = settings(broker.port, &["sensors/+"], "sluice-oversize");
    // A persistent session at QoS 1: a message that cost the connection
    // would be redelivered after every reconnect, for ever.
    s.clean_session = false;
    s.json.max_message_bytes = 1000;
    let source = MqttSource::new("mqtt-oversize", s, handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    let publisher = Publisher::connect(broker.port, "publisher-oversize");
    await_subscription(&publisher, "sensors/probe", &stats, &mut rx).await;
    let delivered_before = stats.delivered.load(Relaxed);
    publisher
        .publish("sensors/a", QoS::AtLeastOnce, w1("a", 1.0))
        .await;
    let big = format!(
        r#"{{"sensor":"big","ts":{},"value":1,"pad":"{}"}}"#,
        common::now_ms(),
        "p".repeat(5000)
    );
    publisher
        .publish("sensors/big", QoS::AtLeastOnce, big)
        .await;
    publisher
        .publish("sensors/b", QoS::AtLeastOnce, w1("b", 2.0))
        .await;
    wait_for("the readings around it", WAIT, || {
        stats.delivered.load(Relaxed) == delivered_before + 2
    })
    .await;
    wait_for("the oversized message refused", WAIT, || {
        stats.rejected(Reason::Oversize) == 1
    })
    .await;
    assert_eq!(stats.disconnects.load(Relaxed), 0, "the session was lost");
    assert_eq!(stats.connects.load(Relaxed), 1);
    let got: Vec<String> = drain(&mut rx)
        .iter()
        .map(|r| r.series.to_string())
        .collect();
    assert_eq!(got, ["a", "b"]);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_dropped_right_after_connecting_keeps_backing_off() {
    // Two sources with one client id: each connection makes the broker
    // drop the other's, right after its CONNACK.
    let broker = Broker::start("takeover");
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut all_stats = Vec::new();
    for _ in 0..2 {
        let (handoff, _rx, stats) = one_lane(16, ShedPolicy::DropNewest { high_water: 16 });
        let mut s = settings(broker.port, &["sensors/+"], "sluice-same-id");
        s.reconnect_min_ms = 50;
        s.reconnect_max_ms = 1000;
        let source = MqttSource::new("mqtt-takeover", s, handoff).unwrap();
        tasks.push(tokio::spawn(source.run(shutdown.clone())));
        all_stats.push((stats, _rx));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let connects: Vec<u64> = all_stats
        .iter()
        .map(|(s, _)| s.connects.load(Relaxed))
        .collect();
    // Backing off from 50 ms to 1 s: at most about a dozen each in 4 s; a
    // backoff reset by every CONNACK made one every 50-100 ms.
    assert!(connects.iter().all(|&c| c <= 15), "{connects:?}");
    assert!(connects.iter().sum::<u64>() >= 3, "{connects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_says_whether_it_is_up() {
    let mut broker = Broker::start("up");
    broker.kill();
    let (handoff, _rx, stats) = one_lane(256, ShedPolicy::DropNewest { high_water: 256 });
    let source = MqttSource::new(
        "up-test",
        settings(broker.port, &["sensors/+"], "sluice-up"),
        handoff,
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    wait_for("failed connects", WAIT, || {
        stats.disconnects.load(Relaxed) >= 2
    })
    .await;
    assert!(!stats.up.load(Relaxed), "no broker: down");
    broker.restart();
    wait_for("up", WAIT, || stats.up.load(Relaxed)).await;
    broker.kill();
    wait_for("down again", WAIT, || !stats.up.load(Relaxed)).await;
    shutdown.cancel();
    task.await.unwrap();
}

/// rumqttc reads up to ten packets at a time and queues what it read: the
/// source hands the readings of such a read to the worker together (one
/// push, at most one wake-up), not one message at a time, and holds nothing
/// back once the read is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_handed_over_in_batches_and_none_of_it_is_held_back() {
    // No cap on the broker's queue for a busy subscriber (QoS 0 included).
    let broker = Broker::start_configured("burst", "max_queued_messages 0\n");
    let (handoff, mut rx, stats) = one_lane(8192, ShedPolicy::DropNewest { high_water: 8192 });
    let source = MqttSource::new(
        "mqtt-burst",
        settings(broker.port, &["sensors/+"], "sluice-burst"),
        handoff,
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    let publisher = Publisher::connect(broker.port, "publisher-burst");
    await_subscription(&publisher, "sensors/probe", &stats, &mut rx).await;
    let (delivered, handoffs) = (stats.delivered.load(Relaxed), stats.handoffs.load(Relaxed));

    const BURST: u32 = 4000;
    for i in 0..BURST {
        publisher
            .publish(
                "sensors/s-1",
                QoS::AtMostOnce,
                w1(&format!("b-{i}"), f64::from(i)),
            )
            .await;
    }
    wait_for("the whole burst", WAIT, || {
        stats.delivered.load(Relaxed) - delivered == u64::from(BURST)
    })
    .await;
    // Nothing staged was left behind (the last readings arrived without
    // more traffic to push them), and the order is kept.
    let got: Vec<f64> = drain(&mut rx).iter().map(|r| r.value).collect();
    let expected: Vec<f64> = (0..BURST).map(f64::from).collect();
    assert_eq!(got, expected);
    let handoffs = stats.handoffs.load(Relaxed) - handoffs;
    eprintln!("{BURST} messages in {handoffs} hand-offs");
    assert!(
        handoffs < u64::from(BURST),
        "{handoffs} hand-offs for {BURST} messages: one a message"
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}
