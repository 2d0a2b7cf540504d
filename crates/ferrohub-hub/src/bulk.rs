//! Bulk registry operations (`POST /devices` with an array): up to 100 import entries, each
//! created, updated, deleted or twin-updated on its own, in IoT Hub's `ExportImportDevice` and
//! `BulkRegistryOperationResult` shapes. One entry failing never stops another.
//!
//! The answer to a batch in which some entries failed is still a success of the call (200 with
//! `isSuccessful: false`): the C# SDK turns a 400 from this endpoint into an exception, yet its
//! callers read `IsSuccessful` and `Errors` for per-device failures, so those arrive with 200.
//! Only a batch that cannot be read as one (not an array, empty, too long, an id twice) is
//! refused as a whole.

use std::collections::HashSet;

use ferrohub_iothub::{validate_device_id, ErrorCode, Identity};
use ferrohub_store::{Capabilities, IfMatch, Status};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::info;

use crate::error::HubError;
use crate::registry::{AuthRequest, IdentityRequest};
use crate::Hub;

/// Most entries one call takes (IoT Hub's limit).
pub const MAX_BULK_ENTRIES: usize = 100;

/// What to do with one entry, as IoT Hub's `importMode` names it. Read without regard to case:
/// the Python SDK sends `create`, the Node SDK `create`, `Update`, `UpdateIfMatchETag`,
/// `Delete` and `DeleteIfMatchETag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum ImportMode {
    Create,
    /// The default of IoT Hub's import jobs: create, or overwrite whatever the etag.
    CreateOrUpdate,
    Update,
    UpdateIfMatchETag,
    Delete,
    DeleteIfMatchETag,
    UpdateTwin,
    UpdateTwinIfMatchETag,
}

impl ImportMode {
    const ALL: [ImportMode; 8] = [
        ImportMode::Create,
        ImportMode::CreateOrUpdate,
        ImportMode::Update,
        ImportMode::UpdateIfMatchETag,
        ImportMode::Delete,
        ImportMode::DeleteIfMatchETag,
        ImportMode::UpdateTwin,
        ImportMode::UpdateTwinIfMatchETag,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ImportMode::Create => "create",
            ImportMode::CreateOrUpdate => "createOrUpdate",
            ImportMode::Update => "update",
            ImportMode::UpdateIfMatchETag => "updateIfMatchETag",
            ImportMode::Delete => "delete",
            ImportMode::DeleteIfMatchETag => "deleteIfMatchETag",
            ImportMode::UpdateTwin => "updateTwin",
            ImportMode::UpdateTwinIfMatchETag => "updateTwinIfMatchETag",
        }
    }
}

impl TryFrom<String> for ImportMode {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        ImportMode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(&s))
            .ok_or_else(|| format!("unknown importMode {s:?}"))
    }
}

impl From<ImportMode> for &'static str {
    fn from(m: ImportMode) -> Self {
        m.name()
    }
}

/// The twin part of an entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Value>,
    /// Reported properties are the device's to write; an entry carrying them gets a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Value>,
}

/// One entry of a bulk call (IoT Hub's `ExportImportDevice`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportEntry {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    pub import_mode: ImportMode,
    /// The device's etag, for the `IfMatchETag` modes (`eTag` on the wire; `etag` too, as the
    /// Node SDK passes its `Device` objects through).
    #[serde(default, alias = "etag", skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// The twin's etag, for `updateTwinIfMatchETag`.
    #[serde(
        default,
        rename = "twinETag",
        alias = "twinEtag",
        skip_serializing_if = "Option::is_none"
    )]
    pub twin_etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<ImportProperties>,
}

/// An entry that failed (IoT Hub's `DeviceRegistryOperationError`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkError {
    pub device_id: String,
    /// The IoT Hub error code's name (`DeviceAlreadyExists`, ...).
    pub error_code: String,
    pub error_status: String,
}

/// Something an entry asked for that was not done, though the entry succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkWarning {
    pub device_id: String,
    pub warning_code: String,
    pub warning_status: String,
}

