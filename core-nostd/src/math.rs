//! Float functions the core needs without std.
//!
//! `libm` provides them; the one exception is under Miri, which cannot run
//! the inline assembly `libm` uses for `sqrt` on x86-64, so Miri runs (and
//! only those) take std's `sqrt`, an intrinsic Miri implements.

/// The square root.
#[inline(always)]
pub(crate) fn sqrt(x: f64) -> f64 {
    #[cfg(miri)]
    {
        std::primitive::f64::sqrt(x)
    }
    #[cfg(not(miri))]
    {
        libm::sqrt(x)
    }
}
