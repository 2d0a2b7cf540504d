//! IoT Plug and Play models (DTDL interfaces) as the store keeps them: one document per model
//! id, immutable once stored (a DTMI names one version). What a document means (parsing,
//! resolution) belongs to the hub and `ferrohub-dtdl`.

use async_trait::async_trait;

use crate::{Result, Timestamp};

/// A stored model: its DTMI, the interface document as the hub wrote it (canonical JSON) and
/// when it was first stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredModel {
    pub id: String,
    pub doc: String,
    pub created: Timestamp,
}

/// The model repository. Every write is durable when it returns.
#[async_trait]
pub trait ModelStore: Send + Sync + 'static {
    /// Stores `doc` under `id`. The same document again returns the stored record unchanged
    /// (an upload may be repeated); another document under a stored id is
    /// [`crate::StoreError::AlreadyExists`] and writes nothing.
    async fn put_model(&self, id: &str, doc: String, created: Timestamp) -> Result<StoredModel>;
    async fn get_model(&self, id: &str) -> Result<Option<StoredModel>>;
    /// Every model, ordered by id.
    async fn list_models(&self) -> Result<Vec<StoredModel>>;
    /// [`crate::StoreError::NotFound`] when no model has this id.
    async fn delete_model(&self, id: &str) -> Result<()>;
}
