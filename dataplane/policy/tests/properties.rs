//! Property tests: a granted SUBSCRIBE filter never matches a topic that the topic-level checks
//! deny, publish decisions agree with an independent oracle (naive substitution of safe values,
//! then plain MQTT matching), and `explain` always reaches the fast path's decision.
//!
//! Topics are enumerated exhaustively over a small alphabet (including `$s` and the empty level),
//! so "every topic the filter matches" is checked for real within that universe.

use meridian_policy::topic::filter_matches;
use meridian_policy::{Action, PolicyEngine, PolicyModel, Principal};
use proptest::prelude::*;
use serde_json::json;

const TOPIC_LEVELS: [&str; 4] = ["a", "b", "$s", ""];

fn all_topics() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut frontier: Vec<String> = TOPIC_LEVELS.iter().map(|s| s.to_string()).collect();
    for _ in 0..4 {
        out.extend(frontier.iter().cloned());
        frontier = frontier
            .iter()
            .flat_map(|t| TOPIC_LEVELS.iter().map(move |l| format!("{t}/{l}")))
            .collect();
    }
    // A topic name is never empty (MQTT 5.0 4.7.3), though its levels may be.
    out.retain(|t| !t.is_empty());
    out
}

/// A topic filter (no variables) of 1..=3 levels over the alphabet, maybe ending in `#`.
fn filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("a"), Just("b"), Just("$s"), Just(""), Just("+")];
    (
        prop::collection::vec(level, 1..=3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(levels, hash, only_hash)| {
            if only_hash {
                return "#".to_string();
            }
            let mut s = levels.join("/");
            if hash {
                s.push_str("/#");
            }
            s
        })
}

/// A template in the given variable spelling.
fn template(var: &'static str) -> impl Strategy<Value = String> {
    let level = prop_oneof![
        Just("a"),
        Just("b"),
        Just("$s"),
        Just("+"),
        Just(var),
        Just(var),
    ];
    (
        prop::collection::vec(level, 1..=3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(levels, hash, only_hash)| {
            if only_hash {
                return "#".to_string();
            }
            let mut s = levels.join("/");
            if hash {
                s.push_str("/#");
            }
            s
        })
}

fn identity() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a"),
        Just("b"),
        Just("$s"),
        Just("+"),
        Just("#"),
        Just("a/b"),
        Just(""),
    ]
    .prop_map(String::from)
}

fn safe(value: &str) -> bool {
    !value.is_empty() && !value.contains(['+', '#', '/', '$'])
}

/// Which topics the templates allow for this identity, computed without the engine.
fn oracle(templates: &[String], var: &str, value: &str, topic: &str) -> bool {
    templates.iter().any(|t| {
        if t.contains(var) {
            safe(value) && filter_matches(&t.replace(var, value), topic)
        } else {
            filter_matches(t, topic)
        }
    })
}

fn check(
    engine: &PolicyEngine,
    p: &Principal,
    templates: &[String],
    var: &str,
    value: &str,
    filter: &str,
) -> Result<(), TestCaseError> {
    let topics = all_topics();
    for t in &topics {
        let expected = oracle(templates, var, value, t);
        prop_assert_eq!(engine.publish(p, t).allowed, expected, "publish {}", t);
        prop_assert_eq!(
            engine.subscribe(p, t).allowed,
            expected,
            "subscribe to the exact topic {}",
            t
        );
    }
    let granted = engine.subscribe(p, filter);
    if granted.allowed {
        for t in topics.iter().filter(|t| filter_matches(filter, t)) {
            prop_assert!(
                engine.subscribe(p, t).allowed && engine.publish(p, t).allowed,
                "filter {} granted by {:?} matches {} which is denied",
                filter,
                granted.by,
                t
            );
        }
    }
    let shared = engine.subscribe(p, &format!("$share/g/{filter}"));
    prop_assert_eq!(
        shared.allowed,
        granted.allowed,
        "$share is judged on its filter"
    );
    for (action, topic) in [(Action::Subscribe, filter), (Action::Publish, filter)] {
        let fast = match action {
            Action::Subscribe => engine.subscribe(p, topic),
            _ => engine.publish(p, topic),
        };
        prop_assert_eq!(engine.explain(p, action, topic).decision, fast);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn iot_operations_grants_are_sound(
        templates in prop::collection::vec(template("{principal.clientId}"), 1..=3),
        client_id in identity(),
        filter in filter(),
    ) {
        let model: PolicyModel = serde_json::from_value(json!({"iotOperations": [{
            "name": "p",
            "rules": [{
                "principals": {"usernames": ["u"]},
                "brokerResources": [
                    {"method": "Publish", "topics": templates},
                    {"method": "Subscribe", "topics": templates}
                ]
            }]
        }]})).expect("model");
        let engine = PolicyEngine::compile(&model).expect("compiles");
        let p = Principal::new(client_id.clone()).with_username("u");
        check(&engine, &p, &templates, "{principal.clientId}", &client_id, &filter)?;
    }

    #[test]
    fn event_grid_grants_are_sound(
        templates in prop::collection::vec(template("${client.authenticationName}"), 1..=3),
        name in identity().prop_filter("registry names are non-empty", |n| !n.is_empty()),
        filter in filter(),
    ) {
        let model: PolicyModel = serde_json::from_value(json!({"eventGrid": [{
            "name": "ns",
            "clients": [{"name": "c", "authenticationName": name}],
            "topicSpaces": [{"name": "ts", "topicTemplates": templates}],
            "permissionBindings": [
                {"name": "pub", "clientGroupName": "$all", "topicSpaceName": "ts", "permission": "Publisher"},
                {"name": "sub", "clientGroupName": "$all", "topicSpaceName": "ts", "permission": "Subscriber"}
            ]
        }]})).expect("model");
        let engine = PolicyEngine::compile(&model).expect("compiles");
        let p = Principal::new("any").in_namespace("ns", name.clone());
        check(&engine, &p, &templates, "${client.authenticationName}", &name, &filter)?;
    }
}
