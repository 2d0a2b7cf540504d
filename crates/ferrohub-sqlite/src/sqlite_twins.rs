//! [`TwinStore`] for [`SqliteStore`]: twin documents as opaque JSON text in the `twins` table
//! (schema in `sqlite.rs`), each with the version conditional writes check.
//!
//! A conditional write is one statement in one job of the group-commit writer, so the check
//! and the write see no other write in between. The same job brings the twin value index
//! (`sqlite_twin_index`) up to the new document.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use crate::sqlite::{module_key, SqliteStore};
use ferrohub_store::{Result, StoreError, TwinStore, VersionedTwin};

#[async_trait]
impl TwinStore for SqliteStore {
    async fn get_twin(
        &self,
        device_id: &str,
        module_id: Option<&str>,
    ) -> Result<Option<VersionedTwin>> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        self.read(move |conn| {
            let row: Option<(String, i64)> = conn
                .prepare_cached(
                    "SELECT doc, version FROM twins WHERE device_id = ?1 AND module_id = ?2",
                )?
                .query_row(params![device, module], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(row.map(|(doc, version)| VersionedTwin {
                doc,
                version: u64::try_from(version).unwrap_or(0),
            }))
        })
        .await
    }

    async fn put_twin(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        doc: String,
        expected: Option<u64>,
    ) -> Result<u64> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        let expected = expected
            .map(|v| i64::try_from(v).map_err(|_| StoreError::VersionMismatch))
            .transpose()?;
        self.write(move |conn| {
            // The index rows to replace are the old document's; a create has none (a twin
            // already there makes the insert below fail).
            let old: Option<String> = match expected {
                None => None,
                Some(_) => conn
                    .prepare_cached(
                        "SELECT doc FROM twins WHERE device_id = ?1 AND module_id = ?2",
                    )?
                    .query_row(params![device, module], |r| r.get(0))
                    .optional()?,
            };
            let written: Option<i64> = match expected {
                None => conn
                    .prepare_cached(
                        "INSERT INTO twins (device_id, module_id, doc, version) \
                         VALUES (?1, ?2, ?3, 1) ON CONFLICT (device_id, module_id) DO NOTHING \
                         RETURNING version",
                    )?
                    .query_row(params![device, module, doc], |r| r.get(0))
                    .optional()?,
                Some(v) => conn
                    .prepare_cached(
                        "UPDATE twins SET doc = ?3, version = version + 1 \
                         WHERE device_id = ?1 AND module_id = ?2 AND version = ?4 \
                         RETURNING version",
                    )?
                    .query_row(params![device, module, doc, v], |r| r.get(0))
                    .optional()?,
            };
            match written {
                Some(v) => {
                    crate::sqlite_twin_index::reindex(
                        conn,
                        &device,
                        &module,
                        old.as_deref(),
                        Some(&doc),
                    )?;
                    Ok(u64::try_from(v).unwrap_or(0))
                }
                None => Err(StoreError::VersionMismatch.into()),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[tokio::test]
    async fn twins_of_a_database_from_before_versions_read_as_version_0() -> Result<()> {
        let dir = tempfile::tempdir()?;
        {
            // The twins table as builds before conditional writes created it.
            let conn = Connection::open(dir.path().join(crate::DB_FILE))
                .map_err(crate::error::SqlError::from)?;
            conn.execute_batch(
                "CREATE TABLE twins (
                     device_id TEXT NOT NULL,
                     module_id TEXT NOT NULL DEFAULT '',
                     doc       TEXT NOT NULL,
                     PRIMARY KEY (device_id, module_id)
                 ) WITHOUT ROWID;
                 INSERT INTO twins (device_id, module_id, doc) VALUES ('d1', '', '{\"old\":1}');",
            )
            .map_err(crate::error::SqlError::from)?;
        }
        let store = SqliteStore::open(dir.path())?;
        let twin = store
            .get_twin("d1", None)
            .await?
            .ok_or(StoreError::NotFound)?;
        assert_eq!(
            twin,
            VersionedTwin {
                doc: "{\"old\":1}".into(),
                version: 0
            }
        );
        assert!(matches!(
            store.put_twin("d1", None, "{}".into(), None).await,
            Err(StoreError::VersionMismatch)
        ));
        assert_eq!(store.put_twin("d1", None, "{}".into(), Some(0)).await?, 1);
        drop(store);
        // Opening again finds the column and leaves the data alone.
        let store = SqliteStore::open(dir.path())?;
        assert_eq!(
            store.get_twin("d1", None).await?.map(|t| t.version),
            Some(1)
        );
        Ok(())
    }
}
