//! Live apply of config-contract snapshots on a running node, with real clients: listeners open
//! and close, a bad certificate is rejected naming its resource while the previous snapshot keeps
//! serving, authorization refuses exactly what it forbids (PUBACK 0x87, SUBACK 0x87, CONNACK
//! 0x87), a policy change disconnects exactly the clients it forbids (1,000 connected, counted),
//! the stored snapshot comes back after a restart, the push endpoint checks its token, and the
//! node reports to its control plane once it is reachable.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use meridian_broker::{BrokerConfig, ControlPlaneConfig, RunningBroker};
use meridian_codec::{Packet, Protocol, QoS};
use meridian_contract::BrokerSnapshot;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const BROKER: &str = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/i1/brokers/default";

fn id(kind: &str, name: &str) -> String {
    format!("{BROKER}/{kind}/{name}")
}

/// A snapshot of `BROKER` at `generation` with the given parts (JSON in the contract's shape).
fn snapshot(
    generation: u64,
    listeners: Value,
    authorizations: Value,
    extra: Value,
) -> BrokerSnapshot {
    let mut doc = json!({
        "schemaVersion": 1,
        "brokerId": BROKER,
        "generation": generation,
        "listeners": listeners,
        "authorizations": authorizations,
    });
    if let (Value::Object(doc), Value::Object(extra)) = (&mut doc, extra) {
        doc.extend(extra);
    }
    BrokerSnapshot::from_value(doc).expect("snapshot JSON")
}

/// One listener `name` with one ephemeral port; authorization by `authz` when given.
fn listener(name: &str, authz: Option<&str>) -> Value {
    json!({
        "id": id("listeners", name),
        "name": name,
        "ports": [{
            "port": 0,
            "protocol": "Mqtt",
            "authorizationEnabled": authz.is_some(),
            "authorizationRefs": authz.into_iter().collect::<Vec<_>>(),
        }]
    })
}

fn authorization(name: &str, rules: Value) -> Value {
    json!({"id": id("authorizations", name), "name": name, "rules": rules})
}

fn snapshot_addr(b: &RunningBroker, listener: &str) -> SocketAddr {
    b.snapshot_listeners()
        .into_iter()
        .find(|l| l.listener_name == listener)
        .unwrap_or_else(|| panic!("listener {listener} open: {:?}", b.snapshot_listeners()))
        .addr
}

/// How a v5 client's event loop ended, or what it saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Connected,
    PubAck(u16, PubAckReason),
    SubAck(Vec<String>),
    Publish(String),
    /// DISCONNECT from the server: reason code and reason string.
    Disconnected(u8, Option<String>),
    Refused(String),
    Closed(String),
}

fn v5_client(
    id: &str,
    addr: SocketAddr,
    user: Option<&str>,
) -> (AsyncClient, mpsc::UnboundedReceiver<Seen>) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    if let Some(u) = user {
        o.set_credentials(u, "pw");
    }
    let (client, mut el) = AsyncClient::new(o, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let seen = match el.poll().await {
                Ok(Event::Incoming(P5::ConnAck(_))) => Seen::Connected,
                Ok(Event::Incoming(P5::PubAck(a))) => Seen::PubAck(a.pkid, a.reason),
                Ok(Event::Incoming(P5::SubAck(a))) => {
                    Seen::SubAck(a.return_codes.iter().map(|c| format!("{c:?}")).collect())
                }
                Ok(Event::Incoming(P5::Publish(p))) => {
                    Seen::Publish(String::from_utf8_lossy(&p.topic).into_owned())
                }
                Ok(_) => continue,
                Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code,
                    reason_string,
                })) => {
                    let _ = tx.send(Seen::Disconnected(reason_code as u8, reason_string));
                    break;
                }
                Err(ConnectionError::ConnectionRefused(code)) => {
                    let _ = tx.send(Seen::Refused(format!("{code:?}")));
                    break;
                }
                Err(e) => {
                    let _ = tx.send(Seen::Closed(e.to_string()));
                    break;
                }
            };
            if tx.send(seen).is_err() {
                break;
            }
        }
    });
    (client, rx)
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("client event in time")
        .expect("event loop alive")
}

