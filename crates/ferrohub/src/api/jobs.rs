//! `/jobs/v2`: scheduled twin-update and direct-method jobs (create, read, cancel, query), in
//! IoT Hub's shape. The jobs themselves run in the hub (`ferrohub-hub/src/jobs.rs`).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrohub_hub::jobs::METHOD_JOB;
use ferrohub_hub::query::DEFAULT_PAGE;
use ferrohub_hub::service_auth::Right;
use serde_json::Value;

use super::extract::{json_body, BodyBytes, PathParam, RegistryRead, RegistryWrite};
use super::query::{CONTINUATION, ITEM_TYPE, MAX_ITEM_COUNT};
use super::{ApiError, ApiState};

pub async fn put_job(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(job_id): PathParam<String>,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Value>, ApiError> {
    let body: Value = json_body(&body, "job request")?;
    // A method job reaches devices, which is ServiceConnect's right on top of RegistryWrite.
    if body.get("type").and_then(Value::as_str) == Some(METHOD_JOB) {
        let auth = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state
            .hub
            .authorize_service(auth, Right::ServiceConnect)
            .await?;
    }
    Ok(Json(state.hub.create_job(&job_id, body).await?))
}

pub async fn get_job(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(job_id): PathParam<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.hub.get_job(&job_id).await?))
}

pub async fn cancel_job(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(job_id): PathParam<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.hub.cancel_job(&job_id).await?))
}

pub async fn query_jobs(
    _: RegistryRead,
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let max = match header(MAX_ITEM_COUNT).map(str::trim) {
        None | Some("") => DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                tracing::info!(
                    value = v,
                    error_code = 400004,
                    "job query refused: bad x-ms-max-item-count"
                );
                return Err(ApiError::argument(format!(
                    "{MAX_ITEM_COUNT} must be a positive whole number, not {v:?}"
                )));
            }
        },
    };
    let (items, continuation) = state
        .hub
        .query_jobs(
            q.get("jobType").map(String::as_str),
            q.get("jobStatus").map(String::as_str),
            max,
            header(CONTINUATION),
        )
        .await?;
    let mut resp = Json(items).into_response();
    let h = resp.headers_mut();
    h.insert(ITEM_TYPE, HeaderValue::from_static("jobResponse"));
    if let Some(token) = continuation {
        if let Ok(v) = HeaderValue::from_str(&token) {
            h.insert(CONTINUATION, v);
        }
    }
    Ok(resp)
}
