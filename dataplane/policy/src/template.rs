//! Topic templates: an MQTT filter whose levels may hold variables, compiled once into level
//! matchers, and the client-id patterns of IoT Operations `Connect` resources.
//!
//! Two spellings are parsed into one compiled form:
//! - IoT Operations topics use `{principal.clientId}`, `{principal.username}` and
//!   `{principal.attributes.NAME}`. The IoT Operations broker documentation ("Configure MQTT
//!   broker authorization", token substitution) requires such a token to be the only text of its
//!   topic level (`clients/{principal.clientId}/#` is valid, `client-{principal.clientId}` is not);
//!   we refuse the other form at compile time.
//! - Event Grid topic templates use `${client.authenticationName}` and `${client.attributes.NAME}`.
//!   The Event Grid topic-space documentation allows a variable to be part of a level but never to
//!   span levels, and allows at most 10 templates per topic space (checked by the engine).
//!
//! **Substitution rule (injection-proof).** A variable is never spliced into text that is parsed
//! again: a level is compared piece by piece against the concrete topic level. On top of that, a
//! template is *unusable* for a client when any of its variables is missing, empty, or holds `+`,
//! `#`, `/`, `$` or U+0000 — such a template grants that client nothing at all. So a client id
//! `#`, a username `a/b` or an attribute `$SYS` can never turn a template into a wider filter.
//!
//! **Subscribe rule.** A requested filter is covered by a template only when every topic the filter
//! can match is matched by the template: `+` in the request needs `+` (or `#`) in the template,
//! `#` in the request needs `#` in the template, and a request for a `$` topic is never covered by
//! a template whose first level is a wildcard.

use std::sync::Arc;

/// A variable a template refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Var {
    /// `{principal.clientId}`
    ClientId,
    /// `{principal.username}`
    Username,
    /// `{principal.attributes.NAME}`
    PrincipalAttribute(Box<str>),
    /// `${client.authenticationName}`
    AuthenticationName,
    /// `${client.attributes.NAME}`
    ClientAttribute(Box<str>),
}

impl std::fmt::Display for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Var::ClientId => f.write_str("{principal.clientId}"),
            Var::Username => f.write_str("{principal.username}"),
            Var::PrincipalAttribute(name) => write!(f, "{{principal.attributes.{name}}}"),
            Var::AuthenticationName => f.write_str("${client.authenticationName}"),
            Var::ClientAttribute(name) => write!(f, "${{client.attributes.{name}}}"),
        }
    }
}

/// Where variable values come from for one client.
pub(crate) trait Vars {
    fn get(&self, var: &Var) -> Option<&str>;
}

/// Which variable syntax a template is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    IotOperations,
    EventGrid,
}

#[derive(Debug, Clone)]
pub(crate) enum Seg {
    Lit(Box<str>),
    Var(Var),
}

#[derive(Debug, Clone)]
pub(crate) enum Level {
    Literal(Box<str>),
    /// A level that is exactly one variable.
    Var(Var),
    /// A level mixing literal text and variables (Event Grid only).
    Pattern(Box<[Seg]>),
    Plus,
    Hash,
}

/// What a template's first level is, for indexing.
pub(crate) enum First<'a> {
    Literal(&'a str),
    Var(&'a Var),
    Wildcard,
    Pattern,
}

/// Why a template cannot be used for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unusable {
    Missing(Var),
    Unsafe(Var, &'static str),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Missing(var) => write!(f, "{var} has no value for this client"),
            Unusable::Unsafe(var, why) => {
                write!(
                    f,
                    "{var} {why}, so the template is unusable for this client"
                )
            }
        }
    }
}

/// Why a substituted value would be unsafe, if it is.
pub(crate) fn unsafe_value(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        Some("is empty")
    } else if value.contains('+') {
        Some("contains '+'")
    } else if value.contains('#') {
        Some("contains '#'")
    } else if value.contains('/') {
        Some("contains '/'")
    } else if value.contains('$') {
        Some("contains '$'")
    } else if value.contains('\0') {
        Some("contains U+0000")
    } else {
        None
    }
}

/// A compile error inside one template: character position and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateError {
    pub(crate) position: usize,
    pub(crate) message: String,
}

