//! `telemetry`: sustained QoS 1 device-to-cloud messages over TLS with a fixed number of PUBLISHes
//! in flight per connection; measures acknowledged messages per second, PUBACK latency and server
//! CPU per message. Drives a Ferrohub hub (registered devices with SAS tokens) or, to compare
//! against, a plain MQTT broker (anonymous clients publishing to the same topics).
//!
//! This module holds the flags and the run from start to RESULT line; the publishers, reaching
//! the server under test and the report are submodules.

pub(crate) mod publisher;
mod report;
pub(crate) mod target;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio::time::sleep_until;

use super::ensure_descriptors;
use super::push::{self, Window};
use crate::hub::HubArgs;
use crate::procfs;
use crate::registry::FleetArgs;
use publisher::spawn_publishers;
use report::{collect, Figures};
use target::{connect_all, resolve};

/// Headroom for the tasks to start before the common start instant, so connection 0 does not
/// get a head start on connection N-1.
const START_DELAY: Duration = Duration::from_millis(100);

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
    /// Bodies are the JSON telemetry of an IoT Plug and Play thermostat,
    /// `{"temperature":21.5}` padded with spaces to --body-bytes, sent with
    /// `$.ct=application/json` and `$.ce=utf-8`, instead of printable filler.
    #[arg(long)]
    pub json_body: bool,
    /// An application property `NAME=VALUE` on every message (repeatable), for routing
    /// conditions to read.
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,
    /// Devices announce this IoT Plug and Play model id when they connect (ferrohub target), so
    /// the hub checks their traffic against the model, e.g. `dtmi:com:example:Thermostat;1`.
    #[arg(long)]
    pub model_id: Option<String>,
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

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
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
        if self.json_body && self.body_bytes < publisher::JSON_BODY.len() {
            bail!(
                "--json-body needs --body-bytes of at least {}",
                publisher::JSON_BODY.len()
            );
        }
        if self.model_id.is_some() && self.target != Target::Ferrohub {
            bail!("--model-id needs --target ferrohub");
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
