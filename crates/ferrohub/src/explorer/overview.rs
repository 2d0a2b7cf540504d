//! `GET /explorer/api/overview`: the dashboard's counters, read by any signed-in session every
//! couple of seconds and turned into rates by the front end. The shape:
//!
//! ```json
//! {"version": "0.1.0", "uptimeSeconds": 12,
//!  "devices": {"total": 3, "enabled": 2, "disabled": 1, "connected": 1},
//!  "telemetry": {"messagesIn": 10, "bytesIn": 420},
//!  "c2d": {"sent": 2, "delivered": 2, "completed": 1},
//!  "eventsOut": 9,
//!  "connections": {"current": 1, "byTransport": {"mqtt-tls": 1, "mqtt-ws": 0, "https": 0}},
//!  "connects": {"accepted": 4},
//!  "refusals": {"IoTHubUnauthorized": 1},
//!  "storage": {"dataDirBytes": 123456, "telemetryLogBytes": 65536},
//!  "retention": {"telemetrySeconds": 86400, "partitions": 4}}
//! ```
//!
//! Counters are the process's (`ferrohub_hub::metrics::counters`, moved by the same calls as
//! the Prometheus metrics) since it started; `eventsOut` counts events handed to back-end
//! readers (`GET /events` lines, Event Hubs transfers), `refusals` refused device CONNECTs by
//! IoT Hub error name, `byTransport` open connections by the metrics' transport label
//! (`mqtt-tls`, `mqtt-ws`, `https`). A figure the hub cannot give is left out rather than sent
//! as zero: `devices` when the store fails, `storage` when the directory cannot be read.

use std::path::Path;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::{ExplorerState, SignedIn};

/// What the hub keeps of telemetry, from its configuration.
#[derive(Debug, Clone, Copy)]
pub struct RetentionInfo {
    pub telemetry_seconds: u64,
    pub partitions: u32,
}

/// Bytes of the files under `dir`, recursively; unreadable entries count as nothing. Runs on a
/// blocking thread: a data directory can hold many stream files.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub async fn overview(State(state): State<ExplorerState>, _: SignedIn) -> Json<Value> {
    let explorer = &state.explorer;
    let c = ferrohub_hub::metrics::counters();
    let mut out = Map::new();
    out.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    out.insert(
        "uptimeSeconds".into(),
        json!(explorer.started.elapsed().as_secs()),
    );
    let connected = explorer.hub.service_statistics().connected_device_count;
    if let Ok(r) = explorer.hub.registry_statistics().await {
        out.insert(
            "devices".into(),
            json!({
                "total": r.total_device_count,
                "enabled": r.enabled_device_count,
                "disabled": r.disabled_device_count,
                "connected": connected,
            }),
        );
    }
    out.insert(
        "telemetry".into(),
        json!({
            "messagesIn": c.telemetry_messages.load(Ordering::Relaxed),
            "bytesIn": c.telemetry_bytes.load(Ordering::Relaxed),
        }),
    );
    out.insert(
        "c2d".into(),
        json!({
            "sent": c.c2d_sent.load(Ordering::Relaxed),
            "delivered": c.c2d_delivered.load(Ordering::Relaxed),
            "completed": c.c2d_completed.load(Ordering::Relaxed),
        }),
    );
    out.insert(
        "eventsOut".into(),
        json!(c.events_delivered.load(Ordering::Relaxed)),
    );
    let by_transport = c.connections();
    out.insert(
        "connections".into(),
        json!({
            "current": by_transport.values().sum::<u64>(),
            "byTransport": by_transport,
        }),
    );
    out.insert(
        "connects".into(),
        json!({"accepted": c.connects.load(Ordering::Relaxed)}),
    );
    out.insert("refusals".into(), json!(c.refusals()));
    let dir = explorer.data_dir.clone();
    if let Ok((all, log)) = tokio::task::spawn_blocking(move || {
        (
            dir_bytes(&dir),
            ferrohub_sqlite::metrics::telemetry_log_bytes(&dir),
        )
    })
    .await
    {
        out.insert(
            "storage".into(),
            json!({"dataDirBytes": all, "telemetryLogBytes": log}),
        );
    }
    out.insert(
        "retention".into(),
        json!({
            "telemetrySeconds": explorer.retention.telemetry_seconds,
            "partitions": explorer.retention.partitions,
        }),
    );
    Json(Value::Object(out))
}
