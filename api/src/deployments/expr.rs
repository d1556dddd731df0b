//! ARM template expressions: the `"[func(args…)]"` language, parsed by hand into an [`Expr`] tree
//! and evaluated against a [`Scope`] (parameters, variables, deployed resources).
//!
//! Syntax handled (the part of ARM's grammar templates use in practice):
//! - a JSON string is an expression when it starts with `[` and ends with `]`; `[[` escapes a literal
//!   leading bracket;
//! - function calls with nested calls as arguments: `concat(parameters('a'), '-', variables('b'))`;
//! - string literals in single quotes, a doubled quote `''` standing for one quote;
//! - integer literals (also negative);
//! - member access `.name` and index access `[expr]` on any value, e.g. `reference('ns').topicSpacesConfiguration.hostname`.
//!
//! Parsing is separate from evaluation so a whole template can be checked (syntax, unknown functions,
//! unknown parameters or variables) before anything is written.

use std::fmt;

use serde_json::Value;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `'text'`
    Str(String),
    /// `42`
    Int(i64),
    /// `name(args…)`
    Call(String, Vec<Expr>),
    /// `expr.name`
    Member(Box<Expr>, String),
    /// `expr[index]`
    Index(Box<Expr>, Box<Expr>),
}

/// A syntax or evaluation error, with the expression text it happened in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// The text is not a well-formed expression.
    #[error("invalid expression '{text}': {reason} at offset {offset}")]
    Syntax {
        /// The expression text (without the outer brackets).
        text: String,
        /// What was expected.
        reason: String,
        /// Byte offset of the problem.
        offset: usize,
    },
    /// A function the template language here does not provide.
    #[error("the template function '{0}' is not supported")]
    UnknownFunction(String),
    /// `parameters('x')` for an undeclared parameter.
    #[error("the template parameter '{0}' is not declared")]
    UnknownParameter(String),
    /// `variables('x')` for an undeclared variable.
    #[error("the template variable '{0}' is not declared")]
    UnknownVariable(String),
    /// Variables that refer to each other in a loop.
    #[error("the template variable '{0}' refers to itself")]
    VariableCycle(String),
    /// `reference(x)` of something that is not a resource of this template (or not deployed yet).
    #[error("reference('{0}') does not name a resource of this template")]
    UnknownReference(String),
    /// A function called with the wrong number or kind of arguments.
    #[error("{function}(): {reason}")]
    BadArguments {
        /// The function.
        function: String,
        /// What is wrong.
        reason: String,
    },
    /// `.name` or `[i]` on a value that has no such member.
    #[error("the value has no member '{0}'")]
    NoMember(String),
}

/// Functions the evaluator knows; anything else is rejected at validation time.
pub const FUNCTIONS: &[&str] = &[
    "parameters",
    "variables",
    "resourceId",
    "concat",
    "format",
    "reference",
    "resourceGroup",
    "subscription",
    "toLower",
    "toUpper",
    "string",
    "int",
    "bool",
    "equals",
    "if",
    "not",
    "and",
    "or",
    "true",
    "false",
    "null",
    "length",
    "empty",
    "createArray",
    "createObject",
    "json",
];

/// Is `s` a template expression (`[...]` but not the `[[` escape)?
pub fn is_expression(s: &str) -> bool {
    s.len() >= 2 && s.starts_with('[') && s.ends_with(']') && !s.starts_with("[[")
}

