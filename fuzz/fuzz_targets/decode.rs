//! Fuzz target: arbitrary bytes must never panic the decoder, and every
//! packet it accepts must survive encode and decode unchanged.
#![no_main]

use bytes::BytesMut;
use ferrohub_mqtt::{decode, encode};
use libfuzzer_sys::fuzz_target;

const MAX_PACKET_SIZE: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decode(&mut buf, MAX_PACKET_SIZE) {
        let mut encoded = BytesMut::new();
        encode(&packet, &mut encoded).expect("a decoded packet must encode");
        // Re-encoding is minimal, so it can never outgrow what was accepted.
        let again = decode(&mut encoded, MAX_PACKET_SIZE)
            .expect("an encoded packet must decode")
            .expect("an encoded packet must be complete");
        assert_eq!(again, packet);
        assert!(encoded.is_empty(), "encode wrote more than one packet");
    }
});
