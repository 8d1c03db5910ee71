//! The UDP source over real sockets on 127.0.0.1.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{drain, one_lane, w1, wait_for};
use sluice_collectors::Reason;
use sluice_collectors::udp::{UdpSettings, UdpSource};
use sluice_core::shed::ShedPolicy;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

async fn start(
    settings: UdpSettings,
    capacity: usize,
    policy: ShedPolicy,
) -> (
    std::net::SocketAddr,
    sluice_collectors::ReadingConsumer,
    std::sync::Arc<sluice_collectors::SourceStats>,
    CancellationToken,
) {
    let (handoff, rx, stats) = one_lane(capacity, policy);
    let source = UdpSource::bind("udp-test", settings, handoff)
        .await
        .unwrap();
    let addr = source.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(source.run(shutdown.clone()));
    (addr, rx, stats, shutdown)
}

async fn sender() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Sends `messages` in chunks of 50, waiting for the source to have received
/// each chunk, so that the kernel's socket buffer never overflows (a loss the
/// source could not see) however slow a debug build on a busy machine is.
async fn send_paced(
    tx: &UdpSocket,
    addr: std::net::SocketAddr,
    messages: &[String],
    stats: &sluice_collectors::SourceStats,
) {
    let base = stats.messages.load(Relaxed);
    for (i, chunk) in messages.chunks(50).enumerate() {
        for m in chunk {
            tx.send_to(m.as_bytes(), addr).await.unwrap();
        }
        let sent = (i * 50 + chunk.len()) as u64;
        wait_for("a chunk to arrive", WAIT, || {
            stats.messages.load(Relaxed) >= base + sent
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_ring_sheds_with_exact_counts() {
    let settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
    let (addr, mut rx, stats, shutdown) =
        start(settings, 64, ShedPolicy::DropNewest { high_water: 48 }).await;
    let tx = sender().await;
    let burst: Vec<String> = (0..300)
        .map(|i| w1(&format!("s-{i:04}"), f64::from(i)))
        .collect();
    send_paced(&tx, addr, &burst, &stats).await;
    assert_eq!(stats.messages.load(Relaxed), 300);
    // Memory stayed bounded: the ring holds what the high-water mark allows;
    // everything else was shed and counted.
    assert_eq!(stats.decoded.load(Relaxed), 300);
    assert_eq!(stats.delivered.load(Relaxed), 48);
    assert_eq!(stats.shed_high_water.load(Relaxed), 252);
    assert_eq!(stats.shed_total(), 252);
    let got = drain(&mut rx);
    assert_eq!(got.len(), 48);
    // Drop-newest keeps the oldest, in order.
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.series.as_str(), format!("s-{i:04}"));
        assert_eq!(r.value, i as f64);
    }
    // Once drained, readings flow again.
    tx.send_to(w1("after", 1.0).as_bytes(), addr).await.unwrap();
    wait_for("the reading after the burst", WAIT, || {
        stats.delivered.load(Relaxed) == 49
    })
    .await;
    assert_eq!(drain(&mut rx)[0].series.as_str(), "after");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_one_in_k_and_marks_the_weight() {
    let settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
    let policy = ShedPolicy::Sample {
        high_water: 0,
        keep_one_in: 4,
    };
    let (addr, mut rx, stats, shutdown) = start(settings, 1024, policy).await;
    let tx = sender().await;
    let readings: Vec<String> = (0..400).map(|i| w1("s", f64::from(i))).collect();
    send_paced(&tx, addr, &readings, &stats).await;
    assert_eq!(stats.messages.load(Relaxed), 400);
    let got = drain(&mut rx);
    let delivered = stats.delivered.load(Relaxed);
    assert_eq!(got.len() as u64, delivered);
    assert_eq!(delivered + stats.shed_sampled.load(Relaxed), 400);
    assert!(got.iter().all(|r| r.weight == 4));
    // Binomial(400, 1/4): mean 100, sd 8.7.
    assert!((60..=140).contains(&delivered), "{delivered} kept");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datagrams_are_refused_by_reason_and_do_not_stop_the_source() {
    let mut settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
    settings.max_datagram = 200;
    let (addr, mut rx, stats, shutdown) =
        start(settings, 64, ShedPolicy::DropNewest { high_water: 64 }).await;
    let tx = sender().await;
    let big = format!(r#"{{"sensor":"s","pad":"{}","value":1}}"#, "x".repeat(300));
    let datagrams: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        big.into_bytes(),
        vec![0xff, 0xfe, 0x00],
        br#"{"sensor":"s","ts":1,"value":1}"#.to_vec(),
        format!("{}\n{}\r\n\n", w1("a", 1.0), w1("b", 2.0)).into_bytes(),
    ];
    for d in &datagrams {
        tx.send_to(d, addr).await.unwrap();
    }
    wait_for("both good readings", WAIT, || {
        stats.delivered.load(Relaxed) == 2
    })
    .await;
    tx.send_to(b"", addr).await.unwrap();
    wait_for("the empty datagram", WAIT, || {
        stats.rejected(Reason::Empty) == 2
    })
    .await;
    assert_eq!(stats.rejected(Reason::Malformed), 2);
    assert_eq!(stats.rejected(Reason::Oversize), 1);
    assert_eq!(stats.rejected(Reason::TooOld), 1);
    // The blank line of the last datagram, and the empty datagram.
    assert_eq!(stats.rejected(Reason::Empty), 2);
    assert_eq!(stats.rejected_total(), 6);
    assert_eq!(stats.messages.load(Relaxed), 8);
    let got: Vec<String> = drain(&mut rx)
        .iter()
        .map(|r| r.series.to_string())
        .collect();
    assert_eq!(got, ["a", "b"]);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_outside_the_allow_list_are_refused() {
    let mut settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
    settings.allow = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    let (addr, mut rx, stats, shutdown) =
        start(settings, 64, ShedPolicy::DropNewest { high_water: 64 }).await;
    let tx = sender().await;
    for _ in 0..5 {
        tx.send_to(w1("s", 1.0).as_bytes(), addr).await.unwrap();
    }
    wait_for("5 refusals", WAIT, || {
        stats.rejected(Reason::SenderNotAllowed) == 5
    })
    .await;
    assert_eq!(stats.delivered.load(Relaxed), 0);
    assert!(drain(&mut rx).is_empty());
    shutdown.cancel();

    let mut settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
    settings.allow = vec!["127.0.0.0/8".parse().unwrap()];
    let (addr, _rx, stats, shutdown) =
        start(settings, 64, ShedPolicy::DropNewest { high_water: 64 }).await;
    tx.send_to(w1("s", 1.0).as_bytes(), addr).await.unwrap();
    wait_for("the allowed reading", WAIT, || {
        stats.delivered.load(Relaxed) == 1
    })
    .await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_the_kernel_drops_from_a_full_buffer_are_counted() {
    // The source is bound but not reading yet: a burst overflows the
    // socket's receive buffer and the kernel drops the rest.
    let (handoff, mut rx, stats) = one_lane(4096, ShedPolicy::DropNewest { high_water: 4096 });
    let source = UdpSource::bind(
        "udp-drops",
        UdpSettings::new("127.0.0.1:0".parse().unwrap()),
        handoff,
    )
    .await
    .unwrap();
    let addr = source.local_addr().unwrap();
    let tx = sender().await;
    let sent = 5_000u64;
    for i in 0..sent {
        tx.send_to(w1(&format!("s-{}", i % 10), 1.0).as_bytes(), addr)
            .await
            .unwrap();
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(source.run(shutdown.clone()));
    // Every datagram sent is either read or counted as dropped by the kernel
    // (loopback loses nothing else).
    wait_for("every datagram read or counted as dropped", WAIT, || {
        stats.messages.load(Relaxed) + stats.kernel_drops.load(Relaxed) == sent
    })
    .await;
    let drops = stats.kernel_drops.load(Relaxed);
    assert!(drops > 0, "the burst did not overflow the buffer");
    assert_eq!(drain(&mut rx).len() as u64, sent - drops);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_buffer_asks_the_kernel_for_a_larger_buffer() {
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
    let want = 1 << 20;
    settings.recv_buffer = Some(want);
    settings.validate().unwrap();
    let (handoff, _rx, _stats) = one_lane(64, ShedPolicy::DropNewest { high_water: 64 });
    let source = UdpSource::bind("udp-rcvbuf", settings.clone(), handoff)
        .await
        .unwrap();
    // Linux grants up to net.core.rmem_max and reports twice the grant.
    assert_eq!(source.recv_buffer_size().unwrap(), 2 * want.min(rmem_max));
    // The source still receives.
    let addr = source.local_addr().unwrap();
    let (handoff, mut rx, stats) = one_lane(64, ShedPolicy::DropNewest { high_water: 64 });
    drop(source);
    let source = UdpSource::bind(
        "udp-rcvbuf",
        UdpSettings {
            bind: addr,
            ..settings.clone()
        },
        handoff,
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(source.run(shutdown.clone()));
    sender()
        .await
        .send_to(w1("s-1", 1.0).as_bytes(), addr)
        .await
        .unwrap();
    wait_for("the reading", WAIT, || stats.delivered.load(Relaxed) == 1).await;
    assert_eq!(drain(&mut rx).len(), 1);
    shutdown.cancel();
    // Out of range: refused by validate, naming the key.
    settings.recv_buffer = Some(100);
    assert!(settings.validate().unwrap_err().contains("recv_buffer"));
}

/// One datagram of a random mix, and how many messages (lines) it holds.
fn datagram(kind: u8, i: usize) -> (Vec<u8>, u64) {
    let good = || w1(&format!("s-{}", i % 5), i as f64);
    match kind {
        0 => (good().into_bytes(), 1),
        1 => (b"{not json".to_vec(), 1),
        2 => (Vec::new(), 1),
        3 => (b"\n".to_vec(), 1),
        4 => (format!("{}\n\n{}\n", good(), good()).into_bytes(), 3),
        5 => (
            format!(r#"{{"sensor":"s","pad":"{}"}}"#, "x".repeat(300)).into_bytes(),
            1,
        ),
        6 => (br#"{"sensor":"bad\u0000id","ts":1,"value":1}"#.to_vec(), 1),
        _ => (br#"{"sensor":"s","ts":1}"#.to_vec(), 1),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    /// `received = accepted + refused (by reason) + shed (by reason)` for
    /// every message of a random mix of datagrams: good, malformed, empty,
    /// blank lines, oversized, a refused id, no value; into a small ring
    /// that nobody drains, so that shedding plays its part too.
    #[test]
    fn every_message_is_counted_exactly_once(kinds in proptest::collection::vec(0u8..8, 1..60)) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut settings = UdpSettings::new("127.0.0.1:0".parse().unwrap());
            settings.max_datagram = 200;
            let (addr, _rx, stats, shutdown) =
                start(settings, 16, ShedPolicy::DropNewest { high_water: 12 }).await;
            let tx = sender().await;
            let mut expected = 0;
            for (i, &kind) in kinds.iter().enumerate() {
                let (bytes, messages) = datagram(kind, i);
                expected += messages;
                tx.send_to(&bytes, addr).await.unwrap();
                // Paced: a loss in the kernel's buffer is not the source's.
                wait_for("the datagram", WAIT, || stats.messages.load(Relaxed) == expected).await;
            }
            let received = stats.messages.load(Relaxed);
            let accounted = stats.delivered.load(Relaxed) + stats.rejected_total() + stats.shed_total();
            assert_eq!(received, expected);
            assert_eq!(accounted, received, "{:?}", Reason::ALL.map(|r| (r, stats.rejected(r))));
            shutdown.cancel();
        });
    }
}
