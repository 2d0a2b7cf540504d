//! Performatives (part 2.7) and SASL frames (part 5.3) as structs, with the error, source,
//! target and delivery-state types they carry.
//!
//! Encoding writes every field of the list, trailing nulls included: pyamqp (azure-eventhub
//! <= 5.15.1) indexes fields by position and fails on a shortened list. Decoding accepts
//! shortened lists, as the spec allows.

use crate::value::{DecodeError, Value};

/// A symbol-typed field (as opposed to a string).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Symbol(pub String);

/// How a Rust field maps to its AMQP type.
pub trait Field: Sized {
    fn to_value(&self) -> Value;
    /// `v` is `Null` for a field the peer left out.
    fn from_value(v: &Value) -> Result<Self, DecodeError>;
}

fn bad(what: &'static str) -> DecodeError {
    DecodeError::Shape(what)
}

impl Field for String {
    fn to_value(&self) -> Value {
        Value::String(self.clone())
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_str()
            .map(str::to_owned)
            .ok_or(bad("expected a string"))
    }
}
impl Field for Symbol {
    fn to_value(&self) -> Value {
        Value::Symbol(self.0.clone())
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_str()
            .map(|s| Symbol(s.to_owned()))
            .ok_or(bad("expected a symbol"))
    }
}
impl Field for u32 {
    fn to_value(&self) -> Value {
        Value::Uint(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_u32().ok_or(bad("expected a uint"))
    }
}
impl Field for u16 {
    fn to_value(&self) -> Value {
        Value::Ushort(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or(bad("expected a ushort"))
    }
}
impl Field for u8 {
    fn to_value(&self) -> Value {
        Value::Ubyte(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .ok_or(bad("expected a ubyte"))
    }
}
impl Field for u64 {
    fn to_value(&self) -> Value {
        Value::Ulong(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_u64().ok_or(bad("expected a ulong"))
    }
}
impl Field for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_bool().ok_or(bad("expected a boolean"))
    }
}
impl Field for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Binary(self.clone())
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match v {
            Value::Binary(b) => Ok(b.clone()),
            _ => Err(bad("expected binary")),
        }
    }
}
/// Any value, kept as decoded (maps, capabilities, sources, delivery states).
impl Field for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        Ok(v.clone())
    }
}
impl<T: Field> Field for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, Field::to_value)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        if v.is_null() {
            Ok(None)
        } else {
            T::from_value(v).map(Some)
        }
    }
}

/// The list inside a described composite with descriptor `code`.
fn fields_of(v: &Value, code: u64) -> Result<&[Value], DecodeError> {
    match v {
        Value::Described(d, inner) if d.as_u64() == Some(code) => match inner.as_ref() {
            Value::List(items) => Ok(items),
            _ => Err(bad("composite is not a list")),
        },
        _ => Err(bad("unexpected descriptor")),
    }
}

