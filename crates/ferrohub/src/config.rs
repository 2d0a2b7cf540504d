//! Server configuration: defaults, overridden by a TOML file, then environment variables, then
//! command-line flags (clap merges the last two).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

pub const DEFAULT_DATA_DIR: &str = "ferrohub-data";

/// `ferrohub serve` flags. Every field is optional so the config file can fill what is unset.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (default: ./ferrohub.toml when it exists).
    #[arg(long, env = "FERROHUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the database, certificates and hub.json.
    #[arg(long, env = "FERROHUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Host name devices use (repeat for more; the first is the hub's name). Default: localhost.
    #[arg(long = "hostname", env = "FERROHUB_HOSTNAME", value_delimiter = ',')]
    pub hostnames: Vec<String>,
    /// Address for MQTT over TLS.
    #[arg(long, env = "FERROHUB_MQTT_BIND")]
    pub mqtt_bind: Option<SocketAddr>,
    /// Address for HTTPS: the service REST API and MQTT over WebSocket.
    #[arg(long, env = "FERROHUB_HTTPS_BIND")]
    pub https_bind: Option<SocketAddr>,
    /// Address for AMQP over TLS: the Event Hubs-compatible endpoint.
    #[arg(long, env = "FERROHUB_AMQP_BIND")]
    pub amqp_bind: Option<SocketAddr>,
    /// Address for the metrics listener (plain HTTP: Prometheus `/metrics`, `/healthz`,
    /// `/readyz`), or `off`. Default: 127.0.0.1:9464.
    #[arg(long, env = "FERROHUB_METRICS_BIND")]
    pub metrics_bind: Option<String>,
    /// How log lines are written to stderr: `text` for people, `json` (one object per line)
    /// for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "FERROHUB_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Event Hubs-compatible name of the telemetry stream (default: the first label of the
    /// first host name).
    #[arg(long, env = "FERROHUB_HUB_NAME")]
    pub hub_name: Option<String>,
    /// Server certificate chain (PEM). Without it a development CA and certificate are created.
    #[arg(long, env = "FERROHUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "FERROHUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA file devices should trust, printed at start-up (optional with --tls-cert).
    #[arg(long, env = "FERROHUB_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Telemetry partitions (fixed when the telemetry log is first created).
    #[arg(long, env = "FERROHUB_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Engine of newly created telemetry logs (the built-in stream and custom endpoint
    /// streams): `sqlite` (default) or `segment`. A log that already exists keeps its engine.
    #[arg(long, value_enum, env = "FERROHUB_TELEMETRY_ENGINE")]
    pub telemetry_engine: Option<TelemetryEngine>,
    /// How long telemetry is kept, in hours (1 to 168).
    #[arg(long, env = "FERROHUB_RETENTION_HOURS")]
    pub retention_hours: Option<u32>,
    /// Disk budget for telemetry in MiB; the oldest messages go first when it is exceeded.
    #[arg(long, env = "FERROHUB_TELEMETRY_MAX_MB")]
    pub telemetry_max_mb: Option<u64>,
    /// Time to live of cloud-to-device messages sent without an expiry, in seconds (60 to
    /// 172800; default 3600).
    #[arg(long, env = "FERROHUB_C2D_TTL_SECS")]
    pub c2d_ttl_secs: Option<u64>,
    /// Deliveries of a cloud-to-device message before it is dead-lettered (1 to 100; default 10).
    #[arg(long, env = "FERROHUB_C2D_MAX_DELIVERY_COUNT")]
    pub c2d_max_delivery_count: Option<u32>,
    /// Twin reads per second for the whole hub (device GETs and service reads); off by default.
    #[arg(long, env = "FERROHUB_THROTTLE_TWIN_READS")]
    pub throttle_twin_reads: Option<u32>,
    /// Twin updates per second (reported patches and service updates); off by default.
    #[arg(long, env = "FERROHUB_THROTTLE_TWIN_UPDATES")]
    pub throttle_twin_updates: Option<u32>,
    /// Direct method calls per second; off by default.
    #[arg(long, env = "FERROHUB_THROTTLE_METHOD_CALLS")]
    pub throttle_method_calls: Option<u32>,
    /// Device connections at once, MQTT over TLS and over WebSocket together (default
    /// 200000). Past it, new TLS sockets wait in the accept queue and WebSocket upgrades are
    /// refused with 503.
    #[arg(long, env = "FERROHUB_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// AMQP connections over TLS at once (back ends: Event Hubs readers, C2D senders;
    /// default 10000). Past it, new sockets wait in the accept queue. AMQP over WebSocket
    /// counts against --max-connections instead, as MQTT over WebSocket does.
    #[arg(long, env = "FERROHUB_AMQP_MAX_CONNECTIONS")]
    pub amqp_max_connections: Option<usize>,
    /// Seconds an HTTPS client has to send a complete request head: from the TLS handshake
    /// for the first request, from its first byte for later ones (default 10).
    #[arg(long, env = "FERROHUB_HTTPS_HEADER_TIMEOUT_SECS")]
    pub https_header_timeout_secs: Option<u64>,
    /// Seconds an HTTPS connection may stay open with no request in flight after its last
    /// response (default 60).
    #[arg(long, env = "FERROHUB_HTTPS_IDLE_TIMEOUT_SECS")]
    pub https_idle_timeout_secs: Option<u64>,
    /// Seconds an HTTPS client has to send a whole request body (default 30).
    #[arg(long, env = "FERROHUB_HTTPS_BODY_TIMEOUT_SECS")]
    pub https_body_timeout_secs: Option<u64>,
    /// Service API requests the hub works on at once; more are answered 429 with Retry-After
    /// at once, so a flood slows its clients instead of growing the hub (default 256).
    #[arg(long, env = "FERROHUB_HTTPS_MAX_REQUESTS")]
    pub https_max_requests: Option<usize>,
    /// Seconds a client has to finish the TLS handshake, on both listeners (default 10).
    #[arg(long, env = "FERROHUB_TLS_HANDSHAKE_TIMEOUT_SECS")]
    pub tls_handshake_timeout_secs: Option<u64>,
    /// MQTT over TLS uses Ferrohub's own TLS stream over rustls' unbuffered API, which holds
    /// no buffers while a connection idles (default true; false: tokio-rustls' stream).
    #[arg(long, env = "FERROHUB_MQTT_UNBUFFERED_TLS")]
    pub mqtt_unbuffered_tls: Option<bool>,
    /// Seconds a web explorer session lasts without a request (default 1800).
    #[arg(long, env = "FERROHUB_EXPLORER_IDLE_TIMEOUT_SECS")]
    pub explorer_idle_timeout_secs: Option<u64>,
    /// Seconds a web explorer session lasts at most, however busy (default 43200).
    #[arg(long, env = "FERROHUB_EXPLORER_SESSION_MAX_SECS")]
    pub explorer_session_max_secs: Option<u64>,
    /// A read-only directory laid out as the Device Models Repository
    /// (`dtmi/com/example/thermostat-1.json`), searched after the models added to the hub.
    #[arg(long, env = "FERROHUB_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// The device provisioning service's ID scope (default: one generated on first start,
    /// `0ne` and 8 hex digits, kept in the data directory).
    #[arg(long, env = "FERROHUB_DPS_ID_SCOPE")]
    pub dps_id_scope: Option<String>,
}

