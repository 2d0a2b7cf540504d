//! The device provisioning service's REST API in DPS's shape (`/enrollments`,
//! `/enrollmentGroups`, `/registrations`), authorized by `provisioningserviceowner` (or a
//! registry-write policy); one hub call per route (`ferrohub_hub::provisioning`). And the DPS
//! HTTPS device API (`/{idScope}/registrations/{id}/register` and `.../operations/{op}`),
//! which devices authenticate themselves (SAS token or client certificate).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrohub_hub::provisioning::{
    DpsHttpRequest, EnrollmentGroup, IndividualEnrollment, RegistrationState, RETRY_AFTER_SECS,
};
use ferrohub_hub::{Peer, Transport};
use serde_json::Value;

use crate::server::HttpsConn;

use super::extract::{
    json_body, BodyBytes, EnrollmentRead, EnrollmentWrite, IfMatchHeader, PathParam,
};
use super::{ApiError, ApiState};

pub async fn put_enrollment(
    _: EnrollmentWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    if_match: IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Json<IndividualEnrollment>, ApiError> {
    let req: IndividualEnrollment = json_body(&body, "individual enrollment")?;
    Ok(Json(
        state
            .hub
            .put_enrollment(&id, req, if_match.or_any())
            .await?,
    ))
}

pub async fn get_enrollment(
    _: EnrollmentRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<IndividualEnrollment>, ApiError> {
    Ok(Json(state.hub.enrollment(&id).await?))
}

pub async fn delete_enrollment(
    _: EnrollmentWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    if_match: IfMatchHeader,
) -> Result<StatusCode, ApiError> {
    state.hub.delete_enrollment(&id, if_match.or_any()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /enrollments/query`: every enrollment (the query body, DPS's `{"query": "*"}`, is
/// not interpreted: `*` is the only query DPS documents).
pub async fn query_enrollments(
    _: EnrollmentRead,
    State(state): State<ApiState>,
) -> Result<Json<Vec<IndividualEnrollment>>, ApiError> {
    Ok(Json(state.hub.enrollments().await?))
}

pub async fn put_group(
    _: EnrollmentWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    if_match: IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Json<EnrollmentGroup>, ApiError> {
    let req: EnrollmentGroup = json_body(&body, "enrollment group")?;
    Ok(Json(
        state
            .hub
            .put_enrollment_group(&id, req, if_match.or_any())
            .await?,
    ))
}

pub async fn get_group(
    _: EnrollmentRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<EnrollmentGroup>, ApiError> {
    Ok(Json(state.hub.enrollment_group(&id).await?))
}

pub async fn delete_group(
    _: EnrollmentWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    if_match: IfMatchHeader,
) -> Result<StatusCode, ApiError> {
    state
        .hub
        .delete_enrollment_group(&id, if_match.or_any())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn query_groups(
    _: EnrollmentRead,
    State(state): State<ApiState>,
) -> Result<Json<Vec<EnrollmentGroup>>, ApiError> {
    Ok(Json(state.hub.enrollment_groups().await?))
}

pub async fn get_registration(
    _: EnrollmentRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<RegistrationState>, ApiError> {
    Ok(Json(public_state(state.hub.registration(&id).await?)))
}

pub async fn delete_registration(
    _: EnrollmentWrite,
    State(state): State<ApiState>,
    PathParam(id): PathParam<String>,
    if_match: IfMatchHeader,
) -> Result<StatusCode, ApiError> {
    state
        .hub
        .delete_registration(&id, if_match.or_any())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /registrations/query` (Ferrohub's: DPS queries registrations per group).
pub async fn query_registrations(
    _: EnrollmentRead,
    State(state): State<ApiState>,
) -> Result<Json<Vec<RegistrationState>>, ApiError> {
    let all = state.hub.registrations().await?;
    Ok(Json(all.into_iter().map(public_state).collect()))
}

/// A registration as DPS's service API shows it: the operation id is the device's business.
fn public_state(mut r: RegistrationState) -> RegistrationState {
    r.operation_id = None;
    r
}

/// The DPS HTTPS device API: `PUT /{idScope}/registrations/{registrationId}/register`
/// (`{"registrationId", "payload"}`), answered 202 `{"operationId", "status": "assigning"}`
/// with `Retry-After`, as the Node SDK's HTTP transport expects.
pub async fn device_register(
    State(state): State<ApiState>,
    Extension(conn): Extension<HttpsConn>,
    PathParam((scope, rid)): PathParam<(String, String)>,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> Response {
    let peer = https_peer(&conn);
    let (status, body) = state
        .hub
        .provisioning_http(
            &scope,
            &rid,
            authorization(&headers),
            &peer,
            DpsHttpRequest::Register(&body),
        )
        .await;
    dps_response(status, body)
}

/// `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
pub async fn device_operation(
    State(state): State<ApiState>,
    Extension(conn): Extension<HttpsConn>,
    PathParam((scope, rid, operation)): PathParam<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let peer = https_peer(&conn);
    let (status, body) = state
        .hub
        .provisioning_http(
            &scope,
            &rid,
            authorization(&headers),
            &peer,
            DpsHttpRequest::OperationStatus(&operation),
        )
        .await;
    dps_response(status, body)
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

fn https_peer(conn: &HttpsConn) -> Peer {
    Peer {
        addr: conn.addr,
        transport: Transport::Https,
        client_certs: conn.client_certs.clone(),
    }
}

/// DPS's answer as JSON, with `Retry-After` where the device is told to poll or retry.
fn dps_response(status: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (code, Json(body)).into_response();
    if matches!(status, 202 | 429 | 500..=599) {
        resp.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(RETRY_AFTER_SECS),
        );
    }
    resp
}
