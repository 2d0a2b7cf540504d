//! `telemetry`: sustained QoS 1 device-to-cloud messages over TLS with a fixed number of PUBLISHes
//! in flight per connection; measures acknowledged messages per second, PUBACK latency and server
//! CPU per message. Drives a Ferrohub hub (registered devices with SAS tokens) or, to compare
//! against, a plain MQTT broker (anonymous clients publishing to the same topics).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ferrohub_iothub::sas::generate_key;
use ferrohub_mqtt::{decode, encode, Packet, Publish, QoS};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use super::ensure_descriptors;
use super::push::{self, Window};
use crate::device::{self, CloseOutcome, Connector, Credentials, Endpoint, MqttStream};
use crate::hub::{Hub, HubArgs};
use crate::procfs;
use crate::registry::{self, FleetArgs};

/// Longest the bench waits, after the measured window, for PUBLISHes still in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A PUBACK is 4 bytes; anything near this limit means the peer is not an MQTT server.
const MAX_INBOUND_PACKET: usize = 4096;
/// Headroom for the tasks to start before the common start instant, so connection 0 does not
/// get a head start on connection N-1.
const START_DELAY: Duration = Duration::from_millis(100);
/// A paced send this far behind its schedule counts as late: the generator or the server could
/// not keep up with --rate (or --inflight was too small for it), which latency measured from the
/// actual send would not show. Above tokio's 1 ms timer resolution, which alone makes paced sends
/// up to a millisecond late, in small bursts.
const LATE: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A Ferrohub (or IoT Hub) hub: devices are registered over REST and connect with SAS
    /// tokens; TLS names the connection string's HostName.
    Ferrohub,
    /// Any MQTT 3.1.1 broker taking anonymous clients (client ids `{prefix}{i}`, no username or
    /// password); needs --mqtt-host, which is also the TLS server name, and --ca-file.
    Plain,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ferrohub => "ferrohub",
            Target::Plain => "plain",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct TelemetryArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// What kind of server is under test.
    #[arg(long, value_enum, default_value_t = Target::Ferrohub)]
    pub target: Target,
    /// Device connections, each publishing on its own.
    #[arg(long)]
    pub connections: usize,
    /// PUBLISHes kept unacknowledged per connection: the next goes out as soon as a PUBACK frees
    /// a slot.
    #[arg(long)]
    pub inflight: usize,
    /// Length of the measured window, after the warm-up.
    #[arg(long)]
    pub seconds: u64,
    /// Seconds of publishing before the measured window, not counted.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Size of every message body.
    #[arg(long, default_value_t = 256)]
    pub body_bytes: usize,
    /// Total PUBLISHes per second, spread evenly over the connections (still at most --inflight
    /// unacknowledged each) [default: as fast as PUBACKs come back].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Device ids (client ids) are `{prefix}{index}`, index from 0.
    #[arg(long, default_value = "bench-")]
    pub prefix: String,
    /// Registry requests in flight at once (ferrohub target).
    #[arg(long, default_value_t = 16)]
    pub register_concurrency: usize,
    /// Connects in flight at once while the connections are opened.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Seconds before one connect attempt counts as failed.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
}

impl TelemetryArgs {
    fn validate(&self) -> Result<()> {
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        // At most every packet identifier but one in use, so a free one is always found.
        if !(1..=65_534).contains(&self.inflight) {
            bail!("--inflight must be between 1 and 65534 (MQTT packet identifiers are 16-bit)");
        }
        if self.seconds == 0 {
            bail!("--seconds must be at least 1");
        }
        if !(self.warmup_secs >= 0.0 && self.warmup_secs.is_finite()) {
            bail!("--warmup-secs must be a non-negative number");
        }
        if let Some(rate) = self.rate {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number of messages per second");
            }
        }
        // IoT Hub's limit for a device-to-cloud message.
        if self.body_bytes > 256 * 1024 {
            bail!("--body-bytes must be at most 262144");
        }
        Ok(())
    }

    fn fleet(&self) -> FleetArgs {
        FleetArgs {
            devices: self.connections,
            prefix: self.prefix.clone(),
            register_concurrency: self.register_concurrency,
        }
    }
}

