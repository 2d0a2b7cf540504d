//! What an MQTT CONNECT means to IoT Hub: client id and username rules, CONNACK codes, keep-alive.

use std::time::Duration;

use thiserror::Error;

use crate::encoding;
use crate::identity::{validate_device_id, validate_module_id, IdError, Identity};

/// The oldest api-version IoT Hub still accepts on its MQTT endpoint.
pub const MIN_API_VERSION: &str = "2016-11-14";

/// IoT Hub never waits longer than this for traffic, whatever keep-alive the client asked for.
pub const MAX_SERVER_KEEP_ALIVE: Duration = Duration::from_secs(1767);

/// Subscriptions one MQTT session may hold (IoT Hub refuses more).
pub const MAX_SUBSCRIPTIONS: usize = 5;

/// Largest MQTT packet IoT Hub takes: a 256 KB message plus room for a long topic and header.
pub const MAX_MQTT_PACKET_SIZE: usize = crate::telemetry::MAX_MESSAGE_SIZE + 8 * 1024;

/// DTDL v3 caps a DTMI at 4096 characters; the bound matters because the model id is stamped on
/// every telemetry message of the connection.
pub const MAX_MODEL_ID_LEN: usize = 4096;

/// CONNACK return code 2 (MQTT 3.1.1 section 3.2.2.3).
pub const CONNACK_IDENTIFIER_REJECTED: u8 = 2;
/// CONNACK return code 4 (MQTT 3.1.1 section 3.2.2.3).
pub const CONNACK_BAD_USERNAME_OR_PASSWORD: u8 = 4;
/// CONNACK return code 5 (MQTT 3.1.1 section 3.2.2.3).
pub const CONNACK_NOT_AUTHORIZED: u8 = 5;

