//! Device and module twins at runtime: the device's GET and reported patches over MQTT, the
//! service's reads and updates, and desired-property notifications to connected devices.
//!
//! The document rules (merge, versions, metadata, limits) are `ferrohub_iothub::twin`; the
//! store makes each update atomic. This module adds identity checks, etags, throttling and the
//! push of desired changes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ferrohub_iothub::registry::etag_of;
use ferrohub_iothub::topics::{desired_patch_topic, twin_response_topic};
use ferrohub_iothub::twin::{Twin, TwinError};
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_mqtt::QoS;
use ferrohub_store::{IfMatch, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, warn};

use crate::link::OutboundMessage;
use crate::throttle::Operation;
use crate::{Hub, HubClient};

/// What the store keeps for a twin: the document plus the model id the identity announced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredDoc {
    twin: Twin,
    #[serde(default)]
    model_id: Option<String>,
}

impl StoredDoc {
    fn load(doc: Option<String>, now: &str) -> Result<Self, TwinFailure> {
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
            TwinFailure::Corrupt(_) | TwinFailure::Store(_) => ErrorCode::ServerError,
        }
    }
}

impl From<StoreError> for TwinFailure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Rejected(inner) => match inner.downcast::<TwinFailure>() {
                Ok(f) => *f,
                Err(other) => TwinFailure::Corrupt(other.to_string()),
            },
            other => TwinFailure::Store(other),
        }
    }
}

/// Serialises a closure's result for the store; the closure's errors travel back boxed.
fn finish<T: Send + 'static>(
    doc: &StoredDoc,
    out: T,
) -> Result<ferrohub_store::TwinUpdateOutput, ferrohub_store::BoxError> {
    let text = serde_json::to_string(doc)?;
    Ok((text, Box::new(out)))
}

fn take<T: 'static>(v: Box<dyn std::any::Any + Send>) -> Result<T, TwinFailure> {
    v.downcast::<T>()
        .map(|b| *b)
        .map_err(|_| TwinFailure::Corrupt("unexpected update output".into()))
}

/// A per-identity lock for service-side twin writes, so desired notifications leave in version
/// order. Entries go when nobody holds them.
#[derive(Default)]
pub(crate) struct TwinLocks {
    map: std::sync::Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
}

impl TwinLocks {
    fn get(&self, id: &Identity) -> Arc<tokio::sync::Mutex<()>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_default()
            .clone()
    }

    fn release(&self, id: &Identity, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else waits on it.
        if Arc::strong_count(&lock) == 2 {
            map.remove(id);
        }
    }
}

