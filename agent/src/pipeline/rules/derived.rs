//! Derived series (`[[derived]]`): a series computed from two others, joined
//! on event time (a stream–stream join), that rules then treat like any
//! series.
//!
//! ```toml
//! [[derived]]
//! name = "boiler/delta"      # the new series' id
//! a = "boiler/inlet"         # glob of side A's series
//! b = "boiler/outlet"        # glob of side B's series
//! expr = "a - b"             # a - b | a + b | a / b | min(a, b) | max(a, b) | mean(a, b),
//!                            # or rate(...) of one: its change per second since the last pair
//! window_ms = 1000           # aligned: the mean of each side in the same second
//! lateness_ms = 500          # how long a window waits for the slower side
//! # within_ms = 2000         # or interval: each reading of A with B's latest within ±2 s
//! ```
//!
//! - **Aligned** (`window_ms`): each side's readings are averaged per
//!   window of `window_ms` (aligned to the epoch, as rule windows are); a
//!   window closes on both sides at once, when the largest event time seen
//!   on either side passes its end by `lateness_ms`, and if both sides have
//!   readings in it, the derived series gets one reading: `expr` of the
//!   two means, at the window's **start**. A window only one side has is
//!   counted in `sluice_join_missing_total{side}` (the side that had none).
//! - **Interval** (`within_ms`): each reading of A is paired with the
//!   reading of B with the largest event time so far, if it lies within
//!   `within_ms` of A's (before or after); the derived reading has A's event
//!   time. A reading of A without one is counted as missing side `b`.
//!
//! Readings too late for their window (or a reading of B older than the
//! latest) are counted in `sluice_join_late_total`; an `expr` without a
//! value (a ratio to 0, beyond ±1e100, or the first pair of a `rate`) in
//! `sluice_join_undefined_total`.
//! The values joined are those the inputs' own rules see (after a table's
//! calibration), or the readings' values for inputs that no rule matches.
//!
//! The inputs of every derived series meet in one worker, the joins'
//! worker (see [`feeds`](super::feeds)): the sources' hand-off sends every
//! reading of a series that an `a` or `b` matches there, and that series'
//! state (its own rule's windows, detectors, checkpoints) lives there under
//! its own id. A series feeds every `[[derived]]` whose `a` or `b` matches
//! it, and a series that feeds one is not grouped by `group_by`. Memory is
//! fixed per derived series (per label value, with `group_by`): two
//! tumbling windows of as many panes as the lateness needs (at most
//! [`JOIN_PANES`]), or one point.

use serde::{Deserialize, Serialize};
use sluice_core::Timestamp;
use sluice_core::join::{Expr, IntervalJoin, JoinStats, Pair, Side, WindowJoin};

/// Panes each side of an aligned join keeps: `lateness_ms` may be up to
/// `JOIN_PANES - 1` windows.
pub const JOIN_PANES: usize = 8;
/// The longest `window_ms`, `lateness_ms` and `within_ms`: a day.
pub const MAX_JOIN_MS: u64 = 86_400_000;

/// `[[derived]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedRule {
    /// The derived series' id.
    pub name: String,
    /// Glob of side A's series.
    pub a: String,
    /// Glob of side B's series.
    pub b: String,
    /// `a - b`, `a + b`, `a / b`, `min(a, b)`, `max(a, b)` or `mean(a, b)`.
    pub expr: String,
    /// Aligned join: the window, ms.
    pub window_ms: Option<u64>,
    /// Aligned join: how long a window waits for out-of-order readings,
    /// ms, at most 7 windows. Default 0.
    #[serde(default)]
    pub lateness_ms: u64,
    /// Interval join: the largest gap between paired readings, ms.
    pub within_ms: Option<u64>,
    /// One derived series per value of this label of the inputs' readings
    /// (`<name>:<value>`; readings without it make `<name>`), each with its
    /// own join, at most [`MAX_INSTANCES`] values. Default: one.
    pub group_by: Option<String>,
}

/// The most values of a `group_by` label a derived series or a pattern
/// keeps state for; readings of further values are counted and dropped.
pub const MAX_INSTANCES: usize = 1024;

