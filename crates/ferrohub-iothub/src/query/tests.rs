//! Unit tests of the query language: every operator, function and aggregate, precedence,
//! escaping, normalization and errors with their positions.

use serde_json::{json, Value};

use super::*;

fn twin() -> Value {
    json!({
        "deviceId": "dev-1",
        "status": "enabled",
        "connectionState": "Disconnected",
        "version": 4,
        "capabilities": {"iotEdge": false},
        "tags": {"site": "paris", "floor": 3, "group": "g1", "nothing": null, "list": [1, 2],
                 "with space": "yes", "obj": {"a": 1}},
        "properties": {
            "desired": {"mode": "eco", "$version": 2},
            "reported": {"temperature": 21.5, "on": true, "$version": 7,
                         "$metadata": {"temperature": {"$lastUpdated": "2026-01-01T00:00:00Z"}}}
        }
    })
}

fn q(text: &str) -> Query {
    match parse(text) {
        Ok(q) => q,
        Err(e) => panic!("{text}: {e}"),
    }
}

/// Whether `cond` (a WHERE clause) matches the test twin.
fn m(cond: &str) -> bool {
    let query = q(&format!("SELECT * FROM devices WHERE {cond}"));
    let c = query.condition.as_ref().expect("a condition");
    matches(c, &twin())
}

/// The value of one projected expression over the test twin.
fn v(expr: &str) -> Option<Value> {
    let query = q(&format!("SELECT {expr} AS x FROM devices"));
    project(&query.select, &twin()).get("x").cloned()
}

fn err(text: &str) -> QueryError {
    match parse(text) {
        Ok(q) => panic!("{text} parsed as {q:?}"),
        Err(e) => e,
    }
}

#[test]
fn comparisons_of_every_kind() {
    assert!(m("tags.site = 'paris'"));
    assert!(!m("tags.site = 'lyon'"));
    assert!(m("tags.site != 'lyon'"));
    assert!(m("tags.site <> 'lyon'"));
    assert!(m("tags.floor > 2") && !m("tags.floor > 3"));
    assert!(m("tags.floor >= 3") && !m("tags.floor >= 4"));
    assert!(m("tags.floor < 4") && !m("tags.floor < 3"));
    assert!(m("tags.floor <= 3") && !m("tags.floor <= 2"));
    assert!(m("tags.floor = 3.0"), "numbers compare by value");
    assert!(
        m("tags.site < 'q'") && m("tags.site > 'p'"),
        "strings by code point"
    );
    assert!(m("properties.reported.on = true"));
    assert!(m("tags.nothing = null"));
    assert!(m("3 = tags.floor"), "a constant on the left");
}

#[test]
fn undefined_and_non_primitives_never_match() {
    assert!(!m("tags.missing = 'x'"));
    assert!(!m("tags.missing != 'x'"), "undefined is not unequal either");
    assert!(!m("NOT (tags.missing = 'x')"), "NOT undefined is undefined");
    assert!(!m("tags.obj = tags.obj"), "objects do not compare");
    assert!(!m("tags.list = tags.list"));
    assert!(!m("tags.site > 3"), "an order across types is undefined");
    assert!(m("tags.site != 3"), "inequality across types holds");
    assert!(!m("tags.site = 3"));
    assert!(
        !m("properties.reported.on > false"),
        "booleans have no order"
    );
}

#[test]
fn logic_is_three_valued_and_binds_as_sql() {
    assert!(m("tags.site = 'paris' AND tags.floor = 3"));
    assert!(!m("tags.site = 'paris' AND tags.floor = 4"));
    assert!(m("tags.site = 'lyon' OR tags.floor = 3"));
    assert!(m("tags.missing = 1 OR tags.floor = 3"), "true OR undefined");
    assert!(
        !m("tags.missing = 1 AND tags.floor = 3"),
        "undefined AND true"
    );
    assert!(m("NOT tags.site = 'lyon'"));
    assert!(m("NOT NOT tags.site = 'paris'"));
    // AND binds tighter than OR: true OR (false AND false).
    assert!(m("tags.floor = 3 OR tags.site = 'x' AND tags.site = 'y'"));
    assert!(!m(
        "(tags.floor = 3 OR tags.site = 'x') AND tags.site = 'y'"
    ));
    // NOT binds tighter than AND.
    assert!(!m("NOT tags.floor = 3 AND tags.site = 'paris'"));
    assert!(
        m("not tags.floor = 4 and tags.site = 'paris'"),
        "keywords in any case"
    );
}

