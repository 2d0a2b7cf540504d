//! The twin value index of the SQLite engine: every scalar member under a twin's tags and
//! desired and reported properties is a row of `twin_values`, keyed by (path, type, value,
//! identity), so a query condition on such a member reads the identities that hold the value
//! instead of every twin's JSON. It is written by the same write job as the twin itself
//! (`sqlite_twins`, and the deletes in `sqlite`), so index and documents commit together, and
//! filled from the stored twins the first time a database from before it is opened.
//!
//! Its own table and its own creation step, apart from `SCHEMA`, so that it can be dropped or
//! rebuilt without touching anything else.

use std::collections::BTreeSet;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::SqlResult;

/// `value` has no declared type on purpose: a column without one has no affinity, so SQLite
/// keeps each value as bound (a declared `ANY` or `NUMERIC` would turn the string `'3'` into
/// the number 3). `vtype` keeps booleans, numbers and strings apart whatever SQLite's own
/// ordering of storage classes; the primary key is the only index, and the writes find their
/// rows by it (from the old document), so no second index by identity is needed.
const TABLE_SQL: &str = "CREATE TABLE twin_values (
    path      TEXT NOT NULL,
    vtype     INTEGER NOT NULL,
    value     NOT NULL,
    device_id TEXT NOT NULL,
    module_id TEXT NOT NULL,
    PRIMARY KEY (path, vtype, value, device_id, module_id)
) WITHOUT ROWID";

/// `vtype` of the mark a twin gets instead of its values when it has more than the index
/// keeps (see the limits below): such twins are candidates of every index lookup.
pub(crate) const VTYPE_OVERFLOW: i64 = 0;
pub(crate) const VTYPE_BOOL: i64 = 1;
pub(crate) const VTYPE_NUMBER: i64 = 2;
pub(crate) const VTYPE_STRING: i64 = 3;

/// Values one twin puts in the index. IoT Hub bounds tags and each properties section to
/// 32 KB and nesting to 10 levels; a fleet's twins hold tens of members, so a twin past this is
/// unusual and costs only being read by every indexed query.
const MAX_VALUES: usize = 256;
/// Longest string value (bytes) indexed: longer ones are rarely compared for equality, and
/// would make index entries as large as the twins.
const MAX_TEXT: usize = 512;
/// Longest encoded path (bytes) indexed.
const MAX_PATH: usize = 512;
/// Deepest member indexed; the walk stops there, so a corrupt document cannot exhaust the
/// stack.
const MAX_DEPTH: usize = 16;

/// A value as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Overflow,
    Bool(bool),
    Int(i64),
    /// The bits of an `f64`: numbers that are not `i64` (fractions, above `i64::MAX`).
    Real(u64),
    Text(String),
}

impl Key {
    fn vtype(&self) -> i64 {
        match self {
            Key::Overflow => VTYPE_OVERFLOW,
            Key::Bool(_) => VTYPE_BOOL,
            Key::Int(_) | Key::Real(_) => VTYPE_NUMBER,
            Key::Text(_) => VTYPE_STRING,
        }
    }

    fn sql(&self) -> SqlValue {
        match self {
            Key::Overflow => SqlValue::Integer(0),
            Key::Bool(b) => SqlValue::Integer(i64::from(*b)),
            Key::Int(i) => SqlValue::Integer(*i),
            Key::Real(bits) => SqlValue::Real(f64::from_bits(*bits)),
            Key::Text(s) => SqlValue::Text(s.clone()),
        }
    }
}

/// One row of the index for one twin: the member's path (see [`encode_path`]) and its value.
pub(crate) type Entry = (String, Key);

/// The `path` column of a member at `segments` in the stored document (from its root,
/// `["twin", "tags", ...]`): the segments as a JSON array, unambiguous whatever the names
/// hold.
pub(crate) fn encode_path(segments: &[String]) -> String {
    serde_json::to_string(segments).unwrap_or_default()
}

/// Whether the index holds the member at `segments` (a stored document path): scalars under
/// tags and the two properties sections, not `$version` or `$metadata`.
pub(crate) fn indexed(segments: &[String]) -> bool {
    ferrohub_store::query::is_member_path(segments)
}

/// The parts of a stored twin document the index reads; everything else (`$metadata`,
/// versions, the model id) is skipped without being built.
#[derive(Deserialize)]
struct Doc {
    twin: TwinPart,
}

#[derive(Deserialize)]
struct TwinPart {
    #[serde(default)]
    tags: Map<String, Value>,
    #[serde(default)]
    desired: Option<SectionPart>,
    #[serde(default)]
    reported: Option<SectionPart>,
}

#[derive(Deserialize)]
struct SectionPart {
    #[serde(default)]
    props: Map<String, Value>,
}

