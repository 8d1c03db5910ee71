//! Label sketches: what a rule computes over the labels of a series'
//! readings (see `labels` in a source's JSON mapping).
//!
//! Per window of a tumbling window rule: `distinct` (a HyperLogLog of a
//! label's values: nearly exact up to 384 values, then 1.3 % standard
//! error), `top_k` (Space-Saving over a label's values: the most frequent,
//! each count an overestimate by at most its `overcount`), `sample` (a
//! uniform sample of the window's readings), `frequency` (a Count-Min
//! sketch of a label's values: each count an overestimate by at most ε of
//! the window's labelled readings, but with probability δ). Across
//! windows: `first_seen`
//! (a Bloom filter of a label's values, which raises a `first_seen` alert
//! the first time a value appears). All in memory fixed by the rule.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sluice_collectors::reading::{LabelValue, Labels};
use sluice_core::Timestamp;
use sluice_core::sketch::{
    BloomFilter, CountMin, Counter, HyperLogLog, Membership, Reservoir, SampleItem, SpaceSaving,
    hll,
};

use super::{FirstSeenRule, FrequencyRule, Rule};

/// Registers of a window's distinct-count sketch (p = 12: DataSketches'
/// default lg_k, 1.3 % standard error, 2 KiB serialized).
pub const DISTINCT_REGISTERS: usize = 4096;
/// Space-Saving counters per value reported by `top_k` (so that the counts
/// of the top `k` are overestimated by at most 1/(8k) of the window's
/// readings).
const COUNTERS_PER_TOP: usize = 8;

type Hll = HyperLogLog<Vec<u8>>;
type Top = SpaceSaving<Vec<Counter>, Vec<u32>>;
/// A window's `frequency` sketch.
pub type Cm = CountMin<Vec<u64>>;

/// Seed of the `frequency` sketches' item hash (fixed, so that windows,
/// series and gateways merge).
pub const FREQUENCY_SEED: u64 = 0x5ca1_ab1e;

/// Fingerprint of a rule's label settings, for checkpoints (as before
/// `frequency` for a rule without it, so that their saved state reads).
pub fn fingerprint(rule: &Rule) -> u64 {
    let before = (
        &rule.window,
        &rule.distinct,
        &rule.top_k,
        &rule.sample,
        &rule.first_seen,
    );
    match &rule.frequency {
        None => super::fingerprint(&before),
        Some(f) => super::fingerprint(&(before, f)),
    }
}

/// What a rule asks of its labels per window, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSpec {
    /// Tumbling window length, ms.
    pub size_ms: Timestamp,
    /// `distinct`: the label.
    pub distinct: Option<String>,
    /// `top_k`: the label and `k`.
    pub top: Option<(String, usize)>,
    /// `sample`: readings kept.
    pub sample: Option<usize>,
    /// `frequency`.
    pub frequency: Option<FrequencyRule>,
    /// Records carry the serialized sketches.
    pub sketches: bool,
}

impl LabelSpec {
    /// The spec of `rule`, if it asks for label sketches (validated: they
    /// need a tumbling window).
    pub fn of(rule: &Rule) -> Option<LabelSpec> {
        let size_ms = match &rule.window {
            Some(super::WindowRule::Tumbling(t)) => t.size_ms,
            _ => return None,
        };
        let spec = LabelSpec {
            size_ms,
            distinct: rule.distinct.clone(),
            top: rule.top_k.as_ref().map(|t| (t.label.clone(), t.k)),
            sample: rule.sample.as_ref().map(|s| s.k),
            frequency: rule.frequency.clone(),
            sketches: rule.sketches,
        };
        (spec.distinct.is_some()
            || spec.top.is_some()
            || spec.sample.is_some()
            || spec.frequency.is_some())
        .then_some(spec)
    }
}

/// One reading of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleRow {
    /// Event time, ms since the epoch.
    pub ts: Timestamp,
    /// The value.
    pub value: f64,
}

impl SampleItem for SampleRow {
    const SIZE: usize = 16;
    fn to_bytes(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.ts.to_le_bytes());
        out[8..16].copy_from_slice(&self.value.to_le_bytes());
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(SampleRow {
            ts: Timestamp::from_le_bytes(bytes.get(..8)?.try_into().ok()?),
            value: f64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?),
        })
    }
}

