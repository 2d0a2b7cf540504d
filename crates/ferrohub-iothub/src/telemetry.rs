//! Device-to-cloud telemetry as IoT Hub shapes it: property-bag mapping and validation, the
//! 256 KB size rule, and the properties the hub stamps on every message it accepts.
//!
//! Decisions where IoT Hub's documentation is silent:
//! - `$.on` and `$.ifid` become `iothub-outputname` and `iothub-interface-id`, the names the
//!   .NET SDK gives these system properties; `$.ctime` and `$.schema` (sent by the .NET and Java
//!   SDKs) become `iothub-creation-time-utc` and `iothub-message-schema` the same way.
//! - Any other `$.` key is ignored: unknown system properties have nowhere to go, and keeping
//!   them as application properties would re-emerge as `%24.x` system keys if the message is
//!   ever re-encoded for a device. `$.cdid`/`$.cmid` (hub-stamped connection ids) are ignored
//!   too, so a device cannot even propose them.
//! - A system key with a null (`$.mid`) or empty (`$.mid=`) value means "not set".
//! - A repeated key keeps its last value; an application property stays at the position of its
//!   first occurrence, like a dictionary assignment in IoT Hub's .NET message model.
//! - Every key and value must be ASCII, including ignored `$.` keys: IoT Hub refuses non-ASCII
//!   properties, and the size rule counts characters as bytes.
//! - Hub-owned names are matched ASCII-case-insensitively when device-supplied application
//!   properties are removed, so `IoTHub-Connection-Device-Id` cannot fool a case-insensitive
//!   reader either.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use crate::errors::ErrorCode;
use crate::topics::{parse_property_bag, Property, TopicError};

/// IoT Hub's device-to-cloud message limit, counted by [`message_size`].
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024;

/// IoT Hub caps message ids at 128 characters.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// Characters IoT Hub allows in a message id besides ASCII alphanumerics.
pub const MESSAGE_ID_SPECIAL_CHARS: &str = "-:.+%_#*?!(),=@;$'";

pub const MESSAGE_ID: &str = "message-id";
pub const CORRELATION_ID: &str = "correlation-id";
pub const USER_ID: &str = "user-id";
pub const CONTENT_TYPE: &str = "content-type";
pub const CONTENT_ENCODING: &str = "content-encoding";
pub const TO: &str = "to";
pub const ABSOLUTE_EXPIRY_TIME: &str = "absolute-expiry-time";
pub const DT_SUBJECT: &str = "dt-subject";
pub const OUTPUT_NAME: &str = "iothub-outputname";
pub const INTERFACE_ID: &str = "iothub-interface-id";
pub const CREATION_TIME_UTC: &str = "iothub-creation-time-utc";
pub const BATCH_CREATION_TIME_UTC: &str = "iothub-app-iothub-creation-time-utc";
pub const MESSAGE_SCHEMA: &str = "iothub-message-schema";
pub const CONNECTION_DEVICE_ID: &str = "iothub-connection-device-id";
pub const CONNECTION_MODULE_ID: &str = "iothub-connection-module-id";
pub const CONNECTION_AUTH_GENERATION_ID: &str = "iothub-connection-auth-generation-id";
pub const CONNECTION_AUTH_METHOD: &str = "iothub-connection-auth-method";
pub const ENQUEUED_TIME: &str = "iothub-enqueuedtime";
pub const MESSAGE_SOURCE: &str = "iothub-message-source";
pub const DT_DATASCHEMA: &str = "dt-dataschema";
/// Application property added when the PUBLISH had RETAIN=1.
pub const MQTT_RETAIN: &str = "mqtt-retain";
/// Application property set to `Will` on a delivered Will message.
pub const MESSAGE_TYPE: &str = "iothub-MessageType";

/// `iothub-message-source` of ordinary device telemetry.
pub const MESSAGE_SOURCE_TELEMETRY: &str = "Telemetry";

/// Bag keys a device may use to set system properties, and the names they are stored under.
const SYSTEM_KEYS: &[(&str, &str)] = &[
    ("$.mid", MESSAGE_ID),
    ("$.cid", CORRELATION_ID),
    ("$.uid", USER_ID),
    ("$.ct", CONTENT_TYPE),
    ("$.ce", CONTENT_ENCODING),
    ("$.to", TO),
    ("$.exp", ABSOLUTE_EXPIRY_TIME),
    ("$.sub", DT_SUBJECT),
    ("$.on", OUTPUT_NAME),
    ("$.ifid", INTERFACE_ID),
    ("$.ctime", CREATION_TIME_UTC),
    ("$.schema", MESSAGE_SCHEMA),
];

