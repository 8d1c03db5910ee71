//! Topics: how an agent id and a series id become topic levels, and which
//! topics no broker can take.
//!
//! # The rule
//!
//! A template's `{agent}` and `{series}` each become **exactly one topic
//! level**: never a wildcard, never a `$` topic, never extra levels. Every
//! byte of these characters is percent-encoded (`%` and two upper-case hex
//! digits, as in URLs), and nothing else is:
//!
//! - `%` itself (so that decoding is exact), `/` (a level separator), `+`
//!   and `#` (wildcards);
//! - `$` when it starts the id (topics starting with `$` are the broker's);
//! - characters the series id policy refuses at decode
//!   ([`sluice_collectors::reading::series_problem`]: control characters,
//!   bidirectional-text controls, noncharacters), in case an id from an
//!   older checkpoint holds one.
//!
//! So `a/../../alerts/x` goes to `…/agg/a%2F..%2F..%2Falerts%2Fx`, `$SYS` to
//! `…/agg/%24SYS` and `s-0042` to `…/agg/s-0042`. The record's payload keeps
//! the id as it was (`"series"`), so subscribers never need to decode topics.

use std::borrow::Cow;
use std::fmt::Write;

/// Fills `{agent}` and `{series}` into a topic template, each escaped into
/// one topic level (see the module docs).
pub fn render(template: &str, agent: &str, series: &str) -> String {
    template
        .replace("{agent}", &level(agent))
        .replace("{series}", &level(series))
}

/// `id` as exactly one topic level (see the module docs).
pub fn level(id: &str) -> Cow<'_, str> {
    percent_encode(id, |i, c| {
        matches!(c, '%' | '/' | '+' | '#')
            || (i == 0 && c == '$')
            || (!c.is_ascii() || c.is_ascii_control()) && {
                let mut buf = [0; 4];
                sluice_collectors::reading::series_problem(c.encode_utf8(&mut buf)).is_some()
            }
    })
}

/// `id` with every byte of each character `escape` picks (by its byte
/// offset and itself) written as `%` and two upper-case hex digits; borrowed
/// when none is. Topics and NATS subjects ([`super::subject`]) share it.
pub fn percent_encode(id: &str, escape: impl Fn(usize, char) -> bool) -> Cow<'_, str> {
    if !id.char_indices().any(|(i, c)| escape(i, c)) {
        return Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for (i, c) in id.char_indices() {
        if escape(i, c) {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Longest topic name MQTT can carry, in bytes.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Why no broker can take `topic` as a topic name, or `None`: it is empty,
/// holds a wildcard (`+`, `#`), NUL or another control character (brokers
/// drop the connection over them), or is longer than MQTT allows.
pub fn problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("an empty topic")
    } else if topic.len() > MAX_TOPIC_BYTES {
        Some("a topic longer than 65,535 bytes")
    } else if topic.contains(['+', '#']) {
        Some("a wildcard (+ or #) in the topic")
    } else if topic.chars().any(char::is_control) {
        Some("a control character in the topic")
    } else {
        None
    }
}

/// Checks a topic template: it must hold `{series}` (when `needs_series`),
/// and render to a topic a broker takes that does not start with `$`.
pub fn check_template(template: &str, needs_series: bool) -> Result<(), String> {
    check_with(
        template,
        needs_series,
        render,
        problem,
        ("topic", "the broker's own topics"),
    )
}

/// A template checked by the rules of `render` and `problem` (topics, or
/// NATS subjects); `names` says what it makes and what `$` starts there.
pub fn check_with(
    template: &str,
    needs_series: bool,
    render: fn(&str, &str, &str) -> String,
    problem: fn(&str) -> Option<&'static str>,
    names: (&str, &str),
) -> Result<(), String> {
    if needs_series && !template.contains("{series}") {
        return Err("must contain {series}".into());
    }
    let sample = render(template, "agent", "series");
    if let Some(problem) = problem(&sample) {
        return Err(format!("is not a valid {}: {problem}", names.0));
    }
    if sample.starts_with('$') {
        return Err(format!("must not start with '$' ({})", names.1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_one_level_never_a_wildcard_or_a_dollar_topic() {
        let t = "sluice/{agent}/agg/{series}";
        assert_eq!(render(t, "gw", "s-0042"), "sluice/gw/agg/s-0042");
        assert_eq!(
            render(t, "gw", "a/../../alerts/x"),
            "sluice/gw/agg/a%2F..%2F..%2Falerts%2Fx"
        );
        assert_eq!(render(t, "gw", "bad#id"), "sluice/gw/agg/bad%23id");
        assert_eq!(render(t, "gw", "plus+id"), "sluice/gw/agg/plus%2Bid");
        assert_eq!(render(t, "gw", "100%"), "sluice/gw/agg/100%25");
        assert_eq!(render("{series}/x", "gw", "$SYS"), "%24SYS/x");
        assert_eq!(render(t, "gw", "a$b"), "sluice/gw/agg/a$b");
        assert_eq!(render(t, "gw", "nul\0id"), "sluice/gw/agg/nul%00id");
        assert_eq!(
            render(t, "gw", "bidi\u{202e}id"),
            "sluice/gw/agg/bidi%E2%80%AEid"
        );
        assert_eq!(render(t, "gw", "Zürich"), "sluice/gw/agg/Zürich");
        assert_eq!(render(t, "a/b", "s"), "sluice/a%2Fb/agg/s");
    }

    #[test]
    fn escaping_is_exact_and_every_result_is_a_valid_topic() {
        // Percent-decoding gives the id back, and the level has no '/'.
        let decode = |s: &str| {
            let mut out = Vec::new();
            let b = s.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        };
        for id in [
            "%2F",
            "$",
            "$$",
            "/",
            "#+/%",
            "a\u{7f}b",
            "\u{85}",
            "\u{2066}x",
            "温度/1",
        ] {
            let l = level(id);
            assert_eq!(decode(&l), id);
            assert!(!l.contains(['/', '+', '#']) && !l.starts_with('$'), "{l}");
            assert_eq!(problem(&render("x/{series}", "a", id)), None, "{id:?}");
        }
    }

    #[test]
    fn problems_and_templates() {
        assert!(problem("a/#").is_some());
        assert!(problem("a/+/b").is_some());
        assert!(problem("a\0b").is_some());
        assert!(problem("").is_some());
        assert!(problem(&"x".repeat(65_536)).is_some());
        assert_eq!(problem("sluice/a/agg/%24SYS"), None);
        assert!(check_template("sluice/{agent}/agg/{series}", true).is_ok());
        assert!(check_template("sluice/{agent}/agg", true).is_err());
        assert!(check_template("sluice/{agent}/stats", false).is_ok());
        assert!(check_template("sluice/+/agg/{series}", true).is_err());
        assert!(check_template("$SYS/{series}", true).is_err());
    }
}
