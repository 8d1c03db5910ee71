//! The JSON decoder on arbitrary bytes, under every time format and series
//! source: it must never panic, and every reading it produces is finite.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_collectors::decode::{DecodeSink, JsonDecoder, JsonMapping, SeriesSource, TimeFormat};
use sluice_collectors::{Reading, Reason};

struct Check;

impl DecodeSink for Check {
    fn reading(&mut self, r: Reading) {
        assert!(r.value.is_finite());
        assert!(!r.series.is_empty());
    }
    fn reject(&mut self, _: Reason, _: &dyn std::fmt::Display) {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, message)) = data.split_first() else { return };
    let format = [
        TimeFormat::EpochMs,
        TimeFormat::EpochS,
        TimeFormat::EpochUs,
        TimeFormat::EpochNs,
        TimeFormat::Rfc3339,
        TimeFormat::Ingest,
    ][usize::from(selector % 6)];
    let series = match selector / 6 % 3 {
        0 => SeriesSource::Field("sensor".into()),
        1 => SeriesSource::TopicSegment(1),
        _ => SeriesSource::Field("a.b".into()),
    };
    let values = if selector & 0x80 != 0 { vec!["*".into()] } else { vec!["value".into(), "x.y".into()] };
    let mut d = JsonDecoder::new(JsonMapping { series, timestamp_format: format, values, ..JsonMapping::default() });
    // Twice, to exercise the reuse of the decoder's buffers.
    d.decode(message, Some("sensors/s-1"), 1_732_600_000_000, &mut Check);
    d.decode(message, None, 0, &mut Check);
});