/// Parses the text of a JSON string that [`is_expression`]; the brackets are stripped here.
pub fn parse(s: &str) -> Result<Expr, ExprError> {
    let inner = &s[1..s.len() - 1];
    let mut p = Parser {
        text: inner,
        pos: 0,
    };
    p.skip_ws();
    let e = p.expr()?;
    p.skip_ws();
    if p.pos != inner.len() {
        return Err(p.err("unexpected text after the expression"));
    }
    Ok(e)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, reason: &str) -> ExprError {
        ExprError::Syntax {
            text: self.text.to_owned(),
            reason: reason.to_owned(),
            offset: self.pos,
        }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() {
                self.pos += c.len_utf8();
            } else {
                break;
            }
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Option<String> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' || (c == '$' && self.pos == start) {
                self.pos += 1;
            } else {
                break;
            }
        }
        (self.pos > start).then(|| self.text[start..self.pos].to_owned())
    }

    fn expr(&mut self) -> Result<Expr, ExprError> {
        self.skip_ws();
        let mut e = self.primary()?;
        loop {
            self.skip_ws();
            if self.eat('.') {
                self.skip_ws();
                let name = self
                    .ident()
                    .ok_or_else(|| self.err("expected a member name after '.'"))?;
                e = Expr::Member(Box::new(e), name);
            } else if self.eat('[') {
                let index = self.expr()?;
                if !self.eat(']') {
                    return Err(self.err("expected ']'"));
                }
                e = Expr::Index(Box::new(e), Box::new(index));
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        match self.peek() {
            Some('\'') => self.string(),
            Some(c) if c.is_ascii_digit() || c == '-' => self.int(),
            Some(c) if c.is_ascii_alphabetic() => {
                let name = self
                    .ident()
                    .ok_or_else(|| self.err("expected a function name"))?;
                if !self.eat('(') {
                    return Err(self.err("expected '(' after a function name"));
                }
                let mut args = Vec::new();
                if !self.eat(')') {
                    loop {
                        args.push(self.expr()?);
                        if self.eat(')') {
                            break;
                        }
                        if !self.eat(',') {
                            return Err(self.err("expected ',' or ')'"));
                        }
                    }
                }
                Ok(Expr::Call(name, args))
            }
            Some(_) => Err(self.err("expected a function call, a 'string' or a number")),
            None => Err(self.err("unexpected end of expression")),
        }
    }

    fn string(&mut self) -> Result<Expr, ExprError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string literal")),
                Some('\'') => {
                    self.pos += 1;
                    if self.peek() == Some('\'') {
                        out.push('\'');
                        self.pos += 1;
                    } else {
                        return Ok(Expr::Str(out));
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.pos += c.len_utf8();
                }
            }
        }
    }

    fn int(&mut self) -> Result<Expr, ExprError> {
        let start = self.pos;
        if self.peek() == Some('-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.text[start..self.pos]
            .parse()
            .map(Expr::Int)
            .map_err(|_| self.err("invalid number"))
    }
}

impl Expr {
    /// Calls `f` on every function call in the tree (outermost first).
    pub fn visit_calls<'a>(&'a self, f: &mut impl FnMut(&'a str, &'a [Expr])) {
        match self {
            Expr::Str(_) | Expr::Int(_) => {}
            Expr::Call(name, args) => {
                f(name, args);
                for a in args {
                    a.visit_calls(f);
                }
            }
            Expr::Member(e, _) => e.visit_calls(f),
            Expr::Index(e, i) => {
                e.visit_calls(f);
                i.visit_calls(f);
            }
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Str(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Expr::Int(i) => write!(f, "{i}"),
            Expr::Call(name, args) => {
                write!(f, "{name}(")?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{a}")?;
                }
                write!(f, ")")
            }
            Expr::Member(e, m) => write!(f, "{e}.{m}"),
            Expr::Index(e, i) => write!(f, "{e}[{i}]"),
        }
    }
}

/// What an expression can see while it is evaluated.
pub trait Scope {
    /// `parameters(name)`.
    fn parameter(&self, name: &str) -> Result<Value, ExprError>;
    /// `variables(name)`.
    fn variable(&self, name: &str) -> Result<Value, ExprError>;
    /// The subscription id of the deployment.
    fn subscription_id(&self) -> &str;
    /// The resource group name of the deployment.
    fn resource_group(&self) -> &str;
    /// `reference(id_or_name, …)`: the deployed resource (its `properties`, or all of it if `full`).
    fn reference(&self, id_or_name: &str, full: bool) -> Result<Value, ExprError>;
}

