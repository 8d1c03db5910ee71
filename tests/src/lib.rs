//! Integration, end-to-end and fault-injection tests that span Sluice's
//! crates live in this package's `tests/` folder and in the crates' own
//! `tests/`; this library holds what they share: a real Mosquitto broker per
//! test, an MQTT publisher, and a power cut for SQLite files
//! ([`powercut`]). Production code never depends on it.

pub mod firmware;
pub mod powercut;

use std::time::{Duration, Instant};

/// A Mosquitto broker on 127.0.0.1, started for one test and killed on drop.
pub struct Broker {
    /// The plain listener's port.
    pub port: u16,
    /// The TLS listener's port, if any.
    pub tls_port: Option<u16>,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

pub use tempfile::TempDir;

/// A fresh directory under the system's temporary directory, named
/// `sluice-<name>-<random>`; it and everything in it are removed when it is
/// dropped, also when the test fails.
pub fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("sluice-{name}-"))
        .tempdir()
        .expect("a temporary directory")
}

/// Where Mosquitto is installed, if it is: Debian puts it in /usr/sbin,
/// which a non-root PATH may lack, so that is looked at before PATH.
pub fn mosquitto_program() -> Option<std::path::PathBuf> {
    let sbin = ["/usr/sbin", "/usr/local/sbin"].map(std::path::PathBuf::from);
    let path = std::env::var_os("PATH").unwrap_or_default();
    sbin.into_iter()
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("mosquitto"))
        .find(|p| p.is_file())
}

/// A port on 127.0.0.1 that is free for TCP and for UDP (bound both ways
/// and released; the broker or the agent binds it again), and that this
/// process has not handed out before: tests run in parallel threads, and
/// the kernel may offer a released port again before the test it went to
/// has bound it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Option<std::collections::HashSet<u16>>> =
        std::sync::Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(Default::default);
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP port");
        let port = tcp.local_addr().expect("its address").port();
        if !given.contains(&port) && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
}

impl Broker {
    /// Starts a plain broker.
    pub fn start(name: &str) -> Broker {
        Self::start_with(name, None)
    }

    /// Starts a broker with a plain listener and, given `(ca, cert, key)` PEM
    /// files, a TLS listener.
    pub fn start_with(
        name: &str,
        tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
    ) -> Broker {
        Self::start_full(name, tls, false)
    }

    /// Starts a broker that keeps sessions and queued messages in a file
    /// across a [`Broker::stop`] and [`Broker::restart`].
    pub fn start_persistent(name: &str) -> Broker {
        Self::start_full(name, None, true)
    }

    /// Starts a plain broker with `extra` lines appended to its
    /// configuration (e.g. `set_tcp_nodelay true` for latency benchmarks).
    pub fn start_configured(name: &str, extra: &str) -> Broker {
        Self::start_full_with(name, None, false, extra)
    }

    /// [`Broker::start_persistent`] with `extra` configuration lines.
    pub fn start_persistent_configured(name: &str, extra: &str) -> Broker {
        Self::start_full_with(name, None, true, extra)
    }

    fn start_full(
        name: &str,
        tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
        persistent: bool,
    ) -> Broker {
        Self::start_full_with(name, tls, persistent, "")
    }

    fn start_full_with(
        name: &str,
        tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
        persistent: bool,
        extra: &str,
    ) -> Broker {
        let dir = std::env::temp_dir().join(format!("sluice-mqtt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut broker = Broker {
            port: free_port(),
            tls_port: tls.map(|_| free_port()),
            dir,
            child: None,
        };
        let persistence = if persistent {
            format!(
                "persistence true\npersistence_location {}/\n",
                broker.dir.display()
            )
        } else {
            "persistence false\n".to_string()
        };
        // A test subscriber may fall behind a burst of QoS 1 messages (5,100
        // alerts in the BLE test): the broker holds them rather than drop
        // past its default of 1,000 queued per client.
        let mut conf = format!(
            "per_listener_settings false\nallow_anonymous true\nmax_queued_messages 100000\n{persistence}user root\nlistener {} 127.0.0.1\n",
            broker.port
        );
        if let (Some((ca, cert, key)), Some(port)) = (tls, broker.tls_port) {
            conf += &format!(
                "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
                ca.display(),
                cert.display(),
                key.display()
            );
        }
        conf += extra;
        std::fs::write(broker.dir.join("mosquitto.conf"), conf).unwrap();
        broker.restart();
        broker
    }

    /// Starts (again) on the same ports, and waits until it accepts connections.
    pub fn restart(&mut self) {
        let program = mosquitto_program().unwrap_or_else(|| "mosquitto".into());
        let child = std::process::Command::new(program)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("mosquitto.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run mosquitto ({e}); install it: apt-get install -y mosquitto")
            });
        let log = self.dir.join("mosquitto.log");
        wait_listening("mosquitto", self.child.insert(child), self.port, &log);
    }

    /// Stops the broker the way its service would (SIGTERM: it saves its
    /// persistence file, if it has one).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Kills the broker (SIGKILL: no goodbye to the clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the broker logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// The directory holding the broker's files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client that publishes to the broker on `port` (its event loop runs in
