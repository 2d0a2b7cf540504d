//! `ferrohub query "SELECT ..."`: pages through `POST /devices/query` with the continuation
//! tokens (or stops after `--top` results) and prints the results as a table or as JSON.

use clap::Args;
use serde_json::{json, Value};

use super::{ApiClient, ClientArgs, OutputFormat};
use crate::api::query::{CONTINUATION, ITEM_TYPE, MAX_ITEM_COUNT};

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The query, e.g. "SELECT * FROM devices WHERE tags.site = 'paris'".
    pub query: String,
    /// Stop after this many results (default: all of them).
    #[arg(long)]
    pub top: Option<usize>,
    /// Results asked for per request (the hub's x-ms-max-item-count, 1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
}

pub async fn run_query(args: &ClientArgs, q: QueryArgs) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let body = json!({ "query": q.query });
    let mut items: Vec<Value> = Vec::new();
    let mut token: Option<String> = None;
    let mut item_type: Option<String> = None;
    loop {
        let mut size = q.page_size.clamp(1, 1000);
        if let Some(top) = q.top {
            size = size.min(top.saturating_sub(items.len()).max(1));
        }
        let mut headers = vec![(MAX_ITEM_COUNT, size.to_string())];
        if let Some(t) = &token {
            headers.push((CONTINUATION, t.clone()));
        }
        let (page, head) = api
            .post_with_headers("/devices/query", &body, &headers)
            .await?;
        let header = |name: &str| {
            head.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        item_type = header(ITEM_TYPE).or(item_type);
        match page {
            Value::Array(page) => items.extend(page),
            other => anyhow::bail!("the hub answered a query with {other}, not an array"),
        }
        token = header(CONTINUATION);
        if let Some(top) = q.top {
            if items.len() >= top {
                items.truncate(top);
                break;
            }
        }
        if token.is_none() {
            break;
        }
    }
    if args.output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    print_table(&items, item_type.as_deref().unwrap_or_default());
    Ok(())
}

/// A cell: strings bare, everything else as compact JSON.
fn cell(v: Option<&Value>) -> String {
    match v {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn print_table(items: &[Value], item_type: &str) {
    // Twins are wide documents: a few identifying columns, the rest is `-o json`'s.
    let columns: Vec<String> = if item_type == "twin" {
        let mut c = vec!["deviceId".to_string()];
        if items.iter().any(|i| i.get("moduleId").is_some()) {
            c.push("moduleId".into());
        }
        c.extend(["status", "connectionState", "tags"].map(String::from));
        c
    } else {
        let mut c: Vec<String> = Vec::new();
        for i in items {
            if let Value::Object(m) = i {
                for k in m.keys() {
                    if !c.contains(k) {
                        c.push(k.clone());
                    }
                }
            }
        }
        c
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| columns.iter().map(|c| cell(i.get(c))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(n, c)| {
            rows.iter()
                .map(|r| r[n].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
                .min(60)
        })
        .collect();
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(&columns);
    for r in &rows {
        line(r);
    }
    println!(
        "({} result{})",
        items.len(),
        if items.len() == 1 { "" } else { "s" }
    );
}
