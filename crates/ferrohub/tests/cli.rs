//! The `ferrohub` command line as a user runs it: the real binary against a real server,
//! finding the hub through the data directory.

mod common;

use common::ferrohub_cli as ferrohub;
use common::*;

#[tokio::test]
async fn device_commands_round_trip_and_tokens_work() -> TestResult {
    let hub = TestHub::start().await?;
    let dir = hub.dir.path().to_path_buf();
    let run = |args: Vec<&'static str>| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || ferrohub(&dir, &args)).await? }
    };

    let (ok, out, err) = run(vec!["device", "create", "cli-dev"]).await?;
    assert!(ok, "{err}");
    assert!(out.contains("created device cli-dev"), "{out}");

    let (ok, out, _) = run(vec!["device", "list", "-o", "json"]).await?;
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(list[0]["deviceId"], "cli-dev");

    let (ok, cs, _) = run(vec!["device", "connection-string", "cli-dev"]).await?;
    assert!(ok);
    let cs = ferrohub_iothub::ConnectionString::parse(cs.trim())?;
    assert_eq!(cs.device_id.as_deref(), Some("cli-dev"));
    assert_eq!(cs.host_name, HOST);

    // The generated token opens an MQTT connection, as in the README quickstart.
    let (ok, token, _) = run(vec![
        "sas-token",
        "--device",
        "cli-dev",
        "--duration",
        "600",
    ])
    .await?;
    assert!(ok);
    let mut c = hub.tls().await?;
    let (_, code) = c
        .connect(connect_packet("cli-dev", Some(token.trim()), true, 60))
        .await?;
    assert_eq!(code, ferrohub_mqtt::ConnectReturnCode::Accepted);

    let (ok, _, err) = run(vec!["device", "update", "cli-dev", "--status", "disabled"]).await?;
    assert!(ok, "{err}");
    let (_, out, _) = run(vec!["device", "show", "cli-dev", "-o", "json"]).await?;
    assert!(out.contains("\"disabled\""), "{out}");

    let (ok, _, err) = run(vec!["module", "create", "cli-dev", "m1"]).await?;
    assert!(ok, "{err}");
    let (ok, cs, _) = run(vec!["module", "connection-string", "cli-dev", "m1"]).await?;
    assert!(ok && cs.contains("ModuleId=m1"), "{cs}");

    let (ok, token, _) = run(vec!["sas-token"]).await?;
    assert!(ok && token.contains("skn=iothubowner"), "{token}");

    let (ok, _, _) = run(vec!["device", "delete", "cli-dev"]).await?;
    assert!(ok);
    let (ok, _, err) = run(vec!["device", "show", "cli-dev"]).await?;
    assert!(!ok);
    assert!(err.contains("404 DeviceNotFound"), "{err}");
    hub.stop().await;
    Ok(())
}