struct Walk {
    out: BTreeSet<Entry>,
    overflow: bool,
}

impl Walk {
    fn object(&mut self, path: &mut Vec<String>, members: &Map<String, Value>) {
        if path.len() >= MAX_DEPTH {
            self.overflow = true;
            return;
        }
        for (name, v) in members {
            if self.overflow {
                return;
            }
            path.push(name.clone());
            self.value(path, v);
            path.pop();
        }
    }

    fn value(&mut self, path: &mut Vec<String>, v: &Value) {
        let key = match v {
            Value::Object(m) => return self.object(path, m),
            // Neither is ever compared by a prefilter: arrays are not primitives, and a
            // condition on null is not pushed down.
            Value::Array(_) | Value::Null => return,
            Value::Bool(b) => Key::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.is_f64(), n.as_f64()) {
                (Some(i), _, _) => Key::Int(i),
                (None, true, Some(f)) if !(f == 0.0 && f.is_sign_negative()) => {
                    Key::Real(f.to_bits())
                }
                // An integer above i64::MAX would be a lossy REAL, and SQLite takes -0.0 for
                // 0.0: a GROUP BY over the index could not give either back as the document
                // has it (the evaluator groups -0.0 apart).
                _ => {
                    self.overflow = true;
                    return;
                }
            },
            Value::String(s) if s.len() > MAX_TEXT => {
                self.overflow = true;
                return;
            }
            Value::String(s) => Key::Text(s.clone()),
        };
        let p = encode_path(path);
        if p.len() > MAX_PATH || self.out.len() >= MAX_VALUES {
            self.overflow = true;
            return;
        }
        self.out.insert((p, key));
    }
}

/// The index rows of a stored twin document (none for `None`). A twin past the limits, or
/// one that does not parse, gets only the overflow mark, which makes it a candidate of every
/// lookup: the index never leaves out a twin it cannot describe.
pub(crate) fn entries(doc: Option<&str>) -> BTreeSet<Entry> {
    let Some(doc) = doc else {
        return BTreeSet::new();
    };
    let overflow = || BTreeSet::from([(String::new(), Key::Overflow)]);
    let Ok(doc) = serde_json::from_str::<Doc>(doc) else {
        return overflow();
    };
    let mut walk = Walk {
        out: BTreeSet::new(),
        overflow: false,
    };
    let sections = [
        (["twin", "desired", "props"], doc.twin.desired.as_ref()),
        (["twin", "reported", "props"], doc.twin.reported.as_ref()),
    ];
    let mut path = vec!["twin".to_string(), "tags".to_string()];
    walk.object(&mut path, &doc.twin.tags);
    for (root, section) in sections {
        if let Some(section) = section {
            let mut path: Vec<String> = root.iter().map(|s| s.to_string()).collect();
            walk.object(&mut path, &section.props);
        }
    }
    if walk.overflow {
        return overflow();
    }
    walk.out
}

/// Brings the index of one twin from what `old` held to what `new` holds (`None`: no twin),
/// touching only the rows that differ: a reported patch that changes one property rewrites one
/// row. Runs inside the caller's write job.
pub(crate) fn reindex(
    conn: &Connection,
    device_id: &str,
    module_id: &str,
    old: Option<&str>,
    new: Option<&str>,
) -> SqlResult<()> {
    let (old, new) = (entries(old), entries(new));
    // Deletes first: 3 and 3.0 are different entries but the same key to SQLite.
    let mut delete = conn.prepare_cached(
        "DELETE FROM twin_values WHERE path = ?1 AND vtype = ?2 AND value = ?3 \
         AND device_id = ?4 AND module_id = ?5",
    )?;
    for (path, key) in old.difference(&new) {
        delete.execute(params![path, key.vtype(), key.sql(), device_id, module_id])?;
    }
    // OR IGNORE: a row an older build left behind is the same row.
    let mut insert = conn.prepare_cached(
        "INSERT OR IGNORE INTO twin_values (path, vtype, value, device_id, module_id) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (path, key) in new.difference(&old) {
        insert.execute(params![path, key.vtype(), key.sql(), device_id, module_id])?;
    }
    Ok(())
}

