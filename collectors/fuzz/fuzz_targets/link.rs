//! The node link's deframer on arbitrary bytes split at arbitrary points:
//! never a panic, the same records whatever the split, and every record it
//! returns turns into a node record or a refusal (the serial source's path).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_collectors::node::NodeRecord;
use sluice_core::link::Deframer;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
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
    let pieces = collect(&mut stream.chunks(usize::from(split).max(1)));
    assert_eq!(whole, pieces);
});
