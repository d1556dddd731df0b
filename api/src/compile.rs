//! The config compiler: a broker's desired state (its resources in the store) → one
//! [`BrokerSnapshot`] of the versioned config contract (`meridian-contract`).
//!
//! [`compile_broker`] reads everything it needs in ONE consistent read
//! ([`Store::read_consistent`]), so a snapshot never mixes two states of the database, and records
//! every resource it used (id + etag) in `sources`. It leaves `generation` at 0: the pusher
//! numbers what it pushes. [`brokers_affected_by`] answers which brokers a PUT or DELETE of a
//! resource requires recompiling.
//!
//! What a broker is compiled from:
//! - `Microsoft.IoTOperations/instances/{i}/brokers/{b}`: the broker (limits), its `listeners`,
//!   `authentications`, `authorizations`; the instance's `dataflowEndpoints`, `dataflowProfiles`
//!   and their `dataflows`.
//! - `Microsoft.IoTOperationsMQ/mq/{m}/broker/{b}`: the broker (limits), its `listener`,
//!   `authentication`, `authorization` children (authentications/authorizations attach to
//!   listeners through their `listenerRef`); the mq's `mqttBridgeConnector`s and their `topicMap`s.
//!   The MQ listener's `brokerRef` and a topic map's `mqttBridgeConnectorRef` are redundant with
//!   the resource path, which wins.
//! - `Microsoft.EventGrid/namespaces/{n}` bound to the broker, with all their children.
//!
//! **Binding rule** (Event Grid namespace → broker): a namespace whose tag [`BROKER_TAG`]
//! (`meridian.broker`, key compared case-insensitively) holds a broker's ARM id (compared
//! case-insensitively) is bound to that broker. A namespace without the tag is bound to the only
//! broker of its subscription when the subscription has exactly one broker (of either flavour),
//! and to none otherwise. A tag naming a broker that does not exist binds to nothing. Namespaces
//! bind only within their own subscription.

use std::collections::{BTreeMap, HashMap};

use meridian_contract::{
    AuthenticationMethod, AuthenticationPolicy, AuthorizationPolicy, AuthorizationRule,
    AutomaticCertificate, Bridge, BridgeRoute, BridgeTopicMap, BrokerFlavor, BrokerResourceRule,
    BrokerSnapshot, CaCertificate, CertificateIssuer, ClientCertificateAuthentication, ClientGroup,
    CustomAuthSettings, CustomJwtAuthentication, Dataflow, DataflowEndpoint, DataflowProfile,
    EventGridNamespace, IssuerCertificate, IssuerRef, Limits, Listener, ListenerPort, ListenerTls,
    ManualCertificate, NamespaceClient, PermissionBinding, PermissionType, Principals,
    ServerCertificate, SourceRef, StateStoreResourceRule, SubjectAltNames, SvidSettings,
    TokenSettings, TopicSpace, UsernamePasswordSettings, X509Attributes, X509Settings,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    engine::path::ArmPath,
    resources::{
        eventgrid_models as eg, iotoperations_models as aio, iotoperationsmq_models as mq,
    },
    store::{ListScope, ReadSelector, Store, StoreError, StoredResource},
};

pub use meridian_contract as contract;

/// The tag on an Event Grid namespace naming the ARM id of the broker that serves it.
pub const BROKER_TAG: &str = "meridian.broker";

/// The tag on an Event Grid namespace naming (comma-separated) listeners of its broker whose
/// ports make it the **default namespace**: a client of those ports whose TLS SNI names no bound
/// namespace is a client of this one. A listener is the default of at most one namespace.
pub const LISTENERS_TAG: &str = "meridian.listeners";

// Lower-cased type keys, as the store records them.
const AIO_BROKER: &str = "microsoft.iotoperations/instances/brokers";
const AIO_LISTENER: &str = "microsoft.iotoperations/instances/brokers/listeners";
const AIO_AUTHN: &str = "microsoft.iotoperations/instances/brokers/authentications";
const AIO_AUTHZ: &str = "microsoft.iotoperations/instances/brokers/authorizations";
const AIO_ENDPOINT: &str = "microsoft.iotoperations/instances/dataflowendpoints";
const AIO_PROFILE: &str = "microsoft.iotoperations/instances/dataflowprofiles";
const AIO_DATAFLOW: &str = "microsoft.iotoperations/instances/dataflowprofiles/dataflows";
const MQ_BROKER: &str = "microsoft.iotoperationsmq/mq/broker";
const MQ_LISTENER: &str = "microsoft.iotoperationsmq/mq/broker/listener";
const MQ_AUTHN: &str = "microsoft.iotoperationsmq/mq/broker/authentication";
const MQ_AUTHZ: &str = "microsoft.iotoperationsmq/mq/broker/authorization";
const MQ_BRIDGE: &str = "microsoft.iotoperationsmq/mq/mqttbridgeconnector";
const MQ_TOPIC_MAP: &str = "microsoft.iotoperationsmq/mq/mqttbridgeconnector/topicmap";
const EG_NAMESPACE: &str = "microsoft.eventgrid/namespaces";
const EG_CLIENT: &str = "microsoft.eventgrid/namespaces/clients";
const EG_GROUP: &str = "microsoft.eventgrid/namespaces/clientgroups";
const EG_SPACE: &str = "microsoft.eventgrid/namespaces/topicspaces";
const EG_BINDING: &str = "microsoft.eventgrid/namespaces/permissionbindings";
const EG_CA: &str = "microsoft.eventgrid/namespaces/cacertificates";

