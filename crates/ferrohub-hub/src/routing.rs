//! Message routing: the routing configuration (custom endpoints, routes, enrichments, the
//! fallback route), how it is changed and checked, and where each telemetry message goes.
//!
//! The configuration is one document in the store ([`RoutingStore`]); every change reads it,
//! checks the whole (names, conditions, that each route's endpoints exist, that a removed
//! endpoint is unused) and writes it back at the version it read, so two writers cannot
//! interleave. The hub then compiles it into an [`Active`] table (conditions parsed once,
//! endpoints resolved to their logs) that ingest reads without touching the store.
//!
//! At ingest ([`Hub::route`]): with no route, no enrichment and the fallback on, the table is a
//! pass-through and the message goes to the built-in stream as before routing existed. Otherwise
//! the routing document is built once (the body parsed only if a condition reads `$body`, the
//! twin read only if a condition or enrichment reads `$twin`), every enabled route is evaluated,
//! and the message is appended once to each endpoint it reached (the built-in `events` when a
//! route names it, or when no route matched and the fallback is on). The PUBACK waits for every
//! one of those appends to be durable. Enrichments are stamped on the copy for their endpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ferrohub_iothub::endpoints;
use ferrohub_iothub::routing::{BodyStatus, RouteCondition, RoutingDocument};
use ferrohub_iothub::routing_config::{
    check_enrichment_key, check_name, hub_name_of, EnrichmentValue, BUILTIN_ENDPOINT,
};
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::telemetry::{Durable, NewEvent, Retention, TelemetryLog};
use ferrohub_store::{MemoryStreams, StoreError, StreamEngine};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use crate::delivery::{
    Deliveries, Delivery, DeliveryOptions, EndpointHealth, SenderFactory, DEAD_LETTER_SUFFIX,
};
use crate::error::HubError;
use crate::storage_endpoint::{check_file_name_format, Encoding, DEFAULT_FILE_NAME_FORMAT};
use crate::twins::StoredDoc;
use crate::Hub;

/// Partitions of a custom stream when its creator names none (as the built-in default).
pub const DEFAULT_STREAM_PARTITIONS: u32 = 4;
/// Retention of a custom stream when its creator names none: one day, IoT Hub's default for
/// its built-in endpoint.
pub const DEFAULT_STREAM_RETENTION_SECS: u64 = 86_400;
/// IoT Hub's limits: 100 routes, 10 enrichments, 10 custom endpoints of a type.
pub const MAX_ROUTES: usize = 100;
pub const MAX_ENRICHMENTS: usize = 10;
pub const MAX_ENDPOINTS: usize = 10;
/// How often, at most, undefined conditions are logged (a summary, not one line a message).
const UNDEFINED_LOG_EVERY: Duration = Duration::from_secs(10);

/// What an endpoint is. Tagged by `type` in JSON, so webhook, storage and NATS endpoints are
/// further variants with their own fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum EndpointKind {
    /// An event stream inside the hub, read like the built-in one.
    Stream {
        /// Fixed when the stream is created.
        #[serde(default = "default_partitions")]
        partitions: u32,
        /// Events older than this are removed.
        #[serde(default = "default_retention", rename = "retentionSeconds")]
        retention_secs: u64,
    },
    /// An HTTPS POST per message (or a JSON array of `batchSize` messages) to `url`, from the
    /// endpoint's own stream inside the hub (`delivery.rs`); 2xx acknowledges.
    Webhook {
        /// `https://...`; `http://` only to a loopback host.
        url: String,
        #[serde(default = "one", rename = "batchSize")]
        batch: u32,
        #[serde(default = "default_timeout", rename = "timeoutSeconds")]
        timeout_secs: u64,
        /// Sent with every request (an `Authorization`, say).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        /// PEM certificates of the CAs to trust for `url` instead of the system's.
        #[serde(
            default,
            rename = "caCertificates",
            skip_serializing_if = "Option::is_none"
        )]
        ca_pem: Option<String>,
        /// Undelivered messages older than this are dead-lettered.
        #[serde(default = "default_retention", rename = "retentionSeconds")]
        retention_secs: u64,
        /// Failing for this long turns the endpoint's health `dead`.
        #[serde(default = "default_dead_after", rename = "deadAfterSeconds")]
        dead_after_secs: u64,
    },
    /// A JetStream publish per message to `subject` on an external NATS server, each awaited
    /// for its PubAck before the endpoint's cursor moves (`delivery.rs`).
    Nats {
        /// `nats://host:port` (or `tls://`).
        url: String,
        subject: String,
        /// The JetStream stream that must capture `subject` (sent as `Nats-Expected-Stream`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<String>,
        /// Publishes in flight at once, their acks awaited together.
        #[serde(default = "default_nats_batch", rename = "batchSize")]
        batch: u32,
        #[serde(default = "default_timeout", rename = "timeoutSeconds")]
        timeout_secs: u64,
        #[serde(default = "default_retention", rename = "retentionSeconds")]
        retention_secs: u64,
        #[serde(default = "default_dead_after", rename = "deadAfterSeconds")]
        dead_after_secs: u64,
    },
    /// Batches written as files (`storage_endpoint.rs`) under the hub's storage root, in the
    /// directory `containerName` (IoT Hub's container), cut when the oldest message of a batch
    /// is `batchFrequencyInSeconds` old or the batch reaches `maxChunkSizeInBytes`.
    Storage {
        #[serde(rename = "containerName")]
        container: String,
        #[serde(default)]
        encoding: Encoding,
        #[serde(default = "default_file_name_format", rename = "fileNameFormat")]
        file_name_format: String,
        #[serde(
            default = "default_batch_frequency",
            rename = "batchFrequencyInSeconds"
        )]
        batch_frequency_secs: u64,
        #[serde(default = "default_max_chunk", rename = "maxChunkSizeInBytes")]
        max_chunk_bytes: u64,
        #[serde(default = "default_retention", rename = "retentionSeconds")]
        retention_secs: u64,
        #[serde(default = "default_dead_after", rename = "deadAfterSeconds")]
        dead_after_secs: u64,
    },
}

/// What every endpoint delivered from the hub (webhook, NATS, storage) has, whatever its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalFields {
    /// Messages read (and handed to the sender) at once.
    pub batch: u32,
    pub timeout_secs: u64,
    pub retention_secs: u64,
    pub dead_after_secs: u64,
}

