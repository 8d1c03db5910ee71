//! Decoding typical readings: Sluice's simd-json decoder (mapping, checks and
//! `Reading` construction included) against serde_json doing the same job,
//! in the same run.
//!
//! serde_json runs in two forms: `serde_json::Value`, the form a decoder
//! whose field names come from the configuration at run time must use (as
//! Sluice's does), and, for W1's fixed shape, a typed struct with borrowed
//! strings whose field names are compiled in: its fastest form, but not one a
//! configurable agent can use.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde::Deserialize;
use sluice_collectors::decode::{DecodeSink, JsonDecoder, JsonMapping};
use sluice_collectors::{Reading, Reason, SeriesKey};

const NOW: i64 = 1_732_600_000_000;
const W1: &str = r#"{"sensor":"s-0042","ts":1732600000123,"value":21.37}"#;
const TEN: &str = r#"{"sensor":"s-0042","ts":1732600000123,"temperature":21.37,"humidity":40.2,"pressure":1013.25,"co2":412,"pm25":7.5,"pm10":12.1,"voc":0.31,"noise":41.8,"lux":320,"battery":3.71}"#;

/// Counts readings, as a ring hand-off would take them.
#[derive(Default)]
struct Count(u64, f64);

impl DecodeSink for Count {
    fn reading(&mut self, r: Reading) {
        self.0 += 1;
        self.1 += r.value;
        black_box(&r);
    }
    fn reject(&mut self, _: Reason, _: &dyn std::fmt::Display) {}
}

#[derive(Deserialize)]
struct W1Msg<'a> {
    sensor: &'a str,
    ts: i64,
    value: f64,
}

fn serde_w1(msg: &[u8], out: &mut Count) {
    let Ok(m) = serde_json::from_slice::<W1Msg<'_>>(msg) else {
        return;
    };
    let Ok(series) = SeriesKey::try_from(m.sensor) else {
        return;
    };
    if m.value.is_finite() && (m.ts - NOW).abs() < 300_000 {
        out.reading(Reading {
            series,
            ts: m.ts,
            value: m.value,
            ingest: NOW,
            weight: 1,
            labels: None,
        });
    }
}

fn serde_generic(msg: &[u8], out: &mut Count) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(msg)
    else {
        return;
    };
    let Some(sensor) = map.get("sensor").and_then(|v| v.as_str()) else {
        return;
    };
    let Some(ts) = map.get("ts").and_then(|v| v.as_i64()) else {
        return;
    };
    for (name, v) in &map {
        if name == "sensor" || name == "ts" {
            continue;
        }
        let Some(value) = v.as_f64() else { continue };
        let mut series = SeriesKey::try_from(sensor).unwrap();
        if series.push('/').is_err() || series.push_str(name).is_err() {
            continue;
        }
        out.reading(Reading {
            series,
            ts,
            value,
            ingest: NOW,
            weight: 1,
            labels: None,
        });
    }
}

fn decode(c: &mut Criterion) {
    for (name, msg, mapping) in [
        ("w1_reading", W1, JsonMapping::default()),
        (
            "ten_fields",
            TEN,
            JsonMapping {
                values: vec!["*".into()],
                ..JsonMapping::default()
            },
        ),
    ] {
        let mut g = c.benchmark_group(format!("decode_{name}"));
        g.throughput(Throughput::Bytes(msg.len() as u64));
        let mut decoder = JsonDecoder::new(mapping);
        let mut out = Count::default();
        decoder.decode(msg.as_bytes(), None, NOW, &mut out);
        let mut check = Count::default();
        serde_generic(msg.as_bytes(), &mut check);
        assert_eq!(check.0, out.0, "both decoders produce the same readings");
        g.bench_function("sluice_simd_json", |b| {
            b.iter(|| decoder.decode(black_box(msg.as_bytes()), None, NOW, &mut out))
        });
        g.bench_function("serde_json_value", |b| {
            b.iter(|| serde_generic(black_box(msg.as_bytes()), &mut out))
        });
        if name == "w1_reading" {
            let mut check = Count::default();
            serde_w1(msg.as_bytes(), &mut check);
            assert_eq!(check.0, 1);
            g.bench_function("serde_json_typed_struct", |b| {
                b.iter(|| serde_w1(black_box(msg.as_bytes()), &mut out))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
