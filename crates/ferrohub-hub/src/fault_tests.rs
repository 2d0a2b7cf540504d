//! Failpoint tests: the hub over a store and a telemetry log whose syncs fail. Nothing is
//! acknowledged that was not stored, reads go on, and the hub works again once the disk does.

use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_mqtt::{Publish, QoS};
use ferrohub_store::IfMatch;

use crate::testing::{connect, fixture, R};
use crate::{c2d::SendRequest, HubError, PublishOutcome};

fn telemetry(n: u32) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: format!("devices/d1/messages/events/n={n}"),
        packet_id: 1,
        payload: Bytes::from_static(b"{}"),
    }
}

/// What the device would hear: `Ok` for a PUBACK, the hub's error otherwise.
async fn publish(
    f: &crate::testing::Fixture,
    client: &crate::HubClient,
    n: u32,
) -> Result<(), HubError> {
    match f.hub.device_publish(client, telemetry(n)).await {
        PublishOutcome::Accept => Ok(()),
        PublishOutcome::AcceptWhen(done) => done.await,
        PublishOutcome::Fail(e) => Err(e),
        PublishOutcome::Reject(why) => panic!("a valid message was rejected: {why}"),
    }
}

#[tokio::test]
async fn failed_syncs_acknowledge_nothing_keep_reads_and_pass_when_the_disk_works_again() -> R {
    let f = fixture()?;
    f.hub.put_device("d1", Default::default(), None).await?;
    let id = Identity::device("d1");
    let (client, mut pushed) = connect(&f.hub, "d1", &["$iothub/twin/res/#"]).await;
    publish(&f, &client, 1).await?;

    f.store.fail_writes.store(true, SeqCst);
    f.telemetry.fail_syncs.store(true, SeqCst);
    let e = publish(&f, &client, 2)
        .await
        .err()
        .ok_or("telemetry acknowledged")?;
    assert_eq!(e.code(), ErrorCode::ServerError);
    let e = f
        .hub
        .c2d_send(&id, SendRequest::default())
        .await
        .err()
        .ok_or("C2D sent")?;
    assert_eq!(e.code(), ErrorCode::ServerError);
    let e = f
        .hub
        .update_twin(
            &id,
            serde_json::json!({"tags": {"t": 1}}),
            false,
            IfMatch::Any,
        )
        .await
        .err()
        .ok_or("twin updated")?;
    assert_eq!(e.code(), ErrorCode::ServerError);
    let e = f
        .hub
        .put_device("d2", Default::default(), None)
        .await
        .err()
        .ok_or("d2 created")?;
    assert_eq!(e.code(), ErrorCode::ServerError);
    // A device's reported patch is answered 500, not 204.
    f.hub.device_twin_patch(&client, "r1", br#"{"a":1}"#).await;
    let answer = pushed.recv().await.ok_or("no twin answer")?;
    assert!(
        answer.topic.starts_with("$iothub/twin/res/500/?$rid=r1"),
        "{}",
        answer.topic
    );
    // Reads go on.
    f.hub.device("d1").await?;
    let twin = f.hub.get_twin(&id).await?;
    assert!(twin["tags"].get("t").is_none(), "{twin}");

    f.store.fail_writes.store(false, SeqCst);
    f.telemetry.fail_syncs.store(false, SeqCst);
    publish(&f, &client, 3).await?;
    f.hub.c2d_send(&id, SendRequest::default()).await?;
    f.hub
        .update_twin(
            &id,
            serde_json::json!({"tags": {"t": 2}}),
            false,
            IfMatch::Any,
        )
        .await?;
    f.hub.put_device("d2", Default::default(), None).await?;
    f.hub.device_twin_patch(&client, "r2", br#"{"a":2}"#).await;
    let answer = pushed.recv().await.ok_or("no twin answer")?;
    assert!(
        answer.topic.starts_with("$iothub/twin/res/204/?$rid=r2"),
        "{}",
        answer.topic
    );

    // The log holds exactly the acknowledged messages, in order.
    use ferrohub_store::telemetry::TelemetryLog;
    let events = f.telemetry.read(0, 0, 10).await?;
    let ns: Vec<&str> = events
        .iter()
        .filter_map(|e| {
            e.event
                .properties
                .iter()
                .find(|p| p.0 == "n")
                .and_then(|p| p.1.as_deref())
        })
        .collect();
    assert_eq!(ns, ["1", "3"]);
    let twin = f.hub.get_twin(&id).await?;
    assert_eq!(twin["tags"]["t"], 2, "{twin}");
    assert_eq!(twin["properties"]["reported"]["a"], 2, "{twin}");
    Ok(())
}
