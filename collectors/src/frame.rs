//! Splitting byte streams and datagrams into newline-delimited messages.

use crate::stats::Reason;

/// Splits a byte stream (a serial port) into lines of at most `max` bytes.
///
/// A line longer than `max` is refused once, as [`Reason::Oversize`], and
/// the rest of it is skipped up to the next newline, so a sender that never
/// sends a newline cannot make the buffer grow. `\r\n` endings are
/// accepted; a blank line is handed on as [`Reason::Empty`], so that it is
/// counted like every other message.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
    skipping: bool,
}

impl LineFramer {
    /// A framer for lines of at most `max` bytes (without the newline).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::with_capacity(max.min(64 * 1024)),
            max,
            skipping: false,
        }
    }

    /// Feeds `data`; calls `on_line` with each complete line, or with the
    /// refusal of an over-long one.
    pub fn push(&mut self, mut data: &[u8], mut on_line: impl FnMut(Result<&[u8], Reason>)) {
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            let (chunk, rest) = match newline {
                Some(i) => (&data[..i], Some(&data[i + 1..])),
                None => (data, None),
            };
            if !self.skipping {
                if self.buf.len() + chunk.len() > self.max {
                    on_line(Err(Reason::Oversize));
                    self.buf.clear();
                    self.skipping = true;
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            match rest {
                Some(rest) => {
                    if !self.skipping {
                        let line = trim_cr(&self.buf);
                        on_line(if line.is_empty() {
                            Err(Reason::Empty)
                        } else {
                            Ok(line)
                        });
                    }
                    self.buf.clear();
                    self.skipping = false;
                    data = rest;
                }
                None => break,
            }
        }
    }

    /// Forgets a partial line (after the device was reopened).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }
}

/// The lines of a datagram (`\n` or `\r\n` separated; a final newline
/// ends the last line rather than starting an empty one). A blank line, or
/// an empty datagram, is [`Reason::Empty`].
pub fn lines(datagram: &[u8]) -> impl Iterator<Item = Result<&[u8], Reason>> {
    let body = datagram
        .strip_suffix(b"\n")
        .filter(|_| !datagram.is_empty())
        .unwrap_or(datagram);
    body.split(|&b| b == b'\n').map(trim_cr).map(|l| {
        if l.is_empty() {
            Err(Reason::Empty)
        } else {
            Ok(l)
        }
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(framer: &mut LineFramer, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, Reason>> {
        let mut out = Vec::new();
        for c in chunks {
            framer.push(c, |l| out.push(l.map(<[u8]>::to_vec)));
        }
        out
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        let mut f = LineFramer::new(16);
        let out = feed(&mut f, &[b"ab", b"c\r\nde", b"f\n\n", b"g"]);
        assert_eq!(
            out,
            vec![Ok(b"abc".to_vec()), Ok(b"def".to_vec()), Err(Reason::Empty)]
        );
        assert_eq!(feed(&mut f, &[b"\n"]), vec![Ok(b"g".to_vec())]);
    }

    #[test]
    fn an_overlong_line_is_refused_once_and_skipped() {
        let mut f = LineFramer::new(4);
        let out = feed(&mut f, &[b"12345", b"678", b"9\nok\n"]);
        assert_eq!(out, vec![Err(Reason::Oversize), Ok(b"ok".to_vec())]);
        assert!(f.buf.capacity() <= 64 * 1024);
    }

    #[test]
    fn datagram_lines() {
        let got: Vec<_> = lines(b"a\r\n\nb\nc").collect();
        assert_eq!(
            got,
            vec![Ok(&b"a"[..]), Err(Reason::Empty), Ok(b"b"), Ok(b"c")]
        );
        // A final newline ends the last line; an empty datagram is one
        // empty message, and so is a lone newline.
        assert_eq!(lines(b"a\n").collect::<Vec<_>>(), vec![Ok(&b"a"[..])]);
        assert_eq!(lines(b"").collect::<Vec<_>>(), vec![Err(Reason::Empty)]);
        assert_eq!(lines(b"\n").collect::<Vec<_>>(), vec![Err(Reason::Empty)]);
        assert_eq!(lines(b"\r\n").collect::<Vec<_>>(), vec![Err(Reason::Empty)]);
    }
}
