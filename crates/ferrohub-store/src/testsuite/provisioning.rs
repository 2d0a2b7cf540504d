//! Provisioning store tests: records are created, replaced under `If-Match` with a new etag,
//! deleted, listed per kind in id order, and the ID scope is stored once.

use crate::{IfMatch, ProvisioningKind, Result, Store, StoreError};

pub async fn provisioning_records_crud_with_etags<S: Store + Clone>(store: &S) -> Result<()> {
    let kind = ProvisioningKind::Enrollment;
    let first = store
        .put_provisioning(kind, "e1", r#"{"v":1}"#.into(), IfMatch::Any)
        .await?;
    assert_eq!(first.doc, r#"{"v":1}"#);
    assert_eq!(
        store.get_provisioning(kind, "e1").await?,
        Some(first.clone())
    );
    // The same id in another collection is another record.
    assert_eq!(
        store
            .get_provisioning(ProvisioningKind::EnrollmentGroup, "e1")
            .await?,
        None
    );

    let second = store
        .put_provisioning(
            kind,
            "e1",
            r#"{"v":2}"#.into(),
            IfMatch::Etag(first.etag.clone()),
        )
        .await?;
    assert_ne!(second.etag, first.etag);
    assert!(matches!(
        store
            .put_provisioning(kind, "e1", "{}".into(), IfMatch::Etag(first.etag.clone()))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(matches!(
        store
            .put_provisioning(kind, "absent", "{}".into(), IfMatch::Etag("MQ==".into()))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .delete_provisioning(kind, "e1", IfMatch::Etag(first.etag))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    store
        .delete_provisioning(kind, "e1", IfMatch::Etag(second.etag))
        .await?;
    assert_eq!(store.get_provisioning(kind, "e1").await?, None);
    assert!(matches!(
        store.delete_provisioning(kind, "e1", IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
    Ok(())
}

pub async fn provisioning_lists_page_per_kind_and_scope_is_kept<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    for id in ["c", "a", "b"] {
        store
            .put_provisioning(
                ProvisioningKind::EnrollmentGroup,
                id,
                "{}".into(),
                IfMatch::Any,
            )
            .await?;
    }
    store
        .put_provisioning(
            ProvisioningKind::Registration,
            "a",
            "{}".into(),
            IfMatch::Any,
        )
        .await?;
    let ids = |v: Vec<crate::StoredProvisioning>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let kind = ProvisioningKind::EnrollmentGroup;
    assert_eq!(
        ids(store.list_provisioning(kind, None, 2).await?),
        ["a", "b"]
    );
    assert_eq!(
        ids(store.list_provisioning(kind, Some("b"), 9).await?),
        ["c"]
    );
    assert_eq!(
        ids(store
            .list_provisioning(ProvisioningKind::Registration, None, 9)
            .await?),
        ["a"]
    );
    assert!(store
        .list_provisioning(ProvisioningKind::Enrollment, None, 9)
        .await?
        .is_empty());

    assert_eq!(
        store.ensure_id_scope("0ne00000001".into()).await?,
        "0ne00000001"
    );
    assert_eq!(
        store.ensure_id_scope("0ne00000002".into()).await?,
        "0ne00000001"
    );
    Ok(())
}
