//! The model-based property test: random sequences of registry, C2D and twin operations applied
//! to a store and to a plain `BTreeMap` model of what the traits promise, comparing each
//! operation's outcome and the observable state after every step.
//!
//! [`check_against_model`] is the driver; an engine's tests call it with a constructor.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::{C2dMessage, Device, FeedbackStatus, IfMatch, Module, Store, StoreError, Timestamp};

const DEVICES: [&str; 3] = ["a", "b", "c"];
const MODULES: [&str; 2] = ["x", "y"];
/// Small, so "queue full" comes up often.
const DEPTH: usize = 3;

/// Which `If-Match` an operation sends.
#[derive(Debug, Clone, Copy)]
pub enum Tag {
    /// The etag the store last gave the record.
    Current,
    /// One it never gave.
    Stale,
    Any,
}

/// Which version a conditional twin write expects.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// What the store holds (`None` when there is no twin).
    Right,
    /// Anything else: a version when `true`, "no twin" when `false` (if there is one).
    Wrong(bool),
}

#[derive(Debug, Clone)]
pub enum Op {
    CreateDevice(usize),
    UpdateDevice(usize, Tag),
    DeleteDevice(usize, Tag),
    CreateModule(usize, usize),
    UpdateModule(usize, usize, Tag),
    DeleteModule(usize, usize, Tag),
    Enqueue(usize, Option<usize>),
    /// Settles the queued message at this index (modulo the depth), or an unknown sequence
    /// number when the index is past the end.
    Settle(usize, Option<usize>, usize),
    Purge(usize, Option<usize>),
    PutTwin(usize, Option<usize>, Expect),
}

fn tag() -> impl Strategy<Value = Tag> {
    prop_oneof![Just(Tag::Current), Just(Tag::Stale), Just(Tag::Any)]
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..DEVICES.len();
    let m = 0..MODULES.len();
    let om = proptest::option::of(0..MODULES.len());
    prop_oneof![
        3 => d.clone().prop_map(Op::CreateDevice),
        1 => (d.clone(), tag()).prop_map(|(d, t)| Op::UpdateDevice(d, t)),
        1 => (d.clone(), tag()).prop_map(|(d, t)| Op::DeleteDevice(d, t)),
        2 => (d.clone(), m.clone()).prop_map(|(d, m)| Op::CreateModule(d, m)),
        1 => (d.clone(), m.clone(), tag()).prop_map(|(d, m, t)| Op::UpdateModule(d, m, t)),
        1 => (d.clone(), m, tag()).prop_map(|(d, m, t)| Op::DeleteModule(d, m, t)),
        4 => (d.clone(), om.clone()).prop_map(|(d, m)| Op::Enqueue(d, m)),
        2 => (d.clone(), om.clone(), 0..DEPTH + 1).prop_map(|(d, m, i)| Op::Settle(d, m, i)),
        1 => (d.clone(), om.clone()).prop_map(|(d, m)| Op::Purge(d, m)),
        3 => (d, om, prop_oneof![Just(Expect::Right), any::<bool>().prop_map(Expect::Wrong)])
            .prop_map(|(d, m, e)| Op::PutTwin(d, m, e)),
    ]
}

type IdKey = (String, Option<String>);

/// What the traits promise, as plain maps. Etags are the ones the store returned (their shape
/// is the engine's); everything else is predicted.
#[derive(Default)]
struct Model {
    /// Device id -> (etag, update count, kept in `status_reason`).
    devices: BTreeMap<String, (String, u32)>,
    modules: BTreeMap<(String, String), (String, u32)>,
    queues: BTreeMap<IdKey, Vec<u64>>,
    last_seq: BTreeMap<IdKey, u64>,
    twins: BTreeMap<IdKey, (String, u64)>,
}

impl Model {
    fn registered(&self, id: &IdKey) -> bool {
        match &id.1 {
            None => self.devices.contains_key(&id.0),
            Some(m) => self.modules.contains_key(&(id.0.clone(), m.clone())),
        }
    }

    /// Queues, sequences and twins go with their identity, without feedback.
    fn drop_data(&mut self, gone: impl Fn(&IdKey) -> bool) {
        self.queues.retain(|k, _| !gone(k));
        self.last_seq.retain(|k, _| !gone(k));
        self.twins.retain(|k, _| !gone(k));
    }
}

