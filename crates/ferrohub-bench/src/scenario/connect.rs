//! `connect`: how fast the hub accepts new device connections, how much server CPU each costs,
//! and how much server memory an idle connection holds.

use crate::scenario::round3;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrohub_iothub::sas::generate_key;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ensure_descriptors, percentile};
use crate::device::{self, CloseOutcome, Connector, MqttStream};
use crate::hub::{Hub, HubArgs};
use crate::procfs::{self, ProcSample};
use crate::registry::{self, FleetArgs};

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Connects (TCP + TLS + CONNECT/CONNACK) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds all connections stay idle before the server's memory is measured.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// Let simulated devices resume each other's TLS sessions (default: every handshake is full,
    /// as for distinct devices).
    #[arg(long)]
    pub resume: bool,
    /// Seconds the server idles after the last connection closed before its memory is read
    /// again, to see how much it gives back.
    #[arg(long, default_value_t = 5)]
    pub closed_idle_secs: u64,
    /// Seconds before one connect attempt counts as failed.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
}

/// Failures of one kind: how many, and one full message to show what they were.
#[derive(Debug)]
struct FailureKind {
    count: usize,
    example: String,
}

/// What one connect worker did.
#[derive(Default)]
struct WorkerReport {
    latencies_us: Vec<u64>,
    failures: BTreeMap<String, FailureKind>,
    /// Tasks holding the established connections; each ends by closing its connection, or with
    /// `None` if the server closed it first.
    holders: Vec<JoinHandle<Option<CloseOutcome>>>,
}

/// State the connect workers share.
struct Phase {
    connector: Connector,
    fleet: FleetArgs,
    next: AtomicUsize,
    connected: AtomicUsize,
    /// Connections the server closed while the bench was holding them.
    dropped: Arc<AtomicUsize>,
    stop: watch::Receiver<bool>,
}

impl Phase {
    async fn work(self: Arc<Self>) -> WorkerReport {
        let mut report = WorkerReport::default();
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.fleet.devices {
                return report;
            }
            let id = self.fleet.device_id(index);
            let started = Instant::now();
            match self.connector.connect(&id).await {
                Ok(stream) => {
                    report
                        .latencies_us
                        .push(started.elapsed().as_micros() as u64);
                    self.connected.fetch_add(1, Ordering::Relaxed);
                    report.holders.push(tokio::spawn(hold(
                        stream,
                        self.stop.clone(),
                        Arc::clone(&self.dropped),
                    )));
                }
                Err(failure) => {
                    report
                        .failures
                        .entry(failure.category())
                        .or_insert_with(|| FailureKind {
                            count: 0,
                            example: format!("{id}: {failure}"),
                        })
                        .count += 1;
                }
            }
        }
    }
}

/// Keeps a connection open and silent until told to stop. Reading is only to notice the server
/// closing it; nothing is expected, so the scratch buffer is tiny.
async fn hold(
    mut stream: MqttStream,
    mut stop: watch::Receiver<bool>,
    dropped: Arc<AtomicUsize>,
) -> Option<CloseOutcome> {
    let mut scratch = [0u8; 32];
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            read = stream.read(&mut scratch) => match read {
                Ok(0) | Err(_) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Ok(_) => {}
            },
        }
    }
    Some(device::disconnect(stream).await)
}

/// Server measurements at the three instants that matter.
struct ServerSamples {
    pid: u32,
    before: ProcSample,
    connected: ProcSample,
    idle: ProcSample,
}

