//! Feedback receiver tests: locked batches, completing, abandoning and lock expiry.

use std::time::Duration;

use crate::{FeedbackBatch, FeedbackRequest, FeedbackStatus, Result, Store, StoreError};

use super::{ms, msg, with_ack, with_identities, NOW};

/// Settles `n` messages asking for full feedback, so `n` feedback records exist.
async fn make_feedback<S: Store>(store: &S, n: usize) -> Result<()> {
    for i in 0..n {
        let m = store
            .c2d_enqueue(
                with_ack(msg("d1", None, &format!("f{i}")), FeedbackRequest::Full),
                100,
            )
            .await?;
        store
            .c2d_settle("d1", None, m.sequence_number, FeedbackStatus::Success, NOW)
            .await?;
    }
    Ok(())
}

fn ids(batch: &FeedbackBatch) -> Vec<&str> {
    batch
        .records
        .iter()
        .map(|r| r.original_message_id.as_str())
        .collect()
}

pub async fn feedback_locks_hide_records_until_completed_or_expired<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    assert!(store
        .feedback_receive(ms(0), Duration::from_millis(1_000), 10)
        .await?
        .is_none());
    make_feedback(store, 3).await?;

    let t = 1_000_000;
    let first = store
        .feedback_receive(ms(t), Duration::from_millis(1_000), 2)
        .await?
        .ok_or(StoreError::NotFound)?;
    assert_eq!(ids(&first), ["f0", "f1"]);
    assert_eq!(first.lock_token.len(), 32);
    let second = store
        .feedback_receive(ms(t), Duration::from_millis(1_000), 10)
        .await?
        .ok_or(StoreError::NotFound)?;
    assert_eq!(
        ids(&second),
        ["f2"],
        "locked records are not received again"
    );
    assert_ne!(first.lock_token, second.lock_token);
    assert!(store
        .feedback_receive(ms(t + 999), Duration::from_millis(1_000), 10)
        .await?
        .is_none());

    store
        .feedback_complete(&second.lock_token, ms(t + 999))
        .await?;
    assert!(matches!(
        store
            .feedback_complete(&second.lock_token, ms(t + 999))
            .await,
        Err(StoreError::LockLost)
    ));

    // The first lock expires at t + 1000: too late to complete, and receivable again.
    assert!(matches!(
        store
            .feedback_complete(&first.lock_token, ms(t + 1_000))
            .await,
        Err(StoreError::LockLost)
    ));
    let again = store
        .feedback_receive(ms(t + 1_000), Duration::from_millis(1_000), 10)
        .await?
        .ok_or(StoreError::NotFound)?;
    assert_eq!(ids(&again), ["f0", "f1"]);
    assert!(matches!(
        store
            .feedback_complete(&first.lock_token, ms(t + 1_001))
            .await,
        Err(StoreError::LockLost)
    ));
    store
        .feedback_complete(&again.lock_token, ms(t + 1_001))
        .await?;
    assert!(store
        .feedback_receive(ms(t + 10_000), Duration::from_millis(1_000), 10)
        .await?
        .is_none());
    assert!(matches!(
        store.feedback_complete("unknown", ms(0)).await,
        Err(StoreError::LockLost)
    ));
    Ok(())
}

pub async fn abandoned_feedback_can_be_received_at_once<S: Store + Clone>(store: &S) -> Result<()> {
    with_identities(store).await?;
    make_feedback(store, 2).await?;
    let t = 5_000;
    let batch = store
        .feedback_receive(ms(t), Duration::from_millis(60_000), 10)
        .await?
        .ok_or(StoreError::NotFound)?;
    assert!(store
        .feedback_receive(ms(t), Duration::from_millis(60_000), 10)
        .await?
        .is_none());
    store.feedback_abandon(&batch.lock_token, ms(t + 1)).await?;
    assert!(matches!(
        store.feedback_abandon(&batch.lock_token, ms(t + 1)).await,
        Err(StoreError::LockLost)
    ));
    assert!(matches!(
        store.feedback_complete(&batch.lock_token, ms(t + 1)).await,
        Err(StoreError::LockLost)
    ));
    let again = store
        .feedback_receive(ms(t + 1), Duration::from_millis(60_000), 10)
        .await?
        .ok_or(StoreError::NotFound)?;
    assert_eq!(ids(&again), ["f0", "f1"]);
    // An expired lock cannot be abandoned either.
    assert!(matches!(
        store
            .feedback_abandon(&again.lock_token, ms(t + 1 + 60_000))
            .await,
        Err(StoreError::LockLost)
    ));
    Ok(())
}
