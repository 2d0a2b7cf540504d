//! IoT Hub's message routing conditions as pure code: the routing dialect of the query
//! language, evaluated over one message. System properties are read by their routing keywords
//! (`$contentType`, `$connectionDeviceId`, ...), application properties by bare name, the body
//! as `$body.path` when the message says it is JSON, and the sender's twin as `$twin.tags...`
//! or `$twin.properties...`. The hub supplies the message and, when a condition reads it, the
//! twin; nothing here does I/O.
//!
//! Decisions where IoT Hub's documentation is silent:
//! - A `$name` that is no routing keyword reads the system property of that exact name
//!   (`$iothub-connection-device-id`, `$content-type`), ASCII-case-insensitively, so the
//!   stored names work as well as the keywords.
//! - Application property names match ASCII-case-insensitively (IoT Hub treats device-to-cloud
//!   property names so); their values are strings, as every protocol's bag delivers them.
//! - A body is read when `content-type` is `application/json` (parameters such as
//!   `;charset=utf-8` allowed) and `content-encoding` is `utf-8`, `utf-16` or `utf-32`; the
//!   latter two are read little-endian unless the body starts with a byte-order mark.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::query::{Expr, Path, QueryError};
use crate::telemetry::{self, TelemetryMessage};
use crate::topics::Property;

/// The longest routing condition accepted, in characters (IoT Hub's limit for a route query).
pub const MAX_CONDITION_CHARS: usize = 1024;

/// Where the routing document keeps each part of the message; keys no path can spell, as
/// written names never start with a NUL.
const SYS: &str = "\u{0}sys";
const APP: &str = "\u{0}app";
const BODY: &str = "\u{0}body";
const TWIN: &str = "\u{0}twin";

/// Routing keywords and the system property each reads.
const KEYWORDS: &[(&str, &str)] = &[
    ("messageId", telemetry::MESSAGE_ID),
    ("correlationId", telemetry::CORRELATION_ID),
    ("userId", telemetry::USER_ID),
    ("contentType", telemetry::CONTENT_TYPE),
    ("contentEncoding", telemetry::CONTENT_ENCODING),
    ("to", telemetry::TO),
    ("absoluteExpiryTime", telemetry::ABSOLUTE_EXPIRY_TIME),
    ("connectionDeviceId", telemetry::CONNECTION_DEVICE_ID),
    ("connectionModuleId", telemetry::CONNECTION_MODULE_ID),
    (
        "connectionDeviceGenerationId",
        telemetry::CONNECTION_AUTH_GENERATION_ID,
    ),
    ("connectionAuthMethod", telemetry::CONNECTION_AUTH_METHOD),
    ("enqueuedTime", telemetry::ENQUEUED_TIME),
    ("creationTimeUtc", telemetry::CREATION_TIME_UTC),
    ("messageSource", telemetry::MESSAGE_SOURCE),
    ("outputName", telemetry::OUTPUT_NAME),
    ("interfaceId", telemetry::INTERFACE_ID),
];

/// A parsed routing condition.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCondition {
    expr: Expr,
    reads_body: bool,
    reads_twin: bool,
}

impl RouteCondition {
    /// Parses and checks a condition; the error names line, column and what was expected.
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        let mut expr = crate::query::parse_routing(text, MAX_CONDITION_CHARS)?;
        let mut reads_body = false;
        let mut reads_twin = false;
        crate::query::visit_paths(&mut expr, &mut |p| {
            let part = place(p);
            reads_body |= part == Part::Body;
            reads_twin |= part == Part::Twin;
        });
        Ok(RouteCondition {
            expr,
            reads_body,
            reads_twin,
        })
    }

    /// Whether the condition reads `$body`: only then need the body be parsed.
    pub fn reads_body(&self) -> bool {
        self.reads_body
    }

    /// Whether the condition reads `$twin`: only then need the sender's twin be fetched.
    pub fn reads_twin(&self) -> bool {
        self.reads_twin
    }

    /// True, false, or undefined (`None`: a missing property, a body that is not JSON, a
    /// comparison across types), which routes nothing; IoT Hub logs it as a routing error.
    pub fn evaluate(&self, doc: &RoutingDocument) -> Option<bool> {
        crate::query::eval(&self.expr, &doc.doc).and_then(|v| v.as_bool())
    }

    /// Whether the message goes down this route.
    pub fn matches(&self, doc: &RoutingDocument) -> bool {
        self.evaluate(doc) == Some(true)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    System,
    App,
    Body,
    Twin,
}

