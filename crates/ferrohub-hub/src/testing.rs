//! Test support for the hub's unit tests: the in-memory store engine behind wrappers that can
//! fail or hold single calls (failpoints, as redb and the IoT Edge broker test a failing disk),
//! a connection control and a device link that record what the hub did.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ferrohub_store::memory::{MemoryStore, MemoryTelemetry};
use ferrohub_store::*;
use tokio::sync::{mpsc, Notify};

use crate::link::{ConnectionControl, DeviceLink, NotConnected, OutboundMessage, TrySendError};
use crate::{Hub, HubSettings};

/// A [`MemoryStore`] that can fail `list_modules`, and hold the answer of a twin write or a
/// C2D enqueue after it committed (the moment a caller may be cancelled).
pub(crate) struct TestStore {
    inner: MemoryStore,
    pub fail_list_modules: AtomicBool,
    /// Failpoint: every write fails as a failed fsync does, with nothing stored.
    pub fail_writes: AtomicBool,
    /// How many twin reads reached the store.
    pub twin_reads: std::sync::atomic::AtomicUsize,
    /// How many job device-row commits reached the store.
    pub device_job_writes: std::sync::atomic::AtomicUsize,
    pub hold_commits: AtomicBool,
    /// Signalled when a held commit is done and waits for `release`.
    pub committed: Notify,
    pub release: Notify,
}

/// The error a failed fsync gives: EIO.
pub(crate) fn injected_fsync_failure() -> StoreError {
    StoreError::Io(std::io::Error::from_raw_os_error(5))
}

impl TestStore {
    fn write_failpoint(&self) -> Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(injected_fsync_failure());
        }
        Ok(())
    }

    async fn held(&self) {
        if self.hold_commits.load(Ordering::SeqCst) {
            self.committed.notify_one();
            self.release.notified().await;
        }
    }
}

#[async_trait]
impl RegistryStore for TestStore {
    async fn create_device(&self, device: Device) -> Result<Device> {
        self.write_failpoint()?;
        self.inner.create_device(device).await
    }
    async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
        self.inner.get_device(device_id).await
    }
    async fn update_device(&self, device: Device, if_match: IfMatch) -> Result<Device> {
        self.write_failpoint()?;
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
    async fn count_disabled_devices(&self) -> Result<u64> {
        self.inner.count_disabled_devices().await
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
        if self.fail_list_modules.load(Ordering::SeqCst) {
            return Err(StoreError::Task("injected failure".into()));
        }
        self.inner.list_modules(device_id).await
    }
}

