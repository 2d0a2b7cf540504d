//! Job store tests: ids are unique, documents round-trip and update, and jobs and device rows
//! page in key order (device rows per job when asked).

use crate::{Result, Store, StoreError, StoredDeviceJob, StoredJob};

fn job(id: &str, doc: &str) -> StoredJob {
    StoredJob {
        job_id: id.into(),
        doc: doc.into(),
    }
}

fn row(job: &str, device: &str, doc: &str) -> StoredDeviceJob {
    StoredDeviceJob {
        job_id: job.into(),
        device_id: device.into(),
        doc: doc.into(),
    }
}

pub async fn jobs_are_created_once_and_updated_in_place<S: Store + Clone>(store: &S) -> Result<()> {
    store.create_job(job("j1", r#"{"v":1}"#)).await?;
    assert!(matches!(
        store.create_job(job("j1", r#"{"v":2}"#)).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.get_job("j1").await?, Some(job("j1", r#"{"v":1}"#)));
    store.update_job(job("j1", r#"{"v":3}"#)).await?;
    assert_eq!(store.get_job("j1").await?, Some(job("j1", r#"{"v":3}"#)));
    assert!(matches!(
        store.update_job(job("nope", "{}")).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.get_job("nope").await?, None);
    Ok(())
}

pub async fn jobs_and_device_rows_page_in_key_order<S: Store + Clone>(store: &S) -> Result<()> {
    for id in ["c", "a", "b"] {
        store.create_job(job(id, "{}")).await?;
    }
    let ids = |v: Vec<StoredJob>| v.into_iter().map(|j| j.job_id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_jobs(None, 2).await?), ["a", "b"]);
    assert_eq!(ids(store.list_jobs(Some("b"), 10).await?), ["c"]);

    store
        .put_device_jobs(
            [("b", "d2"), ("a", "d9"), ("b", "d1"), ("c", "d0")]
                .into_iter()
                .map(|(j, d)| row(j, d, r#"{"status":"running"}"#))
                .collect(),
        )
        .await?;
    store.put_device_jobs(Vec::new()).await?;
    store
        .put_device_jobs(vec![row("b", "d1", r#"{"status":"completed"}"#)])
        .await?;
    assert_eq!(
        store.get_device_job("b", "d1").await?,
        Some(row("b", "d1", r#"{"status":"completed"}"#))
    );
    assert_eq!(store.get_device_job("a", "d1").await?, None);
    let keys = |v: Vec<StoredDeviceJob>| {
        v.into_iter()
            .map(|r| format!("{}/{}", r.job_id, r.device_id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(store.scan_device_jobs(None, None, 10).await?),
        ["a/d9", "b/d1", "b/d2", "c/d0"]
    );
    assert_eq!(
        keys(store.scan_device_jobs(Some("b"), None, 10).await?),
        ["b/d1", "b/d2"]
    );
    assert_eq!(
        keys(
            store
                .scan_device_jobs(Some("b"), Some(("b".into(), "d1".into())), 10)
                .await?
        ),
        ["b/d2"]
    );
    assert_eq!(
        keys(
            store
                .scan_device_jobs(None, Some(("a".into(), "d9".into())), 2)
                .await?
        ),
        ["b/d1", "b/d2"]
    );
    Ok(())
}
