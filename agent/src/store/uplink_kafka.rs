//! `[uplink] kind = "kafka"`: the outbox forwarded to Apache Kafka (or a
//! log that speaks its protocol), through rskafka.
//!
//! The same rules as the MQTT uplink (see the parent module): records in
//! `seq` order from the same two lanes, at most `max_inflight` waiting for
//! their acknowledgement, each deleted from the outbox only when the
//! partition's leader acknowledges it with `acks = all` (every in-sync
//! replica has it), the next session resuming from the oldest record not
//! acknowledged, records no broker can take set aside as dead letters, and
//! a record the log keeps refusing found by sending one at a time.
//!
//! Each record's key is its series, so a series stays in one partition
//! (Kafka's default partitioner: see [`crate::output::kafka`]); its headers
//! are `agent`, `epoch` and `seq`, and its value the JSON record with the
//! same identity in it. The records of one round that go to the same
//! partition travel in one produce request; a partition's requests go out
//! on one connection, in order.
//!
//! # Effectively once
//!
//! The log can store a record twice: when a session ends (the broker or
//! the link fails, a produce times out) or the agent dies after the leader
//! wrote a record and before its acknowledgement was deleted from the
//! outbox, the record is sent again. rskafka has no idempotent producer;
//! librdkafka's would drop only the resends of one producer session, and
//! every session and restart here is a new one. Consumers drop a record
//! whose `(agent, epoch, seq)` they have already seen: resends come after
//! the original, at most the in-flight window plus the records
//! acknowledged and not yet deleted later in the log. Records in flight
//! when a session ends are counted (`sluice_uplink_unconfirmed_total`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;
use tokio::task::JoinSet;

use super::{
    Claimed, Lanes, MAX_UNDELETED, Outbox, SessionReport, Undeleted, UplinkConfig, UplinkStats,
    deletes_due, record_acks, set_aside,
};
use crate::output::kafka;
use crate::store::outbox::with_identity;

/// How long a produce request may wait for its acknowledgement (the client
/// retrying on the way) before the session ends and the next one sends its
/// records again.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a session sets `TCP_NODELAY` on connections the client made
/// since (see [`nodelay_everywhere`]).
const NODELAY_SWEEP: Duration = Duration::from_secs(5);

/// The port Kafka brokers listen on by default.
pub const DEFAULT_PORT: u16 = 9092;

/// What a produce request came back with: the seqs it carried, and `Ok` or
/// why the log did not take them (`true`: too large for the log).
type Produced = (Vec<i64>, Result<(), (bool, String)>);

/// The partition clients of a session, opened as records need them.
struct Partitions {
    client: Client,
    /// Partition count of each topic seen, read once a session.
    counts: HashMap<String, i32>,
    open: HashMap<(String, i32), Arc<PartitionClient>>,
}

impl Partitions {
    /// The client of the partition `key` lands on in `topic`.
    async fn of(&mut self, topic: &str, key: &[u8]) -> Result<Arc<PartitionClient>, String> {
        if !self.counts.contains_key(topic) {
            let topics = self
                .client
                .list_topics()
                .await
                .map_err(|e| format!("reading the cluster's topics: {e}"))?;
            for t in topics {
                self.counts.insert(t.name, t.partitions.len() as i32);
            }
        }
        let Some(&count) = self.counts.get(topic).filter(|&&n| n > 0) else {
            return Err(format!(
                "the topic {topic:?} does not exist on the cluster: create it (key = series; one or more partitions)"
            ));
        };
        let p = kafka::partition(key, count);
        if let Some(c) = self.open.get(&(topic.to_string(), p)) {
            return Ok(c.clone());
        }
        let c = self
            .client
            .partition_client(topic, p, UnknownTopicHandling::Error)
            .await
            .map_err(|e| format!("opening partition {p} of {topic:?}: {e}"))?;
        // Its leader's connection may be new.
        nodelay_everywhere();
        let c = Arc::new(c);
        self.open.insert((topic.to_string(), p), c.clone());
        Ok(c)
    }
}

