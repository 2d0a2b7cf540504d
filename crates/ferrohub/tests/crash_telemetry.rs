//! Crash safety of telemetry: while many devices publish, the server process is killed with
//! SIGKILL; after a restart every message that had been acknowledged is readable exactly once,
//! in order per device. (Unacknowledged ones may be missing or present, never duplicated.)
//! With routes, the same holds in every endpoint a route sent the message to: the PUBACK waits
//! for each copy.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::process::{free_port, spawn_server};
use common::*;
use ferrohub::cli::ApiClient;
use ferrohub_iothub::ConnectionString;
use ferrohub_mqtt::{Packet, QoS};
use serde_json::json;

/// Publishes `topic/n=1,2,...&parity=odd|even` pipelined (up to 32 in flight) until the
/// connection dies; returns the highest n acknowledged (PUBACKs come in order, so 1..=n were
/// all acknowledged).
async fn publish_until_dead(mut c: MqttClient, device: String) -> u32 {
    let mut next: u32 = 1;
    let mut acked: u32 = 0;
    loop {
        while next - acked <= 32 {
            let pid = (next % 65000 + 1) as u16;
            let parity = if next.is_multiple_of(2) {
                "even"
            } else {
                "odd"
            };
            let p = publish(
                &format!("devices/{device}/messages/events/n={next}&parity={parity}"),
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

fn api_of(server: &common::process::Server) -> R<ApiClient> {
    let ca = server.info.ca_file.clone().ok_or("ca")?;
    Ok(ApiClient::new(
        ConnectionString::parse(&server.info.owner_connection_string)?,
        Some(&ca),
    )?)
}

/// Starts a server on a fresh data directory, lets `setup` configure it, loads it from twelve
/// devices, SIGKILLs it mid-load and restarts it on the same directory. Returns the restarted
/// server (with the directory) and, per device, the highest message number acknowledged.
async fn load_and_kill(
    setup: impl std::ops::AsyncFnOnce(&ApiClient) -> TestResult,
) -> R<(
    common::process::Server,
    tempfile::TempDir,
    Vec<(String, u32)>,
)> {
    let dir = tempfile::tempdir()?;
    let (mqtt, https) = (free_port()?, free_port()?);
    let mut server = spawn_server(dir.path(), mqtt, https).await?;
    let ca = server.info.ca_file.clone().ok_or("ca")?;
    let api = api_of(&server)?;
    setup(&api).await?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{mqtt}").parse()?;

    let devices: Vec<String> = (0..12).map(|i| format!("crash-{i}")).collect();
    let mut tasks = Vec::new();
    for d in &devices {
        let v = api
            .put(&format!("/devices/{d}"), &json!({"deviceId": d}), None)
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
    for (d, t) in devices.into_iter().zip(tasks) {
        acked.push((d, t.await?));
    }
    let total_acked: u32 = acked.iter().map(|(_, n)| n).sum();
    assert!(
        total_acked > 100,
        "the load was real: {total_acked} acknowledged"
    );
    let server = spawn_server(dir.path(), mqtt, https).await?;
    Ok((server, dir, acked))
}

/// Every message of a stream (`/events` with `query`), as message numbers per device, in
/// stream order per device.
async fn read_stream(api: &ApiClient, query: &str) -> R<HashMap<String, Vec<u32>>> {
    let mut resp = api
        .stream(&format!("/events?consumerGroup=verify&from=start{query}"))
        .await?;
    let mut seen: HashMap<String, Vec<u32>> = HashMap::new();
    let mut pending = Vec::new();
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
        }
    }
    Ok(seen)
}

/// Checks that each device's messages in `seen` are exactly `expected(k)` for some k covering
/// every acknowledged number that `wanted` selects: in order, each once, none missing.
fn check_stream(
    what: &str,
    mut seen: HashMap<String, Vec<u32>>,
    acked: &[(String, u32)],
    wanted: impl Fn(u32) -> bool,
) -> TestResult {
    for (d, max_acked) in acked {
        let got = seen.remove(d).unwrap_or_default();
        let last = got.iter().copied().max().unwrap_or(0);
        let expected: Vec<u32> = (1..=last).filter(|n| wanted(*n)).collect();
        if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            let lo = i.saturating_sub(3);
            let around = &got[lo..(i + 5).min(got.len())];
            return Err(format!(
                "{what}, {d}: stored out of order or twice at index {i}: {around:?}"
            )
            .into());
        }
        assert_eq!(
            got, expected,
            "{what}, {d}: stored messages are the selected ones of 1..k, each once, in order"
        );
        let acked_wanted = (1..=*max_acked).filter(|n| wanted(*n)).count();
        assert!(
            got.len() >= acked_wanted,
            "{what}, {d}: {acked_wanted} selected messages acknowledged but only {} stored",
            got.len()
        );
    }
    assert!(
        seen.is_empty(),
        "{what}: messages of unknown devices: {seen:?}"
    );
    Ok(())
}

#[tokio::test]
async fn every_acknowledged_message_survives_sigkill_exactly_once_in_order() -> TestResult {
    let (server, _dir, acked) = load_and_kill(async |_: &ApiClient| Ok(())).await?;
    let api = api_of(&server)?;
    check_stream("events", read_stream(&api, "").await?, &acked, |_| true)?;
    drop(server);
    Ok(())
}

#[tokio::test]
async fn every_acknowledged_routed_message_survives_sigkill_in_each_of_its_endpoints() -> TestResult
{
    // `all` copies everything to `copy` and `events`; `even` sends the even-numbered messages
    // (an application-property condition) to `evens` as well.
    let (server, _dir, acked) = load_and_kill(async |api: &ApiClient| {
        for name in ["copy", "evens"] {
            api.put(
                &format!("/ferrohub/routing/endpoints/{name}"),
                &json!({"type": "stream", "partitions": 2}),
                None,
            )
            .await?;
        }
        api.put(
            "/ferrohub/routing/routes/all",
            &json!({"source": "DeviceMessages", "condition": "true", "endpointNames": ["events", "copy"]}),
            None,
        )
        .await?;
        api.put(
            "/ferrohub/routing/routes/even",
            &json!({"source": "DeviceMessages", "condition": "parity = 'even'", "endpointNames": ["evens"]}),
            None,
        )
        .await?;
        Ok(())
    })
    .await?;
    let api = api_of(&server)?;
    check_stream("events", read_stream(&api, "").await?, &acked, |_| true)?;
    check_stream(
        "copy",
        read_stream(&api, "&endpoint=copy").await?,
        &acked,
        |_| true,
    )?;
    check_stream(
        "evens",
        read_stream(&api, "&endpoint=evens").await?,
        &acked,
        |n| n.is_multiple_of(2),
    )?;
    drop(server);
    Ok(())
}
