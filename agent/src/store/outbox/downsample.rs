//! Downsampling (`on_full = "downsample"`): the oldest aggregates of a
//! series merged pairwise into coarser windows.

use super::*;
use crate::output::{DistinctRecord, base64_bytes, base64_of, sketch_base64};

/// A record as downsampling sees it.
struct Row {
    seq: i64,
    topic: String,
    payload: Vec<u8>,
    /// The newest original record it holds (itself, unless merged).
    last: i64,
}

/// Merges the oldest records never sent pairwise with their successors, in
/// passes, until the bounds hold or nothing is left to merge. A record's
/// successor is the record of its topic appended right after it (its `prev`
/// is the first's `last`), found through the `records_by_prev` index, so
/// pairs are found however many series interleave: a record of the topic
/// deleted in between (one the live lane delivered before older ones, say)
/// leaves no successor, and a merged window never spans one already
/// delivered. A record sent (or being sent) is never merged, nor merged
/// into. Each pass looks at most at the [`DOWNSAMPLE_SCAN`] oldest unsent
/// records, so that a full outbox with nothing to merge costs an append a
/// bounded scan before the caller drops. Returns the number of records
/// merged away.
pub(super) fn downsample(
    tx: &Connection,
    claimed: &std::collections::HashSet<i64>,
    count: &mut u64,
    bytes: &mut u64,
    max_records: u64,
    max_bytes: u64,
) -> Result<u64, rusqlite::Error> {
    let row = |r: &rusqlite::Row<'_>| {
        let (seq, last): (i64, i64) = (r.get(0)?, r.get(4)?);
        Ok(Row {
            seq,
            topic: r.get(1)?,
            payload: r.get(2)?,
            last: if last == 0 { seq } else { last },
        })
    };
    let mut merged_away = 0;
    let mut select = tx.prepare_cached(
        "SELECT seq, topic, payload, prev, last FROM records WHERE sent = 0 ORDER BY seq LIMIT ?1",
    )?;
    let mut successor = tx.prepare_cached(
        "SELECT seq, topic, payload, prev, last FROM records
         WHERE prev = ?1 AND topic = ?2 AND sent = 0 AND seq > ?1",
    )?;
    let mut update = tx.prepare_cached(
        "UPDATE records SET payload = ?2, last = ?3, checksum = ?4 WHERE seq = ?1",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
    while *count > max_records || *bytes > max_bytes {
        let rows: Vec<Row> = select
            .query_map(params![DOWNSAMPLE_SCAN], row)?
            .collect::<Result<_, _>>()?;
        // Records merged in this pass (as either side): one merge each per
        // pass, so that windows coarsen evenly, pass by pass.
        let mut touched = std::collections::HashSet::new();
        let mut progress = false;
        for first in &rows {
            if *count <= max_records && *bytes <= max_bytes {
                break;
            }
            if touched.contains(&first.seq) || claimed.contains(&first.seq) {
                continue;
            }
            let Some(second) = successor
                .query_map(params![first.last, first.topic], row)?
                .next()
                .transpose()?
            else {
                continue;
            };
            if touched.contains(&second.seq) || claimed.contains(&second.seq) {
                continue;
            }
            let Some(merged) = merge_aggregates(&first.payload, &second.payload) else {
                continue;
            };
            update.execute(params![
                first.seq,
                merged,
                second.last,
                record_checksum(&first.topic, &merged)
            ])?;
            delete.execute(params![second.seq])?;
            touched.extend([first.seq, second.seq]);
            let delta = merged.len() as i64 - (first.payload.len() + second.payload.len()) as i64;
            add_counter(tx, "bytes", delta)?;
            add_counter(tx, "count", -1)?;
            *bytes = (*bytes as i64 + delta).max(0) as u64;
            *count -= 1;
            merged_away += 1;
            progress = true;
        }
        if !progress {
            break;
        }
    }
    Ok(merged_away)
}

/// How many of the oldest unsent records one downsampling pass looks at.
const DOWNSAMPLE_SCAN: i64 = 4096;

