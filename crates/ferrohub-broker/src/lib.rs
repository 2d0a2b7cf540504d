//! A generic MQTT 3.1.1 server: connections, sessions, keep-alive, in-flight tracking,
//! takeover. It knows nothing of IoT Hub; the semantics plug in through [`Handler`].
//!
//! Layers, as in mini-redis: bytes -> [`ferrohub_mqtt::Packet`] (the codec crate) -> calls on
//! [`Handler`] (whatever semantics the server plugs in) -> storage. The broker's own durable
//! state (persistent sessions) goes through [`SessionPersistence`], which the composer adapts to
//! a real store: this crate depends on no storage engine and no IoT Hub rules.
//!
//! The broker implements QoS 0 and 1 (no QoS 2 flow); [`BrokerConfig::maximum_qos`] can lower
//! that, and [`Handler::authorize_subscribe`] chooses each grant below it.

mod connection;
mod persistence;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ferrohub_mqtt::{ConnectReturnCode, LastWill, Publish, QoS};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

pub use connection::serve_connection;
pub use persistence::{NoPersistence, PersistedSession, PersistenceError, SessionPersistence};
pub use session::SessionState;

/// How a connection reached us; the handler may care (telemetry stamping, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tls,
    WebSocket,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tls => "mqtt-tls",
            Transport::WebSocket => "mqtt-ws",
        })
    }
}

/// What the transport knows about the peer before CONNECT.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// The TLS client certificate chain, leaf first, when the client sent one. Possession of
    /// the leaf's key was proven in the handshake; whether it is trusted is the handler's call.
    pub client_certs: Arc<Vec<CertificateDer<'static>>>,
}

/// Why a connection ended, for the handler's log line and Will handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT: the Will is discarded.
    ClientDisconnect,
    /// The socket closed or failed without DISCONNECT.
    ConnectionLost(String),
    /// Nothing arrived within the keep-alive window.
    KeepAliveTimeout,
    /// A newer connection with the same client id took over.
    TakenOver,
    /// The client broke the protocol or the handler's rules (the text says how).
    ProtocolViolation(String),
    /// The broker could not read or write the session's durable state: the server's fault,
    /// not the client's.
    SessionStore(String),
    /// The handler could not do its part of a PUBLISH (its storage failed, say): the server's
    /// fault, and the client may retry. `code` is the handler's own code for the failure,
    /// handed back to it in [`Handler::disconnected`].
    HandlerFailed { reason: String, code: u32 },
    /// The server is shutting down.
    ServerShutdown,
    /// The credentials the client connected with stopped being valid (see
    /// [`Handler::session_deadline`]): it must reconnect with fresh ones.
    CredentialsExpired,
}

impl DisconnectReason {
    /// Whether the Will message must be published (MQTT 3.1.1 section 3.1.2.5).
    pub fn publishes_will(&self) -> bool {
        !matches!(
            self,
            DisconnectReason::ClientDisconnect | DisconnectReason::ServerShutdown
        )
    }
}

/// Work that must finish before a PUBLISH may be acknowledged (e.g. the message reaching disk).
/// `Err` closes the connection without acknowledging.
pub type Completion =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Refusal>> + Send>>;

/// Why the handler will not have a PUBLISH acknowledged; the connection closes either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The client broke the handler's rules (ends as [`DisconnectReason::ProtocolViolation`]).
    Violation(String),
    /// The handler failed (ends as [`DisconnectReason::HandlerFailed`]).
    Failed { reason: String, code: u32 },
}

impl From<Refusal> for DisconnectReason {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Violation(why) => DisconnectReason::ProtocolViolation(why),
            Refusal::Failed { reason, code } => DisconnectReason::HandlerFailed { reason, code },
        }
    }
}

/// The handler's answer to a PUBLISH.
pub enum PublishDecision {
    /// Acknowledge (QoS 1) now: the handler has done what it must.
    Accept,
    /// Acknowledge once the completion resolves. The connection keeps reading meanwhile (up to
    /// `BrokerConfig::max_pending_acks`), and PUBACKs still go out in PUBLISH order.
    AcceptWhen(Completion),
    /// Close the connection without acknowledging.
    Reject(Refusal),
}

impl std::fmt::Debug for PublishDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishDecision::Accept => f.write_str("Accept"),
            PublishDecision::AcceptWhen(_) => f.write_str("AcceptWhen(..)"),
            PublishDecision::Reject(r) => write!(f, "Reject({r:?})"),
        }
    }
}

