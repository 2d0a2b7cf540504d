//! The service REST API, in the shape of IoT Hub's (what the official service SDKs call), and
//! the `/$iothub/websocket` endpoint for MQTT over WebSocket.

mod certificates;
mod devices;
mod error;
mod events;
pub mod extract;
mod messaging;
pub mod query;
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
pub use error::ApiError;
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

pub fn router(state: ApiState) -> Router {
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
    Router::new()
        .route("/$iothub/websocket", get(websocket))
        .route("/$servicebus/websocket", get(amqp_websocket))
        .route("/devices", get(devices::list_devices))
        .route("/devices/query", post(query::query))
        .route("/devices/{id}", identity())
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
        .route("/events", get(events::stream))
        .route("/certificates", get(certificates::list))
        .route(
            "/certificates/{name}",
            get(certificates::get)
                .put(certificates::put)
                .delete(certificates::delete),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.in_flight.clone(),
            shed_load,
        ))
        .with_state(state)
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
