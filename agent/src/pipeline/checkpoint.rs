//! Checkpoints: the state of every series (open windows, their quantile
//! sketches, EWMA baselines and alert states), saved periodically and on
//! shutdown, and restored at start.
//!
//! # Guarantees
//!
//! * **A restart keeps baselines and does not double-count a window.** On
//!   shutdown with checkpoints on, a worker saves its open windows instead of
//!   closing them as partial; at start they are restored and close once,
//!   whole.
//! * **A crash does not double-count a window either.** A checkpoint travels
//!   to the store behind every record its worker emitted before it, and
//!   commits in the same transaction as the last of them, so a committed
//!   checkpoint never misses a record emitted before it. Records emitted
//!   after the last checkpoint update *window marks* (per series, the end of
//!   the newest window emitted) in their own transactions; at restore, a
//!   window a mark shows was emitted after the checkpoint is dropped instead
//!   of being emitted a second time. Without an outbox (checkpoints only)
//!   the marks are stored just the same (`ToStore::Mark`), in the order the
//!   aggregates were emitted. A mark older than every worker's
//!   checkpoint says nothing a checkpoint does not, and is pruned (see
//!   `Outbox::commit`). What a crash loses is what was only in
//!   memory: readings since the last checkpoint that no emitted window holds.
//! * **A window that may have lost readings says so.** A clean stop records
//!   itself in the store (`Outbox::mark_clean_stop`, once the writer has
//!   committed the final checkpoints); a start that finds no such record and
//!   restores state reports every window that started before it with
//!   `partial = true`, `partial_reason = "restored_after_crash"`.
//! * **State built by another configuration is not trusted.** Each series'
//!   state carries fingerprints of its rule's window and detector settings;
//!   a part whose settings changed starts afresh, as on a reload.
//! * **A damaged checkpoint is not restored.** Each is checksummed (XXH3) and
//!   versioned; one that fails either is skipped with an error line, and its
//!   series start afresh.
//!
//! The encoding is postcard (serde), behind a format number; the rows live
//! in the outbox's SQLite file (or `checkpoint.path` without an outbox).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sluice_core::Timestamp;

use crate::pipeline::rules::labels::{LabelsState, LabelsStateV2};
use crate::pipeline::rules::{Detector, DetectorState, JoinOp, Quantiles, Rules, Window};
use crate::pipeline::rules::{HoppingRule, SessionRule, TumblingRule, WindowRule};
use crate::store::outbox::SavedCheckpoint;
use sluice_core::pattern::Sequence;

/// The encoding's version; a checkpoint of another version is skipped.
/// Version 2 adds the series' label sketches after the series, in a list
/// of their own, so that version 1 (what 0.2 wrote) still reads; version 3
/// adds the `frequency` sketch to each open window's label sketches;
/// version 4 adds the derived series' joins and the patterns after the
/// label sketches (versions 1 to 3 still read).
pub const FORMAT: u16 = 4;

/// A pattern's state, as saved (by the joins' worker).
#[derive(Clone, Serialize, Deserialize)]
pub struct PatternState {
    /// The pattern's name.
    pub name: String,
    /// Fingerprint of its settings ([`Pattern::fingerprint`](crate::pipeline::rules::Pattern)).
    pub fingerprint: u64,
    /// Its conditions, pending event and alert.
    pub seq: Sequence,
    /// Largest event time among its inputs' readings.
    pub last_event: Timestamp,
    /// Wall time of its last input reading.
    pub last_seen: Timestamp,
    /// With `group_by`: the label's value of this group (`None`: the one,
    /// or the group without the label).
    pub group: Option<String>,
}

/// What a worker's checkpoint holds.
#[derive(Default, Clone)]
pub struct Decoded {
    /// Its series.
    pub series: Vec<SeriesState>,
    /// Its joins.
    pub joins: Vec<JoinState>,
    /// Its patterns.
    pub patterns: Vec<PatternState>,
}

