//! Scheduled jobs (`/jobs/v2`): a twin update or a direct method applied to every device a
//! query condition matches, from a start time, for at most a maximum execution time.
//!
//! A job and each device's row live in the store ([`JobStore`]); a runner task per unfinished
//! job sleeps until the start time (a timer), then walks the matching devices with the hub's
//! own query scan (`SELECT * FROM devices WHERE <condition>`, page by page) and applies the
//! action through the same services the REST API uses (`service_update_twin`,
//! `invoke_method`), so desired-property notifications and the method throttle apply as for
//! a single call. Up to [`IN_FLIGHT`] devices are acted on at once; devices are claimed and
//! settled in groups, one row commit per group, so a job is not bound by commit latency.
//!
//! Guarantee: a device is acted on at most once per job. Its row is written as `running`
//! (durably) before the action and as `completed` / `failed` after; a runner that finds a
//! `running` row left by a crash marks it `failed` without acting again, since the action may
//! or may not have reached the device. Unfinished jobs resume at start-up
//! ([`Hub::resume_jobs`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::{IfMatch, StoreError, StoredDeviceJob, StoredJob};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
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
/// Devices a job acts on at once. Enough that the twin writes and row commits of many devices
/// share the store's group commits (one device at a time was bound by commit latency, about
/// 1.5 ms a device); few enough that one job does not crowd out the API. Method calls still
/// pass the method throttle one by one.
const IN_FLIGHT: usize = 32;
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

/// IoT Hub's code for a job id it does not know (404002, in its published error codes).
fn job_not_found(id: &str) -> HubError {
    info!(job_id = id, error_code = 404002, "job not found");
    HubError::new(ErrorCode::JobNotFound, format!("job {id:?} does not exist"))
}

/// Where a runner is in its walk over the matching devices.
struct DeviceScan {
    query: String,
    continuation: Option<String>,
    exhausted: bool,
    /// Devices of the last page not yet claimed.
    queue: VecDeque<String>,
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
                // IoT Hub answers an unknown type with `ErrorCode:GenericBadRequest;BadRequest`
                // (the REST docs' issue 29484 quotes it for `scheduleTwinUpdate`).
                let message = format!("job type {other:?} is not one of {TWIN_JOB}, {METHOD_JOB}");
                info!(error_code = 400000, reason = %message, "job refused");
                return Err(HubError::new(ErrorCode::GenericBadRequest, message));
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
        // Rows left by an earlier run may or may not match still: at least as many devices
        // as rows, and as many as match now.
        let matched = self.count_devices(job.query_condition.as_deref()).await?;
        let done = stats.succeeded_count + stats.failed_count;
        stats.device_count = done.max(matched);
        stats.pending_count = stats.device_count - done;
        self.save_statistics(job_id, &stats).await?;

