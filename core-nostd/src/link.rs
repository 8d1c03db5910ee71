//! The node link: framed records between a sensor node and its gateway over
//! a serial line (or any byte stream).
//!
//! A node pre-aggregates its readings ([`crate::node`]) and sends, per
//! sensor and window, one [`Record::Window`] and the window's sketches
//! ([`Record::Sketch`], in the sketches' own byte formats), plus an
//! [`Record::Alert`] for each alert transition. The gateway answers the
//! node's [`Record::Hello`] with nothing and starts the link with a
//! [`Record::Sync`] that gives the node the time.
//!
//! # Frame (version 1, little-endian)
//!
//! | bytes | field |
//! | --- | --- |
//! | 2 | magic `A5 5A` |
//! | 1 | format version (1) |
//! | 1 | record kind (1 sync, 2 hello, 3 window, 4 alert, 5 sketch, 6 stats) |
//! | 2 | payload length, at most [`MAX_PAYLOAD`] |
//! | … | payload |
//! | 4 | checksum: low 32 bits of XXH3-64 (seed 0) of version, kind, length and payload |
//!
//! A series id in a payload is one byte of length then at most
//! [`MAX_SERIES`] bytes of UTF-8. The [`Deframer`] finds frames in a byte
//! stream that may start mid-frame or carry line noise: it skips to the
//! next magic, checks the length and the checksum before it trusts a byte,
//! and on a bad checksum resumes one byte after the magic, so that a frame
//! hidden behind a false start is still found. Bytes and frames it drops
//! are counted ([`DeframerStats`]); nothing panics on any input. A frame
//! whose length field was damaged holds back what follows it until enough
//! bytes arrived to check its checksum.

use crate::Timestamp;
use crate::aggregate::{Aggregate, Point};

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = [0xA5, 0x5A];
/// The frame format version this code writes and reads.
pub const VERSION: u8 = 1;
/// The largest payload of a frame.
pub const MAX_PAYLOAD: usize = 4096;
/// The longest series id.
pub const MAX_SERIES: usize = 64;
const HEADER: usize = 2 + 1 + 1 + 2;
const CHECKSUM: usize = 4;
/// Header and checksum: the bytes a frame adds to its payload.
pub const OVERHEAD: usize = HEADER + CHECKSUM;
/// The longest frame.
pub const MAX_FRAME: usize = OVERHEAD + MAX_PAYLOAD;

mod kind {
    pub(super) const SYNC: u8 = 1;
    pub(super) const HELLO: u8 = 2;
    pub(super) const WINDOW: u8 = 3;
    pub(super) const ALERT: u8 = 4;
    pub(super) const SKETCH: u8 = 5;
    pub(super) const STATS: u8 = 6;
}

/// Which sketch a [`Record::Sketch`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SketchKind {
    /// The window's values in a [`DdSketch`](crate::sketch::DdSketch)
    /// (quantiles), in the core's sketch format.
    Quantiles,
    /// A label's values in a [`HyperLogLog`](crate::sketch::HyperLogLog)
    /// (distinct count), in the DataSketches HLL format.
    Distinct,
}

impl SketchKind {
    fn code(self) -> u8 {
        match self {
            SketchKind::Quantiles => 1,
            SketchKind::Distinct => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(SketchKind::Quantiles),
            2 => Some(SketchKind::Distinct),
            _ => None,
        }
    }
}

