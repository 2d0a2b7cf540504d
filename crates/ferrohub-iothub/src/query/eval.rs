//! Evaluating a query over one JSON document (conditions, projections) and over many
//! (aggregates and groups).
//!
//! Undefined is a value of its own (`None`): a path that is not there, a comparison of
//! non-primitives or of different types by order, arithmetic on non-numbers. Conditions are
//! three-valued (true, false, undefined) as in Cosmos DB's SQL, from which IoT Hub's comes:
//! `NOT undefined` is undefined, and a document matches only when its condition is true.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Number, Value};

use super::ast::*;

type V<'a> = Option<Cow<'a, Value>>;

/// Whether `doc` satisfies `cond` (a `WHERE` clause).
pub fn matches(cond: &Expr, doc: &Value) -> bool {
    matches!(eval(cond, doc).as_deref(), Some(Value::Bool(true)))
}

/// The value of `e` over `doc`; `None` is undefined.
pub fn eval<'a>(e: &Expr, doc: &'a Value) -> V<'a> {
    eval_in(e, doc, None)
}

/// What one document gives a non-aggregate query: the document itself for `SELECT *`, else an
/// object of the projections, undefined ones left out.
pub fn project(select: &Select, doc: &Value) -> Value {
    match select {
        Select::All => doc.clone(),
        Select::Items(items) => {
            let mut out = Map::new();
            for i in items {
                if let Some(v) = eval(&i.expr, doc) {
                    out.insert(i.name.clone(), v.into_owned());
                }
            }
            Value::Object(out)
        }
    }
}

fn eval_in<'a>(e: &Expr, doc: &'a Value, aggs: Option<&'a AggResults>) -> V<'a> {
    match e {
        Expr::Literal(v) => Some(Cow::Owned(v.clone())),
        Expr::Path(p) => p.lookup(doc).map(Cow::Borrowed),
        Expr::Aggregate(..) => aggs
            .and_then(|a| a.get(&(e as *const Expr)))
            .and_then(|v| v.as_ref())
            .map(Cow::Borrowed),
        Expr::Unary(UnaryOp::Not, x) => {
            let b = as_bool(eval_in(x, doc, aggs))?;
            Some(Cow::Owned(Value::Bool(!b)))
        }
        Expr::Unary(UnaryOp::Neg, x) => {
            let v = eval_in(x, doc, aggs)?;
            let n = v.as_number()?;
            arith(BinaryOp::Sub, &Number::from(0), n).map(Cow::Owned)
        }
        Expr::Binary(op @ (BinaryOp::And | BinaryOp::Or), a, b) => {
            let a = as_bool(eval_in(a, doc, aggs));
            let b = as_bool(eval_in(b, doc, aggs));
            let r = match op {
                BinaryOp::And => match (a, b) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                _ => match (a, b) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
            };
            r.map(|b| Cow::Owned(Value::Bool(b)))
        }
        Expr::Binary(op, a, b) => {
            let a = eval_in(a, doc, aggs);
            let b = eval_in(b, doc, aggs);
            match op {
                BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Mod => {
                    let (a, b) = (a?, b?);
                    arith(*op, a.as_number()?, b.as_number()?).map(Cow::Owned)
                }
                _ => compare(*op, a.as_deref(), b.as_deref()).map(|r| Cow::Owned(Value::Bool(r))),
            }
        }
        Expr::In {
            expr,
            list,
            negated,
        } => {
            let v = eval_in(expr, doc, aggs)?;
            if !is_primitive(&v) {
                return None;
            }
            let found = list
                .iter()
                .any(|l| compare(BinaryOp::Eq, Some(&v), Some(l)) == Some(true));
            Some(Cow::Owned(Value::Bool(found != *negated)))
        }
        Expr::Call(f, args) => call(*f, args, doc, aggs).map(Cow::Owned),
    }
}

fn as_bool(v: V<'_>) -> Option<bool> {
    v.and_then(|v| v.as_bool())
}

fn is_primitive(v: &Value) -> bool {
    !matches!(v, Value::Object(_) | Value::Array(_))
}