/// Request timeout of an external endpoint when its creator names none.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// How long an external endpoint may fail before it is `dead`, when its creator names none.
pub const DEFAULT_DEAD_AFTER_SECS: u64 = 600;
/// Publishes a NATS endpoint has in flight when its creator names no batch size. Each batch
/// ends with a durable cursor write (an fsync), so the batch size bounds the delivery rate:
/// at 64 it was about 10,000 msgs/s in `scripts/bench-endpoints.sh`, below ingest.
pub const DEFAULT_NATS_BATCH: u32 = 256;
/// Largest batch of an external endpoint.
pub const MAX_BATCH: u32 = 500;
/// IoT Hub's default window of a storage endpoint (its range is 60 to 720 s; Ferrohub also
/// takes shorter windows, down to one second, for tests and local development).
pub const DEFAULT_BATCH_FREQUENCY_SECS: u64 = 300;
pub const MAX_BATCH_FREQUENCY_SECS: u64 = 720;
/// IoT Hub's default and largest chunk of a storage endpoint: 300 MB and 500 MB (IoT Hub's
/// smallest is 10 MB; Ferrohub takes down to 1 KiB, for tests).
pub const DEFAULT_MAX_CHUNK_BYTES: u64 = 314_572_800;
pub const MAX_CHUNK_BYTES: u64 = 524_288_000;
pub const MIN_CHUNK_BYTES: u64 = 1024;
/// Messages per storage file at most, so a window of small messages never holds an unbounded
/// batch in memory; a full window is cut into several files.
pub const MAX_STORAGE_RECORDS: u32 = 100_000;
/// How long writing one storage file may take before the attempt counts as failed.
pub const STORAGE_WRITE_TIMEOUT_SECS: u64 = 120;

fn one() -> u32 {
    1
}
fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}
fn default_dead_after() -> u64 {
    DEFAULT_DEAD_AFTER_SECS
}
fn default_nats_batch() -> u32 {
    DEFAULT_NATS_BATCH
}
fn default_file_name_format() -> String {
    DEFAULT_FILE_NAME_FORMAT.into()
}
fn default_batch_frequency() -> u64 {
    DEFAULT_BATCH_FREQUENCY_SECS
}
fn default_max_chunk() -> u64 {
    DEFAULT_MAX_CHUNK_BYTES
}

impl EndpointKind {
    /// The `type` in JSON.
    pub fn type_name(&self) -> &'static str {
        match self {
            EndpointKind::Stream { .. } => "stream",
            EndpointKind::Webhook { .. } => "webhook",
            EndpointKind::Nats { .. } => "nats",
            EndpointKind::Storage { .. } => "storage",
        }
    }

    /// The fields every endpoint delivered from the hub has; `None` for a stream read inside
    /// the hub.
    pub fn external_fields(&self) -> Option<ExternalFields> {
        match self {
            EndpointKind::Stream { .. } => None,
            EndpointKind::Webhook {
                batch,
                timeout_secs,
                retention_secs,
                dead_after_secs,
                ..
            }
            | EndpointKind::Nats {
                batch,
                timeout_secs,
                retention_secs,
                dead_after_secs,
                ..
            } => Some(ExternalFields {
                batch: *batch,
                timeout_secs: *timeout_secs,
                retention_secs: *retention_secs,
                dead_after_secs: *dead_after_secs,
            }),
            EndpointKind::Storage {
                retention_secs,
                dead_after_secs,
                ..
            } => Some(ExternalFields {
                batch: MAX_STORAGE_RECORDS,
                timeout_secs: STORAGE_WRITE_TIMEOUT_SECS,
                retention_secs: *retention_secs,
                dead_after_secs: *dead_after_secs,
            }),
        }
    }

    /// How an external endpoint is delivered to; `None` for a stream read inside the hub.
    pub(crate) fn delivery(&self) -> Option<DeliveryOptions> {
        let f = self.external_fields()?;
        let (linger, max_bytes, max_batch) = match self {
            EndpointKind::Storage {
                batch_frequency_secs,
                max_chunk_bytes,
                ..
            } => (
                Duration::from_secs(*batch_frequency_secs),
                usize::try_from(*max_chunk_bytes).unwrap_or(usize::MAX),
                MAX_STORAGE_RECORDS,
            ),
            _ => (Duration::ZERO, usize::MAX, MAX_BATCH),
        };
        Some(DeliveryOptions {
            batch: usize::try_from(f.batch.clamp(1, max_batch)).unwrap_or(1),
            timeout: Duration::from_secs(f.timeout_secs),
            retention: Duration::from_secs(f.retention_secs),
            dead_after: Duration::from_secs(f.dead_after_secs),
            linger,
            max_bytes,
        })
    }

    /// The age limit of the endpoint's stream for the retention loop. An external endpoint's
    /// stream keeps its messages past the endpoint's retention (twice it, plus the request
    /// timeout and a minute), so its delivery task, which wakes when the oldest undelivered
    /// message expires, dead-letters them before retention could remove them.
    fn stream_retention_secs(&self) -> u64 {
        match self {
            EndpointKind::Stream { retention_secs, .. } => *retention_secs,
            external => {
                let Some(f) = external.external_fields() else {
                    return DEFAULT_STREAM_RETENTION_SECS;
                };
                // A storage endpoint's messages also wait out their window before they are sent.
                let linger = match external {
                    EndpointKind::Storage {
                        batch_frequency_secs,
                        ..
                    } => *batch_frequency_secs,
                    _ => 0,
                };
                f.retention_secs
                    .saturating_mul(2)
                    .saturating_add(f.timeout_secs)
                    .saturating_add(linger)
                    .saturating_add(60)
            }
        }
    }
}

fn default_partitions() -> u32 {
    DEFAULT_STREAM_PARTITIONS
}
fn default_retention() -> u64 {
    DEFAULT_STREAM_RETENTION_SECS
}
fn yes() -> bool {
    true
}

/// A custom endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub name: String,
    #[serde(flatten)]
    pub kind: EndpointKind,
}

/// What the routing resource shows instead of a webhook's static header values, which hold
/// secrets (an `Authorization`, say) that a registry-read policy must not learn. Putting an
/// endpoint back with this value keeps the stored one, so a read-modify-write loses nothing.
pub const REDACTED: &str = "<redacted>";

impl Endpoint {
    /// The endpoint as the API shows it: webhook header values [`REDACTED`].
    pub fn redacted(&self) -> Endpoint {
        let mut e = self.clone();
        if let EndpointKind::Webhook { headers, .. } = &mut e.kind {
            for v in headers.values_mut() {
                *v = REDACTED.into();
            }
        }
        e
    }
}

/// Where a route's messages come from, by IoT Hub's names: device telemetry, or one of the
/// events the hub emits itself (`sources.rs`), which have no fallback route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteSource {
    DeviceMessages,
    TwinChangeEvents,
    DeviceLifecycleEvents,
    DeviceConnectionStateEvents,
    DigitalTwinChangeEvents,
    DeviceJobLifecycleEvents,
}

impl RouteSource {
    /// This source's bit in [`Active`]'s set of routed sources.
    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn parse(s: &str) -> Result<Self, HubError> {
        serde_json::from_value(Value::String(s.to_string())).map_err(|_| {
            HubError::argument(format!(
                "source {s:?}: one of DeviceMessages, TwinChangeEvents, DeviceLifecycleEvents, \
                 DeviceConnectionStateEvents, DigitalTwinChangeEvents, DeviceJobLifecycleEvents"
            ))
        })
    }
}

/// A route, in the shape of IoT Hub's resource (`endpointNames`, `isEnabled`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub name: String,
    pub source: RouteSource,
    /// The routing query; `true` when omitted, as in IoT Hub.
    #[serde(default = "true_condition")]
    pub condition: String,
    pub endpoint_names: Vec<String>,
    #[serde(default = "yes")]
    pub is_enabled: bool,
}

fn true_condition() -> String {
    "true".into()
}

