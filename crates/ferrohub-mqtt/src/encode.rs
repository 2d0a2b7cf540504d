//! Packets to bytes: validation of what may be sent, then infallible writing.

use bytes::{BufMut, BytesMut};

use crate::packet::{kind, MAX_REMAINING_LENGTH, PROTOCOL_MQISDP, PROTOCOL_MQTT};
use crate::{
    ConnAck, Connect, ConnectReturnCode, EncodeError, Packet, Publish, QoS, SubAck, Subscribe,
    SubscribeReturnCode, Unsubscribe,
};

type Result<T> = std::result::Result<T, EncodeError>;

/// Appends `packet` to `buf`.
///
/// Everything [`crate::decode`] would reject is refused here before a single
/// byte is written, so on `Err` `buf` is unchanged and on `Ok` the bytes
/// decode back to an equal packet.
pub fn encode(packet: &Packet, buf: &mut BytesMut) -> Result<()> {
    let remaining_length = body_len(packet)?;
    if remaining_length > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PayloadTooLarge);
    }
    buf.reserve(1 + length_bytes(remaining_length) + remaining_length);
    buf.put_u8(first_byte(packet));
    put_remaining_length(buf, remaining_length);
    write_body(packet, buf);
    Ok(())
}

fn first_byte(packet: &Packet) -> u8 {
    let (packet_type, flags) = match packet {
        Packet::Connect(_) => (kind::CONNECT, 0),
        Packet::ConnAck(_) => (kind::CONNACK, 0),
        Packet::Publish(p) => (
            kind::PUBLISH,
            (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain),
        ),
        Packet::PubAck(_) => (kind::PUBACK, 0),
        Packet::PubRec(_) => (kind::PUBREC, 0),
        Packet::PubRel(_) => (kind::PUBREL, 0b0010),
        Packet::PubComp(_) => (kind::PUBCOMP, 0),
        Packet::Subscribe(_) => (kind::SUBSCRIBE, 0b0010),
        Packet::SubAck(_) => (kind::SUBACK, 0),
        Packet::Unsubscribe(_) => (kind::UNSUBSCRIBE, 0b0010),
        Packet::UnsubAck(_) => (kind::UNSUBACK, 0),
        Packet::PingReq => (kind::PINGREQ, 0),
        Packet::PingResp => (kind::PINGRESP, 0),
        Packet::Disconnect => (kind::DISCONNECT, 0),
    };
    (packet_type << 4) | flags
}

fn length_bytes(remaining_length: usize) -> usize {
    match remaining_length {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        // Truncation is the point: the low 7 bits go out first.
        let mut byte = (len & 0x7F) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// Validates `packet` and returns its remaining length. Sums cannot overflow:
/// every term is bounded by memory the caller already holds.
fn body_len(packet: &Packet) -> Result<usize> {
    match packet {
        Packet::Connect(c) => connect_len(c),
        Packet::ConnAck(c) => connack_len(c),
        Packet::Publish(p) => publish_len(p),
        Packet::PubAck(id)
        | Packet::PubRec(id)
        | Packet::PubRel(id)
        | Packet::PubComp(id)
        | Packet::UnsubAck(id) => {
            check_packet_id(*id)?;
            Ok(2)
        }
        Packet::Subscribe(s) => subscribe_len(s),
        Packet::SubAck(s) => suback_len(s),
        Packet::Unsubscribe(u) => unsubscribe_len(u),
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => Ok(0),
    }
}

fn connect_len(c: &Connect) -> Result<usize> {
    if c.protocol_name != PROTOCOL_MQTT && c.protocol_name != PROTOCOL_MQISDP {
        return Err(EncodeError::InvalidPacket(
            "protocol name must be MQTT or MQIsdp",
        ));
    }
    if c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::InvalidPacket(
            "password requires a username in MQTT 3.1.1",
        ));
    }
    // Protocol level, connect flags and keep alive.
    let mut len = string_len(&c.protocol_name)? + 1 + 1 + 2;
    len += string_len(&c.client_id)?;
    if let Some(will) = &c.will {
        len += string_len(&will.topic)? + binary_len(&will.payload)?;
    }
    if let Some(username) = &c.username {
        len += string_len(username)?;
    }
    if let Some(password) = &c.password {
        len += binary_len(password)?;
    }
    Ok(len)
}

fn connack_len(c: &ConnAck) -> Result<usize> {
    if c.session_present && c.code != ConnectReturnCode::Accepted {
        return Err(EncodeError::InvalidPacket(
            "session present requires return code Accepted",
        ));
    }
    Ok(2)
}

