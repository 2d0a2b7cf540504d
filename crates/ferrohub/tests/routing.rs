//! Message routing end to end over real TLS: routes on the body, application properties and the
//! twin, custom stream endpoints read like `/events`, the fallback route on and off,
//! enrichments, a restart, the refusals of a bad configuration, and the CLI.
//!
//! Event-driven: what did not reach an endpoint is shown by a later message that did (each
//! endpoint keeps a device's order, and a PUBACK means every copy is stored), never by waiting.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const SHORT: Duration = Duration::from_secs(5);

/// A stream endpoint with `partitions` partitions.
async fn stream(hub: &TestHub, name: &str, partitions: u32) -> TestResult {
    put_ok(
        hub,
        &format!("/ferrohub/routing/endpoints/{name}"),
        json!({"type": "stream", "partitions": partitions}),
    )
    .await
}

async fn route(hub: &TestHub, name: &str, condition: &str, endpoints: &[&str]) -> TestResult {
    put_ok(
        hub,
        &format!("/ferrohub/routing/routes/{name}"),
        json!({"source": "DeviceMessages", "condition": condition, "endpointNames": endpoints}),
    )
    .await
}

/// Publishes telemetry with message id `mid`, the property bag `bag` and `body`, and waits
/// for its PUBACK.
async fn send(c: &mut MqttClient, pid: u16, mid: &str, bag: &str, body: &[u8]) -> TestResult {
    let sep = if bag.is_empty() { "" } else { "&" };
    c.publish_qos1(
        pid,
        &format!("devices/dev1/messages/events/%24.mid={mid}{sep}{bag}"),
        body,
    )
    .await
}

fn ids(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["systemProperties"]["message-id"].as_str().unwrap_or("?"))
        .collect()
}

async fn read(hub: &TestHub, endpoint: Option<&str>, n: usize) -> R<Vec<Value>> {
    let q = match endpoint {
        Some(e) => format!("from=start&endpoint={e}"),
        None => "from=start".to_string(),
    };
    read_events(hub, &q, n, SHORT).await
}

const JSON: &str = "%24.ct=application%2Fjson&%24.ce=utf-8";

