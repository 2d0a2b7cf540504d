//! Fuzz target: device-to-cloud telemetry (`parse_telemetry`, then `stamp`), checked against an
//! independent model of telemetry.rs's rules: system-key mapping, last value wins, ASCII only,
//! message-id and creation-time rules, the 256 KB size rule, and stamps that cannot be spoofed.
//!
//! Input: the property bag (the topic text after `messages/events/`), optionally followed by a
//! NUL byte and the body. The body's first two bytes, if present, add `4 * u16` zero bytes in
//! front of the rest, so the size limit is reachable from small inputs.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use ferrohub_iothub::telemetry::{
    self, format_utc_timestamp, parse_telemetry, parse_utc_timestamp, stamp, validate_message_id,
    StampContext, TelemetryError, TelemetryMessage, MAX_MESSAGE_SIZE,
};
use ferrohub_iothub::topics::{parse_property_bag, Property};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

/// Bag keys that set system properties, as telemetry.rs documents them.
const SYSTEM_KEYS: &[(&str, &str)] = &[
    ("$.mid", telemetry::MESSAGE_ID),
    ("$.cid", telemetry::CORRELATION_ID),
    ("$.uid", telemetry::USER_ID),
    ("$.ct", telemetry::CONTENT_TYPE),
    ("$.ce", telemetry::CONTENT_ENCODING),
    ("$.to", telemetry::TO),
    ("$.exp", telemetry::ABSOLUTE_EXPIRY_TIME),
    ("$.sub", telemetry::DT_SUBJECT),
    ("$.on", telemetry::OUTPUT_NAME),
    ("$.ifid", telemetry::INTERFACE_ID),
    ("$.ctime", telemetry::CREATION_TIME_UTC),
    ("$.schema", telemetry::MESSAGE_SCHEMA),
];

/// Names only the hub may set, matched case-insensitively.
const HUB_OWNED: &[&str] = &[
    telemetry::CONNECTION_DEVICE_ID,
    telemetry::CONNECTION_MODULE_ID,
    telemetry::CONNECTION_AUTH_GENERATION_ID,
    telemetry::CONNECTION_AUTH_METHOD,
    telemetry::ENQUEUED_TIME,
    telemetry::MESSAGE_SOURCE,
    telemetry::DT_DATASCHEMA,
];

const RESERVED_APP: &[&str] = &[
    telemetry::DT_SUBJECT,
    telemetry::MQTT_RETAIN,
    telemetry::MESSAGE_TYPE,
];

fn is_one_of(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// The model: system properties by last value (empty or null unsets), application
/// properties unique by first position with their last value, `$.` keys never application.
fn model(bag: &[Property]) -> (BTreeMap<String, String>, Vec<Property>) {
    let mut system = BTreeMap::new();
    let mut app: Vec<Property> = Vec::new();
    for (key, value) in bag {
        if key.starts_with("$.") {
            if let Some((_, name)) = SYSTEM_KEYS.iter().find(|(k, _)| k == key) {
                match value.as_deref().filter(|v| !v.is_empty()) {
                    Some(v) => system.insert((*name).to_owned(), v.to_owned()),
                    None => system.remove(*name),
                };
            }
        } else if let Some(slot) = app.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value.clone();
        } else {
            app.push((key.clone(), value.clone()));
        }
    }
    (system, app)
}

fn size_of(system: &BTreeMap<String, String>, app: &[Property], body: &[u8]) -> usize {
    body.len()
        + system.values().map(String::len).sum::<usize>()
        + app
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
            .sum::<usize>()
}

fn check_timestamp(text: &str) {
    let Some(t) = parse_utc_timestamp(text) else {
        return;
    };
    assert_eq!(t.offset(), time::UtcOffset::UTC);
    // Written with 7 fractional digits, it reads back as the same instant to 100 ns.
    let written = format_utc_timestamp(t);
    let back = parse_utc_timestamp(&written)
        .unwrap_or_else(|| panic!("{written:?} (from {text:?}) does not parse"));
    let truncated = t
        .replace_nanosecond(t.nanosecond() / 100 * 100)
        .expect("a smaller nanosecond is valid");
    assert_eq!(back, truncated, "{text:?} -> {written:?}");
}

