//! Fuzz target: SAS tokens (`SasToken::parse`) and the resource URIs they name
//! (`parse_resource`, `resource_matches_identity`). Checks that what the parser accepts is
//! exactly what the signature covers, that signing and verifying agree, and that a resource
//! grants access only to the identity it spells out.
#![no_main]

use ferrohub_iothub::identity::Identity;
use ferrohub_iothub::sas::{
    generate_token, parse_resource, resource_matches_identity, sign, ResourceScope, SasToken,
};
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "SharedAccessSignature ";
/// A 32-byte key as IoT Hub shows keys.
const KEY: &str = "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=";
const OTHER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn hostnames() -> Vec<String> {
    ["hub.azure-devices.net", "localhost:8883", "[::1]"]
        .map(str::to_owned)
        .to_vec()
}

fn check_token(text: &str) {
    let Ok(token) = SasToken::parse(text) else {
        return;
    };
    let fields = text
        .strip_prefix(PREFIX)
        .expect("accepted without the prefix");
    let fields: Vec<&str> = fields.split('&').collect();
    // `sr` and `se` are taken verbatim from exactly one field each: what gets signed is what
    // was sent, and `se` has only one spelling.
    let sr_field = format!("sr={}", token.sr_raw);
    assert_eq!(fields.iter().filter(|f| **f == sr_field).count(), 1);
    let se_field = format!("se={}", token.expiry);
    assert_eq!(fields.iter().filter(|f| **f == se_field).count(), 1);
    assert_eq!(
        fields.iter().filter(|f| f.starts_with("se=")).count(),
        1,
        "{text:?}"
    );
    assert!(!token.resource.is_empty());
    assert!(!token.sig.is_empty());
    assert_eq!(
        token.string_to_sign(),
        format!("{}\n{}", token.sr_raw, token.expiry)
    );

    // Expiry: valid strictly before `se`.
    assert!(token.is_expired(token.expiry));
    assert!(token.is_expired(u64::MAX));
    if token.expiry > 0 {
        assert!(!token.is_expired(token.expiry - 1));
    }

    // Verification agrees with signing, and any change to the signature breaks it.
    let expected = sign(&token.string_to_sign(), KEY).expect("KEY is valid base64");
    assert_eq!(token.verify_signature(KEY), token.sig == expected);
    let mut signed = token.clone();
    signed.sig = expected.clone();
    assert!(signed.verify_signature(KEY));
    assert!(!signed.verify_signature(OTHER_KEY));
    let mut flipped = signed.clone();
    flipped.sig[0] ^= 1;
    assert!(!flipped.verify_signature(KEY));
    let mut truncated = signed.clone();
    truncated.sig.pop();
    assert!(!truncated.verify_signature(KEY));
    // An arbitrary string as a key never panics.
    let _ = token.verify_signature(text);

    // Debug never shows the signature: it reads the same whatever the signature bytes are.
    let mut other_sig = token.clone();
    other_sig.sig = vec![0xA5; token.sig.len()];
    assert_eq!(format!("{token:?}"), format!("{other_sig:?}"));

    // A token generated for the decoded fields parses back to them and verifies.
    let generated = generate_token(
        &token.resource,
        KEY,
        token.expiry,
        token.key_name.as_deref(),
    )
    .expect("KEY is valid base64");
    let reparsed = SasToken::parse(&generated)
        .unwrap_or_else(|e| panic!("generated token {generated:?} does not parse: {e}"));
    assert_eq!(reparsed.resource, token.resource);
    assert_eq!(reparsed.expiry, token.expiry);
    assert_eq!(reparsed.key_name, token.key_name);
    assert!(reparsed.verify_signature(KEY));

    check_resource(&token.resource);
}

fn check_resource(resource: &str) {
    let hosts = hostnames();
    let scope = parse_resource(resource, &hosts);
    let trimmed = resource.strip_suffix('/').unwrap_or(resource);
    let host = trimmed.split('/').next().unwrap_or_default();
    match &scope {
        None => {}
        Some(ResourceScope::Hub) => {
            assert!(!trimmed.contains('/'), "hub scope from {resource:?}");
            assert!(ferrohub_iothub::sas::host_matches(host, &hosts));
        }
        Some(ResourceScope::Device(identity)) => {
            identity
                .validate()
                .unwrap_or_else(|e| panic!("{resource:?} gave an invalid identity: {e}"));
            assert!(ferrohub_iothub::sas::host_matches(host, &hosts));
            // The resource spells out exactly this identity.
            let canonical = match &identity.module_id {
                None => format!("{host}/devices/{}", identity.device_id),
                Some(m) => format!("{host}/devices/{}/modules/{m}", identity.device_id),
            };
            assert_eq!(trimmed, canonical);
            assert!(resource_matches_identity(resource, identity, &hosts));
            // A device token never covers its modules, nor a module token its device.
            let neighbour = match &identity.module_id {
                None => Identity::module(identity.device_id.clone(), "m"),
                Some(_) => Identity::device(identity.device_id.clone()),
            };
            assert!(!resource_matches_identity(resource, &neighbour, &hosts));
        }
    }
    // Whatever names a device or module, `resource_matches_identity` never matches a hub
    // scope or a resource for another host.
    if scope == Some(ResourceScope::Hub) || !ferrohub_iothub::sas::host_matches(host, &hosts) {
        assert!(!resource_matches_identity(
            resource,
            &Identity::device("d1"),
            &hosts
        ));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_token(text);
    // Seeds without the prefix still reach the field parser.
    if !text.starts_with(PREFIX) {
        check_token(&format!("{PREFIX}{text}"));
    }
    // The raw text as a decoded `sr`.
    check_resource(text);
});
