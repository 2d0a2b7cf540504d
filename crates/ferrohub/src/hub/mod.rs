//! The IoT Hub runtime: what a connected device may do, on top of the generic broker.
//!
//! The pure rules (username, SAS, topics, error codes) live in the `ferrohub-iothub` crate; this
//! module applies them to live connections and the store: it authenticates CONNECT, authorizes
//! topics, tracks presence, and logs every connect and disconnect with its IoT Hub error code.

mod auth;
pub mod presence;
mod telemetry;
pub mod x509;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferrohub_iothub::{classify_publish, ErrorCode, Identity, PublishTopic};
use ferrohub_mqtt::{Connect, ConnectReturnCode, LastWill, Publish};
use ferrohub_store::telemetry::TelemetryLog;
use ferrohub_store::Store;
use tracing::{debug, info};

use crate::broker::{DisconnectReason, Handler, Outbound, PeerInfo, PublishDecision, Transport};
pub use auth::AuthMethod;
use presence::Presence;

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
    pub transport: Transport,
    pub peer: std::net::SocketAddr,
    /// Identifies this connection among successive ones of the same identity.
    pub conn_seq: u64,
}

/// Shared state of the hub's device side.
pub struct Hub {
    pub store: Arc<dyn Store>,
    /// Where device-to-cloud messages go; a PUBACK waits for it.
    pub telemetry: Arc<dyn TelemetryLog>,
    /// Names the hub answers to: `sr` hosts in tokens must be one of them.
    pub hostnames: Vec<String>,
    pub presence: Presence,
    /// Outbound handles of connected identities, for features that push to devices.
    clients: Mutex<HashMap<Identity, (u64, Outbound)>>,
    next_seq: std::sync::atomic::AtomicU64,
}

impl Hub {
    pub fn new(
        store: Arc<dyn Store>,
        telemetry: Arc<dyn TelemetryLog>,
        hostnames: Vec<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            telemetry,
            hostnames,
            presence: Presence::default(),
            clients: Mutex::new(HashMap::new()),
            next_seq: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The outbound handle of a connected identity.
    pub fn outbound(&self, identity: &Identity) -> Option<Outbound> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .map(|(_, o)| o.clone())
    }
}

#[async_trait]
impl Handler for Hub {
    type Client = HubClient;

    async fn connect(
        &self,
        connect: &Connect,
        peer: &PeerInfo,
    ) -> Result<HubClient, ConnectReturnCode> {
        let a = self.authenticate(connect, peer).await?;
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
            transport: peer.transport,
            peer: peer.addr,
            conn_seq,
        })
    }

    fn keep_alive(&self, client_keep_alive: u16) -> Duration {
        ferrohub_iothub::server_keep_alive(client_keep_alive)
    }

    async fn connected(&self, client: &HubClient, outbound: Outbound) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client.identity.clone(), (client.conn_seq, outbound));
        self.presence.connected(&client.identity);
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

    fn authorize_subscribe(&self, client: &HubClient, filter: &str) -> bool {
        let kind = ferrohub_iothub::authorize_subscribe(&client.identity, filter);
        if kind.is_none() {
            debug!(identity = %client.identity, filter, "subscription refused");
        }
        kind.is_some()
    }

    async fn publish(&self, client: &HubClient, publish: Publish) -> PublishDecision {
        let topic = match classify_publish(&client.identity, &publish.topic) {
            Ok(t) => t,
            Err(e) => {
                return PublishDecision::Reject(format!(
                    "publish to {:?} refused: {e}",
                    publish.topic
                ))
            }
        };
        self.presence.activity(&client.identity);
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
            // Twins and methods are built by later work; until then the topics are accepted so
            // that SDKs which use them at start-up keep working.
            PublishTopic::TwinGet { .. }
            | PublishTopic::TwinPatchReported { .. }
            | PublishTopic::MethodResponse { .. } => PublishDecision::Accept,
        }
    }

    async fn disconnected(
        &self,
        client: &HubClient,
        reason: &DisconnectReason,
        will: Option<LastWill>,
    ) {
        if let Some(will) = will {
            self.publish_will(client, will).await;
        }
        let still_ours = {
            let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            match clients.get(&client.identity) {
                Some((seq, _)) if *seq == client.conn_seq => {
                    clients.remove(&client.identity);
                    true
                }
                // Never registered (failed before CONNACK) or already replaced by a newer one.
                None => true,
                Some(_) => false,
            }
        };
        if still_ours {
            self.presence.disconnected(&client.identity);
        }
        let (why, code) = describe(reason);
        match code {
            Some(code) => info!(
                identity = %client.identity,
                auth = %client.auth,
                transport = %client.transport,
                reason = %why,
                error_code = code.code(),
                error = code.name(),
                "device disconnected"
            ),
            None => info!(
                identity = %client.identity,
                auth = %client.auth,
                transport = %client.transport,
                reason = %why,
                "device disconnected"
            ),
        }
    }
}

/// The log text and IoT Hub error code for a disconnect.
fn describe(reason: &DisconnectReason) -> (String, Option<ErrorCode>) {
    match reason {
        DisconnectReason::ClientDisconnect => ("client sent DISCONNECT".into(), None),
        DisconnectReason::ConnectionLost(e) => (
            format!("connection lost: {e}"),
            Some(ErrorCode::DeviceConnectionClosedRemotely),
        ),
        DisconnectReason::KeepAliveTimeout => (
            "keep-alive expired".into(),
            Some(ErrorCode::DeviceConnectionClosedRemotely),
        ),
        DisconnectReason::TakenOver => (
            "a new connection of the same identity took over".into(),
            Some(ErrorCode::ConnectionForcefullyClosedOnNewConnection),
        ),
        DisconnectReason::ProtocolViolation(e) => (
            format!("protocol violation: {e}"),
            Some(ErrorCode::ArgumentInvalid),
        ),
        DisconnectReason::ServerShutdown => ("server shutting down".into(), None),
    }
}
