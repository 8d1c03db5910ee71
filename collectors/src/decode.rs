//! JSON decoding with simd-json, driven by a field mapping from the config.
//!
//! The decoder parses in place into a reused scratch buffer and a reused
//! simd-json tape, so in steady state a message costs no allocation. The
//! [`JsonMapping`] says where the series key, the event time and the values
//! are. A message with several value fields yields one reading per field,
//! named `<series>/<field>`; with exactly one configured field the series is
//! the key alone (W1's `{"sensor":"s-0042","ts":…,"value":21.37}` is series
//! `s-0042`).
//!
//! Every refusal has a [`Reason`]; one bad field of a multi-field message
//! refuses that field only. A number beyond a double's range (`1e999`) is
//! refused as `non_finite`, like NaN and infinities. A key given twice in
//! one object counts once, with its first value (as most JSON readers that
//! do not refuse duplicates do); `values = ["*"]` reads each name once.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use simd_json::prelude::*;
use simd_json::tape::{Tape, Value};
use simd_json::{Buffers, fill_tape};
use sluice_core::Timestamp;

use crate::reading::{LabelValue, Labels, MAX_LABEL_LEN, Reading, SeriesKey};
use crate::stats::Reason;

/// Where a message's series key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SeriesSource {
    /// A payload field (dotted path for nested objects, e.g. `meta.id`); a
    /// string or an integer.
    Field(String),
    /// A segment of the MQTT topic, counted from 0 (`sensors/s-0042` with
    /// segment 1 is `s-0042`).
    TopicSegment(usize),
    /// The whole MQTT topic.
    Topic,
}

/// How the event time is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// Milliseconds since the Unix epoch (integer or float).
    #[default]
    EpochMs,
    /// Seconds since the Unix epoch (integer or float).
    EpochS,
    /// Microseconds since the Unix epoch.
    EpochUs,
    /// Nanoseconds since the Unix epoch.
    EpochNs,
    /// An RFC 3339 string, e.g. `2026-11-26T05:16:24.123+01:00`.
    Rfc3339,
    /// No event time in the message: use the ingest time.
    Ingest,
}

/// Where the fields of a JSON reading are, and what times are believable.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonMapping {
    /// Where the series key is. Default: the payload field `sensor`.
    pub series: SeriesSource,
    /// The payload field (dotted path) holding the event time. Default `ts`.
    pub timestamp: String,
    /// How the event time is written. Default `epoch_ms`.
    pub timestamp_format: TimeFormat,
    /// The value fields (dotted paths). `["*"]` takes every numeric top-level
    /// field other than the series and time fields. Default `["value"]`.
    pub values: Vec<String>,
    /// Largest allowed event time ahead of the ingest time, in ms (clock
    /// skew). Default 300,000 (5 minutes).
    pub max_future_ms: i64,
    /// Largest allowed age of an event time at ingest, in ms. Default
    /// 604,800,000 (7 days).
    pub max_age_ms: i64,
    /// Largest message accepted, in bytes. Default 65,536.
    pub max_message_bytes: usize,
    /// Fields (dotted paths) whose text (or integer) each reading carries as
    /// a label, e.g. `["mac", "site"]`, for rules that count distinct
    /// values, top values or first sightings. At most
    /// [`crate::reading::MAX_LABELS`]; a value longer than
    /// [`crate::reading::MAX_LABEL_LEN`] bytes, of another type, or holding a
    /// character the series id policy refuses, refuses the message
    /// (`bad_label`); a missing one leaves the reading without it. Default:
    /// none.
    pub labels: Vec<String>,
}

impl Default for JsonMapping {
    fn default() -> Self {
        Self {
            series: SeriesSource::Field("sensor".into()),
            timestamp: "ts".into(),
            timestamp_format: TimeFormat::EpochMs,
            values: vec!["value".into()],
            max_future_ms: 300_000,
            max_age_ms: 7 * 24 * 3_600_000,
            max_message_bytes: 65_536,
            labels: Vec::new(),
        }
    }
}

