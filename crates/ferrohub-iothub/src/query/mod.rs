//! IoT Hub's query language (`SELECT ... FROM devices ...`) as pure code: the tokenizer
//! (`lexer`), the grammar (`parser`) producing the syntax tree (`ast`), the evaluator over a
//! JSON document (`eval`), and the necessary conditions a store may use to skip documents
//! (`plan`). No I/O: `POST /devices/query` runs it over twins, message routing will over
//! messages.

mod ast;
mod eval;
mod lexer;
mod parser;
mod plan;
#[cfg(test)]
mod tests;

pub use ast::{
    Aggregate, BinaryOp, Collection, Expr, Function, Path, Query, Select, SelectItem, UnaryOp,
};
pub use eval::{compare, eval, matches, number_order, project, Aggregator};
pub(crate) use parser::{parse_routing, visit_paths};
pub use plan::{sieve, Sieve};

/// The longest query IoT Hub accepts, in characters.
pub const MAX_QUERY_CHARS: usize = 8192;

/// A query that cannot run, with where in its text the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Syntax error at line {line}, column {column}: {message}")]
pub struct QueryError {
    /// 1-based, in characters.
    pub line: usize,
    pub column: usize,
    /// 0-based character offset into the query text.
    pub offset: usize,
    pub message: String,
}

impl QueryError {
    pub(crate) fn at(text: &str, offset: usize, message: impl Into<String>) -> Self {
        let mut line = 1;
        let mut column = 1;
        for c in text.chars().take(offset) {
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        QueryError {
            line,
            column,
            offset,
            message: message.into(),
        }
    }
}

/// Parses and checks a query.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    parser::parse(text)
}
