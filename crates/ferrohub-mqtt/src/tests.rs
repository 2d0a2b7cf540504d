//! Wire-level tests of decode and encode together: exact bytes, limits, every rejection rule.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::*;

const MAX: usize = 256 * 1024;

fn encoded(packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(packet, &mut buf).expect("encodable packet");
    buf
}

fn decode_all(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let result = decode(&mut buf, MAX);
    if let Ok(Some(_)) = result {
        assert!(buf.is_empty(), "packet left {} bytes behind", buf.len());
    }
    result
}

fn assert_malformed(bytes: &[u8]) {
    match decode_all(bytes) {
        Err(DecodeError::MalformedPacket(_)) => {}
        other => panic!("expected MalformedPacket for {bytes:02x?}, got {other:?}"),
    }
}

fn publish(qos: QoS, packet_id: u16, topic: &str, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_owned(),
        packet_id,
        payload: Bytes::from_static(payload),
    }
}

fn iot_hub_connect() -> Connect {
    Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: false,
        keep_alive: 60,
        client_id: "dev1".into(),
        will: None,
        username: Some("localhost/dev1/?api-version=2021-04-12".into()),
        password: Some(Bytes::from_static(
            b"SharedAccessSignature sr=localhost%2Fdevices%2Fdev1&sig=c2lnbmF0dXJl&se=1700000000",
        )),
    }
}

/// One or more samples of every packet type, including every optional field.
fn samples() -> Vec<Packet> {
    vec![
        Packet::Connect(iot_hub_connect()),
        Packet::Connect(Connect {
            protocol_name: "MQIsdp".into(),
            protocol_level: 3,
            clean_session: true,
            keep_alive: 0,
            client_id: String::new(),
            will: Some(LastWill {
                topic: "last/will".into(),
                payload: Bytes::from_static(b"\x00\xffbye"),
                qos: QoS::ExactlyOnce,
                retain: true,
            }),
            username: None,
            password: None,
        }),
        Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 5,
            clean_session: true,
            keep_alive: u16::MAX,
            client_id: "ünïcødé-☃".into(),
            will: Some(LastWill {
                topic: "w".into(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
            }),
            username: Some(String::new()),
            password: Some(Bytes::new()),
        }),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: ConnectReturnCode::Accepted,
        }),
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::NotAuthorized,
        }),
        Packet::Publish(publish(QoS::AtMostOnce, 0, "a/b", b"")),
        Packet::Publish(Publish {
            dup: true,
            retain: true,
            ..publish(
                QoS::AtLeastOnce,
                1,
                "devices/dev1/messages/events/",
                b"hello",
            )
        }),
        Packet::Publish(publish(QoS::ExactlyOnce, u16::MAX, "", &[0u8; 300])),
        Packet::PubAck(1),
        Packet::PubRec(2),
        Packet::PubRel(3),
        Packet::PubComp(u16::MAX),
        Packet::Subscribe(Subscribe {
            packet_id: 7,
            filters: vec![
                (
                    "devices/dev1/messages/devicebound/#".into(),
                    QoS::AtLeastOnce,
                ),
                ("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
                ("+/x".into(), QoS::ExactlyOnce),
            ],
        }),
        Packet::SubAck(SubAck {
            packet_id: 7,
            return_codes: vec![
                SubscribeReturnCode::Success(QoS::AtLeastOnce),
                SubscribeReturnCode::Success(QoS::AtMostOnce),
                SubscribeReturnCode::Success(QoS::ExactlyOnce),
                SubscribeReturnCode::Failure,
            ],
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 8,
            filters: vec!["a/#".into(), "b".into()],
        }),
        Packet::UnsubAck(8),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect,
    ]
}

#[test]
fn every_packet_type_round_trips() {
    let samples = samples();
    let mut types = std::collections::HashSet::new();
    for packet in samples {
        let bytes = encoded(&packet);
        types.insert(bytes[0] >> 4);
        assert_eq!(decode_all(&bytes).unwrap(), Some(packet));
    }
    assert_eq!(types.len(), 14, "a packet type is missing from samples()");
}