/// Removes the index rows of the twins about to be deleted: the device's own and its
/// modules' (`module_id` `None`), or one module's. Call before the twins go.
pub(crate) fn forget(conn: &Connection, device_id: &str, module_id: Option<&str>) -> SqlResult<()> {
    let twins: Vec<(String, String)> = match module_id {
        None => conn
            .prepare_cached("SELECT module_id, doc FROM twins WHERE device_id = ?1")?
            .query_map(params![device_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?,
        Some(m) => conn
            .prepare_cached(
                "SELECT module_id, doc FROM twins WHERE device_id = ?1 AND module_id = ?2",
            )?
            .query_map(params![device_id, m], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?,
    };
    for (module, doc) in twins {
        reindex(conn, device_id, &module, Some(&doc), None)?;
    }
    Ok(())
}

/// Creates the index on a database that has none and fills it from the stored twins, in one
/// transaction: a crash half-way leaves no table, and the next open starts over. Runs on the
/// writer connection at open, before anything else writes.
pub(crate) fn ensure(conn: &Connection) -> SqlResult<()> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'twin_values')",
        [],
        |r| r.get(0),
    )?;
    if exists {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(TABLE_SQL)?;
    let mut twins = 0u64;
    {
        let mut stmt = tx.prepare("SELECT device_id, module_id, doc FROM twins")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (device, module, doc): (String, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            reindex(&tx, &device, &module, None, Some(&doc))?;
            twins += 1;
        }
    }
    tx.commit()?;
    if twins > 0 {
        tracing::info!(
            twins,
            ms = started.elapsed().as_millis() as u64,
            "built the twin value index from the stored twins"
        );
    }
    Ok(())
}

/// The smallest string above every string that starts with `prefix`, if there is one: its
/// last character that can grow, grown, and what follows dropped. UTF-8 sorts bytewise in code
/// point order, so `[prefix, end)` is exactly the strings with the prefix.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        let mut n = u32::from(c) + 1;
        if n == 0xD800 {
            n = 0xE000;
        }
        if let Some(next) = char::from_u32(n) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(tags: Value, reported: Value) -> String {
        serde_json::json!({
            "twin": {
                "version": 3,
                "tags": tags,
                "desired": {"props": {"d": 1}, "version": 2, "metadata": {"d": {"$lastUpdated": "x"}}},
                "reported": {"props": reported, "version": 4, "metadata": {}},
            },
            "modelId": null,
        })
        .to_string()
    }

    fn paths(e: &BTreeSet<Entry>) -> Vec<(String, Key)> {
        e.iter().cloned().collect()
    }

    #[test]
    fn scalars_under_tags_and_properties_are_entries_and_metadata_is_not() {
        let e = entries(Some(&doc(
            serde_json::json!({"site": "b", "floor": 3, "f": 2.5, "on": true, "n": null,
                               "list": [1, 2], "o": {"team": "t"}}),
            serde_json::json!({"r": 0.5}),
        )));
        let s = |p: &[&str]| encode_path(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            paths(&e),
            vec![
                (s(&["twin", "desired", "props", "d"]), Key::Int(1)),
                (
                    s(&["twin", "reported", "props", "r"]),
                    Key::Real(0.5f64.to_bits())
                ),
                (s(&["twin", "tags", "f"]), Key::Real(2.5f64.to_bits())),
                (s(&["twin", "tags", "floor"]), Key::Int(3)),
                (s(&["twin", "tags", "o", "team"]), Key::Text("t".into())),
                (s(&["twin", "tags", "on"]), Key::Bool(true)),
                (s(&["twin", "tags", "site"]), Key::Text("b".into())),
            ]
        );
    }

    #[test]
    fn a_twin_past_the_limits_or_unreadable_is_marked_instead() {
        let overflow = vec![(String::new(), Key::Overflow)];
        let many: Map<String, Value> = (0..=MAX_VALUES)
            .map(|i| (format!("k{i}"), Value::from(i)))
            .collect();
        assert_eq!(
            paths(&entries(Some(&doc(
                Value::Object(many),
                serde_json::json!({})
            )))),
            overflow
        );
        let long = "x".repeat(MAX_TEXT + 1);
        assert_eq!(
            paths(&entries(Some(&doc(
                serde_json::json!({ "s": long }),
                serde_json::json!({})
            )))),
            overflow
        );
        let mut deep = Value::from(1);
        for _ in 0..MAX_DEPTH {
            deep = serde_json::json!({ "x": deep });
        }
        assert_eq!(
            paths(&entries(Some(&doc(deep, serde_json::json!({}))))),
            overflow
        );
        assert_eq!(
            paths(&entries(Some(&doc(
                serde_json::json!({}),
                serde_json::json!({ "big": 18446744073709551615u64 })
            )))),
            overflow
        );
        assert_eq!(paths(&entries(Some("not json"))), overflow);
        assert!(entries(None).is_empty());
    }

    #[test]
    fn prefix_ends_bound_exactly_the_strings_with_the_prefix() {
        assert_eq!(prefix_end("abc").as_deref(), Some("abd"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end(""), None);
        let end = prefix_end("ab").unwrap_or_default();
        for s in ["ab", "ab\u{10FFFF}\u{10FFFF}", "abzzz"] {
            assert!(s >= "ab" && s < end.as_str(), "{s}");
        }
        for s in ["aa\u{10FFFF}", "ac", "b"] {
            assert!(!(s >= "ab" && s < end.as_str()), "{s}");
        }
    }

    use crate::sqlite::SqliteStore;
    use ferrohub_store::query::{
        CompareOp, Field, Prefilter, QueryStore, Scalar, ScanKind, TwinScan,
    };
    use ferrohub_store::testsuite::device;
    use ferrohub_store::{IfMatch, Module, RegistryStore, Result, TwinStore};

    type Row = (String, i64, String, String, String);

    /// Every index row, values as their debug text (SQLite values have no order of their own).
    async fn rows(store: &SqliteStore) -> Result<Vec<Row>> {
        store
            .read(|conn| {
                let mut stmt = conn
                    .prepare("SELECT path, vtype, value, device_id, module_id FROM twin_values")?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        format!("{:?}", r.get::<_, SqlValue>(2)?),
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })?;
                let mut out: Vec<Row> = rows.collect::<rusqlite::Result<_>>()?;
                out.sort();
                Ok(out)
            })
            .await
    }

    fn expected(twins: &[(&str, &str, &str)]) -> Vec<Row> {
        let mut out: Vec<Row> = twins
            .iter()
            .flat_map(|(d, m, doc)| {
                entries(Some(doc)).into_iter().map(move |(path, key)| {
                    (
                        path,
                        key.vtype(),
                        format!("{:?}", key.sql()),
                        d.to_string(),
                        m.to_string(),
                    )
                })
            })
            .collect();
        out.sort();
        out
    }

    fn site(site: &str, floor: Value) -> String {
        doc(
            serde_json::json!({"site": site, "floor": floor}),
            serde_json::json!({"t": 1.5}),
        )
    }

    #[tokio::test]
    async fn the_index_follows_every_twin_write_and_delete() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        store.create_device(device("d1")).await?;
        store
            .create_module(Module {
                module_id: "m1".into(),
                device_id: "d1".into(),
                ..Default::default()
            })
            .await?;
        let (a, b, m) = (
            site("a", 3.into()),
            site("b", 3.0.into()),
            site("a", "3".into()),
        );
        store.put_twin("d1", None, a.clone(), None).await?;
        assert_eq!(rows(&store).await?, expected(&[("d1", "", a.as_str())]));
        // A failed conditional write changes nothing.
        assert!(store
            .put_twin("d1", None, b.clone(), Some(7))
            .await
            .is_err());
        assert_eq!(rows(&store).await?, expected(&[("d1", "", a.as_str())]));
        // 3 becomes 3.0, which SQLite holds for the same key: replaced, not lost.
        store.put_twin("d1", None, b.clone(), Some(1)).await?;
        store.put_twin("d1", Some("m1"), m.clone(), None).await?;
        assert_eq!(
            rows(&store).await?,
            expected(&[("d1", "", b.as_str()), ("d1", "m1", m.as_str())])
        );
        store.delete_module("d1", "m1", IfMatch::Any).await?;
        assert_eq!(rows(&store).await?, expected(&[("d1", "", b.as_str())]));
        store.put_twin("d1", Some("m1"), m.clone(), None).await?;
        store.delete_device("d1", IfMatch::Any).await?;
        assert_eq!(rows(&store).await?, Vec::<Row>::new());
        Ok(())
    }

    #[tokio::test]
    async fn a_database_from_before_the_index_gets_it_on_open() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let twins: Vec<(String, String)> = (0..50)
            .map(|i| (format!("d{i:02}"), site(&format!("s{}", i % 5), i.into())))
            .collect();
        {
            let store = SqliteStore::open(dir.path())?;
            for (id, doc) in &twins {
                store.create_device(device(id)).await?;
                store.put_twin(id, None, doc.clone(), None).await?;
            }
            store
                .write(|conn| {
                    conn.execute_batch("DROP TABLE twin_values")?;
                    Ok(())
                })
                .await?;
        }
        let store = SqliteStore::open(dir.path())?;
        let all: Vec<(&str, &str, &str)> = twins
            .iter()
            .map(|(id, doc)| (id.as_str(), "", doc.as_str()))
            .collect();
        assert_eq!(rows(&store).await?, expected(&all));
        let found = store
            .scan_twins(&TwinScan {
                kind: ScanKind::Devices,
                filter: Prefilter::Compare(
                    Field::Twin(vec!["twin".into(), "tags".into(), "site".into()]),
                    CompareOp::Eq,
                    Scalar::Str("s3".into()),
                ),
                after: Some(("d20".into(), String::new())),
                limit: 3,
                with_twins: false,
            })
            .await?;
        let ids: Vec<String> = found.iter().map(|r| r.key().0).collect();
        assert_eq!(ids, ["d23", "d28", "d33"]);
        Ok(())
    }
}