/// Counters every connection updates and the measuring task reads.
struct Shared {
    /// PUBACKs received, all phases; the measured figure is the difference across the window.
    acked: AtomicU64,
    /// Latencies are recorded only while this is set.
    measuring: AtomicBool,
}

/// What one connection did.
struct ConnReport {
    /// PUBACK latency in microseconds, measured window only.
    latency_us: Histogram<u64>,
    sent: u64,
    acked: u64,
    late_sends: u64,
    /// PUBLISHes still unacknowledged when the connection ended.
    unacked: usize,
    /// Why the connection ended before the bench closed it.
    error: Option<String>,
    close: Option<CloseOutcome>,
}

/// One connection's publishing state.
struct Publisher {
    stream: MqttStream,
    /// The encoded PUBLISH; only its packet identifier changes from message to message.
    template: Vec<u8>,
    id_offset: usize,
    limit: usize,
    /// Packet identifier to send time.
    in_flight: HashMap<u16, Instant>,
    last_id: u16,
    pace: Option<Pace>,
}

struct Pace {
    interval: Duration,
    next_due: Instant,
}

impl Publisher {
    fn new(stream: MqttStream, topic: String, body: Bytes, limit: usize) -> Result<Publisher> {
        let (template, id_offset) = publish_template(topic, body)?;
        Ok(Publisher {
            stream,
            template,
            id_offset,
            limit,
            in_flight: HashMap::with_capacity(limit),
            last_id: 0,
            pace: None,
        })
    }

    /// Packet identifiers cycle through 1..=65535, skipping those still in flight; a broker
    /// treats a reused in-flight identifier as a retransmission.
    fn next_id(&mut self) -> u16 {
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&self.last_id) {
                return self.last_id;
            }
        }
    }

    async fn run(
        &mut self,
        start: Instant,
        shared: &Shared,
        stop: &mut watch::Receiver<bool>,
        report: &mut ConnReport,
    ) -> Result<(), String> {
        let mut out = BytesMut::with_capacity(self.template.len() * self.limit.min(64));
        let mut input = BytesMut::with_capacity(4096);
        let mut drain_deadline: Option<Instant> = None;
        sleep_until(start.into()).await;
        loop {
            if drain_deadline.is_none() {
                let now = Instant::now();
                while self.in_flight.len() < self.limit {
                    if let Some(pace) = &mut self.pace {
                        if pace.next_due > now {
                            break;
                        }
                        if now - pace.next_due > LATE {
                            report.late_sends += 1;
                        }
                        pace.next_due += pace.interval;
                    }
                    let id = self.next_id();
                    let at = out.len();
                    out.extend_from_slice(&self.template);
                    out[at + self.id_offset..at + self.id_offset + 2]
                        .copy_from_slice(&id.to_be_bytes());
                    self.in_flight.insert(id, now);
                    report.sent += 1;
                }
                // Never more than `limit` PUBLISHes and their PUBACKs are outstanding, so writing
                // without reading cannot deadlock against a server blocked on writing to us.
                if !out.is_empty() {
                    self.stream
                        .write_all(&out)
                        .await
                        .map_err(|e| format!("writing PUBLISH: {e}"))?;
                    self.stream
                        .flush()
                        .await
                        .map_err(|e| format!("writing PUBLISH: {e}"))?;
                    out.clear();
                }
            } else if self.in_flight.is_empty() {
                return Ok(());
            }

            let wake = match (drain_deadline, &self.pace) {
                (Some(deadline), _) => Some(deadline),
                (None, Some(pace)) if self.in_flight.len() < self.limit => Some(pace.next_due),
                _ => None,
            };
            tokio::select! {
                read = self.stream.read_buf(&mut input) => {
                    match read {
                        Ok(0) => return Err("server closed the connection".to_owned()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("reading: {e}")),
                    }
                    self.take_acks(&mut input, shared, report)?;
                }
                _ = sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                    if drain_deadline.is_some() {
                        return Err(format!(
                            "{} PUBLISHes still unacknowledged {} s after the run",
                            self.in_flight.len(),
                            DRAIN_TIMEOUT.as_secs()
                        ));
                    }
                }
                _ = stop.changed(), if drain_deadline.is_none() => {
                    drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                }
            }
        }
    }

    fn take_acks(
        &mut self,
        input: &mut BytesMut,
        shared: &Shared,
        report: &mut ConnReport,
    ) -> Result<(), String> {
        let now = Instant::now();
        let measuring = shared.measuring.load(Ordering::Relaxed);
        let mut acked = 0;
        let result = loop {
            match decode(input, MAX_INBOUND_PACKET) {
                Ok(Some(Packet::PubAck(id))) => match self.in_flight.remove(&id) {
                    Some(sent) => {
                        acked += 1;
                        if measuring {
                            // `record` grows the histogram as needed; `saturating_record` would
                            // clamp to its current (initially tiny) range instead.
                            let us = (now - sent).as_micros() as u64;
                            if report.latency_us.record(us).is_err() {
                                report.latency_us.saturating_record(us);
                            }
                        }
                    }
                    None => {
                        break Err(format!("PUBACK for packet id {id}, which is not in flight"))
                    }
                },
                Ok(Some(other)) => break Err(format!("unexpected packet {other:?}")),
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("undecodable packet: {e}")),
            }
        };
        // One shared update per read rather than per PUBACK keeps the counter off the hot path.
        shared.acked.fetch_add(acked, Ordering::Relaxed);
        report.acked += acked;
        result
    }
}

