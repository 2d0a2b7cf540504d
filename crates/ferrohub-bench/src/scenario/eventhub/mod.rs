//! The Event Hubs-compatible endpoint's scenarios, `eventhub-read` (drain a filled log) and
//! `eventhub-live` (end-to-end latency at a fixed publish rate), and what they share: the flags,
//! finding the endpoint, and one AMQP receiver per partition that settles and refills credit as
//! azure-eventhub does, checking every event's sequence number.

mod client;
mod fill;
pub mod live;
pub mod read;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferrohub_amqp::Value;

use crate::device;
use crate::hub::{split_host_port, Hub, HubArgs};
use client::Delivery;
pub use client::Settle;
pub(crate) use client::{Connection, Endpoint};

/// The handle every receiver link uses (each has a connection of its own).
const RECEIVER_HANDLE: u32 = 1;
/// Event Hubs' selector for "from the oldest retained event".
pub const FROM_START: &str = "amqp.annotation.x-opt-offset > '-1'";
/// ... and for "only events enqueued from now on".
pub const FROM_LATEST: &str = "amqp.annotation.x-opt-offset > '@latest'";

/// Flags both scenarios take.
#[derive(Debug, Clone, clap::Args)]
pub struct EventHubArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// The Event Hubs-compatible connection string
    /// (`Endpoint=sb://HOST[:PORT]/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…`)
    /// [default: hub.json's eventhub_connection_string].
    #[arg(
        long,
        env = "FERROHUB_BENCH_EVENTHUB_CONNECTION_STRING",
        hide_env_values = true
    )]
    pub eventhub_connection_string: Option<String>,
    /// Host or address to open AMQP connections to [default: the MQTT host]. TLS still names
    /// the Endpoint's host.
    #[arg(long)]
    pub amqp_host: Option<String>,
    #[arg(long, default_value = "$Default")]
    pub consumer_group: String,
    /// Link credit each receiver gives, topped up to this whenever half of it is used
    /// (azure-eventhub's prefetch defaults to 300).
    #[arg(long, default_value_t = 300)]
    pub prefetch: u32,
    /// How receivers settle.
    #[arg(long, value_enum, default_value_t = Settle::Each)]
    pub settle: Settle,
}

impl EventHubArgs {
    fn validate(&self) -> Result<()> {
        if self.prefetch < 2 {
            bail!("--prefetch must be at least 2");
        }
        Ok(())
    }
}

/// The parts of an Event Hubs connection string the bench needs.
#[derive(Debug, PartialEq, Eq)]
struct EventHubConnectionString {
    host: String,
    port: u16,
    policy: String,
    key: String,
    entity: String,
}

fn parse_connection_string(cs: &str) -> Result<EventHubConnectionString> {
    let mut endpoint = None;
    let (mut policy, mut key, mut entity) = (None, None, None);
    for part in cs.split(';').filter(|p| !p.is_empty()) {
        // The key's base64 padding is '=', so only the first '=' separates.
        // Never quoted in the error: a part may hold the key.
        let (k, v) = part
            .split_once('=')
            .context("a part of the Event Hubs connection string has no '='")?;
        match k {
            "Endpoint" => endpoint = Some(v),
            "SharedAccessKeyName" => policy = Some(v.to_owned()),
            "SharedAccessKey" => key = Some(v.to_owned()),
            "EntityPath" => entity = Some(v.to_owned()),
            _ => {}
        }
    }
    let endpoint = endpoint.context("the Event Hubs connection string has no Endpoint")?;
    let authority = endpoint
        .strip_prefix("sb://")
        .context("Endpoint must start with sb://")?
        .trim_end_matches('/');
    let (host, port) = split_host_port(authority);
    if host.is_empty() {
        bail!("Endpoint names no host");
    }
    Ok(EventHubConnectionString {
        host: host.to_owned(),
        port: port.unwrap_or(5671),
        policy: policy.context("no SharedAccessKeyName")?,
        key: key.context("no SharedAccessKey")?,
        entity: entity.context("no EntityPath")?,
    })
}

/// The hub (for devices) and its Event Hubs-compatible endpoint.
async fn resolve(args: &EventHubArgs) -> Result<(Hub, Endpoint)> {
    args.validate()?;
    let hub = Hub::resolve(&args.hub)?;
    let endpoint = endpoint(
        &hub,
        args.eventhub_connection_string.clone(),
        args.amqp_host.clone(),
    )
    .await?;
    Ok((hub, endpoint))
}

