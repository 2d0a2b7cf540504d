//! Test harness: a real hub on loopback (random ports, real TLS, real SQLite in a temp dir),
//! a raw MQTT-over-TLS client built on the project's codec, and REST helpers.
#![allow(dead_code)]

pub mod amqp;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrohub::cli::ApiClient;
use ferrohub::config::ServerConfig;
use ferrohub::server::{start, RunningServer};
use ferrohub_iothub::sas::generate_token;
use ferrohub_iothub::ConnectionString;
use ferrohub_mqtt::{decode, encode, Connect, ConnectReturnCode, Packet, Publish, QoS, Subscribe};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs the real `ferrohub` binary as a user would, with `args` and `--data-dir`, finding the
/// hub through its data directory only (no connection string or CA from the caller's
/// environment): (succeeded, stdout, stderr).
pub fn ferrohub_cli<S: AsRef<std::ffi::OsStr>>(
    data_dir: &Path,
    args: &[S],
) -> R<(bool, String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrohub"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("FERROHUB_CONNECTION_STRING")
        .env_remove("FERROHUB_CA_FILE")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

pub const HOST: &str = "localhost";
/// How long a test waits for a packet that should come.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestHub {
    pub dir: tempfile::TempDir,
    pub server: Option<RunningServer>,
    pub api: ApiClient,
    pub ca: PathBuf,
    /// Settings changed from the defaults, applied again on restart.
    tweak: fn(&mut ServerConfig),
}

pub fn config(dir: &Path) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir);
    cfg.mqtt_bind = "127.0.0.1:0".parse().expect("literal address");
    cfg.https_bind = "127.0.0.1:0".parse().expect("literal address");
    cfg.amqp_bind = "127.0.0.1:0".parse().expect("literal address");
    // Off: every test hub would contend for one port; tests/metrics.rs turns it on.
    cfg.metrics_bind = None;
    cfg.https_bind_explicit = true;
    cfg.hostnames = vec![HOST.to_string()];
    cfg
}

impl TestHub {
    pub async fn start() -> R<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts a hub with some settings changed.
    pub async fn start_with(tweak: fn(&mut ServerConfig)) -> R<Self> {
        Self::start_in(tempfile::tempdir()?, tweak).await
    }

    /// Starts a hub whose data directory is `dir` (on a filesystem the test made, say).
    pub async fn start_in(dir: tempfile::TempDir, tweak: fn(&mut ServerConfig)) -> R<Self> {
        let mut cfg = config(dir.path());
        tweak(&mut cfg);
        let server = start(cfg).await?;
        let ca = server.info.ca_file.clone().ok_or("no CA file")?;
        let api = ApiClient::new(
            ConnectionString::parse(&server.info.owner_connection_string)?,
            Some(&ca),
        )?;
        Ok(Self {
            dir,
            server: Some(server),
            api,
            ca,
            tweak,
        })
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server running")
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.server().mqtt_addr
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.server().https_addr
    }

