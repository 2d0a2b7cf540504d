//! The one error type of the hub's services: the IoT Hub error code a failure maps to (and so
//! its HTTP status and its CONNACK/twin/REST rendering, which each front end does in one place)
//! and a message for the caller.

use ferrohub_iothub::ErrorCode;
use ferrohub_store::StoreError;

use crate::methods::MethodError;
use crate::twins::TwinFailure;
use crate::BoxError;

/// A failed hub operation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HubError {
    code: ErrorCode,
    message: String,
    /// An HTTP status to use instead of the code's, for resources IoT Hub has no code for
    /// (a missing certificate is `InvalidOperation` with 404).
    status: Option<u16>,
    #[source]
    source: Option<BoxError>,
}

impl HubError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status: None,
            source: None,
        }
    }

    pub fn argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::IotHubUnauthorizedAccess, "Unauthorized")
    }

    pub fn device_not_found(id: &str) -> Self {
        Self::new(
            ErrorCode::DeviceNotFound,
            format!("Device {id} cannot be found."),
        )
    }

    pub fn module_not_found(id: &str, mid: &str) -> Self {
        Self::new(
            ErrorCode::ModuleNotFound,
            format!("Module {mid} on device {id} cannot be found."),
        )
    }

    /// A failure of the storage engine (or another internal part): logged here, with its
    /// cause, and reported to the caller without the details.
    pub fn internal(what: &str, cause: impl Into<BoxError>) -> Self {
        let cause = cause.into();
        tracing::error!(error = %cause, "{what} failed");
        Self {
            code: ErrorCode::ServerError,
            message: "internal storage error".into(),
            status: None,
            source: Some(cause),
        }
    }

    /// The store has no room for a write: nothing was stored, and a retry after space is freed
    /// succeeds. IoT Hub answers a hub that cannot take writes with 503 `ServiceUnavailable`,
    /// which every SDK retries.
    pub fn storage_full(cause: impl Into<BoxError>) -> Self {
        let cause = cause.into();
        tracing::error!(error = %cause, error_code = 503001, "write refused: the hub's storage is full");
        Self {
            code: ErrorCode::ServiceUnavailable,
            message: "the hub's storage is full; nothing was stored, retry later".into(),
            status: None,
            source: Some(cause),
        }
    }

    /// Maps a store failure: `NotFound` and `AlreadyExists` mean what the caller says for its
    /// resource, a failed `If-Match` is `PreconditionFailed`, anything else is the engine's.
    pub fn from_store(e: StoreError, not_found: HubError, exists: HubError) -> Self {
        match e {
            StoreError::NotFound => not_found,
            StoreError::AlreadyExists => exists,
            StoreError::PreconditionFailed => Self::new(
                ErrorCode::PreconditionFailed,
                "the If-Match etag does not match the current one",
            ),
            StoreError::Full(cause) => Self::storage_full(cause),
            other => Self::internal("store call", other),
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status a REST front end answers with.
    pub fn http_status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.code.http_status())
    }
}

/// Engine failures where the operation has no resource of its own that could be missing.
impl From<StoreError> for HubError {
    fn from(e: StoreError) -> Self {
        let server = || Self::new(ErrorCode::ServerError, "internal storage error");
        Self::from_store(e, server(), server())
    }
}

impl From<TwinFailure> for HubError {
    fn from(f: TwinFailure) -> Self {
        let f = match f {
            TwinFailure::Store(StoreError::Full(cause)) => return Self::storage_full(cause),
            f => f,
        };
        let code = f.code();
        if code == ErrorCode::ServerError {
            return Self::internal("twin operation", f);
        }
        Self::new(code, f.to_string())
    }
}

impl From<MethodError> for HubError {
    fn from(e: MethodError) -> Self {
        let e = match e {
            MethodError::Store(StoreError::Full(cause)) => return Self::storage_full(cause),
            e => e,
        };
        let code = match &e {
            MethodError::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            MethodError::ModuleNotFound(_) => ErrorCode::ModuleNotFound,
            MethodError::NotOnline(_) => ErrorCode::DeviceNotOnline,
            MethodError::Timeout(..) => ErrorCode::GatewayTimeout,
            MethodError::Invalid(_) => ErrorCode::ArgumentInvalid,
            MethodError::Throttled => ErrorCode::ThrottlingException,
            MethodError::Store(_) => return Self::internal("method call", e),
        };
        Self::new(code, e.to_string())
    }
}

impl From<crate::c2d::SendError> for HubError {
    fn from(e: crate::c2d::SendError) -> Self {
        use crate::c2d::SendError;
        let e = match e {
            SendError::Store(StoreError::Full(cause)) => return Self::storage_full(cause),
            e => e,
        };
        let code = match &e {
            SendError::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            SendError::ModuleNotFound(_) => ErrorCode::ModuleNotFound,
            SendError::QueueFull(..) => ErrorCode::DeviceMaximumQueueDepthExceeded,
            SendError::TooLarge(_) => ErrorCode::MessageTooLarge,
            SendError::Invalid(_) => ErrorCode::ArgumentInvalid,
            SendError::Store(_) => return Self::internal("C2D operation", e),
        };
        Self::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_the_code_s_unless_overridden() {
        let e = HubError::device_not_found("d");
        assert_eq!(e.http_status(), 404);
        assert_eq!(e.code(), ErrorCode::DeviceNotFound);
        let e = HubError::new(ErrorCode::InvalidOperation, "x").with_status(404);
        assert_eq!(e.http_status(), 404);
    }

    #[test]
    fn engine_failures_are_server_errors() {
        let e = HubError::from(StoreError::NotFound);
        assert_eq!(e.code(), ErrorCode::ServerError);
        let e = HubError::from(StoreError::PreconditionFailed);
        assert_eq!(e.code(), ErrorCode::PreconditionFailed);
    }
}
