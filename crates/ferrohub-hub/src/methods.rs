//! Direct methods: a service call becomes `$iothub/methods/POST/{name}/?$rid=…` to the device,
//! and the device's `$iothub/methods/res/{status}/?$rid=…` completes the call.
//!
//! Pending calls live behind [`PendingMethodCalls`], in memory in this process
//! ([`LocalPendingCalls`]), keyed by identity and request id: a method call is only ever
//! answered by a live connection, so there is nothing to persist. Late, duplicate or unknown
//! responses find no entry and are dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use ferrohub_iothub::topics::method_request_topic;
use ferrohub_iothub::Identity;
use ferrohub_mqtt::QoS;
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::debug;

use crate::link::OutboundMessage;
use crate::Hub;

/// Request and response payloads up to 128 KB (IoT Hub's limit).
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// What the device answered.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResult {
    pub status: i32,
    pub payload: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("device {0} is not registered")]
    DeviceNotFound(String),
    #[error("module {0} is not registered")]
    ModuleNotFound(String),
    #[error("{0} is not online (not connected, or not subscribed to methods)")]
    NotOnline(Identity),
    #[error("{0} did not answer within {1} s")]
    Timeout(Identity, u64),
    #[error("{0}")]
    Invalid(String),
    #[error("over the hub's rate for method calls")]
    Throttled,
    #[error("store: {0}")]
    Store(#[from] ferrohub_store::StoreError),
}

/// A method invocation as the service API receives it (IoT Hub's `CloudToDeviceMethod`).
#[derive(Debug, Clone)]
pub struct Invocation {
    pub method_name: String,
    pub payload: Value,
    /// How long to wait for the device's answer: 5 to 300 s, 30 when absent.
    pub response_timeout_secs: Option<u64>,
    /// How long to wait for the device to connect and subscribe: 0 to 300 s, 0 when absent.
    pub connect_timeout_secs: Option<u64>,
}

/// The timeouts of an invocation, checked against IoT Hub's ranges.
fn timeouts(inv: &Invocation) -> Result<(Duration, Duration), MethodError> {
    let response = inv.response_timeout_secs.unwrap_or(30);
    if !(5..=300).contains(&response) {
        return Err(MethodError::Invalid(format!(
            "responseTimeoutInSeconds must be between 5 and 300, got {response}"
        )));
    }
    let connect = inv.connect_timeout_secs.unwrap_or(0);
    if connect > 300 {
        return Err(MethodError::Invalid(format!(
            "connectTimeoutInSeconds must be between 0 and 300, got {connect}"
        )));
    }
    Ok((Duration::from_secs(response), Duration::from_secs(connect)))
}

/// Method calls waiting for the device's answer.
///
/// A clustered implementation must guarantee:
/// - the `$rid`s `register` hands out are unique per identity across the cluster, not only
///   per node, and never reused while a call with it may still be answered;
/// - `complete` reaches the waiting caller whichever node received the device's response
///   (the service call and the device connection may be on different nodes), at most once;
/// - after `cancel` (timeout, caller gone) the call can no longer be completed, so a late
///   response is dropped rather than delivered to nobody or to a newer call.
pub trait PendingMethodCalls: Send + Sync + 'static {
    /// Registers a call to `identity`; returns its request id and where the answer arrives.
    fn register(&self, identity: &Identity) -> (String, oneshot::Receiver<MethodResult>);
    /// Hands a device's response to its waiting caller; false when nobody waits for it.
    fn complete(&self, identity: &Identity, rid: &str, result: MethodResult) -> bool;
    /// Forgets a call that ended without an answer.
    fn cancel(&self, identity: &Identity, rid: &str);
}

type Calls = HashMap<(Identity, String), oneshot::Sender<MethodResult>>;

/// The pending calls of this process.
#[derive(Default)]
pub struct LocalPendingCalls {
    calls: Mutex<Calls>,
    next_rid: AtomicU64,
}

impl LocalPendingCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, Calls> {
        // Single inserts and removes: a panicking holder cannot leave the map half-changed.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PendingMethodCalls for LocalPendingCalls {
    fn register(&self, identity: &Identity) -> (String, oneshot::Receiver<MethodResult>) {
        let rid = format!("{:x}", self.next_rid.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = oneshot::channel();
        self.lock().insert((identity.clone(), rid.clone()), tx);
        (rid, rx)
    }

    fn complete(&self, identity: &Identity, rid: &str, result: MethodResult) -> bool {
        let waiter = self.lock().remove(&(identity.clone(), rid.to_string()));
        match waiter {
            Some(tx) => tx.send(result).is_ok(),
            None => false,
        }
    }

    fn cancel(&self, identity: &Identity, rid: &str) {
        self.lock().remove(&(identity.clone(), rid.to_string()));
    }
}

/// Cancels the pending entry however the call ends (answer, timeout, caller gone).
struct PendingGuard<'a> {
    pending: &'a dyn PendingMethodCalls,
    identity: &'a Identity,
    rid: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.cancel(self.identity, &self.rid);
    }
}

