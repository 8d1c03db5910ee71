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
    let mut arrays = std::collections::BTreeMap::<String, usize>::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let code = strip_comment(line).trim();
        if code.is_empty() {
            continue;
        }
        if let Some(name) = code.strip_prefix("[[").and_then(|c| c.strip_suffix("]]")) {
            let n = arrays.entry(name.to_string()).or_default();
            table = format!("{name}[{n}]");
            *n += 1;
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
        for pair in split_top_level(inner) {
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

/// `a = 1, b = [2, 3]` split at the commas outside brackets and braces.
fn split_top_level(inner: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in inner.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(inner[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(inner[start..].trim());
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
        ("sources.plant.gather_ms", "1", "51"),
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
        ("rules[0].quantiles.at", "[0.5, 0.9, 0.99]", "[0.5, 1.5]"),
        ("rules[0].quantiles.accuracy", "0.01", "0.6"),
        (
            "rules[0].quantiles.range",
            "[0.01, 1000.0]",
            "[1e-12, 1e12]",
        ),
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
        ("rules[0].absent_after_ms", "30000", "10"),
        ("rules[1].window.slide_ms", "10000", "7000"),
        ("rules[2].window.half_life", "100.0", "0.0"),
        ("rules[2].window.every_ms", "5000", "0"),
        (
            "sources.plant.json.labels",
            "[\"mac\", \"site\"]",
            "[\"a\", \"b\", \"c\", \"d\", \"e\"]",
        ),
        ("rules[3].distinct", "\"mac\"", "\"\""),
        ("rules[3].top_k.label", "\"mac\"", "\"imei\""),
        ("rules[3].top_k.k", "10", "0"),
        ("rules[3].first_seen.capacity", "100000", "0"),
        ("rules[3].first_seen.fpr", "0.01", "0.7"),
        ("rules[3].sample.k", "5", "1001"),
        ("rules[3].frequency.epsilon", "0.01", "0.9"),
        ("rules[3].frequency.delta", "0.01", "0.0"),
        ("rules[3].frequency.label", "\"mac\"", "\"imei\""),
        ("rules[3].quantiles.k", "200", "4"),
        ("rules[3].quantiles.method", "\"kll\"", "\"tdigest\""),
        ("rules[4].group_by", "\"site\"", "\"room\""),
        ("rules[4].group_name", "\"tanks\"", "\"a:b\""),
        ("rules[6].window.gap_ms", "30000", "0"),
        ("rules[6].window.max_ms", "3600000", "-1"),
        ("rules[6].window.lateness_ms", "1000", "100000"),
        ("rules[5].table", "\"sensors\"", "\"stock\""),
        ("rules[5].on_missing", "\"default\"", "\"maybe\""),
        (
            "rules[5].thresholds[0].above",
            "\"@max_temp\"",
            "\"max_temp\"",
        ),
        ("tables.sensors.key", "\"series\"", "\"\""),
        ("derived[0].name", "\"boiler/delta\"", "\"\""),
        ("derived[0].a", "\"boiler/inlet\"", "\"boiler/*\""),
        ("derived[0].b", "\"boiler/outlet\"", "\"boiler/inlet\""),
        ("derived[0].expr", "\"a - b\"", "\"a * b\""),
        ("derived[0].window_ms", "1000", "0"),
        ("derived[0].lateness_ms", "500", "8000"),
        ("rules[7].thresholds[0].below", "5.0", "\"@low\""),
        (
            "patterns[0].name",
            "\"line1/overheat-then-pressure-drop\"",
            "\"\"",
        ),
        ("patterns[0].first.match", "\"line1/temp\"", "\"[\""),
        ("patterns[0].first.clear_at", "75.0", "85.0"),
        ("patterns[0].then.below", "2.0", "\"two\""),
        ("patterns[0].then.raise_after", "2", "0"),
        ("patterns[0].within_ms", "10000", "86400001"),
        ("patterns[0].absent", "false", "\"no\""),
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
        ("output.mqtt.aggregate_batch", "0", "10001"),
        (
            "output.mqtt.aggregate_batch_topic",
            "\"sluice/{agent}/aggregates\"",
            "\"sluice/{agent}/agg/{series}\"",
        ),
        ("outbox.max_records", "1000000", "0"),
        ("outbox.max_bytes", "268435456", "0"),
        ("outbox.on_full", "\"drop_oldest\"", "\"drop_newest\""),
        ("uplink.kind", "\"mqtt\"", "\"amqp\""),
        ("uplink.host", "\"upstream.example.net\"", "\"\""),
        ("uplink.max_inflight", "64", "0"),
        (
            "uplink.aggregate_topic",
            "\"sluice/{agent}/agg/{series}\"",
            "\"x\"",
        ),
        ("checkpoint.interval_ms", "10000", "10"),
        ("nodes.quantiles", "[0.5, 0.9, 0.99]", "[1.5]"),
        ("nodes.distinct_label", "\"tag\"", "\"\""),
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

/// A config whose uplink and output read the files given.
fn with_files(ca: &str, password: &str, device: &str, outbox_dir: &str) -> String {
    format!(
        "[sources.bench]\nkind = \"serial\"\ndevice = \"{device}\"\n\n[[rules]]\nmatch = \"*\"\nwindow = {{ kind = \"tumbling\", size_ms = 1000 }}\n\n[output.mqtt]\nhost = \"127.0.0.1\"\nusername = \"u\"\npassword_file = \"{password}\"\n\n[outbox]\npath = \"{outbox_dir}/outbox.db\"\n\n[uplink]\nhost = \"127.0.0.1\"\n\n[uplink.tls]\nca_file = \"{ca}\"\n"
    )
}

#[test]
fn check_reads_the_files_a_connection_needs_and_notes_what_may_appear_later() {
    let dir = sluice_tests::temp_dir("preflight");
    let (ca, _, _) = sluice_tests::test_pki(dir.path(), "preflight");
    let password = dir.path().join("password");
    std::fs::write(&password, "secret\n").unwrap();
    let d = dir.path().display();
    let good = with_files(
        &ca.display().to_string(),
        &password.display().to_string(),
        &format!("{d}/tty"),
        &d.to_string(),
    );
    std::fs::write(dir.path().join("tty"), b"").unwrap();
    let found = Config::parse(&good).unwrap().preflight(&good);
    assert!(
        found.errors.is_empty() && found.notes.is_empty(),
        "{found:?}"
    );

    let missing = good
        .replace(&ca.display().to_string(), "/nonexistent/ca.pem")
        .replace(&password.display().to_string(), &format!("{d}/nopassword"));
    let found = Config::parse(&missing).unwrap().preflight(&missing);
    assert_eq!(found.errors.len(), 2, "{found:?}");
    assert!(
        found.errors[0].starts_with(&format!(
            "line 12: output.mqtt.password_file: {d}/nopassword: "
        )),
        "{found:?}"
    );
    assert!(
        found.errors[1].starts_with("line 21: uplink.tls.ca_file: /nonexistent/ca.pem: "),
        "{found:?}"
    );

    // A file that holds no certificate.
    let garbage = good.replace(&ca.display().to_string(), &password.display().to_string());
    let found = Config::parse(&garbage).unwrap().preflight(&garbage);
    assert!(
        found.errors[0].contains("uplink.tls.ca_file: ")
            && found.errors[0].contains("no certificate"),
        "{found:?}"
    );

    // Only notes: a device not plugged in, a directory systemd creates.
    let later = good
        .replace(&format!("{d}/tty"), "/dev/ttyNOPE0")
        .replace(&format!("{d}/outbox.db"), "/nonexistent/state/outbox.db");
    let found = Config::parse(&later).unwrap().preflight(&later);
    assert!(found.errors.is_empty(), "{found:?}");
    assert_eq!(found.notes.len(), 2, "{found:?}");
    assert!(
        found.notes[0].starts_with("line 3: sources.bench.device: /dev/ttyNOPE0 does not exist")
    );
    assert!(
        found.notes[1]
            .starts_with("line 15: outbox.path: the directory /nonexistent/state does not exist")
    );
}

#[test]
fn sluice_check_fails_on_a_missing_file_and_is_silent_with_quiet() {
    let dir = sluice_tests::temp_dir("check-files");
    let (ca, _, _) = sluice_tests::test_pki(dir.path(), "check");
    let password = dir.path().join("password");
    std::fs::write(&password, "secret\n").unwrap();
    std::fs::write(dir.path().join("tty"), b"").unwrap();
    let d = dir.path().display().to_string();
    let good = with_files(
        &ca.display().to_string(),
        &password.display().to_string(),
        &format!("{d}/tty"),
        &d,
    );
    let config = dir.path().join("sluice.toml");
    let check = |text: &str, quiet: bool| {
        std::fs::write(&config, text).unwrap();
        let mut command = sluice_tests::own_binary(env!("CARGO_BIN_EXE_sluice"));
        command.args(["check", "--config"]).arg(&config);
        if quiet {
            command.arg("--quiet");
        }
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = check(&good, true);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (Some(0), "", ""));
    let (code, stdout, stderr) = check(&good, false);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("[uplink.tls]"), "{stdout}");
    assert!(
        stderr.contains("OK (") && stderr.contains("checked only when the agent runs"),
        "{stderr}"
    );
    let (code, _, stderr) = check(
        &good.replace(&ca.display().to_string(), "/nonexistent/ca.pem"),
        true,
    );
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("line 21: uplink.tls.ca_file: /nonexistent/ca.pem: "),
        "{stderr}"
    );
}

#[test]
fn label_rules_need_a_tumbling_window_and_a_source_that_reads_the_label() {
    let source = "[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[sources.u.json]\nlabels = [\"mac\"]\n";
    for (rule, expected) in [
        (
            "window = { kind = \"count\", size = 10 }\ntop_k = { label = \"mac\", k = 3 }",
            "line 9: rules[0].top_k: needs a tumbling window",
        ),
        (
            "window = { kind = \"tumbling\", size_ms = 1000 }\nsample = { k = 3 }\nsketches = true",
            "line 10: rules[0].sketches: carries the distinct, frequency and KLL quantile sketches: set distinct, frequency or quantiles with method = \"kll\" too",
        ),
        (
            "window = { kind = \"tumbling\", size_ms = 1000 }\nquantiles = { at = [0.5], method = \"kll\", accuracy = 0.02 }",
            "line 9: rules[0].quantiles.method: \"kll\" bounds the rank, not the value: accuracy and range are DDSketch's (set k instead)",
        ),
        (
            "window = { kind = \"tumbling\", size_ms = 1000 }\nquantiles = { at = [0.5], k = 100 }",
            "line 9: rules[0].quantiles.k: is KLL's: set method = \"kll\" too",
        ),
        (
            "first_seen = { label = \"site\" }",
            "line 8: rules[0].first_seen.label: no source reads the label \"site\"",
        ),
        (
            "absent_after_ms = 1000\njoin_label = \"mac\"",
            "line 9: rules[0].join_label: joins to the rule's table by a label's value: set table too",
        ),
        (
            "absent_after_ms = 1000\ntable = \"t\"\njoin_label = \"site\"\n[tables.t]\npath = \"t.csv\"",
            "line 10: rules[0].join_label: no source reads the label \"site\"",
        ),
    ] {
        let text = format!("{source}[[rules]]\nmatch = \"*\"\n{rule}\n");
        let e = error_of(&text);
        assert!(e.starts_with(expected), "{rule}: {e}");
    }
    // first_seen alone is a rule.
    Config::parse(&format!(
        "{source}[[rules]]\nmatch = \"*\"\nfirst_seen = {{ label = \"mac\" }}\n[output]\nconsole = true\n"
    ))
    .unwrap();
}

/// `[uplink] kind = "nats"`: its subject templates are checked as NATS
/// subjects (one token an id, no wildcard, no `$`), and a build without the
/// `nats` feature refuses the kind itself with what to do.
#[test]
fn a_nats_uplink_needs_valid_subjects_and_a_build_that_has_it() {
    let base = "[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:9000\"\n\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n\n[outbox]\npath = \"/tmp/outbox.db\"\n\n[uplink]\nkind = \"nats\"\nhost = \"127.0.0.1\"\n";
    let e = error_of(&format!(
        "{base}aggregate_topic = \"sluice.>.{{series}}\"\n"
    ));
    assert!(
        e.contains("uplink.aggregate_topic: is not a valid NATS subject"),
        "{e}"
    );
    let e = error_of(&format!("{base}alert_topic = \"$JS.{{series}}\"\n"));
    assert!(
        e.contains("uplink.alert_topic: must not start with '$'"),
        "{e}"
    );
    let checked = Config::parse(base);
    if cfg!(feature = "nats") {
        assert!(checked.is_ok(), "{:?}", checked.err());
    } else {
        let e = checked.unwrap_err().to_string();
        assert!(
            e.contains("uplink.kind") && e.contains("`nats` feature"),
            "{e}"
        );
    }
}

/// `[uplink] kind = "kafka"`: a topic template with `{series}` is refused
/// (the series is the key), so is one that gives a topic Kafka refuses
/// (with this agent's id filled in), and a build without the `kafka`
/// feature refuses the kind itself with what to do.
#[test]
fn a_kafka_uplink_needs_topics_kafka_takes_and_a_build_that_has_it() {
    let base = "agent_id = \"gw 1\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:9000\"\n\n[[rules]]\nmatch = \"*\"\nwindow = { kind = \"tumbling\", size_ms = 1000 }\n\n[outbox]\npath = \"/tmp/outbox.db\"\n\n[uplink]\nkind = \"kafka\"\nhost = \"127.0.0.1\"\n";
    let e = error_of(&format!("{base}aggregate_topic = \"sluice.{{series}}\"\n"));
    assert!(
        e.contains("uplink.aggregate_topic: must not contain {series}"),
        "{e}"
    );
    let e = error_of(&format!(
        "{base}alert_topic = \"sluice.{{agent}}.alerts\"\n"
    ));
    assert!(
        e.contains(
            "uplink.alert_topic: gives the topic \"sluice.gw 1.alerts\", which Kafka refuses"
        ),
        "{e}"
    );
    let e = error_of(&format!("{base}alert_topic = \"sluice/alerts\"\n"));
    assert!(e.contains("uplink.alert_topic"), "{e}");
    let checked = Config::parse(base);
    if cfg!(feature = "kafka") {
        assert!(checked.is_ok(), "{:?}", checked.err());
    } else {
        let e = checked.unwrap_err().to_string();
        assert!(
            e.contains("uplink.kind") && e.contains("`kafka` feature"),
            "{e}"
        );
    }
}
