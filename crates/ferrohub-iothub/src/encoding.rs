//! Percent-encoding rules shared by usernames, SAS tokens and property bags (crate-private).

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything except RFC 3986 unreserved characters gets escaped: this is Python's
/// `quote(s, safe="")`, which produced the SAS tokens and property bags in the captures, and it
/// is what IoT Hub itself writes into C2D topics (`%24.mid`, `%2F`).
const STRICT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(crate) fn encode(s: &str) -> String {
    utf8_percent_encode(s, STRICT).to_string()
}

/// Percent-decodes without turning `+` into a space: the SDKs always escape a real `+` as `%2B`
/// and never send `+` for a space, so a literal `+` can only mean itself (base64 signatures,
/// user-agent strings). Malformed escapes such as `%zz` are kept literally, as .NET's decoder does.
pub(crate) fn decode(s: &str) -> Result<String, std::str::Utf8Error> {
    percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_python_quote_safe_empty() {
        assert_eq!(
            encode("localhost/devices/dev1"),
            "localhost%2Fdevices%2Fdev1"
        );
        assert_eq!(encode("a b$+=~-._"), "a%20b%24%2B%3D~-._");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn decode_keeps_plus_and_bad_escapes() {
        assert_eq!(decode("a+b%20c").unwrap(), "a+b c");
        assert_eq!(decode("100%zz%4").unwrap(), "100%zz%4");
        assert!(decode("%FF").is_err());
    }
}
