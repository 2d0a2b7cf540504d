//! The hub's operational metrics, named in one place: what the hub records through the
//! `metrics` facade as devices and services use it. Which recorder receives them (the
//! Prometheus exporter of the `serve` command, or none, making every call a no-op) is the
//! binary's choice. Names follow Prometheus conventions: `_total` counters, base units
//! (`_seconds`, `_bytes`), low-cardinality labels only (never a device id).
//!
//! A few of the same figures are also kept as plain atomics ([`counters`]), updated by the
//! same calls, for readers inside the process (the web explorer's overview) that must not
//! depend on which recorder, if any, is installed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Histogram, Unit};

use crate::Transport;

pub const DEVICE_CONNECTIONS: &str = "ferrohub_device_connections";
pub const DEVICE_CONNECTS: &str = "ferrohub_device_connects_total";
pub const DEVICE_CONNECT_REFUSALS: &str = "ferrohub_device_connect_refusals_total";
pub const TELEMETRY_MESSAGES: &str = "ferrohub_telemetry_messages_total";
pub const TELEMETRY_BYTES: &str = "ferrohub_telemetry_bytes_total";
pub const TELEMETRY_DURABLE_SECONDS: &str = "ferrohub_telemetry_durable_seconds";
pub const C2D_MESSAGES: &str = "ferrohub_c2d_messages_total";
pub const TWIN_OPERATIONS: &str = "ferrohub_twin_operations_total";
pub const METHOD_CALLS: &str = "ferrohub_method_calls_total";
pub const METHOD_CALL_SECONDS: &str = "ferrohub_method_call_seconds";
pub const THROTTLED: &str = "ferrohub_throttled_total";
pub const CONFORMANCE_CHECKED: &str = "ferrohub_conformance_checked_total";
pub const CONFORMANCE_FINDINGS: &str = "ferrohub_conformance_findings_total";
pub const EVENTS_DELIVERED: &str = "ferrohub_events_delivered_total";
pub const EVENT_READERS: &str = "ferrohub_event_readers";
pub const EVENT_READER_LAG: &str = "ferrohub_event_reader_lag_events";

/// Registers the descriptions (HELP lines) with the installed recorder; call once after
/// installing it.
pub fn describe() {
    describe_gauge!(
        DEVICE_CONNECTIONS,
        "Open device and module connections, by transport and authentication method"
    );
    describe_counter!(
        DEVICE_CONNECTS,
        "Device and module connections accepted, by transport and authentication method"
    );
    describe_counter!(
        DEVICE_CONNECT_REFUSALS,
        "Device and module CONNECTs refused, by transport and IoT Hub error code"
    );
    describe_counter!(
        TELEMETRY_MESSAGES,
        "Device-to-cloud messages accepted for storage"
    );
    describe_counter!(
        TELEMETRY_BYTES,
        Unit::Bytes,
        "Bodies of the device-to-cloud messages accepted for storage"
    );
    describe_histogram!(
        TELEMETRY_DURABLE_SECONDS,
        Unit::Seconds,
        "From a device-to-cloud message's arrival to every copy of it being on disk (its PUBACK)"
    );
    describe_counter!(
        C2D_MESSAGES,
        "Cloud-to-device messages by outcome: sent (queued), delivered (handed to a connection), \
         completed, expired, deadLettered (delivery count exceeded), rejected"
    );
    describe_counter!(
        TWIN_OPERATIONS,
        "Twin reads and updates, by side (device, service) and operation"
    );
    describe_counter!(
        METHOD_CALLS,
        "Direct method calls, by the device's status (or timeout, offline, error)"
    );
    describe_histogram!(
        METHOD_CALL_SECONDS,
        Unit::Seconds,
        "Direct method calls, from the request to the device's answer"
    );
    describe_counter!(
        THROTTLED,
        "Operations refused by the hub's throttles (429), by operation"
    );
    describe_counter!(
        CONFORMANCE_CHECKED,
        "Messages, patches and commands checked against IoT Plug and Play models"
    );
    describe_counter!(
        CONFORMANCE_FINDINGS,
        "IoT Plug and Play conformance findings, by kind"
    );
    describe_counter!(
        EVENTS_DELIVERED,
        "Events handed to back-end readers: GET /events lines and Event Hubs (AMQP) transfers"
    );
    describe_gauge!(
        EVENT_READERS,
        "Open event stream readers: GET /events responses and Event Hubs (AMQP) receivers"
    );
    describe_gauge!(
        EVENT_READER_LAG,
        "Events committed to the log that open readers have not read yet, summed over readers \
         (each reader's figure refreshed at most once a second as it reads: a reader whose client stopped taking events keeps its last figure)"
    );
}

