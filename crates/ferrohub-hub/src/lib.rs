//! The IoT Hub services: every IoT Hub operation, whatever front end (MQTT, REST, later AMQP)
//! asks for it.
//!
//! The pure rules (username, SAS, topics, error codes, twin documents) live in the
//! `ferrohub-iothub` crate; this crate applies them to live connections and the store: it
//! authenticates devices, authorizes topics, ingests telemetry, delivers C2D messages, runs
//! twins and methods, tracks presence, and logs every connect and disconnect with its IoT Hub
//! error code. It holds no sockets: front ends reach devices through [`link`].

mod auth;
pub mod bulk;
pub mod c2d;
pub mod certificates;
pub mod configurations;
pub mod conformance;
pub mod delivery;
mod detached;
pub mod digital_twins;
pub mod directory;
pub mod error;
pub mod events;
#[cfg(test)]
mod fault_tests;
pub mod feedback;
pub mod jobs;
pub mod link;
pub mod methods;
pub mod metrics;
pub mod models;
pub mod presence;
pub mod provisioning;
pub mod query;
pub mod readers;
pub mod registry;
pub mod retention;
pub mod routing;
pub mod service_auth;
mod sources;
pub mod statistics;
pub mod storage_endpoint;
mod telemetry;
#[cfg(test)]
mod testing;
pub mod throttle;
pub mod timefmt;
mod twin_service;
pub mod twins;
pub mod x509;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferrohub_iothub::{classify_publish, ErrorCode, Identity, PublishTopic};
use ferrohub_mqtt::{Connect, ConnectReturnCode, LastWill, Publish, QoS};
use ferrohub_store::telemetry::TelemetryLog;
use ferrohub_store::Store;
use rustls::pki_types::CertificateDer;
use tracing::{debug, info, warn};

pub use auth::AuthMethod;
use directory::{ConnectionDirectory, Detached, Link, LocalDirectory, Subscribed};
pub use error::HubError;
use link::{ConnectionControl, Outbound};
use methods::{LocalPendingCalls, PendingMethodCalls};
use presence::{ConnectionActivity, LocalPresence, PresenceRegistry};

/// An error from a caller-supplied component, passed through untouched.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How a device connection reached us (telemetry stamping, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    MqttTls,
    MqttWebSocket,
    /// The DPS HTTPS device API (provisioning only).
    Https,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::MqttTls => "mqtt-tls",
            Transport::MqttWebSocket => "mqtt-ws",
            Transport::Https => "https",
        })
    }
}

/// What the transport knows about a device before it authenticates.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub transport: Transport,
    /// The TLS client certificate chain, leaf first, when the client sent one. Possession of
    /// the leaf's key was proven in the handshake; whether it is trusted is decided here.
    pub client_certs: Arc<Vec<CertificateDer<'static>>>,
}

/// Work that must finish before a device message may be acknowledged (the message reaching
/// disk). `Err` closes the connection without acknowledging.
pub type Completion =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), HubError>> + Send>>;

/// The hub's answer to a device message.
pub enum PublishOutcome {
    /// Acknowledge now: the hub has done what it must.
    Accept,
    /// Acknowledge once the completion resolves.
    AcceptWhen(Completion),
    /// Close the connection without acknowledging; the text goes to the log.
    Reject(String),
    /// Close the connection without acknowledging: the hub failed (its storage, say), not the
    /// device, which may retry.
    Fail(HubError),
}

