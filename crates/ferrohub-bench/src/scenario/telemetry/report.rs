//! What a telemetry run reports: the connections' reports summed, and the figures printed for
//! people and as the RESULT line the scripts parse.

use crate::scenario::{num_cpus, round3};
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::publisher::{ConnReport, LATE};
use super::push::Window;
use super::TelemetryArgs;
use crate::device::CloseOutcome;
use crate::registry::FleetArgs;

/// All connections' reports, summed.
pub(super) struct Totals {
    latency_us: Histogram<u64>,
    sent: u64,
    acked: u64,
    late_sends: u64,
    unacked: usize,
    /// Connections that failed while publishing, by kind: how many, and one example.
    errors: BTreeMap<String, (usize, String)>,
    closes: BTreeMap<&'static str, usize>,
}

pub(super) async fn collect(
    tasks: Vec<JoinHandle<ConnReport>>,
    fleet: &FleetArgs,
) -> Result<Totals> {
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
pub(super) struct Figures {
    pub(super) window: Window,
    pub(super) totals: Totals,
    pub(super) server_pid: Option<u32>,
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

    pub(super) fn print(&self, rate: Option<f64>) {
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

    pub(super) fn json(&self, args: &TelemetryArgs) -> Value {
        let (w, t) = (&self.window, &self.totals);
        json!({
            "scenario": "telemetry",
            "target": args.target.name(),
            "connections": args.connections,
            "inflight": args.inflight,
            "body_bytes": args.body_bytes,
            "json_body": args.json_body,
            "model_id": args.model_id,
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
