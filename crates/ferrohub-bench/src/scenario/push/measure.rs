//! The measured window: completions per second, and the CPU time of the server, the bench and
//! the whole machine across it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::time::sleep_until;

use crate::procfs;

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
