//! Adapter that lets `tokio_util::codec::Framed` speak MQTT through [`decode`] and [`encode`].

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::{decode, encode, DecodeError, EncodeError, Packet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttCodec {
    /// Largest whole packet (fixed header included) accepted from the peer.
    pub max_packet_size: usize,
}

impl MqttCodec {
    pub fn new(max_packet_size: usize) -> Self {
        MqttCodec { max_packet_size }
    }
}

impl Decoder for MqttCodec {
    type Item = Packet;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        decode(src, self.max_packet_size)
    }
}

impl Encoder<Packet> for MqttCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        encode(&item, dst)
    }
}

impl Encoder<&Packet> for MqttCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: &Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        encode(item, dst)
    }
}
