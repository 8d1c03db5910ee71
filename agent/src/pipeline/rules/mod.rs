//! Series rules, compiled from the configuration, and the state they give a
//! series: its window and its alert detectors (all from `sluice-core`).

use std::sync::Arc;

use sluice_core::Timestamp;
use sluice_core::aggregate::{Accumulator, Aggregate};
use sluice_core::anomaly::{
    Hysteresis, RateOfChangeDetector, RuleError, ThresholdDetector, Transition, ZScoreDetector,
};
use sluice_core::shed::Priority;
use sluice_core::window::{
    Closed, CountWindow, DecayingStats, HoppingWindow, Rejection, SessionWindow, TumblingWindow,
    WindowError,
};

use serde::{Deserialize, Serialize};

pub mod derived;
pub mod feeds;
pub mod groups;
pub mod labels;
pub mod patterns;
pub mod quantiles;
mod settings;
pub mod tables;

pub use derived::{Derived, DerivedRule, JoinOp};
pub use feeds::{Feed, Feeds, JOINS_HOME};
pub use groups::{GROUP_ALL, GroupSpec, MAX_GROUP_NAME};
pub use patterns::{Pattern, PatternRule};
pub use quantiles::{QuantileShape, Quantiles};
pub use settings::*;
pub use tables::{Row, Table, TableConfig, Tables};

/// Panes of a tumbling window: lateness up to 3 windows.
const TUMBLING_PANES: usize = 4;
/// Panes of a hopping window: length / slide + lateness / slide up to 16.
const HOPPING_PANES: usize = 16;

/// A series' window.
///
/// The common case, a tumbling window without lateness (one pane, about 130
/// bytes), stays inline so that a reading does not chase a pointer; windows
/// with more panes are boxed, so that every series does not pay for the
/// largest.
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound(serialize = "A: Serialize", deserialize = "A: Deserialize<'de>"))]
pub enum Window<A: Accumulator = Aggregate> {
    /// Tumbling on event time, no allowed lateness: one pane.
    Tumbling1(TumblingWindow<1, A>),
    /// Tumbling on event time, with allowed lateness (boxed: its panes would
    /// make every series' state as large as this variant).
    Tumbling(Box<TumblingWindow<TUMBLING_PANES, A>>),
    /// Hopping on event time (boxed: its 16 panes would make every series'
    /// state as large as the largest window).
    Hopping(Box<HoppingWindow<HOPPING_PANES, A>>),
    /// By count.
    Count(CountWindow<A>),
    /// Exponentially decaying, reported periodically.
    Decaying(Box<DecayingReport<A>>),
    /// Session windows (boxed: rarely used, and their open sessions).
    Session(Box<SessionWindow<SESSIONS, A>>),
}

/// Sessions a series keeps open at once (lateness up to 3 gaps opens at
/// most 4).
const SESSIONS: usize = 4;

/// A decaying window, with the period's plain aggregates in a tumbling
/// window of the report period (boxed in [`Window`]: rarely used).
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound(serialize = "A: Serialize", deserialize = "A: Deserialize<'de>"))]
pub struct DecayingReport<A: Accumulator> {
    stats: DecayingStats,
    /// The statistics when the last report closed (before the reading that
    /// closed it).
    at_report: DecayingStats,
    period: TumblingWindow<1, A>,
}

impl<A: Accumulator> DecayingReport<A> {
    fn push(
        &mut self,
        ts: Timestamp,
        value: f64,
        weight: u32,
        mut emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        let before = self.stats;
        let mut closed = false;
        // A reading too late for its report period is refused by both. The
        // decaying statistics weigh each reading kept once (a sampled
        // reading does not stand for several in an exponential average).
        self.period.push_weighted(ts, value, weight, |c| {
            closed = true;
            emit(c)
        })?;
        if closed {
            self.at_report = before;
        }
        self.stats.push(value)
    }

    fn advance_to(&mut self, ts: Timestamp, emit: impl FnMut(Closed<A>)) {
        self.at_report = self.stats;
        self.period.advance_to(ts, emit)
    }

    fn flush(&mut self, emit: impl FnMut(Closed<A>)) {
        self.at_report = self.stats;
        self.period.flush(emit)
    }
}

impl<A: Accumulator> Window<A> {
    /// Adds a reading that stands for `weight` readings (1, or `k` when
    /// shedding kept one in `k`); closed windows go to `emit`.
    pub fn push(
        &mut self,
        ts: Timestamp,
        value: f64,
        weight: u32,
        emit: impl FnMut(Closed<A>),
    ) -> Result<(), Rejection> {
        match self {
            Window::Tumbling1(w) => w.push_weighted(ts, value, weight, emit),
            Window::Tumbling(w) => w.push_weighted(ts, value, weight, emit),
            Window::Hopping(w) => w.push_weighted(ts, value, weight, emit),
            Window::Count(w) => w.push_weighted(ts, value, weight, emit),
            Window::Decaying(w) => w.push(ts, value, weight, emit),
            Window::Session(w) => w.push_weighted(ts, value, weight, emit),
        }
    }

    /// The decaying statistics, for a decaying window.
    pub fn decaying(&self) -> Option<&DecayingStats> {
        match self {
            Window::Decaying(w) => Some(&w.at_report),
            _ => None,
        }
    }

    /// Moves event time forward without a reading (idle series).
    pub fn advance_to(&mut self, ts: Timestamp, emit: impl FnMut(Closed<A>)) {
        match self {
            Window::Tumbling1(w) => w.advance_to(ts, emit),
            Window::Tumbling(w) => w.advance_to(ts, emit),
            Window::Hopping(w) => w.advance_to(ts, emit),
            // Count windows close by count only.
            Window::Count(_) => {}
            Window::Decaying(w) => w.advance_to(ts, emit),
            Window::Session(w) => w.advance_to(ts, emit),
        }
    }

