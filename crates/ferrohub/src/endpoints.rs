//! The senders of external routing endpoints: webhook (HTTPS POST with reqwest on rustls),
//! NATS (JetStream publish with async-nats) and storage (files under the data directory, written
//! by `ferrohub_hub::storage_endpoint`). The hub's delivery tasks (`ferrohub_hub::delivery`)
//! call them; this module only talks to the peer and says whether it acknowledged.
//!
//! Header naming is `ferrohub_iothub::endpoints::message_headers`'s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use ferrohub_hub::delivery::{EndpointSender, SendFailure, SenderFactory};
use ferrohub_hub::routing::{Endpoint, EndpointKind};
use ferrohub_hub::storage_endpoint::StorageWriter;
use ferrohub_iothub::endpoints::{message_headers, HeaderStyle};
use ferrohub_store::telemetry::EventRecord;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde_json::{json, Map, Value};

/// Makes the webhook, NATS and storage senders.
#[derive(Debug)]
pub struct Senders {
    /// Where storage endpoints' containers are (`<data-dir>/storage`).
    pub storage_root: PathBuf,
    /// `{iothub}` in storage file names.
    pub hub_name: String,
}

impl SenderFactory for Senders {
    fn sender(&self, endpoint: &Endpoint) -> Result<Arc<dyn EndpointSender>, String> {
        match &endpoint.kind {
            EndpointKind::Storage {
                container,
                encoding,
                file_name_format,
                ..
            } => Ok(Arc::new(StorageWriter {
                dir: self.storage_root.join(container),
                hub: self.hub_name.clone(),
                file_name_format: file_name_format.clone(),
                encoding: *encoding,
            })),
            EndpointKind::Webhook {
                url,
                batch,
                timeout_secs,
                headers,
                ca_pem,
                ..
            } => Ok(Arc::new(Webhook::new(
                url,
                *batch > 1,
                Duration::from_secs(*timeout_secs),
                headers,
                ca_pem.as_deref(),
            )?)),
            EndpointKind::Nats {
                url,
                subject,
                stream,
                timeout_secs,
                ..
            } => Ok(Arc::new(Nats {
                endpoint: endpoint.name.clone(),
                url: url.clone(),
                subject: subject.clone(),
                stream: stream.clone(),
                timeout: Duration::from_secs(*timeout_secs),
                context: tokio::sync::Mutex::new(None),
            })),
            other => Err(format!("{} endpoints are not delivered", other.type_name())),
        }
    }
}

/// POSTs each message (its body as sent), or a JSON array of messages when batching.
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    batched: bool,
    fixed: HeaderMap,
}

impl Webhook {
    pub fn new(
        url: &str,
        batched: bool,
        timeout: Duration,
        headers: &std::collections::BTreeMap<String, String>,
        ca_pem: Option<&str>,
    ) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect is not an acknowledgement: the receiver must answer 2xx itself.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("caCertificates: {e}"))?;
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder
            .build()
            .map_err(|e| format!("webhook client: {e}"))?;
        let mut fixed = HeaderMap::new();
        for (k, v) in headers {
            let name =
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k}: {e}"))?;
            let value = HeaderValue::from_str(v).map_err(|e| format!("header {k}: {e}"))?;
            fixed.insert(name, value);
        }
        Ok(Self {
            client,
            url,
            batched,
            fixed,
        })
    }

    async fn post(&self, headers: HeaderMap, body: Vec<u8>) -> Result<(), String> {
        let resp = self
            .client
            .post(self.url.clone())
            .headers(self.fixed.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "no answer within the endpoint's timeout".to_string()
                } else {
                    format!("request failed: {e}")
                }
            })?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered HTTP {}", status.as_u16()))
        }
    }
}

/// Adds `(name, value)` pairs to an HTTP header map; both are already header-safe.
fn http_headers(pairs: Vec<(String, String)>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            h.append(k, v);
        }
    }
    h
}

