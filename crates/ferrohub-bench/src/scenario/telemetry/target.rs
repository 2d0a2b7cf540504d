//! Reaching the server under test: a Ferrohub hub (devices registered over REST, SAS tokens) or
//! a plain MQTT broker (anonymous clients), and opening every connection to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferrohub_iothub::sas::generate_key;

use super::{Target, TelemetryArgs};
use crate::device::{Connector, Credentials, Endpoint, MqttStream};
use crate::hub::Hub;
use crate::registry::{self, FleetArgs};

/// Opens every connection, `concurrency` at a time; any failure fails the run, since figures
/// from fewer connections than asked for would describe a different load.
pub(crate) async fn connect_all(
    connector: Arc<Connector>,
    fleet: &FleetArgs,
    concurrency: usize,
) -> Result<Vec<MqttStream>> {
    let n = fleet.devices;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, n) {
        let (connector, next, fleet) = (Arc::clone(&connector), Arc::clone(&next), fleet.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut failures: BTreeMap<String, (usize, String)> = BTreeMap::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= n {
                    return (done, failures);
                }
                let id = fleet.device_id(index);
                match connector.connect(&id).await {
                    Ok(stream) => done.push((index, stream)),
                    Err(f) => {
                        failures
                            .entry(f.category())
                            .or_insert_with(|| (0, format!("{id}: {f}")))
                            .0 += 1
                    }
                }
            }
        }));
    }
    let mut streams = Vec::with_capacity(n);
    let mut failures: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for worker in workers {
        let (done, failed) = worker.await.context("connect worker panicked")?;
        streams.extend(done);
        for (kind, (count, example)) in failed {
            failures.entry(kind).or_insert((0, example)).0 += count;
        }
    }
    if !failures.is_empty() {
        let lines: Vec<String> = failures
            .iter()
            .map(|(kind, (count, example))| format!("{kind} x{count} (e.g. {example})"))
            .collect();
        bail!(
            "{} of {n} connections failed: {}",
            n - streams.len(),
            lines.join("; ")
        );
    }
    streams.sort_unstable_by_key(|(index, _)| *index);
    Ok(streams.into_iter().map(|(_, s)| s).collect())
}

/// The resolved target: how to connect, and whose CPU to measure.
pub(super) struct Resolved {
    pub(super) connector: Connector,
    pub(super) server_pid: Option<u32>,
    pub(super) description: String,
}

pub(super) async fn resolve(args: &TelemetryArgs, fleet: &FleetArgs) -> Result<Resolved> {
    let timeout = Duration::from_secs(args.connect_timeout_secs);
    match args.target {
        Target::Ferrohub => {
            let hub = Hub::resolve(&args.hub)?;
            println!(
                "hub: HostName {}, REST https://{}, CA {}",
                hub.host_name,
                hub.rest_authority,
                hub.ca_file.display(),
            );
            let device_key = generate_key();
            let registration = registry::register(&hub, fleet, &device_key).await?;
            println!(
                "registration: {} devices in {:.2} s: {} created, {} already existed (key replaced)",
                fleet.devices,
                registration.elapsed.as_secs_f64(),
                registration.created,
                registration.overwritten,
            );
            let connector = Connector::new(&hub, device_key, false, timeout)
                .await?
                .with_model_id(args.model_id.clone());
            let description = format!(
                "{} (TLS server name {}, SAS-authenticated devices)",
                connector.addr(),
                hub.hostname
            );
            Ok(Resolved {
                connector,
                server_pid: hub.server_pid,
                description,
            })
        }
        Target::Plain => {
            if args.hub.data_dir.is_some() || args.hub.connection_string.is_some() {
                bail!("--target plain takes --mqtt-host, --mqtt-port and --ca-file, not a hub's --data-dir or --connection-string");
            }
            let host = args
                .hub
                .mqtt_host
                .as_deref()
                .context("--target plain needs --mqtt-host")?;
            let ca_file = args
                .hub
                .ca_file
                .as_ref()
                .context("--target plain needs --ca-file")?;
            let ca_pem =
                std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
            let port = args.hub.mqtt_port.unwrap_or(8883);
            let endpoint = Endpoint {
                ca_pem: &ca_pem,
                server_name: host,
                host,
                port,
            };
            let connector =
                Connector::with_credentials(&endpoint, Credentials::Anonymous, false, timeout)
                    .await?;
            let description = format!(
                "{} (TLS server name {host}, CA {}, anonymous clients)",
                connector.addr(),
                ca_file.display()
            );
            Ok(Resolved {
                connector,
                server_pid: args.hub.server_pid,
                description,
            })
        }
    }
}
