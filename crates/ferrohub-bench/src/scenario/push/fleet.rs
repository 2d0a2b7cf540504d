//! The fleet: registering the devices, connecting and subscribing them all, and the task that
//! runs each connected device in the role its scenario gives it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use ferrohub_iothub::sas::generate_key;
use ferrohub_mqtt::{decode, encode, Packet, QoS, Subscribe, SubscribeReturnCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::sleep_until;

use super::{Failures, PushArgs};
use crate::device::{self, CloseOutcome, Connector, MqttStream};
use crate::hub::Hub;
use crate::procfs;
use crate::registry::{self, FleetArgs};
use crate::scenario::ensure_descriptors;

/// C2D topics carry the whole property bag; 64 KiB is far above anything the scenarios send.
pub const MAX_INBOUND_PACKET: usize = 64 * 1024;

/// A connected device, subscribed, with whatever it has read past its SUBACK.
pub struct DeviceConn {
    pub index: usize,
    pub id: String,
    stream: MqttStream,
    input: BytesMut,
}

/// The hub, its registered devices (all connected and subscribed) and the server to measure.
pub struct Fleet {
    pub hub: Hub,
    pub devices: Vec<DeviceConn>,
    pub server_pid: Option<u32>,
}

/// Registers the devices, connects them all and subscribes each to `filters(device_id)`.
/// Any failed connect or refused subscription fails the run: figures from part of the fleet
/// would describe a different load.
pub async fn fleet(
    args: &PushArgs,
    extra_descriptors: usize,
    filters: fn(&str) -> Vec<(String, QoS)>,
) -> Result<Fleet> {
    let n = args.fleet.devices;
    let nofile = ensure_descriptors(n + extra_descriptors)?;
    let hub = Hub::resolve(&args.hub)?;
    println!(
        "hub: HostName {}, REST https://{}, CA {}, open-file limit {nofile}",
        hub.host_name,
        hub.rest_authority,
        hub.ca_file.display(),
    );
    if let Some(pid) = hub.server_pid {
        procfs::sample(pid).with_context(|| {
            format!("measuring server pid {pid} (is it running? --server-pid overrides hub.json)")
        })?;
    }
    let device_key = generate_key();
    let registration = registry::register(&hub, &args.fleet, &device_key).await?;
    println!(
        "registration: {n} devices in {:.2} s: {} created, {} already existed (key replaced)",
        registration.elapsed.as_secs_f64(),
        registration.created,
        registration.overwritten,
    );
    let timeout = Duration::from_secs(args.connect_timeout_secs);
    let connector = Arc::new(Connector::new(&hub, device_key, false, timeout).await?);
    let connecting = Instant::now();
    let devices = connect_all(
        connector,
        &args.fleet,
        args.connect_concurrency,
        timeout,
        filters,
    )
    .await?;
    println!(
        "connected and subscribed: {n} devices in {:.2} s; server pid {}",
        connecting.elapsed().as_secs_f64(),
        hub.server_pid.map_or_else(
            || "unknown (no server figures)".to_owned(),
            |p| p.to_string()
        )
    );
    Ok(Fleet {
        server_pid: hub.server_pid,
        hub,
        devices,
    })
}

async fn connect_all(
    connector: Arc<Connector>,
    fleet: &FleetArgs,
    concurrency: usize,
    timeout: Duration,
    filters: fn(&str) -> Vec<(String, QoS)>,
) -> Result<Vec<DeviceConn>> {
    let n = fleet.devices;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, n) {
        let (connector, next, fleet) = (Arc::clone(&connector), Arc::clone(&next), fleet.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut failures = Failures::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= n {
                    return (done, failures);
                }
                let id = fleet.device_id(index);
                let stream = match connector.connect(&id).await {
                    Ok(s) => s,
                    Err(f) => {
                        failures.add(f.category(), || format!("{id}: {f}"));
                        continue;
                    }
                };
                let mut conn = DeviceConn {
                    index,
                    id,
                    stream,
                    input: BytesMut::with_capacity(1024),
                };
                let filters = filters(&conn.id);
                // The SUBACK gets as long as a connect.
                let subscribed = tokio::time::timeout(timeout, conn.subscribe(filters))
                    .await
                    .unwrap_or_else(|_| Err("no SUBACK within the connect timeout".into()));
                match subscribed {
                    Ok(()) => done.push(conn),
                    Err(e) => failures.add("subscribe", || format!("{}: {e}", conn.id)),
                }
            }
        }));
    }
    let mut devices = Vec::with_capacity(n);
    let mut failures = Failures::default();
    for worker in workers {
        let (done, failed) = worker.await.context("connect worker panicked")?;
        devices.extend(done);
        failures.merge(failed);
    }
    if failures.total() > 0 {
        let lines: Vec<String> = failures
            .0
            .iter()
            .map(|(kind, (count, example))| format!("{kind} x{count} (e.g. {example})"))
            .collect();
        bail!(
            "{} of {n} devices failed to connect and subscribe: {}",
            n - devices.len(),
            lines.join("; ")
        );
    }
    devices.sort_unstable_by_key(|d| d.index);
    Ok(devices)
}

