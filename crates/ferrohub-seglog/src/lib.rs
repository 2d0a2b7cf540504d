//! Ferrohub's telemetry engine: the [`TelemetryLog`](ferrohub_store::telemetry::TelemetryLog)
//! and [`StreamEngine`](ferrohub_store::StreamEngine) on append-only, checksummed segment
//! files, written by one thread that commits in groups with one `fdatasync` per batch.
//!
//! `record` is the on-disk record format, `files` the small atomically replaced side files,
//! `log` the log itself and `streams` the custom endpoints' streams.

mod error;
mod files;
mod log;
pub mod record;
mod streams;

pub use error::SegError;
pub use log::{Options, SegmentLog};
pub use streams::{SegmentStreams, STREAMS_DIR};

/// The directory of the built-in stream's log under the data directory.
pub const TELEMETRY_DIR: &str = "telemetry";

#[cfg(test)]
mod tests;
