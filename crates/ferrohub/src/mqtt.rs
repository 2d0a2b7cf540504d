//! The MQTT front end: plugs the hub's device services (and its device provisioning service,
//! for CONNECTs with a DPS username) into the generic broker.
//!
//! It translates and nothing more: broker calls become hub calls, hub messages become broker
//! messages, and a disconnect reason becomes its log text and IoT Hub error code. The hub's
//! control over connections (kick, forget a session) and the broker's persistent sessions
//! (kept in the hub's store) are adapted here too.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use ferrohub_broker::{Broker, DisconnectReason, Handler, PeerInfo, PublishDecision, Refusal};
use ferrohub_hub::link::{self, ConnectionControl, DeviceLink, NotConnected};
use ferrohub_hub::provisioning::ProvisioningClient;
use ferrohub_hub::{Hub, HubClient, HubError, PublishOutcome};
use ferrohub_iothub::ErrorCode;
use ferrohub_mqtt::{Connect, ConnectReturnCode, LastWill, Publish, QoS};
use ferrohub_store::Store;

/// The broker's handler: every call goes to one hub service.
pub struct MqttFrontEnd {
    pub hub: Arc<Hub>,
}

fn transport(t: ferrohub_broker::Transport) -> ferrohub_hub::Transport {
    match t {
        ferrohub_broker::Transport::Tls => ferrohub_hub::Transport::MqttTls,
        ferrohub_broker::Transport::WebSocket => ferrohub_hub::Transport::MqttWebSocket,
    }
}

/// A connection the front end holds: a device's hub connection, or a device provisioning
/// itself (a CONNECT whose username has the DPS form, `{idScope}/registrations/{id}/...`),
/// which reaches the hub's provisioning service on the same listeners.
pub enum MqttClient {
    Device(HubClient),
    Provisioning(ProvisioningClient),
}

#[async_trait]
impl Handler for MqttFrontEnd {
    type Client = MqttClient;

    async fn connect(
        &self,
        connect: &Connect,
        peer: &PeerInfo,
    ) -> Result<MqttClient, ConnectReturnCode> {
        let peer = ferrohub_hub::Peer {
            addr: peer.addr,
            transport: transport(peer.transport),
            client_certs: peer.client_certs.clone(),
        };
        if connect
            .username
            .as_deref()
            .is_some_and(ferrohub_iothub::dps::is_dps_username)
        {
            return self
                .hub
                .provisioning_connect(connect, &peer)
                .map(MqttClient::Provisioning);
        }
        self.hub
            .device_connect(connect, &peer)
            .await
            .map(MqttClient::Device)
    }

    fn keep_alive(&self, client_keep_alive: u16) -> Duration {
        self.hub.keep_alive(client_keep_alive)
    }

    fn session_deadline(&self, client: &MqttClient) -> Option<tokio::time::Instant> {
        match client {
            // An instant too far to represent is never reached: no deadline.
            MqttClient::Device(c) => {
                tokio::time::Instant::now().checked_add(c.credentials_valid_for()?)
            }
            MqttClient::Provisioning(p) => Some(tokio::time::Instant::from_std(p.deadline)),
        }
    }

    fn session_key(&self, client: &MqttClient) -> Option<String> {
        match client {
            MqttClient::Device(_) => None,
            MqttClient::Provisioning(p) => Some(p.session_key()),
        }
    }

    async fn connected(
        &self,
        client: &MqttClient,
        outbound: ferrohub_broker::Outbound,
        subscriptions: &[String],
    ) {
        let link = link::Outbound::new(MqttLink(outbound));
        match client {
            MqttClient::Device(c) => self.hub.device_connected(c, link, subscriptions).await,
            MqttClient::Provisioning(p) => self.hub.provisioning_connected(p, link),
        }
    }

    fn authorize_subscribe(
        &self,
        client: &MqttClient,
        filter: &str,
        requested: QoS,
    ) -> Option<QoS> {
        match client {
            MqttClient::Device(c) => self.hub.authorize_subscribe(c, filter, requested),
            MqttClient::Provisioning(p) => self
                .hub
                .provisioning_authorize_subscribe(p, filter, requested),
        }
    }

    async fn subscriptions_changed(&self, client: &MqttClient, subscriptions: &[String]) {
        if let MqttClient::Device(c) = client {
            self.hub
                .device_subscriptions_changed(c, subscriptions)
                .await;
        }
    }

    async fn publish(&self, client: &MqttClient, publish: Publish) -> PublishDecision {
        let outcome = match client {
            MqttClient::Device(c) => self.hub.device_publish(c, publish).await,
            MqttClient::Provisioning(p) => self.hub.provisioning_publish(p, publish).await,
        };
        match outcome {
            PublishOutcome::Accept => PublishDecision::Accept,
            PublishOutcome::AcceptWhen(done) => {
                PublishDecision::AcceptWhen(Box::pin(async move { done.await.map_err(failed) }))
            }
            PublishOutcome::Reject(why) => PublishDecision::Reject(Refusal::Violation(why)),
            PublishOutcome::Fail(e) => PublishDecision::Reject(failed(e)),
        }
    }