/// One record on the link.
#[derive(Debug, Clone, PartialEq)]
pub enum Record<'a> {
    /// Gateway to node: the time now, in ms since the Unix epoch. A node
    /// waits for it before it stamps readings.
    Sync {
        /// Ms since the Unix epoch.
        unix_ms: Timestamp,
    },
    /// Node to gateway, first: who it is and how it aggregates.
    Hello {
        /// The node's id.
        node: &'a str,
        /// Its window length, ms.
        window_ms: u32,
    },
    /// A closed window of a series.
    Window {
        /// The series id.
        series: &'a str,
        /// Window start, ms (inclusive).
        start: Timestamp,
        /// Window end, ms (exclusive).
        end: Timestamp,
        /// Its readings' statistics (count at least 1).
        aggregate: Aggregate,
    },
    /// An alert transition of a series.
    Alert {
        /// The series id.
        series: &'a str,
        /// Event time of the reading that caused it.
        ts: Timestamp,
        /// That reading's value.
        value: f64,
        /// Its score (|z| for a z-score detector).
        score: f64,
        /// The level the score crossed (the raise level, or the clear level).
        level: f64,
        /// Raised (true) or cleared (false).
        raised: bool,
    },
    /// A sketch of a series' window, in that sketch's own byte format.
    Sketch {
        /// The series id.
        series: &'a str,
        /// Window start, ms (inclusive).
        start: Timestamp,
        /// Window end, ms (exclusive).
        end: Timestamp,
        /// Which sketch.
        kind: SketchKind,
        /// Its serialized bytes.
        bytes: &'a [u8],
    },
    /// The node's own account: readings processed, the CPU cycles (by its
    /// cycle counter or timer) spent on them, and records it could not send.
    Stats {
        /// Readings processed since start.
        readings: u64,
        /// Cycles spent processing them.
        cycles: u64,
        /// Records it made but could not encode (too large for a frame).
        unsent: u64,
        /// The most stack it used, in bytes (0 if it does not measure it).
        stack_bytes: u32,
    },
}

/// What is wrong with a frame or a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// The output buffer cannot hold the frame.
    BufferTooSmall {
        /// Bytes the frame needs.
        needed: usize,
    },
    /// The payload would exceed [`MAX_PAYLOAD`], or a series id
    /// [`MAX_SERIES`].
    TooLarge,
    /// A frame of another format version (its checksum held).
    UnsupportedVersion(u8),
    /// A frame's checksum did not match: noise or a false start.
    Checksum,
    /// A checksummed frame of an unknown record kind.
    UnknownKind(u8),
    /// A checksummed frame whose payload does not parse as its kind.
    Malformed(&'static str),
}

impl core::fmt::Display for LinkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LinkError::BufferTooSmall { needed } => {
                write!(f, "buffer too small: the frame needs {needed} bytes")
            }
            LinkError::TooLarge => write!(
                f,
                "record too large (payload over {MAX_PAYLOAD} bytes or series id over {MAX_SERIES})"
            ),
            LinkError::UnsupportedVersion(v) => {
                write!(f, "frame format version {v} (this reads {VERSION})")
            }
            LinkError::Checksum => write!(f, "checksum mismatch"),
            LinkError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            LinkError::Malformed(why) => write!(f, "malformed record: {why}"),
        }
    }
}

impl core::error::Error for LinkError {}

fn checksum(bytes: &[u8]) -> u32 {
    crate::hash::hash64(bytes, 0) as u32
}

struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
    overflow: bool,
}

