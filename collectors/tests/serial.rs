//! The serial source through real pseudo-terminals, including the device
//! vanishing (like a USB adapter unplugged) and coming back.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{drain, one_lane, w1, wait_for};
use sluice_collectors::Reason;
use sluice_collectors::node::NodeRecord;
use sluice_collectors::serial::{SerialFormat, SerialSettings, SerialSource};
use sluice_core::link::{Deframer, MAX_FRAME, Record, encode};
use sluice_core::shed::ShedPolicy;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// A pseudo-terminal: we hold the master end; the source opens the slave
/// through a symlink, as it would open `/dev/serial/by-id/…`.
struct Pty {
    master: File,
}

impl Pty {
    /// Opens a pair and points `link` at its slave.
    fn open(link: &Path) -> Pty {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds into the out-pointers; the name,
        // termios and winsize pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        let name = std::fs::read_link(format!("/proc/self/fd/{slave}")).unwrap();
        // SAFETY: `slave` is an fd we own and close exactly once here; the
        // source opens the slave by name.
        unsafe { libc::close(slave) };
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&name, link).unwrap();
        Pty {
            // SAFETY: `master` is an fd we own; the File closes it on drop.
            master: unsafe { File::from_raw_fd(master) },
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Reads what the source wrote to the port, until `done` holds of it.
    fn read_until(&mut self, mut done: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !done(&got) {
            let n = self.master.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        got
    }
}

fn frame(record: &Record<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    let n = encode(record, &mut buf).unwrap();
    buf[..n].to_vec()
}

fn temp_link(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-serial-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("ttySLUICE")
}

fn settings(link: &Path) -> SerialSettings {
    let mut s = SerialSettings::new(link);
    s.baud = 115_200;
    s.max_line = 256;
    s.reopen_min_ms = 20;
    s.reopen_max_ms = 200;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_become_readings_and_bad_lines_are_counted() {
    let link = temp_link("lines");
    let mut pty = Pty::open(&link);
    let (handoff, mut rx, stats) = one_lane(64, ShedPolicy::DropNewest { high_water: 64 });
    let source = SerialSource::new("serial-test", settings(&link), handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    wait_for("the port to open", WAIT, || {
        stats.connects.load(Relaxed) == 1
    })
    .await;

    // A line split over two writes, CRLF endings, an over-long line, garbage.
    let first = w1("s-1", 1.5);
    let (a, b) = first.split_at(10);
    pty.send(a.as_bytes());
    pty.send(format!("{b}\r\n").as_bytes());
    pty.send(format!("{}\n", "x".repeat(1000)).as_bytes());
    pty.send(b"{not json\n");
    pty.send(format!("{}\n", w1("s-2", 2.5)).as_bytes());
    wait_for("two readings", WAIT, || stats.delivered.load(Relaxed) == 2).await;
    let got: Vec<(String, f64)> = drain(&mut rx)
        .iter()
        .map(|r| (r.series.to_string(), r.value))
        .collect();
    assert_eq!(got, [("s-1".to_string(), 1.5), ("s-2".to_string(), 2.5)]);
    assert_eq!(stats.rejected(Reason::Oversize), 1);
    assert_eq!(stats.rejected(Reason::Malformed), 1);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the source stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_is_reopened_when_the_device_comes_back() {
    let link = temp_link("replug");
    let mut pty = Pty::open(&link);
    let (handoff, mut rx, stats) = one_lane(64, ShedPolicy::DropNewest { high_water: 64 });
    let source = SerialSource::new("serial-test", settings(&link), handoff).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    wait_for("the port to open", WAIT, || {
        stats.connects.load(Relaxed) == 1
    })
    .await;
    pty.send(format!("{}\n", w1("before", 1.0)).as_bytes());
    wait_for("the first reading", WAIT, || {
        stats.delivered.load(Relaxed) == 1
    })
    .await;

    // Unplug: the device and its name disappear.
    drop(pty);
    std::fs::remove_file(&link).unwrap();
    wait_for("the loss to be noticed", WAIT, || {
        stats.disconnects.load(Relaxed) == 1
    })
    .await;
    // Several reopen attempts fail while it is gone; the source keeps going.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.connects.load(Relaxed), 1);

    // Plug back in: a new pty under the same name.
    let mut pty = Pty::open(&link);
    wait_for("the port to reopen", WAIT, || {
        stats.connects.load(Relaxed) == 2
    })
    .await;
    pty.send(format!("{}\n", w1("after", 2.0)).as_bytes());
    wait_for("the reading after the replug", WAIT, || {
        stats.delivered.load(Relaxed) == 2
    })
    .await;
    let got: Vec<String> = drain(&mut rx)
        .iter()
        .map(|r| r.series.to_string())
        .collect();
    assert_eq!(got, ["before", "after"]);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the source stops on shutdown")
        .unwrap();
    let _ = std::fs::remove_dir_all(link.parent().unwrap());
}

#[test]
fn bad_settings_name_their_key() {
    let mut s = SerialSettings::new("/dev/null");
    s.data_bits = 9;
    assert!(
        SerialSource::new(
            "x",
            s.clone(),
            one_lane(8, ShedPolicy::DropNewest { high_water: 8 }).0
        )
        .err()
        .unwrap()
        .contains("data_bits")
    );
    s.data_bits = 8;
    s.stop_bits = 3;
    assert!(s.validate().unwrap_err().contains("stop_bits"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_the_time_and_its_frames_survive_noise_damage_and_bad_ids() {
    let link = temp_link("frames");
    let mut pty = Pty::open(&link);
    let (handoff, _rx, stats) = one_lane(64, ShedPolicy::DropNewest { high_water: 64 });
    let mut settings = settings(&link);
    settings.format = SerialFormat::Frames;
    let (tx, mut nodes) = tokio::sync::mpsc::channel(16);
    let source = SerialSource::new("serial-frames", settings, handoff)
        .unwrap()
        .with_nodes(tx);
    let shutdown = CancellationToken::new();
    let before = common::now_ms();
    let task = tokio::spawn(source.run(shutdown.clone()));
    // Reading the master before the source opened the slave fails (EIO).
    wait_for("the port to open", WAIT, || {
        stats.connects.load(Relaxed) == 1
    })
    .await;

    // On opening the port the source sends the node the time.
    let sent = tokio::task::spawn_blocking(move || {
        let bytes = pty.read_until(|b| b.len() >= 18);
        (pty, bytes)
    });
    let (mut pty, bytes) = tokio::time::timeout(WAIT, sent).await.unwrap().unwrap();
    let mut d = Deframer::new();
    d.feed(&bytes);
    let Some(Ok(Record::Sync { unix_ms })) = d.next() else {
        panic!("no sync frame: {bytes:?}");
    };
    assert!((before - 1_000..=common::now_ms()).contains(&unix_ms));

    let hello = frame(&Record::Hello {
        node: "n1",
        window_ms: 1_000,
    });
    let alert = |series| {
        frame(&Record::Alert {
            series,
            ts: 5,
            value: 1.0,
            score: 9.0,
            level: 6.0,
            raised: true,
        })
    };
    let mut damaged = alert("n1/s0");
    damaged[12] ^= 0x10;
    // Noise, a damaged frame, an id with a control character, then good
    // frames: only the good ones come through, the rest are counted.
    pty.send(b"\x00\xA5garbage");
    pty.send(&damaged);
    pty.send(&alert("n1/\u{7}bell"));
    pty.send(&hello);
    pty.send(&alert("n1/#"));
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(
            tokio::time::timeout(WAIT, nodes.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(
        got[0],
        NodeRecord::Hello {
            node: "n1".into(),
            window_ms: 1_000
        }
    );
    // `#` is allowed in ids, as in readings (topics escape it).
    assert!(matches!(&got[1], NodeRecord::Alert { series, .. } if series == "n1/#"));
    assert_eq!(stats.rejected(Reason::BadSeries), 1);
    assert_eq!(stats.rejected(Reason::Malformed), 1, "the damaged frame");
    assert_eq!(stats.decoded.load(Relaxed), 2);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the source stops on shutdown")
        .unwrap();
}