/// The config file's shape: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    hostnames: Option<Vec<String>>,
    mqtt_bind: Option<SocketAddr>,
    https_bind: Option<SocketAddr>,
    amqp_bind: Option<SocketAddr>,
    metrics_bind: Option<String>,
    hub_name: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    max_packet_size: Option<usize>,
    partitions: Option<u32>,
    telemetry_engine: Option<TelemetryEngine>,
    retention_hours: Option<u32>,
    telemetry_max_mb: Option<u64>,
    c2d_ttl_secs: Option<u64>,
    c2d_max_delivery_count: Option<u32>,
    throttle_twin_reads: Option<u32>,
    throttle_twin_updates: Option<u32>,
    throttle_method_calls: Option<u32>,
    max_connections: Option<usize>,
    amqp_max_connections: Option<usize>,
    https_header_timeout_secs: Option<u64>,
    https_idle_timeout_secs: Option<u64>,
    https_body_timeout_secs: Option<u64>,
    https_max_requests: Option<usize>,
    tls_handshake_timeout_secs: Option<u64>,
    mqtt_unbuffered_tls: Option<bool>,
    explorer_idle_timeout_secs: Option<u64>,
    explorer_session_max_secs: Option<u64>,
    model_dir: Option<PathBuf>,
    dps_id_scope: Option<String>,
    routing: Option<RoutingFile>,
}

