//! The in-memory engine: [`MemoryStore`] and [`MemoryTelemetry`] implement every trait with the
//! SQLite engine's semantics (etags, cascading deletes, sequence numbers never reused, queue
//! depth, feedback locks, twin versions), keeping nothing across restarts.
//!
//! For tests of the hub that need no disk, and as the reference the shared test suite holds
//! every engine to. Each handle's state sits behind one mutex: every call is atomic, and none
//! awaits while holding it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use tokio::sync::watch;

use crate::configurations::{ConfigurationStore, StoredConfiguration};
use crate::models::{ModelStore, StoredModel};
use crate::query::{
    compare_json, Field, Prefilter, QueryStore, ScanKind, ScannedIdentity, TwinRow, TwinScan,
};
use crate::routing::{RoutingStore, StoredRouting, StreamEngine};
use crate::telemetry::{
    partition_for, Durable, EventRecord, NewEvent, Retention, StartPosition, TelemetryLog,
};
use crate::{
    AccessPolicy, C2dMessage, C2dStore, CaCertificate, CertificateStore, Device, FeedbackBatch,
    FeedbackRecord, FeedbackStatus, IfMatch, Module, PolicyStore, RegistryStore, Result,
    SessionStore, Status, StoreError, StoredSession, Timestamp, TwinStore, VersionedTwin,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change is made in full before the guard drops, except on a panic in this module's
    // own code; the state is still consistent enough to go on serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The same etag shape as the SQLite engine, so callers see no difference.
fn etag_of(version: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(version.to_string())
}

/// A queue's or twin's key: `""` is the device's own, as in the SQLite tables.
type IdKey = (String, String);

fn id_key(device_id: &str, module_id: Option<&str>) -> IdKey {
    (device_id.to_string(), module_id.unwrap_or("").to_string())
}

/// Checks `if_match` against a record's version; `None` means the record is absent.
fn check_if_match(current: Option<u64>, if_match: &IfMatch) -> Result<u64> {
    match current {
        None => Err(StoreError::NotFound),
        Some(v) if if_match.matches(&etag_of(v)) => Ok(v),
        Some(_) => Err(StoreError::PreconditionFailed),
    }
}

struct Feedback {
    record: FeedbackRecord,
    lock_token: Option<String>,
    lock_until: Timestamp,
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, (u64, Device)>,
    modules: BTreeMap<IdKey, (u64, Module)>,
    policies: BTreeMap<String, AccessPolicy>,
    certificates: BTreeMap<String, (u64, CaCertificate)>,
    sessions: HashMap<String, StoredSession>,
    queues: BTreeMap<IdKey, BTreeMap<u64, C2dMessage>>,
    /// Outlives the queue's messages so sequence numbers are never reused; goes with the
    /// identity.
    sequences: HashMap<IdKey, u64>,
    /// By id, which only grows: the order feedback was produced in.
    feedback: BTreeMap<u64, Feedback>,
    next_feedback: u64,
    twins: HashMap<IdKey, VersionedTwin>,
    configurations: BTreeMap<String, (u64, String)>,
    /// Device id -> the configuration applied to it.
    applied: HashMap<String, String>,
    models: BTreeMap<String, StoredModel>,
    /// The routing document and its version.
    routing: Option<(u64, String)>,
}

impl State {
    fn record_feedback(&mut self, msg: &C2dMessage, status: FeedbackStatus, now: Timestamp) {
        if !msg.ack.wants(status) {
            return;
        }
        self.next_feedback += 1;
        let record = FeedbackRecord {
            original_message_id: msg.message_id.clone(),
            device_id: msg.device_id.clone(),
            module_id: msg.module_id.clone(),
            device_generation_id: msg.device_generation_id.clone(),
            status_code: status,
            description: status.description().into(),
            enqueued_time_utc: now.to_iso(),
        };
        self.feedback.insert(
            self.next_feedback,
            Feedback {
                record,
                lock_token: None,
                lock_until: Timestamp::UNIX_EPOCH,
            },
        );
    }

    /// Removes what belongs to identities `gone` says are deleted: queues (without feedback,
    /// as in IoT Hub), sequences and twins.
    fn drop_identity_data(&mut self, gone: impl Fn(&IdKey) -> bool) {
        self.queues.retain(|k, _| !gone(k));
        self.sequences.retain(|k, _| !gone(k));
        self.twins.retain(|k, _| !gone(k));
        self.applied
            .retain(|d, _| !gone(&(d.clone(), String::new())));
    }

    /// Ends a live lock: the records under it are removed, or released when `release`.
    fn settle_lock(&mut self, token: &str, now: Timestamp, release: bool) -> Result<()> {
        let ids: Vec<u64> = self
            .feedback
            .iter()
            .filter(|(_, f)| f.lock_token.as_deref() == Some(token) && f.lock_until > now)
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return Err(StoreError::LockLost);
        }
        for id in ids {
            if release {
                if let Some(f) = self.feedback.get_mut(&id) {
                    f.lock_token = None;
                    f.lock_until = Timestamp::UNIX_EPOCH;
                }
            } else {
                self.feedback.remove(&id);
            }
        }
        Ok(())
    }
}

