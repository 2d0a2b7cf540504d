//! One simulated device's MQTT-over-TLS session: TCP, TLS 1.3, CONNECT (with a SAS token for an
//! IoT Hub, bare for a plain MQTT broker), CONNACK, and DISCONNECT at the end. Kept lean because
//! thousands of these are alive at once.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ferrohub_iothub::sas::generate_token;
use ferrohub_mqtt::{decode, encode, Connect, Packet};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::hub::Hub;
use crate::registry::{now_epoch, TOKEN_LIFETIME_SECS};

pub type MqttStream = TlsStream<TcpStream>;

const API_VERSION: &str = "2021-04-12";
/// Long enough that no PINGREQ is due during a bench, so idle connections cost the server nothing
/// but memory.
const KEEP_ALIVE_SECS: u16 = 600;
/// A CONNACK is 4 bytes; anything near this limit means the peer is not an MQTT server.
const MAX_INBOUND_PACKET: usize = 4096;
/// How long a closing device waits for the server to hang up after DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Why a connect attempt failed, coarse enough to histogram.
#[derive(Debug)]
pub enum ConnectFailure {
    Tcp(std::io::Error),
    Tls(std::io::Error),
    /// CONNACK with a non-zero return code.
    Refused(u8),
    /// The server closed the connection or the socket failed before CONNACK.
    Closed(String),
    /// The server sent something that is not a CONNACK.
    Protocol(String),
    Timeout,
}

impl ConnectFailure {
    /// The histogram bucket: stable across occurrences, unlike the full message.
    pub fn category(&self) -> String {
        match self {
            ConnectFailure::Tcp(e) => format!("tcp:{:?}", e.kind()),
            ConnectFailure::Tls(e) => format!("tls:{:?}", e.kind()),
            ConnectFailure::Refused(code) => format!("connack:{code}"),
            ConnectFailure::Closed(_) => "closed-before-connack".to_owned(),
            ConnectFailure::Protocol(_) => "protocol".to_owned(),
            ConnectFailure::Timeout => "timeout".to_owned(),
        }
    }
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectFailure::Tcp(e) => write!(f, "TCP connect failed: {e}"),
            ConnectFailure::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            ConnectFailure::Refused(code) => write!(f, "CONNACK return code {code}"),
            ConnectFailure::Closed(why) => write!(f, "connection lost before CONNACK: {why}"),
            ConnectFailure::Protocol(why) => write!(f, "unexpected answer to CONNECT: {why}"),
            ConnectFailure::Timeout => write!(f, "no CONNACK within the connect timeout"),
        }
    }
}

/// How a connection ended when the bench closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOutcome {
    /// DISCONNECT sent and the server hung up, as MQTT asks it to.
    ServerClosed,
    /// DISCONNECT sent but the server kept the connection open for CLOSE_WAIT.
    ServerKeptOpen,
    /// DISCONNECT could not be written.
    WriteFailed,
}

/// What a CONNECT carries besides the client id.
pub enum Credentials {
    /// An IoT Hub device: the hub's username format and a SAS token signed with the fleet key.
    Sas {
        hostname: String,
        device_key: String,
    },
    /// A plain MQTT broker taking anonymous clients: no username, no password.
    Anonymous,
}

/// Everything needed to connect any fleet device; shared by all connect workers.
pub struct Connector {
    tls: TlsConnector,
    server_name: ServerName<'static>,
    addr: SocketAddr,
    credentials: Credentials,
    timeout: Duration,
    /// An IoT Plug and Play model id announced in every CONNECT (`&model-id=` in the username).
    model_id: Option<String>,
}

/// Where to open connections and whom to trust there.
pub struct Endpoint<'a> {
    /// PEM certificate(s): the only roots trusted.
    pub ca_pem: &'a [u8],
    /// SNI and the name the server certificate must carry.
    pub server_name: &'a str,
    pub host: &'a str,
    pub port: u16,
}

