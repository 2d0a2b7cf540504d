//! The engine-neutral telemetry suite on [`SegmentLog`], and what is the segment log's own:
//! recovery of torn and corrupt tails, segments, retention by whole segments, reopening, a
//! failing disk, concurrency and the custom endpoint streams.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferrohub_store::telemetry::{Retention, StartPosition, TelemetryLog};
use ferrohub_store::testsuite::ev;
use ferrohub_store::{Result, StoreError, StreamEngine, Timestamp};

use crate::{Options, SegmentLog, SegmentStreams};

fn open_fresh(partitions: u32) -> Result<(SegmentLog, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), partitions)?;
    Ok((log, dir))
}

mod suite {
    ferrohub_store::telemetry_suite!(super::open_fresh);
}

fn small() -> Options {
    Options {
        segment_bytes: 1024,
        index_every: 4,
    }
}

fn segments(dir: &Path, partition: u32) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join(format!("p{partition}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    Ok(out)
}

async fn seqs(log: &SegmentLog, p: u32, from: u64) -> Result<Vec<u64>> {
    Ok(log
        .read(p, from, 100_000)
        .await?
        .iter()
        .map(|r| r.sequence)
        .collect())
}

fn body(i: u64) -> Vec<u8> {
    format!("message {i} {}", "x".repeat((i % 7) as usize * 10)).into_bytes()
}

async fn fill(log: &SegmentLog, from: u64, to: u64) -> Result<()> {
    for i in from..to {
        let (_, seq) = log.append(ev("d", i as i64 * 10, &body(i))).await?;
        assert_eq!(seq, i);
    }
    Ok(())
}

async fn assert_all(log: &SegmentLog, from: u64, to: u64) -> Result<()> {
    let all = log.read(0, from, 100_000).await?;
    assert_eq!(
        all.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        (from..to).collect::<Vec<_>>()
    );
    for r in all {
        assert_eq!(r.event, ev("d", r.sequence as i64 * 10, &body(r.sequence)));
    }
    Ok(())
}

#[tokio::test]
async fn reopen_keeps_records_sequences_checkpoints_and_partition_count() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), 1)?;
    fill(&log, 0, 50).await?;
    log.save_checkpoint("g", 0, 17).await?;
    log.save_checkpoint("other", 0, 3).await?;
    drop(log);
    let log = SegmentLog::open(dir.path(), 8)?;
    assert_eq!(log.partition_count(), 1, "fixed at creation");
    assert_all(&log, 0, 50).await?;
    assert_eq!(log.checkpoints("g").await?, BTreeMap::from([(0, 17)]));
    assert_eq!(log.checkpoints("other").await?, BTreeMap::from([(0, 3)]));
    fill(&log, 50, 60).await?;
    assert_all(&log, 0, 60).await
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_sequences_continue_after_the_last_good_record() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), 1)?;
    fill(&log, 0, 10).await?;
    drop(log);
    let seg = segments(dir.path(), 0)?.pop().ok_or(StoreError::NotFound)?;
    let good = std::fs::metadata(&seg)?.len();
    // Half of a real record, as a crash in the middle of a write leaves it.
    let mut rec = Vec::new();
    crate::record::encode(&mut rec, 10, &ev("d", 100, b"torn"));
    let mut bytes = std::fs::read(&seg)?;
    bytes.extend_from_slice(&rec[..rec.len() / 2]);
    std::fs::write(&seg, &bytes)?;
    let log = SegmentLog::open(dir.path(), 1)?;
    assert_eq!(std::fs::metadata(&seg)?.len(), good, "tail truncated");
    assert_all(&log, 0, 10).await?;
    fill(&log, 10, 12).await?;
    drop(log);
    // Garbage after the records.
    let good = std::fs::metadata(&seg)?.len();
    let mut bytes = std::fs::read(&seg)?;
    bytes.extend_from_slice(&[0xAB; 37]);
    std::fs::write(&seg, &bytes)?;
    let log = SegmentLog::open(dir.path(), 1)?;
    assert_eq!(std::fs::metadata(&seg)?.len(), good);
    assert_all(&log, 0, 12).await
}

