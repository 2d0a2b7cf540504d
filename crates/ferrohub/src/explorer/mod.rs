//! The web explorer's back end, under `/explorer` on the HTTPS listener: the embedded front
//! end (`assets`), browser sessions (`sessions`, `POST/GET/DELETE /explorer/api/session`), the
//! REST proxy that calls the service API as the session's policy (`proxy`), the dashboard's
//! counters (`overview`) and one-time login tokens (`POST /explorer/api/login-tokens`, and the
//! one the start-up banner prints). The explorer holds no IoT Hub logic: every operation is a
//! REST API call, so the policy's rights are enforced where they are for the SDKs.
//!
//! Rules every `/explorer` response follows: the security headers of [`security_headers`]
//! (CSP, `nosniff`, no referrer, no framing), `Cache-Control: no-store` under `/explorer/api`;
//! a request under `/explorer/api` whose method is not GET or HEAD is refused (403) when it
//! carries an `Origin` other than the one it was sent to, and, when it acts on a session, when
//! its `X-CSRF-Token` is not the session's.

mod assets;
mod overview;
mod proxy;
pub mod sessions;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use ferrohub_hub::Hub;
use ferrohub_iothub::ErrorCode;
use ferrohub_store::AccessPolicy;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tracing::info;

use crate::api::extract::RegistryWrite;
use crate::api::{ApiError, ApiState};
pub use overview::RetentionInfo;
use sessions::{LoginTokens, Session, SessionStore};

/// The session cookie's name.
pub const COOKIE: &str = "ferrohub_session";
/// The header that must carry the session's CSRF token on every state-changing call.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The policy a login token signs in as.
pub const OWNER_POLICY: &str = "iothubowner";
/// The largest sign-in body read: a connection string is well under this.
const SIGN_IN_BODY_LIMIT: usize = 16 * 1024;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// What the explorer's routes share.
#[derive(Clone)]
pub struct Explorer {
    pub hub: Arc<Hub>,
    pub sessions: Arc<dyn SessionStore>,
    pub tokens: Arc<dyn LoginTokens>,
    /// `https://host[:port]`, where a browser reaches this listener (the banner's URL).
    pub base_url: String,
    /// The hub's host name as devices write it in connection strings; also the resource the
    /// proxy's tokens are signed for.
    pub host_name: String,
    pub started: std::time::Instant,
    /// The data directory, whose size the overview reports.
    pub data_dir: std::path::PathBuf,
    pub retention: overview::RetentionInfo,
}

impl Explorer {
    /// The URL that signs a browser in with `token`: the token is in the fragment, so no
    /// server, proxy or log along the way ever sees it.
    pub fn login_url(&self, token: &str) -> String {
        format!("{}/explorer/#token={token}", self.base_url)
    }

    /// A fresh one-time login token and its URL.
    pub async fn mint_login(&self) -> (String, String) {
        let token = self.tokens.mint().await;
        let url = self.login_url(&token);
        (token, url)
    }
}

/// The explorer's state: its own, the REST API's (for `ServiceAuth`), and the REST router the
/// proxy calls.
#[derive(Clone)]
pub struct ExplorerState {
    pub explorer: Explorer,
    pub api: ApiState,
    pub rest: Router,
}

impl axum::extract::FromRef<ExplorerState> for ApiState {
    fn from_ref(s: &ExplorerState) -> ApiState {
        s.api.clone()
    }
}

/// The `/explorer` routes; anything else under `/explorer` is a 404 with the same headers.
pub fn router(state: ExplorerState) -> Router {
    let explorer_404 = || async { explorer_not_found() };
    Router::new()
        .route("/explorer", get(index))
        .route("/explorer/static/{*path}", get(static_file))
        .route(
            "/explorer/api/session",
            get(get_session).post(sign_in).delete(sign_out),
        )
        .route("/explorer/api/login-tokens", post(login_token))
        .route("/explorer/api/overview", get(overview::overview))
        .route("/explorer/api/hub/{*path}", any(proxy::forward))
        .route("/explorer/{*rest}", any(explorer_404))
        // axum's own 405 has no body; the front end reads IoT Hub's error body everywhere.
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::InvalidOperation,
                "the resource does not support this method",
            )
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
        })
        .layer(axum::middleware::from_fn(refuse_foreign_origin))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

fn explorer_not_found() -> ApiError {
    ApiError::new(ErrorCode::InvalidOperation, "no such explorer resource")
        .with_status(StatusCode::NOT_FOUND)
}

/// The headers every explorer response carries, whatever produced it (a file, an API answer,
/// a proxied REST response, a refusal).
async fn security_headers(req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/explorer/api");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if api {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn is_safe(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// The origin a request was addressed to: `https://` and its authority (HTTP/2) or `Host`.
fn own_origin(parts_uri: &axum::http::Uri, headers: &HeaderMap) -> Option<String> {
    let host = parts_uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })?;
    Some(format!("https://{host}"))
}

