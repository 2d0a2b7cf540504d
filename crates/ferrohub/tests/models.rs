//! The IoT Plug and Play model repository over real HTTPS and through the CLI: adding DTDL
//! documents (checked, immutable per DTMI, all or nothing), reading them alone and expanded,
//! listing, removing, surviving a restart, and a read-only Device Models Repository mirror.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const THERMOSTAT: &str = include_str!("../../ferrohub-dtdl/tests/models/thermostat-1.json");
const CONTROLLER: &str =
    include_str!("../../ferrohub-dtdl/tests/models/temperaturecontroller-2.json");
const DEVICE_INFO: &str = include_str!("../../ferrohub-dtdl/tests/models/deviceinformation-1.json");

/// The CLI on a blocking thread, so the hub in this test's runtime keeps serving it.
async fn cli(data: &std::path::Path, args: &[&str]) -> R<(bool, String, String)> {
    let data = data.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || ferrohub_cli(&data, &args)).await?
}

fn doc(text: &str) -> R<Value> {
    Ok(serde_json::from_str(text)?)
}

#[tokio::test]
async fn models_are_added_checked_read_expanded_and_removed() -> TestResult {
    let mut hub = TestHub::start().await?;
    let empty = rest(&hub, Method::GET, "/models", None).await?;
    assert_eq!((empty.status, empty.body), (200, json!([])));

    // The controller alone: stored, and its three dependencies named as missing.
    let a = rest(&hub, Method::POST, "/models", Some(&doc(CONTROLLER)?)).await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body,
        json!({
            "ids": ["dtmi:com:example:TemperatureController;2"],
            "new": ["dtmi:com:example:TemperatureController;2"],
            "missing": ["dtmi:azure:DeviceManagement:DeviceInformation;1", "dtmi:com:example:Thermostat;1"],
        })
    );
    let e = rest(
        &hub,
        Method::GET,
        "/models/dtmi:com:example:TemperatureController;2?expanded=true",
        None,
    )
    .await?;
    assert_eq!(e.status, 404, "incomplete: {}", e.body);
    assert!(e.body["Message"]
        .as_str()
        .unwrap_or_default()
        .contains("needs dtmi:azure:DeviceManagement:DeviceInformation;1"));

    // The other two as one expanded-style array; the same document again is fine.
    let both = json!([doc(THERMOSTAT)?, doc(DEVICE_INFO)?]);
    let b = rest(&hub, Method::POST, "/models", Some(&both)).await?;
    assert_eq!(
        (b.status, &b.body["missing"]),
        (200, &json!([])),
        "{}",
        b.body
    );
    let again = rest(&hub, Method::POST, "/models", Some(&both)).await?;
    assert_eq!(
        (again.status, &again.body["new"]),
        (200, &json!([])),
        "{}",
        again.body
    );

    let list = rest(&hub, Method::GET, "/models", None).await?;
    let ids: Vec<&str> = list
        .body
        .as_array()
        .ok_or("array")?
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "dtmi:azure:DeviceManagement:DeviceInformation;1",
            "dtmi:com:example:TemperatureController;2",
            "dtmi:com:example:Thermostat;1"
        ]
    );
    assert_eq!(list.body[2]["displayName"], "Thermostat");
    assert!(list.body[0]["createdDateTimeUtc"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    // Read back as stored, by the raw and by the percent-encoded id.
    for path in [
        "/models/dtmi:com:example:Thermostat;1",
        "/models/dtmi%3Acom%3Aexample%3AThermostat%3B1",
    ] {
        let t = rest(&hub, Method::GET, path, None).await?;
        assert_eq!((t.status, &t.body), (200, &doc(THERMOSTAT)?), "{path}");
    }
    let x = rest(
        &hub,
        Method::GET,
        "/models/dtmi:com:example:TemperatureController;2?expanded=true",
        None,
    )
    .await?;
    assert_eq!(x.status, 200, "{}", x.body);
    let expanded_ids: Vec<&str> = x
        .body
        .as_array()
        .ok_or("array")?
        .iter()
        .filter_map(|m| m["@id"].as_str())
        .collect();
    assert_eq!(
        expanded_ids,
        [
            "dtmi:com:example:TemperatureController;2",
            "dtmi:azure:DeviceManagement:DeviceInformation;1",
            "dtmi:com:example:Thermostat;1"
        ]
    );

    // A changed document under a stored id is refused, and nothing of it is stored.
    let mut changed = doc(THERMOSTAT)?;
    changed["displayName"] = json!("Changed");
    let mixed = json!([
        {"@context": "dtmi:dtdl:context;2", "@id": "dtmi:com:example:New;1", "@type": "Interface"},
        changed
    ]);
    let c = rest(&hub, Method::POST, "/models", Some(&mixed)).await?;
    assert_eq!(c.status, 409, "{}", c.body);
    assert_eq!(c.header("iothub-errorcode"), Some("InvalidOperation"));
    assert!(c.body["Message"]
        .as_str()
        .unwrap_or_default()
        .contains("immutable version"));
    let n = rest(&hub, Method::GET, "/models/dtmi:com:example:New;1", None).await?;
    assert_eq!(n.status, 404, "all or nothing: {}", n.body);

    // Invalid DTDL names the JSON path; a bad id is refused.
    let bad = json!({"@context": "dtmi:dtdl:context;2", "@id": "dtmi:com:example:Bad;1", "@type": "Interface",
        "contents": [{"@type": "Telemetry", "name": "t", "shema": "double"}]});
    let r = rest(&hub, Method::POST, "/models", Some(&bad)).await?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.header("iothub-errorcode"), Some("ArgumentInvalid"));
    let msg = r.body["Message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("$.contents[0].shema") && msg.contains("not a property of a Telemetry"),
        "{msg}"
    );
    let r = rest(&hub, Method::GET, "/models/not-a-dtmi", None).await?;
    assert_eq!(r.status, 400, "{}", r.body);

    // Durable across a restart; removal is by id.
    hub.restart().await?;
    let t = rest(
        &hub,
        Method::GET,
        "/models/dtmi:com:example:Thermostat;1",
        None,
    )
    .await?;
    assert_eq!(t.status, 200);
    let d = rest(
        &hub,
        Method::DELETE,
        "/models/dtmi:com:example:Thermostat;1",
        None,
    )
    .await?;
    assert_eq!(d.status, 204);
    let d = rest(
        &hub,
        Method::DELETE,
        "/models/dtmi:com:example:Thermostat;1",
        None,
    )
    .await?;
    assert_eq!(d.status, 404, "{}", d.body);
    let t = rest(
        &hub,
        Method::GET,
        "/models/dtmi:com:example:Thermostat;1",
        None,
    )
    .await?;
    assert_eq!(t.status, 404);
    Ok(())
}