/// The expressions `expr` may name, as written.
pub const EXPRS: [(&str, Expr); 6] = [
    ("a - b", Expr::Difference),
    ("a + b", Expr::Sum),
    ("a / b", Expr::Ratio),
    ("min(a, b)", Expr::Min),
    ("max(a, b)", Expr::Max),
    ("mean(a, b)", Expr::Mean),
];

/// A derived series' value: an expression of the pair, or its change per
/// second (`rate(...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerivedExpr {
    /// The expression of the pair.
    pub expr: Expr,
    /// `rate(expr)`: the expression's change since the previous pair, per
    /// second of event time (the first pair has no value).
    pub rate: bool,
}

/// `expr` read (spaces do not matter): one of [`EXPRS`], or `rate(` one
/// of them `)`.
pub fn parse_expr(text: &str) -> Option<DerivedExpr> {
    let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let text = squeeze(text);
    let (inner, rate) = match text.strip_prefix("rate(").and_then(|t| t.strip_suffix(')')) {
        Some(inner) => (inner, true),
        None => (text.as_str(), false),
    };
    EXPRS
        .iter()
        .find(|(name, _)| squeeze(name) == inner)
        .map(|&(_, expr)| DerivedExpr { expr, rate })
}

impl DerivedExpr {
    /// The derived value of pair `(ts, a, b)`, given the previous pair's
    /// `(ts, expr)` in `prev` (updated); `None` when it has none.
    pub fn value(
        &self,
        prev: &mut Option<(Timestamp, f64)>,
        ts: Timestamp,
        a: f64,
        b: f64,
    ) -> Option<f64> {
        let v = self.expr.eval(a, b)?;
        if !self.rate {
            return Some(v);
        }
        let before = prev.replace((ts, v));
        let (t0, v0) = before?;
        if ts <= t0 {
            return None;
        }
        let per_second = (v - v0) * 1000.0 / (ts - t0) as f64;
        (per_second.abs() <= sluice_core::MAX_VALUE).then_some(per_second)
    }
}

/// Checks the `name` and `group_by` of a derived series or a pattern
/// (`whose`, for the message): a series id, and with `group_by` (a label)
/// the prefix of its groups' ids.
pub(super) fn check_name(name: &str, group_by: Option<&str>, whose: &str) -> Result<(), String> {
    let max = sluice_collectors::reading::MAX_SERIES_LEN;
    if name.is_empty() || name.len() > max {
        return Err(format!("name: must be 1 to {max} bytes (a series id)"));
    }
    if let Some(why) = sluice_collectors::reading::series_problem(name) {
        return Err(format!("name: has {why}"));
    }
    match group_by {
        None => Ok(()),
        Some("") => Err("group_by: must name a label".into()),
        Some(_) if name.len() > super::MAX_GROUP_NAME || name.contains(':') => Err(format!(
            "name: {name:?} cannot name {whose} groups: 1 to {} bytes without ':'",
            super::MAX_GROUP_NAME
        )),
        Some(_) => Ok(()),
    }
}

impl DerivedRule {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        check_name(&self.name, self.group_by.as_deref(), "a derived series'")?;
        for (key, glob) in [("a", &self.a), ("b", &self.b)] {
            let pattern = glob::Pattern::new(glob).map_err(|e| format!("{key}: {e}"))?;
            if pattern.matches(&self.name) {
                return Err(format!(
                    "{key}: {glob:?} matches the derived series' own name {:?}",
                    self.name
                ));
            }
        }
        if self.a == self.b {
            return Err("b: the same series as a".into());
        }
        if parse_expr(&self.expr).is_none() {
            let names: Vec<&str> = EXPRS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "expr: {:?} is not one of {}, or rate( one of them )",
                self.expr,
                names.join(", ")
            ));
        }
        match (self.window_ms, self.within_ms) {
            (Some(_), Some(_)) => {
                return Err(
                    "within_ms: set window_ms (aligned) or within_ms (interval), not both".into(),
                );
            }
            (None, None) => {
                return Err(
                    "window_ms: set window_ms (aligned join) or within_ms (interval join)".into(),
                );
            }
            (Some(w), None) => {
                if !(1..=MAX_JOIN_MS).contains(&w) {
                    return Err(format!("window_ms: must be 1..={MAX_JOIN_MS}"));
                }
                let late = self.lateness_ms;
                if late > w * (JOIN_PANES as u64 - 1) {
                    return Err(format!(
                        "lateness_ms: at most {} windows ({} ms)",
                        JOIN_PANES - 1,
                        w * (JOIN_PANES as u64 - 1)
                    ));
                }
            }
            (None, Some(within)) => {
                if self.lateness_ms > 0 {
                    return Err("lateness_ms: only with window_ms (an interval join keeps B's latest reading)".into());
                }
                if within > MAX_JOIN_MS {
                    return Err(format!("within_ms: must be 0..={MAX_JOIN_MS}"));
                }
            }
        }
        Ok(())
    }
}

