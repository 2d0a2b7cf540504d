//! Direct methods end to end: REST invoke, MQTT request to the device, its response back to the
//! caller; offline, timeout, late-answer and module paths.

mod common;

use std::time::Duration;

use common::*;
use ferrohub_mqtt::QoS;
use serde_json::{json, Value};

const METHODS: &str = "$iothub/methods/POST/#";

async fn invoke(hub: &TestHub, path: &str, body: Value) -> R<Value> {
    hub.api
        .post(path, &body)
        .await?
        .ok_or_else(|| "empty method response".into())
}

/// Splits `$iothub/methods/POST/{name}/?$rid={rid}`.
fn parse_request(topic: &str) -> R<(String, String)> {
    let rest = topic
        .strip_prefix("$iothub/methods/POST/")
        .ok_or("not a method request")?;
    let (name, rid) = rest.split_once("/?$rid=").ok_or("no $rid")?;
    Ok((name.to_string(), rid.to_string()))
}

#[tokio::test]
async fn a_method_call_reaches_the_device_and_its_answer_the_caller() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;
    let api = hub.api.clone();
    let call = tokio::spawn(async move {
        api.post(
            "/twins/dev1/methods",
            &json!({"methodName": "thermostat1*getMaxMinReport", "payload": {"since": "2026-01-01T00:00:00Z"},
                    "responseTimeoutInSeconds": 10}),
        )
        .await
    });
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("no method request")?;
    let (name, rid) = parse_request(&p.topic)?;
    assert_eq!(
        name, "thermostat1*getMaxMinReport",
        "component commands pass through"
    );
    let body: Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(body, json!({"since": "2026-01-01T00:00:00Z"}));
    c.publish_qos1(
        2,
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        br#"{"maxTemp": 38.7, "minTemp": 20.1}"#,
    )
    .await?;
    let r = call.await??.ok_or("no body")?;
    assert_eq!(
        r,
        json!({"status": 200, "payload": {"maxTemp": 38.7, "minTemp": 20.1}})
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_offline_device_is_404103_at_once_or_after_the_connect_timeout() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let err = invoke(&hub, "/twins/dev1/methods", json!({"methodName": "reboot"}))
        .await
        .err()
        .ok_or("offline call succeeded")?;
    assert!(err.to_string().contains("404 DeviceNotOnline"), "{err}");
    // Connected but not subscribed to methods is not online for methods either.
    let (c, _) = hub.connect_device("dev1", &key, true).await?;
    let err = invoke(&hub, "/twins/dev1/methods", json!({"methodName": "reboot"}))
        .await
        .err()
        .ok_or("unsubscribed call succeeded")?;
    assert!(err.to_string().contains("404 DeviceNotOnline"), "{err}");
    drop(c);
    // With a connect timeout the call waits for the device to come.
    let api = hub.api.clone();
    let call = tokio::spawn(async move {
        api.post(
            "/twins/dev1/methods",
            &json!({"methodName": "reboot", "connectTimeoutInSeconds": 10, "responseTimeoutInSeconds": 10}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("no request after connecting")?;
    let (_, rid) = parse_request(&p.topic)?;
    assert!(p.payload.is_empty(), "no payload: empty body");
    c.publish_qos1(2, &format!("$iothub/methods/res/202/?$rid={rid}"), b"")
        .await?;
    let r = call.await??.ok_or("no body")?;
    assert_eq!(r, json!({"status": 202, "payload": null}));
    let err = invoke(&hub, "/twins/ghost/methods", json!({"methodName": "x"}))
        .await
        .err()
        .ok_or("unknown device succeeded")?;
    assert!(err.to_string().contains("404 DeviceNotFound"), "{err}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn no_answer_in_time_is_504101_and_a_late_answer_is_dropped_safely() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;
    let api = hub.api.clone();
    let call = tokio::spawn(async move {
        api.post(
            "/twins/dev1/methods",
            &json!({"methodName": "slow", "responseTimeoutInSeconds": 5}),
        )
        .await
    });
    let p = recv_publish(&mut c, WAIT).await?.ok_or("no request")?;
    let (_, rid) = parse_request(&p.topic)?;
    let err = call.await?.err().ok_or("timed-out call succeeded")?;
    assert!(err.to_string().contains("504 GatewayTimeout"), "{err}");
    // The late answer and one for a request that never was: acknowledged, ignored.
    c.publish_qos1(2, &format!("$iothub/methods/res/200/?$rid={rid}"), b"{}")
        .await?;
    c.publish_qos1(3, "$iothub/methods/res/200/?$rid=nope", b"{}")
        .await?;
    // The connection still works.
    let api = hub.api.clone();
    let call = tokio::spawn(async move {
        api.post("/twins/dev1/methods", &json!({"methodName": "fast"}))
            .await
    });
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("no second request")?;
    let (name, rid) = parse_request(&p.topic)?;
    assert_eq!(name, "fast");
    c.publish_qos1(
        4,
        &format!("$iothub/methods/res/500/?$rid={rid}"),
        b"\"boom\"",
    )
    .await?;
    let r = call.await??.ok_or("no body")?;
    assert_eq!(r, json!({"status": 500, "payload": "boom"}));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_requests_are_refused() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    for body in [
        json!({"methodName": "x", "responseTimeoutInSeconds": 4}),
        json!({"methodName": "x", "responseTimeoutInSeconds": 301}),
        json!({"methodName": "x", "connectTimeoutInSeconds": 301}),
        json!({"payload": 1}),
        json!({"methodName": "x", "payload": "y".repeat(128 * 1024 + 1)}),
    ] {
        let err = invoke(&hub, "/twins/dev1/methods", body.clone())
            .await
            .err()
            .ok_or(format!("{body} accepted"))?;
        assert!(
            err.to_string().contains("400 ArgumentInvalid"),
            "{body}: {err}"
        );
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn module_methods_and_many_concurrent_calls() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let (mkey, _) = hub.create_module("dev1", "mod1").await?;
    let mut c = hub.tls().await?;
    let token = token_for(
        &format!("{HOST}/devices/dev1/modules/mod1"),
        &mkey,
        3600,
        None,
    );
    c.connect(connect_packet("dev1/mod1", Some(&token), true, 60))
        .await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;
    // 40 calls at once: every answer must reach its own caller.
    let mut calls = Vec::new();
    for i in 0..40 {
        let api = hub.api.clone();
        calls.push(tokio::spawn(async move {
            api.post(
                "/twins/dev1/modules/mod1/methods",
                &json!({"methodName": "echo", "payload": i}),
            )
            .await
        }));
    }
    let mut requests = Vec::new();
    for _ in 0..40 {
        let p = recv_publish(&mut c, WAIT).await?.ok_or("missing request")?;
        let (_, rid) = parse_request(&p.topic)?;
        let n: i64 = serde_json::from_slice(&p.payload)?;
        requests.push((rid, n));
    }
    // Answered in reverse order, at QoS 0 as the Node SDK does.
    for (rid, n) in requests.into_iter().rev() {
        c.send(&publish(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            json!({"echo": n}).to_string().as_bytes(),
            QoS::AtMostOnce,
            0,
        ))
        .await?;
    }
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await??.ok_or("no body")?;
        assert_eq!(r["payload"]["echo"], i, "answer {i} went to its own caller");
    }
    hub.stop().await;
    Ok(())
}
