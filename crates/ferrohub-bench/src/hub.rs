//! Where the hub under test is and how to reach it: command-line flags, with anything missing
//! taken from the `hub.json` a Ferrohub server writes into its data directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrohub_iothub::ConnectionString;
use serde_json::Value;

/// Flags shared by every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// Service connection string whose policy may write the registry (e.g. iothubowner).
    /// HostName may carry the HTTPS port: `HostName=localhost:8443;...`.
    #[arg(long, env = "FERROHUB_BENCH_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// PEM file with the CA certificate(s) to trust; the only roots used, for HTTPS and MQTT.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Host or address to open MQTT connections to [default: hub.json's hostname, else
    /// HostName without its port]. TLS still names HostName, so this may be an IP address.
    #[arg(long)]
    pub mqtt_host: Option<String>,
    /// MQTT-over-TLS port [default: hub.json's mqtt_port, else 8883].
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// A Ferrohub data directory: its hub.json supplies every flag not given.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Server process whose CPU time and memory to measure [default: hub.json's pid].
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// The resolved target.
#[derive(Debug, Clone)]
pub struct Hub {
    /// HostName exactly as in the connection string, port included when given: the resource of
    /// service tokens.
    pub host_name: String,
    /// HostName without its port: the TLS server name and the host in device usernames and
    /// device token resources, as a device SDK configured with that host would send them.
    pub hostname: String,
    /// `host[:port]` of the service REST API.
    pub rest_authority: String,
    pub policy_name: String,
    pub policy_key: String,
    pub ca_file: PathBuf,
    pub ca_pem: Vec<u8>,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub server_pid: Option<u32>,
    /// hub.json's Event Hubs-compatible connection string (signed with the `service` policy).
    pub eventhub_connection_string: Option<String>,
}

/// The subset of hub.json the bench uses; every field is optional because flags may supply it.
#[derive(Debug, Default)]
struct HubJson {
    hostname: Option<String>,
    mqtt_port: Option<u16>,
    https_port: Option<u16>,
    ca_file: Option<PathBuf>,
    owner_connection_string: Option<String>,
    eventhub_connection_string: Option<String>,
    pid: Option<u32>,
}

impl HubJson {
    fn load(data_dir: &Path) -> Result<HubJson> {
        let path = data_dir.join("hub.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let string = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let number = |k: &str| v.get(k).and_then(Value::as_u64);
        let port = |k: &str| -> Result<Option<u16>> {
            number(k)
                .map(u16::try_from)
                .transpose()
                .with_context(|| format!("{}: {k} is not a port", path.display()))
        };
        Ok(HubJson {
            hostname: string("hostname"),
            mqtt_port: port("mqtt_port")?,
            https_port: port("https_port")?,
            // A relative path in hub.json is relative to the directory holding it.
            ca_file: string("ca_file").map(|f| data_dir.join(f)),
            owner_connection_string: string("owner_connection_string"),
            eventhub_connection_string: string("eventhub_connection_string"),
            pid: number("pid").and_then(|p| u32::try_from(p).ok()),
        })
    }
}

impl Hub {
    pub fn resolve(args: &HubArgs) -> Result<Hub> {
        let json = match &args.data_dir {
            Some(dir) => HubJson::load(dir)?,
            None => HubJson::default(),
        };
        let cs_text = args
            .connection_string
            .clone()
            .or(json.owner_connection_string)
            .context("no service connection string: pass --connection-string or --data-dir")?;
        // The parse error never quotes the string, which holds a key.
        let cs = ConnectionString::parse(&cs_text).context("invalid --connection-string")?;
        let policy_name = cs.shared_access_key_name.context(
            "the connection string has no SharedAccessKeyName (a service policy is needed)",
        )?;
        let policy_key = cs
            .shared_access_key
            .context("the connection string has no SharedAccessKey")?;
        let (hostname, port) = split_host_port(&cs.host_name);
        let hostname = hostname.to_owned();
        let rest_authority = match (port, json.https_port) {
            (None, Some(p)) if p != 443 => format!("{hostname}:{p}"),
            _ => cs.host_name.clone(),
        };

        let ca_file = args
            .ca_file
            .clone()
            .or(json.ca_file)
            .context("no CA file: pass --ca-file or --data-dir")?;
        let ca_pem =
            std::fs::read(&ca_file).with_context(|| format!("reading {}", ca_file.display()))?;

        let mqtt_host = args
            .mqtt_host
            .clone()
            .or(json.hostname)
            .unwrap_or_else(|| hostname.clone());
        let mqtt_port = args.mqtt_port.or(json.mqtt_port).unwrap_or(8883);
        if hostname.is_empty() {
            bail!("the connection string's HostName has no host");
        }
        Ok(Hub {
            host_name: cs.host_name,
            hostname,
            rest_authority,
            policy_name,
            policy_key,
            ca_file,
            ca_pem,
            mqtt_host,
            mqtt_port,
            server_pid: args.server_pid.or(json.pid),
            eventhub_connection_string: json.eventhub_connection_string,
        })
    }

