//! Wiring: sources → hand-offs → rings → workers → output task, and the
//! orderly shutdown that drains it all.
//!
//! Every source gets one ring per worker; each worker polls the rings of every
//! source. On shutdown (the injected `shutdown` token): the sources stop, the
//! workers drain their rings and close open windows as partial, the output
//! task delivers what it holds and disconnects; then `run` returns.

pub mod checkpoint;
pub mod nodes;
pub mod rules;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_collectors::mqtt::MqttSource;
use sluice_collectors::pipe::{Handoff, PriorityFn, reading_ring};
use sluice_collectors::serial::SerialSource;
use sluice_collectors::udp::UdpSource;
use sluice_collectors::{ReadingConsumer, SourceStats};
use sluice_core::shed::Priority;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Source};
use crate::output::{self, OutboxFeed, OutputStats};
use crate::pipeline::worker::{RulesSlot, Worker, WorkerStats};
use crate::store::outbox::{Durability, OnCorrupt, Outbox};
use crate::store::uplink::{self, UplinkStats};
use rules::Rules;

/// Alerts, and records for the outbox writer, waiting, at most.
const OUTPUT_QUEUE: usize = 1024;
/// Node records waiting for the merger; a full queue holds the serial
/// line back.
const NODE_QUEUE: usize = 1024;

/// Aggregates (and checkpoints) that may wait for the output task: one per
/// series the workers can hold (`max_series` × `workers`, at least
/// [`OUTPUT_QUEUE`]). Every series closes its window at the same boundary,
/// within one tick; the output takes a while to drain them (about 0.4 s for
/// 10,000 over MQTT at QoS 1 here). They wait in the channel, about 300
/// bytes each (a 40-byte slot, the boxed aggregate of 232 bytes, its series
/// id; more for a rule with quantiles or label sketches) and only while
/// they wait (it allocates as it fills), while the workers go on taking
/// readings and raising alerts. A smaller channel made
/// the workers wait instead, and their rings filled and shed.
fn record_queue(config: &Config) -> usize {
    config
        .max_series
        .saturating_mul(config.workers)
        .max(OUTPUT_QUEUE)
}
/// How long shutdown may take before `run` gives up waiting.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

pub use crate::ops::metrics::Running;

/// Runs the pipeline for `config` until `shutdown` is cancelled. `started`
/// (if given) receives the running pipeline's counters once every source is up.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    started: Option<oneshot::Sender<Running>>,
) -> anyhow::Result<Running> {
    run_with_reload(config, shutdown, started, None).await
}

/// [`run`], also applying the configurations received on `reload` (from
/// SIGHUP): new rules take effect at once; changes to anything else need a
/// restart and are reported as such.
pub async fn run_with_reload(
    config: Config,
    shutdown: CancellationToken,
    started: Option<oneshot::Sender<Running>>,
    reload: Option<mpsc::Receiver<Config>>,
) -> anyhow::Result<Running> {
    let console = if config.output.console {
        output::Console::Lines
    } else {
        output::Console::Off
    };
    run_with(config, shutdown, started, reload, console).await
}

/// [`run`], with aggregates and alerts also sent to `tap` as records (what
/// `sluice demo` prints), whatever `output.console` says.
pub async fn run_tapped(
    config: Config,
    shutdown: CancellationToken,
    started: Option<oneshot::Sender<Running>>,
    tap: mpsc::Sender<output::Record>,
) -> anyhow::Result<Running> {
    run_with(config, shutdown, started, None, output::Console::Tap(tap)).await
}

