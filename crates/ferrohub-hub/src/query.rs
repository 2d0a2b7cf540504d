//! `POST /devices/query` as the hub runs it: parse (`ferrohub_iothub::query`), plan (the
//! condition's sieve becomes a store [`Prefilter`] over the stored records), scan the store in
//! key order page by page, build each row's twin document as `GET /twins` shows it, and run
//! the full condition and projection over it (`devices.jobs` reads the job store's device
//! rows instead). Continuation tokens carry the last key returned, so a page costs what it returns (plus one look-ahead match), not the registry.

use std::collections::HashMap;

use base64::Engine;
use ferrohub_iothub::query::{self, BinaryOp, Collection, Query, Select, Sieve};
use ferrohub_iothub::Identity;
use ferrohub_store::query::{
    is_member_path, CompareOp, Field, Prefilter, Scalar, ScanKind, ScannedIdentity, TwinRow,
    TwinScan,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::info;

use crate::error::HubError;
use crate::twins::StoredDoc;
use crate::Hub;

/// Results per page when the client does not say (`x-ms-max-item-count`), as IoT Hub.
pub const DEFAULT_PAGE: usize = 100;
/// The most results one page holds, whatever the client asks.
pub const MAX_PAGE: usize = 1000;
/// Rows read from the store per scan: bounds what a query holds in memory at once.
const SCAN_BATCH: usize = 1000;

/// What the items of a page are, as `x-ms-item-type` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    Twin,
    DeviceJob,
    Raw,
}

impl ItemType {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemType::Twin => "twin",
            ItemType::DeviceJob => "deviceJob",
            ItemType::Raw => "raw",
        }
    }
}

/// One page of query results.
#[derive(Debug, Clone)]
pub struct QueryPage {
    pub items: Vec<Value>,
    pub item_type: ItemType,
    /// The token for the next page; `None` when this page is the last.
    pub continuation: Option<String>,
}

/// What a continuation token holds (base64url JSON, opaque to clients).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    /// The key of the last row returned (row queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<(String, String)>,
    /// Results returned so far (for `TOP`), or the offset into the rows of an aggregate query.
    #[serde(default)]
    n: u64,
}

impl Cursor {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(token: &str) -> Result<Cursor, HubError> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                info!(
                    error_code = 400004,
                    "query refused: the continuation token is not valid"
                );
                HubError::argument("the continuation token is not valid")
            })
    }
}

/// Which parts of a row the query reads, so a scan skips what it does not.
struct Needs {
    twin: bool,
    c2d: bool,
}

fn needs(q: &Query) -> Needs {
    if q.select == Select::All {
        return Needs {
            twin: true,
            c2d: true,
        };
    }
    let firsts: Vec<&str> = q
        .paths()
        .iter()
        .filter_map(|p| p.segments.first().map(String::as_str))
        .collect();
    Needs {
        twin: firsts
            .iter()
            .any(|f| matches!(*f, "tags" | "properties" | "version" | "etag" | "modelId")),
        c2d: firsts.contains(&"cloudToDeviceMessageCount"),
    }
}

/// Where a twin document's path is kept in the stored records, when a store can look at it
/// there with the same value.
fn field_of(segments: &[String], from: Collection) -> Option<Field> {
    let rest = |n: usize| segments[n..].to_vec();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    Some(match s.as_slice() {
        ["deviceId"] => Field::DeviceId,
        ["moduleId"] if from == Collection::Modules => Field::ModuleId,
        ["tags", _, ..] => Field::Twin([vec!["twin".into(), "tags".into()], rest(1)].concat()),
        ["properties", section @ ("desired" | "reported"), "$version"] => {
            Field::Twin(vec!["twin".into(), (*section).into(), "version".into()])
        }
        ["properties", section @ ("desired" | "reported"), first, ..]
            if !first.starts_with('$') =>
        {
            Field::Twin(
                [
                    vec!["twin".into(), (*section).into(), "props".into()],
                    rest(2),
                ]
                .concat(),
            )
        }
        ["version"] => Field::Twin(vec!["twin".into(), "version".into()]),
        ["status"] if from == Collection::Devices => Field::Identity(vec!["status".into()]),
        ["capabilities", "iotEdge"] if from == Collection::Devices => {
            Field::Identity(vec!["capabilities".into(), "iotEdge".into()])
        }
        ["authenticationType"] => Field::Identity(vec!["authentication".into(), "type".into()]),
        _ => return None,
    })
}

