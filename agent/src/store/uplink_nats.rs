//! `[uplink] kind = "nats"`: the outbox forwarded to NATS JetStream.
//!
//! The same rules as the MQTT uplink (see the parent module): records in
//! `seq` order from the same two lanes, at most `max_inflight` waiting for
//! their acknowledgement, each deleted from the outbox only when the stream
//! acknowledges it, the next session resuming from the oldest record not
//! acknowledged, records no server can take set aside as dead letters, and
//! a record the stream keeps refusing found by sending one at a time.
//!
//! Each message carries the header `Nats-Msg-Id: <agent>:<epoch>:<seq>`:
//! within the stream's duplicate window (`duplicate_window`, 2 minutes by
//! default) JetStream stores a resend of the same record once and
//! acknowledges it as a duplicate, so a record acknowledged but not yet
//! deleted when the agent was killed, sent again after the restart, is not
//! stored twice. A resend after a longer outage than that window is stored
//! again: consumers then drop it by the same `(agent, epoch, seq)`, which
//! the payload carries too.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use tokio::task::JoinSet;

use super::{
    Claimed, Lanes, MAX_UNDELETED, Outbox, SessionReport, Undeleted, UplinkConfig, UplinkStats,
    deletes_due, record_acks, set_aside,
};
use crate::store::outbox::with_identity;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// How long a publish may wait for the stream's acknowledgement before the
/// session ends and the next one sends it again.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the stream answered a publish: whether it was a duplicate, or why
/// it was not acknowledged.
type Acked = Result<bool, String>;

/// The NATS server's default port.
pub const DEFAULT_PORT: u16 = 4222;

/// One connection to the NATS server: send, collect acknowledgements, until
/// it fails or `stop` (see [`super::session`] for the lanes and `isolate`).
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
    let client = connect(config, agent).await?;
    let mut jetstream = async_nats::jetstream::new(client.clone());
    jetstream.set_timeout(ACK_TIMEOUT);
    let live_from = super::connected(outbox, config, stats, report, isolate)?;
    let full_window = usize::from(config.max_inflight);
    let mut isolating = isolate.map(|(_, hi)| hi);
    let mut window = if isolating.is_some() { 1 } else { full_window };
    let mut lanes = Lanes::new(live_from, full_window);
    let mut inflight: JoinSet<(i64, Acked)> = JoinSet::new();
    let mut outstanding = std::collections::BTreeSet::new();
    let mut acked = Vec::new();
    let result = 'session: loop {
        if stop.load(Relaxed) {
            break Ok(());
        }
        if !undeleted.seqs.is_empty() && undeleted.tried.elapsed() >= Duration::from_secs(1) {
            record_acks(outbox, stats, claimed, &mut acked, undeleted);
        }
        let mut room = window.saturating_sub(inflight.len());
        if undeleted.seqs.len() >= MAX_UNDELETED {
            room = 0;
        }
        while room > 0 {
            let Some(r) = lanes.next(outbox, stats, claimed, undeleted, window)? else {
                break;
            };
            if isolating.is_some_and(|hi| r.seq > hi) {
                (isolating, window) = (None, full_window);
                room = window.saturating_sub(inflight.len());
            }
            let why = if !r.intact {
                Some("checksum mismatch: the record was damaged on disk".to_string())
            } else {
                crate::output::subject::problem(&r.topic).map(|p| format!("invalid subject: {p}"))
            };
            if let Some(why) = why {
                lanes.finished(r.seq);
                set_aside(outbox, stats, claimed, r.seq, &why);
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{agent}:{}:{}", r.epoch, r.id_seq).as_str(),
            );
            let payload = with_identity(r.epoch, r.id_seq, &r.payload);
            match jetstream
                .publish_with_headers(r.topic, headers, payload.into())
                .await
            {
                Ok(ack) => {
                    let seq = r.seq;
                    inflight.spawn(async move {
                        let answer = match ack.await {
                            Ok(a) => Ok(a.duplicate),
                            Err(e) => Err(e.to_string()),
                        };
                        (seq, answer)
                    });
                    outstanding.insert(seq);
                    stats.sent.fetch_add(1, Relaxed);
                    room -= 1;
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    lanes.finished(r.seq);
                    let why = format!("larger than the NATS server's max_payload: {e}");
                    set_aside(outbox, stats, claimed, r.seq, &why);
                }
                Err(e) => break 'session Err(format!("publish: {e}")),
            }
        }
        if inflight.is_empty() {
            tokio::time::sleep(super::LIVE_LOOK).await;
            if client.connection_state() != async_nats::connection::State::Connected {
                break Err("the connection to the NATS server was lost".into());
            }
            continue;
        }
        let Some(done) = inflight.join_next().await else {
            continue;
        };
        let (seq, answer) = done.map_err(|e| e.to_string())?;
        match answer {
            Ok(duplicate) => {
                if duplicate {
                    stats.duplicates.fetch_add(1, Relaxed);
                }
                outstanding.remove(&seq);
                lanes.finished(seq);
                acked.push(seq);
                report.acked += 1;
            }
            Err(e) => break Err(format!("seq {seq} not acknowledged: {e}")),
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

/// Connects to the server of `config` (TLS and credentials as configured),
/// failing instead of reconnecting: the uplink's own loop retries, with its
/// backoff, from the oldest record not acknowledged.
async fn connect(config: &UplinkConfig, agent: &str) -> Result<async_nats::Client, String> {
    let mut settings = config.connection(agent);
    settings
        .resolve_password()
        .map_err(|e| format!("uplink.{e}"))?;
    let mut options = async_nats::ConnectOptions::new()
        .name(&settings.client_id)
        .connection_timeout(Duration::from_secs(10))
        .max_reconnects(1)
        .ignore_discovered_servers();
    if let (Some(user), Some(password)) = (settings.username.clone(), settings.password.clone()) {
        options = options.user_and_password(user, password);
    }
    if let Some(tls) = &config.tls {
        options = options
            .require_tls(true)
            .add_root_certificates(tls.ca_file.clone());
        if let (Some(cert), Some(key)) = (&tls.client_cert_file, &tls.client_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let port = config.port.unwrap_or(DEFAULT_PORT);
    options
        .connect(format!("{}:{port}", config.host))
        .await
        .map_err(|e| format!("cannot connect to NATS at {}:{port}: {e}", config.host))
}
