//! Creating the simulated devices through the hub's service REST API, all with one shared key so
//! their tokens can be computed locally.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::StatusCode;
use serde_json::json;
use tokio::task::JoinSet;

use crate::hub::Hub;

const API_VERSION: &str = "2021-04-12";
/// Tokens outlive any realistic run, so they are made once and never refreshed.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;
/// Busy answers are retried this many times, so a throttling hub slows registration down rather
/// than failing it.
const MAX_ATTEMPTS: u32 = 5;

/// Which devices a scenario simulates.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// How many devices to simulate.
    #[arg(long)]
    pub devices: usize,
    /// Device ids are `{prefix}{index}`, index from 0.
    #[arg(long, default_value = "bench-")]
    pub prefix: String,
    /// Registry requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub register_concurrency: usize,
}

impl FleetArgs {
    pub fn device_id(&self, index: usize) -> String {
        format!("{}{index}", self.prefix)
    }

    pub fn validate(&self) -> Result<()> {
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        for index in [0, self.devices - 1] {
            let id = self.device_id(index);
            ferrohub_iothub::validate_device_id(&id)
                .map_err(|e| anyhow!("device id {id:?} (from --prefix) is not valid: {e}"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Registration {
    pub created: usize,
    /// Devices that already existed and had their keys replaced by the bench key.
    pub overwritten: usize,
    pub elapsed: Duration,
}

pub fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Makes sure every fleet device exists with `device_key` as both its keys.
pub async fn register(hub: &Hub, fleet: &FleetArgs, device_key: &str) -> Result<Registration> {
    let workers = fleet.register_concurrency.clamp(1, fleet.devices);
    let client = hub
        .https_builder()?
        .pool_max_idle_per_host(workers)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTPS client")?;
    let auth = hub.service_token()?;
    let shared = Arc::new(Shared {
        client,
        base: format!("https://{}/devices/", hub.rest_authority),
        auth,
        device_key: device_key.to_owned(),
        fleet: fleet.clone(),
        next: AtomicUsize::new(0),
    });

    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let shared = Arc::clone(&shared);
        tasks.spawn(async move { shared.work().await });
    }
    let mut total = Registration::default();
    // The first error ends the run; dropping the JoinSet aborts the other workers.
    while let Some(joined) = tasks.join_next().await {
        let part = joined.context("registration worker panicked")??;
        total.created += part.created;
        total.overwritten += part.overwritten;
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

struct Shared {
    client: reqwest::Client,
    base: String,
    auth: String,
    device_key: String,
    fleet: FleetArgs,
    next: AtomicUsize,
}

enum Outcome {
    Created,
    Overwritten,
}

impl Shared {
    async fn work(&self) -> Result<Registration> {
        let mut done = Registration::default();
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.fleet.devices {
                return Ok(done);
            }
            let id = self.fleet.device_id(index);
            match self
                .ensure(&id)
                .await
                .with_context(|| format!("registering {id}"))?
            {
                Outcome::Created => done.created += 1,
                Outcome::Overwritten => done.overwritten += 1,
            }
        }
    }

    async fn ensure(&self, id: &str) -> Result<Outcome> {
        // IoT Hub reads a PUT without If-Match as "create"; an existing device answers 409 and
        // then gets the bench key through an unconditional update.
        let (status, body) = self.put(id, false).await?;
        if status.is_success() {
            return Ok(Outcome::Created);
        }
        if status != StatusCode::CONFLICT {
            bail!("PUT answered {status}: {body}");
        }
        let (status, body) = self.put(id, true).await?;
        if status.is_success() {
            return Ok(Outcome::Overwritten);
        }
        bail!("PUT with If-Match: * answered {status}: {body}")
    }

    async fn put(&self, id: &str, overwrite: bool) -> Result<(StatusCode, String)> {
        let body = json!({
            "deviceId": id,
            "authentication": {
                "type": "sas",
                "symmetricKey": {"primaryKey": self.device_key, "secondaryKey": self.device_key},
            },
        });
        let url = format!("{}{id}?api-version={API_VERSION}", self.base);
        let mut attempt = 1;
        loop {
            let mut request = self
                .client
                .put(&url)
                .header(reqwest::header::AUTHORIZATION, &self.auth)
                .json(&body);
            if overwrite {
                request = request.header(reqwest::header::IF_MATCH, "*");
            }
            let response = request.send().await.with_context(|| format!("PUT {url}"))?;
            let status = response.status();
            let busy = matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            );
            if busy && attempt < MAX_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
                continue;
            }
            let text = response.text().await.unwrap_or_default();
            return Ok((status, truncate(text, 500)));
        }
    }
}

/// Error bodies end up in one-line messages; a proxy's HTML page should not flood the terminal.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}
