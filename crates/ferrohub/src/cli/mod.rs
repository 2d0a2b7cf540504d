//! The command line's client side: `device`, `module`, `certificate`, `sas-token`, `monitor`,
//! `c2d`, `twin` and `invoke`, all speaking the service REST API with the owner connection
//! string, like `az iot hub`.

mod client;
mod monitor;
mod output;
mod service;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use ferrohub_iothub::sas::generate_token;
use ferrohub_iothub::ConnectionString;
use serde_json::{json, Value};

pub use client::ApiClient;
pub use monitor::{run_monitor, MonitorArgs};
use output::Output;
pub use service::{run_c2d, run_invoke, run_twin, C2dCommand, InvokeArgs, TwinCommand};

/// How the CLI finds and trusts the hub.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Service connection string (a policy with registry rights, e.g. iothubowner).
    /// Default: the owner connection string of the hub running on --data-dir.
    #[arg(
        long,
        env = "FERROHUB_CONNECTION_STRING",
        global = true,
        hide_env_values = true
    )]
    pub connection_string: Option<String>,
    /// Data directory of a local hub, to read its connection string and CA from.
    #[arg(long, env = "FERROHUB_DATA_DIR", global = true, default_value = crate::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// CA certificate (PEM) to trust for the hub's HTTPS endpoint.
    #[arg(long, env = "FERROHUB_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text, global = true)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthChoice {
    /// Symmetric keys (SAS tokens).
    Sas,
    /// A self-signed X.509 certificate registered by thumbprint.
    X509Thumbprint,
    /// An X.509 certificate signed by a registered CA (CN = identity).
    X509Ca,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyChoice {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusChoice {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Args)]
pub struct IdentityAuthArgs {
    /// Authentication kind.
    #[arg(long, value_enum, default_value_t = AuthChoice::Sas)]
    pub auth: AuthChoice,
    /// Primary symmetric key (base64); generated when absent.
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (base64); generated when absent.
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// SHA-1 or SHA-256 thumbprint of the primary certificate.
    #[arg(long)]
    pub primary_thumbprint: Option<String>,
    /// SHA-1 or SHA-256 thumbprint of the secondary certificate.
    #[arg(long)]
    pub secondary_thumbprint: Option<String>,
}

