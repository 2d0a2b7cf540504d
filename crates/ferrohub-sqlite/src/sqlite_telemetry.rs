//! The embedded telemetry log: its own SQLite file (`telemetry.db`) so event appends never
//! contend with registry writes, written by one thread that commits in groups.
//!
//! Group commit: appends queue in a bounded channel; the writer takes everything queued (up to
//! `MAX_BATCH`), inserts it in one transaction and commits once, so one fsync of the WAL covers
//! the whole batch. Each caller is answered only after that commit. When the disk falls behind
//! the channel fills and `append` waits: ingest slows instead of buffering without bound.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use ferrohub_store::telemetry::{
    partition_for, Durable, EventRecord, NewEvent, Retention, StartPosition, TelemetryLog,
};
use ferrohub_store::{Result, StoreError, Timestamp};

use crate::error::SqlResult;

pub const TELEMETRY_DB_FILE: &str = "telemetry.db";

/// Most appends one commit takes: bounds the time a transaction holds the write lock.
const MAX_BATCH: usize = 1024;
/// Appends waiting for the writer. With IoT Hub's 256 KB message limit this bounds queued
/// bodies to 256 MiB in the worst case, and far less with real messages.
const QUEUE: usize = 1024;
/// Bits of a row id that hold the sequence; the partition sits above them. Making the position
/// the rowid saves a second index, i.e. half the B-tree work of every append.
const SEQ_BITS: u32 = 40;

fn pos_of(partition: u32, sequence: u64) -> i64 {
    ((i64::from(partition)) << SEQ_BITS) | (sequence as i64 & ((1 << SEQ_BITS) - 1))
}

fn split_pos(pos: i64) -> (u32, u64) {
    (
        (pos >> SEQ_BITS) as u32,
        (pos & ((1 << SEQ_BITS) - 1)) as u64,
    )
}

/// Rows one retention step deletes, so expiry never stalls ingest for long.
const RETENTION_CHUNK: usize = 5000;
const READERS: usize = 3;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS partitions (
    partition INTEGER PRIMARY KEY NOT NULL,
    next_seq  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    pos         INTEGER PRIMARY KEY NOT NULL, -- partition << 40 | sequence: the rowid itself
    enqueued_ms INTEGER NOT NULL,
    device_id   TEXT NOT NULL,
    module_id   TEXT,
    props       TEXT NOT NULL,
    body        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    grp       TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_seq  INTEGER NOT NULL,
    PRIMARY KEY (grp, partition)
) WITHOUT ROWID;
"#;

/// The two property sets, stored together as one JSON column.
#[derive(serde::Serialize, serde::Deserialize)]
struct Props {
    #[serde(rename = "s")]
    system: BTreeMap<String, String>,
    #[serde(rename = "a")]
    app: Vec<(String, Option<String>)>,
}

/// An append ready for the writer: the property JSON is encoded by the caller, so the single
/// writer thread spends its time only on inserting and committing.
struct EncodedEvent {
    partition: u32,
    enqueued_ms: i64,
    device_id: String,
    module_id: Option<String>,
    props: String,
    body: Vec<u8>,
}

enum Command {
    Append(EncodedEvent, oneshot::Sender<Result<(u32, u64)>>),
    Checkpoint(String, u32, u64, oneshot::Sender<Result<()>>),
    Retention(Retention, i64, oneshot::Sender<Result<u64>>),
}

struct Inner {
    /// Tells the checkpoint thread to stop when the log is dropped.
    stop: Arc<std::sync::atomic::AtomicBool>,
    tx: mpsc::Sender<Command>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    partitions: u32,
    commits: watch::Receiver<u64>,
}

/// [`TelemetryLog`] on SQLite.
#[derive(Clone)]
pub struct SqliteTelemetry {
    inner: Arc<Inner>,
}

fn open(path: &Path, read_only: bool) -> SqlResult<Connection> {
    // auto_vacuum: lets retention give space back to the file system.
    let conn = crate::sqlite::open_conn_with(path, read_only, &[("auto_vacuum", "INCREMENTAL")])?;
    if !read_only {
        // Checkpoints normally run on their own thread (see `sqlite::Checkpoints`) so appends never
        // wait for one; this only bounds the WAL if that thread falls far behind (64 MiB).
        conn.pragma_update(None, "wal_autocheckpoint", 16384)?;
    }
    Ok(conn)
}

