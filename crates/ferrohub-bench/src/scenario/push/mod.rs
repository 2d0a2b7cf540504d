//! What the hub-feature scenarios (`c2d`, `methods`, `twin-reported`) share: their flags, the
//! fleet of registered, connected and subscribed devices, a device task that reacts to what the
//! hub pushes, the open-loop schedule of operations at a fixed rate, the measured window (server
//! CPU included), and the summary every one of them prints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use ferrohub_iothub::sas::generate_key;
use ferrohub_mqtt::{decode, encode, Packet, QoS, Subscribe, SubscribeReturnCode};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::sleep_until;

use super::ensure_descriptors;
use crate::device::{self, CloseOutcome, Connector, MqttStream};
use crate::hub::{Hub, HubArgs};
use crate::procfs;
use crate::registry::{self, FleetArgs};

/// C2D topics carry the whole property bag; 64 KiB is far above anything the scenarios send.
pub const MAX_INBOUND_PACKET: usize = 64 * 1024;
/// Headroom for the tasks to start before the common start instant.
const START_DELAY: Duration = Duration::from_millis(200);
/// An operation this far behind its schedule counts as late: the generator (or a full request
/// pool) could not keep up with --rate. Above tokio's 1 ms timer resolution, which alone makes
/// paced operations up to a millisecond late.
pub const LATE: Duration = Duration::from_millis(2);
/// Longest the bench waits, after the measured window, for operations still under way.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Flags every push scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Operations per second over the whole fleet, on a fixed schedule (open loop: an operation
    /// starts when due whether or not earlier ones have finished).
    #[arg(long)]
    pub rate: f64,
    /// Length of the measured window, after the warm-up.
    #[arg(long = "secs", visible_alias = "seconds", default_value_t = 10)]
    pub secs: u64,
    /// Seconds at the same rate before the measured window, not counted.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// Connects in flight at once while the devices connect.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Seconds before one connect (or its SUBACK) counts as failed.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
}

impl PushArgs {
    pub fn validate(&self) -> Result<()> {
        self.fleet.validate()?;
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a positive number of operations per second");
        }
        if self.secs == 0 {
            bail!("--secs must be at least 1");
        }
        if !(self.warmup_secs >= 0.0 && self.warmup_secs.is_finite()) {
            bail!("--warmup-secs must be a non-negative number");
        }
        Ok(())
    }
}

/// The phases of a run, fixed before it starts.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Payload timestamps count microseconds from here, so the receiving side (another task of
    /// this process) can compute a latency from the payload alone.
    pub epoch: Instant,
    /// The first operation is due here; warm-up until `window_start`.
    pub start: Instant,
    pub window_start: Instant,
    /// No operation is due at or after this.
    pub window_end: Instant,
}

impl Schedule {
    pub fn new(args: &PushArgs) -> Schedule {
        let epoch = Instant::now();
        let start = epoch + START_DELAY;
        let window_start = start + Duration::from_secs_f64(args.warmup_secs);
        Schedule {
            epoch,
            start,
            window_start,
            window_end: window_start + Duration::from_secs(args.secs),
        }
    }

    /// Whether an operation due at `at` belongs to the measured window.
    pub fn measured(&self, at: Instant) -> bool {
        at >= self.window_start && at < self.window_end
    }

    /// `at` as microseconds since the epoch.
    pub fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }
}

/// Calls `issue(k, due)` for k = 0, 1, 2, … with operation k due at `start + k / rate`, from the
/// schedule's start up to the end of its window. Due times are computed from k, not by adding
/// intervals, so rounding never drifts the rate. Returns how many operations were issued.
pub async fn open_loop(schedule: &Schedule, rate: f64, mut issue: impl FnMut(u64, Instant)) -> u64 {
    let mut k = 0u64;
    loop {
        let due = schedule.start + Duration::from_secs_f64(k as f64 / rate);
        if due >= schedule.window_end {
            return k;
        }
        if due > Instant::now() {
            sleep_until(due.into()).await;
        }
        issue(k, due);
        k += 1;
    }
}

/// Runs [`open_loop`] as a task of its own, so the issuing runs on a runtime worker (whose
/// spawns go to its local queue) rather than on the thread that drives the scenario.
pub fn spawn_open_loop(
    schedule: Schedule,
    rate: f64,
    issue: impl FnMut(u64, Instant) + Send + 'static,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move { open_loop(&schedule, rate, issue).await })
}

