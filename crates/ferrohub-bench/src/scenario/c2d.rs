//! `c2d`: cloud-to-device messages sent through the service REST API, or over AMQP as the
//! service SDKs send them (`--via amqp`: sender links on `messages/devicebound`), at a fixed
//! aggregate rate (open loop, round-robin over the devices) to connected devices subscribed at
//! QoS 1 that PUBACK at once; measures the latency from the start of the send to the device
//! holding the PUBLISH, the send latency (request to 200, or transfer to Accepted), achieved
//! sends per second and server CPU per message.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::{Message, Performative};
use ferrohub_mqtt::{encode, Packet, QoS};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::eventhub::{self, Connection};
use super::push::{
    self, histogram, lock, record, Connections, DeviceEnd, Failures, Latency, Progress, PushArgs,
    Role, Schedule, SharedHistogram, Summary, DRAIN_TIMEOUT,
};
use crate::service::{excerpt, Service};

/// How long one REST send may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct C2dArgs {
    #[command(flatten)]
    pub push: PushArgs,
    /// Size of every message payload; its start is the sequence number and the send time.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// REST sends in flight at most, each on its own keep-alive connection; a send due while
    /// all are busy waits, and counts as late.
    #[arg(long, default_value_t = 256)]
    pub http_inflight: usize,
    /// Keep-alive connections opened before the run, so handshakes stay out of it.
    #[arg(long, default_value_t = 32)]
    pub http_warm: usize,
    /// How the back end sends: the service REST API, or AMQP as the service SDKs do.
    #[arg(long, value_enum, default_value_t = Via::Rest)]
    pub via: Via,
    /// With `--via amqp`: AMQP connections, one sender link each, the sends are spread over
    /// (each link has the server's credit of 100 unsettled sends).
    #[arg(long, default_value_t = 4)]
    pub amqp_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    Rest,
    Amqp,
}

impl C2dArgs {
    fn validate(&self) -> Result<()> {
        self.push.validate()?;
        if self.http_inflight == 0 {
            bail!("--http-inflight must be at least 1");
        }
        if self.amqp_connections == 0 {
            bail!("--amqp-connections must be at least 1");
        }
        // IoT Hub's limit for a C2D message.
        if self.payload_bytes > 64 * 1024 {
            bail!("--payload-bytes must be at most 65536");
        }
        Ok(())
    }
}

/// State every send task and every device shares.
struct Shared {
    schedule: Schedule,
    service: Service,
    prefix: String,
    devices: u64,
    payload_bytes: usize,
    permits: Arc<Semaphore>,
    /// REST sends answered 200 (completed) and under way.
    progress: Progress,
    /// Sends due in the window, and how many of them were answered 200.
    offered: AtomicU64,
    succeeded: AtomicU64,
    /// Distinct messages the devices received, all phases.
    delivered: AtomicU64,
    late: AtomicU64,
    rest: SharedHistogram,
    lag: SharedHistogram,
    failures: Mutex<Failures>,
    /// With `--via amqp`, the sender tasks (sends go round-robin over them).
    amqp: Vec<mpsc::Sender<AmqpSend>>,
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

/// The payload: `{seq} {send time, µs since the epoch} {1 if measured, else 0} ` and filler.
fn payload_text(seq: u64, sent_us: u64, measured: bool, len: usize) -> String {
    let mut s = format!("{seq} {sent_us} {} ", u8::from(measured));
    while s.len() < len {
        s.push('x');
    }
    s
}

fn parse_payload(payload: &[u8]) -> Option<(u64, u64, bool)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut fields = text.split_ascii_whitespace();
    let seq = fields.next()?.parse().ok()?;
    let sent_us = fields.next()?.parse().ok()?;
    let measured = fields.next()? == "1";
    Some((seq, sent_us, measured))
}

