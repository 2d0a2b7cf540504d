//! Which engine holds each telemetry log (the built-in stream and every custom endpoint
//! stream): the configured engine for a log created now, the engine it was created with for a
//! log that already exists, so switching `--telemetry-engine` never hides a log's events and
//! needs no migration step.

use std::path::Path;
use std::sync::Arc;

use ferrohub_seglog::{SegmentLog, SegmentStreams, TELEMETRY_DIR};
use ferrohub_sqlite::{SqliteStreams, SqliteTelemetry, TELEMETRY_DB_FILE};
use ferrohub_store::telemetry::TelemetryLog;
use ferrohub_store::{Result, StreamEngine};

use crate::config::TelemetryEngine;

/// The engine that holds (or will hold) a log whose segment directory is `seg_dir` and whose
/// SQLite file is `db`.
fn engine_of(seg_dir: &Path, db: &Path, configured: TelemetryEngine) -> TelemetryEngine {
    match (seg_dir.join("meta").exists(), db.exists()) {
        (true, false) => TelemetryEngine::Segment,
        (false, true) => TelemetryEngine::Sqlite,
        (true, true) => {
            tracing::warn!(
                segment = %seg_dir.display(),
                sqlite = %db.display(),
                engine = ?configured,
                "a telemetry log exists for both engines; using the configured one"
            );
            configured
        }
        (false, false) => configured,
    }
}

/// The built-in stream's log in `data_dir`.
pub fn open_telemetry(
    data_dir: &Path,
    partitions: u32,
    configured: TelemetryEngine,
) -> Result<Arc<dyn TelemetryLog>> {
    let seg_dir = data_dir.join(TELEMETRY_DIR);
    let db = data_dir.join(TELEMETRY_DB_FILE);
    let engine = engine_of(&seg_dir, &db, configured);
    if engine != configured {
        tracing::info!(
            path = %db.display(),
            engine = ?engine,
            "telemetry stays in the engine this data directory was created with"
        );
    }
    Ok(match engine {
        TelemetryEngine::Segment => Arc::new(SegmentLog::open(&seg_dir, partitions)?),
        TelemetryEngine::Sqlite => Arc::new(SqliteTelemetry::open(data_dir, partitions)?),
    })
}

/// Custom endpoint streams, each in the engine it was created with.
pub struct EngineStreams {
    segment: SegmentStreams,
    sqlite: SqliteStreams,
    streams_dir: std::path::PathBuf,
    configured: TelemetryEngine,
}

impl EngineStreams {
    pub fn new(data_dir: &Path, configured: TelemetryEngine) -> Self {
        Self {
            segment: SegmentStreams::new(data_dir),
            sqlite: SqliteStreams::new(data_dir),
            streams_dir: data_dir.join(ferrohub_seglog::STREAMS_DIR),
            configured,
        }
    }
}

impl StreamEngine for EngineStreams {
    fn open_stream(&self, name: &str, partitions: u32) -> Result<Arc<dyn TelemetryLog>> {
        // Validates the name before any path is built from it.
        let seg_dir = self.segment.stream_dir(name)?;
        let db = self.streams_dir.join(format!("{name}.db"));
        match engine_of(&seg_dir, &db, self.configured) {
            TelemetryEngine::Segment => self.segment.open_stream(name, partitions),
            TelemetryEngine::Sqlite => self.sqlite.open_stream(name, partitions),
        }
    }

    fn remove_stream(&self, name: &str) -> Result<()> {
        self.segment.remove_stream(name)?;
        self.sqlite.remove_stream(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ferrohub_store::telemetry::{NewEvent, StartPosition};

    fn ev(device: &str, t: i64, body: &[u8]) -> NewEvent {
        NewEvent {
            device_id: device.into(),
            module_id: None,
            enqueued_ms: t,
            system_properties: Default::default(),
            properties: vec![("k".into(), Some("v".into()))],
            body: body.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_data_dir_written_by_sqlite_keeps_its_events_checkpoints_and_sequences() -> Result<()>
    {
        let dir = tempfile::tempdir()?;
        let data = dir.path();
        {
            let old = SqliteTelemetry::open(data, 2)?;
            for t in 0..3 {
                old.append(ev("d", t, b"old")).await?;
            }
            old.save_checkpoint("g", old.partition_of("d"), 2).await?;
            let hot = SqliteStreams::new(data).open_stream("hot", 2)?;
            hot.append(ev("d", 1, b"hot")).await?;
        }
        let log = open_telemetry(data, 4, TelemetryEngine::Segment)?;
        let p = log.partition_of("d");
        assert_eq!(log.partition_count(), 2);
        assert_eq!(log.read(p, 0, 10).await?.len(), 3);
        assert_eq!(log.checkpoints("g").await?.get(&p), Some(&2));
        assert_eq!(log.append(ev("d", 9, b"new")).await?.1, 3);
        assert!(!data.join(TELEMETRY_DIR).exists(), "no second, empty log");
        let streams = EngineStreams::new(data, TelemetryEngine::Segment);
        let hot = streams.open_stream("hot", 2)?;
        assert_eq!(hot.resolve(p, StartPosition::End).await?, 1);
        assert_eq!(hot.append(ev("d", 9, b"hot")).await?.1, 1);
        // A stream created now is a segment log; removing either kind leaves nothing behind.
        let fresh = streams.open_stream("fresh", 1)?;
        fresh.append(ev("d", 1, b"x")).await?;
        assert!(data.join("streams/fresh/meta").exists());
        drop((hot, fresh));
        streams.remove_stream("hot")?;
        streams.remove_stream("fresh")?;
        assert!(!data.join("streams/hot.db").exists());
        assert!(!data.join("streams/fresh").exists());
        Ok(())
    }

    #[tokio::test]
    async fn a_new_data_dir_gets_the_configured_engine() -> Result<()> {
        let seg = tempfile::tempdir()?;
        let log = open_telemetry(seg.path(), 2, TelemetryEngine::Segment)?;
        log.append(ev("d", 1, b"x")).await?;
        assert!(seg.path().join(TELEMETRY_DIR).join("meta").exists());
        assert!(!seg.path().join(TELEMETRY_DB_FILE).exists());
        drop(log);
        // Asking for SQLite later does not hide the segment log's events.
        let log = open_telemetry(seg.path(), 2, TelemetryEngine::Sqlite)?;
        assert_eq!(log.read(log.partition_of("d"), 0, 10).await?.len(), 1);
        let sql = tempfile::tempdir()?;
        let _log = open_telemetry(sql.path(), 2, TelemetryEngine::Sqlite)?;
        assert!(sql.path().join(TELEMETRY_DB_FILE).exists());
        assert!(!sql.path().join(TELEMETRY_DIR).exists());
        Ok(())
    }
}
