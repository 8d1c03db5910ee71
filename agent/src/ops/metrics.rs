//! Metrics: a Prometheus text exposition on `/metrics` (meant for a loopback
//! address), and the same counters as a periodic JSON stats message.
//!
//! The HTTP side is deliberately tiny: one `GET /metrics` per connection,
//! requests capped at 8 KiB and 2 s, so that a stray client can cost neither
//! memory nor a task for long.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use sluice_collectors::{Reason, SourceStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::output::OutputStats;
use crate::pipeline::worker::WorkerStats;
use crate::store::uplink::UplinkStats;

/// What a running pipeline exposes (to metrics, the demo and tests).
#[derive(Clone)]
pub struct Running {
    /// Counters of each source, by name.
    pub sources: BTreeMap<String, Arc<SourceStats>>,
    /// Counters of each worker.
    pub workers: Vec<Arc<WorkerStats>>,
    /// Counters of the output task.
    pub output: Arc<OutputStats>,
    /// Addresses the UDP sources listen on, by name.
    pub udp_addrs: BTreeMap<String, SocketAddr>,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// Store-and-forward counters (zero without an outbox).
    pub uplink: Arc<UplinkStats>,
    /// The sensor-node merger's counters (zero without a `frames` source).
    pub nodes: Arc<crate::pipeline::nodes::NodeStats>,
}