async fn send(shared: Arc<Shared>, seq: u64, due: Instant) {
    let (_permit, start, measured) = push::start_slot(
        &shared.permits,
        &shared.schedule,
        due,
        &shared.late,
        &shared.lag,
    )
    .await;
    let id = format!("{}{}", shared.prefix, seq % shared.devices);
    let payload = payload_text(
        seq,
        shared.schedule.micros(start),
        measured,
        shared.payload_bytes,
    );
    let message_id = seq.to_string();
    if !shared.amqp.is_empty() {
        let link = &shared.amqp[(seq % shared.amqp.len() as u64) as usize];
        let failure = amqp_send(link, &id, message_id, payload).await;
        let elapsed = start.elapsed();
        push::finish_slot(&*shared, &shared.rest, measured, elapsed, failure, || {
            format!("{id} message {seq}")
        });
        return;
    }
    let body = json!({"payload": payload, "messageId": message_id, "ack": "none"}).to_string();
    let answer = shared
        .service
        .post(
            &format!("/devices/{id}/messages/deviceBound"),
            body.into_bytes(),
        )
        .await;
    let elapsed = start.elapsed();
    let failure = match answer.ok_body("c2d send") {
        Ok(body) => {
            let echoed = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
                v.get("messageId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
            (echoed.as_deref() != Some(message_id.as_str())).then(|| {
                (
                    "c2d send: 200 without our messageId".to_owned(),
                    excerpt(&body),
                )
            })
        }
        Err(failure) => Some(failure),
    };
    push::finish_slot(&*shared, &shared.rest, measured, elapsed, failure, || {
        format!("{id} message {seq}")
    });
}

/// One C2D send for an AMQP sender task: the message and where its outcome goes.
struct AmqpSend {
    message: Message,
    done: oneshot::Sender<Result<(), String>>,
}

/// Sends one message over an AMQP sender link; a failure as `finish_slot` takes it.
async fn amqp_send(
    link: &mpsc::Sender<AmqpSend>,
    device: &str,
    message_id: String,
    payload: String,
) -> Option<(String, String)> {
    let message = Message {
        properties: Some(Properties {
            message_id: ferrohub_amqp::Value::String(message_id),
            to: Some(format!("/devices/{device}/messages/devicebound")),
            ..Default::default()
        }),
        body: Body::Data(vec![payload.into_bytes()]),
        ..Default::default()
    };
    let (done, outcome) = oneshot::channel();
    if link.send(AmqpSend { message, done }).await.is_err() {
        return Some(("c2d send: the AMQP sender is gone".into(), String::new()));
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, outcome).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(state))) => Some(("c2d send: not accepted over AMQP".into(), state)),
        Ok(Err(_)) => Some(("c2d send: the AMQP connection failed".into(), String::new())),
        Err(_) => Some(("c2d send: no disposition in time".into(), String::new())),
    }
}

/// The handle of every sender link (one per connection).
const SENDER: u32 = 1;

/// Owns one AMQP connection with one sender on `messages/devicebound`: sends what comes in as
/// the link's credit allows (one write for all that are ready), and hands each send its
/// disposition. Ends when every sender handle is dropped and nothing is in flight.
async fn amqp_sender(mut conn: Connection, mut rx: mpsc::Receiver<AmqpSend>) -> Result<()> {
    let credit = conn.attach_sender(SENDER, "/messages/devicebound").await?;
    // Serial numbers: the delivery-count we have reached, and what the credit lets us reach.
    let (mut sent, mut limit) = (0u32, credit);
    let mut queue: VecDeque<AmqpSend> = VecDeque::new();
    let mut pending: HashMap<u32, oneshot::Sender<Result<(), String>>> = HashMap::new();
    let mut perfs = Vec::new();
    let mut open = true;
    loop {
        let mut wrote = false;
        while limit.wrapping_sub(sent) > 0 && limit.wrapping_sub(sent) < u32::MAX / 2 {
            let Some(req) = queue.pop_front() else { break };
            conn.queue_message(SENDER, sent, &req.message);
            pending.insert(sent, req.done);
            sent = sent.wrapping_add(1);
            wrote = true;
        }
        if wrote {
            conn.flush().await?;
        }
        if !open && queue.is_empty() && pending.is_empty() {
            return Ok(());
        }
        tokio::select! {
            r = rx.recv(), if open => match r {
                Some(req) => queue.push_back(req),
                None => open = false,
            },
            r = conn.read_performatives(Duration::from_secs(1), &mut perfs) => { r?; }
        }
        while let Ok(req) = rx.try_recv() {
            queue.push_back(req);
        }
        for p in perfs.drain(..) {
            match p {
                Performative::Flow(f) if f.handle == Some(SENDER) => {
                    limit = f
                        .delivery_count
                        .unwrap_or(0)
                        .wrapping_add(f.link_credit.unwrap_or(0));
                }
                Performative::Disposition(d) if d.role => {
                    let last = d.last.unwrap_or(d.first);
                    let ids: Vec<u32> = pending
                        .keys()
                        .filter(|id| id.wrapping_sub(d.first) <= last.wrapping_sub(d.first))
                        .copied()
                        .collect();
                    let accepted = matches!(&d.state,
                        ferrohub_amqp::Value::Described(code, _) if code.as_u64() == Some(0x24));
                    for id in ids {
                        if let Some(done) = pending.remove(&id) {
                            let _ = done.send(if accepted {
                                Ok(())
                            } else {
                                Err(format!("{:?}", d.state))
                            });
                        }
                    }
                }
                Performative::Detach(d) => bail!("the server detached the sender: {:?}", d.error),
                _ => {}
            }
        }
    }
}

