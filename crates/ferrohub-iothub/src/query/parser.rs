//! Tokens -> [`Query`]: the grammar, keyword rules, path normalization (collection prefix,
//! IoT Hub casing) and the checks a query must pass before it runs.

use serde_json::{Number, Value};

use super::ast::*;
use super::lexer::{tokenize, tokenize_with, Tok, Token};
use super::{QueryError, MAX_QUERY_CHARS};

/// Names that cannot start a path unless escaped (`[[group]]`).
const KEYWORDS: &[&str] = &[
    "SELECT", "TOP", "FROM", "WHERE", "GROUP", "BY", "AS", "AND", "OR", "NOT", "IN", "NIN", "TRUE",
    "FALSE", "NULL",
];

/// The twin members IoT Hub defines, in its casing: a path naming one in another casing is
/// read as this one, and so is its result key.
const MEMBERS: &[&str] = &[
    "deviceId",
    "moduleId",
    "etag",
    "deviceEtag",
    "status",
    "statusReason",
    "statusUpdateTime",
    "statusUpdatedTime",
    "connectionState",
    "lastActivityTime",
    "cloudToDeviceMessageCount",
    "authenticationType",
    "x509Thumbprint",
    "modelId",
    "version",
    "tags",
    "properties",
    "capabilities",
    "parent",
    "deviceScope",
    "jobId",
    "jobType",
    "createdTimeUtc",
    "startTimeUtc",
    "endTimeUtc",
    "lastUpdatedDateTimeUtc",
    "outcome",
];

pub(crate) fn parse(text: &str) -> Result<Query, QueryError> {
    let len = text.chars().count();
    if len > MAX_QUERY_CHARS {
        return Err(QueryError::at(
            text,
            MAX_QUERY_CHARS,
            format!("the query is {len} characters long; at most {MAX_QUERY_CHARS} are allowed"),
        ));
    }
    let tokens = tokenize(text)?;
    let mut p = Parser {
        text,
        tokens,
        at: 0,
        unnamed: 0,
        depth: 0,
        routing: false,
    };
    let q = p.query()?;
    Ok(q)
}

/// A routing condition: one expression in the routing dialect (its functions, `[n]` array
/// indexes in paths, hyphens in `$` names), paths as written. At most `max_chars` characters.
pub(crate) fn parse_routing(text: &str, max_chars: usize) -> Result<Expr, QueryError> {
    let len = text.chars().count();
    if len > max_chars {
        return Err(QueryError::at(
            text,
            max_chars,
            format!("the condition is {len} characters long; at most {max_chars} are allowed"),
        ));
    }
    let tokens = tokenize_with(text, true)?;
    let mut p = Parser {
        text,
        tokens,
        at: 0,
        unnamed: 0,
        depth: 0,
        routing: true,
    };
    let e = p.expr()?;
    if p.peek().tok != Tok::End {
        return Err(p.expected("an operator or the end of the condition"));
    }
    Ok(e)
}

struct Parser<'t> {
    text: &'t str,
    tokens: Vec<Token>,
    at: usize,
    /// Result keys handed out as `$1`, `$2`, ... to projections without a name.
    unnamed: usize,
    /// Nesting of the expression being parsed (parentheses, arguments, NOT, minus).
    depth: usize,
    /// The routing dialect: its functions, no aggregates, array indexes in paths.
    routing: bool,
}

/// How deeply expressions may nest: the parser and the evaluator recurse once per level, and a
/// query of 8,192 characters could otherwise nest thousands deep and overflow the stack.
pub(crate) const MAX_DEPTH: usize = 64;

