//! The IoT Plug and Play digital twin API end to end, over real TLS: a PnP device (model id at
//! CONNECT) reports properties and components and acknowledges a writable property; the
//! digital twin GET shows IoT Hub's shape; JSON Patch updates reach the device as desired
//! patches with component markers; If-Match and bad patches are refused with IoT Hub's bodies;
//! root and component commands reach the device as `name` and `component*name`; the CLI's
//! `twin show --digital` and `invoke --component`.

mod common;

use common::ferrohub_cli as ferrohub;
use common::*;
use ferrohub_mqtt::{Packet, Publish, QoS};
use serde_json::{json, Value};

const MODEL: &str = "dtmi:com:example:TemperatureController;2";
const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";
const TWIN_RES: &str = "$iothub/twin/res/#";
const METHODS: &str = "$iothub/methods/POST/#";

/// Connects `id` as an IoT Plug and Play device announcing [`MODEL`], subscribed to twin
/// responses, desired patches and methods.
async fn connect_pnp(hub: &TestHub, id: &str, key: &str) -> R<MqttClient> {
    let mut c = hub.tls().await?;
    let mut connect = connect_packet(id, Some(&hub.device_token(id, key)), true, 60);
    if let Packet::Connect(ref mut p) = connect {
        p.username = Some(format!(
            "{HOST}/{id}/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3ATemperatureController%3B2"
        ));
    }
    let (_, code) = c.connect(connect).await?;
    if code != ferrohub_mqtt::ConnectReturnCode::Accepted {
        return Err(format!("CONNACK {code:?}").into());
    }
    c.subscribe(
        1,
        &[
            (TWIN_RES, QoS::AtMostOnce),
            (DESIRED, QoS::AtMostOnce),
            (METHODS, QoS::AtMostOnce),
        ],
    )
    .await?;
    Ok(c)
}

/// Publishes a reported patch and waits for its 204.
async fn report(c: &mut MqttClient, pid: u16, patch: &Value) -> TestResult {
    let rid = format!("r{pid}");
    c.send(&publish(
        &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
        patch.to_string().as_bytes(),
        QoS::AtLeastOnce,
        pid,
    ))
    .await?;
    loop {
        let p: Publish = recv_publish(c, WAIT).await?.ok_or("no twin response")?;
        if p.topic.starts_with("$iothub/twin/res/") && p.topic.contains(&format!("$rid={rid}")) {
            if !p.topic.starts_with("$iothub/twin/res/204/") {
                return Err(format!("reported patch answered {}", p.topic).into());
            }
            return Ok(());
        }
    }
}

/// The next publish on `prefix`, skipping others.
async fn next_on(c: &mut MqttClient, prefix: &str) -> R<Publish> {
    loop {
        let p = recv_publish(c, WAIT)
            .await?
            .ok_or_else(|| format!("nothing on {prefix}"))?;
        if p.topic.starts_with(prefix) {
            return Ok(p);
        }
    }
}