/// Client TLS configuration: TLS 1.3 only, trusting only the hub CA. Without `resume` every
/// handshake is a full one, as it is for a fleet of distinct devices each connecting once.
pub fn tls_config(ca_pem: &[u8], resume: bool) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.context("reading a PEM certificate from the CA file")?)
            .context("adding a CA certificate")?;
    }
    if roots.is_empty() {
        bail!("the CA file holds no PEM certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

impl Connector {
    /// Connects IoT Hub devices of `hub`, all sharing `device_key`.
    pub async fn new(
        hub: &Hub,
        device_key: String,
        resume: bool,
        timeout: Duration,
    ) -> Result<Connector> {
        Connector::with_credentials(
            &Endpoint {
                ca_pem: &hub.ca_pem,
                server_name: &hub.hostname,
                host: &hub.mqtt_host,
                port: hub.mqtt_port,
            },
            Credentials::Sas {
                hostname: hub.hostname.clone(),
                device_key,
            },
            resume,
            timeout,
        )
        .await
    }

    pub async fn with_credentials(
        endpoint: &Endpoint<'_>,
        credentials: Credentials,
        resume: bool,
        timeout: Duration,
    ) -> Result<Connector> {
        let server_name =
            ServerName::try_from(endpoint.server_name.to_owned()).with_context(|| {
                format!("{:?} is not a valid TLS server name", endpoint.server_name)
            })?;
        Ok(Connector {
            tls: TlsConnector::from(tls_config(endpoint.ca_pem, resume)?),
            server_name,
            addr: resolve_mqtt(endpoint.host, endpoint.port).await?,
            credentials,
            timeout,
            model_id: None,
        })
    }

    /// Devices connected from now on announce `model_id` as IoT Plug and Play devices do.
    pub fn with_model_id(mut self, model_id: Option<String>) -> Connector {
        self.model_id = model_id;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP, TLS and CONNECT for `device_id`; returns the stream once the CONNACK accepted it.
    pub async fn connect(&self, device_id: &str) -> Result<MqttStream, ConnectFailure> {
        let connect = self.connect_packet(device_id)?;
        tokio::time::timeout(self.timeout, self.handshake(connect))
            .await
            .unwrap_or(Err(ConnectFailure::Timeout))
    }

    fn connect_packet(&self, device_id: &str) -> Result<BytesMut, ConnectFailure> {
        let (username, password) = match &self.credentials {
            Credentials::Sas {
                hostname,
                device_key,
            } => {
                let token = generate_token(
                    &format!("{hostname}/devices/{device_id}"),
                    device_key,
                    now_epoch() + TOKEN_LIFETIME_SECS,
                    None,
                )
                .map_err(|e| ConnectFailure::Protocol(format!("signing the token: {e}")))?;
                let model = self.model_id.as_deref().map_or_else(String::new, |m| {
                    format!("&model-id={}", utf8_percent_encode(m, NON_ALPHANUMERIC))
                });
                (
                    Some(format!(
                        "{hostname}/{device_id}/?api-version={API_VERSION}{model}"
                    )),
                    Some(Bytes::from(token.into_bytes())),
                )
            }
            Credentials::Anonymous => (None, None),
        };
        let packet = Packet::Connect(Connect {
            protocol_name: "MQTT".to_owned(),
            protocol_level: 4,
            clean_session: true,
            keep_alive: KEEP_ALIVE_SECS,
            client_id: device_id.to_owned(),
            will: None,
            username,
            password,
        });
        let mut buf = BytesMut::with_capacity(512);
        encode(&packet, &mut buf)
            .map_err(|e| ConnectFailure::Protocol(format!("encoding CONNECT: {e}")))?;
        Ok(buf)
    }

    async fn handshake(&self, connect: BytesMut) -> Result<MqttStream, ConnectFailure> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(ConnectFailure::Tcp)?;
        // Without this, Nagle holds CONNECT back until the server acknowledges the client's
        // Finished, adding a delayed-ACK wait to every connect.
        tcp.set_nodelay(true).map_err(ConnectFailure::Tcp)?;
        let mut tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(ConnectFailure::Tls)?;
        tls.write_all(&connect)
            .await
            .map_err(|e| ConnectFailure::Closed(format!("writing CONNECT: {e}")))?;
        tls.flush()
            .await
            .map_err(|e| ConnectFailure::Closed(format!("writing CONNECT: {e}")))?;
        match read_packet(&mut tls).await? {
            Packet::ConnAck(ack) => match ack.code as u8 {
                0 => Ok(tls),
                code => Err(ConnectFailure::Refused(code)),
            },
            other => Err(ConnectFailure::Protocol(format!("{other:?}"))),
        }
    }
}

async fn read_packet(tls: &mut MqttStream) -> Result<Packet, ConnectFailure> {
    let mut buf = BytesMut::with_capacity(64);
    loop {
        match decode(&mut buf, MAX_INBOUND_PACKET) {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {}
            Err(e) => return Err(ConnectFailure::Protocol(format!("undecodable packet: {e}"))),
        }
        match tls.read_buf(&mut buf).await {
            Ok(0) => {
                return Err(ConnectFailure::Closed(
                    "server closed the connection".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(ConnectFailure::Closed(e.to_string())),
        }
    }
}

/// Resolves the MQTT host once, so name lookups stay out of the measured connects. With several
/// addresses (localhost is often ::1 and 127.0.0.1) the first that accepts TCP is used.
pub(crate) async fn resolve_mqtt(host: &str, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    match addrs.as_slice() {
        [] => bail!("{host} resolves to no address"),
        [only] => Ok(*only),
        several => {
            let mut errors = Vec::new();
            for addr in several {
                match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => return Ok(*addr),
                    Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                    Err(_) => errors.push(format!("{addr}: timed out")),
                }
            }
            bail!(
                "no address of {host}:{port} accepts connections ({})",
                errors.join("; ")
            )
        }
    }
}

/// Sends DISCONNECT and waits for the server to hang up before dropping the socket: the side
/// that closes first keeps TIME_WAIT, and on the server's side it does not eat the bench's
/// ephemeral ports between back-to-back runs.
pub async fn disconnect(mut tls: MqttStream) -> CloseOutcome {
    let mut buf = BytesMut::with_capacity(2);
    if encode(&Packet::Disconnect, &mut buf).is_err()
        || tls.write_all(&buf).await.is_err()
        || tls.flush().await.is_err()
    {
        return CloseOutcome::WriteFailed;
    }
    let mut scratch = [0u8; 64];
    let hung_up = tokio::time::timeout(CLOSE_WAIT, async {
        while let Ok(n) = tls.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    match hung_up {
        Ok(()) => CloseOutcome::ServerClosed,
        Err(_) => CloseOutcome::ServerKeptOpen,
    }
}
