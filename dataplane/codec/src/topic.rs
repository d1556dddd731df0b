//! Topic names and filters: validation, matching and the `$share/{group}/{filter}` syntax.
//!
//! Only the syntax rules of the specification live here; limits such as topic length or level count
//! are broker policy and are enforced by the broker.

use crate::{DecodeError, ReasonCode};

const SHARE_PREFIX: &str = "$share/";

/// Validate a PUBLISH topic name: non-empty, no wildcards ([MQTT-3.3.2-2]), no U+0000.
pub fn validate_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        return Err(DecodeError::violation(
            "[MQTT-4.7.3-1]",
            ReasonCode::TOPIC_NAME_INVALID,
            "topic name is empty",
        ));
    }
    let bytes = topic.as_bytes();
    if bytes.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(DecodeError::violation(
            "[MQTT-3.3.2-2]",
            ReasonCode::TOPIC_NAME_INVALID,
            format!("topic name {topic:?} contains a wildcard"),
        ));
    }
    if bytes.contains(&0) {
        return Err(DecodeError::malformed(
            "[MQTT-1.5.4-2]",
            "topic name contains U+0000",
        ));
    }
    Ok(())
}

/// Validate a SUBSCRIBE/UNSUBSCRIBE filter: wildcard placement ([MQTT-4.7.1-1], [MQTT-4.7.1-2]) and
/// a well-formed `$share/{group}/{filter}` ([MQTT-4.8.2-1], [MQTT-4.8.2-2]).
pub fn validate_topic_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.as_bytes().contains(&0) {
        return Err(DecodeError::malformed(
            "[MQTT-1.5.4-2]",
            "topic filter contains U+0000",
        ));
    }
    match filter.strip_prefix(SHARE_PREFIX) {
        Some(rest) => {
            let (group, inner) = match rest.split_once('/') {
                Some(parts) => parts,
                None => (rest, ""),
            };
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(filter_invalid(
                    "[MQTT-4.8.2-1]",
                    format!("share name {group:?} is empty or contains a wildcard"),
                ));
            }
            if inner.is_empty() {
                return Err(filter_invalid(
                    "[MQTT-4.8.2-2]",
                    "shared subscription has no topic filter after the share name",
                ));
            }
            validate_plain_filter(inner)
        }
        None => validate_plain_filter(filter),
    }
}

fn filter_invalid(clause: &'static str, message: impl Into<String>) -> DecodeError {
    DecodeError::violation(clause, ReasonCode::TOPIC_FILTER_INVALID, message)
}

fn validate_plain_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(filter_invalid("[MQTT-4.7.3-1]", "topic filter is empty"));
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(filter_invalid(
                "[MQTT-4.7.1-1]",
                format!("'#' must be a whole, last level in {filter:?}"),
            ));
        }
        if level.contains('+') && level != "+" {
            return Err(filter_invalid(
                "[MQTT-4.7.1-2]",
                format!("'+' must be a whole level in {filter:?}"),
            ));
        }
    }
    Ok(())
}

/// Split `$share/{group}/{filter}` into `(group, filter)`; `None` for a non-shared filter.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix(SHARE_PREFIX)?.split_once('/')
}

/// Does `filter` (not shared) match `topic`? A leading wildcard never matches a `$` topic
/// ([MQTT-4.7.2-1]).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            // "a/#" also matches "a": the multi-level wildcard includes the parent level.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_rules() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("+", "a/b"));
        assert!(!matches("#", "$SYS/uptime"));
        assert!(!matches("+/uptime", "$SYS/uptime"));
        assert!(matches("$SYS/#", "$SYS/uptime"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn filter_validation() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "$share/g/a/#",
            "$share",
        ] {
            assert!(validate_topic_filter(ok).is_ok(), "{ok}");
        }
        for (bad, clause) in [
            ("", "[MQTT-4.7.3-1]"),
            ("a#", "[MQTT-4.7.1-1]"),
            ("#/a", "[MQTT-4.7.1-1]"),
            ("a+/b", "[MQTT-4.7.1-2]"),
            ("$share/", "[MQTT-4.8.2-1]"),
            ("$share//a", "[MQTT-4.8.2-1]"),
            ("$share/g+/a", "[MQTT-4.8.2-1]"),
            ("$share/g", "[MQTT-4.8.2-2]"),
            ("$share/g/", "[MQTT-4.8.2-2]"),
        ] {
            let err = validate_topic_filter(bad).unwrap_err();
            assert_eq!(err.clause(), clause, "{bad:?}");
        }
        assert_eq!(parse_shared("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(parse_shared("a/b"), None);
    }

    #[test]
    fn shared_subscription_filter_matches_through_parse_shared() {
        let (group, inner) = parse_shared("$share/workers/jobs/+").unwrap();
        assert_eq!(group, "workers");
        assert!(matches(inner, "jobs/1"));
        assert!(!matches(inner, "jobs/1/x"));
    }

    #[test]
    fn name_validation() {
        assert!(validate_topic_name("a/b").is_ok());
        assert_eq!(
            validate_topic_name("a/+").unwrap_err().clause(),
            "[MQTT-3.3.2-2]"
        );
        assert_eq!(
            validate_topic_name("#").unwrap_err().clause(),
            "[MQTT-3.3.2-2]"
        );
        assert_eq!(
            validate_topic_name("").unwrap_err().clause(),
            "[MQTT-4.7.3-1]"
        );
    }
}
