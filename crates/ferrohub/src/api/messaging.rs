//! Cloud-to-device messaging on the service API: send (`POST .../messages/deviceBound`),
//! purge (`DELETE /devices/{id}/commands`, as IoT Hub) and the feedback queue
//! (`/messages/serviceBound/feedback`, IoT Hub's HTTP receive/complete/abandon).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use ferrohub_hub::c2d::{ms_to_datetime, SendRequest};
use ferrohub_hub::feedback::{Settle, MAX_FEEDBACK_BATCH};
use ferrohub_hub::timefmt;
use serde_json::Value;

use super::extract::{json_body, BodyBytes, IdentityPath, PathParam, ServiceConnect};
use super::types::{C2dSendBody, C2dSent, PurgeResult};
use super::{ApiError, ApiState};

/// Longest time to live a sender may ask for (IoT Hub: 2 days).
const MAX_TTL_SECONDS: u64 = 172_800;

fn parse_send(body: &Bytes) -> Result<SendRequest, ApiError> {
    let b: C2dSendBody = json_body(body, "message")?;
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
            if ttl == 0 || ttl > MAX_TTL_SECONDS {
                return Err(ApiError::argument(format!(
                    "ttlSeconds must be between 1 and {MAX_TTL_SECONDS}"
                )));
            }
            Some(ferrohub_hub::c2d::now_ms() + i64::try_from(ttl).unwrap_or(0) * 1000)
        }
        (None, None) => None,
    };
    let properties = b
        .properties
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Null => None,
                Value::String(s) => Some(s),
                other => Some(other.to_string()),
            };
            (k, v)
        })
        .collect();
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

/// `POST /devices/{id}[/modules/{mid}]/messages/deviceBound`.
pub async fn send(
    _: ServiceConnect,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
    BodyBytes(body): BodyBytes,
) -> Result<Json<C2dSent>, ApiError> {
    let req = parse_send(&body)?;
    let m = state.hub.c2d_send(&id, req).await?;
    Ok(Json(C2dSent {
        device_id: m.device_id,
        enqueued_time_utc: timefmt::iso(ms_to_datetime(m.enqueued_time_ms)),
        expiry_time_utc: timefmt::iso(ms_to_datetime(m.expiry_time_ms)),
        message_id: m.message_id,
        module_id: m.module_id,
        sequence_number: m.sequence_number,
    }))
}

/// `DELETE /devices/{id}[/modules/{mid}]/commands`.
pub async fn purge(
    _: ServiceConnect,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
) -> Result<Json<PurgeResult>, ApiError> {
    let n = state.hub.c2d_purge(&id).await?;
    Ok(Json(PurgeResult {
        device_id: id.device_id,
        module_id: id.module_id,
        total_messages_purged: n,
    }))
}

/// `GET /messages/serviceBound/feedback`: 204 when there is nothing; otherwise 200 with a JSON
/// array of records, locked for the hub's feedback lock time under the token in `ETag` (and
/// `iothub-locktoken`), to be completed with DELETE or released with `/abandon`.
pub async fn receive_feedback(
    _: ServiceConnect,
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let max =
        match q.get("max") {
            None => None,
            Some(m) => Some(m.parse::<usize>().map_err(|_| {
                ApiError::argument(format!("max must be 1 to {MAX_FEEDBACK_BATCH}"))
            })?),
        };
    let Some(batch) = state.hub.feedback_receive(max).await? else {
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

pub async fn complete_feedback(
    _: ServiceConnect,
    State(state): State<ApiState>,
    PathParam(token): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    state.hub.feedback_settle(&token, Settle::Complete).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn abandon_feedback(
    _: ServiceConnect,
    State(state): State<ApiState>,
    PathParam(token): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    state.hub.feedback_settle(&token, Settle::Abandon).await?;
    Ok(StatusCode::NO_CONTENT)
}
