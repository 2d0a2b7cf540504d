//! [`QueryStore`] for [`SqliteStore`]: a scan is one `SELECT` over `devices` or `modules`,
//! joined with `twins` when the caller reads twins or the prefilter looks at them, with the
//! prefilter as SQL on the stored JSON (`json_extract`, `json_type`) and keyset paging on the
//! primary key. When the prefilter requires values the twin value index holds
//! (`sqlite_twin_index`) and they are rare, the statement starts from the index rows that
//! match instead of from every identity. One statement reads one snapshot of the database.

use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Row};

use crate::error::SqlResult;
use crate::sqlite::{device_from_row, module_from_row, SqliteStore};
use crate::sqlite_twin_index::{self as index, VTYPE_BOOL, VTYPE_NUMBER, VTYPE_STRING};
use ferrohub_store::query::{
    CompareOp, Field, GroupCount, Prefilter, QueryStore, Scalar, ScanKind, ScannedIdentity,
    TwinRow, TwinScan,
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

/// One lookup in the twin value index: the rows of `path` with type `vtype` and a value
/// within the bounds.
#[derive(Debug, Clone)]
struct Probe {
    path: String,
    vtype: i64,
    low: Option<(SqlValue, bool)>,
    high: Option<(SqlValue, bool)>,
}

impl Probe {
    fn equal(&self) -> bool {
        matches!((&self.low, &self.high), (Some((a, true)), Some((b, true))) if a == b)
    }
}

/// The index probes whose matches (plus the twins marked as overflowing) hold every row
/// `f` lets through, if the index can say: a leaf on an indexed twin member, an `OR` of such
/// (their union), an `AND` with one (its cheapest part, `estimate` says which).
fn probes(
    f: &Prefilter,
    estimate: &mut dyn FnMut(&[Probe]) -> SqlResult<usize>,
) -> SqlResult<Option<Vec<Probe>>> {
    Ok(match f {
        Prefilter::Compare(Field::Twin(p), op, c) if index::indexed(p) => {
            let (vtype, v) = match c {
                Scalar::Str(s) => (VTYPE_STRING, SqlValue::Text(s.clone())),
                Scalar::Int(i) => (VTYPE_NUMBER, SqlValue::Integer(*i)),
                Scalar::Float(x) => (VTYPE_NUMBER, SqlValue::Real(*x)),
                Scalar::Bool(b) if *op == CompareOp::Eq => {
                    (VTYPE_BOOL, SqlValue::Integer(i64::from(*b)))
                }
                Scalar::Bool(_) => return Ok(None),
            };
            let (low, high) = match op {
                CompareOp::Eq => (Some((v.clone(), true)), Some((v, true))),
                CompareOp::Lt => (None, Some((v, false))),
                CompareOp::Le => (None, Some((v, true))),
                CompareOp::Gt => (Some((v, false)), None),
                CompareOp::Ge => (Some((v, true)), None),
            };
            Some(vec![Probe {
                path: index::encode_path(p),
                vtype,
                low,
                high,
            }])
        }
        Prefilter::StartsWith(Field::Twin(p), prefix) if index::indexed(p) => Some(vec![Probe {
            path: index::encode_path(p),
            vtype: VTYPE_STRING,
            low: Some((SqlValue::Text(prefix.clone()), true)),
            high: index::prefix_end(prefix).map(|e| (SqlValue::Text(e), false)),
        }]),
        Prefilter::Or(parts) if !parts.is_empty() => {
            let mut out = Vec::new();
            for p in parts {
                match probes(p, estimate)? {
                    Some(mut v) => out.append(&mut v),
                    None => return Ok(None),
                }
            }
            Some(out)
        }
        Prefilter::And(parts) => {
            let mut best: Option<(usize, Vec<Probe>)> = None;
            for p in parts {
                if let Some(v) = probes(p, estimate)? {
                    let n = estimate(&v)?;
                    if best.as_ref().is_none_or(|(m, _)| n < *m) {
                        best = Some((n, v));
                    }
                }
            }
            best.map(|(_, v)| v)
        }
        _ => None,
    })
}

/// Candidates counted before an index plan gives way to the plain scan: past this, matches
/// are dense enough that the scan fills a page after a few thousand rows, while the index plan
/// of a range or union sorts all of its candidates into key order on every page.
const INDEX_CANDIDATES: usize = 4096;

/// The `WHERE` conditions of one probe, its parameters pushed.
fn probe_conds(p: &Probe, params: &mut Vec<SqlValue>) -> Vec<String> {
    let mut push = |v: SqlValue| {
        params.push(v);
        format!("?{}", params.len())
    };
    let mut conds = vec![
        format!("path = {}", push(SqlValue::Text(p.path.clone()))),
        format!("vtype = {}", push(SqlValue::Integer(p.vtype))),
    ];
    if p.equal() {
        if let Some((v, _)) = &p.low {
            conds.push(format!("value = {}", push(v.clone())));
        }
        return conds;
    }
    if let Some((v, inclusive)) = &p.low {
        let op = if *inclusive { ">=" } else { ">" };
        conds.push(format!("value {op} {}", push(v.clone())));
    }
    if let Some((v, inclusive)) = &p.high {
        let op = if *inclusive { "<=" } else { "<" };
        conds.push(format!("value {op} {}", push(v.clone())));
    }
    conds
}

/// How many index rows (and overflow marks) a set of probes finds, counted up to
/// [`INDEX_CANDIDATES`].
fn count_candidates(conn: &rusqlite::Connection, probes: &[Probe]) -> SqlResult<usize> {
    let mut total = 0usize;
    for p in probes.iter().cloned().chain([overflow_probe()]) {
        let mut params = Vec::new();
        let conds = probe_conds(&p, &mut params);
        params.push(SqlValue::Integer(INDEX_CANDIDATES as i64));
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM twin_values WHERE {} LIMIT ?{})",
            conds.join(" AND "),
            params.len()
        );
        let n: i64 = conn
            .prepare_cached(&sql)?
            .query_row(params_from_iter(params.iter()), |r| r.get(0))?;
        total = total.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
        if total >= INDEX_CANDIDATES {
            break;
        }
    }
    Ok(total)
}