/// `[routing]` in the config file: endpoints, routes and enrichments added (or replaced) at
/// every start, and the fallback route's state if given. What was added through the API and is
/// not in the file stays until removed there.
///
/// ```toml
/// [routing]
/// fallback = true
/// [[routing.endpoints]]
/// name = "hot"
/// type = "stream"        # stream | webhook | nats | storage
/// partitions = 2         # default 4
/// retention_secs = 3600  # default 86400
/// [[routing.endpoints]]
/// name = "hook"
/// type = "webhook"
/// url = "https://example.com/iot"  # http:// only to a loopback host
/// batch_size = 1         # default 1: a POST per message; more: a JSON array
/// timeout_secs = 30      # default 30
/// headers = { Authorization = "Bearer ..." }
/// ca_file = "ca.pem"     # CAs to trust instead of the system's
/// retention_secs = 86400 # undelivered for this long: dead-lettered
/// dead_after_secs = 600  # failing for this long: health "dead"
/// [[routing.endpoints]]
/// name = "bus"
/// type = "nats"
/// url = "nats://127.0.0.1:4222"
/// subject = "iot.telemetry"
/// stream = "TELEMETRY"   # optional: the JetStream stream that must capture the subject
/// [[routing.endpoints]]
/// name = "archive"
/// type = "storage"       # files under <data-dir>/storage/<container_name>/
/// container_name = "telemetry-archive"
/// encoding = "avro"      # avro (the default) | avrodeflate | json (JSON lines)
/// file_name_format = "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}"  # the default
/// batch_frequency_secs = 300        # a file when its oldest message is this old (1 to 720)
/// max_chunk_bytes = 314572800       # or when it reaches this size (1024 to 524288000)
/// [[routing.routes]]
/// name = "critical"
/// source = "DeviceMessages"   # the default
/// condition = "level = 'critical'"
/// endpoints = ["hot", "events"]
/// enabled = true
/// [[routing.enrichments]]
/// key = "site"
/// value = "$twin.tags.site"
/// endpoints = ["hot"]
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    pub fallback: Option<bool>,
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    #[serde(default)]
    pub enrichments: Vec<EnrichmentFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub partitions: Option<u32>,
    pub retention_secs: Option<u64>,
    pub url: Option<String>,
    pub subject: Option<String>,
    pub stream: Option<String>,
    pub batch_size: Option<u32>,
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub ca_file: Option<PathBuf>,
    pub dead_after_secs: Option<u64>,
    pub container_name: Option<String>,
    pub encoding: Option<String>,
    pub file_name_format: Option<String>,
    pub batch_frequency_secs: Option<u64>,
    pub max_chunk_bytes: Option<u64>,
}

impl EndpointFile {
    /// The endpoint in the hub's terms; options of another type are refused, not ignored.
    fn resolve(self) -> anyhow::Result<ferrohub_hub::routing::Endpoint> {
        use ferrohub_hub::routing::{
            Endpoint, EndpointKind, DEFAULT_BATCH_FREQUENCY_SECS, DEFAULT_DEAD_AFTER_SECS,
            DEFAULT_MAX_CHUNK_BYTES, DEFAULT_NATS_BATCH, DEFAULT_STREAM_PARTITIONS,
            DEFAULT_STREAM_RETENTION_SECS, DEFAULT_TIMEOUT_SECS,
        };
        use ferrohub_hub::storage_endpoint::{Encoding, DEFAULT_FILE_NAME_FORMAT};
        let name = self.name;
        let retention_secs = self.retention_secs.unwrap_or(DEFAULT_STREAM_RETENTION_SECS);
        let timeout_secs = self.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let dead_after_secs = self.dead_after_secs.unwrap_or(DEFAULT_DEAD_AFTER_SECS);
        let need = |v: Option<String>, what: &str| {
            v.ok_or_else(|| anyhow::anyhow!("routing endpoint {name}: {what} is required"))
        };
        let refuse = |set: bool, what: &str| {
            if set {
                anyhow::bail!("routing endpoint {name}: {what} is not an option of this type")
            }
            Ok(())
        };
        let storage_set = self.container_name.is_some()
            || self.encoding.is_some()
            || self.file_name_format.is_some()
            || self.batch_frequency_secs.is_some()
            || self.max_chunk_bytes.is_some();
        const STORAGE_OPTIONS: &str =
            "container_name, encoding, file_name_format, batch_frequency_secs or max_chunk_bytes";
        if self.kind != "storage" {
            refuse(storage_set, STORAGE_OPTIONS)?;
        }
        let kind = match self.kind.as_str() {
            "storage" => {
                refuse(
                    self.partitions.is_some()
                        || self.url.is_some()
                        || self.subject.is_some()
                        || self.stream.is_some()
                        || self.batch_size.is_some()
                        || self.timeout_secs.is_some()
                        || !self.headers.is_empty()
                        || self.ca_file.is_some(),
                    "partitions, url, subject, stream, batch_size, timeout_secs, headers or ca_file",
                )?;
                let encoding = match self.encoding.as_deref() {
                    None => Encoding::default(),
                    Some(e) => serde_json::from_value(serde_json::Value::String(e.into()))
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "routing endpoint {name}: encoding {e:?} is not avro, avrodeflate or json"
                            )
                        })?,
                };
                EndpointKind::Storage {
                    container: need(self.container_name, "container_name")?,
                    encoding,
                    file_name_format: self
                        .file_name_format
                        .unwrap_or_else(|| DEFAULT_FILE_NAME_FORMAT.into()),
                    batch_frequency_secs: self
                        .batch_frequency_secs
                        .unwrap_or(DEFAULT_BATCH_FREQUENCY_SECS),
                    max_chunk_bytes: self.max_chunk_bytes.unwrap_or(DEFAULT_MAX_CHUNK_BYTES),
                    retention_secs,
                    dead_after_secs,
                }
            }
            "stream" => {
                refuse(
                    self.url.is_some()
                        || self.subject.is_some()
                        || self.stream.is_some()
                        || self.batch_size.is_some()
                        || self.timeout_secs.is_some()
                        || !self.headers.is_empty()
                        || self.ca_file.is_some()
                        || self.dead_after_secs.is_some(),
                    "url, subject, stream, batch_size, timeout_secs, headers, ca_file or dead_after_secs",
                )?;
                EndpointKind::Stream {
                    partitions: self.partitions.unwrap_or(DEFAULT_STREAM_PARTITIONS),
                    retention_secs,
                }
            }
            "webhook" => {
                refuse(
                    self.partitions.is_some() || self.subject.is_some() || self.stream.is_some(),
                    "partitions, subject or stream",
                )?;
                let ca_pem = match &self.ca_file {
                    Some(p) => Some(std::fs::read_to_string(p).with_context(|| {
                        format!("routing endpoint {name}: reading ca_file {}", p.display())
                    })?),
                    None => None,
                };
                EndpointKind::Webhook {
                    url: need(self.url, "url")?,
                    batch: self.batch_size.unwrap_or(1),
                    timeout_secs,
                    headers: self.headers,
                    ca_pem,
                    retention_secs,
                    dead_after_secs,
                }
            }
            "nats" => {
                refuse(
                    self.partitions.is_some() || !self.headers.is_empty() || self.ca_file.is_some(),
                    "partitions, headers or ca_file",
                )?;
                EndpointKind::Nats {
                    url: need(self.url, "url")?,
                    subject: need(self.subject, "subject")?,
                    stream: self.stream,
                    batch: self.batch_size.unwrap_or(DEFAULT_NATS_BATCH),
                    timeout_secs,
                    retention_secs,
                    dead_after_secs,
                }
            }
            other => anyhow::bail!(
                "routing endpoint {name}: type {other:?} is not supported (stream, webhook, nats or storage)"
            ),
        };
        Ok(Endpoint { name, kind })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    pub source: Option<String>,
    pub condition: Option<String>,
    pub endpoints: Vec<String>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentFile {
    pub key: String,
    pub value: String,
    pub endpoints: Vec<String>,
}

