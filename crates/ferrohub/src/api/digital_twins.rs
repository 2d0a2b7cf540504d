//! `/digitaltwins/{id}` (get, JSON Patch update) and `/digitaltwins/{id}[/components/{c}]/commands/{name}`
//! (command invocation), IoT Plug and Play's digital twin API in IoT Hub's shape. The work is
//! the hub's (`ferrohub_hub::digital_twins`), over the same twin and method services as
//! `/twins`, so the routes take the same right, `ServiceConnect`.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrohub_hub::methods::Invocation;
use serde::Deserialize;
use serde_json::Value;

use super::extract::{json_body, BodyBytes, IfMatchHeader, PathParam, ServiceConnect};
use super::{ApiError, ApiState};

#[derive(Deserialize)]
pub struct TwinPath {
    id: String,
}

#[derive(Deserialize)]
pub struct CommandPath {
    id: String,
    name: String,
}

#[derive(Deserialize)]
pub struct ComponentCommandPath {
    id: String,
    component: String,
    name: String,
}

/// The response with the twin's etag in `ETag`, quoted as HTTP has entity tags.
fn with_etag(mut resp: Response, etag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        resp.headers_mut().insert(axum::http::header::ETAG, v);
    }
    resp
}

pub async fn get(
    _: ServiceConnect,
    State(state): State<ApiState>,
    PathParam(p): PathParam<TwinPath>,
) -> Result<Response, ApiError> {
    let dt = state.hub.digital_twin(&p.id).await?;
    Ok(with_etag(Json(dt.twin).into_response(), &dt.etag))
}

/// 202 with the new etag, as IoT Hub answers (the service SDKs accept nothing else); the
/// desired update is stored by then.
pub async fn patch(
    _: ServiceConnect,
    State(state): State<ApiState>,
    PathParam(p): PathParam<TwinPath>,
    if_match: IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    let patch: Value = json_body(&body, "JSON Patch body")?;
    let etag = state
        .hub
        .update_digital_twin(&p.id, &patch, if_match.or_any())
        .await?;
    Ok(with_etag(StatusCode::ACCEPTED.into_response(), &etag))
}

/// A timeout query parameter: the SDKs send integers, as query strings are.
fn timeout_param(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse::<u64>().map(Some).map_err(|_| {
                ApiError::argument(format!("{name} must be a whole number of seconds"))
            })
        }
    }
}

async fn invoke(
    state: ApiState,
    id: &str,
    component: Option<&str>,
    command: &str,
    query: &HashMap<String, String>,
    body: &axum::body::Bytes,
) -> Result<Response, ApiError> {
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        json_body(body, "command payload")?
    };
    let inv = Invocation {
        method_name: String::new(),
        payload,
        response_timeout_secs: timeout_param(query, "responseTimeoutInSeconds")?,
        connect_timeout_secs: timeout_param(query, "connectTimeoutInSeconds")?,
    };
    let r = state
        .hub
        .invoke_command(id, component, command, inv)
        .await?;
    let mut resp = Json(r.payload).into_response();
    let headers = resp.headers_mut();
    headers.insert("x-ms-command-statuscode", HeaderValue::from(r.status));
    if let Ok(v) = HeaderValue::from_str(&request_id()) {
        headers.insert("x-ms-request-id", v);
    }
    Ok(resp)
}

/// A GUID-shaped id for the call, as IoT Hub's `x-ms-request-id` is.
fn request_id() -> String {
    ferrohub_hub::c2d::uuid_like(rand::random())
}

/// The query string, refused with IoT Hub's body when it does not decode.
fn query_of(
    q: Result<Query<HashMap<String, String>>, impl std::fmt::Display>,
) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::argument(format!("invalid query string: {e}")))
}

pub async fn command(
    _: ServiceConnect,
    State(state): State<ApiState>,
    PathParam(p): PathParam<CommandPath>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    invoke(state, &p.id, None, &p.name, &query, &body).await
}

pub async fn component_command(
    _: ServiceConnect,
    State(state): State<ApiState>,
    PathParam(p): PathParam<ComponentCommandPath>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    invoke(state, &p.id, Some(&p.component), &p.name, &query, &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_whole_seconds_given_as_strings() {
        let q: HashMap<String, String> = [
            ("responseTimeoutInSeconds".to_owned(), "10".to_owned()),
            ("connectTimeoutInSeconds".to_owned(), "x".to_owned()),
        ]
        .into();
        assert_eq!(
            timeout_param(&q, "responseTimeoutInSeconds").ok().flatten(),
            Some(10)
        );
        assert!(timeout_param(&q, "connectTimeoutInSeconds").is_err());
        assert_eq!(timeout_param(&q, "other").ok().flatten(), None);
    }

    #[test]
    fn request_ids_look_like_guids() {
        let id = request_id();
        let parts: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{id}");
    }
}
