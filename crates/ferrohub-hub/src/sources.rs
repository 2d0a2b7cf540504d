//! The non-telemetry events the hub emits as routing sources: device and module lifecycle,
//! twin changes, connection state, digital twin changes and device job ends, in IoT Hub's format
//! (`ferrohub_iothub::notifications`), routed by the routes of their source alone (no
//! fallback) to their endpoints' durable streams.
//!
//! Each emitter first asks the compiled routing table whether any route has its source
//! ([`Hub::routes_source`]) and returns at once if none does, before reading or building
//! anything. An event is emitted after the write it reports is durable, and the caller waits
//! until the event's appends are durable too, but an event that cannot be stored (a full disk)
//! is logged and dropped: the operation it reports has happened and its caller is answered as
//! usual. A crash between the two writes loses that event (see ARCHITECTURE.md, "How a message
//! is routed").

use std::sync::atomic::{AtomicU64, Ordering};

use ferrohub_iothub::notifications::{
    self, connection_state_body, json_patch_diff, new_correlation_id, Context, Notification,
    Operation,
};
use ferrohub_iothub::{digital_twin, Identity};
use ferrohub_store::telemetry::NewEvent;
use serde_json::Value;
use time::OffsetDateTime;
use tracing::warn;

use crate::routing::RouteSource;
use crate::Hub;

/// What the emitters keep: the epoch that orders connection state events across starts.
pub(crate) struct Sources {
    /// The first part of every connection state `sequenceNumber` this process emits: larger
    /// for every start of the hub on a data directory (the server derives it from a file
    /// there, [`Hub::set_connection_epoch`]), so a restart's events follow the previous run's
    /// whatever their connection numbers (which start again at 1). Until set, the start time in
    /// Unix milliseconds, which orders restarts as long as the clock does.
    epoch: AtomicU64,
}

impl Default for Sources {
    fn default() -> Self {
        let ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        Self {
            epoch: AtomicU64::new(u64::try_from(ms).unwrap_or(0)),
        }
    }
}

fn route_source(source: notifications::EventSource) -> RouteSource {
    use notifications::EventSource as E;
    match source {
        E::DeviceLifecycleEvents => RouteSource::DeviceLifecycleEvents,
        E::TwinChangeEvents => RouteSource::TwinChangeEvents,
        E::DeviceConnectionStateEvents => RouteSource::DeviceConnectionStateEvents,
        E::DigitalTwinChangeEvents => RouteSource::DigitalTwinChangeEvents,
        E::DeviceJobLifecycleEvents => RouteSource::DeviceJobLifecycleEvents,
    }
}

/// The digital twin of a stored twin document's properties: what a digital twin change event
/// diffs. Only `properties` and `modelId` shape it.
pub(crate) fn digital_twin_of(device_id: &str, model_id: &str, properties: Value) -> Value {
    let twin = serde_json::json!({"modelId": model_id, "properties": properties});
    digital_twin::digital_twin(device_id, &twin)
}

impl Hub {
    /// Sets the connection state epoch (see [`Sources`]); call once, before devices connect.
    pub fn set_connection_epoch(&self, epoch: u64) {
        self.sources.epoch.store(epoch, Ordering::Relaxed);
    }

    /// Whether a route has `op`'s source: an emitter's first question.
    pub(crate) fn emits(&self, op: Operation) -> bool {
        self.routes_source(route_source(op.source()))
    }

