//! `crash-writer` and `crash-check`, the two halves of `scripts/crash-loop.sh`: the writer drives
//! every kind of durable write (QoS 1 telemetry, C2D sends, reported twin patches, registry
//! creates) and appends one line to an ack log the moment each write is acknowledged; the hub is
//! then killed and restarted, and the checker proves each logged write is still there.
//!
//! Ack log lines (one `write` each, so a line the writer logged survives the writer's own kill):
//! - `K <key>`: the key all of this writer's devices share (for the checker's C2D reads);
//! - `T <device> <seq>`: telemetry message `{"seq":seq}` got its PUBACK;
//! - `C <device> <messageId>`: the C2D send got a 2xx;
//! - `R <device> <seq> <version>`: the reported patch `{"seq":seq}` got a 204 at that version;
//! - `D <device>`: the registry create got a 2xx.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ferrohub_iothub::sas::generate_key;
use ferrohub_mqtt::{decode, encode, Packet, Publish, QoS, Subscribe};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};

use crate::device::{Connector, MqttStream};
use crate::hub::{Hub, HubArgs};
use crate::registry::{self, FleetArgs};

const API_VERSION: &str = "2021-04-12";
/// Anything bigger from the hub means it is not speaking MQTT to us.
const MAX_INBOUND_PACKET: usize = 512 * 1024;
/// Pause before a device reconnects after its connection failed (the hub is usually gone).
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// Longest a device waits for the answer to one reported patch.
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// The ack log, appended to.
    #[arg(long)]
    pub log: PathBuf,
    /// Prefix of every device id this writer uses (one per trial keeps trials apart).
    #[arg(long, default_value = "crash-")]
    pub prefix: String,
    /// Devices publishing QoS 1 telemetry.
    #[arg(long, default_value_t = 8)]
    pub telemetry_devices: usize,
    /// Telemetry PUBLISHes each device keeps unacknowledged.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// Telemetry messages per second over all devices.
    #[arg(long, default_value_t = 4000.0)]
    pub telemetry_rate: f64,
    /// Devices publishing reported patches, each waiting for the answer before the next.
    #[arg(long, default_value_t = 8)]
    pub twin_devices: usize,
    /// Reported patches per second over all devices.
    #[arg(long, default_value_t = 400.0)]
    pub twin_rate: f64,
    /// Devices the C2D sends go to, round-robin (never connected, so every send stays queued;
    /// a queue holds 50).
    #[arg(long, default_value_t = 100)]
    pub c2d_devices: usize,
    /// C2D sends per second.
    #[arg(long, default_value_t = 300.0)]
    pub c2d_rate: f64,
    /// Registry creates per second.
    #[arg(long, default_value_t = 100.0)]
    pub create_rate: f64,
    /// REST requests in flight at once, per kind (C2D, creates).
    #[arg(long, default_value_t = 4)]
    pub rest_workers: usize,
    /// Written once the devices exist and the load starts.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Give up after this long (a safety net: the crash loop kills the writer long before).
    #[arg(long, default_value_t = 300)]
    pub max_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// Ack log(s) written by crash-writer.
    #[arg(long, required = true, num_args = 1..)]
    pub log: Vec<PathBuf>,
    /// Read telemetry from this RFC 3339 time on (a little before the writer started) [default:
    /// the start of the log].
    #[arg(long)]
    pub since: Option<String>,
    /// Seconds without a new event (or C2D message) after which a read is over.
    #[arg(long, default_value_t = 3.0)]
    pub idle_secs: f64,
    /// Leave the C2D queues alone (reading them completes the messages).
    #[arg(long)]
    pub skip_c2d: bool,
}

/// The ack log, shared by every task of the writer.
struct AckLog {
    file: Mutex<File>,
    failed: AtomicU64,
}

impl AckLog {
    fn open(path: &PathBuf) -> Result<AckLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(AckLog {
            file: Mutex::new(file),
            failed: AtomicU64::new(0),
        })
    }

    /// Appends one line with one `write`, straight to the file (no user-space buffer).
    fn line(&self, line: String) {
        let written = match self.file.lock() {
            Ok(mut f) => f.write_all(line.as_bytes()).is_ok(),
            Err(_) => false,
        };
        if !written && self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!("crash-writer: writing the ack log failed; acks are being missed");
        }
    }
}

