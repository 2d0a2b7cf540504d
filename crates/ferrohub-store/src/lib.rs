//! Ferrohub storage: the records the hub keeps and one trait per concern (registry, access
//! policies, CA certificates, MQTT sessions, cloud-to-device queues and feedback, twins, and
//! the scans queries run over them, configurations, jobs, IoT Plug and Play models, device
//! provisioning),
//! independent of any engine.
//!
//! The semantics layer only ever sees the traits, so an engine (the embedded SQLite one in
//! `ferrohub-sqlite`, a clustered one later) can be swapped without touching it. The traits
//! therefore ask only for what a networked store can do too: no caller code runs inside the
//! store (twins are a versioned read plus a conditional write). [`MemoryStore`] is the
//! in-memory engine; the `testsuite` feature holds every engine to the same behaviour.

pub mod configurations;
pub mod jobs;
pub mod memory;
pub mod model;
pub mod models;
pub mod provisioning;
pub mod query;
pub mod routing;
pub mod telemetry;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;
mod timestamp;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
pub use configurations::{ConfigurationStore, StoredConfiguration};
pub use jobs::{JobStore, StoredDeviceJob, StoredJob};
pub use memory::{MemoryStore, MemoryStreams, MemoryTelemetry};
pub use model::*;
pub use models::{ModelStore, StoredModel};
pub use provisioning::{ProvisioningKind, ProvisioningStore, StoredProvisioning};
pub use query::{QueryStore, TwinRow, TwinScan};
pub use routing::{RoutingStore, StoredRouting, StreamEngine};
pub use timestamp::Timestamp;

/// What can go wrong in a store call. The variants that carry meaning for callers (not found,
/// exists, etag mismatch) are separate from engine failures so the API can map them to IoT Hub
/// error codes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("etag does not match")]
    PreconditionFailed,
    /// The engine failed; its own error is the source (a SQLite crate's, a network client's).
    #[error("storage backend error: {0}")]
    Backend(#[source] BoxError),
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A cloud-to-device queue is at its depth limit.
    #[error("queue is full")]
    QueueFull,
    /// A lock token is unknown or its lock has expired.
    #[error("lock lost")]
    LockLost,
    /// The storage has no room for the write (a full disk or quota); nothing was written. It
    /// passes: writes succeed again once space is freed, without a restart.
    #[error("storage is full: {0}")]
    Full(#[source] BoxError),
    /// A conditional write found the record changed (or created, or gone) since it was read;
    /// nothing was written. The caller reads again and retries.
    #[error("the record changed since it was read")]
    VersionMismatch,
}

/// An engine's error, carried untouched so callers can downcast it when they must.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub type Result<T> = std::result::Result<T, StoreError>;

/// `If-Match` as IoT Hub reads it: absent or `*` match anything, otherwise the etag must equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    Any,
    Etag(String),
}

impl IfMatch {
    /// Parses an `If-Match` header value; quotes around the etag are optional (the Python service
    /// SDK sends them, the CLI may not).
    pub fn from_header(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") | Some("*") | Some("\"*\"") => IfMatch::Any,
            Some(v) => IfMatch::Etag(v.trim_matches('"').to_string()),
        }
    }

    pub fn matches(&self, etag: &str) -> bool {
        match self {
            IfMatch::Any => true,
            IfMatch::Etag(e) => e == etag,
        }
    }
}

/// Devices and modules: the identity registry.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Fails with [`StoreError::AlreadyExists`]. Assigns the etag.
    async fn create_device(&self, device: Device) -> Result<Device>;
    async fn get_device(&self, device_id: &str) -> Result<Option<Device>>;
    /// Replaces the stored record if `if_match` fits; assigns a new etag.
    async fn update_device(&self, device: Device, if_match: IfMatch) -> Result<Device>;
    /// Deletes the device and its modules, with their twins and cloud-to-device queues (queued
    /// messages go without feedback, as in IoT Hub).
    async fn delete_device(&self, device_id: &str, if_match: IfMatch) -> Result<()>;
    /// Devices ordered by id, at most `top`.
    async fn list_devices(&self, top: usize) -> Result<Vec<Device>>;
    async fn count_devices(&self) -> Result<u64>;
    /// Devices whose status is `disabled`, counted by the engine (registry statistics must
    /// not load every record).
    async fn count_disabled_devices(&self) -> Result<u64>;

    /// Fails with [`StoreError::NotFound`] when the device does not exist.
    async fn create_module(&self, module: Module) -> Result<Module>;
    async fn get_module(&self, device_id: &str, module_id: &str) -> Result<Option<Module>>;
    async fn update_module(&self, module: Module, if_match: IfMatch) -> Result<Module>;
    async fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: IfMatch,
    ) -> Result<()>;
    async fn list_modules(&self, device_id: &str) -> Result<Vec<Module>>;
}

/// The hub's shared access policies (`iothubowner`, `service`, ...).
#[async_trait]
pub trait PolicyStore: Send + Sync + 'static {
    async fn get_policy(&self, name: &str) -> Result<Option<AccessPolicy>>;
    async fn list_policies(&self) -> Result<Vec<AccessPolicy>>;
    /// Inserts the policy unless one of that name exists; returns the stored one.
    async fn ensure_policy(&self, policy: AccessPolicy) -> Result<AccessPolicy>;
}

/// CA certificates that devices' X.509 certificates may chain to.
#[async_trait]
pub trait CertificateStore: Send + Sync + 'static {
    async fn put_certificate(
        &self,
        cert: CaCertificate,
        if_match: IfMatch,
    ) -> Result<CaCertificate>;
    async fn get_certificate(&self, name: &str) -> Result<Option<CaCertificate>>;
    async fn list_certificates(&self) -> Result<Vec<CaCertificate>>;
    async fn delete_certificate(&self, name: &str, if_match: IfMatch) -> Result<()>;
}

