//! Reference tables (`[tables.<name>]`): what the gateway knows about its
//! sensors, joined to their readings by series id (a stream–table join).
//!
//! A table is a CSV file with a header row; one column (`key`, default
//! `series`) holds series ids, the others any values: a cell that reads as
//! a finite number is a number, an empty one is absent, anything else is
//! text. A rule with `table = "<name>"` joins each of its series to the row
//! of its id (or, with `on_missing = "default"`, to the row whose key is
//! `*`): records carry the row's columns, `calibrate = true` turns each
//! reading's value into `value × scale + offset` (columns `scale` and
//! `offset`, 1 and 0 when absent) before anything else sees it, and a
//! threshold may take its level from a column (`above = "@max_temp"`), so
//! that one rule serves sensors with different limits.
//!
//! Tables are read whole by `Config::load` (at start, on SIGHUP, and when
//! a table's file changes): a file that cannot be read, or one line that
//! is wrong, refuses the whole configuration with the line and why, and
//! the running one (with its tables) stays.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// `[tables.<name>]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The CSV file (with a header row), or a SQLite database (with
    /// `table` or `query`).
    pub path: PathBuf,
    /// The column that holds the keys (series ids, or a label's values).
    /// Default `series`.
    #[serde(default = "default_key")]
    pub key: String,
    /// SQLite: the table to read whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// SQLite: the query whose rows to read (one read-only statement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

impl TableConfig {
    /// Checks the settings; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.key.is_empty() {
            return Err("key: must not be empty".into());
        }
        match (&self.table, &self.query) {
            (Some(_), Some(_)) => Err("query: set table or query, not both".into()),
            (Some(t), None) if t.is_empty() => Err("table: must not be empty".into()),
            (None, Some(q)) if q.trim().is_empty() => Err("query: must not be empty".into()),
            _ => Ok(()),
        }
    }
}

fn default_key() -> String {
    "series".into()
}

/// The most rows a table may hold.
pub const MAX_ROWS: usize = 1_000_000;
/// The largest table file, bytes.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The longest cell, bytes.
pub const MAX_CELL: usize = 256;

/// A row's columns (the key's among them), as records carry them.
pub type Row = Arc<serde_json::Map<String, serde_json::Value>>;

/// A table's rows by key, with the line each came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The columns, in the file's order.
    pub columns: Vec<String>,
    /// What a row's place counts: `line` (CSV: the file's line) or `row`
    /// (SQLite: the result's row, from 1).
    pub place: &'static str,
    rows: HashMap<String, (Row, usize)>,
}

impl Table {
    /// The row of `key`, and its place (see [`Table::place`]).
    pub fn row(&self, key: &str) -> Option<(&Row, usize)> {
        self.rows.get(key).map(|(row, line)| (row, *line))
    }

