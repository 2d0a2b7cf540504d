//! The IoT Plug and Play model repository: DTDL interfaces added (checked by `ferrohub-dtdl`),
//! read, listed and removed, stored durably and immutable under their DTMI; plus, when
//! configured, a read-only directory laid out as the public Device Models Repository
//! (`dtmi/com/example/thermostat-1.json`, or the `.expanded.json` form), so an offline site can
//! mirror the public repository. Resolution reads the stored models first, then the directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ferrohub_dtdl::{parse::parse_value, Dtmi, Model, ModelSet};
use ferrohub_iothub::ErrorCode;
use ferrohub_store::{StoreError, StoredModel, Timestamp};
use serde_json::Value;

use crate::error::HubError;
use crate::Hub;

/// The largest model document accepted, in bytes (the REST body limit is larger; a DTDL
/// interface of 300 contents fits in far less).
pub const MAX_MODEL_DOCUMENT: usize = 1024 * 1024;

/// How many interfaces one resolution may read (a model, what it extends, its components').
const MAX_CLOSURE: usize = 64;

/// Where the model repository's documents come from.
#[derive(Debug, Clone, Default)]
pub struct ModelSettings {
    /// A read-only Device Models Repository mirror, searched after the stored models.
    pub directory: Option<PathBuf>,
}

/// What adding a document did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedModels {
    /// The interfaces the document declared at its top level, in document order.
    pub ids: Vec<String>,
    /// Of those, the ones that were new (the rest were stored before, unchanged).
    pub new: Vec<String>,
    /// Interfaces these need that the repository does not hold yet.
    pub missing: Vec<String>,
}

/// Where a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    Store,
    Directory,
}

fn not_found(id: &str) -> HubError {
    // IoT Hub has no model repository, so no code of its own for a missing model.
    HubError::new(
        ErrorCode::InvalidOperation,
        format!("Model {id} cannot be found."),
    )
    .with_status(404)
}

fn parse_id(id: &str) -> Result<Dtmi, HubError> {
    Dtmi::parse(id).map_err(|e| HubError::argument(e.to_string()))
}

