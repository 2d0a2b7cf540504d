//! Whether what a device sends follows its model and the IoT Plug and Play conventions: a
//! telemetry message (one JSON object of telemetry names, of the component `dt-subject` names),
//! a reported-properties patch (component members marked `"__t": "c"`, writable properties
//! acknowledged as `{"value", "ac", "av", "ad"}` with `av` a desired version), and a command
//! name (`command` or `component*command`). Each check returns findings; none refuses anything.

use serde_json::{Map, Value};

use crate::check::{check_value, describe};
use crate::resolve::{Model, Resolved};

/// What kind of departure from the model or the conventions a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingKind {
    /// The device announced a model id the repository cannot resolve.
    UnknownModel,
    /// A telemetry body that is not a JSON object.
    TelemetryNotJson,
    UnknownTelemetry,
    TelemetryType,
    /// A component name (in `dt-subject` or a reported patch) the model does not have.
    UnknownComponent,
    UnknownProperty,
    PropertyType,
    /// A component's reported properties without `"__t": "c"`.
    MissingComponentMarker,
    /// A writable property reported without the acknowledgement form, or with a bad one.
    AckShape,
    /// An acknowledgement whose `av` is no desired version the device could be answering.
    AckVersion,
    UnknownCommand,
    /// A command's successful (2xx) response whose payload does not fit the command's
    /// `response` schema.
    CommandResponseType,
}

impl FindingKind {
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::UnknownModel => "unknownModel",
            FindingKind::TelemetryNotJson => "telemetryNotJson",
            FindingKind::UnknownTelemetry => "unknownTelemetry",
            FindingKind::TelemetryType => "telemetryType",
            FindingKind::UnknownComponent => "unknownComponent",
            FindingKind::UnknownProperty => "unknownProperty",
            FindingKind::PropertyType => "propertyType",
            FindingKind::MissingComponentMarker => "missingComponentMarker",
            FindingKind::AckShape => "ackShape",
            FindingKind::AckVersion => "ackVersion",
            FindingKind::UnknownCommand => "unknownCommand",
            FindingKind::CommandResponseType => "commandResponseType",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    pub component: Option<String>,
    /// The telemetry, property or command concerned, when there is one.
    pub name: Option<String>,
    pub detail: String,
}

fn finding(
    kind: FindingKind,
    component: Option<&str>,
    name: Option<&str>,
    detail: impl Into<String>,
) -> Finding {
    Finding {
        kind,
        component: component.map(str::to_owned),
        name: name.map(str::to_owned),
        detail: detail.into(),
    }
}

/// A telemetry message's body (`component` from `dt-subject`).
pub fn check_telemetry(model: &Model, component: Option<&str>, body: &[u8]) -> Vec<Finding> {
    let Some(part) = model.part(component) else {
        return vec![finding(
            FindingKind::UnknownComponent,
            component,
            None,
            format!(
                "dt-subject names the component '{}', which {} does not have",
                component.unwrap_or_default(),
                model.id
            ),
        )];
    };
    let fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        Ok(other) => {
            return vec![finding(
                FindingKind::TelemetryNotJson,
                component,
                None,
                format!(
                    "telemetry is a JSON object of telemetry names, not {}",
                    describe(&other)
                ),
            )]
        }
        Err(e) => {
            return vec![finding(
                FindingKind::TelemetryNotJson,
                component,
                None,
                format!("the body is not JSON: {e}"),
            )]
        }
    };
    let mut out = Vec::new();
    for (name, value) in &fields {
        match part.telemetry.get(name) {
            None => out.push(finding(
                FindingKind::UnknownTelemetry,
                component,
                Some(name),
                format!(
                    "'{name}' is not a telemetry of {}",
                    where_(model, component)
                ),
            )),
            Some(t) => {
                if let Err(e) = check_value(&t.schema, value) {
                    out.push(finding(
                        FindingKind::TelemetryType,
                        component,
                        Some(name),
                        format!("{name}: {e}"),
                    ));
                }
            }
        }
    }
    out
}

/// What the hub knows of the desired properties when a reported patch arrives, to judge
/// acknowledgements: the desired `$version`, and the version at which a property was last
/// set (`$metadata.<name>.$lastUpdatedVersion`).
pub trait DesiredVersions {
    fn current(&self) -> u64;
    fn last_set(&self, component: Option<&str>, property: &str) -> Option<u64>;
}

