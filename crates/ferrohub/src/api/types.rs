//! The JSON bodies the service API and its clients (the CLI) exchange, in IoT Hub's shape. The
//! API builds its responses from hub records with these types, and the CLI reads and writes
//! the same types, so the shape on the wire is written down once. Field order is the order on
//! the wire: registry records keep IoT Hub's order, the other bodies (built with `json!`
//! before these types existed) are alphabetical, byte for byte what clients saw then.

use ferrohub_hub::registry::{Live, LiveDevice, LiveModule};
use ferrohub_hub::timefmt;
use ferrohub_store::{Authentication, CaCertificate, Capabilities, FeedbackRequest, Status};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use ferrohub_hub::bulk::{BulkError, BulkResult, BulkWarning, ImportEntry, ImportMode};
pub use ferrohub_hub::configurations::{
    Configuration, ConfigurationContent, ConfigurationMetrics, QueriesTestInput,
    QueriesTestResponse,
};
pub use ferrohub_hub::registry::{AuthRequest, IdentityRequest};
pub use ferrohub_hub::statistics::{RegistryStatistics, ServiceStatistics};
pub use ferrohub_store::FeedbackRecord;

/// Whether an identity is connected (IoT Hub's `connectionState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ConnectionState {
    #[default]
    Disconnected,
    Connected,
}

/// The presence part of a device or module: state, when it last changed, last activity (IoT
/// Hub's "never" for an identity not seen since the hub started).
fn presence(live: &Live) -> (ConnectionState, Option<String>, Option<String>) {
    match &live.presence {
        None => (
            ConnectionState::Disconnected,
            Some(timefmt::NEVER.to_string()),
            Some(timefmt::NEVER.to_string()),
        ),
        Some(p) => (
            if p.connected {
                ConnectionState::Connected
            } else {
                ConnectionState::Disconnected
            },
            Some(timefmt::iso_system(p.state_updated)),
            Some(timefmt::iso_system(p.last_activity)),
        ),
    }
}

/// A device as `GET /devices/{id}` returns it (IoT Hub `Device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceResponse {
    pub device_id: String,
    #[serde(default)]
    pub generation_id: String,
    #[serde(default)]
    pub etag: String,
    #[serde(default)]
    pub connection_state: ConnectionState,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub connection_state_updated_time: Option<String>,
    #[serde(default)]
    pub status_updated_time: Option<String>,
    #[serde(default)]
    pub last_activity_time: Option<String>,
    #[serde(default)]
    pub cloud_to_device_message_count: u64,
    #[serde(default)]
    pub authentication: Authentication,
    #[serde(default)]
    pub capabilities: Capabilities,
}

impl From<LiveDevice> for DeviceResponse {
    fn from(LiveDevice { device: d, live }: LiveDevice) -> Self {
        let (connection_state, changed, active) = presence(&live);
        Self {
            device_id: d.device_id,
            generation_id: d.generation_id,
            etag: d.etag,
            connection_state,
            status: d.status,
            status_reason: d.status_reason,
            connection_state_updated_time: changed,
            status_updated_time: d
                .status_updated_time
                .or_else(|| Some(timefmt::NEVER.to_string())),
            last_activity_time: active,
            cloud_to_device_message_count: live.c2d_count,
            authentication: d.authentication,
            capabilities: d.capabilities,
        }
    }
}

/// A module as `GET /devices/{id}/modules/{mid}` returns it (IoT Hub `Module`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModuleResponse {
    pub module_id: String,
    #[serde(default)]
    pub device_id: String,
    #[serde(default)]
    pub generation_id: String,
    #[serde(default)]
    pub etag: String,
    #[serde(default)]
    pub managed_by: Option<String>,
    #[serde(default)]
    pub connection_state: ConnectionState,
    #[serde(default)]
    pub connection_state_updated_time: Option<String>,
    #[serde(default)]
    pub last_activity_time: Option<String>,
    #[serde(default)]
    pub cloud_to_device_message_count: u64,
    #[serde(default)]
    pub authentication: Authentication,
}

impl From<LiveModule> for ModuleResponse {
    fn from(LiveModule { module: m, live }: LiveModule) -> Self {
        let (connection_state, changed, active) = presence(&live);
        Self {
            module_id: m.module_id,
            device_id: m.device_id,
            generation_id: m.generation_id,
            etag: m.etag,
            managed_by: m.managed_by,
            connection_state,
            connection_state_updated_time: changed,
            last_activity_time: active,
            cloud_to_device_message_count: live.c2d_count,
            authentication: m.authentication,
        }
    }
}

/// `POST .../messages/deviceBound`: the payload and the message's properties in one JSON
/// document, so that property names keep their case and null values survive (HTTP headers
/// would lose both).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct C2dSendBody {
    /// A string is sent as its UTF-8 bytes; any other JSON value as its JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Binary payload, base64 (instead of `payload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// Absolute expiry, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_time_utc: Option<String>,
    /// Time to live in seconds (instead of `expiryTimeUtc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<FeedbackRequest>,
    /// Application properties; a null value is sent as a bare key.
    #[serde(default)]
    pub properties: Map<String, Value>,
}

/// The answer to a C2D send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct C2dSent {
    pub device_id: String,
    pub enqueued_time_utc: String,
    pub expiry_time_utc: String,
    pub message_id: String,
    pub module_id: Option<String>,
    pub sequence_number: u64,
}

/// The answer to `DELETE /devices/{id}/commands`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PurgeResult {
    pub device_id: String,
    pub module_id: Option<String>,
    pub total_messages_purged: u64,
}

