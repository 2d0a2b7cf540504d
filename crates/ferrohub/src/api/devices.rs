//! `/devices/{id}` and `/devices/{id}/modules/{mid}`: the identity registry
//! (`ferrohub_hub::registry`) in IoT Hub's REST shape.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::extract::{
    BodyBytes, IdentityPath, IfMatchHeader, PathParam, RegistryRead, RegistryWrite,
};
use super::types::{BulkResult, DeviceResponse, IdentityRequest, ModuleResponse};
use super::{ApiError, ApiState};

fn parse_body(body: &Bytes) -> Result<IdentityRequest, ApiError> {
    if body.is_empty() {
        return Err(ApiError::argument("request body is required"));
    }
    super::extract::json_body(body, "request body")
}

/// `PUT /devices/{id}` and `PUT /devices/{id}/modules/{mid}`.
pub async fn put_identity(
    _: RegistryWrite,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
    IfMatchHeader(if_match): IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    let req = parse_body(&body)?;
    Ok(match &id.module_id {
        None => Json(DeviceResponse::from(
            state.hub.put_device(&id.device_id, req, if_match).await?,
        ))
        .into_response(),
        Some(mid) => Json(ModuleResponse::from(
            state
                .hub
                .put_module(&id.device_id, mid, req, if_match)
                .await?,
        ))
        .into_response(),
    })
}

pub async fn get_identity(
    _: RegistryRead,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
) -> Result<Response, ApiError> {
    Ok(match &id.module_id {
        None => Json(DeviceResponse::from(state.hub.device(&id.device_id).await?)).into_response(),
        Some(mid) => Json(ModuleResponse::from(
            state.hub.module(&id.device_id, mid).await?,
        ))
        .into_response(),
    })
}

pub async fn delete_identity(
    _: RegistryWrite,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
    if_match: IfMatchHeader,
) -> Result<StatusCode, ApiError> {
    match &id.module_id {
        None => {
            state
                .hub
                .delete_device(&id.device_id, if_match.or_any())
                .await?
        }
        Some(mid) => {
            state
                .hub
                .delete_module(&id.device_id, mid, if_match.or_any())
                .await?
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_devices(
    _: RegistryRead,
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<DeviceResponse>>, ApiError> {
    let top = match q.get("top") {
        None => None,
        Some(t) => Some(t.parse::<usize>().map_err(|_| {
            ApiError::argument(format!(
                "top must be between 1 and {}",
                ferrohub_hub::registry::MAX_LIST_DEVICES
            ))
        })?),
    };
    let devices = state.hub.devices(top).await?;
    Ok(Json(devices.into_iter().map(Into::into).collect()))
}

pub async fn list_modules(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Vec<ModuleResponse>>, ApiError> {
    let modules = state.hub.modules(&id).await?;
    Ok(Json(modules.into_iter().map(Into::into).collect()))
}

/// `POST /devices` with an array of import entries: each applies or fails on its own; the
/// answer is 200 with the failures listed (see `ferrohub_hub::bulk`).
pub async fn bulk(
    _: RegistryWrite,
    State(state): State<ApiState>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<BulkResult>, ApiError> {
    let entries: serde_json::Value = super::extract::json_body(&body, "bulk request")?;
    let serde_json::Value::Array(entries) = entries else {
        return Err(ApiError::argument(
            "a bulk registry request is a JSON array of import entries",
        ));
    };
    Ok(Json(state.hub.bulk_registry(entries).await?))
}
