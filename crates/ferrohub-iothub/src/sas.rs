//! Shared access signature tokens: parsing, signing, verification and the resources they name.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::connect::CONNACK_BAD_USERNAME_OR_PASSWORD;
use crate::encoding;
use crate::identity::{validate_device_id, validate_module_id, Identity};

const PREFIX: &str = "SharedAccessSignature ";

/// Signatures and keys come from many encoders; accepting them with or without `=` padding costs
/// nothing because the decoded bytes are what gets compared.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SasError {
    #[error("not a SAS token: it must start with \"SharedAccessSignature \"")]
    MissingPrefix,
    #[error("SAS token has no {0} field")]
    MissingField(&'static str),
    #[error("SAS token repeats the {0} field")]
    DuplicateField(&'static str),
    #[error("SAS token field {0} is malformed")]
    MalformedField(&'static str),
    #[error("shared access key is not valid base64")]
    InvalidKey,
}

impl SasError {
    /// Every parse failure is a malformed password: retrying with the same token cannot help.
    pub fn connack_code(&self) -> u8 {
        CONNACK_BAD_USERNAME_OR_PASSWORD
    }
}

/// A parsed `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` token.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as in the token, still URL-encoded: the signature covers these bytes.
    pub sr_raw: String,
    /// `sr` percent-decoded, e.g. `myhub.azure-devices.net/devices/dev1`.
    pub resource: String,
    /// The decoded HMAC-SHA256 signature.
    pub sig: Vec<u8>,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: u64,
    /// `skn`, the shared access policy name, when a policy key signed the token.
    pub key_name: Option<String>,
}

/// Hides the signature: until it expires a token is as good as a password.
impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("sr_raw", &self.sr_raw)
            .field("resource", &self.resource)
            .field("sig", &format_args!("<{} bytes>", self.sig.len()))
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish()
    }
}

impl SasToken {
    /// Fields may come in any order; unknown fields are ignored, repeated ones refused. `+` is
    /// kept literally when decoding (it is a base64 character in `sig`).
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        let fields = token.strip_prefix(PREFIX).ok_or(SasError::MissingPrefix)?;
        let mut sr = None;
        let mut sig = None;
        let mut se = None;
        let mut skn = None;
        for pair in fields.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let (slot, name) = match key {
                "sr" => (&mut sr, "sr"),
                "sig" => (&mut sig, "sig"),
                "se" => (&mut se, "se"),
                "skn" => (&mut skn, "skn"),
                _ => continue,
            };
            // Two values for one field would let the signed and the checked value differ.
            if slot.replace(value).is_some() {
                return Err(SasError::DuplicateField(name));
            }
        }

        let sr_raw = sr.ok_or(SasError::MissingField("sr"))?;
        let resource = encoding::decode(sr_raw).map_err(|_| SasError::MalformedField("sr"))?;
        if resource.is_empty() {
            return Err(SasError::MalformedField("sr"));
        }

        let sig_raw = sig.ok_or(SasError::MissingField("sig"))?;
        let sig_b64 = encoding::decode(sig_raw).map_err(|_| SasError::MalformedField("sig"))?;
        let sig = LENIENT_B64
            .decode(sig_b64.as_bytes())
            .map_err(|_| SasError::MalformedField("sig"))?;
        if sig.is_empty() {
            return Err(SasError::MalformedField("sig"));
        }

        let se = se.ok_or(SasError::MissingField("se"))?;
        let expiry = parse_canonical_u64(se).ok_or(SasError::MalformedField("se"))?;

        let key_name = skn
            .map(|raw| encoding::decode(raw).map_err(|_| SasError::MalformedField("skn")))
            .transpose()?;

        Ok(SasToken {
            sr_raw: sr_raw.to_owned(),
            resource,
            sig,
            expiry,
            key_name,
        })
    }

    /// The message the signature covers: `sr` as sent, a newline, and `se`.
    pub fn string_to_sign(&self) -> String {
        format!("{}\n{}", self.sr_raw, self.expiry)
    }

    /// True if `key_b64` produced this token's signature. The comparison runs in constant time;
    /// an undecodable key simply fails.
    pub fn verify_signature(&self, key_b64: &str) -> bool {
        match sign(&self.string_to_sign(), key_b64) {
            Ok(expected) => bool::from(expected.ct_eq(&self.sig)),
            Err(_) => false,
        }
    }

    /// True if a policy key produced this token's signature under either convention a
    /// service client may use over AMQP claims-based security: IoT Hub's (HMAC keyed with the
    /// base64-decoded key) or Service Bus's, which Event Hubs clients follow (HMAC keyed with
    /// the key's text as written in the connection string). Clients differ in how they encode
    /// `sr`, so both the `sr` as sent and its canonical re-encoding are tried.
    pub fn verify_signature_any_convention(&self, key_b64: &str) -> bool {
        let reencoded = format!("{}\n{}", encoding::encode(&self.resource), self.expiry);
        let mut ok = false;
        for msg in [self.string_to_sign(), reencoded] {
            ok |= match sign(&msg, key_b64) {
                Ok(expected) => bool::from(expected.ct_eq(&self.sig)),
                Err(_) => false,
            };
            ok |= match Hmac::<Sha256>::new_from_slice(key_b64.as_bytes()) {
                Ok(mut mac) => {
                    mac.update(msg.as_bytes());
                    bool::from(mac.finalize().into_bytes().as_slice().ct_eq(&self.sig))
                }
                Err(_) => false,
            };
        }
        ok
    }

    /// A token is valid until `se`; at `se` itself it has expired.
    pub fn is_expired(&self, now_epoch_secs: u64) -> bool {
        now_epoch_secs >= self.expiry
    }
}

