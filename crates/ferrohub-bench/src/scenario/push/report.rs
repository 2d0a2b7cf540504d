//! What a push scenario reports: latency histograms, failures by kind, and the summary printed
//! for people and as the RESULT line the scripts parse.

use crate::scenario::{num_cpus, round3};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use super::{Connections, Window, LATE};

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
pub struct Failures(pub(super) BTreeMap<String, (u64, String)>);

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

#[cfg(test)]
mod tests {
    use super::*;

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
