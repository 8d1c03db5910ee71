//! Store and forward: the SQLite outbox, and the writer and uplink that
//! fill and drain it.

pub mod outbox;
pub mod uplink;
