//! The `sluice` binary: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice::cli::{Cli, Command, OutboxAction, SketchAction};
use sluice::config::Config;
use sluice::outln;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // A file size limit (`ulimit -f`, systemd's `LimitFSIZE=`) must show as a
    // failed write, handled like a full disk (appends pause, nothing
    // committed is lost), not kill the agent with SIGXFSZ.
    // SAFETY: signal(2) with SIG_IGN, before any other thread exists; no
    // handler runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // glibc gives each thread that allocates its own malloc arena (up to 8
    // per core), each holding on to freed memory; two keep the agent's RSS
    // within its 20 MiB budget at 10,000 series (see benches/README.md).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) before any other thread exists; it only tunes the
    // allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    // The demo prints its own table; its log says only what went wrong
    // (unless RUST_LOG asks for more).
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    // RUST_LOG as `level` or `target=level,…` directives (the filter
    // without span and field matching, which would bring in a regex engine,
    // about 0.5 MB of the binary).
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let asked = std::env::var("RUST_LOG").ok();
    let parsed = asked
        .as_deref()
        .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok());
    let unparsed = asked.filter(|_| parsed.is_none());
    let filter = parsed.unwrap_or_else(|| {
        tracing_subscriber::filter::Targets::new()
            .with_default(
                default_level
                    .parse::<tracing::Level>()
                    .unwrap_or(tracing::Level::INFO),
            )
            // The Kafka client logs every retry of a connection; the
            // uplink says once per outage what failed.
            .with_target("rskafka", tracing::Level::ERROR)
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    if let Some(v) = unparsed {
        tracing::warn!(
            "RUST_LOG={v:?} is not `level` or `target=level,…`: logging at {default_level}"
        );
    }
    match cli.command {
        Command::Check { config, quiet } => {
            let checked = std::fs::read_to_string(&config)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    let parsed = Config::parse(&text).map_err(|e| e.to_string())?;
                    Ok((parsed.preflight(&text), parsed))
                });
            match checked {
                Ok((mut found, mut c)) => {
                    let effective = c.to_toml();
                    // The reference tables, read as the agent would.
                    c.resolve_paths(&config);
                    if let Err(e) = c.load_tables() {
                        found.errors.push(e.to_string());
                    }
                    if !quiet {
                        sluice::cli::out(format_args!("{effective}"));
                        // What each table holds, as TOML comments.
                        for line in c.table_data.summary(&c.tables) {
                            sluice::cli::out(format_args!("# {line}\n"));
                        }
                    }
                    for note in &found.notes {
                        eprintln!("note: {}: {note}", config.display());
                    }
                    for error in &found.errors {
                        eprintln!("error: {}: {error}", config.display());
                    }
                    if !found.errors.is_empty() {
                        return ExitCode::from(2);
                    }
                    if !quiet {
                        eprintln!(
                            "{}: OK ({})",
                            config.display(),
                            sluice::config::CHECKED_AT_RUN_TIME
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", config.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            block_on_until_signal(|shutdown| async move {
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
                let watched = config.watched_files();
                if !watched.is_empty() {
                    tokio::spawn(reload_on_table_change(
                        path.clone(),
                        watched,
                        reload_tx.clone(),
                    ));
                }
                tokio::spawn(reload_on_sighup(path, reload_tx));
                // Readiness and the watchdog, once every source is up.
                let (started_tx, started_rx) = tokio::sync::oneshot::channel();
                let watch = shutdown.clone();
                tokio::spawn(async move {
                    if let Ok(running) = started_rx.await {
                        sluice::ops::service::ready_and_watchdog(running, watch).await;
                    }
                });
                sluice::pipeline::run_with_reload(
                    config,
                    shutdown,
                    Some(started_tx),
                    Some(reload_rx),
                )
                .await
                .map(drop)
            })
        }
        Command::Outbox { action, config } => outbox_command(action, config),
        Command::Sketch {
            action: SketchAction::Merge { files, by },
        } => sketch_merge(files, by),
        Command::Demo {
            print_config: true, ..
        } => {
            sluice::cli::out(format_args!("{}", sluice::demo::CONFIG));
            ExitCode::SUCCESS
        }
        Command::Demo { seconds, .. } => block_on_until_signal(|shutdown| async move {
            sluice::demo::run(seconds.map(Duration::from_secs), shutdown)
                .await
                .map(drop)
        }),
    }
}

/// `sluice sketch merge`: the unions on standard output, what was skipped
/// on standard error; status 1 if a sketch could not be read or merged.
fn sketch_merge(files: Vec<PathBuf>, by: sluice::sketch::MergeBy) -> ExitCode {
    use std::io::{BufReader, Read};
    let names = if files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        files
    };
    // The files in order, each ended by a newline (so that a file without
    // a final one does not join its last line to the next file's first).
    let mut input: Box<dyn Read> = Box::new(std::io::empty());
    for name in names {
        let next: Box<dyn Read> = if name.as_os_str() == "-" {
            Box::new(std::io::stdin())
        } else {
            match std::fs::File::open(&name) {
                Ok(file) => Box::new(file),
                Err(e) => {
                    eprintln!("error: {}: {e}", name.display());
                    return ExitCode::from(2);
                }
            }
        };
        input = Box::new(input.chain(next).chain(&b"\n"[..]));
    }
    let mut out = Vec::new();
    let report = match sluice::sketch::merge(BufReader::new(input), by, &mut out) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: reading the records: {e}");
            return ExitCode::FAILURE;
        }
    };
    sluice::cli::out(format_args!("{}", String::from_utf8_lossy(&out)));
    for bad in &report.bad {
        eprintln!("error: {bad}");
    }
    eprintln!(
        "merged {} record(s); skipped {} line(s) without a distinct sketch",
        report.merged, report.skipped
    );
    if report.bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `job` on a tokio runtime, cancelling its token on SIGTERM or SIGINT.
