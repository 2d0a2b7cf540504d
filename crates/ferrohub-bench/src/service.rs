//! The back end's side of the push scenarios: service REST calls (C2D sends, direct method
//! calls) over a pool of keep-alive HTTPS connections, authenticated with one SAS token made from
//! the connection string's policy.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use reqwest::StatusCode;
use tokio::task::JoinSet;

use crate::hub::Hub;

const API_VERSION: &str = "2021-04-12";

/// What a REST call came back with, or why it did not come back.
pub enum Answer {
    /// The status, the `iothub-errorcode` header (IoT Hub's error name) and the body.
    Http {
        status: StatusCode,
        error_code: Option<String>,
        body: Bytes,
    },
    /// No HTTP answer: connect, TLS, timeout or a broken connection.
    Transport(String),
}

impl Answer {
    /// The body of a 200, or the failure to count: a kind named after `what` (the HTTP status
    /// and IoT Hub error, or the transport error's first word) and an example.
    pub fn ok_body(self, what: &str) -> Result<Bytes, (String, String)> {
        match self {
            Answer::Http { status, body, .. } if status.as_u16() == 200 => Ok(body),
            Answer::Http {
                status,
                error_code,
                body,
            } => Err((
                format!(
                    "{what}: HTTP {} {}",
                    status.as_u16(),
                    error_code.as_deref().unwrap_or("")
                ),
                excerpt(&body),
            )),
            Answer::Transport(e) => Err((
                format!("{what}: {}", e.split(':').next().unwrap_or("transport")),
                e,
            )),
        }
    }
}

/// The start of a body, for failure examples.
pub fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

/// A service client for one hub.
pub struct Service {
    client: reqwest::Client,
    base: String,
    auth: String,
}

impl Service {
    /// `pool` bounds the idle keep-alive connections kept for reuse; it should be at least the
    /// number of requests the caller keeps in flight, or connections get closed and reopened.
    pub fn new(hub: &Hub, pool: usize, timeout: Duration) -> Result<Service> {
        // HTTP/1.1 with keep-alive, as the service SDKs use the REST API: one request per
        // connection at a time, so concurrency is the number of pooled connections.
        let client = hub
            .https_builder()?
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(300))
            .timeout(timeout)
            .build()
            .context("building the HTTPS client")?;
        let auth = hub.service_token()?;
        Ok(Service {
            client,
            base: format!("https://{}", hub.rest_authority),
            auth,
        })
    }

    /// POSTs a JSON body to `path` (which starts with `/`).
    pub async fn post(&self, path: &str, body: Vec<u8>) -> Answer {
        let url = format!("{}{path}?api-version={API_VERSION}", self.base);
        let request = self
            .client
            .post(url)
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        answer(request.send().await).await
    }

    /// Opens `connections` keep-alive connections before the measurement, so TLS handshakes
    /// do not land in it: that many GETs of `path` at once, each on its own connection.
    pub async fn warm(&self, path: &str, connections: usize) -> Result<()> {
        let url = format!("{}{path}?api-version={API_VERSION}", self.base);
        let mut calls = JoinSet::new();
        for _ in 0..connections {
            let request = self
                .client
                .get(&url)
                .header(reqwest::header::AUTHORIZATION, &self.auth);
            calls.spawn(async move { answer(request.send().await).await });
        }
        while let Some(joined) = calls.join_next().await {
            match joined.context("warm-up request panicked")? {
                Answer::Http { status, .. } if status.is_success() => {}
                Answer::Http { status, body, .. } => bail!(
                    "warm-up GET {path} answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
                Answer::Transport(e) => bail!("warm-up GET {path}: {e}"),
            }
        }
        Ok(())
    }
}

async fn answer(sent: reqwest::Result<reqwest::Response>) -> Answer {
    let response = match sent {
        Ok(r) => r,
        Err(e) => return Answer::Transport(transport_error(&e)),
    };
    let status = response.status();
    let error_code = response
        .headers()
        .get("iothub-errorcode")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match response.bytes().await {
        Ok(body) => Answer::Http {
            status,
            error_code,
            body,
        },
        Err(e) => Answer::Transport(transport_error(&e)),
    }
}

/// The kind of a reqwest failure and its innermost cause, which is where the useful part is
/// ("connection reset by peer" rather than "error sending request").
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    format!("{kind}: {cause}")
}
