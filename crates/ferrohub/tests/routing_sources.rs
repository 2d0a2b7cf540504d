//! The hub's own events as routing sources, end to end over real TLS: lifecycle events from the
//! REST registry and bulk import, twin change events from device reported patches and service
//! twin writes (with `$body` conditions and enrichments), connection state events ordered by
//! their sequence number across a reconnect and a hub restart, digital twin change events of an
//! IoT Plug and Play device; none of them reaches the built-in endpoint without a route.
//!
//! Event-driven: a read returns as soon as the expected events arrived (its time limit only
//! bounds a failure), and what did not reach an endpoint is shown by a later event that did.

mod common;

use std::time::Duration;

use common::*;
use ferrohub_mqtt::{Packet, QoS};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

async fn ok(hub: &TestHub, method: Method, path: &str, body: Value) -> R<Value> {
    let a = rest(hub, method.clone(), path, Some(&body)).await?;
    if a.status != 200 {
        return Err(format!("{method} {path}: {} {}", a.status, a.body).into());
    }
    Ok(a.body)
}

async fn stream(hub: &TestHub, name: &str) -> TestResult {
    let path = format!("/ferrohub/routing/endpoints/{name}");
    ok(
        hub,
        Method::PUT,
        &path,
        json!({"type": "stream", "partitions": 1}),
    )
    .await?;
    Ok(())
}

async fn route(
    hub: &TestHub,
    name: &str,
    source: &str,
    condition: &str,
    to: &[&str],
) -> TestResult {
    let path = format!("/ferrohub/routing/routes/{name}");
    let body = json!({"source": source, "condition": condition, "endpointNames": to});
    ok(hub, Method::PUT, &path, body).await?;
    Ok(())
}

async fn read(hub: &TestHub, endpoint: &str, n: usize) -> R<Vec<Value>> {
    let events = read_events(hub, &format!("from=start&endpoint={endpoint}"), n, WAIT).await?;
    if events.len() < n {
        return Err(format!("{endpoint}: {} of {n} events: {events:?}", events.len()).into());
    }
    Ok(events)
}

fn prop<'a>(e: &'a Value, name: &str) -> &'a str {
    e["properties"][name].as_str().unwrap_or("?")
}

fn sys<'a>(e: &'a Value, name: &str) -> &'a str {
    e["systemProperties"][name].as_str().unwrap_or("?")
}

fn body(e: &Value) -> R<Value> {
    let text = e["body"].as_str().ok_or("no text body")?;
    Ok(serde_json::from_str(text)?)
}

fn op_types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| prop(e, "opType")).collect()
}

/// A telemetry message from `id`, PUBACKed: the first thing the built-in endpoint holds when
/// no route sent it an event before.
async fn telemetry(hub: &TestHub, id: &str, key: &str) -> TestResult {
    let (mut c, _) = hub.connect_device(id, key, true).await?;
    c.publish_qos1(
        1,
        &format!("devices/{id}/messages/events/%24.mid=probe"),
        b"x",
    )
    .await
}

async fn assert_events_starts_with_the_probe(hub: &TestHub) -> TestResult {
    let events = read(hub, "events", 1).await?;
    assert_eq!(sys(&events[0], "message-id"), "probe", "{events:?}");
    Ok(())
}

async fn patch_reported(c: &mut MqttClient, pid: u16, patch: Value) -> TestResult {
    let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid=p{pid}");
    c.send(&publish(
        &topic,
        patch.to_string().as_bytes(),
        QoS::AtLeastOnce,
        pid,
    ))
    .await?;
    // The twin response (204) says the write is durable; its events follow it.
    loop {
        let p = recv_publish(c, WAIT).await?.ok_or("no twin response")?;
        if p.topic.starts_with("$iothub/twin/res/204/") && p.topic.contains(&format!("p{pid}")) {
            return Ok(());
        }
        if p.topic.starts_with("$iothub/twin/res/") {
            return Err(format!("reported patch answered {}", p.topic).into());
        }
    }
}

