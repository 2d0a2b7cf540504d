//! Device-to-cloud telemetry: validate and stamp a device's message, append it to the durable
//! log, and let the broker acknowledge it only once it is on disk. Will messages take the same
//! path when a connection drops without DISCONNECT.

use bytes::Bytes;
use ferrohub_iothub::telemetry::{
    parse_telemetry, stamp, StampContext, DT_SUBJECT, MESSAGE_SOURCE_TELEMETRY,
};
use ferrohub_iothub::{classify_publish, PublishTopic};
use ferrohub_mqtt::LastWill;
use ferrohub_store::telemetry::NewEvent;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::{Hub, HubClient};
use crate::{HubError, PublishOutcome};

impl Hub {
    /// Builds the stored event for a telemetry publish, or says why it is refused.
    fn telemetry_event(
        &self,
        client: &HubClient,
        property_bag: &str,
        body: Bytes,
        retain: bool,
        is_will: bool,
    ) -> Result<NewEvent, String> {
        let parsed = parse_telemetry(property_bag, body).map_err(|e| {
            let code = e.error_code();
            warn!(identity = %client.identity, error_code = code.code(), error = code.name(),
                  reason = %e, "telemetry refused; closing the connection");
            format!("telemetry refused ({code}): {e}")
        })?;
        let now = OffsetDateTime::now_utc();
        let msg = stamp(
            parsed,
            &StampContext {
                device_id: &client.identity.device_id,
                module_id: client.identity.module_id.as_deref(),
                generation_id: &client.generation_id,
                auth_method_json: &client.auth_json,
                model_id: client.model_id.as_deref(),
                enqueued_time: now,
                retain,
                message_source: MESSAGE_SOURCE_TELEMETRY,
                is_will,
            },
        );
        Ok(NewEvent {
            device_id: client.identity.device_id.clone(),
            module_id: client.identity.module_id.clone(),
            enqueued_ms: i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
            system_properties: msg.system_properties,
            properties: msg.properties,
            body: msg.body.to_vec(),
        })
    }

    /// A telemetry PUBLISH: refused (connection closed, nothing stored) if invalid, otherwise
    /// acknowledged once the log has it on disk. The message takes its place in the log here,
    /// while the connection handles its PUBLISHes one by one, so a device's messages are stored
    /// in the order it sent them; only the wait for the disk overlaps with later messages.
    pub(super) async fn ingest(
        &self,
        client: &HubClient,
        property_bag: &str,
        body: Bytes,
        retain: bool,
        is_will: bool,
    ) -> PublishOutcome {
        let arrived = std::time::Instant::now();
        let event = match self.telemetry_event(client, property_bag, body, retain, is_will) {
            Ok(e) => e,
            Err(why) => return PublishOutcome::Reject(why),
        };
        crate::metrics::telemetry_accepted(event.body.len());
        if let Some(model_id) = &client.model_id {
            self.observe(crate::conformance::Observation::Telemetry {
                identity: client.identity.clone(),
                model_id: model_id.clone(),
                component: event.system_properties.get(DT_SUBJECT).cloned(),
                body: event.body.clone(),
            });
        }
        // Routing picks the endpoints (the built-in stream alone when no route exists) and
        // enqueues the message in each; the PUBACK waits until every copy is on disk.
        match self.route(&client.identity, event).await {
            Ok(waits) if waits.is_empty() => PublishOutcome::Accept,
            Ok(mut waits) if waits.len() == 1 => {
                let durable = waits.remove(0);
                PublishOutcome::AcceptWhen(Box::pin(async move {
                    durable.await.map_err(HubError::from)?;
                    crate::metrics::telemetry_durable(arrived.elapsed());
                    Ok(())
                }))
            }
            Ok(waits) => PublishOutcome::AcceptWhen(Box::pin(async move {
                for durable in waits {
                    durable.await.map_err(HubError::from)?;
                }
                crate::metrics::telemetry_durable(arrived.elapsed());
                Ok(())
            })),
            Err(e) => PublishOutcome::Fail(e),
        }
    }

    /// Delivers a Will as telemetry with `iothub-MessageType=Will` (spec section 2).
    pub(super) async fn publish_will(&self, client: &HubClient, will: LastWill) {
        let bag = match classify_publish(&client.identity, &will.topic) {
            Ok(PublishTopic::Telemetry { property_bag }) => property_bag,
            _ => {
                warn!(identity = %client.identity, topic = %will.topic, "Will topic is not this identity's telemetry topic; discarded");
                return;
            }
        };
        let event = match self.telemetry_event(client, bag, will.payload, will.retain, true) {
            Ok(e) => e,
            Err(why) => {
                warn!(identity = %client.identity, reason = %why, "Will message discarded");
                return;
            }
        };
        // A Will is telemetry, so it is routed like any other message.
        let stored = async {
            let waits = self.route(&client.identity, event).await?;
            let endpoints = waits.len();
            for durable in waits {
                durable.await.map_err(HubError::from)?;
            }
            Ok::<_, HubError>(endpoints)
        };
        match stored.await {
            Ok(endpoints) => {
                info!(identity = %client.identity, endpoints, "Will message delivered as telemetry")
            }
            Err(e) => {
                warn!(identity = %client.identity, error = %e, "Will message could not be stored")
            }
        }
    }
}
