//! One client connection: reads packets, applies MQTT rules, calls the handler, writes replies.
//!
//! A single task owns the socket and selects over: bytes from the client, messages for the
//! client, the keep-alive deadline, a takeover signal and server shutdown. Replies are written
//! inline, so a client that does not read slows only itself.

use std::sync::Arc;

use bytes::BytesMut;
use ferrohub_mqtt::{
    decode, encode, ConnAck, Connect, ConnectReturnCode, Packet, Publish, QoS, SubAck,
    SubscribeReturnCode,
};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    Broker, DisconnectReason, Handler, Outbound, OutboundMessage, PeerInfo, PublishDecision,
    SessionState,
};

/// Read-buffer growth step; an idle connection holds no buffer at all (see `read_more`).
const READ_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("closed by peer")]
    Closed,
    #[error("malformed packet: {0}")]
    Decode(#[from] ferrohub_mqtt::DecodeError),
    #[error("encode: {0}")]
    Encode(#[from] ferrohub_mqtt::EncodeError),
    #[error("a write to the client did not finish within {0:?} (the client is not reading)")]
    WriteTimeout(std::time::Duration),
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    /// A takeover or kick arrived while a write waited on the client.
    #[error("taken over while writing")]
    Kicked,
    #[error("server shutting down while writing")]
    Shutdown,
}

/// Socket plus its buffers, with the packet-level read/write the loop needs.
struct Wire<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_packet_size: usize,
    /// How long one write may take. A client that stops reading (its network gone without a
    /// FIN) would otherwise block the task in a write forever, deaf to keep-alive, takeover,
    /// kicks and shutdown, holding its identity. The connect timeout until CONNECT, then the
    /// session's keep-alive window.
    write_timeout: std::time::Duration,
    /// A takeover, a kick or shutdown ends a write at once: the new connection of the same
    /// device must not wait out the write timeout of one whose network is gone.
    kicked: CancellationToken,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// A packet already buffered, if any.
    fn next_buffered(&mut self) -> Result<Option<Packet>, ConnError> {
        let p = decode(&mut self.rbuf, self.max_packet_size)?;
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            // Give the buffer back while the connection idles: at 10k connections, 4 KiB each
            // would be most of our memory.
            self.rbuf = BytesMut::new();
        }
        Ok(p)
    }

    async fn read_more(&mut self) -> Result<(), ConnError> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(ConnError::Closed);
        }
        Ok(())
    }

    /// The first packet, which must be CONNECT: a first byte of any other type ends the
    /// connection at once, instead of after the connect timeout while random bytes look like
    /// the start of a long packet.
    async fn read_first_packet(&mut self) -> Result<Packet, ConnError> {
        loop {
            if self.rbuf.first().is_some_and(|b| b >> 4 != 1) {
                return Err(ConnError::NotConnect);
            }
            if let Some(p) = self.next_buffered()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    fn queue(&mut self, packet: &Packet) -> Result<(), ConnError> {
        encode(packet, &mut self.wbuf)?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        let limit = self.write_timeout;
        let Wire {
            stream,
            wbuf,
            kicked,
            shutdown,
            ..
        } = self;
        tokio::select! {
            biased;
            _ = kicked.cancelled() => Err(ConnError::Kicked),
            _ = crate::until_shutdown(shutdown) => Err(ConnError::Shutdown),
            r = tokio::time::timeout(limit, write_out(stream, wbuf)) => match r {
                Ok(r) => r,
                Err(_) => Err(ConnError::WriteTimeout(limit)),
            },
        }
    }

    async fn send(&mut self, packet: &Packet) -> Result<(), ConnError> {
        self.queue(packet)?;
        self.flush().await
    }
}

async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    wbuf: &mut BytesMut,
) -> Result<(), ConnError> {
    if !wbuf.is_empty() {
        stream.write_all(wbuf).await?;
        wbuf.clear();
        if wbuf.capacity() > 64 * 1024 {
            *wbuf = BytesMut::new();
        }
    }
    stream.flush().await?;
    Ok(())
}