async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    started: Option<oneshot::Sender<Running>>,
    mut reload: Option<mpsc::Receiver<Config>>,
    console: output::Console,
) -> anyhow::Result<Running> {
    let agent: Arc<str> = config.agent_id.as_str().into();
    let rules = Arc::new(Rules::of(&config).map_err(anyhow::Error::msg)?);
    let slot = Arc::new(RulesSlot::default());

    // Output task.
    let (tx, rx) = mpsc::channel(record_queue(&config));
    let (alert_tx, alert_rx) = mpsc::channel(OUTPUT_QUEUE);
    let stats_tx = tx.clone();
    let output_stats = Arc::new(OutputStats::default());
    // Store-and-forward and checkpoints: the writer and the uplink, on
    // threads (SQLite calls block). One file holds the outbox and the
    // checkpoints, so that they commit together.
    let mut store = None;
    let mut outbox_feed = None;
    let mut restored = checkpoint::Restored::default();
    // When the last run crashed (see `Outbox::take_clean_stop`).
    let mut crash_restart = None;
    let uplink_stats = Arc::new(UplinkStats::default());
    let store_path = match (&config.outbox, &config.checkpoint) {
        (Some(o), _) => Some(o.path.clone()),
        (None, Some(c)) => c.path.clone(),
        (None, None) => None,
    };
    if let Some(path) = store_path {
        let (durability, on_corrupt, max_records, max_bytes) = match &config.outbox {
            Some(o) => (o.durability, o.on_corrupt, o.max_records, o.max_bytes),
            None => (Durability::Normal, OnCorrupt::MoveAside, u64::MAX, u64::MAX),
        };
        // One agent per state file: a second one refuses to start.
        let lock = Outbox::lock(&path).map_err(|e| anyhow::anyhow!("outbox: {e}"))?;
        let open = || {
            Outbox::open(&path, durability, on_corrupt, max_records, max_bytes)
                .map_err(|e| anyhow::anyhow!("outbox: {e}"))
        };
        let claimed = crate::store::outbox::Claimed::default();
        let (mut writer_box, note) = open()?;
        // Records appended from now on carry this run's epoch.
        writer_box
            .begin_run()
            .map_err(|e| anyhow::anyhow!("outbox: {e}"))?;
        let clean_stop = writer_box
            .take_clean_stop()
            .map_err(|e| anyhow::anyhow!("outbox: {e}"))?;
        let mut writer_box = match (&config.outbox, &config.uplink) {
            (Some(o), Some(_)) => writer_box.with_on_full(o.on_full, claimed.clone()),
            _ => writer_box,
        };
        if let Some(note) = note {
            tracing::error!("{note}");
        }
        if config.checkpoint.is_none() {
            // State saved by an earlier run with checkpoints on would be
            // stale by the time they are turned on again.
            let discarded = writer_box
                .discard_checkpoints()
                .map_err(|e| anyhow::anyhow!("checkpoints in {}: {e}", path.display()))?;
            if discarded > 0 {
                tracing::info!(
                    workers = discarded,
                    "checkpoints are off: discarded the saved ones"
                );
            }
        } else {
            let (saved, marks) = writer_box
                .checkpoints()
                .map_err(|e| anyhow::anyhow!("checkpoints in {}: {e}", path.display()))?;
            restored = checkpoint::distribute(saved, marks, config.workers, &rules);
            if !clean_stop && restored.per_worker.iter().any(|s| !s.is_empty()) {
                let now = sluice_collectors::reading::now_ms();
                crash_restart = Some(now);
                tracing::warn!(
                    "the last run did not stop cleanly: readings since its last checkpoint are lost, and windows that started before now are reported with partial = true, partial_reason = \"restored_after_crash\""
                );
            }
            for why in &restored.skipped {
                tracing::error!("{why}; its series start afresh");
            }
            if restored.relayout {
                let rows: Vec<(usize, Vec<u8>)> = restored
                    .per_worker
                    .iter()
                    .enumerate()
                    .zip(restored.joins.iter().zip(&restored.patterns))
                    .map(|((w, series), (joins, patterns))| {
                        let saved = checkpoint::Decoded {
                            series: series.clone(),
                            joins: joins.clone(),
                            patterns: patterns.clone(),
                        };
                        (w, checkpoint::encode(saved))
                    })
                    .collect();
                writer_box
                    .replace_checkpoints(&rows, sluice_collectors::reading::now_ms())
                    .map_err(|e| anyhow::anyhow!("rewriting checkpoints: {e}"))?;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let uplink = match (&config.outbox, &config.uplink) {
            (Some(o), Some(u)) => {
                let (reader_box, _) = open()?;
                let backlog = reader_box.status().map(|s| s.backlog).unwrap_or(0);
                tracing::info!(path = %o.path.display(), backlog, "outbox open");
                let (u, agent, stats, stop, claimed) = (
                    u.clone(),
                    config.agent_id.clone(),
                    uplink_stats.clone(),
                    stop.clone(),
                    claimed.clone(),
                );
                Some(
                    std::thread::Builder::new()
                        .name("sluice-uplink".into())
                        .spawn(move || {
                            uplink::run_uplink(reader_box, u, agent, stats, stop, claimed)
                        })?,
                )
            }
            _ => None,
        };
        let (feed_tx, feed_rx) = mpsc::channel(OUTPUT_QUEUE);
        let writer = {
            let (stats, wake) = (
                uplink_stats.clone(),
                uplink.as_ref().map(|u| u.thread().clone()),
            );
            std::thread::Builder::new()
                .name("sluice-outbox".into())
                .spawn(move || uplink::run_writer(writer_box, feed_rx, stats, wake))?
        };
        let (aggregate_topic, alert_topic) = match (&config.outbox, &config.uplink) {
            (Some(o), Some(u)) => (
                u.aggregate_topic(),
                o.include_alerts.then(|| u.alert_topic()),
            ),
            _ => (String::new(), None),
        };
        outbox_feed = Some(OutboxFeed {
            items: feed_tx,
            keeps: output::Keeps::new(config.outbox.is_some(), config.checkpoint.is_some()),
            aggregate_topic,
            alert_topic,
            render: match config.uplink.as_ref().map(|u| u.kind) {
                Some(crate::config::UplinkKind::Nats) => output::subject::render,
                Some(crate::config::UplinkKind::Kafka) => output::kafka::render,
                _ => output::topic::render,
            },
        });
        store = Some((writer, uplink, stop, lock));
    }
    let output_task = {
        let feed = outbox_feed.take();
        let (mqtt, agent, stats, stopping) = (
            config.output.mqtt.clone(),
            agent.clone(),
            output_stats.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            output::run(
                rx,
                alert_rx,
                mqtt.as_ref(),
                console,
                agent,
                stats,
                stopping,
                feed,
            )
            .await
        })
    };

    // Rings: rings[w] holds worker w's consumers; producers[s][w] source s's.
    let mut consumers: Vec<Vec<ReadingConsumer>> =
        (0..config.workers).map(|_| Vec::new()).collect();
    let mut producers = Vec::new();
    for _ in &config.sources {
        let mut lanes = Vec::new();
        for worker in consumers.iter_mut() {
            let (p, c) = reading_ring(config.ring_capacity).context("ring_capacity")?;
            lanes.push(p);
            worker.push(c);
        }
        producers.push(lanes);
    }

    // Workers.
    let stop = Arc::new(AtomicBool::new(false));
    let mut worker_threads = Vec::new();
    let mut worker_stats = Vec::new();
    for (i, rings) in consumers.into_iter().enumerate() {
        let stats = Arc::new(WorkerStats::default());
        worker_stats.push(stats.clone());
        let mut worker = Worker::new(
            agent.clone(),
            rules.clone(),
            slot.clone(),
            config.max_series,
            tx.clone(),
            stats,
        )
        .with_alert_channel(alert_tx.clone())
        .with_series_idle(Duration::from_millis(config.series_idle_ms));
        if let Some(c) = &config.checkpoint {
            worker = worker.with_checkpoints(i, Duration::from_millis(c.interval_ms));
            if let Some(restart) = crash_restart {
                worker = worker.with_crash_restart(restart);
            }
            let saved = std::mem::take(&mut restored.per_worker[i]);
            worker.restore(saved, &restored.marks);
            if let Some(joins) = restored.joins.get_mut(i) {
                worker.restore_joins(std::mem::take(joins));
            }
            if let Some(patterns) = restored.patterns.get_mut(i) {
                worker.restore_patterns(std::mem::take(patterns));
            }
        }
        let stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("sluice-worker-{i}"))
            .spawn(move || worker.run(rings, stop))
            .context("starting a worker thread")?;
        worker_threads.push(handle);
    }
    drop(tx);
    // Only the node merger, if there is one, keeps an alert sender: the
    // output task ends when the last one is dropped.
    let mut node_alert_tx = Some(alert_tx);
    if config.checkpoint.is_some() {
        let sum = |f: fn(&WorkerStats) -> u64| -> u64 { worker_stats.iter().map(|w| f(w)).sum() };
        tracing::info!(
            series = sum(|w| w.restored.load(Relaxed)),
            dropped = sum(|w| w.restore_dropped.load(Relaxed)),
            "state restored from checkpoints"
        );
    }
    let wakeups: Vec<std::thread::Thread> =
        worker_threads.iter().map(|h| h.thread().clone()).collect();

    // Sources.
    let mut running = Running {
        sources: BTreeMap::new(),
        workers: worker_stats,
        output: output_stats,
        udp_addrs: BTreeMap::new(),
        metrics_addr: None,
        uplink: uplink_stats.clone(),
        nodes: Arc::default(),
    };
    let sources_stop = shutdown.child_token();
    let mut source_tasks = Vec::new();
    // Sensor nodes' records (serial sources with `format = "frames"`) go to
    // one merger, which ends when the last such source has.
    let node_stats = Arc::new(nodes::NodeStats::default());
    running.nodes = node_stats.clone();
    let mut node_tx = None;
    if config.has_nodes() {
        let (ntx, nrx) = mpsc::channel(NODE_QUEUE);
        node_tx = Some(ntx);
        source_tasks.push(tokio::spawn(nodes::run(
            nrx,
            stats_tx.clone(),
            node_alert_tx.take().expect("taken once"),
            agent.clone(),
            config.nodes.clone(),
            config.max_series,
            node_stats,
        )));
    }
    for ((name, source), lanes) in config.sources.iter().zip(producers) {
        let stats = Arc::new(SourceStats::default());
        running.sources.insert(name.clone(), stats.clone());
        let policy = config.shed_policy(config.ring_capacity);
        let handoff = Handoff::new(
            lanes,
            policy,
            sluice_core::hash::hash64(name.as_bytes(), 0),
            stats,
        )
        .map_err(|e| anyhow::anyhow!("shedding: {e}"))?
        .with_priority(source_priority(&slot, &rules))
        .with_route(group_route(&slot, &rules))
        .with_wakeups(wakeups.clone());
        let token = sources_stop.clone();
        let label = format!("sources.{name}");
        let task = match source.clone() {
            Source::Udp(settings) => {
                let s = UdpSource::bind(&label, settings, handoff)
                    .await
                    .with_context(|| format!("{label}: cannot bind"))?;
                running.udp_addrs.insert(name.clone(), s.local_addr()?);
                tokio::spawn(s.run(token))
            }
            Source::Serial(settings) => {
                let mut s = SerialSource::new(&label, settings, handoff)
                    .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
                if let Some(ntx) = &node_tx {
                    s = s.with_nodes(ntx.clone());
                }
                tokio::spawn(s.run(token))
            }
            Source::Mqtt(mut settings) => {
                settings
                    .resolve_password()
                    .map_err(|e| anyhow::anyhow!("{label}.{e}"))?;
                let s = MqttSource::new(&label, settings, handoff)
                    .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
                tokio::spawn(s.run(token))
            }
        };
        source_tasks.push(task);
    }
    drop(node_tx);
    drop(node_alert_tx);
    if let Some(addr) = config.metrics.listen {
        let listener = crate::ops::metrics::bind(addr)
            .await
            .with_context(|| format!("metrics.listen {addr}"))?;
        running.metrics_addr = Some(listener.local_addr()?);
        tokio::spawn(crate::ops::metrics::serve(
            listener,
            running.clone(),
            sources_stop.clone(),
        ));
    }
    // The periodic stats message (it holds a sender, so it must end before
    // the output task can).
    let stats_task = {
        let (running, stop, every) = (
            running.clone(),
            sources_stop.clone(),
            config.metrics.stats_interval_s,
        );
        tokio::spawn(async move {
            if every == 0 {
                return;
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(every)) => {}
                }
                if stats_tx
                    .send(crate::output::Record::Stats(crate::ops::metrics::snapshot(
                        &running,
                    )))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    tracing::info!(agent = %agent, workers = config.workers, sources = config.sources.len(), "sluice running");
    if let Some(started) = started {
        let _ = started.send(running.clone());
    }

    loop {
        let next = async {
            match &mut reload {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            new = next => match new {
                Some(new) => apply_reload(&config, &new, &slot),
                None => reload = None,
            },
        }
    }
    tracing::info!("shutting down: stopping sources, draining workers, flushing outputs");
    let drained = tokio::time::timeout(SHUTDOWN_BOUND, async {
        for task in source_tasks {
            let _ = task.await;
        }
        let _ = stats_task.await;
        stop.store(true, Relaxed);
        for thread in &wakeups {
            thread.unpark();
        }
        tokio::task::spawn_blocking(move || {
            for handle in worker_threads {
                let _ = handle.join();
            }
        })
        .await
        .ok();
        let delivered = output_task.await;
        // The output task has dropped the writer's channel: the writer
        // commits what it holds and ends; then the uplink stops (what it has
        // not forwarded stays in the outbox for the next start).
        if let Some((writer, uplink, stop, lock)) = store {
            tokio::task::spawn_blocking(move || {
                // Everything the workers saved is committed: a clean stop.
                if let Ok(mut outbox) = writer.join()
                    && let Err(e) = outbox.mark_clean_stop()
                {
                    tracing::error!(error = %e, "outbox: cannot record the clean stop");
                }
                stop.store(true, Relaxed);
                if let Some(uplink) = uplink {
                    uplink.thread().unpark();
                    let _ = uplink.join();
                }
                // Only now may another process take the file.
                drop(lock);
            })
            .await
            .ok();
        }
        delivered
    })
    .await;
    match drained {
        Ok(Ok(Ok(()))) => Ok(running),
        Ok(Ok(Err(e))) => bail!("{e}"),
        Ok(Err(e)) => bail!("output task failed: {e}"),
        Err(_) => bail!("shutdown took longer than {SHUTDOWN_BOUND:?}"),
    }
}

/// Which series a source never sheds, under the rules of the latest reload
/// (a lookup only while some rule is critical).
fn source_priority(slot: &Arc<RulesSlot>, rules: &Arc<Rules>) -> PriorityFn {
    let slot = slot.clone();
    let (mut generation, mut rules) = (0, rules.clone());
    Box::new(move |series: &str| {
        if let Some((newer, latest)) = slot.latest(generation) {
            generation = newer;
            rules = latest;
        }
        if rules.any_critical() {
            rules.priority(series)
        } else {
            Priority::Normal
        }
    })
}

/// A source's route (see [`Rules::route`]), under the rules of the latest
/// reload.
fn group_route(slot: &Arc<RulesSlot>, rules: &Arc<Rules>) -> sluice_collectors::pipe::RouteFn {
    let slot = slot.clone();
    let (mut generation, mut rules) = (0, rules.clone());
    Box::new(move |reading, hasher| {
        if let Some((newer, latest)) = slot.latest(generation) {
            generation = newer;
            rules = latest;
        }
        rules.route(reading, hasher)
    })
}

/// Publishes the new configuration's rules to the workers; warns about the
/// changes that only a restart applies.
fn apply_reload(current: &Config, new: &Config, slot: &RulesSlot) {
    match Rules::of(new) {
        Ok(rules) => {
            slot.replace(Arc::new(rules));
            tracing::info!(
                rules = new.rules.len(),
                "configuration reloaded: rules replaced"
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "reloaded rules rejected; the old ones stay");
            return;
        }
    }
    let restart_only = [
        // (Tables are read again with the rules: an edit applies.)
        ("agent_id", current.agent_id != new.agent_id),
        ("workers", current.workers != new.workers),
        ("ring_capacity", current.ring_capacity != new.ring_capacity),
        ("max_series", current.max_series != new.max_series),
        ("shedding", current.shedding != new.shedding),
        ("sources", current.sources != new.sources),
        ("output", current.output != new.output),
        ("metrics", current.metrics != new.metrics),
        ("nodes", current.nodes != new.nodes),
    ];
    for (key, changed) in restart_only {
        if changed {
            tracing::warn!(key, "changed in the file but applied only on restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(priority: &str) -> Arc<Rules> {
        let text = format!(
            "agent_id = \"t\"\n[sources.u]\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n[output]\nconsole = true\n[[rules]]\nmatch = \"c-*\"\npriority = \"{priority}\"\nthresholds = [{{ above = 1.0 }}]\n"
        );
        Arc::new(Rules::compile(&Config::parse(&text).unwrap().rules).unwrap())
    }

    #[test]
    fn a_reload_changes_which_series_the_sources_never_shed() {
        for (before, after) in [("normal", "critical"), ("critical", "normal")] {
            let slot = Arc::new(RulesSlot::default());
            let started = rules(before);
            let mut priority = source_priority(&slot, &started);
            let level = |p: &str| match p {
                "critical" => Priority::Critical,
                _ => Priority::Normal,
            };
            assert_eq!(priority("c-1"), level(before));
            slot.replace(rules(after));
            assert_eq!(priority("c-1"), level(after), "{before} -> {after}");
        }
    }
}