/// Everything the CONNECT packet's client id and username say about the connection.
/// Authentication (password or client certificate) is checked separately.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectInfo {
    pub identity: Identity,
    /// As written in the username (not normalised); compare with [`crate::sas::host_matches`].
    pub hostname: String,
    pub api_version: String,
    /// IoT Plug and Play model id, percent-decoded.
    pub model_id: Option<String>,
    /// SDK user agent, percent-decoded.
    pub device_client_type: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("CONNECT has no username")]
    MissingUsername,
    #[error("username is not {{hostname}}/{{deviceId}}[/{{moduleId}}]/?{{query}}: {0}")]
    MalformedUsername(&'static str),
    #[error("username query is not valid UTF-8 after percent-decoding")]
    InvalidQueryEncoding,
    #[error("username query repeats {0}")]
    DuplicateQueryKey(&'static str),
    #[error("username query has no api-version")]
    MissingApiVersion,
    #[error("unsupported api-version {0:?}")]
    UnsupportedApiVersion(String),
    #[error("invalid model-id: {0}")]
    InvalidModelId(&'static str),
    #[error("invalid identity in username: {0}")]
    InvalidIdentity(#[from] IdError),
    #[error("client id {client_id:?} does not match the username's identity {expected:?}")]
    ClientIdMismatch { client_id: String, expected: String },
}

impl ConnectError {
    /// The CONNACK return code to refuse the connection with. Both codes make the SDKs give up
    /// instead of retrying, which is right: none of these errors goes away on a retry.
    pub fn connack_code(&self) -> u8 {
        match self {
            ConnectError::InvalidIdentity(_) | ConnectError::ClientIdMismatch { .. } => {
                CONNACK_IDENTIFIER_REJECTED
            }
            ConnectError::MissingUsername
            | ConnectError::MalformedUsername(_)
            | ConnectError::InvalidQueryEncoding
            | ConnectError::DuplicateQueryKey(_)
            | ConnectError::MissingApiVersion
            | ConnectError::UnsupportedApiVersion(_)
            | ConnectError::InvalidModelId(_) => CONNACK_BAD_USERNAME_OR_PASSWORD,
        }
    }
}

/// Parses and cross-checks the client id and username of a CONNECT.
///
/// The username is `{hostname}/{deviceId}/?{query}` or `{hostname}/{deviceId}/{moduleId}/?{query}`.
/// Ids may contain `?` but never `/`, so the path is split on `/` and the query is the segment
/// that starts with `?`; the query itself may then contain anything (a raw model id has `;` and
/// `:`, a raw user agent may have `/`). Unknown query keys are ignored.
pub fn parse_connect(client_id: &str, username: Option<&str>) -> Result<ConnectInfo, ConnectError> {
    let username = username.ok_or(ConnectError::MissingUsername)?;
    let (hostname, rest) = username
        .split_once('/')
        .ok_or(ConnectError::MalformedUsername("no '/' after the hostname"))?;
    if hostname.is_empty() {
        return Err(ConnectError::MalformedUsername("empty hostname"));
    }
    if hostname
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ConnectError::MalformedUsername(
            "hostname contains whitespace",
        ));
    }
    let (device_id, rest) = rest.split_once('/').ok_or(ConnectError::MalformedUsername(
        "no '/' after the device id",
    ))?;
    let (module_id, query) = if let Some(query) = rest.strip_prefix('?') {
        (None, query)
    } else if rest.is_empty() {
        (None, "")
    } else {
        let (module_id, rest) = rest.split_once('/').ok_or(ConnectError::MalformedUsername(
            "no '/' after the module id",
        ))?;
        let query = match rest.strip_prefix('?') {
            Some(query) => query,
            None if rest.is_empty() => "",
            None => {
                return Err(ConnectError::MalformedUsername(
                    "extra path segments before the query",
                ))
            }
        };
        (Some(module_id), query)
    };

    let query = parse_query(query)?;

    validate_device_id(device_id)?;
    if let Some(module_id) = module_id {
        validate_module_id(module_id)?;
    }
    let identity = Identity {
        device_id: device_id.to_owned(),
        module_id: module_id.map(str::to_owned),
    };
    let expected = identity.to_string();
    if client_id != expected {
        return Err(ConnectError::ClientIdMismatch {
            client_id: client_id.to_owned(),
            expected,
        });
    }

    let api_version = query.api_version.ok_or(ConnectError::MissingApiVersion)?;
    if !api_version_supported(&api_version) {
        return Err(ConnectError::UnsupportedApiVersion(api_version));
    }
    Ok(ConnectInfo {
        identity,
        hostname: hostname.to_owned(),
        api_version,
        model_id: query.model_id,
        device_client_type: query.device_client_type,
    })
}

#[derive(Default)]
struct UsernameQuery {
    api_version: Option<String>,
    model_id: Option<String>,
    device_client_type: Option<String>,
}

fn parse_query(query: &str) -> Result<UsernameQuery, ConnectError> {
    let mut parsed = UsernameQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = encoding::decode(raw_key).map_err(|_| ConnectError::InvalidQueryEncoding)?;
        let (slot, name) = if key.eq_ignore_ascii_case("api-version") {
            (&mut parsed.api_version, "api-version")
        } else if key.eq_ignore_ascii_case("model-id") {
            (&mut parsed.model_id, "model-id")
        } else if key.eq_ignore_ascii_case("DeviceClientType") {
            (&mut parsed.device_client_type, "DeviceClientType")
        } else {
            continue;
        };
        // A repeated key means two parsers could disagree on the value; refuse rather than pick.
        if slot.is_some() {
            return Err(ConnectError::DuplicateQueryKey(name));
        }
        let value = encoding::decode(raw_value).map_err(|_| ConnectError::InvalidQueryEncoding)?;
        *slot = Some(value);
    }
    // An empty model-id is how a client says "no model"; treat it as absent.
    parsed.model_id = parsed.model_id.filter(|m| !m.is_empty());
    parsed.device_client_type = parsed.device_client_type.filter(|t| !t.is_empty());
    if let Some(model_id) = &parsed.model_id {
        validate_model_id(model_id)?;
    }
    Ok(parsed)
}

fn validate_model_id(model_id: &str) -> Result<(), ConnectError> {
    if !model_id.starts_with("dtmi:") {
        return Err(ConnectError::InvalidModelId(
            "does not start with \"dtmi:\"",
        ));
    }
    if model_id.len() > MAX_MODEL_ID_LEN {
        return Err(ConnectError::InvalidModelId("too long"));
    }
    if model_id
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ConnectError::InvalidModelId(
            "contains whitespace or control characters",
        ));
    }
    Ok(())
}