fn bad(function: &str, reason: impl Into<String>) -> ExprError {
    ExprError::BadArguments {
        function: function.to_owned(),
        reason: reason.into(),
    }
}

/// ARM's string conversion: strings as-is, everything else as compact JSON.
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn truthy(function: &str, v: &Value) -> Result<bool, ExprError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(bad(function, format!("expected a boolean, got {other}"))),
    }
}

fn string_arg<'v>(function: &str, v: &'v Value) -> Result<&'v str, ExprError> {
    v.as_str()
        .ok_or_else(|| bad(function, format!("expected a string argument, got {v}")))
}

/// Builds a resource id the way `resourceId()` does: optional subscription and resource group, a
/// full type (`Microsoft.EventGrid/namespaces/topicSpaces`) and one name per type segment.
pub fn resource_id(
    subscription: &str,
    resource_group: &str,
    full_type: &str,
    names: &[&str],
) -> Result<String, ExprError> {
    let mut parts = full_type.split('/');
    let namespace = parts.next().unwrap_or_default();
    let types: Vec<&str> = parts.collect();
    if types.is_empty() || types.len() != names.len() {
        return Err(bad(
            "resourceId",
            format!(
                "the type '{full_type}' has {} segment(s) but {} name(s) were given",
                types.len(),
                names.len()
            ),
        ));
    }
    let mut id = format!(
        "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/{namespace}"
    );
    for (t, n) in types.iter().zip(names) {
        id.push('/');
        id.push_str(t);
        id.push('/');
        id.push_str(n);
    }
    Ok(id)
}

/// .NET-style composite formatting used by `format()`: `{0}`, `{1:spec}` (spec ignored), `{{`, `}}`.
fn composite_format(fmt: &str, args: &[Value]) -> Result<String, ExprError> {
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut spec = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => spec.push(ch),
                        None => return Err(bad("format", "unterminated '{' in the format string")),
                    }
                }
                let index = spec.split([':', ',']).next().unwrap_or_default().trim();
                let i: usize = index
                    .parse()
                    .map_err(|_| bad("format", format!("'{{{spec}}}' is not a placeholder")))?;
                let v = args
                    .get(i)
                    .ok_or_else(|| bad("format", format!("placeholder {{{i}}} has no argument")))?;
                out.push_str(&to_text(v));
            }
            '}' => return Err(bad("format", "unmatched '}' in the format string")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Evaluates `e` in `scope`.
pub fn eval(e: &Expr, scope: &dyn Scope) -> Result<Value, ExprError> {
    match e {
        Expr::Str(s) => Ok(Value::String(s.clone())),
        Expr::Int(i) => Ok(Value::from(*i)),
        Expr::Member(inner, name) => {
            let v = eval(inner, scope)?;
            match &v {
                Value::Object(map) => map
                    .get(name)
                    .or_else(|| {
                        // ARM property access is case-insensitive.
                        map.iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v)
                    })
                    .cloned()
                    .ok_or_else(|| ExprError::NoMember(name.clone())),
                _ => Err(ExprError::NoMember(name.clone())),
            }
        }
        Expr::Index(inner, index) => {
            let v = eval(inner, scope)?;
            let i = eval(index, scope)?;
            let found = match (&v, &i) {
                (Value::Array(a), Value::Number(n)) => n.as_u64().and_then(|n| a.get(n as usize)),
                (Value::Object(m), Value::String(k)) => m.get(k),
                _ => None,
            };
            found
                .cloned()
                .ok_or_else(|| ExprError::NoMember(to_text(&i)))
        }
        Expr::Call(name, args) => call(name, args, scope),
    }
}