fn iot_hub_connect_bytes() -> Vec<u8> {
    let mut b = vec![0x10, 0x8C, 0x01]; // CONNECT, remaining length 140
    b.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04]);
    b.push(0b1100_0000); // username + password, clean session 0, no will
    b.extend_from_slice(&[0x00, 0x3C]); // keep alive 60
    b.extend_from_slice(&[0x00, 0x04]);
    b.extend_from_slice(b"dev1");
    b.extend_from_slice(&[0x00, 0x26]);
    b.extend_from_slice(b"localhost/dev1/?api-version=2021-04-12");
    b.extend_from_slice(&[0x00, 0x52]);
    b.extend_from_slice(
        b"SharedAccessSignature sr=localhost%2Fdevices%2Fdev1&sig=c2lnbmF0dXJl&se=1700000000",
    );
    b
}

#[test]
fn hand_built_iot_hub_connect_decodes_and_encodes_byte_exact() {
    let bytes = iot_hub_connect_bytes();
    assert_eq!(bytes.len(), 3 + 140);
    let expected = Packet::Connect(iot_hub_connect());
    assert_eq!(decode_all(&bytes).unwrap(), Some(expected.clone()));
    assert_eq!(&encoded(&expected)[..], &bytes[..]);
}

#[test]
fn hand_built_qos1_publish_decodes_and_encodes_byte_exact() {
    let mut bytes = vec![0x32, 38, 0x00, 29];
    bytes.extend_from_slice(b"devices/dev1/messages/events/");
    bytes.extend_from_slice(&[0x12, 0x34]);
    bytes.extend_from_slice(b"hello");
    let expected = Packet::Publish(publish(
        QoS::AtLeastOnce,
        0x1234,
        "devices/dev1/messages/events/",
        b"hello",
    ));
    assert_eq!(decode_all(&bytes).unwrap(), Some(expected.clone()));
    assert_eq!(&encoded(&expected)[..], &bytes[..]);
}

#[test]
fn publish_payload_is_a_zero_copy_slice_of_the_input() {
    let bytes = encoded(&Packet::Publish(publish(
        QoS::AtMostOnce,
        0,
        "t",
        b"payload",
    )));
    let mut buf = bytes.clone();
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, MAX).unwrap() else {
        panic!("not a publish");
    };
    assert_eq!(p.payload.as_ptr() as usize, base + bytes.len() - 7);
}

#[test]
fn every_strict_prefix_needs_more_bytes_and_leaves_buf_untouched() {
    for packet in samples() {
        let bytes = encoded(&packet);
        for len in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..len]);
            assert_eq!(
                decode(&mut buf, MAX).unwrap(),
                None,
                "prefix {len} of {packet:?}"
            );
            assert_eq!(&buf[..], &bytes[..len]);
        }
    }
}

#[test]
fn oversize_is_detected_from_the_fixed_header_alone() {
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    match decode(&mut buf, MAX) {
        Err(DecodeError::PacketTooLarge { size, max }) => {
            assert_eq!(size, 1 + 4 + MAX_REMAINING_LENGTH);
            assert_eq!(max, MAX);
        }
        other => panic!("expected PacketTooLarge, got {other:?}"),
    }
    // Nothing was reserved for a body that will never be accepted.
    assert!(buf.capacity() < 64);
}

#[test]
fn max_packet_size_counts_the_fixed_header() {
    let bytes = encoded(&Packet::Publish(publish(
        QoS::AtMostOnce,
        0,
        "t",
        &[7; 200],
    )));
    let total = bytes.len();
    assert_eq!(total, 1 + 2 + 3 + 200);
    assert!(decode(&mut bytes.clone(), total).unwrap().is_some());
    match decode(&mut bytes.clone(), total - 1) {
        Err(DecodeError::PacketTooLarge { size, max }) => {
            assert_eq!((size, max), (total, total - 1))
        }
        other => panic!("expected PacketTooLarge, got {other:?}"),
    }
}

