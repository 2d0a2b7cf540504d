//! IoT Hub's rules for registry records and service requests: symmetric-key and thumbprint
//! shapes, generation ids, twin etags, method names. Pure functions; the hub applies them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Whether `key` is usable as a device or module symmetric key: base64 of 16 to 64 bytes.
pub fn valid_symmetric_key(key: &str) -> bool {
    STANDARD
        .decode(key)
        .is_ok_and(|k| (16..=64).contains(&k.len()))
}

/// Whether `t` is an X.509 thumbprint: SHA-1 (40) or SHA-256 (64) hex digits, `:` allowed
/// between them.
pub fn valid_thumbprint(t: &str) -> bool {
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    matches!(hex.len(), 40 | 64) && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// A fresh generationId: 18 decimal digits, distinguishing identities that reuse a deleted
/// one's id.
pub fn new_generation_id() -> String {
    let n: u64 = rand::random::<u64>() % 1_000_000_000_000_000_000;
    format!("{n:018}")
}

/// IoT Hub's twin etag shape: the version as 8 big-endian bytes, base64 (`AAAAAAAAAAE=`).
pub fn etag_of(version: u64) -> String {
    STANDARD.encode(version.to_be_bytes())
}

/// Longest direct-method name IoT Hub accepts.
pub const MAX_METHOD_NAME_LEN: usize = 1024;

/// Whether `name` can be a direct method's name: it becomes a topic level of
/// `$iothub/methods/POST/{name}/`, so it cannot be empty, hold a topic separator or wildcard,
/// or a `?`/`#` that would end the level early.
pub fn valid_method_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_METHOD_NAME_LEN && !name.contains(['/', '?', '#', '+'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_base64_of_16_to_64_bytes() {
        assert!(valid_symmetric_key(&STANDARD.encode([0u8; 16])));
        assert!(valid_symmetric_key(&STANDARD.encode([0u8; 64])));
        assert!(!valid_symmetric_key(&STANDARD.encode([0u8; 15])));
        assert!(!valid_symmetric_key(&STANDARD.encode([0u8; 65])));
        assert!(!valid_symmetric_key("not base64!"));
    }

    #[test]
    fn thumbprints_are_sha1_or_sha256_hex() {
        assert!(valid_thumbprint(&"ab".repeat(20)));
        assert!(valid_thumbprint(&"AB:".repeat(32)));
        assert!(!valid_thumbprint(&"ab".repeat(21)));
        assert!(!valid_thumbprint(&"zz".repeat(20)));
    }

    #[test]
    fn generation_ids_have_18_digits() {
        let g = new_generation_id();
        assert_eq!(g.len(), 18);
        assert!(g.chars().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn etags_are_the_big_endian_version_in_base64() {
        assert_eq!(etag_of(1), "AAAAAAAAAAE=");
    }

    #[test]
    fn method_names_fit_in_one_topic_level() {
        assert!(valid_method_name("reboot"));
        assert!(valid_method_name("component*command"));
        for bad in ["", "a/b", "a?b", "a#b", "a+b"] {
            assert!(!valid_method_name(bad), "{bad:?}");
        }
        assert!(!valid_method_name(&"x".repeat(MAX_METHOD_NAME_LEN + 1)));
    }
}
