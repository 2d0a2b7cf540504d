//! The telemetry event stream: what a durable, partitioned device-to-cloud log must offer,
//! independent of the engine behind it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{Result, Timestamp};

/// A message to append. The store chooses the partition (from the device id) and assigns the
/// sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub device_id: String,
    pub module_id: Option<String>,
    /// Milliseconds since the Unix epoch when the hub accepted the message.
    pub enqueued_ms: i64,
    pub system_properties: BTreeMap<String, String>,
    pub properties: Vec<(String, Option<String>)>,
    pub body: Vec<u8>,
}

impl NewEvent {
    pub fn enqueued_time(&self) -> Timestamp {
        Timestamp::from_unix_ms(self.enqueued_ms)
    }
}

/// A stored message, as readers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub partition: u32,
    /// Position in its partition: strictly increasing, never reused.
    pub sequence: u64,
    pub event: NewEvent,
}

/// Where a reader starts in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest retained message.
    Start,
    /// Only messages appended from now on.
    End,
    /// The first message with this sequence number or later.
    Sequence(u64),
    /// The first message enqueued at or after this time (ms since the epoch).
    EnqueuedAt(i64),
}

/// Retention limits applied in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages older than this are removed.
    pub max_age_ms: i64,
    /// When the log's file is larger than this, the oldest messages are removed first.
    pub max_bytes: u64,
}

/// The partition of a device's messages. FNV-1a: stable across builds, platforms and engines,
/// so a device keeps its partition.
pub fn partition_for(device_id: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in device_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// Resolves once an enqueued message is on disk, with its (partition, sequence).
pub type Durable = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(u32, u64)>> + Send>>;

/// A durable, partitioned, append-only log of device-to-cloud messages with consumer-group
/// checkpoints.
#[async_trait]
pub trait TelemetryLog: Send + Sync + 'static {
    /// Puts one message in the log's order and returns a future that resolves once it is on
    /// disk. Messages enqueued one after another by a caller are stored in that order; this
    /// call waits while the log's queue is full (backpressure). Appends from many callers share
    /// one sync (group commit).
    async fn enqueue(&self, event: NewEvent) -> Result<Durable>;

    /// Enqueues and waits until the message is on disk. Returns (partition, sequence).
    async fn append(&self, event: NewEvent) -> Result<(u32, u64)> {
        self.enqueue(event).await?.await
    }

    fn partition_count(&self) -> u32;

    /// The partition a device's messages go to.
    fn partition_of(&self, device_id: &str) -> u32;

    /// Up to `max` messages of `partition` with sequence >= `from`, in order.
    async fn read(&self, partition: u32, from: u64, max: usize) -> Result<Vec<EventRecord>>;

    /// The first sequence number `position` denotes in `partition`.
    async fn resolve(&self, partition: u32, position: StartPosition) -> Result<u64>;

    /// A receiver that changes after every commit, for live tailing without polling.
    fn watch_commits(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The next sequence to read per partition, as last saved for `group`.
    async fn checkpoints(&self, group: &str) -> Result<BTreeMap<u32, u64>>;

    async fn save_checkpoint(&self, group: &str, partition: u32, next_sequence: u64) -> Result<()>;

    /// Removes what `retention` says is expired; returns how many messages went.
    async fn enforce_retention(&self, retention: Retention, now: Timestamp) -> Result<u64>;
}