impl SqliteTelemetry {
    /// Opens the log in `data_dir`. The partition count is fixed when the log is created; a
    /// different `partitions` later is ignored (and logged) so devices keep their partition.
    pub fn open(data_dir: &Path, partitions: u32) -> Result<Self> {
        Ok(Self::open_sql(data_dir, partitions)?)
    }

    /// Opens (creating if needed) a log in the file `path` (a custom endpoint's stream), as
    /// [`SqliteTelemetry::open`] does `telemetry.db`.
    pub fn open_file(path: &Path, partitions: u32) -> Result<Self> {
        Ok(Self::open_path(path, partitions)?)
    }

    fn open_sql(data_dir: &Path, partitions: u32) -> SqlResult<Self> {
        std::fs::create_dir_all(data_dir)?;
        Self::open_path(&data_dir.join(TELEMETRY_DB_FILE), partitions)
    }

    fn open_path(path: &Path, partitions: u32) -> SqlResult<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let path = path.to_path_buf();
        let mut writer = open(&path, false)?;
        writer.execute_batch(SCHEMA)?;
        let stored: Option<String> = writer
            .query_row("SELECT value FROM meta WHERE key = 'partitions'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let partitions = match stored.and_then(|s| s.parse::<u32>().ok()) {
            Some(p) => {
                if p != partitions {
                    tracing::warn!(
                        stored = p,
                        requested = partitions,
                        "telemetry partition count is fixed at creation; keeping the stored one"
                    );
                }
                p
            }
            None => {
                let p = partitions.clamp(1, 1024);
                let tx = writer.transaction()?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('partitions', ?1)",
                    params![p.to_string()],
                )?;
                for i in 0..p {
                    tx.execute(
                        "INSERT OR IGNORE INTO partitions (partition, next_seq) VALUES (?1, 0)",
                        params![i],
                    )?;
                }
                tx.commit()?;
                p
            }
        };
        let mut next_seq = vec![0u64; partitions as usize];
        {
            let mut stmt = writer.prepare("SELECT partition, next_seq FROM partitions")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (p, n) = row?;
                if let Some(slot) = usize::try_from(p).ok().and_then(|p| next_seq.get_mut(p)) {
                    *slot = u64::try_from(n).unwrap_or(0);
                }
            }
        }
        let readers = (0..READERS)
            .map(|_| open(&path, true).map(Mutex::new))
            .collect::<SqlResult<Vec<_>>>()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (commit_tx, commit_rx) = watch::channel(0u64);
        // No `WalRewinder` here, unlike the registry database: under full telemetry load the
        // writer's own checkpoint every 250 ms raised PUBACK p99 (6-7 -> 9-23 ms in
        // 10x10 runs) for a better p999; the WAL stays bounded by the autocheckpoint above.
        let checkpoints = crate::sqlite::Checkpoints::new();
        let log = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || {
                let metrics = crate::metrics::CommitMetrics::new(log);
                writer_loop(writer, rx, next_seq, partitions, commit_tx, &metrics)
            })?;
        let checkpointer = open(&path, false)?;
        checkpoints.spawn(checkpointer, "telemetry-checkpoint")?;
        Ok(Self {
            inner: Arc::new(Inner {
                stop: checkpoints.stop,
                tx,
                readers,
                next_reader: AtomicUsize::new(0),
                partitions,
                commits: commit_rx,
            }),
        })
    }

    async fn read_with<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> SqlResult<R> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let n = inner.readers.len();
            let start = inner.next_reader.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                if let Ok(conn) = inner.readers[(start + i) % n].try_lock() {
                    return f(&conn).map_err(StoreError::from);
                }
            }
            let conn = inner.readers[start % n]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            f(&conn).map_err(StoreError::from)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn command<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<R>>) -> Command,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Task("telemetry writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Task("telemetry writer stopped".into()))?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    mut next_seq: Vec<u64>,
    partitions: u32,
    commits: watch::Sender<u64>,
    metrics: &crate::metrics::CommitMetrics,
) {
    let mut batch: Vec<Command> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        if let Command::Retention(r, now, reply) = first {
            let _ =
                reply.send(retention_step(&mut conn, partitions, r, now).map_err(StoreError::from));
            continue;
        }
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                // Retention runs alone, after this batch.
                Ok(Command::Retention(r, now, reply)) => {
                    commit_batch(&mut conn, &mut batch, &mut next_seq, &commits, metrics);
                    let _ = reply.send(
                        retention_step(&mut conn, partitions, r, now).map_err(StoreError::from),
                    );
                }
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, &mut batch, &mut next_seq, &commits, metrics);
    }
}

fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<Command>,
    next_seq: &mut [u64],
    commits: &watch::Sender<u64>,
    metrics: &crate::metrics::CommitMetrics,
) {
    if batch.is_empty() {
        return;
    }
    let before = next_seq.to_vec();
    let started = std::time::Instant::now();
    let result = (|| -> SqlResult<Vec<Option<(u32, u64)>>> {
        let tx = conn.transaction()?;
        let mut assigned = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (pos, enqueued_ms, device_id, module_id, props, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut checkpoint = tx.prepare_cached(
                "INSERT INTO checkpoints (grp, partition, next_seq) VALUES (?1, ?2, ?3) ON CONFLICT (grp, partition) DO UPDATE SET next_seq = excluded.next_seq",
            )?;
            for cmd in batch.iter() {
                match cmd {
                    Command::Append(e, _) => {
                        let p = e.partition;
                        let slot = &mut next_seq[p as usize];
                        let seq = *slot;
                        *slot += 1;
                        insert.execute(params![
                            pos_of(p, seq),
                            e.enqueued_ms,
                            e.device_id,
                            e.module_id,
                            e.props,
                            e.body
                        ])?;
                        assigned.push(Some((p, seq)));
                    }
                    Command::Checkpoint(g, p, n, _) => {
                        checkpoint.execute(params![g, p, *n as i64])?;
                        assigned.push(None);
                    }
                    Command::Retention(..) => assigned.push(None),
                }
            }
            let mut hw =
                tx.prepare_cached("UPDATE partitions SET next_seq = ?2 WHERE partition = ?1")?;
            for (p, (now, was)) in next_seq.iter().zip(before.iter()).enumerate() {
                if now != was {
                    hw.execute(params![p as i64, *now as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(assigned)
    })();
    match result {
        Ok(assigned) => {
            metrics.committed(started.elapsed(), batch.len());
            for (cmd, pos) in batch.drain(..).zip(assigned) {
                match cmd {
                    Command::Append(_, reply) => {
                        let _ =
                            reply.send(pos.ok_or_else(|| StoreError::Task("no position".into())));
                    }
                    Command::Checkpoint(.., reply) => {
                        let _ = reply.send(Ok(()));
                    }
                    Command::Retention(.., reply) => {
                        let _ = reply.send(Ok(0));
                    }
                }
            }
            commits.send_modify(|c| *c += 1);
        }
        Err(e) => {
            // Nothing of the batch is stored: every caller hears so, and the sequence counters
            // go back to what the disk says.
            next_seq.copy_from_slice(&before);
            tracing::error!(error = %e, "telemetry commit failed");
            let msg = e.to_string();
            let full = e.is_full();
            for cmd in batch.drain(..) {
                let err = || {
                    let msg = format!("telemetry commit failed: {msg}");
                    if full {
                        StoreError::Full(msg.into())
                    } else {
                        StoreError::Task(msg)
                    }
                };
                match cmd {
                    Command::Append(_, reply) => {
                        let _ = reply.send(Err(err()));
                    }
                    Command::Checkpoint(.., reply) => {
                        let _ = reply.send(Err(err()));
                    }
                    Command::Retention(.., reply) => {
                        let _ = reply.send(Err(err()));
                    }
                }
            }
        }
    }
}

/// Deletes one chunk of expired messages (by age, then by size), oldest first in each
/// partition. Only the oldest rows of a partition are examined, so a step costs the same
/// however large the log is.
fn retention_step(
    conn: &mut Connection,
    partitions: u32,
    r: Retention,
    now_ms: i64,
) -> SqlResult<u64> {
    let cutoff = now_ms.saturating_sub(r.max_age_ms);
    let per_partition = (RETENTION_CHUNK / partitions.max(1) as usize).max(1) as i64;
    let mut deleted = 0u64;
    for p in 0..partitions {
        deleted += conn.execute(
            "DELETE FROM events WHERE pos IN (SELECT pos FROM events WHERE pos >= ?1 AND pos < ?2 ORDER BY pos LIMIT ?3) AND enqueued_ms < ?4",
            params![pos_of(p, 0), pos_of(p + 1, 0), per_partition, cutoff],
        )? as u64;
    }
    if deleted == 0 {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let used = u64::try_from((pages - free) * page_size).unwrap_or(0);
        if used > r.max_bytes {
            for p in 0..partitions {
                deleted += conn.execute(
                    "DELETE FROM events WHERE pos IN (SELECT pos FROM events WHERE pos >= ?1 AND pos < ?2 ORDER BY pos LIMIT ?3)",
                    params![pos_of(p, 0), pos_of(p + 1, 0), per_partition],
                )? as u64;
            }
        }
    }
    if deleted > 0 {
        conn.execute_batch("PRAGMA incremental_vacuum")?;
    }
    Ok(deleted)
}

/// An `events` row: position, enqueued, device, module, props JSON, body.
type EventRow = (i64, i64, String, Option<String>, String, Vec<u8>);

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

/// The JSON of an event's properties, borrowed for encoding.
#[derive(serde::Serialize)]
struct PropsRef<'a> {
    #[serde(rename = "s")]
    system: &'a BTreeMap<String, String>,
    #[serde(rename = "a")]
    app: &'a [(String, Option<String>)],
}

#[async_trait]
impl TelemetryLog for SqliteTelemetry {
    async fn enqueue(&self, event: NewEvent) -> Result<Durable> {
        let props = serde_json::to_string(&PropsRef {
            system: &event.system_properties,
            app: &event.properties,
        })?;
        let encoded = EncodedEvent {
            partition: self.partition_of(&event.device_id),
            enqueued_ms: event.enqueued_ms,
            device_id: event.device_id,
            module_id: event.module_id,
            props,
            body: event.body,
        };
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Append(encoded, tx))
            .await
            .map_err(|_| StoreError::Task("telemetry writer stopped".into()))?;
        Ok(Box::pin(async move {
            rx.await
                .map_err(|_| StoreError::Task("telemetry writer stopped".into()))?
        }))
    }

    fn partition_count(&self) -> u32 {
        self.inner.partitions
    }

    fn partition_of(&self, device_id: &str) -> u32 {
        partition_for(device_id, self.inner.partitions)
    }

    async fn read(&self, partition: u32, from: u64, max: usize) -> Result<Vec<EventRecord>> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.read_with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT pos, enqueued_ms, device_id, module_id, props, body FROM events WHERE pos >= ?1 AND pos < ?2 ORDER BY pos LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![pos_of(partition, from), pos_of(partition + 1, 0), max],
                record_from_row,
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (pos, enq, device_id, module_id, props, body) = row?;
                let props: Props = serde_json::from_str(&props)?;
                let (p, sequence) = split_pos(pos);
                out.push(EventRecord {
                    partition: p,
                    sequence,
                    event: NewEvent {
                        device_id,
                        module_id,
                        enqueued_ms: enq,
                        system_properties: props.system,
                        properties: props.app,
                        body,
                    },
                });
            }
            Ok(out)
        })
        .await
    }

    async fn resolve(&self, partition: u32, position: StartPosition) -> Result<u64> {
        self.read_with(move |conn| {
            let next: i64 = conn
                .query_row(
                    "SELECT next_seq FROM partitions WHERE partition = ?1",
                    params![partition],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            let (lo, hi) = (pos_of(partition, 0), pos_of(partition + 1, 0));
            let first = |sql: &str, arg: i64| -> SqlResult<i64> {
                Ok(conn
                    .query_row(sql, params![lo, hi, arg], |r| r.get::<_, i64>(0))
                    .optional()?
                    .map(|pos| split_pos(pos).1 as i64)
                    .unwrap_or(next))
            };
            let seq = match position {
                StartPosition::End => next,
                StartPosition::Sequence(s) => i64::try_from(s).unwrap_or(i64::MAX).min(next),
                StartPosition::Start => first(
                    "SELECT pos FROM events WHERE pos >= ?1 AND pos < ?2 AND ?3 = ?3 ORDER BY pos LIMIT 1",
                    0,
                )?,
                StartPosition::EnqueuedAt(t) => first(
                    "SELECT pos FROM events WHERE pos >= ?1 AND pos < ?2 AND enqueued_ms >= ?3 ORDER BY pos LIMIT 1",
                    t,
                )?,
            };
            Ok(u64::try_from(seq).unwrap_or(0))
        })
        .await
    }

    fn watch_commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.clone()
    }

    async fn checkpoints(&self, group: &str) -> Result<BTreeMap<u32, u64>> {
        let g = group.to_string();
        self.read_with(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT partition, next_seq FROM checkpoints WHERE grp = ?1")?;
            let rows = stmt.query_map(params![g], |r| {
                Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (p, n) = row?;
                out.insert(p, u64::try_from(n).unwrap_or(0));
            }
            Ok(out)
        })
        .await
    }

    async fn save_checkpoint(&self, group: &str, partition: u32, next_sequence: u64) -> Result<()> {
        let g = group.to_string();
        self.command(|reply| Command::Checkpoint(g, partition, next_sequence, reply))
            .await
    }

    async fn enforce_retention(&self, retention: Retention, now: Timestamp) -> Result<u64> {
        let now_ms = now.unix_ms();
        let mut total = 0;
        loop {
            let n = self
                .command(|reply| Command::Retention(retention, now_ms, reply))
                .await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ferrohub_store::testsuite::ev;

    #[tokio::test]
    async fn appends_are_ordered_per_partition_and_survive_reopen() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let log = SqliteTelemetry::open(dir.path(), 4)?;
        let p = log.partition_of("dev1");
        let mut handles = Vec::new();
        for i in 0..200u32 {
            let log = log.clone();
            handles.push(tokio::spawn(async move {
                log.append(ev("dev1", 1000, &i.to_be_bytes())).await
            }));
        }
        let mut seqs = Vec::new();
        for h in handles {
            let (part, seq) = h.await.map_err(|e| StoreError::Task(e.to_string()))??;
            assert_eq!(part, p);
            seqs.push(seq);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (0..200).collect::<Vec<u64>>());
        drop(log);
        let log = SqliteTelemetry::open(dir.path(), 8)?;
        assert_eq!(
            log.partition_count(),
            4,
            "partition count is fixed at creation"
        );
        let all = log.read(p, 0, 1000).await?;
        assert_eq!(all.len(), 200);
        assert_eq!(all[0].event, ev("dev1", 1000, &all[0].event.body));
        let (_, seq) = log.append(ev("dev1", 1000, b"x")).await?;
        assert_eq!(seq, 200, "sequence numbers continue after reopen");
        Ok(())
    }

    #[tokio::test]
    async fn retention_removes_old_messages_but_never_reuses_sequences() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let log = SqliteTelemetry::open(dir.path(), 1)?;
        for t in [10, 20, 30, 40] {
            log.append(ev("d", t, b"x")).await?;
        }
        let r = Retention {
            max_age_ms: 15,
            max_bytes: u64::MAX,
        };
        assert_eq!(
            log.enforce_retention(r, Timestamp::from_unix_ms(40))
                .await?,
            2
        );
        let left: Vec<u64> = log
            .read(0, 0, 10)
            .await?
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(left, vec![2, 3]);
        assert_eq!(log.resolve(0, StartPosition::Start).await?, 2);
        assert_eq!(
            log.enforce_retention(
                Retention {
                    max_age_ms: 0,
                    max_bytes: u64::MAX
                },
                Timestamp::from_unix_ms(1000)
            )
            .await?,
            2
        );
        drop(log);
        let log = SqliteTelemetry::open(dir.path(), 1)?;
        assert_eq!(log.append(ev("d", 50, b"x")).await?.1, 4);
        // Size budget: a tiny budget removes the oldest first.
        for t in 0..50 {
            log.append(ev("d", 100 + t, &[0u8; 4096])).await?;
        }
        let mode: i64 = Connection::open(dir.path().join(TELEMETRY_DB_FILE))
            .and_then(|c| c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)))
            .map_err(crate::error::SqlError::from)?;
        assert_eq!(
            mode, 2,
            "incremental auto-vacuum, so retention can shrink the file"
        );
        let removed = log
            .enforce_retention(
                Retention {
                    max_age_ms: i64::MAX / 2,
                    max_bytes: 64 * 1024,
                },
                Timestamp::from_unix_ms(200),
            )
            .await?;
        assert!(removed > 0);
        let first = log.resolve(0, StartPosition::Start).await?;
        assert!(first > 5, "oldest went first: starts at {first}");
        Ok(())
    }
}