/// Serves one client from its first byte to close. Never panics on client input; every error
/// ends this connection only.
pub async fn serve_connection<H, S>(broker: Arc<Broker<H>>, stream: S, peer: PeerInfo)
where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Boxed so the async state machines below move a pointer, not the TLS stream: rustc keeps
    // a separate slot for each moved copy, which tripled the memory of an idle connection.
    let mut wire = Box::new(Wire {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        max_packet_size: broker.config.max_packet_size,
        write_timeout: broker.config.connect_timeout,
        // Replaced by the connection's own once it registers its client id.
        kicked: CancellationToken::new(),
        shutdown: broker.shutdown.clone(),
    });
    // Shutdown is watched from the first byte: a socket that never sends CONNECT would
    // otherwise hold shutdown up for the whole connect timeout.
    let mut shutdown = broker.shutdown.clone();
    let first = tokio::select! {
        r = tokio::time::timeout(broker.config.connect_timeout, wire.read_first_packet()) => r,
        _ = crate::until_shutdown(&mut shutdown) => {
            debug!(peer = %peer.addr, "server shutting down before CONNECT; closing");
            return;
        }
    };
    let connect = match first {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(other)) => {
            debug!(peer = %peer.addr, packet = ?packet_kind(&other), "first packet was not CONNECT; closing");
            return;
        }
        Ok(Err(e)) => {
            debug!(peer = %peer.addr, error = %e, "connection closed before CONNECT");
            return;
        }
        Err(_) => {
            debug!(peer = %peer.addr, "no CONNECT in time; closing");
            return;
        }
    };
    if connect.protocol_level != 4 {
        debug!(peer = %peer.addr, level = connect.protocol_level, "unsupported MQTT protocol level");
        let _ = wire
            .send(&connack(
                false,
                ConnectReturnCode::UnacceptableProtocolVersion,
            ))
            .await;
        return;
    }
    let client = match broker.handler.connect(&connect, &peer).await {
        Ok(c) => c,
        Err(code) => {
            let _ = wire.send(&connack(false, code)).await;
            let _ = wire.stream.shutdown().await;
            return;
        }
    };
    Box::pin(run_session(broker, wire, peer, connect, client)).await;
}

async fn run_session<H, S>(
    broker: Arc<Broker<H>>,
    mut wire: Box<Wire<S>>,
    _peer: PeerInfo,
    mut connect: Connect,
    client: H::Client,
) where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let Some(key) = broker.handler.session_key(&client) {
        connect.client_id = key;
        connect.clean_session = true;
    }
    let client_id = connect.client_id.clone();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let (conn_id, kicked) = broker.register(&client_id, done_rx).await;
    wire.kicked = kicked.clone();

    let (session, session_present) = match open_session(&broker, &connect).await {
        Ok(s) => s,
        Err(e) => {
            warn!(client = %client_id, error = %e, "session store failed; refusing connection");
            let _ = wire
                .send(&connack(false, ConnectReturnCode::ServerUnavailable))
                .await;
            broker.unregister(&client_id, conn_id);
            let _ = done_tx.send(true);
            broker
                .handler
                .disconnected(
                    &client,
                    &DisconnectReason::SessionStore(e.to_string()),
                    None,
                )
                .await;
            return;
        }
    };
    // Held for the connection's life: a takeover waits (via `done`) until we let go.
    let mut state = session.clone().lock_owned().await;

    // Boxed messages keep the channel's first block (32 slots, allocated up front) small.
    let (out_tx, mut out_rx) = mpsc::channel::<Box<OutboundMessage>>(broker.config.outbound_queue);
    let reason = async {
        wire.send(&connack(session_present, ConnectReturnCode::Accepted))
            .await
            .map_err(lost)?;
        let restored: Vec<String> = state.subscriptions.iter().map(|(f, _)| f.clone()).collect();
        broker
            .handler
            .connected(&client, Outbound { tx: out_tx }, &restored)
            .await;
        // Redeliver what the previous connection sent but never saw acknowledged.
        for (pid, msg) in state.inflight.iter() {
            wire.queue(&Packet::Publish(Publish {
                dup: true,
                qos: msg.qos,
                retain: false,
                topic: msg.topic.clone(),
                packet_id: *pid,
                payload: msg.payload.clone(),
            }))
            .map_err(|e| DisconnectReason::ProtocolViolation(e.to_string()))?;
        }
        wire.flush().await.map_err(lost)?;
        session_loop(
            &broker,
            &mut wire,
            &client,
            &mut state,
            &mut out_rx,
            &kicked,
            &connect,
        )
        .await
    }
    .await
    .err()
    .unwrap_or(DisconnectReason::ClientDisconnect);

    if matches!(reason, DisconnectReason::ProtocolViolation(_)) {
        debug!(client = %client_id, ?reason, "closing connection");
    }
    let persistent = !connect.clean_session;
    state.release_handler_messages();
    drop(state);
    if !persistent {
        broker.drop_memory_session(&client_id);
    }
    broker.unregister(&client_id, conn_id);
    let _ = done_tx.send(true);
    let will = if reason.publishes_will() {
        connect.will.take()
    } else {
        None
    };
    broker.handler.disconnected(&client, &reason, will).await;
    // Best effort close_notify; a dead peer must not hold the task.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), wire.stream.shutdown()).await;
}