fn call(name: &str, args: &[Expr], scope: &dyn Scope) -> Result<Value, ExprError> {
    // `if` evaluates only the chosen branch, like ARM.
    if name.eq_ignore_ascii_case("if") {
        if args.len() != 3 {
            return Err(bad("if", "expects (condition, trueValue, falseValue)"));
        }
        let cond = truthy("if", &eval(&args[0], scope)?)?;
        return eval(if cond { &args[1] } else { &args[2] }, scope);
    }
    let values = args
        .iter()
        .map(|a| eval(a, scope))
        .collect::<Result<Vec<_>, _>>()?;
    let canonical = FUNCTIONS
        .iter()
        .find(|f| f.eq_ignore_ascii_case(name))
        .ok_or_else(|| ExprError::UnknownFunction(name.to_owned()))?;
    let argc = |n: usize| -> Result<(), ExprError> {
        if values.len() == n {
            Ok(())
        } else {
            Err(bad(
                canonical,
                format!("expects {n} argument(s), got {}", values.len()),
            ))
        }
    };
    match *canonical {
        "parameters" => {
            argc(1)?;
            scope.parameter(string_arg(canonical, &values[0])?)
        }
        "variables" => {
            argc(1)?;
            scope.variable(string_arg(canonical, &values[0])?)
        }
        "concat" => {
            if values.iter().all(Value::is_array) && !values.is_empty() {
                let mut out = Vec::new();
                for v in values {
                    if let Value::Array(a) = v {
                        out.extend(a);
                    }
                }
                Ok(Value::Array(out))
            } else {
                Ok(Value::String(values.iter().map(to_text).collect()))
            }
        }
        "format" => {
            let (first, rest) = values
                .split_first()
                .ok_or_else(|| bad(canonical, "expects a format string"))?;
            Ok(Value::String(composite_format(
                string_arg(canonical, first)?,
                rest,
            )?))
        }
        "resourceId" => {
            let strings = values
                .iter()
                .map(|v| string_arg(canonical, v))
                .collect::<Result<Vec<_>, _>>()?;
            // The type is the first argument with a '/' in it; what comes before it is an optional
            // subscription id and resource group name.
            let type_at = strings
                .iter()
                .position(|s| s.contains('/'))
                .ok_or_else(|| {
                    bad(
                        canonical,
                        "no resource type (like 'Microsoft.X/type') given",
                    )
                })?;
            let (sub, rg) = match type_at {
                0 => (scope.subscription_id(), scope.resource_group()),
                1 => (scope.subscription_id(), strings[0]),
                2 => (strings[0], strings[1]),
                _ => {
                    return Err(bad(
                        canonical,
                        "too many arguments before the resource type",
                    ));
                }
            };
            resource_id(sub, rg, strings[type_at], &strings[type_at + 1..]).map(Value::String)
        }
        "reference" => {
            if values.is_empty() || values.len() > 3 {
                return Err(bad(
                    canonical,
                    "expects (resourceName or id, [apiVersion], ['Full'])",
                ));
            }
            let target = string_arg(canonical, &values[0])?;
            let full = values
                .get(2)
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("full"));
            scope.reference(target, full)
        }
        "resourceGroup" => {
            argc(0)?;
            let (sub, rg) = (scope.subscription_id(), scope.resource_group());
            Ok(serde_json::json!({
                "id": format!("/subscriptions/{sub}/resourceGroups/{rg}"),
                "name": rg,
            }))
        }
        "subscription" => {
            argc(0)?;
            let sub = scope.subscription_id();
            Ok(serde_json::json!({"id": format!("/subscriptions/{sub}"), "subscriptionId": sub}))
        }
        "toLower" => {
            argc(1)?;
            Ok(Value::String(
                string_arg(canonical, &values[0])?.to_lowercase(),
            ))
        }
        "toUpper" => {
            argc(1)?;
            Ok(Value::String(
                string_arg(canonical, &values[0])?.to_uppercase(),
            ))
        }
        "string" => {
            argc(1)?;
            Ok(Value::String(to_text(&values[0])))
        }
        "int" => {
            argc(1)?;
            match &values[0] {
                Value::Number(n) if n.is_i64() => Ok(values[0].clone()),
                Value::String(s) => s
                    .trim()
                    .parse::<i64>()
                    .map(Value::from)
                    .map_err(|_| bad(canonical, format!("'{s}' is not an integer"))),
                other => Err(bad(
                    canonical,
                    format!("cannot convert {other} to an integer"),
                )),
            }
        }
        "bool" => {
            argc(1)?;
            truthy(canonical, &values[0]).map(Value::Bool)
        }
        "equals" => {
            argc(2)?;
            Ok(Value::Bool(values[0] == values[1]))
        }
        "not" => {
            argc(1)?;
            Ok(Value::Bool(!truthy(canonical, &values[0])?))
        }
        "and" | "or" => {
            if values.len() < 2 {
                return Err(bad(canonical, "expects at least 2 arguments"));
            }
            let bools = values
                .iter()
                .map(|v| truthy(canonical, v))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Value::Bool(if *canonical == "and" {
                bools.iter().all(|b| *b)
            } else {
                bools.iter().any(|b| *b)
            }))
        }
        "true" => {
            argc(0)?;
            Ok(Value::Bool(true))
        }
        "false" => {
            argc(0)?;
            Ok(Value::Bool(false))
        }
        "null" => {
            argc(0)?;
            Ok(Value::Null)
        }
        "length" | "empty" => {
            argc(1)?;
            let len = match &values[0] {
                Value::String(s) => s.chars().count(),
                Value::Array(a) => a.len(),
                Value::Object(o) => o.len(),
                Value::Null => 0,
                other => return Err(bad(canonical, format!("no length for {other}"))),
            };
            Ok(if *canonical == "length" {
                Value::from(len)
            } else {
                Value::Bool(len == 0)
            })
        }
        "createArray" => Ok(Value::Array(values)),
        "createObject" => {
            if values.len() % 2 != 0 {
                return Err(bad(canonical, "expects key/value pairs"));
            }
            let mut map = serde_json::Map::new();
            for pair in values.chunks(2) {
                map.insert(string_arg(canonical, &pair[0])?.to_owned(), pair[1].clone());
            }
            Ok(Value::Object(map))
        }
        "json" => {
            argc(1)?;
            serde_json::from_str(string_arg(canonical, &values[0])?)
                .map_err(|e| bad(canonical, format!("invalid JSON: {e}")))
        }
        other => Err(ExprError::UnknownFunction(other.to_owned())),
    }
}

