//! `meridian-bench authz`: what authorization costs on the hot path (issue 5: "throughput with
//! 1,000 rules/bindings within 10% of throughput with authorization off").
//!
//! For every measurement the bench starts a fresh release `meridian broker` as a node (with an
//! unreachable control plane, so it serves without one), pushes a snapshot with `PUT /v1/snapshot`
//! on its admin port (bearer = the node token) that opens one snapshot listener, checks that the
//! listener enforces (or, for the baselines, does not enforce) the policy with a few v5 probes,
//! and then runs the same throughput load as `compare` against that listener. Modes:
//!
//! - `off`: plain TCP, `authorizationEnabled: false` (the baseline of `rules` and `rules-crowded`).
//! - `rules`: 1,000 IoT Operations rules (`--rules`) with varied principals (client ids, usernames,
//!   attribute sets) and topics with `{principal.*}` variables, spread over many first topic
//!   levels; a few share the bench topic's first level and a few start with a wildcard. The bench
//!   clients are granted by one rule near the end (`bench/+/{principal.clientId}`).
//! - `rules-crowded`: the same, but a quarter of the rules share the bench topic's first level
//!   (`bench/d{i}/...`): the engine indexes rules by first level, so this is its worst case.
//! - `tls-off`: TLS with client certificates, no authorization (the baseline of `eventgrid`).
//! - `eventgrid`: the same TLS port with an Event Grid namespace bound (clients reach it by SNI)
//!   with 1,000 topic spaces and 1,000 permission bindings; the bench clients' binding is near
//!   the end (`bench/+/${client.authenticationName}`).
//!
//! Rounds interleave the modes (the order alternates every round) so a busy neighbour slows both
//! sides of a ratio alike; each round's ratio pairs a mode with its baseline of the same round.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use meridian_codec::{Packet, Protocol, QoS};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::broker::{self, BrokerKind, BrokerPaths, RunningBroker};
use crate::client::{Client, ClientOptions, TlsClient, publish};
use crate::report::fmt_rate;
use crate::scenario::{Outcome, Runner, Scenario, Settings, TopicLayout};

const BROKER_ID: &str = "/subscriptions/bench/resourceGroups/bench/providers/Microsoft.IoTOperations/instances/bench/brokers/default";
const NODE_TOKEN: &str = "meridian-bench-node-token";
/// CONNECT username of the bench clients in the IoT Operations modes.
const BENCH_USER: &str = "meridian-bench";
/// The Event Grid namespace; clients name it in their TLS SNI.
const NAMESPACE: &str = "benchns";
const SNI: &str = "benchns.meridian.test";
/// Registered Event Grid client (and certificate CN) every bench client authenticates as.
const EG_CLIENT: &str = "bench-device";

#[derive(Args)]
pub(crate) struct AuthzArgs {
    /// The Meridian binary (default: `meridian` next to this executable, else target/release).
    #[arg(long, env = "MERIDIAN_BIN")]
    meridian_bin: Option<PathBuf>,
    /// Modes (comma-separated): off, rules, rules-crowded, tls-off, eventgrid.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "off,rules,rules-crowded,tls-off,eventgrid"
    )]
    modes: Vec<String>,
    /// Scenarios (throughput only): tp-P-S-qN keys as in `compare`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tp-1-1-q0,tp-1-1-q1,tp-100-1-q0"
    )]
    scenarios: Vec<String>,
    /// Rounds; each round runs every scenario once in every mode.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// IoT Operations rules in `rules`/`rules-crowded`, and topic spaces = permission bindings
    /// in `eventgrid`.
    #[arg(long, default_value_t = 1000)]
    rules: usize,
    /// The target: a mode passes when its median paired ratio to its baseline is at least
    /// 1 - this.
    #[arg(long, default_value_t = 0.10)]
    max_slowdown: f64,
    /// Payload size in bytes (at least 20).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Seconds of publishing per measurement.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// QoS 1 publisher window.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// MQTT protocol of the load clients: 4 (3.1.1) or 5. The enforcement probes always use 5.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    protocol: u8,
    /// Maximum seconds to wait for in-transit messages after publishing stops.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Per-session queue limit of the broker (as in `compare`).
    #[arg(long, default_value_t = 10_000_000)]
    queue_limit: u64,
    /// Extra argument for `meridian broker` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    meridian_arg: Vec<String>,
    /// Also write the markdown tables to this file.
    #[arg(long)]
    markdown_out: Option<PathBuf>,
    /// Also write the raw results as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
enum Mode {
    Off,
    Rules,
    RulesCrowded,
    TlsOff,
    EventGrid,
}

impl Mode {
    fn parse(s: &str) -> anyhow::Result<Mode> {
        Ok(match s.trim() {
            "off" => Mode::Off,
            "rules" => Mode::Rules,
            "rules-crowded" => Mode::RulesCrowded,
            "tls-off" => Mode::TlsOff,
            "eventgrid" => Mode::EventGrid,
            other => {
                bail!("unknown mode {other} (off, rules, rules-crowded, tls-off, eventgrid)")
            }
        })
    }

