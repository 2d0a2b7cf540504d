//! Scheduled jobs (`/jobs/v2`): a twin update or a direct method applied to every device a
//! query condition matches, from a start time, for at most a maximum execution time.
//!
//! A job and each device's row live in the store ([`JobStore`]); a runner task per unfinished
//! job sleeps until the start time (a timer), then walks the matching devices with the hub's
//! own query scan (`SELECT * FROM devices WHERE <condition>`, page by page) and applies the
//! action through the same services the REST API uses (`service_update_twin`,
//! `invoke_method`), so desired-property notifications and the method throttle apply as for
//! a single call.
//!
//! Guarantee: a device is acted on at most once per job. Its row is written as `running`
//! (durably) before the action and as `completed` / `failed` after; a runner that finds a
//! `running` row left by a crash marks it `failed` without acting again, since the action may
//! or may not have reached the device. Unfinished jobs resume at start-up
//! ([`Hub::resume_jobs`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::{IfMatch, StoreError, StoredDeviceJob, StoredJob};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::HubError;
use crate::methods::{Invocation, MethodError};
use crate::Hub;

pub const TWIN_JOB: &str = "scheduleUpdateTwin";
pub const METHOD_JOB: &str = "scheduleDeviceMethod";

/// Devices read per query page while a job walks its targets.
const DEVICE_PAGE: usize = 100;
/// How long a method job waits before retrying a call the method throttle refused.
const THROTTLE_BACKOFF: Duration = Duration::from_secs(1);
/// A maximum execution time when the request gives none (IoT Hub's SDK samples use 3600).
const DEFAULT_MAX_EXECUTION_SECS: u64 = 3600;
/// Job ids as long as IoT Hub's other ids.
const MAX_JOB_ID: usize = 128;

/// `deviceJobStatistics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    pub device_count: u64,
    pub failed_count: u64,
    pub succeeded_count: u64,
    pub running_count: u64,
    pub pending_count: u64,
}

/// A job as `GET /jobs/v2/{id}` shows it (IoT Hub's `JobResponse`), and as it is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub job_id: String,
    #[serde(rename = "type")]
    pub job_type: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_condition: Option<String>,
    pub created_time: String,
    pub start_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    pub max_execution_time_in_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    pub device_job_statistics: Statistics,
}

impl Job {
    fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// A job request as `PUT /jobs/v2/{id}` carries it (IoT Hub's `JobRequest`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobRequest {
    #[serde(default)]
    job_id: Option<String>,
    #[serde(rename = "type", default)]
    job_type: Option<String>,
    #[serde(default)]
    query_condition: Option<String>,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    max_execution_time_in_seconds: Option<u64>,
    #[serde(default)]
    update_twin: Option<Value>,
    #[serde(default)]
    cloud_to_device_method: Option<Value>,
}

/// The running jobs of this process, each with the switch that stops it.
#[derive(Default)]
pub(crate) struct JobRunners {
    running: std::sync::Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Serializes read-modify-writes of job documents (a runner's progress against a cancel).
    doc_lock: tokio::sync::Mutex<()>,
    /// Told whenever a runner ends, so shutdown waits for the last one: a runner outliving
    /// its hub could act on a device a restarted hub acts on too.
    ended: tokio::sync::Notify,
}

impl JobRunners {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        // Single inserts and removes: a panicking holder leaves nothing half-done.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn store_error(what: &str, e: StoreError) -> HubError {
    match e {
        StoreError::Full(cause) => HubError::storage_full(cause),
        e => HubError::internal(what, e),
    }
}

fn refuse(message: String) -> HubError {
    info!(error_code = 400004, reason = %message, "job refused");
    HubError::argument(message)
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s.trim(), &Rfc3339).ok()
}

fn iso(t: OffsetDateTime) -> String {
    crate::timefmt::iso(t)
}

