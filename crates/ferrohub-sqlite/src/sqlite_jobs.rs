//! [`JobStore`] for [`SqliteStore`]: job documents in `jobs`, per-device rows in `device_jobs`
//! (schema in `sqlite.rs`), each write one unit of the group-commit writer.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use crate::sqlite::SqliteStore;
use ferrohub_store::{JobStore, Result, StoreError, StoredDeviceJob, StoredJob};

/// A limit as SQLite takes it: past `i64::MAX` is "no limit" anyway.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn create_job(&self, job: StoredJob) -> Result<()> {
        self.write(move |conn| {
            let n = conn.execute(
                "INSERT OR IGNORE INTO jobs (job_id, doc) VALUES (?1, ?2)",
                params![job.job_id, job.doc],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists.into());
            }
            Ok(())
        })
        .await
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<StoredJob>> {
        let id = job_id.to_string();
        self.read(move |conn| {
            let doc: Option<String> = conn
                .prepare_cached("SELECT doc FROM jobs WHERE job_id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            Ok(doc.map(|doc| StoredJob { job_id: id, doc }))
        })
        .await
    }

    async fn update_job(&self, job: StoredJob) -> Result<()> {
        self.write(move |conn| {
            let n = conn.execute(
                "UPDATE jobs SET doc = ?2 WHERE job_id = ?1",
                params![job.job_id, job.doc],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound.into());
            }
            Ok(())
        })
        .await
    }

    async fn list_jobs(&self, after: Option<&str>, limit: usize) -> Result<Vec<StoredJob>> {
        let after = after.map(str::to_string);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT job_id, doc FROM jobs WHERE ?1 IS NULL OR job_id > ?1 \
                 ORDER BY job_id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, sql_limit(limit)], |r| {
                Ok(StoredJob {
                    job_id: r.get(0)?,
                    doc: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn put_device_jobs(&self, rows: Vec<StoredDeviceJob>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // One unit of the group commit: the writer's savepoint makes the rows all or none.
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(
                "INSERT OR REPLACE INTO device_jobs (job_id, device_id, doc) VALUES (?1, ?2, ?3)",
            )?;
            for row in &rows {
                stmt.execute(params![row.job_id, row.device_id, row.doc])?;
            }
            Ok(())
        })
        .await
    }

    async fn get_device_job(
        &self,
        job_id: &str,
        device_id: &str,
    ) -> Result<Option<StoredDeviceJob>> {
        let (job, device) = (job_id.to_string(), device_id.to_string());
        self.read(move |conn| {
            let doc: Option<String> = conn
                .prepare_cached("SELECT doc FROM device_jobs WHERE job_id = ?1 AND device_id = ?2")?
                .query_row(params![job, device], |r| r.get(0))
                .optional()?;
            Ok(doc.map(|doc| StoredDeviceJob {
                job_id: job,
                device_id: device,
                doc,
            }))
        })
        .await
    }

    async fn scan_device_jobs(
        &self,
        job_id: Option<&str>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StoredDeviceJob>> {
        let job = job_id.map(str::to_string);
        let (after_job, after_device) = match after {
            Some((j, d)) => (Some(j), Some(d)),
            None => (None, None),
        };
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT job_id, device_id, doc FROM device_jobs \
                 WHERE (?1 IS NULL OR job_id = ?1) \
                 AND (?2 IS NULL OR (job_id, device_id) > (?2, ?3)) \
                 ORDER BY job_id, device_id LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![job, after_job, after_device, sql_limit(limit)],
                |r| {
                    Ok(StoredDeviceJob {
                        job_id: r.get(0)?,
                        device_id: r.get(1)?,
                        doc: r.get(2)?,
                    })
                },
            )?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
        .await
    }
}
