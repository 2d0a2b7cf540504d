//! The engine's internal error: a rusqlite failure or a store-level outcome, so `?` works on
//! both inside jobs. It becomes a [`StoreError`] at the trait boundary.

use ferrohub_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SqlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
}

impl From<serde_json::Error> for SqlError {
    fn from(e: serde_json::Error) -> Self {
        SqlError::Store(StoreError::Corrupt(e))
    }
}

impl From<std::io::Error> for SqlError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull {
            return SqlError::Store(StoreError::Full(Box::new(e)));
        }
        SqlError::Store(StoreError::Io(e))
    }
}

impl SqlError {
    /// Whether SQLite refused the write for want of space (`SQLITE_FULL`).
    pub(crate) fn is_full(&self) -> bool {
        match self {
            SqlError::Sql(e) => is_full(e),
            SqlError::Store(StoreError::Full(_)) => true,
            SqlError::Store(_) => false,
        }
    }
}

pub(crate) fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

impl From<SqlError> for StoreError {
    fn from(e: SqlError) -> Self {
        match e {
            SqlError::Store(e) => e,
            // The rusqlite error stays the source, so callers can still tell a full disk or
            // a busy database from a bug by downcasting.
            SqlError::Sql(e) if is_full(&e) => StoreError::Full(Box::new(e)),
            SqlError::Sql(e) => StoreError::Backend(Box::new(e)),
        }
    }
}

pub(crate) type SqlResult<T> = std::result::Result<T, SqlError>;
