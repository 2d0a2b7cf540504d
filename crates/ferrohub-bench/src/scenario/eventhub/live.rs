//! `eventhub-live`: devices publish QoS 1 telemetry at a fixed total rate (open loop, evenly
//! phased) while one AMQP receiver per partition sits at `@latest`; measures the latency from
//! the device's PUBLISH (its time, on the bench's clock, is the body's first 16 bytes) to the
//! event's arrival at the receiver, the PUBACK latency, the achieved rate and server CPU per
//! event (ingest, store and delivery together).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ferrohub_mqtt::{encode, Packet, Publish, QoS};
use hdrhistogram::Histogram;
use serde_json::{json, Map};
use tokio::sync::watch;

use super::{client, open_receivers, resolve, EventHubArgs, Management, Receiver, FROM_LATEST};
use crate::registry::FleetArgs;
use crate::scenario::push::{
    self, histogram, record, Connections, DeviceEnd, Failures, Latency, Progress, PushArgs, Role,
    Schedule, Summary, DRAIN_TIMEOUT, LATE,
};
use crate::scenario::telemetry::publisher::body as filler;

/// Digits of the send time (µs since the schedule's epoch) at the start of every body.
const STAMP: usize = 16;
/// The target: p99 end to end below this at 10,000 msgs/s.
const TARGET_P99_MS: f64 = 10.0;

#[derive(Debug, clap::Args)]
pub struct LiveArgs {
    #[command(flatten)]
    pub eh: EventHubArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// PUBLISHes per second over the whole fleet, on a fixed schedule.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Length of the measured window, after the warm-up.
    #[arg(long = "secs", visible_alias = "seconds", default_value_t = 10)]
    pub secs: u64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    #[arg(long, default_value_t = 256)]
    pub body_bytes: usize,
    /// PUBLISHes a device keeps unacknowledged at most; one due beyond it is skipped and
    /// counted as a failure.
    #[arg(long, default_value_t = 64)]
    pub max_inflight: usize,
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
}

/// What every device and receiver shares.
struct Shared {
    schedule: Schedule,
    /// Events received (completed), all phases.
    progress: Progress,
    /// PUBLISHes due in the window, and how many of those the receivers got.
    offered: AtomicU64,
    succeeded: AtomicU64,
    /// PUBLISHes sent and acknowledged over the whole run; events received.
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    /// Devices with PUBLISHes still to send.
    issuing: AtomicUsize,
}

/// A device publishing telemetry on its own schedule.
struct TelemetryDevice {
    shared: Arc<Shared>,
    topic: String,
    body: Vec<u8>,
    interval: Duration,
    next_due: Instant,
    max_inflight: usize,
    last_id: u16,
    /// Packet identifier -> when sent, and whether it was due in the window.
    unacked: HashMap<u16, (Instant, bool)>,
    puback: Histogram<u64>,
    lag: Histogram<u64>,
    late: u64,
    failures: Failures,
}

/// Writes `micros` as the body's first [`STAMP`] digits.
fn stamp(body: &mut [u8], micros: u64) {
    let digits = format!("{micros:0width$}", width = STAMP);
    body[..STAMP].copy_from_slice(&digits.as_bytes()[digits.len() - STAMP..]);
}

fn read_stamp(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body.get(..STAMP)?).ok()?.parse().ok()
}

impl Role for TelemetryDevice {
    fn due(&self) -> Option<Instant> {
        (self.next_due < self.shared.schedule.window_end).then_some(self.next_due)
    }

    fn on_due(&mut self, now: Instant, out: &mut BytesMut) -> Result<(), String> {
        let due = self.next_due;
        self.next_due += self.interval;
        if self.due().is_none() {
            self.shared.issuing.fetch_sub(1, Ordering::Relaxed);
        }
        let measured = self.shared.schedule.measured(due);
        if measured {
            self.shared.offered.fetch_add(1, Ordering::Relaxed);
            let lag = now.saturating_duration_since(due);
            if lag > LATE {
                self.late += 1;
            }
            record(&mut self.lag, lag);
        }
        if self.unacked.len() >= self.max_inflight {
            self.failures.add(
                "telemetry: skipped, too many PUBLISHes unacknowledged",
                || format!("{} in flight", self.max_inflight),
            );
            return Ok(());
        }
        let ids: std::collections::HashSet<u16> = self.unacked.keys().copied().collect();
        let packet_id = push::next_packet_id(&mut self.last_id, &ids);
        // The send time, not the due time: lateness is reported apart (lag), as twin-reported
        // does, and the latency is that of the hub.
        let mut body = self.body.clone();
        stamp(&mut body, self.shared.schedule.micros(now));
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: self.topic.clone(),
            packet_id,
            payload: Bytes::from(body),
        });
        encode(&publish, out).map_err(|e| format!("encoding PUBLISH: {e}"))?;
        self.unacked.insert(packet_id, (now, measured));
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn on_packet(
        &mut self,
        packet: Packet,
        now: Instant,
        _out: &mut BytesMut,
    ) -> Result<(), String> {
        match packet {
            Packet::PubAck(id) => match self.unacked.remove(&id) {
                Some((sent, measured)) => {
                    if measured {
                        record(&mut self.puback, now.saturating_duration_since(sent));
                    }
                    self.shared.acked.fetch_add(1, Ordering::Relaxed);
                }
                None => self
                    .failures
                    .add("device: PUBACK for nothing in flight", || id.to_string()),
            },
            other => {
                let what = format!("{other:?}");
                self.failures.add("device: unexpected packet", || what);
            }
        }
        Ok(())
    }
}

