//! Outbox append and ack rates on a real SQLite file (WAL), with NORMAL and
//! FULL durability, in batches as the writer thread makes them.
//!
//! `cargo bench -p sluice-benches --bench outbox` (`RECORDS` in the
//! environment changes the default of 200,000 per run).

use std::time::Instant;

use sluice::store::outbox::{Durability, OnCorrupt, Outbox};

fn main() {
    let n: usize = std::env::var("RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = std::env::temp_dir().join(format!("sluice-outbox-bench-{}", std::process::id()));
    // A typical aggregate record: about 200 bytes of JSON.
    let payload = br#"{"agent":"gateway-01","series":"s-0042","start":1732600000000,"end":1732600001000,"count":20,"sum":427.4,"mean":21.37,"min":19.8,"max":23.1,"stddev":0.92,"first":21.1,"last":20.9,"late":0,"partial":false}"#.to_vec();
    println!("{n} records of {} bytes per run", payload.len());
    for durability in [Durability::Normal, Durability::Full] {
        for batch in [1usize, 64, 512] {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("outbox.db");
            let mut outbox = Outbox::open(&path, durability, OnCorrupt::Refuse, u64::MAX, u64::MAX)
                .unwrap()
                .0;
            let records: Vec<(String, Vec<u8>)> = (0..batch)
                .map(|_| ("sluice/gateway-01/agg/s-0042".to_string(), payload.clone()))
                .collect();
            // FULL with single-record transactions is an fsync per record: fewer.
            let total = if durability == Durability::Full && batch == 1 {
                n / 50
            } else {
                n
            };
            let start = Instant::now();
            let mut seqs = Vec::with_capacity(total);
            let mut done = 0;
            while done < total {
                seqs.extend(outbox.append(&records, 0).unwrap());
                done += batch;
            }
            let append = done as f64 / start.elapsed().as_secs_f64();
            let start = Instant::now();
            for chunk in seqs.chunks(64) {
                outbox.ack(chunk).unwrap();
            }
            let ack = seqs.len() as f64 / start.elapsed().as_secs_f64();
            println!(
                "{durability:?} batch {batch:>3}: append {append:>10.0} records/s, ack (batches of 64) {ack:>10.0} records/s"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