/// The routing configuration the file asks for, in the hub's terms.
#[derive(Debug, Clone, Default)]
pub struct RoutingSettings {
    pub fallback: Option<bool>,
    pub endpoints: Vec<ferrohub_hub::routing::Endpoint>,
    pub routes: Vec<ferrohub_hub::routing::Route>,
    pub enrichments: Vec<ferrohub_hub::routing::Enrichment>,
}

impl RoutingFile {
    fn resolve(self) -> anyhow::Result<RoutingSettings> {
        use ferrohub_hub::routing::{Enrichment, Route, RouteSource};
        let mut out = RoutingSettings {
            fallback: self.fallback,
            ..Default::default()
        };
        for e in self.endpoints {
            out.endpoints.push(e.resolve()?);
        }
        for r in self.routes {
            let source = match &r.source {
                None => RouteSource::DeviceMessages,
                Some(s) => RouteSource::parse(s)
                    .map_err(|e| anyhow::anyhow!("routing route {}: {e}", r.name))?,
            };
            out.routes.push(Route {
                name: r.name,
                source,
                condition: r.condition.unwrap_or_else(|| "true".into()),
                endpoint_names: r.endpoints,
                is_enabled: r.enabled.unwrap_or(true),
            });
        }
        for e in self.enrichments {
            out.enrichments.push(Enrichment {
                key: e.key,
                value: e.value,
                endpoint_names: e.endpoints,
            });
        }
        Ok(out)
    }
}