/// The hub's AMQP endpoint, from an Event Hubs connection string (given, or the hub.json one)
/// and the host to connect to (default: the MQTT host).
pub(crate) async fn endpoint(
    hub: &Hub,
    connection_string: Option<String>,
    amqp_host: Option<String>,
) -> Result<Endpoint> {
    let text = connection_string
        .or_else(|| hub.eventhub_connection_string.clone())
        .context(
            "no Event Hubs connection string: pass --eventhub-connection-string or a --data-dir \
             whose hub.json has one",
        )?;
    let cs = parse_connection_string(&text)?;
    let connect_host = amqp_host.unwrap_or_else(|| hub.mqtt_host.clone());
    let addr = device::resolve_mqtt(&connect_host, cs.port).await?;
    let endpoint = Endpoint {
        host: cs.host,
        addr,
        entity: cs.entity,
        policy: cs.policy,
        key: cs.key,
        tls: device::tls_config(&hub.ca_pem, false)?,
    };
    Ok(endpoint)
}

/// The retained range of one partition, from `$management`.
#[derive(Debug, Clone, Copy)]
struct PartitionRange {
    begin: u64,
    /// The newest event's sequence number; None when the partition is empty.
    last: Option<u64>,
}

impl PartitionRange {
    fn events(&self) -> u64 {
        self.last.map_or(0, |l| l + 1 - self.begin)
    }
}

/// A management connection: authorized, for READs.
struct Management {
    conn: Connection,
}

impl Management {
    async fn open(ep: &Endpoint) -> Result<Management> {
        let mut conn = Connection::open(ep, "ferrohub-bench-management").await?;
        conn.put_token(&ep.token(3600)?, &ep.audience()).await?;
        Ok(Management { conn })
    }

    async fn partition_count(&mut self, ep: &Endpoint) -> Result<u32> {
        let v = self.conn.read_properties(ep, None).await?;
        v.get("partition_count")
            .and_then(Value::as_u32)
            .filter(|n| *n > 0)
            .with_context(|| format!("the event hub's READ has no partition_count: {v:?}"))
    }

    async fn range(&mut self, ep: &Endpoint, partition: u32) -> Result<PartitionRange> {
        let v = self.conn.read_properties(ep, Some(partition)).await?;
        let begin = v
            .get("begin_sequence_number")
            .and_then(Value::as_i64)
            .with_context(|| format!("no begin_sequence_number: {v:?}"))?;
        let last = v
            .get("last_enqueued_sequence_number")
            .and_then(Value::as_i64)
            .with_context(|| format!("no last_enqueued_sequence_number: {v:?}"))?;
        let empty = v
            .get("is_partition_empty")
            .and_then(Value::as_bool)
            .unwrap_or(last < 0);
        Ok(PartitionRange {
            begin: u64::try_from(begin).unwrap_or(0),
            last: if empty {
                None
            } else {
                u64::try_from(last).ok()
            },
        })
    }

    async fn close(self) -> Result<()> {
        self.conn.close(None).await
    }
}

/// One partition's receiver on a connection of its own, as each azure-eventhub partition
/// consumer has.
struct Receiver {
    partition: u32,
    conn: Connection,
    settle: Settle,
    prefetch: u32,
    /// Credit the server still has from us, and the deliveries counted so far.
    credit: u32,
    delivery_count: u32,
    /// The sequence number the next event must carry; None before the first.
    expected: Option<u64>,
    deliveries: Vec<Delivery>,
}

/// A partition's event, decoded.
struct Event {
    sequence: u64,
    delivery: Delivery,
}

impl Receiver {
    /// Connects, puts a token on `$cbs` and attaches to `partition` at `selector`, with no
    /// credit yet.
    async fn open(
        ep: &Endpoint,
        args: &EventHubArgs,
        partition: u32,
        selector: &str,
    ) -> Result<Receiver> {
        let mut conn = Connection::open(ep, &format!("ferrohub-bench-p{partition}")).await?;
        conn.put_token(&ep.token(3600)?, &ep.audience()).await?;
        let address = ep.partition_address(&args.consumer_group, partition);
        conn.attach_receiver(RECEIVER_HANDLE, &address, selector, args.settle)
            .await?;
        Ok(Receiver {
            partition,
            conn,
            settle: args.settle,
            prefetch: args.prefetch,
            credit: 0,
            delivery_count: 0,
            expected: None,
            deliveries: Vec::with_capacity(args.prefetch as usize),
        })
    }

    /// Gives the link its first credit.
    async fn start(&mut self) -> Result<()> {
        self.conn
            .queue_flow(RECEIVER_HANDLE, self.delivery_count, self.prefetch);
        self.credit = self.prefetch;
        self.conn.flush().await
    }