#[tokio::test]
async fn body_and_property_routes_reach_each_endpoint_once_and_the_rest_falls_back() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    stream(&hub, "hot", 2).await?;
    stream(&hub, "audit", 1).await?;
    route(&hub, "warm-body", "$body.temp > 30", &["hot"]).await?;
    // Same endpoint as warm-body: a message matching both arrives there once.
    route(&hub, "warm-again", "$body.temp >= 30", &["hot"]).await?;
    route(
        &hub,
        "critical",
        "level = 'critical'",
        &["hot", "events", "audit"],
    )
    .await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    // Two routes to hot, none to events.
    send(&mut c, 1, "m1", JSON, br#"{"temp": 35}"#).await?;
    // A property route to three endpoints; the body is no JSON, which no route here reads.
    send(&mut c, 2, "m2", "level=critical", b"not json").await?;
    // Matches nothing: the fallback route sends it to events.
    send(&mut c, 3, "m3", JSON, br#"{"temp": 10}"#).await?;
    // Not declared JSON: `$body` is undefined, so no body route matches; fallback.
    send(&mut c, 4, "m4", "", br#"{"temp": 50}"#).await?;
    send(&mut c, 5, "m5", "level=critical", b"last").await?;

    let hot = read(&hub, Some("hot"), 3).await?;
    assert_eq!(ids(&hot), ["m1", "m2", "m5"], "{hot:?}");
    assert_eq!(hot[0]["body"], r#"{"temp": 35}"#);
    assert_eq!(hot[0]["deviceId"], "dev1");
    assert_eq!(hot[1]["properties"]["level"], "critical");
    let events = read(&hub, None, 4).await?;
    assert_eq!(ids(&events), ["m2", "m3", "m4", "m5"], "{events:?}");
    let audit = read(&hub, Some("audit"), 2).await?;
    assert_eq!(ids(&audit), ["m2", "m5"]);
    // The custom stream keeps its own partitions and sequence numbers.
    assert!(hot.iter().all(|e| e["partition"].as_u64() < Some(2)));
    assert_eq!(audit[0]["sequenceNumber"], 0);
    assert_eq!(audit[1]["sequenceNumber"], 1);

    let view = rest(&hub, Method::GET, "/ferrohub/routing", None).await?;
    assert!(
        view.body["counters"]["undefinedConditions"].as_u64() >= Some(2),
        "m4 left both body conditions undefined: {}",
        view.body
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn twin_conditions_enrichments_and_the_fallback_switch() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    hub.api
        .patch(
            "/twins/dev1",
            &json!({"tags": {"site": "oslo", "floor": 3}}),
            None,
        )
        .await?;
    stream(&hub, "hot", 1).await?;
    route(
        &hub,
        "oslo-a",
        "$twin.tags.site = 'oslo' AND kind = 'a'",
        &["hot"],
    )
    .await?;
    put_ok(
        &hub,
        "/ferrohub/routing/enrichments/site",
        json!({"value": "$twin.tags.site", "endpointNames": ["hot"]}),
    )
    .await?;
    put_ok(
        &hub,
        "/ferrohub/routing/enrichments/floor",
        json!({"value": "$twin.tags.floor", "endpointNames": ["hot"]}),
    )
    .await?;
    put_ok(
        &hub,
        "/ferrohub/routing/enrichments/hub",
        json!({"value": "$iothubname", "endpointNames": ["hot", "events"]}),
    )
    .await?;
    put_ok(
        &hub,
        "/ferrohub/routing/enrichments/tier",
        json!({"value": "gold", "endpointNames": ["events"]}),
    )
    .await?;
    put_ok(
        &hub,
        "/ferrohub/routing/fallback",
        json!({"enabled": false}),
    )
    .await?;

    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    send(&mut c, 1, "m1", "kind=a", b"1").await?;
    // Matches no route and the fallback is off: stored nowhere, yet acknowledged.
    send(&mut c, 2, "m2", "kind=b", b"2").await?;
    // The device's own `site` is what it sent; the enrichment does not overwrite it.
    send(&mut c, 3, "m3", "kind=a&site=mine", b"3").await?;
    // Changes apply without a restart, to the same connection.
    put_ok(&hub, "/ferrohub/routing/fallback", json!({"enabled": true})).await?;
    send(&mut c, 4, "m4", "kind=b", b"4").await?;

    let hot = read(&hub, Some("hot"), 2).await?;
    assert_eq!(ids(&hot), ["m1", "m3"]);
    let p = &hot[0]["properties"];
    assert_eq!(p["kind"], "a");
    assert_eq!(p["site"], "oslo");
    assert_eq!(p["floor"], "3");
    assert_eq!(p["hub"], "localhost");
    assert!(p.get("tier").is_none(), "tier is for events only: {p}");
    assert_eq!(hot[1]["properties"]["site"], "mine");
    let events = read(&hub, None, 1).await?;
    assert_eq!(ids(&events), ["m4"], "m2 went nowhere");
    let p = &events[0]["properties"];
    assert_eq!(
        (&p["tier"], &p["hub"]),
        (&json!("gold"), &json!("localhost"))
    );
    assert!(p.get("site").is_none());
    let view = rest(&hub, Method::GET, "/ferrohub/routing", None).await?;
    assert_eq!(view.body["counters"]["unroutedMessages"], 1);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn routes_and_stream_contents_survive_a_restart() -> TestResult {
    let mut hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    stream(&hub, "hot", 2).await?;
    route(&hub, "all", "true", &["hot"]).await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    send(&mut c, 1, "before", "", b"1").await?;
    drop(c);
    hub.restart().await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    send(&mut c, 1, "after", "", b"2").await?;
    let hot = read(&hub, Some("hot"), 2).await?;
    assert_eq!(ids(&hot), ["before", "after"]);
    // The route still sends nothing to events (fallback only takes unmatched messages).
    let routes = rest(&hub, Method::GET, "/ferrohub/routing/routes", None).await?;
    assert_eq!(routes.body[0]["name"], "all");
    assert_eq!(routes.body[0]["endpointNames"], json!(["hot"]));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_bad_configuration_is_refused_with_the_reason() -> TestResult {
    let hub = TestHub::start().await?;
    stream(&hub, "hot", 1).await?;
    let refused = |a: &Answer, status: u16, needle: &str| -> TestResult {
        let msg = a.body["Message"].as_str().unwrap_or_default().to_string();
        if a.status != status || !msg.contains(needle) {
            return Err(format!(
                "wanted {status} with {needle:?}, got {} {}",
                a.status, a.body
            )
            .into());
        }
        Ok(())
    };
    let a = put(
        &hub,
        "/ferrohub/routing/routes/r1",
        json!({"source": "DeviceMessages", "condition": "level = ", "endpointNames": ["hot"]}),
    )
    .await?;
    refused(&a, 400, "ErrorCode:ArgumentInvalid;")?;
    refused(&a, 400, "line 1, column")?;
    let a = put(
        &hub,
        "/ferrohub/routing/routes/r1",
        json!({"source": "DeviceMessages", "endpointNames": ["cold"]}),
    )
    .await?;
    refused(&a, 400, "endpoint cold does not exist")?;
    let a = put(
        &hub,
        "/ferrohub/routing/routes/r1",
        json!({"source": "Nonsense", "endpointNames": ["hot"]}),
    )
    .await?;
    refused(&a, 400, "invalid route")?;
    let a = put(
        &hub,
        "/ferrohub/routing/endpoints/a.b",
        json!({"type": "stream"}),
    )
    .await?;
    refused(&a, 400, "may hold only")?;
    let a = put(
        &hub,
        "/ferrohub/routing/endpoints/events",
        json!({"type": "stream"}),
    )
    .await?;
    refused(&a, 400, "reserved")?;
    let a = put(
        &hub,
        "/ferrohub/routing/endpoints/hot",
        json!({"type": "stream", "partitions": 3}),
    )
    .await?;
    refused(&a, 409, "fixed at creation")?;
    let a = put(
        &hub,
        "/ferrohub/routing/enrichments/k",
        json!({"value": "$twin.deviceId", "endpointNames": ["hot"]}),
    )
    .await?;
    refused(&a, 400, "a twin path is")?;
    // Nothing refused was stored.
    let view = rest(&hub, Method::GET, "/ferrohub/routing", None).await?;
    assert_eq!(view.body["routes"], json!([]));
    assert_eq!(view.body["enrichments"], json!([]));

    route(&hub, "r1", "true", &["hot"]).await?;
    let a = rest(
        &hub,
        Method::DELETE,
        "/ferrohub/routing/endpoints/hot",
        None,
    )
    .await?;
    refused(&a, 409, "used by route r1")?;
    let a = rest(&hub, Method::DELETE, "/ferrohub/routing/routes/nope", None).await?;
    refused(&a, 404, "route nope does not exist")?;
    let a = rest(&hub, Method::GET, "/events?endpoint=nope", None).await?;
    refused(&a, 404, "endpoint nope does not exist")?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn cli_configures_tests_and_monitors_routes() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let dir = hub.dir.path().to_path_buf();
    // The CLI blocks; it runs off the runtime that serves the hub.
    let cli = |args: &[&str]| {
        let dir = dir.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move { tokio::task::spawn_blocking(move || ferrohub_cli(&dir, &args)).await? }
    };
    let run = |args: &[&str]| {
        let call = cli(args);
        let shown = format!("{args:?}");
        async move {
            let (okay, out, err) = call.await?;
            if !okay {
                return Err(format!("ferrohub {shown} failed: {err}").into());
            }
            R::Ok(out)
        }
    };
    let out = run(&[
        "endpoint",
        "add",
        "hot",
        "--type",
        "stream",
        "--partitions",
        "2",
        "--retention",
        "2h",
    ])
    .await?;
    assert!(
        out.contains("partitions 2") && out.contains("retention 2h"),
        "{out}"
    );
    let out = run(&[
        "route",
        "add",
        "crit",
        "--source",
        "DeviceMessages",
        "--condition",
        "level = 'critical'",
        "--endpoint",
        "hot,events",
    ])
    .await?;
    assert!(out.contains("added route crit"), "{out}");
    run(&[
        "route",
        "add",
        "warm",
        "--condition",
        "$body.temp > 30",
        "--endpoint",
        "hot",
        "--disabled",
    ])
    .await?;
    let out = run(&["route", "list"]).await?;
    assert!(out.contains("crit") && out.contains("hot,events"), "{out}");
    assert!(
        out.contains("disabled") && out.contains("fallback route: on"),
        "{out}"
    );

    let out = run(&["route", "test", "crit", "-p", "level=critical"]).await?;
    assert!(out.contains("route crit matches"), "{out}");
    let out = run(&["route", "test", "crit", "-p", "level=info"]).await?;
    assert!(
        out.contains("does not match: the condition is false"),
        "{out}"
    );
    let body = dir.join("body.json");
    std::fs::write(&body, r#"{"temp": 40}"#)?;
    let body = body.to_string_lossy().to_string();
    let out = run(&["route", "test", "warm", "--body", &body]).await?;
    assert!(
        out.contains("undefined") && out.contains("body is not JSON"),
        "{out}"
    );
    let out = run(&[
        "route",
        "test",
        "warm",
        "--body",
        &body,
        "--content-type",
        "application/json",
        "--content-encoding",
        "utf-8",
    ])
    .await?;
    assert!(out.contains("route warm matches"), "{out}");
    let (okay, _, err) = cli(&[
        "route",
        "add",
        "bad",
        "--condition",
        "a = = 1",
        "--endpoint",
        "hot",
    ])
    .await?;
    assert!(!okay && err.contains("column"), "{err}");

    let out = run(&[
        "enrichment",
        "add",
        "plant",
        "--value",
        "p7",
        "--endpoint",
        "hot",
    ])
    .await?;
    assert!(out.contains("plant = p7 -> hot"), "{out}");
    assert!(run(&["enrichment", "list"]).await?.contains("plant"));

    let (okay, _, err) = cli(&["endpoint", "remove", "hot"]).await?;
    assert!(!okay && err.contains("used by route"), "{err}");

    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    send(&mut c, 1, "m1", "level=critical", b"hello").await?;
    let out = run(&[
        "monitor",
        "--endpoint",
        "hot",
        "--from",
        "start",
        "--count",
        "1",
        "-o",
        "json",
    ])
    .await?;
    let line: Value = serde_json::from_str(out.trim())?;
    assert_eq!(line["systemProperties"]["message-id"], "m1");
    assert_eq!(line["properties"]["plant"], "p7");

    assert!(run(&["fallback", "set", "off"]).await?.contains("off"));
    assert!(run(&["fallback", "show"])
        .await?
        .contains("fallback route: off"));
    run(&["enrichment", "remove", "plant"]).await?;
    run(&["route", "remove", "crit"]).await?;
    run(&["route", "remove", "warm"]).await?;
    assert!(run(&["endpoint", "remove", "hot"])
        .await?
        .contains("removed endpoint hot"));
    let out = run(&["endpoint", "list"]).await?;
    assert!(!out.contains("hot"), "{out}");
    hub.stop().await;
    Ok(())
}

/// `[routing]` of the config file, as `ServerConfig::from_args` resolves it.
fn file_routing(cfg: &mut ferrohub::config::ServerConfig) {
    use ferrohub_hub::routing::{Endpoint, EndpointKind, Enrichment, Route, RouteSource};
    cfg.routing.endpoints = vec![Endpoint {
        name: "filed".into(),
        kind: EndpointKind::Stream {
            partitions: 1,
            retention_secs: 600,
        },
    }];
    cfg.routing.routes = vec![Route {
        name: "from-file".into(),
        source: RouteSource::DeviceMessages,
        condition: "kind = 'f'".into(),
        endpoint_names: vec!["filed".into()],
        is_enabled: true,
    }];
    cfg.routing.enrichments = vec![Enrichment {
        key: "origin".into(),
        value: "toml".into(),
        endpoint_names: vec!["filed".into()],
    }];
}

#[tokio::test]
async fn the_config_files_routing_is_applied_at_start_up() -> TestResult {
    let mut hub = TestHub::start_with(file_routing).await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    send(&mut c, 1, "f1", "kind=f", b"1").await?;
    drop(c);
    // Applied again at a restart: the stream and its contents stay.
    hub.restart().await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    send(&mut c, 1, "f2", "kind=f", b"2").await?;
    let filed = read(&hub, Some("filed"), 2).await?;
    assert_eq!(ids(&filed), ["f1", "f2"]);
    assert_eq!(filed[1]["properties"]["origin"], "toml");
    hub.stop().await;
    Ok(())
}