/// The resolved configuration of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub hostnames: Vec<String>,
    pub mqtt_bind: SocketAddr,
    pub https_bind: SocketAddr,
    /// Whether `https_bind` was chosen by the user. When it was not and port 443 needs
    /// privileges we lack, the server falls back to 8443 instead of failing.
    pub https_bind_explicit: bool,
    pub amqp_bind: SocketAddr,
    /// The metrics listener's address; `None`: off.
    pub metrics_bind: Option<SocketAddr>,
    /// Whether `metrics_bind` was chosen by the user. When it was not and the port is taken
    /// (another hub on this machine), the hub runs without a metrics listener instead of failing.
    pub metrics_bind_explicit: bool,
    /// Time an AMQP client has from its TLS handshake to its Open (SASL included).
    pub amqp_open_timeout: Duration,
    /// The Event Hubs-compatible entity name; `None`: from the host name ([`Self::hub_name`]).
    pub hub_name: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub max_packet_size: usize,
    /// Telemetry partitions for a new log (default 4).
    pub partitions: u32,
    /// The engine of telemetry logs created from now on.
    pub telemetry_engine: TelemetryEngine,
    /// Age after which telemetry is removed (default 1 day, at most 7).
    pub retention: std::time::Duration,
    /// Size of the telemetry log past which the oldest messages are removed.
    pub telemetry_max_bytes: u64,
    /// How often retention runs.
    pub retention_interval: std::time::Duration,
    /// C2D limits and throttles of the device-facing features.
    pub hub: ferrohub_hub::HubSettings,
    /// Device connections at once (MQTT over TLS and over WebSocket share the cap, and AMQP
    /// over WebSocket counts too).
    pub max_connections: usize,
    /// AMQP connections over TLS at once.
    pub amqp_max_connections: usize,
    /// Time limits of HTTPS connections, so idle or trickling clients cannot hold sockets.
    pub https_timeouts: HttpsTimeouts,
    /// Service API requests in progress at once (each may buffer a 2 MiB body).
    pub https_max_requests: usize,
    /// Time a client has to finish the TLS handshake, MQTT and HTTPS alike.
    pub tls_handshake_timeout: Duration,
    /// MQTT/TLS connections run over `tls_stream::UnbufferedTlsStream` (no buffers held while
    /// idle) instead of tokio-rustls' buffered stream.
    pub mqtt_unbuffered_tls: bool,
    /// How long web explorer sessions last.
    pub explorer_sessions: crate::explorer::sessions::SessionLimits,
    /// The provisioning service's ID scope; `None`: the stored one, generated on first start.
    pub dps_id_scope: Option<String>,
    /// Routing entries from the config file, applied at start-up.
    pub routing: RoutingSettings,
}

/// How long an HTTPS client may take; see `https_conn` for how each is enforced.
#[derive(Debug, Clone, Copy)]
pub struct HttpsTimeouts {
    /// To send a complete request head.
    pub header: Duration,
    /// Between the end of a response and the next request.
    pub idle: Duration,
    /// To send a whole request body.
    pub body: Duration,
}