    fn key(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Rules => "rules",
            Mode::RulesCrowded => "rules-crowded",
            Mode::TlsOff => "tls-off",
            Mode::EventGrid => "eventgrid",
        }
    }

    fn describe(self, n: usize) -> String {
        match self {
            Mode::Off => "TCP, authorization off".into(),
            Mode::Rules => format!("TCP, {n} IoT Operations rules (spread)"),
            Mode::RulesCrowded => format!("TCP, {n} rules, 1/4 on the bench's first level"),
            Mode::TlsOff => "TLS + client certs, authorization off".into(),
            Mode::EventGrid => format!("TLS, Event Grid: {n} topic spaces + {n} bindings"),
        }
    }

    /// The mode this one is compared with (`None`: a baseline).
    fn baseline(self) -> Option<Mode> {
        match self {
            Mode::Rules | Mode::RulesCrowded => Some(Mode::Off),
            Mode::EventGrid => Some(Mode::TlsOff),
            Mode::Off | Mode::TlsOff => None,
        }
    }

    fn enforces(self) -> bool {
        self.baseline().is_some()
    }

    fn tls(self) -> bool {
        matches!(self, Mode::TlsOff | Mode::EventGrid)
    }
}

/// Certificates for the TLS modes: the server's (self-signed, SAN = the namespace's SNI) and a
/// devices CA that issued the bench clients' certificate (CN = [`EG_CLIENT`]) and a stranger's.
struct Pki {
    server_cert_pem: String,
    server_key_pem: String,
    devices_ca_pem: String,
    bench: TlsClient,
    /// A certificate of the same CA for an unregistered name (`stranger`).
    stranger: TlsClient,
    /// The bench certificate, but an SNI that names no namespace.
    no_namespace: TlsClient,
}

impl Pki {
    fn generate() -> anyhow::Result<Pki> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let server = rcgen::generate_simple_self_signed(vec![
            SNI.to_string(),
            "other.meridian.test".to_string(),
        ])?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "meridian-bench devices CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let ca_der = ca_cert.der().clone();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |cn: &str| -> anyhow::Result<(Vec<_>, Vec<u8>)> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            let cert = p.signed_by(&key, &issuer)?;
            Ok((
                vec![cert.der().clone(), ca_der.clone()],
                key.serialize_der(),
            ))
        };
        let server_der = server.cert.der().clone();
        let (chain, key) = leaf(EG_CLIENT)?;
        let (s_chain, s_key) = leaf("stranger")?;
        Ok(Pki {
            server_cert_pem: server.cert.pem(),
            server_key_pem: server.signing_key.serialize_pem(),
            devices_ca_pem: ca_cert.pem(),
            bench: TlsClient::new(server_der.clone(), chain.clone(), key.clone(), SNI)?,
            stranger: TlsClient::new(server_der.clone(), s_chain, s_key, SNI)?,
            no_namespace: TlsClient::new(server_der, chain, key, "other.meridian.test")?,
        })
    }
}

fn id(kind: &str, name: &str) -> String {
    format!("{BROKER_ID}/{kind}/{name}")
}

/// The IoT Operations authorization: `n` rules, the bench clients' rule at `n - 10` (or the
/// last when `n` < 10). `crowded`: every fourth decoy shares the bench topic's first level.
fn iot_rules(n: usize, crowded: bool) -> Value {
    let bench_at = n.saturating_sub(10);
    let mut rules = Vec::with_capacity(n);
    for i in 0..n {
        if i == bench_at {
            rules.push(json!({
                "principals": {"usernames": [BENCH_USER]},
                "brokerResources": [
                    {"method": "Connect", "clientIds": ["mb-*"]},
                    {"method": "Publish", "topics": ["bench/+/{principal.clientId}"]},
                    {"method": "Subscribe", "topics": ["bench/+/+"]},
                ]
            }));
            continue;
        }
        // Who: a client id, a username or an attribute set (never the bench clients).
        let (principals, connect_ids) = match i % 3 {
            0 => (
                json!({"clientIds": [format!("device-{i}"), format!("device-{i}-b")]}),
                json!([format!("device-{i}*")]),
            ),
            1 => (
                json!({"usernames": [format!("user-{i}")]}),
                json!(["{principal.username}-*"]),
            ),
            _ => (
                json!({"attributes": [{"building": format!("b{i}"), "floor": format!("{}", i % 7)}]}),
                json!(["{principal.attributes.building}*"]),
            ),
        };
        // What: topics with variables, over many first levels. A few rules share the bench
        // topic's first level (many in the crowded mode), a few start with a wildcard (scanned on
        // every request).
        let (publish, subscribe) = if (crowded && i % 4 == 2) || (!crowded && i % 100 == 2) {
            (
                format!("bench/d{i}/{{principal.clientId}}"),
                format!("bench/d{i}/#"),
            )
        } else if i % 100 == 5 {
            (
                format!("+/status/r{i}"),
                format!("+/status/r{i}/{{principal.clientId}}"),
            )
        } else {
            match i % 4 {
                0 => (
                    format!("devices/{{principal.clientId}}/telemetry/r{i}"),
                    "devices/{principal.clientId}/commands/#".to_string(),
                ),
                1 => (
                    format!("sites/s{i}/{{principal.attributes.building}}/+"),
                    format!("sites/s{i}/#"),
                ),
                2 => (
                    format!("fleet-{i}/{{principal.clientId}}/out"),
                    format!("fleet-{i}/{{principal.clientId}}/in/#"),
                ),
                _ => (
                    format!("{{principal.username}}/r{i}/out"),
                    format!("{{principal.username}}/r{i}/in/#"),
                ),
            }
        };
        rules.push(json!({
            "principals": principals,
            "brokerResources": [
                {"method": "Connect", "clientIds": connect_ids},
                {"method": "Publish", "topics": [publish]},
                {"method": "Subscribe", "topics": [subscribe]},
            ]
        }));
    }
    json!({"id": id("authorizations", "bench-authz"), "name": "bench-authz", "rules": rules})
}

