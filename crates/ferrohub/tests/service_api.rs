//! The rest of the service REST API over real HTTPS and the SQLite store: statistics, bulk
//! registry operations, and the small things real clients trip on (trailing slashes, numbers
//! sent as strings, api-versions, IoT Hub's JSON forms of devices and twins).

mod common;

use common::*;
use serde_json::{json, Value};

/// A call with a chosen api-version (`rest` always sends 2021-04-12).
async fn with_version(hub: &TestHub, path: &str, version: &str) -> R<Answer> {
    let client = https_client(hub)?;
    let url = format!(
        "https://{HOST}:{}{path}?api-version={version}",
        hub.https_addr().port()
    );
    let resp = client
        .get(url)
        .header("Authorization", owner_token(hub)?)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    Ok(Answer {
        status,
        headers,
        body: if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        },
    })
}

fn assert_error(a: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
    assert_eq!(a.header("iothub-errorcode"), Some(code), "{what}");
    assert!(
        a.body["Message"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!("ErrorCode:{code};"))),
        "{what}: {}",
        a.body
    );
}

#[tokio::test]
async fn statistics_count_devices_by_status_and_connected_devices() -> TestResult {
    let hub = TestHub::start().await?;
    let get = |path: &'static str| rest(&hub, reqwest::Method::GET, path, None);
    let empty = get("/statistics/devices").await?;
    assert_eq!(empty.status, 200, "{}", empty.body);
    assert_eq!(
        empty.body,
        json!({"totalDeviceCount": 0, "enabledDeviceCount": 0, "disabledDeviceCount": 0})
    );
    let (key, _) = hub.create_device("d1").await?;
    hub.create_device("d2").await?;
    hub.api
        .put(
            "/devices/off",
            &json!({"deviceId": "off", "status": "disabled"}),
            None,
        )
        .await?;
    let (mkey, _) = hub.create_module("d1", "m1").await?;
    let stats = get("/statistics/devices").await?.body;
    assert_eq!(
        stats,
        json!({"totalDeviceCount": 3, "enabledDeviceCount": 2, "disabledDeviceCount": 1}),
        "modules are not devices"
    );

    assert_eq!(
        get("/statistics/service").await?.body,
        json!({"connectedDeviceCount": 0})
    );
    let (_c, _) = hub.connect_device("d1", &key, true).await?;
    let mut m = hub.tls().await?;
    let token = token_for(&format!("{HOST}/devices/d1/modules/m1"), &mkey, 3600, None);
    let (_, rc) = m
        .connect(connect_packet("d1/m1", Some(&token), true, 60))
        .await?;
    assert_eq!(rc, ferrohub_mqtt::ConnectReturnCode::Accepted);
    assert_eq!(
        get("/statistics/service").await?.body,
        json!({"connectedDeviceCount": 1}),
        "the module's connection is not a device's"
    );

    // IoT Hub's rights: RegistryRead for the registry's counts, ServiceConnect for the service's.
    let ro = hub
        .server()
        .hub
        .policy("registryRead")
        .await?
        .ok_or("registryRead policy")?;
    let ro = token_for(HOST, &ro.primary_key, 3600, Some("registryRead"));
    let client = https_client(&hub)?;
    for (path, status) in [("/statistics/devices", 200), ("/statistics/service", 401)] {
        let s = client
            .get(format!(
                "https://{HOST}:{}{path}?api-version=2021-04-12",
                hub.https_addr().port()
            ))
            .header("Authorization", &ro)
            .send()
            .await?
            .status()
            .as_u16();
        assert_eq!(s, status, "registryRead on {path}");
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bulk_entries_apply_or_fail_each_on_their_own() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("exists").await?;
    let etag = hub.api.get("/devices/exists").await?["etag"]
        .as_str()
        .ok_or("etag")?
        .to_string();
    hub.create_device("gone").await?;
    let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let batch = json!([
        {"id": "new1", "importMode": "create"},
        {"id": "new2", "importMode": "create", "status": "disabled",
         "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
         "tags": {"site": "north"}, "properties": {"desired": {"rate": 5}}},
        {"id": "exists", "importMode": "create"},
        {"id": "exists2", "importMode": "Update"},
        {"id": "exists", "importMode": "updateIfMatchETag", "eTag": "\"nope\""},
        {"id": "gone", "importMode": "Delete"},
        {"id": "bad id!", "importMode": "create"},
        {"id": "weird", "importMode": "upsert"},
    ]);
    // Ids must be unique within a call; this batch names "exists" twice.
    let dup = rest(&hub, reqwest::Method::POST, "/devices", Some(&batch)).await?;
    assert_error(&dup, 400, "ArgumentInvalid", "an id twice");
    assert!(
        hub.api.get("/devices/new1").await.is_err(),
        "a refused batch applies nothing"
    );

    let mut entries = batch.as_array().ok_or("array")?.clone();
    entries[4]["id"] = json!("exists3");
    hub.create_device("exists3").await?;
    let a = rest(
        &hub,
        reqwest::Method::POST,
        "/devices",
        Some(&Value::Array(entries)),
    )
    .await?;
    assert_eq!(
        a.status, 200,
        "per-device failures still answer 200: {}",
        a.body
    );
    assert_eq!(a.body["isSuccessful"], false);
    assert_eq!(a.body["warnings"], json!([]));
    let errors: Vec<(String, String)> = a.body["errors"]
        .as_array()
        .ok_or("errors")?
        .iter()
        .map(|e| {
            assert!(e["errorStatus"].is_string(), "{e}");
            (
                e["deviceId"].as_str().unwrap_or_default().to_string(),
                e["errorCode"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expect = [
        ("exists", "DeviceAlreadyExists"),
        ("exists2", "DeviceNotFound"),
        ("exists3", "PreconditionFailed"),
        ("bad id!", "ArgumentInvalid"),
        ("weird", "ArgumentInvalid"),
    ];
    assert_eq!(
        errors,
        expect
            .iter()
            .map(|(d, c)| (d.to_string(), c.to_string()))
            .collect::<Vec<_>>(),
        "in request order"
    );

    // What succeeded is there (and durable: it survives a restart).
    let mut hub = hub;
    hub.restart().await?;
    let new1 = hub.api.get("/devices/new1").await?;
    assert!(
        new1["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "keys are generated as for a single create"
    );
    let new2 = hub.api.get("/devices/new2").await?;
    assert_eq!(new2["status"], "disabled");
    assert_eq!(new2["authentication"]["symmetricKey"]["primaryKey"], key);
    let twin = hub.api.get("/twins/new2").await?;
    assert_eq!(twin["tags"], json!({"site": "north"}));
    assert_eq!(twin["properties"]["desired"]["rate"], 5);
    assert!(hub.api.get("/devices/gone").await.is_err(), "deleted");
    assert_eq!(
        hub.api.get("/devices/exists").await?["etag"],
        json!(etag),
        "the failed create left it alone"
    );

    // The etag modes and twin updates succeed with the right etags.
    let twin_etag = twin["etag"].as_str().ok_or("twin etag")?.to_string();
    let ok = rest(
        &hub,
        reqwest::Method::POST,
        "/devices",
        Some(&json!([
            {"id": "new2", "importMode": "updateTwinIfMatchETag", "twinETag": twin_etag,
             "properties": {"desired": {"rate": 6}}},
            {"id": "exists", "importMode": "updateIfMatchETag", "eTag": format!("\"{etag}\""),
             "status": "disabled"},
            {"id": "new1", "importMode": "deleteIfMatchETag", "eTag": new1["etag"]},
        ])),
    )
    .await?;
    assert_eq!(
        ok.body,
        json!({"isSuccessful": true, "errors": [], "warnings": []})
    );
    assert_eq!(
        hub.api.get("/twins/new2").await?["properties"]["desired"]["rate"],
        6
    );
    assert_eq!(hub.api.get("/devices/exists").await?["status"], "disabled");

    // Whole-call refusals: not an array, empty, more than 100.
    let not_array = rest(
        &hub,
        reqwest::Method::POST,
        "/devices",
        Some(&json!({"id": "x"})),
    )
    .await?;
    assert_error(&not_array, 400, "ArgumentInvalid", "an object");
    let empty = rest(&hub, reqwest::Method::POST, "/devices", Some(&json!([]))).await?;
    assert_error(&empty, 400, "ArgumentInvalid", "empty");
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"id": format!("m{i}"), "importMode": "create"}))
        .collect();
    let many = rest(
        &hub,
        reqwest::Method::POST,
        "/devices",
        Some(&Value::Array(many)),
    )
    .await?;
    assert_error(&many, 413, "TooManyDevices", "101 entries");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn small_things_real_clients_send() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("d1").await?;

    // Node's Registry.list: `GET /devices/?api-version=...`.
    let list = rest(&hub, reqwest::Method::GET, "/devices/", None).await?;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.body.as_array().map(Vec::len), Some(1));
    let one = rest(&hub, reqwest::Method::GET, "/devices/d1/", None).await?;
    assert_eq!(one.body["deviceId"], "d1");
    let stats = rest(&hub, reqwest::Method::GET, "/statistics/devices/", None).await?;
    assert_eq!(stats.status, 200);

    // Unknown routes and wrong methods, with and without the slash, answer IoT Hub's error.
    for (method, path, status) in [
        (reqwest::Method::GET, "/nothing/here/", 404),
        (reqwest::Method::DELETE, "/statistics/devices", 405),
        (reqwest::Method::PUT, "/devices/", 405),
    ] {
        let a = rest(&hub, method.clone(), path, None).await?;
        assert_error(&a, status, "InvalidOperation", &format!("{method} {path}"));
    }

    // Every api-version the SDKs and the CLI send, including the CLI's 2024-03-31.
    for v in ["2020-09-30", "2021-04-12", "2024-03-31"] {
        let a = with_version(&hub, "/devices/d1", v).await?;
        assert_eq!(a.status, 200, "api-version {v}: {}", a.body);
    }
    let a = with_version(&hub, "/devices/d1", "2015-01-01").await?;
    assert_error(&a, 400, "ArgumentInvalid", "too old an api-version");

    // Method timeouts as strings, as IoT Hub takes them: parsed (the device is offline, so
    // 404), where they were refused as malformed (400).
    for (connect, status, code) in [
        (json!("0"), 404, "DeviceNotOnline"),
        (json!("soon"), 400, "ArgumentInvalid"),
        (json!(-1), 400, "ArgumentInvalid"),
    ] {
        let body = json!({"methodName": "reboot", "payload": {},
                          "responseTimeoutInSeconds": "30", "connectTimeoutInSeconds": connect});
        let a = rest(
            &hub,
            reqwest::Method::POST,
            "/twins/d1/methods",
            Some(&body),
        )
        .await?;
        assert_error(
            &a,
            status,
            code,
            &format!("connectTimeoutInSeconds {connect}"),
        );
    }

    // IoT Hub's forms: objects where it has objects, its "never" rather than null.
    let d = hub.api.get("/devices/d1").await?;
    assert_eq!(d["capabilities"], json!({"iotEdge": false}));
    assert_eq!(
        d["authentication"]["x509Thumbprint"],
        json!({"primaryThumbprint": null, "secondaryThumbprint": null})
    );
    assert_eq!(d["connectionStateUpdatedTime"], "0001-01-01T00:00:00Z");
    assert_eq!(d["lastActivityTime"], "0001-01-01T00:00:00Z");
    assert!(d["statusUpdatedTime"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let t = hub.api.get("/twins/d1").await?;
    assert_eq!(t["capabilities"], json!({"iotEdge": false}));
    assert_eq!(
        t["x509Thumbprint"],
        json!({"primaryThumbprint": null, "secondaryThumbprint": null})
    );
    assert_eq!(t["lastActivityTime"], "0001-01-01T00:00:00Z");
    assert!(t["statusUpdateTime"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    hub.stop().await;
    Ok(())
}

/// `ferrohub device import` as a user runs it: the real binary, a JSON-lines file of more
/// than two batches, a line that is not JSON, a device that exists already and a batch the hub
/// refuses as a whole.
#[tokio::test]
async fn device_import_sends_batches_and_reports_each_failure() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("already").await?;
    let mut lines: Vec<String> = (0..205)
        .map(|i| json!({"id": format!("imp{i:03}")}).to_string())
        .collect();
    lines.insert(150, "{not json".into());
    lines.insert(10, String::new());
    lines.insert(
        0,
        json!({"deviceId": "tagged", "status": "disabled", "tags": {"floor": 3}}).to_string(),
    );
    lines.insert(0, json!({"deviceId": "already"}).to_string());
    // The third batch names "twice" twice: refused as a whole, each of its entries fails, and
    // what the first two applied stays.
    lines.push(json!({"id": "twice"}).to_string());
    lines.push(json!({"id": "twice", "importMode": "delete"}).to_string());
    let file = hub.dir.path().join("devices.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n")?;

    let dir = hub.dir.path().to_path_buf();
    let (succeeded, stdout, _) = tokio::task::spawn_blocking(move || {
        ferrohub_cli(
            &dir,
            &["device".as_ref(), "import".as_ref(), file.as_os_str()],
        )
    })
    .await??;
    assert!(!succeeded, "failures make the command fail: {stdout}");
    assert!(
        stdout.contains("imported 199 of 210 entries, 11 failed"),
        "{stdout}"
    );
    // Line numbers as in the file (the empty line 13 counts as a line, not an entry).
    for failure in [
        "line 1: already: DeviceAlreadyExists",
        "line 154: -: ArgumentInvalid: not JSON",
        "line 203: imp198: BatchRefused: the batch starting at line 203 was refused",
        "line 211: twice: BatchRefused",
    ] {
        assert!(stdout.contains(failure), "{failure} missing from {stdout}");
    }
    let stats = hub.api.get("/statistics/devices").await?;
    assert_eq!(
        stats,
        json!({"totalDeviceCount": 200, "enabledDeviceCount": 199, "disabledDeviceCount": 1})
    );
    assert_eq!(
        hub.api.get("/twins/tagged").await?["tags"],
        json!({"floor": 3})
    );
    assert!(hub.api.get("/devices/imp198").await.is_err());
    hub.stop().await;
    Ok(())
}
