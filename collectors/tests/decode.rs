//! The JSON decoder: mappings, every refusal reason, and random input.

use proptest::prelude::*;
use sluice_collectors::decode::{DecodeSink, JsonDecoder, JsonMapping, SeriesSource, TimeFormat};
use sluice_collectors::{Reading, Reason};

const NOW: i64 = 1_732_600_000_000;

#[derive(Default)]
struct Collect {
    readings: Vec<Reading>,
    rejected: Vec<Reason>,
    details: Vec<String>,
}

impl DecodeSink for Collect {
    fn reading(&mut self, reading: Reading) {
        self.readings.push(reading);
    }
    fn reject(&mut self, reason: Reason, detail: &dyn std::fmt::Display) {
        assert!(!detail.to_string().is_empty());
        self.rejected.push(reason);
        self.details.push(detail.to_string());
    }
}

fn decode_with(mapping: JsonMapping, message: &str, topic: Option<&str>) -> Collect {
    mapping.validate().unwrap();
    let mut d = JsonDecoder::new(mapping);
    let mut out = Collect::default();
    d.decode(message.as_bytes(), topic, NOW, &mut out);
    out
}

fn decode(message: &str) -> Collect {
    decode_with(JsonMapping::default(), message, None)
}

fn series(c: &Collect) -> Vec<(&str, i64, f64)> {
    c.readings
        .iter()
        .map(|r| (r.series.as_str(), r.ts, r.value))
        .collect()
}