/// A browser names the page that sent a cross-origin request in `Origin`; a state-changing
/// call from another site is refused whatever it carries. Comparing with the address the
/// request was sent to (rather than a configured name) keeps this right for every host name
/// the hub answers to.
async fn refuse_foreign_origin(req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/explorer/api") && !is_safe(req.method()) {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let own = own_origin(req.uri(), req.headers());
            let same = match (origin.to_str(), own) {
                (Ok(o), Some(own)) => o.eq_ignore_ascii_case(&own),
                _ => false,
            };
            if !same {
                info!(path = req.uri().path(), origin = ?origin, "explorer request refused: foreign Origin");
                return forbidden("the request comes from another site").into_response();
            }
        }
    }
    next.run(req).await
}

fn unauthorized(why: &str) -> ApiError {
    ApiError::new(ErrorCode::IotHubUnauthorizedAccess, why)
}

fn forbidden(why: &str) -> ApiError {
    ApiError::new(ErrorCode::IotHubUnauthorizedAccess, why).with_status(StatusCode::FORBIDDEN)
}

async fn index(headers: HeaderMap) -> Response {
    assets::serve("index.html", &headers)
}

async fn static_file(
    crate::api::extract::PathParam(path): crate::api::extract::PathParam<String>,
    headers: HeaderMap,
) -> Response {
    assets::serve(&path, &headers)
}

/// The session cookie's value, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == COOKIE).then(|| value.to_owned())
        })
}

/// A request from a signed-in browser: its session, refreshed, and, for a method other than
/// GET or HEAD, checked against its CSRF token.
pub struct SignedIn {
    pub id: String,
    pub session: Session,
}

impl FromRequestParts<ExplorerState> for SignedIn {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ExplorerState,
    ) -> Result<Self, ApiError> {
        let id = session_cookie(&parts.headers).ok_or_else(|| unauthorized("sign in first"))?;
        let session = state
            .explorer
            .sessions
            .touch(&id)
            .await
            .ok_or_else(|| unauthorized("the session has ended; sign in again"))?;
        if !is_safe(&parts.method) {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !session.csrf_matches(sent) {
                info!(
                    path = parts.uri.path(),
                    policy = session.policy,
                    "explorer request refused: missing or wrong X-CSRF-Token"
                );
                return Err(forbidden("the X-CSRF-Token header is missing or wrong"));
            }
        }
        Ok(SignedIn { id, session })
    }
}

/// What the front end knows of its session (`GET`/`POST /explorer/api/session`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub policy: String,
    pub rights: Vec<&'static str>,
    pub csrf_token: String,
    /// RFC 3339: when the session ends unless used again.
    pub expires_at: String,
    pub host_name: String,
    pub hub_name: String,
}

/// A policy's rights by IoT Hub's names.
fn rights_of(policy: &AccessPolicy) -> Vec<&'static str> {
    let r = &policy.rights;
    [
        (r.registry_read, "RegistryRead"),
        (r.registry_write, "RegistryWrite"),
        (r.service_connect, "ServiceConnect"),
        (r.device_connect, "DeviceConnect"),
        (r.enrollment_read, "EnrollmentRead"),
        (r.enrollment_write, "EnrollmentWrite"),
    ]
    .into_iter()
    .filter_map(|(has, name)| has.then_some(name))
    .collect()
}

impl Explorer {
    /// The session's policy as the hub has it now; a session whose policy is gone has ended.
    async fn policy_of(&self, signed: &SignedIn) -> Result<AccessPolicy, ApiError> {
        match self.hub.policy(&signed.session.policy).await? {
            Some(p) => Ok(p),
            None => {
                self.sessions.remove(&signed.id).await;
                Err(unauthorized("the session's policy no longer exists"))
            }
        }
    }

