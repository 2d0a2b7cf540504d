//! Device provisioning over real MQTT/TLS, as the DPS SDKs do it: a group member registers
//! with its derived key, an individual enrollment with its own, then connects to the assigned
//! hub; re-registration is idempotent, the initial twin and the payload's model id reach the
//! twin, and each refusal (wrong key, disabled enrollment, unknown scope, a key derived for
//! another registration id) is answered 401002 without creating a device.

mod common;

use common::*;
use ferrohub_hub::provisioning::{
    Attestation, AttestationType, EnrollmentGroup, IndividualEnrollment, InitialTwin,
    InitialTwinProperties, ProvisioningStatus, SymmetricKeyAttestation,
};
use ferrohub_iothub::dps::derive_device_key;
use ferrohub_iothub::Identity;
use ferrohub_mqtt::{Connect, ConnectReturnCode, Packet, QoS};
use ferrohub_store::IfMatch;
use serde_json::{json, Value};

fn scope(hub: &TestHub) -> String {
    hub.server().info.dps_id_scope.clone()
}

fn sym(primary: Option<&str>) -> Attestation {
    Attestation {
        kind: AttestationType::SymmetricKey,
        symmetric_key: Some(SymmetricKeyAttestation {
            primary_key: primary.map(str::to_string),
            secondary_key: None,
        }),
        x509: None,
        tpm: None,
    }
}

fn group(id: &str, twin: Option<InitialTwin>) -> EnrollmentGroup {
    EnrollmentGroup {
        enrollment_group_id: id.into(),
        attestation: sym(None),
        iot_hub_host_name: None,
        initial_twin: twin,
        provisioning_status: ProvisioningStatus::Enabled,
        reprovision_policy: None,
        capabilities: None,
        allocation_policy: None,
        etag: None,
        created_date_time_utc: None,
        last_updated_date_time_utc: None,
    }
}

fn enrollment(id: &str, device_id: Option<&str>) -> IndividualEnrollment {
    IndividualEnrollment {
        registration_id: id.into(),
        device_id: device_id.map(str::to_string),
        attestation: sym(None),
        iot_hub_host_name: None,
        initial_twin: None,
        provisioning_status: ProvisioningStatus::Enabled,
        reprovision_policy: None,
        capabilities: None,
        allocation_policy: None,
        registration_state: None,
        etag: None,
        created_date_time_utc: None,
        last_updated_date_time_utc: None,
    }
}

fn primary_of(a: &Attestation) -> R<String> {
    Ok(a.symmetric_key
        .as_ref()
        .and_then(|k| k.primary_key.clone())
        .ok_or("no primary key")?)
}

/// A device's DPS token as the C and Node SDKs write it (`skn=registration`), or as Python does
/// (no `skn`).
fn dps_token(scope: &str, rid: &str, key: &str, skn: bool) -> String {
    token_for(
        &format!("{scope}/registrations/{rid}"),
        key,
        3600,
        skn.then_some("registration"),
    )
}

/// CONNECT as the Python SDK's provisioning pipeline sends it; asserts CONNACK 0 and
/// subscribes to the responses.
async fn dps_connect(hub: &TestHub, scope: &str, rid: &str, password: &str) -> R<MqttClient> {
    dps_connect_as(hub, scope, rid, Some(password), None).await
}

type CertIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// The same with a TLS client certificate and no password (X.509 attestation), or with both.
async fn dps_connect_as(
    hub: &TestHub,
    scope: &str,
    rid: &str,
    password: Option<&str>,
    identity: Option<CertIdentity>,
) -> R<MqttClient> {
    let mut c = MqttClient::open(hub.mqtt_addr(), &hub.ca, identity).await?;
    let ack = c
        .connect(Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session: false,
            keep_alive: 60,
            client_id: rid.into(),
            will: None,
            username: Some(format!(
                "{scope}/registrations/{rid}/api-version=2019-03-31&ClientVersion=ferrohub-test%2F1"
            )),
            password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
        }))
        .await?;
    if ack.1 != ConnectReturnCode::Accepted {
        return Err(format!("CONNACK {:?}", ack.1).into());
    }
    let codes = c
        .subscribe(1, &[("$dps/registrations/res/#", QoS::AtLeastOnce)])
        .await?;
    if codes.contains(&ferrohub_mqtt::SubscribeReturnCode::Failure) {
        return Err("subscription refused".into());
    }
    Ok(c)
}

