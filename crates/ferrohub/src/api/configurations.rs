//! `/configurations`: automatic device management (`ferrohub_hub::configurations`).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::extract::{json_body, BodyBytes, IfMatchHeader, PathParam, RegistryRead, RegistryWrite};
use super::types::{Configuration, QueriesTestInput, QueriesTestResponse};
use super::{ApiError, ApiState};

pub async fn put(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    if_match: IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Configuration>, ApiError> {
    let req: Configuration = json_body(&body, "configuration")?;
    Ok(Json(
        state.hub.put_configuration(&id, req, if_match.0).await?,
    ))
}

pub async fn get(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Configuration>, ApiError> {
    Ok(Json(state.hub.configuration(&id).await?))
}

pub async fn list(
    _: RegistryRead,
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Configuration>>, ApiError> {
    let top = match q.get("top") {
        None => None,
        Some(t) => Some(
            t.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::argument("top must be a positive integer"))?,
        ),
    };
    Ok(Json(state.hub.configurations(top).await?))
}

pub async fn delete(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    if_match: IfMatchHeader,
) -> Result<StatusCode, ApiError> {
    state
        .hub
        .delete_configuration(&id, if_match.or_any())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn test_queries(
    _: RegistryRead,
    State(state): State<ApiState>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<QueriesTestResponse>, ApiError> {
    let input: QueriesTestInput = json_body(&body, "queries")?;
    Ok(Json(state.hub.test_configuration_queries(&input)))
}
