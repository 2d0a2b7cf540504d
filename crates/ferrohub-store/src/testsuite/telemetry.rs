//! Telemetry log tests: ordered appends per partition, start positions, checkpoints and
//! retention.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::telemetry::{NewEvent, Retention, StartPosition, TelemetryLog};
use crate::{Result, StoreError};

use super::ms;

/// A telemetry event from `device` enqueued at `t` ms with `body`.
pub fn ev(device: &str, t: i64, body: &[u8]) -> NewEvent {
    NewEvent {
        device_id: device.into(),
        module_id: None,
        enqueued_ms: t,
        system_properties: BTreeMap::from([("message-id".to_string(), "m".to_string())]),
        properties: vec![("k".into(), Some("v".into())), ("n".into(), None)],
        body: body.to_vec(),
    }
}

async fn wait_changed(commits: &mut tokio::sync::watch::Receiver<u64>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(5), commits.changed())
        .await
        .map_err(|_| StoreError::Task("no commit was signalled".into()))?
        .map_err(|_| StoreError::Task("the commit watch closed".into()))?;
    commits.borrow_and_update();
    Ok(())
}

pub async fn appends_are_ordered_per_partition<L: TelemetryLog>(log: &L) -> Result<()> {
    assert_eq!(log.partition_count(), 4);
    let p = log.partition_of("dev1");
    assert_eq!(p, crate::telemetry::partition_for("dev1", 4));
    let mut commits = log.watch_commits();
    let mut pending = Vec::new();
    for i in 0..200u32 {
        pending.push(log.enqueue(ev("dev1", 1000, &i.to_be_bytes())).await?);
    }
    let mut seqs = Vec::new();
    for durable in pending {
        let (part, seq) = durable.await?;
        assert_eq!(part, p);
        seqs.push(seq);
    }
    assert_eq!(seqs, (0..200).collect::<Vec<u64>>(), "in enqueue order");
    // The watch may change just after the appends are answered, not necessarily before.
    wait_changed(&mut commits).await?;
    let all = log.read(p, 0, 1000).await?;
    assert_eq!(all.len(), 200);
    for (i, rec) in all.iter().enumerate() {
        assert_eq!((rec.partition, rec.sequence), (p, i as u64));
        assert_eq!(rec.event, ev("dev1", 1000, &(i as u32).to_be_bytes()));
    }
    let some: Vec<u64> = log
        .read(p, 150, 10)
        .await?
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(some, (150..160).collect::<Vec<_>>());
    assert!(log.read(p, 200, 10).await?.is_empty());
    assert!(log.read((p + 1) % 4, 0, 10).await?.is_empty());
    log.append(ev("dev1", 1000, b"x")).await?;
    wait_changed(&mut commits).await?;
    Ok(())
}

pub async fn positions_resolve_and_checkpoints_are_kept<L: TelemetryLog>(log: &L) -> Result<()> {
    for t in [10, 20, 30] {
        log.append(ev("d", t, b"x")).await?;
    }
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 0);
    assert_eq!(log.resolve(0, StartPosition::End).await?, 3);
    assert_eq!(log.resolve(0, StartPosition::EnqueuedAt(15)).await?, 1);
    assert_eq!(log.resolve(0, StartPosition::EnqueuedAt(99)).await?, 3);
    assert_eq!(log.resolve(0, StartPosition::Sequence(2)).await?, 2);
    log.save_checkpoint("g1", 0, 2).await?;
    assert_eq!(log.checkpoints("g1").await?.get(&0), Some(&2));
    assert!(log.checkpoints("g2").await?.is_empty());
    Ok(())
}

pub async fn retention_removes_old_messages_but_never_reuses_sequences<L: TelemetryLog>(
    log: &L,
) -> Result<()> {
    for t in [10, 20, 30, 40] {
        log.append(ev("d", t, b"x")).await?;
    }
    let r = Retention {
        max_age_ms: 15,
        max_bytes: u64::MAX,
    };
    assert_eq!(log.enforce_retention(r, ms(40)).await?, 2);
    let left: Vec<u64> = log
        .read(0, 0, 10)
        .await?
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(left, vec![2, 3]);
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 2);
    assert_eq!(log.resolve(0, StartPosition::Sequence(0)).await?, 0);
    let everything = Retention {
        max_age_ms: 0,
        max_bytes: u64::MAX,
    };
    assert_eq!(log.enforce_retention(everything, ms(1000)).await?, 2);
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 4);
    assert_eq!(log.append(ev("d", 50, b"x")).await?.1, 4);
    Ok(())
}