/// A DPS response: status, rid and retry-after from the topic, and the JSON body.
struct Response {
    status: u16,
    rid: String,
    retry_after: Option<u32>,
    body: Value,
}

/// Publishes a request at QoS 1 and returns its response, taking the PUBACK and the response
/// in whichever order they come (MQTT does not order the two).
async fn request(c: &mut MqttClient, pid: u16, topic: &str, payload: &[u8]) -> R<Response> {
    c.send(&publish(topic, payload, QoS::AtLeastOnce, pid))
        .await?;
    let mut acked = false;
    let mut answer = None;
    while !(acked && answer.is_some()) {
        match c.recv().await? {
            Some(Packet::PubAck(id)) if id == pid => acked = true,
            Some(Packet::Publish(p)) if answer.is_none() => answer = Some(parse_response(&p)?),
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    answer.ok_or_else(|| "no DPS response".into())
}

fn parse_response(p: &ferrohub_mqtt::Publish) -> R<Response> {
    let rest = p
        .topic
        .strip_prefix("$dps/registrations/res/")
        .ok_or(format!("unexpected topic {}", p.topic))?;
    let (status, query) = rest.split_once("/?").ok_or("no query in the topic")?;
    let mut rid = String::new();
    let mut retry_after = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("$rid", v)) => rid = v.to_string(),
            Some(("retry-after", v)) => retry_after = Some(v.parse()?),
            _ => {}
        }
    }
    Ok(Response {
        status: status.parse()?,
        rid,
        retry_after,
        body: serde_json::from_slice(&p.payload)?,
    })
}

async fn register(c: &mut MqttClient, body: &Value) -> R<Response> {
    let r = request(
        c,
        2,
        "$dps/registrations/PUT/iotdps-register/?$rid=r1",
        body.to_string().as_bytes(),
    )
    .await?;
    assert_eq!(r.rid, "r1", "the response names the request");
    Ok(r)
}

async fn poll(c: &mut MqttClient, operation_id: &str) -> R<Response> {
    request(
        c,
        3,
        &format!(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r2&operationId={operation_id}"
        ),
        b" ",
    )
    .await
}

/// Registers and polls once, as the SDKs do; returns the final response.
async fn provision(
    hub: &TestHub,
    scope: &str,
    rid: &str,
    password: &str,
    payload: Option<Value>,
) -> R<Response> {
    let c = dps_connect(hub, scope, rid, password).await?;
    provision_on(c, rid, payload).await
}

async fn provision_on(mut c: MqttClient, rid: &str, payload: Option<Value>) -> R<Response> {
    let r = register(&mut c, &json!({"registrationId": rid, "payload": payload})).await?;
    if r.status != 202 {
        return Ok(r);
    }
    assert_eq!(r.body["status"], "assigning");
    assert!(r.retry_after.is_some(), "202 carries retry-after");
    let op = r.body["operationId"]
        .as_str()
        .ok_or("no operationId")?
        .to_string();
    let done = poll(&mut c, &op).await?;
    assert_eq!(done.rid, "r2");
    assert_eq!(done.body["operationId"], op.as_str());
    Ok(done)
}

fn assert_unauthorized(r: &Response) {
    assert_eq!(r.status, 401, "body {}", r.body);
    assert_eq!(r.body["errorCode"], 401002);
    assert!(r.body["trackingId"].is_string());
    assert!(r.body["timestampUtc"].is_string());
}

