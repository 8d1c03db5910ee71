//! The MQTT source: JSON readings published to topics on a broker.
//!
//! rumqttc drives the connection. The source subscribes to every configured
//! filter (wildcards `+` and `#` allowed) after *each* connection
//! acknowledgement, so subscriptions come back after a reconnect whether or
//! not the broker kept the session. When the connection fails the source
//! waits a capped, jittered exponential backoff and reconnects, for as long
//! as it runs: a broker that goes away never stops the source.
//!
//! QoS 1 messages are acknowledged by rumqttc once the source has received
//! them; the readings are in a ring (or counted as shed) before the next
//! message is read.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::decode::{DecodeSink, JsonDecoder, JsonMapping};
use crate::pipe::Handoff;
use crate::reading::now_ms;
use crate::source::{Ingest, LOG_INTERVAL};
use crate::stats::{RateLimitedLog, Reason, SourceStats, add};

/// TLS to the broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the certificate authorities that sign the broker's
    /// certificate.
    pub ca_file: PathBuf,
    /// PEM file of the client certificate chain, for brokers that require one.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub client_key_file: Option<PathBuf>,
}

/// Settings of an MQTT source.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSettings {
    /// Broker host name or address.
    pub host: String,
    /// Broker port. Default 1883 (use 8883 with TLS).
    #[serde(default = "default_port")]
    pub port: u16,
    /// MQTT client id; must be unique on the broker. Default `sluice`.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Topic filters to subscribe to, e.g. `sensors/+` or `plant/#`.
    pub topics: Vec<String>,
    /// Subscription QoS: 0 (at most once) or 1 (at least once). Default 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// File holding the password (its first line), e.g. a systemd credential.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// The password, resolved by [`MqttSettings::resolve_password`]; never
    /// read from or written to the configuration file itself.
    #[serde(skip)]
    pub password: Option<String>,
    /// TLS settings; plain TCP when absent.
    pub tls: Option<TlsSettings>,
    /// Start a clean session on each connection (`true`, the default), or
    /// keep a persistent session so the broker queues QoS 1 messages while
    /// the agent is away (`false`; needs a stable `client_id`).
    #[serde(default = "default_clean_session")]
    pub clean_session: bool,
    /// Keep-alive interval, seconds. Default 30.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// First delay before reconnecting, ms. Default 500.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest delay between reconnect attempts, ms. Default 30,000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Largest MQTT packet the client reads, bytes. A message larger than
    /// `json.max_message_bytes` but within this is refused and counted as
    /// `oversize`; one larger than this costs the connection (the client
    /// cannot skip it), and a broker with a persistent session sends it
    /// again. Default: the protocol's maximum (268,435,460), so that no
    /// message can; lower it to the broker's own limit (Mosquitto's
    /// `max_packet_size`) to bound the memory one message may take.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// After a read of the connection that emptied it yet brought 4
    /// messages or more (a dense stream), wait this long before reading
    /// again, ms, so that the next read takes that much at once instead of
    /// a few messages per wake-up and system call: at 100,000 readings/s it
    /// about halved the agent's CPU, for 1 to 2 ms more latency
    /// (benches/README.md, *Fewer wake-ups*). A trickle, and a read that
    /// held QoS 1 messages (the broker's window of unacknowledged messages
    /// bounds what could gather), are read at once either way. 0: always
    /// read at once. Default 1; at most 50 (the broker holds what arrives
    /// meanwhile).
    #[serde(default = "default_gather_ms")]
    pub gather_ms: u64,
    /// Where the fields of a reading are (the series key may be a topic
    /// segment: `json.series = { topic_segment = 1 }`).
    #[serde(default)]
    pub json: JsonMapping,
}