impl Out<'_> {
    fn bytes(&mut self, b: &[u8]) {
        // Past the end it only counts, so that the caller learns the length.
        if !self.overflow && self.pos + b.len() <= self.buf.len() {
            self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        } else {
            self.overflow = true;
        }
        self.pos += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) -> Result<(), LinkError> {
        if s.len() > MAX_SERIES {
            return Err(LinkError::TooLarge);
        }
        self.u8(s.len() as u8);
        self.bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes `record` as one frame into `out`; returns the frame's length.
pub fn encode(record: &Record<'_>, out: &mut [u8]) -> Result<usize, LinkError> {
    // The payload goes after the header, whose length field is filled in last.
    let mut w = Out {
        buf: out,
        pos: HEADER,
        overflow: false,
    };
    let kind = match *record {
        Record::Sync { unix_ms } => {
            w.i64(unix_ms);
            kind::SYNC
        }
        Record::Hello { node, window_ms } => {
            w.str(node)?;
            w.u32(window_ms);
            kind::HELLO
        }
        Record::Window {
            series,
            start,
            end,
            ref aggregate,
        } => {
            let (Some(first), Some(last)) = (aggregate.first(), aggregate.last()) else {
                return Err(LinkError::Malformed("an empty window"));
            };
            w.str(series)?;
            w.i64(start);
            w.i64(end);
            w.u64(aggregate.count());
            w.f64(aggregate.sum());
            w.f64(aggregate.mean().unwrap_or(0.0));
            w.f64(aggregate.sample_variance().unwrap_or(0.0));
            w.f64(aggregate.min().unwrap_or(0.0));
            w.f64(aggregate.max().unwrap_or(0.0));
            w.i64(first.ts);
            w.f64(first.value);
            w.i64(last.ts);
            w.f64(last.value);
            kind::WINDOW
        }
        Record::Alert {
            series,
            ts,
            value,
            score,
            level,
            raised,
        } => {
            w.str(series)?;
            w.i64(ts);
            w.f64(value);
            w.f64(score);
            w.f64(level);
            w.u8(raised as u8);
            kind::ALERT
        }
        Record::Sketch {
            series,
            start,
            end,
            kind,
            bytes,
        } => {
            w.str(series)?;
            w.i64(start);
            w.i64(end);
            w.u8(kind.code());
            w.bytes(bytes);
            kind::SKETCH
        }
        Record::Stats {
            readings,
            cycles,
            unsent,
            stack_bytes,
        } => {
            w.u64(readings);
            w.u64(cycles);
            w.u64(unsent);
            w.u32(stack_bytes);
            kind::STATS
        }
    };
    let payload = w.pos - HEADER;
    if payload > MAX_PAYLOAD {
        return Err(LinkError::TooLarge);
    }
    let needed = w.pos + CHECKSUM;
    if w.overflow || needed > w.buf.len() {
        return Err(LinkError::BufferTooSmall { needed });
    }
    w.buf[..2].copy_from_slice(&MAGIC);
    w.buf[2] = VERSION;
    w.buf[3] = kind;
    w.buf[4..6].copy_from_slice(&(payload as u16).to_le_bytes());
    let sum = checksum(&w.buf[2..w.pos]);
    w.u32(sum);
    Ok(w.pos)
}

struct In<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LinkError> {
        let end = self.pos + n;
        if end > self.bytes.len() {
            return Err(LinkError::Malformed("payload shorter than its record"));
        }
        let b = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(b)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], LinkError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, LinkError> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, LinkError> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, LinkError> {
        self.array().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Result<i64, LinkError> {
        self.array().map(i64::from_le_bytes)
    }
    fn f64(&mut self) -> Result<f64, LinkError> {
        self.array().map(f64::from_le_bytes)
    }
    fn time(&mut self) -> Result<Timestamp, LinkError> {
        let t = self.i64()?;
        if !(-crate::MAX_TIMESTAMP..=crate::MAX_TIMESTAMP).contains(&t) {
            return Err(LinkError::Malformed("a time out of range"));
        }
        Ok(t)
    }
    fn value(&mut self) -> Result<f64, LinkError> {
        let v = self.f64()?;
        if !v.is_finite() || libm::fabs(v) > crate::MAX_VALUE {
            return Err(LinkError::Malformed(
                "a value that is not finite or too large",
            ));
        }
        Ok(v)
    }
    fn str(&mut self) -> Result<&'a str, LinkError> {
        let n = self.u8()? as usize;
        if n > MAX_SERIES {
            return Err(LinkError::Malformed("a series id over 64 bytes"));
        }
        core::str::from_utf8(self.take(n)?).map_err(|_| LinkError::Malformed("an id not UTF-8"))
    }
    fn rest(&mut self) -> &'a [u8] {
        let b = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        b
    }
    fn end(&self) -> Result<(), LinkError> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(LinkError::Malformed("bytes after the record"))
        }
    }
}

