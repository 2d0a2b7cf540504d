//! The open-loop load: the schedule of a run, issuing operations at a fixed rate whether or not
//! earlier ones finished, the bookkeeping each operation's slot does, and the drain afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use tokio::time::sleep_until;

use super::{lock, measure, record, Failures, PushArgs, Window};

/// Headroom for the tasks to start before the common start instant.
const START_DELAY: Duration = Duration::from_millis(200);
/// An operation this far behind its schedule counts as late: the generator (or a full request
/// pool) could not keep up with --rate. Above tokio's 1 ms timer resolution, which alone makes
/// paced operations up to a millisecond late.
pub const LATE: Duration = Duration::from_millis(2);
/// Longest the bench waits, after the measured window, for operations still under way.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