/// Every storage trait, in memory. Clones share the state.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    /// Apart from `state`: jobs touch nothing else, and this keeps their code in one place.
    jobs: Arc<Mutex<JobsState>>,
    /// Apart from `state` for the same reason: provisioning records touch nothing else.
    provisioning: Arc<Mutex<ProvisioningState>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn with_etag<T>(mut record: T, version: u64, etag: impl FnOnce(&mut T) -> &mut String) -> T {
    *etag(&mut record) = etag_of(version);
    record
}

#[async_trait]
impl RegistryStore for MemoryStore {
    async fn create_device(&self, device: Device) -> Result<Device> {
        let mut s = self.state();
        if s.devices.contains_key(&device.device_id) {
            return Err(StoreError::AlreadyExists);
        }
        let device = with_etag(device, 1, |d| &mut d.etag);
        s.devices
            .insert(device.device_id.clone(), (1, device.clone()));
        Ok(device)
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
        Ok(self.state().devices.get(device_id).map(|(_, d)| d.clone()))
    }

    async fn update_device(&self, device: Device, if_match: IfMatch) -> Result<Device> {
        let mut s = self.state();
        let current = s.devices.get(&device.device_id).map(|(v, _)| *v);
        let version = check_if_match(current, &if_match)? + 1;
        let device = with_etag(device, version, |d| &mut d.etag);
        s.devices
            .insert(device.device_id.clone(), (version, device.clone()));
        Ok(device)
    }

    async fn delete_device(&self, device_id: &str, if_match: IfMatch) -> Result<()> {
        let mut s = self.state();
        check_if_match(s.devices.get(device_id).map(|(v, _)| *v), &if_match)?;
        s.devices.remove(device_id);
        s.modules.retain(|(d, _), _| d != device_id);
        s.drop_identity_data(|(d, _)| d == device_id);
        Ok(())
    }

    async fn list_devices(&self, top: usize) -> Result<Vec<Device>> {
        Ok(self
            .state()
            .devices
            .values()
            .take(top)
            .map(|(_, d)| d.clone())
            .collect())
    }

    async fn count_devices(&self) -> Result<u64> {
        Ok(self.state().devices.len() as u64)
    }

    async fn count_disabled_devices(&self) -> Result<u64> {
        Ok(self
            .state()
            .devices
            .values()
            .filter(|(_, d)| d.status == Status::Disabled)
            .count() as u64)
    }

    async fn create_module(&self, module: Module) -> Result<Module> {
        let mut s = self.state();
        if !s.devices.contains_key(&module.device_id) {
            return Err(StoreError::NotFound);
        }
        let key = (module.device_id.clone(), module.module_id.clone());
        if s.modules.contains_key(&key) {
            return Err(StoreError::AlreadyExists);
        }
        let module = with_etag(module, 1, |m| &mut m.etag);
        s.modules.insert(key, (1, module.clone()));
        Ok(module)
    }

    async fn get_module(&self, device_id: &str, module_id: &str) -> Result<Option<Module>> {
        let key = (device_id.to_string(), module_id.to_string());
        Ok(self.state().modules.get(&key).map(|(_, m)| m.clone()))
    }

    async fn update_module(&self, module: Module, if_match: IfMatch) -> Result<Module> {
        let mut s = self.state();
        let key = (module.device_id.clone(), module.module_id.clone());
        let version = check_if_match(s.modules.get(&key).map(|(v, _)| *v), &if_match)? + 1;
        let module = with_etag(module, version, |m| &mut m.etag);
        s.modules.insert(key, (version, module.clone()));
        Ok(module)
    }

    async fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: IfMatch,
    ) -> Result<()> {
        let mut s = self.state();
        let key = (device_id.to_string(), module_id.to_string());
        check_if_match(s.modules.get(&key).map(|(v, _)| *v), &if_match)?;
        s.modules.remove(&key);
        s.drop_identity_data(|k| *k == key);
        Ok(())
    }

    async fn list_modules(&self, device_id: &str) -> Result<Vec<Module>> {
        Ok(self
            .state()
            .modules
            .iter()
            .filter(|((d, _), _)| d == device_id)
            .map(|(_, (_, m))| m.clone())
            .collect())
    }
}

#[async_trait]
impl PolicyStore for MemoryStore {
    async fn get_policy(&self, name: &str) -> Result<Option<AccessPolicy>> {
        Ok(self.state().policies.get(name).cloned())
    }

    async fn list_policies(&self) -> Result<Vec<AccessPolicy>> {
        Ok(self.state().policies.values().cloned().collect())
    }

