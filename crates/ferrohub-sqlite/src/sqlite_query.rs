//! [`QueryStore`] for [`SqliteStore`]: a scan is one `SELECT` over `devices` or `modules`,
//! joined with `twins` when the caller reads twins or the prefilter looks at them, with the
//! prefilter as SQL on the stored JSON (`json_extract`, `json_type`) and keyset paging on the
//! primary key. One statement reads one snapshot of the database.

use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params_from_iter, Row};

use crate::error::SqlResult;
use crate::sqlite::{device_from_row, module_from_row, SqliteStore};
use ferrohub_store::query::{
    CompareOp, Field, Prefilter, QueryStore, Scalar, ScanKind, ScannedIdentity, TwinRow, TwinScan,
};
use ferrohub_store::{Result, VersionedTwin};

/// A JSON path for SQLite's JSON functions, or `None` for member names it cannot quote.
fn json_path(segments: &[String]) -> Option<String> {
    let mut out = String::from("$");
    for s in segments {
        if s.contains(['"', '\\']) || s.chars().any(char::is_control) {
            return None;
        }
        out.push_str(".\"");
        out.push_str(s);
        out.push('"');
    }
    Some(out)
}

fn twin_fields(f: &Prefilter) -> bool {
    match f {
        Prefilter::All => false,
        Prefilter::And(p) | Prefilter::Or(p) => p.iter().any(twin_fields),
        Prefilter::Compare(field, ..)
        | Prefilter::StartsWith(field, _)
        | Prefilter::Defined(field) => {
            matches!(field, Field::Twin(_))
        }
    }
}

/// Builds the SQL of a prefilter, pushing its parameters. Anything SQL cannot express becomes
/// `1` (true), which keeps the result a superset.
struct SqlFilter<'p> {
    kind: ScanKind,
    params: &'p mut Vec<SqlValue>,
}

impl SqlFilter<'_> {
    fn param(&mut self, v: SqlValue) -> String {
        self.params.push(v);
        format!("?{}", self.params.len())
    }

    /// The SQL of a field's value and whether it is a twin field (then a row without a twin
    /// passes).
    fn field(&mut self, field: &Field) -> Option<(String, bool)> {
        Some(match field {
            Field::DeviceId => ("i.device_id".to_string(), false),
            Field::ModuleId => match self.kind {
                ScanKind::Modules => ("i.module_id".to_string(), false),
                ScanKind::Devices => return None,
            },
            Field::Identity(p) => {
                let path = self.param(SqlValue::Text(json_path(p)?));
                (format!("json_extract(i.doc, {path})"), false)
            }
            Field::Twin(p) => {
                let path = self.param(SqlValue::Text(json_path(p)?));
                (format!("json_extract(t.doc, {path})"), true)
            }
        })
    }

    fn sql(&mut self, f: &Prefilter) -> String {
        let (cond, twin) = match f {
            Prefilter::All => return "1".into(),
            Prefilter::And(parts) | Prefilter::Or(parts) if parts.is_empty() => return "1".into(),
            Prefilter::And(parts) => {
                let parts: Vec<String> = parts.iter().map(|p| self.sql(p)).collect();
                return format!("({})", parts.join(" AND "));
            }
            Prefilter::Or(parts) => {
                let parts: Vec<String> = parts.iter().map(|p| self.sql(p)).collect();
                return format!("({})", parts.join(" OR "));
            }
            Prefilter::Compare(field, op, c) => {
                let Some((expr, twin)) = self.field(field) else {
                    return "1".into();
                };
                let op = match op {
                    CompareOp::Eq => "=",
                    CompareOp::Lt => "<",
                    CompareOp::Le => "<=",
                    CompareOp::Gt => ">",
                    CompareOp::Ge => ">=",
                };
                let value = match c {
                    Scalar::Str(s) => SqlValue::Text(s.clone()),
                    Scalar::Int(i) => SqlValue::Integer(*i),
                    Scalar::Float(f) => SqlValue::Real(*f),
                    // json_extract gives JSON booleans as 1 and 0.
                    Scalar::Bool(b) => SqlValue::Integer(i64::from(*b)),
                };
                let p = self.param(value);
                let cond = format!("{expr} {op} {p}");
                match (field, op, c) {
                    // Documents are stored as serde_json writes them, so a member equal to a
                    // string holds that string's JSON text: a substring search (no parse)
                    // skips most rows before json_extract parses the document.
                    (Field::Identity(_) | Field::Twin(_), "=", Scalar::Str(s)) => {
                        let doc = if twin { "t.doc" } else { "i.doc" };
                        let quoted = serde_json::to_string(s).unwrap_or_default();
                        let q = self.param(SqlValue::Text(quoted));
                        (format!("(instr({doc}, {q}) > 0 AND {cond})"), twin)
                    }
                    _ => (cond, twin),
                }
            }
            Prefilter::StartsWith(field, prefix) => {
                if prefix.is_empty() {
                    return "1".into();
                }
                if *field == Field::DeviceId {
                    // A range on the key, so the primary key index finds the rows; no device
                    // id holds U+10FFFF, so every id with the prefix sorts below the bound.
                    let low = self.param(SqlValue::Text(prefix.clone()));
                    let high = self.param(SqlValue::Text(format!("{prefix}\u{10FFFF}")));
                    return format!("(i.device_id >= {low} AND i.device_id < {high})");
                }
                let Some((expr, twin)) = self.field(field) else {
                    return "1".into();
                };
                let n = i64::try_from(prefix.chars().count()).unwrap_or(i64::MAX);
                let len = self.param(SqlValue::Integer(n));
                let p = self.param(SqlValue::Text(prefix.clone()));
                (format!("substr({expr}, 1, {len}) = {p}"), twin)
            }
            Prefilter::Defined(field) => match field {
                Field::DeviceId | Field::ModuleId => return "1".into(),
                Field::Identity(p) | Field::Twin(p) => {
                    let Some(path) = json_path(p) else {
                        return "1".into();
                    };
                    let path = self.param(SqlValue::Text(path));
                    let twin = matches!(field, Field::Twin(_));
                    let doc = if twin { "t.doc" } else { "i.doc" };
                    (format!("json_type({doc}, {path}) IS NOT NULL"), twin)
                }
            },
        };
        if twin {
            format!("(t.doc IS NULL OR {cond})")
        } else {
            cond
        }
    }
}

