//! Delivery to external routing endpoints (webhook, NATS, storage): a durable stream per
//! endpoint that ingest appends to, and a task per endpoint that sends from it at least once.
//!
//! Ingest never waits on the external system: a message routed to an external endpoint is
//! appended to the endpoint's own one-partition stream inside the hub (a [`StreamEngine`]
//! stream, like a `stream` endpoint's) before the PUBACK, exactly as for stream endpoints. The
//! endpoint's delivery task reads that stream from a durable cursor (the checkpoint of the
//! consumer group [`DELIVERY_GROUP`]), hands a batch to the endpoint's [`EndpointSender`], and
//! saves the cursor only after the peer acknowledged the batch (or the acknowledged part of it).
//! A restart resumes from the cursor, so a message is sent twice only if the hub stopped between
//! the peer's acknowledgement and the cursor write.
//!
//! Failures are retried with capped exponential backoff ([`backoff`]); the endpoint's health is
//! `healthy`, `unhealthy` (failing, retrying) or `dead` (failing for longer than its
//! `deadAfterSeconds`). A message still undelivered when it is older than the endpoint's
//! retention is dead-lettered: appended, with the reason as the system property
//! [`DEAD_LETTER_REASON`], to the stream `NAME.deadletter` (readable like any endpoint stream,
//! `ferrohub monitor --endpoint NAME.deadletter`) and counted, rather than left to retention.
//!
//! A storage endpoint lingers: its batch is sent (written as one file) when the oldest message
//! in it is the endpoint's window old, or when it reaches the endpoint's size, whichever is
//! first; the cursor moves only once the file is durable.
//!
//! The senders themselves (HTTP, NATS, the file writer) are made by the composer
//! (`ferrohub/src/endpoints`), so this crate still holds no sockets: it asks a
//! [`SenderFactory`] for one per endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferrohub_store::telemetry::{EventRecord, TelemetryLog};
use ferrohub_store::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::routing::{Endpoint, EndpointKind};

/// The consumer group whose checkpoint is an external endpoint's delivery cursor.
pub const DELIVERY_GROUP: &str = "$delivery";
/// Suffix of an endpoint's dead-letter stream (`.` cannot occur in an endpoint name, so it
/// never collides with one).
pub const DEAD_LETTER_SUFFIX: &str = ".deadletter";
/// System property of a dead-lettered message: why it was not delivered.
pub const DEAD_LETTER_REASON: &str = "iothub-deadletter-reason";
/// System property of a dead-lettered message: when it was dead-lettered (RFC 3339).
pub const DEAD_LETTER_TIME: &str = "iothub-deadletter-time";
/// First retry delay, doubled per consecutive failure up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest wait between two attempts, so a recovered peer is noticed within this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How long a stopping delivery task may take to finish its current step at shutdown.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Extra time over the sender's own request timeout before the task gives up on a send, in
/// case a sender's timeout does not cover everything it awaits.
const SEND_GRACE: Duration = Duration::from_secs(5);

/// The wait before retry number `failures` (1 for the first retry): 100 ms doubled per
/// consecutive failure, at most [`BACKOFF_CAP`].
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << shift).min(BACKOFF_CAP)
}

/// Why a send failed, and how much of the batch the peer acknowledged before it did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct SendFailure {
    /// Messages at the head of the batch the peer acknowledged (their cursor may move).
    pub delivered: usize,
    pub error: String,
}

impl SendFailure {
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            delivered: 0,
            error: error.into(),
        }
    }
}

/// Sends messages to one external endpoint. `Ok` means the peer acknowledged every message of
/// the batch; each send must give up after the endpoint's timeout.
#[async_trait]
pub trait EndpointSender: Send + Sync + 'static {
    async fn send(&self, batch: &[EventRecord]) -> Result<(), SendFailure>;
}

