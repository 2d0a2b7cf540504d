//! Filling the telemetry log for `eventhub-read` through the real server: a few devices publish
//! exactly the asked number of QoS 1 messages between them over MQTT/TLS, many in flight each,
//! shared so that every partition gets the same number; done once every PUBLISH was
//! acknowledged, that is stored durably.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use ferrohub_iothub::sas::generate_key;
use ferrohub_mqtt::{decode, Packet};
use ferrohub_store::telemetry::partition_for;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::device::{self, Connector, MqttStream};
use crate::hub::Hub;
use crate::registry::{self, FleetArgs};
use crate::scenario::push::next_packet_id;
use crate::scenario::telemetry::publisher::{body, publish_template};
use crate::scenario::telemetry::target::connect_all;

/// A device whose PUBACKs stop coming for this long fails the fill.
const STALL: Duration = Duration::from_secs(30);
/// A PUBACK is 4 bytes; anything near this is not an MQTT server.
const MAX_INBOUND_PACKET: usize = 4096;

/// How to fill.
pub struct Fill<'a> {
    pub hub: &'a Hub,
    pub fleet: &'a FleetArgs,
    pub partitions: u32,
    pub events: u64,
    pub inflight: usize,
    pub body_bytes: usize,
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
}

/// How long the publishing took (connected devices to the last PUBACK).
pub struct Filled {
    pub secs: f64,
}

/// How many messages each device publishes so that each partition receives `events /
/// partitions` (the remainder to the first ones).
fn quotas(fleet: &FleetArgs, partitions: u32, events: u64) -> Result<Vec<u64>> {
    let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for i in 0..fleet.devices {
        by_partition
            .entry(partition_for(&fleet.device_id(i), partitions))
            .or_default()
            .push(i);
    }
    if by_partition.len() < partitions as usize {
        bail!(
            "the {} fill devices fall into only {} of the {partitions} partitions; pass more \
             --fill-devices",
            fleet.devices,
            by_partition.len()
        );
    }
    let mut quotas = vec![0u64; fleet.devices];
    let p64 = u64::from(partitions);
    for (p, devices) in by_partition {
        let share = events / p64 + u64::from(u64::from(p) < events % p64);
        let n = devices.len() as u64;
        for (k, i) in devices.into_iter().enumerate() {
            quotas[i] = share / n + u64::from((k as u64) < share % n);
        }
    }
    Ok(quotas)
}

pub async fn fill(f: Fill<'_>) -> Result<Filled> {
    let quotas = quotas(f.fleet, f.partitions, f.events)?;
    let device_key = generate_key();
    let registration = registry::register(f.hub, f.fleet, &device_key).await?;
    println!(
        "fill: {} devices registered in {:.2} s",
        f.fleet.devices,
        registration.elapsed.as_secs_f64()
    );
    let connector = Connector::new(f.hub, device_key, false, f.connect_timeout).await?;
    let streams = connect_all(Arc::new(connector), f.fleet, f.connect_concurrency).await?;
    let body = body(f.body_bytes);
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let topic = format!("devices/{}/messages/events/", f.fleet.device_id(i));
        let (template, id_offset) = publish_template(topic, body.clone())?;
        let (count, inflight, acked) = (quotas[i], f.inflight, Arc::clone(&acked));
        let id = f.fleet.device_id(i);
        tasks.push(tokio::spawn(async move {
            publish(stream, &template, id_offset, count, inflight, &acked)
                .await
                .with_context(|| format!("fill device {id}"))
        }));
    }
    let progress = {
        let acked = Arc::clone(&acked);
        let total = f.events;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "  … fill: {} of {total} acknowledged",
                    acked.load(Ordering::Relaxed)
                );
            }
        })
    };
    let mut result = Ok(());
    for t in tasks {
        let r = t.await.context("fill task panicked").and_then(|r| r);
        if result.is_ok() {
            result = r;
        }
    }
    progress.abort();
    result?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fill: {} QoS 1 messages of {} bytes acknowledged in {secs:.2} s ({:.0} msgs/s), {} in \
         flight per device",
        f.events,
        f.body_bytes,
        f.events as f64 / secs,
        f.inflight
    );
    Ok(Filled { secs })
}

/// Publishes `count` copies of `template` (patching the packet identifier), at most `inflight`
/// unacknowledged, then disconnects.
async fn publish(
    mut stream: MqttStream,
    template: &[u8],
    id_offset: usize,
    count: u64,
    inflight: usize,
    acked: &AtomicU64,
) -> Result<()> {
    let mut in_flight: HashSet<u16> = HashSet::with_capacity(inflight);
    let mut last_id = 0u16;
    let (mut sent, mut done) = (0u64, 0u64);
    let mut out = BytesMut::with_capacity(template.len() * inflight.min(64));
    let mut input = BytesMut::with_capacity(4096);
    while done < count {
        while sent < count && in_flight.len() < inflight {
            let id = next_packet_id(&mut last_id, &in_flight);
            let at = out.len();
            out.extend_from_slice(template);
            out[at + id_offset..at + id_offset + 2].copy_from_slice(&id.to_be_bytes());
            in_flight.insert(id);
            sent += 1;
        }
        if !out.is_empty() {
            let write = async {
                stream.write_all(&out).await?;
                stream.flush().await
            };
            tokio::time::timeout(STALL, write)
                .await
                .context("the server took no PUBLISH for 30 s")?
                .context("writing PUBLISH")?;
            out.clear();
        }
        let n = tokio::time::timeout(STALL, stream.read_buf(&mut input))
            .await
            .with_context(|| format!("no PUBACK for 30 s ({done} of {count} acknowledged)"))?
            .context("reading PUBACKs")?;
        if n == 0 {
            bail!("the server closed the connection ({done} of {count} acknowledged)");
        }
        let before = done;
        while let Some(packet) = decode(&mut input, MAX_INBOUND_PACKET)? {
            match packet {
                Packet::PubAck(id) if in_flight.remove(&id) => done += 1,
                other => bail!("expected a PUBACK, got {other:?}"),
            }
        }
        acked.fetch_add(done - before, Ordering::Relaxed);
    }
    device::disconnect(stream).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_give_every_partition_the_same_share() -> Result<()> {
        let fleet = FleetArgs {
            devices: 16,
            prefix: "fill-".into(),
            register_concurrency: 1,
        };
        let q = quotas(&fleet, 4, 1_000_003)?;
        assert_eq!(q.iter().sum::<u64>(), 1_000_003);
        let mut per_partition = [0u64; 4];
        for (i, n) in q.iter().enumerate() {
            per_partition[partition_for(&fleet.device_id(i), 4) as usize] += n;
        }
        assert_eq!(per_partition, [250_001, 250_001, 250_001, 250_000]);
        let one = FleetArgs {
            devices: 1,
            ..fleet
        };
        assert!(quotas(&one, 4, 100).is_err());
        Ok(())
    }
}
