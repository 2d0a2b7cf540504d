//! Routing document tests: the versioned write that lets the hub check a change against the
//! whole configuration without a lock of its own.

use crate::{Result, Store, StoreError};

pub async fn routing_document_is_written_only_at_its_version<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    assert_eq!(store.load_routing().await?, None);
    // Nothing stored is version 0; any other expectation is stale.
    assert!(matches!(
        store.save_routing("{}".into(), 3).await,
        Err(StoreError::VersionMismatch)
    ));
    assert_eq!(store.save_routing("{\"a\":1}".into(), 0).await?, 1);
    assert!(matches!(
        store.save_routing("{\"lost\":1}".into(), 0).await,
        Err(StoreError::VersionMismatch)
    ));
    assert_eq!(store.save_routing("{\"a\":2}".into(), 1).await?, 2);
    let stored = store.load_routing().await?.ok_or(StoreError::NotFound)?;
    assert_eq!(stored.doc, "{\"a\":2}");
    assert_eq!(stored.version, 2);
    Ok(())
}