/// The Prometheus text exposition of `r`.
pub fn render(r: &Running) -> String {
    let mut out = String::new();
    let mut family = |name: &str,
                      kind: &str,
                      help: &str,
                      samples: &mut dyn Iterator<Item = (String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let src = |f: fn(&sluice_collectors::SourceStats) -> String| {
        r.sources
            .iter()
            .map(move |(n, s)| (format!("{{source=\"{n}\"}}"), f(s)))
            .collect::<Vec<_>>()
    };
    family(
        "sluice_messages_received_total",
        "counter",
        "Messages (publishes, lines, datagram lines) received.",
        &mut src(|s| s.messages.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_bytes_received_total",
        "counter",
        "Bytes received.",
        &mut src(|s| s.bytes.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_readings_decoded_total",
        "counter",
        "Readings decoded.",
        &mut src(|s| s.decoded.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_readings_delivered_total",
        "counter",
        "Readings handed to a worker's ring.",
        &mut src(|s| s.delivered.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_source_handoffs_total",
        "counter",
        "Batches of readings pushed into a worker's ring, each at most one wake-up (delivered / handoffs is the batch size).",
        &mut src(|s| s.handoffs.load(Relaxed).to_string()).into_iter(),
    );
    let rejected: Vec<(String, String)> = r
        .sources
        .iter()
        .flat_map(|(n, s)| {
            Reason::ALL.iter().map(move |&reason| {
                (
                    format!("{{source=\"{n}\",reason=\"{reason}\"}}"),
                    s.rejected(reason).to_string(),
                )
            })
        })
        .collect();
    family(
        "sluice_readings_rejected_total",
        "counter",
        "Input refused, by reason.",
        &mut rejected.into_iter(),
    );
    let shed: Vec<(String, String)> = r
        .sources
        .iter()
        .flat_map(|(n, s)| {
            [
                ("high_water", &s.shed_high_water),
                ("sampled", &s.shed_sampled),
                ("full", &s.shed_full),
            ]
            .map(|(reason, c)| {
                (
                    format!("{{source=\"{n}\",reason=\"{reason}\"}}"),
                    c.load(Relaxed).to_string(),
                )
            })
        })
        .collect();
    family(
        "sluice_readings_shed_total",
        "counter",
        "Readings shed under overload, by reason.",
        &mut shed.into_iter(),
    );
    family(
        "sluice_source_connects_total",
        "counter",
        "Connections, binds or opens of the source.",
        &mut src(|s| s.connects.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_source_up",
        "gauge",
        "1 while the source is connected (MQTT), has its device open (serial) or is bound (UDP).",
        &mut src(|s| u8::from(s.up.load(Relaxed)).to_string()).into_iter(),
    );
    family(
        "sluice_source_disconnects_total",
        "counter",
        "Lost connections or devices.",
        &mut src(|s| s.disconnects.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_source_critical_wait_us_total",
        "counter",
        "Time the source waited for room in a full ring for critical readings (never shed), µs.",
        &mut src(|s| s.critical_wait_us.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_source_kernel_drops_total",
        "counter",
        "Datagrams the kernel dropped before a UDP source could read them (full receive buffer).",
        &mut src(|s| s.kernel_drops.load(Relaxed).to_string()).into_iter(),
    );
    family(
        "sluice_event_time_skew_ms",
        "gauge",
        "Ingest time minus event time of the latest reading.",
        &mut src(|s| s.skew_ms.load(Relaxed).to_string()).into_iter(),
    );
    let wk = |f: fn(&WorkerStats) -> u64| {
        r.workers
            .iter()
            .enumerate()
            .map(move |(i, w)| (format!("{{worker=\"{i}\"}}"), f(w).to_string()))
            .collect::<Vec<_>>()
    };
    family(
        "sluice_readings_processed_total",
        "counter",
        "Readings processed by workers.",
        &mut wk(|w| w.readings.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_readings_late_total",
        "counter",
        "Readings refused as late by their window.",
        &mut wk(|w| w.late.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_readings_unmatched_total",
        "counter",
        "Readings of series no rule matches.",
        &mut wk(|w| w.unmatched.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_readings_series_overflow_total",
        "counter",
        "Readings dropped because the series table was full.",
        &mut wk(|w| w.series_overflow.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_series_evicted_total",
        "counter",
        "Series evicted: idle for series_idle_ms, or making room in a full table.",
        &mut wk(|w| w.evicted.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_series",
        "gauge",
        "Series with state.",
        &mut wk(|w| w.series.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_ring_depth",
        "gauge",
        "Readings waiting in a worker's rings.",
        &mut wk(|w| w.ring_depth.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_worker_parks_total",
        "counter",
        "Times a worker found its rings empty and parked until a source woke it (a worker that has just taken several readings naps 200 µs first).",
        &mut wk(|w| w.parks.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_checkpoint_restored_series_total",
        "counter",
        "Series whose state was restored from a checkpoint at start.",
        &mut wk(|w| w.restored.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_checkpoint_restore_dropped_total",
        "counter",
        "Series in a checkpoint not restored (no rule matches, or the table is full).",
        &mut wk(|w| w.restore_dropped.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_table_unmatched_total",
        "counter",
        "Readings refused: their series has no row in its rule's table (on_missing = \"refuse\").",
        &mut wk(|w| w.table_unmatched.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_join_pairs_total",
        "counter",
        "Pairs the derived series' joins made (each a reading of a derived series, unless its expr had no value).",
        &mut wk(|w| w.join_pairs.load(Relaxed)).into_iter(),
    );
    let sides: Vec<(String, String)> = r
        .workers
        .iter()
        .enumerate()
        .flat_map(|(i, w)| {
            [
                (
                    format!("{{worker=\"{i}\",side=\"a\"}}"),
                    w.join_missing_a.load(Relaxed),
                ),
                (
                    format!("{{worker=\"{i}\",side=\"b\"}}"),
                    w.join_missing_b.load(Relaxed),
                ),
            ]
        })
        .map(|(labels, n)| (labels, n.to_string()))
        .collect();
    family(
        "sluice_join_missing_total",
        "counter",
        "Join windows (or readings of a, for an interval join) dropped because the side named had nothing to pair with them.",
        &mut sides.into_iter(),
    );
    family(
        "sluice_join_late_total",
        "counter",
        "Readings too late for their join window, or older than side b's latest.",
        &mut wk(|w| w.join_late.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_join_undefined_total",
        "counter",
        "Pairs whose expr has no value (a ratio to 0, beyond 1e100, or the first pair of a rate).",
        &mut wk(|w| w.join_undefined.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_join_groups_overflow_total",
        "counter",
        "Readings of a derived series' or a pattern's input dropped for a new value of its group_by label past the 1,024 it keeps.",
        &mut wk(|w| w.groups_overflow.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_pattern_raised_total",
        "counter",
        "Times a pattern's alert was raised.",
        &mut wk(|w| w.pattern_raised.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_pattern_settled_total",
        "counter",
        "Events of a pattern's first condition that expired without its then (or, with absent = true, that then answered in time).",
        &mut wk(|w| w.pattern_settled.load(Relaxed)).into_iter(),
    );
    family(
        "sluice_first_seen_over_capacity_total",
        "counter",
        "New label values past a first_seen filter's capacity: counted, not alerted.",
        &mut wk(|w| w.first_seen_over_capacity.load(Relaxed)).into_iter(),
    );
    let o = &r.output;
    family(
        "sluice_aggregates_total",
        "counter",
        "Aggregate records emitted.",
        &mut std::iter::once((String::new(), o.aggregates.load(Relaxed).to_string())),
    );
    family(
        "sluice_alerts_raised_total",
        "counter",
        "Alerts raised.",
        &mut std::iter::once((String::new(), o.alerts_raised.load(Relaxed).to_string())),
    );
    family(
        "sluice_alerts_cleared_total",
        "counter",
        "Alerts cleared.",
        &mut std::iter::once((String::new(), o.alerts_cleared.load(Relaxed).to_string())),
    );
    family(
        "sluice_publish_errors_total",
        "counter",
        "Failed publishes.",
        &mut std::iter::once((String::new(), o.publish_errors.load(Relaxed).to_string())),
    );
    family(
        "sluice_output_dropped_total",
        "counter",
        "Live messages dropped while the output broker was unreachable (the outbox stores regardless).",
        &mut std::iter::once((String::new(), o.dropped_offline.load(Relaxed).to_string())),
    );
    family(
        "sluice_output_too_large_total",
        "counter",
        "Live messages not published because no MQTT packet can hold them (64 KiB; the outbox keeps its records).",
        &mut std::iter::once((String::new(), o.too_large.load(Relaxed).to_string())),
    );
    let u = &r.uplink;
    for (name, help, value) in [
        (
            "sluice_outbox_appended_total",
            "Records committed to the outbox.",
            u.appended.load(Relaxed),
        ),
        (
            "sluice_outbox_append_errors_total",
            "Outbox appends that failed and were retried (full disk, I/O).",
            u.append_errors.load(Relaxed),
        ),
        (
            "sluice_outbox_dropped_total",
            "Records dropped because the outbox was full.",
            u.dropped.load(Relaxed),
        ),
        (
            "sluice_outbox_downsampled_total",
            "Records merged into older ones because the outbox was full.",
            u.downsampled.load(Relaxed),
        ),
        (
            "sluice_checkpoints_total",
            "Worker checkpoints committed.",
            u.checkpoints.load(Relaxed),
        ),
        (
            "sluice_uplink_sent_total",
            "Records published upstream, resends included.",
            u.sent.load(Relaxed),
        ),
        (
            "sluice_uplink_acked_total",
            "Records acknowledged upstream and removed from the outbox.",
            u.acked.load(Relaxed),
        ),
        (
            "sluice_uplink_connects_total",
            "Upstream connections.",
            u.connects.load(Relaxed),
        ),
        (
            "sluice_uplink_duplicates_total",
            "Records the upstream log acknowledged as duplicates of records it already held (NATS JetStream: the same Nats-Msg-Id), so stored once.",
            u.duplicates.load(Relaxed),
        ),
        (
            "sluice_uplink_unconfirmed_total",
            "Records sent and still unacknowledged when their session ended (a failure, a stop): sent again, so a log that cannot drop resends (Kafka, MQTT) may hold them twice.",
            u.unconfirmed.load(Relaxed),
        ),
        (
            "sluice_outbox_ack_errors_total",
            "Deletes of acknowledged records that failed (a full disk) and were retried.",
            u.ack_errors.load(Relaxed),
        ),
        (
            "sluice_outbox_dead_lettered_total",
            "Records set aside as dead letters (unsendable, refused by the broker, damaged).",
            u.dead_lettered.load(Relaxed),
        ),
        (
            "sluice_node_windows_total",
            "Sensor nodes' windows merged (serial sources with format = \"frames\").",
            r.nodes.windows.load(Relaxed),
        ),
        (
            "sluice_node_aggregates_total",
            "Aggregates made from sensor nodes' merged windows.",
            r.nodes.merged.load(Relaxed),
        ),
        (
            "sluice_node_alerts_total",
            "Alerts forwarded from sensor nodes.",
            r.nodes.alerts.load(Relaxed),
        ),
        (
            "sluice_node_records_refused_total",
            "Sensor nodes' records refused by the merger: a window that straddles the gateway's, comes late, or a sketch that does not merge.",
            r.nodes.refused.load(Relaxed),
        ),
    ] {
        family(
            name,
            "counter",
            help,
            &mut std::iter::once((String::new(), value.to_string())),
        );
    }
    family(
        "sluice_outbox_backlog",
        "gauge",
        "Records waiting in the outbox (after the last commit or acknowledgement).",
        &mut std::iter::once((String::new(), u.backlog.load(Relaxed).to_string())),
    );
    family(
        "sluice_outbox_dead_letters",
        "gauge",
        "Records waiting in the outbox's dead letters (sluice outbox dead-letters).",
        &mut std::iter::once((String::new(), u.dead_letters.load(Relaxed).to_string())),
    );
    // Processing latency, all workers merged.
    let mut merged =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("valid bounds");
    for w in &r.workers {
        if let Ok(h) = w.latency_ms.lock() {
            let _ = merged.add(&*h);
        }
    }
    summary(
        &mut out,
        "sluice_processing_latency_ms",
        "From a reading's ingest to the record it caused, ms (1 ms resolution).",
        &merged,
        1.0,
    );
    o.aggregate_delay.read(|h| {
        summary(
            &mut out,
            "sluice_output_delay_ms",
            "From an aggregate's window close to its hand-off to the MQTT output client (in a batch, the batch's), ms.",
            h,
            1000.0,
        );
    });
    out
}

/// A Prometheus summary of `h` (p50, p90, p99, p99.9, max, sum, count), its
/// values divided by `per_unit` (a histogram of µs reported in ms: 1000).
fn summary(
    out: &mut String,
    name: &str,
    help: &str,
    h: &hdrhistogram::Histogram<u64>,
    per_unit: f64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
        let v = h.value_at_quantile(q) as f64 / per_unit;
        let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
    }
    let sum = h.mean() * h.len() as f64 / per_unit;
    let _ = writeln!(out, "{name}_sum {}", sum.round());
    let _ = writeln!(out, "{name}_count {}", h.len());
}

/// Connections served at once; past that, a connection gets a 503 and is
/// closed at once, so that idle or slow clients can never take the agent's
/// file descriptors.
pub const MAX_CONNECTIONS: usize = 16;

/// Serves `/metrics` on `listener` until `shutdown`: at most
/// [`MAX_CONNECTIONS`] at once, each given 2 s.
pub async fn serve(listener: TcpListener, running: Running, shutdown: CancellationToken) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused = 0u64;
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused == 1 || refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    "metrics: {MAX_CONNECTIONS} connections open; answering 503 to more"
                );
            }
            // Without reading the request: a few bytes, then the socket
            // closes (dropped), whatever the client does.
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        };
        let running = running.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), respond(stream, &running)).await;
            drop(slot);
        });
    }
}

async fn respond(mut stream: TcpStream, running: &Running) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let (status, body) =
        if request.starts_with(b"GET /metrics ") || request.starts_with(b"GET /metrics?") {
            ("200 OK", render(running))
        } else {
            ("404 Not Found", "try /metrics\n".to_string())
        };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The counters as JSON, for the periodic stats message.
pub fn snapshot(r: &Running) -> serde_json::Value {
    use serde_json::json;
    let sources: serde_json::Map<String, serde_json::Value> = r
        .sources
        .iter()
        .map(|(n, s)| {
            let rejected: serde_json::Map<String, serde_json::Value> = Reason::ALL
                .iter()
                .filter(|&&reason| s.rejected(reason) > 0)
                .map(|&reason| (reason.as_str().to_owned(), s.rejected(reason).into()))
                .collect();
            (
                n.clone(),
                json!({
                    "up": s.up.load(Relaxed),
                    "messages": s.messages.load(Relaxed),
                    "decoded": s.decoded.load(Relaxed),
                    "delivered": s.delivered.load(Relaxed),
                    "rejected": rejected,
                    "shed": s.shed_total(),
                    "skew_ms": s.skew_ms.load(Relaxed),
                }),
            )
        })
        .collect();
    let sum = |f: fn(&WorkerStats) -> u64| r.workers.iter().map(|w| f(w)).sum::<u64>();
    json!({
        "ts": sluice_collectors::reading::now_ms(),
        "sources": sources,
        "series": sum(|w| w.series.load(Relaxed)),
        "late": sum(|w| w.late.load(Relaxed)),
        "unmatched": sum(|w| w.unmatched.load(Relaxed)),
        "series_overflow": sum(|w| w.series_overflow.load(Relaxed)),
        "series_evicted": sum(|w| w.evicted.load(Relaxed)),
        "ring_depth": sum(|w| w.ring_depth.load(Relaxed)),
        "aggregates": r.output.aggregates.load(Relaxed),
        "alerts_raised": r.output.alerts_raised.load(Relaxed),
        "alerts_cleared": r.output.alerts_cleared.load(Relaxed),
    })
}
