//! Server start-up and listeners: opens the store, makes sure the hub has its policies and TLS
//! material, binds MQTT/TLS and HTTPS, and runs the accept loops until shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferrohub_iothub::sas::generate_key;
use ferrohub_iothub::ConnectionString;
use ferrohub_sqlite::SqliteStore;
use ferrohub_store::telemetry::{Retention, TelemetryLog};
use ferrohub_store::StreamEngine;
use ferrohub_store::{AccessPolicy, Rights, Store};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::tls_stream::UnbufferedTlsStream;
use crate::{api, tls};
use ferrohub_broker::{serve_connection, Broker, BrokerConfig, PeerInfo, Transport};
use ferrohub_hub::Hub;

/// Written to the data directory at start-up so the CLI, tests and tools find the running hub.
pub const HUB_FILE: &str = "hub.json";

/// How to reach a running hub: what `serve` prints and writes to `hub.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubInfo {
    pub hostname: String,
    pub mqtt_port: u16,
    pub https_port: u16,
    /// Absent in files written before the AMQP listener existed.
    #[serde(default)]
    pub amqp_port: u16,
    pub ca_file: Option<PathBuf>,
    pub owner_connection_string: String,
    /// The Event Hubs-compatible connection string (the `service` policy), for
    /// `azure-eventhub` and other Event Hubs consumers.
    #[serde(default)]
    pub eventhub_connection_string: String,
    /// The device provisioning service's ID scope (the provisioning host is `hostname`, on the
    /// MQTT and HTTPS ports). Absent in files written before provisioning existed.
    #[serde(default)]
    pub dps_id_scope: String,
    /// The web explorer's sign-in URL with the one-time login token minted at start-up (in the
    /// fragment). Absent in files written before the explorer existed.
    #[serde(default, rename = "explorerUrl")]
    pub explorer_url: String,
    pub pid: u32,
}

impl HubInfo {
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(HUB_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (has `ferrohub serve` run with this data directory?)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Concurrent HTTPS connections (REST clients, WebSocket handshakes); past this, new sockets
/// wait in the kernel's accept queue. An upgraded WebSocket session leaves this cap for the
/// device-connection cap (`ServerConfig::max_connections`), which it shares with MQTT/TLS.
const MAX_HTTPS_CONNECTIONS: usize = 10_000;

/// The largest AMQP frame accepted: requests are small, and events are sent in frames of the
/// client's size.
const AMQP_MAX_FRAME_SIZE: u32 = 64 * 1024;

type HubBroker = Broker<crate::mqtt::MqttFrontEnd>;

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub mqtt_addr: SocketAddr,
    pub https_addr: SocketAddr,
    pub amqp_addr: SocketAddr,
    /// The metrics listener's address, when it runs.
    pub metrics_addr: Option<SocketAddr>,
    pub info: HubInfo,
    pub hub: Arc<Hub>,
    pub broker: Arc<HubBroker>,
    shutdown: watch::Sender<bool>,
    tracker: TaskTracker,
}

impl RunningServer {
    /// Stops accepting, tells every connection to close and waits (bounded) until they have.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not close within 10 s of shutdown");
        }
        self.hub.c2d_count_handed().await;
    }
}

/// The hub's default shared access policies, as IoT Hub creates them.
fn default_policies() -> Vec<AccessPolicy> {
    let policy = |name: &str, rights: Rights| AccessPolicy {
        key_name: name.into(),
        primary_key: generate_key(),
        secondary_key: generate_key(),
        rights,
    };
    let none = Rights::default();
    vec![
        policy("iothubowner", Rights::ALL),
        policy(
            "service",
            Rights {
                service_connect: true,
                ..none
            },
        ),
        policy(
            "device",
            Rights {
                device_connect: true,
                ..none
            },
        ),
        policy(
            "registryRead",
            Rights {
                registry_read: true,
                ..none
            },
        ),
        policy(
            "registryReadWrite",
            Rights {
                registry_read: true,
                registry_write: true,
                ..none
            },
        ),
        // The device provisioning service's owner policy, as DPS names it: enrollments,
        // groups and registrations, nothing of the hub's own registry or messaging.
        policy(
            "provisioningserviceowner",
            Rights {
                enrollment_read: true,
                enrollment_write: true,
                ..none
            },
        ),
    ]
}