/// An enrichment, in the shape of IoT Hub's resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrichment {
    pub key: String,
    pub value: String,
    pub endpoint_names: Vec<String>,
}

/// The whole routing configuration, as stored and as `GET /ferrohub/routing` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingConfig {
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub enrichments: Vec<Enrichment>,
    /// Whether telemetry that matched no route goes to the built-in endpoint (IoT Hub's
    /// fallback route, on by default).
    #[serde(default = "yes")]
    pub fallback_enabled: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            routes: Vec::new(),
            enrichments: Vec::new(),
            fallback_enabled: true,
        }
    }
}

fn not_found(what: &str, name: &str) -> HubError {
    HubError::new(
        ErrorCode::InvalidOperation,
        format!("{what} {name} does not exist"),
    )
    .with_status(404)
}

fn conflict(message: String) -> HubError {
    HubError::new(ErrorCode::InvalidOperation, message).with_status(409)
}

impl RoutingConfig {
    /// The configuration as the API shows it (see [`Endpoint::redacted`]).
    pub fn redacted(&self) -> RoutingConfig {
        RoutingConfig {
            endpoints: self.endpoints.iter().map(Endpoint::redacted).collect(),
            ..self.clone()
        }
    }

    fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// Every rule a stored configuration keeps; a change that breaks one is refused whole.
    fn check(&self) -> Result<(), HubError> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(HubError::argument(format!(
                "at most {MAX_ENDPOINTS} custom endpoints"
            )));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(HubError::argument(format!("at most {MAX_ROUTES} routes")));
        }
        if self.enrichments.len() > MAX_ENRICHMENTS {
            return Err(HubError::argument(format!(
                "at most {MAX_ENRICHMENTS} enrichments"
            )));
        }
        for e in &self.endpoints {
            check_name("endpoint", &e.name).map_err(HubError::argument)?;
            if e.name.eq_ignore_ascii_case(BUILTIN_ENDPOINT) {
                return Err(HubError::argument(format!(
                    "endpoint name {:?} is reserved for the built-in endpoint",
                    e.name
                )));
            }
            match &e.kind {
                &EndpointKind::Stream {
                    partitions,
                    retention_secs,
                } => {
                    if !(1..=32).contains(&partitions) {
                        return Err(HubError::argument(format!(
                            "endpoint {}: partitions must be 1 to 32, not {partitions}",
                            e.name
                        )));
                    }
                    if retention_secs == 0 {
                        return Err(HubError::argument(format!(
                            "endpoint {}: retention must be at least one second",
                            e.name
                        )));
                    }
                }
                EndpointKind::Webhook {
                    url,
                    headers,
                    ca_pem,
                    ..
                } => {
                    let arg = |m: String| HubError::argument(format!("endpoint {}: {m}", e.name));
                    endpoints::check_webhook_url(url).map_err(arg)?;
                    for (k, v) in headers {
                        endpoints::check_static_header(k, v).map_err(arg)?;
                    }
                    if let Some(pem) = ca_pem {
                        let n = rustls_pemfile::certs(&mut pem.as_bytes())
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|err| arg(format!("caCertificates: {err}")))?
                            .len();
                        if n == 0 {
                            return Err(arg("caCertificates holds no PEM certificate".into()));
                        }
                    }
                }
                EndpointKind::Nats {
                    url,
                    subject,
                    stream,
                    ..
                } => {
                    let arg = |m: String| HubError::argument(format!("endpoint {}: {m}", e.name));
                    endpoints::check_nats_url(url).map_err(arg)?;
                    endpoints::check_nats_subject(subject).map_err(arg)?;
                    if let Some(s) = stream {
                        endpoints::check_nats_stream(s).map_err(arg)?;
                    }
                }
                EndpointKind::Storage {
                    container,
                    file_name_format,
                    batch_frequency_secs,
                    max_chunk_bytes,
                    retention_secs,
                    ..
                } => {
                    let arg = |m: String| HubError::argument(format!("endpoint {}: {m}", e.name));
                    endpoints::check_container_name(container).map_err(arg)?;
                    // Otherwise every message would be dead-lettered while it waits for its file.
                    if retention_secs <= batch_frequency_secs {
                        return Err(arg(format!(
                            "retentionSeconds ({retention_secs}) must be longer than batchFrequencyInSeconds ({batch_frequency_secs})"
                        )));
                    }
                    check_file_name_format(file_name_format).map_err(|err| arg(err.to_string()))?;
                    if !(1..=MAX_BATCH_FREQUENCY_SECS).contains(batch_frequency_secs) {
                        return Err(arg(format!(
                            "batchFrequencyInSeconds must be 1 to {MAX_BATCH_FREQUENCY_SECS}, not {batch_frequency_secs}"
                        )));
                    }
                    if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(max_chunk_bytes) {
                        return Err(arg(format!(
                            "maxChunkSizeInBytes must be {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}, not {max_chunk_bytes}"
                        )));
                    }
                }
            }
            if let Some(f) = e.kind.external_fields() {
                let bad = |m: String| Err(HubError::argument(format!("endpoint {}: {m}", e.name)));
                // A storage endpoint's batch and timeout are the hub's, not its creator's.
                if !matches!(e.kind, EndpointKind::Storage { .. }) {
                    if !(1..=MAX_BATCH).contains(&f.batch) {
                        return bad(format!(
                            "batchSize must be 1 to {MAX_BATCH}, not {}",
                            f.batch
                        ));
                    }
                    if !(1..=300).contains(&f.timeout_secs) {
                        return bad(format!(
                            "timeoutSeconds must be 1 to 300, not {}",
                            f.timeout_secs
                        ));
                    }
                }
                if f.retention_secs == 0 || f.dead_after_secs == 0 {
                    return bad("retentionSeconds and deadAfterSeconds must be at least 1".into());
                }
            }
        }
        let known = |n: &str| n == BUILTIN_ENDPOINT || self.endpoint(n).is_some();
        for r in &self.routes {
            check_name("route", &r.name).map_err(HubError::argument)?;
            parse_condition(&r.condition)?;
            if r.endpoint_names.is_empty() {
                return Err(HubError::argument(format!(
                    "route {} names no endpoint",
                    r.name
                )));
            }
            if let Some(n) = r.endpoint_names.iter().find(|n| !known(n)) {
                return Err(HubError::argument(format!(
                    "route {}: endpoint {n} does not exist",
                    r.name
                )));
            }
        }
        for e in &self.enrichments {
            check_enrichment_key(&e.key).map_err(HubError::argument)?;
            EnrichmentValue::parse(&e.value).map_err(HubError::argument)?;
            if e.endpoint_names.is_empty() {
                return Err(HubError::argument(format!(
                    "enrichment {} names no endpoint",
                    e.key
                )));
            }
            if let Some(n) = e.endpoint_names.iter().find(|n| !known(n)) {
                return Err(HubError::argument(format!(
                    "enrichment {}: endpoint {n} does not exist",
                    e.key
                )));
            }
        }
        Ok(())
    }
}

