//! The Event Grid client-group query language: parse once, evaluate per client.
//!
//! What we learned from the Event Grid documentation ("Client groups", "MQTT clients") and
//! implement: comparisons of client attributes with `=`, `!=` / `<>` and, for integers, `<`, `>`,
//! `<=`, `>=`; `IN [v1, v2, ...]`; `and` binding tighter than `or`; parentheses; string values in
//! single or double quotes; the operand `authenticationName`; attribute values that are strings,
//! integers, booleans or arrays of strings. Keywords are case-insensitive.
//!
//! Our additions and interpretations, each chosen so that a query never matches *more* clients than
//! a reader would expect:
//! - `NOT expr` and `operand NOT IN [...]`; `${client.authenticationName}` and
//!   `${client.attributes.NAME}` are accepted as spellings of `authenticationName` and
//!   `attributes.NAME`. A quote inside a string is written twice (`'it''s'`).
//! - A comparison with a missing attribute, or with a value of another type (string vs integer),
//!   is false — including `!=`. (`NOT attributes.x = 'a'` is true for a client without `x`.)
//! - On an array attribute, `=` and `IN` mean "some element is equal / in the list", `!=` and
//!   `NOT IN` mean "no element is"; ordering comparisons on arrays are false.
//! - `authenticationName` compares without regard to ASCII case, as Event Grid treats
//!   authentication names case-insensitively when it authenticates.

use std::collections::BTreeMap;

use crate::model::AttributeValue;

/// A query that failed to parse: character position and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at position {position}: {message}")]
pub struct QueryError {
    /// 0-based character offset into the query text.
    pub position: usize,
    pub message: String,
}

/// What a query is evaluated against: one registered client.
#[derive(Debug, Clone, Copy)]
pub struct QuerySubject<'a> {
    pub authentication_name: &'a str,
    pub attributes: &'a BTreeMap<String, AttributeValue>,
}

/// A parsed client-group query.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientGroupQuery {
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Cmp(Operand, CmpOp, Literal),
    In(Operand, Vec<Literal>, bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Attribute(String),
    AuthenticationName,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Op(CmpOp),
    Word(String),
    Var(String),
    Str(String),
    Int(i64),
}

struct Lexer {
    toks: Vec<(usize, Tok)>,
}

fn char_pos(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].chars().count()
}

fn error(text: &str, byte: usize, message: impl Into<String>) -> QueryError {
    QueryError {
        position: char_pos(text, byte),
        message: message.into(),
    }
}

impl Lexer {
    fn run(text: &str) -> Result<Vec<(usize, Tok)>, QueryError> {
        let mut lx = Lexer { toks: Vec::new() };
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            let start = i;
            match c {
                b' ' | b'\t' | b'\r' | b'\n' => i += 1,
                b'(' => lx.push(start, Tok::LParen, &mut i, 1),
                b')' => lx.push(start, Tok::RParen, &mut i, 1),
                b'[' => lx.push(start, Tok::LBracket, &mut i, 1),
                b']' => lx.push(start, Tok::RBracket, &mut i, 1),
                b',' => lx.push(start, Tok::Comma, &mut i, 1),
                b'=' => lx.push(start, Tok::Op(CmpOp::Eq), &mut i, 1),
                b'!' if bytes.get(i + 1) == Some(&b'=') => {
                    lx.push(start, Tok::Op(CmpOp::Ne), &mut i, 2)
                }
                b'<' if bytes.get(i + 1) == Some(&b'>') => {
                    lx.push(start, Tok::Op(CmpOp::Ne), &mut i, 2)
                }
                b'<' if bytes.get(i + 1) == Some(&b'=') => {
                    lx.push(start, Tok::Op(CmpOp::Le), &mut i, 2)
                }
                b'>' if bytes.get(i + 1) == Some(&b'=') => {
                    lx.push(start, Tok::Op(CmpOp::Ge), &mut i, 2)
                }
                b'<' => lx.push(start, Tok::Op(CmpOp::Lt), &mut i, 1),
                b'>' => lx.push(start, Tok::Op(CmpOp::Gt), &mut i, 1),
                b'\'' | b'"' => {
                    let quote = c as char;
                    let mut value = String::new();
                    let mut j = i + 1;
                    loop {
                        let Some(ch) = text[j..].chars().next() else {
                            return Err(error(text, start, "unterminated string"));
                        };
                        j += ch.len_utf8();
                        if ch == quote {
                            if text[j..].starts_with(quote) {
                                value.push(quote);
                                j += 1;
                            } else {
                                break;
                            }
                        } else {
                            value.push(ch);
                        }
                    }
                    lx.toks.push((start, Tok::Str(value)));
                    i = j;
                }
                b'$' => {
                    if bytes.get(i + 1) != Some(&b'{') {
                        return Err(error(text, start, "expected '${' to start a variable"));
                    }
                    let Some(close) = text[i..].find('}') else {
                        return Err(error(text, start, "unclosed variable"));
                    };
                    lx.toks
                        .push((start, Tok::Var(text[i + 2..i + close].to_string())));
                    i += close + 1;
                }
                b'-' | b'0'..=b'9' => {
                    let mut j = i + 1;
                    while j < bytes.len() && bytes[j].is_ascii_digit() {
                        j += 1;
                    }
                    let digits = &text[i..j];
                    let value: i64 = digits
                        .parse()
                        .map_err(|_| error(text, start, format!("invalid integer {digits:?}")))?;
                    lx.toks.push((start, Tok::Int(value)));
                    i = j;
                }
                c if c.is_ascii_alphabetic() || c == b'_' => {
                    let mut j = i + 1;
                    while j < bytes.len()
                        && (bytes[j].is_ascii_alphanumeric()
                            || bytes[j] == b'_'
                            || bytes[j] == b'.')
                    {
                        j += 1;
                    }
                    lx.toks.push((start, Tok::Word(text[i..j].to_string())));
                    i = j;
                }
                _ => {
                    let ch = text[i..].chars().next().unwrap_or('?');
                    return Err(error(text, start, format!("unexpected character {ch:?}")));
                }
            }
        }
        Ok(lx.toks)
    }

    fn push(&mut self, start: usize, tok: Tok, i: &mut usize, len: usize) {
        self.toks.push((start, tok));
        *i += len;
    }
}

