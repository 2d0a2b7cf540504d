//! The rules of external routing endpoints (webhook, NATS): what a URL, subject, stream and
//! static header may be, and how a message's properties are named on the wire for each type.
//!
//! Header naming follows IoT Hub's table of system property names per endpoint type. Neither a
//! webhook nor NATS is in it, so each takes the column of the endpoint it resembles:
//!
//! - **webhook**: Event Grid's column (Event Grid delivers over HTTP webhooks): `message-id`,
//!   `user-id`, `correlation-id`, `iothub-connection-device-id`, `iothub-connection-module-id`,
//!   `iothub-connection-auth-generation-id`, `iothub-connection-auth-method`,
//!   `iothub-content-type`, `iothub-content-encoding`, `iothub-enqueuedtime`, `dt-dataschema`,
//!   `dt-subject`. Content type and encoding are prefixed so they cannot be mistaken for
//!   HTTP's own `Content-Type` and `Content-Encoding` (which means compression). Application
//!   properties (enrichments among them) are `iothub-app-NAME`, as IoT Hub's HTTPS device API
//!   names them; HTTP header names are case-insensitive, so receivers see them lower-cased.
//! - **nats**: Event Hubs' column, the names the hub stores (`message-id`, `content-type`,
//!   `content-encoding`, `iothub-connection-device-id`, ...); application properties under
//!   their own names (NATS header names keep their case). An application property with a
//!   system property's name is left out, so a device cannot pose as the hub.
//!
//! System properties the table does not list (`iothub-interface-id`, `iothub-message-source`,
//! ...) keep their stored names in both. A name byte outside the header-name characters, and a
//! value byte that is not visible ASCII (or space), is percent-encoded; a property without a
//! value is sent with an empty one.

use std::collections::BTreeMap;

use percent_encoding::{percent_encode, AsciiSet, CONTROLS};

/// Which wire naming to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    Webhook,
    Nats,
}

/// Prefix of application properties as webhook headers.
pub const WEBHOOK_APP_PREFIX: &str = "iothub-app-";

/// Bytes of a value that cannot go in a header as they are: controls and non-ASCII
/// (`CONTROLS` covers 0x00-0x1F and 0x7F; non-ASCII is always encoded).
const VALUE_UNSAFE: &AsciiSet = CONTROLS;

/// HTTP's `tchar`: the characters of a header name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn header_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if is_tchar(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header_value(value: &str) -> String {
    percent_encode(value.as_bytes(), VALUE_UNSAFE).to_string()
}

/// The wire name of a stored system property for `style`.
fn system_name(style: HeaderStyle, stored: &str) -> String {
    match (style, stored) {
        (HeaderStyle::Webhook, "content-type") => "iothub-content-type".into(),
        (HeaderStyle::Webhook, "content-encoding") => "iothub-content-encoding".into(),
        _ => header_name(stored),
    }
}

/// A message's headers for `style`: the system properties, then the application properties.
pub fn message_headers(
    style: HeaderStyle,
    system: &BTreeMap<String, String>,
    app: &[(String, Option<String>)],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = system
        .iter()
        .map(|(k, v)| (system_name(style, k), header_value(v)))
        .collect();
    for (k, v) in app {
        let name = match style {
            HeaderStyle::Webhook => format!("{WEBHOOK_APP_PREFIX}{}", header_name(k)),
            HeaderStyle::Nats => {
                if system.keys().any(|s| s.eq_ignore_ascii_case(k)) {
                    continue;
                }
                header_name(k)
            }
        };
        out.push((name, header_value(v.as_deref().unwrap_or(""))));
    }
    out
}

/// The host of a URL of `scheme://[user@]host[:port][/...]`, or why there is none.
fn url_host<'a>(url: &'a str, schemes: &[&str]) -> Result<(&'a str, &'a str), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("url {url:?} has no scheme"))?;
    if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        return Err(format!(
            "url {url:?}: the scheme must be {}",
            schemes.join(" or ")
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("url {url:?} has no host, or holds blanks"));
    }
    Ok((scheme, host))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// A webhook URL: `https://`, or `http://` to a loopback host only (a receiver on the same
/// machine, where there is no network to protect the message on).
pub fn check_webhook_url(url: &str) -> Result<(), String> {
    let (scheme, host) = url_host(url, &["https", "http"])?;
    if scheme.eq_ignore_ascii_case("http") && !is_loopback(host) {
        return Err(format!(
            "url {url:?}: http:// is allowed only to a loopback host (localhost, 127.0.0.0/8, [::1]); use https://"
        ));
    }
    Ok(())
}

/// Headers the hub sets itself, which a webhook's static headers may not replace.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
];

/// A static header of a webhook endpoint.
pub fn check_static_header(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(format!("header name {name:?} is not an HTTP token"));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("iothub-") {
        return Err(format!(
            "header {name:?} is set by the hub (message properties are iothub-*)"
        ));
    }
    if !value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(format!("header {name}: the value must be visible ASCII"));
    }
    Ok(())
}

