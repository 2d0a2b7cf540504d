//! The Event Hubs-compatible endpoint over real TLS and sockets: claims-based security and
//! its refusals, `$management` READ, receiver addresses and selector filters, credit, and
//! the shape of each event, with a raw AMQP client on the project's codec.

mod common;

use std::time::Duration;

use common::amqp::{annotation, eventhub_token, service_key, status_of, AmqpClient, Sasl};
use common::{token_for, TestHub, TestResult, HOST, R, WAIT};
use ferrohub_amqp::message::Body;
use ferrohub_amqp::{Message, Performative, Value};
use ferrohub_store::telemetry::partition_for;

/// The entity: the first label of the host name.
const ENTITY: &str = "localhost";
/// How long a test waits to be sure nothing more comes.
const QUIET: Duration = Duration::from_millis(300);

/// A client whose connection holds a valid ServiceConnect claim (Event Hubs convention).
async fn authorized(hub: &TestHub) -> R<AmqpClient> {
    let mut c = AmqpClient::connect(hub, Sasl::Anonymous, 65_536).await?;
    let audience = format!("sb://{HOST}/{ENTITY}");
    let token = eventhub_token(
        &audience,
        &service_key(hub, "service").await?,
        "service",
        600,
    );
    assert_eq!(c.put_token(&token, &audience).await?, 200);
    Ok(c)
}

/// Sends `n` telemetry messages from a new device; returns its id and partition.
async fn publish(hub: &TestHub, id: &str, n: usize) -> R<u32> {
    let (key, _) = hub.create_device(id).await?;
    let (mut dev, _) = hub.connect_device(id, &key, true).await?;
    for i in 0..n {
        let topic = format!("devices/{id}/messages/events/%24.mid=m{i}&%24.ct=application%2Fjson&%24.ce=utf-8&k=v{i}");
        dev.publish_qos1(i as u16 + 1, &topic, format!("{{\"n\":{i}}}").as_bytes())
            .await?;
    }
    Ok(partition_for(id, 4))
}

fn address(partition: u32) -> String {
    format!("amqps://{HOST}/{ENTITY}/ConsumerGroups/$Default/Partitions/{partition}")
}

fn seq(m: &Message) -> R<i64> {
    match annotation(m, "x-opt-sequence-number") {
        Some(Value::Long(n)) => Ok(*n),
        other => Err(format!("x-opt-sequence-number must be a long, got {other:?}").into()),
    }
}

/// Attaches a receiver with `selector`, gives it `credit` and returns the sequence numbers of
/// everything that arrives until the link goes quiet.
async fn read(
    c: &mut AmqpClient,
    handle: u32,
    partition: u32,
    selector: Option<&str>,
    credit: u32,
) -> R<Vec<i64>> {
    let (_, detach) = c
        .attach_receiver(handle, &address(partition), selector)
        .await?;
    assert!(detach.is_none(), "receiver refused: {detach:?}");
    c.flow(handle, 0, credit).await?;
    let mut got = Vec::new();
    while let Some((t, m)) = c.recv_delivery_within(QUIET).await? {
        assert_eq!(t.handle, handle);
        got.push(seq(&m)?);
    }
    // Detached, so the next reader of the partition has a place (five at most).
    c.detach(handle).await?;
    Ok(got)
}

