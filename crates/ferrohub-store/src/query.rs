//! Scans of identities with their twins, for queries: in key order, from a key on, with a
//! [`Prefilter`] an engine may use to skip rows. The query language itself is not here (it is
//! `ferrohub_iothub::query`); the hub turns a query's condition into a prefilter over the
//! stored records and runs the full condition over what a scan returns.

use async_trait::async_trait;

use crate::{Device, Module, Result, VersionedTwin};

/// Which identities a scan walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanKind {
    Devices,
    Modules,
}

/// A value in the stored records a prefilter looks at. Paths are JSON member names from the
/// record's root.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    DeviceId,
    /// Only in module scans.
    ModuleId,
    /// A member of the identity's own record as stored (the `Device` or `Module` JSON).
    Identity(Vec<String>),
    /// A member of the stored twin document. A row without a stored twin passes every
    /// condition on a twin field (the hub shows such a twin with defaults), except on a
    /// member of the tags or properties ([`is_member_path`]): a twin with defaults has none,
    /// so an engine may leave such rows out there.
    Twin(Vec<String>),
}

/// A constant a field is compared with.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A condition every row the caller wants satisfies. An engine may return rows that fail it
/// (the caller filters again) but must not leave out a row that satisfies it. A comparison
/// holds only between values of the same JSON type (numbers by value, strings by code
/// point, booleans only by equality); a missing member satisfies nothing but [`Prefilter::All`].
#[derive(Debug, Clone, PartialEq)]
pub enum Prefilter {
    All,
    And(Vec<Prefilter>),
    Or(Vec<Prefilter>),
    Compare(Field, CompareOp, Scalar),
    /// A string starting with the prefix.
    StartsWith(Field, String),
    /// The member exists (any value, null included).
    Defined(Field),
}

/// One page of a scan.
#[derive(Debug, Clone)]
pub struct TwinScan {
    pub kind: ScanKind,
    pub filter: Prefilter,
    /// Only rows after this key (device id, module id; `""` for devices), in key order.
    pub after: Option<(String, String)>,
    /// At most this many rows; fewer means the scan reached the end.
    pub limit: usize,
    /// Whether the caller reads the twin documents; without, rows come with `twin: None`.
    pub with_twins: bool,
}

/// The identity record a row is about.
#[derive(Debug, Clone, PartialEq)]
pub enum ScannedIdentity {
    Device(Device),
    Module(Module),
}

/// A row of a scan, all of it read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinRow {
    pub identity: ScannedIdentity,
    /// The stored twin, when asked for and one is stored.
    pub twin: Option<VersionedTwin>,
}

impl TwinRow {
    /// The row's key as [`TwinScan::after`] takes it.
    pub fn key(&self) -> (String, String) {
        match &self.identity {
            ScannedIdentity::Device(d) => (d.device_id.clone(), String::new()),
            ScannedIdentity::Module(m) => (m.device_id.clone(), m.module_id.clone()),
        }
    }
}

/// Whether a stored twin document path is a member of the tags or of a properties section
/// (`twin.tags.*`, `twin.desired.props.*`, `twin.reported.props.*`): values a client wrote,
/// which a twin never written does not have.
pub fn is_member_path(segments: &[String]) -> bool {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    matches!(
        s.as_slice(),
        ["twin", "tags", _, ..] | ["twin", "desired" | "reported", "props", _, ..]
    )
}

/// One group of [`QueryStore::group_count`]: the fields' values (`None` where a row does not
/// have the member) and how many rows have them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupCount {
    pub values: Vec<Option<serde_json::Value>>,
    pub count: u64,
}

/// Scans of the registry joined with twins. Each call sees one consistent state of the store
/// (everything committed before it started).
#[async_trait]
pub trait QueryStore: Send + Sync + 'static {
    async fn scan_twins(&self, scan: &TwinScan) -> Result<Vec<TwinRow>>;

    /// Every row of `kind` counted by the values of `fields` (`GROUP BY` with `COUNT()` and
    /// no condition). Groups may come split (the same values in two groups, e.g. an engine
    /// grouping by text): callers add them up. Fields are those [`Prefilter`]s use, and
    /// mean the same: `Field::Twin` of a row without a stored twin is missing, so only
    /// [`is_member_path`] twin fields give what the hub shows. The default scans.
    async fn group_count(&self, kind: ScanKind, fields: &[Field]) -> Result<Vec<GroupCount>> {
        group_count_by_scan(self, kind, fields).await
    }
}

