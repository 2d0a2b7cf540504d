//! [`ModelStore`] for [`SqliteStore`]: IoT Plug and Play model documents in the `models` table
//! (schema in `sqlite.rs`). The check for an existing id and the insert are one job of the
//! group-commit writer, so two uploads of one id cannot both win.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use crate::sqlite::SqliteStore;
use ferrohub_store::{ModelStore, Result, StoreError, StoredModel, Timestamp};

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredModel> {
    Ok(StoredModel {
        id: r.get(0)?,
        doc: r.get(1)?,
        created: Timestamp::from_unix_ms(r.get(2)?),
    })
}

#[async_trait]
impl ModelStore for SqliteStore {
    async fn put_model(&self, id: &str, doc: String, created: Timestamp) -> Result<StoredModel> {
        let id = id.to_string();
        self.write(move |conn| {
            let existing = conn
                .prepare_cached("SELECT id, doc, created_ms FROM models WHERE id = ?1")?
                .query_row(params![id], from_row)
                .optional()?;
            if let Some(existing) = existing {
                return if existing.doc == doc {
                    Ok(existing)
                } else {
                    Err(StoreError::AlreadyExists.into())
                };
            }
            conn.prepare_cached("INSERT INTO models (id, doc, created_ms) VALUES (?1, ?2, ?3)")?
                .execute(params![id, doc, created.unix_ms()])?;
            Ok(StoredModel { id, doc, created })
        })
        .await
    }

    async fn get_model(&self, id: &str) -> Result<Option<StoredModel>> {
        let id = id.to_string();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT id, doc, created_ms FROM models WHERE id = ?1")?
                .query_row(params![id], from_row)
                .optional()?)
        })
        .await
    }

    async fn list_models(&self) -> Result<Vec<StoredModel>> {
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id, doc, created_ms FROM models ORDER BY id")?;
            let rows = stmt.query_map([], from_row)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r?);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_model(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM models WHERE id = ?1")?
                .execute(params![id])?;
            if n == 0 {
                return Err(StoreError::NotFound.into());
            }
            Ok(())
        })
        .await
    }
}
