//! The engine end to end: a model written as the resources' JSON, the attack table, explanations
//! and compile errors.

use meridian_policy::{
    Action, Decision, Outcome, PolicyEngine, PolicyError, PolicyModel, Principal, RuleRef,
};
use serde_json::json;

/// IoT Operations rules plus two Event Grid namespaces, in the resources' own JSON shape.
fn model() -> PolicyModel {
    serde_json::from_value(json!({
        "iotOperations": [{
            "name": "authz",
            "rules": [
                {   // 0: a limited device
                    "principals": { "usernames": ["limited"] },
                    "brokerResources": [
                        { "method": "Connect" },
                        { "method": "Publish", "topics": ["telemetry/{principal.clientId}/#"] },
                        { "method": "Subscribe", "topics": ["commands/{principal.clientId}/+", "public/#"] }
                    ]
                },
                {   // 1: the building example of the IoT Operations docs
                    "principals": { "attributes": [{ "building": "b22" }, { "building": "b23" }] },
                    "brokerResources": [
                        { "method": "Connect", "clientIds": ["{principal.attributes.building}*"] },
                        { "method": "Publish", "topics": ["sensors/{principal.attributes.building}/{principal.clientId}/telemetry"] }
                    ]
                },
                {   // 2: a monitor that may read everything including $SYS
                    "principals": { "usernames": ["monitor"] },
                    "brokerResources": [
                        { "method": "Connect" },
                        { "method": "Subscribe", "topics": ["#", "$SYS/#"] }
                    ]
                },
                {   // 3: reads everything except $SYS (no explicit $SYS rule); 2023 spelling clientids
                    "principals": { "clientids": ["reader"] },
                    "brokerResources": [
                        { "method": "Connect" },
                        { "method": "Subscribe", "topics": ["#"] }
                    ]
                },
                {   // 4: variables from username and attributes
                    "principals": { "attributes": [{ "org": "contoso" }] },
                    "brokerResources": [
                        { "method": "Connect" },
                        { "method": "Subscribe", "topics": ["org/{principal.username}/+"] },
                        { "method": "Publish", "topics": ["site/{principal.attributes.site}/#", "{principal.clientId}/out"] }
                    ]
                },
                {   // 5: the generated-example placeholder: an empty attribute map matches no one
                    "principals": { "attributes": [{}] },
                    "brokerResources": [{ "method": "Connect" }, { "method": "Publish", "topics": ["#"] }]
                }
            ]
        }],
        "eventGrid": [
            {
                "name": "ns-a",
                "clients": [
                    { "name": "dev1", "attributes": { "type": "sensor", "floor": 3 } },
                    { "name": "dev2", "state": "Disabled", "attributes": { "type": "sensor", "floor": 3 } },
                    { "name": "mgr", "authenticationName": "manager-1", "attributes": { "type": "manager" } },
                    { "name": "evil1", "authenticationName": "a/b", "attributes": { "type": "sensor", "floor": "+" } },
                    { "name": "only-a", "attributes": { "type": "sensor", "floor": 1 } }
                ],
                "clientGroups": [
                    { "name": "sensors", "query": "attributes.type = 'sensor'" },
                    { "name": "managers", "query": "attributes.type IN ['manager', 'admin']" }
                ],
                "topicSpaces": [
                    { "name": "own-telemetry", "topicTemplates": ["devices/${client.authenticationName}/telemetry", "floors/${client.attributes.floor}/#"] },
                    { "name": "all-telemetry", "topicTemplates": ["devices/+/telemetry"] }
                ],
                "permissionBindings": [
                    { "name": "sensors-pub", "clientGroupName": "sensors", "topicSpaceName": "own-telemetry", "permission": "Publisher" },
                    { "name": "managers-sub", "clientGroupName": "managers", "topicSpaceName": "all-telemetry", "permission": "Subscriber" }
                ]
            },
            {
                "name": "ns-b",
                "clients": [{ "name": "dev1" }],
                "topicSpaces": [{ "name": "everything", "topicTemplates": ["#"] }],
                "permissionBindings": [
                    { "name": "all-pub", "clientGroupName": "$all", "topicSpaceName": "everything", "permission": "Publisher" }
                ]
            }
        ]
    }))
    .expect("model JSON")
}