/// Skips events until one matches.
async fn wait_for(rx: &mut mpsc::UnboundedReceiver<Seen>, want: impl Fn(&Seen) -> bool) -> Seen {
    loop {
        let s = next_seen(rx).await;
        if want(&s) {
            return s;
        }
    }
}

#[tokio::test]
async fn apply_opens_a_listener_and_a_snapshot_without_it_closes_it() {
    let (b, cli_addr) = start(cfg()).await;
    let applied = b
        .apply_snapshot(snapshot(
            1,
            json!([listener("extra", None)]),
            json!([]),
            json!({}),
        ))
        .await
        .expect("applied");
    assert_eq!(applied.applied_generation, 1);
    let addr = snapshot_addr(&b, "extra");

    let (c, mut rx) = v5_client("on-extra", addr, None);
    assert_eq!(next_seen(&mut rx).await, Seen::Connected);
    c.subscribe("x/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for(&mut rx, |s| matches!(s, Seen::SubAck(_))).await;
    c.publish("x/1", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "hi")
        .await
        .unwrap();
    assert_eq!(
        wait_for(&mut rx, |s| matches!(s, Seen::Publish(_))).await,
        Seen::Publish("x/1".into())
    );

    // The same snapshot again (same generation) changes nothing.
    let again = b
        .apply_snapshot(snapshot(1, json!([]), json!([]), json!({})))
        .await
        .expect("idempotent");
    assert_eq!(again.applied_generation, 1);
    assert_eq!(b.snapshot_listeners().len(), 1);

    // Generation 2 has no listener: the port closes and its client is told why.
    b.apply_snapshot(snapshot(2, json!([]), json!([]), json!({})))
        .await
        .expect("applied");
    match wait_for(&mut rx, |s| {
        matches!(s, Seen::Disconnected(..) | Seen::Closed(_))
    })
    .await
    {
        Seen::Disconnected(code, reason) => {
            assert_eq!(code, 0x8B);
            assert!(
                reason.unwrap_or_default().contains("extra"),
                "reason names the listener"
            );
        }
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(b.snapshot_listeners().is_empty());
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "the removed port no longer accepts");
    // The CLI listener is untouched.
    let mut raw = Raw::connect(cli_addr, "cli", Protocol::V5).await;
    assert!(raw.ping().await);
    b.shutdown().await;
}

#[tokio::test]
async fn bad_ca_certificate_is_rejected_naming_the_resource_and_the_previous_snapshot_serves() {
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", None)]),
        json!([]),
        json!({}),
    ))
    .await
    .expect("applied");
    let addr = snapshot_addr(&b, "main");

    // An Event Grid CA certificate whose content is not a certificate.
    let ns = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.EventGrid/namespaces/ns1";
    let ca_id = format!("{ns}/caCertificates/bad");
    let bad_ns = json!({"namespaces": [{
        "id": ns, "name": "ns1", "topicSpacesEnabled": true,
        "caCertificates": [{"id": ca_id, "name": "bad",
            "encodedCertificate": "TUlJQm9nSUJBREFOQmdrcWhraUc5dzBCQVFFRkFBT0NBUThBTUlJQkNnS0NBUUVB"}]
    }]});
    let rejection = b
        .apply_snapshot(snapshot(
            2,
            json!([listener("other", None)]),
            json!([]),
            bad_ns,
        ))
        .await
        .expect_err("rejected");
    assert_eq!(rejection.generation, 2);
    assert_eq!(rejection.resource_id.as_deref(), Some(ca_id.as_str()));
    assert!(rejection.message.contains("bad"), "{}", rejection.message);

    // An X509 authentication method with a trusted CA that does not parse names that resource.
    let authn_id = id("authentications", "certs");
    let bad_authn = json!({"authentications": [{"id": authn_id, "name": "certs", "methods": [
        {"method": "X509", "trustedCaPem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}
    ]}]});
    let rejection = b
        .apply_snapshot(snapshot(
            3,
            json!([listener("main", None)]),
            json!([]),
            bad_authn,
        ))
        .await
        .expect_err("rejected");
    assert_eq!(rejection.resource_id.as_deref(), Some(authn_id.as_str()));

    // Nothing of generation 2 or 3 is in force: generation 1 still serves.
    assert_eq!(b.report().applied_generation, 1);
    assert_eq!(b.report().errors.len(), 2);
    assert_eq!(b.report().health, meridian_contract::NodeHealth::Degraded);
    let names: Vec<String> = b
        .snapshot_listeners()
        .into_iter()
        .map(|l| l.listener_name)
        .collect();
    assert_eq!(names, vec!["main".to_string()]);
    let mut raw = Raw::connect(addr, "still-served", Protocol::V5).await;
    assert!(raw.ping().await);
    b.shutdown().await;
}

