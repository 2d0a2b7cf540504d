//! Process measurements and limits: another process's CPU time and RSS from /proc, this
//! process's own CPU time and RSS, the whole machine's busy CPU time, and the open-file limit the
//! connections need.

use std::fs;

use anyhow::{bail, Context, Result};

/// CPU time and resident memory of one process at one instant.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

pub fn sample(pid: u32) -> Result<ProcSample> {
    Ok(ProcSample {
        cpu_ticks: cpu_ticks(pid)?,
        rss_kib: rss_kib(pid)?,
    })
}

/// utime + stime from /proc/PID/stat, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))
}

/// The command name (field 2) is in parentheses and may itself contain spaces and `)`, so fields
/// are counted from the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let (_, rest) = stat
        .rsplit_once(')')
        .context("no ')' after the command name")?;
    // After the command name come state (field 3) ... utime (14) and stime (15).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("field {n} missing"))?
            .parse::<u64>()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// CPU time every core spent on anything but idling, from /proc/stat, in clock ticks. Set
/// against the server's and the bench's own CPU time it shows whether something else (a build,
/// another benchmark) competed for the cores during a measurement.
pub fn machine_busy_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_busy_ticks(&stat).context("parsing the cpu line of /proc/stat")
}

fn parse_machine_busy_ticks(stat: &str) -> Result<u64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no aggregate cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("a field is not a number")?;
    if fields.len() < 5 {
        bail!("fewer fields than user nice system idle iowait");
    }
    // user nice system idle iowait irq softirq steal guest guest_nice: idle and iowait are not
    // busy, and guest time is already counted in user.
    Ok(fields.iter().take(8).sum::<u64>() - fields[3] - fields[4])
}

/// VmRSS from /proc/PID/status, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second for /proc CPU times. Falls back to 100, Linux's USER_HZ on every
/// mainstream architecture, should sysconf ever fail.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// This process's user + system CPU time (all threads), in seconds. getrusage is used rather
/// than /proc/self/stat because its microsecond resolution beats 10 ms ticks.
pub fn self_cpu_secs() -> f64 {
    // SAFETY: rusage is plain old data, so all-zero is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

pub fn self_rss_kib() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (each connection is a descriptor) and returns
/// the new soft limit.
pub fn raise_nofile_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the pointer is to a live, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: the pointer is to a live rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            // An unlimited hard limit can still be refused (above fs.nr_open); the current soft
            // limit then stands and the caller's check reports it.
            eprintln!(
                "warning: could not raise the open-file limit from {} to {}: {}",
                limit.rlim_cur,
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() -> Result<()> {
        let stat = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_cpu_ticks(stat)?, 325);
        assert!(parse_stat_cpu_ticks("1234 (x) S 1").is_err());
        Ok(())
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_guest() -> Result<()> {
        let stat = "cpu  100 2 30 5000 40 5 6 7 50 0\ncpu0 50 1 15 2500 20 2 3 3 25 0\n";
        assert_eq!(parse_machine_busy_ticks(stat)?, 100 + 2 + 30 + 5 + 6 + 7);
        assert!(parse_machine_busy_ticks("cpu0 1 2 3 4 5\n").is_err());
        assert!(machine_busy_ticks()? > 0);
        Ok(())
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmPeak:\t  10 kB\nVmRSS:\t   2048 kB\n"),
            Some(2048)
        );
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_can_be_measured() -> Result<()> {
        let me = sample(std::process::id())?;
        assert!(me.rss_kib > 0);
        assert!(clock_ticks_per_sec() > 0);
        assert!(self_cpu_secs() >= 0.0);
        Ok(())
    }
}
