//! The service REST API, in the shape of IoT Hub's (what the official service SDKs call), and
//! the `/$iothub/websocket` endpoint for MQTT over WebSocket.

mod auth;
mod certificates;
mod devices;
mod error;
mod events;
mod messaging;
mod twins;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State, WebSocketUpgrade};
use axum::response::Response;
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
    pub broker: Arc<Broker<MqttFrontEnd>>,
    pub tokens: Arc<auth::TokenCache>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/$iothub/websocket", get(websocket))
        .route("/devices", get(devices::list_devices))
        .route(
            "/devices/{id}",
            get(devices::get_device)
                .put(devices::put_device)
                .delete(devices::delete_device),
        )
        .route("/devices/{id}/modules", get(devices::list_modules))
        .route(
            "/devices/{id}/modules/{mid}",
            get(devices::get_module)
                .put(devices::put_module)
                .delete(devices::delete_module),
        )
        .route(
            "/devices/{id}/messages/deviceBound",
            post(messaging::send_to_device),
        )
        .route(
            "/devices/{id}/modules/{mid}/messages/deviceBound",
            post(messaging::send_to_module),
        )
        .route("/devices/{id}/commands", delete(messaging::purge_device))
        .route(
            "/devices/{id}/modules/{mid}/commands",
            delete(messaging::purge_module),
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
        .route(
            "/twins/{id}",
            get(twins::get_device_twin)
                .patch(twins::patch_device_twin)
                .put(twins::put_device_twin),
        )
        .route(
            "/twins/{id}/modules/{mid}",
            get(twins::get_module_twin)
                .patch(twins::patch_module_twin)
                .put(twins::put_module_twin),
        )
        .route("/twins/{id}/methods", post(twins::invoke_device_method))
        .route(
            "/twins/{id}/modules/{mid}/methods",
            post(twins::invoke_module_method),
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
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        ferrohub_iothub::ErrorCode::InvalidOperation,
        "no such resource",
    )
    .with_status(axum::http::StatusCode::NOT_FOUND)
}

/// The identity a `/devices/{id}[/modules/{mid}]` or `/twins/...` route names.
pub(crate) fn identity(id: String, mid: Option<String>) -> ferrohub_iothub::Identity {
    match mid {
        None => ferrohub_iothub::Identity::device(id),
        Some(m) => ferrohub_iothub::Identity::module(id, m),
    }
}

/// IoT Hub requires `api-version` on every service call.
pub(crate) fn require_api_version(q: &HashMap<String, String>) -> Result<(), ApiError> {
    match q.get("api-version") {
        Some(v) if ferrohub_iothub::connect::api_version_supported(v) => Ok(()),
        Some(v) => Err(ApiError::argument(format!("unsupported api-version {v:?}"))),
        None => Err(ApiError::argument(
            "the api-version query parameter is required",
        )),
    }
}

/// MQTT over WebSocket. The query string is ignored (the C SDK may add
/// `iothub-no-client-cert=true`); the `mqtt` subprotocol is echoed, which the Node SDK requires.
/// The session itself (connection cap, shutdown tracking) is `ws::upgrade`'s.
async fn websocket(
    State(state): State<ApiState>,
    Extension(conn): Extension<HttpsConn>,
    Query(_q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    crate::ws::upgrade(ws, state.broker.clone(), conn)
}
