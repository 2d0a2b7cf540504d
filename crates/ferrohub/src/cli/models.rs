//! `ferrohub model add FILE|DIR | list | show ID [--expanded] | remove ID | check DEVICE`: the
//! IoT Plug and Play model repository over `/models`, and live conformance findings.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::Value;

use super::client::ApiClient;
use super::output::Output;
use super::{enc, ClientArgs, OutputFormat};
use crate::api::types::{ModelSummary, ModelsAdded};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Add DTDL interfaces: a file (one interface, or an array as in `.expanded.json`), or a
    /// directory, whose `.json` files are added one by one (subdirectories too).
    Add { path: PathBuf },
    /// List the models added to the hub.
    List,
    /// Show a model's document.
    Show {
        id: String,
        /// With everything it extends and its components' interfaces, as one array.
        #[arg(long)]
        expanded: bool,
    },
    /// Remove a model (devices that announced it keep their model id).
    Remove { id: String },
    /// Show what live conformance found for a device (or module): whether its telemetry,
    /// reported properties and the commands sent to it follow its model and the conventions.
    Check {
        device: String,
        #[arg(long)]
        module: Option<String>,
    },
}

/// The `.json` files under `dir`, sorted, so runs are repeatable.
fn json_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            json_files(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
    Ok(())
}

pub async fn run_model(args: &ClientArgs, cmd: ModelCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        ModelCommand::Add { path } => {
            let mut files = Vec::new();
            if path.is_dir() {
                json_files(&path, &mut files)?;
                if files.is_empty() {
                    bail!("{} holds no .json files", path.display());
                }
            } else {
                files.push(path);
            }
            let mut results = Vec::new();
            let mut failed = 0;
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let doc: Value = match serde_json::from_str(&text) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("{}: not JSON: {e}", file.display());
                        failed += 1;
                        continue;
                    }
                };
                match api.post_as::<_, ModelsAdded>("/models", &doc, None).await {
                    Ok(added) => {
                        if args.output == OutputFormat::Text {
                            for id in &added.ids {
                                let how = if added.new.contains(id) {
                                    "added"
                                } else {
                                    "already stored"
                                };
                                println!("{how} {id} ({})", file.display());
                            }
                        }
                        results.push(added);
                    }
                    Err(e) => {
                        eprintln!("{}: {e:#}", file.display());
                        failed += 1;
                    }
                }
            }
            // Only what is still missing once every file is in.
            let listed: Vec<ModelSummary> = api.get_as("/models").await?;
            let mut missing: Vec<&String> = results
                .iter()
                .flat_map(|r| &r.missing)
                .filter(|m| !listed.iter().any(|l| &l.id == *m))
                .collect();
            missing.sort();
            missing.dedup();
            if args.output == OutputFormat::Json {
                out.json(&results)?;
            } else {
                for m in &missing {
                    println!("missing {m} (needed by a model added; add it, or serve it with --model-dir)");
                }
            }
            if failed > 0 {
                bail!("{failed} of {} files were not added", files.len());
            }
            Ok(())
        }
        ModelCommand::List => {
            let list: Vec<ModelSummary> = api.get_as("/models").await?;
            if args.output == OutputFormat::Json {
                return out.json(&list);
            }
            if list.is_empty() {
                println!("(none)");
            }
            for m in &list {
                let name = match &m.display_name {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Object(langs)) => langs
                        .get("en")
                        .or_else(|| langs.values().next())
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    _ => String::new(),
                };
                println!("{:<56} {:<30} {}", m.id, name, m.created_date_time_utc);
            }
            Ok(())
        }
        ModelCommand::Show { id, expanded } => {
            let path = format!(
                "/models/{}{}",
                enc(&id),
                if expanded { "?expanded=true" } else { "" }
            );
            let doc: Value = api.get_as(&path).await?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(())
        }
        ModelCommand::Check { device, module } => {
            let path = match &module {
                None => format!("/digitaltwins/{}/conformance", enc(&device)),
                Some(m) => format!(
                    "/digitaltwins/{}/modules/{}/conformance",
                    enc(&device),
                    enc(m)
                ),
            };
            let report: Value = api.get_as(&path).await?;
            if args.output == OutputFormat::Json {
                return out.json(&report);
            }
            let model = report["modelId"].as_str().unwrap_or("(none announced yet)");
            println!("model    {model}");
            println!("checked  {}", report["checked"].as_u64().unwrap_or(0));
            let findings = report["findings"].as_object().cloned().unwrap_or_default();
            if findings.is_empty() {
                println!("findings none");
            }
            for (kind, n) in &findings {
                println!("finding  {kind}: {n}");
            }
            for e in report["examples"].as_array().into_iter().flatten() {
                println!(
                    "  {} {} {}: {}\n    {}",
                    e["time"].as_str().unwrap_or_default(),
                    e["source"].as_str().unwrap_or_default(),
                    e["kind"].as_str().unwrap_or_default(),
                    e["detail"].as_str().unwrap_or_default(),
                    e["excerpt"].as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
        ModelCommand::Remove { id } => {
            api.delete(&format!("/models/{}", enc(&id)), None).await?;
            out.done(&format!("removed model {id}"))
        }
    }
}
