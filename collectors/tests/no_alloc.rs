//! Decoding allocates nothing per message once the decoder is warm.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sluice_collectors::decode::{DecodeSink, JsonDecoder, JsonMapping};
use sluice_collectors::{Reading, Reason};

/// Counts the allocations of the thread that is watching (see [`WATCH`]):
/// the test harness's own threads allocate now and then, under load.
struct Counting;

thread_local! {
    /// Whether this thread's allocations are counted.
    static WATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCH.try_with(std::cell::Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Count(u64);

impl DecodeSink for Count {
    fn reading(&mut self, _: Reading) {
        self.0 += 1;
    }
    fn reject(&mut self, _: Reason, _: &dyn std::fmt::Display) {}
}

#[test]
fn steady_state_decoding_does_not_allocate() {
    let now = 1_732_600_000_000;
    let w1 = br#"{"sensor":"s-0042","ts":1732600000123,"value":21.37}"#;
    let ten = br#"{"sensor":"s-0042","ts":1732600000123,"t":21.37,"h":40.2,"p":1013.25,"co2":412,"pm":7.5,"v":0.31,"n":41.8,"l":320,"b":3.71,"x":1}"#;
    let mut single = JsonDecoder::new(JsonMapping::default());
    let mut star = JsonDecoder::new(JsonMapping {
        values: vec!["*".into()],
        ..JsonMapping::default()
    });
    let mut out = Count(0);
    // Warm up: the buffers grow to their working size.
    single.decode(w1, None, now, &mut out);
    star.decode(ten, None, now, &mut out);
    let before = ALLOCATIONS.load(Relaxed);
    WATCH.set(true);
    for _ in 0..1000 {
        single.decode(w1, None, now, &mut out);
        star.decode(ten, None, now, &mut out);
    }
    WATCH.set(false);
    let allocations = ALLOCATIONS.load(Relaxed) - before;
    assert_eq!(out.0, 11 + 1000 * 11);
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 2000 messages"
    );
}
