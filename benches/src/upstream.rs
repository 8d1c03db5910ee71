//! Upstreams the uplink benchmarks drain to besides Mosquitto, started on
//! 127.0.0.1 and stopped when dropped: NATS JetStream (feature `nats`) and
//! a Kafka-protocol broker (feature `kafka`).

/// A local `nats-server -js` with a file-stored stream on `sluice.>`.
#[cfg(feature = "nats")]
pub fn nats(name: &str) -> sluice_tests::NatsServer {
    let server = sluice_tests::NatsServer::start(name, "");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = async_nats::connect(format!("127.0.0.1:{}", server.port))
                .await
                .unwrap();
            async_nats::jetstream::new(client)
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "SLUICE".into(),
                    subjects: vec!["sluice.>".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
        });
    server
}

/// A local tansu (Kafka protocol, SQLite storage) with the topic
/// `sluice.aggregates` of one partition.
#[cfg(feature = "kafka")]
pub fn kafka(name: &str) -> sluice_tests::KafkaBroker {
    let broker = sluice_tests::KafkaBroker::start(name, None);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            rskafka::client::ClientBuilder::new(vec![broker.address()])
                .build()
                .await
                .unwrap()
                .controller_client()
                .unwrap()
                .create_topic("sluice.aggregates", 1, 1, 5_000)
                .await
                .unwrap();
        });
    broker
}