/// Finds or creates the session for CONNECT; returns it and the session-present flag.
async fn open_session<H: Handler>(
    broker: &Broker<H>,
    connect: &Connect,
) -> Result<(Arc<Mutex<SessionState>>, bool), crate::PersistenceError> {
    let id = &connect.client_id;
    if connect.clean_session {
        // Discard any earlier persistent session (MQTT 3.1.1 section 3.1.2.4). Only touch the
        // disk when there is something to delete: clean connects are the fast path.
        let had_memory = broker.memory_session(id).is_some();
        broker.drop_memory_session(id);
        if had_memory || broker.sessions_store.load(id).await?.is_some() {
            broker.sessions_store.delete(id).await?;
        }
        return Ok((Arc::new(Mutex::new(SessionState::default())), false));
    }
    if let Some(s) = broker.memory_session(id) {
        return Ok((s, true));
    }
    let (state, present) = match broker.sessions_store.load(id).await? {
        Some(stored) => (SessionState::from_persisted(&stored), true),
        None => {
            // Record the session now so that session-present is right after a restart even
            // if the client never subscribes.
            let s = SessionState::default();
            broker.sessions_store.save(id, &s.to_persisted()).await?;
            (s, false)
        }
    };
    let s = Arc::new(Mutex::new(state));
    broker.put_memory_session(id, s.clone());
    Ok((s, present))
}

/// Publishes whose completion is awaited, in arrival order: (QoS, packet id, outcome).
type PendingAcks = FuturesOrdered<
    std::pin::Pin<
        Box<dyn std::future::Future<Output = (QoS, u16, Result<(), crate::Refusal>)> + Send>,
    >,
>;

enum Event {
    Completed((QoS, u16, Result<(), crate::Refusal>)),
    Read(Result<(), ConnError>),
    Outbound(Option<Box<OutboundMessage>>),
    KeepAliveExpired,
    CredentialsExpired,
    Kicked,
    Shutdown,
}

