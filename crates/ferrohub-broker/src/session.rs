//! Per-client MQTT session state: subscriptions and server-to-client messages awaiting PUBACK.

use std::collections::VecDeque;

use ferrohub_mqtt::QoS;

use crate::{OutboundMessage, PersistedSession};

/// The state MQTT keeps for a client id between packets, and (CleanSession=0) between
/// connections.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Filters and granted QoS, in subscription order.
    pub subscriptions: Vec<(String, QoS)>,
    /// QoS 1 messages sent and not yet acknowledged, oldest first: redelivered with DUP=1 on the
    /// next connection. Bounded by `BrokerConfig::max_inflight`.
    pub inflight: VecDeque<(u16, OutboundMessage)>,
    last_packet_id: u16,
}

impl SessionState {
    pub fn from_persisted(stored: &PersistedSession) -> Self {
        Self {
            subscriptions: stored.subscriptions.clone(),
            ..Default::default()
        }
    }

    pub fn to_persisted(&self) -> PersistedSession {
        PersistedSession {
            subscriptions: self.subscriptions.clone(),
        }
    }

    /// A packet id not in use by an in-flight message (never 0, as MQTT requires).
    pub fn next_packet_id(&mut self) -> u16 {
        loop {
            self.last_packet_id = self.last_packet_id.wrapping_add(1);
            if self.last_packet_id == 0 {
                continue;
            }
            let id = self.last_packet_id;
            if !self.inflight.iter().any(|(p, _)| *p == id) {
                return id;
            }
        }
    }

    /// Drops in-flight messages the handler redelivers itself (those with an ack hook), so a
    /// persistent session does not send them twice.
    pub fn release_handler_messages(&mut self) {
        self.inflight.retain(|(_, m)| m.on_ack.is_none());
    }

    /// Removes the acknowledged message; unknown ids (late or duplicate PUBACKs) are ignored.
    pub fn ack(&mut self, packet_id: u16) -> Option<OutboundMessage> {
        let pos = self.inflight.iter().position(|(p, _)| *p == packet_id)?;
        self.inflight.remove(pos).map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg() -> OutboundMessage {
        OutboundMessage::new("t".into(), Bytes::new(), QoS::AtLeastOnce)
    }

    #[test]
    fn packet_ids_skip_zero_and_ids_in_flight() {
        let mut s = SessionState {
            last_packet_id: u16::MAX - 1,
            ..Default::default()
        };
        s.inflight.push_back((u16::MAX, msg()));
        s.inflight.push_back((1, msg()));
        assert_eq!(s.next_packet_id(), 2);
        assert!(s.ack(1).is_some());
        assert!(s.ack(1).is_none());
    }

    #[test]
    fn stored_form_keeps_filters_and_qos() {
        let s = SessionState {
            subscriptions: vec![
                ("a/#".into(), QoS::AtLeastOnce),
                ("b".into(), QoS::AtMostOnce),
            ],
            ..Default::default()
        };
        let back = SessionState::from_persisted(&s.to_persisted());
        assert_eq!(back.subscriptions, s.subscriptions);
    }
}
