//! `GET /events`: the telemetry stream for back ends, as newline-delimited JSON over one
//! long-lived HTTPS response (the role IoT Hub's Event Hubs-compatible endpoint plays).
//!
//! Query: `consumerGroup` (default `$Default`), `from` = `checkpoint` (default: where the
//! group's last reader stopped, or `end` if it never read) | `start` | `end` | an ISO 8601 UTC
//! time | a sequence number (with `partition`), optional `partition` and `deviceId` filters.
//! Each line is one event. The group's checkpoint advances as lines are written to the
//! connection, so a reader that reconnects with `from=checkpoint` gets no event twice and
//! misses none published since; lines still in flight when a reader vanished count as read.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferrohub_store::telemetry::{EventRecord, StartPosition, TelemetryLog};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::auth::{authorize, Right};
use super::{require_api_version, ApiError, ApiState};
use ferrohub_hub::timefmt;

/// Events read from one partition per store call.
const READ_BATCH: usize = 256;
/// How often a reader's position is saved as the group's checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Lines buffered towards a slow reader before reading the log pauses.
const LINES_BUFFERED: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Checkpoint,
    Position(StartPosition),
}

fn parse_from(v: Option<&str>) -> Result<From, ApiError> {
    match v.unwrap_or("checkpoint") {
        "checkpoint" => Ok(From::Checkpoint),
        "start" => Ok(From::Position(StartPosition::Start)),
        "end" => Ok(From::Position(StartPosition::End)),
        other => {
            if let Ok(n) = other.parse::<u64>() {
                return Ok(From::Position(StartPosition::Sequence(n)));
            }
            let t = time::OffsetDateTime::parse(other, &time::format_description::well_known::Rfc3339)
                .map_err(|_| ApiError::argument(format!("from must be checkpoint, start, end, a sequence number or an RFC 3339 time, not {other:?}")))?;
            let ms = t.unix_timestamp_nanos() / 1_000_000;
            Ok(From::Position(StartPosition::EnqueuedAt(
                i64::try_from(ms).unwrap_or(i64::MAX),
            )))
        }
    }
}

fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 50
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._$".contains(c))
}

/// The JSON line for one event.
pub fn event_json(e: &EventRecord) -> Value {
    let ev = &e.event;
    let props: Map<String, Value> = ev
        .properties
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.clone().map(Value::String).unwrap_or(Value::Null),
            )
        })
        .collect();
    let (body, encoding) = match std::str::from_utf8(&ev.body) {
        Ok(text) => (Value::String(text.to_string()), "utf-8"),
        Err(_) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(&ev.body)),
            "base64",
        ),
    };
    // The hub's own stamp (100 ns precision); the stored milliseconds are only a fallback.
    let enqueued = ev
        .system_properties
        .get("iothub-enqueuedtime")
        .cloned()
        .unwrap_or_else(|| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ev.enqueued_ms) * 1_000_000)
                .map(timefmt::iso)
                .unwrap_or_default()
        });
    json!({
        "partition": e.partition,
        "sequenceNumber": e.sequence,
        "offset": e.sequence.to_string(),
        "enqueuedTime": enqueued,
        "deviceId": ev.device_id,
        "moduleId": ev.module_id,
        "systemProperties": ev.system_properties,
        "properties": props,
        "body": body,
        "bodyEncoding": encoding,
    })
}

