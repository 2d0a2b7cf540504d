//! Fuzz target: routing conditions (`RouteCondition::parse`) and their evaluation over a
//! message whose body is the input's remainder. The first line is the condition; the rest is
//! the body, declared JSON. Checks that nothing panics or overflows the stack, that `matches`
//! is exactly "evaluates to true", and that `NOT` keeps the three-valued logic (defined
//! conditions flip, undefined ones stay undefined).
#![no_main]

use std::collections::BTreeMap;

use ferrohub_iothub::routing::{RouteCondition, RoutingDocument};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (condition, body) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(parsed) = RouteCondition::parse(condition) else {
        return;
    };
    let mut sys = BTreeMap::new();
    sys.insert("content-type".to_owned(), "application/json".to_owned());
    sys.insert("content-encoding".to_owned(), "utf-8".to_owned());
    sys.insert("iothub-connection-device-id".to_owned(), "d1".to_owned());
    sys.insert("message-id".to_owned(), "m1".to_owned());
    let props = vec![
        ("a".to_owned(), Some("1".to_owned())),
        ("flag".to_owned(), None),
    ];
    let twin = json!({"deviceId": "d1", "tags": {"site": "x", "n": 3},
        "properties": {"desired": {"v": 1.5}, "reported": {"fw": "2.1"}}});
    let doc = RoutingDocument::from_parts(&sys, &props, body.as_bytes(), true, Some(twin));
    let outcome = parsed.evaluate(&doc);
    assert_eq!(parsed.matches(&doc), outcome == Some(true));
    // Evaluation is a pure function of the document.
    assert_eq!(parsed.evaluate(&doc), outcome);

    // NOT over the same text: the negation of a defined answer, undefined stays undefined.
    // Past the nesting limit the parser refuses, which is fine.
    if let Ok(negated) = RouteCondition::parse(&format!("NOT ({condition})")) {
        assert_eq!(negated.evaluate(&doc), outcome.map(|b| !b), "{condition:?}");
    }
});