impl Hub {
    /// Adds the interfaces of a DTDL document (one interface, or an array as in the expanded
    /// form). Each top-level interface is stored under its `@id` as canonical JSON; the same
    /// interface again is accepted, other contents under a stored id are refused (409): a DTMI
    /// names one immutable version. All or nothing: a refused document stores none of its
    /// interfaces.
    pub async fn add_models(&self, text: &str) -> Result<AddedModels, HubError> {
        if text.len() > MAX_MODEL_DOCUMENT {
            return Err(HubError::new(
                ErrorCode::MessageTooLarge,
                format!("a model document is at most {MAX_MODEL_DOCUMENT} bytes"),
            ));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| HubError::argument(format!("the model is not JSON: {e}")))?;
        // Checks everything (inline interfaces included) before storing anything.
        parse_value(&value).map_err(|e| HubError::argument(e.to_string()))?;
        let tops: Vec<&Value> = match &value {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        let mut docs = Vec::new();
        for top in tops {
            let id = top
                .get("@id")
                .and_then(Value::as_str)
                .ok_or_else(|| HubError::argument("an interface has no '@id'"))?;
            docs.push((
                id.to_owned(),
                serde_json::to_string(top).map_err(|e| HubError::internal("model encoding", e))?,
            ));
        }
        let mut existed = BTreeSet::new();
        for (id, doc) in &docs {
            if let Some(stored) = self.store.get_model(id).await.map_err(store_error(id))? {
                if stored.doc != *doc {
                    return Err(conflict(id));
                }
                existed.insert(id.clone());
            }
        }
        let now = Timestamp::now();
        let mut added = AddedModels {
            ids: Vec::new(),
            new: Vec::new(),
            missing: Vec::new(),
        };
        for (id, doc) in docs {
            self.store
                .put_model(&id, doc, now)
                .await
                .map_err(store_error(&id))?;
            if !existed.contains(&id) {
                added.new.push(id.clone());
            }
            added.ids.push(id);
        }
        let mut missing = BTreeSet::new();
        for id in &added.ids {
            let dtmi = parse_id(id)?;
            let (_, gone) = self.model_set(&dtmi).await?.closure(&dtmi);
            missing.extend(gone.into_iter().map(|d| d.to_string()));
        }
        added.missing = missing.into_iter().collect();
        self.models_changed();
        tracing::info!(models = ?added.ids, new = added.new.len(), missing = ?added.missing, "models added");
        Ok(added)
    }

    /// A model's document (the stored one, else the directory's) and where it came from.
    pub async fn get_model(&self, id: &str) -> Result<(Value, ModelSource), HubError> {
        let dtmi = parse_id(id)?;
        if let Some(m) = self.store.get_model(id).await.map_err(store_error(id))? {
            let doc =
                serde_json::from_str(&m.doc).map_err(|e| HubError::internal("stored model", e))?;
            return Ok((doc, ModelSource::Store));
        }
        match self.directory_model(&dtmi).await? {
            Some(doc) => Ok((doc, ModelSource::Directory)),
            None => Err(not_found(id)),
        }
    }

    /// The model and everything it needs, as one array (the repository's expanded form).
    pub async fn get_model_expanded(&self, id: &str) -> Result<Value, HubError> {
        let dtmi = parse_id(id)?;
        let (root, _) = self.get_model(id).await?;
        let set = self.model_set(&dtmi).await?;
        let (needed, missing) = set.closure(&dtmi);
        if let Some(m) = missing.iter().next() {
            return Err(HubError::new(
                ErrorCode::InvalidOperation,
                format!("Model {id} needs {m}, which cannot be found."),
            )
            .with_status(404));
        }
        let mut out = vec![root];
        for dep in needed.iter().filter(|d| **d != dtmi) {
            let (doc, _) = self.get_model(dep.as_str()).await?;
            // An interface inline in another document is in that document already.
            if !out.iter().any(|d: &Value| contains_id(d, dep.as_str())) {
                out.push(doc);
            }
        }
        Ok(Value::Array(out))
    }

    /// The stored models, by id (the directory is not listed: it may mirror thousands).
    pub async fn list_models(&self) -> Result<Vec<StoredModel>, HubError> {
        self.store
            .list_models()
            .await
            .map_err(|e| HubError::from_store(e, not_found(""), not_found("")))
    }

    /// Removes a stored model. Devices that announced it keep their model id (as IoT Hub keeps
    /// a model id it cannot resolve).
    pub async fn remove_model(&self, id: &str) -> Result<(), HubError> {
        parse_id(id)?;
        self.store.delete_model(id).await.map_err(store_error(id))?;
        self.models_changed();
        tracing::info!(model = id, "model removed");
        Ok(())
    }

    /// Resolves a model id to what a device implementing it has (see `ferrohub_dtdl::resolve`).
    pub async fn resolve_model(&self, id: &str) -> Result<Model, HubError> {
        let dtmi = parse_id(id)?;
        let set = self.model_set(&dtmi).await?;
        set.resolve(&dtmi).map_err(|e| match e {
            ferrohub_dtdl::ResolveError::NotFound(_) => not_found(id),
            other => HubError::new(ErrorCode::InvalidOperation, other.to_string()).with_status(404),
        })
    }

    /// The interfaces reachable from `id` that the repository holds.
    async fn model_set(&self, id: &Dtmi) -> Result<ModelSet, HubError> {
        let mut set = ModelSet::new();
        let mut tried = BTreeSet::new();
        let mut todo = vec![id.clone()];
        while let Some(next) = todo.pop() {
            if !tried.insert(next.clone()) {
                continue;
            }
            if tried.len() > MAX_CLOSURE {
                return Err(HubError::argument(format!(
                    "model {id} needs more than {MAX_CLOSURE} interfaces"
                )));
            }
            let doc = match self
                .store
                .get_model(next.as_str())
                .await
                .map_err(store_error(next.as_str()))?
            {
                Some(m) => serde_json::from_str(&m.doc)
                    .map_err(|e| HubError::internal("stored model", e))?,
                None => match self.directory_model(&next).await? {
                    Some(doc) => doc,
                    None => continue,
                },
            };
            let interfaces =
                parse_value(&doc).map_err(|e| HubError::argument(format!("{next}: {e}")))?;
            for i in interfaces {
                // A conflict between the store and the directory: the store's wins (first in).
                let _ = set.insert(i);
            }
            let (_, missing) = set.closure(id);
            todo.extend(missing.into_iter().filter(|m| !tried.contains(m)));
        }
        Ok(set)
    }

    /// The directory's document for `id`: `<path>.json`, else the interface of that id inside
    /// `<path>.expanded.json`.
    async fn directory_model(&self, id: &Dtmi) -> Result<Option<Value>, HubError> {
        let Some(dir) = self.settings.models.directory.clone() else {
            return Ok(None);
        };
        let plain = dir.join(id.repository_path());
        if let Some(doc) = read_json(&plain).await? {
            return Ok(Some(doc));
        }
        let expanded = dir.join(id.expanded_repository_path());
        Ok(match read_json(&expanded).await? {
            Some(Value::Array(items)) => items
                .into_iter()
                .find(|i| i.get("@id").and_then(Value::as_str) == Some(id.as_str())),
            _ => None,
        })
    }
}

fn contains_id(doc: &Value, id: &str) -> bool {
    match doc {
        Value::Object(m) => {
            m.get("@id").and_then(Value::as_str) == Some(id)
                || m.values().any(|v| contains_id(v, id))
        }
        Value::Array(a) => a.iter().any(|v| contains_id(v, id)),
        _ => false,
    }
}

/// A file's JSON, `None` when it does not exist. A file that is there but unreadable or not
/// JSON is an error naming it (the operator's mirror is broken, not the client's request).
async fn read_json(path: &Path) -> Result<Option<Value>, HubError> {
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(HubError::internal(
                &format!("reading {}", path.display()),
                e,
            ))
        }
    };
    if bytes.len() > MAX_MODEL_DOCUMENT * 8 {
        return Err(HubError::argument(format!(
            "{} is larger than a model document may be",
            path.display()
        )));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| HubError::argument(format!("{} is not JSON: {e}", path.display())))
}

fn conflict(id: &str) -> HubError {
    HubError::new(
        ErrorCode::InvalidOperation,
        format!("Model {id} is already stored with other contents; a DTMI names one immutable version, so a changed model needs a new version"),
    )
    .with_status(409)
}

fn store_error(id: &str) -> impl Fn(StoreError) -> HubError + '_ {
    move |e| HubError::from_store(e, not_found(id), conflict(id))
}
