//! The subscription index and the retained-message store.
//!
//! Data flow for one inbound PUBLISH (see also `conn`):
//!
//! 1. The publisher's connection task decodes the packet and checks it (ACL, limits, aliases).
//! 2. It takes the index's **read** lock, walks the trie for the topic and copies the matching
//!    subscribers (cheap `Arc` clones) into a reused vector, merging overlapping subscriptions of
//!    one client per [MQTT-3.3.5-1] (highest QoS, every Subscription Identifier) and picking one
//!    member per shared group (round-robin through an atomic counter, preferring connected
//!    members). The lock is released before any delivery.
//! 3. For each match it locks that subscriber's session (a short, per-client lock), runs the
//!    session state machine, encodes what it says to send into that connection's outbox and wakes
//!    the connection's writer task. Persistent sessions also submit their store writes there.
//! 4. The publisher awaits the store commits (if any) before sending PUBACK/PUBREC, while it stops
//!    reading from its socket: that is the backpressure on publishers.
//!
//! No lock is held across an `.await`; SUBSCRIBE/UNSUBSCRIBE take the write lock briefly.
//! The trie is generic over the subscriber key so it is unit-tested without sessions.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

use meridian_codec::QoS;

/// What a subscription asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// One subscriber to deliver to, after merging overlapping subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<K> {
    pub key: K,
    pub qos: QoS,
    pub retain_as_published: bool,
    pub subscription_ids: Vec<u32>,
    /// `Some(full filter)` when delivered through a shared subscription.
    pub shared: Option<String>,
}

#[derive(Debug)]
struct SharedGroup<K> {
    name: String,
    /// The full `$share/{group}/{filter}` text, named in deliveries.
    full: String,
    members: Vec<(K, SubOptions)>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Node<K> {
    children: HashMap<String, Node<K>>,
    subs: Vec<(K, SubOptions)>,
    shared: Vec<SharedGroup<K>>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            subs: Vec::new(),
            shared: Vec::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subs.is_empty() && self.shared.is_empty()
    }
}

/// The subscription trie: one node per topic level; `+` and `#` are ordinary child names.
#[derive(Debug)]
pub struct Router<K> {
    root: Node<K>,
    count: usize,
}

impl<K> Default for Router<K> {
    fn default() -> Self {
        Router {
            root: Node::default(),
            count: 0,
        }
    }
}

/// Split `$share/{group}/{filter}`.
pub fn split_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    if group.is_empty() || inner.is_empty() {
        return None;
    }
    Some((group, inner))
}

