//! End to end: the `sluice` binary against a real Mosquitto broker.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use sluice_tests::{Broker, Publisher, WAIT, http_get, metric, now_ms};

/// `text` in a file `name` in a fresh directory (removed when the guard
/// drops).
fn temp_file(name: &str, text: &str) -> (sluice_tests::TempDir, std::path::PathBuf) {
    let dir = sluice_tests::temp_dir("e2e");
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The agent, killed if the test ends without stopping it.
struct Agent {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    fn start(config: &std::path::Path) -> Agent {
        Agent::start_with_stdout(config, Stdio::null())
    }

    /// The agent, once its metrics on port `metrics` answer (they start
    /// after every source).
    async fn started_with_metrics(config: &std::path::Path, metrics: u16) -> Agent {
        let agent = Agent::start(config);
        wait_until("metrics", &agent, || {
            metric(metrics, "sluice_readings_processed_total").is_some()
        })
        .await;
        agent
    }

    /// The agent with its standard output going to `stdout`.
    fn start_with_stdout(config: &std::path::Path, stdout: impl Into<Stdio>) -> Agent {
        let mut child = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Agent { child, stderr }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    /// Waits until the agent logs that it runs (every source is up).
    fn wait_running(&self) {
        let start = Instant::now();
        while !self.log().contains("sluice running") {
            assert!(start.elapsed() < WAIT, "{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < WAIT,
                "the agent did not stop after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Messages a test subscriber received: (topic, JSON payload, retained).
type Received = Arc<Mutex<Vec<(String, Value, bool)>>>;

/// Subscribes to `filter` and collects (topic, JSON, retained) triples.
async fn subscribe(port: u16, filter: &str) -> Received {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    sluice_tests::subscribe(
        port,
        "e2e-subscriber",
        filter,
        QoS::AtLeastOnce,
        true,
        move |p| {
            if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                sink.lock().unwrap().push((p.topic.clone(), v, p.retain));
            }
        },
    )
    .await;
    got
}

async fn wait_until(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reading(sensor: &str, ts: i64, value: f64) -> String {
    format!(r#"{{"sensor":"{sensor}","ts":{ts},"value":{value}}}"#)
}

/// What `got` received, not retained, on topics under `prefix` about
/// `series`.
fn of_series(got: &Received, prefix: &str, series: &str) -> Vec<Value> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(t, v, retained)| t.starts_with(prefix) && v["series"] == series && !retained)
        .map(|(_, v, _)| v.clone())
        .collect()
}

/// Publishes `sensor`'s reading at QoS 1 to `sensors/<sensor>` (a `/` in
/// its id as `-`: one topic level).
async fn send(publisher: &Publisher, sensor: &str, ts: i64, value: f64) {
    let topic = format!("sensors/{}", sensor.replace('/', "-"));
    publisher
        .publish(&topic, QoS::AtLeastOnce, reading(sensor, ts, value))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_aggregates_alert_raise_and_clear_and_a_clean_sigterm() {
    let broker = Broker::start("e2e");
    let metrics_port = sluice_tests::free_port();
    let (_dir, config) = temp_file(
        "e2e.toml",
        &format!(
            r#"
agent_id = "e2e"
workers = 2

[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "sluice-e2e-in"
topics = ["sensors/+"]

[[rules]]
match = "s-*"
window = {{ kind = "tumbling", size_ms = 1000 }}
quantiles = [0.5, 0.99]
anomaly = {{ alpha = 0.1, k = 4.0, clear_k = 2.0, warmup = 10 }}

[output.mqtt]
host = "127.0.0.1"
port = {port}

[metrics]
listen = "127.0.0.1:{metrics}"
stats_interval_s = 1
"#,
            port = broker.port,
            metrics = metrics_port
        ),
    );
    let got = subscribe(broker.port, "sluice/e2e/#").await;
    let mut agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "e2e-publisher");

    await_agent(&publisher, &got, &agent, "e2e").await;

    // s-1: two known windows, then one reading that closes the second and
    // stays open itself; malformed messages in between change nothing.
    let base = (now_ms() - 60_000) / 1000 * 1000;
    let mut messages: Vec<String> = vec![];
    for (dt, v) in [
        (100, 1.0),
        (200, 2.0),
        (300, 3.0),
        (400, 4.0),
        (1_100, 10.0),
        (1_900, 20.0),
    ] {
        messages.push(reading("s-1", base + dt, v));
    }
    messages.insert(3, "{not json".into());
    messages.insert(5, r#"{"sensor":"s-1","ts":1,"value":"NaN"}"#.into());
    messages.push(reading("s-1", base + 2_500, 7.0));
    // s-2: a noisy baseline, a spike, and back to normal.
    let b2 = base + 10_000;
    for i in 0..30 {
        messages.push(reading(
            "s-2",
            b2 + i * 10,
            if i % 2 == 0 { 19.0 } else { 21.0 },
        ));
    }
    messages.push(reading("s-2", b2 + 300, 60.0));
    messages.push(reading("s-2", b2 + 310, 20.0));
    for m in messages {
        publisher.publish("sensors/s-x", QoS::AtLeastOnce, m).await;
    }

    let find = |topic: &str| -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, _, r)| t == topic && !r)
            .map(|(_, v, _)| v.clone())
            .collect()
    };
    wait_until("both s-1 windows", &agent, || {
        find("sluice/e2e/agg/s-1").len() >= 2
    })
    .await;
    let aggs = find("sluice/e2e/agg/s-1");
    let first = &aggs[0];
    assert_eq!(first["start"], base);
    assert_eq!(first["end"], base + 1000);
    assert_eq!(first["count"], 4);
    assert_eq!(first["sum"], 10.0);
    assert_eq!(first["mean"], 2.5);
    assert_eq!(
        (first["min"].clone(), first["max"].clone()),
        (1.0.into(), 4.0.into())
    );
    assert_eq!(
        (first["first"].clone(), first["last"].clone()),
        (1.0.into(), 4.0.into())
    );
    assert_eq!(first["partial"], false);
    let p50 = first["quantiles"]["p50"].as_f64().unwrap();
    assert!((p50 - 2.0).abs() <= 0.02, "{first}");
    let p99 = first["quantiles"]["p99"].as_f64().unwrap();
    assert!((2.97..=4.04).contains(&p99), "{first}");
    assert_eq!(first["agent"], "e2e");
    let second = &aggs[1];
    assert_eq!(
        (
            second["start"].clone(),
            second["count"].clone(),
            second["sum"].clone()
        ),
        (Value::from(base + 1000), 2.into(), 30.0.into())
    );

    wait_until("the alert to raise and clear", &agent, || {
        find("sluice/e2e/alerts/s-2").len() >= 2
    })
    .await;
    let alerts = find("sluice/e2e/alerts/s-2");
    assert_eq!(alerts[0]["state"], "raised");
    assert_eq!(alerts[0]["rule"], "zscore");
    assert_eq!(alerts[0]["value"], 60.0);
    assert_eq!(alerts[0]["event_ts"], b2 + 300);
    assert!(alerts[0]["score"].as_f64().unwrap() >= 4.0);
    assert_eq!(alerts[1]["state"], "cleared");
    assert_eq!(alerts.len(), 2, "no flapping: {alerts:?}");

    // Metrics: every refusal counted by reason, records and latency.
    let metrics = http_get(metrics_port, "/metrics");
    for line in [
        "sluice_readings_rejected_total{source=\"plant\",reason=\"malformed\"} 1",
        "sluice_readings_rejected_total{source=\"plant\",reason=\"too_old\"} 1",
        "sluice_alerts_raised_total 1",
        "sluice_alerts_cleared_total 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }
    assert!(metrics.contains("sluice_processing_latency_ms{quantile=\"0.99\"}"));
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_processing_latency_ms_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(count >= 3, "{metrics}");
    assert!(http_get(metrics_port, "/other").starts_with("HTTP/1.1 404"));
    // The stats message, published every second.
    wait_until("a stats message", &agent, || {
        got.lock().unwrap().iter().any(|(t, v, _)| {
            t == "sluice/e2e/stats" && v["sources"]["plant"]["rejected"]["malformed"] == 1
        })
    })
    .await;

    // A subscriber that connects now sees the current state, retained.
    let late = subscribe_retained(broker.port, "sluice/e2e/state/s-2").await;
    assert_eq!(late["state"], "cleared");

    // s-1 fell silent: the idle tick closed its last window (not partial).
    wait_until("the idle window", &agent, || {
        find("sluice/e2e/agg/s-1").len() >= 3
    })
    .await;
    let idle = &find("sluice/e2e/agg/s-1")[2];
    assert_eq!(
        (
            idle["start"].clone(),
            idle["count"].clone(),
            idle["partial"].clone()
        ),
        (Value::from(base + 2000), 1.into(), false.into())
    );

    // SIGTERM: a window still open is flushed as partial, and the exit status
    // is 0. (A reading at a window's start needs a full second of silence
    // before the idle tick would close it.)
    let processed = || metric(metrics_port, "sluice_readings_processed_total").unwrap_or(0);
    let before = processed();
    publisher
        .publish(
            "sensors/s-x",
            QoS::AtLeastOnce,
            reading("s-3", base + 5_000, 3.0),
        )
        .await;
    wait_until("the agent to take s-3", &agent, || processed() > before).await;
    let status = agent.terminate();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        agent.log()
    );
    wait_until("the partial window", &agent, || {
        !find("sluice/e2e/agg/s-3").is_empty()
    })
    .await;
    let partial = &find("sluice/e2e/agg/s-3")[0];
    assert_eq!(
        (
            partial["start"].clone(),
            partial["count"].clone(),
            partial["partial"].clone()
        ),
        (Value::from(base + 5000), 1.into(), true.into())
    );
}

/// Probes until the agent is subscribed: each probe closes the previous
/// probe's window, so an aggregate for s-probe appears once it listens.
async fn await_agent(publisher: &Publisher, got: &Received, agent: &Agent, id: &str) {
    let topic = format!("sluice/{id}/agg/s-probe");
    let mut ts = now_ms() - 120_000;
    let start = Instant::now();
    while !got.lock().unwrap().iter().any(|(t, _, _)| *t == topic) {
        assert!(
            start.elapsed() < WAIT,
            "no probe aggregate; agent log:\n{}",
            agent.log()
        );
        publisher
            .publish(
                "sensors/s-probe",
                QoS::AtLeastOnce,
                reading("s-probe", ts, 1.0),
            )
            .await;
        ts += 1000;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects, reads the one retained message on `topic`.
async fn subscribe_retained(port: u16, topic: &str) -> Value {
    let options = MqttOptions::new("e2e-late", "127.0.0.1", port);
    let (client, mut events) = AsyncClient::new(options, 16);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = events.poll().await {
                assert!(p.retain);
                return serde_json::from_slice(&p.payload).unwrap();
            }
        }
    })
    .await
    .expect("a retained state message")
}

#[test]
fn check_and_run_read_the_tables_and_name_a_bad_line() {
    // The table sits beside the configuration, named relative to it.
    let (dir, config) = temp_file(
        "tables.toml",
        "agent_id = \"x\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[tables.sensors]\npath = \"sensors.csv\"\n[[rules]]\nmatch = \"*\"\ntable = \"sensors\"\nthresholds = [{ above = \"@max\" }]\n[output]\nconsole = true\n",
    );
    let csv = dir.path().join("sensors.csv");
    let check = || {
        sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args(["check", "--quiet", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    std::fs::write(&csv, "series,max\ns-1,80\n").unwrap();
    let out = check();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --quiet, the effective configuration ends with what each
    // table holds, as TOML comments.
    let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "# tables.sensors: 1 row from {} (columns: series, max)",
            csv.display()
        )),
        "{stdout}"
    );
    toml::from_str::<toml::Table>(&stdout).expect("still TOML");
    std::fs::write(&csv, "series,max\ns-1,80\ns-1,90\n").unwrap();
    for command in ["check", "run"] {
        let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args([command, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("tables.sensors: ")
                && stderr.contains("sensors.csv line 3: \"s-1\" again (first on line 2)"),
            "{command}: {stderr}"
        );
    }
    // The outbox commands need no table: a table being edited cannot stop
    // them (here they stop for want of an [outbox], not for the table).
    let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
        .args(["outbox", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("outbox") && !stderr.contains("tables.sensors"),
        "{stderr}"
    );
}

#[test]
fn a_config_error_names_the_key_and_the_line_and_fails() {
    let (_dir, config) = temp_file(
        "bad.toml",
        "agent_id = \"x\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = -5 }\n[output]\nconsole = true\n",
    );
    for command in ["check", "run"] {
        let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args([command, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("line 7: rules[0].window"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn every_shipped_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            sluice::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1);
    sluice::config::Config::parse(sluice::demo::CONFIG).unwrap();
    let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(dir.join("sluice.example.toml"))
        .output()
        .unwrap();
    // The example names files this machine does not have: the CA file is an
    // error (the uplink could not start), the serial device a note.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("uplink.tls.ca_file: /etc/sluice/upstream-ca.pem: "),
        "{stderr}"
    );
    assert!(stderr.contains("note: "), "{stderr}");
    // The effective configuration is itself a valid configuration.
    let effective = String::from_utf8(out.stdout).unwrap();
    assert!(effective.contains("aggregate_topic = \"sluice/{agent}/agg/{series}\""));
    sluice::config::Config::parse(&effective).unwrap();
}

#[test]
fn the_demo_prints_aggregates_and_an_alert_and_stops() {
    let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--seconds", "10"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Everything fits a terminal 80 columns wide.
    assert!(stdout.lines().all(|l| l.chars().count() <= 80), "{stdout}");
    // One row per window: a clock time and eight means (or `-`).
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| {
            w.len() == 9 && w[0].len() == 8 && w[0].chars().filter(|&c| c == ':').count() == 2
        })
        .collect();
    assert!(rows.len() >= 6, "{stdout}");
    assert!(stdout.contains("window   s-0000"), "{stdout}");
    // s-0003 spikes at 7 s; s-0007 falls silent at 5 s: a `-` in its
    // column, and an `absent` alert 3 s later.
    let alert = |series: &str, rule: &str| {
        stdout.lines().any(|l| {
            l.starts_with("!! ") && l.contains(series) && l.contains(&format!("{rule} raised"))
        })
    };
    assert!(alert("s-0003", "zscore"), "{stdout}");
    assert!(alert("s-0007", "absent"), "{stdout}");
    assert!(rows.iter().any(|r| r[8] == "-"), "{stdout}");
    assert!(stdout.contains("-- final: readings "), "{stdout}");
}

/// A pipe whose reader is already gone: every write to it fails with
/// EPIPE, as when `sluice … | head -1` has read its line.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

#[test]
fn a_reader_that_goes_away_ends_a_command_quietly() {
    let dir = sluice_tests::temp_dir("e2e-pipe");
    let outbox = dir.path().join("outbox.db");
    drop(
        sluice::store::outbox::Outbox::open(
            &outbox,
            sluice::store::outbox::Durability::Full,
            sluice::store::outbox::OnCorrupt::Refuse,
            10,
            1 << 20,
        )
        .unwrap(),
    );
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"x\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"count\", size = 1 }}\n[outbox]\npath = {:?}\n[uplink]\nhost = \"127.0.0.1\"\n",
            outbox.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for args in [
        vec!["check", "--config", config],
        vec!["outbox", "status", "--config", config],
        vec!["outbox", "dead-letters", "--config", config],
        vec!["demo", "--print-config"],
        vec!["demo", "--seconds", "3"],
    ] {
        let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args(&args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
    }
}

#[test]
fn console_lines_to_a_reader_that_went_away_stop_and_the_agent_goes_on() {
    let dir = sluice_tests::temp_dir("e2e-console");
    let outbox = dir.path().join("outbox.db");
    let port = sluice_tests::free_port();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"x\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:{port}\"\n[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"count\", size = 1 }}\n[output]\nconsole = true\n[outbox]\npath = {:?}\n[uplink]\nhost = \"127.0.0.1\"\nport = 1\n",
            outbox.display()
        ),
    )
    .unwrap();
    let mut agent = Agent::start_with_stdout(&config, closed_pipe());
    agent.wait_running();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let now = now_ms();
    for i in 0..5 {
        socket
            .send_to(
                reading("s-1", now + i, i as f64).as_bytes(),
                ("127.0.0.1", port),
            )
            .unwrap();
    }
    let start = Instant::now();
    while agent.log().matches("console output stopped").count() == 0 {
        assert!(start.elapsed() < WAIT, "{}", agent.log());
        assert!(agent.child.try_wait().unwrap().is_none(), "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every aggregate still reaches the outbox, and the agent runs on.
    let status = || {
        let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args(["outbox", "status", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    while !status().contains("backlog: 5 records") {
        assert!(start.elapsed() < WAIT, "{}\n{}", status(), agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.terminate().success(), "{}", agent.log());
    let log = agent.log();
    assert_eq!(log.matches("console output stopped").count(), 1, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

fn reload_config(broker_port: u16, metrics_port: u16, above: f64) -> String {
    format!(
        r#"
agent_id = "hup"
workers = 1

[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {broker_port}
client_id = "sluice-hup-in"
topics = ["sensors/+"]

[[rules]]
match = "s-*"
window = {{ kind = "tumbling", size_ms = 1000 }}
thresholds = [{{ above = {above} }}]

[output.mqtt]
host = "127.0.0.1"
port = {broker_port}

[metrics]
listen = "127.0.0.1:{metrics_port}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_a_threshold_keeps_series_state_and_refuses_a_bad_file() {
    let broker = Broker::start("hup");
    let metrics_port = sluice_tests::free_port();
    let (_dir, config) = temp_file("hup.toml", &reload_config(broker.port, metrics_port, 100.0));
    let got = subscribe(broker.port, "sluice/hup/#").await;
    let mut agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "hup-publisher");
    await_agent(&publisher, &got, &agent, "hup").await;
    let processed = || metric(metrics_port, "sluice_readings_processed_total").unwrap_or(0);
    let hup = |agent: &Agent| {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    };
    let find = |topic: &str| -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, _, r)| t == topic && !r)
            .map(|(_, v, _)| v.clone())
            .collect()
    };

    // 50 is under the limit of 100: no alert.
    let base = (now_ms() - 60_000) / 1000 * 1000;
    let before = processed();
    publisher
        .publish(
            "sensors/x",
            QoS::AtLeastOnce,
            reading("s-9", base + 100, 50.0),
        )
        .await;
    wait_until("the first reading", &agent, || processed() > before).await;

    // Lower the limit to 40 and reload.
    std::fs::write(&config, reload_config(broker.port, metrics_port, 40.0)).unwrap();
    hup(&agent);
    wait_until("the reload", &agent, || {
        agent.log().contains("configuration reloaded")
    })
    .await;
    publisher
        .publish(
            "sensors/x",
            QoS::AtLeastOnce,
            reading("s-9", base + 200, 50.0),
        )
        .await;
    wait_until("the alert under the new limit", &agent, || {
        !find("sluice/hup/alerts/s-9").is_empty()
    })
    .await;
    let alert = &find("sluice/hup/alerts/s-9")[0];
    assert_eq!(
        (
            alert["rule"].clone(),
            alert["state"].clone(),
            alert["threshold"].clone()
        ),
        ("threshold_above".into(), "raised".into(), 40.0.into())
    );

    // The window was unchanged, so the series kept it: both readings count.
    publisher
        .publish(
            "sensors/x",
            QoS::AtLeastOnce,
            reading("s-9", base + 1_500, 45.0),
        )
        .await;
    wait_until("the first window", &agent, || {
        !find("sluice/hup/agg/s-9").is_empty()
    })
    .await;
    let window = &find("sluice/hup/agg/s-9")[0];
    assert_eq!(
        (
            window["start"].clone(),
            window["count"].clone(),
            window["sum"].clone()
        ),
        (Value::from(base), 2.into(), 100.0.into())
    );

    // A broken file is refused; the running configuration stays.
    std::fs::write(&config, "this is = not [valid").unwrap();
    hup(&agent);
    wait_until("the refusal", &agent, || {
        agent.log().contains("new configuration rejected")
    })
    .await;
    publisher
        .publish(
            "sensors/x",
            QoS::AtLeastOnce,
            reading("s-9", base + 1_600, 10.0),
        )
        .await;
    wait_until("the clear under the kept limit", &agent, || {
        find("sluice/hup/alerts/s-9").len() >= 2
    })
    .await;
    assert_eq!(find("sluice/hup/alerts/s-9")[1]["state"], "cleared");
    assert!(agent.terminate().success());
}

#[test]
fn sigterm_is_bounded_when_the_output_broker_is_gone() {
    let (udp, dead) = (sluice_tests::free_port(), sluice_tests::free_port());
    let (_dir, config) = temp_file(
        "dead.toml",
        &format!(
            "agent_id = \"dead\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:{udp}\"\n[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"count\", size = 1 }}\n[output.mqtt]\nhost = \"127.0.0.1\"\nport = {dead}\n"
        ),
    );
    let mut agent = Agent::start(&config);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    agent.wait_running();
    // Far more records than the output queues hold, none deliverable.
    for i in 0..20_000 {
        let _ = socket.send_to(
            reading(&format!("s-{i}"), now_ms(), 1.0).as_bytes(),
            ("127.0.0.1", udp),
        );
        if i % 500 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let stopping = Instant::now();
    let status = agent.terminate();
    assert!(status.success(), "{status}: {}", agent.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(12),
        "took {:?}",
        stopping.elapsed()
    );
    let log = agent.log();
    assert!(
        log.contains("output broker unreachable at shutdown"),
        "{log}"
    );
    // One warning line for all the failed publishes, not one per record.
    assert!(log.matches("publish failed").count() <= 1, "{log}");
}

/// With the output broker gone, each of the two output connections says
/// once, by name, how many live records it held and lost at shutdown (the
/// outbox, when configured, keeps the aggregates).
#[test]
fn a_dead_output_broker_costs_one_named_line_per_connection_with_what_it_lost() {
    let (udp, dead, metrics) = (
        sluice_tests::free_port(),
        sluice_tests::free_port(),
        sluice_tests::free_port(),
    );
    let (_dir, config) = temp_file(
        "dead.toml",
        &format!(
            "agent_id = \"dead\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:{udp}\"\n[sources.m]\nkind = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {dead}\ntopics = [\"sensors/+\"]\nreconnect_min_ms = 50\nreconnect_max_ms = 100\n[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"count\", size = 1 }}\nthresholds = [{{ above = 80.0 }}]\n[output.mqtt]\nhost = \"127.0.0.1\"\nport = {dead}\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\nstats_interval_s = 0\n"
        ),
    );
    let mut agent = Agent::start(&config);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    agent.wait_running();
    // Five aggregates; an alert raised and cleared (event and retained
    // state each): four alert messages.
    let t0 = now_ms();
    for (i, value) in [1.0, 2.0, 90.0, 3.0, 4.0].into_iter().enumerate() {
        socket
            .send_to(
                reading("s-1", t0 + i as i64, value).as_bytes(),
                ("127.0.0.1", udp),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    while metric(metrics, "sluice_alerts_cleared_total") != Some(1)
        || metric(metrics, "sluice_aggregates_total") != Some(5)
        || metric(metrics, "sluice_source_disconnects_total").unwrap_or(0) < 3
    {
        assert!(start.elapsed() < WAIT, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The MQTT source is down, and says so at the unit's level (warn), once
    // for a failing stretch however often it retries; the UDP source is up.
    let text = http_get(metrics, "/metrics");
    assert!(text.contains("sluice_source_up{source=\"m\"} 0"), "{text}");
    assert!(text.contains("sluice_source_up{source=\"u\"} 1"), "{text}");
    assert!(agent.terminate().success(), "{}", agent.log());
    let log = agent.log();
    let down: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("MQTT broker unreachable"))
        .collect();
    assert_eq!(down.len(), 1, "{log}");
    assert!(down[0].contains("source=sources.m"), "{}", down[0]);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("unreachable at shutdown"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (name, lost) in [("output", 5), ("output-alerts", 4)] {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("connection=\"{name}\"")))
            .unwrap_or_else(|| panic!("no line for {name}: {log}"));
        assert!(line.contains(&format!("lost={lost}")), "{name}: {line}");
    }
}

/// A window boundary closes every series' window at once. With the output
/// stalled (its broker gone), those aggregates wait in the aggregate
/// channel, which holds one per series, while the worker goes on taking
/// readings: it takes every one, and none is shed. (With a channel smaller
/// than the boundary, the worker stopped at the boundary.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_boundary_of_many_series_does_not_stop_the_worker() {
    const SERIES: usize = 4000;
    let (udp, dead, metrics) = (
        sluice_tests::free_port(),
        sluice_tests::free_port(),
        sluice_tests::free_port(),
    );
    let (_dir, config) = temp_file(
        "boundary.toml",
        &format!(
            r#"
agent_id = "boundary"
workers = 1
max_series = {SERIES}
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[[rules]]
match = "*"
window = {{ kind = "tumbling", size_ms = 1000 }}
[output.mqtt]
host = "127.0.0.1"
port = {dead}
[metrics]
listen = "127.0.0.1:{metrics}"
"#
        ),
    );
    let agent = Agent::started_with_metrics(&config, metrics).await;
    // The second round closes SERIES windows, twice what the output
    // channels and the MQTT client's queue used to hold together.
    two_rounds_over_udp(&agent, udp, metrics, SERIES, |_| 1.0).await;
    assert_eq!(metric(metrics, "sluice_readings_shed_total"), Some(0));
    drop(agent);
}

/// Two windows of every series `s-0` … over UDP, a minute in the past, so
/// that the first closes only when the second's readings come; paced by
/// the agent's processed count (the socket's buffer is not what the callers
/// test). Returns the first window's start.
async fn two_rounds_over_udp(
    agent: &Agent,
    udp: u16,
    metrics: u16,
    series: usize,
    value: impl Fn(usize) -> f64,
) -> i64 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t0 = (now_ms() - 60_000) / 1000 * 1000;
    let mut sent = 0u64;
    for ts in [t0, t0 + 1000] {
        for chunk in (0..series).collect::<Vec<_>>().chunks(250) {
            for &i in chunk {
                let line = reading(&format!("s-{i}"), ts, value(i));
                socket.send_to(line.as_bytes(), ("127.0.0.1", udp)).unwrap();
            }
            sent += chunk.len() as u64;
            wait_until("the worker to take every reading sent", agent, || {
                metric(metrics, "sluice_readings_processed_total") == Some(sent)
            })
            .await;
        }
    }
    t0
}

/// `aggregate_batch`: the aggregates go out as JSON arrays of records on
/// one topic, at most `aggregate_batch` records a message; every record
/// arrives once, whole, and none on the per-series topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_aggregates_arrive_once_each_in_arrays_on_the_batch_topic() {
    batched_aggregates(100).await;
}

/// A batch allowed more records than 64 KiB holds is cut at 64 KiB (the
/// MQTT client refuses a larger packet, and the records in it would be
/// lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stops_at_64_kib() {
    let sizes = batched_aggregates(10_000).await;
    assert!(
        sizes.iter().any(|(_, bytes)| *bytes > 48 * 1024),
        "{sizes:?}"
    );
}

/// Runs 2,000 series' windows through an agent with `aggregate_batch =
/// batch`, checks what arrived, and returns each batch's records and bytes.
async fn batched_aggregates(batch: usize) -> Vec<(usize, usize)> {
    const SERIES: usize = 2000;
    let broker = Broker::start(&format!("batch-{batch}"));
    let (udp, metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let (_dir, config) = temp_file(
        "batch.toml",
        &format!(
            r#"
agent_id = "batch"
max_series = {SERIES}
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[[rules]]
match = "*"
window = {{ kind = "tumbling", size_ms = 1000 }}
[output.mqtt]
host = "127.0.0.1"
port = {port}
aggregate_batch = {batch}
aggregate_batch_topic = "sluice/{{agent}}/aggregates"
[metrics]
listen = "127.0.0.1:{metrics}"
"#,
            port = broker.port
        ),
    );
    let got = subscribe(broker.port, "sluice/batch/#").await;
    let agent = Agent::started_with_metrics(&config, metrics).await;
    let t0 = two_rounds_over_udp(&agent, udp, metrics, SERIES, |i| i as f64).await;
    let first_round = |got: &Received| -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| t == "sluice/batch/aggregates")
            .flat_map(|(_, v, _)| v.as_array().cloned().unwrap_or_default())
            .filter(|r| r["start"] == t0)
            .collect()
    };
    wait_until("every first-round record", &agent, || {
        first_round(&got).len() >= SERIES
    })
    .await;
    let records = first_round(&got);
    assert_eq!(records.len(), SERIES, "a record arrived twice");
    let mut series: Vec<String> = records
        .iter()
        .map(|r| {
            let name = r["series"].as_str().unwrap().to_string();
            let i: f64 = name[2..].parse().unwrap();
            assert_eq!(
                (r["count"].as_u64(), r["sum"].as_f64()),
                (Some(1), Some(i)),
                "{r}"
            );
            name
        })
        .collect();
    series.sort();
    series.dedup();
    assert_eq!(series.len(), SERIES);
    // Each record's wait from its window's close to its batch's hand-off.
    assert!(metric(metrics, "sluice_output_delay_ms_count").unwrap() >= SERIES as u64);
    let mut sizes = Vec::new();
    for (topic, v, _) in got.lock().unwrap().iter() {
        assert!(!topic.starts_with("sluice/batch/agg/"), "{topic}");
        if topic == "sluice/batch/aggregates" {
            let n = v.as_array().expect("a batch is a JSON array").len();
            assert!((1..=batch).contains(&n), "{n} records in one message");
            let bytes = serde_json::to_vec(v).unwrap().len();
            assert!(bytes <= 64 * 1024, "{bytes} bytes in one message");
            sizes.push((n, bytes));
        }
    }
    drop(agent);
    sizes
}

/// A record too large for an MQTT packet (here: a thousand sampled
/// readings and a thousand top values with long labels, over 64 KiB) is
/// dropped by the live output with a count and a warning; the connection
/// and the other series' records go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_a_packet_is_counted_and_the_output_goes_on() {
    let broker = Broker::start("too-large");
    let (udp, metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let (_dir, config) = temp_file(
        "too-large.toml",
        &format!(
            r#"
agent_id = "big"
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
json = {{ labels = ["tag"] }}
[[rules]]
match = "big"
window = {{ kind = "tumbling", size_ms = 1000 }}
sample = {{ k = 1000 }}
top_k = {{ label = "tag", k = 1000 }}
[[rules]]
match = "*"
window = {{ kind = "tumbling", size_ms = 1000 }}
[output.mqtt]
host = "127.0.0.1"
port = {port}
[metrics]
listen = "127.0.0.1:{metrics}"
"#,
            port = broker.port
        ),
    );
    let got = subscribe(broker.port, "sluice/big/agg/#").await;
    let agent = Agent::started_with_metrics(&config, metrics).await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t0 = (now_ms() - 60_000) / 1000 * 1000;
    let mut sent = 0u64;
    let mut send = |line: String| {
        socket.send_to(line.as_bytes(), ("127.0.0.1", udp)).unwrap();
        sent += 1;
        sent
    };
    // Three windows of "small", and in the first two 1,500 readings of "big"
    // with distinct 60-byte tags: its records are far over 64 KiB.
    for w in 0..3 {
        let ts = t0 + w * 1000;
        send(reading("small", ts, w as f64));
        if w < 2 {
            for i in 0..1500 {
                let n = send(format!(
                    r#"{{"sensor":"big","ts":{},"value":{i},"tag":"{:060}"}}"#,
                    ts + (i % 1000),
                    i
                ));
                if n % 250 == 0 {
                    wait_until("the worker to take the readings", &agent, || {
                        metric(metrics, "sluice_readings_processed_total") == Some(n)
                    })
                    .await;
                }
            }
        }
    }
    // The third window of "small" closes the second: both of its records
    // before it arrive, and the connection stayed up for them.
    let small = |got: &Received| of_series(got, "sluice/big/agg/", "small");
    wait_until("small's first two windows", &agent, || {
        small(&got).len() >= 2
    })
    .await;
    assert_eq!(
        small(&got)
            .iter()
            .map(|r| r["start"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![t0, t0 + 1000]
    );
    wait_until("both oversized records counted", &agent, || {
        metric(metrics, "sluice_output_too_large_total") == Some(2)
    })
    .await;
    assert!(of_series(&got, "sluice/big/agg/", "big").is_empty());
    assert!(agent.log().contains("too large"), "{}", agent.log());
    assert_eq!(metric(metrics, "sluice_publish_errors_total"), Some(0));
    drop(agent);
}

/// The `--help` text shipped in the package's docs
/// (`/usr/share/doc/sluice/sluice-help.txt`) is the binary's own;
/// `SLUICE_BLESS=1` rewrites the file.
#[test]
fn the_packaged_help_text_is_current() {
    let mut text = String::new();
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["outbox", "--help"],
        &["demo", "--help"],
    ] {
        let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        text.push_str(&format!("$ sluice {}\n", args.join(" ")));
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        text.push('\n');
    }
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/deb/sluice-help.txt");
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap_or_default(),
        text,
        "packaging/deb/sluice-help.txt is stale: rerun with SLUICE_BLESS=1"
    );
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn idle_metrics_connections_cannot_take_the_agents_descriptors() {
    let metrics = sluice_tests::free_port();
    let (_tmp, config) = temp_file(
        "fds",
        &format!(
            "agent_id = \"fds\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\nstats_interval_s = 0\n[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"count\", size = 1 }}\n[output]\nconsole = true\n"
        ),
    );
    let log = config.with_extension("log");
    let agent = sluice_tests::start_agent(env!("CARGO_BIN_EXE_sluice"), &config, &log);
    let start = std::time::Instant::now();
    while sluice_tests::metric(metrics, "sluice_messages_received_total").is_none() {
        assert!(
            start.elapsed() < sluice_tests::WAIT,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = open_fds(agent.id());
    // 300 clients connect and say nothing.
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", metrics)).ok())
        .collect();
    assert!(idle.len() > 250);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let during = open_fds(agent.id());
    assert!(
        during <= before + sluice::ops::metrics::MAX_CONNECTIONS + 8,
        "{before} descriptors before, {during} with 300 idle clients"
    );
    drop(idle);
    // Once the idle ones are gone (or timed out), the endpoint answers.
    let start = std::time::Instant::now();
    while sluice_tests::metric(metrics, "sluice_messages_received_total").is_none() {
        assert!(
            start.elapsed() < sluice_tests::WAIT,
            "the endpoint never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A BLE-like gateway over MQTT: 5,000 devices in one minute, ten of them
/// heard far more than the rest; the next minute 1,000 of them again and
/// 100 new ones. Per minute: the distinct count within its bounds, the true
/// top 10 in order, one `first_seen` alert per new device and none for a
/// known one; the sketch in the record is DataSketches' and merges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ble_gateway_counts_distinct_devices_finds_the_top_ten_and_reports_new_ones() {
    let broker = Broker::start("ble");
    let (dir, config) = temp_file(
        "ble.toml",
        &format!(
            r#"
agent_id = "ble"

[sources.radio]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "sluice-ble-in"
topics = ["sensors/+", "ble/+"]
json = {{ labels = ["mac"] }}

[[rules]]
match = "s-probe"
window = {{ kind = "tumbling", size_ms = 1000 }}

[[rules]]
match = "gw-*"
window = {{ kind = "tumbling", size_ms = 60000 }}
distinct = "mac"
top_k = {{ label = "mac", k = 10 }}
first_seen = {{ label = "mac" }}
sketches = true

[output.mqtt]
host = "127.0.0.1"
port = {port}
"#,
            port = broker.port,
        ),
    );
    let got = subscribe(broker.port, "sluice/ble/#").await;
    let agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "ble-publisher");
    await_agent(&publisher, &got, &agent, "ble").await;

    let minute = (now_ms() - 300_000) / 60_000 * 60_000;
    let rssi =
        |mac: &str, ts: i64| format!(r#"{{"sensor":"gw-1","ts":{ts},"mac":"{mac}","value":-70}}"#);
    let device = |i: usize| format!("AA:BB:{:02X}:{:02X}:00:01", i / 256, i % 256);
    // Minute 1: every device once, and device i < 10 another 200 - 10 i
    // times, interleaved.
    let mut first: Vec<String> = (0..5_000).map(device).collect();
    for i in 0..10 {
        for _ in 0..(200 - 10 * i) {
            first.push(device(i));
        }
    }
    let mut rng = sluice_core::rng::SplitMix64::new(5);
    for i in (1..first.len()).rev() {
        first.swap(i, rng.next_u64() as usize % (i + 1));
    }
    for (n, mac) in first.iter().enumerate() {
        let ts = minute + (n as i64 * 59_000 / first.len() as i64);
        publisher
            .publish("ble/gw-1", QoS::AtLeastOnce, rssi(mac, ts))
            .await;
    }
    // Minute 2: 1,000 known devices and 100 new ones, then a reading that
    // closes it.
    for i in 0..1_100 {
        let mac = if i < 1_000 {
            device(i * 5)
        } else {
            device(5_000 + i)
        };
        publisher
            .publish(
                "ble/gw-1",
                QoS::AtLeastOnce,
                rssi(&mac, minute + 60_000 + i as i64),
            )
            .await;
    }
    publisher
        .publish(
            "ble/gw-1",
            QoS::AtLeastOnce,
            rssi(&device(1), minute + 120_000),
        )
        .await;

    let find = |prefix: &str| -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, _, retained)| t.starts_with(prefix) && !retained)
            .map(|(_, v, _)| v.clone())
            .collect()
    };
    wait_until("two minutes of gw-1", &agent, || {
        find("sluice/ble/agg/gw-1").len() >= 2
    })
    .await;
    wait_until("every first_seen alert", &agent, || {
        find("sluice/ble/alerts/gw-1").len() >= 5_100
    })
    .await;
    let aggs = find("sluice/ble/agg/gw-1");
    let (one, two) = (&aggs[0], &aggs[1]);
    assert_eq!(one["count"], first.len());
    let d = &one["distinct"];
    let (estimate, low, high) = (
        d["estimate"].as_f64().unwrap(),
        d["low"].as_f64().unwrap(),
        d["high"].as_f64().unwrap(),
    );
    assert!(low <= 5_000.0 && 5_000.0 <= high, "{d}");
    assert!((estimate / 5_000.0 - 1.0).abs() < 0.04, "{d}");
    let top: Vec<&str> = one["top_k"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["value"].as_str().unwrap())
        .collect();
    let truth: Vec<String> = (0..10).map(device).collect();
    assert_eq!(top, truth);
    for (v, i) in one["top_k"]["values"].as_array().unwrap().iter().zip(0..) {
        let (count, over) = (
            v["count"].as_u64().unwrap(),
            v["overcount"].as_u64().unwrap(),
        );
        let true_count = 201 - 10 * i;
        assert!(count - over <= true_count && true_count <= count, "{v}");
    }
    let d2 = &two["distinct"];
    assert!(
        d2["low"].as_f64().unwrap() <= 1_100.0 && 1_100.0 <= d2["high"].as_f64().unwrap(),
        "{d2}"
    );
    // One first_seen alert per device, the first time only.
    let alerts = find("sluice/ble/alerts/gw-1");
    let mut seen: Vec<String> = alerts
        .iter()
        .map(|a| {
            assert_eq!(
                (a["rule"].as_str(), a["state"].as_str()),
                (Some("first_seen"), Some("seen"))
            );
            a["label"]["value"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(seen.len(), 5_100);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5_100);
    // The sketches are DataSketches HLL: merged, they count both minutes.
    use base64::Engine as _;
    let mut union = sluice_core::sketch::HyperLogLog::with_storage(vec![
        0u8;
        sluice_core::sketch::hll::storage_bytes(4096)
    ])
    .unwrap();
    for a in [one, two] {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a["distinct"]["sketch"].as_str().unwrap())
            .unwrap();
        let h = sluice_core::sketch::HyperLogLog::read_from(
            &bytes,
            vec![0u8; sluice_core::sketch::hll::storage_bytes(4096)],
        )
        .unwrap();
        union.merge(&h).unwrap();
    }
    assert!(
        (union.estimate() / 5_100.0 - 1.0).abs() < 0.05,
        "{}",
        union.estimate()
    );

    // What an upstream subscriber dumps: the records as JSON lines.
    let dump = dir.path().join("dump.jsonl");
    std::fs::write(&dump, format!("{one}\n{two}\n")).unwrap();
    // `sluice sketch merge` unions them, across series too.
    let out = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
        .args(["sketch", "merge", "--by", "label"])
        .arg(&dump)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("merged 2 record(s)"), "{stderr}");
    let merged: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (merged["windows"].as_u64(), merged["series_count"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(merged["estimate"].as_f64(), Some(union.estimate()));
    // Apache DataSketches' own Python library reads the same bytes: each
    // sketch to the record's estimate, and their union (the README's
    // example script) to within its bounds.
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&python)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e}"));
        assert!(
            out.status.success(),
            "{python} with the datasketches package (bash .ci/test installs it in a virtualenv; SLUICE_PYTHON names its python): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let each = run(&[
        "-c".as_ref(),
        "import base64, json, sys\nfrom datasketches import hll_sketch\nfor line in open(sys.argv[1]):\n    d = json.loads(line)['distinct']\n    print(hll_sketch.deserialize(base64.b64decode(d['sketch'])).get_estimate())".as_ref(),
        dump.as_os_str(),
    ]);
    let theirs: Vec<f64> = each.lines().map(|l| l.parse().unwrap()).collect();
    let ours = [
        one["distinct"]["estimate"].as_f64().unwrap(),
        two["distinct"]["estimate"].as_f64().unwrap(),
    ];
    for (t, o) in theirs.iter().zip(ours) {
        assert!((t / o - 1.0).abs() < 1e-9, "DataSketches {t}, Sluice {o}");
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/examples/merge_sketches.py");
    let union: Value = serde_json::from_str(&run(&[script.as_os_str(), dump.as_os_str()])).unwrap();
    let (low, high) = (
        union["low"].as_f64().unwrap(),
        union["high"].as_f64().unwrap(),
    );
    assert!(low <= 5_100.0 && 5_100.0 <= high, "{union}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_aggregate_across_series_and_workers_exactly() {
    // 40 series over two sites, on two workers (so a site's series hash to
    // both): each site's window counts and sums every member's readings.
    let broker = Broker::start("groups");
    let (_dir, config) = temp_file(
        "groups.toml",
        &format!(
            r#"
agent_id = "grp"
workers = 2

[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "sluice-groups-in"
topics = ["sensors/+"]
json = {{ labels = ["site"] }}

[[rules]]
match = "s-probe"
window = {{ kind = "tumbling", size_ms = 1000 }}

[[rules]]
match = "t-*"
group_by = "site"
group_name = "temp"
window = {{ kind = "tumbling", size_ms = 10000 }}
quantiles = [0.5]

[output.mqtt]
host = "127.0.0.1"
port = {port}
"#,
            port = broker.port,
        ),
    );
    let got = subscribe(broker.port, "sluice/grp/#").await;
    let agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "groups-publisher");
    await_agent(&publisher, &got, &agent, "grp").await;

    let base = (now_ms() - 300_000) / 10_000 * 10_000;
    let mut truth = std::collections::BTreeMap::<String, (u64, f64)>::new();
    for i in 0..2_000i64 {
        let sensor = format!("t-{}", i % 40);
        let site = if i % 40 < 25 { "north" } else { "south" };
        let value = (i % 7) as f64;
        let t = truth.entry(site.to_string()).or_default();
        t.0 += 1;
        t.1 += value;
        let ts = base + i * 4;
        publisher
            .publish(
                &format!("sensors/{sensor}"),
                QoS::AtLeastOnce,
                format!(r#"{{"sensor":"{sensor}","ts":{ts},"site":"{site}","value":{value}}}"#),
            )
            .await;
    }
    // The next window's readings close each site's first.
    for (sensor, site) in [("t-0", "north"), ("t-39", "south")] {
        publisher
            .publish(
                &format!("sensors/{sensor}"),
                QoS::AtLeastOnce,
                format!(
                    r#"{{"sensor":"{sensor}","ts":{},"site":"{site}","value":0}}"#,
                    base + 10_000
                ),
            )
            .await;
    }
    let find = |site: &str| -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, _, retained)| *t == format!("sluice/grp/agg/temp:{site}") && !retained)
            .map(|(_, v, _)| v.clone())
            .collect()
    };
    wait_until("both sites' windows", &agent, || {
        !find("north").is_empty() && !find("south").is_empty()
    })
    .await;
    for site in ["north", "south"] {
        let records = find(site);
        assert_eq!(records.len(), 1, "{records:?}");
        let r = &records[0];
        assert_eq!(r["series"], format!("temp:{site}"));
        assert_eq!(
            r["group"],
            serde_json::json!({ "by": "site", "value": site })
        );
        assert_eq!(
            (r["start"].as_i64(), r["end"].as_i64()),
            (Some(base), Some(base + 10_000))
        );
        assert_eq!(r["count"].as_u64(), Some(truth[site].0), "{r}");
        assert_eq!(r["sum"].as_f64(), Some(truth[site].1), "{r}");
        assert_eq!(r["late"], 0);
    }
    // No member is reported on its own.
    assert!(
        !got.lock()
            .unwrap()
            .iter()
            .any(|(t, _, _)| t.starts_with("sluice/grp/agg/t-")),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derived_delta_of_two_sensors_on_two_workers_is_exact() {
    // inlet and outlet hash to different workers on their own: the
    // hand-off must bring them together for the join.
    let hasher = sluice_core::hash::SeriesHasher::default();
    assert_ne!(
        hasher.shard(b"boiler/inlet", 2),
        hasher.shard(b"boiler/outlet", 2)
    );
    let broker = Broker::start("derived");
    let metrics_port = sluice_tests::free_port();
    let (_dir, config) = temp_file(
        "derived.toml",
        &format!(
            r#"
agent_id = "drv"
workers = 2

[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "sluice-derived-in"
topics = ["sensors/+"]

[[rules]]
match = "s-probe"
window = {{ kind = "tumbling", size_ms = 1000 }}

[[rules]]
match = "boiler/*"
window = {{ kind = "tumbling", size_ms = 10000 }}

[[derived]]
name = "boiler/delta"
a = "boiler/inlet"
b = "boiler/outlet"
expr = "a - b"
window_ms = 1000

[output.mqtt]
host = "127.0.0.1"
port = {port}

[metrics]
listen = "127.0.0.1:{metrics_port}"
"#,
            port = broker.port,
        ),
    );
    let got = subscribe(broker.port, "sluice/drv/#").await;
    let agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "derived-publisher");
    await_agent(&publisher, &got, &agent, "drv").await;

    let base = (now_ms() - 300_000) / 10_000 * 10_000;
    // Ten seconds: the inlet 8 readings a second, the outlet 4; a mean is
    // a sum over a power of two, so every figure below is exact.
    let (mut deltas, mut inlet_sum) = (Vec::new(), 0.0);
    for sec in 0..10i64 {
        let t = base + sec * 1000;
        let mut means = (0.0, 0.0);
        for k in 0..8i64 {
            let v = 60.0 + ((sec * 8 + k) % 5) as f64;
            means.0 += v / 8.0;
            inlet_sum += v;
            send(&publisher, "boiler/inlet", t + k * 125, v).await;
        }
        for k in 0..4i64 {
            let v = 30.0 + ((sec + k) % 3) as f64;
            means.1 += v / 4.0;
            send(&publisher, "boiler/outlet", t + k * 250 + 10, v).await;
        }
        deltas.push(means.0 - means.1);
    }
    // The next seconds close the last join window, whose pair closes the
    // derived series' window.
    for ts in [base + 10_500, base + 12_000] {
        send(&publisher, "boiler/inlet", ts, 0.0).await;
        send(&publisher, "boiler/outlet", ts, 0.0).await;
    }
    let find = |series: &str| -> Vec<Value> {
        let mut records = of_series(&got, "sluice/drv/agg/", series);
        records.retain(|v| v["start"].as_i64() == Some(base));
        records
    };
    wait_until("the derived window", &agent, || {
        !find("boiler/delta").is_empty()
    })
    .await;
    let records = find("boiler/delta");
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["series"], "boiler/delta");
    assert_eq!(r["count"].as_u64(), Some(10), "{r}");
    let sum: f64 = deltas.iter().sum();
    assert!(
        (r["sum"].as_f64().unwrap() - sum).abs() < 1e-9,
        "{r} vs {sum}"
    );
    assert_eq!(r["min"].as_f64(), deltas.iter().copied().reduce(f64::min));
    assert_eq!(r["max"].as_f64(), deltas.iter().copied().reduce(f64::max));
    // The inputs keep their own rule, in the derived series' worker.
    wait_until("the inlet's window", &agent, || {
        !find("boiler/inlet").is_empty()
    })
    .await;
    let inlet = find("boiler/inlet");
    assert_eq!(inlet.len(), 1, "{inlet:?}");
    assert_eq!(
        (inlet[0]["count"].as_u64(), inlet[0]["sum"].as_f64()),
        (Some(80), Some(inlet_sum))
    );
    // Ten seconds and the 11th (the 13th is still open).
    assert_eq!(metric(metrics_port, "sluice_join_pairs_total"), Some(11));
    assert_eq!(metric(metrics_port, "sluice_join_late_total"), Some(0));
    assert_eq!(metric(metrics_port, "sluice_join_missing_total"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_fires_once_per_occurrence_and_an_unanswered_request_after_its_bound() {
    let broker = Broker::start("patterns");
    let metrics_port = sluice_tests::free_port();
    let (_dir, config) = temp_file(
        "patterns.toml",
        &format!(
            r#"
agent_id = "pat"
workers = 2

[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "sluice-patterns-in"
topics = ["sensors/+"]

[[rules]]
match = "s-probe"
window = {{ kind = "tumbling", size_ms = 1000 }}

[[patterns]]
name = "line1/overheat-then-drop"
first = {{ match = "line1/temp", above = 80.0, clear_at = 75.0 }}
then = {{ match = "line1/pressure", below = 2.0, clear_at = 2.5 }}
within_ms = 10000

[[patterns]]
name = "pump/no-flow"
first = {{ match = "pump/on", above = 0.5 }}
then = {{ match = "pump/flow", above = 1.0 }}
within_ms = 2000
absent = true

[output.mqtt]
host = "127.0.0.1"
port = {port}

[metrics]
listen = "127.0.0.1:{metrics_port}"
"#,
            port = broker.port,
        ),
    );
    let got = subscribe(broker.port, "sluice/pat/#").await;
    let agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "patterns-publisher");
    await_agent(&publisher, &got, &agent, "pat").await;
    let alerts = |name: &str| of_series(&got, "sluice/pat/alerts/", name);
    // Three occurrences, each raised once and cleared once, among readings
    // that must not raise it: a drop with no overheat before it, a drop
    // too late, a second drop after one overheat.
    let base = now_ms() - 600_000;
    let mut t = base;
    for round in 0..3i64 {
        for (sensor, dt, v) in [
            ("line1/pressure", 0, 1.0), // no A yet (or A used)
            ("line1/pressure", 100, 3.0),
            ("line1/temp", 1_000, 85.0), // A
            ("line1/temp", 2_000, 88.0),
            ("line1/pressure", 4_000 + round * 1_000, 1.5), // B in time
            ("line1/pressure", 5_500 + round * 1_000, 1.0),
            ("line1/pressure", 7_000 + round * 1_000, 3.0), // B clears
            ("line1/pressure", 7_500 + round * 1_000, 1.0), // A was used
            ("line1/pressure", 7_600 + round * 1_000, 3.0),
            ("line1/temp", 12_000, 70.0),
            ("line1/temp", 13_000, 85.0),    // A
            ("line1/pressure", 24_000, 1.0), // 11 s later: too late
            ("line1/pressure", 24_100, 3.0),
            ("line1/temp", 25_000, 70.0),
        ] {
            send(&publisher, sensor, t + dt, v).await;
        }
        t += 30_000;
    }
    wait_until("three occurrences", &agent, || {
        alerts("line1/overheat-then-drop").len() >= 6
    })
    .await;
    let seen: Vec<(String, i64)> = alerts("line1/overheat-then-drop")
        .iter()
        .map(|a| {
            (
                a["state"].as_str().unwrap().to_string(),
                a["event_ts"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, i64)> = (0..3i64)
        .flat_map(|round| {
            let t = base + round * 30_000;
            [
                ("raised".to_string(), t + 4_000 + round * 1_000),
                ("cleared".to_string(), t + 7_000 + round * 1_000),
            ]
        })
        .collect();
    assert_eq!(seen, want);
    // A request answered in time, then one that is not: raised once the
    // agent's clock passes the bound (the readings' own times are now).
    let now = now_ms();
    send(&publisher, "pump/on", now - 3_000, 1.0).await;
    send(&publisher, "pump/on", now - 2_900, 0.0).await;
    send(&publisher, "pump/flow", now - 2_500, 2.0).await;
    send(&publisher, "pump/flow", now - 2_400, 0.0).await;
    let asked = now_ms();
    send(&publisher, "pump/on", asked, 1.0).await;
    send(&publisher, "pump/on", asked, 0.0).await;
    wait_until("the unanswered request", &agent, || {
        !alerts("pump/no-flow").is_empty()
    })
    .await;
    let raised = alerts("pump/no-flow");
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(raised[0]["state"], "raised");
    assert_eq!(raised[0]["event_ts"].as_i64(), Some(asked + 2_000));
    assert!(raised[0]["value"].is_null());
    // Not before its bound, by the agent's clock either.
    assert!(raised[0]["detected_ts"].as_i64().unwrap() >= asked + 2_000);
    // The flow comes at last: cleared.
    send(&publisher, "pump/flow", now_ms(), 3.0).await;
    wait_until("the clear", &agent, || alerts("pump/no-flow").len() >= 2).await;
    assert_eq!(alerts("pump/no-flow")[1]["state"], "cleared");
    assert_eq!(metric(metrics_port, "sluice_pattern_raised_total"), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_table_edited_by_another_process_applies_without_a_restart() {
    // The limits live in a SQLite database in WAL mode that another program
    // keeps open and updates: its commits go to the -wal file, which the
    // agent watches.
    let broker = Broker::start("sqlite-table");
    let (dir, db_path) = temp_file("assets.db", "");
    std::fs::remove_file(&db_path).unwrap();
    let db = rusqlite::Connection::open(&db_path).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE limits (series TEXT PRIMARY KEY, max REAL);
         INSERT INTO limits VALUES ('t-1', 80), ('t-2', 80);",
    )
    .unwrap();
    let config = dir.path().join("sqlite.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "sql"

[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "sluice-sqlite-in"
topics = ["sensors/+"]

[tables.limits]
path = "assets.db"
table = "limits"

[[rules]]
match = "s-probe"
window = {{ kind = "tumbling", size_ms = 1000 }}

[[rules]]
match = "t-*"
table = "limits"
thresholds = [{{ above = "@max" }}]

[output.mqtt]
host = "127.0.0.1"
port = {port}
"#,
            port = broker.port,
        ),
    )
    .unwrap();
    let got = subscribe(broker.port, "sluice/sql/#").await;
    let agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "sqlite-publisher");
    await_agent(&publisher, &got, &agent, "sql").await;
    let raised = |series: &str| of_series(&got, "sluice/sql/alerts/", series);
    // 60 is under both limits; t-2 at 90 is over its 80.
    send(&publisher, "t-1", now_ms(), 60.0).await;
    send(&publisher, "t-2", now_ms(), 90.0).await;
    wait_until("t-2's alert", &agent, || !raised("t-2").is_empty()).await;
    assert!(raised("t-1").is_empty());
    assert_eq!(raised("t-2")[0]["table"]["max"], 80.0);
    // Another program lowers t-1's limit (the connection stays open).
    db.execute("UPDATE limits SET max = 50 WHERE series = 't-1'", [])
        .unwrap();
    wait_until("the table's reload", &agent, || {
        let log = agent.log();
        log.contains("a table changed: reloading") && log.contains("rules replaced")
    })
    .await;
    send(&publisher, "t-1", now_ms(), 60.0).await;
    wait_until("t-1's alert at its new limit", &agent, || {
        !raised("t-1").is_empty()
    })
    .await;
    let alert = &raised("t-1")[0];
    assert_eq!(
        (alert["state"].as_str(), alert["threshold"].as_f64()),
        (Some("raised"), Some(50.0))
    );
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_1000_sensors_sets_each_ones_limit_and_an_edit_applies_without_a_restart() {
    // 1,000 sensors, sensor i with max_temp 50 + i / 10: each sends its
    // limit + 1 (an alert at its own limit) and sensor 0..100 also their
    // limit - 1 (none). Then the file is replaced (written beside, renamed
    // over: atomic) with limits 5 lower for sensors 0..100: without a
    // restart or SIGHUP, the same readings now raise theirs, in the same
    // windows.
    let broker = Broker::start("tables");
    let table = |lower: bool| {
        let mut csv = String::from("series,site,max_temp\n");
        for i in 0..1_000 {
            let limit = 50.0 + f64::from(i) / 10.0 - if lower && i < 100 { 5.0 } else { 0.0 };
            csv.push_str(&format!("t-{i},site-{},{limit}\n", i % 3));
        }
        csv
    };
    let (dir, csv_path) = temp_file("sensors.csv", &table(false));
    let config = dir.path().join("tables.toml");
    std::fs::write(
        &config,
        format!(
            r#"
agent_id = "tbl"
max_series = 2000

[sources.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "sluice-tables-in"
topics = ["sensors/+"]

[tables.sensors]
path = "sensors.csv"

[[rules]]
match = "s-probe"
window = {{ kind = "tumbling", size_ms = 1000 }}

[[rules]]
match = "t-*"
table = "sensors"
on_missing = "refuse"
window = {{ kind = "tumbling", size_ms = 600000 }}
thresholds = [{{ above = "@max_temp", clear_at = "@max_temp" }}]

[output.mqtt]
host = "127.0.0.1"
port = {port}
"#,
            port = broker.port,
        ),
    )
    .unwrap();
    let got = subscribe(broker.port, "sluice/tbl/#").await;
    let agent = Agent::start(&config);
    let publisher = Publisher::connect(broker.port, "tables-publisher");
    await_agent(&publisher, &got, &agent, "tbl").await;

    let base = (now_ms() - 3_000_000) / 600_000 * 600_000;
    let limit = |i: i64| 50.0 + i as f64 / 10.0;
    let send = |i: i64, ts: i64, value: f64| {
        let sensor = format!("t-{i}");
        let body = reading(&sensor, ts, value);
        let publisher = &publisher;
        async move {
            publisher
                .publish(&format!("sensors/{sensor}"), QoS::AtLeastOnce, body)
                .await
        }
    };
    for i in 0..100 {
        send(i, base + i, limit(i) - 1.0).await;
    }
    for i in 0..1_000 {
        send(i, base + 1_000 + i, limit(i) + 1.0).await;
    }
    // A sensor with no row is refused (on_missing = "refuse").
    send(5_000, base, 1_000.0).await;
    let raised = |got: &Received| -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, v, retained)| {
                t.contains("/alerts/") && !retained && v["state"] == "raised"
            })
            .map(|(_, v, _)| v.clone())
            .collect()
    };
    wait_until("1,000 alerts", &agent, || raised(&got).len() >= 1_000).await;
    for alert in raised(&got) {
        let i: i64 = alert["series"].as_str().unwrap()[2..].parse().unwrap();
        assert_eq!(alert["threshold"].as_f64(), Some(limit(i)), "{alert}");
        assert_eq!(alert["value"].as_f64(), Some(limit(i) + 1.0), "{alert}");
    }
    // Back under: each clears.
    for i in 0..100 {
        send(i, base + 2_000 + i, limit(i) - 1.0).await;
    }
    // The edit: written beside, renamed over.
    let next = dir.path().join("sensors.csv.new");
    std::fs::write(&next, table(true)).unwrap();
    std::fs::rename(&next, &csv_path).unwrap();
    // The file watcher reloads; the workers take the new rules before the
    // next reading they pop.
    wait_until("the table's reload", &agent, || {
        let log = agent.log();
        log.contains("a table changed: reloading") && log.contains("rules replaced")
    })
    .await;
    let before = raised(&got).len();
    for i in 0..100 {
        send(i, base + 3_000 + i, limit(i) - 1.0).await;
    }
    wait_until("100 more alerts", &agent, || {
        raised(&got).len() >= before + 100
    })
    .await;
    for alert in &raised(&got)[before..] {
        let i: i64 = alert["series"].as_str().unwrap()[2..].parse().unwrap();
        assert!(i < 100, "{alert}");
        assert_eq!(alert["threshold"].as_f64(), Some(limit(i) - 5.0), "{alert}");
    }
    // A broken edit (a line with a cell too few) is refused, with its line,
    // and the running table stays.
    std::fs::write(&next, "series,site,max_temp\nt-0,site-0\n").unwrap();
    std::fs::rename(&next, &csv_path).unwrap();
    wait_until("the broken table's refusal", &agent, || {
        agent
            .log()
            .contains("sensors.csv line 2: 2 cells for 3 columns")
    })
    .await;
    // The windows went on through the edits: sensor 0's holds all four of
    // its readings, with its row from the good edit.
    send(0, base + 600_000, 0.0).await;
    let window = |got: &Received| {
        got.lock()
            .unwrap()
            .iter()
            .find(|(t, v, _)| t == "sluice/tbl/agg/t-0" && v["start"] == base)
            .map(|(_, v, _)| v.clone())
    };
    wait_until("t-0's window", &agent, || window(&got).is_some()).await;
    let w = window(&got).unwrap();
    assert_eq!(w["count"], 4, "{w}");
    assert_eq!(w["table"]["max_temp"].as_f64(), Some(45.0), "{w}");
    assert_eq!(w["table"]["site"], "site-0");
    assert!(
        !got.lock()
            .unwrap()
            .iter()
            .any(|(t, _, _)| t.ends_with("/t-5000")),
        "a sensor without a row is refused"
    );
}
