//! Live IoT Plug and Play conformance: what devices with a model id send (telemetry, reported
//! properties) and what services invoke on them (commands) is checked against their model
//! (`ferrohub_dtdl::conformance`) as traffic flows, and the findings are kept per identity
//! (counts by kind, the latest examples with the offending message). Conformance reports; it
//! never refuses or delays anything: the traffic paths only offer an observation to a bounded
//! queue (dropped, and counted, when the checker falls behind), and one background task checks.
//!
//! Findings are node-local and in memory, like presence: a restart starts them afresh.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrohub_dtdl::conformance::{
    check_command, check_reported, check_telemetry, DesiredVersions, Finding, FindingKind,
};
use ferrohub_dtdl::Model;
use ferrohub_iothub::Identity;
use ferrohub_store::Timestamp;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::Hub;

/// Observations waiting for the checker; more are dropped (and counted).
const QUEUE: usize = 4096;
/// Examples kept per identity, newest first.
const EXAMPLES: usize = 10;
/// How much of an offending message an example keeps.
const EXCERPT_CHARS: usize = 512;
/// How long a resolved (or unresolvable) model is reused before it is looked up again.
const MODEL_TTL: Duration = Duration::from_secs(30);

/// Something a device sent or a service asked, to be checked.
#[derive(Debug)]
pub(crate) enum Observation {
    Telemetry {
        identity: Identity,
        model_id: String,
        component: Option<String>,
        body: Vec<u8>,
    },
    Reported {
        identity: Identity,
        model_id: String,
        patch: Map<String, Value>,
        /// The desired section (with `$version` and `$metadata`) when the patch was applied.
        desired: Value,
    },
    Command {
        identity: Identity,
        method: String,
        /// The device's status and payload, when it answered.
        answer: Option<(i32, Value)>,
    },
}

/// One kept example of a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Example {
    pub time: String,
    pub kind: &'static str,
    /// `telemetry`, `reportedProperties` or `command`.
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub detail: String,
    /// The start of the offending message, patch or command name.
    pub excerpt: String,
}

/// What the checker knows of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConformanceReport {
    /// The model id last checked against.
    pub model_id: Option<String>,
    /// Messages, patches and commands checked.
    pub checked: u64,
    /// Findings by kind (`unknownTelemetry`, `ackVersion`, ...).
    pub findings: BTreeMap<&'static str, u64>,
    pub examples: VecDeque<Example>,
}

/// A model resolved when, or `None` if it could not be.
type CachedModel = (Instant, Option<Arc<Model>>);

pub(crate) struct Conformance {
    /// `try_send` takes `&self`: the traffic paths offer without a lock.
    tx: mpsc::Sender<Observation>,
    rx: Mutex<Option<mpsc::Receiver<Observation>>>,
    reports: Mutex<HashMap<Identity, ConformanceReport>>,
    models: Mutex<HashMap<String, CachedModel>>,
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conformance {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            reports: Mutex::default(),
            models: Mutex::default(),
            dropped: AtomicU64::new(0),
        }
    }
}

struct Desired<'a>(&'a Value);

impl DesiredVersions for Desired<'_> {
    fn current(&self) -> u64 {
        self.0.get("$version").and_then(Value::as_u64).unwrap_or(0)
    }

    fn last_set(&self, component: Option<&str>, property: &str) -> Option<u64> {
        let mut m = self.0.get("$metadata")?;
        if let Some(c) = component {
            m = m.get(c)?;
        }
        m.get(property)?.get("$lastUpdatedVersion")?.as_u64()
    }
}

fn excerpt(text: &str) -> String {
    if text.chars().count() > EXCERPT_CHARS {
        format!(
            "{}...",
            text.chars().take(EXCERPT_CHARS).collect::<String>()
        )
    } else {
        text.to_owned()
    }
}