/// The Event Grid namespace: `n` topic spaces and `n` permission bindings, the bench client's
/// Publisher and Subscriber bindings at `n - 10` and `n - 9`.
fn event_grid_namespace(n: usize, devices_ca_pem: &str) -> Value {
    let ns = format!(
        "/subscriptions/bench/resourceGroups/bench/providers/Microsoft.EventGrid/namespaces/{NAMESPACE}"
    );
    let groups = 20;
    let mut client_groups: Vec<Value> = (0..groups)
        .map(|g| {
            json!({"id": format!("{ns}/clientGroups/sensors-{g}"), "name": format!("sensors-{g}"),
                   "query": format!("attributes.type = 'sensor-{g}'")})
        })
        .collect();
    client_groups.push(
        json!({"id": format!("{ns}/clientGroups/benchers"), "name": "benchers",
                              "query": "attributes.role = 'bench'"}),
    );
    let mut clients = vec![json!({
        "id": format!("{ns}/clients/{EG_CLIENT}"), "name": EG_CLIENT,
        "authenticationName": EG_CLIENT,
        "attributes": {"role": "bench", "type": "bench", "floor": 3}
    })];
    for c in 0..100 {
        clients.push(json!({
            "id": format!("{ns}/clients/sensor-{c}"), "name": format!("sensor-{c}"),
            "authenticationName": format!("sensor-{c}"),
            "attributes": {"type": format!("sensor-{}", c % groups), "floor": c % 7}
        }));
    }
    let (pub_at, sub_at) = (n.saturating_sub(10), n.saturating_sub(9));
    let mut spaces = Vec::with_capacity(n);
    let mut bindings = Vec::with_capacity(n);
    for i in 0..n {
        let (templates, group) = if i == pub_at {
            (
                json!(["bench/+/${client.authenticationName}"]),
                "benchers".to_string(),
            )
        } else if i == sub_at {
            (json!(["bench/+/+"]), "benchers".to_string())
        } else {
            let t = if i % 100 == 2 {
                format!("bench/d{i}/${{client.authenticationName}}")
            } else if i % 100 == 5 {
                format!("+/status/t{i}")
            } else {
                match i % 4 {
                    0 => format!("devices/${{client.authenticationName}}/t{i}/#"),
                    1 => format!("sites/s{i}/${{client.attributes.floor}}/+"),
                    2 => format!("fleet-{i}/${{client.authenticationName}}/out"),
                    _ => format!("zone-{i}/+/telemetry"),
                }
            };
            (json!([t]), format!("sensors-{}", i % groups))
        };
        let permission = if i == sub_at || (i != pub_at && i % 2 == 1) {
            "Subscriber"
        } else {
            "Publisher"
        };
        spaces.push(
            json!({"id": format!("{ns}/topicSpaces/ts-{i}"), "name": format!("ts-{i}"),
                           "topicTemplates": templates}),
        );
        bindings.push(json!({"id": format!("{ns}/permissionBindings/pb-{i}"),
                             "name": format!("pb-{i}"), "clientGroupName": group,
                             "topicSpaceName": format!("ts-{i}"), "permission": permission}));
    }
    json!({
        "id": ns, "name": NAMESPACE, "topicSpacesEnabled": true,
        "clients": clients, "clientGroups": client_groups,
        "topicSpaces": spaces, "permissionBindings": bindings,
        "caCertificates": [{"id": format!("{ns}/caCertificates/devices"), "name": "devices",
                            "encodedCertificate": devices_ca_pem}]
    })
}

