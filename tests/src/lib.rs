//! Integration, end-to-end and fault-injection tests that span Sluice's
//! crates live in this package's `tests/` folder; this library holds what they
//! share. Production code never depends on it.