struct Parser<'a> {
    text: &'a str,
    toks: Vec<(usize, Tok)>,
    at: usize,
}

fn is_keyword(tok: &Tok, keyword: &str) -> bool {
    matches!(tok, Tok::Word(w) if w.eq_ignore_ascii_case(keyword))
}

fn attribute_name_ok(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|(_, t)| t)
    }

    fn pos(&self) -> usize {
        self.toks
            .get(self.at)
            .map(|(p, _)| *p)
            .unwrap_or(self.text.len())
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, QueryError> {
        Err(error(self.text, self.pos(), message))
    }

    fn next(&mut self) -> Option<Tok> {
        let tok = self.toks.get(self.at).map(|(_, t)| t.clone());
        self.at += 1;
        tok
    }

    fn or(&mut self) -> Result<Expr, QueryError> {
        let mut items = vec![self.and()?];
        while self.peek().is_some_and(|t| is_keyword(t, "or")) {
            self.at += 1;
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.pop().expect("one item")
        } else {
            Expr::Or(items)
        })
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut items = vec![self.not()?];
        while self.peek().is_some_and(|t| is_keyword(t, "and")) {
            self.at += 1;
            items.push(self.not()?);
        }
        Ok(if items.len() == 1 {
            items.pop().expect("one item")
        } else {
            Expr::And(items)
        })
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if self.peek().is_some_and(|t| is_keyword(t, "not")) {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        match self.peek() {
            Some(Tok::LParen) => {
                self.at += 1;
                let inner = self.or()?;
                match self.peek() {
                    Some(Tok::RParen) => {
                        self.at += 1;
                        Ok(inner)
                    }
                    _ => self.fail("expected ')'"),
                }
            }
            None => self.fail("expected a comparison, found the end of the query"),
            _ => self.comparison(),
        }
    }

    fn operand(&mut self) -> Result<Operand, QueryError> {
        let start = self.pos();
        let bad = |p: &Self| {
            Err(error(
                p.text,
                start,
                "expected attributes.NAME or authenticationName",
            ))
        };
        match self.next() {
            Some(Tok::Word(w)) => {
                if w.eq_ignore_ascii_case("authenticationName") {
                    return Ok(Operand::AuthenticationName);
                }
                match w.split_once('.') {
                    Some((head, name))
                        if head.eq_ignore_ascii_case("attributes") && attribute_name_ok(name) =>
                    {
                        Ok(Operand::Attribute(name.to_string()))
                    }
                    _ => bad(self),
                }
            }
            Some(Tok::Var(v)) => {
                if v == "client.authenticationName" {
                    return Ok(Operand::AuthenticationName);
                }
                match v.strip_prefix("client.attributes.") {
                    Some(name) if attribute_name_ok(name) => Ok(Operand::Attribute(name.into())),
                    _ => Err(error(
                        self.text,
                        start,
                        format!(
                            "unknown variable ${{{v}}}: expected ${{client.authenticationName}} or ${{client.attributes.NAME}}"
                        ),
                    )),
                }
            }
            _ => bad(self),
        }
    }

    fn literal(&mut self) -> Result<Literal, QueryError> {
        match self.peek() {
            Some(Tok::Str(s)) => {
                let s = s.clone();
                self.at += 1;
                Ok(Literal::Str(s))
            }
            Some(Tok::Int(n)) => {
                let n = *n;
                self.at += 1;
                Ok(Literal::Int(n))
            }
            Some(t) if is_keyword(t, "true") => {
                self.at += 1;
                Ok(Literal::Bool(true))
            }
            Some(t) if is_keyword(t, "false") => {
                self.at += 1;
                Ok(Literal::Bool(false))
            }
            _ => self.fail("expected a value: a quoted string, an integer, true or false"),
        }
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        let operand = self.operand()?;
        let negated = if self.peek().is_some_and(|t| is_keyword(t, "not")) {
            self.at += 1;
            if !self.peek().is_some_and(|t| is_keyword(t, "in")) {
                return self.fail("expected IN after NOT");
            }
            true
        } else {
            false
        };
        if self.peek().is_some_and(|t| is_keyword(t, "in")) {
            self.at += 1;
            if self.next() != Some(Tok::LBracket) {
                self.at -= 1;
                return self.fail("expected '[' after IN");
            }
            let mut values = Vec::new();
            loop {
                values.push(self.literal()?);
                match self.next() {
                    Some(Tok::Comma) => continue,
                    Some(Tok::RBracket) => break,
                    _ => {
                        self.at -= 1;
                        return self.fail("expected ',' or ']'");
                    }
                }
            }
            return Ok(Expr::In(operand, values, negated));
        }
        let op = match self.peek() {
            Some(Tok::Op(op)) => *op,
            _ => return self.fail("expected =, !=, <>, <, >, <=, >= or IN"),
        };
        self.at += 1;
        let value_pos = self.pos();
        let value = self.literal()?;
        if matches!(op, CmpOp::Lt | CmpOp::Gt | CmpOp::Le | CmpOp::Ge)
            && !matches!(value, Literal::Int(_))
        {
            return Err(error(
                self.text,
                value_pos,
                "ordering comparisons need an integer value",
            ));
        }
        if operand == Operand::AuthenticationName && !matches!(value, Literal::Str(_)) {
            return Err(error(
                self.text,
                value_pos,
                "authenticationName compares with a string",
            ));
        }
        Ok(Expr::Cmp(operand, op, value))
    }
}