/// The counters an open-loop scenario keeps for its operations.
pub trait OpenLoopState: Send + Sync + 'static {
    fn progress(&self) -> &Progress;
    /// Operations due inside the measured window.
    fn offered(&self) -> &AtomicU64;
    /// Operations of the measured window that succeeded.
    fn succeeded(&self) -> &AtomicU64;
    fn failures(&self) -> &Mutex<Failures>;
}

/// Ends an open-loop slot: a success of the measured window adds `elapsed` to `latency`; a
/// failure `(kind, example)` is counted, its example prefixed with `which()` (what failed).
pub fn finish_slot<S: OpenLoopState>(
    state: &S,
    latency: &Mutex<Histogram<u64>>,
    measured: bool,
    elapsed: Duration,
    failure: Option<(String, String)>,
    which: impl FnOnce() -> String,
) {
    let ok = failure.is_none();
    match failure {
        None => {
            if measured {
                record(&mut lock(latency), elapsed);
                state.succeeded().fetch_add(1, Ordering::Relaxed);
            }
        }
        Some((kind, example)) => {
            lock(state.failures()).add(kind, || format!("{}: {example}", which()))
        }
    }
    state.progress().finished(ok);
}

/// Runs a scenario's open-loop load to the end of its schedule: each due slot starts `op` on
/// its own task, whether or not earlier ones finished. Returns the measured window's figures.
pub async fn run_open_loop<S, Fut>(
    state: &Arc<S>,
    schedule: Schedule,
    rate: f64,
    op: fn(Arc<S>, u64, Instant) -> Fut,
    server_pid: Option<u32>,
    unit: &str,
) -> Result<Window>
where
    S: OpenLoopState,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let issuer = {
        let state = Arc::clone(state);
        spawn_open_loop(schedule, rate, move |seq, due| {
            if schedule.measured(due) {
                state.offered().fetch_add(1, Ordering::Relaxed);
            }
            state.progress().started();
            tokio::spawn(op(Arc::clone(&state), seq, due));
        })
    };
    let (issued, window) = tokio::join!(
        issuer,
        measure(
            schedule.window_start,
            schedule.window_end,
            &state.progress().completed,
            server_pid,
            unit
        )
    );
    issued.context("the schedule panicked")?;
    window
}

/// The next MQTT packet identifier after `last` that no unacknowledged packet holds.
pub fn next_packet_id(last: &mut u16, unacked: &std::collections::HashSet<u16>) -> u16 {
    loop {
        *last = last.checked_add(1).unwrap_or(1);
        if !unacked.contains(last) {
            return *last;
        }
    }
}

/// Starts an open-loop slot: waits for a request permit, then counts how late the slot began
/// if it lies in the measured window. Returns the permit, the start and whether it is measured.
pub async fn start_slot(
    permits: &Arc<tokio::sync::Semaphore>,
    schedule: &Schedule,
    due: Instant,
    late: &AtomicU64,
    lag: &Mutex<Histogram<u64>>,
) -> (Option<tokio::sync::OwnedSemaphorePermit>, Instant, bool) {
    // The semaphores are never closed; without a permit the slot just runs unbounded.
    let permit = permits.clone().acquire_owned().await.ok();
    let start = Instant::now();
    let measured = schedule.measured(due);
    if measured {
        let behind = start.saturating_duration_since(due);
        if behind > LATE {
            late.fetch_add(1, Ordering::Relaxed);
        }
        record(&mut lock(lag), behind);
    }
    (permit, start, measured)
}

/// A latency histogram in microseconds that grows to fit what it is given.
pub fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures are supported")
}

pub fn record(h: &mut Histogram<u64>, elapsed: Duration) {
    let us = elapsed.as_micros() as u64;
    // `record` grows the histogram as needed; `saturating_record` clamps to its current range.
    if h.record(us).is_err() {
        h.saturating_record(us);
    }
}

/// Failures by kind: how many, and one example.
#[derive(Debug, Default)]
pub struct Failures(BTreeMap<String, (u64, String)>);