const fn default_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "sluice".into()
}
const fn default_qos() -> u8 {
    1
}
const fn default_clean_session() -> bool {
    true
}
const fn default_keep_alive_s() -> u64 {
    30
}
const fn default_reconnect_min_ms() -> u64 {
    500
}
const fn default_gather_ms() -> u64 {
    1
}
const fn default_reconnect_max_ms() -> u64 {
    30_000
}
/// MQTT's largest packet: a remaining length of 268,435,455 bytes and a
/// fixed header of at most 5.
const fn default_max_packet_bytes() -> usize {
    268_435_460
}

/// How often a source that cannot reach its broker says so again.
const STILL_DOWN: Duration = Duration::from_secs(300);

/// The longest `gather_ms`.
const MAX_GATHER_MS: u64 = 50;
/// Messages in a read that emptied the connection from which the source
/// takes the stream for dense (see [`Gather`]).
const DENSE: usize = 4;

/// When to let a dense stream gather before reading it. Each read of the
/// connection costs a wake-up, an `epoll_wait` and a `recv` (with its TCP
/// acknowledgement), whether it brings one message or a hundred; a source
/// that reads again as soon as it is done finds the few messages that came
/// meanwhile, and at 100,000 readings/s those calls took about two fifths
/// of the agent's `perf` samples. After a read that emptied the connection (it brought fewer
/// messages than the most one read has brought: rumqttc stops a read at a
/// fixed number of packets, and a full read leaves more waiting) and still
/// brought [`DENSE`] messages or more, the source waits `gather_ms` first
/// (default 1; tokio's timers tick in milliseconds, so 1 to 2 ms), so that
/// the next read takes that much at once. A trickle (reads of fewer
/// messages) is read at once: only dense streams pay the added latency. So
/// is a read that held QoS 1 messages: the broker sends only so many
/// unacknowledged ones (Mosquitto: 20, `max_inflight_messages`), so waiting
/// would gather no more than that and cap the stream at it.
#[derive(Debug, Default)]
struct Gather {
    /// The most messages one read has brought.
    most: usize,
}

impl Gather {
    /// Whether to wait `gather_ms` after a read that brought `messages`,
    /// some of them `acknowledged` (QoS 1).
    fn after_read(&mut self, messages: usize, acknowledged: bool) -> bool {
        let emptied = messages < self.most;
        self.most = self.most.max(messages);
        emptied && messages >= DENSE && !acknowledged
    }
}

/// A connection that lasted this long counts as up: the reconnect backoff
/// starts afresh after it fails. One that fails sooner (a broker that
/// accepts and then drops it) keeps backing off.
pub const STEADY: Duration = Duration::from_secs(10);

