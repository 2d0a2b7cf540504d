//! The engine's own error type and how it maps onto the store's.

use ferrohub_store::StoreError;

/// What can go wrong inside the segment log.
#[derive(Debug, thiserror::Error)]
pub enum SegError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is corrupt: {1}")]
    Corrupt(String, String),
    #[error("the telemetry writer stopped")]
    Stopped,
}

impl SegError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        SegError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// A full disk or quota: the hub answers "busy, retry" instead of failing the device.
    pub fn is_full(&self) -> bool {
        match self {
            SegError::Io { source, .. } => is_full(source),
            _ => false,
        }
    }
}

pub(crate) fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl From<SegError> for StoreError {
    fn from(e: SegError) -> Self {
        if e.is_full() {
            StoreError::Full(Box::new(e))
        } else {
            StoreError::Backend(Box::new(e))
        }
    }
}

pub type SegResult<T> = std::result::Result<T, SegError>;