fn call(f: Function, args: &[Expr], doc: &Value, aggs: Option<&AggResults>) -> Option<Value> {
    let first = args.first().and_then(|a| eval_in(a, doc, aggs));
    let test = |p: fn(&Value) -> bool| Some(Value::Bool(first.as_deref().is_some_and(p)));
    match f {
        Function::IsDefined => Some(Value::Bool(first.is_some())),
        Function::IsBool => test(Value::is_boolean),
        Function::IsNumber => test(Value::is_number),
        Function::IsString => test(Value::is_string),
        Function::IsNull => test(Value::is_null),
        Function::IsObject => test(Value::is_object),
        Function::IsPrimitive => test(is_primitive),
        Function::IsArray => test(Value::is_array),
        Function::StartsWith | Function::EndsWith | Function::Contains | Function::IndexOf => {
            let second = args.get(1).and_then(|a| eval_in(a, doc, aggs));
            let (s, p) = (first?.as_str()?.to_owned(), second?.as_str()?.to_owned());
            Some(match f {
                Function::StartsWith => Value::Bool(s.starts_with(&p)),
                Function::EndsWith => Value::Bool(s.ends_with(&p)),
                Function::Contains => Value::Bool(s.contains(&p)),
                // In characters, as LENGTH and SUBSTRING count.
                _ => Value::from(s.find(&p).map_or(-1, |at| s[..at].chars().count() as i64)),
            })
        }
        Function::AsNumber => match first?.as_ref() {
            Value::Number(n) => Some(Value::Number(n.clone())),
            Value::String(s) => match serde_json::from_str::<Value>(s.trim()) {
                Ok(Value::Number(n)) => Some(Value::Number(n)),
                _ => None,
            },
            _ => None,
        },
        Function::Abs | Function::Sign | Function::Square => {
            let v = first?;
            let n = v.as_number()?;
            if let Some(i) = n.as_i64() {
                return match f {
                    Function::Abs => i.checked_abs().map(Value::from),
                    Function::Sign => Some(Value::from(i.signum())),
                    _ => i.checked_mul(i).map(Value::from),
                }
                .or_else(|| float(n.as_f64()?, f));
            }
            float(n.as_f64()?, f)
        }
        Function::Exp | Function::Ceiling | Function::Floor | Function::Sqrt => {
            let v = first?;
            let n = v.as_number()?;
            if (n.is_i64() || n.is_u64()) && matches!(f, Function::Ceiling | Function::Floor) {
                return Some(Value::Number(n.clone()));
            }
            float(n.as_f64()?, f)
        }
        Function::Power => {
            let second = args.get(1).and_then(|a| eval_in(a, doc, aggs));
            let (x, y) = (first?.as_f64()?, second?.as_f64()?);
            Number::from_f64(x.powf(y)).map(Value::Number)
        }
        Function::Concat => {
            let mut out = first?.as_str()?.to_owned();
            for a in &args[1..] {
                out.push_str(eval_in(a, doc, aggs)?.as_str()?);
            }
            Some(Value::String(out))
        }
        Function::Length => Some(Value::from(first?.as_str()?.chars().count() as u64)),
        Function::Lower => Some(Value::String(first?.as_str()?.to_lowercase())),
        Function::Upper => Some(Value::String(first?.as_str()?.to_uppercase())),
        Function::Substring => {
            let s = first?.as_str()?.to_owned();
            let int = |i: usize| {
                let v = args.get(i).and_then(|a| eval_in(a, doc, aggs))?;
                v.as_f64().map(|f| f.max(0.0) as usize)
            };
            let start = int(1)?;
            let len = if args.len() > 2 { int(2)? } else { usize::MAX };
            Some(Value::String(s.chars().skip(start).take(len).collect()))
        }
    }
}

/// The one-number functions over a double; undefined when the result is not a finite number.
fn float(x: f64, f: Function) -> Option<Value> {
    let r = match f {
        Function::Abs => x.abs(),
        Function::Sign => {
            if x == 0.0 {
                0.0
            } else {
                x.signum()
            }
        }
        Function::Square => x * x,
        Function::Exp => x.exp(),
        Function::Ceiling => x.ceil(),
        Function::Floor => x.floor(),
        Function::Sqrt => x.sqrt(),
        _ => return None,
    };
    Number::from_f64(r).map(Value::Number)
}

/// Orders two numbers exactly when both are integers, else as doubles.
pub fn number_order(a: &Number, b: &Number) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return Some(x.cmp(&y));
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

/// A comparison. Only primitives compare; `=` and `!=` across types are false and true, an
/// order across types (or of booleans or nulls) is undefined.
pub fn compare(op: BinaryOp, a: Option<&Value>, b: Option<&Value>) -> Option<bool> {
    let (a, b) = (a?, b?);
    if !is_primitive(a) || !is_primitive(b) {
        return None;
    }
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_order(x, y),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => {
            return match op {
                BinaryOp::Eq => Some(x == y),
                BinaryOp::Ne => Some(x != y),
                _ => None,
            }
        }
        (Value::Null, Value::Null) => {
            return match op {
                BinaryOp::Eq => Some(true),
                BinaryOp::Ne => Some(false),
                _ => None,
            }
        }
        _ => {
            return match op {
                BinaryOp::Eq => Some(false),
                BinaryOp::Ne => Some(true),
                _ => None,
            }
        }
    }?;
    Some(match op {
        BinaryOp::Eq => ord == Ordering::Equal,
        BinaryOp::Ne => ord != Ordering::Equal,
        BinaryOp::Lt => ord == Ordering::Less,
        BinaryOp::Le => ord != Ordering::Greater,
        BinaryOp::Gt => ord == Ordering::Greater,
        BinaryOp::Ge => ord != Ordering::Less,
        _ => return None,
    })
}