pub async fn run(args: ConnectArgs) -> Result<()> {
    args.fleet.validate()?;
    let n = args.fleet.devices;
    let nofile = ensure_descriptors(n)?;
    let hub = Hub::resolve(&args.hub)?;
    let ticks_per_sec = procfs::clock_ticks_per_sec();
    let server_sample = |pid: u32| {
        procfs::sample(pid).with_context(|| {
            format!("measuring server pid {pid} (is it running? --server-pid overrides hub.json)")
        })
    };
    // Fail before the long registration if the pid is stale.
    if let Some(pid) = hub.server_pid {
        server_sample(pid)?;
    }

    println!(
        "connect: {n} devices {}..{}, concurrency {}, TLS resumption {}, open-file limit {nofile}",
        args.fleet.device_id(0),
        args.fleet.device_id(n - 1),
        args.concurrency,
        if args.resume { "on" } else { "off" },
    );
    println!(
        "hub: HostName {}, REST https://{}, CA {}, server pid {}",
        hub.host_name,
        hub.rest_authority,
        hub.ca_file.display(),
        hub.server_pid.map_or_else(
            || "unknown (no server figures)".to_owned(),
            |p| p.to_string()
        ),
    );

    let device_key = generate_key();
    let registration = registry::register(&hub, &args.fleet, &device_key).await?;
    let reg_secs = registration.elapsed.as_secs_f64();
    println!(
        "registration: {n} devices in {reg_secs:.2} s ({:.0}/s): {} created, {} already existed (key replaced)",
        n as f64 / reg_secs.max(1e-9),
        registration.created,
        registration.overwritten,
    );

    let connector = Connector::new(
        &hub,
        device_key,
        args.resume,
        Duration::from_secs(args.connect_timeout_secs),
    )
    .await?;
    println!(
        "mqtt: {} (TLS server name {})",
        connector.addr(),
        hub.hostname
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let phase = Arc::new(Phase {
        connector,
        fleet: args.fleet.clone(),
        next: AtomicUsize::new(0),
        connected: AtomicUsize::new(0),
        dropped: Arc::new(AtomicUsize::new(0)),
        stop: stop_rx,
    });

    let server_before = hub.server_pid.map(server_sample).transpose()?;
    let bench_cpu_before = procfs::self_cpu_secs();
    let bench_rss_before = procfs::self_rss_kib();
    let started = Instant::now();
    let progress = tokio::spawn(report_progress(Arc::clone(&phase), started));
    let workers: Vec<_> = (0..args.concurrency.clamp(1, n))
        .map(|_| tokio::spawn(Arc::clone(&phase).work()))
        .collect();
    let mut latencies_us = Vec::with_capacity(n);
    let mut failures: BTreeMap<String, FailureKind> = BTreeMap::new();
    let mut holders = Vec::with_capacity(n);
    for worker in workers {
        let report = worker.await.context("connect worker panicked")?;
        latencies_us.extend(report.latencies_us);
        holders.extend(report.holders);
        for (kind, f) in report.failures {
            failures
                .entry(kind)
                .and_modify(|total| total.count += f.count)
                .or_insert(f);
        }
    }
    let connect_wall = started.elapsed();
    progress.abort();
    let server_connected = hub.server_pid.map(server_sample).transpose()?;
    let bench_cpu = procfs::self_cpu_secs() - bench_cpu_before;

    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let server = match (hub.server_pid, server_before, server_connected) {
        (Some(pid), Some(before), Some(connected)) => Some(ServerSamples {
            pid,
            before,
            connected,
            idle: server_sample(pid)?,
        }),
        _ => None,
    };
    let bench_rss_idle = procfs::self_rss_kib();
    let dropped = phase.dropped.load(Ordering::Relaxed);

    let closing = Instant::now();
    // Receivers only fail if every holder has already ended, which is fine.
    let _ = stop_tx.send(true);
    let mut closes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for holder in holders {
        let key = match holder.await {
            Ok(Some(CloseOutcome::ServerClosed)) => "server_closed",
            Ok(Some(CloseOutcome::ServerKeptOpen)) => "server_kept_open",
            Ok(Some(CloseOutcome::WriteFailed)) => "write_failed",
            Ok(None) => "dropped_earlier",
            Err(_) => "task_failed",
        };
        *closes.entry(key).or_default() += 1;
    }
    let close_secs = closing.elapsed().as_secs_f64();
    // A moment for the server to finish tearing sessions down before its memory is read again.
    let server_rss_closed_kib = match &server {
        Some(s) => {
            tokio::time::sleep(Duration::from_secs(args.closed_idle_secs)).await;
            Some(procfs::rss_kib(s.pid)?)
        }
        None => None,
    };

    latencies_us.sort_unstable();
    let connected = latencies_us.len();
    let figures = Figures {
        n,
        connected,
        connect_secs: connect_wall.as_secs_f64(),
        latencies_us: &latencies_us,
        server: server.as_ref(),
        ticks_per_sec,
        hold_secs: args.hold_secs,
        bench_cpu,
        bench_rss_before,
        bench_rss_idle,
        server_rss_closed_kib,
        closed_idle_secs: args.closed_idle_secs,
    };
    figures.print(&failures, dropped, &closes, close_secs);

    let mut result = figures.json();
    if let Value::Object(map) = &mut result {
        let extra = json!({
            "scenario": "connect",
            "concurrency": args.concurrency,
            "resume": args.resume,
            "registration_secs": round3(reg_secs),
            "registered_created": registration.created,
            "registered_overwritten": registration.overwritten,
            "failed": n - connected,
            "failures": failures.iter().map(|(k, f)| (k.clone(), json!(f.count))).collect::<serde_json::Map<_, _>>(),
            "dropped_while_idle": dropped,
            "close": closes,
            "close_secs": round3(close_secs),
        });
        if let Value::Object(extra) = extra {
            map.extend(extra);
        }
    }
    println!("RESULT {result}");
    Ok(())
}

/// Prints `connected/N` every few seconds so a slow server is visible while it happens.
async fn report_progress(phase: Arc<Phase>, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!(
            "  … {:.0} s: {} of {} connected",
            started.elapsed().as_secs_f64(),
            phase.connected.load(Ordering::Relaxed),
            phase.fleet.devices
        );
    }
}

