//! The parsed form of an IoT Hub query: what the parser produces and the evaluator and the
//! planners read.

use serde_json::Value;

/// The collection after `FROM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// `devices`: device twins.
    Devices,
    /// `devices.modules`: module twins.
    Modules,
    /// `devices.jobs`: per-device job rows.
    Jobs,
}

impl Collection {
    /// The name as written in `FROM`, also the prefix paths may carry (`devices.deviceId`).
    pub fn name(self) -> &'static str {
        match self {
            Collection::Devices => "devices",
            Collection::Modules => "devices.modules",
            Collection::Jobs => "devices.jobs",
        }
    }
}

/// A whole `SELECT` statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// `TOP n`: at most this many results over all pages.
    pub top: Option<u64>,
    pub select: Select,
    pub from: Collection,
    pub condition: Option<Expr>,
    /// `GROUP BY` paths, empty without the clause.
    pub group_by: Vec<Path>,
}

impl Query {
    /// Whether the results are computed over all matching documents (aggregates, `GROUP
    /// BY`) rather than one result per document.
    pub fn is_aggregate(&self) -> bool {
        !self.group_by.is_empty()
            || match &self.select {
                Select::All => false,
                Select::Items(items) => items.iter().any(|i| i.expr.has_aggregate()),
            }
    }

    /// Every path the query reads, anywhere in it.
    pub fn paths(&self) -> Vec<&Path> {
        let mut out = Vec::new();
        if let Select::Items(items) = &self.select {
            for i in items {
                i.expr.collect_paths(&mut out);
            }
        }
        if let Some(c) = &self.condition {
            c.collect_paths(&mut out);
        }
        out.extend(self.group_by.iter());
        out
    }
}

/// What `SELECT` returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    /// `SELECT *`: the whole document.
    All,
    Items(Vec<SelectItem>),
}

/// One projection: an expression and the key it gets in the result.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectItem {
    pub expr: Expr,
    /// The result key: the alias, else the path's last segment, else `$1`, `$2`, ... by place.
    pub name: String,
}

/// A path into the document, with the collection prefix removed and IoT Hub's own members in
/// IoT Hub's casing (`DeviceId` reads `deviceId`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Path {
    pub segments: Vec<String>,
}

impl Path {
    /// The value at this path in `doc`, `None` when undefined.
    /// A segment indexes an array when it is a whole number (routing's `$body.list[0]`;
    /// twins hold no arrays, so twin queries never reach one).
    pub fn lookup<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        let mut v = doc;
        for s in &self.segments {
            v = match v {
                Value::Object(m) => m.get(s)?,
                Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(v)
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    And,
    Or,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Not,
    Neg,
}

/// The built-in functions: the twin query language's, and the routing language's (which has
/// more, and spells the prefix tests `STARTS_WITH`/`ENDS_WITH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    IsDefined,
    IsBool,
    IsNumber,
    IsString,
    IsNull,
    IsObject,
    IsPrimitive,
    StartsWith,
    EndsWith,
    // Routing only from here.
    IsArray,
    AsNumber,
    Abs,
    Exp,
    Power,
    Square,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    IndexOf,
    Contains,
}

impl Function {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_uppercase().as_str() {
            "IS_DEFINED" => Function::IsDefined,
            "IS_BOOL" => Function::IsBool,
            "IS_NUMBER" => Function::IsNumber,
            "IS_STRING" => Function::IsString,
            "IS_NULL" => Function::IsNull,
            "IS_OBJECT" => Function::IsObject,
            "IS_PRIMITIVE" => Function::IsPrimitive,
            "STARTSWITH" => Function::StartsWith,
            "ENDSWITH" => Function::EndsWith,
            _ => return None,
        })
    }

    /// The functions of IoT Hub's message routing query language.
    pub(crate) fn from_routing_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_uppercase().as_str() {
            "IS_DEFINED" => Function::IsDefined,
            "IS_BOOL" => Function::IsBool,
            "IS_NUMBER" => Function::IsNumber,
            "IS_STRING" => Function::IsString,
            "IS_NULL" => Function::IsNull,
            "IS_OBJECT" => Function::IsObject,
            "IS_PRIMITIVE" => Function::IsPrimitive,
            "IS_ARRAY" => Function::IsArray,
            "AS_NUMBER" => Function::AsNumber,
            "STARTS_WITH" => Function::StartsWith,
            "ENDS_WITH" => Function::EndsWith,
            "ABS" => Function::Abs,
            "EXP" => Function::Exp,
            "POWER" => Function::Power,
            "SQUARE" => Function::Square,
            "CEILING" => Function::Ceiling,
            "FLOOR" => Function::Floor,
            "SIGN" => Function::Sign,
            "SQRT" => Function::Sqrt,
            "CONCAT" => Function::Concat,
            "LENGTH" => Function::Length,
            "LOWER" => Function::Lower,
            "UPPER" => Function::Upper,
            "SUBSTRING" => Function::Substring,
            "INDEX_OF" => Function::IndexOf,
            "CONTAINS" => Function::Contains,
            _ => return None,
        })
    }

    /// How many arguments it takes, at least and at most.
    pub(crate) fn arity(self) -> (usize, usize) {
        match self {
            Function::StartsWith
            | Function::EndsWith
            | Function::Power
            | Function::IndexOf
            | Function::Contains => (2, 2),
            Function::Substring => (2, 3),
            Function::Concat => (2, usize::MAX),
            _ => (1, 1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Avg,
    Sum,
    Min,
    Max,
}

impl Aggregate {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_uppercase().as_str() {
            "COUNT" => Aggregate::Count,
            "AVG" => Aggregate::Avg,
            "SUM" => Aggregate::Sum,
            "MIN" => Aggregate::Min,
            "MAX" => Aggregate::Max,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A string, number, boolean or null.
    Literal(Value),
    Path(Path),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `expr IN [...]`, or `NIN` when `negated`.
    In {
        expr: Box<Expr>,
        list: Vec<Value>,
        negated: bool,
    },
    Call(Function, Vec<Expr>),
    /// `COUNT()` has no argument; the others have one.
    Aggregate(Aggregate, Option<Box<Expr>>),
}

impl Expr {
    pub fn has_aggregate(&self) -> bool {
        match self {
            Expr::Aggregate(..) => true,
            Expr::Literal(_) | Expr::Path(_) => false,
            Expr::Unary(_, e) => e.has_aggregate(),
            Expr::Binary(_, a, b) => a.has_aggregate() || b.has_aggregate(),
            Expr::In { expr, .. } => expr.has_aggregate(),
            Expr::Call(_, args) => args.iter().any(Expr::has_aggregate),
        }
    }

    fn collect_paths<'a>(&'a self, out: &mut Vec<&'a Path>) {
        match self {
            Expr::Literal(_) => {}
            Expr::Path(p) => out.push(p),
            Expr::Unary(_, e) => e.collect_paths(out),
            Expr::Binary(_, a, b) => {
                a.collect_paths(out);
                b.collect_paths(out);
            }
            Expr::In { expr, .. } => expr.collect_paths(out),
            Expr::Call(_, args) => args.iter().for_each(|a| a.collect_paths(out)),
            Expr::Aggregate(_, arg) => {
                if let Some(a) = arg {
                    a.collect_paths(out);
                }
            }
        }
    }
}
