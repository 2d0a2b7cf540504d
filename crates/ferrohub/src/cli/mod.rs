//! The command line's client side: `device` (with bulk `import`), `module`, `certificate`, `config`,
//! `sas-token`, `monitor`, `c2d`, `twin`, `invoke`, `query`, `job`, `model`, `dps` and routing
//! (`endpoint`, `route`, `enrichment`, `fallback`) and `explorer` (a web explorer sign-in URL), all speaking the service REST
//! API with the owner connection
//! string, like `az iot hub`.

mod client;
mod config;
mod dps;
mod explorer;
mod import;
mod jobs;
mod models;
mod monitor;
mod output;
mod query;
mod routing;
mod service;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use ferrohub_iothub::sas::generate_token;
use ferrohub_iothub::ConnectionString;
use ferrohub_store::{
    AuthType, Authentication, Capabilities, Status, SymmetricKey, X509Thumbprint,
};

use crate::api::types::{
    AuthRequest, CertificateDescription, CertificateList, CertificateRequest,
    CertificateRequestProperties, DeviceResponse, IdentityRequest, ModuleResponse,
};

pub use client::ApiClient;
pub use config::{run_config, ConfigCommand};
pub use dps::{run_dps, DpsCommand};
pub use explorer::run_explorer;
pub use jobs::{run_job, JobCommand};
pub use models::{run_model, ModelCommand};
pub use monitor::{run_monitor, MonitorArgs};
use output::Output;
pub use query::{run_query, QueryArgs};
pub use routing::{
    run_endpoint, run_enrichment, run_fallback, run_route, EndpointCommand, EnrichmentCommand,
    FallbackCommand, RouteCommand,
};
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
    fn to_request(&self) -> AuthRequest {
        match self.auth {
            AuthChoice::Sas => AuthRequest {
                auth_type: Some(AuthType::Sas),
                symmetric_key: Some(SymmetricKey {
                    primary_key: self.primary_key.clone(),
                    secondary_key: self.secondary_key.clone(),
                }),
                x509_thumbprint: None,
            },
            AuthChoice::X509Thumbprint => AuthRequest {
                auth_type: Some(AuthType::SelfSigned),
                symmetric_key: None,
                x509_thumbprint: Some(X509Thumbprint {
                    primary_thumbprint: self.primary_thumbprint.clone(),
                    secondary_thumbprint: self.secondary_thumbprint.clone(),
                }),
            },
            AuthChoice::X509Ca => AuthRequest {
                auth_type: Some(AuthType::CertificateAuthority),
                ..Default::default()
            },
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
    /// Create, update or delete devices in bulk from a JSON-lines file (`-` for stdin): one
    /// IoT Hub import entry per line (`{"id", "importMode", "status", "authentication",
    /// "tags", "properties": {"desired"}}`), sent 100 at a time.
    Import {
        file: PathBuf,
        /// The importMode of lines that name none (create, update, delete, updateTwin, ...).
        #[arg(long, default_value = "create", value_parser = parse_import_mode)]
        mode: crate::api::types::ImportMode,
    },
}

fn parse_import_mode(s: &str) -> Result<crate::api::types::ImportMode, String> {
    crate::api::types::ImportMode::try_from(s.to_string())
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

/// `eventhub-connection-string`: the string Event Hubs clients (`azure-eventhub`,
/// `@azure/event-hubs`, Functions triggers) take, like `az iot hub connection-string show
/// --default-eventhub`.
#[derive(Debug, Args)]
pub struct EventhubArgs {
    /// With --connection-string (a hub elsewhere): the hub's AMQP port.
    #[arg(long, default_value_t = 5671)]
    pub amqp_port: u16,
    /// With --connection-string: the event hub's name [default: the host name's first label].
    #[arg(long)]
    pub hub_name: Option<String>,
}

/// Prints the Event Hubs-compatible connection string: from the running hub's `hub.json`, or
/// built from --connection-string's policy and host.
pub fn run_eventhub_connection_string(args: &ClientArgs, e: EventhubArgs) -> anyhow::Result<()> {
    let text = match &args.connection_string {
        None => {
            let info = crate::server::HubInfo::load(&args.data_dir)
                .context("no --connection-string or FERROHUB_CONNECTION_STRING given")?;
            if info.eventhub_connection_string.is_empty() {
                bail!(
                    "{} has no Event Hubs connection string: the hub there predates the AMQP endpoint; restart it",
                    args.data_dir.join(crate::server::HUB_FILE).display()
                );
            }
            info.eventhub_connection_string
        }
        Some(_) => {
            let cs = load_connection_string(args)?;
            let (Some(name), Some(key)) = (&cs.shared_access_key_name, &cs.shared_access_key)
            else {
                bail!("the connection string must name a policy (SharedAccessKeyName and SharedAccessKey)");
            };
            let host = client::strip_port(&cs.host_name).to_string();
            let entity = e
                .hub_name
                .unwrap_or_else(|| host.split('.').next().unwrap_or(&host).to_string());
            crate::server::eventhub_connection_string(&host, e.amqp_port, &entity, name, key)
        }
    };
    println!("{text}");
    Ok(())
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
            let body = IdentityRequest {
                device_id: Some(device_id.clone()),
                status: Some(if disabled {
                    Status::Disabled
                } else {
                    Status::Enabled
                }),
                authentication: Some(auth.to_request()),
                capabilities: Some(Capabilities { iot_edge: false }),
                ..Default::default()
            };
            let d: DeviceResponse = api
                .put_as(&format!("/devices/{}", enc(&device_id)), &body, None)
                .await?;
            out.device(&d, "created device")
        }
        DeviceCommand::List { top } => {
            let list: Vec<DeviceResponse> = api.get_as(&format!("/devices?top={top}")).await?;
            out.device_list(&list)
        }
        DeviceCommand::Show { device_id } => {
            let d: DeviceResponse = api.get_as(&format!("/devices/{}", enc(&device_id))).await?;
            out.device(&d, "")
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
            let d: DeviceResponse = api.get_as(&path).await?;
            let body = IdentityRequest {
                device_id: Some(d.device_id),
                status: Some(match status {
                    Some(StatusChoice::Enabled) => Status::Enabled,
                    Some(StatusChoice::Disabled) => Status::Disabled,
                    None => d.status,
                }),
                status_reason: status_reason.or(d.status_reason),
                authentication: Some(with_keys(&d.authentication, primary_key, secondary_key)),
                capabilities: Some(d.capabilities),
                ..Default::default()
            };
            let cond = etag.unwrap_or_else(|| "*".into());
            let d: DeviceResponse = api.put_as(&path, &body, Some(&cond)).await?;
            out.device(&d, "updated device")
        }
        DeviceCommand::Delete { device_id, etag } => {
            api.delete(&format!("/devices/{}", enc(&device_id)), etag.as_deref())
                .await?;
            out.done(&format!("deleted device {device_id}"))
        }
        DeviceCommand::ConnectionString { device_id, key } => {
            let d: DeviceResponse = api.get_as(&format!("/devices/{}", enc(&device_id))).await?;
            let cs = identity_connection_string(&api, &d.device_id, None, &d.authentication, key)?;
            out.connection_string(&cs)
        }
        DeviceCommand::Import { file, mode } => {
            import::run_import(&api, &file, mode, args.output).await
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
            let body = IdentityRequest {
                device_id: Some(device_id.clone()),
                module_id: Some(module_id.clone()),
                authentication: Some(auth.to_request()),
                ..Default::default()
            };
            let m: ModuleResponse = api
                .put_as(&module_path(&device_id, &module_id), &body, None)
                .await?;
            out.module(&m, "created module")
        }
        ModuleCommand::List { device_id } => {
            let list: Vec<ModuleResponse> = api
                .get_as(&format!("/devices/{}/modules", enc(&device_id)))
                .await?;
            out.module_list(&list)
        }
        ModuleCommand::Show {
            device_id,
            module_id,
        } => {
            let m: ModuleResponse = api.get_as(&module_path(&device_id, &module_id)).await?;
            out.module(&m, "")
        }
        ModuleCommand::Update {
            device_id,
            module_id,
            primary_key,
            secondary_key,
            etag,
        } => {
            let path = module_path(&device_id, &module_id);
            let m: ModuleResponse = api.get_as(&path).await?;
            let body = IdentityRequest {
                device_id: Some(m.device_id),
                module_id: Some(m.module_id),
                authentication: Some(with_keys(&m.authentication, primary_key, secondary_key)),
                managed_by: m.managed_by,
                ..Default::default()
            };
            let cond = etag.unwrap_or_else(|| "*".into());
            let m: ModuleResponse = api.put_as(&path, &body, Some(&cond)).await?;
            out.module(&m, "updated module")
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
            let m: ModuleResponse = api.get_as(&module_path(&device_id, &module_id)).await?;
            let cs = identity_connection_string(
                &api,
                &m.device_id,
                Some(&module_id),
                &m.authentication,
                key,
            )?;
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
            let body = CertificateRequest {
                properties: Some(CertificateRequestProperties {
                    certificate: Some(pem),
                }),
                certificate: None,
            };
            let c: CertificateDescription = api
                .put_as(&format!("/certificates/{}", enc(&name)), &body, Some("*"))
                .await?;
            out.certificate(&c, "registered CA certificate")
        }
        CertificateCommand::List => {
            let list: CertificateList = api.get_as("/certificates").await?;
            out.certificate_list(&list)
        }
        CertificateCommand::Show { name } => {
            let c: CertificateDescription =
                api.get_as(&format!("/certificates/{}", enc(&name))).await?;
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
                    let auth = match &t.module {
                        Some(_) => api.get_as::<ModuleResponse>(&path).await?.authentication,
                        None => api.get_as::<DeviceResponse>(&path).await?.authentication,
                    };
                    (identity_key(&auth, t.key_type)?, api.hub_host().to_string())
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

/// The authentication to send back for an update: the current one, or SAS with the given
/// keys replacing the current ones.
fn with_keys(
    current: &Authentication,
    primary: Option<String>,
    secondary: Option<String>,
) -> AuthRequest {
    if primary.is_none() && secondary.is_none() {
        return AuthRequest {
            auth_type: Some(current.auth_type),
            symmetric_key: Some(current.symmetric_key.clone()),
            x509_thumbprint: Some(current.x509_thumbprint.clone()),
        };
    }
    let keys = &current.symmetric_key;
    AuthRequest {
        auth_type: Some(AuthType::Sas),
        symmetric_key: Some(SymmetricKey {
            primary_key: primary.or_else(|| keys.primary_key.clone()),
            secondary_key: secondary.or_else(|| keys.secondary_key.clone()),
        }),
        x509_thumbprint: Some(current.x509_thumbprint.clone()),
    }
}

fn identity_key(auth: &Authentication, which: KeyChoice) -> anyhow::Result<String> {
    let key = match which {
        KeyChoice::Primary => &auth.symmetric_key.primary_key,
        KeyChoice::Secondary => &auth.symmetric_key.secondary_key,
    };
    key.clone()
        .context("this identity has no symmetric key (it uses X.509)")
}

fn identity_connection_string(
    api: &ApiClient,
    device_id: &str,
    module_id: Option<&str>,
    auth: &Authentication,
    which: KeyChoice,
) -> anyhow::Result<String> {
    let x509 = auth.auth_type != AuthType::Sas;
    let cs = ConnectionString {
        host_name: api.hub_host().to_string(),
        device_id: Some(device_id.to_string()),
        module_id: module_id.map(str::to_string),
        shared_access_key: if x509 {
            None
        } else {
            Some(identity_key(auth, which)?)
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
