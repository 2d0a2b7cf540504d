//! `/twins/{id}[/modules/{mid}]` (get, patch, replace) and `/twins/{id}[/modules/{mid}]/methods`
//! (direct method invocation), in IoT Hub's shape.

use axum::extract::State;
use axum::Json;
use ferrohub_hub::methods::Invocation;
use ferrohub_hub::HubError;
use serde_json::Value;

use super::extract::{json_body, BodyBytes, IdentityPath, IfMatchHeader, ServiceConnect};
use super::types::{MethodRequest, MethodResponse};
use super::{ApiError, ApiState};

pub async fn get_twin(
    _: ServiceConnect,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.hub.service_twin(&id).await?))
}

async fn update(
    state: ApiState,
    id: ferrohub_iothub::Identity,
    if_match: IfMatchHeader,
    body: axum::body::Bytes,
    replace: bool,
) -> Result<Json<Value>, ApiError> {
    let body: Value = json_body(&body, "JSON body")?;
    let twin = state
        .hub
        .service_update_twin(&id, body, replace, if_match.or_any())
        .await?;
    Ok(Json(twin))
}

pub async fn patch_twin(
    _: ServiceConnect,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
    if_match: IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Value>, ApiError> {
    update(state, id, if_match, body, false).await
}

pub async fn put_twin(
    _: ServiceConnect,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
    if_match: IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Value>, ApiError> {
    update(state, id, if_match, body, true).await
}

pub async fn invoke_method(
    _: ServiceConnect,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
    BodyBytes(body): BodyBytes,
) -> Result<Json<MethodResponse>, ApiError> {
    let req: MethodRequest = json_body(&body, "method request")?;
    let inv = Invocation {
        method_name: req.method_name,
        payload: req.payload,
        response_timeout_secs: req.response_timeout_in_seconds,
        connect_timeout_secs: req.connect_timeout_in_seconds,
    };
    let r = state
        .hub
        .invoke_method(&id, inv)
        .await
        .map_err(HubError::from)?;
    Ok(Json(MethodResponse {
        payload: r.payload,
        status: r.status,
    }))
}