impl JsonMapping {
    /// Checks the mapping; the error names the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if self.values.is_empty() {
            return Err("values: list at least one field, or \"*\"".into());
        }
        if self.values.iter().any(|v| v.is_empty()) {
            return Err("values: field names must not be empty".into());
        }
        if self.max_future_ms < 0 {
            return Err("max_future_ms: must be >= 0".into());
        }
        if self.max_age_ms < 0 {
            return Err("max_age_ms: must be >= 0".into());
        }
        if self.max_message_bytes == 0 {
            return Err("max_message_bytes: must be > 0".into());
        }
        if let SeriesSource::Field(f) = &self.series
            && f.is_empty()
        {
            return Err("series.field: must not be empty".into());
        }
        if self.labels.len() > crate::reading::MAX_LABELS {
            return Err(format!(
                "labels: at most {} labels",
                crate::reading::MAX_LABELS
            ));
        }
        if self.labels.iter().any(|l| l.is_empty()) {
            return Err("labels: names must not be empty".into());
        }
        if let Some(l) = self
            .labels
            .iter()
            .enumerate()
            .find_map(|(i, l)| self.labels[..i].contains(l).then_some(l))
        {
            return Err(format!("labels: {l:?} is named twice"));
        }
        Ok(())
    }
}

/// Receives what a decoder makes of a message.
pub trait DecodeSink {
    /// A decoded reading.
    fn reading(&mut self, reading: Reading);
    /// A refusal, with a detail for the log.
    fn reject(&mut self, reason: Reason, detail: &dyn std::fmt::Display);
}

/// A dotted path, split once.
#[derive(Debug, Clone)]
struct Path(Vec<String>);

impl Path {
    fn new(dotted: &str) -> Self {
        Self(dotted.split('.').map(str::to_owned).collect())
    }

    fn get<'t, 'i>(&self, root: Value<'t, 'i>) -> Option<Value<'t, 'i>> {
        // A plain loop over `Object::get`: the same lookup written as
        // `try_fold(root, |v, k| v.get(k))` allocated once per call (caught
        // by tests/no_alloc.rs).
        let mut v = root;
        for key in &self.0 {
            v = v.as_object()?.get(key.as_str())?;
        }
        Some(v)
    }

    fn is(&self, key: &str) -> bool {
        self.0.len() == 1 && self.0[0] == key
    }
}

/// A JSON decoder for one source (see the module docs).
pub struct JsonDecoder {
    mapping: JsonMapping,
    series: Option<Path>,
    timestamp: Path,
    values: Vec<(Path, String)>,
    all_numeric: bool,
    labels: Vec<Path>,
    label_names: std::sync::Arc<[Box<str>]>,
    buffers: Buffers,
    scratch: Vec<u8>,
    /// The reused tape; empty between messages, hence `'static`.
    tape: Option<Tape<'static>>,
}

impl JsonDecoder {
    /// A decoder for `mapping` (validate it first).
    pub fn new(mapping: JsonMapping) -> Self {
        let series = match &mapping.series {
            SeriesSource::Field(f) => Some(Path::new(f)),
            _ => None,
        };
        let all_numeric = mapping.values.iter().any(|v| v == "*");
        let values = mapping
            .values
            .iter()
            .filter(|v| *v != "*")
            .map(|v| (Path::new(v), v.clone()))
            .collect();
        Self {
            timestamp: Path::new(&mapping.timestamp),
            series,
            values,
            all_numeric,
            labels: mapping.labels.iter().map(|l| Path::new(l)).collect(),
            label_names: mapping.labels.iter().map(|l| l.as_str().into()).collect(),
            buffers: Buffers::new(1024),
            scratch: Vec::with_capacity(1024),
            tape: None,
            mapping,
        }
    }

    /// The mapping.
    pub fn mapping(&self) -> &JsonMapping {
        &self.mapping
    }

