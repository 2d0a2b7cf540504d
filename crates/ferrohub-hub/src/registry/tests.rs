//! The registry service against a real SQLite store, through a wrapper that can fail one call,
//! and a connection control that records what the hub asked of it.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ferrohub_store::sqlite::SqliteStore;
use ferrohub_store::sqlite_telemetry::SqliteTelemetry;
use ferrohub_store::*;

use super::*;
use crate::link::ConnectionControl;
use crate::HubSettings;

/// A [`SqliteStore`] whose `list_modules` can be made to fail.
struct FlakyStore {
    inner: SqliteStore,
    fail_list_modules: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl RegistryStore for FlakyStore {
    async fn create_device(&self, device: Device) -> Result<Device> {
        self.inner.create_device(device).await
    }
    async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
        self.inner.get_device(device_id).await
    }
    async fn update_device(&self, device: Device, if_match: IfMatch) -> Result<Device> {
        self.inner.update_device(device, if_match).await
    }
    async fn delete_device(&self, device_id: &str, if_match: IfMatch) -> Result<()> {
        self.inner.delete_device(device_id, if_match).await
    }
    async fn list_devices(&self, top: usize) -> Result<Vec<Device>> {
        self.inner.list_devices(top).await
    }
    async fn count_devices(&self) -> Result<u64> {
        self.inner.count_devices().await
    }
    async fn create_module(&self, module: Module) -> Result<Module> {
        self.inner.create_module(module).await
    }
    async fn get_module(&self, device_id: &str, module_id: &str) -> Result<Option<Module>> {
        self.inner.get_module(device_id, module_id).await
    }
    async fn update_module(&self, module: Module, if_match: IfMatch) -> Result<Module> {
        self.inner.update_module(module, if_match).await
    }
    async fn delete_module(&self, device_id: &str, module_id: &str, m: IfMatch) -> Result<()> {
        self.inner.delete_module(device_id, module_id, m).await
    }
    async fn list_modules(&self, device_id: &str) -> Result<Vec<Module>> {
        if self
            .fail_list_modules
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StoreError::Task("injected failure".into()));
        }
        self.inner.list_modules(device_id).await
    }
}

#[async_trait]
impl PolicyStore for FlakyStore {
    async fn get_policy(&self, name: &str) -> Result<Option<AccessPolicy>> {
        self.inner.get_policy(name).await
    }
    async fn list_policies(&self) -> Result<Vec<AccessPolicy>> {
        self.inner.list_policies().await
    }
    async fn ensure_policy(&self, policy: AccessPolicy) -> Result<AccessPolicy> {
        self.inner.ensure_policy(policy).await
    }
}

#[async_trait]
impl CertificateStore for FlakyStore {
    async fn put_certificate(&self, cert: CaCertificate, m: IfMatch) -> Result<CaCertificate> {
        self.inner.put_certificate(cert, m).await
    }
    async fn get_certificate(&self, name: &str) -> Result<Option<CaCertificate>> {
        self.inner.get_certificate(name).await
    }
    async fn list_certificates(&self) -> Result<Vec<CaCertificate>> {
        self.inner.list_certificates().await
    }
    async fn delete_certificate(&self, name: &str, m: IfMatch) -> Result<()> {
        self.inner.delete_certificate(name, m).await
    }
}

#[async_trait]
impl SessionStore for FlakyStore {
    async fn load_session(&self, key: &str) -> Result<Option<StoredSession>> {
        self.inner.load_session(key).await
    }
    async fn save_session(&self, key: &str, session: &StoredSession) -> Result<()> {
        self.inner.save_session(key, session).await
    }
    async fn delete_session(&self, key: &str) -> Result<()> {
        self.inner.delete_session(key).await
    }
}