async fn twin_client(
    hub: &TestHub,
    id: &str,
    key: &str,
    username: Option<String>,
) -> R<MqttClient> {
    let mut c = hub.tls().await?;
    let mut connect = connect_packet(id, Some(&hub.device_token(id, key)), true, 60);
    if let (Packet::Connect(p), Some(u)) = (&mut connect, username) {
        p.username = Some(u);
    }
    let (_, code) = c.connect(connect).await?;
    if code != ferrohub_mqtt::ConnectReturnCode::Accepted {
        return Err(format!("CONNACK {code:?}").into());
    }
    c.subscribe(1, &[("$iothub/twin/res/#", QoS::AtMostOnce)])
        .await?;
    Ok(c)
}

#[tokio::test]
async fn lifecycle_events_of_devices_and_modules_from_rest_and_bulk() -> TestResult {
    let hub = TestHub::start().await?;
    stream(&hub, "life").await?;
    stream(&hub, "deletes").await?;
    route(&hub, "all-life", "DeviceLifecycleEvents", "true", &["life"]).await?;
    route(
        &hub,
        "device-deletes",
        "DeviceLifecycleEvents",
        "opType = 'deleteDeviceIdentity' AND $body.deviceId != 'nobody'",
        &["deletes"],
    )
    .await?;
    // IoT Hub documents no job lifecycle event format: the source is accepted, never emitted.
    route(&hub, "jobs", "DeviceJobLifecycleEvents", "true", &["life"]).await?;

    hub.create_device("d1").await?;
    hub.create_module("d1", "m1").await?;
    hub.api.delete("/devices/d1", Some("*")).await?;
    let bulk = json!([{"id": "d2", "importMode": "create"}]);
    ok(&hub, Method::POST, "/devices", bulk).await?;
    hub.api.delete("/devices/d2", Some("*")).await?;

    let life = read(&hub, "life", 6).await?;
    assert_eq!(
        op_types(&life),
        [
            "createDeviceIdentity",
            "createModuleIdentity",
            "deleteModuleIdentity",
            "deleteDeviceIdentity",
            "createDeviceIdentity",
            "deleteDeviceIdentity",
        ],
        "{life:?}"
    );
    for e in &life {
        assert_eq!(sys(e, "iothub-message-source"), "deviceLifecycleEvents");
        assert_eq!(sys(e, "content-type"), "application/json");
        assert_eq!(sys(e, "content-encoding"), "utf-8");
        assert_eq!(
            prop(e, "iothub-message-schema"),
            "deviceLifecycleNotification"
        );
        assert_eq!(prop(e, "hubName"), sys(e, "user-id"));
        assert_ne!(sys(e, "correlation-id"), "?");
    }
    // The body is the identity's twin as IoT Hub sends it.
    let created = body(&life[0])?;
    assert_eq!(created["deviceId"], "d1");
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["connectionState"], "Disconnected");
    assert!(created["etag"].is_string(), "{created}");
    assert_eq!(created["properties"]["desired"]["$version"], 1);
    assert_eq!(life[0]["deviceId"], "d1");
    assert_eq!(sys(&life[0], "iothub-connection-device-id"), "d1");
    // Module events carry the module, in the body and in the properties.
    let module = body(&life[1])?;
    assert_eq!(
        (module["deviceId"].as_str(), module["moduleId"].as_str()),
        (Some("d1"), Some("m1"))
    );
    assert_eq!(prop(&life[1], "moduleId"), "m1");
    assert_eq!(sys(&life[1], "iothub-connection-module-id"), "m1");
    assert_eq!(sys(&life[2], "iothub-connection-module-id"), "m1");
    // A deletion carries the twin from before it.
    assert_eq!(body(&life[3])?["deviceId"], "d1");
    assert_eq!(body(&life[4])?["deviceId"], "d2");

    // The condition on opType took the two device deletions, nothing else, in order.
    let deletes = read(&hub, "deletes", 2).await?;
    assert_eq!(
        op_types(&deletes),
        ["deleteDeviceIdentity", "deleteDeviceIdentity"]
    );
    assert_eq!(
        (
            deletes[0]["deviceId"].as_str(),
            deletes[1]["deviceId"].as_str()
        ),
        (Some("d1"), Some("d2"))
    );

    // No fallback for events: the built-in endpoint's first message is the telemetry below.
    let (key, _) = hub.create_device("d3").await?;
    telemetry(&hub, "d3", &key).await?;
    assert_events_starts_with_the_probe(&hub).await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn twin_change_events_from_device_and_service_writes() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    stream(&hub, "hot").await?;
    stream(&hub, "twins").await?;
    route(
        &hub,
        "hot-reported",
        "TwinChangeEvents",
        "$body.properties.reported.temp > 20",
        &["hot"],
    )
    .await?;
    route(&hub, "all-twins", "TwinChangeEvents", "true", &["twins"]).await?;
    // Enrichments apply to events too, from the twin as it is when the event is routed.
    let enrichment = json!({"key": "site", "value": "$twin.tags.site", "endpointNames": ["hot"]});
    ok(
        &hub,
        Method::PUT,
        "/ferrohub/routing/enrichments/site",
        enrichment,
    )
    .await?;

    let mut c = twin_client(&hub, "dev1", &key, None).await?;
    patch_reported(&mut c, 2, json!({"temp": 25})).await?;
    patch_reported(&mut c, 3, json!({"temp": 10})).await?;
    let tagged = json!({"tags": {"site": "oslo"}, "properties": {"desired": {"fw": "2.1"}}});
    ok(&hub, Method::PATCH, "/twins/dev1", tagged).await?;
    let replaced = json!({"tags": {"site": "bergen"}, "properties": {"desired": {"fw": "3"}}});
    ok(&hub, Method::PUT, "/twins/dev1", replaced).await?;
    patch_reported(&mut c, 4, json!({"temp": 30})).await?;

    let all = read(&hub, "twins", 5).await?;
    assert_eq!(
        op_types(&all),
        [
            "updateTwin",
            "updateTwin",
            "updateTwin",
            "replaceTwin",
            "updateTwin"
        ],
        "{all:?}"
    );
    for e in &all {
        assert_eq!(sys(e, "iothub-message-source"), "twinChangeEvents");
        assert_eq!(prop(e, "iothub-message-schema"), "twinChangeNotification");
        assert_eq!(prop(e, "deviceId"), "dev1");
    }
    let versions: Vec<u64> = all
        .iter()
        .map(|e| body(e).map(|b| b["version"].as_u64().unwrap_or(0)))
        .collect::<R<_>>()?;
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let reported = body(&all[0])?;
    assert_eq!(reported["properties"]["reported"]["temp"], 25);
    assert_eq!(reported["properties"]["reported"]["$version"], 2);
    // As IoT Hub's: the changed properties' metadata rides along.
    let meta = &reported["properties"]["reported"]["$metadata"];
    assert!(meta["$lastUpdated"].is_string(), "{reported}");
    assert!(meta["temp"]["$lastUpdated"].is_string(), "{reported}");
    assert!(reported.get("tags").is_none(), "{reported}");
    let service = body(&all[2])?;
    assert_eq!(service["tags"], json!({"site": "oslo"}));
    assert_eq!(service["properties"]["desired"]["fw"], "2.1");
    assert_eq!(service["properties"]["desired"]["$version"], 2);
    let meta = &service["properties"]["desired"]["$metadata"];
    assert!(meta["fw"]["$lastUpdated"].is_string(), "{service}");
    assert_eq!(meta["fw"]["$lastUpdatedVersion"], 2, "{service}");
    let replace = body(&all[3])?;
    assert_eq!(replace["tags"], json!({"site": "bergen"}));
    assert_eq!(replace["properties"]["desired"]["fw"], "3");

    // The $body condition took temp 25 and 30, not 10; the later one carries the enrichment.
    let hot = read(&hub, "hot", 2).await?;
    let temps: Vec<Value> = hot
        .iter()
        .map(|e| body(e).map(|b| b["properties"]["reported"]["temp"].clone()))
        .collect::<R<_>>()?;
    assert_eq!(temps, [json!(25), json!(30)]);
    assert_eq!(prop(&hot[1], "site"), "bergen");
    assert_eq!(prop(&all[4], "site"), "?", "the enrichment is for hot only");

    telemetry(&hub, "dev1", &key).await?;
    assert_events_starts_with_the_probe(&hub).await?;
    hub.stop().await;
    Ok(())
}

