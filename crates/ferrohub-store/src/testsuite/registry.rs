//! Registry, access-policy, CA-certificate and MQTT-session tests, and what deleting an
//! identity takes with it (its queues, sequences and twins).

use crate::{
    AccessPolicy, CaCertificate, Device, FeedbackRequest, IfMatch, Module, Result, Rights, Status,
    Store, StoreError, StoredSession, StoredSubscription,
};

use super::{drain_feedback, msg, with_ack};

/// A device record with a generation id, as the hub would create it.
pub fn device(id: &str) -> Device {
    Device {
        device_id: id.into(),
        generation_id: "g1".into(),
        ..Default::default()
    }
}

pub async fn device_crud_with_etags<S: Store + Clone>(store: &S) -> Result<()> {
    let d = store.create_device(device("dev1")).await?;
    assert_eq!(store.get_device("dev1").await?, Some(d.clone()));
    assert!(matches!(
        store.create_device(device("dev1")).await,
        Err(StoreError::AlreadyExists)
    ));
    let stale = IfMatch::Etag(d.etag.clone());
    let d2 = store.update_device(d.clone(), stale.clone()).await?;
    assert_ne!(d2.etag, d.etag);
    assert_eq!(store.get_device("dev1").await?, Some(d2.clone()));
    assert!(matches!(
        store.update_device(d.clone(), stale.clone()).await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(matches!(
        store.delete_device("dev1", stale).await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(matches!(
        store.update_device(device("ghost"), IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
    store.create_device(device("dev0")).await?;
    let ids: Vec<_> = store
        .list_devices(10)
        .await?
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(ids, ["dev0", "dev1"]);
    assert_eq!(store.list_devices(1).await?.len(), 1);
    assert_eq!(store.count_devices().await?, 2);
    assert_eq!(store.count_disabled_devices().await?, 0);
    let mut off = store.get_device("dev0").await?.expect("created above");
    off.status = Status::Disabled;
    store.update_device(off, IfMatch::Any).await?;
    assert_eq!(store.count_disabled_devices().await?, 1);
    store
        .delete_device("dev1", IfMatch::Etag(d2.etag.clone()))
        .await?;
    assert!(store.get_device("dev1").await?.is_none());
    assert!(matches!(
        store.delete_device("dev1", IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.count_devices().await?, 1);
    Ok(())
}

pub async fn modules_need_their_device_and_go_with_it<S: Store + Clone>(store: &S) -> Result<()> {
    let m = Module {
        module_id: "m1".into(),
        device_id: "dev1".into(),
        ..Default::default()
    };
    assert!(matches!(
        store.create_module(m.clone()).await,
        Err(StoreError::NotFound)
    ));
    store.create_device(device("dev1")).await?;
    store.create_module(m.clone()).await?;
    assert!(matches!(
        store.create_module(m).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.list_modules("dev1").await?.len(), 1);
    store.delete_device("dev1", IfMatch::Any).await?;
    assert!(store.get_module("dev1", "m1").await?.is_none());
    Ok(())
}

pub async fn policies_are_created_once<S: Store + Clone>(store: &S) -> Result<()> {
    let p = AccessPolicy {
        key_name: "iothubowner".into(),
        primary_key: "a".into(),
        secondary_key: "b".into(),
        rights: Rights::ALL,
    };
    store.ensure_policy(p.clone()).await?;
    let again = store
        .ensure_policy(AccessPolicy {
            primary_key: "other".into(),
            ..p.clone()
        })
        .await?;
    assert_eq!(again, p);
    Ok(())
}

pub async fn certificates_crud_with_etags<S: Store + Clone>(store: &S) -> Result<()> {
    let cert = |name: &str, pem: &str| CaCertificate {
        name: name.into(),
        etag: String::new(),
        certificate: pem.into(),
        subject: "CN=ca".into(),
        thumbprint: "AB".into(),
        created: "2024-01-01T00:00:00.0000000Z".into(),
    };
    // A new certificate is created whatever If-Match says.
    let c1 = store
        .put_certificate(cert("ca1", "pem1"), IfMatch::Etag("nope".into()))
        .await?;
    assert_eq!(store.get_certificate("ca1").await?, Some(c1.clone()));
    assert!(matches!(
        store
            .put_certificate(cert("ca1", "pem2"), IfMatch::Etag("nope".into()))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    let c2 = store
        .put_certificate(cert("ca1", "pem2"), IfMatch::Etag(c1.etag.clone()))
        .await?;
    assert_ne!(c1.etag, c2.etag);
    assert_eq!(c2.certificate, "pem2");
    store
        .put_certificate(cert("ca0", "p"), IfMatch::Any)
        .await?;
    let names: Vec<_> = store
        .list_certificates()
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["ca0", "ca1"]);
    assert!(matches!(
        store
            .delete_certificate("ca1", IfMatch::Etag(c1.etag.clone()))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    store
        .delete_certificate("ca1", IfMatch::Etag(c2.etag))
        .await?;
    assert!(store.get_certificate("ca1").await?.is_none());
    assert!(matches!(
        store.delete_certificate("ca1", IfMatch::Any).await,
        Err(StoreError::NotFound)
    ));
    Ok(())
}

pub async fn sessions_round_trip_and_delete<S: Store + Clone>(store: &S) -> Result<()> {
    let s = StoredSession {
        subscriptions: vec![StoredSubscription {
            filter: "$iothub/methods/POST/#".into(),
            qos: 1,
        }],
    };
    store.save_session("dev1", &s).await?;
    assert_eq!(store.load_session("dev1").await?, Some(s));
    store.delete_session("dev1").await?;
    assert_eq!(store.load_session("dev1").await?, None);
    Ok(())
}

pub async fn deleting_identities_removes_their_queues_sequences_and_twins<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    for id in ["d1", "d2"] {
        store
            .create_device(Device {
                device_id: id.into(),
                ..Default::default()
            })
            .await?;
        store
            .create_module(Module {
                device_id: id.into(),
                module_id: "m1".into(),
                ..Default::default()
            })
            .await?;
        for module in [None, Some("m1")] {
            let full = FeedbackRequest::Full;
            store
                .c2d_enqueue(with_ack(msg(id, module, "x"), full), 10)
                .await?;
            store.put_twin(id, module, "{}".into(), None).await?;
        }
    }

    store.delete_module("d1", "m1", IfMatch::Any).await?;
    assert_eq!(store.c2d_count("d1", Some("m1")).await?, 0);
    assert!(store.get_twin("d1", Some("m1")).await?.is_none());
    assert_eq!(store.c2d_count("d1", None).await?, 1);
    assert!(store.get_twin("d1", None).await?.is_some());

    store.delete_device("d2", IfMatch::Any).await?;
    for module in [None, Some("m1")] {
        assert_eq!(store.c2d_count("d2", module).await?, 0);
        assert!(store.get_twin("d2", module).await?.is_none());
    }
    assert!(store.get_twin("d1", None).await?.is_some());
    // Sequences went with the identities, and deletion leaves no feedback.
    store
        .create_device(Device {
            device_id: "d2".into(),
            ..Default::default()
        })
        .await?;
    store
        .create_module(Module {
            device_id: "d2".into(),
            module_id: "m1".into(),
            ..Default::default()
        })
        .await?;
    let again = store.c2d_enqueue(msg("d2", Some("m1"), "y"), 10).await?;
    assert_eq!(again.sequence_number, 1);
    assert!(drain_feedback(store).await?.is_empty());
    Ok(())
}