static EVENTS_DELIVERED_COUNTER: LazyLock<Counter> = LazyLock::new(|| counter!(EVENTS_DELIVERED));

/// An event handed to a back-end reader.
pub(crate) fn event_delivered() {
    EVENTS_DELIVERED_COUNTER.increment(1);
    COUNTERS.events_delivered.fetch_add(1, Ordering::Relaxed);
}

/// One open event stream reader, counted while it lives, with its lag in the sum.
pub(crate) struct ReaderMetrics {
    lag: f64,
}

impl ReaderMetrics {
    pub(crate) fn open() -> Self {
        gauge!(EVENT_READERS).increment(1.0);
        Self { lag: 0.0 }
    }

    /// This reader is now `events` behind the log's head.
    pub(crate) fn lag(&mut self, events: u64) {
        let now = events as f64;
        if now != self.lag {
            gauge!(EVENT_READER_LAG).increment(now - self.lag);
            self.lag = now;
        }
    }
}

impl Drop for ReaderMetrics {
    fn drop(&mut self) {
        gauge!(EVENT_READERS).decrement(1.0);
        gauge!(EVENT_READER_LAG).decrement(self.lag);
    }
}

/// The process's counters of what devices did, as the metrics facade records them: one set
/// per process, like the recorder (a process runs one hub).
#[derive(Default)]
pub struct Counters {
    pub telemetry_messages: AtomicU64,
    pub telemetry_bytes: AtomicU64,
    pub c2d_sent: AtomicU64,
    pub c2d_delivered: AtomicU64,
    pub c2d_completed: AtomicU64,
    /// Events handed to back-end readers.
    pub events_delivered: AtomicU64,
    pub connects: AtomicU64,
    /// Open connections by transport label (`mqtt-tls`, `mqtt-ws`, `https`).
    connections: [AtomicI64; 3],
    /// Refused CONNECTs by IoT Hub error name: few names, and not a hot path.
    refusals: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    /// Open connections by transport label.
    pub fn connections(&self) -> BTreeMap<&'static str, u64> {
        TRANSPORTS
            .iter()
            .zip(&self.connections)
            .map(|(t, n)| (transport_label(*t), n.load(Ordering::Relaxed).max(0) as u64))
            .collect()
    }

    /// Refused CONNECTs so far, by IoT Hub error name.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn connection_slot(&self, t: Transport) -> &AtomicI64 {
        let [tls, ws, https] = &self.connections;
        match t {
            Transport::MqttTls => tls,
            Transport::MqttWebSocket => ws,
            Transport::Https => https,
        }
    }
}

const TRANSPORTS: [Transport; 3] = [
    Transport::MqttTls,
    Transport::MqttWebSocket,
    Transport::Https,
];

static COUNTERS: LazyLock<Counters> = LazyLock::new(Counters::default);

/// The process's counters.
pub fn counters() -> &'static Counters {
    &COUNTERS
}

fn transport_label(t: Transport) -> &'static str {
    match t {
        Transport::MqttTls => "mqtt-tls",
        Transport::MqttWebSocket => "mqtt-ws",
        Transport::Https => "https",
    }
}

