//! Every configuration error names the key's full path and the line it is
//! on: walked over every key of the shipped example configuration, once
//! with a value of the wrong type and once, where a key has a range, with a
//! value outside it.

use sluice::config::Config;

const EXAMPLE: &str = include_str!("../../packaging/config/sluice.example.toml");

/// Every `key = value` of the example (inline tables' keys too), with its
/// full path and line, read line by line (independently of the TOML parser
/// the agent uses).
fn keys(text: &str) -> Vec<(String, usize, String, String)> {
    let mut out = Vec::new();
    let mut table = String::new();
    let mut rules = 0;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let code = strip_comment(line).trim();
        if code.is_empty() {
            continue;
        }
        if code == "[[rules]]" {
            table = format!("rules[{rules}]");
            rules += 1;
            continue;
        }
        if let Some(name) = code.strip_prefix('[').and_then(|c| c.strip_suffix(']')) {
            table = name.to_string();
            continue;
        }
        let (key, value) = code.split_once(" = ").expect("key = value");
        let path = if table.is_empty() {
            key.trim().to_string()
        } else {
            format!("{table}.{}", key.trim())
        };
        out.push((
            path.clone(),
            line_no,
            key.trim().to_string(),
            value.trim().to_string(),
        ));
        // { a = 1, b = { c = 2 } } and [{ a = 1 }]: their keys too.
        let (inner, path) = match value.trim() {
            v if v.starts_with("[{") => (&v[2..v.len() - 2], format!("{path}[0]")),
            v if v.starts_with('{') => (&v[1..v.len() - 1], path),
            _ => continue,
        };
        for pair in inner.split(", ") {
            let (k, v) = pair.split_once(" = ").expect("inline key = value");
            out.push((
                format!("{path}.{}", k.trim()),
                line_no,
                k.trim().to_string(),
                v.trim().to_string(),
            ));
        }
    }
    out
}

fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// `text` with `key = value` on line `line` replaced by `key = bad`.
fn with_value(text: &str, line: usize, key: &str, value: &str, bad: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let target = &mut lines[line - 1];
    let from = format!("{key} = {value}");
    assert!(target.contains(&from), "{from:?} on line {line}");
    *target = target.replacen(&from, &format!("{key} = {bad}"), 1);
    lines.join("\n")
}

