//! IoT Hub semantics for Ferrohub as pure functions and types: identities, CONNECT rules, SAS
//! tokens, topic authorization, property bags, telemetry stamping, error codes and connection
//! strings, the query language and message routing conditions. No I/O here.

pub mod c2d;
pub mod connect;
pub mod connection_string;
pub mod digital_twin;
pub mod dps;
mod encoding;
pub mod endpoints;
pub mod errors;
pub mod identity;
pub mod notifications;
pub mod query;
pub mod registry;
pub mod routing;
pub mod routing_config;
pub mod sas;
pub mod telemetry;
pub mod topics;
pub mod twin;

pub use connect::{parse_connect, server_keep_alive, ConnectError, ConnectInfo};
pub use connection_string::{ConnectionString, ConnectionStringError};
pub use errors::ErrorCode;
pub use identity::{validate_device_id, validate_module_id, IdError, Identity};
pub use sas::{ResourceScope, SasError, SasToken};
pub use telemetry::{
    message_size, parse_telemetry, stamp, ParsedTelemetry, StampContext, TelemetryError,
    TelemetryMessage, MAX_MESSAGE_SIZE,
};
pub use topics::{
    authorize_subscribe, classify_publish, PublishTopic, SubscriptionKind, TopicError,
};
