//! How CLI results print: readable text by default, the API's JSON with `--output json`.

use serde_json::Value;

use super::OutputFormat;

pub struct Output {
    format: OutputFormat,
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

impl Output {
    pub fn new(format: OutputFormat) -> Self {
        Self { format }
    }

    pub fn identity(&self, v: &Value, headline: &str) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(v);
        }
        if !headline.is_empty() {
            let id = match v.get("moduleId").and_then(Value::as_str) {
                Some(m) => format!("{}/{m}", s(v, "deviceId")),
                None => s(v, "deviceId").to_string(),
            };
            println!("{headline} {id}");
        }
        let auth = &v["authentication"];
        let mut rows = vec![("deviceId", s(v, "deviceId").to_string())];
        if let Some(m) = v.get("moduleId").and_then(Value::as_str) {
            rows.push(("moduleId", m.to_string()));
        }
        if v.get("moduleId").is_none() {
            rows.push(("status", s(v, "status").to_string()));
            if let Some(r) = v.get("statusReason").and_then(Value::as_str) {
                rows.push(("statusReason", r.to_string()));
            }
        }
        rows.push(("connectionState", s(v, "connectionState").to_string()));
        if let Some(t) = v.get("lastActivityTime").and_then(Value::as_str) {
            rows.push(("lastActivityTime", t.to_string()));
        }
        rows.push(("authentication", s(auth, "type").to_string()));
        let keys = &auth["symmetricKey"];
        if let Some(k) = keys.get("primaryKey").and_then(Value::as_str) {
            rows.push(("primaryKey", k.to_string()));
        }
        if let Some(k) = keys.get("secondaryKey").and_then(Value::as_str) {
            rows.push(("secondaryKey", k.to_string()));
        }
        let tp = &auth["x509Thumbprint"];
        if let Some(t) = tp.get("primaryThumbprint").and_then(Value::as_str) {
            rows.push(("primaryThumbprint", t.to_string()));
        }
        if let Some(t) = tp.get("secondaryThumbprint").and_then(Value::as_str) {
            rows.push(("secondaryThumbprint", t.to_string()));
        }
        rows.push((
            "cloudToDeviceMessageCount",
            v.get("cloudToDeviceMessageCount")
                .map(|c| c.to_string())
                .unwrap_or_default(),
        ));
        rows.push(("generationId", s(v, "generationId").to_string()));
        rows.push(("etag", s(v, "etag").to_string()));
        for (k, val) in rows {
            println!("  {k:<26} {val}");
        }
        Ok(())
    }

    pub fn identity_list(&self, v: &Value) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(v);
        }
        let items = v.as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            println!("(none)");
            return Ok(());
        }
        println!(
            "{:<40} {:<9} {:<13} {:<21} C2D",
            "ID", "STATUS", "CONNECTION", "AUTH"
        );
        for i in items {
            let id = match i.get("moduleId").and_then(Value::as_str) {
                Some(m) => format!("{}/{m}", s(&i, "deviceId")),
                None => s(&i, "deviceId").to_string(),
            };
            let status = if i.get("moduleId").is_some() {
                "-"
            } else {
                s(&i, "status")
            };
            println!(
                "{:<40} {:<9} {:<13} {:<21} {}",
                id,
                status,
                s(&i, "connectionState"),
                s(&i["authentication"], "type"),
                i.get("cloudToDeviceMessageCount")
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    pub fn certificate(&self, v: &Value, headline: &str) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(v);
        }
        if !headline.is_empty() {
            println!("{headline} {}", s(v, "name"));
        }
        let p = &v["properties"];
        println!("  {:<12} {}", "name", s(v, "name"));
        println!("  {:<12} {}", "subject", s(p, "subject"));
        println!("  {:<12} {}", "thumbprint", s(p, "thumbprint"));
        println!("  {:<12} {}", "etag", s(v, "etag"));
        Ok(())
    }

    pub fn certificate_list(&self, v: &Value) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(v);
        }
        let items = v["value"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            println!("(none)");
        }
        for c in items {
            println!("{:<24} {}", s(&c, "name"), s(&c["properties"], "subject"));
        }
        Ok(())
    }

    pub fn connection_string(&self, cs: &str) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(&serde_json::json!({ "connectionString": cs }));
        }
        println!("{cs}");
        Ok(())
    }

    pub fn sas_token(&self, token: &str, resource: &str, expiry: u64) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(&serde_json::json!({
                "sas": token, "resource": resource, "expiry": expiry,
            }));
        }
        println!("{token}");
        Ok(())
    }

    /// Prints a document as pretty JSON whatever the format (twins are JSON in both).
    pub fn json(&self, v: &Value) -> anyhow::Result<()> {
        print_json(v)
    }

    pub fn done(&self, what: &str) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(&serde_json::json!({ "result": what }));
        }
        println!("{what}");
        Ok(())
    }
}
