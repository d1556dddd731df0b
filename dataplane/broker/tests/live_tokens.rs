//! Token and custom authentication on snapshot ports, with real MQTT 5 packets: JWTs minted here
//! (ES256 keys from rcgen) in CONNECT (`K8S-SAT`, `OAUTH2-JWT`), re-authentication with AUTH,
//! expiry (0xA0), keys from the method, from a JWKS (wiremock) and from the node's `--jwt-key`;
//! a custom authentication server (wiremock behind a TLS terminator, so the node speaks HTTPS
//! with a CA from the snapshot).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meridian_codec::{Auth, Packet, Properties, Protocol, QoS, ReasonCode};
use meridian_contract::BrokerSnapshot;
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const BROKER: &str = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/i1/brokers/default";
const AUD: &str = "meridian-test";

fn id(kind: &str, name: &str) -> String {
    format!("{BROKER}/{kind}/{name}")
}

struct Signer {
    enc: EncodingKey,
    public_pem: String,
}

fn signer() -> Signer {
    let kp = rcgen::KeyPair::generate().unwrap();
    Signer {
        enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        public_pem: kp.public_key_pem(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Signer {
    fn token(&self, sub: &str, site: &str, exp: u64) -> String {
        self.token_with(
            json!({"sub": sub, "aud": AUD, "exp": exp, "site": site}),
            None,
        )
    }
    fn token_with(&self, claims: Value, kid: Option<&str>) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, &claims, &self.enc).unwrap()
    }
    fn jwk(&self, kid: &str) -> Value {
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&self.enc, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        serde_json::to_value(jwk).unwrap()
    }
}

/// Clients with attribute `site` may connect and publish under `site/{site}/#`; the username
/// `admin` may publish under `admin/#` (no token client may reach it by claiming the name).
fn site_rules() -> Value {
    json!([
        {"principals": {"attributes": [{"site": "plant-1"}, {"site": "plant-2"}]},
         "brokerResources": [{"method": "Connect"},
                             {"method": "Publish", "topics": ["site/{principal.attributes.site}/#"]}]},
        {"principals": {"usernames": ["admin"]},
         "brokerResources": [{"method": "Connect"}, {"method": "Publish", "topics": ["admin/#"]}]}
    ])
}

fn snapshot(generation: u64, methods: Value, rules: Value) -> BrokerSnapshot {
    BrokerSnapshot::from_value(json!({
        "schemaVersion": 1,
        "brokerId": BROKER,
        "generation": generation,
        "listeners": [
            {"id": id("listeners", "main"), "name": "main", "ports": [
                {"port": 0, "protocol": "Mqtt",
                 "authenticationEnabled": true, "authenticationRefs": ["authn"],
                 "authorizationEnabled": true, "authorizationRefs": ["authz"]}]},
            {"id": id("listeners", "open"), "name": "open", "ports": [{"port": 0, "protocol": "Mqtt"}]}
        ],
        "authentications": [{"id": id("authentications", "authn"), "name": "authn", "methods": methods}],
        "authorizations": [{"id": id("authorizations", "authz"), "name": "authz", "rules": rules}],
    }))
    .expect("snapshot JSON")
}

fn token_method(keys: &[&str]) -> Value {
    json!([{"method": "ServiceAccountToken", "audiences": [AUD], "keysPem": keys}])
}

/// (guarded port, open port)
fn ports(b: &meridian_broker::RunningBroker) -> (SocketAddr, SocketAddr) {
    let l = b.snapshot_listeners();
    let by_name = |n: &str| {
        l.iter()
            .find(|s| s.listener_name == n)
            .expect("listener")
            .addr
    };
    (by_name("main"), by_name("open"))
}

fn enhanced(client: &str, method: &str, data: &str) -> meridian_codec::Connect {
    let mut c = connect_packet(client, Protocol::V5);
    c.properties.authentication_method = Some(method.to_owned());
    c.properties.authentication_data = Some(Bytes::copy_from_slice(data.as_bytes()));
    c
}

async fn publish_qos1(raw: &mut Raw, topic: &str, pid: u16) -> u8 {
    raw.publish(topic, b"x", QoS::AtLeastOnce, pid).await;
    loop {
        match raw.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == pid => return a.reason_code.0,
            Some(_) => continue,
            None => panic!("no PUBACK for {topic}"),
        }
    }
}

