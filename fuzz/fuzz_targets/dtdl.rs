//! Fuzz target: DTDL documents (`ferrohub_dtdl::parse_document`), resolution of every id they
//! declare, and value checks against every resolved telemetry, property and command schema.
//! Checks that nothing panics or overflows the stack, that every error names a JSON path
//! starting at `$`, that adding the same document twice is accepted (ids are immutable, not
//! unique per call), and that parsing is deterministic.
#![no_main]

use ferrohub_dtdl::check::check_value;
use ferrohub_dtdl::{parse_document, ModelSet};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_document(text);
    assert_eq!(parsed, parse_document(text));
    let interfaces = match parsed {
        Ok(i) => i,
        Err(e) => {
            assert!(e.path.starts_with('$'), "{e}");
            return;
        }
    };
    let mut set = ModelSet::new();
    let Ok(ids) = set.add_document(text) else {
        // Two different interfaces under one id in the same document.
        return;
    };
    assert_eq!(ids.len(), interfaces.len());
    set.add_document(text).expect("the same document again");
    let samples = [
        json!(1),
        json!(-1.5),
        json!("x"),
        json!(true),
        json!(null),
        json!({"a": 1}),
        json!([1, "a"]),
        json!("2026-12-01T00:00:00Z"),
    ];
    for id in &ids {
        let _ = set.closure(id);
        let Ok(model) = set.resolve(id) else {
            continue;
        };
        let parts = std::iter::once(&model.root).chain(model.components.values().map(|(_, r)| r));
        for part in parts {
            let schemas = part
                .telemetry
                .values()
                .map(|t| &t.schema)
                .chain(part.properties.values().map(|p| &p.schema))
                .chain(part.commands.values().flat_map(|c| {
                    c.request.iter().chain(c.response.iter()).map(|p| &p.schema)
                }));
            for schema in schemas {
                for v in &samples {
                    if let Err(e) = check_value(schema, v) {
                        assert!(e.path.starts_with('$'), "{e}");
                    }
                }
            }
        }
    }
});