/// Integer arithmetic while it stays exact, doubles otherwise; division is always a double.
/// Dividing by zero or overflowing a double is undefined.
fn arith(op: BinaryOp, a: &Number, b: &Number) -> Option<Value> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        let exact = match op {
            BinaryOp::Add => x.checked_add(y),
            BinaryOp::Sub => x.checked_sub(y),
            BinaryOp::Mul => x.checked_mul(y),
            BinaryOp::Mod => x.checked_rem(y),
            _ => None,
        };
        if let Some(r) = exact {
            return Some(Value::from(r));
        }
        if op == BinaryOp::Mod {
            return None;
        }
    }
    let (x, y) = (a.as_f64()?, b.as_f64()?);
    let r = match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div if y != 0.0 => x / y,
        BinaryOp::Mod if y != 0.0 => x % y,
        _ => return None,
    };
    Number::from_f64(r).map(Value::Number)
}

/// Aggregate results of one group, by the address of their node in the query (which lives as
/// long as the evaluation).
type AggResults = HashMap<*const Expr, Option<Value>>;

#[derive(Debug, Clone)]
enum Acc {
    Count(u64),
    Sum {
        int: Option<i64>,
        float: f64,
        any: bool,
    },
    Avg {
        sum: f64,
        n: u64,
    },
    Extreme {
        max: bool,
        best: Option<Value>,
    },
}

impl Acc {
    fn new(a: Aggregate) -> Self {
        match a {
            Aggregate::Count => Acc::Count(0),
            Aggregate::Sum => Acc::Sum {
                int: Some(0),
                float: 0.0,
                any: false,
            },
            Aggregate::Avg => Acc::Avg { sum: 0.0, n: 0 },
            Aggregate::Min => Acc::Extreme {
                max: false,
                best: None,
            },
            Aggregate::Max => Acc::Extreme {
                max: true,
                best: None,
            },
        }
    }

    fn add(&mut self, v: Option<&Value>) {
        match self {
            Acc::Count(n) => *n += 1,
            Acc::Sum { int, float, any } => {
                if let Some(Value::Number(x)) = v {
                    *any = true;
                    *int = match (*int, x.as_i64()) {
                        (Some(s), Some(i)) => s.checked_add(i),
                        _ => None,
                    };
                    *float += x.as_f64().unwrap_or(0.0);
                }
            }
            Acc::Avg { sum, n } => {
                if let Some(Value::Number(x)) = v {
                    *sum += x.as_f64().unwrap_or(0.0);
                    *n += 1;
                }
            }
            Acc::Extreme { max, best } => {
                // Numbers rank before strings, so a mix gives the extreme number; other
                // types are skipped.
                let Some(v) = v.filter(|v| v.is_number() || v.is_string()) else {
                    return;
                };
                let better = match best.as_ref() {
                    None => true,
                    Some(b) => match (v, b) {
                        (Value::Number(x), Value::Number(y)) => {
                            let o = number_order(x, y);
                            if *max {
                                o == Some(Ordering::Greater)
                            } else {
                                o == Some(Ordering::Less)
                            }
                        }
                        (Value::String(x), Value::String(y)) => {
                            if *max {
                                x > y
                            } else {
                                x < y
                            }
                        }
                        (Value::Number(_), _) => true,
                        _ => false,
                    },
                };
                if better {
                    *best = Some(v.clone());
                }
            }
        }
    }

    fn finish(&self) -> Option<Value> {
        match self {
            Acc::Count(n) => Some(Value::from(*n)),
            Acc::Sum { int, float, any } => match (int, any) {
                (_, false) => Some(Value::from(0)),
                (Some(i), true) => Some(Value::from(*i)),
                (None, true) => Number::from_f64(*float).map(Value::Number),
            },
            Acc::Avg { sum, n } => {
                if *n == 0 {
                    None
                } else {
                    Number::from_f64(sum / *n as f64).map(Value::Number)
                }
            }
            Acc::Extreme { best, .. } => best.clone(),
        }
    }
}

struct Group {
    /// The grouped paths' values, as a document the non-aggregate projections read.
    keys: Value,
    accs: Vec<Acc>,
}

/// Folds matching documents into the groups of an aggregate query and renders their rows.
pub struct Aggregator<'q> {
    query: &'q Query,
    /// Every aggregate node of the projections, in a fixed order.
    nodes: Vec<(&'q Expr, Aggregate, Option<&'q Expr>)>,
    /// By the JSON of the group's key values, so rows come out in a stable order.
    groups: BTreeMap<String, Group>,
}