/// A device that PUBACKs every C2D message at once and records how long it took to arrive.
struct C2dDevice {
    shared: Arc<Shared>,
    topic_prefix: String,
    latency: Histogram<u64>,
    seen: HashSet<u64>,
    failures: Failures,
}

impl Role for C2dDevice {
    fn on_packet(
        &mut self,
        packet: Packet,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), String> {
        let p = match packet {
            Packet::Publish(p) if p.topic.starts_with(&self.topic_prefix) => p,
            other => {
                let what = format!("{other:?}");
                self.failures.add("device: unexpected packet", || what);
                return Ok(());
            }
        };
        if p.qos == QoS::AtLeastOnce {
            encode(&Packet::PubAck(p.packet_id), out)
                .map_err(|e| format!("encoding PUBACK: {e}"))?;
        } else {
            self.failures
                .add("device: C2D PUBLISH not at QoS 1", || p.topic.clone());
        }
        match parse_payload(&p.payload) {
            Some((seq, sent_us, measured)) => {
                if !self.seen.insert(seq) {
                    self.failures.add("device: message delivered twice", || {
                        format!("message {seq}")
                    });
                    return Ok(());
                }
                self.shared.delivered.fetch_add(1, Ordering::Relaxed);
                if measured {
                    let now_us = self.shared.schedule.micros(now);
                    record(
                        &mut self.latency,
                        Duration::from_micros(now_us.saturating_sub(sent_us)),
                    );
                }
            }
            None => self.failures.add("device: payload not ours", || {
                String::from_utf8_lossy(&p.payload[..p.payload.len().min(100)]).into_owned()
            }),
        }
        Ok(())
    }
}