    /// Stops the server and starts a new one on the same data directory (new ports).
    pub async fn restart(&mut self) -> TestResult {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        let mut cfg = config(self.dir.path());
        (self.tweak)(&mut cfg);
        let server = start(cfg).await?;
        self.api = ApiClient::new(
            ConnectionString::parse(&server.info.owner_connection_string)?,
            Some(&self.ca),
        )?;
        self.server = Some(server);
        Ok(())
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// Creates a SAS device and returns its primary and secondary keys.
    pub async fn create_device(&self, id: &str) -> R<(String, String)> {
        let d = self
            .api
            .put(&format!("/devices/{id}"), &json!({"deviceId": id}), None)
            .await?;
        keys_of(&d)
    }

    pub async fn create_module(&self, id: &str, mid: &str) -> R<(String, String)> {
        let m = self
            .api
            .put(
                &format!("/devices/{id}/modules/{mid}"),
                &json!({"deviceId": id, "moduleId": mid}),
                None,
            )
            .await?;
        keys_of(&m)
    }

    pub fn device_token(&self, id: &str, key: &str) -> String {
        token_for(&format!("{HOST}/devices/{id}"), key, 3600, None)
    }

    /// A raw TLS connection to the MQTT port.
    pub async fn tls(&self) -> R<MqttClient> {
        MqttClient::open(self.mqtt_addr(), &self.ca, None).await
    }

    /// Connects as a SAS device and asserts CONNACK 0; returns the client and session-present.
    pub async fn connect_device(&self, id: &str, key: &str, clean: bool) -> R<(MqttClient, bool)> {
        let mut c = self.tls().await?;
        let ack = c
            .connect(connect_packet(
                id,
                Some(&self.device_token(id, key)),
                clean,
                60,
            ))
            .await?;
        if ack.1 != ConnectReturnCode::Accepted {
            return Err(format!("CONNACK {:?}", ack.1).into());
        }
        Ok((c, ack.0))
    }
}

pub fn keys_of(v: &Value) -> R<(String, String)> {
    let k = &v["authentication"]["symmetricKey"];
    Ok((
        k["primaryKey"]
            .as_str()
            .ok_or("no primary key")?
            .to_string(),
        k["secondaryKey"]
            .as_str()
            .ok_or("no secondary key")?
            .to_string(),
    ))
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token valid for `ttl` seconds from now (negative: already expired).
pub fn token_for(resource: &str, key: &str, ttl: i64, policy: Option<&str>) -> String {
    let expiry = (now() as i64 + ttl) as u64;
    generate_token(resource, key, expiry, policy).expect("valid key")
}

pub fn connect_packet(
    client_id: &str,
    password: Option<&str>,
    clean: bool,
    keep_alive: u16,
) -> Packet {
    let username = match client_id.split_once('/') {
        Some((d, m)) => format!("{HOST}/{d}/{m}/?api-version=2021-04-12"),
        None => format!("{HOST}/{client_id}/?api-version=2021-04-12"),
    };
    Packet::Connect(Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: clean,
        keep_alive,
        client_id: client_id.into(),
        will: None,
        username: Some(username),
        password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
    })
}

pub fn client_tls_config(
    ca: &Path,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> R<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let cfg = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A minimal MQTT client that speaks raw packets, so tests can send anything.
pub struct MqttClient {
    pub stream: Box<dyn Io>,
    buf: BytesMut,
}

impl MqttClient {
    pub async fn open(
        addr: SocketAddr,
        ca: &Path,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> R<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let tls = TlsConnector::from(client_tls_config(ca, identity)?)
            .connect(ServerName::try_from(HOST)?, tcp)
            .await?;
        Ok(Self::over(Box::new(tls)))
    }

    pub fn over(stream: Box<dyn Io>) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, p: &Packet) -> TestResult {
        let mut out = BytesMut::new();
        encode(p, &mut out)?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> TestResult {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next packet; `None` when the server closed the connection.
    pub async fn recv_within(&mut self, wait: Duration) -> R<Option<Packet>> {
        let fut = async {
            loop {
                if let Some(p) = decode(&mut self.buf, 1 << 20)? {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Some(p));
                }
                // A reset is as good as a close for these tests.
                let n = self
                    .stream
                    .read_buf(&mut self.buf)
                    .await
                    .unwrap_or_default();
                if n == 0 {
                    return Ok(None);
                }
            }
        };
        match tokio::time::timeout(wait, fut).await {
            Ok(r) => r,
            Err(_) => Err("timed out waiting for a packet".into()),
        }
    }

    pub async fn recv(&mut self) -> R<Option<Packet>> {
        self.recv_within(WAIT).await
    }

    /// Asserts the server closes the connection (skipping any packets before the close).
    pub async fn expect_closed(&mut self) -> TestResult {
        loop {
            match self.recv().await? {
                None => return Ok(()),
                Some(Packet::PingResp) | Some(Packet::Publish(_)) => continue,
                Some(p) => return Err(format!("expected close, got {p:?}").into()),
            }
        }
    }

    /// Sends CONNECT, returns (session_present, code).
    pub async fn connect(&mut self, p: Packet) -> R<(bool, ConnectReturnCode)> {
        self.send(&p).await?;
        match self.recv().await? {
            Some(Packet::ConnAck(a)) => Ok((a.session_present, a.code)),
            other => Err(format!("expected CONNACK, got {other:?}").into()),
        }
    }

    /// Subscribes and returns the SUBACK codes.
    pub async fn subscribe(
        &mut self,
        pid: u16,
        filters: &[(&str, QoS)],
    ) -> R<Vec<ferrohub_mqtt::SubscribeReturnCode>> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: pid,
            filters: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
        }))
        .await?;
        match self.recv().await? {
            Some(Packet::SubAck(a)) if a.packet_id == pid => Ok(a.return_codes),
            other => Err(format!("expected SUBACK {pid}, got {other:?}").into()),
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish_qos1(&mut self, pid: u16, topic: &str, payload: &[u8]) -> TestResult {
        self.send(&publish(topic, payload, QoS::AtLeastOnce, pid))
            .await?;
        loop {
            match self.recv().await? {
                Some(Packet::PubAck(id)) if id == pid => return Ok(()),
                // A twin response may overtake the PUBACK of an earlier publish (MQTT does not
                // order the two); tests that want responses read them with their own helper.
                Some(Packet::Publish(p)) if p.topic.starts_with("$iothub/twin/res/") => continue,
                other => return Err(format!("expected PUBACK {pid}, got {other:?}").into()),
            }
        }
    }
}