#[test]
fn in_and_nin() {
    assert!(m("tags.site IN ['lyon', 'paris']"));
    assert!(!m("tags.site IN ['lyon']"));
    assert!(!m("tags.site IN []"));
    assert!(m("tags.floor IN [1, 3, -2]"));
    assert!(m("tags.site NIN ['lyon']"));
    assert!(!m("tags.site NIN ['paris']"));
    assert!(
        !m("tags.missing NIN ['x']"),
        "undefined is in nothing and out of nothing"
    );
    assert!(!m("tags.obj IN ['x']"));
    assert!(err("SELECT * FROM devices WHERE tags.site IN [tags.x]")
        .message
        .contains("constants only"));
}

#[test]
fn arithmetic_and_its_precedence() {
    assert_eq!(v("1 + 2 * 3"), Some(json!(7)));
    assert_eq!(v("(1 + 2) * 3"), Some(json!(9)));
    assert_eq!(v("10 - 4 - 3"), Some(json!(3)), "left-associative");
    assert_eq!(v("7 / 2"), Some(json!(3.5)));
    assert_eq!(v("7 % 4"), Some(json!(3)));
    assert_eq!(v("-tags.floor"), Some(json!(-3)));
    assert_eq!(v("tags.floor * 2 + 0.5"), Some(json!(6.5)));
    assert_eq!(v("1 / 0"), None, "division by zero is undefined");
    assert_eq!(
        v("tags.site + 1"),
        None,
        "arithmetic on a string is undefined"
    );
    assert!(
        m("tags.floor + 1 = 4"),
        "arithmetic binds tighter than comparison"
    );
    assert!(m("properties.reported.temperature * 2 > 40"));
}

#[test]
fn type_functions() {
    assert_eq!(v("IS_DEFINED(tags.site)"), Some(json!(true)));
    assert_eq!(v("IS_DEFINED(tags.missing)"), Some(json!(false)));
    assert_eq!(v("IS_BOOL(properties.reported.on)"), Some(json!(true)));
    assert_eq!(v("IS_BOOL(tags.site)"), Some(json!(false)));
    assert_eq!(v("IS_NUMBER(tags.floor)"), Some(json!(true)));
    assert_eq!(v("IS_NUMBER(tags.site)"), Some(json!(false)));
    assert_eq!(v("IS_STRING(tags.site)"), Some(json!(true)));
    assert_eq!(v("IS_STRING(tags.missing)"), Some(json!(false)));
    assert_eq!(v("IS_NULL(tags.nothing)"), Some(json!(true)));
    assert_eq!(v("IS_NULL(tags.missing)"), Some(json!(false)));
    assert_eq!(v("IS_OBJECT(tags.obj)"), Some(json!(true)));
    assert_eq!(v("IS_OBJECT(tags.list)"), Some(json!(false)));
    assert_eq!(v("IS_PRIMITIVE(tags.nothing)"), Some(json!(true)));
    assert_eq!(v("IS_PRIMITIVE(tags.list)"), Some(json!(false)));
    assert_eq!(
        v("is_defined(tags.site)"),
        Some(json!(true)),
        "names in any case"
    );
}

#[test]
fn string_functions() {
    assert!(m("STARTSWITH(deviceId, 'dev-')"));
    assert!(!m("STARTSWITH(deviceId, 'DEV')"), "case-sensitive");
    assert!(m("ENDSWITH(deviceId, '-1')"));
    assert!(!m("ENDSWITH(deviceId, '-2')"));
    assert!(!m("STARTSWITH(tags.floor, '3')"), "only strings");
    assert!(
        !m("NOT STARTSWITH(tags.floor, '3')"),
        "undefined, not false"
    );
}

