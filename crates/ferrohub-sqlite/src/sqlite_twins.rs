//! [`TwinStore`] for [`SqliteStore`]: twin documents as opaque JSON text in the `twins` table
//! (schema in `sqlite.rs`).
//!
//! An update is one job of the group-commit writer: reading the current document, running the
//! caller's function and writing the result happen with no other write in between, so
//! concurrent updates of a twin serialise without locks or retries.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use crate::sqlite::{module_key, SqliteStore};
use ferrohub_store::{Result, StoreError, TwinStore, TwinUpdate};

#[async_trait]
impl TwinStore for SqliteStore {
    async fn get_twin(&self, device_id: &str, module_id: Option<&str>) -> Result<Option<String>> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT doc FROM twins WHERE device_id = ?1 AND module_id = ?2")?
                .query_row(params![device, module], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn update_twin(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        update: TwinUpdate,
    ) -> Result<Box<dyn std::any::Any + Send>> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        // `update` is caller code running on the writer thread: the writer catches a panic in
        // it (failing only this job), but a slow function delays every write behind it.
        self.write(move |conn| {
            let current: Option<String> = conn
                .prepare_cached("SELECT doc FROM twins WHERE device_id = ?1 AND module_id = ?2")?
                .query_row(params![device, module], |r| r.get(0))
                .optional()?;
            let (doc, output) = update(current).map_err(StoreError::Rejected)?;
            conn.prepare_cached(
                "INSERT INTO twins (device_id, module_id, doc) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (device_id, module_id) DO UPDATE SET doc = excluded.doc",
            )?
            .execute(params![device, module, doc])?;
            Ok(output)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrohub_store::{SessionStore, StoredSession, TwinUpdateOutput};

    /// An update that appends `n` to the JSON array `doc.seen` and returns the array's new
    /// length.
    fn append(n: u32) -> TwinUpdate {
        Box::new(move |doc: Option<String>| {
            let mut value: serde_json::Value = match doc {
                Some(d) => serde_json::from_str(&d)?,
                None => serde_json::json!({ "seen": [] }),
            };
            let seen = value["seen"].as_array_mut().ok_or("seen is not an array")?;
            seen.push(n.into());
            let len = seen.len();
            Ok((
                value.to_string(),
                Box::new(len) as Box<dyn std::any::Any + Send>,
            ))
        })
    }

    fn seen(doc: &str) -> Result<Vec<u64>> {
        let value: serde_json::Value = serde_json::from_str(doc)?;
        Ok(value["seen"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default())
    }

    #[tokio::test]
    async fn missing_twin_reads_as_none_and_update_creates_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        assert_eq!(store.get_twin("d1", None).await?, None);
        let out = store.update_twin("d1", None, append(7)).await?;
        assert_eq!(out.downcast_ref::<usize>(), Some(&1));
        let doc = store
            .get_twin("d1", None)
            .await?
            .ok_or(StoreError::NotFound)?;
        assert_eq!(seen(&doc)?, [7]);
        // The module's twin is another document.
        assert_eq!(store.get_twin("d1", Some("m1")).await?, None);
        store.update_twin("d1", Some("m1"), append(8)).await?;
        let module_doc = store
            .get_twin("d1", Some("m1"))
            .await?
            .ok_or(StoreError::NotFound)?;
        assert_eq!(seen(&module_doc)?, [8]);
        assert_eq!(store.get_twin("d1", None).await?, Some(doc));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_updates_lose_nothing() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        let tasks: Vec<_> = (0..50)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { store.update_twin("d1", None, append(n)).await })
            })
            .collect();
        let mut lengths = Vec::new();
        for t in tasks {
            let out = t.await.map_err(|e| StoreError::Task(e.to_string()))??;
            lengths.push(*out.downcast::<usize>().map_err(|_| StoreError::NotFound)?);
        }
        lengths.sort_unstable();
        assert_eq!(lengths, (1..=50).collect::<Vec<_>>());
        let doc = store
            .get_twin("d1", None)
            .await?
            .ok_or(StoreError::NotFound)?;
        let mut all = seen(&doc)?;
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        Ok(())
    }

    #[tokio::test]
    async fn rejected_update_writes_nothing() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        store.update_twin("d1", None, append(1)).await?;
        let before = store.get_twin("d1", None).await?;
        let reject: TwinUpdate = Box::new(
            |_| -> std::result::Result<TwinUpdateOutput, ferrohub_store::BoxError> {
                Err("version conflict".into())
            },
        );
        match store.update_twin("d1", None, reject).await {
            Err(StoreError::Rejected(e)) => assert_eq!(e.to_string(), "version conflict"),
            other => panic!("expected Rejected, got {:?}", other.map(|_| ())),
        }
        assert_eq!(store.get_twin("d1", None).await?, before);
        let reject_new: TwinUpdate = Box::new(|_| Err("no".into()));
        assert!(matches!(
            store.update_twin("d2", None, reject_new).await,
            Err(StoreError::Rejected(_))
        ));
        assert_eq!(store.get_twin("d2", None).await?, None);
        Ok(())
    }

    /// Latency of twin updates offered at 5,000/s over 1,000 twins of about 1 KB. Run with
    /// `cargo test -p ferrohub-sqlite --release -- --ignored --nocapture twin_update_latency`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn twin_update_latency() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        let padding = "x".repeat(1_000);
        let mut ticks = tokio::time::interval(std::time::Duration::from_millis(1));
        let mut tasks = Vec::new();
        let start = std::time::Instant::now();
        for i in 0..5_000u32 {
            if i % 5 == 0 {
                ticks.tick().await;
            }
            let store = store.clone();
            let padding = padding.clone();
            tasks.push(tokio::spawn(async move {
                let sent = std::time::Instant::now();
                let update: TwinUpdate = Box::new(move |doc: Option<String>| {
                    let mut value: serde_json::Value = match doc {
                        Some(d) => serde_json::from_str(&d)?,
                        None => serde_json::json!({ "version": 0, "padding": padding }),
                    };
                    let version = value["version"].as_u64().unwrap_or(0) + 1;
                    value["version"] = version.into();
                    Ok((value.to_string(), Box::new(version) as _))
                });
                store
                    .update_twin(&format!("d{}", i % 1_000), None, update)
                    .await
                    .map(|_| sent.elapsed())
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.push(t.await.map_err(|e| StoreError::Task(e.to_string()))??);
        }
        let total = start.elapsed();
        latencies.sort_unstable();
        let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
        println!(
            "5000 twin updates offered at 5000/s in {total:?}: p50 {:?}, p99 {:?}, max {:?}",
            pct(50),
            pct(99),
            latencies[latencies.len() - 1]
        );
        Ok(())
    }

    #[tokio::test]
    async fn panicking_update_fails_alone_and_writes_go_on() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path())?;
        store.update_twin("d1", None, append(1)).await?;
        let boom: TwinUpdate = Box::new(|_| panic!("bug in the twin merge"));
        match store.update_twin("d1", None, boom).await {
            Err(StoreError::Task(msg)) => assert!(msg.contains("bug in the twin merge"), "{msg}"),
            other => panic!("expected Task, got {:?}", other.map(|_| ())),
        }
        store.update_twin("d1", None, append(2)).await?;
        store.save_session("c1", &StoredSession::default()).await?;
        let doc = store
            .get_twin("d1", None)
            .await?
            .ok_or(StoreError::NotFound)?;
        assert_eq!(seen(&doc)?, [1, 2]);
        assert!(store.load_session("c1").await?.is_some());
        Ok(())
    }
}
