//! The outbox on real SQLite files: model-based tests with crash-and-reopen
//! (dropping the oldest, and downsampling), `kill -9` of a writer at random
//! moments, bounds, window marks, and damaged files.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sluice::store::outbox::{Durability, OnCorrupt, OnFull, Outbox};

/// A database path in a fresh directory, removed when the guard drops.
fn temp_db(name: &str) -> (sluice_tests::TempDir, PathBuf) {
    let dir = sluice_tests::temp_dir(&format!("outbox-{name}"));
    let path = dir.path().join("outbox.db");
    (dir, path)
}

fn open(path: &std::path::Path, max_records: u64) -> Outbox {
    Outbox::open(
        path,
        Durability::Normal,
        OnCorrupt::Refuse,
        max_records,
        u64::MAX,
    )
    .unwrap()
    .0
}

#[derive(Debug, Clone)]
enum Action {
    Append(u8),
    /// Acknowledge the i-th waiting record (modulo the backlog).
    Ack(usize),
    /// Close and reopen the file, as after a crash between commits.
    Reopen,
}

fn actions() -> impl Strategy<Value = Vec<Action>> {
    prop::collection::vec(
        prop_oneof![
            5 => (1u8..6).prop_map(Action::Append),
            4 => any::<usize>().prop_map(Action::Ack),
            1 => Just(Action::Reopen),
        ],
        1..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The outbox against a naive model: a queue of (seq, payload), the next
    /// seq, and a count of dropped records.
    #[test]
    fn matches_a_model_across_reopens(actions in actions(), max in 3u64..12) {
        let (_dir, path) = temp_db("model");
        let mut outbox = open(&path, max);
        let mut model: VecDeque<(i64, Vec<u8>)> = VecDeque::new();
        let (mut next, mut dropped) = (1i64, 0u64);
        for action in actions {
            match action {
                Action::Append(n) => {
                    let batch: Vec<(String, Vec<u8>)> = (0..n).map(|i| ("t".to_string(), format!("{{\"n\":{next},\"i\":{i}}}").into_bytes())).collect();
                    let seqs = outbox.append(&batch, 0).unwrap();
                    for (seq, (_, payload)) in seqs.iter().zip(batch) {
                        prop_assert_eq!(*seq, next);
                        model.push_back((next, payload));
                        next += 1;
                    }
                    while model.len() as u64 > max {
                        model.pop_front();
                        dropped += 1;
                    }
                }
                Action::Ack(i) if !model.is_empty() => {
                    let (seq, _) = model.remove(i % model.len()).unwrap();
                    outbox.ack(&[seq]).unwrap();
                }
                Action::Ack(_) => {}
                Action::Reopen => {
                    drop(outbox);
                    outbox = open(&path, max);
                }
            }
            let got: Vec<(i64, Vec<u8>)> = outbox.peek(0, 1000).unwrap().into_iter().map(|q| (q.seq, q.payload)).collect();
            prop_assert_eq!(&got, &model.iter().cloned().collect::<Vec<_>>());
            let status = outbox.status().unwrap();
            prop_assert_eq!(status.backlog, model.len() as u64);
            prop_assert_eq!(status.next_seq, next);
            prop_assert_eq!(status.dropped, dropped);
        }
    }
}

/// Not a test on its own: the writer that `kill_9_never_loses_a_commit`
/// runs in a child process. It appends batches forever and prints each
/// batch's last seq once the batch is committed.
#[test]
#[ignore = "run as a child process by kill_9_never_loses_a_commit"]
fn writer_child() {
    let Ok(path) = std::env::var("SLUICE_OUTBOX_CHILD") else {
        return;
    };
    let mut outbox = open(path.as_ref(), u64::MAX);
    let mut n = 0u64;
    loop {
        let batch: Vec<(String, Vec<u8>)> = (0..17)
            .map(|_| {
                n += 1;
                ("t".to_string(), format!("{{\"n\":{n}}}").into_bytes())
            })
            .collect();
        let seqs = outbox.append(&batch, 0).unwrap();
        println!("{}", seqs.last().unwrap());
    }
}

#[test]
fn kill_9_never_loses_a_commit() {
    let (_dir, path) = temp_db("kill9");
    let mut committed = 0i64;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..20 {
        let mut child = sluice_tests::own_binary(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "writer_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SLUICE_OUTBOX_CHILD", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Read a random number of commit reports, then kill -9 mid-stream.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let wanted = 1 + rng % 40;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let start = Instant::now();
        let mut seen = 0;
        while seen < wanted {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "round {round}: the writer stalled"
            );
            let Some(Ok(line)) = lines.next() else { break };
            if let Ok(seq) = line.trim().parse::<i64>() {
                committed = committed.max(seq);
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Every reported commit is there, in order, nothing twice.
        let outbox = open(&path, u64::MAX);
        let all = outbox.peek(0, usize::MAX >> 1).unwrap();
        let seqs: Vec<i64> = all.iter().map(|q| q.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "round {round}: seqs out of order"
        );
        assert!(
            seqs.last().copied().unwrap_or(0) >= committed,
            "round {round}: lost commits up to {committed}"
        );
        assert_eq!(seqs.first().copied(), Some(1));
        // Without acks and with no drops, seqs are contiguous: no gap.
        assert_eq!(seqs.len() as i64, seqs.last().copied().unwrap());
        outbox.verify().unwrap();
    }
    assert!(committed > 0);
}

#[test]
fn the_bound_drops_the_oldest_and_counts_them() {
    let (_dir, path) = temp_db("bound");
    let mut outbox = Outbox::open(&path, Durability::Full, OnCorrupt::Refuse, 10, 10_000)
        .unwrap()
        .0;
    let batch: Vec<(String, Vec<u8>)> = (0..25)
        .map(|i| ("t".to_string(), format!("{{\"i\":{i}}}").into_bytes()))
        .collect();
    outbox.append(&batch, 1).unwrap();
    let status = outbox.status().unwrap();
    assert_eq!(
        (status.backlog, status.dropped, status.next_seq),
        (10, 15, 26)
    );
    assert_eq!(outbox.peek(0, 100).unwrap()[0].seq, 16);
    // A byte bound as well: 100 records of 1000 bytes in 20,000 bytes.
    let (_bytes_dir, bytes_path) = temp_db("bytes");
    let mut outbox = Outbox::open(
        &bytes_path,
        Durability::Normal,
        OnCorrupt::Refuse,
        u64::MAX,
        20_000,
    )
    .unwrap()
    .0;
    let big: Vec<(String, Vec<u8>)> = (0..100)
        .map(|_| ("t".to_string(), vec![b'x'; 1000]))
        .collect();
    outbox.append(&big, 1).unwrap();
    let status = outbox.status().unwrap();
    assert!(
        status.backlog_bytes <= 20_000 && status.backlog == 20,
        "{status:?}"
    );
}

#[test]
fn damaged_files_are_moved_aside_or_refused() {
    // Garbage where a database should be.
    let (_dir, path) = temp_db("garbage");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    assert!(Outbox::open(&path, Durability::Normal, OnCorrupt::Refuse, 10, 1 << 20).is_err());
    let (mut outbox, note) =
        Outbox::open(&path, Durability::Normal, OnCorrupt::MoveAside, 10, 1 << 20).unwrap();
    let note = note.expect("a note that the file was moved aside");
    assert!(note.contains("moved aside"), "{note}");
    outbox.append(&[("t".into(), b"{}".to_vec())], 1).unwrap();
    let aside = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("corrupt-")
        })
        .count();
    assert!(aside >= 1);

    // A real outbox, truncated in the middle of its data.
    let (_dir, path) = temp_db("truncated");
    {
        let mut outbox = open(&path, u64::MAX);
        let batch: Vec<(String, Vec<u8>)> = (0..2000)
            .map(|i| {
                (
                    "t".to_string(),
                    format!("{{\"i\":{i},\"pad\":\"{}\"}}", "p".repeat(200)).into_bytes(),
                )
            })
            .collect();
        outbox.append(&batch, 1).unwrap();
        // Checkpoint the WAL into the main file, so truncating it bites.
        drop(outbox);
    }
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 100_000, "{len}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert!(
        Outbox::open(
            &path,
            Durability::Normal,
            OnCorrupt::Refuse,
            u64::MAX,
            u64::MAX
        )
        .is_err()
    );
    let (outbox, note) = Outbox::open(
        &path,
        Durability::Normal,
        OnCorrupt::MoveAside,
        u64::MAX,
        u64::MAX,
    )
    .unwrap();
    assert!(note.is_some());
    assert_eq!(outbox.status().unwrap().backlog, 0);
}

