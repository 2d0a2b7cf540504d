//! The message format (part 3.2): the sections of a bare message with its annotations, as
//! one [`Message`] that decodes from and encodes to a transfer's payload.

use crate::performative::{Field, Symbol};
use crate::value::{DecodeError, Value};

const HEADER: u64 = 0x70;
const DELIVERY_ANNOTATIONS: u64 = 0x71;
const MESSAGE_ANNOTATIONS: u64 = 0x72;
const PROPERTIES: u64 = 0x73;
const APPLICATION_PROPERTIES: u64 = 0x74;
const DATA: u64 = 0x75;
const AMQP_SEQUENCE: u64 = 0x76;
const AMQP_VALUE: u64 = 0x77;
const FOOTER: u64 = 0x78;

/// The properties section; every field optional. `absolute_expiry_time` and `creation_time`
/// are timestamps (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Properties {
    pub message_id: Value,
    pub user_id: Option<Vec<u8>>,
    pub to: Option<String>,
    pub subject: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Value,
    pub content_type: Option<Symbol>,
    pub content_encoding: Option<Symbol>,
    pub absolute_expiry_time: Value,
    pub creation_time: Value,
    pub group_id: Option<String>,
    pub group_sequence: Option<u32>,
    pub reply_to_group_id: Option<String>,
}

impl Properties {
    fn to_value(&self) -> Value {
        Value::described(
            PROPERTIES,
            Value::List(vec![
                self.message_id.clone(),
                self.user_id.to_value(),
                self.to.to_value(),
                self.subject.to_value(),
                self.reply_to.to_value(),
                self.correlation_id.clone(),
                self.content_type.to_value(),
                self.content_encoding.to_value(),
                self.absolute_expiry_time.clone(),
                self.creation_time.clone(),
                self.group_id.to_value(),
                self.group_sequence.to_value(),
                self.reply_to_group_id.to_value(),
            ]),
        )
    }

    fn from_list(items: &[Value]) -> Result<Self, DecodeError> {
        let f = |i: usize| items.get(i).unwrap_or(&Value::Null);
        Ok(Properties {
            message_id: f(0).clone(),
            user_id: Field::from_value(f(1))?,
            to: Field::from_value(f(2))?,
            subject: Field::from_value(f(3))?,
            reply_to: Field::from_value(f(4))?,
            correlation_id: f(5).clone(),
            content_type: Field::from_value(f(6))?,
            content_encoding: Field::from_value(f(7))?,
            absolute_expiry_time: f(8).clone(),
            creation_time: f(9).clone(),
            group_id: Field::from_value(f(10))?,
            group_sequence: Field::from_value(f(11))?,
            reply_to_group_id: Field::from_value(f(12))?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Body {
    #[default]
    Empty,
    /// One or more data sections.
    Data(Vec<Vec<u8>>),
    Sequence(Vec<Value>),
    Value(Value),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    /// The header section as decoded (Null when absent).
    pub header: Value,
    pub delivery_annotations: Vec<(Value, Value)>,
    pub message_annotations: Vec<(Value, Value)>,
    pub properties: Option<Properties>,
    pub application_properties: Vec<(Value, Value)>,
    pub body: Body,
}

fn map_of(v: &Value) -> Result<Vec<(Value, Value)>, DecodeError> {
    match v {
        Value::Map(m) => Ok(m.clone()),
        Value::Null => Ok(Vec::new()),
        _ => Err(DecodeError::Shape("section is not a map")),
    }
}

impl Message {
    /// An application property by key.
    pub fn application_property(&self, key: &str) -> Option<&Value> {
        self.application_properties
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    pub fn decode(mut payload: &[u8]) -> Result<Message, DecodeError> {
        let mut m = Message::default();
        while !payload.is_empty() {
            let section = Value::decode(&mut payload)?;
            let Value::Described(d, inner) = &section else {
                return Err(DecodeError::Shape("message section is not described"));
            };
            match d.as_u64() {
                Some(HEADER) => m.header = section.clone(),
                Some(DELIVERY_ANNOTATIONS) => m.delivery_annotations = map_of(inner)?,
                Some(MESSAGE_ANNOTATIONS) => m.message_annotations = map_of(inner)?,
                Some(PROPERTIES) => match inner.as_ref() {
                    Value::List(items) => m.properties = Some(Properties::from_list(items)?),
                    _ => return Err(DecodeError::Shape("properties is not a list")),
                },
                Some(APPLICATION_PROPERTIES) => m.application_properties = map_of(inner)?,
                Some(DATA) => match (inner.as_ref(), &mut m.body) {
                    (Value::Binary(b), Body::Data(chunks)) => chunks.push(b.clone()),
                    (Value::Binary(b), body) => *body = Body::Data(vec![b.clone()]),
                    _ => return Err(DecodeError::Shape("data section is not binary")),
                },
                Some(AMQP_SEQUENCE) => match inner.as_ref() {
                    Value::List(items) => m.body = Body::Sequence(items.clone()),
                    _ => return Err(DecodeError::Shape("amqp-sequence is not a list")),
                },
                Some(AMQP_VALUE) => m.body = Body::Value(inner.as_ref().clone()),
                Some(FOOTER) => {}
                _ => return Err(DecodeError::Shape("unknown message section")),
            }
        }
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        let body_len = match &self.body {
            Body::Data(chunks) => chunks.iter().map(Vec::len).sum(),
            _ => 0,
        };
        // Sections are written straight into one buffer sized for the body and a typical
        // set of properties and annotations, without building `Value`s of them.
        let mut out = Vec::with_capacity(body_len + 512);
        if !self.header.is_null() {
            self.header.encode(&mut out);
        }
        let descriptor = |out: &mut Vec<u8>, code: u64| {
            out.push(0x00);
            crate::value::encode(&Value::Ulong(code), out);
        };
        let map_section = |out: &mut Vec<u8>, code, entries: &Vec<(Value, Value)>| {
            if !entries.is_empty() {
                descriptor(out, code);
                crate::value::encode_map(out, entries);
            }
        };
        map_section(&mut out, DELIVERY_ANNOTATIONS, &self.delivery_annotations);
        map_section(&mut out, MESSAGE_ANNOTATIONS, &self.message_annotations);
        if let Some(p) = &self.properties {
            p.to_value().encode(&mut out);
        }
        map_section(
            &mut out,
            APPLICATION_PROPERTIES,
            &self.application_properties,
        );
        match &self.body {
            Body::Empty => {}
            Body::Data(chunks) => {
                for c in chunks {
                    descriptor(&mut out, DATA);
                    crate::value::put_sized(&mut out, 0xa0, 0xb0, c);
                }
            }
            Body::Sequence(items) => {
                Value::described(AMQP_SEQUENCE, Value::List(items.clone())).encode(&mut out)
            }
            Body::Value(v) => {
                descriptor(&mut out, AMQP_VALUE);
                v.encode(&mut out);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = Message {
            message_annotations: vec![(Value::sym("x-opt-offset"), Value::str("7"))],
            properties: Some(Properties {
                message_id: Value::Uuid([1; 16]),
                content_type: Some(Symbol("application/json".into())),
                ..Default::default()
            }),
            application_properties: vec![(Value::str("k"), Value::str("v"))],
            body: Body::Data(vec![b"{}".to_vec()]),
            ..Default::default()
        };
        assert_eq!(Message::decode(&m.encode()), Ok(m));
    }
}
