//! Fuzz target: the IoT Plug and Play digital twin (`ferrohub_iothub::digital_twin`): the view
//! of an arbitrary service twin and the JSON Patch conversion, checked against the rules the
//! module documents, with an independent model of which patches are accepted.
//!
//! Input: a service twin JSON, a newline, a JSON Patch. Either half that is not JSON is
//! replaced by a fixed one, so both functions run on every input.
#![no_main]

use std::collections::BTreeSet;

use ferrohub_iothub::digital_twin::{components, desired_patch, digital_twin};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// The model of the documented path rules: `/`-separated RFC 6901 segments, none empty, none a
/// `$` member or the `__t` marker, `~` only as `~0`/`~1`.
fn model_segments(path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix('/')?;
    let mut out = Vec::new();
    for raw in rest.split('/') {
        let mut seg = String::new();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '~' {
                match chars.next() {
                    Some('0') => seg.push('~'),
                    Some('1') => seg.push('/'),
                    _ => return None,
                }
            } else {
                seg.push(c);
            }
        }
        if seg.is_empty() || seg.starts_with('$') || seg == "__t" {
            return None;
        }
        out.push(seg);
    }
    Some(out)
}

/// Whether the model accepts the patch: a non-empty array of objects with an `op` of add,
/// replace or remove, a valid `path`, a `value` for add/replace, and an object (or a removal)
/// for a whole component.
fn model_accepts(patch: &Value, comps: &BTreeSet<String>) -> bool {
    let Some(ops) = patch.as_array() else {
        return false;
    };
    !ops.is_empty()
        && ops.iter().all(|op| {
            let Some(op) = op.as_object() else {
                return false;
            };
            let name = op.get("op").and_then(Value::as_str);
            let Some(path) = op.get("path").and_then(Value::as_str) else {
                return false;
            };
            let value = match name {
                Some("add") | Some("replace") => match op.get("value") {
                    Some(v) => v,
                    None => return false,
                },
                Some("remove") => &Value::Null,
                _ => return false,
            };
            let Some(segs) = model_segments(path) else {
                return false;
            };
            let whole = segs.len() == 1;
            !(whole && comps.contains(&segs[0]) && !value.is_null() && !value.is_object())
        })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (twin_text, patch_text) = text.split_once('\n').unwrap_or((&text, ""));
    let twin: Value = serde_json::from_str(twin_text).unwrap_or_else(|_| {
        json!({"modelId": "dtmi:x;1", "properties": {
            "desired": {"c1": {"__t": "c", "p": 1}, "$version": 2},
            "reported": {"c1": {"__t": "c", "p": {"value": 1, "ac": 200, "av": 2}}, "q": 3}}})
    });
    let patch: Value = serde_json::from_str(patch_text)
        .unwrap_or_else(|_| json!([{"op": "add", "path": "/c1/p", "value": 2}]));

    // The view: `$dtId`, an object `$metadata`, members only from the twin's property names,
    // no component marker anywhere, every component with its own `$metadata`.
    let dt = digital_twin("d", &twin);
    let dt = dt.as_object().expect("the digital twin is an object");
    assert_eq!(dt.get("$dtId"), Some(&Value::from("d")));
    assert!(dt.get("$metadata").is_some_and(Value::is_object));
    let comps = components(&twin);
    let names: BTreeSet<String> = ["desired", "reported"]
        .iter()
        .filter_map(|s| twin.get("properties")?.get(s)?.as_object())
        .flat_map(Map::keys)
        .filter(|k| !k.starts_with('$') && *k != "__t")
        .cloned()
        .collect();
    for (k, v) in dt {
        if k == "$dtId" || k == "$metadata" {
            continue;
        }
        assert!(names.contains(k), "{k} is not a property of the twin");
        if comps.contains(k) {
            let c = v.as_object().expect("a component is an object");
            assert!(c.get("$metadata").is_some_and(Value::is_object));
            assert!(!c.contains_key("__t"), "the marker leaked into {k}");
        }
    }

    // The patch: accepted exactly when the model accepts it; an accepted one is an object
    // whose named components carry the marker (or are removed), and has no `$` members at
    // its first level.
    let got = desired_patch(&patch, &comps);
    assert_eq!(
        got.is_ok(),
        model_accepts(&patch, &comps),
        "{patch} with components {comps:?}: {got:?}"
    );
    if let Ok(out) = got {
        let out = out.as_object().expect("a desired patch is an object");
        for (k, v) in out {
            assert!(!k.starts_with('$'), "{k} in {out:?}");
            if comps.contains(k) && !v.is_null() {
                assert_eq!(v.get("__t"), Some(&Value::from("c")), "{k} in {out:?}");
            }
        }
    }
});
