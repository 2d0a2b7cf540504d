//! Fuzz target: twin writes (`Twin::patch_reported`, `patch_desired`, `patch_tags`, the
//! replace variants and service updates) with arbitrary JSON, checked against an independent
//! model of twin.rs's documented rules: JSON merge patch, key/string/depth rules, size limits,
//! version bumps, metadata mirroring the properties, and "a rejected write changes nothing".
//!
//! Input: a sequence of operations, each one letter followed by a JSON value, e.g.
//! `r{"battery":55} d{"fw":{"v":"1.2"},"$version":3} t{"site":null}`. Letters: `r` reported
//! patch, `d` desired patch, `t` tags patch, `D` desired replace, `T` tags replace, `s` service
//! PATCH body, `S` service PUT body. Parsing stops at the first thing that is neither.
#![no_main]

use ferrohub_iothub::twin::{
    Twin, FORBIDDEN_KEY_CHARS, LAST_UPDATED, LAST_UPDATED_VERSION, MAX_DEPTH, MAX_KEY_LEN,
    MAX_PROPERTIES_SIZE, MAX_STRING_LEN, MAX_TAGS_SIZE, METADATA, VERSION,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const TIMES: [&str; 3] = [
    "2026-11-22T07:00:00.0000000Z",
    "2026-11-22T07:00:01.1234567Z",
    "2026-11-22T07:00:02.7654321Z",
];

// ---- an independent model of the rules in twin.rs ----

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && !key.starts_with('$')
        && !key
            .chars()
            .any(|c| c.is_control() || FORBIDDEN_KEY_CHARS.contains(&c))
}

/// `level` is where `value` sits: a section's members are at level 1.
fn valid_value(value: &Value, level: usize) -> bool {
    match value {
        Value::String(s) => s.len() <= MAX_STRING_LEN,
        Value::Object(map) => level <= MAX_DEPTH && valid_members(map, level + 1),
        Value::Array(items) => {
            level <= MAX_DEPTH && items.iter().all(|v| valid_value(v, level + 1))
        }
        _ => true,
    }
}

fn valid_members(map: &Map<String, Value>, level: usize) -> bool {
    map.iter()
        .all(|(k, v)| valid_key(k) && valid_value(v, level))
}

fn size(map: &Map<String, Value>) -> usize {
    serde_json::to_string(map).expect("a Map serializes").len()
}

/// RFC 7386 merge patch, with removing the last member leaving `{}`.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(child_patch) => {
                let mut child = match target.remove(key) {
                    Some(Value::Object(child)) => child,
                    _ => Map::new(),
                };
                merge(&mut child, child_patch);
                target.insert(key.clone(), Value::Object(child));
            }
            leaf => {
                target.insert(key.clone(), leaf.clone());
            }
        }
    }
}

fn merged(base: &Map<String, Value>, patch: &Map<String, Value>) -> Map<String, Value> {
    let mut out = base.clone();
    merge(&mut out, patch);
    out
}

fn without_read_only(body: &Map<String, Value>) -> Map<String, Value> {
    let mut body = body.clone();
    body.remove(VERSION);
    body.remove(METADATA);
    body
}

/// What a valid write of `body` into `base` gives, or `None` if the twin must refuse it.
fn planned(
    base: &Map<String, Value>,
    body: &Map<String, Value>,
    limit: usize,
) -> Option<Map<String, Value>> {
    if !valid_members(body, 1) {
        return None;
    }
    let result = merged(base, body);
    (size(&result) <= limit).then_some(result)
}

/// A member that is absent or `null` is "not given"; anything else must be an object.
fn optional_object(value: Option<&Value>) -> Result<Option<&Map<String, Value>>, ()> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(()),
    }
}

// ---- invariants every twin must keep ----

/// Valid keys and strings, depth, no `null` members (nulls remove), within the size limit.
fn check_props(props: &Map<String, Value>, limit: usize, what: &str) {
    assert!(
        valid_members(props, 1),
        "{what} breaks the key/string/depth rules"
    );
    assert!(size(props) <= limit, "{what} is over its size limit");
    fn no_null_members(map: &Map<String, Value>) -> bool {
        map.values().all(|v| match v {
            Value::Null => false,
            Value::Object(child) => no_null_members(child),
            _ => true,
        })
    }
    assert!(no_null_members(props), "{what} stores a null member");
}

