//! W2: UDP ingest. One sender blasts 100-byte JSON readings as single
//! datagrams at 127.0.0.1 as fast as it can; the receiver is either Sluice's
//! UDP source (receive, decode, shed check, push into a ring) or a plain
//! `recvmmsg` loop that only receives (the baseline), measured in the same
//! run. The ring is large enough to hold the whole run, so nothing waits on a
//! consumer and nothing is shed unless the source falls behind its ring.
//!
//! `cargo bench -p sluice-benches --bench udp_ingest` (`DATAGRAMS` and
//! `ROUNDS` in the environment change the defaults: 400,000 and 5).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use sluice_collectors::pipe::{Handoff, reading_ring};
use sluice_collectors::udp::{UdpSettings, UdpSource};
use sluice_collectors::{Reading, SourceStats};
use sluice_core::shed::ShedPolicy;
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A 100-byte W1 reading (the value field is padded to the size).
fn datagram(i: u64, ts: i64) -> Vec<u8> {
    let mut d = format!(
        r#"{{"sensor":"s-{:04}","ts":{ts},"value":{}.5"#,
        i % 1000,
        i % 97
    )
    .into_bytes();
    while d.len() < 99 {
        d.insert(d.len() - 2, b'0');
    }
    d.push(b'}');
    d
}

/// Sends `n` datagrams to `to` as fast as one thread can: `sendmmsg` in
/// batches of 64, so that the sender outruns either receiver.
fn blast(to: SocketAddr, n: u64) -> Duration {
    use std::os::fd::AsRawFd;
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(to).unwrap();
    let ts = sluice_collectors::reading::now_ms();
    let mut payloads: Vec<Vec<u8>> = (0..1024).map(|i| datagram(i, ts)).collect();
    assert!(payloads.iter().all(|p| p.len() == 100));
    const BATCH: usize = 64;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let base = (sent % 1024) as usize / BATCH * BATCH;
        let count = (n - sent).min(BATCH as u64) as usize;
        let mut iovecs: Vec<libc::iovec> = payloads[base..base + count]
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is a valid value.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovecs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds `count` headers whose iovecs point at live
        // payloads for the whole call; the socket is connected.
        let r = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), count as u32, 0) };
        // A full socket buffer on loopback makes sends fail now and then; the
        // datagrams are lost like any other overflow, and counted as sent.
        sent += if r > 0 { r as u64 } else { count as u64 };
    }
    start.elapsed()
}

/// Sluice's source: returns (readings decoded into the ring, shed, elapsed).
fn sluice_run(n: u64) -> (u64, u64, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let capacity = (n as usize).next_power_of_two();
    let (tx, mut rx) = reading_ring(capacity).unwrap();
    let stats = Arc::new(SourceStats::default());
    let policy = ShedPolicy::DropNewest {
        high_water: capacity,
    };
    let handoff = Handoff::new(vec![tx], policy, 1, stats.clone()).unwrap();
    let settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
    let source = rt
        .block_on(UdpSource::bind("bench", settings, handoff))
        .unwrap();
    let addr = source.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = rt.spawn(source.run(shutdown.clone()));
    let receiver = std::thread::spawn(move || {
        rt.block_on(async {
            // Until the sender is done and nothing more arrives for 200 ms.
            let mut last = (0, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let seen = stats.messages.load(Relaxed);
                if seen != last.0 {
                    last = (seen, Instant::now());
                } else if shutdown.is_cancelled()
                    || last.1.elapsed() > Duration::from_millis(200) && seen > 0
                {
                    break;
                }
            }
            shutdown.cancel();
            let _ = task.await;
            (stats.delivered.load(Relaxed), stats.shed_total(), last.1)
        })
    });
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    blast(addr, n);
    let (delivered, shed, last) = receiver.join().unwrap();
    let mut popped = 0u64;
    rx.pop_each(usize::MAX, |r: Reading| popped += u64::from(r.value >= 0.0));
    assert_eq!(popped, delivered);
    (delivered, shed, last.duration_since(start))
}

/// The baseline: recvmmsg in batches of 64 on a blocking socket.
fn recvmmsg_run(n: u64) -> (u64, Duration) {
    use std::os::fd::AsRawFd;
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        const BATCH: usize = 64;
        let mut bufs = vec![[0u8; 8193]; BATCH];
        let mut iovecs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is a valid value.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovecs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let (mut got, mut last) = (0u64, Instant::now());
        loop {
            // SAFETY: `msgs` holds BATCH valid headers whose iovecs point at
            // live buffers for the whole call.
            let r = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if r <= 0 {
                break; // the read timeout: the sender is done
            }
            got += r as u64;
            last = Instant::now();
        }
        (got, last)
    });
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    blast(addr, n);
    let (got, last) = receiver.join().unwrap();
    (got, last.duration_since(start))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let n = env("DATAGRAMS", 400_000);
    let rounds = env("ROUNDS", 5);
    let (mut ours, mut base, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    println!("W2: {n} datagrams of 100 bytes per run, {rounds} paired rounds");
    for round in 0..rounds {
        let (delivered, shed, t) = sluice_run(n);
        let (received, tb) = recvmmsg_run(n);
        let (rate, rate_b) = (
            delivered as f64 / t.as_secs_f64(),
            received as f64 / tb.as_secs_f64(),
        );
        println!(
            "round {round}: sluice {delivered} readings in the ring ({:.1}% of sent, {shed} shed) at {:.0}/s; recvmmsg {received} received ({:.1}%) at {:.0}/s; ratio {:.2}",
            100.0 * delivered as f64 / n as f64,
            rate,
            100.0 * received as f64 / n as f64,
            rate_b,
            rate / rate_b
        );
        ours.push(rate);
        base.push(rate_b);
        ratios.push(rate / rate_b);
    }
    println!(
        "median: sluice {:.0} readings/s, recvmmsg {:.0} datagrams/s, paired ratio {:.2}",
        median(ours),
        median(base),
        median(ratios)
    );
}