impl<'q> Aggregator<'q> {
    pub fn new(query: &'q Query) -> Self {
        let mut nodes = Vec::new();
        if let Select::Items(items) = &query.select {
            for i in items {
                collect_aggregates(&i.expr, &mut nodes);
            }
        }
        Aggregator {
            query,
            nodes,
            groups: BTreeMap::new(),
        }
    }

    /// Adds a document that matched the condition.
    pub fn add(&mut self, doc: &Value) {
        let values: Vec<Option<&Value>> =
            self.query.group_by.iter().map(|p| p.lookup(doc)).collect();
        let group = Self::group(&mut self.groups, self.query, &self.nodes, &values);
        for (acc, (_, _, arg)) in group.accs.iter_mut().zip(&self.nodes) {
            match arg {
                None => acc.add(None),
                Some(e) => acc.add(eval(e, doc).as_deref()),
            }
        }
    }

    /// Whether [`Aggregator::add_counted`] gives this query's results: its aggregates all
    /// count, and its other projections are grouped paths.
    pub fn counts_only(&self) -> bool {
        let Select::Items(items) = &self.query.select else {
            return false;
        };
        items.iter().all(|i| match &i.expr {
            Expr::Aggregate(Aggregate::Count, _) => true,
            Expr::Path(p) => self.query.group_by.contains(p),
            _ => false,
        })
    }

    /// Adds `n` documents whose grouped paths hold `values` (in `GROUP BY` order, `None` for
    /// undefined), as a store that counted them gives them. Only for a query where
    /// [`Aggregator::counts_only`] holds: other aggregates would need the documents.
    pub fn add_counted(&mut self, values: &[Option<Value>], n: u64) {
        if n == 0 {
            return;
        }
        let values: Vec<Option<&Value>> = values.iter().map(Option::as_ref).collect();
        let group = Self::group(&mut self.groups, self.query, &self.nodes, &values);
        for acc in &mut group.accs {
            if let Acc::Count(c) = acc {
                *c = c.saturating_add(n);
            }
        }
    }

    /// The group of these grouped values, created empty when new.
    fn group<'g>(
        groups: &'g mut BTreeMap<String, Group>,
        query: &Query,
        nodes: &[(&'q Expr, Aggregate, Option<&'q Expr>)],
        values: &[Option<&Value>],
    ) -> &'g mut Group {
        let key = serde_json::to_string(&values).unwrap_or_default();
        groups.entry(key).or_insert_with(|| {
            let mut keys = Value::Object(Map::new());
            for (p, v) in query.group_by.iter().zip(values) {
                if let Some(v) = v {
                    set_path(&mut keys, &p.segments, (*v).clone());
                }
            }
            Group {
                keys,
                accs: nodes.iter().map(|(_, a, _)| Acc::new(*a)).collect(),
            }
        })
    }

    /// The result rows: one per group, or exactly one without `GROUP BY` (over no documents
    /// too, so `COUNT()` of nothing is 0).
    pub fn finish(mut self) -> Vec<Value> {
        if self.query.group_by.is_empty() && self.groups.is_empty() {
            self.groups.insert(
                String::new(),
                Group {
                    keys: Value::Object(Map::new()),
                    accs: self.nodes.iter().map(|(_, a, _)| Acc::new(*a)).collect(),
                },
            );
        }
        let Select::Items(items) = &self.query.select else {
            return Vec::new();
        };
        self.groups
            .values()
            .map(|g| {
                let results: AggResults = self
                    .nodes
                    .iter()
                    .zip(&g.accs)
                    .map(|((node, _, _), acc)| (*node as *const Expr, acc.finish()))
                    .collect();
                let mut row = Map::new();
                for i in items {
                    if let Some(v) = eval_in(&i.expr, &g.keys, Some(&results)) {
                        row.insert(i.name.clone(), v.into_owned());
                    }
                }
                Value::Object(row)
            })
            .collect()
    }
}

fn collect_aggregates<'q>(e: &'q Expr, out: &mut Vec<(&'q Expr, Aggregate, Option<&'q Expr>)>) {
    match e {
        Expr::Aggregate(a, arg) => out.push((e, *a, arg.as_deref())),
        Expr::Literal(_) | Expr::Path(_) => {}
        Expr::Unary(_, x) => collect_aggregates(x, out),
        Expr::Binary(_, a, b) => {
            collect_aggregates(a, out);
            collect_aggregates(b, out);
        }
        Expr::In { expr, .. } => collect_aggregates(expr, out),
        Expr::Call(_, args) => args.iter().for_each(|a| collect_aggregates(a, out)),
    }
}

fn set_path(doc: &mut Value, segments: &[String], v: Value) {
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut at = doc;
    for s in parents {
        let Value::Object(m) = at else { return };
        at = m
            .entry(s.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if let Value::Object(m) = at {
        m.insert(last.clone(), v);
    }
}
