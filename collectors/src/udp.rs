//! The UDP source: JSON readings in datagrams, one or more per datagram
//! (newline separated).
//!
//! A flood does not cost a wake-up per datagram: after each readiness
//! notification the source drains up to `batch` datagrams with non-blocking
//! receives, decodes them all, and hands the readings to the rings in one
//! flush. Datagrams longer than `max_datagram` are refused (the kernel
//! truncates them, so they could not be decoded anyway), and so are datagrams
//! from senders outside the allow-list.
//!
//! A flood the source cannot keep up with fills the socket's receive buffer,
//! and the kernel drops what does not fit. The source reads the socket's
//! drop count after each batch (`SO_MEMINFO`, Linux), so that those losses
//! are counted (`kernel_drops`) and logged too; `recv_buffer` enlarges the
//! buffer.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::decode::{JsonDecoder, JsonMapping};
use crate::frame::lines;
use crate::pipe::Handoff;
use crate::reading::now_ms;
use crate::source::{Ingest, LOG_INTERVAL};
use crate::stats::{RateLimitedLog, Reason, SourceStats, add};

/// Settings of a UDP source.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UdpSettings {
    /// Address and port to listen on, e.g. `127.0.0.1:9000` or `[::]:9000`.
    pub bind: SocketAddr,
    /// Largest datagram accepted, in bytes. Default 8192.
    #[serde(default = "default_max_datagram")]
    pub max_datagram: usize,
    /// Senders allowed, as addresses or CIDR networks (`10.0.0.0/8`,
    /// `192.168.1.7/32`); empty (the default) allows everyone.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Datagrams drained per wake-up. Default 64.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Receive buffer to ask the kernel for, in bytes (`SO_RCVBUF`): a larger
    /// one rides out a longer burst before the kernel drops datagrams (see
    /// `kernel_drops`). The kernel caps it at `net.core.rmem_max`, and the
    /// source logs when it did. Default: the system's
    /// (`net.core.rmem_default`, often 208 KiB).
    #[serde(default)]
    pub recv_buffer: Option<usize>,
    /// Where the fields of a reading are.
    #[serde(default)]
    pub json: JsonMapping,
}

const fn default_max_datagram() -> usize {
    8192
}

const fn default_batch() -> usize {
    64
}

impl UdpSettings {
    /// Settings with the defaults, listening on `bind`.
    pub fn new(bind: SocketAddr) -> Self {
        Self {
            bind,
            max_datagram: default_max_datagram(),
            allow: Vec::new(),
            batch: default_batch(),
            recv_buffer: None,
            json: JsonMapping::default(),
        }
    }

    /// Checks the settings; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=65_507).contains(&self.max_datagram) {
            return Err("max_datagram: must be 1..=65507".into());
        }
        if self.batch == 0 {
            return Err("batch: must be >= 1".into());
        }
        if self
            .recv_buffer
            .is_some_and(|b| !(4096..=1 << 30).contains(&b))
        {
            return Err("recv_buffer: must be 4096..=1073741824 bytes".into());
        }
        self.json.validate().map_err(|e| format!("json.{e}"))
    }
}

/// A bound UDP source.
pub struct UdpSource {
    socket: UdpSocket,
    settings: UdpSettings,
    decoder: JsonDecoder,
    handoff: Handoff,
    log: RateLimitedLog,
    name: String,
    /// When kernel drops were last logged, and the count then.
    drops_logged: (Option<Instant>, u64),
}