/// One connection to the cluster: send, collect acknowledgements, until it
/// fails or `stop` (see [`super::session`] for the lanes and `isolate`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn session(
    outbox: &mut Outbox,
    config: &UplinkConfig,
    agent: &str,
    stats: &UplinkStats,
    stop: &AtomicBool,
    claimed: &Claimed,
    isolate: Option<(i64, i64)>,
    report: &mut SessionReport,
    undeleted: &mut Undeleted,
) -> Result<(), String> {
    let mut partitions = Partitions {
        client: connect(config, agent).await?,
        counts: HashMap::new(),
        open: HashMap::new(),
    };
    nodelay_everywhere();
    let mut swept = std::time::Instant::now();
    let live_from = super::connected(outbox, config, stats, report, isolate)?;
    let full_window = usize::from(config.max_inflight);
    let mut isolating = isolate.map(|(_, hi)| hi);
    let mut window = if isolating.is_some() { 1 } else { full_window };
    let mut lanes = Lanes::new(live_from, full_window);
    let mut inflight: JoinSet<Produced> = JoinSet::new();
    let mut outstanding = BTreeSet::new();
    let mut acked = Vec::new();
    let result = 'session: loop {
        if stop.load(Relaxed) {
            break Ok(());
        }
        if !undeleted.seqs.is_empty() && undeleted.tried.elapsed() >= Duration::from_secs(1) {
            record_acks(outbox, stats, claimed, &mut acked, undeleted);
        }
        // The client reconnects by itself within a request's retries.
        if swept.elapsed() >= NODELAY_SWEEP {
            nodelay_everywhere();
            swept = std::time::Instant::now();
        }
        let mut room = window.saturating_sub(outstanding.len());
        if undeleted.seqs.len() >= MAX_UNDELETED {
            room = 0;
        }
        // This round's records, one request per partition, in the order
        // the partitions first appear.
        let mut round: Vec<(Arc<PartitionClient>, Vec<i64>, Vec<Record>)> = Vec::new();
        while room > 0 {
            let Some(r) = lanes.next(outbox, stats, claimed, undeleted, window)? else {
                break;
            };
            if isolating.is_some_and(|hi| r.seq > hi) {
                (isolating, window) = (None, full_window);
                room = window.saturating_sub(outstanding.len());
            }
            let destination = if r.intact {
                kafka::split(&r.topic).ok_or_else(|| {
                    "not a Kafka destination (written for another kind of uplink)".to_string()
                })
            } else {
                Err("checksum mismatch: the record was damaged on disk".to_string())
            };
            let (topic, key) = match destination.and_then(|(t, k)| match kafka::topic_problem(t) {
                Some(p) => Err(format!("invalid topic {t:?}: {p}")),
                None => Ok((t, k)),
            }) {
                Ok(d) => d,
                Err(why) => {
                    lanes.finished(r.seq);
                    set_aside(outbox, stats, claimed, r.seq, &why);
                    continue;
                }
            };
            let partition = match partitions.of(topic, key.as_bytes()).await {
                Ok(p) => p,
                Err(e) => {
                    // This round's records were never sent: not in flight.
                    for (_, seqs, _) in &round {
                        for seq in seqs {
                            outstanding.remove(seq);
                        }
                    }
                    break 'session Err(e);
                }
            };
            let record = Record {
                key: Some(key.as_bytes().to_vec()),
                value: Some(with_identity(r.epoch, r.id_seq, &r.payload)),
                headers: BTreeMap::from([
                    ("agent".to_string(), agent.as_bytes().to_vec()),
                    ("epoch".to_string(), r.epoch.to_string().into_bytes()),
                    ("seq".to_string(), r.id_seq.to_string().into_bytes()),
                ]),
                timestamp: rskafka::chrono::DateTime::from_timestamp_millis(
                    sluice_collectors::reading::now_ms() as i64,
                )
                .unwrap_or_default(),
            };
            match round
                .iter_mut()
                .find(|(p, _, _)| Arc::ptr_eq(p, &partition))
            {
                Some((_, seqs, records)) => {
                    seqs.push(r.seq);
                    records.push(record);
                }
                None => round.push((partition, vec![r.seq], vec![record])),
            }
            outstanding.insert(r.seq);
            room -= 1;
        }
        for (partition, seqs, records) in round {
            stats.sent.fetch_add(seqs.len() as u64, Relaxed);
            inflight.spawn(async move {
                let produced = tokio::time::timeout(
                    ACK_TIMEOUT,
                    partition.produce(records, Compression::NoCompression),
                )
                .await;
                let answer = match produced {
                    Ok(Ok(_offsets)) => Ok(()),
                    Ok(Err(e)) => Err((too_large(&e), e.to_string())),
                    Err(_) => Err((false, format!("no acknowledgement within {ACK_TIMEOUT:?}"))),
                };
                (seqs, answer)
            });
        }
        if inflight.is_empty() {
            tokio::time::sleep(super::LIVE_LOOK).await;
            continue;
        }
        let Some(done) = inflight.join_next().await else {
            continue;
        };
        let (seqs, answer) = done.map_err(|e| e.to_string())?;
        match answer {
            Ok(()) => {
                for seq in seqs {
                    outstanding.remove(&seq);
                    lanes.finished(seq);
                    acked.push(seq);
                    report.acked += 1;
                }
            }
            // Alone, it is the record: no session would get it through.
            Err((true, e)) if seqs.len() == 1 => {
                outstanding.remove(&seqs[0]);
                lanes.finished(seqs[0]);
                set_aside(
                    outbox,
                    stats,
                    claimed,
                    seqs[0],
                    &format!("larger than the log takes: {e}"),
                );
            }
            // With others: the sessions after this one send the records
            // one at a time (see the parent module) and find it.
            Err((_, e)) => break Err(format!("seqs {seqs:?} not acknowledged: {e}")),
        }
        if deletes_due(&acked, full_window, inflight.is_empty()) {
            record_acks(outbox, stats, claimed, &mut acked, undeleted);
        }
    };
    report.unacknowledged(outstanding.iter().copied(), isolating.is_some());
    if !acked.is_empty() {
        record_acks(outbox, stats, claimed, &mut acked, undeleted);
    }
    inflight.abort_all();
    result
}

