//! `ferrohub device import FILE`: registry entries from a JSON-lines file (one IoT Hub
//! `ExportImportDevice` per line, as `az iot hub device-identity export` writes them), sent to
//! the bulk API (`POST /devices`) in batches of 100, with a summary and every failure.

use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use super::{ApiClient, OutputFormat};
use crate::api::types::{BulkError, BulkResult, ImportMode};

/// As many entries as one bulk call takes (IoT Hub's limit).
const BATCH: usize = ferrohub_hub::bulk::MAX_BULK_ENTRIES;

/// What the import did, in all its batches.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImportSummary {
    entries: usize,
    succeeded: usize,
    /// Entries the hub refused, and lines that were not entries at all (never sent).
    errors: Vec<ImportFailure>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImportFailure {
    line: usize,
    device_id: String,
    error_code: String,
    error_status: String,
}

/// Reads one line as an entry: `deviceId` is taken for `id` (a `DeviceResponse` line works
/// too), and a line without `importMode` gets `mode`.
fn entry_of(line: &str, mode: ImportMode) -> Result<Value, String> {
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    if !obj.contains_key("id") {
        let id = obj
            .remove("deviceId")
            .ok_or("the entry has no id (or deviceId)")?;
        obj.insert("id".into(), id);
    }
    if !obj.contains_key("importMode") {
        obj.insert("importMode".into(), Value::String(mode.name().into()));
    }
    Ok(v)
}

pub async fn run_import(
    api: &ApiClient,
    file: &Path,
    mode: ImportMode,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
        ))
    };
    let mut summary = ImportSummary::default();
    // (line number, entry) of the batch being filled.
    let mut batch: Vec<(usize, Value)> = Vec::with_capacity(BATCH);
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        summary.entries += 1;
        match entry_of(&line, mode) {
            Ok(entry) => batch.push((line_no, entry)),
            Err(why) => summary.errors.push(ImportFailure {
                line: line_no,
                device_id: String::new(),
                error_code: "ArgumentInvalid".into(),
                error_status: why,
            }),
        }
        if batch.len() == BATCH {
            send_batch(api, &mut batch, &mut summary).await?;
        }
    }
    if !batch.is_empty() {
        send_batch(api, &mut batch, &mut summary).await?;
    }
    summary.errors.sort_by_key(|f| f.line);
    print_summary(&summary, format)?;
    if !summary.errors.is_empty() {
        anyhow::bail!(
            "{} of {} entries failed",
            summary.errors.len(),
            summary.entries
        );
    }
    Ok(())
}

async fn send_batch(
    api: &ApiClient,
    batch: &mut Vec<(usize, Value)>,
    summary: &mut ImportSummary,
) -> anyhow::Result<()> {
    let (lines, entries): (Vec<usize>, Vec<Value>) = std::mem::take(batch).into_iter().unzip();
    let first = lines.first().copied().unwrap_or(0);
    let result: BulkResult = match api.post_as("/devices", &entries, None).await {
        Ok(r) => r,
        // A batch refused as a whole (an id twice in it, say) fails each of its entries; the
        // batches before and after it still count.
        Err(e) => {
            for (line, entry) in lines.iter().zip(&entries) {
                summary.errors.push(ImportFailure {
                    line: *line,
                    device_id: entry
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    error_code: "BatchRefused".into(),
                    error_status: format!("the batch starting at line {first} was refused: {e:#}"),
                });
            }
            return Ok(());
        }
    };
    // Errors name devices; map them back to lines (ids are unique within a batch).
    let line_of = |e: &BulkError| {
        entries
            .iter()
            .position(|v| v.get("id").and_then(Value::as_str) == Some(e.device_id.as_str()))
            .and_then(|i| lines.get(i).copied())
            .unwrap_or(first)
    };
    summary.succeeded += entries.len() - result.errors.len().min(entries.len());
    for e in result.errors {
        summary.errors.push(ImportFailure {
            line: line_of(&e),
            device_id: e.device_id,
            error_code: e.error_code,
            error_status: e.error_status,
        });
    }
    Ok(())
}

fn print_summary(s: &ImportSummary, format: OutputFormat) -> anyhow::Result<()> {
    if format == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!(
        "imported {} of {} entries, {} failed",
        s.succeeded,
        s.entries,
        s.errors.len()
    );
    for f in &s.errors {
        println!(
            "line {}: {}: {}: {}",
            f.line,
            if f.device_id.is_empty() {
                "-"
            } else {
                &f.device_id
            },
            f.error_code,
            f.error_status
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_entries_with_id_and_mode() {
        let e = entry_of(
            r#"{"deviceId":"d1","status":"disabled"}"#,
            ImportMode::Create,
        )
        .expect("an entry");
        assert_eq!(e["id"], "d1");
        assert_eq!(e["importMode"], "create");
        assert!(e.get("deviceId").is_none());
        let e =
            entry_of(r#"{"id":"d2","importMode":"delete"}"#, ImportMode::Create).expect("an entry");
        assert_eq!(e["importMode"], "delete", "a line's own mode wins");
        assert!(entry_of("[1]", ImportMode::Create).is_err());
        assert!(entry_of("{", ImportMode::Create).is_err());
        assert!(entry_of(r#"{"status":"enabled"}"#, ImportMode::Create).is_err());
    }
}
