//! [`ConfigurationStore`] for [`SqliteStore`]: configuration documents in the
//! `configurations` table and the configuration applied to each device in
//! `configuration_applied` (schema in `sqlite.rs`).
//!
//! Each write is one job of the group-commit writer, so an etag check and the write it guards
//! see no other write in between.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::SqlResult;
use crate::sqlite::{check_if_match, etag_of, SqliteStore};
use ferrohub_store::{ConfigurationStore, IfMatch, Result, StoreError, StoredConfiguration};

fn version_of(conn: &Connection, id: &str) -> SqlResult<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT version FROM configurations WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?)
}

#[async_trait]
impl ConfigurationStore for SqliteStore {
    async fn put_configuration(
        &self,
        id: &str,
        doc: String,
        if_match: Option<IfMatch>,
    ) -> Result<StoredConfiguration> {
        let id = id.to_string();
        self.write(move |conn| {
            let current = version_of(conn, &id)?;
            let version = match (current, if_match) {
                (Some(_), None) => return Err(StoreError::AlreadyExists.into()),
                (None, None) => 1,
                (current, Some(cond)) => check_if_match(current, &cond)? + 1,
            };
            conn.prepare_cached(
                "INSERT OR REPLACE INTO configurations (id, version, doc) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![id, version, doc])?;
            Ok(StoredConfiguration {
                id,
                doc,
                etag: etag_of(version),
            })
        })
        .await
    }

    async fn get_configuration(&self, id: &str) -> Result<Option<StoredConfiguration>> {
        let id = id.to_string();
        self.read(move |conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached("SELECT version, doc FROM configurations WHERE id = ?1")?
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(row.map(|(v, doc)| StoredConfiguration {
                id,
                doc,
                etag: etag_of(v),
            }))
        })
        .await
    }

    async fn list_configurations(&self, top: usize) -> Result<Vec<StoredConfiguration>> {
        let top = i64::try_from(top).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, version, doc FROM configurations ORDER BY id LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![top], |r| {
                Ok(StoredConfiguration {
                    id: r.get(0)?,
                    etag: etag_of(r.get(1)?),
                    doc: r.get(2)?,
                })
            })?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row?);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_configuration(&self, id: &str, if_match: IfMatch) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            check_if_match(version_of(conn, &id)?, &if_match)?;
            for sql in [
                "DELETE FROM configurations WHERE id = ?1",
                "DELETE FROM configuration_applied WHERE config_id = ?1",
            ] {
                conn.prepare_cached(sql)?.execute(params![id])?;
            }
            Ok(())
        })
        .await
    }

    async fn mark_applied(&self, device_id: &str, config_id: &str) -> Result<()> {
        let (device, config) = (device_id.to_string(), config_id.to_string());
        self.write(move |conn| {
            // Checked in the same job: a device or configuration deleted meanwhile leaves no
            // record behind.
            let device_exists: Option<i64> = conn
                .prepare_cached("SELECT 1 FROM devices WHERE device_id = ?1")?
                .query_row(params![device], |r| r.get(0))
                .optional()?;
            if device_exists.is_none() || version_of(conn, &config)?.is_none() {
                return Err(StoreError::NotFound.into());
            }
            conn.prepare_cached(
                "INSERT OR REPLACE INTO configuration_applied (device_id, config_id) VALUES (?1, ?2)",
            )?
            .execute(params![device, config])?;
            Ok(())
        })
        .await
    }

    async fn clear_applied(&self, device_id: &str) -> Result<()> {
        let device = device_id.to_string();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM configuration_applied WHERE device_id = ?1")?
                .execute(params![device])?;
            Ok(())
        })
        .await
    }

    async fn applied_configuration(&self, device_id: &str) -> Result<Option<String>> {
        let device = device_id.to_string();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT config_id FROM configuration_applied WHERE device_id = ?1")?
                .query_row(params![device], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn count_applied(&self, config_id: &str) -> Result<u64> {
        let config = config_id.to_string();
        self.read(move |conn| {
            let n: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM configuration_applied WHERE config_id = ?1")?
                .query_row(params![config], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }
}
