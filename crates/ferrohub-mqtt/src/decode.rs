//! Bytes to packets: fixed-header framing, size limits and per-packet validation.

use bytes::{Buf, Bytes, BytesMut};

use crate::packet::{kind, PROTOCOL_MQISDP, PROTOCOL_MQTT};
use crate::{
    ConnAck, Connect, ConnectReturnCode, DecodeError, LastWill, Packet, Publish, QoS, SubAck,
    Subscribe, SubscribeReturnCode, Unsubscribe,
};

type Result<T> = std::result::Result<T, DecodeError>;

/// Decodes one packet from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed and `buf` is untouched. On
/// `Ok(Some(_))` exactly that packet's bytes are consumed. On `Err` the
/// connection must be closed, and `buf` may or may not have lost the
/// offending packet.
///
/// `max_packet_size` bounds the whole packet (fixed header included) and is
/// enforced as soon as the fixed header is in, so a peer cannot make us wait
/// for, or buffer, a body we would refuse anyway.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // Reject garbage on the first byte instead of waiting for a length.
    let header = FixedHeader::parse(first)?;

    let Some((remaining_length, length_bytes)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    let total = 1 + length_bytes + remaining_length;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }

    let mut packet = buf.split_to(total);
    packet.advance(1 + length_bytes);
    decode_body(header, packet.freeze()).map(Some)
}

/// Reads the variable-length remaining length from the bytes after the first
/// header byte. `Ok(None)` when it is not complete yet.
fn remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>> {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().enumerate() {
        if i == 4 {
            break;
        }
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        // The fourth byte still had its continuation bit set.
        return Err(DecodeError::MalformedRemainingLength);
    }
    Ok(None)
}

#[derive(Clone, Copy)]
struct FixedHeader {
    packet_type: u8,
    flags: u8,
}

impl FixedHeader {
    fn parse(byte: u8) -> Result<Self> {
        let packet_type = byte >> 4;
        let flags = byte & 0x0F;
        let expected_flags = match packet_type {
            kind::PUBLISH => {
                let qos = (flags >> 1) & 0b11;
                if qos == 3 {
                    return Err(DecodeError::InvalidQoS(qos));
                }
                if qos == 0 && flags & 0b1000 != 0 {
                    return Err(DecodeError::MalformedPacket(
                        "PUBLISH with QoS 0 must not set DUP",
                    ));
                }
                flags
            }
            kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => 0b0010,
            kind::CONNECT..=kind::DISCONNECT => 0,
            _ => return Err(DecodeError::InvalidPacketType(packet_type)),
        };
        if flags != expected_flags {
            return Err(DecodeError::InvalidFlags { packet_type, flags });
        }
        Ok(FixedHeader { packet_type, flags })
    }
}

fn decode_body(header: FixedHeader, body: Bytes) -> Result<Packet> {
    let mut r = Reader(body);
    let packet = match header.packet_type {
        kind::CONNECT => Packet::Connect(decode_connect(&mut r)?),
        kind::CONNACK => Packet::ConnAck(decode_connack(&mut r)?),
        kind::PUBLISH => return decode_publish(header.flags, r).map(Packet::Publish),
        kind::PUBACK => Packet::PubAck(decode_packet_id_only(&mut r)?),
        kind::PUBREC => Packet::PubRec(decode_packet_id_only(&mut r)?),
        kind::PUBREL => Packet::PubRel(decode_packet_id_only(&mut r)?),
        kind::PUBCOMP => Packet::PubComp(decode_packet_id_only(&mut r)?),
        kind::SUBSCRIBE => Packet::Subscribe(decode_subscribe(&mut r)?),
        kind::SUBACK => Packet::SubAck(decode_suback(&mut r)?),
        kind::UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(&mut r)?),
        kind::UNSUBACK => Packet::UnsubAck(decode_packet_id_only(&mut r)?),
        kind::PINGREQ => Packet::PingReq,
        kind::PINGRESP => Packet::PingResp,
        kind::DISCONNECT => Packet::Disconnect,
        other => return Err(DecodeError::InvalidPacketType(other)),
    };
    if !r.0.is_empty() {
        return Err(DecodeError::MalformedPacket(
            "bytes left over after the last field",
        ));
    }
    Ok(packet)
}

