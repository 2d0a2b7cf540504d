//! What a condition requires of every document it matches, in terms a store can check
//! (a path compared to a constant, a prefix, a defined path), so a store can skip documents
//! before they are read. A [`Sieve`] may let through documents the condition rejects (the
//! evaluator runs after it), never the other way round.

use serde_json::Value;

use super::ast::*;

/// A necessary condition. Leaves compare a path with a primitive constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Sieve {
    /// Nothing known: every document passes.
    All,
    And(Vec<Sieve>),
    Or(Vec<Sieve>),
    /// `path op constant` with `op` one of `=`, `<`, `<=`, `>`, `>=`; the constant is a string,
    /// number or boolean (only with `=`).
    Compare(Path, BinaryOp, Value),
    /// The path is a string starting with the prefix.
    StartsWith(Path, String),
    /// The path is defined.
    Defined(Path),
}

/// The sieve of a `WHERE` clause.
pub fn sieve(cond: &Expr) -> Sieve {
    simplify(necessary(cond))
}

fn flip(op: BinaryOp) -> BinaryOp {
    match op {
        BinaryOp::Lt => BinaryOp::Gt,
        BinaryOp::Le => BinaryOp::Ge,
        BinaryOp::Gt => BinaryOp::Lt,
        BinaryOp::Ge => BinaryOp::Le,
        other => other,
    }
}

fn comparable(op: BinaryOp, v: &Value) -> bool {
    match v {
        Value::String(_) | Value::Number(_) => matches!(
            op,
            BinaryOp::Eq | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
        ),
        Value::Bool(_) => op == BinaryOp::Eq,
        // `!=` is true across types and null = null holds: neither says anything a store can
        // look up by.
        _ => false,
    }
}

fn necessary(e: &Expr) -> Sieve {
    match e {
        Expr::Binary(BinaryOp::And, a, b) => Sieve::And(vec![necessary(a), necessary(b)]),
        Expr::Binary(BinaryOp::Or, a, b) => Sieve::Or(vec![necessary(a), necessary(b)]),
        Expr::Binary(op, a, b) => match (a.as_ref(), b.as_ref()) {
            (Expr::Path(p), Expr::Literal(v)) if comparable(*op, v) => {
                Sieve::Compare(p.clone(), *op, v.clone())
            }
            (Expr::Literal(v), Expr::Path(p)) if comparable(flip(*op), v) => {
                Sieve::Compare(p.clone(), flip(*op), v.clone())
            }
            // Any other comparison of a path is at least "the path is defined".
            (Expr::Path(p), _) | (_, Expr::Path(p)) if is_comparison(*op) => {
                Sieve::Defined(p.clone())
            }
            _ => Sieve::All,
        },
        Expr::In {
            expr,
            list,
            negated: false,
        } => match expr.as_ref() {
            Expr::Path(p) => {
                if list.iter().all(|v| comparable(BinaryOp::Eq, v)) {
                    Sieve::Or(
                        list.iter()
                            .map(|v| Sieve::Compare(p.clone(), BinaryOp::Eq, v.clone()))
                            .collect(),
                    )
                } else {
                    Sieve::Defined(p.clone())
                }
            }
            _ => Sieve::All,
        },
        Expr::In { expr, .. } => match expr.as_ref() {
            Expr::Path(p) => Sieve::Defined(p.clone()),
            _ => Sieve::All,
        },
        Expr::Call(Function::StartsWith, args) => match args.as_slice() {
            [Expr::Path(p), Expr::Literal(Value::String(s))] => {
                Sieve::StartsWith(p.clone(), s.clone())
            }
            _ => Sieve::All,
        },
        Expr::Call(Function::IsDefined | Function::IsPrimitive, args)
        | Expr::Call(Function::IsBool | Function::IsNumber | Function::IsString, args)
        | Expr::Call(Function::IsNull | Function::IsObject | Function::EndsWith, args) => {
            match args.first() {
                Some(Expr::Path(p)) => Sieve::Defined(p.clone()),
                _ => Sieve::All,
            }
        }
        // NOT turns a necessary condition into nothing known.
        _ => Sieve::All,
    }
}

fn is_comparison(op: BinaryOp) -> bool {
    matches!(
        op,
        BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
    )
}

/// Flattens nested ANDs and ORs, drops `All` from ANDs and turns ORs holding it into `All`.
fn simplify(s: Sieve) -> Sieve {
    match s {
        Sieve::And(parts) => {
            let mut out = Vec::new();
            for p in parts.into_iter().map(simplify) {
                match p {
                    Sieve::All => {}
                    Sieve::And(inner) => out.extend(inner),
                    other => out.push(other),
                }
            }
            match out.len() {
                0 => Sieve::All,
                1 => out.pop().unwrap_or(Sieve::All),
                _ => Sieve::And(out),
            }
        }
        Sieve::Or(parts) => {
            let mut out = Vec::new();
            for p in parts.into_iter().map(simplify) {
                match p {
                    Sieve::All => return Sieve::All,
                    Sieve::Or(inner) => out.extend(inner),
                    other => out.push(other),
                }
            }
            match out.len() {
                // `x IN []`: nothing matches, but "everything" is still a superset.
                0 => Sieve::All,
                1 => out.pop().unwrap_or(Sieve::All),
                _ => Sieve::Or(out),
            }
        }
        other => other,
    }
}
