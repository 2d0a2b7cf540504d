//! Device and module twins end to end: the device's GET and reported patches over MQTT/TLS,
//! the service's REST reads and updates with etags, desired notifications, limits, throttling
//! and IoT Plug and Play shapes, on a real hub with its SQLite store.

mod common;

use common::*;
use ferrohub_mqtt::{Packet, Publish, QoS};
use serde_json::{json, Value};
use std::time::Duration;

const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version=v]` → (status, rid, version).
fn parse_response(topic: &str) -> R<(u16, String, Option<u64>)> {
    let rest = topic
        .strip_prefix("$iothub/twin/res/")
        .ok_or_else(|| format!("not a twin response: {topic}"))?;
    let (status, query) = rest.split_once("/?").ok_or("no query")?;
    let mut rid = None;
    let mut version = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("$rid", v)) => rid = Some(v.to_string()),
            Some(("$version", v)) => version = Some(v.parse()?),
            _ => {}
        }
    }
    Ok((status.parse()?, rid.ok_or("no $rid")?, version))
}

/// Publishes a twin request and waits for its response (skipping other publishes).
async fn request(
    c: &mut MqttClient,
    pid: u16,
    topic: &str,
    body: &[u8],
) -> R<(u16, Option<u64>, Vec<u8>)> {
    c.send(&publish(topic, body, QoS::AtLeastOnce, pid)).await?;
    let rid = topic.rsplit_once("$rid=").map(|(_, r)| r.to_string());
    loop {
        let p: Publish = recv_publish(c, WAIT).await?.ok_or("no twin response")?;
        if !p.topic.starts_with("$iothub/twin/res/") {
            continue;
        }
        let (status, got_rid, version) = parse_response(&p.topic)?;
        if Some(got_rid) == rid {
            return Ok((status, version, p.payload.to_vec()));
        }
    }
}

async fn get(c: &mut MqttClient, pid: u16) -> R<Value> {
    let (status, _, body) =
        request(c, pid, &format!("$iothub/twin/GET/?$rid=g{pid}"), b" ").await?;
    if status != 200 {
        return Err(format!("twin GET answered {status}").into());
    }
    Ok(serde_json::from_slice(&body)?)
}

async fn patch_reported(
    c: &mut MqttClient,
    pid: u16,
    patch: &Value,
) -> R<(u16, Option<u64>, Vec<u8>)> {
    request(
        c,
        pid,
        &format!("$iothub/twin/PATCH/properties/reported/?$rid=p{pid}"),
        patch.to_string().as_bytes(),
    )
    .await
}

#[tokio::test]
async fn get_answers_without_a_response_subscription_and_reported_patches_merge() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    // No SUBSCRIBE to $iothub/twin/res/#: the Python SDK's GET after a reconnect does this.
    let twin = get(&mut c, 1).await?;
    assert_eq!(
        twin,
        json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );
    let (status, version, body) = patch_reported(
        &mut c,
        2,
        &json!({"battery": 55, "net": {"ssid": "home", "rssi": -40}, "fw": "1.0"}),
    )
    .await?;
    assert_eq!((status, version), (204, Some(2)));
    assert!(body.is_empty());
    let (status, version, _) = patch_reported(
        &mut c,
        3,
        &json!({"net": {"rssi": null}, "fw": null, "new": [1, 2]}),
    )
    .await?;
    assert_eq!((status, version), (204, Some(3)));
    let twin = get(&mut c, 4).await?;
    assert_eq!(
        twin["reported"],
        json!({"battery": 55, "net": {"ssid": "home"}, "new": [1, 2], "$version": 3})
    );
    // The service sees the same, with metadata.
    let t = hub.api.get("/twins/dev1").await?;
    assert_eq!(t["deviceId"], "dev1");
    assert_eq!(t["properties"]["reported"]["battery"], 55);
    assert_eq!(t["properties"]["reported"]["$version"], 3);
    assert!(t["properties"]["reported"]["$metadata"]["battery"]["$lastUpdated"].is_string());
    assert!(t["properties"]["reported"]["$metadata"]["fw"].is_null());
    assert_eq!(t["connectionState"], "Connected");
    assert!(t["etag"].is_string());
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_reported_patches_get_400_with_a_json_error_and_change_nothing() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    patch_reported(&mut c, 1, &json!({"ok": 1})).await?;
    let bad: Vec<Vec<u8>> = vec![
        b"[1,2]".to_vec(),
        b"not json".to_vec(),
        b"42".to_vec(),
        json!({"a.b": 1}).to_string().into_bytes(),
        json!({"$reserved": 1}).to_string().into_bytes(),
        json!({"has space": 1}).to_string().into_bytes(),
        json!({"s": "x".repeat(4 * 1024 + 1)})
            .to_string()
            .into_bytes(),
        // 11 levels deep.
        (1..=11)
            .rev()
            .fold(json!({}), |inner, i| json!({ format!("l{i}"): inner }))
            .to_string()
            .into_bytes(),
        // A valid member next to an invalid one: neither is applied.
        json!({"fine": 1, "bad#key": 2}).to_string().into_bytes(),
    ];
    for (i, body) in bad.iter().enumerate() {
        let pid = 10 + i as u16;
        let (status, version, err) = request(
            &mut c,
            pid,
            &format!("$iothub/twin/PATCH/properties/reported/?$rid=b{pid}"),
            body,
        )
        .await?;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(version, None);
        let err: Value = serde_json::from_slice(&err)?;
        assert_eq!(err["errorCode"], 400004, "{err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let twin = get(&mut c, 50).await?;
    assert_eq!(twin["reported"], json!({"ok": 1, "$version": 2}));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn reported_size_limit_is_exact() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    // `{"k0":"…","k1":"…",…}` sized to exactly 32 KiB of compact JSON, strings under 4 KiB.
    let limit = 32 * 1024;
    let mut obj = serde_json::Map::new();
    let mut i = 0;
    loop {
        let size = Value::Object(obj.clone()).to_string().len();
        let left = limit - size;
        if left == 0 {
            break;
        }
        let key = format!("k{i}");
        // `"kN":"…"` costs key + 5 bytes around the value, plus a comma after the first.
        let overhead = key.len() + if obj.is_empty() { 5 } else { 6 };
        let room = left - overhead;
        // Leave either nothing or enough for one more member.
        let n = if room <= 4000 {
            room
        } else if room - 4000 <= overhead + 8 {
            2000
        } else {
            4000
        };
        obj.insert(key, Value::String("x".repeat(n)));
        i += 1;
    }
    let exact = Value::Object(obj);
    assert_eq!(exact.to_string().len(), limit);
    let (status, _, _) = patch_reported(&mut c, 1, &exact).await?;
    assert_eq!(status, 204, "exactly 32 KiB fits");
    let (status, _, _) = patch_reported(
        &mut c,
        2,
        &json!({"k0": format!("{}x", exact["k0"].as_str().unwrap_or(""))}),
    )
    .await?;
    assert_eq!(status, 400, "one byte more does not");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn pipelined_reported_patches_lose_nothing_and_versions_increase() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    // Service desired updates race with the device's reported ones on the same twin.
    let api = hub.api.clone();
    let service = tokio::spawn(async move {
        for i in 0..20 {
            api.patch(
                "/twins/dev1",
                &json!({"properties": {"desired": {format!("d{i}"): i}}}),
                Some("*"),
            )
            .await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let n = 60u16;
    for i in 1..=n {
        c.send(&publish(
            &format!("$iothub/twin/PATCH/properties/reported/?$rid={i}"),
            json!({format!("r{i}"): i}).to_string().as_bytes(),
            QoS::AtLeastOnce,
            i,
        ))
        .await?;
    }
    let mut versions = Vec::new();
    while versions.len() < n as usize {
        let p = recv_publish(&mut c, WAIT)
            .await?
            .ok_or("missing response")?;
        if let Ok((status, rid, version)) = parse_response(&p.topic) {
            assert_eq!(status, 204);
            versions.push((rid.parse::<u16>()?, version.ok_or("no $version")?));
        }
    }
    service.await??;
    versions.sort();
    let only: Vec<u64> = versions.iter().map(|(_, v)| *v).collect();
    assert!(
        only.windows(2).all(|w| w[0] < w[1]),
        "in request order the versions strictly increase: {only:?}"
    );
    let twin = hub.api.get("/twins/dev1").await?;
    for i in 1..=n {
        assert_eq!(twin["properties"]["reported"][format!("r{i}")], i);
    }
    for i in 0..20 {
        assert_eq!(twin["properties"]["desired"][format!("d{i}")], i);
    }
    assert_eq!(twin["properties"]["reported"]["$version"], u64::from(n) + 1);
    assert_eq!(twin["properties"]["desired"]["$version"], 21);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn desired_updates_reach_the_device_in_version_order() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(DESIRED, QoS::AtMostOnce)]).await?;
    let mut calls = Vec::new();
    for i in 0..20 {
        let api = hub.api.clone();
        calls.push(tokio::spawn(async move {
            api.patch(
                "/twins/dev1",
                &json!({"properties": {"desired": {"setpoint": i, "nested": {"n": i}}}}),
                None,
            )
            .await
        }));
    }
    for call in calls {
        call.await??;
    }
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let p = recv_publish(&mut c, WAIT)
            .await?
            .ok_or("missing notification")?;
        let v: u64 = p
            .topic
            .strip_prefix("$iothub/twin/PATCH/properties/desired/?$version=")
            .ok_or("bad topic")?
            .parse()?;
        let body: Value = serde_json::from_slice(&p.payload)?;
        assert_eq!(body["$version"], v, "the body carries the topic's version");
        assert!(body["setpoint"].is_number());
        seen.push(v);
    }
    assert_eq!(
        seen,
        (2..=21).collect::<Vec<u64>>(),
        "every version, in order"
    );
    // A removal arrives as null.
    hub.api
        .patch(
            "/twins/dev1",
            &json!({"properties": {"desired": {"nested": null}}}),
            None,
        )
        .await?;
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("no removal notification")?;
    let body: Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(body, json!({"nested": null, "$version": 22}));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn etags_guard_service_updates() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let t = hub.api.get("/twins/dev1").await?;
    let etag = t["etag"].as_str().ok_or("no etag")?.to_string();
    // Ten writers with the same etag: exactly one wins.
    let mut calls = Vec::new();
    for i in 0..10 {
        let api = hub.api.clone();
        let etag = etag.clone();
        calls.push(tokio::spawn(async move {
            api.patch(
                "/twins/dev1",
                &json!({"tags": {"writer": i}}),
                Some(&format!("\"{etag}\"")),
            )
            .await
        }));
    }
    let mut ok = 0;
    for call in calls {
        match call.await? {
            Ok(_) => ok += 1,
            Err(e) => assert!(e.to_string().contains("412 PreconditionFailed"), "{e}"),
        }
    }
    assert_eq!(ok, 1, "one writer wins the race");
    let t2 = hub.api.get("/twins/dev1").await?;
    assert_ne!(t2["etag"], t["etag"]);
    assert_eq!(t2["version"], t["version"].as_u64().unwrap_or(0) + 1);
    // The current etag works, unquoted or quoted; `*` always does.
    let cur = t2["etag"].as_str().ok_or("no etag")?;
    let t3 = hub
        .api
        .patch("/twins/dev1", &json!({"tags": {"x": 1}}), Some(cur))
        .await?;
    hub.api
        .patch("/twins/dev1", &json!({"tags": {"y": 1}}), Some("*"))
        .await?;
    let err = hub
        .api
        .patch("/twins/dev1", &json!({"tags": {"z": 1}}), Some(cur))
        .await
        .err()
        .ok_or("stale etag accepted")?;
    assert!(err.to_string().contains("412 PreconditionFailed"), "{err}");
    assert_eq!(t3["tags"]["x"], 1);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn put_replaces_tags_and_desired_and_bad_bodies_are_refused() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    hub.api
        .patch(
            "/twins/dev1",
            &json!({"tags": {"a": 1, "b": 2}, "properties": {"desired": {"x": 1, "y": 2}}}),
            None,
        )
        .await?;
    let t = hub
        .api
        .put(
            "/twins/dev1",
            &json!({"tags": {"c": 3}, "properties": {"desired": {"z": 3}}}),
            Some("*"),
        )
        .await?;
    assert_eq!(t["tags"], json!({"c": 3}));
    assert_eq!(t["properties"]["desired"]["z"], 3);
    assert!(t["properties"]["desired"]["x"].is_null());
    // What GET returned can be sent back as is (the SDK's replace_twin round trip).
    let back = hub.api.put("/twins/dev1", &t, Some("*")).await?;
    assert_eq!(back["tags"], json!({"c": 3}));
    let too_big = json!({"properties": {"desired": {"big": "x".repeat(4000), "b2": "y".repeat(4000),
        "b3": "z".repeat(4000), "b4": "x".repeat(4000), "b5": "x".repeat(4000), "b6": "x".repeat(4000),
        "b7": "x".repeat(4000), "b8": "x".repeat(4000), "b9": "x".repeat(1000)}}});
    for (body, code) in [
        (json!([1]), "400 ArgumentInvalid"),
        (too_big, "400 ArgumentInvalid"),
        (
            json!({"tags": {"t": "x".repeat(4000), "u": "x".repeat(4000), "v": "x".repeat(300)}}),
            "400 ArgumentInvalid",
        ),
        (json!({"tags": {"bad.key": 1}}), "400 ArgumentInvalid"),
    ] {
        let err = hub
            .api
            .patch("/twins/dev1", &body, None)
            .await
            .err()
            .ok_or("accepted")?;
        assert!(err.to_string().contains(code), "{err}");
    }
    let err = hub
        .api
        .get("/twins/ghost")
        .await
        .err()
        .ok_or("ghost twin")?;
    assert!(err.to_string().contains("404 DeviceNotFound"), "{err}");
    let unchanged = hub.api.get("/twins/dev1").await?;
    assert_eq!(unchanged["version"], back["version"]);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn module_twins_and_model_ids() -> TestResult {
    let mut hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let (mkey, _) = hub.create_module("dev1", "mod1").await?;
    let mut c = hub.tls().await?;
    let token = token_for(
        &format!("{HOST}/devices/dev1/modules/mod1"),
        &mkey,
        3600,
        None,
    );
    let mut connect = connect_packet("dev1/mod1", Some(&token), true, 60);
    if let Packet::Connect(ref mut p) = connect {
        p.username = Some(format!(
            "{HOST}/dev1/mod1/?api-version=2020-09-30&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"
        ));
    }
    c.connect(connect).await?;
    c.subscribe(1, &[(DESIRED, QoS::AtMostOnce)]).await?;
    // IoT Plug and Play shapes are kept verbatim.
    let pnp = json!({
        "thermostat1": {"__t": "c", "maxTempSinceLastReboot": 38.7,
                        "targetTemperature": {"value": 23.2, "ac": 200, "av": 3, "ad": "Successfully updated"}},
        "serialNumber": "SN-1"
    });
    let (status, version, _) = patch_reported(&mut c, 2, &pnp).await?;
    assert_eq!((status, version), (204, Some(2)));
    let t = hub.api.get("/twins/dev1/modules/mod1").await?;
    assert_eq!(t["moduleId"], "mod1");
    assert_eq!(t["modelId"], "dtmi:com:example:Thermostat;1");
    assert_eq!(
        t["properties"]["reported"]["thermostat1"],
        pnp["thermostat1"]
    );
    hub.api
        .patch(
            "/twins/dev1/modules/mod1",
            &json!({"properties": {"desired": {"thermostat1": {"__t": "c", "targetTemperature": 23.2}}}}),
            None,
        )
        .await?;
    let p = recv_publish(&mut c, WAIT).await?.ok_or("no notification")?;
    let body: Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(
        body,
        json!({"thermostat1": {"__t": "c", "targetTemperature": 23.2}, "$version": 2})
    );
    // The device's twin is a different document.
    let d = hub.api.get("/twins/dev1").await?;
    assert!(d["properties"]["reported"]["thermostat1"].is_null());
    // Everything survives a restart.
    drop(c);
    hub.restart().await?;
    let t2 = hub.api.get("/twins/dev1/modules/mod1").await?;
    assert_eq!(t2["modelId"], "dtmi:com:example:Thermostat;1");
    assert_eq!(
        t2["properties"]["reported"]["thermostat1"],
        pnp["thermostat1"]
    );
    assert_eq!(t2["properties"]["desired"]["$version"], 2);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn throttled_operations_get_429() -> TestResult {
    let hub = TestHub::start_with(|cfg| {
        cfg.hub.throttle.twin_reads = std::num::NonZeroU32::new(1);
        cfg.hub.throttle.method_calls = std::num::NonZeroU32::new(1);
    })
    .await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    let mut statuses = Vec::new();
    for pid in 1..=3 {
        let (status, _, body) =
            request(&mut c, pid, &format!("$iothub/twin/GET/?$rid=t{pid}"), b"").await?;
        if status == 429 {
            let err: Value = serde_json::from_slice(&body)?;
            assert_eq!(err["errorCode"], 429001);
        }
        statuses.push(status);
    }
    assert_eq!(statuses[0], 200);
    assert!(statuses.contains(&429), "{statuses:?}");
    let err = hub
        .api
        .get("/twins/dev1")
        .await
        .err()
        .ok_or("not throttled")?;
    assert!(err.to_string().contains("429 ThrottlingException"), "{err}");
    // Updates are not limited here.
    let (status, _, _) = patch_reported(&mut c, 9, &json!({"a": 1})).await?;
    assert_eq!(status, 204);
    hub.api
        .post("/twins/dev1/methods", &json!({"methodName": "m"}))
        .await
        .err()
        .ok_or("offline method call succeeded")?;
    let err = hub
        .api
        .post("/twins/dev1/methods", &json!({"methodName": "m"}))
        .await
        .err()
        .ok_or("second call not throttled")?;
    assert!(err.to_string().contains("429 ThrottlingException"), "{err}");
    hub.stop().await;
    Ok(())
}

/// A device that pipelines GETs of a large twin and does not read: the server must not keep a
/// response (or a task holding one) per request. Responses past the connection's queue are
/// dropped and counted, and the device gets answers again once it reads.
#[tokio::test]
async fn pipelined_gets_that_are_not_read_are_dropped_not_buffered() -> TestResult {
    const GETS: usize = 1000;
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    // About 30 KB of desired properties (strings stop at 4 KB each).
    let desired: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("p{i}"), json!("x".repeat(3800))))
        .collect();
    hub.api
        .patch(
            "/twins/dev1",
            &json!({"properties": {"desired": desired}}),
            Some("*"),
        )
        .await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    let server_hub = hub.server().hub.clone();
    let dropped_before = server_hub.dropped_replies();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    // All requests in one write, then a telemetry message: the connection handles its
    // publishes in order, so once that message is in the log every GET has been answered,
    // queued or dropped.
    let mut burst = bytes::BytesMut::new();
    for i in 0..GETS {
        let get = publish(
            &format!("$iothub/twin/GET/?$rid={i}"),
            b"",
            QoS::AtMostOnce,
            0,
        );
        ferrohub_mqtt::encode(&get, &mut burst)?;
    }
    let marker = publish(
        "devices/dev1/messages/events/",
        b"marker",
        QoS::AtMostOnce,
        0,
    );
    ferrohub_mqtt::encode(&marker, &mut burst)?;
    c.send_raw(&burst).await?;
    let events = read_events(&hub, "from=start", 1, WAIT).await?;
    assert_eq!(events.len(), 1, "the message after the GETs was handled");

    let dropped = server_hub.dropped_replies() - dropped_before;
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        dropped > 0,
        "a device that does not read gets responses dropped"
    );
    assert!(
        tasks < tasks_before + 50,
        "{tasks} tasks alive, {tasks_before} before the GETs: the server parks responses"
    );

    // The device reads again: whatever was queued arrives, then a fresh GET is answered.
    c.send(&publish(
        "$iothub/twin/GET/?$rid=fresh",
        b"",
        QoS::AtMostOnce,
        0,
    ))
    .await?;
    let mut answered = 0usize;
    loop {
        let p = recv_publish(&mut c, WAIT)
            .await?
            .ok_or("the fresh GET was not answered")?;
        let (status, rid, _) = parse_response(&p.topic)?;
        assert_eq!(status, 200);
        if rid == "fresh" {
            let twin: Value = serde_json::from_slice(&p.payload)?;
            assert_eq!(twin["desired"]["p7"].as_str().map(str::len), Some(3800));
            break;
        }
        answered += 1;
    }
    assert_eq!(
        answered as u64 + dropped,
        GETS as u64,
        "every GET was either answered or counted as dropped"
    );
    hub.stop().await;
    Ok(())
}

/// Connects `id` (persistent session), sends bursts of GETs of a 30 KB twin and reads none of
/// the answers, until far more than the socket buffers hold was queued: the server's writes
/// to it block, as to a device whose network vanished without a FIN.
async fn stop_reading_with_writes_pending(hub: &TestHub, id: &str, key: &str) -> R<MqttClient> {
    let desired: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("p{i}"), json!("x".repeat(3800))))
        .collect();
    hub.api
        .patch(
            &format!("/twins/{id}"),
            &json!({"properties": {"desired": desired}}),
            Some("*"),
        )
        .await?;
    let (mut c, _) = hub.connect_device(id, key, false).await?;
    let server_hub = hub.server().hub.clone();
    // Each burst a connection handles leaves a full outbound queue (64 replies, 2 MB) written
    // or waiting, and drops the rest. Once the socket buffers are full the connection sits in a
    // write and handles no more bursts: that is the state wanted.
    for burst_no in 0..40 {
        let dropped_before = server_hub.dropped_replies();
        let mut burst = bytes::BytesMut::new();
        for i in 0..200 {
            let get = publish(
                &format!("$iothub/twin/GET/?$rid={burst_no}-{i}"),
                b"",
                QoS::AtMostOnce,
                0,
            );
            ferrohub_mqtt::encode(&get, &mut burst)?;
        }
        c.send_raw(&burst).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while server_hub.dropped_replies() == dropped_before {
            if tokio::time::Instant::now() > deadline {
                // Not read: the connection is stuck in a write.
                assert!(burst_no > 0, "the first burst was not handled at all");
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Err("the server's writes never blocked".into())
}

/// A device whose old connection the server cannot write to reconnects: the takeover must not
/// wait for that write to time out (the keep-alive window, 90 s here). Disabling a device in
/// that state must close it at once too.
#[tokio::test]
async fn a_connection_stuck_in_a_write_does_not_hold_its_identity() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let _stuck = stop_reading_with_writes_pending(&hub, "dev1", &key).await?;
    let started = tokio::time::Instant::now();
    let (_c, present) = tokio::time::timeout(
        Duration::from_secs(10),
        hub.connect_device("dev1", &key, false),
    )
    .await
    .map_err(|_| "the reconnect waited for the stuck connection")??;
    assert!(present, "the persistent session was taken over");
    assert!(started.elapsed() < Duration::from_secs(10));

    let (key2, _) = hub.create_device("dev2").await?;
    let _stuck = stop_reading_with_writes_pending(&hub, "dev2", &key2).await?;
    let d = hub.api.get("/devices/dev2").await?;
    assert_eq!(d["connectionState"], "Connected");
    let etag = d["etag"].as_str().ok_or("etag")?.to_string();
    hub.api
        .put(
            "/devices/dev2",
            &json!({"deviceId": "dev2", "status": "disabled"}),
            Some(&etag),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d = hub.api.get("/devices/dev2").await?;
        if d["connectionState"] == "Disconnected" {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the disabled device's stuck connection stayed open".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.stop().await;
    Ok(())
}