impl Default for HttpsTimeouts {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            body: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    /// Defaults for a data directory: standard ports on all interfaces, host name localhost.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            hostnames: vec!["localhost".into()],
            mqtt_bind: SocketAddr::from(([0, 0, 0, 0], 8883)),
            https_bind: SocketAddr::from(([0, 0, 0, 0], 443)),
            https_bind_explicit: false,
            amqp_bind: SocketAddr::from(([0, 0, 0, 0], 5671)),
            metrics_bind: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            metrics_bind_explicit: false,
            amqp_open_timeout: Duration::from_secs(30),
            hub_name: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            max_packet_size: ferrohub_iothub::connect::MAX_MQTT_PACKET_SIZE,
            partitions: 4,
            telemetry_engine: TelemetryEngine::default(),
            retention: std::time::Duration::from_secs(24 * 3600),
            telemetry_max_bytes: 10 * 1024 * 1024 * 1024,
            retention_interval: std::time::Duration::from_secs(60),
            hub: ferrohub_hub::HubSettings::default(),
            max_connections: 200_000,
            amqp_max_connections: 10_000,
            https_timeouts: HttpsTimeouts::default(),
            https_max_requests: 256,
            tls_handshake_timeout: Duration::from_secs(10),
            mqtt_unbuffered_tls: true,
            explorer_sessions: crate::explorer::sessions::SessionLimits::default(),
            dps_id_scope: None,
            routing: RoutingSettings::default(),
        }
    }

    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Self> {
        let file_path = match &args.config {
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from("ferrohub.toml")).filter(|p| p.exists()),
        };
        let file = match &file_path {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let mut cfg = ServerConfig::new(
            args.data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        );
        if !args.hostnames.is_empty() {
            cfg.hostnames = args.hostnames.clone();
        } else if let Some(h) = file.hostnames.filter(|h| !h.is_empty()) {
            cfg.hostnames = h;
        }
        if let Some(a) = args.mqtt_bind.or(file.mqtt_bind) {
            cfg.mqtt_bind = a;
        }
        if let Some(a) = args.https_bind.or(file.https_bind) {
            cfg.https_bind = a;
            cfg.https_bind_explicit = true;
        }
        if let Some(a) = args.amqp_bind.or(file.amqp_bind) {
            cfg.amqp_bind = a;
        }
        if let Some(m) = args.metrics_bind.clone().or(file.metrics_bind) {
            cfg.metrics_bind = parse_metrics_bind(&m)?;
            cfg.metrics_bind_explicit = true;
        }
        cfg.hub_name = args.hub_name.clone().or(file.hub_name);
        if let Some(n) = &cfg.hub_name {
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            {
                anyhow::bail!("hub_name must be letters, digits, '-', '.' or '_', not {n:?}");
            }
        }
        cfg.tls_cert = args.tls_cert.clone().or(file.tls_cert);
        cfg.tls_key = args.tls_key.clone().or(file.tls_key);
        cfg.tls_ca = args.tls_ca.clone().or(file.tls_ca);
        if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
            anyhow::bail!("tls_cert and tls_key must be given together");
        }
        if let Some(m) = file.max_packet_size {
            cfg.max_packet_size = m;
        }
        if let Some(p) = args.partitions.or(file.partitions) {
            if !(1..=32).contains(&p) {
                anyhow::bail!("partitions must be between 1 and 32 (got {p})");
            }
            cfg.partitions = p;
        }
        if let Some(e) = args.telemetry_engine.or(file.telemetry_engine) {
            cfg.telemetry_engine = e;
        }
        if let Some(h) = args.retention_hours.or(file.retention_hours) {
            if !(1..=168).contains(&h) {
                anyhow::bail!("retention_hours must be between 1 and 168 (7 days), got {h}");
            }
            cfg.retention = std::time::Duration::from_secs(u64::from(h) * 3600);
        }
        if let Some(dir) = args.model_dir.clone().or(file.model_dir) {
            if !dir.is_dir() {
                anyhow::bail!("model_dir {} is not a directory", dir.display());
            }
            cfg.hub.models.directory = Some(dir);
        }
        if let Some(mb) = args.telemetry_max_mb.or(file.telemetry_max_mb) {
            cfg.telemetry_max_bytes = mb.saturating_mul(1024 * 1024);
        }
        if let Some(t) = args.c2d_ttl_secs.or(file.c2d_ttl_secs) {
            if !(60..=172_800).contains(&t) {
                anyhow::bail!(
                    "c2d_ttl_secs must be between 60 (1 minute) and 172800 (2 days), got {t}"
                );
            }
            cfg.hub.c2d.default_ttl = std::time::Duration::from_secs(t);
        }
        if let Some(n) = args.c2d_max_delivery_count.or(file.c2d_max_delivery_count) {
            if !(1..=100).contains(&n) {
                anyhow::bail!("c2d_max_delivery_count must be between 1 and 100, got {n}");
            }
            cfg.hub.c2d.max_delivery_count = n;
        }
        if let Some(n) = args.max_connections.or(file.max_connections) {
            if n == 0 {
                anyhow::bail!("max_connections must be at least 1");
            }
            cfg.max_connections = n;
        }
        if let Some(n) = args.amqp_max_connections.or(file.amqp_max_connections) {
            if n == 0 {
                anyhow::bail!("amqp_max_connections must be at least 1");
            }
            cfg.amqp_max_connections = n;
        }
        if let Some(scope) = args.dps_id_scope.clone().or(file.dps_id_scope) {
            ferrohub_iothub::dps::validate_id_scope(&scope)
                .map_err(|e| anyhow::anyhow!("dps_id_scope: {e}"))?;
            cfg.dps_id_scope = Some(scope);
        }
        if let Some(n) = args.https_max_requests.or(file.https_max_requests) {
            if n == 0 {
                anyhow::bail!("https_max_requests must be at least 1");
            }
            cfg.https_max_requests = n;
        }
        let secs = |name: &str, v: Option<u64>, default: Duration| match v {
            None => Ok(default),
            Some(0) => Err(anyhow::anyhow!("{name} must be at least 1")),
            Some(s) => Ok(Duration::from_secs(s)),
        };
        cfg.tls_handshake_timeout = secs(
            "tls_handshake_timeout_secs",
            args.tls_handshake_timeout_secs
                .or(file.tls_handshake_timeout_secs),
            cfg.tls_handshake_timeout,
        )?;
        if let Some(on) = args.mqtt_unbuffered_tls.or(file.mqtt_unbuffered_tls) {
            cfg.mqtt_unbuffered_tls = on;
        }
        let limits = cfg.explorer_sessions;
        cfg.explorer_sessions = crate::explorer::sessions::SessionLimits {
            idle: secs(
                "explorer_idle_timeout_secs",
                args.explorer_idle_timeout_secs
                    .or(file.explorer_idle_timeout_secs),
                limits.idle,
            )?,
            absolute: secs(
                "explorer_session_max_secs",
                args.explorer_session_max_secs
                    .or(file.explorer_session_max_secs),
                limits.absolute,
            )?,
        };
        let t = cfg.https_timeouts;
        cfg.https_timeouts = HttpsTimeouts {
            header: secs(
                "https_header_timeout_secs",
                args.https_header_timeout_secs
                    .or(file.https_header_timeout_secs),
                t.header,
            )?,
            idle: secs(
                "https_idle_timeout_secs",
                args.https_idle_timeout_secs
                    .or(file.https_idle_timeout_secs),
                t.idle,
            )?,
            body: secs(
                "https_body_timeout_secs",
                args.https_body_timeout_secs
                    .or(file.https_body_timeout_secs),
                t.body,
            )?,
        };
        let rate = |v: Option<u32>| v.and_then(std::num::NonZeroU32::new);
        cfg.hub.throttle.twin_reads = rate(args.throttle_twin_reads.or(file.throttle_twin_reads));
        cfg.hub.throttle.twin_updates =
            rate(args.throttle_twin_updates.or(file.throttle_twin_updates));
        cfg.hub.throttle.method_calls =
            rate(args.throttle_method_calls.or(file.throttle_method_calls));
        if let Some(r) = file.routing {
            cfg.routing = r.resolve()?;
        }
        Ok(cfg)
    }

    /// The names the dev server certificate must cover: the configured ones, localhost,
    /// 127.0.0.1 and this machine's host name.
    /// The Event Hubs-compatible entity name: `hub_name`, else the first label of the first
    /// host name (IoT Hub names its endpoint's entity after the hub).
    pub fn hub_name(&self) -> String {
        if let Some(n) = &self.hub_name {
            return n.clone();
        }
        let host = self
            .hostnames
            .first()
            .map(String::as_str)
            .unwrap_or("localhost");
        host.split('.')
            .next()
            .filter(|l| !l.is_empty())
            .unwrap_or("localhost")
            .to_owned()
    }

    pub fn certificate_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.hostnames.clone();
        for extra in [
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            machine_hostname(),
        ] {
            if !extra.is_empty() && !names.iter().any(|n| n.eq_ignore_ascii_case(&extra)) {
                names.push(extra);
            }
        }
        names
    }

    /// Names accepted as the host in SAS tokens: the certificate names.
    pub fn accepted_hostnames(&self) -> Vec<String> {
        self.certificate_names()
    }
}

