//! `/devices/{id}` and `/devices/{id}/modules/{mid}`: the identity registry.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use ferrohub_iothub::sas::generate_key;
use ferrohub_iothub::{validate_device_id, validate_module_id, ErrorCode, Identity};
use ferrohub_store::{
    AuthType, Authentication, Capabilities, ConnectionState, Device, IfMatch, Module, Status,
    StoreError, SymmetricKey, X509Thumbprint,
};
use serde::Deserialize;

use super::auth::{authorize, Right};
use super::{require_api_version, ApiError, ApiState};
use ferrohub_hub::timefmt;

/// Most devices one list call returns (IoT Hub's cap for `GET /devices`).
const MAX_TOP: usize = 1000;

/// The writable part of a device or module, as clients send it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityRequest {
    device_id: Option<String>,
    module_id: Option<String>,
    status: Option<Status>,
    status_reason: Option<String>,
    authentication: Option<AuthRequest>,
    capabilities: Option<Capabilities>,
    managed_by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthRequest {
    #[serde(rename = "type")]
    auth_type: Option<AuthType>,
    symmetric_key: Option<SymmetricKey>,
    x509_thumbprint: Option<X509Thumbprint>,
}

fn parse_body(body: &Bytes) -> Result<IdentityRequest, ApiError> {
    if body.is_empty() {
        return Err(ApiError::argument("request body is required"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::argument(format!("invalid request body: {e}")))
}

fn device_not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::DeviceNotFound,
        format!("Device {id} cannot be found."),
    )
}

fn module_not_found(id: &str, mid: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ModuleNotFound,
        format!("Module {mid} on device {id} cannot be found."),
    )
}

fn if_match(headers: &HeaderMap) -> Option<IfMatch> {
    headers
        .get(axum::http::header::IF_MATCH)
        .map(|v| IfMatch::from_header(v.to_str().ok()))
}

fn valid_key(key: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| (16..=64).contains(&k.len()))
}