/// a task that ends with it).
pub struct Publisher {
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects to the broker on 127.0.0.1:`port` as `id`.
    pub fn connect(port: u16, id: &str) -> Publisher {
        let options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        let (client, mut events) = rumqttc::AsyncClient::new(options, 1024);
        let task = tokio::spawn(async move {
            loop {
                if events.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Publisher { client, task }
    }

    /// Publishes `payload` to `topic` (not retained).
    pub async fn publish(&self, topic: &str, qos: rumqttc::QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .unwrap();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Subscribes to `filter` at `qos` on the broker at 127.0.0.1:`port` as
/// client `id` and hands every message to `on_message`; returns once the broker has
/// acknowledged the subscription (SUBACK), so that nothing published after
/// it returns is missed. The client lives in a task until the test's
/// runtime ends; after a lost connection it reconnects and subscribes again
/// (with `clean_session = false` the broker keeps what arrives meanwhile).
pub async fn subscribe(
    port: u16,
    id: &str,
    filter: &str,
    qos: rumqttc::QoS,
    clean_session: bool,
    mut on_message: impl FnMut(rumqttc::Publish) + Send + 'static,
) {
    use rumqttc::{Event, Packet};
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_clean_session(clean_session);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 1024);
    let (acked, subscribed) = tokio::sync::oneshot::channel();
    let mut acked = Some(acked);
    let topic_filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // The request queue has room: it holds nothing else.
                    let _ = client.try_subscribe(&topic_filter, qos);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(acked) = acked.take() {
                        let _ = acked.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_message(p),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed)
        .await
        .unwrap_or_else(|_| panic!("no SUBACK for {filter:?} from the broker on port {port}"))
        .expect("the subscriber task ended");
}

/// A CA named after `name`, and a server certificate for 127.0.0.1 and
/// localhost signed by it, written as PEM files into `dir`: (CA, certificate,
/// key). Generated at test time with rcgen.
pub fn test_pki(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-server.pem")),
        dir.join(format!("{name}-server.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

/// The body of `GET path` on 127.0.0.1:`port` (the whole response when the
/// status is not 200).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_owned(),
        _ => response,
    }
}

/// The sum over all label sets of the Prometheus metric `name` served on
/// 127.0.0.1:`port`/metrics, or `None` if it is not there.
pub fn metric(port: u16, name: &str) -> Option<u64> {
    let text = http_get(port, "/metrics");
    let values: Vec<u64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A command for one of our own binaries (`env!("CARGO_BIN_EXE_…")`, or the
/// test binary itself). When the tests run under emulation (another
/// architecture's binaries through `qemu-user`, with no binfmt handler
/// registered), `SLUICE_TEST_RUNNER` holds the runner, e.g.
/// `qemu-aarch64 -L /usr/aarch64-linux-gnu`, and the binary is started
/// through it.
pub fn own_binary(path: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    match std::env::var("SLUICE_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            let mut command = std::process::Command::new(words.next().unwrap_or_default());
            command.args(words).arg(path);
            command
        }
        _ => std::process::Command::new(path),
    }
}

/// A child process that is killed and reaped when dropped, so that a test
/// that fails half-way leaves no agent running behind it.
pub struct ChildGuard(pub std::process::Child);

impl std::ops::Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// How long the agent tests wait for anything before failing.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Wall-clock milliseconds since the Unix epoch (event times in readings).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Starts the agent binary `bin` (`env!("CARGO_BIN_EXE_sluice")`) on
/// `config`, appending its log (info level) to `log`; killed when dropped.
pub fn start_agent(bin: &str, config: &std::path::Path, log: &std::path::Path) -> ChildGuard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("agent log file");
    ChildGuard(
        own_binary(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent"),
    )
}

/// Polls `done` every 25 ms until it holds; after [`WAIT`], fails with the
/// agent's log.
pub async fn wait_until(what: &str, log: &std::path::Path, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `program`, started as `child`, accepts connections on
/// 127.0.0.1:`port`; an early exit (a port taken since `free_port` released
/// it, say) fails at once, with its status and the `log` file, and so does
/// a wait longer than [`WAIT`].
fn wait_listening(
    program: &str,
    child: &mut std::process::Child,
    port: u16,
    log: &std::path::Path,
) {
    wait_ready(program, child, port, log, |_| true);
}

/// [`wait_listening`], and then until a new connection is `ready` (the
/// server says what a client's first read expects).
fn wait_ready(
    program: &str,
    child: &mut std::process::Child,
    port: u16,
    log: &std::path::Path,
    ready: impl Fn(std::net::TcpStream) -> bool,
) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let start = Instant::now();
    while !std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(&ready) {
        if let Some(status) = child.try_wait().ok().flatten() {
            panic!("{program} exited ({status}) on port {port}: {}", log());
        }
        assert!(
            start.elapsed() < WAIT,
            "{program} was not ready on port {port} within {WAIT:?}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a NATS server greets the new connection `conn` with its `INFO`
/// line. A TCP connect alone once let a test's first client in before the
/// server would talk to it (connection reset, under CI's load).
fn nats_greets(mut conn: std::net::TcpStream) -> bool {
    use std::io::Read;
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut greeting = [0u8; 5];
    conn.read_exact(&mut greeting).is_ok() && &greeting == b"INFO "
}

/// Writes `dir/<agent>.toml`: readings over UDP on 127.0.0.1:`udp`, one
/// aggregate per reading, an outbox at `dir/outbox.db` forwarded by an
/// uplink of `kind` to 127.0.0.1:`port` (16 in flight, reconnecting within
/// half a second), and `extra` after the `[uplink]` keys. Returns its path.
pub fn uplink_config(
    dir: &std::path::Path,
    agent: &str,
    udp: u16,
    kind: &str,
    port: u16,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{agent}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
agent_id = "{agent}"
[sources.u]
kind = "udp"
bind = "127.0.0.1:{udp}"
[[rules]]
match = "*"
window = {{ kind = "count", size = 1 }}
[outbox]
path = "{db}"
[uplink]
kind = "{kind}"
host = "127.0.0.1"
port = {port}
max_inflight = 16
reconnect_max_ms = 500
{extra}
"#,
            db = dir.join("outbox.db").display(),
        ),
    )
    .unwrap();
    path
}

/// The README's Python script whose code block starts with `# <name>`,
/// written to `dir/<name>` so that it runs as the README gives it.
pub fn readme_script(dir: &std::path::Path, name: &str) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let script = readme
        .split("```python\n")
        .find(|b| b.starts_with(&format!("# {name}")))
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("README: the {name} block"));
    std::fs::write(dir.join(name), script).unwrap();
}

/// Runs Python (`SLUICE_PYTHON`, else `python3`: the virtualenv `.ci/test`
/// makes has the packages the README's scripts use) with `args` in `dir`,
/// and returns what it printed; panics with its errors if it fails.
pub fn python(dir: &std::path::Path, args: &[&str]) -> String {
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e})"));
    assert!(
        out.status.success(),
        "{python} {args:?} (bash .ci/test installs its packages; SLUICE_PYTHON names its python): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends readings `from..from + n` as JSON datagrams to 127.0.0.1:`port`,
/// each from the next sensor of `ids` in turn with its index as value,
/// pausing every 50 so that the kernel's receive buffer is not the subject.
pub fn send_readings(udp: &std::net::UdpSocket, port: u16, ids: &[&str], from: usize, n: usize) {
    for i in from..from + n {
        let reading = format!(
            r#"{{"sensor":"{}","ts":{},"value":{i}}}"#,
            ids[i % ids.len()],
            now_ms()
        );
        udp.send_to(reading.as_bytes(), ("127.0.0.1", port))
            .unwrap();
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Twenty runs of the agent `bin` with `config` (a UDP source on
/// `udp_port`), each sent 100 readings and killed under load (SIGKILL).
/// Every other run dies by itself (abort, as `kill -9`) right after the
/// upstream acknowledged a batch and before the outbox deleted it, so the
/// next run sends those records again; the others are killed at a
/// different point of their sending each time. Returns the readings sent.
pub fn twenty_kill_9s(
    bin: &str,
    config: &std::path::Path,
    log: &std::path::Path,
    udp_port: u16,
) -> usize {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0;
    for round in 0..20 {
        let mut agent = if round % 2 == 0 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            ChildGuard(
                own_binary(bin)
                    .args(["run", "--config"])
                    .arg(config)
                    .env("SLUICE_CRASH_AT", "ack.before_delete:2")
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            )
        } else {
            start_agent(bin, config, log)
        };
        // Until its source is bound: a datagram before that is lost, not
        // committed, and would be counted as a gap.
        std::thread::sleep(Duration::from_millis(300));
        send_readings(&udp, udp_port, &["s-0", "s-1", "s-2"], sent, 100);
        sent += 100;
        std::thread::sleep(Duration::from_millis(20 + 15 * round));
        let _ = agent.kill();
        agent.wait().unwrap();
    }
    sent
}

/// Runs the agent `bin` with `config` until `sluice outbox status` says
/// its backlog is empty (at most twice [`WAIT`]), and returns it running.
pub fn drain_outbox(bin: &str, config: &std::path::Path, log: &std::path::Path) -> ChildGuard {
    let agent = start_agent(bin, config, log);
    let start = Instant::now();
    loop {
        let status = own_binary(bin)
            .args(["outbox", "status", "--config"])
            .arg(config)
            .output()
            .unwrap();
        if String::from_utf8_lossy(&status.stdout).contains("backlog: 0 records") {
            return agent;
        }
        assert!(
            start.elapsed() < WAIT * 2,
            "{}; agent log:\n{}",
            String::from_utf8_lossy(&status.stdout),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `nats-server` with JetStream (Debian's `nats-server`, started with
/// `-js`) on a free port of 127.0.0.1, its store in a directory of its own
/// that survives [`NatsServer::restart`]; stopped when dropped.
pub struct NatsServer {
    /// Its client port.
    pub port: u16,
    dir: TempDir,
    conf_extra: String,
    child: Option<std::process::Child>,
}

impl NatsServer {
    /// Starts one; `conf` is added to its configuration file (e.g. a `tls`
    /// block).
    pub fn start(name: &str, conf: &str) -> NatsServer {
        let mut server = NatsServer {
            port: free_port(),
            dir: temp_dir(&format!("nats-{name}")),
            conf_extra: conf.to_string(),
            child: None,
        };
        server.restart();
        server
    }

    /// Its directory (for certificates the test writes beside it).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Starts it (again) on the same port and store, and waits until it
    /// accepts connections.
    pub fn restart(&mut self) {
        let store = self.dir.path().join("store");
        let conf = format!(
            "listen: \"127.0.0.1:{}\"\njetstream {{\n  store_dir: \"{}\"\n}}\n{}\n",
            self.port,
            store.display(),
            self.conf_extra
        );
        let conf_path = self.dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let program = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = std::process::Command::new(program)
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("nats.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run nats-server ({e}); install it: apt-get install -y nats-server")
            });
        let log = self.dir.path().join("nats.log");
        wait_ready(
            "nats-server",
            self.child.insert(child),
            self.port,
            &log,
            nats_greets,
        );
    }

    /// Stops it (SIGKILL: an outage, not a shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Kafka-protocol broker on a free port of 127.0.0.1: tansu (built from
/// crates.io by `.ci/test`; `SLUICE_TANSU` names the program, else `tansu`
/// on the PATH), its log in an SQLite file of its own directory that
/// survives [`KafkaBroker::restart`]; stopped when dropped.
pub struct KafkaBroker {
    /// Its port (with TLS, the TLS front's).
    pub port: u16,
    /// The port tansu itself listens on (`port` without TLS).
    listen: u16,
    dir: TempDir,
    child: Option<std::process::Child>,
    _front: Option<TlsFront>,
}

impl KafkaBroker {
    /// Starts one; with `tls` = (certificate, key) clients reach it only
    /// through TLS: tansu 0.6's command line cannot take both `--cert` and
    /// `--key` (they share one exclusive argument group), so a TLS front
    /// ([`TlsFront`]) on `port` forwards to tansu on a port of its own, and
    /// tansu advertises the front's port in its metadata.
    pub fn start(name: &str, tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> KafkaBroker {
        let port = free_port();
        let (listen, front) = match tls {
            Some((cert, key)) => {
                let listen = free_port();
                (listen, Some(TlsFront::start(port, listen, &cert, &key)))
            }
            None => (port, None),
        };
        let mut broker = KafkaBroker {
            port,
            listen,
            dir: temp_dir(&format!("kafka-{name}")),
            child: None,
            _front: front,
        };
        broker.restart();
        broker
    }

    /// `127.0.0.1:<port>`, as clients bootstrap from it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and log, and waits until it
    /// accepts connections.
    pub fn restart(&mut self) {
        let program = std::env::var("SLUICE_TANSU").unwrap_or_else(|_| "tansu".into());
        let log = self.dir.path().join("tansu.log");
        let child = std::process::Command::new(&program)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://127.0.0.1:{}", self.listen)])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            // Relative to its working directory.
            .args(["--storage-engine", "sqlite://log.db"])
            .current_dir(self.dir.path())
            .stdout(std::fs::File::create(self.dir.path().join("tansu.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {program} ({e}); install it: cargo install tansu --version 0.6.0 --features libsql --locked (or run .ci/test, which does)"
                )
            });
        wait_listening("tansu", self.child.insert(child), self.listen, &log);
    }

    /// Stops it (SIGKILL: an outage, not a shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP server on 127.0.0.1 that hands each connection to a task of its
/// own, on a thread of its own (a current-thread runtime); stopped, with its
/// connections closed, when dropped.
struct Front {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Front {
    /// Listens on `port` (when this returns) and runs `serve` on each
    /// connection.
    fn start<F, Fut>(port: u16, serve: F) -> Front
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (client, _) = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                    };
                    tokio::spawn(serve(client));
                }
            });
        });
        Front {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TLS server on 127.0.0.1:`port` (the certificate and key given) that
/// forwards each connection, decrypted, to 127.0.0.1:`backend`; on a thread
/// of its own, stopped when dropped.
pub struct TlsFront {
    _front: Front,
}

impl TlsFront {
    /// Starts one, listening when this returns.
    pub fn start(
        port: u16,
        backend: u16,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        TlsFront {
            _front: Front::start(port, move |client| {
                let acceptor = acceptor.clone();
                async move {
                    // A handshake the client refuses ends here.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    if let Ok(mut plain) =
                        tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                }
            }),
        }
    }
}

/// A slow downlink on 127.0.0.1:`port` in front of 127.0.0.1:`backend`:
/// what the client sends goes through as it comes; what the server sends
/// back reaches the client a few bytes at a time (at most `chunk` bytes
/// every `pause`), as over a congested cellular link. With `chunk = 4`,
/// MQTT acknowledgements (4 bytes each) arrive one at a time, each after the
/// client has had time to act on the one before. On a thread of its own,
/// stopped (and its connections closed) when dropped.
pub struct SlowLink {
    _front: Front,
}

impl SlowLink {
    /// Starts one, listening when this returns.
    pub fn start(port: u16, backend: u16, chunk: usize, pause: Duration) -> SlowLink {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        SlowLink {
            _front: Front::start(port, move |client| async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let up = async {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                    let _ = server_tx.shutdown().await;
                };
                let down = async {
                    let mut buf = vec![0u8; chunk.max(1)];
                    while let Ok(n @ 1..) = server_rx.read(&mut buf).await {
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(pause).await;
                    }
                    let _ = client_tx.shutdown().await;
                };
                tokio::join!(up, down);
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Tests run in parallel threads of one process: a port handed to one
    /// test must not be handed to another before that test binds it, and a
    /// UDP source needs the port free for UDP, not only TCP.
    #[test]
    fn free_port_never_repeats_and_is_free_for_tcp_and_udp() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let port = super::free_port();
            assert!(seen.insert(port), "port {port} handed out twice");
        }
        let port = super::free_port();
        std::net::UdpSocket::bind(("127.0.0.1", port)).expect("free for UDP");
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("free for TCP");
    }
}
