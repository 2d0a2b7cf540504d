//! Twin tests: versioned reads and conditional writes, alone and under concurrent writers.

use crate::{Result, Store, StoreError, VersionedTwin};

pub async fn twins_are_written_only_if_unchanged_since_read<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    assert_eq!(store.get_twin("d1", None).await?, None);
    // Some(v) on a missing twin, and None on an existing one, are both mismatches.
    assert!(matches!(
        store
            .put_twin("d1", None, "{\"a\":0}".into(), Some(1))
            .await,
        Err(StoreError::VersionMismatch)
    ));
    let v1 = store.put_twin("d1", None, "{\"a\":1}".into(), None).await?;
    assert_eq!(
        store.get_twin("d1", None).await?,
        Some(VersionedTwin {
            doc: "{\"a\":1}".into(),
            version: v1
        })
    );
    assert!(matches!(
        store.put_twin("d1", None, "{\"a\":2}".into(), None).await,
        Err(StoreError::VersionMismatch)
    ));
    let v2 = store
        .put_twin("d1", None, "{\"a\":2}".into(), Some(v1))
        .await?;
    assert_ne!(v1, v2);
    assert!(matches!(
        store
            .put_twin("d1", None, "{\"a\":3}".into(), Some(v1))
            .await,
        Err(StoreError::VersionMismatch)
    ));
    let twin = store
        .get_twin("d1", None)
        .await?
        .ok_or(StoreError::NotFound)?;
    assert_eq!((twin.doc.as_str(), twin.version), ("{\"a\":2}", v2));
    // A module's twin is another document.
    assert_eq!(store.get_twin("d1", Some("m1")).await?, None);
    store
        .put_twin("d1", Some("m1"), "{\"m\":1}".into(), None)
        .await?;
    assert_eq!(
        store.get_twin("d1", Some("m1")).await?.map(|t| t.doc),
        Some("{\"m\":1}".to_string())
    );
    assert_eq!(store.get_twin("d1", None).await?, Some(twin));
    Ok(())
}

/// Read, append to a JSON array, write conditionally, again on a mismatch: what the hub does.
async fn append_to_twin<S: Store>(store: &S, n: u64) -> Result<usize> {
    loop {
        let current = store.get_twin("d1", None).await?;
        let mut seen: Vec<u64> = match &current {
            Some(t) => serde_json::from_str(&t.doc)?,
            None => Vec::new(),
        };
        seen.push(n);
        let doc = serde_json::to_string(&seen)?;
        match store
            .put_twin("d1", None, doc, current.map(|t| t.version))
            .await
        {
            Ok(_) => return Ok(seen.len()),
            Err(StoreError::VersionMismatch) => tokio::task::yield_now().await,
            Err(e) => return Err(e),
        }
    }
}

pub async fn concurrent_conditional_twin_writes_lose_nothing<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    let tasks: Vec<_> = (0..30)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { append_to_twin(&store, n).await })
        })
        .collect();
    let mut lengths = Vec::new();
    for t in tasks {
        lengths.push(t.await.map_err(|e| StoreError::Task(e.to_string()))??);
    }
    lengths.sort_unstable();
    assert_eq!(lengths, (1..=30).collect::<Vec<_>>());
    let twin = store
        .get_twin("d1", None)
        .await?
        .ok_or(StoreError::NotFound)?;
    let mut all: Vec<u64> = serde_json::from_str(&twin.doc)?;
    all.sort_unstable();
    assert_eq!(all, (0..30).collect::<Vec<_>>());
    Ok(())
}
