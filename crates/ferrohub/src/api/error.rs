//! Service API errors in IoT Hub's shape: the HTTP status of the error code, an
//! `iothub-errorcode` header, and a `{"Message": "ErrorCode:Name;text", "ExceptionMessage": ...}`
//! body. Every hub failure reaches a client through here (`From<HubError>`).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ferrohub_hub::HubError;
use ferrohub_iothub::ErrorCode;

/// Seconds a throttled client is asked to wait: the throttles refill every second.
const RETRY_AFTER_THROTTLED: &str = "1";
/// Seconds a client is asked to wait when the hub cannot take writes (its disk is full): long
/// enough not to hammer it, short enough to resume soon after space returns.
const RETRY_AFTER_UNAVAILABLE: &str = "10";

/// What a refused request was refused for, handed from the response to the request log
/// (`api::log_refusals`), which runs where the route and the caller's policy are known.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Overrides the status derived from the code (only for routes IoT Hub has no code for).
    status: Option<StatusCode>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status: None,
        }
    }

    pub fn argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        })
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        let mut out = ApiError::new(e.code(), e.message());
        if e.http_status() != e.code().http_status() {
            out.status = StatusCode::from_u16(e.http_status()).ok();
        }
        out
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let now = time::OffsetDateTime::now_utc();
        let stamp = ferrohub_hub::timefmt::iso(now);
        let body = serde_json::json!({
            "Message": format!("ErrorCode:{};{}", self.code.name(), self.message),
            "ExceptionMessage": format!(
                "Tracking ID:{}-G:0-TimeStamp:{}",
                ferrohub_hub::timefmt::tracking_id(),
                stamp
            ),
        });
        let mut resp = (self.status(), axum::Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(self.code.name()) {
            resp.headers_mut().insert("iothub-errorcode", v);
        }
        resp.extensions_mut().insert(Refusal {
            code: self.code,
            message: self.message.clone(),
        });
        // The service SDKs' retry policies honour Retry-After on these two; without it they
        // fall back to their own back-off, which starts far shorter.
        let retry_after = match self.status() {
            StatusCode::TOO_MANY_REQUESTS => Some(RETRY_AFTER_THROTTLED),
            StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_UNAVAILABLE),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from_static(secs),
            );
        }
        resp
    }
}