/// IoT Hub's `BulkRegistryOperationResult`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkResult {
    pub is_successful: bool,
    #[serde(default)]
    pub errors: Vec<BulkError>,
    #[serde(default)]
    pub warnings: Vec<BulkWarning>,
}

/// The outcome of one entry.
type EntryOutcome = (usize, Result<Option<BulkWarning>, BulkError>);

fn failure(device_id: &str, e: &HubError) -> BulkError {
    BulkError {
        device_id: device_id.to_string(),
        error_code: e.code().name().to_string(),
        error_status: e.message().to_string(),
    }
}

/// Reads one entry; a malformed one fails alone, under whatever id it names.
fn read_entry(raw: Value) -> Result<ImportEntry, BulkError> {
    let id = raw
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    serde_json::from_value(raw).map_err(|e| {
        failure(
            &id,
            &HubError::argument(format!("invalid import entry: {e}")),
        )
    })
}

fn needs(tag: &Option<String>, mode: ImportMode, what: &str) -> Result<IfMatch, HubError> {
    match tag.as_deref().map(str::trim) {
        Some(t) if !t.is_empty() && t != "*" && t != "\"*\"" => Ok(IfMatch::from_header(Some(t))),
        _ => Err(HubError::argument(format!(
            "importMode {} needs {what}",
            mode.name()
        ))),
    }
}

/// The twin patch an entry carries, if any: tags and desired properties.
fn twin_patch(e: &ImportEntry) -> Option<Value> {
    let mut patch = Map::new();
    if let Some(tags) = &e.tags {
        patch.insert("tags".into(), tags.clone());
    }
    if let Some(desired) = e.properties.as_ref().and_then(|p| p.desired.clone()) {
        patch.insert(
            "properties".into(),
            serde_json::json!({ "desired": desired }),
        );
    }
    (!patch.is_empty()).then_some(Value::Object(patch))
}