/// One message of a batch body: its properties under their header names, and its body as a
/// string if it is UTF-8, else base64 in `bodyBase64`.
fn batch_item(e: &EventRecord) -> Value {
    let mut system = Map::new();
    for (k, v) in message_headers(HeaderStyle::Webhook, &e.event.system_properties, &[]) {
        system.insert(k, Value::String(v));
    }
    let mut app = Map::new();
    for (k, v) in &e.event.properties {
        app.insert(k.clone(), v.clone().map_or(Value::Null, Value::String));
    }
    let mut item = json!({ "systemProperties": system, "properties": app });
    match std::str::from_utf8(&e.event.body) {
        Ok(s) => item["body"] = Value::String(s.into()),
        Err(_) => {
            item["bodyBase64"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(&e.event.body))
        }
    }
    item
}

#[async_trait]
impl EndpointSender for Webhook {
    async fn send(&self, batch: &[EventRecord]) -> Result<(), SendFailure> {
        if self.batched {
            let body = Value::Array(batch.iter().map(batch_item).collect()).to_string();
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return self
                .post(h, body.into_bytes())
                .await
                .map_err(SendFailure::new);
        }
        for (i, e) in batch.iter().enumerate() {
            let mut h = http_headers(message_headers(
                HeaderStyle::Webhook,
                &e.event.system_properties,
                &e.event.properties,
            ));
            // HTTP's Content-Type is the message's when it has a usable one.
            let ct = e
                .event
                .system_properties
                .get("content-type")
                .and_then(|c| HeaderValue::from_str(c).ok())
                .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
            h.insert(CONTENT_TYPE, ct);
            self.post(h, e.event.body.clone())
                .await
                .map_err(|error| SendFailure {
                    delivered: i,
                    error,
                })?;
        }
        Ok(())
    }
}

/// Publishes to JetStream, awaiting every PubAck.
pub struct Nats {
    endpoint: String,
    url: String,
    subject: String,
    stream: Option<String>,
    timeout: Duration,
    /// Connected on first use and kept; the client reconnects by itself after that.
    context: tokio::sync::Mutex<Option<async_nats::jetstream::Context>>,
}

impl Nats {
    async fn context(&self) -> Result<async_nats::jetstream::Context, String> {
        let mut slot = self.context.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
            .name(format!("ferrohub endpoint {}", self.endpoint))
            .connect(self.url.as_str())
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.url))?;
        let mut ctx = async_nats::jetstream::new(client);
        ctx.set_timeout(self.timeout);
        *slot = Some(ctx.clone());
        Ok(ctx)
    }
}

#[async_trait]
impl EndpointSender for Nats {
    async fn send(&self, batch: &[EventRecord]) -> Result<(), SendFailure> {
        let ctx = self.context().await.map_err(SendFailure::new)?;
        // Publish the whole batch, then await the acks in order: JetStream stores a subject's
        // messages in publish order, and the cursor moves past the acknowledged head only.
        let mut acks = Vec::with_capacity(batch.len());
        let mut failed = None;
        for e in batch {
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in message_headers(
                HeaderStyle::Nats,
                &e.event.system_properties,
                &e.event.properties,
            ) {
                h.append(k, v);
            }
            // JetStream drops a message id it saw within its duplicate window, which covers a
            // resend after a crash between the ack and the cursor write.
            h.insert(
                "Nats-Msg-Id",
                format!("{}-{}-{}", self.endpoint, e.sequence, e.event.enqueued_ms),
            );
            if let Some(s) = &self.stream {
                h.insert("Nats-Expected-Stream", s.as_str());
            }
            match ctx
                .publish_with_headers(self.subject.clone(), h, e.event.body.clone().into())
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(err) => {
                    failed = Some(format!("publishing: {err}"));
                    break;
                }
            }
        }
        let published = acks.len();
        for (i, ack) in acks.into_iter().enumerate() {
            if let Err(err) = ack.await {
                return Err(SendFailure {
                    delivered: i,
                    error: format!("JetStream did not acknowledge: {err}"),
                });
            }
        }
        match failed {
            None => Ok(()),
            // Those published before the failure were acknowledged.
            Some(error) => Err(SendFailure {
                delivered: published,
                error,
            }),
        }
    }
}
