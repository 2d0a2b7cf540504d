//! The shared engine test suite (`ferrohub_store::testsuite`) run against the SQLite engine,
//! each test on a fresh database in a temporary directory.

use ferrohub_sqlite::{SqliteStore, SqliteTelemetry};
use ferrohub_store::Result;
use tempfile::TempDir;

fn open() -> Result<(SqliteStore, TempDir)> {
    let dir = tempfile::tempdir()?;
    Ok((SqliteStore::open(dir.path())?, dir))
}

fn open_log(partitions: u32) -> Result<(SqliteTelemetry, TempDir)> {
    let dir = tempfile::tempdir()?;
    Ok((SqliteTelemetry::open(dir.path(), partitions)?, dir))
}

ferrohub_store::store_suite!(open);
ferrohub_store::telemetry_suite!(open_log);

/// Modest counts: every operation is a durable commit (an fsync).
#[test]
fn behaves_like_the_model() {
    if let Err(e) = ferrohub_store::testsuite::model::check_against_model(open, 64, 40) {
        panic!("{e}");
    }
}
