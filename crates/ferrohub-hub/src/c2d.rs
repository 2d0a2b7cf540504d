//! Cloud-to-device messages: sending into the durable per-identity queue, delivering to a
//! subscribed connection at QoS 1, settling on PUBACK, and dead-lettering expired or exhausted
//! messages with feedback.
//!
//! The queue is the store's; this module only keeps, per connection, the task that drains it.
//! A delivery task is woken by a send (no polling), and reads the queue from the start on every
//! new connection, so whatever an earlier connection left unacknowledged is delivered again with
//! its delivery count raised.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrohub_iothub::c2d::{c2d_property_bag, C2dSystemProperties};
use ferrohub_iothub::topics::{c2d_topic, Property};
use ferrohub_iothub::Identity;
use ferrohub_mqtt::QoS;
use ferrohub_store::{C2dMessage, FeedbackStatus, StoreError, Timestamp};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::error::HubError;
use crate::link::{AckHook, OutboundMessage};
use crate::Hub;

/// Messages read from the queue per store call.
const PEEK_BATCH: usize = 16;

/// IoT Hub's C2D limits, configurable per hub.
#[derive(Debug, Clone)]
pub struct C2dSettings {
    /// Messages a queue may hold (IoT Hub: 50).
    pub max_queue_depth: usize,
    /// Time to live of a message that names no expiry (1 minute to 2 days; IoT Hub: 1 hour).
    pub default_ttl: Duration,
    /// Deliveries before a message is dead-lettered (1 to 100; IoT Hub: 10).
    pub max_delivery_count: u32,
    /// How long a feedback receiver holds its batch before it is offered again.
    pub feedback_lock: Duration,
}

impl Default for C2dSettings {
    fn default() -> Self {
        Self {
            max_queue_depth: 50,
            default_ttl: Duration::from_secs(3600),
            max_delivery_count: 10,
            feedback_lock: Duration::from_secs(60),
        }
    }
}

/// Largest message a back end may send: body plus property names and values (IoT Hub: 64 KB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What a back end asks to send; the hub fills in identity, times and sequence number.
#[derive(Debug, Clone, Default)]
pub struct SendRequest {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Absolute expiry (Unix ms); the hub default TTL applies when absent.
    pub expiry_time_ms: Option<i64>,
    pub ack: ferrohub_store::FeedbackRequest,
    pub properties: Vec<Property>,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("device {0} is not registered")]
    DeviceNotFound(String),
    #[error("module {0} is not registered")]
    ModuleNotFound(String),
    #[error("the queue of {0} already holds {1} messages")]
    QueueFull(Identity, usize),
    #[error("message is {0} bytes; the limit is {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

pub fn now_ms() -> i64 {
    Timestamp::now().unix_ms()
}

/// Size as IoT Hub counts it (`ferrohub_iothub::message_size`): body plus every property
/// name and value the sender gave.
fn message_size(req: &SendRequest) -> usize {
    let system = [
        &req.message_id,
        &req.correlation_id,
        &req.user_id,
        &req.content_type,
        &req.content_encoding,
    ];
    ferrohub_iothub::message_size(
        system.into_iter().filter_map(|v| v.as_deref()),
        &req.properties,
        &req.payload,
    )
}

impl Hub {
    /// Queues a message for `identity`; returns it (with sequence number and expiry) once it
    /// is on disk, and wakes the identity's delivery task if it is connected. Once started,
    /// the send and the wake-up happen even if the caller stops waiting.
    pub async fn c2d_send(
        &self,
        identity: &Identity,
        req: SendRequest,
    ) -> Result<C2dMessage, HubError> {
        let identity = identity.clone();
        self.to_the_end(move |hub| async move { Ok(hub.c2d_send_now(&identity, req).await?) })
            .await
    }

