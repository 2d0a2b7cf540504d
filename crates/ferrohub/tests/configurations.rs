//! `/configurations` (automatic device management) over real HTTPS on a hub with its SQLite
//! store: create versus update under etags, content applied to the desired properties of the
//! twins the target condition matches (and pushed to a connected device), priorities, devices
//! that start matching later, metrics, `testQueries`, IoT Hub's error bodies, and a restart.

mod common;

use common::*;
use ferrohub_mqtt::QoS;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";
const WAIT: Duration = Duration::from_secs(10);

fn config(id: &str, condition: &str, priority: i64, content: Value) -> Value {
    json!({
        "id": id,
        "schemaVersion": "1.0",
        "labels": {"team": "ops"},
        "content": {"deviceContent": content},
        "targetCondition": condition,
        "priority": priority,
        "metrics": {"queries": {"reporting": "SELECT deviceId FROM devices WHERE properties.reported.ok = true"}},
    })
}

async fn put(hub: &TestHub, id: &str, body: &Value, if_match: Option<&str>) -> R<Answer> {
    let client = https_client(hub)?;
    let url = format!(
        "https://{HOST}:{}/configurations/{id}?api-version=2021-04-12",
        hub.https_addr().port()
    );
    let mut req = client
        .put(url)
        .header("Authorization", owner_token(hub)?)
        .json(body);
    if let Some(e) = if_match {
        req = req.header("If-Match", e);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn tag(hub: &TestHub, id: &str, tags: Value) -> TestResult {
    hub.api
        .patch(&format!("/twins/{id}"), &json!({ "tags": tags }), None)
        .await?;
    Ok(())
}

async fn desired(hub: &TestHub, id: &str) -> R<Value> {
    Ok(hub.api.get(&format!("/twins/{id}")).await?["properties"]["desired"].clone())
}

#[tokio::test]
async fn crud_with_etags_create_versus_update_and_error_bodies() -> TestResult {
    let hub = TestHub::start().await?;
    let body = config(
        "c1",
        "tags.env = 'prod'",
        1,
        json!({"properties.desired.x": 1}),
    );
    let created = put(&hub, "c1", &body, None).await?;
    assert_eq!(created.status, 200, "{}", created.body);
    let c = created.body;
    assert_eq!(c["id"], "c1");
    assert_eq!(c["schemaVersion"], "1.0");
    assert_eq!(c["labels"]["team"], "ops");
    assert_eq!(c["priority"], 1);
    assert!(c["createdTimeUtc"].is_string());
    assert_eq!(c["createdTimeUtc"], c["lastUpdatedTimeUtc"]);
    let etag = c["etag"].as_str().ok_or("no etag")?.to_string();

    // A PUT without If-Match creates: the id is taken.
    let again = put(&hub, "c1", &body, None).await?;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body["Message"].is_string(), "{}", again.body);

    // An update under a stale etag is 412; under the current one it applies.
    let mut changed = body.clone();
    changed["priority"] = json!(5);
    let stale = put(&hub, "c1", &changed, Some("\"bm9wZQ==\"")).await?;
    assert_eq!(stale.status, 412, "{}", stale.body);
    assert_eq!(stale.header("iothub-errorcode"), Some("PreconditionFailed"));
    assert!(
        stale.body["Message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ErrorCode:PreconditionFailed;")),
        "{}",
        stale.body
    );
    let updated = put(&hub, "c1", &changed, Some(&format!("\"{etag}\""))).await?;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.body["priority"], 5);
    assert_ne!(updated.body["etag"], etag.as_str());
    assert_eq!(updated.body["createdTimeUtc"], c["createdTimeUtc"]);

    // Content cannot change after creation, as in IoT Hub.
    let mut other = changed.clone();
    other["content"] = json!({"deviceContent": {"properties.desired.x": 2}});
    let refused = put(&hub, "c1", &other, Some("*")).await?;
    assert_eq!(refused.status, 400, "{}", refused.body);

    // An update of a configuration that does not exist is 404.
    let missing = put(
        &hub,
        "nope",
        &config("nope", "*", 0, json!({"properties.desired.y": 1})),
        Some("\"MQ==\""),
    )
    .await?;
    assert_eq!(missing.status, 404, "{}", missing.body);

    // Validation: id rules, content keys, schema version, conditions.
    for (id, bad) in [
        (
            "UPPER",
            config("UPPER", "*", 0, json!({"properties.desired.a": 1})),
        ),
        ("k1", config("k1", "*", 0, json!({"tags.a": 1}))),
        ("k2", {
            let mut b = config("k2", "*", 0, json!({"properties.desired.a": 1}));
            b["schemaVersion"] = json!("2.0");
            b
        }),
        (
            "k3",
            config("k3", "tags.env = ", 0, json!({"properties.desired.a": 1})),
        ),
        (
            "k4",
            config("other", "*", 0, json!({"properties.desired.a": 1})),
        ),
    ] {
        let a = put(&hub, id, &bad, None).await?;
        assert_eq!(a.status, 400, "{id}: {}", a.body);
        assert!(
            a.body["Message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ErrorCode:ArgumentInvalid;")),
            "{id}: {}",
            a.body
        );
        assert_eq!(a.header("iothub-errorcode"), Some("ArgumentInvalid"));
    }

    put(
        &hub,
        "c0",
        &config("c0", "*", 0, json!({"properties.desired.z": 1})),
        None,
    )
    .await?;
    let list = rest(&hub, Method::GET, "/configurations", None).await?;
    assert_eq!(list.status, 200);
    let ids: Vec<&str> = list
        .body
        .as_array()
        .ok_or("not a list")?
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, ["c0", "c1"]);
    let top = rest(&hub, Method::GET, "/configurations?top=1", None).await?;
    assert_eq!(top.body.as_array().map(Vec::len), Some(1));

    let current = rest(&hub, Method::GET, "/configurations/c1", None).await?;
    assert_eq!(current.status, 200);
    let del = rest(&hub, Method::DELETE, "/configurations/c1", None).await?;
    assert_eq!(del.status, 204);
    let gone = rest(&hub, Method::GET, "/configurations/c1", None).await?;
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert!(gone.body["Message"]
        .as_str()
        .is_some_and(|m| m.contains("c1")));
    Ok(())
}