/// System properties only the hub sets.
const HUB_STAMPED: &[&str] = &[
    CONNECTION_DEVICE_ID,
    CONNECTION_MODULE_ID,
    CONNECTION_AUTH_GENERATION_ID,
    CONNECTION_AUTH_METHOD,
    ENQUEUED_TIME,
    MESSAGE_SOURCE,
    DT_DATASCHEMA,
];

/// Application property names a device may not supply: the stamped system names (readers often
/// merge both maps), `dt-subject` (only `$.sub` sets it) and the flags the hub derives from the
/// PUBLISH itself.
const RESERVED_APP_NAMES: &[&str] = &[DT_SUBJECT, MQTT_RETAIN, MESSAGE_TYPE];

/// Application properties that must hold a UTC time like `2021-04-21T11:30:16Z`.
const CREATION_TIME_PROPERTIES: &[&str] = &[CREATION_TIME_UTC, BATCH_CREATION_TIME_UTC];

/// A device-to-cloud message as the hub stores and delivers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryMessage {
    /// System properties by their IoT Hub names (`message-id`, `content-type`,
    /// `iothub-connection-device-id`, `iothub-enqueuedtime`, `dt-subject`, ...), user-set ones
    /// and stamped ones together.
    pub system_properties: BTreeMap<String, String>,
    /// Application properties in arrival order, names unique; `None` is a property sent without
    /// `=`.
    pub properties: Vec<Property>,
    #[serde(with = "bytes_serde")]
    pub body: Bytes,
}

impl TelemetryMessage {
    pub fn system_property(&self, name: &str) -> Option<&str> {
        self.system_properties.get(name).map(String::as_str)
    }

    /// `Some(None)` is a property present without a value.
    pub fn property(&self, name: &str) -> Option<Option<&str>> {
        find_property(&self.properties, name)
    }
}

/// What the device sent, parsed and validated, before stamping. Holds only user-settable
/// system properties; [`stamp`] still removes hub-owned names in case one was built by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTelemetry {
    pub system_properties: BTreeMap<String, String>,
    pub properties: Vec<Property>,
    pub body: Bytes,
}

impl ParsedTelemetry {
    /// The size IoT Hub compares with [`MAX_MESSAGE_SIZE`].
    pub fn size(&self) -> usize {
        message_size(
            self.system_properties.values().map(String::as_str),
            &self.properties,
            &self.body,
        )
    }

    /// `Some(None)` is a property present without a value.
    pub fn property(&self, name: &str) -> Option<Option<&str>> {
        find_property(&self.properties, name)
    }
}

fn find_property<'a>(properties: &'a [Property], name: &str) -> Option<Option<&'a str>> {
    properties
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_deref())
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TelemetryError {
    #[error("malformed property bag: {0}")]
    PropertyBag(#[from] TopicError),
    #[error("property name {name:?} is not ASCII")]
    NonAsciiName { name: String },
    #[error("value of property {name:?} is not ASCII")]
    NonAsciiValue { name: String },
    #[error("message id is {len} characters long (max {MAX_MESSAGE_ID_LEN})")]
    MessageIdTooLong { len: usize },
    #[error("message id contains {ch:?} at position {position}")]
    MessageIdInvalidChar { ch: char, position: usize },
    #[error("{name} is not a UTC time like 2021-04-21T11:30:16Z")]
    InvalidCreationTime { name: String },
    #[error("message is {size} bytes, over the {MAX_MESSAGE_SIZE}-byte limit")]
    TooLarge { size: usize },
}

impl TelemetryError {
    pub fn error_code(&self) -> ErrorCode {
        match self {
            TelemetryError::TooLarge { .. } => ErrorCode::MessageTooLarge,
            TelemetryError::PropertyBag(_)
            | TelemetryError::NonAsciiName { .. }
            | TelemetryError::NonAsciiValue { .. }
            | TelemetryError::MessageIdTooLong { .. }
            | TelemetryError::MessageIdInvalidChar { .. }
            | TelemetryError::InvalidCreationTime { .. } => ErrorCode::ArgumentInvalid,
        }
    }
}

/// Parses and validates a telemetry PUBLISH: `property_bag` is the raw text after
/// `messages/events/` (see [`crate::topics::PublishTopic::Telemetry`]), `body` its payload.
/// Any error means IoT Hub would refuse the message and close the connection.
pub fn parse_telemetry(property_bag: &str, body: Bytes) -> Result<ParsedTelemetry, TelemetryError> {
    let bag = parse_property_bag(property_bag)?;
    for (name, value) in &bag {
        if !name.is_ascii() {
            return Err(TelemetryError::NonAsciiName { name: name.clone() });
        }
        if value.as_deref().is_some_and(|v| !v.is_ascii()) {
            return Err(TelemetryError::NonAsciiValue { name: name.clone() });
        }
    }

    let mut system_properties = BTreeMap::new();
    let mut properties: Vec<Property> = Vec::new();
    // Indexes into `properties`, so a bag of thousands of distinct names stays linear.
    let mut positions: HashMap<String, usize> = HashMap::new();
    for (key, value) in bag {
        if key.starts_with("$.") {
            let Some(&(_, name)) = SYSTEM_KEYS.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            match value.filter(|v| !v.is_empty()) {
                Some(value) => system_properties.insert(name.to_owned(), value),
                None => system_properties.remove(name),
            };
            continue;
        }
        match positions.get(&key) {
            Some(&i) => properties[i].1 = value,
            None => {
                positions.insert(key.clone(), properties.len());
                properties.push((key, value));
            }
        }
    }

    if let Some(id) = system_properties.get(MESSAGE_ID) {
        validate_message_id(id)?;
    }
    for (name, value) in &properties {
        if CREATION_TIME_PROPERTIES.contains(&name.as_str())
            && value.as_deref().and_then(parse_utc_timestamp).is_none()
        {
            return Err(TelemetryError::InvalidCreationTime { name: name.clone() });
        }
    }

    let parsed = ParsedTelemetry {
        system_properties,
        properties,
        body,
    };
    let size = parsed.size();
    if size > MAX_MESSAGE_SIZE {
        return Err(TelemetryError::TooLarge { size });
    }
    Ok(parsed)
}

/// IoT Hub's size rule, for device-to-cloud and cloud-to-device messages alike: body bytes,
/// plus the bytes of every system property value, plus the bytes of every application property
/// name and value. Apply it to what the sender sent ([`ParsedTelemetry::size`]): properties the
/// hub stamps do not count against it.
pub fn message_size<'a>(
    system_values: impl IntoIterator<Item = &'a str>,
    properties: &[Property],
    body: &[u8],
) -> usize {
    let system: usize = system_values.into_iter().map(str::len).sum();
    let application: usize = properties
        .iter()
        .map(|(name, value)| name.len() + value.as_ref().map_or(0, String::len))
        .sum();
    body.len() + system + application
}