/// The label sketches of one window.
#[derive(Clone)]
pub struct LabelWindow {
    /// `distinct`: the sketch, and readings without the label.
    pub distinct: Option<(Box<Hll>, u64)>,
    /// `top_k`: the counters, the values of the keys they track, and
    /// readings without the label.
    pub top: Option<(Box<Top>, HashMap<u64, LabelValue>, u64)>,
    /// `sample`.
    pub sample: Option<Box<Reservoir<SampleRow, Vec<SampleRow>>>>,
    /// `frequency`: the sketch, and readings without the label.
    pub frequency: Option<(Box<Cm>, u64)>,
}

/// An empty `frequency` sketch for `rule`.
pub fn frequency_sketch(rule: &FrequencyRule) -> Cm {
    let (w, d) = (Cm::width_for(rule.epsilon), Cm::depth_for(rule.delta));
    Cm::with_storage(vec![0; w * d], w, d, FREQUENCY_SEED, false)
        .expect("validated epsilon and delta")
}

impl LabelWindow {
    fn new(spec: &LabelSpec, start: Timestamp) -> LabelWindow {
        LabelWindow {
            distinct: spec.distinct.as_ref().map(|_| {
                let storage = vec![0; hll::storage_bytes(DISTINCT_REGISTERS)];
                (
                    Box::new(Hll::with_storage(storage).expect("valid constant size")),
                    0,
                )
            }),
            top: spec.top.as_ref().map(|&(_, k)| {
                let n = (k * COUNTERS_PER_TOP).max(64);
                let top = Top::new(vec![Counter::default(); n], vec![0; Top::index_len(n)])
                    .expect("valid counter count");
                (Box::new(top), HashMap::new(), 0)
            }),
            // Each window samples with its own generator.
            sample: spec.sample.map(|k| {
                Box::new(
                    Reservoir::new(vec![SampleRow::default(); k], start as u64 ^ 0x5a17_c0de)
                        .expect("k >= 1"),
                )
            }),
            frequency: spec
                .frequency
                .as_ref()
                .map(|f| (Box::new(frequency_sketch(f)), 0)),
        }
    }

    fn add(
        &mut self,
        spec: &LabelSpec,
        ts: Timestamp,
        value: f64,
        weight: u32,
        labels: Option<&Labels>,
    ) {
        let get = |name: &str| labels.and_then(|l| l.get(name));
        if let (Some((h, without)), Some(name)) = (&mut self.distinct, &spec.distinct) {
            match get(name) {
                Some(v) => h.insert(v.as_bytes()),
                None => *without += u64::from(weight),
            }
        }
        if let (Some((top, names, without)), Some((name, _))) = (&mut self.top, &spec.top) {
            match get(name) {
                Some(v) => {
                    let key = sluice_core::hash::hash64(v.as_bytes(), 0);
                    top.add(key, u64::from(weight));
                    if top.get(key).is_some() && !names.contains_key(&key) {
                        names.insert(key, LabelValue::try_from(v).unwrap_or_default());
                        // Names of evicted keys go once they outnumber the
                        // counters four to one: the map stays bounded.
                        if names.len() > 4 * top.capacity() {
                            names.retain(|k, _| top.get(*k).is_some());
                        }
                    }
                }
                None => *without += u64::from(weight),
            }
        }
        if let Some(s) = &mut self.sample {
            s.offer(SampleRow { ts, value });
        }
        if let (Some((cm, without)), Some(f)) = (&mut self.frequency, &spec.frequency) {
            match get(&f.label) {
                Some(v) => cm.add(v.as_bytes(), u64::from(weight)),
                None => *without += u64::from(weight),
            }
        }
    }
}

/// The label sketches of a series' open windows, by window start (a
/// tumbling window with lateness keeps up to four open).
#[derive(Clone, Default)]
pub struct LabelPanes {
    panes: Vec<(Timestamp, LabelWindow)>,
}

impl LabelPanes {
    /// Adds a reading that its tumbling window of `spec.size_ms` took.
    pub fn add(
        &mut self,
        spec: &LabelSpec,
        ts: Timestamp,
        value: f64,
        weight: u32,
        labels: Option<&Labels>,
    ) {
        let start = ts.div_euclid(spec.size_ms).saturating_mul(spec.size_ms);
        let i = match self.panes.iter().position(|(s, _)| *s == start) {
            Some(i) => i,
            None => {
                self.panes.push((start, LabelWindow::new(spec, start)));
                self.panes.len() - 1
            }
        };
        self.panes[i].1.add(spec, ts, value, weight, labels);
    }