/// The measured figures and the arithmetic on them, shared by the human and the JSON output.
struct Figures<'a> {
    n: usize,
    connected: usize,
    connect_secs: f64,
    latencies_us: &'a [u64],
    server: Option<&'a ServerSamples>,
    ticks_per_sec: u64,
    hold_secs: u64,
    bench_cpu: f64,
    bench_rss_before: Option<u64>,
    bench_rss_idle: Option<u64>,
    server_rss_closed_kib: Option<u64>,
    closed_idle_secs: u64,
}

impl Figures<'_> {
    /// Successful connects per second of connect-phase wall time; equals N / wall time when all
    /// succeed, and does not flatter a server that refuses quickly.
    fn connects_per_sec(&self) -> f64 {
        self.connected as f64 / self.connect_secs.max(1e-9)
    }

    fn latency_ms(&self, p: f64) -> f64 {
        percentile(self.latencies_us, p) as f64 / 1000.0
    }

    fn server_cpu_secs(&self) -> Option<f64> {
        self.server.map(|s| {
            s.connected.cpu_ticks.saturating_sub(s.before.cpu_ticks) as f64
                / self.ticks_per_sec as f64
        })
    }

    fn server_idle_cpu_secs(&self) -> Option<f64> {
        self.server.map(|s| {
            s.idle.cpu_ticks.saturating_sub(s.connected.cpu_ticks) as f64
                / self.ticks_per_sec as f64
        })
    }

    /// None when the server used less than one clock tick: the ratio would be meaningless.
    fn connects_per_server_cpu_sec(&self) -> Option<f64> {
        self.server_cpu_secs()
            .filter(|&cpu| cpu > 0.0)
            .map(|cpu| self.connected as f64 / cpu)
    }

    /// Per successful connection, which is N when all succeed.
    fn server_rss_per_conn_kib(&self) -> Option<f64> {
        let s = self.server?;
        (self.connected > 0)
            .then(|| (s.idle.rss_kib as f64 - s.before.rss_kib as f64) / self.connected as f64)
    }

    fn bench_rss_per_conn_kib(&self) -> Option<f64> {
        let (before, idle) = (self.bench_rss_before?, self.bench_rss_idle?);
        (self.connected > 0).then(|| (idle as f64 - before as f64) / self.connected as f64)
    }

    fn print(
        &self,
        failures: &BTreeMap<String, FailureKind>,
        dropped: usize,
        closes: &BTreeMap<&'static str, usize>,
        close_secs: f64,
    ) {
        println!(
            "connect phase: {}/{} connected in {:.2} s: {:.0} connects/s",
            self.connected,
            self.n,
            self.connect_secs,
            self.connects_per_sec()
        );
        if !self.latencies_us.is_empty() {
            println!(
                "connect latency (TCP+TLS+CONNACK): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                self.latency_ms(50.0),
                self.latency_ms(90.0),
                self.latency_ms(99.0),
                self.latency_ms(100.0)
            );
        }
        if !failures.is_empty() {
            println!("failures: {}", self.n - self.connected);
            for (kind, f) in failures {
                println!("  {kind:<24} {:>7}   e.g. {}", f.count, f.example);
            }
        }
        match (self.server, self.server_cpu_secs()) {
            (Some(s), Some(cpu)) => {
                println!(
                    "server pid {}: {cpu:.2} CPU-s during the connect phase ({} ticks/s): {}",
                    s.pid,
                    self.ticks_per_sec,
                    self.connects_per_server_cpu_sec().map_or_else(
                        || "too little CPU to compute connects per CPU-second".to_owned(),
                        |r| format!("{r:.0} connects per server CPU-second")
                    )
                );
                println!(
                    "server RSS: {:.1} MiB before, {:.1} MiB after {} s idle: {} per idle connection",
                    s.before.rss_kib as f64 / 1024.0,
                    s.idle.rss_kib as f64 / 1024.0,
                    self.hold_secs,
                    self.server_rss_per_conn_kib()
                        .map_or_else(|| "n/a".to_owned(), |k| format!("{k:.1} KiB")),
                );
                println!(
                    "  (meaningful on a freshly started server only: memory freed by earlier \
                     connections stays with the allocator and hides new growth)"
                );
                println!(
                    "server CPU while idle: {:.2} s over {} s",
                    self.server_idle_cpu_secs().unwrap_or(0.0),
                    self.hold_secs
                );
            }
            _ => println!("server: pid unknown, no server CPU or memory figures"),
        }
        println!(
            "bench (for context): {:.2} CPU-s during the connect phase, {} per held connection",
            self.bench_cpu,
            self.bench_rss_per_conn_kib()
                .map_or_else(|| "n/a".to_owned(), |k| format!("{k:.1} KiB RSS")),
        );
        if dropped > 0 {
            println!("server closed {dropped} connections while they were idle");
        }
        if !closes.is_empty() {
            let closed: Vec<String> = closes.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!(
                "closing: DISCONNECT sent, {} in {close_secs:.2} s",
                closed.join(", ")
            );
        }
        if let (Some(kib), Some(s)) = (self.server_rss_closed_kib, self.server) {
            println!(
                "server RSS {} s after closing: {:.1} MiB (before connecting {:.1} MiB)",
                self.closed_idle_secs,
                kib as f64 / 1024.0,
                s.before.rss_kib as f64 / 1024.0
            );
        }
    }

    fn json(&self) -> Value {
        json!({
            "devices": self.n,
            "connected": self.connected,
            "connect_secs": round3(self.connect_secs),
            "connects_per_sec": round3(self.connects_per_sec()),
            "attempts_per_sec": round3(self.n as f64 / self.connect_secs.max(1e-9)),
            "latency_ms": {
                "p50": self.latency_ms(50.0),
                "p90": self.latency_ms(90.0),
                "p99": self.latency_ms(99.0),
                "max": self.latency_ms(100.0),
            },
            "server_pid": self.server.map(|s| s.pid),
            "clk_tck": self.ticks_per_sec,
            "server_cpu_secs": self.server_cpu_secs().map(round3),
            "connects_per_server_cpu_sec": self.connects_per_server_cpu_sec().map(round3),
            "server_rss_before_kib": self.server.map(|s| s.before.rss_kib),
            "server_rss_connected_kib": self.server.map(|s| s.connected.rss_kib),
            "server_rss_after_kib": self.server.map(|s| s.idle.rss_kib),
            "server_rss_per_conn_kib": self.server_rss_per_conn_kib().map(round3),
            "server_rss_closed_kib": self.server_rss_closed_kib,
            "closed_idle_secs": self.closed_idle_secs,
            "server_idle_cpu_secs": self.server_idle_cpu_secs().map(round3),
            "hold_secs": self.hold_secs,
            "bench_cpu_secs": round3(self.bench_cpu),
            "bench_rss_per_conn_kib": self.bench_rss_per_conn_kib().map(round3),
        })
    }
}
