//! One test suite for every engine: async functions taking a store (or log) handle, the
//! `store_suite!` and `telemetry_suite!` macros that turn them into `#[tokio::test]`s for a
//! constructor, and the model-based property test in [`model`].
//!
//! Engine-neutral trait behaviour is tested here, once; an engine's crate keeps only what is
//! its own (persistence across reopen, migrations, its write machinery). Compiled for this
//! crate's tests and, behind the `testsuite` feature, for the engines' tests.

pub mod model;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::telemetry::{NewEvent, Retention, StartPosition, TelemetryLog};
use crate::{
    AccessPolicy, C2dMessage, CaCertificate, Device, FeedbackBatch, FeedbackRecord,
    FeedbackRequest, FeedbackStatus, IfMatch, Module, Result, Rights, Store, StoreError,
    StoredSession, StoredSubscription, Timestamp, VersionedTwin,
};

/// Expands to one `#[tokio::test]` per store test of the suite. `$open` is a function
/// returning `Result<(store, guard)>`: a fresh, empty store, and whatever must live as long
/// as it (a temporary directory).
#[macro_export]
macro_rules! store_suite {
    ($open:expr) => {
        $crate::store_suite!(@tests $open;
            device_crud_with_etags,
            modules_need_their_device_and_go_with_it,
            policies_are_created_once,
            certificates_crud_with_etags,
            sessions_round_trip_and_delete,
            nothing_is_queued_for_an_identity_the_registry_does_not_hold,
            sequence_numbers_increase_per_queue_and_survive_emptying,
            enqueue_fails_with_queue_full_at_max_depth,
            peek_returns_messages_after_a_sequence_in_order_up_to_limit,
            deliveries_are_counted_up_to_the_mark_until_the_message_is_gone,
            settle_records_feedback_exactly_when_the_ack_asks_for_it,
            purge_settles_every_message_with_the_feedback_each_asks_for,
            expire_settles_only_expired_messages_and_names_their_queues,
            module_queues_are_separate_from_the_device_queue,
            counts_of_many_device_queues_at_once,
            deleting_identities_removes_their_queues_sequences_and_twins,
            feedback_locks_hide_records_until_completed_or_expired,
            abandoned_feedback_can_be_received_at_once,
            twins_are_written_only_if_unchanged_since_read,
            concurrent_conditional_twin_writes_lose_nothing,
        );
    };
    (@tests $open:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() -> $crate::Result<()> {
                let (store, _guard) = ($open)()?;
                $crate::testsuite::$name(&store).await
            }
        )*
    };
}

/// Expands to one `#[tokio::test]` per telemetry test of the suite. `$open` takes a partition
/// count and returns `Result<(log, guard)>` for a fresh, empty log.
#[macro_export]
macro_rules! telemetry_suite {
    ($open:expr) => {
        $crate::telemetry_suite!(@tests $open;
            appends_are_ordered_per_partition: 4,
            positions_resolve_and_checkpoints_are_kept: 1,
            retention_removes_old_messages_but_never_reuses_sequences: 1,
        );
    };
    (@tests $open:expr; $($name:ident: $partitions:expr),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() -> $crate::Result<()> {
                let (log, _guard) = ($open)($partitions)?;
                $crate::testsuite::$name(&log).await
            }
        )*
    };
}

fn device(id: &str) -> Device {
    Device {
        device_id: id.into(),
        generation_id: "g1".into(),
        ..Default::default()
    }
}

