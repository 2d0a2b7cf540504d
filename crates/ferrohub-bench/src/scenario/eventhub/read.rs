//! `eventhub-read`: fills the telemetry log through MQTT (or takes what it holds), then drains
//! it from the start with one AMQP receiver per partition; measures events read per second
//! until every retained event arrived, and server CPU per event. Every event's frame and
//! message are decoded and its sequence number checked against the one before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::sync::watch;

use super::fill::{self, Fill};
use super::{open_receivers, resolve, EventHubArgs, Management, PartitionRange, FROM_START};
use crate::procfs;
use crate::registry::FleetArgs;
use crate::scenario::{ensure_descriptors, num_cpus, round3};

/// A receiver that gets nothing for this long fails the run.
const STALL: Duration = Duration::from_secs(30);
/// The target for reading a filled log.
const TARGET_PER_SEC: f64 = 200_000.0;

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub eh: EventHubArgs,
    /// Events to publish into the log before reading; 0 reads what the log already holds.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Size of every published body.
    #[arg(long, default_value_t = 256)]
    pub body_bytes: usize,
    /// Devices publishing the fill, each keeping --fill-inflight PUBLISHes unacknowledged.
    #[arg(long, default_value_t = 16)]
    pub fill_devices: usize,
    #[arg(long, default_value_t = 64)]
    pub fill_inflight: usize,
    /// Fill device ids are `{prefix}{index}`.
    #[arg(long, default_value = "ehfill-")]
    pub prefix: String,
    #[arg(long, default_value_t = 16)]
    pub register_concurrency: usize,
    #[arg(long, default_value_t = 16)]
    pub connect_concurrency: usize,
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
    /// Longest the read may take before the run fails.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

/// CPU counters at one instant.
struct Cpu {
    at: Instant,
    server: Option<u64>,
    bench: f64,
    machine: u64,
}

fn cpu_now(server_pid: Option<u32>) -> Result<Cpu> {
    Ok(Cpu {
        at: Instant::now(),
        server: server_pid.map(procfs::cpu_ticks).transpose()?,
        bench: procfs::self_cpu_secs(),
        machine: procfs::machine_busy_ticks()?,
    })
}