#[test]
fn four_byte_remaining_length_is_accepted() {
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00][..]);
    assert_eq!(decode(&mut buf, usize::MAX).unwrap(), None);
    assert_eq!(buf.len(), 6);
}

#[test]
fn fifth_remaining_length_byte_is_malformed_even_before_it_arrives() {
    for bytes in [
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF][..],
        &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01][..],
    ] {
        assert!(matches!(
            decode_all(bytes),
            Err(DecodeError::MalformedRemainingLength)
        ));
    }
}

#[test]
fn non_minimal_remaining_length_is_tolerated() {
    // 3.1.1 does not forbid it; encode always emits the minimal form.
    assert_eq!(
        decode_all(&[0xC0, 0x80, 0x00]).unwrap(),
        Some(Packet::PingReq)
    );
}

#[test]
fn remaining_length_uses_the_fewest_bytes() {
    // PUBLISH "t" QoS 0 has 3 bytes of topic before the payload.
    for (remaining, header_len) in [
        (127, 2),
        (128, 3),
        (16_383, 3),
        (16_384, 4),
        (2_097_151, 4),
        (2_097_152, 5),
    ] {
        let packet = Packet::Publish(Publish {
            payload: Bytes::from(vec![0u8; remaining - 3]),
            ..publish(QoS::AtMostOnce, 0, "t", b"")
        });
        let bytes = encoded(&packet);
        assert_eq!(bytes.len(), header_len + remaining, "remaining {remaining}");
        let mut buf = bytes.clone();
        assert_eq!(decode(&mut buf, usize::MAX).unwrap(), Some(packet));
    }
}

#[test]
fn reserved_packet_types_are_rejected() {
    for byte in [0x00, 0xF0] {
        assert!(matches!(
            decode_all(&[byte, 0]),
            Err(DecodeError::InvalidPacketType(t)) if t == byte >> 4
        ));
    }
}

#[test]
fn wrong_fixed_header_flags_are_rejected_for_every_non_publish_type() {
    for packet_type in [1u8, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14] {
        let required = if matches!(packet_type, 6 | 8 | 10) {
            0b0010
        } else {
            0
        };
        for flags in (0u8..16).filter(|&f| f != required) {
            // Rejected from the first byte alone, before any length arrives.
            let mut buf = BytesMut::from(&[(packet_type << 4) | flags][..]);
            match decode(&mut buf, MAX) {
                Err(DecodeError::InvalidFlags {
                    packet_type: t,
                    flags: f,
                }) => assert_eq!((t, f), (packet_type, flags)),
                other => panic!("type {packet_type} flags {flags:04b}: got {other:?}"),
            }
        }
    }
}

#[test]
fn publish_with_qos_3_is_invalid_qos() {
    for flags in [0b0110, 0b0111, 0b1110, 0b1111] {
        assert!(matches!(
            decode_all(&[0x30 | flags, 3, 0, 1, b't']),
            Err(DecodeError::InvalidQoS(3))
        ));
    }
}

#[test]
fn qos0_publish_with_dup_is_malformed() {
    assert_malformed(&[0x38, 3, 0, 1, b't']);
}

#[test]
fn qos1_publish_with_packet_id_0_is_malformed() {
    assert_malformed(&[0x32, 5, 0, 1, b't', 0, 0]);
}

#[test]
fn publish_topic_running_past_remaining_length_is_malformed() {
    assert_malformed(&[0x30, 3, 0, 5, b't']);
    assert_malformed(&[0x32, 3, 0, 1, b't']); // no room for the packet id
    assert_malformed(&[0x30, 1, 0]);
}

#[test]
fn qos0_publish_may_have_empty_payload_and_the_rest_is_payload() {
    assert_eq!(
        decode_all(&[0x31, 4, 0, 1, b't', 0]).unwrap(),
        Some(Packet::Publish(Publish {
            retain: true,
            ..publish(QoS::AtMostOnce, 0, "t", b"\0")
        }))
    );
}

