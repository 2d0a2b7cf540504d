//! `POST /devices/query` over real HTTPS on a hub with its SQLite store: paging with
//! continuation tokens that end exactly at the last page, projections and aliases, GROUP BY,
//! module twins, reported properties written over MQTT, and IoT Hub's error bodies.

mod common;

use common::ferrohub_cli as cli;
use common::*;
use ferrohub_mqtt::QoS;
use serde_json::{json, Value};

/// One query call as a service SDK makes it.
async fn query(hub: &TestHub, text: &str, max: Option<&str>, token: Option<&str>) -> R<Answer> {
    let client = https_client(hub)?;
    let url = format!(
        "https://{HOST}:{}/devices/query?api-version=2021-04-12",
        hub.https_addr().port()
    );
    let mut req = client
        .post(url)
        .header("Authorization", owner_token(hub)?)
        .json(&json!({ "query": text }));
    if let Some(m) = max {
        req = req.header("x-ms-max-item-count", m);
    }
    if let Some(t) = token {
        req = req.header("x-ms-continuation", t);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = serde_json::from_str(&resp.text().await?)?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Every page of a query, `max` per page: the pages' items and their sizes.
async fn all_pages(hub: &TestHub, text: &str, max: usize) -> R<(Vec<Value>, Vec<usize>)> {
    let mut items = Vec::new();
    let mut sizes = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let a = query(hub, text, Some(&max.to_string()), token.as_deref()).await?;
        assert_eq!(a.status, 200, "{}", a.body);
        let page = a.body.as_array().ok_or("not an array")?.clone();
        sizes.push(page.len());
        items.extend(page);
        token = a.header("x-ms-continuation").map(str::to_string);
        if token.is_none() {
            return Ok((items, sizes));
        }
        if sizes.len() > 100 {
            return Err("the pages never end".into());
        }
    }
}

async fn tag(hub: &TestHub, id: &str, tags: Value) -> TestResult {
    hub.api
        .patch(&format!("/twins/{id}"), &json!({ "tags": tags }), None)
        .await?;
    Ok(())
}

fn ids(items: &[Value], key: &str) -> Vec<String> {
    items
        .iter()
        .map(|i| i[key].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn pages_follow_continuation_tokens_and_end_exactly_at_the_last_page() -> TestResult {
    let hub = TestHub::start().await?;
    for i in 0..7 {
        let id = format!("dev-{i}");
        hub.create_device(&id).await?;
        let site = if i == 3 { "b" } else { "a" };
        tag(&hub, &id, json!({"site": site, "n": i})).await?;
    }
    let text = "SELECT * FROM devices WHERE tags.site = 'a'";
    let (items, sizes) = all_pages(&hub, text, 3).await?;
    assert_eq!(
        sizes,
        vec![3, 3],
        "six matches in pages of three: no empty third page"
    );
    assert_eq!(
        ids(&items, "deviceId"),
        ["dev-0", "dev-1", "dev-2", "dev-4", "dev-5", "dev-6"]
    );
    let (_, sizes) = all_pages(&hub, text, 4).await?;
    assert_eq!(sizes, vec![4, 2]);
    let (_, sizes) = all_pages(&hub, "SELECT * FROM devices", 7).await?;
    assert_eq!(sizes, vec![7], "all seven in one page, no continuation");

    // A page is a full twin, as GET /twins shows it.
    let a = query(&hub, text, Some("1"), None).await?;
    assert_eq!(a.header("x-ms-item-type"), Some("twin"));
    assert!(a.header("x-ms-continuation").is_some());
    let twin = &a.body[0];
    let shown = hub.api.get("/twins/dev-0").await?;
    assert_eq!(twin, &shown, "the document a query sees is the twin");
    for key in [
        "etag",
        "deviceEtag",
        "status",
        "statusUpdateTime",
        "connectionState",
        "authenticationType",
        "x509Thumbprint",
        "cloudToDeviceMessageCount",
        "modelId",
        "version",
        "capabilities",
    ] {
        assert!(twin.get(key).is_some(), "{key} missing from {twin}");
    }
    assert_eq!(twin["properties"]["desired"]["$version"], 1);

    // TOP caps all pages together.
    let (items, sizes) = all_pages(&hub, "SELECT TOP 5 * FROM devices", 2).await?;
    assert_eq!(sizes, vec![2, 2, 1]);
    assert_eq!(items.len(), 5);
    // No x-ms-max-item-count: IoT Hub's default page of 100.
    let a = query(&hub, "SELECT deviceId FROM devices", None, None).await?;
    assert_eq!(a.body.as_array().map(Vec::len), Some(7));
    assert!(a.header("x-ms-continuation").is_none());

    // A write completed before a query is in its results.
    tag(&hub, "dev-3", json!({"site": "a"})).await?;
    let (items, _) = all_pages(&hub, text, 100).await?;
    assert_eq!(items.len(), 7);
    let (items, _) = all_pages(
        &hub,
        "SELECT * FROM devices WHERE tags.n >= 2 AND tags.n < 5",
        1,
    )
    .await?;
    assert_eq!(ids(&items, "deviceId"), ["dev-2", "dev-3", "dev-4"]);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn projections_aliases_group_by_and_iot_explorers_queries() -> TestResult {
    let hub = TestHub::start().await?;
    for id in ["x-1", "x-2", "y-1"] {
        hub.create_device(id).await?;
    }
    let mut d = hub.api.get("/devices/y-1").await?;
    d["status"] = json!("disabled");
    hub.api.put("/devices/y-1", &d, Some("*")).await?;
    tag(&hub, "x-1", json!({"floor": 2})).await?;
    tag(&hub, "x-2", json!({"floor": 5})).await?;

    let explorer = "SELECT deviceId as DeviceId, status as Status, lastActivityTime as LastActivityTime, statusUpdatedTime as StatusUpdatedTime, authenticationType as AuthenticationType, cloudToDeviceMessageCount as CloudToDeviceMessageCount, capabilities.iotEdge as IotEdge, modelId as ModelId FROM devices WHERE STARTSWITH(devices.deviceId, 'x')";
    let a = query(&hub, explorer, Some("100"), None).await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-ms-item-type"), Some("raw"));
    assert_eq!(
        a.body[0],
        json!({"DeviceId": "x-1", "Status": "enabled", "AuthenticationType": "sas",
               "CloudToDeviceMessageCount": 0, "IotEdge": false, "ModelId": "",
               "LastActivityTime": "0001-01-01T00:00:00Z"})
    );
    assert_eq!(a.body.as_array().map(Vec::len), Some(2));
    let a = query(
        &hub,
        "SELECT deviceId FROM devices WHERE status != 'enabled'",
        None,
        None,
    )
    .await?;
    assert_eq!(a.body, json!([{"deviceId": "y-1"}]));
    let a = query(
        &hub,
        "SELECT DeviceId FROM devices WHERE capabilities.iotEdge = true",
        None,
        None,
    )
    .await?;
    assert_eq!(a.body, json!([]));
    let a = query(
        &hub,
        "SELECT DeviceId, tags.floor * 10 AS f FROM devices WHERE tags.floor > 1",
        None,
        None,
    )
    .await?;
    assert_eq!(
        a.body,
        json!([{"deviceId": "x-1", "f": 20}, {"deviceId": "x-2", "f": 50}])
    );

    let a = query(
        &hub,
        "SELECT status, COUNT() AS numberOfDevices FROM devices GROUP BY status",
        None,
        None,
    )
    .await?;
    assert_eq!(a.header("x-ms-item-type"), Some("raw"));
    assert_eq!(
        a.body,
        json!([{"numberOfDevices": 1, "status": "disabled"}, {"numberOfDevices": 2, "status": "enabled"}])
    );
    let a = query(
        &hub,
        "SELECT COUNT() AS n, SUM(tags.floor) AS s, MAX(tags.floor) AS m FROM devices",
        None,
        None,
    )
    .await?;
    assert_eq!(a.body, json!([{"n": 3, "s": 7, "m": 5}]));
    // Groups page like rows.
    let (items, sizes) = all_pages(
        &hub,
        "SELECT status, COUNT() AS n FROM devices GROUP BY status",
        1,
    )
    .await?;
    assert_eq!((items.len(), sizes), (2, vec![1, 1]));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn module_twins_and_reported_properties_from_a_connected_device() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("d1").await?;
    hub.create_device("d2").await?;
    hub.create_module("d1", "m1").await?;
    hub.create_module("d1", "m2").await?;
    hub.create_module("d2", "m1").await?;

    let a = query(
        &hub,
        "SELECT * FROM devices.modules WHERE deviceId IN ['d1']",
        None,
        None,
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-ms-item-type"), Some("twin"));
    let items = a.body.as_array().ok_or("array")?;
    assert_eq!(ids(items, "moduleId"), ["m1", "m2"]);
    assert!(items.iter().all(|m| m["deviceId"] == "d1"));
    let (items, sizes) =
        all_pages(&hub, "SELECT deviceId, moduleId FROM devices.modules", 2).await?;
    assert_eq!(sizes, vec![2, 1]);
    assert_eq!(items[2], json!({"deviceId": "d2", "moduleId": "m1"}));
    let a = query(
        &hub,
        "SELECT * FROM devices.modules WHERE devices.modules.moduleId = 'm2'",
        None,
        None,
    )
    .await?;
    assert_eq!(ids(a.body.as_array().ok_or("array")?, "moduleId"), ["m2"]);

    // The device reports over MQTT; the query sees the reported value and the live state.
    let (mut c, _) = hub.connect_device("d1", &key, true).await?;
    c.send(&publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        br#"{"temperature": 31.5, "fw": {"version": "2.1"}}"#,
        QoS::AtLeastOnce,
        1,
    ))
    .await?;
    loop {
        let p = recv_publish(&mut c, WAIT)
            .await?
            .ok_or("no twin response")?;
        if p.topic.starts_with("$iothub/twin/res/204/") {
            break;
        }
    }
    let a = query(
        &hub,
        "SELECT deviceId, properties.reported.temperature AS t, connectionState FROM devices WHERE properties.reported.temperature > 30 AND properties.reported.fw.version = '2.1'",
        None,
        None,
    )
    .await?;
    assert_eq!(
        a.body,
        json!([{"deviceId": "d1", "t": 31.5, "connectionState": "Connected"}])
    );
    let a = query(
        &hub,
        "SELECT deviceId FROM devices WHERE IS_DEFINED(properties.reported.$metadata.temperature.$lastUpdated)",
        None,
        None,
    )
    .await?;
    assert_eq!(a.body, json!([{"deviceId": "d1"}]));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_queries_answer_iot_hubs_error_body_naming_the_position() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("d1").await?;
    let a = query(&hub, "SELECT * FROM devices WHERE tags.x = ", None, None).await?;
    assert_eq!(a.status, 400);
    assert_eq!(a.header("iothub-errorcode"), Some("ArgumentInvalid"));
    let message = a.body["Message"].as_str().ok_or("Message")?;
    assert!(
        message.starts_with("ErrorCode:ArgumentInvalid;Syntax error at line 1, column 38: expected an expression, found the end of the query"),
        "{message}"
    );
    let a = query(&hub, "SELECT * FROM devices GROUP BY status", None, None).await?;
    assert_eq!(a.status, 400, "{}", a.body);
    let long = format!(
        "SELECT * FROM devices WHERE deviceId = '{}'",
        "x".repeat(8200)
    );
    let a = query(&hub, &long, None, None).await?;
    assert_eq!(a.status, 400);
    assert!(
        a.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("8192")),
        "{}",
        a.body
    );
    let a = query(&hub, "SELECT * FROM devices", None, Some("not-a-token")).await?;
    assert_eq!(a.status, 400);
    assert!(
        a.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("continuation")),
        "{}",
        a.body
    );
    let a = query(&hub, "SELECT * FROM devices", Some("ten"), None).await?;
    assert_eq!(a.status, 400);
    assert!(
        a.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("x-ms-max-item-count")),
        "{}",
        a.body
    );
    let a = rest(
        &hub,
        reqwest::Method::POST,
        "/devices/query",
        Some(&json!({"q": 1})),
    )
    .await?;
    assert_eq!(a.status, 400, "{}", a.body);

    // Without a token: 401, as for every registry read.
    let url = format!(
        "https://{HOST}:{}/devices/query?api-version=2021-04-12",
        hub.https_addr().port()
    );
    let resp = https_client(&hub)?
        .post(url)
        .json(&json!({"query": "SELECT * FROM devices"}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);

    // Nesting deep enough to overflow a recursive parser is refused; a long flat IN list (more
    // conditions than a store is handed) still runs, scanned without a prefilter.
    let deep = format!(
        "SELECT * FROM devices WHERE {}tags.x = 1{}",
        "(".repeat(3000),
        ")".repeat(3000)
    );
    let a = query(&hub, &deep, None, None).await?;
    assert_eq!(a.status, 400);
    assert!(
        a.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("nests more than 64")),
        "{}",
        a.body
    );
    let list: Vec<String> = (0..1500).map(|i| i.to_string()).collect();
    let long_in = format!(
        "SELECT deviceId FROM devices WHERE deviceId = 'd1' OR tags.n IN [{}]",
        list.join(",")
    );
    let a = query(&hub, &long_in, None, None).await?;
    assert_eq!((a.status, &a.body), (200, &json!([{"deviceId": "d1"}])));

    // No job has run here: devices.jobs is an empty set of job rows (tests/jobs.rs fills it).
    let a = query(
        &hub,
        "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'j'",
        None,
        None,
    )
    .await?;
    assert_eq!(
        (a.status, a.header("x-ms-item-type")),
        (200, Some("deviceJob"))
    );
    assert_eq!(a.body, json!([]));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_cli_pages_through_everything_or_stops_at_top() -> TestResult {
    let hub = TestHub::start().await?;
    for i in 0..5 {
        let id = format!("c{i}");
        hub.create_device(&id).await?;
        tag(&hub, &id, json!({"site": "s"})).await?;
    }
    let dir = hub.dir.path().to_path_buf();
    let run = |args: Vec<&'static str>| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || cli(&dir, &args)).await? }
    };
    let (ok, out, err) = run(vec![
        "query",
        "SELECT deviceId FROM devices WHERE tags.site = 's'",
        "--page-size",
        "2",
        "-o",
        "json",
    ])
    .await?;
    assert!(ok, "{err}");
    let items: Value = serde_json::from_str(&out)?;
    assert_eq!(
        items.as_array().map(Vec::len),
        Some(5),
        "three pages of 2, 2 and 1"
    );
    let (ok, out, err) = run(vec!["query", "SELECT * FROM devices", "--top", "3"]).await?;
    assert!(ok, "{err}");
    assert!(out.starts_with("deviceId"), "{out}");
    assert!(out.contains("c2 ") && !out.contains("c3 "), "{out}");
    assert!(out.trim_end().ends_with("(3 results)"), "{out}");
    let (ok, _, err) = run(vec!["query", "SELECT * FROM devices WHERE"]).await?;
    assert!(!ok);
    assert!(
        err.contains("400 ArgumentInvalid: Syntax error at line 1, column 28"),
        "{err}"
    );
    hub.stop().await;
    Ok(())
}