fn window_bounds(start: Timestamp, end: Timestamp) -> Result<(), LinkError> {
    if end <= start {
        return Err(LinkError::Malformed("a window that ends before it starts"));
    }
    Ok(())
}

/// Parses the payload of a checksummed frame of `kind`.
fn parse(kind: u8, payload: &[u8]) -> Result<Record<'_>, LinkError> {
    let mut r = In {
        bytes: payload,
        pos: 0,
    };
    let record = match kind {
        kind::SYNC => Record::Sync { unix_ms: r.time()? },
        kind::HELLO => Record::Hello {
            node: r.str()?,
            window_ms: r.u32()?,
        },
        kind::WINDOW => {
            let series = r.str()?;
            let (start, end) = (r.time()?, r.time()?);
            window_bounds(start, end)?;
            let count = r.u64()?;
            // Counts stay exact in the f64 statistics up to 2^53, and merges
            // of them cannot overflow.
            if count > 1 << 53 {
                return Err(LinkError::Malformed("a count over 2^53"));
            }
            let (sum, mean, variance, min, max) =
                (r.value()?, r.value()?, r.value()?, r.value()?, r.value()?);
            let first = Point {
                ts: r.time()?,
                value: r.value()?,
            };
            let last = Point {
                ts: r.time()?,
                value: r.value()?,
            };
            if min > max || variance < 0.0 {
                return Err(LinkError::Malformed(
                    "statistics that contradict each other",
                ));
            }
            let aggregate =
                Aggregate::from_summary(count, sum, mean, variance, min, max, first, last)
                    .ok_or(LinkError::Malformed("a window of no readings"))?;
            Record::Window {
                series,
                start,
                end,
                aggregate,
            }
        }
        kind::ALERT => Record::Alert {
            series: r.str()?,
            ts: r.time()?,
            value: r.value()?,
            score: {
                let s = r.f64()?;
                if s.is_nan() {
                    return Err(LinkError::Malformed("a score that is NaN"));
                }
                s
            },
            level: r.value()?,
            raised: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(LinkError::Malformed("an alert neither raised nor cleared")),
            },
        },
        kind::SKETCH => {
            let series = r.str()?;
            let (start, end) = (r.time()?, r.time()?);
            window_bounds(start, end)?;
            let kind = SketchKind::from_code(r.u8()?)
                .ok_or(LinkError::Malformed("an unknown sketch kind"))?;
            Record::Sketch {
                series,
                start,
                end,
                kind,
                bytes: r.rest(),
            }
        }
        kind::STATS => Record::Stats {
            readings: r.u64()?,
            cycles: r.u64()?,
            unsent: r.u64()?,
            stack_bytes: r.u32()?,
        },
        other => return Err(LinkError::UnknownKind(other)),
    };
    r.end()?;
    Ok(record)
}

/// What a [`Deframer`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeframerStats {
    /// Bytes skipped while looking for a frame (noise, a frame cut short
    /// by a reset, the start of a stream joined mid-frame).
    pub skipped_bytes: u64,
    /// Frames whose checksum held (records, or errors of their content).
    pub frames: u64,
    /// False starts and damaged frames: a magic whose frame failed its
    /// checksum (its first byte counts as skipped).
    pub bad_checksums: u64,
}

