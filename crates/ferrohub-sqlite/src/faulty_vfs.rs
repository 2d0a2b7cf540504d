//! A failpoint under the real engine: the default SQLite VFS with its `fsync` swapped for one
//! that fails on demand, for files under one directory (redb tests its backend the same way).
//! Test-only: every connection of the test binary goes through it, and all but that
//! directory's files keep SQLite's own methods untouched.

use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Mutex, Once};

use rusqlite::ffi;

/// Syncs of files under [`FAILING_DIR`] fail while this is set.
pub(crate) static FAIL_SYNCS: AtomicBool = AtomicBool::new(false);
static FAILING_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

static REAL_VFS: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(std::ptr::null_mut());

/// A method table of the real VFS (files of different kinds have different ones: a database
/// locks, a journal does not) and its copy with our sync, leaked: SQLite keeps the pointer.
struct Swapped {
    real: &'static ffi::sqlite3_io_methods,
    shim: &'static ffi::sqlite3_io_methods,
}

static SWAPPED: Mutex<Vec<Swapped>> = Mutex::new(Vec::new());

// SAFETY: the tables are immutable once leaked, and SQLite reads them from any thread.
unsafe impl Send for Swapped {}

/// Makes the shim SQLite's default VFS (once per process) and points its failpoint at `dir`.
pub(crate) fn install(dir: PathBuf) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| unsafe {
        let real = ffi::sqlite3_vfs_find(std::ptr::null());
        assert!(!real.is_null(), "SQLite has a default VFS");
        REAL_VFS.store(real, Ordering::SeqCst);
        let mut shim = *real;
        shim.zName = c"ferrohub-faulty".as_ptr();
        shim.pNext = std::ptr::null_mut();
        shim.xOpen = Some(x_open);
        let shim = Box::leak(Box::new(shim));
        assert_eq!(ffi::sqlite3_vfs_register(shim, 1), ffi::SQLITE_OK);
    });
    *FAILING_DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir);
}

fn under_failing_dir(name: *const c_char) -> bool {
    if name.is_null() {
        return false;
    }
    // SAFETY: SQLite passes a NUL-terminated path, valid for the call.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let dir = FAILING_DIR.lock().unwrap_or_else(|e| e.into_inner());
    dir.as_ref()
        .is_some_and(|d| std::path::Path::new(&name).starts_with(d))
}