/// Registers every identity the C2D tests send to.
async fn with_identities<S: Store>(store: &S) -> Result<()> {
    for device in ["d1", "d2", "serial"] {
        if store.get_device(device).await?.is_none() {
            store
                .create_device(Device {
                    device_id: device.into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    for (device, module) in [("d1", "m1"), ("d1", "m2"), ("d2", "m1")] {
        if store.get_module(device, module).await?.is_none() {
            store
                .create_module(Module {
                    device_id: device.into(),
                    module_id: module.into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

fn msg(device: &str, module: Option<&str>, id: &str) -> C2dMessage {
    C2dMessage {
        device_id: device.into(),
        module_id: module.map(Into::into),
        device_generation_id: "gen1".into(),
        message_id: id.into(),
        enqueued_time_ms: 1_000,
        expiry_time_ms: 10_000,
        payload: id.as_bytes().to_vec(),
        properties: vec![("k".into(), Some("v".into())), ("bare".into(), None)],
        ..Default::default()
    }
}

fn with_ack(mut m: C2dMessage, ack: FeedbackRequest) -> C2dMessage {
    m.ack = ack;
    m
}

fn with_expiry(mut m: C2dMessage, expiry_ms: i64) -> C2dMessage {
    m.expiry_time_ms = expiry_ms;
    m
}

fn seqs(msgs: &[C2dMessage]) -> Vec<u64> {
    msgs.iter().map(|m| m.sequence_number).collect()
}

fn ms(t: i64) -> Timestamp {
    Timestamp::from_unix_ms(t)
}

const NOW: Timestamp = Timestamp::from_unix_ms(1_704_067_200_000);

/// All feedback currently receivable, completed so the next call starts empty.
async fn drain_feedback<S: Store>(store: &S) -> Result<Vec<FeedbackRecord>> {
    match store
        .feedback_receive(ms(0), Duration::from_millis(1_000), 1_000)
        .await?
    {
        None => Ok(Vec::new()),
        Some(batch) => {
            store.feedback_complete(&batch.lock_token, ms(0)).await?;
            Ok(batch.records)
        }
    }
}

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

pub async fn device_crud_with_etags<S: Store + Clone>(store: &S) -> Result<()> {
    let d = store.create_device(device("dev1")).await?;
    assert_eq!(store.get_device("dev1").await?, Some(d.clone()));
    assert!(matches!(
        store.create_device(device("dev1")).await,
        Err(StoreError::AlreadyExists)
    ));
    let stale = IfMatch::Etag(d.etag.clone());
    let d2 = store.update_device(d.clone(), stale.clone()).await?;
    assert_ne!(d2.etag, d.etag);
    assert_eq!(store.get_device("dev1").await?, Some(d2.clone()));
    assert!(matches!(
        store.update_device(d.clone(), stale.clone()).await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(matches!(
        store.delete_device("dev1", stale).await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(matches!(
        store.update_device(device("ghost"), IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
    store.create_device(device("dev0")).await?;
    let ids: Vec<_> = store
        .list_devices(10)
        .await?
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(ids, ["dev0", "dev1"]);
    assert_eq!(store.list_devices(1).await?.len(), 1);
    assert_eq!(store.count_devices().await?, 2);
    store
        .delete_device("dev1", IfMatch::Etag(d2.etag.clone()))
        .await?;
    assert!(store.get_device("dev1").await?.is_none());
    assert!(matches!(
        store.delete_device("dev1", IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.count_devices().await?, 1);
    Ok(())
}

pub async fn certificates_crud_with_etags<S: Store + Clone>(store: &S) -> Result<()> {
    let cert = |name: &str, pem: &str| CaCertificate {
        name: name.into(),
        etag: String::new(),
        certificate: pem.into(),
        subject: "CN=ca".into(),
        thumbprint: "AB".into(),
        created: "2024-01-01T00:00:00.0000000Z".into(),
    };
    // A new certificate is created whatever If-Match says.
    let c1 = store
        .put_certificate(cert("ca1", "pem1"), IfMatch::Etag("nope".into()))
        .await?;
    assert_eq!(store.get_certificate("ca1").await?, Some(c1.clone()));
    assert!(matches!(
        store
            .put_certificate(cert("ca1", "pem2"), IfMatch::Etag("nope".into()))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    let c2 = store
        .put_certificate(cert("ca1", "pem2"), IfMatch::Etag(c1.etag.clone()))
        .await?;
    assert_ne!(c1.etag, c2.etag);
    assert_eq!(c2.certificate, "pem2");
    store
        .put_certificate(cert("ca0", "p"), IfMatch::Any)
        .await?;
    let names: Vec<_> = store
        .list_certificates()
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["ca0", "ca1"]);
    assert!(matches!(
        store
            .delete_certificate("ca1", IfMatch::Etag(c1.etag.clone()))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    store
        .delete_certificate("ca1", IfMatch::Etag(c2.etag))
        .await?;
    assert!(store.get_certificate("ca1").await?.is_none());
    assert!(matches!(
        store.delete_certificate("ca1", IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
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

pub async fn twins_are_written_only_if_unchanged_since_read<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    assert_eq!(store.get_twin("d1", None).await?, None);
    // Some(v) on a missing twin, and None on an existing one, are both mismatches.
    assert!(matches!(
        store
            .put_twin("d1", None, "{\"a\":0}".into(), Some(1))
            .await,
        Err(StoreError::VersionMismatch)
    ));
    let v1 = store.put_twin("d1", None, "{\"a\":1}".into(), None).await?;
    assert_eq!(
        store.get_twin("d1", None).await?,
        Some(VersionedTwin {
            doc: "{\"a\":1}".into(),
            version: v1
        })
    );
    assert!(matches!(
        store.put_twin("d1", None, "{\"a\":2}".into(), None).await,
        Err(StoreError::VersionMismatch)
    ));
    let v2 = store
        .put_twin("d1", None, "{\"a\":2}".into(), Some(v1))
        .await?;
    assert_ne!(v1, v2);
    assert!(matches!(
        store
            .put_twin("d1", None, "{\"a\":3}".into(), Some(v1))
            .await,
        Err(StoreError::VersionMismatch)
    ));
    let twin = store
        .get_twin("d1", None)
        .await?
        .ok_or(StoreError::NotFound)?;
    assert_eq!((twin.doc.as_str(), twin.version), ("{\"a\":2}", v2));
    // A module's twin is another document.
    assert_eq!(store.get_twin("d1", Some("m1")).await?, None);
    store
        .put_twin("d1", Some("m1"), "{\"m\":1}".into(), None)
        .await?;
    assert_eq!(
        store.get_twin("d1", Some("m1")).await?.map(|t| t.doc),
        Some("{\"m\":1}".to_string())
    );
    assert_eq!(store.get_twin("d1", None).await?, Some(twin));
    Ok(())
}

/// Read, append to a JSON array, write conditionally, again on a mismatch: what the hub does.
async fn append_to_twin<S: Store>(store: &S, n: u64) -> Result<usize> {
    loop {
        let current = store.get_twin("d1", None).await?;
        let mut seen: Vec<u64> = match &current {
            Some(t) => serde_json::from_str(&t.doc)?,
            None => Vec::new(),
        };
        seen.push(n);
        let doc = serde_json::to_string(&seen)?;
        match store
            .put_twin("d1", None, doc, current.map(|t| t.version))
            .await
        {
            Ok(_) => return Ok(seen.len()),
            Err(StoreError::VersionMismatch) => tokio::task::yield_now().await,
            Err(e) => return Err(e),
        }
    }
}

pub async fn concurrent_conditional_twin_writes_lose_nothing<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    let tasks: Vec<_> = (0..30)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { append_to_twin(&store, n).await })
        })
        .collect();
    let mut lengths = Vec::new();
    for t in tasks {
        lengths.push(t.await.map_err(|e| StoreError::Task(e.to_string()))??);
    }
    lengths.sort_unstable();
    assert_eq!(lengths, (1..=30).collect::<Vec<_>>());
    let twin = store
        .get_twin("d1", None)
        .await?
        .ok_or(StoreError::NotFound)?;
    let mut all: Vec<u64> = serde_json::from_str(&twin.doc)?;
    all.sort_unstable();
    assert_eq!(all, (0..30).collect::<Vec<_>>());
    Ok(())
}

fn ev(device: &str, t: i64, body: &[u8]) -> NewEvent {
    NewEvent {
        device_id: device.into(),
        module_id: None,
        enqueued_ms: t,
        system_properties: BTreeMap::from([("message-id".to_string(), "m".to_string())]),
        properties: vec![("k".into(), Some("v".into())), ("n".into(), None)],
        body: body.to_vec(),
    }
}

pub async fn appends_are_ordered_per_partition<L: TelemetryLog>(log: &L) -> Result<()> {
    assert_eq!(log.partition_count(), 4);
    let p = log.partition_of("dev1");
    assert_eq!(p, crate::telemetry::partition_for("dev1", 4));
    let mut commits = log.watch_commits();
    let mut pending = Vec::new();
    for i in 0..200u32 {
        pending.push(log.enqueue(ev("dev1", 1000, &i.to_be_bytes())).await?);
    }
    let mut seqs = Vec::new();
    for durable in pending {
        let (part, seq) = durable.await?;
        assert_eq!(part, p);
        seqs.push(seq);
    }
    assert_eq!(seqs, (0..200).collect::<Vec<u64>>(), "in enqueue order");
    // The watch may change just after the appends are answered, not necessarily before.
    wait_changed(&mut commits).await?;
    let all = log.read(p, 0, 1000).await?;
    assert_eq!(all.len(), 200);
    for (i, rec) in all.iter().enumerate() {
        assert_eq!((rec.partition, rec.sequence), (p, i as u64));
        assert_eq!(rec.event, ev("dev1", 1000, &(i as u32).to_be_bytes()));
    }
    let some: Vec<u64> = log
        .read(p, 150, 10)
        .await?
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(some, (150..160).collect::<Vec<_>>());
    assert!(log.read(p, 200, 10).await?.is_empty());
    assert!(log.read((p + 1) % 4, 0, 10).await?.is_empty());
    log.append(ev("dev1", 1000, b"x")).await?;
    wait_changed(&mut commits).await?;
    Ok(())
}

async fn wait_changed(commits: &mut tokio::sync::watch::Receiver<u64>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(5), commits.changed())
        .await
        .map_err(|_| StoreError::Task("no commit was signalled".into()))?
        .map_err(|_| StoreError::Task("the commit watch closed".into()))?;
    commits.borrow_and_update();
    Ok(())
}

pub async fn retention_removes_old_messages_but_never_reuses_sequences<L: TelemetryLog>(
    log: &L,
) -> Result<()> {
    for t in [10, 20, 30, 40] {
        log.append(ev("d", t, b"x")).await?;
    }
    let r = Retention {
        max_age_ms: 15,
        max_bytes: u64::MAX,
    };
    assert_eq!(log.enforce_retention(r, ms(40)).await?, 2);
    let left: Vec<u64> = log
        .read(0, 0, 10)
        .await?
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(left, vec![2, 3]);
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 2);
    assert_eq!(log.resolve(0, StartPosition::Sequence(0)).await?, 0);
    let everything = Retention {
        max_age_ms: 0,
        max_bytes: u64::MAX,
    };
    assert_eq!(log.enforce_retention(everything, ms(1000)).await?, 2);
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 4);
    assert_eq!(log.append(ev("d", 50, b"x")).await?.1, 4);
    Ok(())
}

pub async fn modules_need_their_device_and_go_with_it<S: Store + Clone>(store: &S) -> Result<()> {
    let m = Module {
        module_id: "m1".into(),
        device_id: "dev1".into(),
        ..Default::default()
    };
    assert!(matches!(
        store.create_module(m.clone()).await,
        Err(StoreError::NotFound)
    ));
    store.create_device(device("dev1")).await?;
    store.create_module(m.clone()).await?;
    assert!(matches!(
        store.create_module(m).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.list_modules("dev1").await?.len(), 1);
    store.delete_device("dev1", IfMatch::Any).await?;
    assert!(store.get_module("dev1", "m1").await?.is_none());
    Ok(())
}

pub async fn policies_are_created_once<S: Store + Clone>(store: &S) -> Result<()> {
    let p = AccessPolicy {
        key_name: "iothubowner".into(),
        primary_key: "a".into(),
        secondary_key: "b".into(),
        rights: Rights::ALL,
    };
    store.ensure_policy(p.clone()).await?;
    let again = store
        .ensure_policy(AccessPolicy {
            primary_key: "other".into(),
            ..p.clone()
        })
        .await?;
    assert_eq!(again, p);
    Ok(())
}

pub async fn sessions_round_trip_and_delete<S: Store + Clone>(store: &S) -> Result<()> {
    let s = StoredSession {
        subscriptions: vec![StoredSubscription {
            filter: "$iothub/methods/POST/#".into(),
            qos: 1,
        }],
    };
    store.save_session("dev1", &s).await?;
    assert_eq!(store.load_session("dev1").await?, Some(s));
    store.delete_session("dev1").await?;
    assert_eq!(store.load_session("dev1").await?, None);
    Ok(())
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

pub async fn deleting_identities_removes_their_queues_sequences_and_twins<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    for id in ["d1", "d2"] {
        store
            .create_device(Device {
                device_id: id.into(),
                ..Default::default()
            })
            .await?;
        store
            .create_module(Module {
                device_id: id.into(),
                module_id: "m1".into(),
                ..Default::default()
            })
            .await?;
        for module in [None, Some("m1")] {
            let full = FeedbackRequest::Full;
            store
                .c2d_enqueue(with_ack(msg(id, module, "x"), full), 10)
                .await?;
            store.put_twin(id, module, "{}".into(), None).await?;
        }
    }

    store.delete_module("d1", "m1", IfMatch::Any).await?;
    assert_eq!(store.c2d_count("d1", Some("m1")).await?, 0);
    assert!(store.get_twin("d1", Some("m1")).await?.is_none());
    assert_eq!(store.c2d_count("d1", None).await?, 1);
    assert!(store.get_twin("d1", None).await?.is_some());

    store.delete_device("d2", IfMatch::Any).await?;
    for module in [None, Some("m1")] {
        assert_eq!(store.c2d_count("d2", module).await?, 0);
        assert!(store.get_twin("d2", module).await?.is_none());
    }
    assert!(store.get_twin("d1", None).await?.is_some());
    // Sequences went with the identities, and deletion leaves no feedback.
    store
        .create_device(Device {
            device_id: "d2".into(),
            ..Default::default()
        })
        .await?;
    store
        .create_module(Module {
            device_id: "d2".into(),
            module_id: "m1".into(),
            ..Default::default()
        })
        .await?;
    let again = store.c2d_enqueue(msg("d2", Some("m1"), "y"), 10).await?;
    assert_eq!(again.sequence_number, 1);
    assert!(drain_feedback(store).await?.is_empty());
    Ok(())
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

pub async fn positions_resolve_and_checkpoints_are_kept<L: TelemetryLog>(log: &L) -> Result<()> {
    for t in [10, 20, 30] {
        log.append(ev("d", t, b"x")).await?;
    }
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 0);
    assert_eq!(log.resolve(0, StartPosition::End).await?, 3);
    assert_eq!(log.resolve(0, StartPosition::EnqueuedAt(15)).await?, 1);
    assert_eq!(log.resolve(0, StartPosition::EnqueuedAt(99)).await?, 3);
    assert_eq!(log.resolve(0, StartPosition::Sequence(2)).await?, 2);
    log.save_checkpoint("g1", 0, 2).await?;
    assert_eq!(log.checkpoints("g1").await?.get(&0), Some(&2));
    assert!(log.checkpoints("g2").await?.is_empty());
    Ok(())
}