/// `$metadata` mirrors the properties: every property has `$lastUpdated` (and, in desired, a
/// `$lastUpdatedVersion` no later than the section's version), objects hold their children's
/// metadata, and nothing else is there.
fn check_metadata(props: &Map<String, Value>, meta: &Value, versioned: Option<u64>, at: &str) {
    let Value::Object(meta) = meta else {
        panic!("metadata at {at} is not an object");
    };
    assert!(
        meta.get(LAST_UPDATED).is_some_and(Value::is_string),
        "no $lastUpdated at {at}"
    );
    match versioned {
        Some(section_version) => {
            let v = meta.get(LAST_UPDATED_VERSION).and_then(Value::as_u64);
            assert!(
                v.is_some_and(|v| v >= 1 && v <= section_version),
                "bad $lastUpdatedVersion at {at}"
            );
        }
        None => assert!(!meta.contains_key(LAST_UPDATED_VERSION), "{at}"),
    }
    for key in meta.keys() {
        if key != LAST_UPDATED && key != LAST_UPDATED_VERSION {
            assert!(props.contains_key(key), "stale metadata for {at}.{key}");
        }
    }
    for (key, value) in props {
        let child_at = format!("{at}.{key}");
        let child_meta = meta
            .get(key)
            .unwrap_or_else(|| panic!("no metadata for {child_at}"));
        match value {
            Value::Object(child) => check_metadata(child, child_meta, versioned, &child_at),
            _ => check_metadata(&Map::new(), child_meta, versioned, &child_at),
        }
    }
}

fn check_twin(twin: &Twin) {
    check_props(&twin.tags, MAX_TAGS_SIZE, "tags");
    check_props(&twin.desired.props, MAX_PROPERTIES_SIZE, "desired");
    check_props(&twin.reported.props, MAX_PROPERTIES_SIZE, "reported");
    check_metadata(
        &twin.desired.props,
        &twin.desired.metadata,
        Some(twin.desired.version),
        "desired",
    );
    check_metadata(
        &twin.reported.props,
        &twin.reported.metadata,
        None,
        "reported",
    );
    assert!(twin.version >= twin.desired.version.max(twin.reported.version));

    // Views show exactly the properties plus `$version`.
    let view = twin.device_view();
    let mut desired = twin.desired.props.clone();
    desired.insert(VERSION.to_owned(), Value::from(twin.desired.version));
    assert_eq!(view["desired"], Value::Object(desired));
    let mut reported = twin.reported.props.clone();
    reported.insert(VERSION.to_owned(), Value::from(twin.reported.version));
    assert_eq!(view["reported"], Value::Object(reported));
    let service = twin.service_view(Map::new());
    assert_eq!(service["tags"], Value::Object(twin.tags.clone()));
    assert_eq!(service["version"], Value::from(twin.version));

    // The store keeps the twin as a JSON string; reading it back gives the same twin.
    let stored = serde_json::to_string(twin).expect("a twin serializes");
    let loaded: Twin = serde_json::from_str(&stored).expect("a stored twin parses");
    assert_eq!(&loaded, twin, "twin changed through its stored form");
}

fn assert_unchanged(twin: &Twin, before: &Twin, op: char) {
    assert_eq!(twin, before, "a rejected or no-op `{op}` changed the twin");
}

// ---- one operation, checked against the model ----