#[tokio::test]
async fn a_checksum_failure_inside_the_last_segment_cuts_it_there() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), 1)?;
    fill(&log, 0, 10).await?;
    drop(log);
    let seg = segments(dir.path(), 0)?.pop().ok_or(StoreError::NotFound)?;
    let mut bytes = std::fs::read(&seg)?;
    // Find where record 6 starts by encoding the first six again.
    let mut prefix = Vec::new();
    for i in 0..6u64 {
        crate::record::encode(&mut prefix, i, &ev("d", i as i64 * 10, &body(i)));
    }
    assert_eq!(&bytes[..prefix.len()], &prefix[..]);
    let last = bytes.len() - 1;
    bytes[prefix.len() + 20] ^= 0xFF;
    bytes[last] ^= 0x01;
    std::fs::write(&seg, &bytes)?;
    let log = SegmentLog::open(dir.path(), 1)?;
    assert_eq!(std::fs::metadata(&seg)?.len(), prefix.len() as u64);
    assert_all(&log, 0, 6).await?;
    fill(&log, 6, 8).await?;
    assert_all(&log, 0, 8).await
}

#[tokio::test]
async fn segments_roll_and_reads_cross_them_from_any_position() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open_with(dir.path(), 1, small())?;
    fill(&log, 0, 200).await?;
    let files = segments(dir.path(), 0)?;
    assert!(files.len() > 5, "rolled into {} segments", files.len());
    // Each segment is named after its first record.
    for f in &files {
        let first: u64 = f
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .ok_or(StoreError::NotFound)?;
        assert_eq!(seqs(&log, 0, first).await?.first(), Some(&first));
    }
    for from in [0, 1, 3, 4, 5, 63, 64, 65, 127, 199] {
        assert_all(&log, from, 200).await?;
        let some = seqs(&log, 0, from).await?;
        assert_eq!(some.first(), Some(&from));
    }
    let page: Vec<u64> = log
        .read(0, 10, 25)
        .await?
        .iter()
        .map(|r| r.sequence)
        .collect();
    assert_eq!(page, (10..35).collect::<Vec<_>>());
    assert_eq!(log.resolve(0, StartPosition::EnqueuedAt(995)).await?, 100);
    assert_eq!(log.resolve(0, StartPosition::EnqueuedAt(1000)).await?, 100);
    assert_eq!(
        log.resolve(0, StartPosition::EnqueuedAt(10_000)).await?,
        200
    );
    drop(log);
    let log = SegmentLog::open_with(dir.path(), 1, small())?;
    assert_all(&log, 0, 200).await?;
    fill(&log, 200, 210).await?;
    assert_all(&log, 150, 210).await
}

#[tokio::test]
async fn retention_deletes_whole_segments_and_sequences_continue() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open_with(dir.path(), 1, small())?;
    fill(&log, 0, 200).await?;
    let before = segments(dir.path(), 0)?;
    // Everything enqueued before t=1000 (sequences below 100) expires.
    let age = Retention {
        max_age_ms: 1000,
        max_bytes: u64::MAX,
    };
    assert_eq!(
        log.enforce_retention(age, Timestamp::from_unix_ms(2000))
            .await?,
        100
    );
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 100);
    assert_eq!(seqs(&log, 0, 0).await?, (100..200).collect::<Vec<_>>());
    let after = segments(dir.path(), 0)?;
    assert!(after.len() < before.len(), "whole segments went");
    let first_left: u64 = after[0]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .ok_or(StoreError::NotFound)?;
    assert!(first_left <= 100, "no unexpired record was deleted");
    assert_eq!(
        log.enforce_retention(age, Timestamp::from_unix_ms(2000))
            .await?,
        0
    );
    // Size: a budget of about two segments keeps only the newest ones.
    let removed = log
        .enforce_retention(
            Retention {
                max_age_ms: i64::MAX / 2,
                max_bytes: 2048,
            },
            Timestamp::from_unix_ms(2000),
        )
        .await?;
    assert!(removed > 0);
    let total: u64 = segments(dir.path(), 0)?
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(total <= 2048 + 1024, "size budget kept: {total} bytes");
    let start = log.resolve(0, StartPosition::Start).await?;
    assert_eq!(seqs(&log, 0, 0).await?, (start..200).collect::<Vec<_>>());
    // Everything, including the active segment, which is rolled first.
    let all = Retention {
        max_age_ms: 0,
        max_bytes: u64::MAX,
    };
    assert_eq!(
        log.enforce_retention(all, Timestamp::from_unix_ms(1_000_000))
            .await?,
        200 - start
    );
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 200);
    assert!(seqs(&log, 0, 0).await?.is_empty());
    assert_eq!(
        segments(dir.path(), 0)?.len(),
        1,
        "only the empty successor"
    );
    drop(log);
    let log = SegmentLog::open_with(dir.path(), 1, small())?;
    assert_eq!(log.resolve(0, StartPosition::Start).await?, 200);
    fill(&log, 200, 205).await?;
    assert_all(&log, 200, 205).await
}

