//! [`ProvisioningStore`] for [`SqliteStore`]: enrollments, groups and registrations in
//! `provisioning`, the ID scope in `provisioning_settings` (schema in `sqlite.rs`); each write
//! runs in the group-commit writer, so a read of the version and the write it guards are one
//! transaction.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use crate::sqlite::{check_if_match, etag_of, SqliteStore};
use ferrohub_store::{IfMatch, ProvisioningKind, ProvisioningStore, Result, StoredProvisioning};

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn kind_of(name: &str) -> Option<ProvisioningKind> {
    [
        ProvisioningKind::Enrollment,
        ProvisioningKind::EnrollmentGroup,
        ProvisioningKind::Registration,
    ]
    .into_iter()
    .find(|k| k.as_str() == name)
}

fn version_of(
    conn: &rusqlite::Connection,
    kind: ProvisioningKind,
    id: &str,
) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT version FROM provisioning WHERE kind = ?1 AND id = ?2")?
        .query_row(params![kind.as_str(), id], |r| r.get(0))
        .optional()
}

#[async_trait]
impl ProvisioningStore for SqliteStore {
    async fn put_provisioning(
        &self,
        kind: ProvisioningKind,
        id: &str,
        doc: String,
        if_match: IfMatch,
    ) -> Result<StoredProvisioning> {
        let id = id.to_string();
        self.write(move |conn| {
            let current = version_of(conn, kind, &id)?;
            let version = match (current, &if_match) {
                (None, IfMatch::Any) => 1,
                (current, _) => check_if_match(current, &if_match)? + 1,
            };
            conn.execute(
                "INSERT OR REPLACE INTO provisioning (kind, id, version, doc) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![kind.as_str(), id, version, doc],
            )?;
            Ok(StoredProvisioning {
                kind,
                id,
                doc,
                etag: etag_of(version),
            })
        })
        .await
    }

    async fn get_provisioning(
        &self,
        kind: ProvisioningKind,
        id: &str,
    ) -> Result<Option<StoredProvisioning>> {
        let id = id.to_string();
        self.read(move |conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached(
                    "SELECT version, doc FROM provisioning WHERE kind = ?1 AND id = ?2",
                )?
                .query_row(params![kind.as_str(), id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(row.map(|(version, doc)| StoredProvisioning {
                kind,
                id,
                doc,
                etag: etag_of(version),
            }))
        })
        .await
    }

    async fn delete_provisioning(
        &self,
        kind: ProvisioningKind,
        id: &str,
        if_match: IfMatch,
    ) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            check_if_match(version_of(conn, kind, &id)?, &if_match)?;
            conn.execute(
                "DELETE FROM provisioning WHERE kind = ?1 AND id = ?2",
                params![kind.as_str(), id],
            )?;
            Ok(())
        })
        .await
    }

    async fn list_provisioning(
        &self,
        kind: ProvisioningKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredProvisioning>> {
        let after = after.map(str::to_string);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT kind, id, version, doc FROM provisioning \
                 WHERE kind = ?1 AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![kind.as_str(), after, sql_limit(limit)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (k, id, version, doc) = row?;
                // Only rows of `kind` were asked for; a name this build does not know cannot
                // be among them, but is skipped rather than trusted.
                if let Some(kind) = kind_of(&k) {
                    out.push(StoredProvisioning {
                        kind,
                        id,
                        doc,
                        etag: etag_of(version),
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ensure_id_scope(&self, candidate: String) -> Result<String> {
        self.write(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO provisioning_settings (name, value) VALUES ('idScope', ?1)",
                params![candidate],
            )?;
            let scope: String = conn
                .prepare_cached("SELECT value FROM provisioning_settings WHERE name = 'idScope'")?
                .query_row([], |r| r.get(0))?;
            Ok(scope)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::DB_FILE;
    use ferrohub_store::{AccessPolicy, PolicyStore, Rights};

    /// A data directory written before provisioning existed (no provisioning tables, policies
    /// without enrollment rights) opens, gains the tables, and reads its policies with the
    /// new rights off.
    #[tokio::test]
    async fn a_data_dir_from_before_provisioning_upgrades_in_place() -> Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let store = SqliteStore::open(dir.path())?;
            store
                .ensure_policy(AccessPolicy {
                    key_name: "registryReadWrite".into(),
                    primary_key: "a2V5".into(),
                    secondary_key: "a2V5".into(),
                    rights: Rights {
                        registry_read: true,
                        registry_write: true,
                        ..Rights::default()
                    },
                })
                .await?;
        }
        {
            let conn = rusqlite::Connection::open(dir.path().join(DB_FILE))
                .map_err(|e| ferrohub_store::StoreError::Backend(Box::new(e)))?;
            conn.execute_batch(
                "DROP TABLE provisioning; DROP TABLE provisioning_settings; \
                 UPDATE policies SET doc = '{\"keyName\":\"registryReadWrite\",\"primaryKey\":\"a2V5\",\
                 \"secondaryKey\":\"a2V5\",\"rights\":{\"registryRead\":true,\"registryWrite\":true,\
                 \"serviceConnect\":false,\"deviceConnect\":false}}';",
            )
            .map_err(|e| ferrohub_store::StoreError::Backend(Box::new(e)))?;
        }
        let store = SqliteStore::open(dir.path())?;
        let p = store
            .get_policy("registryReadWrite")
            .await?
            .ok_or(ferrohub_store::StoreError::NotFound)?;
        assert!(p.rights.registry_write && !p.rights.enrollment_read && !p.rights.enrollment_write);
        assert_eq!(
            store.ensure_id_scope("0ne0000000A".into()).await?,
            "0ne0000000A"
        );
        store
            .put_provisioning(
                ProvisioningKind::Enrollment,
                "e1",
                "{}".into(),
                IfMatch::Any,
            )
            .await?;
        assert!(store
            .get_provisioning(ProvisioningKind::Enrollment, "e1")
            .await?
            .is_some());
        Ok(())
    }
}
