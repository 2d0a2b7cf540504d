//! MQTT and AMQP over WebSocket: the `/$iothub/websocket` (MQTT, or AMQP when the client asks
//! for `AMQPWSB10`) and `/$servicebus/websocket` (AMQP) endpoints, and a byte-stream view of a
//! WebSocket, so the broker and the AMQP front end serve it exactly like a TLS socket.
//!
//! An upgraded session is a device connection like one over TLS: it holds a place of the same
//! connection cap for its whole life and runs under the server's task tracker, so shutdown
//! waits for it. (The HTTPS connection it came on ends at the upgrade, and with it the place
//! that connection held in the HTTPS cap.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use ferrohub_broker::{serve_connection, Broker, PeerInfo, Transport};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::api::ApiError;
use crate::mqtt::MqttFrontEnd;
use crate::server::HttpsConn;

/// What an upgraded session needs from the server.
#[derive(Clone)]
pub struct Sessions {
    /// The device-connection cap, shared with the MQTT/TLS listener.
    pub slots: Arc<Semaphore>,
    /// What shutdown waits on.
    pub tracker: TaskTracker,
    /// Tells AMQP sessions to close (the broker has its own).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// The WebSocket subprotocol of AMQP 1.0.
pub const AMQP_SUBPROTOCOL: &str = "AMQPWSB10";

/// Upgrades to an AMQP connection (the Event Hubs endpoint), under the same cap and tracker
/// as MQTT sessions.
pub fn upgrade_amqp(
    ws: WebSocketUpgrade,
    front_end: crate::amqp::AmqpFrontEnd,
    conn: HttpsConn,
) -> Response {
    let Ok(permit) = conn.sessions.slots.clone().try_acquire_owned() else {
        debug!(peer = %conn.addr, "connection cap reached; AMQP WebSocket upgrade refused");
        return at_connection_cap("the hub is at its connection limit; retry later");
    };
    let tracked = conn.sessions.tracker.token();
    let max = front_end.max_frame_size as usize;
    let shutdown = conn.sessions.shutdown.clone();
    ws.protocols([AMQP_SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            crate::amqp::serve(front_end, WsByteStream::new(socket), conn.addr, shutdown).await;
            drop(permit);
            drop(tracked);
        })
        .into_response()
}

/// Seconds a refused client is told to wait before it tries again.
const RETRY_AFTER_SECS: &str = "5";

/// The 503 for an upgrade the connection cap has no room for. Its `Retry-After` is shorter
/// than the one `ApiError` gives a 503 (a full disk): a slot frees as soon as any session ends.
fn at_connection_cap(message: &str) -> Response {
    let mut resp =
        ApiError::new(ferrohub_iothub::ErrorCode::ServiceUnavailable, message).into_response();
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    resp
}

/// Upgrades to an MQTT session when the device-connection cap has room, else answers 503.
///
/// Refused rather than queued: the request is already accepted, and a handshake left waiting
/// would hold its HTTPS connection and run into the client's own timeout; a 503 with
/// `Retry-After` is something the SDKs' retry policies handle.
pub fn upgrade(
    ws: WebSocketUpgrade,
    broker: Arc<Broker<MqttFrontEnd>>,
    conn: HttpsConn,
) -> Response {
    let Ok(permit) = conn.sessions.slots.clone().try_acquire_owned() else {
        debug!(peer = %conn.addr, "device connection cap reached; WebSocket upgrade refused");
        return at_connection_cap("the hub is at its device connection limit; retry later");
    };
    // Taken before the 101 goes out, so shutdown also waits for an upgrade still completing.
    let tracked = conn.sessions.tracker.token();
    let max = broker.max_packet_size();
    ws.protocols(["mqtt"])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let peer = PeerInfo {
                addr: conn.addr,
                transport: Transport::WebSocket,
                client_certs: conn.client_certs.clone(),
            };
            serve_connection(broker, WsByteStream::new(socket), peer).await;
            // The place and the tracker's count go last, once the session has let go of all.
            drop(permit);
            drop(tracked);
        })
        .into_response()
}

/// A WebSocket carrying MQTT in binary messages, as an `AsyncRead + AsyncWrite` stream.
/// An MQTT packet may span messages and a message may hold several packets, so reads just
/// concatenate message payloads.
pub struct WsByteStream {
    ws: WebSocket,
    /// The unread rest of the last message received.
    pending: Bytes,
}

impl WsByteStream {
    pub fn new(ws: WebSocket) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
        }
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl AsyncRead for WsByteStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                // MQTT over WebSocket is binary only (MQTT 3.1.1 section 6).
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io_err("text WebSocket message on an MQTT stream")))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
            }
        }
    }
}

impl AsyncWrite for WsByteStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_err)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_err)
    }
}
