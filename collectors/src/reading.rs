//! The unit of data that crosses from a collector to a worker.

use heapless::String;
use sluice_core::Timestamp;

/// Longest series key, in bytes. Keys are stored inline so that a reading
/// has a fixed size and moves through the rings without allocating; longer
/// keys are rejected with [`crate::Reason::SeriesTooLong`].
pub const MAX_SERIES_LEN: usize = 64;

/// A series key: which sensor (and which of its fields) a value belongs to,
/// e.g. `s-0042` or `s-0042/temperature`.
pub type SeriesKey = String<MAX_SERIES_LEN>;

/// Longest label value, in bytes.
pub const MAX_LABEL_LEN: usize = 64;
/// Most labels a source's mapping may name.
pub const MAX_LABELS: usize = 4;

/// A label value: text from the message (a device id, a site), bounded.
pub type LabelValue = String<MAX_LABEL_LEN>;

/// The labels of a reading: the mapping's label names (shared by every
/// reading of the source) and this message's value of each, if it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// The names, in the mapping's order.
    pub names: std::sync::Arc<[Box<str>]>,
    /// The value of each name, `None` where the message had none.
    pub values: heapless::Vec<Option<LabelValue>, MAX_LABELS>,
}

impl Labels {
    /// Labels `names` with `values` in the same order; `None` if there are
    /// more than [`MAX_LABELS`], the counts differ, or a value is longer
    /// than [`MAX_LABEL_LEN`].
    pub fn new(names: std::sync::Arc<[Box<str>]>, values: &[Option<&str>]) -> Option<Labels> {
        if names.len() != values.len() {
            return None;
        }
        let mut held = heapless::Vec::new();
        for v in values {
            let v = match v {
                Some(v) => Some(LabelValue::try_from(*v).ok()?),
                None => None,
            };
            held.push(v).ok()?;
        }
        Some(Labels {
            names,
            values: held,
        })
    }

    /// The value of label `name`, if the reading has one.
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = self.names.iter().position(|n| &**n == name)?;
        self.values.get(i)?.as_deref()
    }
}

/// One value of one series at one event time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The series key.
    pub series: SeriesKey,
    /// Event time, milliseconds since the Unix epoch: when the value was
    /// measured, as the sender says (or the ingest time if it says nothing).
    pub ts: Timestamp,
    /// The value; always finite.
    pub value: f64,
    /// Ingest time, milliseconds since the Unix epoch: when Sluice decoded it.
    pub ingest: Timestamp,
    /// How many readings this one stands for: 1, or `k` when shedding kept it
    /// as one in `k` (scale counts and sums by it).
    pub weight: u32,
    /// The message's labels, when the source's mapping names some (boxed:
    /// readings without labels stay small in the rings).
    pub labels: Option<Box<Labels>>,
}

/// Why `key` cannot be a series key, or `None` if it can.
///
/// The series id policy: a key is any UTF-8 text of 1 to
/// [`MAX_SERIES_LEN`] bytes except
/// - control characters (`char::is_control`: NUL and the rest of C0, DEL,
///   C1), which no MQTT topic can carry and which corrupt logs and terminals;
/// - the invisible bidirectional-text controls (U+061C, U+200E, U+200F,
///   U+202A to U+202E, U+2066 to U+2069), which make a key read as another
///   one;
/// - Unicode noncharacters (U+FDD0 to U+FDEF and the last two code points of
///   every plane), which brokers may refuse.
///
/// Everything else is allowed, `/`, `+`, `#`, `$` and `%` included: where a
/// key becomes part of a topic, the agent escapes it into exactly one topic
/// level.
pub fn series_problem(key: &str) -> Option<&'static str> {
    // Printable ASCII, the common case, needs no further look.
    if key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    key.chars().find_map(|c| {
        if c.is_control() {
            Some("a control character")
        } else if matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            Some("a bidirectional-text control")
        } else if matches!(c, '\u{fdd0}'..='\u{fdef}') || (c as u32 & 0xfffe) == 0xfffe {
            Some("a Unicode noncharacter")
        } else {
            None
        }
    })
}

/// Milliseconds since the Unix epoch now, by the system clock.
pub fn now_ms() -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::try_from(now.as_millis()).unwrap_or(Timestamp::MAX)
}