/// A derived series' join, as saved (by the worker its inputs meet in).
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinState {
    /// The derived series' id.
    pub name: String,
    /// Fingerprint of its settings ([`Derived::fingerprint`](crate::pipeline::rules::Derived)).
    pub fingerprint: u64,
    /// Its open windows, or B's latest reading.
    pub op: JoinOp,
    /// The previous pair's event time and expression, for `rate(...)`.
    pub prev: Option<(Timestamp, f64)>,
    /// Largest event time among its inputs' readings.
    pub last_event: Timestamp,
    /// Wall time of its last input reading.
    pub last_seen: Timestamp,
    /// With `group_by`: the label's value of this group.
    pub group: Option<String>,
}

/// A series' windows, as saved.
#[derive(Clone, Serialize, Deserialize)]
pub struct WindowsState {
    /// The aggregate window.
    pub aggregate: Window,
    /// The quantile window, when the rule asks for quantiles.
    pub quantiles: Option<Window<Quantiles>>,
    /// Late readings since the last closed window.
    pub late: u64,
    /// Largest sampling weight since the last closed window.
    pub sampled_one_in: u32,
    /// End of the newest window emitted, if any.
    pub emitted_end: Option<Timestamp>,
}

/// A series' state, as saved.
#[derive(Clone, Serialize, Deserialize)]
pub struct SeriesState {
    /// The series key.
    pub series: String,
    /// Fingerprint of the window settings that built `windows`.
    pub window_fp: u64,
    /// Fingerprint of the detector settings that built `detectors`.
    pub detector_fp: u64,
    /// Its windows.
    pub windows: Option<WindowsState>,
    /// Its detectors, in rule order.
    pub detectors: Vec<DetectorState>,
    /// Largest event time seen.
    pub last_event: Timestamp,
    /// Wall time of its last reading.
    pub last_seen: Timestamp,
    /// Its label sketches (encoded beside the series, not in it: see
    /// [`FORMAT`]).
    #[serde(skip)]
    pub labels: Option<LabelsState>,
    /// With `join_label`: the label's value its row was joined by (encoded
    /// beside the series, format 4 on).
    #[serde(skip)]
    pub join_key: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: u16,
    series: Vec<SeriesState>,
    /// Per series, in the same order (format 2 on).
    labels: Vec<Option<LabelsState>>,
    /// The joins (format 4 on).
    joins: Vec<JoinState>,
    /// The patterns (format 4 on).
    patterns: Vec<PatternState>,
    /// Per series, in the same order: the label value of its join (format 4 on).
    join_keys: Vec<Option<String>>,
}

/// [`Envelope`] as format 3 wrote it.
#[derive(Deserialize)]
struct EnvelopeV3 {
    _format: u16,
    series: Vec<SeriesState>,
    labels: Vec<Option<LabelsState>>,
}

/// [`Envelope`] as format 2 wrote it.
#[derive(Deserialize)]
struct EnvelopeV2 {
    _format: u16,
    series: Vec<SeriesState>,
    labels: Vec<Option<LabelsStateV2>>,
}

/// Encodes a worker's series and joins.
pub fn encode(saved: Decoded) -> Vec<u8> {
    let Decoded {
        mut series,
        joins,
        patterns,
    } = saved;
    let labels = series.iter_mut().map(|s| s.labels.take()).collect();
    let join_keys = series.iter_mut().map(|s| s.join_key.take()).collect();
    postcard::to_allocvec(&Envelope {
        format: FORMAT,
        series,
        labels,
        joins,
        patterns,
        join_keys,
    })
    .unwrap_or_default()
}