/// Parses a condition, refusing it with its position.
pub fn parse_condition(text: &str) -> Result<RouteCondition, HubError> {
    RouteCondition::parse(text).map_err(|e| {
        HubError::argument(format!(
            "condition {text:?} is invalid at line {}, column {}: {}",
            e.line, e.column, e.message
        ))
    })
}

/// An external endpoint to deliver to: its options, its stream and its dead-letter stream.
type External<'a> = (
    &'a Endpoint,
    DeliveryOptions,
    Arc<dyn TelemetryLog>,
    Arc<dyn TelemetryLog>,
);

/// One endpoint as ingest sees it: its log and the enrichments stamped on its copies.
struct Target {
    name: String,
    log: Arc<dyn TelemetryLog>,
    enrichments: Vec<(String, EnrichmentValue)>,
    /// Age limit for the retention loop; `None` for the built-in stream, which has its own.
    retention_secs: Option<u64>,
}

struct ActiveRoute {
    name: String,
    condition: RouteCondition,
    /// Indexes into `Active::targets`.
    targets: Vec<usize>,
}

/// The compiled configuration ingest reads: swapped whole on every change.
pub(crate) struct Active {
    /// No routes, no enrichments, fallback on: every message goes to the built-in stream as it
    /// did before routing existed, at no cost.
    passthrough: bool,
    routes: Vec<ActiveRoute>,
    /// `targets[0]` is the built-in stream.
    targets: Vec<Target>,
    fallback: bool,
    reads_body: bool,
    reads_twin: bool,
    /// The enabled routes of the non-telemetry sources, kept apart so telemetry never
    /// evaluates them.
    event_routes: Vec<(RouteSource, ActiveRoute)>,
    /// One bit per source ([`RouteSource::bit`]) that some enabled route has: emitters test it
    /// before building an event, so a source nobody routes costs one load.
    event_sources: u8,
    events_read_body: bool,
    events_read_twin: bool,
}

/// The hub's routing state.
pub(crate) struct Routing {
    /// Where custom streams live (the store's engine); memory until the server sets one.
    engine: OnceLock<Arc<dyn StreamEngine>>,
    /// What `$iothubname` stamps; the first label of the first host name until set.
    hub_name: OnceLock<String>,
    active: RwLock<Arc<Active>>,
    /// Serializes this process's changes, so the versioned write only ever fails because of
    /// another node, and streams are opened and removed in the order their changes commit.
    writer: tokio::sync::Mutex<()>,
    /// Conditions that evaluated to undefined (a missing property, a body that is not JSON).
    undefined: AtomicU64,
    /// Undefined conditions counted since the last log line, and when that line was written.
    undefined_log: Mutex<(u64, Option<Instant>)>,
    /// Messages that reached no endpoint (no route matched, fallback off).
    dropped: AtomicU64,
    /// Makes the senders of external endpoints (the composer's); none until set.
    senders: OnceLock<Arc<dyn SenderFactory>>,
    /// The delivery task of each external endpoint in force (`delivery.rs`).
    deliveries: Deliveries,
}

impl Routing {
    pub(crate) fn new(builtin: Arc<dyn TelemetryLog>) -> Self {
        Self {
            engine: OnceLock::new(),
            hub_name: OnceLock::new(),
            active: RwLock::new(Arc::new(Active {
                passthrough: true,
                routes: Vec::new(),
                targets: vec![Target {
                    name: BUILTIN_ENDPOINT.into(),
                    log: builtin,
                    enrichments: Vec::new(),
                    retention_secs: None,
                }],
                fallback: true,
                reads_body: false,
                reads_twin: false,
                event_routes: Vec::new(),
                event_sources: 0,
                events_read_body: false,
                events_read_twin: false,
            })),
            writer: tokio::sync::Mutex::new(()),
            undefined: AtomicU64::new(0),
            undefined_log: Mutex::new((0, None)),
            dropped: AtomicU64::new(0),
            senders: OnceLock::new(),
            deliveries: Deliveries::default(),
        }
    }

    fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn engine(&self) -> Arc<dyn StreamEngine> {
        self.engine
            .get_or_init(|| Arc::new(MemoryStreams::default()))
            .clone()
    }

    /// Counts undefined conditions and logs a summary at most every [`UNDEFINED_LOG_EVERY`].
    fn count_undefined(&self, route: &str, identity: &str, body: &BodyStatus) {
        self.undefined.fetch_add(1, Ordering::Relaxed);
        let mut log = self.undefined_log.lock().unwrap_or_else(|e| e.into_inner());
        log.0 += 1;
        let due = log.1.is_none_or(|t| t.elapsed() >= UNDEFINED_LOG_EVERY);
        if due {
            warn!(
                route,
                identity,
                body = ?body,
                undefined_since_last_line = log.0,
                "routing condition undefined (counted as false); one line per {}s at most",
                UNDEFINED_LOG_EVERY.as_secs()
            );
            *log = (0, Some(Instant::now()));
        }
    }
}

/// What `GET /ferrohub/routing` reports besides the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingCounters {
    pub undefined_conditions: u64,
    pub unrouted_messages: u64,
}

/// The answer of a route test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTestResult {
    /// `true`, `false` or `undefined` (which routes nothing).
    pub result: String,
    /// Why, when the result is not plainly true or false because of the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

/// A message to test a route on (the CLI's `route test`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTestMessage {
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub app_properties: BTreeMap<String, String>,
    #[serde(default)]
    pub system_properties: BTreeMap<String, String>,
    /// The sender's twin, in the `GET /twins` shape.
    #[serde(default)]
    pub twin: Option<Value>,
}

/// `TwinChangeEvents` -> `twinChangeEvents`: a source's `iothub-message-source` value.
fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// Tests a condition on a message: whether it matches and, if not plainly, why.
pub fn test_condition(condition: &RouteCondition, msg: &RouteTestMessage) -> RouteTestResult {
    let props: Vec<(String, Option<String>)> = msg
        .app_properties
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    let doc = RoutingDocument::from_parts(
        &msg.system_properties,
        &props,
        msg.body.as_bytes(),
        condition.reads_body(),
        msg.twin.clone(),
    );
    let result = condition.evaluate(&doc);
    let mut why = Vec::new();
    match doc.body_status() {
        BodyStatus::NotDeclaredJson => why.push(
            "body is not JSON: content-type is not application/json or content-encoding is not \
             utf-8, utf-16 or utf-32, so $body is undefined"
                .to_string(),
        ),
        BodyStatus::Invalid(e) => why.push(format!("body cannot be read: {e}")),
        BodyStatus::Json | BodyStatus::NotRead => {}
    }
    if condition.reads_twin() && msg.twin.is_none() {
        why.push("no twin given, so $twin is undefined".into());
    }
    if result.is_none() && why.is_empty() {
        why.push(
            "a property the condition reads is missing, or values of different types are compared"
                .into(),
        );
    }
    RouteTestResult {
        result: match result {
            Some(true) => "true",
            Some(false) => "false",
            None => "undefined",
        }
        .into(),
        details: (!why.is_empty() && result != Some(true)).then(|| why.join("; ")),
    }
}

impl Hub {
    /// Sets where custom endpoint streams are kept (the server's storage engine); call once,
    /// before [`Hub::load_routing`]. Without it they are kept in memory.
    pub fn set_stream_engine(&self, engine: Arc<dyn StreamEngine>) {
        let _ = self.routing.engine.set(engine);
    }

