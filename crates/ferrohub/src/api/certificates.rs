//! `/certificates/{name}`: CA certificates that CA-signed X.509 devices chain to.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrohub_iothub::ErrorCode;
use ferrohub_store::{CaCertificate, IfMatch};
use serde_json::{json, Value};

use super::auth::{authorize, Right};
use super::{require_api_version, ApiError, ApiState};
use ferrohub_hub::timefmt;
use ferrohub_hub::x509;

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidOperation,
        format!("Certificate {name} cannot be found."),
    )
    .with_status(StatusCode::NOT_FOUND)
}

/// IoT Hub's certificate description shape.
fn describe(c: &CaCertificate) -> Value {
    json!({
        "name": c.name,
        "etag": c.etag,
        "properties": {
            "subject": c.subject,
            "thumbprint": c.thumbprint,
            "isVerified": true,
            "created": c.created,
            "updated": c.created,
            "certificate": c.certificate,
        }
    })
}

pub async fn put(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryWrite).await?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::argument(
            "certificate names are 1-64 of A-Z a-z 0-9 - _ .",
        ));
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::argument(format!("invalid request body: {e}")))?;
    let pem = v
        .pointer("/properties/certificate")
        .or_else(|| v.get("certificate"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::argument("properties.certificate (PEM text) is required"))?;
    let der = x509::pem_to_der(pem).map_err(ApiError::argument)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| ApiError::argument(format!("not an X.509 certificate: {e}")))?;
    if !parsed.is_ca() {
        return Err(ApiError::argument(
            "the certificate is not a CA certificate",
        ));
    }
    let (_, sha256) = x509::thumbprints(&der);
    let cert = CaCertificate {
        name: name.clone(),
        etag: String::new(),
        certificate: pem.to_string(),
        subject: parsed.subject().to_string(),
        thumbprint: sha256,
        created: timefmt::now_iso(),
    };
    let cond = headers
        .get(axum::http::header::IF_MATCH)
        .map(|h| IfMatch::from_header(h.to_str().ok()))
        .unwrap_or(IfMatch::Any);
    let saved = state
        .hub
        .store
        .put_certificate(cert, cond)
        .await
        .map_err(|e| ApiError::from_store(e, not_found(&name), not_found(&name)))?;
    Ok(Json(describe(&saved)))
}

pub async fn get(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryRead).await?;
    let c = state
        .hub
        .store
        .get_certificate(&name)
        .await
        .map_err(|e| ApiError::from_store(e, not_found(&name), not_found(&name)))?
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(describe(&c)))
}

pub async fn list(
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryRead).await?;
    let all = state
        .hub
        .store
        .list_certificates()
        .await
        .map_err(|e| ApiError::from_store(e, not_found(""), not_found("")))?;
    Ok(Json(
        json!({ "value": all.iter().map(describe).collect::<Vec<_>>() }),
    ))
}

pub async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryWrite).await?;
    let cond = headers
        .get(axum::http::header::IF_MATCH)
        .map(|h| IfMatch::from_header(h.to_str().ok()))
        .unwrap_or(IfMatch::Any);
    state
        .hub
        .store
        .delete_certificate(&name, cond)
        .await
        .map_err(|e| ApiError::from_store(e, not_found(&name), not_found(&name)))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