    /// Every row with its key and line, in no particular order.
    pub fn rows(&self) -> impl Iterator<Item = (&str, &Row, usize)> {
        self.rows
            .iter()
            .map(|(key, (row, line))| (key.as_str(), row, *line))
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Reads the table `config` names, from a CSV file or a SQLite
    /// database.
    pub fn read(config: &TableConfig) -> Result<Table, String> {
        match (&config.table, &config.query) {
            (None, None) => Self::read_csv(&config.path, &config.key),
            (table, query) => {
                let query = match (table, query) {
                    (_, Some(q)) => q.clone(),
                    // Quoted as an identifier: any name, no injection.
                    (Some(t), None) => format!("SELECT * FROM \"{}\"", t.replace('"', "\"\"")),
                    (None, None) => unreachable!("matched above"),
                };
                Self::read_sqlite(&config.path, &query, &config.key)
            }
        }
    }

    /// Reads the rows of `query` from the SQLite database at `path`, opened
    /// read-only (a database another process is writing is read as of its
    /// last commit; one locked for longer than a second is an error). An
    /// error names the row (counted from 1).
    pub fn read_sqlite(path: &Path, query: &str, key: &str) -> Result<Table, String> {
        use rusqlite::types::ValueRef;
        let at = |row: usize, why: &dyn std::fmt::Display| {
            format!("{} row {row}: {why}", path.display())
        };
        let whole = |why: &dyn std::fmt::Display| format!("{}: {why}", path.display());
        // Read-only and never created: a missing file is an error.
        let db = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| whole(&e))?;
        db.busy_timeout(std::time::Duration::from_secs(1))
            .map_err(|e| whole(&e))?;
        let mut stmt = db.prepare(query).map_err(|e| whole(&e))?;
        if !stmt.readonly() {
            return Err(whole(&"the query must only read (one SELECT)"));
        }
        let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let Some(key_at) = columns.iter().position(|c| c == key) else {
            return Err(whole(&format!(
                "no column {key:?} (the key) in the result's columns {columns:?}"
            )));
        };
        if let Some(c) = columns
            .iter()
            .enumerate()
            .find_map(|(i, c)| columns[..i].contains(c).then_some(c))
        {
            return Err(whole(&format!("column {c:?} twice")));
        }
        let mut rows = HashMap::new();
        let mut result = stmt.query([]).map_err(|e| whole(&e))?;
        let mut n = 0;
        while let Some(r) = result.next().map_err(|e| whole(&e))? {
            n += 1;
            if rows.len() >= MAX_ROWS {
                return Err(at(n, &format!("more than {MAX_ROWS} rows")));
            }
            let mut row = serde_json::Map::new();
            let mut id = None;
            for (i, column) in columns.iter().enumerate() {
                let cell = r.get_ref(i).map_err(|e| at(n, &e))?;
                let value = match cell {
                    ValueRef::Null => continue,
                    ValueRef::Integer(x) => serde_json::json!(x as f64),
                    ValueRef::Real(x) if x.is_finite() => serde_json::json!(x),
                    ValueRef::Real(_) => return Err(at(n, &format!("{column}: not finite"))),
                    ValueRef::Text(bytes) => {
                        let text = std::str::from_utf8(bytes)
                            .map_err(|_| at(n, &format!("{column}: not UTF-8 text")))?;
                        if text.len() > MAX_CELL {
                            return Err(at(n, &format!("{column}: longer than {MAX_CELL} bytes")));
                        }
                        if text.is_empty() {
                            continue;
                        }
                        // As in a CSV file: text that reads as a number is one.
                        match text.parse::<f64>() {
                            Ok(x) if x.is_finite() => serde_json::json!(x),
                            _ => serde_json::Value::String(text.to_owned()),
                        }
                    }
                    ValueRef::Blob(_) => return Err(at(n, &format!("{column}: a blob"))),
                };
                if i == key_at {
                    id = Some(match cell {
                        ValueRef::Integer(x) => x.to_string(),
                        ValueRef::Text(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        _ => {
                            return Err(at(
                                n,
                                &format!("the key column {key:?} is not text or an integer"),
                            ));
                        }
                    });
                }
                row.insert(column.clone(), value);
            }
            let Some(id) = id else {
                return Err(at(n, &format!("the key column {key:?} is empty")));
            };
            check_key(&id).map_err(|why| at(n, &why))?;
            if let Some((_, first)) = rows.insert(id.clone(), (Arc::new(row), n)) {
                return Err(at(n, &format!("{id:?} again (first in row {first})")));
            }
        }
        Ok(Table {
            columns,
            rows,
            place: "row",
        })
    }

    /// Reads a CSV table (see the module docs); an error names the line.
    pub fn read_csv(path: &Path, key: &str) -> Result<Table, String> {
        let size = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(format!(
                "{}: {size} bytes, more than {MAX_FILE_BYTES}",
                path.display()
            ));
        }
        let at = |line: u64, why: &dyn std::fmt::Display| {
            format!("{} line {line}: {why}", path.display())
        };
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(true)
            .from_path(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let columns: Vec<String> = reader
            .headers()
            .map_err(|e| at(1, &e))?
            .iter()
            .map(str::to_owned)
            .collect();
        let Some(key_at) = columns.iter().position(|c| c == key) else {
            return Err(at(
                1,
                &format!("no column {key:?} (the key) in the header {columns:?}"),
            ));
        };
        if let Some(c) = columns
            .iter()
            .enumerate()
            .find_map(|(i, c)| columns[..i].contains(c).then_some(c))
        {
            return Err(at(1, &format!("column {c:?} twice")));
        }
        let mut rows = HashMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line());
                at(line, &e)
            })?;
            let line = record.position().map_or(0, |p| p.line()) as usize;
            if record.len() != columns.len() {
                return Err(at(
                    line as u64,
                    &format!("{} cells for {} columns", record.len(), columns.len()),
                ));
            }
            if rows.len() >= MAX_ROWS {
                return Err(at(line as u64, &format!("more than {MAX_ROWS} rows")));
            }
            let id = &record[key_at];
            if id.is_empty() {
                return Err(at(line as u64, &format!("the key column {key:?} is empty")));
            }
            check_key(id).map_err(|why| at(line as u64, &why))?;
            let mut row = serde_json::Map::new();
            for (column, cell) in columns.iter().zip(record.iter()) {
                if cell.len() > MAX_CELL {
                    return Err(at(
                        line as u64,
                        &format!("{column}: longer than {MAX_CELL} bytes"),
                    ));
                }
                if cell.is_empty() {
                    continue;
                }
                let value = match cell.parse::<f64>() {
                    Ok(x) if x.is_finite() => serde_json::json!(x),
                    _ => serde_json::Value::String(cell.to_owned()),
                };
                row.insert(column.clone(), value);
            }
            if let Some((_, first)) = rows.insert(id.to_owned(), (Arc::new(row), line)) {
                return Err(at(
                    line as u64,
                    &format!("{id:?} again (first on line {first})"),
                ));
            }
        }
        Ok(Table {
            columns,
            rows,
            place: "line",
        })
    }
}

