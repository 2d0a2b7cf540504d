//! The metrics listener: Prometheus text exposition (`GET /metrics`) of what the hub records
//! (`ferrohub_hub::metrics`) and of the REST API's requests (`count_requests`), and health
//! endpoints for orchestrators (`/healthz`: the process answers; `/readyz`: the store does too).
//! Plain HTTP on its own listener, loopback by default, as exporters usually are.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ferrohub_hub::Hub;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

pub const HTTP_REQUESTS: &str = "ferrohub_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "ferrohub_http_request_seconds";

/// Histogram buckets of every `_seconds` metric: from half a millisecond (a PUBACK on an idle
/// hub) to half a minute (a direct method's longest wait).
const SECONDS_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for the process, once (the metrics facade takes one global
/// recorder; servers started later in the same process share it). `None` when another
/// recorder was installed first.
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(ferrohub_sqlite::metrics::STORE_COMMIT_BATCH_SIZE.into()),
                        &ferrohub_sqlite::metrics::BATCH_SIZE_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    warn!(error = %e, "metrics: the histogram buckets were refused; no metrics");
                    return None;
                }
            };
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                warn!(error = %e, "metrics: another recorder is installed; no Prometheus metrics");
                return None;
            }
            ferrohub_hub::metrics::describe();
            ferrohub_sqlite::metrics::describe();
            metrics::describe_counter!(
                HTTP_REQUESTS,
                "Requests to the HTTPS listener's REST API, by route template, method and status"
            );
            metrics::describe_histogram!(
                HTTP_REQUEST_SECONDS,
                metrics::Unit::Seconds,
                "REST API requests, from routing to the response head, by route template"
            );
            Some(handle)
        })
        .clone()
}

/// A route template as a label: `/devices/{id}` becomes `/devices/:id`, since braces inside
/// label values trip some Prometheus text parsers (the `prometheus-parse` crate's, for one).
fn route_label(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    for c in template.chars() {
        match c {
            '{' => out.push(':'),
            '}' => {}
            c => out.push(c),
        }
    }
    out
}

/// Counts a REST request by its route template (`/devices/:id`, never the id itself), method
/// and status. A layer on the API router, so the matched path is known.
pub async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| route_label(p.as_str()));
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    metrics::counter!(
        HTTP_REQUESTS,
        "route" => route.clone(),
        "method" => method,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!(HTTP_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

#[derive(Clone)]
struct MetricsState {
    handle: PrometheusHandle,
    hub: Arc<Hub>,
    data_dir: PathBuf,
}

async fn render(State(s): State<MetricsState>) -> impl IntoResponse {
    // A size is read when asked for: nothing needs it between scrapes.
    let dir = s.data_dir.clone();
    if let Ok(bytes) =
        tokio::task::spawn_blocking(move || ferrohub_sqlite::metrics::telemetry_log_bytes(&dir))
            .await
    {
        metrics::gauge!(ferrohub_sqlite::metrics::TELEMETRY_LOG_BYTES).set(bytes as f64);
    }
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.handle.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the store answers a read: a hub whose disk or database is gone should be taken
/// out of rotation, not sent devices.
async fn readyz(State(s): State<MetricsState>) -> Response {
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.hub.policy("iothubowner"),
    )
    .await
    {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store failed: {e}\n"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the store did not answer within 5 s\n",
        )
            .into_response(),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    hub: Arc<Hub>,
    data_dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(MetricsState {
            handle,
            hub,
            data_dir,
        });
    let stop = async move { ferrohub_hub::until_shutdown(&mut shutdown).await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        warn!(error = %e, addr = ?addr, "the metrics listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the example Grafana dashboard charts is one the hub exports.
    #[test]
    fn the_grafana_dashboard_names_only_exported_metrics() {
        use ferrohub_hub::metrics as hub;
        use ferrohub_sqlite::metrics as store;
        let known = [
            hub::DEVICE_CONNECTIONS,
            hub::DEVICE_CONNECTS,
            hub::DEVICE_CONNECT_REFUSALS,
            hub::TELEMETRY_MESSAGES,
            hub::TELEMETRY_BYTES,
            hub::TELEMETRY_DURABLE_SECONDS,
            hub::C2D_MESSAGES,
            hub::TWIN_OPERATIONS,
            hub::METHOD_CALLS,
            hub::METHOD_CALL_SECONDS,
            hub::THROTTLED,
            hub::CONFORMANCE_CHECKED,
            hub::CONFORMANCE_FINDINGS,
            hub::EVENT_READERS,
            hub::EVENTS_DELIVERED,
            hub::EVENT_READER_LAG,
            store::STORE_COMMIT_SECONDS,
            store::STORE_COMMIT_BATCH_SIZE,
            store::TELEMETRY_LOG_BYTES,
            HTTP_REQUESTS,
            HTTP_REQUEST_SECONDS,
        ];
        let dashboard = include_str!("../../../examples/grafana/ferrohub-dashboard.json");
        let mut named = 0;
        for (i, _) in dashboard.match_indices("ferrohub_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
                .unwrap_or(&name);
            assert!(known.contains(&base), "the dashboard charts {name}");
            named += 1;
        }
        assert!(named >= known.len(), "the dashboard charts {named} series");
    }

    #[test]
    fn route_templates_become_colon_labels() {
        assert_eq!(route_label("/devices/{id}"), "/devices/:id");
        assert_eq!(
            route_label("/devices/{id}/modules/{mid}/twin"),
            "/devices/:id/modules/:mid/twin"
        );
        assert_eq!(route_label("/statistics/devices"), "/statistics/devices");
    }
}