impl ClientGroupQuery {
    /// Parses a query; errors carry the character position.
    pub fn parse(text: &str) -> Result<ClientGroupQuery, QueryError> {
        let toks = Lexer::run(text)?;
        let mut parser = Parser { text, toks, at: 0 };
        let expr = parser.or()?;
        if parser.at < parser.toks.len() {
            return parser.fail("unexpected text after the end of the expression");
        }
        Ok(ClientGroupQuery { expr })
    }

    /// Whether the client belongs to the group.
    pub fn matches(&self, subject: &QuerySubject<'_>) -> bool {
        eval(&self.expr, subject)
    }
}

fn eval(expr: &Expr, s: &QuerySubject<'_>) -> bool {
    match expr {
        Expr::Or(items) => items.iter().any(|e| eval(e, s)),
        Expr::And(items) => items.iter().all(|e| eval(e, s)),
        Expr::Not(inner) => !eval(inner, s),
        Expr::Cmp(operand, op, lit) => compare(operand, *op, lit, s),
        // `x NOT IN [a, b]` is `x != a and x != b`, so a missing or differently typed `x` is false.
        Expr::In(operand, list, false) => list.iter().any(|l| compare(operand, CmpOp::Eq, l, s)),
        Expr::In(operand, list, true) => list.iter().all(|l| compare(operand, CmpOp::Ne, l, s)),
    }
}

