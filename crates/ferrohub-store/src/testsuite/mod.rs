//! One test suite for every engine: async functions taking a store (or log) handle, the
//! `store_suite!` and `telemetry_suite!` macros that turn them into `#[tokio::test]`s for a
//! constructor, the helpers the tests share, and the model-based property test in [`model`].
//!
//! Engine-neutral trait behaviour is tested here, once; an engine's crate keeps only what is
//! its own (persistence across reopen, migrations, its write machinery). Compiled for this
//! crate's tests and, behind the `testsuite` feature, for the engines' tests.
//!
//! The tests live by concern: `registry` (identities, policies, certificates, sessions and
//! what deleting an identity removes), `c2d` (the cloud-to-device queues), `feedback`
//! (the feedback receiver), `twins`, `query` (scans for queries), `configurations`, `jobs`, `provisioning` and `telemetry`. Each is re-exported here, where the
//! macros name it.

mod c2d;
mod configurations;
mod feedback;
mod jobs;
pub mod model;
mod models;
mod provisioning;
mod query;
mod registry;
mod routing;
mod telemetry;
mod twins;

pub use c2d::*;
pub use configurations::*;
pub use feedback::*;
pub use jobs::*;
pub use models::*;
pub use provisioning::*;
pub use query::*;
pub use registry::*;
pub use routing::*;
pub use telemetry::*;
pub use twins::*;

use std::time::Duration;

use crate::{
    C2dMessage, Device, FeedbackRecord, FeedbackRequest, Module, Result, Store, Timestamp,
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
            scans_page_in_key_order_and_keep_every_matching_row,
            configurations_crud_with_etags,
            applied_marks_go_with_their_device_and_configuration,
            jobs_are_created_once_and_updated_in_place,
            jobs_and_device_rows_page_in_key_order,
            models_are_immutable_once_stored,
            provisioning_records_crud_with_etags,
            provisioning_lists_page_per_kind_and_scope_is_kept,
            routing_document_is_written_only_at_its_version,
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

/// Registers every identity the C2D tests send to (also used by engines' own tests).
pub async fn with_identities<S: Store>(store: &S) -> Result<()> {
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

/// A C2D message for `device`/`module` with message id and payload `id`.
pub fn msg(device: &str, module: Option<&str>, id: &str) -> C2dMessage {
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

fn ms(t: i64) -> Timestamp {
    Timestamp::from_unix_ms(t)
}

/// A fixed "now" for settling and feedback.
pub const NOW: Timestamp = Timestamp::from_unix_ms(1_704_067_200_000);

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