/// A raw service call with the owner's token, optional headers and a raw body.
async fn call(
    hub: &TestHub,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> R<Answer> {
    call_as(hub, &owner_token(hub)?, method, path, headers, body).await
}

/// [`call`] signed with `token`.
async fn call_as(
    hub: &TestHub,
    token: &str,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> R<Answer> {
    let client = https_client(hub)?;
    let sep = if path.contains('?') { '&' } else { '?' };
    let url = format!(
        "https://{HOST}:{}{path}{sep}api-version=2021-04-12",
        hub.https_addr().port()
    );
    let mut req = client.request(method, url).header("Authorization", token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json; charset=utf-8")
            .body(b.to_owned());
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

/// Asserts an IoT Hub error answer: status, `iothub-errorcode` and the body's code.
fn assert_error(a: &Answer, status: u16, name: &str) {
    assert_eq!(a.status, status, "{:?}", a.body);
    assert_eq!(a.header("iothub-errorcode"), Some(name), "{:?}", a.body);
    let msg = a.body["Message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with(&format!("ErrorCode:{name};")),
        "{msg} is not IoT Hub's error body"
    );
}

#[tokio::test]
async fn the_digital_twin_of_a_pnp_device_and_its_patches() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("tc1").await?;
    let mut c = connect_pnp(&hub, "tc1", &key).await?;
    report(
        &mut c,
        10,
        &json!({
            "serialNumber": "SN-1",
            "thermostat1": {"__t": "c", "maxTempSinceLastReboot": 38.7}
        }),
    )
    .await?;

    // The service writes a component's writable property through the digital twin.
    let patch = r#"[{"op": "add", "path": "/thermostat1/targetTemperature", "value": 21.5},
                    {"op": "add", "path": "/interval", "value": 5}]"#;
    let a = call(
        &hub,
        reqwest::Method::PATCH,
        "/digitaltwins/tc1",
        &[],
        Some(patch),
    )
    .await?;
    assert_eq!(a.status, 202, "{:?}", a.body);
    assert!(a.body.is_null(), "no body: {:?}", a.body);
    let etag_after_patch = a.header("etag").ok_or("no ETag")?.to_owned();
    let p = next_on(&mut c, "$iothub/twin/PATCH/properties/desired/").await?;
    let notified: Value = serde_json::from_slice(&p.payload)?;
    let version = notified["$version"].as_u64().ok_or("no $version")?;
    assert_eq!(
        notified,
        json!({"thermostat1": {"__t": "c", "targetTemperature": 21.5}, "interval": 5, "$version": version}),
        "the device gets the desired patch with the component marker"
    );

    // The device acknowledges both, by the conventions.
    report(
        &mut c,
        11,
        &json!({
            "thermostat1": {"__t": "c", "targetTemperature": {"value": 21.5, "ac": 200, "av": version, "ad": "done"}},
            "interval": {"value": 5, "ac": 200, "av": version}
        }),
    )
    .await?;

    let twin = hub.api.get("/twins/tc1").await?;
    let a = call(&hub, reqwest::Method::GET, "/digitaltwins/tc1", &[], None).await?;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let etag = twin["etag"].as_str().ok_or("no etag")?;
    assert_eq!(a.header("etag"), Some(format!("\"{etag}\"").as_str()));
    assert_ne!(
        a.header("etag"),
        Some(etag_after_patch.as_str()),
        "the ack changed the twin"
    );
    let rmeta = &twin["properties"]["reported"]["$metadata"];
    let dmeta = &twin["properties"]["desired"]["$metadata"];
    assert_eq!(
        a.body,
        json!({
            "$dtId": "tc1",
            "serialNumber": "SN-1",
            "interval": 5,
            "thermostat1": {
                "maxTempSinceLastReboot": 38.7,
                "targetTemperature": 21.5,
                "$metadata": {
                    "maxTempSinceLastReboot": {
                        "lastUpdateTime": rmeta["thermostat1"]["maxTempSinceLastReboot"]["$lastUpdated"]
                    },
                    "targetTemperature": {
                        "desiredValue": 21.5, "desiredVersion": version,
                        "ackVersion": version, "ackCode": 200, "ackDescription": "done",
                        "lastUpdateTime": rmeta["thermostat1"]["targetTemperature"]["$lastUpdated"]
                    }
                }
            },
            "$metadata": {
                "$model": MODEL,
                "serialNumber": {"lastUpdateTime": rmeta["serialNumber"]["$lastUpdated"]},
                "interval": {
                    "desiredValue": 5, "desiredVersion": version,
                    "ackVersion": version, "ackCode": 200,
                    "lastUpdateTime": rmeta["interval"]["$lastUpdated"]
                }
            }
        })
    );
    assert!(
        a.body["thermostat1"]["$metadata"]["targetTemperature"]["lastUpdateTime"].is_string(),
        "times come from the twin's metadata"
    );
    assert!(dmeta["interval"]["$lastUpdated"].is_string());

    // If-Match: a stale etag is 412 and changes nothing; the current one goes through.
    let stale = call(
        &hub,
        reqwest::Method::PATCH,
        "/digitaltwins/tc1",
        &[("If-Match", &etag_after_patch)],
        Some(r#"[{"op": "replace", "path": "/interval", "value": 9}]"#),
    )
    .await?;
    assert_error(&stale, 412, "PreconditionFailed");
    let current = a.header("etag").ok_or("no ETag")?.to_owned();
    let ok = call(
        &hub,
        reqwest::Method::PATCH,
        "/digitaltwins/tc1",
        &[("If-Match", &current)],
        Some(r#"[{"op": "remove", "path": "/thermostat1/targetTemperature"}]"#),
    )
    .await?;
    assert_eq!(ok.status, 202, "{:?}", ok.body);
    assert_ne!(ok.header("etag"), Some(current.as_str()));
    let p = next_on(&mut c, "$iothub/twin/PATCH/properties/desired/").await?;
    let notified: Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(
        notified["thermostat1"],
        json!({"__t": "c", "targetTemperature": null}),
        "remove is a null in the component, still marked"
    );
    assert!(
        notified.get("interval").is_none(),
        "the refused patch was not applied: {notified}"
    );

    // Bad patches are 400 with IoT Hub's body, and change nothing.
    let before = hub.api.get("/twins/tc1").await?;
    for bad in [
        r#"{"op": "add", "path": "/a", "value": 1}"#,
        r#"[{"op": "move", "from": "/a", "path": "/b"}]"#,
        r#"[{"op": "add", "path": "/$metadata", "value": {}}]"#,
        r#"[{"op": "add", "path": "a", "value": 1}]"#,
        r#"[{"op": "add", "path": "/a"}]"#,
        "not json",
    ] {
        let a = call(
            &hub,
            reqwest::Method::PATCH,
            "/digitaltwins/tc1",
            &[],
            Some(bad),
        )
        .await?;
        assert_error(&a, 400, "ArgumentInvalid");
    }
    let after = hub.api.get("/twins/tc1").await?;
    assert_eq!(before["etag"], after["etag"]);

    // Unknown devices are IoT Hub's 404.
    let a = call(&hub, reqwest::Method::GET, "/digitaltwins/ghost", &[], None).await?;
    assert_error(&a, 404, "DeviceNotFound");
    let a = call(
        &hub,
        reqwest::Method::PATCH,
        "/digitaltwins/ghost",
        &[],
        Some(r#"[{"op": "add", "path": "/a", "value": 1}]"#),
    )
    .await?;
    assert_error(&a, 404, "DeviceNotFound");
    hub.stop().await;
    Ok(())
}

/// Splits `$iothub/methods/POST/{name}/?$rid={rid}`.
fn method_request(p: &Publish) -> R<(String, String)> {
    let rest = p
        .topic
        .strip_prefix("$iothub/methods/POST/")
        .ok_or("not a method request")?;
    let (name, rid) = rest.split_once("/?$rid=").ok_or("no $rid")?;
    Ok((name.to_string(), rid.to_string()))
}

#[tokio::test]
async fn commands_reach_the_device_by_name_and_component() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("tc1").await?;
    hub.create_device("offline").await?;
    let mut c = connect_pnp(&hub, "tc1", &key).await?;

    let cases = [
        (
            "/digitaltwins/tc1/commands/reboot?responseTimeoutInSeconds=10",
            "reboot",
            200,
            r#"{"rebooting": true}"#,
        ),
        (
            "/digitaltwins/tc1/components/thermostat1/commands/getMaxMinReport?connectTimeoutInSeconds=0&responseTimeoutInSeconds=10",
            "thermostat1*getMaxMinReport",
            404,
            r#"{"error": "no readings"}"#,
        ),
    ];
    for (i, (path, name, status, answer)) in cases.into_iter().enumerate() {
        let call_fut = call(
            &hub,
            reqwest::Method::POST,
            path,
            &[],
            Some(r#"{"since": "2026-12-01T00:00:00Z"}"#),
        );
        let device = async {
            let p = next_on(&mut c, "$iothub/methods/POST/").await?;
            let (got, rid) = method_request(&p)?;
            assert_eq!(got, name);
            let body: Value = serde_json::from_slice(&p.payload)?;
            assert_eq!(
                body,
                json!({"since": "2026-12-01T00:00:00Z"}),
                "the body is the payload"
            );
            c.publish_qos1(
                20 + i as u16,
                &format!("$iothub/methods/res/{status}/?$rid={rid}"),
                answer.as_bytes(),
            )
            .await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        let (a, d) = tokio::join!(call_fut, device);
        d?;
        let a = a?;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.body, serde_json::from_str::<Value>(answer)?);
        assert_eq!(
            a.header("x-ms-command-statuscode"),
            Some(status.to_string().as_str())
        );
        assert!(
            a.header("x-ms-request-id").is_some_and(|r| r.len() == 36),
            "{:?}",
            a.headers
        );
    }

    // A device that does not answer in time: the method route's 504.
    let (a, p) = tokio::join!(
        call(
            &hub,
            reqwest::Method::POST,
            "/digitaltwins/tc1/components/thermostat1/commands/slow?responseTimeoutInSeconds=5",
            &[],
            None,
        ),
        next_on(&mut c, "$iothub/methods/POST/"),
    );
    assert_eq!(method_request(&p?)?.0, "thermostat1*slow");
    assert_error(&a?, 504, "GatewayTimeout");

    // A device that is not connected: the method route's 404103, at once.
    let a = call(
        &hub,
        reqwest::Method::POST,
        "/digitaltwins/offline/commands/reboot",
        &[],
        None,
    )
    .await?;
    assert_error(&a, 404, "DeviceNotOnline");
    let a = call(
        &hub,
        reqwest::Method::POST,
        "/digitaltwins/ghost/components/thermostat1/commands/reboot",
        &[],
        None,
    )
    .await?;
    assert_error(&a, 404, "DeviceNotFound");
    // Bad timeouts and payloads are refused before anything reaches the device.
    for (path, body) in [
        (
            "/digitaltwins/tc1/commands/reboot?responseTimeoutInSeconds=soon",
            None,
        ),
        (
            "/digitaltwins/tc1/commands/reboot?responseTimeoutInSeconds=1",
            None,
        ),
        ("/digitaltwins/tc1/commands/reboot", Some("{not json")),
    ] {
        let a = call(&hub, reqwest::Method::POST, path, &[], body).await?;
        assert_error(&a, 400, "ArgumentInvalid");
    }
    assert!(
        recv_publish(&mut c, std::time::Duration::from_millis(300))
            .await?
            .is_none(),
        "a refused command reached the device"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_cli_shows_digital_twins_and_invokes_component_commands() -> TestResult {
    let hub = TestHub::start().await?;
    let dir = hub.dir.path().to_path_buf();
    let run = |args: Vec<&'static str>| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || ferrohub(&dir, &args)).await? }
    };
    let (key, _) = hub.create_device("tc1").await?;
    let mut c = connect_pnp(&hub, "tc1", &key).await?;
    report(
        &mut c,
        10,
        &json!({"thermostat1": {"__t": "c", "maxTempSinceLastReboot": 38.7}}),
    )
    .await?;

    let (ok, out, err) = run(vec!["twin", "show", "--digital", "tc1"]).await?;
    assert!(ok, "{err}");
    let dt: Value = serde_json::from_str(&out)?;
    assert_eq!(dt["$dtId"], "tc1");
    assert_eq!(dt["$metadata"]["$model"], MODEL);
    assert_eq!(dt["thermostat1"]["maxTempSinceLastReboot"], 38.7);

    let (ok, _, err) = run(vec!["twin", "show", "--digital", "tc1", "--module", "m"]).await?;
    assert!(!ok, "digital twins have no module form");
    assert!(err.contains("--module"), "{err}");

    let call = tokio::spawn(run(vec![
        "invoke",
        "tc1",
        "getMaxMinReport",
        "--component",
        "thermostat1",
        "--payload",
        r#""2026-12-01T00:00:00Z""#,
        "--timeout",
        "10",
    ]));
    let p = next_on(&mut c, "$iothub/methods/POST/").await?;
    let (name, rid) = method_request(&p)?;
    assert_eq!(name, "thermostat1*getMaxMinReport");
    assert_eq!(&p.payload[..], br#""2026-12-01T00:00:00Z""#);
    c.publish_qos1(
        30,
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        br#"{"maxTemp": 38.7}"#,
    )
    .await?;
    let (ok, out, err) = call.await??;
    assert!(ok, "{err}");
    assert!(out.contains("status: 200"), "{out}");
    assert!(out.contains("\"maxTemp\": 38.7"), "{out}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_model_is_in_the_digital_twin_as_soon_as_the_device_is_connected() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("tc1").await?;
    // The model id is recorded before CONNACK, so no wait is needed (nor allowed) here.
    let _c = connect_pnp(&hub, "tc1", &key).await?;
    let a = call(&hub, reqwest::Method::GET, "/digitaltwins/tc1", &[], None).await?;
    assert_eq!(
        a.body,
        json!({"$dtId": "tc1", "$metadata": {"$model": MODEL}})
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_routes_need_service_connect_as_the_twin_routes_do() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("tc1").await?;
    let token = |policy: &'static str| {
        let hub = &hub;
        async move {
            let p = hub
                .server()
                .hub
                .policy(policy)
                .await?
                .ok_or_else(|| format!("no {policy} policy"))?;
            R::Ok(token_for(HOST, &p.primary_key, 3600, Some(policy)))
        }
    };
    let read_only = token("registryRead").await?;
    let service = token("service").await?;
    let patch = r#"[{"op": "add", "path": "/a", "value": 1}]"#;
    let routes = [
        (reqwest::Method::GET, "/digitaltwins/tc1", None),
        (reqwest::Method::PATCH, "/digitaltwins/tc1", Some(patch)),
        (
            reqwest::Method::POST,
            "/digitaltwins/tc1/commands/reboot",
            None,
        ),
        (
            reqwest::Method::POST,
            "/digitaltwins/tc1/components/c1/commands/reboot",
            None,
        ),
    ];
    for (method, path, body) in &routes {
        let a = call_as(&hub, &read_only, method.clone(), path, &[], *body).await?;
        assert_error(&a, 401, "IotHubUnauthorizedAccess");
        let a = call_as(&hub, &service, method.clone(), path, &[], *body).await?;
        // Authorized: the commands go on to find the device offline.
        assert!(
            matches!(a.status, 200 | 202 | 404),
            "{method} {path} with ServiceConnect: {} {:?}",
            a.status,
            a.body
        );
        assert_ne!(
            a.header("iothub-errorcode"),
            Some("IotHubUnauthorizedAccess")
        );
    }
    hub.stop().await;
    Ok(())
}