    /// An HTTPS client builder that trusts only the hub's CA.
    pub fn https_builder(&self) -> Result<reqwest::ClientBuilder> {
        let certs = reqwest::Certificate::from_pem_bundle(&self.ca_pem)
            .with_context(|| format!("reading certificates from {}", self.ca_file.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", self.ca_file.display());
        }
        let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
        Ok(builder)
    }

    /// A service SAS token signed with the connection string's policy key, valid for an hour.
    pub fn service_token(&self) -> Result<String> {
        ferrohub_iothub::sas::generate_token(
            &self.host_name,
            &self.policy_key,
            crate::registry::now_epoch() + crate::registry::TOKEN_LIFETIME_SECS,
            Some(&self.policy_name),
        )
        .context("the connection string's SharedAccessKey is not valid base64")
    }
}

/// Splits `host:port`, `[v6]:port`, or a bare host. A colon not followed by only digits is part
/// of the host (a bare IPv6 literal).
pub fn split_host_port(host_name: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host_name.strip_prefix('[') {
        if let Some((inside, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (inside, port);
        }
        return (host_name, None);
    }
    match host_name.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && !port.is_empty() => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (host_name, None),
        },
        _ => (host_name, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(split_host_port("localhost:8443"), ("localhost", Some(8443)));
        assert_eq!(
            split_host_port("hub.example.com"),
            ("hub.example.com", None)
        );
        assert_eq!(split_host_port("[::1]:443"), ("::1", Some(443)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert_eq!(split_host_port("h:x"), ("h:x", None));
    }

    #[test]
    fn hub_json_fills_missing_flags() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("ferrohub-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ca.pem"), b"not checked here")?;
        std::fs::write(
            dir.join("hub.json"),
            r#"{"hostname":"localhost","mqtt_port":18883,"https_port":18443,"ca_file":"ca.pem",
                "owner_connection_string":"HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAA",
                "pid":42}"#,
        )?;
        let args = HubArgs {
            connection_string: None,
            ca_file: None,
            mqtt_host: None,
            mqtt_port: None,
            data_dir: Some(dir.clone()),
            server_pid: None,
        };
        let hub = Hub::resolve(&args)?;
        assert_eq!(hub.host_name, "localhost");
        assert_eq!(hub.rest_authority, "localhost:18443");
        assert_eq!(hub.mqtt_host, "localhost");
        assert_eq!(hub.mqtt_port, 18883);
        assert_eq!(hub.server_pid, Some(42));
        assert_eq!(hub.policy_name, "iothubowner");
        assert_eq!(hub.ca_file, dir.join("ca.pem"));

        let flags = HubArgs {
            connection_string: Some(
                "HostName=localhost:8443;SharedAccessKeyName=p;SharedAccessKey=AAAA".into(),
            ),
            mqtt_host: Some("127.0.0.1".into()),
            mqtt_port: Some(1),
            server_pid: Some(7),
            ..args
        };
        let hub = Hub::resolve(&flags)?;
        assert_eq!(hub.rest_authority, "localhost:8443");
        assert_eq!(hub.hostname, "localhost");
        assert_eq!((hub.mqtt_host.as_str(), hub.mqtt_port), ("127.0.0.1", 1));
        assert_eq!(hub.server_pid, Some(7));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