        let mut scan = DeviceScan {
            query: devices_query(job.query_condition.as_deref()),
            continuation: None,
            exhausted: false,
            queue: VecDeque::new(),
        };
        let job = &job;
        let mut in_flight = FuturesUnordered::new();
        let mut timed_out = false;
        let mut stopped = false;
        loop {
            stopped = stopped || *stop.borrow();
            let free = IN_FLIGHT - in_flight.len();
            if !stopped && free > 0 {
                let batch = self.next_devices(job_id, &mut scan, free).await?;
                if !batch.is_empty() {
                    let now = crate::timefmt::now_iso();
                    let mut rows: Vec<(String, Value)> = batch
                        .into_iter()
                        .map(|device_id| {
                            let row = json!({
                                "deviceId": device_id,
                                "jobId": job_id,
                                "jobType": job.job_type,
                                "status": "running",
                                "startTimeUtc": now,
                                "endTimeUtc": crate::timefmt::NEVER,
                                "createdDateTimeUtc": now,
                                "lastUpdatedDateTimeUtc": now,
                            });
                            (device_id, row)
                        })
                        .collect();
                    let n = rows.len() as u64;
                    // A device found past the count (it started matching since) grows it.
                    stats.device_count += n.saturating_sub(stats.pending_count);
                    stats.pending_count = stats.pending_count.saturating_sub(n);
                    if tokio::time::Instant::now() >= deadline {
                        timed_out = true;
                        for (_, row) in &mut rows {
                            row["status"] = "failed".into();
                            row["endTimeUtc"] = now.clone().into();
                            row["error"] = error_json(
                                ErrorCode::GatewayTimeout,
                                format!(
                                    "the job's maximum execution time ({} s) passed before this \
                                     device was reached",
                                    job.max_execution_time_in_seconds
                                ),
                            );
                        }
                        stats.failed_count += n;
                        self.commit_progress(job_id, &rows, &stats).await?;
                        continue;
                    }
                    stats.running_count += n;
                    // Durable before any of these actions: a crash from here on leaves
                    // `running`, which a resumed runner fails rather than repeats.
                    self.commit_progress(job_id, &rows, &stats).await?;
                    for (device_id, row) in rows {
                        let mut stop = stop.clone();
                        in_flight.push(async move {
                            let end = self.act(job, &device_id, deadline, &mut stop).await;
                            (device_id, row, end)
                        });
                    }
                    continue;
                }
            }
            if in_flight.is_empty() {
                // Nothing in flight and nothing claimed: the scan has ended, or a stop came.
                break;
            }
            // Settle the first action to end and every other that has ended meanwhile, in
            // one commit.
            let Some(first) = in_flight.next().await else {
                continue;
            };
            let mut ended = vec![first];
            while let Some(Some(more)) = in_flight.next().now_or_never() {
                ended.push(more);
            }
            let mut rows = Vec::with_capacity(ended.len());
            for (device_id, mut row, end) in ended {
                let now = crate::timefmt::now_iso();
                row["endTimeUtc"] = now.clone().into();
                row["lastUpdatedDateTimeUtc"] = now.into();
                stats.running_count = stats.running_count.saturating_sub(1);
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
                        stopped = true;
                        row["status"] = "failed".into();
                        row["error"] = error_json(
                            ErrorCode::InvalidOperation,
                            "the job was cancelled or the hub stopped while this device's action \
                             was in progress",
                        );
                        stats.failed_count += 1;
                    }
                }
                rows.push((device_id, row));
            }
            self.commit_progress(job_id, &rows, &stats).await?;
        }
        if stopped {
            // Cancelled (the status says so already) or shutting down (the next start resumes).
            return Ok(());
        }
        let reason = timed_out.then(|| {
            format!(
                "the maximum execution time ({} s) passed before every device was reached",
                job.max_execution_time_in_seconds
            )
        });
        // Every device found has ended: devices counted that stopped matching before the
        // scan reached them are not the job's.
        stats.device_count = stats.succeeded_count + stats.failed_count;
        stats.pending_count = 0;
        stats.running_count = 0;
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
            let mut failed_now = Vec::new();
            for r in rows {
                after = Some((r.job_id.clone(), r.device_id.clone()));
                let mut row: Value = serde_json::from_str(&r.doc).unwrap_or(Value::Null);
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
                        failed_now.push((r.device_id, row));
                        stats.failed_count += 1;
                    }
                    _ => stats.failed_count += 1,
                }
            }
            self.put_rows(&job.job_id, &failed_now).await?;
            if exhausted {
                stats.device_count = stats.succeeded_count + stats.failed_count;
                return Ok(stats);
            }
        }
    }

    /// How many devices match a job's condition now (`deviceCount` before the scan).
    async fn count_devices(&self, condition: Option<&str>) -> Result<u64, HubError> {
        let text = match condition {
            Some(c) => format!("SELECT COUNT() AS n FROM devices WHERE {c}"),
            None => "SELECT COUNT() AS n FROM devices".to_string(),
        };
        let page = self.query(&text, 1, None).await?;
        Ok(page
            .items
            .first()
            .and_then(|row| row.get("n"))
            .and_then(Value::as_u64)
            .unwrap_or(0))
    }

    /// Up to `n` matching devices without a row for this job, in id order, reading query
    /// pages as needed. The row check is what makes "at most once" hold whatever the scan
    /// returns (a resumed job, a device deleted and created again).
    async fn next_devices(
        &self,
        job_id: &str,
        scan: &mut DeviceScan,
        n: usize,
    ) -> Result<Vec<String>, HubError> {
        let mut out = Vec::new();
        while out.len() < n {
            if let Some(device_id) = scan.queue.pop_front() {
                let seen = self
                    .store
                    .get_device_job(job_id, &device_id)
                    .await
                    .map_err(|e| store_error("read device job", e))?
                    .is_some();
                if !seen && !out.contains(&device_id) {
                    out.push(device_id);
                }
                continue;
            }
            if scan.exhausted {
                break;
            }
            let page = self
                .query(&scan.query, DEVICE_PAGE, scan.continuation.as_deref())
                .await?;
            scan.queue.extend(
                page.items
                    .iter()
                    .filter_map(|item| item.get("deviceId").and_then(Value::as_str))
                    .map(str::to_string),
            );
            match page.continuation {
                Some(c) => scan.continuation = Some(c),
                None => scan.exhausted = true,
            }
        }
        Ok(out)
    }

    /// Device rows in one durable commit, and the statistics beside them (the two writes
    /// issued together share the store's group commit).
    async fn commit_progress(
        &self,
        job_id: &str,
        rows: &[(String, Value)],
        stats: &Statistics,
    ) -> Result<(), HubError> {
        tokio::try_join!(
            self.put_rows(job_id, rows),
            self.save_statistics(job_id, stats)
        )
        .map(|_| ())
    }

    async fn put_rows(&self, job_id: &str, rows: &[(String, Value)]) -> Result<(), HubError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.store
            .put_device_jobs(
                rows.iter()
                    .map(|(device_id, row)| StoredDeviceJob {
                        job_id: job_id.to_string(),
                        device_id: device_id.clone(),
                        doc: row.to_string(),
                    })
                    .collect(),
            )
            .await
            .map_err(|e| store_error("write device jobs", e))?;
        // Each device whose part ended is a device job lifecycle event, once its row is durable.
        for (device_id, row) in rows {
            if matches!(row["status"].as_str(), Some("completed" | "failed")) {
                self.emit_device_job(&Identity::device(device_id), row)
                    .await;
            }
        }
        Ok(())
    }

    /// The runner is the only writer of statistics; a cancelled job still gets them (its
    /// last actions settle after the cancel), a completed or failed one has its final ones.
    async fn save_statistics(&self, job_id: &str, stats: &Statistics) -> Result<(), HubError> {
        self.change_job(job_id, |j| {
            if matches!(j.status.as_str(), "completed" | "failed") {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::registry::IdentityRequest;
    use crate::testing::{connect, fixture, Fixture, R};
    use ferrohub_store::JobStore;

    const WAIT: Duration = Duration::from_secs(10);

    async fn devices(f: &Fixture, n: usize) -> R<Vec<String>> {
        let mut ids = Vec::new();
        for i in 0..n {
            let id = format!("d{i:03}");
            f.hub
                .put_device(&id, IdentityRequest::default(), None)
                .await?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// A job has no event to wait on; its document is read until `done` holds.
    async fn job_until(f: &Fixture, id: &str, done: impl Fn(&Value) -> bool) -> R<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let job = f.hub.get_job(id).await?;
            if done(&job) {
                return Ok(job);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("job {id} never got there: {job}").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn rows(f: &Fixture, job_id: &str) -> R<Vec<Value>> {
        let rows = f.store.scan_device_jobs(Some(job_id), None, 10_000).await?;
        Ok(rows
            .iter()
            .map(|r| serde_json::from_str(&r.doc))
            .collect::<Result<_, _>>()?)
    }

    fn stats(job: &Value) -> (u64, u64, u64, u64, u64) {
        let s = &job["deviceJobStatistics"];
        let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
        (
            n("deviceCount"),
            n("pendingCount"),
            n("runningCount"),
            n("succeededCount"),
            n("failedCount"),
        )
    }

    #[tokio::test]
    async fn a_twin_job_settles_devices_in_shared_commits_and_updates_each_once() -> R {
        let f = fixture()?;
        let ids = devices(&f, 100).await?;
        f.hub
            .create_job(
                "t",
                json!({"type": TWIN_JOB, "updateTwin": {"properties": {"desired": {"fw": "2.1"}}}}),
            )
            .await?;
        let job = job_until(&f, "t", |j| j["status"] == "completed").await?;
        assert_eq!(stats(&job), (100, 0, 0, 100, 0), "{job}");
        let rows = rows(&f, "t").await?;
        assert_eq!(rows.len(), 100);
        assert!(rows.iter().all(|r| r["status"] == "completed"), "{rows:?}");
        for id in &ids {
            let twin = f.hub.service_twin(&Identity::device(id)).await?;
            assert_eq!(twin["properties"]["desired"]["fw"], "2.1", "{twin}");
            // One patch, not two: the desired version went from 1 to 2 once.
            assert_eq!(twin["properties"]["desired"]["$version"], 2, "{twin}");
        }
        // One device at a time took two row commits a device (200 here).
        let writes = f.store.device_job_writes.load(Ordering::SeqCst);
        assert!(writes <= 20, "{writes} row commits for 100 devices");
        Ok(())
    }

    /// 40 devices that take their method request and do not answer: the first IN_FLIGHT are
    /// called at once and counted running, the rest pending; a cancel then fails the calls in
    /// flight and never calls the others.
    #[tokio::test]
    async fn a_method_job_runs_a_bounded_number_at_once_and_a_cancel_stops_new_devices() -> R {
        let f = fixture()?;
        let ids = devices(&f, IN_FLIGHT + 8).await?;
        let mut links = Vec::new();
        for id in &ids {
            links.push(connect(&f.hub, id, &["$iothub/methods/POST/#"]).await);
        }
        f.hub
            .create_job(
                "m",
                json!({"type": METHOD_JOB, "cloudToDeviceMethod":
                       {"methodName": "hang", "responseTimeoutInSeconds": 300}}),
            )
            .await?;
        for (_, pushed) in links.iter_mut().take(IN_FLIGHT) {
            tokio::time::timeout(WAIT, pushed.recv())
                .await?
                .ok_or("link closed")?;
        }
        let job = job_until(&f, "m", |j| {
            j["deviceJobStatistics"]["runningCount"] == IN_FLIGHT
        })
        .await?;
        assert_eq!(stats(&job), (40, 8, 32, 0, 0), "{job}");
        let running = rows(&f, "m").await?;
        assert_eq!(running.len(), IN_FLIGHT);
        assert!(running.iter().all(|r| r["status"] == "running"));

        f.hub.cancel_job("m").await?;
        let job = job_until(&f, "m", |j| j["deviceJobStatistics"]["runningCount"] == 0).await?;
        assert_eq!(job["status"], "cancelled");
        assert_eq!(stats(&job), (40, 8, 0, 0, 32), "{job}");
        let settled = rows(&f, "m").await?;
        assert_eq!(
            settled.len(),
            IN_FLIGHT,
            "a device past the cancel got a row"
        );
        assert!(settled.iter().all(|r| r["status"] == "failed"));
        // Let the runner end, then look: no request ever reached the last 8.
        let deadline = tokio::time::Instant::now() + WAIT;
        while f.hub.jobs.running().contains_key("m") {
            if tokio::time::Instant::now() > deadline {
                return Err("the runner did not end".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (_, pushed) in links.iter_mut().skip(IN_FLIGHT) {
            assert!(
                pushed.try_recv().is_err(),
                "a device past the cancel was called"
            );
        }
        Ok(())
    }
}
