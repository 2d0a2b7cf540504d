//! Crash safety of telemetry: while many devices publish, the server process is killed with
//! SIGKILL; after a restart every message that had been acknowledged is readable exactly once,
//! in order per device. (Unacknowledged ones may be missing or present, never duplicated.)

mod common;

use std::time::Duration;

use common::process::{free_port, spawn_server};
use common::*;
use ferrohub_iothub::ConnectionString;
use ferrohub_mqtt::{Packet, QoS};

/// Publishes `topic/n=1,2,...` pipelined (up to 32 in flight) until the connection dies;
/// returns the highest n acknowledged (PUBACKs come in order, so 1..=n were all acknowledged).
async fn publish_until_dead(mut c: MqttClient, device: String) -> u32 {
    let mut next: u32 = 1;
    let mut acked: u32 = 0;
    loop {
        while next - acked <= 32 {
            let pid = (next % 65000 + 1) as u16;
            let p = publish(
                &format!("devices/{device}/messages/events/n={next}"),
                b"payload",
                QoS::AtLeastOnce,
                pid,
            );
            if c.send(&p).await.is_err() {
                return acked;
            }
            next += 1;
        }
        match c.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            _ => return acked,
        }
    }
}

#[tokio::test]
async fn every_acknowledged_message_survives_sigkill_exactly_once_in_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mqtt, https) = (free_port()?, free_port()?);
    let mut server = spawn_server(dir.path(), mqtt, https).await?;
    let ca = server.info.ca_file.clone().ok_or("ca")?;
    let api = ferrohub::cli::ApiClient::new(
        ConnectionString::parse(&server.info.owner_connection_string)?,
        Some(&ca),
    )?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{mqtt}").parse()?;

    let devices: Vec<String> = (0..12).map(|i| format!("crash-{i}")).collect();
    let mut tasks = Vec::new();
    for d in &devices {
        let v = api
            .put(
                &format!("/devices/{d}"),
                &serde_json::json!({"deviceId": d}),
                None,
            )
            .await?;
        let (key, _) = keys_of(&v)?;
        let mut c = MqttClient::open(addr, &ca, None).await?;
        let t = token_for(&format!("{HOST}/devices/{d}"), &key, 3600, None);
        let (_, code) = c.connect(connect_packet(d, Some(&t), true, 60)).await?;
        assert_eq!(code, ferrohub_mqtt::ConnectReturnCode::Accepted);
        tasks.push(tokio::spawn(publish_until_dead(c, d.clone())));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.child.kill()?; // SIGKILL: no shutdown, no flush.
    server.child.wait()?;
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await?);
    }
    let total_acked: u32 = acked.iter().sum();
    assert!(
        total_acked > 100,
        "the load was real: {total_acked} acknowledged"
    );

    let server = spawn_server(dir.path(), mqtt, https).await?;
    let hub_api = ferrohub::cli::ApiClient::new(
        ConnectionString::parse(&server.info.owner_connection_string)?,
        Some(&ca),
    )?;
    let mut resp = hub_api
        .stream("/events?consumerGroup=verify&from=start")
        .await?;
    let mut seen: std::collections::HashMap<String, Vec<u32>> = Default::default();
    let mut pending = Vec::new();
    let mut count = 0usize;
    loop {
        let chunk = match tokio::time::timeout(Duration::from_secs(2), resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            _ => break,
        };
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let v: serde_json::Value = serde_json::from_slice(&line)?;
            let d = v["deviceId"].as_str().unwrap_or("").to_string();
            let n: u32 = v["properties"]["n"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or("no n")?;
            seen.entry(d).or_default().push(n);
            count += 1;
        }
    }
    for (d, max_acked) in devices.iter().zip(&acked) {
        let got = seen.remove(d).unwrap_or_default();
        let expected: Vec<u32> = (1..=got.len() as u32).collect();
        if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            let lo = i.saturating_sub(3);
            let around = &got[lo..(i + 5).min(got.len())];
            return Err(
                format!("{d}: stored out of order or twice at index {i}: {around:?}").into(),
            );
        }
        assert_eq!(
            got, expected,
            "{d}: stored messages are 1..k, each once, in order"
        );
        assert!(
            got.len() as u32 >= *max_acked,
            "{d}: {max_acked} acknowledged but only {} stored",
            got.len()
        );
    }
    assert!(count as u32 >= total_acked);
    drop(server);
    Ok(())
}
