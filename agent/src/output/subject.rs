//! NATS subjects: how an agent id and a series id become subject tokens,
//! and which subjects no server takes. The same rule as topics
//! ([`super::topic`]), for NATS's separators and wildcards.
//!
//! # The rule
//!
//! A template's `{agent}` and `{series}` each become **exactly one subject
//! token**: never a wildcard, never a `$` subject (JetStream's API and the
//! system account live under `$JS`, `$SYS`), never extra tokens, never
//! empty. Every byte of these characters is percent-encoded (`%` and two
//! upper-case hex digits), and nothing else is:
//!
//! - `%` itself (so that decoding is exact), `.` (the token separator), `*`
//!   and `>` (wildcards), and white space (NATS's protocol splits on it);
//! - `$` when it starts the id;
//! - control characters and the other characters the series id policy
//!   refuses ([`sluice_collectors::reading::series_problem`]).
//!
//! Ids are never empty (the series id policy refuses an empty one). So
//! `line1.temp` goes to `…agg.line1%2Etemp` and `a b` to `…agg.a%20b`; the
//! record's payload keeps the id as it was.

use std::borrow::Cow;

/// Fills `{agent}` and `{series}` into a subject template, each escaped
/// into one token (see the module docs).
pub fn render(template: &str, agent: &str, series: &str) -> String {
    template
        .replace("{agent}", &token(agent))
        .replace("{series}", &token(series))
}

/// `id` as exactly one subject token (see the module docs).
pub fn token(id: &str) -> Cow<'_, str> {
    super::topic::percent_encode(id, |i, c| {
        matches!(c, '%' | '.' | '*' | '>')
            || c.is_whitespace()
            || (i == 0 && c == '$')
            || c.is_control()
            || !c.is_ascii() && {
                let mut buf = [0; 4];
                sluice_collectors::reading::series_problem(c.encode_utf8(&mut buf)).is_some()
            }
    })
}

/// Why no NATS server takes `subject` for a publish, or `None`: it is
/// empty, has an empty token (`a..b`, a leading or trailing `.`), holds a
/// wildcard token (`*`, `>`), white space or a control character.
pub fn problem(subject: &str) -> Option<&'static str> {
    if subject.is_empty() {
        Some("an empty subject")
    } else if subject.split('.').any(str::is_empty) {
        Some("an empty token (a leading, trailing or doubled '.') in the subject")
    } else if subject.contains(['*', '>']) {
        Some("a wildcard (* or >) in the subject")
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("white space or a control character in the subject")
    } else {
        None
    }
}

/// Whether `template` makes valid subjects for any ids: it must contain
/// `{series}` (when `needs_series`), and not start with `$`.
pub fn check_template(template: &str, needs_series: bool) -> Result<(), String> {
    super::topic::check_with(
        template,
        needs_series,
        render,
        problem,
        ("NATS subject", "the server's own subjects"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_one_token_never_a_wildcard_or_a_dollar_subject() {
        let t = "sluice.{agent}.agg.{series}";
        assert_eq!(render(t, "gw", "s-0042"), "sluice.gw.agg.s-0042");
        assert_eq!(render(t, "gw", "line1.temp"), "sluice.gw.agg.line1%2Etemp");
        assert_eq!(render(t, "gw", "a/b"), "sluice.gw.agg.a/b");
        assert_eq!(render(t, "gw", "*"), "sluice.gw.agg.%2A");
        assert_eq!(render(t, "gw", ">"), "sluice.gw.agg.%3E");
        assert_eq!(render(t, "gw", "a b\tc"), "sluice.gw.agg.a%20b%09c");
        assert_eq!(render(t, "gw", "100%"), "sluice.gw.agg.100%25");
        assert_eq!(render("{series}.x", "gw", "$JS"), "%24JS.x");
        assert_eq!(render(t, "gw", "nul\0id"), "sluice.gw.agg.nul%00id");
        assert_eq!(render(t, "gw", "Zürich"), "sluice.gw.agg.Zürich");
        assert_eq!(render(t, "a.b", "s"), "sluice.a%2Eb.agg.s");
        for id in ["a.b", "*", ">", "a b", "$SYS", ".", "..", "x\u{202e}y"] {
            let subject = render(t, "gw", id);
            assert_eq!(problem(&subject), None, "{id:?} -> {subject}");
            assert_eq!(subject.split('.').count(), 4, "{id:?} -> {subject}");
        }
    }

    #[test]
    fn templates_that_make_invalid_subjects_are_refused() {
        assert!(check_template("sluice.{agent}.agg.{series}", true).is_ok());
        assert!(check_template("sluice.{agent}.agg", true).is_err());
        assert!(check_template("sluice..{series}", true).is_err());
        assert!(check_template("sluice.*.{series}", true).is_err());
        assert!(check_template("sluice.>", false).is_err());
        assert!(check_template("$JS.{series}", true).is_err());
        assert!(check_template("a b.{series}", true).is_err());
    }
}
