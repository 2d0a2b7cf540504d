//! JSON -> [`Interface`]s: one interface document, or an array of them (the Device Models
//! Repository's `.expanded.json` form). Every error names the JSON path and what is wrong; the
//! caller adds the file name ([`DtdlError::in_file`]).
//!
//! Strictness: a property DTDL does not define for an element is an error (it is how a typo such
//! as `"shema"` is caught), unless the document declares a DTDL v3 extension context other than
//! quantitative types, whose extensions may add their own properties and co-types. Semantic
//! types and units are kept as written, not checked against DTDL's list.

use serde_json::{Map, Value};
use thiserror::Error;

use crate::dtmi::Dtmi;
use crate::model::*;

const CONTEXT_V2: &str = "dtmi:dtdl:context;2";
const CONTEXT_V3: &str = "dtmi:dtdl:context;3";
const QUANTITATIVE_TYPES: &str = "dtmi:dtdl:extension:quantitativeTypes;1";

/// Properties every element may carry.
const COMMON: &[&str] = &["@id", "@type", "comment", "description", "displayName"];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}{path}: {message}", file.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct DtdlError {
    /// The file the document came from, when the caller knows it.
    pub file: Option<String>,
    /// A JSON path into the document (`$.contents[2].schema`).
    pub path: String,
    pub message: String,
}

impl DtdlError {
    fn at(path: &str, message: impl Into<String>) -> Self {
        DtdlError {
            file: None,
            path: path.to_owned(),
            message: message.into(),
        }
    }

    /// The same error, naming the file it was found in.
    pub fn in_file(mut self, file: impl Into<String>) -> Self {
        self.file = Some(file.into());
        self
    }
}

type R<T> = Result<T, DtdlError>;

/// Parses a document's text: one interface, or an array of interfaces. Inline interfaces (in
/// `extends` or a component's `schema`) come back too, each before the one that holds it.
pub fn parse_document(text: &str) -> R<Vec<Interface>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        DtdlError::at(
            "$",
            format!("not JSON (line {}, column {}): {e}", e.line(), e.column()),
        )
    })?;
    parse_value(&value)
}

/// [`parse_document`] over a JSON value already read.
pub fn parse_value(value: &Value) -> R<Vec<Interface>> {
    let mut out = Vec::new();
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(DtdlError::at("$", "an empty array holds no interface"));
            }
            for (i, item) in items.iter().enumerate() {
                top_level(item, &format!("$[{i}]"), &mut out)?;
            }
        }
        _ => top_level(value, "$", &mut out)?,
    }
    Ok(out)
}

fn top_level(v: &Value, path: &str, out: &mut Vec<Interface>) -> R<()> {
    let m = object(v, path)?;
    let Some(ctx) = m.get("@context") else {
        return Err(DtdlError::at(
            path,
            "a top-level interface needs '@context' (\"dtmi:dtdl:context;2\" or \";3\")",
        ));
    };
    let (version, extensions) = context(ctx, &format!("{path}.@context"))?;
    let strict = extensions.iter().all(|e| e.as_str() == QUANTITATIVE_TYPES);
    let mut p = Parser {
        version,
        extensions,
        strict,
        out,
    };
    p.interface(v, path, 0)?;
    Ok(())
}

fn context(v: &Value, path: &str) -> R<(DtdlVersion, Vec<Dtmi>)> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let Some(first) = items.first().and_then(|f| f.as_str()) else {
        return Err(DtdlError::at(
            path,
            "'@context' must be \"dtmi:dtdl:context;2\" or \";3\", or an array starting with one",
        ));
    };
    let version = match first {
        CONTEXT_V2 => DtdlVersion::V2,
        CONTEXT_V3 => DtdlVersion::V3,
        other => {
            return Err(DtdlError::at(
                path,
                format!(
                    "unknown DTDL context '{other}'; expected \"{CONTEXT_V2}\" or \"{CONTEXT_V3}\""
                ),
            ))
        }
    };
    let mut extensions = Vec::new();
    for (i, e) in items.iter().enumerate().skip(1) {
        let at = format!("{path}[{i}]");
        if version == DtdlVersion::V2 {
            return Err(DtdlError::at(&at, "DTDL v2 takes no extension contexts"));
        }
        let text = e
            .as_str()
            .ok_or_else(|| DtdlError::at(&at, "an extension context is a DTMI string"))?;
        extensions.push(Dtmi::parse(text).map_err(|e| DtdlError::at(&at, e.to_string()))?);
    }
    Ok((version, extensions))
}