    /// Sets what sends to external endpoints (webhook, NATS); call once, before
    /// [`Hub::load_routing`]. Without it their messages wait in their streams.
    pub fn set_sender_factory(&self, factory: Arc<dyn SenderFactory>) {
        let _ = self.routing.senders.set(factory);
    }

    /// The delivery health of every external endpoint in force, by name.
    pub fn endpoint_health(&self) -> Vec<EndpointHealth> {
        let d = self
            .routing
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = d.values().map(|d| d.health.view()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Stops every delivery task and waits (bounded) until they have ended (shutdown).
    pub async fn stop_deliveries(&self) {
        let all: Vec<Delivery> = self
            .routing
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, d)| d)
            .collect();
        crate::delivery::stop_all(all).await;
    }

    /// Sets the name `$iothubname` enrichments stamp (the Event Hubs entity name); call once.
    pub fn set_hub_name(&self, name: String) {
        let _ = self.routing.hub_name.set(name);
    }

    /// Reads the stored routing configuration and makes it the one in force (at start-up).
    pub async fn load_routing(&self) -> Result<(), HubError> {
        let _w = self.routing.writer.lock().await;
        let (config, _) = self.stored_routing().await?;
        let logs = self.open_streams(&config)?;
        self.activate(&config, logs)
    }

    /// The configuration in force and its counters.
    pub async fn routing_config(&self) -> Result<(RoutingConfig, RoutingCounters), HubError> {
        let (config, _) = self.stored_routing().await?;
        Ok((
            config,
            RoutingCounters {
                undefined_conditions: self.routing.undefined.load(Ordering::Relaxed),
                unrouted_messages: self.routing.dropped.load(Ordering::Relaxed),
            },
        ))
    }

    async fn stored_routing(&self) -> Result<(RoutingConfig, u64), HubError> {
        match self.store.load_routing().await? {
            None => Ok((RoutingConfig::default(), 0)),
            Some(s) => {
                let config = serde_json::from_str(&s.doc)
                    .map_err(|e| HubError::internal("reading the routing configuration", e))?;
                Ok((config, s.version))
            }
        }
    }

