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

mod checkpoints;
mod dead_letters;
mod downsample;
mod inspect;
mod queue;
mod salvage;

pub use checkpoints::SavedCheckpoint;
pub use dead_letters::DeadLetter;
pub(crate) use downsample::kll_rank_error;
pub use downsample::merge_aggregates;
pub use salvage::{SalvageReport, Salvaged, salvage_read};

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

/// A row as `salvage_read` reads it: seq, topic, payload, checksum, epoch.
type RawRecord = (i64, String, Vec<u8>, Option<i64>, Option<i64>);

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
    fn distinct_counts_merge_through_their_sketches_and_the_rest_is_left_out() {
        use base64::Engine as _;
        use sluice_core::sketch::{HyperLogLog, hll};
        let with_sketch = |start: i64, items: std::ops::Range<u32>, sketch: bool| {
            let mut h = HyperLogLog::with_storage(vec![0u8; hll::storage_bytes(4096)]).unwrap();
            for i in items {
                h.insert(format!("dev-{i}").as_bytes());
            }
            let mut bytes = vec![0; h.serialized_len()];
            let n = h.write_to(&mut bytes).unwrap();
            let mut v: serde_json::Value =
                serde_json::from_slice(&aggregate(start, start + 1000, 8)).unwrap();
            v["distinct"] = serde_json::json!({
                "label": "mac", "estimate": h.estimate(), "without_label": 2,
            });
            if sketch {
                v["distinct"]["sketch"] = base64::engine::general_purpose::STANDARD
                    .encode(&bytes[..n])
                    .into();
            }
            v["top_k"] = serde_json::json!({ "label": "mac", "values": [] });
            v["sample"] = serde_json::json!([]);
            serde_json::to_vec(&v).unwrap()
        };
        // 300 devices, then 300 of which 100 are the same: 500 in all.
        let merged = merge_aggregates(
            &with_sketch(0, 0..300, true),
            &with_sketch(1000, 200..500, true),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        let d = &v["distinct"];
        let estimate = d["estimate"].as_f64().unwrap();
        assert!((estimate - 500.0).abs() < 500.0 * 0.05, "{d}");
        assert_eq!(d["without_label"], 4);
        assert!(d["sketch"].is_string());
        assert!(v.get("top_k").is_none() && v.get("sample").is_none());
        // Without both sketches, the union cannot be known: left out.
        let merged = merge_aggregates(
            &with_sketch(0, 0..300, true),
            &with_sketch(1000, 200..500, false),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        assert!(v.get("distinct").is_none());
    }

    #[test]
    fn kll_quantiles_merge_through_their_sketches_and_are_dropped_without() {
        use base64::Engine as _;
        use datasketches::kll::{KllFloat, KllSketch};
        let with_sketch = |start: i64, values: std::ops::Range<u32>, sketch: bool| {
            let mut k = KllSketch::<KllFloat<f64>>::new(200).unwrap();
            for i in values {
                k.update(KllFloat::<f64>::new(f64::from(i)).unwrap());
            }
            let mut v: serde_json::Value =
                serde_json::from_slice(&aggregate(start, start + 1000, 8)).unwrap();
            v["quantiles"] = serde_json::json!({ "p10": 0.0, "p50": 0.0, "p99.9": 0.0 });
            v["quantiles_rank_error"] = k.normalized_rank_error().into();
            if sketch {
                v["quantile_sketch"] = base64::engine::general_purpose::STANDARD
                    .encode(k.serialize())
                    .into();
            }
            serde_json::to_vec(&v).unwrap()
        };
        // 0..10,000 then 10,000..30,000: the union's quantiles are those of
        // 0..30,000, within the rank error.
        let merged = merge_aggregates(
            &with_sketch(0, 0..10_000, true),
            &with_sketch(1000, 10_000..30_000, true),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        let eps = v["quantiles_rank_error"].as_f64().unwrap();
        assert!(eps > 0.0 && eps < 0.02, "{v}");
        for (name, level) in [("p10", 0.1), ("p50", 0.5), ("p99.9", 0.999)] {
            let rank = v["quantiles"][name].as_f64().unwrap() / 30_000.0;
            assert!((rank - level).abs() <= eps, "{name}: rank {rank}");
        }
        let back = base64::engine::general_purpose::STANDARD
            .decode(v["quantile_sketch"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            KllSketch::<KllFloat<f64>>::deserialize(&back).unwrap().n(),
            30_000
        );
        // Without both sketches, the union's quantiles cannot be known.
        let merged = merge_aggregates(
            &with_sketch(0, 0..10, true),
            &with_sketch(1000, 10..30, false),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        assert!(v.get("quantiles").is_none() && v.get("quantile_sketch").is_none());
        assert!(v.get("quantiles_rank_error").is_none());
    }

    #[test]
    fn frequencies_merge_through_their_sketches() {
        use crate::pipeline::rules::FrequencyRule;
        use crate::pipeline::rules::labels::frequency_sketch;
        use base64::Engine as _;
        let rule = FrequencyRule {
            label: "mac".into(),
            epsilon: 0.01,
            delta: 0.01,
            values: vec!["a".into()],
        };
        let with_sketch = |start: i64, a_count: u64, sketch: bool| {
            let mut cm = frequency_sketch(&rule);
            cm.add(b"a", a_count);
            cm.add(b"b", 5);
            let mut bytes = vec![0; cm.serialized_len()];
            let n = cm.write_to(&mut bytes).unwrap();
            let mut v: serde_json::Value =
                serde_json::from_slice(&aggregate(start, start + 1000, 8)).unwrap();
            v["frequency"] = serde_json::json!({
                "label": "mac", "total": cm.total(), "without_label": 1,
                "values": [{ "value": "a", "count": a_count }],
            });
            if sketch {
                v["frequency"]["sketch"] = base64::engine::general_purpose::STANDARD
                    .encode(&bytes[..n])
                    .into();
            }
            serde_json::to_vec(&v).unwrap()
        };
        let merged =
            merge_aggregates(&with_sketch(0, 30, true), &with_sketch(1000, 12, true)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        let f = &v["frequency"];
        assert_eq!(
            (f["total"].as_u64(), f["without_label"].as_u64()),
            (Some(52), Some(2))
        );
        assert_eq!(f["values"][0]["value"], "a");
        let count = f["values"][0]["count"].as_u64().unwrap();
        assert_eq!(count, 42, "{f}");
        assert!(f["sketch"].is_string());
        let merged =
            merge_aggregates(&with_sketch(0, 30, true), &with_sketch(1000, 12, false)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        assert!(v.get("frequency").is_none());
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
