//! Authentication from applied snapshots, with real clients: inline argon2 credentials (and what a
//! change of them does to a connected user), and the X509 method on a TLS port whose certificate
//! and trusted CA come inline in the snapshot, with `authorizationAttributes` feeding the rules;
//! Event Grid namespace clients reaching their namespace by TLS SNI.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::PasswordHasher;
use bytes::BytesMut;
use common::*;
use meridian_codec::{Packet, Protocol, QoS};
use meridian_contract::BrokerSnapshot;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BROKER: &str = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/i1/brokers/default";

fn id(kind: &str, name: &str) -> String {
    format!("{BROKER}/{kind}/{name}")
}

fn hash(password: &str) -> String {
    let salt = argon2::password_hash::SaltString::from_b64("c2FsdHNhbHRzYWx0c2FsdA").unwrap();
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

fn snapshot(generation: u64, port: Value, authentications: Value, rules: Value) -> BrokerSnapshot {
    BrokerSnapshot::from_value(json!({
        "schemaVersion": 1,
        "brokerId": BROKER,
        "generation": generation,
        "listeners": [{"id": id("listeners", "main"), "name": "main", "ports": [port]}],
        "authentications": authentications,
        "authorizations": [{"id": id("authorizations", "authz"), "name": "authz", "rules": rules}],
    }))
    .expect("snapshot JSON")
}

fn main_addr(b: &meridian_broker::RunningBroker) -> SocketAddr {
    b.snapshot_listeners()[0].addr
}

/// Rules: a client with attribute floor=F may connect and publish under `floor/F/#`; `bob`
/// may connect.
fn floor_rules() -> Value {
    json!([
        {"principals": {"attributes": [{"floor": "3"}]},
         "brokerResources": [{"method": "Connect"},
                             {"method": "Publish", "topics": ["floor/{principal.attributes.floor}/#"]}]},
        {"principals": {"usernames": ["bob"]}, "brokerResources": [{"method": "Connect"}]}
    ])
}

fn password_port() -> Value {
    json!({"port": 0, "protocol": "Mqtt",
           "authenticationEnabled": true, "authenticationRefs": ["passwords"],
           "authorizationEnabled": true, "authorizationRefs": ["authz"]})
}

fn passwords(alice: &str) -> Value {
    json!([{"id": id("authentications", "passwords"), "name": "passwords", "methods": [
        {"method": "UsernamePassword", "credentials": [
            {"username": "alice", "passwordHash": hash(alice), "attributes": {"floor": "3"}},
            {"username": "bob", "passwordHash": hash("bob-pw")}
        ]}
    ]}])
}

fn login(id: &str, user: Option<&str>, password: &str) -> meridian_codec::Connect {
    let mut c = connect_packet(id, Protocol::V5);
    c.username = user.map(str::to_owned);
    c.password = user.map(|_| bytes::Bytes::copy_from_slice(password.as_bytes()));
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

#[tokio::test]
async fn inline_password_credentials_authenticate_and_a_changed_hash_disconnects_that_user() {
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(
        1,
        password_port(),
        passwords("alice-pw"),
        floor_rules(),
    ))
    .await
    .expect("applied");
    let addr = main_addr(&b);

    let (_, ack) = Raw::connect_with(addr, login("a2", Some("alice"), "wrong")).await;
    assert_eq!(ack.reason_code.0, 0x86, "bad password");
    let (_, ack) = Raw::connect_with(addr, login("anon", None, "")).await;
    assert_eq!(ack.reason_code.0, 0x87, "no credentials");
    let (_, ack) = Raw::connect_with(addr, login("m", Some("mallory"), "x")).await;
    assert_eq!(ack.reason_code.0, 0x86, "unknown user");

    let (mut alice, ack) = Raw::connect_with(addr, login("a1", Some("alice"), "alice-pw")).await;
    assert_eq!(ack.reason_code.0, 0);
    // Her credential's attributes reach the rules: floor 3 only.
    assert_eq!(publish_qos1(&mut alice, "floor/3/t", 1).await, 0x10);
    assert_eq!(publish_qos1(&mut alice, "floor/4/t", 2).await, 0x87);
    let (mut bob, ack) = Raw::connect_with(addr, login("b1", Some("bob"), "bob-pw")).await;
    assert_eq!(ack.reason_code.0, 0);

    // Alice's password changes: she is disconnected, Bob is not.
    b.apply_snapshot(snapshot(
        2,
        password_port(),
        passwords("new-pw"),
        floor_rules(),
    ))
    .await
    .expect("applied");
    match alice.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code.0, 0x87);
            let why = d.properties.reason_string.unwrap_or_default();
            assert!(why.contains("alice"), "{why}");
        }
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }
    assert!(bob.ping().await);
    let (_, ack) = Raw::connect_with(addr, login("a1", Some("alice"), "new-pw")).await;
    assert_eq!(ack.reason_code.0, 0, "the new password works");
    b.shutdown().await;
}