fn scalar_of(v: &Value) -> Option<Scalar> {
    Some(match v {
        Value::String(s) => Scalar::Str(s.clone()),
        Value::Bool(b) => Scalar::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Scalar::Int(i),
            None => Scalar::Float(n.as_f64()?),
        },
        _ => return None,
    })
}

/// The store prefilter of a sieve: each leaf the store can check, `All` for the rest (which
/// keeps it a superset of the matches).
pub(crate) fn prefilter(s: &Sieve, from: Collection) -> Prefilter {
    match s {
        Sieve::All => Prefilter::All,
        Sieve::And(parts) => Prefilter::And(parts.iter().map(|p| prefilter(p, from)).collect()),
        Sieve::Or(parts) => {
            let parts: Vec<Prefilter> = parts.iter().map(|p| prefilter(p, from)).collect();
            if parts.contains(&Prefilter::All) {
                Prefilter::All
            } else {
                Prefilter::Or(parts)
            }
        }
        Sieve::Compare(path, op, v) => {
            let op = match op {
                BinaryOp::Eq => CompareOp::Eq,
                BinaryOp::Lt => CompareOp::Lt,
                BinaryOp::Le => CompareOp::Le,
                BinaryOp::Gt => CompareOp::Gt,
                BinaryOp::Ge => CompareOp::Ge,
                _ => return Prefilter::All,
            };
            match (field_of(&path.segments, from), scalar_of(v)) {
                (Some(f), Some(c)) => Prefilter::Compare(f, op, c),
                _ => Prefilter::All,
            }
        }
        Sieve::StartsWith(path, prefix) => match field_of(&path.segments, from) {
            Some(f) => Prefilter::StartsWith(f, prefix.clone()),
            None => Prefilter::All,
        },
        Sieve::Defined(path) => match field_of(&path.segments, from) {
            Some(f) => Prefilter::Defined(f),
            None => Prefilter::All,
        },
    }
}

/// The most conditions a prefilter hands the store.
const MAX_PREFILTER_LEAVES: usize = 64;

fn leaves(f: &Prefilter) -> usize {
    match f {
        Prefilter::All => 0,
        Prefilter::And(p) | Prefilter::Or(p) => p.iter().map(leaves).sum(),
        _ => 1,
    }
}

/// A parsed query with its plan.
struct Plan {
    query: Query,
    kind: Option<ScanKind>,
    filter: Prefilter,
    needs: Needs,
}

impl Plan {
    fn new(text: &str) -> Result<Plan, HubError> {
        let query = query::parse(text).map_err(|e| {
            info!(error = %e, error_code = 400004, "query refused");
            HubError::argument(e.to_string())
        })?;
        let kind = match query.from {
            Collection::Devices => Some(ScanKind::Devices),
            Collection::Modules => Some(ScanKind::Modules),
            // Device job rows come from the job store (`Hub::fetch`).
            Collection::Jobs => None,
        };
        let filter = match &query.condition {
            Some(c) => prefilter(&query::sieve(c), query.from),
            None => Prefilter::All,
        };
        // A store turns each leaf into SQL (or the like) with its own limits on expression
        // depth and parameters; past this many, scanning without a prefilter is the safe plan.
        let filter = if leaves(&filter) > MAX_PREFILTER_LEAVES {
            Prefilter::All
        } else {
            filter
        };
        let needs = needs(&query);
        Ok(Plan {
            query,
            kind,
            filter,
            needs,
        })
    }

    /// The store fields of a `GROUP BY` the store can count by itself, with the scan kind:
    /// no condition, and every grouped path one the store keeps with the value the hub shows
    /// (a member of the tags or properties, or of the identity record), none inside another
    /// (the group's key document could not hold both). Whether the projections only count is
    /// the aggregator's to say.
    fn counted_fields(&self) -> Option<(ScanKind, Vec<Field>)> {
        let kind = self.kind?;
        if self.query.condition.is_some() {
            return None;
        }
        let paths = &self.query.group_by;
        for (n, a) in paths.iter().enumerate() {
            for b in &paths[n + 1..] {
                let nested =
                    a.segments.starts_with(&b.segments) || b.segments.starts_with(&a.segments);
                if a != b && nested {
                    return None;
                }
            }
        }
        let fields = paths
            .iter()
            .map(|p| {
                field_of(&p.segments, self.query.from).filter(|f| match f {
                    // `$version` and the like read as a default when no twin is stored, which
                    // the store does not know.
                    Field::Twin(stored) => is_member_path(stored),
                    Field::DeviceId | Field::ModuleId | Field::Identity(_) => true,
                })
            })
            .collect::<Option<Vec<Field>>>()?;
        Some((kind, fields))
    }