/// Events of `endpoint` sorted by their body's `sequenceNumber`, with it.
fn by_sequence(events: &[Value]) -> R<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in events {
        let seq = body(e)?["sequenceNumber"]
            .as_str()
            .ok_or("no sequenceNumber")?
            .to_string();
        assert_eq!(seq.len(), 64, "{seq}");
        assert!(seq.chars().all(|c| c.is_ascii_hexdigit()), "{seq}");
        out.push((seq, prop(e, "opType").to_string()));
    }
    out.sort();
    Ok(out)
}

#[tokio::test]
async fn connection_state_events_order_across_a_reconnect_and_a_restart() -> TestResult {
    let mut hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    stream(&hub, "conn").await?;
    route(
        &hub,
        "connections",
        "DeviceConnectionStateEvents",
        "$connectionDeviceId = 'dev1'",
        &["conn"],
    )
    .await?;
    for _ in 0..2 {
        let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
        c.send(&Packet::Disconnect).await?;
        c.expect_closed().await?;
    }
    // The second disconnect may be stored after the reconnect's connect or before: the
    // sequence numbers tell the order, not the stream.
    let before = read(&hub, "conn", 4).await?;
    for e in &before {
        assert_eq!(
            sys(e, "iothub-message-source"),
            "deviceConnectionStateEvents"
        );
        assert_eq!(
            prop(e, "iothub-message-schema"),
            "deviceConnectionStateNotification"
        );
    }
    hub.restart().await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.send(&Packet::Disconnect).await?;
    c.expect_closed().await?;
    let all = read(&hub, "conn", 6).await?;
    let ordered = by_sequence(&all)?;
    let ops: Vec<&str> = ordered.iter().map(|(_, op)| op.as_str()).collect();
    assert_eq!(
        ops,
        [
            "deviceConnected",
            "deviceDisconnected",
            "deviceConnected",
            "deviceDisconnected",
            "deviceConnected",
            "deviceDisconnected",
        ],
        "{ordered:?}"
    );
    // The restart's events sort after every event of the run before it.
    let first_run = by_sequence(&before)?;
    let last_of_first = first_run.last().map(|(s, _)| s.clone()).unwrap_or_default();
    assert_eq!(ordered[3].0, last_of_first);
    assert!(ordered[4].0 > last_of_first);
    hub.stop().await;
    Ok(())
}

