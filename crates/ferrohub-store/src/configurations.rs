//! Configurations (IoT Hub's automatic device management) as the store keeps them: the
//! configuration documents with their etags, and which configuration was last applied to each
//! device. What a configuration means (conditions, priorities, content) belongs to the hub.

use async_trait::async_trait;

use crate::{IfMatch, Result};

/// A stored configuration: its document as the hub wrote it (opaque JSON, without the etag)
/// and the etag the store gave this version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConfiguration {
    pub id: String,
    pub doc: String,
    pub etag: String,
}

/// Configurations and the record of what was applied where. Every write is durable when it
/// returns.
#[async_trait]
pub trait ConfigurationStore: Send + Sync + 'static {
    /// `if_match = None` creates: [`crate::StoreError::AlreadyExists`] if `id` exists.
    /// `Some` updates: [`crate::StoreError::NotFound`] if it does not exist,
    /// [`crate::StoreError::PreconditionFailed`] if the etag is stale. Assigns a new etag.
    async fn put_configuration(
        &self,
        id: &str,
        doc: String,
        if_match: Option<IfMatch>,
    ) -> Result<StoredConfiguration>;
    async fn get_configuration(&self, id: &str) -> Result<Option<StoredConfiguration>>;
    /// Configurations ordered by id, at most `top`.
    async fn list_configurations(&self, top: usize) -> Result<Vec<StoredConfiguration>>;
    /// Deletes the configuration and every record of it being applied.
    async fn delete_configuration(&self, id: &str, if_match: IfMatch) -> Result<()>;
    /// Records that `config_id` is the configuration applied to the device, replacing the
    /// earlier one. A device's record goes with the device.
    async fn mark_applied(&self, device_id: &str, config_id: &str) -> Result<()>;
    /// Forgets what was applied to the device: it left every configuration's target. A
    /// device with no record is no error.
    async fn clear_applied(&self, device_id: &str) -> Result<()>;
    /// The configuration last applied to the device, if any.
    async fn applied_configuration(&self, device_id: &str) -> Result<Option<String>>;
    /// How many devices have `config_id` as their applied configuration.
    async fn count_applied(&self, config_id: &str) -> Result<u64>;
}
