//! The records the store keeps, in the JSON shape of the IoT Hub service API so that one type
//! serves storage, the REST API and the CLI.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ConnectionState {
    #[default]
    Disconnected,
    Connected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum AuthType {
    #[default]
    Sas,
    SelfSigned,
    CertificateAuthority,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    #[serde(default)]
    pub primary_key: Option<String>,
    #[serde(default)]
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(default)]
    pub symmetric_key: SymmetricKey,
    #[serde(default)]
    pub x509_thumbprint: X509Thumbprint,
    #[serde(default, rename = "type")]
    pub auth_type: AuthType,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

/// A device identity (IoT Hub `Device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Device {
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

/// A module identity on a device (IoT Hub `Module`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Module {
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

/// Rights a shared access policy grants, as IoT Hub names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Rights {
    pub registry_read: bool,
    pub registry_write: bool,
    pub service_connect: bool,
    pub device_connect: bool,
    /// The device provisioning service's rights (DPS's `EnrollmentRead`/`EnrollmentWrite`,
    /// which also cover registrations). Absent in policies stored before provisioning existed.
    #[serde(default)]
    pub enrollment_read: bool,
    #[serde(default)]
    pub enrollment_write: bool,
}

impl Rights {
    pub const ALL: Rights = Rights {
        registry_read: true,
        registry_write: true,
        service_connect: true,
        device_connect: true,
        enrollment_read: true,
        enrollment_write: true,
    };
}

/// A hub-level shared access policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Rights,
}

/// A CA certificate trusted for CA-signed X.509 devices (IoT Hub `/certificates/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    pub name: String,
    #[serde(default)]
    pub etag: String,
    /// PEM text of the certificate.
    pub certificate: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub thumbprint: String,
    #[serde(default)]
    pub created: String,
}

/// One subscription of a persistent session: the filter as the client sent it and the QoS granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub filter: String,
    pub qos: u8,
}

/// The part of a CleanSession=0 MQTT session that outlives the connection and the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StoredSession {
    pub subscriptions: Vec<StoredSubscription>,
}

/// What feedback a cloud-to-device message asks for (`iothub-ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FeedbackRequest {
    #[default]
    None,
    /// Feedback when the device completes the message.
    Positive,
    /// Feedback when the message expires, runs out of deliveries or is purged/rejected.
    Negative,
    /// Both.
    Full,
}

impl FeedbackRequest {
    /// Whether a message settled with `status` produces a feedback record.
    pub fn wants(self, status: FeedbackStatus) -> bool {
        match self {
            FeedbackRequest::None => false,
            FeedbackRequest::Full => true,
            FeedbackRequest::Positive => status == FeedbackStatus::Success,
            FeedbackRequest::Negative => status != FeedbackStatus::Success,
        }
    }
}

/// How a cloud-to-device message left its queue (IoT Hub feedback `statusCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedbackStatus {
    Success,
    Expired,
    DeliveryCountExceeded,
    Rejected,
    Purged,
}

impl FeedbackStatus {
    /// IoT Hub's `description` text for the status.
    pub fn description(self) -> &'static str {
        match self {
            FeedbackStatus::Success => "Success",
            FeedbackStatus::Expired => "Message expired",
            FeedbackStatus::DeliveryCountExceeded => "Message delivery count exceeded",
            FeedbackStatus::Rejected => "Message rejected",
            FeedbackStatus::Purged => "Message purged",
        }
    }
}

/// A cloud-to-device message in a device's (or module's) queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct C2dMessage {
    pub device_id: String,
    #[serde(default)]
    pub module_id: Option<String>,
    /// The device's generationId when the message was sent (feedback carries it).
    #[serde(default)]
    pub device_generation_id: String,
    /// Assigned by the store on enqueue: per queue, increasing, never reused.
    #[serde(default)]
    pub sequence_number: u64,
    pub message_id: String,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub content_encoding: Option<String>,
    #[serde(default)]
    pub ack: FeedbackRequest,
    /// Unix milliseconds.
    pub enqueued_time_ms: i64,
    /// Unix milliseconds; at or past it the message is dead-lettered as Expired.
    pub expiry_time_ms: i64,
    /// Delivery attempts so far.
    #[serde(default)]
    pub delivery_count: u32,
    /// Application properties in send order; `None` is a null value (sent as a bare key).
    #[serde(default)]
    pub properties: Vec<(String, Option<String>)>,
    #[serde(default)]
    pub payload: Vec<u8>,
}

impl C2dMessage {
    pub fn enqueued_time(&self) -> crate::Timestamp {
        crate::Timestamp::from_unix_ms(self.enqueued_time_ms)
    }

    pub fn expiry_time(&self) -> crate::Timestamp {
        crate::Timestamp::from_unix_ms(self.expiry_time_ms)
    }
}

/// A feedback record (IoT Hub's feedback batch entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    pub original_message_id: String,
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    pub device_generation_id: String,
    pub status_code: FeedbackStatus,
    pub description: String,
    /// RFC 3339 UTC time the feedback was produced.
    pub enqueued_time_utc: String,
}

/// Feedback records handed to one receiver under a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackBatch {
    pub lock_token: String,
    pub records: Vec<FeedbackRecord>,
}