/// One authenticated connection, as the IoT Hub layer sees it.
#[derive(Debug)]
pub struct HubClient {
    pub identity: Identity,
    pub auth: AuthMethod,
    /// `auth` as the JSON stamped on every message, made once per connection.
    pub auth_json: String,
    pub model_id: Option<String>,
    /// The identity's generationId at connect time, stamped on telemetry.
    pub generation_id: String,
    /// The SDK's user agent (`DeviceClientType`), for logs.
    pub client_type: Option<String>,
    /// When the credentials of this connection expire (Unix seconds; see
    /// [`HubClient::credentials_valid_for`]).
    pub credentials_expiry: Option<u64>,
    pub transport: Transport,
    pub peer: std::net::SocketAddr,
    /// Identifies this connection among successive ones of the same identity.
    pub conn_seq: u64,
    /// When this connection was last active; its messages stamp it without taking a lock.
    pub activity: Arc<ConnectionActivity>,
    /// Responses dropped because this connection's outbound queue was full.
    dropped_replies: std::sync::atomic::AtomicU64,
    /// The twin as this connection last wrote it, where its next reported patch starts: the
    /// conditional write proves it still current (another writer's change makes it fail, and
    /// the patch starts over from the store), so a device patching steadily costs no store read.
    pub(crate) twin_memo: twins::TwinMemo,
}

