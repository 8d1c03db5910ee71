//! `sluice sketch merge`: merges the distinct-count sketches of aggregate
//! records (JSON lines, as an upstream subscriber receives them, or as
//! `sluice`'s outbox forwards them) and prints the union's estimate per
//! series and label (or per label across series), with the window range it
//! covers.

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::Serialize;
use sluice_core::Timestamp;
use sluice_core::sketch::{HyperLogLog, hll};

use crate::output::{DistinctRecord, base64_bytes};

/// How records are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeBy {
    /// Per series and label: each gateway's or sensor's distinct values
    /// over many windows.
    Series,
    /// Per label, across every series (and gateway): a fleet's distinct
    /// values.
    Label,
}

/// One group's union.
struct Group {
    sketch: HyperLogLog<Vec<u8>>,
    start: Timestamp,
    end: Timestamp,
    windows: u64,
    series: std::collections::BTreeSet<String>,
}

/// A merged line of output.
#[derive(Serialize)]
struct Merged<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    series: Option<&'a str>,
    /// With `--by label`: how many series went into it.
    #[serde(skip_serializing_if = "Option::is_none")]
    series_count: Option<usize>,
    label: &'a str,
    start: Timestamp,
    end: Timestamp,
    windows: u64,
    estimate: f64,
    rse: f64,
    low: f64,
    high: f64,
    sketch: String,
}

/// What a run read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Records whose sketch went into a union.
    pub merged: u64,
    /// Lines skipped: not JSON, or no `distinct.sketch` (a record of a rule
    /// without `sketches = true`, an alert, …).
    pub skipped: u64,
    /// Sketches that could not be read or merged (damaged, or of another
    /// size than the first of their group), with why.
    pub bad: Vec<String>,
}

/// Reads JSON lines from `input`, merges their sketches by `by`, and writes
/// one JSON line per group to `out`, sorted by series and label.
pub fn merge(
    input: impl BufRead,
    by: MergeBy,
    mut out: impl std::io::Write,
) -> std::io::Result<MergeReport> {
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    let mut report = MergeReport::default();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            report.skipped += 1;
            continue;
        };
        let d = &v["distinct"];
        let (Some(sketch), Some(label), Some(series), Some(start), Some(end)) = (
            d["sketch"].as_str(),
            d["label"].as_str(),
            v["series"].as_str(),
            v["start"].as_i64(),
            v["end"].as_i64(),
        ) else {
            report.skipped += 1;
            continue;
        };
        let read = base64_bytes(sketch)
            .ok_or_else(|| "not base64".to_string())
            .and_then(|bytes| {
                HyperLogLog::<Vec<u8>>::storage_len(&bytes)
                    .and_then(|len| HyperLogLog::read_from(&bytes, vec![0u8; len]))
                    .map_err(|e| e.to_string())
            });
        let sketch = match read {
            Ok(s) => s,
            Err(e) => {
                report.bad.push(format!("line {}: {e}", n + 1));
                continue;
            }
        };
        let key = match by {
            MergeBy::Series => (series.to_owned(), label.to_owned()),
            MergeBy::Label => (String::new(), label.to_owned()),
        };
        match groups.get_mut(&key) {
            None => {
                let mut union =
                    HyperLogLog::with_storage(vec![0u8; hll::storage_bytes(sketch.registers())])
                        .expect("the size of a sketch that read");
                union.merge(&sketch).expect("same size");
                groups.insert(
                    key,
                    Group {
                        sketch: union,
                        start,
                        end,
                        windows: 1,
                        series: [series.to_owned()].into(),
                    },
                );
            }
            Some(g) => {
                if let Err(e) = g.sketch.merge(&sketch) {
                    report.bad.push(format!("line {}: {e}", n + 1));
                    continue;
                }
                g.start = g.start.min(start);
                g.end = g.end.max(end);
                g.windows += 1;
                g.series.insert(series.to_owned());
            }
        }
        report.merged += 1;
    }
    for ((series, label), g) in &groups {
        let distinct = DistinctRecord::of(label, &g.sketch, 0, true);
        let line = Merged {
            series: (by == MergeBy::Series).then_some(series.as_str()),
            series_count: (by == MergeBy::Label).then_some(g.series.len()),
            label,
            start: g.start,
            end: g.end,
            windows: g.windows,
            estimate: distinct.estimate,
            rse: distinct.rse,
            low: distinct.low,
            high: distinct.high,
            sketch: distinct.sketch.unwrap_or_default(),
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(series: &str, start: i64, items: std::ops::Range<u32>) -> String {
        let mut h = HyperLogLog::with_storage(vec![0u8; hll::storage_bytes(4096)]).unwrap();
        for i in items {
            h.insert(format!("dev-{i}").as_bytes());
        }
        serde_json::json!({
            "series": series, "start": start, "end": start + 60_000, "count": 1,
            "distinct": DistinctRecord::of("mac", &h, 0, true),
        })
        .to_string()
    }

    #[test]
    fn merges_per_series_or_per_label_and_skips_what_it_cannot_read() {
        let input = [
            record("gw-1", 0, 0..3_000),
            record("gw-1", 60_000, 2_000..6_000),
            record("gw-2", 0, 5_000..9_000),
            "not json".into(),
            r#"{"series":"gw-1","start":0,"end":1,"count":3}"#.into(),
            r#"{"series":"gw-1","start":0,"end":1,"distinct":{"label":"mac","sketch":"AAAA"}}"#
                .into(),
        ]
        .join("\n");
        let mut out = Vec::new();
        let report = merge(input.as_bytes(), MergeBy::Series, &mut out).unwrap();
        assert_eq!((report.merged, report.skipped, report.bad.len()), (3, 2, 1));
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let gw1 = &lines[0];
        assert_eq!(
            (gw1["series"].as_str(), gw1["windows"].as_u64()),
            (Some("gw-1"), Some(2))
        );
        assert_eq!(
            (gw1["start"].as_i64(), gw1["end"].as_i64()),
            (Some(0), Some(120_000))
        );
        let e = gw1["estimate"].as_f64().unwrap();
        assert!((e / 6_000.0 - 1.0).abs() < 0.05, "{e}");
        let mut out = Vec::new();
        merge(input.as_bytes(), MergeBy::Label, &mut out).unwrap();
        let all: serde_json::Value =
            serde_json::from_slice(out.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(all["series_count"], 2);
        let e = all["estimate"].as_f64().unwrap();
        assert!((e / 9_000.0 - 1.0).abs() < 0.05, "{e}");
    }
}