impl Hub {
    /// Offers an observation to the checker without waiting.
    pub(crate) fn observe(&self, obs: Observation) {
        if self.conformance.tx.try_send(obs).is_err() {
            self.conformance.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Observations dropped because the checker was behind (or not running).
    pub fn conformance_dropped(&self) -> u64 {
        self.conformance.dropped.load(Ordering::Relaxed)
    }

    /// What the checker found for an identity; `None` if it has checked nothing of it.
    pub fn conformance_report(&self, identity: &Identity) -> Option<ConformanceReport> {
        lock(&self.conformance.reports).get(identity).cloned()
    }

    /// Forgets cached models (after the repository changed).
    pub(crate) fn models_changed(&self) {
        lock(&self.conformance.models).clear();
    }

    async fn model_for_check(&self, id: &str) -> Option<Arc<Model>> {
        if let Some((at, m)) = lock(&self.conformance.models).get(id) {
            if at.elapsed() < MODEL_TTL {
                return m.clone();
            }
        }
        let resolved = self.resolve_model(id).await.ok().map(Arc::new);
        lock(&self.conformance.models).insert(id.to_owned(), (Instant::now(), resolved.clone()));
        resolved
    }

    async fn check(&self, obs: Observation) {
        let (identity, model_id, source, excerpt_text, findings) = match obs {
            Observation::Telemetry {
                identity,
                model_id,
                component,
                body,
            } => {
                let text = String::from_utf8_lossy(&body).into_owned();
                let findings = match self.model_for_check(&model_id).await {
                    Some(m) => check_telemetry(&m, component.as_deref(), &body),
                    None => vec![unknown_model(&model_id)],
                };
                (identity, model_id, "telemetry", text, findings)
            }
            Observation::Reported {
                identity,
                model_id,
                patch,
                desired,
            } => {
                let text = Value::Object(patch.clone()).to_string();
                let findings = match self.model_for_check(&model_id).await {
                    Some(m) => check_reported(&m, &patch, &Desired(&desired)),
                    None => vec![unknown_model(&model_id)],
                };
                (identity, model_id, "reportedProperties", text, findings)
            }
            Observation::Command {
                identity,
                method,
                answer,
            } => {
                // The model a command is checked against is the one the twin records.
                let Ok(twin) = self.get_twin(&identity).await else {
                    return;
                };
                let Some(model_id) = twin
                    .get("modelId")
                    .and_then(Value::as_str)
                    .filter(|m| !m.is_empty())
                else {
                    return;
                };
                let model_id = model_id.to_owned();
                let findings = match self.model_for_check(&model_id).await {
                    Some(m) => check_command(&m, &method, answer.as_ref().map(|(s, p)| (*s, p))),
                    None => vec![unknown_model(&model_id)],
                };
                // An example shows what the device answered, not only what was asked.
                let text = match &answer {
                    Some((status, payload)) => format!("{method} -> {status} {payload}"),
                    None => method,
                };
                (identity, model_id, "command", text, findings)
            }
        };
        if !findings.is_empty() {
            tracing::debug!(identity = %identity, model = %model_id, source, findings = findings.len(), "conformance findings");
        }
        let now = Timestamp::now().to_iso();
        let mut reports = lock(&self.conformance.reports);
        let report = reports.entry(identity).or_default();
        report.model_id = Some(model_id);
        report.checked += 1;
        crate::metrics::conformance_checked(findings.iter().map(|f| f.kind.name()));
        for f in findings {
            *report.findings.entry(f.kind.name()).or_default() += 1;
            report.examples.push_front(Example {
                time: now.clone(),
                kind: f.kind.name(),
                source,
                component: f.component,
                name: f.name,
                detail: f.detail,
                excerpt: excerpt(&excerpt_text),
            });
            report.examples.truncate(EXAMPLES);
        }
    }

    /// Forgets an identity's findings (it was deleted).
    pub(crate) fn forget_conformance(&self, identity: &Identity) {
        lock(&self.conformance.reports).remove(identity);
    }
}

fn unknown_model(id: &str) -> Finding {
    Finding {
        kind: FindingKind::UnknownModel,
        component: None,
        name: None,
        detail: format!(
            "the model {id} is not in the model repository (add it with `ferrohub model add`)"
        ),
    }
}

/// Checks observations until shutdown.
pub async fn conformance_loop(hub: Arc<Hub>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(mut rx) = lock(&hub.conformance.rx).take() else {
        return;
    };
    loop {
        tokio::select! {
            obs = rx.recv() => match obs {
                Some(obs) => hub.check(obs).await,
                None => return,
            },
            _ = crate::until_shutdown(&mut shutdown) => return,
        }
    }
}