    /// Reads what came next (waiting up to `wait`), settles it, tops credit up when half is
    /// used, and checks that sequence numbers follow one another with no gap. Returns the
    /// events in order; empty when nothing came.
    async fn next(&mut self, wait: Duration, events: &mut Vec<Event>) -> Result<()> {
        self.deliveries.clear();
        let mut batch = std::mem::take(&mut self.deliveries);
        let result = self.conn.read_deliveries(wait, &mut batch).await;
        let outcome = self.take(&mut batch, events);
        self.deliveries = batch;
        result?;
        outcome?;
        self.conn.flush().await
    }

    fn take(&mut self, batch: &mut Vec<Delivery>, events: &mut Vec<Event>) -> Result<()> {
        let n = batch.len() as u32;
        if n == 0 {
            return Ok(());
        }
        if n > self.credit {
            bail!(
                "partition {}: {n} deliveries on {} credit",
                self.partition,
                self.credit
            );
        }
        let (first, last) = (batch[0].delivery_id, batch[batch.len() - 1].delivery_id);
        match self.settle {
            Settle::Each => {
                for d in batch.iter() {
                    self.conn.queue_disposition(d.delivery_id, None);
                }
            }
            Settle::Range => self.conn.queue_disposition(first, Some(last)),
            Settle::Presettled => {}
        }
        self.credit -= n;
        self.delivery_count = self.delivery_count.wrapping_add(n);
        if self.credit <= self.prefetch / 2 {
            self.conn
                .queue_flow(RECEIVER_HANDLE, self.delivery_count, self.prefetch);
            self.credit = self.prefetch;
        }
        for d in batch.drain(..) {
            if d.handle != RECEIVER_HANDLE {
                bail!("a delivery on handle {} we never attached", d.handle);
            }
            let sequence = client::sequence_number(&d.message)
                .with_context(|| format!("partition {}", self.partition))?;
            if let Some(want) = self.expected {
                if sequence != want {
                    bail!(
                        "partition {}: sequence number {sequence} where {want} was next (a gap \
                         or a repeat)",
                        self.partition
                    );
                }
            }
            self.expected = Some(sequence + 1);
            events.push(Event {
                sequence,
                delivery: d,
            });
        }
        Ok(())
    }

    async fn close(self) -> Result<()> {
        self.conn.close(Some(RECEIVER_HANDLE)).await
    }
}

/// Opens one receiver per partition at `selector`, all at once.
async fn open_receivers(
    ep: &Endpoint,
    args: &EventHubArgs,
    partitions: u32,
    selector: &'static str,
) -> Result<Vec<Receiver>> {
    let ep = Arc::new(ep.clone());
    let mut tasks = Vec::new();
    for p in 0..partitions {
        let (ep, args) = (Arc::clone(&ep), args.clone());
        tasks.push(tokio::spawn(async move {
            Receiver::open(&ep, &args, p, selector)
                .await
                .with_context(|| format!("opening the receiver of partition {p}"))
        }));
    }
    let mut receivers = Vec::with_capacity(tasks.len());
    for t in tasks {
        receivers.push(t.await.context("receiver set-up panicked")??);
    }
    Ok(receivers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_hubs_connection_strings_parse() -> Result<()> {
        let cs = parse_connection_string(
            "Endpoint=sb://localhost:40123/;SharedAccessKeyName=service;SharedAccessKey=ab+c/d==;EntityPath=localhost",
        )?;
        assert_eq!(
            cs,
            EventHubConnectionString {
                host: "localhost".into(),
                port: 40123,
                policy: "service".into(),
                key: "ab+c/d==".into(),
                entity: "localhost".into(),
            }
        );
        let cs = parse_connection_string(
            "Endpoint=sb://hub.example.com/;SharedAccessKeyName=p;SharedAccessKey=k;EntityPath=e",
        )?;
        assert_eq!((cs.host.as_str(), cs.port), ("hub.example.com", 5671));
        assert!(parse_connection_string("Endpoint=https://x/;SharedAccessKeyName=p").is_err());
        assert!(parse_connection_string("SharedAccessKeyName=p;SharedAccessKey=k").is_err());
        Ok(())
    }

    #[test]
    fn a_range_counts_its_events() {
        let r = PartitionRange {
            begin: 5,
            last: Some(9),
        };
        assert_eq!(r.events(), 5);
        let empty = PartitionRange {
            begin: 3,
            last: None,
        };
        assert_eq!(empty.events(), 0);
    }
}