    /// Applies `change` to the stored configuration, checks the result, writes it at the
    /// version read and puts it in force. Runs to its end even if the caller goes.
    async fn change_routing<T, F>(&self, what: String, change: F) -> Result<T, HubError>
    where
        T: Send + 'static,
        F: FnOnce(&mut RoutingConfig) -> Result<T, HubError> + Send + 'static,
    {
        self.to_the_end(move |hub| async move {
            let _w = hub.routing.writer.lock().await;
            let (mut config, version) = hub.stored_routing().await?;
            let before = config.clone();
            let out = change(&mut config)?;
            config.check()?;
            // Streams of new endpoints are opened before the write, so a configuration that
            // names one is never in force without it.
            let logs = hub.open_streams(&config)?;
            let doc = serde_json::to_string(&config)
                .map_err(|e| HubError::internal("writing the routing configuration", e))?;
            match hub.store.save_routing(doc, version).await {
                Ok(_) => {}
                Err(StoreError::VersionMismatch) => {
                    return Err(conflict(
                        "the routing configuration changed meanwhile; try again".into(),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
            hub.activate(&config, logs)?;
            for gone in before
                .endpoints
                .iter()
                .filter(|e| config.endpoint(&e.name).is_none())
            {
                if let Err(e) = hub.routing.engine().remove_stream(&gone.name) {
                    warn!(endpoint = %gone.name, error = %e, "removing an endpoint's stream failed");
                }
                if gone.kind.delivery().is_some() {
                    let dl = format!("{}{DEAD_LETTER_SUFFIX}", gone.name);
                    if let Err(e) = hub.routing.engine().remove_stream(&dl) {
                        warn!(endpoint = %gone.name, error = %e, "removing a dead-letter stream failed");
                    }
                }
            }
            info!(change = %what, "routing configuration changed");
            Ok(out)
        })
        .await
    }

    /// The log of every endpoint of `config`: those in force as they are, new ones opened.
    fn open_streams(
        &self,
        config: &RoutingConfig,
    ) -> Result<HashMap<String, Arc<dyn TelemetryLog>>, HubError> {
        let current = self.routing.active();
        let mut logs = HashMap::new();
        for e in &config.endpoints {
            // An external endpoint's stream has one partition: its delivery keeps one order.
            let partitions = match e.kind {
                EndpointKind::Stream { partitions, .. } => partitions,
                _ => 1,
            };
            let log = match current.targets.iter().find(|t| t.name == e.name) {
                Some(t) => t.log.clone(),
                None => self
                    .routing
                    .engine()
                    .open_stream(&e.name, partitions)
                    .map_err(|err| HubError::internal("opening an endpoint's stream", err))?,
            };
            logs.insert(e.name.clone(), log);
            if e.kind.delivery().is_some() {
                let dl = format!("{}{DEAD_LETTER_SUFFIX}", e.name);
                let running = self
                    .routing
                    .deliveries
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&e.name)
                    .map(|d| d.dead_letters.clone());
                let log =
                    match running {
                        Some(l) => l,
                        None => self.routing.engine().open_stream(&dl, 1).map_err(|err| {
                            HubError::internal("opening a dead-letter stream", err)
                        })?,
                    };
                logs.insert(dl, log);
            }
        }
        Ok(logs)
    }

    /// Compiles `config` and puts it in force, with the endpoints' logs [`Hub::open_streams`]
    /// gave (opened once: a second writer on a stream's file would break its group commit).
    fn activate(
        &self,
        config: &RoutingConfig,
        mut logs: HashMap<String, Arc<dyn TelemetryLog>>,
    ) -> Result<(), HubError> {
        let mut targets = vec![Target {
            name: BUILTIN_ENDPOINT.into(),
            log: self.telemetry.clone(),
            enrichments: Vec::new(),
            retention_secs: None,
        }];
        let mut external = Vec::new();
        for e in &config.endpoints {
            let log = logs.remove(&e.name).ok_or_else(|| {
                HubError::internal("routing", format!("no stream for {}", e.name))
            })?;
            if let Some(opts) = e.kind.delivery() {
                let dl = format!("{}{DEAD_LETTER_SUFFIX}", e.name);
                let dead_letters = logs.remove(&dl).ok_or_else(|| {
                    HubError::internal("routing", format!("no dead-letter stream for {}", e.name))
                })?;
                external.push((e, opts, log.clone(), dead_letters));
            }
            targets.push(Target {
                name: e.name.clone(),
                log,
                enrichments: Vec::new(),
                retention_secs: Some(e.kind.stream_retention_secs()),
            });
        }
        let index = |n: &str| targets.iter().position(|t| t.name == n);
        let mut routes = Vec::new();
        let mut event_routes = Vec::new();
        for r in config.routes.iter().filter(|r| r.is_enabled) {
            let mut idx: Vec<usize> = r.endpoint_names.iter().filter_map(|n| index(n)).collect();
            idx.sort_unstable();
            idx.dedup();
            let route = ActiveRoute {
                name: r.name.clone(),
                condition: parse_condition(&r.condition)?,
                targets: idx,
            };
            match r.source {
                RouteSource::DeviceMessages => routes.push(route),
                other => event_routes.push((other, route)),
            }
        }
        let mut enrich = Vec::new();
        for e in &config.enrichments {
            let value = EnrichmentValue::parse(&e.value).map_err(HubError::argument)?;
            for n in &e.endpoint_names {
                if let Some(i) = index(n) {
                    enrich.push((i, e.key.clone(), value.clone()));
                }
            }
        }
        let reads_twin = routes.iter().any(|r| r.condition.reads_twin())
            || enrich.iter().any(|(_, _, v)| v.reads_twin());
        let events_read_twin = event_routes.iter().any(|(_, r)| r.condition.reads_twin())
            || enrich.iter().any(|(_, _, v)| v.reads_twin());
        for (i, key, value) in enrich {
            if let Some(t) = targets.get_mut(i) {
                t.enrichments.push((key, value));
            }
        }
        let event_sources = event_routes.iter().fold(0, |bits, (s, _)| bits | s.bit());
        let events_read_body = event_routes.iter().any(|(_, r)| r.condition.reads_body());
        let active = Active {
            event_routes,
            event_sources,
            events_read_body,
            events_read_twin,
            passthrough: routes.is_empty()
                && config.fallback_enabled
                && targets[0].enrichments.is_empty(),
            reads_body: routes.iter().any(|r| r.condition.reads_body()),
            reads_twin,
            routes,
            targets,
            fallback: config.fallback_enabled,
        };
        *self
            .routing
            .active
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(active);
        self.sync_deliveries(external);
        Ok(())
    }

    /// Starts the delivery tasks of new external endpoints, restarts those whose options
    /// changed (the new task waits for the old one) and stops those of removed endpoints.
    fn sync_deliveries(&self, external: Vec<External<'_>>) {
        let mut running = self
            .routing
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut old = std::mem::take(&mut *running);
        for (e, opts, log, dead_letters) in external {
            let previous = match old.remove(&e.name) {
                Some(p) if p.kind == e.kind => {
                    running.insert(e.name.clone(), p);
                    continue;
                }
                previous => previous,
            };
            let sender = match self.routing.senders.get() {
                Some(f) => f.sender(e),
                None => Err(format!("no sender for {} endpoints", e.kind.type_name())),
            };
            let d = Delivery::start(e, opts, log, dead_letters, sender, previous);
            running.insert(e.name.clone(), d);
        }
        for gone in old.into_values() {
            let _ = gone.signal();
        }
    }

    /// Adds or replaces a custom endpoint. An existing stream keeps its partition count.
    /// A webhook header given as [`REDACTED`] keeps its stored value.
    pub async fn put_endpoint(&self, endpoint: Endpoint) -> Result<Endpoint, HubError> {
        self.change_routing(format!("endpoint {} set", endpoint.name), move |c| {
            let mut endpoint = endpoint.clone();
            let stored = c.endpoint(&endpoint.name).map(|e| e.kind.clone());
            if let EndpointKind::Webhook { headers, .. } = &mut endpoint.kind {
                for (k, v) in headers.iter_mut().filter(|(_, v)| v.as_str() == REDACTED) {
                    match &stored {
                        Some(EndpointKind::Webhook { headers: old, .. }) if old.contains_key(k) => {
                            v.clone_from(&old[k]);
                        }
                        _ => {
                            return Err(HubError::argument(format!(
                                "endpoint {}: header {k} is {REDACTED}, but no value is stored for it; give the value",
                                endpoint.name
                            )))
                        }
                    }
                }
            }
            if let Some(old) = c.endpoints.iter_mut().find(|e| e.name == endpoint.name) {
                if old.kind.type_name() != endpoint.kind.type_name() {
                    return Err(conflict(format!(
                        "endpoint {}: the type is fixed at creation ({}); remove the endpoint and add it again",
                        endpoint.name,
                        old.kind.type_name()
                    )));
                }
                if let (EndpointKind::Stream { partitions: a, .. }, EndpointKind::Stream { partitions: b, .. }) =
                    (&old.kind, &endpoint.kind)
                {
                    if a != b {
                        return Err(conflict(format!(
                            "endpoint {}: the partition count is fixed at creation ({a}); remove the endpoint and add it again",
                            endpoint.name
                        )));
                    }
                }
                *old = endpoint.clone();
            } else {
                c.endpoints.push(endpoint.clone());
            }
            Ok(endpoint)
        })
        .await
    }

    /// Removes a custom endpoint and its stream; refused while a route or enrichment uses it.
    pub async fn delete_endpoint(&self, name: &str) -> Result<(), HubError> {
        let name = name.to_string();
        self.change_routing(format!("endpoint {name} removed"), move |c| {
            if c.endpoint(&name).is_none() {
                return Err(not_found("endpoint", &name));
            }
            if let Some(r) = c.routes.iter().find(|r| r.endpoint_names.contains(&name)) {
                return Err(conflict(format!(
                    "endpoint {name} is used by route {}; remove the route or its endpoint first",
                    r.name
                )));
            }
            if let Some(e) = c
                .enrichments
                .iter()
                .find(|e| e.endpoint_names.contains(&name))
            {
                return Err(conflict(format!(
                    "endpoint {name} is used by enrichment {}; remove it first",
                    e.key
                )));
            }
            c.endpoints.retain(|e| e.name != name);
            Ok(())
        })
        .await
    }

    /// Adds or replaces a route.
    pub async fn put_route(&self, route: Route) -> Result<Route, HubError> {
        self.change_routing(format!("route {} set", route.name), move |c| {
            match c.routes.iter_mut().find(|r| r.name == route.name) {
                Some(old) => *old = route.clone(),
                None => c.routes.push(route.clone()),
            }
            Ok(route)
        })
        .await
    }

    pub async fn delete_route(&self, name: &str) -> Result<(), HubError> {
        let name = name.to_string();
        self.change_routing(format!("route {name} removed"), move |c| {
            let before = c.routes.len();
            c.routes.retain(|r| r.name != name);
            if c.routes.len() == before {
                return Err(not_found("route", &name));
            }
            Ok(())
        })
        .await
    }

    /// Adds or replaces an enrichment.
    pub async fn put_enrichment(&self, enrichment: Enrichment) -> Result<Enrichment, HubError> {
        self.change_routing(format!("enrichment {} set", enrichment.key), move |c| {
            match c.enrichments.iter_mut().find(|e| e.key == enrichment.key) {
                Some(old) => *old = enrichment.clone(),
                None => c.enrichments.push(enrichment.clone()),
            }
            Ok(enrichment)
        })
        .await
    }

    pub async fn delete_enrichment(&self, key: &str) -> Result<(), HubError> {
        let key = key.to_string();
        self.change_routing(format!("enrichment {key} removed"), move |c| {
            let before = c.enrichments.len();
            c.enrichments.retain(|e| e.key != key);
            if c.enrichments.len() == before {
                return Err(not_found("enrichment", &key));
            }
            Ok(())
        })
        .await
    }

    pub async fn set_fallback(&self, enabled: bool) -> Result<(), HubError> {
        self.change_routing(format!("fallback route enabled={enabled}"), move |c| {
            c.fallback_enabled = enabled;
            Ok(())
        })
        .await
    }

    /// Tests a stored route's condition on a message, as IoT Hub's "test route" does.
    pub async fn test_route(
        &self,
        name: &str,
        msg: &RouteTestMessage,
    ) -> Result<RouteTestResult, HubError> {
        let (config, _) = self.stored_routing().await?;
        let route = config
            .routes
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| not_found("route", name))?;
        let condition = parse_condition(&route.condition)?;
        if route.source == RouteSource::DeviceMessages {
            return Ok(test_condition(&condition, msg));
        }
        // The hub's own events are always JSON in UTF-8 and name their source: a test of such
        // a route gets those system properties unless it sets them itself.
        let mut msg = msg.clone();
        let source = serde_json::to_value(route.source)
            .ok()
            .and_then(|v| v.as_str().map(lower_first))
            .unwrap_or_default();
        for (k, v) in [
            ("content-type", "application/json".to_string()),
            ("content-encoding", "utf-8".to_string()),
            ("iothub-message-source", source),
        ] {
            msg.system_properties.entry(k.into()).or_insert(v);
        }
        Ok(test_condition(&condition, &msg))
    }

    /// The log of an endpoint: the built-in stream for `None` or `events`.
    pub(crate) fn endpoint_log(
        &self,
        name: Option<&str>,
    ) -> Result<Arc<dyn TelemetryLog>, HubError> {
        let name = name.unwrap_or(BUILTIN_ENDPOINT);
        if name == BUILTIN_ENDPOINT {
            return Ok(self.telemetry.clone());
        }
        if let Some(endpoint) = name.strip_suffix(DEAD_LETTER_SUFFIX) {
            return self
                .routing
                .deliveries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(endpoint)
                .map(|d| d.dead_letters.clone())
                .ok_or_else(|| not_found("dead-letter stream", name));
        }
        self.routing
            .active()
            .targets
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.log.clone())
            .ok_or_else(|| not_found("endpoint", name))
    }

    /// An external endpoint's stream outlives its endpoint's retention (so messages are
    /// dead-lettered, not removed), but the hub's size limit applies to it too: when it removed
    /// messages the endpoint had not delivered, they are lost, and this makes that loud (a
    /// warning, and `droppedBySize` in the endpoint's health) rather than silent.
    async fn count_undelivered_removed(&self, name: &str, log: &Arc<dyn TelemetryLog>) {
        let Some(health) = self
            .routing
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|d| d.health.clone())
        else {
            return;
        };
        let (Ok(start), Ok(groups)) = (
            log.resolve(0, ferrohub_store::telemetry::StartPosition::Start)
                .await,
            log.checkpoints(crate::delivery::DELIVERY_GROUP).await,
        ) else {
            return;
        };
        // Without a checkpoint the task starts at the oldest retained message: nothing skipped.
        let Some(cursor) = groups.get(&0).copied() else {
            return;
        };
        let lost = health.removed_before(cursor, start);
        if lost > 0 {
            warn!(endpoint = %name, lost, "the hub's telemetry size limit removed messages this endpoint had not delivered; they are lost (give the hub more space or fix the endpoint)");
        }
    }

