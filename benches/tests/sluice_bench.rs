//! `sluice-bench` as an operator runs it on a gateway: against a broker that
//! is already there (`--broker`), with the rules of their own configuration
//! (`--config`), and with clear errors before any load when either is wrong.
//! Counts only (`--check`), never timings.

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};

use sluice_tests::Broker;

/// The agent binary the benchmark starts: the workspace's, next to it.
fn agent() -> PathBuf {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_sluice-bench")).with_file_name("sluice");
    assert!(
        agent.exists(),
        "{} not built: cargo build -p sluice --bin sluice (cargo test --workspace builds it)",
        agent.display()
    );
    agent
}

fn bench(args: &[&str]) -> Output {
    let out = sluice_tests::temp_dir("bench-out");
    sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice-bench"))
        .args([
            "--rate",
            "1000",
            "--sensors",
            "20",
            "--seconds",
            "2",
            "--spike-every",
            "40",
            "--no-baseline",
            "--agent",
        ])
        .arg(agent())
        .arg("--out")
        .arg(out.path())
        .args(args)
        .output()
        .expect("sluice-bench runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A broker already in use: the run's counts are right, and a subscriber
/// already there to `sensors/+` (as an agent would be) gets none of the
/// load, nor does one to `#` see anything outside the run's topic root.
#[test]
fn against_a_broker_in_use_the_load_stays_under_its_own_topic_root() {
    let broker = Broker::start("bench-shared");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let on_sensors = Arc::new(Mutex::new(0u64));
    let elsewhere = Arc::new(Mutex::new(Vec::<String>::new()));
    let under_root = Arc::new(Mutex::new(0u64));
    runtime.block_on(async {
        let n = on_sensors.clone();
        sluice_tests::subscribe(
            broker.port,
            "bystander-sensors",
            "sensors/+",
            rumqttc::QoS::AtMostOnce,
            true,
            move |_| *n.lock().unwrap() += 1,
        )
        .await;
        let (elsewhere, under_root) = (elsewhere.clone(), under_root.clone());
        sluice_tests::subscribe(
            broker.port,
            "bystander-all",
            "#",
            rumqttc::QoS::AtMostOnce,
            true,
            move |p| {
                if p.topic.starts_with("sluice-bench/") {
                    *under_root.lock().unwrap() += 1;
                } else {
                    elsewhere.lock().unwrap().push(p.topic.to_string());
                }
            },
        )
        .await;
    });
    let address = format!("127.0.0.1:{}", broker.port);
    let o = bench(&["--broker", &address, "--check"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("check: counts are right"), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("broker {address}, topics under sluice-bench/")),
        "{}",
        text(&o)
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(*on_sensors.lock().unwrap(), 0, "the load reached sensors/+");
    assert!(
        elsewhere.lock().unwrap().is_empty(),
        "published outside the run's root: {:?}",
        &elsewhere.lock().unwrap()[..elsewhere.lock().unwrap().len().min(5)]
    );
    // 2 s at 1,000/s, plus the agent's aggregates and alerts.
    assert!(*under_root.lock().unwrap() >= 2_000);
}

/// The rules of the packaged example configuration (windows, sketches,
/// detectors, tables by a relative path, labels its sources read) run on
/// the load; its sources, outbox and uplink are not used.
#[test]
fn the_rules_of_a_given_configuration_are_measured() {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/config/sluice.example.toml"
    );
    let o = bench(&["--config", config, "--check"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("check: counts are right"), "{}", text(&o));
    assert!(text(&o).contains("rules of "), "{}", text(&o));
}

/// Wrong input ends the run before any load, with exit status 2 and the
/// reason: a broker that does not answer, a configuration that is not
/// TOML, one the agent refuses (with the agent's own words).
#[test]
fn a_wrong_broker_or_configuration_is_a_clear_error() {
    let closed = sluice_tests::free_port();
    let o = bench(&["--broker", &format!("127.0.0.1:{closed}")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("--broker 127.0.0.1:{closed}: cannot connect")),
        "{}",
        text(&o)
    );

    let o = bench(&["--broker", "localhost"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("expected HOST:PORT"), "{}", text(&o));

    let dir = sluice_tests::temp_dir("bench-config");
    let not_toml = dir.path().join("not.toml");
    std::fs::write(&not_toml, "[[rules]\nmatch = ").unwrap();
    let o = bench(&["--config", not_toml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is not valid TOML"), "{}", text(&o));

    let refused = dir.path().join("refused.toml");
    std::fs::write(
        &refused,
        "[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 0 }\n",
    )
    .unwrap();
    let o = bench(&["--config", refused.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("the agent exited") && text(&o).contains("size_ms"),
        "{}",
        text(&o)
    );
}

/// `--gather-ms` reaches the agent's MQTT source: 0 (read at once) runs
/// with the counts right, and a value the agent refuses ends the run
/// before any load, in the agent's words.
#[test]
fn gather_ms_reaches_the_agents_source() {
    let o = bench(&["--gather-ms", "0", "--check"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("check: counts are right"), "{}", text(&o));
    let o = bench(&["--gather-ms", "51"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("gather_ms: must be <= 50"),
        "{}",
        text(&o)
    );
}
