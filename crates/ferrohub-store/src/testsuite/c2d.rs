//! Cloud-to-device queue tests: admission, sequence numbers, depth, peeking, delivery counts,
//! settling (with the feedback each ack asks for), purging, expiry and per-module queues.

use crate::{
    C2dMessage, FeedbackRecord, FeedbackRequest, FeedbackStatus, IfMatch, Result, Store,
    StoreError, Timestamp,
};

use super::{drain_feedback, msg, with_ack, with_identities, NOW};

fn with_expiry(mut m: C2dMessage, expiry_ms: i64) -> C2dMessage {
    m.expiry_time_ms = expiry_ms;
    m
}

fn seqs(msgs: &[C2dMessage]) -> Vec<u64> {
    msgs.iter().map(|m| m.sequence_number).collect()
}

pub async fn nothing_is_queued_for_an_identity_the_registry_does_not_hold<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    for (device, module) in [("ghost", None), ("d1", Some("ghost")), ("d2", Some("m2"))] {
        assert!(matches!(
            store.c2d_enqueue(msg(device, module, "x"), 10).await,
            Err(StoreError::NotFound)
        ));
        assert_eq!(store.c2d_count(device, module).await?, 0);
    }
    store.delete_device("d2", IfMatch::Any).await?;
    assert!(matches!(
        store.c2d_enqueue(msg("d2", None, "late"), 10).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.c2d_count("d2", None).await?, 0);
    Ok(())
}

pub async fn sequence_numbers_increase_per_queue_and_survive_emptying<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    let a = store.c2d_enqueue(msg("d1", None, "a"), 10).await?;
    let b = store.c2d_enqueue(msg("d1", None, "b"), 10).await?;
    let other = store.c2d_enqueue(msg("d2", None, "x"), 10).await?;
    assert_eq!((a.sequence_number, b.sequence_number), (1, 2));
    assert_eq!(other.sequence_number, 1);
    assert_eq!(a.payload, b"a");
    for s in [1, 2] {
        store
            .c2d_settle("d1", None, s, FeedbackStatus::Success, NOW)
            .await?;
    }
    assert_eq!(store.c2d_count("d1", None).await?, 0);
    let c = store.c2d_enqueue(msg("d1", None, "c"), 10).await?;
    assert_eq!(c.sequence_number, 3);
    assert_eq!(store.c2d_purge("d1", None, NOW).await?, 1);
    let d = store.c2d_enqueue(msg("d1", None, "d"), 10).await?;
    assert_eq!(d.sequence_number, 4);
    assert_eq!(store.c2d_peek("d1", None, 0, 10).await?, vec![d]);
    Ok(())
}

pub async fn enqueue_fails_with_queue_full_at_max_depth<S: Store + Clone>(store: &S) -> Result<()> {
    with_identities(store).await?;
    for i in 0..3 {
        store
            .c2d_enqueue(msg("d1", None, &format!("m{i}")), 3)
            .await?;
    }
    assert!(matches!(
        store.c2d_enqueue(msg("d1", None, "over"), 3).await,
        Err(StoreError::QueueFull)
    ));
    // A refused message uses no sequence number.
    store
        .c2d_settle("d1", None, 1, FeedbackStatus::Success, NOW)
        .await?;
    let next = store.c2d_enqueue(msg("d1", None, "fits"), 3).await?;
    assert_eq!(next.sequence_number, 4);
    assert_eq!(store.c2d_count("d1", None).await?, 3);
    Ok(())
}

pub async fn peek_returns_messages_after_a_sequence_in_order_up_to_limit<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(
            store
                .c2d_enqueue(msg("d1", None, &format!("m{i}")), 10)
                .await?,
        );
    }
    assert_eq!(
        seqs(&store.c2d_peek("d1", None, 0, 10).await?),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(seqs(&store.c2d_peek("d1", None, 2, 2).await?), [3, 4]);
    assert_eq!(
        seqs(&store.c2d_peek("d1", None, 5, 10).await?),
        Vec::<u64>::new()
    );
    assert_eq!(store.c2d_peek("d1", None, 0, 10).await?, sent);
    assert!(store.c2d_peek("d1", None, 0, 0).await?.is_empty());
    Ok(())
}

