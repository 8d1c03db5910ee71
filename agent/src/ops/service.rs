//! systemd integration: readiness and the watchdog (`Type=notify`,
//! `WatchdogSec=`), through `$NOTIFY_SOCKET`. Outside systemd (no socket in
//! the environment) every call here does nothing.
//!
//! Readiness (`READY=1`) is sent once every source is up, `STOPPING=1` on
//! SIGTERM or SIGINT, before shutdown begins. The watchdog is
//! pinged at half its period, but only while every worker thread's
//! heartbeat (bumped on every pass of its loop, at least ten times a second
//! even when idle) keeps moving, or it is waiting for room in the output
//! channel (back-pressure from a slow output or a full disk is not a
//! stall): a wedged worker stops the pings, and systemd restarts the agent
//! (`Restart=on-failure`). So does a store stuck in one SQLite call (the
//! outbox writer's or the uplink's) for longer than the watchdog period: a
//! failing call that returns (a full disk) is degraded service, not stuck,
//! and keeps the pings going.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::ops::metrics::Running;

/// Tells systemd the agent is stopping (`STOPPING=1`). Sent where the
/// signal is taken, before shutdown begins: from the watchdog task, as it
/// was, it raced the shutdown, which could end the runtime before that task
/// ran again (and without a watchdog it was never sent).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Tells systemd the agent is ready, then pings its watchdog (if enabled)
/// while the workers are alive, until `stop`.
pub async fn ready_and_watchdog(running: Running, stop: CancellationToken) {
    let status = format!(
        "running: {} sources, {} workers",
        running.sources.len(),
        running.workers.len()
    );
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(100));
    tracing::info!(?period, "systemd watchdog enabled");
    let beats = |r: &Running| -> Vec<u64> {
        r.workers
            .iter()
            .map(|w| w.heartbeat.load(Relaxed))
            .collect()
    };
    let mut last = beats(&running);
    loop {
        tokio::select! {
            // STOPPING=1 went with the signal (see `stopping`).
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let stuck: Vec<&str> = [
            ("outbox writer", &running.uplink.writer_busy_since),
            ("uplink", &running.uplink.uplink_busy_since),
        ]
        .into_iter()
        .filter(|(_, since)| {
            let since = since.load(Relaxed);
            since != 0
                && sluice_collectors::reading::now_ms().saturating_sub(since)
                    > period.as_millis() as i64
        })
        .map(|(name, _)| name)
        .collect();
        if !stuck.is_empty() {
            tracing::error!(
                ?stuck,
                "the store is stuck in one SQLite call for longer than the watchdog period; not pinging the systemd watchdog"
            );
            last = beats(&running);
            continue;
        }
        let now = beats(&running);
        let stalled: Vec<usize> = now
            .iter()
            .zip(&last)
            .enumerate()
            .filter(|(i, (a, b))| a == b && !running.workers[*i].waiting_on_output.load(Relaxed))
            .map(|(i, _)| i)
            .collect();
        if stalled.is_empty() {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else {
            tracing::error!(
                ?stalled,
                "workers stalled; not pinging the systemd watchdog"
            );
        }
        last = now;
    }
}
