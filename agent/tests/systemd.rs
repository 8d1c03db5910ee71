//! The systemd protocol, as a `Type=notify` service with `WatchdogSec=` sees
//! it: the agent started with `NOTIFY_SOCKET` and `WATCHDOG_USEC` sends
//! `READY=1` once its sources are up, `WATCHDOG=1` pings while it runs, and
//! `STOPPING=1` on SIGTERM; all over a real Unix datagram socket.

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn ready_watchdog_pings_and_stopping_reach_the_notify_socket() {
    let tmp = sluice_tests::temp_dir("notify");
    let dir = tmp.path().to_path_buf();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = dir.join("notify.toml");
    std::fs::write(
        &config,
        "agent_id = \"n\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"count\", size = 1 }\n[output]\nconsole = true\n",
    )
    .unwrap();
    let mut agent = sluice_tests::ChildGuard(
        sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            // A 400 ms watchdog: pings every 200 ms.
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
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
