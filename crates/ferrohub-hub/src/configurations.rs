//! Configurations (IoT Hub's automatic device management): their lifecycle under etags, the
//! apply pass that writes a configuration's content into the desired properties of the twins
//! its target condition matches (the highest priority winning), and their metrics.
//!
//! Conditions and metric queries run on the query engine (`query.rs`), paged, so a pass never
//! holds the registry in memory. A pass runs when a configuration is created or updated
//! (before the API answers), and for one device when its twin's tags or desired properties
//! change through the service API or when it is created. Which configuration was applied to
//! each device is kept in the store, so `appliedCount` and "apply once" survive restarts.

use std::collections::BTreeMap;

use ferrohub_iothub::query::{self, Query};
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::{IfMatch, StoreError, StoredConfiguration};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::error::HubError;
use crate::query::MAX_PAGE;
use crate::{timefmt, Hub};

/// IoT Hub's limit on configurations per hub (automatic device management quotas).
pub const MAX_CONFIGURATIONS: usize = 100;
/// What `GET /configurations` returns when the client names no `top`, and at most.
pub const DEFAULT_TOP: usize = MAX_CONFIGURATIONS;
/// The longest configuration id IoT Hub accepts.
const MAX_ID_LEN: usize = 128;
/// How often the backstop pass runs: IoT Hub runs configurations "shortly after the
/// configuration is created and then at five minute intervals" (automatic device management
/// docs), which also catches what no event here announces (a reported property a condition
/// reads, a bulk import, a crash between a twin write and its record).
pub const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);
/// The only schema version IoT Hub has.
pub const SCHEMA_VERSION: &str = "1.0";

/// A configuration as the REST API carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Configuration {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub schema_version: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub content: Option<ConfigurationContent>,
    #[serde(default)]
    pub target_condition: Option<String>,
    #[serde(default)]
    pub created_time_utc: Option<String>,
    #[serde(default)]
    pub last_updated_time_utc: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub system_metrics: Option<ConfigurationMetrics>,
    #[serde(default)]
    pub metrics: Option<ConfigurationMetrics>,
    #[serde(default)]
    pub etag: Option<String>,
}

/// What a configuration writes: `deviceContent` to device twins, `moduleContent` to module
/// twins, `modulesContent` (IoT Edge deployments) to edge modules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationContent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_content: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_content: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_content: Option<Map<String, Value>>,
}

/// Named queries and their results (counts of devices).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigurationMetrics {
    #[serde(default)]
    pub results: BTreeMap<String, u64>,
    #[serde(default)]
    pub queries: BTreeMap<String, String>,
}

/// `POST /configurations/testQueries`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueriesTestInput {
    #[serde(default)]
    pub target_condition: Option<String>,
    #[serde(default)]
    pub custom_metric_queries: Option<BTreeMap<String, String>>,
}

/// The answer to `testQueries`: an empty string where a query is valid, as IoT Hub.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueriesTestResponse {
    pub target_condition_error: String,
    pub custom_metric_query_errors: BTreeMap<String, String>,
}

/// What the store keeps of a configuration: everything but the etag and the computed results.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    id: String,
    labels: BTreeMap<String, String>,
    content: ConfigurationContent,
    target_condition: String,
    priority: i64,
    metric_queries: BTreeMap<String, String>,
    created_time_utc: String,
    last_updated_time_utc: String,
}

impl Stored {
    fn from_store(s: &StoredConfiguration) -> Result<Stored, HubError> {
        serde_json::from_str(&s.doc).map_err(|e| HubError::internal("reading a configuration", e))
    }
}

/// A stored configuration ready to be matched against twins.
struct Candidate {
    stored: Stored,
    /// `None`: the condition targets no twin (an empty target condition).
    condition: Option<Query>,
    /// A `moduleContent` configuration: it targets module twins (`FROM devices.modules`).
    modules: bool,
}

impl Candidate {
    fn matches(&self, twin: &Value) -> bool {
        match &self.condition {
            None => false,
            Some(q) => q.condition.as_ref().is_none_or(|c| query::matches(c, twin)),
        }
    }

    /// Higher priority first; between equals the most recently created (the rule IoT Hub
    /// states for IoT Edge deployments, taken for configurations too); then the id, so the
    /// choice never depends on listing order.
    fn rank(&self) -> (i64, &str, &str) {
        (
            self.stored.priority,
            &self.stored.created_time_utc,
            &self.stored.id,
        )
    }
}

fn refused(message: String) -> HubError {
    info!(error_code = 400004, reason = %message, "configuration refused");
    HubError::argument(message)
}

fn not_found(id: &str) -> HubError {
    HubError::new(
        ErrorCode::InvalidOperation,
        format!("Configuration {id} cannot be found."),
    )
    .with_status(404)
}