/// Broker-wide limits. Each bounds memory or work per connection. The defaults are a generic
/// broker's; a server with rules of its own (IoT Hub's 256 KB messages, 5 subscriptions) sets
/// them when it composes the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Largest packet accepted, checked from the fixed header before the body is read.
    pub max_packet_size: usize,
    /// Highest QoS accepted on PUBLISH and granted on SUBSCRIBE. The broker has no QoS 2 flow,
    /// so anything above QoS 1 is treated as QoS 1 here.
    pub maximum_qos: QoS,
    /// Server-to-client QoS 1 messages awaiting PUBACK per connection; past it, delivery waits.
    pub max_inflight: usize,
    /// Subscriptions per session.
    pub max_subscriptions: usize,
    /// How long a new socket may take to send CONNECT.
    pub connect_timeout: Duration,
    /// Outbound messages queued per connection before senders wait (backpressure).
    pub outbound_queue: usize,
    /// Client publishes awaiting their completion per connection; past it the connection stops
    /// reading, so a client cannot make the server buffer without bound.
    pub max_pending_acks: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            maximum_qos: QoS::AtLeastOnce,
            max_inflight: 16,
            max_subscriptions: 64,
            connect_timeout: Duration::from_secs(30),
            outbound_queue: 64,
            max_pending_acks: 64,
        }
    }
}

/// The semantics layer, as the broker sees it.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Per-connection state the handler keeps (identity, auth method, ...).
    type Client: Send + Sync + 'static;

    /// Authenticates and authorizes CONNECT. The returned client is passed to every other call.
    async fn connect(
        &self,
        connect: &ferrohub_mqtt::Connect,
        peer: &PeerInfo,
    ) -> Result<Self::Client, ConnectReturnCode>;

    /// The keep-alive the server enforces for a client keep-alive (seconds).
    fn keep_alive(&self, client_keep_alive: u16) -> Duration;

    /// When the session must end whatever the client does, e.g. when the token it connected
    /// with expires; asked once, after CONNECT. The broker closes the connection at that
    /// instant with [`DisconnectReason::CredentialsExpired`], using a branch of the session's
    /// own loop rather than a timer task, so an idle connection costs nothing more.
    fn session_deadline(&self, _client: &Self::Client) -> Option<tokio::time::Instant> {
        None
    }

    /// The key the broker files this client's session under (takeover, in-flight messages,
    /// persistence) when it must differ from the CONNECT client id, e.g. for a second protocol
    /// on the same listener whose client ids may equal the first one's. Such a session is
    /// always clean (nothing is persisted under the key). `None`: the client id.
    fn session_key(&self, _client: &Self::Client) -> Option<String> {
        None
    }

    /// Called once the connection is registered and CONNACK sent, with a handle that can push
    /// messages to this client and the subscriptions a persistent session brought back.
    async fn connected(&self, client: &Self::Client, outbound: Outbound, subscriptions: &[String]);

    /// Whether the client may subscribe to `filter` at `requested` QoS: the QoS to grant, or
    /// `None` to refuse. The broker lowers a grant above [`BrokerConfig::maximum_qos`].
    fn authorize_subscribe(
        &self,
        client: &Self::Client,
        filter: &str,
        requested: QoS,
    ) -> Option<QoS>;

    /// The client's subscriptions after a SUBSCRIBE or UNSUBSCRIBE was acknowledged.
    async fn subscriptions_changed(&self, client: &Self::Client, subscriptions: &[String]);

    /// A PUBLISH from the client, at most at [`BrokerConfig::maximum_qos`] (the broker refuses
    /// higher QoS itself).
    async fn publish(&self, client: &Self::Client, publish: Publish) -> PublishDecision;

    /// The connection ended. `will` is set when the Will must be published.
    async fn disconnected(
        &self,
        client: &Self::Client,
        reason: &DisconnectReason,
        will: Option<LastWill>,
    );
}

/// A message for a connected client.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Called when the client acknowledges this QoS 1 message. A message with a hook belongs
    /// to the handler's own durable queue: the broker does not carry it over to the next
    /// connection of a persistent session; the handler redelivers it from its queue instead.
    pub on_ack: Option<AckHook>,
}

impl OutboundMessage {
    pub fn new(topic: String, payload: Bytes, qos: QoS) -> Self {
        Self {
            topic,
            payload,
            qos,
            on_ack: None,
        }
    }
}

/// See [`OutboundMessage::on_ack`].
#[derive(Clone)]
pub struct AckHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for AckHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckHook")
    }
}

/// A handle to push messages to one connection. Sending waits when the connection is slow
/// (bounded queue) and fails once the connection has gone.
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Box<OutboundMessage>>,
}