async fn session_loop<H, S>(
    broker: &Broker<H>,
    wire: &mut Wire<S>,
    client: &H::Client,
    state: &mut SessionState,
    out_rx: &mut mpsc::Receiver<Box<OutboundMessage>>,
    kicked: &CancellationToken,
    connect: &Connect,
) -> Result<(), DisconnectReason>
where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let keep_alive = broker.handler.keep_alive(connect.keep_alive);
    wire.write_timeout = keep_alive;
    let mut deadline = Instant::now() + keep_alive;
    let expires = broker.handler.session_deadline(client);
    let mut shutdown = broker.shutdown.clone();
    let max_inflight = broker.config.max_inflight;
    let max_pending = broker.config.max_pending_acks;
    let mut pending: PendingAcks = FuturesOrdered::new();
    let mut outbound_open = true;
    loop {
        // Checked before buffered packets too: a client that sent a burst just before its
        // credentials expired must not have the rest of it accepted afterwards.
        if expires.is_some_and(|at| Instant::now() >= at) {
            return Err(DisconnectReason::CredentialsExpired);
        }
        // Packets that arrived together with the previous read are handled before waiting,
        // unless enough publishes already wait for their completion.
        if pending.len() < max_pending {
            match wire.next_buffered() {
                Ok(Some(packet)) => {
                    handle_packet(broker, wire, client, state, connect, &mut pending, packet)
                        .await?;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(DisconnectReason::ProtocolViolation(e.to_string())),
            }
        }
        let can_send = outbound_open && state.inflight.len() < max_inflight;
        let can_read = pending.len() < max_pending;
        let event = tokio::select! {
            biased;
            _ = kicked.cancelled() => Event::Kicked,
            _ = crate::until_shutdown(&mut shutdown) => Event::Shutdown,
            // Ahead of completions: a publish still pending when the credentials expire is not
            // acknowledged.
            _ = tokio::time::sleep_until(expires.unwrap_or(deadline)), if expires.is_some() => {
                Event::CredentialsExpired
            }
            Some(done) = pending.next(), if !pending.is_empty() => Event::Completed(done),
            r = wire.read_more(), if can_read => Event::Read(r),
            m = out_rx.recv(), if can_send => Event::Outbound(m),
            _ = tokio::time::sleep_until(deadline) => Event::KeepAliveExpired,
        };
        match event {
            Event::Completed(first) => {
                // A group commit completes many publishes at once: write all their PUBACKs
                // (still in order) as one TLS record and one syscall instead of one each.
                let mut done = Some(first);
                while let Some((qos, pid, result)) = done.take() {
                    if let Err(why) = result {
                        let _ = wire.flush().await;
                        return Err(why.into());
                    }
                    if qos == QoS::AtLeastOnce {
                        wire.queue(&Packet::PubAck(pid)).map_err(lost)?;
                    }
                    done = pending.next().now_or_never().flatten();
                }
                wire.flush().await.map_err(lost)?;
            }
            Event::Read(Ok(())) => deadline = Instant::now() + keep_alive,
            Event::Read(Err(ConnError::Decode(e))) => {
                return Err(DisconnectReason::ProtocolViolation(e.to_string()))
            }
            Event::Read(Err(e)) => return Err(DisconnectReason::ConnectionLost(e.to_string())),
            Event::Outbound(Some(msg)) => {
                let packet_id = if msg.qos == QoS::AtMostOnce {
                    0
                } else {
                    state.next_packet_id()
                };
                let packet = Packet::Publish(Publish {
                    dup: false,
                    qos: msg.qos,
                    retain: false,
                    topic: msg.topic.clone(),
                    packet_id,
                    payload: msg.payload.clone(),
                });
                if msg.qos != QoS::AtMostOnce {
                    state.inflight.push_back((packet_id, *msg));
                }
                wire.send(&packet).await.map_err(lost)?;
            }
            // Every sender is gone: nothing more can be queued. Stop polling the channel and
            // keep serving the client (waiting here would stop reading, keep-alive and takeover).
            Event::Outbound(None) => outbound_open = false,
            Event::KeepAliveExpired => return Err(DisconnectReason::KeepAliveTimeout),
            Event::CredentialsExpired => return Err(DisconnectReason::CredentialsExpired),
            Event::Kicked => return Err(DisconnectReason::TakenOver),
            Event::Shutdown => return Err(DisconnectReason::ServerShutdown),
        }
    }
}

fn lost(e: ConnError) -> DisconnectReason {
    match e {
        ConnError::Kicked => DisconnectReason::TakenOver,
        ConnError::Shutdown => DisconnectReason::ServerShutdown,
        e => DisconnectReason::ConnectionLost(e.to_string()),
    }
}

