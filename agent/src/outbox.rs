//! The outbox: aggregate records, durably queued in SQLite until the upstream
//! broker has acknowledged them.
//!
//! # Design constraints
//!
//! * Nothing committed is lost: a record is deleted only after the upstream
//!   broker's PUBACK for it. A crash (of the agent, or with `synchronous =
//!   "full"` of the machine) loses at most records not yet committed.
//! * No replay and no gap after a restart: the backlog is exactly the
//!   committed, unacknowledged records, sent again in `seq` order.
//! * Bounded: at most `max_records` records and about `max_bytes` of
//!   payload; past that the oldest records are dropped, or first merged
//!   into coarser windows (`on_full = "downsample"`; see `fn downsample`),
//!   and counted. A merge never loses or double-counts a reading.
//! * A damaged file never causes a crash loop: it is detected at open and
//!   moved aside (or, if so configured, the agent refuses to start). Only a
//!   file SQLite reports as damaged or not a database is moved aside; any
//!   other error at open (a lock, a permission, a directory at the path) is
//!   an error that names its cause, and the backlog stays where it is.
//! * One record never blocks the others: a record no broker can take (an
//!   invalid topic, too big, refused by the broker) or whose checksum does
//!   not match is moved to `dead_letters` ([`Outbox::set_aside`]), counted,
//!   and can be listed, sent again or purged (`sluice outbox …`).
//! * Identity: every record is `(agent, epoch, seq)` upstream. The epoch is
//!   random and new with every run of the agent ([`Outbox::begin_run`]), and
//!   stored with each record, so a new file, one moved aside, or one a power
//!   loss rolled back (whose seqs the next run hands out again) never reuses
//!   an identity upstream has seen.
//! * A record that may have left is never rewritten: the uplink marks the
//!   records it reads as `sent` in the same transaction, before it publishes
//!   them, and downsampling merges only records never sent.
//!
//! # On-disk layout
//!
//! ```sql
//! records(seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, payload BLOB, created_ms INTEGER,
//!         prev INTEGER,   -- seq of the record of the same topic appended just before
//!                         -- (-1: unknown, e.g. the first one after a restart)
//!         last INTEGER,   -- newest original seq a merged record holds (0: its own)
//!         checksum INTEGER, -- XXH3 of topic and payload (see record_checksum)
//!         epoch INTEGER,  -- the run that appended it (see begin_run)
//!         sent INTEGER,   -- 1 once the uplink has read it to publish it
//!         origin_seq INTEGER) -- salvaged from another file: its seq there
//!                             -- (upstream identity (epoch, origin_seq))
//! records_by_prev ON records(prev)                 -- downsampling's pairing
//! dead_letters(seq INTEGER PRIMARY KEY, topic, payload, created_ms, failed_ms, reason TEXT)
//! counters(name TEXT PRIMARY KEY, value INTEGER)   -- 'count', 'bytes' (running totals
//!         -- of records), 'dropped', 'downsampled', 'dead_lettered' (ever),
//!         -- 'generation' (see commit), 'epoch' (the newest run's)
//! checkpoints(worker INTEGER PRIMARY KEY, saved_ms, checksum, state BLOB, generation)
//! window_marks(series TEXT PRIMARY KEY, end_ms, generation)
//! ```
//!
//! `AUTOINCREMENT` makes `seq` strictly increasing for the life of the file,
//! even across deletes and restarts, and the epoch names the file, so that
//! `(agent_id, epoch, seq)` identifies a record upstream and lets it drop
//! duplicates (delivery is at least once). A file written by an earlier
//! release is upgraded in place at open: its rows get their checksums and an
//! epoch of their own.
//! The database runs in WAL mode; appends are batched in one transaction.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// `synchronous = NORMAL` in WAL mode: a commit survives the agent
    /// crashing (even `kill -9`); the last commits may be lost if the
    /// machine loses power.
    #[default]
    Normal,
    /// `synchronous = FULL`: a commit survives power loss, at the cost of an
    /// fsync per commit.
    Full,
}

/// What to do when the outbox file is damaged at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnCorrupt {
    /// Rename it to `<file>.corrupt-<ms>` and start a fresh outbox.
    #[default]
    MoveAside,
    /// Refuse to start.
    Refuse,
}

/// What to do when the outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Drop the oldest records (counted as `dropped`).
    #[default]
    DropOldest,
    /// Merge the oldest aggregate records of a series pairwise into coarser
    /// ones (counted as `downsampled`), so that old data gets coarser rather
    /// than vanishing; drop the oldest only when nothing is left to merge.
    Downsample,
}

/// One queued record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its sequence number.
    pub seq: i64,
    /// The epoch of the run that appended it.
    pub epoch: i64,
    /// The seq it is known by upstream: `seq`, or for a record salvaged
    /// from another file, its seq there.
    pub id_seq: i64,
    /// Where it goes.
    pub topic: String,
    /// Its body (a JSON object).
    pub payload: Vec<u8>,
    /// Whether topic and payload still match the checksum written with
    /// them (false: the file was damaged under the record).
    pub intact: bool,
}

impl Queued {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Queued> {
        let (seq, topic, payload, sum): (i64, String, Vec<u8>, Option<i64>) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        let intact = sum == Some(record_checksum(&topic, &payload));
        Ok(Queued {
            seq,
            epoch: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
            id_seq: r.get::<_, Option<i64>>(5)?.unwrap_or(seq),
            topic,
            payload,
            intact,
        })
    }
}

/// A record read from a damaged (moved-aside) outbox file by
/// [`salvage_read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Salvaged {
    /// Its seq in that file.
    pub seq: i64,
    /// Its epoch there (0 for a file from before epochs).
    pub epoch: i64,
    /// Where it goes.
    pub topic: String,
    /// Its body.
    pub payload: Vec<u8>,
}

/// What [`salvage_read`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SalvageReport {
    /// The records that read back whole (checksum matches, where the file
    /// has checksums).
    pub records: Vec<Salvaged>,
    /// Records read whose checksum did not match: left behind.
    pub damaged: Vec<i64>,
    /// Ranges of seqs that could not be read at all, `(from, to)`.
    pub unreadable: Vec<(i64, i64)>,
}

/// A row as `salvage_read` reads it: seq, topic, payload, checksum, epoch.
type RawRecord = (i64, String, Vec<u8>, Option<i64>, Option<i64>);

