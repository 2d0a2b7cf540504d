//! The benchmark scenarios, one module each, and what they share: run-time checks and summary
//! statistics.

pub mod c2d;
pub mod connect;
pub mod crash;
pub mod eventhub;
pub mod methods;
pub mod push;
pub mod query;
pub mod telemetry;
pub mod twin;

use anyhow::{bail, Result};

use crate::procfs;

/// Connections beyond the fleet: stdio, the HTTPS pool, the runtime's own descriptors.
const SPARE_DESCRIPTORS: u64 = 100;

/// Raises the open-file limit and fails clearly if `connections` cannot fit under it.
pub fn ensure_descriptors(connections: usize) -> Result<u64> {
    let limit = procfs::raise_nofile_limit()?;
    let needed = connections as u64 + SPARE_DESCRIPTORS;
    if needed > limit {
        bail!(
            "{connections} connections need about {needed} open files, but RLIMIT_NOFILE is \
             {limit} even after raising the soft limit to the hard limit; raise the hard limit \
             (ulimit -Hn, or LimitNOFILE= for a service) or simulate fewer devices"
        );
    }
    Ok(limit)
}

/// The value below which `p` percent of `sorted` falls (nearest rank); 0 for no samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Processors this process may run on.
pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Rounded to three decimals, for the RESULT lines.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
