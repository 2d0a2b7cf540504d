//! Service-side C2D over AMQP on a real hub, with a raw AMQP client on the project's codec:
//! sends to `messages/devicebound` (Accepted only once stored, Rejected with IoT Hub's error,
//! the link surviving a refusal), delivery to an MQTT device in send order with the
//! properties, and the feedback receiver (accept completes, release and detach give the
//! batch back at once).

mod common;

use std::time::Duration;

use common::amqp::{service_key, source, target, AmqpClient, Sasl};
use common::*;
use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::performative::{AmqpError, Attach, Disposition, Symbol};
use ferrohub_amqp::{Message, Performative, Value};
use ferrohub_mqtt::{Packet, QoS};

const SENDER: u32 = 1;
const FEEDBACK: u32 = 2;
/// How long a test waits to be sure nothing more comes.
const QUIET: Duration = Duration::from_millis(300);

/// A connection holding a `service` token the way the IoT Hub service SDKs put it: audience
/// the host name, signed with the base64-decoded key.
async fn service_client(hub: &TestHub) -> R<AmqpClient> {
    let key = service_key(hub, "service").await?;
    let mut c = AmqpClient::connect(hub, Sasl::Anonymous, 65_536).await?;
    assert_eq!(
        c.put_token(&token_for(HOST, &key, 600, Some("service")), HOST)
            .await?,
        200
    );
    Ok(c)
}

async fn open_sender(c: &mut AmqpClient) -> R<u32> {
    let (_, credit) = c
        .attach_sender(SENDER, &format!("amqps://{HOST}/messages/devicebound"))
        .await?;
    credit.map_err(|d| format!("sender refused: {d:?}").into())
}

fn c2d(to: &str, id: &str, body: &[u8]) -> Message {
    Message {
        properties: Some(Properties {
            message_id: Value::str(id),
            to: Some(to.into()),
            ..Default::default()
        }),
        body: Body::Data(vec![body.to_vec()]),
        ..Default::default()
    }
}

fn to(device: &str) -> String {
    format!("/devices/{device}/messages/devicebound")
}

/// A disposition's outcome: its descriptor code and, when rejected, the error.
fn outcome(d: &Disposition) -> R<(u64, Option<AmqpError>)> {
    let Value::Described(code, fields) = &d.state else {
        return Err(format!("no outcome in {d:?}").into());
    };
    let code = code.as_u64().ok_or("outcome descriptor")?;
    let error = match fields.as_ref() {
        Value::List(f) if code == 0x25 => match f.first() {
            Some(e) => Some(AmqpError::from_value(e)?),
            None => None,
        },
        _ => None,
    };
    Ok((code, error))
}

/// Sends `m` as delivery `id` and returns how the hub settled it.
async fn send(c: &mut AmqpClient, id: u32, m: &Message) -> R<(u64, Option<AmqpError>)> {
    c.send_message(SENDER, id, m, false).await?;
    let d = c
        .recv_disposition_within(WAIT)
        .await?
        .ok_or("no disposition")?;
    assert!(d.role, "settled by the receiver (the hub)");
    assert_eq!(d.first, id);
    assert_eq!(d.settled, Some(true));
    outcome(&d)
}

async fn rejected_with(c: &mut AmqpClient, id: u32, m: &Message) -> R<AmqpError> {
    match send(c, id, m).await? {
        (0x25, Some(e)) => Ok(e),
        other => Err(format!("expected Rejected, got {other:?}").into()),
    }
}

/// Attaches the feedback receiver (deliveries unsettled, so the client settles them) and
/// gives it credit.
async fn open_feedback(c: &mut AmqpClient, handle: u32, credit: u32) -> R<()> {
    c.attach(Attach {
        name: format!("feedback-{handle}"),
        handle,
        role: true,
        snd_settle_mode: Some(0),
        rcv_settle_mode: Some(0),
        source: source("/messages/serviceBound/feedback", None),
        target: target("test-feedback"),
        ..Default::default()
    })
    .await?;
    match c.recv_perf().await? {
        Performative::Attach(a) => assert_eq!(a.handle, handle),
        other => return Err(format!("expected Attach, got {other:?}").into()),
    }
    c.flow(handle, 0, credit).await
}

/// The next feedback delivery: its delivery id and its records.
async fn feedback(c: &mut AmqpClient, wait: Duration) -> R<Option<(u32, serde_json::Value)>> {
    let Some((t, m)) = c.recv_delivery_within(wait).await? else {
        return Ok(None);
    };
    let p = m.properties.as_ref().ok_or("no properties")?;
    assert_eq!(
        p.content_type.as_ref().map(|s| s.0.as_str()),
        Some("application/vnd.microsoft.iothub.feedback.json")
    );
    assert_eq!(
        p.user_id.as_deref(),
        Some(&b"localhost"[..]),
        "user-id: the hub name"
    );
    let Body::Data(sections) = &m.body else {
        return Err("feedback body is not data".into());
    };
    let records: serde_json::Value = serde_json::from_slice(&sections.concat())?;
    Ok(Some((t.delivery_id.ok_or("no delivery id")?, records)))
}

