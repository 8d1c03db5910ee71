#![doc = include_str!("../README.md")]
#![no_std]
#![deny(missing_docs)]

// Miri only: see `math`.
#[cfg(miri)]
extern crate std;

pub mod aggregate;
pub mod anomaly;
pub mod hash;
pub mod join;
pub mod link;
mod math;
pub mod node;
pub mod pattern;
pub mod ring;
pub mod rng;
pub mod shed;
pub mod sketch;
mod sync;
pub mod window;

/// An event time: a signed count of some unit since some epoch. The core does
/// not care which, as long as window sizes and lateness use the same unit; the
/// agent uses milliseconds since the Unix epoch.
pub type Timestamp = i64;

/// The largest event time (and the negation of the smallest) that windows
/// accept: 2⁶², which in milliseconds is about 146 million years. The margin
/// to `i64::MAX` keeps window arithmetic free of overflow.
pub const MAX_TIMESTAMP: Timestamp = 1 << 62;

/// The largest magnitude of a value that windows, aggregates and detectors
/// accept: 10¹⁰⁰. Within it, no sum, mean, variance or z-score can overflow
/// (a square is at most 4·10²⁰⁰, and 2⁵³ of them stay finite), so a finite
/// reading can never turn a series' state into infinities or NaN; beyond it
/// a value is refused like NaN (`Rejection::TooLarge`). No sensor measures
/// anything near it; such a value is a fault.
pub const MAX_VALUE: f64 = 1e100;
