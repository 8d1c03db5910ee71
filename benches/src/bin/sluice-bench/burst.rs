//! The overload burst: extra publishers or one UDP sender at a multiple
//! of the load's rate, and what it cost (memory, shedding, kernel drops,
//! alert latency before, during and after).

use std::time::{Duration, Instant};

use sluice_core::rng::SplitMix64;

use crate::Args;
use crate::load::{Spikes, Workload, epoch_us, publish_all};
use crate::report::{Burst, histogram, percentiles};

/// Sends `rate` readings a second (event time now, no spikes, sensors in
/// turn) as UDP datagrams to 127.0.0.1:`port` for `duration`, paced every
/// 200 µs; returns how many it sent. Behind schedule it sends what is due
/// at once: the rate is the target's unless this thread cannot keep up.
/// With `critical_every`, every that many datagrams is a reading of a
/// critical series `c-…`; returns (sent, of them critical).
pub(crate) fn udp_burst(
    port: u16,
    rate: u64,
    sensors: u32,
    duration: Duration,
    critical_every: Option<u64>,
) -> (u64, u64) {
    use std::fmt::Write;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    socket.connect(("127.0.0.1", port)).expect("udp connect");
    let mut rng = SplitMix64::new(0xb0_57);
    let (start, mut sent, mut line) = (Instant::now(), 0u64, String::with_capacity(96));
    let mut critical = 0u64;
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let ts = epoch_us() / 1000;
        while sent < due {
            let sensor = sent % u64::from(sensors.max(1));
            let value = 20.0 + (sensor % 10) as f64 + rng.next_f64() * 2.0 - 1.0;
            let prefix = if critical_every.is_some_and(|n| sent % n.max(1) == 0) {
                critical += 1;
                "c"
            } else {
                "s"
            };
            line.clear();
            let _ = write!(
                line,
                r#"{{"sensor":"{prefix}-{sensor:04}","ts":{ts},"value":{value:.3}}}"#
            );
            // A full socket buffer drops it in the kernel (counted there);
            // ECONNREFUSED from an earlier datagram is nothing to stop for.
            let _ = socket.send(line.as_bytes());
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    (sent, critical)
}

/// `Udp: RcvbufErrors` from /proc/net/snmp: datagrams dropped because a
/// socket's receive buffer was full (0 if unreadable).
pub(crate) fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What a burst sent: when it started and ended (µs since the epoch),
/// readings, their rate, the kernel's UDP drops meanwhile, and critical
/// readings among them.
pub(crate) struct Sent {
    from: i64,
    to: i64,
    readings: u64,
    rate: f64,
    kernel_drops_system: u64,
    critical: u64,
}

/// Starts the burst a third of the way into `w`: (factor − 1) × its rate
/// for `args.burst_seconds`, from extra MQTT publishers or (with
/// `--burst-udp`) one UDP sender to the agent's `udp_port`.
pub(crate) fn start(
    w: &Workload,
    factor: u64,
    args: &Args,
    port: u16,
    udp_port: u16,
) -> tokio::task::JoinHandle<Sent> {
    let burst_at = w.duration / 3;
    let (burst_udp, critical_every) = (args.burst_udp, args.critical_every);
    let extra = Workload {
        rate: w.rate * (factor.max(2) - 1),
        spike_every: u64::MAX,
        duration: Duration::from_secs(args.burst_seconds),
        tag: "burst",
        ts_now: true,
        written: Default::default(),
        ..w.clone()
    };
    tokio::spawn(async move {
        tokio::time::sleep_until((extra.start + burst_at).into()).await;
        let extra = Workload {
            start: Instant::now(),
            epoch_start_us: epoch_us(),
            ..extra
        };
        let drops_before = udp_rcvbuf_errors();
        let (readings, critical) = if burst_udp {
            let (rate, sensors, duration) = (extra.rate, extra.sensors, extra.duration);
            tokio::task::spawn_blocking(move || {
                udp_burst(udp_port, rate, sensors, duration, critical_every)
            })
            .await
            .expect("udp burst")
        } else {
            let sent = publish_all(&extra, port, "sensors", &Spikes::default(), false)
                .await
                .readings;
            (sent, 0)
        };
        Sent {
            from: extra.epoch_start_us,
            to: epoch_us(),
            readings,
            rate: readings as f64 / extra.start.elapsed().as_secs_f64(),
            kernel_drops_system: udp_rcvbuf_errors().saturating_sub(drops_before),
            critical,
        }
    })
}

/// What the run saw that the burst's outcome reads.
pub(crate) struct Seen<'a> {
    pub(crate) shed: u64,
    pub(crate) kernel_drops: u64,
    pub(crate) critical_in_aggregates: u64,
    /// Each alert's (intended send time of its spike, latency), µs.
    pub(crate) alert_times: &'a [(i64, i64)],
    /// (µs since the epoch, RSS KiB) samples of the agent.
    pub(crate) rss_timeline: &'a [(i64, u64)],
}

/// The burst's outcome: memory before and after it started, what was
/// shed or dropped, critical readings, and alert latency before, during
/// and after it.
pub(crate) fn outcome(sent: Sent, factor: u64, seconds: u64, seen: Seen<'_>) -> Burst {
    let Sent {
        from,
        to,
        readings,
        rate,
        kernel_drops_system,
        critical,
    } = sent;
    let window = |lo: i64, hi: i64| {
        let mut h = histogram();
        for &(at, latency) in seen.alert_times {
            if at >= lo && at < hi {
                let _ = h.record(latency.max(1) as u64);
            }
        }
        percentiles(&h)
    };
    let rss = seen.rss_timeline;
    Burst {
        factor,
        seconds,
        extra_sent: readings,
        extra_rate: rate,
        rss_before_kib: rss
            .iter()
            .filter(|r| r.0 < from)
            .map(|r| r.1)
            .max()
            .unwrap_or(0),
        rss_during_and_after_kib: rss
            .iter()
            .filter(|r| r.0 >= from)
            .map(|r| r.1)
            .max()
            .unwrap_or(0),
        shed: seen.shed,
        kernel_drops: seen.kernel_drops,
        kernel_drops_system,
        critical_sent: critical,
        critical_in_aggregates: seen.critical_in_aggregates,
        alert_before: window(i64::MIN, from),
        alert_during: window(from, to),
        alert_first_2s_after: window(to, to + 2_000_000),
        alert_from_2s_after: window(to + 2_000_000, i64::MAX),
    }
}