/// A derived series, compiled.
#[derive(Debug, Clone)]
pub struct Derived {
    /// As configured.
    pub config: DerivedRule,
    /// Its id as a series key.
    pub key: sluice_collectors::SeriesKey,
    a: glob::Pattern,
    b: glob::Pattern,
    /// `expr`.
    pub expr: DerivedExpr,
    /// Fingerprint of the join's settings (its state is kept across a
    /// reload, and restored from a checkpoint, only under the same).
    pub fingerprint: u64,
    /// `group_by`: the ids of its series.
    pub group: Option<super::GroupSpec>,
}

impl Derived {
    /// Compiles a validated `[[derived]]`.
    pub fn compile(config: &DerivedRule) -> Result<Derived, String> {
        config.validate()?;
        Ok(Derived {
            key: sluice_collectors::SeriesKey::try_from(config.name.as_str())
                .map_err(|_| "name: too long for a series id".to_owned())?,
            a: glob::Pattern::new(&config.a).map_err(|e| format!("a: {e}"))?,
            b: glob::Pattern::new(&config.b).map_err(|e| format!("b: {e}"))?,
            expr: parse_expr(&config.expr).ok_or("expr")?,
            fingerprint: super::fingerprint(&(
                &config.a,
                &config.b,
                config.window_ms,
                config.lateness_ms,
                config.within_ms,
                &config.group_by,
                &config.expr,
            )),
            group: config.group_by.as_ref().map(|by| super::GroupSpec {
                name: config.name.clone(),
                by: Some(by.clone()),
            }),
            config: config.clone(),
        })
    }

    /// Which side `series` is on, if it is an input.
    pub fn side(&self, series: &str) -> Option<Side> {
        if self.a.matches(series) {
            Some(Side::A)
        } else if self.b.matches(series) {
            Some(Side::B)
        } else {
            None
        }
    }

    /// Fresh join state: the fewest panes that hold its lateness.
    pub fn state(&self) -> JoinOp {
        let Some(w) = self.config.window_ms else {
            let within = self.config.within_ms.unwrap_or(0) as Timestamp;
            return JoinOp::Interval(IntervalJoin::new(within).expect("validated bound"));
        };
        let (size, late) = (w as Timestamp, self.config.lateness_ms as Timestamp);
        // Validated: size > 0, lateness within JOIN_PANES - 1 windows.
        match (late + size - 1) / size {
            0 => JoinOp::Window1(Box::new(WindowJoin::new(size, late).expect("validated"))),
            1 => JoinOp::Window2(Box::new(WindowJoin::new(size, late).expect("validated"))),
            _ => JoinOp::Window(Box::new(WindowJoin::new(size, late).expect("validated"))),
        }
    }
}

/// A derived series' join state. Aligned joins keep as few panes as their
/// lateness needs (one without lateness: a join is about 300 bytes, not 2
/// KB, and a reading touches less memory).
#[derive(Clone, Serialize, Deserialize)]
pub enum JoinOp {
    /// Aligned windows, no lateness.
    Window1(Box<WindowJoin<1>>),
    /// Aligned windows, lateness up to one window.
    Window2(Box<WindowJoin<2>>),
    /// Aligned windows, lateness up to `JOIN_PANES - 1` windows.
    Window(Box<WindowJoin<JOIN_PANES>>),
    /// Interval.
    Interval(IntervalJoin),
}