fn auth(method: &str, reason: ReasonCode, data: &str) -> Packet {
    Packet::Auth(Auth {
        reason_code: reason,
        properties: Properties {
            authentication_method: Some(method.to_owned()),
            authentication_data: Some(Bytes::copy_from_slice(data.as_bytes())),
            ..Default::default()
        },
    })
}

/// The next DISCONNECT (reason code, reason string), skipping other packets.
async fn disconnect_within(raw: &mut Raw, wait: Duration) -> Option<(u8, String)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match raw.recv_for(left).await? {
            Packet::Disconnect(d) => {
                return Some((
                    d.reason_code.0,
                    d.properties.reason_string.unwrap_or_default(),
                ));
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn jwt_in_connect_authenticates_its_claims_decide_and_bad_tokens_get_0x86() {
    let key = signer();
    let forger = signer();
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(1, token_method(&[&key.public_pem]), site_rules()))
        .await
        .expect("applied");
    let (guarded, open) = ports(&b);

    let t = key.token("system:serviceaccount:plant:pump-7", "plant-1", now() + 600);
    let (mut c, ack) = Raw::connect_with(guarded, enhanced("pump-7", "K8S-SAT", &t)).await;
    assert_eq!(ack.reason_code.0, 0, "{ack:?}");
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some("K8S-SAT")
    );
    assert_eq!(
        publish_qos1(&mut c, "site/plant-1/temp", 1).await,
        0x10,
        "no subscriber: 0x10 No matching subscribers"
    );
    assert_eq!(publish_qos1(&mut c, "site/plant-2/temp", 2).await, 0x87);

    // The CONNECT username proves nothing: the token's `sub` is the username.
    let mut claim_admin = enhanced(
        "pump-8",
        "OAUTH2-JWT",
        &key.token("pump-8", "plant-2", now() + 600),
    );
    claim_admin.username = Some("admin".into());
    let (mut c2, ack) = Raw::connect_with(guarded, claim_admin).await;
    assert_eq!(ack.reason_code.0, 0);
    assert_eq!(publish_qos1(&mut c2, "admin/reboot", 1).await, 0x87);
    assert_eq!(publish_qos1(&mut c2, "site/plant-2/t", 2).await, 0x10);

    // Refusals: expired, forged, another audience, not a token, no attributes the rules want.
    let expired = key.token("x", "plant-1", now() - 120);
    let forged = forger.token("x", "plant-1", now() + 600);
    let other_aud = key.token_with(
        json!({"sub": "x", "aud": "other", "exp": now() + 600, "site": "plant-1"}),
        None,
    );
    for (what, data, code) in [
        ("expired", expired.as_str(), 0x86),
        ("forged", forged.as_str(), 0x86),
        ("audience", other_aud.as_str(), 0x86),
        ("garbage", "not-a-jwt", 0x86),
    ] {
        let (_, ack) = Raw::connect_with(guarded, enhanced("bad", "K8S-SAT", data)).await;
        assert_eq!(ack.reason_code.0, code, "{what}");
    }
    let (_, ack) = Raw::connect_with(
        guarded,
        enhanced("nosite", "K8S-SAT", &key.token("y", "plant-9", now() + 600)),
    )
    .await;
    assert_eq!(
        ack.reason_code.0, 0x87,
        "valid token, but no rule admits site plant-9"
    );
    // A method nobody offers: 0x8C, on the guarded port (no custom method) and on the open one.
    let (_, ack) = Raw::connect_with(guarded, enhanced("scram", "SCRAM-SHA-256", "x")).await;
    assert_eq!(ack.reason_code.0, 0x8C);
    let (_, ack) = Raw::connect_with(open, enhanced("scram", "K8S-SAT", &t)).await;
    assert_eq!(ack.reason_code.0, 0x8C);
    // A fresh client still round-trips on the open port.
    let mut plain = Raw::connect(open, "plain", Protocol::V5).await;
    assert!(plain.ping().await);
    b.shutdown().await;
}