/// What one receiver measured.
struct ReceiverEnd {
    latency: Histogram<u64>,
    failures: Failures,
    error: Option<String>,
}

/// Reads events until told to close; each event's latency is its arrival minus its stamp.
async fn receive(
    mut r: Receiver,
    shared: Arc<Shared>,
    close: watch::Receiver<bool>,
) -> ReceiverEnd {
    let mut end = ReceiverEnd {
        latency: histogram(),
        failures: Failures::default(),
        error: None,
    };
    let mut events = Vec::with_capacity(r.prefetch as usize);
    let result: Result<()> = async {
        r.start().await?;
        // Polled between reads rather than raced against them: a read cancelled halfway
        // through settling would leave a half-written frame behind.
        while !*close.borrow() {
            events.clear();
            r.next(Duration::from_millis(100), &mut events).await?;
            if events.is_empty() {
                continue;
            }
            let now = shared.schedule.micros(Instant::now());
            let mut measured = 0;
            for e in &events {
                let Some(sent) = client::body(&e.delivery.message).and_then(read_stamp) else {
                    end.failures
                        .add("receiver: event without the bench's stamp", || {
                            format!("partition {} sequence {}", r.partition, e.sequence)
                        });
                    continue;
                };
                let at = shared.schedule.epoch + Duration::from_micros(sent);
                if shared.schedule.measured(at) {
                    record(
                        &mut end.latency,
                        Duration::from_micros(now.saturating_sub(sent)),
                    );
                    measured += 1;
                }
            }
            let n = events.len() as u64;
            shared.received.fetch_add(n, Ordering::Relaxed);
            shared.succeeded.fetch_add(measured, Ordering::Relaxed);
            shared.progress.completed.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            if let Err(e) = r.close().await {
                end.error = Some(format!("closing: {e:#}"));
            }
        }
        Err(e) => end.error = Some(format!("{e:#}")),
    }
    end
}

