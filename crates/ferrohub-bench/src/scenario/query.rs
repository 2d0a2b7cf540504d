//! `query`: the cost of `POST /devices/query` on a large registry. `--populate N` first writes
//! N devices (with tags, reported properties, and a module on every hundredth) straight into a
//! stopped hub's SQLite store, in the document shape the hub itself writes; then, with the hub
//! running on that data directory, the scenario times a fixed set of queries over HTTPS: the
//! first page of each, and for aggregates and small result sets every page, p50/p99.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferrohub_iothub::twin::Twin;
use ferrohub_store::{
    AuthType, Authentication, Device, Module, RegistryStore, SymmetricKey, TwinStore,
};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::hub::{Hub, HubArgs};

#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// Write this many devices into the store of --data-dir (the hub must be stopped), then
    /// exit; run again without it against the hub started on that directory.
    #[arg(long)]
    pub populate: Option<usize>,
    /// Times each query runs.
    #[arg(long, default_value_t = 20)]
    pub repeat: usize,
    /// x-ms-max-item-count of every request.
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
}

/// Tag `site` takes this many values, so a point match selects 1% of the devices.
const SITES: usize = 100;

/// The twin document as the hub stores it (`ferrohub-hub` `twins.rs` `StoredDoc`).
fn stored_twin(i: usize, now: &str) -> Result<String> {
    let mut twin = Twin::new(now);
    twin.patch_tags(&json!({
        "site": format!("site-{}", i % SITES),
        "floor": i % 10,
        "owner": {"team": format!("team-{}", i % 7)},
    }))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    twin.patch_reported(
        &json!({
            "temperature": (i * 7919 % 1000) as f64 / 10.0,
            "firmware": format!("1.{}", i % 5),
            "battery": i % 101,
        }),
        now,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(serde_json::to_string(
        &json!({"twin": twin, "modelId": null}),
    )?)
}

fn device(id: String) -> Device {
    Device {
        device_id: id,
        generation_id: format!("{:016}", 638_000_000_000_000_000u64),
        authentication: Authentication {
            symmetric_key: SymmetricKey {
                primary_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
                secondary_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
            },
            auth_type: AuthType::Sas,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn device_id(i: usize) -> String {
    format!("qdev-{i:07}")
}

async fn populate(dir: PathBuf, n: usize) -> Result<()> {
    let store = ferrohub_sqlite::SqliteStore::open(&dir)
        .with_context(|| format!("opening the store in {}", dir.display()))?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let now = "2026-12-01T00:00:00.0000000Z";
    let mut tasks = JoinSet::new();
    // Enough writers in flight that each group commit carries hundreds of them.
    for _ in 0..512 {
        let store = store.clone();
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = device_id(i);
                store.create_device(device(id.clone())).await?;
                store
                    .put_twin(&id, None, stored_twin(i, now)?, None)
                    .await?;
                if i.is_multiple_of(100) {
                    store
                        .create_module(Module {
                            module_id: "edgeAgent".into(),
                            device_id: id.clone(),
                            ..Default::default()
                        })
                        .await?;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a populating task panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "RESULT {}",
        json!({"scenario": "query-populate", "devices": n, "seconds": super::round3(secs),
               "devices_per_sec": super::round3(n as f64 / secs)})
    );
    Ok(())
}

/// The queries timed, and whether every page is fetched (else only the first).
const QUERIES: &[(&str, &str, bool)] = &[
    ("point tag match", "SELECT * FROM devices WHERE tags.site = 'site-42'", false),
    ("point tag match, no match", "SELECT * FROM devices WHERE tags.site = 'nowhere'", false),
    ("range on a reported number", "SELECT deviceId, properties.reported.temperature FROM devices WHERE properties.reported.temperature > 99.5", false),
    ("STARTSWITH on device id", "SELECT * FROM devices WHERE STARTSWITH(deviceId, 'qdev-00123')", true),
    ("GROUP BY status", "SELECT status, COUNT() AS numberOfDevices FROM devices GROUP BY status", true),
    ("GROUP BY a tag", "SELECT tags.floor, COUNT() AS n FROM devices GROUP BY tags.floor", true),
    ("devices.modules", "SELECT * FROM devices.modules WHERE moduleId = 'edgeAgent'", false),
    ("unindexed condition (NOT)", "SELECT deviceId FROM devices WHERE NOT (tags.floor = 3)", false),
];

struct Client {
    http: reqwest::Client,
    url: String,
    auth: String,
}

impl Client {
    /// One page: its items and the continuation token.
    async fn page(
        &self,
        text: &str,
        size: usize,
        token: Option<&str>,
    ) -> Result<(usize, Option<String>)> {
        let mut req = self
            .http
            .post(&self.url)
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .header("x-ms-max-item-count", size.to_string())
            .json(&json!({ "query": text }));
        if let Some(t) = token {
            req = req.header("x-ms-continuation", t);
        }
        let resp = req.send().await.context("query request")?;
        let status = resp.status();
        let next = resp
            .headers()
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await.context("query body")?;
        if !status.is_success() {
            bail!("{text}: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        let items: Value = serde_json::from_slice(&body)?;
        Ok((items.as_array().map_or(0, Vec::len), next))
    }
}

pub async fn run(args: QueryArgs) -> Result<()> {
    if let Some(n) = args.populate {
        let dir = args
            .hub
            .data_dir
            .clone()
            .context("--populate needs --data-dir (of a stopped hub)")?;
        return populate(dir, n).await;
    }
    let hub = Hub::resolve(&args.hub)?;
    let client = Client {
        http: hub
            .https_builder()?
            .http1_only()
            .timeout(Duration::from_secs(120))
            .build()?,
        url: format!(
            "https://{}/devices/query?api-version=2021-04-12",
            hub.rest_authority
        ),
        auth: hub.service_token()?,
    };
    // The TLS handshake and the first statement preparations stay out of the figures.
    client.page("SELECT deviceId FROM devices", 1, None).await?;
    for (name, text, all_pages) in QUERIES {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut items = 0;
        let mut pages = 0;
        for _ in 0..args.repeat.max(1) {
            let started = Instant::now();
            let (mut n, mut token) = client.page(text, args.page_size, None).await?;
            pages = 1;
            while *all_pages && token.is_some() {
                let (more, next) = client.page(text, args.page_size, token.as_deref()).await?;
                n += more;
                pages += 1;
                token = next;
            }
            hist.record(started.elapsed().as_micros().max(1) as u64)?;
            items = n;
        }
        let ms = |q: f64| super::round3(hist.value_at_quantile(q) as f64 / 1000.0);
        println!(
            "RESULT {}",
            json!({"scenario": "query", "query": name, "text": text,
                   "measured": if *all_pages { "all pages" } else { "first page" },
                   "items": items, "pages": pages, "runs": hist.len(),
                   "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0)})
        );
    }
    Ok(())
}