/// The snapshot for `mode`: one listener with one port.
fn snapshot(mode: Mode, port: u16, rules: usize, pki: Option<&Pki>) -> anyhow::Result<Value> {
    let mut port_json = json!({"port": port, "protocol": "Mqtt"});
    let mut authorizations = json!([]);
    let mut namespaces = json!([]);
    match mode {
        Mode::Off => {}
        Mode::Rules | Mode::RulesCrowded => {
            authorizations = json!([iot_rules(rules, mode == Mode::RulesCrowded)]);
            port_json["authorizationEnabled"] = json!(true);
            port_json["authorizationRefs"] = json!(["bench-authz"]);
        }
        Mode::TlsOff | Mode::EventGrid => {
            let pki = pki.context("TLS modes need certificates")?;
            let mut tls = json!({"certificate": {"mode": "Manual",
                "certificatePem": pki.server_cert_pem, "privateKeyPem": pki.server_key_pem}});
            if mode == Mode::TlsOff {
                // The same handshake as with the namespace: client certificates required.
                tls["clientCaPem"] = json!(pki.devices_ca_pem);
            } else {
                // Event Grid clients authenticate by namespace; anyone else is refused.
                port_json["authenticationEnabled"] = json!(true);
                namespaces = json!([event_grid_namespace(rules, &pki.devices_ca_pem)]);
            }
            port_json["tls"] = tls;
        }
    }
    Ok(json!({
        "schemaVersion": 1,
        "brokerId": BROKER_ID,
        "generation": 1,
        "listeners": [{"id": id("listeners", "bench"), "name": "bench", "ports": [port_json]}],
        "authorizations": authorizations,
        "namespaces": namespaces,
    }))
}

/// `PUT /v1/snapshot` on the node's admin endpoint; the node's answer on success.
async fn push_snapshot(admin: &str, body: &[u8]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(admin).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context(format!("admin endpoint {admin}")),
        }
    };
    let head = format!(
        "PUT /v1/snapshot HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {NODE_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
        .await
        .context("no answer to PUT /v1/snapshot")??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if status != "200" {
        bail!("PUT /v1/snapshot answered {status}: {body}");
    }
    Ok(body.to_string())
}

/// One enforcement probe: what was tried, what the mode must answer, what the broker answered.
#[derive(Debug, Clone, serde::Serialize)]
struct Probe {
    what: String,
    expected: &'static str,
    got: String,
    ok: bool,
}

fn probe(p: &mut Vec<Probe>, what: String, want_allowed: bool, allowed: bool, got: String) {
    p.push(Probe {
        what,
        expected: if want_allowed { "allowed" } else { "refused" },
        got,
        ok: want_allowed == allowed,
    });
}