/// Runs `$body` with `$j` bound to the aligned join of any size, or
/// `$interval` for an interval join.
macro_rules! aligned {
    ($op:expr, $j:ident => $body:expr, $i:ident => $interval:expr) => {
        match $op {
            JoinOp::Window1($j) => $body,
            JoinOp::Window2($j) => $body,
            JoinOp::Window($j) => $body,
            JoinOp::Interval($i) => $interval,
        }
    };
}

impl JoinOp {
    /// Offers a reading; pairs it completes go to `pairs`.
    pub fn push(
        &mut self,
        side: Side,
        ts: Timestamp,
        value: f64,
        weight: u32,
        pairs: &mut Vec<Pair>,
    ) {
        aligned!(self,
            j => {
                let _ = j.push(side, ts, value, weight, |p| pairs.push(p));
            },
            j => {
                if let Ok(Some(p)) = j.push(side, ts, value) {
                    pairs.push(p);
                }
            }
        )
    }

    /// Moves event time to `ts` (inputs gone quiet).
    pub fn advance_to(&mut self, ts: Timestamp, pairs: &mut Vec<Pair>) {
        aligned!(self, j => j.advance_to(ts, |p| pairs.push(p)), _j => ())
    }

    /// Closes open windows as partial (shutdown, or a join removed).
    pub fn flush(&mut self, pairs: &mut Vec<Pair>) {
        aligned!(self, j => j.flush(|p| pairs.push(p)), _j => ())
    }

    /// Its counts so far.
    pub fn stats(&self) -> JoinStats {
        aligned!(self, j => j.stats(), j => j.stats())
    }

    /// Whether readings wait in a window that has not closed.
    pub fn has_open(&self) -> bool {
        aligned!(self, j => j.has_open(), _j => false)
    }

