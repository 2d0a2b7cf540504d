//! Device provisioning (DPS) records as the store keeps them: individual enrollments,
//! enrollment groups and registrations, each an opaque JSON document under its id with an etag,
//! and the service's ID scope. What they mean (attestation, allocation, the device it
//! provisions) is the hub's (`ferrohub-hub/src/provisioning.rs`).

use async_trait::async_trait;

use crate::{IfMatch, Result};

/// Which collection a provisioning record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProvisioningKind {
    Enrollment,
    EnrollmentGroup,
    Registration,
}

impl ProvisioningKind {
    /// The name an engine stores it under (the SQLite `provisioning.kind` column).
    pub fn as_str(&self) -> &'static str {
        match self {
            ProvisioningKind::Enrollment => "enrollment",
            ProvisioningKind::EnrollmentGroup => "enrollmentGroup",
            ProvisioningKind::Registration => "registration",
        }
    }
}

/// One record with the etag the store gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProvisioning {
    pub kind: ProvisioningKind,
    pub id: String,
    pub doc: String,
    /// Changes with every write; `If-Match` compares against it.
    pub etag: String,
}

/// Enrollments, enrollment groups and registrations. Every write is durable when it returns.
#[async_trait]
pub trait ProvisioningStore: Send + Sync + 'static {
    /// Creates the record (when absent and `if_match` is [`IfMatch::Any`]) or replaces it (when
    /// present and `if_match` fits), assigning a new etag. [`crate::StoreError::NotFound`] for
    /// an etag on an absent record, [`crate::StoreError::PreconditionFailed`] for a mismatch.
    async fn put_provisioning(
        &self,
        kind: ProvisioningKind,
        id: &str,
        doc: String,
        if_match: IfMatch,
    ) -> Result<StoredProvisioning>;
    async fn get_provisioning(
        &self,
        kind: ProvisioningKind,
        id: &str,
    ) -> Result<Option<StoredProvisioning>>;
    /// [`crate::StoreError::NotFound`] when absent, `PreconditionFailed` on an etag mismatch.
    async fn delete_provisioning(
        &self,
        kind: ProvisioningKind,
        id: &str,
        if_match: IfMatch,
    ) -> Result<()>;
    /// Records of `kind` ordered by id, after `after`, at most `limit`.
    async fn list_provisioning(
        &self,
        kind: ProvisioningKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredProvisioning>>;
    /// The provisioning service's ID scope: the stored one, else `candidate`, stored first
    /// (so a scope generated on first start survives restarts).
    async fn ensure_id_scope(&self, candidate: String) -> Result<String>;
}