/// Probes the listener: a stranger's CONNECT, a forbidden SUBSCRIBE, an allowed and two forbidden
/// QoS 1 PUBLISHes (v5: PUBACK 0x87) and which of them a subscriber received. In the baselines
/// everything is allowed; in the enforcing modes exactly the grants of the bench rule/binding.
async fn enforcement_probes(
    addr: &str,
    mode: Mode,
    pki: Option<&Pki>,
) -> anyhow::Result<Vec<Probe>> {
    let enforced = mode.enforces();
    let opts = |id: &str, user: Option<&str>, t: Option<TlsClient>| ClientOptions {
        client_id: id.to_string(),
        protocol: Protocol::V5,
        keep_alive: 60,
        buffer: 16 * 1024,
        username: user.map(str::to_string),
        tls: t,
    };
    let (me, other, user) = if mode.tls() {
        (EG_CLIENT, "sensor-1", EG_CLIENT)
    } else {
        ("mb-check-pub", "mb-someone-else", BENCH_USER)
    };
    let bench_tls = pki.filter(|_| mode.tls()).map(|p| p.bench.clone());
    let mut out = Vec::new();

    // 1. Someone no rule/binding admits.
    let (what, stranger) = match (mode.tls(), pki) {
        (true, Some(p)) if mode == Mode::EventGrid => (
            "CONNECT with a certificate of an unregistered client (CN=stranger)",
            opts("stranger", Some("stranger"), Some(p.stranger.clone())),
        ),
        (true, Some(p)) => (
            "CONNECT as an unregistered client (CN=stranger)",
            opts("stranger", Some("stranger"), Some(p.stranger.clone())),
        ),
        _ => (
            "CONNECT as client id intruder-1, username nobody",
            opts("intruder-1", Some("nobody"), None),
        ),
    };
    let r = Client::try_connect(addr, &stranger).await;
    let (allowed, got) = match r {
        Ok(Ok(_)) => (true, "CONNACK 0x00".to_string()),
        Ok(Err(code)) => (false, format!("CONNACK {code:#04x}")),
        Err(e) => (false, format!("{e:#}")),
    };
    probe(&mut out, what.into(), !enforced, allowed, got);
    if mode.tls()
        && let Some(p) = pki
    {
        let o = opts(
            "mb-check-nons",
            Some(EG_CLIENT),
            Some(p.no_namespace.clone()),
        );
        let (allowed, got) = match Client::try_connect(addr, &o).await {
            Ok(Ok(_)) => (true, "CONNACK 0x00".to_string()),
            Ok(Err(code)) => (false, format!("CONNACK {code:#04x}")),
            Err(e) => (false, format!("{e:#}")),
        };
        probe(
            &mut out,
            "CONNECT with the bench certificate but an SNI naming no namespace".into(),
            !enforced,
            allowed,
            got,
        );
    }

    // 2. The bench identity subscribes: its own tree is allowed, `#` is not.
    let mut sub = Client::connect(addr, &opts("mb-check-sub", Some(user), bench_tls.clone()))
        .await
        .context("probe subscriber")?;
    let codes = sub
        .subscribe_codes("bench/check/+", QoS::AtLeastOnce)
        .await?;
    let ok = codes.iter().all(|c| !c.is_error());
    probe(
        &mut out,
        "SUBSCRIBE bench/check/+ (granted to the bench clients)".into(),
        true,
        ok,
        format!("SUBACK {:#04x}", codes.first().map_or(0, |c| c.0)),
    );
    let codes = sub.subscribe_codes("#", QoS::AtLeastOnce).await?;
    let ok = codes.iter().all(|c| !c.is_error());
    probe(
        &mut out,
        "SUBSCRIBE #".into(),
        !enforced,
        ok,
        format!("SUBACK {:#04x}", codes.first().map_or(0, |c| c.0)),
    );
    if !ok {
        // Some brokers close after a refused filter; ours does not, but resubscribe to be sure
        // the probe subscriber is still there.
        sub.subscribe_codes("bench/check/+", QoS::AtLeastOnce)
            .await?;
    }

    // 3. Publishes: own topic allowed; another client's topic and a decoy's topic refused.
    let mut publ = Client::connect(addr, &opts(me, Some(user), bench_tls))
        .await
        .context("probe publisher")?;
    let decoy = if mode.tls() {
        format!("devices/{EG_CLIENT}/t0/x")
    } else {
        format!("devices/{me}/telemetry/r0")
    };
    let topics = [
        (format!("bench/check/{me}"), true),
        (format!("bench/check/{other}"), !enforced),
        (decoy, !enforced),
    ];
    for (i, (topic, want)) in topics.iter().enumerate() {
        publ.writer
            .send(&publish(
                topic,
                QoS::AtLeastOnce,
                i as u16 + 1,
                Bytes::from_static(b"probe"),
            ))
            .await?;
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(10), publ.reader.next())
                .await
                .context("timed out waiting for PUBACK")??
            {
                Some(Packet::PubAck(a)) => break a.reason_code.0,
                Some(_) => continue,
                None => bail!("connection closed before PUBACK"),
            }
        };
        probe(
            &mut out,
            format!("PUBLISH QoS 1 {topic}"),
            *want,
            code < 0x80,
            format!("PUBACK {code:#04x}"),
        );
    }
    // Which of them reached the subscriber (of bench/check/+, and of # when it was granted).
    let mut received = Vec::new();
    let until = Instant::now() + Duration::from_millis(500);
    while let Ok(r) = tokio::time::timeout_at(until.into(), sub.reader.next()).await {
        match r? {
            Some(Packet::Publish(m)) => {
                if m.qos == QoS::AtLeastOnce {
                    sub.writer.send(&crate::client::puback(m.packet_id)).await?;
                }
                received.push(m.topic.clone());
            }
            Some(_) => {}
            None => break,
        }
    }
    for (topic, want) in &topics {
        probe(
            &mut out,
            format!("delivery of {topic}"),
            *want,
            received.contains(topic),
            if received.contains(topic) {
                "delivered".into()
            } else {
                "not delivered".into()
            },
        );
    }
    Ok(out)
}

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
struct Measurement {
    mode: Mode,
    scenario: String,
    round: usize,
    rate: Option<f64>,
    violations: u64,
    broker_drops: Option<String>,
    probes_ok: bool,
    error: Option<String>,
}

/// `after - before` of two [`broker::meridian_drops`] answers ("reason=count ..." or "0").
fn drops_delta(before: &str, after: &str) -> String {
    let parse = |s: &str| -> BTreeMap<String, f64> {
        s.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0.0)))
            .collect()
    };
    let b = parse(before);
    let d: Vec<String> = parse(after)
        .into_iter()
        .map(|(k, v)| (v - b.get(&k).copied().unwrap_or(0.0), k))
        .filter(|(v, _)| *v > 0.0)
        .map(|(v, k)| format!("{k}={v}"))
        .collect();
    if d.is_empty() {
        "0".into()
    } else {
        d.join(" ")
    }
}