fn apply(twin: &mut Twin, op: char, body: &Value, now: &str) {
    let before = twin.clone();
    let object = body.as_object();
    match op {
        'r' => {
            let expected =
                object.and_then(|p| planned(&before.reported.props, p, MAX_PROPERTIES_SIZE));
            let result = twin.patch_reported(body, now);
            match (expected, result) {
                (None, Err(_)) => assert_unchanged(twin, &before, op),
                (Some(props), Ok(version)) => {
                    assert_eq!(twin.reported.props, props);
                    assert_eq!(version, before.reported.version + 1);
                    assert_eq!(twin.reported.version, version);
                    assert_eq!(twin.version, before.version + 1);
                    assert_eq!(twin.desired, before.desired);
                    assert_eq!(twin.tags, before.tags);
                    assert_eq!(twin.reported.metadata[LAST_UPDATED], now);
                    for (key, value) in object.into_iter().flatten() {
                        if !value.is_null() {
                            assert_eq!(twin.reported.metadata[key][LAST_UPDATED], now);
                        }
                    }
                }
                (expected, result) => panic!(
                    "reported patch: model says {}, twin says {result:?}",
                    if expected.is_some() {
                        "accept"
                    } else {
                        "reject"
                    }
                ),
            }
        }
        'd' | 'D' => {
            let replace = op == 'D';
            let props = object.map(without_read_only);
            let base = if replace {
                Map::new()
            } else {
                before.desired.props.clone()
            };
            let expected = props
                .as_ref()
                .and_then(|p| planned(&base, p, MAX_PROPERTIES_SIZE));
            let result = if replace {
                twin.replace_desired(body, now).map(Some)
            } else {
                twin.patch_desired(body, now)
            };
            let noop = !replace && props.as_ref().is_some_and(Map::is_empty);
            match (expected, result) {
                (None, Err(_)) => assert_unchanged(twin, &before, op),
                (Some(_), Ok(None)) if noop => assert_unchanged(twin, &before, op),
                (Some(new_props), Ok(Some(notification))) if !noop => {
                    assert_eq!(twin.desired.props, new_props);
                    assert_eq!(twin.desired.version, before.desired.version + 1);
                    assert_eq!(twin.version, before.version + 1);
                    assert_eq!(twin.reported, before.reported);
                    assert_eq!(twin.tags, before.tags);
                    assert_eq!(
                        twin.desired.metadata[LAST_UPDATED_VERSION],
                        twin.desired.version
                    );
                    // The device is told the patch as sent (nulls included) or, for a
                    // replacement, the whole new section; plus the new `$version`.
                    let mut told = if replace {
                        new_props
                    } else {
                        props.unwrap_or_default()
                    };
                    told.insert(VERSION.to_owned(), Value::from(twin.desired.version));
                    assert_eq!(notification, Value::Object(told));
                }
                (expected, result) => panic!(
                    "desired {op}: model says {}, twin says {result:?}",
                    match (expected.is_some(), noop) {
                        (false, _) => "reject",
                        (true, true) => "no-op",
                        (true, false) => "accept",
                    }
                ),
            }
        }
        't' | 'T' => {
            let replace = op == 'T';
            let base = if replace {
                Map::new()
            } else {
                before.tags.clone()
            };
            let expected = object.and_then(|p| planned(&base, p, MAX_TAGS_SIZE));
            let result = if replace {
                twin.replace_tags(body)
            } else {
                twin.patch_tags(body)
            };
            match (expected, result) {
                (None, Err(_)) => assert_unchanged(twin, &before, op),
                (Some(tags), Ok(changed)) => {
                    assert_eq!(changed, tags != before.tags);
                    assert_eq!(twin.tags, tags);
                    assert_eq!(twin.version, before.version + u64::from(changed));
                    assert_eq!(twin.desired, before.desired);
                    assert_eq!(twin.reported, before.reported);
                }
                (expected, result) => panic!(
                    "tags {op}: model says {}, twin says {result:?}",
                    if expected.is_some() {
                        "accept"
                    } else {
                        "reject"
                    }
                ),
            }
        }
        's' | 'S' => {
            let replace = op == 'S';
            let result = twin.apply_service_update(body, replace, now);
            // Model: both parts are planned; any failure rejects the whole update.
            let model = (|| {
                let body = object.ok_or(())?;
                let tags = optional_object(body.get("tags"))?;
                let desired = match optional_object(body.get("properties"))? {
                    Some(properties) => optional_object(properties.get("desired"))?,
                    None => None,
                };
                let empty = Map::new();
                let (tags, desired) = if replace {
                    (
                        Some(tags.unwrap_or(&empty)),
                        Some(desired.unwrap_or(&empty)),
                    )
                } else {
                    (tags, desired)
                };
                let tags_base = if replace {
                    Map::new()
                } else {
                    before.tags.clone()
                };
                let new_tags = match tags {
                    Some(t) => Some(planned(&tags_base, t, MAX_TAGS_SIZE).ok_or(())?),
                    None => None,
                };
                let desired_base = if replace {
                    Map::new()
                } else {
                    before.desired.props.clone()
                };
                let new_desired = match desired.map(without_read_only) {
                    Some(d) if !replace && d.is_empty() => {
                        // Still validated (trivially valid), but nothing is written.
                        None
                    }
                    Some(d) => Some(planned(&desired_base, &d, MAX_PROPERTIES_SIZE).ok_or(())?),
                    None => None,
                };
                Ok::<_, ()>((new_tags, new_desired))
            })();
            match (model, result) {
                (Err(()), Err(_)) => assert_unchanged(twin, &before, op),
                (Ok((new_tags, new_desired)), Ok(update)) => {
                    let tags_changed = new_tags.as_ref().is_some_and(|t| *t != before.tags);
                    let changed = tags_changed || new_desired.is_some();
                    assert_eq!(update.changed, changed);
                    assert_eq!(twin.version, before.version + u64::from(changed));
                    assert_eq!(twin.tags, new_tags.unwrap_or(before.tags.clone()));
                    assert_eq!(update.desired_notification.is_some(), new_desired.is_some());
                    match new_desired {
                        Some(props) => {
                            assert_eq!(twin.desired.props, props);
                            assert_eq!(twin.desired.version, before.desired.version + 1);
                        }
                        None => assert_eq!(twin.desired, before.desired),
                    }
                    assert_eq!(twin.reported, before.reported);
                }
                (model, result) => panic!(
                    "service update {op}: model says {}, twin says {result:?}",
                    if model.is_ok() { "accept" } else { "reject" }
                ),
            }
        }
        _ => unreachable!("apply is only called with known letters"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut twin = Twin::new(TIMES[0]);
    let mut rest = data;
    for step in 0.. {
        while let [b, tail @ ..] = rest {
            if !b.is_ascii_whitespace() {
                break;
            }
            rest = tail;
        }
        let [op, tail @ ..] = rest else {
            break;
        };
        let op = char::from(*op);
        if !"rdtDTsS".contains(op) {
            break;
        }
        let mut values = serde_json::Deserializer::from_slice(tail).into_iter::<Value>();
        let Some(Ok(body)) = values.next() else {
            break;
        };
        rest = &tail[values.byte_offset()..];
        apply(&mut twin, op, &body, TIMES[(step + 1) % TIMES.len()]);
        check_twin(&twin);
    }
});
