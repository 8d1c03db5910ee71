//! Groups (`group_by`): a rule that aggregates across the series it
//! matches, all of them or one group per value of a label.
//!
//! A group is made a series of its own where readings come in: the
//! sources' hand-off gives each reading of a grouped rule its group's id
//! ([`Rules::route`](super::Rules::route)) before it picks the worker, so
//! that all of a group's readings meet in one worker, in one entry of its
//! series table, whose windows, sketches, detectors and checkpoints are
//! those of any series. The id is the rule's group name (`group_name`,
//! default its `match`) for `group_by = "*"` and for readings without the
//! label, and `<name>:<value>` for a label's value; a value too long for a
//! series id is cut and ends with `~` and 16 hex digits of its hash.

use sluice_collectors::SeriesKey;
use sluice_collectors::reading::{Labels, MAX_SERIES_LEN};

use super::Rule;

/// `group_by` for one group of all the series a rule matches.
pub const GROUP_ALL: &str = "*";
/// The longest `group_name`, in bytes: a label's value keeps at least 14
/// bytes of the 64 of a series id.
pub const MAX_GROUP_NAME: usize = 32;

/// A rule's grouping, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    /// The group id, or the part before `:<value>`.
    pub name: String,
    /// The label whose values make the groups; `None` for one group.
    pub by: Option<String>,
}

impl GroupSpec {
    /// What `rule` asks for, if it groups.
    pub fn of(rule: &Rule) -> Option<GroupSpec> {
        let by = rule.group_by.as_ref()?;
        Some(GroupSpec {
            name: rule.group_name().to_owned(),
            by: (by != GROUP_ALL).then(|| by.clone()),
        })
    }

    /// The id of the group of a reading with `labels`.
    pub fn key(&self, labels: Option<&Labels>) -> SeriesKey {
        self.key_of(self.value(labels))
    }

    /// The value of the grouping label in `labels`, if it groups by one.
    pub fn value<'a>(&self, labels: Option<&'a Labels>) -> Option<&'a str> {
        self.by.as_deref().and_then(|label| labels?.get(label))
    }

    /// The id of the group of `value` (`None`: the group of the name alone).
    pub fn key_of(&self, value: Option<&str>) -> SeriesKey {
        let mut key = SeriesKey::new();
        // The name fits: validated to at most MAX_GROUP_NAME bytes.
        let _ = key.push_str(&self.name);
        let Some(value) = value else {
            return key;
        };
        let _ = key.push(':');
        if key.len() + value.len() <= MAX_SERIES_LEN {
            let _ = key.push_str(value);
            return key;
        }
        // Cut (at a character boundary) and made unique by its hash.
        let room = MAX_SERIES_LEN - key.len() - 17;
        let cut = (0..=room)
            .rev()
            .find(|&i| value.is_char_boundary(i))
            .unwrap_or(0);
        let _ = key.push_str(&value[..cut]);
        let hash = sluice_core::hash::hash64(value.as_bytes(), 0);
        let _ = key.push_str(&format!("~{hash:016x}"));
        key
    }

    /// Whether `key` is the id of one of these groups, and if so the
    /// value it stands for (`None` for the group without one).
    pub fn parse<'a>(&self, key: &'a str) -> Option<Option<&'a str>> {
        let rest = key.strip_prefix(self.name.as_str())?;
        if rest.is_empty() {
            return Some(None);
        }
        self.by.as_ref()?;
        rest.strip_prefix(':').map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn site(value: &str) -> Labels {
        let names: Arc<[Box<str>]> = Arc::from(vec![Box::<str>::from("site")]);
        Labels::new(names, &[Some(value)]).unwrap()
    }

    #[test]
    fn a_group_id_names_the_rule_and_the_value_and_reads_back() {
        let g = GroupSpec {
            name: "temp".into(),
            by: Some("site".into()),
        };
        let key = g.key(Some(&site("plant-a")));
        assert_eq!(key.as_str(), "temp:plant-a");
        assert_eq!(g.parse(&key), Some(Some("plant-a")));
        // Without the label: the name alone.
        assert_eq!(g.key(None).as_str(), "temp");
        assert_eq!(g.parse("temp"), Some(None));
        assert_eq!(g.parse("temperature"), None);
        // One group for all.
        let all = GroupSpec {
            name: "all-temps".into(),
            by: None,
        };
        assert_eq!(all.key(Some(&site("x"))).as_str(), "all-temps");
        assert_eq!(all.parse("all-temps:x"), None);
    }

    #[test]
    fn a_value_too_long_for_an_id_is_cut_and_told_apart_by_its_hash() {
        let g = GroupSpec {
            name: "n".repeat(MAX_GROUP_NAME),
            by: Some("site".into()),
        };
        let long_a = format!("{}a", "é".repeat(31));
        let long_b = format!("{}b", "é".repeat(31));
        let (a, b) = (g.key(Some(&site(&long_a))), g.key(Some(&site(&long_b))));
        assert!(a.len() <= MAX_SERIES_LEN && b.len() <= MAX_SERIES_LEN);
        assert_ne!(a, b);
        assert!(a.contains('~'), "{a}");
        assert!(g.parse(&a).is_some());
        // The same value, the same id.
        assert_eq!(a, g.key(Some(&site(&long_a))));
    }
}