/// Makes the sender of an endpoint (set by the composer with [`crate::Hub::set_sender_factory`]).
pub trait SenderFactory: Send + Sync + 'static {
    /// The sender for `endpoint`, or why there is none (a bad CA file, say).
    fn sender(&self, endpoint: &Endpoint) -> Result<Arc<dyn EndpointSender>, String>;
}

/// An endpoint's health as the routing resource shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Healthy,
    /// Failing recently; retrying.
    Unhealthy,
    /// Failing for longer than the endpoint's `deadAfterSeconds`; still retrying.
    Dead,
}

/// What `GET /ferrohub/routing` (`health`) and `ferrohub endpoint list` show per external
/// endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHealth {
    pub name: String,
    pub status: HealthStatus,
    /// Messages the peer acknowledged since the hub started.
    pub delivered: u64,
    /// Messages moved to the dead-letter stream since the hub started.
    pub dead_lettered: u64,
    /// Failed attempts since the hub started.
    pub failures: u64,
    /// How long the endpoint has been failing, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_for_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The health state machine of one endpoint. Time comes from tokio's clock, so tests can
/// pause it.
#[derive(Debug)]
pub struct Health {
    name: String,
    dead_after: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// When the current run of failures began; `None` while healthy.
    failing_since: Option<Instant>,
    last_error: Option<String>,
    delivered: u64,
    dead_lettered: u64,
    failures: u64,
}

