//! IoT Plug and Play's digital twin view of a device twin (`GET /digitaltwins/{id}`) and the
//! JSON Patch of `PATCH /digitaltwins/{id}` turned into a desired-properties patch. Pure
//! functions over the service twin JSON (what `GET /twins/{id}` answers): no I/O, no clock.
//!
//! The shape follows IoT Hub's documented digital twin (`$dtId`, root `$metadata` with `$model`,
//! per property `desiredValue`, `desiredVersion`, `ackVersion`, `ackCode`, `ackDescription`,
//! `lastUpdateTime`; components as objects with their own `$metadata`). Decisions where the
//! documentation is silent:
//! - A component is a desired or reported member that is an object marked `"__t": "c"` (the
//!   IoT Plug and Play convention). The hub has no model at hand here, so the twin's markers
//!   are the only source of truth: a name never marked is a plain (possibly complex) property.
//! - A reported value is a writable-property ack when it is an object with `value` and a
//!   numeric `ac`; the twin shows its `value` and the metadata its `ac`/`av`/`ad`. Any other
//!   reported value is shown as it is.
//! - `desiredVersion` is the desired `$version` at which that property was last written (its
//!   `$lastUpdatedVersion`), which is the version the device's ack names in `av`; the
//!   section's `$version` is the fallback for a twin without per-property metadata.
//! - `lastUpdateTime` is the reported `$lastUpdated` when the device reported the property,
//!   otherwise the desired one. A property only desired (not acknowledged yet) appears in
//!   `$metadata` only, as on IoT Hub.
//! - `$model` is left out when the device announced no model id.
//! - JSON Patch: `add`, `replace` and `remove` only (IoT Hub documents these three); `test`,
//!   `move` and `copy` are refused. Operations merge, in order, into one desired patch (JSON
//!   merge patch, RFC 7386, like every desired update), so `replace` of an object merges into
//!   it rather than dropping its other members, and `remove` becomes `null`. A path may not
//!   name `$`-members (`/$metadata`, `/$dtId`, `/$model` are the hub's) or the `__t` marker.
//!   A first segment the twin marks as a component, or an `add`/`replace` of a whole object
//!   carrying `$metadata` (IoT Hub's way of writing a component), writes a component: its patch
//!   carries `"__t": "c"`.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::errors::ErrorCode;

/// The IoT Plug and Play component marker's name and value.
pub const COMPONENT_MARKER: &str = "__t";
pub const COMPONENT_MARKER_VALUE: &str = "c";

const METADATA: &str = "$metadata";

/// Why a digital twin patch was refused. `index` is the operation's position in the array.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PatchError {
    #[error("a digital twin patch must be a JSON array of JSON Patch operations")]
    NotAnArray,
    #[error("the digital twin patch has no operations")]
    Empty,
    #[error("operation {index} is not a JSON object")]
    NotAnObject { index: usize },
    #[error("operation {index} has no \"op\" string")]
    MissingOp { index: usize },
    #[error("operation {index}: op {op:?} is not supported (add, replace and remove are)")]
    UnsupportedOp { index: usize, op: String },
    #[error("operation {index} has no \"path\" string")]
    MissingPath { index: usize },
    #[error("operation {index}: path {path:?} {why}")]
    BadPath {
        index: usize,
        path: String,
        why: &'static str,
    },
    #[error("operation {index}: {op} needs a \"value\"")]
    MissingValue { index: usize, op: String },
    #[error("operation {index}: the value of component {component:?} must be a JSON object")]
    ComponentNotAnObject { index: usize, component: String },
}

impl PatchError {
    /// A bad patch is a bad request, as IoT Hub answers it.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::ArgumentInvalid
    }
}

fn is_component(v: Option<&Value>) -> bool {
    v.and_then(|v| v.get(COMPONENT_MARKER))
        .and_then(Value::as_str)
        == Some(COMPONENT_MARKER_VALUE)
}

/// A writable-property ack (`{"value", "ac", "av", "ad"}`) by the IoT Plug and Play convention.
fn ack(v: &Value) -> Option<&Map<String, Value>> {
    let o = v.as_object()?;
    (o.contains_key("value") && o.get("ac").is_some_and(Value::is_number)).then_some(o)
}

fn section<'a>(twin: &'a Value, name: &str) -> &'a Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    twin.get("properties")
        .and_then(|p| p.get(name))
        .and_then(Value::as_object)
        .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

/// Names of the members that are properties (not `$version`, `$metadata`, the marker).
fn names<'a>(a: Option<&'a Value>, b: Option<&'a Value>) -> BTreeSet<&'a str> {
    [a, b]
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|o| o.keys())
        .map(String::as_str)
        .filter(|k| !k.starts_with('$') && *k != COMPONENT_MARKER)
        .collect()
}

