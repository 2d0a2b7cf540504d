//! `methods`: direct method calls through the service REST API at a fixed aggregate rate (open
//! loop, round-robin over the devices) to connected devices that answer at once with the request
//! payload; measures the round trip from the start of the REST call to its 200 answer, achieved
//! calls per second and server CPU per call.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ferrohub_mqtt::{encode, Packet, Publish, QoS};
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Semaphore};

use super::push::{
    self, histogram, lock, topic_param, Connections, DeviceEnd, Failures, Latency, Progress,
    PushArgs, Role, Schedule, SharedHistogram, Summary, DRAIN_TIMEOUT,
};
use crate::service::{excerpt, Service};

/// What the hub is told to wait for the device; far above any latency worth measuring.
const RESPONSE_TIMEOUT_SECS: u64 = 30;
const METHOD_NAME: &str = "echo";
const REQUEST_PREFIX: &str = "$iothub/methods/POST/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResponseQos {
    /// QoS 0, as the C and Java device SDKs answer.
    #[value(name = "0")]
    Zero,
    /// QoS 1, as the Python and Node device SDKs answer.
    #[value(name = "1")]
    One,
}

#[derive(Debug, clap::Args)]
pub struct MethodsArgs {
    #[command(flatten)]
    pub push: PushArgs,
    /// QoS of the devices' method responses.
    #[arg(long, value_enum, default_value_t = ResponseQos::Zero)]
    pub response_qos: ResponseQos,
    /// Method calls in flight at most, each on its own keep-alive connection; a call due while
    /// all are busy waits, and counts as late.
    #[arg(long, default_value_t = 256)]
    pub http_inflight: usize,
    /// Keep-alive connections opened before the run, so handshakes stay out of it.
    #[arg(long, default_value_t = 32)]
    pub http_warm: usize,
}

impl MethodsArgs {
    fn validate(&self) -> Result<()> {
        self.push.validate()?;
        if self.http_inflight == 0 {
            bail!("--http-inflight must be at least 1");
        }
        Ok(())
    }
}

struct Shared {
    schedule: Schedule,
    service: Service,
    prefix: String,
    devices: u64,
    permits: Arc<Semaphore>,
    progress: Progress,
    offered: AtomicU64,
    succeeded: AtomicU64,
    late: AtomicU64,
    round_trip: SharedHistogram,
    lag: SharedHistogram,
    failures: Mutex<Failures>,
    /// QoS 1 responses the hub has not PUBACKed yet, over all devices.
    unacked: Arc<AtomicU64>,
}

impl push::OpenLoopState for Shared {
    fn progress(&self) -> &Progress {
        &self.progress
    }

    fn offered(&self) -> &AtomicU64 {
        &self.offered
    }

    fn succeeded(&self) -> &AtomicU64 {
        &self.succeeded
    }

    fn failures(&self) -> &Mutex<Failures> {
        &self.failures
    }
}

/// Why an answer is not the device's echo of `{"seq": seq}` with status 200.
fn check_answer(body: &[u8], seq: u64) -> Result<(), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("status").and_then(Value::as_i64) != Some(200) {
        return Err("status is not 200".into());
    }
    if v.pointer("/payload/seq").and_then(Value::as_u64) != Some(seq) {
        return Err("payload is not the request's".into());
    }
    Ok(())
}

async fn call(shared: Arc<Shared>, seq: u64, due: Instant) {
    let (_permit, start, measured) = push::start_slot(
        &shared.permits,
        &shared.schedule,
        due,
        &shared.late,
        &shared.lag,
    )
    .await;
    let id = format!("{}{}", shared.prefix, seq % shared.devices);
    let body = json!({
        "methodName": METHOD_NAME,
        "payload": {"seq": seq},
        "responseTimeoutInSeconds": RESPONSE_TIMEOUT_SECS,
    })
    .to_string();
    let answer = shared
        .service
        .post(&format!("/twins/{id}/methods"), body.into_bytes())
        .await;
    let elapsed = start.elapsed();
    let failure = match answer.ok_body("method call") {
        Ok(body) => check_answer(&body, seq)
            .err()
            .map(|why| (format!("method call: 200 but {why}"), excerpt(&body))),
        Err(failure) => Some(failure),
    };
    push::finish_slot(
        &*shared,
        &shared.round_trip,
        measured,
        elapsed,
        failure,
        || format!("{id} call {seq}"),
    );
}