pub async fn stream(
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    let log = state.hub.telemetry.clone();
    let group = q
        .get("consumerGroup")
        .cloned()
        .unwrap_or_else(|| "$Default".into());
    if !valid_group(&group) {
        return Err(ApiError::argument(
            "consumerGroup: 1-50 of A-Z a-z 0-9 - . _ $",
        ));
    }
    let from = parse_from(q.get("from").map(String::as_str))?;
    let partitions: Vec<u32> = match q.get("partition") {
        Some(p) => {
            let p: u32 = p
                .parse()
                .map_err(|_| ApiError::argument("partition must be a number"))?;
            if p >= log.partition_count() {
                return Err(ApiError::argument(format!(
                    "partition must be below {}",
                    log.partition_count()
                )));
            }
            vec![p]
        }
        None => (0..log.partition_count()).collect(),
    };
    if matches!(from, From::Position(StartPosition::Sequence(_))) && partitions.len() != 1 {
        return Err(ApiError::argument(
            "a sequence number in from needs a partition",
        ));
    }
    let device = q.get("deviceId").cloned();
    let module = q.get("moduleId").cloned();

    let saved = log.checkpoints(&group).await.map_err(store_err)?;
    let mut positions = Vec::with_capacity(partitions.len());
    for p in &partitions {
        let pos = match (from, saved.get(p)) {
            (From::Checkpoint, Some(n)) => *n,
            (From::Checkpoint, None) => log
                .resolve(*p, StartPosition::End)
                .await
                .map_err(store_err)?,
            (From::Position(sp), _) => log.resolve(*p, sp).await.map_err(store_err)?,
        };
        positions.push((*p, pos));
    }

    let (tx, rx) = mpsc::channel::<Line>(LINES_BUFFERED);
    // What the response has actually taken for the socket; checkpoints are saved from this,
    // not from what is merely queued.
    let written: Written = std::sync::Arc::new(std::sync::Mutex::new(positions.clone()));
    tokio::spawn(pump(
        log,
        group,
        positions,
        device,
        module,
        tx,
        written.clone(),
    ));
    let body = Body::from_stream(futures_util::stream::unfold(
        (rx, written),
        |(mut rx, written)| async move {
            let line = rx.recv().await?;
            if let Some((partition, next)) = line.position {
                let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = w.iter_mut().find(|(p, _)| *p == partition) {
                    slot.1 = next;
                }
            }
            Some((Ok::<_, Infallible>(line.bytes), (rx, written)))
        },
    ));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// The log's reads and checkpoints never report "not found" or "exists", so any failure here
/// is the engine's: a server error, logged by `from_store`.
fn store_err(e: ferrohub_store::StoreError) -> ApiError {
    let server = || {
        ApiError::new(
            ferrohub_iothub::ErrorCode::ServerError,
            "internal storage error",
        )
    };
    ApiError::from_store(e, server(), server())
}

/// One NDJSON line and the position it moves its partition to once written.
struct Line {
    bytes: Bytes,
    position: Option<(u32, u64)>,
}

type Written = std::sync::Arc<std::sync::Mutex<Vec<(u32, u64)>>>;

/// Reads the partitions in turn and writes matching events to the response until the reader
/// goes away; between commits it sleeps on the log's commit signal (no polling).
async fn pump(
    log: std::sync::Arc<dyn TelemetryLog>,
    group: String,
    mut positions: Vec<(u32, u64)>,
    device: Option<String>,
    module: Option<String>,
    tx: mpsc::Sender<Line>,
    written: Written,
) {
    let mut commits = log.watch_commits();
    let mut saved_at = Instant::now();
    let mut dirty = false;
    'outer: loop {
        commits.borrow_and_update();
        let mut progressed = false;
        for (partition, next) in positions.iter_mut() {
            let batch = match log.read(*partition, *next, READ_BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream read failed");
                    break 'outer;
                }
            };
            for e in batch {
                *next = e.sequence + 1;
                progressed = true;
                dirty = true;
                let wanted = device.as_deref().is_none_or(|d| d == e.event.device_id)
                    && module
                        .as_deref()
                        .is_none_or(|m| Some(m) == e.event.module_id.as_deref());
                if !wanted {
                    // Filtered out: nothing to write, but the group has passed it.
                    let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(slot) = w.iter_mut().find(|(p, _)| p == partition) {
                        slot.1 = *next;
                    }
                    continue;
                }
                let mut line = event_json(&e).to_string();
                line.push('\n');
                let line = Line {
                    bytes: Bytes::from(line),
                    position: Some((*partition, *next)),
                };
                if tx.send(line).await.is_err() {
                    break 'outer;
                }
            }
        }
        if dirty && saved_at.elapsed() >= CHECKPOINT_EVERY {
            save(&*log, &group, &snapshot(&written)).await;
            saved_at = Instant::now();
            dirty = false;
        }
        if progressed {
            continue;
        }
        tokio::select! {
            r = commits.changed() => if r.is_err() { break },
            _ = tx.closed() => break,
            _ = tokio::time::sleep(CHECKPOINT_EVERY), if dirty => {}
        }
    }
    if dirty {
        save(&*log, &group, &snapshot(&written)).await;
    }
}

fn snapshot(written: &Written) -> Vec<(u32, u64)> {
    written.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn save(log: &dyn TelemetryLog, group: &str, positions: &[(u32, u64)]) {
    for (p, n) in positions {
        if let Err(e) = log.save_checkpoint(group, *p, *n).await {
            tracing::warn!(error = %e, group, "could not save a checkpoint");
        }
    }
}
