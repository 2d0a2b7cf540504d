//! Crash safety of cloud-to-device queues and twins: while back ends send C2D messages (over
//! REST and over AMQP) and a device patches its reported properties, the server is killed
//! with SIGKILL. After a restart every send that was answered 200 or Accepted is delivered,
//! once, and every patch that was answered 204 is in the twin.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::amqp::{AmqpClient, Sasl};
use common::process::{free_port, spawn_server};
use common::*;
use ferrohub::cli::ApiClient;
use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::{Message, Performative, Value};
use ferrohub_iothub::ConnectionString;
use ferrohub_mqtt::{Packet, QoS};
use serde_json::json;

const DEVICES: usize = 6;

/// Sends to `device` numbered messages until the server dies; returns the numbers answered 200.
async fn send_until_dead(api: ApiClient, device: String) -> Vec<u32> {
    let mut acked = Vec::new();
    for n in 1..=50u32 {
        let r = api
            .post(
                &format!("/devices/{device}/messages/deviceBound"),
                &json!({"payload": n.to_string()}),
            )
            .await;
        match r {
            Ok(_) => acked.push(n),
            Err(_) => break,
        }
    }
    acked
}

/// Sends numbered C2D messages to `device` over one AMQP link, up to 8 unsettled at a time,
/// until the server dies; returns the numbers it answered Accepted.
async fn amqp_send_until_dead(mut c: AmqpClient, device: String) -> Vec<u32> {
    let mut accepted = Vec::new();
    if !matches!(
        c.attach_sender(1, &format!("amqps://{HOST}/messages/devicebound"))
            .await,
        Ok((_, Ok(_)))
    ) {
        return accepted;
    }
    let (mut next, mut open) = (1u32, 0u32);
    loop {
        while next <= 50 && open < 8 {
            let m = Message {
                properties: Some(Properties {
                    to: Some(format!("/devices/{device}/messages/devicebound")),
                    ..Default::default()
                }),
                body: Body::Data(vec![next.to_string().into_bytes()]),
                ..Default::default()
            };
            if c.send_message(1, next, &m, false).await.is_err() {
                return accepted;
            }
            next += 1;
            open += 1;
        }
        if open == 0 {
            return accepted;
        }
        match c.recv_perf_within(Duration::from_secs(5)).await {
            Ok(Some((Performative::Disposition(d), _))) => {
                open -= 1;
                if matches!(&d.state, Value::Described(code, _) if code.as_u64() == Some(0x24)) {
                    accepted.push(d.first);
                }
            }
            Ok(Some((Performative::Flow(_), _))) => {}
            _ => return accepted,
        }
    }
}

/// Pipelines reported patches `{"pN": N}` (rid N) until the connection dies; returns the rids
/// answered 204.
async fn patch_until_dead(mut c: MqttClient) -> Vec<u32> {
    let mut answered = Vec::new();
    let mut next = 1u32;
    loop {
        while next - answered.len() as u32 <= 8 {
            let p = publish(
                &format!("$iothub/twin/PATCH/properties/reported/?$rid={next}"),
                json!({format!("p{next}"): next}).to_string().as_bytes(),
                QoS::AtMostOnce,
                0,
            );
            if c.send(&p).await.is_err() {
                return answered;
            }
            next += 1;
        }
        match c.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::Publish(p))) if p.topic.starts_with("$iothub/twin/res/204/") => {
                let rid = p
                    .topic
                    .split("$rid=")
                    .nth(1)
                    .and_then(|r| r.split('&').next())
                    .and_then(|r| r.parse().ok());
                match rid {
                    Some(r) => answered.push(r),
                    None => return answered,
                }
            }
            Ok(Some(_)) => {}
            _ => return answered,
        }
    }
}

