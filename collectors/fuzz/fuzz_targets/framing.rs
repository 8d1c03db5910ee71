//! Serial and UDP framing on arbitrary bytes split at arbitrary points: never
//! a panic, never a line longer than the maximum, and the same lines whatever
//! the split.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_collectors::frame::{LineFramer, lines};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let max = 16;
    let collect = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut framer = LineFramer::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            framer.push(chunk, |l| out.push(l.map(<[u8]>::to_vec)));
        }
        out
    };
    let whole = collect(&mut std::iter::once(stream));
    let pieces = collect(&mut stream.chunks(usize::from(split).max(1)));
    assert_eq!(whole, pieces);
    for line in whole.iter().flatten() {
        assert!(line.len() <= max && !line.is_empty());
    }
    for line in lines(stream).flatten() {
        assert!(!line.is_empty() && !line.contains(&b'\n'));
    }
});