pub fn machine_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// Which engine stores a telemetry log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TelemetryEngine {
    /// Append-only segment files (`ferrohub-seglog`). Not yet the default: its ingest cost
    /// against SQLite's is still to be measured (BENCHMARKS.md, "Segment log (issue 15)").
    Segment,
    /// A SQLite file per log (`ferrohub-sqlite`).
    #[default]
    Sqlite,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `off` or a socket address.
fn parse_metrics_bind(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| {
        anyhow::anyhow!(
            "metrics_bind must be an address such as 127.0.0.1:9464, or off; {s:?}: {e}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_which_beats_defaults() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("f.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\nhostnames = [\"hub.example\"]\nmqtt_bind = \"127.0.0.1:1\"\n",
        )?;
        let args = ServeArgs {
            config: Some(file),
            mqtt_bind: Some("127.0.0.1:2".parse()?),
            ..Default::default()
        };
        let cfg = ServerConfig::from_args(&args)?;
        assert_eq!(cfg.data_dir, PathBuf::from("/from/file"));
        assert_eq!(cfg.hostnames, vec!["hub.example".to_string()]);
        assert_eq!(cfg.mqtt_bind, "127.0.0.1:2".parse()?);
        assert_eq!(cfg.https_bind.port(), 443);
        Ok(())
    }

    #[test]
    fn metrics_bind_defaults_to_loopback_9464_and_can_be_off() -> anyhow::Result<()> {
        let cfg = ServerConfig::from_args(&ServeArgs::default())?;
        assert_eq!(cfg.metrics_bind, Some("127.0.0.1:9464".parse()?));
        assert!(!cfg.metrics_bind_explicit);
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("f.toml");
        std::fs::write(&file, "metrics_bind = \"127.0.0.1:9999\"\n")?;
        let mut args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let cfg = ServerConfig::from_args(&args)?;
        assert_eq!(cfg.metrics_bind, Some("127.0.0.1:9999".parse()?));
        assert!(cfg.metrics_bind_explicit);
        args.metrics_bind = Some("off".into());
        assert_eq!(ServerConfig::from_args(&args)?.metrics_bind, None);
        args.metrics_bind = Some("nine".into());
        assert!(ServerConfig::from_args(&args).is_err());
        Ok(())
    }

    #[test]
    fn explorer_session_limits_come_from_file_or_flag() -> anyhow::Result<()> {
        let defaults = ServerConfig::from_args(&ServeArgs::default())?.explorer_sessions;
        assert_eq!(defaults.idle, Duration::from_secs(1800));
        assert_eq!(defaults.absolute, Duration::from_secs(12 * 3600));
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("f.toml");
        std::fs::write(
            &file,
            "explorer_idle_timeout_secs = 60\nexplorer_session_max_secs = 600\n",
        )?;
        let mut args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let limits = ServerConfig::from_args(&args)?.explorer_sessions;
        assert_eq!(limits.idle, Duration::from_secs(60));
        assert_eq!(limits.absolute, Duration::from_secs(600));
        args.explorer_idle_timeout_secs = Some(0);
        assert!(ServerConfig::from_args(&args).is_err());
        Ok(())
    }

    #[test]
    fn max_connections_comes_from_file_or_flag_and_is_at_least_one() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("f.toml");
        std::fs::write(&file, "max_connections = 7\n")?;
        let mut args = ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        assert_eq!(ServerConfig::from_args(&args)?.max_connections, 7);
        args.max_connections = Some(3);
        assert_eq!(ServerConfig::from_args(&args)?.max_connections, 3);
        args.max_connections = Some(0);
        assert!(ServerConfig::from_args(&args).is_err());
        Ok(())
    }

    #[test]
    fn https_timeouts_come_from_file_or_flag_and_are_at_least_one_second() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("f.toml");
        std::fs::write(
            &file,
            "https_idle_timeout_secs = 5\nhttps_body_timeout_secs = 7\n",
        )?;
        let mut args = ServeArgs {
            config: Some(file),
            https_header_timeout_secs: Some(3),
            ..Default::default()
        };
        let t = ServerConfig::from_args(&args)?.https_timeouts;
        assert_eq!(t.header, Duration::from_secs(3));
        assert_eq!(t.idle, Duration::from_secs(5));
        assert_eq!(t.body, Duration::from_secs(7));
        args.https_idle_timeout_secs = Some(0);
        assert!(ServerConfig::from_args(&args).is_err());
        Ok(())
    }

    #[test]
    fn routing_comes_from_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            r#"
