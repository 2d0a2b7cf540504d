//! Device and module twins at runtime: the device's GET and reported patches over MQTT, the
//! service's reads and updates, and desired-property notifications to connected devices.
//!
//! The document rules (merge, versions, metadata, limits) are `ferrohub_iothub::twin`; the
//! store offers a read and a conditional write, and `modify_twin` makes an atomic update of
//! them. This module adds identity checks, etags, throttling and the push of desired changes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ferrohub_iothub::notifications::{patch_metadata, twin_change_body, Operation as EventOp};
use ferrohub_iothub::registry::etag_of;
use ferrohub_iothub::topics::{desired_patch_topic, twin_response_topic};
use ferrohub_iothub::twin::{Twin, TwinError};
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_mqtt::QoS;
use ferrohub_store::query::ScannedIdentity;
use ferrohub_store::{IfMatch, StoreError, VersionedTwin};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, warn};

use crate::link::OutboundMessage;
use crate::throttle::Operation;
use crate::{Hub, HubClient};

/// What the store keeps for a twin: the document plus the model id the identity announced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredDoc {
    pub(crate) twin: Twin,
    #[serde(default)]
    pub(crate) model_id: Option<String>,
}

impl StoredDoc {
    pub(crate) fn load(doc: Option<String>, now: &str) -> Result<Self, TwinFailure> {
        match doc {
            Some(d) => serde_json::from_str(&d).map_err(|e| TwinFailure::Corrupt(e.to_string())),
            None => Ok(StoredDoc {
                twin: Twin::new(now),
                model_id: None,
            }),
        }
    }

    fn etag(&self) -> String {
        etag_of(self.twin.version)
    }
}

/// Why a twin operation failed, with the IoT Hub code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum TwinFailure {
    #[error("{0}")]
    Invalid(#[from] TwinError),
    #[error("the body is not valid JSON: {0}")]
    BadJson(String),
    #[error("device {0} is not registered")]
    DeviceNotFound(String),
    #[error("module {0} is not registered")]
    ModuleNotFound(String),
    #[error("the twin's etag is {0}, not the one in If-Match")]
    PreconditionFailed(String),
    #[error("over the hub's rate for this operation")]
    Throttled,
    #[error("stored twin is corrupt: {0}")]
    Corrupt(String),
    #[error("store: {0}")]
    Store(StoreError),
}

impl TwinFailure {
    pub fn code(&self) -> ErrorCode {
        match self {
            TwinFailure::Invalid(e) => e.code(),
            TwinFailure::BadJson(_) => ErrorCode::ArgumentInvalid,
            TwinFailure::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            TwinFailure::ModuleNotFound(_) => ErrorCode::ModuleNotFound,
            TwinFailure::PreconditionFailed(_) => ErrorCode::PreconditionFailed,
            TwinFailure::Throttled => ErrorCode::ThrottlingException,
            TwinFailure::Store(StoreError::Full(_)) => ErrorCode::ServiceUnavailable,
            TwinFailure::Corrupt(_) | TwinFailure::Store(_) => ErrorCode::ServerError,
        }
    }
}

impl From<StoreError> for TwinFailure {
    fn from(e: StoreError) -> Self {
        TwinFailure::Store(e)
    }
}

/// Reads of a twin a write may retry after losing to a concurrent one. Writers in this process
/// take turns (`TwinLocks`), so only another process sharing the store can make a write lose;
/// many losses in a row mean something is wrong, and the caller gets a server error.
const TWIN_WRITE_TRIES: usize = 16;

/// A twin and its version as one connection last wrote it (see `HubClient::twin_memo`). Only a
/// starting point: a write from it is conditional on the version, so a stale memo costs one
/// failed write and a read, never a lost change.
#[derive(Debug, Default)]
pub(crate) struct TwinMemo(std::sync::Mutex<Option<VersionedTwin>>);

impl TwinMemo {
    fn take(&self) -> Option<VersionedTwin> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn keep(&self, twin: VersionedTwin) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(twin);
    }
}