async fn bind(
    addr: SocketAddr,
    what: &str,
    flag: &str,
    env: &str,
    key: &str,
) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for {what} on {addr}: {e}. Choose another address with {flag} \
             (or the environment variable {env}, or `{key}` in the config file)"
        )
    })
}

/// Starts a hub with `cfg` and returns once both listeners are bound: storage, TLS and the
/// listeners, then the hub and its front ends, then the tasks that serve them.
pub async fn start(cfg: ServerConfig) -> anyhow::Result<RunningServer> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&cfg.data_dir)?;
    let (store, telemetry, streams) = open_storage(&data_dir, &cfg)?;
    let tls_files = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: cfg.tls_ca.clone(),
        },
        _ => tls::ensure_dev_pki(&data_dir.join("certs"), &cfg.certificate_names())?,
    };
    let tls_config = tls::server_config(&tls_files)?;
    let acceptor = Handshaker {
        acceptor: TlsAcceptor::from(tls_config.clone()),
        config: tls_config,
        timeout: cfg.tls_handshake_timeout,
        mqtt_unbuffered: cfg.mqtt_unbuffered_tls,
    };
    let (mqtt_listener, https_listener, amqp_listener) = bind_listeners(&cfg).await?;
    let mqtt_addr = mqtt_listener.local_addr()?;
    let https_addr = https_listener.local_addr()?;
    let amqp_addr = amqp_listener.local_addr()?;
    let metrics_listener = bind_metrics(&cfg).await?;
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (hub, broker, owner) =
        compose(store, telemetry, streams, &cfg, shutdown_rx.clone()).await?;
    hub.set_connection_epoch(connection_epoch(&data_dir));
    let tracker = TaskTracker::new();
    spawn_background(&tracker, &hub, &cfg, &shutdown_rx);
    if let Some(listener) = metrics_listener {
        if let Some(handle) = crate::metrics::recorder() {
            tracker.spawn(crate::metrics::serve(
                listener,
                handle,
                hub.clone(),
                data_dir.clone(),
                shutdown_rx.clone(),
            ));
        }
    }
    let device_slots = Arc::new(Semaphore::new(
        cfg.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    tracker.spawn(accept_loop(
        mqtt_listener,
        acceptor.clone(),
        device_slots.clone(),
        tracker.clone(),
        shutdown_rx.clone(),
        Listener::Mqtt(broker.clone()),
    ));
    let amqp = crate::amqp::AmqpFrontEnd {
        hub: hub.clone(),
        entity: cfg.hub_name(),
        open_timeout: cfg.amqp_open_timeout,
        max_frame_size: AMQP_MAX_FRAME_SIZE,
        created_ms: time::OffsetDateTime::now_utc().unix_timestamp() * 1000,
        port: amqp_addr.port(),
        default_host: cfg
            .hostnames
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into()),
    };
    let explorer = explorer(&cfg, &hub, https_addr, &data_dir);
    tracker.spawn(crate::explorer::sweep_loop(
        explorer.sessions.clone(),
        shutdown_rx.clone(),
    ));
    let (_, explorer_url) = explorer.mint_login().await;
    let router = api::router(
        api::ApiState {
            hub: hub.clone(),
            broker: broker.clone(),
            amqp: amqp.clone(),
            body_timeout: cfg.https_timeouts.body,
            in_flight: Arc::new(Semaphore::new(cfg.https_max_requests)),
        },
        explorer,
    );
    tracker.spawn(accept_loop(
        amqp_listener,
        acceptor.clone(),
        Arc::new(Semaphore::new(
            cfg.amqp_max_connections.min(Semaphore::MAX_PERMITS),
        )),
        tracker.clone(),
        shutdown_rx.clone(),
        Listener::Amqp(amqp),
    ));
    tracker.spawn(accept_loop(
        https_listener,
        acceptor,
        Arc::new(Semaphore::new(MAX_HTTPS_CONNECTIONS)),
        tracker.clone(),
        shutdown_rx.clone(),
        Listener::Https {
            router,
            timeouts: cfg.https_timeouts,
            sessions: crate::ws::Sessions {
                slots: device_slots,
                tracker: tracker.clone(),
                shutdown: shutdown_rx,
            },
        },
    ));

    let service = hub
        .policy("service")
        .await?
        .unwrap_or_else(|| owner.clone());
    let mut info = hub_info(&cfg, mqtt_addr, https_addr, &tls_files, &owner);
    info.amqp_port = amqp_addr.port();
    info.dps_id_scope = hub.id_scope().unwrap_or_default().to_string();
    info.explorer_url = explorer_url;
    info.eventhub_connection_string = eventhub_connection_string(
        &info.hostname,
        amqp_addr.port(),
        &cfg.hub_name(),
        &service.key_name,
        &service.primary_key,
    );
    // hub.json only helps the CLI find the hub: a hub on a full disk must still start, since
    // refusing to would turn a full disk into an outage that outlives it.
    if let Err(e) = write_hub_file(&data_dir, &info) {
        let _ = std::fs::remove_file(data_dir.join(format!("{HUB_FILE}.tmp")));
        tracing::error!(error = %format!("{e:#}"), file = %data_dir.join(HUB_FILE).display(), "could not write the hub file; the CLI may find stale ports in it");
    }
    info!(mqtt = %mqtt_addr, https = %https_addr, amqp = %amqp_addr, data_dir = %data_dir.display(), "ferrohub listening");
    Ok(RunningServer {
        mqtt_addr,
        https_addr,
        amqp_addr,
        metrics_addr,
        info,
        hub,
        broker,
        shutdown: shutdown_tx,
        tracker,
    })
}

