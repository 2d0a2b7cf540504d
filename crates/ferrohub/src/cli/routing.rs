//! `ferrohub endpoint`, `ferrohub route`, `ferrohub enrichment` and `ferrohub fallback`: message
//! routing over `/ferrohub/routing` (see `api/routing.rs`), like `az iot hub routing-endpoint`,
//! `az iot hub route` and `az iot hub message-enrichment`. Changes apply at once, without a
//! restart.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use ferrohub_hub::delivery::EndpointHealth;
use ferrohub_hub::routing::{
    Endpoint, EndpointKind, Enrichment, Route, RouteSource, RouteTestMessage, RouteTestResult,
    DEFAULT_STREAM_PARTITIONS,
};

use super::client::ApiClient;
use super::output::Output;
use super::{enc, ClientArgs, OutputFormat};
use crate::api::routing::{Fallback, RoutingView};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EndpointType {
    /// An event stream inside the hub, read like the built-in one (`monitor --endpoint`).
    Stream,
    /// An HTTPS POST per message (or a JSON array with `--batch`) to `--url`.
    Webhook,
    /// A JetStream publish per message to `--subject` on the NATS server at `--url`.
    Nats,
    /// Files of batched messages under `<data-dir>/storage/<--container>/` on the hub.
    Storage,
}

