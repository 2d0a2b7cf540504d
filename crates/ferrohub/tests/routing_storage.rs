//! Storage routing endpoints end to end: devices publish over real TLS, the hub writes batches
//! as files under `<data-dir>/storage/<container>/` in IoT Hub's names, read back here with the
//! Avro reader (the interop suite reads them with Python's fastavro too). A batch is cut by its
//! window or its size, a restart inside the window loses and duplicates nothing, and a write
//! that fails is retried until it succeeds.
//!
//! Waits are for a state (files on disk, a health status) with a deadline, never sleeps
//! standing in for one.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use apache_avro::types::Value as AvroValue;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn storage_endpoint(hub: &TestHub, name: &str, options: Value) -> TestResult {
    let mut body = json!({"type": "storage", "containerName": "archive"});
    if let (Some(b), Some(o)) = (body.as_object_mut(), options.as_object()) {
        b.extend(o.clone());
    }
    put_ok(hub, &format!("/ferrohub/routing/endpoints/{name}"), body).await?;
    put_ok(
        hub,
        "/ferrohub/routing/routes/all",
        json!({"source": "DeviceMessages", "condition": "true", "endpointNames": [name]}),
    )
    .await
}

async fn send(c: &mut MqttClient, device: &str, pid: u16, mid: &str, pad: usize) -> TestResult {
    c.publish_qos1(
        pid,
        &format!(
            "devices/{device}/messages/events/%24.mid={mid}&%24.ct=application%2Fjson&%24.ce=utf-8&level=high"
        ),
        format!("{{\"n\":\"{mid}\",\"pad\":\"{}\"}}", "x".repeat(pad)).as_bytes(),
    )
    .await
}

/// Every finished file under `dir` (not the `.tmp` of a write in progress), by name.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if !p.to_string_lossy().ends_with(".tmp") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A message as a storage file holds it.
#[derive(Debug)]
struct Stored {
    message_id: String,
    device: String,
    level: String,
    body: Vec<u8>,
    enqueued: String,
}

