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
        match hub
            .telemetry
            .enforce_retention(retention, ferrohub_store::Timestamp::now())
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "telemetry retention removed expired messages"),
            Err(e) => warn!(error = %e, "telemetry retention failed"),
        }
        // Custom endpoints' streams, each by its own age limit and the hub's size limit.
        match hub.enforce_stream_retention(retention.max_bytes).await {
            0 => {}
            n => info!(
                removed = n,
                "endpoint stream retention removed expired messages"
            ),
        }
    }
}