/// How long from now until `t`; zero when it has passed.
fn until(t: OffsetDateTime) -> Duration {
    let d = t - OffsetDateTime::now_utc();
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

/// The twin patch of a job: tags and desired properties only (the SDKs send a whole `Twin`
/// model, with `etag: "*"`, nulls and the device id).
fn twin_patch(update: &Value) -> Result<Value, HubError> {
    let obj = update
        .as_object()
        .ok_or_else(|| refuse("updateTwin must be a JSON object".into()))?;
    let mut patch = serde_json::Map::new();
    if let Some(tags) = obj.get("tags").filter(|t| !t.is_null()) {
        patch.insert("tags".into(), tags.clone());
    }
    if let Some(desired) = obj
        .get("properties")
        .and_then(|p| p.get("desired"))
        .filter(|d| !d.is_null())
    {
        patch.insert("properties".into(), json!({ "desired": desired }));
    }
    if patch.is_empty() {
        return Err(refuse(
            "updateTwin changes nothing: it needs tags or properties.desired".into(),
        ));
    }
    Ok(Value::Object(patch))
}

fn invocation(method: &Value) -> Result<Invocation, HubError> {
    let name = method
        .get("methodName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| refuse("cloudToDeviceMethod needs a methodName".into()))?;
    Ok(Invocation {
        method_name: name.to_string(),
        payload: method.get("payload").cloned().unwrap_or(Value::Null),
        response_timeout_secs: method
            .get("responseTimeoutInSeconds")
            .and_then(Value::as_u64),
        connect_timeout_secs: method
            .get("connectTimeoutInSeconds")
            .and_then(Value::as_u64),
    })
}

fn job_not_found(id: &str) -> HubError {
    info!(job_id = id, error_code = 404, "job not found");
    HubError::new(
        ErrorCode::InvalidOperation,
        format!("job {id:?} does not exist"),
    )
    .with_status(404)
}

/// How one device's action ended.
enum DeviceEnd {
    Done(Option<Value>),
    Failed(Value),
    /// The job was cancelled or the hub is stopping, before or during the action.
    Stopped,
}

fn error_json(code: ErrorCode, description: impl Into<String>) -> Value {
    json!({ "code": code.name(), "description": description.into() })
}

impl Hub {
    /// Creates a job (`PUT /jobs/v2/{id}`) and starts its runner; durable when it returns.
    pub async fn create_job(&self, job_id: &str, body: Value) -> Result<Value, HubError> {
        let req: JobRequest = serde_json::from_value(body)
            .map_err(|e| refuse(format!("invalid job request: {e}")))?;
        if job_id.is_empty() || job_id.len() > MAX_JOB_ID || job_id.chars().any(char::is_control) {
            return Err(refuse(format!(
                "job id {job_id:?} must be 1 to {MAX_JOB_ID} printable characters"
            )));
        }
        if let Some(body_id) = req.job_id.as_deref().filter(|b| !b.is_empty()) {
            if body_id != job_id {
                return Err(refuse(format!(
                    "the body's jobId {body_id:?} is not the path's {job_id:?}"
                )));
            }
        }
        let job_type = req.job_type.unwrap_or_default();
        let (update_twin, method) = match job_type.as_str() {
            TWIN_JOB => {
                let update = req
                    .update_twin
                    .ok_or_else(|| refuse("a scheduleUpdateTwin job needs updateTwin".into()))?;
                twin_patch(&update)?;
                (Some(update), None)
            }
            METHOD_JOB => {
                let method = req.cloud_to_device_method.ok_or_else(|| {
                    refuse("a scheduleDeviceMethod job needs cloudToDeviceMethod".into())
                })?;
                invocation(&method)?;
                (None, Some(method))
            }
            other => {
                return Err(refuse(format!(
                    "job type {other:?} is not one of {TWIN_JOB}, {METHOD_JOB}"
                )))
            }
        };
        let condition = req
            .query_condition
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        // The condition must be one the query language takes, now rather than at start time.
        ferrohub_iothub::query::parse(&devices_query(condition.as_deref()))
            .map_err(|e| refuse(format!("invalid queryCondition: {e}")))?;
        let now = OffsetDateTime::now_utc();
        let start = match req.start_time.as_deref() {
            None | Some("") => now,
            Some(s) => parse_time(s)
                .ok_or_else(|| refuse(format!("startTime {s:?} is not an ISO 8601 time")))?,
        };
        let max = req
            .max_execution_time_in_seconds
            .unwrap_or(DEFAULT_MAX_EXECUTION_SECS);
        if max == 0 {
            return Err(refuse(
                "maxExecutionTimeInSeconds must be at least 1".into(),
            ));
        }
        let job = Job {
            job_id: job_id.to_string(),
            job_type,
            status: if start > now { "scheduled" } else { "queued" }.into(),
            query_condition: condition,
            created_time: iso(now),
            start_time: iso(start),
            end_time: None,
            max_execution_time_in_seconds: max,
            update_twin,
            cloud_to_device_method: method,
            failure_reason: None,
            status_message: None,
            device_job_statistics: Statistics::default(),
        };
        let stored = StoredJob {
            job_id: job.job_id.clone(),
            doc: serde_json::to_string(&job).map_err(|e| HubError::internal("job", e))?,
        };
        match self.store.create_job(stored).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                info!(job_id, error_code = 409, "job refused: the id exists");
                return Err(HubError::new(
                    ErrorCode::InvalidOperation,
                    format!("a job with id {job_id:?} exists already"),
                )
                .with_status(409));
            }
            Err(e) => return Err(store_error("create job", e)),
        }
        info!(job_id, job_type = %job.job_type, start = %job.start_time, "job created");
        self.spawn_job(job_id);
        Ok(job.to_value())
    }

    /// `GET /jobs/v2/{id}`.
    pub async fn get_job(&self, job_id: &str) -> Result<Value, HubError> {
        Ok(self.load_job(job_id).await?.to_value())
    }

    async fn load_job(&self, job_id: &str) -> Result<Job, HubError> {
        let stored = self
            .store
            .get_job(job_id)
            .await
            .map_err(|e| store_error("read job", e))?
            .ok_or_else(|| job_not_found(job_id))?;
        serde_json::from_str(&stored.doc).map_err(|e| HubError::internal("stored job", e))
    }

    /// Reads, changes and writes a job document with no other change in between; `None`
    /// from `change` writes nothing.
    async fn change_job(
        &self,
        job_id: &str,
        change: impl FnOnce(&mut Job) -> bool,
    ) -> Result<Job, HubError> {
        let _guard = self.jobs.doc_lock.lock().await;
        let mut job = self.load_job(job_id).await?;
        if change(&mut job) {
            let doc = serde_json::to_string(&job).map_err(|e| HubError::internal("job", e))?;
            self.store
                .update_job(StoredJob {
                    job_id: job_id.to_string(),
                    doc,
                })
                .await
                .map_err(|e| store_error("update job", e))?;
        }
        Ok(job)
    }

    /// `POST /jobs/v2/{id}/cancel`: a job not yet finished becomes `cancelled` (durably) and
    /// its runner stops before its next device; a finished job is answered as it is.
    pub async fn cancel_job(&self, job_id: &str) -> Result<Value, HubError> {
        let job = self
            .change_job(job_id, |job| {
                if job.is_finished() {
                    return false;
                }
                job.status = "cancelled".into();
                job.end_time = Some(crate::timefmt::now_iso());
                true
            })
            .await?;
        if let Some(stop) = self.jobs.running().get(job_id) {
            let _ = stop.send(true);
        }
        info!(job_id, status = %job.status, "job cancel asked");
        Ok(job.to_value())
    }

    /// `GET /jobs/v2/query`: jobs in id order, of a type and status when asked, a page at a
    /// time; the token names the last job returned.
    pub async fn query_jobs(
        &self,
        job_type: Option<&str>,
        status: Option<&str>,
        max_items: usize,
        continuation: Option<&str>,
    ) -> Result<(Vec<Value>, Option<String>), HubError> {
        let page = max_items.clamp(1, crate::query::MAX_PAGE);
        let mut after = match continuation.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => Some(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| refuse("the continuation token is not valid".into()))?,
            ),
            None => None,
        };
        let mut items = Vec::new();
        let mut last = None;
        loop {
            let batch = self
                .store
                .list_jobs(after.as_deref(), 1000)
                .await
                .map_err(|e| store_error("list jobs", e))?;
            let exhausted = batch.len() < 1000;
            for stored in batch {
                after = Some(stored.job_id.clone());
                let Ok(job) = serde_json::from_str::<Job>(&stored.doc) else {
                    warn!(job_id = %stored.job_id, "stored job is corrupt; left out of the list");
                    continue;
                };
                let fits = job_type.is_none_or(|t| t.is_empty() || t == job.job_type)
                    && status.is_none_or(|s| s.is_empty() || s == job.status);
                if !fits {
                    continue;
                }
                if items.len() == page {
                    let token = last.map(|l: String| {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(l)
                    });
                    return Ok((items, token));
                }
                last = Some(job.job_id.clone());
                items.push(job.to_value());
            }
            if exhausted {
                return Ok((items, None));
            }
        }
    }

    /// Starts the runners of every unfinished job (at start-up).
    pub async fn resume_jobs(&self) -> Result<usize, HubError> {
        let mut after: Option<String> = None;
        let mut n = 0;
        loop {
            let batch = self
                .store
                .list_jobs(after.as_deref(), 1000)
                .await
                .map_err(|e| store_error("list jobs", e))?;
            let exhausted = batch.len() < 1000;
            for stored in batch {
                after = Some(stored.job_id.clone());
                match serde_json::from_str::<Job>(&stored.doc) {
                    Ok(job) if !job.is_finished() => {
                        self.spawn_job(&job.job_id);
                        n += 1;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(job_id = %stored.job_id, error = %e, "stored job is corrupt; not resumed")
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        if n > 0 {
            info!(jobs = n, "unfinished jobs resumed");
        }
        Ok(n)
    }

    /// Stops every runner without changing its job (shutdown) and waits until they have
    /// ended: the next start resumes them.
    pub async fn stop_jobs(&self) {
        loop {
            let ended = self.jobs.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            {
                let running = self.jobs.running();
                if running.is_empty() {
                    return;
                }
                for stop in running.values() {
                    let _ = stop.send(true);
                }
            }
            ended.await;
        }
    }

    fn spawn_job(&self, job_id: &str) {
        let Some(hub) = self.me.upgrade() else {
            return;
        };
        let (tx, rx) = watch::channel(false);
        {
            let mut running = self.jobs.running();
            if running.contains_key(job_id) {
                return;
            }
            running.insert(job_id.to_string(), tx);
        }
        let id = job_id.to_string();
        tokio::spawn(async move {
            if let Err(e) = hub.run_job(&id, rx).await {
                warn!(job_id = %id, error = %e.message(), "job runner failed");
                let reason = format!("the hub failed while running the job: {}", e.message());
                let _ = hub
                    .change_job(&id, |job| {
                        if job.is_finished() {
                            return false;
                        }
                        job.status = "failed".into();
                        job.failure_reason = Some(reason);
                        job.end_time = Some(crate::timefmt::now_iso());
                        true
                    })
                    .await;
            }
            hub.jobs.running().remove(&id);
            hub.jobs.ended.notify_waiters();
        });
    }

    async fn run_job(&self, job_id: &str, mut stop: watch::Receiver<bool>) -> Result<(), HubError> {
        let job = self.load_job(job_id).await?;
        if job.is_finished() {
            return Ok(());
        }
        let start = parse_time(&job.start_time).unwrap_or_else(OffsetDateTime::now_utc);
        tokio::select! {
            _ = tokio::time::sleep(until(start)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let job = self
            .change_job(job_id, |job| {
                if job.is_finished() || job.status == "running" {
                    return false;
                }
                job.status = "running".into();
                true
            })
            .await?;
        if job.is_finished() {
            return Ok(());
        }
        let deadline_wall = start
            + time::Duration::seconds(
                i64::try_from(job.max_execution_time_in_seconds).unwrap_or(i64::MAX / 2),
            );
        let deadline = tokio::time::Instant::now() + until(deadline_wall);
        info!(job_id, "job running");

        let mut stats = self.settle_interrupted(&job).await?;
        let query = devices_query(job.query_condition.as_deref());
        let mut continuation: Option<String> = None;
        let mut timed_out = false;
        loop {
            let page = self
                .query(&query, DEVICE_PAGE, continuation.as_deref())
                .await?;
            for item in &page.items {
                let Some(device_id) = item.get("deviceId").and_then(Value::as_str) else {
                    continue;
                };
                if *stop.borrow() {
                    return Ok(());
                }
                if self
                    .store
                    .get_device_job(job_id, device_id)
                    .await
                    .map_err(|e| store_error("read device job", e))?
                    .is_some()
                {
                    continue;
                }
                let now = crate::timefmt::now_iso();
                let mut row = json!({
                    "deviceId": device_id,
                    "jobId": job_id,
                    "jobType": job.job_type,
                    "status": "running",
                    "startTimeUtc": now,
                    "endTimeUtc": crate::timefmt::NEVER,
                    "createdDateTimeUtc": now,
                    "lastUpdatedDateTimeUtc": now,
                });
                if tokio::time::Instant::now() >= deadline {
                    timed_out = true;
                    row["status"] = "failed".into();
                    row["endTimeUtc"] = now.clone().into();
                    row["error"] = error_json(
                        ErrorCode::GatewayTimeout,
                        format!(
                            "the job's maximum execution time ({} s) passed before this device \
                             was reached",
                            job.max_execution_time_in_seconds
                        ),
                    );
                    self.put_row(job_id, device_id, &row).await?;
                    stats.device_count += 1;
                    stats.failed_count += 1;
                    continue;
                }
                // Durable before the action: a crash from here on leaves `running`, which a
                // resumed runner fails rather than repeats.
                self.put_row(job_id, device_id, &row).await?;
                let end = self.act(&job, device_id, deadline, &mut stop).await;
                let now = crate::timefmt::now_iso();
                row["endTimeUtc"] = now.clone().into();
                row["lastUpdatedDateTimeUtc"] = now.into();
                stats.device_count += 1;
                match end {
                    DeviceEnd::Done(outcome) => {
                        row["status"] = "completed".into();
                        if let Some(o) = outcome {
                            row["outcome"] = o;
                        }
                        stats.succeeded_count += 1;
                    }
                    DeviceEnd::Failed(error) => {
                        row["status"] = "failed".into();
                        row["error"] = error;
                        stats.failed_count += 1;
                    }
                    DeviceEnd::Stopped => {
                        // Whether the action reached the device is unknown: failed, not retried.
                        row["status"] = "failed".into();
                        row["error"] = error_json(
                            ErrorCode::InvalidOperation,
                            "the job was cancelled or the hub stopped while this device's action \
                             was in progress",
                        );
                        stats.failed_count += 1;
                        self.put_row(job_id, device_id, &row).await?;
                        self.save_statistics(job_id, &stats).await?;
                        return Ok(());
                    }
                }
                self.put_row(job_id, device_id, &row).await?;
                self.save_statistics(job_id, &stats).await?;
            }
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => break,
            }
        }
        let reason = timed_out.then(|| {
            format!(
                "the maximum execution time ({} s) passed before every device was reached",
                job.max_execution_time_in_seconds
            )
        });
        let done = self
            .change_job(job_id, |j| {
                if j.is_finished() {
                    return false;
                }
                j.device_job_statistics = stats;
                j.status = if reason.is_some() {
                    "failed"
                } else {
                    "completed"
                }
                .into();
                j.failure_reason = reason;
                j.end_time = Some(crate::timefmt::now_iso());
                true
            })
            .await?;
        info!(job_id, status = %done.status, devices = done.device_job_statistics.device_count, "job ended");
        Ok(())
    }

    /// The statistics of the rows a job already has, after failing those a crash left
    /// `running` (the action may have reached the device; it is not repeated).
    async fn settle_interrupted(&self, job: &Job) -> Result<Statistics, HubError> {
        let mut stats = Statistics::default();
        let mut after = None;
        loop {
            let rows = self
                .store
                .scan_device_jobs(Some(&job.job_id), after.clone(), 1000)
                .await
                .map_err(|e| store_error("scan device jobs", e))?;
            let exhausted = rows.len() < 1000;
            for r in rows {
                after = Some((r.job_id.clone(), r.device_id.clone()));
                let mut row: Value = serde_json::from_str(&r.doc).unwrap_or(Value::Null);
                stats.device_count += 1;
                match row.get("status").and_then(Value::as_str) {
                    Some("completed") => stats.succeeded_count += 1,
                    Some("running") => {
                        let now = crate::timefmt::now_iso();
                        row["status"] = "failed".into();
                        row["endTimeUtc"] = now.clone().into();
                        row["lastUpdatedDateTimeUtc"] = now.into();
                        row["error"] = error_json(
                            ErrorCode::ServerError,
                            "the hub stopped while this device's action was in progress; it is \
                             not repeated (it may or may not have reached the device)",
                        );
                        self.put_row(&job.job_id, &r.device_id, &row).await?;
                        stats.failed_count += 1;
                    }
                    _ => stats.failed_count += 1,
                }
            }
            if exhausted {
                return Ok(stats);
            }
        }
    }

    async fn put_row(&self, job_id: &str, device_id: &str, row: &Value) -> Result<(), HubError> {
        self.store
            .put_device_job(StoredDeviceJob {
                job_id: job_id.to_string(),
                device_id: device_id.to_string(),
                doc: row.to_string(),
            })
            .await
            .map_err(|e| store_error("write device job", e))
    }

    async fn save_statistics(&self, job_id: &str, stats: &Statistics) -> Result<(), HubError> {
        self.change_job(job_id, |j| {
            if j.is_finished() {
                return false;
            }
            j.device_job_statistics = stats.clone();
            true
        })
        .await
        .map(|_| ())
    }

    /// Applies the job's action to one device, giving up at the deadline or on a stop.
    async fn act(
        &self,
        job: &Job,
        device_id: &str,
        deadline: tokio::time::Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> DeviceEnd {
        let identity = Identity::device(device_id);
        let work = async {
            if let Some(update) = &job.update_twin {
                let patch = match twin_patch(update) {
                    Ok(p) => p,
                    Err(e) => return DeviceEnd::Failed(error_json(e.code(), e.message())),
                };
                return match self
                    .service_update_twin(&identity, patch, false, IfMatch::Any)
                    .await
                {
                    Ok(_) => DeviceEnd::Done(None),
                    Err(e) => DeviceEnd::Failed(error_json(e.code(), e.message())),
                };
            }
            let Some(method) = &job.cloud_to_device_method else {
                return DeviceEnd::Failed(error_json(ErrorCode::ArgumentInvalid, "no action"));
            };
            let inv = match invocation(method) {
                Ok(i) => i,
                Err(e) => return DeviceEnd::Failed(error_json(e.code(), e.message())),
            };
            loop {
                match self.invoke_method(&identity, inv.clone()).await {
                    Ok(r) => {
                        return DeviceEnd::Done(Some(json!({
                            "deviceMethodResponse": { "status": r.status, "payload": r.payload }
                        })))
                    }
                    // The throttle refills every second: wait for it rather than fail.
                    Err(MethodError::Throttled) => tokio::time::sleep(THROTTLE_BACKOFF).await,
                    Err(e) => {
                        let e = HubError::from(e);
                        return DeviceEnd::Failed(error_json(e.code(), e.message()));
                    }
                }
            }
        };
        tokio::select! {
            end = work => end,
            _ = tokio::time::sleep_until(deadline) => DeviceEnd::Failed(error_json(
                ErrorCode::GatewayTimeout,
                format!("the job's maximum execution time ({} s) passed during this device's action", job.max_execution_time_in_seconds),
            )),
            _ = stop.wait_for(|s| *s) => DeviceEnd::Stopped,
        }
    }
}

/// The query whose rows are a job's devices.
fn devices_query(condition: Option<&str>) -> String {
    match condition {
        Some(c) => format!("SELECT * FROM devices WHERE {c}"),
        None => "SELECT * FROM devices".to_string(),
    }
}

/// Resumes unfinished jobs at start-up, and stops every runner at shutdown (their jobs stay
/// as they are, for the next start to resume).
pub async fn jobs_loop(hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    if let Err(e) = hub.resume_jobs().await {
        warn!(error = %e.message(), "unfinished jobs could not be resumed");
    }
    crate::until_shutdown(&mut shutdown).await;
    hub.stop_jobs().await;
}