/// Reads what can be read of the records of the outbox file `path`, which
/// may be damaged (a file moved aside at open): read-only, changing
/// nothing; a range of rows SQLite cannot read is skipped, and reading goes
/// on past it.
pub fn salvage_read(path: &Path) -> Result<SalvageReport, OutboxError> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
    // The file as it is (its WAL too, if SQLite can use it); failing that,
    // the main file alone, ignoring the WAL and any lock.
    let uri = |extra: &str| format!("file:{}?mode=ro{extra}", path.display());
    let conn = Connection::open_with_flags(uri(""), flags)
        .and_then(|c| {
            c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |_| Ok(()))?;
            Ok(c)
        })
        .or_else(|_| Connection::open_with_flags(uri("&immutable=1"), flags))
        .map_err(|e| OutboxError(format!("{}: {e}", path.display())))?;
    let has = |column: &str| -> bool {
        conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('records') WHERE name = ?1",
            [column],
            |r| r.get(0),
        )
        .unwrap_or(false)
    };
    let (checksums, epochs) = (has("checksum"), has("epoch"));
    let file_epoch: i64 = conn
        .query_row("SELECT value FROM counters WHERE name = 'epoch'", [], |r| {
            r.get(0)
        })
        .unwrap_or(0);
    let max: i64 = conn
        .query_row("SELECT MAX(seq) FROM records", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .ok()
        .flatten()
        .or_else(|| {
            conn.query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
                [],
                |r| r.get(0),
            )
            .ok()
        })
        .ok_or_else(|| OutboxError(format!("{}: no readable records table", path.display())))?;
    let select = format!(
        "SELECT seq, topic, payload, {}, {} FROM records WHERE seq > ?1 ORDER BY seq LIMIT 256",
        if checksums { "checksum" } else { "NULL" },
        if epochs { "epoch" } else { "NULL" },
    );
    let mut report = SalvageReport::default();
    let mut after = 0i64;
    let mut step = 1i64;
    while after < max {
        let rows: Result<Vec<RawRecord>, _> = conn.prepare_cached(&select).and_then(|mut s| {
            s.query_map([after], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect()
        });
        match rows {
            Ok(rows) if rows.is_empty() => break,
            Ok(rows) => {
                step = 1;
                for (seq, topic, payload, sum, epoch) in rows {
                    after = seq;
                    if checksums && sum != Some(record_checksum(&topic, &payload)) {
                        report.damaged.push(seq);
                        continue;
                    }
                    report.records.push(Salvaged {
                        seq,
                        epoch: epoch.unwrap_or(file_epoch),
                        topic,
                        payload,
                    });
                }
            }
            Err(_) => {
                // Skip ahead past the damage, a growing stride at a time.
                let to = (after + step).min(max);
                match report.unreadable.last_mut() {
                    Some(last) if last.1 == after => last.1 = to,
                    _ => report.unreadable.push((after + 1, to)),
                }
                after = to;
                step = (step * 2).min(4096);
            }
        }
    }
    Ok(report)
}

/// A record set aside (see [`Outbox::set_aside`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The `seq` it had.
    pub seq: i64,
    /// Where it was to go.
    pub topic: String,
    /// Its body.
    pub payload: Vec<u8>,
    /// When it was appended, ms since the epoch.
    pub created_ms: i64,
    /// When it was set aside, ms since the epoch.
    pub failed_ms: i64,
    /// Why.
    pub reason: String,
}

/// The outbox's state, for `sluice outbox status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// Records waiting for acknowledgement.
    pub backlog: u64,
    /// Their payload bytes.
    pub backlog_bytes: u64,
    /// Creation time of the oldest waiting record, ms since the epoch.
    pub oldest_created_ms: Option<i64>,
    /// The `seq` the next record will get.
    pub next_seq: i64,
    /// Records dropped because the outbox was full, ever.
    pub dropped: u64,
    /// Records merged into an older one because the outbox was full, ever.
    pub downsampled: u64,
    /// Records set aside, waiting in `dead_letters` now.
    pub dead_letters: u64,
    /// Records set aside, ever.
    pub dead_lettered: u64,
    /// The newest run's epoch (see the module docs).
    pub epoch: i64,
}

/// What a [`Outbox::commit`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The `seq`s of the appended records.
    pub seqs: Vec<i64>,
    /// Records dropped to stay within the bounds.
    pub dropped: u64,
    /// Records merged into older ones to stay within the bounds.
    pub downsampled: u64,
}

/// An outbox error.
#[derive(Debug)]
pub struct OutboxError(pub String);

impl std::fmt::Display for OutboxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutboxError {}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError(e.to_string())
    }
}

/// Why a file could not be opened as an outbox.
enum OpenFailure {
    /// SQLite says the file is damaged or not a database: it may be moved
    /// aside.
    Damaged(String),
    /// Anything else (locked, no permission, not a file, a full disk): the
    /// file is left alone.
    Other(String),
}

impl From<rusqlite::Error> for OpenFailure {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
                OpenFailure::Damaged(e.to_string())
            }
            _ => OpenFailure::Other(e.to_string()),
        }
    }
}

/// What the OS says about `path` when SQLite could not open it: a directory
/// at the path, a missing directory, no permission.
fn os_cause(path: &Path) -> Option<String> {
    if path.is_dir() {
        return Some("it is a directory, not a file".into());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Some(format!("the directory {} does not exist", parent.display()));
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Some(e.to_string()),
        _ => None,
    }
}

/// Holds the state directory's lock (see [`Outbox::lock`]) until dropped.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl StateLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The outbox (see the module docs).
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    max_records: u64,
    max_bytes: u64,
    on_full: OnFull,
    /// Records the uplink has read and not had acknowledged: never merged.
    claimed: Claimed,
    /// Per topic, the seq of the newest record appended through this
    /// handle (each record's `prev`; see [`downsample`]).
    last_of_topic: std::collections::HashMap<String, i64>,
    /// The file's epoch.
    epoch: i64,
    /// `sent` marks that could not be written (see [`Outbox::peek_claim`]).
    mark_failures: u64,
}

/// Topics remembered for `prev` before the memory is cleared (which costs
/// only mergeability across that point).
const MAX_TOPICS: usize = 65_536;

/// The `seq`s the uplink of this process has read (to send, or sent) and
/// not had acknowledged: the records in flight now, which drop-oldest
/// leaves alone (their PUBACK removes them). What keeps downsampling off
/// records that may have left is the `sent` mark in the file, which also
/// holds across reconnects and restarts (see [`Outbox::peek_claim`]).
pub type Claimed = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<i64>>>;