    /// The sketches of the window starting at `start`, which has closed
    /// (with those of any earlier window, which closed before it); empty
    /// ones if it saw no reading (a window restored without them).
    pub fn close(&mut self, spec: &LabelSpec, start: Timestamp) -> LabelWindow {
        let taken = self
            .panes
            .iter()
            .position(|(s, _)| *s == start)
            .map(|i| self.panes.swap_remove(i).1);
        self.panes.retain(|(s, _)| *s > start);
        taken.unwrap_or_else(|| LabelWindow::new(spec, start))
    }
}

/// A series' `first_seen` filter.
#[derive(Clone)]
pub struct FirstSeen {
    bloom: BloomFilter<Vec<u64>>,
    /// Values added (each one that was new).
    added: u64,
    capacity: u64,
    /// The line that says it is over capacity was logged.
    pub warned: bool,
}

impl FirstSeen {
    /// An empty filter for `rule`.
    pub fn new(rule: &FirstSeenRule) -> FirstSeen {
        let words = BloomFilter::<Vec<u64>>::words_for(rule.capacity, rule.fpr);
        FirstSeen {
            bloom: BloomFilter::with_storage(vec![0; words], rule.capacity, 0)
                .expect("at least one word"),
            added: 0,
            capacity: rule.capacity,
            warned: false,
        }
    }

    /// Whether `value` is new (certainly never seen before; a value seen
    /// before is never new), adding it.
    pub fn first_time(&mut self, value: &str) -> bool {
        if self.bloom.contains(value.as_bytes()) == Membership::Maybe {
            return false;
        }
        self.bloom.insert(value.as_bytes());
        self.added += 1;
        true
    }

    /// Whether more values were added than the filter was sized for (new
    /// values are then missed more often than `fpr`).
    pub fn over_capacity(&self) -> bool {
        self.added > self.capacity
    }
}

/// Checkpointed state of a series' label sketches, in the sketches' own
/// byte formats.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct LabelsState {
    /// Fingerprint of the settings that built it.
    pub fingerprint: u64,
    /// Open windows: start, distinct (bytes, without label), top
    /// (counters' bytes, names, without label), sample bytes.
    pub panes: Vec<SavedPane>,
    /// The `first_seen` filter's bytes and values added.
    pub first_seen: Option<(Vec<u8>, u64)>,
}

/// One open window's label sketches, as bytes.
#[derive(Clone, Serialize, Deserialize)]
pub struct SavedPane {
    start: Timestamp,
    distinct: Option<(Vec<u8>, u64)>,
    top: Option<SavedTop>,
    sample: Option<Vec<u8>>,
    /// The `frequency` sketch and readings without the label (checkpoint
    /// format 3 on).
    frequency: Option<(Vec<u8>, u64)>,
}

/// [`LabelsState`] as checkpoint format 2 wrote it (no `frequency`).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct LabelsStateV2 {
    fingerprint: u64,
    panes: Vec<SavedPaneV2>,
    first_seen: Option<(Vec<u8>, u64)>,
}

/// [`SavedPane`] as checkpoint format 2 wrote it.
#[derive(Clone, Serialize, Deserialize)]
struct SavedPaneV2 {
    start: Timestamp,
    distinct: Option<(Vec<u8>, u64)>,
    top: Option<SavedTop>,
    sample: Option<Vec<u8>>,
}

impl LabelsState {
    /// This state as format 2 wrote it (its `frequency` sketches left out),
    /// to test that such checkpoints still read.
    #[doc(hidden)]
    pub fn as_v2(&self) -> LabelsStateV2 {
        LabelsStateV2 {
            fingerprint: self.fingerprint,
            panes: self
                .panes
                .iter()
                .map(|p| SavedPaneV2 {
                    start: p.start,
                    distinct: p.distinct.clone(),
                    top: p.top.clone(),
                    sample: p.sample.clone(),
                })
                .collect(),
            first_seen: self.first_seen.clone(),
        }
    }
}

