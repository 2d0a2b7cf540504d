//! Service-side C2D over AMQP as pure mapping: a message sent to `/messages/devicebound` ->
//! the identity and the hub's `SendRequest`, a hub failure -> the `Rejected` error the SDKs
//! translate, and a feedback batch -> the message a feedback receiver reads.

use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::performative::{AmqpError, Symbol};
use ferrohub_amqp::{Message, Value};
use ferrohub_hub::c2d::SendRequest;
use ferrohub_hub::HubError;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::{FeedbackBatch, FeedbackRequest};

/// The content type IoT Hub gives feedback messages.
pub const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// The `iothub-ack` application property: which feedback the sender wants.
const ACK: &str = "iothub-ack";

fn decode(segment: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("{segment:?} is not UTF-8 once percent-decoded"))
}

/// The identity a C2D message's `to` names: `/devices/{id}/messages/devicebound` or
/// `/devices/{id}/modules/{mid}/messages/devicebound`, ids percent-encoded (Node encodes them).
pub fn identity_of(to: &str) -> Result<Identity, String> {
    let bad = || {
        format!(
            "'to' must be /devices/{{deviceId}}[/modules/{{moduleId}}]/messages/devicebound, not {to:?}"
        )
    };
    let seg: Vec<&str> = to.trim_start_matches('/').split('/').collect();
    let identity = match seg.as_slice() {
        ["devices", d, "messages", m] if m.eq_ignore_ascii_case("devicebound") => {
            Identity::device(decode(d)?)
        }
        ["devices", d, "modules", mid, "messages", m] if m.eq_ignore_ascii_case("devicebound") => {
            Identity::module(decode(d)?, decode(mid)?)
        }
        _ => return Err(bad()),
    };
    if identity.device_id.is_empty() || identity.module_id.as_deref() == Some("") {
        return Err(bad());
    }
    Ok(identity)
}

/// A message-id or correlation-id as IoT Hub keeps it: a string (UUIDs and numbers, which
/// uamqp and other clients may send, in their usual text form).
fn id_text(v: &Value) -> Result<Option<String>, String> {
    Ok(match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Ulong(n) => Some(n.to_string()),
        Value::Uuid(b) => Some(ferrohub_hub::c2d::uuid_like(*b)),
        Value::Binary(b) => {
            Some(String::from_utf8(b.clone()).map_err(|_| "a binary message id must be UTF-8")?)
        }
        other => return Err(format!("unsupported message or correlation id {other:?}")),
    })
}

