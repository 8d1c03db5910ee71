//! Dead letters: records set aside because no broker can take them, to
//! inspect, queue again or purge.

use super::*;

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

impl Outbox {
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
}