/// An operation's result as the model can predict it.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    NotFound,
    AlreadyExists,
    PreconditionFailed,
    QueueFull,
    VersionMismatch,
    Failed(String),
}

fn outcome<T>(r: &crate::Result<T>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(StoreError::NotFound) => Outcome::NotFound,
        Err(StoreError::AlreadyExists) => Outcome::AlreadyExists,
        Err(StoreError::PreconditionFailed) => Outcome::PreconditionFailed,
        Err(StoreError::QueueFull) => Outcome::QueueFull,
        Err(StoreError::VersionMismatch) => Outcome::VersionMismatch,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn if_match(tag: Tag, current: Option<&String>) -> IfMatch {
    match (tag, current) {
        (Tag::Current, Some(e)) => IfMatch::Etag(e.clone()),
        (Tag::Current, None) | (Tag::Any, _) => IfMatch::Any,
        (Tag::Stale, _) => IfMatch::Etag("c3RhbGU=".into()),
    }
}

/// What a write with `tag` on a record (`current` its model entry) must answer.
fn expected_write(tag: Tag, exists: bool) -> Outcome {
    match (exists, tag) {
        (false, _) => Outcome::NotFound,
        (true, Tag::Stale) => Outcome::PreconditionFailed,
        (true, _) => Outcome::Ok,
    }
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

fn check_outcome(op: &Op, want: Outcome, got: Outcome) -> Result<(), String> {
    check!(
        want == got,
        "{op:?}: the model says {want:?}, the store {got:?}"
    );
    Ok(())
}

fn identity(d: usize, m: Option<usize>) -> IdKey {
    (DEVICES[d].to_string(), m.map(|m| MODULES[m].to_string()))
}

async fn apply<S: Store>(store: &S, model: &mut Model, op: &Op, step: usize) -> Result<(), String> {
    let now = Timestamp::from_unix_ms(1_000_000);
    match *op {
        Op::CreateDevice(d) => {
            let id = DEVICES[d];
            let r = store
                .create_device(Device {
                    device_id: id.into(),
                    status_reason: Some("0".into()),
                    ..Default::default()
                })
                .await;
            let want = if model.devices.contains_key(id) {
                Outcome::AlreadyExists
            } else {
                Outcome::Ok
            };
            check_outcome(op, want, outcome(&r))?;
            if let Ok(dev) = r {
                model.devices.insert(id.into(), (dev.etag, 0));
            }
        }
        Op::UpdateDevice(d, tag) => {
            let id = DEVICES[d];
            let current = model.devices.get(id).cloned();
            let updates = current.as_ref().map_or(0, |c| c.1) + 1;
            let r = store
                .update_device(
                    Device {
                        device_id: id.into(),
                        status_reason: Some(updates.to_string()),
                        ..Default::default()
                    },
                    if_match(tag, current.as_ref().map(|c| &c.0)),
                )
                .await;
            check_outcome(op, expected_write(tag, current.is_some()), outcome(&r))?;
            if let (Ok(dev), Some((old, _))) = (r, current) {
                check!(dev.etag != old, "{op:?}: the etag did not change");
                model.devices.insert(id.into(), (dev.etag, updates));
            }
        }
        Op::DeleteDevice(d, tag) => {
            let id = DEVICES[d];
            let current = model.devices.get(id).map(|c| c.0.clone());
            let r = store
                .delete_device(id, if_match(tag, current.as_ref()))
                .await;
            check_outcome(op, expected_write(tag, current.is_some()), outcome(&r))?;
            if r.is_ok() {
                model.devices.remove(id);
                model.modules.retain(|(dev, _), _| dev != id);
                model.drop_data(|k| k.0 == id);
            }
        }
        Op::CreateModule(d, m) => {
            let key = (DEVICES[d].to_string(), MODULES[m].to_string());
            let r = store
                .create_module(Module {
                    device_id: key.0.clone(),
                    module_id: key.1.clone(),
                    managed_by: Some("0".into()),
                    ..Default::default()
                })
                .await;
            let want = if !model.devices.contains_key(&key.0) {
                Outcome::NotFound
            } else if model.modules.contains_key(&key) {
                Outcome::AlreadyExists
            } else {
                Outcome::Ok
            };
            check_outcome(op, want, outcome(&r))?;
            if let Ok(module) = r {
                model.modules.insert(key, (module.etag, 0));
            }
        }
        Op::UpdateModule(d, m, tag) => {
            let key = (DEVICES[d].to_string(), MODULES[m].to_string());
            let current = model.modules.get(&key).cloned();
            let updates = current.as_ref().map_or(0, |c| c.1) + 1;
            let r = store
                .update_module(
                    Module {
                        device_id: key.0.clone(),
                        module_id: key.1.clone(),
                        managed_by: Some(updates.to_string()),
                        ..Default::default()
                    },
                    if_match(tag, current.as_ref().map(|c| &c.0)),
                )
                .await;
            check_outcome(op, expected_write(tag, current.is_some()), outcome(&r))?;
            if let (Ok(module), Some((old, _))) = (r, current) {
                check!(module.etag != old, "{op:?}: the etag did not change");
                model.modules.insert(key, (module.etag, updates));
            }
        }
        Op::DeleteModule(d, m, tag) => {
            let key = (DEVICES[d].to_string(), MODULES[m].to_string());
            let current = model.modules.get(&key).map(|c| c.0.clone());
            let r = store
                .delete_module(&key.0, &key.1, if_match(tag, current.as_ref()))
                .await;
            check_outcome(op, expected_write(tag, current.is_some()), outcome(&r))?;
            if r.is_ok() {
                model.modules.remove(&key);
                let id = (key.0, Some(key.1));
                model.drop_data(|k| *k == id);
            }
        }
        Op::Enqueue(d, m) => {
            let id = identity(d, m);
            let r = store
                .c2d_enqueue(
                    C2dMessage {
                        device_id: id.0.clone(),
                        module_id: id.1.clone(),
                        message_id: format!("m{step}"),
                        enqueued_time_ms: 1,
                        expiry_time_ms: i64::MAX,
                        payload: vec![step as u8],
                        ..Default::default()
                    },
                    DEPTH,
                )
                .await;
            let queued = model.queues.get(&id).map_or(0, Vec::len);
            let want = if !model.registered(&id) {
                Outcome::NotFound
            } else if queued >= DEPTH {
                Outcome::QueueFull
            } else {
                Outcome::Ok
            };
            check_outcome(op, want, outcome(&r))?;
            if let Ok(msg) = r {
                let seq = model.last_seq.entry(id.clone()).or_insert(0);
                *seq += 1;
                check!(
                    msg.sequence_number == *seq,
                    "{op:?}: sequence {} where the model says {seq}",
                    msg.sequence_number
                );
                model.queues.entry(id).or_default().push(*seq);
            }
        }
        Op::Settle(d, m, i) => {
            let id = identity(d, m);
            let queue = model.queues.get(&id).cloned().unwrap_or_default();
            let seq = queue.get(i).copied().unwrap_or(1_000);
            let r = store
                .c2d_settle(&id.0, id.1.as_deref(), seq, FeedbackStatus::Success, now)
                .await
                .map_err(|e| e.to_string())?;
            let settled = r.map(|m| m.sequence_number);
            let want = queue.contains(&seq).then_some(seq);
            check!(
                settled == want,
                "{op:?}: settled {settled:?}, the model says {want:?}"
            );
            if let Some(q) = model.queues.get_mut(&id) {
                q.retain(|s| *s != seq);
            }
        }
        Op::Purge(d, m) => {
            let id = identity(d, m);
            let n = store
                .c2d_purge(&id.0, id.1.as_deref(), now)
                .await
                .map_err(|e| e.to_string())?;
            let want = model.queues.remove(&id).map_or(0, |q| q.len() as u64);
            check!(n == want, "{op:?}: purged {n}, the model says {want}");
        }
        Op::PutTwin(d, m, expect) => {
            let id = identity(d, m);
            let stored = model.twins.get(&id).map(|t| t.1);
            let expected = match (expect, stored) {
                (Expect::Right, v) => v,
                (Expect::Wrong(_), None) => Some(1),
                (Expect::Wrong(true), Some(v)) => Some(v + 1),
                (Expect::Wrong(false), Some(_)) => None,
            };
            let doc = format!("{{\"step\":{step}}}");
            let r = store
                .put_twin(&id.0, id.1.as_deref(), doc.clone(), expected)
                .await;
            let want = match expect {
                Expect::Right => Outcome::Ok,
                Expect::Wrong(_) => Outcome::VersionMismatch,
            };
            check_outcome(op, want, outcome(&r))?;
            if let Ok(v) = r {
                let predicted = stored.map_or(1, |s| s + 1);
                check!(
                    v == predicted,
                    "{op:?}: version {v}, the model says {predicted}"
                );
                model.twins.insert(id, (doc, v));
            }
        }
    }
    Ok(())
}

/// Compares everything a caller can read with the model.
async fn compare<S: Store>(store: &S, model: &Model, step: usize) -> Result<(), String> {
    let e = |e: StoreError| format!("step {step}: {e}");
    let devices: Vec<(String, String, Option<String>)> = store
        .list_devices(100)
        .await
        .map_err(e)?
        .into_iter()
        .map(|d| (d.device_id, d.etag, d.status_reason))
        .collect();
    let want: Vec<_> = model
        .devices
        .iter()
        .map(|(id, (etag, n))| (id.clone(), etag.clone(), Some(n.to_string())))
        .collect();
    check!(
        devices == want,
        "step {step}: devices {devices:?}, model {want:?}"
    );
    for d in DEVICES {
        let modules: Vec<(String, String, Option<String>)> = store
            .list_modules(d)
            .await
            .map_err(e)?
            .into_iter()
            .map(|m| (m.module_id, m.etag, m.managed_by))
            .collect();
        let want: Vec<_> = model
            .modules
            .iter()
            .filter(|((dev, _), _)| dev == d)
            .map(|((_, m), (etag, n))| (m.clone(), etag.clone(), Some(n.to_string())))
            .collect();
        check!(
            modules == want,
            "step {step}: modules of {d} {modules:?}, model {want:?}"
        );
        for m in std::iter::once(None).chain(MODULES.iter().map(|m| Some(*m))) {
            let id = (d.to_string(), m.map(String::from));
            let queued = seqs_of(store.c2d_peek(d, m, 0, 100).await.map_err(e)?);
            let want = model.queues.get(&id).cloned().unwrap_or_default();
            check!(
                queued == want,
                "step {step}: queue {id:?} {queued:?}, model {want:?}"
            );
            let count = store.c2d_count(d, m).await.map_err(e)?;
            check!(
                count == want.len() as u64,
                "step {step}: count of {id:?} is {count}"
            );
            let twin = store
                .get_twin(d, m)
                .await
                .map_err(e)?
                .map(|t| (t.doc, t.version));
            let want = model.twins.get(&id).cloned();
            check!(
                twin == want,
                "step {step}: twin {id:?} {twin:?}, model {want:?}"
            );
        }
    }
    let counts = store.c2d_counts(&DEVICES).await.map_err(e)?;
    let want: HashMap<String, u64> = DEVICES
        .iter()
        .map(|d| {
            let id = (d.to_string(), None);
            (
                d.to_string(),
                model.queues.get(&id).map_or(0, |q| q.len() as u64),
            )
        })
        .collect();
    check!(
        counts == want,
        "step {step}: counts {counts:?}, model {want:?}"
    );
    Ok(())
}

fn seqs_of(msgs: Vec<C2dMessage>) -> Vec<u64> {
    msgs.into_iter().map(|m| m.sequence_number).collect()
}

async fn run_case<S: Store>(store: &S, ops: &[Op]) -> Result<(), String> {
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        apply(store, &mut model, op, step).await?;
        compare(store, &model, step).await?;
    }
    Ok(())
}

/// Runs `cases` random sequences of up to `max_ops` operations, each on a fresh store from
/// `open` (which returns the store and whatever must outlive it) and its own current-thread
/// runtime. Fails with the shrunk sequence and the first divergence.
pub fn check_against_model<S, G, F>(open: F, cases: u32, max_ops: usize) -> Result<(), String>
where
    S: Store,
    F: Fn() -> crate::Result<(S, G)>,
{
    let config = Config {
        cases,
        // No regression files: the engines' crates run this from different directories.
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let ops = proptest::collection::vec(op(), 1..=max_ops);
    runner
        .run(&ops, |ops| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (store, guard) = open().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let result = rt.block_on(run_case(&store, &ops));
            drop(store);
            drop(guard);
            result.map_err(TestCaseError::fail)
        })
        .map_err(|e| e.to_string())
}