pub fn publish(topic: &str, payload: &[u8], qos: QoS, pid: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { pid },
        payload: Bytes::copy_from_slice(payload),
    })
}

/// Receives PUBLISH packets until one arrives or `wait` passes (other packets are skipped).
pub async fn recv_publish(c: &mut MqttClient, wait: Duration) -> R<Option<Publish>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match c.recv_within(left).await {
            Ok(Some(Packet::Publish(p))) => return Ok(Some(p)),
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(None),
            Err(e) if e.to_string().starts_with("timed out") => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// The owner policy's SAS token, for raw service API calls.
pub fn owner_token(hub: &TestHub) -> R<String> {
    let cs = ConnectionString::parse(&hub.server().info.owner_connection_string)?;
    Ok(token_for(
        &cs.host_name,
        cs.shared_access_key.as_deref().ok_or("key")?,
        3600,
        Some("iothubowner"),
    ))
}

/// A service API answer as a raw client sees it.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTPS client that trusts only the hub's CA, for raw service API calls.
pub fn https_client(hub: &TestHub) -> R<reqwest::Client> {
    let pem = std::fs::read(&hub.ca)?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// A raw HTTPS call with the owner's token and a JSON body, to see status codes, headers and
/// error bodies as a service SDK does.
pub async fn rest(
    hub: &TestHub,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> R<Answer> {
    let client = https_client(hub)?;
    let sep = if path.contains('?') { '&' } else { '?' };
    let url = format!(
        "https://{HOST}:{}{path}{sep}api-version=2021-04-12",
        hub.https_addr().port()
    );
    let mut req = client
        .request(method, url)
        .header("Authorization", owner_token(hub)?);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Reads events from `GET /events?{query}` until `n` arrived or `wait` passed.
pub async fn read_events(hub: &TestHub, query: &str, n: usize, wait: Duration) -> R<Vec<Value>> {
    let mut resp = hub.api.stream(&format!("/events?{query}")).await?;
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while out.len() < n {
        let chunk = match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(c) => c?,
            Err(_) => break,
        };
        let Some(chunk) = chunk else { break };
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            out.push(serde_json::from_slice(&line)?);
        }
    }
    Ok(out)
}

/// `PUT path` with a JSON body as the owner.
pub async fn put(hub: &TestHub, path: &str, body: Value) -> R<Answer> {
    rest(hub, reqwest::Method::PUT, path, Some(&body)).await
}

/// `PUT path`, which must answer 200.
pub async fn put_ok(hub: &TestHub, path: &str, body: Value) -> TestResult {
    let a = put(hub, path, body).await?;
    if a.status != 200 {
        return Err(format!("PUT {path}: {} {}", a.status, a.body).into());
    }
    Ok(())
}
