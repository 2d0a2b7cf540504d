//! Configuration tests: create versus update under etags, listing, and the records of which
//! configuration was applied to each device, which go with the device and the configuration.

use super::with_identities;
use crate::{IfMatch, Result, Store, StoreError};

pub async fn configurations_crud_with_etags<S: Store + Clone>(store: &S) -> Result<()> {
    assert_eq!(store.get_configuration("c1").await?, None);
    // Updating one that does not exist is NotFound, whatever the etag.
    assert!(matches!(
        store
            .put_configuration("c1", "{}".into(), Some(IfMatch::Any))
            .await,
        Err(StoreError::NotFound)
    ));
    let c1 = store
        .put_configuration("c1", "{\"a\":1}".into(), None)
        .await?;
    assert_eq!(store.get_configuration("c1").await?, Some(c1.clone()));
    // Creating one that exists is refused; so is updating with a stale etag.
    assert!(matches!(
        store.put_configuration("c1", "{}".into(), None).await,
        Err(StoreError::AlreadyExists)
    ));
    assert!(matches!(
        store
            .put_configuration("c1", "{}".into(), Some(IfMatch::Etag("nope".into())))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    let c2 = store
        .put_configuration(
            "c1",
            "{\"a\":2}".into(),
            Some(IfMatch::Etag(c1.etag.clone())),
        )
        .await?;
    assert_ne!(c1.etag, c2.etag);
    assert_eq!(c2.doc, "{\"a\":2}");
    store.put_configuration("c0", "{}".into(), None).await?;
    let ids: Vec<_> = store
        .list_configurations(10)
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["c0", "c1"]);
    assert_eq!(store.list_configurations(1).await?.len(), 1);
    assert!(matches!(
        store
            .delete_configuration("c1", IfMatch::Etag(c1.etag.clone()))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    store
        .delete_configuration("c1", IfMatch::Etag(c2.etag.clone()))
        .await?;
    assert_eq!(store.get_configuration("c1").await?, None);
    assert!(matches!(
        store.delete_configuration("c1", IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
    Ok(())
}

pub async fn applied_marks_go_with_their_device_and_configuration<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    with_identities(store).await?;
    store.put_configuration("a", "{}".into(), None).await?;
    store.put_configuration("b", "{}".into(), None).await?;
    assert!(matches!(
        store.mark_applied("nobody", "a").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.mark_applied("d1", "gone").await,
        Err(StoreError::NotFound)
    ));
    store.mark_applied("d1", "a").await?;
    store.mark_applied("d2", "a").await?;
    assert_eq!(
        store.applied_configuration("d1").await?.as_deref(),
        Some("a")
    );
    assert_eq!(store.count_applied("a").await?, 2);
    // A device has one applied configuration: the newer mark replaces the older.
    store.mark_applied("d2", "b").await?;
    assert_eq!(store.count_applied("a").await?, 1);
    assert_eq!(store.count_applied("b").await?, 1);
    // A device that left every target: its record goes, and clearing twice is no error.
    store.clear_applied("d2").await?;
    store.clear_applied("d2").await?;
    assert_eq!(store.applied_configuration("d2").await?, None);
    assert_eq!(store.count_applied("b").await?, 0);
    store.mark_applied("d2", "b").await?;
    store.delete_device("d1", IfMatch::Any).await?;
    assert_eq!(store.applied_configuration("d1").await?, None);
    assert_eq!(store.count_applied("a").await?, 0);
    store.delete_configuration("b", IfMatch::Any).await?;
    assert_eq!(store.applied_configuration("d2").await?, None);
    Ok(())
}