/// Two aggregate records of one series (JSON, as the workers write them),
/// `a` older than `b`, merged into one over both windows by the core's own
/// merge (`sluice_core::aggregate`): counts and sums add, min and max
/// combine, mean and standard deviation by Chan's parallel formulas, first
/// from `a` and last from `b`. Counts are already weighted (a sampled
/// reading counts as the readings it stands for), so a merge of sampled
/// windows stays an unbiased estimate; their `count_stderr`s combine as
/// independent errors and `sampled_one_in` keeps the larger rate.
/// Quantiles, top values and samples cannot be merged from their values
/// and are left out; distinct counts, frequencies and KLL quantiles merge
/// when both records carry their sketch (`sketches = true`), else are left
/// out too;
/// `downsampled` counts the original windows in it. `None` unless both are
/// aggregates, and `None` if `b` starts before `a` ends: overlapping windows
/// (hopping ones, say) share readings, and adding their counts would count
/// those twice, so such records are left to be dropped (and counted)
/// instead.
pub fn merge_aggregates(a: &[u8], b: &[u8]) -> Option<Vec<u8>> {
    use serde_json::{Map, Value};
    use sluice_core::aggregate::{Accumulator, Aggregate, Point};
    let parse = |bytes: &[u8]| -> Option<Map<String, Value>> {
        match serde_json::from_slice(bytes).ok()? {
            Value::Object(m) if m.contains_key("count") && m.contains_key("start") => Some(m),
            _ => None,
        }
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a.get("series") != b.get("series") {
        return None;
    }
    let f = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_f64);
    if f(&b, "start")? < f(&a, "end")? {
        return None;
    }
    // The core's aggregate of a record (first at its start, last just
    // before its end: a comes before b).
    let rebuild = |m: &Map<String, Value>| -> Option<Aggregate> {
        let (start, end) = (f(m, "start")? as i64, f(m, "end")? as i64);
        let count = m.get("count")?.as_u64()?;
        let mean = f(m, "mean")?;
        Aggregate::from_summary(
            count,
            f(m, "sum")?,
            mean,
            f(m, "stddev").map_or(0.0, |s| s * s),
            f(m, "min").unwrap_or(mean),
            f(m, "max").unwrap_or(mean),
            Point {
                ts: start,
                value: f(m, "first").unwrap_or(mean),
            },
            Point {
                ts: end.saturating_sub(1).max(start),
                value: f(m, "last").unwrap_or(mean),
            },
        )
    };
    let mut merged = rebuild(&a)?;
    merged.merge(&rebuild(&b)?);
    let mut out = b.clone();
    let num = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    let opt = |x: Option<f64>| x.map_or(Value::Null, num);
    out.insert("count".into(), Value::from(merged.count()));
    out.insert("sum".into(), num(merged.sum()));
    out.insert("mean".into(), opt(merged.mean()));
    out.insert("stddev".into(), opt(merged.stddev()));
    out.insert("min".into(), opt(merged.min()));
    out.insert("max".into(), opt(merged.max()));
    out.insert("first".into(), opt(merged.first().map(|p| p.value)));
    out.insert("last".into(), opt(merged.last().map(|p| p.value)));
    out.insert("start".into(), a["start"].clone());
    out.insert("end".into(), b["end"].clone());
    out.insert(
        "late".into(),
        Value::from((f(&a, "late").unwrap_or(0.0) + f(&b, "late").unwrap_or(0.0)) as u64),
    );
    let flag = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
    out.insert(
        "partial".into(),
        Value::Bool(flag(&a, "partial") || flag(&b, "partial")),
    );
    if let (Some(why), None) = (a.get("partial_reason"), out.get("partial_reason")) {
        out.insert("partial_reason".into(), why.clone());
    }
    let rate = match (f(&a, "sampled_one_in"), f(&b, "sampled_one_in")) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    if let Some(k) = rate.filter(|k| k.is_finite()) {
        out.insert("sampled_one_in".into(), Value::from(k as u64));
    }
    let (ea, eb) = (f(&a, "count_stderr"), f(&b, "count_stderr"));
    if ea.is_some() || eb.is_some() {
        let (ea, eb) = (ea.unwrap_or(0.0), eb.unwrap_or(0.0));
        out.insert("count_stderr".into(), num((ea * ea + eb * eb).sqrt()));
    }
    // Quantiles do not merge from their values: dropped, with their marks,
    // unless both carry their KLL sketch (`method = "kll"`, `sketches =
    // true`): then the union's. Nor do top values and samples merge.
    out.remove("quantiles_collapsed");
    match merge_kll(&a, &b) {
        Some((quantiles, sketch, rank_error)) => {
            out.insert("quantiles".into(), quantiles);
            out.insert("quantile_sketch".into(), sketch);
            out.insert("quantiles_rank_error".into(), rank_error);
        }
        None => {
            out.remove("quantiles");
            out.remove("quantile_sketch");
            out.remove("quantiles_rank_error");
        }
    }
    out.remove("top_k");
    out.remove("sample");
    // Frequencies merge when both carry their Count-Min sketch.
    match merge_frequency(a.get("frequency"), b.get("frequency")) {
        Some(f) => out.insert("frequency".into(), f),
        None => out.remove("frequency"),
    };
    // Distinct counts merge when both carry their sketch (`sketches =
    // true`): the union's estimate; without, they are dropped.
    match merge_distinct(a.get("distinct"), b.get("distinct")) {
        Some(d) => out.insert("distinct".into(), d),
        None => out.remove("distinct"),
    };
    let windows =
        |m: &Map<String, Value>| m.get("downsampled").and_then(Value::as_u64).unwrap_or(1);
    out.insert("downsampled".into(), Value::from(windows(&a) + windows(&b)));
    serde_json::to_vec(&Value::Object(out)).ok()
}

