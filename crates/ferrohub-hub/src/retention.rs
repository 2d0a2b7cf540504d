//! Telemetry retention: removing events past the hub's age or size limit in the background,
//! in small steps so ingest never waits long on it.

use std::sync::Arc;
use std::time::Duration;

use ferrohub_store::telemetry::Retention;
use tracing::{info, warn};

use crate::Hub;

/// Enforces `retention` every `every` until shutdown.
pub async fn retention_loop(
    hub: Arc<Hub>,
    retention: Retention,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::until_shutdown(&mut shutdown) => return,
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        match hub
            .telemetry
            .enforce_retention(retention, i64::try_from(now).unwrap_or(i64::MAX))
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "telemetry retention removed expired messages"),
            Err(e) => warn!(error = %e, "telemetry retention failed"),
        }
    }
}
