//! What every service route needs from a request before it does anything, as axum extractors:
//! the `api-version` check and the caller's authorization ([`ServiceAuth`]), the identity its
//! path names ([`IdentityPath`]), `If-Match` ([`IfMatchHeader`]) and JSON bodies read with
//! IoT Hub's error for a bad one ([`json_body`]).

use std::collections::HashMap;
use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use ferrohub_hub::service_auth::Right;
use ferrohub_iothub::Identity;
use ferrohub_store::{AccessPolicy, IfMatch};
use serde::de::DeserializeOwned;

use super::{ApiError, ApiState};

/// IoT Hub requires a supported `api-version` on every service call.
fn require_api_version(parts: &Parts) -> Result<(), ApiError> {
    let q: HashMap<String, String> = Query::try_from_uri(&parts.uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    match q.get("api-version") {
        Some(v) if ferrohub_iothub::connect::api_version_supported(v) => Ok(()),
        Some(v) => Err(ApiError::argument(format!("unsupported api-version {v:?}"))),
        None => Err(ApiError::argument(
            "the api-version query parameter is required",
        )),
    }
}

/// Names the policy right a route needs, as a type.
pub trait NeedsRight {
    const RIGHT: Right;
}

pub struct Read;
pub struct Write;
pub struct Connect;

impl NeedsRight for Read {
    const RIGHT: Right = Right::RegistryRead;
}
impl NeedsRight for Write {
    const RIGHT: Right = Right::RegistryWrite;
}
impl NeedsRight for Connect {
    const RIGHT: Right = Right::ServiceConnect;
}

/// A call with a supported `api-version`, signed with a policy that grants `R`.
pub struct ServiceAuth<R> {
    #[allow(dead_code)] // no route needs to know which policy yet; the check is the point
    pub policy: AccessPolicy,
    right: PhantomData<R>,
}

pub type RegistryRead = ServiceAuth<Read>;
pub type RegistryWrite = ServiceAuth<Write>;
pub type ServiceConnect = ServiceAuth<Connect>;

impl<R: NeedsRight> FromRequestParts<ApiState> for ServiceAuth<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        require_api_version(parts)?;
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let policy = state.hub.authorize_service(header, R::RIGHT).await?;
        Ok(Self {
            policy,
            right: PhantomData,
        })
    }
}

/// The identity a `/devices/{id}[/modules/{mid}]/...` or `/twins/{id}[/modules/{mid}]/...`
/// route names.
pub struct IdentityPath(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for IdentityPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(mut p) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::argument(e.body_text()))?;
        let device = p
            .remove("id")
            .ok_or_else(|| ApiError::argument("the path names no device"))?;
        Ok(IdentityPath(Identity {
            device_id: device,
            module_id: p.remove("mid"),
        }))
    }
}

/// The `If-Match` condition, when the request has one.
pub struct IfMatchHeader(pub Option<IfMatch>);

impl IfMatchHeader {
    /// The condition, or "any" without one.
    pub fn or_any(self) -> IfMatch {
        self.0.unwrap_or(IfMatch::Any)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfMatchHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IfMatchHeader(
            parts
                .headers
                .get(axum::http::header::IF_MATCH)
                .map(|v| IfMatch::from_header(v.to_str().ok())),
        ))
    }
}

/// Parses a JSON body; `what` names it in the error.
pub fn json_body<T: DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::argument(format!("invalid {what}: {e}")))
}
