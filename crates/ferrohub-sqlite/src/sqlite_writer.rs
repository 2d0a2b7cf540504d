//! The group-commit writer of the registry database: one thread owns the writer connection and
//! commits queued write jobs in batches, so one WAL fsync covers many durable writes.
//!
//! Each job runs inside its own savepoint of the batch transaction: a job that fails is rolled
//! back alone and the others still commit. Callers are answered only after the batch's COMMIT,
//! so "returned Ok" still means "on disk". When the queue is full, callers wait asynchronously;
//! the runtime never blocks on the disk.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use ferrohub_store::StoreError;

use crate::error::{SqlError, SqlResult as Result};

/// Most jobs one commit takes: bounds how long a transaction holds the write lock and how long
/// the first caller of a batch waits for the last one.
const MAX_BATCH: usize = 256;
/// Jobs waiting for the writer before `submit` makes callers wait.
const QUEUE: usize = 1024;

/// A write waiting for the writer thread.
trait Job: Send {
    /// Runs the write inside the batch (the writer has opened a savepoint for it).
    fn run(self: Box<Self>, conn: &Connection) -> Box<dyn Ran>;
    /// Answers the caller without running: the batch failed before the job's turn.
    fn fail(self: Box<Self>, err: SqlError);
}

/// A job that has run and waits for its batch's fate.
trait Ran: Send {
    /// Whether the job's changes are to be kept.
    fn ok(&self) -> bool;
    /// Whether the job failed for want of disk space.
    fn full(&self) -> bool;
    /// Answers the caller; `batch_err` is set when the batch did not commit.
    fn answer(self: Box<Self>, batch_err: Option<SqlError>);
}

struct WriteJob<F, R> {
    f: F,
    reply: oneshot::Sender<Result<R>>,
}

struct Finished<R> {
    result: Result<R>,
    reply: oneshot::Sender<Result<R>>,
}

impl<F, R> Job for WriteJob<F, R>
where
    F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> Box<dyn Ran> {
        let WriteJob { f, reply } = *self;
        // A bug in one job must cost that job, not the thread every write of the process
        // depends on. The savepoint rollback undoes whatever the job had done when it panicked.
        let result = match catch_unwind(AssertUnwindSafe(|| f(conn))) {
            Ok(r) => r,
            Err(panic) => Err(StoreError::Task(format!(
                "write panicked: {}",
                panic_message(panic.as_ref())
            ))
            .into()),
        };
        Box::new(Finished { result, reply })
    }

    fn fail(self: Box<Self>, err: SqlError) {
        let _ = self.reply.send(Err(err));
    }
}

impl<R: Send + 'static> Ran for Finished<R> {
    fn ok(&self) -> bool {
        self.result.is_ok()
    }

    fn full(&self) -> bool {
        self.result.as_ref().err().is_some_and(SqlError::is_full)
    }

    fn answer(self: Box<Self>, batch_err: Option<SqlError>) {
        // A job that failed on its own wrote nothing either way, so its own error is the more
        // useful answer even when the batch also failed.
        let result = match (self.result, batch_err) {
            (Ok(_), Some(e)) => Err(e),
            (r, _) => r,
        };
        // The caller may have given up waiting (its future dropped); nothing to do then.
        let _ = self.reply.send(result);
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// The sending side, held by every store handle; the thread ends when the last one is dropped.
pub(crate) struct Writer {
    tx: mpsc::Sender<Box<dyn Job>>,
}

impl Writer {
    /// Starts the writer thread on `conn`, which must have its schema in place.
    pub(crate) fn spawn(conn: Connection, rewind: crate::sqlite::WalRewinder) -> Result<Self> {
        // Every write path prepares its statements through the cache; the default 16 entries
        // would evict them between batches once C2D, twins and registry writes interleave.
        conn.set_prepared_statement_cache_capacity(crate::sqlite::STATEMENT_CACHE);
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx, rewind))?;
        Ok(Self { tx })
    }

    /// Runs `f` in the next batch and returns its result once that batch is durable.
    pub(crate) async fn submit<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Box::new(WriteJob { f, reply }))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Jobs queued and not yet taken by the writer.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

fn stopped() -> SqlError {
    StoreError::Task("store writer thread stopped".into()).into()
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    mut rewind: crate::sqlite::WalRewinder,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(&conn, &mut batch);
        rewind.after_commit(&conn);
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// A copy of a batch-level error for each caller. SQLite failures keep their code (callers map
/// e.g. a full disk differently from a bug); anything else becomes its message.
fn duplicate(e: &SqlError) -> SqlError {
    match e {
        SqlError::Sql(rusqlite::Error::SqliteFailure(code, msg)) => {
            SqlError::Sql(rusqlite::Error::SqliteFailure(*code, msg.clone()))
        }
        e if e.is_full() => StoreError::Full(e.to_string().into()).into(),
        other => StoreError::Task(other.to_string()).into(),
    }
}

fn commit_batch(conn: &Connection, batch: &mut Vec<Box<dyn Job>>) {
    let mut jobs = batch.drain(..);
    // A transaction left open by a failed ROLLBACK would make every later BEGIN fail; retry
    // the rollback first so one bad moment does not stop all writes for good.
    if !conn.is_autocommit() {
        if let Err(e) = exec(conn, "ROLLBACK") {
            tracing::error!(error = %e, "store writer could not end a stale transaction");
        }
    }
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let e = SqlError::Sql(e);
        tracing::error!(error = %e, "store write batch could not begin");
        for job in jobs {
            job.fail(duplicate(&e));
        }
        return;
    }
    let mut ran: Vec<Box<dyn Ran>> = Vec::with_capacity(jobs.len());
    let mut broken: Option<SqlError> = None;
    for job in jobs.by_ref() {
        if let Err(e) = exec(conn, "SAVEPOINT job") {
            let e = SqlError::Sql(e);
            job.fail(duplicate(&e));
            broken = Some(e);
            break;
        }
        let done = job.run(conn);
        let full = done.full();
        let end = if done.ok() {
            exec(conn, "RELEASE job")
        } else {
            exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"))
        };
        ran.push(done);
        if let Err(e) = end {
            broken = Some(SqlError::Sql(e));
            break;
        }
        // Some failures (I/O error, full disk) make SQLite roll back the whole transaction on
        // its own; the jobs before this one are then lost too.
        if conn.is_autocommit() {
            let why = "SQLite rolled back the write batch after an error";
            broken = Some(if full {
                StoreError::Full(why.into()).into()
            } else {
                StoreError::Task(why.into()).into()
            });
            break;
        }
    }
    let batch_err = match broken {
        Some(e) => Some(e),
        None => exec(conn, "COMMIT").err().map(SqlError::Sql),
    };
    if let Some(e) = &batch_err {
        tracing::error!(error = %e, "store write batch failed");
        if !conn.is_autocommit() {
            if let Err(e) = exec(conn, "ROLLBACK") {
                tracing::error!(error = %e, "store write batch rollback failed");
            }
        }
    }
    for done in ran {
        done.answer(batch_err.as_ref().map(duplicate));
    }
    for job in jobs {
        // Only reached when the batch broke, so there is an error to give.
        job.fail(
            batch_err
                .as_ref()
                .map(duplicate)
                .unwrap_or_else(|| StoreError::Task("write batch aborted".into()).into()),
        );
    }
}
