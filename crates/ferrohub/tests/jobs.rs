//! Scheduled jobs (`/jobs/v2`) end to end over real TLS and SQLite: twin-update and method
//! jobs over a query condition, start times, cancel, the maximum execution time, a restart
//! in the middle of a job, per-device rows through `devices.jobs`, and IoT Hub's error bodies.

mod common;

use std::time::Duration;

use common::*;
use ferrohub_mqtt::QoS;
use reqwest::Method;
use serde_json::{json, Value};

const METHODS: &str = "$iothub/methods/POST/#";
/// Long enough for a job over a handful of devices on a loaded machine.
const JOB_WAIT: Duration = Duration::from_secs(30);

fn iso_in(secs: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn tag(hub: &TestHub, id: &str, tags: Value) -> TestResult {
    let a = rest(
        hub,
        Method::PATCH,
        &format!("/twins/{id}"),
        Some(&json!({ "tags": tags })),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    Ok(())
}

async fn put_job(hub: &TestHub, id: &str, body: Value) -> R<Answer> {
    rest(hub, Method::PUT, &format!("/jobs/v2/{id}"), Some(&body)).await
}

async fn get_job(hub: &TestHub, id: &str) -> R<Value> {
    let a = rest(hub, Method::GET, &format!("/jobs/v2/{id}"), None).await?;
    assert_eq!(a.status, 200, "{}", a.body);
    Ok(a.body)
}

/// The job once its status is one of `statuses`. A job runs in the hub with no event a
/// client can wait on, so this asks as a client would.
async fn job_reaching(hub: &TestHub, id: &str, statuses: &[&str]) -> R<Value> {
    let deadline = tokio::time::Instant::now() + JOB_WAIT;
    loop {
        let job = get_job(hub, id).await?;
        if statuses.contains(&job["status"].as_str().unwrap_or("")) {
            return Ok(job);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("job {id} never reached {statuses:?}: {job}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn device_jobs(hub: &TestHub, job_id: &str) -> R<Vec<Value>> {
    let a = rest(
        hub,
        Method::POST,
        "/devices/query",
        Some(&json!({
            "query": format!("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{job_id}'")
        })),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-ms-item-type"), Some("deviceJob"));
    Ok(a.body.as_array().cloned().unwrap_or_default())
}

fn error_code_of(a: &Answer) -> String {
    a.body["Message"].as_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn a_twin_job_updates_the_matching_twins_and_records_each_device() -> TestResult {
    let hub = TestHub::start().await?;
    for (id, site) in [("d1", "a"), ("d2", "b"), ("d3", "a")] {
        hub.create_device(id).await?;
        tag(&hub, id, json!({ "site": site })).await?;
    }
    let a = put_job(
        &hub,
        "twin1",
        json!({
            "jobId": "twin1",
            "type": "scheduleUpdateTwin",
            "queryCondition": "tags.site = 'a'",
            "startTime": iso_in(0),
            "maxExecutionTimeInSeconds": 60,
            "updateTwin": {"etag": "*", "tags": {"fw": "2.0"}, "properties": {"desired": {"interval": 5}}}
        }),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["jobId"], "twin1");
    assert_eq!(a.body["type"], "scheduleUpdateTwin");
    assert!(a.body["createdTime"].is_string());

    let job = job_reaching(&hub, "twin1", &["completed"]).await?;
    assert_eq!(
        job["deviceJobStatistics"],
        json!({"deviceCount": 2, "failedCount": 0, "succeededCount": 2, "runningCount": 0, "pendingCount": 0})
    );
    assert!(job["endTime"].is_string());
    for (id, updated) in [("d1", true), ("d2", false), ("d3", true)] {
        let twin = rest(&hub, Method::GET, &format!("/twins/{id}"), None)
            .await?
            .body;
        assert_eq!(twin["tags"]["fw"] == "2.0", updated, "{id}: {twin}");
        assert_eq!(
            twin["properties"]["desired"]["interval"] == 5,
            updated,
            "{id}: {twin}"
        );
    }
    let rows = device_jobs(&hub, "twin1").await?;
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["deviceId"].as_str()).collect();
    assert_eq!(ids, ["d1", "d3"]);
    for r in &rows {
        assert_eq!(r["jobId"], "twin1");
        assert_eq!(r["jobType"], "scheduleUpdateTwin");
        assert_eq!(r["status"], "completed");
        for k in [
            "startTimeUtc",
            "endTimeUtc",
            "createdDateTimeUtc",
            "lastUpdatedDateTimeUtc",
        ] {
            assert!(r[k].is_string(), "{k} missing: {r}");
        }
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_method_job_calls_each_device_and_keeps_its_answer_or_its_error() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("on").await?;
    hub.create_device("off").await?;
    let (mut c, _) = hub.connect_device("on", &key, true).await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;
    let a = put_job(
        &hub,
        "m1",
        json!({
            "jobId": "m1",
            "type": "scheduleDeviceMethod",
            "queryCondition": "deviceId IN ['on', 'off']",
            "maxExecutionTimeInSeconds": 60,
            "cloudToDeviceMethod": {"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 10}
        }),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let p = recv_publish(&mut c, JOB_WAIT)
        .await?
        .ok_or("no method request")?;
    let rid = p
        .topic
        .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
        .ok_or("not the job's method")?
        .to_string();
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload)?,
        json!({"delay": 1})
    );
    c.publish_qos1(
        2,
        &format!("$iothub/methods/res/201/?$rid={rid}"),
        br#"{"ok": true}"#,
    )
    .await?;
    let job = job_reaching(&hub, "m1", &["completed"]).await?;
    assert_eq!(job["deviceJobStatistics"]["succeededCount"], 1);
    assert_eq!(job["deviceJobStatistics"]["failedCount"], 1);
    let rows = device_jobs(&hub, "m1").await?;
    let on = rows
        .iter()
        .find(|r| r["deviceId"] == "on")
        .ok_or("no row for on")?;
    assert_eq!(on["status"], "completed");
    assert_eq!(
        on["outcome"],
        json!({"deviceMethodResponse": {"status": 201, "payload": {"ok": true}}})
    );
    let off = rows
        .iter()
        .find(|r| r["deviceId"] == "off")
        .ok_or("no row for off")?;
    assert_eq!(off["status"], "failed");
    assert_eq!(off["error"]["code"], "DeviceNotOnline", "{off}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_job_starting_later_waits_scheduled_and_a_cancel_stops_it() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("d1").await?;
    let a = put_job(
        &hub,
        "later",
        json!({
            "type": "scheduleUpdateTwin",
            "queryCondition": "deviceId = 'd1'",
            "startTime": iso_in(3600),
            "maxExecutionTimeInSeconds": 60,
            "updateTwin": {"tags": {"x": 1}}
        }),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"], "scheduled");
    let listed = rest(
        &hub,
        Method::GET,
        "/jobs/v2/query?jobType=scheduleUpdateTwin&jobStatus=scheduled",
        None,
    )
    .await?;
    assert_eq!(listed.status, 200);
    assert_eq!(
        listed.body.as_array().map(Vec::len),
        Some(1),
        "{}",
        listed.body
    );

    let c = rest(&hub, Method::POST, "/jobs/v2/later/cancel", None).await?;
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.body["status"], "cancelled");
    assert_eq!(get_job(&hub, "later").await?["status"], "cancelled");
    assert!(device_jobs(&hub, "later").await?.is_empty());
    let twin = rest(&hub, Method::GET, "/twins/d1", None).await?.body;
    assert!(twin["tags"].get("x").is_none(), "{twin}");
    let none = rest(
        &hub,
        Method::GET,
        "/jobs/v2/query?jobStatus=scheduled",
        None,
    )
    .await?;
    assert_eq!(none.body, json!([]));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_maximum_execution_time_fails_what_it_did_not_finish() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("slow").await?;
    let (mut c, _) = hub.connect_device("slow", &key, true).await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;
    let a = put_job(
        &hub,
        "short",
        json!({
            "type": "scheduleDeviceMethod",
            "queryCondition": "deviceId = 'slow'",
            "maxExecutionTimeInSeconds": 1,
            "cloudToDeviceMethod": {"methodName": "wait", "responseTimeoutInSeconds": 60}
        }),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    // The device takes the request and never answers.
    recv_publish(&mut c, JOB_WAIT).await?.ok_or("no request")?;
    let job = job_reaching(&hub, "short", &["completed", "failed"]).await?;
    let rows = device_jobs(&hub, "short").await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "failed");
    let why = rows[0]["error"]["description"].as_str().unwrap_or("");
    assert!(why.contains("maximum execution time"), "{}", rows[0]);
    assert_eq!(job["deviceJobStatistics"]["failedCount"], 1, "{job}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_restart_resumes_jobs_and_never_acts_on_a_device_twice() -> TestResult {
    let mut hub = TestHub::start().await?;
    let (key, _) = hub.create_device("d1").await?;
    hub.create_device("d2").await?;
    let (mut c, _) = hub.connect_device("d1", &key, true).await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;
    // A method job caught in the middle of d1's call.
    let a = put_job(
        &hub,
        "mid",
        json!({
            "type": "scheduleDeviceMethod",
            "queryCondition": "deviceId = 'd1'",
            "maxExecutionTimeInSeconds": 600,
            "cloudToDeviceMethod": {"methodName": "slow", "responseTimeoutInSeconds": 300}
        }),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    // A twin job whose start comes after the restart.
    let a = put_job(
        &hub,
        "soon",
        json!({
            "type": "scheduleUpdateTwin",
            "queryCondition": "deviceId = 'd2'",
            "startTime": iso_in(2),
            "maxExecutionTimeInSeconds": 600,
            "updateTwin": {"tags": {"resumed": true}}
        }),
    )
    .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    recv_publish(&mut c, JOB_WAIT).await?.ok_or("no request")?;
    let rows = device_jobs(&hub, "mid").await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "running");
    drop(c);

    hub.restart().await?;
    let (key2, _) = keys_of(&rest(&hub, Method::GET, "/devices/d1", None).await?.body)?;
    let (mut c, _) = hub.connect_device("d1", &key2, true).await?;
    c.subscribe(1, &[(METHODS, QoS::AtMostOnce)]).await?;

    let mid = job_reaching(&hub, "mid", &["completed", "failed"]).await?;
    let rows = device_jobs(&hub, "mid").await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "failed", "{}", rows[0]);
    assert_eq!(mid["deviceJobStatistics"]["failedCount"], 1, "{mid}");
    assert!(
        recv_publish(&mut c, Duration::from_millis(500))
            .await?
            .is_none(),
        "the interrupted call was made again"
    );

    job_reaching(&hub, "soon", &["completed"]).await?;
    let twin = rest(&hub, Method::GET, "/twins/d2", None).await?.body;
    assert_eq!(twin["tags"]["resumed"], true, "{twin}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_job_requests_get_iot_hub_error_bodies() -> TestResult {
    let hub = TestHub::start().await?;
    let twin_job = json!({"type": "scheduleUpdateTwin", "queryCondition": "deviceId = 'x'",
                          "startTime": iso_in(3600), "updateTwin": {"tags": {"a": 1}}});
    assert_eq!(put_job(&hub, "j", twin_job.clone()).await?.status, 200);
    let dup = put_job(&hub, "j", twin_job).await?;
    assert_eq!(dup.status, 409, "{}", dup.body);
    assert!(dup.headers.contains_key("iothub-errorcode"));

    // An unknown type is IoT Hub's generic bad request; the rest name what is wrong.
    let a = put_job(&hub, "bad", json!({"type": "scheduleTwinUpdate"})).await?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.header("iothub-errorcode"), Some("GenericBadRequest"));
    let msg = error_code_of(&a);
    assert!(msg.starts_with("ErrorCode:GenericBadRequest;"), "{msg}");
    assert!(msg.contains("type"), "{msg}");
    for (body, what) in [
        (json!({"type": "scheduleUpdateTwin"}), "updateTwin"),
        (
            json!({"type": "scheduleDeviceMethod", "cloudToDeviceMethod": {}}),
            "methodName",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "queryCondition": "tags.x = ", "updateTwin": {"tags": {"a": 1}}}),
            "queryCondition",
        ),
        (
            json!({"type": "scheduleUpdateTwin", "startTime": "tomorrow", "updateTwin": {"tags": {"a": 1}}}),
            "startTime",
        ),
        (
            json!({"jobId": "other", "type": "scheduleUpdateTwin", "updateTwin": {"tags": {"a": 1}}}),
            "jobId",
        ),
    ] {
        let a = put_job(&hub, "bad", body).await?;
        assert_eq!(a.status, 400, "{what}: {}", a.body);
        let msg = error_code_of(&a);
        assert!(
            msg.starts_with("ErrorCode:ArgumentInvalid;"),
            "{what}: {msg}"
        );
        assert!(msg.contains(what), "{what}: {msg}");
    }
    for (method, path) in [
        (Method::GET, "/jobs/v2/nope"),
        (Method::POST, "/jobs/v2/nope/cancel"),
    ] {
        let missing = rest(&hub, method, path, None).await?;
        assert_eq!(missing.status, 404, "{path}: {}", missing.body);
        assert_eq!(
            missing.header("iothub-errorcode"),
            Some("JobNotFound"),
            "{path}"
        );
        let msg = error_code_of(&missing);
        assert!(msg.starts_with("ErrorCode:JobNotFound;"), "{path}: {msg}");
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_job_commands_schedule_show_list_and_cancel() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("c1").await?;
    let dir = hub.dir.path().to_path_buf();
    let cli = move |args: Vec<String>| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || ferrohub_cli(&dir, &args)).await? }
    };
    let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let out = cli(args(&[
        "job",
        "schedule-twin",
        "cli1",
        "--where",
        "deviceId = 'c1'",
        "--patch",
        r#"{"tags": {"from": "cli"}}"#,
        "-o",
        "json",
    ]))
    .await
    .map_err(|e| e.to_string())?;
    assert!(out.0, "{}", out.2);
    let job: Value = serde_json::from_str(&out.1)?;
    assert_eq!(job["jobId"], "cli1");
    job_reaching(&hub, "cli1", &["completed"]).await?;
    let twin = rest(&hub, Method::GET, "/twins/c1", None).await?.body;
    assert_eq!(twin["tags"]["from"], "cli", "{twin}");

    let out = cli(args(&[
        "job",
        "schedule-method",
        "cli2",
        "--where",
        "deviceId = 'c1'",
        "--method",
        "reboot",
        "--start",
        &iso_in(3600),
    ]))
    .await
    .map_err(|e| e.to_string())?;
    assert!(out.0, "{}", out.2);
    assert!(out.1.contains("cli2  scheduleDeviceMethod  scheduled"));

    let out = cli(args(&["job", "list", "--status", "completed"]))
        .await
        .map_err(|e| e.to_string())?;
    let text = out.1;
    assert!(
        text.contains("cli1  scheduleUpdateTwin  completed  devices=1 succeeded=1"),
        "{text}"
    );
    assert!(text.contains("(1 job)"), "{text}");

    let out = cli(args(&["job", "cancel", "cli2"]))
        .await
        .map_err(|e| e.to_string())?;
    assert!(out.1.contains("cancelled"));
    let out = cli(args(&["job", "show", "nope"]))
        .await
        .map_err(|e| e.to_string())?;
    assert!(!out.0);
    hub.stop().await;
    Ok(())
}