/// Persistent MQTT sessions (CleanSession=0): what must survive reconnects and restarts.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    async fn load_session(&self, client_key: &str) -> Result<Option<StoredSession>>;
    /// Durable when it returns: a SUBACK is sent only after this.
    async fn save_session(&self, client_key: &str, session: &StoredSession) -> Result<()>;
    async fn delete_session(&self, client_key: &str) -> Result<()>;
}

/// Cloud-to-device queues (one per device and per module) and the feedback they produce.
///
/// Identities are `(device_id, module_id)`; `module_id` is `None` for a device's own queue.
/// Every write is durable when it returns.
#[async_trait]
pub trait C2dStore: Send + Sync + 'static {
    /// Appends `msg` to its identity's queue, assigning `sequence_number` (per queue, increasing,
    /// never reused, also after the queue empties or the process restarts). Fails with
    /// [`StoreError::QueueFull`] when the queue already holds `max_depth` messages.
    async fn c2d_enqueue(&self, msg: C2dMessage, max_depth: usize) -> Result<C2dMessage>;
    /// Up to `limit` queued messages with `sequence_number > after`, oldest first, expired ones
    /// included (the caller settles them).
    async fn c2d_peek(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>>;
    /// Counts one more delivery attempt for every message still queued up to and including
    /// `up_to` (the ones a connection was handed and did not acknowledge); returns how many.
    async fn c2d_count_deliveries(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        up_to: u64,
    ) -> Result<u64>;
    /// Removes the message as `status`, and in the same transaction records feedback when its
    /// `ack` asks for that status. Returns the removed message, `None` if it was already gone.
    async fn c2d_settle(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        sequence_number: u64,
        status: FeedbackStatus,
        now: Timestamp,
    ) -> Result<Option<C2dMessage>>;
    async fn c2d_count(&self, device_id: &str, module_id: Option<&str>) -> Result<u64>;
    /// The depth of each listed device's own queue (not its modules'), in one round trip: a
    /// device list shows many. Every id asked for is a key, with 0 for an empty queue.
    async fn c2d_counts(&self, device_ids: &[&str]) -> Result<HashMap<String, u64>>;
    /// Settles every queued message as `Purged`; returns how many there were.
    async fn c2d_purge(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        now: Timestamp,
    ) -> Result<u64>;
    /// Settles up to `limit` messages (any queue) whose expiry is at or before `now` as
    /// `Expired`, earliest expiry first; returns the identities whose queues changed.
    async fn c2d_expire(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(String, Option<String>)>>;
    /// The earliest expiry among all queued messages.
    async fn c2d_next_expiry(&self) -> Result<Option<Timestamp>>;

    /// Locks up to `max` feedback records not under a live lock for `lock` and returns them,
    /// oldest first, with a new lock token; `None` when there are none.
    async fn feedback_receive(
        &self,
        now: Timestamp,
        lock: Duration,
        max: usize,
    ) -> Result<Option<FeedbackBatch>>;
    /// Deletes the records of a live lock. [`StoreError::LockLost`] if the token is unknown or
    /// its lock expired.
    async fn feedback_complete(&self, lock_token: &str, now: Timestamp) -> Result<()>;
    /// Releases a live lock so the records can be received again. Same errors as complete.
    async fn feedback_abandon(&self, lock_token: &str, now: Timestamp) -> Result<()>;
}

/// A stored twin document and the version the store gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedTwin {
    pub doc: String,
    /// Changes with every successful [`TwinStore::put_twin`]; the token for the next one.
    pub version: u64,
}

/// Device and module twins, stored as opaque JSON documents: twin semantics (versions,
/// metadata, merge rules) belong to the hub, the store only offers a read and a conditional
/// write. A read-modify-write is read, compute, `put_twin` with the version read, and again on
/// [`StoreError::VersionMismatch`]: a shape any engine can offer (an `UPDATE ... WHERE
/// version = $v`, a compare-and-swap), unlike running caller code inside the store.
#[async_trait]
pub trait TwinStore: Send + Sync + 'static {
    async fn get_twin(
        &self,
        device_id: &str,
        module_id: Option<&str>,
    ) -> Result<Option<VersionedTwin>>;
    /// `doc` is JSON as `serde_json` writes it; an engine may rely on that escaping to search
    /// the text (a scan looks for a string's JSON form before it parses a document).
    /// Stores `doc` durably if the twin is still as the caller read it: `expected = None` only
    /// if the identity has no twin, `Some(v)` only if its stored version is `v`. Returns the new
    /// version; [`StoreError::VersionMismatch`] (nothing written) otherwise.
    async fn put_twin(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        doc: String,
        expected: Option<u64>,
    ) -> Result<u64>;
}

/// Everything the hub needs from storage, as one handle.
pub trait Store:
    RegistryStore
    + PolicyStore
    + CertificateStore
    + SessionStore
    + C2dStore
    + TwinStore
    + QueryStore
    + ConfigurationStore
    + JobStore
    + ModelStore
    + ProvisioningStore
    + RoutingStore
{
}
impl<
        T: RegistryStore
            + PolicyStore
            + CertificateStore
            + SessionStore
            + C2dStore
            + TwinStore
            + QueryStore
            + ConfigurationStore
            + JobStore
            + ModelStore
            + ProvisioningStore
            + RoutingStore,
    > Store for T
{
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_header_forms() {
        assert_eq!(IfMatch::from_header(None), IfMatch::Any);
        assert_eq!(IfMatch::from_header(Some("\"*\"")), IfMatch::Any);
        assert_eq!(
            IfMatch::from_header(Some("\"MQ==\"")),
            IfMatch::Etag("MQ==".into())
        );
    }
}
