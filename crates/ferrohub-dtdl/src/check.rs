//! Whether a JSON value is what a schema describes, as IoT Plug and Play serializes DTDL values:
//! numbers for the numeric types (in range for the sized ones), strings in ISO 8601 for dates,
//! times and durations, enum values by value, objects with only the declared fields (each
//! optional), maps as objects, arrays as arrays. The error names the JSON path inside the value.

use base64::Engine as _;
use serde_json::Value;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;

use crate::model::{Primitive, Schema};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {message}")]
pub struct ValueError {
    /// Inside the checked value: `$` itself, `$.field`, `$[2]`, `$.map.key`.
    pub path: String,
    pub message: String,
}

/// Checks `value` against `schema` (resolved: a remaining reference is an error).
pub fn check_value(schema: &Schema, value: &Value) -> Result<(), ValueError> {
    check(schema, value, "$")
}

fn fail(path: &str, message: impl Into<String>) -> Result<(), ValueError> {
    Err(ValueError {
        path: path.to_owned(),
        message: message.into(),
    })
}

/// A value as JSON text, cut to 60 characters for messages.
pub(crate) fn describe(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

fn check(schema: &Schema, v: &Value, path: &str) -> Result<(), ValueError> {
    match schema {
        Schema::Primitive(p) => primitive(*p, v, path),
        Schema::Enum { values, .. } => {
            if values.iter().any(|e| e.value == *v) {
                Ok(())
            } else {
                let allowed: Vec<String> = values.iter().map(|e| e.value.to_string()).collect();
                fail(
                    path,
                    format!(
                        "{} is not one of the enum's values ({})",
                        describe(v),
                        allowed.join(", ")
                    ),
                )
            }
        }
        Schema::Object { fields } => {
            let Some(m) = v.as_object() else {
                return fail(path, format!("expected an object, found {}", describe(v)));
            };
            for (k, fv) in m {
                let Some(f) = fields.iter().find(|f| f.name == *k) else {
                    return fail(
                        &format!("{path}.{k}"),
                        format!("'{k}' is not a field of the object schema"),
                    );
                };
                // A field sent as null is a field left unset.
                if !fv.is_null() {
                    check(&f.schema, fv, &format!("{path}.{k}"))?;
                }
            }
            Ok(())
        }
        Schema::Map { value, .. } => {
            let Some(m) = v.as_object() else {
                return fail(
                    path,
                    format!("expected an object (a map), found {}", describe(v)),
                );
            };
            for (k, mv) in m {
                check(value, mv, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        Schema::Array { element } => {
            let Some(a) = v.as_array() else {
                return fail(path, format!("expected an array, found {}", describe(v)));
            };
            for (i, ev) in a.iter().enumerate() {
                check(element, ev, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        Schema::Ref(id) => fail(path, format!("the schema {id} was not resolved")),
    }
}

fn primitive(p: Primitive, v: &Value, path: &str) -> Result<(), ValueError> {
    use Primitive::*;
    let int_in = |lo: i128, hi: i128| -> Result<(), ValueError> {
        let n = v
            .as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from));
        match n {
            Some(n) if (lo..=hi).contains(&n) => Ok(()),
            Some(n) => fail(path, format!("{n} is out of range ({lo} to {hi})")),
            None => fail(
                path,
                format!("expected a whole number, found {}", describe(v)),
            ),
        }
    };
    let string = || v.as_str();
    match p {
        Boolean if v.is_boolean() => Ok(()),
        Boolean => fail(
            path,
            format!("expected true or false, found {}", describe(v)),
        ),
        Double | Float if v.is_number() => Ok(()),
        Double | Float => fail(path, format!("expected a number, found {}", describe(v))),
        Integer => int_in(i32::MIN.into(), i32::MAX.into()),
        Long => int_in(i64::MIN.into(), i64::MAX.into()),
        Byte => int_in(i8::MIN.into(), i8::MAX.into()),
        Short => int_in(i16::MIN.into(), i16::MAX.into()),
        UnsignedByte => int_in(0, u8::MAX.into()),
        UnsignedShort => int_in(0, u16::MAX.into()),
        UnsignedInteger => int_in(0, u32::MAX.into()),
        UnsignedLong => int_in(0, u64::MAX.into()),
        Decimal => match v {
            Value::Number(_) => Ok(()),
            Value::String(s) if is_decimal(s) => Ok(()),
            _ => fail(
                path,
                format!("expected a decimal number, found {}", describe(v)),
            ),
        },
        String if v.is_string() => Ok(()),
        String => fail(path, format!("expected a string, found {}", describe(v))),
        Bytes => match string() {
            Some(s) if base64::engine::general_purpose::STANDARD.decode(s).is_ok() => Ok(()),
            _ => fail(
                path,
                format!("expected base64 bytes, found {}", describe(v)),
            ),
        },
        Uuid => match string() {
            Some(s) if is_uuid(s) => Ok(()),
            _ => fail(path, format!("expected a UUID, found {}", describe(v))),
        },
        DateTime => match string() {
            Some(s) if time::OffsetDateTime::parse(s, &Rfc3339).is_ok() => Ok(()),
            _ => fail(
                path,
                format!("expected an RFC 3339 date and time, found {}", describe(v)),
            ),
        },
        Date => match string() {
            Some(s) if is_date(s) => Ok(()),
            _ => fail(
                path,
                format!("expected a date (YYYY-MM-DD), found {}", describe(v)),
            ),
        },
        Time => match string() {
            Some(s) if is_time(s) => Ok(()),
            _ => fail(
                path,
                format!("expected a time (hh:mm:ss), found {}", describe(v)),
            ),
        },
        Duration => match string() {
            Some(s) if is_duration(s) => Ok(()),
            _ => fail(
                path,
                format!(
                    "expected an ISO 8601 duration (such as PT5M), found {}",
                    describe(v)
                ),
            ),
        },
        Point | LineString | Polygon | MultiPoint | MultiLineString | MultiPolygon => {
            let want = match p {
                Point => "Point",
                LineString => "LineString",
                Polygon => "Polygon",
                MultiPoint => "MultiPoint",
                MultiLineString => "MultiLineString",
                _ => "MultiPolygon",
            };
            let ok = v.get("type").and_then(Value::as_str) == Some(want)
                && v.get("coordinates").is_some_and(Value::is_array);
            if ok {
                Ok(())
            } else {
                fail(
                    path,
                    format!("expected a GeoJSON {want}, found {}", describe(v)),
                )
            }
        }
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

fn is_decimal(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    match s.split_once('.') {
        Some((a, b)) => digits(a) && digits(b),
        None => digits(s),
    }
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_date(s: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &format).is_ok()
}

fn is_time(s: &str) -> bool {
    let (main, frac) = match s.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (s, None),
    };
    let format = time::macros::format_description!("[hour]:[minute]:[second]");
    time::Time::parse(main, &format).is_ok() && frac.is_none_or(digits)
}

/// `P[nY][nM][nW][nD][T[nH][nM][n[.n]S]]` with at least one part.
fn is_duration(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('P') else {
        return false;
    };
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let parts = |text: &str, units: &[char], fraction_last: bool| -> Option<usize> {
        let mut count = 0;
        let mut number = String::new();
        let mut next_unit = 0;
        for c in text.chars() {
            if c.is_ascii_digit() || (fraction_last && c == '.') {
                number.push(c);
                continue;
            }
            let at = units.iter().skip(next_unit).position(|u| *u == c)? + next_unit;
            let ok = if c == 'S' && fraction_last {
                is_decimal(&number)
            } else {
                digits(&number)
            };
            if !ok {
                return None;
            }
            number.clear();
            next_unit = at + 1;
            count += 1;
        }
        number.is_empty().then_some(count)
    };
    let Some(d) = parts(date, &['Y', 'M', 'W', 'D'], false) else {
        return false;
    };
    match time {
        None => d > 0,
        Some(t) => parts(t, &['H', 'M', 'S'], true).is_some_and(|n| n > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EnumValue, Field};
    use serde_json::json;

    #[test]
    fn primitives() {
        use Primitive::*;
        let good: &[(Primitive, Value)] = &[
            (Boolean, json!(true)),
            (Double, json!(21.5)),
            (Double, json!(3)),
            (Float, json!(-1e3)),
            (Integer, json!(2147483647)),
            (Long, json!(-9223372036854775808i64)),
            (Byte, json!(-128)),
            (UnsignedLong, json!(18446744073709551615u64)),
            (String, json!("x")),
            (DateTime, json!("2026-12-01T10:00:00Z")),
            (DateTime, json!("2026-12-01T10:00:00.123+01:00")),
            (Date, json!("2026-02-28")),
            (Time, json!("23:59:59")),
            (Time, json!("08:00:00.5")),
            (Duration, json!("PT5M")),
            (Duration, json!("P1Y2M3DT4H5M6.5S")),
            (Duration, json!("P2W")),
            (Uuid, json!("123e4567-e89b-12d3-a456-426614174000")),
            (Bytes, json!("aGVsbG8=")),
            (Decimal, json!("-12.50")),
            (Point, json!({"type": "Point", "coordinates": [1.0, 2.0]})),
        ];
        for (p, v) in good {
            assert_eq!(check_value(&Schema::Primitive(*p), v), Ok(()), "{p:?} {v}");
        }
        let bad: &[(Primitive, Value, &str)] = &[
            (Boolean, json!("true"), "true or false"),
            (Double, json!("21.5"), "a number"),
            (Integer, json!(2147483648u64), "out of range"),
            (Integer, json!(1.5), "whole number"),
            (UnsignedShort, json!(-1), "out of range"),
            (String, json!(1), "a string"),
            (DateTime, json!("2026-12-01 10:00"), "RFC 3339"),
            (Date, json!("2026-02-30"), "YYYY-MM-DD"),
            (Time, json!("24:00:00"), "hh:mm:ss"),
            (Duration, json!("5 minutes"), "ISO 8601"),
            (Duration, json!("P"), "ISO 8601"),
            (Duration, json!("PT"), "ISO 8601"),
            (Duration, json!("PM5"), "ISO 8601"),
            (Duration, json!("P1D2Y"), "ISO 8601"),
            (Uuid, json!("123e4567"), "UUID"),
            (Bytes, json!("not base64!"), "base64"),
            (Point, json!([1, 2]), "GeoJSON Point"),
        ];
        for (p, v, why) in bad {
            let e = check_value(&Schema::Primitive(*p), v).expect_err(why);
            assert!(e.message.contains(why), "{p:?} {v}: {e}");
            assert_eq!(e.path, "$");
        }
    }

    #[test]
    fn complex_schemas_name_the_path_inside_the_value() {
        let report = Schema::Object {
            fields: vec![
                Field {
                    name: "maxTemp".into(),
                    schema: Schema::Primitive(Primitive::Double),
                },
                Field {
                    name: "mode".into(),
                    schema: Schema::Enum {
                        value_schema: Primitive::Integer,
                        values: vec![
                            EnumValue {
                                name: "off".into(),
                                value: json!(0),
                            },
                            EnumValue {
                                name: "heat".into(),
                                value: json!(1),
                            },
                        ],
                    },
                },
                Field {
                    name: "history".into(),
                    schema: Schema::Array {
                        element: Box::new(Schema::Map {
                            key_name: "k".into(),
                            value_name: "v".into(),
                            value: Box::new(Schema::Primitive(Primitive::Integer)),
                        }),
                    },
                },
            ],
        };
        assert_eq!(
            check_value(
                &report,
                &json!({"maxTemp": 30.5, "mode": 1, "history": [{"a": 1}, {"b": 2}]})
            ),
            Ok(())
        );
        assert_eq!(check_value(&report, &json!({"maxTemp": null})), Ok(()));
        for (v, path, why) in [
            (json!({"maxTemp": "hot"}), "$.maxTemp", "a number"),
            (
                json!({"mode": 2}),
                "$.mode",
                "not one of the enum's values (0, 1)",
            ),
            (json!({"extra": 1}), "$.extra", "not a field"),
            (
                json!({"history": [{"a": 1}, {"b": "x"}]}),
                "$.history[1].b",
                "whole number",
            ),
            (json!({"history": {}}), "$.history", "an array"),
            (json!([1]), "$", "an object"),
        ] {
            let e = check_value(&report, &v).expect_err(why);
            assert_eq!(e.path, path, "{v}: {e}");
            assert!(e.message.contains(why), "{v}: {e}");
        }
    }
}
