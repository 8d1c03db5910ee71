//! The console: records as lines on standard output, or handed to a
//! caller (`sluice demo`) that shows them its own way.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use sluice_core::Timestamp;
use tokio::sync::mpsc;

use super::record::Record;

/// What the console gets.
#[derive(Clone, Debug)]
pub enum Console {
    /// Nothing.
    Off,
    /// Each aggregate and alert as a line on standard output
    /// (`output.console = true`).
    Lines,
    /// Each aggregate and alert as a record, for a caller that shows them
    /// its own way (`sluice demo`); dropped if the caller falls behind.
    Tap(mpsc::Sender<Record>),
}

/// `ms` since the epoch as the local time of day, `HH:MM:SS` (and `.mmm`
/// with `millis`); the date is left out: console lines are read as they
/// come.
pub fn clock(ms: Timestamp, millis: bool) -> String {
    let secs = ms.div_euclid(1000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (integers, and a null
    // `tm_zone` pointer that localtime_r overwrites); localtime_r is the
    // thread-safe form and writes only into the `tm` we own.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        (!libc::localtime_r(&secs, &mut tm).is_null()).then_some(tm)
    };
    let (h, m, s) = tm.map_or_else(
        || {
            let day = ms.rem_euclid(86_400_000) / 1000;
            (day / 3600, day / 60 % 60, day % 60)
        },
        |tm| (tm.tm_hour.into(), tm.tm_min.into(), tm.tm_sec.into()),
    );
    if millis {
        format!("{h:02}:{m:02}:{s:02}.{:03}", ms.rem_euclid(1000))
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// Set once standard output could not be written: console lines stop for
/// good (every lane), once logged.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Prints records on standard output, one line each. Console lines are a
/// convenience: if standard output cannot be written (its reader went away,
/// as in `sluice run … | head`, or its disk is full) they stop, with one
/// warning, and the agent goes on delivering to its outputs and outbox.
pub(super) fn print(record: &Record) {
    if STOPPED.load(Relaxed) {
        return;
    }
    if let Err(e) = write(record, &mut std::io::stdout().lock())
        && !STOPPED.swap(true, Relaxed)
    {
        tracing::warn!(
            error = %e,
            "console output stopped: standard output cannot be written; aggregates and alerts still go to the outputs and the outbox"
        );
    }
}

/// Writes `record`'s console line to `out`.
pub(super) fn write(record: &Record, out: &mut impl Write) -> std::io::Result<()> {
    match record {
        Record::Stats(_) | Record::Checkpoint { .. } => Ok(()),
        Record::Aggregate(a) => {
            writeln!(
                out,
                "agg   {:<24} {}-{}  n={:<4} mean={:>9.3}  min={:>9.3}  max={:>9.3}{}{}{}",
                a.series,
                clock(a.start, true),
                clock(a.end, true),
                a.count,
                a.mean,
                a.min,
                a.max,
                if a.late > 0 {
                    format!("  late={}", a.late)
                } else {
                    String::new()
                },
                a.extras().distinct.as_ref().map_or_else(String::new, |d| {
                    format!("  distinct {}={:.0}", d.label, d.estimate)
                }),
                if a.partial { "  (partial)" } else { "" }
            )
        }
        Record::Alert(e) => writeln!(
            out,
            "ALERT {:<7} {:<24} {:<16} value={:.3} score={} threshold={:.3}",
            e.state,
            e.series,
            e.rule,
            e.value,
            e.score.map_or("-".into(), |s| format!("{s:.2}")),
            e.threshold
        ),
    }
}