fn is_keyword(s: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(s))
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        // `tokenize` always ends with `End`, and `bump` never moves past it.
        &self.tokens[self.at.min(self.tokens.len() - 1)]
    }

    fn peek_at(&self, n: usize) -> &Tok {
        &self.tokens[(self.at + n).min(self.tokens.len() - 1)].tok
    }

    fn bump(&mut self) -> Token {
        let t = self.peek().clone();
        if t.tok != Tok::End {
            self.at += 1;
        }
        t
    }

    fn error(&self, pos: usize, msg: impl Into<String>) -> QueryError {
        QueryError::at(self.text, pos, msg)
    }

    /// An error at the next token: "expected X, found Y".
    fn expected(&self, what: &str) -> QueryError {
        let t = self.peek();
        self.error(
            t.pos,
            format!("expected {what}, found {}", t.tok.describe()),
        )
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), QueryError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(self.expected(kw))
        }
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if &self.peek().tok == tok {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &Tok) -> Result<(), QueryError> {
        if self.eat(tok) {
            Ok(())
        } else {
            Err(self.expected(&tok.describe()))
        }
    }

    fn query(&mut self) -> Result<Query, QueryError> {
        self.expect_kw("SELECT")?;
        let top = if self.eat_kw("TOP") {
            let t = self.bump();
            match &t.tok {
                Tok::Num(n) => Some(n.parse::<u64>().map_err(|_| {
                    self.error(t.pos, format!("TOP takes a whole number, not {n}"))
                })?),
                other => {
                    return Err(self.error(
                        t.pos,
                        format!("expected a number after TOP, found {}", other.describe()),
                    ))
                }
            }
        } else {
            None
        };
        let select_pos = self.peek().pos;
        let select = if self.eat(&Tok::Star) {
            Select::All
        } else {
            let mut items = vec![self.select_item()?];
            while self.eat(&Tok::Comma) {
                items.push(self.select_item()?);
            }
            Select::Items(items)
        };
        self.expect_kw("FROM")?;
        let from = self.collection()?;
        let condition = if self.eat_kw("WHERE") {
            let pos = self.peek().pos;
            let c = self.expr()?;
            if c.has_aggregate() {
                return Err(self.error(pos, "aggregates are not allowed in WHERE"));
            }
            Some(c)
        } else {
            None
        };
        let mut group_by = Vec::new();
        let group_pos = self.peek().pos;
        if self.eat_kw("GROUP") {
            self.expect_kw("BY")?;
            loop {
                let pos = self.peek().pos;
                match self.primary()? {
                    Expr::Path(p) => group_by.push(p),
                    _ => return Err(self.error(pos, "GROUP BY takes property paths")),
                }
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        if self.peek().tok != Tok::End {
            return Err(self.expected("WHERE, GROUP BY or the end of the query"));
        }
        let mut q = Query {
            top,
            select,
            from,
            condition,
            group_by,
        };
        normalize_query(&mut q);
        self.check(&q, select_pos, group_pos)?;
        Ok(q)
    }

    /// The rules the grammar does not carry: what may be grouped and projected with
    /// aggregates.
    fn check(&self, q: &Query, select_pos: usize, group_pos: usize) -> Result<(), QueryError> {
        if !q.group_by.is_empty() && q.from != Collection::Devices {
            return Err(self.error(group_pos, "GROUP BY is only supported on devices"));
        }
        if !q.is_aggregate() {
            return Ok(());
        }
        let Select::Items(items) = &q.select else {
            return Err(self.error(
                select_pos,
                "SELECT * cannot be used with GROUP BY; name the grouped properties and aggregates",
            ));
        };
        for item in items {
            let mut bare = Vec::new();
            paths_outside_aggregates(&item.expr, &mut bare);
            if let Some(p) = bare.iter().find(|p| !q.group_by.contains(p)) {
                return Err(self.error(
                    select_pos,
                    format!("'{p}' is selected beside aggregates but is not in GROUP BY"),
                ));
            }
        }
        Ok(())
    }

    fn collection(&mut self) -> Result<Collection, QueryError> {
        if !self.eat_kw("devices") {
            return Err(self.expected("devices, devices.modules or devices.jobs"));
        }
        if self.eat(&Tok::Dot) {
            if self.eat_kw("modules") {
                return Ok(Collection::Modules);
            }
            if self.eat_kw("jobs") {
                return Ok(Collection::Jobs);
            }
            return Err(self.expected("modules or jobs after 'devices.'"));
        }
        Ok(Collection::Devices)
    }

    fn select_item(&mut self) -> Result<SelectItem, QueryError> {
        let expr = self.expr()?;
        let name = if self.eat_kw("AS") {
            let t = self.bump();
            match t.tok {
                Tok::Ident(s) if !is_keyword(&s) => s,
                Tok::Escaped(s) | Tok::Str(s) => s,
                other => {
                    return Err(self.error(
                        t.pos,
                        format!("expected a name after AS, found {}", other.describe()),
                    ))
                }
            }
        } else {
            match &expr {
                // Named later, once the path is normalized (`DeviceId` gives `deviceId`).
                Expr::Path(_) => String::new(),
                _ => {
                    self.unnamed += 1;
                    format!("${}", self.unnamed)
                }
            }
        };
        Ok(SelectItem { expr, name })
    }

    /// Runs `f` one nesting level deeper, refusing past [`MAX_DEPTH`].
    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, QueryError>,
    ) -> Result<T, QueryError> {
        if self.depth >= MAX_DEPTH {
            let pos = self.peek().pos;
            return Err(self.error(
                pos,
                format!("the expression nests more than {MAX_DEPTH} levels deep"),
            ));
        }
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn expr(&mut self) -> Result<Expr, QueryError> {
        self.nested(Self::or)
    }

    fn or(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.and()?;
        while self.eat_kw("OR") {
            let right = self.and()?;
            left = Expr::Binary(BinaryOp::Or, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.not()?;
        while self.eat_kw("AND") {
            let right = self.not()?;
            left = Expr::Binary(BinaryOp::And, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if self.eat_kw("NOT") {
            let inner = self.nested(Self::not)?;
            return Ok(Expr::Unary(UnaryOp::Not, Box::new(inner)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        let left = self.additive()?;
        let op = match &self.peek().tok {
            Tok::Eq => BinaryOp::Eq,
            Tok::Ne => BinaryOp::Ne,
            Tok::Lt => BinaryOp::Lt,
            Tok::Le => BinaryOp::Le,
            Tok::Gt => BinaryOp::Gt,
            Tok::Ge => BinaryOp::Ge,
            Tok::Ident(s) if s.eq_ignore_ascii_case("IN") || s.eq_ignore_ascii_case("NIN") => {
                let negated = s.eq_ignore_ascii_case("NIN");
                self.bump();
                let list = self.literal_list()?;
                return Ok(Expr::In {
                    expr: Box::new(left),
                    list,
                    negated,
                });
            }
            _ => return Ok(left),
        };
        self.bump();
        let right = self.additive()?;
        Ok(Expr::Binary(op, Box::new(left), Box::new(right)))
    }

    fn literal_list(&mut self) -> Result<Vec<Value>, QueryError> {
        self.expect(&Tok::LBracket)?;
        let mut out = Vec::new();
        if self.eat(&Tok::RBracket) {
            return Ok(out);
        }
        loop {
            let pos = self.peek().pos;
            match self.unary()? {
                Expr::Literal(v) => out.push(v),
                _ => return Err(self.error(pos, "IN and NIN lists take constants only")),
            }
            if self.eat(&Tok::RBracket) {
                return Ok(out);
            }
            if !self.eat(&Tok::Comma) {
                return Err(self.expected("',' or ']'"));
            }
        }
    }

    fn additive(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek().tok {
                Tok::Plus => BinaryOp::Add,
                Tok::Minus => BinaryOp::Sub,
                _ => return Ok(left),
            };
            self.bump();
            let right = self.multiplicative()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek().tok {
                Tok::Star => BinaryOp::Mul,
                Tok::Slash => BinaryOp::Div,
                Tok::Percent => BinaryOp::Mod,
                _ => return Ok(left),
            };
            self.bump();
            let right = self.unary()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Expr, QueryError> {
        if self.eat(&Tok::Minus) {
            return Ok(match self.nested(Self::unary)? {
                // Folded so that `IN [-1]` is a constant.
                Expr::Literal(Value::Number(n)) => Expr::Literal(negate(&n)),
                e => Expr::Unary(UnaryOp::Neg, Box::new(e)),
            });
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        let t = self.peek().clone();
        match t.tok {
            Tok::Str(s) => {
                self.bump();
                Ok(Expr::Literal(Value::String(s)))
            }
            Tok::Num(n) => {
                self.bump();
                Ok(Expr::Literal(Value::Number(self.number(&n, t.pos)?)))
            }
            Tok::LParen => {
                self.bump();
                let e = self.expr()?;
                self.expect(&Tok::RParen)?;
                Ok(e)
            }
            Tok::Ident(ref s) if s.eq_ignore_ascii_case("true") => {
                self.bump();
                Ok(Expr::Literal(Value::Bool(true)))
            }
            Tok::Ident(ref s) if s.eq_ignore_ascii_case("false") => {
                self.bump();
                Ok(Expr::Literal(Value::Bool(false)))
            }
            Tok::Ident(ref s) if s.eq_ignore_ascii_case("null") => {
                self.bump();
                Ok(Expr::Literal(Value::Null))
            }
            Tok::Ident(ref s) if *self.peek_at(1) == Tok::LParen => self.call(s.clone(), t.pos),
            Tok::Ident(ref s) if is_keyword(s) => Err(self.error(
                t.pos,
                format!(
                    "expected an expression, found the keyword '{s}' (escape a property of that name as [[{s}]])"
                ),
            )),
            Tok::Ident(_) | Tok::Escaped(_) => self.path(),
            _ => Err(self.expected("an expression")),
        }
    }

    fn number(&self, text: &str, pos: usize) -> Result<Number, QueryError> {
        let plain = !text.contains(['.', 'e', 'E']);
        if plain {
            if let Ok(n) = text.parse::<i64>() {
                return Ok(n.into());
            }
            if let Ok(n) = text.parse::<u64>() {
                return Ok(n.into());
            }
        }
        text.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .ok_or_else(|| self.error(pos, format!("the number {text} is out of range")))
    }

    fn call(&mut self, name: String, pos: usize) -> Result<Expr, QueryError> {
        self.bump();
        self.expect(&Tok::LParen)?;
        let mut args = Vec::new();
        if !self.eat(&Tok::RParen) {
            loop {
                args.push(self.expr()?);
                if self.eat(&Tok::RParen) {
                    break;
                }
                if !self.eat(&Tok::Comma) {
                    return Err(self.expected("',' or ')'"));
                }
            }
        }
        if let Some(agg) = Aggregate::from_name(&name).filter(|_| !self.routing) {
            if args.iter().any(Expr::has_aggregate) {
                return Err(self.error(pos, "aggregates cannot be nested"));
            }
            return match (agg, args.len()) {
                (Aggregate::Count, 0) => Ok(Expr::Aggregate(agg, None)),
                (Aggregate::Count, n) => {
                    Err(self.error(pos, format!("COUNT takes no arguments (COUNT()), got {n}")))
                }
                (_, 1) => Ok(Expr::Aggregate(agg, args.pop().map(Box::new))),
                (_, n) => Err(self.error(
                    pos,
                    format!("{} takes 1 argument, got {n}", name.to_ascii_uppercase()),
                )),
            };
        }
        let known = if self.routing {
            Function::from_routing_name(&name)
        } else {
            Function::from_name(&name)
        };
        let Some(f) = known else {
            return Err(self.error(pos, format!("unknown function '{name}'")));
        };
        let (min, max) = f.arity();
        if args.len() < min || args.len() > max {
            let wanted = match (min, max) {
                (1, 1) => "1 argument".to_string(),
                (a, b) if a == b => format!("{a} arguments"),
                (a, usize::MAX) => format!("at least {a} arguments"),
                (a, b) => format!("{a} to {b} arguments"),
            };
            return Err(self.error(
                pos,
                format!(
                    "{} takes {wanted}, got {}",
                    name.to_ascii_uppercase(),
                    args.len()
                ),
            ));
        }
        Ok(Expr::Call(f, args))
    }

    fn path(&mut self) -> Result<Expr, QueryError> {
        let mut segments = Vec::new();
        loop {
            let t = self.bump();
            match t.tok {
                // After a dot any name goes: `tags.group` cannot be mistaken for the keyword.
                Tok::Ident(s) if segments.is_empty() && is_keyword(&s) => {
                    return Err(self.error(
                        t.pos,
                        format!("expected a property name, found the keyword '{s}'"),
                    ))
                }
                Tok::Ident(s) | Tok::Escaped(s) => segments.push(s),
                other => {
                    return Err(self.error(
                        t.pos,
                        format!("expected a property name, found {}", other.describe()),
                    ))
                }
            }
            // Routing reads JSON bodies, which hold arrays: `$body.readings[0].value`.
            while self.routing && self.peek().tok == Tok::LBracket {
                self.bump();
                let t = self.bump();
                match t.tok {
                    Tok::Num(n) if n.parse::<usize>().is_ok() => segments.push(n),
                    other => {
                        return Err(self.error(
                            t.pos,
                            format!("expected an array index, found {}", other.describe()),
                        ))
                    }
                }
                self.expect(&Tok::RBracket)?;
            }
            if !self.eat(&Tok::Dot) {
                return Ok(Expr::Path(Path { segments }));
            }
        }
    }
}

fn negate(n: &Number) -> Value {
    if let Some(i) = n.as_i64().and_then(i64::checked_neg) {
        return Value::from(i);
    }
    n.as_f64()
        .and_then(|f| Number::from_f64(-f))
        .map_or(Value::Null, Value::Number)
}

fn paths_outside_aggregates<'a>(e: &'a Expr, out: &mut Vec<&'a Path>) {
    match e {
        Expr::Aggregate(..) | Expr::Literal(_) => {}
        Expr::Path(p) => out.push(p),
        Expr::Unary(_, e) => paths_outside_aggregates(e, out),
        Expr::Binary(_, a, b) => {
            paths_outside_aggregates(a, out);
            paths_outside_aggregates(b, out);
        }
        Expr::In { expr, .. } => paths_outside_aggregates(expr, out),
        Expr::Call(_, args) => args.iter().for_each(|a| paths_outside_aggregates(a, out)),
    }
}

/// Strips the collection prefix, gives IoT Hub's members their casing and names unnamed path
/// projections after their last segment.
fn normalize_query(q: &mut Query) {
    let from = q.from;
    let mut fix = |p: &mut Path| normalize_path(p, from);
    if let Select::Items(items) = &mut q.select {
        for item in items.iter_mut() {
            visit_paths(&mut item.expr, &mut fix);
            if item.name.is_empty() {
                if let Expr::Path(p) = &item.expr {
                    item.name = p.segments.last().cloned().unwrap_or_default();
                }
            }
        }
    }
    if let Some(c) = &mut q.condition {
        visit_paths(c, &mut fix);
    }
    q.group_by.iter_mut().for_each(fix);
}

/// Calls `f` on every path in `e`, aggregates' arguments included.
pub(crate) fn visit_paths(e: &mut Expr, f: &mut impl FnMut(&mut Path)) {
    match e {
        Expr::Literal(_) => {}
        Expr::Path(p) => f(p),
        Expr::Unary(_, e) => visit_paths(e, f),
        Expr::Binary(_, a, b) => {
            visit_paths(a, f);
            visit_paths(b, f);
        }
        Expr::In { expr, .. } => visit_paths(expr, f),
        Expr::Call(_, args) => args.iter_mut().for_each(|a| visit_paths(a, f)),
        Expr::Aggregate(_, arg) => {
            if let Some(a) = arg {
                visit_paths(a, f);
            }
        }
    }
}

fn normalize_path(p: &mut Path, from: Collection) {
    let s = &mut p.segments;
    let is =
        |s: &[String], i: usize, name: &str| s.get(i).is_some_and(|x| x.eq_ignore_ascii_case(name));
    // The collection prefix, longest first; a path that is only the prefix stays as written.
    let prefix = match from {
        Collection::Modules if is(s, 0, "devices") && is(s, 1, "modules") => 2,
        Collection::Jobs if is(s, 0, "devices") && is(s, 1, "jobs") => 2,
        _ if is(s, 0, "devices") => 1,
        _ => 0,
    };
    if prefix > 0 && s.len() > prefix {
        s.drain(..prefix);
    }
    if let Some(first) = s.first_mut() {
        if first == "$version" {
            *first = "version".into();
        } else if let Some(m) = MEMBERS.iter().find(|m| m.eq_ignore_ascii_case(first)) {
            *first = (*m).to_string();
        }
    }
    let first = s.first().cloned().unwrap_or_default();
    match (first.as_str(), s.get_mut(1)) {
        ("properties", Some(second)) => {
            for name in ["desired", "reported"] {
                if second.eq_ignore_ascii_case(name) {
                    *second = name.into();
                }
            }
        }
        ("capabilities", Some(second)) if second.eq_ignore_ascii_case("iotEdge") => {
            *second = "iotEdge".into();
        }
        _ => {}
    }
}
