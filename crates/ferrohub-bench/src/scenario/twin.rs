//! `twin-reported`: devices publish reported-property patches (QoS 1) at a fixed aggregate rate
//! spread evenly over them (open loop); measures the latency from the device's PUBLISH to the
//! hub's `$iothub/twin/res/204` answer, which the hub sends once the patch is durable, achieved
//! patches per second and server CPU per patch.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use ferrohub_mqtt::{encode, Packet, Publish, QoS};
use hdrhistogram::Histogram;
use serde_json::{json, Map};
use tokio::sync::watch;

use super::push::{
    self, histogram, record, topic_param, Connections, DeviceEnd, Failures, Latency, Progress,
    PushArgs, Role, Schedule, Summary, DRAIN_TIMEOUT, LATE,
};

const PATCH_PREFIX: &str = "$iothub/twin/PATCH/properties/reported/?$rid=";
const RESPONSE_PREFIX: &str = "$iothub/twin/res/";
/// Patches a device keeps unanswered at most; one due beyond it is skipped and counted as a
/// failure (the hub answers each device's patches in order, so a backlog only grows).
const MAX_OUTSTANDING: usize = 1000;

#[derive(Debug, clap::Args)]
pub struct TwinArgs {
    #[command(flatten)]
    pub push: PushArgs,
}

/// What every device shares.
struct Shared {
    schedule: Schedule,
    /// Patches answered 204 (completed) and under way.
    progress: Progress,
    /// Patches due in the window, and how many of them were answered 204.
    offered: AtomicU64,
    succeeded: AtomicU64,
    /// Devices with patches still to send: the run is not over while one is left, even if every
    /// patch sent so far has been answered.
    issuing: AtomicUsize,
    /// Patch PUBLISHes the hub has not PUBACKed yet, over all devices.
    unacked: AtomicU64,
}

/// A patch waiting for its answer.
struct Pending {
    sent: Instant,
    measured: bool,
}

/// A device publishing reported patches on its own schedule and timing the hub's answers.
struct TwinDevice {
    shared: Arc<Shared>,
    interval: Duration,
    next_due: Instant,
    last_rid: u64,
    pending: HashMap<u64, Pending>,
    last_id: u16,
    /// Packet identifiers of patches the hub has not PUBACKed yet.
    unacked: HashSet<u16>,
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    late: u64,
    failures: Failures,
}

impl TwinDevice {
    /// A device sending its first patch at `next_due`, then one every `interval`.
    fn new(shared: Arc<Shared>, interval: Duration, next_due: Instant) -> Self {
        Self {
            shared,
            interval,
            next_due,
            last_rid: 0,
            pending: HashMap::new(),
            last_id: 0,
            unacked: HashSet::new(),
            latency: histogram(),
            lag: histogram(),
            late: 0,
            failures: Failures::default(),
        }
    }

    fn next_id(&mut self) -> u16 {
        push::next_packet_id(&mut self.last_id, &self.unacked)
    }