/// A device that answers every method request at once with status 200 and the request's
/// payload.
struct MethodDevice {
    qos: QoS,
    all_unacked: Arc<AtomicU64>,
    last_id: u16,
    /// Packet identifiers of QoS 1 responses not yet acknowledged.
    unacked: HashSet<u16>,
    answered: u64,
    failures: Failures,
}

impl MethodDevice {
    fn new(qos: QoS, all_unacked: Arc<AtomicU64>) -> Self {
        Self {
            qos,
            all_unacked,
            last_id: 0,
            unacked: HashSet::new(),
            answered: 0,
            failures: Failures::default(),
        }
    }

    fn next_id(&mut self) -> u16 {
        push::next_packet_id(&mut self.last_id, &self.unacked)
    }
}

impl Role for MethodDevice {
    fn on_packet(
        &mut self,
        packet: Packet,
        _now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), String> {
        match packet {
            Packet::Publish(p) if p.topic.starts_with(REQUEST_PREFIX) => {
                let Some(rid) = topic_param(&p.topic, "$rid") else {
                    self.failures
                        .add("device: method request without $rid", || p.topic.clone());
                    return Ok(());
                };
                let packet_id = match self.qos {
                    QoS::AtMostOnce => 0,
                    _ => {
                        let id = self.next_id();
                        self.unacked.insert(id);
                        self.all_unacked.fetch_add(1, Ordering::Relaxed);
                        id
                    }
                };
                let response = Packet::Publish(Publish {
                    dup: false,
                    qos: self.qos,
                    retain: false,
                    topic: format!("$iothub/methods/res/200/?$rid={rid}"),
                    packet_id,
                    payload: Bytes::clone(&p.payload),
                });
                encode(&response, out).map_err(|e| format!("encoding the response: {e}"))?;
                self.answered += 1;
            }
            Packet::PubAck(id) if self.unacked.remove(&id) => {
                self.all_unacked.fetch_sub(1, Ordering::Relaxed);
            }
            other => {
                let what = format!("{other:?}");
                self.failures.add("device: unexpected packet", || what);
            }
        }
        Ok(())
    }
}