    async fn disconnected(
        &self,
        client: &MqttClient,
        reason: &DisconnectReason,
        will: Option<LastWill>,
    ) {
        let (why, code) = describe(reason);
        match client {
            MqttClient::Device(c) => self.hub.device_disconnected(c, &why, code, will).await,
            MqttClient::Provisioning(p) => {
                tracing::info!(registration_id = %p.registration_id, transport = %p.transport,
                               reason = %why, "provisioning connection closed");
            }
        }
    }
}

/// A hub failure as the broker carries it to the disconnect log line.
fn failed(e: HubError) -> Refusal {
    Refusal::Failed {
        reason: e.message().to_string(),
        code: e.code().code(),
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
        DisconnectReason::SessionStore(e) => (
            format!("session store failed: {e}"),
            Some(ErrorCode::ServerError),
        ),
        DisconnectReason::HandlerFailed { reason, code } => (
            format!("hub failed: {reason}"),
            Some(ErrorCode::from_code(*code).unwrap_or(ErrorCode::ServerError)),
        ),
        DisconnectReason::ServerShutdown => ("server shutting down".into(), None),
        // 401002 is what IoT Hub reports when a device's SAS token expires on a live
        // connection; 401003 (IoTHubUnauthorized) is for credentials refused at connect.
        DisconnectReason::CredentialsExpired => (
            "credentials expired (SAS token or certificate)".into(),
            Some(ErrorCode::IotHubUnauthorizedAccess),
        ),
    }
}

/// A hub message into one broker connection.
struct MqttLink(ferrohub_broker::Outbound);

fn to_broker(msg: link::OutboundMessage) -> ferrohub_broker::OutboundMessage {
    ferrohub_broker::OutboundMessage {
        topic: msg.topic,
        payload: msg.payload,
        qos: msg.qos,
        on_ack: msg.on_ack.map(|h| ferrohub_broker::AckHook(h.0)),
    }
}

fn from_broker(msg: ferrohub_broker::OutboundMessage) -> link::OutboundMessage {
    link::OutboundMessage {
        topic: msg.topic,
        payload: msg.payload,
        qos: msg.qos,
        on_ack: msg.on_ack.map(|h| link::AckHook(h.0)),
    }
}

#[async_trait]
impl DeviceLink for MqttLink {
    async fn send(&self, msg: link::OutboundMessage) -> Result<(), NotConnected> {
        self.0.send(to_broker(msg)).await.map_err(|_| NotConnected)
    }

    fn try_send(&self, msg: link::OutboundMessage) -> Result<(), link::TrySendError> {
        self.0.try_send(to_broker(msg)).map_err(|e| match e {
            ferrohub_broker::TrySendError::Full(m) => link::TrySendError::Full(from_broker(m)),
            ferrohub_broker::TrySendError::Closed => link::TrySendError::Closed,
        })
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The hub's control over broker connections. Weak: the broker owns the front end, which owns
/// the hub, which holds this.
pub struct BrokerControl(pub Weak<Broker<MqttFrontEnd>>);

#[async_trait]
impl ConnectionControl for BrokerControl {
    fn kick(&self, client_id: &str) -> bool {
        self.0.upgrade().is_some_and(|b| b.kick(client_id))
    }

    async fn forget_session(&self, client_id: &str) -> Result<(), ferrohub_hub::BoxError> {
        match self.0.upgrade() {
            Some(b) => b.forget_session(client_id).await.map_err(Into::into),
            None => Ok(()),
        }
    }
}

/// The broker's persistent sessions, kept in the hub's store.
pub struct StoreSessions(pub Arc<dyn Store>);

fn persistence_error(e: ferrohub_store::StoreError) -> ferrohub_broker::PersistenceError {
    ferrohub_broker::PersistenceError(Box::new(e))
}

#[async_trait]
impl ferrohub_broker::SessionPersistence for StoreSessions {
    async fn load(
        &self,
        client_id: &str,
    ) -> Result<Option<ferrohub_broker::PersistedSession>, ferrohub_broker::PersistenceError> {
        let stored = self
            .0
            .load_session(client_id)
            .await
            .map_err(persistence_error)?;
        Ok(stored.map(|s| ferrohub_broker::PersistedSession {
            subscriptions: s
                .subscriptions
                .into_iter()
                .map(|sub| {
                    let qos = if sub.qos == 0 {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    (sub.filter, qos)
                })
                .collect(),
        }))
    }

    async fn save(
        &self,
        client_id: &str,
        session: &ferrohub_broker::PersistedSession,
    ) -> Result<(), ferrohub_broker::PersistenceError> {
        let stored = ferrohub_store::StoredSession {
            subscriptions: session
                .subscriptions
                .iter()
                .map(|(filter, qos)| ferrohub_store::StoredSubscription {
                    filter: filter.clone(),
                    qos: *qos as u8,
                })
                .collect(),
        };
        self.0
            .save_session(client_id, &stored)
            .await
            .map_err(persistence_error)
    }

    async fn delete(&self, client_id: &str) -> Result<(), ferrohub_broker::PersistenceError> {
        self.0
            .delete_session(client_id)
            .await
            .map_err(persistence_error)
    }
}
