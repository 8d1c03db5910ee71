//! The serial source: newline-delimited JSON readings from a serial port,
//! or, with `format = "frames"`, a sensor node's framed records
//! ([`sluice_core::link`]), which go to the agent's merger instead of the
//! rings.
//!
//! The port is opened with the configured baud rate and framing, read into a
//! [`LineFramer`] that refuses over-long lines, and reopened with capped
//! exponential backoff whenever it fails or disappears (a USB adapter
//! unplugged) until it comes back. Point `device` at a stable name such as
//! `/dev/serial/by-id/…`, which udev recreates when the adapter returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio_serial::{DataBits, Parity, SerialPortBuilderExt, StopBits};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::decode::{DecodeSink, JsonDecoder, JsonMapping};
use crate::frame::LineFramer;
use crate::node::NodeRecord;
use crate::pipe::Handoff;
use crate::reading::now_ms;
use crate::source::{Ingest, LOG_INTERVAL};
use crate::stats::{RateLimitedLog, Reason, SourceStats, add};

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SerialParity {
    /// No parity bit.
    #[default]
    None,
    /// Odd parity.
    Odd,
    /// Even parity.
    Even,
}

/// What a serial line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SerialFormat {
    /// Newline-delimited JSON readings (mapped by `json`).
    #[default]
    Json,
    /// A Sluice sensor node's framed records (windows, sketches, alerts):
    /// the source sends the node the time when it opens the port, and
    /// hands what the node sends to the agent, which merges it.
    Frames,
}

/// Settings of a serial source.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSettings {
    /// The device, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/usb-…`.
    pub device: PathBuf,
    /// Baud rate. Default 9600.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Data bits: 5, 6, 7 or 8. Default 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// Parity: `none`, `odd` or `even`. Default `none`.
    #[serde(default)]
    pub parity: SerialParity,
    /// Stop bits: 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// What the line carries: `json` (readings, one per line; the default)
    /// or `frames` (a Sluice sensor node's records).
    #[serde(default)]
    pub format: SerialFormat,
    /// Longest line accepted, in bytes. Default 4096.
    #[serde(default = "default_max_line")]
    pub max_line: usize,
    /// First delay before reopening a failed port, in ms. Default 500.
    #[serde(default = "default_reopen_min_ms")]
    pub reopen_min_ms: u64,
    /// Longest delay between reopen attempts, in ms. Default 30,000.
    #[serde(default = "default_reopen_max_ms")]
    pub reopen_max_ms: u64,
    /// Where the fields of a reading are.
    #[serde(default)]
    pub json: JsonMapping,
}

const fn default_baud() -> u32 {
    9600
}
const fn default_data_bits() -> u8 {
    8
}
const fn default_stop_bits() -> u8 {
    1
}
const fn default_max_line() -> usize {
    4096
}
const fn default_reopen_min_ms() -> u64 {
    500
}
const fn default_reopen_max_ms() -> u64 {
    30_000
}

impl SerialSettings {
    /// Settings with the defaults, for `device`.
    pub fn new(device: impl Into<PathBuf>) -> Self {
        Self {
            device: device.into(),
            baud: default_baud(),
            format: SerialFormat::Json,
            data_bits: default_data_bits(),
            parity: SerialParity::None,
            stop_bits: default_stop_bits(),
            max_line: default_max_line(),
            reopen_min_ms: default_reopen_min_ms(),
            reopen_max_ms: default_reopen_max_ms(),
            json: JsonMapping::default(),
        }
    }

    /// Checks the settings; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        self.data_bits()?;
        self.stop_bits()?;
        if self.baud == 0 {
            return Err("baud: must be > 0".into());
        }
        if self.max_line == 0 {
            return Err("max_line: must be > 0".into());
        }
        if self.reopen_min_ms == 0 {
            return Err("reopen_min_ms: must be > 0".into());
        }
        self.json.validate().map_err(|e| format!("json.{e}"))
    }

    fn data_bits(&self) -> Result<DataBits, String> {
        match self.data_bits {
            5 => Ok(DataBits::Five),
            6 => Ok(DataBits::Six),
            7 => Ok(DataBits::Seven),
            8 => Ok(DataBits::Eight),
            n => Err(format!("data_bits: must be 5, 6, 7 or 8, not {n}")),
        }
    }

    fn stop_bits(&self) -> Result<StopBits, String> {
        match self.stop_bits {
            1 => Ok(StopBits::One),
            2 => Ok(StopBits::Two),
            n => Err(format!("stop_bits: must be 1 or 2, not {n}")),
        }
    }
}

