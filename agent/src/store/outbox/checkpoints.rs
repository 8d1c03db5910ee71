//! Worker checkpoints, window marks and the clean-stop flag, kept in the
//! outbox file so that they commit with the records before them.

use super::*;

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

/// In the transaction of an append: the window marks and checkpoints, each
/// under a new generation, and the marks older than every checkpoint
/// pruned (see [`Outbox::commit`]).
pub(super) fn save(
    tx: &rusqlite::Transaction<'_>,
    marks: &[(String, i64)],
    checkpoints: &[(usize, Vec<u8>)],
    now_ms: i64,
) -> Result<(), OutboxError> {
    if !marks.is_empty() || !checkpoints.is_empty() {
        add_counter(tx, "generation", 1)?;
        let generation = counter(tx, "generation")?;
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
    Ok(())
}
