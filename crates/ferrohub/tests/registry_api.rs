//! The service REST API over real HTTPS: IoT Hub status codes, error bodies, etags, auth.

mod common;

use common::*;
use ferrohub_iothub::ConnectionString;
use serde_json::{json, Value};

/// A raw HTTPS call, to see status codes and bodies as a service SDK does.
async fn call(
    hub: &TestHub,
    method: reqwest::Method,
    path: &str,
    auth: Option<String>,
    body: Option<&str>,
    if_match: Option<&str>,
) -> R<(u16, Value, Option<String>)> {
    let client = https_client(hub)?;
    let url = format!("https://{HOST}:{}{path}", hub.https_addr().port());
    let mut req = client.request(method, url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if let Some(e) = if_match {
        req = req.header("If-Match", e);
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json; charset=utf-8")
            .body(b.to_string());
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let code = resp
        .headers()
        .get("iothub-errorcode")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await?;
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok((status, v, code))
}

const V: &str = "api-version=2021-04-12";

#[tokio::test]
async fn device_lifecycle_with_etags_and_iot_hub_error_codes() -> TestResult {
    let hub = TestHub::start().await?;
    let auth = owner_token(&hub)?;
    let body = r#"{"deviceId":"d1","status":"enabled","authentication":{"symmetricKey":{"primaryKey":null,"secondaryKey":null},"type":"sas"},"capabilities":{"iotEdge":false}}"#;

    // Create answers 200 (the Python SDK rejects 201) with generated keys.
    let (s, d, _) = call(
        &hub,
        reqwest::Method::PUT,
        &format!("/devices/d1?{V}"),
        Some(auth.clone()),
        Some(body),
        None,
    )
    .await?;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["deviceId"], "d1");
    assert_eq!(d["connectionState"], "Disconnected");
    assert_eq!(d["cloudToDeviceMessageCount"], 0);
    assert!(d["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .is_some_and(|k| k.len() >= 24));
    assert!(!d["generationId"].as_str().unwrap_or("").is_empty());
    let etag = d["etag"].as_str().ok_or("etag")?.to_string();

    // Create again: 409 DeviceAlreadyExists, in IoT Hub's error shape.
    let (s, e, code) = call(
        &hub,
        reqwest::Method::PUT,
        &format!("/devices/d1?{V}"),
        Some(auth.clone()),
        Some(body),
        None,
    )
    .await?;
    assert_eq!((s, code.as_deref()), (409, Some("DeviceAlreadyExists")));
    assert!(
        e["Message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ErrorCode:DeviceAlreadyExists;")),
        "{e}"
    );
    assert!(e["ExceptionMessage"]
        .as_str()
        .is_some_and(|m| m.contains("Tracking ID:")));

    // Update with a stale etag: 412; with the right one (quoted, as the SDK sends it): 200.
    let upd = body.replace("\"enabled\"", "\"disabled\"");
    let (s, _, code) = call(
        &hub,
        reqwest::Method::PUT,
        &format!("/devices/d1?{V}"),
        Some(auth.clone()),
        Some(&upd),
        Some("\"bm9wZQ==\""),
    )
    .await?;
    assert_eq!((s, code.as_deref()), (412, Some("PreconditionFailed")));
    let (s, d2, _) = call(
        &hub,
        reqwest::Method::PUT,
        &format!("/devices/d1?{V}"),
        Some(auth.clone()),
        Some(&upd),
        Some(&format!("\"{etag}\"")),
    )
    .await?;
    assert_eq!(s, 200);
    assert_eq!(d2["status"], "disabled");
    assert_ne!(d2["etag"], d["etag"]);
    assert_eq!(
        d2["generationId"], d["generationId"],
        "an update keeps the generation"
    );

    let (s, list, _) = call(
        &hub,
        reqwest::Method::GET,
        &format!("/devices?top=10&{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // Delete with a stale etag fails, with * succeeds, then 404 DeviceNotFound.
    let (s, _, _) = call(
        &hub,
        reqwest::Method::DELETE,
        &format!("/devices/d1?{V}"),
        Some(auth.clone()),
        None,
        Some(&format!("\"{etag}\"")),
    )
    .await?;
    assert_eq!(s, 412);
    let (s, _, _) = call(
        &hub,
        reqwest::Method::DELETE,
        &format!("/devices/d1?{V}"),
        Some(auth.clone()),
        None,
        Some("\"*\""),
    )
    .await?;
    assert_eq!(s, 204);
    let (s, e, code) = call(
        &hub,
        reqwest::Method::GET,
        &format!("/devices/d1?{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_eq!((s, code.as_deref()), (404, Some("DeviceNotFound")), "{e}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_requests_are_refused_with_400_and_nothing_changes() -> TestResult {
    let hub = TestHub::start().await?;
    let auth = owner_token(&hub)?;
    let put = |path: &str, body: &'static str| {
        let (hub, auth, path) = (&hub, auth.clone(), path.to_string());
        async move {
            call(
                hub,
                reqwest::Method::PUT,
                &path,
                Some(auth),
                Some(body),
                None,
            )
            .await
        }
    };
    for (path, body) in [
        (format!("/devices/d1?{V}"), "{not json"),
        (format!("/devices/d1?{V}"), r#"{"deviceId":"other"}"#),
        (
            format!("/devices/d1?{V}"),
            r#"{"authentication":{"type":"sas","symmetricKey":{"primaryKey":"short"}}}"#,
        ),
        (
            format!("/devices/d1?{V}"),
            r#"{"authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint":"xyz"}}}"#,
        ),
        (format!("/devices/d1?{V}"), r#"{"status":"sleepy"}"#),
        (format!("/devices/bad%20id?{V}"), r#"{}"#),
        (format!("/devices/{}?{V}", "a".repeat(129)), r#"{}"#),
        ("/devices/d1".to_string(), r#"{}"#),
    ] {
        let (s, e, code) = put(&path, body).await?;
        assert_eq!(
            (s, code.as_deref()),
            (400, Some("ArgumentInvalid")),
            "{path} {body}: {e}"
        );
    }
    let (s, list, _) = call(
        &hub,
        reqwest::Method::GET,
        &format!("/devices?{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_eq!((s, list), (200, json!([])));
    // Module on a missing device: 404.
    let (s, _, code) = put(&format!("/devices/nope/modules/m?{V}"), "{}").await?;
    assert_eq!((s, code.as_deref()), (404, Some("DeviceNotFound")));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn service_auth_requires_a_valid_policy_token_with_the_right() -> TestResult {
    let hub = TestHub::start().await?;
    let path = format!("/devices?{V}");
    let (s, _, code) = call(&hub, reqwest::Method::GET, &path, None, None, None).await?;
    assert_eq!(
        (s, code.as_deref()),
        (401, Some("IotHubUnauthorizedAccess"))
    );
    let cs = ConnectionString::parse(&hub.server().info.owner_connection_string)?;
    let key = cs.shared_access_key.clone().ok_or("key")?;
    let expired = token_for(&cs.host_name, &key, -5, Some("iothubowner"));
    assert_eq!(
        call(&hub, reqwest::Method::GET, &path, Some(expired), None, None)
            .await?
            .0,
        401
    );
    let wrong_key = token_for(
        &cs.host_name,
        "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=",
        3600,
        Some("iothubowner"),
    );
    assert_eq!(
        call(
            &hub,
            reqwest::Method::GET,
            &path,
            Some(wrong_key),
            None,
            None
        )
        .await?
        .0,
        401
    );
    let no_skn = token_for(&cs.host_name, &key, 3600, None);
    assert_eq!(
        call(&hub, reqwest::Method::GET, &path, Some(no_skn), None, None)
            .await?
            .0,
        401
    );
    // sr with or without the port both name this hub (the Python SDK includes it).
    let bare = token_for(HOST, &key, 3600, Some("iothubowner"));
    assert_eq!(
        call(&hub, reqwest::Method::GET, &path, Some(bare), None, None)
            .await?
            .0,
        200
    );

    // A read-only policy can list but not write.
    let ro = hub
        .server()
        .hub
        .policy("registryRead")
        .await?
        .ok_or("registryRead policy")?;
    let ro_token = token_for(HOST, &ro.primary_key, 3600, Some("registryRead"));
    assert_eq!(
        call(
            &hub,
            reqwest::Method::GET,
            &path,
            Some(ro_token.clone()),
            None,
            None
        )
        .await?
        .0,
        200
    );
    let (s, _, _) = call(
        &hub,
        reqwest::Method::PUT,
        &format!("/devices/d1?{V}"),
        Some(ro_token),
        Some("{}"),
        None,
    )
    .await?;
    assert_eq!(s, 401);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn modules_crud_and_connection_state_follows_devices() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("d1").await?;
    hub.create_module("d1", "m1").await?;
    hub.create_module("d1", "m2").await?;
    let mods = hub.api.get("/devices/d1/modules").await?;
    assert_eq!(mods.as_array().map(Vec::len), Some(2));
    let again = hub
        .api
        .put("/devices/d1/modules/m1", &json!({"moduleId": "m1"}), None)
        .await;
    assert!(again.is_err_and(|e| e.to_string().contains("ModuleAlreadyExistsOnDevice")));

    let (c, _) = hub.connect_device("d1", &key, true).await?;
    let d = hub.api.get("/devices/d1").await?;
    assert_eq!(d["connectionState"], "Connected");
    assert!(d["lastActivityTime"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    drop(c);
    let mut state = Value::Null;
    for _ in 0..50 {
        state = hub.api.get("/devices/d1").await?["connectionState"].clone();
        if state == "Disconnected" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state, "Disconnected");

    hub.api.delete("/devices/d1/modules/m1", None).await?;
    assert!(hub
        .api
        .get("/devices/d1/modules/m1")
        .await
        .is_err_and(|e| e.to_string().contains("ModuleNotFound")));
    // Deleting the device takes its modules with it.
    hub.api.delete("/devices/d1", None).await?;
    hub.create_device("d1").await?;
    assert_eq!(hub.api.get("/devices/d1/modules").await?, json!([]));
    hub.stop().await;
    Ok(())
}

/// Connects `device/module` with its SAS key; returns the client and session-present.
async fn connect_module(hub: &TestHub, id: &str, mid: &str, key: &str) -> R<(MqttClient, bool)> {
    let token = token_for(
        &format!("{HOST}/devices/{id}/modules/{mid}"),
        key,
        3600,
        None,
    );
    let mut c = hub.tls().await?;
    let (present, code) = c
        .connect(connect_packet(
            &format!("{id}/{mid}"),
            Some(&token),
            false,
            60,
        ))
        .await?;
    if code != ferrohub_mqtt::ConnectReturnCode::Accepted {
        return Err(format!("CONNACK {code:?}").into());
    }
    Ok((c, present))
}

#[tokio::test]
async fn deleting_a_device_forgets_its_modules_sessions_and_presence() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("d1").await?;
    let (key, _) = hub.create_module("d1", "m1").await?;
    let (mut c, present) = connect_module(&hub, "d1", "m1", &key).await?;
    assert!(!present);
    c.subscribe(
        1,
        &[("$iothub/methods/POST/#", ferrohub_mqtt::QoS::AtMostOnce)],
    )
    .await?;
    c.send(&ferrohub_mqtt::Packet::Disconnect).await?;
    c.expect_closed().await?;
    // The session outlives the connection, and presence remembers it.
    let (mut c, present) = connect_module(&hub, "d1", "m1", &key).await?;
    assert!(
        present,
        "a CleanSession=0 session is kept between connections"
    );
    c.send(&ferrohub_mqtt::Packet::Disconnect).await?;
    c.expect_closed().await?;
    let m = hub.api.get("/devices/d1/modules/m1").await?;
    assert!(m["connectionStateUpdatedTime"].is_string(), "{m}");

    hub.api.delete("/devices/d1", None).await?;
    hub.create_device("d1").await?;
    let (key, _) = hub.create_module("d1", "m1").await?;

    let m = hub.api.get("/devices/d1/modules/m1").await?;
    assert_eq!(m["connectionState"], "Disconnected");
    assert_eq!(
        m["connectionStateUpdatedTime"], "0001-01-01T00:00:00Z",
        "the deleted module's presence outlived it: {m}"
    );
    let (_c, present) = connect_module(&hub, "d1", "m1", &key).await?;
    assert!(!present, "the deleted module's session outlived it");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn every_route_checks_api_version_and_the_policy_right_first() -> TestResult {
    let hub = TestHub::start().await?;
    let owner = owner_token(&hub)?;
    hub.create_device("d1").await?;
    for path in ["/devices/d1", "/twins/d1", "/devices", "/certificates"] {
        let (s, e, code) = call(
            &hub,
            reqwest::Method::GET,
            path,
            Some(owner.clone()),
            None,
            None,
        )
        .await?;
        assert_eq!(s, 400, "{path}: {e}");
        assert_eq!(code.as_deref(), Some("ArgumentInvalid"), "{path}");
        assert!(
            e["Message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ErrorCode:ArgumentInvalid;")),
            "{path}: {e}"
        );
        assert!(e["ExceptionMessage"].is_string(), "{path}: {e}");
    }
    // The version is checked before the caller: no token still gets the 400.
    let (s, _, _) = call(&hub, reqwest::Method::GET, "/devices/d1", None, None, None).await?;
    assert_eq!(s, 400);
    let (s, _, _) = call(
        &hub,
        reqwest::Method::GET,
        "/devices/d1?api-version=1999-01-01",
        Some(owner.clone()),
        None,
        None,
    )
    .await?;
    assert_eq!(s, 400);

    let ro = hub
        .server()
        .hub
        .policy("registryRead")
        .await?
        .ok_or("registryRead policy")?;
    let ro = token_for(HOST, &ro.primary_key, 3600, Some("registryRead"));
    // registryRead reads the registry, but may neither write it nor use service operations.
    for (method, path, body) in [
        (reqwest::Method::GET, format!("/devices/d1?{V}"), None),
        (reqwest::Method::PUT, format!("/devices/d2?{V}"), Some("{}")),
        (reqwest::Method::GET, format!("/twins/d1?{V}"), None),
        (
            reqwest::Method::POST,
            format!("/devices/d1/messages/deviceBound?{V}"),
            Some("{}"),
        ),
        (reqwest::Method::GET, format!("/events?{V}"), None),
    ] {
        let expect = if method == reqwest::Method::GET && path.starts_with("/devices") {
            200
        } else {
            401
        };
        let (s, e, code) = call(&hub, method.clone(), &path, Some(ro.clone()), body, None).await?;
        assert_eq!(s, expect, "{method} {path}: {e}");
        if expect == 401 {
            assert_eq!(code.as_deref(), Some("IotHubUnauthorizedAccess"), "{path}");
            assert!(e["Message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ErrorCode:IotHubUnauthorizedAccess;")));
        }
    }
    let (s, _, code) = call(
        &hub,
        reqwest::Method::GET,
        &format!("/devices/d1?{V}"),
        Some("SharedAccessSignature sr=x&sig=y&se=1".into()),
        None,
        None,
    )
    .await?;
    assert_eq!(
        (s, code.as_deref()),
        (401, Some("IotHubUnauthorizedAccess"))
    );
    hub.stop().await;
    Ok(())
}

/// Asserts an answer is IoT Hub's error: the status, the `iothub-errorcode` header and the
/// `{"Message": "ErrorCode:<code>;...", "ExceptionMessage": ...}` body.
fn assert_iot_hub_error(
    answer: &(u16, Value, Option<String>),
    status: u16,
    code: &str,
    what: &str,
) {
    let (s, e, header) = answer;
    assert_eq!(*s, status, "{what}: {e}");
    assert_eq!(header.as_deref(), Some(code), "{what}: {e}");
    assert!(
        e["Message"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!("ErrorCode:{code};"))),
        "{what}: {e}"
    );
    assert!(e["ExceptionMessage"].is_string(), "{what}: {e}");
}

#[tokio::test]
async fn refusals_by_routing_and_extractors_carry_iot_hub_error_bodies() -> TestResult {
    let hub = TestHub::start().await?;
    let auth = owner_token(&hub)?;
    // `%FF` is not UTF-8 once decoded: axum's own Path rejection answered plain text.
    for path in [
        format!("/devices/%FF?{V}"),
        format!("/devices/%FF/modules?{V}"),
        format!("/certificates/%FF?{V}"),
        format!("/twins/%FF?{V}"),
    ] {
        let answer = call(
            &hub,
            reqwest::Method::GET,
            &path,
            Some(auth.clone()),
            None,
            None,
        )
        .await?;
        assert_iot_hub_error(&answer, 400, "ArgumentInvalid", &path);
    }

    // Past axum's 2 MiB body limit: it answered 413 in plain text.
    let big = format!(
        r#"{{"deviceId":"big","x":"{}"}}"#,
        "a".repeat((2 << 20) + 1024)
    );
    let answer = call(
        &hub,
        reqwest::Method::PUT,
        &format!("/devices/big?{V}"),
        Some(auth.clone()),
        Some(&big),
        None,
    )
    .await?;
    assert_iot_hub_error(&answer, 413, "MessageTooLarge", "oversized body");
    let (s, _, _) = call(
        &hub,
        reqwest::Method::GET,
        &format!("/devices/big?{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_eq!(s, 404, "the oversized create must not have happened");

    // A device named `query` is a device like any other, beside `POST /devices/query`.
    let (s, d, _) = call(
        &hub,
        reqwest::Method::PUT,
        &format!("/devices/query?{V}"),
        Some(auth.clone()),
        Some(r#"{"deviceId":"query"}"#),
        None,
    )
    .await?;
    assert_eq!((s, d["deviceId"].as_str()), (200, Some("query")), "{d}");
    let (s, d, _) = call(
        &hub,
        reqwest::Method::GET,
        &format!("/devices/query?{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_eq!((s, d["deviceId"].as_str()), (200, Some("query")), "{d}");
    let (s, d, _) = call(
        &hub,
        reqwest::Method::POST,
        &format!("/devices/query?{V}"),
        Some(auth.clone()),
        Some(r#"{"query":"SELECT deviceId FROM devices WHERE deviceId = 'query'"}"#),
        None,
    )
    .await?;
    assert_eq!((s, d), (200, json!([{"deviceId": "query"}])));
    let answer = call(
        &hub,
        reqwest::Method::POST,
        &format!("/devices/query2?{V}"),
        Some(auth.clone()),
        Some("{}"),
        None,
    )
    .await?;
    assert_iot_hub_error(&answer, 405, "InvalidOperation", "POST /devices/query2");
    let (s, _, _) = call(
        &hub,
        reqwest::Method::DELETE,
        &format!("/devices/query?{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_eq!(s, 204);

    // A route with another method: axum answered an empty 405.
    let answer = call(
        &hub,
        reqwest::Method::DELETE,
        &format!("/devices?{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_iot_hub_error(&answer, 405, "InvalidOperation", "DELETE /devices");
    let answer = call(
        &hub,
        reqwest::Method::GET,
        &format!("/no/such/route?{V}"),
        Some(auth.clone()),
        None,
        None,
    )
    .await?;
    assert_iot_hub_error(&answer, 404, "InvalidOperation", "unknown route");
    hub.stop().await;
    Ok(())
}
