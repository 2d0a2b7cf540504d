//! [`C2dStore`] for [`SqliteStore`]: cloud-to-device queues and the feedback records settling
//! them produces, in the registry database (tables `c2d_messages`, `c2d_sequences`,
//! `c2d_feedback`; schema in `sqlite.rs`).
//!
//! Every write runs as one job of the group-commit writer, so checks and changes that belong
//! together (depth check and sequence assignment, removal and its feedback) are atomic without
//! further locking.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::SqlResult;
use crate::sqlite::{module_key, SqliteStore};
use ferrohub_store::{
    C2dMessage, C2dStore, FeedbackBatch, FeedbackRecord, FeedbackStatus, Result, StoreError,
    Timestamp,
};

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Rebuilds a message from its row. The columns are authoritative for what changes after
/// enqueue (delivery count) or is assigned by it (sequence); the doc holds the rest.
fn decode(seq: i64, delivery_count: i64, doc: &str, payload: Vec<u8>) -> SqlResult<C2dMessage> {
    let mut msg: C2dMessage = serde_json::from_str(doc)?;
    msg.sequence_number = u64::try_from(seq).unwrap_or(0);
    msg.delivery_count = u32::try_from(delivery_count).unwrap_or(u32::MAX);
    msg.payload = payload;
    Ok(msg)
}

/// Stores the feedback record for `msg` leaving its queue as `status`, if its `ack` asks for it.
fn record_feedback(
    conn: &Connection,
    msg: &C2dMessage,
    status: FeedbackStatus,
    now_utc: &str,
) -> SqlResult<()> {
    if !msg.ack.wants(status) {
        return Ok(());
    }
    let record = FeedbackRecord {
        original_message_id: msg.message_id.clone(),
        device_id: msg.device_id.clone(),
        module_id: msg.module_id.clone(),
        device_generation_id: msg.device_generation_id.clone(),
        status_code: status,
        description: status.description().into(),
        enqueued_time_utc: now_utc.into(),
    };
    conn.prepare_cached("INSERT INTO c2d_feedback (doc) VALUES (?1)")?
        .execute(params![serde_json::to_string(&record)?])?;
    Ok(())
}

