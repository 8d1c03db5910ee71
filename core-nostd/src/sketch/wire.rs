//! The byte format shared by all sketches (see the [module docs](super)).

use super::SketchError;

const MAGIC: &[u8; 4] = b"SLSK";
const VERSION: u8 = 1;
/// Magic, family, version, reserved, seed, body length.
const HEADER: usize = 4 + 1 + 1 + 2 + 8 + 4;
const CHECKSUM: usize = 4;

/// Sketch families, as written in the header. 1 was the HyperLogLog's
/// before it took the DataSketches HLL format; it stays unused.
pub(crate) mod family {
    pub(crate) const COUNT_MIN: u8 = 2;
    pub(crate) const BLOOM: u8 = 3;
    pub(crate) const RESERVOIR: u8 = 4;
    pub(crate) const SPACE_SAVING: u8 = 5;
    pub(crate) const DDSKETCH: u8 = 6;
}

/// Bytes a sketch with a body of `body` bytes takes.
pub(crate) const fn framed_len(body: usize) -> usize {
    HEADER + body + CHECKSUM
}

/// Writes the body of a sketch after its header.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts a sketch of `family` with a body of exactly `body` bytes.
    pub(crate) fn start(
        buf: &'a mut [u8],
        family: u8,
        seed: u64,
        body: usize,
    ) -> Result<Self, SketchError> {
        let needed = framed_len(body);
        let Ok(body_len) = u32::try_from(body) else {
            return Err(SketchError::BadParameters("sketch too large to serialize"));
        };
        if buf.len() < needed {
            return Err(SketchError::BufferTooSmall { needed });
        }
        let mut w = Self {
            buf: &mut buf[..needed],
            pos: 0,
        };
        w.bytes(MAGIC);
        w.u8(family);
        w.u8(VERSION);
        w.bytes(&[0, 0]);
        w.u64(seed);
        w.u32(body_len);
        Ok(w)
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }

    /// The next `n` bytes of the output, for the caller to fill.
    pub(crate) fn next(&mut self, n: usize) -> &mut [u8] {
        let out = &mut self.buf[self.pos..self.pos + n];
        self.pos += n;
        out
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    /// `v` as an unsigned LEB128 varint (7 bits a byte, low first).
    pub(crate) fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.u8(v as u8 | 0x80);
            v >>= 7;
        }
        self.u8(v as u8);
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }

    pub(crate) fn f64(&mut self, v: f64) {
        self.bytes(&v.to_le_bytes());
    }

    /// Appends the checksum; returns the bytes written.
    pub(crate) fn finish(mut self) -> usize {
        debug_assert_eq!(self.pos + CHECKSUM, self.buf.len(), "body length mismatch");
        let sum = checksum(&self.buf[..self.pos]);
        self.u32(sum);
        self.pos
    }
}

fn checksum(bytes: &[u8]) -> u32 {
    crate::hash::hash64(bytes, 0) as u32
}

/// Reads a sketch's body after validating its frame.
pub(crate) struct Reader<'a> {
    body: &'a [u8],
    pos: usize,
    /// The seed from the header.
    pub(crate) seed: u64,
}

impl<'a> Reader<'a> {
    /// Validates magic, family, version, length and checksum.
    pub(crate) fn open(bytes: &'a [u8], family: u8) -> Result<Self, SketchError> {
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            return Err(SketchError::NotASketch);
        }
        if bytes.len() < HEADER + CHECKSUM {
            return Err(SketchError::Corrupt("truncated header"));
        }
        if bytes[4] != family {
            return Err(SketchError::WrongFamily {
                expected: family,
                found: bytes[4],
            });
        }
        if bytes[5] != VERSION {
            return Err(SketchError::UnsupportedVersion(bytes[5]));
        }
        let body_len = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as usize;
        let Some(total) = HEADER
            .checked_add(body_len)
            .and_then(|n| n.checked_add(CHECKSUM))
        else {
            return Err(SketchError::Corrupt("length overflows"));
        };
        if bytes.len() != total {
            return Err(SketchError::Corrupt("length does not match the header"));
        }
        let (framed, sum) = bytes.split_at(total - CHECKSUM);
        if checksum(framed) != u32::from_le_bytes([sum[0], sum[1], sum[2], sum[3]]) {
            return Err(SketchError::Corrupt("checksum mismatch"));
        }
        if bytes[6] != 0 || bytes[7] != 0 {
            return Err(SketchError::Corrupt("reserved bytes are not zero"));
        }
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&bytes[8..16]);
        Ok(Self {
            body: &framed[HEADER..],
            pos: 0,
            seed: u64::from_le_bytes(seed),
        })
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], SketchError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.body.len())
            .ok_or(SketchError::Corrupt("body shorter than its contents"))?;
        let b = &self.body[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SketchError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, SketchError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, SketchError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, SketchError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A varint [`Writer::varint`] wrote; a value over 64 bits or a
    /// non-shortest form is an error.
    pub(crate) fn varint(&mut self) -> Result<u64, SketchError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(SketchError::Corrupt("varint over 64 bits"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(SketchError::Corrupt("varint not in its shortest form"));
                }
                return Ok(v);
            }
        }
        Err(SketchError::Corrupt("varint over 64 bits"))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, SketchError> {
        self.array().map(i64::from_le_bytes)
    }

    pub(crate) fn f64(&mut self) -> Result<f64, SketchError> {
        self.array().map(f64::from_le_bytes)
    }

    /// Bytes of the body not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    /// Fails unless the whole body was read.
    pub(crate) fn finish(self) -> Result<(), SketchError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(SketchError::Corrupt("trailing bytes in the body"))
        }
    }
}

/// Bytes [`Writer::varint`] writes for `v`.
pub(crate) const fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Fails with [`SketchError::StorageMismatch`] unless `got == needed`.
pub(crate) fn check_storage(needed: usize, got: usize) -> Result<(), SketchError> {
    if needed == got {
        Ok(())
    } else {
        Err(SketchError::StorageMismatch { needed, got })
    }
}