/// Rows read per scan by [`group_count_by_scan`].
const GROUP_SCAN_BATCH: usize = 1000;

/// [`QueryStore::group_count`] over [`QueryStore::scan_twins`], a batch at a time.
pub async fn group_count_by_scan<S: QueryStore + ?Sized>(
    store: &S,
    kind: ScanKind,
    fields: &[Field],
) -> Result<Vec<GroupCount>> {
    use std::collections::BTreeMap;
    let with_twins = fields.iter().any(|f| matches!(f, Field::Twin(_)));
    let mut groups: BTreeMap<String, GroupCount> = BTreeMap::new();
    let mut after = None;
    loop {
        let rows = store
            .scan_twins(&TwinScan {
                kind,
                filter: Prefilter::All,
                after: after.take(),
                limit: GROUP_SCAN_BATCH,
                with_twins,
            })
            .await?;
        for row in &rows {
            let identity = match &row.identity {
                ScannedIdentity::Device(d) => serde_json::to_value(d)?,
                ScannedIdentity::Module(m) => serde_json::to_value(m)?,
            };
            let twin: Option<serde_json::Value> = match &row.twin {
                Some(t) if with_twins => Some(serde_json::from_str(&t.doc)?),
                _ => None,
            };
            let at = |doc: &serde_json::Value, path: &[String]| {
                path.iter()
                    .try_fold(doc, |v, s| v.as_object()?.get(s))
                    .cloned()
            };
            let values: Vec<Option<serde_json::Value>> = fields
                .iter()
                .map(|f| match (f, &row.identity) {
                    (Field::DeviceId, ScannedIdentity::Device(d)) => {
                        Some(serde_json::Value::String(d.device_id.clone()))
                    }
                    (Field::DeviceId, ScannedIdentity::Module(m)) => {
                        Some(serde_json::Value::String(m.device_id.clone()))
                    }
                    (Field::ModuleId, ScannedIdentity::Module(m)) => {
                        Some(serde_json::Value::String(m.module_id.clone()))
                    }
                    (Field::ModuleId, ScannedIdentity::Device(_)) => None,
                    (Field::Identity(p), _) => at(&identity, p),
                    (Field::Twin(p), _) => twin.as_ref().and_then(|t| at(t, p)),
                })
                .collect();
            let key = serde_json::to_string(&values)?;
            groups
                .entry(key)
                .or_insert_with(|| GroupCount { values, count: 0 })
                .count += 1;
        }
        if rows.len() < GROUP_SCAN_BATCH {
            break;
        }
        after = rows.last().map(TwinRow::key);
    }
    Ok(groups.into_values().collect())
}

/// Whether a stored JSON value satisfies a comparison, by the prefilter rules; shared by the
/// engines that evaluate prefilters in Rust.
pub fn compare_json(value: &serde_json::Value, op: CompareOp, scalar: &Scalar) -> bool {
    use serde_json::Value;
    use std::cmp::Ordering;
    let ord = match (value, scalar) {
        (Value::String(s), Scalar::Str(c)) => s.as_str().cmp(c.as_str()),
        (Value::Number(n), Scalar::Int(c)) => match n.as_i64() {
            Some(i) => i.cmp(c),
            None => match n.as_f64().and_then(|f| f.partial_cmp(&(*c as f64))) {
                Some(o) => o,
                None => return false,
            },
        },
        (Value::Number(n), Scalar::Float(c)) => match n.as_f64().and_then(|f| f.partial_cmp(c)) {
            Some(o) => o,
            None => return false,
        },
        (Value::Bool(b), Scalar::Bool(c)) => {
            return op == CompareOp::Eq && b == c;
        }
        _ => return false,
    };
    match op {
        CompareOp::Eq => ord == Ordering::Equal,
        CompareOp::Lt => ord == Ordering::Less,
        CompareOp::Le => ord != Ordering::Greater,
        CompareOp::Gt => ord == Ordering::Greater,
        CompareOp::Ge => ord != Ordering::Less,
    }
}
