//! Fuzz target: arbitrary bytes as AMQP frames must never panic the codec (frame header,
//! values, performatives, SASL frames, message sections), and every value it accepts must
//! re-encode to bytes that decode to the same encoding again.
#![no_main]

use ferrohub_amqp::frame::{decode, frame_size};
use ferrohub_amqp::{Message, Performative, SaslFrame, Value};
use libfuzzer_sys::fuzz_target;

const MAX_FRAME_SIZE: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= 8 {
        let head: [u8; 8] = rest[..8].try_into().expect("8 bytes");
        let Ok(size) = frame_size(&head, MAX_FRAME_SIZE) else { return };
        let size = size as usize;
        if rest.len() < size {
            return;
        }
        let (frame, tail) = rest.split_at(size);
        rest = tail;
        let Ok(f) = decode(frame) else { continue };
        if let Some(body) = &f.body {
            let _ = Performative::decode(body);
            let _ = SaslFrame::decode(body);
            // Encoding may pick other (compact) forms, but must be stable from then on
            // (byte comparison, since NaN floats are not equal to themselves).
            let once = body.to_bytes();
            let again = Value::decode(&mut once.as_slice()).expect("an encoded value must decode");
            assert_eq!(again.to_bytes(), once);
        }
        let _ = Message::decode(&f.payload);
    }
});
