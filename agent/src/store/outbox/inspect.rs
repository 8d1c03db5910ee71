//! What `sluice outbox status` and `verify` report (reads only).

use super::*;

impl Outbox {
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

    pub(super) fn has_table(&self, name: &str) -> Result<bool, OutboxError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get(0),
        )?)
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