impl HubClient {
    /// How long this connection may last: IoT Hub closes it when its SAS token (or CA-signed
    /// certificate) expires, and SDKs reconnect with a fresh token before then. `None`: no end.
    pub fn credentials_valid_for(&self) -> Option<Duration> {
        // Checked: `se` comes from the client, and a far-future one must mean "no end", not a
        // panic.
        let at =
            std::time::UNIX_EPOCH.checked_add(Duration::from_secs(self.credentials_expiry?))?;
        Some(
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// Responses dropped because this connection did not read fast enough (see
    /// [`Hub::dropped_replies`]).
    pub fn dropped_replies(&self) -> u64 {
        self.dropped_replies
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Hub-wide settings of the device-facing features.
#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    pub c2d: c2d::C2dSettings,
    pub throttle: throttle::ThrottleSettings,
    pub models: models::ModelSettings,
}

/// Where the hub keeps what only live connections make true: presence, who holds each
/// identity's connection, method calls awaiting their answer. The defaults are this process's
/// own; a cluster shares them (each trait says what that takes).
pub struct LiveState {
    pub presence: Arc<dyn PresenceRegistry>,
    pub connections: Arc<dyn ConnectionDirectory>,
    pub pending_calls: Arc<dyn PendingMethodCalls>,
}

impl Default for LiveState {
    fn default() -> Self {
        Self {
            presence: Arc::new(LocalPresence::default()),
            connections: Arc::new(LocalDirectory::default()),
            pending_calls: Arc::new(LocalPendingCalls::default()),
        }
    }
}

/// Shared state of the hub's device side.
pub struct Hub {
    /// Itself, for the tasks it spawns from `&self` handler calls.
    me: std::sync::Weak<Hub>,
    /// Only the hub's services touch the store: front ends go through them.
    pub(crate) store: Arc<dyn Store>,
    /// Where device-to-cloud messages go; a PUBACK waits for it.
    pub(crate) telemetry: Arc<dyn TelemetryLog>,
    /// Routes, enrichments and custom endpoints in force (`routing.rs`).
    routing: routing::Routing,
    /// Service tokens already checked.
    tokens: service_auth::TokenCache,
    /// Event Hubs readers per partition and consumer group (epochs, the reader limit).
    readers: Arc<readers::Readers>,
    /// Names the hub answers to: `sr` hosts in tokens must be one of them.
    pub hostnames: Vec<String>,
    pub presence: Arc<dyn PresenceRegistry>,
    pub settings: HubSettings,
    /// Live connections of identities, for features that push to devices.
    connections: Arc<dyn ConnectionDirectory>,
    /// Wakes the C2D expiry loop when a message may expire sooner than it planned.
    expiry_wake: tokio::sync::Notify,
    /// Counts the changes that may have put feedback in the queue, so live feedback
    /// receivers (AMQP) wait for one instead of polling.
    feedback_seq: tokio::sync::watch::Sender<u64>,
    /// When (Unix ms) the expiry loop plans to look next, `i64::MAX` while it is deciding; a
    /// send only wakes it for a sooner expiry, so a steady stream of sends costs it nothing.
    expiry_planned: std::sync::atomic::AtomicI64,
    /// Per identity, the newest C2D message handed to a connection and not yet acknowledged:
    /// the next connection counts a delivery for everything up to it still queued. Kept here
    /// rather than written per message, so a delivery costs no durable write of its own;
    /// shutdown writes it, a crash forgets it (those messages come again, count unchanged).
    c2d_handed: Mutex<HashMap<Identity, u64>>,
    methods: Arc<dyn PendingMethodCalls>,
    twin_locks: twins::TwinLocks,
    pub(crate) throttles: throttle::Throttles,
    /// Responses dropped on full outbound queues, since start.
    dropped_replies: std::sync::atomic::AtomicU64,
    next_seq: std::sync::atomic::AtomicU64,
    /// The runners of this process's jobs (`jobs.rs`).
    jobs: jobs::JobRunners,
    /// The front end that holds device connections, once it is composed.
    control: std::sync::OnceLock<Arc<dyn ConnectionControl>>,
    /// Live IoT Plug and Play conformance: the checker's queue and its findings.
    pub(crate) conformance: conformance::Conformance,
    /// The device provisioning service's ID scope and allocator (`provisioning.rs`).
    provisioning: provisioning::ProvisioningService,
    /// The non-telemetry events' emitters (`sources.rs`).
    sources: sources::Sources,
}

impl Hub {
    pub fn new(
        store: Arc<dyn Store>,
        telemetry: Arc<dyn TelemetryLog>,
        hostnames: Vec<String>,
        settings: HubSettings,
    ) -> Arc<Self> {
        Self::with_live_state(store, telemetry, hostnames, settings, LiveState::default())
    }

    /// A hub whose live state is kept by `live` (shared with other nodes, say).
    pub fn with_live_state(
        store: Arc<dyn Store>,
        telemetry: Arc<dyn TelemetryLog>,
        hostnames: Vec<String>,
        settings: HubSettings,
        live: LiveState,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            store,
            routing: routing::Routing::new(telemetry.clone()),
            telemetry,
            tokens: service_auth::TokenCache::default(),
            readers: Arc::default(),
            hostnames,
            presence: live.presence,
            throttles: throttle::Throttles::new(settings.throttle),
            settings,
            connections: live.connections,
            expiry_wake: tokio::sync::Notify::new(),
            feedback_seq: tokio::sync::watch::channel(0).0,
            expiry_planned: std::sync::atomic::AtomicI64::new(i64::MAX),
            c2d_handed: Mutex::new(HashMap::new()),
            methods: live.pending_calls,
            twin_locks: twins::TwinLocks::default(),
            dropped_replies: std::sync::atomic::AtomicU64::new(0),
            next_seq: std::sync::atomic::AtomicU64::new(1),
            jobs: jobs::JobRunners::default(),
            control: std::sync::OnceLock::new(),
            conformance: conformance::Conformance::new(),
            provisioning: Default::default(),
            sources: Default::default(),
        })
    }

    /// Tells the hub who holds device connections (called once while composing the server).
    pub fn set_connection_control(&self, control: Arc<dyn ConnectionControl>) {
        let _ = self.control.set(control);
    }

    pub(crate) fn connection_control(&self) -> Option<&Arc<dyn ConnectionControl>> {
        self.control.get()
    }

    /// The outbound handle of a connected identity.
    pub fn outbound(&self, identity: &Identity) -> Option<Outbound> {
        self.connections.get(identity).map(|l| l.outbound)
    }

    /// Records the connection's subscriptions and starts or stops what they switch on.
    async fn apply_subscriptions(&self, client: &HubClient, filters: &[String]) {
        let subs = Subscribed::of(&client.identity, filters);
        if !self
            .connections
            .update(&client.identity, client.conn_seq, &mut |link| {
                link.subs = subs
            })
        {
            return;
        }
        if subs.c2d {
            self.c2d_start(&client.identity, client.conn_seq);
        } else {
            self.c2d_stop(&client.identity, client.conn_seq);
        }
    }

    /// Sends a QoS 0 response to a connection from inside its own publish handling.
    ///
    /// The connection's task is busy with us, so waiting on its queue could wait forever, and
    /// parking the response elsewhere (a task per response) grows without bound when a client
    /// pipelines requests and does not read. A full queue drops the response instead: IoT
    /// Hub's responses are QoS 0 too, and the SDKs time out and ask again.
    fn reply(&self, client: &HubClient, outbound: &Outbound, topic: String, payload: Bytes) {
        let msg = link::OutboundMessage::new(topic, payload, QoS::AtMostOnce);
        match outbound.try_send(msg) {
            Ok(()) | Err(link::TrySendError::Closed) => {}
            Err(link::TrySendError::Full(msg)) => {
                use std::sync::atomic::Ordering::Relaxed;
                self.dropped_replies.fetch_add(1, Relaxed);
                let n = client.dropped_replies.fetch_add(1, Relaxed) + 1;
                // One warning per connection: a client that does not read would otherwise
                // write the log as fast as it can send requests.
                if n == 1 {
                    warn!(
                        identity = %client.identity,
                        transport = %client.transport,
                        topic = %msg.topic,
                        "outbound queue full: response dropped (QoS 0; the device retries after \
                         its timeout); further drops on this connection are counted and logged \
                         at debug"
                    );
                } else {
                    debug!(identity = %client.identity, topic = %msg.topic, dropped = n, "outbound queue full: response dropped");
                }
            }
        }
    }

    /// Responses dropped since start because a connection's outbound queue was full (the
    /// device did not read them fast enough).
    pub fn dropped_replies(&self) -> u64 {
        self.dropped_replies
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The device side, as a front end drives it: one call per step of a connection's life.
impl Hub {
    /// Authenticates a device's CONNECT.
    pub async fn device_connect(
        &self,
        connect: &Connect,
        peer: &Peer,
    ) -> Result<HubClient, ConnectReturnCode> {
        let a = self.authenticate(connect, peer).await?;
        // Before CONNACK rather than once connected: a service reading the twin (or the
        // digital twin's `$model`) as soon as the device is connected must see the model.
        if let Some(model_id) = &a.model_id {
            self.record_model_id(&a.identity, model_id).await;
        }
        let conn_seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(HubClient {
            identity: a.identity,
            auth_json: a.auth.to_json(),
            auth: a.auth,
            model_id: a.model_id,
            generation_id: a.generation_id,
            client_type: a.client_type,
            credentials_expiry: a.credentials_expiry,
            transport: peer.transport,
            peer: peer.addr,
            conn_seq,
            activity: Arc::new(ConnectionActivity::new(conn_seq)),
            dropped_replies: std::sync::atomic::AtomicU64::new(0),
            twin_memo: Default::default(),
        })
    }

    /// The keep-alive the hub enforces for a client's keep-alive (seconds).
    pub fn keep_alive(&self, client_keep_alive: u16) -> Duration {
        ferrohub_iothub::server_keep_alive(client_keep_alive)
    }

    /// The connection is established: `outbound` reaches it, `subscriptions` came back with a
    /// persistent session.
    pub async fn device_connected(
        &self,
        client: &HubClient,
        outbound: Outbound,
        subscriptions: &[String],
    ) {
        let old = self.connections.attach(
            &client.identity,
            Link {
                conn_seq: client.conn_seq,
                outbound,
                subs: Subscribed::default(),
                c2d: None,
            },
        );
        if let Some((task, _)) = old.and_then(|l| l.c2d) {
            task.abort();
        }
        self.presence
            .connected(&client.identity, client.activity.clone());
        crate::metrics::connection_opened(client.transport, client.auth.names().1);
        self.apply_subscriptions(client, subscriptions).await;
        self.emit_connection_state(&client.identity, client.conn_seq, true)
            .await;
        info!(
            identity = %client.identity,
            auth = %client.auth,
            transport = %client.transport,
            peer = %client.peer,
            model_id = client.model_id.as_deref().unwrap_or(""),
            client_type = client.client_type.as_deref().unwrap_or(""),
            "device connected"
        );
    }

    /// The QoS to grant a subscription to `filter`, or `None` to refuse it.
    pub fn authorize_subscribe(
        &self,
        client: &HubClient,
        filter: &str,
        requested: QoS,
    ) -> Option<QoS> {
        let kind = ferrohub_iothub::authorize_subscribe(&client.identity, filter);
        if kind.is_none() {
            debug!(identity = %client.identity, filter, "subscription refused");
            return None;
        }
        // IoT Hub supports QoS 0 and 1: a QoS 2 request is granted 1.
        Some(requested.min(QoS::AtLeastOnce))
    }

    /// The connection's subscriptions after a SUBSCRIBE or UNSUBSCRIBE.
    pub async fn device_subscriptions_changed(&self, client: &HubClient, subscriptions: &[String]) {
        self.apply_subscriptions(client, subscriptions).await;
    }

    /// A message from the device.
    pub async fn device_publish(&self, client: &HubClient, publish: Publish) -> PublishOutcome {
        let topic = match classify_publish(&client.identity, &publish.topic) {
            Ok(t) => t,
            Err(e) => {
                return PublishOutcome::Reject(format!(
                    "publish to {:?} refused: {e}",
                    publish.topic
                ))
            }
        };
        client.activity.touch();
        match topic {
            PublishTopic::Telemetry { property_bag } => {
                self.ingest(
                    client,
                    property_bag,
                    publish.payload.clone(),
                    publish.retain,
                    false,
                )
                .await
            }
            PublishTopic::TwinGet { rid } => {
                self.device_twin_get(client, &rid).await;
                PublishOutcome::Accept
            }
            PublishTopic::TwinPatchReported { rid } => {
                self.device_twin_patch(client, &rid, &publish.payload).await;
                PublishOutcome::Accept
            }
            PublishTopic::MethodResponse { status, rid } => {
                self.method_response(&client.identity, i32::from(status), &rid, &publish.payload);
                PublishOutcome::Accept
            }
        }
    }

    /// The connection ended, for the reason `why` (an IoT Hub `code` when it was not a clean
    /// close). `will` is set when the Will must be published.
    pub async fn device_disconnected(
        &self,
        client: &HubClient,
        why: &str,
        code: Option<ErrorCode>,
        will: Option<LastWill>,
    ) {
        if let Some(will) = will {
            self.publish_will(client, will).await;
        }
        if let Detached::Removed(Link {
            c2d: Some((task, _)),
            ..
        }) = self.connections.detach(&client.identity, client.conn_seq)
        {
            task.abort();
        }
        // Presence orders connections itself: an older one ending never clears a newer one.
        self.presence
            .disconnected(&client.identity, client.conn_seq);
        crate::metrics::connection_closed(client.transport, client.auth.names().1);
        self.emit_connection_state(&client.identity, client.conn_seq, false)
            .await;
        match code {
            Some(code) => info!(
                identity = %client.identity,
                auth = %client.auth,
                transport = %client.transport,
                reason = %why,
                dropped_replies = client.dropped_replies(),
                error_code = code.code(),
                error = code.name(),
                "device disconnected"
            ),
            None => info!(
                identity = %client.identity,
                auth = %client.auth,
                transport = %client.transport,
                reason = %why,
                dropped_replies = client.dropped_replies(),
                "device disconnected"
            ),
        }
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone). Holds no watch guard, so it
/// can sit in a `select!` whose other branches await.
pub async fn until_shutdown(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