/// Both broker types: the population the binding rule counts.
const BROKER_TYPES: [&str; 2] = [AIO_BROKER, MQ_BROKER];
const EVENT_GRID_TYPES: [&str; 6] = [
    EG_NAMESPACE,
    EG_CLIENT,
    EG_GROUP,
    EG_SPACE,
    EG_BINDING,
    EG_CA,
];

/// Why a broker could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The id is not `…/instances/{i}/brokers/{b}` or `…/mq/{m}/broker/{b}`.
    #[error(
        "'{0}' is not a broker resource id (expected …/Microsoft.IoTOperations/instances/{{i}}/brokers/{{b}} or …/Microsoft.IoTOperationsMQ/mq/{{m}}/broker/{{b}})"
    )]
    NotABroker(String),
    /// No such broker in the store (for example, it was just deleted).
    #[error("broker '{0}' does not exist")]
    BrokerNotFound(String),
    /// A stored resource does not have the shape its type promises (names the resource).
    #[error("{id}: {message}")]
    InvalidResource {
        /// ARM id of the resource.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A broker id taken apart.
#[derive(Debug, Clone)]
struct BrokerRef {
    flavor: BrokerFlavor,
    /// Lower-cased broker id.
    key: String,
    /// Lower-cased id of the instance / mq that contains it.
    container_key: String,
    /// Lower-cased subscription id.
    subscription_key: String,
}

fn pair_is(pair: Option<&(String, String)>, segment: &str) -> bool {
    pair.is_some_and(|(t, _)| t.eq_ignore_ascii_case(segment))
}

/// `/subscriptions/{s}[/resourceGroups/{rg}]/providers/{ns}` with the given names.
fn provider_prefix(scope: &crate::engine::path::Scope, namespace: &str) -> String {
    match &scope.resource_group {
        Some(rg) => format!(
            "/subscriptions/{}/resourceGroups/{rg}/providers/{namespace}",
            scope.subscription
        ),
        None => format!(
            "/subscriptions/{}/providers/{namespace}",
            scope.subscription
        ),
    }
}

/// Parses a broker id; `None` when it names something else.
fn parse_broker(id: &str) -> Option<(BrokerRef, String)> {
    let ArmPath::Resource {
        scope,
        namespace,
        pairs,
    } = ArmPath::parse(id).ok()?
    else {
        return None;
    };
    let (flavor, outer, inner, canonical_ns) =
        if namespace.eq_ignore_ascii_case("Microsoft.IoTOperations") {
            (
                BrokerFlavor::IoTOperations,
                "instances",
                "brokers",
                "Microsoft.IoTOperations",
            )
        } else if namespace.eq_ignore_ascii_case("Microsoft.IoTOperationsMQ") {
            (
                BrokerFlavor::IoTOperationsMq,
                "mq",
                "broker",
                "Microsoft.IoTOperationsMQ",
            )
        } else {
            return None;
        };
    if pairs.len() != 2 || !pair_is(pairs.first(), outer) || !pair_is(pairs.get(1), inner) {
        return None;
    }
    let container = format!(
        "{}/{outer}/{}",
        provider_prefix(&scope, canonical_ns),
        pairs[0].1
    );
    let broker = format!("{container}/{inner}/{}", pairs[1].1);
    Some((
        BrokerRef {
            flavor,
            key: broker.to_lowercase(),
            container_key: container.to_lowercase(),
            subscription_key: scope.subscription.to_lowercase(),
        },
        broker,
    ))
}

/// A broker id's flavour, canonical spelling (declared casing for the fixed segments, the given
/// casing for names) and scope; `None` when `id` names something other than a broker.
pub fn parse_broker_id(id: &str) -> Option<(BrokerFlavor, String, crate::engine::path::Scope)> {
    let (broker, canonical) = parse_broker(id)?;
    let ArmPath::Resource { scope, .. } = ArmPath::parse(id).ok()? else {
        return None;
    };
    Some((broker.flavor, canonical, scope))
}

/// The selectors of one consistent read of everything a broker's snapshot can depend on.
fn selectors_for(broker: &BrokerRef) -> Vec<ReadSelector> {
    let mut s = vec![
        ReadSelector::Id(broker.key.clone()),
        ReadSelector::IdPrefix(format!("{}/", broker.key)),
    ];
    match broker.flavor {
        BrokerFlavor::IoTOperationsMq => {
            s.push(ReadSelector::IdPrefix(format!(
                "{}/mqttbridgeconnector/",
                broker.container_key
            )));
        }
        _ => {
            for child in ["dataflowendpoints", "dataflowprofiles"] {
                s.push(ReadSelector::IdPrefix(format!(
                    "{}/{child}/",
                    broker.container_key
                )));
            }
        }
    }
    for t in BROKER_TYPES.iter().chain(EVENT_GRID_TYPES.iter()) {
        s.push(ReadSelector::TypeInSubscription {
            type_key: (*t).to_owned(),
            subscription_key: broker.subscription_key.clone(),
        });
    }
    s
}

fn invalid(res: &StoredResource, message: impl Into<String>) -> CompileError {
    CompileError::InvalidResource {
        id: res.id.clone(),
        message: message.into(),
    }
}

/// The resource's `properties`, read through its typed model.
fn props<T: DeserializeOwned>(res: &StoredResource) -> Result<T, CompileError> {
    let p = res.body.get("properties").cloned().unwrap_or(Value::Null);
    let p = if p.is_null() {
        Value::Object(Default::default())
    } else {
        p
    };
    serde_json::from_value(p).map_err(|e| invalid(res, format!("properties: {e}")))
}

/// The resource's `properties` as raw JSON with `extra` fields set (for the lenient contract
/// structs, whose field names are the spec's).
fn lenient<T: DeserializeOwned>(
    res: &StoredResource,
    extra: &[(&str, Value)],
) -> Result<T, CompileError> {
    let mut p = match res.body.get("properties") {
        Some(Value::Object(m)) => m.clone(),
        _ => Default::default(),
    };
    for (k, v) in extra {
        p.insert((*k).to_owned(), v.clone());
    }
    serde_json::from_value(Value::Object(p)).map_err(|e| invalid(res, format!("properties: {e}")))
}

/// Re-reads a spec enum as the contract's enum of the same spelling (`Unknown` if the contract
/// lacks the value, which `validate` then reports).
fn recast<A: Serialize, B: DeserializeOwned>(value: &A) -> Option<B> {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

fn name_of(res: &StoredResource) -> String {
    res.body
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| res.id.rsplit('/').next().unwrap_or_default().to_owned())
}

fn port_of(res: &StoredResource, port: i32) -> Result<u16, CompileError> {
    u16::try_from(port).map_err(|_| invalid(res, format!("port {port} is not 0-65535")))
}

fn positive_u32(v: Option<i64>) -> Option<u32> {
    v.filter(|v| *v > 0)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// Rows of one read, indexed the ways the compiler looks them up.
struct Rows<'a> {
    all: &'a [StoredResource],
    used: Vec<SourceRef>,
}

impl<'a> Rows<'a> {
    /// Rows of one type, in id order.
    fn of_type(&self, type_key: &str) -> Vec<&'a StoredResource> {
        self.all.iter().filter(|r| r.type_key == type_key).collect()
    }

    /// Children of one type of one parent, in id order.
    fn children(&self, type_key: &str, parent_key: &str) -> Vec<&'a StoredResource> {
        self.all
            .iter()
            .filter(|r| r.type_key == type_key && r.parent_key.as_deref() == Some(parent_key))
            .collect()
    }

    fn use_source(&mut self, res: &StoredResource) {
        self.used.push(SourceRef {
            id: res.id.clone(),
            etag: res.etag.clone(),
        });
    }
}

