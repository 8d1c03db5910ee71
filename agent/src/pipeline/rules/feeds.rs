//! What a series feeds: the derived series (`[[derived]]`) and patterns
//! (`[[patterns]]`) whose inputs match it, found per reading.
//!
//! Every derived series and pattern lives in one worker, the *joins'
//! worker* (the worker of the id [`JOINS_HOME`]): the sources' hand-off
//! sends every reading of an input there (under its own id, so its own
//! rule's state lives there too), and so does the dealing of checkpoints.
//! So a series may feed any number of them, and a pattern may watch a
//! derived series. The price is that they share one worker's thread (a
//! join or pattern step costs 78 to 93 ns a reading: see `benches/README.md`).
//!
//! Inputs named literally are found by one hash lookup; globbed ones are
//! matched in turn.

use std::collections::{HashMap, HashSet};

use sluice_core::join::Side;
use sluice_core::pattern::Step;

/// The id whose worker holds every derived series, pattern and input.
pub const JOINS_HOME: &str = "sluice:joins";

/// One thing a series feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Side of derived series `.0`.
    Derived(usize, Side),
    /// Condition of pattern `.0`.
    Pattern(usize, Step),
}

impl Feed {
    /// The order readings are offered in: derived series first, by index
    /// (side A before B), then patterns by index, `then` before `first`
    /// (a reading of a series both conditions watch cannot be its own
    /// pattern's B).
    fn rank(&self) -> (u8, usize, u8) {
        match *self {
            Feed::Derived(d, side) => (0, d, (side == Side::B) as u8),
            Feed::Pattern(p, step) => (1, p, (step == Step::First) as u8),
        }
    }
}

/// The index (see the module docs).
#[derive(Default)]
pub struct Feeds {
    exact: HashMap<Box<str>, Vec<Feed>, foldhash::fast::RandomState>,
    globbed: Vec<(glob::Pattern, Feed)>,
    /// The derived series' ids (their state lives in the joins' worker).
    outputs: HashSet<Box<str>, foldhash::fast::RandomState>,
    /// The names of derived series with `group_by`, whose ids are
    /// `<name>:<value>` too.
    grouped: HashSet<Box<str>, foldhash::fast::RandomState>,
}

impl Feeds {
    /// Records that series matching `glob` feed `feed`.
    pub fn add(&mut self, glob: &glob::Pattern, feed: Feed) {
        let text = glob.as_str();
        if text.contains(['*', '?', '[']) {
            self.globbed.push((glob.clone(), feed));
        } else {
            self.exact.entry(text.into()).or_default().push(feed);
        }
    }

    /// Records a derived series' id (`grouped`: and the ids
    /// `<id>:<value>`).
    pub fn add_output(&mut self, id: &str, grouped: bool) {
        self.outputs.insert(id.into());
        if grouped {
            self.grouped.insert(id.into());
        }
    }

    /// Whether nothing is fed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.globbed.is_empty()
    }

    /// Whether the joins' worker holds `series`: it feeds something, or it
    /// is a derived series.
    pub fn holds(&self, series: &str) -> bool {
        self.exact.contains_key(series)
            || self.outputs.contains(series)
            || (!self.grouped.is_empty()
                && series
                    .split_once(':')
                    .is_some_and(|(name, _)| self.grouped.contains(name)))
            || self.globbed.iter().any(|(g, _)| g.matches(series))
    }

    /// Puts what `series` feeds in `out` (emptied first): derived series
    /// first, by index (side A before B), then patterns by index (`then`
    /// before `first`); a series both sides of a derived series match
    /// feeds side A only.
    pub fn of(&self, series: &str, out: &mut Vec<Feed>) {
        out.clear();
        if let Some(feeds) = self.exact.get(series) {
            out.extend_from_slice(feeds);
        }
        for (glob, feed) in &self.globbed {
            if glob.matches(series) {
                out.push(*feed);
            }
        }
        if out.len() > 1 {
            out.sort_unstable_by_key(Feed::rank);
            out.dedup_by(|later, earlier| {
                matches!((*later, *earlier), (Feed::Derived(a, _), Feed::Derived(b, _)) if a == b)
            });
        }
    }
}