fn block_on_until_signal<F, Fut>(job: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            sluice::ops::service::stopping();
            signals.cancel();
        });
        match job(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Re-reads the configuration on every SIGHUP and passes it on if it is
/// valid; an invalid one is reported and the running one kept.
async fn reload_on_sighup(path: PathBuf, reload: tokio::sync::mpsc::Sender<Config>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload is off");
        return;
    };
    while hup.recv().await.is_some() {
        match Config::load(&path) {
            Ok(config) => {
                tracing::info!(config = %path.display(), "SIGHUP: reloading");
                if reload.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!("SIGHUP: new configuration rejected, keeping the current one: {e}")
            }
        }
    }
}

/// Reloads the configuration when a reference table's file changes (its
/// size or modification time, looked at every second) and then stays
/// still for a second (so that a file still being written is not read
/// half-way), as SIGHUP does: a table with a bad line is reported once per
/// change and the running one kept.
async fn reload_on_table_change(
    path: PathBuf,
    mut files: Vec<PathBuf>,
    reload: tokio::sync::mpsc::Sender<Config>,
) {
    let stamp = |files: &[PathBuf]| -> Vec<Option<(std::time::SystemTime, u64)>> {
        files
            .iter()
            .map(|f| {
                let m = std::fs::metadata(f).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    };
    let mut seen = stamp(&files);
    let mut changed = false;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = stamp(&files);
        if now != seen {
            // Changed: wait until it stays as it is for a tick.
            seen = now;
            changed = true;
            continue;
        }
        if !std::mem::take(&mut changed) {
            continue;
        }
        match Config::load(&path) {
            Ok(config) => {
                tracing::info!(config = %path.display(), "a table changed: reloading");
                files = config.watched_files();
                seen = stamp(&files);
                if reload.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!(
                "a table changed, but the configuration is rejected, keeping the current one: {e}"
            ),
        }
    }
}

/// `sluice outbox status|verify|dead-letters|retry|purge`.
fn outbox_command(action: OutboxAction, config: Option<PathBuf>) -> ExitCode {
    use sluice::store::outbox::Outbox;
    let Some(path) = config else {
        eprintln!("error: --config FILE is required");
        return ExitCode::from(2);
    };
    let config = match Config::read(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(o) = config.outbox else {
        eprintln!("error: {}: no [outbox] configured", path.display());
        return ExitCode::from(2);
    };
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    };
    // Inspecting opens the file read-only: it creates, upgrades and merges
    // nothing. Changing dead letters opens it as the agent does (without
    // moving a damaged file aside), beside a running agent if need be.
    let outbox = match &action {
        OutboxAction::Status | OutboxAction::Verify | OutboxAction::DeadLetters { .. } => {
            Outbox::open_read_only(&o.path)
        }
        OutboxAction::Retry { .. } | OutboxAction::Purge { .. } if !o.path.is_file() => {
            return fail(&format!("outbox {}: no such file", o.path.display()));
        }
        OutboxAction::Retry { .. } | OutboxAction::Purge { .. } | OutboxAction::Salvage { .. } => {
            Outbox::open(
                &o.path,
                o.durability,
                sluice::store::outbox::OnCorrupt::Refuse,
                o.max_records,
                o.max_bytes,
            )
            .map(|(outbox, _)| outbox)
        }
    };
    let mut outbox = match outbox {
        Ok(outbox) => outbox,
        Err(e) => return fail(&e),
    };
    let now = sluice_collectors::reading::now_ms();
    match action {
        OutboxAction::Status => match outbox.status() {
            Ok(s) => {
                let age = s.oldest_created_ms.map(|t| now - t);
                outln!("path: {}", o.path.display());
                outln!("epoch: {}", s.epoch);
                outln!("backlog: {} records, {} bytes", s.backlog, s.backlog_bytes);
                outln!(
                    "oldest: {}",
                    age.map_or("-".into(), |a| format!("{:.1} s ago", a as f64 / 1000.0))
                );
                outln!("next seq: {}", s.next_seq);
                outln!("dropped (outbox full): {}", s.dropped);
                outln!("downsampled (outbox full): {}", s.downsampled);
                outln!(
                    "dead letters: {} waiting, {} ever (sluice outbox dead-letters)",
                    s.dead_letters,
                    s.dead_lettered
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        OutboxAction::Verify => match outbox.verify() {
            Ok(checked) => {
                outln!(
                    "{}: integrity ok, {checked} record checksums ok",
                    o.path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: verify failed: {e}", o.path.display());
                ExitCode::FAILURE
            }
        },
        OutboxAction::DeadLetters { payload } => match outbox.dead_letters(usize::MAX >> 1) {
            Ok(letters) => {
                outln!("seq reason | topic | bytes | set aside");
                for d in &letters {
                    outln!(
                        "{} {} | {:?} | {} | {:.1} s ago",
                        d.seq,
                        d.reason,
                        d.topic,
                        d.payload.len(),
                        (now - d.failed_ms) as f64 / 1000.0
                    );
                    if payload {
                        outln!("  {}", String::from_utf8_lossy(&d.payload).escape_debug());
                    }
                }
                outln!("{} dead letter(s)", letters.len());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        OutboxAction::Retry { seqs, all } => {
            match outbox.retry_dead_letters((!all).then_some(&seqs[..]), now) {
                Ok(new) => {
                    outln!("{} dead letter(s) queued again as seq {:?}", new.len(), new);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        OutboxAction::Salvage { file } => {
            if file == o.path {
                return fail(
                    &"salvage reads another file (one moved aside), not the outbox itself",
                );
            }
            let report = match sluice::store::outbox::salvage_read(&file) {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match outbox.import(&report.records, now) {
                Ok(seqs) => {
                    outln!(
                        "{}: {} record(s) queued in {} (as seq {}), each keeping its identity there",
                        file.display(),
                        seqs.len(),
                        o.path.display(),
                        match (seqs.first(), seqs.last()) {
                            (Some(a), Some(b)) => format!("{a}..={b}"),
                            _ => "-".into(),
                        }
                    );
                    if !report.damaged.is_empty() {
                        outln!(
                            "{} damaged record(s) left behind (checksum mismatch): seq {:?}",
                            report.damaged.len(),
                            report.damaged
                        );
                    }
                    for (from, to) in &report.unreadable {
                        outln!("unreadable: seq {from}..={to}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        OutboxAction::Purge { seqs, all } => {
            match outbox.purge_dead_letters((!all).then_some(&seqs[..])) {
                Ok(n) => {
                    outln!("{n} dead letter(s) deleted");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

/// `pow` for the whole binary, from the `libm` crate (the Rust port of
/// musl's, within one unit in the last place), so that no call needs the C
/// library's libm.so: tokio's scheduler (`f64::powf`, once a batch of task
/// polls, for its poll-time average) was the binary's last import from it.
/// Without an import, the linker leaves libm.so.6 out and the process
/// neither loads nor relocates it, about 0.5 MiB of idle RSS
/// (tests/linkage.rs, benches/README.md "Footprint").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}