impl From<LabelsStateV2> for LabelsState {
    fn from(v2: LabelsStateV2) -> LabelsState {
        LabelsState {
            fingerprint: v2.fingerprint,
            panes: v2
                .panes
                .into_iter()
                .map(|p| SavedPane {
                    start: p.start,
                    distinct: p.distinct,
                    top: p.top,
                    sample: p.sample,
                    frequency: None,
                })
                .collect(),
            first_seen: v2.first_seen,
        }
    }
}

/// A window's `top_k` counters, as bytes, the values of their keys, and
/// readings without the label.
#[derive(Clone, Serialize, Deserialize)]
pub struct SavedTop(Vec<u8>, Vec<(u64, String)>, u64);

fn bytes_of(
    len: usize,
    write: impl FnOnce(&mut [u8]) -> Result<usize, sluice_core::sketch::SketchError>,
) -> Vec<u8> {
    let mut buf = vec![0; len];
    let n = write(&mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

impl LabelsState {
    /// Saves `panes` and `first_seen`.
    pub fn save(
        fingerprint: u64,
        panes: Option<&LabelPanes>,
        first_seen: Option<&FirstSeen>,
    ) -> LabelsState {
        LabelsState {
            fingerprint,
            panes: panes
                .map(|p| {
                    p.panes
                        .iter()
                        .map(|(start, w)| SavedPane {
                            start: *start,
                            distinct: w.distinct.as_ref().map(|(h, n)| {
                                (bytes_of(h.serialized_len(), |b| h.write_to(b)), *n)
                            }),
                            top: w.top.as_ref().map(|(t, names, n)| {
                                SavedTop(
                                    bytes_of(t.serialized_len(), |b| t.write_to(b)),
                                    names.iter().map(|(k, v)| (*k, v.to_string())).collect(),
                                    *n,
                                )
                            }),
                            sample: w
                                .sample
                                .as_ref()
                                .map(|s| bytes_of(s.serialized_len(), |b| s.write_to(b))),
                            frequency: w.frequency.as_ref().map(|(cm, n)| {
                                (bytes_of(cm.serialized_len(), |b| cm.write_to(b)), *n)
                            }),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            first_seen: first_seen.map(|f| {
                (
                    bytes_of(f.bloom.serialized_len(), |b| f.bloom.write_to(b)),
                    f.added,
                )
            }),
        }
    }

    /// The open windows' sketches, if every one reads back under `spec`
    /// (else `None`: they start afresh).
    pub fn panes(&self, spec: &LabelSpec) -> Option<LabelPanes> {
        let mut out = LabelPanes::default();
        for p in &self.panes {
            let mut w = LabelWindow::new(spec, p.start);
            if let (Some((h, n)), Some(saved)) = (&mut w.distinct, &p.distinct) {
                let storage = vec![0; hll::storage_bytes(DISTINCT_REGISTERS)];
                **h = Hll::read_from(&saved.0, storage).ok()?;
                *n = saved.1;
            }
            if let (Some((t, names, n)), Some(saved)) = (&mut w.top, &p.top) {
                let (c, i) = (t.capacity(), Top::index_len(t.capacity()));
                **t = Top::read_from(&saved.0, vec![Counter::default(); c], vec![0; i]).ok()?;
                *names = saved
                    .1
                    .iter()
                    .filter_map(|(k, v)| Some((*k, LabelValue::try_from(v.as_str()).ok()?)))
                    .collect();
                *n = saved.2;
            }
            if let (Some(s), Some(saved)) = (&mut w.sample, &p.sample) {
                let k = spec.sample.unwrap_or(1);
                **s = Reservoir::read_from(saved, vec![SampleRow::default(); k]).ok()?;
            }
            if let (Some((cm, n)), Some(saved)) = (&mut w.frequency, &p.frequency) {
                let storage = vec![0; cm.width() * cm.depth()];
                **cm = Cm::read_from(&saved.0, storage).ok()?;
                *n = saved.1;
            }
            out.panes.push((p.start, w));
        }
        Some(out)
    }

    /// The `first_seen` filter, if it reads back under `rule`.
    pub fn first_seen(&self, rule: &FirstSeenRule) -> Option<FirstSeen> {
        let (bytes, added) = self.first_seen.as_ref()?;
        let mut f = FirstSeen::new(rule);
        let storage = vec![0; BloomFilter::<Vec<u64>>::words_for(rule.capacity, rule.fpr)];
        f.bloom = BloomFilter::read_from(bytes, storage).ok()?;
        f.added = *added;
        Some(f)
    }
}
