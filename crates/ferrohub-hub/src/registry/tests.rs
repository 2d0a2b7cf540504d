//! The registry service against the in-memory store engine, through a wrapper that can fail one call,
//! and a connection control that records what the hub asked of it.

use ferrohub_store::*;

use super::*;
use crate::presence::ConnectionActivity;
use crate::testing::{fixture, seen, R};
use std::sync::Arc;

#[tokio::test]
async fn deleting_a_device_forgets_the_sessions_and_presence_of_its_modules() -> R {
    let f = fixture()?;
    f.hub
        .put_device("d1", IdentityRequest::default(), None)
        .await?;
    for m in ["m1", "m2"] {
        f.hub
            .put_module("d1", m, IdentityRequest::default(), None)
            .await?;
        f.hub.presence.connected(
            &Identity::module("d1", m),
            Arc::new(ConnectionActivity::new(1)),
        );
    }
    f.hub.presence.connected(
        &Identity::device("d1"),
        Arc::new(ConnectionActivity::new(1)),
    );

    f.hub.delete_device("d1", IfMatch::Any).await?;

    let all = vec!["d1".to_string(), "d1/m1".into(), "d1/m2".into()];
    assert_eq!(seen(&f.control.forgotten), all);
    assert_eq!(seen(&f.control.kicked), all);
    for id in [
        Identity::device("d1"),
        Identity::module("d1", "m1"),
        Identity::module("d1", "m2"),
    ] {
        assert!(f.hub.presence.get(&id).is_none(), "{id} still present");
    }
    Ok(())
}

#[tokio::test]
async fn a_failure_listing_modules_fails_the_delete_and_deletes_nothing() -> R {
    let f = fixture()?;
    f.hub
        .put_device("d1", IdentityRequest::default(), None)
        .await?;
    f.hub
        .put_module("d1", "m1", IdentityRequest::default(), None)
        .await?;
    f.store
        .fail_list_modules
        .store(true, std::sync::atomic::Ordering::SeqCst);

    let err = match f.hub.delete_device("d1", IfMatch::Any).await {
        Ok(()) => {
            return Err("the delete succeeded although its modules could not be listed".into())
        }
        Err(e) => e,
    };
    assert_eq!(err.code(), ErrorCode::ServerError);
    assert_eq!(err.http_status(), 500);
    assert!(f.store.get_device("d1").await?.is_some(), "device deleted");
    assert!(seen(&f.control.forgotten).is_empty());
    Ok(())
}

#[tokio::test]
async fn new_keys_or_disabling_close_the_connection_and_keep_the_session() -> R {
    let f = fixture()?;
    let d = f
        .hub
        .put_device("d1", IdentityRequest::default(), None)
        .await?;
    let etag = IfMatch::Etag(d.device.etag.clone());
    let disable = IdentityRequest {
        status: Some(Status::Disabled),
        ..Default::default()
    };
    f.hub.put_device("d1", disable, Some(etag)).await?;
    assert_eq!(seen(&f.control.kicked), vec!["d1".to_string()]);
    assert!(seen(&f.control.forgotten).is_empty());

    // Same keys, same status: nothing to close.
    f.hub
        .put_device("d1", IdentityRequest::default(), Some(IfMatch::Any))
        .await?;
    assert_eq!(
        seen(&f.control.kicked).len(),
        2,
        "disabled stays disabled: kicked again"
    );
    Ok(())
}

#[tokio::test]
async fn creating_needs_no_if_match_and_updating_needs_one() -> R {
    let f = fixture()?;
    let err = f
        .hub
        .put_device(
            "d1",
            IdentityRequest::default(),
            Some(IfMatch::Etag("x".into())),
        )
        .await
        .err()
        .ok_or("update of a missing device succeeded")?;
    assert_eq!(err.code(), ErrorCode::DeviceNotFound);
    f.hub
        .put_device("d1", IdentityRequest::default(), None)
        .await?;
    let err = f
        .hub
        .put_device("d1", IdentityRequest::default(), None)
        .await
        .err()
        .ok_or("second create succeeded")?;
    assert_eq!(err.code(), ErrorCode::DeviceAlreadyExists);
    let bad_key = IdentityRequest {
        authentication: Some(AuthRequest {
            symmetric_key: Some(SymmetricKey {
                primary_key: Some("short".into()),
                secondary_key: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = f
        .hub
        .put_device("d2", bad_key, None)
        .await
        .err()
        .ok_or("bad key accepted")?;
    assert_eq!(err.code(), ErrorCode::ArgumentInvalid);
    Ok(())
}
