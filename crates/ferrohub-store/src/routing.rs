//! Message routing as the store keeps it: the hub's routing configuration (endpoints, routes,
//! enrichments, the fallback flag) as one versioned document, and the durable event streams of
//! custom endpoints. What a route means (conditions, which endpoints a message reaches) belongs
//! to the hub; the store only keeps it.
//!
//! One document rather than a table per kind: the configuration is small (IoT Hub allows 100
//! routes and 10 custom endpoints of a type), every change must be checked against the whole
//! (a route naming an unknown endpoint, an endpoint still in use), and a versioned write lets
//! several writers (nodes, later) make those checks without a lock of their own.

use std::sync::Arc;

use async_trait::async_trait;

use crate::telemetry::TelemetryLog;
use crate::Result;

/// The routing configuration as the hub wrote it (opaque JSON) and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRouting {
    pub doc: String,
    /// Starts at 1 with the first write; 0 means nothing was ever written.
    pub version: u64,
}

/// The routing document. Writes are durable when they return.
#[async_trait]
pub trait RoutingStore: Send + Sync + 'static {
    /// The stored document, `None` until one is written.
    async fn load_routing(&self) -> Result<Option<StoredRouting>>;
    /// Writes `doc` if the stored version is still `expected` (0: none stored), else
    /// [`crate::StoreError::VersionMismatch`] and nothing is written. Returns the new version.
    async fn save_routing(&self, doc: String, expected: u64) -> Result<u64>;
}

/// Checks a stream name before an engine makes a path of it. The hub validates names; this
/// keeps a path out of the streams directory even if it did not. A `.` inside (never first) is
/// the hub's own: dead-letter streams, `NAME.deadletter`.
pub fn check_stream_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(crate::StoreError::Task(format!(
            "invalid stream name {name:?}"
        )));
    }
    Ok(())
}

/// Opens the durable streams of custom endpoints. Each is a [`TelemetryLog`] of its own (its
/// own partitions, sequence numbers, checkpoints and retention), so readers treat it exactly
/// like the built-in stream.
pub trait StreamEngine: Send + Sync + 'static {
    /// Opens the stream called `name`, creating it with `partitions` partitions if it does not
    /// exist (an existing stream keeps its partition count). `name` is already validated
    /// (letters, digits, `-`, `_`, and a `.` inside for the hub's dead-letter streams,
    /// `NAME.deadletter`).
    fn open_stream(&self, name: &str, partitions: u32) -> Result<Arc<dyn TelemetryLog>>;
    /// Deletes the stream and everything in it; nothing happens if it does not exist.
    fn remove_stream(&self, name: &str) -> Result<()>;
}
