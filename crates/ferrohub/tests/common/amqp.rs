//! A raw AMQP 1.0 client over TLS on the project's codec, for the Event Hubs endpoint's
//! tests: it sends exactly the performatives a test asks for and hands back every frame.

use std::time::Duration;

use ferrohub_amqp::frame::{self, FrameKind, AMQP_HEADER, SASL_HEADER};
use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::performative::{
    Attach, Begin, Detach, Disposition, Flow, Open, SaslInit, SaslOutcome, Source, Symbol, Target,
    Transfer,
};
use ferrohub_amqp::{Message, Performative, SaslFrame, Value};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{client_tls_config, Io, TestHub, HOST, R, WAIT};

/// How the client authenticates its connection.
pub enum Sasl<'a> {
    None,
    Anonymous,
    /// PLAIN with a SAS token as the password.
    Plain(&'a str),
}

pub struct AmqpClient {
    pub stream: Box<dyn Io>,
    next_message_id: u64,
    cbs_attached: bool,
    mgmt_attached: bool,
}

/// Handles the helper methods use for their own links.
const CBS_OUT: u32 = 100;
const CBS_IN: u32 = 101;
const MGMT_OUT: u32 = 102;
const MGMT_IN: u32 = 103;

pub fn source(address: &str, selector: Option<&str>) -> Value {
    let filter = match selector {
        Some(expr) => Value::Map(vec![(
            Value::sym("apache.org:selector-filter:string"),
            Value::Described(
                Box::new(Value::sym("apache.org:selector-filter:string")),
                Box::new(Value::str(expr)),
            ),
        )]),
        None => Value::Null,
    };
    Source {
        address: Some(address.into()),
        filter,
        ..Default::default()
    }
    .to_value()
}

pub fn target(address: &str) -> Value {
    Target {
        address: Some(address.into()),
        ..Default::default()
    }
    .to_value()
}

impl AmqpClient {
    /// TLS, the protocol headers, SASL as asked, Open (with `max_frame` as our frame size)
    /// and Begin on channel 0.
    pub async fn connect(hub: &TestHub, sasl: Sasl<'_>, max_frame: u32) -> R<Self> {
        let c = Self::tls(hub).await?;
        Self::connect_over(c.stream, sasl, max_frame).await
    }

    /// [`Self::connect`] over a stream already open (a WebSocket, say).
    pub async fn connect_over(stream: Box<dyn Io>, sasl: Sasl<'_>, max_frame: u32) -> R<Self> {
        let mut c = AmqpClient {
            stream,
            next_message_id: 1,
            cbs_attached: false,
            mgmt_attached: false,
        };
        match sasl {
            Sasl::None => {}
            Sasl::Anonymous | Sasl::Plain(_) => {
                c.put(&SASL_HEADER).await?;
                let mut h = [0u8; 8];
                c.read_exact_within(&mut h).await?;
                assert_eq!(h, SASL_HEADER);
                match c.recv_sasl().await? {
                    SaslFrame::Mechanisms(m) => {
                        let offered = format!("{:?}", m.mechanisms);
                        for want in ["MSSBCBS", "ANONYMOUS", "PLAIN"] {
                            assert!(offered.contains(want), "{offered}");
                        }
                    }
                    other => return Err(format!("expected mechanisms, got {other:?}").into()),
                }
                let init = match sasl {
                    Sasl::Plain(token) => SaslInit {
                        mechanism: Symbol("PLAIN".into()),
                        initial_response: Some(
                            format!("\0service@sas.root.{HOST}\0{token}").into_bytes(),
                        ),
                        hostname: Some(HOST.into()),
                    },
                    _ => SaslInit {
                        mechanism: Symbol("ANONYMOUS".into()),
                        initial_response: None,
                        hostname: Some(HOST.into()),
                    },
                };
                let bytes = frame::encode(FrameKind::Sasl, 0, Some(&init.to_value()), &[]);
                c.put(&bytes).await?;
                match c.recv_sasl().await? {
                    SaslFrame::Outcome(SaslOutcome { code: 0, .. }) => {}
                    other => return Err(format!("SASL outcome {other:?}").into()),
                }
            }
        }
        c.put(&AMQP_HEADER).await?;
        let mut h = [0u8; 8];
        c.read_exact_within(&mut h).await?;
        assert_eq!(h, AMQP_HEADER);
        c.send(
            0,
            Performative::Open(Open {
                container_id: "test".into(),
                hostname: Some(HOST.into()),
                max_frame_size: Some(max_frame),
                ..Default::default()
            }),
        )
        .await?;
        match c.recv_perf().await? {
            Performative::Open(o) => assert!(o.max_frame_size.is_some()),
            other => return Err(format!("expected Open, got {other:?}").into()),
        }
        c.send(
            0,
            Performative::Begin(Begin {
                remote_channel: None,
                next_outgoing_id: 0,
                incoming_window: 10_000,
                outgoing_window: 10_000,
                handle_max: Some(1024),
                ..Default::default()
            }),
        )
        .await?;
        match c.recv_perf().await? {
            Performative::Begin(b) => assert_eq!(b.remote_channel, Some(0)),
            other => return Err(format!("expected Begin, got {other:?}").into()),
        }
        Ok(c)
    }