    /// Decodes one message (an MQTT payload, a line, a datagram line),
    /// received on `topic` (MQTT) at `ingest` ms, into `sink`.
    pub fn decode(
        &mut self,
        message: &[u8],
        topic: Option<&str>,
        ingest: Timestamp,
        sink: &mut impl DecodeSink,
    ) {
        if message.len() > self.mapping.max_message_bytes {
            sink.reject(Reason::Oversize, &format_args!("{} bytes", message.len()));
            return;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(message);
        let mut tape: Tape<'_> = self.tape.take().unwrap_or_else(Tape::null).reset();
        match fill_tape(&mut self.scratch, &mut self.buffers, &mut tape) {
            Ok(()) => {
                let fields = Fields {
                    series: self.series.as_ref(),
                    source: &self.mapping.series,
                    timestamp: &self.timestamp,
                    timestamp_name: &self.mapping.timestamp,
                    format: self.mapping.timestamp_format,
                    values: &self.values,
                    all_numeric: self.all_numeric,
                    labels: &self.labels,
                    label_names: &self.label_names,
                    max_future: self.mapping.max_future_ms,
                    max_age: self.mapping.max_age_ms,
                };
                fields.extract(tape.as_value(), topic, ingest, sink);
            }
            // A number too large for a double is a value out of range, not
            // bad JSON (the parser stops on it either way).
            Err(e) if number_out_of_range(message, e.index()) => sink.reject(
                Reason::NonFinite,
                &format_args!("a number too large for a double near byte {}", e.index()),
            ),
            Err(e) => sink.reject(
                Reason::Malformed,
                &NotJson {
                    message,
                    at: e.index(),
                    // The parser stops at the last token when the input
                    // runs out after `{`, `[`, `:` or `,`.
                    ended: e.is_eof()
                        || message.get(e.index()).is_some_and(|b| b"{[:,".contains(b))
                            && message[e.index() + 1..].iter().all(u8::is_ascii_whitespace),
                },
            ),
        }
        self.tape = Some(tape.reset());
    }
}

/// Why a message is not JSON, for the log: where the parser stopped and
/// the text around it (escaped, so a control character cannot reach the
/// terminal or the journal raw), instead of the parser's own terms.
/// Formatted only when the (rate-limited) line is written.
struct NotJson<'m> {
    message: &'m [u8],
    at: usize,
    /// The message ended inside a value.
    ended: bool,
}

impl std::fmt::Display for NotJson<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const BEFORE: usize = 30;
        const AFTER: usize = 10;
        let len = self.message.len();
        if self.ended || self.at >= len {
            f.write_str("not JSON: it ends before the value does: ")?;
        } else {
            write!(f, "not JSON at byte {}: ", self.at)?;
        }
        let at = self.at.min(len);
        let (start, end) = (at.saturating_sub(BEFORE), (at + AFTER).min(len));
        f.write_str(if start > 0 { "\"…" } else { "\"" })?;
        let text = String::from_utf8_lossy(&self.message[start..end]);
        write!(f, "{}", text.escape_debug())?;
        f.write_str(if end < len { "…\"" } else { "\"" })
    }
}

/// Whether the number token at or just before byte `at` of `message` is
/// well formed but beyond a double's range (`1e999`).
fn number_out_of_range(message: &[u8], at: usize) -> bool {
    let in_number = |b: u8| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
    let mut start = at.min(message.len());
    // The parser may point at the token, past it, or at what precedes it.
    while start < message.len() && matches!(message[start], b' ' | b'\t' | b':') {
        start += 1;
    }
    while start > 0 && in_number(message[start - 1]) {
        start -= 1;
    }
    let end = start
        + message[start..]
            .iter()
            .take_while(|&&b| in_number(b))
            .count();
    std::str::from_utf8(&message[start..end])
        .ok()
        .and_then(|t| t.parse::<f64>().ok())
        .is_some_and(f64::is_infinite)
}

/// The parts of a decoder that extraction reads (borrowed apart from the
/// buffers the tape borrows).
struct Fields<'a> {
    series: Option<&'a Path>,
    source: &'a SeriesSource,
    timestamp: &'a Path,
    timestamp_name: &'a str,
    format: TimeFormat,
    values: &'a [(Path, String)],
    all_numeric: bool,
    labels: &'a [Path],
    label_names: &'a std::sync::Arc<[Box<str>]>,
    max_future: i64,
    max_age: i64,
}

