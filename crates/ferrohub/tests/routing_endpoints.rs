//! External routing endpoints end to end, against real peers: a webhook receiver (axum on an
//! ephemeral loopback port, plain HTTP, which the hub allows only to loopback hosts) that fails
//! on demand, and a real `nats-server -js` that is killed and restarted mid-stream. Devices
//! publish over real TLS; every PUBACKed message must reach the peer, in each device's order,
//! through failures and a hub restart; a dead endpoint must not slow ingest.
//!
//! Waits are for a state (a health status, a count at the receiver) with a deadline, never
//! sleeps standing in for one.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn route_all(hub: &TestHub, endpoints: &[&str]) -> TestResult {
    put_ok(
        hub,
        "/ferrohub/routing/routes/all",
        json!({"source": "DeviceMessages", "condition": "true", "endpointNames": endpoints}),
    )
    .await
}

/// Publishes telemetry `mid` as `device` with an application property and JSON content type.
async fn send(c: &mut MqttClient, device: &str, pid: u16, mid: &str) -> TestResult {
    c.publish_qos1(
        pid,
        &format!(
            "devices/{device}/messages/events/%24.mid={mid}&%24.ct=application%2Fjson&%24.ce=utf-8&level=high"
        ),
        format!("{{\"n\":\"{mid}\"}}").as_bytes(),
    )
    .await
}

