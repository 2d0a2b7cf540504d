//! MQTT 3.1.1 behaviour of the broker over real TLS, independent of IoT Hub rules: malformed
//! and oversize input, packet order, QoS 1 delivery with in-flight limits and DUP redelivery.

mod common;

use std::time::Duration;

use common::*;
use ferrohub_iothub::Identity;
use ferrohub_mqtt::{Packet, QoS};

async fn still_serving(hub: &TestHub, key: &str) -> TestResult {
    let (mut c, _) = hub.connect_device("dev1", key, true).await?;
    c.send(&Packet::PingReq).await?;
    assert_eq!(c.recv().await?, Some(Packet::PingResp));
    Ok(())
}

#[tokio::test]
async fn garbage_truncated_and_oversize_packets_close_only_their_connection() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;

    // Not MQTT at all.
    let mut c = hub.tls().await?;
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert_eq!(c.recv().await?, None);

    // A CONNECT whose length runs past its fields.
    let mut c = hub.tls().await?;
    c.send_raw(&[
        0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x09,
    ])
    .await?;
    c.send_raw(&[0x00, 0x01]).await?;
    assert_eq!(c.recv().await?, None);

    // A remaining length of five bytes.
    let mut c = hub.tls().await?;
    c.send_raw(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).await?;
    assert_eq!(c.recv().await?, None);

    // Oversize, announced in the fixed header: refused before the body is sent.
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    let len: u32 = 1 << 20;
    let mut header = vec![0x32];
    let mut x = len;
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        header.push(b);
        if x == 0 {
            break;
        }
    }
    c.send_raw(&header).await?;
    assert_eq!(c.recv().await?, None, "closed on the header alone");

    // A packet truncated mid-body, then silence: the connection times out or closes without
    // harming others; a client that disconnects mid-packet is fine too.
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.send_raw(&[0x32, 0x20, 0x00, 0x05, b'd', b'e']).await?;
    drop(c);

    // Invalid flags on SUBSCRIBE.
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.send_raw(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01])
        .await?;
    assert_eq!(c.recv().await?, None);

    // A second CONNECT on a connection.
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.send(&connect_packet(
        "dev1",
        Some(&hub.device_token("dev1", &key)),
        true,
        60,
    ))
    .await?;
    c.expect_closed().await?;

    // First packet not CONNECT.
    let mut c = hub.tls().await?;
    c.send(&Packet::PingReq).await?;
    assert_eq!(c.recv().await?, None);

    still_serving(&hub, &key).await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn just_under_the_size_limit_is_accepted() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.publish_qos1(1, "devices/dev1/messages/events/", &vec![b'a'; 256 * 1024])
        .await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn pings_keep_working_and_disconnect_is_clean() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    for _ in 0..3 {
        c.send(&Packet::PingReq).await?;
        assert_eq!(c.recv().await?, Some(Packet::PingResp));
    }
    c.send(&Packet::Disconnect).await?;
    assert_eq!(c.recv().await?, None);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn qos1_delivery_respects_the_inflight_limit_and_redelivers_with_dup() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut c, _) = hub.connect_device("dev1", &key, false).await?;
    let out = hub
        .server()
        .hub
        .outbound(&Identity::device("dev1"))
        .ok_or("not registered")?;
    // Push more than the in-flight limit (16) without acknowledging anything.
    let push = tokio::spawn(async move {
        for i in 0..20u8 {
            let msg = ferrohub_hub::link::OutboundMessage::new(
                "devices/dev1/messages/devicebound/".into(),
                bytes::Bytes::from(vec![i]),
                QoS::AtLeastOnce,
            );
            if out.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = c.recv_within(Duration::from_millis(700)).await {
        assert!(!p.dup);
        got.push(p);
    }
    assert_eq!(got.len(), 16, "no more than 16 unacknowledged at once");
    // Acknowledge one: exactly one more arrives.
    c.send(&Packet::PubAck(got[0].packet_id)).await?;
    match c.recv().await? {
        Some(Packet::Publish(p)) => assert_eq!(p.payload.as_ref(), &[16]),
        other => return Err(format!("expected the 17th message, got {other:?}").into()),
    }
    // Drop the connection with 16 unacknowledged; a persistent reconnect gets them with DUP=1,
    // in order, and then the rest.
    drop(c);
    let _ = push.await;
    let (mut c, present) = hub.connect_device("dev1", &key, false).await?;
    assert!(present);
    let mut redelivered = Vec::new();
    for _ in 0..16 {
        match c.recv().await? {
            Some(Packet::Publish(p)) => redelivered.push(p),
            other => return Err(format!("expected a redelivery, got {other:?}").into()),
        }
    }
    assert!(redelivered.iter().all(|p| p.dup));
    let payloads: Vec<u8> = redelivered.iter().map(|p| p.payload[0]).collect();
    assert_eq!(payloads, (1..=16).collect::<Vec<u8>>());
    hub.stop().await;
    Ok(())
}