#[test]
fn a_flipped_bit_in_a_page_header_is_detected() {
    let (_dir, path) = temp_db("bitflip");
    {
        let mut outbox = open(&path, u64::MAX);
        let batch: Vec<(String, Vec<u8>)> = (0..500)
            .map(|i| {
                (
                    "t".to_string(),
                    format!("{{\"i\":{i},\"pad\":\"{}\"}}", "p".repeat(100)).into_bytes(),
                )
            })
            .collect();
        outbox.append(&batch, 1).unwrap();
        // Closing the last connection checkpoints the WAL into the file.
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let page = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
    assert!(bytes.len() > 3 * page);
    // Page 2's b-tree page type (0x02, 0x05, 0x0a or 0x0d) becomes invalid.
    bytes[page] ^= 0xf0;
    std::fs::write(&path, &bytes).unwrap();
    let refused = Outbox::open(
        &path,
        Durability::Normal,
        OnCorrupt::Refuse,
        u64::MAX,
        u64::MAX,
    );
    assert!(refused.is_err(), "a damaged page must be detected");
    let (outbox, note) = Outbox::open(
        &path,
        Durability::Normal,
        OnCorrupt::MoveAside,
        u64::MAX,
        u64::MAX,
    )
    .unwrap();
    assert!(note.unwrap().contains("moved aside"));
    assert_eq!(outbox.status().unwrap().backlog, 0);
    outbox.verify().unwrap();
}

/// The JSON a worker writes for window `i` (1 s) of `series`, over the
/// values `100·i + j` for `j` in 0..10.
fn window_record(series: &str, i: i64) -> (String, Vec<u8>) {
    let values: Vec<f64> = (0..10).map(|j| (100 * i + j) as f64).collect();
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let record = serde_json::json!({
        "agent": "t", "series": series, "start": i * 1000, "end": (i + 1) * 1000,
        "count": 10, "sum": values.iter().sum::<f64>(), "mean": mean,
        "min": values[0], "max": values[9], "stddev": var.sqrt(),
        "first": values[0], "last": values[9], "quantiles": {"p50": mean},
        "late": 1, "partial": false,
    });
    (
        format!("sluice/t/agg/{series}"),
        serde_json::to_vec(&record).unwrap(),
    )
}

#[test]
fn downsampling_keeps_every_reading_in_coarser_windows() {
    let (_dir, path) = temp_db("downsample");
    let claimed = sluice::store::outbox::Claimed::default();
    let mut outbox = Outbox::open(&path, Durability::Normal, OnCorrupt::Refuse, 30, 1 << 20)
        .unwrap()
        .0
        .with_on_full(OnFull::Downsample, claimed.clone());
    let mut originals = Vec::new();
    for batch in 0..12 {
        let records: Vec<(String, Vec<u8>)> = (0..10)
            .map(|k| {
                let n = batch * 10 + k;
                let (series, i) = (["a", "b", "c"][n % 3], (n / 3) as i64);
                window_record(series, i)
            })
            .collect();
        originals.extend(records.clone());
        outbox.append(&records, 1).unwrap();
        if batch == 0 {
            // The uplink reads (and may have sent) the 4 oldest.
            let read = outbox.peek_claim(0, i64::MAX, 4, &claimed).unwrap();
            assert_eq!(read.len(), 4);
        }
    }
    let status = outbox.status().unwrap();
    assert!(status.backlog <= 30, "{status:?}");
    assert_eq!(status.dropped, 0, "{status:?}");
    assert_eq!(status.downsampled, 120 - status.backlog);
    let left = outbox.peek(0, 1000).unwrap();
    // The 4 oldest (perhaps in flight) are untouched.
    for (r, o) in left.iter().zip(&originals).take(4) {
        assert_eq!(r.payload, o.1);
    }
    let mut per_series: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
        Default::default();
    for r in &left {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        per_series
            .entry(v["series"].as_str().unwrap().into())
            .or_default()
            .push(v);
    }
    for (series, records) in &per_series {
        // Every reading is still counted, in windows that tile the time, in
        // seq order.
        let total: u64 = records.iter().map(|v| v["count"].as_u64().unwrap()).sum();
        assert_eq!(total, 400, "{series}");
        let mut expected_start = 0;
        for v in records {
            let (start, end) = (v["start"].as_i64().unwrap(), v["end"].as_i64().unwrap());
            assert_eq!(start, expected_start, "{series}: {v}");
            expected_start = end;
            // Mean, stddev, min, max, first and last are those of every
            // value the windows held.
            let values: Vec<f64> = (start / 1000..end / 1000)
                .flat_map(|i| (0..10).map(move |j| (100 * i + j) as f64))
                .collect();
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let sd = (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            assert_eq!(v["count"].as_u64().unwrap() as usize, values.len());
            assert!((v["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{v}");
            assert!((v["stddev"].as_f64().unwrap() - sd).abs() < 1e-9, "{v}");
            assert_eq!(v["min"].as_f64().unwrap(), values[0]);
            assert_eq!(v["max"].as_f64().unwrap(), *values.last().unwrap());
            assert_eq!(v["first"].as_f64().unwrap(), values[0]);
            assert_eq!(v["last"].as_f64().unwrap(), *values.last().unwrap());
            let windows = values.len() as u64 / 10;
            assert_eq!(v["late"].as_u64().unwrap(), windows);
            if windows > 1 {
                assert_eq!(v["downsampled"].as_u64().unwrap(), windows);
                assert!(v.get("quantiles").is_none());
            }
        }
        assert_eq!(expected_start, 40_000);
    }
    // Records that are not aggregates cannot be merged: they are dropped.
    let (_alerts_dir, alerts_path) = temp_db("ds-alerts");
    let mut alerts = Outbox::open(
        &alerts_path,
        Durability::Normal,
        OnCorrupt::Refuse,
        5,
        1 << 20,
    )
    .unwrap()
    .0
    .with_on_full(OnFull::Downsample, Default::default());
    let batch: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                "t".to_string(),
                format!("{{\"state\":\"raised\",\"i\":{i}}}").into_bytes(),
            )
        })
        .collect();
    alerts.append(&batch, 1).unwrap();
    let status = alerts.status().unwrap();
    assert_eq!(
        (status.backlog, status.dropped, status.downsampled),
        (5, 3, 0)
    );
}

/// The writer appends while the uplink's connection reads and acknowledges,
/// as in the agent: neither may fail with "database is locked" (an ack that
/// read before a commit and wrote after it did, before acks took the write
/// lock up front).
#[test]
fn appends_and_acks_on_two_connections_never_fail_busy() {
    let (_dir, path) = temp_db("busy");
    let (mut writer, mut reader) = (open(&path, u64::MAX), open(&path, u64::MAX));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appender = {
        let done = done.clone();
        std::thread::spawn(move || {
            let batch: Vec<(String, Vec<u8>)> = (0..64)
                .map(|i| ("t".to_string(), format!("{{\"i\":{i}}}").into_bytes()))
                .collect();
            for _ in 0..1000 {
                writer.append(&batch, 1).expect("append");
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut acked = 0;
    loop {
        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
        let records = reader.peek(0, 128).expect("peek");
        if records.is_empty() && finished {
            break;
        }
        let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
        reader.ack(&seqs).expect("ack");
        acked += seqs.len();
    }
    appender.join().unwrap();
    assert_eq!(acked, 1000 * 64);
    assert_eq!(reader.status().unwrap().backlog, 0);
}

fn marks(outbox: &Outbox) -> Vec<(String, i64)> {
    let mut marks: Vec<_> = outbox.checkpoints().unwrap().1.into_iter().collect();
    marks.sort();
    marks
}

#[test]
fn window_marks_are_pruned_once_every_worker_has_checkpointed_past_them() {
    let (_dir, path) = temp_db("marks");
    let mut outbox = open(&path, u64::MAX);
    let mark = |series: &str, end: i64| vec![(series.to_string(), end)];
    let state = |worker: usize| vec![(worker, vec![worker as u8; 8])];
    // Two workers save; then windows of a and b close.
    outbox.commit(&[], &[], &state(0), 1).unwrap();
    outbox.commit(&[], &[], &state(1), 1).unwrap();
    outbox.commit(&[], &mark("a", 1000), &[], 2).unwrap();
    outbox.commit(&[], &mark("b", 1000), &[], 2).unwrap();
    // Worker 0 saves again: worker 1's state is still older than both marks.
    outbox.commit(&[], &[], &state(0), 3).unwrap();
    assert_eq!(marks(&outbox), [("a".into(), 1000), ("b".into(), 1000)]);
    // A later window of b, then worker 1 saves: a's mark is older than both
    // checkpoints and goes; b's newer one stays until worker 0 saves again.
    outbox.commit(&[], &mark("b", 2000), &[], 4).unwrap();
    outbox.commit(&[], &[], &state(1), 5).unwrap();
    assert_eq!(marks(&outbox), [("b".into(), 2000)]);
    outbox.commit(&[], &[], &state(0), 6).unwrap();
    assert!(marks(&outbox).is_empty());

    // Checkpoints rewritten over a new number of workers hold state from
    // before the marks were applied: the marks stay until every worker has
    // saved its own.
    outbox.commit(&[], &mark("c", 3000), &[], 7).unwrap();
    outbox
        .replace_checkpoints(&[(0, vec![0]), (1, vec![1]), (2, vec![2])], 8)
        .unwrap();
    outbox.commit(&[], &[], &state(0), 9).unwrap();
    outbox.commit(&[], &[], &state(1), 9).unwrap();
    assert_eq!(marks(&outbox), [("c".into(), 3000)]);
    outbox.commit(&[], &[], &state(2), 10).unwrap();
    assert!(marks(&outbox).is_empty());
    // Marks survive a reopen, and discarding clears both tables.
    outbox.commit(&[], &mark("d", 4000), &[], 11).unwrap();
    drop(outbox);
    let mut outbox = open(&path, u64::MAX);
    assert_eq!(marks(&outbox), [("d".into(), 4000)]);
    assert_eq!(outbox.discard_checkpoints().unwrap(), 3);
    assert!(marks(&outbox).is_empty());
    assert!(outbox.checkpoints().unwrap().0.is_empty());
}

#[test]
fn a_file_from_an_earlier_release_is_upgraded_in_place() {
    let (_dir, path) = temp_db("upgrade");
    {
        // The tables as the first release with checkpoints made them.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE checkpoints (worker INTEGER PRIMARY KEY, saved_ms INTEGER NOT NULL,
                 checksum INTEGER NOT NULL, state BLOB NOT NULL);
             CREATE TABLE window_marks (series TEXT PRIMARY KEY, end_ms INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO window_marks VALUES ('old', 1000);
             CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                 payload BLOB NOT NULL, created_ms INTEGER NOT NULL);
             INSERT INTO records (topic, payload, created_ms) VALUES ('t', x'7b7d', 1);",
        )
        .unwrap();
    }
    let mut outbox = open(&path, u64::MAX);
    assert_eq!(marks(&outbox), [("old".into(), 1000)]);
    // The old record is still there, and appends go on after it.
    assert_eq!(outbox.peek(0, 10).unwrap()[0].payload, b"{}");
    assert_eq!(
        outbox.append(&[("t".into(), b"{}".to_vec())], 2).unwrap(),
        [2]
    );
    outbox.commit(&[], &[("new".into(), 2000)], &[], 1).unwrap();
    // The only worker saves: both marks predate it.
    outbox.commit(&[], &[], &[(0, vec![0])], 2).unwrap();
    assert!(marks(&outbox).is_empty());
    assert_eq!(outbox.checkpoints().unwrap().0.len(), 1);
}

#[derive(Debug, Clone)]
enum DsAction {
    /// Append windows of these series (indices into `SERIES`), in one batch.
    Append(Vec<usize>),
    /// The uplink reads the oldest record it has not read (backlog lane).
    Claim,
    /// The upstream acknowledges the i-th record read (modulo their number).
    Ack(usize),
    /// Close and reopen the file; the uplink starts again with nothing read.
    Reopen,
}

const SERIES: [&str; 3] = ["a", "b", "c"];

fn ds_actions() -> impl Strategy<Value = Vec<DsAction>> {
    prop::collection::vec(
        prop_oneof![
            5 => prop::collection::vec(0..SERIES.len(), 1..6).prop_map(DsAction::Append),
            3 => Just(DsAction::Claim),
            3 => any::<usize>().prop_map(DsAction::Ack),
            1 => Just(DsAction::Reopen),
        ],
        1..80,
    )
}

/// Series index and the windows (their indices) a record holds.
fn windows_of(payload: &[u8]) -> (usize, std::ops::Range<i64>) {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    let s = SERIES.iter().position(|s| v["series"] == *s).unwrap();
    (
        s,
        v["start"].as_i64().unwrap() / 1000..v["end"].as_i64().unwrap() / 1000,
    )
}

/// Per series, how many times each window index occurs in `records`.
fn window_counts<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> [Vec<u32>; 3] {
    let mut counts: [Vec<u32>; 3] = Default::default();
    for payload in records {
        let (s, windows) = windows_of(payload);
        for w in windows {
            let w = w as usize;
            if counts[s].len() <= w {
                counts[s].resize(w + 1, 0);
            }
            counts[s][w] += 1;
        }
    }
    counts
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// `on_full = "downsample"` under appends, reads, acknowledgements in any
    /// order and reopens. After every step: the bound holds; every window
    /// appended is exactly once upstream, waiting, or dropped (and counted),
    /// so merging never loses or double-counts a reading; merged records
    /// hold exactly the windows their span says, with exact statistics;
    /// waiting records of a series stay in time order; and a record the
    /// uplink has read is never rewritten.
    #[test]
    fn downsampling_loses_and_double_counts_nothing(actions in ds_actions(), max in 8u64..16) {
        let (_dir, path) = temp_db("ds-model");
        let claimed = sluice::store::outbox::Claimed::default();
        let open_ds = |claimed: &sluice::store::outbox::Claimed| {
            Outbox::open(&path, Durability::Normal, OnCorrupt::Refuse, max, u64::MAX)
                .unwrap()
                .0
                .with_on_full(OnFull::Downsample, claimed.clone())
        };
        let mut outbox = open_ds(&claimed);
        let mut appended = [0i64; 3];
        // Payloads acknowledged upstream, and windows dropped.
        let mut upstream: Vec<Vec<u8>> = Vec::new();
        let mut dropped: [Vec<u32>; 3] = Default::default();
        // Records read and not acknowledged, with the payload read.
        let mut read: Vec<(i64, Vec<u8>)> = Vec::new();
        let mut read_upto = 0i64;
        for action in actions {
            match action {
                DsAction::Append(series) => {
                    let before = outbox.peek(0, 1000).unwrap();
                    let batch: Vec<(String, Vec<u8>)> = series
                        .iter()
                        .map(|&s| {
                            appended[s] += 1;
                            window_record(SERIES[s], appended[s] - 1)
                        })
                        .collect();
                    let done = outbox.commit(&batch, &[], &[], 1).unwrap();
                    let after = outbox.peek(0, 1000).unwrap();
                    // What was waiting or appended and is not any more was
                    // dropped (merging keeps every window in some record).
                    let had = window_counts(
                        before.iter().map(|r| r.payload.as_slice())
                            .chain(batch.iter().map(|(_, p)| p.as_slice())),
                    );
                    let has = window_counts(after.iter().map(|r| r.payload.as_slice()));
                    let mut lost = 0;
                    for s in 0..3 {
                        for (w, &n) in had[s].iter().enumerate() {
                            let now = has[s].get(w).copied().unwrap_or(0);
                            prop_assert!(now <= n, "series {} window {} gained", SERIES[s], w);
                            if dropped[s].len() <= w {
                                dropped[s].resize(w + 1, 0);
                            }
                            dropped[s][w] += n - now;
                            lost += n - now;
                        }
                    }
                    // Windows vanish exactly when records are dropped.
                    prop_assert_eq!(done.dropped > 0, lost > 0, "{:?}", done);
                    // A dropped record the uplink had read: its ack would
                    // delete nothing; the model forgets it.
                    read.retain(|(seq, _)| after.iter().any(|r| r.seq == *seq));
                }
                DsAction::Claim if read.len() < 2 => {
                    if let Some(r) = outbox
                        .peek_claim(read_upto, i64::MAX, 1, &claimed)
                        .unwrap()
                        .pop()
                    {
                        read_upto = r.seq;
                        read.push((r.seq, r.payload));
                    }
                }
                DsAction::Claim => {}
                DsAction::Ack(i) if !read.is_empty() => {
                    let (seq, payload) = read.remove(i % read.len());
                    outbox.ack(&[seq]).unwrap();
                    claimed.lock().unwrap().remove(&seq);
                    upstream.push(payload);
                }
                DsAction::Ack(_) => {}
                DsAction::Reopen => {
                    drop(outbox);
                    claimed.lock().unwrap().clear();
                    read.clear();
                    read_upto = 0;
                    outbox = open_ds(&claimed);
                }
            }
            let status = outbox.status().unwrap();
            prop_assert!(status.backlog <= max, "{:?}", status);
            let left = outbox.peek(0, 1000).unwrap();
            let text = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
            for (seq, payload) in &read {
                let now = left.iter().find(|r| r.seq == *seq).map(|r| text(&r.payload));
                prop_assert_eq!(now, Some(text(payload)), "read record {} was rewritten", seq);
            }
            let mut last_start = [i64::MIN; 3];
            for r in &left {
                let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
                let (s, windows) = windows_of(&r.payload);
                // Waiting records of a series stay in time order.
                prop_assert!(windows.start > last_start[s], "series {}: {}", SERIES[s], v);
                last_start[s] = windows.start;
                // Exactly the readings of the windows its span says.
                let values: Vec<f64> = windows
                    .clone()
                    .flat_map(|i| (0..10).map(move |j| (100 * i + j) as f64))
                    .collect();
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                prop_assert_eq!(v["count"].as_u64().unwrap() as usize, values.len(), "{}", v);
                prop_assert!((v["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{}", v);
                prop_assert_eq!(v["min"].as_f64().unwrap(), values[0]);
                prop_assert_eq!(v["max"].as_f64().unwrap(), *values.last().unwrap());
            }
            // Every window appended: upstream, waiting or dropped, once.
            let up = window_counts(upstream.iter().map(Vec::as_slice));
            let waiting = window_counts(left.iter().map(|r| r.payload.as_slice()));
            for s in 0..3 {
                for w in 0..appended[s] as usize {
                    let n = [&up[s], &waiting[s], &dropped[s]]
                        .iter()
                        .map(|c| c.get(w).copied().unwrap_or(0))
                        .sum::<u32>();
                    prop_assert_eq!(n, 1, "series {} window {}", SERIES[s], w);
                }
            }
        }
        drop(outbox);
    }
}

/// The names in `dir` that hold `part`.
fn names_with(dir: &std::path::Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

#[test]
fn open_errors_other_than_damage_name_their_cause_and_leave_the_file_alone() {
    // A directory where the file should be: an error, never renamed.
    let (dir, path) = temp_db("isdir");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"x").unwrap();
    let e = Outbox::open(&path, Durability::Normal, OnCorrupt::MoveAside, 10, 1 << 20)
        .err()
        .expect("a directory is no outbox");
    assert!(e.to_string().contains("directory"), "{e}");
    assert!(path.join("keep").exists());
    assert!(names_with(dir.path(), "corrupt-").is_empty());

    // A missing directory: said so, and nothing created.
    let (dir, _) = temp_db("nodir");
    let missing = dir.path().join("no/such/dir/outbox.db");
    let e = Outbox::open(
        &missing,
        Durability::Normal,
        OnCorrupt::MoveAside,
        10,
        1 << 20,
    )
    .err()
    .expect("no directory");
    assert!(e.to_string().contains("does not exist"), "{e}");

    // A file another process holds locked: an error after the busy
    // timeout, and the backlog stays where it is.
    let (dir, path) = temp_db("locked");
    open(&path, u64::MAX)
        .append(&[("t".into(), b"{}".to_vec())], 1)
        .unwrap();
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder
        .execute_batch(
            "PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE; INSERT INTO counters VALUES ('x', 1);",
        )
        .unwrap();
    let e = Outbox::open(&path, Durability::Normal, OnCorrupt::MoveAside, 10, 1 << 20)
        .err()
        .expect("a locked file is not opened");
    assert!(e.to_string().contains("locked"), "{e}");
    assert!(names_with(dir.path(), "corrupt-").is_empty());
    drop(holder);
    assert_eq!(open(&path, u64::MAX).status().unwrap().backlog, 1);
}

#[test]
fn a_second_agent_on_the_same_state_is_refused() {
    let (_dir, path) = temp_db("lock");
    let first = Outbox::lock(&path).unwrap();
    let e = Outbox::lock(&path).expect_err("the state is taken");
    assert!(
        e.to_string().contains("in use by another sluice process"),
        "{e}"
    );
    drop(first);
    Outbox::lock(&path).expect("free again once the first lets go");
}

#[test]
fn every_file_has_its_own_epoch_kept_across_reopens() {
    let (_dir, a) = temp_db("epoch-a");
    let (_dir2, b) = temp_db("epoch-b");
    let epoch_a = open(&a, u64::MAX).epoch();
    assert!(epoch_a > 0 && epoch_a < 1 << 53, "{epoch_a}");
    assert_eq!(open(&a, u64::MAX).epoch(), epoch_a, "kept by the file");
    assert_ne!(open(&b, u64::MAX).epoch(), epoch_a);
    // A file moved aside: the fresh one has a new epoch, so its seqs, which
    // start at 1 again, never collide upstream with the old ones.
    std::fs::write(&b, vec![0x5a; 8192]).unwrap();
    let (fresh, note) =
        Outbox::open(&b, Durability::Normal, OnCorrupt::MoveAside, 10, 1 << 20).unwrap();
    assert!(note.is_some());
    assert_ne!(fresh.epoch(), epoch_a);
    assert!(fresh.epoch() > 0);
}

#[test]
fn a_flipped_byte_in_a_record_is_caught_by_its_checksum_and_verify_changes_nothing() {
    let (_dir, path) = temp_db("recordflip");
    {
        let mut outbox = open(&path, u64::MAX);
        let batch: Vec<(String, Vec<u8>)> = (0..50)
            .map(|i| {
                (
                    "sluice/a/agg/s".to_string(),
                    format!("{{\"series\":\"s\",\"i\":{i},\"count\":10}}").into_bytes(),
                )
            })
            .collect();
        outbox.append(&batch, 1).unwrap();
    }
    // One byte of one payload on disk: "count":10 becomes "count":17.
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = b"\"i\":7,\"count\":10";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the record is on disk");
    bytes[at + needle.len() - 1] = b'7';
    std::fs::write(&path, &bytes).unwrap();
    // An agent holds the file open with commits in its WAL.
    let mut running = open(&path, u64::MAX);
    running
        .append(&[("sluice/a/agg/s".into(), b"{}".to_vec())], 2)
        .unwrap();
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let before = (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap());
    assert!(!before.1.is_empty(), "the WAL holds the last commit");
    // verify opens read-only, finds the record, and changes nothing: not
    // the file, not the WAL (it used to merge it into the file).
    let e = Outbox::open_read_only(&path)
        .unwrap()
        .verify()
        .expect_err("the flipped byte is found");
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(e.to_string().contains("seq 8"), "{e}");
    let after = (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap());
    assert!(after == before, "verify wrote nothing");
    drop(running);
    // The agent's reader sees it as damaged; the others are intact.
    let outbox = open(&path, u64::MAX);
    let records = outbox.peek(0, 100).unwrap();
    let damaged: Vec<i64> = records
        .iter()
        .filter(|r| !r.intact)
        .map(|r| r.seq)
        .collect();
    assert_eq!(damaged, [8]);
    assert_eq!(records.len(), 51);
}

#[test]
fn the_previous_releases_outbox_is_upgraded_in_place() {
    let (_dir, path) = temp_db("fixture");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/outbox-0.1.0.db"
        ),
        &path,
    )
    .unwrap();
    let mut outbox = open(&path, u64::MAX);
    let status = outbox.status().unwrap();
    assert_eq!((status.backlog, status.next_seq), (54, 55));
    assert!(status.epoch > 0);
    // Every old record got its checksum, and appends go on after them.
    let records = outbox.peek(0, 100).unwrap();
    assert!(records.iter().all(|r| r.intact));
    assert_eq!(
        outbox.append(&[("t".into(), b"{}".to_vec())], 2).unwrap(),
        [55]
    );
    let (saved, _) = outbox.checkpoints().unwrap();
    assert_eq!(saved.len(), 1);
    assert!(saved[0].state.is_ok());
    // Dead letters work on it.
    assert!(outbox.set_aside(3, "test", 5).unwrap());
    let dead = outbox.dead_letters(10).unwrap();
    assert_eq!(
        (dead.len(), dead[0].seq, dead[0].reason.as_str()),
        (1, 3, "test")
    );
    let again = outbox.retry_dead_letters(None, 6).unwrap();
    assert_eq!(again, [56]);
    assert!(outbox.dead_letters(10).unwrap().is_empty());
    assert_eq!(outbox.status().unwrap().backlog, 55);
}

/// An outbox that downsamples at `max_records`.
fn downsampling(
    path: &std::path::Path,
    max_records: u64,
    claimed: &sluice::store::outbox::Claimed,
) -> Outbox {
    Outbox::open(
        path,
        Durability::Normal,
        OnCorrupt::Refuse,
        max_records,
        u64::MAX,
    )
    .unwrap()
    .0
    .with_on_full(OnFull::Downsample, claimed.clone())
}

#[test]
fn downsampling_pairs_windows_of_thousands_of_interleaved_series() {
    // 2,000 series, one window each per round: a series' next window comes
    // 2,000 records after its last, far beyond any fixed look-ahead.
    let (_dir, path) = temp_db("ds-many");
    let claimed = sluice::store::outbox::Claimed::default();
    let mut outbox = downsampling(&path, 6_000, &claimed);
    for round in 0..4 {
        let records: Vec<(String, Vec<u8>)> = (0..2_000)
            .map(|s| window_record(&format!("s-{s}"), round))
            .collect();
        for chunk in records.chunks(500) {
            outbox.append(chunk, 1).unwrap();
        }
    }
    let status = outbox.status().unwrap();
    assert_eq!(status.dropped, 0, "{status:?}");
    assert_eq!(status.backlog, 6_000, "{status:?}");
    assert_eq!(status.downsampled, 2_000, "{status:?}");
    // Every reading is still there.
    let total: u64 = outbox
        .peek(0, 10_000)
        .unwrap()
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["count"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 4 * 2_000 * 10);
}

#[test]
fn a_record_read_for_sending_is_never_rewritten_even_after_a_restart() {
    let (_dir, path) = temp_db("ds-sent");
    let claimed = sluice::store::outbox::Claimed::default();
    let originals: Vec<(String, Vec<u8>)> = (0..20).map(|i| window_record("a", i)).collect();
    {
        let mut outbox = downsampling(&path, 100, &claimed);
        outbox.append(&originals, 1).unwrap();
        // The uplink reads the 6 oldest to publish them; then the agent
        // dies before any PUBACK (the in-memory claims die with it).
        assert_eq!(
            outbox.peek_claim(0, i64::MAX, 6, &claimed).unwrap().len(),
            6
        );
    }
    let fresh = sluice::store::outbox::Claimed::default();
    let mut outbox = downsampling(&path, 10, &fresh);
    outbox.append(&[window_record("a", 20)], 2).unwrap();
    let left = outbox.peek(0, 100).unwrap();
    assert!(left.len() <= 10, "{}", left.len());
    // The six that may be upstream already are as they were sent.
    for (r, o) in left.iter().zip(&originals).take(6) {
        assert_eq!(r.payload, o.1, "seq {}", r.seq);
    }
    assert_eq!(
        left[..6].iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(outbox.status().unwrap().dropped, 0);
}

#[test]
fn drop_oldest_spares_the_records_in_flight() {
    let (_dir, path) = temp_db("drop-inflight");
    let claimed = sluice::store::outbox::Claimed::default();
    let mut outbox = Outbox::open(&path, Durability::Normal, OnCorrupt::Refuse, 10, u64::MAX)
        .unwrap()
        .0
        .with_on_full(OnFull::DropOldest, claimed.clone());
    let batch = |from: i64| -> Vec<(String, Vec<u8>)> {
        (from..from + 10)
            .map(|i| ("t".into(), format!("{{\"i\":{i}}}").into_bytes()))
            .collect()
    };
    outbox.append(&batch(0), 1).unwrap();
    // Seqs 1 to 3 are in flight.
    assert_eq!(
        outbox.peek_claim(0, i64::MAX, 3, &claimed).unwrap().len(),
        3
    );
    let done = outbox.commit(&batch(10), &[], &[], 2).unwrap();
    assert_eq!(done.dropped, 10, "ten others dropped to make room");
    let left: Vec<i64> = outbox.peek(0, 100).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(left[..3], [1, 2, 3], "in flight: delivered, not dropped");
    assert_eq!(left.len(), 10, "the bound holds");
    assert_eq!(left[3..], (14..=20).collect::<Vec<_>>()[..]);
}

#[test]
fn a_power_loss_that_rolls_back_seqs_never_reuses_an_identity_upstream_has() {
    // durability = "normal": the last commits before a power loss may be
    // lost. Simulated by copying the file and its WAL at a commit (what
    // reached the disk) and putting the copies back after later commits.
    let (dir, path) = temp_db("powerloss");
    let side = |suffix: &str| PathBuf::from(format!("{}{suffix}", path.display()));
    let snapshot = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    let claimed = sluice::store::outbox::Claimed::default();
    let mut upstream = std::collections::BTreeSet::new();
    {
        let mut outbox = open(&path, u64::MAX);
        outbox.begin_run().unwrap();
        outbox
            .append(&vec![("t".into(), b"{\"a\":1}".to_vec()); 10], 1)
            .unwrap();
        for suffix in ["", "-wal", "-shm"] {
            if side(suffix).exists() {
                std::fs::copy(side(suffix), snapshot.join(format!("db{suffix}"))).unwrap();
            }
        }
        // Ten more commits reach upstream (and are acknowledged), but not
        // the disk.
        outbox
            .append(&vec![("t".into(), b"{\"a\":2}".to_vec()); 10], 2)
            .unwrap();
        for r in outbox.peek_claim(0, i64::MAX, 100, &claimed).unwrap() {
            upstream.insert((r.epoch, r.seq));
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(side(suffix));
        let saved = snapshot.join(format!("db{suffix}"));
        if saved.exists() {
            std::fs::copy(saved, side(suffix)).unwrap();
        }
    }
    // The next run hands out seqs 11 to 20 again, under a new epoch.
    let mut outbox = open(&path, u64::MAX);
    outbox.begin_run().unwrap();
    let seqs = outbox
        .append(&vec![("t".into(), b"{\"a\":3}".to_vec()); 10], 3)
        .unwrap();
    assert_eq!(seqs, (11..=20).collect::<Vec<_>>(), "the rollback happened");
    for r in outbox.peek(0, 100).unwrap() {
        if r.seq > 10 {
            assert!(
                !upstream.contains(&(r.epoch, r.seq)),
                "seq {} reuses an identity upstream holds",
                r.seq
            );
        }
    }
}
