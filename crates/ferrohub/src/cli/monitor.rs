//! `ferrohub monitor`: follows the telemetry stream like `az iot hub monitor-events`, printing
//! each event with its device, time, properties and body until Ctrl-C; `--endpoint NAME` reads
//! a custom stream endpoint instead of the built-in one.

use clap::Args;
use serde_json::Value;

use super::{ApiClient, ClientArgs, OutputFormat};

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Only this device's events.
    #[arg(long, short = 'd')]
    pub device: Option<String>,
    /// Only this module's events (with --device).
    #[arg(long, short = 'm', requires = "device")]
    pub module: Option<String>,
    /// Consumer group: each group reads the stream independently with its own checkpoint.
    #[arg(long, short = 'g', default_value = "$Default")]
    pub consumer_group: String,
    /// Where to start: end (only new events), start, checkpoint (where this group stopped),
    /// or an RFC 3339 time such as 2026-11-22T05:00:00Z.
    #[arg(long, default_value = "end")]
    pub from: String,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// A custom stream endpoint to read instead of the built-in `events` (see `ferrohub
    /// endpoint`).
    #[arg(long, short = 'e')]
    pub endpoint: Option<String>,
}

pub async fn run_monitor(args: &ClientArgs, m: MonitorArgs) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let mut path = format!(
        "/events?consumerGroup={}&from={}",
        super::enc(&m.consumer_group),
        super::enc(&m.from)
    );
    if let Some(d) = &m.device {
        path.push_str(&format!("&deviceId={}", super::enc(d)));
    }
    if let Some(mid) = &m.module {
        path.push_str(&format!("&moduleId={}", super::enc(mid)));
    }
    if let Some(e) = &m.endpoint {
        path.push_str(&format!("&endpoint={}", super::enc(e)));
    }
    let mut resp = api.stream(&path).await?;
    if args.output == OutputFormat::Text {
        eprintln!(
            "Monitoring telemetry of endpoint {} (consumer group {}, from {}). Press Ctrl-C to stop.",
            m.endpoint.as_deref().unwrap_or("events"),
            m.consumer_group,
            m.from
        );
    }
    let mut pending = Vec::new();
    let mut seen = 0u64;
    loop {
        let chunk = tokio::select! {
            c = resp.chunk() => c?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(chunk) = chunk else {
            anyhow::bail!("the hub closed the event stream");
        };
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            match args.output {
                OutputFormat::Json => println!("{text}"),
                OutputFormat::Text => match serde_json::from_str::<Value>(text) {
                    Ok(v) => print!("{}", render(&v)),
                    Err(_) => println!("{text}"),
                },
            }
            seen += 1;
            if m.count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
    }
}

/// One event as readable text: origin and time, properties, then the body (pretty JSON when
/// it is JSON).
pub fn render(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let origin = match v.get("moduleId").and_then(Value::as_str) {
        Some(m) => format!("{}/{m}", s("deviceId")),
        None => s("deviceId").to_string(),
    };
    let mut out = format!(
        "event from {origin} at {} (partition {}, sequence {})\n",
        s("enqueuedTime"),
        v["partition"],
        v["sequenceNumber"]
    );
    let kv = |obj: &Value| -> Vec<String> {
        obj.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        Value::Null => k.clone(),
                        other => format!("{k}={other}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let sys = kv(&v["systemProperties"]);
    if !sys.is_empty() {
        out.push_str(&format!("  system properties:      {}\n", sys.join(", ")));
    }
    let app = kv(&v["properties"]);
    if !app.is_empty() {
        out.push_str(&format!("  application properties: {}\n", app.join(", ")));
    }
    let body = s("body");
    let shown = if s("bodyEncoding") == "base64" {
        format!("(base64) {body}")
    } else {
        match serde_json::from_str::<Value>(body) {
            Ok(j) if j.is_object() || j.is_array() => {
                serde_json::to_string_pretty(&j).unwrap_or_else(|_| body.to_string())
            }
            _ => body.to_string(),
        }
    };
    out.push_str("  body:\n");
    for line in shown.lines() {
        out.push_str(&format!("    {line}\n"));
    }
    out
}
