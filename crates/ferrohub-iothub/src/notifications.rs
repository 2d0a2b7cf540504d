//! The non-telemetry events IoT Hub emits, in its property and body format: device and module
//! lifecycle (created, deleted), twin changes (updated, replaced), connection state (connected,
//! disconnected, with a sequence number that orders them), digital twin changes (a JSON Patch)
//! and device job lifecycle. Pure builders: the hub decides when an event happens and where it
//! goes (routing), these say what it looks like.
//!
//! Every event carries the system properties IoT Hub sets on non-telemetry events
//! (`content-type: application/json`, `content-encoding: utf-8`, a unique `correlation-id`,
//! `user-id` = the hub's name, the identity's `iothub-connection-device-id` and, for modules,
//! `iothub-connection-module-id`, `iothub-enqueuedtime`, `iothub-message-source`) and the
//! application properties `hubName`, `deviceId`, `moduleId` (modules only), `opType`,
//! `operationTimestamp` and `iothub-message-schema`.

use std::collections::BTreeMap;

use serde_json::Value;
use time::OffsetDateTime;

use crate::identity::Identity;
use crate::telemetry::{self, format_utc_timestamp};
use crate::topics::Property;

/// Where an event comes from: `iothub-message-source`, and the routing source it is selected by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventSource {
    DeviceLifecycleEvents,
    TwinChangeEvents,
    DeviceConnectionStateEvents,
    DigitalTwinChangeEvents,
    DeviceJobLifecycleEvents,
}

impl EventSource {
    /// The value of `iothub-message-source`.
    pub fn message_source(self) -> &'static str {
        match self {
            EventSource::DeviceLifecycleEvents => "deviceLifecycleEvents",
            EventSource::TwinChangeEvents => "twinChangeEvents",
            EventSource::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
            EventSource::DigitalTwinChangeEvents => "digitalTwinChangeEvents",
            EventSource::DeviceJobLifecycleEvents => "deviceJobLifecycleEvents",
        }
    }

    /// The value of `iothub-message-schema`.
    fn schema(self) -> &'static str {
        match self {
            EventSource::DeviceLifecycleEvents => "deviceLifecycleNotification",
            EventSource::TwinChangeEvents => "twinChangeNotification",
            EventSource::DeviceConnectionStateEvents => "deviceConnectionStateNotification",
            EventSource::DigitalTwinChangeEvents => "digitalTwinChangeNotification",
            EventSource::DeviceJobLifecycleEvents => "deviceJobLifecycleNotification",
        }
    }
}

/// What happened: `opType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    CreateDeviceIdentity,
    DeleteDeviceIdentity,
    CreateModuleIdentity,
    DeleteModuleIdentity,
    UpdateTwin,
    ReplaceTwin,
    DeviceConnected,
    DeviceDisconnected,
    UpdateDigitalTwin,
    DeviceJobCompleted,
}

impl Operation {
    pub fn op_type(self) -> &'static str {
        match self {
            Operation::CreateDeviceIdentity => "createDeviceIdentity",
            Operation::DeleteDeviceIdentity => "deleteDeviceIdentity",
            Operation::CreateModuleIdentity => "createModuleIdentity",
            Operation::DeleteModuleIdentity => "deleteModuleIdentity",
            Operation::UpdateTwin => "updateTwin",
            Operation::ReplaceTwin => "replaceTwin",
            Operation::DeviceConnected => "deviceConnected",
            Operation::DeviceDisconnected => "deviceDisconnected",
            // IoT Hub names a digital twin change by the twin operation behind it.
            Operation::UpdateDigitalTwin => "updateTwin",
            Operation::DeviceJobCompleted => "deviceJobCompleted",
        }
    }

    pub fn source(self) -> EventSource {
        match self {
            Operation::CreateDeviceIdentity
            | Operation::DeleteDeviceIdentity
            | Operation::CreateModuleIdentity
            | Operation::DeleteModuleIdentity => EventSource::DeviceLifecycleEvents,
            Operation::UpdateTwin | Operation::ReplaceTwin => EventSource::TwinChangeEvents,
            Operation::DeviceConnected | Operation::DeviceDisconnected => {
                EventSource::DeviceConnectionStateEvents
            }
            Operation::UpdateDigitalTwin => EventSource::DigitalTwinChangeEvents,
            Operation::DeviceJobCompleted => EventSource::DeviceJobLifecycleEvents,
        }
    }
}