fn already_exists(id: &str) -> HubError {
    HubError::new(
        ErrorCode::InvalidOperation,
        format!("Configuration {id} already exists."),
    )
    .with_status(409)
}

/// IoT Hub's rule: up to 128 lowercase ASCII letters, digits and `-:+%_#*?!(),=@;$'`.
fn check_id(id: &str) -> Result<(), HubError> {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-:+%_#*?!(),=@;$'".contains(c);
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(ok_char) {
        return Err(refused(format!(
            "configuration id '{id}' is invalid: up to {MAX_ID_LEN} lowercase letters, digits and -:+%_#*?!(),=@;$'"
        )));
    }
    Ok(())
}

/// Whether a target condition is over module twins: IoT Hub's module configurations write
/// it `FROM devices.modules WHERE ...` (the CLI's `az iot hub configuration` examples).
fn over_modules(condition: &str) -> bool {
    const FROM_MODULES: &str = "from devices.modules";
    condition
        .trim()
        .get(..FROM_MODULES.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(FROM_MODULES))
}

/// The query a target condition stands for: `*` targets every device, an empty condition
/// none (`Ok(None)`); `modules` (a `moduleContent` configuration) wants a condition
/// `FROM devices.modules [WHERE ...]`, and only it.
fn target_query(condition: &str, modules: bool) -> Result<Option<Query>, String> {
    let condition = condition.trim();
    if condition.is_empty() {
        return Ok(None);
    }
    let text = match (over_modules(condition), modules) {
        (true, true) => format!("SELECT * {condition}"),
        (false, false) if condition == "*" => "SELECT * FROM devices".to_string(),
        (false, false) => format!("SELECT * FROM devices WHERE {condition}"),
        (true, false) => {
            return Err("a condition FROM devices.modules is for moduleContent".into());
        }
        (false, true) => {
            return Err(
                "moduleContent targets module twins: the condition starts FROM devices.modules"
                    .into(),
            );
        }
    };
    let q = query::parse(&text).map_err(|e| e.to_string())?;
    if q.is_aggregate() || q.top.is_some() {
        return Err("a target condition is a WHERE clause only".into());
    }
    if modules && q.from != query::Collection::Modules {
        return Err("a module target condition reads FROM devices.modules".into());
    }
    Ok(Some(q))
}

/// A custom metric query must be a row query (`SELECT deviceId FROM devices WHERE ...`): its
/// result is how many rows it returns.
fn check_metric_query(text: &str) -> Result<(), String> {
    let q = query::parse(text).map_err(|e| e.to_string())?;
    if q.is_aggregate() {
        return Err("a metric query cannot aggregate: its result is the number of rows".into());
    }
    Ok(())
}

/// Content keys name where in the twin a value goes: `properties.desired` or below it.
fn check_content(content: &ConfigurationContent) -> Result<(), HubError> {
    if content.device_content.is_none()
        && content.module_content.is_none()
        && content.modules_content.is_none()
    {
        return Err(refused(
            "content needs deviceContent, moduleContent or modulesContent".into(),
        ));
    }
    if content.device_content.is_some() && content.module_content.is_some() {
        return Err(refused(
            "a configuration has deviceContent or moduleContent, not both".into(),
        ));
    }
    for section in [&content.device_content, &content.module_content]
        .into_iter()
        .flatten()
    {
        for key in section.keys() {
            if key != "properties.desired" && !key.starts_with("properties.desired.") {
                return Err(refused(format!(
                    "content key '{key}' must start with properties.desired"
                )));
            }
            if key.split('.').any(str::is_empty) {
                return Err(refused(format!("content key '{key}' has an empty segment")));
            }
        }
    }
    Ok(())
}

fn insert_path(at: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            at.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = at
                .entry((*first).to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(m) = entry {
                insert_path(m, rest, value);
            }
        }
    }
}

/// The desired-properties patch a content section stands for: `properties.desired.a.b: v`
/// becomes `{"a": {"b": v}}`.
fn desired_patch(section: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for (key, value) in section {
        let path: Vec<&str> = key
            .strip_prefix("properties.desired")
            .unwrap_or("")
            .split('.')
            .filter(|s| !s.is_empty())
            .collect();
        match path.split_last() {
            None => {
                if let Value::Object(m) = value {
                    for (k, v) in m {
                        patch.insert(k.clone(), v.clone());
                    }
                }
            }
            Some(_) => insert_path(&mut patch, &path, value.clone()),
        }
    }
    patch
}

/// Whether `desired` holds every value of `patch` already (a `null` in the patch: the key is
/// absent). Module twins keep no record of what was applied: this is how a pass knows.
fn holds(desired: &Value, patch: &Map<String, Value>) -> bool {
    patch.iter().all(|(k, v)| match (desired.get(k), v) {
        (None, Value::Null) => true,
        (Some(d), Value::Object(sub)) => holds(d, sub),
        (Some(d), v) => d == v,
        (None, _) => false,
    })
}

