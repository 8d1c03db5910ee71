//! The Sluice agent: configuration, CLI commands, pipeline wiring, workers
//! and outputs.
//!
//! # Layout
//!
//! The folders follow the data path; each module depends only on the ones
//! below it in this list (and on `sluice-core` and `sluice-collectors`):
//!
//! - [`ops::crash`]: crash points for the crash tests (`SLUICE_CRASH_AT`).
//! - [`output::topic`]: series and agent ids as topic levels; topics no
//!   broker takes.
//! - [`store::outbox`]: the SQLite store-and-forward queue, checkpoints and
//!   window marks.
//! - [`pipeline::rules`]: what a rule asks for (the `[[rules]]` settings)
//!   and its compiled form: core windows and detectors.
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`store::uplink`]: the outbox writer and the uplink to the upstream
//!   broker.
//! - [`output`]: aggregate and alert records and their delivery (MQTT,
//!   console).
//! - [`pipeline::checkpoint`], [`pipeline::worker`]: the workers that own
//!   their series, and their saved state.
//! - [`ops::metrics`]: the running pipeline's counters, Prometheus
//!   `/metrics` and the periodic stats message.
//! - [`pipeline`]: wiring and orderly shutdown.
//! - [`ops::service`]: systemd readiness and the watchdog.
//! - [`demo`], [`sketch`], [`cli`]: `sluice demo`, `sluice sketch merge`,
//!   and the command line.
//!
//! `main.rs` only parses the command line and calls into these.

pub mod cli;
pub mod config;
pub mod demo;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod sketch;
pub mod store;