/// Compiles the snapshot of `broker_id` (either flavour) from one consistent read of `store`.
pub async fn compile_broker(
    store: &dyn Store,
    broker_id: &str,
) -> Result<BrokerSnapshot, CompileError> {
    let (broker, _) =
        parse_broker(broker_id).ok_or_else(|| CompileError::NotABroker(broker_id.to_owned()))?;
    let rows = store.read_consistent(&selectors_for(&broker)).await?;
    let Some(broker_row) = rows.iter().find(|r| r.id_key == broker.key) else {
        return Err(CompileError::BrokerNotFound(broker_id.to_owned()));
    };
    let mut rows = Rows {
        all: &rows,
        used: Vec::new(),
    };
    let mut snap = BrokerSnapshot::new(broker_row.id.clone(), broker.flavor);
    rows.use_source(broker_row);
    match broker.flavor {
        BrokerFlavor::IoTOperationsMq => compile_mq(&mut rows, broker_row, &broker, &mut snap)?,
        _ => compile_aio(&mut rows, broker_row, &broker, &mut snap)?,
    }
    compile_namespaces(&mut rows, broker_row, &mut snap)?;
    let mut sources = std::mem::take(&mut rows.used);
    sources.sort_by_key(|s| s.id.to_lowercase());
    sources.dedup_by(|a, b| a.id.eq_ignore_ascii_case(&b.id));
    snap.sources = sources;
    Ok(snap)
}

// ---------------------------------------------------------------------------------------------
// Microsoft.IoTOperations

fn compile_aio(
    rows: &mut Rows<'_>,
    broker_row: &StoredResource,
    broker: &BrokerRef,
    snap: &mut BrokerSnapshot,
) -> Result<(), CompileError> {
    let p: aio::BrokerProperties = props(broker_row)?;
    snap.limits = aio_limits(&p);

    let listeners = rows.children(AIO_LISTENER, &broker.key);
    for res in listeners {
        rows.use_source(res);
        let p: aio::BrokerListenerProperties = props(res)?;
        let mut ports = Vec::with_capacity(p.ports.len());
        for port in &p.ports {
            ports.push(ListenerPort {
                port: port_of(res, port.port)?,
                protocol: recast(&port.protocol).unwrap_or_default(),
                tls: port.tls.as_ref().map(aio_tls),
                authentication_enabled: port.authentication_ref.is_some(),
                authentication_refs: port.authentication_ref.iter().cloned().collect(),
                authorization_enabled: port.authorization_ref.is_some(),
                authorization_refs: port.authorization_ref.iter().cloned().collect(),
                default_namespace: None,
            });
        }
        snap.listeners.push(Listener {
            id: res.id.clone(),
            name: name_of(res),
            ports,
        });
    }

    let authns = rows.children(AIO_AUTHN, &broker.key);
    for res in authns {
        rows.use_source(res);
        let p: aio::BrokerAuthenticationProperties = props(res)?;
        let methods = p.authentication_methods.iter().map(aio_method).collect();
        snap.authentications.push(AuthenticationPolicy {
            id: res.id.clone(),
            name: name_of(res),
            methods,
        });
    }

    let authzs = rows.children(AIO_AUTHZ, &broker.key);
    for res in authzs {
        rows.use_source(res);
        let p: aio::BrokerAuthorizationProperties = props(res)?;
        let policies = &p.authorization_policies;
        snap.authorizations.push(AuthorizationPolicy {
            id: res.id.clone(),
            name: name_of(res),
            cache: matches!(policies.cache, aio::OperationalMode::Enabled),
            rules: policies.rules.iter().flatten().map(aio_rule).collect(),
        });
    }

    let endpoints = rows.children(AIO_ENDPOINT, &broker.container_key);
    for res in endpoints {
        rows.use_source(res);
        let e: DataflowEndpoint = lenient(
            res,
            &[
                ("id", Value::from(res.id.clone())),
                ("name", name_of(res).into()),
            ],
        )?;
        snap.dataflow_endpoints.push(e);
    }
    let profiles = rows.children(AIO_PROFILE, &broker.container_key);
    for res in profiles {
        rows.use_source(res);
        let profile_name = name_of(res);
        let p: DataflowProfile = lenient(
            res,
            &[
                ("id", Value::from(res.id.clone())),
                ("name", profile_name.clone().into()),
            ],
        )?;
        snap.dataflow_profiles.push(p);
        let flows = rows.children(AIO_DATAFLOW, &res.id_key);
        for flow in flows {
            rows.use_source(flow);
            let d: Dataflow = lenient(
                flow,
                &[
                    ("id", Value::from(flow.id.clone())),
                    ("name", name_of(flow).into()),
                    ("profileName", profile_name.clone().into()),
                ],
            )?;
            snap.dataflows.push(d);
        }
    }
    Ok(())
}

