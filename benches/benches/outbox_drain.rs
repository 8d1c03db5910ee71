//! Drain rate: how fast the uplink empties an outbox backlog into a local
//! Mosquitto (QoS 1, a record leaves the outbox only on its PUBACK), against
//! the broker-limited ceiling measured in the same run: a bare rumqttc client
//! publishing the same payloads with the same in-flight window, no SQLite.
//!
//! Built with `--features nats`, the same backlog drained to NATS JetStream
//! too (a local `nats-server -js`, a stream on the subject; a record leaves
//! the outbox on the stream's acknowledgement), in the same run; with
//! `--features kafka`, to Kafka (a local tansu, a topic of one partition; a
//! record leaves the outbox on the leader's `acks = all`).
//!
//! `cargo bench -p sluice-benches --bench outbox_drain [--features nats,kafka]`
//! (`RECORDS` changes the default of 50,000 per run; needs `mosquitto`,
//! `nats-server` for NATS and tansu for Kafka: `SLUICE_TANSU`, as the tests).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sluice_tests::Broker;

#[path = "support/uplink.rs"]
mod uplink;

const PAYLOAD: &[u8] = br#"{"agent":"gateway-01","series":"s-0042","start":1732600000000,"end":1732600001000,"count":20,"sum":427.4,"mean":21.37,"min":19.8,"max":23.1,"stddev":0.92,"first":21.1,"last":20.9,"late":0,"partial":false}"#;

/// Where the backlog drains to: (`[uplink]` kind, port, the subject or
/// topic of its records).
type Upstream<'a> = (&'a str, u16, &'a str);

fn drain(upstream: Upstream<'_>, n: usize, inflight: u16, dir: &std::path::Path) -> f64 {
    let (kind, port, topic) = upstream;
    let path = dir.join(format!("drain-{kind}-{inflight}.db"));
    let _ = std::fs::remove_file(&path);
    let mut writer = uplink::open(&path);
    let batch: Vec<(String, Vec<u8>)> = (0..512)
        .map(|_| (topic.to_string(), PAYLOAD.to_vec()))
        .collect();
    let mut filled = 0;
    while filled < n {
        writer.append(&batch[..512.min(n - filled)], 0).unwrap();
        filled += 512.min(n - filled);
    }
    let start = Instant::now();
    let uplink = uplink::Uplink::start(&path, kind, port, inflight);
    while (uplink.stats.acked.load(Relaxed) as usize) < n {
        std::thread::sleep(Duration::from_millis(2));
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    uplink.stop();
    assert_eq!(writer.status().unwrap().backlog, 0);
    rate
}

fn bare_client(broker: &Broker, n: usize, inflight: u16) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut options = MqttOptions::new(format!("bare-{inflight}"), "127.0.0.1", broker.port);
        options.set_inflight(inflight);
        let (client, mut events) = AsyncClient::new(options, usize::from(inflight) * 2);
        events.set_network_options(sluice_collectors::mqtt::network_options());
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
        let start = Instant::now();
        let (mut sent, mut acked) = (0, 0);
        while acked < n {
            // Keep the request queue topped up, as the uplink does.
            while sent < n && sent - acked < usize::from(inflight) {
                client
                    .try_publish(
                        "sluice/gateway-01/agg/s-0042",
                        QoS::AtLeastOnce,
                        false,
                        PAYLOAD,
                    )
                    .unwrap();
                sent += 1;
            }
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
                acked += 1;
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    let n: usize = std::env::var("RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let dir = std::env::temp_dir().join(format!("sluice-drain-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broker = Broker::start("drain-bench");
    println!(
        "{n} records of {} bytes per run, QoS 1 to a local Mosquitto",
        PAYLOAD.len()
    );
    let mqtt = ("mqtt", broker.port, "sluice/gateway-01/agg/s-0042");
    #[cfg(feature = "nats")]
    let nats = sluice_benches::upstream::nats("drain-bench");
    #[cfg(feature = "kafka")]
    let kafka = sluice_benches::upstream::kafka("drain-bench");
    for inflight in [64u16, 256, 1024] {
        let outbox = drain(mqtt, n, inflight, &dir);
        let bare = bare_client(&broker, n, inflight);
        println!(
            "in flight {inflight:>4}: outbox drain {outbox:>8.0} records/s, bare client {bare:>8.0} msgs/s, ratio {:.2}",
            outbox / bare
        );
        #[cfg(feature = "nats")]
        {
            let to_nats = drain(
                ("nats", nats.port, "sluice.gateway-01.agg.s-0042"),
                n,
                inflight,
                &dir,
            );
            println!(
                "in flight {inflight:>4}: outbox drain to NATS JetStream {to_nats:>8.0} records/s, {:.2}× the drain to Mosquitto",
                to_nats / outbox
            );
        }
        #[cfg(feature = "kafka")]
        {
            let to_kafka = drain(
                ("kafka", kafka.port, "sluice.aggregates/s-0042"),
                n,
                inflight,
                &dir,
            );
            println!(
                "in flight {inflight:>4}: outbox drain to Kafka (tansu) {to_kafka:>8.0} records/s, {:.2}× the drain to Mosquitto",
                to_kafka / outbox
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
