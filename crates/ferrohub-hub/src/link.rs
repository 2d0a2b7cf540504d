//! How the hub reaches a connected device, whatever front end holds the connection: a handle to
//! push messages into it ([`Outbound`]), and control over connections and sessions
//! ([`ConnectionControl`]). The MQTT front end implements both over the broker.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use ferrohub_mqtt::QoS;

/// A message for a connected device, addressed by its IoT Hub topic.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Called when the device acknowledges this QoS 1 message. A message with a hook belongs
    /// to the hub's own durable queue (C2D): the front end does not carry it over to the next
    /// connection; the hub redelivers it from its queue instead.
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

#[derive(Debug, thiserror::Error)]
#[error("client is not connected")]
pub struct NotConnected;

#[derive(Debug)]
pub enum TrySendError {
    Full(OutboundMessage),
    Closed,
}

/// One connection's bounded queue of messages to the device, as a front end provides it.
#[async_trait]
pub trait DeviceLink: Send + Sync + 'static {
    /// Waits while the queue is full; fails once the connection has gone.
    async fn send(&self, msg: OutboundMessage) -> Result<(), NotConnected>;
    /// Queues without waiting; a full queue hands the message back.
    fn try_send(&self, msg: OutboundMessage) -> Result<(), TrySendError>;
    fn is_closed(&self) -> bool;
}

/// A cloneable handle to a [`DeviceLink`].
#[derive(Clone)]
pub struct Outbound(Arc<dyn DeviceLink>);

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbound")
    }
}

impl Outbound {
    pub fn new(link: impl DeviceLink) -> Self {
        Self(Arc::new(link))
    }

    pub async fn send(&self, msg: OutboundMessage) -> Result<(), NotConnected> {
        self.0.send(msg).await
    }

    pub fn try_send(&self, msg: OutboundMessage) -> Result<(), TrySendError> {
        self.0.try_send(msg)
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// What the hub may ask of the front ends about connections it does not own: closing an
/// identity's live connection (deleted, disabled, keys changed) and dropping its persistent
/// session. Keyed by the MQTT client id, which for IoT Hub is the device id or `device/module`.
#[async_trait]
pub trait ConnectionControl: Send + Sync + 'static {
    /// Closes the live connection of `client_id`; whether there was one.
    fn kick(&self, client_id: &str) -> bool;
    /// Forgets the persistent session of `client_id`, in memory and on disk.
    async fn forget_session(&self, client_id: &str) -> Result<(), crate::BoxError>;
}