fn overflow_probe() -> Probe {
    let zero = SqlValue::Integer(0);
    Probe {
        path: String::new(),
        vtype: index::VTYPE_OVERFLOW,
        low: Some((zero.clone(), true)),
        high: Some((zero, true)),
    }
}

/// The index plan of a scan, if the prefilter has one and it is cheaper than the scan: the
/// probes, and whether any twin is marked as overflowing (then those come too).
fn index_plan(
    conn: &rusqlite::Connection,
    filter: &Prefilter,
) -> SqlResult<Option<(Vec<Probe>, bool)>> {
    let mut estimate = |p: &[Probe]| count_candidates(conn, p);
    let Some(probes) = probes(filter, &mut estimate)? else {
        return Ok(None);
    };
    let overflow = count_candidates(conn, &[])? > 0;
    // One equality without overflow marks reads its rows already in key order, so it stops at
    // the page's end however many match: always the better plan.
    if probes.len() == 1 && probes[0].equal() && !overflow {
        return Ok(Some((probes, false)));
    }
    if count_candidates(conn, &probes)? >= INDEX_CANDIDATES {
        return Ok(None);
    }
    Ok(Some((probes, overflow)))
}

fn scan(conn: &rusqlite::Connection, scan: &TwinScan) -> SqlResult<Vec<TwinRow>> {
    let mut params = Vec::new();
    let plan = index_plan(conn, &scan.filter)?;
    let join = scan.with_twins || twin_fields(&scan.filter) || plan.is_some();
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
    // The index rows start the statement: each probe (and the overflow marks) a branch of a
    // union of identity keys, limited to this kind and to keys after the page's start, so an
    // equality reads only the rows it returns.
    let from = match &plan {
        None => format!("{table} i"),
        Some((probes, overflow)) => {
            let mut branches = Vec::new();
            let extra = [overflow_probe()];
            let all = probes
                .iter()
                .chain(if *overflow { &extra[..] } else { &[] });
            for p in all {
                let mut c = probe_conds(p, &mut params);
                c.push(match scan.kind {
                    ScanKind::Devices => "module_id = ''".to_string(),
                    ScanKind::Modules => "module_id <> ''".to_string(),
                });
                match (&scan.after, scan.kind) {
                    (None, _) => {}
                    (Some(_), ScanKind::Devices) => c.push("device_id > ?1".into()),
                    (Some(_), ScanKind::Modules) => {
                        c.push("(device_id, module_id) > (?1, ?2)".into())
                    }
                }
                branches.push(format!(
                    "SELECT device_id, module_id FROM twin_values WHERE {}",
                    c.join(" AND ")
                ));
            }
            let on = match scan.kind {
                ScanKind::Devices => "i.device_id = c.device_id",
                ScanKind::Modules => "i.device_id = c.device_id AND i.module_id = c.module_id",
            };
            // CROSS JOIN keeps SQLite from reordering: the candidates drive.
            format!(
                "({}) c CROSS JOIN {table} i ON {on}",
                branches.join(" UNION ")
            )
        }
    };
    let order = if plan.is_some() {
        "c.device_id, c.module_id"
    } else {
        order
    };
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
        "SELECT i.version, i.doc, {twin_cols} FROM {from} {join_sql} \
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

/// `GROUP BY` with `COUNT()` in one statement: each field as the JSON text of its value
/// (`->` gives objects, strings and numbers as JSON, so types stay apart), counted by SQLite.
/// `None` when a field has a member name SQLite's paths cannot quote.
fn group_count(
    conn: &rusqlite::Connection,
    kind: ScanKind,
    fields: &[Field],
) -> SqlResult<Option<Vec<GroupCount>>> {
    if let [Field::Twin(p)] = fields {
        if index::indexed(p) {
            if let Some(path) = json_path(p) {
                return group_count_indexed(conn, kind, p, &path).map(Some);
            }
        }
    }
    let mut params = Vec::new();
    let mut cols = Vec::new();
    let mut join = false;
    for f in fields {
        cols.push(match (f, kind) {
            (Field::DeviceId, _) => "json_quote(i.device_id)".to_string(),
            (Field::ModuleId, ScanKind::Modules) => "json_quote(i.module_id)".to_string(),
            (Field::ModuleId, ScanKind::Devices) => "NULL".to_string(),
            (Field::Identity(p) | Field::Twin(p), _) => {
                let Some(path) = json_path(p) else {
                    return Ok(None);
                };
                params.push(SqlValue::Text(path));
                let doc = if matches!(f, Field::Twin(_)) {
                    join = true;
                    "t.doc"
                } else {
                    "i.doc"
                };
                format!("{doc} -> ?{}", params.len())
            }
        });
    }
    let (table, twin_key) = match kind {
        ScanKind::Devices => ("devices", "''"),
        ScanKind::Modules => ("modules", "i.module_id"),
    };
    let join_sql = if join {
        format!("LEFT JOIN twins t ON t.device_id = i.device_id AND t.module_id = {twin_key}")
    } else {
        String::new()
    };
    let group = if cols.is_empty() {
        String::new()
    } else {
        format!(
            "GROUP BY {}",
            (1..=cols.len())
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let select: Vec<String> = cols.into_iter().chain(["count(*)".to_string()]).collect();
    let sql = format!(
        "SELECT {} FROM {table} i {join_sql} {group}",
        select.join(", ")
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(fields.len());
        for n in 0..fields.len() {
            let text: Option<String> = row.get(n)?;
            values.push(text.map(|t| serde_json::from_str(&t)).transpose()?);
        }
        let count: i64 = row.get(fields.len())?;
        let count = u64::try_from(count).unwrap_or(0);
        if count > 0 {
            out.push(GroupCount { values, count });
        }
    }
    Ok(Some(out))
}

/// `GROUP BY` one indexed member without parsing the documents that hold a scalar there:
/// those groups are counted over the member's index rows (`typeof` keeps 3 and 3.0 apart, as
/// the evaluator does), and only the rest (the member missing, null, an object or array, a
/// twin marked as overflowing, no twin) is grouped from its documents. Both statements read
/// one snapshot (one transaction).
fn group_count_indexed(
    conn: &rusqlite::Connection,
    kind: ScanKind,
    segments: &[String],
    json_path: &str,
) -> SqlResult<Vec<GroupCount>> {
    let (table, on, twin_key, key, kind_cond) = match kind {
        ScanKind::Devices => (
            "devices",
            "i.device_id = v.device_id",
            "''",
            "i.device_id",
            "v.module_id = ''",
        ),
        ScanKind::Modules => (
            "modules",
            "i.device_id = v.device_id AND i.module_id = v.module_id",
            "i.module_id",
            "(i.device_id, i.module_id)",
            "v.module_id <> ''",
        ),
    };
    let tx = conn.unchecked_transaction()?;
    let path = index::encode_path(segments);
    let mut out = Vec::new();
    {
        // Joined to the identities: a scan only counts twins whose identity exists.
        let sql = format!(
            "SELECT v.vtype, v.value, count(*) FROM twin_values v CROSS JOIN {table} i ON {on} \
             WHERE v.path = ?1 AND v.vtype > 0 AND {kind_cond} \
             GROUP BY v.vtype, v.value, typeof(v.value)"
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut rows = stmt.query(params![path])?;
        while let Some(row) = rows.next()? {
            let vtype: i64 = row.get(0)?;
            let value: SqlValue = row.get(1)?;
            let count: i64 = row.get(2)?;
            let value = match (vtype, value) {
                (VTYPE_BOOL, SqlValue::Integer(b)) => serde_json::Value::Bool(b != 0),
                (VTYPE_NUMBER, SqlValue::Integer(i)) => serde_json::Value::from(i),
                (VTYPE_NUMBER, SqlValue::Real(f)) => match serde_json::Number::from_f64(f) {
                    Some(n) => serde_json::Value::Number(n),
                    None => continue,
                },
                (VTYPE_STRING, SqlValue::Text(t)) => serde_json::Value::String(t),
                // Not written by this build's index; such a row says nothing.
                _ => continue,
            };
            out.push(GroupCount {
                values: vec![Some(value)],
                count: u64::try_from(count).unwrap_or(0),
            });
        }
    }
    {
        let v_kind = kind_cond.trim_start_matches("v.");
        let sql = format!(
            "SELECT t.doc -> ?2, count(*) FROM {table} i \
             LEFT JOIN twins t ON t.device_id = i.device_id AND t.module_id = {twin_key} \
             WHERE {key} NOT IN (SELECT {} FROM twin_values \
                 WHERE path = ?1 AND vtype > 0 AND {v_kind}) \
             GROUP BY 1",
            match kind {
                ScanKind::Devices => "device_id",
                ScanKind::Modules => "device_id, module_id",
            }
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut rows = stmt.query(params![path, json_path])?;
        while let Some(row) = rows.next()? {
            let text: Option<String> = row.get(0)?;
            let count: i64 = row.get(1)?;
            out.push(GroupCount {
                values: vec![text.map(|t| serde_json::from_str(&t)).transpose()?],
                count: u64::try_from(count).unwrap_or(0),
            });
        }
    }
    tx.commit()?;
    out.retain(|g| g.count > 0);
    Ok(out)
}

#[async_trait]
impl QueryStore for SqliteStore {
    async fn scan_twins(&self, s: &TwinScan) -> Result<Vec<TwinRow>> {
        let s = s.clone();
        self.read_blocking(move |conn| scan(conn, &s)).await
    }

    async fn group_count(&self, kind: ScanKind, fields: &[Field]) -> Result<Vec<GroupCount>> {
        let f = fields.to_vec();
        match self
            .read_blocking(move |conn| group_count(conn, kind, &f))
            .await?
        {
            Some(groups) => Ok(groups),
            None => ferrohub_store::query::group_count_by_scan(self, kind, fields).await,
        }
    }
}
