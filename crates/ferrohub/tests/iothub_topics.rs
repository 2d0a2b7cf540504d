//! Topic authorization (spec section 4) over real TLS: what a device may publish and subscribe.

mod common;

use std::time::Duration;

use common::*;
use ferrohub_mqtt::{Packet, QoS, SubscribeReturnCode};
use serde_json::json;

const OK1: SubscribeReturnCode = SubscribeReturnCode::Success(QoS::AtLeastOnce);
const OK0: SubscribeReturnCode = SubscribeReturnCode::Success(QoS::AtMostOnce);
const FAIL: SubscribeReturnCode = SubscribeReturnCode::Failure;

#[tokio::test]
async fn own_topics_are_granted_foreign_ones_refused() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    let codes = c
        .subscribe(
            1,
            &[
                ("devices/dev1/messages/devicebound/#", QoS::AtLeastOnce),
                ("devices/dev2/messages/devicebound/#", QoS::AtLeastOnce),
                ("+/#", QoS::AtLeastOnce),
                ("devices/+/messages/events/#", QoS::AtLeastOnce),
                ("$iothub/methods/POST/#", QoS::AtMostOnce),
                ("$iothub/twin/res/#", QoS::ExactlyOnce),
                ("$SYS/#", QoS::AtLeastOnce),
            ],
        )
        .await?;
    assert_eq!(
        codes,
        vec![OK1, FAIL, FAIL, FAIL, OK0, OK1, FAIL],
        "QoS 2 is granted as 1"
    );
    // The C SDK's form: `+` in the device segment means "me".
    assert_eq!(
        c.subscribe(2, &[("devices/+/messages/devicebound/#", QoS::AtLeastOnce)])
            .await?,
        vec![OK1]
    );
    // Refused filters did not take slots: one more fits (5 in all), the next does not.
    assert_eq!(
        c.subscribe(
            3,
            &[("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)]
        )
        .await?,
        vec![OK1]
    );
    // Unsubscribing frees the slot again.
    c.send(&Packet::Unsubscribe(ferrohub_mqtt::Unsubscribe {
        packet_id: 4,
        filters: vec!["$iothub/methods/POST/#".into()],
    }))
    .await?;
    assert_eq!(c.recv().await?, Some(Packet::UnsubAck(4)));
    assert_eq!(
        c.subscribe(5, &[("$iothub/methods/POST/#", QoS::AtLeastOnce)])
            .await?,
        vec![OK1]
    );

    // Publishing is allowed on its own telemetry, twin and method topics.
    c.publish_qos1(10, "devices/dev1/messages/events/", b"t")
        .await?;
    c.publish_qos1(11, "devices/dev1/messages/events/%24.mid=m1&a=b", b"t")
        .await?;
    c.publish_qos1(12, "$iothub/twin/GET/?$rid=1", b" ").await?;
    c.publish_qos1(13, "$iothub/twin/PATCH/properties/reported/?$rid=2", b"{}")
        .await?;
    c.publish_qos1(14, "$iothub/methods/res/200/?$rid=3", b"{}")
        .await?;
    c.send(&Packet::PingReq).await?;
    assert_eq!(c.recv().await?, Some(Packet::PingResp));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn sixth_subscription_is_refused_for_a_module() -> TestResult {
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
    let filters = [
        "devices/dev1/modules/mod1/messages/devicebound/#",
        "devices/dev1/modules/mod1/inputs/#",
        "$iothub/methods/POST/#",
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "devices/dev1/modules/mod1/#",
    ];
    let all: Vec<_> = filters.iter().map(|f| (*f, QoS::AtLeastOnce)).collect();
    assert_eq!(
        c.subscribe(1, &all).await?,
        vec![OK1, OK1, OK1, OK1, OK1, FAIL]
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn publishing_to_a_foreign_topic_closes_that_connection_only() -> TestResult {
    let hub = TestHub::start().await?;
    let (key1, _) = hub.create_device("dev1").await?;
    let (key2, _) = hub.create_device("dev2").await?;
    let (mut bystander, _) = hub.connect_device("dev2", &key2, true).await?;
    for topic in [
        "devices/dev2/messages/events/",
        "devices/dev1/messages/devicebound/",
        "devices/+/messages/events/",
        "$iothub/twin/GET/",
        "some/other/topic",
        "$iothub/methods/POST/reboot/?$rid=1",
    ] {
        let (mut c, _) = hub.connect_device("dev1", &key1, true).await?;
        c.send(&publish(topic, b"x", QoS::AtLeastOnce, 1)).await?;
        c.expect_closed()
            .await
            .map_err(|e| format!("{topic}: {e}"))?;
    }
    bystander.send(&Packet::PingReq).await?;
    assert_eq!(bystander.recv().await?, Some(Packet::PingResp));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn qos2_publish_disconnects() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.send(&publish(
        "devices/dev1/messages/events/",
        b"x",
        QoS::ExactlyOnce,
        1,
    ))
    .await?;
    c.expect_closed().await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn every_topic_the_official_sdks_use_is_accepted() -> TestResult {
    // Captured from the Python and Node SDKs (shared/vectors/sdk-topics.json), for dev1.
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    let topics = [
        "devices/dev1/messages/events/%24.mid=e21b3ce1-c8ae-4936-b220-74346be5e11a&%24.cid=corr-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&level=3",
        "devices/dev1/messages/events/%24.mid=mid-1&%24.cid=cid-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&%24.sub=comp1",
        "$iothub/twin/GET/?$rid=d154bfbf-11a8-4c7e-9910-57b64c54c01c",
        "$iothub/twin/PATCH/properties/reported/?$rid=39fee4c3-13fa-41b7-9e40-628c9d748e6c",
        "$iothub/methods/res/200/?$rid=1",
    ];
    for (i, t) in topics.iter().enumerate() {
        c.publish_qos1(i as u16 + 1, t, b"{}")
            .await
            .map_err(|e| format!("{t}: {e}"))?;
    }
    // QoS 0 publishes (the Node SDK's twin requests) get no PUBACK and keep the connection.
    c.send(&publish(
        "$iothub/twin/GET/?$rid=20fe6d6b",
        b" ",
        QoS::AtMostOnce,
        0,
    ))
    .await?;
    c.send(&Packet::PingReq).await?;
    // The QoS 0 GET is answered too (twin responses need no subscription), before PINGRESP.
    let mut answered = false;
    loop {
        match c.recv().await? {
            Some(Packet::PingResp) => break,
            Some(Packet::Publish(p)) if p.topic == "$iothub/twin/res/200/?$rid=20fe6d6b" => {
                answered = true
            }
            Some(Packet::Publish(p)) if p.topic.starts_with("$iothub/twin/res/") => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert!(answered, "the QoS 0 twin GET got its response");
    hub.stop().await;
    Ok(())
}

/// Microsoft's mosquitto_sub sample for IoT Hub subscribes to a bare `#` to receive C2D: it is
/// granted as the subscriber's own C2D, and only its own messages arrive through it. It does
/// not reach `$iothub` topics (MQTT 3.1.1, 4.7.2), so a method call finds no subscriber.
#[tokio::test]
async fn a_bare_hash_is_the_device_s_own_c2d_and_nothing_else() -> TestResult {
    let hub = TestHub::start().await?;
    let (key1, _) = hub.create_device("dev1").await?;
    let (key2, _) = hub.create_device("dev2").await?;
    let (mut c1, _) = hub.connect_device("dev1", &key1, true).await?;
    let (mut c2, _) = hub.connect_device("dev2", &key2, true).await?;
    assert_eq!(
        c1.subscribe(1, &[("#", QoS::AtLeastOnce)]).await?,
        vec![OK1]
    );
    assert_eq!(c2.subscribe(1, &[("#", QoS::AtMostOnce)]).await?, vec![OK0]);

    for (device, text) in [("dev2", "for dev2"), ("dev1", "for dev1")] {
        hub.api
            .post(
                &format!("/devices/{device}/messages/deviceBound"),
                &json!({"payload": text}),
            )
            .await?;
    }
    let got = recv_publish(&mut c1, Duration::from_secs(10))
        .await?
        .ok_or("dev1 got no C2D through #")?;
    assert!(
        got.topic.starts_with("devices/dev1/messages/devicebound/"),
        "{}",
        got.topic
    );
    assert_eq!(&got.payload[..], b"for dev1");
    assert_eq!(got.qos, QoS::AtLeastOnce, "C2D goes out at QoS 1");
    c1.send(&Packet::PubAck(got.packet_id)).await?;
    let got2 = recv_publish(&mut c2, Duration::from_secs(10))
        .await?
        .ok_or("dev2 got no C2D through #")?;
    assert_eq!(&got2.payload[..], b"for dev2");

    // dev2's message went to dev2 alone: dev1's next packet is the answer to its ping.
    c1.send(&Packet::PingReq).await?;
    assert_eq!(c1.recv().await?, Some(Packet::PingResp));
    let call = rest(
        &hub,
        reqwest::Method::POST,
        "/twins/dev1/methods",
        Some(&json!({"methodName": "m", "payload": {}, "connectTimeoutInSeconds": 0, "responseTimeoutInSeconds": 5})),
    )
    .await?;
    assert_eq!(
        call.status, 404,
        "# grants no method requests: {}",
        call.body
    );
    assert_eq!(call.header("iothub-errorcode"), Some("DeviceNotOnline"));
    hub.stop().await;
    Ok(())
}