/// Opens with the real VFS (our VFS has the real one's file size, so the real file is the
/// whole of ours), then, for a file under the failing directory, swaps its method table for
/// a copy whose only change is the sync.
unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real = REAL_VFS.load(Ordering::SeqCst);
    let Some(open) = (*real).xOpen else {
        return ffi::SQLITE_ERROR;
    };
    let rc = open(real, name, file, flags, out_flags);
    if rc != ffi::SQLITE_OK || (*file).pMethods.is_null() || !under_failing_dir(name) {
        return rc;
    }
    let real_methods: &'static ffi::sqlite3_io_methods = &*(*file).pMethods;
    let mut swapped = SWAPPED.lock().unwrap_or_else(|e| e.into_inner());
    let shim = match swapped.iter().find(|s| std::ptr::eq(s.real, real_methods)) {
        Some(s) => s.shim,
        None => {
            let shim: &'static ffi::sqlite3_io_methods =
                Box::leak(Box::new(ffi::sqlite3_io_methods {
                    xSync: Some(x_sync),
                    ..*real_methods
                }));
            swapped.push(Swapped {
                real: real_methods,
                shim,
            });
            shim
        }
    };
    (*file).pMethods = shim;
    rc
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    if FAIL_SYNCS.load(Ordering::SeqCst) {
        return ffi::SQLITE_IOERR_FSYNC;
    }
    let real_sync = {
        let swapped = SWAPPED.lock().unwrap_or_else(|e| e.into_inner());
        swapped
            .iter()
            .find(|s| std::ptr::eq(s.shim, (*file).pMethods))
            .and_then(|s| s.real.xSync)
    };
    match real_sync {
        Some(sync) => sync(file, flags),
        None => ffi::SQLITE_IOERR_FSYNC,
    }
}
#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ferrohub_store::telemetry::{NewEvent, TelemetryLog};
    use ferrohub_store::testsuite::device;
    use ferrohub_store::{RegistryStore, SessionStore, StoreError, StoredSession};

    use super::*;
    use crate::{SqliteStore, SqliteTelemetry};

    type R = std::result::Result<(), Box<dyn std::error::Error>>;

    fn event(n: u32) -> NewEvent {
        NewEvent {
            device_id: "d".into(),
            module_id: None,
            enqueued_ms: 0,
            system_properties: Default::default(),
            properties: vec![("n".into(), Some(n.to_string()))],
            body: vec![0u8; 100],
        }
    }

    async fn stored_ns(log: &SqliteTelemetry) -> std::result::Result<Vec<u32>, StoreError> {
        let p = log.partition_of("d");
        Ok(log
            .read(p, 0, 100)
            .await?
            .iter()
            .filter_map(|r| r.event.properties.first()?.1.as_deref()?.parse().ok())
            .collect())
    }

    fn integrity(path: &std::path::Path) -> std::result::Result<String, rusqlite::Error> {
        let conn = rusqlite::Connection::open(path)?;
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
    }

    /// While fsync fails, every write fails (nothing is answered Ok), reads go on, and writing
    /// resumes when fsync works again; after a restart the acknowledged writes are all there,
    /// once each, and both files are intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_fsyncs_fail_the_writes_and_writing_resumes_when_they_work_again() -> R {
        let dir = tempfile::tempdir()?;
        install(dir.path().to_path_buf());
        let acked_devices;
        let acked_events;
        {
            let store = SqliteStore::open(dir.path())?;
            let log = SqliteTelemetry::open(dir.path(), 1)?;
            store.create_device(device("a")).await?;
            log.append(event(1)).await?;

            FAIL_SYNCS.store(true, Ordering::SeqCst);
            let refused = store.create_device(device("b")).await;
            assert!(
                refused.is_err(),
                "a write whose fsync failed was acknowledged"
            );
            assert!(store
                .save_session("s", &StoredSession::default())
                .await
                .is_err());
            assert!(log.append(event(2)).await.is_err());
            // Reads do not sync.
            assert!(store.get_device("a").await?.is_some());
            assert_eq!(stored_ns(&log).await?, [1]);
            FAIL_SYNCS.store(false, Ordering::SeqCst);

            store.create_device(device("c")).await?;
            log.append(event(3)).await?;
            assert!(store.get_device("c").await?.is_some());
            let ns = stored_ns(&log).await?;
            assert!(ns.contains(&1) && ns.contains(&3), "{ns:?}");
            acked_devices = ["a", "c"];
            acked_events = [1u32, 3];
        }
        // A restart: recovery reads the WAL back. What failed may be there or not (its frames
        // may have reached the file); what was acknowledged must be, exactly once.
        let store = SqliteStore::open(dir.path())?;
        let log = SqliteTelemetry::open(dir.path(), 1)?;
        for id in acked_devices {
            assert!(store.get_device(id).await?.is_some(), "{id} lost");
        }
        let ns = stored_ns(&log).await?;
        let unique: BTreeSet<u32> = ns.iter().copied().collect();
        assert_eq!(unique.len(), ns.len(), "duplicated: {ns:?}");
        for n in acked_events {
            assert!(unique.contains(&n), "{n} lost: {ns:?}");
        }
        drop((store, log));
        for file in [crate::DB_FILE, crate::TELEMETRY_DB_FILE] {
            assert_eq!(integrity(&dir.path().join(file))?, "ok", "{file}");
        }
        Ok(())
    }
}
