//! `ferrohub config create FILE | show ID | list | delete ID`: configurations (automatic device
//! management) over `/configurations`, like `az iot hub configuration`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;

use super::client::ApiClient;
use super::output::Output;
use super::{enc, ClientArgs, OutputFormat};
use crate::api::types::Configuration;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Create a configuration from a JSON file in IoT Hub's shape (`id`, `content`,
    /// `targetCondition`, `priority`, `metrics`, `labels`).
    Create { file: PathBuf },
    /// Show one, with its metrics.
    Show { id: String },
    /// List configurations.
    List {
        /// At most this many.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Delete one (what it wrote to twins stays).
    Delete { id: String },
}

fn print(out: OutputFormat, c: &Configuration, headline: &str) -> anyhow::Result<()> {
    if out == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(c)?);
        return Ok(());
    }
    if !headline.is_empty() {
        println!("{headline} {}", c.id);
    }
    let results = c.system_metrics.as_ref().map(|m| &m.results);
    let count = |name: &str| results.and_then(|r| r.get(name)).copied().unwrap_or(0);
    println!("  {:<18} {}", "id", c.id);
    println!(
        "  {:<18} {}",
        "targetCondition",
        c.target_condition.as_deref().unwrap_or("")
    );
    println!("  {:<18} {}", "priority", c.priority.unwrap_or(0));
    println!("  {:<18} {}", "targetedCount", count("targetedCount"));
    println!("  {:<18} {}", "appliedCount", count("appliedCount"));
    for (name, n) in c.metrics.iter().flat_map(|m| &m.results) {
        println!("  {:<18} {n}", format!("metric {name}"));
    }
    println!("  {:<18} {}", "etag", c.etag.as_deref().unwrap_or(""));
    Ok(())
}

pub async fn run_config(args: &ClientArgs, cmd: ConfigCommand) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let out = Output::new(args.output);
    match cmd {
        ConfigCommand::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let body: Configuration = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a configuration", file.display()))?;
            if body.id.is_empty() {
                bail!("{} has no \"id\"", file.display());
            }
            let c: Configuration = api
                .put_as(&format!("/configurations/{}", enc(&body.id)), &body, None)
                .await?;
            print(args.output, &c, "created configuration")
        }
        ConfigCommand::Show { id } => {
            let c: Configuration = api.get_as(&format!("/configurations/{}", enc(&id))).await?;
            print(args.output, &c, "")
        }
        ConfigCommand::List { top } => {
            let path = match top {
                Some(n) => format!("/configurations?top={n}"),
                None => "/configurations".to_string(),
            };
            let list: Vec<Configuration> = api.get_as(&path).await?;
            if args.output == OutputFormat::Json {
                return out.json(&list);
            }
            if list.is_empty() {
                println!("(none)");
            }
            for c in &list {
                println!(
                    "{:<24} priority {:<4} {}",
                    c.id,
                    c.priority.unwrap_or(0),
                    c.target_condition.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        ConfigCommand::Delete { id } => {
            api.delete(&format!("/configurations/{}", enc(&id)), None)
                .await?;
            out.done(&format!("deleted configuration {id}"))
        }
    }
}