/// Rewrites a path as written into where the routing document keeps it, and says which part
/// of the message it reads.
fn place(p: &mut Path) -> Part {
    let Some(first) = p.segments.first().cloned() else {
        return Part::App;
    };
    let s = &mut p.segments;
    if first.eq_ignore_ascii_case("$body") {
        s[0] = BODY.into();
        return Part::Body;
    }
    if first.eq_ignore_ascii_case("$twin") {
        s[0] = TWIN.into();
        normalize_twin(&mut s[1..]);
        return Part::Twin;
    }
    if let Some(name) = first.strip_prefix('$') {
        let stored = KEYWORDS
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or_else(|| name.to_ascii_lowercase(), |(_, v)| (*v).to_string());
        s.splice(0..1, [SYS.to_string(), stored]);
        return Part::System;
    }
    s.splice(0..1, [APP.to_string(), first.to_ascii_lowercase()]);
    Part::App
}

/// Twin members in IoT Hub's casing, as twin queries read them.
fn normalize_twin(s: &mut [String]) {
    const MEMBERS: &[&str] = &[
        "deviceId",
        "moduleId",
        "etag",
        "status",
        "tags",
        "properties",
        "modelId",
        "version",
    ];
    if let Some(first) = s.first_mut() {
        if let Some(m) = MEMBERS.iter().find(|m| m.eq_ignore_ascii_case(first)) {
            *first = (*m).to_string();
        }
    }
    if s.first().is_some_and(|f| f == "properties") {
        if let Some(second) = s.get_mut(1) {
            for name in ["desired", "reported"] {
                if second.eq_ignore_ascii_case(name) {
                    *second = name.into();
                }
            }
        }
    }
}

/// Why a message's body can or cannot be read by `$body` conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyStatus {
    /// Parsed as JSON.
    Json,
    /// No body was asked for (no condition reads `$body`).
    NotRead,
    /// `content-type` is not `application/json` or `content-encoding` is not UTF-8/16/32.
    NotDeclaredJson,
    /// Declared JSON, but not valid in its encoding.
    Invalid(String),
}

/// One message as routing conditions see it. Build it once per message and evaluate every
/// route's condition over it.
#[derive(Debug, Clone)]
pub struct RoutingDocument {
    doc: Value,
    body: BodyStatus,
}

impl RoutingDocument {
    /// `with_body`: parse the body (when some condition reads it); `twin`: the sender's twin in
    /// the `GET /twins` shape, when some condition reads it.
    pub fn new(msg: &TelemetryMessage, with_body: bool, twin: Option<Value>) -> Self {
        Self::from_parts(
            &msg.system_properties,
            &msg.properties,
            &msg.body,
            with_body,
            twin,
        )
    }

    /// The same from a message's parts (non-telemetry events are built this way too).
    pub fn from_parts(
        system_properties: &BTreeMap<String, String>,
        properties: &[Property],
        body: &[u8],
        with_body: bool,
        twin: Option<Value>,
    ) -> Self {
        let mut sys = Map::new();
        for (k, v) in system_properties {
            sys.entry(k.to_ascii_lowercase())
                .or_insert_with(|| Value::String(v.clone()));
        }
        let mut app = Map::new();
        for (k, v) in properties {
            // A property sent without `=` is defined and null, as IoT Hub's readers show it.
            let value = v.clone().map_or(Value::Null, Value::String);
            app.entry(k.to_ascii_lowercase()).or_insert(value);
        }
        let mut doc = Map::new();
        doc.insert(SYS.into(), Value::Object(sys));
        doc.insert(APP.into(), Value::Object(app));
        let status = if with_body {
            match read_body(system_properties, body) {
                Ok(v) => {
                    doc.insert(BODY.into(), v);
                    BodyStatus::Json
                }
                Err(s) => s,
            }
        } else {
            BodyStatus::NotRead
        };
        if let Some(t) = twin {
            doc.insert(TWIN.into(), t);
        }
        RoutingDocument {
            doc: Value::Object(doc),
            body: status,
        }
    }

    /// Whether `$body` could be read, and if not why (for "test route" answers and logs).
    pub fn body_status(&self) -> &BodyStatus {
        &self.body
    }
}