/// Counters the writer prints every second, so the loop's log shows the load.
#[derive(Default)]
struct Counts {
    telemetry: AtomicU64,
    c2d: AtomicU64,
    c2d_refused: AtomicU64,
    twin: AtomicU64,
    created: AtomicU64,
    rest_errors: AtomicU64,
    connect_failures: AtomicU64,
}

pub async fn run_writer(args: WriterArgs) -> Result<()> {
    let hub = Hub::resolve(&args.hub)?;
    let log = Arc::new(AckLog::open(&args.log)?);
    let key = generate_key();
    log.line(format!("K {key}\n"));
    for (devices, kind) in [
        (args.telemetry_devices, "tel-"),
        (args.twin_devices, "tw-"),
        (args.c2d_devices, "c2d-"),
    ] {
        if devices == 0 {
            continue;
        }
        let fleet = FleetArgs {
            devices,
            prefix: format!("{}{kind}", args.prefix),
            register_concurrency: 8,
        };
        fleet.validate()?;
        registry::register(&hub, &fleet, &key).await?;
    }
    let connector = Arc::new(Connector::new(&hub, key, false, Duration::from_secs(10)).await?);
    let client = rest_client(&hub, Some(Duration::from_secs(30)))?;
    let base = format!("https://{}", hub.rest_authority);
    let auth = hub.service_token()?;
    let counts = Arc::new(Counts::default());
    let mut tasks = JoinSet::new();

    let per_device = |rate: f64, n: usize| Duration::from_secs_f64(n as f64 / rate.max(0.001));
    for i in 0..args.telemetry_devices {
        let t = TelemetryDevice {
            connector: Arc::clone(&connector),
            id: format!("{}tel-{i}", args.prefix),
            log: Arc::clone(&log),
            counts: Arc::clone(&counts),
            inflight: args.inflight.clamp(1, 1000),
            every: per_device(args.telemetry_rate, args.telemetry_devices),
        };
        tasks.spawn(async move { t.run().await });
    }
    for i in 0..args.twin_devices {
        let t = TwinDevice {
            connector: Arc::clone(&connector),
            id: format!("{}tw-{i}", args.prefix),
            log: Arc::clone(&log),
            counts: Arc::clone(&counts),
            every: per_device(args.twin_rate, args.twin_devices),
        };
        tasks.spawn(async move { t.run().await });
    }
    let next = Arc::new(AtomicU64::new(0));
    let workers = args.rest_workers.max(1);
    for kind in [RestKind::C2d, RestKind::Create] {
        let rate = match kind {
            RestKind::C2d if args.c2d_devices > 0 => args.c2d_rate,
            RestKind::C2d => continue,
            RestKind::Create => args.create_rate,
        };
        for _ in 0..workers {
            let w = RestWorker {
                kind,
                client: client.clone(),
                base: base.clone(),
                auth: auth.clone(),
                prefix: args.prefix.clone(),
                c2d_devices: args.c2d_devices as u64,
                next: Arc::clone(&next),
                log: Arc::clone(&log),
                counts: Arc::clone(&counts),
                every: per_device(rate, workers),
            };
            tasks.spawn(async move { w.run().await });
        }
    }
    if let Some(ready) = &args.ready_file {
        std::fs::write(ready, b"ready\n")
            .with_context(|| format!("writing {}", ready.display()))?;
    }
    eprintln!("crash-writer: load started ({})", args.prefix);
    let report = Arc::clone(&counts);
    tasks.spawn(async move {
        let mut tick = interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let c = &report;
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            eprintln!(
                "crash-writer: acked telemetry {} c2d {} twin {} creates {}; c2d refused {}, \
                 REST errors {}, connect failures {}",
                g(&c.telemetry),
                g(&c.c2d),
                g(&c.twin),
                g(&c.created),
                g(&c.c2d_refused),
                g(&c.rest_errors),
                g(&c.connect_failures)
            );
        }
    });
    // Every task loops until the process is killed; the timeout is a safety net.
    let _ = timeout(Duration::from_secs(args.max_secs), tasks.join_next()).await;
    Ok(())
}