#[tokio::test]
async fn an_expiring_token_is_renewed_by_auth_or_the_connection_ends_with_0xa0() {
    let key = signer();
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(1, token_method(&[&key.public_pem]), site_rules()))
        .await
        .expect("applied");
    let (guarded, open) = ports(&b);
    let sub = "pump-7";

    // Not renewed: DISCONNECT 0xA0 at `exp` (the JWT clock has seconds; allow for the leeway).
    let (mut lapsing, ack) = Raw::connect_with(
        guarded,
        enhanced("lapsing", "K8S-SAT", &key.token(sub, "plant-1", now() + 2)),
    )
    .await;
    assert_eq!(ack.reason_code.0, 0);
    // Renewed before expiry: AUTH 0x19 with a fresh token is answered AUTH 0x00.
    let (mut renewed, ack) = Raw::connect_with(
        guarded,
        enhanced("renewed", "K8S-SAT", &key.token(sub, "plant-1", now() + 2)),
    )
    .await;
    assert_eq!(ack.reason_code.0, 0);
    renewed
        .send(auth(
            "K8S-SAT",
            ReasonCode::RE_AUTHENTICATE,
            &key.token(sub, "plant-1", now() + 600),
        ))
        .await;
    match renewed.recv().await {
        Some(Packet::Auth(a)) => {
            assert_eq!(a.reason_code, ReasonCode::SUCCESS);
            assert_eq!(
                a.properties.authentication_method.as_deref(),
                Some("K8S-SAT")
            );
        }
        other => panic!("expected AUTH success, got {other:?}"),
    }
    let (code, why) = disconnect_within(&mut lapsing, Duration::from_secs(6))
        .await
        .expect("DISCONNECT at expiry");
    assert_eq!(code, 0xA0, "{why}");
    assert!(why.contains("expired"), "{why}");
    assert!(
        renewed.ping().await,
        "the renewed connection outlives the first token"
    );
    assert_eq!(publish_qos1(&mut renewed, "site/plant-1/x", 7).await, 0x10);

    // Re-authenticating as someone else (other claims) ends the connection with 0x87.
    renewed
        .send(auth(
            "K8S-SAT",
            ReasonCode::RE_AUTHENTICATE,
            &key.token(sub, "plant-2", now() + 600),
        ))
        .await;
    let (code, why) = disconnect_within(&mut renewed, WAIT)
        .await
        .expect("DISCONNECT");
    assert_eq!(code, 0x87);
    assert!(why.contains("different identity"), "{why}");

    // A bad token in re-authentication: 0x87 with the reason.
    let (mut c, _) = Raw::connect_with(
        guarded,
        enhanced("c", "K8S-SAT", &key.token(sub, "plant-1", now() + 600)),
    )
    .await;
    c.send(auth(
        "K8S-SAT",
        ReasonCode::RE_AUTHENTICATE,
        &key.token(sub, "plant-1", now() - 100),
    ))
    .await;
    let (code, why) = disconnect_within(&mut c, WAIT).await.expect("DISCONNECT");
    assert_eq!((code, why.contains("expired")), (0x87, true), "{why}");

    // Protocol errors: another method, Continue instead of Re-authenticate, AUTH without
    // enhanced authentication at CONNECT.
    for (packet, connect) in [
        (
            auth("OAUTH2-JWT", ReasonCode::RE_AUTHENTICATE, "x"),
            Some("K8S-SAT"),
        ),
        (
            auth("K8S-SAT", ReasonCode::CONTINUE_AUTHENTICATION, "x"),
            Some("K8S-SAT"),
        ),
        (auth("K8S-SAT", ReasonCode::RE_AUTHENTICATE, "x"), None),
    ] {
        let mut c = match connect {
            Some(m) => {
                Raw::connect_with(
                    guarded,
                    enhanced("p", m, &key.token(sub, "plant-1", now() + 600)),
                )
                .await
                .0
            }
            None => Raw::connect(open, "p-open", Protocol::V5).await,
        };
        c.send(packet).await;
        let (code, _) = disconnect_within(&mut c, WAIT).await.expect("DISCONNECT");
        assert_eq!(code, 0x82);
    }
    b.shutdown().await;
}