impl Hub {
    /// Invokes a method on a connected identity and waits for its answer.
    pub async fn invoke_method(
        &self,
        identity: &Identity,
        inv: Invocation,
    ) -> Result<MethodResult, MethodError> {
        let (response_timeout, connect_timeout) = timeouts(&inv)?;
        if !self.throttles.allow(crate::throttle::Operation::MethodCall) {
            return Err(MethodError::Throttled);
        }
        // The Python service SDK sends a missing payload as "".
        let mut inv = inv;
        if inv.payload.as_str() == Some("") {
            inv.payload = Value::Null;
        }
        if !ferrohub_iothub::registry::valid_method_name(&inv.method_name) {
            return Err(MethodError::Invalid(format!(
                "invalid method name {:?}",
                inv.method_name
            )));
        }
        // Checked once the device answered (or not), so its response is judged with the name.
        let method = inv.method_name.clone();
        let started = std::time::Instant::now();
        let outcome = self
            .send_method(identity, inv, response_timeout, connect_timeout)
            .await;
        crate::metrics::method_call(
            match &outcome {
                // The device picks the status: keep the label's values bounded.
                Ok(r) if (100..600).contains(&r.status) => r.status.to_string(),
                Ok(_) => "other".to_owned(),
                Err(MethodError::Timeout(..)) => "timeout".to_owned(),
                Err(MethodError::NotOnline(_)) => "offline".to_owned(),
                Err(_) => "error".to_owned(),
            },
            started.elapsed(),
        );
        self.observe(crate::conformance::Observation::Command {
            identity: identity.clone(),
            method,
            answer: outcome.as_ref().ok().map(|r| (r.status, r.payload.clone())),
        });
        outcome
    }

    /// Sends a checked invocation to the identity and waits for its answer.
    async fn send_method(
        &self,
        identity: &Identity,
        inv: Invocation,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<MethodResult, MethodError> {
        let body = if inv.payload.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&inv.payload).map_err(|e| MethodError::Invalid(e.to_string()))?
        };
        if body.len() > MAX_PAYLOAD_BYTES {
            return Err(MethodError::Invalid(format!(
                "payload is {} bytes; the limit is {MAX_PAYLOAD_BYTES}",
                body.len()
            )));
        }
        self.require_identity(identity).await?;
        let outbound = self
            .wait_for_methods_subscriber(identity, connect_timeout)
            .await
            .ok_or_else(|| MethodError::NotOnline(identity.clone()))?;
        let (rid, rx) = self.methods.register(identity);
        let _guard = PendingGuard {
            pending: &*self.methods,
            identity,
            rid: rid.clone(),
        };
        let msg = OutboundMessage::new(
            method_request_topic(&inv.method_name, &rid),
            Bytes::from(body),
            QoS::AtMostOnce,
        );
        if outbound.send(msg).await.is_err() {
            return Err(MethodError::NotOnline(identity.clone()));
        }
        debug!(identity = %identity, method = %inv.method_name, rid, "method request sent");
        match tokio::time::timeout(response_timeout, rx).await {
            Ok(Ok(result)) => Ok(result),
            // The sender only goes away with the guard; treat it as no answer.
            Ok(Err(_)) | Err(_) => Err(MethodError::Timeout(
                identity.clone(),
                response_timeout.as_secs(),
            )),
        }
    }

    pub(super) async fn require_identity(&self, identity: &Identity) -> Result<(), MethodError> {
        if self.store.get_device(&identity.device_id).await?.is_none() {
            return Err(MethodError::DeviceNotFound(identity.device_id.clone()));
        }
        if let Some(mid) = &identity.module_id {
            if self
                .store
                .get_module(&identity.device_id, mid)
                .await?
                .is_none()
            {
                return Err(MethodError::ModuleNotFound(mid.clone()));
            }
        }
        Ok(())
    }

    /// The outbound handle of `identity` once it is connected and subscribed to method
    /// requests, waiting up to `timeout` for that to happen.
    async fn wait_for_methods_subscriber(
        &self,
        identity: &Identity,
        timeout: Duration,
    ) -> Option<crate::link::Outbound> {
        let mut changes = self.connections.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(o) = self.methods_outbound(identity) {
                return Some(o);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                return self.methods_outbound(identity);
            }
        }
    }

    fn methods_outbound(&self, identity: &Identity) -> Option<crate::link::Outbound> {
        self.connections
            .get(identity)
            .filter(|l| l.subs.methods && !l.outbound.is_closed())
            .map(|l| l.outbound)
    }

    /// A `$iothub/methods/res/{status}/?$rid=…` from the device.
    pub(super) fn method_response(&self, identity: &Identity, status: i32, rid: &str, body: &[u8]) {
        let payload = if body.is_empty() {
            Value::Null
        } else {
            // A device may answer with something that is not JSON; hand it back as a string
            // rather than losing it.
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        if !self
            .methods
            .complete(identity, rid, MethodResult { status, payload })
        {
            debug!(identity = %identity, rid, "method response with no waiting call dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: i32) -> MethodResult {
        MethodResult {
            status,
            payload: Value::Null,
        }
    }

    #[tokio::test]
    async fn an_answer_reaches_its_caller_once_and_a_cancelled_call_takes_none() {
        let calls = LocalPendingCalls::default();
        let id = Identity::device("d");
        let (rid, rx) = calls.register(&id);
        let (other, _other_rx) = calls.register(&id);
        assert_ne!(rid, other, "request ids are fresh");
        assert!(
            !calls.complete(&Identity::device("e"), &rid, answer(200)),
            "another identity cannot answer it"
        );
        assert!(calls.complete(&id, &rid, answer(200)));
        assert_eq!(rx.await.ok(), Some(answer(200)));
        assert!(
            !calls.complete(&id, &rid, answer(201)),
            "a duplicate is dropped"
        );

        calls.cancel(&id, &other);
        assert!(!calls.complete(&id, &other, answer(200)), "too late");
        assert!(calls.lock().is_empty());
    }
}