/// A CA and a client certificate it signed (CN `cn`): (CA PEM, client chain DER, client key).
fn client_pki(
    cn: &str,
) -> (
    String,
    Vec<rustls_pki_types::CertificateDer<'static>>,
    KeyPair,
) {
    let (ca_pem, issuer, ca_der) = devices_ca();
    let (chain, key) = leaf_of(&issuer, &ca_der, cn);
    (ca_pem, chain, key)
}

type DevicesCa = (
    String,
    Issuer<'static, KeyPair>,
    rustls_pki_types::CertificateDer<'static>,
);

fn devices_ca() -> DevicesCa {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Test Devices CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    (
        ca_cert.pem(),
        Issuer::new(ca, ca_key),
        ca_cert.der().clone(),
    )
}

fn leaf_of(
    issuer: &Issuer<'static, KeyPair>,
    ca_der: &rustls_pki_types::CertificateDer<'static>,
    cn: &str,
) -> (Vec<rustls_pki_types::CertificateDer<'static>>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, cn);
    let leaf_cert = leaf.signed_by(&key, issuer).unwrap();
    (vec![leaf_cert.der().clone(), ca_der.clone()], key)
}

/// MQTT over TLS: CONNECT then read packets.
struct TlsRaw {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: BytesMut,
}

impl TlsRaw {
    async fn open(
        addr: SocketAddr,
        server_ca: &rustls_pki_types::CertificateDer<'static>,
        client: Option<(&[rustls_pki_types::CertificateDer<'static>], &KeyPair)>,
    ) -> std::io::Result<TlsRaw> {
        TlsRaw::open_as("localhost", addr, server_ca, client).await
    }

    /// [`TlsRaw::open`] with `sni` as the server name (Event Grid clients name their namespace).
    async fn open_as(
        sni: &str,
        addr: SocketAddr,
        server_ca: &rustls_pki_types::CertificateDer<'static>,
        client: Option<(&[rustls_pki_types::CertificateDer<'static>], &KeyPair)>,
    ) -> std::io::Result<TlsRaw> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match client {
            Some((chain, key)) => builder
                .with_client_auth_cert(
                    chain.to_vec(),
                    rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        Ok(TlsRaw {
            tls,
            buf: BytesMut::new(),
        })
    }

    async fn send(&mut self, p: Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        meridian_codec::encode(&p, Protocol::V5, &mut out).unwrap();
        self.tls.write_all(&out).await
    }

    async fn recv(&mut self) -> Option<Packet> {
        let opts = meridian_codec::DecodeOptions {
            version: Some(Protocol::V5),
            ..Default::default()
        };
        loop {
            if let Ok(Some(p)) = meridian_codec::decode(&mut self.buf, &opts) {
                return Some(p);
            }
            match tokio::time::timeout(WAIT, self.tls.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }
}

#[tokio::test]
async fn x509_method_on_a_tls_port_maps_certificate_subjects_to_attributes() {
    meridian_net::install_crypto_provider();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (ca_pem, chain, key) = client_pki("thermostat-1");
    let (_, stranger_chain, stranger_key) = client_pki("thermostat-1");
    let port = json!({"port": 0, "protocol": "Mqtt",
        "tls": {"certificate": {"mode": "Manual",
                                "certificatePem": server.cert.pem(),
                                "privateKeyPem": server.signing_key.serialize_pem()}},
        "authenticationEnabled": true, "authenticationRefs": ["certs"],
        "authorizationEnabled": true, "authorizationRefs": ["authz"]});
    let authn = json!([{"id": id("authentications", "certs"), "name": "certs", "methods": [
        {"method": "X509", "trustedCaPem": ca_pem,
         "authorizationAttributes": {"thermostats": {"subject": "CN = thermostat-1",
                                                     "attributes": {"floor": "3"}}}}
    ]}]);
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snapshot(1, port, authn, floor_rules()))
        .await
        .expect("applied");
    let listener = &b.snapshot_listeners()[0];
    assert_eq!(listener.transport, meridian_broker::Transport::Tls);
    let addr = listener.addr;

    let mut c = TlsRaw::open(addr, server.cert.der(), Some((&chain, &key)))
        .await
        .expect("mutual TLS handshake");
    c.send(Packet::Connect(Box::new(connect_packet(
        "t1",
        Protocol::V5,
    ))))
    .await
    .unwrap();
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code.0 == 0));
    for (pid, topic, want) in [(1, "floor/3/temp", 0x10), (2, "floor/4/temp", 0x87)] {
        c.send(Packet::Publish(meridian_codec::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: pid,
            payload: bytes::Bytes::from_static(b"21.5"),
            properties: Default::default(),
        }))
        .await
        .unwrap();
        match c.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.reason_code.0, want, "{topic}"),
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }

    // A certificate from another CA, or none, never gets an MQTT session.
    for client in [Some((&stranger_chain[..], &stranger_key)), None] {
        let refused = match TlsRaw::open(addr, server.cert.der(), client).await {
            Err(_) => true,
            Ok(mut t) => {
                // TLS 1.3 reports a refused client certificate after the handshake.
                let _ = t
                    .send(Packet::Connect(Box::new(connect_packet("x", Protocol::V5))))
                    .await;
                tokio::time::timeout(Duration::from_secs(5), t.recv())
                    .await
                    .unwrap_or(None)
                    .is_none()
            }
        };
        assert!(refused, "client certificate required and verified");
    }
    b.shutdown().await;
}

#[tokio::test]
async fn event_grid_clients_reach_their_namespace_by_sni_and_are_judged_by_its_bindings() {
    meridian_net::install_crypto_provider();
    let server = rcgen::generate_simple_self_signed(vec!["ns1.example.com".to_string()]).unwrap();
    let (ca_pem, issuer, ca_der) = devices_ca();
    let (dev1, dev1_key) = leaf_of(&issuer, &ca_der, "dev1");
    let (dev2, dev2_key) = leaf_of(&issuer, &ca_der, "dev2");
    let ns = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.EventGrid/namespaces/ns1";
    let snap = BrokerSnapshot::from_value(json!({
        "schemaVersion": 1, "brokerId": BROKER, "generation": 1,
        "listeners": [{"id": id("listeners", "eg"), "name": "eg", "ports": [{
            "port": 0, "protocol": "Mqtt",
            "tls": {"certificate": {"mode": "Manual", "certificatePem": server.cert.pem(),
                                    "privateKeyPem": server.signing_key.serialize_pem()}},
            "authenticationEnabled": true}]}],
        "namespaces": [{
            "id": ns, "name": "ns1", "topicSpacesEnabled": true,
            "clients": [
                {"id": format!("{ns}/clients/dev1"), "name": "dev1", "authenticationName": "dev1"},
                {"id": format!("{ns}/clients/dev2"), "name": "dev2", "authenticationName": "dev2",
                 "state": "Disabled"}
            ],
            "topicSpaces": [{"id": format!("{ns}/topicSpaces/own"), "name": "own",
                             "topicTemplates": ["devices/${client.authenticationName}/#"]}],
            "permissionBindings": [{"id": format!("{ns}/permissionBindings/pub"), "name": "pub",
                                    "clientGroupName": "$all", "topicSpaceName": "own",
                                    "permission": "Publisher"}],
            "caCertificates": [{"id": format!("{ns}/caCertificates/devices"), "name": "devices",
                                "encodedCertificate": ca_pem}]
        }]
    }))
    .unwrap();
    let (b, _) = start(cfg()).await;
    b.apply_snapshot(snap).await.expect("applied");
    let addr = main_addr(&b);
    let server_ca = server.cert.der();

    let connect_as = |user: &str| {
        let mut c = connect_packet(user, Protocol::V5);
        c.username = Some(user.to_owned());
        Packet::Connect(Box::new(c))
    };
    let mut c = TlsRaw::open_as("ns1.example.com", addr, server_ca, Some((&dev1, &dev1_key)))
        .await
        .expect("handshake");
    c.send(connect_as("dev1")).await.unwrap();
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code.0 == 0));
    for (pid, topic, want) in [(1, "devices/dev1/t", 0x10), (2, "devices/dev2/t", 0x87)] {
        c.send(Packet::Publish(meridian_codec::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: pid,
            payload: bytes::Bytes::from_static(b"1"),
            properties: Default::default(),
        }))
        .await
        .unwrap();
        match c.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.reason_code.0, want, "{topic}"),
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }

    // dev2's certificate claiming to be dev1: the subject must match the authentication name.
    let mut c = TlsRaw::open_as("ns1.example.com", addr, server_ca, Some((&dev2, &dev2_key)))
        .await
        .expect("handshake");
    c.send(connect_as("dev1")).await.unwrap();
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code.0 == 0x86));
    // dev2 as itself: a disabled client.
    let mut c = TlsRaw::open_as("ns1.example.com", addr, server_ca, Some((&dev2, &dev2_key)))
        .await
        .expect("handshake");
    c.send(connect_as("dev2")).await.unwrap();
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code.0 == 0x87));
    b.shutdown().await;
}

