//! The C2D feedback queue as back ends read it: a batch of records locked under a token for
//! the hub's feedback lock time, then completed (deleted) or abandoned (offered again).

use ferrohub_iothub::ErrorCode;
use ferrohub_store::{FeedbackBatch, StoreError, Timestamp};

use crate::error::HubError;
use crate::Hub;

/// Most feedback records handed out in one batch.
pub const MAX_FEEDBACK_BATCH: usize = 100;

fn lock_lost(token: &str) -> HubError {
    HubError::new(
        ErrorCode::DeviceMessageLockLost,
        format!("lock token {token} is unknown or its lock has expired"),
    )
}

fn lock_result(r: Result<(), StoreError>, token: &str) -> Result<(), HubError> {
    match r {
        Ok(()) => Ok(()),
        Err(StoreError::LockLost) | Err(StoreError::NotFound) => Err(lock_lost(token)),
        Err(e) => Err(HubError::from_store(e, lock_lost(token), lock_lost(token))),
    }
}

/// What to do with a locked feedback batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Complete,
    Abandon,
}

impl Hub {
    /// Changes whenever feedback may have been added to the queue or released back into it
    /// (a C2D message settled with feedback asked for, a purge, an expiry, an abandon). A
    /// receiver marks the value seen, looks at the queue, and waits for the next change.
    pub fn feedback_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.feedback_seq.subscribe()
    }

    pub(crate) fn feedback_produced(&self) {
        self.feedback_seq.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Up to `max` (1 to [`MAX_FEEDBACK_BATCH`], all of that when `None`) feedback records,
    /// locked under the batch's token; `None` when there is nothing to receive.
    pub async fn feedback_receive(
        &self,
        max: Option<usize>,
    ) -> Result<Option<FeedbackBatch>, HubError> {
        let max = max.unwrap_or(MAX_FEEDBACK_BATCH);
        if !(1..=MAX_FEEDBACK_BATCH).contains(&max) {
            return Err(HubError::argument(format!(
                "max must be 1 to {MAX_FEEDBACK_BATCH}"
            )));
        }
        self.store
            .feedback_receive(Timestamp::now(), self.settings.c2d.feedback_lock, max)
            .await
            .map_err(|e| HubError::from_store(e, lock_lost(""), lock_lost("")))
    }

    /// Completes or abandons the batch locked under `token` (quotes around it, as an `ETag`
    /// carries it, are ignored).
    pub async fn feedback_settle(&self, token: &str, how: Settle) -> Result<(), HubError> {
        let token = token.trim_matches('"').to_string();
        self.to_the_end(move |hub| async move {
            let now = Timestamp::now();
            let r = match how {
                Settle::Complete => hub.store.feedback_complete(&token, now).await,
                Settle::Abandon => {
                    let r = hub.store.feedback_abandon(&token, now).await;
                    hub.feedback_produced();
                    r
                }
            };
            lock_result(r, &token)
        })
        .await
    }
}