fuzz_target!(|data: &[u8]| {
    let (bag_bytes, body) = match data.iter().position(|&b| b == 0) {
        Some(nul) => {
            let after = &data[nul + 1..];
            let body = match after {
                [hi, lo, rest @ ..] => {
                    let padding = 4 * usize::from(u16::from_be_bytes([*hi, *lo]));
                    let mut body = Vec::with_capacity(padding + rest.len());
                    body.resize(padding, 0);
                    body.extend_from_slice(rest);
                    body
                }
                short => short.to_vec(),
            };
            (&data[..nul], Bytes::from(body))
        }
        None => (data, Bytes::new()),
    };
    let Ok(bag) = std::str::from_utf8(bag_bytes) else {
        return;
    };
    check_timestamp(bag);

    let result = parse_telemetry(bag, body.clone());
    let raw = match parse_property_bag(bag) {
        Ok(raw) => raw,
        Err(e) => {
            assert_eq!(result, Err(TelemetryError::PropertyBag(e)));
            return;
        }
    };
    let all_ascii = raw
        .iter()
        .all(|(k, v)| k.is_ascii() && v.as_deref().is_none_or(str::is_ascii));
    let (system, app) = model(&raw);
    let size = size_of(&system, &app, &body);

    let parsed = match result {
        Ok(parsed) => parsed,
        Err(TelemetryError::NonAsciiName { .. } | TelemetryError::NonAsciiValue { .. }) => {
            assert!(!all_ascii);
            return;
        }
        Err(
            TelemetryError::MessageIdTooLong { .. } | TelemetryError::MessageIdInvalidChar { .. },
        ) => {
            let id = system.get(telemetry::MESSAGE_ID).expect("an id was sent");
            assert!(validate_message_id(id).is_err());
            return;
        }
        Err(TelemetryError::InvalidCreationTime { name }) => {
            let (_, value) = app
                .iter()
                .find(|(k, _)| *k == name)
                .expect("the property was sent");
            assert!(value.as_deref().and_then(parse_utc_timestamp).is_none());
            return;
        }
        Err(TelemetryError::TooLarge { size: reported }) => {
            assert_eq!(reported, size);
            assert!(size > MAX_MESSAGE_SIZE);
            return;
        }
        Err(other) => panic!("unexpected error {other:?}"),
    };

    // Accepted: exactly the model, within every rule.
    assert!(all_ascii);
    assert_eq!(parsed.system_properties, system);
    assert_eq!(parsed.properties, app);
    assert_eq!(parsed.body, body);
    assert_eq!(parsed.size(), size);
    assert!(size <= MAX_MESSAGE_SIZE);
    if let Some(id) = parsed.system_properties.get(telemetry::MESSAGE_ID) {
        validate_message_id(id).expect("accepted message id is valid");
    }
    for name in [
        telemetry::CREATION_TIME_UTC,
        telemetry::BATCH_CREATION_TIME_UTC,
    ] {
        if let Some(value) = parsed.property(name) {
            let value = value.expect("a creation time has a value");
            assert!(parse_utc_timestamp(value).is_some());
            check_timestamp(value);
        }
    }

    // Stamping: hub-owned names come only from the context, whatever the device sent.
    let ctx = StampContext {
        device_id: "dev1",
        module_id: Some("mod1"),
        generation_id: "638490000000000001",
        auth_method_json: r#"{"scope":"device","type":"sas","issuer":"iothub"}"#,
        model_id: Some("dtmi:com:example:Thermostat;1"),
        enqueued_time: OffsetDateTime::UNIX_EPOCH,
        retain: bag.len() % 2 == 1,
        message_source: telemetry::MESSAGE_SOURCE_TELEMETRY,
        is_will: bag.len() % 3 == 1,
    };
    let msg = stamp(parsed.clone(), &ctx);
    assert_eq!(
        msg.system_property(telemetry::CONNECTION_DEVICE_ID),
        Some("dev1")
    );
    assert_eq!(
        msg.system_property(telemetry::CONNECTION_MODULE_ID),
        Some("mod1")
    );
    assert_eq!(
        msg.system_property(telemetry::DT_DATASCHEMA),
        Some("dtmi:com:example:Thermostat;1")
    );
    assert_eq!(
        msg.system_property(telemetry::ENQUEUED_TIME),
        Some("1970-01-01T00:00:00.0000000Z")
    );
    for (name, value) in &parsed.system_properties {
        assert_eq!(msg.system_property(name), Some(value.as_str()));
    }
    let expected_app: Vec<Property> = parsed
        .properties
        .iter()
        .filter(|(k, _)| !is_one_of(k, HUB_OWNED) && !is_one_of(k, RESERVED_APP))
        .cloned()
        .chain(
            ctx.retain
                .then(|| (telemetry::MQTT_RETAIN.to_owned(), Some("true".to_owned()))),
        )
        .chain(
            ctx.is_will
                .then(|| (telemetry::MESSAGE_TYPE.to_owned(), Some("Will".to_owned()))),
        )
        .collect();
    assert_eq!(msg.properties, expected_app);
    assert_eq!(msg.body, parsed.body);

    // The stored JSON form reads back as the same message. Bodies are written as arrays of
    // numbers, so only small ones are tried: a padded body would make every run slow.
    if msg.body.len() > 4096 {
        return;
    }
    let stored = serde_json::to_string(&msg).expect("a message serializes");
    let loaded: TelemetryMessage = serde_json::from_str(&stored).expect("a stored message parses");
    assert_eq!(loaded, msg);
});