fn valid_thumbprint(t: &str) -> bool {
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    matches!(hex.len(), 40 | 64) && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// Builds the stored authentication from a request, generating SAS keys that were not given.
fn authentication(
    req: Option<AuthRequest>,
    current: Option<&Authentication>,
) -> Result<Authentication, ApiError> {
    let Some(req) = req else {
        return Ok(match current {
            Some(c) => c.clone(),
            None => Authentication {
                symmetric_key: SymmetricKey {
                    primary_key: Some(generate_key()),
                    secondary_key: Some(generate_key()),
                },
                ..Default::default()
            },
        });
    };
    let auth_type = req.auth_type.unwrap_or(AuthType::Sas);
    let mut auth = Authentication {
        auth_type,
        ..Default::default()
    };
    match auth_type {
        AuthType::Sas => {
            let given = req.symmetric_key.unwrap_or_default();
            let pick = |k: Option<String>| -> Result<String, ApiError> {
                match k.filter(|k| !k.is_empty()) {
                    Some(k) if valid_key(&k) => Ok(k),
                    Some(_) => Err(ApiError::argument(
                        "symmetric keys must be base64 of 16 to 64 bytes",
                    )),
                    None => Ok(generate_key()),
                }
            };
            auth.symmetric_key = SymmetricKey {
                primary_key: Some(pick(given.primary_key)?),
                secondary_key: Some(pick(given.secondary_key)?),
            };
        }
        AuthType::SelfSigned => {
            let t = req.x509_thumbprint.unwrap_or_default();
            let primary = t.primary_thumbprint.filter(|s| !s.is_empty());
            let secondary = t.secondary_thumbprint.filter(|s| !s.is_empty());
            if primary.is_none() && secondary.is_none() {
                return Err(ApiError::argument(
                    "selfSigned authentication needs a thumbprint",
                ));
            }
            for tp in primary.iter().chain(secondary.iter()) {
                if !valid_thumbprint(tp) {
                    return Err(ApiError::argument(
                        "thumbprints are SHA-1 (40) or SHA-256 (64) hex digits",
                    ));
                }
            }
            auth.x509_thumbprint = X509Thumbprint {
                primary_thumbprint: primary.map(|s| s.to_ascii_uppercase()),
                secondary_thumbprint: secondary.map(|s| s.to_ascii_uppercase()),
            };
        }
        AuthType::CertificateAuthority | AuthType::None => {}
    }
    Ok(auth)
}

/// The live connection state of an identity, to lay over its registry record: state, when it
/// last changed, last activity. `None` when this process has not seen it connect.
fn live_state(state: &ApiState, id: &Identity) -> Option<(ConnectionState, String, String)> {
    let p = state.hub.presence.get(id)?;
    let connection = if p.connected {
        ConnectionState::Connected
    } else {
        ConnectionState::Disconnected
    };
    Some((
        connection,
        timefmt::iso_system(p.state_updated),
        timefmt::iso_system(p.last_activity),
    ))
}

/// The registry record with what only the running hub knows: connection state and activity,
/// and the depth of the C2D queue.
async fn with_live_device(state: &ApiState, mut d: Device) -> Result<Device, ApiError> {
    live_device_state(state, &mut d);
    d.cloud_to_device_message_count = state
        .hub
        .store
        .c2d_count(&d.device_id, None)
        .await
        .map_err(device_err(""))?;
    Ok(d)
}

fn live_device_state(state: &ApiState, d: &mut Device) {
    if let Some((c, changed, active)) = live_state(state, &Identity::device(d.device_id.clone())) {
        d.connection_state = c;
        d.connection_state_updated_time = Some(changed);
        d.last_activity_time = Some(active);
    }
}

async fn with_live_module(state: &ApiState, mut m: Module) -> Result<Module, ApiError> {
    let id = Identity::module(m.device_id.clone(), m.module_id.clone());
    if let Some((c, changed, active)) = live_state(state, &id) {
        m.connection_state = c;
        m.connection_state_updated_time = Some(changed);
        m.last_activity_time = Some(active);
    }
    m.cloud_to_device_message_count = state
        .hub
        .store
        .c2d_count(&m.device_id, Some(&m.module_id))
        .await
        .map_err(device_err(""))?;
    Ok(m)
}

/// Maps a store failure on a device lookup (not found, or an engine error).
fn device_err(id: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| ApiError::from_store(e, device_not_found(id), device_not_found(id))
}

/// Maps a store failure on a module lookup.
fn module_err<'a>(id: &'a str, mid: &'a str) -> impl Fn(StoreError) -> ApiError + 'a {
    move |e| ApiError::from_store(e, module_not_found(id, mid), module_not_found(id, mid))
}

fn check_device_id(id: &str) -> Result<(), ApiError> {
    validate_device_id(id).map_err(|e| ApiError::argument(format!("invalid device id: {e}")))
}

fn check_module_id(id: &str) -> Result<(), ApiError> {
    validate_module_id(id).map_err(|e| ApiError::argument(format!("invalid module id: {e}")))
}

pub async fn put_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Device>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryWrite).await?;
    check_device_id(&id)?;
    let req = parse_body(&body)?;
    if req.device_id.as_deref().is_some_and(|d| d != id) {
        return Err(ApiError::argument(
            "deviceId in the body does not match the URL",
        ));
    }
    let store = &state.hub.store;
    let existing = store.get_device(&id).await.map_err(device_err(&id))?;
    let now = timefmt::now_iso();
    let exists_err = || {
        ApiError::new(
            ErrorCode::DeviceAlreadyExists,
            format!("A device with ID '{id}' is already registered."),
        )
    };
    let saved = match (existing, if_match(&headers)) {
        (None, Some(IfMatch::Etag(_))) => return Err(device_not_found(&id)),
        (None, _) => {
            let device = Device {
                device_id: id.clone(),
                generation_id: new_generation_id(),
                status: req.status.unwrap_or_default(),
                status_reason: req.status_reason,
                status_updated_time: Some(now.clone()),
                authentication: authentication(req.authentication, None)?,
                capabilities: req.capabilities.unwrap_or_default(),
                ..Default::default()
            };
            store
                .create_device(device)
                .await
                .map_err(|e| ApiError::from_store(e, device_not_found(&id), exists_err()))?
        }
        // IoT Hub treats a PUT without If-Match as "create": the device must not exist.
        (Some(_), None) => return Err(exists_err()),
        (Some(current), Some(cond)) => {
            let mut device = current.clone();
            if let Some(s) = req.status {
                if s != current.status {
                    device.status_updated_time = Some(now.clone());
                }
                device.status = s;
            }
            if req.status_reason.is_some() {
                device.status_reason = req.status_reason;
            }
            device.authentication =
                authentication(req.authentication, Some(&current.authentication))?;
            if let Some(c) = req.capabilities {
                device.capabilities = c;
            }
            let saved = store
                .update_device(device, cond)
                .await
                .map_err(|e| ApiError::from_store(e, device_not_found(&id), exists_err()))?;
            // New keys or a disabled status take effect at once, as in IoT Hub.
            if saved.status == Status::Disabled || saved.authentication != current.authentication {
                state.broker.kick(&id);
            }
            saved
        }
    };
    Ok(Json(with_live_device(&state, saved).await?))
}

pub async fn get_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Device>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryRead).await?;
    let d = state
        .hub
        .store
        .get_device(&id)
        .await
        .map_err(device_err(&id))?
        .ok_or_else(|| device_not_found(&id))?;
    Ok(Json(with_live_device(&state, d).await?))
}