fn engine() -> PolicyEngine {
    PolicyEngine::compile(&model()).expect("compiles")
}

fn limited(client_id: &str) -> Principal {
    Principal::new(client_id).with_username("limited")
}

fn eg(namespace: &str, name: &str) -> Principal {
    Principal::new(format!("mqtt-{name}")).in_namespace(namespace, name)
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Connect,
    Publish(&'static str),
    Subscribe(&'static str),
}

fn decide(e: &PolicyEngine, p: &Principal, op: Op) -> Decision {
    match op {
        Op::Connect => e.connect(p),
        Op::Publish(t) => e.publish(p, t),
        Op::Subscribe(f) => e.subscribe(p, f),
    }
}

#[test]
fn attack_table() {
    let e = engine();
    let org = |user: &str, site: &str| {
        Principal::new("org-client")
            .with_username(user)
            .with_attribute("org", "contoso")
            .with_attribute("site", site)
    };
    // (case, principal, request, allowed)
    let table: Vec<(&str, Principal, Op, bool)> = vec![
        // A limited client's own permissions, as the baseline the attacks are measured against.
        ("limited connects", limited("c1"), Op::Connect, true),
        (
            "own telemetry",
            limited("c1"),
            Op::Publish("telemetry/c1/temp"),
            true,
        ),
        (
            "own commands",
            limited("c1"),
            Op::Subscribe("commands/c1/reboot"),
            true,
        ),
        (
            "own commands, one level wildcard",
            limited("c1"),
            Op::Subscribe("commands/c1/+"),
            true,
        ),
        (
            "public tree",
            limited("c1"),
            Op::Subscribe("public/#"),
            true,
        ),
        // Wildcards never widen.
        (
            "subscribe # as a limited client",
            limited("c1"),
            Op::Subscribe("#"),
            false,
        ),
        (
            "subscribe +/# as a limited client",
            limited("c1"),
            Op::Subscribe("+/#"),
            false,
        ),
        (
            "commands of everyone",
            limited("c1"),
            Op::Subscribe("commands/+/+"),
            false,
        ),
        (
            "commands/c1/# reaches deeper levels",
            limited("c1"),
            Op::Subscribe("commands/c1/#"),
            false,
        ),
        // Shared subscriptions are judged on their filter.
        (
            "$share/x/#",
            limited("c1"),
            Op::Subscribe("$share/x/#"),
            false,
        ),
        (
            "$share/x/public/#",
            limited("c1"),
            Op::Subscribe("$share/x/public/#"),
            true,
        ),
        (
            "$share without filter",
            limited("c1"),
            Op::Subscribe("$share/x"),
            false,
        ),
        // $SYS.
        (
            "$SYS/# as a limited client",
            limited("c1"),
            Op::Subscribe("$SYS/#"),
            false,
        ),
        (
            "$SYS/# needs an explicit $SYS rule",
            Principal::new("reader"),
            Op::Subscribe("$SYS/#"),
            false,
        ),
        (
            "# rule does not reach $SYS topics",
            Principal::new("reader"),
            Op::Subscribe("$SYS/broker/load"),
            false,
        ),
        (
            "# rule reads everything else",
            Principal::new("reader"),
            Op::Subscribe("a/b/c"),
            true,
        ),
        (
            "explicit $SYS rule",
            Principal::new("m").with_username("monitor"),
            Op::Subscribe("$SYS/#"),
            true,
        ),
        (
            "$share/x/$SYS/# with explicit rule",
            Principal::new("m").with_username("monitor"),
            Op::Subscribe("$share/x/$SYS/#"),
            true,
        ),
        (
            "$share/x/$SYS/# without",
            Principal::new("reader"),
            Op::Subscribe("$share/x/$SYS/#"),
            false,
        ),
        // Publishing (and wills, retained messages) to a forbidden topic.
        (
            "publish to another client's telemetry",
            limited("c1"),
            Op::Publish("telemetry/c2/temp"),
            false,
        ),
        (
            "publish to commands",
            limited("c1"),
            Op::Publish("commands/c1/reboot"),
            false,
        ),
        (
            "publish with a wildcard",
            limited("c1"),
            Op::Publish("telemetry/c1/+"),
            false,
        ),
        (
            "publish to $SYS",
            limited("c1"),
            Op::Publish("$SYS/broker/x"),
            false,
        ),
        // Variables injected through the client id.
        (
            "client id + reads all commands",
            limited("+"),
            Op::Subscribe("commands/+/+"),
            false,
        ),
        (
            "client id + reads its literal level",
            limited("+"),
            Op::Subscribe("commands/+/x"),
            false,
        ),
        (
            "client id # reads everything",
            limited("#"),
            Op::Subscribe("commands/#"),
            false,
        ),
        (
            "client id a/b publishes deeper",
            limited("a/b"),
            Op::Publish("telemetry/a/b/x"),
            false,
        ),
        (
            "client id $SYS publishes to $SYS",
            org("u", "s1").with_client_id("$SYS"),
            Op::Publish("$SYS/out"),
            false,
        ),
        (
            "client id empty",
            limited(""),
            Op::Publish("telemetry//x"),
            false,
        ),
        (
            "client id empty reaches the empty root level",
            org("u", "s1").with_client_id(""),
            Op::Publish("/out"),
            false,
        ),
        (
            "client id honest",
            org("u", "s1"),
            Op::Publish("org-client/out"),
            true,
        ),
        // ... through the username.
        (
            "username + reads all orgs",
            org("+", "s1"),
            Op::Subscribe("org/+/+"),
            false,
        ),
        (
            "username # reads all orgs",
            org("#", "s1"),
            Op::Subscribe("org/#"),
            false,
        ),
        (
            "username honest",
            org("alice", "s1"),
            Op::Subscribe("org/alice/+"),
            true,
        ),
        (
            "username honest, not others",
            org("alice", "s1"),
            Op::Subscribe("org/bob/x"),
            false,
        ),
        // ... through attribute values.
        ("attribute +", org("u", "+"), Op::Publish("site/x/y"), false),
        (
            "attribute a/b",
            org("u", "a/b"),
            Op::Publish("site/a/b/c"),
            false,
        ),
        (
            "attribute $SYS",
            org("u", "$SYS"),
            Op::Publish("site/$SYS/x"),
            false,
        ),
        (
            "attribute honest",
            org("u", "s1"),
            Op::Publish("site/s1/x"),
            true,
        ),
        // Principals: OR of lists; empty attribute maps match no one; no rule, no access.
        (
            "building client id pattern",
            Principal::new("b22-fan").with_attribute("building", "b22"),
            Op::Connect,
            true,
        ),
        (
            "building client id of another building",
            Principal::new("b23-fan").with_attribute("building", "b22"),
            Op::Connect,
            false,
        ),
        (
            "building attribute injected into the client id pattern",
            Principal::new("x").with_attribute("building", "b22*"),
            Op::Connect,
            false,
        ),
        (
            "nobody matches an empty attribute map",
            Principal::new("x").with_attribute("any", "thing"),
            Op::Publish("a"),
            false,
        ),
        (
            "unknown client connects",
            Principal::new("stranger"),
            Op::Connect,
            false,
        ),
        // Event Grid: registry, groups, templates.
        ("eg client connects", eg("ns-a", "dev1"), Op::Connect, true),
        (
            "eg own telemetry",
            eg("ns-a", "dev1"),
            Op::Publish("devices/dev1/telemetry"),
            true,
        ),
        (
            "eg attribute template (integer)",
            eg("ns-a", "dev1"),
            Op::Publish("floors/3/temp"),
            true,
        ),
        (
            "eg other device's telemetry",
            eg("ns-a", "dev1"),
            Op::Publish("devices/dev2/telemetry"),
            false,
        ),
        (
            "eg caseless authentication, registered spelling in topics",
            eg("ns-a", "DEV1"),
            Op::Publish("devices/dev1/telemetry"),
            true,
        ),
        (
            "eg presented spelling is not substituted",
            eg("ns-a", "DEV1"),
            Op::Publish("devices/DEV1/telemetry"),
            false,
        ),
        (
            "eg sensors cannot read telemetry",
            eg("ns-a", "dev1"),
            Op::Subscribe("devices/+/telemetry"),
            false,
        ),
        (
            "eg managers read telemetry",
            eg("ns-a", "manager-1"),
            Op::Subscribe("devices/+/telemetry"),
            true,
        ),
        (
            "eg managers cannot widen to #",
            eg("ns-a", "manager-1"),
            Op::Subscribe("devices/#"),
            false,
        ),
        (
            "eg resource name is not the authentication name",
            eg("ns-a", "mgr"),
            Op::Connect,
            false,
        ),
        (
            "eg authentication name a/b",
            eg("ns-a", "a/b"),
            Op::Publish("devices/a/b/telemetry"),
            false,
        ),
        (
            "eg attribute +",
            eg("ns-a", "a/b"),
            Op::Publish("floors/x/y"),
            false,
        ),
        (
            "eg disabled client connects",
            eg("ns-a", "dev2"),
            Op::Connect,
            false,
        ),
        (
            "eg disabled client publishes",
            eg("ns-a", "dev2"),
            Op::Publish("devices/dev2/telemetry"),
            false,
        ),
        // Namespaces never meet.
        (
            "namespace A lacks B's grant",
            eg("ns-a", "dev1"),
            Op::Publish("anything/else"),
            false,
        ),
        (
            "namespace B grants its own",
            eg("ns-b", "dev1"),
            Op::Publish("anything/else"),
            true,
        ),
        (
            "A's client is unknown in B",
            eg("ns-b", "only-a"),
            Op::Connect,
            false,
        ),
        (
            "A's client cannot use B's grant",
            eg("ns-b", "only-a"),
            Op::Publish("anything/else"),
            false,
        ),
        ("unknown namespace", eg("ns-c", "dev1"), Op::Connect, false),
        (
            "no namespace means IoT rules only",
            Principal::new("dev1").with_authentication_name("dev1"),
            Op::Publish("devices/dev1/telemetry"),
            false,
        ),
        (
            "namespace principal ignores IoT rules",
            limited("c1").in_namespace("ns-b", "dev1"),
            Op::Subscribe("public/#"),
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (case, principal, op, allowed) in &table {
        let d = decide(&e, principal, *op);
        if d.allowed != *allowed {
            failures.push(format!("{case}: {op:?} -> {d:?}"));
        }
        if d.allowed != d.by.is_some() {
            failures.push(format!("{case}: allowed and `by` disagree: {d:?}"));
        }
        let kind = match op {
            Op::Connect => Action::Connect,
            Op::Publish(_) => Action::Publish,
            Op::Subscribe(_) => Action::Subscribe,
        };
        let topic = match op {
            Op::Connect => "",
            Op::Publish(t) | Op::Subscribe(t) => t,
        };
        let x = e.explain(principal, kind, topic);
        if x.decision != d {
            failures.push(format!(
                "{case}: explain decided {:?}, fast path {d:?}",
                x.decision
            ));
        }
        let granted = x.considered.iter().any(|c| c.outcome == Outcome::Granted);
        if granted != d.allowed {
            failures.push(format!(
                "{case}: explanation lists a grant = {granted}: {x:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

trait PrincipalExt {
    fn with_client_id(self, id: &str) -> Principal;
    fn with_authentication_name(self, name: &str) -> Principal;
}
impl PrincipalExt for Principal {
    fn with_client_id(mut self, id: &str) -> Principal {
        self.client_id = id.into();
        self
    }
    fn with_authentication_name(mut self, name: &str) -> Principal {
        self.authentication_name = Some(name.into());
        self
    }
}

#[test]
fn multi_filter_subscribe_refuses_only_the_forbidden_filter() {
    let e = engine();
    let p = limited("c1");
    let filters = [
        "commands/c1/a",
        "commands/c2/a",
        "public/x",
        "$share/g/commands/c1/b",
    ];
    let allowed: Vec<bool> = filters.iter().map(|f| e.subscribe(&p, f).allowed).collect();
    assert_eq!(allowed, vec![true, false, true, true]);
}

#[test]
fn decisions_name_the_rule_and_template() {
    let e = engine();
    let d = e.publish(&limited("c1"), "telemetry/c1/temp");
    assert_eq!(
        d.by,
        Some(RuleRef::IotOperations {
            authorization: "authz".into(),
            rule: 0,
            resource: 1,
            entry: Some(0),
            pattern: Some("telemetry/{principal.clientId}/#".into()),
        })
    );
    let d = e.subscribe(&limited("c1"), "public/a");
    assert!(
        matches!(
            &d.by,
            Some(RuleRef::IotOperations {
                resource: 2,
                entry: Some(1),
                ..
            })
        ),
        "{d:?}"
    );
    let d = e.connect(&Principal::new("b23-x").with_attribute("building", "b23"));
    assert!(
        matches!(
            &d.by,
            Some(RuleRef::IotOperations {
                rule: 1,
                resource: 0,
                entry: Some(0),
                ..
            })
        ),
        "{d:?}"
    );
    let d = e.publish(&eg("ns-a", "dev1"), "floors/3/x");
    assert_eq!(
        d.by.as_ref().map(ToString::to_string).as_deref(),
        Some(
            "namespace \"ns-a\" permission binding \"sensors-pub\" topic space \"own-telemetry\" topicTemplates[1] \"floors/${client.attributes.floor}/#\""
        )
    );
    let d = e.connect(&eg("ns-a", "dev2"));
    assert_eq!(d.reason, "the client is disabled");
    let d = e.subscribe(&limited("c1"), "a/#/b");
    assert!(!d.allowed);
    assert!(d.reason.contains("'#'"), "{}", d.reason);
}

#[test]
fn explain_lists_each_rule_and_why() {
    let e = engine();
    let x = e.explain(&limited("+"), Action::Subscribe, "commands/+/+");
    assert!(!x.decision.allowed);
    let outcomes: Vec<(Outcome, &str)> = x
        .considered
        .iter()
        .map(|c| (c.outcome, c.detail.as_str()))
        .collect();
    // Every Subscribe grant of the IoT domain is listed, in rule order.
    assert_eq!(outcomes.len(), 6, "{outcomes:?}");
    assert_eq!(outcomes[0].0, Outcome::Unusable);
    assert!(
        outcomes[0].1.contains("{principal.clientId} contains '+'"),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1].0, Outcome::NoMatch);
    assert!(
        outcomes[1].1.contains("not within \"public/#\""),
        "{outcomes:?}"
    );
    assert!(
        outcomes[2..]
            .iter()
            .all(|(o, _)| *o == Outcome::NotForThisPrincipal)
    );

    let x = e.explain(
        &eg("ns-a", "dev1"),
        Action::Subscribe,
        "devices/+/telemetry",
    );
    assert_eq!(x.considered.len(), 1);
    assert_eq!(x.considered[0].outcome, Outcome::NotForThisPrincipal);
    assert!(
        x.considered[0]
            .detail
            .contains("not in client group \"managers\"")
    );

    let x = e.explain(&eg("ns-a", "dev1"), Action::Connect, "");
    assert!(x.decision.allowed);
    assert_eq!(x.topic, None);

    // Serializes for the control-plane endpoint.
    let json = serde_json::to_value(&x).expect("serializes");
    assert_eq!(json["decision"]["by"]["kind"], "eventGridClient");
    assert_eq!(json["decision"]["by"]["client"], "dev1");
}

fn compile_err(model: serde_json::Value) -> PolicyError {
    let model: PolicyModel = serde_json::from_value(model).expect("model JSON");
    PolicyEngine::compile(&model).expect_err("must not compile")
}

#[test]
fn compile_errors_name_the_offender() {
    let e = compile_err(json!({"iotOperations": [{"name": "z", "rules": [
        {"principals": {}, "brokerResources": [
            {"method": "Connect"},
            {"method": "Publish", "topics": ["ok", "dev-{principal.clientId}/x"]}
        ]}
    ]}]}));
    assert_eq!(
        e,
        PolicyError::Template {
            location: "authorization \"z\" rules[0].brokerResources[1].topics[1]".into(),
            text: "dev-{principal.clientId}/x".into(),
            position: 0,
            message: "a {principal.*} variable must be the whole topic level".into(),
        }
    );

    let e = compile_err(json!({"iotOperations": [{"name": "z", "rules": [
        {"principals": {}, "brokerResources": [{"method": "Connect", "clientIds": ["{principal.nope}*"]}]}
    ]}]}));
    assert!(
        matches!(&e, PolicyError::Template { location, position: 0, .. } if location.ends_with("clientIds[0]")),
        "{e}"
    );

    let templates: Vec<String> = (0..11).map(|i| format!("t/{i}")).collect();
    let e = compile_err(json!({"eventGrid": [{"name": "n",
        "topicSpaces": [{"name": "big", "topicTemplates": templates}]}]}));
    assert!(e.to_string().contains("at most 10"), "{e}");

    let e = compile_err(json!({"eventGrid": [{"name": "n",
        "topicSpaces": [{"name": "ts", "topicTemplates": ["a/${client.name}"]}]}]}));
    assert!(
        matches!(&e, PolicyError::Template { location, position: 2, .. } if location.contains("topicTemplates[0]")),
        "{e}"
    );

    let e = compile_err(json!({"eventGrid": [{"name": "n",
        "clientGroups": [{"name": "g", "query": "attributes.x = 'a' or"}]}]}));
    assert!(
        matches!(&e, PolicyError::Query { location, position: 21, .. } if location.contains("client group \"g\"")),
        "{e}"
    );

    let e = compile_err(json!({"eventGrid": [{"name": "n",
        "topicSpaces": [{"name": "ts", "topicTemplates": ["a"]}],
        "permissionBindings": [{"name": "b", "clientGroupName": "nope", "topicSpaceName": "ts", "permission": "Publisher"}]}]}));
    assert!(
        e.to_string().contains("unknown client group \"nope\""),
        "{e}"
    );

    let e = compile_err(json!({"eventGrid": [{"name": "n",
        "clientGroups": [{"name": "$all", "query": "attributes.x = 1"}]}]}));
    assert!(e.to_string().contains("$all"), "{e}");

    let e = compile_err(json!({"eventGrid": [{"name": "n",
        "clients": [{"name": "a", "authenticationName": "Dev"}, {"name": "b", "authenticationName": "dEV"}]}]}));
    assert!(e.to_string().contains("already used"), "{e}");

    let e = compile_err(json!({"eventGrid": [{"name": "n"}, {"name": "n"}]}));
    assert!(e.to_string().contains("duplicate namespace"), "{e}");
}

#[test]
fn registry_lookup_for_authentication() {
    let e = engine();
    let c = e
        .event_grid_client("ns-a", "MANAGER-1")
        .expect("caseless lookup");
    assert_eq!(c.name, "mgr");
    assert!(e.event_grid_client("ns-b", "manager-1").is_none());
}

#[test]
fn a_thousand_rules_compile_and_decide() {
    let rules: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            json!({
                "principals": {"usernames": [format!("user{i}")]},
                "brokerResources": [
                    {"method": "Publish", "topics": [format!("area{i}/+/telemetry"), format!("area{i}/{{principal.clientId}}/#")]},
                    {"method": "Subscribe", "topics": [format!("area{i}/commands/#")]}
                ]
            })
        })
        .collect();
    let model: PolicyModel =
        serde_json::from_value(json!({"iotOperations": [{"name": "big", "rules": rules}]}))
            .expect("model");
    let e = PolicyEngine::compile(&model).expect("compiles");
    let p = Principal::new("c7").with_username("user777");
    assert!(e.publish(&p, "area777/x/telemetry").allowed);
    assert!(e.publish(&p, "area777/c7/a/b").allowed);
    assert!(!e.publish(&p, "area778/x/telemetry").allowed);
    assert!(e.subscribe(&p, "area777/commands/+").allowed);
    assert!(!e.subscribe(&p, "area777/#").allowed);
}

/// A client that the namespace's custom JWT authentication admitted: not in the registry, judged
/// by its token's claims (group queries, `${client.attributes.X}`), confined to its namespace.
#[test]
fn token_clients_are_judged_by_their_claims() {
    use meridian_policy::model::AttributeValue as V;
    let e = engine();
    let token = |name: &str, attrs: &[(&str, V)]| {
        Principal::new(format!("jwt-{name}"))
            .in_namespace("ns-a", name)
            .with_token_attributes(
                attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            )
    };
    let sensor = token(
        "t-sensor",
        &[("type", V::String("sensor".into())), ("floor", V::Int(7))],
    );
    let d = e.connect(&sensor);
    assert!(d.allowed, "{d:?}");
    assert_eq!(
        d.by,
        Some(RuleRef::EventGridToken {
            namespace: "ns-a".into(),
            authentication_name: "t-sensor".into()
        })
    );
    // Group `sensors` by its claim; templates filled from sub and the claims.
    assert!(e.publish(&sensor, "devices/t-sensor/telemetry").allowed);
    assert!(e.publish(&sensor, "floors/7/temp").allowed);
    assert!(!e.publish(&sensor, "floors/3/temp").allowed);
    assert!(!e.publish(&sensor, "devices/dev1/telemetry").allowed);
    // A claim that puts it in no group grants nothing; `$all` still applies in ns-b only.
    let visitor = token("t-visitor", &[("type", V::String("visitor".into()))]);
    assert!(e.connect(&visitor).allowed);
    assert!(!e.publish(&visitor, "devices/t-visitor/telemetry").allowed);
    let mgr = token("t-mgr", &[("type", V::String("admin".into()))]);
    assert!(e.subscribe(&mgr, "devices/+/telemetry").allowed, "IN list");
    assert!(!e.subscribe(&mgr, "#").allowed);
    // Injection through the token: a wildcard sub or claim makes the template unusable.
    let wild = token(
        "+",
        &[
            ("type", V::String("sensor".into())),
            ("floor", V::String("#".into())),
        ],
    );
    assert!(!e.publish(&wild, "devices/x/telemetry").allowed);
    assert!(!e.publish(&wild, "floors/1/x").allowed);
    // An array claim is not a template value.
    let list = token(
        "t-list",
        &[
            ("type", V::String("sensor".into())),
            ("floor", V::StringList(vec!["1".into()])),
        ],
    );
    assert!(!e.publish(&list, "floors/1/x").allowed);
    // A registered client of that name that is Disabled blocks the token identity too.
    let disabled = token("dev2", &[("type", V::String("sensor".into()))]);
    assert!(!e.connect(&disabled).allowed);
    assert!(!e.publish(&disabled, "devices/dev2/telemetry").allowed);
    // The same token identity in another namespace is judged there alone.
    let elsewhere = Principal::new("jwt-b")
        .in_namespace("ns-b", "t-sensor")
        .with_token_attributes(Default::default());
    assert!(
        e.publish(&elsewhere, "anything/at/all").allowed,
        "ns-b's $all binding"
    );
    // Explain agrees and says why.
    let x = e.explain(&sensor, Action::Publish, "floors/3/temp");
    assert!(!x.decision.allowed);
    let x = e.explain(&visitor, Action::Publish, "devices/t-visitor/telemetry");
    assert!(
        x.considered
            .iter()
            .any(|c| c.outcome == Outcome::NotForThisPrincipal
                && c.detail.contains("token client \"t-visitor\"")),
        "{:?}",
        x.considered
    );
}