/// Client `c1` may publish `allowed/#` and subscribe to `allowed/#`, nothing else.
fn c1_rules() -> Value {
    authorization(
        "authz",
        json!([{
            "principals": {"clientIds": ["c1", "watcher"]},
            "brokerResources": [
                {"method": "Connect"},
                {"method": "Publish", "topics": ["allowed/#"]},
                {"method": "Subscribe", "topics": ["allowed/#"]}
            ]
        }]),
    )
}

#[tokio::test]
async fn forbidden_topic_gets_puback_0x87_while_the_other_traffic_goes_through() {
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", Some("authz"))]),
        json!([c1_rules()]),
        json!({}),
    ))
    .await
    .expect("applied");
    let addr = snapshot_addr(&b, "main");
    let (c, mut rx) = v5_client("c1", addr, None);
    assert_eq!(next_seen(&mut rx).await, Seen::Connected);
    use rumqttc::v5::mqttbytes::QoS as Q;
    c.subscribe("allowed/#", Q::AtLeastOnce).await.unwrap();
    wait_for(&mut rx, |s| matches!(s, Seen::SubAck(_))).await;

    c.publish("secret/x", Q::AtLeastOnce, false, "no")
        .await
        .unwrap();
    c.publish("allowed/y", Q::AtLeastOnce, false, "yes")
        .await
        .unwrap();
    let mut acks = Vec::new();
    let mut delivered = Vec::new();
    while acks.len() < 2 || delivered.is_empty() {
        match next_seen(&mut rx).await {
            Seen::PubAck(_, r) => acks.push(r),
            Seen::Publish(t) => delivered.push(t),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        acks[0],
        PubAckReason::NotAuthorized,
        "forbidden topic refused"
    );
    assert_eq!(acks[1], PubAckReason::Success, "allowed topic accepted");
    assert_eq!(delivered, vec!["allowed/y".to_string()]);

    // SUBSCRIBE: each filter separately; `#` never widens a permission.
    let mut raw = Raw::connect(addr, "watcher", Protocol::V5).await;
    let codes = {
        raw.send(Packet::Subscribe(meridian_codec::Subscribe {
            packet_id: 3,
            filters: ["allowed/a", "#", "allowed/+/b", "secret/#"]
                .iter()
                .map(|f| meridian_codec::SubscribeFilter {
                    filter: f.to_string(),
                    options: Default::default(),
                })
                .collect(),
            properties: Default::default(),
        }))
        .await;
        loop {
            match raw.recv().await {
                Some(Packet::SubAck(a)) => {
                    break a.reason_codes.iter().map(|c| c.0).collect::<Vec<_>>();
                }
                Some(_) => continue,
                None => panic!("no SUBACK"),
            }
        }
    };
    assert_eq!(codes, vec![0x00, 0x87, 0x00, 0x87]);
    assert!(raw.ping().await, "the connection continues");

    // Deny by default: a client no rule names cannot connect; a will to a forbidden topic
    // refuses the CONNECT.
    let (_, ack) = Raw::connect_with(addr, connect_packet("stranger", Protocol::V5)).await;
    assert_eq!(ack.reason_code.0, 0x87);
    let mut with_will = connect_packet("c1", Protocol::V5);
    with_will.will = Some(meridian_codec::Will {
        topic: "secret/will".into(),
        payload: bytes::Bytes::from_static(b"bye"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (_, ack) = Raw::connect_with(addr, with_will).await;
    assert_eq!(ack.reason_code.0, 0x87);
    b.shutdown().await;
}

#[tokio::test]
async fn v311_publish_to_a_forbidden_topic_is_dropped_and_counted() {
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", Some("authz"))]),
        json!([c1_rules()]),
        json!({}),
    ))
    .await
    .expect("applied");
    let addr = snapshot_addr(&b, "main");
    let mut watcher = Raw::connect(addr, "watcher", Protocol::V311).await;
    assert_eq!(
        watcher.subscribe("allowed/#", QoS::AtLeastOnce).await,
        vec![1]
    );
    let mut c1 = Raw::connect(addr, "c1", Protocol::V311).await;
    c1.publish("secret/x", b"no", QoS::AtLeastOnce, 1).await;
    // 3.1.1 has no refusal code: the PUBACK is plain and the message goes nowhere.
    assert!(matches!(c1.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 1));
    c1.publish("allowed/x", b"yes", QoS::AtLeastOnce, 2).await;
    let p = watcher
        .recv_publish()
        .await
        .expect("allowed message delivered");
    assert_eq!(p.topic, "allowed/x");
    let dropped: u64 = b
        .dropped_messages()
        .into_iter()
        .filter(|(r, _)| *r == "not_authorized")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(dropped, 1);
    b.shutdown().await;
}

#[tokio::test]
async fn a_forbidden_subscription_disconnects_only_its_client_with_the_reason() {
    let (b, _) = start(cfg()).await;
    let rules = |sub: &str| {
        authorization(
            "authz",
            json!([{
                "principals": {"clientIds": ["wide", "narrow"]},
                "brokerResources": [{"method": "Connect"}, {"method": "Subscribe", "topics": [sub]}]
            }]),
        )
    };
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", Some("authz"))]),
        json!([rules("a/#")]),
        json!({}),
    ))
    .await
    .expect("applied");
    let addr = snapshot_addr(&b, "main");
    let mut wide = Raw::connect(addr, "wide", Protocol::V5).await;
    assert_eq!(wide.subscribe("a/#", QoS::AtMostOnce).await, vec![0]);
    let mut narrow = Raw::connect(addr, "narrow", Protocol::V5).await;
    assert_eq!(narrow.subscribe("a/b/c", QoS::AtMostOnce).await, vec![0]);
    let mut events = Raw::connect(start_sys_watcher(&b), "events", Protocol::V5).await;
    assert_eq!(
        events
            .subscribe("$SYS/events/policy_revoked", QoS::AtMostOnce)
            .await,
        vec![0]
    );

    b.apply_snapshot(snapshot(
        2,
        json!([listener("main", Some("authz"))]),
        json!([rules("a/b/#")]),
        json!({}),
    ))
    .await
    .expect("applied");
    match wide.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code.0, 0x87);
            let why = d.properties.reason_string.unwrap_or_default();
            assert!(why.contains("a/#"), "reason names the subscription: {why}");
        }
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }
    let event = events.recv_publish().await.expect("policy_revoked event");
    let body: Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(body["client_id"], "wide");
    assert_eq!(body["reason_code"], 0x87);
    assert!(
        narrow.ping().await,
        "a client the new policy allows stays connected"
    );
    b.shutdown().await;
}