#[async_trait]
impl C2dStore for FlakyStore {
    async fn c2d_enqueue(&self, msg: C2dMessage, max_depth: usize) -> Result<C2dMessage> {
        self.inner.c2d_enqueue(msg, max_depth).await
    }
    async fn c2d_peek(
        &self,
        d: &str,
        m: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>> {
        self.inner.c2d_peek(d, m, after, limit).await
    }
    async fn c2d_count_deliveries(&self, d: &str, m: Option<&str>, up_to: u64) -> Result<u64> {
        self.inner.c2d_count_deliveries(d, m, up_to).await
    }
    async fn c2d_settle(
        &self,
        d: &str,
        m: Option<&str>,
        seq: u64,
        status: FeedbackStatus,
        now: &str,
    ) -> Result<Option<C2dMessage>> {
        self.inner.c2d_settle(d, m, seq, status, now).await
    }
    async fn c2d_count(&self, d: &str, m: Option<&str>) -> Result<u64> {
        self.inner.c2d_count(d, m).await
    }
    async fn c2d_purge(&self, d: &str, m: Option<&str>, now: &str) -> Result<u64> {
        self.inner.c2d_purge(d, m, now).await
    }
    async fn c2d_expire(
        &self,
        now_ms: i64,
        now: &str,
        limit: usize,
    ) -> Result<Vec<(String, Option<String>)>> {
        self.inner.c2d_expire(now_ms, now, limit).await
    }
    async fn c2d_next_expiry(&self) -> Result<Option<i64>> {
        self.inner.c2d_next_expiry().await
    }
    async fn feedback_receive(
        &self,
        now_ms: i64,
        lock_ms: i64,
        max: usize,
    ) -> Result<Option<FeedbackBatch>> {
        self.inner.feedback_receive(now_ms, lock_ms, max).await
    }
    async fn feedback_complete(&self, token: &str, now_ms: i64) -> Result<()> {
        self.inner.feedback_complete(token, now_ms).await
    }
    async fn feedback_abandon(&self, token: &str, now_ms: i64) -> Result<()> {
        self.inner.feedback_abandon(token, now_ms).await
    }
}

#[async_trait]
impl TwinStore for FlakyStore {
    async fn get_twin(&self, d: &str, m: Option<&str>) -> Result<Option<String>> {
        self.inner.get_twin(d, m).await
    }
    async fn update_twin(
        &self,
        d: &str,
        m: Option<&str>,
        update: TwinUpdate,
    ) -> Result<Box<dyn std::any::Any + Send>> {
        self.inner.update_twin(d, m, update).await
    }
}

/// Records the client ids the hub kicked and whose sessions it forgot.
#[derive(Default)]
struct Recorder {
    kicked: Mutex<Vec<String>>,
    forgotten: Mutex<Vec<String>>,
}

#[async_trait]
impl ConnectionControl for Recorder {
    fn kick(&self, client_id: &str) -> bool {
        self.kicked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client_id.to_string());
        true
    }

    async fn forget_session(&self, client_id: &str) -> std::result::Result<(), crate::BoxError> {
        self.forgotten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client_id.to_string());
        Ok(())
    }
}

type R<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Fixture {
    hub: Arc<Hub>,
    store: Arc<FlakyStore>,
    control: Arc<Recorder>,
    _dir: tempfile::TempDir,
}

fn fixture() -> R<Fixture> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(FlakyStore {
        inner: SqliteStore::open(dir.path())?,
        fail_list_modules: Default::default(),
    });
    let telemetry = Arc::new(SqliteTelemetry::open(dir.path(), 1)?);
    let hub = Hub::new(
        store.clone(),
        telemetry,
        vec!["localhost".into()],
        HubSettings::default(),
    );
    let control = Arc::new(Recorder::default());
    hub.set_connection_control(control.clone());
    Ok(Fixture {
        hub,
        store,
        control,
        _dir: dir,
    })
}

fn seen(list: &Mutex<Vec<String>>) -> Vec<String> {
    let mut v = list.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort();
    v
}

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
        f.hub.presence.connected(&Identity::module("d1", m));
    }
    f.hub.presence.connected(&Identity::device("d1"));

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