#[test]
fn paths_prefix_casing_escapes_and_metadata() {
    assert!(
        m("devices.deviceId = 'dev-1'"),
        "the collection prefix is optional"
    );
    assert!(m("DeviceId = 'dev-1'"), "IoT Hub's members in any casing");
    assert!(m("Properties.Reported.temperature = 21.5"));
    assert!(
        m("tags.[[group]] = 'g1'"),
        "a property named like a keyword"
    );
    assert!(m("tags.group = 'g1'"), "after a dot a keyword is a name");
    assert!(m("tags.[[with space]] = 'yes'"));
    assert!(m("$version = 4"), "$version is the twin's version");
    assert!(m("properties.reported.$version = 7"));
    assert!(m("properties.desired.$version = 2"));
    assert!(m(
        "properties.reported.$metadata.temperature.$lastUpdated > '2025'"
    ));
    assert!(m("capabilities.iotEdge = false"));
    let query =
        q("SELECT DeviceId, devices.tags.site, properties.reported.temperature FROM devices");
    assert_eq!(
        project(&query.select, &twin()),
        json!({"deviceId": "dev-1", "site": "paris", "temperature": 21.5})
    );
    let modules = q("SELECT * FROM devices.modules WHERE devices.modules.moduleId = 'm'");
    assert_eq!(modules.from, Collection::Modules);
    let Some(Expr::Binary(_, left, _)) = &modules.condition else {
        panic!("{modules:?}")
    };
    assert_eq!(
        **left,
        Expr::Path(Path {
            segments: vec!["moduleId".into()]
        })
    );
}

#[test]
fn strings_and_numbers() {
    assert_eq!(v("'it\\'s'"), Some(json!("it's")));
    assert_eq!(v("\"double\""), Some(json!("double")));
    assert_eq!(v("'a\\u00e9'"), Some(json!("aé")));
    assert_eq!(v("1.5e2"), Some(json!(150.0)));
    assert_eq!(v(".5"), Some(json!(0.5)));
    assert_eq!(v("18446744073709551615"), Some(json!(u64::MAX)));
}

#[test]
fn projections_aliases_and_unnamed_items() {
    let query = q("SELECT deviceId AS DeviceId, tags.floor + 1, IS_DEFINED(tags.x), tags.missing FROM devices");
    assert_eq!(
        project(&query.select, &twin()),
        json!({"DeviceId": "dev-1", "$1": 4, "$2": false}),
        "undefined projections are left out"
    );
    let query = q("SELECT tags.site AS [[select]], tags.floor AS 'floor number' FROM devices");
    assert_eq!(
        project(&query.select, &twin()),
        json!({"select": "paris", "floor number": 3})
    );
    assert_eq!(project(&q("SELECT * FROM devices").select, &twin()), twin());
    let top = q("select top 5 * from devices");
    assert_eq!(top.top, Some(5));
}

fn aggregate(text: &str, docs: &[Value]) -> Vec<Value> {
    let query = q(text);
    assert!(query.is_aggregate());
    let mut agg = Aggregator::new(&query);
    for d in docs {
        if query.condition.as_ref().is_none_or(|c| matches(c, d)) {
            agg.add(d);
        }
    }
    agg.finish()
}

fn fleet() -> Vec<Value> {
    vec![
        json!({"deviceId": "a", "status": "enabled", "tags": {"n": 1, "s": "x"}}),
        json!({"deviceId": "b", "status": "disabled", "tags": {"n": 4, "s": "y"}}),
        json!({"deviceId": "c", "status": "enabled", "tags": {"n": 2.5}}),
        json!({"deviceId": "d", "status": "enabled", "tags": {"n": "text"}}),
    ]
}

