//! Fuzz target: property bags (`k=v&k2&k3=`), decoded by `parse_property_bag` and written by
//! `encode_property_bag`. Checks the parser's shape rules and that the encoder is its inverse.
#![no_main]

use ferrohub_iothub::topics::{encode_property_bag, parse_property_bag, Property, TopicError};
use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

/// What `encode_property_bag` may write: RFC 3986 unreserved characters, escapes and the two
/// separators. Anything else would change meaning inside an MQTT topic (`/`, `+`, `#`).
fn is_encoded_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%&=".contains(&b)
}

fn check_encoding_of(props: &[Property]) {
    let encoded = encode_property_bag(props);
    assert!(
        encoded.bytes().all(is_encoded_byte),
        "encoder wrote a raw reserved byte: {encoded:?}"
    );
    let again = parse_property_bag(&encoded)
        .unwrap_or_else(|e| panic!("encoded bag {encoded:?} does not parse: {e}"));
    assert_eq!(
        again, props,
        "parse(encode(props)) != props for {encoded:?}"
    );
    // The encoding is canonical: encoding what was decoded gives the same text.
    assert_eq!(encode_property_bag(&again), encoded);
}

fuzz_target!(|data: &[u8]| {
    // Topics are UTF-8 by MQTT's rules; the codec refuses anything else before this is reached.
    if let Ok(bag) = std::str::from_utf8(data) {
        let segments: Vec<&str> = bag.split('&').filter(|s| !s.is_empty()).collect();
        match parse_property_bag(bag) {
            Ok(props) => {
                // One property per non-empty segment, in order; `=` decides null vs value.
                assert_eq!(props.len(), segments.len());
                for ((key, value), segment) in props.iter().zip(&segments) {
                    assert!(!key.is_empty(), "empty key accepted from {segment:?}");
                    assert_eq!(value.is_some(), segment.contains('='), "{segment:?}");
                    // Without escapes, decoding is the identity (and `+` stays `+`).
                    if !segment.contains('%') {
                        let (raw_key, raw_value) = match segment.split_once('=') {
                            Some((k, v)) => (k, Some(v)),
                            None => (*segment, None),
                        };
                        assert_eq!(key, raw_key);
                        assert_eq!(value.as_deref(), raw_value);
                    }
                }
                // parse(encode(parse(x))) == parse(x), and the encoding is canonical.
                check_encoding_of(&props);
            }
            Err(TopicError::EmptyKey) => assert!(
                segments.iter().any(|s| s.starts_with('=')),
                "EmptyKey for {bag:?} without a segment starting with '='"
            ),
            Err(TopicError::InvalidUtf8) => assert!(bag.contains('%'), "{bag:?}"),
            Err(other) => panic!("unexpected error {other:?} for {bag:?}"),
        }
    }

    // The same bytes as structured properties: every list with non-empty keys must survive
    // encode then parse unchanged (c2d topics are built this way from service-sent properties).
    let u = Unstructured::new(data);
    if let Ok(props) = Vec::<Property>::arbitrary_take_rest(u) {
        let props: Vec<Property> = props.into_iter().filter(|(k, _)| !k.is_empty()).collect();
        check_encoding_of(&props);
    }
});