/// The store, the built-in telemetry log and the custom endpoints' streams.
type Storage = (Arc<dyn Store>, Arc<dyn TelemetryLog>, Arc<dyn StreamEngine>);

/// The embedded engine's registry store, telemetry log and custom endpoint streams in the data
/// directory.
fn open_storage(data_dir: &Path, cfg: &ServerConfig) -> anyhow::Result<Storage> {
    let store = SqliteStore::open(data_dir)
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let telemetry =
        crate::telemetry_storage::open_telemetry(data_dir, cfg.partitions, cfg.telemetry_engine)
            .with_context(|| format!("opening the telemetry log in {}", data_dir.display()))?;
    let streams = crate::telemetry_storage::EngineStreams::new(data_dir, cfg.telemetry_engine);
    Ok((Arc::new(store), telemetry, Arc::new(streams)))
}

/// `Endpoint=sb://HOST/;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=HUB`, the
/// string IoT Hub shows for its built-in endpoint (with `:PORT` when not 5671).
pub fn eventhub_connection_string(
    host: &str,
    port: u16,
    entity: &str,
    key_name: &str,
    key: &str,
) -> String {
    let endpoint = if port == 5671 {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    format!(
        "Endpoint=sb://{endpoint}/;SharedAccessKeyName={key_name};SharedAccessKey={key};EntityPath={entity}"
    )
}

/// The listeners (MQTT, HTTPS, AMQP), with a message naming the setting when an address is
/// taken.
async fn bind_listeners(
    cfg: &ServerConfig,
) -> anyhow::Result<(TcpListener, TcpListener, TcpListener)> {
    let mqtt_listener = bind(
        cfg.mqtt_bind,
        "MQTT over TLS",
        "--mqtt-bind",
        "FERROHUB_MQTT_BIND",
        "mqtt_bind",
    )
    .await?;
    const HTTPS: &str = "HTTPS (REST API and MQTT over WebSocket)";
    let https_bind = |addr| {
        bind(
            addr,
            HTTPS,
            "--https-bind",
            "FERROHUB_HTTPS_BIND",
            "https_bind",
        )
    };
    let https_listener = match TcpListener::bind(cfg.https_bind).await {
        Ok(l) => l,
        // Port 443 needs privileges on most systems; a first run as a normal user should
        // still come up, on the conventional alternative.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !cfg.https_bind_explicit => {
            let alt = SocketAddr::new(cfg.https_bind.ip(), 8443);
            warn!(
                "no permission to listen on {} ({e}); serving HTTPS on {alt} instead. The Python \
                 device SDK needs port 443 for MQTT over WebSocket: run as root, grant \
                 CAP_NET_BIND_SERVICE, or choose with --https-bind",
                cfg.https_bind
            );
            https_bind(alt).await?
        }
        Err(_) => https_bind(cfg.https_bind).await?,
    };
    let amqp_listener = bind(
        cfg.amqp_bind,
        "AMQP over TLS (the Event Hubs-compatible endpoint)",
        "--amqp-bind",
        "FERROHUB_AMQP_BIND",
        "amqp_bind",
    )
    .await?;
    Ok((mqtt_listener, https_listener, amqp_listener))
}

