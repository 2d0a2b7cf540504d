//! How CLI results print: readable text by default, the API's JSON with `--output json`. The
//! results are the API's own types (`crate::api::types`), so JSON output is what the hub sent.

use serde::Serialize;
use serde_json::Value;

use super::OutputFormat;
use crate::api::types::{CertificateDescription, CertificateList, DeviceResponse, ModuleResponse};
use ferrohub_store::Authentication;

pub struct Output {
    format: OutputFormat,
}

fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// An enum as it is spelled on the wire (`enabled`, `Connected`, `sas`).
fn wire(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn auth_rows(rows: &mut Vec<(&'static str, String)>, auth: &Authentication) {
    rows.push(("authentication", wire(&auth.auth_type)));
    let keys = &auth.symmetric_key;
    let tps = &auth.x509_thumbprint;
    for (name, value) in [
        ("primaryKey", &keys.primary_key),
        ("secondaryKey", &keys.secondary_key),
        ("primaryThumbprint", &tps.primary_thumbprint),
        ("secondaryThumbprint", &tps.secondary_thumbprint),
    ] {
        if let Some(v) = value {
            rows.push((name, v.clone()));
        }
    }
}

fn print_rows(rows: Vec<(&'static str, String)>) {
    for (k, val) in rows {
        println!("  {k:<26} {val}");
    }
}

const LIST_HEADER: (&str, &str, &str, &str) = ("ID", "STATUS", "CONNECTION", "AUTH");

fn list_row(id: &str, status: &str, connection: &str, auth: &str, c2d: u64) {
    println!("{id:<40} {status:<9} {connection:<13} {auth:<21} {c2d}");
}

impl Output {
    pub fn new(format: OutputFormat) -> Self {
        Self { format }
    }

    pub fn device(&self, d: &DeviceResponse, headline: &str) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(d);
        }
        if !headline.is_empty() {
            println!("{headline} {}", d.device_id);
        }
        let mut rows = vec![
            ("deviceId", d.device_id.clone()),
            ("status", wire(&d.status)),
        ];
        if let Some(r) = &d.status_reason {
            rows.push(("statusReason", r.clone()));
        }
        rows.push(("connectionState", wire(&d.connection_state)));
        if let Some(t) = &d.last_activity_time {
            rows.push(("lastActivityTime", t.clone()));
        }
        auth_rows(&mut rows, &d.authentication);
        rows.push((
            "cloudToDeviceMessageCount",
            d.cloud_to_device_message_count.to_string(),
        ));
        rows.push(("generationId", d.generation_id.clone()));
        rows.push(("etag", d.etag.clone()));
        print_rows(rows);
        Ok(())
    }

    pub fn module(&self, m: &ModuleResponse, headline: &str) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(m);
        }
        if !headline.is_empty() {
            println!("{headline} {}/{}", m.device_id, m.module_id);
        }
        let mut rows = vec![
            ("deviceId", m.device_id.clone()),
            ("moduleId", m.module_id.clone()),
            ("connectionState", wire(&m.connection_state)),
        ];
        if let Some(t) = &m.last_activity_time {
            rows.push(("lastActivityTime", t.clone()));
        }
        auth_rows(&mut rows, &m.authentication);
        rows.push((
            "cloudToDeviceMessageCount",
            m.cloud_to_device_message_count.to_string(),
        ));
        rows.push(("generationId", m.generation_id.clone()));
        rows.push(("etag", m.etag.clone()));
        print_rows(rows);
        Ok(())
    }

    pub fn device_list(&self, list: &[DeviceResponse]) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(&list);
        }
        if list.is_empty() {
            println!("(none)");
            return Ok(());
        }
        let (a, b, c, d) = LIST_HEADER;
        println!("{a:<40} {b:<9} {c:<13} {d:<21} C2D");
        for i in list {
            list_row(
                &i.device_id,
                &wire(&i.status),
                &wire(&i.connection_state),
                &wire(&i.authentication.auth_type),
                i.cloud_to_device_message_count,
            );
        }
        Ok(())
    }

    pub fn module_list(&self, list: &[ModuleResponse]) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(&list);
        }
        if list.is_empty() {
            println!("(none)");
            return Ok(());
        }
        let (a, b, c, d) = LIST_HEADER;
        println!("{a:<40} {b:<9} {c:<13} {d:<21} C2D");
        for i in list {
            list_row(
                &format!("{}/{}", i.device_id, i.module_id),
                "-",
                &wire(&i.connection_state),
                &wire(&i.authentication.auth_type),
                i.cloud_to_device_message_count,
            );
        }
        Ok(())
    }

    pub fn certificate(&self, c: &CertificateDescription, headline: &str) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(c);
        }
        if !headline.is_empty() {
            println!("{headline} {}", c.name);
        }
        println!("  {:<12} {}", "name", c.name);
        println!("  {:<12} {}", "subject", c.properties.subject);
        println!("  {:<12} {}", "thumbprint", c.properties.thumbprint);
        println!("  {:<12} {}", "etag", c.etag);
        Ok(())
    }

    pub fn certificate_list(&self, list: &CertificateList) -> anyhow::Result<()> {
        if self.format == OutputFormat::Json {
            return print_json(list);
        }
        if list.value.is_empty() {
            println!("(none)");
        }
        for c in &list.value {
            println!("{:<24} {}", c.name, c.properties.subject);
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
    pub fn json(&self, v: &impl Serialize) -> anyhow::Result<()> {
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