#[tokio::test]
async fn selector_filters_choose_where_a_receiver_starts() -> TestResult {
    let hub = TestHub::start().await?;
    let p = publish(&hub, "filters", 5).await?;
    let mut c = authorized(&hub).await?;
    let all = read(&mut c, 1, p, None, 100).await?;
    assert_eq!(all, vec![0, 1, 2, 3, 4], "no filter: from the oldest event");
    let q = |op: &str, v: &str| format!("amqp.annotation.x-opt-offset {op} '{v}'");
    assert_eq!(read(&mut c, 2, p, Some(&q(">", "-1")), 100).await?, all);
    assert_eq!(
        read(&mut c, 3, p, Some(&q(">", "1")), 100).await?,
        vec![2, 3, 4]
    );
    assert_eq!(
        read(&mut c, 4, p, Some(&q(">=", "1")), 100).await?,
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        read(
            &mut c,
            5,
            p,
            Some("amqp.annotation.x-opt-sequence-number > '3'"),
            100
        )
        .await?,
        vec![4]
    );
    assert_eq!(
        read(&mut c, 6, p, Some(&q(">", "@latest")), 100).await?,
        Vec::<i64>::new()
    );

    // Enqueued time, inclusive and exclusive (and the older CLI's unquoted spelling):
    // exactly the events at or after (after) the third event's time. Events can share a
    // millisecond, so the expectation comes from the events' own times.
    let (_, detach) = c.attach_receiver(7, &address(p), None).await?;
    assert!(detach.is_none());
    c.flow(7, 0, 5).await?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let (_, m) = c.recv_delivery_within(WAIT).await?.ok_or("event missing")?;
        match annotation(&m, "x-opt-enqueued-time") {
            Some(Value::Timestamp(t)) => times.push((seq(&m)?, *t)),
            other => {
                return Err(format!("x-opt-enqueued-time must be a timestamp: {other:?}").into())
            }
        }
    }
    c.detach(7).await?;
    let t = times[2].1;
    let at_or_after: Vec<i64> = times
        .iter()
        .filter(|(_, x)| *x >= t)
        .map(|(s, _)| *s)
        .collect();
    let after: Vec<i64> = times
        .iter()
        .filter(|(_, x)| *x > t)
        .map(|(s, _)| *s)
        .collect();
    let sel = format!("amqp.annotation.x-opt-enqueued-time >= '{t}'");
    assert_eq!(read(&mut c, 8, p, Some(&sel), 100).await?, at_or_after);
    let sel = format!("amqp.annotation.x-opt-enqueuedtimeutc > {t}");
    assert_eq!(read(&mut c, 9, p, Some(&sel), 100).await?, after);

    // An unsupported expression is refused on the link, not the connection.
    let (_, detach) = c
        .attach_receiver(10, &address(p), Some("amqp.annotation.x-opt-offset < '3'"))
        .await?;
    let err = detach.and_then(|d| d.error).ok_or("bad filter accepted")?;
    assert_eq!(err.condition.0, "amqp:invalid-field");
    assert_eq!(read(&mut c, 11, p, Some(&q(">", "3")), 100).await?, vec![4]);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_receiver_at_latest_gets_new_events_live_and_events_carry_the_iot_hub_shape() -> TestResult
{
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("live").await?;
    let p = partition_for("live", 4);
    let mut c = authorized(&hub).await?;
    let (_, detach) = c
        .attach_receiver(
            1,
            &address(p),
            Some("amqp.annotation.x-opt-offset > '@latest'"),
        )
        .await?;
    assert!(detach.is_none());
    c.flow(1, 0, 10).await?;
    let (mut dev, _) = hub.connect_device("live", &key, true).await?;
    dev.publish_qos1(1, "devices/live/messages/events/%24.mid=m1&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high", b"{\"t\":21}").await?;
    let (t, m) = c
        .recv_delivery_within(WAIT)
        .await?
        .ok_or("live event missing")?;
    assert_eq!(
        t.settled,
        Some(true),
        "the receiver asked for settled deliveries"
    );
    assert_eq!(seq(&m)?, 0);
    assert_eq!(annotation(&m, "x-opt-offset"), Some(&Value::str("0")));
    assert!(matches!(
        annotation(&m, "x-opt-enqueued-time"),
        Some(Value::Timestamp(_))
    ));
    assert!(matches!(
        annotation(&m, "iothub-enqueuedtime"),
        Some(Value::Timestamp(_))
    ));
    assert_eq!(
        annotation(&m, "iothub-connection-device-id"),
        Some(&Value::str("live"))
    );
    assert_eq!(
        annotation(&m, "iothub-message-source"),
        Some(&Value::str("Telemetry"))
    );
    assert!(annotation(&m, "iothub-connection-auth-method").is_some());
    assert!(annotation(&m, "iothub-connection-auth-generation-id").is_some());
    let props = m.properties.as_ref().ok_or("no properties")?;
    assert_eq!(props.message_id, Value::str("m1"));
    assert_eq!(props.correlation_id, Value::str("c1"));
    assert_eq!(
        props.content_type.as_ref().map(|s| s.0.as_str()),
        Some("application/json")
    );
    assert_eq!(
        props.content_encoding.as_ref().map(|s| s.0.as_str()),
        Some("utf-8")
    );
    assert_eq!(m.application_property("alert"), Some(&Value::str("high")));
    assert_eq!(
        m.application_property("message-id"),
        None,
        "system properties stay out of the application's"
    );
    assert_eq!(m.body, Body::Data(vec![b"{\"t\":21}".to_vec()]));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn deliveries_never_exceed_credit_and_large_events_span_frames() -> TestResult {
    let hub = TestHub::start().await?;
    let p = publish(&hub, "credit", 5).await?;
    let mut c = authorized(&hub).await?;
    let (_, detach) = c.attach_receiver(1, &address(p), None).await?;
    assert!(detach.is_none());
    // Attached with no credit: nothing comes.
    assert!(c.recv_delivery_within(QUIET).await?.is_none());
    c.flow(1, 0, 2).await?;
    let mut got = Vec::new();
    while let Some((_, m)) = c.recv_delivery_within(QUIET).await? {
        got.push(seq(&m)?);
    }
    assert_eq!(got, vec![0, 1], "exactly the credit given");
    c.flow(1, 2, 10).await?;
    while let Some((_, m)) = c.recv_delivery_within(QUIET).await? {
        got.push(seq(&m)?);
    }
    assert_eq!(
        got,
        vec![0, 1, 2, 3, 4],
        "the rest, in order, none repeated"
    );

    // A client with 512-byte frames still gets a 4 KB event, split with `more`.
    let (key, _) = hub.create_device("big").await?;
    let (mut dev, _) = hub.connect_device("big", &key, true).await?;
    let body = vec![b'x'; 4096];
    dev.publish_qos1(1, "devices/big/messages/events/", &body)
        .await?;
    let mut small = AmqpClient::connect(&hub, Sasl::Anonymous, 512).await?;
    let audience = format!("sb://{HOST}/{ENTITY}");
    let token = eventhub_token(
        &audience,
        &service_key(&hub, "service").await?,
        "service",
        600,
    );
    assert_eq!(small.put_token(&token, &audience).await?, 200);
    let (_, detach) = small
        .attach_receiver(1, &address(partition_for("big", 4)), None)
        .await?;
    assert!(detach.is_none());
    small.flow(1, 0, 100).await?;
    let mut found = false;
    while let Some((_, m)) = small.recv_delivery_within(QUIET).await? {
        if annotation(&m, "iothub-connection-device-id") == Some(&Value::str("big")) {
            assert_eq!(m.body, Body::Data(vec![body.clone()]));
            found = true;
        }
    }
    assert!(found, "the large event did not arrive");
    hub.stop().await;
    Ok(())
}

/// Attaches a partition receiver and returns the refusal's condition, if refused.
async fn refusal(c: &mut AmqpClient, handle: u32, addr: &str) -> R<Option<String>> {
    let (_, detach) = c.attach_receiver(handle, addr, None).await?;
    Ok(detach.and_then(|d| d.error).map(|e| e.condition.0))
}

#[tokio::test]
async fn tokens_that_do_not_grant_service_connect_open_no_receiver() -> TestResult {
    let hub = TestHub::start().await?;
    let audience = format!("sb://{HOST}/{ENTITY}");
    let key = service_key(&hub, "service").await?;
    let unauthorized = Some("amqp:unauthorized-access".to_string());

    // No token at all.
    let mut c = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    assert_eq!(refusal(&mut c, 1, &address(0)).await?, unauthorized);
    // A wrong key, either convention.
    let wrong = "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgISE=";
    assert_eq!(
        c.put_token(&eventhub_token(&audience, wrong, "service", 600), &audience)
            .await?,
        401
    );
    assert_eq!(
        c.put_token(&token_for(HOST, wrong, 600, Some("service")), HOST)
            .await?,
        401
    );
    // An expired token.
    assert_eq!(
        c.put_token(&eventhub_token(&audience, &key, "service", -10), &audience)
            .await?,
        401
    );
    // A device's own token (device scope, no policy).
    let (dkey, _) = hub.create_device("d1").await?;
    let device = hub.device_token("d1", &dkey);
    assert_eq!(
        c.put_token(&device, &format!("{HOST}/devices/d1")).await?,
        401
    );
    // A genuine token of a policy without ServiceConnect: accepted as a claim, but it opens
    // no receiver.
    let rr = service_key(&hub, "registryRead").await?;
    assert_eq!(
        c.put_token(
            &eventhub_token(&audience, &rr, "registryRead", 600),
            &audience
        )
        .await?,
        200
    );
    assert_eq!(refusal(&mut c, 2, &address(0)).await?, unauthorized);
    // The device policy (DeviceConnect) neither.
    let dp = service_key(&hub, "device").await?;
    assert_eq!(
        c.put_token(&token_for(HOST, &dp, 600, Some("device")), HOST)
            .await?,
        200
    );
    assert_eq!(refusal(&mut c, 3, &address(0)).await?, unauthorized);

    // The IoT Hub convention (decoded key, audience the host) works too, and so does SASL
    // PLAIN with a token as the password.
    assert_eq!(
        c.put_token(&token_for(HOST, &key, 600, Some("service")), HOST)
            .await?,
        200
    );
    assert_eq!(refusal(&mut c, 4, &address(0)).await?, None);
    let plain = eventhub_token(&audience, &key, "service", 600);
    let mut p = AmqpClient::connect(&hub, Sasl::Plain(&plain), 65_536).await?;
    assert_eq!(refusal(&mut p, 1, &address(1)).await?, None);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn addresses_resolve_to_partitions_case_insensitively_or_are_not_found() -> TestResult {
    let hub = TestHub::start().await?;
    let mut c = authorized(&hub).await?;
    let not_found = Some("amqp:not-found".to_string());
    assert_eq!(
        refusal(
            &mut c,
            1,
            &format!(
                "/{}/consumergroups/$DEFAULT/partitions/3",
                ENTITY.to_uppercase()
            )
        )
        .await?,
        None
    );
    assert_eq!(
        refusal(
            &mut c,
            2,
            &format!("{ENTITY}/ConsumerGroups/$Default/Partitions/4")
        )
        .await?,
        not_found
    );
    assert_eq!(
        refusal(&mut c, 3, "otherhub/ConsumerGroups/$Default/Partitions/0").await?,
        not_found
    );
    assert_eq!(
        refusal(&mut c, 4, "amqps://localhost/nothing/here").await?,
        not_found
    );
    // The connection survives refusals.
    assert_eq!(refusal(&mut c, 5, &address(0)).await?, None);
    hub.stop().await;
    Ok(())
}

fn app(pairs: &[(&str, &str)]) -> Vec<(Value, Value)> {
    pairs
        .iter()
        .map(|(k, v)| (Value::str(*k), Value::str(*v)))
        .collect()
}

#[tokio::test]
async fn management_reads_the_event_hub_and_its_partitions() -> TestResult {
    let hub = TestHub::start().await?;
    let p = publish(&hub, "mgmt", 3).await?;
    let audience = format!("sb://{HOST}/{ENTITY}");
    let token = eventhub_token(
        &audience,
        &service_key(&hub, "service").await?,
        "service",
        600,
    );

    // Without a claim, the request's own security_token decides.
    let mut c = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    let r = c
        .management(app(&[
            ("operation", "READ"),
            ("type", "com.microsoft:eventhub"),
            ("name", ENTITY),
        ]))
        .await?;
    assert_eq!(status_of(&r)?, 401);
    let r = c
        .management(app(&[
            ("operation", "READ"),
            ("type", "com.microsoft:eventhub"),
            ("name", ENTITY),
            ("security_token", &token),
        ]))
        .await?;
    assert_eq!(status_of(&r)?, 200);
    let Body::Value(v) = &r.body else {
        return Err("no body".into());
    };
    assert_eq!(v.get("name"), Some(&Value::str(ENTITY)));
    assert_eq!(v.get("partition_count"), Some(&Value::Int(4)));
    assert_eq!(
        v.get("partition_ids"),
        Some(&Value::Array(
            (0..4).map(|i| Value::str(i.to_string())).collect()
        ))
    );
    assert!(matches!(v.get("created_at"), Some(Value::Timestamp(_))));

    let read = |partition: String| {
        app(&[
            ("operation", "READ"),
            ("type", "com.microsoft:partition"),
            ("name", ENTITY),
            ("partition", &partition),
            ("security_token", &token),
        ])
    };
    let r = c.management(read(p.to_string())).await?;
    assert_eq!(status_of(&r)?, 200);
    let Body::Value(v) = &r.body else {
        return Err("no body".into());
    };
    assert_eq!(v.get("partition"), Some(&Value::str(p.to_string())));
    assert_eq!(v.get("begin_sequence_number"), Some(&Value::Long(0)));
    assert_eq!(
        v.get("last_enqueued_sequence_number"),
        Some(&Value::Long(2))
    );
    assert_eq!(v.get("last_enqueued_offset"), Some(&Value::str("2")));
    assert!(matches!(v.get("last_enqueued_time_utc"), Some(Value::Timestamp(t)) if *t > 0));
    assert_eq!(v.get("is_partition_empty"), Some(&Value::Bool(false)));
    let empty = (0..4).find(|q| *q != p).ok_or("no other partition")?;
    let r = c.management(read(empty.to_string())).await?;
    let Body::Value(v) = &r.body else {
        return Err("no body".into());
    };
    assert_eq!(v.get("is_partition_empty"), Some(&Value::Bool(true)));
    assert_eq!(
        v.get("last_enqueued_sequence_number"),
        Some(&Value::Long(-1))
    );

    assert_eq!(status_of(&c.management(read("9".into())).await?)?, 404);
    let r = c
        .management(app(&[
            ("operation", "READ"),
            ("type", "com.microsoft:eventhub"),
            ("name", "otherhub"),
            ("security_token", &token),
        ]))
        .await?;
    assert_eq!(status_of(&r)?, 404);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn connections_without_open_are_closed_and_frames_are_bounded() -> TestResult {
    let hub = TestHub::start_with(|cfg| cfg.amqp_open_timeout = Duration::from_millis(500)).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // TLS done, then silence: closed after the open timeout.
    let mut idle = AmqpClient::tls(&hub).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, idle.stream.read(&mut buf))
        .await
        .map_err(|_| "idle connection kept open")?;
    assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, read {n:?}");

    // Headers exchanged, then a frame larger than the server accepts: the connection ends.
    let mut c = AmqpClient::connect(&hub, Sasl::None, 65_536).await?;
    c.stream
        .write_all(&[0x00, 0x10, 0x00, 0x00, 2, 0, 0, 0])
        .await?;
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match c.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "oversized frame did not end the connection");

    // An unknown protocol header is answered with ours and closed.
    let mut odd = AmqpClient::tls(&hub).await?;
    odd.stream.write_all(b"AMQP\x02\x01\x00\x00").await?;
    let mut h = [0u8; 8];
    tokio::time::timeout(WAIT, odd.stream.read_exact(&mut h))
        .await
        .map_err(|_| "no header back")??;
    assert_eq!(&h[..4], b"AMQP");
    assert_ne!(h[4], 2, "TLS-in-AMQP is not offered");

    // A Close is answered with a Close.
    let mut ok = AmqpClient::connect(&hub, Sasl::None, 65_536).await?;
    ok.send(0, Performative::Close(Default::default())).await?;
    assert!(matches!(ok.recv_perf().await?, Performative::Close(_)));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_iot_hub_events_path_redirects_to_the_entity() -> TestResult {
    let hub = TestHub::start().await?;
    let port = hub.server().amqp_addr.port();
    let mut anon = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    assert_eq!(
        refusal(
            &mut anon,
            1,
            &format!("amqps://{HOST}/messages/events/$management")
        )
        .await?,
        Some("amqp:unauthorized-access".into())
    );
    // As the CLI does it: SASL PLAIN with an IoT Hub-style service token.
    let key = service_key(&hub, "service").await?;
    let token = token_for(HOST, &key, 600, Some("service"));
    let mut c = AmqpClient::connect(&hub, Sasl::Plain(&token), 65_536).await?;
    for (rest, handle) in [
        ("/$management", 1),
        ("/ConsumerGroups/$Default/Partitions/0", 2),
    ] {
        let (_, detach) = c
            .attach_receiver(
                handle,
                &format!("amqps://{HOST}/messages/events{rest}"),
                None,
            )
            .await?;
        let err = detach.and_then(|d| d.error).ok_or("no redirect")?;
        assert_eq!(err.condition.0, "amqp:link:redirect");
        let want = format!("amqps://{HOST}:{port}/{ENTITY}{rest}");
        assert_eq!(err.info.get("address"), Some(&Value::str(want)));
        assert_eq!(err.info.get("hostname"), Some(&Value::str(HOST)));
        assert_eq!(err.info.get("network-host"), Some(&Value::str(HOST)));
        assert_eq!(err.info.get("port"), Some(&Value::Int(i32::from(port))));
    }
    // Following the redirect works on the same connection.
    assert_eq!(refusal(&mut c, 3, &address(0)).await?, None);
    hub.stop().await;
    Ok(())
}

fn epoch(n: i64) -> Value {
    Value::Map(vec![(Value::sym("com.microsoft:epoch"), Value::Long(n))])
}

/// Attaches with an epoch; the refusal's condition, if refused.
async fn epoch_refusal(c: &mut AmqpClient, handle: u32, n: i64) -> R<Option<String>> {
    let (_, detach) = c
        .attach_receiver_with(handle, &address(0), None, epoch(n))
        .await?;
    Ok(detach.and_then(|d| d.error).map(|e| e.condition.0))
}

/// The handles detached with `amqp:link:stolen` among the next frames.
async fn stolen_handles(c: &mut AmqpClient, want: usize) -> R<Vec<u32>> {
    let mut handles = Vec::new();
    while handles.len() < want {
        match c.recv_perf_within(WAIT).await? {
            Some((Performative::Detach(d), _)) => {
                assert_eq!(
                    d.error.map(|e| e.condition.0).as_deref(),
                    Some("amqp:link:stolen")
                );
                handles.push(d.handle);
            }
            Some(_) => continue,
            None => return Err(format!("only {handles:?} were detached").into()),
        }
    }
    handles.sort();
    Ok(handles)
}

#[tokio::test]
async fn five_readers_per_partition_and_group_and_epochs_take_over() -> TestResult {
    let hub = TestHub::start().await?;
    let mut c1 = authorized(&hub).await?;
    for h in 1..=5 {
        assert_eq!(refusal(&mut c1, h, &address(0)).await?, None);
    }
    assert_eq!(
        refusal(&mut c1, 6, &address(0)).await?,
        Some("amqp:resource-limit-exceeded".into())
    );
    let other_group = format!("{ENTITY}/ConsumerGroups/other/Partitions/0");
    assert_eq!(refusal(&mut c1, 7, &other_group).await?, None);
    assert_eq!(refusal(&mut c1, 8, &address(1)).await?, None);

    // An epoch reader takes partition 0 of $Default from all five.
    let mut c2 = authorized(&hub).await?;
    assert_eq!(epoch_refusal(&mut c2, 1, 1).await?, None);
    assert_eq!(stolen_handles(&mut c1, 5).await?, vec![1, 2, 3, 4, 5]);
    // While it holds it, neither readers without an epoch nor lower epochs get in.
    let stolen = Some("amqp:link:stolen".to_string());
    assert_eq!(refusal(&mut c1, 9, &address(0)).await?, stolen);
    assert_eq!(epoch_refusal(&mut c1, 10, 0).await?, stolen);
    // A higher epoch takes over in turn.
    assert_eq!(epoch_refusal(&mut c1, 11, 2).await?, None);
    assert_eq!(stolen_handles(&mut c2, 1).await?, vec![1]);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn receivers_are_detached_when_their_token_expires_unless_renewed() -> TestResult {
    let hub = TestHub::start().await?;
    let audience = format!("sb://{HOST}/{ENTITY}");
    let key = service_key(&hub, "service").await?;

    let mut c = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    assert_eq!(
        c.put_token(&eventhub_token(&audience, &key, "service", 2), &audience)
            .await?,
        200
    );
    assert_eq!(refusal(&mut c, 1, &address(0)).await?, None);
    match c.recv_perf_within(WAIT).await? {
        Some((Performative::Detach(d), _)) => {
            assert_eq!(d.handle, 1);
            assert_eq!(
                d.error.map(|e| e.condition.0).as_deref(),
                Some("amqp:unauthorized-access")
            );
        }
        other => return Err(format!("expected the expired link's Detach, got {other:?}").into()),
    }

    // Renewed before it expires: the link stays.
    let mut r = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    assert_eq!(
        r.put_token(&eventhub_token(&audience, &key, "service", 2), &audience)
            .await?,
        200
    );
    assert_eq!(refusal(&mut r, 1, &address(0)).await?, None);
    assert_eq!(
        r.put_token(&eventhub_token(&audience, &key, "service", 600), &audience)
            .await?,
        200
    );
    assert!(
        r.recv_perf_within(Duration::from_secs(3)).await?.is_none(),
        "renewed link was detached"
    );
    hub.stop().await;
    Ok(())
}

/// A link Flow from the client with `drain` set.
async fn drain(c: &mut AmqpClient, handle: u32, delivery_count: u32, credit: u32) -> R<()> {
    c.send(
        0,
        Performative::Flow(ferrohub_amqp::performative::Flow {
            next_incoming_id: Some(0),
            incoming_window: 10_000,
            next_outgoing_id: 0,
            outgoing_window: 10_000,
            handle: Some(handle),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            drain: Some(true),
            ..Default::default()
        }),
    )
    .await
}

/// The deliveries that come before the server's answer to a drain, and that answer.
async fn until_drained(
    c: &mut AmqpClient,
    handle: u32,
) -> R<(Vec<i64>, ferrohub_amqp::performative::Flow)> {
    let mut got = Vec::new();
    let mut payload = Vec::new();
    loop {
        match c.recv_perf_within(WAIT).await? {
            Some((Performative::Transfer(t), bytes)) => {
                assert_eq!(t.handle, handle);
                payload.extend_from_slice(&bytes);
                if !t.more.unwrap_or(false) {
                    got.push(seq(&Message::decode(&std::mem::take(&mut payload))?)?);
                }
            }
            Some((Performative::Flow(f), _)) if f.handle == Some(handle) => return Ok((got, f)),
            other => return Err(format!("expected transfers and a Flow, got {other:?}").into()),
        }
    }
}

#[tokio::test]
async fn a_drain_sends_what_is_there_and_gives_up_the_rest_of_the_credit() -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("drained").await?;
    let (mut dev, _) = hub.connect_device("drained", &key, true).await?;
    for i in 0..3u16 {
        dev.publish_qos1(i + 1, "devices/drained/messages/events/", b"e")
            .await?;
    }
    let p = partition_for("drained", 4);
    let mut c = authorized(&hub).await?;
    let (_, detach) = c
        .attach_receiver(1, &address(p), Some("amqp.annotation.x-opt-offset > '-1'"))
        .await?;
    assert!(detach.is_none());
    c.flow(1, 0, 1).await?;
    let (_, first) = c.recv_delivery_within(WAIT).await?.ok_or("no event")?;
    assert_eq!(seq(&first)?, 0);
    // Ten credits, drained: the two stored events come, then the flow that spends the rest.
    drain(&mut c, 1, 1, 10).await?;
    let (got, f) = until_drained(&mut c, 1).await?;
    assert_eq!(got, [1, 2]);
    assert_eq!(f.drain, Some(true));
    assert_eq!(
        f.delivery_count,
        Some(11),
        "delivery-count advanced over the unused credit"
    );
    assert_eq!(f.link_credit, Some(0));
    // Nothing there: the answer comes at once.
    drain(&mut c, 1, 11, 5).await?;
    let (got, f) = until_drained(&mut c, 1).await?;
    assert!(got.is_empty());
    assert_eq!((f.delivery_count, f.link_credit), (Some(16), Some(0)));
    // No credit left: a new event waits for the next grant, then comes.
    dev.publish_qos1(4, "devices/drained/messages/events/", b"late")
        .await?;
    assert!(
        c.recv_delivery_within(QUIET).await?.is_none(),
        "sent without credit"
    );
    c.flow(1, 16, 1).await?;
    let (_, late) = c
        .recv_delivery_within(WAIT)
        .await?
        .ok_or("the late event")?;
    assert_eq!(seq(&late)?, 3);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn receivers_that_ask_for_runtime_metrics_get_the_partitions_newest_event_with_each(
) -> TestResult {
    let hub = TestHub::start().await?;
    let p = publish(&hub, "metrics", 4).await?;
    let mut c = authorized(&hub).await?;
    c.attach(ferrohub_amqp::performative::Attach {
        name: "metrics".into(),
        handle: 1,
        role: true,
        snd_settle_mode: Some(1),
        rcv_settle_mode: Some(0),
        source: common::amqp::source(&address(p), Some("amqp.annotation.x-opt-offset > '-1'")),
        target: common::amqp::target("t"),
        desired_capabilities: Value::Array(vec![Value::sym(
            "com.microsoft:enable-receiver-runtime-metric",
        )]),
        ..Default::default()
    })
    .await?;
    match c.recv_perf().await? {
        Performative::Attach(a) => assert!(
            format!("{:?}", a.offered_capabilities).contains("enable-receiver-runtime-metric"),
            "offered back: {:?}",
            a.offered_capabilities
        ),
        other => return Err(format!("expected Attach, got {other:?}").into()),
    }
    c.flow(1, 0, 1).await?;
    let (_, m) = c.recv_delivery_within(WAIT).await?.ok_or("no event")?;
    assert_eq!(seq(&m)?, 0);
    let da = |k: &str| {
        m.delivery_annotations
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(da("last_enqueued_sequence_number"), Some(Value::Long(3)));
    assert_eq!(da("last_enqueued_offset"), Some(Value::str("3")));
    assert!(matches!(da("last_enqueued_time_utc"), Some(Value::Timestamp(t)) if t > 0));
    assert!(matches!(da("runtime_info_retrieval_time_utc"), Some(Value::Timestamp(t)) if t > 0));

    // Without the capability, no delivery annotations.
    let (_, detach) = c
        .attach_receiver(2, &address(p), Some("amqp.annotation.x-opt-offset > '-1'"))
        .await?;
    assert!(detach.is_none());
    c.flow(2, 0, 1).await?;
    let (_, plain) = c.recv_delivery_within(WAIT).await?.ok_or("no event")?;
    assert!(plain.delivery_annotations.is_empty());
    hub.stop().await;
    Ok(())
}
