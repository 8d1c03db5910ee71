//! Benchmarks for Sluice: criterion micro-benchmarks under `benches/`, run
//! with `cargo bench -p sluice-benches`, and what they share. See `README.md`
//! for the method and the figures.

pub mod spsc;
pub mod upstream;