/// The module twin's winning configuration, if one matches it.
fn module_winner<'a>(candidates: &'a [Candidate], twin: &Value) -> Option<&'a Candidate> {
    candidates
        .iter()
        .filter(|c| c.modules && c.matches(twin))
        .max_by(|a, b| a.rank().cmp(&b.rank()))
}

/// Whether the module twin has its winning configuration's content.
fn module_has(winner: &Candidate, twin: &Value) -> bool {
    let patch = winner
        .stored
        .content
        .module_content
        .as_ref()
        .map(desired_patch)
        .unwrap_or_default();
    holds(&twin["properties"]["desired"], &patch)
}

/// Runs the apply pass at start (after a crash, what was committed but not recorded is matched
/// again) and every `every` until shutdown.
pub async fn reconcile_loop(
    hub: std::sync::Arc<Hub>,
    every: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = hub.apply_configurations().await {
            warn!(error = %e, "configuration pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::until_shutdown(&mut shutdown) => return,
        }
    }
}

impl Hub {
    /// `PUT /configurations/{id}`: creates (no `If-Match`, or `*`, on an id not in use) or
    /// updates (`If-Match` on an existing one; its content cannot change, as in IoT Hub), then
    /// applies it to the devices it targets before answering.
    pub async fn put_configuration(
        &self,
        id: &str,
        req: Configuration,
        if_match: Option<IfMatch>,
    ) -> Result<Configuration, HubError> {
        check_id(id)?;
        if !req.id.is_empty() && req.id != id {
            return Err(refused(
                "the configuration id in the body does not match the URL".into(),
            ));
        }
        if let Some(v) = req.schema_version.as_deref() {
            if v != SCHEMA_VERSION {
                return Err(refused(format!(
                    "schemaVersion must be {SCHEMA_VERSION}, not '{v}'"
                )));
            }
        }
        let content = req
            .content
            .clone()
            .ok_or_else(|| refused("a configuration needs content".into()))?;
        check_content(&content)?;
        let target_condition = req.target_condition.clone().unwrap_or_default();
        target_query(&target_condition, content.module_content.is_some())
            .map_err(|e| refused(format!("targetCondition is invalid: {e}")))?;
        let priority = req.priority.unwrap_or(0);
        if priority < 0 {
            return Err(refused("priority must be 0 or more".into()));
        }
        let metric_queries = req.metrics.clone().map(|m| m.queries).unwrap_or_default();
        for (name, text) in &metric_queries {
            check_metric_query(text)
                .map_err(|e| refused(format!("metric query '{name}' is invalid: {e}")))?;
        }
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            let existing = hub
                .store
                .get_configuration(&id)
                .await
                .map_err(HubError::from)?;
            let now = timefmt::now_iso();
            let (created, cond) = match (existing, if_match) {
                (None, Some(IfMatch::Etag(_))) => return Err(not_found(&id)),
                (None, _) => (now.clone(), None),
                (Some(_), None) => return Err(already_exists(&id)),
                (Some(current), Some(cond)) => {
                    let current = Stored::from_store(&current)?;
                    if current.content != content {
                        return Err(refused(
                            "the content of a configuration cannot be changed; create a new configuration".into(),
                        ));
                    }
                    (current.created_time_utc, Some(cond))
                }
            };
            if cond.is_none()
                && hub
                    .store
                    .list_configurations(MAX_CONFIGURATIONS)
                    .await
                    .map_err(HubError::from)?
                    .len()
                    >= MAX_CONFIGURATIONS
            {
                info!(error_code = 403002, "configuration refused: the hub has its maximum");
                return Err(HubError::new(
                    ErrorCode::IotHubQuotaExceeded,
                    format!("a hub holds at most {MAX_CONFIGURATIONS} configurations"),
                ));
            }
            let stored = Stored {
                id: id.clone(),
                labels: req.labels.unwrap_or_default(),
                content,
                target_condition,
                priority,
                metric_queries,
                created_time_utc: created,
                last_updated_time_utc: now,
            };
            let doc = serde_json::to_string(&stored)
                .map_err(|e| HubError::internal("writing a configuration", e))?;
            let saved = hub
                .store
                .put_configuration(&id, doc, cond)
                .await
                .map_err(|e| HubError::from_store(e, not_found(&id), already_exists(&id)))?;
            hub.apply_configurations().await?;
            hub.render(&saved).await
        })
        .await
    }

    /// `GET /configurations/{id}`, with its metrics computed now.
    pub async fn configuration(&self, id: &str) -> Result<Configuration, HubError> {
        let saved = self
            .store
            .get_configuration(id)
            .await
            .map_err(HubError::from)?
            .ok_or_else(|| not_found(id))?;
        self.render(&saved).await
    }

    /// `GET /configurations?top=n`: ordered by id, at most `top` (and [`MAX_CONFIGURATIONS`]).
    pub async fn configurations(&self, top: Option<usize>) -> Result<Vec<Configuration>, HubError> {
        let top = top.unwrap_or(DEFAULT_TOP).min(MAX_CONFIGURATIONS);
        let mut out = Vec::new();
        for saved in self
            .store
            .list_configurations(top)
            .await
            .map_err(HubError::from)?
        {
            out.push(self.render(&saved).await?);
        }
        Ok(out)
    }

    /// `DELETE /configurations/{id}`. What it wrote to twins stays there, as in IoT Hub; the
    /// devices it was applied to get the next configuration that targets them, if any.
    pub async fn delete_configuration(&self, id: &str, if_match: IfMatch) -> Result<(), HubError> {
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            hub.store
                .delete_configuration(&id, if_match)
                .await
                .map_err(|e| HubError::from_store(e, not_found(&id), already_exists(&id)))?;
            hub.apply_configurations().await
        })
        .await
    }

    /// `POST /configurations/testQueries`: what is wrong with each query, or `""`.
    pub fn test_configuration_queries(&self, input: &QueriesTestInput) -> QueriesTestResponse {
        let target_condition_error = match input.target_condition.as_deref() {
            None => String::new(),
            Some(c) => target_query(c, over_modules(c)).err().unwrap_or_default(),
        };
        let custom_metric_query_errors = input
            .custom_metric_queries
            .iter()
            .flatten()
            .map(|(name, text)| {
                (
                    name.clone(),
                    check_metric_query(text).err().unwrap_or_default(),
                )
            })
            .collect();
        QueriesTestResponse {
            target_condition_error,
            custom_metric_query_errors,
        }
    }

    /// The configurations in force, ready to match.
    async fn candidates(&self) -> Result<Vec<Candidate>, HubError> {
        let mut out = Vec::new();
        for saved in self
            .store
            .list_configurations(MAX_CONFIGURATIONS)
            .await
            .map_err(HubError::from)?
        {
            let stored = Stored::from_store(&saved)?;
            // IoT Edge deployments (`modulesContent`) are stored, not applied.
            let modules = stored.content.module_content.is_some();
            if stored.content.device_content.is_none() && !modules {
                continue;
            }
            match target_query(&stored.target_condition, modules) {
                Ok(condition) => out.push(Candidate {
                    stored,
                    condition,
                    modules,
                }),
                Err(e) => {
                    warn!(configuration = %saved.id, error = %e, "stored target condition no longer parses; skipped")
                }
            }
        }
        Ok(out)
    }

    /// A device twin with IoT Hub's `configurations` member: each configuration whose target
    /// condition matches it now, `{"status": "Targeted"}`, or `"Applied"` for the one applied
    /// to it (the value IoT Hub's own `appliedCount` query compares with). Module twins and
    /// twins no configuration targets are returned as they are.
    pub(crate) async fn with_configurations(&self, mut twin: Value) -> Result<Value, HubError> {
        let candidates = self.candidates().await?;
        if candidates.is_empty() {
            return Ok(twin);
        }
        if twin.get("moduleId").is_some_and(|m| !m.is_null()) {
            let winner = module_winner(&candidates, &twin).filter(|w| module_has(w, &twin));
            let member: Map<String, Value> = candidates
                .iter()
                .filter(|c| c.modules && c.matches(&twin))
                .map(|c| {
                    let applied = winner.is_some_and(|w| w.stored.id == c.stored.id);
                    let status = if applied { "Applied" } else { "Targeted" };
                    (c.stored.id.clone(), json!({ "status": status }))
                })
                .collect();
            if !member.is_empty() {
                twin["configurations"] = Value::Object(member);
            }
            return Ok(twin);
        }
        let Some(device_id) = twin.get("deviceId").and_then(Value::as_str) else {
            return Ok(twin);
        };
        let applied = self
            .store
            .applied_configuration(device_id)
            .await
            .map_err(HubError::from)?;
        let member: Map<String, Value> = candidates
            .iter()
            .filter(|c| !c.modules && c.matches(&twin))
            .map(|c| {
                let status = if applied.as_deref() == Some(c.stored.id.as_str()) {
                    "Applied"
                } else {
                    "Targeted"
                };
                (c.stored.id.clone(), json!({ "status": status }))
            })
            .collect();
        if !member.is_empty() {
            twin["configurations"] = Value::Object(member);
        }
        Ok(twin)
    }

    /// Applies the winning configuration to every device, a page at a time.
    async fn apply_configurations(&self) -> Result<(), HubError> {
        let candidates = self.candidates().await?;
        if candidates.iter().any(|c| !c.modules) {
            let mut continuation: Option<String> = None;
            loop {
                let page = self
                    .query("SELECT * FROM devices", MAX_PAGE, continuation.as_deref())
                    .await?;
                for twin in &page.items {
                    self.apply_winner(&candidates, twin).await;
                }
                match page.continuation {
                    Some(c) => continuation = Some(c),
                    None => break,
                }
            }
        }
        if candidates.iter().any(|c| c.modules) {
            let mut continuation: Option<String> = None;
            loop {
                let page = self
                    .query(
                        "SELECT * FROM devices.modules",
                        MAX_PAGE,
                        continuation.as_deref(),
                    )
                    .await?;
                for twin in &page.items {
                    self.apply_module_winner(&candidates, twin).await;
                }
                match page.continuation {
                    Some(c) => continuation = Some(c),
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// After a module twin's tags or desired properties changed: the module configuration
    /// that now wins for it, written if the twin does not hold its content. Failures are
    /// logged, as for devices.
    pub(crate) async fn apply_configurations_to_module(&self, identity: &Identity) {
        let candidates = match self.candidates().await {
            Ok(c) if !c.iter().any(|c| c.modules) => return,
            Ok(c) => c,
            Err(e) => {
                warn!(identity = %identity, error = %e, "configurations not applied");
                return;
            }
        };
        match self.get_twin(identity).await {
            Ok(twin) => self.apply_module_winner(&candidates, &twin).await,
            Err(e) => warn!(identity = %identity, error = %e, "configurations not applied"),
        }
    }

    /// Writes the winning module configuration's content into a module twin that does not
    /// hold it yet: the twin itself is the record, so a pass repeats nothing.
    async fn apply_module_winner(&self, candidates: &[Candidate], twin: &Value) {
        let (Some(device_id), Some(module_id)) = (
            twin.get("deviceId").and_then(Value::as_str),
            twin.get("moduleId").and_then(Value::as_str),
        ) else {
            return;
        };
        let Some(winner) = module_winner(candidates, twin) else {
            return;
        };
        if module_has(winner, twin) {
            return;
        }
        let patch = winner
            .stored
            .content
            .module_content
            .as_ref()
            .map(desired_patch)
            .unwrap_or_default();
        let body = json!({ "properties": { "desired": patch } });
        let identity = Identity::module(device_id, module_id);
        match self
            .update_twin_unthrottled(&identity, body, false, IfMatch::Any)
            .await
        {
            Ok(_) => {
                info!(identity = %identity, configuration = %winner.stored.id, "configuration applied")
            }
            Err(e) => {
                warn!(identity = %identity, configuration = %winner.stored.id, error = %e, "applying a configuration failed")
            }
        }
    }

    /// After a device's twin or registry entry changed: applies the configuration that now
    /// wins for it, if it is not the one applied already. Failures are logged, not returned:
    /// the change that triggered this has been committed and answered for.
    pub(crate) async fn apply_configurations_to(&self, device_id: &str) {
        let candidates = match self.candidates().await {
            Ok(c) if !c.iter().any(|c| !c.modules) => return,
            Ok(c) => c,
            Err(e) => {
                warn!(device = device_id, error = %e, "configurations not applied");
                return;
            }
        };
        match self.get_twin(&Identity::device(device_id)).await {
            Ok(twin) => self.apply_winner(&candidates, &twin).await,
            Err(e) => warn!(device = device_id, error = %e, "configurations not applied"),
        }
    }

    async fn apply_winner(&self, candidates: &[Candidate], twin: &Value) {
        let Some(device_id) = twin.get("deviceId").and_then(Value::as_str) else {
            return;
        };
        let winner = candidates
            .iter()
            .filter(|c| !c.modules && c.matches(twin))
            .max_by(|a, b| a.rank().cmp(&b.rank()));
        let result = match winner {
            Some(winner) => self.apply_one(device_id, &winner.stored).await,
            // It left every target: no configuration counts it as applied any more (what was
            // written stays in its twin, as in IoT Hub).
            None => self.forget_applied(device_id).await,
        };
        if let Err(e) = result {
            let configuration = winner.map(|w| w.stored.id.as_str()).unwrap_or("");
            warn!(device = device_id, configuration, error = %e, "applying a configuration failed");
        }
    }

    async fn forget_applied(&self, device_id: &str) -> Result<(), HubError> {
        let applied = self
            .store
            .applied_configuration(device_id)
            .await
            .map_err(HubError::from)?;
        if let Some(config) = applied {
            self.store
                .clear_applied(device_id)
                .await
                .map_err(HubError::from)?;
            info!(device = device_id, configuration = %config, "device left the configuration's target");
        }
        Ok(())
    }

    async fn apply_one(&self, device_id: &str, stored: &Stored) -> Result<(), HubError> {
        let applied = self
            .store
            .applied_configuration(device_id)
            .await
            .map_err(HubError::from)?;
        if applied.as_deref() == Some(stored.id.as_str()) {
            return Ok(());
        }
        let patch = stored
            .content
            .device_content
            .as_ref()
            .map(desired_patch)
            .unwrap_or_default();
        if !patch.is_empty() {
            let body = json!({ "properties": { "desired": patch } });
            self.update_twin_unthrottled(&Identity::device(device_id), body, false, IfMatch::Any)
                .await?;
        }
        match self.store.mark_applied(device_id, &stored.id).await {
            // The device or the configuration went meanwhile: nothing to record.
            Err(StoreError::NotFound) => Ok(()),
            r => r.map_err(HubError::from),
        }?;
        info!(device = device_id, configuration = %stored.id, "configuration applied");
        Ok(())
    }

    /// The module twins `stored` targets that have it as their winner and hold its content.
    async fn count_module_applied(&self, stored: &Stored) -> Result<u64, HubError> {
        let candidates = self.candidates().await?;
        let Some(me) = candidates.iter().find(|c| c.stored.id == stored.id) else {
            return Ok(0);
        };
        if me.condition.is_none() {
            return Ok(0);
        }
        let text = format!("SELECT * {}", stored.target_condition.trim());
        let mut n = 0u64;
        let mut continuation: Option<String> = None;
        loop {
            let page = self.query(&text, MAX_PAGE, continuation.as_deref()).await?;
            for twin in &page.items {
                if let Some(w) = module_winner(&candidates, twin) {
                    if w.stored.id == stored.id && module_has(w, twin) {
                        n += 1;
                    }
                }
            }
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => return Ok(n),
            }
        }
    }

    /// How many devices a row query returns, paging through it.
    async fn count_rows(&self, text: &str) -> Result<u64, HubError> {
        let mut n = 0u64;
        let mut continuation: Option<String> = None;
        loop {
            let page = self.query(text, MAX_PAGE, continuation.as_deref()).await?;
            n += page.items.len() as u64;
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => return Ok(n),
            }
        }
    }

    /// The API's view of a stored configuration, metrics computed now.
    async fn render(&self, saved: &StoredConfiguration) -> Result<Configuration, HubError> {
        let stored = Stored::from_store(saved)?;
        let modules = stored.content.module_content.is_some();
        let targeted_text = match stored.target_condition.trim() {
            "" => None,
            c if modules => Some(format!("SELECT deviceId, moduleId {c}")),
            "*" => Some("SELECT deviceId FROM devices".to_string()),
            c => Some(format!("SELECT deviceId FROM devices WHERE {c}")),
        };
        let targeted = match &targeted_text {
            Some(t) => self.count_rows(t).await?,
            None => 0,
        };
        let applied = if modules {
            self.count_module_applied(&stored).await?
        } else {
            self.store
                .count_applied(&stored.id)
                .await
                .map_err(HubError::from)?
        };
        let collection = if modules {
            "devices.modules"
        } else {
            "devices"
        };
        let mut system_queries = BTreeMap::new();
        if let Some(t) = targeted_text {
            system_queries.insert("targetedCount".to_string(), t);
        }
        system_queries.insert(
            "appliedCount".to_string(),
            format!(
                "SELECT deviceId FROM {collection} WHERE configurations.[[{}]].status = 'Applied'",
                stored.id
            ),
        );
        let mut results = BTreeMap::new();
        for (name, text) in &stored.metric_queries {
            results.insert(name.clone(), self.count_rows(text).await?);
        }
        Ok(Configuration {
            id: stored.id,
            schema_version: Some(SCHEMA_VERSION.into()),
            labels: Some(stored.labels),
            content: Some(stored.content),
            target_condition: Some(stored.target_condition),
            created_time_utc: Some(stored.created_time_utc),
            last_updated_time_utc: Some(stored.last_updated_time_utc),
            priority: Some(stored.priority),
            system_metrics: Some(ConfigurationMetrics {
                results: BTreeMap::from([
                    ("targetedCount".to_string(), targeted),
                    ("appliedCount".to_string(), applied),
                ]),
                queries: system_queries,
            }),
            metrics: Some(ConfigurationMetrics {
                results,
                queries: stored.metric_queries,
            }),
            etag: Some(saved.etag.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::IdentityRequest;
    use crate::testing::{fixture, R};
    use ferrohub_store::ConfigurationStore;

    /// Tags written by a path that announces nothing (the hub's own twin update, as bulk
    /// import uses) are picked up by the start-up pass and then by the periodic one, on a
    /// paused clock.
    #[tokio::test(start_paused = true)]
    async fn the_backstop_pass_applies_what_no_event_announced() -> R {
        let f = fixture()?;
        for id in ["d1", "d2"] {
            f.hub
                .put_device(id, IdentityRequest::default(), None)
                .await?;
        }
        let content: Map<String, Value> =
            serde_json::from_value(json!({"properties.desired.x": 1}))?;
        let config = Configuration {
            id: "c".into(),
            content: Some(ConfigurationContent {
                device_content: Some(content),
                ..Default::default()
            }),
            target_condition: Some("tags.late = true".into()),
            ..Default::default()
        };
        f.hub.put_configuration("c", config, None).await?;
        let late = json!({"tags": {"late": true}});
        f.hub
            .update_twin(&Identity::device("d1"), late.clone(), false, IfMatch::Any)
            .await?;
        let x = |twin: Value| twin["properties"]["desired"]["x"].clone();
        assert_eq!(
            x(f.hub.service_twin(&Identity::device("d1")).await?),
            Value::Null
        );

        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let pass = tokio::spawn(reconcile_loop(f.hub.clone(), RECONCILE_EVERY, shutdown));
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(
            x(f.hub.service_twin(&Identity::device("d1")).await?),
            json!(1)
        );

        f.hub
            .update_twin(&Identity::device("d2"), late, false, IfMatch::Any)
            .await?;
        tokio::time::sleep(RECONCILE_EVERY / 2).await;
        assert_eq!(
            x(f.hub.service_twin(&Identity::device("d2")).await?),
            Value::Null
        );
        tokio::time::sleep(RECONCILE_EVERY).await;
        assert_eq!(
            x(f.hub.service_twin(&Identity::device("d2")).await?),
            json!(1)
        );
        assert_eq!(
            f.hub
                .configuration("c")
                .await?
                .system_metrics
                .map(|m| m.results["appliedCount"]),
            Some(2)
        );
        stop.send(true)?;
        pass.await?;
        Ok(())
    }

    /// `appliedCount` counts the twins the configuration is applied to now: a device whose
    /// tags take it out of the target leaves the count (it stayed in it before), and comes
    /// back, with the content written again, when it matches again.
    #[tokio::test]
    async fn a_device_leaving_the_target_leaves_the_applied_count() -> R {
        let f = fixture()?;
        for id in ["d1", "d2"] {
            f.hub
                .put_device(id, IdentityRequest::default(), None)
                .await?;
        }
        let tag = |env: &str| json!({"tags": {"env": env}});
        for id in ["d1", "d2"] {
            f.hub
                .service_update_twin(&Identity::device(id), tag("prod"), false, IfMatch::Any)
                .await?;
        }
        let content: Map<String, Value> =
            serde_json::from_value(json!({"properties.desired.x": 1}))?;
        let config = Configuration {
            id: "c".into(),
            content: Some(ConfigurationContent {
                device_content: Some(content),
                ..Default::default()
            }),
            target_condition: Some("tags.env = 'prod'".into()),
            ..Default::default()
        };
        f.hub.put_configuration("c", config, None).await?;
        let counts = |c: Configuration| {
            c.system_metrics
                .map(|m| (m.results["targetedCount"], m.results["appliedCount"]))
        };
        assert_eq!(counts(f.hub.configuration("c").await?), Some((2, 2)));

        let d1 = Identity::device("d1");
        f.hub
            .service_update_twin(&d1, tag("dev"), false, IfMatch::Any)
            .await?;
        assert_eq!(counts(f.hub.configuration("c").await?), Some((1, 1)));
        assert_eq!(f.store.applied_configuration("d1").await?, None);

        let desired = json!({"properties": {"desired": {"x": 0}}});
        f.hub
            .service_update_twin(&d1, desired, false, IfMatch::Any)
            .await?;
        f.hub
            .service_update_twin(&d1, tag("prod"), false, IfMatch::Any)
            .await?;
        assert_eq!(counts(f.hub.configuration("c").await?), Some((2, 2)));
        let twin = f.hub.service_twin(&d1).await?;
        assert_eq!(twin["properties"]["desired"]["x"], 1, "{twin}");
        Ok(())
    }

    /// `moduleContent` goes to the desired properties of the module twins its `FROM
    /// devices.modules` condition matches, once (a second pass writes nothing), a module
    /// that starts matching through the service twin API gets it then, and the metrics and
    /// the module twin's `configurations` member count module twins.
    #[tokio::test]
    async fn module_content_reaches_matching_module_twins() -> R {
        let f = fixture()?;
        f.hub
            .put_device("d1", IdentityRequest::default(), None)
            .await?;
        for m in ["m1", "m2"] {
            f.hub
                .put_module("d1", m, IdentityRequest::default(), None)
                .await?;
        }
        let m1 = Identity::module("d1", "m1");
        let m2 = Identity::module("d1", "m2");
        let tagged = json!({"tags": {"role": "sensor"}});
        f.hub
            .service_update_twin(&m1, tagged.clone(), false, IfMatch::Any)
            .await?;
        let content: Map<String, Value> =
            serde_json::from_value(json!({"properties.desired.rate": 5}))?;
        let config = Configuration {
            id: "mods".into(),
            content: Some(ConfigurationContent {
                module_content: Some(content),
                ..Default::default()
            }),
            target_condition: Some("FROM devices.modules WHERE tags.role = 'sensor'".into()),
            ..Default::default()
        };
        let created = f.hub.put_configuration("mods", config, None).await?;
        let counts = |c: Configuration| {
            c.system_metrics
                .map(|m| (m.results["targetedCount"], m.results["appliedCount"]))
        };
        assert_eq!(counts(created), Some((1, 1)));
        let twin = f.hub.service_twin(&m1).await?;
        assert_eq!(twin["properties"]["desired"]["rate"], 5, "{twin}");
        assert_eq!(
            twin["configurations"],
            json!({"mods": {"status": "Applied"}})
        );
        let version = twin["properties"]["desired"]["$version"].clone();
        assert!(f.hub.service_twin(&m2).await?["properties"]["desired"]["rate"].is_null());
        // The device twin is not a module twin: untouched.
        let device = f.hub.service_twin(&Identity::device("d1")).await?;
        assert!(
            device["properties"]["desired"]["rate"].is_null(),
            "{device}"
        );

        // Another pass writes nothing: the twin holds the content.
        f.hub.apply_configurations().await?;
        let again = f.hub.service_twin(&m1).await?;
        assert_eq!(again["properties"]["desired"]["$version"], version);

        f.hub
            .service_update_twin(&m2, tagged, false, IfMatch::Any)
            .await?;
        assert_eq!(
            f.hub.service_twin(&m2).await?["properties"]["desired"]["rate"],
            5
        );
        assert_eq!(counts(f.hub.configuration("mods").await?), Some((2, 2)));

        // A module created later that a condition on its id targets gets it when created.
        let by_id: Map<String, Value> =
            serde_json::from_value(json!({"properties.desired.late": true}))?;
        let config = Configuration {
            id: "late".into(),
            content: Some(ConfigurationContent {
                module_content: Some(by_id),
                ..Default::default()
            }),
            target_condition: Some("FROM devices.modules WHERE moduleId = 'm3'".into()),
            ..Default::default()
        };
        f.hub.put_configuration("late", config, None).await?;
        f.hub
            .put_module("d1", "m3", IdentityRequest::default(), None)
            .await?;
        let m3 = f.hub.service_twin(&Identity::module("d1", "m3")).await?;
        assert_eq!(m3["properties"]["desired"]["late"], true, "{m3}");
        Ok(())
    }

    #[test]
    fn a_module_twin_holds_content_when_every_value_is_there() {
        let desired = json!({"a": {"b": 1, "c": 2}, "d": "x", "$version": 3});
        let patch = |v: Value| serde_json::from_value::<Map<String, Value>>(v).unwrap_or_default();
        assert!(holds(&desired, &patch(json!({"a": {"b": 1}, "d": "x"}))));
        assert!(holds(&desired, &patch(json!({"gone": null}))));
        assert!(!holds(&desired, &patch(json!({"a": {"b": 2}}))));
        assert!(!holds(&desired, &patch(json!({"e": 1}))));
        assert!(!holds(&desired, &patch(json!({"d": null}))));
    }

    #[test]
    fn content_keys_become_a_nested_desired_patch() {
        let section: Map<String, Value> = serde_json::from_value(json!({
            "properties.desired.a.b": 1,
            "properties.desired.a.c": {"d": true},
            "properties.desired.e": "x",
        }))
        .unwrap_or_default();
        assert_eq!(
            Value::Object(desired_patch(&section)),
            json!({"a": {"b": 1, "c": {"d": true}}, "e": "x"})
        );
        let whole: Map<String, Value> =
            serde_json::from_value(json!({"properties.desired": {"f": 2}})).unwrap_or_default();
        assert_eq!(Value::Object(desired_patch(&whole)), json!({"f": 2}));
    }

    #[test]
    fn ids_follow_iot_hub_s_rule() {
        assert!(check_id("prod-settings_1").is_ok());
        assert!(check_id("Upper").is_err());
        assert!(check_id("").is_err());
        assert!(check_id(&"a".repeat(129)).is_err());
        assert!(check_id("has space").is_err());
    }

    #[test]
    fn target_conditions_are_where_clauses() {
        assert!(matches!(target_query("", false), Ok(None)));
        assert!(matches!(target_query("*", false), Ok(Some(_))));
        assert!(matches!(
            target_query("tags.env = 'prod'", false),
            Ok(Some(_))
        ));
        assert!(target_query("tags.env = ", false).is_err());
        let m = target_query("from devices.modules where tags.building = 9", true);
        assert!(matches!(m, Ok(Some(q)) if q.from == query::Collection::Modules));
        assert!(matches!(
            target_query("FROM devices.modules", true),
            Ok(Some(_))
        ));
        assert!(target_query("FROM devices.modules WHERE moduleId = 'm'", false).is_err());
        assert!(target_query("tags.env = 'prod'", true).is_err());
    }
}