impl Outbox {
    /// Opens (or creates) the outbox at `path`. A damaged file is handled as
    /// `on_corrupt` says; the returned string, if any, says what was done.
    pub fn open(
        path: &Path,
        durability: Durability,
        on_corrupt: OnCorrupt,
        max_records: u64,
        max_bytes: u64,
    ) -> Result<(Outbox, Option<String>), OutboxError> {
        let mut note = None;
        let other = |e: String| {
            OutboxError(match os_cause(path) {
                Some(cause) => format!("outbox {}: {cause} ({e})", path.display()),
                None => format!("outbox {}: {e}", path.display()),
            })
        };
        let conn = match Self::open_checked(path, durability) {
            Ok(conn) => conn,
            Err(OpenFailure::Other(e)) => return Err(other(e)),
            Err(OpenFailure::Damaged(e))
                if on_corrupt == OnCorrupt::MoveAside && path.is_file() =>
            {
                let aside = path
                    .with_extension(format!("corrupt-{}", sluice_collectors::reading::now_ms()));
                std::fs::rename(path, &aside).map_err(|io| {
                    OutboxError(format!(
                        "outbox {} is damaged ({e}) and cannot be moved aside: {io}",
                        path.display()
                    ))
                })?;
                for suffix in ["-wal", "-shm"] {
                    let side = PathBuf::from(format!("{}{suffix}", path.display()));
                    let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
                }
                note = Some(format!(
                    "outbox {} was damaged ({e}); moved aside to {} and started empty",
                    path.display(),
                    aside.display()
                ));
                Self::open_checked(path, durability).map_err(|f| match f {
                    OpenFailure::Damaged(e) | OpenFailure::Other(e) => other(e),
                })?
            }
            Err(OpenFailure::Damaged(e)) => {
                return Err(OutboxError(format!(
                    "outbox {} is damaged: {e}",
                    path.display()
                )));
            }
        };
        let epoch = counter(&conn, "epoch")?;
        Ok((
            Outbox {
                conn,
                path: path.to_owned(),
                max_records,
                max_bytes,
                on_full: OnFull::DropOldest,
                claimed: Claimed::default(),
                last_of_topic: Default::default(),
                epoch,
                mark_failures: 0,
            },
            note,
        ))
    }