impl Hub {
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
                &out,
                OutboundMessage::new(
                    twin_response_topic(status, rid, version),
                    Bytes::from(body),
                    QoS::AtMostOnce,
                ),
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
        self.lock_clients()
            .get(&client.identity)
            .filter(|l| l.conn_seq == client.conn_seq)
            .map(|l| l.outbound.clone())
    }

    /// `$iothub/twin/GET/?$rid=…`: answers 200 with desired and reported.
    pub(super) async fn device_twin_get(&self, client: &HubClient, rid: &str) {
        if !self.throttles.allow(Operation::TwinRead) {
            return self.respond_error(client, rid, &TwinFailure::Throttled);
        }
        let id = &client.identity;
        let doc = match self
            .store
            .get_twin(&id.device_id, id.module_id.as_deref())
            .await
        {
            Ok(d) => d,
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
        if !self.throttles.allow(Operation::TwinUpdate) {
            return self.respond_error(client, rid, &TwinFailure::Throttled);
        }
        let patch: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return self.respond_error(client, rid, &TwinFailure::BadJson(e.to_string())),
        };
        let id = &client.identity;
        let now = crate::timefmt::now_iso();
        let update: ferrohub_store::TwinUpdate = Box::new(move |doc| {
            let mut d = StoredDoc::load(doc, &now)?;
            let v = d
                .twin
                .patch_reported(&patch, &now)
                .map_err(TwinFailure::from)?;
            finish(&d, v)
        });
        match self
            .store
            .update_twin(&id.device_id, id.module_id.as_deref(), update)
            .await
            .map_err(TwinFailure::from)
            .and_then(take::<u64>)
        {
            Ok(version) => self.respond(client, 204, rid, Some(version), Vec::new()),
            Err(f) => self.respond_error(client, rid, &f),
        }
    }

    /// Records the model id a connection announced, when it differs from the stored one.
    pub(super) async fn record_model_id(&self, identity: &Identity, model_id: &str) {
        let current = self
            .store
            .get_twin(&identity.device_id, identity.module_id.as_deref())
            .await;
        if let Ok(Some(doc)) = &current {
            if let Ok(d) = serde_json::from_str::<StoredDoc>(doc) {
                if d.model_id.as_deref() == Some(model_id) {
                    return;
                }
            }
        }
        let now = crate::timefmt::now_iso();
        let model = model_id.to_string();
        let update: ferrohub_store::TwinUpdate = Box::new(move |doc| {
            let mut d = StoredDoc::load(doc, &now)?;
            d.model_id = Some(model);
            finish(&d, ())
        });
        if let Err(e) = self
            .store
            .update_twin(&identity.device_id, identity.module_id.as_deref(), update)
            .await
        {
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
            .await?;
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
        if !body.is_object() {
            return Err(TwinFailure::BadJson(
                "the twin must be a JSON object".into(),
            ));
        }
        let registry = self.registry_view(identity).await?;
        let lock = self.twin_locks.get(identity);
        let guard = lock.lock().await;
        let now = crate::timefmt::now_iso();
        let update: ferrohub_store::TwinUpdate = Box::new(move |doc| {
            let mut d = StoredDoc::load(doc, &now)?;
            if !if_match.matches(&d.etag()) {
                return Err(Box::new(TwinFailure::PreconditionFailed(d.etag())));
            }
            let result = d
                .twin
                .apply_service_update(&body, replace, &now)
                .map_err(TwinFailure::from)?;
            let out = (result.desired_notification, d.clone());
            finish(&d, out)
        });
        let result = self
            .store
            .update_twin(&identity.device_id, identity.module_id.as_deref(), update)
            .await
            .map_err(TwinFailure::from)
            .and_then(take::<(Option<Value>, StoredDoc)>);
        let (notification, doc) = match result {
            Ok(r) => r,
            Err(e) => {
                drop(guard);
                self.twin_locks.release(identity, lock);
                return Err(e);
            }
        };
        if let Some(n) = notification {
            self.notify_desired(identity, doc.twin.desired.version, n)
                .await;
        }
        drop(guard);
        self.twin_locks.release(identity, lock);
        Ok(self.twin_json(identity, &doc, registry))
    }

    async fn notify_desired(&self, identity: &Identity, version: u64, body: Value) {
        let out = self
            .lock_clients()
            .get(identity)
            .filter(|l| l.subs.desired)
            .map(|l| l.outbound.clone());
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
    async fn registry_view(&self, identity: &Identity) -> Result<Map<String, Value>, TwinFailure> {
        let mut m = Map::new();
        let device = self
            .store
            .get_device(&identity.device_id)
            .await?
            .ok_or_else(|| TwinFailure::DeviceNotFound(identity.device_id.clone()))?;
        m.insert("deviceId".into(), Value::String(device.device_id.clone()));
        let (auth, status, etag_of_identity) = match &identity.module_id {
            None => (
                device.authentication.auth_type,
                Some(device.status),
                device.etag.clone(),
            ),
            Some(mid) => {
                let module = self
                    .store
                    .get_module(&identity.device_id, mid)
                    .await?
                    .ok_or_else(|| TwinFailure::ModuleNotFound(mid.clone()))?;
                m.insert("moduleId".into(), Value::String(module.module_id.clone()));
                (module.authentication.auth_type, None, module.etag.clone())
            }
        };
        m.insert("deviceEtag".into(), Value::String(etag_of_identity));
        if let Some(s) = status {
            m.insert(
                "status".into(),
                serde_json::to_value(s).unwrap_or(Value::Null),
            );
        }
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
        if let Some(p) = live {
            m.insert(
                "lastActivityTime".into(),
                Value::String(crate::timefmt::iso_system(p.last_activity)),
            );
        }
        m.insert(
            "authenticationType".into(),
            serde_json::to_value(auth).unwrap_or(Value::Null),
        );
        m.insert(
            "cloudToDeviceMessageCount".into(),
            Value::from(
                self.store
                    .c2d_count(&identity.device_id, identity.module_id.as_deref())
                    .await?,
            ),
        );
        Ok(m)
    }

    fn twin_json(
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
