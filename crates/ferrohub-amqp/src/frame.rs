//! Frames (part 2.3): the 8-byte header, size checked against the negotiated maximum before
//! the body is read, and the protocol headers that open a connection or its SASL layer.

use thiserror::Error;

use crate::value::{DecodeError, Value};

/// `AMQP 0 1.0.0`: plain AMQP.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// `AMQP 3 1.0.0`: the SASL layer first.
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// `AMQP 2 1.0.0`: the TLS layer inside AMQP (not offered: TLS starts at once on 5671).
pub const TLS_HEADER: [u8; 8] = *b"AMQP\x02\x01\x00\x00";
/// Every peer must accept frames of this size before Open has negotiated one.
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Amqp,
    Sasl,
}

/// One decoded frame: its channel, the performative (None for an empty heartbeat frame) and
/// whatever bytes follow it (a transfer's payload).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub kind: FrameKind,
    pub channel: u16,
    pub body: Option<Value>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes is larger than the {max} allowed")]
    TooLarge { size: u32, max: u32 },
    #[error("malformed frame header")]
    Header,
    #[error("unknown frame type {0}")]
    Type(u8),
    #[error("malformed frame body: {0}")]
    Body(#[from] DecodeError),
}

/// The frame size the 8-byte header `head` announces, checked against `max`.
pub fn frame_size(head: &[u8; 8], max: u32) -> Result<u32, FrameError> {
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if size < 8 || head[4] < 2 || u32::from(head[4]) * 4 > size {
        return Err(FrameError::Header);
    }
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    Ok(size)
}

/// Decodes a whole frame (header included), whose size [`frame_size`] checked.
pub fn decode(frame: &[u8]) -> Result<Frame, FrameError> {
    if frame.len() < 8 {
        return Err(FrameError::Header);
    }
    let doff = usize::from(frame[4]) * 4;
    let kind = match frame[5] {
        0 => FrameKind::Amqp,
        1 => FrameKind::Sasl,
        t => return Err(FrameError::Type(t)),
    };
    let channel = u16::from_be_bytes([frame[6], frame[7]]);
    let mut rest = frame.get(doff..).ok_or(FrameError::Header)?;
    if rest.is_empty() {
        return Ok(Frame {
            kind,
            channel,
            body: None,
            payload: Vec::new(),
        });
    }
    let body = Value::decode(&mut rest)?;
    Ok(Frame {
        kind,
        channel,
        body: Some(body),
        payload: rest.to_vec(),
    })
}

/// Encodes a frame; `body` None is the empty (heartbeat) frame.
pub fn encode(kind: FrameKind, channel: u16, body: Option<&Value>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + TRANSFER_OVERHEAD);
    encode_into(&mut out, kind, channel, body, payload);
    out
}

/// [`encode`], appending the frame to `out` (several frames for one write, no copy).
pub fn encode_into(
    out: &mut Vec<u8>,
    kind: FrameKind,
    channel: u16,
    body: Option<&Value>,
    payload: &[u8],
) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, 2, kind_byte(kind)]);
    out.extend_from_slice(&channel.to_be_bytes());
    if let Some(b) = body {
        b.encode(out);
    }
    out.extend_from_slice(payload);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

fn kind_byte(k: FrameKind) -> u8 {
    match k {
        FrameKind::Amqp => 0,
        FrameKind::Sasl => 1,
    }
}

/// Bytes a transfer frame's header and performative take at most, so payload chunks can be
/// sized to fit the peer's max frame size.
pub const TRANSFER_OVERHEAD: usize = 8 + 96;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_sizes_are_checked() {
        let body = Value::described(0x10, Value::List(vec![Value::str("c")]));
        let bytes = encode(FrameKind::Amqp, 3, Some(&body), b"xyz");
        let head: [u8; 8] = bytes[..8].try_into().unwrap_or_default();
        assert_eq!(frame_size(&head, 1024), Ok(bytes.len() as u32));
        assert!(matches!(
            frame_size(&head, 8),
            Err(FrameError::TooLarge { .. })
        ));
        let f = decode(&bytes);
        assert_eq!(
            f,
            Ok(Frame {
                kind: FrameKind::Amqp,
                channel: 3,
                body: Some(body),
                payload: b"xyz".to_vec()
            })
        );
        let empty = encode(FrameKind::Amqp, 0, None, &[]);
        assert_eq!(empty, vec![0, 0, 0, 8, 2, 0, 0, 0]);
    }
}
