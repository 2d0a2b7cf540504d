//! `ferrohub job schedule-twin|schedule-method|show|list|cancel`: the `/jobs/v2` API from the
//! command line, printing jobs as text or (`-o json`) as the hub answers them.

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use super::{ApiClient, ClientArgs, OutputFormat};
use crate::api::query::{CONTINUATION, MAX_ITEM_COUNT};

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Schedule a twin update (tags and/or desired properties) of every matching device.
    ScheduleTwin {
        job_id: String,
        /// Which devices, as a query's WHERE clause, e.g. "tags.site = 'paris'".
        #[arg(long = "where")]
        condition: String,
        /// The patch: {"tags": {...}} and/or {"properties": {"desired": {...}}}.
        #[arg(long)]
        patch: String,
        #[command(flatten)]
        timing: Timing,
    },
    /// Schedule a direct method call on every matching device.
    ScheduleMethod {
        job_id: String,
        #[arg(long = "where")]
        condition: String,
        #[arg(long)]
        method: String,
        /// The method's payload, as JSON.
        #[arg(long, default_value = "null")]
        payload: String,
        /// Seconds to wait for each device's answer (5 to 300).
        #[arg(long, default_value_t = 30)]
        response_timeout: u64,
        /// Seconds to wait for each device to connect (0 to 300).
        #[arg(long, default_value_t = 0)]
        connect_timeout: u64,
        #[command(flatten)]
        timing: Timing,
    },
    /// Show a job with its device statistics.
    Show { job_id: String },
    /// List jobs, of a type and status when given.
    List {
        /// scheduleUpdateTwin or scheduleDeviceMethod.
        #[arg(long = "type")]
        job_type: Option<String>,
        /// queued, scheduled, running, completed, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
    },
    /// Cancel a job that has not finished.
    Cancel { job_id: String },
}

#[derive(Debug, clap::Args)]
pub struct Timing {
    /// When to start (ISO 8601, e.g. 2026-12-01T18:00:00Z); default: now.
    #[arg(long)]
    start: Option<String>,
    /// Seconds the job may run before the devices it has not reached fail.
    #[arg(long, default_value_t = 3600)]
    max_execution_time: u64,
}

fn parse_json(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not JSON: {text}"))
}

pub async fn run_job(args: &ClientArgs, cmd: JobCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let enc = |id: &str| {
        percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let job = match cmd {
        JobCommand::ScheduleTwin {
            job_id,
            condition,
            patch,
            timing,
        } => {
            let mut update = parse_json("--patch", &patch)?;
            if let Value::Object(m) = &mut update {
                m.insert("etag".into(), "*".into());
            }
            let body = request(
                &job_id,
                "scheduleUpdateTwin",
                &condition,
                &timing,
                "updateTwin",
                update,
            );
            api.put(&format!("/jobs/v2/{}", enc(&job_id)), &body, None)
                .await?
        }
        JobCommand::ScheduleMethod {
            job_id,
            condition,
            method,
            payload,
            response_timeout,
            connect_timeout,
            timing,
        } => {
            let call = json!({
                "methodName": method,
                "payload": parse_json("--payload", &payload)?,
                "responseTimeoutInSeconds": response_timeout,
                "connectTimeoutInSeconds": connect_timeout,
            });
            let body = request(
                &job_id,
                "scheduleDeviceMethod",
                &condition,
                &timing,
                "cloudToDeviceMethod",
                call,
            );
            api.put(&format!("/jobs/v2/{}", enc(&job_id)), &body, None)
                .await?
        }
        JobCommand::Show { job_id } => api.get(&format!("/jobs/v2/{}", enc(&job_id))).await?,
        JobCommand::Cancel { job_id } => api
            .post(&format!("/jobs/v2/{}/cancel", enc(&job_id)), &json!({}))
            .await?
            .unwrap_or(Value::Null),
        JobCommand::List { job_type, status } => {
            let mut path = "/jobs/v2/query".to_string();
            let mut sep = '?';
            for (k, v) in [("jobType", job_type), ("jobStatus", status)] {
                if let Some(v) = v {
                    path.push_str(&format!("{sep}{k}={}", enc(&v)));
                    sep = '&';
                }
            }
            let mut jobs = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut headers = vec![(MAX_ITEM_COUNT, "100".to_string())];
                if let Some(t) = &token {
                    headers.push((CONTINUATION, t.clone()));
                }
                let (page, head) = api.get_with_headers(&path, &headers).await?;
                match page {
                    Value::Array(p) => jobs.extend(p),
                    other => anyhow::bail!("the hub answered a job list with {other}"),
                }
                token = head
                    .get(CONTINUATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if token.is_none() {
                    break;
                }
            }
            if args.output == OutputFormat::Json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                for j in &jobs {
                    println!("{}", summary(j));
                }
                println!(
                    "({} job{})",
                    jobs.len(),
                    if jobs.len() == 1 { "" } else { "s" }
                );
            }
            return Ok(());
        }
    };
    if args.output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        println!("{}", summary(&job));
        if let Some(reason) = job.get("failureReason").and_then(Value::as_str) {
            println!("  failure: {reason}");
        }
    }
    Ok(())
}

fn request(
    job_id: &str,
    job_type: &str,
    condition: &str,
    t: &Timing,
    key: &str,
    action: Value,
) -> Value {
    let mut body = json!({
        "jobId": job_id,
        "type": job_type,
        "queryCondition": condition,
        "maxExecutionTimeInSeconds": t.max_execution_time,
        key: action,
    });
    if let Some(start) = &t.start {
        body["startTime"] = start.clone().into();
    }
    body
}

/// One line per job: id, type, status and its device counts.
fn summary(j: &Value) -> String {
    let s = |k: &str| j.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let st = &j["deviceJobStatistics"];
    let n = |k: &str| st.get(k).and_then(Value::as_u64).unwrap_or(0);
    format!(
        "{}  {}  {}  devices={} succeeded={} failed={}  start={}",
        s("jobId"),
        s("type"),
        s("status"),
        n("deviceCount"),
        n("succeededCount"),
        n("failedCount"),
        s("startTime"),
    )
}
