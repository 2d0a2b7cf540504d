//! The `ferrohub` command line as a user runs it: the real binary against a real server,
//! finding the hub through the data directory.

mod common;

use std::process::Command;

use common::*;

fn ferrohub(data_dir: &std::path::Path, args: &[&str]) -> R<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrohub"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("FERROHUB_CONNECTION_STRING")
        .env_remove("FERROHUB_CA_FILE")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

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
