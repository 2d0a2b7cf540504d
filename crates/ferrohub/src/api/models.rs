//! `/models`: the IoT Plug and Play model repository (`ferrohub_hub::models`). IoT Hub has no
//! such API (its devices' models live in the public Device Models Repository), so the shape is
//! Ferrohub's own: `POST /models` takes a DTDL document (one interface or an array),
//! `GET /models` lists, `GET /models/{dtmi}` returns the document (`?expanded=true`: with its
//! dependencies, as the repository's `.expanded.json`), `DELETE /models/{dtmi}` removes it.
//! Reads need `RegistryRead`, writes `RegistryWrite`. Also the live conformance findings of a
//! device or module: `GET /digitaltwins/{id}[/modules/{mid}]/conformance`.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::Value;

use super::extract::{BodyBytes, IdentityPath, PathParam, RegistryRead, RegistryWrite};
use super::types::{ModelSummary, ModelsAdded};
use super::{ApiError, ApiState};

pub async fn add(
    _: RegistryWrite,
    State(state): State<ApiState>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<ModelsAdded>, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::argument("the model document is not UTF-8"))?;
    let added = state.hub.add_models(text).await?;
    Ok(Json(ModelsAdded {
        ids: added.ids,
        missing: added.missing,
        new: added.new,
    }))
}

pub async fn list(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<Vec<ModelSummary>>, ApiError> {
    let models = state.hub.list_models().await?;
    Ok(Json(
        models
            .into_iter()
            .map(|m| ModelSummary {
                created_date_time_utc: m.created.to_iso(),
                display_name: serde_json::from_str::<Value>(&m.doc)
                    .ok()
                    .and_then(|d| d.get("displayName").cloned()),
                id: m.id,
            })
            .collect(),
    ))
}

pub async fn get(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let expanded = match q.get("expanded").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::argument(format!(
                "expanded is true or false, not {other:?}"
            )))
        }
    };
    Ok(Json(if expanded {
        state.hub.get_model_expanded(&id).await?
    } else {
        state.hub.get_model(&id).await?.0
    }))
}

pub async fn remove(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    state.hub.remove_model(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the conformance checker found for an identity (an empty report when it has checked
/// nothing of it yet); 404 for an identity the registry does not hold.
pub async fn conformance(
    _: RegistryRead,
    State(state): State<ApiState>,
    IdentityPath(id): IdentityPath,
) -> Result<Json<ferrohub_hub::conformance::ConformanceReport>, ApiError> {
    match &id.module_id {
        None => drop(state.hub.device(&id.device_id).await?),
        Some(m) => drop(state.hub.module(&id.device_id, m).await?),
    }
    Ok(Json(state.hub.conformance_report(&id).unwrap_or_default()))
}
