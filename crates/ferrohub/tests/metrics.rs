//! The metrics listener over real sockets: after known traffic (a REST create, a device
//! connecting, three telemetry messages, a refused CONNECT, a twin read, a C2D send) the
//! Prometheus counters moved by exactly that traffic, the exposition parses with a real
//! Prometheus text parser, and the health endpoints answer. One test in its own binary: the
//! metrics facade has one recorder per process, shared by every hub in it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferrohub_mqtt::ConnectReturnCode;
use prometheus_parse::{Scrape, Value as Sample};
use serde_json::json;

async fn scrape(addr: std::net::SocketAddr) -> R<Scrape> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    Ok(Scrape::parse(lines)?)
}

/// The value of the series `name` whose labels include `labels` (summed over the others), 0
/// when there is none.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Sample::Counter(v) | Sample::Gauge(v) | Sample::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

/// How much each series moved between two scrapes.
fn delta(a: &Scrape, b: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(b, name, labels) - value(a, name, labels)
}

/// Scrapes until `ok` holds, for state that settles after the call that changed it returned.
async fn until(addr: std::net::SocketAddr, what: &str, ok: impl Fn(&Scrape) -> bool) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ok(&scrape(addr).await?) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("never: {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn counters_move_by_exactly_the_traffic_and_health_answers() -> TestResult {
    let hub = TestHub::start_with(|cfg| {
        cfg.metrics_bind = Some("127.0.0.1:0".parse().expect("literal address"));
        cfg.metrics_bind_explicit = true;
    })
    .await?;
    let addr = hub.server().metrics_addr.ok_or("no metrics listener")?;
    let before = scrape(addr).await?;

    let (key, _) = hub.create_device("m1").await?;
    let (mut c, _) = hub.connect_device("m1", &key, true).await?;
    for pid in 1..=3 {
        c.publish_qos1(pid, "devices/m1/messages/events/", b"0123456789")
            .await?;
    }
    c.publish_qos1(4, "$iothub/twin/GET/?$rid=1", b"").await?;
    recv_publish(&mut c, WAIT).await?.ok_or("no twin answer")?;
    let mut bad = hub.tls().await?;
    let (_, code) = bad
        .connect(connect_packet(
            "m1",
            Some(&hub.device_token("m1", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")),
            true,
            60,
        ))
        .await?;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    hub.api
        .post(
            "/devices/m1/messages/deviceBound",
            &json!({"payload": "hi"}),
        )
        .await?;
    let after = scrape(addr).await?;

    let sas = [("transport", "mqtt-tls"), ("auth", "sas")];
    assert_eq!(
        delta(&before, &after, "ferrohub_device_connects_total", &sas),
        1.0
    );
    assert_eq!(value(&after, "ferrohub_device_connections", &sas), 1.0);
    assert_eq!(
        delta(
            &before,
            &after,
            "ferrohub_device_connect_refusals_total",
            &[("transport", "mqtt-tls"), ("error", "IoTHubUnauthorized")]
        ),
        1.0
    );
    assert_eq!(
        delta(&before, &after, "ferrohub_telemetry_messages_total", &[]),
        3.0
    );
    assert_eq!(
        delta(&before, &after, "ferrohub_telemetry_bytes_total", &[]),
        30.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ferrohub_telemetry_durable_seconds_count",
            &[]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ferrohub_twin_operations_total",
            &[("side", "device"), ("op", "get")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ferrohub_c2d_messages_total",
            &[("outcome", "sent")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ferrohub_http_requests_total",
            &[
                ("route", "/devices/:id"),
                ("method", "PUT"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ferrohub_http_requests_total",
            &[
                ("route", "/devices/:id/messages/deviceBound"),
                ("method", "POST")
            ]
        ),
        1.0
    );

    // The telemetry log's group commits: at least one per acknowledged message (each PUBACK
    // was awaited before the next publish), each carrying at least that message.
    let telemetry_log = [("log", "telemetry")];
    assert!(
        delta(
            &before,
            &after,
            "ferrohub_store_commit_seconds_count",
            &telemetry_log
        ) >= 3.0
    );
    assert!(
        delta(
            &before,
            &after,
            "ferrohub_store_commit_batch_size_sum",
            &telemetry_log
        ) >= 3.0
    );
    assert!(value(&after, "ferrohub_telemetry_log_bytes", &[]) > 0.0);

    // An open `GET /events` is a reader while it lasts; caught up, it lags by nothing.
    assert_eq!(value(&after, "ferrohub_event_readers", &[]), 0.0);
    let mut events = hub.api.stream("/events?from=start").await?;
    let first = tokio::time::timeout(WAIT, events.chunk())
        .await
        .map_err(|_| "no event within the wait")??;
    assert!(first.is_some(), "the stream ended");
    until(addr, "the events read counted", |s| {
        value(s, "ferrohub_events_delivered_total", &[]) >= 1.0
    })
    .await?;
    until(addr, "one reader, caught up", |s| {
        value(s, "ferrohub_event_readers", &[]) == 1.0
            && value(s, "ferrohub_event_reader_lag_events", &[]) == 0.0
    })
    .await?;
    drop(events);
    until(addr, "no reader once the response is gone", |s| {
        value(s, "ferrohub_event_readers", &[]) == 0.0
    })
    .await?;

    // The connection's end takes the gauge back down.
    c.send(&ferrohub_mqtt::Packet::Disconnect).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(addr).await?;
        if value(&now, "ferrohub_device_connections", &sas) == 0.0 {
            break;
        }
        if Instant::now() > deadline {
            return Err("the connections gauge never went back to 0".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for (path, want) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let r = reqwest::get(format!("http://{addr}{path}")).await?;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await?, want);
    }
    let r = reqwest::get(format!("http://{addr}/nothing")).await?;
    assert_eq!(r.status(), 404);
    hub.stop().await;
    Ok(())
}