impl Hub {
    /// Applies up to [`MAX_BULK_ENTRIES`] import entries, each on its own and all at once
    /// (distinct devices, so the store's writer commits them together), and says which
    /// failed. The batch runs to its end even if the caller leaves.
    pub async fn bulk_registry(&self, entries: Vec<Value>) -> Result<BulkResult, HubError> {
        if entries.is_empty() {
            return Err(HubError::argument("the bulk request has no entries"));
        }
        if entries.len() > MAX_BULK_ENTRIES {
            return Err(HubError::new(
                ErrorCode::TooManyDevices,
                format!(
                    "a bulk request takes at most {MAX_BULK_ENTRIES} devices, this one has {}",
                    entries.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for id in entries
            .iter()
            .filter_map(|e| e.get("id").and_then(Value::as_str))
        {
            if !seen.insert(id) {
                return Err(HubError::argument(format!(
                    "device {id} appears more than once in the bulk request"
                )));
            }
        }
        self.to_the_end(move |hub| async move {
            let mut tasks = tokio::task::JoinSet::new();
            let count = entries.len();
            for (i, raw) in entries.into_iter().enumerate() {
                let hub = hub.clone();
                tasks.spawn(async move {
                    let outcome = match read_entry(raw) {
                        Err(e) => Err(e),
                        Ok(entry) => {
                            let id = entry.id.clone();
                            hub.apply_entry(entry).await.map_err(|e| failure(&id, &e))
                        }
                    };
                    (i, outcome)
                });
            }
            let mut outcomes: Vec<EntryOutcome> = Vec::with_capacity(count);
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(e) => return Err(HubError::internal("bulk registry entry", e)),
                }
            }
            outcomes.sort_by_key(|(i, _)| *i);
            let mut result = BulkResult::default();
            for (_, outcome) in outcomes {
                match outcome {
                    Ok(warning) => result.warnings.extend(warning),
                    Err(e) => {
                        info!(
                            device = %e.device_id,
                            error_code = %e.error_code,
                            reason = %e.error_status,
                            "bulk registry entry refused"
                        );
                        result.errors.push(e);
                    }
                }
            }
            result.is_successful = result.errors.is_empty();
            info!(
                entries = count,
                failed = result.errors.len(),
                "bulk registry operation"
            );
            Ok(result)
        })
        .await
    }

    async fn apply_entry(&self, e: ImportEntry) -> Result<Option<BulkWarning>, HubError> {
        validate_device_id(&e.id)
            .map_err(|err| HubError::argument(format!("invalid device id: {err}")))?;
        if e.module_id.is_some() {
            return Err(HubError::argument(
                "bulk entries for modules are not supported; use PUT /devices/{id}/modules/{mid}",
            ));
        }
        let mode = e.import_mode;
        let req = IdentityRequest {
            device_id: None,
            module_id: None,
            status: e.status,
            status_reason: e.status_reason.clone(),
            authentication: e.authentication.clone(),
            capabilities: e.capabilities.clone(),
            managed_by: None,
        };
        let identity = Identity::device(e.id.clone());
        let twin_cond = match mode {
            ImportMode::UpdateTwinIfMatchETag => needs(&e.twin_etag, mode, "a twinETag")?,
            _ => IfMatch::Any,
        };
        match mode {
            ImportMode::Create => {
                self.put_device_now(&e.id, req, None).await?;
            }
            ImportMode::CreateOrUpdate => {
                self.put_device_now(&e.id, req, Some(IfMatch::Any)).await?;
            }
            ImportMode::Update => {
                self.update_device_now(&e.id, req, IfMatch::Any).await?;
            }
            ImportMode::UpdateIfMatchETag => {
                let cond = needs(&e.e_tag, mode, "an eTag")?;
                self.update_device_now(&e.id, req, cond).await?;
            }
            ImportMode::Delete => {
                return self.delete_device(&e.id, IfMatch::Any).await.map(|_| None)
            }
            ImportMode::DeleteIfMatchETag => {
                let cond = needs(&e.e_tag, mode, "an eTag")?;
                return self.delete_device(&e.id, cond).await.map(|_| None);
            }
            ImportMode::UpdateTwin | ImportMode::UpdateTwinIfMatchETag => {}
        }
        if let Some(patch) = twin_patch(&e) {
            self.update_twin(&identity, patch, false, twin_cond).await?;
        } else if matches!(
            mode,
            ImportMode::UpdateTwin | ImportMode::UpdateTwinIfMatchETag
        ) {
            return Err(HubError::argument(format!(
                "importMode {} needs tags or properties.desired",
                mode.name()
            )));
        }
        let reported = e.properties.as_ref().is_some_and(|p| p.reported.is_some());
        Ok(reported.then(|| BulkWarning {
            device_id: e.id.clone(),
            warning_code: "ReportedPropertiesIgnored".into(),
            warning_status: "reported properties are the device's to write; they were not applied"
                .into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_modes_are_read_whatever_their_case() {
        for (text, mode) in [
            ("create", ImportMode::Create),
            ("Update", ImportMode::Update),
            ("UpdateIfMatchETag", ImportMode::UpdateIfMatchETag),
            ("DELETEIFMATCHETAG", ImportMode::DeleteIfMatchETag),
            ("updateTwin", ImportMode::UpdateTwin),
        ] {
            let got: ImportMode =
                serde_json::from_value(Value::String(text.into())).expect("a known mode");
            assert_eq!(got, mode, "{text}");
        }
        assert!(serde_json::from_value::<ImportMode>(Value::String("upsert".into())).is_err());
        assert_eq!(
            serde_json::to_value(ImportMode::UpdateTwinIfMatchETag).ok(),
            Some(Value::String("updateTwinIfMatchETag".into()))
        );
    }

    #[test]
    fn a_malformed_entry_fails_under_its_own_id() {
        let e = read_entry(serde_json::json!({"id": "d1", "importMode": "sideways"}))
            .expect_err("unknown mode");
        assert_eq!(e.device_id, "d1");
        assert_eq!(e.error_code, "ArgumentInvalid");
    }
}