pub async fn deliveries_are_counted_up_to_the_mark_until_the_message_is_gone<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    let a = store.c2d_enqueue(msg("d1", None, "a"), 10).await?;
    let b = store.c2d_enqueue(msg("d1", None, "b"), 10).await?;
    let other = store.c2d_enqueue(msg("d2", None, "c"), 10).await?;
    assert_eq!(
        store
            .c2d_count_deliveries("d1", None, a.sequence_number)
            .await?,
        1
    );
    assert_eq!(
        store
            .c2d_count_deliveries("d1", None, b.sequence_number)
            .await?,
        2
    );
    let counts: Vec<u32> = store
        .c2d_peek("d1", None, 0, 10)
        .await?
        .iter()
        .map(|m| m.delivery_count)
        .collect();
    assert_eq!(counts, vec![2, 1]);
    assert_eq!(store.c2d_peek("d2", None, 0, 1).await?[0].delivery_count, 0);
    let settled = store
        .c2d_settle("d1", None, a.sequence_number, FeedbackStatus::Success, NOW)
        .await?;
    assert_eq!(settled.map(|m| m.delivery_count), Some(2));
    assert_eq!(
        store
            .c2d_count_deliveries("d1", None, a.sequence_number)
            .await?,
        0
    );
    assert!(store
        .c2d_settle("d1", None, a.sequence_number, FeedbackStatus::Success, NOW)
        .await?
        .is_none());
    assert_eq!(other.delivery_count, 0);
    Ok(())
}

pub async fn settle_records_feedback_exactly_when_the_ack_asks_for_it<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    let acks = [
        FeedbackRequest::None,
        FeedbackRequest::Positive,
        FeedbackRequest::Negative,
        FeedbackRequest::Full,
    ];
    let statuses = [
        FeedbackStatus::Success,
        FeedbackStatus::Expired,
        FeedbackStatus::DeliveryCountExceeded,
        FeedbackStatus::Rejected,
        FeedbackStatus::Purged,
    ];
    for ack in acks {
        for status in statuses {
            let id = format!("{ack:?}-{status:?}");
            let m = store
                .c2d_enqueue(with_ack(msg("d1", Some("m1"), &id), ack), 100)
                .await?;
            let settled = store
                .c2d_settle("d1", Some("m1"), m.sequence_number, status, NOW)
                .await?;
            assert_eq!(settled.as_ref().map(|s| &s.message_id), Some(&id));
            let feedback = drain_feedback(store).await?;
            if ack.wants(status) {
                assert_eq!(
                    feedback,
                    vec![FeedbackRecord {
                        original_message_id: id,
                        device_id: "d1".into(),
                        module_id: Some("m1".into()),
                        device_generation_id: "gen1".into(),
                        status_code: status,
                        description: status.description().into(),
                        enqueued_time_utc: NOW.to_iso(),
                    }]
                );
            } else {
                assert!(feedback.is_empty(), "{id} produced {feedback:?}");
            }
        }
    }
    Ok(())
}

pub async fn purge_settles_every_message_with_the_feedback_each_asks_for<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    store
        .c2d_enqueue(with_ack(msg("d1", None, "full"), FeedbackRequest::Full), 10)
        .await?;
    store
        .c2d_enqueue(
            with_ack(msg("d1", None, "pos"), FeedbackRequest::Positive),
            10,
        )
        .await?;
    store
        .c2d_enqueue(
            with_ack(msg("d1", None, "neg"), FeedbackRequest::Negative),
            10,
        )
        .await?;
    store.c2d_enqueue(msg("d2", None, "other"), 10).await?;
    assert_eq!(store.c2d_purge("d1", None, NOW).await?, 3);
    assert_eq!(store.c2d_count("d1", None).await?, 0);
    assert_eq!(store.c2d_count("d2", None).await?, 1);
    let feedback = drain_feedback(store).await?;
    let ids: Vec<_> = feedback
        .iter()
        .map(|f| f.original_message_id.as_str())
        .collect();
    assert_eq!(ids, ["full", "neg"]);
    assert!(feedback
        .iter()
        .all(|f| f.status_code == FeedbackStatus::Purged));
    assert_eq!(store.c2d_purge("d1", None, NOW).await?, 0);
    Ok(())
}