#[tokio::test]
async fn keys_from_a_jwks_and_from_the_node_and_a_key_rotation_disconnects_old_tokens() {
    let a = signer();
    let rotated = signer();
    let jwks = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [a.jwk("a")]})))
        .mount(&jwks)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let node_key = dir.path().join("issuer.pem");
    std::fs::write(&node_key, &rotated.public_pem).unwrap();
    let mut c = cfg();
    c.jwt_keys = vec![node_key];
    let (b, _) = start(c).await;
    b.apply_snapshot(snapshot(
        1,
        json!([{"method": "ServiceAccountToken", "audiences": [AUD], "jwksUrl": format!("{}/jwks", jwks.uri())}]),
        site_rules(),
    ))
    .await
    .expect("applied");
    let (guarded, _) = ports(&b);
    let claims = json!({"sub": "s", "aud": AUD, "exp": now() + 600, "site": "plant-1"});
    let (mut by_jwks, ack) = Raw::connect_with(
        guarded,
        enhanced("j", "JWT", &a.token_with(claims.clone(), Some("a"))),
    )
    .await;
    assert_eq!(ack.reason_code.0, 0, "verified with the published key");
    let (_, ack) = Raw::connect_with(
        guarded,
        enhanced("r", "JWT", &rotated.token_with(claims.clone(), Some("r"))),
    )
    .await;
    assert_eq!(
        ack.reason_code.0, 0x86,
        "the node key is not used when the method has a JWKS"
    );

    // The method loses its JWKS: the node's --jwt-key applies; the connected client's token
    // no longer verifies, so it is disconnected (0x87 with the reason).
    b.apply_snapshot(snapshot(2, token_method(&[]), site_rules()))
        .await
        .expect("applied");
    let (code, why) = disconnect_within(&mut by_jwks, WAIT)
        .await
        .expect("DISCONNECT");
    assert_eq!(code, 0x87);
    assert!(why.contains("token"), "{why}");
    let (_, ack) = Raw::connect_with(
        guarded,
        enhanced("r", "JWT", &rotated.token_with(claims, None)),
    )
    .await;
    assert_eq!(ack.reason_code.0, 0, "verified with the node key");
    b.shutdown().await;
}

/// A TLS terminator in front of `backend` (wiremock speaks plain HTTP): returns its address and
/// the CA PEM that signs its certificate for 127.0.0.1.
async fn https_front(backend: SocketAddr) -> (SocketAddr, String) {
    meridian_net::install_crypto_provider();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Custom auth test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (addr, ca_cert.pem())
}

