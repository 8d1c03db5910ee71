//! Records from sensor nodes: what a serial source with `format = "frames"`
//! reads (the core's [`link`](sluice_core::link) frames) and hands to the
//! agent, which merges them, instead of readings.

use sluice_core::Timestamp;
use sluice_core::aggregate::Aggregate;
use sluice_core::link::{Record, SketchKind};

use crate::reading::series_problem;

/// A record from a node, owned, for the agent's merger.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeRecord {
    /// A node (re)started.
    Hello {
        /// Its id.
        node: String,
        /// Its window length, ms.
        window_ms: u32,
    },
    /// A closed node window of a series.
    Window {
        /// The series id.
        series: String,
        /// Window start, ms (inclusive).
        start: Timestamp,
        /// Window end, ms (exclusive).
        end: Timestamp,
        /// Its statistics.
        aggregate: Aggregate,
    },
    /// A sketch of a node window (sent before that window's [`NodeRecord::Window`]).
    Sketch {
        /// The series id.
        series: String,
        /// Window start, ms (inclusive).
        start: Timestamp,
        /// Window end, ms (exclusive).
        end: Timestamp,
        /// Which sketch.
        kind: SketchKind,
        /// Its bytes, in its own format.
        bytes: Vec<u8>,
    },
    /// An alert transition on the node.
    Alert {
        /// The series id.
        series: String,
        /// Event time.
        ts: Timestamp,
        /// The reading.
        value: f64,
        /// Its |z|.
        score: f64,
        /// The level crossed.
        level: f64,
        /// Raised or cleared.
        raised: bool,
    },
    /// The node's own account of its work.
    Stats {
        /// Readings processed.
        readings: u64,
        /// CPU cycles spent on them.
        cycles: u64,
        /// Records it could not send.
        unsent: u64,
        /// The most stack it used, bytes.
        stack_bytes: u32,
    },
}

impl NodeRecord {
    /// The owned form of a link record; `Err` names what the series id
    /// policy refuses ([`series_problem`]). A [`Record::Sync`] (which only a
    /// gateway sends) is `Ok(None)`.
    pub fn from_link(record: &Record<'_>) -> Result<Option<NodeRecord>, &'static str> {
        let id = |s: &str| match series_problem(s) {
            Some(why) => Err(why),
            None if s.is_empty() => Err("an empty id"),
            None => Ok(s.to_owned()),
        };
        Ok(Some(match *record {
            Record::Sync { .. } => return Ok(None),
            Record::Hello { node, window_ms } => NodeRecord::Hello {
                node: id(node)?,
                window_ms,
            },
            Record::Window {
                series,
                start,
                end,
                aggregate,
            } => NodeRecord::Window {
                series: id(series)?,
                start,
                end,
                aggregate,
            },
            Record::Sketch {
                series,
                start,
                end,
                kind,
                bytes,
            } => NodeRecord::Sketch {
                series: id(series)?,
                start,
                end,
                kind,
                bytes: bytes.to_vec(),
            },
            Record::Alert {
                series,
                ts,
                value,
                score,
                level,
                raised,
            } => NodeRecord::Alert {
                series: id(series)?,
                ts,
                value,
                score,
                level,
                raised,
            },
            Record::Stats {
                readings,
                cycles,
                unsent,
                stack_bytes,
            } => NodeRecord::Stats {
                readings,
                cycles,
                unsent,
                stack_bytes,
            },
        }))
    }
}