/// Whether `id` can be a table's key (a series id, a label's value, or
/// `*`).
fn check_key(id: &str) -> Result<(), String> {
    if id != "*"
        && let Some(why) = sluice_collectors::reading::series_problem(id)
    {
        return Err(format!("{id:?} is not a series id: {why}"));
    }
    Ok(())
}

/// The tables of a configuration, read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tables(BTreeMap<String, Arc<Table>>);

impl Tables {
    /// Reads every table; an error starts with `tables.<name>`.
    pub fn load(configs: &BTreeMap<String, TableConfig>) -> Result<Tables, String> {
        let mut tables = BTreeMap::new();
        for (name, c) in configs {
            let table = Table::read(c).map_err(|e| format!("tables.{name}: {e}"))?;
            tables.insert(name.clone(), Arc::new(table));
        }
        Ok(Tables(tables))
    }

    /// One line per table read: its rows, where from and its columns.
    pub fn summary(&self, configs: &BTreeMap<String, TableConfig>) -> Vec<String> {
        self.0
            .iter()
            .map(|(name, t)| {
                let from = configs
                    .get(name)
                    .map_or(String::new(), |c| c.path.display().to_string());
                format!(
                    "tables.{name}: {} row{} from {from} (columns: {})",
                    t.len(),
                    if t.len() == 1 { "" } else { "s" },
                    t.columns.join(", ")
                )
            })
            .collect()
    }

    /// Table `name`, if it was read.
    pub fn get(&self, name: &str) -> Option<&Arc<Table>> {
        self.0.get(name)
    }
}

