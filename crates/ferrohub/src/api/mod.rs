//! The service REST API, in the shape of IoT Hub's (what the official service SDKs call), and
//! the `/$iothub/websocket` endpoint for MQTT over WebSocket; the web explorer
//! (`crate::explorer`) is mounted beside it under `/explorer`.

mod certificates;
mod configurations;
mod devices;
mod digital_twins;
mod error;
mod events;
pub mod extract;
mod jobs;
mod messaging;
mod models;
mod provisioning;
pub mod query;
pub mod routing;
mod statistics;
mod twins;
pub mod types;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Router};

use crate::mqtt::MqttFrontEnd;
use crate::server::HttpsConn;
pub use error::{ApiError, Refusal};
use ferrohub_broker::Broker;
use ferrohub_hub::Hub;

#[derive(Clone)]
pub struct ApiState {
    pub hub: Arc<Hub>,
    /// For `/$iothub/websocket`, which hands MQTT connections to the broker.
    pub broker: Arc<Broker<MqttFrontEnd>>,
    /// For AMQP over WebSocket (`/$servicebus/websocket`, or `/$iothub/websocket` with the
    /// `AMQPWSB10` subprotocol).
    pub amqp: crate::amqp::AmqpFrontEnd,
    /// Time a client has to send a request body (`api::extract::BodyBytes`).
    pub body_timeout: std::time::Duration,
    /// Permits for requests in progress (`--https-max-requests`); see [`shed_load`].
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// The REST API, with the web explorer (`crate::explorer`) under `/explorer`: the explorer's
/// routes come first, everything else is the API's.
pub fn router(state: ApiState, explorer: crate::explorer::Explorer) -> Router {
    let identity = || {
        get(devices::get_identity)
            .put(devices::put_identity)
            .delete(devices::delete_identity)
    };
    let twin = || {
        get(twins::get_twin)
            .patch(twins::patch_twin)
            .put(twins::put_twin)
    };
    let routes = Router::new()
        .route("/$iothub/websocket", get(websocket))
        .route("/$servicebus/websocket", get(amqp_websocket))
        .route("/devices", get(devices::list_devices).post(devices::bulk))
        .route("/devices/{id}", identity().post(post_to_device))
        .route("/devices/{id}/modules", get(devices::list_modules))
        .route("/devices/{id}/modules/{mid}", identity())
        .route("/devices/{id}/messages/deviceBound", post(messaging::send))
        .route(
            "/devices/{id}/modules/{mid}/messages/deviceBound",
            post(messaging::send),
        )
        .route("/devices/{id}/commands", delete(messaging::purge))
        .route(
            "/devices/{id}/modules/{mid}/commands",
            delete(messaging::purge),
        )
        .route(
            "/messages/serviceBound/feedback",
            get(messaging::receive_feedback),
        )
        .route(
            "/messages/serviceBound/feedback/{token}",
            delete(messaging::complete_feedback),
        )
        .route(
            "/messages/serviceBound/feedback/{token}/abandon",
            post(messaging::abandon_feedback),
        )
        .route("/twins/{id}", twin())
        .route("/twins/{id}/modules/{mid}", twin())
        .route("/twins/{id}/methods", post(twins::invoke_method))
        .route(
            "/twins/{id}/modules/{mid}/methods",
            post(twins::invoke_method),
        )
        .route(
            "/digitaltwins/{id}",
            get(digital_twins::get).patch(digital_twins::patch),
        )
        .route(
            "/digitaltwins/{id}/commands/{name}",
            post(digital_twins::command),
        )
        .route(
            "/digitaltwins/{id}/components/{component}/commands/{name}",
            post(digital_twins::component_command),
        )
        .route("/jobs/v2/query", get(jobs::query_jobs))
        .route("/jobs/v2/{id}", get(jobs::get_job).put(jobs::put_job))
        .route("/jobs/v2/{id}/cancel", post(jobs::cancel_job))
        .route("/models", get(models::list).post(models::add))
        .route("/models/{id}", get(models::get).delete(models::remove))
        .route("/digitaltwins/{id}/conformance", get(models::conformance))
        .route(
            "/digitaltwins/{id}/modules/{mid}/conformance",
            get(models::conformance),
        )
        .route("/statistics/devices", get(statistics::devices))
        .route("/statistics/service", get(statistics::service))
        .route("/events", get(events::stream))
        .route("/certificates", get(certificates::list))
        .route(
            "/certificates/{name}",
            get(certificates::get)
                .put(certificates::put)
                .delete(certificates::delete),
        )
        .route("/configurations", get(configurations::list))
        .route(
            "/configurations/testQueries",
            post(configurations::test_queries),
        )
        .route(
            "/configurations/{id}",
            get(configurations::get)
                .put(configurations::put)
                .delete(configurations::delete),
        )
        .route("/enrollments/query", post(provisioning::query_enrollments))
        .route(
            "/enrollments/{id}",
            get(provisioning::get_enrollment)
                .put(provisioning::put_enrollment)
                .delete(provisioning::delete_enrollment),
        )
        .route("/enrollmentGroups/query", post(provisioning::query_groups))
        .route(
            "/enrollmentGroups/{id}",
            get(provisioning::get_group)
                .put(provisioning::put_group)
                .delete(provisioning::delete_group),
        )
        .route(
            "/registrations/query",
            post(provisioning::query_registrations),
        )
        .route(
            "/registrations/{id}",
            get(provisioning::get_registration).delete(provisioning::delete_registration),
        )
        .route(
            "/{scope}/registrations/{id}/register",
            axum::routing::put(provisioning::device_register),
        )
        .route(
            "/{scope}/registrations/{id}/operations/{operation}",
            get(provisioning::device_operation),
        )
        .route("/ferrohub/routing", get(routing::get_all))
        .route("/ferrohub/routing/endpoints", get(routing::list_endpoints))
        .route(
            "/ferrohub/routing/endpoints/{name}",
            get(routing::get_endpoint)
                .put(routing::put_endpoint)
                .delete(routing::delete_endpoint),
        )
        .route(
            "/ferrohub/routing/endpoints/{name}/health",
            get(routing::endpoint_health),
        )
        .route("/ferrohub/routing/routes", get(routing::list_routes))
        .route(
            "/ferrohub/routing/routes/{name}",
            get(routing::get_route)
                .put(routing::put_route)
                .delete(routing::delete_route),
        )
        .route(
            "/ferrohub/routing/routes/{name}/test",
            post(routing::test_route),
        )
        .route(
            "/ferrohub/routing/enrichments",
            get(routing::list_enrichments),
        )
        .route(
            "/ferrohub/routing/enrichments/{key}",
            get(routing::get_enrichment)
                .put(routing::put_enrichment)
                .delete(routing::delete_enrichment),
        )
        .route(
            "/ferrohub/routing/fallback",
            get(routing::get_fallback).put(routing::put_fallback),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside `shed_load`: its refusals have their own, rate-limited, log line.
        .layer(axum::middleware::from_fn(log_refusals))
        .layer(axum::middleware::from_fn_with_state(
            state.in_flight.clone(),
            shed_load,
        ))
        // Outside `shed_load`, so a shed request is counted with its 429.
        .layer(axum::middleware::from_fn(crate::metrics::count_requests))
        .with_state(state.clone());
    let app = crate::explorer::router(crate::explorer::ExplorerState {
        explorer,
        api: state,
        rest: routes.clone(),
    })
    .fallback_service(routes);
    // A layer on the router itself would run after routing, too late to change the path.
    Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .map_request(trim_trailing_slash)
            .service(app),
    )
}

/// IoT Hub takes its routes with a trailing slash too (the Node SDK's `Registry.list` sends
/// `GET /devices/?api-version=...`, uamqp's WebSocket path is `/$servicebus/websocket/`), so
/// trailing slashes come off before routing. The query string stays as it was.
fn trim_trailing_slash(mut req: axum::extract::Request) -> axum::extract::Request {
    let path = req.uri().path();
    if path.len() <= 1 || !path.ends_with('/') {
        return req;
    }
    let trimmed = match path.trim_end_matches('/') {
        "" => "/",
        t => t,
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{trimmed}?{q}"),
        None => trimmed.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    // Cannot fail: the new path is a prefix of one that parsed.
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = axum::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// The policy a service token names (`skn`), for logs: never the signature or a key.
fn policy_name(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(['&', ' '])
                .find_map(|field| field.strip_prefix("skn="))
                .map(|skn| {
                    percent_encoding::percent_decode_str(skn)
                        .decode_utf8_lossy()
                        .chars()
                        .take(64)
                        .collect()
                })
        })
        .unwrap_or_default()
}

/// One line per refused service request (4xx or 5xx): the route, the status, IoT Hub's code,
/// the policy that signed it and why. Without it an SDK's error was the only trace.
async fn log_refusals(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let policy = policy_name(req.headers());
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (code, name, reason) = match resp.extensions().get::<Refusal>() {
        Some(r) => (r.code.code(), r.code.name(), r.message.as_str()),
        None => (0, "", ""),
    };
    if status.is_server_error() {
        tracing::warn!(%method, path, status = status.as_u16(), error_code = code, error_name = name, policy, reason, "service request failed");
    } else {
        tracing::info!(%method, path, status = status.as_u16(), error_code = code, error_name = name, policy, reason, "service request refused");
    }
    resp
}

/// One log line per second at most for refused requests, with how many there were: a flood
/// of refusals must not become a flood of log lines.
fn log_shed(path: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static REFUSED: AtomicU64 = AtomicU64::new(0);
    static LAST_LOGGED_SEC: AtomicU64 = AtomicU64::new(0);
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = LAST_LOGGED_SEC.load(Ordering::Relaxed);
    if now > last
        && LAST_LOGGED_SEC
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let since = REFUSED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            path,
            refused = since,
            error_code = 429001,
            "service API requests refused: too many in progress (count since the last such line)"
        );
    }
}

