//! The node link's deframer on arbitrary bytes split at arbitrary points:
//! never a panic, the same records whatever the split, and every record it
//! returns turns into a node record or a refusal (the serial source's path).
//! Half the inputs are wrapped in a frame with a valid checksum first, so
//! that arbitrary payloads of every kind reach the record parser.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_collectors::node::NodeRecord;
use sluice_core::link::{Deframer, MAGIC, MAX_PAYLOAD, VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let framed;
    let stream = match rest.split_first() {
        Some((&kind, payload)) if split & 1 == 1 && payload.len() <= MAX_PAYLOAD => {
            let mut f = MAGIC.to_vec();
            f.push(VERSION);
            f.push(kind % 8);
            f.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            f.extend_from_slice(payload);
            let sum = sluice_core::hash::hash64(&f[2..], 0) as u32;
            f.extend_from_slice(&sum.to_le_bytes());
            framed = f;
            &framed[..]
        }
        _ => rest,
    };
    let collect = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut d = Box::new(Deframer::new());
        let mut out = Vec::new();
        for chunk in chunks {
            let mut fed = 0;
            while fed < chunk.len() {
                fed += d.feed(&chunk[fed..]);
                while let Some(r) = d.next() {
                    out.push(r.as_ref().ok().map(NodeRecord::from_link));
                }
            }
        }
        out
    };
    let whole = collect(&mut std::iter::once(stream));
    let pieces = collect(&mut stream.chunks(usize::from(split >> 1).max(1)));
    assert_eq!(whole, pieces);
});