fn err(text: &str, byte: usize, message: impl Into<String>) -> TemplateError {
    TemplateError {
        position: text[..byte].chars().count(),
        message: message.into(),
    }
}

fn attribute_name_ok(name: &str, dialect: Dialect) -> bool {
    match dialect {
        // Event Grid attribute keys are alphanumerics and underscore (client resource docs).
        Dialect::EventGrid => {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        // IoT Operations attributes come from certificates, SAT annotations and custom auth;
        // anything that cannot confuse the template syntax is accepted.
        Dialect::IotOperations => !name.is_empty() && !name.contains(['{', '}', '/']),
    }
}

/// Parses the inside of `{...}` / `${...}`.
fn parse_var(name: &str, dialect: Dialect) -> Option<Var> {
    match dialect {
        Dialect::IotOperations => match name {
            "principal.clientId" => Some(Var::ClientId),
            "principal.username" => Some(Var::Username),
            _ => {
                let attr = name.strip_prefix("principal.attributes.")?;
                attribute_name_ok(attr, dialect).then(|| Var::PrincipalAttribute(attr.into()))
            }
        },
        Dialect::EventGrid => match name {
            "client.authenticationName" => Some(Var::AuthenticationName),
            _ => {
                let attr = name.strip_prefix("client.attributes.")?;
                attribute_name_ok(attr, dialect).then(|| Var::ClientAttribute(attr.into()))
            }
        },
    }
}

const IOT_VARS: &str =
    "expected {principal.clientId}, {principal.username} or {principal.attributes.NAME}";
const EG_VARS: &str = "expected ${client.authenticationName} or ${client.attributes.NAME}";

/// Splits one level (starting at byte `start` of `text`) into literal text and variables.
fn parse_segments(
    text: &str,
    start: usize,
    level: &str,
    dialect: Dialect,
) -> Result<Vec<Seg>, TemplateError> {
    let opener = match dialect {
        Dialect::IotOperations => "{",
        Dialect::EventGrid => "${",
    };
    let expected = match dialect {
        Dialect::IotOperations => IOT_VARS,
        Dialect::EventGrid => EG_VARS,
    };
    let mut segs = Vec::new();
    let mut rest = level;
    let mut offset = start;
    while let Some(at) = rest.find(opener) {
        if at > 0 {
            segs.push(Seg::Lit(rest[..at].into()));
        }
        let body_start = at + opener.len();
        let Some(close) = rest[body_start..].find('}') else {
            return Err(err(text, offset + at, "unclosed variable"));
        };
        let name = &rest[body_start..body_start + close];
        let Some(var) = parse_var(name, dialect) else {
            return Err(err(
                text,
                offset + at,
                format!("unknown variable {opener}{name}}}: {expected}"),
            ));
        };
        segs.push(Seg::Var(var));
        let consumed = body_start + close + 1;
        rest = &rest[consumed..];
        offset += consumed;
    }
    if !rest.is_empty() {
        segs.push(Seg::Lit(rest.into()));
    }
    Ok(segs)
}

/// A compiled topic template.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub(crate) text: Arc<str>,
    levels: Box<[Level]>,
    vars: Box<[Var]>,
}

