//! Salvage: the readable records of a damaged file, and queuing them
//! here under their own identity.

use super::*;

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

impl Outbox {
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
}