pub async fn run(args: LiveArgs) -> Result<()> {
    if args.body_bytes < STAMP + 8 || args.body_bytes > 256 * 1024 {
        bail!("--body-bytes must be between {} and 262144", STAMP + 8);
    }
    if args.max_inflight == 0 || args.max_inflight > 65_534 {
        bail!("--max-inflight must be between 1 and 65534");
    }
    let push_args = PushArgs {
        hub: args.eh.hub.clone(),
        fleet: args.fleet.clone(),
        rate: args.rate,
        secs: args.secs,
        warmup_secs: args.warmup_secs,
        connect_concurrency: args.connect_concurrency,
        connect_timeout_secs: args.connect_timeout_secs,
    };
    push_args.validate()?;
    let n = args.fleet.devices;
    let (_, ep) = resolve(&args.eh).await?;
    let mut mgmt = Management::open(&ep).await?;
    let partitions = mgmt.partition_count(&ep).await?;
    mgmt.close().await?;
    println!(
        "eventhub-live: {n} devices, {:.0} QoS 1 msgs/s in all ({:.2}/s each, evenly phased), \
         {}-byte bodies; {partitions} receivers at @latest on amqps://{}/{} ({}), prefetch {}, \
         settle {:?}; warm-up {} s, measured {} s",
        args.rate,
        args.rate / n as f64,
        args.body_bytes,
        ep.host,
        ep.entity,
        ep.addr,
        args.eh.prefetch,
        args.eh.settle,
        args.warmup_secs,
        args.secs
    );
    let receivers = open_receivers(&ep, &args.eh, partitions, FROM_LATEST).await?;
    let fleet = push::fleet(&push_args, partitions as usize + 8, |id| {
        vec![(
            format!("devices/{id}/messages/devicebound/#"),
            QoS::AtLeastOnce,
        )]
    })
    .await?;

    let schedule = Schedule::new(&push_args);
    let shared = Arc::new(Shared {
        schedule,
        progress: Progress::default(),
        offered: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        received: AtomicU64::new(0),
        issuing: AtomicUsize::new(0),
    });
    let (close_tx, close_rx) = watch::channel(false);
    let receiving: Vec<_> = receivers
        .into_iter()
        .map(|r| tokio::spawn(receive(r, Arc::clone(&shared), close_rx.clone())))
        .collect();
    let interval = Duration::from_secs_f64(n as f64 / args.rate);
    let body = filler(args.body_bytes).to_vec();
    let devices: Vec<_> = fleet
        .devices
        .into_iter()
        .map(|conn| {
            let next_due = schedule.start + interval.mul_f64(conn.index as f64 / n as f64);
            if next_due < schedule.window_end {
                shared.issuing.fetch_add(1, Ordering::Relaxed);
            }
            let role = TelemetryDevice {
                shared: Arc::clone(&shared),
                topic: format!("devices/{}/messages/events/", conn.id),
                body: body.clone(),
                interval,
                next_due,
                max_inflight: args.max_inflight,
                last_id: 0,
                unacked: HashMap::new(),
                puback: histogram(),
                lag: histogram(),
                late: 0,
                failures: Failures::default(),
            };
            tokio::spawn(push::drive(conn, role, close_rx.clone()))
        })
        .collect();

    let window = push::measure(
        schedule.window_start,
        schedule.window_end,
        &shared.progress.completed,
        fleet.server_pid,
        "events received",
    )
    .await?;
    let drained = push::drain(DRAIN_TIMEOUT, || {
        shared.issuing.load(Ordering::Relaxed) == 0
            && shared.acked.load(Ordering::Relaxed) == shared.sent.load(Ordering::Relaxed)
            && shared.received.load(Ordering::Relaxed) >= shared.sent.load(Ordering::Relaxed)
    })
    .await;
    let _ = close_tx.send(true);

    let mut failures = Failures::default();
    let mut connections = Connections::default();
    let (mut puback, mut lag, mut late) = (histogram(), histogram(), 0);
    for task in devices {
        let end: DeviceEnd<TelemetryDevice> = task.await.context("device task panicked")?;
        connections.add(&end);
        let role = end.role;
        puback.add(&role.puback).context("merging histograms")?;
        lag.add(&role.lag).context("merging histograms")?;
        late += role.late;
        failures.merge(role.failures);
    }
    let mut latency = histogram();
    for task in receiving {
        let end = task.await.context("receiver task panicked")?;
        latency.add(&end.latency).context("merging histograms")?;
        failures.merge(end.failures);
        if let Some(e) = end.error {
            failures.add("receiver failed", || e);
        }
    }
    let (sent, acked, received) = (
        shared.sent.load(Ordering::Relaxed),
        shared.acked.load(Ordering::Relaxed),
        shared.received.load(Ordering::Relaxed),
    );
    failures.add_n(
        "telemetry: PUBLISH never acknowledged",
        sent - acked.min(sent),
        format!("{} of {sent}", sent - acked.min(sent)),
    );
    failures.add_n(
        "telemetry: event never received",
        sent.saturating_sub(received),
        format!("{received} of {sent} received"),
    );
    let p99 = if latency.is_empty() {
        f64::NAN
    } else {
        latency.value_at_percentile(99.0) as f64 / 1000.0
    };
    let mut extra = Map::new();
    extra.insert("partitions".into(), json!(partitions));
    extra.insert("prefetch".into(), json!(args.eh.prefetch));
    extra.insert(
        "settle".into(),
        json!(format!("{:?}", args.eh.settle).to_lowercase()),
    );
    extra.insert("sent_total".into(), json!(sent));
    extra.insert("acked_total".into(), json!(acked));
    extra.insert("received_total".into(), json!(received));
    extra.insert("drained".into(), json!(drained));
    let met = p99 < TARGET_P99_MS && failures.total() == 0;
    let summary = Summary {
        scenario: "eventhub-live",
        unit: "events",
        one: "event",
        devices: n,
        rate: args.rate,
        warmup_secs: args.warmup_secs,
        window,
        offered: shared.offered.load(Ordering::Relaxed),
        succeeded: shared.succeeded.load(Ordering::Relaxed),
        late,
        lag,
        latencies: vec![
            Latency {
                key: "event",
                label: "end to end (device PUBLISH -> event at the AMQP receiver)",
                histogram: latency,
            },
            Latency {
                key: "puback",
                label: "PUBACK (device PUBLISH -> PUBACK, stored)",
                histogram: puback,
            },
        ],
        failures,
        connections,
        server_pid: fleet.server_pid,
        notes: vec![format!(
            "sent {sent}, acknowledged {acked}, received {received}; target p99 < \
             {TARGET_P99_MS} ms end to end: {}",
            if met { "met" } else { "NOT met" }
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
    fn stamps_round_trip_in_the_body() {
        let mut body = filler(64).to_vec();
        stamp(&mut body, 12_345_678);
        assert_eq!(read_stamp(&body), Some(12_345_678));
        assert_eq!(&body[..STAMP], b"0000000012345678");
        assert_eq!(&body[STAMP..], &filler(64)[STAMP..]);
        assert_eq!(read_stamp(b"not a stamp at all"), None);
    }
}
