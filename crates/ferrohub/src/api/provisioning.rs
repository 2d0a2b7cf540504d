//! The device provisioning service's REST API in DPS's shape (`/enrollments`,
//! `/enrollmentGroups`, `/registrations`), authorized by `provisioningserviceowner` (or a
//! registry-write policy); one hub call per route (`ferrohub_hub::provisioning`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferrohub_hub::provisioning::{EnrollmentGroup, IndividualEnrollment, RegistrationState};

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
