//! [`StreamEngine`] on segment logs: each custom endpoint's stream is a [`SegmentLog`] in
//! `streams/NAME/`, a directory of its own so its writer, syncs and retention never contend
//! with another stream's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrohub_store::telemetry::TelemetryLog;
use ferrohub_store::{Result, StreamEngine};

use crate::log::SegmentLog;

/// The directory, under the data directory, of the custom endpoints' streams.
pub const STREAMS_DIR: &str = "streams";

/// Custom endpoint streams as segment logs in `DATA_DIR/streams/NAME/`.
#[derive(Debug, Clone)]
pub struct SegmentStreams {
    dir: PathBuf,
}

impl SegmentStreams {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(STREAMS_DIR),
        }
    }

    /// The directory of stream `name`, refusing names that could leave `streams/`.
    pub fn stream_dir(&self, name: &str) -> Result<PathBuf> {
        ferrohub_store::routing::check_stream_name(name)?;
        Ok(self.dir.join(name))
    }
}

impl StreamEngine for SegmentStreams {
    fn open_stream(&self, name: &str, partitions: u32) -> Result<Arc<dyn TelemetryLog>> {
        Ok(Arc::new(SegmentLog::open(
            &self.stream_dir(name)?,
            partitions,
        )?))
    }

    fn remove_stream(&self, name: &str) -> Result<()> {
        match std::fs::remove_dir_all(self.stream_dir(name)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
