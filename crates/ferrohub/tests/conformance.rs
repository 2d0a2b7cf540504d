//! Live IoT Plug and Play conformance over real MQTT/TLS and HTTPS: a device following its
//! model (TemperatureController with two thermostat components) produces no findings; one that
//! sends an unknown telemetry name, a wrong type, a component's properties without `__t`, an
//! acknowledgement with the wrong `av`, a service invoking a command the model lacks, and a
//! command answered (2xx) with a payload its response schema does not allow produce exactly
//! those findings; a model id the repository lacks is a finding of its own.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferrohub_mqtt::{ConnectReturnCode, Packet};
use reqwest::Method;
use serde_json::{json, Value};

const THERMOSTAT: &str = include_str!("../../ferrohub-dtdl/tests/models/thermostat-1.json");
const CONTROLLER: &str =
    include_str!("../../ferrohub-dtdl/tests/models/temperaturecontroller-2.json");
const DEVICE_INFO: &str = include_str!("../../ferrohub-dtdl/tests/models/deviceinformation-1.json");

/// Connects `id` announcing `model` (URL-encoded in the username, as the SDKs send it).
async fn connect_pnp(hub: &TestHub, id: &str, key: &str, model: &str) -> R<MqttClient> {
    let mut c = hub.tls().await?;
    let Packet::Connect(mut connect) =
        connect_packet(id, Some(&hub.device_token(id, key)), true, 60)
    else {
        return Err("not a connect".into());
    };
    let encoded: String = model
        .chars()
        .map(|ch| match ch {
            ':' => "%3A".to_string(),
            ';' => "%3B".to_string(),
            c => c.to_string(),
        })
        .collect();
    connect.username = Some(format!(
        "{HOST}/{id}/?api-version=2021-04-12&model-id={encoded}"
    ));
    let (_, code) = c.connect(Packet::Connect(connect)).await?;
    if code != ConnectReturnCode::Accepted {
        return Err(format!("CONNECT refused: {code:?}").into());
    }
    Ok(c)
}