fn object<'a>(v: &'a Value, path: &str) -> R<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| DtdlError::at(path, format!("expected an object, found {}", kind(v))))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Parser<'o> {
    version: DtdlVersion,
    extensions: Vec<Dtmi>,
    strict: bool,
    out: &'o mut Vec<Interface>,
}

/// DTDL's nesting limits: `extends` chains and complex schemas.
const MAX_EXTENDS_DEPTH: usize = 10;

impl Parser<'_> {
    fn max_schema_depth(&self) -> usize {
        match self.version {
            DtdlVersion::V2 => 5,
            DtdlVersion::V3 => 8,
        }
    }

    fn keys(&self, m: &Map<String, Value>, path: &str, element: &str, own: &[&str]) -> R<()> {
        if !self.strict {
            return Ok(());
        }
        for k in m.keys() {
            if !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str()) {
                let mut allowed: Vec<&str> = COMMON.iter().chain(own).copied().collect();
                allowed.sort_unstable();
                return Err(DtdlError::at(
                    &format!("{path}.{k}"),
                    format!(
                        "'{k}' is not a property of {element} (it may have: {})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn dtmi(&self, v: &Value, path: &str) -> R<Dtmi> {
        let text = v.as_str().ok_or_else(|| {
            DtdlError::at(path, format!("expected a DTMI string, found {}", kind(v)))
        })?;
        let parsed = match self.version {
            DtdlVersion::V2 => Dtmi::parse_v2(text),
            DtdlVersion::V3 => Dtmi::parse(text),
        };
        parsed.map_err(|e| DtdlError::at(path, e.to_string()))
    }

    fn id(&self, m: &Map<String, Value>, path: &str, element: &str) -> R<Dtmi> {
        match m.get("@id") {
            Some(v) => self.dtmi(v, &format!("{path}.@id")),
            None => Err(DtdlError::at(path, format!("{element} needs an '@id'"))),
        }
    }

    fn name(&self, m: &Map<String, Value>, path: &str, element: &str) -> R<String> {
        let at = format!("{path}.name");
        let Some(v) = m.get("name") else {
            return Err(DtdlError::at(path, format!("{element} needs a 'name'")));
        };
        let name = v
            .as_str()
            .ok_or_else(|| DtdlError::at(&at, format!("a name is a string, found {}", kind(v))))?;
        let max = match self.version {
            DtdlVersion::V2 => 64,
            DtdlVersion::V3 => 512,
        };
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.ends_with('_');
        if !ok {
            return Err(DtdlError::at(
                &at,
                format!("'{name}' is not a valid name: a letter, then letters, digits or underscores, not ending with an underscore"),
            ));
        }
        if name.len() > max {
            return Err(DtdlError::at(
                &at,
                format!(
                    "the name is {} characters long; at most {max} are allowed",
                    name.len()
                ),
            ));
        }
        Ok(name.to_owned())
    }

    /// `@type` as a list: a string or an array of strings.
    fn types(&self, m: &Map<String, Value>, path: &str) -> R<Vec<String>> {
        let at = format!("{path}.@type");
        match m.get("@type") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| DtdlError::at(&at, "'@type' holds strings only"))
                })
                .collect(),
            Some(_) => Err(DtdlError::at(
                &at,
                "'@type' is a string or a non-empty array of strings",
            )),
        }
    }

    /// The co-types beside `primary`, checked: v3 needs an extension for them.
    fn cotypes(&self, types: &[String], primary: &str, path: &str) -> R<Vec<String>> {
        let co: Vec<String> = types.iter().filter(|t| *t != primary).cloned().collect();
        if !co.is_empty() && self.version == DtdlVersion::V3 && self.extensions.is_empty() {
            return Err(DtdlError::at(
                &format!("{path}.@type"),
                format!(
                    "the semantic type '{}' needs the extension context \"{QUANTITATIVE_TYPES}\" in DTDL v3",
                    co[0]
                ),
            ));
        }
        Ok(co)
    }

    fn unit(&self, m: &Map<String, Value>, path: &str, cotypes: &[String]) -> R<Option<String>> {
        let Some(v) = m.get("unit") else {
            return Ok(None);
        };
        let at = format!("{path}.unit");
        let unit = v
            .as_str()
            .ok_or_else(|| DtdlError::at(&at, "a unit is a string"))?;
        if cotypes.is_empty() {
            return Err(DtdlError::at(
                &at,
                "'unit' needs a semantic type in '@type' (such as [\"Telemetry\", \"Temperature\"])",
            ));
        }
        Ok(Some(unit.to_owned()))
    }

    fn interface(&mut self, v: &Value, path: &str, depth: usize) -> R<Dtmi> {
        if depth > MAX_EXTENDS_DEPTH {
            return Err(DtdlError::at(
                path,
                format!("interfaces nest more than {MAX_EXTENDS_DEPTH} levels deep"),
            ));
        }
        let m = object(v, path)?;
        self.keys(
            m,
            path,
            "an Interface",
            &["@context", "contents", "extends", "schemas"],
        )?;
        let types = self.types(m, path)?;
        if types != ["Interface"] {
            return Err(DtdlError::at(
                &format!("{path}.@type"),
                "an interface's '@type' must be \"Interface\"",
            ));
        }
        let id = self.id(m, path, "an Interface")?;
        if depth > 0 {
            if let Some(ctx) = m.get("@context") {
                let (version, _) = context(ctx, &format!("{path}.@context"))?;
                if version != self.version {
                    return Err(DtdlError::at(
                        &format!("{path}.@context"),
                        "an inline interface must use the DTDL version of the document",
                    ));
                }
            }
        }

        let mut extends = Vec::new();
        if let Some(e) = m.get("extends") {
            let at = format!("{path}.extends");
            let items: Vec<(String, &Value)> = match e {
                Value::Array(a) => a
                    .iter()
                    .enumerate()
                    .map(|(i, x)| (format!("{at}[{i}]"), x))
                    .collect(),
                other => vec![(at.clone(), other)],
            };
            if self.version == DtdlVersion::V2 && items.len() > 2 {
                return Err(DtdlError::at(
                    &at,
                    "a DTDL v2 interface extends at most 2 interfaces",
                ));
            }
            for (p, item) in items {
                extends.push(match item {
                    Value::Object(_) => self.interface(item, &p, depth + 1)?,
                    other => self.dtmi(other, &p)?,
                });
            }
        }

        let mut schemas = Vec::new();
        if let Some(s) = m.get("schemas") {
            let at = format!("{path}.schemas");
            let items = s
                .as_array()
                .ok_or_else(|| DtdlError::at(&at, "'schemas' is an array of complex schemas"))?;
            for (i, item) in items.iter().enumerate() {
                let p = format!("{at}[{i}]");
                let sm = object(item, &p)?;
                let sid = self.id(sm, &p, "a schema in 'schemas'")?;
                let schema = self.schema(item, &p, 1)?;
                if matches!(schema, Schema::Primitive(_) | Schema::Ref(_)) {
                    return Err(DtdlError::at(
                        &p,
                        "'schemas' holds complex schemas (Array, Enum, Map, Object)",
                    ));
                }
                schemas.push((sid, schema));
            }
        }

        let mut contents: Vec<Content> = Vec::new();
        if let Some(c) = m.get("contents") {
            let at = format!("{path}.contents");
            let items = c.as_array().ok_or_else(|| {
                DtdlError::at(&at, format!("'contents' is an array, found {}", kind(c)))
            })?;
            if self.version == DtdlVersion::V2 && items.len() > 300 {
                return Err(DtdlError::at(
                    &at,
                    "a DTDL v2 interface has at most 300 contents",
                ));
            }
            for (i, item) in items.iter().enumerate() {
                let p = format!("{at}[{i}]");
                let content = self.content(item, &p, depth)?;
                if let Some(prev) = contents.iter().position(|c| c.name() == content.name()) {
                    return Err(DtdlError::at(
                        &format!("{p}.name"),
                        format!(
                            "the name '{}' is already used by {at}[{prev}]: names are unique within an interface",
                            content.name()
                        ),
                    ));
                }
                contents.push(content);
            }
        }

        let interface = Interface {
            id: id.clone(),
            version: self.version,
            extensions: self.extensions.clone(),
            extends,
            contents,
            schemas,
        };
        self.out.push(interface);
        Ok(id)
    }

    fn content(&mut self, v: &Value, path: &str, depth: usize) -> R<Content> {
        let m = object(v, path)?;
        let types = self.types(m, path)?;
        const KINDS: &[&str] = &[
            "Telemetry",
            "Property",
            "Command",
            "Component",
            "Relationship",
        ];
        let primaries: Vec<&String> = types
            .iter()
            .filter(|t| KINDS.contains(&t.as_str()))
            .collect();
        let primary = match primaries.as_slice() {
            [one] => one.as_str().to_owned(),
            [] => {
                return Err(DtdlError::at(
                    &format!("{path}.@type"),
                    "a content's '@type' must include one of Telemetry, Property, Command, Component, Relationship",
                ))
            }
            _ => {
                return Err(DtdlError::at(
                    &format!("{path}.@type"),
                    "a content has exactly one of Telemetry, Property, Command, Component, Relationship in '@type'",
                ))
            }
        };
        let schema_of = |p: &mut Self, element: &str| -> R<Schema> {
            match m.get("schema") {
                Some(s) => p.schema(s, &format!("{path}.schema"), 1),
                None => Err(DtdlError::at(path, format!("{element} needs a 'schema'"))),
            }
        };
        Ok(match primary.as_str() {
            "Telemetry" => {
                self.keys(m, path, "a Telemetry", &["name", "schema", "unit"])?;
                let semantic_types = self.cotypes(&types, "Telemetry", path)?;
                Content::Telemetry(Telemetry {
                    name: self.name(m, path, "a Telemetry")?,
                    unit: self.unit(m, path, &semantic_types)?,
                    schema: schema_of(self, "a Telemetry")?,
                    semantic_types,
                })
            }
            "Property" => {
                self.keys(
                    m,
                    path,
                    "a Property",
                    &["name", "schema", "unit", "writable"],
                )?;
                let semantic_types = self.cotypes(&types, "Property", path)?;
                let writable = match m.get("writable") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(DtdlError::at(
                            &format!("{path}.writable"),
                            format!("'writable' is true or false, found {}", kind(other)),
                        ))
                    }
                };
                Content::Property(Property {
                    name: self.name(m, path, "a Property")?,
                    unit: self.unit(m, path, &semantic_types)?,
                    schema: schema_of(self, "a Property")?,
                    writable,
                    semantic_types,
                })
            }
            "Command" => {
                let mut own = vec!["name", "request", "response"];
                if self.version == DtdlVersion::V2 {
                    own.push("commandType");
                }
                self.keys(m, path, "a Command", &own)?;
                self.cotypes(&types, "Command", path)?;
                Content::Command(Command {
                    name: self.name(m, path, "a Command")?,
                    request: self.payload(m, path, "request")?,
                    response: self.payload(m, path, "response")?,
                })
            }
            "Component" => {
                self.keys(m, path, "a Component", &["name", "schema"])?;
                self.cotypes(&types, "Component", path)?;
                let name = self.name(m, path, "a Component")?;
                let at = format!("{path}.schema");
                let schema = match m.get("schema") {
                    None => {
                        return Err(DtdlError::at(
                            path,
                            "a Component needs a 'schema' (an interface)",
                        ))
                    }
                    Some(s @ Value::Object(_)) => self.interface(s, &at, depth + 1)?,
                    Some(s) => self.dtmi(s, &at)?,
                };
                Content::Component(Component { name, schema })
            }
            _ => {
                self.keys(
                    m,
                    path,
                    "a Relationship",
                    &[
                        "name",
                        "maxMultiplicity",
                        "minMultiplicity",
                        "properties",
                        "target",
                        "writable",
                    ],
                )?;
                Content::Relationship {
                    name: self.name(m, path, "a Relationship")?,
                }
            }
        })
    }

    fn payload(
        &mut self,
        m: &Map<String, Value>,
        path: &str,
        which: &str,
    ) -> R<Option<CommandPayload>> {
        let Some(v) = m.get(which) else {
            return Ok(None);
        };
        let at = format!("{path}.{which}");
        let pm = object(v, &at)?;
        let mut own = vec!["name", "schema"];
        if self.version == DtdlVersion::V3 {
            own.push("nullable");
        }
        self.keys(pm, &at, &format!("a command {which}"), &own)?;
        let nullable = match pm.get("nullable") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(DtdlError::at(
                    &format!("{at}.nullable"),
                    "'nullable' is true or false",
                ))
            }
        };
        let schema = match pm.get("schema") {
            Some(s) => self.schema(s, &format!("{at}.schema"), 1)?,
            None => {
                return Err(DtdlError::at(
                    &at,
                    format!("a command {which} needs a 'schema'"),
                ))
            }
        };
        Ok(Some(CommandPayload {
            name: self.name(pm, &at, &format!("a command {which}"))?,
            schema,
            nullable,
        }))
    }

    fn schema(&mut self, v: &Value, path: &str, depth: usize) -> R<Schema> {
        if let Value::String(s) = v {
            if let Some(p) = Primitive::from_name(s, self.version) {
                return Ok(Schema::Primitive(p));
            }
            if s.starts_with("dtmi:") {
                return Ok(Schema::Ref(self.dtmi(v, path)?));
            }
            return Err(DtdlError::at(
                path,
                format!(
                    "unknown schema '{s}': a primitive (boolean, date, dateTime, double, duration, float, integer, long, string, time{}), a complex schema object, or the DTMI of one",
                    if self.version == DtdlVersion::V3 {
                        ", byte, bytes, decimal, short, uuid, unsignedByte, unsignedShort, unsignedInteger, unsignedLong"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let max = self.max_schema_depth();
        if depth > max {
            return Err(DtdlError::at(
                path,
                format!("complex schemas nest more than {max} levels deep"),
            ));
        }
        let m = object(v, path)?;
        let types = self.types(m, path)?;
        let kind = types.first().map(String::as_str).unwrap_or_default();
        match kind {
            "Enum" => {
                self.keys(m, path, "an Enum", &["enumValues", "valueSchema"])?;
                let vs_at = format!("{path}.valueSchema");
                let value_schema = match m.get("valueSchema").and_then(Value::as_str) {
                    Some("integer") => Primitive::Integer,
                    Some("string") => Primitive::String,
                    _ => {
                        return Err(DtdlError::at(
                            &vs_at,
                            "an Enum's 'valueSchema' is \"integer\" or \"string\"",
                        ))
                    }
                };
                let ev_at = format!("{path}.enumValues");
                let items = m
                    .get("enumValues")
                    .and_then(Value::as_array)
                    .ok_or_else(|| DtdlError::at(&ev_at, "an Enum needs 'enumValues', an array"))?;
                let mut values: Vec<EnumValue> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{ev_at}[{i}]");
                    let em = object(item, &p)?;
                    self.keys(em, &p, "an enum value", &["enumValue", "name"])?;
                    let name = self.name(em, &p, "an enum value")?;
                    let value = em
                        .get("enumValue")
                        .cloned()
                        .ok_or_else(|| DtdlError::at(&p, "an enum value needs an 'enumValue'"))?;
                    let fits = match value_schema {
                        Primitive::Integer => {
                            value.as_i64().is_some_and(|n| i32::try_from(n).is_ok())
                        }
                        _ => value.is_string(),
                    };
                    if !fits {
                        return Err(DtdlError::at(
                            &format!("{p}.enumValue"),
                            format!(
                                "the value must be {} (the Enum's valueSchema)",
                                if value_schema == Primitive::Integer {
                                    "an integer"
                                } else {
                                    "a string"
                                }
                            ),
                        ));
                    }
                    if values.iter().any(|e| e.name == name) {
                        return Err(DtdlError::at(
                            &format!("{p}.name"),
                            format!("the enum value name '{name}' is used twice"),
                        ));
                    }
                    if values.iter().any(|e| e.value == value) {
                        return Err(DtdlError::at(
                            &format!("{p}.enumValue"),
                            format!("the enum value {value} is used twice"),
                        ));
                    }
                    values.push(EnumValue { name, value });
                }
                Ok(Schema::Enum {
                    value_schema,
                    values,
                })
            }
            "Object" => {
                self.keys(m, path, "an Object", &["fields"])?;
                let at = format!("{path}.fields");
                let items = m
                    .get("fields")
                    .and_then(Value::as_array)
                    .ok_or_else(|| DtdlError::at(&at, "an Object needs 'fields', an array"))?;
                if self.version == DtdlVersion::V2 && items.len() > 30 {
                    return Err(DtdlError::at(&at, "a DTDL v2 Object has at most 30 fields"));
                }
                let mut fields: Vec<Field> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{at}[{i}]");
                    let fm = object(item, &p)?;
                    self.keys(fm, &p, "a field", &["name", "schema"])?;
                    let name = self.name(fm, &p, "a field")?;
                    if fields.iter().any(|f| f.name == name) {
                        return Err(DtdlError::at(
                            &format!("{p}.name"),
                            format!("the field name '{name}' is used twice"),
                        ));
                    }
                    let schema = match fm.get("schema") {
                        Some(s) => self.schema(s, &format!("{p}.schema"), depth + 1)?,
                        None => return Err(DtdlError::at(&p, "a field needs a 'schema'")),
                    };
                    fields.push(Field { name, schema });
                }
                Ok(Schema::Object { fields })
            }
            "Map" => {
                self.keys(m, path, "a Map", &["mapKey", "mapValue"])?;
                let key_at = format!("{path}.mapKey");
                let km = object(m.get("mapKey").unwrap_or(&Value::Null), &key_at)?;
                self.keys(km, &key_at, "a map key", &["name", "schema"])?;
                let key_name = self.name(km, &key_at, "a map key")?;
                if km.get("schema").and_then(Value::as_str) != Some("string") {
                    return Err(DtdlError::at(
                        &format!("{key_at}.schema"),
                        "a map key's schema is \"string\"",
                    ));
                }
                let value_at = format!("{path}.mapValue");
                let vm = object(m.get("mapValue").unwrap_or(&Value::Null), &value_at)?;
                self.keys(vm, &value_at, "a map value", &["name", "schema"])?;
                let value_name = self.name(vm, &value_at, "a map value")?;
                let value = match vm.get("schema") {
                    Some(s) => self.schema(s, &format!("{value_at}.schema"), depth + 1)?,
                    None => return Err(DtdlError::at(&value_at, "a map value needs a 'schema'")),
                };
                Ok(Schema::Map {
                    key_name,
                    value_name,
                    value: Box::new(value),
                })
            }
            "Array" => {
                self.keys(m, path, "an Array", &["elementSchema"])?;
                let element = match m.get("elementSchema") {
                    Some(s) => self.schema(s, &format!("{path}.elementSchema"), depth + 1)?,
                    None => return Err(DtdlError::at(path, "an Array needs an 'elementSchema'")),
                };
                Ok(Schema::Array {
                    element: Box::new(element),
                })
            }
            _ => Err(DtdlError::at(
                &format!("{path}.@type"),
                "a complex schema's '@type' is Array, Enum, Map or Object",
            )),
        }
    }
}