/// A per-identity lock for twin writes, so desired notifications leave in version order and
/// the device's and the service's writes take turns instead of failing each other's conditional
/// writes (a device pipelining patches could otherwise starve a service update). An entry lives
/// while someone holds or waits for it: [`TwinLockGuard`] removes it on drop, on every path
/// (error returns, a caller that went away while waiting).
#[derive(Default)]
pub(crate) struct TwinLocks {
    map: std::sync::Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
}

impl TwinLocks {
    /// Waits until this caller is the only writer of `id`'s twin.
    pub(crate) async fn lock(&self, id: &Identity) -> TwinLockGuard<'_> {
        let lock = self.entries().entry(id.clone()).or_default().clone();
        // The entry is owned before the wait, so a caller dropped while waiting still cleans up.
        let entry = TwinLockEntry {
            locks: self,
            id: id.clone(),
            lock,
        };
        let held = entry.lock.clone().lock_owned().await;
        TwinLockGuard {
            _held: held,
            _entry: entry,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<tokio::sync::Mutex<()>>>> {
        // A map of handles: a panicking holder cannot leave it half-changed.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries().len()
    }
}

/// Holds `id`'s twin write lock; dropping it lets the next writer in.
pub(crate) struct TwinLockGuard<'a> {
    // Fields drop in declaration order: the mutex is released before the entry looks at who
    // else still holds it.
    _held: tokio::sync::OwnedMutexGuard<()>,
    _entry: TwinLockEntry<'a>,
}

/// One caller's share of a map entry.
struct TwinLockEntry<'a> {
    locks: &'a TwinLocks,
    id: Identity,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for TwinLockEntry<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.entries();
        // Clones are only made under the map lock, so with it held, ours and the map's being
        // the only ones means nobody holds or waits for this entry, and nobody can start to.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.id);
        }
    }
}