// Parsed once per run of the CLI, so the size of the `add` variant costs nothing worth boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Add (or change the retention of) a custom endpoint.
    Add {
        name: String,
        #[arg(long = "type", value_enum, default_value_t = EndpointType::Stream)]
        kind: EndpointType,
        /// Partitions of the stream (1 to 32), fixed at creation.
        #[arg(long, default_value_t = DEFAULT_STREAM_PARTITIONS)]
        partitions: u32,
        /// How long events are kept: a number with s, m, h or d (e.g. 12h, 7d); seconds if
        /// bare.
        /// For webhook and nats endpoints: how long an undelivered message waits before it is
        /// dead-lettered (to the stream NAME.deadletter).
        #[arg(long, value_parser = parse_retention, default_value = "1d")]
        retention: u64,
        /// webhook: `https://...` (`http://` only to a loopback host); nats: `nats://host:port`.
        #[arg(long)]
        url: Option<String>,
        /// nats: the subject published to.
        #[arg(long)]
        subject: Option<String>,
        /// nats: the JetStream stream that must capture the subject.
        #[arg(long)]
        stream: Option<String>,
        /// webhook: messages per POST (more than 1: a JSON array); nats: publishes in flight.
        #[arg(long)]
        batch: Option<u32>,
        /// webhook and nats: how long to wait for the peer's acknowledgement.
        #[arg(long, default_value_t = ferrohub_hub::routing::DEFAULT_TIMEOUT_SECS)]
        timeout_secs: u64,
        /// webhook: a header sent with every request, `name=value` (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// webhook: a PEM file of the CAs to trust instead of the system's.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// webhook, nats and storage: failing for this long makes the endpoint's health `dead`.
        #[arg(long, value_parser = parse_retention, default_value = "10m")]
        dead_after: u64,
        /// storage: the container (directory) the files go to.
        #[arg(long)]
        container: Option<String>,
        /// storage: avro (IoT Hub's default, uncompressed), avrodeflate or json (JSON lines).
        #[arg(long, default_value = "avro")]
        encoding: String,
        /// storage: the file name pattern, every token once.
        #[arg(long, default_value = ferrohub_hub::storage_endpoint::DEFAULT_FILE_NAME_FORMAT)]
        file_name_format: String,
        /// storage: a file is written when its oldest message is this old (1s to 12m).
        #[arg(long, value_parser = parse_retention, default_value = "5m")]
        batch_frequency: u64,
        /// storage: ... or when it reaches this many bytes.
        #[arg(long, default_value_t = ferrohub_hub::routing::DEFAULT_MAX_CHUNK_BYTES)]
        max_chunk_bytes: u64,
    },
    /// List custom endpoints (with the delivery health of webhook and nats endpoints).
    List,
    /// Remove a custom endpoint and its stream (refused while a route or enrichment uses it).
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Add or replace a route.
    Add {
        name: String,
        /// The messages routed: DeviceMessages (telemetry), TwinChangeEvents,
        /// DeviceLifecycleEvents, DeviceConnectionStateEvents, DigitalTwinChangeEvents or
        /// DeviceJobLifecycleEvents (the hub's own events; no fallback route applies to them).
        #[arg(long, default_value = "DeviceMessages", value_parser = parse_source)]
        source: RouteSource,
        /// Routing query, e.g. `$body.temp > 30 AND level = 'critical'`.
        #[arg(long, default_value = "true")]
        condition: String,
        /// Endpoints, comma-separated (`events` is the built-in one).
        #[arg(long = "endpoint", value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
        /// Store the route disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List routes.
    List,
    /// Remove a route.
    Remove { name: String },
    /// Say whether a route's condition matches a message, and why not when it does not.
    Test {
        name: String,
        /// The message body (a file; `-` for stdin).
        #[arg(long)]
        body: Option<PathBuf>,
        /// An application property, `key=value`; repeat for more.
        #[arg(short = 'p', long = "property", value_parser = parse_pair)]
        properties: Vec<(String, String)>,
        /// A system property by its IoT Hub name (`content-type=application/json`); repeat.
        #[arg(short = 's', long = "system-property", value_parser = parse_pair)]
        system_properties: Vec<(String, String)>,
        /// Shorthand for `-s content-type=...`.
        #[arg(long)]
        content_type: Option<String>,
        /// Shorthand for `-s content-encoding=...`.
        #[arg(long)]
        content_encoding: Option<String>,
        /// The sender's twin as JSON (a file), for `$twin` conditions.
        #[arg(long)]
        twin: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EnrichmentCommand {
    /// Add or replace an enrichment: an application property stamped on messages routed to
    /// its endpoints.
    Add {
        key: String,
        /// A constant, `$iothubname`, `$twin.tags.NAME`, `$twin.properties.desired.NAME` or
        /// `$twin.properties.reported.NAME`.
        #[arg(long)]
        value: String,
        /// Endpoints, comma-separated (`events` is the built-in one).
        #[arg(long = "endpoint", value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
    },
    /// List enrichments.
    List,
    /// Remove an enrichment.
    Remove { key: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum FallbackCommand {
    /// Whether messages that match no route go to the built-in endpoint.
    Show,
    /// Turn the fallback route on or off.
    Set {
        #[arg(value_enum)]
        state: OnOff,
    },
}

fn parse_source(s: &str) -> Result<RouteSource, String> {
    RouteSource::parse(s).map_err(|e| e.message().to_string())
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// `90`, `90s`, `15m`, `12h`, `7d` as seconds.
fn parse_retention(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: a number with s, m, h or d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: must be more than zero and not absurdly long"))
}

fn retention_text(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected name=value"))
}

fn print_endpoint(e: &Endpoint, health: Option<&EndpointHealth>) {
    let health = health.map_or(String::new(), |h| {
        let mut t = format!(
            "  health {:?} delivered {} dead-lettered {}",
            h.status, h.delivered, h.dead_lettered
        )
        .to_lowercase();
        if let Some(err) = &h.last_error {
            t.push_str(&format!(" ({err})"));
        }
        t
    });
    match &e.kind {
        EndpointKind::Stream {
            partitions,
            retention_secs,
        } => println!(
            "{:<24} stream  partitions {partitions:<3} retention {}",
            e.name,
            retention_text(*retention_secs)
        ),
        EndpointKind::Webhook {
            url,
            batch,
            retention_secs,
            ..
        } => println!(
            "{:<24} webhook {url} batch {batch} retention {}{health}",
            e.name,
            retention_text(*retention_secs)
        ),
        EndpointKind::Nats {
            url,
            subject,
            retention_secs,
            ..
        } => println!(
            "{:<24} nats    {url} subject {subject} retention {}{health}",
            e.name,
            retention_text(*retention_secs)
        ),
        EndpointKind::Storage {
            container,
            encoding,
            batch_frequency_secs,
            retention_secs,
            ..
        } => println!(
            "{:<24} storage {container} {encoding:?} every {} retention {}{health}",
            e.name,
            retention_text(*batch_frequency_secs),
            retention_text(*retention_secs)
        ),
        // A type this CLI is older than.
        other => println!("{:<24} {other:?}", e.name),
    }
}

fn print_route(r: &Route) {
    println!(
        "{:<24} {:<8} {:?} -> {}  {}",
        r.name,
        if r.is_enabled { "enabled" } else { "disabled" },
        r.source,
        r.endpoint_names.join(","),
        r.condition
    );
}

pub async fn run_endpoint(args: &ClientArgs, cmd: EndpointCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        EndpointCommand::Add {
            name,
            kind,
            partitions,
            retention,
            url,
            subject,
            stream,
            batch,
            timeout_secs,
            headers,
            ca,
            dead_after,
            container,
            encoding,
            file_name_format,
            batch_frequency,
            max_chunk_bytes,
        } => {
            let need = |v: Option<String>, what: &str| {
                v.with_context(|| format!("--{what} is required for this endpoint type"))
            };
            let kind = match kind {
                EndpointType::Stream => EndpointKind::Stream {
                    partitions,
                    retention_secs: retention,
                },
                EndpointType::Webhook => EndpointKind::Webhook {
                    url: need(url, "url")?,
                    batch: batch.unwrap_or(1),
                    timeout_secs,
                    headers: headers.into_iter().collect(),
                    ca_pem: match ca {
                        Some(p) => Some(
                            std::fs::read_to_string(&p)
                                .with_context(|| format!("reading {}", p.display()))?,
                        ),
                        None => None,
                    },
                    retention_secs: retention,
                    dead_after_secs: dead_after,
                },
                EndpointType::Storage => EndpointKind::Storage {
                    container: need(container, "container")?,
                    encoding: serde_json::from_value(serde_json::Value::String(encoding.clone()))
                        .map_err(|_| {
                        anyhow::anyhow!("--encoding {encoding:?}: avro, avrodeflate or json")
                    })?,
                    file_name_format,
                    batch_frequency_secs: batch_frequency,
                    max_chunk_bytes,
                    retention_secs: retention,
                    dead_after_secs: dead_after,
                },
                EndpointType::Nats => EndpointKind::Nats {
                    url: need(url, "url")?,
                    subject: need(subject, "subject")?,
                    stream,
                    batch: batch.unwrap_or(ferrohub_hub::routing::DEFAULT_NATS_BATCH),
                    timeout_secs,
                    retention_secs: retention,
                    dead_after_secs: dead_after,
                },
            };
            let body = Endpoint {
                name: name.clone(),
                kind,
            };
            let e: Endpoint = api
                .put_as(
                    &format!("/ferrohub/routing/endpoints/{}", enc(&name)),
                    &body,
                    None,
                )
                .await?;
            if args.output == OutputFormat::Json {
                return out.json(&e);
            }
            println!("added endpoint {}", e.name);
            print_endpoint(&e, None);
            Ok(())
        }
        EndpointCommand::List => {
            if args.output == OutputFormat::Json {
                let list: Vec<Endpoint> = api.get_as("/ferrohub/routing/endpoints").await?;
                return out.json(&list);
            }
            let view: RoutingView = api.get_as("/ferrohub/routing").await?;
            println!(
                "{:<24} stream  (built-in; retention and partitions set at `serve`)",
                "events"
            );
            for e in &view.config.endpoints {
                print_endpoint(e, view.health.iter().find(|h| h.name == e.name));
            }
            Ok(())
        }
        EndpointCommand::Remove { name } => {
            api.delete(&format!("/ferrohub/routing/endpoints/{}", enc(&name)), None)
                .await?;
            out.done(&format!("removed endpoint {name}"))
        }
    }
}

pub async fn run_route(args: &ClientArgs, cmd: RouteCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        RouteCommand::Add {
            name,
            source,
            condition,
            endpoints,
            disabled,
        } => {
            let body = Route {
                name: name.clone(),
                source,
                condition,
                endpoint_names: endpoints,
                is_enabled: !disabled,
            };
            let r: Route = api
                .put_as(
                    &format!("/ferrohub/routing/routes/{}", enc(&name)),
                    &body,
                    None,
                )
                .await?;
            if args.output == OutputFormat::Json {
                return out.json(&r);
            }
            println!("added route {}", r.name);
            print_route(&r);
            Ok(())
        }
        RouteCommand::List => {
            let view: RoutingView = api.get_as("/ferrohub/routing").await?;
            if args.output == OutputFormat::Json {
                return out.json(&view.config.routes);
            }
            if view.config.routes.is_empty() {
                println!("(no routes)");
            }
            view.config.routes.iter().for_each(print_route);
            println!(
                "fallback route: {}",
                if view.config.fallback_enabled {
                    "on (messages matching no route go to events)"
                } else {
                    "off (messages matching no route are dropped)"
                }
            );
            Ok(())
        }
        RouteCommand::Remove { name } => {
            api.delete(&format!("/ferrohub/routing/routes/{}", enc(&name)), None)
                .await?;
            out.done(&format!("removed route {name}"))
        }
        RouteCommand::Test {
            name,
            body,
            properties,
            system_properties,
            content_type,
            content_encoding,
            twin,
        } => {
            let body = match body {
                None => String::new(),
                Some(p) if p.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())
                    .context("reading the body from stdin")?,
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?,
            };
            let mut sys: BTreeMap<String, String> = system_properties.into_iter().collect();
            if let Some(ct) = content_type {
                sys.insert("content-type".into(), ct);
            }
            if let Some(ce) = content_encoding {
                sys.insert("content-encoding".into(), ce);
            }
            let twin = match twin {
                None => None,
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Some(
                        serde_json::from_str(&text)
                            .with_context(|| format!("{} is not JSON", p.display()))?,
                    )
                }
            };
            let msg = RouteTestMessage {
                body,
                app_properties: properties.into_iter().collect(),
                system_properties: sys,
                twin,
            };
            let r: RouteTestResult = api
                .post_as(
                    &format!("/ferrohub/routing/routes/{}/test", enc(&name)),
                    &msg,
                    None,
                )
                .await?;
            if args.output == OutputFormat::Json {
                return out.json(&r);
            }
            match r.result.as_str() {
                "true" => println!("route {name} matches"),
                "false" => println!("route {name} does not match: the condition is false"),
                _ => println!("route {name} does not match: the condition is undefined"),
            }
            if let Some(d) = &r.details {
                println!("  {d}");
            }
            Ok(())
        }
    }
}

pub async fn run_enrichment(args: &ClientArgs, cmd: EnrichmentCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        EnrichmentCommand::Add {
            key,
            value,
            endpoints,
        } => {
            let body = Enrichment {
                key: key.clone(),
                value,
                endpoint_names: endpoints,
            };
            let e: Enrichment = api
                .put_as(
                    &format!("/ferrohub/routing/enrichments/{}", enc(&key)),
                    &body,
                    None,
                )
                .await?;
            if args.output == OutputFormat::Json {
                return out.json(&e);
            }
            println!(
                "added enrichment {} = {} -> {}",
                e.key,
                e.value,
                e.endpoint_names.join(",")
            );
            Ok(())
        }
        EnrichmentCommand::List => {
            let list: Vec<Enrichment> = api.get_as("/ferrohub/routing/enrichments").await?;
            if args.output == OutputFormat::Json {
                return out.json(&list);
            }
            if list.is_empty() {
                println!("(no enrichments)");
            }
            for e in &list {
                println!(
                    "{:<24} {} -> {}",
                    e.key,
                    e.value,
                    e.endpoint_names.join(",")
                );
            }
            Ok(())
        }
        EnrichmentCommand::Remove { key } => {
            api.delete(
                &format!("/ferrohub/routing/enrichments/{}", enc(&key)),
                None,
            )
            .await?;
            out.done(&format!("removed enrichment {key}"))
        }
    }
}

