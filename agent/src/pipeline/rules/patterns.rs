//! Sequence patterns (`[[patterns]]`): an alert when a condition on one
//! series is followed by a condition on another (or the same) within a time
//! bound, or is *not* followed by it (simple complex-event processing).
//!
//! ```toml
//! [[patterns]]
//! name = "line1/overheat-then-pressure-drop"   # the alert's series
//! first = { match = "line1/temp", above = 80.0, clear_at = 75.0 }
//! then = { match = "line1/pressure", below = 2.0 }
//! within_ms = 10000
//! # absent = true     # raise when first is NOT followed by then in time
//! ```
//!
//! Each condition is a threshold with its hysteresis and debounce
//! (`above` or `below`, `clear_at`, `raise_after`, `clear_after`), and an
//! *event* is the moment it is raised, so a temperature that stays above 80
//! is one event until it clears. The state machine is the core's
//! `Sequence`:
//! - by default, `then`'s event at most `within_ms` after the latest event
//!   of `first` (by event time, not before it) raises the pattern's alert,
//!   once; it clears when `then`'s condition clears, and `first` must
//!   happen again for another;
//! - with `absent = true`, an event of `first` arms a deadline (the
//!   earliest unanswered one's time plus `within_ms`); an event of `then`
//!   before it answers; event time passing it (a reading of either input,
//!   or, while both are quiet, the agent's clock as for windows) raises the
//!   alert, and the next event of `then` clears it.
//!
//! The alert (`rule = "pattern"`, `series` the pattern's name) carries the
//! reading that raised it (none for a deadline), `score`: the time from
//! `first`'s event to `then`'s (or to the deadline), ms, and `threshold`:
//! `within_ms`. Inputs meet in the joins' worker, as a derived series' do
//! (see [`feeds`](super::feeds)): a series feeds every pattern that
//! matches it, and a pattern may watch a derived series. State (both
//! conditions, the pending event, the alert) is checkpointed and kept
//! across a reload unless the pattern's settings changed.

use serde::{Deserialize, Serialize};
use sluice_core::Timestamp;
use sluice_core::anomaly::ThresholdDetector;
use sluice_core::pattern::{Mode, Sequence, Step};

/// The longest `within_ms`: a day.
pub const MAX_WITHIN_MS: u64 = 86_400_000;

/// A condition of a pattern.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Glob of the series it watches.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Raised at or above this value (set `above` or `below`).
    pub above: Option<f64>,
    /// Raised at or below this value.
    pub below: Option<f64>,
    /// Cleared once back past this value. Default: the limit.
    pub clear_at: Option<f64>,
    /// Consecutive readings past the limit to raise. Default 1.
    #[serde(default = "one")]
    pub raise_after: u32,
    /// Consecutive readings back to clear. Default 1.
    #[serde(default = "one")]
    pub clear_after: u32,
}

const fn one() -> u32 {
    1
}

/// `[[patterns]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PatternRule {
    /// The pattern's name: the series its alerts carry.
    pub name: String,
    /// Condition A.
    pub first: Condition,
    /// Condition B.
    pub then: Condition,
    /// The bound between A's and B's events, ms.
    pub within_ms: u64,
    /// Raise when A is *not* followed by B within the bound. Default false.
    #[serde(default)]
    pub absent: bool,
    /// One pattern per value of this label of the inputs' readings (its
    /// alerts name `<name>:<value>`; readings without it: `<name>`), at most
    /// [`MAX_INSTANCES`](super::derived::MAX_INSTANCES) values. Default: one.
    pub group_by: Option<String>,
}

impl Condition {
    /// Its detector; an error names the key.
    fn detector(&self) -> Result<ThresholdDetector, String> {
        let (key, limit) = match (self.above, self.below) {
            (Some(limit), None) => ("above", limit),
            (None, Some(limit)) => ("below", limit),
            _ => return Err("above: set exactly one of above and below".into()),
        };
        let threshold = super::ThresholdRule {
            above: None,
            below: None,
            clear_at: None,
            raise_after: self.raise_after,
            clear_after: self.clear_after,
        };
        super::threshold_at(key == "above", limit, self.clear_at, &threshold).map_err(|e| {
            super::Levels {
                raise: (key, limit),
                clear: "clear_at",
                raise_after: self.raise_after,
                positive: false,
            }
            .problem(&e)
        })
    }
}