fn mirror_dir(cfg: &mut ferrohub::config::ServerConfig) {
    cfg.hub.models.directory = Some(cfg.data_dir.join("mirror"));
}

#[tokio::test]
async fn a_device_models_repository_mirror_is_read_after_the_stored_models() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mirror = dir.path().join("mirror/dtmi/com/example");
    std::fs::create_dir_all(&mirror)?;
    std::fs::write(mirror.join("thermostat-1.json"), THERMOSTAT)?;
    // Only in the expanded form: found inside it by id.
    let info_dir = dir.path().join("mirror/dtmi/azure/devicemanagement");
    std::fs::create_dir_all(&info_dir)?;
    std::fs::write(
        info_dir.join("deviceinformation-1.expanded.json"),
        format!("[{DEVICE_INFO}]"),
    )?;
    let hub = TestHub::start_in(dir, mirror_dir).await?;

    let t = rest(
        &hub,
        Method::GET,
        "/models/dtmi:com:example:Thermostat;1",
        None,
    )
    .await?;
    assert_eq!((t.status, &t.body), (200, &doc(THERMOSTAT)?));
    // The controller stored, its components from the mirror: nothing is missing.
    let a = rest(&hub, Method::POST, "/models", Some(&doc(CONTROLLER)?)).await?;
    assert_eq!(
        (a.status, &a.body["missing"]),
        (200, &json!([])),
        "{}",
        a.body
    );
    let x = rest(
        &hub,
        Method::GET,
        "/models/dtmi:com:example:TemperatureController;2?expanded=true",
        None,
    )
    .await?;
    assert_eq!(x.body.as_array().map(Vec::len), Some(3), "{}", x.body);
    // The mirror is read-only and not listed; removing a mirrored model is a 404.
    let list = rest(&hub, Method::GET, "/models", None).await?;
    assert_eq!(list.body.as_array().map(Vec::len), Some(1));
    let d = rest(
        &hub,
        Method::DELETE,
        "/models/dtmi:com:example:Thermostat;1",
        None,
    )
    .await?;
    assert_eq!(d.status, 404);
    Ok(())
}

#[tokio::test]
async fn the_cli_adds_a_directory_lists_shows_and_removes() -> TestResult {
    let hub = TestHub::start().await?;
    let data = hub.dir.path();
    let models = tempfile::tempdir()?;
    std::fs::create_dir_all(models.path().join("sub"))?;
    std::fs::write(models.path().join("thermostat-1.json"), THERMOSTAT)?;
    std::fs::write(models.path().join("sub/controller.json"), CONTROLLER)?;
    std::fs::write(models.path().join("notes.txt"), "not a model")?;

    let (ok, out, err) = cli(data, &["model", "add", &models.path().to_string_lossy()]).await?;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("added dtmi:com:example:TemperatureController;2"),
        "{out}"
    );
    assert!(out.contains("added dtmi:com:example:Thermostat;1"), "{out}");
    // DeviceInformation is still missing once both files are in; the thermostat is not.
    assert!(
        out.contains("missing dtmi:azure:DeviceManagement:DeviceInformation;1"),
        "{out}"
    );
    assert!(
        !out.contains("missing dtmi:com:example:Thermostat;1"),
        "{out}"
    );

    let (ok, out, err) = cli(data, &["model", "list"]).await?;
    assert!(ok, "{err}");
    assert!(
        out.contains("dtmi:com:example:Thermostat;1") && out.contains("Temperature Controller"),
        "{out}"
    );

    let (ok, out, err) = cli(data, &["model", "show", "dtmi:com:example:Thermostat;1"]).await?;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out)?, doc(THERMOSTAT)?);

    // A bad file fails the command, naming the file and the JSON path.
    let bad = models.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"@context": "dtmi:dtdl:context;2", "@id": "dtmi:x:Bad;1", "@type": "Interface", "contents": 3}"#,
    )?;
    let (ok, out, err) = cli(data, &["model", "add", &bad.to_string_lossy()]).await?;
    assert!(!ok, "{out}");
    assert!(
        err.contains("bad.json") && err.contains("$.contents"),
        "{err}"
    );

    let (ok, _, err) = cli(data, &["model", "remove", "dtmi:com:example:Thermostat;1"]).await?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(data, &["model", "show", "dtmi:com:example:Thermostat;1"]).await?;
    assert!(!ok && err.contains("cannot be found"), "{err}");
    Ok(())
}