/// A reported-properties patch a device sent.
pub fn check_reported(
    model: &Model,
    patch: &Map<String, Value>,
    desired: &dyn DesiredVersions,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (key, value) in patch {
        if value.is_null() {
            continue;
        }
        if model.components.contains_key(key) {
            let Some(members) = value.as_object() else {
                out.push(finding(
                    FindingKind::MissingComponentMarker,
                    Some(key),
                    None,
                    format!("the component '{key}' is reported as {}, not an object marked \"__t\": \"c\"", describe(value)),
                ));
                continue;
            };
            if members.get("__t") != Some(&Value::String("c".into())) {
                out.push(finding(
                    FindingKind::MissingComponentMarker,
                    Some(key),
                    None,
                    format!("the component '{key}' is reported without \"__t\": \"c\""),
                ));
            }
            if let Some(part) = model.part(Some(key)) {
                for (name, v) in members.iter().filter(|(n, _)| *n != "__t") {
                    property(model, part, Some(key), name, v, desired, &mut out);
                }
            }
            continue;
        }
        if model.root.properties.contains_key(key) {
            property(model, &model.root, None, key, value, desired, &mut out);
            continue;
        }
        let marked = value.get("__t") == Some(&Value::String("c".into()));
        out.push(if marked {
            finding(
                FindingKind::UnknownComponent,
                Some(key),
                None,
                format!(
                    "'{key}' is reported as a component, which {} does not have",
                    model.id
                ),
            )
        } else {
            finding(
                FindingKind::UnknownProperty,
                None,
                Some(key),
                format!("'{key}' is not a property of {}", model.id),
            )
        });
    }
    out
}

fn property(
    model: &Model,
    part: &Resolved,
    component: Option<&str>,
    name: &str,
    value: &Value,
    desired: &dyn DesiredVersions,
    out: &mut Vec<Finding>,
) {
    if value.is_null() {
        return;
    }
    let Some(p) = part.properties.get(name) else {
        out.push(finding(
            FindingKind::UnknownProperty,
            component,
            Some(name),
            format!("'{name}' is not a property of {}", where_(model, component)),
        ));
        return;
    };
    if !p.writable {
        if let Err(e) = check_value(&p.schema, value) {
            out.push(finding(
                FindingKind::PropertyType,
                component,
                Some(name),
                format!("{name}: {e}"),
            ));
        }
        return;
    }
    // A writable property is reported as its acknowledgement.
    let ack = value
        .as_object()
        .filter(|m| m.contains_key("ac") || m.contains_key("av"));
    let Some(ack) = ack else {
        out.push(finding(
            FindingKind::AckShape,
            component,
            Some(name),
            format!("the writable property '{name}' is reported without the acknowledgement form {{\"value\", \"ac\", \"av\", \"ad\"}}"),
        ));
        return;
    };
    let mut shape = Vec::new();
    if !ack.get("ac").is_some_and(|v| v.is_i64() || v.is_u64()) {
        shape.push("'ac' (a status code) is missing or not a whole number");
    }
    let av = ack.get("av").and_then(Value::as_u64);
    if av.is_none() {
        shape.push("'av' (the desired version answered) is missing or not a whole number");
    }
    if ack.get("ad").is_some_and(|v| !v.is_string()) {
        shape.push("'ad' is not a string");
    }
    if let Some(k) = ack
        .keys()
        .find(|k| !["value", "ac", "av", "ad"].contains(&k.as_str()))
    {
        out.push(finding(
            FindingKind::AckShape,
            component,
            Some(name),
            format!("the acknowledgement of '{name}' has the member '{k}', which the convention does not define"),
        ));
    }
    match ack.get("value") {
        None => shape.push("'value' is missing"),
        Some(v) if !v.is_null() => {
            if let Err(e) = check_value(&p.schema, v) {
                out.push(finding(
                    FindingKind::PropertyType,
                    component,
                    Some(name),
                    format!("{name}.value: {e}"),
                ));
            }
        }
        Some(_) => {}
    }
    for s in shape {
        out.push(finding(
            FindingKind::AckShape,
            component,
            Some(name),
            format!("the acknowledgement of '{name}': {s}"),
        ));
    }
    if let Some(av) = av {
        let current = desired.current();
        let last = desired.last_set(component, name);
        let why = if av > current {
            Some(format!(
                "'av' is {av}, but the desired properties are only at version {current}"
            ))
        } else {
            last.filter(|l| av < *l).map(|l| {
                format!("'av' is {av}, but '{name}' was last set at desired version {l}: the acknowledgement answers an older value")
            })
        };
        if let Some(why) = why {
            out.push(finding(FindingKind::AckVersion, component, Some(name), why));
        }
    }
}