async fn handle_packet<H, S>(
    broker: &Broker<H>,
    wire: &mut Wire<S>,
    client: &H::Client,
    state: &mut SessionState,
    connect: &Connect,
    pending: &mut PendingAcks,
    packet: Packet,
) -> Result<(), DisconnectReason>
where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match packet {
        Packet::Publish(p) => {
            if p.qos > broker.config.maximum_qos {
                return Err(DisconnectReason::ProtocolViolation(format!(
                    "PUBLISH at QoS {} is above the maximum of {}",
                    p.qos as u8, broker.config.maximum_qos as u8
                )));
            }
            let (qos, pid) = (p.qos, p.packet_id);
            match broker.handler.publish(client, p).await {
                // Earlier publishes may still be pending: their PUBACKs go first (MQTT 3.1.1
                // section 4.6), so an immediate accept queues behind them.
                PublishDecision::Accept if !pending.is_empty() => {
                    pending.push_back(Box::pin(async move { (qos, pid, Ok(())) }));
                }
                PublishDecision::Accept => {
                    if qos == QoS::AtLeastOnce {
                        wire.send(&Packet::PubAck(pid)).await.map_err(lost)?;
                    }
                }
                PublishDecision::AcceptWhen(done) => {
                    pending.push_back(Box::pin(async move { (qos, pid, done.await) }));
                }
                PublishDecision::Reject(why) => return Err(why.into()),
            }
        }
        Packet::PubAck(pid) => {
            if let Some(OutboundMessage {
                on_ack: Some(hook), ..
            }) = state.ack(pid)
            {
                (hook.0)();
            }
        }
        Packet::Subscribe(sub) => {
            let mut codes = Vec::with_capacity(sub.filters.len());
            let mut changed = false;
            for (filter, qos) in sub.filters {
                let existing = state.subscriptions.iter().position(|(f, _)| *f == filter);
                let room = existing.is_some()
                    || state.subscriptions.len() < broker.config.max_subscriptions;
                let grant = room
                    .then(|| broker.handler.authorize_subscribe(client, &filter, qos))
                    .flatten();
                let Some(granted) = grant else {
                    codes.push(SubscribeReturnCode::Failure);
                    continue;
                };
                let granted = granted.min(broker.config.maximum_qos).min(QoS::AtLeastOnce);
                match existing {
                    Some(i) => state.subscriptions[i].1 = granted,
                    None => state.subscriptions.push((filter, granted)),
                }
                changed = true;
                codes.push(SubscribeReturnCode::Success(granted));
            }
            persist(broker, connect, state, changed).await?;
            wire.send(&Packet::SubAck(SubAck {
                packet_id: sub.packet_id,
                return_codes: codes,
            }))
            .await
            .map_err(lost)?;
            if changed {
                notify_subscriptions(broker, client, state).await;
            }
        }
        Packet::Unsubscribe(u) => {
            let before = state.subscriptions.len();
            state.subscriptions.retain(|(f, _)| !u.filters.contains(f));
            let changed = before != state.subscriptions.len();
            persist(broker, connect, state, changed).await?;
            wire.send(&Packet::UnsubAck(u.packet_id))
                .await
                .map_err(lost)?;
            if changed {
                notify_subscriptions(broker, client, state).await;
            }
        }
        Packet::PingReq => wire.send(&Packet::PingResp).await.map_err(lost)?,
        Packet::Disconnect => return Err(DisconnectReason::ClientDisconnect),
        other => {
            return Err(DisconnectReason::ProtocolViolation(format!(
                "unexpected {} packet from client",
                packet_kind(&other)
            )))
        }
    }
    Ok(())
}

async fn notify_subscriptions<H: Handler>(
    broker: &Broker<H>,
    client: &H::Client,
    state: &SessionState,
) {
    let filters: Vec<String> = state.subscriptions.iter().map(|(f, _)| f.clone()).collect();
    broker.handler.subscriptions_changed(client, &filters).await;
}

/// Writes the subscriptions of a persistent session before they are acknowledged.
async fn persist<H: Handler>(
    broker: &Broker<H>,
    connect: &Connect,
    state: &SessionState,
    changed: bool,
) -> Result<(), DisconnectReason> {
    if connect.clean_session || !changed {
        return Ok(());
    }
    broker
        .sessions_store
        .save(&connect.client_id, &state.to_persisted())
        .await
        .map_err(|e| DisconnectReason::SessionStore(e.to_string()))
}

fn connack(session_present: bool, code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code,
    })
}

fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    //! Broker behaviour that needs a handler the IoT Hub layer would never be: one whose
    //! durability never completes. Runs over an in-memory stream.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use bytes::{Bytes, BytesMut};
    use ferrohub_mqtt::{Connect, ConnectReturnCode, LastWill, Packet, Publish, QoS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::{
        Broker, BrokerConfig, DisconnectReason, Handler, NoPersistence, Outbound, PeerInfo,
        PublishDecision, Transport,
    };

    /// A peer that came over TLS with no client certificate.
    fn tls_peer() -> PeerInfo {
        PeerInfo {
            addr: "127.0.0.1:1".parse().expect("literal address"),
            transport: Transport::Tls,
            client_certs: Arc::new(Vec::new()),
        }
    }

    /// CONNECT for client id `c` with a 60 s keep-alive, encoded.
    fn connect_bytes(clean_session: bool) -> BytesMut {
        let mut out = BytesMut::new();
        let connect = Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session,
            keep_alive: 60,
            client_id: "c".into(),
            will: None,
            username: None,
            password: None,
        });
        ferrohub_mqtt::encode(&connect, &mut out).expect("encodable");
        out
    }

    /// Counts publishes and never lets one become durable: a store that has stopped.
    #[derive(Default)]
    struct StuckStore {
        publishes: AtomicUsize,
    }

    #[async_trait]
    impl Handler for StuckStore {
        type Client = ();
        async fn connect(&self, _: &Connect, _: &PeerInfo) -> Result<(), ConnectReturnCode> {
            Ok(())
        }
        fn keep_alive(&self, _: u16) -> Duration {
            Duration::from_secs(60)
        }
        /// Drops the outbound handle on purpose: a connection must keep serving without one
        /// (it once waited forever here, deaf to reads, keep-alive and takeover).
        async fn connected(&self, _: &(), _: Outbound, _: &[String]) {}
        fn authorize_subscribe(&self, _: &(), _: &str, qos: QoS) -> Option<QoS> {
            Some(qos)
        }
        async fn subscriptions_changed(&self, _: &(), _: &[String]) {}
        async fn publish(&self, _: &(), _: Publish) -> PublishDecision {
            self.publishes.fetch_add(1, Ordering::SeqCst);
            PublishDecision::AcceptWhen(Box::pin(std::future::pending()))
        }
        async fn disconnected(&self, _: &(), _: &DisconnectReason, _: Option<LastWill>) {}
    }

    #[tokio::test]
    async fn a_stalled_store_stops_the_connection_reading_at_the_pending_limit() {
        let handler = Arc::new(StuckStore::default());
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let config = BrokerConfig::default();
        let limit = config.max_pending_acks;
        let broker = Broker::new(handler.clone(), config, Arc::new(NoPersistence), shutdown);
        // A small pipe: once the server stops reading, the client's writes stop too.
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let peer = tls_peer();
        tokio::spawn(super::serve_connection(broker, server, peer));

        client
            .write_all(&connect_bytes(true))
            .await
            .expect("write CONNECT");
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.expect("CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 0]);

        // Far more publishes than the limit, each 1 KiB: the client is blocked once the
        // server stops reading, so write from a separate task.
        let writer = tokio::spawn(async move {
            for pid in 1..=200u16 {
                let mut buf = BytesMut::new();
                let p = Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: "t".into(),
                    packet_id: pid,
                    payload: Bytes::from(vec![0u8; 1024]),
                });
                ferrohub_mqtt::encode(&p, &mut buf).expect("encodable");
                if client.write_all(&buf).await.is_err() {
                    break;
                }
            }
            client
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            handler.publishes.load(Ordering::SeqCst),
            limit,
            "the connection takes exactly {limit} unfinished publishes, then stops reading"
        );
        assert!(
            !writer.is_finished(),
            "the client is held back: nothing is buffered without bound"
        );
        writer.abort();
    }

    /// Remembers why each connection ended.
    #[derive(Default)]
    struct Recorder {
        reasons: std::sync::Mutex<Vec<DisconnectReason>>,
        /// How long a session may last from CONNECT, as a token's lifetime would bound it.
        session_length: Option<Duration>,
        /// The last connection's outbound handle, for tests that push to the client.
        outbound: std::sync::Mutex<Option<Outbound>>,
    }

    #[async_trait]
    impl Handler for Recorder {
        type Client = ();
        async fn connect(&self, _: &Connect, _: &PeerInfo) -> Result<(), ConnectReturnCode> {
            Ok(())
        }
        fn keep_alive(&self, _: u16) -> Duration {
            Duration::from_secs(60)
        }
        fn session_deadline(&self, _: &()) -> Option<tokio::time::Instant> {
            self.session_length.map(|d| tokio::time::Instant::now() + d)
        }
        async fn connected(&self, _: &(), outbound: Outbound, _: &[String]) {
            *self.outbound.lock().unwrap_or_else(|e| e.into_inner()) = Some(outbound);
        }
        fn authorize_subscribe(&self, _: &(), _: &str, qos: QoS) -> Option<QoS> {
            Some(qos)
        }
        async fn subscriptions_changed(&self, _: &(), _: &[String]) {}
        async fn publish(&self, _: &(), _: Publish) -> PublishDecision {
            PublishDecision::Accept
        }
        async fn disconnected(&self, _: &(), reason: &DisconnectReason, _: Option<LastWill>) {
            self.reasons
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(reason.clone());
        }
    }

    #[tokio::test]
    async fn a_connection_without_connect_ends_at_shutdown_not_at_the_connect_timeout() {
        let handler = Arc::new(Recorder::default());
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let config = BrokerConfig::default();
        let connect_timeout = config.connect_timeout;
        let broker = Broker::new(handler, config, Arc::new(NoPersistence), shutdown);
        let (_client, server) = tokio::io::duplex(1024);
        let peer = PeerInfo {
            addr: "127.0.0.1:1".parse().expect("literal address"),
            transport: Transport::WebSocket,
            client_certs: Arc::new(Vec::new()),
        };
        let task = tokio::spawn(super::serve_connection(broker, server, peer));
        // Let it reach the wait for CONNECT.
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        let _ = stop.send(true);
        tokio::time::timeout(connect_timeout / 10, task)
            .await
            .expect("the connection ends at shutdown, not at the connect timeout")
            .expect("no panic");
    }

    /// Bytes that cannot start a CONNECT end the connection at once, not at the connect
    /// timeout (random bytes often look like the start of a long packet).
    #[tokio::test(start_paused = true)]
    async fn a_first_byte_that_is_not_connect_closes_at_once() {
        let (_handler, broker, _stop) = recorder_broker();
        let (mut client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(super::serve_connection(broker, server, tls_peer()));
        // A PUBLISH header announcing a 2 MB packet.
        client
            .write_all(&[0x30, 0xff, 0xff, 0x7f])
            .await
            .expect("write");
        let started = tokio::time::Instant::now();
        task.await.expect("no panic");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("closed");
        assert!(rest.is_empty(), "nothing is answered: {rest:?}");
    }

    /// A session store whose disk has failed.
    struct BrokenPersistence;

    #[async_trait]
    impl crate::SessionPersistence for BrokenPersistence {
        async fn load(
            &self,
            _: &str,
        ) -> Result<Option<crate::PersistedSession>, crate::PersistenceError> {
            Err(crate::PersistenceError("disk I/O error".into()))
        }
        async fn save(
            &self,
            _: &str,
            _: &crate::PersistedSession,
        ) -> Result<(), crate::PersistenceError> {
            Err(crate::PersistenceError("disk I/O error".into()))
        }
        async fn delete(&self, _: &str) -> Result<(), crate::PersistenceError> {
            Err(crate::PersistenceError("disk I/O error".into()))
        }
    }

    #[tokio::test]
    async fn a_failing_session_store_is_the_servers_fault_not_a_protocol_violation() {
        let handler = Arc::new(Recorder::default());
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let broker = Broker::new(
            handler.clone(),
            BrokerConfig::default(),
            Arc::new(BrokenPersistence),
            shutdown,
        );
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let peer = tls_peer();
        let task = tokio::spawn(super::serve_connection(broker, server, peer));
        client
            .write_all(&connect_bytes(false))
            .await
            .expect("write CONNECT");
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.expect("CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 3], "CONNACK: server unavailable");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the connection ends")
            .expect("no panic");
        let reasons = handler.reasons.lock().expect("not poisoned").clone();
        assert!(
            matches!(reasons.as_slice(), [DisconnectReason::SessionStore(e)] if e.contains("disk I/O error")),
            "{reasons:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_at_the_handlers_deadline_even_while_the_client_is_active() {
        let handler = Arc::new(Recorder {
            session_length: Some(Duration::from_millis(100)),
            ..Default::default()
        });
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let broker = Broker::new(
            handler.clone(),
            BrokerConfig::default(),
            Arc::new(NoPersistence),
            shutdown,
        );
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let peer = tls_peer();
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(super::serve_connection(broker, server, peer));
        client
            .write_all(&connect_bytes(true))
            .await
            .expect("write CONNECT");
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.expect("CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 0]);

        let publish = |pid: u16| {
            let mut buf = BytesMut::new();
            let p = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "t".into(),
                packet_id: pid,
                payload: Bytes::from_static(b"x"),
            });
            ferrohub_mqtt::encode(&p, &mut buf).expect("encodable");
            buf
        };
        client.write_all(&publish(1)).await.expect("write PUBLISH");
        let mut puback = [0u8; 4];
        client.read_exact(&mut puback).await.expect("PUBACK");
        assert_eq!(puback, [0x40, 2, 0, 1], "accepted before the deadline");

        // Activity well within keep-alive: only the deadline can end this session.
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(&publish(2)).await.expect("write PUBLISH");
        client.read_exact(&mut puback).await.expect("PUBACK");
        assert_eq!(puback, [0x40, 2, 0, 2]);

        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection")
            .expect("clean close");
        assert!(rest.is_empty(), "nothing after the deadline: {rest:?}");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(100) && elapsed < Duration::from_millis(150),
            "closed at the deadline, not later: {elapsed:?}"
        );
        task.await.expect("no panic");
        let reasons = handler.reasons.lock().expect("not poisoned").clone();
        assert_eq!(reasons, [DisconnectReason::CredentialsExpired]);
    }

    /// A client whose network went away without a FIN: it never reads again, and the server's
    /// writes to it block. The connection must still end (within the keep-alive window), or it
    /// holds its identity against every reconnect.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_closed_when_a_write_cannot_finish() {
        let (handler, broker, _stop) = recorder_broker();
        let (client, task, pusher) = blocked_in_a_write(&handler, &broker).await;
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("the connection ends though the client never reads")
            .expect("no panic");
        assert!(
            started.elapsed() <= Duration::from_secs(61),
            "within the keep-alive window: {:?}",
            started.elapsed()
        );
        let reasons = handler.reasons.lock().expect("not poisoned").clone();
        assert!(
            matches!(reasons.as_slice(), [DisconnectReason::ConnectionLost(e)] if e.contains("not reading")),
            "{reasons:?}"
        );
        pusher.abort();
        drop(client);
    }

    /// A broker with default limits over a [`Recorder`], and the sender that shuts it down.
    fn recorder_broker() -> (
        Arc<Recorder>,
        Arc<Broker<Recorder>>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let handler = Arc::new(Recorder::default());
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let broker = Broker::new(
            handler.clone(),
            BrokerConfig::default(),
            Arc::new(NoPersistence),
            shutdown,
        );
        (handler, broker, stop)
    }

    /// A connection whose client has stopped reading, with the server blocked in a write to it.
    async fn blocked_in_a_write(
        handler: &Arc<Recorder>,
        broker: &Arc<Broker<Recorder>>,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (mut client, server) = tokio::io::duplex(4 * 1024);
        let task = tokio::spawn(super::serve_connection(broker.clone(), server, tls_peer()));
        client
            .write_all(&connect_bytes(false))
            .await
            .expect("write CONNECT");
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.expect("CONNACK");
        let outbound = handler
            .outbound
            .lock()
            .expect("not poisoned")
            .clone()
            .expect("connected");
        let pusher = tokio::spawn(async move {
            for _ in 0..64 {
                let msg = crate::OutboundMessage::new(
                    "t".into(),
                    Bytes::from(vec![0u8; 1024]),
                    QoS::AtMostOnce,
                );
                if outbound.send(msg).await.is_err() {
                    break;
                }
            }
        });
        // Let the pipe fill, so the server sits in a write.
        tokio::time::sleep(Duration::from_millis(10)).await;
        (client, task, pusher)
    }

    /// The same device reconnecting (its old network gone without a FIN) must not wait out
    /// the old connection's write timeout: the takeover interrupts the blocked write.
    #[tokio::test(start_paused = true)]
    async fn a_takeover_interrupts_a_write_blocked_on_a_client_that_stopped_reading() {
        let (handler, broker, _stop) = recorder_broker();
        let (_old_client, old_task, pusher) = blocked_in_a_write(&handler, &broker).await;

        let started = tokio::time::Instant::now();
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let _new_task = tokio::spawn(super::serve_connection(broker.clone(), server, tls_peer()));
        client
            .write_all(&connect_bytes(false))
            .await
            .expect("write CONNECT");
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.expect("CONNACK");
        assert_eq!(connack, [0x20, 2, 1, 0], "accepted, session present");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the takeover waited {:?}",
            started.elapsed()
        );
        old_task.await.expect("no panic");
        let reasons = handler.reasons.lock().expect("not poisoned").clone();
        assert_eq!(reasons, [DisconnectReason::TakenOver]);
        pusher.abort();
    }

    /// Deleting or disabling a device kicks it; a kick must not wait for a blocked write
    /// either. Nor must shutdown.
    #[tokio::test(start_paused = true)]
    async fn a_kick_and_shutdown_interrupt_a_blocked_write() {
        for shut_down in [false, true] {
            let (handler, broker, stop) = recorder_broker();
            let (_client, task, pusher) = blocked_in_a_write(&handler, &broker).await;
            let started = tokio::time::Instant::now();
            if shut_down {
                stop.send(true).expect("broker listens");
            } else {
                assert!(broker.kick("c"), "the connection is live");
            }
            task.await.expect("no panic");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "ended after {:?}",
                started.elapsed()
            );
            let reasons = handler.reasons.lock().expect("not poisoned").clone();
            let want = if shut_down {
                DisconnectReason::ServerShutdown
            } else {
                DisconnectReason::TakenOver
            };
            assert_eq!(reasons, [want]);
            pusher.abort();
        }
    }
}