/// A QoS 1 PUBLISH and the offset of its packet identifier, so messages are made by copying and
/// patching two bytes rather than encoding.
fn publish_template(topic: String, body: Bytes) -> Result<(Vec<u8>, usize)> {
    let body_len = body.len();
    let mut buf = BytesMut::new();
    encode(
        &Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            packet_id: 1,
            payload: body,
        }),
        &mut buf,
    )
    .context("encoding PUBLISH")?;
    // The identifier is the last field of the variable header, right before the payload.
    let offset = buf.len() - body_len - 2;
    Ok((buf.to_vec(), offset))
}

/// Publishes until told to stop, waits for the outstanding PUBACKs, then disconnects.
async fn drive(
    mut publisher: Publisher,
    start: Instant,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> ConnReport {
    let mut report = ConnReport {
        latency_us: Histogram::new(3).expect("3 significant figures are supported"),
        sent: 0,
        acked: 0,
        late_sends: 0,
        unacked: 0,
        error: None,
        close: None,
    };
    let outcome = publisher.run(start, &shared, &mut stop, &mut report).await;
    report.unacked = publisher.in_flight.len();
    match outcome {
        Ok(()) => report.close = Some(device::disconnect(publisher.stream).await),
        Err(e) => report.error = Some(e),
    }
    report
}

/// Opens every connection, `concurrency` at a time; any failure fails the run, since figures
/// from fewer connections than asked for would describe a different load.
async fn connect_all(
    connector: Arc<Connector>,
    fleet: &FleetArgs,
    concurrency: usize,
) -> Result<Vec<MqttStream>> {
    let n = fleet.devices;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, n) {
        let (connector, next, fleet) = (Arc::clone(&connector), Arc::clone(&next), fleet.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut failures: BTreeMap<String, (usize, String)> = BTreeMap::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= n {
                    return (done, failures);
                }
                let id = fleet.device_id(index);
                match connector.connect(&id).await {
                    Ok(stream) => done.push((index, stream)),
                    Err(f) => {
                        failures
                            .entry(f.category())
                            .or_insert_with(|| (0, format!("{id}: {f}")))
                            .0 += 1
                    }
                }
            }
        }));
    }
    let mut streams = Vec::with_capacity(n);
    let mut failures: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for worker in workers {
        let (done, failed) = worker.await.context("connect worker panicked")?;
        streams.extend(done);
        for (kind, (count, example)) in failed {
            failures.entry(kind).or_insert((0, example)).0 += count;
        }
    }
    if !failures.is_empty() {
        let lines: Vec<String> = failures
            .iter()
            .map(|(kind, (count, example))| format!("{kind} x{count} (e.g. {example})"))
            .collect();
        bail!(
            "{} of {n} connections failed: {}",
            n - streams.len(),
            lines.join("; ")
        );
    }
    streams.sort_unstable_by_key(|(index, _)| *index);
    Ok(streams.into_iter().map(|(_, s)| s).collect())
}