pub async fn run_fallback(args: &ClientArgs, cmd: FallbackCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    let f: Fallback = match cmd {
        FallbackCommand::Show => api.get_as("/ferrohub/routing/fallback").await?,
        FallbackCommand::Set { state } => {
            let body = Fallback {
                enabled: state == OnOff::On,
            };
            api.put_as("/ferrohub/routing/fallback", &body, None)
                .await?
        }
    };
    if args.output == OutputFormat::Json {
        return out.json(&f);
    }
    println!("fallback route: {}", if f.enabled { "on" } else { "off" });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrohub_hub::routing::DEFAULT_STREAM_RETENTION_SECS;

    #[test]
    fn retention_reads_units() {
        assert_eq!(parse_retention("90"), Ok(90));
        assert_eq!(parse_retention("15m"), Ok(900));
        assert_eq!(parse_retention("12h"), Ok(43_200));
        assert_eq!(parse_retention("7d"), Ok(604_800));
        assert!(parse_retention("0").is_err());
        assert!(parse_retention("1w").is_err());
        assert!(parse_retention("h").is_err());
        assert_eq!(retention_text(DEFAULT_STREAM_RETENTION_SECS), "1d");
        assert_eq!(retention_text(90), "90s");
    }

    #[test]
    fn an_unknown_source_is_refused_by_name() {
        for s in [
            "DeviceMessages",
            "TwinChangeEvents",
            "DeviceLifecycleEvents",
            "DeviceConnectionStateEvents",
            "DigitalTwinChangeEvents",
            "DeviceJobLifecycleEvents",
        ] {
            assert!(parse_source(s).is_ok(), "{s}");
        }
        let e = parse_source("Telemetry").err().unwrap_or_default();
        assert!(e.contains("DeviceMessages"), "{e}");
    }
}