/// A number from a row: the column's, if it holds one.
pub fn number(row: &Row, column: &str) -> Option<f64> {
    row.get(column).and_then(serde_json::Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Result<Table, String> {
        let dir = std::env::temp_dir().join(format!(
            "sluice-table-{}-{}",
            std::process::id(),
            sluice_core::hash::hash64(text.as_bytes(), 0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.csv");
        std::fs::write(&path, text).unwrap();
        let t = Table::read_csv(&path, "series");
        std::fs::remove_dir_all(&dir).unwrap();
        t.map_err(|e| {
            e.split_once(" line ")
                .map_or(e.clone(), |(_, l)| format!("line {l}"))
        })
    }

    #[test]
    fn rows_read_with_numbers_text_and_absent_cells() {
        let t = table(
            "series,site,max_temp,scale\ns-1,north,80,\n\"s,2\",\"south, b\",72.5,0.1\n*,,90,\n",
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        let (row, line) = t.row("s-1").unwrap();
        assert_eq!(line, 2);
        assert_eq!(row["site"], "north");
        assert_eq!(number(row, "max_temp"), Some(80.0));
        assert!(!row.contains_key("scale"));
        let (row, _) = t.row("s,2").unwrap();
        assert_eq!(
            (row["site"].as_str(), number(row, "scale")),
            (Some("south, b"), Some(0.1))
        );
        assert!(t.row("*").is_some());
    }

    #[test]
    fn a_bad_line_refuses_the_table_and_says_where() {
        for (text, says) in [
            ("site,max\nn,1\n", "line 1: no column \"series\""),
            ("series,a,a\ns,1,2\n", "line 1: column \"a\" twice"),
            ("series,max\ns-1,1\ns-2\n", "line 3: "),
            (
                "series,max\ns-1,1\ns-1,2\n",
                "line 3: \"s-1\" again (first on line 2)",
            ),
            (
                "series,max\n,1\n",
                "line 2: the key column \"series\" is empty",
            ),
            (
                "series,max\n\"a\u{7}b\",1\n",
                "line 2: \"a\\u{7}b\" is not a series id",
            ),
        ] {
            let err = table(text).unwrap_err();
            assert!(err.starts_with(says), "{text:?}: {err}");
        }
    }

    fn sqlite(setup: &str) -> (sluice_tests_dir::Dir, PathBuf) {
        let dir = sluice_tests_dir::Dir::new();
        let path = dir.0.join("sensors.db");
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(setup).unwrap();
        (dir, path)
    }

    /// A directory removed when dropped.
    mod sluice_tests_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let dir = std::env::temp_dir()
                    .join(format!("sluice-sqlite-table-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                Dir(dir)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn config(path: &Path, table: Option<&str>, query: Option<&str>) -> TableConfig {
        TableConfig {
            path: path.to_owned(),
            key: "series".into(),
            table: table.map(str::to_owned),
            query: query.map(str::to_owned),
        }
    }

    #[test]
    fn a_sqlite_table_or_query_reads_with_its_types() {
        let (_dir, path) = sqlite(
            "CREATE TABLE \"sensor list\" (series TEXT, site TEXT, max_temp REAL, n INTEGER, note TEXT, active INTEGER);
             INSERT INTO \"sensor list\" VALUES ('s-1', 'north', 80.5, 3, NULL, 1), ('s-2', 'south', NULL, 7, '12', 0), ('*', NULL, 90, NULL, '', 1);",
        );
        let t = Table::read(&config(&path, Some("sensor list"), None)).unwrap();
        assert_eq!(t.len(), 3);
        let (row, n) = t.row("s-1").unwrap();
        assert_eq!((n, row["site"].as_str()), (1, Some("north")));
        assert_eq!(
            (number(row, "max_temp"), number(row, "n")),
            (Some(80.5), Some(3.0))
        );
        assert!(!row.contains_key("note"));
        // Numeric text is a number, as in a CSV file; empty text is absent.
        assert_eq!(number(t.row("s-2").unwrap().0, "note"), Some(12.0));
        assert!(!t.row("*").unwrap().0.contains_key("note"));
        let q = Table::read(&config(
            &path,
            None,
            Some("SELECT series, max_temp AS max FROM \"sensor list\" WHERE active = 1"),
        ))
        .unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q.columns, ["series", "max"]);
        assert_eq!(number(q.row("*").unwrap().0, "max"), Some(90.0));
    }

    #[test]
    fn a_bad_sqlite_table_is_refused_with_its_row_or_why() {
        let (_dir, path) = sqlite(
            "CREATE TABLE t (series TEXT, v BLOB, k INTEGER);
             INSERT INTO t VALUES ('a', NULL, 1), ('b', x'00', 2), (NULL, NULL, 3), ('a', NULL, 4);",
        );
        let err = |query: &str| Table::read(&config(&path, None, Some(query))).unwrap_err();
        assert!(
            err("SELECT * FROM t").ends_with("row 2: v: a blob"),
            "{}",
            err("SELECT * FROM t")
        );
        assert!(err("SELECT series FROM t").ends_with("row 3: the key column \"series\" is empty"));
        assert!(
            err("SELECT series FROM t WHERE series = 'a'")
                .ends_with("row 2: \"a\" again (first in row 1)")
        );
        assert!(err("SELECT k FROM t").contains("no column \"series\""));
        assert!(err("DELETE FROM t").ends_with("the query must only read (one SELECT)"));
        assert!(err("SELECT * FROM nowhere").contains("no such table"));
        // An integer key is its decimal text.
        let by_k = TableConfig {
            key: "k".into(),
            ..config(&path, None, Some("SELECT k, series FROM t"))
        };
        assert!(Table::read(&by_k).unwrap().row("4").is_some());
        // A missing database is an error, and is not created.
        let missing = path.with_file_name("missing.db");
        assert!(Table::read(&config(&missing, Some("t"), None)).is_err());
        assert!(!missing.exists());
        // The table is still there, unchanged (read-only).
        let db = rusqlite::Connection::open(&path).unwrap();
        let n: i64 = db
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 4);
    }

    #[test]
    fn a_sqlite_database_locked_for_more_than_a_second_is_refused_and_read_once_free() {
        let (_dir, path) = sqlite(
            "PRAGMA journal_mode = DELETE; CREATE TABLE t (series TEXT, max REAL); INSERT INTO t VALUES ('s', 1);",
        );
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch("BEGIN EXCLUSIVE; INSERT INTO t VALUES ('s2', 2);")
            .unwrap();
        let err = Table::read(&config(&path, Some("t"), None)).unwrap_err();
        assert!(err.contains("locked"), "{err}");
        writer.execute_batch("COMMIT").unwrap();
        assert_eq!(
            Table::read(&config(&path, Some("t"), None)).unwrap().len(),
            2
        );
    }
}
