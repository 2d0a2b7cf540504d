//! A raw AMQP 1.0 client over TLS on the project's codec, doing what the Event Hubs clients
//! (azure-eventhub's pyamqp) do on the wire: SASL ANONYMOUS, Open, one session, a `$cbs`
//! put-token signed the Service Bus way, `$management` READs, and partition receivers with a
//! selector filter, link credit and settlement; and, as the IoT Hub service SDKs do, a sender
//! on `messages/devicebound` for C2D.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use ferrohub_amqp::frame::{self, FrameKind, AMQP_HEADER, SASL_HEADER};
use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::performative::{
    accepted, Attach, Begin, Close, Detach, Disposition, Flow, Open, SaslInit, SaslOutcome, Source,
    Symbol, Target, Transfer,
};
use ferrohub_amqp::{Message, Performative, SaslFrame, Value};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Every wait on the server during set-up (handshakes, attaches, replies) gets this long.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// The frame size we offer; pyamqp offers 1 MiB, the server offers 64 KiB, so frames the
/// server sends are bounded by its own figure.
const MAX_FRAME: u32 = 1024 * 1024;
/// The largest delivery we join from its frames: telemetry is at most 256 KiB plus what the hub
/// adds, and the server itself says 1 MiB in its Attach.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Our session's incoming window, in transfer frames, reopened with every link flow. pyamqp's
/// default.
const SESSION_WINDOW: u32 = 65_536;
/// Handles of the `$cbs` and `$management` request/reply links.
const CBS_OUT: u32 = 100;
const CBS_IN: u32 = 101;
const MGMT_OUT: u32 = 102;
const MGMT_IN: u32 = 103;

/// Where the Event Hubs-compatible endpoint is and how to sign for it.
#[derive(Clone)]
pub struct Endpoint {
    /// SNI and the name in the server certificate (the connection string's host).
    pub host: String,
    pub addr: SocketAddr,
    /// The event hub name (`EntityPath`).
    pub entity: String,
    pub policy: String,
    pub key: String,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Endpoint {
    /// `sb://HOST/ENTITY`, the audience Event Hubs clients put tokens for.
    pub fn audience(&self) -> String {
        format!("sb://{}/{}", self.host, self.entity)
    }

    pub fn partition_address(&self, consumer_group: &str, partition: u32) -> String {
        format!(
            "amqps://{}/{}/ConsumerGroups/{consumer_group}/Partitions/{partition}",
            self.host, self.entity
        )
    }

    /// A token for [`Self::audience`], valid for `lifetime_secs`.
    pub fn token(&self, lifetime_secs: u64) -> Result<String> {
        service_bus_token(
            &self.audience(),
            &self.policy,
            &self.key,
            crate::registry::now_epoch() + lifetime_secs,
        )
    }
}

/// A token signed the Service Bus way, as Event Hubs clients sign: HMAC-SHA256 over the
/// URL-encoded audience and the expiry, keyed with the key's text as written (not decoded).
pub fn service_bus_token(audience: &str, policy: &str, key: &str, expiry: u64) -> Result<String> {
    use base64::Engine;
    use hmac::Mac;
    let encode = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let sr = encode(audience);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes())
        .context("an HMAC key of any length")?;
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
        encode(&sig),
        encode(policy)
    ))
}

/// How a receiver settles what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Settle {
    /// As azure-eventhub does: snd-settle-mode unsettled, rcv-settle-mode first, and one
    /// settled `accepted` disposition per delivery.
    Each,
    /// Unsettled deliveries, settled by one disposition per batch read (first..last).
    Range,
    /// snd-settle-mode settled: the server sends deliveries pre-settled; nothing to answer.
    Presettled,
}

/// One decoded delivery.
pub struct Delivery {
    pub handle: u32,
    pub delivery_id: u32,
    pub message: Message,
}

/// One AMQP connection with one session on channel 0.
pub struct Connection {
    stream: TlsStream<TcpStream>,
    input: BytesMut,
    /// Frames queued to be written together.
    out: Vec<u8>,
    /// The transfer id the server sends next (we count what it sent).
    next_incoming_id: u32,
    next_outgoing_id: u32,
    next_message_id: u64,
    cbs_attached: bool,
    mgmt_attached: bool,
    /// A delivery split over several transfer frames, while it is being joined.
    partial: Option<(Transfer, Vec<u8>)>,
}

