//! Custom endpoint streams on SQLite (`SqliteStreams`): a stream is a file of its own that
//! keeps its events and partition count across reopening, and removing it deletes its files.

use std::collections::BTreeMap;

use ferrohub_sqlite::{SqliteStreams, STREAMS_DIR};
use ferrohub_store::telemetry::NewEvent;
use ferrohub_store::{Result, StreamEngine};

fn event(device: &str) -> NewEvent {
    NewEvent {
        device_id: device.into(),
        module_id: None,
        enqueued_ms: 1,
        system_properties: BTreeMap::new(),
        properties: vec![("k".into(), Some("v".into()))],
        body: b"hello".to_vec(),
    }
}

#[tokio::test]
async fn a_stream_keeps_its_events_across_reopening_and_goes_when_removed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let streams = SqliteStreams::new(dir.path());
    let log = streams.open_stream("hot", 2)?;
    let (partition, sequence) = log.append(event("d1")).await?;
    assert_eq!(sequence, 0);
    drop(log);
    assert!(dir.path().join(STREAMS_DIR).join("hot.db").exists());

    // Reopened with another count, it keeps the one it was created with, and its events.
    let log = streams.open_stream("hot", 5)?;
    assert_eq!(log.partition_count(), 2);
    let read = log.read(partition, 0, 10).await?;
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].event, event("d1"));
    drop(log);

    streams.remove_stream("hot")?;
    assert!(!dir.path().join(STREAMS_DIR).join("hot.db").exists());
    // Removing what is not there is no error; a stream made again under the name is empty.
    streams.remove_stream("hot")?;
    let log = streams.open_stream("hot", 1)?;
    assert_eq!(log.partition_count(), 1);
    assert!(log.read(0, 0, 10).await?.is_empty());
    Ok(())
}

#[test]
fn names_that_could_leave_the_directory_are_refused() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let streams = SqliteStreams::new(dir.path());
    for bad in ["", "../x", "a/b", "..", ".hidden"] {
        assert!(streams.open_stream(bad, 1).is_err(), "{bad:?}");
        assert!(streams.remove_stream(bad).is_err(), "{bad:?}");
    }
    // A `.` inside is the hub's dead-letter streams' (`NAME.deadletter`), a file in the directory.
    assert!(streams.open_stream("a.deadletter", 1).is_ok());
    assert!(streams.remove_stream("a.deadletter").is_ok());
    Ok(())
}
