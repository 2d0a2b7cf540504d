//! Cloud-to-device messaging on the service API: send (`POST .../messages/deviceBound`),
//! purge (`DELETE /devices/{id}/commands`, as IoT Hub) and the feedback queue
//! (`/messages/serviceBound/feedback`, IoT Hub's HTTP receive/complete/abandon).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::{FeedbackRequest, StoreError, Timestamp};
use serde::Deserialize;
use serde_json::Value;

use super::auth::{authorize, Right};
use super::{identity, require_api_version, ApiError, ApiState};
use ferrohub_hub::c2d::{ms_to_datetime, SendError, SendRequest};

/// The send request: the payload and the message's properties in one JSON document, so that
/// property names keep their case and null values survive (HTTP headers would lose both).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SendBody {
    /// A string is sent as its UTF-8 bytes; any other JSON value as its JSON text.
    #[serde(default)]
    payload: Option<Value>,
    /// Binary payload, base64 (instead of `payload`).
    #[serde(default)]
    payload_base64: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    user_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    /// Absolute expiry, RFC 3339.
    expiry_time_utc: Option<String>,
    /// Time to live in seconds (instead of `expiryTimeUtc`).
    ttl_seconds: Option<u64>,
    #[serde(default)]
    ack: Option<FeedbackRequest>,
    /// Application properties; a null value is sent as a bare key.
    #[serde(default)]
    properties: serde_json::Map<String, Value>,
}

fn send_error(e: SendError) -> ApiError {
    let code = match &e {
        SendError::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
        SendError::ModuleNotFound(_) => ErrorCode::ModuleNotFound,
        SendError::QueueFull(..) => ErrorCode::DeviceMaximumQueueDepthExceeded,
        SendError::TooLarge(_) => ErrorCode::MessageTooLarge,
        SendError::Invalid(_) => ErrorCode::ArgumentInvalid,
        SendError::Store(err) => {
            tracing::error!(error = %err, "C2D store failure");
            ErrorCode::ServerError
        }
    };
    ApiError::new(code, e.to_string())
}

fn parse_send(body: &Bytes) -> Result<SendRequest, ApiError> {
    let b: SendBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::argument(format!("invalid message: {e}")))?;
    let payload = match (b.payload, b.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::argument(
                "give either payload or payloadBase64, not both",
            ))
        }
        (Some(Value::String(s)), None) => s.into_bytes(),
        (Some(v), None) => v.to_string().into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::argument(format!("payloadBase64: {e}")))?,
        (None, None) => Vec::new(),
    };
    let now = ferrohub_hub::c2d::now_ms();
    let expiry_time_ms = match (b.expiry_time_utc, b.ttl_seconds) {
        (Some(_), Some(_)) => {
            return Err(ApiError::argument(
                "give either expiryTimeUtc or ttlSeconds, not both",
            ))
        }
        (Some(t), None) => {
            let at = ferrohub_iothub::telemetry::parse_utc_timestamp(&t).ok_or_else(|| {
                ApiError::argument(format!("expiryTimeUtc {t:?} is not an RFC 3339 UTC time"))
            })?;
            Some(i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
        }
        (None, Some(ttl)) => {
            if ttl == 0 || ttl > 172_800 {
                return Err(ApiError::argument(
                    "ttlSeconds must be between 1 and 172800",
                ));
            }
            Some(now + i64::try_from(ttl).unwrap_or(0) * 1000)
        }
        (None, None) => None,
    };
    let mut properties = Vec::with_capacity(b.properties.len());
    for (k, v) in b.properties {
        let v = match v {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        };
        properties.push((k, v));
    }
    Ok(SendRequest {
        message_id: b.message_id,
        correlation_id: b.correlation_id,
        user_id: b.user_id,
        content_type: b.content_type,
        content_encoding: b.content_encoding,
        expiry_time_ms,
        ack: b.ack.unwrap_or_default(),
        properties,
        payload,
    })
}