macro_rules! composite {
    ($(#[$m:meta])* $name:ident = $code:expr, { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Default)]
        pub struct $name { $(pub $field: $ty),* }

        impl $name {
            pub const CODE: u64 = $code;
            /// The described list with every field written.
            pub fn to_value(&self) -> Value {
                Value::described($code, Value::List(vec![$(Field::to_value(&self.$field)),*]))
            }
            pub fn from_value(v: &Value) -> Result<Self, DecodeError> {
                let items = fields_of(v, $code)?;
                let mut it = items.iter();
                Ok($name { $($field: <$ty as Field>::from_value(it.next().unwrap_or(&Value::Null))?),* })
            }
        }

        impl Field for $name {
            fn to_value(&self) -> Value { $name::to_value(self) }
            fn from_value(v: &Value) -> Result<Self, DecodeError> { $name::from_value(v) }
        }
    };
}

composite!(Open = 0x10, {
    container_id: String, hostname: Option<String>, max_frame_size: Option<u32>,
    channel_max: Option<u16>, idle_time_out: Option<u32>, outgoing_locales: Value,
    incoming_locales: Value, offered_capabilities: Value, desired_capabilities: Value,
    properties: Value,
});
composite!(Begin = 0x11, {
    remote_channel: Option<u16>, next_outgoing_id: u32, incoming_window: u32,
    outgoing_window: u32, handle_max: Option<u32>, offered_capabilities: Value,
    desired_capabilities: Value, properties: Value,
});
composite!(Attach = 0x12, {
    name: String, handle: u32, role: bool, snd_settle_mode: Option<u8>,
    rcv_settle_mode: Option<u8>, source: Value, target: Value, unsettled: Value,
    incomplete_unsettled: Option<bool>, initial_delivery_count: Option<u32>,
    max_message_size: Option<u64>, offered_capabilities: Value, desired_capabilities: Value,
    properties: Value,
});
composite!(Flow = 0x13, {
    next_incoming_id: Option<u32>, incoming_window: u32, next_outgoing_id: u32,
    outgoing_window: u32, handle: Option<u32>, delivery_count: Option<u32>,
    link_credit: Option<u32>, available: Option<u32>, drain: Option<bool>, echo: Option<bool>,
    properties: Value,
});
composite!(Transfer = 0x14, {
    handle: u32, delivery_id: Option<u32>, delivery_tag: Option<Vec<u8>>,
    message_format: Option<u32>, settled: Option<bool>, more: Option<bool>,
    rcv_settle_mode: Option<u8>, state: Value, resume: Option<bool>, aborted: Option<bool>,
    batchable: Option<bool>,
});
composite!(Disposition = 0x15, {
    role: bool, first: u32, last: Option<u32>, settled: Option<bool>, state: Value,
    batchable: Option<bool>,
});
composite!(Detach = 0x16, { handle: u32, closed: Option<bool>, error: Option<AmqpError> });
composite!(End = 0x17, { error: Option<AmqpError> });
composite!(Close = 0x18, { error: Option<AmqpError> });
composite!(
    /// An error condition (part 2.8.14): `condition` a symbol such as `amqp:not-found`.
    AmqpError = 0x1d, { condition: Symbol, description: Option<String>, info: Value }
);
composite!(Source = 0x28, {
    address: Option<String>, durable: Option<u32>, expiry_policy: Option<Symbol>,
    timeout: Option<u32>, dynamic: Option<bool>, dynamic_node_properties: Value,
    distribution_mode: Option<Symbol>, filter: Value, default_outcome: Value, outcomes: Value,
    capabilities: Value,
});
composite!(Target = 0x29, {
    address: Option<String>, durable: Option<u32>, expiry_policy: Option<Symbol>,
    timeout: Option<u32>, dynamic: Option<bool>, dynamic_node_properties: Value,
    capabilities: Value,
});
composite!(SaslMechanisms = 0x40, { mechanisms: Value });
composite!(SaslInit = 0x41, { mechanism: Symbol, initial_response: Option<Vec<u8>>, hostname: Option<String> });
composite!(SaslOutcome = 0x44, { code: u8, additional_data: Option<Vec<u8>> });

/// Delivery state `accepted` (part 3.4.2).
pub fn accepted() -> Value {
    Value::described(0x24, Value::List(vec![]))
}

/// Delivery state `rejected` with an error.
pub fn rejected(error: AmqpError) -> Value {
    Value::described(0x25, Value::List(vec![error.to_value()]))
}

impl AmqpError {
    pub fn new(condition: &str, description: impl Into<String>) -> Self {
        AmqpError {
            condition: Symbol(condition.to_owned()),
            description: Some(description.into()),
            info: Value::Null,
        }
    }
}

/// A decoded AMQP frame body.
#[derive(Debug, Clone, PartialEq)]
pub enum Performative {
    Open(Open),
    Begin(Begin),
    Attach(Attach),
    Flow(Flow),
    Transfer(Transfer),
    Disposition(Disposition),
    Detach(Detach),
    End(End),
    Close(Close),
}

impl Performative {
    pub fn decode(v: &Value) -> Result<Self, DecodeError> {
        Ok(match v.descriptor() {
            Some(Open::CODE) => Performative::Open(Open::from_value(v)?),
            Some(Begin::CODE) => Performative::Begin(Begin::from_value(v)?),
            Some(Attach::CODE) => Performative::Attach(Attach::from_value(v)?),
            Some(Flow::CODE) => Performative::Flow(Flow::from_value(v)?),
            Some(Transfer::CODE) => Performative::Transfer(Transfer::from_value(v)?),
            Some(Disposition::CODE) => Performative::Disposition(Disposition::from_value(v)?),
            Some(Detach::CODE) => Performative::Detach(Detach::from_value(v)?),
            Some(End::CODE) => Performative::End(End::from_value(v)?),
            Some(Close::CODE) => Performative::Close(Close::from_value(v)?),
            _ => return Err(bad("unknown performative")),
        })
    }

    pub fn to_value(&self) -> Value {
        match self {
            Performative::Open(p) => p.to_value(),
            Performative::Begin(p) => p.to_value(),
            Performative::Attach(p) => p.to_value(),
            Performative::Flow(p) => p.to_value(),
            Performative::Transfer(p) => p.to_value(),
            Performative::Disposition(p) => p.to_value(),
            Performative::Detach(p) => p.to_value(),
            Performative::End(p) => p.to_value(),
            Performative::Close(p) => p.to_value(),
        }
    }
}

/// A decoded SASL frame body (the server-side subset, plus what a client receives).
#[derive(Debug, Clone, PartialEq)]
pub enum SaslFrame {
    Mechanisms(SaslMechanisms),
    Init(SaslInit),
    Outcome(SaslOutcome),
}

impl SaslFrame {
    pub fn decode(v: &Value) -> Result<Self, DecodeError> {
        Ok(match v.descriptor() {
            Some(SaslMechanisms::CODE) => SaslFrame::Mechanisms(SaslMechanisms::from_value(v)?),
            Some(SaslInit::CODE) => SaslFrame::Init(SaslInit::from_value(v)?),
            Some(SaslOutcome::CODE) => SaslFrame::Outcome(SaslOutcome::from_value(v)?),
            _ => return Err(bad("unexpected SASL frame")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_written_even_trailing_nulls() {
        let open = Open {
            container_id: "c".into(),
            ..Default::default()
        };
        match open.to_value() {
            Value::Described(_, list) => assert_eq!(
                *list,
                Value::List({
                    let mut v = vec![Value::str("c")];
                    v.extend(std::iter::repeat_n(Value::Null, 9));
                    v
                })
            ),
            other => panic!("not described: {other:?}"),
        }
        let t = Transfer::default().to_value();
        assert!(
            matches!(&t, Value::Described(_, l) if matches!(l.as_ref(), Value::List(f) if f.len() == 11))
        );
    }

    #[test]
    fn shortened_lists_decode_with_defaults() {
        let v = Value::described(
            0x12,
            Value::List(vec![Value::str("l"), Value::Uint(1), Value::Bool(true)]),
        );
        let a = Attach::from_value(&v);
        assert_eq!(
            a.as_ref().map(|a| (a.handle, a.role, a.source.is_null())),
            Ok((1, true, true))
        );
        let round = Attach::from_value(&a.unwrap_or_default().to_value());
        assert!(round.is_ok());
    }
}
