//! Azure IoT connection strings (`HostName=…;DeviceId=…;SharedAccessKey=…`), read and written.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::identity::Identity;

/// A device, module or service connection string. Keys are case-sensitive, as the SDKs treat
/// them; values are taken verbatim (a base64 key keeps its `=` padding).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ConnectionString {
    pub host_name: String,
    pub device_id: Option<String>,
    pub module_id: Option<String>,
    pub shared_access_key_name: Option<String>,
    pub shared_access_key: Option<String>,
    pub gateway_host_name: Option<String>,
    /// `x509=true`: the device authenticates with a client certificate instead of a key.
    pub x509: bool,
}

/// Errors never quote values: a malformed connection string may still hold a real key.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConnectionStringError {
    #[error("segment {0} is not Key=Value")]
    MalformedSegment(usize),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("key {0} appears twice")]
    DuplicateKey(&'static str),
    #[error("key {0} has an empty value")]
    EmptyValue(&'static str),
    #[error("x509 must be true or false")]
    InvalidX509,
    #[error("HostName is required")]
    MissingHostName,
    #[error("ModuleId needs a DeviceId")]
    ModuleWithoutDevice,
}

impl ConnectionString {
    pub fn parse(s: &str) -> Result<ConnectionString, ConnectionStringError> {
        let mut cs = ConnectionString::default();
        let mut host_name = None;
        let mut x509 = None;
        // Empty segments come from a trailing or doubled `;`, which portals and users produce.
        for (index, segment) in s
            .split(';')
            .enumerate()
            .filter(|(_, s)| !s.trim().is_empty())
        {
            let (key, value) = segment
                .split_once('=')
                .ok_or(ConnectionStringError::MalformedSegment(index))?;
            let key = key.trim();
            let (slot, name) = match key {
                "HostName" => (&mut host_name, "HostName"),
                "DeviceId" => (&mut cs.device_id, "DeviceId"),
                "ModuleId" => (&mut cs.module_id, "ModuleId"),
                "SharedAccessKeyName" => (&mut cs.shared_access_key_name, "SharedAccessKeyName"),
                "SharedAccessKey" => (&mut cs.shared_access_key, "SharedAccessKey"),
                "GatewayHostName" => (&mut cs.gateway_host_name, "GatewayHostName"),
                "x509" => (&mut x509, "x509"),
                _ => return Err(ConnectionStringError::UnknownKey(key.to_owned())),
            };
            if value.is_empty() {
                return Err(ConnectionStringError::EmptyValue(name));
            }
            if slot.replace(value.to_owned()).is_some() {
                return Err(ConnectionStringError::DuplicateKey(name));
            }
        }
        cs.host_name = host_name.ok_or(ConnectionStringError::MissingHostName)?;
        cs.x509 = match x509.as_deref() {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => return Err(ConnectionStringError::InvalidX509),
        };
        if cs.module_id.is_some() && cs.device_id.is_none() {
            return Err(ConnectionStringError::ModuleWithoutDevice);
        }
        Ok(cs)
    }

    /// The device or module this string connects as, if it names one.
    pub fn identity(&self) -> Option<Identity> {
        let device_id = self.device_id.clone()?;
        Some(Identity {
            device_id,
            module_id: self.module_id.clone(),
        })
    }
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConnectionString::parse(s)
    }
}

/// Canonical order, the one the Azure portal shows: HostName, DeviceId, ModuleId,
/// SharedAccessKeyName, SharedAccessKey, x509, GatewayHostName.
impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName={}", self.host_name)?;
        let optional = [
            ("DeviceId", &self.device_id),
            ("ModuleId", &self.module_id),
            ("SharedAccessKeyName", &self.shared_access_key_name),
            ("SharedAccessKey", &self.shared_access_key),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                write!(f, ";{key}={value}")?;
            }
        }
        if self.x509 {
            f.write_str(";x509=true")?;
        }
        if let Some(gateway) = &self.gateway_host_name {
            write!(f, ";GatewayHostName={gateway}")?;
        }
        Ok(())
    }
}

/// Hides the key so connection strings can be logged with `{:?}`.
impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("shared_access_key_name", &self.shared_access_key_name)
            .field(
                "shared_access_key",
                &self.shared_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("gateway_host_name", &self.gateway_host_name)
            .field("x509", &self.x509)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=";

    #[test]
    fn device_string_round_trips() {
        let s = format!("HostName=localhost;DeviceId=dev1;SharedAccessKey={KEY}");
        let cs = ConnectionString::parse(&s).unwrap();
        assert_eq!(cs.host_name, "localhost");
        assert_eq!(cs.device_id.as_deref(), Some("dev1"));
        assert_eq!(cs.shared_access_key.as_deref(), Some(KEY));
        assert_eq!(cs.identity(), Some(Identity::device("dev1")));
        assert_eq!(cs.to_string(), s);
    }

    #[test]
    fn any_order_is_written_back_canonically() {
        let cs: ConnectionString = format!(
            "GatewayHostName=gw.local;SharedAccessKey={KEY};ModuleId=m1;DeviceId=d1;HostName=hub.example.com;"
        )
        .parse()
        .unwrap();
        assert_eq!(cs.identity(), Some(Identity::module("d1", "m1")));
        assert_eq!(
            cs.to_string(),
            format!("HostName=hub.example.com;DeviceId=d1;ModuleId=m1;SharedAccessKey={KEY};GatewayHostName=gw.local")
        );
        assert_eq!(ConnectionString::parse(&cs.to_string()).unwrap(), cs);
    }

    #[test]
    fn service_and_x509_strings() {
        let svc = ConnectionString::parse(&format!(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"
        ))
        .unwrap();
        assert_eq!(svc.identity(), None);
        assert_eq!(svc.shared_access_key_name.as_deref(), Some("iothubowner"));
        assert_eq!(svc.host_name, "localhost:8443");

        let x = ConnectionString::parse("HostName=h;DeviceId=d;x509=true").unwrap();
        assert!(x.x509);
        assert_eq!(x.to_string(), "HostName=h;DeviceId=d;x509=true");
        assert!(
            !ConnectionString::parse("HostName=h;DeviceId=d;x509=False")
                .unwrap()
                .x509
        );
    }

    #[test]
    fn errors() {
        use ConnectionStringError::*;
        let cases = [
            ("", MissingHostName),
            ("DeviceId=d", MissingHostName),
            ("HostName=h;DeviceId", MalformedSegment(1)),
            ("HostName=h;hostname=x", UnknownKey("hostname".to_owned())),
            (
                "HostName=h;SharedAccessSignature=x",
                UnknownKey("SharedAccessSignature".to_owned()),
            ),
            ("HostName=h;HostName=i", DuplicateKey("HostName")),
            ("HostName=", EmptyValue("HostName")),
            ("HostName=h;x509=yes", InvalidX509),
            ("HostName=h;ModuleId=m", ModuleWithoutDevice),
        ];
        for (s, expected) in cases {
            assert_eq!(ConnectionString::parse(s), Err(expected), "{s}");
        }
    }

    #[test]
    fn debug_redacts_the_key() {
        let cs = ConnectionString::parse(&format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}"))
            .unwrap();
        let dbg = format!("{cs:?}");
        assert!(!dbg.contains(KEY));
        assert!(dbg.contains("<redacted>"));
    }
}