#[test]
fn w1_reading() {
    let c = decode(r#"{"sensor":"s-0042","ts":1732600000123,"value":21.37}"#);
    assert_eq!(series(&c), vec![("s-0042", 1_732_600_000_123, 21.37)]);
    assert_eq!(c.readings[0].ingest, NOW);
    assert_eq!(c.readings[0].weight, 1);
    assert!(c.rejected.is_empty());
}

#[test]
fn several_fields_become_several_series() {
    let mapping = JsonMapping {
        values: vec!["temperature".into(), "env.humidity".into()],
        ..JsonMapping::default()
    };
    let c = decode_with(
        mapping,
        r#"{"sensor":7,"ts":1732600000000,"temperature":21.5,"env":{"humidity":40}}"#,
        None,
    );
    assert_eq!(
        series(&c),
        vec![("7/temperature", NOW, 21.5), ("7/env.humidity", NOW, 40.0)]
    );
}

#[test]
fn star_takes_every_numeric_field_and_one_bad_field_refuses_only_itself() {
    let mapping = JsonMapping {
        values: vec!["*".into()],
        ..JsonMapping::default()
    };
    let c = decode_with(
        mapping.clone(),
        r#"{"sensor":"a","ts":1732600000000,"t":1,"unit":"C","h":2.5,"ok":true}"#,
        None,
    );
    assert_eq!(series(&c), vec![("a/t", NOW, 1.0), ("a/h", NOW, 2.5)]);
    let mapping = JsonMapping {
        values: vec!["t".into(), "h".into()],
        ..mapping
    };
    let c = decode_with(
        mapping,
        r#"{"sensor":"a","ts":1732600000000,"t":"hot","h":2}"#,
        None,
    );
    assert_eq!(series(&c), vec![("a/h", NOW, 2.0)]);
    assert_eq!(c.rejected, vec![Reason::NotNumeric]);
}

#[test]
fn labels_come_from_text_or_integer_fields_and_a_bad_one_refuses_the_message() {
    let mapping = || JsonMapping {
        labels: vec!["mac".into(), "meta.site".into()],
        values: vec!["rssi".into(), "battery".into()],
        ..JsonMapping::default()
    };
    let c = decode_with(
        mapping(),
        &format!(
            r#"{{"sensor":"gw1","ts":{NOW},"mac":"AA:BB:CC:00:11:22","meta":{{"site":7}},"rssi":-70,"battery":3.1}}"#
        ),
        None,
    );
    assert_eq!(c.readings.len(), 2);
    for r in &c.readings {
        let labels = r.labels.as_deref().expect("labels");
        assert_eq!(labels.get("mac"), Some("AA:BB:CC:00:11:22"));
        assert_eq!(labels.get("meta.site"), Some("7"));
        assert_eq!(labels.get("other"), None);
    }
    // A missing (or empty) label leaves the reading without it.
    let c = decode_with(
        mapping(),
        &format!(r#"{{"sensor":"gw1","ts":{NOW},"mac":"","rssi":-70}}"#),
        None,
    );
    let labels = c.readings[0].labels.as_deref().unwrap();
    assert_eq!((labels.get("mac"), labels.get("meta.site")), (None, None));
    // Too long, of another type, or holding a control character: the
    // message is refused, named.
    let long = "x".repeat(65);
    for (bad, why) in [
        (format!(r#""{long}""#), "longer than 64 bytes"),
        ("1.5".into(), "not text or an integer"),
        ("true".into(), "not text or an integer"),
        (r#""a\u0000b""#.into(), "a control character"),
    ] {
        let c = decode_with(
            mapping(),
            &format!(r#"{{"sensor":"gw1","ts":{NOW},"mac":{bad},"rssi":-70}}"#),
            None,
        );
        assert!(c.readings.is_empty(), "{bad}");
        assert_eq!(c.rejected, vec![Reason::BadLabel], "{bad}");
        assert!(
            c.details[0].contains("label \"mac\" of gw1"),
            "{}",
            c.details[0]
        );
        assert!(c.details[0].contains(why), "{}", c.details[0]);
    }
    // Without labels in the mapping, readings carry none.
    assert!(
        decode(&format!(r#"{{"sensor":"s","ts":{NOW},"value":1}}"#)).readings[0]
            .labels
            .is_none()
    );
    // The mapping's limits.
    for (labels, why) in [
        (vec!["a", "b", "c", "d", "e"], "at most 4"),
        (vec![""], "must not be empty"),
        (vec!["a", "a"], "named twice"),
    ] {
        let m = JsonMapping {
            labels: labels.into_iter().map(String::from).collect(),
            ..JsonMapping::default()
        };
        assert!(m.validate().unwrap_err().contains(why));
    }
}

#[test]
fn series_from_the_topic() {
    let mapping = JsonMapping {
        series: SeriesSource::TopicSegment(1),
        ..JsonMapping::default()
    };
    let c = decode_with(
        mapping.clone(),
        r#"{"ts":1732600000000,"value":1}"#,
        Some("sensors/s-1"),
    );
    assert_eq!(series(&c), vec![("s-1", NOW, 1.0)]);
    let c = decode_with(
        mapping,
        r#"{"ts":1732600000000,"value":1}"#,
        Some("sensors"),
    );
    assert_eq!(c.rejected, vec![Reason::MissingSeries]);
    let whole = JsonMapping {
        series: SeriesSource::Topic,
        ..JsonMapping::default()
    };
    let c = decode_with(whole, r#"{"ts":1732600000000,"value":1}"#, Some("a/b"));
    assert_eq!(series(&c), vec![("a/b", NOW, 1.0)]);
}

#[test]
fn time_formats() {
    let cases = [
        (TimeFormat::EpochMs, "1732600000123.9", NOW + 123),
        (TimeFormat::EpochS, "1732600000.5", NOW + 500),
        (TimeFormat::EpochUs, "1732600000123456", NOW + 123),
        (TimeFormat::EpochNs, "1732600000123456789", NOW + 123),
        (
            TimeFormat::Rfc3339,
            r#""2024-11-26T05:46:40.250Z""#,
            NOW + 250,
        ),
        (
            TimeFormat::Rfc3339,
            r#""2024-11-26T06:46:40.250+01:00""#,
            NOW + 250,
        ),
        (TimeFormat::Ingest, r#""ignored""#, NOW),
    ];
    for (format, ts, expect) in cases {
        let mapping = JsonMapping {
            timestamp_format: format,
            ..JsonMapping::default()
        };
        let c = decode_with(
            mapping,
            &format!(r#"{{"sensor":"s","ts":{ts},"value":1}}"#),
            None,
        );
        assert_eq!(c.rejected, vec![], "{format:?} {ts}");
        assert_eq!(c.readings[0].ts, expect, "{format:?} {ts}");
    }
}

#[test]
fn bad_json_is_said_in_words_a_user_can_act_on_with_an_excerpt() {
    for (message, detail) in [
        ("nope", "not JSON at byte 0: \"nope\""),
        (
            "{\"sensor\":\"a\",\"value\":tru}",
            "not JSON at byte 22: \"{\\\"sensor\\\":\\\"a\\\",\\\"value\\\":tru}\"",
        ),
        (
            "{\"sensor\":",
            "not JSON: it ends before the value does: \"{\\\"sensor\\\":\"",
        ),
        (
            &format!("{{\"sensor\":\"a\",{}x", " ".repeat(60)),
            "not JSON at byte 74: \"…                              x\"",
        ),
        ("\u{1b}[31m", "not JSON at byte 0: \"\\u{1b}[31m\""),
    ] {
        let c = decode(message);
        assert_eq!(c.rejected, vec![Reason::Malformed], "{message:?}");
        assert_eq!(c.details, vec![detail.to_string()], "{message:?}");
    }
}

#[test]
fn every_refusal_has_its_reason() {
    let long = "x".repeat(65);
    let cases: Vec<(String, Reason)> = vec![
        ("{\"sensor\":".into(), Reason::Malformed),
        ("not json".into(), Reason::Malformed),
        ("[1,2]".into(), Reason::NotAnObject),
        (
            r#"{"ts":1732600000000,"value":1}"#.into(),
            Reason::MissingSeries,
        ),
        (
            r#"{"sensor":"","ts":1732600000000,"value":1}"#.into(),
            Reason::MissingSeries,
        ),
        (
            r#"{"sensor":[1],"ts":1732600000000,"value":1}"#.into(),
            Reason::MissingSeries,
        ),
        (
            format!(r#"{{"sensor":"{long}","ts":1732600000000,"value":1}}"#),
            Reason::SeriesTooLong,
        ),
        (
            r#"{"sensor":"nul\u0000id","ts":1732600000000,"value":1}"#.into(),
            Reason::BadSeries,
        ),
        (
            r#"{"sensor":"bell\u0007","ts":1732600000000,"value":1}"#.into(),
            Reason::BadSeries,
        ),
        (
            r#"{"sensor":"c1\u0085","ts":1732600000000,"value":1}"#.into(),
            Reason::BadSeries,
        ),
        (
            r#"{"sensor":"evil\u202egpj.exe","ts":1732600000000,"value":1}"#.into(),
            Reason::BadSeries,
        ),
        (
            r#"{"sensor":"non\uffffchar","ts":1732600000000,"value":1}"#.into(),
            Reason::BadSeries,
        ),
        (
            r#"{"sensor":"s","ts":1732600000000}"#.into(),
            Reason::MissingValue,
        ),
        (
            r#"{"sensor":"s","ts":1732600000000,"value":"1"}"#.into(),
            Reason::NotNumeric,
        ),
        (
            r#"{"sensor":"s","ts":1732600000000,"value":null}"#.into(),
            Reason::NotNumeric,
        ),
        (r#"{"sensor":"s","value":1}"#.into(), Reason::BadTimestamp),
        (
            r#"{"sensor":"s","ts":"yesterday","value":1}"#.into(),
            Reason::BadTimestamp,
        ),
        (
            r#"{"sensor":"s","ts":1e300,"value":1}"#.into(),
            Reason::BadTimestamp,
        ),
        (
            r#"{"sensor":"s","ts":1732600400000,"value":1}"#.into(),
            Reason::TooFarInFuture,
        ),
        (
            r#"{"sensor":"s","ts":1000,"value":1}"#.into(),
            Reason::TooOld,
        ),
    ];
    for (message, reason) in cases {
        let c = decode(&message);
        assert_eq!(c.rejected, vec![reason], "{message}");
        assert!(c.readings.is_empty(), "{message}");
    }
    let big = format!(
        r#"{{"sensor":"s","pad":"{}","value":1}}"#,
        "p".repeat(70_000)
    );
    assert_eq!(decode(&big).rejected, vec![Reason::Oversize]);
}

#[test]
fn the_series_id_policy_allows_topic_characters_and_refuses_invisible_ones() {
    // Allowed: what topics must escape is the agent's business, not a refusal.
    for id in [
        "a/../../alerts/x",
        "bad#id",
        "plus+id",
        "$SYS",
        "100%",
        "Zürich-Süd",
        "温度",
    ] {
        let c = decode(&format!(
            r#"{{"sensor":"{id}","ts":1732600000000,"value":1}}"#
        ));
        assert_eq!(c.rejected, vec![], "{id:?}");
        assert_eq!(c.readings[0].series.as_str(), id);
    }
    // A field name with a control character, under values = ["*"], is
    // refused too: it would end up in the series key.
    let mut d = JsonDecoder::new(JsonMapping {
        values: vec!["*".into()],
        ..JsonMapping::default()
    });
    let mut out = Collect::default();
    d.decode(
        br#"{"sensor":"s","ts":1732600000000,"ok":1,"b\u0000d":2}"#,
        None,
        1_732_600_000_000,
        &mut out,
    );
    assert_eq!(out.rejected, vec![Reason::BadSeries]);
    assert_eq!(out.readings.len(), 1);
    assert_eq!(out.readings[0].series.as_str(), "s/ok");
}

#[test]
fn huge_numbers_are_not_finite_values() {
    // 1e400 overflows a double: refused, whether the parser says so or we do.
    for message in [
        r#"{"sensor":"s","ts":1732600000000,"value":1e400}"#,
        r#"{"sensor":"s","ts":1732600000000,"value":-1e999}"#,
        r#"{"sensor":"s","ts":1732600000000,"value":1e999,"other":1}"#,
        r#"{"sensor":"s","ts":1732600000000, "value" : 17976931348623159e292 }"#,
    ] {
        let c = decode(message);
        assert!(c.readings.is_empty());
        assert_eq!(c.rejected, vec![Reason::NonFinite], "{message}");
    }
    // Finite, but beyond ±1e100: sums and variances could overflow.
    for message in [
        r#"{"sensor":"s","ts":1732600000000,"value":1.7e308}"#,
        r#"{"sensor":"s","ts":1732600000000,"value":-1e300}"#,
        r#"{"sensor":"s","ts":1732600000000,"value":1.1e100}"#,
    ] {
        assert_eq!(
            decode(message).rejected,
            vec![Reason::OutOfRange],
            "{message}"
        );
    }
    assert_eq!(
        decode(r#"{"sensor":"s","ts":1732600000000,"value":-1e100}"#)
            .readings
            .len(),
        1
    );
    // A number that is malformed, not too large, is malformed.
    let c = decode(r#"{"sensor":"s","ts":1732600000000,"value":1e}"#);
    assert_eq!(c.rejected, vec![Reason::Malformed]);
}

#[test]
fn the_decoder_is_reusable_after_errors() {
    let mut d = JsonDecoder::new(JsonMapping::default());
    let mut out = Collect::default();
    for i in 0..1000 {
        let msg = if i % 3 == 0 {
            "{broken".to_string()
        } else {
            format!(r#"{{"sensor":"s{i}","ts":1732600000000,"value":{i}}}"#)
        };
        d.decode(msg.as_bytes(), None, NOW, &mut out);
    }
    assert_eq!(out.rejected.len(), 334);
    assert_eq!(out.readings.len(), 666);
    assert_eq!(out.readings[1].series.as_str(), "s2");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut d = JsonDecoder::new(JsonMapping { values: vec!["*".into(), "value".into()], ..JsonMapping::default() });
        let mut out = Collect::default();
        d.decode(&bytes, Some("a/b"), NOW, &mut out);
        for r in &out.readings {
            prop_assert!(r.value.is_finite());
            prop_assert!(!r.series.is_empty());
        }
    }

    #[test]
    fn json_like_input_never_panics(
        sensor in prop_oneof![Just(r#""s-1""#.to_string()), any::<i64>().prop_map(|n| n.to_string()), "\\PC{0,80}".prop_map(|s| format!("{s:?}"))],
        ts in prop_oneof![any::<i64>().prop_map(|n| n.to_string()), any::<f64>().prop_map(|f| f.to_string()), Just(r#""2024-11-26T06:46:40Z""#.to_string())],
        value in prop_oneof![any::<f64>().prop_map(|f| f.to_string()), Just("true".to_string()), Just("{}".to_string()), Just("[]".to_string())],
        format in prop_oneof![Just(TimeFormat::EpochMs), Just(TimeFormat::EpochNs), Just(TimeFormat::Rfc3339), Just(TimeFormat::EpochS)],
    ) {
        let message = format!(r#"{{"sensor":{sensor},"ts":{ts},"value":{value}}}"#);
        let mut d = JsonDecoder::new(JsonMapping { timestamp_format: format, ..JsonMapping::default() });
        let mut out = Collect::default();
        d.decode(message.as_bytes(), None, NOW, &mut out);
        prop_assert_eq!(out.readings.len() + out.rejected.len(), 1, "{}", message);
    }
}

#[test]
fn a_key_given_twice_counts_once_with_its_first_value() {
    let c = decode(r#"{"sensor":"s","ts":1732600000000,"value":1,"value":2}"#);
    assert_eq!(c.readings.len(), 1);
    assert_eq!(c.readings[0].value, 1.0);
    let c = decode_with(
        JsonMapping {
            values: vec!["*".into()],
            ..JsonMapping::default()
        },
        r#"{"sensor":"s","ts":1732600000000,"a":1,"b":5,"a":2}"#,
        None,
    );
    let got: Vec<(String, f64)> = c
        .readings
        .iter()
        .map(|r| (r.series.to_string(), r.value))
        .collect();
    assert_eq!(got, [("s/a".to_string(), 1.0), ("s/b".to_string(), 5.0)]);
}