#[tokio::test]
async fn a_group_member_provisions_with_its_derived_key_and_connects() -> TestResult {
    let hub = TestHub::start().await?;
    let h = &hub.server().hub;
    let twin = InitialTwin {
        tags: Some(json!({"site": "plant-7"})),
        properties: Some(InitialTwinProperties {
            desired: Some(json!({"interval": 30})),
        }),
    };
    let g = h
        .put_enrollment_group(
            "thermostats",
            group("thermostats", Some(twin)),
            IfMatch::Any,
        )
        .await?;
    let device_key = derive_device_key(&primary_of(&g.attestation)?, "therm-001")?;
    let s = scope(&hub);

    let r = provision(
        &hub,
        &s,
        "therm-001",
        &dps_token(&s, "therm-001", &device_key, false),
        Some(json!({"modelId": "dtmi:com:example:Thermostat;1"})),
    )
    .await?;
    assert_eq!(r.status, 200, "body {}", r.body);
    assert_eq!(r.body["status"], "assigned");
    let state = &r.body["registrationState"];
    assert_eq!(state["registrationId"], "therm-001");
    assert_eq!(state["deviceId"], "therm-001");
    assert_eq!(state["assignedHub"], HOST);
    assert_eq!(state["status"], "assigned");
    assert_eq!(state["substatus"], "initialAssignment");
    for field in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
        assert!(state[field].is_string(), "{field} in {state}");
    }
    assert_eq!(state["payload"]["modelId"], "dtmi:com:example:Thermostat;1");

    // The device connects to its hub with the derived key.
    let (_c, _) = hub.connect_device("therm-001", &device_key, true).await?;
    let twin = h.service_twin(&Identity::device("therm-001")).await?;
    assert_eq!(twin["tags"]["site"], "plant-7");
    assert_eq!(twin["properties"]["desired"]["interval"], 30);
    assert_eq!(twin["modelId"], "dtmi:com:example:Thermostat;1");

    let reg = h.registration("therm-001").await?;
    assert_eq!(reg.enrollment_group_id.as_deref(), Some("thermostats"));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_individual_enrollment_provisions_its_device_id_with_its_key() -> TestResult {
    let hub = TestHub::start().await?;
    let h = &hub.server().hub;
    let e = h
        .put_enrollment(
            "sensor-a",
            enrollment("sensor-a", Some("Sensor-A-Device")),
            IfMatch::Any,
        )
        .await?;
    let key = primary_of(&e.attestation)?;
    let s = scope(&hub);
    // The C SDK's shape: `skn=registration`.
    let r = provision(
        &hub,
        &s,
        "sensor-a",
        &dps_token(&s, "sensor-a", &key, true),
        None,
    )
    .await?;
    assert_eq!(r.status, 200, "body {}", r.body);
    assert_eq!(r.body["registrationState"]["deviceId"], "Sensor-A-Device");
    hub.connect_device("Sensor-A-Device", &key, true).await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn re_registration_reuses_the_device_and_keeps_its_twin() -> TestResult {
    let hub = TestHub::start().await?;
    let h = &hub.server().hub;
    let twin = InitialTwin {
        tags: Some(json!({"batch": 1})),
        properties: None,
    };
    let g = h
        .put_enrollment_group("fleet", group("fleet", Some(twin)), IfMatch::Any)
        .await?;
    let key = derive_device_key(&primary_of(&g.attestation)?, "dev-9")?;
    let s = scope(&hub);
    let token = dps_token(&s, "dev-9", &key, false);

    let first = provision(&hub, &s, "dev-9", &token, None).await?;
    assert_eq!(first.status, 200);
    let device = h.device("dev-9").await?;
    // The service changes the twin after provisioning; registering again must not reset it.
    h.service_update_twin(
        &Identity::device("dev-9"),
        json!({"tags": {"batch": 2}}),
        false,
        IfMatch::Any,
    )
    .await?;

    let second = provision(&hub, &s, "dev-9", &token, None).await?;
    assert_eq!(second.status, 200);
    assert_eq!(second.body["registrationState"]["deviceId"], "dev-9");
    assert_eq!(
        second.body["registrationState"]["createdDateTimeUtc"],
        first.body["registrationState"]["createdDateTimeUtc"]
    );
    assert_ne!(
        second.body["operationId"], first.body["operationId"],
        "each register is a new operation"
    );
    let again = h.device("dev-9").await?;
    assert_eq!(again.device.generation_id, device.device.generation_id);
    assert_eq!(
        again.device.etag, device.device.etag,
        "the device was not rewritten"
    );
    let twin = h.service_twin(&Identity::device("dev-9")).await?;
    assert_eq!(twin["tags"]["batch"], 2);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn refusals_answer_401002_and_create_no_device() -> TestResult {
    let hub = TestHub::start().await?;
    let h = &hub.server().hub;
    let s = scope(&hub);
    let g = h
        .put_enrollment_group("grp", group("grp", None), IfMatch::Any)
        .await?;
    let group_key = primary_of(&g.attestation)?;
    let e = h
        .put_enrollment("solo", enrollment("solo", None), IfMatch::Any)
        .await?;
    let solo_key = primary_of(&e.attestation)?;

    // A wrong key for an individual enrollment.
    let wrong = ferrohub_iothub::sas::generate_key();
    let r = provision(
        &hub,
        &s,
        "solo",
        &dps_token(&s, "solo", &wrong, false),
        None,
    )
    .await?;
    assert_unauthorized(&r);

    // A key derived for another registration id.
    let other = derive_device_key(&group_key, "someone-else")?;
    let r = provision(
        &hub,
        &s,
        "member",
        &dps_token(&s, "member", &other, false),
        None,
    )
    .await?;
    assert_unauthorized(&r);

    // The group key itself, not derived.
    let r = provision(
        &hub,
        &s,
        "member",
        &dps_token(&s, "member", &group_key, false),
        None,
    )
    .await?;
    assert_unauthorized(&r);

    // An unknown scope (the token is otherwise right for it).
    let good = derive_device_key(&group_key, "member")?;
    let r = provision(
        &hub,
        "0ne00000000",
        "member",
        &dps_token("0ne00000000", "member", &good, false),
        None,
    )
    .await?;
    assert_unauthorized(&r);

    // A disabled enrollment, with the right key.
    let mut disabled = e.clone();
    disabled.provisioning_status = ProvisioningStatus::Disabled;
    h.put_enrollment("solo", disabled, IfMatch::Any).await?;
    let r = provision(
        &hub,
        &s,
        "solo",
        &dps_token(&s, "solo", &solo_key, false),
        None,
    )
    .await?;
    assert_unauthorized(&r);

    // A disabled group, with the right derived key.
    let mut g2 = g.clone();
    g2.provisioning_status = ProvisioningStatus::Disabled;
    h.put_enrollment_group("grp", g2, IfMatch::Any).await?;
    let r = provision(
        &hub,
        &s,
        "member",
        &dps_token(&s, "member", &good, false),
        None,
    )
    .await?;
    assert_unauthorized(&r);

    for id in ["solo", "member", "someone-else"] {
        assert!(h.device(id).await.is_err(), "{id} must not exist");
    }
    // The right key still works once the group is enabled again: the refusals above were
    // about the credentials, not a broken service.
    let mut g3 = h.enrollment_group("grp").await?;
    g3.provisioning_status = ProvisioningStatus::Enabled;
    h.put_enrollment_group("grp", g3, IfMatch::Any).await?;
    let r = provision(
        &hub,
        &s,
        "member",
        &dps_token(&s, "member", &good, false),
        None,
    )
    .await?;
    assert_eq!(r.status, 200, "body {}", r.body);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_status_query_for_another_operation_is_not_found_requests_are_bounded_and_topics_are_confined(
) -> TestResult {
    let hub = TestHub::start().await?;
    let s = scope(&hub);
    let h = &hub.server().hub;
    let e = h
        .put_enrollment("probe", enrollment("probe", None), IfMatch::Any)
        .await?;
    let key = primary_of(&e.attestation)?;
    let mut c = dps_connect(&hub, &s, "probe", &dps_token(&s, "probe", &key, false)).await?;
    let r = poll(&mut c, "4.0000000000000000.guess").await?;
    assert_eq!(r.status, 404);
    // One connection gets a bounded number of requests; past it, 429 with retry-after.
    let limit = ferrohub_hub::provisioning::MAX_REQUESTS_PER_CONNECTION;
    for _ in 1..limit {
        assert_eq!(poll(&mut c, "4.0000000000000000.guess").await?.status, 404);
    }
    let r = poll(&mut c, "4.0000000000000000.guess").await?;
    assert_eq!(r.status, 429, "body {}", r.body);
    assert_eq!(r.body["errorCode"], 429001);
    assert!(r.retry_after.is_some());
    // Only the response filter may be subscribed on a provisioning connection.
    let codes = c
        .subscribe(
            5,
            &[("devices/probe/messages/devicebound/#", QoS::AtLeastOnce)],
        )
        .await?;
    assert_eq!(codes, vec![ferrohub_mqtt::SubscribeReturnCode::Failure]);
    // A hub topic is a protocol violation here: the connection closes.
    c.send(&publish(
        "devices/probe/messages/events/",
        b"x",
        QoS::AtLeastOnce,
        6,
    ))
    .await?;
    c.expect_closed().await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_id_scope_survives_a_restart_and_a_configured_one_wins() -> TestResult {
    let mut hub = TestHub::start().await?;
    let first = scope(&hub);
    assert!(first.starts_with("0ne") && first.len() == 11, "{first}");
    hub.restart().await?;
    assert_eq!(scope(&hub), first);
    hub.stop().await;

    let hub = TestHub::start_with(|c| c.dps_id_scope = Some("0neCAFE0001".into())).await?;
    assert_eq!(scope(&hub), "0neCAFE0001");
    hub.stop().await;
    Ok(())
}

/// A raw call to the provisioning REST API signed with `policy`'s primary key.
async fn dps_rest(
    hub: &TestHub,
    policy: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    if_match: Option<&str>,
) -> R<(u16, Value)> {
    let key = hub
        .server()
        .hub
        .policy(policy)
        .await?
        .ok_or("no such policy")?
        .primary_key;
    let host = format!("{HOST}:{}", hub.https_addr().port());
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut req = https_client(hub)?
        .request(
            method,
            format!("https://{host}{path}{sep}api-version=2021-10-01"),
        )
        .header("Authorization", token_for(&host, &key, 3600, Some(policy)));
    if let Some(b) = body {
        req = req.json(b);
    }
    if let Some(e) = if_match {
        req = req.header("If-Match", e);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok((status, body))
}

#[tokio::test]
async fn the_rest_api_manages_enrollments_under_provisioningserviceowner() -> TestResult {
    use reqwest::Method;
    let hub = TestHub::start().await?;
    let owner = "provisioningserviceowner";
    let (status, g) = dps_rest(
        &hub,
        owner,
        Method::PUT,
        "/enrollmentGroups/line-1",
        Some(&json!({
            "enrollmentGroupId": "line-1",
            "attestation": {"type": "symmetricKey"},
            "initialTwin": {"tags": {"line": 1}, "properties": {"desired": {"rate": 5}}}
        })),
        None,
    )
    .await?;
    assert_eq!(status, 200, "{g}");
    let key = g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .ok_or("no generated key")?
        .to_string();
    assert!(g["attestation"]["symmetricKey"]["secondaryKey"].is_string());
    assert_eq!(g["provisioningStatus"], "enabled");
    let etag = g["etag"].as_str().ok_or("no etag")?.to_string();

    // A stale etag is refused; the current one replaces.
    let mut changed = g.clone();
    changed["provisioningStatus"] = json!("disabled");
    let (status, body) = dps_rest(
        &hub,
        owner,
        Method::PUT,
        "/enrollmentGroups/line-1",
        Some(&changed),
        Some("\"bm9wZQ==\""),
    )
    .await?;
    assert_eq!(status, 412, "{body}");
    let (status, body) = dps_rest(
        &hub,
        owner,
        Method::PUT,
        "/enrollmentGroups/line-1",
        Some(&changed),
        Some(&format!("\"{etag}\"")),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["provisioningStatus"], "disabled");
    assert_eq!(
        body["attestation"]["symmetricKey"]["primaryKey"], key,
        "keys sent back are kept"
    );

    let (status, list) = dps_rest(
        &hub,
        owner,
        Method::POST,
        "/enrollmentGroups/query",
        Some(&json!({"query": "*"})),
        None,
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // An individual enrollment, and a registration read after the device provisioned.
    let (status, e) = dps_rest(
        &hub,
        owner,
        Method::PUT,
        "/enrollments/rest-dev",
        Some(&json!({"registrationId": "rest-dev", "attestation": {"type": "symmetricKey"}})),
        None,
    )
    .await?;
    assert_eq!(status, 200, "{e}");
    let ekey = e["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .ok_or("no key")?
        .to_string();
    let s = scope(&hub);
    let r = provision(
        &hub,
        &s,
        "rest-dev",
        &dps_token(&s, "rest-dev", &ekey, false),
        Some(json!({"k": "v"})),
    )
    .await?;
    assert_eq!(r.status, 200);
    let (status, reg) = dps_rest(
        &hub,
        owner,
        Method::GET,
        "/registrations/rest-dev",
        None,
        None,
    )
    .await?;
    assert_eq!(status, 200, "{reg}");
    assert_eq!(reg["deviceId"], "rest-dev");
    assert_eq!(reg["status"], "assigned");
    assert_eq!(reg["payload"]["k"], "v");
    assert!(reg.get("operationId").is_none());
    let (status, _) = dps_rest(
        &hub,
        owner,
        Method::DELETE,
        "/registrations/rest-dev",
        None,
        None,
    )
    .await?;
    assert_eq!(status, 204);
    let (status, _) = dps_rest(
        &hub,
        owner,
        Method::GET,
        "/registrations/rest-dev",
        None,
        None,
    )
    .await?;
    assert_eq!(status, 404);

    // The provisioning policy has no registry rights; `service` has no enrollment rights.
    let (status, _) = dps_rest(&hub, owner, Method::GET, "/devices/rest-dev", None, None).await?;
    assert_eq!(status, 401);
    let (status, _) = dps_rest(
        &hub,
        "service",
        Method::GET,
        "/enrollments/rest-dev",
        None,
        None,
    )
    .await?;
    assert_eq!(status, 401);

    let (status, _) = dps_rest(
        &hub,
        owner,
        Method::DELETE,
        "/enrollmentGroups/line-1",
        None,
        None,
    )
    .await?;
    assert_eq!(status, 204);
    let (status, body) = dps_rest(
        &hub,
        owner,
        Method::GET,
        "/enrollmentGroups/line-1",
        None,
        None,
    )
    .await?;
    assert_eq!(status, 404, "{body}");
    // A body that is not an enrollment is refused with the hub's error body.
    let (status, _) = dps_rest(
        &hub,
        owner,
        Method::PUT,
        "/enrollments/bad",
        Some(&json!({"attestation": {"type": "tpm"}})),
        None,
    )
    .await?;
    assert_eq!(status, 400);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_cli_creates_groups_and_derives_keys_that_provision() -> TestResult {
    let hub = TestHub::start().await?;
    let dir = hub.dir.path().to_path_buf();
    let run = |args: Vec<String>| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || ferrohub_cli(&dir, &args)).await? }
    };
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();

    let (ok, out, err) = run(s(&[
        "dps",
        "group",
        "create",
        "cli-group",
        "--tags",
        r#"{"from":"cli"}"#,
    ]))
    .await?;
    assert!(ok, "{err}");
    assert!(out.contains("created enrollment group cli-group"), "{out}");
    // Creating it again would silently rotate its keys: refused without --etag.
    let (ok, _, err) = run(s(&["dps", "group", "create", "cli-group"])).await?;
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, key, err) = run(s(&[
        "dps",
        "derive-key",
        "--group",
        "cli-group",
        "--registration-id",
        "cli-dev",
    ]))
    .await?;
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    let g = hub.server().hub.enrollment_group("cli-group").await?;
    assert_eq!(
        key,
        derive_device_key(&primary_of(&g.attestation)?, "cli-dev")?
    );
    // Offline derivation from a given key agrees.
    let (ok, offline, err) = run(s(&[
        "dps",
        "derive-key",
        "--key",
        &primary_of(&g.attestation)?,
        "--registration-id",
        "cli-dev",
    ]))
    .await?;
    assert!(ok, "{err}");
    assert_eq!(offline.trim(), key);

    let sc = scope(&hub);
    let r = provision(
        &hub,
        &sc,
        "cli-dev",
        &dps_token(&sc, "cli-dev", &key, false),
        None,
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let (ok, out, err) = run(s(&["dps", "registration", "show", "cli-dev"])).await?;
    assert!(ok, "{err}");
    assert!(
        out.contains("assigned") && out.contains("cli-group"),
        "{out}"
    );

    let (ok, out, err) = run(s(&["dps", "group", "list"])).await?;
    assert!(ok && out.contains("cli-group"), "{out}{err}");
    let (ok, _, err) = run(s(&["dps", "group", "delete", "cli-group"])).await?;
    assert!(ok, "{err}");
    let (ok, _, _) = run(s(&["dps", "group", "show", "cli-group"])).await?;
    assert!(!ok, "the group is gone");

    let (ok, out, err) = run(s(&[
        "dps",
        "enrollment",
        "create",
        "cli-solo",
        "--device-id",
        "solo-device",
    ]))
    .await?;
    assert!(ok, "{err}");
    assert!(out.contains("solo-device"), "{out}");
    let (ok, out, _) = run(s(&["dps", "enrollment", "list"])).await?;
    assert!(ok && out.contains("cli-solo"), "{out}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn provisioning_does_not_take_over_the_device_connection_of_the_same_id() -> TestResult {
    let hub = TestHub::start().await?;
    let h = &hub.server().hub;
    // The device exists and is connected under the client id "same-id"; its enrollment's
    // registration id (the provisioning client id) is the same.
    let e = h
        .put_enrollment("same-id", enrollment("same-id", None), IfMatch::Any)
        .await?;
    let key = primary_of(&e.attestation)?;
    let s = scope(&hub);
    let first = provision(
        &hub,
        &s,
        "same-id",
        &dps_token(&s, "same-id", &key, false),
        None,
    )
    .await?;
    assert_eq!(first.status, 200);
    let (mut device, _) = hub.connect_device("same-id", &key, true).await?;

    let again = provision(
        &hub,
        &s,
        "same-id",
        &dps_token(&s, "same-id", &key, false),
        None,
    )
    .await?;
    assert_eq!(again.status, 200);
    device.send(&Packet::PingReq).await?;
    match device.recv().await? {
        Some(Packet::PingResp) => {}
        other => return Err(format!("the device connection was disturbed: {other:?}").into()),
    }
    hub.stop().await;
    Ok(())
}

mod x509 {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A certificate with `cn`, self-signed or signed by `issuer`; its identity (chain, key) and
    /// its PEM.
    fn cert(cn: &str, issuer: Option<&(rcgen::Certificate, KeyPair)>) -> R<(CertIdentity, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let (cert, chain) = match issuer {
            None => {
                let c = p.self_signed(&key)?;
                let chain = vec![c.der().clone()];
                (c, chain)
            }
            Some((ca, ca_key)) => {
                let c = p.signed_by(&key, ca, ca_key)?;
                let chain = vec![c.der().clone(), ca.der().clone()];
                (c, chain)
            }
        };
        let pem = cert.pem();
        Ok((
            (
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ),
            pem,
        ))
    }

    fn dup(id: &CertIdentity) -> CertIdentity {
        (id.0.clone(), id.1.clone_key())
    }

    fn ca(name: &str) -> R<(rcgen::Certificate, KeyPair)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key)?;
        Ok((cert, key))
    }

    fn x509_attestation(x509: Value) -> Attestation {
        Attestation {
            kind: AttestationType::X509,
            symmetric_key: None,
            x509: Some(x509),
            tpm: None,
        }
    }

    async fn provision_x509(hub: &TestHub, rid: &str, id: CertIdentity) -> R<Response> {
        let c = dps_connect_as(hub, &scope(hub), rid, None, Some(id)).await?;
        provision_on(c, rid, None).await
    }

    async fn hub_connack(hub: &TestHub, device: &str, id: CertIdentity) -> R<ConnectReturnCode> {
        let mut c = MqttClient::open(hub.mqtt_addr(), &hub.ca, Some(id)).await?;
        Ok(c.connect(connect_packet(device, None, true, 60)).await?.1)
    }

    #[tokio::test]
    async fn an_individual_x509_enrollment_provisions_by_its_certificate() -> TestResult {
        let hub = TestHub::start().await?;
        let h = &hub.server().hub;
        let (id, pem) = cert("x509-dev", None)?;
        let mut e = enrollment("x509-dev", None);
        e.attestation =
            x509_attestation(json!({"clientCertificates": {"primary": {"certificate": pem}}}));
        h.put_enrollment("x509-dev", e, IfMatch::Any).await?;

        // Another certificate with the same CN is not the enrollment's.
        let (other, _) = cert("x509-dev", None)?;
        assert_unauthorized(&provision_x509(&hub, "x509-dev", other).await?);

        let r = provision_x509(&hub, "x509-dev", dup(&id)).await?;
        assert_eq!(r.status, 200, "body {}", r.body);
        assert_eq!(r.body["registrationState"]["deviceId"], "x509-dev");
        // The device reaches the hub with the certificate it provisioned with.
        assert_eq!(
            hub_connack(&hub, "x509-dev", dup(&id)).await?,
            ConnectReturnCode::Accepted
        );
        // Registering again leaves the device as it was.
        let before = h.device("x509-dev").await?.device.etag;
        assert_eq!(provision_x509(&hub, "x509-dev", id).await?.status, 200);
        assert_eq!(h.device("x509-dev").await?.device.etag, before);
        hub.stop().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_ca_group_provisions_members_whose_cn_is_the_registration_id() -> TestResult {
        let hub = TestHub::start().await?;
        let h = &hub.server().hub;
        let root = ca("Fleet Root")?;
        let mut g = group("fleet-ca", None);
        g.attestation = x509_attestation(
            json!({"signingCertificates": {"primary": {"certificate": root.0.pem()}}}),
        );
        h.put_enrollment_group("fleet-ca", g, IfMatch::Any).await?;

        let (member, _) = cert("ca-member-1", Some(&root))?;
        let r = provision_x509(&hub, "ca-member-1", dup(&member)).await?;
        assert_eq!(r.status, 200, "body {}", r.body);
        assert_eq!(r.body["registrationState"]["deviceId"], "ca-member-1");
        assert_eq!(
            hub_connack(&hub, "ca-member-1", member).await?,
            ConnectReturnCode::Accepted
        );
        assert_eq!(
            h.registration("ca-member-1")
                .await?
                .enrollment_group_id
                .as_deref(),
            Some("fleet-ca")
        );

        // A CN that is not the registration id, and a certificate of another CA, are refused.
        let (misnamed, _) = cert("someone-else", Some(&root))?;
        assert_unauthorized(&provision_x509(&hub, "ca-member-2", misnamed).await?);
        let stranger_ca = ca("Stranger")?;
        let (stranger, _) = cert("ca-member-3", Some(&stranger_ca))?;
        assert_unauthorized(&provision_x509(&hub, "ca-member-3", stranger).await?);
        for id in ["ca-member-2", "ca-member-3", "someone-else"] {
            assert!(h.device(id).await.is_err(), "{id} must not exist");
        }
        hub.stop().await;
        Ok(())
    }
}

#[tokio::test]
async fn the_https_device_api_registers_and_answers_the_status_poll() -> TestResult {
    let hub = TestHub::start().await?;
    let h = &hub.server().hub;
    let g = h
        .put_enrollment_group("http-grp", group("http-grp", None), IfMatch::Any)
        .await?;
    let key = derive_device_key(&primary_of(&g.attestation)?, "http-dev")?;
    let s = scope(&hub);
    let base = format!(
        "https://{HOST}:{}/{s}/registrations/http-dev",
        hub.https_addr().port()
    );
    let client = https_client(&hub)?;

    // A wrong key first: 401 with DPS's body, nothing created.
    let wrong = ferrohub_iothub::sas::generate_key();
    let resp = client
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("Authorization", dps_token(&s, "http-dev", &wrong, true))
        .json(&json!({"registrationId": "http-dev"}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await?;
    assert_eq!(body["errorCode"], 401002);
    assert!(h.device("http-dev").await.is_err());

    // The Node SDK's HTTP transport: PUT register, then GET the operation.
    let token = dps_token(&s, "http-dev", &key, true);
    let resp = client
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("Authorization", &token)
        .json(&json!({"registrationId": "http-dev", "payload": {"modelId": "dtmi:x:y;1"}}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 202);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await?;
    assert_eq!(body["status"], "assigning");
    let op = body["operationId"]
        .as_str()
        .ok_or("no operationId")?
        .to_string();

    // The poll is authenticated on its own.
    let resp = client
        .get(format!("{base}/operations/{op}?api-version=2019-03-31"))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    let resp = client
        .get(format!("{base}/operations/{op}?api-version=2019-03-31"))
        .header("Authorization", &token)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await?;
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["deviceId"], "http-dev");
    assert_eq!(
        body["registrationState"]["payload"]["modelId"],
        "dtmi:x:y;1"
    );
    hub.connect_device("http-dev", &key, true).await?;
    hub.stop().await;
    Ok(())
}