impl Hub {
    /// An atomic read-modify-write of `id`'s twin: reads it with its version, applies `change`
    /// (pure document code, run again on each try) and writes only if nobody wrote in
    /// between, else starts over from a fresh read. Returns the stored document and `change`'s
    /// value.
    async fn modify_twin<T>(
        &self,
        id: &Identity,
        memo: Option<&TwinMemo>,
        mut change: impl FnMut(&mut StoredDoc, &str) -> Result<T, TwinFailure>,
    ) -> Result<(StoredDoc, T), TwinFailure> {
        let now = crate::timefmt::now_iso();
        let module = id.module_id.as_deref();
        // The first try may start from what this connection last wrote; every retry reads.
        let mut remembered = memo.and_then(TwinMemo::take);
        for _ in 0..TWIN_WRITE_TRIES {
            let current = match remembered.take() {
                Some(t) => Some(t),
                None => self.store.get_twin(&id.device_id, module).await?,
            };
            let expected = current.as_ref().map(|t| t.version);
            let mut d = StoredDoc::load(current.map(|t| t.doc), &now)?;
            let out = change(&mut d, &now)?;
            let text =
                serde_json::to_string(&d).map_err(|e| TwinFailure::Corrupt(e.to_string()))?;
            // The text goes to the store and, for the memo, stays here: one copy per write.
            let kept = memo.map(|_| text.clone());
            match self
                .store
                .put_twin(&id.device_id, module, text, expected)
                .await
            {
                Ok(version) => {
                    if let (Some(memo), Some(doc)) = (memo, kept) {
                        memo.keep(VersionedTwin { doc, version });
                    }
                    return Ok((d, out));
                }
                Err(StoreError::VersionMismatch) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        warn!(identity = %id, "twin write kept losing to concurrent writes");
        Err(TwinFailure::Store(StoreError::VersionMismatch))
    }

    /// [`Hub::modify_twin`] under the identity's twin lock.
    async fn modify_twin_locked<T>(
        &self,
        id: &Identity,
        memo: Option<&TwinMemo>,
        change: impl FnMut(&mut StoredDoc, &str) -> Result<T, TwinFailure>,
    ) -> Result<(StoredDoc, T), TwinFailure> {
        let _order = self.twin_locks.lock(id).await;
        self.modify_twin(id, memo, change).await
    }

    fn respond(
        &self,
        client: &HubClient,
        status: u16,
        rid: &str,
        version: Option<u64>,
        body: Vec<u8>,
    ) {
        if let Some(out) = self.outbound_of(client) {
            self.reply(
                client,
                &out,
                twin_response_topic(status, rid, version),
                Bytes::from(body),
            );
        }
    }

    fn respond_error(&self, client: &HubClient, rid: &str, failure: &TwinFailure) {
        let code = failure.code();
        debug!(identity = %client.identity, rid, error = %failure, "twin request refused");
        let body = code
            .json_body(&failure.to_string())
            .to_string()
            .into_bytes();
        self.respond(client, code.http_status(), rid, None, body);
    }

    /// The outbound of this very connection (not a newer one of the same identity).
    fn outbound_of(&self, client: &HubClient) -> Option<crate::link::Outbound> {
        self.connections
            .get(&client.identity)
            .filter(|l| l.conn_seq == client.conn_seq)
            .map(|l| l.outbound)
    }

    /// `$iothub/twin/GET/?$rid=…`: answers 200 with desired and reported.
    pub(super) async fn device_twin_get(&self, client: &HubClient, rid: &str) {
        crate::metrics::twin("device", "get");
        if !self.throttles.allow(Operation::TwinRead) {
            return self.respond_error(client, rid, &TwinFailure::Throttled);
        }
        let id = &client.identity;
        let doc = match self
            .store
            .get_twin(&id.device_id, id.module_id.as_deref())
            .await
        {
            Ok(d) => d.map(|t| t.doc),
            Err(e) => return self.respond_error(client, rid, &e.into()),
        };
        match StoredDoc::load(doc, &crate::timefmt::now_iso()) {
            Ok(d) => {
                let body = d.twin.device_view().to_string().into_bytes();
                self.respond(client, 200, rid, None, body);
            }
            Err(f) => self.respond_error(client, rid, &f),
        }
    }

    /// `$iothub/twin/PATCH/properties/reported/?$rid=…`: merges, answers 204 with the new
    /// reported `$version` once it is on disk.
    pub(super) async fn device_twin_patch(&self, client: &HubClient, rid: &str, body: &[u8]) {
        crate::metrics::twin("device", "patch");
        if !self.throttles.allow(Operation::TwinUpdate) {
            return self.respond_error(client, rid, &TwinFailure::Throttled);
        }
        let patch: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return self.respond_error(client, rid, &TwinFailure::BadJson(e.to_string())),
        };
        // The digital twin before the write, kept only when a digital twin change route exists
        // and the device has a model: the event is the difference.
        let keep_before = self.emits_digital_twin_changes();
        let mut before = None;
        let update =
            self.modify_twin_locked(&client.identity, Some(&client.twin_memo), |d, now| {
                if keep_before && d.model_id.is_some() {
                    before = Some(d.twin.properties_view());
                }
                Ok(d.twin.patch_reported(&patch, now)?)
            });
        match update.await {
            Ok((d, version)) => {
                self.respond(client, 204, rid, Some(version), Vec::new());
                // Events after the answer: the write is durable, and the device need not wait
                // for the events' appends.
                if self.emits(EventOp::UpdateTwin) {
                    let mut reported = patch.clone();
                    if let Value::Object(r) = &mut reported {
                        let meta = patch_metadata(&patch, &d.twin.reported.metadata);
                        r.insert("$metadata".into(), meta);
                        r.insert("$version".into(), Value::from(version));
                    }
                    let body = twin_change_body(d.twin.version, None, None, Some(&reported));
                    self.emit_twin_change(EventOp::UpdateTwin, &client.identity, body)
                        .await;
                }
                if let (Some(before), Some(model_id)) = (before, &d.model_id) {
                    self.emit_digital_twin_change(
                        &client.identity,
                        model_id,
                        before,
                        d.twin.properties_view(),
                    )
                    .await;
                }
                if let (Some(model_id), Value::Object(patch)) = (&client.model_id, patch) {
                    let desired = d.twin.properties_view()["desired"].take();
                    self.observe(crate::conformance::Observation::Reported {
                        identity: client.identity.clone(),
                        model_id: model_id.clone(),
                        patch,
                        desired,
                    });
                }
            }
            Err(f) => self.respond_error(client, rid, &f),
        }
    }

    /// Records the model id a connection announced, when it differs from the stored one.
    pub(super) async fn record_model_id(&self, identity: &Identity, model_id: &str) {
        let current = self
            .store
            .get_twin(&identity.device_id, identity.module_id.as_deref())
            .await;
        if let Ok(Some(twin)) = &current {
            if let Ok(d) = serde_json::from_str::<StoredDoc>(&twin.doc) {
                if d.model_id.as_deref() == Some(model_id) {
                    return;
                }
            }
        }
        let update = self.modify_twin_locked(identity, None, |d, _| {
            d.model_id = Some(model_id.to_string());
            Ok(())
        });
        if let Err(e) = update.await {
            warn!(identity = %identity, error = %e, "recording the model id failed");
        }
    }

    /// The full service-side twin of a registered identity.
    pub async fn get_twin(&self, identity: &Identity) -> Result<Value, TwinFailure> {
        if !self.throttles.allow(Operation::TwinRead) {
            return Err(TwinFailure::Throttled);
        }
        let registry = self.registry_view(identity).await?;
        let doc = self
            .store
            .get_twin(&identity.device_id, identity.module_id.as_deref())
            .await?
            .map(|t| t.doc);
        let d = StoredDoc::load(doc, &crate::timefmt::now_iso())?;
        Ok(self.twin_json(identity, &d, registry))
    }

    /// `PATCH` (merge) or `PUT` (replace) of tags and desired properties from the service,
    /// under `If-Match`. Connected devices subscribed to desired changes are told.
    pub async fn update_twin(
        &self,
        identity: &Identity,
        body: Value,
        replace: bool,
        if_match: IfMatch,
    ) -> Result<Value, TwinFailure> {
        if !self.throttles.allow(Operation::TwinUpdate) {
            return Err(TwinFailure::Throttled);
        }
        self.update_twin_unthrottled(identity, body, replace, if_match)
            .await
    }

    /// [`Hub::update_twin`] outside the service throttle: for the hub's own writes (applying a
    /// configuration), which a burst of client updates must not make fail.
    pub(crate) async fn update_twin_unthrottled(
        &self,
        identity: &Identity,
        body: Value,
        replace: bool,
        if_match: IfMatch,
    ) -> Result<Value, TwinFailure> {
        if !body.is_object() {
            return Err(TwinFailure::BadJson(
                "the twin must be a JSON object".into(),
            ));
        }
        let registry = self.registry_view(identity).await?;
        let order = self.twin_locks.lock(identity).await;
        let keep_before = self.emits_digital_twin_changes();
        let mut before = None;
        let update = self.modify_twin(identity, None, |d, now| {
            // Checked against each fresh read: a retry must not pass on a stale match.
            if !if_match.matches(&d.etag()) {
                return Err(TwinFailure::PreconditionFailed(d.etag()));
            }
            if keep_before && d.model_id.is_some() {
                before = Some(d.twin.properties_view());
            }
            let result = d.twin.apply_service_update(&body, replace, now)?;
            Ok((result.desired_notification, result.changed))
        });
        let (doc, (notification, changed)) = update.await?;
        let op = if replace {
            EventOp::ReplaceTwin
        } else {
            EventOp::UpdateTwin
        };
        // Built before the device's notification takes the desired patch. A patch reports the
        // tags it sent and the desired patch; a replacement the whole of both, as IoT Hub's
        // replaceTwin does.
        let event = (changed && self.emits(op)).then(|| {
            let tags = if replace {
                Some(Value::Object(doc.twin.tags.clone()))
            } else {
                body.get("tags").filter(|t| t.is_object()).cloned()
            };
            let desired = notification.as_ref().map(|n| {
                let mut d = n.clone();
                if let Value::Object(m) = &mut d {
                    m.insert(
                        "$metadata".into(),
                        patch_metadata(n, &doc.twin.desired.metadata),
                    );
                }
                d
            });
            twin_change_body(doc.twin.version, tags.as_ref(), desired.as_ref(), None)
        });
        if let Some(n) = notification {
            self.notify_desired(identity, doc.twin.desired.version, n)
                .await;
        }
        // Under the twin lock, so one identity's twin change events leave in version order.
        if let Some(event) = event {
            self.emit_twin_change(op, identity, event).await;
        }
        if let (Some(before), Some(model_id)) = (before, &doc.model_id) {
            self.emit_digital_twin_change(identity, model_id, before, doc.twin.properties_view())
                .await;
        }
        drop(order);
        Ok(self.twin_json(identity, &doc, registry))
    }

    async fn notify_desired(&self, identity: &Identity, version: u64, body: Value) {
        let out = self
            .connections
            .get(identity)
            .filter(|l| l.subs.desired)
            .map(|l| l.outbound);
        if let Some(out) = out {
            let msg = OutboundMessage::new(
                desired_patch_topic(version),
                Bytes::from(body.to_string().into_bytes()),
                QoS::AtMostOnce,
            );
            // Bounded wait: a stalled device must not hold the service caller.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), out.send(msg)).await;
        }
    }

    /// The registry fields a twin shows, or NotFound.
    pub(crate) async fn registry_view(
        &self,
        identity: &Identity,
    ) -> Result<Map<String, Value>, TwinFailure> {
        let device = self
            .store
            .get_device(&identity.device_id)
            .await?
            .ok_or_else(|| TwinFailure::DeviceNotFound(identity.device_id.clone()))?;
        let record = match &identity.module_id {
            None => ScannedIdentity::Device(device),
            Some(mid) => ScannedIdentity::Module(
                self.store
                    .get_module(&identity.device_id, mid)
                    .await?
                    .ok_or_else(|| TwinFailure::ModuleNotFound(mid.clone()))?,
            ),
        };
        let c2d = self
            .store
            .c2d_count(&identity.device_id, identity.module_id.as_deref())
            .await?;
        Ok(self.identity_members(identity, &record, Some(c2d)))
    }

    /// The members of a twin that come from the identity's registry record and its live
    /// state: everything but `etag`, `modelId`, `version`, `tags` and `properties`. Shared by
    /// `GET /twins` and queries, so both show the same document. `c2d` is the queue depth,
    /// when the caller read it.
    pub(crate) fn identity_members(
        &self,
        identity: &Identity,
        record: &ScannedIdentity,
        c2d: Option<u64>,
    ) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("deviceId".into(), Value::String(identity.device_id.clone()));
        let (auth, etag_of_identity) = match record {
            ScannedIdentity::Device(device) => {
                m.insert(
                    "status".into(),
                    serde_json::to_value(device.status).unwrap_or(Value::Null),
                );
                m.insert(
                    "statusUpdateTime".into(),
                    Value::String(
                        device
                            .status_updated_time
                            .clone()
                            .unwrap_or_else(|| crate::timefmt::NEVER.to_string()),
                    ),
                );
                m.insert(
                    "capabilities".into(),
                    serde_json::json!({"iotEdge": device.capabilities.iot_edge}),
                );
                (&device.authentication, device.etag.clone())
            }
            ScannedIdentity::Module(module) => {
                m.insert("moduleId".into(), Value::String(module.module_id.clone()));
                (&module.authentication, module.etag.clone())
            }
        };
        m.insert("deviceEtag".into(), Value::String(etag_of_identity));
        let live = self.presence.get(identity);
        let connected = live.is_some_and(|p| p.connected);
        m.insert(
            "connectionState".into(),
            Value::String(
                if connected {
                    "Connected"
                } else {
                    "Disconnected"
                }
                .into(),
            ),
        );
        m.insert(
            "lastActivityTime".into(),
            Value::String(match live {
                Some(p) => crate::timefmt::iso_system(p.last_activity),
                None => crate::timefmt::NEVER.into(),
            }),
        );
        m.insert(
            "authenticationType".into(),
            serde_json::to_value(auth.auth_type).unwrap_or(Value::Null),
        );
        // IoT Hub's twin carries it as an object even when empty; the SDK models read it so.
        m.insert(
            "x509Thumbprint".into(),
            serde_json::to_value(&auth.x509_thumbprint).unwrap_or(Value::Null),
        );
        if let Some(n) = c2d {
            m.insert("cloudToDeviceMessageCount".into(), Value::from(n));
        }
        m
    }