    async fn c2d_send_now(
        &self,
        identity: &Identity,
        req: SendRequest,
    ) -> Result<C2dMessage, SendError> {
        let size = message_size(&req);
        if size > MAX_MESSAGE_BYTES {
            return Err(SendError::TooLarge(size));
        }
        for (k, _) in &req.properties {
            if k.is_empty() {
                return Err(SendError::Invalid(
                    "property names must not be empty".into(),
                ));
            }
        }
        if let Some(id) = &req.message_id {
            ferrohub_iothub::telemetry::validate_message_id(id)
                .map_err(|e| SendError::Invalid(format!("messageId: {e}")))?;
        }
        let generation_id = self.generation_id(identity).await?;
        let now = now_ms();
        let expiry = match req.expiry_time_ms {
            Some(t) if t <= now => {
                return Err(SendError::Invalid("the expiry time is in the past".into()))
            }
            Some(t) => t,
            None => now.saturating_add(
                i64::try_from(self.settings.c2d.default_ttl.as_millis()).unwrap_or(i64::MAX),
            ),
        };
        let msg = C2dMessage {
            device_id: identity.device_id.clone(),
            module_id: identity.module_id.clone(),
            device_generation_id: generation_id,
            sequence_number: 0,
            message_id: req
                .message_id
                .unwrap_or_else(|| uuid_like(rand::random::<[u8; 16]>())),
            correlation_id: req.correlation_id,
            user_id: req.user_id,
            content_type: req.content_type,
            content_encoding: req.content_encoding,
            ack: req.ack,
            enqueued_time_ms: now,
            expiry_time_ms: expiry,
            delivery_count: 0,
            properties: req.properties,
            payload: req.payload,
        };
        let depth = self.settings.c2d.max_queue_depth;
        let stored = match self.store.c2d_enqueue(msg, depth).await {
            Ok(m) => m,
            Err(StoreError::QueueFull) => {
                return Err(SendError::QueueFull(identity.clone(), depth))
            }
            // Deleted since `generation_id` found it.
            Err(StoreError::NotFound) => {
                return Err(match &identity.module_id {
                    None => SendError::DeviceNotFound(identity.device_id.clone()),
                    Some(m) => SendError::ModuleNotFound(m.clone()),
                })
            }
            Err(e) => return Err(e.into()),
        };
        crate::metrics::c2d("sent");
        self.c2d_wake(identity);
        // SeqCst pairs with the loop's stores: either the loop's next look at the queue sees this
        // message, or this load sees the plan the loop made without it.
        if stored.expiry_time_ms < self.expiry_planned.load(Ordering::SeqCst) {
            self.expiry_wake.notify_one();
        }
        Ok(stored)
    }

    async fn generation_id(&self, identity: &Identity) -> Result<String, SendError> {
        match &identity.module_id {
            None => self
                .store
                .get_device(&identity.device_id)
                .await?
                .map(|d| d.generation_id)
                .ok_or_else(|| SendError::DeviceNotFound(identity.device_id.clone())),
            Some(mid) => {
                let device = self
                    .store
                    .get_device(&identity.device_id)
                    .await?
                    .ok_or_else(|| SendError::DeviceNotFound(identity.device_id.clone()))?;
                self.store
                    .get_module(&identity.device_id, mid)
                    .await?
                    .ok_or_else(|| SendError::ModuleNotFound(mid.clone()))?;
                Ok(device.generation_id)
            }
        }
    }

    /// Empties `identity`'s queue (feedback `Purged` where asked); returns how many went.
    pub async fn c2d_purge(&self, identity: &Identity) -> Result<u64, HubError> {
        let identity = identity.clone();
        self.to_the_end(move |hub| async move {
            hub.generation_id(&identity).await?;
            let n = hub
                .store
                .c2d_purge(
                    &identity.device_id,
                    identity.module_id.as_deref(),
                    Timestamp::now(),
                )
                .await
                .map_err(SendError::from)?;
            if n > 0 {
                hub.feedback_produced();
            }
            Ok(n)
        })
        .await
    }