    fn answer(&mut self, topic: &str, body: &[u8], now: Instant) {
        let status = topic[RESPONSE_PREFIX.len()..]
            .split('/')
            .next()
            .and_then(|s| s.parse::<u16>().ok());
        let rid = topic_param(topic, "$rid").and_then(|r| r.parse::<u64>().ok());
        let (Some(status), Some(rid)) = (status, rid) else {
            self.failures
                .add("device: twin response without status or $rid", || {
                    topic.to_owned()
                });
            return;
        };
        let Some(pending) = self.pending.remove(&rid) else {
            self.failures
                .add("device: twin response for no patch of ours", || {
                    topic.to_owned()
                });
            return;
        };
        let ok = status == 204;
        if ok {
            if pending.measured {
                record(
                    &mut self.latency,
                    now.saturating_duration_since(pending.sent),
                );
                self.shared.succeeded.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.failures
                .add(format!("twin patch: status {status}"), || {
                    format!(
                        "{topic}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    )
                });
        }
        self.shared.progress.finished(ok);
    }
}

impl Role for TwinDevice {
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
        if self.pending.len() >= MAX_OUTSTANDING {
            self.failures
                .add("twin patch: skipped, device backlog full", || {
                    format!("{MAX_OUTSTANDING} patches unanswered")
                });
            return Ok(());
        }
        self.last_rid += 1;
        let rid = self.last_rid;
        let packet_id = self.next_id();
        let patch = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("{PATCH_PREFIX}{rid}"),
            packet_id,
            payload: Bytes::from(json!({"bench": {"seq": rid}}).to_string()),
        });
        encode(&patch, out).map_err(|e| format!("encoding the patch: {e}"))?;
        self.unacked.insert(packet_id);
        self.shared.unacked.fetch_add(1, Ordering::Relaxed);
        self.pending.insert(
            rid,
            Pending {
                sent: now,
                measured,
            },
        );
        self.shared.progress.started();
        Ok(())
    }

    fn on_packet(
        &mut self,
        packet: Packet,
        now: Instant,
        _out: &mut BytesMut,
    ) -> Result<(), String> {
        match packet {
            Packet::Publish(p) if p.topic.starts_with(RESPONSE_PREFIX) => {
                self.answer(&p.topic, &p.payload, now)
            }
            Packet::PubAck(id) if self.unacked.remove(&id) => {
                self.shared.unacked.fetch_sub(1, Ordering::Relaxed);
            }
            other => {
                let what = format!("{other:?}");
                self.failures.add("device: unexpected packet", || what);
            }
        }
        Ok(())
    }
}