fn rest_client(hub: &Hub, total: Option<Duration>) -> Result<reqwest::Client> {
    let mut b = hub
        .https_builder()?
        .http1_only()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(32);
    if let Some(t) = total {
        b = b.timeout(t);
    }
    b.build().context("building the HTTPS client")
}

fn encode_packet(packet: &Packet) -> Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(128);
    encode(packet, &mut buf).context("encoding a packet")?;
    Ok(buf)
}

async fn send(stream: &mut MqttStream, packet: &Packet) -> Result<()> {
    let buf = encode_packet(packet)?;
    stream.write_all(&buf).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads until one packet is decoded; errors when the connection ends.
async fn next_packet(stream: &mut MqttStream, input: &mut BytesMut) -> Result<Packet> {
    loop {
        if let Some(p) = decode(input, MAX_INBOUND_PACKET).context("undecodable packet")? {
            return Ok(p);
        }
        if stream.read_buf(input).await? == 0 {
            bail!("the hub closed the connection");
        }
    }
}

async fn subscribe(stream: &mut MqttStream, input: &mut BytesMut, filter: String) -> Result<()> {
    let qos = if filter.starts_with("$iothub") {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    send(
        stream,
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter, qos)],
        }),
    )
    .await?;
    loop {
        match next_packet(stream, input).await? {
            Packet::SubAck(_) => return Ok(()),
            Packet::PingResp => {}
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }
}

struct TelemetryDevice {
    connector: Arc<Connector>,
    id: String,
    log: Arc<AckLog>,
    counts: Arc<Counts>,
    inflight: usize,
    every: Duration,
}