pub async fn run(args: C2dArgs) -> Result<()> {
    args.validate()?;
    let push = &args.push;
    let via = match args.via {
        Via::Rest => format!("REST, at most {} sends in flight", args.http_inflight),
        Via::Amqp => format!(
            "AMQP, {} sender links of up to 100 unsettled sends",
            args.amqp_connections
        ),
    };
    println!(
        "c2d: {} devices, {:.0} sends/s offered (open loop, round-robin), {}-byte payloads, \
         over {via}, warm-up {} s, measured {} s",
        push.fleet.devices, push.rate, args.payload_bytes, push.warmup_secs, push.secs,
    );
    let fleet = push::fleet(push, args.http_inflight, |id| {
        vec![(
            format!("devices/{id}/messages/devicebound/#"),
            QoS::AtLeastOnce,
        )]
    })
    .await?;
    let service = Service::new(&fleet.hub, args.http_inflight, REQUEST_TIMEOUT)?;
    service
        .warm(
            &format!("/devices/{}", push.fleet.device_id(0)),
            args.http_warm.min(args.http_inflight),
        )
        .await
        .context("opening the REST connections")?;

    let mut amqp = Vec::new();
    let mut senders = Vec::new();
    if args.via == Via::Amqp {
        let ep = eventhub::endpoint(&fleet.hub, None, None).await?;
        for i in 0..args.amqp_connections {
            let mut conn = Connection::open(&ep, &format!("ferrohub-bench-c2d-{i}"))
                .await
                .context("opening an AMQP connection for C2D")?;
            conn.put_token(&ep.token(3600)?, &ep.audience()).await?;
            let (tx, rx) = mpsc::channel(1024);
            amqp.push(tx);
            senders.push(tokio::spawn(amqp_sender(conn, rx)));
        }
    }
    let schedule = Schedule::new(push);
    let shared = Arc::new(Shared {
        schedule,
        service,
        prefix: push.fleet.prefix.clone(),
        devices: push.fleet.devices as u64,
        payload_bytes: args.payload_bytes,
        permits: Arc::new(Semaphore::new(args.http_inflight)),
        progress: Progress::default(),
        offered: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        late: AtomicU64::new(0),
        rest: Mutex::new(histogram()),
        lag: Mutex::new(histogram()),
        failures: Mutex::new(Failures::default()),
        amqp,
    });
    let (close_tx, close_rx) = watch::channel(false);
    let devices: Vec<_> = fleet
        .devices
        .into_iter()
        .map(|conn| {
            let role = C2dDevice {
                shared: Arc::clone(&shared),
                topic_prefix: format!("devices/{}/messages/devicebound/", conn.id),
                latency: histogram(),
                seen: HashSet::new(),
                failures: Failures::default(),
            };
            tokio::spawn(push::drive(conn, role, close_rx.clone()))
        })
        .collect();

    let window = push::run_open_loop(
        &shared,
        schedule,
        push.rate,
        send,
        fleet.server_pid,
        "sends answered 200",
    )
    .await?;
    let drained = push::drain(DRAIN_TIMEOUT, || {
        shared.progress.outstanding.load(Ordering::Relaxed) == 0
            && shared.delivered.load(Ordering::Relaxed)
                >= shared.progress.completed.load(Ordering::Relaxed)
    })
    .await;
    // Receivers only fail if every device has already ended, which is fine.
    let _ = close_tx.send(true);
    for sender in senders {
        sender.abort();
    }

    let mut latency = histogram();
    let mut failures = Failures::default();
    let mut connections = Connections::default();
    for task in devices {
        let end: DeviceEnd<C2dDevice> = task.await.context("device task panicked")?;
        connections.add(&end);
        latency
            .add(&end.role.latency)
            .context("merging latency histograms")?;
        failures.merge(end.role.failures);
    }
    let accepted = shared.progress.completed.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let in_flight = shared.progress.outstanding.load(Ordering::Relaxed);
    failures.merge(std::mem::take(&mut *lock(&shared.failures)));
    failures.add_n(
        "c2d: accepted (200) but never delivered",
        accepted.saturating_sub(delivered),
        format!(
            "{} s after the run, {delivered} of {accepted} accepted messages had arrived",
            DRAIN_TIMEOUT.as_secs()
        ),
    );
    failures.add_n(
        "c2d send: no answer by the end",
        in_flight,
        format!("{in_flight} sends still in flight"),
    );
    let mut extra = Map::new();
    extra.insert("payload_bytes".into(), json!(args.payload_bytes));
    extra.insert("http_inflight".into(), json!(args.http_inflight));
    extra.insert(
        "via".into(),
        json!(format!("{:?}", args.via).to_lowercase()),
    );
    extra.insert("accepted_total".into(), json!(accepted));
    extra.insert("delivered_total".into(), json!(delivered));
    extra.insert("drained".into(), json!(drained));
    let summary =
        Summary {
            scenario: match args.via {
                Via::Rest => "c2d",
                Via::Amqp => "c2d-amqp",
            },
            unit: "sends",
            one: "message",
            devices: push.fleet.devices,
            rate: push.rate,
            warmup_secs: push.warmup_secs,
            window,
            offered: shared.offered.load(Ordering::Relaxed),
            succeeded: shared.succeeded.load(Ordering::Relaxed),
            late: shared.late.load(Ordering::Relaxed),
            lag: lock(&shared.lag).clone(),
            latencies: vec![
                Latency {
                    key: "delivery",
                    label: "C2D latency (send start -> device has the PUBLISH)",
                    histogram: latency,
                },
                Latency {
                    key: "rest",
                    label: match args.via {
                        Via::Rest => "REST send latency (request -> 200)",
                        Via::Amqp => "AMQP send latency (transfer -> Accepted)",
                    },
                    histogram: lock(&shared.rest).clone(),
                },
            ],
            failures,
            connections,
            server_pid: fleet.server_pid,
            notes: vec![format!(
            "deliveries: {delivered} distinct messages received of {accepted} accepted over the \
             whole run{}",
            if drained {
                String::new()
            } else {
                format!(" (not all within {} s after the run)", DRAIN_TIMEOUT.as_secs())
            }
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
    fn payload_round_trips_and_has_the_asked_length() {
        let p = payload_text(12345, 987_654_321, true, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(
            parse_payload(p.as_bytes()),
            Some((12345, 987_654_321, true))
        );
        // Shorter than the fields: the fields win.
        let p = payload_text(7, 8, false, 0);
        assert_eq!(parse_payload(p.as_bytes()), Some((7, 8, false)));
        assert_eq!(parse_payload(b"hello"), None);
    }
}
