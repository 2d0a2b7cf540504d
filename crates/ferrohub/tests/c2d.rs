//! Cloud-to-device messages end to end: REST send, MQTT delivery over TLS, PUBACK completion,
//! redelivery, dead-lettering, purge and feedback, on a real hub with its SQLite store.

mod common;

use std::time::Duration;

use common::*;
use ferrohub_mqtt::{Packet, QoS};
use serde_json::{json, Value};

const C2D: &str = "devices/dev1/messages/devicebound/#";

async fn send(hub: &TestHub, device: &str, body: Value) -> R<Value> {
    hub.api
        .post(&format!("/devices/{device}/messages/deviceBound"), &body)
        .await?
        .ok_or_else(|| "empty send response".into())
}

async fn count(hub: &TestHub, device: &str) -> R<u64> {
    let d = hub.api.get(&format!("/devices/{device}")).await?;
    d["cloudToDeviceMessageCount"]
        .as_u64()
        .ok_or_else(|| "no cloudToDeviceMessageCount".into())
}

/// Receives feedback batches (completing them) until `n` records arrived or `wait` passed.
async fn feedback(hub: &TestHub, n: usize, wait: Duration) -> R<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < n && tokio::time::Instant::now() < deadline {
        match hub
            .api
            .get_with_header("/messages/serviceBound/feedback", "iothub-locktoken")
            .await?
        {
            Some((records, token)) => {
                let token = token.ok_or("no lock token")?;
                hub.api
                    .delete(&format!("/messages/serviceBound/feedback/{token}"), None)
                    .await?;
                out.extend(records.as_array().cloned().unwrap_or_default());
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(out)
}

async fn ack(c: &mut MqttClient, pid: u16) -> TestResult {
    c.send(&Packet::PubAck(pid)).await
}

#[tokio::test]
async fn a_subscribed_device_gets_the_message_with_its_properties_encoded_as_iot_hub_does(
) -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    let sent = send(
        &hub,
        "dev1",
        json!({
            "payload": "hello device",
            "messageId": "msg-1",
            "correlationId": "corr 1",
            "userId": "user1",
            "contentType": "application/json",
            "contentEncoding": "utf-8",
            "ack": "full",
            "properties": {"a-null": null, "b-empty": "", "c-special": "a b&c=d/é%"}
        }),
    )
    .await?;
    assert_eq!(sent["messageId"], "msg-1");
    assert_eq!(sent["sequenceNumber"], 1);
    let p = recv_publish(&mut c, WAIT).await?.ok_or("no C2D message")?;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(&p.payload[..], b"hello device");
    let (prefix, bag) = p.topic.split_at("devices/dev1/messages/devicebound/".len());
    assert_eq!(prefix, "devices/dev1/messages/devicebound/");
    let expiry = sent["expiryTimeUtc"].as_str().ok_or("no expiry")?;
    let expected = format!(
        "%24.mid=msg-1&%24.to=%2Fdevices%2Fdev1%2Fmessages%2Fdevicebound&%24.cid=corr%201\
         &%24.uid=user1&%24.ct=application%2Fjson&%24.ce=utf-8&%24.exp={}&iothub-ack=full\
         &a-null&b-empty=&c-special=a%20b%26c%3Dd%2F%C3%A9%25",
        expiry.replace(':', "%3A")
    );
    assert_eq!(bag, expected);
    // The bag decodes back to exactly what was sent.
    let props = ferrohub_iothub::topics::parse_property_bag(bag)?;
    assert!(props.contains(&("a-null".into(), None)));
    assert!(props.contains(&("b-empty".into(), Some(String::new()))));
    assert!(props.contains(&("c-special".into(), Some("a b&c=d/é%".into()))));

    assert_eq!(count(&hub, "dev1").await?, 1, "queued until acknowledged");
    ack(&mut c, p.packet_id).await?;
    let fb = feedback(&hub, 1, WAIT).await?;
    assert_eq!(fb.len(), 1);
    assert_eq!(fb[0]["originalMessageId"], "msg-1");
    assert_eq!(fb[0]["statusCode"], "Success");
    assert_eq!(fb[0]["deviceId"], "dev1");
    assert_eq!(count(&hub, "dev1").await?, 0);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn clean_session_delivers_nothing_before_subscribe() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    send(&hub, "dev1", json!({"payload": "early"})).await?;
    assert!(
        recv_publish(&mut c, Duration::from_millis(700))
            .await?
            .is_none(),
        "nothing before SUBSCRIBE"
    );
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("queued message not delivered")?;
    assert_eq!(&p.payload[..], b"early");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_persistent_session_gets_what_queued_while_offline_without_resubscribing() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, false).await?;
    // The C SDK's form of the filter.
    c.subscribe(1, &[("devices/+/messages/devicebound/#", QoS::AtLeastOnce)])
        .await?;
    c.send(&Packet::Disconnect).await?;
    drop(c);
    for i in 0..3 {
        send(&hub, "dev1", json!({"payload": format!("m{i}")})).await?;
    }
    assert_eq!(count(&hub, "dev1").await?, 3);
    let (mut c, present) = hub.connect_device("dev1", &key, false).await?;
    assert!(present);
    for i in 0..3 {
        let p = recv_publish(&mut c, WAIT).await?.ok_or("missing message")?;
        assert_eq!(p.payload, format!("m{i}").as_bytes(), "in send order");
        ack(&mut c, p.packet_id).await?;
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_unacknowledged_message_comes_again_on_the_next_connection() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, false).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    send(&hub, "dev1", json!({"payload": "once", "messageId": "m1"})).await?;
    let p = recv_publish(&mut c, WAIT).await?.ok_or("not delivered")?;
    assert_eq!(&p.payload[..], b"once");
    drop(c); // dropped without PUBACK
    let (mut c, _) = hub.connect_device("dev1", &key, false).await?;
    let again = recv_publish(&mut c, WAIT).await?.ok_or("not redelivered")?;
    assert_eq!(&again.payload[..], b"once");
    ack(&mut c, again.packet_id).await?;
    // Completed: a third connection gets nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    let (mut c, _) = hub.connect_device("dev1", &key, false).await?;
    assert!(recv_publish(&mut c, Duration::from_millis(700))
        .await?
        .is_none());
    assert_eq!(count(&hub, "dev1").await?, 0);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_message_out_of_deliveries_is_dead_lettered_with_feedback() -> TestResult {
    let hub = TestHub::start_with(|cfg| cfg.hub.c2d.max_delivery_count = 2).await?;
    let (key, _) = hub.create_device("dev1").await?;
    send(
        &hub,
        "dev1",
        json!({"payload": "x", "messageId": "doomed", "ack": "negative"}),
    )
    .await?;
    for attempt in 1..=2 {
        let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
        c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
        let p = recv_publish(&mut c, WAIT).await?;
        assert!(p.is_some(), "delivery {attempt} happens");
        drop(c);
    }
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    assert!(
        recv_publish(&mut c, Duration::from_millis(700))
            .await?
            .is_none(),
        "no third delivery"
    );
    let fb = feedback(&hub, 1, WAIT).await?;
    assert_eq!(fb.len(), 1);
    assert_eq!(fb[0]["statusCode"], "DeliveryCountExceeded");
    assert_eq!(fb[0]["originalMessageId"], "doomed");
    assert_eq!(count(&hub, "dev1").await?, 0);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_queue_holds_fifty_messages() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    for i in 0..50 {
        send(&hub, "dev1", json!({"payload": format!("{i}")})).await?;
    }
    let err = send(&hub, "dev1", json!({"payload": "51"}))
        .await
        .err()
        .ok_or("the 51st send was accepted")?;
    assert!(
        err.to_string()
            .contains("403 DeviceMaximumQueueDepthExceeded"),
        "{err}"
    );
    assert_eq!(count(&hub, "dev1").await?, 50);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_without_the_device() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    send(
        &hub,
        "dev1",
        json!({"payload": "late", "messageId": "short", "ttlSeconds": 1, "ack": "full"}),
    )
    .await?;
    send(
        &hub,
        "dev1",
        json!({"payload": "fine", "messageId": "long"}),
    )
    .await?;
    let fb = feedback(&hub, 1, Duration::from_secs(5)).await?;
    assert_eq!(fb.len(), 1);
    assert_eq!(fb[0]["statusCode"], "Expired");
    assert_eq!(fb[0]["originalMessageId"], "short");
    assert_eq!(count(&hub, "dev1").await?, 1);
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("live message missing")?;
    assert_eq!(&p.payload[..], b"fine", "the expired one is not delivered");
    // An expiry in the past is refused.
    let err = send(
        &hub,
        "dev1",
        json!({"payload": "x", "expiryTimeUtc": "2020-01-01T00:00:00Z"}),
    )
    .await
    .err()
    .ok_or("past expiry accepted")?;
    assert!(err.to_string().contains("400 ArgumentInvalid"), "{err}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn purge_empties_the_queue_with_feedback_where_asked() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    for (i, ack) in ["full", "none", "negative", "positive"].iter().enumerate() {
        send(
            &hub,
            "dev1",
            json!({"payload": "p", "messageId": format!("m{i}"), "ack": ack}),
        )
        .await?;
    }
    let r = hub
        .api
        .delete_with_body("/devices/dev1/commands")
        .await?
        .ok_or("no purge result")?;
    assert_eq!(r["totalMessagesPurged"], 4);
    assert_eq!(r["deviceId"], "dev1");
    assert_eq!(count(&hub, "dev1").await?, 0);
    let mut fb = feedback(&hub, 2, WAIT).await?;
    fb.sort_by_key(|r| r["originalMessageId"].as_str().map(str::to_string));
    let got: Vec<(&str, &str)> = fb
        .iter()
        .map(|r| {
            (
                r["originalMessageId"].as_str().unwrap_or(""),
                r["statusCode"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(got, vec![("m0", "Purged"), ("m2", "Purged")]);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn modules_have_their_own_queue() -> TestResult {
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
    let (_, code) = c
        .connect(connect_packet("dev1/mod1", Some(&token), true, 60))
        .await?;
    assert_eq!(code, ferrohub_mqtt::ConnectReturnCode::Accepted);
    c.subscribe(1, &[("devices/dev1/modules/mod1/#", QoS::AtLeastOnce)])
        .await?;
    send(&hub, "dev1", json!({"payload": "for the device"})).await?;
    hub.api
        .post(
            "/devices/dev1/modules/mod1/messages/deviceBound",
            &json!({"payload": "for the module", "messageId": "mm"}),
        )
        .await?;
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("module message missing")?;
    assert_eq!(&p.payload[..], b"for the module");
    assert!(
        p.topic
            .starts_with("devices/dev1/modules/mod1/messages/devicebound/%24.mid=mm&"),
        "{}",
        p.topic
    );
    ack(&mut c, p.packet_id).await?;
    assert!(recv_publish(&mut c, Duration::from_millis(500))
        .await?
        .is_none());
    assert_eq!(
        count(&hub, "dev1").await?,
        1,
        "the device's queue is separate"
    );
    hub.api
        .post(
            "/devices/dev1/modules/mod1/messages/deviceBound",
            &json!({"payload": "queued"}),
        )
        .await?;
    let m = hub.api.get("/devices/dev1/modules/mod1").await?;
    assert!(m["cloudToDeviceMessageCount"].as_u64() >= Some(1));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn queued_messages_survive_a_restart() -> TestResult {
    let mut hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    send(&hub, "dev1", json!({"payload": "one"})).await?;
    send(&hub, "dev1", json!({"payload": "two"})).await?;
    hub.restart().await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    let a = recv_publish(&mut c, WAIT).await?.ok_or("first missing")?;
    let b = recv_publish(&mut c, WAIT).await?.ok_or("second missing")?;
    assert_eq!((&a.payload[..], &b.payload[..]), (&b"one"[..], &b"two"[..]));
    // Sequence numbers keep counting after the restart.
    let r = send(&hub, "dev1", json!({"payload": "three"})).await?;
    assert_eq!(r["sequenceNumber"], 3);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_delivery_left_unacknowledged_at_shutdown_counts_after_the_restart() -> TestResult {
    let mut hub = TestHub::start_with(|cfg| cfg.hub.c2d.max_delivery_count = 1).await?;
    let (key, _) = hub.create_device("dev1").await?;
    send(
        &hub,
        "dev1",
        json!({"payload": "x", "messageId": "once-only", "ack": "negative"}),
    )
    .await?;
    let (mut c, _) = hub.connect_device("dev1", &key, false).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    assert!(recv_publish(&mut c, WAIT).await?.is_some());
    // No PUBACK; the server stops while the device still holds the message.
    hub.restart().await?;
    drop(c);
    let (mut c, _) = hub.connect_device("dev1", &key, false).await?;
    assert!(
        recv_publish(&mut c, Duration::from_millis(700))
            .await?
            .is_none(),
        "its one delivery was used before the restart"
    );
    let fb = feedback(&hub, 1, WAIT).await?;
    assert_eq!(fb.len(), 1);
    assert_eq!(fb[0]["statusCode"], "DeliveryCountExceeded");
    assert_eq!(fb[0]["originalMessageId"], "once-only");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn feedback_locks_can_be_abandoned_and_stale_tokens_are_refused() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    send(
        &hub,
        "dev1",
        json!({"payload": "x", "messageId": "fb", "ack": "positive"}),
    )
    .await?;
    let p = recv_publish(&mut c, WAIT).await?.ok_or("no message")?;
    ack(&mut c, p.packet_id).await?;
    let mut first = None;
    for _ in 0..50 {
        first = hub
            .api
            .get_with_header("/messages/serviceBound/feedback", "iothub-locktoken")
            .await?;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (records, token) = first.ok_or("no feedback")?;
    let token = token.ok_or("no token")?;
    assert_eq!(records[0]["originalMessageId"], "fb");
    // Locked: nobody else receives it meanwhile.
    assert!(hub
        .api
        .get_with_header("/messages/serviceBound/feedback", "iothub-locktoken")
        .await?
        .is_none());
    hub.api
        .post(
            &format!("/messages/serviceBound/feedback/{token}/abandon"),
            &json!({}),
        )
        .await?;
    let (again, token2) = hub
        .api
        .get_with_header("/messages/serviceBound/feedback", "iothub-locktoken")
        .await?
        .ok_or("abandoned feedback not offered again")?;
    assert_eq!(again, records);
    let err = hub
        .api
        .delete(&format!("/messages/serviceBound/feedback/{token}"), None)
        .await
        .err()
        .ok_or("an abandoned lock completed")?;
    assert!(
        err.to_string().contains("412 DeviceMessageLockLost"),
        "{err}"
    );
    hub.api
        .delete(
            &format!(
                "/messages/serviceBound/feedback/{}",
                token2.ok_or("no token")?
            ),
            None,
        )
        .await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_sends_are_refused_with_iot_hub_codes() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let big = "x".repeat(64 * 1024 + 1);
    let err = send(&hub, "dev1", json!({"payload": big}))
        .await
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains("413 MessageTooLarge"), "{err}");
    let exact = "x".repeat(64 * 1024);
    send(&hub, "dev1", json!({"payload": exact})).await?;
    let err = send(&hub, "ghost", json!({"payload": "x"}))
        .await
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains("404 DeviceNotFound"), "{err}");
    let err = send(&hub, "dev1", json!({"payload": "x", "bogus": 1}))
        .await
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains("400 ArgumentInvalid"), "{err}");
    let err = send(&hub, "dev1", json!({"payload": "x", "ack": "sometimes"}))
        .await
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains("400 ArgumentInvalid"), "{err}");
    assert_eq!(count(&hub, "dev1").await?, 1);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn delivery_follows_a_send_within_milliseconds() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(1, &[(C2D, QoS::AtLeastOnce)]).await?;
    // 20 sends one after another, each acknowledged: every one arrives with no polling delay
    // in between (a 1 s poll would make this take 20 s; the wait per message is 2 s).
    for i in 0..20 {
        send(&hub, "dev1", json!({"payload": format!("{i}")})).await?;
        let p = recv_publish(&mut c, Duration::from_secs(2))
            .await?
            .ok_or("message did not follow its send")?;
        assert_eq!(p.payload, format!("{i}").as_bytes());
        ack(&mut c, p.packet_id).await?;
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_device_list_shows_each_device_queue_depth() -> TestResult {
    let hub = TestHub::start().await?;
    for d in ["dev1", "dev2", "dev3"] {
        hub.create_device(d).await?;
    }
    for (device, n) in [("dev1", 2), ("dev3", 1)] {
        for i in 0..n {
            send(
                &hub,
                device,
                json!({"payload": "p", "messageId": format!("{device}-{i}")}),
            )
            .await?;
        }
    }
    let list = hub.api.get("/devices").await?;
    let counts: Vec<(String, u64)> = list
        .as_array()
        .ok_or("the device list is not an array")?
        .iter()
        .map(|d| {
            (
                d["deviceId"].as_str().unwrap_or_default().to_string(),
                d["cloudToDeviceMessageCount"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("dev1".to_string(), 2),
            ("dev2".to_string(), 0),
            ("dev3".to_string(), 1)
        ]
    );
    hub.stop().await;
    Ok(())
}