/// The CLI listener (no snapshot policy) for watching `$SYS` events.
fn start_sys_watcher(b: &RunningBroker) -> SocketAddr {
    b.addr(meridian_broker::Transport::Tcp)
        .expect("cli listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_change_disconnects_exactly_the_forbidden_subset_of_1000_clients() {
    const CLIENTS: usize = 1000;
    let (b, _) = start(cfg()).await;
    let rules = |users: &[&str]| {
        authorization(
            "authz",
            json!([{"principals": {"usernames": users}, "brokerResources": [{"method": "Connect"}]}]),
        )
    };
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", Some("authz"))]),
        json!([rules(&["keep", "drop"])]),
        json!({}),
    ))
    .await
    .expect("applied");
    let addr = snapshot_addr(&b, "main");

    // Every 7th client logs in as "drop": 143 of 1,000.
    let dropped = |i: usize| i.is_multiple_of(7);
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Seen)>();
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let user = if dropped(i) { "drop" } else { "keep" };
        let (c, mut events) = v5_client(&format!("c{i:04}"), addr, Some(user));
        clients.push(c);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(s) = events.recv().await {
                if tx.send((i, s)).is_err() {
                    break;
                }
            }
        });
    }
    let mut connected = 0;
    while connected < CLIENTS {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some((_, Seen::Connected))) => connected += 1,
            Ok(Some((i, other))) => panic!("client {i} before the change: {other:?}"),
            _ => panic!("only {connected} of {CLIENTS} clients connected"),
        }
    }
    assert_eq!(b.connected_clients(), CLIENTS as u64);

    let started = std::time::Instant::now();
    b.apply_snapshot(snapshot(
        2,
        json!([listener("main", Some("authz"))]),
        json!([rules(&["keep"])]),
        json!({}),
    ))
    .await
    .expect("applied");
    let applied_in = started.elapsed();
    let expected: usize = (0..CLIENTS).filter(|i| dropped(*i)).count();
    let mut kicked = std::collections::BTreeSet::new();
    while kicked.len() < expected {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some((i, Seen::Disconnected(0x87, _)))) => {
                assert!(
                    dropped(i),
                    "client {i} is still allowed but was disconnected"
                );
                kicked.insert(i);
            }
            Ok(Some((i, other))) => panic!("client {i} after the change: {other:?}"),
            _ => panic!(
                "only {} of {expected} forbidden clients were disconnected",
                kicked.len()
            ),
        }
    }
    let kicked_in = started.elapsed();
    // Nobody else hears anything, and the node counts the rest as connected.
    match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        Err(_) => {}
        Ok(other) => panic!("unexpected event after the kicks: {other:?}"),
    }
    let remaining = tokio::time::timeout(WAIT, async {
        loop {
            let n = b.connected_clients();
            if n == (CLIENTS - expected) as u64 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connected count settles");
    assert_eq!(remaining, 857);
    assert_eq!(kicked.len(), 143);
    eprintln!(
        "apply with 1,000 clients: {applied_in:?}; all 143 disconnects seen after {kicked_in:?}"
    );
    drop(clients);
    b.shutdown().await;
}

fn node_cfg(data_dir: &std::path::Path, token: &str) -> BrokerConfig {
    let mut c = cfg();
    c.data_dir = Some(data_dir.to_path_buf());
    c.admin = Some("127.0.0.1:0".parse().unwrap());
    c.control_plane = Some(ControlPlaneConfig {
        // Nothing listens there: the node must serve without its control plane.
        url: "http://127.0.0.1:9".into(),
        broker: BROKER.into(),
        token: token.into(),
        node_id: Some("test-node".into()),
        ca_file: None,
        endpoint: None,
    });
    c
}

#[tokio::test]
async fn the_stored_snapshot_is_served_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = meridian_broker::Broker::start(node_cfg(dir.path(), "t"))
        .await
        .expect("starts");
    b.apply_snapshot(snapshot(
        3,
        json!([listener("main", Some("authz"))]),
        json!([c1_rules()]),
        json!({}),
    ))
    .await
    .expect("applied");
    let digest = b.report().applied_digest;
    b.shutdown().await;

    let b = meridian_broker::Broker::start(node_cfg(dir.path(), "t"))
        .await
        .expect("restarts");
    let report = b.report();
    assert_eq!(report.applied_generation, 3);
    assert_eq!(report.applied_digest, digest);
    let addr = snapshot_addr(&b, "main");
    // The stored policy is in force too.
    let (_, ack) = Raw::connect_with(addr, connect_packet("stranger", Protocol::V5)).await;
    assert_eq!(ack.reason_code.0, 0x87);
    let mut c1 = Raw::connect(addr, "c1", Protocol::V5).await;
    assert!(c1.ping().await);
    // A re-push of the stored generation is a no-op.
    let again = b
        .apply_snapshot(snapshot(3, json!([]), json!([]), json!({})))
        .await
        .expect("no-op");
    assert_eq!(again.applied_generation, 3);
    assert_eq!(b.snapshot_listeners().len(), 1);
    b.shutdown().await;
}

#[tokio::test]
async fn the_push_endpoint_refuses_a_wrong_token_and_answers_with_the_node_protocol() {
    meridian_net::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let b = meridian_broker::Broker::start(node_cfg(dir.path(), "node-token"))
        .await
        .expect("starts");
    let url = format!("http://{}/v1/snapshot", b.admin_addr().expect("admin"));
    let http = reqwest::Client::new();
    let body = snapshot(1, json!([listener("main", None)]), json!([]), json!({})).to_json();

    for token in [Some("wrong"), Some("node-tokeN"), Some(""), None] {
        let mut req = http.put(&url).body(body.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "token {token:?}");
    }
    assert_eq!(
        b.report().applied_generation,
        0,
        "nothing applied without the token"
    );

    let put = |body: Vec<u8>| http.put(&url).bearer_auth("node-token").body(body).send();
    let r = put(b"{not json".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = put(body.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let applied: meridian_contract::Applied = r.json().await.unwrap();
    assert_eq!(applied.applied_generation, 1);
    assert_eq!(b.snapshot_listeners().len(), 1);

    // A dangling reference is a 422 rejection naming the listener.
    let bad = snapshot(
        2,
        json!([listener("main", Some("missing"))]),
        json!([]),
        json!({}),
    )
    .to_json();
    let r = put(bad).await.unwrap();
    assert_eq!(r.status(), 422);
    let rejection: meridian_contract::Rejection = r.json().await.unwrap();
    assert_eq!(
        rejection.resource_id.as_deref(),
        Some(id("listeners", "main").as_str())
    );
    // A newer schema version is a rejection too (the control plane marks it Failed).
    let r = put(br#"{"schemaVersion": 99, "generation": 5}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(b.report().applied_generation, 1);
    b.shutdown().await;
}

/// What the stand-in control plane received: (node id, bearer token, report).
type Received =
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, meridian_contract::NodeReport)>>>;

/// A minimal control plane speaking the node protocol's report route (the real one lives in
/// `meridian-api`, which the broker must not depend on; the end-to-end tests use it).
async fn control_plane_on(listener: tokio::net::TcpListener) -> Received {
    use axum::extract::{Path, State};
    let received: Received = Default::default();
    let app = axum::Router::new()
        .route(
            "/meridian/nodes/{id}",
            axum::routing::put(
                |State(r): State<Received>,
                 Path(id): Path<String>,
                 headers: axum::http::HeaderMap,
                 axum::Json(report): axum::Json<meridian_contract::NodeReport>| async move {
                    let token = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    r.lock().unwrap().push((id, token, report));
                    axum::Json(meridian_contract::ReportAnswer {
                        desired_generation: 0,
                        report_interval_seconds: 1,
                    })
                },
            ),
        )
        .with_state(received.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    received
}

#[tokio::test]
async fn the_node_reports_to_its_control_plane_and_resumes_after_an_outage() {
    // Reserve a port, then leave it closed: the control plane is down when the node starts.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = probe.local_addr().unwrap();
    drop(probe);
    let dir = tempfile::tempdir().unwrap();
    let mut c = node_cfg(dir.path(), "node-token");
    c.control_plane.as_mut().unwrap().url = format!("http://{cp_addr}/");
    let b = meridian_broker::Broker::start(c)
        .await
        .expect("starts without its control plane");
    b.apply_snapshot(snapshot(
        4,
        json!([listener("main", None)]),
        json!([]),
        json!({}),
    ))
    .await
    .expect("applies while the control plane is down");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let received = control_plane_on(tokio::net::TcpListener::bind(cp_addr).await.unwrap()).await;
    // Backoff is at most a few seconds this early; then reports come every second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while received.lock().unwrap().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reports reached the control plane"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (node, token, report) = received.lock().unwrap()[1].clone();
    assert_eq!(node, "test-node");
    assert_eq!(token, "Bearer node-token");
    assert_eq!(report.broker_id, BROKER);
    assert_eq!(
        report.endpoint,
        format!("http://{}", b.admin_addr().unwrap())
    );
    assert_eq!(report.applied_generation, 4);
    assert_eq!(report.applied_digest, b.report().applied_digest);
    assert_eq!(report.health, meridian_contract::NodeHealth::Healthy);
    b.shutdown().await;
}

#[tokio::test]
async fn a_port_that_cannot_be_bound_rejects_the_whole_snapshot_naming_its_listener() {
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", None)]),
        json!([]),
        json!({}),
    ))
    .await
    .expect("applied");
    let main = snapshot_addr(&b, "main");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = json!({"id": id("listeners", "busy"), "name": "busy",
                      "ports": [{"port": port, "protocol": "Mqtt"}]});
    // Generation 2 would add a free port and a taken one, and drop "main".
    let rejection = b
        .apply_snapshot(snapshot(
            2,
            json!([listener("fresh", None), busy]),
            json!([]),
            json!({}),
        ))
        .await
        .expect_err("rejected");
    assert_eq!(
        rejection.resource_id.as_deref(),
        Some(id("listeners", "busy").as_str())
    );
    assert!(
        rejection.message.contains(&port.to_string()),
        "{}",
        rejection.message
    );
    // All or nothing: "fresh" was not left open, "main" still serves.
    let names: Vec<String> = b
        .snapshot_listeners()
        .into_iter()
        .map(|l| l.listener_name)
        .collect();
    assert_eq!(names, vec!["main".to_string()]);
    let mut raw = Raw::connect(main, "still-here", Protocol::V5).await;
    assert!(raw.ping().await);
    assert_eq!(b.report().applied_generation, 1);
    drop(taken);
    b.shutdown().await;
}

#[tokio::test]
async fn an_offline_session_loses_the_subscriptions_a_new_policy_forbids() {
    let (b, cli) = start(cfg()).await;
    let rules = |sub: &str| {
        authorization(
            "authz",
            json!([{
                "principals": {"clientIds": ["sleeper", "pub"]},
                "brokerResources": [{"method": "Connect"},
                                    {"method": "Publish", "topics": ["a/#"]},
                                    {"method": "Subscribe", "topics": [sub]}]
            }]),
        )
    };
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", Some("authz"))]),
        json!([rules("a/#")]),
        json!({}),
    ))
    .await
    .expect("applied");
    let addr = snapshot_addr(&b, "main");
    let persistent = || {
        let mut c = connect_packet("sleeper", Protocol::V5);
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(300);
        c
    };
    let (mut sleeper, ack) = Raw::connect_with(addr, persistent()).await;
    assert_eq!(ack.reason_code.0, 0);
    assert_eq!(sleeper.subscribe("a/#", QoS::AtLeastOnce).await, vec![1]);
    sleeper
        .send(Packet::Disconnect(meridian_codec::Disconnect::default()))
        .await;
    assert!(sleeper.closed().await);
    let mut events = Raw::connect(cli, "events", Protocol::V5).await;
    assert_eq!(
        events
            .subscribe("$SYS/events/policy_revoked", QoS::AtMostOnce)
            .await,
        vec![0]
    );

    b.apply_snapshot(snapshot(
        2,
        json!([listener("main", Some("authz"))]),
        json!([rules("a/b/#")]),
        json!({}),
    ))
    .await
    .expect("applied");
    let event = events.recv_publish().await.expect("policy_revoked event");
    let body: Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(
        (body["client_id"].as_str(), body["filter"].as_str()),
        (Some("sleeper"), Some("a/#"))
    );

    // Nothing is queued for it any more: the publisher hears "no matching subscribers".
    let mut publisher = Raw::connect(addr, "pub", Protocol::V5).await;
    publisher
        .publish("a/x", b"secret", QoS::AtLeastOnce, 1)
        .await;
    match publisher.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code.0, 0x10),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let (mut sleeper, ack) = Raw::connect_with(addr, persistent()).await;
    assert!(ack.session_present);
    sleeper.send(Packet::PingReq).await;
    assert_eq!(
        sleeper.recv().await,
        Some(Packet::PingResp),
        "no message was kept for it"
    );
    b.shutdown().await;
}

