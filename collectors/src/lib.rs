//! Sluice's sources and codecs.
//!
//! # Layout
//!
//! - [`reading`]: the [`Reading`] that crosses to the workers (fixed size,
//!   series key inline).
//! - [`decode`]: the simd-json decoder and its [`JsonMapping`] from config.
//! - [`frame`]: newline framing of streams and datagrams, bounded.
//! - [`pipe`]: the [`Handoff`]: sharding by series, shedding, and the rings.
//! - [`stats`]: per-source counters and rate-limited logging of bad input.
//! - [`udp`], [`serial`], [`mqtt`]: the sources, each an async task that runs
//!   until its shutdown token is cancelled and never stops on bad input or a
//!   lost peer.
//! - [`backoff`]: capped exponential backoff with jitter for reconnects.
//!
//! Architecture invariant: this crate knows nothing of workers, alerts or the
//! outbox; its output is readings in rings, and counters.

pub mod backoff;
pub mod decode;
pub mod frame;
pub mod mqtt;
pub mod node;
pub mod pipe;
pub mod reading;
pub mod serial;
mod source;
pub mod stats;
pub mod udp;

pub use decode::{JsonDecoder, JsonMapping};
pub use pipe::{Handoff, ReadingConsumer, ReadingProducer, reading_ring};
pub use reading::{MAX_SERIES_LEN, Reading, SeriesKey};
pub use stats::{Reason, SourceStats};
