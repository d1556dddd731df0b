//! Event Grid namespaces as isolated tenants of one node: their own client identifiers and their
//! own topic tree, on the same router, retained store and session store as everyone else.
//!
//! A namespace client's names are rewritten at the edge of its connection, after authorization
//! has judged the names the client sent:
//! - **Sessions** are keyed `"{namespace}\0{clientId}"`, so client `dev1` of namespace A and
//!   client `dev1` of namespace B are two sessions (no takeover, no shared queue).
//! - **Topics and filters** get the prefix `"$\0{namespace}/"`: `t/x` published in namespace A is
//!   routed and retained as `$\0A/t/x`; `$share/g/t/#` becomes `$share/g/$\0A/t/#`. Outbound
//!   PUBLISHes lose the prefix again just before they are built, so clients only ever see their
//!   own names.
//!
//! **Invariant: no client can name another tenant's topic.** MQTT forbids U+0000 in every UTF-8
//! string ([MQTT-1.5.4-2], enforced by the codec), so no client id, topic or filter a client sends
//! can contain the separator; and the prefix starts with `$`, so a leading wildcard (`#`, `+/...`)
//! of a client outside the namespace never matches a tenant topic ([MQTT-4.7.2-1]).

use std::borrow::Cow;

/// The session key of client `client_id` of namespace `namespace`.
pub(crate) fn session_key(namespace: &str, client_id: &str) -> String {
    format!("{namespace}\0{client_id}")
}

/// The namespace a session key belongs to (`None` for clients outside any namespace).
pub(crate) fn namespace_of_key(key: &str) -> Option<&str> {
    key.split_once('\0').map(|(ns, _)| ns)
}

/// The topic prefix of `namespace`'s tree.
pub(crate) fn prefix(namespace: &str) -> String {
    format!("$\0{namespace}/")
}

/// Length of the topic prefix the session with `key` sees its topics under (0 outside a
/// namespace): outbound PUBLISHes drop that many bytes of the topic.
pub(crate) fn prefix_len_of_key(key: &str) -> usize {
    namespace_of_key(key).map_or(0, |ns| ns.len() + 3)
}

/// `topic` (or a non-shared filter) as routed inside `namespace`.
pub(crate) fn internal(namespace: &str, topic: &str) -> String {
    let mut s = prefix(namespace);
    s.push_str(topic);
    s
}

/// A subscription filter as routed inside `namespace`; a shared subscription keeps its
/// `$share/{group}/` in front, so the group is per tenant too.
pub(crate) fn internal_filter(namespace: &str, filter: &str) -> String {
    match filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((group, f)) => format!("$share/{group}/{}", internal(namespace, f)),
        None => internal(namespace, filter),
    }
}

/// The name a client sent, from a topic or filter in any tenant's tree (unchanged outside one).
pub(crate) fn visible(name: &str) -> Cow<'_, str> {
    if let Some(rest) = name.strip_prefix("$\0") {
        return Cow::Borrowed(rest.split_once('/').map_or("", |(_, t)| t));
    }
    if let Some(rest) = name.strip_prefix("$share/")
        && let Some((group, f)) = rest.split_once('/')
        && f.starts_with("$\0")
    {
        return Cow::Owned(format!("$share/{group}/{}", visible(f)));
    }
    Cow::Borrowed(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_a_tenant() {
        assert_eq!(internal("nsa", "t/x"), "$\0nsa/t/x");
        assert_eq!(visible(&internal("nsa", "t/x")), "t/x");
        assert_eq!(
            internal_filter("nsa", "$share/g/t/#"),
            "$share/g/$\0nsa/t/#"
        );
        assert_eq!(
            visible(&internal_filter("nsa", "$share/g/t/#")),
            "$share/g/t/#"
        );
        assert_eq!(visible("$share/g/t/#"), "$share/g/t/#");
        assert_eq!(visible("$SYS/x"), "$SYS/x");
        assert_eq!(visible("plain/topic"), "plain/topic");
        let key = session_key("nsa", "dev1");
        assert_eq!(namespace_of_key(&key), Some("nsa"));
        assert_eq!(namespace_of_key("dev1"), None);
        assert_eq!(prefix_len_of_key(&key), prefix("nsa").len());
        assert_eq!(prefix_len_of_key("dev1"), 0);
    }

    #[test]
    fn a_tenant_topic_is_out_of_reach_of_leading_wildcards_and_other_tenants() {
        let t = internal("nsa", "t/x");
        for outside in ["#", "+/#", "+/t/x"] {
            assert!(!crate::router::topic_matches(outside, &t), "{outside}");
        }
        assert!(!crate::router::topic_matches(
            &internal_filter("nsb", "#"),
            &t
        ));
        assert!(crate::router::topic_matches(
            &internal_filter("nsa", "#"),
            &t
        ));
        assert!(crate::router::topic_matches(
            &internal_filter("nsa", "t/+"),
            &t
        ));
    }
}