impl IdentityAuthArgs {
    fn to_json(&self) -> Value {
        match self.auth {
            AuthChoice::Sas => json!({
                "type": "sas",
                "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key},
            }),
            AuthChoice::X509Thumbprint => json!({
                "type": "selfSigned",
                "x509Thumbprint": {
                    "primaryThumbprint": self.primary_thumbprint,
                    "secondaryThumbprint": self.secondary_thumbprint,
                },
            }),
            AuthChoice::X509Ca => json!({"type": "certificateAuthority"}),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device.
    Create {
        device_id: String,
        #[command(flatten)]
        auth: IdentityAuthArgs,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List devices.
    List {
        #[arg(long, default_value_t = 1000)]
        top: u32,
    },
    /// Show one device.
    Show { device_id: String },
    /// Change status or keys.
    Update {
        device_id: String,
        #[arg(long, value_enum)]
        status: Option<StatusChoice>,
        #[arg(long)]
        status_reason: Option<String>,
        /// New primary key (base64).
        #[arg(long)]
        primary_key: Option<String>,
        /// New secondary key (base64).
        #[arg(long)]
        secondary_key: Option<String>,
        /// Only update if the device still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Delete a device and its modules.
    Delete {
        device_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
    /// Print the device's connection string.
    ConnectionString {
        device_id: String,
        #[arg(long, value_enum, default_value_t = KeyChoice::Primary)]
        key: KeyChoice,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Register a module on a device.
    Create {
        device_id: String,
        module_id: String,
        #[command(flatten)]
        auth: IdentityAuthArgs,
    },
    /// List a device's modules.
    List { device_id: String },
    /// Show one module.
    Show {
        device_id: String,
        module_id: String,
    },
    /// Change a module's keys.
    Update {
        device_id: String,
        module_id: String,
        #[arg(long)]
        primary_key: Option<String>,
        #[arg(long)]
        secondary_key: Option<String>,
        #[arg(long)]
        etag: Option<String>,
    },
    /// Delete a module.
    Delete {
        device_id: String,
        module_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
    /// Print the module's connection string.
    ConnectionString {
        device_id: String,
        module_id: String,
        #[arg(long, value_enum, default_value_t = KeyChoice::Primary)]
        key: KeyChoice,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertificateCommand {
    /// Register a CA certificate (PEM file) for CA-signed X.509 devices.
    Add { name: String, file: PathBuf },
    /// List registered CA certificates.
    List,
    /// Show one.
    Show { name: String },
    /// Remove one.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct SasTokenArgs {
    /// Device the token is for.
    #[arg(long, short = 'd', conflicts_with = "policy")]
    pub device: Option<String>,
    /// Module the token is for (with --device).
    #[arg(long, short = 'm', requires = "device")]
    pub module: Option<String>,
    /// Make a hub-level token signed with this policy's key (default: the connection string's).
    #[arg(long)]
    pub policy: Option<String>,
    /// Sign with this key (base64) instead of looking it up.
    #[arg(long)]
    pub key: Option<String>,
    /// Which of the identity's keys to use when looking it up.
    #[arg(long, value_enum, default_value_t = KeyChoice::Primary)]
    pub key_type: KeyChoice,
    /// Validity in seconds.
    #[arg(long = "duration", alias = "du", default_value_t = 3600)]
    pub duration: u64,
}

pub async fn run_device(args: &ClientArgs, cmd: DeviceCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        DeviceCommand::Create {
            device_id,
            auth,
            disabled,
        } => {
            let body = json!({
                "deviceId": device_id,
                "status": if disabled { "disabled" } else { "enabled" },
                "authentication": auth.to_json(),
                "capabilities": {"iotEdge": false},
            });
            let d = api
                .put(&format!("/devices/{}", enc(&device_id)), &body, None)
                .await?;
            out.identity(&d, "created device")
        }
        DeviceCommand::List { top } => {
            let list = api.get(&format!("/devices?top={top}")).await?;
            out.identity_list(&list)
        }
        DeviceCommand::Show { device_id } => {
            let d = api.get(&format!("/devices/{}", enc(&device_id))).await?;
            out.identity(&d, "")
        }
        DeviceCommand::Update {
            device_id,
            status,
            status_reason,
            primary_key,
            secondary_key,
            etag,
        } => {
            let path = format!("/devices/{}", enc(&device_id));
            let mut d = api.get(&path).await?;
            if let Some(s) = status {
                d["status"] = json!(if s == StatusChoice::Enabled {
                    "enabled"
                } else {
                    "disabled"
                });
            }
            if let Some(r) = status_reason {
                d["statusReason"] = json!(r);
            }
            set_keys(&mut d, primary_key, secondary_key);
            let cond = etag.unwrap_or_else(|| "*".into());
            let d = api.put(&path, &d, Some(&cond)).await?;
            out.identity(&d, "updated device")
        }
        DeviceCommand::Delete { device_id, etag } => {
            api.delete(&format!("/devices/{}", enc(&device_id)), etag.as_deref())
                .await?;
            out.done(&format!("deleted device {device_id}"))
        }
        DeviceCommand::ConnectionString { device_id, key } => {
            let d = api.get(&format!("/devices/{}", enc(&device_id))).await?;
            let cs = identity_connection_string(&api, &d, None, key)?;
            out.connection_string(&cs)
        }
    }
}

pub async fn run_module(args: &ClientArgs, cmd: ModuleCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        ModuleCommand::Create {
            device_id,
            module_id,
            auth,
        } => {
            let body = json!({
                "deviceId": device_id,
                "moduleId": module_id,
                "authentication": auth.to_json(),
            });
            let m = api
                .put(&module_path(&device_id, &module_id), &body, None)
                .await?;
            out.identity(&m, "created module")
        }
        ModuleCommand::List { device_id } => {
            let list = api
                .get(&format!("/devices/{}/modules", enc(&device_id)))
                .await?;
            out.identity_list(&list)
        }
        ModuleCommand::Show {
            device_id,
            module_id,
        } => {
            let m = api.get(&module_path(&device_id, &module_id)).await?;
            out.identity(&m, "")
        }
        ModuleCommand::Update {
            device_id,
            module_id,
            primary_key,
            secondary_key,
            etag,
        } => {
            let path = module_path(&device_id, &module_id);
            let mut m = api.get(&path).await?;
            set_keys(&mut m, primary_key, secondary_key);
            let cond = etag.unwrap_or_else(|| "*".into());
            let m = api.put(&path, &m, Some(&cond)).await?;
            out.identity(&m, "updated module")
        }
        ModuleCommand::Delete {
            device_id,
            module_id,
            etag,
        } => {
            api.delete(&module_path(&device_id, &module_id), etag.as_deref())
                .await?;
            out.done(&format!("deleted module {device_id}/{module_id}"))
        }
        ModuleCommand::ConnectionString {
            device_id,
            module_id,
            key,
        } => {
            let m = api.get(&module_path(&device_id, &module_id)).await?;
            let cs = identity_connection_string(&api, &m, Some(&module_id), key)?;
            out.connection_string(&cs)
        }
    }
}

pub async fn run_certificate(args: &ClientArgs, cmd: CertificateCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        CertificateCommand::Add { name, file } => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let c = api
                .put(
                    &format!("/certificates/{}", enc(&name)),
                    &json!({"properties": {"certificate": pem}}),
                    Some("*"),
                )
                .await?;
            out.certificate(&c, "registered CA certificate")
        }
        CertificateCommand::List => {
            let list = api.get("/certificates").await?;
            out.certificate_list(&list)
        }
        CertificateCommand::Show { name } => {
            let c = api.get(&format!("/certificates/{}", enc(&name))).await?;
            out.certificate(&c, "")
        }
        CertificateCommand::Delete { name } => {
            api.delete(&format!("/certificates/{}", enc(&name)), None)
                .await?;
            out.done(&format!("deleted CA certificate {name}"))
        }
    }
}

pub async fn run_sas_token(args: &ClientArgs, t: SasTokenArgs) -> anyhow::Result<()> {
    let out = Output::new(args.output);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let expiry = now + t.duration;
    let (token, resource) = match &t.device {
        Some(device) => {
            let resource = match &t.module {
                Some(m) => format!("/devices/{device}/modules/{m}"),
                None => format!("/devices/{device}"),
            };
            let (key, host) = match &t.key {
                Some(k) => (k.clone(), hub_host_from_args(args)?),
                None => {
                    let api = ApiClient::from_args(args)?;
                    let path = match &t.module {
                        Some(m) => module_path(device, m),
                        None => format!("/devices/{}", enc(device)),
                    };
                    let id = api.get(&path).await?;
                    (identity_key(&id, t.key_type)?, api.hub_host().to_string())
                }
            };
            let resource = format!("{host}{resource}");
            (generate_token(&resource, &key, expiry, None)?, resource)
        }
        None => {
            let cs = load_connection_string(args)?;
            let host = cs.host_name.clone();
            let name = t
                .policy
                .clone()
                .or(cs.shared_access_key_name.clone())
                .context("the connection string has no SharedAccessKeyName; pass --policy")?;
            let key = match (&t.key, &t.policy) {
                (Some(k), _) => k.clone(),
                (None, Some(p)) if Some(p) != cs.shared_access_key_name.as_ref() => {
                    bail!("pass --key with the key of policy {p:?}")
                }
                _ => cs
                    .shared_access_key
                    .clone()
                    .context("the connection string has no SharedAccessKey")?,
            };
            (generate_token(&host, &key, expiry, Some(&name))?, host)
        }
    };
    out.sas_token(&token, &resource, expiry)
}

fn set_keys(doc: &mut Value, primary: Option<String>, secondary: Option<String>) {
    if primary.is_none() && secondary.is_none() {
        return;
    }
    doc["authentication"]["type"] = json!("sas");
    if let Some(p) = primary {
        doc["authentication"]["symmetricKey"]["primaryKey"] = json!(p);
    }
    if let Some(s) = secondary {
        doc["authentication"]["symmetricKey"]["secondaryKey"] = json!(s);
    }
}

fn identity_key(doc: &Value, which: KeyChoice) -> anyhow::Result<String> {
    let field = match which {
        KeyChoice::Primary => "primaryKey",
        KeyChoice::Secondary => "secondaryKey",
    };
    doc["authentication"]["symmetricKey"][field]
        .as_str()
        .map(str::to_string)
        .context("this identity has no symmetric key (it uses X.509)")
}

fn identity_connection_string(
    api: &ApiClient,
    doc: &Value,
    module_id: Option<&str>,
    which: KeyChoice,
) -> anyhow::Result<String> {
    let device_id = doc["deviceId"]
        .as_str()
        .context("response has no deviceId")?;
    let x509 = doc["authentication"]["type"].as_str() != Some("sas");
    let cs = ConnectionString {
        host_name: api.hub_host().to_string(),
        device_id: Some(device_id.to_string()),
        module_id: module_id.map(str::to_string),
        shared_access_key: if x509 {
            None
        } else {
            Some(identity_key(doc, which)?)
        },
        x509,
        ..Default::default()
    };
    Ok(cs.to_string())
}

fn module_path(device: &str, module: &str) -> String {
    format!("/devices/{}/modules/{}", enc(device), enc(module))
}

/// Percent-encodes an id for a URL path segment.
fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn load_connection_string(args: &ClientArgs) -> anyhow::Result<ConnectionString> {
    let text = match &args.connection_string {
        Some(cs) => cs.clone(),
        None => {
            crate::server::HubInfo::load(&args.data_dir)
                .context("no --connection-string or FERROHUB_CONNECTION_STRING given")?
                .owner_connection_string
        }
    };
    ConnectionString::parse(&text).context("invalid connection string")
}

fn hub_host_from_args(args: &ClientArgs) -> anyhow::Result<String> {
    let cs = load_connection_string(args)?;
    Ok(client::strip_port(&cs.host_name).to_string())
}