    fn item_type(&self) -> ItemType {
        match (&self.query.select, self.query.from) {
            (Select::All, Collection::Jobs) => ItemType::DeviceJob,
            (Select::All, _) => ItemType::Twin,
            _ => ItemType::Raw,
        }
    }
}

impl Hub {
    /// One page of a query's results: at most `max_items` (1 to [`MAX_PAGE`]), from the
    /// position `continuation` names (a token from the previous page). Reads only what
    /// writes completed before each page's scans started.
    pub async fn query(
        &self,
        text: &str,
        max_items: usize,
        continuation: Option<&str>,
    ) -> Result<QueryPage, HubError> {
        let plan = Plan::new(text)?;
        let cursor = match continuation.filter(|t| !t.trim().is_empty()) {
            Some(t) => Cursor::decode(t)?,
            None => Cursor::default(),
        };
        let page = max_items.clamp(1, MAX_PAGE);
        if plan.query.is_aggregate() {
            self.aggregate_page(&plan, page, cursor).await
        } else {
            self.row_page(&plan, page, cursor).await
        }
    }

    async fn scan(
        &self,
        plan: &Plan,
        kind: ScanKind,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<TwinRow>, HubError> {
        let scan = TwinScan {
            kind,
            filter: plan.filter.clone(),
            after,
            limit,
            with_twins: plan.needs.twin,
        };
        self.store
            .scan_twins(&scan)
            .await
            .map_err(|e| HubError::internal("query scan", e))
    }

    /// Up to `limit` rows after `after` as documents the condition runs over, and whether
    /// the source is exhausted: twins for `devices` and `devices.modules`, device job rows
    /// for `devices.jobs` (only one job's when the condition fixes `jobId`).
    async fn fetch(
        &self,
        plan: &Plan,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<(Vec<((String, String), Value)>, bool), HubError> {
        if let Some(kind) = plan.kind {
            let rows = self.scan(plan, kind, after, limit).await?;
            let exhausted = rows.len() < limit;
            return Ok((self.documents(plan, rows).await?, exhausted));
        }
        let job = plan
            .query
            .condition
            .as_ref()
            .and_then(|c| fixed_job_id(&query::sieve(c)));
        let rows = self
            .store
            .scan_device_jobs(job.as_deref(), after, limit)
            .await
            .map_err(|e| HubError::internal("query device jobs", e))?;
        let exhausted = rows.len() < limit;
        let docs = rows
            .into_iter()
            .map(|r| {
                let doc = serde_json::from_str(&r.doc).unwrap_or(Value::Null);
                ((r.job_id, r.device_id), doc)
            })
            .collect();
        Ok((docs, exhausted))
    }

    /// The twin documents of scanned rows, as `GET /twins` shows them (only the parts the
    /// query reads).
    async fn documents(
        &self,
        plan: &Plan,
        rows: Vec<TwinRow>,
    ) -> Result<Vec<((String, String), Value)>, HubError> {
        let mut counts: HashMap<String, u64> = HashMap::new();
        if plan.needs.c2d {
            let ids: Vec<&str> = rows
                .iter()
                .filter_map(|r| match &r.identity {
                    ScannedIdentity::Device(d) => Some(d.device_id.as_str()),
                    ScannedIdentity::Module(_) => None,
                })
                .collect();
            if !ids.is_empty() {
                counts = self
                    .store
                    .c2d_counts(&ids)
                    .await
                    .map_err(|e| HubError::internal("query c2d counts", e))?;
            }
        }
        let now = crate::timefmt::now_iso();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key = row.key();
            let (identity, c2d) = match &row.identity {
                ScannedIdentity::Device(d) => (
                    Identity::device(&d.device_id),
                    plan.needs
                        .c2d
                        .then(|| counts.get(&d.device_id).copied().unwrap_or(0)),
                ),
                ScannedIdentity::Module(m) => {
                    let id = Identity::module(&m.device_id, &m.module_id);
                    let c2d = if plan.needs.c2d {
                        Some(
                            self.store
                                .c2d_count(&m.device_id, Some(&m.module_id))
                                .await
                                .map_err(|e| HubError::internal("query c2d count", e))?,
                        )
                    } else {
                        None
                    };
                    (id, c2d)
                }
            };
            let members = self.identity_members(&identity, &row.identity, c2d);
            let doc = if plan.needs.twin {
                let stored = StoredDoc::load(row.twin.map(|t| t.doc), &now)?;
                self.twin_json(&identity, &stored, members)
            } else {
                Value::Object(members)
            };
            out.push((key, doc));
        }
        Ok(out)
    }

    async fn row_page(
        &self,
        plan: &Plan,
        page: usize,
        cursor: Cursor,
    ) -> Result<QueryPage, HubError> {
        let item_type = plan.item_type();
        let mut room = page;
        if let Some(top) = plan.query.top {
            room = room.min(usize::try_from(top.saturating_sub(cursor.n)).unwrap_or(usize::MAX));
        }
        let mut items = Vec::new();
        let mut last = None;
        let mut more = false;
        if room > 0 {
            let mut after = cursor.k.clone();
            // Ask for one more than the page so the look-ahead usually comes in the same scan;
            // grow when the final condition throws rows away.
            let mut limit = (room + 1).clamp(16, SCAN_BATCH);
            'scan: loop {
                let (docs, exhausted) = self.fetch(plan, after.clone(), limit).await?;
                let mut rejected = false;
                for (key, doc) in docs {
                    let hit = plan
                        .query
                        .condition
                        .as_ref()
                        .is_none_or(|c| query::matches(c, &doc));
                    if hit {
                        if items.len() == room {
                            more = true;
                            break 'scan;
                        }
                        items.push(query::project(&plan.query.select, &doc));
                        last = Some(key.clone());
                    } else {
                        rejected = true;
                    }
                    after = Some(key);
                }
                if exhausted {
                    break;
                }
                if rejected {
                    limit = (limit * 4).min(SCAN_BATCH);
                }
            }
        }
        let returned = cursor.n + items.len() as u64;
        let under_top = plan.query.top.is_none_or(|t| returned < t);
        let continuation = (more && under_top).then(|| {
            Cursor {
                k: last,
                n: returned,
            }
            .encode()
        });
        Ok(QueryPage {
            items,
            item_type,
            continuation,
        })
    }

