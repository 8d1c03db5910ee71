//! Benchmarks for Sluice: criterion micro-benchmarks under `benches/`, run
//! with `cargo bench -p sluice-benches`. See `README.md` for the method and
//! the figures.
