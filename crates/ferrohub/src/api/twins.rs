//! `/twins/{id}[/modules/{mid}]` (get, patch, replace) and `/twins/{id}[/modules/{mid}]/methods`
//! (direct method invocation), in IoT Hub's shape.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::IfMatch;
use serde::Deserialize;
use serde_json::Value;

use super::auth::{authorize, Right};
use super::{identity, require_api_version, ApiError, ApiState};
use ferrohub_hub::methods::{Invocation, MethodError};
use ferrohub_hub::twins::TwinFailure;

fn twin_error(f: TwinFailure) -> ApiError {
    if matches!(f, TwinFailure::Store(_) | TwinFailure::Corrupt(_)) {
        tracing::error!(error = %f, "twin operation failed");
    }
    ApiError::new(f.code(), f.to_string())
}

fn if_match(headers: &HeaderMap) -> IfMatch {
    IfMatch::from_header(
        headers
            .get(axum::http::header::IF_MATCH)
            .and_then(|v| v.to_str().ok()),
    )
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::argument(format!("invalid JSON body: {e}")))
}

async fn get(
    state: ApiState,
    q: HashMap<String, String>,
    headers: HeaderMap,
    id: Identity,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    state.hub.get_twin(&id).await.map(Json).map_err(twin_error)
}

async fn update(
    state: ApiState,
    q: HashMap<String, String>,
    headers: HeaderMap,
    id: Identity,
    body: Bytes,
    replace: bool,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    let body = json_body(&body)?;
    state
        .hub
        .update_twin(&id, body, replace, if_match(&headers))
        .await
        .map(Json)
        .map_err(twin_error)
}

pub async fn get_device_twin(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    get(state, q, headers, identity(id, None)).await
}

pub async fn get_module_twin(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    get(state, q, headers, identity(id, Some(mid))).await
}

pub async fn patch_device_twin(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    update(state, q, headers, identity(id, None), body, false).await
}

pub async fn put_device_twin(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    update(state, q, headers, identity(id, None), body, true).await
}

pub async fn patch_module_twin(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    update(state, q, headers, identity(id, Some(mid)), body, false).await
}

pub async fn put_module_twin(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    update(state, q, headers, identity(id, Some(mid)), body, true).await
}

/// IoT Hub's `CloudToDeviceMethod` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodRequest {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

async fn invoke(
    state: ApiState,
    q: HashMap<String, String>,
    headers: HeaderMap,
    id: Identity,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::ServiceConnect).await?;
    let req: MethodRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::argument(format!("invalid method request: {e}")))?;
    let inv = Invocation {
        method_name: req.method_name,
        payload: req.payload,
        response_timeout_secs: req.response_timeout_in_seconds,
        connect_timeout_secs: req.connect_timeout_in_seconds,
    };
    match state.hub.invoke_method(&id, inv).await {
        Ok(r) => Ok(Json(
            serde_json::json!({"status": r.status, "payload": r.payload}),
        )),
        Err(e) => {
            let code = match &e {
                MethodError::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
                MethodError::ModuleNotFound(_) => ErrorCode::ModuleNotFound,
                MethodError::NotOnline(_) => ErrorCode::DeviceNotOnline,
                MethodError::Timeout(..) => ErrorCode::GatewayTimeout,
                MethodError::Invalid(_) => ErrorCode::ArgumentInvalid,
                MethodError::Throttled => ErrorCode::ThrottlingException,
                MethodError::Store(_) => ErrorCode::ServerError,
            };
            Err(ApiError::new(code, e.to_string()))
        }
    }
}

pub async fn invoke_device_method(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    invoke(state, q, headers, identity(id, None), body).await
}

pub async fn invoke_module_method(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    invoke(state, q, headers, identity(id, Some(mid)), body).await
}