/// A non-telemetry event, ready to be routed and stored like a telemetry message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub source: EventSource,
    pub system_properties: BTreeMap<String, String>,
    pub properties: Vec<Property>,
    /// JSON, UTF-8.
    pub body: Vec<u8>,
}

/// What every event needs besides its body.
pub struct Context<'a> {
    pub hub_name: &'a str,
    pub identity: &'a Identity,
    pub at: OffsetDateTime,
    /// Unique per event (`correlation-id`): a UUID, say.
    pub correlation_id: &'a str,
}

/// An event for `op` on `ctx.identity` with `body`.
pub fn notification(op: Operation, ctx: &Context<'_>, body: &Value) -> Notification {
    let source = op.source();
    let now = format_utc_timestamp(ctx.at);
    let mut sys = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        sys.insert(k.to_owned(), v.to_owned());
    };
    set(telemetry::CONTENT_TYPE, "application/json");
    set(telemetry::CONTENT_ENCODING, "utf-8");
    set(telemetry::CORRELATION_ID, ctx.correlation_id);
    set(telemetry::USER_ID, ctx.hub_name);
    set(telemetry::CONNECTION_DEVICE_ID, &ctx.identity.device_id);
    if let Some(m) = &ctx.identity.module_id {
        set(telemetry::CONNECTION_MODULE_ID, m);
    }
    set(telemetry::ENQUEUED_TIME, &now);
    set(telemetry::MESSAGE_SOURCE, source.message_source());
    let mut props: Vec<Property> = vec![
        ("hubName".into(), Some(ctx.hub_name.into())),
        ("deviceId".into(), Some(ctx.identity.device_id.clone())),
    ];
    if let Some(m) = &ctx.identity.module_id {
        props.push(("moduleId".into(), Some(m.clone())));
    }
    props.push(("operationTimestamp".into(), Some(now)));
    props.push(("opType".into(), Some(op.op_type().into())));
    props.push((
        telemetry::MESSAGE_SCHEMA.into(),
        Some(source.schema().into()),
    ));
    Notification {
        source,
        system_properties: sys,
        properties: props,
        body: body.to_string().into_bytes(),
    }
}

/// The body of a connection state event: a sequence number that grows with every connect and
/// disconnect of the identity, so that a reader can put events that arrive out of order back
/// in order. IoT Hub's is an opaque 64-digit hexadecimal string compared as text; this one is
/// too: the hub's start epoch (16 hex digits, larger for every start of the hub on its data
/// directory), the connection's sequence within that start (16) and the event's order within
/// the connection (32: 0 connected, 1 disconnected). Fixed widths, so text order is numeric.
pub fn connection_state_body(
    epoch: u64,
    connection_sequence: u64,
    event_in_connection: u64,
) -> Value {
    serde_json::json!({
        "sequenceNumber":
            format!("{epoch:016X}{connection_sequence:016X}{event_in_connection:032X}")
    })
}

/// A fresh `correlation-id`: 128 random bits in the 8-4-4-4-12 form of a UUID (version 4).
pub fn new_correlation_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(b)
}