/// The resolved target: how to connect, and whose CPU to measure.
struct Resolved {
    connector: Connector,
    server_pid: Option<u32>,
    description: String,
}

async fn resolve(args: &TelemetryArgs, fleet: &FleetArgs) -> Result<Resolved> {
    let timeout = Duration::from_secs(args.connect_timeout_secs);
    match args.target {
        Target::Ferrohub => {
            let hub = Hub::resolve(&args.hub)?;
            println!(
                "hub: HostName {}, REST https://{}, CA {}",
                hub.host_name,
                hub.rest_authority,
                hub.ca_file.display(),
            );
            let device_key = generate_key();
            let registration = registry::register(&hub, fleet, &device_key).await?;
            println!(
                "registration: {} devices in {:.2} s: {} created, {} already existed (key replaced)",
                fleet.devices,
                registration.elapsed.as_secs_f64(),
                registration.created,
                registration.overwritten,
            );
            let connector = Connector::new(&hub, device_key, false, timeout).await?;
            let description = format!(
                "{} (TLS server name {}, SAS-authenticated devices)",
                connector.addr(),
                hub.hostname
            );
            Ok(Resolved {
                connector,
                server_pid: hub.server_pid,
                description,
            })
        }
        Target::Plain => {
            if args.hub.data_dir.is_some() || args.hub.connection_string.is_some() {
                bail!("--target plain takes --mqtt-host, --mqtt-port and --ca-file, not a hub's --data-dir or --connection-string");
            }
            let host = args
                .hub
                .mqtt_host
                .as_deref()
                .context("--target plain needs --mqtt-host")?;
            let ca_file = args
                .hub
                .ca_file
                .as_ref()
                .context("--target plain needs --ca-file")?;
            let ca_pem =
                std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
            let port = args.hub.mqtt_port.unwrap_or(8883);
            let endpoint = Endpoint {
                ca_pem: &ca_pem,
                server_name: host,
                host,
                port,
            };
            let connector =
                Connector::with_credentials(&endpoint, Credentials::Anonymous, false, timeout)
                    .await?;
            let description = format!(
                "{} (TLS server name {host}, CA {}, anonymous clients)",
                connector.addr(),
                ca_file.display()
            );
            Ok(Resolved {
                connector,
                server_pid: args.hub.server_pid,
                description,
            })
        }
    }
}

/// Filler for message bodies: printable, so a broker log or a stored event stays readable.
fn body(len: usize) -> Bytes {
    let pattern = b"ferrohub-bench telemetry ";
    Bytes::from(
        pattern
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect::<Vec<u8>>(),
    )
}

