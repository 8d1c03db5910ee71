//! The record queue: appends (with the bound and `on_full`), reads for
//! sending, acknowledgements.

use super::*;

impl Outbox {
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
            crate::ops::crash::point("send.after_mark");
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
        checkpoints::save(&tx, marks, checkpoints, now_ms)?;
        // Applied to `last_of_topic` only once the transaction commits.
        let Inserted {
            seqs,
            bytes: added_bytes,
            newest,
        } = insert(&tx, records, now_ms, self.epoch, &self.last_of_topic)?;
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
            downsampled = downsample::downsample(
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
            let bounds = (self.max_records, self.max_bytes);
            dropped = drop_oldest(&tx, &in_flight, (&mut count, &mut bytes), bounds)?;
        }
        if downsampled > 0 {
            crate::ops::crash::point("downsample.before_commit");
        }
        if !records.is_empty() {
            crate::ops::crash::point("append.before_commit");
        }
        tx.commit()?;
        if !records.is_empty() {
            crate::ops::crash::point("append.after_commit");
        }
        if !checkpoints.is_empty() {
            crate::ops::crash::point("checkpoint.after_commit");
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

    /// Records waiting (one lookup of the running total).
    pub fn backlog(&self) -> Result<u64, OutboxError> {
        Ok(counter(&self.conn, "count")? as u64)
    }
}

/// What [`insert`] inserted.
struct Inserted<'r> {
    seqs: Vec<i64>,
    /// Their payload bytes.
    bytes: i64,
    /// The newest seq per topic.
    newest: std::collections::HashMap<&'r str, i64>,
}

/// Inserts `records` with their identity and checksum, each linked to the
/// newest record of its topic before it (`prev`, for downsampling).
fn insert<'r>(
    tx: &rusqlite::Transaction<'_>,
    records: &'r [(String, Vec<u8>)],
    now_ms: i64,
    epoch: i64,
    last_of_topic: &std::collections::HashMap<String, i64>,
) -> Result<Inserted<'r>, OutboxError> {
    let mut seqs = Vec::with_capacity(records.len());
    let mut added_bytes = 0i64;
    let mut newest: std::collections::HashMap<&str, i64> = Default::default();
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO records (topic, payload, created_ms, prev, checksum, epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (topic, payload) in records {
            let prev = newest
                .get(topic.as_str())
                .or_else(|| last_of_topic.get(topic))
                .copied()
                .unwrap_or(-1);
            insert.execute(params![
                topic,
                payload,
                now_ms,
                prev,
                record_checksum(topic, payload),
                epoch
            ])?;
            let seq = tx.last_insert_rowid();
            newest.insert(topic, seq);
            seqs.push(seq);
            added_bytes += payload.len() as i64;
        }
    }
    Ok(Inserted {
        seqs,
        bytes: added_bytes,
        newest,
    })
}

/// Deletes the oldest records until `count` and `bytes` are within
/// `(max_records, max_bytes)`, sparing those `in_flight`; returns how many
/// it deleted (the running totals are updated as it goes).
fn drop_oldest(
    tx: &rusqlite::Transaction<'_>,
    in_flight: &std::collections::HashSet<i64>,
    (count, bytes): (&mut u64, &mut u64),
    (max_records, max_bytes): (u64, u64),
) -> Result<i64, OutboxError> {
    let mut dropped = 0i64;
    let mut oldest = tx.prepare_cached(
        "SELECT seq, LENGTH(payload) FROM records WHERE seq > ?1 ORDER BY seq LIMIT 256",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
    let mut after = 0;
    'drop: while *count > max_records || *bytes > max_bytes {
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
            *count -= 1;
            *bytes = bytes.saturating_sub(len as u64);
            dropped += 1;
            add_counter(tx, "bytes", -len)?;
            if *count <= max_records && *bytes <= max_bytes {
                break 'drop;
            }
        }
    }
    drop((oldest, delete));
    add_counter(tx, "count", -dropped)?;
    add_counter(tx, "dropped", dropped)?;
    Ok(dropped)
}