fn twin_of(row: &Row<'_>) -> rusqlite::Result<Option<VersionedTwin>> {
    let doc: Option<String> = row.get(2)?;
    let version: Option<i64> = row.get(3)?;
    Ok(doc.map(|doc| VersionedTwin {
        doc,
        version: version.and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
    }))
}

fn scan(conn: &rusqlite::Connection, scan: &TwinScan) -> SqlResult<Vec<TwinRow>> {
    let mut params = Vec::new();
    let join = scan.with_twins || twin_fields(&scan.filter);
    let (table, twin_key, order) = match scan.kind {
        ScanKind::Devices => ("devices", "''", "i.device_id"),
        ScanKind::Modules => ("modules", "i.module_id", "i.device_id, i.module_id"),
    };
    let mut conds = Vec::new();
    if let Some((device, module)) = &scan.after {
        params.push(SqlValue::Text(device.clone()));
        match scan.kind {
            ScanKind::Devices => conds.push("i.device_id > ?1".to_string()),
            ScanKind::Modules => {
                params.push(SqlValue::Text(module.clone()));
                conds.push("(i.device_id, i.module_id) > (?1, ?2)".to_string());
            }
        }
    }
    conds.push(
        SqlFilter {
            kind: scan.kind,
            params: &mut params,
        }
        .sql(&scan.filter),
    );
    params.push(SqlValue::Integer(
        i64::try_from(scan.limit).unwrap_or(i64::MAX),
    ));
    let limit = params.len();
    let (twin_cols, join_sql) = if join {
        (
            "t.doc, t.version",
            format!("LEFT JOIN twins t ON t.device_id = i.device_id AND t.module_id = {twin_key}"),
        )
    } else {
        ("NULL, NULL", String::new())
    };
    let sql = format!(
        "SELECT i.version, i.doc, {twin_cols} FROM {table} i {join_sql} \
         WHERE {} ORDER BY {order} LIMIT ?{limit}",
        conds.join(" AND ")
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let version: i64 = row.get(0)?;
        let doc: String = row.get(1)?;
        let identity = match scan.kind {
            ScanKind::Devices => ScannedIdentity::Device(device_from_row(version, &doc)?),
            ScanKind::Modules => ScannedIdentity::Module(module_from_row(version, &doc)?),
        };
        let twin = if scan.with_twins { twin_of(row)? } else { None };
        out.push(TwinRow { identity, twin });
    }
    Ok(out)
}

#[async_trait]
impl QueryStore for SqliteStore {
    async fn scan_twins(&self, s: &TwinScan) -> Result<Vec<TwinRow>> {
        let s = s.clone();
        self.read_blocking(move |conn| scan(conn, &s)).await
    }
}