/// Answers 429 `ThrottlingException` (with `Retry-After`) at once when the hub already works on
/// as many requests as it takes: memory stays bounded by the permits (each request may buffer
/// a body) however hard clients push, and the SDKs back off and retry. The permit is held until
/// the response head is ready; a streaming body (`/events`) does not keep it.
async fn shed_load(
    State(in_flight): State<Arc<tokio::sync::Semaphore>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_permit) = in_flight.try_acquire() else {
        log_shed(req.uri().path());
        return ApiError::new(
            ferrohub_iothub::ErrorCode::ThrottlingException,
            "the hub is working on as many requests as it takes; retry later",
        )
        .into_response();
    };
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::new(
        ferrohub_iothub::ErrorCode::InvalidOperation,
        "no such resource",
    )
    .with_status(axum::http::StatusCode::NOT_FOUND)
}

/// `POST /devices/query` is the twin query; any other `POST /devices/{id}` is a wrong method.
/// The query shares the device route (rather than a route of its own) so that a device named
/// `query` can still be read, replaced and deleted, as on IoT Hub.
async fn post_to_device(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    request: axum::extract::Request,
) -> Response {
    use axum::handler::Handler;
    if id == "query" {
        return query::query.call(request, state).await;
    }
    method_not_allowed().await.into_response()
}