impl Failures {
    pub fn add(&mut self, kind: impl Into<String>, example: impl FnOnce() -> String) {
        self.0
            .entry(kind.into())
            .or_insert_with(|| (0, example()))
            .0 += 1;
    }

    pub fn add_n(&mut self, kind: &str, n: u64, example: String) {
        if n > 0 {
            self.0.entry(kind.to_owned()).or_insert((0, example)).0 += n;
        }
    }

    pub fn merge(&mut self, other: Failures) {
        for (kind, (count, example)) in other.0 {
            self.0.entry(kind).or_insert((0, example)).0 += count;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|(count, _)| count).sum()
    }

    fn json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(kind, (count, _))| (kind.clone(), json!(count)))
                .collect(),
        )
    }
}

/// Counters the operations update and the measuring task reads, shared by every task.
#[derive(Default)]
pub struct Progress {
    /// Operations completed successfully, all phases: the measured figure is the difference
    /// across the window.
    pub completed: AtomicU64,
    /// Operations under way (issued, not finished).
    pub outstanding: AtomicU64,
}

impl Progress {
    pub fn started(&self) {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self, ok: bool) {
        if ok {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

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

/// Waits until `done()` holds or `timeout` passes; true when it held.
pub async fn drain(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
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

/// What happened during the measured window.
pub struct Window {
    pub secs: f64,
    /// Operations completed successfully in the window.
    pub completed: u64,
    /// Completions in each whole second of the window, to show whether the rate was steady.
    pub per_second: Vec<u64>,
    /// Server CPU time in the window, and its memory at the end.
    pub server: Option<(f64, u64)>,
    pub bench_cpu_secs: f64,
    pub machine_busy_secs: f64,
}

/// Waits for the window `[start, end)` to open, then counts `completed` and CPU time until it
/// closes. `unit` names what is counted in the progress lines.
pub async fn measure(
    start: Instant,
    end: Instant,
    completed: &AtomicU64,
    server_pid: Option<u32>,
    unit: &str,
) -> Result<Window> {
    let ticks_per_sec = procfs::clock_ticks_per_sec() as f64;
    sleep_until(start.into()).await;
    let t0 = Instant::now();
    let done0 = completed.load(Ordering::Relaxed);
    let server0 = server_pid.map(procfs::sample).transpose()?;
    let bench0 = procfs::self_cpu_secs();
    let machine0 = procfs::machine_busy_ticks()?;
    let seconds = end.saturating_duration_since(start).as_secs();
    let mut per_second = Vec::with_capacity(seconds as usize);
    let mut last = done0;
    for s in 1..=seconds {
        sleep_until((start + Duration::from_secs(s)).into()).await;
        let now = completed.load(Ordering::Relaxed);
        per_second.push(now - last);
        if s % 5 == 0 && s < seconds {
            eprintln!("  … {s} s: {} {unit} in the last second", now - last);
        }
        last = now;
    }
    let t1 = Instant::now();
    let done1 = completed.load(Ordering::Relaxed);
    let server1 = server_pid.map(procfs::sample).transpose()?;
    let bench1 = procfs::self_cpu_secs();
    let machine1 = procfs::machine_busy_ticks()?;
    Ok(Window {
        secs: (t1 - t0).as_secs_f64(),
        completed: done1 - done0,
        per_second,
        server: server0.zip(server1).map(|(a, b)| {
            (
                b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks_per_sec,
                b.rss_kib,
            )
        }),
        bench_cpu_secs: bench1 - bench0,
        machine_busy_secs: machine1.saturating_sub(machine0) as f64 / ticks_per_sec,
    })
}

/// One latency figure of a scenario.
pub struct Latency {
    /// Short name, the key in the JSON output.
    pub key: &'static str,
    /// What is measured, from where to where, for the human output.
    pub label: &'static str,
    pub histogram: Histogram<u64>,
}

impl Latency {
    pub fn ms(&self, p: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_percentile(p) as f64 / 1000.0
    }

    fn json(&self) -> Value {
        json!({
            "p50": self.ms(50.0),
            "p90": self.ms(90.0),
            "p99": self.ms(99.0),
            "p999": self.ms(99.9),
            "max": self.ms(100.0),
            "mean": round3(self.histogram.mean() / 1000.0),
            "samples": self.histogram.len(),
        })
    }
}

/// Everything a push scenario reports.
pub struct Summary {
    pub scenario: &'static str,
    /// What one operation is, plural ("sends", "calls", "patches") and singular.
    pub unit: &'static str,
    pub one: &'static str,
    pub devices: usize,
    pub rate: f64,
    pub warmup_secs: f64,
    pub window: Window,
    /// Operations due in the measured window.
    pub offered: u64,
    /// Of those, how many succeeded.
    pub succeeded: u64,
    /// Operations due in the window that started more than LATE after they were due.
    pub late: u64,
    /// How far behind schedule the window's operations started (µs).
    pub lag: Histogram<u64>,
    pub latencies: Vec<Latency>,
    /// Every failure over the whole run, warm-up and drain included.
    pub failures: Failures,
    pub connections: Connections,
    pub server_pid: Option<u32>,
    /// Scenario-specific lines for the human output, and fields for the JSON.
    pub notes: Vec<String>,
    pub extra: Map<String, Value>,
}

impl Summary {
    fn achieved(&self) -> f64 {
        self.succeeded as f64 / self.window.secs.max(1e-9)
    }

    fn server_cpu_secs(&self) -> Option<f64> {
        self.window.server.map(|(cpu, _)| cpu)
    }

    /// Server CPU microseconds per operation completed in the window; None when the server used
    /// less than one clock tick or nothing completed.
    fn server_us_per_op(&self) -> Option<f64> {
        self.server_cpu_secs()
            .filter(|&cpu| cpu > 0.0 && self.window.completed > 0)
            .map(|cpu| cpu * 1e6 / self.window.completed as f64)
    }

    fn other_cpu_secs(&self) -> f64 {
        let w = &self.window;
        (w.machine_busy_secs - self.server_cpu_secs().unwrap_or(0.0) - w.bench_cpu_secs).max(0.0)
    }

    /// Over 5% of the machine's capacity went to neither the server nor the bench.
    fn contended(&self) -> bool {
        self.other_cpu_secs() > 0.05 * self.window.secs * num_cpus() as f64
    }

    fn failed(&self) -> u64 {
        self.failures.total() + self.connections.errors.total()
    }

    pub fn print(&self) {
        let (w, unit) = (&self.window, self.unit);
        println!(
            "{unit}: {} due in the {:.2} s window, {} succeeded: {:.0} {unit}/s of {:.0} offered \
             ({:.1}%); completions per second min {}, max {}",
            self.offered,
            w.secs,
            self.succeeded,
            self.achieved(),
            self.rate,
            self.achieved() / self.rate * 100.0,
            w.per_second.iter().min().unwrap_or(&0),
            w.per_second.iter().max().unwrap_or(&0),
        );
        println!(
            "schedule: {} {unit} of the window started more than {} ms late; lag p99 {:.3} ms, \
             max {:.3} ms",
            self.late,
            LATE.as_millis(),
            self.lag.value_at_percentile(99.0) as f64 / 1000.0,
            self.lag.max() as f64 / 1000.0,
        );
        for l in &self.latencies {
            println!(
                "{}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} samples)",
                l.label,
                l.ms(50.0),
                l.ms(90.0),
                l.ms(99.0),
                l.ms(100.0),
                l.histogram.len()
            );
        }
        for note in &self.notes {
            println!("{note}");
        }
        match (self.server_pid, self.server_cpu_secs()) {
            (Some(pid), Some(cpu)) => println!(
                "server pid {pid}: {cpu:.2} CPU-s in the window ({:.2} cores): {}; RSS {} MiB",
                cpu / w.secs.max(1e-9),
                self.server_us_per_op().map_or_else(
                    || "too little CPU to compute a per-operation figure".to_owned(),
                    |us| format!(
                        "{us:.1} µs per {}, {:.0} {unit} per server CPU-second",
                        self.one,
                        1e6 / us
                    )
                ),
                w.server.map_or(0, |(_, rss)| rss / 1024),
            ),
            _ => println!("server: pid unknown, no server CPU figures"),
        }
        println!(
            "machine: {:.2} CPU-s busy in the window: bench {:.2}, {:.2} neither server nor \
             bench{}",
            w.machine_busy_secs,
            w.bench_cpu_secs,
            self.other_cpu_secs(),
            if self.contended() {
                " (something else competed for the CPUs: figures are suspect)"
            } else {
                ""
            }
        );
        println!("failures over the whole run: {}", self.failed());
        for (kind, (count, example)) in self
            .failures
            .0
            .iter()
            .chain(self.connections.errors.0.iter())
        {
            println!("  {count:>7}  {kind}   e.g. {example}");
        }
        let closed: Vec<String> = self
            .connections
            .closes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("closing: DISCONNECT sent, {}", closed.join(", "));
        // The one line scripts read.
        println!("RESULT {}", self.json());
    }

    pub fn json(&self) -> Value {
        let w = &self.window;
        let mut failures = self.failures.json();
        if let (Value::Object(all), Value::Object(conns)) =
            (&mut failures, self.connections.errors.json())
        {
            all.extend(conns);
        }
        let mut v = json!({
            "scenario": self.scenario,
            "devices": self.devices,
            "rate_target": self.rate,
            "warmup_secs": self.warmup_secs,
            "measured_secs": round3(w.secs),
            "offered": self.offered,
            "succeeded": self.succeeded,
            "achieved_per_sec": round3(self.achieved()),
            "completed_in_window": w.completed,
            "per_second": w.per_second,
            "late": self.late,
            "lag_ms_p99": self.lag.value_at_percentile(99.0) as f64 / 1000.0,
            "latency_ms": Value::Object(
                self.latencies.iter().map(|l| (l.key.to_owned(), l.json())).collect()
            ),
            "failed": self.failed(),
            "failures": failures,
            "server_pid": self.server_pid,
            "server_cpu_secs": self.server_cpu_secs().map(round3),
            "server_cpu_us_per_op": self.server_us_per_op().map(round3),
            "ops_per_server_cpu_sec": self.server_us_per_op().map(|us| round3(1e6 / us)),
            "server_rss_kib": w.server.map(|(_, rss)| rss),
            "bench_cpu_secs": round3(w.bench_cpu_secs),
            "machine_busy_cpu_secs": round3(w.machine_busy_secs),
            "other_cpu_secs": round3(self.other_cpu_secs()),
            "contended": self.contended(),
            "cpus": num_cpus(),
            "close": self.connections.closes,
        });
        if let Value::Object(m) = &mut v {
            m.extend(self.extra.clone());
        }
        v
    }
}

/// A shared histogram for tasks that each record one sample.
pub type SharedHistogram = Mutex<Histogram<u64>>;

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking recorder leaves a histogram that is still a valid histogram.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The value of `key` in an MQTT topic's query (`…/?$rid=7&$version=3`), as sent.
pub fn topic_param<'a>(topic: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = topic.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_params_are_found_by_name() {
        let t = "$iothub/twin/res/204/?$rid=17&$version=4";
        assert_eq!(topic_param(t, "$rid"), Some("17"));
        assert_eq!(topic_param(t, "$version"), Some("4"));
        assert_eq!(topic_param(t, "x"), None);
        assert_eq!(topic_param("$iothub/methods/POST/echo/", "$rid"), None);
    }

    #[test]
    fn open_loop_issues_at_the_rate_until_the_window_ends() {
        let now = Instant::now();
        let schedule = Schedule {
            epoch: now,
            start: now,
            window_start: now + Duration::from_millis(10),
            window_end: now + Duration::from_millis(50),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
        let mut dues = Vec::new();
        let issued = runtime.block_on(open_loop(&schedule, 1000.0, |k, due| dues.push((k, due))));
        assert_eq!(issued, 50);
        assert_eq!(dues.len(), 50);
        assert_eq!(dues[10].1, now + Duration::from_millis(10));
        assert!(schedule.measured(dues[10].1));
        assert!(!schedule.measured(dues[9].1));
        assert_eq!(
            dues.iter().filter(|(_, d)| schedule.measured(*d)).count(),
            40
        );
    }

    #[test]
    fn failures_count_by_kind_and_keep_the_first_example() {
        let mut f = Failures::default();
        f.add("http 404", || "first".into());
        f.add("http 404", || "second".into());
        f.add_n("lost", 0, "never".into());
        f.add_n("lost", 3, "x".into());
        assert_eq!(f.total(), 5);
        assert_eq!(f.0["http 404"], (2, "first".to_owned()));
        assert!(!f.0.contains_key("never"));
    }
}