/// `se` is rebuilt from the parsed number when checking the signature, so only the canonical
/// decimal form is accepted (no sign, no leading zeros): otherwise a token signed over `0123`
/// would never verify, and two spellings of one expiry would exist.
fn parse_canonical_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// HMAC-SHA256 of `string_to_sign` under the base64-decoded key.
pub fn sign(string_to_sign: &str, key_b64: &str) -> Result<Vec<u8>, SasError> {
    let key = LENIENT_B64
        .decode(key_b64.as_bytes())
        .map_err(|_| SasError::InvalidKey)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| SasError::InvalidKey)?;
    mac.update(string_to_sign.as_bytes());
    Ok(mac.finalize().into_bytes().to_vec())
}

/// Builds a token for `resource_uri` (unencoded, e.g. `myhub/devices/dev1`) the way the Python
/// SDKs do: `sr` and `sig` encoded with `quote(…, safe="")`, fields in the order sr, sig, se, skn.
pub fn generate_token(
    resource_uri: &str,
    key_b64: &str,
    expiry_epoch: u64,
    key_name: Option<&str>,
) -> Result<String, SasError> {
    let sr = encoding::encode(resource_uri);
    let sig = sign(&format!("{sr}\n{expiry_epoch}"), key_b64)?;
    let mut token = format!(
        "{PREFIX}sr={sr}&sig={}&se={expiry_epoch}",
        encoding::encode(&STANDARD.encode(sig))
    );
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encoding::encode(name));
    }
    Ok(token)
}

/// A fresh 256-bit key, base64-encoded as IoT Hub shows keys.
pub fn generate_key() -> String {
    use rand::RngCore as _;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    STANDARD.encode(key)
}

/// What a token's resource URI grants access to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ResourceScope {
    /// `{host}/devices/{id}` or `{host}/devices/{id}/modules/{mid}`.
    Device(Identity),
    /// `{host}` alone: a hub-level policy token.
    Hub,
}

/// Interprets a decoded `sr`. The host must be one of `hostnames` (see [`host_matches`]); one
/// trailing `/` is tolerated; ids must be valid. Returns `None` for anything else.
///
/// Ids are decoded exactly once, with the rest of `sr`. The C# SDK encodes ids a second time
/// (`dev%231` for `dev#1`); use [`resource_matches_identity`] to accept that form too.
pub fn parse_resource(resource: &str, hostnames: &[String]) -> Option<ResourceScope> {
    match split_resource(resource, hostnames)? {
        RawScope::Hub => Some(ResourceScope::Hub),
        RawScope::Device(device_id, module_id) => {
            validate_device_id(device_id).ok()?;
            if let Some(module_id) = module_id {
                validate_module_id(module_id).ok()?;
            }
            Some(ResourceScope::Device(Identity {
                device_id: device_id.to_owned(),
                module_id: module_id.map(str::to_owned),
            }))
        }
    }
}