enum OperandValue<'a> {
    Missing,
    Name(&'a str),
    Value(&'a AttributeValue),
    Array(&'a [String]),
}

fn operand_value<'a>(operand: &Operand, s: &QuerySubject<'a>) -> OperandValue<'a> {
    match operand {
        Operand::AuthenticationName => OperandValue::Name(s.authentication_name),
        Operand::Attribute(name) => match s.attributes.get(name) {
            None => OperandValue::Missing,
            Some(AttributeValue::StringList(items)) => OperandValue::Array(items),
            Some(v) => OperandValue::Value(v),
        },
    }
}

fn compare(operand: &Operand, op: CmpOp, lit: &Literal, s: &QuerySubject<'_>) -> bool {
    match (operand_value(operand, s), lit) {
        (OperandValue::Missing, _) => false,
        (OperandValue::Name(name), Literal::Str(l)) => match op {
            CmpOp::Eq => name.eq_ignore_ascii_case(l),
            CmpOp::Ne => !name.eq_ignore_ascii_case(l),
            _ => false,
        },
        (OperandValue::Array(items), Literal::Str(l)) => match op {
            CmpOp::Eq => items.iter().any(|i| i == l),
            CmpOp::Ne => !items.iter().any(|i| i == l),
            _ => false,
        },
        (OperandValue::Value(AttributeValue::String(v)), Literal::Str(l)) => match op {
            CmpOp::Eq => v == l,
            CmpOp::Ne => v != l,
            _ => false,
        },
        (OperandValue::Value(AttributeValue::Bool(v)), Literal::Bool(l)) => match op {
            CmpOp::Eq => v == l,
            CmpOp::Ne => v != l,
            _ => false,
        },
        (OperandValue::Value(AttributeValue::Int(v)), Literal::Int(l)) => match op {
            CmpOp::Eq => v == l,
            CmpOp::Ne => v != l,
            CmpOp::Lt => v < l,
            CmpOp::Gt => v > l,
            CmpOp::Le => v <= l,
            CmpOp::Ge => v >= l,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, AttributeValue)]) -> BTreeMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn s(v: &str) -> AttributeValue {
        AttributeValue::String(v.into())
    }

    /// Evaluates `query` for a client named `dev1` with a fixed attribute set.
    fn eval_for(query: &str) -> bool {
        let a = attrs(&[
            ("type", s("sensor")),
            ("floor", AttributeValue::Int(3)),
            ("room", s("345")),
            ("critical", AttributeValue::Bool(true)),
            (
                "sensors",
                AttributeValue::StringList(vec!["motion".into(), "light".into()]),
            ),
        ]);
        let q = ClientGroupQuery::parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        q.matches(&QuerySubject {
            authentication_name: "Dev1",
            attributes: &a,
        })
    }

    fn parse_err(query: &str) -> QueryError {
        ClientGroupQuery::parse(query).expect_err(query)
    }

    #[test]
    fn equality_on_strings_with_either_quote() {
        assert!(eval_for("attributes.type = 'sensor'"));
        assert!(eval_for("attributes.type = \"sensor\""));
        assert!(
            !eval_for("attributes.type = 'Sensor'"),
            "values are case-sensitive"
        );
        assert!(
            !eval_for("attributes.room = 345"),
            "string vs integer is a mismatch"
        );
    }

    #[test]
    fn doubled_quote_is_a_quote() {
        let a = attrs(&[("name", s("it's"))]);
        let q = ClientGroupQuery::parse("attributes.name = 'it''s'").expect("parses");
        assert!(q.matches(&QuerySubject {
            authentication_name: "x",
            attributes: &a,
        }));
    }

    #[test]
    fn not_equal_in_both_spellings() {
        assert!(eval_for("attributes.type != 'fan'"));
        assert!(eval_for("attributes.type <> 'fan'"));
        assert!(!eval_for("attributes.type <> 'sensor'"));
    }

    #[test]
    fn integer_ordering() {
        assert!(eval_for("attributes.floor <= 5"));
        assert!(eval_for("attributes.floor < 4"));
        assert!(eval_for("attributes.floor >= 3"));
        assert!(!eval_for("attributes.floor > 3"));
        assert!(eval_for("attributes.floor = 3"));
        assert!(eval_for("attributes.floor > -1"));
    }

    #[test]
    fn in_lists_and_not_in() {
        assert!(eval_for("attributes.type IN ['fan', 'sensor']"));
        assert!(!eval_for("attributes.type IN ['fan', 'light']"));
        assert!(eval_for("attributes.floor in [1, 2, 3]"));
        assert!(eval_for("attributes.type NOT IN ['fan']"));
        assert!(!eval_for("attributes.type not in ['fan', 'sensor']"));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        // false or (true and true)
        assert!(eval_for(
            "attributes.type = 'fan' or attributes.floor = 3 and attributes.room = '345'"
        ));
        // (true or x) and false
        assert!(!eval_for(
            "(attributes.type = 'sensor' or attributes.floor = 9) and attributes.room = '1'"
        ));
        // true or (x and false) -- without the parentheses
        assert!(eval_for(
            "attributes.type = 'sensor' or attributes.floor = 9 and attributes.room = '1'"
        ));
    }

    #[test]
    fn not_negates() {
        assert!(eval_for("NOT attributes.type = 'fan'"));
        assert!(!eval_for(
            "not (attributes.type = 'sensor' AND attributes.floor = 3)"
        ));
        assert!(eval_for("not not attributes.floor = 3"));
    }

    #[test]
    fn booleans() {
        assert!(eval_for("attributes.critical = true"));
        assert!(!eval_for("attributes.critical = FALSE"));
        assert!(!eval_for("attributes.critical = 'true'"));
    }

    #[test]
    fn arrays_match_by_element() {
        assert!(eval_for("attributes.sensors = 'motion'"));
        assert!(!eval_for("attributes.sensors = 'noise'"));
        assert!(eval_for("attributes.sensors IN ['noise', 'light']"));
        assert!(!eval_for("attributes.sensors IN ['noise', 'humidity']"));
        assert!(!eval_for("attributes.sensors != 'light'"));
        assert!(eval_for("attributes.sensors NOT IN ['noise']"));
    }

    #[test]
    fn missing_attributes_never_match_a_comparison() {
        assert!(!eval_for("attributes.color = 'red'"));
        assert!(!eval_for("attributes.color != 'red'"));
        assert!(!eval_for("attributes.color NOT IN ['red']"));
        assert!(!eval_for("attributes.color < 10"));
        assert!(eval_for("NOT attributes.color = 'red'"));
    }

    #[test]
    fn authentication_name_in_all_spellings() {
        assert!(eval_for("authenticationName = 'dev1'"), "caseless");
        assert!(eval_for("authenticationName IN ['client1', 'DEV1']"));
        assert!(eval_for("${client.authenticationName} = 'Dev1'"));
        assert!(eval_for("${client.attributes.floor} = 3"));
        assert!(!eval_for("authenticationName != 'dev1'"));
    }

    #[test]
    fn errors_name_their_position() {
        let e = parse_err("attributes.type = 'sensor");
        assert_eq!(
            (e.position, e.message.as_str()),
            (18, "unterminated string")
        );
        let e = parse_err("attribute.type = 'a'");
        assert_eq!(e.position, 0);
        assert!(
            e.message.contains("expected attributes.NAME"),
            "{}",
            e.message
        );
        let e = parse_err("attributes.type =");
        assert_eq!(e.position, 17);
        assert!(e.message.contains("expected a value"), "{}", e.message);
        let e = parse_err("attributes.floor < 'a'");
        assert_eq!(e.position, 19);
        assert!(e.message.contains("integer"), "{}", e.message);
        let e = parse_err("attributes.a = 1 attributes.b = 2");
        assert_eq!(e.position, 17);
        assert!(e.message.contains("after the end"), "{}", e.message);
        let e = parse_err("(attributes.a = 1");
        assert_eq!((e.position, e.message.as_str()), (17, "expected ')'"));
        let e = parse_err("attributes.a IN 'x'");
        assert_eq!(
            (e.position, e.message.as_str()),
            (16, "expected '[' after IN")
        );
        let e = parse_err("attributes.a IN ['x' 'y']");
        assert_eq!(
            (e.position, e.message.as_str()),
            (21, "expected ',' or ']'")
        );
        let e = parse_err("attributes.a = 1 ; drop");
        assert_eq!(e.position, 17);
        assert!(e.message.contains("unexpected character"), "{}", e.message);
        let e = parse_err("${client.name} = 'a'");
        assert_eq!(e.position, 0);
        assert!(e.message.contains("unknown variable"), "{}", e.message);
        let e = parse_err("");
        assert_eq!(e.position, 0);
        let e = parse_err("attributes.a NOT = 'x'");
        assert_eq!(
            (e.position, e.message.as_str()),
            (17, "expected IN after NOT")
        );
        let e = parse_err("authenticationName = 3");
        assert_eq!(e.position, 21);
        // Positions are characters: the é is one.
        let e = parse_err("attributes.a = 'é' and");
        assert_eq!(e.position, 22);
    }
}