impl Outbound {
    pub async fn send(&self, msg: OutboundMessage) -> Result<(), NotConnected> {
        self.tx.send(Box::new(msg)).await.map_err(|_| NotConnected)
    }

    /// Queues without waiting; a full queue hands the message back so the caller can decide
    /// (the connection's own task must never wait on its own queue).
    pub fn try_send(&self, msg: OutboundMessage) -> Result<(), TrySendError> {
        self.tx.try_send(Box::new(msg)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(m) => TrySendError::Full(*m),
            mpsc::error::TrySendError::Closed(_) => TrySendError::Closed,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("client is not connected")]
pub struct NotConnected;

#[derive(Debug)]
pub enum TrySendError {
    Full(OutboundMessage),
    Closed,
}

/// The live connection holding a client id: used to close it when a newer one arrives.
struct LiveConnection {
    conn_id: u64,
    /// Tells the connection to close because it was taken over (or its identity went): it
    /// interrupts a write blocked on a client that stopped reading, too.
    kick: CancellationToken,
    /// Resolves when the connection task has released the session.
    done: tokio::sync::watch::Receiver<bool>,
}

/// Shared broker state: who is connected, and in-memory persistent sessions.
pub struct Broker<H: Handler> {
    pub(crate) handler: Arc<H>,
    pub(crate) config: BrokerConfig,
    pub(crate) sessions_store: Arc<dyn SessionPersistence>,
    live: std::sync::Mutex<HashMap<String, LiveConnection>>,
    /// CleanSession=0 sessions of this process (subscriptions + unacknowledged outbound
    /// messages), so a reconnect finds its in-flight messages. Subscriptions are also in the
    /// store, which is what survives a restart.
    sessions: std::sync::Mutex<HashMap<String, Arc<Mutex<SessionState>>>>,
    next_conn_id: std::sync::atomic::AtomicU64,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl<H: Handler> Broker<H> {
    pub fn new(
        handler: Arc<H>,
        config: BrokerConfig,
        sessions_store: Arc<dyn SessionPersistence>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            handler,
            config,
            sessions_store,
            live: std::sync::Mutex::new(HashMap::new()),
            sessions: std::sync::Mutex::new(HashMap::new()),
            next_conn_id: std::sync::atomic::AtomicU64::new(1),
            shutdown,
        })
    }

    pub fn handler(&self) -> &Arc<H> {
        &self.handler
    }

    /// Registers `client_id` as connected, kicking any older connection and waiting until it
    /// has let go of the session. Returns this connection's id and its takeover signal.
    async fn register(
        &self,
        client_id: &str,
        done: tokio::sync::watch::Receiver<bool>,
    ) -> (u64, CancellationToken) {
        let conn_id = self
            .next_conn_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kick = CancellationToken::new();
        let old = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.insert(
                client_id.to_string(),
                LiveConnection {
                    conn_id,
                    kick: kick.clone(),
                    done,
                },
            )
        };
        if let Some(mut old) = old {
            old.kick.cancel();
            // Bounded: a wedged old task must not block the new device forever.
            let _ = tokio::time::timeout(Duration::from_secs(5), old.done.wait_for(|d| *d)).await;
        }
        (conn_id, kick)
    }

    fn unregister(&self, client_id: &str, conn_id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(client_id).map(|l| l.conn_id) == Some(conn_id) {
            live.remove(client_id);
        }
    }

    fn memory_session(&self, client_id: &str) -> Option<Arc<Mutex<SessionState>>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .cloned()
    }

    fn put_memory_session(&self, client_id: &str, s: Arc<Mutex<SessionState>>) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id.to_string(), s);
    }

    fn drop_memory_session(&self, client_id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client_id);
    }
}

impl<H: Handler> Broker<H> {
    /// Closes the live connection of `client_id`, if any (used when an identity is deleted or
    /// disabled). Returns whether there was one.
    pub fn kick(&self, client_id: &str) -> bool {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        match live.get(client_id) {
            Some(l) => {
                let first = !l.kick.is_cancelled();
                l.kick.cancel();
                first
            }
            None => false,
        }
    }

    /// Forgets the persistent session of `client_id` (memory and store), e.g. when the identity
    /// is deleted.
    pub async fn forget_session(&self, client_id: &str) -> Result<(), PersistenceError> {
        self.drop_memory_session(client_id);
        self.sessions_store.delete(client_id).await
    }
}

impl<H: Handler> Broker<H> {
    pub fn max_packet_size(&self) -> usize {
        self.config.max_packet_size
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone). Holds no watch guard, so it
/// can sit in a `select!` whose other branches await.
pub async fn until_shutdown(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
