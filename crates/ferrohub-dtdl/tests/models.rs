//! The parser and resolver on the models IoT Plug and Play samples use (Thermostat,
//! TemperatureController with two thermostat components, DeviceInformation; written out from
//! the DTDL specification and the public samples' shapes), and on invalid models.

use ferrohub_dtdl::check::check_value;
use ferrohub_dtdl::{parse_document, Dtmi, ModelSet, Primitive, ResolveError, Schema};
use serde_json::json;

const THERMOSTAT: &str = include_str!("models/thermostat-1.json");
const CONTROLLER: &str = include_str!("models/temperaturecontroller-2.json");
const DEVICE_INFO: &str = include_str!("models/deviceinformation-1.json");

fn id(s: &str) -> Dtmi {
    Dtmi::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn sample_set() -> ModelSet {
    let mut set = ModelSet::new();
    for (file, text) in [
        ("thermostat-1.json", THERMOSTAT),
        ("temperaturecontroller-2.json", CONTROLLER),
        ("deviceinformation-1.json", DEVICE_INFO),
    ] {
        set.add_document(text)
            .unwrap_or_else(|e| panic!("{}", e.in_file(file)));
    }
    set
}

#[test]
fn the_sample_models_parse_and_resolve() {
    let set = sample_set();
    let thermostat = set
        .resolve(&id("dtmi:com:example:Thermostat;1"))
        .expect("thermostat");
    let t = thermostat
        .telemetry(None, "temperature")
        .expect("telemetry");
    assert_eq!(t.schema, Schema::Primitive(Primitive::Double));
    assert_eq!(t.semantic_types, ["Temperature"]);
    assert_eq!(t.unit.as_deref(), Some("degreeCelsius"));
    assert!(
        thermostat
            .property(None, "targetTemperature")
            .expect("p")
            .writable
    );
    assert!(
        !thermostat
            .property(None, "maxTempSinceLastReboot")
            .expect("p")
            .writable
    );
    let report = thermostat
        .command(None, "getMaxMinReport")
        .expect("command");
    let request = report.request.as_ref().expect("request");
    assert_eq!(
        (request.name.as_str(), &request.schema),
        ("since", &Schema::Primitive(Primitive::DateTime))
    );
    let response = report.response.as_ref().expect("response");
    assert_eq!(
        check_value(
            &response.schema,
            &json!({"maxTemp": 30.0, "minTemp": 20.0, "avgTemp": 25.0,
                    "startTime": "2026-12-01T00:00:00Z", "endTime": "2026-12-01T01:00:00Z"})
        ),
        Ok(())
    );
    assert!(check_value(&response.schema, &json!({"maxTemp": "hot"})).is_err());

    let controller = set
        .resolve(&id("dtmi:com:example:TemperatureController;2"))
        .expect("controller");
    assert_eq!(
        controller.components.keys().collect::<Vec<_>>(),
        ["deviceInformation", "thermostat1", "thermostat2"]
    );
    assert!(controller.telemetry(None, "workingSet").is_some());
    assert!(controller.telemetry(None, "temperature").is_none());
    assert!(controller
        .telemetry(Some("thermostat2"), "temperature")
        .is_some());
    assert!(controller.command(None, "reboot").is_some());
    assert!(controller
        .command(Some("thermostat1"), "getMaxMinReport")
        .is_some());
    assert_eq!(
        controller
            .property(Some("deviceInformation"), "totalMemory")
            .map(|p| &p.schema),
        Some(&Schema::Primitive(Primitive::Double))
    );
    assert!(controller.part(Some("nope")).is_none());

    let (needed, missing) = set.closure(&id("dtmi:com:example:TemperatureController;2"));
    assert!(missing.is_empty());
    assert_eq!(needed.len(), 3);
    assert_eq!(
        id("dtmi:com:example:TemperatureController;2").repository_path(),
        "dtmi/com/example/temperaturecontroller-2.json"
    );
}

#[test]
fn missing_dependencies_are_named() {
    let mut set = ModelSet::new();
    set.add_document(CONTROLLER).expect("parses alone");
    let (_, missing) = set.closure(&id("dtmi:com:example:TemperatureController;2"));
    assert_eq!(
        missing.iter().map(Dtmi::as_str).collect::<Vec<_>>(),
        [
            "dtmi:azure:DeviceManagement:DeviceInformation;1",
            "dtmi:com:example:Thermostat;1"
        ]
    );
    let e = set
        .resolve(&id("dtmi:com:example:TemperatureController;2"))
        .expect_err("incomplete");
    assert!(matches!(e, ResolveError::MissingDependency { .. }), "{e}");
    assert!(matches!(
        set.resolve(&id("dtmi:com:example:Nothing;1")),
        Err(ResolveError::NotFound(_))
    ));
}

#[test]
fn the_expanded_form_and_inline_interfaces() {
    let expanded = format!("[{CONTROLLER}, {THERMOSTAT}, {DEVICE_INFO}]");
    let mut set = ModelSet::new();
    let ids = set.add_document(&expanded).expect("expanded");
    assert_eq!(ids.len(), 3);
    assert!(set
        .resolve(&id("dtmi:com:example:TemperatureController;2"))
        .is_ok());

    let inline = r#"{
      "@context": "dtmi:dtdl:context;2",
      "@id": "dtmi:com:example:Sensor;1",
      "@type": "Interface",
      "extends": {"@id": "dtmi:com:example:Base;1", "@type": "Interface",
                  "contents": [{"@type": "Property", "name": "serial", "schema": "string"}]},
      "contents": [
        {"@type": "Component", "name": "battery", "schema": {
          "@id": "dtmi:com:example:Battery;1", "@type": "Interface",
          "contents": [{"@type": "Telemetry", "name": "level", "schema": "integer"}]}},
        {"@type": "Telemetry", "name": "mode", "schema": "dtmi:com:example:Mode;1"}
      ],
      "schemas": [{"@id": "dtmi:com:example:Mode;1", "@type": "Enum", "valueSchema": "string",
                   "enumValues": [{"name": "eco", "enumValue": "eco"}, {"name": "max", "enumValue": "max"}]}]
    }"#;
    let parsed = parse_document(inline).expect("inline");
    assert_eq!(parsed.len(), 3);
    let mut set = ModelSet::new();
    set.add_document(inline).expect("adds");
    let m = set
        .resolve(&id("dtmi:com:example:Sensor;1"))
        .expect("resolves");
    assert!(m.property(None, "serial").is_some(), "through extends");
    assert!(m.telemetry(Some("battery"), "level").is_some());
    let mode = &m.telemetry(None, "mode").expect("mode").schema;
    assert!(
        matches!(mode, Schema::Enum { .. }),
        "reference resolved: {mode:?}"
    );
    assert_eq!(check_value(mode, &json!("eco")), Ok(()));
    assert!(check_value(mode, &json!("turbo")).is_err());
}

