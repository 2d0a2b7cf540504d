//! Ferrohub's embedded storage engine: every `ferrohub-store` trait on SQLite files in the data
//! directory (`ferrohub.db` for the registry, queues, twins and routing, `telemetry.db` for the event
//! log, `streams/NAME.db` for each custom endpoint's stream).
//!
//! Engine-specific machinery (group-commit writers, WAL checkpoints, schema migrations) stays in
//! this crate; the hub only sees the traits.

mod error;
#[cfg(test)]
mod faulty_vfs;
pub mod metrics;
mod sqlite;
mod sqlite_c2d;
mod sqlite_configurations;
mod sqlite_jobs;
mod sqlite_models;
mod sqlite_provisioning;
mod sqlite_query;
mod sqlite_routing;
mod sqlite_telemetry;
mod sqlite_twin_index;
mod sqlite_twins;
mod sqlite_writer;

pub use ferrohub_store::telemetry::partition_for;
pub use sqlite::{SqliteStore, DB_FILE};
pub use sqlite_routing::{SqliteStreams, STREAMS_DIR};
pub use sqlite_telemetry::{SqliteTelemetry, TELEMETRY_DB_FILE};