fn system<'a>(props: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    props
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The body as JSON when the message declares it so (see the module notes).
fn read_body(props: &BTreeMap<String, String>, body: &[u8]) -> Result<Value, BodyStatus> {
    let content_type = system(props, telemetry::CONTENT_TYPE).unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(BodyStatus::NotDeclaredJson);
    }
    let encoding = system(props, telemetry::CONTENT_ENCODING)
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let text = match encoding.as_str() {
        "utf-8" | "utf8" => std::str::from_utf8(body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body))
            .map(str::to_owned)
            .map_err(|e| BodyStatus::Invalid(format!("the body is not UTF-8: {e}")))?,
        "utf-16" | "utf16" => utf16(body)?,
        "utf-32" | "utf32" => utf32(body)?,
        _ => return Err(BodyStatus::NotDeclaredJson),
    };
    serde_json::from_str(&text)
        .map_err(|e| BodyStatus::Invalid(format!("the body is not JSON: {e}")))
}

fn utf16(body: &[u8]) -> Result<String, BodyStatus> {
    let (big, rest) = match body {
        [0xFE, 0xFF, rest @ ..] => (true, rest),
        [0xFF, 0xFE, rest @ ..] => (false, rest),
        _ => (false, body),
    };
    if rest.len() % 2 != 0 {
        return Err(BodyStatus::Invalid(
            "the body is not UTF-16: odd length".into(),
        ));
    }
    let units = rest.chunks_exact(2).map(|c| {
        if big {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_le_bytes([c[0], c[1]])
        }
    });
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map_err(|e| BodyStatus::Invalid(format!("the body is not UTF-16: {e}")))
}