/// A command as a service invoked it (`command` or `component*command`) and, when the device
/// answered with a 2xx status, the payload it answered with. Only the device's side is judged:
/// a request payload is the service's, and an error status may carry any payload.
pub fn check_command(model: &Model, method: &str, answer: Option<(i32, &Value)>) -> Vec<Finding> {
    let (component, command) = match method.split_once('*') {
        Some((c, n)) => (Some(c), n),
        None => (None, method),
    };
    let Some(part) = model.part(component) else {
        return vec![finding(
            FindingKind::UnknownComponent,
            component,
            Some(command),
            format!(
                "'{method}' names the component '{}', which {} does not have",
                component.unwrap_or_default(),
                model.id
            ),
        )];
    };
    if let Some(c) = part.commands.get(command) {
        let Some((status, payload)) = answer.filter(|(status, _)| (200..300).contains(status))
        else {
            return Vec::new();
        };
        let wrong = match &c.response {
            // The conventions leave a command without a response free to answer nothing.
            None => None,
            Some(r) if payload.is_null() && r.nullable => None,
            Some(r) => check_value(&r.schema, payload).err().map(|e| {
                format!(
                    "the {status} response of '{method}' is not its response '{}': {e}",
                    r.name
                )
            }),
        };
        wrong
            .map(|detail| {
                finding(
                    FindingKind::CommandResponseType,
                    component,
                    Some(command),
                    detail,
                )
            })
            .into_iter()
            .collect()
    } else {
        vec![finding(
            FindingKind::UnknownCommand,
            component,
            Some(command),
            format!(
                "'{command}' is not a command of {}",
                where_(model, component)
            ),
        )]
    }
}