fn decode_connect(r: &mut Reader) -> Result<Connect> {
    let protocol_name = r.string("CONNECT truncated in protocol name")?;
    if protocol_name != PROTOCOL_MQTT && protocol_name != PROTOCOL_MQISDP {
        return Err(DecodeError::InvalidProtocol);
    }
    let protocol_level = r.u8("CONNECT truncated in protocol level")?;
    let flags = r.u8("CONNECT truncated in connect flags")?;
    let keep_alive = r.u16("CONNECT truncated in keep alive")?;

    if flags & 0x01 != 0 {
        return Err(DecodeError::MalformedPacket(
            "CONNECT reserved flag must be 0",
        ));
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::MalformedPacket(
            "CONNECT will QoS and retain must be 0 without a will",
        ));
    }
    let will_qos = QoS::try_from(will_qos)?;
    if password_flag && !username_flag {
        return Err(DecodeError::MalformedPacket(
            "CONNECT password flag set without username flag",
        ));
    }

    let client_id = r.string("CONNECT truncated in client identifier")?;
    let will = if will_flag {
        Some(LastWill {
            topic: r.string("CONNECT truncated in will topic")?,
            payload: r.binary("CONNECT truncated in will message")?,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string("CONNECT truncated in username")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary("CONNECT truncated in password")?)
    } else {
        None
    };

    Ok(Connect {
        protocol_name,
        protocol_level,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_connack(r: &mut Reader) -> Result<ConnAck> {
    r.expect_len(2, "CONNACK remaining length must be 2")?;
    let ack_flags = r.u8("CONNACK truncated")?;
    let code = r.u8("CONNACK truncated")?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::MalformedPacket(
            "CONNACK reserved acknowledge flags must be 0",
        ));
    }
    let code = ConnectReturnCode::from_u8(code).ok_or(DecodeError::MalformedPacket(
        "CONNACK return code is reserved",
    ))?;
    let session_present = ack_flags & 0x01 != 0;
    if session_present && code != ConnectReturnCode::Accepted {
        return Err(DecodeError::MalformedPacket(
            "CONNACK session present with a non-zero return code",
        ));
    }
    Ok(ConnAck {
        session_present,
        code,
    })
}

fn decode_publish(flags: u8, mut r: Reader) -> Result<Publish> {
    // FixedHeader::parse already rejected QoS 3 and DUP on QoS 0.
    let qos = QoS::try_from((flags >> 1) & 0b11)?;
    let topic = r.string("PUBLISH truncated in topic name")?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        r.packet_id("PUBLISH truncated in packet identifier")?
    };
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        payload: r.0,
    })
}

fn decode_packet_id_only(r: &mut Reader) -> Result<u16> {
    r.expect_len(2, "remaining length must be 2")?;
    r.packet_id("truncated packet identifier")
}

fn decode_subscribe(r: &mut Reader) -> Result<Subscribe> {
    let packet_id = r.packet_id("SUBSCRIBE truncated in packet identifier")?;
    let mut filters = Vec::new();
    while !r.0.is_empty() {
        let filter = r.string("SUBSCRIBE truncated in topic filter")?;
        let requested = r.u8("SUBSCRIBE truncated in requested QoS")?;
        if requested & 0xFC != 0 {
            return Err(DecodeError::MalformedPacket(
                "SUBSCRIBE requested QoS reserved bits must be 0",
            ));
        }
        filters.push((filter, QoS::try_from(requested)?));
    }
    if filters.is_empty() {
        return Err(DecodeError::MalformedPacket(
            "SUBSCRIBE without topic filters",
        ));
    }
    Ok(Subscribe { packet_id, filters })
}

fn decode_suback(r: &mut Reader) -> Result<SubAck> {
    let packet_id = r.packet_id("SUBACK truncated in packet identifier")?;
    let return_codes = std::mem::take(&mut r.0)
        .iter()
        .map(|&code| match code {
            0x80 => Ok(SubscribeReturnCode::Failure),
            0..=2 => QoS::try_from(code).map(SubscribeReturnCode::Success),
            _ => Err(DecodeError::MalformedPacket(
                "SUBACK return code is reserved",
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    if return_codes.is_empty() {
        return Err(DecodeError::MalformedPacket("SUBACK without return codes"));
    }
    Ok(SubAck {
        packet_id,
        return_codes,
    })
}

fn decode_unsubscribe(r: &mut Reader) -> Result<Unsubscribe> {
    let packet_id = r.packet_id("UNSUBSCRIBE truncated in packet identifier")?;
    let mut filters = Vec::new();
    while !r.0.is_empty() {
        filters.push(r.string("UNSUBSCRIBE truncated in topic filter")?);
    }
    if filters.is_empty() {
        return Err(DecodeError::MalformedPacket(
            "UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(Unsubscribe { packet_id, filters })
}

/// Cursor over one packet's variable header and payload; it can never read
/// past the remaining length because it owns exactly those bytes.
struct Reader(Bytes);

impl Reader {
    fn expect_len(&self, len: usize, err: &'static str) -> Result<()> {
        if self.0.len() == len {
            Ok(())
        } else {
            Err(DecodeError::MalformedPacket(err))
        }
    }

    fn u8(&mut self, err: &'static str) -> Result<u8> {
        self.0
            .try_get_u8()
            .map_err(|_| DecodeError::MalformedPacket(err))
    }

    fn u16(&mut self, err: &'static str) -> Result<u16> {
        self.0
            .try_get_u16()
            .map_err(|_| DecodeError::MalformedPacket(err))
    }

    fn packet_id(&mut self, err: &'static str) -> Result<u16> {
        match self.u16(err)? {
            0 => Err(DecodeError::MalformedPacket(
                "packet identifier must not be 0",
            )),
            id => Ok(id),
        }
    }

    fn binary(&mut self, err: &'static str) -> Result<Bytes> {
        let len = usize::from(self.u16(err)?);
        if self.0.len() < len {
            return Err(DecodeError::MalformedPacket(err));
        }
        Ok(self.0.split_to(len))
    }

    fn string(&mut self, err: &'static str) -> Result<String> {
        let bytes = self.binary(err)?;
        let s = std::str::from_utf8(&bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(DecodeError::MalformedPacket("string contains U+0000"));
        }
        Ok(s.to_owned())
    }
}
