//! The MQTT 3.1.1 control packets as plain data, with no wire-format logic.

use bytes::Bytes;

use crate::DecodeError;

/// Delivery guarantee of a message or subscription.
///
/// Ordered so that a server can grant `min(requested, supported)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl TryFrom<u8> for QoS {
    type Error = DecodeError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            other => Err(DecodeError::InvalidQoS(other)),
        }
    }
}

/// CONNECT. `protocol_level` is kept as received so the server can answer
/// [`ConnectReturnCode::UnacceptableProtocolVersion`] instead of dropping the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// `"MQTT"` (level 4) or `"MQIsdp"` (level 3); nothing else decodes or encodes.
    pub protocol_name: String,
    pub protocol_level: u8,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<LastWill>,
    pub username: Option<String>,
    /// Binary on the wire; MQTT 3.1.1 forbids it without a username.
    pub password: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUserNameOrPassword = 4,
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    pub(crate) fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => ConnectReturnCode::Accepted,
            1 => ConnectReturnCode::UnacceptableProtocolVersion,
            2 => ConnectReturnCode::IdentifierRejected,
            3 => ConnectReturnCode::ServerUnavailable,
            4 => ConnectReturnCode::BadUserNameOrPassword,
            5 => ConnectReturnCode::NotAuthorized,
            _ => return None,
        })
    }
}

/// CONNACK. The spec requires `session_present == false` whenever `code` is
/// not `Accepted`; both encode and decode enforce that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: ConnectReturnCode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Only legal with QoS > 0.
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    /// 0 exactly when `qos` is `AtMostOnce`: QoS 0 has no identifier on the
    /// wire, and QoS > 0 forbids 0.
    pub packet_id: u16,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    /// Never empty.
    pub filters: Vec<(String, QoS)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscribeReturnCode {
    Success(QoS),
    /// 0x80 on the wire.
    Failure,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    /// One per filter of the SUBSCRIBE being answered, so never empty.
    pub return_codes: Vec<SubscribeReturnCode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    /// Never empty.
    pub filters: Vec<String>,
}

/// Every MQTT 3.1.1 control packet. Packet identifiers (the `u16` payloads
/// and `packet_id` fields) are never 0 on the wire, except that a QoS 0
/// PUBLISH has none and uses 0 here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
}

/// Control packet type numbers from the high nibble of the fixed header.
pub(crate) mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// Longest remaining length the 4-byte variable-length encoding can carry.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Protocol names whose CONNECT this codec understands.
pub(crate) const PROTOCOL_MQTT: &str = "MQTT";
pub(crate) const PROTOCOL_MQISDP: &str = "MQIsdp";
