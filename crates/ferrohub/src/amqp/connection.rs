//! One AMQP connection: protocol header (SASL or not), Open, sessions and links, and the
//! nodes behind them: the Event Hubs endpoint (`$cbs`, `$management`, partition receivers)
//! and service-side C2D (`messages/devicebound` senders, the feedback and file-notification
//! receivers).
//!
//! A reader task turns bytes into frames (size checked before reading a body) and hands them
//! over a channel, so the connection loop can wait on frames, events and timers at once
//! without cancelling a half-read frame. Each partition receiver has a pump task that takes
//! events from the hub's stream only while the link has credit; the loop assigns delivery
//! ids and writes the transfers, within the session's window. The feedback receiver has a
//! pump of the same kind over the feedback queue. A C2D send runs as its own task (so one
//! connection's sends share commits), after the previous send to the same identity on the
//! link, and its outcome comes back to the loop as the delivery's disposition.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrohub_amqp::frame::{self, FrameKind, AMQP_HEADER, SASL_HEADER, TRANSFER_OVERHEAD};
use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::performative::{
    accepted, rejected, AmqpError, Attach, Begin, Close, Detach, Disposition, End, Flow, Open,
    SaslMechanisms, SaslOutcome, Source, Transfer,
};
use ferrohub_amqp::{Message, Performative, SaslFrame, Value};
use ferrohub_hub::events::{EventQuery, EventStart, EventStream, PartitionInfo};
use ferrohub_hub::feedback::Settle;
use ferrohub_hub::readers::{ReaderLease, ReaderRefusal};
use ferrohub_hub::service_auth::{Claim, Right};
use ferrohub_hub::Hub;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::telemetry::EventRecord;
use ferrohub_store::FeedbackBatch;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::c2d;
use super::eventhub::{self, Node};
use super::{condition_of, AmqpFrontEnd};

/// A write the peer does not take within this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Credit we give a client's sender on `$cbs` and `$management`, topped up as it is used.
const REQUEST_CREDIT: u32 = 100;
/// Largest request message (tokens, READs) we assemble.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest message we send: telemetry is at most 256 KB plus its annotations.
const MAX_MESSAGE_BYTES: u64 = 1024 * 1024;
/// Our session windows (in transfer frames).
const WINDOW: u32 = 5_000;
/// Events queued from all pumps towards the connection loop.
const EVENT_QUEUE: usize = 64;
/// Deliveries the loop takes from the pumps before it writes: one write (one TLS record
/// batch, one system call) for all of them instead of one each.
const EVENT_BATCH: usize = 64;
/// Bytes of transfers gathered before they are written.
const WRITE_BATCH: usize = 256 * 1024;
/// Events held for sessions whose window is shut, per connection.
const MAX_WAITING: usize = 256;
/// Links per session we accept.
const HANDLE_MAX: u32 = 255;
/// C2D messages a back end's sender may have unsettled on one link (credit plus sends in
/// progress), which bounds what one link holds in memory.
const C2D_CREDIT: u32 = 100;
/// Largest C2D message we assemble: the hub allows 64 KB of body and properties, and the
/// AMQP sections around them add a little. A larger one is rejected, the link stays.
const C2D_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// How often an idle feedback receiver looks at the queue even without a change: records a
/// REST receiver locked and never settled come back when their lock lapses, unannounced.
const FEEDBACK_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] frame::FrameError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    #[error("closed by the peer")]
    Closed,
}

fn protocol(what: impl Into<String>) -> ConnError {
    ConnError::Protocol(what.into())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<frame::Frame, ConnError> {
    read_frame_skipping(r, max, None).await
}

/// Reads the next frame; while `needed` says no feedback receiver was ever attached,
/// dispositions are read and dropped undecoded. Event Hubs consumers settle every event with
/// a disposition of its own, and only feedback deliveries need one: decoding them cost a
/// quarter of the CPU of a read. The flag is read once the frame is in: a disposition that
/// settles feedback was sent after the feedback, which went out after the flag was set.
async fn read_frame_skipping<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    needed: Option<&std::sync::atomic::AtomicBool>,
) -> Result<frame::Frame, ConnError> {
    loop {
        let mut head = [0u8; 8];
        r.read_exact(&mut head).await?;
        let size = frame::frame_size(&head, max)? as usize;
        let mut buf = vec![0u8; size];
        buf[..8].copy_from_slice(&head);
        r.read_exact(&mut buf[8..]).await?;
        let skip = needed.is_some_and(|n| !n.load(std::sync::atomic::Ordering::Acquire));
        if skip && is_disposition(&buf) {
            continue;
        }
        return Ok(frame::decode(&buf)?);
    }
}

/// Whether a whole AMQP frame holds a disposition: the body (at the data offset) starts
/// with the descriptor 0x15 as a smallulong, as clients write it. Other encodings of the
/// descriptor are simply decoded.
fn is_disposition(frame: &[u8]) -> bool {
    let doff = usize::from(frame.get(4).copied().unwrap_or(0)) * 4;
    frame.get(5) == Some(&0) && frame.get(doff..doff + 3) == Some(&[0x00, 0x53, 0x15][..])
}

/// Serves one connection (TLS already done) until it closes.
pub async fn serve<S>(
    fe: AmqpFrontEnd,
    stream: S,
    peer: std::net::SocketAddr,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut conn = Conn::new(fe, w, peer);
    let mut reader = BufReader::new(r);
    let opened = tokio::time::timeout(conn.fe.open_timeout, conn.handshake(&mut reader)).await;
    let open = match opened {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => {
            debug!(peer = %peer, error = %e, "AMQP connection refused before Open");
            return;
        }
        Err(_) => {
            info!(peer = %peer, "AMQP connection closed: no Open in time");
            return;
        }
    };
    let (frames_tx, frames_rx) = mpsc::channel(16);
    let max = conn.fe.max_frame_size;
    let feedback_attached = conn.feedback_attached.clone();
    let reader_task = tokio::spawn(async move {
        loop {
            let f = read_frame_skipping(&mut reader, max, Some(&feedback_attached)).await;
            let failed = f.is_err();
            if frames_tx.send(f).await.is_err() || failed {
                break;
            }
        }
    });
    let result = conn.run(open, frames_rx, shutdown).await;
    reader_task.abort();
    conn.stop_pumps();
    match result {
        Ok(()) | Err(ConnError::Closed) => debug!(peer = %peer, "AMQP connection closed"),
        Err(e) => info!(peer = %peer, error = %e, "AMQP connection ended"),
    }
}

/// What a pump hands the connection loop.
enum Outgoing {
    /// An event, with the partition's newest event when the receiver asked for runtime
    /// metrics (`com.microsoft:enable-receiver-runtime-metric`).
    Event(EventRecord, Option<PartitionInfo>),
    /// A feedback batch, locked for this link until it is settled.
    Feedback(FeedbackBatch),
    /// The pump answered a drain: whatever it had is queued ahead of this, and the rest of
    /// the link's credit is given up.
    Drained,
}

/// What the loop tells a pump: the credit limit (delivery-count plus credit, serial) and how
/// many drain requests the link has had.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Grant {
    limit: u32,
    drains: u64,
}

/// Asks Event Hubs receivers may make at attach for the partition's newest event with every
/// delivery (delivery annotations); we offer it back.
const RUNTIME_METRIC: &str = "com.microsoft:enable-receiver-runtime-metric";

/// How old the partition's newest-event figures may be when sent with an event.
const METRIC_REFRESH: Duration = Duration::from_millis(250);

/// A C2D send's result, back from its task: (channel, handle, delivery id, whether the client
/// sent it settled, the outcome).
type C2dOutcome = (u16, u32, u32, bool, Result<(), AmqpError>);

