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
//!   payload; past that the oldest records are dropped, and counted.
//! * A damaged file never causes a crash loop: it is detected at open and
//!   moved aside (or, if so configured, the agent refuses to start).
//!
//! # On-disk layout
//!
//! ```sql
//! records(seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, payload BLOB, created_ms INTEGER)
//! counters(name TEXT PRIMARY KEY, value INTEGER)   -- dropped records, across restarts
//! ```
//!
//! `AUTOINCREMENT` makes `seq` strictly increasing for the life of the file,
//! even across deletes and restarts, so that `(agent_id, seq)` identifies a
//! record upstream and lets it drop duplicates (delivery is at least once).
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

/// One queued record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its sequence number.
    pub seq: i64,
    /// Where it goes.
    pub topic: String,
    /// Its body (a JSON object).
    pub payload: Vec<u8>,
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

/// The outbox (see the module docs).
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    max_records: u64,
    max_bytes: u64,
}

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
        let conn = match Self::open_checked(path, durability) {
            Ok(conn) => conn,
            Err(e) if on_corrupt == OnCorrupt::MoveAside && path.exists() => {
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
                Self::open_checked(path, durability)?
            }
            Err(e) => return Err(OutboxError(format!("outbox {}: {e}", path.display()))),
        };
        Ok((
            Outbox {
                conn,
                path: path.to_owned(),
                max_records,
                max_bytes,
            },
            note,
        ))
    }

    fn open_checked(path: &Path, durability: Durability) -> Result<Connection, OutboxError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OutboxError(format!("cannot use WAL mode (got {mode})")));
        }
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
            return Err(OutboxError(format!("integrity check failed: {check}")));
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )?;
        Ok(conn)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends records in one transaction; returns their `seq`s. Past the
    /// bound, the oldest records are dropped in the same transaction.
    pub fn append(
        &mut self,
        records: &[(String, Vec<u8>)],
        now_ms: i64,
    ) -> Result<Vec<i64>, OutboxError> {
        let tx = self.conn.transaction()?;
        let mut seqs = Vec::with_capacity(records.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (topic, payload, created_ms) VALUES (?1, ?2, ?3)",
            )?;
            for (topic, payload) in records {
                insert.execute(params![topic, payload, now_ms])?;
                seqs.push(tx.last_insert_rowid());
            }
        }
        let (count, bytes): (u64, u64) = tx.query_row(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?;
        if count > self.max_records || bytes > self.max_bytes {
            // Drop the oldest until both bounds hold: find the cut-off seq.
            let mut drop_n = count.saturating_sub(self.max_records);
            if bytes > self.max_bytes {
                let mut excess = bytes - self.max_bytes;
                let mut stmt =
                    tx.prepare_cached("SELECT LENGTH(payload) FROM records ORDER BY seq")?;
                let mut rows = stmt.query([])?;
                let mut n = 0u64;
                while excess > 0 {
                    let Some(row) = rows.next()? else { break };
                    excess = excess.saturating_sub(row.get::<_, i64>(0)? as u64);
                    n += 1;
                }
                drop_n = drop_n.max(n);
            }
            let dropped = tx.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT ?1)",
                params![drop_n as i64],
            )?;
            tx.execute(
                "INSERT INTO counters (name, value) VALUES ('dropped', ?1)
                 ON CONFLICT(name) DO UPDATE SET value = value + ?1",
                params![dropped as i64],
            )?;
        }
        tx.commit()?;
        Ok(seqs)
    }

    /// Up to `limit` waiting records with `seq > after`, in `seq` order.
    pub fn peek(&self, after: i64, limit: usize) -> Result<Vec<Queued>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, topic, payload FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(Queued {
                seq: r.get(0)?,
                topic: r.get(1)?,
                payload: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes acknowledged records.
    pub fn ack(&mut self, seqs: &[i64]) -> Result<(), OutboxError> {
        let tx = self.conn.transaction()?;
        {
            let mut delete = tx.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
            for seq in seqs {
                delete.execute(params![seq])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The outbox's state.
    pub fn status(&self) -> Result<Status, OutboxError> {
        let (backlog, backlog_bytes, oldest_created_ms): (i64, i64, Option<i64>) =
            self.conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(created_ms) FROM records",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
        let last: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let dropped: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'dropped'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(Status {
            backlog: backlog as u64,
            backlog_bytes: backlog_bytes as u64,
            oldest_created_ms,
            next_seq: last.unwrap_or(0) + 1,
            dropped: dropped.unwrap_or(0) as u64,
        })
    }

    /// SQLite's full `integrity_check`: `Ok(())` or the problems it found.
    pub fn verify(&self) -> Result<(), OutboxError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let problems: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if problems == ["ok"] {
            Ok(())
        } else {
            Err(OutboxError(problems.join("; ")))
        }
    }
}

/// `seq` added to a record's JSON object, for the uplink: `{"seq":N,…}`
/// (anything but a non-empty object is wrapped: `{"seq":N,"record":…}`).
pub fn with_seq(seq: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{{\"seq\":{seq},").into_bytes();
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

    #[test]
    fn seq_is_spliced_into_objects_and_wraps_the_rest() {
        assert_eq!(with_seq(7, br#"{"a":1}"#), br#"{"seq":7,"a":1}"#);
        assert_eq!(with_seq(7, b"{}"), br#"{"seq":7,"record":{}}"#);
        assert_eq!(with_seq(7, b"[1]"), br#"{"seq":7,"record":[1]}"#);
    }
}