/// Inputs for one property: its desired and reported values and metadata.
struct PropertyParts<'a> {
    desired: Option<&'a Value>,
    reported: Option<&'a Value>,
    desired_meta: Option<&'a Value>,
    reported_meta: Option<&'a Value>,
}

/// One property's root value (if the device reported one) and its `$metadata` entry.
fn property(p: PropertyParts<'_>, desired_version: &Value) -> (Option<Value>, Value) {
    let mut meta = Map::new();
    if let Some(d) = p.desired.filter(|d| !d.is_null()) {
        meta.insert("desiredValue".into(), d.clone());
        let version = p
            .desired_meta
            .and_then(|m| m.get("$lastUpdatedVersion"))
            .unwrap_or(desired_version);
        meta.insert("desiredVersion".into(), version.clone());
    }
    let mut value = None;
    if let Some(r) = p.reported.filter(|r| !r.is_null()) {
        match ack(r) {
            Some(a) => {
                value = a.get("value").cloned();
                for (from, to) in [
                    ("av", "ackVersion"),
                    ("ac", "ackCode"),
                    ("ad", "ackDescription"),
                ] {
                    if let Some(v) = a.get(from) {
                        meta.insert(to.into(), v.clone());
                    }
                }
            }
            None => value = Some(r.clone()),
        }
    }
    let updated = match value {
        Some(_) => p.reported_meta,
        None => p.desired_meta,
    }
    .and_then(|m| m.get("$lastUpdated"));
    if let Some(t) = updated {
        meta.insert("lastUpdateTime".into(), t.clone());
    }
    (value, Value::Object(meta))
}

/// The members of a digital twin level (root or component) from the desired and reported
/// objects of that level and their metadata; components only at the root.
fn level(
    desired: Option<&Value>,
    reported: Option<&Value>,
    dmeta: Option<&Value>,
    rmeta: Option<&Value>,
    desired_version: &Value,
    root: bool,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut out = Map::new();
    let mut meta = Map::new();
    for name in names(desired, reported) {
        let d = desired.and_then(|o| o.get(name));
        let r = reported.and_then(|o| o.get(name));
        let dm = dmeta.and_then(|m| m.get(name));
        let rm = rmeta.and_then(|m| m.get(name));
        if root && (is_component(d) || is_component(r)) {
            let (mut c, cmeta) = level(d, r, dm, rm, desired_version, false);
            c.insert(METADATA.into(), Value::Object(cmeta));
            out.insert(name.to_owned(), Value::Object(c));
            continue;
        }
        let parts = PropertyParts {
            desired: d,
            reported: r,
            desired_meta: dm,
            reported_meta: rm,
        };
        let (value, pmeta) = property(parts, desired_version);
        if let Some(v) = value {
            out.insert(name.to_owned(), v);
        }
        meta.insert(name.to_owned(), pmeta);
    }
    (out, meta)
}

/// The digital twin of a device from its service twin JSON (`properties.desired` and
/// `.reported` with `$metadata` and `$version`, `modelId`).
pub fn digital_twin(device_id: &str, twin: &Value) -> Value {
    let desired = section(twin, "desired");
    let reported = section(twin, "reported");
    let dversion = desired.get("$version").cloned().unwrap_or(Value::from(0));
    let (desired_v, reported_v) = (
        Value::Object(desired.clone()),
        Value::Object(reported.clone()),
    );
    let (mut out, mut meta) = level(
        Some(&desired_v),
        Some(&reported_v),
        desired.get(METADATA),
        reported.get(METADATA),
        &dversion,
        true,
    );
    if let Some(model) = twin
        .get("modelId")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    {
        meta.insert("$model".into(), Value::from(model));
    }
    out.insert("$dtId".into(), Value::from(device_id));
    out.insert(METADATA.into(), Value::Object(meta));
    Value::Object(out)
}