#[tokio::test]
async fn content_reaches_matching_twins_and_connected_devices_by_priority() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("prod1").await?;
    hub.create_device("prod2").await?;
    hub.create_device("dev1").await?;
    tag(&hub, "prod1", json!({"env": "prod"})).await?;
    tag(&hub, "prod2", json!({"env": "prod", "ring": 0})).await?;
    tag(&hub, "dev1", json!({"env": "dev"})).await?;
    let (mut c, _) = hub.connect_device("prod1", &key, true).await?;
    c.subscribe(1, &[(DESIRED, QoS::AtMostOnce)]).await?;

    let a = put(
        &hub,
        "base",
        &config(
            "base",
            "tags.env = 'prod'",
            1,
            json!({"properties.desired.settings": {"rate": 10}}),
        ),
        None,
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    // Applied before the answer: the metrics already count it.
    assert_eq!(a.body["systemMetrics"]["results"]["targetedCount"], 2);
    assert_eq!(a.body["systemMetrics"]["results"]["appliedCount"], 2);
    assert_eq!(desired(&hub, "prod1").await?["settings"]["rate"], 10);
    assert!(desired(&hub, "dev1").await?["settings"].is_null());
    // The connected device got the desired patch.
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("no desired patch")?;
    let patch: Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(patch["settings"]["rate"], 10, "{patch}");

    // A higher priority wins where both match; the lower one keeps the rest.
    let b = put(
        &hub,
        "ring0",
        &config(
            "ring0",
            "tags.ring = 0",
            9,
            json!({"properties.desired.settings": {"rate": 99}}),
        ),
        None,
    )
    .await?;
    assert_eq!(
        b.body["systemMetrics"]["results"]["appliedCount"], 1,
        "{}",
        b.body
    );
    assert_eq!(desired(&hub, "prod2").await?["settings"]["rate"], 99);
    assert_eq!(desired(&hub, "prod1").await?["settings"]["rate"], 10);
    let base = hub.api.get("/configurations/base").await?;
    assert_eq!(base["systemMetrics"]["results"]["targetedCount"], 2);
    assert_eq!(base["systemMetrics"]["results"]["appliedCount"], 1);

    // A lower priority created later does not displace the winner.
    put(
        &hub,
        "low",
        &config(
            "low",
            "tags.env = 'prod'",
            0,
            json!({"properties.desired.settings": {"rate": 1}}),
        ),
        None,
    )
    .await?;
    assert_eq!(desired(&hub, "prod1").await?["settings"]["rate"], 10);
    assert_eq!(
        hub.api.get("/configurations/low").await?["systemMetrics"]["results"]["appliedCount"],
        0
    );
    Ok(())
}

