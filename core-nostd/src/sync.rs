//! The few synchronisation primitives the core uses, switchable to
//! [loom](https://docs.rs/loom)'s model-checked versions with `--cfg loom`.
//!
//! Under loom, atomics are not `const`-constructible, so the `const fn`
//! constructors that build rings in a `static` exist only without `loom`.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// An `UnsafeCell` with loom's closure-based access API, so that the ring's
/// slot accesses are tracked by loom and compile to plain pointer accesses
/// otherwise.
#[cfg(not(loom))]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a raw pointer to the contents. The caller of the pointer
    /// upholds the aliasing rules.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(loom)]
pub(crate) struct UnsafeCell<T>(loom::cell::UnsafeCell<T>);

#[cfg(loom)]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::cell::UnsafeCell::new(value))
    }

    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        self.0.with_mut(f)
    }
}

/// Pads and aligns a value to the size of a cache line pair, so that the
/// producer's and the consumer's indices never share a line (false sharing
/// would make every push invalidate the consumer's cache and vice versa).
///
/// 128 bytes on x86-64 and AArch64, whose prefetchers pull lines in pairs;
/// 64 elsewhere; 32 on the small Cortex-M cores where memory is precious.
#[cfg_attr(any(target_arch = "x86_64", target_arch = "aarch64"), repr(align(128)))]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64", target_os = "none")),
    repr(align(64))
)]
#[cfg_attr(
    all(
        target_os = "none",
        not(any(target_arch = "x86_64", target_arch = "aarch64"))
    ),
    repr(align(32))
)]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> core::ops::Deref for CachePadded<T> {
    type Target = T;

    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}
