//! Topic names and filters: validation, matching and the `$share/{group}/{filter}` syntax.

use crate::DecodeError;

/// Validate a PUBLISH topic name: non-empty, no wildcards ([MQTT-3.3.2-2]), no U+0000.
pub fn validate_topic_name(_topic: &str) -> Result<(), DecodeError> {
    unimplemented!("codec: validate_topic_name")
}

/// Validate a SUBSCRIBE/UNSUBSCRIBE filter: wildcard placement ([MQTT-4.7.1-1], [MQTT-4.7.1-2]) and
/// a well-formed `$share/{group}/{filter}` ([MQTT-4.8.2-1], [MQTT-4.8.2-2]).
pub fn validate_topic_filter(_filter: &str) -> Result<(), DecodeError> {
    unimplemented!("codec: validate_topic_filter")
}

/// Split `$share/{group}/{filter}` into `(group, filter)`; `None` for a non-shared filter.
pub fn parse_shared(_filter: &str) -> Option<(&str, &str)> {
    unimplemented!("codec: parse_shared")
}

/// Does `filter` (not shared) match `topic`? A leading wildcard never matches a `$` topic
/// ([MQTT-4.7.2-1]).
pub fn matches(_filter: &str, _topic: &str) -> bool {
    unimplemented!("codec: matches")
}