impl MqttSettings {
    /// Settings with the defaults for `host:port` and `topics`.
    pub fn new(host: impl Into<String>, port: u16, topics: Vec<String>) -> Self {
        Self {
            host: host.into(),
            port,
            client_id: default_client_id(),
            topics,
            qos: default_qos(),
            username: None,
            password_file: None,
            password_env: None,
            password: None,
            tls: None,
            clean_session: default_clean_session(),
            keep_alive_s: default_keep_alive_s(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            gather_ms: default_gather_ms(),
            max_packet_bytes: default_max_packet_bytes(),
            json: JsonMapping::default(),
        }
    }

    /// Checks the settings; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if self.host.is_empty() {
            return Err("host: must not be empty".into());
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| !rumqttc::valid_filter(t)) {
            return Err("topics: list one or more valid MQTT topic filters".into());
        }
        if self.qos > 1 {
            return Err(format!("qos: must be 0 or 1, not {}", self.qos));
        }
        if self.client_id.is_empty() && !self.clean_session {
            return Err(
                "client_id: must be set for a persistent session (clean_session = false)".into(),
            );
        }
        if self.keep_alive_s < 5 {
            return Err("keep_alive_s: must be >= 5".into());
        }
        if self.reconnect_min_ms == 0 {
            return Err("reconnect_min_ms: must be > 0".into());
        }
        if self.gather_ms > MAX_GATHER_MS {
            return Err(format!(
                "gather_ms: must be <= {MAX_GATHER_MS} (the broker holds what arrives meanwhile), not {}",
                self.gather_ms
            ));
        }
        if self.max_packet_bytes <= self.json.max_message_bytes {
            return Err(format!(
                "max_packet_bytes: {} must be larger than json.max_message_bytes ({}), or messages the decoder would refuse cost the connection instead",
                self.max_packet_bytes, self.json.max_message_bytes
            ));
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err("password_env: set password_file or password_env, not both".into());
        }
        if (self.password_file.is_some() || self.password_env.is_some()) && self.username.is_none()
        {
            return Err("username: needed with password_file or password_env".into());
        }
        if let Some(tls) = &self.tls
            && tls.client_cert_file.is_some() != tls.client_key_file.is_some()
        {
            return Err(
                "tls.client_key_file: set both client_cert_file and client_key_file, or neither"
                    .into(),
            );
        }
        self.json.validate().map_err(|e| format!("json.{e}"))
    }

    /// Reads the password from `password_file` or `password_env` into
    /// `password`. Errors name the key and the file or variable.
    pub fn resolve_password(&mut self) -> Result<(), String> {
        self.password =
            resolve_secret(self.password_file.as_deref(), self.password_env.as_deref())?;
        Ok(())
    }

    /// The rumqttc options, TLS included. Fails with a message naming the file
    /// when a certificate or key cannot be read.
    pub fn options(&self) -> Result<MqttOptions, String> {
        let mut options = MqttOptions::new(&self.client_id, &self.host, self.port);
        options
            .set_keep_alive(Duration::from_secs(self.keep_alive_s))
            .set_clean_session(self.clean_session)
            .set_max_packet_size(self.max_packet_bytes, MAX_OUTGOING_PACKET);
        if let Some(user) = &self.username {
            options.set_credentials(user, self.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(rustls_config(tls)?),
            )));
        }
        Ok(options)
    }

    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }
}

/// Network options for every Sluice MQTT connection: `TCP_NODELAY`, so
/// that a small publish or PUBACK leaves at once instead of waiting for
/// Nagle's algorithm to meet the peer's delayed ACK (up to 40 ms a stall).
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// The largest packet a client made from [`MqttSettings::options`] sends,
/// in bytes (the outputs and the uplink check records against it).
pub const MAX_OUTGOING_PACKET: usize = 64 * 1024;

/// The most bytes a QoS 0 or 1 PUBLISH of this topic and payload takes on
/// the wire: fixed header (at most 5 bytes), topic length, topic, packet id,
/// payload. A client refuses to send more than [`MAX_OUTGOING_PACKET`].
pub const fn publish_size(topic_len: usize, payload_len: usize) -> usize {
    5 + 2 + topic_len + 2 + payload_len
}

/// A secret from the first line of `file`, or from the environment variable
/// `env`; `None` when neither is given. Errors name the key.
pub fn resolve_secret(
    file: Option<&std::path::Path>,
    env: Option<&str>,
) -> Result<Option<String>, String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("password_file: {}: {e}", file.display()))?;
        return Ok(Some(text.lines().next().unwrap_or_default().to_owned()));
    }
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("password_env: environment variable {var} is not set"));
    }
    Ok(None)
}