/// What a link is for.
enum LinkKind {
    /// The client sends requests to `$cbs` or `$management`; we receive.
    Requests {
        node: Node,
        credit: u32,
        delivery_count: u32,
        partial: Vec<u8>,
        delivery: Option<(u32, bool)>,
    },
    /// We send replies from `$cbs` or `$management`.
    Replies {
        node: Node,
        credit: Credit,
        queue: VecDeque<Message>,
    },
    /// We send a partition's events.
    Events {
        credit: Credit,
        limit: watch::Sender<Grant>,
        pump: tokio::task::JoinHandle<()>,
        settled: bool,
    },
    /// The client sends C2D messages to `messages/devicebound`; we receive.
    DeviceBound {
        credit: u32,
        delivery_count: u32,
        partial: Vec<u8>,
        /// The delivery being assembled went past [`C2D_MAX_MESSAGE_BYTES`]: its bytes are
        /// dropped as they come and it is rejected once complete.
        oversize: bool,
        delivery: Option<(u32, bool)>,
        /// Sends whose outcome has not come back.
        in_flight: u32,
        /// Per identity, a signal that the link's latest send to it finished; the next send
        /// to that identity waits for it, so one link's messages queue in the order sent.
        chains: HashMap<Identity, oneshot::Receiver<()>>,
    },
    /// We send feedback batches; each delivery holds its batch's lock token until settled.
    Feedback {
        credit: Credit,
        limit: watch::Sender<Grant>,
        pump: tokio::task::JoinHandle<()>,
        settled: bool,
        unsettled: HashMap<u32, String>,
    },
    /// A receiver that stays quiet: file upload notifications (no file upload yet).
    Quiet,
}

impl LinkKind {
    /// Whether the link needs a token granting ServiceConnect for as long as it is open.
    fn is_service(&self) -> bool {
        matches!(
            self,
            LinkKind::Events { .. }
                | LinkKind::DeviceBound { .. }
                | LinkKind::Feedback { .. }
                | LinkKind::Quiet
        )
    }

    /// Stops what the link runs and gives back what it holds: feedback it was handed and
    /// never settled is abandoned, so it is offered again at once.
    fn close(self, hub: &Arc<Hub>) {
        match self {
            LinkKind::Events { pump, .. } => pump.abort(),
            LinkKind::Feedback {
                pump, unsettled, ..
            } => {
                pump.abort();
                for token in unsettled.into_values() {
                    settle_feedback(hub, token, Settle::Abandon);
                }
            }
            _ => {}
        }
    }
}

/// Completes or abandons a feedback batch in the background: the connection loop does not
/// wait for the store, and a token whose lock lapsed meanwhile is only worth a debug line.
fn settle_feedback(hub: &Arc<Hub>, token: String, how: Settle) {
    let hub = hub.clone();
    tokio::spawn(async move {
        if let Err(e) = hub.feedback_settle(&token, how).await {
            debug!(token = %token, ?how, error = %e.message(), "AMQP feedback settlement failed");
        }
    });
}

/// Sender-side credit: we may send while `sent` is below `limit` (serial arithmetic).
#[derive(Default, Clone, Copy)]
struct Credit {
    sent: u32,
    limit: u32,
}

impl Credit {
    fn available(&self) -> u32 {
        let d = self.limit.wrapping_sub(self.sent);
        if d > u32::MAX / 2 {
            0
        } else {
            d
        }
    }
}

struct Session {
    local: u16,
    next_outgoing_id: u32,
    next_delivery_id: u32,
    /// How many more transfer frames the peer takes from us.
    remote_incoming: u32,
    /// The transfer id the peer will use next.
    next_incoming_id: u32,
    links: HashMap<u32, LinkKind>,
    /// Deliveries whose transfer waits for the session window.
    waiting: VecDeque<(u32, Outgoing)>,
}

struct Conn<W> {
    fe: AmqpFrontEnd,
    w: WriteHalf<W>,
    peer: std::net::SocketAddr,
    /// The peer's max frame size.
    peer_max_frame: u32,
    claims: Vec<Claim>,
    /// The host name the client opened the connection for (Open's hostname).
    host: String,
    sessions: HashMap<u16, Session>,
    /// From the pumps: a delivery for (channel, handle), or None when the link was stolen.
    events_tx: mpsc::Sender<(u16, u32, Option<Outgoing>)>,
    events_rx: mpsc::Receiver<(u16, u32, Option<Outgoing>)>,
    /// Set once a feedback receiver attaches: until then the reader drops dispositions
    /// (nothing we send needs one).
    feedback_attached: Arc<std::sync::atomic::AtomicBool>,
    /// From the C2D send tasks.
    outcomes_tx: mpsc::Sender<C2dOutcome>,
    outcomes_rx: mpsc::Receiver<C2dOutcome>,
}

