//! Jobs (`/jobs/v2`) and the per-device rows they leave, as the store keeps them: opaque JSON
//! documents under their keys. What a job means (statuses, statistics, when it runs) is the
//! hub's (`ferrohub-hub/src/jobs.rs`); an engine only stores, reads and walks them in key order.

use async_trait::async_trait;

use crate::Result;

/// A job's document under its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    pub job_id: String,
    pub doc: String,
}

/// What one job did (or is doing) to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDeviceJob {
    pub job_id: String,
    pub device_id: String,
    pub doc: String,
}

/// Jobs and their device rows. Every write is durable when it returns: the hub records a
/// device's row before it acts on the device, and relies on that to never act twice.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Fails with [`crate::StoreError::AlreadyExists`] when the id is taken.
    async fn create_job(&self, job: StoredJob) -> Result<()>;
    async fn get_job(&self, job_id: &str) -> Result<Option<StoredJob>>;
    /// Replaces a job's document; [`crate::StoreError::NotFound`] when there is none.
    async fn update_job(&self, job: StoredJob) -> Result<()>;
    /// Jobs ordered by id, after `after`, at most `limit`.
    async fn list_jobs(&self, after: Option<&str>, limit: usize) -> Result<Vec<StoredJob>>;
    /// Inserts or replaces the rows of their `(job_id, device_id)`, all in one durable commit
    /// (all or none): a runner claims and settles devices in groups, and one commit per
    /// device bound a job's rate by commit latency.
    async fn put_device_jobs(&self, rows: Vec<StoredDeviceJob>) -> Result<()>;
    async fn get_device_job(
        &self,
        job_id: &str,
        device_id: &str,
    ) -> Result<Option<StoredDeviceJob>>;
    /// Rows in `(job_id, device_id)` order after `after`, at most `limit`; only `job_id`'s
    /// when given.
    async fn scan_device_jobs(
        &self,
        job_id: Option<&str>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StoredDeviceJob>>;
}