/// [`SeriesState`], borrowed from a worker's series so that saving copies
/// nothing on the worker's thread. It encodes exactly as [`SeriesState`]
/// does (postcard is not self-describing: the same fields of the same
/// types in the same order make the same bytes), so [`decode`] reads it.
#[derive(Serialize)]
pub struct SeriesRef<'a> {
    /// The series key.
    pub series: &'a str,
    /// See [`SeriesState::window_fp`].
    pub window_fp: u64,
    /// See [`SeriesState::detector_fp`].
    pub detector_fp: u64,
    /// Its windows.
    pub windows: Option<WindowsRef<'a>>,
    /// Its detectors, in rule order.
    pub detectors: DetectorsRef<'a>,
    /// Largest event time seen.
    pub last_event: Timestamp,
    /// Wall time of its last reading.
    pub last_seen: Timestamp,
    /// Its label sketches (encoded beside the series: see [`FORMAT`]).
    #[serde(skip)]
    pub labels: Option<LabelsState>,
    /// See [`SeriesState::join_key`].
    #[serde(skip)]
    pub join_key: Option<String>,
}

/// [`WindowsState`], borrowed (see [`SeriesRef`]).
#[derive(Serialize)]
pub struct WindowsRef<'a> {
    /// The aggregate window.
    pub aggregate: &'a Window,
    /// The quantile window, when the rule asks for quantiles.
    pub quantiles: Option<&'a Window<Quantiles>>,
    /// Late readings since the last closed window.
    pub late: u64,
    /// Largest sampling weight since the last closed window.
    pub sampled_one_in: u32,
    /// End of the newest window emitted, if any.
    pub emitted_end: Option<Timestamp>,
}

/// A series' detectors, encoded as their [`DetectorState`]s.
pub struct DetectorsRef<'a>(pub &'a [Detector]);

impl Serialize for DetectorsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(Detector::state))
    }
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    format: u16,
    series: Vec<SeriesRef<'a>>,
    labels: Vec<Option<LabelsState>>,
    joins: Vec<JoinState>,
    patterns: Vec<PatternState>,
    join_keys: Vec<Option<String>>,
}

/// Encodes a worker's series without copying their windows and detectors
/// (label sketches are encoded as bytes; joins, a few per worker, are
/// copies); [`decode`] reads it as it reads what [`encode`] made.
pub fn encode_refs(
    mut series: Vec<SeriesRef<'_>>,
    joins: Vec<JoinState>,
    patterns: Vec<PatternState>,
) -> Vec<u8> {
    let labels = series.iter_mut().map(|s| s.labels.take()).collect();
    let join_keys = series.iter_mut().map(|s| s.join_key.take()).collect();
    postcard::to_allocvec(&EnvelopeRef {
        format: FORMAT,
        series,
        labels,
        joins,
        patterns,
        join_keys,
    })
    .unwrap_or_default()
}

/// Decodes what [`encode`] made (format 4), or what formats 1 to 3 were.
pub fn decode(bytes: &[u8]) -> Result<Vec<SeriesState>, String> {
    decode_all(bytes).map(|d| d.series)
}

/// [`decode`], with the joins and patterns.
pub fn decode_all(bytes: &[u8]) -> Result<Decoded, String> {
    let series = |series| Decoded {
        series,
        ..Decoded::default()
    };
    let (format, _) = postcard::take_from_bytes::<u16>(bytes).map_err(|e| e.to_string())?;
    match format {
        // Format 1: the series alone.
        1 => postcard::from_bytes::<(u16, Vec<SeriesState>)>(bytes)
            .map(|(_, s)| series(s))
            .map_err(|e| e.to_string()),
        2 => {
            let e = postcard::from_bytes::<EnvelopeV2>(bytes).map_err(|e| e.to_string())?;
            let labels = e
                .labels
                .into_iter()
                .map(|l| l.map(LabelsState::from))
                .collect();
            with_labels(e.series, labels).map(series)
        }
        3 => {
            let e = postcard::from_bytes::<EnvelopeV3>(bytes).map_err(|e| e.to_string())?;
            with_labels(e.series, e.labels).map(series)
        }
        FORMAT => {
            let e = postcard::from_bytes::<Envelope>(bytes).map_err(|e| e.to_string())?;
            if e.join_keys.len() != e.series.len() {
                return Err("join keys do not match the series".into());
            }
            let series = with_labels(e.series, e.labels)?
                .into_iter()
                .zip(e.join_keys)
                .map(|(s, join_key)| SeriesState { join_key, ..s })
                .collect();
            Ok(Decoded {
                series,
                joins: e.joins,
                patterns: e.patterns,
            })
        }
        other => Err(format!("format {other} (this build reads 1 to {FORMAT})")),
    }
}