impl Template {
    pub(crate) fn parse(text: &str, dialect: Dialect) -> Result<Template, TemplateError> {
        if text.is_empty() {
            return Err(err(text, 0, "empty topic"));
        }
        if let Some(at) = text.find('\0') {
            return Err(err(text, at, "U+0000 in topic"));
        }
        let mut levels = Vec::new();
        let mut vars = Vec::new();
        let mut start = 0;
        let parts: Vec<&str> = text.split('/').collect();
        for (i, level) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let compiled = match *level {
                "+" => Level::Plus,
                "#" if last => Level::Hash,
                "#" => return Err(err(text, start, "'#' must be the last level")),
                _ if level.contains('#') => {
                    return Err(err(
                        text,
                        start + level.find('#').unwrap_or(0),
                        "'#' must fill a whole level",
                    ));
                }
                _ if level.contains('+') => {
                    return Err(err(
                        text,
                        start + level.find('+').unwrap_or(0),
                        "'+' must fill a whole level",
                    ));
                }
                _ => {
                    let mut segs = parse_segments(text, start, level, dialect)?;
                    for seg in &segs {
                        if let Seg::Var(v) = seg
                            && !vars.contains(v)
                        {
                            vars.push(v.clone());
                        }
                    }
                    let has_var = segs.iter().any(|s| matches!(s, Seg::Var(_)));
                    if dialect == Dialect::IotOperations && has_var && segs.len() > 1 {
                        return Err(err(
                            text,
                            start,
                            "a {principal.*} variable must be the whole topic level",
                        ));
                    }
                    match (segs.len(), has_var) {
                        (1, true) => match segs.pop() {
                            Some(Seg::Var(v)) => Level::Var(v),
                            _ => unreachable!("one segment that is a variable"),
                        },
                        (_, false) => Level::Literal((*level).into()),
                        _ => Level::Pattern(segs.into_boxed_slice()),
                    }
                }
            };
            levels.push(compiled);
            start += level.len() + 1;
        }
        Ok(Template {
            text: text.into(),
            levels: levels.into_boxed_slice(),
            vars: vars.into_boxed_slice(),
        })
    }

    pub(crate) fn has_vars(&self) -> bool {
        !self.vars.is_empty()
    }

    pub(crate) fn first(&self) -> First<'_> {
        match &self.levels[0] {
            Level::Literal(s) => First::Literal(s),
            Level::Var(v) => First::Var(v),
            Level::Plus | Level::Hash => First::Wildcard,
            Level::Pattern(_) => First::Pattern,
        }
    }

    /// Checks every variable of the template against the substitution rule.
    pub(crate) fn usable(&self, vars: &impl Vars) -> Result<(), Unusable> {
        for var in self.vars.iter() {
            match vars.get(var) {
                None => return Err(Unusable::Missing(var.clone())),
                Some(value) => {
                    if let Some(why) = unsafe_value(value) {
                        return Err(Unusable::Unsafe(var.clone(), why));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the topic name is matched. Call [`Template::usable`] first when the template
    /// has variables.
    pub(crate) fn matches_topic(&self, topic: &str, vars: &impl Vars) -> bool {
        let dollar = topic.starts_with('$');
        let mut t = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            if i == 0 && dollar && matches!(level, Level::Plus | Level::Hash) {
                return false;
            }
            if let Level::Hash = level {
                return true;
            }
            match t.next() {
                Some(tl) if level_matches(level, tl, vars) => {}
                _ => return false,
            }
        }
        t.next().is_none()
    }

    /// Whether every topic the (valid, unshared) filter can match is matched by this template.
    pub(crate) fn covers_filter(&self, filter: &str, vars: &impl Vars) -> bool {
        let dollar = filter.starts_with('$');
        let mut f = filter.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            if i == 0 && dollar && matches!(level, Level::Plus | Level::Hash) {
                return false;
            }
            if let Level::Hash = level {
                return true;
            }
            match f.next() {
                None | Some("#") => return false,
                Some("+") => {
                    if !matches!(level, Level::Plus) {
                        return false;
                    }
                }
                Some(fl) => {
                    if !level_matches(level, fl, vars) {
                        return false;
                    }
                }
            }
        }
        f.next().is_none()
    }
}

fn level_matches(level: &Level, topic_level: &str, vars: &impl Vars) -> bool {
    match level {
        Level::Literal(s) => **s == *topic_level,
        Level::Var(v) => vars.get(v) == Some(topic_level),
        Level::Pattern(segs) => {
            let mut rest = topic_level;
            for seg in segs.iter() {
                let piece = match seg {
                    Seg::Lit(s) => &**s,
                    Seg::Var(v) => match vars.get(v) {
                        Some(value) => value,
                        None => return false,
                    },
                };
                match rest.strip_prefix(piece) {
                    Some(r) => rest = r,
                    None => return false,
                }
            }
            rest.is_empty()
        }
        Level::Plus => true,
        Level::Hash => true,
    }
}

/// One piece of an IoT Operations `Connect` client-id pattern.
#[derive(Debug, Clone)]
enum IdPiece {
    Lit(Box<str>),
    Var(Var),
    Star,
}

/// A client-id pattern of a `Connect` broker resource, such as `{principal.attributes.building}*`
/// (the example in the IoT Operations authorization docs): literal text, `{principal.*}` variables
/// anywhere, and `*` for any run of characters. The substitution rule applies to its variables.
#[derive(Debug, Clone)]
pub(crate) struct ClientIdPattern {
    pub(crate) text: Arc<str>,
    pieces: Box<[IdPiece]>,
    vars: Box<[Var]>,
}

impl ClientIdPattern {
    pub(crate) fn parse(text: &str) -> Result<ClientIdPattern, TemplateError> {
        if text.is_empty() {
            return Err(err(text, 0, "empty client id pattern"));
        }
        let mut pieces = Vec::new();
        let mut vars = Vec::new();
        for seg in parse_segments(text, 0, text, Dialect::IotOperations)? {
            match seg {
                Seg::Var(v) => {
                    if !vars.contains(&v) {
                        vars.push(v.clone());
                    }
                    pieces.push(IdPiece::Var(v));
                }
                Seg::Lit(s) => {
                    for (i, chunk) in s.split('*').enumerate() {
                        if i > 0 {
                            pieces.push(IdPiece::Star);
                        }
                        if !chunk.is_empty() {
                            pieces.push(IdPiece::Lit(chunk.into()));
                        }
                    }
                }
            }
        }
        Ok(ClientIdPattern {
            text: text.into(),
            pieces: pieces.into_boxed_slice(),
            vars: vars.into_boxed_slice(),
        })
    }

    pub(crate) fn usable(&self, vars: &impl Vars) -> Result<(), Unusable> {
        for var in self.vars.iter() {
            match vars.get(var) {
                None => return Err(Unusable::Missing(var.clone())),
                Some(value) => {
                    if let Some(why) = unsafe_value(value) {
                        return Err(Unusable::Unsafe(var.clone(), why));
                    }
                }
            }
        }
        Ok(())
    }

    /// Glob match of a client id. Runs once per CONNECT, so it may allocate.
    pub(crate) fn matches(&self, client_id: &str, vars: &impl Vars) -> bool {
        // Resolve into literal groups separated by stars.
        let mut groups: Vec<String> = vec![String::new()];
        for piece in self.pieces.iter() {
            match piece {
                IdPiece::Lit(s) => groups.last_mut().expect("one group").push_str(s),
                IdPiece::Var(v) => match vars.get(v) {
                    Some(value) => groups.last_mut().expect("one group").push_str(value),
                    None => return false,
                },
                IdPiece::Star => groups.push(String::new()),
            }
        }
        if groups.len() == 1 {
            return groups[0] == client_id;
        }
        let (first, rest) = groups.split_first().expect("at least two groups");
        let (last, middle) = rest.split_last().expect("at least two groups");
        let Some(mut remaining) = client_id.strip_prefix(first.as_str()) else {
            return false;
        };
        // Leftmost matching of each middle group is optimal for `*` globs.
        for group in middle {
            match remaining.find(group.as_str()) {
                Some(at) => remaining = &remaining[at + group.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<Var, &'static str>);
    impl Vars for Map {
        fn get(&self, var: &Var) -> Option<&str> {
            self.0.get(var).copied()
        }
    }
    fn vars(pairs: &[(Var, &'static str)]) -> Map {
        Map(pairs.iter().cloned().collect())
    }
    fn none() -> Map {
        vars(&[])
    }

    #[test]
    fn iot_variables_must_fill_a_level() {
        let t = Template::parse("clients/{principal.clientId}/#", Dialect::IotOperations)
            .expect("valid");
        assert!(t.has_vars());
        let e = Template::parse("client-{principal.clientId}/#", Dialect::IotOperations)
            .expect_err("partial level");
        assert_eq!(e.position, 0);
        assert!(e.message.contains("whole topic level"), "{}", e.message);
    }

    #[test]
    fn unknown_and_unclosed_variables_name_their_position() {
        let e = Template::parse("a/{principal.foo}", Dialect::IotOperations).expect_err("unknown");
        assert_eq!(e.position, 2);
        assert!(e.message.contains("unknown variable"), "{}", e.message);
        let e = Template::parse("a/b/${client.name", Dialect::EventGrid).expect_err("unclosed");
        assert_eq!(e.position, 4);
        assert_eq!(e.message, "unclosed variable");
        let e = Template::parse("a/${client.attributes.x-y}", Dialect::EventGrid)
            .expect_err("bad attribute name");
        assert_eq!(e.position, 2);
        let e = Template::parse("a/#/b", Dialect::EventGrid).expect_err("hash not last");
        assert_eq!(e.position, 2);
        let e = Template::parse("ab/c+", Dialect::EventGrid).expect_err("plus inside level");
        assert_eq!(e.position, 4);
        // Positions count characters, not bytes.
        let e = Template::parse("é/{x}", Dialect::IotOperations).expect_err("unknown");
        assert_eq!(e.position, 2);
    }

    #[test]
    fn event_grid_variables_may_be_part_of_a_level() {
        let t = Template::parse("m/${client.authenticationName}.f1/t", Dialect::EventGrid)
            .expect("valid");
        let v = vars(&[(Var::AuthenticationName, "m1")]);
        assert!(t.matches_topic("m/m1.f1/t", &v));
        assert!(!t.matches_topic("m/m2.f1/t", &v));
        assert!(!t.matches_topic("m/m1.f1x/t", &v));
        assert!(!t.matches_topic("m/m1/t", &v));
    }

    #[test]
    fn dollar_without_brace_is_literal_in_event_grid() {
        let t = Template::parse("$SYS/x", Dialect::EventGrid).expect("valid");
        assert!(t.matches_topic("$SYS/x", &none()));
    }

    #[test]
    fn unsafe_values_make_a_template_unusable() {
        let t = Template::parse("d/{principal.clientId}/#", Dialect::IotOperations).expect("ok");
        for bad in ["", "+", "#", "a/b", "$SYS", "a\0"] {
            let v = vars(&[(Var::ClientId, bad)]);
            assert!(
                matches!(t.usable(&v), Err(Unusable::Unsafe(Var::ClientId, _))),
                "{bad:?}"
            );
        }
        assert_eq!(
            t.usable(&none()),
            Err(Unusable::Missing(Var::ClientId)),
            "missing variable"
        );
        assert_eq!(t.usable(&vars(&[(Var::ClientId, "c1")])), Ok(()));
    }

    #[test]
    fn covers_filter_never_widens() {
        let v = none();
        let t = |s: &str| Template::parse(s, Dialect::EventGrid).expect("valid");
        assert!(t("a/#").covers_filter("a/#", &v));
        assert!(t("a/#").covers_filter("a", &v));
        assert!(t("a/#").covers_filter("a/+/c", &v));
        assert!(t("a/+").covers_filter("a/b", &v));
        assert!(t("a/+").covers_filter("a/+", &v));
        assert!(!t("a/+").covers_filter("a/#", &v));
        assert!(!t("a/b").covers_filter("a/+", &v));
        assert!(!t("a/+/#").covers_filter("a/#", &v));
        assert!(!t("a").covers_filter("a/b", &v));
        assert!(!t("a/b").covers_filter("a", &v));
        assert!(t("#").covers_filter("#", &v));
        assert!(!t("#").covers_filter("$SYS/#", &v));
        assert!(!t("+/#").covers_filter("$SYS/x", &v));
        assert!(t("$SYS/#").covers_filter("$SYS/x", &v));
    }

    #[test]
    fn client_id_patterns_glob_with_variables() {
        let p = ClientIdPattern::parse("{principal.attributes.building}*").expect("valid");
        let v = vars(&[(Var::PrincipalAttribute("building".into()), "b22")]);
        assert!(p.matches("b22-sensor", &v));
        assert!(p.matches("b22", &v));
        assert!(!p.matches("b23-sensor", &v));
        let p = ClientIdPattern::parse("a*b*c").expect("valid");
        assert!(p.matches("abc", &none()));
        assert!(p.matches("a-b-b-c", &none()));
        assert!(!p.matches("ac", &none()));
        assert!(!p.matches("abcx", &none()));
        let p = ClientIdPattern::parse("ab*ba").expect("valid");
        assert!(
            !p.matches("aba", &none()),
            "prefix and suffix must not overlap"
        );
        let p = ClientIdPattern::parse("exact").expect("valid");
        assert!(p.matches("exact", &none()));
        assert!(!p.matches("exactly", &none()));
    }
}
