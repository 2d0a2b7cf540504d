//! The pure rules of a routing configuration: which names IoT Hub accepts for endpoints,
//! routes and enrichment keys, and what an enrichment value means (a constant, `$iothubname`,
//! or a path into the sender's twin), with how a twin supplies it.

use serde_json::Value;

/// The built-in endpoint's name, reserved: today's stream, read by `GET /events`.
pub const BUILTIN_ENDPOINT: &str = "events";

/// The longest endpoint, route or enrichment key name (IoT Hub's limit).
pub const MAX_NAME_CHARS: usize = 64;

/// Why a name is refused, or `Ok` for a route or endpoint name: 1-64 of letters, digits, `-`
/// and `_`, as IoT Hub's resource provider accepts them.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "{what} name must be 1 to {MAX_NAME_CHARS} characters, not {}",
            name.chars().count()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{what} name {name:?} may hold only letters, digits, '-' and '_', not {c:?}"
        ));
    }
    Ok(())
}

/// An enrichment key: 1-64 of letters, digits, `-`, `_` and `.` (IoT Hub's rule for keys).
pub fn check_enrichment_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "enrichment key must be 1 to {MAX_NAME_CHARS} characters"
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!(
            "enrichment key {key:?} may hold only letters, digits, '-', '_' and '.', not {c:?}"
        ));
    }
    Ok(())
}

/// What an enrichment stamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrichmentValue {
    /// The text itself.
    Constant(String),
    /// `$iothubname`: the hub's name (the first label of its host name).
    HubName,
    /// `$twin.tags...` or `$twin.properties.desired...`/`reported...`: the path below the twin
    /// (`["tags", "site"]`), with the text as written.
    Twin { path: Vec<String>, text: String },
}

impl EnrichmentValue {
    /// Reads an enrichment value as IoT Hub does: only `$iothubname`, `$twin.tags`,
    /// `$twin.properties.desired` and `$twin.properties.reported` are variables; any other
    /// `$` name is refused rather than stamped as text, since it is most likely a typo.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("enrichment value must not be empty".into());
        }
        if !text.starts_with('$') {
            return Ok(EnrichmentValue::Constant(text.to_string()));
        }
        if text == "$iothubname" {
            return Ok(EnrichmentValue::HubName);
        }
        let Some(rest) = text.strip_prefix("$twin.") else {
            return Err(format!(
                "enrichment value {text:?}: the only variables are $iothubname, $twin.tags, \
                 $twin.properties.desired and $twin.properties.reported"
            ));
        };
        let path: Vec<String> = rest.split('.').map(str::to_string).collect();
        let ok = match path.as_slice() {
            [first, _, ..] if first == "tags" => true,
            [p, side, _, ..] if p == "properties" && (side == "desired" || side == "reported") => {
                true
            }
            _ => false,
        };
        if !ok || path.iter().any(String::is_empty) {
            return Err(format!(
                "enrichment value {text:?}: a twin path is $twin.tags.NAME, \
                 $twin.properties.desired.NAME or $twin.properties.reported.NAME"
            ));
        }
        Ok(EnrichmentValue::Twin {
            path,
            text: text.to_string(),
        })
    }

    /// Whether stamping this value needs the sender's twin.
    pub fn reads_twin(&self) -> bool {
        matches!(self, EnrichmentValue::Twin { .. })
    }

    /// The text stamped, given the hub's name and the sender's twin (`GET /twins` shape) when
    /// [`EnrichmentValue::reads_twin`]. IoT Hub stamps only primitive values: a path that is
    /// missing or holds an object or array stamps the value as written (our reading of "only
    /// primitive types are supported"; the message is never held back for it).
    pub fn resolve(&self, hub_name: &str, twin: Option<&Value>) -> String {
        match self {
            EnrichmentValue::Constant(s) => s.clone(),
            EnrichmentValue::HubName => hub_name.to_string(),
            EnrichmentValue::Twin { path, text } => {
                let found = twin
                    .and_then(|t| path.iter().try_fold(t, |v, key| v.get(key)))
                    .and_then(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        Value::Bool(b) => Some(b.to_string()),
                        _ => None,
                    });
                found.unwrap_or_else(|| text.clone())
            }
        }
    }
}

/// The hub's name as `$iothubname` gives it: the first label of its host name.
pub fn hub_name_of(hostname: &str) -> &str {
    hostname.split('.').next().unwrap_or(hostname)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_follow_iot_hub_rules() {
        assert!(check_name("route", "to-storage_1").is_ok());
        assert!(check_name("route", "").is_err());
        assert!(check_name("route", &"a".repeat(64)).is_ok());
        assert!(check_name("route", &"a".repeat(65)).is_err());
        let e = check_name("endpoint", "a.b").err().unwrap_or_default();
        assert!(e.contains("'.'"), "{e}");
        assert!(check_name("endpoint", "a/b").is_err());
        assert!(check_enrichment_key("app.site-1_x").is_ok());
        assert!(check_enrichment_key("a b").is_err());
    }

    #[test]
    fn enrichment_values_parse_as_iot_hub_reads_them() {
        assert_eq!(
            EnrichmentValue::parse("plant-7"),
            Ok(EnrichmentValue::Constant("plant-7".into()))
        );
        assert_eq!(
            EnrichmentValue::parse("$iothubname"),
            Ok(EnrichmentValue::HubName)
        );
        assert!(matches!(
            EnrichmentValue::parse("$twin.tags.site"),
            Ok(EnrichmentValue::Twin { .. })
        ));
        assert!(EnrichmentValue::parse("$twin.properties.reported.fw").is_ok());
        for bad in [
            "",
            "$twin",
            "$twin.tags",
            "$twin.properties.x.y",
            "$twin.deviceId",
            "$twin.tags..a",
            "$hubname",
        ] {
            assert!(EnrichmentValue::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn twin_values_stamp_primitives_and_fall_back_to_the_text() {
        let twin = json!({
            "tags": {"site": "oslo", "n": 3, "obj": {"a": 1}},
            "properties": {"reported": {"fw": true}, "desired": {}}
        });
        let v = |t: &str| EnrichmentValue::parse(t).map(|v| v.resolve("hub1", Some(&twin)));
        assert_eq!(v("$twin.tags.site"), Ok("oslo".into()));
        assert_eq!(v("$twin.tags.n"), Ok("3".into()));
        assert_eq!(v("$twin.properties.reported.fw"), Ok("true".into()));
        assert_eq!(v("$twin.tags.obj"), Ok("$twin.tags.obj".into()));
        assert_eq!(v("$twin.tags.missing"), Ok("$twin.tags.missing".into()));
        assert_eq!(v("$iothubname"), Ok("hub1".into()));
        assert_eq!(hub_name_of("hub1.azure-devices.net"), "hub1");
        assert_eq!(hub_name_of("localhost"), "localhost");
    }
}
