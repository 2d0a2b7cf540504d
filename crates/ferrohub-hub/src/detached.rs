//! Running a service operation to its end whatever happens to its caller.
//!
//! A front end's request future is dropped when its client goes away (axum drops the handler
//! when the HTTP connection closes). An operation that commits and then has follow-ups (a
//! desired-property notification, a C2D wake-up, closing a connection, forgetting a session)
//! must not stop between the two: it runs as its own task, and the caller only waits for it.

use std::future::Future;
use std::sync::Arc;

use ferrohub_iothub::ErrorCode;

use crate::error::HubError;
use crate::Hub;

impl Hub {
    /// Runs `work` as a task of its own and waits for its result; dropping the returned
    /// future leaves the task running.
    pub(crate) async fn to_the_end<T, F, Fut>(&self, work: F) -> Result<T, HubError>
    where
        F: FnOnce(Arc<Hub>) -> Fut,
        Fut: Future<Output = Result<T, HubError>> + Send + 'static,
        T: Send + 'static,
    {
        let hub = self.me.upgrade().ok_or_else(|| {
            HubError::new(ErrorCode::ServiceUnavailable, "the hub is shutting down")
        })?;
        match tokio::spawn(work(hub)).await {
            Ok(result) => result,
            Err(e) => Err(HubError::internal("hub operation", e)),
        }
    }
}