/// CONNECT bytes with the given protocol name, level, flags and payload.
fn connect_bytes(name: &[u8], level: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u16(name.len() as u16);
    body.extend_from_slice(name);
    body.push(level);
    body.push(flags);
    body.put_u16(30);
    body.extend_from_slice(payload);
    let mut b = vec![0x10, body.len() as u8];
    b.extend_from_slice(&body);
    b
}

#[test]
fn connect_with_unknown_protocol_name_is_invalid_protocol() {
    for name in [&b"MQTS"[..], b"mqtt", b"MQIsdpX", b""] {
        assert!(matches!(
            decode_all(&connect_bytes(name, 4, 0, b"\0\0")),
            Err(DecodeError::InvalidProtocol)
        ));
    }
}

#[test]
fn connect_with_any_protocol_level_decodes_so_the_server_can_refuse_it() {
    for (name, level) in [
        (&b"MQTT"[..], 4u8),
        (b"MQTT", 3),
        (b"MQTT", 5),
        (b"MQIsdp", 3),
    ] {
        let Some(Packet::Connect(c)) = decode_all(&connect_bytes(name, level, 0, b"\0\0")).unwrap()
        else {
            panic!("not a connect");
        };
        assert_eq!(c.protocol_level, level);
        assert_eq!(c.protocol_name.as_bytes(), name);
        assert_eq!(c.client_id, "");
        assert_eq!(c.keep_alive, 30);
    }
}

#[test]
fn connect_reserved_flag_is_malformed() {
    assert_malformed(&connect_bytes(b"MQTT", 4, 0x01, b"\0\0"));
}

#[test]
fn connect_will_qos_or_retain_without_will_flag_is_malformed() {
    for flags in [0x08, 0x10, 0x20] {
        assert_malformed(&connect_bytes(b"MQTT", 4, flags, b"\0\0"));
    }
}

#[test]
fn connect_will_qos_3_is_invalid_qos() {
    let payload = b"\0\0\0\x01w\0\0";
    assert!(matches!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x04 | 0x18, payload)),
        Err(DecodeError::InvalidQoS(3))
    ));
}

#[test]
fn connect_password_without_username_is_malformed() {
    assert_malformed(&connect_bytes(b"MQTT", 4, 0x40, b"\0\0\0\x01p"));
}

#[test]
fn connect_invalid_utf8_is_rejected() {
    assert!(matches!(
        decode_all(&connect_bytes(b"MQTT", 4, 0, b"\0\x02\xC3\x28")),
        Err(DecodeError::InvalidUtf8)
    ));
    // An encoded surrogate half is not UTF-8 either.
    assert!(matches!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x80, b"\0\0\0\x03\xED\xA0\x80")),
        Err(DecodeError::InvalidUtf8)
    ));
}

#[test]
fn connect_string_with_nul_character_is_malformed() {
    assert_malformed(&connect_bytes(b"MQTT", 4, 0, b"\0\x03a\0b"));
}