/// Waits for the PUBACK of `pid` (skipping other packets).
async fn acked(raw: &mut Raw, pid: u16) {
    loop {
        match raw.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == pid => return,
            Some(_) => continue,
            None => panic!("no PUBACK {pid}"),
        }
    }
}

#[tokio::test]
async fn the_broker_resource_limits_apply_to_connections_made_after_the_snapshot() {
    let (b, _) = start(cfg()).await;
    let limits = json!({"limits": {
        "maxSessionExpirySeconds": 60, "maxPacketSizeBytes": 1000, "maxKeepAliveSeconds": 30,
        "maxReceiveMaximum": 2, "maxMessageExpirySeconds": 1,
        "subscriberQueueLength": 3, "subscriberQueueStrategy": "DropOldest"}});
    b.apply_snapshot(snapshot(
        1,
        json!([listener("main", None)]),
        json!([]),
        limits,
    ))
    .await
    .expect("applied");
    let addr = snapshot_addr(&b, "main");

    // CONNACK tells the narrowed limits.
    let mut c = connect_packet("lim-sub", Protocol::V5);
    c.keep_alive = 0;
    c.properties.session_expiry_interval = Some(3600);
    let (mut sub, ack) = Raw::connect_with(addr, c.clone()).await;
    assert_eq!(ack.reason_code.0, 0);
    assert_eq!(ack.properties.session_expiry_interval, Some(60));
    assert_eq!(ack.properties.server_keep_alive, Some(30));
    assert_eq!(ack.properties.maximum_packet_size, Some(1000));
    assert_eq!(sub.subscribe("q/t", QoS::AtLeastOnce).await, [1]);
    sub.send(Packet::Disconnect(Default::default())).await;

    // Queue length 3, DropOldest: of 5 messages for the offline session, the last 3 remain.
    let mut publisher = Raw::connect(addr, "lim-pub", Protocol::V5).await;
    for i in 1..=5u16 {
        publisher
            .publish("q/t", i.to_string().as_bytes(), QoS::AtLeastOnce, i)
            .await;
        acked(&mut publisher, i).await;
    }
    c.clean_start = false;
    let (mut sub, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present);
    // Receive Maximum clamped to 2: two in flight until one is acknowledged.
    let mut got = Vec::new();
    while let Some(p) = sub.recv_for(Duration::from_millis(700)).await {
        if let Packet::Publish(p) = p {
            got.push(p);
        }
    }
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, [b"3", b"4"], "window of 2, oldest two dropped");
    sub.puback(got[0].packet_id).await;
    let third = sub.recv_publish().await.expect("third after an ack");
    assert_eq!(&third.payload[..], b"5");

    // A packet above maxPacketSizeBytes: DISCONNECT 0x95.
    publisher
        .publish("big", &[7u8; 2000], QoS::AtMostOnce, 0)
        .await;
    match publisher.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code.0, 0x95),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }

    // maxMessageExpirySeconds 1: a retained message without expiry is gone after a second.
    let mut p2 = Raw::connect(addr, "lim-pub2", Protocol::V5).await;
    p2.send(Packet::Publish(meridian_codec::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "exp/t".into(),
        packet_id: 1,
        payload: bytes::Bytes::from_static(b"soon gone"),
        properties: Default::default(),
    }))
    .await;
    acked(&mut p2, 1).await;
    let mut early = Raw::connect(addr, "lim-early", Protocol::V5).await;
    early.subscribe("exp/t", QoS::AtMostOnce).await;
    let r = early.recv_publish().await.expect("retained before expiry");
    assert_eq!(r.properties.message_expiry_interval, Some(1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut late = Raw::connect(addr, "lim-late", Protocol::V5).await;
    late.subscribe("exp/t", QoS::AtMostOnce).await;
    assert!(
        late.recv_for(Duration::from_millis(500)).await.is_none(),
        "expired retained message delivered"
    );

    // A snapshot without limits: later connections get the node's own; earlier ones stay.
    b.apply_snapshot(snapshot(
        2,
        json!([listener("main", None)]),
        json!([]),
        json!({}),
    ))
    .await
    .expect("applied");
    let mut c = connect_packet("lim-after", Protocol::V5);
    c.properties.session_expiry_interval = Some(3600);
    let (_after, ack) = Raw::connect_with(addr, c).await;
    assert_eq!(ack.properties.session_expiry_interval, None, "3600 granted");
    assert_eq!(ack.properties.maximum_packet_size, Some(1_048_576));
    assert!(
        early.ping().await,
        "a connection made under the old limits stays"
    );
    b.shutdown().await;
}