    async fn ensure_policy(&self, policy: AccessPolicy) -> Result<AccessPolicy> {
        Ok(self
            .state()
            .policies
            .entry(policy.key_name.clone())
            .or_insert(policy)
            .clone())
    }
}

#[async_trait]
impl CertificateStore for MemoryStore {
    async fn put_certificate(
        &self,
        cert: CaCertificate,
        if_match: IfMatch,
    ) -> Result<CaCertificate> {
        let mut s = self.state();
        // As in SQLite: a new certificate is created whatever If-Match says.
        let version = match s.certificates.get(&cert.name).map(|(v, _)| *v) {
            None => 1,
            Some(v) if if_match.matches(&etag_of(v)) => v + 1,
            Some(_) => return Err(StoreError::PreconditionFailed),
        };
        let cert = with_etag(cert, version, |c| &mut c.etag);
        s.certificates
            .insert(cert.name.clone(), (version, cert.clone()));
        Ok(cert)
    }

    async fn get_certificate(&self, name: &str) -> Result<Option<CaCertificate>> {
        Ok(self.state().certificates.get(name).map(|(_, c)| c.clone()))
    }

    async fn list_certificates(&self) -> Result<Vec<CaCertificate>> {
        Ok(self
            .state()
            .certificates
            .values()
            .map(|(_, c)| c.clone())
            .collect())
    }

    async fn delete_certificate(&self, name: &str, if_match: IfMatch) -> Result<()> {
        let mut s = self.state();
        check_if_match(s.certificates.get(name).map(|(v, _)| *v), &if_match)?;
        s.certificates.remove(name);
        Ok(())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn load_session(&self, client_key: &str) -> Result<Option<StoredSession>> {
        Ok(self.state().sessions.get(client_key).cloned())
    }

    async fn save_session(&self, client_key: &str, session: &StoredSession) -> Result<()> {
        self.state()
            .sessions
            .insert(client_key.to_string(), session.clone());
        Ok(())
    }

    async fn delete_session(&self, client_key: &str) -> Result<()> {
        self.state().sessions.remove(client_key);
        Ok(())
    }
}

#[async_trait]
impl C2dStore for MemoryStore {
    async fn c2d_enqueue(&self, mut msg: C2dMessage, max_depth: usize) -> Result<C2dMessage> {
        // One spelling per identity, as in SQLite: `Some("")` is not a module.
        msg.module_id = msg.module_id.filter(|m| !m.is_empty());
        let mut s = self.state();
        let exists = match &msg.module_id {
            None => s.devices.contains_key(&msg.device_id),
            Some(m) => s.modules.contains_key(&(msg.device_id.clone(), m.clone())),
        };
        if !exists {
            return Err(StoreError::NotFound);
        }
        let key = id_key(&msg.device_id, msg.module_id.as_deref());
        if s.queues.get(&key).map_or(0, BTreeMap::len) >= max_depth {
            return Err(StoreError::QueueFull);
        }
        let seq = s.sequences.entry(key.clone()).or_insert(0);
        *seq += 1;
        msg.sequence_number = *seq;
        s.queues
            .entry(key)
            .or_default()
            .insert(msg.sequence_number, msg.clone());
        Ok(msg)
    }

