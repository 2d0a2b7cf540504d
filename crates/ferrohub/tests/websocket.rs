//! MQTT over WebSocket at `/$iothub/websocket` on the HTTPS port: subprotocol echo, query
//! strings ignored, the same IoT Hub rules as over plain TLS, the same connection cap, and
//! shutdown waiting for the sessions.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// Opens a WebSocket asking for `protocol`; returns it as a byte stream and the
/// subprotocol the server chose.
async fn ws_stream(hub: &TestHub, path: &str, protocol: &str) -> R<(Box<dyn Io>, Option<String>)> {
    let tcp = tokio::net::TcpStream::connect(hub.https_addr()).await?;
    let tls = tokio_rustls::TlsConnector::from(client_tls_config(&hub.ca, None)?)
        .connect(ServerName::try_from(HOST)?, tcp)
        .await?;
    let mut req =
        format!("wss://{HOST}:{}{path}", hub.https_addr().port()).into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse()?);
    let (ws, resp) = tokio_tungstenite::client_async(req, tls).await?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((
        Box::new(WsIo {
            ws,
            pending: bytes::Bytes::new(),
        }),
        proto,
    ))
}

#[tokio::test]
async fn amqp_runs_over_websocket_at_both_paths_by_subprotocol() -> TestResult {
    use common::amqp::{AmqpClient, Sasl};
    use ferrohub_amqp::Value;
    let hub = TestHub::start().await?;
    for path in ["/$servicebus/websocket", "/$iothub/websocket"] {
        let (stream, proto) = ws_stream(&hub, path, "AMQPWSB10").await?;
        assert_eq!(proto.as_deref(), Some("AMQPWSB10"), "{path}");
        let mut c = AmqpClient::connect_over(stream, Sasl::Anonymous, 65_536).await?;
        let reply = c
            .management(vec![
                (Value::str("operation"), Value::str("READ")),
                (Value::str("type"), Value::str("com.microsoft:eventhub")),
                (Value::str("name"), Value::str("localhost")),
            ])
            .await?;
        // No token: refused, but answered in AMQP over the WebSocket.
        assert_eq!(common::amqp::status_of(&reply)?, 401, "{path}");
    }
    // MQTT keeps its subprotocol at /$iothub/websocket.
    let (_, proto) = ws_stream(&hub, "/$iothub/websocket", "mqtt").await?;
    assert_eq!(proto.as_deref(), Some("mqtt"));
    hub.stop().await;
    Ok(())
}

/// Opens an MQTT WebSocket; returns the client and the subprotocol the server chose.
async fn ws_client(hub: &TestHub, path: &str) -> R<(MqttClient, Option<String>)> {
    let (stream, proto) = ws_stream(hub, path, "mqtt").await?;
    Ok((MqttClient::over(stream), proto))
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

const PATH: &str = "/$iothub/websocket";

async fn ws_connect(hub: &TestHub, c: &mut MqttClient, id: &str, key: &str) -> TestResult {
    let t = hub.device_token(id, key);
    match c.connect(connect_packet(id, Some(&t), true, 60)).await? {
        (_, ConnectReturnCode::Accepted) => Ok(()),
        (_, code) => Err(format!("CONNACK {code:?}").into()),
    }
}

/// Opens the WebSocket once the hub has room for it. The place of a connection that just
/// closed frees as the server finishes closing it, a moment after the client saw the close,
/// so a refusal (503) is retried, as a client honouring Retry-After would, only sooner.
async fn ws_client_admitted(hub: &TestHub) -> R<MqttClient> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match ws_client(hub, PATH).await {
            Ok((c, _)) => return Ok(c),
            Err(e) if e.to_string().contains("503") && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test]
async fn websocket_sessions_count_against_the_same_connection_cap_as_tls() -> TestResult {
    let hub = TestHub::start_with(|cfg| cfg.max_connections = 2).await?;
    let mut keys = std::collections::HashMap::new();
    for id in ["tls1", "tls2", "tls3", "ws1"] {
        keys.insert(id, hub.create_device(id).await?.0);
    }
    let (mut tls1, _) = hub.connect_device("tls1", &keys["tls1"], true).await?;
    let (mut tls2, _) = hub.connect_device("tls2", &keys["tls2"], true).await?;

    // Full: the upgrade is refused with 503 (the REST API itself stays reachable).
    let refused = ws_client(&hub, PATH)
        .await
        .err()
        .ok_or("a WebSocket session was admitted past the cap")?;
    assert!(refused.to_string().contains("503"), "{refused}");
    hub.api.get("/devices/tls1").await?;

    // A TLS device leaves; its place goes to the WebSocket session.
    tls1.send(&Packet::Disconnect).await?;
    tls1.expect_closed().await?;
    let mut ws = ws_client_admitted(&hub).await?;
    ws_connect(&hub, &mut ws, "ws1", &keys["ws1"]).await?;

    // The session holds its place for its whole life: a TLS device now waits for it.
    let mut waiting = Box::pin(hub.connect_device("tls3", &keys["tls3"], true));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a TLS connection was served while a WebSocket session held the last place"
    );
    ws.send(&Packet::PingReq).await?;
    assert_eq!(ws.recv().await?, Some(Packet::PingResp));
    ws.send(&Packet::Disconnect).await?;
    ws.expect_closed().await?;
    let (mut tls3, _) = tokio::time::timeout(WAIT, waiting)
        .await
        .map_err(|_| "the TLS device did not get the place the WebSocket session freed")??;
    for c in [&mut tls2, &mut tls3] {
        c.send(&Packet::PingReq).await?;
        assert_eq!(c.recv().await?, Some(Packet::PingResp));
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn amqp_over_websocket_counts_against_the_device_cap_and_amqp_over_tls_has_its_own(
) -> TestResult {
    use common::amqp::{AmqpClient, Sasl};
    let hub = TestHub::start_with(|cfg| {
        cfg.max_connections = 1;
        cfg.amqp_max_connections = 1;
    })
    .await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut dev, _) = hub.connect_device("dev1", &key, true).await?;
    // The device holds the one device place: an AMQP WebSocket upgrade is refused with 503.
    let refused = ws_stream(&hub, "/$servicebus/websocket", "AMQPWSB10")
        .await
        .err()
        .ok_or("an AMQP WebSocket session was admitted past the device cap")?;
    assert!(refused.to_string().contains("503"), "{refused}");

    // AMQP over TLS has its own cap, untouched by the device: one connection gets in, the
    // next waits until it goes.
    let first = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    let mut second = Box::pin(AmqpClient::connect(&hub, Sasl::Anonymous, 65_536));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut second)
            .await
            .is_err(),
        "a second AMQP connection was served past the AMQP cap"
    );
    drop(first);
    tokio::time::timeout(WAIT, second)
        .await
        .map_err(|_| "the waiting AMQP connection did not get the freed place")??;
    dev.send(&Packet::PingReq).await?;
    assert_eq!(dev.recv().await?, Some(Packet::PingResp));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_websocket_sessions_and_waits_for_them() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut connected, _) = ws_client(&hub, PATH).await?;
    ws_connect(&hub, &mut connected, "dev1", &key).await?;
    // Upgraded but silent: no CONNECT yet.
    let (mut silent, _) = ws_client(&hub, PATH).await?;

    let broker = Arc::downgrade(&hub.server().broker);
    let server_hub = hub.server().hub.clone();
    hub.stop().await;
    // Every connection task holds the broker: none may outlive shutdown.
    assert!(
        broker.upgrade().is_none(),
        "a WebSocket session was still running when shutdown returned"
    );
    let presence = server_hub
        .presence
        .get(&ferrohub_iothub::Identity::device("dev1"));
    assert_eq!(
        presence.map(|p| p.connected),
        Some(false),
        "the session's disconnect was handled before shutdown returned"
    );
    assert_eq!(connected.recv().await?, None);
    assert_eq!(silent.recv().await?, None);
    Ok(())
}