impl UdpSource {
    /// Binds the socket. Readings go to `handoff`.
    pub async fn bind(name: &str, settings: UdpSettings, handoff: Handoff) -> io::Result<Self> {
        let socket = match settings.recv_buffer {
            None => UdpSocket::bind(settings.bind).await?,
            Some(size) => {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(settings.bind),
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )?;
                socket.set_recv_buffer_size(size)?;
                socket.bind(&settings.bind.into())?;
                socket.set_nonblocking(true)?;
                // Linux reports twice what it grants (the other half is its
                // bookkeeping).
                let granted = socket.recv_buffer_size()? / 2;
                if granted < size {
                    tracing::warn!(
                        source = name,
                        asked = size,
                        granted,
                        "recv_buffer capped by the kernel (raise net.core.rmem_max)"
                    );
                }
                UdpSocket::from_std(socket.into())?
            }
        };
        add(&handoff.stats().connects, 1);
        handoff.stats().up.store(true, Relaxed);
        Ok(Self {
            socket,
            decoder: JsonDecoder::new(settings.json.clone()),
            settings,
            handoff,
            log: RateLimitedLog::new(name, LOG_INTERVAL),
            name: name.to_owned(),
            drops_logged: (None, 0),
        })
    }

    /// Datagrams the kernel has dropped at this socket since it was bound
    /// (`None` where the system cannot tell).
    #[cfg(target_os = "linux")]
    fn socket_drops(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: the fd is this source's open socket; getsockopt writes at
        // most `len` bytes (the size of `info`, which we own) and stores the
        // length written in `len`.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = (libc::SK_MEMINFO_DROPS as usize + 1) * std::mem::size_of::<u32>();
        (rc == 0 && len as usize >= needed)
            .then(|| u64::from(info[libc::SK_MEMINFO_DROPS as usize]))
    }

    #[cfg(not(target_os = "linux"))]
    fn socket_drops(&self) -> Option<u64> {
        None
    }

    /// Counts the kernel's drops at this socket; logs growth at most once
    /// per `LOG_INTERVAL`.
    fn count_kernel_drops(&mut self) {
        let Some(drops) = self.socket_drops() else {
            return;
        };
        self.handoff.stats().kernel_drops.store(drops, Relaxed);
        let (last, logged) = self.drops_logged;
        if drops > logged && last.is_none_or(|t| t.elapsed() >= LOG_INTERVAL) {
            tracing::warn!(
                source = %self.name,
                dropped = drops - logged,
                total = drops,
                "the UDP receive buffer overflowed: the kernel dropped datagrams the source could not read in time (raise the source's recv_buffer, or lower the rate)"
            );
            self.drops_logged = (Some(Instant::now()), drops);
        }
    }

    /// The address actually bound (the port, when `bind` asked for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The socket's receive buffer, in bytes, as the kernel reports it
    /// (on Linux, twice what it granted).
    pub fn recv_buffer_size(&self) -> io::Result<usize> {
        socket2::SockRef::from(&self.socket).recv_buffer_size()
    }

    /// The source's counters.
    pub fn stats(&self) -> Arc<SourceStats> {
        self.handoff.stats().clone()
    }

    /// Receives until `shutdown` is cancelled. A receive error is logged and
    /// counted; it does not stop the source.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut buf = vec![0u8; self.settings.max_datagram + 1];
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ready = self.socket.readable() => {
                    if let Err(e) = ready {
                        tracing::warn!(error = %e, "UDP socket not readable");
                        continue;
                    }
                }
            }
            self.drain(&mut buf);
        }
    }

    /// Receives and decodes up to `batch` waiting datagrams, then flushes.
    fn drain(&mut self, buf: &mut [u8]) {
        let stats = self.handoff.stats().clone();
        let ingest = now_ms();
        for _ in 0..self.settings.batch {
            let (n, from) = match self.socket.try_recv_from(buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    add(&stats.disconnects, 1);
                    tracing::warn!(error = %e, "UDP receive failed");
                    break;
                }
            };
            add(&stats.bytes, n as u64);
            let sender = from.ip().to_canonical();
            let mut ingest_sink = Ingest {
                handoff: &mut self.handoff,
                log: &self.log,
            };
            if !self.settings.allow.is_empty()
                && !self.settings.allow.iter().any(|net| net.contains(&sender))
            {
                add(&stats.messages, 1);
                crate::decode::DecodeSink::reject(
                    &mut ingest_sink,
                    Reason::SenderNotAllowed,
                    &format_args!("datagram from {from}"),
                );
                continue;
            }
            if n > self.settings.max_datagram {
                add(&stats.messages, 1);
                crate::decode::DecodeSink::reject(
                    &mut ingest_sink,
                    Reason::Oversize,
                    &format_args!(
                        "datagram of more than {} bytes from {from}",
                        self.settings.max_datagram
                    ),
                );
                continue;
            }
            for line in lines(&buf[..n]) {
                add(&stats.messages, 1);
                match line {
                    Ok(line) => self.decoder.decode(line, None, ingest, &mut ingest_sink),
                    Err(reason) => crate::decode::DecodeSink::reject(
                        &mut ingest_sink,
                        reason,
                        &format_args!("from {from}"),
                    ),
                }
            }
        }
        self.handoff.flush();
        self.count_kernel_drops();
    }
}