pub(crate) fn connection_opened(transport: Transport, auth: &'static str) {
    let labels = [("transport", transport_label(transport)), ("auth", auth)];
    gauge!(DEVICE_CONNECTIONS, &labels).increment(1.0);
    counter!(DEVICE_CONNECTS, &labels).increment(1);
    COUNTERS.connects.fetch_add(1, Ordering::Relaxed);
    COUNTERS
        .connection_slot(transport)
        .fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn connection_closed(transport: Transport, auth: &'static str) {
    let labels = [("transport", transport_label(transport)), ("auth", auth)];
    gauge!(DEVICE_CONNECTIONS, &labels).decrement(1.0);
    COUNTERS
        .connection_slot(transport)
        .fetch_sub(1, Ordering::Relaxed);
}

pub(crate) fn connect_refused(transport: Transport, error: &'static str) {
    counter!(
        DEVICE_CONNECT_REFUSALS,
        "transport" => transport_label(transport),
        "error" => error
    )
    .increment(1);
    *COUNTERS
        .refusals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(error)
        .or_default() += 1;
}

/// The telemetry path's handles, resolved once: looking a metric up by name on every message
/// would cost a hash and a lock.
struct TelemetryHandles {
    messages: Counter,
    bytes: Counter,
    durable: Histogram,
}

static TELEMETRY: LazyLock<TelemetryHandles> = LazyLock::new(|| TelemetryHandles {
    messages: counter!(TELEMETRY_MESSAGES),
    bytes: counter!(TELEMETRY_BYTES),
    durable: histogram!(TELEMETRY_DURABLE_SECONDS),
});

pub(crate) fn telemetry_accepted(body_bytes: usize) {
    TELEMETRY.messages.increment(1);
    TELEMETRY.bytes.increment(body_bytes as u64);
    COUNTERS.telemetry_messages.fetch_add(1, Ordering::Relaxed);
    COUNTERS
        .telemetry_bytes
        .fetch_add(body_bytes as u64, Ordering::Relaxed);
}

pub(crate) fn telemetry_durable(after: Duration) {
    TELEMETRY.durable.record(after.as_secs_f64());
}

/// A C2D outcome: `sent`, `delivered`, `completed`, `expired`, `deadLettered`, `rejected`.
pub(crate) fn c2d(outcome: &'static str) {
    counter!(C2D_MESSAGES, "outcome" => outcome).increment(1);
    let kept = match outcome {
        "sent" => &COUNTERS.c2d_sent,
        "delivered" => &COUNTERS.c2d_delivered,
        "completed" => &COUNTERS.c2d_completed,
        _ => return,
    };
    kept.fetch_add(1, Ordering::Relaxed);
}

/// The outcome label of a settled C2D message.
pub(crate) fn c2d_outcome(status: ferrohub_store::FeedbackStatus) -> &'static str {
    use ferrohub_store::FeedbackStatus as S;
    match status {
        S::Success => "completed",
        S::Expired => "expired",
        S::DeliveryCountExceeded => "deadLettered",
        S::Rejected => "rejected",
        S::Purged => "purged",
    }
}

/// `side` is `device` or `service`; `op` is `get`, `patch` or `replace`.
pub(crate) fn twin(side: &'static str, op: &'static str) {
    counter!(TWIN_OPERATIONS, "side" => side, "op" => op).increment(1);
}

/// `status` is the device's status code, or `timeout`, `offline`, `error`.
pub(crate) fn method_call(status: String, took: Duration) {
    counter!(METHOD_CALLS, "status" => status).increment(1);
    histogram!(METHOD_CALL_SECONDS).record(took.as_secs_f64());
}

pub(crate) fn throttled(operation: &'static str) {
    counter!(THROTTLED, "operation" => operation).increment(1);
}

pub(crate) fn conformance_checked(findings: impl IntoIterator<Item = &'static str>) {
    counter!(CONFORMANCE_CHECKED).increment(1);
    for kind in findings {
        counter!(CONFORMANCE_FINDINGS, "kind" => kind).increment(1);
    }
}