impl Health {
    pub fn new(name: &str, dead_after: Duration) -> Self {
        Self {
            name: name.into(),
            dead_after,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer acknowledged `n` messages: healthy again.
    pub fn success(&self, n: usize) {
        let mut s = self.lock();
        s.delivered += n as u64;
        s.failing_since = None;
        s.last_error = None;
    }

    /// A send failed; the run of failures starts now unless one is under way.
    pub fn failure(&self, error: &str) {
        let mut s = self.lock();
        s.failures += 1;
        s.failing_since.get_or_insert_with(Instant::now);
        s.last_error = Some(error.into());
    }

    fn dead_lettered(&self, n: usize) {
        self.lock().dead_lettered += n as u64;
    }

    /// Unhealthy turns dead once the failures have lasted `dead_after`, whether or not an
    /// attempt happened since (the status is read, not stored, so it cannot lag).
    pub fn status(&self) -> HealthStatus {
        match self.lock().failing_since {
            None => HealthStatus::Healthy,
            Some(t) if t.elapsed() >= self.dead_after => HealthStatus::Dead,
            Some(_) => HealthStatus::Unhealthy,
        }
    }

    pub fn view(&self) -> EndpointHealth {
        let status = self.status();
        let s = self.lock();
        EndpointHealth {
            name: self.name.clone(),
            status,
            delivered: s.delivered,
            dead_lettered: s.dead_lettered,
            failures: s.failures,
            failing_for_secs: s.failing_since.map(|t| t.elapsed().as_secs()),
            last_error: s.last_error.clone(),
        }
    }
}

/// The options of an external endpoint that the delivery task needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeliveryOptions {
    pub batch: usize,
    pub timeout: Duration,
    pub retention: Duration,
    pub dead_after: Duration,
    /// How long the oldest message waits for company before a batch that is not full is sent
    /// anyway (a storage endpoint's window); zero sends whatever is there at once.
    pub linger: Duration,
    /// A batch is full, and cut there, at this many bytes (at least one message).
    pub max_bytes: usize,
}

/// How often a lingering task looks again whether its batch filled up.
const LINGER_POLL: Duration = Duration::from_secs(1);

/// What a message counts for against a batch's size: its body and properties.
fn record_bytes(e: &EventRecord) -> usize {
    let props: usize = e
        .event
        .properties
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
        .sum();
    let system: usize = e
        .event
        .system_properties
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    e.event.body.len() + props + system
}

/// How many messages at the head of `batch` fit in `max_bytes` (at least one, so a message
/// larger than the limit still leaves, alone).
fn fits(batch: &[EventRecord], max_bytes: usize) -> usize {
    let mut total = 0usize;
    let n = batch
        .iter()
        .take_while(|e| {
            total = total.saturating_add(record_bytes(e));
            total <= max_bytes
        })
        .count();
    n.max(1).min(batch.len())
}

/// A running delivery task.
pub(crate) struct Delivery {
    /// The endpoint as the task was started for; a change restarts the task.
    pub kind: EndpointKind,
    pub health: Arc<Health>,
    pub dead_letters: Arc<dyn TelemetryLog>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Delivery {
    /// Starts a task once `previous` (the task it replaces, if any) has ended, so two tasks
    /// never send from one cursor.
    pub(crate) fn start(
        endpoint: &Endpoint,
        opts: DeliveryOptions,
        log: Arc<dyn TelemetryLog>,
        dead_letters: Arc<dyn TelemetryLog>,
        sender: Result<Arc<dyn EndpointSender>, String>,
        previous: Option<Delivery>,
    ) -> Delivery {
        let health = Arc::new(Health::new(&endpoint.name, opts.dead_after));
        let (stop, stop_rx) = watch::channel(false);
        let previous = previous.and_then(|p| p.signal());
        let task = Task {
            name: endpoint.name.clone(),
            opts,
            log,
            dead_letters: dead_letters.clone(),
            health: health.clone(),
            stop: stop_rx,
        };
        let join = tokio::spawn(async move {
            if let Some(p) = previous {
                let _ = tokio::time::timeout(STOP_WAIT, p).await;
            }
            task.run(sender).await
        });
        Delivery {
            kind: endpoint.kind.clone(),
            health,
            dead_letters,
            stop,
            task: Mutex::new(Some(join)),
        }
    }

    /// Tells the task to stop and returns it, to wait for if the caller must.
    pub(crate) fn signal(&self) -> Option<JoinHandle<()>> {
        let _ = self.stop.send(true);
        self.task.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Stops every task of `deliveries` and waits (bounded) until each has ended.
pub(crate) async fn stop_all(deliveries: Vec<Delivery>) {
    let joins: Vec<_> = deliveries.iter().filter_map(Delivery::signal).collect();
    for j in joins {
        if tokio::time::timeout(STOP_WAIT, j).await.is_err() {
            warn!("a delivery task did not stop within {STOP_WAIT:?}");
        }
    }
}

/// Stops every delivery task at shutdown, waiting (bounded) until each has ended, so a hub
/// started next on the same data directory never shares a cursor with this one.
pub async fn stop_at_shutdown(hub: Arc<crate::Hub>, mut shutdown: watch::Receiver<bool>) {
    crate::until_shutdown(&mut shutdown).await;
    hub.stop_deliveries().await;
}

/// Keeps the deliveries of the endpoints in force, by name.
pub(crate) type Deliveries = Mutex<HashMap<String, Delivery>>;

struct Task {
    name: String,
    opts: DeliveryOptions,
    log: Arc<dyn TelemetryLog>,
    dead_letters: Arc<dyn TelemetryLog>,
    health: Arc<Health>,
    stop: watch::Receiver<bool>,
}

/// What ended a wait of the task.
enum Woken {
    Stop,
    Go,
}

impl Task {
    /// Waits `d`, or less if told to stop.
    async fn pause(&mut self, d: Duration) -> Woken {
        tokio::select! {
            _ = tokio::time::sleep(d) => Woken::Go,
            _ = self.stop.wait_for(|s| *s) => Woken::Stop,
        }
    }

    async fn run(mut self, sender: Result<Arc<dyn EndpointSender>, String>) {
        let sender = match sender {
            Ok(s) => s,
            Err(e) => {
                // Nothing can be sent; the endpoint shows why until it is changed.
                warn!(endpoint = %self.name, error = %e, "endpoint has no sender");
                self.health.failure(&e);
                let _ = self.stop.wait_for(|s| *s).await;
                return;
            }
        };
        let mut commits = self.log.watch_commits();
        let mut cursor = loop {
            match self.cursor().await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(endpoint = %self.name, error = %e, "reading the delivery cursor failed");
                    if let Woken::Stop = self.pause(BACKOFF_CAP).await {
                        return;
                    }
                }
            }
        };
        info!(endpoint = %self.name, cursor, "delivery started");
        let mut failures: u32 = 0;
        while !*self.stop.borrow() {
            commits.borrow_and_update();
            let batch = match self.log.read(0, cursor, self.opts.batch).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(endpoint = %self.name, error = %e, "reading the endpoint's stream failed");
                    failures = failures.saturating_add(1);
                    if let Woken::Stop = self.pause(backoff(failures)).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(head_enqueued_ms) = batch.first().map(|e| e.event.enqueued_ms) else {
                tokio::select! {
                    r = commits.changed() => if r.is_err() { return },
                    _ = self.stop.wait_for(|s| *s) => return,
                }
                continue;
            };
            let mut batch = batch;
            // Messages past the retention window leave for the dead-letter stream instead of
            // being removed unseen by retention.
            let now_ms = Timestamp::now().unix_ms();
            let limit_ms = i64::try_from(self.opts.retention.as_millis()).unwrap_or(i64::MAX);
            let expired = batch
                .iter()
                .take_while(|e| now_ms.saturating_sub(e.event.enqueued_ms) >= limit_ms)
                .count();
            if expired > 0 {
                match self.dead_letter(&batch[..expired]).await {
                    Ok(next) => {
                        cursor = next;
                        continue;
                    }
                    Err(e) => {
                        warn!(endpoint = %self.name, error = %e, "dead-lettering failed");
                        failures = failures.saturating_add(1);
                        if let Woken::Stop = self.pause(backoff(failures)).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            if !self.opts.linger.is_zero() {
                let cut = fits(&batch, self.opts.max_bytes);
                let full = cut < batch.len() || batch.len() >= self.opts.batch;
                let head_age = Duration::from_millis(
                    u64::try_from(now_ms.saturating_sub(head_enqueued_ms)).unwrap_or(0),
                );
                if !full && head_age < self.opts.linger {
                    let wait = (self.opts.linger - head_age).min(LINGER_POLL);
                    if let Woken::Stop = self.pause(wait).await {
                        return;
                    }
                    continue;
                }
                batch.truncate(cut);
            }
            let send_limit = self.opts.timeout + SEND_GRACE;
            let outcome = tokio::select! {
                r = tokio::time::timeout(send_limit, sender.send(&batch)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(SendFailure::new(format!("no answer within {send_limit:?}"))),
                },
                // Stopping mid-send is safe: the cursor has not moved, so it is sent again.
                _ = self.stop.wait_for(|s| *s) => return,
            };
            let (delivered, error) = match outcome {
                Ok(()) => (batch.len(), None),
                Err(f) => (f.delivered.min(batch.len()), Some(f.error)),
            };
            if delivered > 0 {
                let next = batch[delivered - 1].sequence + 1;
                if let Err(e) = self.log.save_checkpoint(DELIVERY_GROUP, 0, next).await {
                    // The peer has them; without the cursor they will be sent again.
                    warn!(endpoint = %self.name, error = %e, "saving the delivery cursor failed");
                }
                cursor = next;
            }
            match error {
                None => {
                    if failures > 0 {
                        info!(endpoint = %self.name, "endpoint delivers again");
                    }
                    failures = 0;
                    self.health.success(delivered);
                }
                Some(e) => {
                    if delivered > 0 {
                        self.health.success(delivered);
                    }
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_power_of_two() {
                        warn!(endpoint = %self.name, error = %e, failures, "delivery failed; retrying");
                    }
                    self.health.failure(&e);
                    // Wake no later than the head message expires, to dead-letter it on time.
                    let head_age = Duration::from_millis(
                        u64::try_from(now_ms.saturating_sub(head_enqueued_ms)).unwrap_or(0),
                    );
                    let until_expiry = self.opts.retention.saturating_sub(head_age);
                    let wait = backoff(failures).min(until_expiry.max(BACKOFF_BASE));
                    if let Woken::Stop = self.pause(wait).await {
                        return;
                    }
                }
            }
        }
    }

    /// The cursor: the group's checkpoint, or the oldest retained message if there is none
    /// (everything in the stream was put there for this endpoint).
    async fn cursor(&self) -> ferrohub_store::Result<u64> {
        match self.log.checkpoints(DELIVERY_GROUP).await?.get(&0) {
            Some(n) => Ok(*n),
            None => {
                self.log
                    .resolve(0, ferrohub_store::telemetry::StartPosition::Start)
                    .await
            }
        }
    }

    /// Appends `expired` to the dead-letter stream with the reason, then moves the cursor past
    /// them; returns the new cursor.
    async fn dead_letter(&self, expired: &[EventRecord]) -> ferrohub_store::Result<u64> {
        let reason = match self.health.view().last_error {
            Some(e) => format!("not delivered within the endpoint's retention; last error: {e}"),
            None => "not delivered within the endpoint's retention".to_string(),
        };
        let at = crate::timefmt::now_iso();
        let now_ms = Timestamp::now().unix_ms();
        let mut waits = Vec::with_capacity(expired.len());
        for e in expired {
            let mut event = e.event.clone();
            // Enqueued in the dead-letter stream now, so its retention counts from here; the
            // hub's original time stays in `iothub-enqueuedtime`.
            event.enqueued_ms = now_ms;
            event
                .system_properties
                .insert(DEAD_LETTER_REASON.into(), reason.clone());
            event
                .system_properties
                .insert(DEAD_LETTER_TIME.into(), at.clone());
            waits.push(self.dead_letters.enqueue(event).await?);
        }
        for w in waits {
            w.await?;
        }
        let next = expired.last().map_or(0, |e| e.sequence + 1);
        self.log.save_checkpoint(DELIVERY_GROUP, 0, next).await?;
        self.health.dead_lettered(expired.len());
        warn!(endpoint = %self.name, count = expired.len(), %reason, "messages dead-lettered");
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(9), Duration::from_millis(25_600));
        assert_eq!(backoff(10), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
        assert_eq!(backoff(0), BACKOFF_BASE);
    }

    #[tokio::test(start_paused = true)]
    async fn health_goes_unhealthy_then_dead_and_back() {
        let h = Health::new("w", Duration::from_secs(60));
        assert_eq!(h.status(), HealthStatus::Healthy);
        h.failure("500");
        assert_eq!(h.status(), HealthStatus::Unhealthy);
        tokio::time::advance(Duration::from_secs(30)).await;
        h.failure("500");
        assert_eq!(
            h.status(),
            HealthStatus::Unhealthy,
            "the run began 30 s ago"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            h.status(),
            HealthStatus::Dead,
            "dead without another attempt"
        );
        let v = h.view();
        assert_eq!((v.failures, v.failing_for_secs), (2, Some(60)));
        assert_eq!(v.last_error.as_deref(), Some("500"));
        h.success(3);
        let v = h.view();
        assert_eq!(v.status, HealthStatus::Healthy);
        assert_eq!(
            (v.delivered, v.failing_for_secs, v.last_error),
            (3, None, None)
        );
        h.failure("timeout");
        assert_eq!(
            h.status(),
            HealthStatus::Unhealthy,
            "a new run starts afresh"
        );
    }

    #[test]
    fn health_serializes_in_lower_case() -> Result<(), serde_json::Error> {
        let v = serde_json::to_value(Health::new("w", Duration::from_secs(1)).view())?;
        assert_eq!(v["status"], "healthy");
        assert_eq!(v["deadLettered"], 0);
        Ok(())
    }
}