/// Finds frames in a byte stream, in a fixed buffer of `N` bytes (by
/// default two of the longest frames). A frame longer than `N` is never
/// found: a node that only reads the gateway's sync frame keeps a small one
/// ([`Deframer::with_buffer`]).
///
/// Feed it bytes with [`Deframer::feed`] (it takes what fits), then take
/// records with [`Deframer::next`] until it returns `None`; repeat.
///
/// ```
/// use sluice_core::link::{Deframer, Record, encode};
///
/// let mut buf = [0u8; 64];
/// let n = encode(&Record::Sync { unix_ms: 1_700_000_000_000 }, &mut buf).unwrap();
/// let mut d = Deframer::new();
/// // Noise before the frame is skipped and counted.
/// assert_eq!(d.feed(b"\x00noise"), 6);
/// assert_eq!(d.feed(&buf[..n]), n);
/// assert_eq!(d.next(), Some(Ok(Record::Sync { unix_ms: 1_700_000_000_000 })));
/// assert_eq!(d.next(), None);
/// assert_eq!(d.stats().skipped_bytes, 6);
/// ```
pub struct Deframer<const N: usize = { 2 * MAX_FRAME }> {
    buf: [u8; N],
    len: usize,
    /// Bytes at the front that the last returned frame took.
    consumed: usize,
    stats: DeframerStats,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    /// An empty deframer that finds frames of every length.
    pub const fn new() -> Self {
        Self::with_buffer()
    }
}