pub async fn run(args: ReadArgs) -> Result<()> {
    let (hub, ep) = resolve(&args.eh).await?;
    if !(1..=65_534).contains(&args.fill_inflight) {
        bail!("--fill-inflight must be between 1 and 65534");
    }
    if args.body_bytes > 256 * 1024 {
        bail!("--body-bytes must be at most 262144");
    }
    ensure_descriptors(args.fill_devices + 16)?;
    let server_pid = hub.server_pid;
    if let Some(pid) = server_pid {
        procfs::sample(pid).with_context(|| format!("measuring server pid {pid}"))?;
    }
    let mut mgmt = Management::open(&ep).await?;
    let partitions = mgmt.partition_count(&ep).await?;
    println!(
        "eventhub-read: amqps://{}/{} at {}, {partitions} partitions, consumer group {}, \
         prefetch {}, settle {:?}, server pid {}",
        ep.host,
        ep.entity,
        ep.addr,
        args.eh.consumer_group,
        args.eh.prefetch,
        args.eh.settle,
        server_pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    );

    let mut fill_secs = None;
    if args.events > 0 {
        let fleet = FleetArgs {
            devices: args.fill_devices,
            prefix: args.prefix.clone(),
            register_concurrency: args.register_concurrency,
        };
        fleet.validate()?;
        let filled = fill::fill(Fill {
            hub: &hub,
            fleet: &fleet,
            partitions,
            events: args.events,
            inflight: args.fill_inflight,
            body_bytes: args.body_bytes,
            connect_concurrency: args.connect_concurrency,
            connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        })
        .await?;
        fill_secs = Some(filled.secs);
    }
    let mut ranges = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        ranges.push(mgmt.range(&ep, p).await?);
    }
    mgmt.close().await?;
    let expected: u64 = ranges.iter().map(PartitionRange::events).sum();
    if expected == 0 {
        bail!("the log holds no events to read (pass --events)");
    }
    let shares: Vec<u64> = ranges.iter().map(PartitionRange::events).collect();
    println!("log: {expected} events retained, per partition {shares:?}");

    let receivers = open_receivers(&ep, &args.eh, partitions, FROM_START).await?;
    let read = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = watch::channel(false);
    let (close_tx, close_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (mut r, range) in receivers.into_iter().zip(ranges.iter().copied()) {
        let (read, mut go, mut close) = (Arc::clone(&read), go_rx.clone(), close_rx.clone());
        tasks.push(tokio::spawn(async move {
            let p = r.partition;
            let result = async {
                go.wait_for(|g| *g).await.context("the run ended")?;
                drain(&mut r, range, &read).await?;
                // Keep the connection until every partition is done, so closing it does not
                // land in the measurement.
                let _ = close.wait_for(|c| *c).await;
                r.close().await
            }
            .await;
            result.with_context(|| format!("partition {p}"))
        }));
    }

    let before = cpu_now(server_pid)?;
    let _ = go_tx.send(true);
    let deadline = before.at + Duration::from_secs(args.timeout_secs);
    let mut per_second = Vec::new();
    let (mut last_count, mut next_tick) = (0, before.at + Duration::from_secs(1));
    let failed = loop {
        let now_read = read.load(Ordering::Relaxed);
        if now_read >= expected {
            break None;
        }
        // Before the close signal a receiver task only ends on an error.
        if tasks.iter().any(|t| t.is_finished()) {
            break Some(format!(
                "a receiver failed with {now_read} of {expected} read"
            ));
        }
        let now = Instant::now();
        if now >= deadline {
            break Some(format!(
                "only {now_read} of {expected} read after {} s",
                args.timeout_secs
            ));
        }
        if now >= next_tick {
            per_second.push(now_read - last_count);
            if per_second.len() % 5 == 0 {
                eprintln!(
                    "  … {} s: {} events in the last second, {now_read} of {expected}",
                    per_second.len(),
                    now_read - last_count
                );
            }
            last_count = now_read;
            next_tick += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let after = cpu_now(server_pid)?;
    let _ = close_tx.send(true);
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("receiver task: {e}")),
        }
    }
    if let Some(why) = failed {
        bail!("{why}; receivers: {}", errors.join("; "));
    }
    if !errors.is_empty() {
        bail!("receivers failed: {}", errors.join("; "));
    }

    let ticks = procfs::clock_ticks_per_sec() as f64;
    let secs = (after.at - before.at).as_secs_f64();
    let server_cpu = before
        .server
        .zip(after.server)
        .map(|(a, b)| b.saturating_sub(a) as f64 / ticks);
    let bench_cpu = after.bench - before.bench;
    let machine = after.machine.saturating_sub(before.machine) as f64 / ticks;
    let other = (machine - server_cpu.unwrap_or(0.0) - bench_cpu).max(0.0);
    let contended = other > 0.05 * secs * num_cpus() as f64;
    let rate = expected as f64 / secs;
    let us_per_event = server_cpu
        .filter(|c| *c > 0.0)
        .map(|c| c * 1e6 / expected as f64);
    println!(
        "read: {expected} events in {secs:.2} s: {rate:.0} events/s, no gap or repeat in any \
         partition (per second: min {}, max {})",
        per_second.iter().min().unwrap_or(&0),
        per_second.iter().max().unwrap_or(&0)
    );
    match (server_cpu, us_per_event) {
        (Some(cpu), Some(us)) => println!(
            "server: {cpu:.2} CPU-s ({:.2} cores): {us:.2} µs per event, {:.0} events per \
             server CPU-second",
            cpu / secs,
            1e6 / us
        ),
        _ => println!("server: pid unknown or idle, no server CPU figures"),
    }
    println!(
        "machine: {machine:.2} CPU-s busy: bench {bench_cpu:.2} ({:.2} cores), {other:.2} \
         neither server nor bench{}",
        bench_cpu / secs,
        if contended {
            " (something else competed for the CPUs: figures are suspect)"
        } else {
            ""
        }
    );
    println!(
        "target >= {TARGET_PER_SEC:.0} events/s: {}",
        if rate >= TARGET_PER_SEC {
            "met"
        } else {
            "NOT met"
        }
    );
    let result = json!({
        "scenario": "eventhub-read",
        "partitions": partitions,
        "events": expected,
        "per_partition": shares,
        "body_bytes": args.body_bytes,
        "prefetch": args.eh.prefetch,
        "settle": format!("{:?}", args.eh.settle).to_lowercase(),
        "fill_events": args.events,
        "fill_secs": fill_secs.map(round3),
        "fill_per_sec": fill_secs.map(|s| round3(args.events as f64 / s)),
        "read_secs": round3(secs),
        "events_per_sec": round3(rate),
        "per_second": per_second,
        "server_pid": server_pid,
        "server_cpu_secs": server_cpu.map(round3),
        "server_cpu_us_per_event": us_per_event.map(round3),
        "events_per_server_cpu_sec": us_per_event.map(|us| round3(1e6 / us)),
        "bench_cpu_secs": round3(bench_cpu),
        "machine_busy_cpu_secs": round3(machine),
        "other_cpu_secs": round3(other),
        "contended": contended,
        "cpus": num_cpus(),
    });
    println!("RESULT {result}");
    Ok(())
}

/// Reads one partition from its first retained event to its last, checking each sequence
/// number (the receiver checks that each follows the one before).
async fn drain(r: &mut super::Receiver, range: PartitionRange, read: &AtomicU64) -> Result<()> {
    let want = range.events();
    let Some(last) = range.last else {
        return Ok(());
    };
    r.start().await?;
    let mut events = Vec::with_capacity(r.prefetch as usize);
    let mut got = 0u64;
    let mut quiet_since = Instant::now();
    while got < want {
        events.clear();
        r.next(Duration::from_secs(1), &mut events).await?;
        if events.is_empty() {
            if quiet_since.elapsed() >= STALL {
                bail!(
                    "nothing for {} s after {got} of {want} events",
                    STALL.as_secs()
                );
            }
            continue;
        }
        quiet_since = Instant::now();
        if got == 0 && events[0].sequence != range.begin {
            bail!(
                "the first event is {}, the oldest retained {}",
                events[0].sequence,
                range.begin
            );
        }
        got += events.len() as u64;
        read.fetch_add(events.len() as u64, Ordering::Relaxed);
    }
    let newest = r.expected.map(|n| n - 1);
    if got != want || newest != Some(last) {
        bail!("read {got} events ending at {newest:?}; the log held {want} ending at {last}");
    }
    Ok(())
}