#[test]
fn dtdl_v3_models() {
    let v3 = r#"{
      "@context": ["dtmi:dtdl:context;3", "dtmi:dtdl:extension:quantitativeTypes;1"],
      "@id": "dtmi:com:example:Meter;1.2",
      "@type": "Interface",
      "contents": [
        {"@type": ["Telemetry", "Energy"], "name": "energy", "schema": "unsignedLong", "unit": "kilowattHour"},
        {"@type": "Property", "name": "id", "schema": "uuid"},
        {"@type": "Command", "name": "reset", "request": {"name": "at", "schema": "dateTime", "nullable": true}}
      ]
    }"#;
    let parsed = parse_document(v3).expect("v3");
    assert_eq!(parsed[0].version, ferrohub_dtdl::DtdlVersion::V3);
    let no_extension = v3.replace(", \"dtmi:dtdl:extension:quantitativeTypes;1\"", "");
    let e = parse_document(&no_extension).expect_err("semantic type without extension");
    assert_eq!(e.path, "$.contents[0].@type");
    // v3 primitives are not v2's.
    let v2 = no_extension
        .replace("dtmi:dtdl:context;3", "dtmi:dtdl:context;2")
        .replace(";1.2", ";1")
        .replace(", \"nullable\": true", "")
        .replace("[\"Telemetry\", \"Energy\"]", "\"Telemetry\"")
        .replace(", \"unit\": \"kilowattHour\"", "");
    let e = parse_document(&v2).expect_err("unsignedLong in v2");
    assert_eq!(e.path, "$.contents[0].schema");
    assert!(e.message.contains("unknown schema 'unsignedLong'"), "{e}");
}