#[tokio::test]
async fn a_failed_sync_fails_its_batch_and_the_log_goes_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), 1)?;
    fill(&log, 0, 5).await?;
    log.fail_next_syncs(1);
    let failed = log.append(ev("d", 999, b"lost")).await;
    assert!(matches!(failed, Err(StoreError::Full(_))), "{failed:?}");
    assert_all(&log, 0, 5).await?;
    // The failed bytes were written before the sync failed: they must not survive.
    fill(&log, 5, 7).await?;
    assert_all(&log, 0, 7).await?;
    drop(log);
    let log = SegmentLog::open(dir.path(), 1)?;
    assert_all(&log, 0, 7).await?;
    fill(&log, 7, 8).await
}

/// A real full disk: a 1 MiB tmpfs. Mounting needs root; elsewhere the test says so and passes.
#[tokio::test]
async fn a_full_disk_refuses_appends_and_the_log_recovers_when_space_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipped: cannot mount a tmpfs: {other:?}");
            return Ok(());
        }
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).output();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let log = SegmentLog::open(&mnt.join("log"), 1)?;
    let mut acked = 0u64;
    let mut refused = false;
    for i in 0..400u64 {
        match log.append(ev("d", i as i64, &[7u8; 8 << 10])).await {
            Ok((_, seq)) => {
                assert_eq!(seq, acked);
                acked += 1;
            }
            Err(StoreError::Full(_)) => {
                refused = true;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    assert!(refused, "a 1 MiB disk filled up");
    assert_eq!(seqs(&log, 0, 0).await?, (0..acked).collect::<Vec<_>>());
    // Space returns: retention drops the oldest records (rolling the active segment).
    let freed = log
        .enforce_retention(
            Retention {
                max_age_ms: 0,
                max_bytes: u64::MAX,
            },
            Timestamp::from_unix_ms(1_000_000),
        )
        .await?;
    assert_eq!(freed, acked);
    let (_, seq) = log.append(ev("d", 1, b"after")).await?;
    assert_eq!(seq, acked, "sequences continue after the refused batch");
    drop(log);
    let log = SegmentLog::open(&mnt.join("log"), 1)?;
    assert_eq!(seqs(&log, 0, 0).await?, vec![acked]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_keep_each_senders_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open_with(dir.path(), 4, small())?;
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let device = format!("dev{t}");
            let mut pending = Vec::new();
            for i in 0..150u32 {
                pending.push(log.enqueue(ev(&device, 1, &i.to_be_bytes())).await?);
            }
            for d in pending {
                d.await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| StoreError::Task(e.to_string()))??;
    }
    let mut seen = 0;
    for p in 0..4 {
        let recs = log.read(p, 0, 100_000).await?;
        let got: Vec<u64> = recs.iter().map(|r| r.sequence).collect();
        assert_eq!(got, (0..recs.len() as u64).collect::<Vec<_>>());
        let mut next: BTreeMap<String, u32> = BTreeMap::new();
        for r in &recs {
            assert_eq!(log.partition_of(&r.event.device_id), p);
            let n = next.entry(r.event.device_id.clone()).or_default();
            assert_eq!(
                r.event.body,
                n.to_be_bytes(),
                "{}'s order",
                r.event.device_id
            );
            *n += 1;
        }
        seen += recs.len();
    }
    assert_eq!(seen, 16 * 150);
    Ok(())
}

#[tokio::test]
async fn streams_live_in_their_own_directories_and_go_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let streams = SegmentStreams::new(dir.path());
    let a = streams.open_stream("alpha", 2)?;
    let b = streams.open_stream("alpha.deadletter", 1)?;
    a.append(ev("d", 1, b"a")).await?;
    b.append(ev("d", 1, b"b")).await?;
    assert!(dir.path().join("streams/alpha/meta").exists());
    drop(a);
    let a = streams.open_stream("alpha", 4)?;
    assert_eq!(a.partition_count(), 2);
    assert_eq!(a.read(a.partition_of("d"), 0, 10).await?.len(), 1);
    drop(a);
    streams.remove_stream("alpha")?;
    assert!(!dir.path().join("streams/alpha").exists());
    assert!(dir.path().join("streams/alpha.deadletter").exists());
    streams.remove_stream("alpha")?;
    for bad in ["", ".hidden", "../x", "a/b", "a b"] {
        assert!(streams.open_stream(bad, 1).is_err(), "{bad:?}");
        assert!(streams.remove_stream(bad).is_err(), "{bad:?}");
    }
    Ok(())
}

/// More data than one read chunk (256 KiB) and than one batch, read back in pages after a
/// reopen, as the event stream reads it.
#[tokio::test]
async fn many_batches_beyond_a_read_chunk_read_back_whole_in_pages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), 4)?;
    let mut pending = Vec::new();
    for i in 0..3000u32 {
        let device = format!("dev{}", i % 7);
        let mut e = ev(&device, i64::from(i), &[b'p'; 300]);
        e.properties = vec![("n".into(), Some(i.to_string()))];
        pending.push(log.enqueue(e).await?);
    }
    for d in pending {
        d.await?;
    }
    for reopen in [false, true] {
        let log = if reopen {
            SegmentLog::open(dir.path(), 4)?
        } else {
            log.clone()
        };
        let mut total = 0;
        for p in 0..4 {
            let end = log.resolve(p, StartPosition::End).await?;
            let mut next = 0;
            loop {
                let page = log.read(p, next, 256).await?;
                let Some(last) = page.last() else { break };
                assert_eq!(page[0].sequence, next);
                next = last.sequence + 1;
                total += page.len();
            }
            assert_eq!(
                next, end,
                "partition {p} read to its end (reopen: {reopen})"
            );
        }
        assert_eq!(total, 3000, "reopen: {reopen}");
    }
    Ok(())
}