    pub(crate) fn twin_json(
        &self,
        _identity: &Identity,
        d: &StoredDoc,
        mut extra: Map<String, Value>,
    ) -> Value {
        extra.insert("etag".into(), Value::String(d.etag()));
        if let Some(m) = &d.model_id {
            extra.insert("modelId".into(), Value::String(m.clone()));
        } else {
            extra.insert("modelId".into(), Value::String(String::new()));
        }
        d.twin.service_view(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    /// Polls once without a runtime wake-up: whether the future could finish right now.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::pin::Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn entries_go_when_the_last_guard_drops_on_every_path() {
        let locks = TwinLocks::default();
        let a = Identity::device("a");
        let b = Identity::module("a", "m");

        let guard = locks.lock(&a).await;
        let other = locks.lock(&b).await;
        assert_eq!(locks.len(), 2, "one entry per identity");
        drop(guard);
        assert_eq!(locks.len(), 1);
        drop(other);
        assert_eq!(locks.len(), 0);

        // The error path of a caller: `?` returns with the guard held.
        async fn fails(locks: &TwinLocks, id: &Identity) -> Result<(), TwinFailure> {
            let _order = locks.lock(id).await;
            Err(TwinFailure::Throttled)
        }
        assert!(fails(&locks, &a).await.is_err());
        assert_eq!(locks.len(), 0, "the error return released the entry");
    }

    #[tokio::test]
    async fn holders_of_one_identity_take_turns() {
        let locks = TwinLocks::default();
        let id = Identity::device("a");
        let first = locks.lock(&id).await;
        let mut second = Box::pin(locks.lock(&id));
        let mut third = Box::pin(locks.lock(&id));
        assert!(poll_once(&mut second).is_pending(), "waits for the first");
        assert!(poll_once(&mut third).is_pending());
        // A different identity is not held up.
        let elsewhere = locks.lock(&Identity::device("b")).await;
        drop(elsewhere);

        drop(first);
        let Poll::Ready(second) = poll_once(&mut second) else {
            panic!("the second waiter goes once the first drops");
        };
        assert!(poll_once(&mut third).is_pending(), "one holder at a time");
        drop(second);
        assert!(poll_once(&mut third).is_ready());
        drop(third);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_leaves_nothing_behind() {
        let locks = TwinLocks::default();
        let id = Identity::device("a");
        let held = locks.lock(&id).await;
        let mut waiter = Box::pin(locks.lock(&id));
        assert!(poll_once(&mut waiter).is_pending());
        // The service caller disconnected while waiting for the lock.
        drop(waiter);
        drop(held);
        assert_eq!(locks.len(), 0);
    }

    /// A device patching steadily starts each patch from what it last wrote, and a service
    /// update in between (which makes that memo stale) is kept, not overwritten.
    #[tokio::test]
    async fn reported_patches_start_from_the_memo_and_never_lose_a_concurrent_write(
    ) -> crate::testing::R {
        use std::sync::atomic::Ordering::SeqCst;
        let f = crate::testing::fixture()?;
        f.hub.put_device("d1", Default::default(), None).await?;
        let (client, mut pushed) = crate::testing::connect(&f.hub, "d1", &[]).await;
        let reads_before = f.store.twin_reads.load(SeqCst);
        for i in 0..5 {
            let body = format!(r#"{{"n":{i}}}"#);
            f.hub
                .device_twin_patch(&client, &i.to_string(), body.as_bytes())
                .await;
        }
        assert_eq!(
            f.store.twin_reads.load(SeqCst) - reads_before,
            1,
            "only the first patch reads the twin"
        );
        let id = Identity::device("d1");
        f.hub
            .update_twin(
                &id,
                serde_json::json!({"properties": {"desired": {"mode": "eco"}}}),
                false,
                IfMatch::Any,
            )
            .await?;
        f.hub
            .device_twin_patch(&client, "last", br#"{"n":99}"#)
            .await;
        let twin = f.hub.get_twin(&id).await?;
        assert_eq!(twin["properties"]["desired"]["mode"], "eco", "{twin}");
        assert_eq!(twin["properties"]["reported"]["n"], 99, "{twin}");
        assert_eq!(twin["properties"]["reported"]["$version"], 7, "{twin}");
        // Every patch was answered 204.
        let mut answered = 0;
        while let Ok(m) = pushed.try_recv() {
            assert!(m.topic.starts_with("$iothub/twin/res/204/"), "{}", m.topic);
            answered += 1;
        }
        assert_eq!(answered, 6);
        Ok(())
    }
}
