//! The systemd protocol, as a `Type=notify` service with `WatchdogSec=` sees
//! it: the agent started with `NOTIFY_SOCKET` and `WATCHDOG_USEC` sends
//! `READY=1` once its sources are up, `WATCHDOG=1` pings while it runs, and
//! `STOPPING=1` on SIGTERM; all over a real Unix datagram socket.

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// An agent with one UDP source, started with `NOTIFY_SOCKET` (a socket
/// bound in a temporary directory, read with a 200 ms timeout) and, if
/// given, `WATCHDOG_USEC`.
fn notified_agent(
    name: &str,
    watchdog_usec: Option<&str>,
) -> (
    sluice_tests::TempDir,
    UnixDatagram,
    sluice_tests::ChildGuard,
) {
    let tmp = sluice_tests::temp_dir(name);
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = tmp.path().join("notify.toml");
    std::fs::write(
        &config,
        "agent_id = \"n\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"count\", size = 1 }\n[output]\nconsole = true\n",
    )
    .unwrap();
    let mut command = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(usec) = watchdog_usec {
        command.env("WATCHDOG_USEC", usec);
    }
    let agent = sluice_tests::ChildGuard(command.spawn().unwrap());
    (tmp, socket, agent)
}

#[test]
fn ready_watchdog_pings_and_stopping_reach_the_notify_socket() {
    // A 400 ms watchdog: pings every 200 ms.
    let (_tmp, socket, mut agent) = notified_agent("notify", Some("400000"));
    let mut messages = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 512];
    while messages
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "got only {messages:?}"
        );
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(messages[0].contains("READY=1"), "{messages:?}");
    assert!(
        messages[0].contains("STATUS=running: 1 sources"),
        "{messages:?}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(30), "{messages:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.contains("STOPPING=1") {
                break;
            }
            messages.push(m);
        }
    }
    assert!(agent.wait().unwrap().success());
}

/// Receives notify messages for `wait`; the longest gap between two
/// `WATCHDOG=1` pings (or since the start) and whether any came at all.
fn longest_ping_gap(socket: &UnixDatagram, wait: Duration) -> (Duration, usize) {
    let mut buf = [0u8; 512];
    let (start, mut last, mut gap, mut pings) = (Instant::now(), Instant::now(), Duration::ZERO, 0);
    while start.elapsed() < wait {
        if let Ok(n) = socket.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1")
        {
            gap = gap.max(last.elapsed());
            last = Instant::now();
            pings += 1;
        }
    }
    (gap.max(last.elapsed()), pings)
}

#[test]
fn a_store_stuck_in_sqlite_stops_the_watchdog_pings_until_it_moves_again() {
    let tmp = sluice_tests::temp_dir("stuck");
    let dir = tmp.path().to_path_buf();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (udp, db) = (sluice_tests::free_port(), dir.join("stuck.db"));
    let config = dir.join("stuck.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"st\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:{udp}\"\n[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"count\", size = 1 }}\n[outbox]\npath = \"{}\"\n[uplink]\nhost = \"127.0.0.1\"\nport = {}\n",
            db.display(),
            sluice_tests::free_port()
        ),
    )
    .unwrap();
    let _agent = sluice_tests::ChildGuard(
        sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            // A 1 s watchdog: pings every 500 ms; a SQLite call longer than
            // 1 s is stuck.
            .env("WATCHDOG_USEC", "1000000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (_, pings) = longest_ping_gap(&socket, Duration::from_secs(3));
    assert!(pings >= 2, "no pings while healthy");
    // Another process takes the file: the writer's commit waits in SQLite.
    let holder = rusqlite::Connection::open(&db).unwrap();
    holder.busy_timeout(Duration::from_secs(10)).unwrap();
    holder
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO counters VALUES ('x', 1);")
        .unwrap();
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sender
        .send_to(br#"{"sensor":"s","ts":1,"value":1}"#, ("127.0.0.1", udp))
        .unwrap();
    sender
        .send_to(
            format!(
                r#"{{"sensor":"s","ts":{},"value":1}}"#,
                sluice_tests::now_ms()
            )
            .as_bytes(),
            ("127.0.0.1", udp),
        )
        .unwrap();
    let (gap, _) = longest_ping_gap(&socket, Duration::from_secs(6));
    assert!(
        gap >= Duration::from_millis(2500),
        "pings went on: longest gap {gap:?}"
    );
    // It lets go: the pings come back.
    drop(holder);
    let (_, pings) = longest_ping_gap(&socket, Duration::from_secs(8));
    assert!(pings >= 2, "no pings after the store moved again");
}

/// Without a watchdog (`Type=notify` and no `WatchdogSec=`) the agent still
/// says `READY=1`, and `STOPPING=1` on SIGTERM (it was sent by the watchdog
/// task, which does not run then), before it exits.
#[test]
fn stopping_reaches_the_notify_socket_without_a_watchdog() {
    let (_tmp, socket, mut agent) = notified_agent("notify-nowd", None);
    let mut buf = [0u8; 512];
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(30), "no READY=1");
        if let Ok(n) = socket.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("READY=1")
        {
            break;
        }
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status}");
    // Sent before the agent exited, so it waits in the socket.
    let mut got = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got.iter().any(|m| m.contains("STOPPING=1")), "{got:?}");
}