    async fn aggregate_page(
        &self,
        plan: &Plan,
        page: usize,
        cursor: Cursor,
    ) -> Result<QueryPage, HubError> {
        let mut agg = query::Aggregator::new(&plan.query);
        let counted = plan.counted_fields().filter(|_| agg.counts_only());
        if let Some((kind, fields)) = counted {
            // `SELECT <grouped paths>, COUNT() ... GROUP BY <paths>` over everything: the
            // store counts, and no twin document is built.
            let groups = self
                .store
                .group_count(kind, &fields)
                .await
                .map_err(|e| HubError::internal("query group count", e))?;
            for g in groups {
                agg.add_counted(&g.values, g.count);
            }
        } else {
            let mut after = None;
            loop {
                let (docs, exhausted) = self.fetch(plan, after.clone(), SCAN_BATCH).await?;
                for (key, doc) in docs {
                    if plan
                        .query
                        .condition
                        .as_ref()
                        .is_none_or(|c| query::matches(c, &doc))
                    {
                        agg.add(&doc);
                    }
                    after = Some(key);
                }
                if exhausted {
                    break;
                }
            }
        }
        let mut rows = agg.finish();
        if let Some(top) = plan.query.top {
            rows.truncate(usize::try_from(top).unwrap_or(usize::MAX));
        }
        let from = usize::try_from(cursor.n)
            .unwrap_or(usize::MAX)
            .min(rows.len());
        let to = from.saturating_add(page).min(rows.len());
        let continuation = (to < rows.len()).then(|| {
            Cursor {
                k: None,
                n: to as u64,
            }
            .encode()
        });
        Ok(QueryPage {
            items: rows.drain(from..to).collect(),
            item_type: ItemType::Raw,
            continuation,
        })
    }
}

/// The job id a `devices.jobs` condition requires (`jobId = 'x'`, alone or under `AND`).
fn fixed_job_id(s: &Sieve) -> Option<String> {
    match s {
        Sieve::Compare(path, BinaryOp::Eq, Value::String(id))
            if path.segments.len() == 1 && path.segments[0] == "jobId" =>
        {
            Some(id.clone())
        }
        Sieve::And(parts) => parts.iter().find_map(fixed_job_id),
        _ => None,
    }
}