pub async fn delete_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryWrite).await?;
    let store = &state.hub.store;
    let modules = store.list_modules(&id).await.unwrap_or_default();
    store
        .delete_device(&id, if_match(&headers).unwrap_or(IfMatch::Any))
        .await
        .map_err(device_err(&id))?;
    let mut client_ids = vec![id.clone()];
    client_ids.extend(modules.iter().map(|m| format!("{id}/{}", m.module_id)));
    for cid in client_ids {
        state.broker.kick(&cid);
        if let Err(e) = state.broker.forget_session(&cid).await {
            tracing::warn!(client = %cid, error = %e, "could not drop the session of a deleted identity");
        }
    }
    state.hub.presence.forget(&Identity::device(id.clone()));
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn list_devices(
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Vec<Device>>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryRead).await?;
    let top = match q.get("top") {
        None => MAX_TOP,
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_TOP).contains(n))
            .ok_or_else(|| ApiError::argument(format!("top must be between 1 and {MAX_TOP}")))?,
    };
    let devices = state
        .hub
        .store
        .list_devices(top)
        .await
        .map_err(device_err(""))?;
    // One store query for all the queue depths, not one per device.
    let ids: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
    let counts = state
        .hub
        .store
        .c2d_counts(&ids)
        .await
        .map_err(device_err(""))?;
    let out = devices
        .into_iter()
        .map(|mut d| {
            live_device_state(&state, &mut d);
            d.cloud_to_device_message_count = counts.get(&d.device_id).copied().unwrap_or(0);
            d
        })
        .collect();
    Ok(Json(out))
}

pub async fn put_module(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Module>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryWrite).await?;
    check_device_id(&id)?;
    check_module_id(&mid)?;
    let req = parse_body(&body)?;
    if req.device_id.as_deref().is_some_and(|d| d != id)
        || req.module_id.as_deref().is_some_and(|m| m != mid)
    {
        return Err(ApiError::argument(
            "deviceId/moduleId in the body do not match the URL",
        ));
    }
    let store = &state.hub.store;
    if store
        .get_device(&id)
        .await
        .map_err(device_err(&id))?
        .is_none()
    {
        return Err(device_not_found(&id));
    }
    let existing = store
        .get_module(&id, &mid)
        .await
        .map_err(module_err(&id, &mid))?;
    let exists_err = || {
        ApiError::new(
            ErrorCode::ModuleAlreadyExistsOnDevice,
            format!("A module with ID '{mid}' already exists on device '{id}'."),
        )
    };
    let saved = match (existing, if_match(&headers)) {
        (None, Some(IfMatch::Etag(_))) => return Err(module_not_found(&id, &mid)),
        (None, _) => {
            let module = Module {
                module_id: mid.clone(),
                device_id: id.clone(),
                generation_id: new_generation_id(),
                managed_by: req.managed_by,
                authentication: authentication(req.authentication, None)?,
                ..Default::default()
            };
            store
                .create_module(module)
                .await
                .map_err(|e| ApiError::from_store(e, device_not_found(&id), exists_err()))?
        }
        (Some(_), None) => return Err(exists_err()),
        (Some(current), Some(cond)) => {
            let mut module = current.clone();
            module.authentication =
                authentication(req.authentication, Some(&current.authentication))?;
            if req.managed_by.is_some() {
                module.managed_by = req.managed_by;
            }
            let saved = store
                .update_module(module, cond)
                .await
                .map_err(|e| ApiError::from_store(e, module_not_found(&id, &mid), exists_err()))?;
            if saved.authentication != current.authentication {
                state.broker.kick(&format!("{id}/{mid}"));
            }
            saved
        }
    };
    Ok(Json(with_live_module(&state, saved).await?))
}

pub async fn get_module(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Module>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryRead).await?;
    let m = state
        .hub
        .store
        .get_module(&id, &mid)
        .await
        .map_err(module_err(&id, &mid))?
        .ok_or_else(|| module_not_found(&id, &mid))?;
    Ok(Json(with_live_module(&state, m).await?))
}

pub async fn delete_module(
    State(state): State<ApiState>,
    Path((id, mid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryWrite).await?;
    state
        .hub
        .store
        .delete_module(&id, &mid, if_match(&headers).unwrap_or(IfMatch::Any))
        .await
        .map_err(module_err(&id, &mid))?;
    let cid = format!("{id}/{mid}");
    state.broker.kick(&cid);
    if let Err(e) = state.broker.forget_session(&cid).await {
        tracing::warn!(client = %cid, error = %e, "could not drop the session of a deleted module");
    }
    state.hub.presence.forget(&Identity::module(id, mid));
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn list_modules(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Vec<Module>>, ApiError> {
    require_api_version(&q)?;
    authorize(&state, &headers, Right::RegistryRead).await?;
    let store = &state.hub.store;
    if store
        .get_device(&id)
        .await
        .map_err(device_err(&id))?
        .is_none()
    {
        return Err(device_not_found(&id));
    }
    let modules = store.list_modules(&id).await.map_err(device_err(&id))?;
    let mut out = Vec::with_capacity(modules.len());
    for m in modules {
        out.push(with_live_module(&state, m).await?);
    }
    Ok(Json(out))
}

/// IoT Hub's generationId: distinguishes identities that reuse a deleted one's id.
fn new_generation_id() -> String {
    let n: u64 = rand::random::<u64>() % 1_000_000_000_000_000_000;
    format!("{n:018}")
}
