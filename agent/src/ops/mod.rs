//! Operating the agent: its counters and metrics, systemd, and the crash
//! points the crash tests use.

pub mod crash;
pub mod metrics;
pub mod service;