impl Connection {
    /// TCP, TLS, SASL ANONYMOUS, Open and Begin, each within [`SETUP_TIMEOUT`].
    pub async fn open(ep: &Endpoint, container_id: &str) -> Result<Connection> {
        tokio::time::timeout(SETUP_TIMEOUT, Self::open_inner(ep, container_id))
            .await
            .context("timed out opening the AMQP connection")?
    }

    async fn open_inner(ep: &Endpoint, container_id: &str) -> Result<Connection> {
        let tcp = TcpStream::connect(ep.addr)
            .await
            .with_context(|| format!("connecting to {}", ep.addr))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(ep.host.clone())
            .with_context(|| format!("{:?} is not a TLS server name", ep.host))?;
        let stream = TlsConnector::from(Arc::clone(&ep.tls))
            .connect(name, tcp)
            .await
            .context("TLS handshake with the AMQP port")?;
        let mut c = Connection {
            stream,
            input: BytesMut::with_capacity(256 * 1024),
            out: Vec::with_capacity(64 * 1024),
            next_incoming_id: 0,
            next_outgoing_id: 0,
            next_message_id: 1,
            cbs_attached: false,
            mgmt_attached: false,
            partial: None,
        };
        c.out.extend_from_slice(&SASL_HEADER);
        c.flush().await?;
        c.expect_header(SASL_HEADER).await?;
        match c.sasl_frame().await? {
            SaslFrame::Mechanisms(m) if format!("{:?}", m.mechanisms).contains("ANONYMOUS") => {}
            other => bail!("the server does not offer SASL ANONYMOUS: {other:?}"),
        }
        let init = SaslInit {
            mechanism: Symbol("ANONYMOUS".into()),
            initial_response: None,
            hostname: Some(ep.host.clone()),
        };
        c.out.extend_from_slice(&frame::encode(
            FrameKind::Sasl,
            0,
            Some(&init.to_value()),
            &[],
        ));
        c.flush().await?;
        match c.sasl_frame().await? {
            SaslFrame::Outcome(SaslOutcome { code: 0, .. }) => {}
            other => bail!("SASL refused: {other:?}"),
        }
        c.out.extend_from_slice(&AMQP_HEADER);
        c.queue(Performative::Open(Open {
            container_id: container_id.to_owned(),
            hostname: Some(ep.host.clone()),
            max_frame_size: Some(MAX_FRAME),
            channel_max: Some(65_535),
            // Like the SDK's default keep-alive: the server heartbeats at half of it.
            idle_time_out: Some(120_000),
            ..Default::default()
        }));
        c.queue(Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: SESSION_WINDOW,
            outgoing_window: SESSION_WINDOW,
            handle_max: Some(4_294_967_295),
            ..Default::default()
        }));
        c.flush().await?;
        c.expect_header(AMQP_HEADER).await?;
        match c.performative().await? {
            (Performative::Open(_), _) => {}
            other => bail!("expected Open, got {:?}", other.0),
        }
        match c.performative().await? {
            (Performative::Begin(b), _) if b.remote_channel == Some(0) => {}
            other => bail!("expected Begin, got {:?}", other.0),
        }
        Ok(c)
    }

    fn queue(&mut self, p: Performative) {
        self.out
            .extend_from_slice(&frame::encode(FrameKind::Amqp, 0, Some(&p.to_value()), &[]));
    }

    /// Writes what is queued; a server that takes nothing for [`SETUP_TIMEOUT`] fails it.
    pub async fn flush(&mut self) -> Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(SETUP_TIMEOUT, write)
            .await
            .context("the server took no bytes for a while")?
            .context("writing to the AMQP connection")?;
        self.out.clear();
        Ok(())
    }

    async fn fill(&mut self) -> Result<()> {
        let n = tokio::time::timeout(SETUP_TIMEOUT, self.stream.read_buf(&mut self.input))
            .await
            .context("timed out waiting for the server")??;
        if n == 0 {
            bail!("the server closed the AMQP connection");
        }
        Ok(())
    }

    async fn expect_header(&mut self, want: [u8; 8]) -> Result<()> {
        while self.input.len() < 8 {
            self.fill().await?;
        }
        let got = self.input.split_to(8);
        if got[..] != want[..] {
            bail!(
                "expected protocol header {want:02x?}, got {:02x?}",
                &got[..]
            );
        }
        Ok(())
    }

    /// The next whole frame already read, if any (heartbeats included).
    pub fn take_frame(&mut self) -> Result<Option<frame::Frame>> {
        if self.input.len() < 8 {
            return Ok(None);
        }
        let head: [u8; 8] = self.input[..8].try_into().context("8 bytes")?;
        let size = frame::frame_size(&head, MAX_FRAME)? as usize;
        if self.input.len() < size {
            self.input.reserve(size - self.input.len());
            return Ok(None);
        }
        let f = frame::decode(&self.input[..size])?;
        self.input.advance(size);
        Ok(Some(f))
    }

    async fn next_frame(&mut self) -> Result<frame::Frame> {
        loop {
            if let Some(f) = self.take_frame()? {
                if f.body.is_some() {
                    return Ok(f);
                }
                continue; // heartbeat
            }
            self.fill().await?;
        }
    }

    async fn sasl_frame(&mut self) -> Result<SaslFrame> {
        let f = self.next_frame().await?;
        let body = f.body.context("empty SASL frame")?;
        Ok(SaslFrame::decode(&body)?)
    }

    /// The next performative and its payload, during set-up.
    async fn performative(&mut self) -> Result<(Performative, Vec<u8>)> {
        let f = self.next_frame().await?;
        let body = f.body.context("empty frame")?;
        let p = Performative::decode(&body)?;
        if let Performative::Transfer(_) = p {
            self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
        }
        if let Performative::Close(c) = &p {
            bail!("the server closed the connection: {:?}", c.error);
        }
        Ok((p, f.payload))
    }

    async fn attach_pair(&mut self, node: &str, out: u32, inn: u32) -> Result<()> {
        self.queue(Performative::Attach(Attach {
            name: format!("{node}-sender"),
            handle: out,
            role: false,
            snd_settle_mode: Some(0),
            rcv_settle_mode: Some(0),
            source: source(node),
            target: target(node),
            initial_delivery_count: Some(0),
            ..Default::default()
        }));
        self.queue(Performative::Attach(Attach {
            name: format!("{node}-receiver"),
            handle: inn,
            role: true,
            snd_settle_mode: Some(0),
            rcv_settle_mode: Some(0),
            source: source(node),
            target: target(node),
            ..Default::default()
        }));
        self.queue_flow(inn, 0, 100);
        self.flush().await?;
        let (mut attaches, mut credited) = (0, false);
        while attaches < 2 || !credited {
            match self.performative().await?.0 {
                Performative::Attach(_) => attaches += 1,
                Performative::Flow(f) if f.handle == Some(out) => credited = true,
                Performative::Flow(_) => {}
                Performative::Detach(d) => bail!("{node} refused the link: {:?}", d.error),
                other => bail!("expected Attach on {node}, got {other:?}"),
            }
        }
        Ok(())
    }

    /// Sends a request on `out`; returns the reply on `inn`.
    async fn request(
        &mut self,
        out: u32,
        node: &str,
        app: Vec<(Value, Value)>,
        body: Value,
    ) -> Result<Message> {
        let id = self.next_message_id;
        self.next_message_id += 1;
        let m = Message {
            properties: Some(Properties {
                message_id: Value::Ulong(id),
                to: Some(node.to_owned()),
                reply_to: Some(node.to_owned()),
                ..Default::default()
            }),
            application_properties: app,
            body: Body::Value(body),
            ..Default::default()
        };
        let t = Transfer {
            handle: out,
            delivery_id: Some(id as u32),
            delivery_tag: Some(id.to_be_bytes().to_vec()),
            message_format: Some(0),
            settled: Some(false),
            more: Some(false),
            ..Default::default()
        };
        self.out.extend_from_slice(&frame::encode(
            FrameKind::Amqp,
            0,
            Some(&t.to_value()),
            &m.encode(),
        ));
        self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
        self.flush().await?;
        loop {
            match self.performative().await? {
                (Performative::Transfer(t), payload) => {
                    let reply = Message::decode(&payload)?;
                    let ours = reply
                        .properties
                        .as_ref()
                        .is_some_and(|p| p.correlation_id == Value::Ulong(id));
                    if t.settled != Some(true) {
                        self.queue_disposition(t.delivery_id.unwrap_or(0), None);
                        self.flush().await?;
                    }
                    if ours {
                        return Ok(reply);
                    }
                }
                (Performative::Flow(_) | Performative::Disposition(_), _) => {}
                (other, _) => bail!("expected the reply from {node}, got {other:?}"),
            }
        }
    }

    /// A `$cbs` put-token for `audience`; fails unless the server answers 200.
    pub async fn put_token(&mut self, token: &str, audience: &str) -> Result<()> {
        if !self.cbs_attached {
            within(self.attach_pair("$cbs", CBS_OUT, CBS_IN)).await?;
            self.cbs_attached = true;
        }
        let app = vec![
            (Value::str("operation"), Value::str("put-token")),
            (
                Value::str("type"),
                Value::str("servicebus.windows.net:sastoken"),
            ),
            (Value::str("name"), Value::str(audience)),
            (Value::str("expiration"), Value::Timestamp(0)),
        ];
        let reply = within(self.request(CBS_OUT, "$cbs", app, Value::str(token))).await?;
        match status_of(&reply) {
            Some(200) => Ok(()),
            other => bail!(
                "put-token answered {other:?}: {:?}",
                reply.application_property("status-description")
            ),
        }
    }

    /// A `$management` READ of the event hub (`partition` None) or of one partition; returns
    /// the answer's map.
    pub async fn read_properties(
        &mut self,
        ep: &Endpoint,
        partition: Option<u32>,
    ) -> Result<Value> {
        if !self.mgmt_attached {
            within(self.attach_pair("$management", MGMT_OUT, MGMT_IN)).await?;
            self.mgmt_attached = true;
        }
        let mut app = vec![
            (Value::str("operation"), Value::str("READ")),
            (Value::str("name"), Value::str(ep.entity.clone())),
            (Value::str("security_token"), Value::str(ep.token(3600)?)),
        ];
        match partition {
            None => app.push((Value::str("type"), Value::str("com.microsoft:eventhub"))),
            Some(p) => {
                app.push((Value::str("type"), Value::str("com.microsoft:partition")));
                app.push((Value::str("partition"), Value::str(p.to_string())));
            }
        }
        let reply = within(self.request(MGMT_OUT, "$management", app, Value::Null)).await?;
        match (status_of(&reply), reply.body) {
            (Some(200), Body::Value(v)) => Ok(v),
            (status, _) => bail!("$management READ answered {status:?}"),
        }
    }

    /// Attaches a partition receiver reading from `selector`, with no credit yet; fails if the
    /// server refuses it.
    pub async fn attach_receiver(
        &mut self,
        handle: u32,
        address: &str,
        selector: &str,
        settle: Settle,
    ) -> Result<()> {
        let filter = Value::Map(vec![(
            Value::sym("apache.org:selector-filter:string"),
            Value::Described(
                Box::new(Value::sym("apache.org:selector-filter:string")),
                Box::new(Value::str(selector)),
            ),
        )]);
        let source = Source {
            address: Some(address.to_owned()),
            filter,
            ..Default::default()
        }
        .to_value();
        self.queue(Performative::Attach(Attach {
            name: format!("ferrohub-bench-receiver-{handle}"),
            handle,
            role: true,
            snd_settle_mode: Some(if settle == Settle::Presettled { 1 } else { 0 }),
            rcv_settle_mode: Some(0),
            source,
            target: target("ferrohub-bench-receiver"),
            properties: Value::Map(vec![(
                Value::sym("com.microsoft:timeout"),
                Value::Long(60_000),
            )]),
            desired_capabilities: Value::Array(vec![Value::sym("com.microsoft:georeplication")]),
            ..Default::default()
        }));
        self.flush().await?;
        match self.performative().await?.0 {
            Performative::Attach(_) => {}
            other => bail!("expected Attach for {address}, got {other:?}"),
        }
        // A refusal is an Attach followed at once by a Detach; give it a moment to show.
        let quiet = Duration::from_millis(200);
        if let Ok(r) = tokio::time::timeout(quiet, self.performative()).await {
            match r?.0 {
                Performative::Detach(d) => bail!("{address} refused: {:?}", d.error),
                other => bail!("expected nothing after Attach, got {other:?}"),
            }
        }
        Ok(())
    }

    /// Attaches a sender (unsettled deliveries) to `address`; returns the credit the server
    /// then gave it.
    pub async fn attach_sender(&mut self, handle: u32, address: &str) -> Result<u32> {
        self.queue(Performative::Attach(Attach {
            name: format!("ferrohub-bench-sender-{handle}"),
            handle,
            role: false,
            snd_settle_mode: Some(0),
            rcv_settle_mode: Some(0),
            source: source("ferrohub-bench-sender"),
            target: target(address),
            initial_delivery_count: Some(0),
            ..Default::default()
        }));
        self.flush().await?;
        within(async {
            let mut attached = false;
            loop {
                match self.performative().await?.0 {
                    Performative::Attach(_) => attached = true,
                    Performative::Flow(f) if attached && f.handle == Some(handle) => {
                        return Ok(f.link_credit.unwrap_or(0));
                    }
                    Performative::Flow(_) => {}
                    Performative::Detach(d) => bail!("{address} refused the sender: {:?}", d.error),
                    other => bail!("expected Attach and Flow for {address}, got {other:?}"),
                }
            }
        })
        .await
    }

    /// Queues `m` as unsettled delivery `delivery_id` on sender `handle`, in one frame (C2D
    /// messages are at most 64 KB; the server's frames are 64 KiB).
    pub fn queue_message(&mut self, handle: u32, delivery_id: u32, m: &Message) {
        let t = Transfer {
            handle,
            delivery_id: Some(delivery_id),
            delivery_tag: Some(delivery_id.to_be_bytes().to_vec()),
            message_format: Some(0),
            settled: Some(false),
            more: Some(false),
            ..Default::default()
        };
        frame::encode_into(
            &mut self.out,
            FrameKind::Amqp,
            0,
            Some(&t.to_value()),
            &m.encode(),
        );
        self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
    }

    /// Reads whatever the server sent next into the input buffer; false when nothing came
    /// within `wait`.
    async fn read_within(&mut self, wait: Duration) -> Result<bool> {
        match tokio::time::timeout(wait, self.stream.read_buf(&mut self.input)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) => bail!("the server closed the AMQP connection"),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(e).context("reading from the AMQP connection"),
        }
    }

    /// Reads what the server sent next (waiting up to `wait`) and appends every performative
    /// in it to `out` (a sender's flows and dispositions). Returns false when nothing came.
    pub async fn read_performatives(
        &mut self,
        wait: Duration,
        out: &mut Vec<Performative>,
    ) -> Result<bool> {
        if !self.read_within(wait).await? {
            return Ok(false);
        }
        while let Some(f) = self.take_frame()? {
            let Some(body) = f.body else { continue };
            match Performative::decode(&body)? {
                Performative::Close(c) => bail!("the server closed the connection: {:?}", c.error),
                p => out.push(p),
            }
        }
        Ok(true)
    }

    /// Queues a link flow: `credit` from `delivery_count`, and our session window reopened from
    /// the transfer id we expect next.
    pub fn queue_flow(&mut self, handle: u32, delivery_count: u32, credit: u32) {
        let flow = Flow {
            next_incoming_id: Some(self.next_incoming_id),
            incoming_window: SESSION_WINDOW,
            next_outgoing_id: self.next_outgoing_id,
            outgoing_window: SESSION_WINDOW,
            handle: Some(handle),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            available: None,
            drain: Some(false),
            echo: Some(false),
            properties: Value::Null,
        };
        self.queue(Performative::Flow(flow));
    }

    /// Queues a settled `accepted` disposition for deliveries `first..=last`.
    pub fn queue_disposition(&mut self, first: u32, last: Option<u32>) {
        self.queue(Performative::Disposition(Disposition {
            role: true,
            first,
            last: Some(last.unwrap_or(first)),
            settled: Some(true),
            state: accepted(),
            batchable: None,
        }));
    }

    /// Reads whatever the server sent next (waiting up to `wait`) and decodes every whole
    /// delivery in it into `deliveries`. Flows and heartbeats are skipped; a Detach, End or
    /// Close fails the read. Returns false when nothing came within `wait`.
    pub async fn read_deliveries(
        &mut self,
        wait: Duration,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<bool> {
        if !self.read_within(wait).await? {
            return Ok(false);
        }
        while let Some(f) = self.take_frame()? {
            let Some(body) = f.body else { continue };
            match Performative::decode(&body)? {
                Performative::Transfer(t) => {
                    self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
                    self.on_transfer(t, f.payload, deliveries)?;
                }
                Performative::Flow(_) | Performative::Disposition(_) => {}
                Performative::Detach(d) => bail!("the server detached the link: {:?}", d.error),
                Performative::End(e) => bail!("the server ended the session: {:?}", e.error),
                Performative::Close(c) => bail!("the server closed the connection: {:?}", c.error),
                other => bail!("unexpected {other:?}"),
            }
        }
        Ok(true)
    }

    fn on_transfer(
        &mut self,
        t: Transfer,
        payload: Vec<u8>,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<()> {
        let more = t.more.unwrap_or(false);
        let (first, payload) = match self.partial.take() {
            Some((first, mut joined)) => {
                if joined.len() + payload.len() > MAX_MESSAGE {
                    bail!("a delivery larger than {MAX_MESSAGE} bytes");
                }
                joined.extend_from_slice(&payload);
                (first, joined)
            }
            None => (t, payload),
        };
        if more {
            self.partial = Some((first, payload));
            return Ok(());
        }
        let delivery_id = first
            .delivery_id
            .context("a delivery's first transfer carries no delivery-id")?;
        let message = Message::decode(&payload).context("undecodable event message")?;
        deliveries.push(Delivery {
            handle: first.handle,
            delivery_id,
            message,
        });
        Ok(())
    }

    /// Detaches `handle` and closes the connection, waiting briefly for the server's Close.
    pub async fn close(mut self, handle: Option<u32>) -> Result<()> {
        if let Some(handle) = handle {
            self.queue(Performative::Detach(Detach {
                handle,
                closed: Some(true),
                error: None,
            }));
        }
        self.queue(Performative::Close(Close { error: None }));
        self.flush().await?;
        let wait = async {
            loop {
                match self.take_frame()? {
                    Some(f) => {
                        if let Some(Ok(Performative::Close(_))) =
                            f.body.as_ref().map(Performative::decode)
                        {
                            return Ok::<(), anyhow::Error>(());
                        }
                    }
                    None => self.fill().await?,
                }
            }
        };
        // A receiver still had deliveries in flight: they are read and dropped on the way.
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .context("no Close from the server")??;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// `step` within [`SETUP_TIMEOUT`] as a whole: a server that keeps sending other frames (flows,
/// heartbeats) does not keep a set-up step waiting longer.
async fn within<T>(step: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(SETUP_TIMEOUT, step)
        .await
        .context("the server did not answer in time")?
}

fn source(address: &str) -> Value {
    Source {
        address: Some(address.to_owned()),
        ..Default::default()
    }
    .to_value()
}

fn target(address: &str) -> Value {
    Target {
        address: Some(address.to_owned()),
        ..Default::default()
    }
    .to_value()
}

fn status_of(reply: &Message) -> Option<i64> {
    reply
        .application_property("status-code")
        .and_then(Value::as_i64)
}

/// The message annotation `key`.
pub fn annotation<'a>(m: &'a Message, key: &str) -> Option<&'a Value> {
    m.message_annotations
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// An event's `x-opt-sequence-number`, which Event Hubs sends as a long.
pub fn sequence_number(m: &Message) -> Result<u64> {
    match annotation(m, "x-opt-sequence-number") {
        Some(Value::Long(n)) if *n >= 0 => Ok(*n as u64),
        other => bail!("x-opt-sequence-number must be a non-negative long, got {other:?}"),
    }
}

/// The body of an event (one data section, as IoT Hub's endpoint sends it).
pub fn body(m: &Message) -> Option<&[u8]> {
    match &m.body {
        Body::Data(chunks) if chunks.len() == 1 => Some(&chunks[0]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_signed_with_the_key_text() -> Result<()> {
        let key = "c2VjcmV0";
        let token = service_bus_token("sb://localhost/localhost", "service", key, 4_000_000_000)?;
        let parsed = ferrohub_iothub::sas::SasToken::parse(&token)?;
        assert!(parsed.verify_signature_any_convention(key));
        // Keyed with the text, so IoT Hub's convention (the decoded key) must not verify.
        assert!(!parsed.verify_signature(key));
        assert!(token.starts_with("SharedAccessSignature sr=sb%3A%2F%2Flocalhost%2Flocalhost&"));
        assert!(token.ends_with("&se=4000000000&skn=service"));
        Ok(())
    }
}