    /// Bytes it takes, inline and boxed.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>() + aligned!(self, j => std::mem::size_of_val(&**j), _j => 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(extra: &str) -> Result<(), String> {
        let text = format!("name = \"d\"\na = \"x\"\nb = \"y\"\nexpr = \"a - b\"\n{extra}");
        let r: DerivedRule = toml::from_str(&text).map_err(|e| e.to_string())?;
        r.validate()
    }

    #[test]
    fn settings_are_checked_with_the_key_named() {
        assert_eq!(rule("window_ms = 1000\nlateness_ms = 7000"), Ok(()));
        assert_eq!(rule("within_ms = 0"), Ok(()));
        let err = |extra: &str| rule(extra).unwrap_err();
        assert!(err("").starts_with("window_ms:"), "{}", err(""));
        assert!(err("window_ms = 1000\nwithin_ms = 5").starts_with("within_ms:"));
        assert!(err("window_ms = 0").starts_with("window_ms:"));
        assert!(err("window_ms = 1000\nlateness_ms = 7001").starts_with("lateness_ms:"));
        assert!(err("within_ms = 5\nlateness_ms = 1").starts_with("lateness_ms:"));
        assert!(err("within_ms = 86400001").starts_with("within_ms:"));
        let bad_expr: DerivedRule =
            toml::from_str("name = \"d\"\na = \"x\"\nb = \"y\"\nexpr = \"a * b\"\nwithin_ms = 1")
                .unwrap();
        assert!(bad_expr.validate().unwrap_err().starts_with("expr:"));
        let own: DerivedRule =
            toml::from_str("name = \"d-1\"\na = \"d-*\"\nb = \"y\"\nexpr = \"a-b\"\nwithin_ms = 1")
                .unwrap();
        assert!(own.validate().unwrap_err().starts_with("a:"));
    }

    #[test]
    fn expressions_read_with_or_without_spaces() {
        let plain = |expr| Some(DerivedExpr { expr, rate: false });
        assert_eq!(parse_expr("a-b"), plain(Expr::Difference));
        assert_eq!(parse_expr(" min( a,b ) "), plain(Expr::Min));
        assert_eq!(parse_expr("b - a"), None);
        assert_eq!(
            parse_expr("rate(a - b)"),
            Some(DerivedExpr {
                expr: Expr::Difference,
                rate: true
            })
        );
        assert_eq!(parse_expr("rate(rate(a - b))"), None);
    }

    #[test]
    fn a_rate_is_the_change_per_second_since_the_previous_pair() {
        let e = parse_expr("rate(a - b)").unwrap();
        let mut prev = None;
        assert_eq!(e.value(&mut prev, 0, 10.0, 4.0), None);
        assert_eq!(e.value(&mut prev, 500, 12.0, 4.0), Some(4.0));
        assert_eq!(e.value(&mut prev, 2_500, 12.0, 6.0), Some(-1.0));
        // The same event time again: no rate.
        assert_eq!(e.value(&mut prev, 2_500, 12.0, 6.0), None);
    }

    #[test]
    fn a_series_feeds_every_derived_series_and_pattern_that_names_it() {
        use super::super::{Feed, JOINS_HOME, PatternRule};
        use sluice_core::pattern::Step;
        let entry = |name: &str, a: &str, b: &str| -> DerivedRule {
            toml::from_str(&format!(
                "name = \"{name}\"\na = \"{a}\"\nb = \"{b}\"\nexpr = \"a - b\"\nwithin_ms = 1"
            ))
            .unwrap()
        };
        let pattern: PatternRule = toml::from_str(
            "name = \"p\"\nfirst = { match = \"x-*\", above = 1.0 }\nthen = { match = \"d1\", above = 1.0 }\nwithin_ms = 1",
        )
        .unwrap();
        let rules = super::super::Rules::compile(&[])
            .unwrap()
            .with_derived(&[
                entry("d0", "x-*", "y"),
                entry("d1", "x-1", "z"),
                entry("d2", "q*", "q1"),
            ])
            .unwrap()
            .with_patterns(&[pattern])
            .unwrap();
        let of = |s: &str| {
            let mut out = Vec::new();
            rules.feeds(s, &mut out);
            out
        };
        use Feed::*;
        assert_eq!(
            of("x-1"),
            [
                Derived(0, Side::A),
                Derived(1, Side::A),
                Pattern(0, Step::First)
            ]
        );
        assert_eq!(of("y"), [Derived(0, Side::B)]);
        assert_eq!(of("z"), [Derived(1, Side::B)]);
        // Both sides of d2 match: side A only.
        assert_eq!(of("q1"), [Derived(2, Side::A)]);
        // A pattern watching a derived series.
        assert_eq!(of("d1"), [Pattern(0, Step::Then)]);
        assert!(of("u").is_empty());
        for held in ["x-9", "y", "d0", "d1"] {
            assert_eq!(rules.home(held), JOINS_HOME);
        }
        assert_eq!(rules.home("u"), "u");
    }

    #[test]
    fn a_grouped_derived_series_ids_live_in_the_joins_worker() {
        let d: DerivedRule = toml::from_str(
            "name = \"delta\"\na = \"*/in\"\nb = \"*/out\"\nexpr = \"a - b\"\nwithin_ms = 1\ngroup_by = \"site\"",
        )
        .unwrap();
        let rules = super::super::Rules::compile(&[])
            .unwrap()
            .with_derived(std::slice::from_ref(&d))
            .unwrap();
        for held in ["delta", "delta:north", "delta:a:b", "x/in"] {
            assert_eq!(rules.home(held), super::super::JOINS_HOME, "{held}");
        }
        for not in ["deltas", "delta2:north", "x"] {
            assert_eq!(rules.home(not), not);
        }
        // Its groups cannot feed another derived series either.
        let chained: DerivedRule = toml::from_str(
            "name = \"d2\"\na = \"delta:*\"\nb = \"x\"\nexpr = \"a - b\"\nwithin_ms = 1",
        )
        .unwrap();
        let err = super::super::Rules::compile(&[])
            .unwrap()
            .with_derived(&[d.clone(), chained])
            .err()
            .unwrap();
        assert!(
            err.contains("a derived series cannot feed another"),
            "{err}"
        );
        // A grouped name is a group id's prefix: short, without ':'.
        let bad = DerivedRule {
            name: "a:b".into(),
            ..d
        };
        assert!(bad.validate().unwrap_err().starts_with("name:"));
    }
}
