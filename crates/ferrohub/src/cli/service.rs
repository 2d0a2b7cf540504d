//! The CLI's service-side operations on devices: `c2d send|purge|feedback`, `twin show|update`
//! and `invoke`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use ferrohub_store::FeedbackRequest;
use serde_json::{json, Map, Value};

use super::output::Output;
use super::{enc, ApiClient, ClientArgs, OutputFormat};
use crate::api::types::{
    C2dSendBody, C2dSent, FeedbackRecord, MethodRequest, MethodResponse, PurgeResult,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckChoice {
    None,
    Positive,
    Negative,
    Full,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum C2dCommand {
    /// Send a cloud-to-device message. Prints "sent" once the hub has it on disk.
    Send {
        device_id: String,
        /// Send to this module of the device.
        #[arg(long, short = 'm')]
        module: Option<String>,
        /// Message body (text).
        #[arg(long, conflicts_with = "data_file")]
        data: Option<String>,
        /// Read the message body from a file (bytes as they are).
        #[arg(long)]
        data_file: Option<PathBuf>,
        /// Application property `key=value` (`key=` is empty, a bare `key` is null). Repeat.
        #[arg(long = "props", short = 'p', value_name = "KEY=VALUE")]
        props: Vec<String>,
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long)]
        user_id: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
        #[arg(long)]
        content_encoding: Option<String>,
        /// Feedback to ask for.
        #[arg(long, value_enum, default_value_t = AckChoice::None)]
        ack: AckChoice,
        /// Time to live in seconds (default: the hub's, 1 hour).
        #[arg(long, conflicts_with = "expiry")]
        ttl: Option<u64>,
        /// Absolute expiry, RFC 3339 UTC.
        #[arg(long)]
        expiry: Option<String>,
    },
    /// Delete every queued message of a device (or module).
    Purge {
        device_id: String,
        #[arg(long, short = 'm')]
        module: Option<String>,
    },
    /// Receive delivery feedback: prints a batch of records and completes it.
    Feedback {
        /// Wait up to this many seconds for feedback to arrive.
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// Release the batch instead of completing it (it will be received again).
        #[arg(long)]
        abandon: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Show a device's (or module's) twin.
    Show {
        device_id: String,
        #[arg(long, short = 'm', conflicts_with = "digital")]
        module: Option<String>,
        /// Show the IoT Plug and Play digital twin (`GET /digitaltwins/{id}`) instead: devices
        /// only, as on IoT Hub.
        #[arg(long)]
        digital: bool,
    },
    /// Update tags and desired properties (merge; `null` removes a member).
    Update {
        device_id: String,
        #[arg(long, short = 'm')]
        module: Option<String>,
        /// Tags, as a JSON object.
        #[arg(long)]
        tags: Option<String>,
        /// Desired properties, as a JSON object.
        #[arg(long)]
        desired: Option<String>,
        /// Only update if the twin still has this etag.
        #[arg(long)]
        etag: Option<String>,
        /// Replace tags and desired properties instead of merging.
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    pub device_id: String,
    /// Method name (`component*command` for an IoT Plug and Play component).
    pub method: String,
    #[arg(long, short = 'm')]
    pub module: Option<String>,
    /// The IoT Plug and Play component whose command METHOD is: sends `COMPONENT*METHOD`.
    #[arg(long, short = 'c')]
    pub component: Option<String>,
    /// Request payload, JSON (a bare word is sent as a JSON string).
    #[arg(long)]
    pub payload: Option<String>,
    /// Seconds to wait for the answer (5 to 300).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Seconds to wait for the device to come online (0 to 300).
    #[arg(long, default_value_t = 0)]
    pub connect_timeout: u64,
}

fn identity_path(prefix: &str, device: &str, module: Option<&str>) -> String {
    match module {
        None => format!("{prefix}/{}", enc(device)),
        Some(m) => format!("{prefix}/{}/modules/{}", enc(device), enc(m)),
    }
}

fn parse_json_object(text: &str, what: &str) -> anyhow::Result<Value> {
    let v: Value =
        serde_json::from_str(text).with_context(|| format!("--{what} is not valid JSON"))?;
    if !v.is_object() {
        bail!("--{what} must be a JSON object");
    }
    Ok(v)
}

fn parse_props(props: &[String]) -> Map<String, Value> {
    props
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), Value::String(v.to_string())),
            None => (p.clone(), Value::Null),
        })
        .collect()
}