impl DeviceConn {
    async fn subscribe(&mut self, filters: Vec<(String, QoS)>) -> Result<(), String> {
        let count = filters.len();
        let mut buf = BytesMut::with_capacity(256);
        encode(
            &Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters,
            }),
            &mut buf,
        )
        .map_err(|e| format!("encoding SUBSCRIBE: {e}"))?;
        self.stream
            .write_all(&buf)
            .await
            .map_err(|e| format!("writing SUBSCRIBE: {e}"))?;
        self.stream
            .flush()
            .await
            .map_err(|e| format!("writing SUBSCRIBE: {e}"))?;
        loop {
            match decode(&mut self.input, MAX_INBOUND_PACKET) {
                Ok(Some(Packet::SubAck(ack))) if ack.packet_id == 1 => {
                    if ack.return_codes.len() != count
                        || ack.return_codes.contains(&SubscribeReturnCode::Failure)
                    {
                        return Err(format!("subscription refused: {:?}", ack.return_codes));
                    }
                    return Ok(());
                }
                Ok(Some(other)) => return Err(format!("expected SUBACK, got {other:?}")),
                Ok(None) => {}
                Err(e) => return Err(format!("undecodable packet: {e}")),
            }
            match self.stream.read_buf(&mut self.input).await {
                Ok(0) => return Err("server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading SUBACK: {e}")),
            }
        }
    }
}

/// What a simulated device does: answer what the hub pushes and, for some scenarios, send on a
/// schedule of its own.
pub trait Role: Send + 'static {
    /// When the device next wants to send unprompted; None when it only reacts.
    fn due(&self) -> Option<Instant> {
        None
    }

    /// Called when `due` has passed (repeatedly until it lies in the future, or is None):
    /// queue what to send into `out`, and move `due` on.
    fn on_due(&mut self, _now: Instant, _out: &mut BytesMut) -> Result<(), String> {
        Ok(())
    }

    /// One packet from the hub, read at `now`; queue any answer into `out`. An error ends the
    /// device's connection.
    fn on_packet(&mut self, packet: Packet, now: Instant, out: &mut BytesMut)
        -> Result<(), String>;
}

/// How a device's run ended, with its role (holding what it measured).
pub struct DeviceEnd<R> {
    pub id: String,
    pub role: R,
    /// Why the connection ended before the bench closed it.
    pub error: Option<String>,
    pub close: Option<CloseOutcome>,
}

/// Runs a device until `close` is signalled (then DISCONNECTs) or its connection fails.
pub async fn drive<R: Role>(
    conn: DeviceConn,
    mut role: R,
    mut close: watch::Receiver<bool>,
) -> DeviceEnd<R> {
    let DeviceConn {
        id,
        mut stream,
        mut input,
        ..
    } = conn;
    let mut out = BytesMut::with_capacity(1024);
    let result: Result<(), String> = async {
        loop {
            let now = Instant::now();
            loop {
                match decode(&mut input, MAX_INBOUND_PACKET) {
                    Ok(Some(packet)) => role.on_packet(packet, now, &mut out)?,
                    Ok(None) => break,
                    Err(e) => return Err(format!("undecodable packet: {e}")),
                }
            }
            while let Some(due) = role.due() {
                if due > now {
                    break;
                }
                role.on_due(now, &mut out)?;
            }
            if !out.is_empty() {
                stream
                    .write_all(&out)
                    .await
                    .map_err(|e| format!("writing: {e}"))?;
                stream.flush().await.map_err(|e| format!("writing: {e}"))?;
                out.clear();
            }
            let wake = role.due();
            tokio::select! {
                read = stream.read_buf(&mut input) => match read {
                    Ok(0) => return Err("server closed the connection".to_owned()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading: {e}")),
                },
                _ = sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {}
                _ = close.changed() => return Ok(()),
            }
        }
    }
    .await;
    match result {
        Ok(()) => DeviceEnd {
            id,
            role,
            error: None,
            close: Some(device::disconnect(stream).await),
        },
        Err(e) => DeviceEnd {
            id,
            role,
            error: Some(e),
            close: None,
        },
    }
}

/// Device connections that failed during the run, by kind, and how the rest closed.
#[derive(Default)]
pub struct Connections {
    pub errors: Failures,
    pub closes: BTreeMap<&'static str, usize>,
}

impl Connections {
    pub fn add<R>(&mut self, end: &DeviceEnd<R>) {
        if let Some(e) = &end.error {
            // The message minus its numbers is the kind, so differing counts do not split it.
            let kind: String = e.chars().filter(|c| !c.is_ascii_digit()).collect();
            self.errors.add(format!("device connection: {kind}"), || {
                format!("{}: {e}", end.id)
            });
        }
        let close = match end.close {
            Some(CloseOutcome::ServerClosed) => "server_closed",
            Some(CloseOutcome::ServerKeptOpen) => "server_kept_open",
            Some(CloseOutcome::WriteFailed) => "write_failed",
            None => "failed_earlier",
        };
        *self.closes.entry(close).or_default() += 1;
    }
}
