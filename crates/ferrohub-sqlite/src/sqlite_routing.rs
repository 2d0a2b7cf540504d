//! [`RoutingStore`] for [`SqliteStore`] (the one-row `routing` table, schema in `sqlite.rs`)
//! and [`StreamEngine`] on SQLite: each custom endpoint's stream is a [`SqliteTelemetry`] log in
//! `streams/NAME.db`, a file of its own so that its appends, group commits and retention never
//! contend with the built-in stream's or with another endpoint's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use crate::sqlite::SqliteStore;
use crate::sqlite_telemetry::SqliteTelemetry;
use ferrohub_store::telemetry::TelemetryLog;
use ferrohub_store::{Result, RoutingStore, StoreError, StoredRouting, StreamEngine};

/// The directory, under the data directory, of the custom endpoints' streams.
pub const STREAMS_DIR: &str = "streams";

#[async_trait]
impl RoutingStore for SqliteStore {
    async fn load_routing(&self) -> Result<Option<StoredRouting>> {
        self.read(|conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached("SELECT version, doc FROM routing WHERE id = 1")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(row.map(|(version, doc)| StoredRouting {
                doc,
                version: u64::try_from(version).unwrap_or(0),
            }))
        })
        .await
    }

    async fn save_routing(&self, doc: String, expected: u64) -> Result<u64> {
        // One job of the group-commit writer: the version check and the write see no other
        // write in between.
        self.write(move |conn| {
            let current: i64 = conn
                .prepare_cached("SELECT version FROM routing WHERE id = 1")?
                .query_row([], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            if u64::try_from(current).ok() != Some(expected) {
                return Err(StoreError::VersionMismatch.into());
            }
            let next = current + 1;
            conn.prepare_cached(
                "INSERT OR REPLACE INTO routing (id, version, doc) VALUES (1, ?1, ?2)",
            )?
            .execute(params![next, doc])?;
            Ok(u64::try_from(next).unwrap_or(0))
        })
        .await
    }
}

/// Custom endpoint streams as SQLite files in `DATA_DIR/streams/`.
#[derive(Debug, Clone)]
pub struct SqliteStreams {
    dir: PathBuf,
}

impl SqliteStreams {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(STREAMS_DIR),
        }
    }

    fn file(&self, name: &str) -> Result<PathBuf> {
        ferrohub_store::routing::check_stream_name(name)?;
        Ok(self.dir.join(format!("{name}.db")))
    }
}

impl StreamEngine for SqliteStreams {
    fn open_stream(&self, name: &str, partitions: u32) -> Result<Arc<dyn TelemetryLog>> {
        Ok(Arc::new(SqliteTelemetry::open_file(
            &self.file(name)?,
            partitions,
        )?))
    }

    fn remove_stream(&self, name: &str) -> Result<()> {
        let file = self.file(name)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut path = file.clone().into_os_string();
            path.push(suffix);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