#[test]
fn connect_fields_running_past_remaining_length_are_malformed() {
    let mut full = iot_hub_connect_bytes();
    // Shrink the remaining length (and the buffer) one byte at a time: every
    // cut lands inside some field.
    for cut in 1..140 {
        full.truncate(3 + 140 - cut);
        let mut b = vec![0x10];
        let len = 140 - cut;
        if len >= 128 {
            b.extend_from_slice(&[(len as u8 & 0x7F) | 0x80, 1]);
        } else {
            b.push(len as u8);
        }
        b.extend_from_slice(&full[3..]);
        match decode_all(&b) {
            Err(DecodeError::MalformedPacket(_)) => {}
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn connect_trailing_bytes_are_malformed() {
    assert_malformed(&connect_bytes(b"MQTT", 4, 0, b"\0\0X"));
}

#[test]
fn connack_rules() {
    assert_malformed(&[0x20, 2, 0x02, 0]); // reserved acknowledge flag
    assert_malformed(&[0x20, 2, 0x00, 6]); // reserved return code
    assert_malformed(&[0x20, 2, 0x01, 5]); // session present on refusal
    assert_malformed(&[0x20, 1, 0x00]);
    assert_malformed(&[0x20, 3, 0x00, 0, 0]);
}

#[test]
fn fixed_length_acks_need_remaining_length_2_and_nonzero_id() {
    for byte in [0x40, 0x50, 0x62, 0x70, 0xB0] {
        assert_malformed(&[byte, 0]);
        assert_malformed(&[byte, 1, 1]);
        assert_malformed(&[byte, 3, 0, 1, 0]);
        assert_malformed(&[byte, 2, 0, 0]);
    }
}

#[test]
fn empty_packets_need_remaining_length_0() {
    for byte in [0xC0, 0xD0, 0xE0] {
        assert_malformed(&[byte, 1, 0]);
    }
}

#[test]
fn subscribe_rules() {
    assert_malformed(&[0x82, 2, 0, 1]); // no filters
    assert_malformed(&[0x82, 6, 0, 1, 0, 1, b'a', 0x04]); // reserved QoS bits
    assert_malformed(&[0x82, 6, 0, 1, 0, 1, b'a', 0x81]);
    assert_malformed(&[0x82, 5, 0, 1, 0, 1, b'a']); // missing QoS byte
    assert_malformed(&[0x82, 6, 0, 0, 0, 1, b'a', 0]); // packet id 0
    assert_malformed(&[0x82, 6, 0, 1, 0, 2, b'a', 0]); // filter runs past end
    assert!(matches!(
        decode_all(&[0x82, 6, 0, 1, 0, 1, b'a', 3]),
        Err(DecodeError::InvalidQoS(3))
    ));
}

#[test]
fn suback_rules() {
    assert_malformed(&[0x90, 2, 0, 1]); // no return codes
    assert_malformed(&[0x90, 3, 0, 1, 3]);
    assert_malformed(&[0x90, 3, 0, 1, 0x81]);
}

#[test]
fn unsubscribe_rules() {
    assert_malformed(&[0xA2, 2, 0, 1]); // no filters
    assert_malformed(&[0xA2, 4, 0, 1, 0, 1]); // filter runs past end
    assert_malformed(&[0xA2, 3, 0, 1, 0]);
}

#[test]
fn back_to_back_packets_decode_one_at_a_time() {
    let first = Packet::Publish(publish(QoS::AtLeastOnce, 9, "a", b"one"));
    let second = Packet::PingReq;
    let mut buf = encoded(&first);
    buf.extend_from_slice(&encoded(&second));
    buf.extend_from_slice(&[0x30]); // start of a third, incomplete packet
    assert_eq!(decode(&mut buf, MAX).unwrap(), Some(first));
    assert_eq!(decode(&mut buf, MAX).unwrap(), Some(second));
    assert_eq!(decode(&mut buf, MAX).unwrap(), None);
    assert_eq!(&buf[..], &[0x30]);
}

#[test]
fn qos_try_from_u8() {
    assert_eq!(QoS::try_from(0).unwrap(), QoS::AtMostOnce);
    assert_eq!(QoS::try_from(1).unwrap(), QoS::AtLeastOnce);
    assert_eq!(QoS::try_from(2).unwrap(), QoS::ExactlyOnce);
    assert!(matches!(QoS::try_from(3), Err(DecodeError::InvalidQoS(3))));
    assert!(QoS::AtMostOnce < QoS::ExactlyOnce);
}

fn assert_encode_fails(packet: Packet, check: impl Fn(&EncodeError) -> bool) {
    let mut buf = BytesMut::from(&b"prefix"[..]);
    match encode(&packet, &mut buf) {
        Err(e) if check(&e) => {}
        other => panic!("{packet:?}: unexpected {other:?}"),
    }
    assert_eq!(&buf[..], b"prefix", "encode wrote bytes before failing");
}

#[test]
fn encode_refuses_what_decode_would_reject() {
    let invalid = |e: &EncodeError| matches!(e, EncodeError::InvalidPacket(_));
    assert_encode_fails(
        Packet::Publish(Publish {
            dup: true,
            ..publish(QoS::AtMostOnce, 0, "t", b"")
        }),
        invalid,
    );
    assert_encode_fails(
        Packet::Publish(publish(QoS::AtMostOnce, 5, "t", b"")),
        invalid,
    );
    assert_encode_fails(
        Packet::Publish(publish(QoS::AtLeastOnce, 0, "t", b"")),
        invalid,
    );
    assert_encode_fails(Packet::PubAck(0), invalid);
    assert_encode_fails(Packet::PubRel(0), invalid);
    assert_encode_fails(Packet::UnsubAck(0), invalid);
    assert_encode_fails(
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![],
        }),
        invalid,
    );
    assert_encode_fails(
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec![],
        }),
        invalid,
    );
    assert_encode_fails(
        Packet::SubAck(SubAck {
            packet_id: 1,
            return_codes: vec![],
        }),
        invalid,
    );
    assert_encode_fails(
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: ConnectReturnCode::BadUserNameOrPassword,
        }),
        invalid,
    );
    assert_encode_fails(
        Packet::Connect(Connect {
            username: None,
            ..iot_hub_connect()
        }),
        invalid,
    );
    assert_encode_fails(
        Packet::Connect(Connect {
            protocol_name: "MQTT5".into(),
            ..iot_hub_connect()
        }),
        invalid,
    );
    assert_encode_fails(
        Packet::Connect(Connect {
            client_id: "a\0b".into(),
            ..iot_hub_connect()
        }),
        |e| matches!(e, EncodeError::InvalidString),
    );
}