fn aio_limits(p: &aio::BrokerProperties) -> Limits {
    let mut limits = Limits::default();
    let Some(c) = p.advanced.as_ref().and_then(|a| a.clients.as_ref()) else {
        return limits;
    };
    if let Some(v) = positive_u32(c.max_session_expiry_seconds.map(i64::from)) {
        limits.max_session_expiry_seconds = v;
    }
    limits.max_message_expiry_seconds = positive_u32(c.max_message_expiry_seconds.map(i64::from));
    if let Some(v) = positive_u32(c.max_packet_size_bytes.map(i64::from)) {
        limits.max_packet_size_bytes = v;
    }
    if let Some(v) = c.max_receive_maximum.filter(|v| *v > 0) {
        limits.max_receive_maximum = u16::try_from(v).unwrap_or(u16::MAX);
    }
    limits.max_keep_alive_seconds = c
        .max_keep_alive_seconds
        .filter(|v| *v >= 0)
        .map(|v| u16::try_from(v).unwrap_or(u16::MAX));
    if let Some(q) = &c.subscriber_queue_limit {
        if let Some(len) = q.length.filter(|l| *l > 0) {
            limits.subscriber_queue_length = len as u64;
        }
        limits.subscriber_queue_strategy = recast(&q.strategy).unwrap_or_default();
    }
    limits
}

fn aio_tls(t: &aio::TlsCertMethod) -> ListenerTls {
    let certificate = match t.mode {
        aio::TlsCertMethodMode::Automatic => {
            let spec = t.cert_manager_certificate_spec.as_ref();
            ServerCertificate::Automatic(AutomaticCertificate {
                issuer: CertificateIssuer::LocalCa,
                san: spec
                    .and_then(|s| s.san.as_ref())
                    .map(|s| SubjectAltNames {
                        dns: s.dns.clone(),
                        ip: s.ip.clone(),
                    })
                    .unwrap_or_default(),
                duration: spec.and_then(|s| s.duration.clone()),
                renew_before: spec.and_then(|s| s.renew_before.clone()),
                private_key_algorithm: spec
                    .and_then(|s| s.private_key.as_ref())
                    .and_then(|k| recast::<_, String>(&k.algorithm)),
                issuer_ref: spec.map(|s| IssuerRef {
                    group: s.issuer_ref.group.clone(),
                    kind: recast(&s.issuer_ref.kind).unwrap_or_default(),
                    name: s.issuer_ref.name.clone(),
                }),
            })
        }
        aio::TlsCertMethodMode::Manual => ServerCertificate::Manual(ManualCertificate {
            secret_ref: t.manual.as_ref().map(|m| m.secret_ref.clone()),
            ..Default::default()
        }),
    };
    ListenerTls {
        certificate,
        client_ca_pem: None,
    }
}