async fn settle(c: &mut AmqpClient, id: u32, outcome: u64) -> R<()> {
    c.send(
        0,
        Performative::Disposition(Disposition {
            role: true,
            first: id,
            last: Some(id),
            settled: Some(true),
            state: Value::described(outcome, Value::List(vec![])),
            batchable: Some(false),
        }),
    )
    .await
}

#[tokio::test]
async fn a_send_is_accepted_once_stored_and_reaches_the_device_in_order_with_its_properties(
) -> TestResult {
    let hub = TestHub::start().await?;
    let (key, _) = hub.create_device("dev1").await?;
    let mut c = service_client(&hub).await?;
    assert_eq!(open_sender(&mut c).await?, 100);

    let mut first = c2d(&to("dev1"), "m0", b"hello");
    if let Some(p) = first.properties.as_mut() {
        p.correlation_id = Value::str("c0");
        p.content_type = Some(Symbol("application/json".into()));
        p.content_encoding = Some(Symbol("utf-8".into()));
        p.absolute_expiry_time = Value::Timestamp(now() as i64 * 1000 + 600_000);
    }
    first.application_properties = vec![
        (Value::str("iothub-ack"), Value::str("full")),
        (Value::str("k"), Value::str("v")),
    ];
    c.send_message(SENDER, 0, &first, false).await?;
    // Four more, pipelined without waiting: they must still queue in the order sent.
    for i in 1..5u32 {
        let m = c2d(&to("dev1"), &format!("m{i}"), format!("n{i}").as_bytes());
        c.send_message(SENDER, i, &m, false).await?;
    }
    let mut settled = Vec::new();
    while settled.len() < 5 {
        let d = c
            .recv_disposition_within(WAIT)
            .await?
            .ok_or("missing dispositions")?;
        assert_eq!(outcome(&d)?.0, 0x24, "accepted: {d:?}");
        settled.push(d.first);
    }
    settled.sort_unstable();
    assert_eq!(settled, [0, 1, 2, 3, 4]);
    // Accepted means queued on disk: the registry counts them before any device connects.
    let d = hub.api.get("/devices/dev1").await?;
    assert_eq!(d["cloudToDeviceMessageCount"], 5);

    let (mut dev, _) = hub.connect_device("dev1", &key, true).await?;
    dev.subscribe(
        1,
        &[("devices/dev1/messages/devicebound/#", QoS::AtLeastOnce)],
    )
    .await?;
    let mut got = Vec::new();
    for _ in 0..5 {
        let p = recv_publish(&mut dev, WAIT)
            .await?
            .ok_or("message not delivered")?;
        dev.send(&Packet::PubAck(p.packet_id)).await?;
        got.push((p.topic.clone(), p.payload.to_vec()));
    }
    let (topic, payload) = &got[0];
    assert_eq!(payload, b"hello");
    for want in [
        "%24.mid=m0",
        "%24.cid=c0",
        "%24.ct=application%2Fjson",
        "%24.ce=utf-8",
        "iothub-ack=full",
        "k=v",
    ] {
        assert!(topic.contains(want), "{want} missing from {topic}");
    }
    let order: Vec<&[u8]> = got[1..].iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(order, [&b"n1"[..], b"n2", b"n3", b"n4"]);

    // m0 asked for full feedback; the device completed it.
    open_feedback(&mut c, FEEDBACK, 5).await?;
    let (id, records) = feedback(&mut c, WAIT)
        .await?
        .ok_or("no feedback delivered")?;
    let r = &records[0];
    assert_eq!(records.as_array().map(Vec::len), Some(1), "{records}");
    assert_eq!(r["originalMessageId"], "m0");
    assert_eq!(r["statusCode"], "Success");
    assert_eq!(r["deviceId"], "dev1");
    assert!(r["deviceGenerationId"].is_string() && r["enqueuedTimeUtc"].is_string());
    settle(&mut c, id, 0x24).await?;

    // Live: feedback produced while the receiver waits arrives without polling.
    let mut m = c2d(&to("dev1"), "live", b"x");
    m.application_properties = vec![(Value::str("iothub-ack"), Value::str("positive"))];
    assert_eq!(send(&mut c, 5, &m).await?.0, 0x24);
    let p = recv_publish(&mut dev, WAIT)
        .await?
        .ok_or("no live message")?;
    dev.send(&Packet::PubAck(p.packet_id)).await?;
    let (id, records) = feedback(&mut c, Duration::from_secs(2))
        .await?
        .ok_or("live feedback did not arrive")?;
    assert_eq!(records[0]["originalMessageId"], "live");
    settle(&mut c, id, 0x24).await?;
    assert!(feedback(&mut c, QUIET).await?.is_none());
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn refusals_are_rejected_with_the_iot_hub_error_and_the_link_goes_on() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    hub.create_module("dev1", "m1").await?;
    let mut c = service_client(&hub).await?;
    open_sender(&mut c).await?;

    let e = rejected_with(&mut c, 0, &c2d(&to("nobody"), "a", b"x")).await?;
    assert_eq!(e.condition.0, "amqp:not-found");
    assert!(
        e.description
            .as_deref()
            .unwrap_or_default()
            .contains("404001 DeviceNotFound"),
        "{e:?}"
    );
    let e = rejected_with(&mut c, 1, &c2d("/devices/dev1/events", "b", b"x")).await?;
    assert_eq!(e.condition.0, "amqp:invalid-field");
    assert!(e
        .description
        .as_deref()
        .unwrap_or_default()
        .contains("ArgumentInvalid"));
    let mut bad_ack = c2d(&to("dev1"), "c", b"x");
    bad_ack.application_properties = vec![(Value::str("iothub-ack"), Value::str("sometimes"))];
    let e = rejected_with(&mut c, 2, &bad_ack).await?;
    assert_eq!(e.condition.0, "amqp:invalid-field");
    // Over IoT Hub's 64 KB, in several frames.
    let big = c2d(&to("dev1"), "d", &vec![b'x'; 70 * 1024]);
    let e = rejected_with(&mut c, 3, &big).await?;
    assert_eq!(e.condition.0, "amqp:link:message-size-exceeded");
    assert!(e
        .description
        .as_deref()
        .unwrap_or_default()
        .contains("MessageTooLarge"));
    // Past what the link assembles at all: refused the same way, the connection intact.
    let huge = c2d(&to("dev1"), "e", &vec![b'x'; 300 * 1024]);
    let e = rejected_with(&mut c, 4, &huge).await?;
    assert_eq!(e.condition.0, "amqp:link:message-size-exceeded");
    // Not a message at all.
    c.send_message(SENDER, 5, &Message::default(), false)
        .await?;
    let d = c
        .recv_disposition_within(WAIT)
        .await?
        .ok_or("no disposition")?;
    assert_eq!(outcome(&d)?.0, 0x25);

    // The queue limit: 50 are accepted, the 51st refused with the code Node maps to
    // DeviceMaximumQueueDepthExceededError.
    for i in 0..50u32 {
        let m = c2d(&to("dev1"), &format!("q{i}"), b"q");
        assert_eq!(send(&mut c, 10 + i, &m).await?.0, 0x24, "message {i}");
    }
    let e = rejected_with(&mut c, 60, &c2d(&to("dev1"), "q50", b"q")).await?;
    assert_eq!(e.condition.0, "amqp:resource-limit-exceeded");
    assert!(
        e.description
            .as_deref()
            .unwrap_or_default()
            .contains("403004 DeviceMaximumQueueDepthExceeded"),
        "{e:?}"
    );
    // Credit keeps coming after all that (more than the first 100 deliveries), and modules
    // are addressed by their own path.
    let m = c2d("/devices/dev1/modules/m1/messages/devicebound", "mod", b"m");
    assert_eq!(send(&mut c, 61, &m).await?.0, 0x24);
    for i in 62..120u32 {
        let m = c2d("/devices/dev1/modules/m1/messages/devicebound", "x", b"m");
        let (code, e) = send(&mut c, i, &m).await?;
        assert!(code == 0x24 || e.is_some_and(|e| e.condition.0 == "amqp:resource-limit-exceeded"));
    }
    let d = hub.api.get("/devices/dev1/modules/m1").await?;
    assert_eq!(d["cloudToDeviceMessageCount"], 50);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn feedback_released_or_left_unsettled_comes_back_and_accepted_feedback_does_not(
) -> TestResult {
    let hub = TestHub::start_with(|cfg| cfg.hub.c2d.feedback_lock = Duration::from_secs(1)).await?;
    hub.create_device("dev1").await?;
    let mut c = service_client(&hub).await?;
    open_sender(&mut c).await?;
    let mut m = c2d(&to("dev1"), "purged", b"x");
    m.application_properties = vec![(Value::str("iothub-ack"), Value::str("negative"))];
    assert_eq!(send(&mut c, 0, &m).await?.0, 0x24);
    hub.api.delete("/devices/dev1/commands", None).await?;

    open_feedback(&mut c, FEEDBACK, 10).await?;
    let (id, records) = feedback(&mut c, WAIT).await?.ok_or("no feedback")?;
    assert_eq!(records[0]["originalMessageId"], "purged");
    assert_eq!(records[0]["statusCode"], "Purged");
    // Released: offered again at once, on the same link.
    settle(&mut c, id, 0x26).await?;
    let (_, again) = feedback(&mut c, WAIT)
        .await?
        .ok_or("released feedback lost")?;
    assert_eq!(again, records);
    // Left unsettled when the link goes: offered to the next receiver at once.
    c.detach(FEEDBACK).await?;
    open_feedback(&mut c, FEEDBACK + 1, 10).await?;
    let (_, again) = feedback(&mut c, WAIT)
        .await?
        .ok_or("unsettled feedback lost")?;
    assert_eq!(again, records);
    // The same when the whole connection goes.
    drop(c);
    let mut c = service_client(&hub).await?;
    open_feedback(&mut c, FEEDBACK, 10).await?;
    let (id, again) = feedback(&mut c, WAIT)
        .await?
        .ok_or("feedback lost with its connection")?;
    assert_eq!(again, records);
    // Accepted: completed, so not even the lapse of its lock brings it back.
    settle(&mut c, id, 0x24).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the 1 s lock, on purpose
    assert!(hub
        .api
        .get_with_header("/messages/serviceBound/feedback", "iothub-locktoken")
        .await?
        .is_none());
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn c2d_links_need_service_connect_and_close_when_their_token_expires() -> TestResult {
    let hub = TestHub::start().await?;
    hub.create_device("dev1").await?;
    let unauthorized = "amqp:unauthorized-access";
    let address = format!("amqps://{HOST}/messages/devicebound");

    let mut c = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    let (_, r) = c.attach_sender(SENDER, &address).await?;
    let d = r.err().ok_or("a sender without a token was attached")?;
    assert_eq!(
        d.error.map(|e| e.condition.0).as_deref(),
        Some(unauthorized)
    );
    // A genuine token of a policy without ServiceConnect.
    let rr = service_key(&hub, "registryRead").await?;
    assert_eq!(
        c.put_token(&token_for(HOST, &rr, 600, Some("registryRead")), HOST)
            .await?,
        200
    );
    let (_, r) = c.attach_sender(SENDER + 10, &address).await?;
    assert!(r.is_err(), "registryRead opened a C2D sender");
    c.attach(Attach {
        name: "fb".into(),
        handle: 30,
        role: true,
        source: source("/messages/servicebound/feedback", None),
        target: target("t"),
        ..Default::default()
    })
    .await?;
    assert!(matches!(c.recv_perf().await?, Performative::Attach(_)));
    match c.recv_perf().await? {
        Performative::Detach(d) => {
            assert_eq!(
                d.error.map(|e| e.condition.0).as_deref(),
                Some(unauthorized)
            )
        }
        other => return Err(format!("expected Detach, got {other:?}").into()),
    }

    // A token that lapses: every service link goes with it, the connection stays.
    let key = service_key(&hub, "service").await?;
    let mut c = AmqpClient::connect(&hub, Sasl::Anonymous, 65_536).await?;
    assert_eq!(
        c.put_token(&token_for(HOST, &key, 2, Some("service")), HOST)
            .await?,
        200
    );
    open_sender(&mut c).await?;
    open_feedback(&mut c, FEEDBACK, 1).await?;
    c.attach(Attach {
        name: "files".into(),
        handle: 3,
        role: true,
        source: source("/messages/serviceBound/filenotifications", None),
        target: target("t"),
        ..Default::default()
    })
    .await?;
    assert!(matches!(c.recv_perf().await?, Performative::Attach(_)));
    let mut detached = Vec::new();
    while detached.len() < 3 {
        match c.recv_perf_within(Duration::from_secs(5)).await? {
            Some((Performative::Detach(d), _)) => {
                assert_eq!(
                    d.error.map(|e| e.condition.0).as_deref(),
                    Some(unauthorized)
                );
                detached.push(d.handle);
            }
            Some((Performative::Flow(_), _)) => {}
            other => {
                return Err(format!("expected the expired links' Detach, got {other:?}").into())
            }
        }
    }
    detached.sort_unstable();
    assert_eq!(detached, [SENDER, FEEDBACK, 3]);
    // A renewed token opens them again on the same connection.
    assert_eq!(
        c.put_token(&token_for(HOST, &key, 600, Some("service")), HOST)
            .await?,
        200
    );
    c.attach_sender(SENDER + 20, &address)
        .await?
        .1
        .map_err(|d| format!("refused after renewal: {d:?}"))?;
    hub.stop().await;
    Ok(())
}