    /// Removes expired events of the custom streams (each by its own age limit).
    pub(crate) async fn enforce_stream_retention(&self, max_bytes: u64) -> u64 {
        let active = self.routing.active();
        let mut removed = 0;
        for t in &active.targets {
            let Some(secs) = t.retention_secs else {
                continue;
            };
            let retention = Retention {
                max_age_ms: i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX),
                max_bytes,
            };
            match t
                .log
                .enforce_retention(retention, ferrohub_store::Timestamp::now())
                .await
            {
                Ok(n) => removed += n,
                Err(e) => warn!(endpoint = %t.name, error = %e, "endpoint stream retention failed"),
            }
            self.count_undelivered_removed(&t.name, &t.log).await;
        }
        // Dead letters are kept as long as their endpoint's stream keeps messages, counted from
        // when they were dead-lettered (their enqueued time in that stream).
        let dead_letters: Vec<(String, u64, Arc<dyn TelemetryLog>)> = self
            .routing
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, d)| {
                (
                    n.clone(),
                    d.kind.stream_retention_secs(),
                    d.dead_letters.clone(),
                )
            })
            .collect();
        for (name, secs, log) in dead_letters {
            let retention = Retention {
                max_age_ms: i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX),
                max_bytes,
            };
            match log
                .enforce_retention(retention, ferrohub_store::Timestamp::now())
                .await
            {
                Ok(n) => removed += n,
                Err(e) => {
                    warn!(endpoint = %name, error = %e, "dead-letter stream retention failed")
                }
            }
        }
        removed
    }

    /// The sender's twin for routing: the service view, read without spending the clients'
    /// twin-read throttle (this is the hub's own read). `None`, logged, if it cannot be read:
    /// `$twin` conditions are then undefined, as for a message without one.
    pub(crate) async fn routing_twin(&self, identity: &Identity) -> Option<Value> {
        let read = async {
            let registry = self.registry_view(identity).await?;
            let doc = self
                .store
                .get_twin(&identity.device_id, identity.module_id.as_deref())
                .await?
                .map(|t| t.doc);
            let d = StoredDoc::load(doc, &crate::timefmt::now_iso())?;
            Ok::<_, crate::twins::TwinFailure>(self.twin_json(identity, &d, registry))
        };
        match read.await {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(identity = %identity, error = %e, "routing could not read the sender's twin");
                None
            }
        }
    }

    /// Sends a telemetry event where the routes say, and returns what the PUBACK waits for:
    /// every append durable. Called while the connection handles its PUBLISHes one by one, so
    /// each endpoint keeps the device's order.
    pub(crate) async fn route(
        &self,
        identity: &Identity,
        event: NewEvent,
    ) -> Result<Vec<Durable>, HubError> {
        let active = self.routing.active();
        if active.passthrough {
            return Ok(vec![self.telemetry.enqueue(event).await?]);
        }
        let twin = if active.reads_twin {
            self.routing_twin(identity).await
        } else {
            None
        };
        let doc = RoutingDocument::from_parts(
            &event.system_properties,
            &event.properties,
            &event.body,
            active.reads_body,
            twin.clone(),
        );
        let mut hit = vec![false; active.targets.len()];
        let mut matched = false;
        for r in &active.routes {
            match r.condition.evaluate(&doc) {
                Some(true) => {
                    matched = true;
                    for &t in &r.targets {
                        hit[t] = true;
                    }
                }
                Some(false) => {}
                None => {
                    self.routing
                        .count_undefined(&r.name, &identity.to_string(), doc.body_status())
                }
            }
        }
        if !matched && active.fallback {
            hit[0] = true;
        }
        let hub_name = match self.routing.hub_name.get() {
            Some(n) => n.as_str(),
            None => self
                .hostnames
                .first()
                .map(|h| hub_name_of(h))
                .unwrap_or("ferrohub"),
        };
        let reached: Vec<&Target> = active
            .targets
            .iter()
            .zip(&hit)
            .filter(|(_, h)| **h)
            .map(|(t, _)| t)
            .collect();
        let mut waits = Vec::with_capacity(reached.len());
        let mut event = Some(event);
        for (i, t) in reached.iter().enumerate() {
            // The last endpoint takes the message itself; only the others need a copy.
            let mut copy = match (i + 1 == reached.len(), &mut event) {
                (true, e) => match e.take() {
                    Some(e) => e,
                    None => break,
                },
                (false, Some(e)) => e.clone(),
                (false, None) => break,
            };
            for (key, value) in &t.enrichments {
                // What the device sent is never changed: its own property of that name stays.
                if !copy.properties.iter().any(|(k, _)| k == key) {
                    copy.properties
                        .push((key.clone(), Some(value.resolve(hub_name, twin.as_ref()))));
                }
            }
            waits.push(t.log.enqueue(copy).await?);
        }
        if waits.is_empty() {
            self.routing.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(waits)
    }
}