pub async fn run(args: TwinArgs) -> Result<()> {
    let push = &args.push;
    push.validate()?;
    let n = push.fleet.devices;
    println!(
        "twin-reported: {n} devices, {:.0} reported patches/s offered in all ({:.2}/s each, \
         evenly phased), QoS 1, warm-up {} s, measured {} s",
        push.rate,
        push.rate / n as f64,
        push.warmup_secs,
        push.secs,
    );
    let fleet = push::fleet(push, 0, |_| {
        vec![(format!("{RESPONSE_PREFIX}#"), QoS::AtMostOnce)]
    })
    .await?;

    let schedule = Schedule::new(push);
    let shared = Arc::new(Shared {
        schedule,
        progress: Progress::default(),
        offered: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        issuing: AtomicUsize::new(0),
        unacked: AtomicU64::new(0),
    });
    // Each device offers rate/N, phase-shifted by i/N of its interval so the total is even.
    let interval = Duration::from_secs_f64(n as f64 / push.rate);
    let (close_tx, close_rx) = watch::channel(false);
    let devices: Vec<_> = fleet
        .devices
        .into_iter()
        .map(|conn| {
            let next_due = schedule.start + interval.mul_f64(conn.index as f64 / n as f64);
            if next_due < schedule.window_end {
                shared.issuing.fetch_add(1, Ordering::Relaxed);
            }
            let role = TwinDevice::new(Arc::clone(&shared), interval, next_due);
            tokio::spawn(push::drive(conn, role, close_rx.clone()))
        })
        .collect();

    let window = push::measure(
        schedule.window_start,
        schedule.window_end,
        &shared.progress.completed,
        fleet.server_pid,
        "patches answered 204",
    )
    .await?;
    let drained = push::drain(DRAIN_TIMEOUT, || {
        shared.issuing.load(Ordering::Relaxed) == 0
            && shared.progress.outstanding.load(Ordering::Relaxed) == 0
            && shared.unacked.load(Ordering::Relaxed) == 0
    })
    .await;
    let _ = close_tx.send(true);

    let mut latency = histogram();
    let mut lag = histogram();
    let mut late = 0;
    let mut failures = Failures::default();
    let mut connections = Connections::default();
    let (mut unanswered, mut unacked) = (0, 0);
    for task in devices {
        let end: DeviceEnd<TwinDevice> = task.await.context("device task panicked")?;
        connections.add(&end);
        let role = end.role;
        latency
            .add(&role.latency)
            .context("merging latency histograms")?;
        lag.add(&role.lag).context("merging lag histograms")?;
        late += role.late;
        unanswered += role.pending.len() as u64;
        unacked += role.unacked.len() as u64;
        failures.merge(role.failures);
    }
    failures.add_n(
        "twin patch: no answer by the end",
        unanswered,
        format!("{unanswered} patches unanswered"),
    );
    failures.add_n(
        "twin patch: PUBLISH never acknowledged",
        unacked,
        format!("{unacked} PUBLISHes"),
    );
    let mut extra = Map::new();
    extra.insert("drained".into(), json!(drained));
    let summary = Summary {
        scenario: "twin-reported",
        unit: "patches",
        one: "patch",
        devices: n,
        rate: push.rate,
        warmup_secs: push.warmup_secs,
        window,
        offered: shared.offered.load(Ordering::Relaxed),
        succeeded: shared.succeeded.load(Ordering::Relaxed),
        late,
        lag,
        latencies: vec![Latency {
            key: "patch",
            label: "reported patch latency (device PUBLISH -> 204 answer)",
            histogram: latency,
        }],
        failures,
        connections,
        server_pid: fleet.server_pid,
        notes: Vec::new(),
        extra,
    };
    summary.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(now: Instant) -> TwinDevice {
        let shared = Arc::new(Shared {
            schedule: Schedule {
                epoch: now,
                start: now,
                window_start: now,
                window_end: now + Duration::from_secs(1),
            },
            progress: Progress::default(),
            offered: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            issuing: AtomicUsize::new(1),
            unacked: AtomicU64::new(0),
        });
        TwinDevice::new(shared, Duration::from_millis(200), now)
    }

    #[test]
    fn a_patch_is_timed_until_its_204() -> Result<(), String> {
        let now = Instant::now();
        let mut d = device(now);
        let mut out = BytesMut::new();
        d.on_due(now, &mut out)?;
        assert_eq!(d.due(), Some(now + Duration::from_millis(200)));
        let id = match ferrohub_mqtt::decode(&mut out, 1 << 16) {
            Ok(Some(Packet::Publish(p))) => {
                assert_eq!(p.topic, format!("{PATCH_PREFIX}1"));
                assert_eq!(p.qos, QoS::AtLeastOnce);
                p.packet_id
            }
            other => return Err(format!("expected a PUBLISH, got {other:?}")),
        };
        d.on_packet(Packet::PubAck(id), now, &mut out)?;
        let answer = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "$iothub/twin/res/204/?$rid=1&$version=2".into(),
            packet_id: 0,
            payload: Bytes::new(),
        });
        d.on_packet(answer, now + Duration::from_millis(3), &mut out)?;
        assert!(d.pending.is_empty() && d.unacked.is_empty());
        assert_eq!(d.latency.len(), 1);
        assert_eq!(d.shared.succeeded.load(Ordering::Relaxed), 1);
        assert_eq!(d.shared.progress.completed.load(Ordering::Relaxed), 1);
        assert_eq!(d.failures.total(), 0);
        Ok(())
    }

    #[test]
    fn an_error_answer_is_a_failure() -> Result<(), String> {
        let now = Instant::now();
        let mut d = device(now);
        let mut out = BytesMut::new();
        d.on_due(now, &mut out)?;
        d.answer("$iothub/twin/res/400/?$rid=1", b"{}", now);
        assert_eq!(d.failures.total(), 1);
        assert!(d.latency.is_empty());
        d.answer("$iothub/twin/res/204/?$rid=99", b"", now);
        assert_eq!(d.failures.total(), 2);
        Ok(())
    }

    #[test]
    fn the_last_patch_of_the_window_ends_the_device_s_issuing() -> Result<(), String> {
        let now = Instant::now();
        let mut d = device(now);
        d.next_due = now + Duration::from_millis(900);
        d.on_due(d.next_due, &mut BytesMut::new())?;
        assert_eq!(d.due(), None);
        assert_eq!(d.shared.issuing.load(Ordering::Relaxed), 0);
        assert_eq!(d.shared.unacked.load(Ordering::Relaxed), 1);
        assert_eq!(d.shared.progress.outstanding.load(Ordering::Relaxed), 1);
        Ok(())
    }
}