/// An application property's value as the text IoT Hub carries.
fn property_text(v: &Value) -> Result<Option<String>, String> {
    Ok(Some(match v {
        Value::Null => return Ok(None),
        Value::String(s) | Value::Symbol(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Ubyte(n) => n.to_string(),
        Value::Ushort(n) => n.to_string(),
        Value::Uint(n) => n.to_string(),
        Value::Ulong(n) => n.to_string(),
        Value::Byte(n) => n.to_string(),
        Value::Short(n) => n.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        Value::Float(n) => n.to_string(),
        Value::Double(n) => n.to_string(),
        Value::Char(c) => c.to_string(),
        Value::Timestamp(ms) => ms.to_string(),
        Value::Uuid(b) => ferrohub_hub::c2d::uuid_like(*b),
        other => return Err(format!("unsupported application property value {other:?}")),
    }))
}

fn ack_of(v: &str) -> Result<FeedbackRequest, String> {
    match v.to_ascii_lowercase().as_str() {
        "none" => Ok(FeedbackRequest::None),
        "positive" => Ok(FeedbackRequest::Positive),
        "negative" => Ok(FeedbackRequest::Negative),
        "full" => Ok(FeedbackRequest::Full),
        _ => Err(format!(
            "{ACK} must be none, positive, negative or full, not {v:?}"
        )),
    }
}

/// What a back end's message asks the hub to send, and to whom. The error says what is
/// wrong with the message (an `ArgumentInvalid`).
pub fn send_request(m: &Message) -> Result<(Identity, SendRequest), String> {
    let empty = Properties::default();
    let p = m.properties.as_ref().unwrap_or(&empty);
    let to =
        p.to.as_deref()
            .ok_or("a C2D message needs 'to' (/devices/{deviceId}/messages/devicebound)")?;
    let identity = identity_of(to)?;
    let user_id = match &p.user_id {
        Some(b) => Some(String::from_utf8(b.clone()).map_err(|_| "user-id must be UTF-8")?),
        None => None,
    };
    let expiry_time_ms = match &p.absolute_expiry_time {
        Value::Null => None,
        Value::Timestamp(ms) => Some(*ms),
        other => {
            return Err(format!(
                "absolute-expiry-time must be a timestamp, not {other:?}"
            ))
        }
    };
    let mut ack = FeedbackRequest::None;
    let mut properties = Vec::with_capacity(m.application_properties.len());
    for (k, v) in &m.application_properties {
        let key = match k {
            Value::String(s) | Value::Symbol(s) => s.clone(),
            other => {
                return Err(format!(
                    "application property keys must be strings, not {other:?}"
                ))
            }
        };
        let value = property_text(v)?;
        if key.eq_ignore_ascii_case(ACK) {
            ack = ack_of(value.as_deref().unwrap_or_default())?;
            continue;
        }
        properties.push((key, value));
    }
    let payload = match &m.body {
        Body::Empty => Vec::new(),
        Body::Data(sections) => sections.concat(),
        Body::Value(Value::Binary(b)) => b.clone(),
        Body::Value(Value::String(s)) => s.clone().into_bytes(),
        Body::Value(Value::Null) => Vec::new(),
        Body::Value(_) | Body::Sequence(_) => {
            return Err("the body must be data (bytes) or a string".into())
        }
    };
    let req = SendRequest {
        message_id: id_text(&p.message_id)?,
        correlation_id: id_text(&p.correlation_id)?,
        user_id,
        content_type: p.content_type.as_ref().map(|s| s.0.clone()),
        content_encoding: p.content_encoding.as_ref().map(|s| s.0.clone()),
        expiry_time_ms,
        ack,
        properties,
        payload,
    };
    Ok((identity, req))
}

/// The error a refused send is `Rejected` with: the condition the SDKs translate (Node:
/// not-found -> DeviceNotFoundError, resource-limit-exceeded ->
/// DeviceMaximumQueueDepthExceededError), and IoT Hub's error code in the description.
pub fn rejection(e: &HubError) -> AmqpError {
    let condition = match e.code() {
        ErrorCode::DeviceMaximumQueueDepthExceeded => "amqp:resource-limit-exceeded",
        ErrorCode::MessageTooLarge => "amqp:link:message-size-exceeded",
        _ => super::condition_of(e),
    };
    invalid(condition, e.code(), e.message())
}

/// An error naming IoT Hub's code (`403004 DeviceMaximumQueueDepthExceeded: ...`).
pub fn invalid(condition: &str, code: ErrorCode, message: &str) -> AmqpError {
    let mut err = AmqpError::new(condition, format!("{code}: {message}"));
    err.info = Value::Map(vec![(
        Value::sym("com.microsoft:error-code"),
        Value::Int(i32::try_from(code.code()).unwrap_or(0)),
    )]);
    err
}

/// A feedback batch as IoT Hub delivers it: a JSON array of records, user-id the hub name.
pub fn feedback_message(batch: &FeedbackBatch, hub_name: &str) -> Message {
    let body = serde_json::to_vec(&batch.records).unwrap_or_else(|_| b"[]".to_vec());
    Message {
        properties: Some(Properties {
            message_id: Value::str(batch.lock_token.clone()),
            user_id: Some(hub_name.as_bytes().to_vec()),
            content_type: Some(Symbol(FEEDBACK_CONTENT_TYPE.into())),
            content_encoding: Some(Symbol("utf-8".into())),
            ..Default::default()
        }),
        body: Body::Data(vec![body]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(to: &str) -> Message {
        Message {
            properties: Some(Properties {
                to: Some(to.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn to_names_a_device_or_a_module_percent_decoded() {
        assert_eq!(
            identity_of("/devices/d%201/messages/devicebound"),
            Ok(Identity::device("d 1"))
        );
        assert_eq!(
            identity_of("/devices/d1/modules/m%2F1/messages/deviceBound"),
            Ok(Identity::module("d1", "m/1"))
        );
        for bad in [
            "/devices//messages/devicebound",
            "/devices/d1/messages/events",
            "devices/d1",
            "/devices/d1/modules//messages/devicebound",
            "/devices/%FF/messages/devicebound",
        ] {
            assert!(identity_of(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn system_properties_ack_and_application_properties_are_split() {
        let mut m = message("/devices/d1/messages/devicebound");
        if let Some(p) = m.properties.as_mut() {
            p.message_id = Value::Uuid([0x11; 16]);
            p.correlation_id = Value::Ulong(7);
            p.content_type = Some(Symbol("application/json".into()));
            p.content_encoding = Some(Symbol("utf-8".into()));
            p.absolute_expiry_time = Value::Timestamp(4_000_000_000_000);
            p.user_id = Some(b"me".to_vec());
        }
        m.application_properties = vec![
            (Value::str("iothub-ack"), Value::str("Full")),
            (Value::str("k"), Value::str("v")),
            (Value::str("n"), Value::Int(3)),
            (Value::str("none"), Value::Null),
        ];
        m.body = Body::Data(vec![b"ab".to_vec(), b"c".to_vec()]);
        let (id, req) = send_request(&m).expect("valid");
        assert_eq!(id, Identity::device("d1"));
        assert_eq!(
            req.message_id.as_deref(),
            Some("11111111-1111-1111-1111-111111111111")
        );
        assert_eq!(req.correlation_id.as_deref(), Some("7"));
        assert_eq!(req.content_type.as_deref(), Some("application/json"));
        assert_eq!(req.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(req.user_id.as_deref(), Some("me"));
        assert_eq!(req.expiry_time_ms, Some(4_000_000_000_000));
        assert_eq!(req.ack, FeedbackRequest::Full);
        assert_eq!(
            req.properties,
            vec![
                ("k".to_string(), Some("v".to_string())),
                ("n".to_string(), Some("3".to_string())),
                ("none".to_string(), None),
            ]
        );
        assert_eq!(req.payload, b"abc");
    }

    #[test]
    fn malformed_sends_say_what_is_wrong() {
        let no_to = Message::default();
        assert!(send_request(&no_to).unwrap_err().contains("'to'"));
        let mut bad_ack = message("/devices/d1/messages/devicebound");
        bad_ack.application_properties = vec![(Value::str("iothub-ack"), Value::str("most"))];
        assert!(send_request(&bad_ack).unwrap_err().contains("iothub-ack"));
        let mut bad_body = message("/devices/d1/messages/devicebound");
        bad_body.body = Body::Value(Value::Int(1));
        assert!(send_request(&bad_body).is_err());
        let mut bad_expiry = message("/devices/d1/messages/devicebound");
        if let Some(p) = bad_expiry.properties.as_mut() {
            p.absolute_expiry_time = Value::str("tomorrow");
        }
        assert!(send_request(&bad_expiry).is_err());
    }

    #[test]
    fn refusals_carry_the_condition_the_sdks_translate_and_the_iot_hub_code() {
        let full = HubError::new(ErrorCode::DeviceMaximumQueueDepthExceeded, "queue full");
        let e = rejection(&full);
        assert_eq!(e.condition.0, "amqp:resource-limit-exceeded");
        assert_eq!(
            e.description.as_deref(),
            Some("403004 DeviceMaximumQueueDepthExceeded: queue full")
        );
        assert_eq!(
            rejection(&HubError::device_not_found("d9")).condition.0,
            "amqp:not-found"
        );
        assert_eq!(
            rejection(&HubError::new(ErrorCode::MessageTooLarge, "big"))
                .condition
                .0,
            "amqp:link:message-size-exceeded"
        );
    }
}