pub async fn run(args: MethodsArgs) -> Result<()> {
    args.validate()?;
    let push = &args.push;
    let qos = match args.response_qos {
        ResponseQos::Zero => QoS::AtMostOnce,
        ResponseQos::One => QoS::AtLeastOnce,
    };
    println!(
        "methods: {} devices, {:.0} calls/s offered (open loop, round-robin), method {METHOD_NAME:?} \
         answered at QoS {}, at most {} calls in flight, warm-up {} s, measured {} s",
        push.fleet.devices,
        push.rate,
        qos as u8,
        args.http_inflight,
        push.warmup_secs,
        push.secs,
    );
    let fleet = push::fleet(push, args.http_inflight, |_| {
        vec![(format!("{REQUEST_PREFIX}#"), QoS::AtMostOnce)]
    })
    .await?;
    let service = Service::new(
        &fleet.hub,
        args.http_inflight,
        Duration::from_secs(RESPONSE_TIMEOUT_SECS + 30),
    )?;
    service
        .warm(
            &format!("/devices/{}", push.fleet.device_id(0)),
            args.http_warm.min(args.http_inflight),
        )
        .await
        .context("opening the REST connections")?;

    let schedule = Schedule::new(push);
    let shared = Arc::new(Shared {
        schedule,
        service,
        prefix: push.fleet.prefix.clone(),
        devices: push.fleet.devices as u64,
        permits: Arc::new(Semaphore::new(args.http_inflight)),
        progress: Progress::default(),
        offered: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        late: AtomicU64::new(0),
        round_trip: Mutex::new(histogram()),
        lag: Mutex::new(histogram()),
        failures: Mutex::new(Failures::default()),
        unacked: Arc::new(AtomicU64::new(0)),
    });
    let (close_tx, close_rx) = watch::channel(false);
    let devices: Vec<_> = fleet
        .devices
        .into_iter()
        .map(|conn| {
            let role = MethodDevice::new(qos, Arc::clone(&shared.unacked));
            tokio::spawn(push::drive(conn, role, close_rx.clone()))
        })
        .collect();

    let window = push::run_open_loop(
        &shared,
        schedule,
        push.rate,
        call,
        fleet.server_pid,
        "calls answered",
    )
    .await?;
    // A QoS 1 response's PUBACK may come after the call's 200.
    let drained = push::drain(DRAIN_TIMEOUT, || {
        shared.progress.outstanding.load(Ordering::Relaxed) == 0
            && shared.unacked.load(Ordering::Relaxed) == 0
    })
    .await;
    let _ = close_tx.send(true);

    let mut failures = Failures::default();
    let mut connections = Connections::default();
    let mut answered = 0;
    let mut unacked = 0;
    for task in devices {
        let end: DeviceEnd<MethodDevice> = task.await.context("device task panicked")?;
        connections.add(&end);
        answered += end.role.answered;
        unacked += end.role.unacked.len() as u64;
        failures.merge(end.role.failures);
    }
    failures.merge(std::mem::take(&mut *lock(&shared.failures)));
    let in_flight = shared.progress.outstanding.load(Ordering::Relaxed);
    failures.add_n(
        "method call: no answer by the end",
        in_flight,
        format!("{in_flight} calls still in flight"),
    );
    failures.add_n(
        "device: QoS 1 response never acknowledged",
        unacked,
        format!("{unacked} responses"),
    );
    let mut extra = Map::new();
    extra.insert("response_qos".into(), json!(qos as u8));
    extra.insert("http_inflight".into(), json!(args.http_inflight));
    extra.insert("answered_by_devices".into(), json!(answered));
    extra.insert("drained".into(), json!(drained));
    let summary = Summary {
        scenario: "methods",
        unit: "calls",
        one: "call",
        devices: push.fleet.devices,
        rate: push.rate,
        warmup_secs: push.warmup_secs,
        window,
        offered: shared.offered.load(Ordering::Relaxed),
        succeeded: shared.succeeded.load(Ordering::Relaxed),
        late: shared.late.load(Ordering::Relaxed),
        lag: lock(&shared.lag).clone(),
        latencies: vec![Latency {
            key: "round_trip",
            label: "method round trip (REST call start -> 200 answer)",
            histogram: lock(&shared.round_trip).clone(),
        }],
        failures,
        connections,
        server_pid: fleet.server_pid,
        notes: vec![format!(
            "devices answered {answered} requests over the whole run"
        )],
        extra,
    };
    summary.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_echo_with_status_200_is_a_success() {
        assert!(check_answer(br#"{"status":200,"payload":{"seq":5}}"#, 5).is_ok());
        assert!(check_answer(br#"{"status":200,"payload":{"seq":6}}"#, 5).is_err());
        assert!(check_answer(br#"{"status":500,"payload":{"seq":5}}"#, 5).is_err());
        assert!(check_answer(b"nope", 5).is_err());
    }

    #[test]
    fn devices_echo_requests_to_the_response_topic() -> Result<(), String> {
        let mut device = MethodDevice::new(QoS::AtLeastOnce, Arc::new(AtomicU64::new(0)));
        let mut out = BytesMut::new();
        let request = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "$iothub/methods/POST/echo/?$rid=2a".into(),
            packet_id: 0,
            payload: Bytes::from_static(br#"{"seq":1}"#),
        });
        device.on_packet(request, Instant::now(), &mut out)?;
        match ferrohub_mqtt::decode(&mut out, 1 << 16) {
            Ok(Some(Packet::Publish(p))) => {
                assert_eq!(p.topic, "$iothub/methods/res/200/?$rid=2a");
                assert_eq!(&p.payload[..], br#"{"seq":1}"#);
                assert_eq!(p.qos, QoS::AtLeastOnce);
                device.on_packet(Packet::PubAck(p.packet_id), Instant::now(), &mut out)?;
            }
            other => return Err(format!("expected a PUBLISH, got {other:?}")),
        }
        assert!(device.unacked.is_empty());
        assert_eq!(device.answered, 1);
        assert_eq!(device.failures.total(), 0);
        Ok(())
    }
}
