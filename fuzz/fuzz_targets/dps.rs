//! Fuzz target: the DPS device protocol's parsers (`ferrohub_iothub::dps`): CONNECT usernames
//! with their client id, and publish topics. Checks that nothing panics, that an accepted
//! username names a valid registration id equal to the client id in a valid scope, that an
//! accepted topic has a non-empty request id (and operation id for a status query), and that
//! the response topic built for any request id parses back in the C SDK's way.
#![no_main]

use ferrohub_iothub::dps::{
    classify_dps_publish, is_dps_username, parse_dps_connect, response_topic,
    validate_id_scope, validate_registration_id, DpsTopic,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // First line: the client id; the rest: the username (or topic).
    let (client_id, rest) = text.split_once('\n').unwrap_or(("", text));
    if let Ok(c) = parse_dps_connect(client_id, rest) {
        assert!(is_dps_username(rest));
        assert_eq!(c.registration_id, client_id);
        assert!(validate_registration_id(&c.registration_id).is_ok());
        assert!(validate_id_scope(&c.id_scope).is_ok());
    }
    match classify_dps_publish(rest) {
        Ok(DpsTopic::Register { rid }) => assert!(!rid.is_empty()),
        Ok(DpsTopic::OperationStatus { rid, operation_id }) => {
            assert!(!rid.is_empty() && !operation_id.is_empty())
        }
        Err(_) => {}
    }
    // Whatever the device's request id, the response topic keeps the C SDK's shape: the
    // status up to the next `/`, and nothing after `$rid=` that ends the query early.
    let t = response_topic(202, client_id, Some(3));
    let tail = t
        .strip_prefix("$dps/registrations/res/202/?$rid=")
        .expect("response topic prefix");
    assert!(!tail.contains('/') && !tail.contains('$') && !tail.contains('#') && !tail.contains('+'));
    assert!(tail.ends_with("&retry-after=3"));
});
