//! Device-to-cloud telemetry end to end over real TLS: property bags, validation, stamping,
//! size limits, Will messages, ordering, consumer groups, retention.

mod common;

use std::time::Duration;

use common::*;
use ferrohub_mqtt::{Connect, LastWill, Packet, QoS};
use serde_json::Value;

const ALL: &str = "from=start";
const SHORT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn property_bags_become_system_and_application_properties() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    let bag = "%24.mid=mid-1&%24.cid=corr-1&%24.uid=user-1&%24.ct=application%2Fjson&%24.ce=utf-8&%24.to=%2Fdevices%2Fdev1&%24.exp=2030-01-01T00%3A00%3A00Z&%24.sub=thermostat1\
               &alert=high%20temp&empty=&novalue&iothub-creation-time-utc=2021-04-21T11%3A30%3A16Z";
    c.publish_qos1(
        1,
        &format!("devices/dev1/messages/events/{bag}"),
        br#"{"t":21.5}"#,
    )
    .await?;
    let ev = read_events(&hub, ALL, 1, SHORT).await?;
    let e = ev.first().ok_or("no event")?;
    let sys = &e["systemProperties"];
    assert_eq!(sys["message-id"], "mid-1");
    assert_eq!(sys["correlation-id"], "corr-1");
    assert_eq!(sys["user-id"], "user-1");
    assert_eq!(sys["content-type"], "application/json");
    assert_eq!(sys["content-encoding"], "utf-8");
    assert_eq!(sys["to"], "/devices/dev1");
    assert_eq!(sys["absolute-expiry-time"], "2030-01-01T00:00:00Z");
    assert_eq!(sys["dt-subject"], "thermostat1");
    let app = &e["properties"];
    assert_eq!(app["alert"], "high temp");
    assert_eq!(app["empty"], "");
    assert_eq!(app["novalue"], Value::Null);
    assert_eq!(app["iothub-creation-time-utc"], "2021-04-21T11:30:16Z");
    assert_eq!(e["body"], r#"{"t":21.5}"#);
    assert_eq!(e["deviceId"], "dev1");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn hub_stamps_cannot_be_spoofed() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let mut c = hub.tls().await?;
    let Packet::Connect(mut connect) =
        connect_packet("dev1", Some(&hub.device_token("dev1", &key)), true, 60)
    else {
        return Err("not a connect".into());
    };
    connect.username = Some(format!(
        "{HOST}/dev1/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"
    ));
    c.connect(Packet::Connect(connect)).await?;
    let bag = "iothub-connection-device-id=evil&iothub-connection-auth-method=x&iothub-enqueuedtime=never&dt-dataschema=fake&IoTHub-Connection-Module-Id=m&ok=1";
    c.publish_qos1(1, &format!("devices/dev1/messages/events/{bag}"), b"x")
        .await?;
    let ev = read_events(&hub, ALL, 1, SHORT).await?;
    let e = ev.first().ok_or("no event")?;
    let sys = &e["systemProperties"];
    assert_eq!(sys["iothub-connection-device-id"], "dev1");
    assert_eq!(
        sys["iothub-connection-auth-method"],
        r#"{"scope":"device","type":"sas","issuer":"iothub"}"#
    );
    assert_eq!(sys["dt-dataschema"], "dtmi:com:example:Thermostat;1");
    assert_eq!(sys["iothub-message-source"], "Telemetry");
    let device = hub.api.get("/devices/dev1").await?;
    assert_eq!(
        sys["iothub-connection-auth-generation-id"],
        device["generationId"]
    );
    assert!(
        sys["iothub-enqueuedtime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 28),
        "{sys}"
    );
    assert_eq!(
        e["enqueuedTime"], sys["iothub-enqueuedtime"],
        "the stream shows the hub's stamp"
    );
    assert!(sys.get("iothub-connection-module-id").is_none());
    let app = e["properties"].as_object().ok_or("properties")?;
    assert_eq!(
        app.keys().collect::<Vec<_>>(),
        vec!["ok"],
        "spoofed stamps removed: {app:?}"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn invalid_messages_close_the_connection_and_are_never_stored() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let long_id = "a".repeat(129);
    for bag in [
        format!("%24.mid={long_id}"),
        "%24.mid=has%20space".to_string(),
        "k%C3%A9y=v".to_string(),
        "key=v%C3%A9".to_string(),
        "iothub-creation-time-utc=2021-04-21T11%3A30%3A16%2B02%3A00".to_string(),
        "iothub-creation-time-utc=yesterday".to_string(),
    ] {
        let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
        c.send(&publish(
            &format!("devices/dev1/messages/events/{bag}"),
            b"x",
            QoS::AtLeastOnce,
            1,
        ))
        .await?;
        c.expect_closed().await.map_err(|e| format!("{bag}: {e}"))?;
    }
    // 128 characters is fine.
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.publish_qos1(
        1,
        &format!("devices/dev1/messages/events/%24.mid={}", "a".repeat(128)),
        b"ok",
    )
    .await?;
    let ev = read_events(&hub, ALL, 10, Duration::from_secs(1)).await?;
    assert_eq!(ev.len(), 1, "only the valid message was stored: {ev:?}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_256_kb_limit_counts_properties_and_is_exact() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    // Size = body + system property values + application names and values.
    let bag = "%24.mid=abcd&name=value"; // 4 + 4 + 5 = 13 bytes of properties
    let at_limit = vec![b'x'; 256 * 1024 - 13];
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.publish_qos1(1, &format!("devices/dev1/messages/events/{bag}"), &at_limit)
        .await?;
    let over = vec![b'x'; 256 * 1024 - 12];
    c.send(&publish(
        &format!("devices/dev1/messages/events/{bag}"),
        &over,
        QoS::AtLeastOnce,
        2,
    ))
    .await?;
    c.expect_closed().await?;
    let ev = read_events(&hub, ALL, 2, Duration::from_secs(1)).await?;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["body"].as_str().map(str::len), Some(256 * 1024 - 13));
    hub.stop().await;
    Ok(())
}

fn with_will(client_id: &str, token: &str, retain: bool) -> Packet {
    let Packet::Connect(c) = connect_packet(client_id, Some(token), true, 60) else {
        unreachable!()
    };
    Packet::Connect(Connect {
        will: Some(LastWill {
            topic: format!("devices/{client_id}/messages/events/reason=gone"),
            payload: bytes::Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain,
        }),
        ..c
    })
}

#[tokio::test]
async fn will_is_telemetry_on_network_drop_but_not_after_disconnect() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let token = hub.device_token("dev1", &key);
    // Clean DISCONNECT: the Will is discarded.
    let mut c = hub.tls().await?;
    c.connect(with_will("dev1", &token, false)).await?;
    c.send(&Packet::Disconnect).await?;
    assert_eq!(c.recv().await?, None);
    // Network drop: the Will is delivered, marked as such.
    let mut c = hub.tls().await?;
    c.connect(with_will("dev1", &token, true)).await?;
    drop(c);
    let ev = read_events(&hub, ALL, 2, SHORT).await?;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["body"], "offline");
    assert_eq!(ev[0]["properties"]["iothub-MessageType"], "Will");
    assert_eq!(ev[0]["properties"]["reason"], "gone");
    assert_eq!(ev[0]["properties"]["mqtt-retain"], "true");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn retain_flag_becomes_a_property_and_modules_are_stamped() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let (key, _) = hub.create_module("dev1", "mod1").await?;
    let t = token_for(
        &format!("{HOST}/devices/dev1/modules/mod1"),
        &key,
        3600,
        None,
    );
    let mut c = hub.tls().await?;
    c.connect(connect_packet("dev1/mod1", Some(&t), true, 60))
        .await?;
    let mut p = publish(
        "devices/dev1/modules/mod1/messages/events/",
        b"r",
        QoS::AtLeastOnce,
        1,
    );
    if let Packet::Publish(ref mut pp) = p {
        pp.retain = true;
    }
    c.send(&p).await?;
    assert_eq!(c.recv().await?, Some(Packet::PubAck(1)));
    let ev = read_events(&hub, ALL, 1, SHORT).await?;
    let e = ev.first().ok_or("no event")?;
    assert_eq!(e["properties"]["mqtt-retain"], "true");
    assert_eq!(e["moduleId"], "mod1");
    assert_eq!(e["systemProperties"]["iothub-connection-module-id"], "mod1");
    assert_eq!(
        e["systemProperties"]["iothub-connection-auth-method"],
        r#"{"scope":"module","type":"sas","issuer":"iothub"}"#
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn pipelined_messages_keep_their_order_per_device() -> TestResult {
    let hub = TestHub::start().await?;
    let mut clients = Vec::new();
    for d in ["a", "b", "c"] {
        let (key, _) = hub.create_device(d).await?;
        clients.push((d, hub.connect_device(d, &key, true).await?.0));
    }
    const N: u16 = 200;
    for (d, c) in clients.iter_mut() {
        // All in flight at once: the server may not reorder them.
        for i in 1..=N {
            c.send(&publish(
                &format!("devices/{d}/messages/events/i={i}"),
                &i.to_be_bytes(),
                QoS::AtLeastOnce,
                i,
            ))
            .await?;
        }
    }
    for (_, c) in clients.iter_mut() {
        for i in 1..=N {
            assert_eq!(
                c.recv().await?,
                Some(Packet::PubAck(i)),
                "PUBACKs come in PUBLISH order"
            );
        }
    }
    let ev = read_events(&hub, ALL, 3 * N as usize, Duration::from_secs(10)).await?;
    assert_eq!(ev.len(), 3 * N as usize);
    for d in ["a", "b", "c"] {
        let seq: Vec<u64> = ev
            .iter()
            .filter(|e| e["deviceId"] == d)
            .map(|e| {
                e["properties"]["i"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        assert_eq!(
            seq,
            (1..=N as u64).collect::<Vec<_>>(),
            "device {d} in order"
        );
        let parts: std::collections::BTreeSet<_> = ev
            .iter()
            .filter(|e| e["deviceId"] == d)
            .map(|e| e["partition"].as_u64())
            .collect();
        assert_eq!(parts.len(), 1, "one partition per device");
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn consumer_groups_read_independently_with_checkpoints() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    for i in 1..=6u16 {
        c.publish_qos1(i, &format!("devices/dev1/messages/events/n={i}"), b"x")
            .await?;
    }
    let n = |e: &Value| e["properties"]["n"].as_str().unwrap_or("").to_string();
    // Group g1 reads three and goes away; its checkpoint is saved as it reads.
    let first = read_events(&hub, "consumerGroup=g1&from=start", 3, SHORT).await?;
    assert_eq!(first.iter().map(n).collect::<Vec<_>>(), ["1", "2", "3"]);
    // g2 is unaffected and reads everything.
    let all = read_events(&hub, "consumerGroup=g2&from=start", 6, SHORT).await?;
    assert_eq!(all.len(), 6);
    // g1 comes back at its checkpoint: nothing it was sent is replayed, nothing new is missed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 8..=9u16 {
        c.publish_qos1(i, &format!("devices/dev1/messages/events/n={i}"), b"x")
            .await?;
    }
    let rest = read_events(
        &hub,
        "consumerGroup=g1&from=checkpoint",
        10,
        Duration::from_secs(2),
    )
    .await?;
    let rest: Vec<String> = rest.iter().map(n).collect();
    assert_eq!(
        rest.last().map(String::as_str),
        Some("9"),
        "g1 gets what was published since: {rest:?}"
    );
    assert!(
        rest.iter().all(|x| x.as_str() > "3"),
        "g1 does not replay what it read: {rest:?}"
    );
    // A new group starting at its (absent) checkpoint starts at the end.
    assert!(
        read_events(&hub, "consumerGroup=g4", 1, Duration::from_millis(500))
            .await?
            .is_empty()
    );
    // Live tail: a reader at the end sees a message published after it started.
    let reader = {
        let api = hub.api.stream("/events?consumerGroup=g3&from=end").await?;
        tokio::spawn(async move {
            let mut api = api;
            let chunk = tokio::time::timeout(Duration::from_secs(5), api.chunk()).await;
            matches!(chunk, Ok(Ok(Some(c))) if String::from_utf8_lossy(&c).contains("\"n\":\"7\""))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.publish_qos1(10, "devices/dev1/messages/events/n=7", b"x")
        .await?;
    assert!(reader.await?, "the live reader received the new message");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn retention_removes_expired_messages() -> TestResult {
    let hub = TestHub::start_with(|cfg| {
        cfg.retention = Duration::from_millis(500);
        cfg.retention_interval = Duration::from_millis(200);
    })
    .await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.publish_qos1(1, "devices/dev1/messages/events/", b"old")
        .await?;
    assert_eq!(read_events(&hub, ALL, 1, SHORT).await?.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.publish_qos1(2, "devices/dev1/messages/events/", b"new")
        .await?;
    let ev = read_events(&hub, ALL, 2, Duration::from_secs(1)).await?;
    assert_eq!(
        ev.iter().map(|e| e["body"].clone()).collect::<Vec<_>>(),
        vec![Value::from("new")]
    );
    hub.stop().await;
    Ok(())
}