#[tokio::test]
async fn a_custom_https_server_decides_adds_attributes_and_a_timeout_fails_closed() {
    let server = MockServer::start().await;
    // Sensor s1 with password "pw" is admitted as site plant-1; the enhanced method
    // X-OTP with data 123456 is admitted as plant-2; s-slow never gets an answer in time.
    Mock::given(method("POST"))
        .and(path("/auth"))
        .and(header("x-meridian-key", "k-123"))
        .and(body_partial_json(json!({"event": "connect", "clientId": "s1", "username": "sensor", "password": "cHc=", "protocolVersion": 5})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "allow", "attributes": {"site": "plant-1"}})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth"))
        .and(body_partial_json(json!({"clientId": "otp", "authenticationMethod": "X-OTP", "authenticationData": "MTIzNDU2"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "allow", "attributes": {"site": "plant-2"}})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth"))
        .and(body_partial_json(json!({"clientId": "s-slow"})))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_secs(5))
                .set_body_json(json!({"result": "allow"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"result": "deny", "reasonCode": 135, "reason": "unknown device"}),
        ))
        .with_priority(10)
        .mount(&server)
        .await;
    let (front, ca_pem) = https_front(*server.address()).await;

    let (b, _) = start(cfg()).await;
    let methods = json!([{"method": "Custom", "endpoint": format!("https://127.0.0.1:{}/auth", front.port()),
                          "headers": {"x-meridian-key": "k-123"}, "timeoutSeconds": 1, "caCertPem": ca_pem}]);
    b.apply_snapshot(snapshot(1, methods, site_rules()))
        .await
        .expect("applied");
    let (guarded, _) = ports(&b);

    let mut c = connect_packet("s1", Protocol::V5);
    c.username = Some("sensor".into());
    c.password = Some(Bytes::from_static(b"pw"));
    let (mut s1, ack) = Raw::connect_with(guarded, c).await;
    assert_eq!(ack.reason_code.0, 0, "{ack:?}");
    assert_eq!(
        publish_qos1(&mut s1, "site/plant-1/t", 1).await,
        0x10,
        "the server's attributes reach the rules"
    );
    assert_eq!(publish_qos1(&mut s1, "site/plant-2/t", 2).await, 0x87);

    let (mut otp, ack) = Raw::connect_with(guarded, enhanced("otp", "X-OTP", "123456")).await;
    assert_eq!(ack.reason_code.0, 0, "{ack:?}");
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some("X-OTP")
    );
    assert_eq!(publish_qos1(&mut otp, "site/plant-2/t", 1).await, 0x10);

    let mut c = connect_packet("s2", Protocol::V5);
    c.username = Some("sensor".into());
    c.password = Some(Bytes::from_static(b"wrong"));
    let (_, ack) = Raw::connect_with(guarded, c).await;
    assert_eq!(ack.reason_code.0, 0x87, "the server's deny code");

    let started = std::time::Instant::now();
    let (_, ack) = Raw::connect_with(guarded, connect_packet("s-slow", Protocol::V5)).await;
    assert_eq!(ack.reason_code.0, 0x88, "timeout: refused (fail closed)");
    assert!(started.elapsed() < Duration::from_secs(4));

    // Without the CA the node does not trust the server: nobody gets in, nobody is let in by mistake.
    let methods = json!([{"method": "Custom", "endpoint": format!("https://127.0.0.1:{}/auth", front.port()),
                          "headers": {"x-meridian-key": "k-123"}, "timeoutSeconds": 1}]);
    b.apply_snapshot(snapshot(2, methods, site_rules()))
        .await
        .expect("applied");
    let mut c = connect_packet("s1", Protocol::V5);
    c.username = Some("sensor".into());
    c.password = Some(Bytes::from_static(b"pw"));
    let (_, ack) = Raw::connect_with(guarded, c).await;
    assert_eq!(ack.reason_code.0, 0x88);
    assert!(
        s1.ping().await,
        "a connected client stays while the method (same endpoint) remains"
    );
    b.shutdown().await;
}