/// The metrics listener, if one is configured. A default address that is taken (a second hub
/// on this machine) leaves the hub without one rather than failing it; a chosen one must bind.
async fn bind_metrics(cfg: &ServerConfig) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = cfg.metrics_bind else {
        return Ok(None);
    };
    if cfg.metrics_bind_explicit {
        return bind(
            addr,
            "metrics (Prometheus /metrics, /healthz, /readyz)",
            "--metrics-bind",
            "FERROHUB_METRICS_BIND",
            "metrics_bind",
        )
        .await
        .map(Some);
    }
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) => {
            warn!(
                "cannot listen on {addr} for metrics ({e}); running without a metrics \
                 listener. Choose another address with --metrics-bind, or --metrics-bind off"
            );
            Ok(None)
        }
    }
}

/// The hub on its storage, with the default policies, and the MQTT front end over the broker
/// wired both ways (the broker calls the front end; the hub controls connections through the
/// broker). Returns the hub, the broker and the `iothubowner` policy.
async fn compose(
    store: Arc<dyn Store>,
    telemetry: Arc<dyn TelemetryLog>,
    streams: Arc<dyn StreamEngine>,
    cfg: &ServerConfig,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<Hub>, Arc<HubBroker>, AccessPolicy)> {
    let hub = Hub::new(
        store.clone(),
        telemetry,
        cfg.accepted_hostnames(),
        cfg.hub.clone(),
    );
    hub.set_stream_engine(streams);
    let data_dir = std::fs::canonicalize(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
    hub.set_sender_factory(Arc::new(crate::endpoints::Senders {
        storage_root: data_dir.join(STORAGE_DIR),
        hub_name: cfg.hub_name(),
    }));
    hub.set_hub_name(cfg.hub_name());
    // Routes and endpoints in force before the first device connects.
    hub.load_routing()
        .await
        .context("loading the routing configuration")?;
    apply_routing_file(&hub, &cfg.routing).await?;
    let mut owner = None;
    for p in default_policies() {
        let stored = hub.ensure_policy(p).await?;
        if stored.key_name == "iothubowner" {
            owner = Some(stored);
        }
    }
    let owner = owner.context("iothubowner policy missing")?;
    hub.init_provisioning(cfg.dps_id_scope.clone(), None)
        .await
        .context("setting up device provisioning")?;
    let broker_cfg = BrokerConfig {
        max_packet_size: cfg.max_packet_size,
        max_subscriptions: ferrohub_iothub::connect::MAX_SUBSCRIPTIONS,
        maximum_qos: ferrohub_mqtt::QoS::AtLeastOnce,
        ..BrokerConfig::default()
    };
    let sessions = Arc::new(crate::mqtt::StoreSessions(store));
    let front_end = Arc::new(crate::mqtt::MqttFrontEnd { hub: hub.clone() });
    let broker = Broker::new(front_end, broker_cfg, sessions, shutdown);
    hub.set_connection_control(Arc::new(crate::mqtt::BrokerControl(Arc::downgrade(
        &broker,
    ))));
    Ok((hub, broker, owner))
}

/// Adds (or replaces) the config file's routing entries, in dependency order, so a file that
/// names its own endpoints works on a fresh data directory.
async fn apply_routing_file(hub: &Hub, r: &crate::config::RoutingSettings) -> anyhow::Result<()> {
    for e in &r.endpoints {
        hub.put_endpoint(e.clone())
            .await
            .with_context(|| format!("config file: routing endpoint {}", e.name))?;
    }
    for rt in &r.routes {
        hub.put_route(rt.clone())
            .await
            .with_context(|| format!("config file: routing route {}", rt.name))?;
    }
    for e in &r.enrichments {
        hub.put_enrichment(e.clone())
            .await
            .with_context(|| format!("config file: routing enrichment {}", e.key))?;
    }
    if let Some(on) = r.fallback {
        hub.set_fallback(on)
            .await
            .context("config file: routing fallback")?;
    }
    Ok(())
}

/// Telemetry retention, C2D expiry, the configurations' backstop pass, jobs, the IoT Plug
/// and Play conformance checker and the stop of external endpoints' deliveries, stopped by
/// shutdown.
fn spawn_background(
    tracker: &TaskTracker,
    hub: &Arc<Hub>,
    cfg: &ServerConfig,
    shutdown: &watch::Receiver<bool>,
) {
    tracker.spawn(ferrohub_hub::retention::retention_loop(
        hub.clone(),
        Retention {
            max_age_ms: i64::try_from(cfg.retention.as_millis()).unwrap_or(i64::MAX),
            max_bytes: cfg.telemetry_max_bytes,
        },
        cfg.retention_interval,
        shutdown.clone(),
    ));
    tracker.spawn(ferrohub_hub::c2d::expiry_loop(
        hub.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(ferrohub_hub::configurations::reconcile_loop(
        hub.clone(),
        ferrohub_hub::configurations::RECONCILE_EVERY,
        shutdown.clone(),
    ));
    tracker.spawn(ferrohub_hub::jobs::jobs_loop(hub.clone(), shutdown.clone()));
    tracker.spawn(ferrohub_hub::delivery::stop_at_shutdown(
        hub.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(ferrohub_hub::conformance::conformance_loop(
        hub.clone(),
        shutdown.clone(),
    ));
}

/// The first configured host name, as devices write it in connection strings.
fn host_name(cfg: &ServerConfig) -> String {
    cfg.hostnames
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into())
}

/// `host[:port]` of the HTTPS listener, the port left out when it is 443.
fn https_authority(cfg: &ServerConfig, https_addr: SocketAddr) -> String {
    let host = host_name(cfg);
    if https_addr.port() == 443 {
        host
    } else {
        format!("{host}:{}", https_addr.port())
    }
}

/// The web explorer's state, with in-memory sessions and login tokens (node-local).
fn explorer(
    cfg: &ServerConfig,
    hub: &Arc<Hub>,
    https_addr: SocketAddr,
    data_dir: &Path,
) -> crate::explorer::Explorer {
    use crate::explorer::sessions;
    crate::explorer::Explorer {
        hub: hub.clone(),
        sessions: Arc::new(sessions::MemorySessions::new(cfg.explorer_sessions)),
        tokens: Arc::new(sessions::MemoryLoginTokens::new(
            sessions::LOGIN_TOKEN_LIFETIME,
        )),
        base_url: format!("https://{}", https_authority(cfg, https_addr)),
        host_name: host_name(cfg),
        started: std::time::Instant::now(),
        data_dir: data_dir.to_path_buf(),
        retention: crate::explorer::RetentionInfo {
            telemetry_seconds: cfg.retention.as_secs(),
            partitions: cfg.partitions,
        },
    }
}

/// How to reach the hub, as `hub.json` and the start-up banner give it.
fn hub_info(
    cfg: &ServerConfig,
    mqtt_addr: SocketAddr,
    https_addr: SocketAddr,
    tls_files: &tls::TlsFiles,
    owner: &AccessPolicy,
) -> HubInfo {
    let hostname = host_name(cfg);
    let rest_host = https_authority(cfg, https_addr);
    let owner_cs = ConnectionString {
        host_name: rest_host,
        shared_access_key_name: Some(owner.key_name.clone()),
        shared_access_key: Some(owner.primary_key.clone()),
        ..Default::default()
    };
    HubInfo {
        hostname,
        mqtt_port: mqtt_addr.port(),
        https_port: https_addr.port(),
        ca_file: tls_files
            .ca
            .clone()
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p)),
        owner_connection_string: owner_cs.to_string(),
        amqp_port: 0,
        eventhub_connection_string: String::new(),
        dps_id_scope: String::new(),
        explorer_url: String::new(),
        pid: std::process::id(),
    }
}

/// Where storage routing endpoints write, one directory per container.
pub const STORAGE_DIR: &str = "storage";

/// The file that keeps the last connection state epoch (see [`connection_epoch`]).
pub const EPOCH_FILE: &str = "connection-epoch";

/// The epoch of this start's connection state sequence numbers: one more than the last start's
/// (kept in `connection-epoch`), or the time in Unix milliseconds if that is larger. Written
/// (fsync'd, then renamed) before any device connects, so every start on this data directory
/// has a larger epoch than the one before, even if the clock went back; the time only makes
/// the number say roughly when the hub started. Connection state events must keep working on a
/// full disk, so a failed write is logged and the unwritten epoch used: then only a clock that
/// went back since the last start could make this start's events sort before its.
fn connection_epoch(data_dir: &Path) -> u64 {
    use std::io::Write;
    let file = data_dir.join(EPOCH_FILE);
    let last = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let epoch = last.map_or(now, |l| now.max(l.saturating_add(1)));
    let tmp = data_dir.join(format!("{EPOCH_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(epoch.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)?;
        // The rename is durable once the directory is.
        std::fs::File::open(data_dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        warn!(error = %e, file = %file.display(), "could not keep the connection state epoch; connection state sequence numbers rely on the clock until it can be written");
    }
    epoch
}

fn write_hub_file(data_dir: &Path, info: &HubInfo) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = data_dir.join(format!("{HUB_FILE}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // It holds the owner key.
        opts.mode(0o600);
    }
    let write = || -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(info)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, data_dir.join(HUB_FILE))
    };
    write().with_context(|| format!("writing {}", tmp.display()))
}

enum Listener {
    Mqtt(Arc<HubBroker>),
    Amqp(crate::amqp::AmqpFrontEnd),
    Https {
        router: axum::Router,
        timeouts: crate::config::HttpsTimeouts,
        /// Where upgraded WebSocket sessions run.
        sessions: crate::ws::Sessions,
    },
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Handshaker,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
    kind: Listener,
) {
    loop {
        let (socket, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = ferrohub_broker::until_shutdown(&mut shutdown) => return,
        };
        // Accepted first, then admitted: a listener waiting for a place with no socket in hand
        // would take the next free one and sit on it, and WebSocket sessions share the device
        // cap. Only this one socket waits here; the next ones wait in the kernel's queue.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = ferrohub_broker::until_shutdown(&mut shutdown) => return,
        };
        let _ = socket.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        match &kind {
            Listener::Mqtt(broker) => {
                let broker = broker.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    // Both boxed: a task's allocation is sized for its largest state, and the
                    // handshake's is large but short-lived; idle devices should not pay for it.
                    if acceptor.mqtt_unbuffered {
                        if let Some((tls, certs)) =
                            Box::pin(acceptor.handshake_unbuffered(socket, addr)).await
                        {
                            let peer = PeerInfo {
                                addr,
                                transport: Transport::Tls,
                                client_certs: certs,
                            };
                            Box::pin(serve_connection(broker, tls, peer)).await;
                        }
                    } else if let Some((tls, certs)) =
                        Box::pin(acceptor.handshake(socket, addr)).await
                    {
                        let peer = PeerInfo {
                            addr,
                            transport: Transport::Tls,
                            client_certs: certs,
                        };
                        Box::pin(serve_connection(broker, tls, peer)).await;
                    }
                });
            }
            Listener::Amqp(front_end) => {
                let front_end = front_end.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    if let Some((tls, _)) = Box::pin(acceptor.handshake(socket, addr)).await {
                        Box::pin(crate::amqp::serve(front_end, tls, addr, shutdown)).await;
                    }
                });
            }
            Listener::Https {
                router,
                timeouts,
                sessions,
            } => {
                let router = router.clone();
                let timeouts = *timeouts;
                let sessions = sessions.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    if let Some((tls, certs)) = Box::pin(acceptor.handshake(socket, addr)).await {
                        let conn = HttpsConn {
                            addr,
                            client_certs: certs,
                            sessions,
                        };
                        serve_https(tls, conn, router, timeouts, shutdown).await;
                    }
                });
            }
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The TLS side of both listeners: a client gets `timeout` to finish its handshake.
#[derive(Clone)]
struct Handshaker {
    acceptor: TlsAcceptor,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
    /// MQTT connections use [`UnbufferedTlsStream`] (see `ServerConfig::mqtt_unbuffered_tls`).
    mqtt_unbuffered: bool,
}