/// Each series with its label sketches (the list beside them).
fn with_labels(
    series: Vec<SeriesState>,
    labels: Vec<Option<LabelsState>>,
) -> Result<Vec<SeriesState>, String> {
    if labels.len() != series.len() {
        return Err("label sketches do not match the series".into());
    }
    Ok(series
        .into_iter()
        .zip(labels)
        .map(|(s, labels)| SeriesState { labels, ..s })
        .collect())
}

/// How far past a window mark event time must be moved so that every window
/// ending at or before the mark is closed: the rule's allowed lateness
/// (`None` for count windows, which close by count: they start afresh).
pub fn lateness(rule: &WindowRule) -> Option<Timestamp> {
    match *rule {
        WindowRule::Tumbling(TumblingRule { lateness_ms, .. })
        | WindowRule::Hopping(HoppingRule { lateness_ms, .. }) => Some(lateness_ms),
        WindowRule::Decaying(_) => Some(0),
        // A session ending at the mark closes once event time passes its
        // last reading (the mark less one) plus the gap and the lateness.
        WindowRule::Session(SessionRule {
            gap_ms,
            lateness_ms,
            ..
        }) => Some(lateness_ms.saturating_add(gap_ms)),
        WindowRule::Count(_) => None,
    }
}

/// The saved state, sorted out at start.
#[derive(Default)]
pub struct Restored {
    /// Per worker, the series it owns now.
    pub per_worker: Vec<Vec<SeriesState>>,
    /// Per worker, the joins it owns now.
    pub joins: Vec<Vec<JoinState>>,
    /// Per worker, the patterns it owns now.
    pub patterns: Vec<Vec<PatternState>>,
    /// Window marks (series → end of the newest window emitted).
    pub marks: HashMap<String, Timestamp>,
    /// Checkpoints that could not be read, and why.
    pub skipped: Vec<String>,
    /// Whether the saved rows do not match the workers (their number
    /// changed): they must be rewritten before any worker saves.
    pub relayout: bool,
}