#[test]
fn encode_refuses_fields_longer_than_their_length_prefix() {
    let long = "x".repeat(65_536);
    assert_encode_fails(
        Packet::Publish(publish(QoS::AtMostOnce, 0, &long, b"")),
        |e| matches!(e, EncodeError::StringTooLong),
    );
    assert_encode_fails(
        Packet::Connect(Connect {
            password: Some(Bytes::from(vec![0; 65_536])),
            ..iot_hub_connect()
        }),
        |e| matches!(e, EncodeError::BinaryTooLong),
    );
    // The longest legal string still works.
    let max = "x".repeat(65_535);
    let packet = Packet::Publish(publish(QoS::AtMostOnce, 0, &max, b""));
    assert_eq!(decode_all(&encoded(&packet)).unwrap(), Some(packet));
}

#[test]
fn encode_refuses_remaining_length_over_the_4_byte_limit() {
    // Zeroed allocation: the pages are never touched because encode refuses first.
    let payload = Bytes::from(vec![0u8; MAX_REMAINING_LENGTH - 3 + 1]);
    assert_encode_fails(
        Packet::Publish(Publish {
            payload,
            ..publish(QoS::AtMostOnce, 0, "t", b"")
        }),
        |e| matches!(e, EncodeError::PayloadTooLarge),
    );
}

#[test]
fn codec_wraps_decode_and_encode() {
    let mut codec = MqttCodec::new(MAX);
    let mut buf = BytesMut::new();
    for packet in samples() {
        Encoder::<&Packet>::encode(&mut codec, &packet, &mut buf).unwrap();
        Encoder::<Packet>::encode(&mut codec, packet, &mut buf).unwrap();
    }
    for packet in samples() {
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(packet.clone()));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(packet));
    }
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    let mut small = MqttCodec::new(3);
    let mut buf = encoded(&Packet::PubAck(1));
    assert!(matches!(
        small.decode(&mut buf),
        Err(DecodeError::PacketTooLarge { size: 4, max: 3 })
    ));
}