    /// This window, with its panes started as `A::with_params(&params)`
    /// (a quantile sketch's shape).
    pub fn with_params(mut self, params: A::Params) -> Self {
        self.set_params(params);
        self
    }

    /// Sets what panes start with from now on (after a restore: not saved).
    pub fn set_params(&mut self, params: A::Params) {
        match self {
            Window::Tumbling1(w) => w.set_params(params),
            Window::Tumbling(w) => w.set_params(params),
            Window::Hopping(w) => w.set_params(params),
            Window::Count(w) => w.set_params(params),
            Window::Decaying(w) => w.period.set_params(params),
            Window::Session(w) => w.set_params(params),
        }
    }

    /// What panes start with.
    pub fn params(&self) -> &A::Params {
        match self {
            Window::Tumbling1(w) => w.params(),
            Window::Tumbling(w) => w.params(),
            Window::Hopping(w) => w.params(),
            Window::Count(w) => w.params(),
            Window::Decaying(w) => w.period.params(),
            Window::Session(w) => w.params(),
        }
    }

    /// Closes everything open, as partial.
    pub fn flush(&mut self, emit: impl FnMut(Closed<A>)) {
        match self {
            Window::Tumbling1(w) => w.flush(emit),
            Window::Tumbling(w) => w.flush(emit),
            Window::Hopping(w) => w.flush(emit),
            Window::Count(w) => w.flush(emit),
            Window::Decaying(w) => w.flush(emit),
            Window::Session(w) => w.flush(emit),
        }
    }
}

/// The window a rule asks for, or why it cannot be built.
pub fn window_for<A: Accumulator>(rule: &WindowRule) -> Result<Window<A>, WindowError> {
    Ok(match *rule {
        // Without lateness one pane suffices: a quarter of the memory.
        WindowRule::Tumbling(TumblingRule {
            size_ms,
            lateness_ms: 0,
        }) => Window::Tumbling1(TumblingWindow::new(size_ms, 0)?),
        WindowRule::Tumbling(TumblingRule {
            size_ms,
            lateness_ms,
        }) => Window::Tumbling(Box::new(TumblingWindow::new(size_ms, lateness_ms)?)),
        WindowRule::Hopping(HoppingRule {
            size_ms,
            slide_ms,
            lateness_ms,
        }) => Window::Hopping(Box::new(HoppingWindow::new(
            size_ms,
            slide_ms,
            lateness_ms,
        )?)),
        WindowRule::Count(CountRule { size }) => Window::Count(CountWindow::new(size)?),
        WindowRule::Session(SessionRule {
            gap_ms,
            max_ms,
            lateness_ms,
        }) => {
            let window = SessionWindow::new(gap_ms, max_ms, lateness_ms)?;
            // Lateness up to 3 gaps opens at most 4 sessions at once.
            if lateness_ms > gap_ms.saturating_mul(3) {
                return Err(WindowError::TooFewPanes {
                    needed: (lateness_ms / gap_ms) as u64 + 1,
                    available: SESSIONS,
                });
            }
            Window::Session(Box::new(window))
        }
        WindowRule::Decaying(DecayingRule {
            half_life,
            every_ms,
        }) => {
            let stats = DecayingStats::from_half_life(half_life)?;
            Window::Decaying(Box::new(DecayingReport {
                stats,
                at_report: stats,
                period: TumblingWindow::new(every_ms, 0)?,
            }))
        }
    })
}

/// The z-score detector a rule asks for.
pub fn zscore_for(a: &AnomalyRule) -> Result<ZScoreDetector, RuleError> {
    let levels = Hysteresis::new(a.k, a.clear_k.unwrap_or(a.k), a.raise_after, a.clear_after)?;
    ZScoreDetector::new(a.alpha, a.warmup, levels)
}