    /// Routes `n` and waits until its copies are durable; a failure is logged, never returned:
    /// the operation it reports has already happened.
    async fn emit(&self, identity: &Identity, n: Notification, twin: Option<Value>) {
        let op = n
            .properties
            .iter()
            .find(|(k, _)| k == "opType")
            .and_then(|(_, v)| v.clone())
            .unwrap_or_default();
        let source = route_source(n.source);
        let event = NewEvent {
            device_id: identity.device_id.clone(),
            module_id: identity.module_id.clone(),
            enqueued_ms: i64::try_from(
                OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000,
            )
            .unwrap_or(i64::MAX),
            system_properties: n.system_properties,
            properties: n.properties,
            body: n.body,
        };
        let stored = async {
            for durable in self.route_event(source, event, twin).await? {
                durable.await?;
            }
            Ok::<_, crate::error::HubError>(())
        };
        if let Err(e) = stored.await {
            warn!(identity = %identity, op_type = %op, error = %e, "a routed event could not be stored and is lost");
        }
    }

    /// Builds `op`'s event for `identity` with `body`, stamped now.
    fn notification(&self, op: Operation, identity: &Identity, body: &Value) -> Notification {
        let hub_name = self.routing_hub_name();
        let correlation_id = new_correlation_id();
        notifications::notification(
            op,
            &Context {
                hub_name: &hub_name,
                identity,
                at: OffsetDateTime::now_utc(),
                correlation_id: &correlation_id,
            },
            body,
        )
    }

    /// The identity's twin as lifecycle events carry it, if a lifecycle route exists: read
    /// before a delete, since afterwards there is none.
    pub(crate) async fn lifecycle_twin(&self, identity: &Identity) -> Option<Value> {
        if !self.emits(Operation::DeleteDeviceIdentity) {
            return None;
        }
        self.routing_twin(identity).await
    }

    /// A device or module was created (`twin` `None`: read now) or deleted (`twin` read before
    /// the delete by [`Hub::lifecycle_twin`]). Body: the identity's twin, as IoT Hub sends it.
    pub(crate) async fn emit_lifecycle(
        &self,
        op: Operation,
        identity: &Identity,
        twin: Option<Value>,
    ) {
        if !self.emits(op) {
            return;
        }
        let twin = match twin {
            Some(t) => t,
            None => match self.routing_twin(identity).await {
                Some(t) => t,
                // Deleted again meanwhile, or unreadable (logged by routing_twin).
                None => return,
            },
        };
        let n = self.notification(op, identity, &twin);
        self.emit(identity, n, Some(twin)).await;
    }

    /// A twin changed: `body` is IoT Hub's twin change body (the new `version` and what
    /// changed), `op` `updateTwin` or `replaceTwin`.
    pub(crate) async fn emit_twin_change(&self, op: Operation, identity: &Identity, body: Value) {
        if !self.emits(op) {
            return;
        }
        let n = self.notification(op, identity, &body);
        self.emit(identity, n, None).await;
    }

    /// Connection `conn_seq` of `identity` opened (`connected`) or ended.
    pub(crate) async fn emit_connection_state(
        &self,
        identity: &Identity,
        conn_seq: u64,
        connected: bool,
    ) {
        let op = if connected {
            Operation::DeviceConnected
        } else {
            Operation::DeviceDisconnected
        };
        if !self.emits(op) {
            return;
        }
        let epoch = self.sources.epoch.load(Ordering::Relaxed);
        let body = connection_state_body(epoch, conn_seq, u64::from(!connected));
        let n = self.notification(op, identity, &body);
        self.emit(identity, n, None).await;
    }

    /// A device's part of a job ended (`completed` or `failed`, the body's `status`). IoT Hub
    /// documents no format for device job lifecycle events, so this one follows its others:
    /// `opType` `deviceJobCompleted`, the usual system and application properties, and as
    /// body the device job as `GET /jobs/v2/query` lists it (`jobId`, `jobType`, `status`,
    /// times, `outcome` or `error`).
    pub(crate) async fn emit_device_job(&self, identity: &Identity, device_job: &Value) {
        if !self.emits(Operation::DeviceJobCompleted) {
            return;
        }
        let n = self.notification(Operation::DeviceJobCompleted, identity, device_job);
        self.emit(identity, n, None).await;
    }