impl<const N: usize> Deframer<N> {
    /// An empty deframer with a buffer of `N` bytes.
    pub const fn with_buffer() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            consumed: 0,
            stats: DeframerStats {
                skipped_bytes: 0,
                frames: 0,
                bad_checksums: 0,
            },
        }
    }

    /// What it has dropped and found so far.
    pub fn stats(&self) -> DeframerStats {
        self.stats
    }

    fn compact(&mut self) {
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.len, 0);
            self.len -= self.consumed;
            self.consumed = 0;
        }
    }

    fn skip(&mut self, n: usize) {
        self.stats.skipped_bytes += n as u64;
        self.consumed = n;
        self.compact();
    }

    /// Takes as many of `bytes` as fit; returns how many. Call
    /// [`Deframer::next`] until `None` before feeding the rest.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        self.compact();
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    /// Forgets a partial frame (the stream was reopened: what follows does
    /// not continue it). Its bytes count as skipped.
    pub fn reset(&mut self) {
        self.compact();
        let n = self.len;
        self.skip(n);
    }

    /// The next record, or the error of the next bad frame; `None` when the
    /// buffered bytes hold no complete frame.
    #[allow(clippy::should_implement_trait)] // It borrows from the deframer: not an `Iterator`.
    pub fn next(&mut self) -> Option<Result<Record<'_>, LinkError>> {
        self.compact();
        loop {
            // Skip to the next magic (a lone first byte at the end may
            // start one).
            let at = (0..self.len)
                .find(|&i| {
                    self.buf[i] == MAGIC[0] && (i + 1 == self.len || self.buf[i + 1] == MAGIC[1])
                })
                .unwrap_or(self.len);
            if at > 0 {
                self.skip(at);
            }
            if self.len < HEADER {
                return None;
            }
            let payload = u16::from_le_bytes([self.buf[4], self.buf[5]]) as usize;
            if payload > MAX_PAYLOAD || HEADER + payload + CHECKSUM > N {
                // Not a frame: resume after this magic.
                self.skip(1);
                continue;
            }
            let total = HEADER + payload + CHECKSUM;
            if self.len < total {
                return None;
            }
            let body = &self.buf[2..HEADER + payload];
            let sum = u32::from_le_bytes([
                self.buf[total - 4],
                self.buf[total - 3],
                self.buf[total - 2],
                self.buf[total - 1],
            ]);
            if checksum(body) != sum {
                // Noise or a false start: the bytes after this magic may
                // hold a real frame.
                self.stats.bad_checksums += 1;
                self.skip(1);
                return Some(Err(LinkError::Checksum));
            }
            self.stats.frames += 1;
            self.consumed = total;
            let (version, kind) = (self.buf[2], self.buf[3]);
            if version != VERSION {
                return Some(Err(LinkError::UnsupportedVersion(version)));
            }
            return Some(parse(kind, &self.buf[HEADER..HEADER + payload]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Accumulator;

    fn frame(record: &Record<'_>) -> ([u8; MAX_FRAME], usize) {
        let mut buf = [0u8; MAX_FRAME];
        let n = encode(record, &mut buf).unwrap();
        (buf, n)
    }

    fn window() -> Record<'static> {
        let mut a = Aggregate::empty();
        for (ts, v) in [(1_000, 3.0), (1_010, 5.0), (1_020, 10.0)] {
            a.add(ts, v);
        }
        Record::Window {
            series: "node-1/t0",
            start: 1_000,
            end: 2_000,
            aggregate: a,
        }
    }

    #[test]
    fn every_record_round_trips() {
        let records = [
            Record::Sync { unix_ms: -5 },
            Record::Hello {
                node: "node-1",
                window_ms: 1_000,
            },
            window(),
            Record::Alert {
                series: "node-1/t0",
                ts: 7,
                value: 2.5,
                score: f64::INFINITY,
                level: 6.0,
                raised: true,
            },
            Record::Sketch {
                series: "s",
                start: 0,
                end: 10,
                kind: SketchKind::Distinct,
                bytes: &[1, 2, 3],
            },
            Record::Stats {
                readings: 9,
                cycles: 1 << 40,
                unsent: 2,
                stack_bytes: 9_000,
            },
        ];
        for record in &records {
            let (buf, n) = frame(record);
            let mut d = Deframer::new();
            assert_eq!(d.feed(&buf[..n]), n);
            let got = d.next().unwrap().unwrap();
            match (record, &got) {
                (Record::Window { aggregate: a, .. }, Record::Window { aggregate: b, .. }) => {
                    assert_eq!(a.count(), b.count());
                    assert_eq!(a.sum(), b.sum());
                    assert_eq!(a.mean(), b.mean());
                    assert_eq!(a.min(), b.min());
                    assert_eq!(a.max(), b.max());
                    assert_eq!(a.first(), b.first());
                    assert_eq!(a.last(), b.last());
                    assert!(
                        (a.sample_variance().unwrap() - b.sample_variance().unwrap()).abs() < 1e-12
                    );
                }
                _ => assert_eq!(record, &got),
            }
            assert_eq!(d.next(), None);
            assert_eq!(d.stats().skipped_bytes, 0);
        }
    }

    #[test]
    fn a_frame_split_anywhere_is_found() {
        let (buf, n) = frame(&window());
        for cut in 0..=n {
            let mut d = Deframer::new();
            d.feed(&buf[..cut]);
            if cut < n {
                assert_eq!(d.next(), None, "cut at {cut}");
            }
            d.feed(&buf[cut..n]);
            assert!(
                matches!(d.next(), Some(Ok(Record::Window { .. }))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_caught_and_the_next_frame_still_read() {
        let (buf, n) = frame(&window());
        let (sync, m) = frame(&Record::Sync { unix_ms: 42 });
        // Under Miri (slow), every 61st bit.
        let step = if cfg!(miri) { 61 } else { 1 };
        for bit in (0..n * 8).step_by(step) {
            let mut bad = buf;
            bad[bit / 8] ^= 1 << (bit % 8);
            // The stream goes on after the frames (a corrupted length holds
            // back what follows until enough bytes came to check it).
            let mut stream = bad[..n].to_vec();
            stream.extend_from_slice(&sync[..m]);
            stream.extend_from_slice(&[0; MAX_FRAME]);
            let mut d = Deframer::new();
            let mut good = 0;
            let mut fed = 0;
            while fed < stream.len() {
                fed += d.feed(&stream[fed..]);
                while let Some(r) = d.next() {
                    match r {
                        Ok(Record::Sync { unix_ms: 42 }) => good += 1,
                        Ok(other) => panic!("bit {bit}: a corrupted frame read as {other:?}"),
                        Err(_) => {}
                    }
                }
            }
            assert_eq!(good, 1, "bit {bit}");
        }
    }

    #[test]
    fn a_frame_behind_a_false_start_is_found() {
        let (buf, n) = frame(&Record::Sync { unix_ms: 1 });
        let mut d = Deframer::new();
        // A false magic, then a real frame straight after it.
        d.feed(&[0xA5, 0x5A, 1, 3, 4, 0]);
        d.feed(&buf[..n]);
        let mut got = 0;
        while let Some(r) = d.next() {
            if let Ok(rec) = r {
                assert_eq!(rec, Record::Sync { unix_ms: 1 });
                got += 1;
            }
        }
        assert_eq!(got, 1);
    }

    #[test]
    fn a_small_deframer_skips_frames_longer_than_its_buffer() {
        let (big, n) = frame(&window());
        let (sync, m) = frame(&Record::Sync { unix_ms: 3 });
        let mut d: Deframer<32> = Deframer::with_buffer();
        let mut stream = big[..n].to_vec();
        stream.extend_from_slice(&sync[..m]);
        let mut got = Vec::new();
        let mut fed = 0;
        while fed < stream.len() {
            fed += d.feed(&stream[fed..]);
            while let Some(r) = d.next() {
                got.push(r.is_ok());
                assert!(matches!(r, Ok(Record::Sync { unix_ms: 3 }) | Err(_)));
            }
        }
        assert_eq!(got.iter().filter(|ok| **ok).count(), 1);
    }

    #[test]
    fn a_window_claiming_more_than_2_pow_53_readings_is_refused() {
        let (mut buf, n) = frame(&window());
        // The count follows the header, the id (1 + 9 bytes) and the times.
        let at = HEADER + 1 + 9 + 16;
        buf[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let sum = checksum(&buf[2..n - 4]);
        buf[n - 4..n].copy_from_slice(&sum.to_le_bytes());
        let mut d = Deframer::new();
        d.feed(&buf[..n]);
        assert_eq!(
            d.next(),
            Some(Err(LinkError::Malformed("a count over 2^53")))
        );
    }

    #[test]
    fn records_that_do_not_fit_are_refused() {
        let long = "x".repeat(MAX_SERIES + 1);
        let mut buf = [0u8; MAX_FRAME];
        let r = Record::Hello {
            node: &long,
            window_ms: 1,
        };
        assert_eq!(encode(&r, &mut buf), Err(LinkError::TooLarge));
        let big = [0u8; MAX_PAYLOAD];
        let r = Record::Sketch {
            series: "s",
            start: 0,
            end: 1,
            kind: SketchKind::Quantiles,
            bytes: &big,
        };
        assert_eq!(encode(&r, &mut buf), Err(LinkError::TooLarge));
        let mut small = [0u8; 8];
        assert!(matches!(
            encode(&Record::Sync { unix_ms: 0 }, &mut small),
            Err(LinkError::BufferTooSmall { .. })
        ));
    }

    extern crate std;
    use std::vec::Vec;

    proptest::proptest! {
        #[test]
        #[cfg_attr(miri, ignore = "proptest needs the file system; safe code")]
        fn random_bytes_never_panic_and_frames_among_them_are_found(
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            at in 0usize..3000,
        ) {
            let (buf, n) = frame(&Record::Sync { unix_ms: 77 });
            let at = at.min(noise.len());
            let mut stream: Vec<u8> = noise[..at].to_vec();
            stream.extend_from_slice(&buf[..n]);
            stream.extend_from_slice(&noise[at..]);
            // The line goes on (a false start's length may reach past the
            // end of the noise: what follows it waits for enough bytes).
            stream.extend_from_slice(&[0; MAX_FRAME]);
            let mut d = Deframer::new();
            let mut fed = 0;
            let mut found = false;
            while fed < stream.len() {
                fed += d.feed(&stream[fed..]);
                while let Some(r) = d.next() {
                    if r == Ok(Record::Sync { unix_ms: 77 }) {
                        found = true;
                    }
                }
            }
            proptest::prop_assert!(found);
        }
    }
}
