//! Why bytes could not become a packet, or a packet could not become bytes.

/// A decode error means the peer broke the protocol (or the transport failed);
/// MQTT 3.1.1 requires closing the connection, so there is no recovery path.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    #[error("invalid control packet type {0}")]
    InvalidPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for packet type {packet_type}")]
    InvalidFlags { packet_type: u8, flags: u8 },
    #[error("unsupported protocol name")]
    InvalidProtocol,
    #[error("invalid QoS {0}")]
    InvalidQoS(u8),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("malformed packet: {0}")]
    MalformedPacket(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// An encode error means the caller built a packet that cannot be represented
/// on the wire, or that no conforming peer would accept.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("packet exceeds the maximum remaining length of 268435455 bytes")]
    PayloadTooLarge,
    #[error("string longer than 65535 bytes")]
    StringTooLong,
    #[error("binary field longer than 65535 bytes")]
    BinaryTooLong,
    #[error("string contains U+0000")]
    InvalidString,
    #[error("invalid packet: {0}")]
    InvalidPacket(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
