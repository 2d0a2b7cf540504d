//! Ferrohub storage: the records the hub keeps, one trait per concern (registry, access
//! policies, CA certificates, MQTT sessions), and the embedded SQLite engine behind them.
//!
//! The semantics layer only ever sees the traits, so a clustered implementation (PostgreSQL for
//! registry and sessions) can replace [`sqlite::SqliteStore`] without touching it.

pub mod model;
pub mod sqlite;
pub mod sqlite_telemetry;
pub mod telemetry;

use async_trait::async_trait;
pub use model::*;

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
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

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
    /// Deletes the device and its modules.
    async fn delete_device(&self, device_id: &str, if_match: IfMatch) -> Result<()>;
    /// Devices ordered by id, at most `top`.
    async fn list_devices(&self, top: usize) -> Result<Vec<Device>>;
    async fn count_devices(&self) -> Result<u64>;

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

/// Everything the hub needs from storage, as one handle.
pub trait Store: RegistryStore + PolicyStore + CertificateStore + SessionStore {}
impl<T: RegistryStore + PolicyStore + CertificateStore + SessionStore> Store for T {}