/// A serial source.
pub struct SerialSource {
    settings: SerialSettings,
    decoder: JsonDecoder,
    handoff: Handoff,
    log: RateLimitedLog,
    nodes: Option<tokio::sync::mpsc::Sender<NodeRecord>>,
}

impl SerialSource {
    /// A source for validated `settings`; readings go to `handoff`.
    pub fn new(name: &str, settings: SerialSettings, handoff: Handoff) -> Result<Self, String> {
        settings.validate()?;
        Ok(Self {
            decoder: JsonDecoder::new(settings.json.clone()),
            settings,
            handoff,
            log: RateLimitedLog::new(name, LOG_INTERVAL),
            nodes: None,
        })
    }

    /// Where a `frames` source sends its node's records. Without it, a
    /// `frames` source reads and counts them, and sends them nowhere.
    pub fn with_nodes(mut self, nodes: tokio::sync::mpsc::Sender<NodeRecord>) -> Self {
        self.nodes = Some(nodes);
        self
    }

    /// The source's counters.
    pub fn stats(&self) -> Arc<SourceStats> {
        self.handoff.stats().clone()
    }

    /// Opens, reads and reopens until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let s = &self.settings;
        let mut backoff = Backoff::new(
            Duration::from_millis(s.reopen_min_ms),
            Duration::from_millis(s.reopen_max_ms),
            now_ms() as u64,
        );
        let mut framer = LineFramer::new(s.max_line);
        let mut deframer = Box::new(sluice_core::link::Deframer::new());
        let mut buf = vec![0u8; 4096];
        let mut failing_since_logged = false;
        while !shutdown.is_cancelled() {
            let builder =
                tokio_serial::new(self.settings.device.to_string_lossy(), self.settings.baud)
                    .data_bits(self.settings.data_bits().unwrap_or(DataBits::Eight))
                    .stop_bits(self.settings.stop_bits().unwrap_or(StopBits::One))
                    .parity(match self.settings.parity {
                        SerialParity::None => Parity::None,
                        SerialParity::Odd => Parity::Odd,
                        SerialParity::Even => Parity::Even,
                    });
            match builder.open_native_async() {
                Ok(mut port) => {
                    add(&self.handoff.stats().connects, 1);
                    self.handoff
                        .stats()
                        .up
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(device = %self.settings.device.display(), "serial port open");
                    backoff.reset();
                    failing_since_logged = false;
                    framer.reset();
                    let cause = match self.settings.format {
                        SerialFormat::Json => {
                            self.read_until_error(&mut port, &mut framer, &mut buf, &shutdown)
                                .await
                        }
                        SerialFormat::Frames => {
                            self.read_frames(&mut port, &mut deframer, &mut buf, &shutdown)
                                .await
                        }
                    };
                    if shutdown.is_cancelled() {
                        break;
                    }
                    add(&self.handoff.stats().disconnects, 1);
                    self.handoff
                        .stats()
                        .up
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(device = %self.settings.device.display(), "serial port lost: {cause}; reopening");
                }
                Err(e) => {
                    // Log the first failure of a run of them, not every retry.
                    if !failing_since_logged {
                        tracing::warn!(device = %self.settings.device.display(), error = %e, "cannot open serial port; retrying");
                        failing_since_logged = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Sends the node the time, then reads its frames until the port
    /// fails, returns end-of-file, or shutdown. Each frame counts as a
    /// message; a bad one (noise, a damaged frame, a record the series id
    /// policy refuses) is a counted, logged refusal, and the rest of the
    /// stream is still read.
    async fn read_frames(
        &mut self,
        port: &mut tokio_serial::SerialStream,
        deframer: &mut sluice_core::link::Deframer,
        buf: &mut [u8],
        shutdown: &CancellationToken,
    ) -> String {
        use sluice_core::link::{LinkError, MAX_FRAME, Record, encode};
        use tokio::io::AsyncWriteExt;

        // What came before this open does not continue into it.
        deframer.reset();
        let mut sync = [0u8; MAX_FRAME];
        let n = match encode(&Record::Sync { unix_ms: now_ms() }, &mut sync) {
            Ok(n) => n,
            Err(e) => return format!("cannot encode the sync frame: {e}"),
        };
        if let Err(e) = port.write_all(&sync[..n]).await {
            return format!("cannot send the node the time: {e}");
        }
        let stats = self.handoff.stats().clone();
        let mut records = Vec::new();
        loop {
            let n = match read_some(port, buf, shutdown).await {
                Ok(n) => n,
                Err(cause) => return cause,
            };
            add(&stats.bytes, n as u64);
            let mut fed = 0;
            while fed < n {
                fed += deframer.feed(&buf[fed..n]);
                while let Some(frame) = deframer.next() {
                    add(&stats.messages, 1);
                    match frame {
                        Ok(record) => match NodeRecord::from_link(&record) {
                            Ok(Some(r)) => records.push(r),
                            Ok(None) => {}
                            Err(why) => {
                                stats.reject(Reason::BadSeries);
                                self.log.warn(
                                    Reason::BadSeries,
                                    &format_args!("node record refused: its id holds {why}"),
                                );
                            }
                        },
                        Err(LinkError::Checksum) => {
                            stats.reject(Reason::Malformed);
                            self.log.warn(
                                Reason::Malformed,
                                &"node frame with a bad checksum (line noise?)",
                            );
                        }
                        Err(e) => {
                            stats.reject(Reason::Malformed);
                            self.log
                                .warn(Reason::Malformed, &format_args!("node frame refused: {e}"));
                        }
                    }
                }
            }
            for record in records.drain(..) {
                add(&stats.decoded, 1);
                if let Some(nodes) = &self.nodes {
                    // A full merger holds the line back (the node's UART
                    // then waits), never drops a record.
                    tokio::select! {
                        _ = shutdown.cancelled() => return "shutdown".into(),
                        r = nodes.send(record) => if r.is_err() {
                            return "the merger stopped".into();
                        },
                    }
                }
            }
        }
    }

    /// Reads lines until the port fails, returns end-of-file, or shutdown.
    async fn read_until_error(
        &mut self,
        port: &mut tokio_serial::SerialStream,
        framer: &mut LineFramer,
        buf: &mut [u8],
        shutdown: &CancellationToken,
    ) -> String {
        loop {
            let n = match read_some(port, buf, shutdown).await {
                Ok(n) => n,
                Err(cause) => return cause,
            };
            let stats = self.handoff.stats().clone();
            add(&stats.bytes, n as u64);
            let ingest = now_ms();
            let mut sink = Ingest {
                handoff: &mut self.handoff,
                log: &self.log,
            };
            let decoder = &mut self.decoder;
            framer.push(&buf[..n], |line| {
                add(&stats.messages, 1);
                match line {
                    Ok(line) => decoder.decode(line, None, ingest, &mut sink),
                    Err(Reason::Oversize) => {
                        sink.reject(Reason::Oversize, &"line longer than max_line")
                    }
                    Err(reason) => sink.reject(reason, &"blank line"),
                }
            });
            self.handoff.flush();
        }
    }
}

/// Reads what the port has into `buf`; `Err` says why reading ended (the
/// port failed, returned end-of-file, or shutdown).
async fn read_some(
    port: &mut tokio_serial::SerialStream,
    buf: &mut [u8],
    shutdown: &CancellationToken,
) -> Result<usize, String> {
    tokio::select! {
        _ = shutdown.cancelled() => Err("shutdown".into()),
        r = port.read(buf) => match r {
            Ok(0) => Err("end of file".into()),
            Ok(n) => Ok(n),
            Err(e) => Err(e.to_string()),
        },
    }
}