fn parse_scenarios(keys: &[String]) -> anyhow::Result<Vec<Scenario>> {
    keys.iter()
        .map(|k| {
            let parts: Vec<&str> = k.trim().split('-').collect();
            let qos = match parts.last() {
                Some(&"q0") => QoS::AtMostOnce,
                Some(&"q1") => QoS::AtLeastOnce,
                _ => bail!("bad scenario {k} (tp-P-S-q0 or tp-P-S-q1)"),
            };
            match parts.as_slice() {
                ["tp", p, s, _] => Ok(Scenario::Throughput {
                    publishers: p.parse().context("publishers")?,
                    subscribers: s.parse().context("subscribers")?,
                    qos,
                }),
                _ => bail!("authz runs throughput scenarios only (tp-P-S-qN), not {k}"),
            }
        })
        .collect()
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(crate) async fn authz(
    a: AuthzArgs,
    subscriber_runtime: tokio::runtime::Handle,
) -> anyhow::Result<bool> {
    let modes: Vec<Mode> = a
        .modes
        .iter()
        .map(|m| Mode::parse(m))
        .collect::<anyhow::Result<_>>()?;
    let scenarios = parse_scenarios(&a.scenarios)?;
    let settings = Settings {
        payload: a.payload.max(20),
        duration: Duration::from_secs_f64(a.duration),
        inflight: a.inflight.max(1),
        protocol: if a.protocol == 5 {
            Protocol::V5
        } else {
            Protocol::V311
        },
        latency_rate: 0,
        latency_rounds: 1,
        idle_connections: 0,
        connect_concurrency: 1,
        drain_timeout: Duration::from_secs_f64(a.drain_timeout),
    };
    let pki = if modes.iter().any(|m| m.tls()) {
        Some(Pki::generate()?)
    } else {
        None
    };
    let mut meridian_args = vec![
        "--control-plane".to_string(),
        // Nothing listens there: the node serves without its control plane (reports back off).
        "http://127.0.0.1:9".to_string(),
        "--broker".to_string(),
        BROKER_ID.to_string(),
        "--token".to_string(),
        NODE_TOKEN.to_string(),
        "--node-id".to_string(),
        "meridian-bench".to_string(),
        "--snapshot-listener-host".to_string(),
        "127.0.0.1".to_string(),
    ];
    meridian_args.extend(a.meridian_arg.iter().cloned());
    let paths = BrokerPaths {
        meridian: a
            .meridian_bin
            .clone()
            .unwrap_or_else(crate::default_meridian_bin),
        mosquitto: PathBuf::new(),
        meridian_args,
        mosquitto_inflight: 0,
        queue_limit: a.queue_limit,
    };
    eprintln!("meridian: {}", paths.meridian.display());
    let snapshot_sizes: BTreeMap<&str, usize> = modes
        .iter()
        .map(|&m| {
            snapshot(m, 1, a.rules, pki.as_ref())
                .map(|s| (m.key(), serde_json::to_vec(&s).map_or(0, |b| b.len())))
        })
        .collect::<anyhow::Result<_>>()?;
    eprintln!("snapshot sizes (bytes): {snapshot_sizes:?}");

    let mut measurements: Vec<Measurement> = Vec::new();
    let mut probes: BTreeMap<&'static str, Vec<Probe>> = BTreeMap::new();
    let mut apply_ms: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for round in 0..a.rounds.max(1) {
        for sc in &scenarios {
            // Alternate the order every round so drift (a neighbour's build) hits both sides.
            let mut order = modes.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &mode in &order {
                let key = sc.key();
                eprintln!(
                    "== round {} {} {} ==",
                    round + 1,
                    sc.label(&settings),
                    mode.key()
                );
                let m = measure(
                    mode,
                    *sc,
                    round,
                    &a,
                    &paths,
                    &settings,
                    pki.as_ref(),
                    &subscriber_runtime,
                    &mut probes,
                    &mut apply_ms,
                )
                .await
                .unwrap_or_else(|e| Measurement {
                    mode,
                    scenario: key.clone(),
                    round,
                    rate: None,
                    violations: 0,
                    broker_drops: None,
                    probes_ok: false,
                    error: Some(format!("{e:#}")),
                });
                match (&m.error, m.rate) {
                    (Some(e), _) => eprintln!("  FAILED: {e}"),
                    (None, Some(r)) => eprintln!(
                        "  {r:.0} msg/s, violations {}, drops {}",
                        m.violations,
                        m.broker_drops.as_deref().unwrap_or("?")
                    ),
                    (None, None) => eprintln!("  no rate"),
                }
                measurements.push(m);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    let (md, pass) = render(
        &a,
        &modes,
        &scenarios,
        &settings,
        &measurements,
        &probes,
        &apply_ms,
        &snapshot_sizes,
    );
    println!("\n{md}");
    if let Some(p) = &a.markdown_out {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.json_out {
        let j = json!({"measurements": measurements, "probes": probes, "applyMs": apply_ms});
        std::fs::write(p, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(pass)
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    mode: Mode,
    sc: Scenario,
    round: usize,
    a: &AuthzArgs,
    paths: &BrokerPaths,
    settings: &Settings,
    pki: Option<&Pki>,
    subscriber_runtime: &tokio::runtime::Handle,
    probes: &mut BTreeMap<&'static str, Vec<Probe>>,
    apply_ms: &mut BTreeMap<&'static str, Vec<f64>>,
) -> anyhow::Result<Measurement> {
    let mut b = RunningBroker::start(BrokerKind::Meridian, paths)?;
    let admin = b.admin.clone().context("no admin endpoint")?;
    let port = broker::free_port()?;
    let body = serde_json::to_vec(&snapshot(mode, port, a.rules, pki)?)?;
    let t = Instant::now();
    let answer = push_snapshot(&admin, &body).await?;
    apply_ms
        .entry(mode.key())
        .or_default()
        .push(t.elapsed().as_secs_f64() * 1000.0);
    if !answer.contains("\"appliedGeneration\":1") {
        bail!("unexpected answer to the push: {answer}");
    }
    let addr = format!("127.0.0.1:{port}");
    let ps = enforcement_probes(&addr, mode, pki).await?;
    let probes_ok = ps.iter().all(|p| p.ok);
    if !probes_ok {
        for p in ps.iter().filter(|p| !p.ok) {
            eprintln!(
                "  PROBE FAILED: {}: expected {}, got {}",
                p.what, p.expected, p.got
            );
        }
    }
    probes.entry(mode.key()).or_insert(ps);
    // The probes' refused publishes are counted as not_authorized drops: count from here.
    let drops_before = broker::meridian_drops(&admin).unwrap_or_default();

    let mut runner = Runner::new(
        addr,
        settings.clone(),
        format!("{} {}", mode.key(), sc.key()),
        subscriber_runtime.clone(),
    );
    if mode.tls() {
        runner.username = Some(EG_CLIENT.into());
        runner.tls = pki.map(|p| p.bench.clone());
        runner.topics = TopicLayout::Suffix(EG_CLIENT.into());
    } else {
        runner.username = Some(BENCH_USER.into());
        runner.topics = TopicLayout::PerClientId;
    }
    let timeout = settings.duration + settings.drain_timeout * 2 + Duration::from_secs(120);
    let o: Outcome = tokio::time::timeout(timeout, runner.run(sc, Some(b.pid())))
        .await
        .context("scenario timed out")??;
    if !b.alive() {
        bail!("broker died during the scenario");
    }
    let drops = broker::meridian_drops(&admin)
        .ok()
        .map(|after| drops_delta(&drops_before, &after));
    let c = o.contract.as_ref();
    Ok(Measurement {
        mode,
        scenario: sc.key(),
        round,
        rate: o.rate,
        violations: c.map_or(0, |c| c.violations),
        broker_drops: drops,
        probes_ok,
        error: None,
    })
}

#[allow(clippy::too_many_arguments)]
fn render(
    a: &AuthzArgs,
    modes: &[Mode],
    scenarios: &[Scenario],
    s: &Settings,
    ms: &[Measurement],
    probes: &BTreeMap<&'static str, Vec<Probe>>,
    apply_ms: &BTreeMap<&'static str, Vec<f64>>,
    sizes: &BTreeMap<&str, usize>,
) -> (String, bool) {
    use std::fmt::Write;
    let mut md = String::new();
    let mut pass = true;
    let _ = writeln!(
        md,
        "Settings: payload {} B, {} s per measurement, QoS 1 window {}, MQTT {}, {} rounds (mode order alternating), {} rules/bindings, target: ratio ≥ {:.2}\n",
        s.payload,
        s.duration.as_secs_f64(),
        s.inflight,
        if s.protocol == Protocol::V5 {
            "5"
        } else {
            "3.1.1"
        },
        a.rounds.max(1),
        a.rules,
        1.0 - a.max_slowdown
    );
    let _ = writeln!(
        md,
        "| Scenario | Mode | msg/s per round | median | ratio to baseline (median of paired rounds) | paired range | Target | Met | broker drops per round |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---|---|---|---|");
    let rate_of = |mode: Mode, sc: &str, round: usize| {
        ms.iter()
            .find(|m| m.mode == mode && m.scenario == sc && m.round == round)
            .and_then(|m| if m.error.is_none() { m.rate } else { None })
    };
    for sc in scenarios {
        let key = sc.key();
        for &mode in modes {
            let rounds: Vec<&Measurement> = ms
                .iter()
                .filter(|m| m.mode == mode && m.scenario == key)
                .collect();
            let per: Vec<String> = rounds
                .iter()
                .map(|m| match (&m.error, m.rate) {
                    (None, Some(r)) => fmt_rate(r),
                    _ => "failed".into(),
                })
                .collect();
            let mut rates: Vec<f64> = rounds
                .iter()
                .filter(|m| m.error.is_none())
                .filter_map(|m| m.rate)
                .collect();
            let med = median(&mut rates);
            let (ratio, range, target, met) = match mode.baseline() {
                None => (
                    String::new(),
                    String::new(),
                    "baseline".to_string(),
                    String::new(),
                ),
                Some(base) if modes.contains(&base) => {
                    let mut paired: Vec<f64> = rounds
                        .iter()
                        .filter_map(|m| {
                            Some(rate_of(mode, &key, m.round)? / rate_of(base, &key, m.round)?)
                        })
                        .collect();
                    let lo = paired.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = paired.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let r = median(&mut paired);
                    let ok = r.is_some_and(|r| r >= 1.0 - a.max_slowdown)
                        && rounds
                            .iter()
                            .all(|m| m.probes_ok && m.violations == 0 && m.error.is_none());
                    if !ok {
                        pass = false;
                    }
                    (
                        r.map_or("-".into(), |r| format!("{r:.3}")),
                        if r.is_some() {
                            format!("{lo:.3} – {hi:.3}")
                        } else {
                            "-".into()
                        },
                        format!("≥ {:.2} × {}", 1.0 - a.max_slowdown, base.key()),
                        if ok { "PASS".into() } else { "**FAIL**".into() },
                    )
                }
                Some(base) => (
                    "-".into(),
                    "-".into(),
                    format!("(baseline {} not run)", base.key()),
                    String::new(),
                ),
            };
            let drops: Vec<String> = rounds
                .iter()
                .map(|m| m.broker_drops.clone().unwrap_or_else(|| "?".into()))
                .collect();
            let drops = if drops.iter().all(|d| d == "0") {
                "0".to_string()
            } else {
                drops.join(", ")
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {ratio} | {range} | {target} | {met} | {drops} |",
                sc.label(s),
                mode.key(),
                per.join(", "),
                med.map_or("-".into(), fmt_rate),
            );
        }
    }
    let _ = writeln!(md, "\nModes:\n");
    for &mode in modes {
        let mut ap = apply_ms.get(mode.key()).cloned().unwrap_or_default();
        let _ = writeln!(
            md,
            "- `{}`: {}; snapshot {} KiB, PUT /v1/snapshot answered in {} ms (median)",
            mode.key(),
            mode.describe(a.rules),
            sizes.get(mode.key()).copied().unwrap_or(0) / 1024,
            median(&mut ap).map_or("-".into(), |v| format!("{v:.0}"))
        );
    }
    let bad: Vec<&Measurement> = ms
        .iter()
        .filter(|m| m.error.is_some() || m.violations > 0 || !m.probes_ok)
        .collect();
    let _ = writeln!(
        md,
        "\nQoS contract violations over all measurements: {} (QoS 0 loss is allowed and shown as the broker's drop counters, counted from after the probes)",
        ms.iter().map(|m| m.violations).sum::<u64>(),
    );
    for m in bad {
        pass = false;
        let _ = writeln!(
            md,
            "- round {} {} {}: {}",
            m.round + 1,
            m.scenario,
            m.mode.key(),
            m.error.clone().unwrap_or_else(|| format!(
                "violations {}, probes ok {}",
                m.violations, m.probes_ok
            ))
        );
    }
    let _ = writeln!(
        md,
        "\nEnforcement probes (v5 clients, run on every broker before its load; shown: the first broker of each mode):\n"
    );
    let _ = writeln!(md, "| Mode | Probe | Expected | Broker answered | OK |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for &mode in modes {
        for p in probes.get(mode.key()).into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                mode.key(),
                p.what,
                p.expected,
                p.got,
                if p.ok { "yes" } else { "**no**" }
            );
        }
    }
    let _ = writeln!(md, "\nOverall: {}", if pass { "PASS" } else { "FAIL" });
    (md, pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_levels(rules: &Value, method: &str) -> Vec<String> {
        rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["brokerResources"].as_array().unwrap().clone())
            .filter(|res| res["method"] == method)
            .flat_map(|res| res["topics"].as_array().unwrap().clone())
            .map(|t| t.as_str().unwrap().split('/').next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_bench_rule_is_near_the_end_and_decoys_share_its_first_level_as_configured() {
        for (crowded, in_bucket) in [(false, 11), (true, 250)] {
            let r = iot_rules(1000, crowded);
            let rules = r["rules"].as_array().unwrap();
            assert_eq!(rules.len(), 1000);
            let bench: Vec<usize> = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r["principals"]["usernames"][0] == BENCH_USER)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(bench, vec![990]);
            let firsts = first_levels(&r, "Publish");
            assert_eq!(firsts.iter().filter(|f| *f == "bench").count(), in_bucket);
            assert_eq!(firsts.iter().filter(|f| *f == "+").count(), 10);
        }
    }

    #[test]
    fn the_namespace_has_n_topic_spaces_and_bindings() {
        let ns = event_grid_namespace(1000, "PEM");
        assert_eq!(ns["topicSpaces"].as_array().unwrap().len(), 1000);
        let b = ns["permissionBindings"].as_array().unwrap();
        assert_eq!(b.len(), 1000);
        assert_eq!(b[990]["clientGroupName"], "benchers");
        assert_eq!(b[990]["permission"], "Publisher");
        assert_eq!(b[991]["permission"], "Subscriber");
    }

    #[test]
    fn drop_counters_are_diffed() {
        assert_eq!(drops_delta("not_authorized=2", "not_authorized=2"), "0");
        assert_eq!(
            drops_delta("0", "not_authorized=3 slow_consumer=1"),
            "not_authorized=3 slow_consumer=1"
        );
    }
}