#[tokio::test]
async fn devices_that_start_matching_later_get_it_and_leavers_keep_it_but_leave_the_counts(
) -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("d1").await?;
    put(
        &hub,
        "c",
        &config(
            "c",
            "tags.env = 'prod'",
            1,
            json!({"properties.desired.mode": "eco"}),
        ),
        None,
    )
    .await?;
    assert!(desired(&hub, "d1").await?["mode"].is_null());

    // A tag change through the twin API makes it match.
    tag(&hub, "d1", json!({"env": "prod"})).await?;
    assert_eq!(desired(&hub, "d1").await?["mode"], "eco");
    let c = hub.api.get("/configurations/c").await?;
    assert_eq!(c["systemMetrics"]["results"]["appliedCount"], 1);
    // The twin says which configurations target it and which one was applied, with the
    // values IoT Hub's appliedCount query (`configurations.[[c]].status = 'Applied'`) reads.
    put(
        &hub,
        "top",
        &config(
            "top",
            "tags.env = 'prod'",
            5,
            json!({"properties.desired.top": 1}),
        ),
        None,
    )
    .await?;
    let twin = hub.api.get("/twins/d1").await?;
    assert_eq!(
        twin["configurations"],
        json!({"c": {"status": "Targeted"}, "top": {"status": "Applied"}}),
        "{twin}"
    );
    let deleted = rest(&hub, Method::DELETE, "/configurations/top", None).await?;
    assert_eq!(deleted.status, 204);
    let twin = hub.api.get("/twins/d1").await?;
    assert_eq!(
        twin["configurations"],
        json!({"c": {"status": "Applied"}}),
        "{twin}"
    );

    // A new device matching `*` configurations gets them when created.
    put(
        &hub,
        "all",
        &config("all", "*", 0, json!({"properties.desired.fleet": true})),
        None,
    )
    .await?;
    hub.create_device("d2").await?;
    assert_eq!(desired(&hub, "d2").await?["fleet"], true);

    // A device that stops matching keeps what was written (IoT Hub removes nothing); it is
    // no longer targeted, no longer counted as applied, and its twin no longer names it.
    tag(&hub, "d1", json!({"env": "dev"})).await?;
    assert_eq!(desired(&hub, "d1").await?["mode"], "eco");
    let c = hub.api.get("/configurations/c").await?;
    assert_eq!(c["systemMetrics"]["results"]["targetedCount"], 0);
    assert_eq!(c["systemMetrics"]["results"]["appliedCount"], 0, "{c}");
    let twin = hub.api.get("/twins/d1").await?;
    assert_eq!(
        twin["configurations"],
        json!({"all": {"status": "Applied"}}),
        "{twin}"
    );
    Ok(())
}