#[tokio::test]
async fn automatic_tls_ports_serve_a_certificate_for_their_sans_keep_it_and_remove_it_with_the_port()
 {
    meridian_net::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg();
    c.data_dir = Some(dir.path().to_path_buf());
    let (b, _) = start(c).await;
    let port = json!({"port": 0, "protocol": "Mqtt",
        "tls": {"certificate": {"mode": "Automatic", "san": {"dns": ["localhost"], "ip": []}}}});
    let snap = |generation| {
        BrokerSnapshot::from_value(json!({
            "schemaVersion": 1, "brokerId": BROKER, "generation": generation,
            "listeners": [{"id": id("listeners", "tls"), "name": "tls", "ports": [port.clone()]}],
        }))
        .unwrap()
    };
    b.apply_snapshot(snap(1)).await.expect("applied");
    let addr = main_addr(&b);
    // The node issued its certificate into DATA_DIR/tls; a client trusting it connects.
    let cert_file = std::fs::read_dir(dir.path().join("tls"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".crt.pem"))
        .expect("certificate written");
    let der = rustls_pki_types::CertificateDer::from_pem_file(&cert_file).unwrap();
    let mut t = TlsRaw::open(addr, &der, None).await.expect("TLS handshake");
    t.send(Packet::Connect(Box::new(connect_packet(
        "auto",
        Protocol::V5,
    ))))
    .await
    .unwrap();
    assert!(matches!(t.recv().await, Some(Packet::ConnAck(a)) if a.reason_code.0 == 0));
    // The same port in the next generation keeps its socket and its clients.
    b.apply_snapshot(snap(2)).await.expect("applied");
    assert_eq!(main_addr(&b), addr);
    t.send(Packet::PingReq).await.unwrap();
    assert_eq!(t.recv().await, Some(Packet::PingResp));
    // Without the port, its private key does not stay on disk.
    let none = BrokerSnapshot::from_value(json!({
        "schemaVersion": 1, "brokerId": BROKER, "generation": 3}))
    .unwrap();
    b.apply_snapshot(none).await.expect("applied");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("tls"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "TLS material left behind: {left:?}");
    b.shutdown().await;
}