/// Sets `TCP_NODELAY` on every connected TCP socket of the process that
/// lacks it, and returns how many it set.
///
/// rskafka writes a request's 4-byte length and its body in two writes and
/// leaves Nagle's algorithm on, so the body waits for the ACK of the length,
/// which the broker delays (up to 40 ms on Linux): each produce request
/// took 40 ms more, and the drain of a backlog at the default window ran at
/// 1,249 records/s instead of 7,410 (benches/README.md, "To Kafka"). The
/// client gives no hook to its sockets, so the session sets the option on
/// the process's TCP connections: every other connection of the agent
/// (MQTT, NATS) runs without Nagle already.
pub fn nodelay_everywhere() -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut set = 0;
    for fd in fds.flatten() {
        let Some(fd) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let (mut kind, mut nodelay): (libc::c_int, libc::c_int) = (0, 0);
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `kind` and `len` are valid for writes of the sizes given;
        // an fd that is not a socket (or was closed meanwhile) makes the
        // call fail with ENOTSOCK or EBADF, and nothing is written.
        let stream = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&raw mut kind).cast(),
                &mut len,
            )
        } == 0
            && kind == libc::SOCK_STREAM;
        if !stream {
            continue;
        }
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as above; a stream socket that is not TCP (a Unix
        // socket) fails with EOPNOTSUPP and is left alone.
        let tcp = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw mut nodelay).cast(),
                &mut len,
            )
        } == 0;
        if tcp && nodelay == 0 {
            let on: libc::c_int = 1;
            // SAFETY: `on` is a valid c_int for the length given; setting
            // TCP_NODELAY changes only when the kernel sends what is
            // written, never what.
            let done = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&raw const on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            set += usize::from(done == 0);
        }
    }
    set
}

/// Whether the log refused a produce request for its size.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::ServerError {
            protocol_error: ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge,
            ..
        }
    )
}

/// Connects to the cluster through `config`'s host (TLS and SASL PLAIN
/// credentials as configured) and reads its metadata, failing instead of
/// retrying for long: the uplink's own loop retries, with its backoff.
async fn connect(config: &UplinkConfig, agent: &str) -> Result<Client, String> {
    let mut settings = config.connection(agent);
    settings
        .resolve_password()
        .map_err(|e| format!("uplink.{e}"))?;
    let port = config.port.unwrap_or(DEFAULT_PORT);
    let mut builder = ClientBuilder::new(vec![format!("{}:{port}", config.host)])
        .client_id(settings.client_id.as_str())
        .backoff_config(rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
            deadline: Some(ACK_TIMEOUT),
        });
    if let (Some(user), Some(password)) = (settings.username.clone(), settings.password.clone()) {
        builder = builder.sasl_config(SaslConfig::Plain(Credentials::new(user, password)));
    }
    if let Some(tls) = &config.tls {
        let tls =
            sluice_collectors::mqtt::rustls_config(tls).map_err(|e| format!("uplink.tls: {e}"))?;
        builder = builder.tls_config(Arc::new(tls));
    }
    match tokio::time::timeout(ACK_TIMEOUT, builder.build()).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(format!(
            "cannot connect to Kafka at {}:{port}: {e}",
            config.host
        )),
        Err(_) => Err(format!(
            "cannot connect to Kafka at {}:{port}: no answer within {ACK_TIMEOUT:?}",
            config.host
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodelay_everywhere_turns_nagle_off_on_the_processs_tcp_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!client.nodelay().unwrap() && !server.nodelay().unwrap());
        assert!(nodelay_everywhere() >= 2);
        assert!(client.nodelay().unwrap() && server.nodelay().unwrap());
        // A Unix socket and other files are left alone.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        nodelay_everywhere();
        assert!(a.peer_addr().is_ok());
    }
}