/// True if a token for `resource` names exactly `identity` (a device token never covers its
/// modules, nor a module token its device). Each id in `resource` may be written as is or
/// percent-encoded once more, as the C# SDK does. Accepting both cannot widen access: the
/// signature must still verify with `identity`'s own key. Hub-level resources return false;
/// whether a policy token may connect a device is the caller's decision.
pub fn resource_matches_identity(
    resource: &str,
    identity: &Identity,
    hostnames: &[String],
) -> bool {
    let Some(RawScope::Device(device_id, module_id)) = split_resource(resource, hostnames) else {
        return false;
    };
    let id_eq = |raw: &str, expected: &str| {
        raw == expected || (raw.contains('%') && encoding::decode(raw).is_ok_and(|d| d == expected))
    };
    id_eq(device_id, &identity.device_id)
        && match (module_id, &identity.module_id) {
            (None, None) => true,
            (Some(raw), Some(expected)) => id_eq(raw, expected),
            _ => false,
        }
}

enum RawScope<'r> {
    Hub,
    Device(&'r str, Option<&'r str>),
}

fn split_resource<'r>(resource: &'r str, hostnames: &[String]) -> Option<RawScope<'r>> {
    let resource = resource.strip_suffix('/').unwrap_or(resource);
    let mut segments = resource.split('/');
    let host = segments.next()?;
    if !host_matches(host, hostnames) {
        return None;
    }
    let rest: Vec<&str> = segments.collect();
    match rest.as_slice() {
        [] => Some(RawScope::Hub),
        ["devices", device_id] if !device_id.is_empty() => Some(RawScope::Device(device_id, None)),
        ["devices", device_id, "modules", module_id]
            if !device_id.is_empty() && !module_id.is_empty() =>
        {
            Some(RawScope::Device(device_id, Some(module_id)))
        }
        _ => None,
    }
}

/// True if `candidate` names one of `hostnames`: DNS names compare case-insensitively and any
/// `:port` on either side is ignored (the Python service SDK puts `localhost:8443` in `sr`).
pub fn host_matches(candidate: &str, hostnames: &[String]) -> bool {
    let candidate = strip_port(candidate);
    !candidate.is_empty()
        && hostnames
            .iter()
            .any(|h| strip_port(h).eq_ignore_ascii_case(candidate))
}

fn strip_port(host: &str) -> &str {
    // A bracketed IPv6 literal has colons of its own.
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) if is_port_suffix(&host[end + 1..]) => &host[..=end],
            _ => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        _ => host,
    }
}