#[async_trait]
impl PolicyStore for TestStore {
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
impl CertificateStore for TestStore {
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
impl SessionStore for TestStore {
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
impl C2dStore for TestStore {
    async fn c2d_enqueue(&self, msg: C2dMessage, max_depth: usize) -> Result<C2dMessage> {
        self.write_failpoint()?;
        let r = self.inner.c2d_enqueue(msg, max_depth).await;
        self.held().await;
        r
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
        now: Timestamp,
    ) -> Result<Option<C2dMessage>> {
        self.inner.c2d_settle(d, m, seq, status, now).await
    }
    async fn c2d_count(&self, d: &str, m: Option<&str>) -> Result<u64> {
        self.inner.c2d_count(d, m).await
    }
    async fn c2d_counts(&self, ids: &[&str]) -> Result<std::collections::HashMap<String, u64>> {
        self.inner.c2d_counts(ids).await
    }
    async fn c2d_purge(&self, d: &str, m: Option<&str>, now: Timestamp) -> Result<u64> {
        self.inner.c2d_purge(d, m, now).await
    }
    async fn c2d_expire(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(String, Option<String>)>> {
        self.inner.c2d_expire(now, limit).await
    }
    async fn c2d_next_expiry(&self) -> Result<Option<Timestamp>> {
        self.inner.c2d_next_expiry().await
    }
    async fn feedback_receive(
        &self,
        now: Timestamp,
        lock: std::time::Duration,
        max: usize,
    ) -> Result<Option<FeedbackBatch>> {
        self.inner.feedback_receive(now, lock, max).await
    }
    async fn feedback_complete(&self, token: &str, now: Timestamp) -> Result<()> {
        self.inner.feedback_complete(token, now).await
    }
    async fn feedback_abandon(&self, token: &str, now: Timestamp) -> Result<()> {
        self.inner.feedback_abandon(token, now).await
    }
}

#[async_trait]
impl TwinStore for TestStore {
    async fn get_twin(&self, d: &str, m: Option<&str>) -> Result<Option<VersionedTwin>> {
        self.twin_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_twin(d, m).await
    }
    async fn put_twin(
        &self,
        d: &str,
        m: Option<&str>,
        doc: String,
        expected: Option<u64>,
    ) -> Result<u64> {
        self.write_failpoint()?;
        let r = self.inner.put_twin(d, m, doc, expected).await;
        self.held().await;
        r
    }
}

/// Records the client ids the hub kicked and whose sessions it forgot.
#[derive(Default)]
pub(crate) struct Recorder {
    pub kicked: Mutex<Vec<String>>,
    pub forgotten: Mutex<Vec<String>>,
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

pub(crate) type R<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

pub(crate) struct Fixture {
    pub hub: Arc<Hub>,
    pub store: Arc<TestStore>,
    pub telemetry: Arc<TestTelemetry>,
    pub control: Arc<Recorder>,
}

/// A [`MemoryTelemetry`] whose group commit can fail: an enqueued message's durability
/// future then resolves to the fsync's error (the message took its place in the queue, and
/// its sync failed).
pub(crate) struct TestTelemetry {
    pub inner: MemoryTelemetry,
    pub fail_syncs: AtomicBool,
}

#[async_trait]
impl telemetry::TelemetryLog for TestTelemetry {
    async fn enqueue(&self, event: telemetry::NewEvent) -> Result<telemetry::Durable> {
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Ok(Box::pin(async { Err(injected_fsync_failure()) }));
        }
        self.inner.enqueue(event).await
    }
    fn partition_count(&self) -> u32 {
        self.inner.partition_count()
    }
    fn partition_of(&self, device_id: &str) -> u32 {
        self.inner.partition_of(device_id)
    }
    async fn read(&self, p: u32, from: u64, max: usize) -> Result<Vec<telemetry::EventRecord>> {
        self.inner.read(p, from, max).await
    }
    async fn resolve(&self, p: u32, position: telemetry::StartPosition) -> Result<u64> {
        self.inner.resolve(p, position).await
    }
    fn watch_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch_commits()
    }
    async fn checkpoints(&self, g: &str) -> Result<std::collections::BTreeMap<u32, u64>> {
        self.inner.checkpoints(g).await
    }
    async fn save_checkpoint(&self, g: &str, p: u32, next: u64) -> Result<()> {
        self.inner.save_checkpoint(g, p, next).await
    }
    async fn enforce_retention(&self, r: telemetry::Retention, now: Timestamp) -> Result<u64> {
        self.inner.enforce_retention(r, now).await
    }
}

/// A hub on a fresh in-memory store, with a recording connection control.
pub(crate) fn fixture() -> R<Fixture> {
    let store = Arc::new(TestStore {
        inner: MemoryStore::new(),
        fail_list_modules: AtomicBool::new(false),
        fail_writes: AtomicBool::new(false),
        twin_reads: Default::default(),
        device_job_writes: Default::default(),
        hold_commits: AtomicBool::new(false),
        committed: Notify::new(),
        release: Notify::new(),
    });
    let telemetry = Arc::new(TestTelemetry {
        inner: MemoryTelemetry::new(1),
        fail_syncs: AtomicBool::new(false),
    });
    let hub = Hub::new(
        store.clone(),
        telemetry.clone(),
        vec!["localhost".into()],
        HubSettings::default(),
    );
    let control = Arc::new(Recorder::default());
    hub.set_connection_control(control.clone());
    Ok(Fixture {
        hub,
        store,
        telemetry,
        control,
    })
}

pub(crate) fn seen(list: &Mutex<Vec<String>>) -> Vec<String> {
    let mut v = list.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort();
    v
}

/// A device connection that hands every message the hub pushes to the test.
pub(crate) struct TestLink(pub mpsc::UnboundedSender<OutboundMessage>);

#[async_trait]
impl DeviceLink for TestLink {
    async fn send(&self, msg: OutboundMessage) -> std::result::Result<(), NotConnected> {
        self.0.send(msg).map_err(|_| NotConnected)
    }