/// A NATS server URL: `nats://host[:port]` or `tls://host[:port]`.
pub fn check_nats_url(url: &str) -> Result<(), String> {
    url_host(url, &["nats", "tls"]).map(|_| ())
}

/// A subject to publish to: dot-separated non-empty tokens without blanks or wildcards.
pub fn check_nats_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() || subject.len() > 255 {
        return Err(format!(
            "subject must be 1 to 255 bytes, not {}",
            subject.len()
        ));
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(format!("subject {subject:?} has an empty token"));
        }
        if token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
        {
            return Err(format!(
                "subject {subject:?}: no blanks, and no wildcards (* >) in a subject published to"
            ));
        }
    }
    Ok(())
}

/// A JetStream stream name: 1-255 printable characters without blanks, `.`, `*`, `>`, `/`, `\`.
pub fn check_nats_stream(stream: &str) -> Result<(), String> {
    if stream.is_empty()
        || stream.len() > 255
        || stream
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
    {
        return Err(format!(
            "stream {stream:?}: 1 to 255 characters, none of blank . * > / \\"
        ));
    }
    Ok(())
}

/// A storage endpoint's container name, by Azure's rules for blob containers: 3 to 63
/// characters, lower-case letters, digits and single hyphens, starting and ending with a letter
/// or digit. It names a directory under the hub's storage root, so these rules also keep it a
/// single, harmless path segment.
pub fn check_container_name(name: &str) -> Result<(), String> {
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ends_ok = !name.starts_with('-') && !name.ends_with('-');
    if !(3..=63).contains(&name.len()) || !chars_ok || !ends_ok || name.contains("--") {
        return Err(format!(
            "containerName {name:?}: 3 to 63 lower-case letters, digits and single hyphens, \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system() -> BTreeMap<String, String> {
        [
            ("message-id", "m1"),
            ("content-type", "application/json"),
            ("content-encoding", "utf-8"),
            ("iothub-connection-device-id", "d1"),
            ("iothub-enqueuedtime", "2026-01-01T00:00:00.000Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn webhook_headers_take_event_grids_names() {
        let app = vec![
            ("level".to_string(), Some("critical".to_string())),
            ("flag".to_string(), None),
            ("a b".to_string(), Some("é\n".to_string())),
        ];
        let h = message_headers(HeaderStyle::Webhook, &system(), &app);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("iothub-content-type"), Some("application/json"));
        assert_eq!(get("iothub-content-encoding"), Some("utf-8"));
        assert_eq!(
            get("content-type"),
            None,
            "HTTP's own header is not the message's"
        );
        assert_eq!(get("message-id"), Some("m1"));
        assert_eq!(get("iothub-connection-device-id"), Some("d1"));
        assert_eq!(get("iothub-app-level"), Some("critical"));
        assert_eq!(get("iothub-app-flag"), Some(""));
        assert_eq!(get("iothub-app-a%20b"), Some("%C3%A9%0A"));
    }

    #[test]
    fn nats_headers_take_event_hubs_names_and_keep_system_ones() {
        let app = vec![
            ("Level".to_string(), Some("x".to_string())),
            (
                "IoTHub-Connection-Device-Id".to_string(),
                Some("evil".to_string()),
            ),
        ];
        let h = message_headers(HeaderStyle::Nats, &system(), &app);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("content-type"), Some("application/json"));
        assert_eq!(get("Level"), Some("x"));
        assert_eq!(get("iothub-connection-device-id"), Some("d1"));
        assert_eq!(get("IoTHub-Connection-Device-Id"), None);
    }

    #[test]
    fn urls_subjects_and_streams_are_checked() {
        assert!(check_webhook_url("https://example.com/hook").is_ok());
        assert!(check_webhook_url("http://127.0.0.1:8080/x").is_ok());
        assert!(check_webhook_url("http://[::1]:80/").is_ok());
        assert!(check_webhook_url("http://localhost/").is_ok());
        assert!(check_webhook_url("http://example.com/").is_err());
        assert!(check_webhook_url("ftp://example.com/").is_err());
        assert!(check_webhook_url("https:///x").is_err());
        assert!(check_webhook_url("example.com").is_err());
        assert!(check_nats_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_nats_url("tls://nats.example.com").is_ok());
        assert!(check_nats_url("http://x").is_err());
        assert!(check_nats_subject("iot.telemetry").is_ok());
        for bad in ["", "a..b", ".a", "a.*", "a.>", "a b"] {
            assert!(check_nats_subject(bad).is_err(), "{bad:?}");
        }
        assert!(check_nats_stream("TELEMETRY_1").is_ok());
        assert!(check_nats_stream("a.b").is_err());
        assert!(check_container_name("telemetry-archive").is_ok());
        for bad in ["ab", "Upper", "-a-b", "a-b-", "a--b", "a/b", "..", "a.b"] {
            assert!(check_container_name(bad).is_err(), "{bad}");
        }
        assert!(check_static_header("Authorization", "Bearer x").is_ok());
        assert!(check_static_header("Content-Length", "1").is_err());
        assert!(check_static_header("iothub-app-x", "1").is_err());
        assert!(check_static_header("bad name", "1").is_err());
    }
}