fn string_of(v: Option<&AvroValue>) -> String {
    match v {
        Some(AvroValue::Union(_, b)) => string_of(Some(b)),
        Some(AvroValue::String(s)) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn read_avro(path: &Path) -> R<Vec<Stored>> {
    let bytes = std::fs::read(path)?;
    let mut out = Vec::new();
    for v in apache_avro::Reader::new(&bytes[..])? {
        let AvroValue::Record(fields) = v? else {
            return Err("not a record".into());
        };
        let field = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let (Some(AvroValue::Map(sp)), Some(AvroValue::Map(p))) =
            (field("SystemProperties"), field("Properties"))
        else {
            return Err("no property maps".into());
        };
        let body = match field("Body") {
            Some(AvroValue::Union(_, b)) => match *b {
                AvroValue::Bytes(b) => b,
                other => return Err(format!("body {other:?}").into()),
            },
            other => return Err(format!("body {other:?}").into()),
        };
        out.push(Stored {
            message_id: string_of(sp.get("messageId")),
            device: string_of(sp.get("connectionDeviceId")),
            level: string_of(p.get("level")),
            body,
            enqueued: string_of(field("EnqueuedTimeUtc").as_ref()),
        });
    }
    Ok(out)
}

/// Waits until the files under `dir` hold `want` messages in all, read with `read`.
async fn wait_messages<T>(
    dir: &Path,
    want: usize,
    read: impl Fn(&Path) -> R<Vec<T>>,
) -> R<(Vec<PathBuf>, Vec<T>)> {
    {
        let deadline = Instant::now() + WAIT;
        loop {
            let fs = files(dir);
            let mut all = Vec::new();
            for f in &fs {
                all.extend(read(f)?);
            }
            if all.len() >= want {
                return Ok((fs, all));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} messages in {} files under {}, wanted {want}",
                    all.len(),
                    fs.len(),
                    dir.display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn container(hub: &TestHub) -> PathBuf {
    hub.dir.path().join("storage").join("archive")
}

#[tokio::test]
async fn a_window_of_messages_becomes_one_avro_file_in_iot_hubs_names() -> TestResult {
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    let (k2, _) = hub.create_device("dev2").await?;
    storage_endpoint(&hub, "archive", json!({"batchFrequencyInSeconds": 2})).await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    let (mut c2, _) = hub.connect_device("dev2", &k2, true).await?;
    let first_sent = Instant::now();
    for i in 0..3u16 {
        send(&mut c1, "dev1", i + 1, &format!("a{i}"), 10).await?;
        send(&mut c2, "dev2", i + 1, &format!("b{i}"), 10).await?;
    }
    let (fs, stored) = wait_messages(&container(&hub), 6, read_avro).await?;
    let waited = first_sent.elapsed();
    // The window runs from the first message's enqueued time: nothing is written before it.
    assert!(
        waited >= Duration::from_millis(1900),
        "written after {waited:?}, before its 2 s window"
    );
    assert_eq!(fs.len(), 1, "one window, one file: {fs:?}");
    let rel = fs[0].strip_prefix(container(&hub))?;
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        parts.len(),
        7,
        "{{iothub}}/{{partition}}/YYYY/MM/DD/HH/mm: {rel:?}"
    );
    assert_eq!(parts[0], "localhost");
    assert_eq!(parts[1], "0");
    assert_eq!(parts[2].len(), 4);
    let of = |d: &str| -> Vec<String> {
        stored
            .iter()
            .filter(|s| s.device == d)
            .map(|s| s.message_id.clone())
            .collect()
    };
    assert_eq!(of("dev1"), ["a0", "a1", "a2"]);
    assert_eq!(of("dev2"), ["b0", "b1", "b2"]);
    assert!(stored.iter().all(|s| s.level == "high"));
    let body: Value = serde_json::from_slice(&stored[0].body)?;
    assert!(body["n"].is_string());
    assert!(
        stored[0].enqueued.ends_with('Z') && stored[0].enqueued.contains('T'),
        "{}",
        stored[0].enqueued
    );
    // The fallback is off for routed messages: the built-in stream did not get them.
    let health = rest(
        &hub,
        Method::GET,
        "/ferrohub/routing/endpoints/archive/health",
        None,
    )
    .await?;
    assert_eq!(health.body["status"], "healthy");
    assert_eq!(health.body["delivered"], 6);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_full_chunk_is_written_before_its_window_and_json_lines_work() -> TestResult {
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    // A window far longer than the test: only size can cut these batches.
    storage_endpoint(
        &hub,
        "archive",
        json!({"encoding": "json", "batchFrequencyInSeconds": 720, "maxChunkSizeInBytes": 4096}),
    )
    .await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    // About 2.9 KB each with properties: one fits in a 4 KiB chunk, two do not, so each
    // message is a full chunk as soon as the next one is there.
    for i in 0..10u16 {
        send(&mut c1, "dev1", i + 1, &format!("m{i}"), 2500).await?;
    }
    let read_json = |p: &Path| -> R<Vec<Value>> {
        Ok(std::fs::read_to_string(p)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    };
    // The last one is not a full chunk, so it waits for the window: nine are written.
    let (fs, lines) = wait_messages(&container(&hub), 9, read_json).await?;
    assert_eq!(lines.len(), 9, "the last waits for its window");
    assert_eq!(fs.len(), 9, "nine full chunks: {fs:?}");
    for f in &fs {
        assert!(std::fs::metadata(f)?.len() > 0);
    }
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["SystemProperties"]["messageId"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"]);
    assert_eq!(lines[0]["Body"]["n"], "m0", "a JSON body stays JSON");
    assert_eq!(lines[0]["Properties"]["level"], "high");
    assert_eq!(lines[0]["SystemProperties"]["connectionDeviceId"], "dev1");
    // Names taken within one minute get a suffix rather than overwriting.
    let names: std::collections::BTreeSet<_> = fs.iter().collect();
    assert_eq!(names.len(), 9);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_restart_inside_the_window_writes_every_message_once() -> TestResult {
    let mut hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    // Deflate blocks here; the other Avro tests read IoT Hub's default, uncompressed ones.
    storage_endpoint(
        &hub,
        "archive",
        json!({"batchFrequencyInSeconds": 3, "encoding": "AvroDeflate"}),
    )
    .await?;
    {
        let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
        for i in 0..5u16 {
            send(&mut c1, "dev1", i + 1, &format!("m{i}"), 10).await?;
        }
    }
    // Stopped well inside the window: nothing written yet, everything PUBACKed.
    hub.restart().await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    for i in 5..7u16 {
        send(&mut c1, "dev1", i + 1, &format!("m{i}"), 10).await?;
    }
    let (_, stored) = wait_messages(&container(&hub), 7, read_avro).await?;
    let ids: Vec<&str> = stored.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4", "m5", "m6"]);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_failing_write_is_retried_until_the_directory_can_be_made() -> TestResult {
    let hub = TestHub::start().await?;
    let (k1, _) = hub.create_device("dev1").await?;
    // A file where the container's directory belongs: every write fails until it is gone.
    let dir = container(&hub);
    std::fs::create_dir_all(dir.parent().ok_or("no parent")?)?;
    std::fs::write(&dir, b"in the way")?;
    storage_endpoint(&hub, "archive", json!({"batchFrequencyInSeconds": 1})).await?;
    let (mut c1, _) = hub.connect_device("dev1", &k1, true).await?;
    for i in 0..3u16 {
        send(&mut c1, "dev1", i + 1, &format!("m{i}"), 10).await?;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let h = rest(
            &hub,
            Method::GET,
            "/ferrohub/routing/endpoints/archive/health",
            None,
        )
        .await?;
        if h.body["status"] == "unhealthy" {
            assert!(h.body["lastError"].as_str().is_some_and(|e| !e.is_empty()));
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("never unhealthy: {}", h.body).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(&dir)?;
    let (_, stored) = wait_messages(&dir, 3, read_avro).await?;
    let ids: Vec<&str> = stored.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(ids, ["m0", "m1", "m2"]);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_storage_endpoints_are_refused() -> TestResult {
    let hub = TestHub::start().await?;
    for (body, why) in [
        (
            json!({"type": "storage", "containerName": "../etc"}),
            "containerName",
        ),
        (
            json!({"type": "storage", "containerName": "ok-name", "fileNameFormat": "{iothub}/{YYYY}"}),
            "must contain",
        ),
        (
            json!({"type": "storage", "containerName": "ok-name", "batchFrequencyInSeconds": 0}),
            "batchFrequencyInSeconds",
        ),
        (
            json!({"type": "storage", "containerName": "ok-name", "maxChunkSizeInBytes": 10}),
            "maxChunkSizeInBytes",
        ),
        (
            json!({"type": "storage", "containerName": "ok-name", "retentionSeconds": 60, "batchFrequencyInSeconds": 300}),
            "longer than batchFrequencyInSeconds",
        ),
        (
            json!({"type": "storage", "containerName": "ok-name", "encoding": "xml"}),
            "",
        ),
    ] {
        let a = put(&hub, "/ferrohub/routing/endpoints/bad", body.clone()).await?;
        assert_eq!(a.status, 400, "{body}: {} {}", a.status, a.body);
        assert!(a.body.to_string().contains(why), "{body}: {}", a.body);
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_cli_adds_and_lists_a_storage_endpoint() -> TestResult {
    let hub = TestHub::start().await?;
    let dir = hub.dir.path().to_path_buf();
    let run = move |args: &'static [&'static str]| {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || ferrohub_cli(&dir, args))
    };
    let (ok, _, err) = run(&[
        "endpoint",
        "add",
        "cold",
        "--type",
        "storage",
        "--container",
        "cold-archive",
        "--encoding",
        "json",
        "--batch-frequency",
        "1m",
    ])
    .await??;
    assert!(ok, "{err}");
    let (ok, text, err) = run(&["endpoint", "list"]).await??;
    assert!(ok, "{err}");
    assert!(
        text.contains("cold") && text.contains("storage cold-archive Json every 1m"),
        "{text}"
    );
    let routing = rest(&hub, Method::GET, "/ferrohub/routing", None).await?;
    let ep = &routing.body["endpoints"][0];
    assert_eq!(ep["type"], "storage");
    assert_eq!(ep["encoding"], "json");
    assert_eq!(ep["batchFrequencyInSeconds"], 60);
    assert_eq!(
        ep["fileNameFormat"],
        "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}"
    );
    hub.stop().await;
    Ok(())
}