#[test]
fn aggregates_over_all_documents() {
    let rows = aggregate(
        "SELECT COUNT() AS n, SUM(tags.n) AS sum, AVG(tags.n) AS avg, MIN(tags.n) AS min, MAX(tags.n) AS max, MAX(tags.s) AS maxs FROM devices",
        &fleet(),
    );
    assert_eq!(
        rows,
        vec![json!({"n": 4, "sum": 7.5, "avg": 2.5, "min": 1, "max": 4, "maxs": "y"})],
        "non-numbers are skipped by SUM, AVG, MIN and MAX; MIN/MAX of strings when no numbers"
    );
    let ints = aggregate(
        "SELECT SUM(tags.n) AS s FROM devices WHERE deviceId IN ['a', 'b']",
        &fleet(),
    );
    assert_eq!(
        ints,
        vec![json!({"s": 5})],
        "a sum of integers stays an integer"
    );
    let none = aggregate(
        "SELECT COUNT() AS n, SUM(tags.n) AS s, AVG(tags.n) AS a FROM devices WHERE tags.n = 99",
        &fleet(),
    );
    assert_eq!(
        none,
        vec![json!({"n": 0, "s": 0})],
        "AVG of nothing is undefined"
    );
    let unnamed = aggregate("SELECT COUNT() FROM devices", &fleet());
    assert_eq!(unnamed, vec![json!({"$1": 4})]);
    let derived = aggregate(
        "SELECT SUM(tags.n) / COUNT() AS mean FROM devices WHERE IS_NUMBER(tags.n)",
        &fleet(),
    );
    assert_eq!(derived, vec![json!({"mean": 2.5})]);
}

#[test]
fn group_by_gives_a_row_per_group() {
    let rows = aggregate(
        "SELECT status, COUNT() AS numberOfDevices FROM devices GROUP BY status",
        &fleet(),
    );
    assert_eq!(
        rows,
        vec![
            json!({"numberOfDevices": 1, "status": "disabled"}),
            json!({"numberOfDevices": 3, "status": "enabled"}),
        ]
    );
    let nested = aggregate(
        "SELECT tags.s, COUNT() AS n FROM devices WHERE status = 'enabled' GROUP BY tags.s",
        &fleet(),
    );
    assert_eq!(
        nested,
        vec![json!({"n": 1, "s": "x"}), json!({"n": 2})],
        "documents without the grouped path form a group without the key"
    );
}

#[test]
fn errors_name_the_position_and_what_was_expected() {
    let e = err("SELECT * FROM devices WHERE");
    assert_eq!((e.line, e.column), (1, 28));
    assert!(e.message.contains("expected an expression"), "{e}");
    let e = err("SELECT * FORM devices");
    assert_eq!(e.column, 10);
    assert!(e.to_string().contains("expected FROM, found 'FORM'"), "{e}");
    let e = err("SELECT * FROM things");
    assert!(
        e.message
            .contains("devices, devices.modules or devices.jobs"),
        "{e}"
    );
    let e = err("SELECT * FROM devices WHERE tags.x = 'open");
    assert_eq!(e.column, 38);
    assert!(e.message.contains("not closed"), "{e}");
    let e = err("SELECT * FROM devices WHERE FOO(tags.x)");
    assert!(e.message.contains("unknown function 'FOO'"), "{e}");
    let e = err("SELECT * FROM devices WHERE STARTSWITH(deviceId)");
    assert!(e.message.contains("takes 2 arguments, got 1"), "{e}");
    let e = err("SELECT * FROM devices WHERE tags.group = 1 AND group = 2");
    assert!(e.message.contains("[[group]]"), "{e}");
    let e = err("SELECT * FROM devices WHERE tags.x = 1 extra");
    assert!(e.message.contains("found 'extra'"), "{e}");
    let e = err("SELECT *\nFROM devices WHERE #");
    assert_eq!((e.line, e.column), (2, 20));
    let e = err("SELECT * FROM devices WHERE COUNT() > 1");
    assert!(e.message.contains("not allowed in WHERE"), "{e}");
    let e = err("SELECT * FROM devices GROUP BY status");
    assert!(e.message.contains("SELECT *"), "{e}");
    let e = err("SELECT deviceId, COUNT() FROM devices GROUP BY status");
    assert!(
        e.message
            .contains("'deviceId' is selected beside aggregates"),
        "{e}"
    );
    let e = err("SELECT moduleId, COUNT() AS n FROM devices.modules GROUP BY moduleId");
    assert!(e.message.contains("only supported on devices"), "{e}");
    let e = err("SELECT TOP x * FROM devices");
    assert!(e.message.contains("expected a number after TOP"), "{e}");
    let e = err("SELECT COUNT(deviceId) FROM devices");
    assert!(e.message.contains("COUNT takes no arguments"), "{e}");
    let e = err("SELECT * FROM devices WHERE tags.[[x");
    assert!(e.message.contains("not closed"), "{e}");
    let e = err("SELECT * FROM devices WHERE tags.x = 1e");
    assert!(e.message.contains("exponent"), "{e}");
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let deep = |open: &str, close: &str, n: usize| {
        format!(
            "SELECT * FROM devices WHERE {}tags.a = 1{}",
            open.repeat(n),
            close.repeat(n)
        )
    };
    assert!(parse(&deep("(", ")", 60)).is_ok());
    for text in [
        deep("(", ")", 4000),
        deep("NOT ", "", 2000),
        deep("IS_DEFINED(", ")", 600),
        format!("SELECT * FROM devices WHERE tags.a = {}1", "-".repeat(4000)),
    ] {
        let e = err(&text);
        assert!(e.message.contains("nests more than 64 levels"), "{e}");
    }
    // Long flat chains are not nesting: they parse, and evaluate, in loops.
    let chain = vec!["tags.floor = 3"; 400].join(" AND ");
    assert!(m(&chain));
}

