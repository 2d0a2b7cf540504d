//! `ANY /explorer/api/hub/{*path}`: the REST API called in process as the session's policy.
//! The request goes to the API's own router (as a tower service, no socket) with a SAS token
//! minted for that policy, so the API enforces the policy's rights exactly as it does for the
//! SDKs; the response comes back as it is, its body streamed (`/events` stays open, line by
//! line). Only the service API is reachable: WebSocket endpoints, the DPS device API and the
//! explorer itself are not.

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ferrohub_iothub::ErrorCode;
use tower::ServiceExt;

use super::{ExplorerState, SignedIn};
use crate::api::ApiError;

/// The api-version added when the front end names none.
pub const API_VERSION: &str = "2021-04-12";
/// The proxy's tokens last 5 to 6 minutes: their expiry is rounded to the minute, so calls in
/// the same minute carry the same token and the hub's token cache spares the HMACs.
const TOKEN_LIFETIME_SECS: u64 = 300;
const PREFIX: &str = "/explorer/api/hub";

/// Request headers the REST API reads; everything else (cookies, the browser's own
/// `Authorization`, the CSRF token) stays behind.
fn forwarded(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "content-type"
            | "content-length"
            | "if-match"
            | "if-none-match"
            | "accept"
            | "x-ms-max-item-count"
            | "x-ms-continuation"
    ) || ((n.starts_with("iothub-") || n.starts_with("x-ms-")) && n != "x-csrf-token")
}

fn not_service_api() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidOperation,
        "not a service REST API path: the explorer forwards only those",
    )
    .with_status(StatusCode::NOT_FOUND)
}

/// The path's segments, percent-decoded, for the checks only (the raw path is forwarded).
fn segments(path: &str) -> Vec<String> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

/// Whether `path` (after `/explorer/api/hub`) is the service REST API: not the WebSocket
/// endpoints (`$iothub`, `$servicebus`), not a DPS device path (`/{scope}/registrations/...`),
/// not the explorer, and no dot segments.
fn is_service_path(path: &str) -> bool {
    let segs = segments(path);
    let Some(first) = segs.first() else {
        return false;
    };
    if first.is_empty() || first.starts_with('$') || first.eq_ignore_ascii_case("explorer") {
        return false;
    }
    if segs
        .iter()
        .any(|s| s == "." || s == ".." || s.contains('/'))
    {
        return false;
    }
    segs.get(1).is_none_or(|s| s != "registrations")
}

/// The forwarded path and query: `api-version` added when absent.
fn target(path: &str, query: Option<&str>) -> String {
    let query = query.unwrap_or("");
    let has_version = query
        .split('&')
        .any(|kv| kv.split('=').next() == Some("api-version"));
    match (query.is_empty(), has_version) {
        (true, _) => format!("{path}?api-version={API_VERSION}"),
        (false, true) => format!("{path}?{query}"),
        (false, false) => format!("{path}?{query}&api-version={API_VERSION}"),
    }
}

fn token_expiry(now_secs: u64) -> u64 {
    (now_secs / 60 + 1) * 60 + TOKEN_LIFETIME_SECS
}

pub async fn forward(
    State(state): State<ExplorerState>,
    signed: SignedIn,
    req: Request,
) -> Result<Response, ApiError> {
    let explorer = &state.explorer;
    let path = req
        .uri()
        .path()
        .strip_prefix(PREFIX)
        .unwrap_or("")
        .to_owned();
    if !is_service_path(&path) {
        return Err(not_service_api());
    }
    let policy = explorer.policy_of(&signed).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let token = ferrohub_iothub::sas::generate_token(
        &explorer.host_name,
        &policy.primary_key,
        token_expiry(now),
        Some(&policy.key_name),
    )
    .map_err(|_| ApiError::new(ErrorCode::ServerError, "the policy's key cannot sign"))?;
    let uri: Uri = target(&path, req.uri().query())
        .parse()
        .map_err(|_| ApiError::argument("the path or query is not a valid URI"))?;
    let (parts, body) = req.into_parts();
    let mut fwd = Request::builder().method(parts.method).uri(uri);
    if let Some(h) = fwd.headers_mut() {
        for (name, value) in parts.headers.iter().filter(|(n, _)| forwarded(n)) {
            h.append(name.clone(), value.clone());
        }
        let auth = HeaderValue::from_str(&token)
            .map_err(|_| ApiError::new(ErrorCode::ServerError, "unusable token"))?;
        h.insert(header::AUTHORIZATION, auth);
    }
    let fwd = fwd
        .body(body)
        .map_err(|_| ApiError::argument("the request cannot be forwarded"))?;
    match state.rest.clone().oneshot(fwd).await {
        Ok(resp) => Ok(resp.into_response()),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_api_paths_are_forwarded() {
        assert!(is_service_path("/devices"));
        assert!(is_service_path("/devices/d1/modules/m1"));
        assert!(is_service_path("/registrations/r1"));
        assert!(is_service_path("/registrations/query"));
        assert!(is_service_path("/events"));
        assert!(!is_service_path("/$iothub/websocket"));
        assert!(!is_service_path("/%24iothub/websocket"));
        assert!(!is_service_path("/$servicebus/websocket"));
        assert!(!is_service_path("/0ne00000001/registrations/d1/register"));
        assert!(!is_service_path("/explorer/api/session"));
        assert!(!is_service_path("/devices/../explorer"));
        assert!(!is_service_path("/devices/a%2Fb"));
        assert!(!is_service_path(""));
        assert!(!is_service_path("/"));
    }

    #[test]
    fn api_version_is_added_only_when_missing() {
        assert_eq!(target("/devices", None), "/devices?api-version=2021-04-12");
        assert_eq!(
            target("/devices", Some("top=5")),
            "/devices?top=5&api-version=2021-04-12"
        );
        assert_eq!(
            target("/devices", Some("api-version=2020-09-30")),
            "/devices?api-version=2020-09-30"
        );
        assert!(ferrohub_iothub::connect::api_version_supported(API_VERSION));
    }

    #[test]
    fn browser_credentials_stay_behind() {
        for h in ["cookie", "authorization", "x-csrf-token", "origin", "host"] {
            assert!(!forwarded(&HeaderName::from_static(h)), "{h}");
        }
        for h in [
            "if-match",
            "x-ms-continuation",
            "iothub-ack",
            "content-type",
        ] {
            assert!(forwarded(&HeaderName::from_static(h)), "{h}");
        }
    }

    #[test]
    fn tokens_are_shared_within_a_minute_and_last_five_minutes() {
        assert_eq!(token_expiry(60), token_expiry(119));
        assert!(token_expiry(119) >= 119 + TOKEN_LIFETIME_SECS);
        assert!(token_expiry(60) <= 60 + TOKEN_LIFETIME_SECS + 60);
    }
}