/// The threshold detector a rule asks for, its levels taken from `row`
/// where they name columns: `Ok(None)` when the row lacks the limit's (no
/// such threshold for that series; a clear level it lacks is the
/// limit's).
pub fn threshold_for(
    t: &ThresholdRule,
    row: Option<&Row>,
) -> Result<Option<ThresholdDetector>, String> {
    let (above, limit) = match (&t.above, &t.below) {
        (Some(limit), None) => (true, limit),
        (None, Some(limit)) => (false, limit),
        _ => return Err("set exactly one of above and below".into()),
    };
    let Some(limit) = limit.resolve(row) else {
        return Ok(None);
    };
    // A clear level from a column the row leaves empty: the limit's.
    let clear = t.clear_at.as_ref().and_then(|c| c.resolve(row));
    threshold_at(above, limit, clear, t)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// A threshold detector raising at or `above` (else at or below) `limit`,
/// clearing at `clear` (default: the limit), with the rule's debounce
/// counts.
pub fn threshold_at(
    above: bool,
    limit: f64,
    clear: Option<f64>,
    t: &ThresholdRule,
) -> Result<ThresholdDetector, RuleError> {
    let clear = clear.unwrap_or(limit);
    if above {
        ThresholdDetector::above(limit, clear, t.raise_after, t.clear_after)
    } else {
        ThresholdDetector::below(limit, clear, t.raise_after, t.clear_after)
    }
}

/// How a series joins its rule's table.
#[derive(Debug, Clone, PartialEq)]
pub enum Join {
    /// The rule has no table.
    NoTable,
    /// Its row (its own, or `*` with `on_missing = "default"`).
    Row(Row),
    /// No row; it goes on without one (`on_missing = "pass"`).
    Missing,
    /// No row; its readings are refused (`on_missing = "refuse"`).
    Refused,
}

impl Join {
    /// The row, if any.
    pub fn row(&self) -> Option<&Row> {
        match self {
            Join::Row(row) => Some(row),
            _ => None,
        }
    }
}

/// The detectors `r` asks for, with levels from `row` (thresholds whose
/// columns `row` lacks are left out); an error names the key.
fn detectors_of(r: &Rule, row: Option<&Row>) -> Result<Vec<Detector>, (String, String)> {
    let mut detectors = Vec::new();
    if let Some(a) = &r.anomaly {
        detectors.push(Detector::ZScore(
            zscore_for(a).map_err(|e| ("anomaly".to_string(), e.to_string()))?,
        ));
    }
    for (j, t) in r.thresholds.iter().enumerate() {
        let name = if t.above.is_some() {
            "threshold_above"
        } else {
            "threshold_below"
        };
        if let Some(d) = threshold_for(t, row).map_err(|e| (format!("thresholds[{j}]"), e))? {
            detectors.push(Detector::Threshold(name, d));
        }
    }
    if let Some(rate) = &r.rate_of_change {
        detectors.push(Detector::Rate(
            rate_for(rate).map_err(|e| ("rate_of_change".to_string(), e.to_string()))?,
        ));
    }
    Ok(detectors)
}

/// Checks that rule `i` can use `table`: the columns it names exist, the
/// `*` row exists for `on_missing = "default"`, and every row gives usable
/// levels and calibration (else the table's line and why).
fn check_join(r: &Rule, table: &Table, i: usize) -> Result<(), String> {
    let name = r.table.as_deref().unwrap_or_default();
    for (j, t) in r.thresholds.iter().enumerate() {
        for (key, limit) in [
            ("above", &t.above),
            ("below", &t.below),
            ("clear_at", &t.clear_at),
        ] {
            if let Some(column) = limit.as_ref().and_then(Limit::column)
                && !table.columns.iter().any(|c| c == column)
            {
                return Err(format!(
                    "rules[{i}].thresholds[{j}].{key}: table {name:?} has no column {column:?} (it has {:?})",
                    table.columns
                ));
            }
        }
    }
    if r.on_missing == OnMissing::Default && table.row("*").is_none() {
        return Err(format!(
            "rules[{i}].on_missing: \"default\" takes the row whose key is \"*\", and table {name:?} has none"
        ));
    }
    for (key, row, line) in table.rows() {
        let at = |why: &dyn std::fmt::Display| {
            format!(
                "tables.{name} {} {line} ({key}): rules[{i}].{why}",
                table.place
            )
        };
        detectors_of(r, Some(row)).map_err(|(k, e)| at(&format!("{k}: {e}")))?;
        if r.calibrate {
            for column in ["scale", "offset"] {
                if row.contains_key(column) && tables::number(row, column).is_none() {
                    return Err(at(&format!(
                        "calibrate: {column} {} is not a number",
                        row[column]
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The rate-of-change detector a rule asks for.
pub fn rate_for(r: &RateRule) -> Result<RateOfChangeDetector, RuleError> {
    let levels = Hysteresis::new(
        r.per_second_above,
        r.clear_below.unwrap_or(r.per_second_above),
        r.raise_after,
        r.clear_after,
    )?;
    RateOfChangeDetector::new(1000, levels)
}

/// An alert detector of a series, with the name alerts carry.
#[derive(Clone)]
pub enum Detector {
    /// EWMA z-score.
    ZScore(ZScoreDetector),
    /// A threshold; the name says which (`threshold_above`, …).
    Threshold(&'static str, ThresholdDetector),
    /// Rate of change per second.
    Rate(RateOfChangeDetector),
}

/// A detector's state without its name, for checkpoints.
#[derive(Clone, Serialize, Deserialize)]
pub enum DetectorState {
    /// EWMA z-score.
    ZScore(ZScoreDetector),
    /// A threshold.
    Threshold(ThresholdDetector),
    /// Rate of change.
    Rate(RateOfChangeDetector),
}

/// What one detector made of a reading, when it changed state.
pub struct Change {
    /// The rule's name.
    pub rule: &'static str,
    /// Raised or cleared.
    pub transition: Transition,
    /// The score that caused it (|z|, the value, or the rate).
    pub score: Option<f64>,
    /// The level it was compared with.
    pub threshold: f64,
}

impl Detector {
    /// Its state, for a checkpoint.
    pub fn state(&self) -> DetectorState {
        match self {
            Detector::ZScore(d) => DetectorState::ZScore(*d),
            Detector::Threshold(_, d) => DetectorState::Threshold(*d),
            Detector::Rate(d) => DetectorState::Rate(*d),
        }
    }

    /// Takes `state` back from a checkpoint; false (and no change) if it is
    /// of another kind.
    pub fn restore(&mut self, state: DetectorState) -> bool {
        match (self, state) {
            (Detector::ZScore(d), DetectorState::ZScore(s)) => *d = s,
            (Detector::Threshold(_, d), DetectorState::Threshold(s)) => *d = s,
            (Detector::Rate(d), DetectorState::Rate(s)) => *d = s,
            _ => return false,
        }
        true
    }

    /// Feeds a reading; returns the change of state it caused, if any.
    pub fn observe(&mut self, ts: Timestamp, value: f64) -> Option<Change> {
        let (rule, verdict) = match self {
            Detector::ZScore(d) => ("zscore", d.observe(value)),
            Detector::Threshold(name, d) => (*name, d.observe(value)),
            Detector::Rate(d) => ("rate_of_change", d.observe(ts, value)),
        };
        let verdict = verdict.ok()?;
        let transition = verdict.transition?;
        // The level crossed: the raise level for a raise, the clear level for
        // a clear, in the units of the score.
        let levels = match self {
            Detector::ZScore(d) => *d.machine().levels(),
            Detector::Threshold(_, d) => {
                return Some(Change {
                    rule,
                    transition,
                    score: verdict.score,
                    threshold: match transition {
                        Transition::Raised => d.limit(),
                        Transition::Cleared => d.clear_level(),
                    },
                });
            }
            Detector::Rate(d) => *d.levels(),
        };
        let threshold = match transition {
            Transition::Raised => levels.raise_at(),
            Transition::Cleared => levels.clear_below(),
        };
        Some(Change {
            rule,
            transition,
            score: verdict.score,
            threshold,
        })
    }
}

pub(crate) fn fingerprint<T: Serialize>(settings: &T) -> u64 {
    sluice_core::hash::hash64(&serde_json::to_vec(settings).unwrap_or_default(), 0)
}

/// Fingerprint of the settings that shape a rule's windows (a checkpoint
/// restores a window only under the same settings).
pub fn window_fingerprint(rule: &Rule) -> u64 {
    fingerprint(&(&rule.window, &rule.quantiles))
}

/// Fingerprint of the settings that shape a rule's detectors.
pub fn detector_fingerprint(rule: &Rule) -> u64 {
    fingerprint(&(&rule.anomaly, &rule.thresholds, &rule.rate_of_change))
}

/// A rule, compiled.
pub struct CompiledRule {
    /// The rule as configured, to tell on reload what changed.
    config: Rule,
    pattern: glob::Pattern,
    window: Option<Window>,
    /// A window of the same shape over quantile sketches, when the rule asks
    /// for quantiles; it sees the same readings, so it closes in step.
    quantiles: Option<Window<Quantiles>>,
    detectors: Vec<Detector>,
    priority: Priority,
    /// Fingerprints of the window and detector settings, for checkpoints
    /// (computed once here: hashing settings per series made a checkpoint
    /// of 10,000 series several times slower).
    fingerprints: (u64, u64),
    /// `absent_after_ms`.
    absent_after: Option<Timestamp>,
    /// The label sketches per window, if the rule asks for any.
    labels: Option<labels::LabelSpec>,
    /// Fingerprint of the label settings (`distinct`, `top_k`, `sample`,
    /// `first_seen`), for checkpoints.
    labels_fingerprint: u64,
    /// `group_by`, compiled.
    group: Option<GroupSpec>,
    /// `table`, read.
    table: Option<Arc<Table>>,
    /// Whether each series' detectors come from its row.
    per_series: bool,
}

/// The rules of a configuration, in order.
pub struct Rules {
    rules: Vec<CompiledRule>,
    any_critical: bool,
    /// Whether any rule groups.
    any_group: bool,
    /// The derived series, in order (`[[derived]]`).
    derived: Vec<Derived>,
    /// The patterns, in order (`[[patterns]]`).
    patterns: Vec<Pattern>,
    /// What each series feeds (see [`feeds`]).
    feeds: Feeds,
}

impl Rules {
    /// Compiles validated rules that use no reference table.
    pub fn compile(rules: &[Rule]) -> Result<Rules, String> {
        Self::compile_with(rules, &Tables::default())
    }

    /// Compiles validated rules, joining those with a `table` to `tables`:
    /// an error names the rule's key, or the table's line whose values the
    /// rule cannot use.
    pub fn compile_with(rules: &[Rule], tables: &Tables) -> Result<Rules, String> {
        let mut compiled = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let bad = |what: &str, e: &dyn std::fmt::Display| format!("rules[{i}].{what}: {e}");
            let table = match &r.table {
                None => None,
                Some(name) => Some(tables.get(name).cloned().ok_or_else(|| {
                    bad(
                        "table",
                        &format!("no table {name:?} was read ([tables.{name}])"),
                    )
                })?),
            };
            if let Some(t) = &table {
                check_join(r, t, i)?;
            }
            let detectors = detectors_of(r, None).map_err(|(key, e)| bad(&key, &e))?;
            compiled.push(CompiledRule {
                per_series: table.is_some(),
                table,
                group: GroupSpec::of(r),
                labels: labels::LabelSpec::of(r),
                labels_fingerprint: labels::fingerprint(r),
                fingerprints: (window_fingerprint(r), detector_fingerprint(r)),
                absent_after: r.absent_after_ms.map(|ms| ms as Timestamp),
                config: r.clone(),
                pattern: glob::Pattern::new(&r.pattern).map_err(|e| bad("match", &e))?,
                quantiles: match (&r.window, r.quantiles.at.is_empty()) {
                    (Some(w), false) => {
                        let shape =
                            QuantileShape::of(&r.quantiles).map_err(|e| bad("quantiles", &e))?;
                        Some(
                            window_for::<Quantiles>(w)
                                .map_err(|e| bad("window", &e))?
                                .with_params(shape),
                        )
                    }
                    _ => None,
                },
                window: r
                    .window
                    .as_ref()
                    .map(window_for)
                    .transpose()
                    .map_err(|e| bad("window", &e))?,
                detectors,
                priority: match r.priority {
                    PriorityKind::Normal => Priority::Normal,
                    PriorityKind::Critical => Priority::Critical,
                },
            });
        }
        let any_critical = compiled.iter().any(|r| r.priority == Priority::Critical);
        let any_group = compiled.iter().any(|r| r.group.is_some());
        Ok(Rules {
            rules: compiled,
            any_critical,
            any_group,
            derived: Vec::new(),
            patterns: Vec::new(),
            feeds: Feeds::default(),
        })
    }

    /// The rules of `config`, joined to its tables, with its derived series
    /// and patterns.
    pub fn of(config: &crate::config::Config) -> Result<Rules, String> {
        Self::compile_with(&config.rules, &config.table_data)?
            .with_derived(&config.derived)?
            .with_patterns(&config.patterns)
    }

    /// Adds the patterns of `patterns` (`[[patterns]]`): an error names the
    /// entry and key.
    pub fn with_patterns(mut self, patterns: &[PatternRule]) -> Result<Rules, String> {
        for (i, p) in patterns.iter().enumerate() {
            let bad = |e: &dyn std::fmt::Display| format!("patterns[{i}].{e}");
            let compiled = Pattern::compile(p).map_err(|e| bad(&e))?;
            if let Some(j) = self.patterns.iter().position(|o| o.config.name == p.name) {
                return Err(bad(&format!("name: patterns[{j}] has the same name")));
            }
            let index = self.patterns.len();
            for (c, step) in [
                (&p.first, sluice_core::pattern::Step::First),
                (&p.then, sluice_core::pattern::Step::Then),
            ] {
                let glob = glob::Pattern::new(&c.pattern).map_err(|e| bad(&e))?;
                self.feeds.add(&glob, Feed::Pattern(index, step));
            }
            self.patterns.push(compiled);
        }
        Ok(self)
    }

    /// Adds the derived series of `derived` (`[[derived]]`): an error names
    /// the entry and key.
    pub fn with_derived(mut self, derived: &[DerivedRule]) -> Result<Rules, String> {
        for (i, d) in derived.iter().enumerate() {
            let bad = |e: &dyn std::fmt::Display| format!("derived[{i}].{e}");
            let compiled = Derived::compile(d).map_err(|e| bad(&e))?;
            if let Some(j) = self.derived.iter().position(|o| o.config.name == d.name) {
                return Err(bad(&format!("name: derived[{j}] has the same name")));
            }
            // One derived series may not feed another: a derived reading is
            // offered to patterns only, so that one reading makes at most
            // one step of derived readings (no chains, no cycles).
            if let Some(j) = self.derived.iter().position(|o| o.side(&d.name).is_some()) {
                return Err(bad(&format!(
                    "name: {:?} is an input of derived[{j}]; a derived series cannot feed another",
                    d.name
                )));
            }
            // (A grouped one's ids are `<name>:<value>` too: probed with a
            // value, since a glob cannot be checked for every one.)
            let ids = |o: &Derived| {
                let name = &o.config.name;
                match o.group {
                    Some(_) => vec![name.clone(), format!("{name}:"), format!("{name}:x")],
                    None => vec![name.clone()],
                }
            };
            if let Some(j) = self
                .derived
                .iter()
                .position(|o| ids(o).iter().any(|id| compiled.side(id).is_some()))
            {
                return Err(bad(&format!(
                    "a: takes derived[{j}] ({:?}) as an input; a derived series cannot feed another",
                    self.derived[j].config.name
                )));
            }
            let index = self.derived.len();
            for (glob, side) in [
                (&d.a, sluice_core::join::Side::A),
                (&d.b, sluice_core::join::Side::B),
            ] {
                let glob = glob::Pattern::new(glob).map_err(|e| bad(&e))?;
                self.feeds.add(&glob, Feed::Derived(index, side));
            }
            self.feeds.add_output(&d.name, d.group_by.is_some());
            self.derived.push(compiled);
        }
        Ok(self)
    }

    /// Where a reading goes: a reading of a series that feeds a derived
    /// series or a pattern, or of a derived series, keeps its id and goes
    /// to the joins' worker (the hash of [`JOINS_HOME`] by `hasher` is
    /// returned; see [`feeds`]); a reading of a grouped rule takes its
    /// group's id as its series (see [`groups`]); other readings stay as
    /// they are.
    pub fn route(
        &self,
        reading: &mut sluice_collectors::Reading,
        hasher: &sluice_core::hash::SeriesHasher,
    ) -> Option<u64> {
        if self.joins_hold(&reading.series) {
            return Some(hasher.hash(JOINS_HOME.as_bytes()));
        }
        if self.any_group
            && let Some(rule) = self.find(&reading.series)
            && let Some(group) = &self.rules[rule].group
        {
            reading.series = group.key(reading.labels.as_deref());
        }
        None
    }

    /// Whether the joins' worker holds `series`: it feeds a derived series
    /// or a pattern, or it is a derived series.
    pub fn joins_hold(&self, series: &str) -> bool {
        !self.feeds.is_empty() && self.feeds.holds(series)
    }

    /// The id whose worker holds `series`' state: [`JOINS_HOME`] for the
    /// series the joins' worker holds, or its own.
    pub fn home<'a>(&'a self, series: &'a str) -> &'a str {
        if self.joins_hold(series) {
            JOINS_HOME
        } else {
            series
        }
    }

    /// Puts what `series` feeds in `out` (see [`Feeds::of`]).
    pub fn feeds(&self, series: &str, out: &mut Vec<Feed>) {
        if self.feeds.is_empty() {
            out.clear();
        } else {
            self.feeds.of(series, out);
        }
    }

    /// Whether any series feeds a derived series or a pattern.
    pub fn any_feeds(&self) -> bool {
        !self.feeds.is_empty()
    }

    /// The patterns, in order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// The derived series, in order.
    pub fn derived(&self) -> &[Derived] {
        &self.derived
    }

    /// The rule whose state the series table holds under `key`: the
    /// grouped rule whose group ids `key` has the form of (see
    /// [`groups`]), or else the first rule matching it.
    pub fn resolve(&self, key: &str) -> Option<usize> {
        if self.any_group
            && let Some(i) = self
                .rules
                .iter()
                .position(|r| r.group.as_ref().is_some_and(|g| g.parse(key).is_some()))
        {
            return Some(i);
        }
        self.find(key)
    }

    /// Rule `i`'s grouping, if it groups.
    pub fn group(&self, i: usize) -> Option<&GroupSpec> {
        self.rules[i].group.as_ref()
    }

    /// `series` joined to rule `i`'s table: by its id, or with
    /// `join_label` by `label`, the label's value (`None`: the reading has
    /// no such label, so no row).
    pub fn join(&self, i: usize, series: &str, label: Option<&str>) -> Join {
        let r = &self.rules[i];
        let Some(table) = &r.table else {
            return Join::NoTable;
        };
        let key = match &r.config.join_label {
            None => Some(series),
            Some(_) => label,
        };
        if let Some((row, _)) = key.and_then(|key| table.row(key)) {
            return Join::Row(row.clone());
        }
        match r.config.on_missing {
            OnMissing::Pass => Join::Missing,
            OnMissing::Refuse => Join::Refused,
            // Checked at compile: the row exists.
            OnMissing::Default => table
                .row("*")
                .map_or(Join::Missing, |(row, _)| Join::Row(row.clone())),
        }
    }

    /// The label rule `i` joins its table by (`join_label`), if any.
    pub fn join_label(&self, i: usize) -> Option<&str> {
        self.rules[i].config.join_label.as_deref()
    }

    /// The detectors of a series of rule `i` joined to `row`.
    pub fn detectors_for(&self, i: usize, row: Option<&Row>) -> Vec<Detector> {
        let r = &self.rules[i];
        if !r.per_series {
            return r.detectors.clone();
        }
        // Every row was checked at compile: this cannot fail.
        detectors_of(&r.config, row).unwrap_or_default()
    }

    /// `calibrate`: the (scale, offset) of a series of rule `i` joined to
    /// `row`, if the rule calibrates.
    pub fn calibration(&self, i: usize, row: Option<&Row>) -> Option<(f64, f64)> {
        let r = &self.rules[i];
        if !r.config.calibrate {
            return None;
        }
        let (scale, offset) = row.map_or((None, None), |row| {
            (tables::number(row, "scale"), tables::number(row, "offset"))
        });
        Some((scale.unwrap_or(1.0), offset.unwrap_or(0.0)))
    }

    /// The first rule matching `series`.
    pub fn find(&self, series: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.pattern.matches(series))
    }

    /// Whether any rule marks series critical (if not, priorities need no lookup).
    pub fn any_critical(&self) -> bool {
        self.any_critical
    }

    /// The shedding priority of `series`.
    pub fn priority(&self, series: &str) -> Priority {
        self.resolve(series)
            .map_or(Priority::Normal, |i| self.rules[i].priority)
    }

    /// Rule `i` as configured.
    pub fn config(&self, i: usize) -> &Rule {
        &self.rules[i].config
    }

    /// Fingerprints of rule `i`'s window and detector settings (see
    /// [`window_fingerprint`]).
    pub fn fingerprints(&self, i: usize) -> (u64, u64) {
        self.rules[i].fingerprints
    }

    /// How long a series under rule `i` may send nothing before it is
    /// reported absent (`absent_after_ms`), ms.
    pub fn absent_after(&self, i: usize) -> Option<Timestamp> {
        self.rules[i].absent_after
    }

    /// What rule `i` asks of its labels per window.
    pub fn label_spec(&self, i: usize) -> Option<&labels::LabelSpec> {
        self.rules[i].labels.as_ref()
    }

    /// Fingerprint of rule `i`'s label settings.
    pub fn labels_fingerprint(&self, i: usize) -> u64 {
        self.rules[i].labels_fingerprint
    }

    /// Fresh state for a series under rule `i`.
    pub fn state(&self, i: usize) -> (Option<Window>, Option<Window<Quantiles>>, Vec<Detector>) {
        let r = &self.rules[i];
        (r.window.clone(), r.quantiles.clone(), r.detectors.clone())
    }
}

impl Rule {
    /// Checks the rule; an error starts with the key (below the rule) it
    /// is about: `window.size_ms: …`.
    pub fn validate(&self) -> Result<(), String> {
        glob::Pattern::new(&self.pattern)
            .map_err(|e| format!("match: bad glob {:?}: {e}", self.pattern))?;
        if let Some(w) = &self.window {
            window_for::<sluice_core::aggregate::Aggregate>(w)
                .map_err(|e| format!("window.{}", window_problem(w, e)))?;
        }
        if !self.quantiles.at.is_empty() && self.window.is_none() {
            return Err("quantiles: need a window".into());
        }
        if self.quantiles.at.iter().any(|q| !(*q > 0.0 && *q < 1.0)) {
            let key = if self.quantiles.table {
                "quantiles.at"
            } else {
                "quantiles"
            };
            return Err(format!("{key}: each must be in (0, 1), e.g. 0.99"));
        }
        QuantileShape::of(&self.quantiles).map_err(|e| format!("quantiles.{e}"))?;
        if self.window.is_none()
            && self.anomaly.is_none()
            && self.thresholds.is_empty()
            && self.rate_of_change.is_none()
            && self.absent_after_ms.is_none()
            && self.first_seen.is_none()
        {
            return Err("match: the rule computes nothing: add a window, anomaly, thresholds, rate_of_change, absent_after_ms or first_seen".into());
        }
        if self
            .absent_after_ms
            .is_some_and(|ms| !(100..=i64::MAX as u64 / 2).contains(&ms))
        {
            return Err("absent_after_ms: must be at least 100".into());
        }
        self.validate_labels()?;
        self.validate_group()?;
        if self.calibrate && self.table.is_none() {
            return Err(
                "calibrate: takes scale and offset from the rule's table: set table too".into(),
            );
        }
        if self.join_label.is_some() && self.table.is_none() {
            return Err(
                "join_label: joins to the rule's table by a label's value: set table too".into(),
            );
        }
        if self.on_missing != OnMissing::Pass && self.table.is_none() {
            return Err(
                "on_missing: says what a series without a row in table gets: set table too".into(),
            );
        }
        if let Some(a) = &self.anomaly {
            zscore_for(a).map_err(|e| {
                let levels = Levels {
                    raise: ("k", a.k),
                    clear: "clear_k",
                    raise_after: a.raise_after,
                    positive: true,
                };
                format!("anomaly.{}", levels.problem(&e))
            })?;
        }
        for (i, t) in self.thresholds.iter().enumerate() {
            let (key, limit) = match (&t.above, &t.below) {
                (Some(limit), None) => ("above", limit),
                (None, Some(limit)) => ("below", limit),
                _ => {
                    return Err(format!(
                        "thresholds[{i}].above: set exactly one of above and below"
                    ));
                }
            };
            let columns = [Some(limit), t.clear_at.as_ref()];
            if let Some(c) = columns.iter().flatten().find_map(|l| l.column())
                && self.table.is_none()
            {
                return Err(format!(
                    "thresholds[{i}].{key}: \"@{c}\" reads a column of the rule's table: set table too"
                ));
            }
            // Levels from columns are checked against each row at compile.
            let (Limit::Value(limit), None | Some(Limit::Value(_))) = (limit, &t.clear_at) else {
                continue;
            };
            let limit = (key, *limit);
            let clear = t.clear_at.as_ref().and_then(|c| c.resolve(None));
            threshold_at(limit.0 == "above", limit.1, clear, t).map_err(|e| {
                let levels = Levels {
                    raise: limit,
                    clear: "clear_at",
                    raise_after: t.raise_after,
                    positive: false,
                };
                format!("thresholds[{i}].{}", levels.problem(&e))
            })?;
        }
        if let Some(r) = &self.rate_of_change {
            rate_for(r).map_err(|e| {
                let levels = Levels {
                    raise: ("per_second_above", r.per_second_above),
                    clear: "clear_below",
                    raise_after: r.raise_after,
                    positive: false,
                };
                format!("rate_of_change.{}", levels.problem(&e))
            })?;
        }
        Ok(())
    }
}

impl Rule {
    /// The labels this rule reads: (key, label) for each label sketch.
    pub fn label_uses(&self) -> Vec<(&'static str, &str)> {
        let mut uses = Vec::new();
        if let Some(l) = &self.distinct {
            uses.push(("distinct", l.as_str()));
        }
        if let Some(t) = &self.top_k {
            uses.push(("top_k.label", t.label.as_str()));
        }
        if let Some(f) = &self.first_seen {
            uses.push(("first_seen.label", f.label.as_str()));
        }
        if let Some(f) = &self.frequency {
            uses.push(("frequency.label", f.label.as_str()));
        }
        if let Some(by) = self.group_by.as_deref().filter(|&by| by != GROUP_ALL) {
            uses.push(("group_by", by));
        }
        if let Some(label) = &self.join_label {
            uses.push(("join_label", label.as_str()));
        }
        uses
    }

    /// The group id prefix: `group_name`, or else `match`.
    pub fn group_name(&self) -> &str {
        self.group_name.as_deref().unwrap_or(&self.pattern)
    }

    fn validate_group(&self) -> Result<(), String> {
        if self.group_by.is_none() {
            if self.group_name.is_some() {
                return Err("group_name: names the groups of group_by: set group_by too".into());
            }
            return Ok(());
        }
        if self.window.is_none() {
            return Err("group_by: aggregates a group's readings per window: add a window".into());
        }
        if self.rate_of_change.is_some() {
            return Err("rate_of_change: compares a series' consecutive readings, and a group interleaves its members': not with group_by".into());
        }
        let key = if self.group_name.is_some() {
            "group_name"
        } else {
            "match"
        };
        let name = self.group_name();
        if name.is_empty() || name.len() > MAX_GROUP_NAME || name.contains(':') {
            return Err(format!(
                "{key}: {name:?} cannot name the rule's groups: 1 to {MAX_GROUP_NAME} bytes without ':'{}",
                if key == "match" {
                    " (set group_name)"
                } else {
                    ""
                }
            ));
        }
        if let Some(why) = sluice_collectors::reading::series_problem(name) {
            return Err(format!("{key}: {name:?} cannot be a series id: {why}"));
        }
        Ok(())
    }

    fn validate_labels(&self) -> Result<(), String> {
        for (key, label) in self.label_uses() {
            if label.is_empty() {
                return Err(format!(
                    "{key}: name a label (see labels in a source's json)"
                ));
            }
        }
        let per_window = [
            ("distinct", self.distinct.is_some()),
            ("top_k", self.top_k.is_some()),
            ("sample", self.sample.is_some()),
            ("frequency", self.frequency.is_some()),
        ];
        if let Some((key, _)) = per_window.iter().find(|(_, set)| *set)
            && !matches!(self.window, Some(WindowRule::Tumbling(_)))
        {
            return Err(format!("{key}: needs a tumbling window"));
        }
        let kll = self.quantiles.method == QuantileMethod::Kll && !self.quantiles.at.is_empty();
        if self.sketches && self.distinct.is_none() && self.frequency.is_none() && !kll {
            return Err("sketches: carries the distinct, frequency and KLL quantile sketches: set distinct, frequency or quantiles with method = \"kll\" too".into());
        }
        if let Some(f) = &self.frequency {
            if !(0.0001..=0.5).contains(&f.epsilon) {
                return Err("frequency.epsilon: must be from 0.0001 to 0.5, e.g. 0.01".into());
            }
            if !(1e-6..=0.5).contains(&f.delta) {
                return Err("frequency.delta: must be from 0.000001 to 0.5, e.g. 0.01".into());
            }
            if f.values.len() > 100 || f.values.iter().any(|v| v.is_empty() || v.len() > 64) {
                return Err("frequency.values: at most 100 values of 1 to 64 bytes".into());
            }
        }
        if let Some(t) = &self.top_k
            && !(1..=1000).contains(&t.k)
        {
            return Err("top_k.k: must be 1..=1000".into());
        }
        if let Some(s) = &self.sample
            && !(1..=1000).contains(&s.k)
        {
            return Err("sample.k: must be 1..=1000".into());
        }
        if let Some(f) = &self.first_seen {
            if !(1..=100_000_000).contains(&f.capacity) {
                return Err("first_seen.capacity: must be 1..=100000000".into());
            }
            if !(f.fpr > 0.0 && f.fpr < 0.5) {
                return Err("first_seen.fpr: must be in (0, 0.5), e.g. 0.01".into());
            }
        }
        Ok(())
    }
}

/// A window rule's error, as `key: why` with the key it is about.
fn window_problem(w: &WindowRule, e: WindowError) -> String {
    let key = match (e, w) {
        (WindowError::NotPositive, WindowRule::Hopping(h)) if h.size_ms > 0 => "slide_ms",
        (WindowError::NotPositive, WindowRule::Count(_)) => "size",
        (WindowError::NotPositive, WindowRule::Decaying(_)) => "every_ms",
        (WindowError::NotPositive, WindowRule::Session(w)) if w.gap_ms > 0 => "max_ms",
        (WindowError::NotPositive, WindowRule::Session(_)) => "gap_ms",
        (WindowError::LengthNotMultipleOfSlide, _) => "slide_ms",
        (WindowError::NotPositive, _) => "size_ms",
        (WindowError::NegativeLateness | WindowError::TooFewPanes { .. }, _) => "lateness_ms",
        (WindowError::BadDecay, _) => "half_life",
    };
    match e {
        WindowError::TooFewPanes { .. } if matches!(w, WindowRule::Session(_)) => {
            format!("{key}: at most 3 × gap_ms ({SESSIONS} sessions open at once)")
        }
        WindowError::LengthNotMultipleOfSlide => {
            format!("{key}: must divide size_ms into whole slides")
        }
        WindowError::BadDecay => format!("{key}: must be > 0 (readings)"),
        e => format!("{key}: {e}"),
    }
}

/// The keys of a detector's levels, to name the one a core error is about.
struct Levels {
    /// The raise level's key and value.
    raise: (&'static str, f64),
    /// The clear level's key.
    clear: &'static str,
    raise_after: u32,
    /// The raise level must be > 0 (a level of |z|).
    positive: bool,
}

impl Levels {
    fn problem(&self, e: &RuleError) -> String {
        let (raise_key, raise) = self.raise;
        if self.positive && raise <= 0.0 && !matches!(e, RuleError::ZeroCount) {
            // Checked after the levels' order in the core: say the first cause.
            return format!("{raise_key}: must be > 0");
        }
        let key = match e {
            RuleError::ClearAboveRaise | RuleError::NotFinite | RuleError::NegativeScore
                if raise.is_nan() || raise.is_infinite() =>
            {
                raise_key
            }
            RuleError::ClearAboveRaise | RuleError::NotFinite | RuleError::NegativeScore => {
                self.clear
            }
            RuleError::ZeroCount if self.raise_after == 0 => "raise_after",
            RuleError::ZeroCount => "clear_after",
            RuleError::Decay(_) => return "alpha: must be in (0, 1), e.g. 0.01".into(),
            RuleError::NotPositive => raise_key,
        };
        match e {
            RuleError::ZeroCount => format!("{key}: must be >= 1"),
            RuleError::ClearAboveRaise if key == self.clear => {
                format!("{key}: must not be past the raise level ({raise_key} = {raise})")
            }
            e => format!("{key}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_change_carries_the_level_it_crossed() {
        for (above, below, clear_at, values, levels) in [
            (Some(80.0), None, 75.0, [90.0, 70.0], [80.0, 75.0]),
            (None, Some(10.0), 12.0, [5.0, 13.0], [10.0, 12.0]),
        ] {
            let rule = ThresholdRule {
                above: above.map(Limit::Value),
                below: below.map(Limit::Value),
                clear_at: Some(Limit::Value(clear_at)),
                raise_after: 1,
                clear_after: 1,
            };
            let mut d = Detector::Threshold("t", threshold_for(&rule, None).unwrap().unwrap());
            for (i, (value, level)) in values.into_iter().zip(levels).enumerate() {
                let change = d.observe(i as i64, value).expect("a change");
                assert_eq!(change.threshold, level, "{value} crossed {level}");
            }
        }
    }
}