/// Decisions are cached per connection; a swap voids them: a topic allowed a moment ago is
/// refused right after a snapshot forbids it (and allowed again after the next one), on the
/// same connection.
#[tokio::test]
async fn cached_publish_decisions_follow_every_swap() {
    let (b, _) = start(cfg()).await;
    let rules = |topic: &str| {
        json!([{"principals": {"clientIds": ["cache-1"]},
                "brokerResources": [{"method": "Connect"}, {"method": "Publish", "topics": [topic]}]}])
    };
    let snap = |generation: u64, topic: &str| {
        BrokerSnapshot::from_value(json!({
            "schemaVersion": 1, "brokerId": BROKER, "generation": generation,
            "listeners": [{"id": id("listeners", "main"), "name": "main", "ports": [
                {"port": 0, "protocol": "Mqtt", "authorizationEnabled": true, "authorizationRefs": ["authz"]}]}],
            "authorizations": [{"id": id("authorizations", "authz"), "name": "authz", "rules": rules(topic)}],
        }))
        .unwrap()
    };
    b.apply_snapshot(snap(1, "a/#")).await.expect("applied");
    let addr = b.snapshot_listeners()[0].addr;
    let mut c = Raw::connect(addr, "cache-1", Protocol::V5).await;
    for pid in 1..=3 {
        assert_eq!(publish_qos1(&mut c, "a/1", pid).await, 0x10);
    }
    assert_eq!(publish_qos1(&mut c, "b/1", 4).await, 0x87);
    b.apply_snapshot(snap(2, "b/#")).await.expect("applied");
    assert_eq!(
        publish_qos1(&mut c, "a/1", 5).await,
        0x87,
        "a cached allow must not survive the swap"
    );
    assert_eq!(
        publish_qos1(&mut c, "b/1", 6).await,
        0x10,
        "a cached deny must not survive the swap"
    );
    b.apply_snapshot(snap(3, "a/#")).await.expect("applied");
    assert_eq!(publish_qos1(&mut c, "a/1", 7).await, 0x10);
    // More distinct topics than the cache holds: each still decided correctly.
    for i in 0..20u16 {
        assert_eq!(publish_qos1(&mut c, &format!("a/{i}"), 100 + i).await, 0x10);
        assert_eq!(publish_qos1(&mut c, &format!("c/{i}"), 200 + i).await, 0x87);
    }
    b.shutdown().await;
}

