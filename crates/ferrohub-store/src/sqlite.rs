//! The embedded default store: one SQLite database file in the data directory.
//!
//! SQLite runs in WAL mode with `synchronous=FULL`, so a commit is on disk (WAL fsync'd) when the
//! call returns. One writer connection serialises writes; a few reader connections serve reads
//! concurrently with it (WAL readers never block the writer). SQLite calls are blocking, so every
//! call runs on tokio's blocking pool and the async runtime never waits on disk.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use base64::Engine;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::{
    AccessPolicy, CaCertificate, CertificateStore, Device, IfMatch, Module, PolicyStore,
    RegistryStore, Result, SessionStore, StoreError, StoredSession,
};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "ferrohub.db";

/// Reader connections: two cores here, so more would only contend.
const READERS: usize = 4;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY NOT NULL,
    version   INTEGER NOT NULL,
    doc       TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS modules (
    device_id TEXT NOT NULL,
    module_id TEXT NOT NULL,
    version   INTEGER NOT NULL,
    doc       TEXT NOT NULL,
    PRIMARY KEY (device_id, module_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS policies (
    key_name TEXT PRIMARY KEY NOT NULL,
    doc      TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS certificates (
    name    TEXT PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL,
    doc     TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    client_key TEXT PRIMARY KEY NOT NULL,
    doc        TEXT NOT NULL
) WITHOUT ROWID;
"#;

struct Inner {
    /// All writes go through this one connection: SQLite has a single writer anyway, and owning
    /// it avoids SQLITE_BUSY retries.
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    /// Round-robin start point for picking a free reader.
    next_reader: AtomicUsize,
}

/// The SQLite-backed implementation of every storage trait.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock leaves the connection usable (SQLite rolls back an open
    // transaction on the next statement), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn etag_of(version: i64) -> String {
    base64::engine::general_purpose::STANDARD.encode(version.to_string())
}

fn open_conn(path: &Path, read_only: bool) -> Result<Connection> {
    open_conn_with(path, read_only, &[])
}

/// Opens a connection as every Ferrohub SQLite file wants it (WAL, `synchronous=FULL`).
/// `before_wal` pragmas are applied to writers first: some (e.g. `auto_vacuum`) only take
/// effect on a new database before anything else is written.
pub(crate) fn open_conn_with(
    path: &Path,
    read_only: bool,
    before_wal: &[(&str, &str)],
) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if !read_only {
        for (name, value) in before_wal {
            conn.pragma_update(None, name, value)?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    // FULL: the WAL is fsync'd at every commit, which is what makes "acknowledged" mean durable.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(DB_FILE);
        let writer = open_conn(&path, false)?;
        writer.execute_batch(SCHEMA)?;
        let readers = (0..READERS)
            .map(|_| open_conn(&path, true).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(&inner.writer);
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs a read on the calling task. Registry and session reads are point lookups served
    /// from SQLite's page cache in microseconds; handing them to the blocking pool cost two
    /// thread switches each, which dominated the CPU cost of a device connect.
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let inner = &self.inner;
        let n = inner.readers.len();
        let start = inner.next_reader.fetch_add(1, Ordering::Relaxed);
        // Prefer a reader nobody holds; if all are busy, wait on the one our turn points at.
        for i in 0..n {
            if let Ok(conn) = inner.readers[(start + i) % n].try_lock() {
                return f(&conn);
            }
        }
        let conn = lock(&inner.readers[start % n]);
        f(&conn)
    }
}

fn device_from_row(version: i64, doc: &str) -> Result<Device> {
    let mut d: Device = serde_json::from_str(doc)?;
    d.etag = etag_of(version);
    Ok(d)
}

fn module_from_row(version: i64, doc: &str) -> Result<Module> {
    let mut m: Module = serde_json::from_str(doc)?;
    m.etag = etag_of(version);
    Ok(m)
}

fn cert_from_row(version: i64, doc: &str) -> Result<CaCertificate> {
    let mut c: CaCertificate = serde_json::from_str(doc)?;
    c.etag = etag_of(version);
    Ok(c)
}

/// Checks `if_match` against the current version of a row; `None` means the row is absent.
fn check_if_match(current: Option<i64>, if_match: &IfMatch) -> Result<i64> {
    match current {
        None => Err(StoreError::NotFound),
        Some(v) if if_match.matches(&etag_of(v)) => Ok(v),
        Some(_) => Err(StoreError::PreconditionFailed),
    }
}

#[async_trait]
impl RegistryStore for SqliteStore {
    async fn create_device(&self, mut device: Device) -> Result<Device> {
        self.write(move |conn| {
            device.etag.clear();
            let doc = serde_json::to_string(&device)?;
            let n = conn.execute(
                "INSERT OR IGNORE INTO devices (device_id, version, doc) VALUES (?1, 1, ?2)",
                params![device.device_id, doc],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            device.etag = etag_of(1);
            Ok(device)
        })
        .await
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
        let id = device_id.to_string();
        self.read(move |conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached("SELECT version, doc FROM devices WHERE device_id = ?1")?
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            row.map(|(v, doc)| device_from_row(v, &doc)).transpose()
        })
        .await
    }

    async fn update_device(&self, mut device: Device, if_match: IfMatch) -> Result<Device> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM devices WHERE device_id = ?1",
                    params![device.device_id],
                    |r| r.get(0),
                )
                .optional()?;
            let version = check_if_match(current, &if_match)? + 1;
            device.etag.clear();
            let doc = serde_json::to_string(&device)?;
            tx.execute(
                "UPDATE devices SET version = ?2, doc = ?3 WHERE device_id = ?1",
                params![device.device_id, version, doc],
            )?;
            tx.commit()?;
            device.etag = etag_of(version);
            Ok(device)
        })
        .await
    }

    async fn delete_device(&self, device_id: &str, if_match: IfMatch) -> Result<()> {
        let id = device_id.to_string();
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM devices WHERE device_id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?;
            check_if_match(current, &if_match)?;
            tx.execute("DELETE FROM modules WHERE device_id = ?1", params![id])?;
            tx.execute("DELETE FROM devices WHERE device_id = ?1", params![id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_devices(&self, top: usize) -> Result<Vec<Device>> {
        let top = i64::try_from(top).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT version, doc FROM devices ORDER BY device_id LIMIT ?1")?;
            let rows = stmt.query_map(params![top], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (v, doc) = row?;
                out.push(device_from_row(v, &doc)?);
            }
            Ok(out)
        })
        .await
    }

    async fn count_devices(&self) -> Result<u64> {
        self.read(|conn| {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn create_module(&self, mut module: Module) -> Result<Module> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let exists: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM devices WHERE device_id = ?1",
                    params![module.device_id],
                    |r| r.get(0),
                )
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::NotFound);
            }
            module.etag.clear();
            let doc = serde_json::to_string(&module)?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO modules (device_id, module_id, version, doc) VALUES (?1, ?2, 1, ?3)",
                params![module.device_id, module.module_id, doc],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            tx.commit()?;
            module.etag = etag_of(1);
            Ok(module)
        })
        .await
    }

    async fn get_module(&self, device_id: &str, module_id: &str) -> Result<Option<Module>> {
        let (d, m) = (device_id.to_string(), module_id.to_string());
        self.read(move |conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached(
                    "SELECT version, doc FROM modules WHERE device_id = ?1 AND module_id = ?2",
                )?
                .query_row(params![d, m], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            row.map(|(v, doc)| module_from_row(v, &doc)).transpose()
        })
        .await
    }

    async fn update_module(&self, mut module: Module, if_match: IfMatch) -> Result<Module> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM modules WHERE device_id = ?1 AND module_id = ?2",
                    params![module.device_id, module.module_id],
                    |r| r.get(0),
                )
                .optional()?;
            let version = check_if_match(current, &if_match)? + 1;
            module.etag.clear();
            let doc = serde_json::to_string(&module)?;
            tx.execute(
                "UPDATE modules SET version = ?3, doc = ?4 WHERE device_id = ?1 AND module_id = ?2",
                params![module.device_id, module.module_id, version, doc],
            )?;
            tx.commit()?;
            module.etag = etag_of(version);
            Ok(module)
        })
        .await
    }

    async fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: IfMatch,
    ) -> Result<()> {
        let (d, m) = (device_id.to_string(), module_id.to_string());
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM modules WHERE device_id = ?1 AND module_id = ?2",
                    params![d, m],
                    |r| r.get(0),
                )
                .optional()?;
            check_if_match(current, &if_match)?;
            tx.execute(
                "DELETE FROM modules WHERE device_id = ?1 AND module_id = ?2",
                params![d, m],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_modules(&self, device_id: &str) -> Result<Vec<Module>> {
        let d = device_id.to_string();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT version, doc FROM modules WHERE device_id = ?1 ORDER BY module_id",
            )?;
            let rows = stmt.query_map(params![d], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (v, doc) = row?;
                out.push(module_from_row(v, &doc)?);
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl PolicyStore for SqliteStore {
    async fn get_policy(&self, name: &str) -> Result<Option<AccessPolicy>> {
        let name = name.to_string();
        self.read(move |conn| {
            let doc: Option<String> = conn
                .prepare_cached("SELECT doc FROM policies WHERE key_name = ?1")?
                .query_row(params![name], |r| r.get(0))
                .optional()?;
            Ok(doc.map(|d| serde_json::from_str(&d)).transpose()?)
        })
        .await
    }

    async fn list_policies(&self) -> Result<Vec<AccessPolicy>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT doc FROM policies ORDER BY key_name")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn ensure_policy(&self, policy: AccessPolicy) -> Result<AccessPolicy> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT doc FROM policies WHERE key_name = ?1",
                    params![policy.key_name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(doc) = existing {
                return Ok(serde_json::from_str(&doc)?);
            }
            tx.execute(
                "INSERT INTO policies (key_name, doc) VALUES (?1, ?2)",
                params![policy.key_name, serde_json::to_string(&policy)?],
            )?;
            tx.commit()?;
            Ok(policy)
        })
        .await
    }
}

