//! Reading the document with positions, so that every error names the
//! key's full path and its line (see `Config::parse`).

use serde::Deserialize;

use crate::pipeline::rules::{
    CountRule, DecayingRule, HoppingRule, SessionRule, TumblingRule, WindowRule,
};

/// `message` (`key: why`) with the line of the key in `text` before it.
pub(super) fn with_line(text: &str, message: String) -> String {
    let key = message.split_once(": ").map_or("", |(key, _)| key);
    match line_of(text, key) {
        Some(line) => format!("line {line}: {message}"),
        None => message,
    }
}

/// Tables whose shape `kind` names (`[sources.<name>]`, a rule's `window`)
/// are rewritten from `{ kind = "x", … }` to `{ x = { … } }` (the key `x`
/// keeps the span of the value `"x"`), the form serde reads for
/// `SourceByKind` (in the parent module) and [`WindowByKind`]. Serde's own internally tagged
/// form would buffer the table, and an error inside it (an unknown key, a
/// bad value) would point at the table, not at the key.
pub(super) type Located = (std::ops::Range<usize>, Option<&'static str>, String);

pub(super) fn retag(doc: &mut toml::de::DeTable<'_>) -> Result<(), Located> {
    use toml::de::DeValue;
    if let Some(sources) = doc.get_mut("sources")
        && let DeValue::Table(sources) = sources.get_mut()
    {
        for (_, source) in sources.iter_mut() {
            move_kind(source)?;
        }
    }
    if let Some(rules) = doc.get_mut("rules")
        && let DeValue::Array(rules) = rules.get_mut()
    {
        for rule in rules.iter_mut() {
            if let DeValue::Table(rule) = rule.get_mut()
                && let Some(window) = rule.get_mut("window")
            {
                move_kind(window)?;
            }
        }
    }
    Ok(())
}

fn move_kind(value: &mut toml::Spanned<toml::de::DeValue<'_>>) -> Result<(), Located> {
    use toml::de::{DeTable, DeValue};
    let span = value.span();
    // Not a table: serde says what type was expected.
    let DeValue::Table(table) = value.get_mut() else {
        return Ok(());
    };
    let Some(kind) = table.remove("kind") else {
        return Err((span, Some("kind"), "missing: say which kind this is".into()));
    };
    let kind_span = kind.span();
    let DeValue::String(name) = kind.into_inner() else {
        return Err((kind_span, None, "must be a string".into()));
    };
    let mut wrapped = DeTable::new();
    wrapped.insert(
        toml::Spanned::new(kind_span, name),
        toml::Spanned::new(span.clone(), DeValue::Table(std::mem::take(table))),
    );
    *value = toml::Spanned::new(span, DeValue::Table(wrapped));
    Ok(())
}

/// A rule's `window` as [`retag`] leaves it.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WindowByKind {
    Tumbling(TumblingRule),
    Hopping(HoppingRule),
    Count(CountRule),
    Decaying(DecayingRule),
    Session(SessionRule),
}

/// Reads the form `retag` leaves (see `Config::parse`).
impl<'de> Deserialize<'de> for WindowRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match WindowByKind::deserialize(d)? {
            WindowByKind::Tumbling(w) => WindowRule::Tumbling(w),
            WindowByKind::Hopping(w) => WindowRule::Hopping(w),
            WindowByKind::Count(w) => WindowRule::Count(w),
            WindowByKind::Decaying(w) => WindowRule::Decaying(w),
            WindowByKind::Session(w) => WindowRule::Session(w),
        })
    }
}

/// The dotted path (`rules[1].window.size_ms`) of the deepest key whose
/// name or value covers byte `at` of the document; empty if none does.
pub(super) fn key_at(table: &toml::de::DeTable<'_>, at: usize) -> String {
    use toml::de::DeValue;
    fn within(table: &toml::de::DeTable<'_>, at: usize, prefix: &str) -> Option<String> {
        for (key, value) in table.iter() {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let deeper = match value.get_ref() {
                DeValue::Table(t) => within(t, at, &path),
                DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                    let path = format!("{path}[{i}]");
                    match item.get_ref() {
                        DeValue::Table(t) => within(t, at, &path),
                        _ => None,
                    }
                    .or_else(|| item.span().contains(&at).then_some(path))
                }),
                _ => None,
            };
            if deeper.is_some() {
                return deeper;
            }
            if key.span().contains(&at) || value.span().contains(&at) {
                return Some(path);
            }
        }
        None
    }
    within(table, at, "").unwrap_or_default()
}

/// The line (1-based) where the dotted key `path` (with `[i]` array indices,
/// as validation errors write it) is defined in `text`, or where its deepest
/// enclosing table or array element is; `None` if not even the first key is.
pub(super) fn line_of(text: &str, path: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut found: Option<std::ops::Range<usize>> = None;
    for segment in path.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        found = Some(value.span());
        let mut value = value.get_ref();
        if let Some(i) = index {
            let toml::de::DeValue::Array(items) = value else {
                break;
            };
            let Some(item) = items.get(i) else { break };
            found = Some(item.span());
            value = item.get_ref();
        }
        match value {
            toml::de::DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    let span = found?;
    Some(text.get(..span.start)?.matches('\n').count() + 1)
}