    /// Starts draining `identity`'s queue to this connection, unless a task already does.
    pub(super) fn c2d_start(&self, identity: &Identity, conn_seq: u64) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        self.connections.update(identity, conn_seq, &mut |link| {
            if link.c2d.is_some() {
                return;
            }
            let notify = Arc::new(Notify::new());
            let task = tokio::spawn(deliver(
                me.clone(),
                identity.clone(),
                link.outbound.clone(),
                notify.clone(),
            ));
            link.c2d = Some((task.abort_handle(), notify));
        });
    }

    pub(super) fn c2d_stop(&self, identity: &Identity, conn_seq: u64) {
        self.connections.update(identity, conn_seq, &mut |link| {
            if let Some((task, _)) = link.c2d.take() {
                task.abort();
            }
        });
    }

    /// Counts a delivery for what connections still held unacknowledged, as their next
    /// connection would have; run at shutdown, so a restart raises those counts like a
    /// reconnect does (a crash cannot, and redelivers them without).
    pub async fn c2d_count_handed(&self) {
        let handed: Vec<(Identity, u64)> = self.c2d_handed().drain().collect();
        let mut counts = tokio::task::JoinSet::new();
        for (identity, up_to) in handed {
            let store = self.store.clone();
            counts.spawn(async move {
                let r = store
                    .c2d_count_deliveries(&identity.device_id, identity.module_id.as_deref(), up_to)
                    .await;
                (identity, r)
            });
        }
        while let Some(done) = counts.join_next().await {
            if let Ok((identity, Err(e))) = done {
                warn!(identity = %identity, error = %e, "counting C2D deliveries at shutdown failed");
            }
        }
    }

    fn c2d_handed(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Identity, u64>> {
        // A plain map of numbers: a panicking holder cannot leave it half-changed.
        self.c2d_handed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn c2d_wake(&self, identity: &Identity) {
        if let Some(notify) = self.connections.get(identity).and_then(|l| l.c2d_wake) {
            notify.notify_one();
        }
    }
}

/// Drains the queue to one connection until it goes away.
async fn deliver(
    hub: Arc<Hub>,
    identity: Identity,
    outbound: crate::link::Outbound,
    notify: Arc<Notify>,
) {
    let device = identity.device_id.as_str();
    let module = identity.module_id.as_deref();
    // What an earlier connection was handed and did not acknowledge is delivered again below:
    // count that attempt first, so a message no device will take ends dead-lettered.
    let handed = hub.c2d_handed().remove(&identity);
    if let Some(up_to) = handed {
        while let Err(e) = hub.store.c2d_count_deliveries(device, module, up_to).await {
            warn!(identity = %identity, error = %e, "counting C2D deliveries failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    // Everything up to here has been handed to this connection (or settled).
    let mut after = 0u64;
    loop {
        // Registered before reading the queue, so a send that lands between the read and the
        // wait still wakes us (notify_one keeps a permit).
        let woken = notify.notified();
        let batch = match hub.store.c2d_peek(device, module, after, PEEK_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                warn!(identity = %identity, error = %e, "reading the C2D queue failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // A short batch was the whole queue as of the read: anything newer comes with a wake,
        // so there is no need to read again before one.
        let drained = batch.len() < PEEK_BATCH;
        for msg in batch {
            after = msg.sequence_number;
            let now = now_ms();
            let dead = if msg.expiry_time_ms <= now {
                Some(FeedbackStatus::Expired)
            } else if msg.delivery_count >= hub.settings.c2d.max_delivery_count {
                Some(FeedbackStatus::DeliveryCountExceeded)
            } else {
                None
            };
            if let Some(status) = dead {
                settle(&hub, &identity, msg.sequence_number, status).await;
                continue;
            }
            let seq = msg.sequence_number;
            let hook_hub = hub.clone();
            let hook_identity = identity.clone();
            let out = OutboundMessage {
                topic: c2d_topic(&identity, &topic_properties(&msg)),
                payload: Bytes::from(msg.payload),
                qos: QoS::AtLeastOnce,
                on_ack: Some(AckHook(Arc::new(move || {
                    let hub = hook_hub.clone();
                    let identity = hook_identity.clone();
                    tokio::spawn(async move {
                        settle(&hub, &identity, seq, FeedbackStatus::Success).await;
                        let mut handed = hub.c2d_handed();
                        if handed.get(&identity) == Some(&seq) {
                            handed.remove(&identity);
                        }
                    });
                }))),
            };
            let attempt = msg.delivery_count + 1;
            debug!(identity = %identity, seq, attempt, "delivering C2D message");
            if outbound.send(out).await.is_err() {
                return;
            }
            crate::metrics::c2d("delivered");
            hub.c2d_handed().insert(identity.clone(), seq);
        }
        if drained {
            woken.await;
        }
    }
}

async fn settle(hub: &Hub, identity: &Identity, seq: u64, status: FeedbackStatus) {
    let r = hub
        .store
        .c2d_settle(
            &identity.device_id,
            identity.module_id.as_deref(),
            seq,
            status,
            Timestamp::now(),
        )
        .await;
    if matches!(&r, Ok(Some(m)) if m.ack.wants(status)) {
        hub.feedback_produced();
    }
    if let Ok(Some(_)) = &r {
        crate::metrics::c2d(crate::metrics::c2d_outcome(status));
    }
    match r {
        Ok(Some(m)) if status != FeedbackStatus::Success => info!(
            identity = %identity,
            message_id = %m.message_id,
            seq,
            status = ?status,
            "C2D message dead-lettered"
        ),
        Ok(_) => {}
        Err(e) => warn!(identity = %identity, seq, error = %e, "settling a C2D message failed"),
    }
}

/// The topic's property bag of a queued message (`ferrohub_iothub::c2d::c2d_property_bag`).
pub fn topic_properties(msg: &C2dMessage) -> Vec<Property> {
    let identity = Identity {
        device_id: msg.device_id.clone(),
        module_id: msg.module_id.clone(),
    };
    let expiry = crate::timefmt::iso(ms_to_datetime(msg.expiry_time_ms));
    let ack = match msg.ack {
        ferrohub_store::FeedbackRequest::None => None,
        ferrohub_store::FeedbackRequest::Positive => Some("positive"),
        ferrohub_store::FeedbackRequest::Negative => Some("negative"),
        ferrohub_store::FeedbackRequest::Full => Some("full"),
    };
    let sys = C2dSystemProperties {
        identity: &identity,
        message_id: &msg.message_id,
        correlation_id: msg.correlation_id.as_deref(),
        user_id: msg.user_id.as_deref(),
        content_type: msg.content_type.as_deref(),
        content_encoding: msg.content_encoding.as_deref(),
        expiry_utc: &expiry,
        ack,
    };
    c2d_property_bag(&sys, &msg.properties)
}

pub fn ms_to_datetime(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A random id in the 8-4-4-4-12 form service SDKs give messages.
pub fn uuid_like(b: [u8; 16]) -> String {
    ferrohub_iothub::notifications::uuid_text(b)
}

/// Dead-letters expired messages of every queue, connected or not, as their expiry passes, so
/// feedback `Expired` does not wait for the device to come back. Sleeps until the earliest
/// expiry; a send wakes it to look again.
pub async fn expiry_loop(hub: Arc<Hub>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let woken = hub.expiry_wake.notified();
        hub.expiry_planned.store(i64::MAX, Ordering::SeqCst);
        let now = now_ms();
        match hub
            .store
            .c2d_expire(Timestamp::from_unix_ms(now), 256)
            .await
        {
            Ok(touched) if !touched.is_empty() => {
                debug!(queues = touched.len(), "expired C2D messages dead-lettered");
                hub.feedback_produced();
                continue;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "C2D expiry failed"),
        }
        let next = match hub.store.c2d_next_expiry().await {
            Ok(Some(t)) => t.unix_ms(),
            Ok(None) => now.saturating_add(3_600_000),
            Err(_) => now.saturating_add(5_000),
        };
        hub.expiry_planned.store(next, Ordering::SeqCst);
        let wait = Duration::from_millis(u64::try_from(next - now).unwrap_or(0).max(1));
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(wait) => {}
            _ = crate::until_shutdown(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bag_has_system_properties_then_application_ones_in_order() {
        let msg = C2dMessage {
            device_id: "d1".into(),
            message_id: "m1".into(),
            correlation_id: Some("c 1".into()),
            ack: ferrohub_store::FeedbackRequest::Full,
            expiry_time_ms: 0,
            properties: vec![("z".into(), None), ("a".into(), Some(String::new()))],
            ..Default::default()
        };
        let topic = c2d_topic(&Identity::device("d1"), &topic_properties(&msg));
        assert_eq!(
            topic,
            "devices/d1/messages/devicebound/%24.mid=m1&%24.to=%2Fdevices%2Fd1%2Fmessages%2Fdevicebound\
             &%24.cid=c%201&%24.exp=1970-01-01T00%3A00%3A00.0000000Z&iothub-ack=full&z&a="
        );
    }

    #[test]
    fn size_counts_body_and_properties() {
        let req = SendRequest {
            message_id: Some("abc".into()),
            properties: vec![("k".into(), Some("vv".into())), ("n".into(), None)],
            payload: vec![0; 10],
            ..Default::default()
        };
        assert_eq!(message_size(&req), 10 + 3 + 1 + 2 + 1);
    }
}