/// 16 bytes in the 8-4-4-4-12 hex form of a UUID, as IoT Hub and the SDKs write message,
/// correlation and request ids.
pub fn uuid_text(b: [u8; 16]) -> String {
    let h = hex_of(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn hex_of(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A digital twin change event: `opType` `updateTwin`, the device's model in `dt-dataschema`
/// (a system property, as IoT Hub sets it) and a JSON Patch body.
pub fn digital_twin_change(ctx: &Context<'_>, model_id: &str, patch: &[Value]) -> Notification {
    let mut n = notification(
        Operation::UpdateDigitalTwin,
        ctx,
        &Value::Array(patch.to_vec()),
    );
    n.system_properties
        .insert("dt-dataschema".into(), model_id.to_owned());
    n
}

/// The JSON Patch (RFC 6902: `add`, `replace`, `remove`) that turns `before` into `after`,
/// objects compared member by member so only what changed is named; anything else (arrays,
/// scalars) is replaced whole. The body of a digital twin change event, from the digital twin
/// before and after the write.
pub fn json_patch_diff(before: &Value, after: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff_into(&mut ops, String::new(), before, after);
    ops
}

fn diff_into(ops: &mut Vec<Value>, path: String, before: &Value, after: &Value) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, av) in a {
                let p = format!("{path}/{}", escape_pointer(k));
                match b.get(k) {
                    None => ops.push(serde_json::json!({"op": "add", "path": p, "value": av})),
                    Some(bv) => diff_into(ops, p, bv, av),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                let p = format!("{path}/{}", escape_pointer(k));
                ops.push(serde_json::json!({"op": "remove", "path": p}));
            }
        }
        _ if before == after => {}
        _ => ops.push(serde_json::json!({"op": "replace", "path": path, "value": after})),
    }
}

/// A JSON Pointer reference token (RFC 6901): `~` and `/` escaped.
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The body of a twin change event: what changed, with the twin's new `version` (IoT Hub's
/// shape: `{"version": n, "tags": {...}, "properties": {"desired": {... "$version"}, "reported": {...}}}`,
/// only the parts that changed).
/// The part of a section's `$metadata` that describes `patch`: the section's own
/// `$lastUpdated` (and `$lastUpdatedVersion`), and for every property the patch names, its
/// metadata (recursively for objects). A property the patch removed (null) has none. IoT Hub's
/// twin change events carry this beside the patch.
pub fn patch_metadata(patch: &Value, metadata: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Value::Object(m) = metadata {
        for (k, v) in m.iter().filter(|(k, _)| k.starts_with('$')) {
            out.insert(k.clone(), v.clone());
        }
    }
    if let Value::Object(p) = patch {
        for (k, v) in p.iter().filter(|(k, _)| !k.starts_with('$')) {
            let Some(meta) = metadata.get(k) else {
                continue;
            };
            let entry = if v.is_object() {
                patch_metadata(v, meta)
            } else {
                meta.clone()
            };
            out.insert(k.clone(), entry);
        }
    }
    Value::Object(out)
}