/// A known resource with a method it does not have: axum's default is an empty 405, which a
/// service SDK cannot read.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ferrohub_iothub::ErrorCode::InvalidOperation,
        "the resource does not support this method",
    )
    .with_status(axum::http::StatusCode::METHOD_NOT_ALLOWED)
}

/// MQTT over WebSocket. The query string is ignored (the C SDK may add
/// `iothub-no-client-cert=true`); the `mqtt` subprotocol is echoed, which the Node SDK requires.
/// The session itself (connection cap, shutdown tracking) is `ws::upgrade`'s.
async fn websocket(
    State(state): State<ApiState>,
    Extension(conn): Extension<HttpsConn>,
    Query(_q): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // The Node service SDK speaks AMQP on this path too; the subprotocol tells them apart.
    let wants_amqp = headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(crate::ws::AMQP_SUBPROTOCOL));
    if wants_amqp {
        return crate::ws::upgrade_amqp(ws, state.amqp.clone(), conn);
    }
    crate::ws::upgrade(ws, state.broker.clone(), conn)
}

/// AMQP over WebSocket, where Event Hubs clients look for it.
async fn amqp_websocket(
    State(state): State<ApiState>,
    Extension(conn): Extension<HttpsConn>,
    ws: WebSocketUpgrade,
) -> Response {
    crate::ws::upgrade_amqp(ws, state.amqp.clone(), conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn uri_after_trim(uri: &str) -> String {
        let req = axum::extract::Request::builder()
            .uri(uri)
            .body(axum::body::Body::empty())
            .expect("a valid request");
        trim_trailing_slash(req).uri().to_string()
    }

    #[test]
    fn trailing_slashes_come_off_the_path_only() {
        assert_eq!(
            uri_after_trim("/devices/?api-version=2021-04-12"),
            "/devices?api-version=2021-04-12"
        );
        assert_eq!(uri_after_trim("/devices//"), "/devices");
        assert_eq!(
            uri_after_trim("/$servicebus/websocket/"),
            "/$servicebus/websocket"
        );
        assert_eq!(uri_after_trim("/"), "/");
        assert_eq!(uri_after_trim("/devices?x=a/"), "/devices?x=a/");
    }

    #[test]
    fn the_policy_is_read_from_the_token_and_nothing_else() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(policy_name(&h), "");
        h.insert(
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderValue::from_static(
                "SharedAccessSignature sr=localhost&sig=c2VjcmV0%3D&se=1&skn=iothubowner",
            ),
        );
        assert_eq!(policy_name(&h), "iothubowner");
    }

    /// Collects what the log writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refused_request_is_logged_with_route_status_code_and_policy_but_no_key(
    ) -> Result<(), Box<dyn std::error::Error>> {
        use tower::ServiceExt;
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let app: Router = Router::new()
            .route(
                "/devices/{id}",
                get(|| async { ApiError::argument("the id is wrong") }),
            )
            .route("/fine", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(log_refusals));
        for path in ["/devices/d1", "/fine"] {
            let req = axum::extract::Request::builder()
                .uri(path)
                .header(
                    "authorization",
                    "SharedAccessSignature sr=h&sig=U0VDUkVU&se=1&skn=service",
                )
                .body(axum::body::Body::empty())?;
            app.clone().oneshot(req).await?;
        }
        let text = String::from_utf8(captured.0.lock().map_err(|e| e.to_string())?.clone())?;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "one line, for the refusal only: {text}");
        for part in [
            "service request refused",
            "path=\"/devices/d1\"",
            "status=400",
            "error_code=400004",
            "error_name=\"ArgumentInvalid\"",
            "policy=\"service\"",
            "the id is wrong",
        ] {
            assert!(lines[0].contains(part), "{part} missing from {text}");
        }
        assert!(
            !text.contains("U0VDUkVU"),
            "the signature was logged: {text}"
        );
        Ok(())
    }
}
