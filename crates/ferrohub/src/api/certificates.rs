//! `/certificates/{name}`: CA certificates that CA-signed X.509 devices chain to
//! (`ferrohub_hub::certificates`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::extract::{json_body, BodyBytes, IfMatchHeader, PathParam, RegistryRead, RegistryWrite};
use super::types::{CertificateDescription, CertificateList, CertificateRequest};
use super::{ApiError, ApiState};

pub async fn put(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
    if_match: IfMatchHeader,
    BodyBytes(body): BodyBytes,
) -> Result<Json<CertificateDescription>, ApiError> {
    let req: CertificateRequest = json_body(&body, "request body")?;
    let pem = req
        .pem()
        .ok_or_else(|| ApiError::argument("properties.certificate (PEM text) is required"))?;
    let saved = state
        .hub
        .put_certificate(&name, pem, if_match.or_any())
        .await?;
    Ok(Json(saved.into()))
}

pub async fn get(
    _: RegistryRead,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
) -> Result<Json<CertificateDescription>, ApiError> {
    Ok(Json(state.hub.certificate(&name).await?.into()))
}

pub async fn list(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<CertificateList>, ApiError> {
    let all = state.hub.certificates().await?;
    Ok(Json(CertificateList {
        value: all.into_iter().map(Into::into).collect(),
    }))
}

pub async fn delete(
    _: RegistryWrite,
    State(state): State<ApiState>,
    PathParam(name): PathParam<String>,
    if_match: IfMatchHeader,
) -> Result<StatusCode, ApiError> {
    state
        .hub
        .delete_certificate(&name, if_match.or_any())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