#[async_trait]
impl CertificateStore for SqliteStore {
    async fn put_certificate(
        &self,
        mut cert: CaCertificate,
        if_match: IfMatch,
    ) -> Result<CaCertificate> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM certificates WHERE name = ?1",
                    params![cert.name],
                    |r| r.get(0),
                )
                .optional()?;
            let version = match current {
                None => 1,
                Some(v) if if_match.matches(&etag_of(v)) => v + 1,
                Some(_) => return Err(StoreError::PreconditionFailed),
            };
            cert.etag.clear();
            tx.execute(
                "INSERT OR REPLACE INTO certificates (name, version, doc) VALUES (?1, ?2, ?3)",
                params![cert.name, version, serde_json::to_string(&cert)?],
            )?;
            tx.commit()?;
            cert.etag = etag_of(version);
            Ok(cert)
        })
        .await
    }

    async fn get_certificate(&self, name: &str) -> Result<Option<CaCertificate>> {
        let name = name.to_string();
        self.read(move |conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached("SELECT version, doc FROM certificates WHERE name = ?1")?
                .query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            row.map(|(v, doc)| cert_from_row(v, &doc)).transpose()
        })
        .await
    }

    async fn list_certificates(&self) -> Result<Vec<CaCertificate>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT version, doc FROM certificates ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (v, doc) = row?;
                out.push(cert_from_row(v, &doc)?);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_certificate(&self, name: &str, if_match: IfMatch) -> Result<()> {
        let name = name.to_string();
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM certificates WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            check_if_match(current, &if_match)?;
            tx.execute("DELETE FROM certificates WHERE name = ?1", params![name])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn load_session(&self, client_key: &str) -> Result<Option<StoredSession>> {
        let key = client_key.to_string();
        self.read(move |conn| {
            let doc: Option<String> = conn
                .prepare_cached("SELECT doc FROM sessions WHERE client_key = ?1")?
                .query_row(params![key], |r| r.get(0))
                .optional()?;
            Ok(doc.map(|d| serde_json::from_str(&d)).transpose()?)
        })
        .await
    }

    async fn save_session(&self, client_key: &str, session: &StoredSession) -> Result<()> {
        let key = client_key.to_string();
        let doc = serde_json::to_string(session)?;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO sessions (client_key, doc) VALUES (?1, ?2)",
            )?
            .execute(params![key, doc])?;
            Ok(())
        })
        .await
    }

    async fn delete_session(&self, client_key: &str) -> Result<()> {
        let key = client_key.to_string();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM sessions WHERE client_key = ?1")?
                .execute(params![key])?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Rights, StoredSubscription};

    fn device(id: &str) -> Device {
        Device {
            device_id: id.into(),
            generation_id: "g1".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn device_crud_with_etags_survives_reopen() -> Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let store = SqliteStore::open(dir.path())?;
            let d = store.create_device(device("dev1")).await?;
            assert!(matches!(
                store.create_device(device("dev1")).await,
                Err(StoreError::AlreadyExists)
            ));
            let stale = IfMatch::Etag(d.etag.clone());
            let d2 = store.update_device(d.clone(), stale.clone()).await?;
            assert_ne!(d2.etag, d.etag);
            assert!(matches!(
                store.update_device(d.clone(), stale.clone()).await,
                Err(StoreError::PreconditionFailed)
            ));
            assert!(matches!(
                store.delete_device("dev1", stale).await,
                Err(StoreError::PreconditionFailed)
            ));
            store.create_device(device("dev0")).await?;
        }
        let store = SqliteStore::open(dir.path())?;
        let ids: Vec<_> = store
            .list_devices(10)
            .await?
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        assert_eq!(ids, ["dev0", "dev1"]);
        assert_eq!(store.list_devices(1).await?.len(), 1);
        store.delete_device("dev1", IfMatch::Any).await?;
        assert!(store.get_device("dev1").await?.is_none());
        assert!(matches!(
            store.delete_device("dev1", IfMatch::Any).await,
            Err(StoreError::NotFound)
        ));
        Ok(())
    }

    #[tokio::test]
    async fn modules_need_their_device_and_go_with_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        let m = Module {
            module_id: "m1".into(),
            device_id: "dev1".into(),
            ..Default::default()
        };
        assert!(matches!(
            store.create_module(m.clone()).await,
            Err(StoreError::NotFound)
        ));
        store.create_device(device("dev1")).await?;
        store.create_module(m.clone()).await?;
        assert!(matches!(
            store.create_module(m).await,
            Err(StoreError::AlreadyExists)
        ));
        assert_eq!(store.list_modules("dev1").await?.len(), 1);
        store.delete_device("dev1", IfMatch::Any).await?;
        assert!(store.get_module("dev1", "m1").await?.is_none());
        Ok(())
    }

    #[tokio::test]
    async fn policies_are_created_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        let p = AccessPolicy {
            key_name: "iothubowner".into(),
            primary_key: "a".into(),
            secondary_key: "b".into(),
            rights: Rights::ALL,
        };
        store.ensure_policy(p.clone()).await?;
        let again = store
            .ensure_policy(AccessPolicy {
                primary_key: "other".into(),
                ..p.clone()
            })
            .await?;
        assert_eq!(again, p);
        Ok(())
    }

    #[tokio::test]
    async fn sessions_round_trip_and_delete() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        let s = StoredSession {
            subscriptions: vec![StoredSubscription {
                filter: "$iothub/methods/POST/#".into(),
                qos: 1,
            }],
        };
        store.save_session("dev1", &s).await?;
        assert_eq!(store.load_session("dev1").await?, Some(s));
        store.delete_session("dev1").await?;
        assert_eq!(store.load_session("dev1").await?, None);
        Ok(())
    }

    #[test]
    fn if_match_header_forms() {
        assert_eq!(IfMatch::from_header(None), IfMatch::Any);
        assert_eq!(IfMatch::from_header(Some("\"*\"")), IfMatch::Any);
        assert_eq!(
            IfMatch::from_header(Some("\"MQ==\"")),
            IfMatch::Etag("MQ==".into())
        );
    }
}