/// The names the twin marks as components, in desired or reported.
pub fn components(twin: &Value) -> BTreeSet<String> {
    ["desired", "reported"]
        .into_iter()
        .flat_map(|s| section(twin, s).iter())
        .filter(|(_, v)| is_component(Some(v)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// JSON Pointer (RFC 6901) segments of a patch path, refusing what no digital twin patch may
/// touch.
fn segments(index: usize, path: &str) -> Result<Vec<String>, PatchError> {
    let bad = |why| PatchError::BadPath {
        index,
        path: path.to_owned(),
        why,
    };
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| bad("must start with '/' and name a property or component"))?;
    let mut out = Vec::new();
    for raw in rest.split('/') {
        if raw.is_empty() {
            return Err(bad("has an empty segment"));
        }
        // RFC 6901: `~1` is '/', `~0` is '~', in that order; any other '~' is malformed.
        if raw.replace("~0", "").replace("~1", "").contains('~') {
            return Err(bad("has a '~' that is not ~0 or ~1"));
        }
        let seg = raw.replace("~1", "/").replace("~0", "~");
        if seg.starts_with('$') {
            return Err(bad("names a '$' member, which the hub maintains"));
        }
        if seg == COMPONENT_MARKER {
            return Err(bad("names the component marker, which the hub maintains"));
        }
        out.push(seg);
    }
    Ok(out)
}

/// Sets `path` in `target` to `value`, making objects on the way (an earlier operation's
/// scalar on the way is replaced: the later operation wins).
fn set(target: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = target;
    for p in parents {
        let slot = at
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else { return };
        at = next;
    }
    at.insert(last.clone(), value);
}

fn mark_component(target: &mut Map<String, Value>, component: &str) {
    if let Some(Value::Object(c)) = target.get_mut(component) {
        c.insert(COMPONENT_MARKER.into(), Value::from(COMPONENT_MARKER_VALUE));
    }
}

/// Turns a digital twin JSON Patch into a desired-properties patch (the `properties.desired`
/// of a twin `PATCH`). `components` are the names the twin marks as components.
pub fn desired_patch(patch: &Value, components: &BTreeSet<String>) -> Result<Value, PatchError> {
    let ops = patch.as_array().ok_or(PatchError::NotAnArray)?;
    if ops.is_empty() {
        return Err(PatchError::Empty);
    }
    let mut out = Map::new();
    for (index, op) in ops.iter().enumerate() {
        let op = op.as_object().ok_or(PatchError::NotAnObject { index })?;
        let name = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or(PatchError::MissingOp { index })?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or(PatchError::MissingPath { index })?;
        let value = match name {
            "add" | "replace" => {
                op.get("value")
                    .cloned()
                    .ok_or_else(|| PatchError::MissingValue {
                        index,
                        op: name.to_owned(),
                    })?
            }
            "remove" => Value::Null,
            other => {
                return Err(PatchError::UnsupportedOp {
                    index,
                    op: other.to_owned(),
                })
            }
        };
        let segs = segments(index, path)?;
        let first = segs[0].clone();
        let whole_component_write =
            segs.len() == 1 && value.as_object().is_some_and(|o| o.contains_key(METADATA));
        let component = components.contains(&first) || whole_component_write;
        if component && segs.len() == 1 && !value.is_null() {
            let Value::Object(mut body) = value else {
                return Err(PatchError::ComponentNotAnObject {
                    index,
                    component: first,
                });
            };
            body.remove(METADATA);
            body.remove(COMPONENT_MARKER);
            set(&mut out, &segs, Value::Object(body));
        } else {
            set(&mut out, &segs, value);
        }
        if component {
            mark_component(&mut out, &first);
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T1: &str = "2026-12-01T10:00:00.0000000Z";
    const T2: &str = "2026-12-01T10:05:00.0000000Z";
    const T3: &str = "2026-12-01T10:06:00.0000000Z";

    /// A temperature controller's service twin: a root read-only property, a root writable
    /// property desired and acknowledged, a component with a reported read-only property, an
    /// acknowledged writable property and one desired but not acknowledged yet.
    fn controller_twin() -> Value {
        json!({
            "deviceId": "tc1",
            "modelId": "dtmi:com:example:TemperatureController;2",
            "etag": "AAAAAAAAAAM=",
            "properties": {
                "desired": {
                    "interval": 5,
                    "thermostat1": {"__t": "c", "targetTemperature": 21.5, "unit": "C"},
                    "$metadata": {
                        "$lastUpdated": T2,
                        "$lastUpdatedVersion": 3,
                        "interval": {"$lastUpdated": T1, "$lastUpdatedVersion": 2},
                        "thermostat1": {
                            "$lastUpdated": T2, "$lastUpdatedVersion": 3,
                            "__t": {"$lastUpdated": T2, "$lastUpdatedVersion": 3},
                            "targetTemperature": {"$lastUpdated": T2, "$lastUpdatedVersion": 3},
                            "unit": {"$lastUpdated": T2, "$lastUpdatedVersion": 3}
                        }
                    },
                    "$version": 3
                },
                "reported": {
                    "serialNumber": "SN-1",
                    "interval": {"value": 5, "ac": 200, "av": 2, "ad": "ok"},
                    "thermostat1": {
                        "__t": "c",
                        "maxTempSinceLastReboot": 38.7,
                        "targetTemperature": {"value": 21.5, "ac": 200, "av": 3, "ad": "done"}
                    },
                    "$metadata": {
                        "$lastUpdated": T3,
                        "serialNumber": {"$lastUpdated": T1},
                        "interval": {"$lastUpdated": T1, "value": {"$lastUpdated": T1}},
                        "thermostat1": {
                            "$lastUpdated": T3,
                            "__t": {"$lastUpdated": T1},
                            "maxTempSinceLastReboot": {"$lastUpdated": T1},
                            "targetTemperature": {"$lastUpdated": T3}
                        }
                    },
                    "$version": 4
                }
            }
        })
    }

    #[test]
    fn the_digital_twin_has_iot_hubs_shape() {
        let dt = digital_twin("tc1", &controller_twin());
        assert_eq!(
            dt,
            json!({
                "$dtId": "tc1",
                "serialNumber": "SN-1",
                "interval": 5,
                "thermostat1": {
                    "maxTempSinceLastReboot": 38.7,
                    "targetTemperature": 21.5,
                    "$metadata": {
                        "maxTempSinceLastReboot": {"lastUpdateTime": T1},
                        "targetTemperature": {
                            "desiredValue": 21.5, "desiredVersion": 3,
                            "ackVersion": 3, "ackCode": 200, "ackDescription": "done",
                            "lastUpdateTime": T3
                        },
                        "unit": {"desiredValue": "C", "desiredVersion": 3, "lastUpdateTime": T2}
                    }
                },
                "$metadata": {
                    "$model": "dtmi:com:example:TemperatureController;2",
                    "serialNumber": {"lastUpdateTime": T1},
                    "interval": {
                        "desiredValue": 5, "desiredVersion": 2,
                        "ackVersion": 2, "ackCode": 200, "ackDescription": "ok",
                        "lastUpdateTime": T1
                    }
                }
            })
        );
    }

    #[test]
    fn a_twin_without_model_or_properties_is_just_its_id() {
        let twin = json!({"deviceId": "d", "modelId": "", "properties": {
            "desired": {"$metadata": {"$lastUpdated": T1}, "$version": 1},
            "reported": {"$metadata": {"$lastUpdated": T1}, "$version": 1}}});
        assert_eq!(
            digital_twin("d", &twin),
            json!({"$dtId": "d", "$metadata": {}})
        );
        assert_eq!(
            digital_twin("d", &json!({})),
            json!({"$dtId": "d", "$metadata": {}})
        );
    }

    #[test]
    fn complex_values_and_acks_without_av_or_ad_pass_through() {
        let twin = json!({"properties": {
        "desired": {"$version": 7},
        "reported": {
            "location": {"lat": 1.5, "lon": 2.5},
            "mode": {"value": "eco", "ac": 203},
            "notAnAck": {"value": 1, "ac": "x"},
            "$metadata": {"location": {"$lastUpdated": T1}}
        }}});
        let dt = digital_twin("d", &twin);
        assert_eq!(dt["location"], json!({"lat": 1.5, "lon": 2.5}));
        assert_eq!(dt["mode"], "eco");
        assert_eq!(dt["$metadata"]["mode"], json!({"ackCode": 203}));
        assert_eq!(dt["notAnAck"], json!({"value": 1, "ac": "x"}));
        assert_eq!(dt["$metadata"]["location"], json!({"lastUpdateTime": T1}));
    }

    #[test]
    fn a_component_only_desired_is_still_a_component() {
        let twin = json!({"properties": {
            "desired": {"th2": {"__t": "c", "targetTemperature": 30},
                        "$metadata": {"th2": {"targetTemperature": {"$lastUpdated": T2, "$lastUpdatedVersion": 9}}},
                        "$version": 9},
            "reported": {}}});
        let dt = digital_twin("d", &twin);
        assert_eq!(
            dt["th2"],
            json!({"$metadata": {"targetTemperature": {"desiredValue": 30, "desiredVersion": 9, "lastUpdateTime": T2}}})
        );
        assert_eq!(components(&twin), BTreeSet::from(["th2".to_owned()]));
    }

    fn comps() -> BTreeSet<String> {
        components(&controller_twin())
    }

    #[test]
    fn patches_become_desired_updates_with_component_markers() -> Result<(), PatchError> {
        let p = json!([
            {"op": "add", "path": "/interval", "value": 10},
            {"op": "replace", "path": "/thermostat1/targetTemperature", "value": 22.5},
            {"op": "remove", "path": "/thermostat1/unit"},
            {"op": "remove", "path": "/oldSetting"},
            {"op": "add", "path": "/config/limits/max", "value": 40}
        ]);
        assert_eq!(
            desired_patch(&p, &comps())?,
            json!({
                "interval": 10,
                "thermostat1": {"__t": "c", "targetTemperature": 22.5, "unit": null},
                "oldSetting": null,
                "config": {"limits": {"max": 40}}
            })
        );
        Ok(())
    }

    #[test]
    fn whole_components_are_written_added_and_removed() -> Result<(), PatchError> {
        // IoT Hub's form for a component: an object with `$metadata`, even before the twin
        // has ever marked the name.
        let p = json!([{"op": "add", "path": "/thermostat2",
                        "value": {"targetTemperature": 19, "$metadata": {}}}]);
        assert_eq!(
            desired_patch(&p, &BTreeSet::new())?,
            json!({"thermostat2": {"__t": "c", "targetTemperature": 19}})
        );
        let p =
            json!([{"op": "replace", "path": "/thermostat1", "value": {"targetTemperature": 19}}]);
        assert_eq!(
            desired_patch(&p, &comps())?,
            json!({"thermostat1": {"__t": "c", "targetTemperature": 19}})
        );
        let p = json!([{"op": "remove", "path": "/thermostat1"}]);
        assert_eq!(desired_patch(&p, &comps())?, json!({"thermostat1": null}));
        // An object without `$metadata` on an unmarked name is a complex property.
        let p = json!([{"op": "add", "path": "/location", "value": {"lat": 1}}]);
        assert_eq!(
            desired_patch(&p, &comps())?,
            json!({"location": {"lat": 1}})
        );
        Ok(())
    }

    #[test]
    fn later_operations_win_and_pointer_escapes_are_decoded() -> Result<(), PatchError> {
        let p = json!([
            {"op": "add", "path": "/a", "value": 1},
            {"op": "add", "path": "/a/b", "value": 2},
            {"op": "add", "path": "/x~1y~0z", "value": true}
        ]);
        assert_eq!(
            desired_patch(&p, &comps())?,
            json!({"a": {"b": 2}, "x/y~z": true})
        );
        Ok(())
    }

    #[test]
    fn bad_patches_are_refused_with_argument_invalid() {
        let c = comps();
        let cases = [
            (json!({"op": "add"}), PatchError::NotAnArray),
            (json!([]), PatchError::Empty),
            (json!([1]), PatchError::NotAnObject { index: 0 }),
            (
                json!([{"op": "add", "path": "/a", "value": 1}, {"path": "/a"}]),
                PatchError::MissingOp { index: 1 },
            ),
            (
                json!([{"op": "move", "from": "/a", "path": "/b"}]),
                PatchError::UnsupportedOp {
                    index: 0,
                    op: "move".into(),
                },
            ),
            (
                json!([{"op": "test", "path": "/a", "value": 1}]),
                PatchError::UnsupportedOp {
                    index: 0,
                    op: "test".into(),
                },
            ),
            (
                json!([{"op": "copy", "from": "/a", "path": "/b"}]),
                PatchError::UnsupportedOp {
                    index: 0,
                    op: "copy".into(),
                },
            ),
            (
                json!([{"op": "add", "value": 1}]),
                PatchError::MissingPath { index: 0 },
            ),
            (
                json!([{"op": "add", "path": "/a"}]),
                PatchError::MissingValue {
                    index: 0,
                    op: "add".into(),
                },
            ),
            (
                json!([{"op": "replace", "path": "/thermostat1", "value": 3}]),
                PatchError::ComponentNotAnObject {
                    index: 0,
                    component: "thermostat1".into(),
                },
            ),
        ];
        for (patch, want) in cases {
            let got = desired_patch(&patch, &c);
            assert_eq!(got, Err(want), "{patch}");
        }
        for path in [
            "",
            "a",
            "/",
            "/a//b",
            "/$metadata",
            "/$metadata/$model",
            "/$dtId",
            "/thermostat1/$metadata",
            "/thermostat1/__t",
            "/a~2b",
        ] {
            let patch = json!([{"op": "add", "path": path, "value": 1}]);
            match desired_patch(&patch, &c) {
                Err(e @ PatchError::BadPath { .. }) => {
                    assert_eq!(e.code(), ErrorCode::ArgumentInvalid);
                    assert!(e.to_string().contains(path), "{e}");
                }
                other => panic!("{path:?}: {other:?}"),
            }
        }
    }
}
