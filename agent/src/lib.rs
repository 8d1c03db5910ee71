//! The Sluice agent: configuration, CLI commands, pipeline wiring, workers
//! and outputs.
//!
//! # Layout
//!
//! - [`cli`]: the command line.
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`crash`]: crash points for the crash tests (`SLUICE_CRASH_AT`).
//! - [`rules`]: series rules compiled into core windows and detectors.
//! - [`worker`]: worker threads that own their series.
//! - [`outbox`]: the SQLite store-and-forward queue.
//! - [`output`]: aggregate and alert records, and their delivery.
//! - [`topic`]: series and agent ids as topic levels; topics no broker takes.
//! - [`metrics`]: Prometheus `/metrics` and the periodic stats message.
//! - [`uplink`]: the outbox writer and the uplink to the upstream broker.
//! - [`pipeline`]: wiring and orderly shutdown.
//! - [`demo`]: `sluice demo`, the pipeline on generated sensors.
//!
//! `main.rs` only parses the command line and calls into these.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod crash;
pub mod demo;
pub mod metrics;
pub mod outbox;
pub mod output;
pub mod pipeline;
pub mod rules;
pub mod service;
pub mod topic;
pub mod uplink;
pub mod worker;
