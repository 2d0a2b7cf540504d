//! Fuzz target: connection strings (`ConnectionString::parse`, `Display`, `identity()`).
//! Checks that what is accepted is written back canonically and reparses to the same value,
//! that the identity follows DeviceId/ModuleId, and that neither errors nor `Debug` depend on
//! secret values.
#![no_main]

use ferrohub_iothub::connection_string::ConnectionString;
use libfuzzer_sys::fuzz_target;

/// The input with every value replaced by `v`, except `x509`'s (whose value is not secret and
/// decides an error) and empty ones (which decide another). Keys and separators are kept.
fn redacted(s: &str) -> String {
    s.split(';')
        .map(|segment| match segment.split_once('=') {
            Some((key, value)) if key.trim() != "x509" && !value.is_empty() => format!("{key}=v"),
            _ => segment.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = ConnectionString::parse(text);

    // Errors are decided by keys alone, so they cannot quote a value (which may be a key).
    let parsed_redacted = ConnectionString::parse(&redacted(text));
    match (&parsed, &parsed_redacted) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "the error depends on a value");
            assert_eq!(a.to_string(), b.to_string());
        }
        _ => panic!("acceptance depends on a value: {parsed:?} vs {parsed_redacted:?}"),
    }

    let Ok(cs) = parsed else {
        return;
    };
    assert!(!cs.host_name.is_empty());
    for value in [
        &cs.device_id,
        &cs.module_id,
        &cs.shared_access_key_name,
        &cs.shared_access_key,
        &cs.gateway_host_name,
    ]
    .into_iter()
    .flatten()
    {
        assert!(!value.is_empty());
        assert!(!value.contains(';'));
    }

    // identity() is DeviceId plus ModuleId; a module always has its device.
    match cs.identity() {
        Some(identity) => {
            assert_eq!(Some(&identity.device_id), cs.device_id.as_ref());
            assert_eq!(identity.module_id, cs.module_id);
        }
        None => {
            assert!(cs.device_id.is_none());
            assert!(cs.module_id.is_none());
        }
    }

    // Display is canonical and round-trips.
    let written = cs.to_string();
    let reparsed = ConnectionString::parse(&written)
        .unwrap_or_else(|e| panic!("written form {written:?} does not parse: {e}"));
    assert_eq!(reparsed, cs);
    assert_eq!(reparsed.to_string(), written);
    assert_eq!(written.parse::<ConnectionString>().as_ref(), Ok(&cs));

    // Debug is the same whatever the key is, so logging it never leaks the key.
    if cs.shared_access_key.is_some() {
        let mut other = cs.clone();
        other.shared_access_key = Some("a-different-key".to_owned());
        assert_eq!(format!("{cs:?}"), format!("{other:?}"));
    }
});