pub async fn run(args: TelemetryArgs) -> Result<()> {
    args.validate()?;
    let n = args.connections;
    let fleet = args.fleet();
    fleet.validate()?;
    let nofile = ensure_descriptors(n)?;
    println!(
        "telemetry: target {}, {n} connections x {} in flight, {}-byte bodies, QoS 1, rate {}, \
         warm-up {} s, measured {} s, open-file limit {nofile}",
        args.target.name(),
        args.inflight,
        args.body_bytes,
        args.rate
            .map_or_else(|| "unlimited".to_owned(), |r| format!("{r:.0} msgs/s")),
        args.warmup_secs,
        args.seconds,
    );
    let resolved = resolve(&args, &fleet).await?;
    let server_pid = resolved.server_pid;
    // Fail before connecting if the pid is stale.
    if let Some(pid) = server_pid {
        procfs::sample(pid).with_context(|| {
            format!("measuring server pid {pid} (is it running? --server-pid overrides hub.json)")
        })?;
    }
    println!(
        "mqtt: {}, server pid {}",
        resolved.description,
        server_pid.map_or_else(
            || "unknown (no server figures)".to_owned(),
            |p| p.to_string()
        )
    );

    let connecting = Instant::now();
    let streams = connect_all(
        Arc::new(resolved.connector),
        &fleet,
        args.connect_concurrency,
    )
    .await?;
    println!(
        "connected: {n} in {:.2} s",
        connecting.elapsed().as_secs_f64()
    );

    let shared = Arc::new(Shared {
        acked: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now() + START_DELAY;
    let tasks = spawn_publishers(&args, &fleet, streams, start, &shared, stop_rx)?;
    let window = measure(
        &shared,
        server_pid,
        start + Duration::from_secs_f64(args.warmup_secs),
        args.seconds,
    )
    .await?;
    // Receivers only fail if every task has already ended, which is fine.
    let _ = stop_tx.send(true);
    let totals = collect(tasks, &fleet).await?;

    let figures = Figures {
        window,
        totals,
        server_pid,
    };
    figures.print(args.rate);
    println!("RESULT {}", figures.json(&args));
    Ok(())
}

fn spawn_publishers(
    args: &TelemetryArgs,
    fleet: &FleetArgs,
    streams: Vec<MqttStream>,
    start: Instant,
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<ConnReport>>> {
    let n = streams.len();
    // Each connection offers rate/N, phase-shifted by i/N of its interval so the total is even.
    let interval = args.rate.map(|r| Duration::from_secs_f64(n as f64 / r));
    let body = body(args.body_bytes);
    let mut tasks = Vec::with_capacity(n);
    for (index, stream) in streams.into_iter().enumerate() {
        let topic = format!("devices/{}/messages/events/", fleet.device_id(index));
        let mut publisher = Publisher::new(stream, topic, body.clone(), args.inflight)?;
        publisher.pace = interval.map(|interval| Pace {
            interval,
            next_due: start + interval.mul_f64(index as f64 / n as f64),
        });
        tasks.push(tokio::spawn(drive(
            publisher,
            start,
            Arc::clone(shared),
            stop.clone(),
        )));
    }
    Ok(tasks)
}

/// Waits for the warm-up to end, then counts PUBACKs and CPU time for `seconds`; latencies are
/// recorded only meanwhile.
async fn measure(
    shared: &Shared,
    server_pid: Option<u32>,
    window_start: Instant,
    seconds: u64,
) -> Result<Window> {
    sleep_until(window_start.into()).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let window = push::measure(
        start,
        start + Duration::from_secs(seconds),
        &shared.acked,
        server_pid,
        "msgs/s",
    )
    .await;
    shared.measuring.store(false, Ordering::Relaxed);
    window
}

/// All connections' reports, summed.
struct Totals {
    latency_us: Histogram<u64>,
    sent: u64,
    acked: u64,
    late_sends: u64,
    unacked: usize,
    /// Connections that failed while publishing, by kind: how many, and one example.
    errors: BTreeMap<String, (usize, String)>,
    closes: BTreeMap<&'static str, usize>,
}

async fn collect(tasks: Vec<JoinHandle<ConnReport>>, fleet: &FleetArgs) -> Result<Totals> {
    let mut totals = Totals {
        latency_us: Histogram::new(3).expect("3 significant figures are supported"),
        sent: 0,
        acked: 0,
        late_sends: 0,
        unacked: 0,
        errors: BTreeMap::new(),
        closes: BTreeMap::new(),
    };
    for (index, task) in tasks.into_iter().enumerate() {
        let report = task.await.context("publishing task panicked")?;
        totals
            .latency_us
            .add(&report.latency_us)
            .context("merging latency histograms")?;
        totals.sent += report.sent;
        totals.acked += report.acked;
        totals.late_sends += report.late_sends;
        totals.unacked += report.unacked;
        if let Some(e) = report.error {
            // The message minus its numbers is the kind, so differing counts do not split it.
            let kind: String = e.chars().filter(|c| !c.is_ascii_digit()).collect();
            totals
                .errors
                .entry(kind)
                .or_insert_with(|| (0, format!("{}: {e}", fleet.device_id(index))))
                .0 += 1;
        }
        let close = match report.close {
            Some(CloseOutcome::ServerClosed) => "server_closed",
            Some(CloseOutcome::ServerKeptOpen) => "server_kept_open",
            Some(CloseOutcome::WriteFailed) => "write_failed",
            None => "failed_earlier",
        };
        *totals.closes.entry(close).or_default() += 1;
    }
    Ok(totals)
}

/// The measured figures and the arithmetic on them, shared by the human and the JSON output.
struct Figures {
    window: Window,
    totals: Totals,
    server_pid: Option<u32>,
}

impl Figures {
    fn acked_per_sec(&self) -> f64 {
        self.window.completed as f64 / self.window.secs.max(1e-9)
    }

    fn latency_ms(&self, p: f64) -> f64 {
        let h = &self.totals.latency_us;
        if h.is_empty() {
            return 0.0;
        }
        h.value_at_percentile(p) as f64 / 1000.0
    }

    fn server_cpu_secs(&self) -> Option<f64> {
        self.window.server.map(|(cpu, _)| cpu)
    }

    /// None when the server used less than one clock tick: the ratio would be meaningless.
    fn per_server_cpu_sec(&self) -> Option<f64> {
        self.server_cpu_secs()
            .filter(|&cpu| cpu > 0.0)
            .map(|cpu| self.window.completed as f64 / cpu)
    }

    /// Busy CPU time in the window that was neither the server's nor the bench's.
    fn other_cpu_secs(&self) -> f64 {
        let w = &self.window;
        (w.machine_busy_secs - self.server_cpu_secs().unwrap_or(0.0) - w.bench_cpu_secs).max(0.0)
    }

    /// Over 5% of the machine's capacity went elsewhere: the server and the bench did not have
    /// the CPUs to themselves.
    fn contended(&self) -> bool {
        self.other_cpu_secs() > 0.05 * self.window.secs * num_cpus() as f64
    }

    fn connection_errors(&self) -> usize {
        self.totals.errors.values().map(|(count, _)| count).sum()
    }

    fn print(&self, rate: Option<f64>) {
        let (w, t) = (&self.window, &self.totals);
        println!(
            "acked: {} msgs in {:.2} s: {:.0} msgs/s (per second: min {}, max {})",
            w.completed,
            w.secs,
            self.acked_per_sec(),
            w.per_second.iter().min().unwrap_or(&0),
            w.per_second.iter().max().unwrap_or(&0),
        );
        if let Some(rate) = rate {
            println!(
                "offered {rate:.0} msgs/s: {:.1}% acked, {} sends more than {} ms behind schedule",
                self.acked_per_sec() / rate * 100.0,
                t.late_sends,
                LATE.as_millis()
            );
        }
        println!(
            "PUBACK latency: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} samples)",
            self.latency_ms(50.0),
            self.latency_ms(90.0),
            self.latency_ms(99.0),
            self.latency_ms(100.0),
            t.latency_us.len()
        );
        match (self.server_pid, self.server_cpu_secs()) {
            (Some(pid), Some(cpu)) => println!(
                "server pid {pid}: {cpu:.2} CPU-s in the window: {}",
                self.per_server_cpu_sec().map_or_else(
                    || "too little CPU to compute msgs per CPU-second".to_owned(),
                    |r| format!("{r:.0} msgs per server CPU-second")
                )
            ),
            _ => println!("server: pid unknown, no server CPU figures"),
        }
        println!(
            "bench (for context): {:.2} CPU-s in the window; {} PUBLISHes sent, {} acknowledged \
             over the whole run, {} never acknowledged",
            w.bench_cpu_secs, t.sent, t.acked, t.unacked
        );
        println!(
            "machine: {:.2} CPU-s busy in the window, {:.2} of them neither server nor bench{}",
            w.machine_busy_secs,
            self.other_cpu_secs(),
            if self.contended() {
                " (something else competed for the CPUs: figures are suspect)"
            } else {
                ""
            }
        );
        if !t.errors.is_empty() {
            println!(
                "connections that failed while publishing: {}",
                self.connection_errors()
            );
            for (count, example) in t.errors.values() {
                println!("  {count:>7}   e.g. {example}");
            }
        }
        let closed: Vec<String> = t.closes.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("closing: DISCONNECT sent, {}", closed.join(", "));
    }

    fn json(&self, args: &TelemetryArgs) -> Value {
        let (w, t) = (&self.window, &self.totals);
        json!({
            "scenario": "telemetry",
            "target": args.target.name(),
            "connections": args.connections,
            "inflight": args.inflight,
            "body_bytes": args.body_bytes,
            "rate_target": args.rate,
            "warmup_secs": args.warmup_secs,
            "measured_secs": round3(w.secs),
            "acked": w.completed,
            "acked_per_sec": round3(self.acked_per_sec()),
            "per_second": w.per_second,
            "latency_ms": {
                "p50": self.latency_ms(50.0),
                "p90": self.latency_ms(90.0),
                "p99": self.latency_ms(99.0),
                "p999": self.latency_ms(99.9),
                "max": self.latency_ms(100.0),
                "mean": round3(t.latency_us.mean() / 1000.0),
                "samples": t.latency_us.len(),
            },
            "server_pid": self.server_pid,
            "server_cpu_secs": self.server_cpu_secs().map(round3),
            "msgs_per_server_cpu_sec": self.per_server_cpu_sec().map(round3),
            "server_rss_kib": w.server.map(|(_, rss)| rss),
            "bench_cpu_secs": round3(w.bench_cpu_secs),
            "machine_busy_cpu_secs": round3(w.machine_busy_secs),
            "other_cpu_secs": round3(self.other_cpu_secs()),
            "contended": self.contended(),
            "cpus": num_cpus(),
            "sent_total": t.sent,
            "acked_total": t.acked,
            "unacked_at_end": t.unacked,
            "late_sends": t.late_sends,
            "connection_errors": self.connection_errors(),
            "close": t.closes,
        })
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_asked_length() {
        assert_eq!(body(256).len(), 256);
        assert_eq!(body(0).len(), 0);
        assert!(body(300).iter().all(|b| b.is_ascii_graphic() || *b == b' '));
    }

    #[test]
    fn latency_histograms_grow_to_fit() -> Result<()> {
        let mut h = Histogram::<u64>::new(3)?;
        for us in [150, 40_000, 2_500_000] {
            h.record(us)?;
        }
        assert_eq!(h.max(), h.highest_equivalent(2_500_000));
        assert!(h.value_at_percentile(50.0).abs_diff(40_000) < 40);
        Ok(())
    }

    #[test]
    fn patching_the_template_changes_only_the_packet_id() -> Result<()> {
        let topic = "devices/bench-7/messages/events/";
        // 200 bytes makes the remaining length a two-byte varint.
        for len in [0, 5, 200, 256] {
            let (template, offset) = publish_template(topic.to_owned(), body(len))?;
            for id in [1u16, 0x1234, 65535] {
                let mut wire = BytesMut::from(&template[..]);
                wire[offset..offset + 2].copy_from_slice(&id.to_be_bytes());
                match decode(&mut wire, 1 << 20)? {
                    Some(Packet::Publish(p)) => {
                        assert_eq!(p.packet_id, id);
                        assert_eq!(p.topic, topic);
                        assert_eq!(p.qos, QoS::AtLeastOnce);
                        assert_eq!(p.payload, body(len));
                    }
                    other => panic!("decoded {other:?}"),
                }
                assert!(wire.is_empty());
            }
        }
        Ok(())
    }
}