    fn try_send(&self, msg: OutboundMessage) -> std::result::Result<(), TrySendError> {
        self.0.send(msg).map_err(|_| TrySendError::Closed)
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Connects `device_id` (SAS) through a [`TestLink`] with the given subscriptions; returns
/// what the hub pushes to it.
pub(crate) async fn connect(
    hub: &Hub,
    device_id: &str,
    subscriptions: &[&str],
) -> (crate::HubClient, mpsc::UnboundedReceiver<OutboundMessage>) {
    let auth = crate::AuthMethod {
        scope: crate::auth::AuthScope::Device,
        kind: crate::auth::AuthKind::Sas,
    };
    let client = crate::HubClient {
        identity: ferrohub_iothub::Identity::device(device_id),
        auth_json: auth.to_json(),
        auth,
        model_id: None,
        generation_id: String::new(),
        client_type: None,
        credentials_expiry: None,
        transport: crate::Transport::MqttTls,
        peer: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        conn_seq: 1,
        activity: Arc::new(crate::presence::ConnectionActivity::new(1)),
        dropped_replies: Default::default(),
        twin_memo: Default::default(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let subs: Vec<String> = subscriptions.iter().map(|s| s.to_string()).collect();
    hub.device_connected(&client, crate::link::Outbound::new(TestLink(tx)), &subs)
        .await;
    (client, rx)
}

#[async_trait]
impl ferrohub_store::QueryStore for TestStore {
    async fn scan_twins(&self, scan: &TwinScan) -> Result<Vec<TwinRow>> {
        self.inner.scan_twins(scan).await
    }

    async fn group_count(
        &self,
        kind: ferrohub_store::query::ScanKind,
        fields: &[ferrohub_store::query::Field],
    ) -> Result<Vec<ferrohub_store::query::GroupCount>> {
        self.inner.group_count(kind, fields).await
    }
}

#[async_trait]
impl ModelStore for TestStore {
    async fn put_model(&self, id: &str, doc: String, created: Timestamp) -> Result<StoredModel> {
        self.write_failpoint()?;
        self.inner.put_model(id, doc, created).await
    }
    async fn get_model(&self, id: &str) -> Result<Option<StoredModel>> {
        self.inner.get_model(id).await
    }
    async fn list_models(&self) -> Result<Vec<StoredModel>> {
        self.inner.list_models().await
    }
    async fn delete_model(&self, id: &str) -> Result<()> {
        self.write_failpoint()?;
        self.inner.delete_model(id).await
    }
}

#[async_trait]
impl ConfigurationStore for TestStore {
    async fn put_configuration(
        &self,
        id: &str,
        doc: String,
        if_match: Option<IfMatch>,
    ) -> Result<StoredConfiguration> {
        self.write_failpoint()?;
        self.inner.put_configuration(id, doc, if_match).await
    }
    async fn get_configuration(&self, id: &str) -> Result<Option<StoredConfiguration>> {
        self.inner.get_configuration(id).await
    }
    async fn list_configurations(&self, top: usize) -> Result<Vec<StoredConfiguration>> {
        self.inner.list_configurations(top).await
    }
    async fn delete_configuration(&self, id: &str, if_match: IfMatch) -> Result<()> {
        self.write_failpoint()?;
        self.inner.delete_configuration(id, if_match).await
    }
    async fn mark_applied(&self, device_id: &str, config_id: &str) -> Result<()> {
        self.write_failpoint()?;
        self.inner.mark_applied(device_id, config_id).await
    }
    async fn clear_applied(&self, device_id: &str) -> Result<()> {
        self.write_failpoint()?;
        self.inner.clear_applied(device_id).await
    }
    async fn applied_configuration(&self, device_id: &str) -> Result<Option<String>> {
        self.inner.applied_configuration(device_id).await
    }
    async fn count_applied(&self, config_id: &str) -> Result<u64> {
        self.inner.count_applied(config_id).await
    }
}

/// Jobs pass straight through, counting device-row commits.
#[async_trait]
impl ferrohub_store::JobStore for TestStore {
    async fn create_job(&self, job: ferrohub_store::StoredJob) -> Result<()> {
        self.write_failpoint()?;
        self.inner.create_job(job).await
    }
    async fn get_job(&self, job_id: &str) -> Result<Option<ferrohub_store::StoredJob>> {
        self.inner.get_job(job_id).await
    }
    async fn update_job(&self, job: ferrohub_store::StoredJob) -> Result<()> {
        self.write_failpoint()?;
        self.inner.update_job(job).await
    }
    async fn list_jobs(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ferrohub_store::StoredJob>> {
        self.inner.list_jobs(after, limit).await
    }
    async fn put_device_jobs(&self, rows: Vec<ferrohub_store::StoredDeviceJob>) -> Result<()> {
        self.write_failpoint()?;
        self.device_job_writes.fetch_add(1, Ordering::SeqCst);
        self.inner.put_device_jobs(rows).await
    }
    async fn get_device_job(
        &self,
        job_id: &str,
        device_id: &str,
    ) -> Result<Option<ferrohub_store::StoredDeviceJob>> {
        self.inner.get_device_job(job_id, device_id).await
    }
    async fn scan_device_jobs(
        &self,
        job_id: Option<&str>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<ferrohub_store::StoredDeviceJob>> {
        self.inner.scan_device_jobs(job_id, after, limit).await
    }
}

/// Provisioning records pass straight through, writes behind the write failpoint.
#[async_trait]
impl ferrohub_store::ProvisioningStore for TestStore {
    async fn put_provisioning(
        &self,
        kind: ferrohub_store::ProvisioningKind,
        id: &str,
        doc: String,
        if_match: IfMatch,
    ) -> Result<ferrohub_store::StoredProvisioning> {
        self.write_failpoint()?;
        self.inner.put_provisioning(kind, id, doc, if_match).await
    }
    async fn get_provisioning(
        &self,
        kind: ferrohub_store::ProvisioningKind,
        id: &str,
    ) -> Result<Option<ferrohub_store::StoredProvisioning>> {
        self.inner.get_provisioning(kind, id).await
    }
    async fn delete_provisioning(
        &self,
        kind: ferrohub_store::ProvisioningKind,
        id: &str,
        if_match: IfMatch,
    ) -> Result<()> {
        self.write_failpoint()?;
        self.inner.delete_provisioning(kind, id, if_match).await
    }
    async fn list_provisioning(
        &self,
        kind: ferrohub_store::ProvisioningKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ferrohub_store::StoredProvisioning>> {
        self.inner.list_provisioning(kind, after, limit).await
    }
    async fn ensure_id_scope(&self, candidate: String) -> Result<String> {
        self.write_failpoint()?;
        self.inner.ensure_id_scope(candidate).await
    }
}

#[async_trait]
impl ferrohub_store::RoutingStore for TestStore {
    async fn load_routing(&self) -> Result<Option<ferrohub_store::StoredRouting>> {
        self.inner.load_routing().await
    }
    async fn save_routing(&self, doc: String, expected: u64) -> Result<u64> {
        self.write_failpoint()?;
        self.inner.save_routing(doc, expected).await
    }
}