/// Checks IoT Hub's message-id rule: ASCII alphanumerics and [`MESSAGE_ID_SPECIAL_CHARS`], at
/// most [`MAX_MESSAGE_ID_LEN`] characters.
pub fn validate_message_id(id: &str) -> Result<(), TelemetryError> {
    if let Some((position, ch)) = id
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || MESSAGE_ID_SPECIAL_CHARS.contains(c)))
    {
        return Err(TelemetryError::MessageIdInvalidChar { ch, position });
    }
    // Only ASCII is left, so the byte length is the character count.
    if id.len() > MAX_MESSAGE_ID_LEN {
        return Err(TelemetryError::MessageIdTooLong { len: id.len() });
    }
    Ok(())
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.f]Z` (1 to 9 fractional digits, `T` and `Z` uppercase, no
/// offset): the only form IoT Hub accepts for creation times, and the form it writes.
pub fn parse_utc_timestamp(s: &str) -> Option<OffsetDateTime> {
    let body = s.strip_suffix('Z')?;
    let (main, fraction) = match body.split_once('.') {
        Some((main, fraction)) => (main, Some(fraction)),
        None => (body, None),
    };
    let b = main.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = Month::try_from(u8::try_from(digits(&b[5..7])?).ok()?).ok()?;
    let day = u8::try_from(digits(&b[8..10])?).ok()?;
    let hour = u8::try_from(digits(&b[11..13])?).ok()?;
    let minute = u8::try_from(digits(&b[14..16])?).ok()?;
    let second = u8::try_from(digits(&b[17..19])?).ok()?;
    let nanos = match fraction {
        None => 0,
        Some(f) if (1..=9).contains(&f.len()) => {
            digits(f.as_bytes())? * 10u32.pow(9 - f.len() as u32)
        }
        Some(_) => return None,
    };
    let date = Date::from_calendar_date(i32::try_from(year).ok()?, month, day).ok()?;
    let time = Time::from_hms_nano(hour, minute, second, nanos).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

/// Only ASCII digits: `str::parse` would also take a sign.
fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

/// Writes a time as IoT Hub writes `iothub-enqueuedtime`: UTC with seven fractional digits, as
/// .NET's round-trip format does (`2021-04-21T11:30:16.1234567Z`).
pub fn format_utc_timestamp(t: OffsetDateTime) -> String {
    // Converting fails only within a day of the supported range's ends; keeping the original
    // wall clock there beats a panic.
    let t = t.checked_to_offset(UtcOffset::UTC).unwrap_or(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 100
    )
}

/// What the hub knows about the connection and the PUBLISH when it accepts a message.
#[derive(Clone, Copy, Debug)]
pub struct StampContext<'a> {
    pub device_id: &'a str,
    /// Set when a module sent the message.
    pub module_id: Option<&'a str>,
    pub generation_id: &'a str,
    /// Stored verbatim, e.g. `{"scope":"device","type":"sas","issuer":"iothub"}`.
    pub auth_method_json: &'a str,
    /// The model id announced at CONNECT.
    pub model_id: Option<&'a str>,
    pub enqueued_time: OffsetDateTime,
    /// RETAIN flag of the PUBLISH.
    pub retain: bool,
    /// [`MESSAGE_SOURCE_TELEMETRY`] for device telemetry.
    pub message_source: &'a str,
    /// The message is a connection's Will, delivered because the network dropped.
    pub is_will: bool,
}

/// Applies the hub's stamps (spec 5.3). Whatever the device supplied under a hub-owned name,
/// as a system or an application property, is dropped first, so stamps cannot be spoofed.
pub fn stamp(parsed: ParsedTelemetry, ctx: &StampContext<'_>) -> TelemetryMessage {
    let ParsedTelemetry {
        mut system_properties,
        properties,
        body,
    } = parsed;
    system_properties.retain(|name, _| !is_one_of(name, HUB_STAMPED));
    let mut properties: Vec<Property> = properties
        .into_iter()
        .filter(|(name, _)| !is_one_of(name, HUB_STAMPED) && !is_one_of(name, RESERVED_APP_NAMES))
        .collect();

    let mut set = |name: &str, value: &str| {
        system_properties.insert(name.to_owned(), value.to_owned());
    };
    set(CONNECTION_DEVICE_ID, ctx.device_id);
    if let Some(module_id) = ctx.module_id {
        set(CONNECTION_MODULE_ID, module_id);
    }
    set(CONNECTION_AUTH_GENERATION_ID, ctx.generation_id);
    set(CONNECTION_AUTH_METHOD, ctx.auth_method_json);
    set(ENQUEUED_TIME, &format_utc_timestamp(ctx.enqueued_time));
    set(MESSAGE_SOURCE, ctx.message_source);
    if let Some(model_id) = ctx.model_id {
        set(DT_DATASCHEMA, model_id);
    }

    if ctx.retain {
        properties.push((MQTT_RETAIN.to_owned(), Some("true".to_owned())));
    }
    if ctx.is_will {
        properties.push((MESSAGE_TYPE.to_owned(), Some("Will".to_owned())));
    }
    TelemetryMessage {
        system_properties,
        properties,
        body,
    }
}

fn is_one_of(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// `Bytes` without the `bytes/serde` feature (which would change the workspace lock for every
/// crate): written as a byte string, read from a byte string or a sequence (JSON arrays).
mod bytes_serde {
    use std::fmt;

    use bytes::Bytes;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(body)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(Bytes::from(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::topics::{classify_publish, PublishTopic};
    use serde_json::Value;
    use time::macros::datetime;

    fn s(v: &str) -> String {
        v.to_owned()
    }

    fn parse(bag: &str) -> Result<ParsedTelemetry, TelemetryError> {
        parse_telemetry(bag, Bytes::from_static(b"{}"))
    }

    fn sys(p: &ParsedTelemetry) -> Vec<(&str, &str)> {
        p.system_properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn ctx() -> StampContext<'static> {
        StampContext {
            device_id: "dev1",
            module_id: None,
            generation_id: "638490000000000001",
            auth_method_json: r#"{"scope":"device","type":"sas","issuer":"iothub"}"#,
            model_id: None,
            enqueued_time: datetime!(2021-04-21 11:30:16.123456789 UTC),
            retain: false,
            message_source: MESSAGE_SOURCE_TELEMETRY,
            is_will: false,
        }
    }

    /// The captures do not name the sender; the topic's own identity segments do.
    fn identity_for(topic: &str) -> Identity {
        let parts: Vec<&str> = topic.split('/').collect();
        match parts.as_slice() {
            ["devices", d, "modules", m, ..] => Identity::module(*d, *m),
            ["devices", d, ..] => Identity::device(*d),
            _ => Identity::device("dev1"),
        }
    }

    #[test]
    fn every_captured_telemetry_publish_parses() {
        let v: Value =
            serde_json::from_str(include_str!("../tests/vectors/sdk-topics.json")).unwrap();
        let mut telemetry = 0;
        for p in v["publishes"].as_array().unwrap() {
            let topic = p["topic"].as_str().unwrap();
            let payload = p["payload"].as_str().unwrap().as_bytes().to_vec();
            let class = classify_publish(&identity_for(topic), topic).unwrap();
            let PublishTopic::Telemetry { property_bag } = class else {
                continue;
            };
            telemetry += 1;
            let parsed = parse_telemetry(property_bag, Bytes::from(payload.clone()))
                .unwrap_or_else(|e| panic!("{topic}: {e}"));
            assert_eq!(parsed.body, payload);
            assert!(parsed.size() >= payload.len());
        }
        assert_eq!(telemetry, 6);
    }

    #[test]
    fn python_capture_maps_system_and_application_properties() {
        let topic = "devices/dev1/messages/events/%24.mid=e21b3ce1-c8ae-4936-b220-74346be5e11a&%24.cid=corr-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&level=3";
        let PublishTopic::Telemetry { property_bag } =
            classify_publish(&Identity::device("dev1"), topic).unwrap()
        else {
            panic!("not telemetry");
        };
        let p =
            parse_telemetry(property_bag, Bytes::from_static(b"{\"temperature\": 21.5}")).unwrap();
        assert_eq!(
            sys(&p),
            vec![
                ("content-encoding", "utf-8"),
                ("content-type", "application/json"),
                ("correlation-id", "corr-1"),
                ("message-id", "e21b3ce1-c8ae-4936-b220-74346be5e11a"),
            ]
        );
        assert_eq!(
            p.properties,
            vec![
                (s("alert"), Some(s("high temp"))),
                (s("level"), Some(s("3")))
            ]
        );
    }

    #[test]
    fn node_capture_maps_sub_to_dt_subject() {
        let p = parse("%24.mid=mid-1&%24.cid=cid-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&%24.sub=comp1").unwrap();
        assert_eq!(p.system_properties[DT_SUBJECT], "comp1");
        assert_eq!(p.system_properties[MESSAGE_ID], "mid-1");
        assert_eq!(p.properties, vec![(s("alert"), Some(s("high temp")))]);
    }

    #[test]
    fn module_output_name_and_every_system_key_map() {
        let p = parse(
            "%24.on=out1&$.uid=u&$.to=%2Fdevices%2Fd&$.exp=2030-01-01T00:00:00Z&$.ifid=urn:x&$.ctime=2021-04-21T11:30:16.1234567Z&$.schema=s1",
        )
        .unwrap();
        assert_eq!(
            sys(&p),
            vec![
                ("absolute-expiry-time", "2030-01-01T00:00:00Z"),
                ("iothub-creation-time-utc", "2021-04-21T11:30:16.1234567Z"),
                ("iothub-interface-id", "urn:x"),
                ("iothub-message-schema", "s1"),
                ("iothub-outputname", "out1"),
                ("to", "/devices/d"),
                ("user-id", "u"),
            ]
        );
        assert!(p.properties.is_empty());
    }

    #[test]
    fn unknown_and_hub_owned_system_keys_are_ignored() {
        let p = parse("$.diagid=x&$.MID=upper&%24.cdid=evil&$.cmid=evil&$.=v&$x=app").unwrap();
        assert!(p.system_properties.is_empty());
        assert_eq!(p.properties, vec![(s("$x"), Some(s("app")))]);
        // Ignored keys do not count against the size either.
        assert_eq!(p.size(), 2 + "$xapp".len());
    }

    #[test]
    fn encoded_keys_and_values_are_decoded() {
        let p = parse("%24.ct=application%2Fjson%3Bcharset%3Dutf-8&a%20b=c%26d&x%3Dy=1").unwrap();
        assert_eq!(
            p.system_properties[CONTENT_TYPE],
            "application/json;charset=utf-8"
        );
        assert_eq!(
            p.properties,
            vec![(s("a b"), Some(s("c&d"))), (s("x=y"), Some(s("1")))]
        );
    }

    #[test]
    fn empty_and_null_values_are_kept_for_application_properties() {
        let p = parse("empty=&null&v=1").unwrap();
        assert_eq!(
            p.properties,
            vec![
                (s("empty"), Some(s(""))),
                (s("null"), None),
                (s("v"), Some(s("1")))
            ]
        );
        assert_eq!(p.property("null"), Some(None));
        assert_eq!(p.property("empty"), Some(Some("")));
        assert_eq!(p.property("absent"), None);
    }

    #[test]
    fn empty_or_null_system_value_means_not_set() {
        assert!(parse("$.mid=&$.ct").unwrap().system_properties.is_empty());
        assert!(parse("$.mid=a&$.mid=")
            .unwrap()
            .system_properties
            .is_empty());
    }

    #[test]
    fn repeated_names_keep_last_value_at_first_position() {
        let p = parse("a=1&b=2&a=3&a&$.mid=m1&$.mid=m2").unwrap();
        assert_eq!(p.properties, vec![(s("a"), None), (s("b"), Some(s("2")))]);
        assert_eq!(p.system_properties[MESSAGE_ID], "m2");
        let p = parse("a=1&b=2&a=3").unwrap();
        assert_eq!(
            p.properties,
            vec![(s("a"), Some(s("3"))), (s("b"), Some(s("2")))]
        );
    }

    #[test]
    fn malformed_bag_is_argument_invalid() {
        for bag in ["=v", "k=%C3", "%FF=v"] {
            let err = parse(bag).unwrap_err();
            assert!(matches!(err, TelemetryError::PropertyBag(_)), "{bag}");
            assert_eq!(err.error_code(), ErrorCode::ArgumentInvalid);
        }
    }

    #[test]
    fn message_id_charset_and_length() {
        let all = format!("aZ09{MESSAGE_ID_SPECIAL_CHARS}");
        validate_message_id(&all).unwrap();
        // Through the bag the special characters must be escaped where they mean something.
        let p = parse("$.mid=aZ09-:.%2B%25_%23*%3F!()%2C%3D%40%3B%24'").unwrap();
        assert_eq!(p.system_properties[MESSAGE_ID], all);

        let ok = "m".repeat(128);
        assert_eq!(
            parse(&format!("$.mid={ok}")).unwrap().system_properties[MESSAGE_ID],
            ok
        );
        let err = parse(&format!("$.mid={}", "m".repeat(129))).unwrap_err();
        assert_eq!(err, TelemetryError::MessageIdTooLong { len: 129 });
        assert_eq!(err.error_code(), ErrorCode::ArgumentInvalid);

        assert_eq!(
            parse("$.mid=a%20b").unwrap_err(),
            TelemetryError::MessageIdInvalidChar {
                ch: ' ',
                position: 1
            }
        );
        for bad in ["a/b", "a&b", "a\"b", "a<b", "a\\b", "a[b", "a~b", "a\tb"] {
            assert!(
                matches!(
                    validate_message_id(bad),
                    Err(TelemetryError::MessageIdInvalidChar { .. })
                ),
                "{bad:?} accepted"
            );
        }
        // Case-sensitive: both cases survive as sent.
        assert_eq!(
            parse("$.mid=AbC").unwrap().system_properties[MESSAGE_ID],
            "AbC"
        );
    }

    #[test]
    fn creation_time_good_formats() {
        for good in [
            "2021-04-21T11:30:16Z",
            "2021-04-21T11:30:16.1Z",
            "2021-04-21T11:30:16.123Z",
            "2021-04-21T11:30:16.123456Z",
            "2021-04-21T11:30:16.1234567Z",
            "2021-04-21T11:30:16.123456789Z",
            "2024-02-29T23:59:59Z",
        ] {
            for name in [CREATION_TIME_UTC, BATCH_CREATION_TIME_UTC] {
                let bag = format!("{name}={good}");
                assert_eq!(
                    parse(&bag).unwrap().property(name),
                    Some(Some(good)),
                    "{bag}"
                );
            }
        }
        assert_eq!(
            parse_utc_timestamp("2021-04-21T11:30:16.5Z"),
            Some(datetime!(2021-04-21 11:30:16.5 UTC))
        );
    }

    #[test]
    fn creation_time_bad_formats() {
        for bad in [
            "2021-04-21T11:30:16-07:00",
            "2021-04-21T11:30:16+00:00",
            "2021-04-21T11:30:16",
            "2021-04-21 11:30:16Z",
            "2021-04-21t11:30:16z",
            "2021-04-21T11:30Z",
            "2021-4-21T11:30:16Z",
            "2021-04-21T11:30:16.Z",
            "2021-04-21T11:30:16.1234567890Z",
            "2021-13-21T11:30:16Z",
            "2023-02-29T11:30:16Z",
            "2021-04-21T24:00:00Z",
            "2021-04-21T11:60:16Z",
            "2021-04-21T11:30:60Z",
            "+021-04-21T11:30:16Z",
            "1619004616",
            "",
        ] {
            for name in [CREATION_TIME_UTC, BATCH_CREATION_TIME_UTC] {
                let err = parse(&format!("{name}={}", bad.replace('+', "%2B"))).unwrap_err();
                assert_eq!(
                    err,
                    TelemetryError::InvalidCreationTime { name: s(name) },
                    "{bad:?}"
                );
                assert_eq!(err.error_code(), ErrorCode::ArgumentInvalid);
            }
        }
        assert!(matches!(
            parse(CREATION_TIME_UTC),
            Err(TelemetryError::InvalidCreationTime { .. })
        ));
    }

    #[test]
    fn unicode_rejected_in_names() {
        for bag in [
            "temp%C3%A9rature=1",
            "caf\u{e9}=1",
            "%24.m%C3%AFd=1",
            "$.\u{1F600}=1",
        ] {
            let err = parse(bag).unwrap_err();
            assert!(
                matches!(err, TelemetryError::NonAsciiName { .. }),
                "{bag}: {err:?}"
            );
            assert_eq!(err.error_code(), ErrorCode::ArgumentInvalid);
        }
    }

    #[test]
    fn unicode_rejected_in_values() {
        for (bag, name) in [
            ("city=M%C3%BCnchen", "city"),
            ("city=\u{4e0a}\u{6d77}", "city"),
            ("$.cid=%E2%82%AC", "$.cid"),
            ("$.ct=application%2Fjs%C3%B6n", "$.ct"),
            ("$.diagid=%C3%A9", "$.diagid"),
        ] {
            let err = parse(bag).unwrap_err();
            assert_eq!(
                err,
                TelemetryError::NonAsciiValue { name: s(name) },
                "{bag}"
            );
            assert_eq!(err.error_code(), ErrorCode::ArgumentInvalid);
        }
    }

    #[test]
    fn size_counts_body_system_values_and_application_names_and_values() {
        let p = parse_telemetry(
            "$.mid=abc&$.ct=json&k=vv&null",
            Bytes::from_static(b"12345"),
        )
        .unwrap();
        // Body 5 + system values "abc" and "json" + "k" "vv" + "null".
        assert_eq!(p.size(), 5 + 3 + 4 + 1 + 2 + 4);
    }

    #[test]
    fn size_boundary_exact_is_accepted_and_one_more_is_refused() {
        // 4 + 4 (system value) + 1 + 3 + 4 (application) = 16 bytes of properties.
        let bag = "$.mid=m123&$.ct=json&k=abc&flag";
        let props = 4 + 4 + 1 + 3 + 4;
        let exact = Bytes::from(vec![b'x'; MAX_MESSAGE_SIZE - props]);
        let p = parse_telemetry(bag, exact).unwrap();
        assert_eq!(p.size(), MAX_MESSAGE_SIZE);

        let over = Bytes::from(vec![b'x'; MAX_MESSAGE_SIZE - props + 1]);
        let err = parse_telemetry(bag, over.clone()).unwrap_err();
        assert_eq!(
            err,
            TelemetryError::TooLarge {
                size: MAX_MESSAGE_SIZE + 1
            }
        );
        assert_eq!(err.error_code(), ErrorCode::MessageTooLarge);
        assert_eq!(err.error_code().code(), 413001);

        // The same body is fine once the properties shrink by a byte: properties are counted.
        parse_telemetry("$.mid=m12&$.ct=json&k=abc&flag", over).unwrap();
        // A body of exactly the limit passes alone and fails with any property.
        let full = Bytes::from(vec![0u8; MAX_MESSAGE_SIZE]);
        parse_telemetry("", full.clone()).unwrap();
        assert_eq!(
            parse_telemetry("k", full).unwrap_err(),
            TelemetryError::TooLarge {
                size: MAX_MESSAGE_SIZE + 1
            }
        );
    }

    #[test]
    fn stamping_sets_connection_properties() {
        let p = parse("$.mid=m1&$.sub=thermostat1&a=1").unwrap();
        let m = stamp(
            p,
            &StampContext {
                model_id: Some("dtmi:com:example:Thermostat;1"),
                ..ctx()
            },
        );
        assert_eq!(
            m.system_properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("dt-dataschema", "dtmi:com:example:Thermostat;1"),
                ("dt-subject", "thermostat1"),
                ("iothub-connection-auth-generation-id", "638490000000000001"),
                (
                    "iothub-connection-auth-method",
                    r#"{"scope":"device","type":"sas","issuer":"iothub"}"#
                ),
                ("iothub-connection-device-id", "dev1"),
                ("iothub-enqueuedtime", "2021-04-21T11:30:16.1234567Z"),
                ("iothub-message-source", "Telemetry"),
                ("message-id", "m1"),
            ]
        );
        assert_eq!(m.properties, vec![(s("a"), Some(s("1")))]);
        assert_eq!(m.body, Bytes::from_static(b"{}"));
    }

    #[test]
    fn stamping_a_module_message_adds_the_module_id() {
        let m = stamp(
            parse("$.on=out1").unwrap(),
            &StampContext {
                module_id: Some("mod1"),
                auth_method_json: r#"{"scope":"module","type":"sas","issuer":"iothub"}"#,
                ..ctx()
            },
        );
        assert_eq!(m.system_property(CONNECTION_DEVICE_ID), Some("dev1"));
        assert_eq!(m.system_property(CONNECTION_MODULE_ID), Some("mod1"));
        assert_eq!(m.system_property(OUTPUT_NAME), Some("out1"));
        // A device message has no module id and, without a model id, no dt-dataschema.
        let m = stamp(parse("").unwrap(), &ctx());
        assert_eq!(m.system_property(CONNECTION_MODULE_ID), None);
        assert_eq!(m.system_property(DT_DATASCHEMA), None);
    }

    #[test]
    fn stamping_overwrites_spoofed_application_properties() {
        let bag = "iothub-connection-device-id=evil&IoTHub-Connection-Module-Id=evil&iothub-connection-auth-generation-id=1&iothub-connection-auth-method=%7B%7D&iothub-enqueuedtime=2000-01-01T00:00:00Z&iothub-message-source=twinChangeEvents&dt-dataschema=dtmi:evil;1&dt-subject=evil&mqtt-retain=true&iothub-messagetype=Will&keep=1";
        let m = stamp(parse(bag).unwrap(), &ctx());
        assert_eq!(m.properties, vec![(s("keep"), Some(s("1")))]);
        assert_eq!(m.system_property(CONNECTION_DEVICE_ID), Some("dev1"));
        assert_eq!(m.system_property(CONNECTION_MODULE_ID), None);
        assert_eq!(
            m.system_property(ENQUEUED_TIME),
            Some("2021-04-21T11:30:16.1234567Z")
        );
        assert_eq!(m.system_property(MESSAGE_SOURCE), Some("Telemetry"));
        assert_eq!(m.system_property(DT_DATASCHEMA), None);
        assert_eq!(m.system_property(DT_SUBJECT), None);
    }

    #[test]
    fn stamping_overwrites_spoofed_system_keys() {
        // Through the bag the `$.` forms never reach a stamped name...
        let m = stamp(
            parse("$.cdid=evil&$.cmid=evil&$.iothub-connection-device-id=evil").unwrap(),
            &ctx(),
        );
        assert_eq!(m.system_property(CONNECTION_DEVICE_ID), Some("dev1"));
        assert_eq!(m.system_property(CONNECTION_MODULE_ID), None);
        assert!(m.properties.is_empty());
        // ...and a hand-built ParsedTelemetry holding them is cleaned too.
        let mut forged = parse("").unwrap();
        for name in HUB_STAMPED {
            forged.system_properties.insert(s(name), s("evil"));
        }
        forged
            .system_properties
            .insert(s("IOTHUB-CONNECTION-DEVICE-ID"), s("evil"));
        let m = stamp(forged, &ctx());
        assert!(m.system_properties.values().all(|v| v != "evil"));
        assert_eq!(m.system_property(CONNECTION_MODULE_ID), None);
        assert_eq!(m.system_property(DT_DATASCHEMA), None);
    }

    #[test]
    fn retain_and_will_flags_add_application_properties() {
        let m = stamp(
            parse("a=1").unwrap(),
            &StampContext {
                retain: true,
                ..ctx()
            },
        );
        assert_eq!(
            m.properties,
            vec![(s("a"), Some(s("1"))), (s("mqtt-retain"), Some(s("true")))]
        );
        let m = stamp(
            parse("").unwrap(),
            &StampContext {
                is_will: true,
                ..ctx()
            },
        );
        assert_eq!(m.property(MESSAGE_TYPE), Some(Some("Will")));
        assert_eq!(m.property(MQTT_RETAIN), None);
        let m = stamp(
            parse("mqtt-retain=false").unwrap(),
            &StampContext {
                retain: true,
                is_will: true,
                ..ctx()
            },
        );
        assert_eq!(
            m.properties,
            vec![
                (s("mqtt-retain"), Some(s("true"))),
                (s("iothub-MessageType"), Some(s("Will")))
            ]
        );
        assert!(stamp(parse("").unwrap(), &ctx()).properties.is_empty());
    }

    #[test]
    fn enqueued_time_has_seven_fraction_digits_in_utc() {
        assert_eq!(
            format_utc_timestamp(datetime!(2021-04-21 11:30:16 UTC)),
            "2021-04-21T11:30:16.0000000Z"
        );
        assert_eq!(
            format_utc_timestamp(datetime!(2021-04-21 13:30:16.00000009 +02:00)),
            "2021-04-21T11:30:16.0000000Z"
        );
        assert_eq!(
            format_utc_timestamp(datetime!(2021-12-31 23:00:00.9999999 -01:00)),
            "2022-01-01T00:00:00.9999999Z"
        );
        let t = datetime!(2021-04-21 11:30:16.1234567 UTC);
        assert_eq!(parse_utc_timestamp(&format_utc_timestamp(t)), Some(t));
    }

    #[test]
    fn stored_message_round_trips_through_serde() {
        let m = stamp(
            parse_telemetry("$.mid=1&k=v&n", Bytes::from_static(b"\x00\xff{}")).unwrap(),
            &ctx(),
        );
        let json = serde_json::to_string(&m).unwrap();
        let back: TelemetryMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