/// Polls an endpoint's health until `want` holds, or fails with the last one seen.
async fn wait_health(hub: &TestHub, name: &str, want: impl Fn(&Value) -> bool) -> R<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let a = rest(
            hub,
            Method::GET,
            &format!("/ferrohub/routing/endpoints/{name}/health"),
            None,
        )
        .await?;
        if a.status == 200 && want(&a.body) {
            return Ok(a.body);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "health of {name} never as wanted; last {} {}",
                a.status, a.body
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request the receiver acknowledged.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver that answers 500 while `failing` is set and records what it answered 200.
struct Receiver {
    addr: SocketAddr,
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<Received>>>,
    changed: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(failing: bool) -> R<Self> {
        let failing = Arc::new(AtomicBool::new(failing));
        let refused = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (f, r, g, c) = (
            failing.clone(),
            refused.clone(),
            got.clone(),
            changed.clone(),
        );
        let app = axum::Router::new().route(
            "/in",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (f, r, g, c) = (f.clone(), r.clone(), g.clone(), c.clone());
                    async move {
                        if f.load(Ordering::SeqCst) {
                            r.fetch_add(1, Ordering::SeqCst);
                            return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        let headers = headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_string(),
                                    v.to_str().unwrap_or("?").to_string(),
                                )
                            })
                            .collect();
                        g.lock().unwrap_or_else(|e| e.into_inner()).push(Received {
                            headers,
                            body: body.to_vec(),
                        });
                        c.notify_waiters();
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            failing,
            refused,
            got,
            changed,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/in", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `n` requests were acknowledged.
    async fn wait_for(&self, n: usize) -> R<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            let got = self.received();
            if got.len() >= n {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!("the receiver got {} of {n}", got.len()).into());
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mids(got: &[Received]) -> Vec<String> {
    got.iter()
        .map(|r| r.headers.get("message-id").cloned().unwrap_or_default())
        .collect()
}

/// The message ids of `device`, in arrival order.
fn of_device(got: &[Received], device: &str) -> Vec<String> {
    got.iter()
        .filter(|r| {
            r.headers
                .get("iothub-connection-device-id")
                .map(String::as_str)
                == Some(device)
        })
        .map(|r| r.headers.get("message-id").cloned().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn webhook_delivers_everything_in_order_through_failures_and_a_restart() -> TestResult {
    let rx = Receiver::start(true).await?;
    let mut hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    let (k2, _) = hub.create_device("dev2").await?;
    put_ok(
        &hub,
        "/ferrohub/routing/endpoints/hook",
        json!({"type": "webhook", "url": rx.url(), "timeoutSeconds": 5,
               "headers": {"Authorization": "Bearer test"}}),
    )
    .await?;
    put_ok(
        &hub,
        "/ferrohub/routing/enrichments/site",
        json!({"value": "plant-7", "endpointNames": ["hook"]}),
    )
    .await?;
    route_all(&hub, &["hook", "events"]).await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    let (mut c2, _) = hub.connect_device("dev2", &k2, true).await?;
    for i in 0..5u16 {
        send(&mut c1, "dev1", i + 1, &format!("a{i}")).await?;
        send(&mut c2, "dev2", i + 1, &format!("b{i}")).await?;
    }
    // The receiver refuses: the endpoint retries and says so.
    let h = wait_health(&hub, "hook", |h| h["status"] == "unhealthy").await?;
    assert!(
        h["lastError"].as_str().unwrap_or_default().contains("500"),
        "{h}"
    );
    assert!(rx.refused.load(Ordering::SeqCst) >= 1);
    rx.failing.store(false, Ordering::SeqCst);
    let got = rx.wait_for(10).await?;
    // The receiver records a request before the hub has its answer: wait for the count.
    wait_health(&hub, "hook", |h| {
        h["status"] == "healthy" && h["delivered"] == 10
    })
    .await?;
    assert_eq!(of_device(&got, "dev1"), ["a0", "a1", "a2", "a3", "a4"]);
    assert_eq!(of_device(&got, "dev2"), ["b0", "b1", "b2", "b3", "b4"]);
    assert_eq!(got.len(), 10, "nothing twice: {:?}", mids(&got));
    // Body as sent; system properties under the webhook's (Event Grid's) names; application
    // properties and enrichments as iothub-app-*; the static header too.
    let first = &got[0];
    assert_eq!(first.body, br#"{"n":"a0"}"#);
    let h = &first.headers;
    assert_eq!(
        h.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        h.get("iothub-content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        h.get("iothub-content-encoding").map(String::as_str),
        Some("utf-8")
    );
    assert_eq!(
        h.get("iothub-connection-device-id").map(String::as_str),
        Some("dev1")
    );
    assert!(h.contains_key("iothub-enqueuedtime"), "{h:?}");
    assert!(h.contains_key("iothub-connection-auth-method"), "{h:?}");
    assert_eq!(h.get("iothub-app-level").map(String::as_str), Some("high"));
    assert_eq!(
        h.get("iothub-app-site").map(String::as_str),
        Some("plant-7")
    );
    assert_eq!(
        h.get("authorization").map(String::as_str),
        Some("Bearer test")
    );

    // Mid-stream restart: messages PUBACKed while the receiver fails wait in the endpoint's
    // stream, and the restarted hub resumes from the cursor (a clean stop redelivers nothing).
    rx.failing.store(true, Ordering::SeqCst);
    for i in 5..8u16 {
        send(&mut c1, "dev1", i + 1, &format!("a{i}")).await?;
    }
    wait_health(&hub, "hook", |h| h["status"] == "unhealthy").await?;
    drop((c1, c2));
    hub.restart().await?;
    rx.failing.store(false, Ordering::SeqCst);
    let got = rx.wait_for(13).await?;
    wait_health(&hub, "hook", |h| {
        h["status"] == "healthy" && h["delivered"] == 3
    })
    .await?;
    assert_eq!(
        of_device(&got, "dev1"),
        ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"]
    );
    assert_eq!(got.len(), 13, "nothing redelivered: {:?}", mids(&got));
    // The built-in endpoint got its copies as well.
    let events = read_events(&hub, "from=start", 13, Duration::from_secs(5)).await?;
    assert_eq!(events.len(), 13);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn webhook_header_values_are_redacted_and_kept_when_put_back() -> TestResult {
    let rx = Receiver::start(false).await?;
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    put_ok(
        &hub,
        "/ferrohub/routing/endpoints/hook",
        json!({"type": "webhook", "url": rx.url(), "headers": {"Authorization": "Bearer secret"}}),
    )
    .await?;
    let shown = rest(&hub, Method::GET, "/ferrohub/routing/endpoints/hook", None).await?;
    assert_eq!(shown.body["headers"]["Authorization"], "<redacted>");
    let all = rest(&hub, Method::GET, "/ferrohub/routing", None).await?;
    assert_eq!(
        all.body["endpoints"][0]["headers"]["Authorization"],
        "<redacted>"
    );
    assert!(!all.body.to_string().contains("Bearer secret"));
    // A read-modify-write with the redacted value keeps the secret.
    let mut back = shown.body.clone();
    back["timeoutSeconds"] = json!(7);
    put_ok(&hub, "/ferrohub/routing/endpoints/hook", back).await?;
    route_all(&hub, &["hook"]).await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    send(&mut c1, "dev1", 1, "m0").await?;
    let got = rx.wait_for(1).await?;
    assert_eq!(
        got[0].headers.get("authorization").map(String::as_str),
        Some("Bearer secret")
    );
    // With nothing stored, the marker is not a value.
    let a = rest(
        &hub,
        Method::PUT,
        "/ferrohub/routing/endpoints/other",
        Some(&json!({"type": "webhook", "url": rx.url(), "headers": {"X-Key": "<redacted>"}})),
    )
    .await?;
    assert_eq!(a.status, 400, "{}", a.body);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn webhook_batches_are_json_arrays() -> TestResult {
    let rx = Receiver::start(true).await?;
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    put_ok(
        &hub,
        "/ferrohub/routing/endpoints/hook",
        json!({"type": "webhook", "url": rx.url(), "batchSize": 10}),
    )
    .await?;
    route_all(&hub, &["hook"]).await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    for i in 0..4u16 {
        send(&mut c1, "dev1", i + 1, &format!("m{i}")).await?;
    }
    // Held back until all four are queued, so they leave in one batch.
    wait_health(&hub, "hook", |h| h["status"] == "unhealthy").await?;
    rx.failing.store(false, Ordering::SeqCst);
    let got = rx.wait_for(1).await?;
    assert_eq!(
        got[0].headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let batch: Value = serde_json::from_slice(&got[0].body)?;
    let ids: Vec<&str> = batch
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["systemProperties"]["message-id"].as_str().unwrap_or("?"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids, ["m0", "m1", "m2", "m3"]);
    assert_eq!(batch[0]["body"], r#"{"n":"m0"}"#);
    assert_eq!(batch[0]["properties"]["level"], "high");
    assert_eq!(
        batch[0]["systemProperties"]["iothub-connection-device-id"],
        "dev1"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_dead_endpoint_does_not_slow_ingest_and_its_messages_are_dead_lettered() -> TestResult {
    // A port nobody listens on: bound, then let go.
    let dead_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    put_ok(
        &hub,
        "/ferrohub/routing/endpoints/gone",
        json!({"type": "webhook", "url": format!("http://{dead_addr}/in"),
               "timeoutSeconds": 1, "deadAfterSeconds": 1, "retentionSeconds": 2}),
    )
    .await?;
    route_all(&hub, &["gone", "events"]).await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    let started = Instant::now();
    for i in 0..50u16 {
        send(&mut c1, "dev1", i + 1, &format!("m{i}")).await?;
    }
    // 50 PUBACKs do not wait on the endpoint (a single send would take its 1 s timeout or a
    // refused connection; ingest only appends to the endpoint's stream).
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "ingest took {took:?}");
    let events = read_events(&hub, "from=start", 50, Duration::from_secs(5)).await?;
    assert_eq!(events.len(), 50);
    let h = wait_health(&hub, "gone", |h| h["status"] == "dead").await?;
    assert!(h["lastError"].is_string(), "{h}");
    // Past their retention, the undelivered messages leave for the dead-letter stream, with
    // the reason, readable like any endpoint stream.
    let h = wait_health(&hub, "gone", |h| h["deadLettered"] == 50).await?;
    assert_eq!(h["delivered"], 0);
    let dl = read_events(
        &hub,
        "from=start&endpoint=gone.deadletter",
        50,
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(dl.len(), 50);
    assert_eq!(dl[0]["systemProperties"]["message-id"], "m0");
    let reason = dl[0]["systemProperties"]["iothub-deadletter-reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("retention"), "{reason}");
    // The routing resource lists the health too.
    let view = rest(&hub, Method::GET, "/ferrohub/routing", None).await?;
    assert_eq!(view.body["health"][0]["name"], "gone");
    assert_eq!(view.body["health"][0]["status"], "dead");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_external_endpoints_are_refused() -> TestResult {
    let hub = TestHub::start().await?;
    for (body, needle) in [
        (
            json!({"type": "webhook", "url": "http://example.com/x"}),
            "loopback",
        ),
        (json!({"type": "webhook", "url": "ftp://x/"}), "scheme"),
        (
            json!({"type": "webhook", "url": "https://x/", "batchSize": 0}),
            "batchSize",
        ),
        (
            json!({"type": "webhook", "url": "https://x/", "headers": {"Host": "y"}}),
            "set by the hub",
        ),
        (
            json!({"type": "nats", "url": "nats://127.0.0.1:4222", "subject": "a.*"}),
            "wildcards",
        ),
        (
            json!({"type": "nats", "url": "http://x", "subject": "a"}),
            "scheme",
        ),
        (
            json!({"type": "nats", "url": "nats://x", "subject": "a", "stream": "a.b"}),
            "stream",
        ),
    ] {
        let a = rest(
            &hub,
            Method::PUT,
            "/ferrohub/routing/endpoints/x",
            Some(&body),
        )
        .await?;
        let msg = a.body["Message"].as_str().unwrap_or_default();
        assert!(
            a.status == 400 && msg.contains(needle),
            "{body}: {} {msg}",
            a.status
        );
    }
    put_ok(
        &hub,
        "/ferrohub/routing/endpoints/x",
        json!({"type": "stream"}),
    )
    .await?;
    let a = rest(
        &hub,
        Method::PUT,
        "/ferrohub/routing/endpoints/x",
        Some(&json!({"type": "webhook", "url": "https://x/"})),
    )
    .await?;
    assert_eq!(a.status, 409, "{}", a.body);
    hub.stop().await;
    Ok(())
}

/// `nats-server`, from PATH or where Debian puts it.
fn nats_server_binary() -> R<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/sbin/nats-server"));
    candidates.push(PathBuf::from("/usr/bin/nats-server"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "nats-server is not installed: run scripts/test.sh (which installs it) or \
             `apt-get install -y nats-server`"
            .into()
    })
}

/// A real `nats-server -js` on a fixed port with its store in a temp directory; killed on drop.
struct NatsServer {
    child: tokio::process::Child,
}

impl NatsServer {
    async fn start(port: u16, store: &std::path::Path) -> R<Self> {
        let child = tokio::process::Command::new(nats_server_binary()?)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("nats-server did not listen within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child })
    }

    async fn kill(mut self) -> TestResult {
        self.child.kill().await?;
        Ok(())
    }
}

/// Every message of the JetStream stream, read with a fresh pull consumer from the start.
async fn stream_contents(port: u16, want: usize) -> R<Vec<async_nats::jetstream::Message>> {
    let client = async_nats::connect(format!("nats://127.0.0.1:{port}")).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("TELEMETRY").await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    while out.len() < want && Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(want - out.len())
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m?;
            m.ack().await?;
            out.push(m);
        }
    }
    Ok(out)
}

fn nats_header<'a>(m: &'a async_nats::jetstream::Message, name: &str) -> Option<&'a str> {
    m.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn nats_jetstream_gets_every_message_with_headers_across_a_server_restart() -> TestResult {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let store = tempfile::tempdir()?;
    let nats = NatsServer::start(port, store.path()).await?;
    {
        let client = async_nats::connect(format!("nats://127.0.0.1:{port}")).await?;
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "TELEMETRY".into(),
            subjects: vec!["iot.>".into()],
            ..Default::default()
        })
        .await?;
    }
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    put_ok(
        &hub,
        "/ferrohub/routing/endpoints/bus",
        json!({"type": "nats", "url": format!("nats://127.0.0.1:{port}"),
               "subject": "iot.telemetry", "stream": "TELEMETRY", "timeoutSeconds": 2}),
    )
    .await?;
    route_all(&hub, &["bus"]).await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    for i in 0..5u16 {
        send(&mut c1, "dev1", i + 1, &format!("n{i}")).await?;
    }
    wait_health(&hub, "bus", |h| h["delivered"] == 5).await?;
    let got = stream_contents(port, 5).await?;
    let ids: Vec<_> = got.iter().map(|m| nats_header(m, "message-id")).collect();
    assert_eq!(
        ids,
        [Some("n0"), Some("n1"), Some("n2"), Some("n3"), Some("n4")]
    );
    let m = &got[0];
    assert_eq!(m.subject.as_str(), "iot.telemetry");
    assert_eq!(&m.payload[..], br#"{"n":"n0"}"#);
    assert_eq!(nats_header(m, "iothub-connection-device-id"), Some("dev1"));
    assert_eq!(nats_header(m, "content-type"), Some("application/json"));
    assert_eq!(nats_header(m, "level"), Some("high"));
    assert!(nats_header(m, "iothub-enqueuedtime").is_some());

    // The server goes away mid-stream: ingest goes on, the endpoint retries.
    nats.kill().await?;
    for i in 5..10u16 {
        send(&mut c1, "dev1", i + 1, &format!("n{i}")).await?;
    }
    wait_health(&hub, "bus", |h| h["status"] == "unhealthy").await?;
    let _nats = NatsServer::start(port, store.path()).await?;
    wait_health(&hub, "bus", |h| {
        h["status"] == "healthy" && h["delivered"] == 10
    })
    .await?;
    let got = stream_contents(port, 10).await?;
    let ids: Vec<String> = got
        .iter()
        .map(|m| nats_header(m, "message-id").unwrap_or("?").to_string())
        .collect();
    let want: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    assert_eq!(ids, want, "every message once, in order");
    hub.stop().await;
    Ok(())
}

/// An HTTPS receiver with a certificate for `localhost` from a test CA (returned as PEM),
/// acknowledging every request with 204 and keeping the message ids.
async fn https_receiver() -> R<(
    SocketAddr,
    String,
    Arc<Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let cert =
        CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &ca, &ca_key)?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, g) = (acceptor.clone(), g.clone());
            tokio::spawn(async move {
                // A client that refuses our certificate ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        async move {
                            if let Some(id) = req
                                .headers()
                                .get("message-id")
                                .and_then(|v| v.to_str().ok())
                            {
                                g.lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(id.to_string());
                            }
                            hyper::Response::builder()
                                .status(204)
                                .body(axum::body::Body::empty())
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((addr, ca.pem(), got, task))
}

#[tokio::test]
async fn https_webhook_trusts_its_ca_file_and_the_cli_shows_health() -> TestResult {
    let (addr, ca_pem, got, task) = https_receiver().await?;
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    let ca_file = hub.dir.path().join("receiver-ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;
    let dir = hub.dir.path().to_path_buf();
    let url = format!("https://localhost:{}/in", addr.port());
    let cli = move |args: Vec<String>| {
        let dir = dir.clone();
        async move {
            let (okay, out, err) =
                tokio::task::spawn_blocking(move || ferrohub_cli(&dir, &args)).await??;
            if !okay {
                return Err(format!("ferrohub failed: {err}").into());
            }
            R::Ok(out)
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    cli(args(&[
        "endpoint",
        "add",
        "sec",
        "--type",
        "webhook",
        "--url",
        &url,
        "--ca",
        &ca_file.to_string_lossy(),
        "--header",
        "X-Token=abc",
        "--timeout-secs",
        "5",
    ]))
    .await?;
    // The same receiver without its CA: the system's roots do not know it.
    put_ok(
        &hub,
        "/ferrohub/routing/endpoints/untrusting",
        json!({"type": "webhook", "url": url, "timeoutSeconds": 5}),
    )
    .await?;
    cli(args(&[
        "route",
        "add",
        "all",
        "--endpoint",
        "sec,untrusting",
    ]))
    .await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    send(&mut c1, "dev1", 1, "s0").await?;
    send(&mut c1, "dev1", 2, "s1").await?;
    wait_health(&hub, "sec", |h| h["delivered"] == 2).await?;
    assert_eq!(*got.lock().unwrap_or_else(|e| e.into_inner()), ["s0", "s1"]);
    let h = wait_health(&hub, "untrusting", |h| h["status"] == "unhealthy").await?;
    assert_eq!(h["delivered"], 0, "{h}");
    let list = cli(args(&["endpoint", "list"])).await?;
    let line = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("sec ").contains("health healthy delivered 2"),
        "{list}"
    );
    assert!(line("untrusting").contains("health unhealthy"), "{list}");
    hub.stop().await;
    task.abort();
    Ok(())
}