[routing]
fallback = false
[[routing.endpoints]]
name = "hot"
type = "stream"
partitions = 2
[[routing.routes]]
name = "crit"
condition = "level = 'critical'"
endpoints = ["hot", "events"]
[[routing.enrichments]]
key = "site"
value = "$twin.tags.site"
endpoints = ["hot"]
"#,
        )?;
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let cfg = ServerConfig::from_args(&args)?;
        assert_eq!(cfg.routing.fallback, Some(false));
        assert_eq!(cfg.routing.endpoints[0].name, "hot");
        assert_eq!(
            cfg.routing.routes[0].source,
            ferrohub_hub::routing::RouteSource::DeviceMessages
        );
        assert!(cfg.routing.routes[0].is_enabled);
        assert_eq!(cfg.routing.enrichments[0].endpoint_names, ["hot"]);
        std::fs::write(
            &path,
            "[[routing.endpoints]]\nname = \"w\"\ntype = \"ftp\"\n",
        )?;
        let e = ServerConfig::from_args(&args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not supported"), "{e}");
        std::fs::write(
            &path,
            r#"
[[routing.endpoints]]
name = "w"
type = "webhook"
url = "https://example.com/in"
batch_size = 10
headers = { Authorization = "Bearer t" }
dead_after_secs = 5
[[routing.endpoints]]
name = "n"
type = "nats"
url = "nats://127.0.0.1:4222"
subject = "iot.t"
stream = "T"
"#,
        )?;
        let cfg = ServerConfig::from_args(&args)?;
        use ferrohub_hub::routing::EndpointKind;
        match &cfg.routing.endpoints[0].kind {
            EndpointKind::Webhook {
                batch,
                headers,
                dead_after_secs,
                ..
            } => {
                assert_eq!((*batch, *dead_after_secs), (10, 5));
                assert_eq!(
                    headers.get("Authorization").map(String::as_str),
                    Some("Bearer t")
                );
            }
            other => panic!("not a webhook: {other:?}"),
        }
        assert!(matches!(
            &cfg.routing.endpoints[1].kind,
            EndpointKind::Nats { stream: Some(s), .. } if s == "T"
        ));
        std::fs::write(
            &path,
            "[[routing.endpoints]]\nname = \"n\"\ntype = \"nats\"\nurl = \"nats://x\"\n",
        )?;
        let e = ServerConfig::from_args(&args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("subject is required"), "{e}");
        Ok(())
    }

    #[test]
    fn unknown_keys_in_the_file_are_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("f.toml");
        std::fs::write(&file, "data_dri = \"x\"\n")?;
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        assert!(ServerConfig::from_args(&args).is_err());
        Ok(())
    }
}
