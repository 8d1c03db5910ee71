//! Crash points, for the tests that check what survives a crash at each
//! step of store-and-forward.
//!
//! With `SLUICE_CRASH_AT=<step>` (or `<step>:<n>`) in its environment, the
//! agent aborts (`SIGABRT`: no destructor, no flush, as `kill -9` or a
//! power cut would leave it) the `n`-th time (default 1) it reaches
//! `step`. Without the variable a crash point costs one load of a
//! `OnceLock` and nothing else; it is read once, at the first point reached.
//!
//! The steps, in the order a record meets them:
//!
//! | step | where |
//! | --- | --- |
//! | `append.before_commit` | records are in the append transaction, not committed |
//! | `append.after_commit` | the append (and its window marks) committed |
//! | `downsample.before_commit` | a merge is in the append transaction, not committed |
//! | `checkpoint.after_commit` | a worker checkpoint committed |
//! | `send.after_mark` | records marked `sent`, not yet published |
//! | `send.after_publish` | a record written to the upstream connection |
//! | `ack.before_delete` | PUBACKs received, the records not yet deleted |
//! | `ack.after_delete` | the acknowledged records deleted |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The configured crash point and how often to pass it first.
struct Armed {
    step: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("SLUICE_CRASH_AT").ok()?;
            let (step, at) = match spec.split_once(':') {
                Some((step, n)) => (step.to_owned(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                step,
                at,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Aborts the process if `SLUICE_CRASH_AT` names `step` and this is its
/// `n`-th passage (see the module docs).
#[inline]
pub fn point(step: &str) {
    if let Some(armed) = armed()
        && armed.step == step
        && armed.seen.fetch_add(1, Relaxed) + 1 == armed.at
    {
        eprintln!("SLUICE_CRASH_AT: aborting at {step}");
        std::process::abort();
    }
}