    /// Takes the exclusive lock of the state file `path` (a file
    /// `<path>.lock` beside it, locked with `flock`), so that a second agent
    /// on the same state refuses to start instead of sharing the file. The
    /// lock goes with the process: a crash or `kill -9` releases it.
    pub fn lock(path: &Path) -> Result<StateLock, OutboxError> {
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| OutboxError(format!("lock file {}: {e}", lock_path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock {
                _file: file,
                path: lock_path,
            }),
            Err(std::fs::TryLockError::WouldBlock) => Err(OutboxError(format!(
                "{} is in use by another sluice process (lock file {} is held); \
                 stop it first, or give this one its own outbox path",
                path.display(),
                lock_path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(OutboxError(format!(
                "lock file {}: {e}",
                lock_path.display()
            ))),
        }
    }

    /// Opens an existing outbox for reading only, for `sluice outbox status`
    /// and `verify`: nothing is created, upgraded or merged (the WAL is left
    /// as it is). A missing file is an error.
    pub fn open_read_only(path: &Path) -> Result<Outbox, OutboxError> {
        if !path.is_file() {
            return Err(OutboxError(format!(
                "outbox {}: {}",
                path.display(),
                os_cause(path).unwrap_or_else(|| "no such file".into())
            )));
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| OutboxError(format!("outbox {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let epoch = counter(&conn, "epoch").unwrap_or(0);
        Ok(Outbox {
            conn,
            path: path.to_owned(),
            max_records: u64::MAX,
            max_bytes: u64::MAX,
            on_full: OnFull::DropOldest,
            claimed: Claimed::default(),
            last_of_topic: Default::default(),
            epoch,
            mark_failures: 0,
        })
    }

    /// The file's epoch (see the module docs; 0 for a file from before
    /// epochs, opened read-only).
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// What to do when full; `claimed` is shared with the uplink's outbox
    /// (see [`Claimed`]).
    pub fn with_on_full(mut self, on_full: OnFull, claimed: Claimed) -> Outbox {
        self.on_full = on_full;
        self.claimed = claimed;
        self
    }

    /// Up to `limit` waiting records with `after < seq < before`, in `seq`
    /// order, for the uplink to publish: marked `sent` in the file (so that
    /// downsampling never rewrites them, in this run or a later one) and
    /// added to `claimed` (in flight now: drop-oldest leaves them alone),
    /// both before they are returned.
    pub fn peek_claim(
        &mut self,
        after: i64,
        before: i64,
        limit: usize,
        claimed: &Claimed,
    ) -> Result<Vec<Queued>, OutboxError> {
        const SELECT: &str = "SELECT seq, topic, payload, checksum, epoch, origin_seq FROM records
             WHERE seq > ?1 AND seq < ?2 ORDER BY seq LIMIT ?3";
        // Nothing waiting (the live lane's usual look): no write lock.
        let any: bool = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM records WHERE seq > ?1 AND seq < ?2)")?
            .query_row(params![after, before], |r| r.get(0))?;
        if !any {
            return Ok(Vec::new());
        }
        // The write lock first, then the claimed set: the order the writer
        // takes them in.
        let tx = write_transaction(&mut self.conn)?;
        let rows: Vec<Queued> = tx
            .prepare_cached(SELECT)?
            .query_map(params![after, before, limit as i64], Queued::from_row)?
            .collect::<Result<_, _>>()?;
        let mut claimed = claimed
            .lock()
            .map_err(|_| OutboxError("claimed set poisoned".into()))?;
        let marked = match (rows.first(), rows.last()) {
            (Some(first), Some(last)) => tx
                .prepare_cached(
                    "UPDATE records SET sent = 1 WHERE seq BETWEEN ?1 AND ?2 AND sent = 0",
                )
                .and_then(|mut mark| mark.execute(params![first.seq, last.seq]))
                .and_then(|_| tx.commit()),
            _ => tx.commit(),
        };
        // A full disk cannot take the mark: the records are still sent, and
        // the claim (which downsampling also honours) keeps them whole for
        // the life of this process.
        if marked.is_ok() && !rows.is_empty() {
            crate::crash::point("send.after_mark");
        }
        if let Err(e) = marked {
            self.mark_failures += 1;
            if self.mark_failures == 1 {
                tracing::warn!(error = %e, "outbox: cannot mark records as sent (disk full?); they stay claimed in memory");
            }
        }
        claimed.extend(rows.iter().map(|r| r.seq));
        Ok(rows)
    }

    /// Starts a new run: a new random epoch for the records appended from
    /// now on through this handle (see the module docs). The agent calls it
    /// once at start, on the writer's handle.
    pub fn begin_run(&mut self) -> Result<i64, OutboxError> {
        let epoch = new_epoch();
        self.conn.execute(
            "UPDATE counters SET value = ?1 WHERE name = 'epoch'",
            [epoch],
        )?;
        self.epoch = epoch;
        Ok(epoch)
    }

    fn open_checked(path: &Path, durability: Durability) -> Result<Connection, OpenFailure> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenFailure::Other(format!(
                "cannot use WAL mode (got {mode})"
            )));
        }
        // The WAL is bounded: checkpointed every 256 pages (about 1 MiB) and
        // cut back to 1 MiB after a checkpoint, so that it cannot take the
        // last free megabytes of a small volume between checkpoints.
        conn.pragma_update(None, "wal_autocheckpoint", 256)?;
        conn.pragma_update(None, "journal_size_limit", 1 << 20)?;
        conn.pragma_update(
            None,
            "synchronous",
            match durability {
                Durability::Normal => "NORMAL",
                Durability::Full => "FULL",
            },
        )?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(OpenFailure::Damaged(format!(
                "integrity check failed: {check}"
            )));
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 created_ms INTEGER NOT NULL,
                 prev INTEGER NOT NULL DEFAULT -1,
                 last INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS checkpoints (
                 worker INTEGER PRIMARY KEY,
                 saved_ms INTEGER NOT NULL,
                 checksum INTEGER NOT NULL,
                 state BLOB NOT NULL,
                 generation INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS window_marks (
                 series TEXT PRIMARY KEY,
                 end_ms INTEGER NOT NULL,
                 generation INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS dead_letters (
                 seq INTEGER PRIMARY KEY,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 created_ms INTEGER NOT NULL,
                 failed_ms INTEGER NOT NULL,
                 reason TEXT NOT NULL);",
        )?;
        // Columns added since the first release, with defaults for older
        // rows: checkpoints and marks from then count as generation 0 (older
        // than any checkpoint since), and records from then have no known
        // predecessor (they are never merged).
        for (table, column, default) in [
            ("checkpoints", "generation", 0),
            ("window_marks", "generation", 0),
            ("records", "prev", -1),
            ("records", "last", 0),
        ] {
            let has: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )?;
            if !has {
                conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT {default}"
                ))?;
            }
        }
        // Record checksums, since 0.2: rows from before get theirs computed
        // now, once (what they hold is taken as it is).
        let has: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('records') WHERE name = 'checksum'",
            [],
            |r| r.get(0),
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO counters (name, value) VALUES ('epoch', ?1)",
            [new_epoch()],
        )?;
        if !has {
            let tx = write_transaction(&mut conn)?;
            tx.execute_batch(
                "ALTER TABLE records ADD COLUMN checksum INTEGER;
                 ALTER TABLE records ADD COLUMN epoch INTEGER;
                 ALTER TABLE records ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;
                 UPDATE records SET epoch = (SELECT value FROM counters WHERE name = 'epoch');",
            )?;
            {
                let mut rows = tx.prepare("SELECT seq, topic, payload FROM records")?;
                let mut set = tx.prepare("UPDATE records SET checksum = ?2 WHERE seq = ?1")?;
                let all: Vec<(i64, String, Vec<u8>)> = rows
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                for (seq, topic, payload) in all {
                    set.execute(params![seq, record_checksum(&topic, &payload)])?;
                }
            }
            tx.commit()?;
        }
        // The running totals (kept in the same transactions as the records,
        // so that every connection to the file sees the same ones); counted
        // once if the file has none yet.
        conn.execute(
            "INSERT OR IGNORE INTO counters (name, value) SELECT 'count', COUNT(*) FROM records",
            [],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO counters (name, value) SELECT 'bytes', COALESCE(SUM(LENGTH(payload)), 0) FROM records",
            [],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0), ('downsampled', 0), ('generation', 0), ('dead_lettered', 0)",
            [],
        )?;
        let has_origin: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('records') WHERE name = 'origin_seq'",
            [],
            |r| r.get(0),
        )?;
        if !has_origin {
            conn.execute_batch("ALTER TABLE records ADD COLUMN origin_seq INTEGER")?;
        }
        conn.execute_batch("CREATE INDEX IF NOT EXISTS records_by_prev ON records(prev)")?;
        Ok(conn)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends records in one transaction; returns their `seq`s. Past the
    /// bound, the oldest records are dropped in the same transaction. The
    /// bound is checked against running totals, so an append costs the same
    /// whatever the backlog.
    pub fn append(
        &mut self,
        records: &[(String, Vec<u8>)],
        now_ms: i64,
    ) -> Result<Vec<i64>, OutboxError> {
        Ok(self.commit(records, &[], &[], now_ms)?.seqs)
    }

    /// [`Self::append`], and in the same transaction: per series, the end of
    /// the newest window emitted (`marks`), and worker checkpoints
    /// (`(worker, state)`, each replacing that worker's last one). A
    /// checkpoint thus commits together with every record emitted before it.
    ///
    /// Marks are pruned here too: each mark and checkpoint carries the
    /// generation (a counter of such commits) that wrote it, and a mark
    /// older than every saved checkpoint is dropped, because each worker's
    /// state has since been saved with that window already closed. So the
    /// table holds the series emitted since the oldest checkpoint, not every
    /// series ever seen.
    pub fn commit(
        &mut self,
        records: &[(String, Vec<u8>)],
        marks: &[(String, i64)],
        checkpoints: &[(usize, Vec<u8>)],
        now_ms: i64,
    ) -> Result<Committed, OutboxError> {
        let tx = write_transaction(&mut self.conn)?;
        if !marks.is_empty() || !checkpoints.is_empty() {
            add_counter(&tx, "generation", 1)?;
            let generation = counter(&tx, "generation")?;
            if !marks.is_empty() {
                let mut mark = tx.prepare_cached(
                    "INSERT INTO window_marks (series, end_ms, generation) VALUES (?1, ?2, ?3)
                     ON CONFLICT (series) DO UPDATE
                     SET end_ms = MAX(end_ms, excluded.end_ms), generation = excluded.generation",
                )?;
                for (series, end) in marks {
                    mark.execute(params![series, end, generation])?;
                }
            }
            if !checkpoints.is_empty() {
                let mut save = tx.prepare_cached(
                    "INSERT OR REPLACE INTO checkpoints (worker, saved_ms, checksum, state, generation)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (worker, state) in checkpoints {
                    save.execute(params![
                        *worker as i64,
                        now_ms,
                        checksum(state),
                        state,
                        generation
                    ])?;
                }
                tx.execute(
                    "DELETE FROM window_marks WHERE generation < (SELECT MIN(generation) FROM checkpoints)",
                    [],
                )?;
            }
        }
        let mut seqs = Vec::with_capacity(records.len());
        let mut added_bytes = 0i64;
        // Applied to `last_of_topic` only once the transaction commits.
        let mut newest: std::collections::HashMap<&str, i64> = Default::default();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (topic, payload, created_ms, prev, checksum, epoch)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (topic, payload) in records {
                let prev = newest
                    .get(topic.as_str())
                    .or_else(|| self.last_of_topic.get(topic))
                    .copied()
                    .unwrap_or(-1);
                insert.execute(params![
                    topic,
                    payload,
                    now_ms,
                    prev,
                    record_checksum(topic, payload),
                    self.epoch
                ])?;
                let seq = tx.last_insert_rowid();
                newest.insert(topic, seq);
                seqs.push(seq);
                added_bytes += payload.len() as i64;
            }
        }
        add_counter(&tx, "count", seqs.len() as i64)?;
        add_counter(&tx, "bytes", added_bytes)?;
        let (mut count, mut bytes) = (counter(&tx, "count")? as u64, counter(&tx, "bytes")? as u64);
        let mut downsampled = 0;
        if self.on_full == OnFull::Downsample
            && (count > self.max_records || bytes > self.max_bytes)
        {
            // Only records never sent are merged (the `sent` mark commits
            // before the uplink publishes, under the same write lock), and
            // none claimed in memory (whose mark a full disk refused).
            let claimed = self
                .claimed
                .lock()
                .map_err(|_| OutboxError("claimed set poisoned".into()))?
                .clone();
            downsampled = downsample(
                &tx,
                &claimed,
                &mut count,
                &mut bytes,
                self.max_records,
                self.max_bytes,
            )?;
            add_counter(&tx, "downsampled", downsampled as i64)?;
        }
        let mut dropped = 0i64;
        if count > self.max_records || bytes > self.max_bytes {
            // Drop the oldest until both bounds hold, except records in
            // flight now (their PUBACK will remove them: they are being
            // delivered, not dropped).
            let in_flight = self
                .claimed
                .lock()
                .map_err(|_| OutboxError("claimed set poisoned".into()))?
                .clone();
            let mut oldest = tx.prepare_cached(
                "SELECT seq, LENGTH(payload) FROM records WHERE seq > ?1 ORDER BY seq LIMIT 256",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
            let mut after = 0;
            'drop: while count > self.max_records || bytes > self.max_bytes {
                let rows: Vec<(i64, i64)> = oldest
                    .query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                if rows.is_empty() {
                    break;
                }
                for (seq, len) in rows {
                    after = seq;
                    if in_flight.contains(&seq) {
                        continue;
                    }
                    delete.execute([seq])?;
                    count -= 1;
                    bytes = bytes.saturating_sub(len as u64);
                    dropped += 1;
                    add_counter(&tx, "bytes", -len)?;
                    if count <= self.max_records && bytes <= self.max_bytes {
                        break 'drop;
                    }
                }
            }
            drop((oldest, delete));
            add_counter(&tx, "count", -dropped)?;
            add_counter(&tx, "dropped", dropped)?;
        }
        if downsampled > 0 {
            crate::crash::point("downsample.before_commit");
        }
        if !records.is_empty() {
            crate::crash::point("append.before_commit");
        }
        tx.commit()?;
        if !records.is_empty() {
            crate::crash::point("append.after_commit");
        }
        if !checkpoints.is_empty() {
            crate::crash::point("checkpoint.after_commit");
        }
        if self.last_of_topic.len() + newest.len() > MAX_TOPICS {
            self.last_of_topic.clear();
        }
        for (topic, seq) in newest {
            match self.last_of_topic.get_mut(topic) {
                Some(last) => *last = seq,
                None => {
                    self.last_of_topic.insert(topic.to_owned(), seq);
                }
            }
        }
        Ok(Committed {
            seqs,
            dropped: dropped as u64,
            downsampled,
        })
    }

    /// Up to `limit` waiting records with `seq > after`, in `seq` order.
    pub fn peek(&self, after: i64, limit: usize) -> Result<Vec<Queued>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, topic, payload, checksum, epoch, origin_seq FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], Queued::from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes acknowledged records: one range delete per run of
    /// consecutive `seq`s (PUBACKs come nearly in order, so a batch is
    /// usually one run).
    pub fn ack(&mut self, seqs: &[i64]) -> Result<(), OutboxError> {
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let tx = write_transaction(&mut self.conn)?;
        let (mut removed, mut removed_bytes) = (0i64, 0i64);
        {
            let mut measure = tx.prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records WHERE seq BETWEEN ?1 AND ?2",
            )?;
            let mut delete =
                tx.prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2")?;
            let mut i = 0;
            while i < sorted.len() {
                let mut j = i;
                while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
                    j += 1;
                }
                let (from, to) = (sorted[i], sorted[j]);
                let (n, bytes): (i64, i64) =
                    measure.query_row(params![from, to], |r| Ok((r.get(0)?, r.get(1)?)))?;
                if n > 0 {
                    delete.execute(params![from, to])?;
                    removed += n;
                    removed_bytes += bytes;
                }
                i = j + 1;
            }
        }
        add_counter(&tx, "count", -removed)?;
        add_counter(&tx, "bytes", -removed_bytes)?;
        tx.commit()?;
        Ok(())
    }

    /// The outbox's state (constant time: running totals and the oldest row).
    pub fn status(&self) -> Result<Status, OutboxError> {
        let oldest_created_ms: Option<i64> = self
            .conn
            .query_row(
                "SELECT created_ms FROM records ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let last: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(Status {
            backlog: counter(&self.conn, "count")? as u64,
            backlog_bytes: counter(&self.conn, "bytes")? as u64,
            oldest_created_ms,
            next_seq: last.unwrap_or(0) + 1,
            dropped: counter(&self.conn, "dropped")? as u64,
            downsampled: counter(&self.conn, "downsampled")? as u64,
            dead_letters: self.dead_letter_count()?,
            dead_lettered: counter(&self.conn, "dead_lettered").unwrap_or(0) as u64,
            epoch: self.epoch,
        })
    }

    fn has_table(&self, name: &str) -> Result<bool, OutboxError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get(0),
        )?)
    }

    /// Moves the waiting record `seq` to `dead_letters` with `reason`, so
    /// that the records behind it go on (see the module docs). `false` if
    /// it was not waiting (acknowledged, dropped, or set aside already).
    pub fn set_aside(&mut self, seq: i64, reason: &str, now_ms: i64) -> Result<bool, OutboxError> {
        let tx = write_transaction(&mut self.conn)?;
        let moved = tx.execute(
            "INSERT OR REPLACE INTO dead_letters (seq, topic, payload, created_ms, failed_ms, reason)
             SELECT seq, topic, payload, created_ms, ?2, ?3 FROM records WHERE seq = ?1",
            params![seq, now_ms, reason],
        )?;
        if moved > 0 {
            let len: i64 = tx.query_row(
                "DELETE FROM records WHERE seq = ?1 RETURNING LENGTH(payload)",
                [seq],
                |r| r.get(0),
            )?;
            add_counter(&tx, "count", -1)?;
            add_counter(&tx, "bytes", -len)?;
            add_counter(&tx, "dead_lettered", 1)?;
        }
        tx.commit()?;
        Ok(moved > 0)
    }

    /// How many records wait in the dead letters.
    pub fn dead_letter_count(&self) -> Result<u64, OutboxError> {
        if !self.has_table("dead_letters")? {
            return Ok(0);
        }
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// The records set aside, oldest first (at most `limit`).
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        if !self.has_table("dead_letters")? {
            return Ok(Vec::new());
        }
        let mut stmt = self.conn.prepare(
            "SELECT seq, topic, payload, created_ms, failed_ms, reason FROM dead_letters ORDER BY seq LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(DeadLetter {
                seq: r.get(0)?,
                topic: r.get(1)?,
                payload: r.get(2)?,
                created_ms: r.get(3)?,
                failed_ms: r.get(4)?,
                reason: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Queues the dead letters `seqs` (every one if `None`) again, as new
    /// records with new `seq`s at the end of the outbox (for a record the
    /// broker refused for a reason since fixed, say); returns the new seqs.
    /// A record that still cannot be sent is set aside again.
    pub fn retry_dead_letters(
        &mut self,
        seqs: Option<&[i64]>,
        now_ms: i64,
    ) -> Result<Vec<i64>, OutboxError> {
        let chosen: Vec<DeadLetter> = self
            .dead_letters(usize::MAX >> 1)?
            .into_iter()
            .filter(|d| seqs.is_none_or(|s| s.contains(&d.seq)))
            .collect();
        let records: Vec<(String, Vec<u8>)> = chosen
            .iter()
            .map(|d| (d.topic.clone(), d.payload.clone()))
            .collect();
        let done = self.commit(&records, &[], &[], now_ms)?;
        let tx = write_transaction(&mut self.conn)?;
        {
            let mut delete = tx.prepare("DELETE FROM dead_letters WHERE seq = ?1")?;
            for d in &chosen {
                delete.execute([d.seq])?;
            }
        }
        tx.commit()?;
        Ok(done.seqs)
    }

    /// Appends records salvaged from another outbox file (see
    /// [`salvage_read`]) in one transaction, each keeping its identity
    /// there, `(epoch, seq)`, for upstream: a record upstream already holds
    /// is dropped there as a duplicate, and salvaging a file twice is
    /// harmless. Returns the new local seqs.
    pub fn import(&mut self, records: &[Salvaged], now_ms: i64) -> Result<Vec<i64>, OutboxError> {
        let tx = write_transaction(&mut self.conn)?;
        let mut seqs = Vec::with_capacity(records.len());
        let mut bytes = 0i64;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (topic, payload, created_ms, prev, checksum, epoch, origin_seq)
                 VALUES (?1, ?2, ?3, -1, ?4, ?5, ?6)",
            )?;
            for r in records {
                insert.execute(params![
                    r.topic,
                    r.payload,
                    now_ms,
                    record_checksum(&r.topic, &r.payload),
                    r.epoch,
                    r.seq
                ])?;
                seqs.push(tx.last_insert_rowid());
                bytes += r.payload.len() as i64;
            }
        }
        add_counter(&tx, "count", seqs.len() as i64)?;
        add_counter(&tx, "bytes", bytes)?;
        tx.commit()?;
        Ok(seqs)
    }

    /// Deletes the dead letters `seqs` (every one if `None`); returns how
    /// many there were.
    pub fn purge_dead_letters(&mut self, seqs: Option<&[i64]>) -> Result<usize, OutboxError> {
        let tx = write_transaction(&mut self.conn)?;
        let n = match seqs {
            None => tx.execute("DELETE FROM dead_letters", [])?,
            Some(seqs) => {
                let mut delete = tx.prepare("DELETE FROM dead_letters WHERE seq = ?1")?;
                let mut n = 0;
                for seq in seqs {
                    n += delete.execute([seq])?;
                }
                n
            }
        };
        tx.commit()?;
        Ok(n)
    }

    /// Records waiting (one lookup of the running total).
    pub fn backlog(&self) -> Result<u64, OutboxError> {
        Ok(counter(&self.conn, "count")? as u64)
    }

    /// SQLite's full `integrity_check`, then every waiting record's
    /// checksum: `Ok(records checked)` or the problems found. Changes
    /// nothing (open the file with [`Outbox::open_read_only`]).
    pub fn verify(&self) -> Result<u64, OutboxError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let mut problems: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if problems == ["ok"] {
            problems.clear();
        }
        let has_checksums: bool = self.conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('records') WHERE name = 'checksum'",
            [],
            |r| r.get(0),
        )?;
        let mut checked = 0;
        if has_checksums {
            let mut stmt = self.conn.prepare(
                "SELECT seq, topic, payload, checksum, epoch, origin_seq FROM records ORDER BY seq",
            )?;
            let mut damaged = Vec::new();
            for row in stmt.query_map([], Queued::from_row)? {
                match row {
                    Ok(q) if q.intact => checked += 1,
                    Ok(q) => damaged.push(q.seq),
                    Err(e) => problems.push(format!("unreadable record: {e}")),
                }
            }
            if !damaged.is_empty() {
                problems.push(format!(
                    "{} record(s) whose checksum does not match (seq {}); the agent sets them aside instead of sending them",
                    damaged.len(),
                    damaged
                        .iter()
                        .take(20)
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if problems.is_empty() {
            Ok(checked)
        } else {
            Err(OutboxError(problems.join("; ")))
        }
    }
}

/// A record as downsampling sees it.
struct Row {
    seq: i64,
    topic: String,
    payload: Vec<u8>,
    /// The newest original record it holds (itself, unless merged).
    last: i64,
}

/// Merges the oldest records never sent pairwise with their successors, in
/// passes, until the bounds hold or nothing is left to merge. A record's
/// successor is the record of its topic appended right after it (its `prev`
/// is the first's `last`), found through the `records_by_prev` index, so
/// pairs are found however many series interleave: a record of the topic
/// deleted in between (one the live lane delivered before older ones, say)
/// leaves no successor, and a merged window never spans one already
/// delivered. A record sent (or being sent) is never merged, nor merged
/// into. Each pass looks at most at the [`DOWNSAMPLE_SCAN`] oldest unsent
/// records, so that a full outbox with nothing to merge costs an append a
/// bounded scan before the caller drops. Returns the number of records
/// merged away.
fn downsample(
    tx: &Connection,
    claimed: &std::collections::HashSet<i64>,
    count: &mut u64,
    bytes: &mut u64,
    max_records: u64,
    max_bytes: u64,
) -> Result<u64, rusqlite::Error> {
    let row = |r: &rusqlite::Row<'_>| {
        let (seq, last): (i64, i64) = (r.get(0)?, r.get(4)?);
        Ok(Row {
            seq,
            topic: r.get(1)?,
            payload: r.get(2)?,
            last: if last == 0 { seq } else { last },
        })
    };
    let mut merged_away = 0;
    let mut select = tx.prepare_cached(
        "SELECT seq, topic, payload, prev, last FROM records WHERE sent = 0 ORDER BY seq LIMIT ?1",
    )?;
    let mut successor = tx.prepare_cached(
        "SELECT seq, topic, payload, prev, last FROM records
         WHERE prev = ?1 AND topic = ?2 AND sent = 0 AND seq > ?1",
    )?;
    let mut update = tx.prepare_cached(
        "UPDATE records SET payload = ?2, last = ?3, checksum = ?4 WHERE seq = ?1",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
    while *count > max_records || *bytes > max_bytes {
        let rows: Vec<Row> = select
            .query_map(params![DOWNSAMPLE_SCAN], row)?
            .collect::<Result<_, _>>()?;
        // Records merged in this pass (as either side): one merge each per
        // pass, so that windows coarsen evenly, pass by pass.
        let mut touched = std::collections::HashSet::new();
        let mut progress = false;
        for first in &rows {
            if *count <= max_records && *bytes <= max_bytes {
                break;
            }
            if touched.contains(&first.seq) || claimed.contains(&first.seq) {
                continue;
            }
            let Some(second) = successor
                .query_map(params![first.last, first.topic], row)?
                .next()
                .transpose()?
            else {
                continue;
            };
            if touched.contains(&second.seq) || claimed.contains(&second.seq) {
                continue;
            }
            let Some(merged) = merge_aggregates(&first.payload, &second.payload) else {
                continue;
            };
            update.execute(params![
                first.seq,
                merged,
                second.last,
                record_checksum(&first.topic, &merged)
            ])?;
            delete.execute(params![second.seq])?;
            touched.extend([first.seq, second.seq]);
            let delta = merged.len() as i64 - (first.payload.len() + second.payload.len()) as i64;
            add_counter(tx, "bytes", delta)?;
            add_counter(tx, "count", -1)?;
            *bytes = (*bytes as i64 + delta).max(0) as u64;
            *count -= 1;
            merged_away += 1;
            progress = true;
        }
        if !progress {
            break;
        }
    }
    Ok(merged_away)
}

/// How many of the oldest unsent records one downsampling pass looks at.
const DOWNSAMPLE_SCAN: i64 = 4096;

/// Two aggregate records of one series (JSON, as the workers write them),
/// `a` older than `b`, merged into one over both windows by the core's own
/// merge (`sluice_core::aggregate`): counts and sums add, min and max
/// combine, mean and standard deviation by Chan's parallel formulas, first
/// from `a` and last from `b`. Counts are already weighted (a sampled
/// reading counts as the readings it stands for), so a merge of sampled
/// windows stays an unbiased estimate; their `count_stderr`s combine as
/// independent errors and `sampled_one_in` keeps the larger rate.
/// Quantiles cannot be merged from their values and are left out;
/// `downsampled` counts the original windows in it. `None` unless both are
/// aggregates, and `None` if `b` starts before `a` ends: overlapping windows
/// (hopping ones, say) share readings, and adding their counts would count
/// those twice, so such records are left to be dropped (and counted)
/// instead.
pub fn merge_aggregates(a: &[u8], b: &[u8]) -> Option<Vec<u8>> {
    use serde_json::{Map, Value};
    use sluice_core::aggregate::{Accumulator, Aggregate, Point};
    let parse = |bytes: &[u8]| -> Option<Map<String, Value>> {
        match serde_json::from_slice(bytes).ok()? {
            Value::Object(m) if m.contains_key("count") && m.contains_key("start") => Some(m),
            _ => None,
        }
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a.get("series") != b.get("series") {
        return None;
    }
    let f = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_f64);
    if f(&b, "start")? < f(&a, "end")? {
        return None;
    }
    // The core's aggregate of a record (first at its start, last just
    // before its end: a comes before b).
    let rebuild = |m: &Map<String, Value>| -> Option<Aggregate> {
        let (start, end) = (f(m, "start")? as i64, f(m, "end")? as i64);
        let count = m.get("count")?.as_u64()?;
        let mean = f(m, "mean")?;
        Aggregate::from_summary(
            count,
            f(m, "sum")?,
            mean,
            f(m, "stddev").map_or(0.0, |s| s * s),
            f(m, "min").unwrap_or(mean),
            f(m, "max").unwrap_or(mean),
            Point {
                ts: start,
                value: f(m, "first").unwrap_or(mean),
            },
            Point {
                ts: end.saturating_sub(1).max(start),
                value: f(m, "last").unwrap_or(mean),
            },
        )
    };
    let mut merged = rebuild(&a)?;
    merged.merge(&rebuild(&b)?);
    let mut out = b.clone();
    let num = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    let opt = |x: Option<f64>| x.map_or(Value::Null, num);
    out.insert("count".into(), Value::from(merged.count()));
    out.insert("sum".into(), num(merged.sum()));
    out.insert("mean".into(), opt(merged.mean()));
    out.insert("stddev".into(), opt(merged.stddev()));
    out.insert("min".into(), opt(merged.min()));
    out.insert("max".into(), opt(merged.max()));
    out.insert("first".into(), opt(merged.first().map(|p| p.value)));
    out.insert("last".into(), opt(merged.last().map(|p| p.value)));
    out.insert("start".into(), a["start"].clone());
    out.insert("end".into(), b["end"].clone());
    out.insert(
        "late".into(),
        Value::from((f(&a, "late").unwrap_or(0.0) + f(&b, "late").unwrap_or(0.0)) as u64),
    );
    let flag = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
    out.insert(
        "partial".into(),
        Value::Bool(flag(&a, "partial") || flag(&b, "partial")),
    );
    if let (Some(why), None) = (a.get("partial_reason"), out.get("partial_reason")) {
        out.insert("partial_reason".into(), why.clone());
    }
    let rate = match (f(&a, "sampled_one_in"), f(&b, "sampled_one_in")) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    if let Some(k) = rate.filter(|k| k.is_finite()) {
        out.insert("sampled_one_in".into(), Value::from(k as u64));
    }
    let (ea, eb) = (f(&a, "count_stderr"), f(&b, "count_stderr"));
    if ea.is_some() || eb.is_some() {
        let (ea, eb) = (ea.unwrap_or(0.0), eb.unwrap_or(0.0));
        out.insert("count_stderr".into(), num((ea * ea + eb * eb).sqrt()));
    }
    out.remove("quantiles");
    let windows =
        |m: &Map<String, Value>| m.get("downsampled").and_then(Value::as_u64).unwrap_or(1);
    out.insert("downsampled".into(), Value::from(windows(&a) + windows(&b)));
    serde_json::to_vec(&Value::Object(out)).ok()
}

/// A transaction that takes the write lock at once (BEGIN IMMEDIATE),
/// waiting for it under the busy timeout. A deferred one that reads
/// first and writes second fails at once with "database is locked" if the
/// other connection committed in between (SQLite cannot upgrade a stale
/// read snapshot, and does not call the busy handler for it).
fn write_transaction(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, rusqlite::Error> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

fn counter(conn: &Connection, name: &str) -> Result<i64, rusqlite::Error> {
    conn.query_row(
        "SELECT value FROM counters WHERE name = ?1",
        params![name],
        |r| r.get(0),
    )
}

fn add_counter(conn: &Connection, name: &str, delta: i64) -> Result<(), rusqlite::Error> {
    conn.execute(
        "UPDATE counters SET value = value + ?2 WHERE name = ?1",
        params![name, delta],
    )?;
    Ok(())
}

/// A saved worker checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedCheckpoint {
    /// The worker that saved it.
    pub worker: usize,
    /// When, ms since the epoch.
    pub saved_ms: i64,
    /// The state (`Err`: the checksum did not match).
    pub state: Result<Vec<u8>, String>,
}

impl Outbox {
    /// Every saved checkpoint, and the window marks (series → end of the
    /// newest window emitted since the oldest checkpoint).
    pub fn checkpoints(
        &self,
    ) -> Result<(Vec<SavedCheckpoint>, std::collections::HashMap<String, i64>), OutboxError> {
        let mut stmt = self
            .conn
            .prepare("SELECT worker, saved_ms, checksum, state FROM checkpoints ORDER BY worker")?;
        let saved = stmt
            .query_map([], |r| {
                let (worker, saved_ms, sum, state): (i64, i64, i64, Vec<u8>) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                Ok(SavedCheckpoint {
                    worker: worker as usize,
                    saved_ms,
                    state: if checksum(&state) == sum {
                        Ok(state)
                    } else {
                        Err(format!("checkpoint of worker {worker}: checksum mismatch"))
                    },
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self
            .conn
            .prepare("SELECT series, end_ms FROM window_marks")?;
        let marks = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok((saved, marks))
    }

    /// Replaces every checkpoint with `checkpoints`, in one transaction (at
    /// start, when the state was redistributed over a new number of workers).
    /// They count as generation 0: the marks stay until every worker has
    /// saved a checkpoint of its own, because these rows hold state from
    /// before the marks were applied.
    pub fn replace_checkpoints(
        &mut self,
        checkpoints: &[(usize, Vec<u8>)],
        now_ms: i64,
    ) -> Result<(), OutboxError> {
        let tx = write_transaction(&mut self.conn)?;
        tx.execute("DELETE FROM checkpoints", [])?;
        {
            let mut save = tx.prepare_cached(
                "INSERT INTO checkpoints (worker, saved_ms, checksum, state) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (worker, state) in checkpoints {
                save.execute(params![*worker as i64, now_ms, checksum(state), state])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether the agent that used the file last stopped cleanly (its final
    /// checkpoints committed; see [`Outbox::mark_clean_stop`]), and from now
    /// on, until that is called again, that it did not: a crash leaves it so.
    /// A file from a release before this flag counts as not clean.
    pub fn take_clean_stop(&mut self) -> Result<bool, OutboxError> {
        let clean = self
            .conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'clean_stop'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            == Some(1);
        self.conn.execute(
            "INSERT INTO counters (name, value) VALUES ('clean_stop', 0)
             ON CONFLICT (name) DO UPDATE SET value = 0",
            [],
        )?;
        Ok(clean)
    }

    /// Records that the agent stopped cleanly: everything it had to save
    /// (final checkpoints included) is committed.
    pub fn mark_clean_stop(&mut self) -> Result<(), OutboxError> {
        self.conn.execute(
            "INSERT INTO counters (name, value) VALUES ('clean_stop', 1)
             ON CONFLICT (name) DO UPDATE SET value = 1",
            [],
        )?;
        Ok(())
    }

    /// Deletes every checkpoint and window mark (when checkpoints are off);
    /// returns how many checkpoints there were.
    pub fn discard_checkpoints(&mut self) -> Result<usize, OutboxError> {
        let tx = write_transaction(&mut self.conn)?;
        let n = tx.execute("DELETE FROM checkpoints", [])?;
        tx.execute("DELETE FROM window_marks", [])?;
        tx.commit()?;
        Ok(n)
    }
}

/// A checkpoint's checksum: XXH3 (64 bits, stored as SQLite's signed integer).
fn checksum(state: &[u8]) -> i64 {
    sluice_core::hash::hash64(state, 0x5e55_10c4) as i64
}

/// A record's checksum: XXH3 of its payload, seeded with the XXH3 of its
/// topic (stored as SQLite's signed integer).
pub fn record_checksum(topic: &str, payload: &[u8]) -> i64 {
    let seed = sluice_core::hash::hash64(topic.as_bytes(), 0x0b0c_5eed);
    sluice_core::hash::hash64(payload, seed) as i64
}

/// A new epoch: 53 random bits (an integer any JSON reader holds exactly),
/// never 0.
fn new_epoch() -> i64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !random {
        // No /dev/urandom: the clock, the process and a stack address.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let here = &bytes as *const _ as u64;
        bytes = sluice_core::hash::hash64(
            &[
                now.to_le_bytes(),
                u64::from(std::process::id()).to_le_bytes(),
                here.to_le_bytes(),
            ]
            .concat(),
            now,
        )
        .to_le_bytes();
    }
    ((u64::from_le_bytes(bytes) & ((1 << 53) - 1)) as i64).max(1)
}

/// `seq` and `epoch` added to a record's JSON object, for the uplink:
/// `{"seq":N,"epoch":E,…}` (anything but a non-empty object is wrapped:
/// `{"seq":N,"epoch":E,"record":…}`).
pub fn with_identity(epoch: i64, seq: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{{\"seq\":{seq},\"epoch\":{epoch},").into_bytes();
    match payload.strip_prefix(b"{") {
        Some(rest)
            if rest
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b != b'}') =>
        {
            out.extend_from_slice(rest);
        }
        _ => {
            out.extend_from_slice(b"\"record\":");
            out.extend_from_slice(if payload.is_empty() { b"null" } else { payload });
            out.push(b'}');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aggregate(start: i64, end: i64, count: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "series": "s", "start": start, "end": end, "count": count,
            "sum": count as f64, "mean": 1.0, "min": 1.0, "max": 1.0,
            "stddev": 0.0, "first": 1.0, "last": 1.0, "late": 0, "partial": false,
        }))
        .unwrap()
    }

    #[test]
    fn overlapping_windows_are_not_merged() {
        // Tumbling neighbours, and windows with an idle gap between them.
        for (a, b) in [((0, 1000), (1000, 2000)), ((0, 1000), (5000, 6000))] {
            let merged = merge_aggregates(&aggregate(a.0, a.1, 3), &aggregate(b.0, b.1, 4));
            let v: serde_json::Value = serde_json::from_slice(&merged.unwrap()).unwrap();
            assert_eq!(
                (v["start"].as_i64(), v["end"].as_i64()),
                (Some(a.0), Some(b.1))
            );
            assert_eq!(v["count"], 7);
        }
        // Hopping windows of 10 s every 1 s share nine seconds of readings.
        assert!(
            merge_aggregates(&aggregate(0, 10_000, 100), &aggregate(1_000, 11_000, 100)).is_none()
        );
    }

    #[test]
    fn sampled_windows_merge_into_an_estimate_with_a_combined_error() {
        let sampled = |start: i64, stderr: f64, one_in: u64| {
            let mut v: serde_json::Value =
                serde_json::from_slice(&aggregate(start, start + 1000, 8)).unwrap();
            v["count_stderr"] = stderr.into();
            v["sampled_one_in"] = one_in.into();
            serde_json::to_vec(&v).unwrap()
        };
        let merged = merge_aggregates(&sampled(0, 3.0, 4), &sampled(1000, 4.0, 2)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        assert_eq!(v["count"], 16);
        assert_eq!(v["sampled_one_in"], 4);
        assert_eq!(v["count_stderr"], 5.0);
    }

    #[test]
    fn seq_is_spliced_into_objects_and_wraps_the_rest() {
        assert_eq!(
            with_identity(3, 7, br#"{"a":1}"#),
            br#"{"seq":7,"epoch":3,"a":1}"#
        );
        assert_eq!(
            with_identity(3, 7, b"{}"),
            br#"{"seq":7,"epoch":3,"record":{}}"#
        );
        assert_eq!(
            with_identity(3, 7, b"[1]"),
            br#"{"seq":7,"epoch":3,"record":[1]}"#
        );
    }
}