/// Does a (non-shared) filter match a topic name? Leading wildcards never match `$` topics
/// ([MQTT-4.7.2-1]).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Does ACL filter `outer` allow everything filter `inner` could match?
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl<K: Clone + Eq + Hash> Router<K> {
    pub fn new() -> Self {
        Router::default()
    }

    /// Number of subscriptions (shared memberships included).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Add or replace a subscription; returns true when it already existed.
    pub fn subscribe(&mut self, key: K, filter: &str, opts: SubOptions) -> bool {
        let (group, inner) = match split_shared(filter) {
            Some((g, f)) => (Some(g), f),
            None => (None, filter),
        };
        let mut node = &mut self.root;
        for level in inner.split('/') {
            node = node.children.entry(level.to_string()).or_default();
        }
        let list = match group {
            None => &mut node.subs,
            Some(g) => {
                let idx = match node.shared.iter().position(|s| s.name == g) {
                    Some(i) => i,
                    None => {
                        node.shared.push(SharedGroup {
                            name: g.to_string(),
                            full: filter.to_string(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.shared.len() - 1
                    }
                };
                &mut node.shared[idx].members
            }
        };
        if let Some(slot) = list.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = opts;
            true
        } else {
            list.push((key, opts));
            self.count += 1;
            false
        }
    }

    /// Remove a subscription; returns true when it existed.
    pub fn unsubscribe(&mut self, key: &K, filter: &str) -> bool {
        let (group, inner) = match split_shared(filter) {
            Some((g, f)) => (Some(g), f),
            None => (None, filter),
        };
        let levels: Vec<&str> = inner.split('/').collect();
        let removed = remove_rec(&mut self.root, &levels, group, key);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// The members of a shared group other than `except`, for redelivering a leaving member's
    /// messages; picks the next one round-robin, preferring connected members.
    pub fn pick_shared(
        &self,
        filter: &str,
        except: &K,
        online: impl Fn(&K) -> bool,
    ) -> Option<(K, SubOptions)> {
        let (group, inner) = split_shared(filter)?;
        let mut node = &self.root;
        for level in inner.split('/') {
            node = node.children.get(level)?;
        }
        let g = node.shared.iter().find(|s| s.name == group)?;
        pick_member(g, Some(except), &online)
    }

    /// Collect the subscribers of `topic` into `out` (cleared first). `publisher` is the sending
    /// client's key, for No Local.
    pub fn matches(
        &self,
        topic: &str,
        publisher: Option<&K>,
        online: impl Fn(&K) -> bool,
        out: &mut Vec<Match<K>>,
    ) {
        out.clear();
        let dollar = topic.starts_with('$');
        // Subscribers of one node are unique, so only nodes after the first need the merge
        // search; the common case (every subscriber on one filter) pays nothing for it.
        let mut merge_from: Option<usize> = None;
        collect(&self.root, topic, true, dollar, &mut |node: &Node<K>| {
            let search_upto = merge_from.unwrap_or(0);
            if !node.subs.is_empty() {
                let start_len = out.len();
                for (key, opts) in &node.subs {
                    if opts.no_local && publisher == Some(key) {
                        continue;
                    }
                    let existing = if merge_from.is_some() {
                        out[..search_upto.max(start_len)]
                            .iter_mut()
                            .find(|m| m.shared.is_none() && m.key == *key)
                    } else {
                        None
                    };
                    if let Some(m) = existing {
                        m.qos = m.qos.max(opts.qos);
                        m.retain_as_published |= opts.retain_as_published;
                        if let Some(id) = opts.subscription_id {
                            m.subscription_ids.push(id);
                        }
                    } else {
                        out.push(Match {
                            key: key.clone(),
                            qos: opts.qos,
                            retain_as_published: opts.retain_as_published,
                            subscription_ids: opts.subscription_id.into_iter().collect(),
                            shared: None,
                        });
                    }
                }
                merge_from = Some(out.len());
            }
            for group in &node.shared {
                if let Some((key, opts)) = pick_member(group, None, &online) {
                    out.push(Match {
                        key,
                        qos: opts.qos,
                        retain_as_published: opts.retain_as_published,
                        subscription_ids: opts.subscription_id.into_iter().collect(),
                        shared: Some(group.full.clone()),
                    });
                }
            }
        });
    }
}

fn pick_member<K: Clone + Eq>(
    g: &SharedGroup<K>,
    except: Option<&K>,
    online: &impl Fn(&K) -> bool,
) -> Option<(K, SubOptions)> {
    let n = g.members.len();
    if n == 0 {
        return None;
    }
    let start = g.next.fetch_add(1, Ordering::Relaxed);
    let candidates = || {
        (0..n)
            .map(move |i| &g.members[(start + i) % n])
            .filter(|(k, _)| Some(k) != except)
    };
    candidates()
        .find(|(k, _)| online(k))
        .or_else(|| candidates().next())
        .cloned()
}

fn remove_rec<K: Eq>(node: &mut Node<K>, levels: &[&str], group: Option<&str>, key: &K) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => {
                let before = node.subs.len();
                node.subs.retain(|(k, _)| k != key);
                before != node.subs.len()
            }
            Some(g) => {
                let Some(idx) = node.shared.iter().position(|s| s.name == g) else {
                    return false;
                };
                let members = &mut node.shared[idx].members;
                let before = members.len();
                members.retain(|(k, _)| k != key);
                let removed = before != members.len();
                if members.is_empty() {
                    node.shared.remove(idx);
                }
                removed
            }
        };
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_rec(child, rest, group, key);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

/// Walk the trie for one topic (`first`: at the root level, where the `$` rule applies),
/// calling `visit` for every node whose filter matches.
fn collect<'a, K>(
    node: &'a Node<K>,
    rest: &str,
    first: bool,
    dollar: bool,
    visit: &mut dyn FnMut(&'a Node<K>),
) {
    let (level, tail) = match rest.split_once('/') {
        Some((l, t)) => (l, Some(t)),
        None => (rest, None),
    };
    let wild_ok = !(first && dollar);
    // `#` matches this level and everything below, including the parent level itself.
    if wild_ok && let Some(hash) = node.children.get("#") {
        visit(hash);
    }
    let step = |child: &'a Node<K>, visit: &mut dyn FnMut(&'a Node<K>)| match tail {
        Some(t) => collect(child, t, false, dollar, visit),
        None => {
            visit(child);
            if let Some(hash) = child.children.get("#") {
                visit(hash);
            }
        }
    };
    if let Some(child) = node.children.get(level) {
        step(child, visit);
    }
    if wild_ok && let Some(child) = node.children.get("+") {
        step(child, visit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }

    fn keys(r: &Router<String>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        r.matches(topic, None, |_| true, &mut out);
        let mut k: Vec<String> = out.into_iter().map(|m| m.key).collect();
        k.sort();
        k
    }

    #[test]
    fn wildcards_match_per_mqtt_4_7() {
        let mut r = Router::new();
        r.subscribe("a".to_string(), "s/+/t", opts(QoS::AtMostOnce));
        r.subscribe("b".to_string(), "s/#", opts(QoS::AtMostOnce));
        r.subscribe("c".to_string(), "#", opts(QoS::AtMostOnce));
        r.subscribe("d".to_string(), "s/x/t", opts(QoS::AtMostOnce));
        assert_eq!(keys(&r, "s/x/t"), ["a", "b", "c", "d"]);
        assert_eq!(keys(&r, "s"), ["b", "c"]);
        assert_eq!(keys(&r, "s/x/t/u"), ["b", "c"]);
        assert_eq!(keys(&r, "other"), ["c"]);
    }

    #[test]
    fn mqtt_4_7_2_1_leading_wildcards_skip_dollar_topics() {
        let mut r = Router::new();
        r.subscribe("all".to_string(), "#", opts(QoS::AtMostOnce));
        r.subscribe("plus".to_string(), "+/broker", opts(QoS::AtMostOnce));
        r.subscribe("sys".to_string(), "$SYS/#", opts(QoS::AtMostOnce));
        assert_eq!(keys(&r, "$SYS/broker"), ["sys"]);
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(topic_matches("$SYS/+", "$SYS/x"));
    }

    #[test]
    fn mqtt_3_3_5_1_overlapping_subscriptions_merge() {
        let mut r = Router::new();
        let mut o1 = opts(QoS::AtMostOnce);
        o1.subscription_id = Some(1);
        let mut o2 = opts(QoS::ExactlyOnce);
        o2.subscription_id = Some(2);
        r.subscribe("a".to_string(), "x/+", o1);
        r.subscribe("a".to_string(), "x/#", o2);
        let mut out = Vec::new();
        r.matches("x/y", None, |_| true, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].qos, QoS::ExactlyOnce);
        let mut ids = out[0].subscription_ids.clone();
        ids.sort();
        assert_eq!(ids, [1, 2]);
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let mut r = Router::new();
        let mut o = opts(QoS::AtLeastOnce);
        o.no_local = true;
        r.subscribe("a".to_string(), "t", o);
        r.subscribe("b".to_string(), "t", opts(QoS::AtLeastOnce));
        let mut out = Vec::new();
        r.matches("t", Some(&"a".to_string()), |_| true, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, "b");
    }

    #[test]
    fn shared_groups_round_robin_and_prefer_online() {
        let mut r = Router::new();
        r.subscribe("a".to_string(), "$share/g/t/+", opts(QoS::AtLeastOnce));
        r.subscribe("b".to_string(), "$share/g/t/+", opts(QoS::AtLeastOnce));
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for _ in 0..4 {
            r.matches("t/1", None, |_| true, &mut out);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].shared.as_deref(), Some("$share/g/t/+"));
            seen.push(out[0].key.clone());
        }
        assert_eq!(seen.iter().filter(|k| *k == "a").count(), 2);
        for _ in 0..3 {
            r.matches("t/1", None, |k| k == "b", &mut out);
            assert_eq!(out[0].key, "b");
        }
        let other = r.pick_shared("$share/g/t/+", &"b".to_string(), |_| true);
        assert_eq!(other.unwrap().0, "a");
        assert!(r.unsubscribe(&"a".to_string(), "$share/g/t/+"));
        assert!(
            r.pick_shared("$share/g/t/+", &"b".to_string(), |_| true)
                .is_none()
        );
    }

    #[test]
    fn unsubscribe_prunes_and_counts() {
        let mut r = Router::new();
        assert!(!r.subscribe("a".to_string(), "x/y", opts(QoS::AtMostOnce)));
        assert!(r.subscribe("a".to_string(), "x/y", opts(QoS::AtLeastOnce)));
        assert_eq!(r.len(), 1);
        assert!(r.unsubscribe(&"a".to_string(), "x/y"));
        assert!(!r.unsubscribe(&"a".to_string(), "x/y"));
        assert!(r.is_empty());
        assert!(r.root.is_empty());
    }

    #[test]
    fn filter_cover_rules() {
        assert!(filter_covers("a/#", "a/+/b"));
        assert!(filter_covers("a/+", "a/+"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/b", "a/+"));
    }
}
