//! `ferrohub explorer`: mints a one-time login token for the web explorer
//! (`POST /explorer/api/login-tokens`, signed like every other service call) and prints the
//! URL that signs a browser in with it.

use anyhow::Context;
use serde_json::{json, Value};

use super::{ApiClient, ClientArgs, OutputFormat};

pub async fn run_explorer(args: &ClientArgs) -> anyhow::Result<()> {
    let api = ApiClient::from_args(args)?;
    let answer = api
        .post("/explorer/api/login-tokens", &json!({}))
        .await?
        .context("the hub answered without a login token")?;
    let url = answer
        .get("url")
        .and_then(Value::as_str)
        .context("the hub's answer has no url")?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        OutputFormat::Text => {
            println!("{url}");
            eprintln!("Open it in a browser: it signs in once, as iothubowner.");
        }
    }
    Ok(())
}