impl PatternRule {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        super::derived::check_name(&self.name, self.group_by.as_deref(), "a pattern's")?;
        for (key, c) in [("first", &self.first), ("then", &self.then)] {
            glob::Pattern::new(&c.pattern).map_err(|e| format!("{key}.match: {e}"))?;
            c.detector().map_err(|e| format!("{key}.{e}"))?;
        }
        if self.within_ms > MAX_WITHIN_MS {
            return Err(format!("within_ms: must be 0..={MAX_WITHIN_MS}"));
        }
        Ok(())
    }
}

/// A pattern, compiled.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// As configured.
    pub config: PatternRule,
    first: glob::Pattern,
    then: glob::Pattern,
    /// Fingerprint of its settings (its state is kept across a reload, and
    /// restored from a checkpoint, only under the same).
    pub fingerprint: u64,
    /// `group_by`: the ids its alerts name.
    pub group: Option<super::GroupSpec>,
}

impl Pattern {
    /// Compiles a `[[patterns]]` entry.
    pub fn compile(config: &PatternRule) -> Result<Pattern, String> {
        config.validate()?;
        Ok(Pattern {
            first: glob::Pattern::new(&config.first.pattern).map_err(|e| e.to_string())?,
            then: glob::Pattern::new(&config.then.pattern).map_err(|e| e.to_string())?,
            fingerprint: super::fingerprint(config),
            group: config.group_by.as_ref().map(|by| super::GroupSpec {
                name: config.name.clone(),
                by: Some(by.clone()),
            }),
            config: config.clone(),
        })
    }

    /// The conditions `series` feeds: (`first`, `then`).
    pub fn steps(&self, series: &str) -> (bool, bool) {
        (self.first.matches(series), self.then.matches(series))
    }

    /// Whether `series` feeds it.
    pub fn feeds(&self, series: &str) -> bool {
        self.first.matches(series) || self.then.matches(series)
    }

    /// Fresh state.
    pub fn state(&self) -> Sequence {
        let c = &self.config;
        let mode = if c.absent {
            Mode::NotFollowedBy
        } else {
            Mode::FollowedBy
        };
        // Validated: both detectors build, the bound is within range.
        Sequence::new(
            c.first.detector().expect("validated"),
            c.then.detector().expect("validated"),
            c.within_ms as Timestamp,
            mode,
        )
        .expect("validated bound")
    }
}

/// The steps to offer a reading to, in order: `then` before `first`, so
/// that a reading of a series both watch cannot be its own pattern's B.
pub fn order(first: bool, then: bool) -> impl Iterator<Item = Step> {
    [(then, Step::Then), (first, Step::First)]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, step)| step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(extra: &str) -> Result<(), String> {
        let text = format!(
            "name = \"p\"\nfirst = {{ match = \"a\", above = 80.0 }}\nthen = {{ match = \"b\", below = 2.0 }}\n{extra}"
        );
        let p: PatternRule = toml::from_str(&text).map_err(|e| e.to_string())?;
        p.validate()
    }

    #[test]
    fn settings_are_checked_with_the_key_named() {
        assert_eq!(entry("within_ms = 10000"), Ok(()));
        assert!(
            entry("within_ms = 86400001")
                .unwrap_err()
                .starts_with("within_ms:")
        );
        let both: PatternRule = toml::from_str(
            "name = \"p\"\nfirst = { match = \"a\", above = 1.0, below = 0.0 }\nthen = { match = \"b\", below = 2.0 }\nwithin_ms = 1",
        )
        .unwrap();
        assert!(
            both.validate().unwrap_err().starts_with("first."),
            "{:?}",
            both.validate()
        );
        let hysteresis: PatternRule = toml::from_str(
            "name = \"p\"\nfirst = { match = \"a\", above = 1.0 }\nthen = { match = \"b\", below = 2.0, clear_at = 1.0 }\nwithin_ms = 1",
        )
        .unwrap();
        assert!(hysteresis.validate().unwrap_err().starts_with("then."));
        let name: PatternRule = toml::from_str(
            "name = \"\"\nfirst = { match = \"a\", above = 1.0 }\nthen = { match = \"b\", below = 2.0 }\nwithin_ms = 1",
        )
        .unwrap();
        assert!(name.validate().unwrap_err().starts_with("name:"));
    }
}
