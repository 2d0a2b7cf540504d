//! MQTT 3.1.1 codec: bytes to packets and back, for both server and client side.
//!
//! It validates everything MQTT 3.1.1 says about the wire format (fixed
//! header flags, lengths, UTF-8, packet identifiers, CONNECT flag rules) and
//! nothing above it: topic name/filter syntax, protocol level acceptance and
//! authentication belong to whoever uses the packets.
//!
//! ```
//! use bytes::BytesMut;
//! use ferrohub_mqtt::{decode, encode, Packet};
//!
//! let mut buf = BytesMut::new();
//! encode(&Packet::PubAck(7), &mut buf)?;
//! assert_eq!(&buf[..], &[0x40, 0x02, 0x00, 0x07]);
//! assert_eq!(decode(&mut buf, 256 * 1024)?, Some(Packet::PubAck(7)));
//! assert!(buf.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod codec;
mod decode;
mod encode;
mod error;
mod packet;

pub use codec::MqttCodec;
pub use decode::decode;
pub use encode::encode;
pub use error::{DecodeError, EncodeError};
pub use packet::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, Publish, QoS, SubAck, Subscribe,
    SubscribeReturnCode, Unsubscribe, MAX_REMAINING_LENGTH,
};

#[cfg(test)]
mod tests;