pub async fn run_c2d(args: &ClientArgs, cmd: C2dCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        C2dCommand::Send {
            device_id,
            module,
            data,
            data_file,
            props,
            message_id,
            correlation_id,
            user_id,
            content_type,
            content_encoding,
            ack,
            ttl,
            expiry,
        } => {
            let mut body = C2dSendBody {
                message_id,
                correlation_id,
                user_id,
                content_type,
                content_encoding,
                expiry_time_utc: expiry,
                ttl_seconds: ttl,
                ack: Some(match ack {
                    AckChoice::None => FeedbackRequest::None,
                    AckChoice::Positive => FeedbackRequest::Positive,
                    AckChoice::Negative => FeedbackRequest::Negative,
                    AckChoice::Full => FeedbackRequest::Full,
                }),
                properties: parse_props(&props),
                ..Default::default()
            };
            match (data, data_file) {
                (Some(d), _) => body.payload = Some(Value::String(d)),
                (None, Some(f)) => {
                    let bytes =
                        std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                    use base64::Engine;
                    body.payload_base64 =
                        Some(base64::engine::general_purpose::STANDARD.encode(bytes));
                }
                (None, None) => {}
            }
            let path = format!(
                "{}/messages/deviceBound",
                identity_path("/devices", &device_id, module.as_deref())
            );
            let r: C2dSent = api.post_as(&path, &body, None).await?;
            if args.output == OutputFormat::Json {
                return out.json(&r);
            }
            let target = match &module {
                Some(m) => format!("{device_id}/{m}"),
                None => device_id,
            };
            out.done(&format!(
                "sent message {} to {target} (sequence number {}, expires {})",
                r.message_id, r.sequence_number, r.expiry_time_utc
            ))
        }
        C2dCommand::Purge { device_id, module } => {
            let path = format!(
                "{}/commands",
                identity_path("/devices", &device_id, module.as_deref())
            );
            let r = api
                .delete_with_body(&path)
                .await?
                .context("the hub answered with an empty body")?;
            let r: PurgeResult =
                serde_json::from_value(r).context("the hub answered with an unexpected body")?;
            if args.output == OutputFormat::Json {
                return out.json(&r);
            }
            out.done(&format!("purged {} message(s)", r.total_messages_purged))
        }
        C2dCommand::Feedback { wait, abandon } => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            let (records, token) = loop {
                if let Some((records, token)) = api
                    .get_with_header("/messages/serviceBound/feedback", "iothub-locktoken")
                    .await?
                {
                    break (records, token);
                }
                if tokio::time::Instant::now() >= deadline {
                    if args.output == OutputFormat::Json {
                        return out.json(&json!([]));
                    }
                    return out.done("no feedback");
                }
                // The feedback endpoint has no long poll; ask again shortly.
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            let token = token.context("the hub sent feedback without a lock token")?;
            let records: Vec<FeedbackRecord> = serde_json::from_value(records)
                .context("the hub answered with an unexpected body")?;
            if abandon {
                api.post(
                    &format!("/messages/serviceBound/feedback/{}/abandon", enc(&token)),
                    &json!({}),
                )
                .await?;
            } else {
                api.delete(
                    &format!("/messages/serviceBound/feedback/{}", enc(&token)),
                    None,
                )
                .await?;
            }
            if args.output == OutputFormat::Json {
                return out.json(&records);
            }
            for r in &records {
                let id = match &r.module_id {
                    Some(m) => format!("{}/{m}", r.device_id),
                    None => r.device_id.clone(),
                };
                println!(
                    "{}  {}  message {}  {:?}",
                    r.enqueued_time_utc, id, r.original_message_id, r.status_code
                );
            }
            Ok(())
        }
    }
}

pub async fn run_twin(args: &ClientArgs, cmd: TwinCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        TwinCommand::Show {
            device_id,
            module,
            digital,
        } => {
            let prefix = if digital { "/digitaltwins" } else { "/twins" };
            let t = api
                .get(&identity_path(prefix, &device_id, module.as_deref()))
                .await?;
            out.json(&t)
        }
        TwinCommand::Update {
            device_id,
            module,
            tags,
            desired,
            etag,
            replace,
        } => {
            if tags.is_none() && desired.is_none() && !replace {
                bail!("give --tags and/or --desired");
            }
            let mut body = Map::new();
            if let Some(t) = tags {
                body.insert("tags".into(), parse_json_object(&t, "tags")?);
            }
            if let Some(d) = desired {
                body.insert(
                    "properties".into(),
                    json!({"desired": parse_json_object(&d, "desired")?}),
                );
            }
            let path = identity_path("/twins", &device_id, module.as_deref());
            let cond = etag.unwrap_or_else(|| "*".into());
            let t = if replace {
                api.put(&path, &Value::Object(body), Some(&cond)).await?
            } else {
                api.patch(&path, &Value::Object(body), Some(&cond)).await?
            };
            out.json(&t)
        }
    }
}

pub async fn run_invoke(args: &ClientArgs, inv: InvokeArgs) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    let payload = match &inv.payload {
        None => Value::Null,
        Some(p) => serde_json::from_str(p).unwrap_or_else(|_| Value::String(p.clone())),
    };
    // The method route reaches modules too, which the digital twin command route does not;
    // for the device the two are the same call.
    let method_name = match &inv.component {
        Some(c) if c.is_empty() || c.contains('*') => {
            bail!("--component may not be empty or contain '*'")
        }
        Some(c) => format!("{c}*{}", inv.method),
        None => inv.method.clone(),
    };
    let body = MethodRequest {
        method_name,
        payload,
        response_timeout_in_seconds: Some(inv.timeout),
        connect_timeout_in_seconds: Some(inv.connect_timeout),
    };
    let path = format!(
        "{}/methods",
        identity_path("/twins", &inv.device_id, inv.module.as_deref())
    );
    let wait = Duration::from_secs(inv.timeout + inv.connect_timeout + 30);
    let r: MethodResponse = api.post_as(&path, &body, Some(wait)).await?;
    if args.output == OutputFormat::Json {
        return out.json(&r);
    }
    println!("status: {}", r.status);
    println!("{}", serde_json::to_string_pretty(&r.payload)?);
    Ok(())
}