/// `YYYY-MM-DD`, optionally with Azure's `-preview` suffix, no older than [`MIN_API_VERSION`].
/// The fixed-width format makes string order equal date order.
pub fn api_version_supported(api_version: &str) -> bool {
    let date = api_version.strip_suffix("-preview").unwrap_or(api_version);
    let b = date.as_bytes();
    let shape_ok = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !shape_ok {
        return false;
    }
    let two = |i: usize| (b[i] - b'0') * 10 + (b[i + 1] - b'0');
    let (month, day) = (two(5), two(8));
    (1..=12).contains(&month) && (1..=31).contains(&day) && date >= MIN_API_VERSION
}

/// How long the server waits for traffic before closing the connection: 1.5 times the client's
/// keep-alive, never more than [`MAX_SERVER_KEEP_ALIVE`]. A keep-alive of 0 turns the MQTT
/// mechanism off, but IoT Hub still drops idle connections, so it gets the cap.
pub fn server_keep_alive(client_keep_alive_secs: u16) -> Duration {
    if client_keep_alive_secs == 0 {
        return MAX_SERVER_KEEP_ALIVE;
    }
    let scaled = Duration::from_millis(u64::from(client_keep_alive_secs) * 1500);
    scaled.min(MAX_SERVER_KEEP_ALIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../tests/vectors/sdk-connect.json")).unwrap()
    }

    #[test]
    fn every_captured_connect_parses() {
        let v = vectors();
        let connects = v["connects"].as_array().unwrap();
        assert!(!connects.is_empty());
        for c in connects {
            let client_id = c["client_id"].as_str().unwrap();
            let username = c["username"].as_str().unwrap();
            let info = parse_connect(client_id, Some(username))
                .unwrap_or_else(|e| panic!("{username}: {e}"));
            assert_eq!(info.identity, Identity::device(client_id));
            assert!(username.starts_with(&format!("{}/", info.hostname)));
            assert!(api_version_supported(&info.api_version));
            let ua = info.device_client_type.as_deref().unwrap();
            assert!(ua.starts_with("azure-iot-device"), "{ua}");
            if username.contains("model-id") {
                assert_eq!(
                    info.model_id.as_deref(),
                    Some("dtmi:com:example:Thermostat;1")
                );
            } else {
                assert_eq!(info.model_id, None);
            }
        }
    }

    #[test]
    fn python_user_agent_is_decoded() {
        let info = parse_connect(
            "dev1",
            Some("localhost/dev1/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0%283.11.7%3BLinux%20%231%20SMP%20PREEMPT_DYNAMIC%20%400%3Bx86_64%29"),
        )
        .unwrap();
        assert_eq!(
            info.device_client_type.as_deref(),
            Some(
                "azure-iot-device-iothub-py/2.14.0(3.11.7;Linux #1 SMP PREEMPT_DYNAMIC @0;x86_64)"
            )
        );
        assert_eq!(info.hostname, "localhost");
        assert_eq!(info.api_version, "2019-10-01");
    }

    #[test]
    fn raw_and_encoded_model_ids_agree() {
        let raw = parse_connect(
            "d",
            Some("h/d/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=x"),
        )
        .unwrap();
        let encoded = parse_connect(
            "d",
            Some("h/d/?DeviceClientType=x&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1&api-version=2020-09-30"),
        )
        .unwrap();
        assert_eq!(raw.model_id, encoded.model_id);
        assert_eq!(
            raw.model_id.as_deref(),
            Some("dtmi:com:example:Thermostat;1")
        );
    }

    #[test]
    fn c_sdk_module_username() {
        let info = parse_connect(
            "dev1/mod1",
            Some("myhub.azure-devices.net/dev1/mod1/?api-version=2020-09-30&DeviceClientType=azsdk-c%2F1.6.0-beta.1&model-id=dtmi%3Aa%3Bb;1"),
        )
        .unwrap();
        assert_eq!(info.identity, Identity::module("dev1", "mod1"));
        assert_eq!(info.hostname, "myhub.azure-devices.net");
        assert_eq!(
            info.device_client_type.as_deref(),
            Some("azsdk-c/1.6.0-beta.1")
        );
        assert_eq!(info.model_id.as_deref(), Some("dtmi:a;b;1"));
    }

    #[test]
    fn ids_may_contain_question_marks_and_queries_slashes() {
        let info = parse_connect(
            "d?1/m?2",
            Some("h:8883/d?1/m?2/?api-version=2021-04-12&DeviceClientType=paho/1.0+x"),
        )
        .unwrap();
        assert_eq!(info.identity, Identity::module("d?1", "m?2"));
        assert_eq!(info.hostname, "h:8883");
        assert_eq!(info.device_client_type.as_deref(), Some("paho/1.0+x"));
    }

    #[test]
    fn identifier_problems_are_code_2() {
        let cases = [
            ("dev2", "h/dev1/?api-version=2021-04-12"),
            ("dev1", "h/dev1/mod1/?api-version=2021-04-12"),
            ("dev1/mod1", "h/dev1/?api-version=2021-04-12"),
            ("Dev1", "h/dev1/?api-version=2021-04-12"),
            ("", "h/dev1/?api-version=2021-04-12"),
            ("", "h//?api-version=2021-04-12"),
            ("d v", "h/d v/?api-version=2021-04-12"),
            ("d/", "h/d//?api-version=2021-04-12"),
        ];
        for (client_id, username) in cases {
            let err = parse_connect(client_id, Some(username)).unwrap_err();
            assert_eq!(err.connack_code(), 2, "{client_id} {username}: {err}");
        }
    }

    #[test]
    fn username_problems_are_code_4() {
        let cases: [(&str, Option<&str>); 16] = [
            ("d", None),
            ("d", Some("")),
            ("d", Some("h")),
            ("d", Some("h/d")),
            ("d", Some("/d/?api-version=2021-04-12")),
            ("d", Some("h/d/")),
            ("d", Some("h/d/?")),
            ("d", Some("h/d/?DeviceClientType=x")),
            ("d", Some("h/d/?api-version=2016-11-13")),
            ("d", Some("h/d/?api-version=2021-4-12")),
            ("d", Some("h/d/?api-version=2021-13-01")),
            ("d", Some("h/d/?api-version=latest")),
            (
                "d",
                Some("h/d/?api-version=2021-04-12&api-version=2016-11-14"),
            ),
            ("d", Some("h/d/?api-version=2021-04-12&model-id=urn:x")),
            ("d", Some("h/d/?api-version=2021-04-12&model-id=%FF")),
            ("d/m", Some("h/d/m/x/?api-version=2021-04-12")),
        ];
        for (client_id, username) in cases {
            let err = parse_connect(client_id, username).unwrap_err();
            assert_eq!(err.connack_code(), 4, "{username:?}: {err}");
        }
    }

    #[test]
    fn api_versions() {
        for ok in [
            "2016-11-14",
            "2018-06-30",
            "2019-10-01",
            "2020-09-30",
            "2021-04-12",
            "2030-01-31",
            "2020-06-30-preview",
        ] {
            assert!(api_version_supported(ok), "{ok}");
        }
        for bad in [
            "",
            "2016-11-13",
            "2021-04-1",
            "2021/04/12",
            "2021-00-12",
            "2021-04-32",
            "x021-04-12",
            "2021-04-12-beta",
        ] {
            assert!(!api_version_supported(bad), "{bad}");
        }
    }

    #[test]
    fn unknown_query_keys_and_empty_pairs_are_ignored() {
        let info = parse_connect(
            "d",
            Some("h/d/?&foo=bar&api-version=2021-04-12&&model-id=&x"),
        )
        .unwrap();
        assert_eq!(info.model_id, None);
        assert_eq!(info.device_client_type, None);
    }

    #[test]
    fn keep_alive() {
        assert_eq!(server_keep_alive(60), Duration::from_secs(90));
        assert_eq!(server_keep_alive(1), Duration::from_millis(1500));
        assert_eq!(server_keep_alive(1177), Duration::from_millis(1_765_500));
        assert_eq!(server_keep_alive(1178), Duration::from_secs(1767));
        assert_eq!(server_keep_alive(0), Duration::from_secs(1767));
        assert_eq!(server_keep_alive(u16::MAX), Duration::from_secs(1767));
    }
}