#[tokio::test]
async fn custom_metrics_test_queries_and_restart() -> TestResult {
    let mut hub = TestHub::start().await?;
    hub.create_device("d1").await?;
    hub.create_device("d2").await?;
    tag(&hub, "d1", json!({"env": "prod"})).await?;
    tag(&hub, "d2", json!({"env": "prod"})).await?;
    let mut body = config(
        "m",
        "tags.env = 'prod'",
        0,
        json!({"properties.desired.v": 1}),
    );
    body["metrics"]["queries"] =
        json!({"d1only": "SELECT deviceId FROM devices WHERE deviceId = 'd1'"});
    put(&hub, "m", &body, None).await?;
    let c = hub.api.get("/configurations/m").await?;
    assert_eq!(c["metrics"]["results"]["d1only"], 1, "{c}");
    assert_eq!(
        c["metrics"]["queries"]["d1only"],
        "SELECT deviceId FROM devices WHERE deviceId = 'd1'"
    );

    let t = rest(
        &hub,
        Method::POST,
        "/configurations/testQueries",
        Some(&json!({
            "targetCondition": "tags.env = 'prod'",
            "customMetricQueries": {"good": "SELECT deviceId FROM devices", "bad": "SELEKT nothing"},
        })),
    )
    .await?;
    assert_eq!(t.status, 200, "{}", t.body);
    assert_eq!(t.body["targetConditionError"], "");
    assert_eq!(t.body["customMetricQueryErrors"]["good"], "");
    assert!(t.body["customMetricQueryErrors"]["bad"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    let t = rest(
        &hub,
        Method::POST,
        "/configurations/testQueries",
        Some(&json!({"targetCondition": "tags.env = "})),
    )
    .await?;
    assert!(t.body["targetConditionError"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));

    // Configurations and the record of where each was applied survive a restart: the
    // counts hold, and nothing is applied twice (the twin's desired version stays).
    let version = hub.api.get("/twins/d1").await?["properties"]["desired"]["$version"].clone();
    hub.restart().await?;
    let c = hub.api.get("/configurations/m").await?;
    assert_eq!(c["systemMetrics"]["results"]["appliedCount"], 2, "{c}");
    tag(&hub, "d1", json!({"env": "prod", "x": 1})).await?;
    assert_eq!(
        hub.api.get("/twins/d1").await?["properties"]["desired"]["$version"],
        version
    );
    Ok(())
}

#[tokio::test]
async fn config_commands_create_show_list_and_delete() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("d1").await?;
    tag(&hub, "d1", json!({"env": "prod"})).await?;
    let file = hub.dir.path().join("cfg.json");
    std::fs::write(
        &file,
        config(
            "cli-cfg",
            "tags.env = 'prod'",
            3,
            json!({"properties.desired.y": 7}),
        )
        .to_string(),
    )?;
    let dir = hub.dir.path().to_path_buf();
    let run = |args: Vec<String>| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || ferrohub_cli(&dir, &args)).await? }
    };
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();

    let (ok, out, err) = run(s(&["config", "create", &file.to_string_lossy()])).await?;
    assert!(ok, "{err}");
    assert!(out.contains("created configuration cli-cfg"), "{out}");
    assert!(out.contains("appliedCount") && out.contains(" 1"), "{out}");
    assert_eq!(desired(&hub, "d1").await?["y"], 7);

    let (ok, out, _) = run(s(&["config", "show", "cli-cfg", "-o", "json"])).await?;
    assert!(ok);
    let shown: Value = serde_json::from_str(&out)?;
    assert_eq!(shown["systemMetrics"]["results"]["targetedCount"], 1);

    let (ok, out, _) = run(s(&["config", "list"])).await?;
    assert!(ok && out.contains("cli-cfg"), "{out}");

    // A second create of the same id fails with IoT Hub's error, and says so.
    let (ok, _, err) = run(s(&["config", "create", &file.to_string_lossy()])).await?;
    assert!(!ok);
    assert!(
        err.contains("409") || err.contains("already exists"),
        "{err}"
    );

    let (ok, out, err) = run(s(&["config", "delete", "cli-cfg"])).await?;
    assert!(ok, "{err}");
    assert!(out.contains("deleted configuration cli-cfg"), "{out}");
    let (ok, _, _) = run(s(&["config", "show", "cli-cfg"])).await?;
    assert!(!ok);
    Ok(())
}