/// A rustls client configuration (ring provider) trusting `ca_file`.
pub fn rustls_config(tls: &TlsSettings) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&tls.ca_file)
        .map_err(|e| format!("tls.ca_file: {}: {e}", tls.ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("tls.ca_file: {}: {e}", tls.ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("tls.ca_file: {}: {e}", tls.ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "tls.ca_file: {}: no certificate in it",
            tls.ca_file.display()
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_root_certificates(roots);
    match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert_file), Some(key_file)) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("tls.client_cert_file: {}: {e}", cert_file.display()))?;
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|e| format!("tls.client_key_file: {}: {e}", key_file.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls.client_cert_file: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// An MQTT source.
pub struct MqttSource {
    settings: MqttSettings,
    options: MqttOptions,
    decoder: JsonDecoder,
    handoff: Handoff,
    log: RateLimitedLog,
    /// The source's name in logs (`sources.<name>`).
    name: String,
}

impl MqttSource {
    /// A source for `settings` (validated here, TLS files read here);
    /// readings go to `handoff`.
    pub fn new(name: &str, settings: MqttSettings, handoff: Handoff) -> Result<Self, String> {
        settings.validate()?;
        Ok(Self {
            options: settings.options()?,
            decoder: JsonDecoder::new(settings.json.clone()),
            settings,
            handoff,
            log: RateLimitedLog::new(name, LOG_INTERVAL),
            name: name.to_owned(),
        })
    }

    /// The source's counters.
    pub fn stats(&self) -> Arc<SourceStats> {
        self.handoff.stats().clone()
    }

    /// Connects, subscribes and receives until `shutdown` is cancelled,
    /// reconnecting after every failure.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (client, mut events) = AsyncClient::new(self.options.clone(), 64);
        events.set_network_options(network_options());
        let mut backoff = Backoff::new(
            Duration::from_millis(self.settings.reconnect_min_ms),
            Duration::from_millis(self.settings.reconnect_max_ms),
            now_ms() as u64,
        );
        let stats = self.handoff.stats().clone();
        let mut connected_at: Option<std::time::Instant> = None;
        // A failing stretch: since when, attempts, when it was last logged.
        let mut failing: Option<(std::time::Instant, u64, std::time::Instant)> = None;
        // Registered once, not once a message.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        // The ingest time of what the current read brought, its messages,
        // and whether some were QoS 1.
        let (mut read_at, mut read, mut acknowledged) = (None, 0, false);
        let mut gather = Gather::default();
        let gather_for = Duration::from_millis(self.settings.gather_ms);
        loop {
            // rumqttc reads up to ten packets at a time and queues them: the
            // readings of one read are staged, then handed to the workers in
            // one flush (one push a lane, at most one wake-up) once the queue
            // is empty, that is, before `poll` can wait for the network. They
            // arrived together and share one ingest time. A dense stream is
            // then given a moment to gather (see `Gather`).
            if events.state.events.is_empty() {
                self.handoff.flush();
                read_at = None;
                let dense =
                    gather.after_read(std::mem::take(&mut read), std::mem::take(&mut acknowledged));
                if dense && !gather_for.is_zero() {
                    tokio::select! {
                        _ = &mut cancelled => break,
                        _ = tokio::time::sleep(gather_for) => {}
                    }
                }
            }
            let event = tokio::select! {
                _ = &mut cancelled => break,
                event = events.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    add(&stats.connects, 1);
                    stats.up.store(true, std::sync::atomic::Ordering::Relaxed);
                    connected_at = Some(std::time::Instant::now());
                    if let Some((since, attempts, _)) = failing.take() {
                        tracing::info!(source = %self.name, broker = %self.broker(), attempts, "MQTT connected after {:?} unreachable; subscribing", since.elapsed());
                    } else {
                        tracing::info!(source = %self.name, broker = %self.broker(), "MQTT connected; subscribing");
                    }
                    for topic in &self.settings.topics {
                        // The request queue is drained by `poll`, so use the
                        // non-blocking form; it holds 64 requests.
                        if let Err(e) = client.try_subscribe(topic.clone(), self.settings.qos()) {
                            tracing::warn!(topic, error = %e, "MQTT subscribe request failed");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    read += 1;
                    acknowledged |= publish.qos != QoS::AtMostOnce;
                    add(&stats.messages, 1);
                    add(&stats.bytes, publish.payload.len() as u64);
                    let topic = publish.topic.as_str();
                    let mut sink = Ingest {
                        handoff: &mut self.handoff,
                        log: &self.log,
                    };
                    if publish.payload.len() > self.settings.json.max_message_bytes {
                        sink.reject(
                            Reason::Oversize,
                            &format_args!("{} bytes on {topic}", publish.payload.len()),
                        );
                    } else {
                        let ingest = *read_at.get_or_insert_with(now_ms);
                        self.decoder
                            .decode(&publish.payload, Some(topic), ingest, &mut sink);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // `poll` reconnects before it returns what is queued.
                    self.handoff.flush();
                    add(&stats.disconnects, 1);
                    stats.up.store(false, std::sync::atomic::Ordering::Relaxed);
                    if connected_at.is_some_and(|t| t.elapsed() >= STEADY) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    let now = std::time::Instant::now();
                    if connected_at.is_some() {
                        tracing::warn!(source = %self.name, broker = %self.broker(), error = %e, "MQTT connection lost; reconnecting in {delay:?}");
                    } else {
                        // One warning when a failing stretch starts, then a
                        // reminder every STILL_DOWN; the attempts between
                        // at debug (sluice_source_up says it meanwhile).
                        match &mut failing {
                            None => {
                                tracing::warn!(source = %self.name, broker = %self.broker(), error = %e, "MQTT broker unreachable; retrying with backoff (sluice_source_up is 0 until it connects)")
                            }
                            Some((since, attempts, logged)) if logged.elapsed() >= STILL_DOWN => {
                                *logged = now;
                                tracing::warn!(source = %self.name, broker = %self.broker(), error = %e, attempts = *attempts + 1, "MQTT broker still unreachable after {:?}", since.elapsed());
                            }
                            Some(_) => {
                                tracing::debug!(source = %self.name, broker = %self.broker(), error = %e, "MQTT connect failed; retrying in {delay:?}")
                            }
                        }
                    }
                    let (since, attempts, logged) = failing.unwrap_or((now, 0, now));
                    failing = Some((since, attempts + 1, logged));
                    connected_at = None;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // What the last read brought, if shutdown came before its end.
        self.handoff.flush();
        // Say goodbye properly (a DISCONNECT, so the broker does not treat it
        // as a lost client), waiting a bounded time for it to go out.
        if client.try_disconnect().is_ok() {
            // The broker closes the connection after our DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while events.poll().await.is_ok() {}
            })
            .await;
        }
    }

    fn broker(&self) -> String {
        format!("{}:{}", self.settings.host, self.settings.port)
    }
}

#[cfg(test)]
mod tests {
    use super::{DENSE, Gather};

    #[test]
    fn a_trickle_is_read_at_once() {
        let mut g = Gather::default();
        for messages in [1, 2, 1, 3, 1, 0, 2] {
            assert!(!g.after_read(messages, false), "{messages}");
        }
    }

    /// A broker sends a QoS 1 subscriber only so many unacknowledged
    /// messages (Mosquitto: 20), and rumqttc acknowledges a read's as it
    /// reads them: waiting would gather no more than that window, and cap
    /// the stream at a window a millisecond.
    #[test]
    fn a_read_with_acknowledged_messages_is_not_waited_on() {
        let mut g = Gather::default();
        assert!(!g.after_read(9, false));
        assert!(!g.after_read(6, true));
        assert!(g.after_read(6, false));
    }

    #[test]
    fn a_dense_stream_gathers_once_the_connection_is_emptied() {
        let mut g = Gather::default();
        // Full reads (rumqttc's limit, whatever it is) leave more waiting.
        assert!(!g.after_read(9, false));
        assert!(!g.after_read(9, false));
        // Fewer than a full read: the connection is empty, and the stream
        // is dense: wait for more.
        assert!(g.after_read(6, false));
        assert!(g.after_read(DENSE, false));
        // Below DENSE: at once.
        assert!(!g.after_read(3, false));
        // A larger read than any before is not taken for an emptying one.
        assert!(!g.after_read(12, false));
        assert!(g.after_read(9, false));
    }
}
