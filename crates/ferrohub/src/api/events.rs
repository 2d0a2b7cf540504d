//! `GET /events`: the telemetry stream for back ends, as newline-delimited JSON over one
//! long-lived HTTPS response (the role IoT Hub's Event Hubs-compatible endpoint plays).
//!
//! Query: `consumerGroup` (default `$Default`), `from` = `checkpoint` (default: where the
//! group's last reader stopped, or `end` if it never read) | `start` | `end` | an ISO 8601 UTC
//! time | a sequence number (with `partition`), optional `partition` and `deviceId` filters,
//! and `endpoint` = a custom stream endpoint's name (default: the built-in `events`), read the
//! same way with its own partitions and consumer-group checkpoints.
//! Each line is one event. The group's checkpoint advances as lines are written to the
//! connection, so a reader that reconnects with `from=checkpoint` gets no event twice and
//! misses none published since; lines still in flight when a reader vanished count as read.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferrohub_hub::events::{EventQuery, EventStart};
use ferrohub_hub::timefmt;
use ferrohub_store::telemetry::EventRecord;
use serde_json::{json, Map, Value};

use super::extract::ServiceConnect;
use super::{ApiError, ApiState};

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
    _: ServiceConnect,
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let partition = match q.get("partition") {
        None => None,
        Some(p) => Some(
            p.parse::<u32>()
                .map_err(|_| ApiError::argument("partition must be a number"))?,
        ),
    };
    let query = EventQuery {
        consumer_group: q.get("consumerGroup").cloned(),
        start: EventStart::parse(q.get("from").map(String::as_str))?,
        partition,
        device_id: q.get("deviceId").cloned(),
        module_id: q.get("moduleId").cloned(),
        endpoint: q.get("endpoint").cloned(),
        track_checkpoint: true,
    };
    let events = state.hub.open_events(query).await?;
    // Each event is taken from the stream only when the connection wants the next line, so
    // the group's position follows what was written, not what was read ahead.
    let body = Body::from_stream(futures_util::stream::unfold(
        events,
        |mut events| async move {
            let e = events.next().await?;
            let mut line = event_json(&e).to_string();
            line.push('\n');
            Some((Ok::<_, Infallible>(Bytes::from(line)), events))
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