fn is_port_suffix(s: &str) -> bool {
    s.is_empty() || s.strip_prefix(':').is_some_and(is_port)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    struct Captured {
        token: String,
        key: String,
    }

    fn captured() -> Vec<Captured> {
        let v: Value =
            serde_json::from_str(include_str!("../tests/vectors/sdk-connect.json")).unwrap();
        let out: Vec<Captured> = v["connects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Captured {
                token: c["password"].as_str().unwrap().to_owned(),
                key: c["key_b64"].as_str().unwrap().to_owned(),
            })
            .collect();
        assert!(!out.is_empty());
        out
    }

    const NOW: u64 = 1_900_000_000;

    #[test]
    fn every_captured_token_verifies_and_has_expired() {
        for c in captured() {
            let t = SasToken::parse(&c.token).unwrap();
            assert!(t.verify_signature(&c.key), "{}", c.token);
            assert_eq!(t.sig.len(), 32);
            assert!(t.is_expired(NOW));
            assert!(t.is_expired(t.expiry));
            assert!(!t.is_expired(t.expiry - 1));
            assert_eq!(t.key_name, None);
            assert!(t.resource.contains("/devices/"));
        }
    }

    #[test]
    fn tampering_fails() {
        for c in captured() {
            let t = SasToken::parse(&c.token).unwrap();
            for i in 0..t.sig.len() {
                let mut bad = t.clone();
                bad.sig[i] ^= 0x01;
                assert!(!bad.verify_signature(&c.key));
            }
            let mut truncated = t.clone();
            truncated.sig.pop();
            assert!(!truncated.verify_signature(&c.key));
            let mut later = t.clone();
            later.expiry += 1;
            assert!(!later.verify_signature(&c.key));
            let mut other = t.clone();
            other.sr_raw = other.sr_raw.replace("dev", "dew");
            assert!(!other.verify_signature(&c.key));
            assert!(!t.verify_signature(&generate_key()));
            assert!(!t.verify_signature("not base64!"));
        }
    }

    #[test]
    fn wrong_captured_key_fails() {
        let all = captured();
        let keys: Vec<&str> = all.iter().map(|c| c.key.as_str()).collect();
        assert!(keys.iter().any(|k| *k != keys[0]), "vectors need two keys");
        for c in &all {
            let t = SasToken::parse(&c.token).unwrap();
            for k in keys.iter().filter(|k| **k != c.key) {
                assert!(!t.verify_signature(k));
            }
        }
    }

    #[test]
    fn generate_token_reproduces_captured_bytes() {
        for c in captured() {
            let t = SasToken::parse(&c.token).unwrap();
            let generated = generate_token(&t.resource, &c.key, t.expiry, None).unwrap();
            assert_eq!(generated, c.token);
        }
    }

    #[test]
    fn generated_tokens_round_trip() {
        let key = generate_key();
        for (resource, skn) in [
            ("localhost/devices/dev1", None),
            ("hub.example.com/devices/d:1 +x/modules/m$1", None),
            ("localhost:8443", Some("iothubowner")),
            ("localhost", Some("policy with space")),
        ] {
            let token = generate_token(resource, &key, 1_800_000_000, skn).unwrap();
            let t = SasToken::parse(&token).unwrap();
            assert_eq!(t.resource, resource);
            assert_eq!(t.key_name.as_deref(), skn);
            assert_eq!(t.expiry, 1_800_000_000);
            assert!(t.verify_signature(&key));
        }
    }

    #[test]
    fn python_service_token_with_unencoded_slash_and_field_order() {
        let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let sig = STANDARD.encode(sign("localhost%3A8443\n1795323301", key).unwrap());
        // `quote(b64)` keeps `/` and `+` would be %2B; also reorder the fields.
        let sig_q = sig.replace('=', "%3D").replace('+', "%2B");
        let token = format!(
            "SharedAccessSignature skn=iothubowner&se=1795323301&sig={sig_q}&sr=localhost%3A8443"
        );
        let t = SasToken::parse(&token).unwrap();
        assert_eq!(t.resource, "localhost:8443");
        assert_eq!(t.key_name.as_deref(), Some("iothubowner"));
        assert!(t.verify_signature(key));
        // A literal `+` in sig stays a base64 `+`.
        let raw_plus = format!("SharedAccessSignature sr=h&sig={sig}&se=1");
        assert_eq!(
            SasToken::parse(&raw_plus).unwrap().sig,
            STANDARD.decode(&sig).unwrap()
        );
    }

    #[test]
    fn malformed_tokens() {
        let ok_sig = "LdLjCUeJ%2FuBvAxjIUTIeWr1SPhAfuHZ1p37VYB4eEvo%3D";
        let cases = [
            ("", SasError::MissingPrefix),
            ("sr=a&sig=b&se=1", SasError::MissingPrefix),
            ("sharedaccesssignature sr=a", SasError::MissingPrefix),
            ("SharedAccessSignature ", SasError::MissingField("sr")),
            (
                "SharedAccessSignature sig=AA%3D%3D&se=1",
                SasError::MissingField("sr"),
            ),
            (
                "SharedAccessSignature sr=a&se=1",
                SasError::MissingField("sig"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==",
                SasError::MissingField("se"),
            ),
            (
                "SharedAccessSignature sr=&sig=AA==&se=1",
                SasError::MalformedField("sr"),
            ),
            (
                "SharedAccessSignature sr=%FF&sig=AA==&se=1",
                SasError::MalformedField("sr"),
            ),
            (
                "SharedAccessSignature sr=a&sig=&se=1",
                SasError::MalformedField("sig"),
            ),
            (
                "SharedAccessSignature sr=a&sig=!!&se=1",
                SasError::MalformedField("sig"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==&se=",
                SasError::MalformedField("se"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==&se=+1",
                SasError::MalformedField("se"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==&se=01",
                SasError::MalformedField("se"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==&se=-1",
                SasError::MalformedField("se"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==&se=1.5",
                SasError::MalformedField("se"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==&se=99999999999999999999",
                SasError::MalformedField("se"),
            ),
            (
                "SharedAccessSignature sr=a&sr=b&sig=AA==&se=1",
                SasError::DuplicateField("sr"),
            ),
            (
                "SharedAccessSignature sr=a&sig=AA==&se=1&se=2",
                SasError::DuplicateField("se"),
            ),
        ];
        for (token, expected) in cases {
            assert_eq!(SasToken::parse(token), Err(expected.clone()), "{token}");
            assert_eq!(expected.connack_code(), 4);
        }
        let t = SasToken::parse(&format!(
            "SharedAccessSignature sr=a&sig={ok_sig}&se=0&extra=1&novalue"
        ))
        .unwrap();
        assert_eq!(t.expiry, 0);
        assert!(t.is_expired(0));
    }

    #[test]
    fn debug_hides_the_signature() {
        let t = SasToken::parse(&captured()[0].token).unwrap();
        let dbg = format!("{t:?}");
        assert!(dbg.contains("<32 bytes>"));
        assert!(!dbg.contains(&format!("{:?}", t.sig)));
    }

    #[test]
    fn sign_matches_known_hmac() {
        // RFC 4231 test case 2: key "Jefe".
        let mac = sign("what do ya want for nothing?", &STANDARD.encode("Jefe")).unwrap();
        assert_eq!(
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(sign("x", "***"), Err(SasError::InvalidKey));
    }

    #[test]
    fn generated_keys_are_32_random_bytes() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(STANDARD.decode(&a).unwrap().len(), 32);
    }

    fn hosts() -> Vec<String> {
        vec!["MyHub.example.com".to_owned(), "localhost:8883".to_owned()]
    }

    #[test]
    fn resources() {
        let h = hosts();
        assert_eq!(
            parse_resource("myhub.example.com/devices/dev1", &h),
            Some(ResourceScope::Device(Identity::device("dev1")))
        );
        assert_eq!(
            parse_resource("LOCALHOST:443/devices/dev1/modules/m1/", &h),
            Some(ResourceScope::Device(Identity::module("dev1", "m1")))
        );
        assert_eq!(parse_resource("localhost", &h), Some(ResourceScope::Hub));
        assert_eq!(
            parse_resource("localhost:8443/", &h),
            Some(ResourceScope::Hub)
        );
        for bad in [
            "",
            "/",
            "otherhub/devices/dev1",
            "myhub.example.com.evil/devices/dev1",
            "https://localhost/devices/dev1",
            "localhost/devices",
            "localhost/devices/",
            "localhost/devices/dev1//",
            "localhost/Devices/dev1",
            "localhost/devices/dev 1",
            "localhost/devices/dev1/modules",
            "localhost/devices/dev1/modules/",
            "localhost/devices/dev1/modules/m1/x",
            "localhost/devices/dev1/inputs/m1",
            "localhost:/devices/dev1",
            "localhost:88a/devices/dev1",
        ] {
            assert_eq!(parse_resource(bad, &h), None, "{bad}");
        }
    }

    #[test]
    fn resource_matching_accepts_csharp_double_encoding() {
        let h = hosts();
        let dev = Identity::device("dev#1");
        let module = Identity::module("dev#1", "m:1");
        // C#: Target = host/devices/UrlEncode(id), then sr = UrlEncode(Target).
        let csharp = SasToken::parse(
            "SharedAccessSignature sr=localhost%2Fdevices%2Fdev%25231&sig=AA%3D%3D&se=1",
        )
        .unwrap();
        assert_eq!(csharp.resource, "localhost/devices/dev%231");
        assert!(resource_matches_identity(&csharp.resource, &dev, &h));
        assert!(resource_matches_identity(
            "localhost/devices/dev#1",
            &dev,
            &h
        ));
        assert!(resource_matches_identity(
            "localhost/devices/dev%231/modules/m%3A1",
            &module,
            &h
        ));
        assert!(resource_matches_identity(
            "localhost/devices/dev#1/modules/m:1/",
            &module,
            &h
        ));
        // A literal `%` id still matches itself.
        assert!(resource_matches_identity(
            "localhost/devices/a%41",
            &Identity::device("a%41"),
            &h
        ));
        assert!(resource_matches_identity(
            "localhost/devices/a%41",
            &Identity::device("aA"),
            &h
        ));
        for (resource, id) in [
            ("localhost/devices/dev#1", &module),
            ("localhost/devices/dev#1/modules/m:1", &dev),
            ("localhost/devices/dev%25231", &dev),
            ("localhost", &dev),
            ("elsewhere/devices/dev#1", &dev),
            ("localhost/devices/dev#2", &dev),
            ("localhost/devices/%FF", &dev),
        ] {
            assert!(
                !resource_matches_identity(resource, id, &h),
                "{resource} {id}"
            );
        }
    }

    #[test]
    fn host_matching() {
        let h = vec!["[::1]:8883".to_owned(), "Hub.Example.com".to_owned()];
        assert!(host_matches("[::1]", &h));
        assert!(host_matches("[::1]:1", &h));
        assert!(host_matches("hub.example.COM:443", &h));
        assert!(!host_matches("", &h));
        assert!(!host_matches(":443", &h));
        assert!(!host_matches("hub.example.com.", &h));
        assert!(!host_matches("[::2]", &h));
    }
}