/// An Event Grid namespace with custom JWT authentication, reached as a plain port's default
/// namespace: tokens of its issuer certificate admit unregistered clients; AUTH renews them, a
/// token proving other claims ends the connection with 0x87, an unrenewed one with 0xA0; a swap
/// that removes the namespace's JWT authentication revokes its token clients (0x87).
#[tokio::test]
async fn namespace_token_clients_renew_expire_and_are_revoked_by_a_swap() {
    const EG: &str =
        "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.EventGrid/namespaces/fleet";
    let kp = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["idp.test".into()])
        .unwrap()
        .self_signed(&kp)
        .unwrap()
        .pem();
    let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let token = |sub: &str, site: &str, exp: u64| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        let claims = json!({"iss": "https://idp.test", "sub": sub, "aud": "fleet.example.com",
                            "exp": exp, "nbf": now() - 5, "site": site});
        jsonwebtoken::encode(&h, &claims, &enc).unwrap()
    };
    let snap = |generation: u64, jwt: bool| {
        let mut ns = json!({
            "id": EG, "name": "fleet", "topicSpacesEnabled": true,
            "topicSpaces": [{"id": format!("{EG}/topicSpaces/sites"), "name": "sites",
                             "topicTemplates": ["sites/${client.attributes.site}/#"]}],
            "permissionBindings": [{"id": format!("{EG}/permissionBindings/pub"), "name": "pub",
                                    "clientGroupName": "$all", "topicSpaceName": "sites",
                                    "permission": "Publisher"}]
        });
        if jwt {
            ns["customJwtAuthentication"] = json!({"tokenIssuer": "https://idp.test",
                "issuerCertificates": [{"kid": "k1", "encodedCertificate": cert}]});
        }
        BrokerSnapshot::from_value(json!({
            "schemaVersion": 1, "brokerId": BROKER, "generation": generation,
            "listeners": [{"id": id("listeners", "fleet"), "name": "fleet", "ports": [
                {"port": 0, "protocol": "Mqtt", "authenticationEnabled": true,
                 "defaultNamespace": "fleet"}]}],
            "namespaces": [ns],
        }))
        .expect("snapshot JSON")
    };
    let (b, _) = start(cfg()).await;
    // An issuer certificate that does not parse: refused, naming the namespace.
    let mut bad = snap(1, true);
    bad.namespaces[0]
        .custom_jwt_authentication
        .as_mut()
        .unwrap()
        .issuer_certificates[0]
        .encoded_certificate = "bm90IGEgY2VydGlmaWNhdGU=".into();
    let r = b.apply_snapshot(bad).await.expect_err("bad certificate");
    assert_eq!(r.resource_id.as_deref(), Some(EG), "{r:?}");
    assert!(r.message.contains("issuer certificate"), "{r:?}");
    b.apply_snapshot(snap(1, true)).await.expect("applied");
    let port = b.snapshot_listeners()[0].addr;

    let (mut lapsing, ack) = Raw::connect_with(
        port,
        enhanced(
            "lapsing",
            "CUSTOM-JWT",
            &token("dev-1", "plant-1", now() + 2),
        ),
    )
    .await;
    assert_eq!(ack.reason_code.0, 0);
    let (mut renewed, ack) = Raw::connect_with(
        port,
        enhanced(
            "renewed",
            "CUSTOM-JWT",
            &token("dev-2", "plant-1", now() + 2),
        ),
    )
    .await;
    assert_eq!(ack.reason_code.0, 0);
    assert_eq!(publish_qos1(&mut renewed, "sites/plant-1/t", 1).await, 0x10);
    assert_eq!(publish_qos1(&mut renewed, "sites/plant-2/t", 2).await, 0x87);
    renewed
        .send(auth(
            "CUSTOM-JWT",
            ReasonCode::RE_AUTHENTICATE,
            &token("dev-2", "plant-1", now() + 600),
        ))
        .await;
    match renewed.recv().await {
        Some(Packet::Auth(a)) => assert_eq!(a.reason_code, ReasonCode::SUCCESS),
        other => panic!("expected AUTH success, got {other:?}"),
    }
    let (code, why) = disconnect_within(&mut lapsing, Duration::from_secs(6))
        .await
        .expect("DISCONNECT at expiry");
    assert_eq!(code, 0xA0, "{why}");
    assert!(
        renewed.ping().await,
        "the renewed token client outlives its first token"
    );

    // Re-authenticating with other claims: a different identity.
    let (mut other, _) = Raw::connect_with(
        port,
        enhanced(
            "other",
            "CUSTOM-JWT",
            &token("dev-3", "plant-1", now() + 600),
        ),
    )
    .await;
    other
        .send(auth(
            "CUSTOM-JWT",
            ReasonCode::RE_AUTHENTICATE,
            &token("dev-3", "plant-2", now() + 600),
        ))
        .await;
    let (code, why) = disconnect_within(&mut other, WAIT)
        .await
        .expect("DISCONNECT");
    assert_eq!(code, 0x87);
    assert!(why.contains("different identity"), "{why}");

    // The namespace stops accepting tokens: its token clients are revoked, new ones get 0x8C.
    b.apply_snapshot(snap(2, false)).await.expect("applied");
    let (code, why) = disconnect_within(&mut renewed, WAIT)
        .await
        .expect("revoked");
    assert_eq!(code, 0x87);
    assert!(why.contains("no longer accepts tokens"), "{why}");
    let (_, ack) = Raw::connect_with(
        port,
        enhanced(
            "late",
            "CUSTOM-JWT",
            &token("dev-4", "plant-1", now() + 600),
        ),
    )
    .await;
    assert_eq!(ack.reason_code.0, 0x8C);
    b.shutdown().await;
}
