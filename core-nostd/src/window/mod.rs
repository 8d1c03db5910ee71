//! Windows over a stream of `(event time, value)`.
//!
//! | window | closes when | memory |
//! | --- | --- | --- |
//! | [`TumblingWindow`] | the watermark passes its end | `P` accumulators |
//! | [`HoppingWindow`] (sliding) | the watermark passes its end | `P` pane accumulators |
//! | [`CountWindow`] | it has `n` values | one accumulator |
//! | [`SessionWindow`] | the watermark passes its last value plus the gap (or its first plus the longest span) | `P` session accumulators |
//! | [`DecayingWindow`] | never: it is read at any time | a few floats |
//!
//! # Event time and the watermark
//!
//! Time windows are cut by the readings' *event* time, not by the time they
//! arrive. The *watermark* is the largest event time seen minus the allowed
//! lateness: the window `[start, end)` closes, and is emitted, once the
//! watermark reaches `end`. A reading whose windows have all closed is *late*:
//! it is counted and refused with [`Rejection::Late`], never merged into a
//! window that was already emitted. Readings out of order by less than the
//! allowed lateness land in their proper window.
//!
//! A series that falls silent would keep its last window open forever; the
//! owner calls `advance_to(now)` from a periodic tick to close it.
//!
//! # Memory
//!
//! Time windows keep their open state in a fixed array of `P` panes (a pane
//! is one slide of time). Construction checks that `P` covers the window
//! length plus the allowed lateness, so every open pane always has its own
//! slot and no reading is ever turned away for lack of room.
//!
//! Results are handed to a caller-supplied `FnMut(Closed<A>)` as windows close,
//! oldest first, without allocation.

mod count;
mod decaying;
mod panes;
mod session;

pub use count::CountWindow;
pub use decaying::{DecayingStats, DecayingWindow};
pub use panes::{HoppingWindow, TumblingWindow};
pub use session::SessionWindow;

use crate::Timestamp;

/// A window that has closed, with the summary of its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Closed<A> {
    /// Start of the window (inclusive). For a [`CountWindow`], the smallest
    /// event time among its values.
    pub start: Timestamp,
    /// End of the window (exclusive). For a [`CountWindow`], one past the
    /// largest event time among its values.
    pub end: Timestamp,
    /// The summary of the values in the window.
    pub acc: A,
    /// Whether the window was closed early by `flush` (shutdown) rather than by
    /// the watermark or the count: more values may have belonged to it.
    pub partial: bool,
}

/// Why a window refused a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The value was NaN or infinite.
    NonFinite,
    /// The value's magnitude is beyond [`MAX_VALUE`](crate::MAX_VALUE).
    TooLarge,
    /// Every window the value belongs to has already closed.
    Late,
    /// The event time is beyond ±[`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP).
    OutOfRange,
}

impl core::fmt::Display for Rejection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Rejection::NonFinite => "value is NaN or infinite",
            Rejection::TooLarge => "value is beyond ±1e100",
            Rejection::Late => "every window of this event time has closed",
            Rejection::OutOfRange => "event time is out of range",
        })
    }
}

impl core::error::Error for Rejection {}

/// What a window has done with the values offered to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WindowStats {
    /// Values added to a window.
    pub accepted: u64,
    /// Values refused as late.
    pub late: u64,
    /// Values refused as NaN, infinite or beyond ±[`MAX_VALUE`](crate::MAX_VALUE)
    /// (one counter: the checkpoint format holds these fields).
    pub non_finite: u64,
    /// Values refused for an event time beyond ±[`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP).
    pub out_of_range: u64,
    /// Windows emitted.
    pub closed: u64,
}

impl WindowStats {
    pub(crate) fn reject(&mut self, why: Rejection) -> Result<(), Rejection> {
        match why {
            Rejection::NonFinite | Rejection::TooLarge => self.non_finite += 1,
            Rejection::Late => self.late += 1,
            Rejection::OutOfRange => self.out_of_range += 1,
        }
        Err(why)
    }
}

/// A window's parameters do not make sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowError {
    /// Length, slide or count is zero or negative.
    NotPositive,
    /// The allowed lateness is negative.
    NegativeLateness,
    /// A hopping window's length is not a whole number of slides.
    LengthNotMultipleOfSlide,
    /// The pane array is too small for the window length plus the allowed
    /// lateness.
    TooFewPanes {
        /// Panes the parameters need.
        needed: u64,
        /// Panes the type provides (its `P`).
        available: usize,
    },
    /// A decay factor outside (0, 1), or a half-life that is not positive.
    BadDecay,
}

impl core::fmt::Display for WindowError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WindowError::NotPositive => f.write_str("window length, slide and count must be > 0"),
            WindowError::NegativeLateness => f.write_str("allowed lateness must be >= 0"),
            WindowError::LengthNotMultipleOfSlide => {
                f.write_str("window length must be a whole multiple of the slide")
            }
            WindowError::TooFewPanes { needed, available } => write!(
                f,
                "window length plus allowed lateness needs {needed} panes, the window has {available}"
            ),
            WindowError::BadDecay => {
                f.write_str("decay factor must be in (0, 1) and half-life must be > 0")
            }
        }
    }
}

impl core::error::Error for WindowError {}

#[inline(always)]
pub(crate) fn check_finite(value: f64) -> Result<(), Rejection> {
    if value.abs() <= crate::MAX_VALUE {
        Ok(())
    } else if value.is_finite() {
        Err(Rejection::TooLarge)
    } else {
        Err(Rejection::NonFinite)
    }
}

#[inline(always)]
pub(crate) fn check_time(ts: crate::Timestamp) -> Result<(), Rejection> {
    if (-crate::MAX_TIMESTAMP..=crate::MAX_TIMESTAMP).contains(&ts) {
        Ok(())
    } else {
        Err(Rejection::OutOfRange)
    }
}

/// serde for `[Option<T>; P]` with a const generic `P`, which serde's own
/// array impls (lengths 0 to 32, fixed) do not cover: a tuple of `P`
/// elements, read back into an array of `None`s.
#[cfg(feature = "serde")]
pub(crate) mod option_array {
    use core::fmt;
    use core::marker::PhantomData;

    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::{SerializeTuple, Serializer};
    use serde::{Deserialize, Serialize};

    pub fn serialize<S: Serializer, T: Serialize, const P: usize>(
        array: &[Option<T>; P],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(P)?;
        for item in array {
            t.serialize_element(item)?;
        }
        t.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>, const P: usize>(
        d: D,
    ) -> Result<[Option<T>; P], D::Error> {
        struct Array<T, const P: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const P: usize> Visitor<'de> for Array<T, P> {
            type Value = [Option<T>; P];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array of {P} optional panes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = [const { None }; P];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
        }
        d.deserialize_tuple(P, Array::<T, P>(PhantomData))
    }
}