pub async fn expire_settles_only_expired_messages_and_names_their_queues<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    assert_eq!(store.c2d_next_expiry().await?, None);
    let neg = FeedbackRequest::Negative;
    store
        .c2d_enqueue(with_ack(with_expiry(msg("d1", None, "old1"), 100), neg), 10)
        .await?;
    store
        .c2d_enqueue(with_expiry(msg("d1", None, "old2"), 200), 10)
        .await?;
    store
        .c2d_enqueue(with_expiry(msg("d1", Some("m1"), "old3"), 300), 10)
        .await?;
    store
        .c2d_enqueue(with_expiry(msg("d1", None, "young"), 5_000), 10)
        .await?;
    store
        .c2d_enqueue(with_expiry(msg("d2", None, "young2"), 6_000), 10)
        .await?;
    assert_eq!(
        store.c2d_next_expiry().await?,
        Some(Timestamp::from_unix_ms(100))
    );

    // The limit bounds one call; the rest waits for the next.
    let first = store.c2d_expire(Timestamp::from_unix_ms(300), 2).await?;
    assert_eq!(first, vec![("d1".to_string(), None)]);
    assert_eq!(
        store.c2d_next_expiry().await?,
        Some(Timestamp::from_unix_ms(300))
    );
    let second = store.c2d_expire(Timestamp::from_unix_ms(300), 100).await?;
    assert_eq!(second, vec![("d1".to_string(), Some("m1".to_string()))]);
    assert!(store
        .c2d_expire(Timestamp::from_unix_ms(300), 100)
        .await?
        .is_empty());

    assert_eq!(
        seqs(&store.c2d_peek("d1", None, 0, 10).await?),
        [3],
        "only the young message stays"
    );
    assert_eq!(store.c2d_count("d2", None).await?, 1);
    assert_eq!(
        store.c2d_next_expiry().await?,
        Some(Timestamp::from_unix_ms(5_000))
    );
    let feedback = drain_feedback(store).await?;
    assert_eq!(feedback.len(), 1);
    assert_eq!(feedback[0].original_message_id, "old1");
    assert_eq!(feedback[0].status_code, FeedbackStatus::Expired);
    Ok(())
}

pub async fn module_queues_are_separate_from_the_device_queue<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    store.c2d_enqueue(msg("d1", None, "dev"), 10).await?;
    let m1 = store.c2d_enqueue(msg("d1", Some("m1"), "mod1"), 10).await?;
    store.c2d_enqueue(msg("d1", Some("m2"), "mod2"), 10).await?;
    store
        .c2d_enqueue(msg("d1", Some("m2"), "mod2b"), 10)
        .await?;
    assert_eq!(m1.sequence_number, 1);
    assert_eq!(m1.module_id.as_deref(), Some("m1"));
    assert_eq!(store.c2d_count("d1", None).await?, 1);
    assert_eq!(store.c2d_count("d1", Some("m1")).await?, 1);
    assert_eq!(store.c2d_count("d1", Some("m2")).await?, 2);
    let peeked = store.c2d_peek("d1", Some("m1"), 0, 10).await?;
    assert_eq!(peeked, vec![m1]);
    assert_eq!(store.c2d_peek("d1", None, 0, 10).await?[0].module_id, None);
    assert_eq!(store.c2d_purge("d1", Some("m2"), NOW).await?, 2);
    assert_eq!(store.c2d_count("d1", None).await?, 1);
    Ok(())
}

pub async fn counts_of_many_device_queues_at_once<S: Store + Clone>(store: &S) -> Result<()> {
    with_identities(store).await?;
    assert_eq!(store.c2d_counts(&[]).await?.len(), 0);
    for i in 0..3 {
        store
            .c2d_enqueue(msg("d1", None, &format!("a{i}")), 10)
            .await?;
    }
    store.c2d_enqueue(msg("d2", None, "b"), 10).await?;
    // Module queues are not the device's.
    store.c2d_enqueue(msg("d1", Some("m1"), "c"), 10).await?;
    store.c2d_enqueue(msg("d2", Some("m1"), "c"), 10).await?;
    let counts = store.c2d_counts(&["d1", "d2", "serial", "ghost"]).await?;
    let expected: std::collections::HashMap<String, u64> =
        [("d1", 3), ("d2", 1), ("serial", 0), ("ghost", 0)]
            .into_iter()
            .map(|(d, n)| (d.to_string(), n))
            .collect();
    assert_eq!(counts, expected);
    assert_eq!(
        store.c2d_counts(&["d2"]).await?.get("d2"),
        Some(&store.c2d_count("d2", None).await?)
    );
    Ok(())
}