    async fn c2d_peek(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>> {
        let s = self.state();
        Ok(s.queues
            .get(&id_key(device_id, module_id))
            .map(|q| {
                q.range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(_, m)| m.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn c2d_count_deliveries(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        up_to: u64,
    ) -> Result<u64> {
        let mut s = self.state();
        let Some(q) = s.queues.get_mut(&id_key(device_id, module_id)) else {
            return Ok(0);
        };
        let mut n = 0;
        for (_, m) in q.range_mut(..=up_to) {
            m.delivery_count = m.delivery_count.saturating_add(1);
            n += 1;
        }
        Ok(n)
    }

    async fn c2d_settle(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        sequence_number: u64,
        status: FeedbackStatus,
        now: Timestamp,
    ) -> Result<Option<C2dMessage>> {
        let mut s = self.state();
        let key = id_key(device_id, module_id);
        let Some(msg) = s
            .queues
            .get_mut(&key)
            .and_then(|q| q.remove(&sequence_number))
        else {
            return Ok(None);
        };
        s.record_feedback(&msg, status, now);
        Ok(Some(msg))
    }

    async fn c2d_count(&self, device_id: &str, module_id: Option<&str>) -> Result<u64> {
        let s = self.state();
        Ok(s.queues
            .get(&id_key(device_id, module_id))
            .map_or(0, |q| q.len() as u64))
    }

    async fn c2d_counts(&self, device_ids: &[&str]) -> Result<HashMap<String, u64>> {
        let s = self.state();
        Ok(device_ids
            .iter()
            .map(|d| {
                let n = s.queues.get(&id_key(d, None)).map_or(0, |q| q.len() as u64);
                (d.to_string(), n)
            })
            .collect())
    }

    async fn c2d_purge(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        now: Timestamp,
    ) -> Result<u64> {
        let mut s = self.state();
        let queued = s
            .queues
            .remove(&id_key(device_id, module_id))
            .unwrap_or_default();
        for msg in queued.values() {
            s.record_feedback(msg, FeedbackStatus::Purged, now);
        }
        Ok(queued.len() as u64)
    }

    async fn c2d_expire(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(String, Option<String>)>> {
        let mut s = self.state();
        let mut expired: Vec<(i64, IdKey, u64)> = s
            .queues
            .iter()
            .flat_map(|(k, q)| {
                q.values()
                    .filter(|m| m.expiry_time() <= now)
                    .map(move |m| (m.expiry_time_ms, k.clone(), m.sequence_number))
            })
            .collect();
        expired.sort();
        expired.truncate(limit);
        let mut seen = HashSet::new();
        let mut touched = Vec::new();
        for (_, key, seq) in expired {
            let Some(msg) = s.queues.get_mut(&key).and_then(|q| q.remove(&seq)) else {
                continue;
            };
            s.record_feedback(&msg, FeedbackStatus::Expired, now);
            if seen.insert(key.clone()) {
                let (device, module) = key;
                touched.push((device, (!module.is_empty()).then_some(module)));
            }
        }
        s.queues.retain(|_, q| !q.is_empty());
        Ok(touched)
    }

    async fn c2d_next_expiry(&self) -> Result<Option<Timestamp>> {
        let s = self.state();
        Ok(s.queues
            .values()
            .flat_map(|q| q.values().map(C2dMessage::expiry_time))
            .min())
    }

    async fn feedback_receive(
        &self,
        now: Timestamp,
        lock: Duration,
        max: usize,
    ) -> Result<Option<FeedbackBatch>> {
        let mut s = self.state();
        let lock_token = format!("{:032x}", rand::random::<u128>());
        let lock_until = now.saturating_add(lock);
        let mut records = Vec::new();
        for f in s
            .feedback
            .values_mut()
            .filter(|f| f.lock_until <= now)
            .take(max)
        {
            f.lock_token = Some(lock_token.clone());
            f.lock_until = lock_until;
            records.push(f.record.clone());
        }
        if records.is_empty() {
            return Ok(None);
        }
        Ok(Some(FeedbackBatch {
            lock_token,
            records,
        }))
    }

    async fn feedback_complete(&self, lock_token: &str, now: Timestamp) -> Result<()> {
        self.state().settle_lock(lock_token, now, false)
    }

    async fn feedback_abandon(&self, lock_token: &str, now: Timestamp) -> Result<()> {
        self.state().settle_lock(lock_token, now, true)
    }
}

#[async_trait]
impl ModelStore for MemoryStore {
    async fn put_model(&self, id: &str, doc: String, created: Timestamp) -> Result<StoredModel> {
        let mut s = self.state();
        if let Some(existing) = s.models.get(id) {
            return if existing.doc == doc {
                Ok(existing.clone())
            } else {
                Err(StoreError::AlreadyExists)
            };
        }
        let model = StoredModel {
            id: id.to_string(),
            doc,
            created,
        };
        s.models.insert(id.to_string(), model.clone());
        Ok(model)
    }

    async fn get_model(&self, id: &str) -> Result<Option<StoredModel>> {
        Ok(self.state().models.get(id).cloned())
    }

    async fn list_models(&self) -> Result<Vec<StoredModel>> {
        Ok(self.state().models.values().cloned().collect())
    }

    async fn delete_model(&self, id: &str) -> Result<()> {
        self.state()
            .models
            .remove(id)
            .map(|_| ())
            .ok_or(StoreError::NotFound)
    }
}

#[async_trait]
impl ConfigurationStore for MemoryStore {
    async fn put_configuration(
        &self,
        id: &str,
        doc: String,
        if_match: Option<IfMatch>,
    ) -> Result<StoredConfiguration> {
        let mut s = self.state();
        let current = s.configurations.get(id).map(|(v, _)| *v);
        let version = match (current, if_match) {
            (Some(_), None) => return Err(StoreError::AlreadyExists),
            (None, None) => 1,
            (current, Some(cond)) => check_if_match(current, &cond)? + 1,
        };
        s.configurations
            .insert(id.to_string(), (version, doc.clone()));
        Ok(StoredConfiguration {
            id: id.to_string(),
            doc,
            etag: etag_of(version),
        })
    }

    async fn get_configuration(&self, id: &str) -> Result<Option<StoredConfiguration>> {
        Ok(self
            .state()
            .configurations
            .get(id)
            .map(|(v, doc)| StoredConfiguration {
                id: id.to_string(),
                doc: doc.clone(),
                etag: etag_of(*v),
            }))
    }

    async fn list_configurations(&self, top: usize) -> Result<Vec<StoredConfiguration>> {
        Ok(self
            .state()
            .configurations
            .iter()
            .take(top)
            .map(|(id, (v, doc))| StoredConfiguration {
                id: id.clone(),
                doc: doc.clone(),
                etag: etag_of(*v),
            })
            .collect())
    }

    async fn delete_configuration(&self, id: &str, if_match: IfMatch) -> Result<()> {
        let mut s = self.state();
        check_if_match(s.configurations.get(id).map(|(v, _)| *v), &if_match)?;
        s.configurations.remove(id);
        s.applied.retain(|_, c| c != id);
        Ok(())
    }

    async fn mark_applied(&self, device_id: &str, config_id: &str) -> Result<()> {
        let mut s = self.state();
        // As SQLite's foreign keys would: no record for an identity or configuration that is gone.
        if !s.devices.contains_key(device_id) {
            return Err(StoreError::NotFound);
        }
        if !s.configurations.contains_key(config_id) {
            return Err(StoreError::NotFound);
        }
        s.applied
            .insert(device_id.to_string(), config_id.to_string());
        Ok(())
    }

    async fn clear_applied(&self, device_id: &str) -> Result<()> {
        self.state().applied.remove(device_id);
        Ok(())
    }

    async fn applied_configuration(&self, device_id: &str) -> Result<Option<String>> {
        Ok(self.state().applied.get(device_id).cloned())
    }

    async fn count_applied(&self, config_id: &str) -> Result<u64> {
        Ok(self
            .state()
            .applied
            .values()
            .filter(|c| *c == config_id)
            .count() as u64)
    }
}

#[async_trait]
impl TwinStore for MemoryStore {
    async fn get_twin(
        &self,
        device_id: &str,
        module_id: Option<&str>,
    ) -> Result<Option<VersionedTwin>> {
        Ok(self
            .state()
            .twins
            .get(&id_key(device_id, module_id))
            .cloned())
    }

    async fn put_twin(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        doc: String,
        expected: Option<u64>,
    ) -> Result<u64> {
        let mut s = self.state();
        let key = id_key(device_id, module_id);
        let version = match (s.twins.get(&key).map(|t| t.version), expected) {
            (None, None) => 1,
            (Some(stored), Some(e)) if stored == e => e.saturating_add(1),
            _ => return Err(StoreError::VersionMismatch),
        };
        s.twins.insert(key, VersionedTwin { doc, version });
        Ok(version)
    }
}

#[derive(Default)]
struct Partition {
    events: VecDeque<EventRecord>,
    next_seq: u64,
}

struct LogState {
    partitions: Vec<Partition>,
    checkpoints: HashMap<String, BTreeMap<u32, u64>>,
    /// What the retained events take, as retention's size budget counts it.
    bytes: u64,
}

/// Bytes an event counts for against [`Retention::max_bytes`]: its body and properties.
fn event_size(e: &NewEvent) -> u64 {
    let props: usize = e
        .system_properties
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .chain(
            e.properties
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len)),
        )
        .sum();
    (e.body.len() + props + e.device_id.len()) as u64
}

#[async_trait]
impl RoutingStore for MemoryStore {
    async fn load_routing(&self) -> Result<Option<StoredRouting>> {
        Ok(self
            .state()
            .routing
            .as_ref()
            .map(|(version, doc)| StoredRouting {
                doc: doc.clone(),
                version: *version,
            }))
    }

    async fn save_routing(&self, doc: String, expected: u64) -> Result<u64> {
        let mut s = self.state();
        let current = s.routing.as_ref().map_or(0, |(v, _)| *v);
        if current != expected {
            return Err(StoreError::VersionMismatch);
        }
        s.routing = Some((current + 1, doc));
        Ok(current + 1)
    }
}

/// Custom endpoint streams in memory. A stream opened again under the same name is the same
/// stream (as a reopened file would be), so a hub rebuilt over one `MemoryStreams` keeps them.
#[derive(Clone, Default)]
pub struct MemoryStreams {
    streams: Arc<Mutex<HashMap<String, MemoryTelemetry>>>,
}

impl StreamEngine for MemoryStreams {
    fn open_stream(&self, name: &str, partitions: u32) -> Result<Arc<dyn TelemetryLog>> {
        let mut streams = lock(&self.streams);
        let log = streams
            .entry(name.to_string())
            .or_insert_with(|| MemoryTelemetry::new(partitions));
        Ok(Arc::new(log.clone()))
    }

    fn remove_stream(&self, name: &str) -> Result<()> {
        lock(&self.streams).remove(name);
        Ok(())
    }
}

/// [`TelemetryLog`] in memory: appends are "durable" at once. Clones share the log.
#[derive(Clone)]
pub struct MemoryTelemetry {
    state: Arc<Mutex<LogState>>,
    partitions: u32,
    commits: Arc<watch::Sender<u64>>,
}

impl MemoryTelemetry {
    /// A log of `partitions` partitions (1 to 1024, as the SQLite log allows).
    pub fn new(partitions: u32) -> Self {
        let partitions = partitions.clamp(1, 1024);
        let (commits, _) = watch::channel(0);
        Self {
            state: Arc::new(Mutex::new(LogState {
                partitions: (0..partitions).map(|_| Partition::default()).collect(),
                checkpoints: HashMap::new(),
                bytes: 0,
            })),
            partitions,
            commits: Arc::new(commits),
        }
    }
}

#[async_trait]
impl TelemetryLog for MemoryTelemetry {
    async fn enqueue(&self, event: NewEvent) -> Result<Durable> {
        let partition = self.partition_of(&event.device_id);
        let sequence = {
            let mut s = lock(&self.state);
            s.bytes += event_size(&event);
            let p = s
                .partitions
                .get_mut(partition as usize)
                .ok_or_else(|| StoreError::Task("partition out of range".into()))?;
            let sequence = p.next_seq;
            p.next_seq += 1;
            p.events.push_back(EventRecord {
                partition,
                sequence,
                event,
            });
            sequence
        };
        self.commits.send_modify(|c| *c += 1);
        Ok(Box::pin(std::future::ready(Ok((partition, sequence)))))
    }

    fn partition_count(&self) -> u32 {
        self.partitions
    }

    fn partition_of(&self, device_id: &str) -> u32 {
        partition_for(device_id, self.partitions)
    }

    async fn read(&self, partition: u32, from: u64, max: usize) -> Result<Vec<EventRecord>> {
        let s = lock(&self.state);
        let Some(p) = s.partitions.get(partition as usize) else {
            return Ok(Vec::new());
        };
        // Sequences are contiguous from the first retained one.
        let skip = p
            .events
            .front()
            .map_or(0, |e| from.saturating_sub(e.sequence));
        Ok(p.events
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .take(max)
            .cloned()
            .collect())
    }

    async fn resolve(&self, partition: u32, position: StartPosition) -> Result<u64> {
        let s = lock(&self.state);
        let Some(p) = s.partitions.get(partition as usize) else {
            return Ok(0);
        };
        let first = |f: &dyn Fn(&EventRecord) -> bool| {
            p.events
                .iter()
                .find(|e| f(e))
                .map_or(p.next_seq, |e| e.sequence)
        };
        Ok(match position {
            StartPosition::End => p.next_seq,
            StartPosition::Sequence(n) => n.min(p.next_seq),
            StartPosition::Start => first(&|_| true),
            StartPosition::EnqueuedAt(t) => first(&|e| e.event.enqueued_ms >= t),
        })
    }

    fn watch_commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    async fn checkpoints(&self, group: &str) -> Result<BTreeMap<u32, u64>> {
        Ok(lock(&self.state)
            .checkpoints
            .get(group)
            .cloned()
            .unwrap_or_default())
    }

    async fn save_checkpoint(&self, group: &str, partition: u32, next_sequence: u64) -> Result<()> {
        lock(&self.state)
            .checkpoints
            .entry(group.to_string())
            .or_default()
            .insert(partition, next_sequence);
        Ok(())
    }

    async fn enforce_retention(&self, retention: Retention, now: Timestamp) -> Result<u64> {
        let cutoff = now.unix_ms().saturating_sub(retention.max_age_ms);
        let mut s = lock(&self.state);
        let LogState {
            partitions, bytes, ..
        } = &mut *s;
        let mut removed = 0u64;
        for p in partitions.iter_mut() {
            while let Some(e) = p.events.pop_front() {
                if e.event.enqueued_ms >= cutoff {
                    p.events.push_front(e);
                    break;
                }
                *bytes = bytes.saturating_sub(event_size(&e.event));
                removed += 1;
            }
        }
        // Over the size budget, the oldest go first, one from each partition in turn.
        while *bytes > retention.max_bytes {
            let mut any = false;
            for p in partitions.iter_mut() {
                if let Some(e) = p.events.pop_front() {
                    *bytes = bytes.saturating_sub(event_size(&e.event));
                    removed += 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        Ok(removed)
    }
}

/// The value at `path` in `doc`.
fn json_at<'a>(doc: &'a serde_json::Value, path: &[String]) -> Option<&'a serde_json::Value> {
    path.iter().try_fold(doc, |v, s| v.as_object()?.get(s))
}

/// A row as a prefilter sees it: the key, the identity record and the twin document as JSON.
struct PrefilterRow<'a> {
    key: &'a IdKey,
    identity: serde_json::Value,
    twin: Option<serde_json::Value>,
}

impl PrefilterRow<'_> {
    fn passes(&self, f: &Prefilter) -> bool {
        let value = |field: &Field| -> Option<Option<serde_json::Value>> {
            // Outer None: a twin field of a row without a twin, which passes.
            Some(match field {
                Field::DeviceId => Some(serde_json::Value::String(self.key.0.clone())),
                Field::ModuleId => Some(serde_json::Value::String(self.key.1.clone())),
                Field::Identity(p) => json_at(&self.identity, p).cloned(),
                Field::Twin(p) => json_at(self.twin.as_ref()?, p).cloned(),
            })
        };
        match f {
            Prefilter::All => true,
            Prefilter::And(parts) => parts.iter().all(|p| self.passes(p)),
            Prefilter::Or(parts) => parts.iter().any(|p| self.passes(p)),
            Prefilter::Compare(field, op, c) => match value(field) {
                None => true,
                Some(v) => v.is_some_and(|v| compare_json(&v, *op, c)),
            },
            Prefilter::StartsWith(field, prefix) => match value(field) {
                None => true,
                Some(v) => v
                    .as_ref()
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|s| s.starts_with(prefix.as_str())),
            },
            Prefilter::Defined(field) => value(field).is_none_or(|v| v.is_some()),
        }
    }
}

#[async_trait]
impl QueryStore for MemoryStore {
    async fn scan_twins(&self, scan: &TwinScan) -> Result<Vec<TwinRow>> {
        use std::ops::Bound;
        let s = self.state();
        let from = match &scan.after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        let identities: Box<dyn Iterator<Item = (IdKey, ScannedIdentity)> + '_> = match scan.kind {
            ScanKind::Devices => {
                let from = match &from {
                    Bound::Excluded((d, _)) => Bound::Excluded(d.clone()),
                    _ => Bound::Unbounded,
                };
                Box::new(s.devices.range::<String, _>((from, Bound::Unbounded)).map(
                    |(id, (_, d))| {
                        (
                            (id.clone(), String::new()),
                            ScannedIdentity::Device(d.clone()),
                        )
                    },
                ))
            }
            ScanKind::Modules => Box::new(
                s.modules
                    .range((from, Bound::Unbounded))
                    .map(|(k, (_, m))| (k.clone(), ScannedIdentity::Module(m.clone()))),
            ),
        };
        let mut out = Vec::new();
        for (key, identity) in identities {
            if out.len() >= scan.limit {
                break;
            }
            let twin = s.twins.get(&key);
            let record = match &identity {
                ScannedIdentity::Device(d) => serde_json::to_value(d)?,
                ScannedIdentity::Module(m) => serde_json::to_value(m)?,
            };
            let row = PrefilterRow {
                key: &key,
                identity: record,
                twin: twin.map(|t| serde_json::from_str(&t.doc)).transpose()?,
            };
            if row.passes(&scan.filter) {
                out.push(TwinRow {
                    identity,
                    twin: twin.filter(|_| scan.with_twins).cloned(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Result<(MemoryStore, ())> {
        Ok((MemoryStore::new(), ()))
    }

    fn open_log(partitions: u32) -> Result<(MemoryTelemetry, ())> {
        Ok((MemoryTelemetry::new(partitions), ()))
    }

    crate::store_suite!(open);
    crate::telemetry_suite!(open_log);

    #[test]
    fn behaves_like_the_model() {
        if let Err(e) = crate::testsuite::model::check_against_model(open, 256, 60) {
            panic!("{e}");
        }
    }

    #[tokio::test]
    async fn retention_keeps_to_the_size_budget_oldest_first() -> Result<()> {
        let log = MemoryTelemetry::new(1);
        for t in 0..50 {
            log.append(NewEvent {
                device_id: "d".into(),
                module_id: None,
                enqueued_ms: t,
                system_properties: BTreeMap::new(),
                properties: Vec::new(),
                body: vec![0; 1_000],
            })
            .await?;
        }
        let budget = Retention {
            max_age_ms: i64::MAX / 2,
            max_bytes: 10_500,
        };
        assert_eq!(
            log.enforce_retention(budget, Timestamp::from_unix_ms(100))
                .await?,
            40
        );
        assert_eq!(log.resolve(0, StartPosition::Start).await?, 40);
        Ok(())
    }
}

/// Jobs and their device rows, by key.
#[derive(Default)]
struct JobsState {
    jobs: BTreeMap<String, String>,
    device_jobs: BTreeMap<(String, String), String>,
}

#[async_trait]
impl crate::JobStore for MemoryStore {
    async fn create_job(&self, job: crate::StoredJob) -> Result<()> {
        let mut s = lock(&self.jobs);
        if s.jobs.contains_key(&job.job_id) {
            return Err(StoreError::AlreadyExists);
        }
        s.jobs.insert(job.job_id, job.doc);
        Ok(())
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<crate::StoredJob>> {
        Ok(lock(&self.jobs)
            .jobs
            .get(job_id)
            .map(|doc| crate::StoredJob {
                job_id: job_id.to_string(),
                doc: doc.clone(),
            }))
    }

    async fn update_job(&self, job: crate::StoredJob) -> Result<()> {
        match lock(&self.jobs).jobs.get_mut(&job.job_id) {
            Some(doc) => {
                *doc = job.doc;
                Ok(())
            }
            None => Err(StoreError::NotFound),
        }
    }

    async fn list_jobs(&self, after: Option<&str>, limit: usize) -> Result<Vec<crate::StoredJob>> {
        use std::ops::Bound;
        let s = lock(&self.jobs);
        let from = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        Ok(s.jobs
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(k, v)| crate::StoredJob {
                job_id: k.clone(),
                doc: v.clone(),
            })
            .collect())
    }

    async fn put_device_jobs(&self, rows: Vec<crate::StoredDeviceJob>) -> Result<()> {
        let mut s = lock(&self.jobs);
        for row in rows {
            s.device_jobs.insert((row.job_id, row.device_id), row.doc);
        }
        Ok(())
    }

    async fn get_device_job(
        &self,
        job_id: &str,
        device_id: &str,
    ) -> Result<Option<crate::StoredDeviceJob>> {
        let key = (job_id.to_string(), device_id.to_string());
        Ok(lock(&self.jobs)
            .device_jobs
            .get(&key)
            .map(|doc| crate::StoredDeviceJob {
                job_id: key.0.clone(),
                device_id: key.1.clone(),
                doc: doc.clone(),
            }))
    }

    async fn scan_device_jobs(
        &self,
        job_id: Option<&str>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<crate::StoredDeviceJob>> {
        use std::ops::Bound;
        let s = lock(&self.jobs);
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => match job_id {
                Some(j) => Bound::Included((j.to_string(), String::new())),
                None => Bound::Unbounded,
            },
        };
        Ok(s.device_jobs
            .range((from, Bound::Unbounded))
            .take_while(|((j, _), _)| job_id.is_none_or(|want| want == j))
            .take(limit)
            .map(|((j, d), doc)| crate::StoredDeviceJob {
                job_id: j.clone(),
                device_id: d.clone(),
                doc: doc.clone(),
            })
            .collect())
    }
}

/// Provisioning records by kind and id, each with its version (the etag's source), and the ID
/// scope.
#[derive(Default)]
struct ProvisioningState {
    records: BTreeMap<(crate::ProvisioningKind, String), (u64, String)>,
    id_scope: Option<String>,
}

fn stored_provisioning(
    kind: crate::ProvisioningKind,
    id: &str,
    version: u64,
    doc: &str,
) -> crate::StoredProvisioning {
    crate::StoredProvisioning {
        kind,
        id: id.to_string(),
        doc: doc.to_string(),
        etag: etag_of(version),
    }
}

#[async_trait]
impl crate::ProvisioningStore for MemoryStore {
    async fn put_provisioning(
        &self,
        kind: crate::ProvisioningKind,
        id: &str,
        doc: String,
        if_match: IfMatch,
    ) -> Result<crate::StoredProvisioning> {
        let mut s = lock(&self.provisioning);
        let key = (kind, id.to_string());
        let current = s.records.get(&key).map(|(v, _)| *v);
        let version = match (current, &if_match) {
            (None, IfMatch::Any) => 1,
            (current, _) => check_if_match(current, &if_match)? + 1,
        };
        let out = stored_provisioning(kind, id, version, &doc);
        s.records.insert(key, (version, doc));
        Ok(out)
    }

    async fn get_provisioning(
        &self,
        kind: crate::ProvisioningKind,
        id: &str,
    ) -> Result<Option<crate::StoredProvisioning>> {
        Ok(lock(&self.provisioning)
            .records
            .get(&(kind, id.to_string()))
            .map(|(v, doc)| stored_provisioning(kind, id, *v, doc)))
    }

    async fn delete_provisioning(
        &self,
        kind: crate::ProvisioningKind,
        id: &str,
        if_match: IfMatch,
    ) -> Result<()> {
        let mut s = lock(&self.provisioning);
        let key = (kind, id.to_string());
        check_if_match(s.records.get(&key).map(|(v, _)| *v), &if_match)?;
        s.records.remove(&key);
        Ok(())
    }

    async fn list_provisioning(
        &self,
        kind: crate::ProvisioningKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::StoredProvisioning>> {
        use std::ops::Bound;
        let s = lock(&self.provisioning);
        let from = match after {
            Some(a) => Bound::Excluded((kind, a.to_string())),
            None => Bound::Included((kind, String::new())),
        };
        Ok(s.records
            .range((from, Bound::Unbounded))
            .take_while(|((k, _), _)| *k == kind)
            .take(limit)
            .map(|((k, id), (v, doc))| stored_provisioning(*k, id, *v, doc))
            .collect())
    }

    async fn ensure_id_scope(&self, candidate: String) -> Result<String> {
        Ok(lock(&self.provisioning)
            .id_scope
            .get_or_insert(candidate)
            .clone())
    }
}
