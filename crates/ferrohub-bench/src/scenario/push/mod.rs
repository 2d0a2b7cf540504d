//! What the hub-feature scenarios (`c2d`, `methods`, `twin-reported`) share: their flags and the
//! small MQTT helpers; the rest lives in the submodules and is re-exported here, so a scenario
//! names all of it `push::…`.

mod fleet;
mod measure;
mod open_loop;
mod report;

use anyhow::{bail, Result};

use crate::hub::HubArgs;
use crate::registry::FleetArgs;

pub use fleet::{drive, fleet, Connections, DeviceEnd, Role};
pub use measure::{measure, Window};
pub use open_loop::{
    drain, finish_slot, run_open_loop, start_slot, OpenLoopState, Progress, Schedule,
    DRAIN_TIMEOUT, LATE,
};
pub use report::{histogram, lock, record, Failures, Latency, SharedHistogram, Summary};

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

/// The next MQTT packet identifier after `last` that no unacknowledged packet holds.
pub fn next_packet_id(last: &mut u16, unacked: &std::collections::HashSet<u16>) -> u16 {
    loop {
        *last = last.checked_add(1).unwrap_or(1);
        if !unacked.contains(last) {
            return *last;
        }
    }
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
}