/// The quantiles, sketch and rank error of two windows' records whose
/// KLL sketches merge: the union's, at the quantiles `b` reports.
fn merge_kll(
    a: &serde_json::Map<String, serde_json::Value>,
    b: &serde_json::Map<String, serde_json::Value>,
) -> Option<(serde_json::Value, serde_json::Value, serde_json::Value)> {
    use datasketches::common::SearchCriteria;
    use datasketches::kll::{KllFloat, KllSketch};
    let read = |m: &serde_json::Map<String, serde_json::Value>| {
        let bytes = base64_bytes(m.get("quantile_sketch")?.as_str()?)?;
        KllSketch::<KllFloat<f64>>::deserialize(&bytes).ok()
    };
    let (mut union, other) = (read(a)?, read(b)?);
    union.merge(&other).ok()?;
    let mut quantiles = serde_json::Map::new();
    for name in b.get("quantiles")?.as_object()?.keys() {
        let level = name.strip_prefix('p')?.parse::<f64>().ok()? / 100.0;
        let value = union.quantile(level, SearchCriteria::Inclusive).ok()??;
        quantiles.insert(name.clone(), serde_json::json!(value.into_inner()));
    }
    Some((
        serde_json::Value::Object(quantiles),
        base64_of(&union.serialize()).into(),
        serde_json::json!(kll_rank_error(union.min_k())),
    ))
}

/// A KLL sketch's normalized rank error at 99 % confidence, for the
/// smallest `k` among what it merged: DataSketches' empirical formula, as
/// `KllSketch::normalized_rank_error` computes it, with the `libm` crate's
/// `pow` instead of `f64::powf`, which would make the agent load the C
/// library's libm.so for this one call (tests/linkage.rs). A test holds the
/// two equal.
pub(crate) fn kll_rank_error(min_k: u16) -> f64 {
    2.296 / libm::pow(f64::from(min_k), 0.9723)
}

/// The `frequency` of two windows' records merged: their Count-Min
/// sketches added (both must carry one, for the same label), and the
/// values `b` reports counted again.
fn merge_frequency(
    a: Option<&serde_json::Value>,
    b: Option<&serde_json::Value>,
) -> Option<serde_json::Value> {
    use sluice_core::sketch::CountMin;
    let (a, b) = (a?, b?);
    if a.get("label")? != b.get("label")? {
        return None;
    }
    let read = |f: &serde_json::Value| {
        let bytes = base64_bytes(f.get("sketch")?.as_str()?)?;
        let cells = CountMin::<Vec<u64>>::storage_len(&bytes).ok()?;
        CountMin::read_from(&bytes, vec![0u64; cells]).ok()
    };
    let (mut sum, other) = (read(a)?, read(b)?);
    sum.merge(&other).ok()?;
    let values: Vec<serde_json::Value> = b
        .get("values")?
        .as_array()?
        .iter()
        .filter_map(|v| {
            let value = v.get("value")?.as_str()?;
            Some(serde_json::json!({ "value": value, "count": sum.estimate(value.as_bytes()) }))
        })
        .collect();
    let without = |f: &serde_json::Value| f.get("without_label").and_then(|v| v.as_u64());
    Some(serde_json::json!({
        "label": a["label"],
        "total": sum.total(),
        "epsilon": sum.epsilon(),
        "delta": sum.delta(),
        "bound": sum.error_bound(),
        "values": values,
        "without_label": without(a)? + without(b)?,
        "sketch": sketch_base64(sum.serialized_len(), |b| sum.write_to(b)),
    }))
}

/// The `distinct` of two windows' records merged: their sketches' union
/// (both must carry one, for the same label), re-estimated.
fn merge_distinct(
    a: Option<&serde_json::Value>,
    b: Option<&serde_json::Value>,
) -> Option<serde_json::Value> {
    use sluice_core::sketch::HyperLogLog;
    let (a, b) = (a?, b?);
    if a.get("label")? != b.get("label")? {
        return None;
    }
    let read = |d: &serde_json::Value| {
        let bytes = base64_bytes(d.get("sketch")?.as_str()?)?;
        let storage = vec![0u8; HyperLogLog::<Vec<u8>>::storage_len(&bytes).ok()?];
        HyperLogLog::read_from(&bytes, storage).ok()
    };
    let (mut union, other) = (read(a)?, read(b)?);
    union.merge(&other).ok()?;
    let without = |d: &serde_json::Value| d.get("without_label").and_then(|v| v.as_u64());
    let label = a["label"].as_str()?;
    serde_json::to_value(DistinctRecord::of(
        label,
        &union,
        without(a)? + without(b)?,
        true,
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use datasketches::kll::{KllFloat, KllSketch};

    /// `kll_rank_error` is DataSketches' own figure, for every `k` a sketch
    /// can have (the two `pow`s may differ in the last bit).
    #[test]
    fn kll_rank_error_is_datasketches_figure() {
        for k in (8..=u16::MAX).step_by(7).chain([8, 200, u16::MAX]) {
            let sketch = KllSketch::<KllFloat<f64>>::new(k).unwrap();
            let (ours, theirs) = (super::kll_rank_error(k), sketch.normalized_rank_error());
            assert!(
                (ours - theirs).abs() <= theirs * 4.0 * f64::EPSILON,
                "k = {k}: {ours} against {theirs}"
            );
        }
    }
}
