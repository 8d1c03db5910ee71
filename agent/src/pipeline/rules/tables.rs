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
    /// The CSV file (with a header row).
    pub path: PathBuf,
    /// The column that holds the series ids. Default `series`.
    #[serde(default = "default_key")]
    pub key: String,
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
    rows: HashMap<String, (Row, usize)>,
}

impl Table {
    /// The row of `key`, and its line in the file.
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
            if id != "*"
                && let Some(why) = sluice_collectors::reading::series_problem(id)
            {
                return Err(at(
                    line as u64,
                    &format!("{id:?} is not a series id: {why}"),
                ));
            }
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
        Ok(Table { columns, rows })
    }
}

/// The tables of a configuration, read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tables(BTreeMap<String, Arc<Table>>);

impl Tables {
    /// Reads every table; an error starts with `tables.<name>`.
    pub fn load(configs: &BTreeMap<String, TableConfig>) -> Result<Tables, String> {
        let mut tables = BTreeMap::new();
        for (name, c) in configs {
            let table =
                Table::read_csv(&c.path, &c.key).map_err(|e| format!("tables.{name}: {e}"))?;
            tables.insert(name.clone(), Arc::new(table));
        }
        Ok(Tables(tables))
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
}