fn publish_len(p: &Publish) -> Result<usize> {
    let id_len = if p.qos == QoS::AtMostOnce {
        if p.dup {
            return Err(EncodeError::InvalidPacket("QoS 0 PUBLISH must not set DUP"));
        }
        if p.packet_id != 0 {
            return Err(EncodeError::InvalidPacket(
                "QoS 0 PUBLISH has no packet identifier; packet_id must be 0",
            ));
        }
        0
    } else {
        check_packet_id(p.packet_id)?;
        2
    };
    Ok(string_len(&p.topic)? + id_len + p.payload.len())
}

fn subscribe_len(s: &Subscribe) -> Result<usize> {
    check_packet_id(s.packet_id)?;
    if s.filters.is_empty() {
        return Err(EncodeError::InvalidPacket(
            "SUBSCRIBE needs at least one filter",
        ));
    }
    let mut len = 2;
    for (filter, _) in &s.filters {
        len += string_len(filter)? + 1;
    }
    Ok(len)
}

fn suback_len(s: &SubAck) -> Result<usize> {
    check_packet_id(s.packet_id)?;
    if s.return_codes.is_empty() {
        return Err(EncodeError::InvalidPacket(
            "SUBACK needs at least one return code",
        ));
    }
    Ok(2 + s.return_codes.len())
}

fn unsubscribe_len(u: &Unsubscribe) -> Result<usize> {
    check_packet_id(u.packet_id)?;
    if u.filters.is_empty() {
        return Err(EncodeError::InvalidPacket(
            "UNSUBSCRIBE needs at least one filter",
        ));
    }
    let mut len = 2;
    for filter in &u.filters {
        len += string_len(filter)?;
    }
    Ok(len)
}

fn check_packet_id(id: u16) -> Result<()> {
    if id == 0 {
        return Err(EncodeError::InvalidPacket(
            "packet identifier must not be 0",
        ));
    }
    Ok(())
}

fn string_len(s: &str) -> Result<usize> {
    if s.len() > usize::from(u16::MAX) {
        return Err(EncodeError::StringTooLong);
    }
    if s.contains('\0') {
        return Err(EncodeError::InvalidString);
    }
    Ok(2 + s.len())
}

fn binary_len(b: &[u8]) -> Result<usize> {
    if b.len() > usize::from(u16::MAX) {
        return Err(EncodeError::BinaryTooLong);
    }
    Ok(2 + b.len())
}

/// Writes the variable header and payload; `body_len` has already vouched
/// for every length fitting its field.
fn write_body(packet: &Packet, buf: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => write_connect(c, buf),
        Packet::ConnAck(c) => {
            buf.put_u8(u8::from(c.session_present));
            buf.put_u8(c.code as u8);
        }
        Packet::Publish(p) => {
            put_binary(buf, p.topic.as_bytes());
            if p.qos != QoS::AtMostOnce {
                buf.put_u16(p.packet_id);
            }
            buf.put_slice(&p.payload);
        }
        Packet::PubAck(id)
        | Packet::PubRec(id)
        | Packet::PubRel(id)
        | Packet::PubComp(id)
        | Packet::UnsubAck(id) => buf.put_u16(*id),
        Packet::Subscribe(s) => {
            buf.put_u16(s.packet_id);
            for (filter, qos) in &s.filters {
                put_binary(buf, filter.as_bytes());
                buf.put_u8(*qos as u8);
            }
        }
        Packet::SubAck(s) => {
            buf.put_u16(s.packet_id);
            for code in &s.return_codes {
                buf.put_u8(match code {
                    SubscribeReturnCode::Success(qos) => *qos as u8,
                    SubscribeReturnCode::Failure => 0x80,
                });
            }
        }
        Packet::Unsubscribe(u) => {
            buf.put_u16(u.packet_id);
            for filter in &u.filters {
                put_binary(buf, filter.as_bytes());
            }
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
}

fn write_connect(c: &Connect, buf: &mut BytesMut) {
    put_binary(buf, c.protocol_name.as_bytes());
    buf.put_u8(c.protocol_level);
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some(will) = &c.will {
        flags |= 0x04 | ((will.qos as u8) << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    put_binary(buf, c.client_id.as_bytes());
    if let Some(will) = &c.will {
        put_binary(buf, will.topic.as_bytes());
        put_binary(buf, &will.payload);
    }
    if let Some(username) = &c.username {
        put_binary(buf, username.as_bytes());
    }
    if let Some(password) = &c.password {
        put_binary(buf, password);
    }
}

fn put_binary(buf: &mut BytesMut, b: &[u8]) {
    // Length was checked by string_len/binary_len.
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}