#[test]
fn the_length_limit_is_8192_characters() {
    let pad = " ".repeat(MAX_QUERY_CHARS - "SELECT * FROM devices".len());
    assert!(parse(&format!("SELECT * FROM devices{pad}")).is_ok());
    let e = err(&format!("SELECT * FROM devices{pad} "));
    assert!(e.message.contains("at most 8192"), "{e}");
}

#[test]
fn sieves_keep_what_a_store_can_check() {
    let s = |cond: &str| {
        sieve(
            q(&format!("SELECT * FROM devices WHERE {cond}"))
                .condition
                .as_ref()
                .expect("cond"),
        )
    };
    let p = |s: &str| Path {
        segments: s.split('.').map(String::from).collect(),
    };
    assert_eq!(
        s("tags.site = 'x'"),
        Sieve::Compare(p("tags.site"), BinaryOp::Eq, json!("x"))
    );
    assert_eq!(
        s("5 < tags.n"),
        Sieve::Compare(p("tags.n"), BinaryOp::Gt, json!(5))
    );
    assert_eq!(
        s("tags.a = 1 AND (tags.b = 2 AND NOT tags.c = 3)"),
        Sieve::And(vec![
            Sieve::Compare(p("tags.a"), BinaryOp::Eq, json!(1)),
            Sieve::Compare(p("tags.b"), BinaryOp::Eq, json!(2)),
        ])
    );
    assert_eq!(
        s("tags.a = 1 OR NOT tags.b = 2"),
        Sieve::All,
        "an OR with an unknown side"
    );
    assert_eq!(
        s("tags.a IN ['x', 'y']"),
        Sieve::Or(vec![
            Sieve::Compare(p("tags.a"), BinaryOp::Eq, json!("x")),
            Sieve::Compare(p("tags.a"), BinaryOp::Eq, json!("y")),
        ])
    );
    assert_eq!(
        s("STARTSWITH(deviceId, 'ab')"),
        Sieve::StartsWith(p("deviceId"), "ab".into())
    );
    assert_eq!(s("tags.a != 'x'"), Sieve::Defined(p("tags.a")));
    assert_eq!(s("IS_DEFINED(tags.a)"), Sieve::Defined(p("tags.a")));
    assert_eq!(s("tags.a = null"), Sieve::Defined(p("tags.a")));
}
