//! What the uplink benchmarks share: an outbox file with its writer, and the
//! agent's uplink forwarding it on a thread of its own (included with
//! `#[path]` by `outbox_drain.rs` and `uplink_latency.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use sluice::config::UplinkConfig;
use sluice::store::outbox::{Durability, OnCorrupt, Outbox};
use sluice::store::uplink::{UplinkStats, run_uplink};

/// Opens (creating) the outbox at `path` with no limits.
pub fn open(path: &std::path::Path) -> Outbox {
    Outbox::open(
        path,
        Durability::Normal,
        OnCorrupt::Refuse,
        u64::MAX,
        u64::MAX,
    )
    .unwrap()
    .0
}

/// The uplink of agent `gateway-01` forwarding the outbox at `path` to an
/// upstream of `kind` on 127.0.0.1:`port`, `inflight` records in flight.
pub struct Uplink {
    /// What it counts (acknowledgements among them).
    pub stats: Arc<UplinkStats>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Uplink {
    /// Starts it.
    pub fn start(path: &std::path::Path, kind: &str, port: u16, inflight: u16) -> Uplink {
        let config: UplinkConfig = serde_json::from_value(serde_json::json!({
            "kind": kind, "host": "127.0.0.1", "port": port, "max_inflight": inflight,
            "client_id": format!("bench-{kind}-{inflight}"),
        }))
        .unwrap();
        let (stats, stop) = (
            Arc::new(UplinkStats::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = {
            let (reader, stats, stop) = (open(path), stats.clone(), stop.clone());
            std::thread::spawn(move || {
                run_uplink(
                    reader,
                    config,
                    "gateway-01".into(),
                    stats,
                    stop,
                    Default::default(),
                )
            })
        };
        Uplink {
            stats,
            stop,
            thread,
        }
    }

    /// Stops it and waits for its thread.
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        self.thread.thread().unpark();
        self.thread.join().unwrap();
    }
}