    fn info(&self, session: &Session, policy: &AccessPolicy) -> SessionInfo {
        let left = session
            .deadline(&self.sessions.limits())
            .saturating_duration_since(tokio::time::Instant::now());
        let ends = time::OffsetDateTime::now_utc() + left;
        SessionInfo {
            policy: policy.key_name.clone(),
            rights: rights_of(policy),
            csrf_token: session.csrf_token.clone(),
            expires_at: ends
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            host_name: self.host_name.clone(),
            hub_name: self
                .host_name
                .split('.')
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

fn cookie_header(value: &str, clear: bool) -> HeaderValue {
    let max_age = if clear { "; Max-Age=0" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/explorer; HttpOnly; Secure; SameSite=Strict{max_age}"
    ))
    // The value is base64url (or empty): always a valid header.
    .unwrap_or_else(|_| HeaderValue::from_static("ferrohub_session=; Path=/explorer"))
}

/// `POST /explorer/api/session`'s body: one of the two (other fields are ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignIn {
    token: Option<String>,
    connection_string: Option<String>,
}

/// A refused sign-in, logged with the policy named (never the key or token).
fn refuse_sign_in(how: &str, policy: &str, why: &str) -> ApiError {
    info!(via = how, policy, reason = why, "explorer sign-in refused");
    unauthorized("the sign-in was refused: wrong token, connection string or key")
}

/// The policy a connection string proves: its key is one of the policy's two (both compared,
/// in constant time, so timing does not tell which matched or how much).
async fn policy_of_connection_string(hub: &Hub, cs: &str) -> Result<AccessPolicy, ApiError> {
    let parsed = ferrohub_iothub::ConnectionString::parse(cs)
        .map_err(|_| refuse_sign_in("connection string", "", "not a connection string"))?;
    let (Some(name), Some(key)) = (
        parsed.shared_access_key_name.as_deref(),
        parsed.shared_access_key.as_deref(),
    ) else {
        return Err(refuse_sign_in(
            "connection string",
            "",
            "no SharedAccessKeyName or SharedAccessKey",
        ));
    };
    if parsed.host_name.is_empty() {
        return Err(refuse_sign_in("connection string", name, "no HostName"));
    }
    let Some(policy) = hub.policy(name).await? else {
        return Err(refuse_sign_in("connection string", name, "unknown policy"));
    };
    let primary = policy.primary_key.as_bytes().ct_eq(key.as_bytes());
    let secondary = policy.secondary_key.as_bytes().ct_eq(key.as_bytes());
    if !bool::from(primary | secondary) {
        return Err(refuse_sign_in(
            "connection string",
            name,
            "the key is not the policy's",
        ));
    }
    Ok(policy)
}

async fn sign_in(State(state): State<ExplorerState>, req: Request) -> Result<Response, ApiError> {
    let explorer = &state.explorer;
    let previous = session_cookie(req.headers());
    // Within the API's body time, as every REST body: a trickled body cannot hold the request.
    let body = tokio::time::timeout(
        state.api.body_timeout,
        axum::body::to_bytes(req.into_body(), SIGN_IN_BODY_LIMIT),
    )
    .await
    .map_err(|_| {
        ApiError::argument("the sign-in body did not arrive in time")
            .with_status(StatusCode::REQUEST_TIMEOUT)
    })?
    .map_err(|_| ApiError::argument("the sign-in body could not be read"))?;
    let sign_in: SignIn = serde_json::from_slice(&body).map_err(|_| {
        ApiError::argument("the body must be {\"token\": ...} or {\"connectionString\": ...}")
    })?;
    let (policy, how) = match (sign_in.token, sign_in.connection_string) {
        (Some(token), None) => {
            if !explorer.tokens.consume(&token).await {
                return Err(refuse_sign_in(
                    "login token",
                    OWNER_POLICY,
                    "unknown, used or expired login token",
                ));
            }
            let policy =
                explorer.hub.policy(OWNER_POLICY).await?.ok_or_else(|| {
                    refuse_sign_in("login token", OWNER_POLICY, "no owner policy")
                })?;
            (policy, "login token")
        }
        (None, Some(cs)) => (
            policy_of_connection_string(&explorer.hub, &cs).await?,
            "connection string",
        ),
        _ => {
            return Err(ApiError::argument(
                "the body must have exactly one of token and connectionString",
            ))
        }
    };
    // A browser signing in again leaves no session behind under its old cookie.
    if let Some(old) = previous {
        explorer.sessions.remove(&old).await;
    }
    let (id, session) = explorer.sessions.create(&policy.key_name).await;
    info!(via = how, policy = policy.key_name, "explorer sign-in");
    let mut resp = Json(explorer.info(&session, &policy)).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie_header(&id, false));
    Ok(resp)
}

async fn get_session(
    State(state): State<ExplorerState>,
    signed: SignedIn,
) -> Result<Json<SessionInfo>, ApiError> {
    let policy = state.explorer.policy_of(&signed).await?;
    Ok(Json(state.explorer.info(&signed.session, &policy)))
}

async fn sign_out(State(state): State<ExplorerState>, signed: SignedIn) -> Response {
    state.explorer.sessions.remove(&signed.id).await;
    info!(policy = signed.session.policy, "explorer sign-out");
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, cookie_header("", true))],
    )
        .into_response()
}

#[derive(Debug, Serialize)]
struct LoginToken {
    token: String,
    url: String,
}

/// `POST /explorer/api/login-tokens`: a fresh one-time login token, for a caller holding a
/// service SAS token with RegistryWrite (the CLI's `ferrohub explorer`, browser tests). Not a
/// session call: a token signs in as the owner, so minting one needs a policy that can already
/// change the registry, proven the way every service call proves it.
async fn login_token(_: RegistryWrite, State(state): State<ExplorerState>) -> Json<LoginToken> {
    let (token, url) = state.explorer.mint_login().await;
    info!("explorer login token minted");
    Json(LoginToken { token, url })
}

/// Drops expired sessions every minute until shutdown, so abandoned ones do not pile up.
pub async fn sweep_loop(
    sessions: Arc<dyn SessionStore>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                let n = sessions.sweep().await;
                if n > 0 {
                    tracing::debug!(expired = n, "explorer sessions swept");
                }
            }
            _ = ferrohub_broker::until_shutdown(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ferrohub_session=abc; b=2"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("xferrohub_session=abc"),
        );
        assert_eq!(session_cookie(&h), None);
    }
}