fn aio_method(m: &aio::BrokerAuthenticatorMethods) -> AuthenticationMethod {
    match m.method {
        aio::BrokerAuthenticationMethod::X509 => {
            let s = m.x509_settings.as_ref();
            AuthenticationMethod::X509(X509Settings {
                // The spec's default config map name when the settings are absent.
                trusted_ca_ref: Some(
                    s.map(|s| s.trusted_client_ca_cert.clone())
                        .unwrap_or_else(|| "client-ca".to_owned()),
                ),
                trusted_ca_pem: None,
                authorization_attributes: s
                    .and_then(|s| s.authorization_attributes.as_ref())
                    .map(|attrs| {
                        attrs
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.clone(),
                                    X509Attributes {
                                        subject: v.subject.clone(),
                                        attributes: v.attributes.clone(),
                                    },
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                attributes_secret_ref: None,
            })
        }
        aio::BrokerAuthenticationMethod::ServiceAccountToken => {
            AuthenticationMethod::ServiceAccountToken(TokenSettings {
                audiences: m
                    .service_account_token_settings
                    .as_ref()
                    .map(|s| s.audiences.clone())
                    .unwrap_or_default(),
                ..Default::default()
            })
        }
        aio::BrokerAuthenticationMethod::Custom => {
            let s = m.custom_settings.as_ref();
            AuthenticationMethod::Custom(CustomAuthSettings {
                endpoint: s.map(|s| s.endpoint.clone()).unwrap_or_default(),
                headers: s.and_then(|s| s.headers.clone()).unwrap_or_default(),
                timeout_seconds: CustomAuthSettings::DEFAULT_TIMEOUT_SECONDS,
                ca_cert_ref: s.and_then(|s| s.ca_cert_config_map.clone()),
                ca_cert_pem: None,
                client_cert_secret_ref: s
                    .and_then(|s| s.auth.as_ref())
                    .map(|a| a.x509.secret_ref.clone()),
            })
        }
    }
}

fn aio_rule(r: &aio::AuthorizationRule) -> AuthorizationRule {
    AuthorizationRule {
        principals: Principals {
            client_ids: r.principals.client_ids.clone(),
            usernames: r.principals.usernames.clone(),
            attributes: r.principals.attributes.clone(),
        },
        broker_resources: r
            .broker_resources
            .iter()
            .map(|b| BrokerResourceRule {
                method: recast(&b.method).unwrap_or(meridian_contract::BrokerMethod::Unknown),
                client_ids: b.client_ids.clone(),
                topics: b.topics.clone(),
            })
            .collect(),
        state_store_resources: r
            .state_store_resources
            .iter()
            .flatten()
            .map(|s| StateStoreResourceRule {
                key_type: recast(&s.key_type).unwrap_or_default(),
                keys: s.keys.clone(),
                method: recast(&s.method).unwrap_or_default(),
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Microsoft.IoTOperationsMQ

fn compile_mq(
    rows: &mut Rows<'_>,
    broker_row: &StoredResource,
    broker: &BrokerRef,
    snap: &mut BrokerSnapshot,
) -> Result<(), CompileError> {
    let p: mq::BrokerProperties = props(broker_row)?;
    snap.limits = mq_limits(&p);

    // Authentications and authorizations name the listeners they guard (`listenerRef`).
    let mut authn_by_listener: HashMap<String, Vec<String>> = HashMap::new();
    let authns = rows.children(MQ_AUTHN, &broker.key);
    for res in authns {
        rows.use_source(res);
        let p: mq::BrokerAuthenticationProperties = props(res)?;
        let name = name_of(res);
        for l in &p.listener_ref {
            authn_by_listener
                .entry(l.to_lowercase())
                .or_default()
                .push(name.clone());
        }
        snap.authentications.push(AuthenticationPolicy {
            id: res.id.clone(),
            name,
            methods: p
                .authentication_methods
                .iter()
                .flat_map(mq_methods)
                .collect(),
        });
    }
    let mut authz_by_listener: HashMap<String, Vec<String>> = HashMap::new();
    let authzs = rows.children(MQ_AUTHZ, &broker.key);
    for res in authzs {
        rows.use_source(res);
        let p: mq::BrokerAuthorizationProperties = props(res)?;
        let name = name_of(res);
        for l in &p.listener_ref {
            authz_by_listener
                .entry(l.to_lowercase())
                .or_default()
                .push(name.clone());
        }
        let policies = &p.authorization_policies;
        snap.authorizations.push(AuthorizationPolicy {
            id: res.id.clone(),
            name,
            cache: policies.enable_cache,
            rules: policies.rules.iter().flatten().map(mq_rule).collect(),
        });
    }

    let listeners = rows.children(MQ_LISTENER, &broker.key);
    for res in listeners {
        rows.use_source(res);
        let p: mq::BrokerListenerProperties = props(res)?;
        let name = name_of(res);
        let key = name.to_lowercase();
        snap.listeners.push(Listener {
            id: res.id.clone(),
            name,
            ports: vec![ListenerPort {
                port: port_of(res, p.port)?,
                // The MQ 2023 listener has no protocol field: MQTT over TCP.
                protocol: meridian_contract::Protocol::Mqtt,
                tls: p.tls.as_ref().map(mq_tls),
                authentication_enabled: p.authentication_enabled,
                authentication_refs: authn_by_listener.remove(&key).unwrap_or_default(),
                authorization_enabled: p.authorization_enabled,
                authorization_refs: authz_by_listener.remove(&key).unwrap_or_default(),
                default_namespace: None,
            }],
        });
    }

    let bridges = rows.children(MQ_BRIDGE, &broker.container_key);
    for res in bridges {
        rows.use_source(res);
        let mut bridge: Bridge = lenient(
            res,
            &[
                ("id", Value::from(res.id.clone())),
                ("name", name_of(res).into()),
                ("topicMaps", Value::Array(Vec::new())),
            ],
        )?;
        let maps = rows.children(MQ_TOPIC_MAP, &res.id_key);
        for map in maps {
            rows.use_source(map);
            let routes = match map.body.pointer("/properties/routes") {
                Some(r @ Value::Array(_)) => serde_json::from_value::<Vec<BridgeRoute>>(r.clone())
                    .map_err(|e| invalid(map, format!("properties.routes: {e}")))?,
                _ => Vec::new(),
            };
            bridge.topic_maps.push(BridgeTopicMap {
                id: map.id.clone(),
                name: name_of(map),
                routes,
            });
        }
        snap.bridges.push(bridge);
    }
    Ok(())
}

fn mq_limits(p: &mq::BrokerProperties) -> Limits {
    let mut limits = Limits::default();
    let Some(t) = p
        .cardinality
        .as_ref()
        .and_then(|c| c.frontend.temporary_resource_limits.as_ref())
    else {
        return limits;
    };
    if let Some(v) = positive_u32(Some(t.max_session_expiry_secs)) {
        limits.max_session_expiry_seconds = v;
    }
    limits.max_message_expiry_seconds = positive_u32(t.max_message_expiry_secs);
    if t.max_queued_messages > 0 {
        limits.subscriber_queue_length = t.max_queued_messages as u64;
    }
    limits
}

fn mq_tls(t: &mq::TlsCertMethod) -> ListenerTls {
    let certificate = if let Some(a) = &t.automatic {
        ServerCertificate::Automatic(AutomaticCertificate {
            issuer: CertificateIssuer::LocalCa,
            san: a
                .san
                .as_ref()
                .map(|s| SubjectAltNames {
                    dns: s.dns.clone(),
                    ip: s.ip.clone(),
                })
                .unwrap_or_default(),
            duration: Some(a.duration.clone()).filter(|d| !d.is_empty()),
            renew_before: Some(a.renew_before.clone()).filter(|d| !d.is_empty()),
            private_key_algorithm: a.private_key.as_ref().map(|k| k.algorithm.clone()),
            issuer_ref: Some(IssuerRef {
                group: a.issuer_ref.group.clone(),
                kind: a.issuer_ref.kind.clone(),
                name: a.issuer_ref.name.clone(),
            }),
        })
    } else {
        // Manual (a secret) or Key Vault: both are references the node resolves; `tls: {}` with
        // neither becomes a manual certificate naming nothing, which `validate` reports.
        ServerCertificate::Manual(ManualCertificate {
            secret_ref: t.manual.as_ref().map(|m| m.secret_name.clone()),
            secret_namespace: t.manual.as_ref().and_then(|m| m.secret_namespace.clone()),
            key_vault: t
                .key_vault
                .as_ref()
                .and_then(|k| serde_json::to_value(k).ok()),
            ..Default::default()
        })
    };
    ListenerTls {
        certificate,
        client_ca_pem: None,
    }
}

/// One MQ method entry may set several method objects; each becomes its own method, in the
/// spec's field order.
fn mq_methods(m: &mq::BrokerAuthenticatorMethods) -> Vec<AuthenticationMethod> {
    let mut out = Vec::new();
    if let Some(c) = &m.custom {
        out.push(AuthenticationMethod::Custom(CustomAuthSettings {
            endpoint: c.endpoint.clone(),
            headers: c.headers.clone().unwrap_or_default(),
            timeout_seconds: CustomAuthSettings::DEFAULT_TIMEOUT_SECONDS,
            ca_cert_ref: c.ca_cert_config_map.clone(),
            ca_cert_pem: None,
            client_cert_secret_ref: c.auth.as_ref().and_then(|a| a.x509.secret_name.clone()),
        }));
    }
    if let Some(s) = &m.sat {
        out.push(AuthenticationMethod::ServiceAccountToken(TokenSettings {
            audiences: s.audiences.clone(),
            ..Default::default()
        }));
    }
    if let Some(s) = &m.svid {
        out.push(AuthenticationMethod::Svid(SvidSettings {
            agent_socket_path: s.agent_socket_path.clone(),
        }));
    }
    if let Some(u) = &m.username_password {
        out.push(AuthenticationMethod::UsernamePassword(
            UsernamePasswordSettings {
                secret_ref: u.secret_name.clone(),
                key_vault: u
                    .key_vault
                    .as_ref()
                    .and_then(|k| serde_json::to_value(k).ok()),
                credentials: Vec::new(),
            },
        ));
    }
    if let Some(x) = &m.x509 {
        out.push(AuthenticationMethod::X509(X509Settings {
            trusted_ca_ref: Some(x.trusted_client_ca_cert_config_map.clone()),
            trusted_ca_pem: None,
            authorization_attributes: BTreeMap::new(),
            attributes_secret_ref: x.attributes.as_ref().and_then(|a| a.secret_name.clone()),
        }));
    }
    out
}

fn mq_rule(r: &mq::AuthorizationBasicRule) -> AuthorizationRule {
    AuthorizationRule {
        principals: Principals {
            client_ids: r.principals.clientids.clone().unwrap_or_default(),
            usernames: r.principals.usernames.clone().unwrap_or_default(),
            attributes: r.principals.attributes.clone(),
        },
        broker_resources: r
            .broker_resources
            .iter()
            .map(|b| BrokerResourceRule {
                method: recast(&b.method).unwrap_or(meridian_contract::BrokerMethod::Unknown),
                client_ids: Vec::new(),
                topics: b.topics.clone().unwrap_or_default(),
            })
            .collect(),
        state_store_resources: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Microsoft.EventGrid namespaces

/// The value of the binding tag on a resource body, if any.
fn broker_tag(body: &Value) -> Option<&str> {
    tag(body, BROKER_TAG)
}

/// The value of tag `name` (key compared case-insensitively) on a resource body, if any.
fn tag<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body.get("tags")?
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

/// Makes `ns` the default namespace of the ports of the listeners its [`LISTENERS_TAG`] names.
/// A listener the tag names that the broker does not have, or that another namespace already
/// claimed, makes the namespace invalid (its provisioning fails naming it).
fn assign_default_namespace(
    res: &StoredResource,
    ns: &str,
    snap: &mut BrokerSnapshot,
) -> Result<(), CompileError> {
    let Some(value) = tag(&res.body, LISTENERS_TAG) else {
        return Ok(());
    };
    let invalid = |message: String| CompileError::InvalidResource {
        id: res.id.clone(),
        message,
    };
    for wanted in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let listener = snap
            .listeners
            .iter_mut()
            .find(|l| l.name.eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                invalid(format!(
                    "tag '{LISTENERS_TAG}': the broker has no listener '{wanted}'"
                ))
            })?;
        for port in &mut listener.ports {
            if let Some(other) = &port.default_namespace
                && !other.eq_ignore_ascii_case(ns)
            {
                return Err(invalid(format!(
                    "tag '{LISTENERS_TAG}': listener '{wanted}' is already the default listener of namespace '{other}'"
                )));
            }
            port.default_namespace = Some(ns.to_owned());
        }
    }
    Ok(())
}

/// Whether the namespace `ns` binds to the broker with lower-cased id `broker_key`, given every
/// broker of the subscription (see the module docs for the rule).
fn binds_to(ns: &StoredResource, broker_key: &str, brokers_in_subscription: usize) -> bool {
    match broker_tag(&ns.body) {
        Some(tag) => tag.trim().trim_end_matches('/').to_lowercase() == broker_key,
        None => brokers_in_subscription == 1,
    }
}

fn compile_namespaces(
    rows: &mut Rows<'_>,
    broker_row: &StoredResource,
    snap: &mut BrokerSnapshot,
) -> Result<(), CompileError> {
    let brokers = BROKER_TYPES
        .iter()
        .map(|t| rows.of_type(t).len())
        .sum::<usize>();
    let namespaces: Vec<_> = rows
        .of_type(EG_NAMESPACE)
        .into_iter()
        .filter(|ns| binds_to(ns, &broker_row.id_key, brokers))
        .collect();
    for res in namespaces {
        rows.use_source(res);
        let p: eg::NamespaceProperties = props(res)?;
        let ts = p.topic_spaces_configuration.as_ref();
        assign_default_namespace(res, &name_of(res), snap)?;
        let mut ns = EventGridNamespace {
            id: res.id.clone(),
            name: name_of(res),
            topic_spaces_enabled: ts
                .is_some_and(|t| matches!(t.state, eg::TopicSpacesConfigurationState::Enabled)),
            alternative_authentication_name_sources: ts
                .and_then(|t| t.client_authentication.as_ref())
                .and_then(|c| c.alternative_authentication_name_sources.as_ref())
                .map(|v| v.iter().filter_map(recast::<_, String>).collect())
                .unwrap_or_default(),
            custom_jwt_authentication: ts
                .and_then(|t| t.client_authentication.as_ref())
                .and_then(|c| c.custom_jwt_authentication.as_ref())
                .map(|j| CustomJwtAuthentication {
                    token_issuer: j.token_issuer.clone().unwrap_or_default(),
                    issuer_certificates: j
                        .encoded_issuer_certificates
                        .iter()
                        .flatten()
                        .map(|c| IssuerCertificate {
                            kid: Some(c.kid.clone()).filter(|k| !k.is_empty()),
                            encoded_certificate: c.encoded_certificate.clone(),
                        })
                        .collect(),
                }),
            maximum_session_expiry_in_hours: ts
                .and_then(|t| positive_u32(t.maximum_session_expiry_in_hours.map(i64::from))),
            maximum_client_sessions_per_authentication_name: ts.and_then(|t| {
                positive_u32(
                    t.maximum_client_sessions_per_authentication_name
                        .map(i64::from),
                )
            }),
            clients: Vec::new(),
            client_groups: Vec::new(),
            topic_spaces: Vec::new(),
            permission_bindings: Vec::new(),
            ca_certificates: Vec::new(),
        };
        let key = res.id_key.as_str();

        let clients = rows.children(EG_CLIENT, key);
        for c in clients {
            rows.use_source(c);
            let p: eg::ClientProperties = props(c)?;
            let name = name_of(c);
            ns.clients.push(NamespaceClient {
                id: c.id.clone(),
                // Event Grid's default authentication name is the client's resource name.
                authentication_name: p
                    .authentication_name
                    .clone()
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| name.clone()),
                name,
                state: recast(&p.state).unwrap_or(meridian_contract::ClientState::Unknown),
                attributes: p.attributes.clone().unwrap_or_default(),
                certificate_authentication: p.client_certificate_authentication.as_ref().map(|a| {
                    ClientCertificateAuthentication {
                        validation_scheme: a.validation_scheme.as_ref().map(|s| {
                            recast(s).unwrap_or(meridian_contract::ValidationScheme::Unknown)
                        }),
                        allowed_thumbprints: a.allowed_thumbprints.clone().unwrap_or_default(),
                    }
                }),
            });
        }
        let groups = rows.children(EG_GROUP, key);
        for g in groups {
            rows.use_source(g);
            let p: eg::ClientGroupProperties = props(g)?;
            ns.client_groups.push(ClientGroup {
                id: g.id.clone(),
                name: name_of(g),
                query: p.query.unwrap_or_default(),
            });
        }
        let spaces = rows.children(EG_SPACE, key);
        for t in spaces {
            rows.use_source(t);
            let p: eg::TopicSpaceProperties = props(t)?;
            ns.topic_spaces.push(TopicSpace {
                id: t.id.clone(),
                name: name_of(t),
                topic_templates: p.topic_templates.unwrap_or_default(),
            });
        }
        let bindings = rows.children(EG_BINDING, key);
        for b in bindings {
            rows.use_source(b);
            let p: eg::PermissionBindingProperties = props(b)?;
            ns.permission_bindings.push(PermissionBinding {
                id: b.id.clone(),
                name: name_of(b),
                client_group_name: p.client_group_name.unwrap_or_default(),
                topic_space_name: p.topic_space_name.unwrap_or_default(),
                permission: p
                    .permission
                    .as_ref()
                    .and_then(recast)
                    .unwrap_or(PermissionType::Unknown),
            });
        }
        let cas = rows.children(EG_CA, key);
        for ca in cas {
            rows.use_source(ca);
            let p: eg::CaCertificateProperties = props(ca)?;
            ns.ca_certificates.push(CaCertificate {
                id: ca.id.clone(),
                name: name_of(ca),
                encoded_certificate: p.encoded_certificate.unwrap_or_default(),
            });
        }
        snap.namespaces.push(ns);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Which brokers a change affects

/// The broker ids (stored casing, sorted case-insensitively, no duplicates) whose snapshots a PUT
/// or DELETE of `resource_id` may change. Call it after the write:
///
/// - a broker's child (listener, authentication, authorization): that broker;
/// - a broker itself: that broker and every other broker of the subscription (a broker appearing
///   or disappearing changes which broker an untagged namespace binds to). A deleted broker is
///   still returned, rebuilt from the id; [`compile_broker`] then answers
///   [`CompileError::BrokerNotFound`] for it;
/// - an instance's dataflow endpoints/profiles/dataflows, an mq's bridge connectors/topic maps,
///   the instance or mq itself: every broker under that instance/mq. After the instance/mq is
///   deleted its brokers are gone and nothing is returned: the pusher should treat nodes of
///   brokers under a deleted id (by prefix) as affected;
/// - any Event Grid namespace resource: every broker of the subscription, because the binding
///   before the write is unknown (a tag change or a delete moves a namespace away from a broker
///   that must be recompiled too); the snapshot digest lets the pusher skip the unchanged ones;
/// - anything else (kafka/dataLake connectors, diagnostics, role assignments): nothing.
pub async fn brokers_affected_by(
    store: &dyn Store,
    resource_id: &str,
) -> Result<Vec<String>, CompileError> {
    let Ok(ArmPath::Resource {
        scope,
        namespace,
        pairs,
    }) = ArmPath::parse(resource_id)
    else {
        return Ok(Vec::new());
    };
    let subscription_key = scope.subscription.to_lowercase();
    let all_in_subscription = || {
        BROKER_TYPES
            .iter()
            .map(|t| ReadSelector::TypeInSubscription {
                type_key: (*t).to_owned(),
                subscription_key: subscription_key.clone(),
            })
            .collect::<Vec<_>>()
    };
    let (outer, inner, canonical_ns, bridge_child) =
        if namespace.eq_ignore_ascii_case("Microsoft.IoTOperations") {
            ("instances", "brokers", "Microsoft.IoTOperations", None)
        } else if namespace.eq_ignore_ascii_case("Microsoft.IoTOperationsMQ") {
            (
                "mq",
                "broker",
                "Microsoft.IoTOperationsMQ",
                Some("mqttBridgeConnector"),
            )
        } else if namespace.eq_ignore_ascii_case("Microsoft.EventGrid")
            && pair_is(pairs.first(), "namespaces")
        {
            return broker_ids(store, &all_in_subscription(), |_| true, None).await;
        } else {
            return Ok(Vec::new());
        };
    if !pair_is(pairs.first(), outer) {
        return Ok(Vec::new());
    }
    let container = format!(
        "{}/{outer}/{}",
        provider_prefix(&scope, canonical_ns),
        pairs[0].1
    );
    let container_key = container.to_lowercase();
    let broker_type = if outer == "instances" {
        AIO_BROKER
    } else {
        MQ_BROKER
    };
    match pairs.get(1) {
        Some((t, name)) if t.eq_ignore_ascii_case(inner) => {
            let broker = format!("{container}/{inner}/{name}");
            if pairs.len() == 2 {
                // The broker itself: every broker of the subscription (binding may move).
                broker_ids(store, &all_in_subscription(), |_| true, Some(broker)).await
            } else {
                let key = broker.to_lowercase();
                broker_ids(
                    store,
                    &[ReadSelector::Id(key.clone())],
                    |r| r.id_key == key,
                    Some(broker),
                )
                .await
            }
        }
        // The instance / mq itself, or its dataflow / bridge resources.
        None => brokers_under(store, broker_type, &container_key).await,
        Some((t, _))
            if (outer == "instances"
                && (t.eq_ignore_ascii_case("dataflowEndpoints")
                    || t.eq_ignore_ascii_case("dataflowProfiles")))
                || bridge_child.is_some_and(|b| t.eq_ignore_ascii_case(b)) =>
        {
            brokers_under(store, broker_type, &container_key).await
        }
        Some(_) => Ok(Vec::new()),
    }
}

/// The brokers (children of type `broker_type`) of one instance / mq, read through the parent
/// index rather than the whole subtree.
async fn brokers_under(
    store: &dyn Store,
    broker_type: &str,
    container_key: &str,
) -> Result<Vec<String>, CompileError> {
    let scope = ListScope::Parent(container_key.to_owned());
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list(broker_type, &scope, after.as_deref(), BROKER_PAGE)
            .await?;
        let full = page.len() as i64 == BROKER_PAGE;
        after = page.last().map(|r| r.id_key.clone());
        ids.extend(page.into_iter().map(|r| (r.id_key, r.id)));
        if !full {
            return Ok(ids.into_values().collect());
        }
    }
}

/// Page size of [`brokers_under`].
const BROKER_PAGE: i64 = 500;

/// Broker ids among the rows `selectors` read that `keep` accepts, plus `also` (an id that may
/// no longer be stored), deduplicated case-insensitively and sorted.
async fn broker_ids(
    store: &dyn Store,
    selectors: &[ReadSelector],
    keep: impl Fn(&StoredResource) -> bool,
    also: Option<String>,
) -> Result<Vec<String>, CompileError> {
    let rows = store.read_consistent(selectors).await?;
    let mut ids: BTreeMap<String, String> = rows
        .iter()
        .filter(|r| BROKER_TYPES.contains(&r.type_key.as_str()) && keep(r))
        .map(|r| (r.id_key.clone(), r.id.clone()))
        .collect();
    if let Some(id) = also {
        ids.entry(id.to_lowercase()).or_insert(id);
    }
    Ok(ids.into_values().collect())
}