#[test]
fn cli_without_a_hub_says_what_is_missing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (ok, _, err) = ferrohub(dir.path(), &["device", "list"])?;
    assert!(!ok);
    assert!(
        err.contains("connection-string") || err.contains("FERROHUB_CONNECTION_STRING"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn c2d_twin_and_invoke_commands_work_as_a_user_runs_them() -> TestResult {
    let hub = TestHub::start().await?;
    let dir = hub.dir.path().to_path_buf();
    let run = |args: Vec<String>| {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ferrohub(&dir, &args)
            })
            .await?
        }
    };
    let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (key, _) = hub.create_device("dev1").await?;

    // C2D: send (with properties and feedback), receive on the device, read the feedback.
    let (ok, out, err) = run(a(&[
        "c2d",
        "send",
        "dev1",
        "--data",
        "hi there",
        "--props",
        "color=red",
        "--props",
        "flag",
        "--message-id",
        "cli-1",
        "--ack",
        "full",
    ]))
    .await?;
    assert!(ok, "{err}");
    assert!(out.starts_with("sent message cli-1 to dev1"), "{out}");
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(
        1,
        &[(
            "devices/dev1/messages/devicebound/#",
            ferrohub_mqtt::QoS::AtLeastOnce,
        )],
    )
    .await?;
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("C2D not delivered")?;
    assert_eq!(&p.payload[..], b"hi there");
    assert!(
        p.topic.ends_with("&iothub-ack=full&color=red&flag"),
        "{}",
        p.topic
    );
    c.send(&ferrohub_mqtt::Packet::PubAck(p.packet_id)).await?;
    let (ok, out, err) = run(a(&["c2d", "feedback", "--wait", "5"])).await?;
    assert!(ok, "{err}");
    assert!(out.contains("dev1  message cli-1  Success"), "{out}");

    let (ok, _, _) = run(a(&["c2d", "send", "dev1", "--data", "x"])).await?;
    assert!(ok);
    // Unsubscribe first so the message stays queued for the purge.
    drop(c);
    let (ok, out, _) = run(a(&["c2d", "send", "dev1", "--data", "y"])).await?;
    assert!(ok, "{out}");
    let (ok, out, err) = run(a(&["c2d", "purge", "dev1"])).await?;
    assert!(ok, "{err}");
    assert!(out.starts_with("purged "), "{out}");
    let (ok, _, err) = run(a(&["c2d", "send", "ghost", "--data", "x"])).await?;
    assert!(!ok);
    assert!(err.contains("404 DeviceNotFound"), "{err}");

    // Twins: update desired and tags, show, etag guard.
    let (ok, out, err) = run(a(&[
        "twin",
        "update",
        "dev1",
        "--desired",
        r#"{"fan": {"speed": 3}}"#,
        "--tags",
        r#"{"site": "lab"}"#,
    ]))
    .await?;
    assert!(ok, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(t["properties"]["desired"]["fan"]["speed"], 3);
    assert_eq!(t["tags"]["site"], "lab");
    let etag = t["etag"].as_str().ok_or("no etag")?.to_string();
    let (ok, out, _) = run(a(&["twin", "show", "dev1"])).await?;
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out)?["etag"],
        etag.as_str()
    );
    let (ok, _, err) = run(a(&[
        "twin",
        "update",
        "dev1",
        "--tags",
        r#"{"a":1}"#,
        "--etag",
        "stale",
    ]))
    .await?;
    assert!(!ok);
    assert!(err.contains("412 PreconditionFailed"), "{err}");
    let (ok, _, err) = run(a(&["twin", "update", "dev1", "--desired", "[1]"])).await?;
    assert!(!ok && err.contains("JSON object"), "{err}");

    // Methods: the device answers, the CLI prints it.
    let (mut c, _) = hub.connect_device("dev1", &key, true).await?;
    c.subscribe(
        2,
        &[("$iothub/methods/POST/#", ferrohub_mqtt::QoS::AtMostOnce)],
    )
    .await?;
    let call = run(a(&[
        "invoke",
        "dev1",
        "reboot",
        "--payload",
        r#"{"delay": 1}"#,
        "--timeout",
        "10",
    ]));
    let call = tokio::spawn(call);
    let p = recv_publish(&mut c, WAIT)
        .await?
        .ok_or("no method request")?;
    assert!(
        p.topic.starts_with("$iothub/methods/POST/reboot/?$rid="),
        "{}",
        p.topic
    );
    let rid = p
        .topic
        .rsplit_once("$rid=")
        .map(|(_, r)| r.to_string())
        .ok_or("rid")?;
    c.publish_qos1(
        3,
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        br#"{"rebooting":true}"#,
    )
    .await?;
    let (ok, out, err) = call.await??;
    assert!(ok, "{err}");
    assert!(
        out.contains("status: 200") && out.contains("\"rebooting\": true"),
        "{out}"
    );
    drop(c);
    let (ok, _, err) = run(a(&["invoke", "dev1", "reboot"])).await?;
    assert!(!ok && err.contains("404 DeviceNotOnline"), "{err}");
    hub.stop().await;
    Ok(())
}

/// The Event Hubs-compatible connection string as `az iot hub connection-string show
/// --default-eventhub` gives it: from the running hub's data directory, and built from a
/// service connection string for a hub elsewhere.
#[tokio::test]
async fn eventhub_connection_string_comes_from_the_hub_or_a_service_connection_string() -> TestResult
{
    let hub = TestHub::start().await?;
    let dir = hub.dir.path().to_path_buf();
    let (ok, out, err) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || ferrohub(&dir, &["eventhub-connection-string"])
    })
    .await??;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), hub.server().info.eventhub_connection_string);
    assert!(out.starts_with("Endpoint=sb://localhost:"), "{out}");
    assert!(out.contains(";SharedAccessKeyName=service;"), "{out}");

    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        ferrohub(
            &dir,
            &[
                "eventhub-connection-string",
                "--connection-string",
                "HostName=myhub.example.com;SharedAccessKeyName=service;SharedAccessKey=a2V5",
            ],
        )
    })
    .await??;
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "Endpoint=sb://myhub.example.com/;SharedAccessKeyName=service;SharedAccessKey=a2V5;EntityPath=myhub"
    );
    hub.stop().await;
    Ok(())
}