/// IoT Hub's `CloudToDeviceMethod` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodRequest {
    pub method_name: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(
        default,
        deserialize_with = "number_or_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub response_timeout_in_seconds: Option<u64>,
    #[serde(
        default,
        deserialize_with = "number_or_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect_timeout_in_seconds: Option<u64>,
}

/// A whole number of seconds, as a JSON number or a string of digits: clients that build the
/// body from strings (forms, shell scripts, some SDK samples) send `"30"`, which IoT Hub takes.
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("{n} is not a whole number of seconds"))),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{s:?} is not a whole number of seconds"))),
        Some(other) => Err(D::Error::custom(format!(
            "{other} is not a whole number of seconds"
        ))),
    }
}

/// What the device answered a method call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResponse {
    pub payload: Value,
    pub status: i32,
}

/// `PUT /certificates/{name}`: the PEM text, under `properties` as IoT Hub has it (a
/// top-level `certificate` is accepted too).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertificateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<CertificateRequestProperties>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertificateRequestProperties {
    #[serde(default)]
    pub certificate: Option<String>,
}

impl CertificateRequest {
    pub fn pem(&self) -> Option<&str> {
        self.properties
            .as_ref()
            .and_then(|p| p.certificate.as_deref())
            .or(self.certificate.as_deref())
    }
}

/// IoT Hub's certificate description.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateDescription {
    pub etag: String,
    pub name: String,
    pub properties: CertificateProperties,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateProperties {
    pub certificate: String,
    pub created: String,
    pub is_verified: bool,
    pub subject: String,
    pub thumbprint: String,
    pub updated: String,
}

impl From<CaCertificate> for CertificateDescription {
    fn from(c: CaCertificate) -> Self {
        Self {
            name: c.name,
            etag: c.etag,
            properties: CertificateProperties {
                subject: c.subject,
                thumbprint: c.thumbprint,
                // Registering proves nothing about possession; IoT Hub's proof-of-possession
                // step is not modelled, so every registered certificate counts as verified.
                is_verified: true,
                updated: c.created.clone(),
                created: c.created,
                certificate: c.certificate,
            },
        }
    }
}

/// `GET /certificates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateList {
    pub value: Vec<CertificateDescription>,
}

/// `POST /models`: what adding a DTDL document did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsAdded {
    /// The document's top-level interfaces, in document order.
    pub ids: Vec<String>,
    /// Interfaces these need that the repository does not hold yet.
    pub missing: Vec<String>,
    /// Of `ids`, those stored by this call (the others were there already).
    pub new: Vec<String>,
}

/// One entry of `GET /models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelSummary {
    pub created_date_time_utc: String,
    /// The interface's `displayName` as written (a string or a language map), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<Value>,
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrohub_hub::presence::PresenceEntry;
    use ferrohub_store::{Device, Module};

    fn live() -> Live {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        Live {
            presence: Some(PresenceEntry {
                connected: true,
                state_updated: t,
                last_activity: t,
            }),
            c2d_count: 3,
        }
    }

    /// The responses are byte for byte the store records with the overlay laid on them, which
    /// is what the API sent before it had types of its own (times never set shown as IoT
    /// Hub's `0001-01-01T00:00:00Z`).
    #[test]
    fn responses_are_the_records_with_the_overlay_byte_for_byte() -> Result<(), serde_json::Error> {
        let device = Device {
            device_id: "d1".into(),
            generation_id: "1".into(),
            etag: "e".into(),
            status_updated_time: Some("t0".into()),
            ..Default::default()
        };
        let stamp = timefmt::iso_system(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        );
        let mut old = device.clone();
        old.connection_state = ferrohub_store::ConnectionState::Connected;
        old.connection_state_updated_time = Some(stamp.clone());
        old.last_activity_time = Some(stamp.clone());
        old.cloud_to_device_message_count = 3;
        let new = DeviceResponse::from(LiveDevice {
            device,
            live: live(),
        });
        assert_eq!(serde_json::to_string(&new)?, serde_json::to_string(&old)?);

        let module = Module {
            module_id: "m1".into(),
            device_id: "d1".into(),
            ..Default::default()
        };
        let mut old = module.clone();
        old.connection_state_updated_time = Some(timefmt::NEVER.into());
        old.last_activity_time = Some(timefmt::NEVER.into());
        let new = ModuleResponse::from(LiveModule {
            module,
            live: Live::default(),
        });
        assert_eq!(serde_json::to_string(&new)?, serde_json::to_string(&old)?);
        Ok(())
    }

    /// The bodies that were built with `json!` keep its (sorted) key order.
    #[test]
    fn other_bodies_keep_sorted_keys() -> Result<(), serde_json::Error> {
        let sent = C2dSent {
            device_id: "d".into(),
            enqueued_time_utc: "a".into(),
            expiry_time_utc: "b".into(),
            message_id: "m".into(),
            module_id: None,
            sequence_number: 1,
        };
        let value = serde_json::to_value(&sent)?;
        assert_eq!(serde_json::to_string(&sent)?, value.to_string());
        let cert = CertificateDescription::from(CaCertificate {
            name: "n".into(),
            etag: "e".into(),
            certificate: "pem".into(),
            subject: "s".into(),
            thumbprint: "t".into(),
            created: "c".into(),
        });
        let value = serde_json::to_value(&cert)?;
        assert_eq!(serde_json::to_string(&cert)?, value.to_string());
        Ok(())
    }
}