#[async_trait]
impl C2dStore for SqliteStore {
    async fn c2d_enqueue(&self, mut msg: C2dMessage, max_depth: usize) -> Result<C2dMessage> {
        // `Some("")` would land in the device's own queue (module key '') but read back as a
        // module message; one spelling per identity.
        msg.module_id = msg.module_id.filter(|m| !m.is_empty());
        let payload = std::mem::take(&mut msg.payload);
        // Encoded here rather than in the job: the writer thread is the one serial resource.
        let doc = serde_json::to_string(&msg)?;
        let max_depth = limit_of(max_depth);
        self.write(move |conn| {
            let module = module_key(msg.module_id.as_deref());
            // Checked inside the write: the hub looked before, but a delete committed since
            // would leave these rows behind, for a later device of the same name to receive.
            let exists: bool = match &msg.module_id {
                None => conn
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM devices WHERE device_id = ?1)")?
                    .query_row(params![msg.device_id], |r| r.get(0))?,
                Some(m) => conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM modules WHERE device_id = ?1 AND module_id = ?2)",
                    )?
                    .query_row(params![msg.device_id, m], |r| r.get(0))?,
            };
            if !exists {
                return Err(StoreError::NotFound.into());
            }
            let depth: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM c2d_messages WHERE device_id = ?1 AND module_id = ?2",
                )?
                .query_row(params![msg.device_id, module], |r| r.get(0))?;
            if depth >= max_depth {
                return Err(StoreError::QueueFull.into());
            }
            let seq: i64 = conn
                .prepare_cached(
                    "INSERT INTO c2d_sequences (device_id, module_id, last_seq) VALUES (?1, ?2, 1) \
                     ON CONFLICT (device_id, module_id) DO UPDATE SET last_seq = last_seq + 1 \
                     RETURNING last_seq",
                )?
                .query_row(params![msg.device_id, module], |r| r.get(0))?;
            conn.prepare_cached(
                "INSERT INTO c2d_messages \
                 (device_id, module_id, seq, expiry_ms, delivery_count, doc, payload) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                msg.device_id,
                module,
                seq,
                msg.expiry_time_ms,
                msg.delivery_count,
                doc,
                payload
            ])?;
            msg.sequence_number = u64::try_from(seq).unwrap_or(0);
            msg.payload = payload;
            Ok(msg)
        })
        .await
    }

    async fn c2d_peek(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        let (after, limit) = (to_i64(after), limit_of(limit));
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, delivery_count, doc, payload FROM c2d_messages \
                 WHERE device_id = ?1 AND module_id = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![device, module, after, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, count, doc, payload) = row?;
                out.push(decode(seq, count, &doc, payload)?);
            }
            Ok(out)
        })
        .await
    }

    async fn c2d_count_deliveries(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        up_to: u64,
    ) -> Result<u64> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        let up_to = to_i64(up_to);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE c2d_messages SET delivery_count = delivery_count + 1 \
                     WHERE device_id = ?1 AND module_id = ?2 AND seq <= ?3",
                )?
                .execute(params![device, module, up_to])?;
            Ok(n as u64)
        })
        .await
    }

    async fn c2d_settle(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        sequence_number: u64,
        status: FeedbackStatus,
        now: Timestamp,
    ) -> Result<Option<C2dMessage>> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        let seq = to_i64(sequence_number);
        let now_utc = now.to_iso();
        self.write(move |conn| {
            let row: Option<(i64, String, Vec<u8>)> = conn
                .prepare_cached(
                    "DELETE FROM c2d_messages WHERE device_id = ?1 AND module_id = ?2 AND seq = ?3 \
                     RETURNING delivery_count, doc, payload",
                )?
                .query_row(params![device, module, seq], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let Some((count, doc, payload)) = row else {
                return Ok(None);
            };
            let msg = decode(seq, count, &doc, payload)?;
            record_feedback(conn, &msg, status, &now_utc)?;
            Ok(Some(msg))
        })
        .await
    }

    async fn c2d_count(&self, device_id: &str, module_id: Option<&str>) -> Result<u64> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        self.read(move |conn| {
            let n: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM c2d_messages WHERE device_id = ?1 AND module_id = ?2",
                )?
                .query_row(params![device, module], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn c2d_counts(&self, device_ids: &[&str]) -> Result<HashMap<String, u64>> {
        // The ids go in as one JSON array: one statement whatever their number, with no
        // limit on bound parameters to run into.
        let ids = serde_json::to_string(device_ids)?;
        let mut counts: HashMap<String, u64> =
            device_ids.iter().map(|d| (d.to_string(), 0)).collect();
        let found = self
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT device_id, COUNT(*) FROM c2d_messages \
                     WHERE module_id = '' AND device_id IN (SELECT value FROM json_each(?1)) \
                     GROUP BY device_id",
                )?;
                let rows = stmt.query_map(params![ids], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        for (device, n) in found {
            counts.insert(device, u64::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }

    async fn c2d_purge(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        now: Timestamp,
    ) -> Result<u64> {
        let (device, module) = (device_id.to_string(), module_key(module_id));
        let now_utc = now.to_iso();
        self.write(move |conn| {
            // Read first and delete after, rather than DELETE ... RETURNING, so feedback is
            // recorded in queue order (RETURNING order is unspecified).
            let queued = {
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, delivery_count, doc FROM c2d_messages \
                     WHERE device_id = ?1 AND module_id = ?2 ORDER BY seq",
                )?;
                let rows = stmt.query_map(params![device, module], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            conn.prepare_cached(
                "DELETE FROM c2d_messages WHERE device_id = ?1 AND module_id = ?2",
            )?
            .execute(params![device, module])?;
            for (seq, count, doc) in &queued {
                let msg = decode(*seq, *count, doc, Vec::new())?;
                record_feedback(conn, &msg, FeedbackStatus::Purged, &now_utc)?;
            }
            Ok(queued.len() as u64)
        })
        .await
    }

    async fn c2d_expire(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(String, Option<String>)>> {
        let (now_ms, now_utc) = (now.unix_ms(), now.to_iso());
        let limit = limit_of(limit);
        self.write(move |conn| {
            let expired = {
                let mut stmt = conn.prepare_cached(
                    "SELECT device_id, module_id, seq, delivery_count, doc FROM c2d_messages \
                     WHERE expiry_ms <= ?1 ORDER BY expiry_ms LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![now_ms, limit], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let mut seen = HashSet::new();
            let mut touched = Vec::new();
            for (device, module, seq, count, doc) in expired {
                conn.prepare_cached(
                    "DELETE FROM c2d_messages WHERE device_id = ?1 AND module_id = ?2 AND seq = ?3",
                )?
                .execute(params![device, module, seq])?;
                let msg = decode(seq, count, &doc, Vec::new())?;
                record_feedback(conn, &msg, FeedbackStatus::Expired, &now_utc)?;
                if seen.insert((device.clone(), module.clone())) {
                    touched.push((device, (!module.is_empty()).then_some(module)));
                }
            }
            Ok(touched)
        })
        .await
    }

    async fn c2d_next_expiry(&self) -> Result<Option<Timestamp>> {
        self.read(|conn| {
            let ms: Option<i64> = conn
                .prepare_cached("SELECT MIN(expiry_ms) FROM c2d_messages")?
                .query_row([], |r| r.get(0))?;
            Ok(ms.map(Timestamp::from_unix_ms))
        })
        .await
    }

    async fn feedback_receive(
        &self,
        now: Timestamp,
        lock: std::time::Duration,
        max: usize,
    ) -> Result<Option<FeedbackBatch>> {
        let now_ms = now.unix_ms();
        if max == 0 {
            return Ok(None);
        }
        // Receivers poll; answering "nothing" from a reader keeps idle polls out of the
        // writer's queue.
        let any: bool = self
            .read(move |conn| {
                Ok(conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM c2d_feedback WHERE lock_until_ms <= ?1)",
                    )?
                    .query_row(params![now_ms], |r| r.get(0))?)
            })
            .await?;
        if !any {
            return Ok(None);
        }
        let lock_token = format!("{:032x}", rand::random::<u128>());
        let lock_until = now.saturating_add(lock).unix_ms();
        let limit = limit_of(max);
        self.write(move |conn| {
            let free = {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, doc FROM c2d_feedback WHERE lock_until_ms <= ?1 \
                     ORDER BY id LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![now_ms, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            if free.is_empty() {
                return Ok(None);
            }
            let mut records = Vec::with_capacity(free.len());
            let mut lock = conn.prepare_cached(
                "UPDATE c2d_feedback SET lock_token = ?2, lock_until_ms = ?3 WHERE id = ?1",
            )?;
            for (id, doc) in free {
                records.push(serde_json::from_str::<FeedbackRecord>(&doc)?);
                lock.execute(params![id, lock_token, lock_until])?;
            }
            Ok(Some(FeedbackBatch {
                lock_token,
                records,
            }))
        })
        .await
    }

    async fn feedback_complete(&self, lock_token: &str, now: Timestamp) -> Result<()> {
        let (token, now_ms) = (lock_token.to_string(), now.unix_ms());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM c2d_feedback WHERE lock_token = ?1 AND lock_until_ms > ?2",
                )?
                .execute(params![token, now_ms])?;
            if n == 0 {
                return Err(StoreError::LockLost.into());
            }
            Ok(())
        })
        .await
    }

    async fn feedback_abandon(&self, lock_token: &str, now: Timestamp) -> Result<()> {
        let (token, now_ms) = (lock_token.to_string(), now.unix_ms());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE c2d_feedback SET lock_until_ms = 0, lock_token = NULL \
                     WHERE lock_token = ?1 AND lock_until_ms > ?2",
                )?
                .execute(params![token, now_ms])?;
            if n == 0 {
                return Err(StoreError::LockLost.into());
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ferrohub_store::testsuite::{msg, NOW};

    /// A store whose registry holds every identity these tests send to.
    async fn with_identities(dir: &std::path::Path) -> Result<SqliteStore> {
        let store = SqliteStore::open(dir)?;
        ferrohub_store::testsuite::with_identities(&store).await?;
        Ok(store)
    }

    #[tokio::test]
    async fn sequence_numbers_increase_per_queue_and_survive_emptying_and_reopen() -> Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let store = with_identities(dir.path()).await?;
            let a = store.c2d_enqueue(msg("d1", None, "a"), 10).await?;
            let b = store.c2d_enqueue(msg("d1", None, "b"), 10).await?;
            let other = store.c2d_enqueue(msg("d2", None, "x"), 10).await?;
            assert_eq!((a.sequence_number, b.sequence_number), (1, 2));
            assert_eq!(other.sequence_number, 1);
            assert_eq!(a.payload, b"a");
            for s in [1, 2] {
                store
                    .c2d_settle("d1", None, s, FeedbackStatus::Success, NOW)
                    .await?;
            }
            assert_eq!(store.c2d_count("d1", None).await?, 0);
            let c = store.c2d_enqueue(msg("d1", None, "c"), 10).await?;
            assert_eq!(c.sequence_number, 3);
        }
        let store = with_identities(dir.path()).await?;
        store
            .c2d_settle("d1", None, 3, FeedbackStatus::Success, NOW)
            .await?;
        let d = store.c2d_enqueue(msg("d1", None, "d"), 10).await?;
        assert_eq!(d.sequence_number, 4);
        let peeked = store.c2d_peek("d1", None, 0, 10).await?;
        assert_eq!(peeked, vec![d]);
        Ok(())
    }

    /// Throughput of the group commit: 5,000 concurrent enqueues over 1,000 queues. Run with
    /// `cargo test -p ferrohub-sqlite --release -- --ignored --nocapture enqueue_throughput`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn enqueue_throughput() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = with_identities(dir.path()).await?;
        let start = std::time::Instant::now();
        let tasks: Vec<_> = (0..5_000)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let m = msg(&format!("dev{}", i % 1_000), None, &format!("m{i}"));
                    store.c2d_enqueue(m, 50).await
                })
            })
            .collect();
        for t in tasks {
            t.await.map_err(|e| StoreError::Task(e.to_string()))??;
        }
        let elapsed = start.elapsed();
        println!(
            "5000 concurrent c2d_enqueue over 1000 queues: {elapsed:?} ({:.0}/s)",
            5_000.0 / elapsed.as_secs_f64()
        );
        assert_eq!(store.c2d_count("dev7", None).await?, 5);

        // For scale: one caller at a time gets no batching, so each enqueue pays a full commit.
        let start = std::time::Instant::now();
        for i in 0..500 {
            store
                .c2d_enqueue(msg("serial", None, &format!("s{i}")), 1_000)
                .await?;
        }
        let elapsed = start.elapsed();
        println!(
            "500 sequential c2d_enqueue: {elapsed:?} ({:.0}/s)",
            500.0 / elapsed.as_secs_f64()
        );
        Ok(())
    }
}