/// Waits until the checker has checked `n` things of `id`, and returns its report.
async fn report_after(hub: &TestHub, id: &str, n: u64) -> R<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = rest(
            hub,
            Method::GET,
            &format!("/digitaltwins/{id}/conformance"),
            None,
        )
        .await?;
        if r.status != 200 {
            return Err(format!("conformance answered {}: {}", r.status, r.body).into());
        }
        if r.body["checked"].as_u64().unwrap_or(0) >= n {
            return Ok(r.body);
        }
        if Instant::now() > deadline {
            return Err(format!("checked fewer than {n}: {}", r.body).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reported(c: &mut MqttClient, pid: u16, patch: Value) -> TestResult {
    c.publish_qos1(
        pid,
        &format!("$iothub/twin/PATCH/properties/reported/?$rid=r{pid}"),
        patch.to_string().as_bytes(),
    )
    .await?;
    // The twin response arrives whether subscribed or not; wait for it.
    loop {
        let p = recv_publish(c, WAIT).await?.ok_or("no twin response")?;
        if p.topic.starts_with("$iothub/twin/res/204/") && p.topic.contains(&format!("$rid=r{pid}"))
        {
            return Ok(());
        }
    }
}

/// Adds the three sample models (the controller and what it uses) to the repository.
async fn add_models(hub: &TestHub) -> TestResult {
    for m in [THERMOSTAT, CONTROLLER, DEVICE_INFO] {
        let a = rest(
            hub,
            Method::POST,
            "/models",
            Some(&serde_json::from_str(m)?),
        )
        .await?;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    Ok(())
}

#[tokio::test]
async fn findings_are_exactly_what_the_device_got_wrong() -> TestResult {
    let hub = TestHub::start().await?;
    add_models(&hub).await?;
    let (key, _) = hub.create_device("tc1").await?;
    let mut c = connect_pnp(
        &hub,
        "tc1",
        &key,
        "dtmi:com:example:TemperatureController;2",
    )
    .await?;

    // Conforming traffic: root and component telemetry, reported properties with the marker,
    // and the acknowledgement of a desired value at the version that set it.
    c.publish_qos1(
        1,
        "devices/tc1/messages/events/$.ct=application%2Fjson&$.ce=utf-8",
        br#"{"workingSet": 1024.5}"#,
    )
    .await?;
    c.publish_qos1(
        2,
        "devices/tc1/messages/events/$.sub=thermostat1",
        br#"{"temperature": 21.5}"#,
    )
    .await?;
    reported(&mut c, 3, json!({"serialNumber": "SN-1", "thermostat1": {"__t": "c", "maxTempSinceLastReboot": 30.5}})).await?;
    let set = rest(
        &hub,
        Method::PATCH,
        "/twins/tc1",
        Some(&json!({"properties": {"desired": {"thermostat1": {"__t": "c", "targetTemperature": 25.0}}}})),
    )
    .await?;
    assert_eq!(set.status, 200, "{}", set.body);
    let version = set.body["properties"]["desired"]["$version"]
        .as_u64()
        .ok_or("desired $version")?;
    reported(
        &mut c,
        4,
        json!({"thermostat1": {"__t": "c", "targetTemperature": {"value": 25.0, "ac": 200, "av": version, "ad": "done"}}}),
    )
    .await?;
    let r = report_after(&hub, "tc1", 4).await?;
    assert_eq!(r["modelId"], "dtmi:com:example:TemperatureController;2");
    assert_eq!(r["findings"], json!({}), "conforming traffic: {r}");
    assert_eq!(r["examples"], json!([]));

    // Now each mistake once.
    c.publish_qos1(5, "devices/tc1/messages/events/", br#"{"humidity": 40}"#)
        .await?;
    c.publish_qos1(
        6,
        "devices/tc1/messages/events/$.sub=thermostat2",
        br#"{"temperature": "hot"}"#,
    )
    .await?;
    reported(
        &mut c,
        7,
        json!({"thermostat2": {"maxTempSinceLastReboot": 1.0}}),
    )
    .await?;
    reported(
        &mut c,
        8,
        json!({"thermostat1": {"__t": "c", "targetTemperature": {"value": 22.0, "ac": 200, "av": version + 5}}}),
    )
    .await?;
    // A command the component does not have (the device does not answer methods: the call
    // fails, and is checked all the same).
    let _ = rest(
        &hub,
        Method::POST,
        "/twins/tc1/methods",
        Some(&json!({"methodName": "thermostat1*reboot", "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 0, "payload": null})),
    )
    .await?;
    let r = report_after(&hub, "tc1", 9).await?;
    assert_eq!(
        r["findings"],
        json!({"unknownTelemetry": 1, "telemetryType": 1, "missingComponentMarker": 1, "ackVersion": 1, "unknownCommand": 1}),
        "{r}"
    );
    let examples = r["examples"].as_array().ok_or("examples")?;
    assert_eq!(examples.len(), 5);
    // Newest first, each with where it came from and the offending message.
    assert_eq!(examples[0]["kind"], "unknownCommand");
    assert_eq!(examples[0]["source"], "command");
    assert_eq!(examples[0]["excerpt"], "thermostat1*reboot");
    let wrong_type = examples
        .iter()
        .find(|e| e["kind"] == "telemetryType")
        .ok_or("telemetryType")?;
    assert_eq!(wrong_type["component"], "thermostat2");
    assert_eq!(wrong_type["name"], "temperature");
    assert_eq!(wrong_type["excerpt"], r#"{"temperature": "hot"}"#);
    let ack = examples
        .iter()
        .find(|e| e["kind"] == "ackVersion")
        .ok_or("ackVersion")?;
    assert!(
        ack["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("only at version {version}")),
        "{ack}"
    );

    // The CLI shows the same.
    let data = hub.dir.path().to_path_buf();
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || ferrohub_cli(&data, &["model", "check", "tc1"]))
            .await??;
    assert!(ok, "{err}");
    assert!(
        out.contains("model    dtmi:com:example:TemperatureController;2"),
        "{out}"
    );
    assert!(
        out.contains("finding  ackVersion: 1") && out.contains("finding  unknownCommand: 1"),
        "{out}"
    );

    // A model id the repository does not hold is a finding on every message.
    let (key2, _) = hub.create_device("x1").await?;
    let mut c2 = connect_pnp(&hub, "x1", &key2, "dtmi:com:example:Missing;1").await?;
    c2.publish_qos1(1, "devices/x1/messages/events/", br#"{"t": 1}"#)
        .await?;
    let r = report_after(&hub, "x1", 1).await?;
    assert_eq!(r["findings"], json!({"unknownModel": 1}), "{r}");

    // A device without a model is not checked; an unknown device is a 404.
    let (key3, _) = hub.create_device("plain").await?;
    let (mut c3, _) = hub.connect_device("plain", &key3, true).await?;
    c3.publish_qos1(1, "devices/plain/messages/events/", b"anything")
        .await?;
    let r = rest(&hub, Method::GET, "/digitaltwins/plain/conformance", None).await?;
    assert_eq!(
        (r.status, &r.body["checked"]),
        (200, &json!(0)),
        "{}",
        r.body
    );
    let r = rest(&hub, Method::GET, "/digitaltwins/nobody/conformance", None).await?;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("iothub-errorcode"), Some("DeviceNotFound"));
    hub.stop().await;
    Ok(())
}

/// Invokes `method` on `id` through the REST API while the device answers `status` and
/// `payload`; returns once the caller has the answer.
async fn answer_command(
    hub: &TestHub,
    c: &mut MqttClient,
    id: &str,
    method: &str,
    pid: u16,
    status: u16,
    payload: Value,
) -> TestResult {
    let api = hub.api.clone();
    let path = format!("/twins/{id}/methods");
    let body = json!({"methodName": method, "payload": null, "responseTimeoutInSeconds": 10});
    let call = tokio::spawn(async move { api.post(&path, &body).await });
    let p = recv_publish(c, WAIT).await?.ok_or("no method request")?;
    let rid = p
        .topic
        .strip_prefix(&format!("$iothub/methods/POST/{method}/?$rid="))
        .ok_or_else(|| format!("unexpected request {}", p.topic))?
        .to_string();
    c.publish_qos1(
        pid,
        &format!("$iothub/methods/res/{status}/?$rid={rid}"),
        payload.to_string().as_bytes(),
    )
    .await?;
    let answer = call.await??.ok_or("no answer")?;
    assert_eq!(answer["status"], status, "{answer}");
    Ok(())
}

#[tokio::test]
async fn a_command_response_that_does_not_fit_its_schema_is_a_finding() -> TestResult {
    let hub = TestHub::start().await?;
    add_models(&hub).await?;
    let (key, _) = hub.create_device("tc2").await?;
    let mut c = connect_pnp(
        &hub,
        "tc2",
        &key,
        "dtmi:com:example:TemperatureController;2",
    )
    .await?;
    c.subscribe(
        1,
        &[("$iothub/methods/POST/#", ferrohub_mqtt::QoS::AtMostOnce)],
    )
    .await?;
    let method = "thermostat1*getMaxMinReport";
    let good = json!({"maxTemp": 30.5, "minTemp": 18.0, "avgTemp": 22.1,
                      "startTime": "2026-12-01T10:00:00Z", "endTime": "2026-12-01T11:00:00Z"});
    answer_command(&hub, &mut c, "tc2", method, 2, 200, good).await?;
    // An error status may carry any payload.
    answer_command(&hub, &mut c, "tc2", method, 3, 500, json!("busy")).await?;
    let r = report_after(&hub, "tc2", 2).await?;
    assert_eq!(r["findings"], json!({}), "{r}");

    answer_command(
        &hub,
        &mut c,
        "tc2",
        method,
        4,
        200,
        json!({"maxTemp": "hot"}),
    )
    .await?;
    let r = report_after(&hub, "tc2", 3).await?;
    assert_eq!(r["findings"], json!({"commandResponseType": 1}), "{r}");
    let example = &r["examples"][0];
    assert_eq!(example["source"], "command");
    assert_eq!(example["component"], "thermostat1");
    assert_eq!(example["name"], "getMaxMinReport");
    assert_eq!(
        example["excerpt"],
        r#"thermostat1*getMaxMinReport -> 200 {"maxTemp":"hot"}"#
    );
    hub.stop().await;
    Ok(())
}