async fn send(
    state: ApiState,
    q: HashMap<String, String>,
    headers: HeaderMap,
    id: Identity,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    let req = parse_send(&body)?;
    let m = state.hub.c2d_send(&id, req).await.map_err(send_error)?;
    Ok(Json(serde_json::json!({
        "deviceId": m.device_id,
        "moduleId": m.module_id,
        "messageId": m.message_id,
        "sequenceNumber": m.sequence_number,
        "enqueuedTimeUtc": ferrohub_hub::timefmt::iso(ms_to_datetime(m.enqueued_time_ms)),
        "expiryTimeUtc": ferrohub_hub::timefmt::iso(ms_to_datetime(m.expiry_time_ms)),
    })))
}

pub async fn send_to_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    send(state, q, headers, identity(id, None), body).await
}

pub async fn send_to_module(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    send(state, q, headers, identity(id, Some(mid)), body).await
}

async fn purge(
    state: ApiState,
    q: HashMap<String, String>,
    headers: HeaderMap,
    id: Identity,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    let n = state.hub.c2d_purge(&id).await.map_err(send_error)?;
    Ok(Json(serde_json::json!({
        "deviceId": id.device_id,
        "moduleId": id.module_id,
        "totalMessagesPurged": n,
    })))
}

pub async fn purge_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    purge(state, q, headers, identity(id, None)).await
}

pub async fn purge_module(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    purge(state, q, headers, identity(id, Some(mid))).await
}

/// Most feedback records handed out in one batch.
const MAX_FEEDBACK_BATCH: usize = 100;

fn lock_lost(token: &str) -> ApiError {
    ApiError::new(
        ErrorCode::DeviceMessageLockLost,
        format!("lock token {token} is unknown or its lock has expired"),
    )
}

/// `GET /messages/serviceBound/feedback`: 204 when there is nothing; otherwise 200 with a JSON
/// array of records, locked for the hub's feedback lock time under the token in `ETag` (and
/// `iothub-locktoken`), to be completed with DELETE or released with `/abandon`.
pub async fn receive_feedback(
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    let max = match q.get("max") {
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=MAX_FEEDBACK_BATCH).contains(m))
            .ok_or_else(|| ApiError::argument(format!("max must be 1 to {MAX_FEEDBACK_BATCH}")))?,
        None => MAX_FEEDBACK_BATCH,
    };
    let lock = state.hub.settings.c2d.feedback_lock;
    let batch = state
        .hub
        .store
        .feedback_receive(Timestamp::now(), lock, max)
        .await
        .map_err(|e| ApiError::from_store(e, lock_lost(""), lock_lost("")))?;
    let Some(batch) = batch else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let mut resp = Json(&batch.records).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", batch.lock_token)) {
        resp.headers_mut().insert(axum::http::header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&batch.lock_token) {
        resp.headers_mut().insert("iothub-locktoken", v);
    }
    Ok(resp)
}

fn lock_result(r: Result<(), StoreError>, token: &str) -> Result<StatusCode, ApiError> {
    match r {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::LockLost) | Err(StoreError::NotFound) => Err(lock_lost(token)),
        Err(e) => Err(ApiError::from_store(e, lock_lost(token), lock_lost(token))),
    }
}

/// What to do with a locked feedback batch.
#[derive(Clone, Copy)]
enum Settle {
    Complete,
    Abandon,
}

async fn settle_feedback(
    state: ApiState,
    token: String,
    q: HashMap<String, String>,
    headers: HeaderMap,
    how: Settle,
) -> Result<StatusCode, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    let token = token.trim_matches('"').to_string();
    let now = Timestamp::now();
    let store = &state.hub.store;
    let r = match how {
        Settle::Complete => store.feedback_complete(&token, now).await,
        Settle::Abandon => store.feedback_abandon(&token, now).await,
    };
    lock_result(r, &token)
}

pub async fn complete_feedback(
    State(state): State<ApiState>,
    Path(token): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    settle_feedback(state, token, q, headers, Settle::Complete).await
}

pub async fn abandon_feedback(
    State(state): State<ApiState>,
    Path(token): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    settle_feedback(state, token, q, headers, Settle::Abandon).await
}