fn where_(model: &Model, component: Option<&str>) -> String {
    match component.and_then(|c| model.components.get(c).map(|(id, _)| (c, id))) {
        Some((c, id)) => format!("the component '{c}' ({id})"),
        None => model.id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dtmi, ModelSet};
    use serde_json::json;

    const THERMOSTAT: &str = include_str!("../tests/models/thermostat-1.json");
    const CONTROLLER: &str = include_str!("../tests/models/temperaturecontroller-2.json");
    const DEVICE_INFO: &str = include_str!("../tests/models/deviceinformation-1.json");

    fn controller() -> Model {
        let mut set = ModelSet::new();
        for d in [THERMOSTAT, CONTROLLER, DEVICE_INFO] {
            set.add_document(d).expect("sample");
        }
        set.resolve(&Dtmi::parse("dtmi:com:example:TemperatureController;2").expect("id"))
            .expect("resolves")
    }

    struct Desired(u64, Option<u64>);
    impl DesiredVersions for Desired {
        fn current(&self) -> u64 {
            self.0
        }
        fn last_set(&self, _: Option<&str>, _: &str) -> Option<u64> {
            self.1
        }
    }

    fn kinds(f: &[Finding]) -> Vec<FindingKind> {
        f.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn telemetry() {
        let m = controller();
        assert_eq!(
            check_telemetry(&m, None, br#"{"workingSet": 1024.5}"#),
            vec![]
        );
        assert_eq!(
            check_telemetry(&m, Some("thermostat1"), br#"{"temperature": 21}"#),
            vec![]
        );
        let f = check_telemetry(
            &m,
            Some("thermostat1"),
            br#"{"temperature": "hot", "humidity": 3}"#,
        );
        assert_eq!(
            kinds(&f),
            [FindingKind::UnknownTelemetry, FindingKind::TelemetryType]
        );
        assert_eq!(f[1].name.as_deref(), Some("temperature"));
        assert_eq!(f[1].component.as_deref(), Some("thermostat1"));
        // Root telemetry is not a component's, and the other way round.
        assert_eq!(
            kinds(&check_telemetry(&m, None, br#"{"temperature": 21}"#)),
            [FindingKind::UnknownTelemetry]
        );
        assert_eq!(
            kinds(&check_telemetry(&m, Some("nope"), b"{}")),
            [FindingKind::UnknownComponent]
        );
        assert_eq!(
            kinds(&check_telemetry(&m, None, b"21.5")),
            [FindingKind::TelemetryNotJson]
        );
        assert_eq!(
            kinds(&check_telemetry(&m, None, b"{oops")),
            [FindingKind::TelemetryNotJson]
        );
    }

    #[test]
    fn reported_properties_and_acks() {
        let m = controller();
        let at = Desired(4, Some(3));
        let ok = json!({
            "serialNumber": "SN-1",
            "thermostat1": {"__t": "c", "maxTempSinceLastReboot": 30.5,
                "targetTemperature": {"value": 25.0, "ac": 200, "av": 3, "ad": "done"}},
            "deviceInformation": {"__t": "c", "manufacturer": "Contoso", "totalMemory": 1024},
            "gone": null
        });
        assert_eq!(
            check_reported(&m, ok.as_object().expect("object"), &at),
            vec![]
        );
        let bad = json!({
            "serialNumber": 7,
            "thermostat2": {"maxTempSinceLastReboot": 30.5},
            "thermostat1": {"__t": "c", "targetTemperature": 25.0},
            "extra": 1,
            "ghost": {"__t": "c"}
        });
        let f = check_reported(&m, bad.as_object().expect("object"), &at);
        // One finding per member, in the patch's key order.
        assert_eq!(
            kinds(&f),
            [
                FindingKind::UnknownProperty,
                FindingKind::UnknownComponent,
                FindingKind::PropertyType,
                FindingKind::AckShape,
                FindingKind::MissingComponentMarker,
            ],
            "{f:#?}"
        );
        let acks = json!({"thermostat1": {"__t": "c",
            "targetTemperature": {"value": "warm", "ac": "ok", "av": 9, "extra": 1}}});
        let f = check_reported(&m, acks.as_object().expect("object"), &at);
        assert_eq!(
            kinds(&f),
            [
                FindingKind::AckShape,
                FindingKind::PropertyType,
                FindingKind::AckShape,
                FindingKind::AckVersion
            ],
            "{f:#?}"
        );
        assert!(f[3].detail.contains("only at version 4"), "{}", f[3].detail);
        let stale = json!({"thermostat1": {"__t": "c", "targetTemperature": {"value": 1.0, "ac": 200, "av": 2}}});
        let f = check_reported(&m, stale.as_object().expect("object"), &at);
        assert_eq!(kinds(&f), [FindingKind::AckVersion]);
        assert!(
            f[0].detail.contains("last set at desired version 3"),
            "{}",
            f[0].detail
        );
    }

    #[test]
    fn commands() {
        let m = controller();
        assert_eq!(check_command(&m, "reboot", None), vec![]);
        assert_eq!(
            check_command(&m, "thermostat2*getMaxMinReport", None),
            vec![]
        );
        assert_eq!(
            kinds(&check_command(&m, "getMaxMinReport", None)),
            [FindingKind::UnknownCommand]
        );
        assert_eq!(
            kinds(&check_command(&m, "thermostat1*reboot", None)),
            [FindingKind::UnknownCommand]
        );
        assert_eq!(
            kinds(&check_command(&m, "nope*reboot", None)),
            [FindingKind::UnknownComponent]
        );
    }

    #[test]
    fn command_responses_are_checked_against_the_response_schema_when_2xx() {
        let m = controller();
        let report = json!({
            "maxTemp": 30.5, "minTemp": 18.0, "avgTemp": 22.1,
            "startTime": "2026-12-01T10:00:00Z", "endTime": "2026-12-01T11:00:00Z"
        });
        let method = "thermostat1*getMaxMinReport";
        assert_eq!(check_command(&m, method, Some((200, &report))), vec![]);
        let wrong = json!({"maxTemp": "hot"});
        let f = check_command(&m, method, Some((200, &wrong)));
        assert_eq!(kinds(&f), [FindingKind::CommandResponseType]);
        assert_eq!(f[0].component.as_deref(), Some("thermostat1"));
        assert!(f[0].detail.contains("tempReport"), "{}", f[0].detail);
        assert!(f[0].detail.contains("maxTemp"), "{}", f[0].detail);
        // An error status may answer anything; so may a command without a response.
        assert_eq!(check_command(&m, method, Some((500, &wrong))), vec![]);
        assert_eq!(check_command(&m, "reboot", Some((200, &wrong))), vec![]);
        let null = Value::Null;
        assert_eq!(
            kinds(&check_command(&m, method, Some((200, &null)))),
            [FindingKind::CommandResponseType]
        );
    }
}