pub fn twin_change_body(
    version: u64,
    tags: Option<&Value>,
    desired: Option<&Value>,
    reported: Option<&Value>,
) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("version".into(), Value::from(version));
    if let Some(t) = tags {
        out.insert("tags".into(), t.clone());
    }
    let mut props = serde_json::Map::new();
    if let Some(d) = desired {
        props.insert("desired".into(), d.clone());
    }
    if let Some(r) = reported {
        props.insert("reported".into(), r.clone());
    }
    if !props.is_empty() {
        out.insert("properties".into(), Value::Object(props));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx<'a>(id: &'a Identity) -> Context<'a> {
        Context {
            hub_name: "myhub",
            identity: id,
            at: OffsetDateTime::from_unix_timestamp(1_764_000_000).expect("time"),
            correlation_id: "c0ffee",
        }
    }

    #[test]
    fn patch_metadata_mirrors_what_the_patch_names() {
        let meta = json!({
            "$lastUpdated": "T2",
            "a": {"$lastUpdated": "T1"},
            "b": {"$lastUpdated": "T2", "x": {"$lastUpdated": "T2"}, "y": {"$lastUpdated": "T0"}},
            "c": {"$lastUpdated": "T0"}
        });
        let patch = json!({"a": 1, "b": {"x": 2}, "gone": null, "$version": 4});
        assert_eq!(
            patch_metadata(&patch, &meta),
            json!({
                "$lastUpdated": "T2",
                "a": {"$lastUpdated": "T1"},
                "b": {"$lastUpdated": "T2", "x": {"$lastUpdated": "T2"}}
            })
        );
    }

    #[test]
    fn lifecycle_of_a_module() {
        let id = Identity::module("d1", "m1");
        let n = notification(
            Operation::CreateModuleIdentity,
            &ctx(&id),
            &json!({"deviceId": "d1", "moduleId": "m1"}),
        );
        assert_eq!(n.source, EventSource::DeviceLifecycleEvents);
        let sys: Vec<(&str, &str)> = n
            .system_properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            sys,
            [
                ("content-encoding", "utf-8"),
                ("content-type", "application/json"),
                ("correlation-id", "c0ffee"),
                ("iothub-connection-device-id", "d1"),
                ("iothub-connection-module-id", "m1"),
                ("iothub-enqueuedtime", "2025-11-24T16:00:00.0000000Z"),
                ("iothub-message-source", "deviceLifecycleEvents"),
                ("user-id", "myhub"),
            ]
        );
        let props: Vec<(&str, Option<&str>)> = n
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        assert_eq!(
            props,
            [
                ("hubName", Some("myhub")),
                ("deviceId", Some("d1")),
                ("moduleId", Some("m1")),
                ("operationTimestamp", Some("2025-11-24T16:00:00.0000000Z")),
                ("opType", Some("createModuleIdentity")),
                ("iothub-message-schema", Some("deviceLifecycleNotification")),
            ]
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&n.body).expect("json"),
            json!({"deviceId": "d1", "moduleId": "m1"})
        );
    }

    #[test]
    fn device_events_have_no_module_properties() {
        let id = Identity::device("d1");
        let n = notification(
            Operation::DeviceConnected,
            &ctx(&id),
            &connection_state_body(7, 1, 0),
        );
        assert_eq!(n.source, EventSource::DeviceConnectionStateEvents);
        assert!(!n
            .system_properties
            .contains_key("iothub-connection-module-id"));
        assert!(n.properties.iter().all(|(k, _)| k != "moduleId"));
        assert_eq!(
            n.system_properties["iothub-message-source"],
            "deviceConnectionStateEvents"
        );
    }

    #[test]
    fn connection_sequence_numbers_order_as_text() {
        let seq = |e, c, ev| {
            connection_state_body(e, c, ev)["sequenceNumber"]
                .as_str()
                .map(str::to_owned)
        };
        // Within a start, by connection then event; every later start after all of them.
        let order = [
            seq(1, 1, 0),
            seq(1, 1, 1),
            seq(1, 2, 0),
            seq(1, 10, 0),
            seq(1, 255, 3),
            seq(1, u64::MAX, 1),
            seq(2, 1, 0),
            seq(u64::MAX, 0, 0),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(order[0].as_deref().map(str::len), Some(64));
        assert!(order
            .iter()
            .flatten()
            .all(|s| s.chars().all(|c| c.is_ascii_hexdigit())));
    }

    #[test]
    fn connection_state_events_are_iot_hubs() {
        let id = Identity::device("d1");
        for (op, name) in [
            (Operation::DeviceConnected, "deviceConnected"),
            (Operation::DeviceDisconnected, "deviceDisconnected"),
        ] {
            let n = notification(op, &ctx(&id), &connection_state_body(1, 2, 0));
            let prop = |k: &str| {
                n.properties
                    .iter()
                    .find(|(p, _)| p == k)
                    .and_then(|(_, v)| v.clone())
            };
            assert_eq!(prop("opType").as_deref(), Some(name));
            assert_eq!(
                prop("iothub-message-schema").as_deref(),
                Some("deviceConnectionStateNotification")
            );
            assert_eq!(prop("hubName").as_deref(), Some("myhub"));
            assert_eq!(n.system_properties["content-type"], "application/json");
            let body: Value = serde_json::from_slice(&n.body).expect("json");
            assert_eq!(
                body,
                json!({"sequenceNumber": format!("{:016X}{:016X}{:032X}", 1, 2, 0)})
            );
        }
    }

    #[test]
    fn lifecycle_and_twin_change_operations() {
        let id = Identity::device("d1");
        for (op, name, source, schema) in [
            (
                Operation::CreateDeviceIdentity,
                "createDeviceIdentity",
                "deviceLifecycleEvents",
                "deviceLifecycleNotification",
            ),
            (
                Operation::DeleteDeviceIdentity,
                "deleteDeviceIdentity",
                "deviceLifecycleEvents",
                "deviceLifecycleNotification",
            ),
            (
                Operation::DeleteModuleIdentity,
                "deleteModuleIdentity",
                "deviceLifecycleEvents",
                "deviceLifecycleNotification",
            ),
            (
                Operation::UpdateTwin,
                "updateTwin",
                "twinChangeEvents",
                "twinChangeNotification",
            ),
            (
                Operation::ReplaceTwin,
                "replaceTwin",
                "twinChangeEvents",
                "twinChangeNotification",
            ),
        ] {
            let twin = json!({"deviceId": "d1", "etag": "AAAAAAAAAAE=", "version": 2});
            let n = notification(op, &ctx(&id), &twin);
            assert_eq!(n.system_properties["iothub-message-source"], source);
            assert!(n.properties.contains(&("opType".into(), Some(name.into()))));
            assert!(n
                .properties
                .contains(&("iothub-message-schema".into(), Some(schema.into()))));
            assert_eq!(
                serde_json::from_slice::<Value>(&n.body).expect("json"),
                twin
            );
        }
    }

    #[test]
    fn digital_twin_changes_are_json_patches_with_the_model() {
        let id = Identity::device("d1");
        let before = json!({"$dtId": "d1", "temp": 20, "gone": 1,
            "thermostat1": {"target": 5, "$metadata": {"target": {"lastUpdateTime": "a"}}}});
        let after = json!({"$dtId": "d1", "temp": 21, "new/one": true,
            "thermostat1": {"target": 5, "$metadata": {"target": {"lastUpdateTime": "b"}}}});
        let patch = json_patch_diff(&before, &after);
        assert_eq!(
            patch,
            vec![
                json!({"op": "add", "path": "/new~1one", "value": true}),
                json!({"op": "replace", "path": "/temp", "value": 21}),
                json!({"op": "replace", "path": "/thermostat1/$metadata/target/lastUpdateTime", "value": "b"}),
                json!({"op": "remove", "path": "/gone"}),
            ]
        );
        let n = digital_twin_change(&ctx(&id), "dtmi:com:example:Thermostat;1", &patch);
        assert_eq!(n.source, EventSource::DigitalTwinChangeEvents);
        assert_eq!(
            n.system_properties["iothub-message-source"],
            "digitalTwinChangeEvents"
        );
        assert_eq!(
            n.system_properties["dt-dataschema"],
            "dtmi:com:example:Thermostat;1"
        );
        assert!(n
            .properties
            .contains(&("opType".into(), Some("updateTwin".into()))));
        assert!(n.properties.contains(&(
            "iothub-message-schema".into(),
            Some("digitalTwinChangeNotification".into())
        )));
        assert_eq!(
            serde_json::from_slice::<Value>(&n.body).expect("json"),
            Value::Array(patch)
        );
    }

    #[test]
    fn correlation_ids_are_unique_uuids() {
        let a = new_correlation_id();
        let b = new_correlation_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert!(a.split('-').map(str::len).eq([8, 4, 4, 4, 12]));
    }

    #[test]
    fn twin_change_bodies_hold_only_what_changed() {
        assert_eq!(
            twin_change_body(3, None, Some(&json!({"fw": "2.1", "$version": 2})), None),
            json!({"version": 3, "properties": {"desired": {"fw": "2.1", "$version": 2}}})
        );
        assert_eq!(
            twin_change_body(4, Some(&json!({"site": "b"})), None, None),
            json!({"version": 4, "tags": {"site": "b"}})
        );
        for op in [Operation::UpdateTwin, Operation::ReplaceTwin] {
            assert_eq!(op.source(), EventSource::TwinChangeEvents);
        }
    }
}
