//! What every service route needs from a request before it does anything, as axum extractors:
//! the `api-version` check and the caller's authorization ([`ServiceAuth`]), the identity its
//! path names ([`IdentityPath`]), `If-Match` ([`IfMatchHeader`]) and JSON bodies read with
//! IoT Hub's error for a bad one ([`json_body`]). Every rejection is an [`ApiError`]: axum's own
//! `Path` and `Bytes` rejections are plain text, which no service SDK can parse, so routes take
//! [`PathParam`] and [`BodyBytes`] instead.

use std::collections::HashMap;
use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use ferrohub_hub::service_auth::Right;
use ferrohub_iothub::ErrorCode;
use ferrohub_iothub::Identity;
use ferrohub_store::IfMatch;
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
pub struct EnrollRead;
pub struct EnrollWrite;

impl NeedsRight for Read {
    const RIGHT: Right = Right::RegistryRead;
}
impl NeedsRight for Write {
    const RIGHT: Right = Right::RegistryWrite;
}
impl NeedsRight for Connect {
    const RIGHT: Right = Right::ServiceConnect;
}
impl NeedsRight for EnrollRead {
    const RIGHT: Right = Right::EnrollmentRead;
}
impl NeedsRight for EnrollWrite {
    const RIGHT: Right = Right::EnrollmentWrite;
}

/// A call with a supported `api-version`, signed with a policy that grants `R`. It carries
/// nothing: no route needs to know which policy signed, the check is the point.
pub struct ServiceAuth<R>(PhantomData<R>);

pub type RegistryRead = ServiceAuth<Read>;
pub type RegistryWrite = ServiceAuth<Write>;
pub type ServiceConnect = ServiceAuth<Connect>;
/// The provisioning service's routes (`provisioningserviceowner`, or a registry-write policy).
pub type EnrollmentRead = ServiceAuth<EnrollRead>;
pub type EnrollmentWrite = ServiceAuth<EnrollWrite>;

// Any state that holds the API's (the explorer's, for its login-token route) can check a
// service call the same way.
impl<S, R> FromRequestParts<S> for ServiceAuth<R>
where
    R: NeedsRight,
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = ApiState::from_ref(state);
        require_api_version(parts)?;
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state.hub.authorize_service(header, R::RIGHT).await?;
        Ok(Self(PhantomData))
    }
}

/// The identity a `/devices/{id}[/modules/{mid}]/...` or `/twins/{id}[/modules/{mid}]/...`
/// route names.
pub struct IdentityPath(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for IdentityPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let PathParam(mut p) =
            PathParam::<HashMap<String, String>>::from_request_parts(parts, state).await?;
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

/// A path parameter, refused with IoT Hub's `ArgumentInvalid` (for instance a segment that is
/// not UTF-8 once percent-decoded).
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(PathParam(v)),
            Err(e @ PathRejection::FailedToDeserializePathParams(_)) => {
                Err(ApiError::argument(e.body_text()))
            }
            // Only a routing bug leaves a handler without its parameters.
            Err(e) => Err(ApiError::new(ErrorCode::ServerError, e.body_text())),
        }
    }
}

/// The raw request body, read within the configured time (`https_body_timeout_secs`), so a
/// client trickling a body cannot hold its request forever; too large a body (past axum's
/// default limit) is IoT Hub's `MessageTooLarge`.
pub struct BodyBytes(pub Bytes);

impl FromRequest<ApiState> for BodyBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        match tokio::time::timeout(state.body_timeout, Bytes::from_request(req, state)).await {
            Ok(Ok(b)) => Ok(BodyBytes(b)),
            Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                ErrorCode::MessageTooLarge,
                "the request body is larger than the hub accepts",
            )),
            Ok(Err(e)) => Err(ApiError::argument(e.body_text())),
            Err(_) => Err(ApiError::argument(format!(
                "the request body did not arrive within {} s",
                state.body_timeout.as_secs()
            ))
            .with_status(StatusCode::REQUEST_TIMEOUT)),
        }
    }
}