fn utf32(body: &[u8]) -> Result<String, BodyStatus> {
    let (big, rest) = match body {
        [0, 0, 0xFE, 0xFF, rest @ ..] => (true, rest),
        [0xFF, 0xFE, 0, 0, rest @ ..] => (false, rest),
        _ => (false, body),
    };
    if rest.len() % 4 != 0 {
        return Err(BodyStatus::Invalid(
            "the body is not UTF-32: its length is not a multiple of 4".into(),
        ));
    }
    rest.chunks_exact(4)
        .map(|c| {
            let b = [c[0], c[1], c[2], c[3]];
            let n = if big {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            };
            char::from_u32(n).ok_or_else(|| {
                BodyStatus::Invalid(format!("the body is not UTF-32: {n:#x} is no character"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn message(sys: &[(&str, &str)], app: &[(&str, &str)], body: &[u8]) -> TelemetryMessage {
        TelemetryMessage {
            system_properties: sys
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            properties: app
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.to_string())))
                .collect(),
            body: Bytes::copy_from_slice(body),
        }
    }

    const JSON: &[(&str, &str)] = &[
        ("content-type", "application/json;charset=utf-8"),
        ("content-encoding", "utf-8"),
        ("iothub-connection-device-id", "sensor-1"),
        ("iothub-enqueuedtime", "2026-12-01T10:00:00.0000000Z"),
        ("dt-dataschema", "dtmi:com:example:Thermostat;1"),
        ("message-id", "m-1"),
    ];

    fn eval(cond: &str, msg: &TelemetryMessage, twin: Option<Value>) -> Option<bool> {
        let c = RouteCondition::parse(cond).unwrap_or_else(|e| panic!("{cond}: {e}"));
        let doc = RoutingDocument::new(msg, c.reads_body(), twin);
        c.evaluate(&doc)
    }

    fn weather() -> TelemetryMessage {
        message(
            JSON,
            &[("processingPath", "hot"), ("severity", "high")],
            br#"{"Weather":{"Temperature":50,"Humidity":40,"Location":{"State":"WA"},
                "HistoricalData":[{"Month":"Feb","Temperature":40},{"Month":"Jan","Temperature":30}]}}"#,
        )
    }

    #[test]
    fn true_routes_everything() {
        assert_eq!(eval("true", &weather(), None), Some(true));
        assert_eq!(eval("TRUE", &message(&[], &[], b"\xff"), None), Some(true));
        assert_eq!(eval("false", &weather(), None), Some(false));
    }

    #[test]
    fn system_properties_by_keyword_and_by_stored_name() {
        let m = weather();
        for cond in [
            "$connectionDeviceId = 'sensor-1'",
            "$ConnectionDeviceId = 'sensor-1'",
            "$iothub-connection-device-id = 'sensor-1'",
            "$contentEncoding = 'utf-8'",
            "$contentType = 'application/json;charset=utf-8'",
            "$messageId = 'm-1'",
            "$dt-dataschema = 'dtmi:com:example:Thermostat;1'",
            "$iothub-enqueuedtime > '2026-12-01T09:00:00Z'",
            "$enqueuedTime < '2026-12-02'",
            "NOT IS_DEFINED($connectionModuleId)",
        ] {
            assert_eq!(eval(cond, &m, None), Some(true), "{cond}");
        }
        assert_eq!(eval("$connectionDeviceId = 'other'", &m, None), Some(false));
        // A property the message lacks is undefined, and so routes nothing.
        assert_eq!(eval("$correlationId = 'x'", &m, None), None);
    }

    #[test]
    fn application_properties_by_name() {
        let m = weather();
        assert_eq!(eval("processingPath = 'hot'", &m, None), Some(true));
        assert_eq!(eval("processingpath = 'hot'", &m, None), Some(true));
        assert_eq!(
            eval(
                "processingPath = 'hot' OR (severity = 'low' AND NOT processingPath = 'cold')",
                &m,
                None
            ),
            Some(true)
        );
        assert_eq!(
            eval("processingPath IN ['warm', 'cold']", &m, None),
            Some(false)
        );
        assert_eq!(eval("missing = 'x'", &m, None), None);
        assert_eq!(
            eval("missing = 'x' OR severity = 'high'", &m, None),
            Some(true)
        );
    }

    #[test]
    fn body_paths_with_arrays_and_functions() {
        let m = weather();
        for cond in [
            "$body.Weather.Temperature = 50",
            "$body.Weather.Temperature = 50.0",
            "$body.Weather.Temperature > 45 AND $body.Weather.Humidity <= 40",
            "$body.Weather.HistoricalData[0].Month = 'Feb'",
            "$body.Weather.HistoricalData[1].Temperature + 1 = 31",
            "length($body.Weather.Location.State) = 2",
            "LOWER($body.Weather.Location.State) = 'wa'",
            "STARTS_WITH($body.Weather.Location.State, 'W')",
            "ENDS_WITH($body.Weather.Location.State, 'A')",
            "CONTAINS(CONCAT($body.Weather.Location.State, '-', processingPath), 'A-h')",
            "INDEX_OF('abcabc', 'ca') = 2",
            "SUBSTRING('thermostat', 3) = 'rmostat'",
            "SUBSTRING('thermostat', 0, 5) = 'therm'",
            "IS_ARRAY($body.Weather.HistoricalData)",
            "IS_OBJECT($body.Weather)",
            "AS_NUMBER('42.5') = 42.5",
            "ABS(-3) = 3 AND SIGN(-2.5) = -1 AND SQUARE(4) = 16 AND POWER(2, 10) = 1024",
            "CEILING(1.2) = 2 AND FLOOR(1.8) = 1 AND SQRT(9) = 3 AND EXP(0) = 1",
            "$body.Weather.Temperature = 50 AND processingPath = 'hot'",
        ] {
            assert_eq!(eval(cond, &m, None), Some(true), "{cond}");
        }
        assert_eq!(
            eval("$body.Weather.HistoricalData[5].Month = 'Feb'", &m, None),
            None
        );
        assert_eq!(
            eval("$body.Weather.Temperature = '50'", &m, None),
            Some(false)
        );
    }

    #[test]
    fn a_body_not_declared_json_or_not_json_is_undefined() {
        let plain = message(&[], &[], br#"{"Weather":{"Temperature":50}}"#);
        assert_eq!(eval("$body.Weather.Temperature = 50", &plain, None), None);
        let c = RouteCondition::parse("$body.a = 1").unwrap();
        assert_eq!(
            RoutingDocument::new(&plain, true, None).body_status(),
            &BodyStatus::NotDeclaredJson
        );
        let ct_only = message(&[("content-type", "application/json")], &[], br#"{"a":1}"#);
        assert_eq!(
            c.evaluate(&RoutingDocument::new(&ct_only, true, None)),
            None
        );
        let broken = message(JSON, &[], b"{not json");
        let doc = RoutingDocument::new(&broken, true, None);
        assert!(matches!(doc.body_status(), BodyStatus::Invalid(_)));
        assert_eq!(c.evaluate(&doc), None);
        // Other conditions still decide such a message.
        assert_eq!(
            eval("$body.a = 1 OR $messageId = 'm-1'", &broken, None),
            Some(true)
        );
    }

    #[test]
    fn utf16_and_utf32_bodies() {
        let text = r#"{"a":"é1"}"#;
        let le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut be = vec![0xFE, 0xFF];
        be.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
        let utf32: Vec<u8> = text
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        for (enc, body) in [("utf-16", le), ("UTF-16", be), ("utf-32", utf32)] {
            let m = message(
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", enc),
                ],
                &[],
                &body,
            );
            assert_eq!(eval("$body.a = 'é1'", &m, None), Some(true), "{enc}");
        }
        let odd = message(
            &[
                ("content-type", "application/json"),
                ("content-encoding", "utf-16"),
            ],
            &[],
            b"{}x",
        );
        assert!(matches!(
            RoutingDocument::new(&odd, true, None).body_status(),
            BodyStatus::Invalid(_)
        ));
    }

    #[test]
    fn twin_paths() {
        let twin = json!({
            "deviceId": "sensor-1",
            "tags": {"deploymentLocation": {"floor": 1}},
            "properties": {
                "desired": {"telemetryConfig": {"sendFrequency": "5m"}},
                "reported": {"firmware": "2.1"}
            }
        });
        let m = weather();
        for cond in [
            "$twin.tags.deploymentLocation.floor = 1",
            "$twin.properties.desired.telemetryConfig.sendFrequency = '5m'",
            "$twin.Properties.Reported.firmware = '2.1'",
            "$body.Weather.Temperature = 50 AND $twin.properties.desired.telemetryConfig.sendFrequency = '5m'",
            "$twin.deviceId = $connectionDeviceId",
        ] {
            assert_eq!(eval(cond, &m, Some(twin.clone())), Some(true), "{cond}");
        }
        let c = RouteCondition::parse("$twin.tags.x = 1 AND $body.y = 2").unwrap();
        assert!(c.reads_twin() && c.reads_body());
        let c = RouteCondition::parse("processingPath = 'hot'").unwrap();
        assert!(!c.reads_twin() && !c.reads_body());
        // Without the twin, twin conditions are undefined.
        assert_eq!(
            eval("$twin.tags.deploymentLocation.floor = 1", &m, None),
            None
        );
    }

    #[test]
    fn errors_name_the_position() {
        for (cond, column, what) in [
            ("processingPath = ", 18, "expected an expression"),
            ("a = 'x' b = 'y'", 9, "expected an operator or the end"),
            ("COUNT() = 1", 1, "unknown function 'COUNT'"),
            ("STARTSWITH(a, 'b')", 1, "unknown function 'STARTSWITH'"),
            ("LENGTH(a, b) = 1", 1, "LENGTH takes 1 argument, got 2"),
            (
                "CONCAT(a) = 'x'",
                1,
                "CONCAT takes at least 2 arguments, got 1",
            ),
            ("$body.list[x] = 1", 12, "expected an array index"),
            ("$body.list[0 = 1", 14, "expected ']'"),
            ("a = 'unclosed", 5, "not closed"),
        ] {
            let e = RouteCondition::parse(cond).expect_err(cond);
            assert_eq!(e.column, column, "{cond}: {e}");
            assert!(e.message.contains(what), "{cond}: {e}");
        }
        let long = format!("a = '{}'", "x".repeat(MAX_CONDITION_CHARS));
        assert!(RouteCondition::parse(&long)
            .expect_err("too long")
            .message
            .contains("at most 1024"));
    }

    #[test]
    fn twin_queries_keep_their_own_dialect() {
        // The routing functions and hyphenated names are not twin query syntax.
        assert!(crate::query::parse("SELECT * FROM devices WHERE LENGTH(deviceId) = 3").is_err());
        assert!(
            crate::query::parse("SELECT * FROM devices WHERE STARTSWITH(deviceId, 'a')").is_ok()
        );
        let q =
            crate::query::parse("SELECT * FROM devices WHERE $version-1 = 0").expect("subtraction");
        assert!(q.condition.is_some());
    }
}
