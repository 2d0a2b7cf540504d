//! A small client for the service REST API: signs each call with the policy key of the
//! connection string and turns IoT Hub error bodies into readable errors.

use anyhow::{anyhow, Context};
use ferrohub_iothub::sas::generate_token;
use ferrohub_iothub::ConnectionString;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::{load_connection_string, ClientArgs};

pub const API_VERSION: &str = "2021-04-12";

#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    /// Without a total timeout: an event stream lives as long as the reader wants.
    http_stream: reqwest::Client,
    base: String,
    cs: ConnectionString,
}

/// `localhost:8443` -> `localhost`.
pub fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

impl ApiClient {
    pub fn from_args(args: &ClientArgs) -> anyhow::Result<Self> {
        let cs = load_connection_string(args)?;
        let ca_file = match &args.ca_file {
            Some(p) => Some(p.clone()),
            None => crate::server::HubInfo::load(&args.data_dir)
                .ok()
                .and_then(|i| i.ca_file),
        };
        Self::new(cs, ca_file.as_deref())
    }

    pub fn new(cs: ConnectionString, ca_file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        if cs.shared_access_key_name.is_none() || cs.shared_access_key.is_none() {
            return Err(anyhow!(
                "the connection string must name a shared access policy (SharedAccessKeyName and SharedAccessKey)"
            ));
        }
        let pem = match ca_file {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("reading CA file {}", path.display()))?,
            None => {
                return Err(anyhow!(
                    "no CA to trust: pass --ca-file (or FERROHUB_CA_FILE), or --data-dir of a hub with a development CA"
                ))
            }
        };
        let builder = || -> anyhow::Result<reqwest::ClientBuilder> {
            let mut b = reqwest::Client::builder()
                .use_rustls_tls()
                .connect_timeout(std::time::Duration::from_secs(15));
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).context("parsing the CA file")?
            {
                b = b.add_root_certificate(cert);
            }
            Ok(b)
        };
        let http_stream = builder()?.build()?;
        Ok(Self {
            http: builder()?
                .timeout(std::time::Duration::from_secs(60))
                .build()?,
            http_stream,
            base: format!("https://{}", cs.host_name),
            cs,
        })
    }

    /// The hub's host name without a port: what devices put in their connection strings.
    pub fn hub_host(&self) -> &str {
        strip_port(&self.cs.host_name)
    }

    fn token(&self) -> anyhow::Result<String> {
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 3600;
        let key = self.cs.shared_access_key.as_deref().unwrap_or_default();
        Ok(generate_token(
            &self.cs.host_name,
            key,
            expiry,
            self.cs.shared_access_key_name.as_deref(),
        )?)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Option<Value>> {
        self.call_with_timeout(method, path, body, if_match, None)
            .await
    }

    async fn call_with_timeout(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<Option<Value>> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header("Authorization", self.token()?)
            .header("Accept", "application/json");
        if let Some(e) = if_match {
            let quoted = if e == "*" || e.starts_with('"') {
                e.to_string()
            } else {
                format!("\"{e}\"")
            };
            req = req.header("If-Match", quoted);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            if status == StatusCode::NO_CONTENT || text.trim().is_empty() {
                return Ok(None);
            }
            return serde_json::from_str(&text).map(Some).with_context(|| {
                format!("the hub answered {status} with a body that is not JSON")
            });
        }
        Err(anyhow!(describe_error(status, &text)))
    }

    /// Opens a streaming GET (e.g. `/events`); the caller reads the body as it arrives.
    pub async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.base);
        let resp = self
            .http_stream
            .get(&url)
            .header("Authorization", self.token()?)
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(anyhow!(describe_error(status, &text)));
        }
        Ok(resp)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None, None)
            .await?
            .ok_or_else(|| anyhow!("the hub answered with an empty body"))
    }

    pub async fn put(
        &self,
        path: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> anyhow::Result<Value> {
        self.call(Method::PUT, path, Some(body), if_match)
            .await?
            .ok_or_else(|| anyhow!("the hub answered with an empty body"))
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Option<Value>> {
        self.call(Method::POST, path, Some(body), None).await
    }

    /// POST that may take longer than the client's usual limit (a method call waits for the
    /// device).
    pub async fn post_waiting(
        &self,
        path: &str,
        body: &Value,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Option<Value>> {
        self.call_with_timeout(Method::POST, path, Some(body), None, Some(timeout))
            .await
    }

    pub async fn patch(
        &self,
        path: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> anyhow::Result<Value> {
        self.call(Method::PATCH, path, Some(body), if_match)
            .await?
            .ok_or_else(|| anyhow!("the hub answered with an empty body"))
    }

    /// DELETE that returns the response body, if any (e.g. a purge result).
    pub async fn delete_with_body(&self, path: &str) -> anyhow::Result<Option<Value>> {
        self.call(Method::DELETE, path, None, None).await
    }

    /// GET returning the body and one response header (e.g. a feedback lock token in ETag);
    /// `None` on 204.
    pub async fn get_with_header(
        &self,
        path: &str,
        header: &str,
    ) -> anyhow::Result<Option<(Value, Option<String>)>> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.base);
        let resp = self
            .http
            .get(&url)
            .header("Authorization", self.token()?)
            .header("Accept", "application/json")
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let value = resp
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(anyhow!(describe_error(status, &text)));
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let body = serde_json::from_str(&text)
            .with_context(|| format!("the hub answered {status} with a body that is not JSON"))?;
        Ok(Some((body, value)))
    }

    /// POST with extra request headers, returning the JSON body and the response headers
    /// (a query page's continuation token and item type travel in headers).
    pub async fn post_with_headers(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, String)],
    ) -> anyhow::Result<(Value, reqwest::header::HeaderMap)> {
        self.call_with_headers(reqwest::Method::POST, path, Some(body), headers)
            .await
    }

    /// GET with extra request headers, returning the JSON body and the response headers (a
    /// job list page's continuation token travels in headers).
    pub async fn get_with_headers(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> anyhow::Result<(Value, reqwest::header::HeaderMap)> {
        self.call_with_headers(reqwest::Method::GET, path, None, headers)
            .await
    }

    /// One call with extra request headers and an optional JSON body; the JSON answer and
    /// the response headers, or the hub's error.
    async fn call_with_headers(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<(Value, reqwest::header::HeaderMap)> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header("Authorization", self.token()?)
            .header("Accept", "application/json");
        if let Some(body) = body {
            req = req.json(body);
        }
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let resp = req.send().await.with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let head = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(anyhow!(describe_error(status, &text)));
        }
        let body = serde_json::from_str(&text)
            .with_context(|| format!("the hub answered {status} with a body that is not JSON"))?;
        Ok((body, head))
    }

    /// GET of one of the API's response types (`crate::api::types`).
    pub async fn get_as<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        typed(self.get(path).await?)
    }

    /// PUT of one of the API's request types, answered with one of its response types.
    pub async fn put_as<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        if_match: Option<&str>,
    ) -> anyhow::Result<T> {
        typed(
            self.put(path, &serde_json::to_value(body)?, if_match)
                .await?,
        )
    }

    /// POST of one of the API's request types, answered with one of its response types;
    /// `timeout` overrides the client's usual limit.
    pub async fn post_as<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_value(body)?;
        let v = self
            .call_with_timeout(Method::POST, path, Some(&body), None, timeout)
            .await?
            .ok_or_else(|| anyhow!("the hub answered with an empty body"))?;
        typed(v)
    }

    pub async fn delete(&self, path: &str, if_match: Option<&str>) -> anyhow::Result<()> {
        self.call(Method::DELETE, path, None, Some(if_match.unwrap_or("*")))
            .await?;
        Ok(())
    }
}

fn typed<T: DeserializeOwned>(v: Value) -> anyhow::Result<T> {
    serde_json::from_value(v).context("the hub answered with a body of an unexpected shape")
}

/// `404 DeviceNotFound: Device x cannot be found.` from an IoT Hub error body.
fn describe_error(status: StatusCode, body: &str) -> String {
    let msg = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("Message").and_then(Value::as_str).map(str::to_string));
    match msg {
        Some(m) => {
            let m = m.strip_prefix("ErrorCode:").unwrap_or(&m);
            match m.split_once(';') {
                Some((code, text)) => format!("{} {code}: {text}", status.as_u16()),
                None => format!("{} {m}", status.as_u16()),
            }
        }
        None => format!("the hub answered {status}: {body}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_like_iot_hub() {
        let body = r#"{"Message":"ErrorCode:DeviceNotFound;Device d cannot be found.","ExceptionMessage":"x"}"#;
        assert_eq!(
            describe_error(StatusCode::NOT_FOUND, body),
            "404 DeviceNotFound: Device d cannot be found."
        );
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("localhost:8443"), "localhost");
        assert_eq!(strip_port("hub.example"), "hub.example");
    }
}
