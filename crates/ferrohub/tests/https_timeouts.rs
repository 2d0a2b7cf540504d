//! Time limits of the HTTPS listener over real TLS: connections that send no request, trickle a
//! head or a body, or idle after a response are closed; normal requests are not disturbed; past
//! the in-flight request limit, requests are refused at once with 429.

mod common;

use std::time::Duration;

use common::*;
use ferrohub::config::HttpsTimeouts;
use ferrohub_mqtt::QoS;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const HEADER: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(2);
const BODY: Duration = Duration::from_secs(1);
/// Bound on waiting for the server's close: the limit plus scheduling slack.
const CLOSE_WAIT: Duration = Duration::from_secs(6);

async fn hub() -> R<TestHub> {
    TestHub::start_with(|cfg| {
        cfg.https_timeouts = HttpsTimeouts {
            header: HEADER,
            idle: IDLE,
            body: BODY,
        };
    })
    .await
}

/// A TLS connection to the HTTPS port, handshake done.
async fn tls(hub: &TestHub) -> R<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(hub.https_addr()).await?;
    Ok(TlsConnector::from(client_tls_config(&hub.ca, None)?)
        .connect(ServerName::try_from(HOST)?, tcp)
        .await?)
}

/// Reads until the server closes (EOF or a reset); returns what arrived and when the close came.
/// Fails when the connection is still open after [`CLOSE_WAIT`].
async fn read_until_closed<S: AsyncRead + Unpin>(s: &mut S) -> R<(Vec<u8>, Instant)> {
    let mut got = Vec::new();
    let read = async {
        loop {
            match s.read_buf(&mut got).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(CLOSE_WAIT, read).await {
        Ok(at) => Ok((got, at)),
        Err(_) => Err(format!(
            "connection still open after {CLOSE_WAIT:?}; got {:?}",
            String::from_utf8_lossy(&got)
        )
        .into()),
    }
}

/// Reads one response with a `Content-Length` and returns its head.
async fn read_response(s: &mut TlsStream<TcpStream>) -> R<String> {
    let mut got = Vec::new();
    let read = async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(head);
                }
            }
            if s.read_buf(&mut got).await? == 0 {
                return Err("closed before a whole response".into());
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .map_err(|_| "no response in time")?
}

#[tokio::test]
async fn a_connection_that_sends_nothing_after_the_handshake_is_closed() -> TestResult {
    let hub = hub().await?;
    let mut s = tls(&hub).await?;
    let opened = Instant::now();
    let (got, closed) = read_until_closed(&mut s).await?;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(closed - opened >= HEADER - Duration::from_millis(100));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_connection_that_stalls_in_the_middle_of_a_head_is_closed() -> TestResult {
    let hub = hub().await?;
    let mut s = tls(&hub).await?;
    s.write_all(b"GET /devices?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    s.flush().await?;
    read_until_closed(&mut s).await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_head_trickled_a_line_at_a_time_is_cut_at_the_header_limit() -> TestResult {
    let hub = hub().await?;
    let mut s = tls(&hub).await?;
    let opened = Instant::now();
    s.write_all(b"GET /devices?api-version=2021-04-12 HTTP/1.1\r\n")
        .await?;
    s.flush().await?;
    // Each line well within the limit of the one before: only a limit on the whole head
    // catches this client.
    let mut lines = 0;
    let closed = loop {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(HEADER / 3, s.read(&mut byte)).await {
            Ok(_) => break Instant::now(),
            Err(_) if opened.elapsed() > CLOSE_WAIT => return Err("never closed".into()),
            Err(_) => {
                lines += 1;
                if s.write_all(format!("X-Line-{lines}: x\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break Instant::now();
                }
                let _ = s.flush().await;
            }
        }
    };
    assert!(closed - opened < HEADER * 3, "{:?}", closed - opened);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_limit_not_before() -> TestResult {
    let hub = hub().await?;
    let mut s = tls(&hub).await?;
    for _ in 0..2 {
        s.write_all(b"GET /no/such/route HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await?;
        s.flush().await?;
        let head = read_response(&mut s).await?;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    }
    let answered = Instant::now();
    let (got, closed) = read_until_closed(&mut s).await?;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // The idle limit, not the shorter header limit, applies between requests.
    assert!(
        closed - answered >= IDLE - Duration::from_millis(200),
        "{:?}",
        closed - answered
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_body_trickled_past_the_body_limit_is_refused_with_408() -> TestResult {
    let hub = hub().await?;
    let auth = owner_token(&hub)?;
    let mut s = tls(&hub).await?;
    s.write_all(
        format!(
            "PUT /devices/slow?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: {auth}\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n\r\n{{\"deviceId\":"
        )
        .as_bytes(),
    )
    .await?;
    s.flush().await?;
    let head = read_response(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("iothub-errorcode: argumentinvalid"),
        "{head}"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn requests_on_a_kept_alive_connection_work_within_the_limits() -> TestResult {
    let hub = hub().await?;
    hub.create_device("d1").await?;
    let before = hub.api.get("/devices/d1").await?;
    // reqwest keeps the connection alive between these.
    for _ in 0..3 {
        let d = hub.api.get("/devices/d1").await?;
        assert_eq!(d, before);
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_quiet_events_stream_outlives_the_idle_limit() -> TestResult {
    let hub = hub().await?;
    let mut resp = hub.api.stream("/events").await?;
    // Nothing is sent; a request in flight is not idle however quiet it is.
    match tokio::time::timeout(IDLE + HEADER * 2, resp.chunk()).await {
        Err(_) => {}
        Ok(r) => return Err(format!("the stream ended or sent: {r:?}").into()),
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_upgraded_websocket_is_left_to_its_mqtt_session() -> TestResult {
    let hub = hub().await?;
    let mut s = tls(&hub).await?;
    s.write_all(
        b"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await?;
    s.flush().await?;
    let head = read_response(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The MQTT session gives a client 30 s for its CONNECT; the HTTPS limits no longer apply.
    let mut byte = [0u8; 1];
    match tokio::time::timeout(IDLE + HEADER * 2, s.read(&mut byte)).await {
        Err(_) => {}
        Ok(r) => return Err(format!("the WebSocket was closed or sent: {r:?}").into()),
    }
    hub.stop().await;
    Ok(())
}

/// Idle HTTPS connections (up to the HTTPS cap) do not lock devices out: the MQTT listener has
/// its own cap and its own accept loop. 2,000 connections that complete TLS and send nothing
/// are held open (a header limit longer than the test) while a device connects and publishes.
#[tokio::test]
async fn two_thousand_idle_https_connections_do_not_lock_devices_out() -> TestResult {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    const IDLE_CONNECTIONS: usize = 2_000;
    let hub = TestHub::start_with(|cfg| {
        cfg.https_timeouts = HttpsTimeouts {
            header: Duration::from_secs(300),
            idle: Duration::from_secs(300),
            body: Duration::from_secs(300),
        };
    })
    .await?;
    let hub = &hub;
    let idle: Vec<TlsStream<TcpStream>> = stream::iter(0..IDLE_CONNECTIONS)
        .map(|_| tls(hub))
        .buffer_unordered(64)
        .try_collect()
        .await?;
    assert_eq!(idle.len(), IDLE_CONNECTIONS);

    let (key, _) = hub.create_device("dev1").await?;
    let device = async {
        let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
        c.publish_qos1(1, "devices/dev1/messages/events/", b"still serving")
            .await
    };
    tokio::time::timeout(Duration::from_secs(10), device)
        .await
        .map_err(|_| "the device could not connect and publish within 10 s")??;

    // The idle connections were all still held: one of them still answers a request.
    let mut probe = idle.into_iter().next().ok_or("no idle connection")?;
    probe
        .write_all(b"GET /nothing HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await?;
    let reply = read_response(&mut probe).await?;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    Ok(())
}

/// Past `https_max_requests` in progress, a request is answered 429 ThrottlingException with
/// Retry-After at once (nothing queued), and served again once a slot frees.
#[tokio::test]
async fn requests_past_the_in_flight_limit_get_429_with_retry_after_at_once() -> TestResult {
    let hub = TestHub::start_with(|cfg| cfg.https_max_requests = 1).await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[("$iothub/methods/POST/#", QoS::AtMostOnce)])
        .await?;
    // A method call holds the one slot until the device answers.
    let api = hub.api.clone();
    let call = tokio::spawn(async move {
        api.post(
            "/twins/dev1/methods",
            &serde_json::json!({"methodName": "hold", "responseTimeoutInSeconds": 30}),
        )
        .await
    });
    let request = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("no method request")?;
    let refused = rest(&hub, reqwest::Method::GET, "/devices/dev1", None).await?;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(
        refused.header("iothub-errorcode"),
        Some("ThrottlingException")
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.body["Message"]
        .as_str()
        .is_some_and(|m| m.starts_with("ErrorCode:ThrottlingException;")));

    let rid = request
        .topic
        .split_once("$rid=")
        .map(|(_, r)| r.to_string())
        .ok_or("no $rid")?;
    c.publish_qos1(2, &format!("$iothub/methods/res/200/?$rid={rid}"), b"{}")
        .await?;
    call.await??;
    let served = rest(&hub, reqwest::Method::GET, "/devices/dev1", None).await?;
    assert_eq!(served.status, 200, "{}", served.body);
    hub.stop().await;
    Ok(())
}

/// A socket that opens and then sends only half a TLS ClientHello is closed at the handshake
/// limit, on the device listener and the HTTPS one alike.
#[tokio::test]
async fn a_tls_handshake_that_stalls_is_cut_at_the_handshake_limit() -> TestResult {
    let hub = TestHub::start_with(|cfg| cfg.tls_handshake_timeout = Duration::from_secs(1)).await?;
    for addr in [hub.mqtt_addr(), hub.https_addr()] {
        let mut s = TcpStream::connect(addr).await?;
        // A handshake record header announcing 512 bytes, and 4 of them.
        s.write_all(&[22, 3, 1, 2, 0, 1, 0, 1, 252]).await?;
        let opened = Instant::now();
        let (_, closed) = read_until_closed(&mut s)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let took = closed - opened;
        assert!(
            took >= Duration::from_millis(900),
            "{addr}: closed after {took:?}, before the limit"
        );
    }
    hub.stop().await;
    Ok(())
}