    /// Whether a digital twin change route exists (callers then keep the twin's properties
    /// from before their write).
    pub(crate) fn emits_digital_twin_changes(&self) -> bool {
        self.emits(Operation::UpdateDigitalTwin)
    }

    /// The digital twin of a device with model `model_id` changed from `before` to `after`
    /// (each the twin's `properties` member): a JSON Patch of the digital twin. Nothing is
    /// emitted when the digital twin did not change (a write of equal values).
    pub(crate) async fn emit_digital_twin_change(
        &self,
        identity: &Identity,
        model_id: &str,
        before: Value,
        after: Value,
    ) {
        // IoT Hub's digital twin is a device's; modules have none (see digital_twins.rs).
        if identity.module_id.is_some() || model_id.is_empty() || !self.emits_digital_twin_changes()
        {
            return;
        }
        let before = digital_twin_of(&identity.device_id, model_id, before);
        let after = digital_twin_of(&identity.device_id, model_id, after);
        let patch = json_patch_diff(&before, &after);
        if patch.is_empty() {
            return;
        }
        let hub_name = self.routing_hub_name();
        let correlation_id = new_correlation_id();
        let n = notifications::digital_twin_change(
            &Context {
                hub_name: &hub_name,
                identity,
                at: OffsetDateTime::now_utc(),
                correlation_id: &correlation_id,
            },
            model_id,
            &patch,
        );
        self.emit(identity, n, None).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use ferrohub_store::telemetry::TelemetryLog;
    use ferrohub_store::IfMatch;

    use crate::registry::IdentityRequest;
    use crate::routing::{Route, RouteSource};
    use crate::testing::{fixture, R};

    fn lifecycle_route_to_events() -> Route {
        Route {
            name: "life".into(),
            source: RouteSource::DeviceLifecycleEvents,
            condition: "true".into(),
            endpoint_names: vec!["events".into()],
            is_enabled: true,
        }
    }

    #[tokio::test]
    async fn without_a_route_a_delete_reads_no_twin_for_its_event() -> R {
        let f = fixture()?;
        f.hub
            .put_device("d1", IdentityRequest::default(), None)
            .await?;
        let reads = f.store.twin_reads.load(Ordering::SeqCst);
        f.hub.delete_device("d1", IfMatch::Any).await?;
        assert_eq!(f.store.twin_reads.load(Ordering::SeqCst), reads);

        // With a lifecycle route the twin is read before the delete, for the event's body.
        f.hub.put_route(lifecycle_route_to_events()).await?;
        f.hub
            .put_device("d2", IdentityRequest::default(), None)
            .await?;
        let reads = f.store.twin_reads.load(Ordering::SeqCst);
        f.hub.delete_device("d2", IfMatch::Any).await?;
        assert!(f.store.twin_reads.load(Ordering::SeqCst) > reads);
        Ok(())
    }

    #[tokio::test]
    async fn an_event_that_cannot_be_stored_does_not_fail_its_operation() -> R {
        let f = fixture()?;
        f.hub.put_route(lifecycle_route_to_events()).await?;
        f.telemetry.fail_syncs.store(true, Ordering::SeqCst);
        // The device is created and answered; its event is logged as lost.
        let d = f
            .hub
            .put_device("d1", IdentityRequest::default(), None)
            .await?;
        assert_eq!(d.device.device_id, "d1");
        f.telemetry.fail_syncs.store(false, Ordering::SeqCst);
        f.hub.delete_device("d1", IfMatch::Any).await?;
        // The next event is stored: only the failed one was lost.
        let stored = f.telemetry.inner.read(0, 0, 10).await?;
        let ops: Vec<_> = stored
            .iter()
            .filter_map(|e| e.event.properties.iter().find(|(k, _)| k == "opType"))
            .filter_map(|(_, v)| v.clone())
            .collect();
        assert_eq!(ops, ["deleteDeviceIdentity"]);
        Ok(())
    }
}
