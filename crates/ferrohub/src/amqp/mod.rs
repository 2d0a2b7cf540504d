//! The AMQP 1.0 front end: the Event Hubs-compatible endpoint over the telemetry log (SASL,
//! claims-based security on `$cbs`, `$management` READ, partition receivers) and service-side
//! C2D (sends to `messages/devicebound`, the feedback receiver). It parses AMQP, calls one hub
//! service per request (`Hub::authorize_claim`, `Hub::open_events`, `Hub::partition_info`,
//! `Hub::c2d_send`, `Hub::feedback_receive` / `feedback_settle`) and formats the answer;
//! `HubError`s become AMQP errors in [`condition_of`] and [`c2d::rejection`] only. TLS is
//! terminated by the listener before it gets here.

pub mod c2d;
mod connection;
pub mod eventhub;

use std::sync::Arc;
use std::time::Duration;

use ferrohub_hub::Hub;
use ferrohub_iothub::ErrorCode;

pub use connection::serve;

/// What every AMQP connection shares.
#[derive(Clone)]
pub struct AmqpFrontEnd {
    pub hub: Arc<Hub>,
    /// The Event Hubs-compatible entity (`--hub-name`).
    pub entity: String,
    /// How long a client has to get from TCP+TLS to its Open (with SASL, if any).
    pub open_timeout: Duration,
    /// The largest frame we accept, and offer in Open.
    pub max_frame_size: u32,
    /// Start of the hub's event stream, reported as the event hub's `created_at`.
    pub created_ms: i64,
    /// The port AMQP listens on, for redirects.
    pub port: u16,
    /// The host name redirects name when the client's Open gave none.
    pub default_host: String,
}

/// The AMQP error condition for a hub failure.
pub fn condition_of(e: &ferrohub_hub::HubError) -> &'static str {
    match e.code() {
        ErrorCode::IotHubUnauthorizedAccess | ErrorCode::IoTHubUnauthorized => {
            "amqp:unauthorized-access"
        }
        ErrorCode::ArgumentInvalid | ErrorCode::ArgumentNull => "amqp:invalid-field",
        ErrorCode::DeviceNotFound | ErrorCode::ModuleNotFound => "amqp:not-found",
        ErrorCode::ThrottlingException => "amqp:resource-limit-exceeded",
        _ => "amqp:internal-error",
    }
}
