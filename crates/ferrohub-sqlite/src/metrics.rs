//! The engine's own metrics, named here because only the engine sees them: how long a group
//! commit of the telemetry log takes, how many entries it carries, and the log's size on disk
//! ([`telemetry_log_bytes`], which the metrics listener reads at each scrape). Recorded through the
//! `metrics` facade (a no-op without a recorder); the binary's recorder describes them.

use metrics::{describe_histogram, histogram, Histogram, Unit};

pub const STORE_COMMIT_SECONDS: &str = "ferrohub_store_commit_seconds";
pub const STORE_COMMIT_BATCH_SIZE: &str = "ferrohub_store_commit_batch_size";
pub const TELEMETRY_LOG_BYTES: &str = "ferrohub_telemetry_log_bytes";

/// Buckets of the batch size: powers of two up to the writer's largest batch (1,024).
pub const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Registers the descriptions with the installed recorder.
pub fn describe() {
    describe_histogram!(
        STORE_COMMIT_SECONDS,
        Unit::Seconds,
        "Group commits of a telemetry log (the built-in `telemetry` or a custom endpoint's \
         stream, label `log`): from the transaction's start to its commit, fsync included"
    );
    describe_histogram!(
        STORE_COMMIT_BATCH_SIZE,
        "Entries (appends and checkpoints) in one group commit of a telemetry log, label `log`"
    );
    metrics::describe_gauge!(
        TELEMETRY_LOG_BYTES,
        Unit::Bytes,
        "The built-in telemetry log on disk: telemetry.db with its WAL and shared-memory files"
    );
}

/// Bytes of the built-in telemetry log in `data_dir` (the database, its WAL and shared-memory
/// files); files that are not there count as nothing.
pub fn telemetry_log_bytes(data_dir: &std::path::Path) -> u64 {
    let base = crate::TELEMETRY_DB_FILE;
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(data_dir.join(format!("{base}{suffix}"))).ok())
        .map(|m| m.len())
        .sum()
}

/// One writer thread's handles, resolved at its first commit (the writer commits many times a
/// second) rather than when the log opens: a handle taken before the process installs its
/// recorder would stay a no-op for good.
pub(crate) struct CommitMetrics {
    log: String,
    handles: std::cell::OnceCell<(Histogram, Histogram)>,
}

impl CommitMetrics {
    /// `log` is the database's file stem: `telemetry`, or a custom endpoint's name.
    pub(crate) fn new(log: String) -> Self {
        Self {
            log,
            handles: std::cell::OnceCell::new(),
        }
    }

    pub(crate) fn committed(&self, took: std::time::Duration, entries: usize) {
        let (seconds, batch) = self.handles.get_or_init(|| {
            (
                histogram!(STORE_COMMIT_SECONDS, "log" => self.log.clone()),
                histogram!(STORE_COMMIT_BATCH_SIZE, "log" => self.log.clone()),
            )
        });
        seconds.record(took.as_secs_f64());
        batch.record(entries as f64);
    }
}