    /// A bare TLS connection to the AMQP port.
    pub async fn tls(hub: &TestHub) -> R<Self> {
        Ok(AmqpClient {
            stream: Self::tls_to(hub.server().amqp_addr, &hub.ca).await?,
            next_message_id: 1,
            cbs_attached: false,
            mgmt_attached: false,
        })
    }

    /// A TLS stream to any AMQP listener whose certificate `ca` signed.
    pub async fn tls_to(addr: std::net::SocketAddr, ca: &std::path::Path) -> R<Box<dyn Io>> {
        let tcp = TcpStream::connect(addr).await?;
        let tls = TlsConnector::from(client_tls_config(ca, None)?)
            .connect(ServerName::try_from(HOST)?, tcp)
            .await?;
        Ok(Box::new(tls))
    }

    /// Writes and flushes (a WebSocket sends a message only when flushed).
    pub async fn put(&mut self, bytes: &[u8]) -> R<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn read_exact_within(&mut self, buf: &mut [u8]) -> R<()> {
        tokio::time::timeout(WAIT, self.stream.read_exact(buf))
            .await
            .map_err(|_| "timed out")??;
        Ok(())
    }

    pub async fn send(&mut self, channel: u16, p: Performative) -> R<()> {
        let bytes = frame::encode(FrameKind::Amqp, channel, Some(&p.to_value()), &[]);
        self.put(&bytes).await?;
        Ok(())
    }