/// The crash test's load: twelve senders, 32 in flight each, many small batches; then every
/// partition read back in pages, live and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_small_batches_from_many_senders_read_back_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), 4)?;
    let mut tasks = Vec::new();
    for d in 0..12u32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let device = format!("crash-{d}");
            let mut pending = std::collections::VecDeque::new();
            for n in 1..=700u32 {
                let mut e = ev(&device, 1_700_000_000_000 + i64::from(n), b"payload");
                e.properties = vec![
                    ("n".into(), Some(n.to_string())),
                    (
                        "parity".into(),
                        Some(if n % 2 == 0 { "even" } else { "odd" }.into()),
                    ),
                ];
                pending.push_back(log.enqueue(e).await?);
                if pending.len() >= 32 {
                    if let Some(d) = pending.pop_front() {
                        d.await?;
                    }
                }
            }
            for d in pending {
                d.await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| StoreError::Task(e.to_string()))??;
    }
    for reopen in [false, true] {
        let log = if reopen {
            SegmentLog::open(dir.path(), 4)?
        } else {
            log.clone()
        };
        let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut next = [0u64; 4];
        loop {
            let mut progressed = false;
            for p in 0..4u32 {
                let page = log.read(p, next[p as usize], 256).await?;
                for r in page {
                    assert_eq!(r.sequence, next[p as usize]);
                    next[p as usize] += 1;
                    progressed = true;
                    let n = r.event.properties[0].1.clone().unwrap_or_default();
                    seen.entry(r.event.device_id.clone())
                        .or_default()
                        .push(n.parse().unwrap_or(0));
                }
            }
            if !progressed {
                break;
            }
        }
        for (d, ns) in &seen {
            assert_eq!(
                ns,
                &(1..=700).collect::<Vec<u32>>(),
                "{d} (reopen: {reopen})"
            );
        }
        assert_eq!(seen.len(), 12);
    }
    Ok(())
}

#[tokio::test]
async fn a_torn_checkpoint_save_leaves_the_previous_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = SegmentLog::open(dir.path(), 1)?;
    log.save_checkpoint("g", 0, 1).await?;
    log.save_checkpoint("g", 0, 2).await?;
    drop(log);
    // The second save went to the slot at offset 0 (generation 2): tear it.
    let path = dir.path().join("checkpoints");
    let mut bytes = std::fs::read(&path)?;
    bytes[20] ^= 0xFF;
    std::fs::write(&path, &bytes)?;
    let log = SegmentLog::open(dir.path(), 1)?;
    assert_eq!(log.checkpoints("g").await?, BTreeMap::from([(0, 1)]));
    log.save_checkpoint("g", 0, 3).await?;
    drop(log);
    let log = SegmentLog::open(dir.path(), 1)?;
    assert_eq!(log.checkpoints("g").await?, BTreeMap::from([(0, 3)]));
    Ok(())
}