impl TelemetryDevice {
    async fn run(self) {
        // Sequence numbers go on across reconnects, so every message ever sent is distinct.
        let mut seq = 0u64;
        loop {
            match self.connector.connect(&self.id).await {
                Ok(stream) => {
                    let _ = self.session(stream, &mut seq).await;
                }
                Err(_) => {
                    self.counts.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            sleep(RECONNECT_PAUSE).await;
        }
    }

    async fn session(&self, mut stream: MqttStream, seq: &mut u64) -> Result<()> {
        let topic = format!("devices/{}/messages/events/", self.id);
        // Packet identifier -> sequence number of the message it carries.
        let mut pending: HashMap<u16, u64> = HashMap::new();
        let mut input = BytesMut::with_capacity(4096);
        let mut tick = interval(self.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick(), if pending.len() < self.inflight => {
                    *seq += 1;
                    // With far fewer than 65,535 in flight, consecutive sequence numbers never
                    // collide on a packet identifier still pending.
                    let packet_id = (*seq % 65_535) as u16 + 1;
                    pending.insert(packet_id, *seq);
                    let publish = Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic: topic.clone(),
                        packet_id,
                        payload: Bytes::from(format!("{{\"seq\":{}}}", *seq)),
                    });
                    send(&mut stream, &publish).await?;
                }
                read = stream.read_buf(&mut input) => {
                    if read? == 0 {
                        bail!("closed");
                    }
                    while let Some(p) = decode(&mut input, MAX_INBOUND_PACKET)? {
                        if let Packet::PubAck(id) = p {
                            if let Some(s) = pending.remove(&id) {
                                self.log.line(format!("T {} {s}\n", self.id));
                                self.counts.telemetry.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }
    }
}

struct TwinDevice {
    connector: Arc<Connector>,
    id: String,
    log: Arc<AckLog>,
    counts: Arc<Counts>,
    every: Duration,
}

impl TwinDevice {
    async fn run(self) {
        let mut seq = 0u64;
        loop {
            match self.connector.connect(&self.id).await {
                Ok(stream) => {
                    let _ = self.session(stream, &mut seq).await;
                }
                Err(_) => {
                    self.counts.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            sleep(RECONNECT_PAUSE).await;
        }
    }

    async fn session(&self, mut stream: MqttStream, seq: &mut u64) -> Result<()> {
        let mut input = BytesMut::with_capacity(4096);
        subscribe(&mut stream, &mut input, "$iothub/twin/res/#".into()).await?;
        let mut tick = interval(self.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut packet_id = 0u16;
        loop {
            tick.tick().await;
            *seq += 1;
            let rid = *seq;
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            let publish = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                packet_id,
                payload: Bytes::from(format!("{{\"seq\":{rid}}}")),
            });
            send(&mut stream, &publish).await?;
            let answer = timeout(PATCH_TIMEOUT, async {
                loop {
                    if let Packet::Publish(p) = next_packet(&mut stream, &mut input).await? {
                        if let Some((status, version)) = twin_answer(&p.topic, rid) {
                            return Ok::<_, anyhow::Error>((status, version));
                        }
                    }
                }
            })
            .await
            .context("no answer to a reported patch")??;
            if answer.0 == 204 {
                self.log
                    .line(format!("R {} {rid} {}\n", self.id, answer.1.unwrap_or(0)));
                self.counts.twin.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `$iothub/twin/res/{status}/?$rid={rid}&$version={v}`: the status and version when the answer
/// is for `rid`.
fn twin_answer(topic: &str, rid: u64) -> Option<(u16, Option<u64>)> {
    let rest = topic.strip_prefix("$iothub/twin/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let mut their_rid = None;
    let mut version = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("$rid", v)) => their_rid = v.parse::<u64>().ok(),
            Some(("$version", v)) => version = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    (their_rid == Some(rid)).then(|| (status.parse().unwrap_or(0), version))
}

#[derive(Debug, Clone, Copy)]
enum RestKind {
    C2d,
    Create,
}

struct RestWorker {
    kind: RestKind,
    client: reqwest::Client,
    base: String,
    auth: String,
    prefix: String,
    c2d_devices: u64,
    next: Arc<AtomicU64>,
    log: Arc<AckLog>,
    counts: Arc<Counts>,
    every: Duration,
}

impl RestWorker {
    async fn run(self) {
        let mut tick = interval(self.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let (request, line) = match self.kind {
                RestKind::C2d => {
                    let device = format!("{}c2d-{}", self.prefix, n % self.c2d_devices.max(1));
                    let mid = format!("{}m{n}", self.prefix);
                    let url = format!(
                        "{}/devices/{device}/messages/deviceBound?api-version={API_VERSION}",
                        self.base
                    );
                    let body = json!({"messageId": mid, "payload": mid, "ttlSeconds": 172_800});
                    (
                        self.client.post(url).json(&body),
                        format!("C {device} {mid}\n"),
                    )
                }
                RestKind::Create => {
                    let device = format!("{}reg-{n}", self.prefix);
                    let url = format!("{}/devices/{device}?api-version={API_VERSION}", self.base);
                    let body = json!({"deviceId": device});
                    (self.client.put(url).json(&body), format!("D {device}\n"))
                }
            };
            let sent = request
                .header(reqwest::header::AUTHORIZATION, &self.auth)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    self.log.line(line);
                    match self.kind {
                        RestKind::C2d => self.counts.c2d.fetch_add(1, Ordering::Relaxed),
                        RestKind::Create => self.counts.created.fetch_add(1, Ordering::Relaxed),
                    };
                }
                // A full queue (IoT Hub answers 403 DeviceMaximumQueueDepthExceeded) is a refusal,
                // not an acknowledgement.
                Ok(r) if r.status() == StatusCode::FORBIDDEN => {
                    self.counts.c2d_refused.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) | Err(_) => {
                    self.counts.rest_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What the ack logs say was acknowledged.
#[derive(Default)]
struct Acked {
    keys: Vec<String>,
    /// device -> acknowledged sequence numbers.
    telemetry: BTreeMap<String, HashSet<u64>>,
    /// device -> acknowledged message ids.
    c2d: BTreeMap<String, HashSet<String>>,
    /// device -> (highest acknowledged seq, its version), and how many patches were acked.
    twin: BTreeMap<String, (u64, u64)>,
    twin_acks: u64,
    created: Vec<String>,
}

impl Acked {
    fn read(paths: &[PathBuf]) -> Result<Acked> {
        let mut a = Acked::default();
        for path in paths {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            for line in BufReader::new(f).lines() {
                let line = line?;
                let mut w = line.split(' ');
                // A torn last line (the writer killed mid-write) cannot be an acknowledged
                // write the checker would miss: the ack came before the line.
                match (w.next(), w.next(), w.next(), w.next()) {
                    (Some("K"), Some(key), None, None) => a.keys.push(key.to_owned()),
                    (Some("T"), Some(d), Some(s), None) => {
                        if let Ok(s) = s.parse() {
                            a.telemetry.entry(d.to_owned()).or_default().insert(s);
                        }
                    }
                    (Some("C"), Some(d), Some(m), None) => {
                        a.c2d.entry(d.to_owned()).or_default().insert(m.to_owned());
                    }
                    (Some("R"), Some(d), Some(s), Some(v)) => {
                        if let (Ok(s), Ok(v)) = (s.parse::<u64>(), v.parse::<u64>()) {
                            let e = a.twin.entry(d.to_owned()).or_default();
                            if s > e.0 {
                                *e = (s, v);
                            }
                            a.twin_acks += 1;
                        }
                    }
                    (Some("D"), Some(d), None, None) => a.created.push(d.to_owned()),
                    _ => {}
                }
            }
        }
        Ok(a)
    }
}

/// One kind's result.
#[derive(Default)]
struct KindResult {
    acked: u64,
    lost: u64,
    examples: Vec<String>,
}

impl KindResult {
    fn lose(&mut self, what: String) {
        self.lost += 1;
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }

    fn json(&self) -> Value {
        json!({"acked": self.acked, "lost": self.lost, "examples": self.examples})
    }
}

pub async fn run_check(args: CheckArgs) -> Result<()> {
    let hub = Hub::resolve(&args.hub)?;
    let acked = Acked::read(&args.log)?;
    let idle = Duration::from_secs_f64(args.idle_secs.max(0.1));
    let client = rest_client(&hub, Some(Duration::from_secs(30)))?;
    let base = format!("https://{}", hub.rest_authority);
    let auth = hub.service_token()?;

    let telemetry = check_telemetry(&hub, &acked, args.since.as_deref(), idle).await?;
    let c2d = if args.skip_c2d {
        KindResult::default()
    } else {
        check_c2d(&hub, &acked, idle).await?
    };
    let twin = check_twins(&client, &base, &auth, &acked).await?;
    let registry = check_registry(&client, &base, &auth, &acked).await?;

    let lost = telemetry.0.lost + c2d.lost + twin.lost + registry.lost;
    let result = json!({
        "telemetry": telemetry.0.json(),
        "telemetry_read": telemetry.1,
        "telemetry_duplicates": telemetry.2,
        "c2d": c2d.json(),
        "c2d_checked": !args.skip_c2d,
        "twin": {"acked": twin.acked, "devices": acked.twin.len(), "lost": twin.lost, "examples": twin.examples},
        "registry": registry.json(),
        "lost": lost,
    });
    println!("CHECK {result}");
    if lost > 0 {
        bail!("{lost} acknowledged writes are missing");
    }
    Ok(())
}

/// Reads the event stream and ticks off every acknowledged message; returns the result, events
/// read for the writer's devices, and duplicates among them.
async fn check_telemetry(
    hub: &Hub,
    acked: &Acked,
    since: Option<&str>,
    idle: Duration,
) -> Result<(KindResult, u64, u64)> {
    let mut result = KindResult {
        acked: acked.telemetry.values().map(|s| s.len() as u64).sum(),
        ..KindResult::default()
    };
    if result.acked == 0 {
        return Ok((result, 0, 0));
    }
    let mut missing: HashMap<&str, HashSet<u64>> = acked
        .telemetry
        .iter()
        .map(|(d, s)| (d.as_str(), s.clone()))
        .collect();
    let mut remaining = result.acked;
    // An event stream never ends: no overall timeout, only the idle one below.
    let client = rest_client(hub, None)?;
    let mut url = reqwest::Url::parse(&format!("https://{}/events", hub.rest_authority))?;
    url.query_pairs_mut()
        .append_pair("api-version", API_VERSION)
        .append_pair("consumerGroup", "$Default")
        .append_pair("from", since.unwrap_or("start"));
    let mut response = client
        .get(url)
        .header(reqwest::header::AUTHORIZATION, hub.service_token()?)
        .send()
        .await
        .context("GET /events")?;
    if !response.status().is_success() {
        let status = response.status();
        bail!(
            "GET /events answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let (mut read, mut duplicates) = (0u64, 0u64);
    let mut buf: Vec<u8> = Vec::new();
    while remaining > 0 {
        let chunk = match timeout(idle, response.chunk()).await {
            Ok(chunk) => chunk.context("reading /events")?,
            Err(_) => break,
        };
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let Some(device) = event.get("deviceId").and_then(Value::as_str) else {
                continue;
            };
            let Some(set) = missing.get_mut(device) else {
                continue;
            };
            let seq = event
                .get("body")
                .and_then(Value::as_str)
                .and_then(|b| serde_json::from_str::<Value>(b).ok())
                .and_then(|b| b.get("seq").and_then(Value::as_u64));
            let Some(seq) = seq else { continue };
            read += 1;
            if !seen.insert((device.to_owned(), seq)) {
                duplicates += 1;
            }
            if set.remove(&seq) {
                remaining -= 1;
            }
        }
    }
    for (device, set) in &missing {
        let mut seqs: Vec<_> = set.iter().collect();
        seqs.sort_unstable();
        for s in seqs {
            result.lose(format!("telemetry {device} seq {s}"));
        }
    }
    Ok((result, read, duplicates))
}

/// Connects as each C2D target device and takes everything queued for it (completing it).
async fn check_c2d(hub: &Hub, acked: &Acked, idle: Duration) -> Result<KindResult> {
    let mut result = KindResult {
        acked: acked.c2d.values().map(|s| s.len() as u64).sum(),
        ..KindResult::default()
    };
    if result.acked == 0 {
        return Ok(result);
    }
    let key = acked
        .keys
        .last()
        .context("the ack log has no K line (the device key)")?;
    if acked.keys.len() > 1 {
        bail!("C2D check of logs from several writers: check one trial's log at a time");
    }
    let connector =
        Arc::new(Connector::new(hub, key.clone(), false, Duration::from_secs(10)).await?);
    let mut tasks = JoinSet::new();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
    for (device, mids) in &acked.c2d {
        let (device, mut mids) = (device.clone(), mids.clone());
        let connector = Arc::clone(&connector);
        let semaphore = Arc::clone(&semaphore);
        tasks.spawn(async move {
            let _permit = semaphore.acquire().await;
            let drained = drain_c2d(&connector, &device, &mut mids, idle).await;
            (device, mids, drained)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (device, mids, drained) = joined.context("a C2D reader panicked")?;
        drained.with_context(|| format!("reading the C2D queue of {device}"))?;
        let mut mids: Vec<_> = mids.into_iter().collect();
        mids.sort();
        for m in mids {
            result.lose(format!("c2d {device} {m}"));
        }
    }
    Ok(result)
}

/// Receives `device`'s C2D messages, removing each from `mids`, until none is left or the hub
/// sends nothing for `idle`.
async fn drain_c2d(
    connector: &Connector,
    device: &str,
    mids: &mut HashSet<String>,
    idle: Duration,
) -> Result<()> {
    let mut stream = connector
        .connect(device)
        .await
        .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
    let mut input = BytesMut::with_capacity(4096);
    subscribe(
        &mut stream,
        &mut input,
        format!("devices/{device}/messages/devicebound/#"),
    )
    .await?;
    while !mids.is_empty() {
        let packet = match timeout(idle, next_packet(&mut stream, &mut input)).await {
            Ok(p) => p?,
            Err(_) => break,
        };
        if let Packet::Publish(p) = packet {
            mids.remove(String::from_utf8_lossy(&p.payload).as_ref());
            if p.qos == QoS::AtLeastOnce {
                send(&mut stream, &Packet::PubAck(p.packet_id)).await?;
            }
        }
    }
    let _ = send(&mut stream, &Packet::Disconnect).await;
    Ok(())
}

async fn get_json(
    client: &reqwest::Client,
    url: String,
    auth: &str,
) -> Result<(StatusCode, Value)> {
    let r = client
        .get(&url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = r.status();
    let body = r.bytes().await.with_context(|| format!("GET {url}"))?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

async fn check_twins(
    client: &reqwest::Client,
    base: &str,
    auth: &str,
    acked: &Acked,
) -> Result<KindResult> {
    let mut result = KindResult {
        acked: acked.twin_acks,
        ..KindResult::default()
    };
    for (device, (seq, version)) in &acked.twin {
        let url = format!("{base}/twins/{device}?api-version={API_VERSION}");
        let (status, twin) = get_json(client, url, auth).await?;
        if !status.is_success() {
            result.lose(format!("twin {device}: GET answered {status}"));
            continue;
        }
        let reported = &twin["properties"]["reported"];
        let have_seq = reported["seq"].as_u64().unwrap_or(0);
        let have_version = reported["$version"].as_u64().unwrap_or(0);
        // Later patches may have been applied without their answer arriving: at least, not equal.
        if have_seq < *seq || have_version < *version {
            result.lose(format!(
                "twin {device}: acked seq {seq} at version {version}, the twin has seq {have_seq} \
                 at version {have_version}"
            ));
        }
    }
    Ok(result)
}

async fn check_registry(
    client: &reqwest::Client,
    base: &str,
    auth: &str,
    acked: &Acked,
) -> Result<KindResult> {
    let mut result = KindResult {
        acked: acked.created.len() as u64,
        ..KindResult::default()
    };
    let mut tasks = JoinSet::new();
    for chunk in acked.created.chunks(acked.created.len().div_ceil(8).max(1)) {
        let (client, chunk) = (client.clone(), chunk.to_vec());
        let (base, auth) = (base.to_owned(), auth.to_owned());
        tasks.spawn(async move {
            let mut missing = Vec::new();
            for device in chunk {
                let url = format!("{base}/devices/{device}?api-version={API_VERSION}");
                let (status, _) = get_json(&client, url, &auth).await?;
                if !status.is_success() {
                    missing.push(format!("device {device}: GET answered {status}"));
                }
            }
            Ok::<_, anyhow::Error>(missing)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        for m in joined.context("a registry reader panicked")?? {
            result.lose(m);
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_answers_are_matched_by_rid() {
        assert_eq!(
            twin_answer("$iothub/twin/res/204/?$rid=7&$version=12", 7),
            Some((204, Some(12)))
        );
        assert_eq!(
            twin_answer("$iothub/twin/res/204/?$rid=8&$version=12", 7),
            None
        );
        assert_eq!(
            twin_answer("$iothub/twin/res/400/?$rid=7", 7),
            Some((400, None))
        );
        assert_eq!(twin_answer("$iothub/methods/POST/x/?$rid=7", 7), None);
    }

    #[test]
    fn ack_logs_are_read_and_torn_lines_ignored() -> Result<()> {
        let path = std::env::temp_dir().join(format!("crash-acks-{}", std::process::id()));
        std::fs::write(
            &path,
            "K abc\nT d1 1\nT d1 2\nC c1 m1\nR t1 3 4\nR t1 2 3\nD r1\nT d1 ",
        )?;
        let a = Acked::read(std::slice::from_ref(&path))?;
        std::fs::remove_file(&path)?;
        assert_eq!(a.keys, ["abc"]);
        assert_eq!(a.telemetry["d1"].len(), 2);
        assert!(a.c2d["c1"].contains("m1"));
        assert_eq!(a.twin["t1"], (3, 4));
        assert_eq!(a.twin_acks, 2);
        assert_eq!(a.created, ["r1"]);
        Ok(())
    }
}
