//! Fuzz target: arbitrary bytes as a telemetry segment file must never panic the segment log's
//! record decoder, and every record it accepts must re-encode to exactly the bytes it came from
//! (so recovery's "valid up to here" is the same as what the writer wrote).
#![no_main]

use ferrohub_seglog::record::{decode, encode, peek, DecodeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        let peeked = peek(rest);
        match decode(rest) {
            Ok((seq, event, len)) => {
                assert_eq!(peeked, Ok((seq, event.enqueued_ms, len)));
                let mut again = Vec::new();
                encode(&mut again, seq, &event);
                assert_eq!(again.as_slice(), &rest[..len]);
                rest = &rest[len..];
            }
            Err(DecodeError::Incomplete) | Err(DecodeError::Corrupt(_)) => return,
        }
    }
});