    /// The next non-empty frame within `wait`, or None when none came.
    pub async fn recv_frame_within(&mut self, wait: Duration) -> R<Option<frame::Frame>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut head = [0u8; 8];
            match tokio::time::timeout_at(deadline, self.stream.read_exact(&mut head)).await {
                Err(_) => return Ok(None),
                Ok(r) => {
                    r?;
                }
            }
            let size = frame::frame_size(&head, u32::MAX)? as usize;
            let mut buf = vec![0u8; size];
            buf[..8].copy_from_slice(&head);
            tokio::time::timeout(WAIT, self.stream.read_exact(&mut buf[8..]))
                .await
                .map_err(|_| "timed out in a frame")??;
            let f = frame::decode(&buf)?;
            if f.body.is_some() {
                return Ok(Some(f));
            }
        }
    }

    async fn recv_sasl(&mut self) -> R<SaslFrame> {
        let f = self.recv_frame_within(WAIT).await?.ok_or("no SASL frame")?;
        Ok(SaslFrame::decode(f.body.as_ref().ok_or("empty")?)?)
    }

    pub async fn recv_perf(&mut self) -> R<Performative> {
        Ok(self.recv_perf_within(WAIT).await?.ok_or("timed out")?.0)
    }

    pub async fn recv_perf_within(&mut self, wait: Duration) -> R<Option<(Performative, Vec<u8>)>> {
        match self.recv_frame_within(wait).await? {
            None => Ok(None),
            Some(f) => Ok(Some((
                Performative::decode(f.body.as_ref().ok_or("empty")?)?,
                f.payload,
            ))),
        }
    }

    /// The next whole delivery (its frames joined), skipping flows and dispositions; None if
    /// nothing came within `wait`.
    pub async fn recv_delivery_within(&mut self, wait: Duration) -> R<Option<(Transfer, Message)>> {
        let mut payload = Vec::new();
        let mut first = None;
        loop {
            let Some((p, bytes)) = self.recv_perf_within(wait).await? else {
                return Ok(None);
            };
            match p {
                Performative::Transfer(t) => {
                    payload.extend_from_slice(&bytes);
                    let more = t.more.unwrap_or(false);
                    let t = first.get_or_insert(t).clone();
                    if !more {
                        return Ok(Some((t, Message::decode(&payload)?)));
                    }
                }
                Performative::Flow(_) | Performative::Disposition(_) => continue,
                other => return Err(format!("expected a transfer, got {other:?}").into()),
            }
        }
    }

    pub async fn attach(&mut self, a: Attach) -> R<()> {
        self.send(0, Performative::Attach(a)).await
    }

    /// Attaches a receiver on `address` with an optional selector; returns the server's Attach
    /// and, if it refused, its Detach.
    pub async fn attach_receiver(
        &mut self,
        handle: u32,
        address: &str,
        selector: Option<&str>,
    ) -> R<(Attach, Option<Detach>)> {
        self.attach_receiver_with(handle, address, selector, Value::Null)
            .await
    }

    /// [`Self::attach_receiver`] with link properties (e.g. `com.microsoft:epoch`).
    pub async fn attach_receiver_with(
        &mut self,
        handle: u32,
        address: &str,
        selector: Option<&str>,
        properties: Value,
    ) -> R<(Attach, Option<Detach>)> {
        self.attach(Attach {
            properties,
            name: format!("receiver-{handle}"),
            handle,
            role: true,
            snd_settle_mode: Some(1),
            rcv_settle_mode: Some(0),
            source: source(address, selector),
            target: target("test-receiver"),
            ..Default::default()
        })
        .await?;
        let attach = match self.recv_perf().await? {
            Performative::Attach(a) => a,
            other => return Err(format!("expected Attach, got {other:?}").into()),
        };
        let detach = match self.recv_perf_within(Duration::from_millis(300)).await? {
            Some((Performative::Detach(d), _)) => Some(d),
            None => None,
            Some(other) => return Err(format!("expected nothing or Detach, got {other:?}").into()),
        };
        Ok((attach, detach))
    }

    /// Detaches a link and waits for the server's Detach (skipping deliveries in flight).
    pub async fn detach(&mut self, handle: u32) -> R<()> {
        self.send(
            0,
            Performative::Detach(Detach {
                handle,
                closed: Some(true),
                error: None,
            }),
        )
        .await?;
        loop {
            match self.recv_perf().await? {
                Performative::Detach(d) if d.handle == handle => return Ok(()),
                Performative::Transfer(_) | Performative::Flow(_) => continue,
                other => return Err(format!("expected Detach, got {other:?}").into()),
            }
        }
    }

    pub async fn flow(&mut self, handle: u32, delivery_count: u32, credit: u32) -> R<()> {
        self.send(
            0,
            Performative::Flow(Flow {
                next_incoming_id: Some(0),
                incoming_window: 10_000,
                next_outgoing_id: 0,
                outgoing_window: 10_000,
                handle: Some(handle),
                delivery_count: Some(delivery_count),
                link_credit: Some(credit),
                ..Default::default()
            }),
        )
        .await
    }

    async fn attach_pair(&mut self, node: &str, out: u32, inn: u32) -> R<()> {
        self.attach(Attach {
            name: format!("{node}-sender"),
            handle: out,
            role: false,
            source: source("test-sender", None),
            target: target(node),
            initial_delivery_count: Some(0),
            ..Default::default()
        })
        .await?;
        self.attach(Attach {
            name: format!("{node}-receiver"),
            handle: inn,
            role: true,
            source: source(node, None),
            target: target("test-replies"),
            ..Default::default()
        })
        .await?;
        self.flow(inn, 0, 50).await?;
        let mut attaches = 0;
        while attaches < 2 {
            match self.recv_perf().await? {
                Performative::Attach(_) => attaches += 1,
                Performative::Flow(_) => {}
                other => return Err(format!("expected Attach, got {other:?}").into()),
            }
        }
        Ok(())
    }

    /// Sends a request message on `out` and returns the reply from `inn`.
    async fn request(&mut self, out: u32, app: Vec<(Value, Value)>, body: Value) -> R<Message> {
        let id = self.next_message_id;
        self.next_message_id += 1;
        let m = Message {
            properties: Some(Properties {
                message_id: Value::Ulong(id),
                reply_to: Some("test-replies".into()),
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
            settled: Some(true),
            ..Default::default()
        };
        let bytes = frame::encode(FrameKind::Amqp, 0, Some(&t.to_value()), &m.encode());
        self.put(&bytes).await?;
        let (_, reply) = self
            .recv_delivery_within(WAIT)
            .await?
            .ok_or("no reply to the request")?;
        let corr = reply.properties.as_ref().map(|p| p.correlation_id.clone());
        assert_eq!(
            corr,
            Some(Value::Ulong(id)),
            "correlation-id echoes the message-id"
        );
        Ok(reply)
    }

    /// Attaches a sender (we send, unsettled) to `address`; returns the server's Attach and
    /// either the credit it then gave or, if it refused, its Detach.
    pub async fn attach_sender(
        &mut self,
        handle: u32,
        address: &str,
    ) -> R<(Attach, Result<u32, Detach>)> {
        self.attach(Attach {
            name: format!("sender-{handle}"),
            handle,
            role: false,
            snd_settle_mode: Some(0),
            rcv_settle_mode: Some(0),
            source: source("test-sender", None),
            target: target(address),
            initial_delivery_count: Some(0),
            ..Default::default()
        })
        .await?;
        let attach = match self.recv_perf().await? {
            Performative::Attach(a) => a,
            other => return Err(format!("expected Attach, got {other:?}").into()),
        };
        match self.recv_perf().await? {
            Performative::Flow(f) if f.handle == Some(handle) => {
                Ok((attach, Ok(f.link_credit.unwrap_or(0))))
            }
            Performative::Detach(d) => Ok((attach, Err(d))),
            other => Err(format!("expected Flow or Detach, got {other:?}").into()),
        }
    }

    /// Sends `m` as delivery `id` on `handle`, in frames of at most 16 KiB of payload.
    pub async fn send_message(
        &mut self,
        handle: u32,
        id: u32,
        m: &Message,
        settled: bool,
    ) -> R<()> {
        let out = transfer_frames(handle, id, &m.encode(), settled);
        self.put(&out).await
    }

    /// The next Disposition within `wait`, skipping flows; None if none came.
    pub async fn recv_disposition_within(&mut self, wait: Duration) -> R<Option<Disposition>> {
        loop {
            match self.recv_perf_within(wait).await? {
                None => return Ok(None),
                Some((Performative::Disposition(d), _)) => return Ok(Some(d)),
                Some((Performative::Flow(_), _)) => continue,
                Some((other, _)) => {
                    return Err(format!("expected a Disposition, got {other:?}").into())
                }
            }
        }
    }

    /// A `$cbs` put-token; returns the reply's status-code.
    pub async fn put_token(&mut self, token: &str, audience: &str) -> R<i32> {
        if !self.cbs_attached {
            self.attach_pair("$cbs", CBS_OUT, CBS_IN).await?;
            self.cbs_attached = true;
        }
        let app = vec![
            (Value::str("operation"), Value::str("put-token")),
            (
                Value::str("type"),
                Value::str("servicebus.windows.net:sastoken"),
            ),
            (Value::str("name"), Value::str(audience)),
        ];
        let reply = self.request(CBS_OUT, app, Value::str(token)).await?;
        status_of(&reply)
    }

    /// A `$management` READ with these application properties.
    pub async fn management(&mut self, app: Vec<(Value, Value)>) -> R<Message> {
        if !self.mgmt_attached {
            self.attach_pair("$management", MGMT_OUT, MGMT_IN).await?;
            self.mgmt_attached = true;
        }
        self.request(MGMT_OUT, app, Value::Null).await
    }
}

/// The frames of one delivery: 16 KiB of payload each, and one (empty) frame for an empty
/// message.
fn transfer_frames(handle: u32, id: u32, payload: &[u8], settled: bool) -> Vec<u8> {
    let mut chunks: Vec<&[u8]> = payload.chunks(16 * 1024).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    let mut out = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let t = Transfer {
            handle,
            delivery_id: (i == 0).then_some(id),
            delivery_tag: (i == 0).then(|| id.to_be_bytes().to_vec()),
            message_format: Some(0),
            settled: Some(settled),
            more: Some(i < last),
            ..Default::default()
        };
        out.extend(frame::encode(
            FrameKind::Amqp,
            0,
            Some(&t.to_value()),
            chunk,
        ));
    }
    out
}

/// The primary key of one of the hub's policies.
pub async fn service_key(hub: &TestHub, policy: &str) -> R<String> {
    Ok(hub
        .server()
        .hub
        .policy(policy)
        .await?
        .ok_or("no such policy")?
        .primary_key)
}

pub fn status_of(reply: &Message) -> R<i32> {
    match reply.application_property("status-code") {
        Some(Value::Int(n)) => Ok(*n),
        other => Err(format!("status-code must be an int, got {other:?}").into()),
    }
}

/// A token signed the Service Bus way (Event Hubs clients): HMAC keyed with the key's text.
pub fn eventhub_token(audience: &str, key: &str, policy: &str, ttl: i64) -> String {
    use base64::Engine;
    use hmac::Mac;
    let sr = percent_encoding::utf8_percent_encode(audience, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let se = (super::now() as i64 + ttl) as u64;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig = percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={policy}")
}

/// The message annotation `key`.
pub fn annotation<'a>(m: &'a Message, key: &str) -> Option<&'a Value> {
    m.message_annotations
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}