/// A device provisions itself over MQTT on WebSocket too (the Python SDK's `websockets=True`
/// takes the same `/$iothub/websocket` path), and the PUBACK and response may come in either
/// order.
#[tokio::test]
async fn provisioning_runs_over_websocket() -> TestResult {
    use ferrohub_mqtt::{Connect, QoS};
    use serde_json::{json, Value};
    let hub = TestHub::start().await?;
    let e = hub
        .api
        .put(
            "/enrollments/ws-dev",
            &json!({"registrationId": "ws-dev", "attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await?;
    let key = e["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .ok_or("no key")?
        .to_string();
    let scope = hub.server().info.dps_id_scope.clone();
    let (mut c, _) = ws_client(&hub, "/$iothub/websocket").await?;
    let token = token_for(&format!("{scope}/registrations/ws-dev"), &key, 3600, None);
    let ack = c
        .connect(Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session: true,
            keep_alive: 60,
            client_id: "ws-dev".into(),
            will: None,
            username: Some(format!(
                "{scope}/registrations/ws-dev/api-version=2019-03-31"
            )),
            password: Some(bytes::Bytes::from(token)),
        }))
        .await?;
    assert_eq!(ack.1, ConnectReturnCode::Accepted);
    c.subscribe(1, &[("$dps/registrations/res/#", QoS::AtLeastOnce)])
        .await?;

    /// Publishes at QoS 1; returns the response, whichever of it and the PUBACK comes first.
    async fn exchange(
        c: &mut MqttClient,
        pid: u16,
        topic: String,
        body: &[u8],
    ) -> R<ferrohub_mqtt::Publish> {
        c.send(&publish(&topic, body, QoS::AtLeastOnce, pid))
            .await?;
        let (mut acked, mut answer) = (false, None);
        while !(acked && answer.is_some()) {
            match c.recv().await? {
                Some(Packet::PubAck(id)) if id == pid => acked = true,
                Some(Packet::Publish(p)) if answer.is_none() => answer = Some(p),
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
        answer.ok_or_else(|| "no response".into())
    }
    let p = exchange(
        &mut c,
        2,
        "$dps/registrations/PUT/iotdps-register/?$rid=1".into(),
        br#"{"registrationId":"ws-dev"}"#,
    )
    .await?;
    assert!(
        p.topic
            .starts_with("$dps/registrations/res/202/?$rid=1&retry-after="),
        "{}",
        p.topic
    );
    let body: Value = serde_json::from_slice(&p.payload)?;
    let op = body["operationId"]
        .as_str()
        .ok_or("no operationId")?
        .to_string();
    let p = exchange(
        &mut c,
        3,
        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={op}"),
        b" ",
    )
    .await?;
    assert_eq!(p.topic, "$dps/registrations/res/200/?$rid=2");
    let body: Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["deviceId"], "ws-dev");
    hub.stop().await;
    Ok(())
}