const MODEL: &str = "dtmi:com:example:Thermostat;1";

#[tokio::test]
async fn digital_twin_change_events_are_json_patches_of_plug_and_play_devices() -> TestResult {
    let hub = TestHub::start().await?;
    let (plain_key, _) = hub.create_device("plain").await?;
    let (key, _) = hub.create_device("pnp").await?;
    stream(&hub, "dt").await?;
    route(&hub, "dt", "DigitalTwinChangeEvents", "true", &["dt"]).await?;

    // A device without a model has no digital twin: its patch emits nothing.
    let mut plain = twin_client(&hub, "plain", &plain_key, None).await?;
    patch_reported(&mut plain, 2, json!({"temp": 1})).await?;
    let username = format!(
        "{HOST}/pnp/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"
    );
    let mut c = twin_client(&hub, "pnp", &key, Some(username)).await?;
    patch_reported(&mut c, 2, json!({"temperature": 21.5})).await?;
    let desired = json!({"properties": {"desired": {"targetTemperature": 30}}});
    ok(&hub, Method::PATCH, "/twins/pnp", desired).await?;

    let dt = read(&hub, "dt", 2).await?;
    for e in &dt {
        assert_eq!(e["deviceId"], "pnp", "{dt:?}");
        assert_eq!(sys(e, "iothub-message-source"), "digitalTwinChangeEvents");
        assert_eq!(sys(e, "dt-dataschema"), MODEL);
        assert_eq!(prop(e, "opType"), "updateTwin");
        assert_eq!(
            prop(e, "iothub-message-schema"),
            "digitalTwinChangeNotification"
        );
    }
    let reported = body(&dt[0])?;
    let ops = reported.as_array().ok_or("not a JSON Patch")?;
    assert!(
        ops.contains(&json!({"op": "add", "path": "/temperature", "value": 21.5})),
        "{reported}"
    );
    assert!(
        ops.iter()
            .all(|op| op["op"] == "add" || op["op"] == "replace"),
        "{reported}"
    );
    let desired = body(&dt[1])?;
    let ops = desired.as_array().ok_or("not a JSON Patch")?;
    assert!(
        ops.iter().any(|op| op["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/$metadata/targetTemperature"))),
        "{desired}"
    );

    telemetry(&hub, "plain", &plain_key).await?;
    assert_events_starts_with_the_probe(&hub).await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_cli_adds_routes_of_every_source_and_tests_them_as_json() -> TestResult {
    let hub = TestHub::start().await?;
    stream(&hub, "life").await?;
    let dir = hub.dir.path().to_path_buf();
    let cli = |args: &'static [&'static str]| {
        let dir = dir.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move { tokio::task::spawn_blocking(move || ferrohub_cli(&dir, &args)).await? }
    };
    let (okay, out, err) = cli(&[
        "route",
        "add",
        "deletes",
        "--source",
        "DeviceLifecycleEvents",
        "--condition",
        "opType = 'deleteDeviceIdentity'",
        "--endpoint",
        "life",
    ])
    .await?;
    assert!(okay, "{out}{err}");
    let (okay, out, err) = cli(&[
        "route",
        "add",
        "conn",
        "--source",
        "DeviceConnectionStateEvents",
        "--endpoint",
        "life",
    ])
    .await?;
    assert!(okay, "{out}{err}");
    let routes = rest(&hub, Method::GET, "/ferrohub/routing/routes", None).await?;
    assert_eq!(routes.body[0]["source"], "DeviceLifecycleEvents");
    assert_eq!(routes.body[1]["source"], "DeviceConnectionStateEvents");
    // A test of an event route reads the body as JSON without being told its content type.
    let test = json!({"body": "{\"deviceId\": \"d1\"}", "appProperties": {"opType": "deleteDeviceIdentity"}});
    let a = ok(
        &hub,
        Method::POST,
        "/ferrohub/routing/routes/deletes/test",
        test,
    )
    .await?;
    assert_eq!(a["result"], "true", "{a}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_taken_over_connection_s_disconnect_sorts_before_the_new_connect() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    stream(&hub, "conn").await?;
    route(
        &hub,
        "connections",
        "DeviceConnectionStateEvents",
        "true",
        &["conn"],
    )
    .await?;
    let (mut old, _) = hub.connect_device("dev1", &key, true).await?;
    // The same identity connects again: the old connection is closed, and its disconnect may
    // be stored after the new connect.
    let (mut new, _) = hub.connect_device("dev1", &key, true).await?;
    old.expect_closed().await?;
    new.send(&Packet::Disconnect).await?;
    new.expect_closed().await?;
    let all = read(&hub, "conn", 4).await?;
    let ops: Vec<String> = by_sequence(&all)?.into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops,
        [
            "deviceConnected",
            "deviceDisconnected",
            "deviceConnected",
            "deviceDisconnected"
        ],
        "{all:?}"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn each_device_s_end_of_a_job_is_a_device_job_lifecycle_event() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("d1").await?;
    hub.create_device("d2").await?;
    stream(&hub, "jobs").await?;
    route(&hub, "jobs", "DeviceJobLifecycleEvents", "true", &["jobs"]).await?;
    let start =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?;
    ok(
        &hub,
        Method::PUT,
        "/jobs/v2/j1",
        json!({
            "jobId": "j1",
            "type": "scheduleUpdateTwin",
            "queryCondition": "deviceId IN ['d1', 'd2']",
            "startTime": start,
            "maxExecutionTimeInSeconds": 60,
            "updateTwin": {"etag": "*", "tags": {"fw": "2.0"}}
        }),
    )
    .await?;
    let events = read(&hub, "jobs", 2).await?;
    let mut devices: Vec<&str> = events
        .iter()
        .map(|e| sys(e, "iothub-connection-device-id"))
        .collect();
    devices.sort_unstable();
    assert_eq!(devices, ["d1", "d2"]);
    for e in &events {
        assert_eq!(prop(e, "opType"), "deviceJobCompleted");
        assert_eq!(sys(e, "iothub-message-source"), "deviceJobLifecycleEvents");
        let b = body(e)?;
        assert_eq!(b["jobId"], "j1");
        assert_eq!(b["jobType"], "scheduleUpdateTwin");
        assert_eq!(b["status"], "completed");
        assert!(b["endTimeUtc"].is_string());
    }
    hub.stop().await;
    Ok(())
}
