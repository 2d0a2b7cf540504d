//! `/ferrohub/routing`: message routing configuration (`ferrohub_hub::routing`), a resource of
//! Ferrohub's own. IoT Hub configures routing through Azure Resource Manager, which a
//! self-hosted hub does not have; the bodies keep the names of IoT Hub's resource
//! (`endpointNames`, `isEnabled`, `condition`, `source`) so ARM templates translate directly.
//!
//! - `GET /ferrohub/routing`: the whole configuration and its counters.
//! - `GET /ferrohub/routing/endpoints`, `GET|PUT|DELETE /ferrohub/routing/endpoints/{name}`
//!   (`{"type": "stream", "partitions": 4, "retentionSeconds": 86400}`;
//!   `{"type": "webhook", "url": "https://...", "batchSize": 1, "timeoutSeconds": 30,
//!   "headers": {...}, "caCertificates": "PEM", "retentionSeconds": 86400,
//!   "deadAfterSeconds": 600}`; `{"type": "nats", "url": "nats://host:4222", "subject": "...",
//!   "stream": "...", "batchSize": 64, ...}`).
//! - `GET /ferrohub/routing/endpoints/{name}/health`: an external endpoint's delivery health
//!   (`status`: `healthy` | `unhealthy` | `dead`, `delivered`, `deadLettered`, `failures`,
//!   `failingForSecs`, `lastError`); `GET /ferrohub/routing` lists them all as `health`.
//! - `GET /ferrohub/routing/routes`, `GET|PUT|DELETE /ferrohub/routing/routes/{name}`
//!   (`{"source": "DeviceMessages", "condition": "...", "endpointNames": [...], "isEnabled": true}`),
//!   `POST /ferrohub/routing/routes/{name}/test` (a message: `body`, `appProperties`,
//!   `systemProperties`, `twin`) answers `{"result": "true"|"false"|"undefined", "details"}`.
//! - `GET /ferrohub/routing/enrichments`, `GET|PUT|DELETE /ferrohub/routing/enrichments/{key}`
//!   (`{"value": "...", "endpointNames": [...]}`).
//! - `GET|PUT /ferrohub/routing/fallback` (`{"enabled": true}`).
//!
//! Reads and tests need `registryRead`, changes `registryWrite` (routing decides where device
//! data goes, a registry-level setting; `serviceConnect` only reads the streams, `/events`).
//! The name in a body, if given, must be the one in the path.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferrohub_hub::delivery::EndpointHealth;
use ferrohub_hub::routing::{
    Endpoint, Enrichment, Route, RouteTestMessage, RouteTestResult, RoutingConfig, RoutingCounters,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::extract::{BodyBytes, PathParam, RegistryRead, RegistryWrite};
use super::{ApiError, ApiState};

/// `GET /ferrohub/routing`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingView {
    #[serde(flatten)]
    pub config: RoutingConfig,
    pub counters: RoutingCounters,
    /// The delivery health of each external (webhook, NATS) endpoint.
    #[serde(default)]
    pub health: Vec<EndpointHealth>,
}

/// `GET|PUT /ferrohub/routing/fallback`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Fallback {
    pub enabled: bool,
}

/// Reads a body whose `field` (the resource's name) comes from the path.
fn named_body<T: DeserializeOwned>(
    body: &[u8],
    field: &str,
    name: &str,
    what: &str,
) -> Result<T, ApiError> {
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::argument(format!("invalid {what}: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::argument(format!(
            "invalid {what}: not a JSON object"
        )));
    };
    match obj.get(field) {
        None => {
            obj.insert(field.into(), Value::String(name.into()));
        }
        Some(Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(ApiError::argument(format!(
                "{what} {field} {other} is not the {name:?} of the path"
            )))
        }
    }
    serde_json::from_value(v).map_err(|e| ApiError::argument(format!("invalid {what}: {e}")))
}

async fn config(state: &ApiState) -> Result<RoutingConfig, ApiError> {
    Ok(state.hub.routing_config().await?.0)
}

fn missing(what: &str, name: &str) -> ApiError {
    ApiError::new(
        ferrohub_iothub::ErrorCode::InvalidOperation,
        format!("{what} {name} does not exist"),
    )
    .with_status(StatusCode::NOT_FOUND)
}

pub async fn get_all(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<RoutingView>, ApiError> {
    let (config, counters) = state.hub.routing_config().await?;
    Ok(Json(RoutingView {
        config: config.redacted(),
        counters,
        health: state.hub.endpoint_health(),
    }))
}

pub async fn endpoint_health(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
) -> Result<Json<EndpointHealth>, ApiError> {
    state
        .hub
        .endpoint_health()
        .into_iter()
        .find(|h| h.name == name)
        .map(Json)
        .ok_or_else(|| missing("external endpoint", &name))
}

pub async fn list_endpoints(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<Vec<Endpoint>>, ApiError> {
    Ok(Json(config(&state).await?.redacted().endpoints))
}

pub async fn get_endpoint(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
) -> Result<Json<Endpoint>, ApiError> {
    config(&state)
        .await?
        .endpoints
        .into_iter()
        .find(|e| e.name == name)
        .map(|e| Json(e.redacted()))
        .ok_or_else(|| missing("endpoint", &name))
}

pub async fn put_endpoint(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Endpoint>, ApiError> {
    let endpoint: Endpoint = named_body(&body, "name", &name, "endpoint")?;
    Ok(Json(state.hub.put_endpoint(endpoint).await?.redacted()))
}

pub async fn delete_endpoint(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    state.hub.delete_endpoint(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_routes(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<Vec<Route>>, ApiError> {
    Ok(Json(config(&state).await?.routes))
}

pub async fn get_route(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
) -> Result<Json<Route>, ApiError> {
    config(&state)
        .await?
        .routes
        .into_iter()
        .find(|r| r.name == name)
        .map(Json)
        .ok_or_else(|| missing("route", &name))
}

pub async fn put_route(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Route>, ApiError> {
    let route: Route = named_body(&body, "name", &name, "route")?;
    Ok(Json(state.hub.put_route(route).await?))
}

pub async fn delete_route(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    state.hub.delete_route(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn test_route(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<RouteTestResult>, ApiError> {
    let msg: RouteTestMessage = super::extract::json_body(&body, "test message")?;
    Ok(Json(state.hub.test_route(&name, &msg).await?))
}

pub async fn list_enrichments(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<Vec<Enrichment>>, ApiError> {
    Ok(Json(config(&state).await?.enrichments))
}

pub async fn get_enrichment(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(key): PathParam<String>,
) -> Result<Json<Enrichment>, ApiError> {
    config(&state)
        .await?
        .enrichments
        .into_iter()
        .find(|e| e.key == key)
        .map(Json)
        .ok_or_else(|| missing("enrichment", &key))
}

pub async fn put_enrichment(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(key): PathParam<String>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Enrichment>, ApiError> {
    let e: Enrichment = named_body(&body, "key", &key, "enrichment")?;
    Ok(Json(state.hub.put_enrichment(e).await?))
}

pub async fn delete_enrichment(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(key): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    state.hub.delete_enrichment(&key).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_fallback(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<Fallback>, ApiError> {
    Ok(Json(Fallback {
        enabled: config(&state).await?.fallback_enabled,
    }))
}

pub async fn put_fallback(
    _: RegistryWrite,
    State(state): State<ApiState>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Fallback>, ApiError> {
    let f: Fallback = super::extract::json_body(&body, "fallback")?;
    state.hub.set_fallback(f.enabled).await?;
    Ok(Json(f))
}
