//! MQTT over WebSocket at `/$iothub/websocket` on the HTTPS port: subprotocol echo, query
//! strings ignored, and the same IoT Hub rules as over plain TLS.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};

use common::*;
use ferrohub_mqtt::{ConnectReturnCode, Packet};
use futures_util::{Sink, Stream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Client-side byte stream over a WebSocket, the mirror of the server's adapter.
struct WsIo<S> {
    ws: WebSocketStream<S>,
    pending: bytes::Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(Message::Binary(b)))) => self.pending = b,
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.ws).poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            Poll::Pending => return Poll::Pending,
        }
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(bytes::Bytes::copy_from_slice(buf)))
            .map_err(std::io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(std::io::Error::other)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(std::io::Error::other)
    }
}

/// Opens the WebSocket; returns the client and the subprotocol the server chose.
async fn ws_client(hub: &TestHub, path: &str) -> R<(MqttClient, Option<String>)> {
    let tcp = tokio::net::TcpStream::connect(hub.https_addr()).await?;
    let tls = tokio_rustls::TlsConnector::from(client_tls_config(&hub.ca, None)?)
        .connect(ServerName::try_from(HOST)?, tcp)
        .await?;
    let mut req =
        format!("wss://{HOST}:{}{path}", hub.https_addr().port()).into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
    let (ws, resp) = tokio_tungstenite::client_async(req, tls).await?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((
        MqttClient::over(Box::new(WsIo {
            ws,
            pending: bytes::Bytes::new(),
        })),
        proto,
    ))
}

#[tokio::test]
async fn mqtt_over_websocket_echoes_the_subprotocol_and_applies_the_same_rules() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    for path in [
        "/$iothub/websocket",
        "/$iothub/websocket?iothub-no-client-cert=true",
    ] {
        let (mut c, proto) = ws_client(&hub, path).await?;
        assert_eq!(proto.as_deref(), Some("mqtt"), "{path}");
        let t = hub.device_token("dev1", &key);
        assert_eq!(
            c.connect(connect_packet("dev1", Some(&t), false, 60))
                .await?
                .1,
            ConnectReturnCode::Accepted
        );
        c.publish_qos1(1, "devices/dev1/messages/events/a=b", b"hello")
            .await?;
        c.send(&Packet::PingReq).await?;
        assert_eq!(c.recv().await?, Some(Packet::PingResp));
        c.send(&Packet::Disconnect).await?;
    }
    let (mut c, _) = ws_client(&hub, "/$iothub/websocket").await?;
    let bad = token_for(&format!("{HOST}/devices/dev1"), &key, -5, None);
    assert_eq!(
        c.connect(connect_packet("dev1", Some(&bad), true, 60))
            .await?
            .1,
        ConnectReturnCode::BadUserNameOrPassword
    );
    let (mut c, _) = ws_client(&hub, "/$iothub/websocket").await?;
    c.send_raw(&[0xff, 0x00]).await?;
    assert_eq!(c.recv().await?, None, "garbage over WebSocket closes it");
    hub.stop().await;
    Ok(())
}
