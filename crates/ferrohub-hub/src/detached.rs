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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use ferrohub_iothub::Identity;
    use ferrohub_store::IfMatch;
    use serde_json::json;

    use crate::registry::IdentityRequest;
    use crate::testing::{connect, fixture, R};

    /// Starts `call` as the caller's task, waits until its commit is done, then cancels the
    /// caller, as axum does when the client hangs up, and lets the store answer.
    async fn cancel_after_commit<F>(f: &crate::testing::Fixture, call: F) -> R
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        f.store.hold_commits.store(true, Ordering::SeqCst);
        let caller = tokio::spawn(call);
        tokio::time::timeout(Duration::from_secs(5), f.store.committed.notified()).await?;
        caller.abort();
        assert!(caller.await.is_err_and(|e| e.is_cancelled()));
        f.store.hold_commits.store(false, Ordering::SeqCst);
        f.store.release.notify_one();
        Ok(())
    }

    #[tokio::test]
    async fn a_cancelled_twin_update_still_notifies_the_device() -> R {
        let f = fixture()?;
        f.hub
            .put_device("d1", IdentityRequest::default(), None)
            .await?;
        let (_client, mut pushed) =
            connect(&f.hub, "d1", &["$iothub/twin/PATCH/properties/desired/#"]).await;
        let hub = f.hub.clone();
        cancel_after_commit(&f, async move {
            let patch = json!({"properties": {"desired": {"setpoint": 7}}});
            hub.service_update_twin(&Identity::device("d1"), patch, false, IfMatch::Any)
                .await
        })
        .await?;
        let msg = tokio::time::timeout(Duration::from_secs(5), pushed.recv())
            .await?
            .ok_or("link closed")?;
        assert_eq!(
            msg.topic,
            "$iothub/twin/PATCH/properties/desired/?$version=2"
        );
        let body: serde_json::Value = serde_json::from_slice(&msg.payload)?;
        assert_eq!(body["setpoint"], 7);
        Ok(())
    }

    #[tokio::test]
    async fn a_cancelled_c2d_send_still_wakes_the_delivery() -> R {
        let f = fixture()?;
        f.hub
            .put_device("d1", IdentityRequest::default(), None)
            .await?;
        let (_client, mut pushed) =
            connect(&f.hub, "d1", &["devices/d1/messages/devicebound/#"]).await;
        let hub = f.hub.clone();
        cancel_after_commit(&f, async move {
            let req = crate::c2d::SendRequest {
                payload: b"hi".to_vec(),
                ..Default::default()
            };
            hub.c2d_send(&Identity::device("d1"), req).await
        })
        .await?;
        let msg = tokio::time::timeout(Duration::from_secs(5), pushed.recv())
            .await?
            .ok_or("link closed")?;
        assert!(msg.topic.starts_with("devices/d1/messages/devicebound/"));
        assert_eq!(&msg.payload[..], b"hi");
        Ok(())
    }
}