/// Deterministic xorshift so the property tests need no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn qos(&mut self) -> QoS {
        [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][self.below(3)]
    }
    fn id(&mut self) -> u16 {
        1 + self.below(usize::from(u16::MAX)) as u16
    }
    fn string(&mut self) -> String {
        const CHARS: &[char] = &['a', '/', '#', '+', '$', 'é', '☃', '𝄞', ' '];
        (0..self.below(20))
            .map(|_| CHARS[self.below(CHARS.len())])
            .collect()
    }
    fn bytes(&mut self) -> Bytes {
        (0..self.below(40)).map(|_| self.next() as u8).collect()
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        self.bool().then(|| f(self))
    }

    fn packet(&mut self) -> Packet {
        match self.below(14) {
            0 => {
                let username = self.opt(Rng::string);
                let password = if username.is_some() {
                    self.opt(Rng::bytes)
                } else {
                    None
                };
                Packet::Connect(Connect {
                    protocol_name: if self.bool() { "MQTT" } else { "MQIsdp" }.into(),
                    protocol_level: self.next() as u8,
                    clean_session: self.bool(),
                    keep_alive: self.next() as u16,
                    client_id: self.string(),
                    will: self.opt(|r| LastWill {
                        topic: r.string(),
                        payload: r.bytes(),
                        qos: r.qos(),
                        retain: r.bool(),
                    }),
                    username,
                    password,
                })
            }
            1 => {
                let code = ConnectReturnCode::from_u8(self.below(6) as u8).unwrap();
                Packet::ConnAck(ConnAck {
                    session_present: code == ConnectReturnCode::Accepted && self.bool(),
                    code,
                })
            }
            2 => {
                let qos = self.qos();
                let at_most_once = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: !at_most_once && self.bool(),
                    qos,
                    retain: self.bool(),
                    topic: self.string(),
                    packet_id: if at_most_once { 0 } else { self.id() },
                    payload: self.bytes(),
                })
            }
            3 => Packet::PubAck(self.id()),
            4 => Packet::PubRec(self.id()),
            5 => Packet::PubRel(self.id()),
            6 => Packet::PubComp(self.id()),
            7 => Packet::Subscribe(Subscribe {
                packet_id: self.id(),
                filters: (0..=self.below(5))
                    .map(|_| (self.string(), self.qos()))
                    .collect(),
            }),
            8 => Packet::SubAck(SubAck {
                packet_id: self.id(),
                return_codes: (0..=self.below(5))
                    .map(|_| {
                        if self.below(4) == 0 {
                            SubscribeReturnCode::Failure
                        } else {
                            SubscribeReturnCode::Success(self.qos())
                        }
                    })
                    .collect(),
            }),
            9 => Packet::Unsubscribe(Unsubscribe {
                packet_id: self.id(),
                filters: (0..=self.below(5)).map(|_| self.string()).collect(),
            }),
            10 => Packet::UnsubAck(self.id()),
            11 => Packet::PingReq,
            12 => Packet::PingResp,
            _ => Packet::Disconnect,
        }
    }
}

#[test]
fn random_packets_survive_a_stream_cut_into_random_chunks() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..200 {
        let packets: Vec<Packet> = (0..10).map(|_| rng.packet()).collect();
        let mut stream = BytesMut::new();
        for p in &packets {
            encode(p, &mut stream).unwrap();
        }
        // Feed the stream in random-sized chunks, as a socket would.
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        while !stream.is_empty() {
            let n = 1 + rng.below(stream.len().min(64));
            buf.extend_from_slice(&stream.split_to(n));
            while let Some(p) = decode(&mut buf, MAX).unwrap() {
                decoded.push(p);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(decoded, packets);
    }
}

#[test]
fn mutated_packets_never_panic_and_whatever_decodes_round_trips() {
    let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
    for _ in 0..20_000 {
        let mut bytes = encoded(&rng.packet()).to_vec();
        for _ in 0..=rng.below(3) {
            let i = rng.below(bytes.len());
            bytes[i] = rng.next() as u8;
        }
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(packet)) = decode(&mut buf, 1024) {
            let again = encoded(&packet);
            assert_eq!(decode_all(&again).unwrap(), Some(packet));
        }
    }
}