impl Fields<'_> {
    fn extract(
        &self,
        root: Value<'_, '_>,
        topic: Option<&str>,
        ingest: Timestamp,
        sink: &mut dyn DecodeSink,
    ) {
        if !root.is_object() {
            return sink.reject(Reason::NotAnObject, &"the message is not a JSON object");
        }
        let mut key = SeriesKey::new();
        if let Err((reason, detail)) = self.series_key(root, topic, &mut key) {
            return sink.reject(reason, &detail);
        }
        if let Some(problem) = crate::reading::series_problem(&key) {
            return sink.reject(
                Reason::BadSeries,
                &format_args!("series key {key:?} holds {problem}"),
            );
        }
        let ts = match self.event_time(root, ingest) {
            Ok(ts) => ts,
            Err((reason, detail)) => return sink.reject(reason, &detail),
        };
        let labels = match self.labels(root, &key) {
            Ok(labels) => labels,
            Err(detail) => return sink.reject(Reason::BadLabel, &detail),
        };
        let named = self.values.len() > 1 || self.all_numeric;
        let mut found = 0;
        let emit = |field: &str, v: Value<'_, '_>, sink: &mut dyn DecodeSink| {
            let Some(value) = v.cast_f64() else {
                return sink.reject(
                    Reason::NotNumeric,
                    &format_args!("field {field:?} of {key} is not a number"),
                );
            };
            if !value.is_finite() {
                return sink.reject(
                    Reason::NonFinite,
                    &format_args!("field {field:?} of {key} is not finite"),
                );
            }
            if value.abs() > sluice_core::MAX_VALUE {
                return sink.reject(
                    Reason::OutOfRange,
                    &format_args!("field {field:?} of {key} is {value:e}, beyond ±1e100"),
                );
            }
            let mut series = key.clone();
            if named && (series.push('/').is_err() || series.push_str(field).is_err()) {
                return sink.reject(Reason::SeriesTooLong, &format_args!("{key}/{field}"));
            }
            if named && let Some(problem) = crate::reading::series_problem(field) {
                return sink.reject(
                    Reason::BadSeries,
                    &format_args!("field name {field:?} of {key} holds {problem}"),
                );
            }
            sink.reading(Reading {
                series,
                ts,
                value,
                ingest,
                weight: 1,
                labels: labels.clone(),
            });
        };
        for (path, name) in self.values {
            if let Some(v) = path.get(root) {
                found += 1;
                emit(name, v, sink);
            }
        }
        if self.all_numeric
            && let Some(object) = root.as_object()
        {
            for (i, (name, v)) in object.iter().enumerate() {
                let is_meta = self.timestamp.is(name) || self.series.is_some_and(|s| s.is(name));
                if is_meta || !v.is_number() || self.values.iter().any(|(p, _)| p.is(name)) {
                    continue;
                }
                // A key given twice counts once, with its first value (as
                // the lookups of named fields do). Objects are small.
                if object.iter().take(i).any(|(earlier, _)| earlier == name) {
                    continue;
                }
                found += 1;
                emit(name, v, sink);
            }
        }
        if found == 0 {
            sink.reject(
                Reason::MissingValue,
                &format_args!("no value field in the message of {key}"),
            );
        }
    }

    /// The message's labels (none without labels in the mapping), or why
    /// one is refused.
    fn labels(&self, root: Value<'_, '_>, key: &SeriesKey) -> Result<Option<Box<Labels>>, String> {
        if self.labels.is_empty() {
            return Ok(None);
        }
        let mut values = heapless::Vec::new();
        for (path, name) in self.labels.iter().zip(self.label_names.iter()) {
            let value = match path.get(root) {
                None => None,
                Some(v) => {
                    let mut text = LabelValue::new();
                    let fits = if let Some(s) = v.as_str() {
                        text.push_str(s).is_ok()
                    } else if let Some(n) = v.as_i64() {
                        write!(text, "{n}").is_ok()
                    } else if let Some(n) = v.as_u64() {
                        write!(text, "{n}").is_ok()
                    } else {
                        return Err(format!("label {name:?} of {key} is not text or an integer"));
                    };
                    if !fits {
                        return Err(format!(
                            "label {name:?} of {key} is longer than {MAX_LABEL_LEN} bytes"
                        ));
                    }
                    if text.is_empty() {
                        None
                    } else if let Some(problem) = crate::reading::series_problem(&text) {
                        return Err(format!("label {name:?} of {key} holds {problem}"));
                    } else {
                        Some(text)
                    }
                }
            };
            // The mapping names at most MAX_LABELS (validated).
            let _ = values.push(value);
        }
        Ok(Some(Box::new(Labels {
            names: self.label_names.clone(),
            values,
        })))
    }

    fn series_key(
        &self,
        root: Value<'_, '_>,
        topic: Option<&str>,
        key: &mut SeriesKey,
    ) -> Result<(), (Reason, String)> {
        let too_long = |s: &str| {
            (
                Reason::SeriesTooLong,
                format!("series key of {} bytes", s.len()),
            )
        };
        match self.source {
            SeriesSource::Field(name) => {
                let v = self
                    .series
                    .and_then(|p| p.get(root))
                    .ok_or_else(|| (Reason::MissingSeries, format!("no field {name:?}")))?;
                if let Some(s) = v.as_str() {
                    if s.is_empty() {
                        return Err((Reason::MissingSeries, format!("field {name:?} is empty")));
                    }
                    key.push_str(s).map_err(|_| too_long(s))
                } else if let Some(n) = v.as_i64() {
                    write!(key, "{n}").map_err(|_| too_long("an integer"))
                } else if let Some(n) = v.as_u64() {
                    write!(key, "{n}").map_err(|_| too_long("an integer"))
                } else {
                    Err((
                        Reason::MissingSeries,
                        format!("field {name:?} is not a string or integer"),
                    ))
                }
            }
            SeriesSource::TopicSegment(i) => {
                let segment = topic
                    .and_then(|t| t.split('/').nth(*i))
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        (
                            Reason::MissingSeries,
                            format!("topic {topic:?} has no segment {i}"),
                        )
                    })?;
                key.push_str(segment).map_err(|_| too_long(segment))
            }
            SeriesSource::Topic => {
                let topic = topic.ok_or_else(|| (Reason::MissingSeries, "no topic".to_owned()))?;
                key.push_str(topic).map_err(|_| too_long(topic))
            }
        }
    }

    fn event_time(
        &self,
        root: Value<'_, '_>,
        ingest: Timestamp,
    ) -> Result<Timestamp, (Reason, String)> {
        if self.format == TimeFormat::Ingest {
            return Ok(ingest);
        }
        let field = self.timestamp_name;
        let v = self
            .timestamp
            .get(root)
            .ok_or_else(|| (Reason::BadTimestamp, format!("no field {field:?}")))?;
        let bad = || {
            (
                Reason::BadTimestamp,
                format!("field {field:?} is not a {:?} time", self.format),
            )
        };
        // Milliseconds as a float first, so that every unit shares one range check.
        let ms = match self.format {
            TimeFormat::Rfc3339 => {
                let s = v.as_str().ok_or_else(bad)?;
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| bad())?;
                (t.unix_timestamp_nanos() / 1_000_000) as f64
            }
            TimeFormat::EpochMs => v.cast_f64().ok_or_else(bad)?,
            TimeFormat::EpochS => v.cast_f64().ok_or_else(bad)? * 1e3,
            TimeFormat::EpochUs => v.cast_f64().ok_or_else(bad)? / 1e3,
            TimeFormat::EpochNs => v.cast_f64().ok_or_else(bad)? / 1e6,
            TimeFormat::Ingest => unreachable!("handled above"),
        };
        if !ms.is_finite() || ms.abs() > sluice_core::MAX_TIMESTAMP as f64 {
            return Err(bad());
        }
        let ts = ms.floor() as Timestamp;
        if ts.saturating_sub(ingest) > self.max_future {
            return Err((
                Reason::TooFarInFuture,
                format!("event time {ts} is {} ms ahead", ts - ingest),
            ));
        }
        if ingest.saturating_sub(ts) > self.max_age {
            return Err((
                Reason::TooOld,
                format!("event time {ts} is {} ms old", ingest - ts),
            ));
        }
        Ok(ts)
    }
}