impl<W: AsyncRead + AsyncWrite + Send + 'static> Conn<W> {
    fn new(fe: AmqpFrontEnd, w: WriteHalf<W>, peer: std::net::SocketAddr) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (outcomes_tx, outcomes_rx) = mpsc::channel(C2D_CREDIT as usize);
        Conn {
            fe,
            w,
            peer,
            peer_max_frame: frame::MIN_MAX_FRAME_SIZE,
            claims: Vec::new(),
            host: String::new(),
            sessions: HashMap::new(),
            events_tx,
            events_rx,
            feedback_attached: Arc::default(),
            outcomes_tx,
            outcomes_rx,
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        // Flushed every time: a WebSocket only sends a message when flushed, and TLS
        // records should not wait either.
        let w = &mut self.w;
        let write = async move {
            w.write_all(bytes).await?;
            w.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ConnError::Timeout),
        }
    }

    async fn send(&mut self, channel: u16, p: Performative) -> Result<(), ConnError> {
        let bytes = frame::encode(FrameKind::Amqp, channel, Some(&p.to_value()), &[]);
        self.write(&bytes).await
    }

    /// Protocol header, optional SASL, AMQP header, and the client's Open.
    async fn handshake(&mut self, r: &mut BufReader<ReadHalf<W>>) -> Result<Open, ConnError> {
        let mut header = [0u8; 8];
        r.read_exact(&mut header).await?;
        if header == SASL_HEADER {
            self.write(&SASL_HEADER).await?;
            self.sasl(r).await?;
            r.read_exact(&mut header).await?;
        }
        if header != AMQP_HEADER {
            // Say what we speak, then hang up (part 2.2).
            let _ = self.write(&SASL_HEADER).await;
            return Err(protocol(format!(
                "unsupported protocol header {header:02x?}"
            )));
        }
        self.write(&AMQP_HEADER).await?;
        let f = read_frame(r, self.fe.max_frame_size).await?;
        match f.body.as_ref().map(Performative::decode) {
            Some(Ok(Performative::Open(open))) if f.kind == FrameKind::Amqp => Ok(open),
            _ => Err(protocol("the first frame is not Open")),
        }
    }

    async fn sasl(&mut self, r: &mut BufReader<ReadHalf<W>>) -> Result<(), ConnError> {
        let mechanisms = SaslMechanisms {
            mechanisms: Value::Array(
                ["MSSBCBS", "ANONYMOUS", "PLAIN"]
                    .iter()
                    .map(|m| Value::sym(*m))
                    .collect(),
            ),
        };
        let bytes = frame::encode(FrameKind::Sasl, 0, Some(&mechanisms.to_value()), &[]);
        self.write(&bytes).await?;
        let f = read_frame(r, self.fe.max_frame_size).await?;
        let init = match f.body.as_ref().map(SaslFrame::decode) {
            Some(Ok(SaslFrame::Init(i))) => i,
            _ => return Err(protocol("expected sasl-init")),
        };
        let code = match init.mechanism.0.as_str() {
            "ANONYMOUS" | "MSSBCBS" => 0,
            "PLAIN" => {
                // authzid NUL authcid NUL password; the password is a SAS token.
                let response = init.initial_response.unwrap_or_default();
                let password = response.split(|b| *b == 0).nth(2).unwrap_or_default();
                let token = String::from_utf8_lossy(password).into_owned();
                match self.fe.hub.authorize_claim(&token, &self.fe.entity).await {
                    Ok(claim) => {
                        self.claims.push(claim);
                        0
                    }
                    Err(e) => {
                        info!(peer = %self.peer, reason = %e.message(), "AMQP SASL PLAIN refused");
                        1
                    }
                }
            }
            other => {
                info!(peer = %self.peer, mechanism = other, "AMQP SASL mechanism refused");
                1
            }
        };
        let outcome = SaslOutcome {
            code,
            additional_data: None,
        };
        let bytes = frame::encode(FrameKind::Sasl, 0, Some(&outcome.to_value()), &[]);
        self.write(&bytes).await?;
        if code != 0 {
            return Err(protocol("SASL authentication failed"));
        }
        Ok(())
    }

    async fn run(
        &mut self,
        open: Open,
        mut frames: mpsc::Receiver<Result<frame::Frame, ConnError>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        self.host = open
            .hostname
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| self.fe.default_host.clone());
        self.peer_max_frame = open
            .max_frame_size
            .unwrap_or(u32::MAX)
            .max(frame::MIN_MAX_FRAME_SIZE);
        let reply = Open {
            container_id: "ferrohub".into(),
            hostname: None,
            max_frame_size: Some(self.fe.max_frame_size),
            channel_max: Some(open.channel_max.unwrap_or(u16::MAX).min(255)),
            idle_time_out: None,
            ..Default::default()
        };
        self.send(0, Performative::Open(reply)).await?;
        // The peer asks for traffic at least this often; half leaves room for latency.
        let heartbeat = open
            .idle_time_out
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms) / 2).max(Duration::from_millis(100)));
        let mut next_beat = heartbeat.map(|h| Instant::now() + h);
        loop {
            let beat_at = next_beat.map(tokio::time::Instant::from_std);
            let expiry = self.service_links_expire_at();
            tokio::select! {
                f = frames.recv() => {
                    let f = f.ok_or(ConnError::Closed)??;
                    if self.on_frame(f).await? {
                        return Ok(());
                    }
                }
                // Events wait here only while a session's window is shut; past a bound the
                // pumps block instead, whatever credit the client gave.
                Some(first) = self.events_rx.recv(), if self.waiting() < MAX_WAITING => {
                    self.on_events(first).await?;
                }
                Some(outcome) = self.outcomes_rx.recv() => self.on_c2d_outcome(outcome).await?,
                _ = async { match beat_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    self.write(&frame::encode(FrameKind::Amqp, 0, None, &[])).await?;
                    next_beat = heartbeat.map(|h| Instant::now() + h);
                }
                _ = async { match expiry { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    self.expire_service_links().await?;
                }
                _ = ferrohub_broker::until_shutdown(&mut shutdown) => {
                    let close = Close { error: Some(AmqpError::new("amqp:connection:forced", "the hub is shutting down")) };
                    let _ = self.send(0, Performative::Close(close)).await;
                    return Ok(());
                }
            }
        }
    }

    fn has_service_links(&self) -> bool {
        self.sessions
            .values()
            .any(|s| s.links.values().any(LinkKind::is_service))
    }

    /// When the last claim that keeps the service links (partition receivers, C2D senders,
    /// feedback) open lapses (None: no such links). A put-token with a later expiry moves it.
    fn service_links_expire_at(&self) -> Option<tokio::time::Instant> {
        if !self.has_service_links() {
            return None;
        }
        let now = now_secs();
        let until = self
            .claims
            .iter()
            .filter(|c| c.grants(Right::ServiceConnect, now))
            .map(|c| c.expiry)
            .max()
            .unwrap_or(now);
        let left = Duration::from_secs(until.saturating_sub(now));
        Some(tokio::time::Instant::now() + left)
    }

    /// Detaches every service link once no claim grants it any more, as Event Hubs and IoT
    /// Hub do when a link's token expires without a renewal.
    async fn expire_service_links(&mut self) -> Result<(), ConnError> {
        if self.authorized(Right::ServiceConnect) {
            return Ok(());
        }
        let mut expired = Vec::new();
        for (ch, s) in self.sessions.iter_mut() {
            let handles: Vec<u32> = s
                .links
                .iter()
                .filter(|(_, l)| l.is_service())
                .map(|(h, _)| *h)
                .collect();
            for h in handles {
                if let Some(link) = s.links.remove(&h) {
                    link.close(&self.fe.hub);
                }
                expired.push((*ch, s.local, h));
            }
        }
        for (_, local, handle) in expired {
            info!(peer = %self.peer, handle, "AMQP link detached: its token expired");
            let error = AmqpError::new(
                "amqp:unauthorized-access",
                "the token for this link expired; put a new one on $cbs",
            );
            let detach = Detach {
                handle,
                closed: Some(true),
                error: Some(error),
            };
            self.send(local, Performative::Detach(detach)).await?;
        }
        Ok(())
    }

    fn waiting(&self) -> usize {
        self.sessions.values().map(|s| s.waiting.len()).sum()
    }

    /// The connection is over: every link closes, and feedback still on its way to the
    /// client (waiting for the window, or queued from a pump) is abandoned.
    fn stop_pumps(&mut self) {
        let hub = self.fe.hub.clone();
        for (_, mut s) in self.sessions.drain() {
            for (_, l) in s.links.drain() {
                l.close(&hub);
            }
            for (_, out) in s.waiting.drain(..) {
                if let Outgoing::Feedback(b) = out {
                    settle_feedback(&hub, b.lock_token, Settle::Abandon);
                }
            }
        }
        self.events_rx.close();
        while let Ok((_, _, out)) = self.events_rx.try_recv() {
            if let Some(Outgoing::Feedback(b)) = out {
                settle_feedback(&hub, b.lock_token, Settle::Abandon);
            }
        }
    }

    /// Handles one frame; true once the connection is closed.
    async fn on_frame(&mut self, f: frame::Frame) -> Result<bool, ConnError> {
        let Some(body) = f.body else {
            return Ok(false); // heartbeat
        };
        if f.kind != FrameKind::Amqp {
            return Err(protocol("SASL frame after SASL"));
        }
        let p =
            Performative::decode(&body).map_err(|e| protocol(format!("bad performative: {e}")))?;
        let ch = f.channel;
        match p {
            Performative::Open(_) => return Err(protocol("second Open")),
            Performative::Close(_) => {
                self.send(0, Performative::Close(Close { error: None }))
                    .await?;
                return Ok(true);
            }
            Performative::Begin(b) => self.on_begin(ch, b).await?,
            Performative::End(_) => {
                if let Some(mut s) = self.sessions.remove(&ch) {
                    for (_, l) in s.links.drain() {
                        l.close(&self.fe.hub);
                    }
                    for (_, out) in s.waiting.drain(..) {
                        if let Outgoing::Feedback(b) = out {
                            settle_feedback(&self.fe.hub, b.lock_token, Settle::Abandon);
                        }
                    }
                    self.send(s.local, Performative::End(End { error: None }))
                        .await?;
                }
            }
            Performative::Attach(a) => self.on_attach(ch, a).await?,
            Performative::Detach(d) => {
                let session = self.session(ch)?;
                let local = session.local;
                if let Some(link) = session.links.remove(&d.handle) {
                    link.close(&self.fe.hub);
                }
                let reply = Detach {
                    handle: d.handle,
                    closed: Some(true),
                    error: None,
                };
                self.send(local, Performative::Detach(reply)).await?;
            }
            Performative::Flow(fl) => self.on_flow(ch, fl).await?,
            Performative::Transfer(t) => self.on_transfer(ch, t, f.payload).await?,
            Performative::Disposition(d) => self.on_disposition(ch, d).await?,
        }
        Ok(false)
    }

    fn session(&mut self, ch: u16) -> Result<&mut Session, ConnError> {
        self.sessions
            .get_mut(&ch)
            .ok_or_else(|| protocol(format!("no session on channel {ch}")))
    }

    async fn on_begin(&mut self, ch: u16, b: Begin) -> Result<(), ConnError> {
        if self.sessions.contains_key(&ch) {
            return Err(protocol("Begin on a channel already in use"));
        }
        self.sessions.insert(
            ch,
            Session {
                local: ch,
                next_outgoing_id: 0,
                next_delivery_id: 0,
                remote_incoming: b.incoming_window,
                next_incoming_id: b.next_outgoing_id,
                links: HashMap::new(),
                waiting: VecDeque::new(),
            },
        );
        let reply = Begin {
            remote_channel: Some(ch),
            next_outgoing_id: 0,
            incoming_window: WINDOW,
            outgoing_window: WINDOW,
            handle_max: Some(HANDLE_MAX),
            ..Default::default()
        };
        self.send(ch, Performative::Begin(reply)).await
    }

    /// Our Attach answering `a`: the same name, handle and terminus, the other role.
    fn attach_reply(a: &Attach, as_sender: bool) -> Attach {
        Attach {
            name: a.name.clone(),
            handle: a.handle,
            role: !as_sender,
            snd_settle_mode: a.snd_settle_mode.or(Some(2)),
            rcv_settle_mode: a.rcv_settle_mode.or(Some(0)),
            source: a.source.clone(),
            target: a.target.clone(),
            unsettled: Value::Null,
            incomplete_unsettled: Some(false),
            initial_delivery_count: if as_sender { Some(0) } else { None },
            max_message_size: Some(if as_sender {
                MAX_MESSAGE_BYTES
            } else {
                MAX_REQUEST_BYTES as u64
            }),
            offered_capabilities: Value::Null,
            desired_capabilities: Value::Null,
            properties: Value::Null,
        }
    }

    async fn refuse_attach(
        &mut self,
        ch: u16,
        a: &Attach,
        condition: &str,
        why: String,
    ) -> Result<(), ConnError> {
        info!(peer = %self.peer, link = %a.name, condition, reason = %why, "AMQP link refused");
        // The terminus is echoed rather than nulled (part 2.6.3 allows either): pyamqp
        // <= 5.15.1 drops a link with a null terminus without reading the detach's error,
        // and the error is what tells the user why.
        self.send(ch, Performative::Attach(Self::attach_reply(a, a.role)))
            .await?;
        let detach = Detach {
            handle: a.handle,
            closed: Some(true),
            error: Some(AmqpError::new(condition, why)),
        };
        self.send(ch, Performative::Detach(detach)).await
    }

    fn authorized(&self, need: Right) -> bool {
        let now = now_secs();
        self.claims.iter().any(|c| c.grants(need, now))
    }

    async fn on_attach(&mut self, ch: u16, a: Attach) -> Result<(), ConnError> {
        let local = self.session(ch)?.local;
        if a.handle > HANDLE_MAX || self.session(ch)?.links.contains_key(&a.handle) {
            return Err(protocol("attach handle out of range or in use"));
        }
        // role true: the client receives, so we send from the source it names.
        let client_receives = a.role;
        let terminus = if client_receives {
            &a.source
        } else {
            &a.target
        };
        let address = match terminus {
            Value::Described(d, list) if matches!(d.as_u64(), Some(0x28) | Some(0x29)) => {
                match list.as_ref() {
                    Value::List(f) => f.first().and_then(Value::as_str).map(str::to_owned),
                    _ => None,
                }
            }
            _ => None,
        }
        .unwrap_or_default();
        let node = eventhub::node(&address, &self.fe.entity);
        match (node, client_receives) {
            (n @ (Node::Cbs | Node::Management), false) => {
                let count = a.initial_delivery_count.unwrap_or(0);
                self.send(local, Performative::Attach(Self::attach_reply(&a, false)))
                    .await?;
                self.session(ch)?.links.insert(
                    a.handle,
                    LinkKind::Requests {
                        node: n,
                        credit: REQUEST_CREDIT,
                        delivery_count: count,
                        partial: Vec::new(),
                        delivery: None,
                    },
                );
                self.grant(ch, a.handle, count, REQUEST_CREDIT).await
            }
            (n @ (Node::Cbs | Node::Management), true) => {
                self.send(local, Performative::Attach(Self::attach_reply(&a, true)))
                    .await?;
                self.session(ch)?.links.insert(
                    a.handle,
                    LinkKind::Replies {
                        node: n,
                        credit: Credit::default(),
                        queue: VecDeque::new(),
                    },
                );
                Ok(())
            }
            (Node::Partition(addr), true) => {
                if !self.authorized(Right::ServiceConnect) {
                    return self.refuse_attach(ch, &a, "amqp:unauthorized-access", format!(
                        "no valid token with ServiceConnect for {address}: put a token on $cbs first")).await;
                }
                let filter = Source::from_value(&a.source)
                    .map(|s| s.filter)
                    .unwrap_or_default();
                let expr = eventhub::selector(&filter);
                let start = match eventhub::start_position(expr.as_deref()) {
                    Ok(s) => s,
                    Err(why) => return self.refuse_attach(ch, &a, "amqp:invalid-field", why).await,
                };
                let query = EventQuery {
                    consumer_group: Some(addr.consumer_group.clone()),
                    start: EventStart::Position(start),
                    partition: Some(addr.partition),
                    device_id: None,
                    module_id: None,
                    endpoint: None,
                    track_checkpoint: false,
                };
                let epoch = a
                    .properties
                    .get("com.microsoft:epoch")
                    .and_then(Value::as_i64);
                let lease =
                    match self
                        .fe
                        .hub
                        .admit_reader(&addr.consumer_group, addr.partition, epoch)
                    {
                        Ok(l) => l,
                        Err(e) => {
                            let condition = match e {
                                ReaderRefusal::TooManyReaders => "amqp:resource-limit-exceeded",
                                ReaderRefusal::LowerEpoch { .. } | ReaderRefusal::EpochHeld(_) => {
                                    "amqp:link:stolen"
                                }
                            };
                            return self.refuse_attach(ch, &a, condition, e.to_string()).await;
                        }
                    };
                let stream = match self.fe.hub.open_events(query).await {
                    Ok(s) => s,
                    Err(e) => {
                        let condition = if addr.partition >= self.fe.hub.event_partitions() {
                            "amqp:not-found"
                        } else {
                            condition_of(&e)
                        };
                        return self
                            .refuse_attach(ch, &a, condition, e.message().to_owned())
                            .await;
                    }
                };
                let metric = wants(&a.desired_capabilities, RUNTIME_METRIC);
                let mut reply = Self::attach_reply(&a, true);
                if metric {
                    reply.offered_capabilities = Value::Array(vec![Value::sym(RUNTIME_METRIC)]);
                }
                self.send(local, Performative::Attach(reply)).await?;
                let (limit_tx, limit_rx) = watch::channel(Grant::default());
                let pump = tokio::spawn(pump(
                    stream,
                    limit_rx,
                    self.events_tx.clone(),
                    (ch, a.handle),
                    lease,
                    metric.then(|| (self.fe.hub.clone(), addr.partition)),
                ));
                debug!(peer = %self.peer, address = %address, ?start, "AMQP partition receiver attached");
                self.session(ch)?.links.insert(
                    a.handle,
                    LinkKind::Events {
                        credit: Credit::default(),
                        limit: limit_tx,
                        pump,
                        settled: a.snd_settle_mode == Some(1),
                    },
                );
                Ok(())
            }
            (Node::DeviceBound, false) => {
                if !self.authorized(Right::ServiceConnect) {
                    return self.refuse_attach(ch, &a, "amqp:unauthorized-access", format!(
                        "no valid token with ServiceConnect for {address}: put a token on $cbs first")).await;
                }
                let count = a.initial_delivery_count.unwrap_or(0);
                let mut reply = Self::attach_reply(&a, false);
                reply.max_message_size = Some(C2D_MAX_MESSAGE_BYTES as u64);
                self.send(local, Performative::Attach(reply)).await?;
                self.session(ch)?.links.insert(
                    a.handle,
                    LinkKind::DeviceBound {
                        credit: C2D_CREDIT,
                        delivery_count: count,
                        partial: Vec::new(),
                        oversize: false,
                        delivery: None,
                        in_flight: 0,
                        chains: HashMap::new(),
                    },
                );
                debug!(peer = %self.peer, address = %address, "AMQP C2D sender attached");
                self.grant(ch, a.handle, count, C2D_CREDIT).await
            }
            (n @ (Node::Feedback | Node::FileNotifications), true) => {
                if !self.authorized(Right::ServiceConnect) {
                    return self.refuse_attach(ch, &a, "amqp:unauthorized-access", format!(
                        "no valid token with ServiceConnect for {address}: put a token on $cbs first")).await;
                }
                self.send(local, Performative::Attach(Self::attach_reply(&a, true)))
                    .await?;
                let link = if n == Node::Feedback {
                    self.feedback_attached
                        .store(true, std::sync::atomic::Ordering::Release);
                    let (limit_tx, limit_rx) = watch::channel(Grant::default());
                    let pump = tokio::spawn(feedback_pump(
                        self.fe.hub.clone(),
                        limit_rx,
                        self.events_tx.clone(),
                        ch,
                        a.handle,
                    ));
                    LinkKind::Feedback {
                        credit: Credit::default(),
                        limit: limit_tx,
                        pump,
                        settled: a.snd_settle_mode == Some(1),
                        unsettled: HashMap::new(),
                    }
                } else {
                    LinkKind::Quiet
                };
                debug!(peer = %self.peer, address = %address, "AMQP service receiver attached");
                self.session(ch)?.links.insert(a.handle, link);
                Ok(())
            }
            (Node::IotHubEvents(rest), _) => {
                if !self.authorized(Right::ServiceConnect) {
                    return self
                        .refuse_attach(
                            ch,
                            &a,
                            "amqp:unauthorized-access",
                            format!("no valid token with ServiceConnect for {address}"),
                        )
                        .await;
                }
                // Tools given the IoT Hub connection string look for the Event Hubs endpoint
                // this way; they read the entity from the address (`:PORT/ENTITY/...`).
                let host = self.host.split(':').next().unwrap_or_default().to_owned();
                let target =
                    eventhub::redirect_address(&host, self.fe.port, &self.fe.entity, &rest);
                let info = Value::Map(vec![
                    (Value::sym("hostname"), Value::str(host.clone())),
                    (Value::sym("network-host"), Value::str(host.clone())),
                    (Value::sym("port"), Value::Int(i32::from(self.fe.port))),
                    (Value::sym("address"), Value::str(target.clone())),
                    (Value::sym("scheme"), Value::str("amqps")),
                    (
                        Value::sym("path"),
                        Value::str(format!("{}{rest}", self.fe.entity)),
                    ),
                ]);
                debug!(peer = %self.peer, from = %address, to = %target, "AMQP link redirected");
                self.send(
                    local,
                    Performative::Attach(Self::attach_reply(&a, client_receives)),
                )
                .await?;
                let mut error = AmqpError::new(
                    "amqp:link:redirect",
                    format!("the Event Hubs-compatible endpoint is {target}"),
                );
                error.info = info;
                let detach = Detach {
                    handle: a.handle,
                    closed: Some(true),
                    error: Some(error),
                };
                self.send(local, Performative::Detach(detach)).await
            }
            (_, _) => {
                self.refuse_attach(ch, &a, "amqp:not-found", format!("no node at {address:?}"))
                    .await
            }
        }
    }

    /// A link Flow from us, giving a client's sender `credit`.
    async fn grant(
        &mut self,
        ch: u16,
        handle: u32,
        delivery_count: u32,
        credit: u32,
    ) -> Result<(), ConnError> {
        self.link_flow(ch, handle, delivery_count, credit, false)
            .await
    }

    /// A link Flow from us with the link's delivery-count and credit, and drain as given.
    async fn link_flow(
        &mut self,
        ch: u16,
        handle: u32,
        delivery_count: u32,
        credit: u32,
        drain: bool,
    ) -> Result<(), ConnError> {
        let s = self.session(ch)?;
        let flow = Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: WINDOW,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: WINDOW,
            handle: Some(handle),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            available: Some(0),
            drain: Some(drain),
            echo: Some(false),
            properties: Value::Null,
        };
        let local = s.local;
        self.send(local, Performative::Flow(flow)).await
    }

    async fn on_flow(&mut self, ch: u16, fl: Flow) -> Result<(), ConnError> {
        let s = self.session(ch)?;
        // The peer's window, counted from the transfer id it expects next.
        let next_in = fl.next_incoming_id.unwrap_or(0);
        s.remote_incoming = next_in
            .wrapping_add(fl.incoming_window)
            .wrapping_sub(s.next_outgoing_id);
        if let Some(handle) = fl.handle {
            match s.links.get_mut(&handle) {
                Some(LinkKind::Events { credit, limit, .. })
                | Some(LinkKind::Feedback { credit, limit, .. }) => {
                    credit.limit = fl
                        .delivery_count
                        .unwrap_or(0)
                        .wrapping_add(fl.link_credit.unwrap_or(0));
                    let drain = fl.drain == Some(true);
                    limit.send_modify(|g| {
                        g.limit = credit.limit;
                        g.drains += u64::from(drain);
                    });
                }
                Some(LinkKind::Replies { credit, .. }) => {
                    credit.limit = fl
                        .delivery_count
                        .unwrap_or(0)
                        .wrapping_add(fl.link_credit.unwrap_or(0));
                    self.flush_replies(ch, handle).await?;
                }
                _ => {}
            }
        }
        self.flush_waiting(ch).await
    }

    async fn on_transfer(
        &mut self,
        ch: u16,
        t: Transfer,
        payload: Vec<u8>,
    ) -> Result<(), ConnError> {
        let s = self.session(ch)?;
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        if matches!(s.links.get(&t.handle), Some(LinkKind::DeviceBound { .. })) {
            return self.on_c2d_transfer(ch, t, payload).await;
        }
        let s = self.session(ch)?;
        let Some(LinkKind::Requests {
            node,
            credit,
            delivery_count,
            partial,
            delivery,
        }) = s.links.get_mut(&t.handle)
        else {
            return Err(protocol("transfer on a link that does not take them"));
        };
        if delivery.is_none() {
            if *credit == 0 {
                return Err(protocol("transfer beyond credit"));
            }
            *credit -= 1;
            *delivery_count = delivery_count.wrapping_add(1);
            *delivery = Some((t.delivery_id.unwrap_or(0), t.settled.unwrap_or(false)));
        }
        if partial.len() + payload.len() > MAX_REQUEST_BYTES {
            return Err(protocol("request message too large"));
        }
        partial.extend_from_slice(&payload);
        if t.more.unwrap_or(false) {
            return Ok(());
        }
        let node = node.clone();
        let bytes = std::mem::take(partial);
        let (delivery_id, settled) = delivery.take().unwrap_or((0, true));
        let (count, left) = (*delivery_count, *credit);
        let local = s.local;
        if !settled {
            let d = Disposition {
                role: true,
                first: delivery_id,
                last: Some(delivery_id),
                settled: Some(true),
                state: accepted(),
                batchable: Some(false),
            };
            self.send(local, Performative::Disposition(d)).await?;
        }
        if left < REQUEST_CREDIT / 2 {
            if let Some(LinkKind::Requests { credit, .. }) =
                self.session(ch)?.links.get_mut(&t.handle)
            {
                *credit = REQUEST_CREDIT;
            }
            self.grant(ch, t.handle, count, REQUEST_CREDIT).await?;
        }
        let request = match Message::decode(&bytes) {
            Ok(m) => m,
            Err(e) => return Err(protocol(format!("undecodable request message: {e}"))),
        };
        let reply = match node {
            Node::Cbs => self.cbs(&request).await,
            _ => self.management(&request).await,
        };
        self.queue_reply(ch, &node, reply).await
    }

    /// A frame of a C2D message from a back end. Once the message is whole, a malformed one
    /// is rejected at once; a well-formed one is sent by a task of its own, and its outcome
    /// comes back through [`Self::on_c2d_outcome`].
    async fn on_c2d_transfer(
        &mut self,
        ch: u16,
        t: Transfer,
        payload: Vec<u8>,
    ) -> Result<(), ConnError> {
        let handle = t.handle;
        let s = self.session(ch)?;
        let Some(LinkKind::DeviceBound {
            credit,
            delivery_count,
            partial,
            oversize,
            delivery,
            in_flight,
            chains,
        }) = s.links.get_mut(&handle)
        else {
            return Err(protocol("transfer on a link that does not take them"));
        };
        if delivery.is_none() {
            if *credit == 0 {
                return Err(protocol("transfer beyond credit"));
            }
            *credit -= 1;
            *delivery_count = delivery_count.wrapping_add(1);
            *delivery = Some((t.delivery_id.unwrap_or(0), t.settled.unwrap_or(false)));
        }
        if t.aborted == Some(true) {
            // The sender gave up on this delivery (part 2.6.14): nothing to settle.
            partial.clear();
            *oversize = false;
            *delivery = None;
            return Ok(());
        }
        if !*oversize {
            if partial.len() + payload.len() > C2D_MAX_MESSAGE_BYTES {
                *oversize = true;
                *partial = Vec::new();
            } else {
                partial.extend_from_slice(&payload);
            }
        }
        if t.more.unwrap_or(false) {
            return Ok(());
        }
        let bytes = std::mem::take(partial);
        let too_large = std::mem::take(oversize);
        let (delivery_id, settled) = delivery.take().unwrap_or((0, true));
        let parsed = if too_large {
            Err(c2d::invalid(
                "amqp:link:message-size-exceeded",
                ErrorCode::MessageTooLarge,
                &format!("the message is over {C2D_MAX_MESSAGE_BYTES} bytes"),
            ))
        } else {
            Message::decode(&bytes)
                .map_err(|e| format!("undecodable message: {e}"))
                .and_then(|m| c2d::send_request(&m))
                .map_err(|why| c2d::invalid("amqp:invalid-field", ErrorCode::ArgumentInvalid, &why))
        };
        let (identity, req) = match parsed {
            Ok(p) => p,
            Err(error) => {
                info!(peer = %self.peer, reason = %error.description.as_deref().unwrap_or_default(), "AMQP C2D send rejected");
                let local = self.session(ch)?.local;
                if !settled {
                    self.send(
                        local,
                        Performative::Disposition(c2d_disposition(delivery_id, rejected(error))),
                    )
                    .await?;
                }
                return self.c2d_refill(ch, handle).await;
            }
        };
        *in_flight += 1;
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let previous = chains.insert(identity.clone(), done_rx);
        let hub = self.fe.hub.clone();
        let outcomes = self.outcomes_tx.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            if let Some(previous) = previous {
                // Err: that send's task is gone, which also means it is over.
                let _ = previous.await;
            }
            let outcome = match hub.c2d_send(&identity, req).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    info!(peer = %peer, identity = %identity, code = %e.code(), reason = %e.message(), "AMQP C2D send rejected");
                    Err(c2d::rejection(&e))
                }
            };
            drop(done_tx);
            let _ = outcomes
                .send((ch, handle, delivery_id, settled, outcome))
                .await;
        });
        Ok(())
    }

    /// A C2D send finished: the client learns it (Accepted only now that the message is on
    /// disk), and the link gets its credit back.
    async fn on_c2d_outcome(&mut self, outcome: C2dOutcome) -> Result<(), ConnError> {
        let (ch, handle, delivery_id, settled, result) = outcome;
        let Some(s) = self.sessions.get_mut(&ch) else {
            return Ok(()); // the session ended meanwhile
        };
        let local = s.local;
        let Some(LinkKind::DeviceBound {
            in_flight, chains, ..
        }) = s.links.get_mut(&handle)
        else {
            return Ok(()); // the link went meanwhile: nobody to tell
        };
        *in_flight = in_flight.saturating_sub(1);
        if *in_flight == 0 {
            chains.clear();
        }
        if !settled {
            let state = match result {
                Ok(()) => accepted(),
                Err(error) => rejected(error),
            };
            self.send(
                local,
                Performative::Disposition(c2d_disposition(delivery_id, state)),
            )
            .await?;
        }
        self.c2d_refill(ch, handle).await
    }

    /// Tops a C2D sender's credit back up once half of it is used and settled.
    async fn c2d_refill(&mut self, ch: u16, handle: u32) -> Result<(), ConnError> {
        let s = self.session(ch)?;
        let Some(LinkKind::DeviceBound {
            credit,
            delivery_count,
            in_flight,
            ..
        }) = s.links.get_mut(&handle)
        else {
            return Ok(());
        };
        if *credit + *in_flight >= C2D_CREDIT / 2 {
            return Ok(());
        }
        *credit = C2D_CREDIT.saturating_sub(*in_flight);
        let (count, grant) = (*delivery_count, *credit);
        self.grant(ch, handle, count, grant).await
    }

    /// The client settled deliveries of ours. Events need nothing (they stay in the log);
    /// feedback is completed when accepted (or rejected: it is not wanted again) and
    /// abandoned when released or modified, so it is offered again.
    async fn on_disposition(&mut self, ch: u16, d: Disposition) -> Result<(), ConnError> {
        if !d.role {
            return Ok(()); // a sender settling: not ours to act on
        }
        let how = match &d.state {
            Value::Described(code, _) => match code.as_u64() {
                Some(0x24) | Some(0x25) => Some(Settle::Complete),
                Some(0x26) | Some(0x27) => Some(Settle::Abandon),
                _ => None,
            },
            // Settled with no outcome: nothing says it was processed, so it comes back.
            _ if d.settled == Some(true) => Some(Settle::Abandon),
            _ => None,
        };
        let Some(how) = how else { return Ok(()) };
        let first = d.first;
        let span = d.last.unwrap_or(first).wrapping_sub(first);
        let hub = self.fe.hub.clone();
        let s = self.session(ch)?;
        let local = s.local;
        let mut settled_any = false;
        for l in s.links.values_mut() {
            if let LinkKind::Feedback { unsettled, .. } = l {
                let ids: Vec<u32> = unsettled
                    .keys()
                    .filter(|id| id.wrapping_sub(first) <= span)
                    .copied()
                    .collect();
                for id in ids {
                    if let Some(token) = unsettled.remove(&id) {
                        settle_feedback(&hub, token, how);
                        settled_any = true;
                    }
                }
            }
        }
        if settled_any && d.settled != Some(true) {
            // rcv-settle-mode second: the receiver waits for us to settle.
            let reply = Disposition {
                role: false,
                first,
                last: d.last,
                settled: Some(true),
                state: d.state.clone(),
                batchable: Some(false),
            };
            self.send(local, Performative::Disposition(reply)).await?;
        }
        Ok(())
    }

    /// A `$cbs` put-token: the token becomes one of the connection's claims.
    async fn cbs(&mut self, req: &Message) -> Message {
        let op = req
            .application_property("operation")
            .and_then(Value::as_str);
        let token = match &req.body {
            Body::Value(v) => v.as_str().map(str::to_owned),
            _ => None,
        };
        let (status, description) = match (op, token) {
            (Some("put-token"), Some(token)) => {
                match self.fe.hub.authorize_claim(&token, &self.fe.entity).await {
                    Ok(claim) => {
                        self.claims.retain(|c| c.expiry > now_secs());
                        // A connection renews its tokens; keep only a bounded few.
                        if self.claims.len() >= 16 {
                            self.claims.remove(0);
                        }
                        self.claims.push(claim);
                        (200, "OK".to_owned())
                    }
                    Err(e) => {
                        let audience = req
                            .application_property("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        info!(peer = %self.peer, audience, reason = %e.message(), "AMQP put-token refused");
                        (401, e.message().to_owned())
                    }
                }
            }
            _ => (400, "expected a put-token with a string token".to_owned()),
        };
        response(req, status, &description, Value::Null)
    }

    /// A `$management` READ of the event hub or a partition.
    async fn management(&mut self, req: &Message) -> Message {
        let prop = |k: &str| {
            req.application_property(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        if !self.authorized(Right::ServiceConnect) {
            let token = prop("security_token").unwrap_or_default();
            match self.fe.hub.authorize_claim(&token, &self.fe.entity).await {
                Ok(c) if c.grants(Right::ServiceConnect, now_secs()) => {}
                Ok(_) | Err(_) => {
                    info!(peer = %self.peer, "AMQP $management request refused: no valid token with ServiceConnect");
                    return response(req, 401, "Unauthorized", Value::Null);
                }
            }
        }
        if prop("operation").as_deref() != Some("READ") {
            return response(req, 400, "only READ is supported", Value::Null);
        }
        if !prop("name").is_some_and(|n| n.eq_ignore_ascii_case(&self.fe.entity)) {
            return response(req, 404, "no such event hub", Value::Null);
        }
        let hub = self.fe.hub.clone();
        match prop("type").as_deref() {
            Some("com.microsoft:eventhub") => {
                let body = eventhub::eventhub_properties(
                    &self.fe.entity,
                    hub.event_partitions(),
                    self.fe.created_ms,
                );
                response(req, 200, "OK", body)
            }
            Some("com.microsoft:partition") => {
                let Some(p) = prop("partition")
                    .and_then(|p| p.parse::<u32>().ok())
                    .filter(|p| *p < hub.event_partitions())
                else {
                    return response(req, 404, "no such partition", Value::Null);
                };
                match hub.partition_info(p).await {
                    Ok(info) => response(
                        req,
                        200,
                        "OK",
                        eventhub::partition_properties(&self.fe.entity, p, &info),
                    ),
                    Err(e) => response(req, 500, e.message(), Value::Null),
                }
            }
            _ => response(req, 400, "unknown type", Value::Null),
        }
    }

    async fn queue_reply(&mut self, ch: u16, node: &Node, reply: Message) -> Result<(), ConnError> {
        let s = self.session(ch)?;
        let handle = s.links.iter().find_map(|(h, l)| match l {
            LinkKind::Replies { node: n, .. } if n == node => Some(*h),
            _ => None,
        });
        let Some(handle) = handle else {
            debug!(peer = %self.peer, "AMQP reply dropped: no reply link attached");
            return Ok(());
        };
        if let Some(LinkKind::Replies { queue, .. }) = s.links.get_mut(&handle) {
            // Bounded: a client that asks without ever giving credit gets no more answers.
            if queue.len() < 64 {
                queue.push_back(reply);
            }
        }
        self.flush_replies(ch, handle).await
    }

    async fn flush_replies(&mut self, ch: u16, handle: u32) -> Result<(), ConnError> {
        loop {
            let s = self.session(ch)?;
            let window = s.remote_incoming;
            let Some(LinkKind::Replies { credit, queue, .. }) = s.links.get_mut(&handle) else {
                return Ok(());
            };
            if credit.available() == 0 || window == 0 {
                return Ok(());
            }
            let Some(m) = queue.pop_front() else {
                return Ok(());
            };
            credit.sent = credit.sent.wrapping_add(1);
            self.transfer(ch, handle, true, &m.encode()).await?;
        }
    }

    /// A newer epoch reader took the partition: this link ends with `amqp:link:stolen`.
    async fn stolen(&mut self, ch: u16, handle: u32) -> Result<(), ConnError> {
        let Some(s) = self.sessions.get_mut(&ch) else {
            return Ok(());
        };
        if !matches!(s.links.get(&handle), Some(LinkKind::Events { .. })) {
            return Ok(());
        }
        s.links.remove(&handle);
        let local = s.local;
        info!(peer = %self.peer, handle, "AMQP receiver detached: a reader with a newer epoch took the partition");
        let error = AmqpError::new(
            "amqp:link:stolen",
            "a receiver with a higher epoch took this partition",
        );
        let detach = Detach {
            handle,
            closed: Some(true),
            error: Some(error),
        };
        self.send(local, Performative::Detach(detach)).await
    }

    /// Takes `first` and whatever else the pumps have ready (up to [`EVENT_BATCH`]), then
    /// sends them, so a busy receiver gets its deliveries in few large writes.
    async fn on_events(&mut self, first: (u16, u32, Option<Outgoing>)) -> Result<(), ConnError> {
        let mut channels: Vec<u16> = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some((ch, handle, out)) = next.take() {
            match out {
                Some(out) => {
                    if let Some(s) = self.sessions.get_mut(&ch) {
                        s.waiting.push_back((handle, out));
                        if !channels.contains(&ch) {
                            channels.push(ch);
                        }
                    } else if let Outgoing::Feedback(b) = out {
                        settle_feedback(&self.fe.hub, b.lock_token, Settle::Abandon);
                    }
                }
                None => {
                    // What the link was sent before it was stolen goes out first.
                    if self.sessions.contains_key(&ch) {
                        self.flush_waiting(ch).await?;
                    }
                    self.stolen(ch, handle).await?;
                }
            }
            taken += 1;
            if taken < EVENT_BATCH && self.waiting() < MAX_WAITING {
                next = self.events_rx.try_recv().ok();
            }
        }
        for ch in channels {
            if self.sessions.contains_key(&ch) {
                self.flush_waiting(ch).await?;
            }
        }
        Ok(())
    }

    /// Sends what the pumps handed over, while the session window allows, gathered into few
    /// writes.
    async fn flush_waiting(&mut self, ch: u16) -> Result<(), ConnError> {
        let mut out = Vec::new();
        let r = self.gather_waiting(ch, &mut out).await;
        if !out.is_empty() {
            self.write(&out).await?;
        }
        r
    }

    async fn gather_waiting(&mut self, ch: u16, buf: &mut Vec<u8>) -> Result<(), ConnError> {
        loop {
            if buf.len() >= WRITE_BATCH {
                self.write(buf).await?;
                buf.clear();
            }
            let s = self.session(ch)?;
            if s.remote_incoming == 0 {
                return Ok(());
            }
            let Some((handle, out)) = s.waiting.pop_front() else {
                return Ok(());
            };
            // The pumps only take a delivery within credit, so this cannot overdraw; counted
            // here as the delivery-count the receiver sees.
            match (s.links.get_mut(&handle), out) {
                (
                    Some(LinkKind::Events {
                        credit, settled, ..
                    }),
                    Outgoing::Event(e, metric),
                ) => {
                    credit.sent = credit.sent.wrapping_add(1);
                    let settled = *settled;
                    let mut m = eventhub::event_message(&e);
                    if let Some(info) = metric {
                        m.delivery_annotations =
                            eventhub::runtime_metrics(&info, ferrohub_hub::c2d::now_ms());
                    }
                    self.encode_transfer(ch, handle, settled, &m.encode(), buf)?;
                }
                (
                    Some(LinkKind::Events { credit, .. } | LinkKind::Feedback { credit, .. }),
                    Outgoing::Drained,
                ) => {
                    // Part 2.6.7: the unused credit is consumed by advancing the delivery-count,
                    // and the sender says so with a flow that keeps drain set.
                    credit.sent = credit.limit;
                    let count = credit.sent;
                    // After the deliveries gathered so far, which it counts.
                    self.write(buf).await?;
                    buf.clear();
                    self.link_flow(ch, handle, count, 0, true).await?;
                }
                (
                    Some(LinkKind::Feedback {
                        credit, settled, ..
                    }),
                    Outgoing::Feedback(b),
                ) => {
                    credit.sent = credit.sent.wrapping_add(1);
                    let settled = *settled;
                    let bytes = c2d::feedback_message(&b, &self.fe.entity).encode();
                    let id = self.encode_transfer(ch, handle, settled, &bytes, buf)?;
                    if settled {
                        // Pre-settled: the client takes it as delivered the moment it is sent.
                        settle_feedback(&self.fe.hub, b.lock_token, Settle::Complete);
                    } else if let Some(LinkKind::Feedback { unsettled, .. }) =
                        self.session(ch)?.links.get_mut(&handle)
                    {
                        unsettled.insert(id, b.lock_token);
                    }
                }
                // Detached meanwhile: feedback goes back to the queue, events stay in the log.
                (_, Outgoing::Feedback(b)) => {
                    settle_feedback(&self.fe.hub, b.lock_token, Settle::Abandon)
                }
                (_, Outgoing::Event(..) | Outgoing::Drained) => {}
            }
        }
    }

    /// Writes one delivery, split into frames the peer accepts; returns its delivery id.
    async fn transfer(
        &mut self,
        ch: u16,
        handle: u32,
        settled: bool,
        payload: &[u8],
    ) -> Result<u32, ConnError> {
        let mut out = Vec::with_capacity(payload.len() + TRANSFER_OVERHEAD);
        let id = self.encode_transfer(ch, handle, settled, payload, &mut out)?;
        self.write(&out).await?;
        Ok(id)
    }

    /// Appends one delivery's transfer frames to `out`, counting them against the session
    /// window; returns its delivery id.
    fn encode_transfer(
        &mut self,
        ch: u16,
        handle: u32,
        settled: bool,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<u32, ConnError> {
        let chunk = (self.peer_max_frame as usize)
            .saturating_sub(TRANSFER_OVERHEAD)
            .max(64);
        let s = self.session(ch)?;
        let delivery_id = s.next_delivery_id;
        s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
        let local = s.local;
        let mut pieces = payload.chunks(chunk).peekable();
        let mut first = true;
        while let Some(piece) = pieces.next() {
            let more = pieces.peek().is_some();
            let t = Transfer {
                handle,
                delivery_id: Some(delivery_id),
                delivery_tag: Some(delivery_id.to_be_bytes().to_vec()),
                message_format: Some(0),
                settled: Some(settled),
                more: Some(more),
                rcv_settle_mode: None,
                state: Value::Null,
                resume: Some(false),
                aborted: Some(false),
                batchable: Some(!first || more),
            };
            first = false;
            frame::encode_into(out, FrameKind::Amqp, local, Some(&t.to_value()), piece);
            let s = self.session(ch)?;
            s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
            s.remote_incoming = s.remote_incoming.saturating_sub(1);
        }
        Ok(delivery_id)
    }
}

/// Our settlement of a C2D delivery we received.
fn c2d_disposition(delivery_id: u32, state: Value) -> Disposition {
    Disposition {
        role: true,
        first: delivery_id,
        last: Some(delivery_id),
        settled: Some(true),
        state,
        batchable: Some(false),
    }
}

/// A `$cbs` / `$management` response: `correlation-id` echoes the request's message-id with
/// its AMQP type (clients match on both), `status-code` is an int.
fn response(req: &Message, status: i32, description: &str, body: Value) -> Message {
    let message_id = req
        .properties
        .as_ref()
        .map(|p| p.message_id.clone())
        .unwrap_or_default();
    Message {
        properties: Some(Properties {
            message_id: Value::str(format!("ferrohub-{}", rand::random::<u64>())),
            correlation_id: message_id,
            to: req.properties.as_ref().and_then(|p| p.reply_to.clone()),
            ..Default::default()
        }),
        application_properties: vec![
            (Value::str("status-code"), Value::Int(status)),
            (Value::str("status-description"), Value::str(description)),
        ],
        body: Body::Value(body),
        ..Default::default()
    }
}

/// Takes events from the hub's stream only while the link has credit, so nothing is read
/// ahead of what the consumer asked for (and a consumer that restarts from its last offset
/// misses nothing). Answers a drain with what is already read and gives up the rest of the
/// credit. With `metric`, each event carries the partition's newest event (refreshed every
/// [`METRIC_REFRESH`] or when the event is newer). Ends when the link or connection goes (the
/// task is aborted) or the stream ends.
async fn pump(
    mut stream: EventStream,
    mut grant: watch::Receiver<Grant>,
    tx: mpsc::Sender<(u16, u32, Option<Outgoing>)>,
    (ch, handle): (u16, u32),
    lease: ReaderLease,
    metric: Option<(Arc<Hub>, u32)>,
) {
    let mut stolen = lease.stolen.clone();
    let events = tx.clone();
    let work = async move {
        let mut credit = Credit::default();
        let mut drains = 0u64;
        let mut info: Option<(Instant, PartitionInfo)> = None;
        loop {
            let g = *grant.borrow_and_update();
            credit.limit = g.limit;
            if g.drains != drains {
                drains = g.drains;
                while credit.available() > 0 {
                    let Some(e) = stream.try_next() else { break };
                    if !hand_over(&events, (ch, handle), &mut credit, &metric, &mut info, e).await {
                        return;
                    }
                }
                credit.sent = credit.limit;
                if events
                    .send((ch, handle, Some(Outgoing::Drained)))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            if credit.available() == 0 {
                if grant.changed().await.is_err() {
                    return;
                }
                continue;
            }
            // A drain may come while we wait for the next event; `next` is cancel-safe.
            let e = tokio::select! {
                e = stream.next() => e,
                r = grant.changed() => match r {
                    Ok(()) => continue,
                    Err(_) => return,
                },
            };
            let Some(e) = e else { return };
            if !hand_over(&events, (ch, handle), &mut credit, &metric, &mut info, e).await {
                return;
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = async move {
            let taken = stolen.wait_for(|s| *s).await.is_ok();
            if !taken {
                // Our place went without a thief (the lease is ours alone): never stolen.
                std::future::pending::<()>().await;
            }
        } => {
            let _ = tx.send((ch, handle, None)).await;
        }
    }
    // The place is held until here, so a stolen reader never overlaps its successor.
    drop(lease);
}

/// Counts `e` against the pump's credit and hands it to the connection loop, with runtime
/// metrics when the receiver asked for them; false once the loop is gone.
async fn hand_over(
    events: &mpsc::Sender<(u16, u32, Option<Outgoing>)>,
    (ch, handle): (u16, u32),
    credit: &mut Credit,
    metric: &Option<(Arc<Hub>, u32)>,
    info: &mut Option<(Instant, PartitionInfo)>,
    e: EventRecord,
) -> bool {
    credit.sent = credit.sent.wrapping_add(1);
    let m = metrics(metric, info, &e).await;
    events
        .send((ch, handle, Some(Outgoing::Event(e, m))))
        .await
        .is_ok()
}

/// The partition's newest event for a receiver that asked for runtime metrics: looked up
/// again when the cached figures are older than [`METRIC_REFRESH`] or behind `e`. A failed
/// look-up sends the event without them rather than not at all.
async fn metrics(
    metric: &Option<(Arc<Hub>, u32)>,
    cache: &mut Option<(Instant, PartitionInfo)>,
    e: &EventRecord,
) -> Option<PartitionInfo> {
    let (hub, partition) = metric.as_ref()?;
    let fresh = cache.as_ref().is_some_and(|(at, info)| {
        at.elapsed() < METRIC_REFRESH && info.last.is_some_and(|(seq, _)| seq >= e.sequence)
    });
    if !fresh {
        match hub.partition_info(*partition).await {
            Ok(info) => *cache = Some((Instant::now(), info)),
            Err(err) => {
                debug!(partition, error = %err.message(), "runtime metrics unavailable");
                return None;
            }
        }
    }
    cache.as_ref().map(|(_, info)| *info)
}

/// Whether a capabilities field (a symbol or an array of them) holds `capability`.
fn wants(capabilities: &Value, capability: &str) -> bool {
    match capabilities {
        Value::Symbol(s) => s == capability,
        Value::Array(items) | Value::List(items) => {
            items.iter().any(|v| v.as_str() == Some(capability))
        }
        _ => false,
    }
}

/// Takes feedback batches from the hub's queue while the link has credit (one batch per
/// delivery, as IoT Hub sends them), waiting for the hub to announce new feedback rather
/// than polling. A batch is locked once taken; the loop abandons it if it cannot deliver it.
async fn feedback_pump(
    hub: Arc<Hub>,
    mut grant: watch::Receiver<Grant>,
    tx: mpsc::Sender<(u16, u32, Option<Outgoing>)>,
    ch: u16,
    handle: u32,
) {
    let mut changes = hub.feedback_changes();
    let mut credit = Credit::default();
    let mut drains = 0u64;
    loop {
        let g = *grant.borrow_and_update();
        credit.limit = g.limit;
        let draining = g.drains != drains;
        drains = g.drains;
        if credit.available() == 0 && !draining {
            if grant.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Marked seen before looking, so a change during the look wakes the next wait.
        changes.borrow_and_update();
        let got = if credit.available() > 0 {
            hub.feedback_receive(None).await
        } else {
            Ok(None)
        };
        match got {
            Ok(Some(batch)) => {
                credit.sent = credit.sent.wrapping_add(1);
                if let Err(mpsc::error::SendError((_, _, Some(Outgoing::Feedback(b))))) =
                    tx.send((ch, handle, Some(Outgoing::Feedback(batch)))).await
                {
                    settle_feedback(&hub, b.lock_token, Settle::Abandon);
                    return;
                }
                if draining {
                    // Go on draining: the next look sends more or ends the drain.
                    drains -= 1;
                }
            }
            Ok(None) if draining => {
                credit.sent = credit.limit;
                if tx
                    .send((ch, handle, Some(Outgoing::Drained)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    r = grant.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(FEEDBACK_RECHECK) => {}
                }
            }
            Err(e) => {
                warn!(error = %e.message(), "AMQP feedback receive failed; trying again");
                tokio::time::sleep(FEEDBACK_RECHECK).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions_are_told_apart_from_other_frames_without_decoding() {
        let d = Disposition {
            role: true,
            first: 7,
            last: None,
            settled: Some(true),
            state: accepted(),
            batchable: None,
        };
        let frame_of =
            |p: Performative| frame::encode(FrameKind::Amqp, 3, Some(&p.to_value()), &[]);
        assert!(is_disposition(&frame_of(Performative::Disposition(d))));
        assert!(!is_disposition(&frame_of(Performative::Flow(
            Flow::default()
        ))));
        assert!(!is_disposition(&frame_of(Performative::End(End {
            error: None
        }))));
        assert!(!is_disposition(&frame::encode(
            FrameKind::Amqp,
            0,
            None,
            &[]
        )));
        let sasl = frame::encode(
            FrameKind::Sasl,
            0,
            Some(
                &SaslOutcome {
                    code: 0,
                    additional_data: None,
                }
                .to_value(),
            ),
            &[],
        );
        assert!(!is_disposition(&sasl));
        assert!(!is_disposition(&[0, 0, 0, 8]));
    }
}