/// A client's certificate chain, owned, as the connection keeps it.
type PeerCerts = Arc<Vec<CertificateDer<'static>>>;

impl Handshaker {
    async fn handshake_unbuffered(
        &self,
        socket: TcpStream,
        addr: SocketAddr,
    ) -> Option<(UnbufferedTlsStream<TcpStream>, PeerCerts)> {
        let accept = UnbufferedTlsStream::accept(self.config.clone(), socket);
        self.finish(addr, accept, |tls| tls.peer_certificates())
            .await
    }

    async fn handshake(
        &self,
        socket: TcpStream,
        addr: SocketAddr,
    ) -> Option<(TlsStream, PeerCerts)> {
        self.finish(addr, self.acceptor.accept(socket), |tls| {
            tls.get_ref().1.peer_certificates()
        })
        .await
    }

    /// Waits up to `timeout` for either stream's handshake; a failure or timeout is logged and
    /// ends the connection (`None`).
    async fn finish<S, E: std::fmt::Display>(
        &self,
        addr: SocketAddr,
        accept: impl std::future::Future<Output = Result<S, E>>,
        certs: impl FnOnce(&S) -> Option<&[CertificateDer<'static>]>,
    ) -> Option<(S, PeerCerts)> {
        match tokio::time::timeout(self.timeout, accept).await {
            Ok(Ok(tls)) => {
                let chain = certs(&tls).map(<[_]>::to_vec).unwrap_or_default();
                Some((tls, Arc::new(chain)))
            }
            Ok(Err(e)) => {
                debug!(peer = %addr, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                debug!(peer = %addr, "TLS handshake timed out");
                None
            }
        }
    }
}

/// What an HTTPS request handler may want to know about its connection.
#[derive(Clone)]
pub struct HttpsConn {
    pub addr: SocketAddr,
    pub client_certs: Arc<Vec<CertificateDer<'static>>>,
    /// Where a WebSocket upgraded on this connection runs its MQTT session.
    pub sessions: crate::ws::Sessions,
}

async fn serve_https(
    tls: TlsStream,
    conn_info: HttpsConn,
    router: axum::Router,
    timeouts: crate::config::HttpsTimeouts,
    mut shutdown: watch::Receiver<bool>,
) {
    use crate::https_conn::{track, Clock, Watched};
    use tower::ServiceExt;
    let addr = conn_info.addr;
    let clock = Clock::new();
    let requests = clock.clone();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(conn_info.clone());
            let in_flight = requests.begin();
            let response = router.clone().oneshot(req);
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| track(body, in_flight)))
            }
        });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The watchdog below bounds the wait for a head; hyper's own timer would also cut
    // keep-alive waits at the header limit (see `https_conn`).
    builder.http1().header_read_timeout(None);
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(Watched::new(tls, clock.clone())), service);
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                debug!(peer = %addr, error = %e, "HTTPS connection ended with an error");
            }
        }
        _ = clock.expired(timeouts) => {
            debug!(peer = %addr, "HTTPS connection closed: no request in time");
        }
        _ = ferrohub_broker::until_shutdown(&mut shutdown) => {}
    }
}