#[tokio::test]
async fn acknowledged_c2d_sends_and_twin_patches_survive_sigkill() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mqtt, https) = (free_port()?, free_port()?);
    let mut server = spawn_server(dir.path(), mqtt, https).await?;
    let ca = server.info.ca_file.clone().ok_or("ca")?;
    let api = ApiClient::new(
        ConnectionString::parse(&server.info.owner_connection_string)?,
        Some(&ca),
    )?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{mqtt}").parse()?;
    let mut keys = HashMap::new();
    for i in 0..DEVICES {
        let d = format!("c-{i}");
        let v = api
            .put(&format!("/devices/{d}"), &json!({"deviceId": d}), None)
            .await?;
        keys.insert(d, keys_of(&v)?.0);
    }
    let amqp_dev = "c-amqp".to_string();
    let v = api
        .put(
            &format!("/devices/{amqp_dev}"),
            &json!({"deviceId": amqp_dev}),
            None,
        )
        .await?;
    keys.insert(amqp_dev.clone(), keys_of(&v)?.0);
    let owner = ConnectionString::parse(&server.info.owner_connection_string)?;
    let mut amqp = AmqpClient::connect_over(
        AmqpClient::tls_to(format!("127.0.0.1:{}", server.info.amqp_port).parse()?, &ca).await?,
        Sasl::Anonymous,
        65_536,
    )
    .await?;
    let token = token_for(
        HOST,
        owner.shared_access_key.as_deref().ok_or("owner key")?,
        3600,
        owner.shared_access_key_name.as_deref(),
    );
    assert_eq!(amqp.put_token(&token, HOST).await?, 200);
    let twin_dev = "c-0".to_string();
    let mut c = MqttClient::open(addr, &ca, None).await?;
    let t = token_for(
        &format!("{HOST}/devices/{twin_dev}"),
        &keys[&twin_dev],
        3600,
        None,
    );
    c.connect(connect_packet(&twin_dev, Some(&t), true, 60))
        .await?;
    let patcher = tokio::spawn(patch_until_dead(c));
    let amqp_sender = tokio::spawn(amqp_send_until_dead(amqp, amqp_dev.clone()));
    let mut senders = Vec::new();
    for i in 0..DEVICES {
        senders.push(tokio::spawn(send_until_dead(api.clone(), format!("c-{i}"))));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.child.kill()?; // SIGKILL: no shutdown, no flush.
    server.child.wait()?;
    let patched = patcher.await?;
    let mut sent = HashMap::new();
    for (i, s) in senders.into_iter().enumerate() {
        sent.insert(format!("c-{i}"), s.await?);
    }
    let over_amqp = amqp_sender.await?;
    let total: usize = sent.values().map(Vec::len).sum();
    assert!(
        total > 0 && !patched.is_empty() && !over_amqp.is_empty(),
        "the load was real: {total} REST sends, {} AMQP sends, {} patches",
        over_amqp.len(),
        patched.len()
    );
    sent.insert(amqp_dev, over_amqp);

    let server = spawn_server(dir.path(), mqtt, https).await?;
    let api = ApiClient::new(
        ConnectionString::parse(&server.info.owner_connection_string)?,
        Some(&ca),
    )?;
    let twin = api.get(&format!("/twins/{twin_dev}")).await?;
    for rid in &patched {
        assert_eq!(
            twin["properties"]["reported"][format!("p{rid}")],
            *rid,
            "patch {rid} was answered 204 but is missing"
        );
    }
    for (device, acked) in &sent {
        let mut c = MqttClient::open(addr, &ca, None).await?;
        let t = token_for(
            &format!("{HOST}/devices/{device}"),
            &keys[device],
            3600,
            None,
        );
        c.connect(connect_packet(device, Some(&t), true, 60))
            .await?;
        c.subscribe(
            1,
            &[(
                &format!("devices/{device}/messages/devicebound/#"),
                QoS::AtLeastOnce,
            )],
        )
        .await?;
        let mut got = Vec::new();
        while let Some(p) = recv_publish(&mut c, Duration::from_secs(2)).await? {
            got.push(String::from_utf8(p.payload.to_vec())?.parse::<u32>()?);
            c.send(&Packet::PubAck(p.packet_id)).await?;
        }
        let unique: HashSet<u32> = got.iter().copied().collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "{device}: delivered twice: {got:?}"
        );
        for n in acked {
            assert!(
                unique.contains(n),
                "{device}: message {n} was answered 200 but is lost"
            );
        }
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, sorted, "{device}: delivered in send order");
    }
    drop(server);
    Ok(())
}