#[test]
fn invalid_models_get_precise_errors() {
    let base = |contents: &str| {
        format!(
            r#"{{"@context": "dtmi:dtdl:context;2", "@id": "dtmi:com:example:X;1", "@type": "Interface", "contents": [{contents}]}}"#
        )
    };
    let cases: Vec<(String, &str, &str)> = vec![
        ("{not json".into(), "$", "not JSON (line 1, column 2)"),
        ("[]".into(), "$", "empty array"),
        (
            r#"{"@id": "dtmi:com:example:X;1", "@type": "Interface"}"#.into(),
            "$",
            "needs '@context'",
        ),
        (
            r#"{"@context": "dtmi:dtdl:context;4", "@id": "dtmi:com:example:X;1", "@type": "Interface"}"#.into(),
            "$.@context",
            "unknown DTDL context",
        ),
        (
            r#"{"@context": "dtmi:dtdl:context;2", "@id": "dtmi:com:example:X", "@type": "Interface"}"#.into(),
            "$.@id",
            "requires a version",
        ),
        (
            r#"{"@context": "dtmi:dtdl:context;2", "@id": "dtmi:com:example:X;1", "@type": "Telemetry"}"#.into(),
            "$.@type",
            "must be \"Interface\"",
        ),
        (
            base(r#"{"@type": "Telemetry", "name": "t", "shema": "double"}"#),
            "$.contents[0].shema",
            "'shema' is not a property of a Telemetry",
        ),
        (
            base(r#"{"@type": "Telemetry", "name": "t"}"#),
            "$.contents[0]",
            "needs a 'schema'",
        ),
        (
            base(r#"{"@type": "Telemetry", "name": "1t", "schema": "double"}"#),
            "$.contents[0].name",
            "not a valid name",
        ),
        (
            base(r#"{"@type": "Telemetry", "name": "t", "schema": "double"}, {"@type": "Property", "name": "t", "schema": "double"}"#),
            "$.contents[1].name",
            "already used by $.contents[0]",
        ),
        (
            base(r#"{"@type": "Telemetry", "name": "t", "schema": "double", "unit": "degreeCelsius"}"#),
            "$.contents[0].unit",
            "needs a semantic type",
        ),
        (
            base(r#"{"@type": "Property", "name": "p", "schema": "double", "writable": "yes"}"#),
            "$.contents[0].writable",
            "true or false",
        ),
        (
            base(r#"{"@type": "Thing", "name": "p", "schema": "double"}"#),
            "$.contents[0].@type",
            "must include one of",
        ),
        (
            base(r#"{"@type": "Property", "name": "p", "schema": "decimal"}"#),
            "$.contents[0].schema",
            "unknown schema 'decimal'",
        ),
        (
            base(r#"{"@type": "Property", "name": "p", "schema": {"@type": "Enum", "valueSchema": "integer", "enumValues": [{"name": "a", "enumValue": "x"}]}}"#),
            "$.contents[0].schema.enumValues[0].enumValue",
            "must be an integer",
        ),
        (
            base(r#"{"@type": "Property", "name": "p", "schema": {"@type": "Object", "fields": [{"name": "a", "schema": "double"}, {"name": "a", "schema": "string"}]}}"#),
            "$.contents[0].schema.fields[1].name",
            "used twice",
        ),
        (
            base(r#"{"@type": "Property", "name": "p", "schema": {"@type": "Map", "mapKey": {"name": "k", "schema": "integer"}, "mapValue": {"name": "v", "schema": "double"}}}"#),
            "$.contents[0].schema.mapKey.schema",
            "\"string\"",
        ),
        (
            base(r#"{"@type": "Property", "name": "p", "schema": {"@type": "Array", "elementSchema": {"@type": "Array", "elementSchema": {"@type": "Array", "elementSchema": {"@type": "Array", "elementSchema": {"@type": "Array", "elementSchema": {"@type": "Array", "elementSchema": "double"}}}}}}}"#),
            "$.contents[0].schema.elementSchema.elementSchema.elementSchema.elementSchema.elementSchema",
            "nest more than 5 levels",
        ),
        (
            base(r#"{"@type": "Command", "name": "c", "request": {"name": "r"}}"#),
            "$.contents[0].request",
            "needs a 'schema'",
        ),
        (
            base(r#"{"@type": "Component", "name": "c", "schema": "double"}"#),
            "$.contents[0].schema",
            "not a valid DTMI",
        ),
    ];
    for (doc, path, what) in cases {
        let e = parse_document(&doc).expect_err(&doc);
        assert_eq!(e.path, path, "{doc}: {e}");
        assert!(e.message.contains(what), "{doc}: {e}");
        let shown = e.in_file("model.json").to_string();
        assert!(
            shown.starts_with(&format!("model.json: {path}: ")),
            "{shown}"
        );
    }
}

#[test]
fn resolution_refuses_cycles_nested_components_duplicates_and_changed_versions() {
    let iface = |id: &str, body: &str| {
        format!(
            r#"{{"@context": "dtmi:dtdl:context;2", "@id": "{id}", "@type": "Interface", {body}}}"#
        )
    };
    let mut set = ModelSet::new();
    set.add_document(&iface("dtmi:x:A;1", r#""extends": "dtmi:x:B;1""#))
        .expect("a");
    set.add_document(&iface("dtmi:x:B;1", r#""extends": "dtmi:x:A;1""#))
        .expect("b");
    let e = set.resolve(&id("dtmi:x:A;1")).expect_err("cycle");
    assert!(matches!(e, ResolveError::Cycle { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("dtmi:x:A;1 -> dtmi:x:B;1 -> dtmi:x:A;1"),
        "{e}"
    );

    set.add_document(&iface(
        "dtmi:x:Outer;1",
        r#""contents": [{"@type": "Component", "name": "mid", "schema": "dtmi:x:Mid;1"}]"#,
    ))
    .expect("outer");
    set.add_document(&iface(
        "dtmi:x:Mid;1",
        r#""contents": [{"@type": "Component", "name": "inner", "schema": "dtmi:x:Leaf;1"}]"#,
    ))
    .expect("mid");
    set.add_document(&iface("dtmi:x:Leaf;1", r#""contents": []"#))
        .expect("leaf");
    let e = set.resolve(&id("dtmi:x:Outer;1")).expect_err("nested");
    assert!(matches!(e, ResolveError::NestedComponent { .. }), "{e}");

    set.add_document(&iface(
        "dtmi:x:Base;1",
        r#""contents": [{"@type": "Property", "name": "p", "schema": "double"}]"#,
    ))
    .expect("base");
    set.add_document(&iface(
        "dtmi:x:Child;1",
        r#""extends": "dtmi:x:Base;1", "contents": [{"@type": "Telemetry", "name": "p", "schema": "double"}]"#,
    ))
    .expect("child");
    let e = set.resolve(&id("dtmi:x:Child;1")).expect_err("dup");
    assert!(matches!(e, ResolveError::DuplicateName { .. }), "{e}");

    // The same id again is fine; other contents under it are not.
    set.add_document(&iface("dtmi:x:Leaf;1", r#""contents": []"#))
        .expect("same again");
    let e = set
        .add_document(&iface(
            "dtmi:x:Leaf;1",
            r#""contents": [{"@type": "Telemetry", "name": "t", "schema": "double"}]"#,
        ))
        .expect_err("changed");
    assert!(e.message.contains("immutable version"), "{e}");

    set.add_document(&iface(
        "dtmi:x:Refs;1",
        r#""contents": [{"@type": "Telemetry", "name": "t", "schema": "dtmi:x:Nowhere;1"}]"#,
    ))
    .expect("refs");
    let e = set.resolve(&id("dtmi:x:Refs;1")).expect_err("schema");
    assert!(matches!(e, ResolveError::SchemaNotFound { .. }), "{e}");
}