impl Hub {
    /// Whether some enabled route has `source`: what an emitter checks before it builds an
    /// event, so that a source nobody routes costs nothing but this.
    pub(crate) fn routes_source(&self, source: RouteSource) -> bool {
        self.routing.active().event_sources & source.bit() != 0
    }

    /// The name events and `$iothubname` carry: the Event Hubs entity name once set, else the
    /// first label of the first host name.
    pub(crate) fn routing_hub_name(&self) -> String {
        match self.routing.hub_name.get() {
            Some(n) => n.clone(),
            None => self
                .hostnames
                .first()
                .map(|h| hub_name_of(h))
                .unwrap_or("ferrohub")
                .to_string(),
        }
    }

    /// Sends a non-telemetry event of `source` where that source's routes say, and returns
    /// what to wait for to know every append durable. Unlike telemetry there is no fallback: an
    /// event no route matched is dropped, as in IoT Hub. `twin` is the identity's twin when the
    /// caller has it (a deleted identity's, read before the delete); otherwise it is read here
    /// if a condition or enrichment needs it. Enrichments are stamped as on telemetry, except
    /// on digital twin change events, which IoT Hub does not enrich.
    pub(crate) async fn route_event(
        &self,
        source: RouteSource,
        event: NewEvent,
        twin: Option<Value>,
    ) -> Result<Vec<Durable>, HubError> {
        let active = self.routing.active();
        if active.event_sources & source.bit() == 0 {
            return Ok(Vec::new());
        }
        let identity = Identity {
            device_id: event.device_id.clone(),
            module_id: event.module_id.clone(),
        };
        let twin = match twin {
            Some(t) => Some(t),
            None if active.events_read_twin => self.routing_twin(&identity).await,
            None => None,
        };
        let doc = RoutingDocument::from_parts(
            &event.system_properties,
            &event.properties,
            &event.body,
            active.events_read_body,
            twin.clone(),
        );
        let mut hit = vec![false; active.targets.len()];
        for (_, r) in active.event_routes.iter().filter(|(s, _)| *s == source) {
            match r.condition.evaluate(&doc) {
                Some(true) => {
                    for &t in &r.targets {
                        hit[t] = true;
                    }
                }
                Some(false) => {}
                None => {
                    self.routing
                        .count_undefined(&r.name, &identity.to_string(), doc.body_status())
                }
            }
        }
        let enrich = source != RouteSource::DigitalTwinChangeEvents;
        let hub_name = self.routing_hub_name();
        let mut waits = Vec::new();
        for (t, _) in active.targets.iter().zip(&hit).filter(|(_, h)| **h) {
            let mut copy = event.clone();
            if enrich {
                for (key, value) in &t.enrichments {
                    if !copy.properties.iter().any(|(k, _)| k == key) {
                        copy.properties
                            .push((key.clone(), Some(value.resolve(&hub_name, twin.as_ref()))));
                    }
                }
            }
            waits.push(t.log.enqueue(copy).await?);
        }
        Ok(waits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(body: &str, ct: Option<&str>) -> RouteTestMessage {
        let mut m = RouteTestMessage {
            body: body.into(),
            ..Default::default()
        };
        if let Some(ct) = ct {
            m.system_properties.insert("content-type".into(), ct.into());
            m.system_properties
                .insert("content-encoding".into(), "utf-8".into());
        }
        m
    }

    #[test]
    fn route_test_says_why_a_body_condition_is_undefined() -> Result<(), HubError> {
        let c = parse_condition("$body.t > 20")?;
        let r = test_condition(&c, &msg("{\"t\": 25}", None));
        assert_eq!(r.result, "undefined");
        let why = r.details.unwrap_or_default();
        assert!(
            why.contains("content-type is not application/json"),
            "{why}"
        );
        let r = test_condition(&c, &msg("{\"t\": 25}", Some("application/json")));
        assert_eq!((r.result.as_str(), r.details), ("true", None));
        let r = test_condition(&c, &msg("{\"t\": 5}", Some("application/json")));
        assert_eq!(r.result, "false");
        let r = test_condition(&c, &msg("{nope", Some("application/json")));
        assert_eq!(r.result, "undefined");
        Ok(())
    }

    #[test]
    fn a_configuration_is_checked_whole() {
        let stream = |name: &str| Endpoint {
            name: name.into(),
            kind: EndpointKind::Stream {
                partitions: 2,
                retention_secs: 60,
            },
        };
        let route = |eps: &[&str]| Route {
            name: "r1".into(),
            source: RouteSource::DeviceMessages,
            condition: "true".into(),
            endpoint_names: eps.iter().map(|s| s.to_string()).collect(),
            is_enabled: true,
        };
        let mut c = RoutingConfig {
            endpoints: vec![stream("hot")],
            routes: vec![route(&["hot", "events"])],
            ..Default::default()
        };
        assert!(c.check().is_ok());
        c.routes = vec![route(&["cold"])];
        assert!(c.check().is_err());
        c.routes = vec![route(&[])];
        assert!(c.check().is_err());
        c.routes.clear();
        c.endpoints.push(stream("Events"));
        assert!(c.check().is_err(), "the built-in name is reserved");
        c.endpoints.pop();
        c.routes = vec![Route {
            source: RouteSource::TwinChangeEvents,
            ..route(&["hot"])
        }];
        assert!(c.check().is_ok(), "every source is emitted");
    }

    #[test]
    fn the_json_shape_is_iot_hubs() -> Result<(), serde_json::Error> {
        let r: Route = serde_json::from_value(json!({
            "name": "r", "source": "DeviceMessages", "endpointNames": ["events"]
        }))?;
        assert_eq!(r.condition, "true");
        assert!(r.is_enabled);
        let e: Endpoint = serde_json::from_value(json!({"name": "hot", "type": "stream"}))?;
        assert_eq!(
            e.kind,
            EndpointKind::Stream {
                partitions: DEFAULT_STREAM_PARTITIONS,
                retention_secs: DEFAULT_STREAM_RETENTION_SECS
            }
        );
        let c: RoutingConfig = serde_json::from_str("{}")?;
        assert!(c.fallback_enabled);
        Ok(())
    }
}