fn error_of(text: &str) -> String {
    match Config::parse(text) {
        Ok(_) => String::from("(accepted)"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_example_parses() {
    Config::parse(EXAMPLE).unwrap();
}

#[test]
fn a_value_of_the_wrong_type_names_its_key_and_line_for_every_key() {
    let keys = keys(EXAMPLE);
    assert!(keys.len() > 90, "walked {} keys", keys.len());
    for (path, line, key, value) in keys {
        let bad = if value.starts_with('"') {
            "true"
        } else {
            "\"bad\""
        };
        let e = error_of(&with_value(EXAMPLE, line, &key, &value, bad));
        assert!(
            e.starts_with(&format!("line {line}: {path}: ")),
            "{path} = {bad} (line {line}): {e}"
        );
    }
}

#[test]
fn a_value_out_of_range_names_its_key_and_line() {
    // (the key's path, its value in the example, a value out of range)
    let cases = [
        ("agent_id", "\"gateway-01\"", "\"a/b\""),
        ("workers", "1", "0"),
        ("ring_capacity", "8192", "1000"),
        ("max_series", "10000", "0"),
        ("shedding.high_water", "0.8", "1.5"),
        ("shedding.keep_one_in", "4", "0"),
        ("sources.plant.host", "\"127.0.0.1\"", "\"\""),
        (
            "sources.plant.topics",
            "[\"sensors/+\", \"plant/#\"]",
            "[\"a/#/b\"]",
        ),
        ("sources.plant.qos", "1", "2"),
        ("sources.plant.keep_alive_s", "30", "1"),
        ("sources.plant.reconnect_min_ms", "500", "0"),
        ("sources.plant.json.values", "[\"value\"]", "[]"),
        ("sources.plant.json.max_future_ms", "300000", "-1"),
        ("sources.plant.json.max_age_ms", "604800000", "-1"),
        ("sources.plant.json.max_message_bytes", "65536", "0"),
        ("sources.plant.json.series.field", "\"sensor\"", "\"\""),
        (
            "sources.field.bind",
            "\"127.0.0.1:9000\"",
            "\"127.0.0.1:99999\"",
        ),
        ("sources.field.max_datagram", "8192", "0"),
        (
            "sources.field.allow",
            "[\"127.0.0.1/32\", \"10.0.0.0/8\"]",
            "[\"10.0.0.0/33\"]",
        ),
        ("sources.field.batch", "64", "0"),
        ("sources.bench.baud", "115200", "0"),
        ("sources.bench.data_bits", "8", "9"),
        ("sources.bench.parity", "\"none\"", "\"mark\""),
        ("sources.bench.stop_bits", "1", "3"),
        ("sources.bench.max_line", "4096", "0"),
        ("sources.bench.reopen_min_ms", "500", "0"),
        ("rules[0].match", "\"s-*\"", "\"[\""),
        ("rules[0].priority", "\"normal\"", "\"urgent\""),
        ("rules[0].window.kind", "\"tumbling\"", "\"rolling\""),
        ("rules[0].window.size_ms", "1000", "0"),
        ("rules[0].window.lateness_ms", "200", "-5"),
        ("rules[0].quantiles", "[0.5, 0.9, 0.99]", "[0.5, 1.5]"),
        ("rules[0].anomaly.alpha", "0.01", "1.5"),
        ("rules[0].anomaly.k", "4.0", "-1.0"),
        ("rules[0].anomaly.clear_k", "3.0", "5.0"),
        ("rules[0].anomaly.raise_after", "1", "0"),
        ("rules[0].anomaly.clear_after", "3", "0"),
        ("rules[0].thresholds[0].above", "80.0", "inf"),
        ("rules[0].thresholds[0].clear_at", "75.0", "85.0"),
        ("rules[0].thresholds[0].raise_after", "3", "0"),
        ("rules[0].rate_of_change.per_second_above", "5.0", "nan"),
        ("rules[0].rate_of_change.clear_below", "2.0", "6.0"),
        ("rules[1].window.slide_ms", "10000", "7000"),
        ("rules[2].window.half_life", "100.0", "0.0"),
        ("rules[2].window.every_ms", "5000", "0"),
        ("output.mqtt.host", "\"127.0.0.1\"", "\"\""),
        (
            "output.mqtt.alert_topic",
            "\"sluice/{agent}/alerts/{series}\"",
            "\"a/#\"",
        ),
        (
            "output.mqtt.stats_topic",
            "\"sluice/{agent}/stats\"",
            "\"\"",
        ),
        ("output.mqtt.alert_qos", "1", "2"),
        ("output.mqtt.aggregate_qos", "1", "2"),
        ("outbox.max_records", "1000000", "0"),
        ("outbox.max_bytes", "268435456", "0"),
        ("outbox.on_full", "\"drop_oldest\"", "\"drop_newest\""),
        ("uplink.host", "\"upstream.example.net\"", "\"\""),
        ("uplink.max_inflight", "64", "0"),
        (
            "uplink.aggregate_topic",
            "\"sluice/{agent}/agg/{series}\"",
            "\"x\"",
        ),
        ("checkpoint.interval_ms", "10000", "10"),
    ];
    let keys = keys(EXAMPLE);
    for (path, value, bad) in cases {
        let (_, line, key, found) = keys
            .iter()
            .find(|(p, ..)| p == path)
            .unwrap_or_else(|| panic!("{path} is in the example"));
        assert_eq!(found, value, "{path} in the example");
        let e = error_of(&with_value(EXAMPLE, *line, key, value, bad));
        // An array's element may be named: `allow[0]`.
        assert!(
            e.starts_with(&format!("line {line}: {path}: "))
                || e.starts_with(&format!("line {line}: {path}[")),
            "{path} = {bad} (line {line}): {e}"
        );
    }
}

#[test]
fn an_unknown_key_or_a_missing_kind_is_named_on_its_own_line() {
    let text = "[sources.field]\nkind = \"udp\"\nbind = \"127.0.0.1:9000\"\nalow = [\"127.0.0.1/32\"]\n\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n\n[output]\nconsole = true\n";
    let e = error_of(text);
    assert!(
        e.starts_with("line 4: sources.field.alow: unknown field `alow`"),
        "{e}"
    );
    let e = error_of(&text.replace("kind = \"udp\"\n", ""));
    assert!(e.starts_with("line 1: sources.field.kind: missing"), "{e}");
    let e = error_of(&text.replace("kind = \"tumbling\", ", ""));
    assert!(
        e.starts_with("line 8: rules[0].window.kind: missing"),
        "{e}"
    );
}