/// Evaluates every expression inside a JSON value (strings that [`is_expression`]; `[[` unescaped).
pub fn eval_value(v: &Value, scope: &dyn Scope) -> Result<Value, ExprError> {
    Ok(match v {
        Value::String(s) if is_expression(s) => eval(&parse(s)?, scope)?,
        Value::String(s) if s.starts_with("[[") => Value::String(s[1..].to_owned()),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| eval_value(x, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), eval_value(x, scope)?)))
                .collect::<Result<_, ExprError>>()?,
        ),
        other => other.clone(),
    })
}

/// Parses every expression inside a JSON value, returning them (for validation passes).
pub fn parse_all(v: &Value, out: &mut Vec<Expr>) -> Result<(), ExprError> {
    match v {
        Value::String(s) if is_expression(s) => out.push(parse(s)?),
        Value::Array(a) => {
            for x in a {
                parse_all(x, out)?;
            }
        }
        Value::Object(m) => {
            for x in m.values() {
                parse_all(x, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    struct TestScope {
        params: HashMap<&'static str, Value>,
    }

    impl Scope for TestScope {
        fn parameter(&self, name: &str) -> Result<Value, ExprError> {
            self.params
                .get(name)
                .cloned()
                .ok_or_else(|| ExprError::UnknownParameter(name.to_owned()))
        }
        fn variable(&self, name: &str) -> Result<Value, ExprError> {
            Err(ExprError::UnknownVariable(name.to_owned()))
        }
        fn subscription_id(&self) -> &str {
            "sub1"
        }
        fn resource_group(&self) -> &str {
            "rg1"
        }
        fn reference(&self, id: &str, _full: bool) -> Result<Value, ExprError> {
            if id == "ns1" {
                Ok(
                    json!({"topicSpacesConfiguration": {"hostname": "ns1.example"}, "list": [10, 20]}),
                )
            } else {
                Err(ExprError::UnknownReference(id.to_owned()))
            }
        }
    }

    fn scope() -> TestScope {
        TestScope {
            params: HashMap::from([("name", json!("ns1")), ("count", json!(3))]),
        }
    }

    fn run(s: &str) -> Result<Value, ExprError> {
        eval(&parse(s)?, &scope())
    }

    #[test]
    fn nested_calls_and_string_literals() {
        assert_eq!(
            run("[concat(parameters('name'), '-', toUpper('it''s'))]").unwrap(),
            json!("ns1-IT'S")
        );
        assert_eq!(
            run("[format('{0}/{1}-{{x}}', parameters('name'), parameters('count'))]").unwrap(),
            json!("ns1/3-{x}")
        );
    }

    #[test]
    fn resource_id_with_and_without_scope_arguments() {
        assert_eq!(
            run("[resourceId('Microsoft.EventGrid/namespaces/topicSpaces', parameters('name'), 'ts')]").unwrap(),
            json!("/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.EventGrid/namespaces/ns1/topicSpaces/ts")
        );
        assert_eq!(
            run("[resourceId('s2', 'rg2', 'Microsoft.EventGrid/namespaces', 'n')]").unwrap(),
            json!(
                "/subscriptions/s2/resourceGroups/rg2/providers/Microsoft.EventGrid/namespaces/n"
            )
        );
        assert!(matches!(
            run("[resourceId('Microsoft.EventGrid/namespaces/topicSpaces', 'only-one')]"),
            Err(ExprError::BadArguments { .. })
        ));
    }

    #[test]
    fn member_and_index_access_on_reference() {
        assert_eq!(
            run("[reference(parameters('name')).topicSpacesConfiguration.hostname]").unwrap(),
            json!("ns1.example")
        );
        assert_eq!(run("[reference('ns1').list[1]]").unwrap(), json!(20));
        assert_eq!(
            run("[reference('ns1').missing]"),
            Err(ExprError::NoMember("missing".into()))
        );
    }

    #[test]
    fn syntax_errors_are_reported_with_offsets() {
        assert!(matches!(
            parse("[concat('a', ]"),
            Err(ExprError::Syntax { .. })
        ));
        assert!(matches!(
            parse("[concat('a'"),
            Err(ExprError::Syntax { .. })
        ));
        assert!(matches!(
            parse("['unterminated]"),
            Err(ExprError::Syntax { .. })
        ));
        assert!(matches!(
            parse("[concat('a') extra]"),
            Err(ExprError::Syntax { .. })
        ));
    }

    #[test]
    fn unknown_function_is_named() {
        assert_eq!(
            run("[frobnicate('x')]"),
            Err(ExprError::UnknownFunction("frobnicate".into()))
        );
    }

    #[test]
    fn escaped_bracket_is_a_literal() {
        assert!(!is_expression("[[not an expression]"));
        assert_eq!(
            eval_value(&json!("[[literal]"), &scope()).unwrap(),
            json!("[literal]")
        );
        assert_eq!(
            eval_value(&json!({"a": ["[parameters('count')]"]}), &scope()).unwrap(),
            json!({"a": [3]})
        );
    }

    #[test]
    fn display_round_trips_through_parse() {
        let text = "[concat(parameters('a'), 'it''s', reference('x').p[0])]";
        let e = parse(text).unwrap();
        assert_eq!(parse(&format!("[{e}]")).unwrap(), e);
    }
}
