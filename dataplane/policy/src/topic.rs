//! MQTT topic names and topic filters as the policy engine sees them: validation, shared
//! subscription unwrapping, and plain filter matching.
//!
//! These are the MQTT 5.0 rules (section 4.7) restated for authorization: a topic name has no
//! wildcards; in a filter `+` and `#` fill a whole level and `#` is last; a filter whose first
//! level is a wildcard never matches a topic that starts with `$` [MQTT-4.7.2-1]. Nothing here
//! allocates.

/// Why a topic name or filter is refused before any rule is looked at.
pub(crate) const EMPTY: &str = "empty topic";
pub(crate) const WILDCARD_IN_TOPIC: &str = "a topic name must not contain '+' or '#'";
pub(crate) const NUL_IN_TOPIC: &str = "a topic must not contain U+0000";
pub(crate) const BAD_PLUS: &str = "'+' must fill a whole topic level";
pub(crate) const BAD_HASH: &str = "'#' must fill the last topic level";
pub(crate) const BAD_SHARE: &str =
    "a shared subscription is $share/{group}/{filter} with a non-empty group free of '+' and '#'";

/// Checks a topic name (what PUBLISH carries).
pub fn validate_topic_name(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err(EMPTY);
    }
    if topic.contains('\0') {
        return Err(NUL_IN_TOPIC);
    }
    if topic.contains(['+', '#']) {
        return Err(WILDCARD_IN_TOPIC);
    }
    Ok(())
}

/// Checks a topic filter (what SUBSCRIBE carries, after `$share/{group}/` was removed).
pub fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err(EMPTY);
    }
    if filter.contains('\0') {
        return Err(NUL_IN_TOPIC);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(BAD_HASH);
        }
        if level.contains('+') && level != "+" {
            return Err(BAD_PLUS);
        }
    }
    Ok(())
}

/// Splits `$share/{group}/{filter}` into its group and filter; any other filter comes back
/// unchanged with no group. Authorization always looks at the inner filter: the share group
/// name never widens or narrows what a client may read.
pub fn split_shared(filter: &str) -> Result<(Option<&str>, &str), &'static str> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        if filter == "$share" {
            return Err(BAD_SHARE);
        }
        return Ok((None, filter));
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Err(BAD_SHARE);
    };
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return Err(BAD_SHARE);
    }
    Ok((Some(group), inner))
}

/// Whether `filter` matches the topic name `topic` under MQTT rules, including the `$` rule.
/// Both are assumed valid (see [`validate_filter`] and [`validate_topic_name`]).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !(first && topic.starts_with('$')),
            (Some("+"), Some(_)) => {
                if first && topic.starts_with('$') {
                    return false;
                }
            }
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_refuse_wildcards_and_empty() {
        assert_eq!(validate_topic_name("a/b"), Ok(()));
        assert_eq!(validate_topic_name("a//b"), Ok(()));
        assert_eq!(validate_topic_name(""), Err(EMPTY));
        assert_eq!(validate_topic_name("a/+"), Err(WILDCARD_IN_TOPIC));
        assert_eq!(validate_topic_name("a/#"), Err(WILDCARD_IN_TOPIC));
        assert_eq!(validate_topic_name("a\0b"), Err(NUL_IN_TOPIC));
    }

    #[test]
    fn filters_place_wildcards_on_whole_levels() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "$SYS/#", "a//#"] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_filter("a/#/b"), Err(BAD_HASH));
        assert_eq!(validate_filter("a#"), Err(BAD_HASH));
        assert_eq!(validate_filter("a+/b"), Err(BAD_PLUS));
        assert_eq!(validate_filter(""), Err(EMPTY));
    }

    #[test]
    fn shared_subscriptions_unwrap_to_their_filter() {
        assert_eq!(split_shared("$share/g/a/#"), Ok((Some("g"), "a/#")));
        assert_eq!(split_shared("a/b"), Ok((None, "a/b")));
        assert_eq!(split_shared("$share/g"), Err(BAD_SHARE));
        assert_eq!(split_shared("$share//a"), Err(BAD_SHARE));
        assert_eq!(split_shared("$share/+/a"), Err(BAD_SHARE));
        assert_eq!(split_shared("$share/g/"), Err(BAD_SHARE));
        assert_eq!(split_shared("$share"), Err(BAD_SHARE));
    }

    #[test]
    fn matching_follows_mqtt_including_dollar_topics() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("+", ""));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(!filter_matches("a/b", "a"));
    }
}
