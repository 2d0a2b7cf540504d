//! IoT Hub CONNECT rules over real TLS: SAS tokens in every form, disabled and unknown
//! identities, modules, CONNACK codes, takeover, keep-alive, persistent sessions.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferrohub_mqtt::{Connect, ConnectReturnCode, Packet, QoS, SubscribeReturnCode};
use serde_json::json;

async fn connack(hub: &TestHub, p: Packet) -> R<ConnectReturnCode> {
    let mut c = hub.tls().await?;
    Ok(c.connect(p).await?.1)
}

#[tokio::test]
async fn sas_tokens_good_bad_expired_wrong_sr_and_secondary_key() -> TestResult {
    let hub = TestHub::start().await?;
    let (primary, secondary) = hub.create_device("dev1").await?;
    let (other_key, _) = hub.create_device("dev2").await?;
    let res = format!("{HOST}/devices/dev1");

    let ok = token_for(&res, &primary, 3600, None);
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&ok), true, 60)).await?,
        ConnectReturnCode::Accepted
    );

    let sec = token_for(&res, &secondary, 3600, None);
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&sec), true, 60)).await?,
        ConnectReturnCode::Accepted
    );

    // Signed with another device's key.
    let wrong_key = token_for(&res, &other_key, 3600, None);
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&wrong_key), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );

    let expired = token_for(&res, &primary, -10, None);
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&expired), true, 60)).await?,
        ConnectReturnCode::BadUserNameOrPassword
    );

    // A valid token of dev2 presented by dev1: sr does not match the identity.
    let dev2_token = token_for(&format!("{HOST}/devices/dev2"), &other_key, 3600, None);
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&dev2_token), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );

    // Right key, but the sr names a host this hub is not.
    let foreign_host = token_for("elsewhere.example/devices/dev1", &primary, 3600, None);
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&foreign_host), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );

    assert_eq!(
        connack(&hub, connect_packet("dev1", Some("not a token"), true, 60)).await?,
        ConnectReturnCode::BadUserNameOrPassword
    );
    assert_eq!(
        connack(&hub, connect_packet("dev1", None, true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );

    // Tampered signature.
    let tampered = ok.replacen("sig=", "sig=A", 1);
    assert_ne!(
        connack(&hub, connect_packet("dev1", Some(&tampered), true, 60)).await?,
        ConnectReturnCode::Accepted
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn unknown_and_disabled_devices_are_refused_alike() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let t = hub.device_token("ghost", &key);
    assert_eq!(
        connack(&hub, connect_packet("ghost", Some(&t), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );

    // Connected, then disabled: the live connection is closed and new ones refused.
    let (mut live, _) = hub.connect_device("dev1", &key, true).await?;
    let mut d = hub.api.get("/devices/dev1").await?;
    d["status"] = json!("disabled");
    hub.api.put("/devices/dev1", &d, Some("*")).await?;
    live.expect_closed().await?;
    let t = hub.device_token("dev1", &key);
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&t), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );

    // Deleted: refused too.
    hub.api.delete("/devices/dev1", None).await?;
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&t), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn hub_policy_tokens_need_device_connect() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let owner =
        ferrohub_iothub::ConnectionString::parse(&hub.server().info.owner_connection_string)?;
    let owner_key = owner.shared_access_key.clone().ok_or("no key")?;
    let t = token_for(HOST, &owner_key, 3600, Some("iothubowner"));
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&t), true, 60)).await?,
        ConnectReturnCode::Accepted
    );
    // Device-scoped resource with a policy key works too.
    let t = token_for(
        &format!("{HOST}/devices/dev1"),
        &owner_key,
        3600,
        Some("iothubowner"),
    );
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&t), true, 60)).await?,
        ConnectReturnCode::Accepted
    );
    // Right key, policy name that does not exist / has no DeviceConnect.
    let t = token_for(HOST, &owner_key, 3600, Some("service"));
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&t), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );
    let t = token_for(HOST, &owner_key, 3600, Some("nosuchpolicy"));
    assert_eq!(
        connack(&hub, connect_packet("dev1", Some(&t), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn modules_connect_with_their_own_keys_only() -> TestResult {
    let hub = TestHub::start().await?;
    let (dev_key, _) = hub.create_device("dev1").await?;
    let (mod_key, _) = hub.create_module("dev1", "mod1").await?;
    let res = format!("{HOST}/devices/dev1/modules/mod1");
    let t = token_for(&res, &mod_key, 3600, None);
    let mut c = hub.tls().await?;
    assert_eq!(
        c.connect(connect_packet("dev1/mod1", Some(&t), true, 60))
            .await?
            .1,
        ConnectReturnCode::Accepted
    );
    c.publish_qos1(1, "devices/dev1/modules/mod1/messages/events/", b"m")
        .await?;
    // A module may not publish as its device.
    c.send(&publish(
        "devices/dev1/messages/events/",
        b"x",
        QoS::AtLeastOnce,
        2,
    ))
    .await?;
    c.expect_closed().await?;

    let t = token_for(&res, &dev_key, 3600, None);
    assert_eq!(
        connack(&hub, connect_packet("dev1/mod1", Some(&t), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );
    // A device token does not open a module identity.
    let t = hub.device_token("dev1", &dev_key);
    assert_eq!(
        connack(&hub, connect_packet("dev1/mod1", Some(&t), true, 60)).await?,
        ConnectReturnCode::NotAuthorized
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn connect_packet_rules_give_the_right_connack() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let t = hub.device_token("dev1", &key);

    // Client id must match the username's identity.
    let Packet::Connect(mut c) = connect_packet("dev1", Some(&t), true, 60) else {
        unreachable!()
    };
    c.client_id = "dev2".into();
    assert_eq!(
        connack(&hub, Packet::Connect(c)).await?,
        ConnectReturnCode::IdentifierRejected
    );

    // MQTT 3.1 (level 3) is not supported.
    let Packet::Connect(mut c) = connect_packet("dev1", Some(&t), true, 60) else {
        unreachable!()
    };
    c.protocol_name = "MQIsdp".into();
    c.protocol_level = 3;
    assert_eq!(
        connack(&hub, Packet::Connect(c)).await?,
        ConnectReturnCode::UnacceptableProtocolVersion
    );

    let with_username = |u: &str| {
        Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session: true,
            keep_alive: 60,
            client_id: "dev1".into(),
            will: None,
            username: Some(u.into()),
            password: Some(t.clone().into_bytes().into()),
        })
    };
    assert_eq!(
        connack(&hub, with_username("localhost/dev1/")).await?,
        ConnectReturnCode::BadUserNameOrPassword
    );
    assert_eq!(
        connack(
            &hub,
            with_username("localhost/dev1/?api-version=1999-01-01")
        )
        .await?,
        ConnectReturnCode::BadUserNameOrPassword
    );
    // Every accepted api-version, query keys in any order, model id raw or encoded.
    for u in [
        "localhost/dev1/?api-version=2019-10-01",
        "localhost/dev1/?api-version=2020-09-30&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1",
        "localhost/dev1/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=azure-iot-device%2F1.18.4%20(node)",
        "localhost/dev1/?DeviceClientType=azsdk-c%2F1.6.0-beta.1&api-version=2021-04-12",
    ] {
        assert_eq!(connack(&hub, with_username(u)).await?, ConnectReturnCode::Accepted, "{u}");
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_new_connection_takes_over_the_identity() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let (mut first, _) = hub.connect_device("dev1", &key, true).await?;
    let (mut second, _) = hub.connect_device("dev1", &key, true).await?;
    first.expect_closed().await?;
    second.send(&Packet::PingReq).await?;
    assert_eq!(second.recv().await?, Some(Packet::PingResp));
    let d = hub.api.get("/devices/dev1").await?;
    assert_eq!(
        d["connectionState"], "Connected",
        "the newer connection still holds the identity"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn silent_clients_are_closed_after_one_and_a_half_keep_alives() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let mut c = hub.tls().await?;
    let t = hub.device_token("dev1", &key);
    assert_eq!(
        c.connect(connect_packet("dev1", Some(&t), true, 2))
            .await?
            .1,
        ConnectReturnCode::Accepted
    );
    // Traffic keeps it open past the window...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.send(&Packet::PingReq).await?;
        assert_eq!(c.recv().await?, Some(Packet::PingResp));
    }
    // ...silence closes it after 1.5 x 2 s.
    let started = Instant::now();
    assert_eq!(c.recv_within(Duration::from_secs(6)).await?, None);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900),
        "closed too early: {waited:?}"
    );
    let d = hub.api.get("/devices/dev1").await?;
    assert_eq!(d["connectionState"], "Disconnected");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_connection_is_closed_when_its_sas_token_expires() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    // `se` is in whole seconds: 3 s ahead leaves between 2 and 3 s, time to connect and
    // publish once even on a loaded machine.
    let se = now() + 3;
    let token =
        ferrohub_iothub::sas::generate_token(&format!("{HOST}/devices/dev1"), &key, se, None)?;
    let expires_at = std::time::UNIX_EPOCH + Duration::from_secs(se);
    let mut c = hub.tls().await?;
    assert_eq!(
        c.connect(connect_packet("dev1", Some(&token), true, 60))
            .await?
            .1,
        ConnectReturnCode::Accepted
    );
    c.publish_qos1(1, "devices/dev1/messages/events/", b"before")
        .await?;

    // The keep-alive (90 s) is far off: only the token's expiry can close it this soon.
    let closed = loop {
        match c.recv_within(Duration::from_secs(10)).await? {
            None => break std::time::SystemTime::now(),
            Some(Packet::PingResp) | Some(Packet::Publish(_)) => continue,
            Some(p) => return Err(format!("expected close, got {p:?}").into()),
        }
    };
    let early = expires_at.duration_since(closed).unwrap_or(Duration::ZERO);
    let late = closed.duration_since(expires_at).unwrap_or(Duration::ZERO);
    assert!(
        early < Duration::from_millis(100),
        "closed {early:?} before expiry"
    );
    assert!(
        late < Duration::from_secs(1),
        "closed {late:?} after expiry"
    );

    // A publish after expiry is not acknowledged: the connection is gone.
    let _ = c
        .send(&publish(
            "devices/dev1/messages/events/",
            b"after",
            QoS::AtLeastOnce,
            2,
        ))
        .await;
    match c.recv_within(Duration::from_secs(2)).await {
        Ok(None) | Err(_) => {}
        Ok(Some(p)) => return Err(format!("nothing may follow expiry, got {p:?}").into()),
    }
    let d = hub.api.get("/devices/dev1").await?;
    assert_eq!(d["connectionState"], "Disconnected");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn keep_alive_is_capped_at_1767_seconds() {
    assert_eq!(
        ferrohub_iothub::server_keep_alive(60),
        Duration::from_secs(90)
    );
    assert_eq!(
        ferrohub_iothub::server_keep_alive(1177),
        Duration::from_millis(1_765_500)
    );
    assert_eq!(
        ferrohub_iothub::server_keep_alive(3000),
        Duration::from_secs(1767)
    );
    assert_eq!(
        ferrohub_iothub::server_keep_alive(0),
        Duration::from_secs(1767)
    );
}

/// A module has seven distinct filters it may use, so it can show that restored subscriptions
/// count against the limit of five.
const MODULE_FILTERS: [&str; 7] = [
    "devices/dev1/modules/mod1/messages/devicebound/#",
    "devices/dev1/modules/mod1/inputs/#",
    "$iothub/methods/POST/#",
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "devices/dev1/modules/mod1/#",
    "devices/+/modules/mod1/messages/devicebound/#",
];

async fn connect_module(hub: &TestHub, key: &str, clean: bool) -> R<(MqttClient, bool)> {
    let t = token_for(
        &format!("{HOST}/devices/dev1/modules/mod1"),
        key,
        3600,
        None,
    );
    let mut c = hub.tls().await?;
    let (present, code) = c
        .connect(connect_packet("dev1/mod1", Some(&t), clean, 60))
        .await?;
    if code != ConnectReturnCode::Accepted {
        return Err(format!("CONNACK {code:?}").into());
    }
    Ok((c, present))
}

#[tokio::test]
async fn persistent_sessions_keep_subscriptions_across_reconnects_and_restarts() -> TestResult {
    let mut hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let (key, _) = hub.create_module("dev1", "mod1").await?;
    let granted = vec![SubscribeReturnCode::Success(QoS::AtLeastOnce)];

    let (mut c, present) = connect_module(&hub, &key, false).await?;
    assert!(!present, "first connection has no session");
    for (i, f) in MODULE_FILTERS[..5].iter().enumerate() {
        assert_eq!(
            c.subscribe(i as u16 + 1, &[(f, QoS::AtLeastOnce)]).await?,
            granted,
            "{f}"
        );
    }
    c.send(&Packet::Disconnect).await?;
    drop(c);

    let (mut c, present) = connect_module(&hub, &key, false).await?;
    assert!(present, "reconnect finds the session");
    assert_eq!(
        c.subscribe(6, &[(MODULE_FILTERS[5], QoS::AtLeastOnce)])
            .await?,
        vec![SubscribeReturnCode::Failure],
        "5 kept subscriptions leave no room"
    );
    drop(c);

    hub.restart().await?;
    let (mut c, present) = connect_module(&hub, &key, false).await?;
    assert!(present, "the session survives a restart");
    assert_eq!(
        c.subscribe(7, &[(MODULE_FILTERS[6], QoS::AtLeastOnce)])
            .await?,
        vec![SubscribeReturnCode::Failure],
        "the 5 subscriptions were restored from disk"
    );
    assert_eq!(
        c.subscribe(8, &[(MODULE_FILTERS[2], QoS::AtLeastOnce)])
            .await?,
        granted,
        "re-subscribing a kept filter takes no new slot"
    );
    // Unsubscribing frees a slot, durably too.
    c.send(&Packet::Unsubscribe(ferrohub_mqtt::Unsubscribe {
        packet_id: 9,
        filters: vec![MODULE_FILTERS[0].into()],
    }))
    .await?;
    assert_eq!(c.recv().await?, Some(Packet::UnsubAck(9)));
    drop(c);
    hub.restart().await?;
    let (mut c, _) = connect_module(&hub, &key, false).await?;
    assert_eq!(
        c.subscribe(10, &[(MODULE_FILTERS[6], QoS::AtLeastOnce)])
            .await?,
        granted
    );
    drop(c);

    // CleanSession=1 discards it: no session present, and the next persistent connect starts fresh.
    let (c, present) = connect_module(&hub, &key, true).await?;
    assert!(!present);
    drop(c);
    let (_c, present) = connect_module(&hub, &key, false).await?;
    assert!(!present, "clean session removed the stored one");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn restart_reuses_certificates_and_policies() -> TestResult {
    let mut hub = TestHub::start().await?;
    let ca_before = std::fs::read(&hub.ca)?;
    let cs_before = hub.server().info.owner_connection_string.clone();
    let (key, _) = hub.create_device("dev1").await?;
    hub.restart().await?;
    assert_eq!(std::fs::read(&hub.ca)?, ca_before);
    assert_eq!(
        hub.server()
            .info
            .owner_connection_string
            .split(";SharedAccessKey=")
            .nth(1),
        cs_before.split(";SharedAccessKey=").nth(1)
    );
    hub.connect_device("dev1", &key, true).await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_port_in_use_fails_start_up_naming_the_flag() -> TestResult {
    let hub = TestHub::start().await?;
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.mqtt_bind = hub.mqtt_addr();
    let err = match ferrohub::server::start(cfg).await {
        Ok(_) => return Err("second server bound the same port".into()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("--mqtt-bind"), "{err}");
    let mut cfg = config(dir.path());
    cfg.https_bind = hub.https_addr();
    let err = match ferrohub::server::start(cfg).await {
        Ok(_) => return Err("second server bound the same port".into()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("--https-bind"), "{err}");
    let mut cfg = config(dir.path());
    cfg.amqp_bind = hub.server().amqp_addr;
    let err = match ferrohub::server::start(cfg).await {
        Ok(_) => return Err("second server bound the same port".into()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("--amqp-bind"), "{err}");
    hub.stop().await;
    Ok(())
}