/// Decodes `saved` and deals each series to the worker that owns it among
/// `workers` (by the sources' shard function of its home under `rules`:
/// the joins' worker for the inputs of derived series and patterns, and
/// for derived series; else itself), and each join and pattern to the
/// joins' worker. A series found in two checkpoints (possible only after a
/// crash during a relayout) is taken from the newer.
pub fn distribute(
    saved: Vec<SavedCheckpoint>,
    marks: HashMap<String, Timestamp>,
    workers: usize,
    rules: &Rules,
) -> Restored {
    let mut restored = Restored {
        per_worker: (0..workers).map(|_| Vec::new()).collect(),
        joins: (0..workers).map(|_| Vec::new()).collect(),
        patterns: (0..workers).map(|_| Vec::new()).collect(),
        marks,
        ..Restored::default()
    };
    let mut seen: HashMap<String, (i64, usize, usize)> = HashMap::new();
    restored.relayout = saved.iter().any(|c| c.worker >= workers);
    let hasher = sluice_core::hash::SeriesHasher::default();
    let owner_of = |key: &str| match workers {
        1 => 0,
        n => hasher.shard(key.as_bytes(), n),
    };
    let mut joins_seen: HashMap<String, i64> = HashMap::new();
    let mut patterns_seen: HashMap<String, i64> = HashMap::new();
    for c in saved {
        let Decoded {
            series,
            joins,
            patterns,
        } = match c.state.and_then(|bytes| decode_all(&bytes)) {
            Ok(decoded) => decoded,
            Err(e) => {
                restored
                    .skipped
                    .push(format!("checkpoint of worker {}: {e}", c.worker));
                continue;
            }
        };
        // Joins and patterns live in the joins' worker; a name saved twice
        // (only after a crash during a relayout) is taken from the newer.
        let home = owner_of(super::rules::JOINS_HOME);
        for p in patterns {
            if home != c.worker {
                restored.relayout = true;
            }
            if patterns_seen
                .get(&p.name)
                .is_some_and(|&at| at >= c.saved_ms)
            {
                continue;
            }
            patterns_seen.insert(p.name.clone(), c.saved_ms);
            for list in &mut restored.patterns {
                list.retain(|o| o.name != p.name);
            }
            restored.patterns[home].push(p);
        }
        for j in joins {
            let owner = home;
            if owner != c.worker {
                restored.relayout = true;
            }
            // (Two copies only after a crash during a relayout.)
            if joins_seen.get(&j.name).is_some_and(|&at| at >= c.saved_ms) {
                continue;
            }
            joins_seen.insert(j.name.clone(), c.saved_ms);
            for list in &mut restored.joins {
                list.retain(|o| o.name != j.name);
            }
            restored.joins[owner].push(j);
        }
        for s in series {
            let owner = owner_of(rules.home(&s.series));
            if owner != c.worker {
                restored.relayout = true;
            }
            match seen.get(&s.series) {
                Some(&(at, _, _)) if at >= c.saved_ms => continue,
                Some(&(_, w, i)) => {
                    // Replace the older copy in place.
                    restored.per_worker[w][i] = s.clone();
                    seen.insert(s.series, (c.saved_ms, w, i));
                }
                None => {
                    let list = &mut restored.per_worker[owner];
                    seen.insert(s.series.clone(), (c.saved_ms, owner, list.len()));
                    list.push(s);
                }
            }
        }
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(series: &str) -> SeriesState {
        SeriesState {
            series: series.into(),
            window_fp: 1,
            detector_fp: 2,
            windows: None,
            detectors: Vec::new(),
            last_event: 10,
            last_seen: 20,
            labels: None,
            join_key: None,
        }
    }

    fn saved(worker: usize, saved_ms: i64, series: &[&str]) -> SavedCheckpoint {
        SavedCheckpoint {
            worker,
            saved_ms,
            state: Ok(encode(Decoded {
                series: series.iter().map(|s| state(s)).collect(),
                ..Decoded::default()
            })),
        }
    }

    #[test]
    fn series_go_to_their_owner_once_and_bad_checkpoints_are_skipped() {
        let hasher = sluice_core::hash::SeriesHasher::default();
        let names: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        // Saved by 3 workers (all in row 0 and 2, for the test), restored by 2;
        // s0 is also in an older row.
        let rows = vec![
            saved(0, 100, &refs[..20]),
            saved(2, 200, &refs[20..]),
            saved(1, 50, &refs[..1]),
            SavedCheckpoint {
                worker: 1,
                saved_ms: 300,
                state: Ok(vec![1, 2, 3]),
            },
        ];
        let r = distribute(rows, HashMap::new(), 2, &Rules::compile(&[]).unwrap());
        assert!(r.relayout);
        assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
        let total: usize = r.per_worker.iter().map(Vec::len).sum();
        assert_eq!(total, 40);
        for (w, list) in r.per_worker.iter().enumerate() {
            for s in list {
                assert_eq!(hasher.shard(s.series.as_bytes(), 2), w);
            }
        }
    }

    #[test]
    fn a_derived_series_its_inputs_and_its_join_go_to_the_joins_worker() {
        let hasher = sluice_core::hash::SeriesHasher::default();
        let derived: crate::pipeline::rules::DerivedRule = toml::from_str(
            "name = \"boiler/delta\"\na = \"boiler/inlet\"\nb = \"boiler/outlet\"\nexpr = \"a - b\"\nwindow_ms = 1000",
        )
        .unwrap();
        let rules = Rules::compile(&[])
            .unwrap()
            .with_derived(std::slice::from_ref(&derived))
            .unwrap();
        let d = &rules.derived()[0];
        let join = JoinState {
            name: derived.name.clone(),
            fingerprint: d.fingerprint,
            op: d.state(),
            prev: None,
            last_event: 0,
            last_seen: 0,
            group: None,
        };
        let home = hasher.shard(crate::pipeline::rules::JOINS_HOME.as_bytes(), 4);
        // Saved by worker 0 of 1; restored by 4 workers.
        let row = SavedCheckpoint {
            worker: 0,
            saved_ms: 1,
            state: Ok(encode(Decoded {
                series: vec![
                    state("boiler/inlet"),
                    state("boiler/outlet"),
                    state("boiler/delta"),
                    state("other"),
                ],
                joins: vec![join],
                patterns: Vec::new(),
            })),
        };
        let r = distribute(vec![row], HashMap::new(), 4, &rules);
        let names = |w: usize| {
            r.per_worker[w]
                .iter()
                .map(|s| s.series.as_str())
                .collect::<Vec<_>>()
        };
        assert!(names(home).contains(&"boiler/inlet"));
        assert!(names(home).contains(&"boiler/outlet"));
        assert!(names(home).contains(&"boiler/delta"));
        assert_eq!(r.joins[home].len(), 1);
        assert_eq!(r.joins.iter().map(Vec::len).sum::<usize>(), 1);
        assert!(names(hasher.shard(b"other", 4)).contains(&"other"));
    }

    #[test]
    fn another_format_is_refused() {
        let bytes = postcard::to_allocvec(&Envelope {
            format: FORMAT + 1,
            series: vec![state("a")],
            labels: vec![None],
            joins: Vec::new(),
            patterns: Vec::new(),
            join_keys: vec![None],
        })
        .unwrap();
        assert!(matches!(decode(&bytes), Err(e) if e.contains("format 5")));
        assert_eq!(
            decode(&encode(Decoded {
                series: vec![state("a")],
                ..Decoded::default()
            }))
            .unwrap()
            .len(),
            1
        );
        // Format 1 (0.2's: no label sketches) still reads.
        let v1 = postcard::to_allocvec(&(1u16, vec![state("a"), state("b")])).unwrap();
        assert_eq!(decode(&v1).unwrap().len(), 2);
        // Format 3 (no joins) still reads.
        let v3 =
            postcard::to_allocvec(&(3u16, vec![state("a")], vec![None::<LabelsState>])).unwrap();
        assert_eq!(decode(&v3).unwrap().len(), 1);
    }

    #[test]
    fn format_2_label_sketches_still_read() {
        use crate::pipeline::rules::labels::{LabelPanes, LabelSpec};
        use sluice_collectors::reading::Labels;
        let spec = LabelSpec {
            size_ms: 1000,
            distinct: Some("mac".into()),
            top: None,
            sample: None,
            frequency: None,
            sketches: false,
        };
        let mut panes = LabelPanes::default();
        for mac in ["a", "b", "c"] {
            let labels = Labels::new(std::sync::Arc::from(vec!["mac".into()]), &[Some(mac)]);
            panes.add(&spec, 10, 1.0, 1, labels.as_ref());
        }
        let saved = LabelsState::save(7, Some(&panes), None);
        // What 0.2's successor wrote: format 2, panes without frequency.
        let v2 =
            postcard::to_allocvec(&(2u16, vec![state("a")], vec![Some(saved.as_v2())])).unwrap();
        let back = decode(&v2).unwrap();
        let labels = back[0].labels.as_ref().unwrap();
        assert_eq!(labels.fingerprint, 7);
        let mut restored = labels.panes(&spec).unwrap();
        let (h, _) = restored.close(&spec, 0).distinct.unwrap();
        assert_eq!(h.estimate().round(), 3.0);
    }
}
