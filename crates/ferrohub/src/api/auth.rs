//! Service API authentication: a SAS token signed with a hub policy key (`skn` names the
//! policy), whose rights must cover the operation.

use axum::http::HeaderMap;
use ferrohub_iothub::sas::host_matches;
use ferrohub_iothub::{ErrorCode, SasToken};
use ferrohub_store::AccessPolicy;

use super::{ApiError, ApiState};

#[derive(Debug, Clone, Copy)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
}

fn unauthorized(why: &str) -> ApiError {
    tracing::info!(reason = why, "service API call refused");
    ApiError::new(ErrorCode::IotHubUnauthorizedAccess, "Unauthorized")
}

/// Checks the `Authorization` header and returns the policy it was signed with.
pub async fn authorize(
    state: &ApiState,
    headers: &HeaderMap,
    need: Right,
) -> Result<AccessPolicy, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized("no Authorization header"))?;
    let token = SasToken::parse(header).map_err(|_| unauthorized("malformed SAS token"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if token.is_expired(now) {
        return Err(unauthorized("token expired"));
    }
    // Service tokens are scoped to the hub: `sr` is the host name (with a port, if the client
    // connected to one).
    let host = token.resource.trim_end_matches('/');
    if host.contains('/') || !host_matches(host, &state.hub.hostnames) {
        return Err(unauthorized("token resource is not this hub"));
    }
    let name = token
        .key_name
        .as_deref()
        .ok_or_else(|| unauthorized("token has no skn"))?;
    let policy = state
        .hub
        .store
        .get_policy(name)
        .await
        .map_err(|e| {
            ApiError::from_store(
                e,
                unauthorized("policy lookup failed"),
                unauthorized("policy lookup failed"),
            )
        })?
        .ok_or_else(|| unauthorized("unknown policy"))?;
    let valid =
        token.verify_signature(&policy.primary_key) | token.verify_signature(&policy.secondary_key);
    if !valid {
        return Err(unauthorized("signature does not match the policy key"));
    }
    let allowed = match need {
        Right::RegistryRead => policy.rights.registry_read,
        Right::RegistryWrite => policy.rights.registry_write,
        Right::ServiceConnect => policy.rights.service_connect,
    };
    if !allowed {
        return Err(unauthorized("policy lacks the right for this operation"));
    }
    Ok(policy)
}
