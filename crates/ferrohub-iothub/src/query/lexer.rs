//! Query text -> tokens, each with the character position it starts at (for error messages).

use super::QueryError;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// A name as written; keywords are names too, told apart by the parser (case-insensitive),
    /// so that `[[group]]` can escape a name a keyword would take.
    Ident(String),
    /// `[[name]]`: never a keyword.
    Escaped(String),
    Str(String),
    /// The number's text, parsed by the parser into a JSON number.
    Num(String),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Star,
    Plus,
    Minus,
    Slash,
    Percent,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    End,
}

impl Tok {
    /// How an error message shows the token.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("'{s}'"),
            Tok::Escaped(s) => format!("'[[{s}]]'"),
            Tok::Str(s) => format!("the string '{s}'"),
            Tok::Num(s) => format!("the number {s}"),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::LBracket => "'['".into(),
            Tok::RBracket => "']'".into(),
            Tok::Comma => "','".into(),
            Tok::Dot => "'.'".into(),
            Tok::Star => "'*'".into(),
            Tok::Plus => "'+'".into(),
            Tok::Minus => "'-'".into(),
            Tok::Slash => "'/'".into(),
            Tok::Percent => "'%'".into(),
            Tok::Eq => "'='".into(),
            Tok::Ne => "'!='".into(),
            Tok::Lt => "'<'".into(),
            Tok::Le => "'<='".into(),
            Tok::Gt => "'>'".into(),
            Tok::Ge => "'>='".into(),
            Tok::End => "the end of the query".into(),
        }
    }
}

/// A token and the character offset (0-based) it starts at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub tok: Tok,
    pub pos: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

pub(crate) fn tokenize(text: &str) -> Result<Vec<Token>, QueryError> {
    tokenize_with(text, false)
}

/// `dollar_hyphens`: a name that starts with `$` may hold `-` between its characters, as the
/// routing keywords `$dt-dataschema` and `$iothub-enqueuedtime` do (so `$a-1` is one name
/// there, not a subtraction).
pub(crate) fn tokenize_with(text: &str, dollar_hyphens: bool) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let simple = match c {
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            ',' => Some(Tok::Comma),
            '.' if !chars.get(i + 1).is_some_and(char::is_ascii_digit) => Some(Tok::Dot),
            '*' => Some(Tok::Star),
            '+' => Some(Tok::Plus),
            '-' => Some(Tok::Minus),
            '/' => Some(Tok::Slash),
            '%' => Some(Tok::Percent),
            '=' => Some(Tok::Eq),
            ']' => Some(Tok::RBracket),
            _ => None,
        };
        if let Some(tok) = simple {
            out.push(Token { tok, pos: start });
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied();
        let tok = match c {
            '[' if next == Some('[') => {
                // `[[name]]`: everything up to the first `]]`.
                let body = i + 2;
                let mut j = body;
                while j + 1 < chars.len() && !(chars[j] == ']' && chars[j + 1] == ']') {
                    j += 1;
                }
                if j + 1 >= chars.len() {
                    return Err(QueryError::at(
                        text,
                        start,
                        "an escaped name '[[...]]' is not closed",
                    ));
                }
                let name: String = chars[body..j].iter().collect();
                if name.is_empty() {
                    return Err(QueryError::at(
                        text,
                        start,
                        "an escaped name '[[]]' is empty",
                    ));
                }
                i = j + 2;
                Tok::Escaped(name)
            }
            '[' => {
                i += 1;
                Tok::LBracket
            }
            '!' if next == Some('=') => {
                i += 2;
                Tok::Ne
            }
            '<' if next == Some('>') => {
                i += 2;
                Tok::Ne
            }
            '<' if next == Some('=') => {
                i += 2;
                Tok::Le
            }
            '<' => {
                i += 1;
                Tok::Lt
            }
            '>' if next == Some('=') => {
                i += 2;
                Tok::Ge
            }
            '>' => {
                i += 1;
                Tok::Gt
            }
            '\'' | '"' => {
                let (s, end) = string(text, &chars, i)?;
                i = end;
                Tok::Str(s)
            }
            c if c.is_ascii_digit() || c == '.' => {
                let (n, end) = number(text, &chars, i)?;
                i = end;
                Tok::Num(n)
            }
            c if is_ident_start(c) => {
                let mut j = i;
                let hyphens = dollar_hyphens && c == '$';
                while j < chars.len()
                    && (is_ident_char(chars[j])
                        || (hyphens
                            && chars[j] == '-'
                            && chars.get(j + 1).copied().is_some_and(is_ident_char)))
                {
                    j += 1;
                }
                let name: String = chars[i..j].iter().collect();
                i = j;
                Tok::Ident(name)
            }
            other => {
                return Err(QueryError::at(
                    text,
                    start,
                    format!("unexpected character '{other}'"),
                ))
            }
        };
        out.push(Token { tok, pos: start });
    }
    out.push(Token {
        tok: Tok::End,
        pos: chars.len(),
    });
    Ok(out)
}

/// A quoted string from `start` (its opening quote); returns the text and the index after it.
/// Backslash escapes as in JSON, plus `\'`.
fn string(text: &str, chars: &[char], start: usize) -> Result<(String, usize), QueryError> {
    let quote = chars[start];
    let mut out = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            c if c == quote => return Ok((out, i + 1)),
            '\\' => {
                let Some(&e) = chars.get(i + 1) else { break };
                let unescaped = match e {
                    '\'' => '\'',
                    '"' => '"',
                    '\\' => '\\',
                    '/' => '/',
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'u' => {
                        let hex: String = chars.get(i + 2..i + 6).unwrap_or(&[]).iter().collect();
                        let code = u32::from_str_radix(&hex, 16)
                            .ok()
                            .filter(|_| hex.len() == 4)
                            .and_then(char::from_u32)
                            .ok_or_else(|| {
                                QueryError::at(text, i, "expected four hex digits after '\\u'")
                            })?;
                        out.push(code);
                        i += 6;
                        continue;
                    }
                    other => {
                        return Err(QueryError::at(
                            text,
                            i,
                            format!("unknown escape '\\{other}' in a string"),
                        ))
                    }
                };
                out.push(unescaped);
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Err(QueryError::at(text, start, "a string is not closed"))
}

/// A number from `start`: digits, an optional fraction and exponent.
fn number(text: &str, chars: &[char], start: usize) -> Result<(String, usize), QueryError> {
    let mut i = start;
    let digits = |i: &mut usize| {
        let from = *i;
        while *i < chars.len() && chars[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > from
    };
    let int = digits(&mut i);
    let mut frac = false;
    if chars.get(i) == Some(&'.') {
        i += 1;
        frac = digits(&mut i);
    }
    if !int && !frac {
        return Err(QueryError::at(text, start, "expected digits in a number"));
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        i += 1;
        if matches!(chars.get(i), Some('+' | '-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return Err(QueryError::at(
                text,
                i,
                "expected digits in a number's exponent",
            ));
        }
    }
    if chars.get(i).is_some_and(|&c| is_ident_start(c)) {
        return Err(QueryError::at(
            text,
            i,
            "expected a space or an operator after a number",
        ));
    }
    Ok((chars[start..i].iter().collect(), i))
}
