//! The contract's compatibility promises, checked: round trips, unknown fields ignored, newer
//! schema versions refused, unknown enum values failing closed, a golden wire form, digest
//! stability, and the structural validation rules.

use std::collections::BTreeMap;

use meridian_contract::{
    AuthenticationMethod, AuthenticationPolicy, AuthorizationPolicy, AuthorizationRule,
    AutomaticCertificate, Bridge, BridgeRoute, BridgeTopicMap, BrokerFlavor, BrokerMethod,
    BrokerResourceRule, BrokerSnapshot, CaCertificate, CertificateIssuer, ClientGroup, ClientState,
    ContractError, CustomAuthSettings, CustomJwtAuthentication, Dataflow, DataflowDestination,
    DataflowEndpoint, DataflowOperation, DataflowProfile, DataflowSource, EventGridNamespace,
    IssuerCertificate, Limits, Listener, ListenerPort, ListenerTls, ManualCertificate,
    MqttEndpointSettings, NamespaceClient, PasswordCredential, PermissionBinding, PermissionType,
    Principals, Protocol, QueueStrategy, RemoteBrokerConnection, SCHEMA_VERSION, ServerCertificate,
    SourceRef, SubjectAltNames, TokenSettings, TopicSpace, UsernamePasswordSettings,
    X509Attributes, X509Settings,
};
use serde_json::{Map, Value, json};

const BROKER: &str = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/i1/brokers/default";

fn id(tail: &str) -> String {
    format!("{BROKER}/{tail}")
}

/// The small snapshot the golden file pins: one listener, one of each policy, one namespace.
fn small() -> BrokerSnapshot {
    let mut s = BrokerSnapshot::new(BROKER, BrokerFlavor::IoTOperations);
    s.sources = vec![
        SourceRef {
            id: BROKER.into(),
            etag: "\"e1\"".into(),
        },
        SourceRef {
            id: id("listeners/main"),
            etag: "\"e2\"".into(),
        },
    ];
    s.listeners = vec![Listener {
        id: id("listeners/main"),
        name: "main".into(),
        ports: vec![
            ListenerPort {
                port: 1883,
                protocol: Protocol::Mqtt,
                tls: None,
                authentication_enabled: true,
                authentication_refs: vec!["authn".into()],
                authorization_enabled: true,
                authorization_refs: vec!["authz".into()],
                default_namespace: None,
            },
            ListenerPort {
                port: 8883,
                protocol: Protocol::WebSockets,
                tls: Some(ListenerTls {
                    certificate: ServerCertificate::Automatic(AutomaticCertificate {
                        issuer: CertificateIssuer::LocalCa,
                        san: SubjectAltNames {
                            dns: vec!["broker.local".into()],
                            ip: vec![],
                        },
                        duration: None,
                        renew_before: None,
                        private_key_algorithm: Some("Ec256".into()),
                        issuer_ref: None,
                    }),
                    client_ca_pem: None,
                }),
                authentication_enabled: false,
                authentication_refs: vec![],
                authorization_enabled: false,
                authorization_refs: vec![],
                default_namespace: None,
            },
        ],
    }];
    s.authentications = vec![AuthenticationPolicy {
        id: id("authentications/authn"),
        name: "authn".into(),
        methods: vec![AuthenticationMethod::ServiceAccountToken(TokenSettings {
            audiences: vec!["aio-internal".into()],
            ..Default::default()
        })],
    }];
    s.authorizations = vec![AuthorizationPolicy {
        id: id("authorizations/authz"),
        name: "authz".into(),
        cache: true,
        rules: vec![AuthorizationRule {
            principals: Principals {
                client_ids: vec!["c1".into()],
                ..Default::default()
            },
            broker_resources: vec![BrokerResourceRule {
                method: BrokerMethod::Publish,
                client_ids: vec![],
                topics: vec!["sensors/{principal.clientId}/#".into()],
            }],
            state_store_resources: vec![],
        }],
    }];
    s
}

/// A snapshot with every section populated (round trips, digests, validation).
fn full() -> BrokerSnapshot {
    let mut s = small();
    let ns = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.EventGrid/namespaces/fleet";
    s.listeners[0].ports.push(ListenerPort {
        port: 9883,
        protocol: Protocol::Mqtt,
        tls: Some(ListenerTls {
            certificate: ServerCertificate::Manual(ManualCertificate {
                secret_ref: Some("server-cert".into()),
                certificate_pem: Some(
                    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
                ),
                private_key_pem: Some(
                    "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n".into(),
                ),
                ..Default::default()
            }),
            client_ca_pem: Some(
                "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n".into(),
            ),
        }),
        authentication_enabled: true,
        authentication_refs: vec!["authn".into()],
        authorization_enabled: false,
        authorization_refs: vec![],
        default_namespace: None,
    });
    s.authentications[0].methods.extend([
        AuthenticationMethod::UsernamePassword(UsernamePasswordSettings {
            secret_ref: Some("passwords".into()),
            key_vault: None,
            credentials: vec![PasswordCredential {
                username: "alice".into(),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
                attributes: BTreeMap::from([("floor".into(), "1".into())]),
            }],
        }),
        AuthenticationMethod::X509(X509Settings {
            trusted_ca_ref: Some("client-ca".into()),
            trusted_ca_pem: None,
            authorization_attributes: BTreeMap::from([(
                "root".into(),
                X509Attributes {
                    subject: "CN=Contoso Root CA".into(),
                    attributes: BTreeMap::from([("org".into(), "contoso".into())]),
                },
            )]),
            attributes_secret_ref: None,
        }),
        AuthenticationMethod::Custom(CustomAuthSettings {
            endpoint: "https://auth.example/check".into(),
            headers: BTreeMap::from([("x-key".into(), "v".into())]),
            timeout_seconds: 5,
            ca_cert_ref: None,
            ca_cert_pem: None,
            client_cert_secret_ref: None,
        }),
    ]);
    s.namespaces = vec![EventGridNamespace {
        id: ns.into(),
        name: "fleet".into(),
        topic_spaces_enabled: true,
        alternative_authentication_name_sources: vec!["ClientCertificateSubject".into()],
        custom_jwt_authentication: Some(CustomJwtAuthentication {
            token_issuer: "https://issuer.example.com".into(),
            issuer_certificates: vec![IssuerCertificate {
                kid: Some("k1".into()),
                encoded_certificate: "MIIB".into(),
            }],
        }),
        maximum_session_expiry_in_hours: Some(1),
        maximum_client_sessions_per_authentication_name: None,
        clients: vec![NamespaceClient {
            id: format!("{ns}/clients/dev1"),
            name: "dev1".into(),
            authentication_name: "dev1".into(),
            state: ClientState::Enabled,
            attributes: BTreeMap::from([("type".into(), json!("sensor"))]),
            certificate_authentication: None,
        }],
        client_groups: vec![ClientGroup {
            id: format!("{ns}/clientGroups/sensors"),
            name: "sensors".into(),
            query: "attributes.type = 'sensor'".into(),
        }],
        topic_spaces: vec![TopicSpace {
            id: format!("{ns}/topicSpaces/telemetry"),
            name: "telemetry".into(),
            topic_templates: vec!["devices/${client.authenticationName}/telemetry".into()],
        }],
        permission_bindings: vec![PermissionBinding {
            id: format!("{ns}/permissionBindings/pub"),
            name: "pub".into(),
            client_group_name: "sensors".into(),
            topic_space_name: "telemetry".into(),
            permission: PermissionType::Publisher,
        }],
        ca_certificates: vec![CaCertificate {
            id: format!("{ns}/caCertificates/root"),
            name: "root".into(),
            encoded_certificate: "MIIBtest".into(),
        }],
    }];
    let mq = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.IoTOperationsMQ/mq/m1";
    s.bridges = vec![Bridge {
        id: format!("{mq}/mqttBridgeConnector/b1"),
        name: "b1".into(),
        protocol: "v5".into(),
        client_id_prefix: Some("bridge-".into()),
        bridge_instances: Some(1),
        remote_broker_connection: RemoteBrokerConnection {
            endpoint: "remote:8883".into(),
            protocol: None,
            tls: Some(json!({"tlsEnabled": true})),
            authentication: Some(json!({})),
            extra: Map::new(),
        },
        local_broker_connection: None,
        topic_maps: vec![BridgeTopicMap {
            id: format!("{mq}/mqttBridgeConnector/b1/topicMap/t1"),
            name: "t1".into(),
            routes: vec![BridgeRoute {
                name: "up".into(),
                direction: "local-to-remote".into(),
                source: "telemetry/#".into(),
                target: None,
                qos: 1,
                shared_subscription: None,
                extra: Map::new(),
            }],
        }],
        extra: Map::from_iter([("logLevel".to_owned(), json!("info"))]),
    }];
    let inst = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/i1";
    s.dataflow_endpoints = vec![DataflowEndpoint {
        id: format!("{inst}/dataflowEndpoints/default"),
        name: "default".into(),
        endpoint_type: "Mqtt".into(),
        mqtt_settings: Some(MqttEndpointSettings {
            host: Some("localhost:1883".into()),
            qos: Some(1),
            ..Default::default()
        }),
        extra: Map::new(),
    }];
    s.dataflow_profiles = vec![DataflowProfile {
        id: format!("{inst}/dataflowProfiles/p1"),
        name: "p1".into(),
        instance_count: Some(1),
        extra: Map::new(),
    }];
    s.dataflows = vec![Dataflow {
        id: format!("{inst}/dataflowProfiles/p1/dataflows/d1"),
        name: "d1".into(),
        profile_name: "p1".into(),
        mode: "Enabled".into(),
        operations: vec![
            DataflowOperation {
                operation_type: "Source".into(),
                name: None,
                source_settings: Some(DataflowSource {
                    endpoint_ref: "default".into(),
                    data_sources: vec!["a/#".into()],
                    extra: Map::new(),
                }),
                built_in_transformation_settings: None,
                destination_settings: None,
                extra: Map::new(),
            },
            DataflowOperation {
                operation_type: "Destination".into(),
                name: None,
                source_settings: None,
                built_in_transformation_settings: None,
                destination_settings: Some(DataflowDestination {
                    endpoint_ref: "default".into(),
                    data_destination: "b".into(),
                    extra: Map::new(),
                }),
                extra: Map::new(),
            },
        ],
        extra: Map::new(),
    }];
    s.limits = Limits {
        max_session_expiry_seconds: 3600,
        max_message_expiry_seconds: Some(60),
        max_packet_size_bytes: 65536,
        max_receive_maximum: 100,
        max_keep_alive_seconds: Some(120),
        subscriber_queue_length: 500,
        subscriber_queue_strategy: QueueStrategy::DropOldest,
    };
    s
}

fn golden_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/small_snapshot.json")
}

#[test]
fn golden_json_of_a_small_snapshot_is_the_wire_form() {
    let rendered = serde_json::to_string_pretty(&small()).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(golden_path(), &rendered).unwrap();
    }
    let golden = std::fs::read_to_string(golden_path()).unwrap();
    assert_eq!(
        rendered, golden,
        "the wire form changed; if that is intended and compatible (see the crate docs), update tests/golden/small_snapshot.json"
    );
    assert_eq!(
        BrokerSnapshot::from_json(golden.as_bytes()).unwrap(),
        small()
    );
}

#[test]
fn full_snapshot_round_trips_through_json() {
    let s = full();
    let back = BrokerSnapshot::from_json(&s.to_json()).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.digest(), s.digest());
}

#[test]
fn unknown_fields_are_ignored_at_every_level() {
    let mut v: Value = serde_json::to_value(small()).unwrap();
    v["addedInV1_5"] = json!({"anything": [1, 2]});
    v["listeners"][0]["futureField"] = json!(true);
    v["listeners"][0]["ports"][0]["maxConnections"] = json!(10);
    v["listeners"][0]["ports"][1]["tls"]["certificate"]["ocspStapling"] = json!(true);
    v["listeners"][0]["ports"][1]["tls"]["minVersion"] = json!("1.3");
    v["authentications"][0]["methods"][0]["clockSkewSeconds"] = json!(30);
    v["authorizations"][0]["rules"][0]["principals"]["groups"] = json!(["g"]);
    v["limits"]["maxTopicLevels"] = json!(8);
    let back = BrokerSnapshot::from_value(v).unwrap();
    assert_eq!(back, small());
}

#[test]
fn missing_optional_sections_take_their_defaults() {
    let back = BrokerSnapshot::from_json(
        format!(r#"{{"schemaVersion":1,"brokerId":"{BROKER}"}}"#).as_bytes(),
    )
    .unwrap();
    assert_eq!(
        back,
        BrokerSnapshot::new(BROKER, BrokerFlavor::IoTOperations)
    );
    assert_eq!(back.limits, Limits::default());
    assert!(back.validate().is_ok());
}

#[test]
fn a_newer_schema_version_is_refused_before_parsing_the_rest() {
    // The body is not even a valid v1 snapshot: the version gate must answer first.
    let doc = json!({"schemaVersion": SCHEMA_VERSION + 1, "brokerId": 42, "listeners": "changed"});
    let err = BrokerSnapshot::from_value(doc).unwrap_err();
    match &err {
        ContractError::UnsupportedSchemaVersion { found, supported } => {
            assert_eq!(*found, u64::from(SCHEMA_VERSION) + 1);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("expected UnsupportedSchemaVersion, got {other:?}"),
    }
    assert!(err.to_string().contains("upgrade the node"), "{err}");
}

#[test]
fn a_missing_or_zero_schema_version_is_refused() {
    for doc in [
        json!({"brokerId": BROKER}),
        json!({"schemaVersion": 0, "brokerId": BROKER}),
        json!({"schemaVersion": "1", "brokerId": BROKER}),
    ] {
        assert!(
            matches!(
                BrokerSnapshot::from_value(doc.clone()),
                Err(ContractError::MissingSchemaVersion { .. })
            ),
            "{doc}"
        );
    }
}

#[test]
fn an_unknown_enum_value_parses_but_fails_validation_naming_the_resource() {
    let mut v: Value = serde_json::to_value(small()).unwrap();
    v["listeners"][0]["ports"][0]["protocol"] = json!("Quic");
    v["authentications"][0]["methods"][0] = json!({"method": "Passkey", "rpId": "x"});
    let s = BrokerSnapshot::from_value(v).unwrap();
    assert_eq!(s.listeners[0].ports[0].protocol, Protocol::Unknown);
    assert_eq!(
        s.authentications[0].methods[0],
        AuthenticationMethod::Unknown
    );
    let err = s.validate().unwrap_err();
    let ids: Vec<&str> = err
        .violations
        .iter()
        .map(|v| v.resource_id.as_str())
        .collect();
    assert_eq!(
        ids,
        vec![id("listeners/main"), id("authentications/authn")],
        "{err}"
    );
    assert!(err.to_string().contains("unknown protocol"), "{err}");
    assert!(
        err.to_string().contains("unknown authentication method"),
        "{err}"
    );
}

#[test]
fn digest_ignores_generation_and_sources_but_not_content() {
    let a = full();
    let mut b = full();
    b.generation = 42;
    b.sources.push(SourceRef {
        id: "/x".into(),
        etag: "y".into(),
    });
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.digest().len(), 64);
    let mut c = full();
    c.listeners[0].ports[0].port = 1884;
    assert_ne!(a.digest(), c.digest());
    let mut d = full();
    d.limits.max_keep_alive_seconds = None;
    assert_ne!(a.digest(), d.digest());
}

#[test]
fn digest_does_not_depend_on_the_order_of_carried_fields() {
    let mut a = full();
    let mut b = full();
    a.bridges[0].extra = Map::from_iter([
        ("logLevel".to_owned(), json!("info")),
        ("image".to_owned(), json!({"repository": "r", "tag": "t"})),
    ]);
    b.bridges[0].extra = Map::from_iter([
        ("image".to_owned(), json!({"tag": "t", "repository": "r"})),
        ("logLevel".to_owned(), json!("info")),
    ]);
    assert_eq!(a.digest(), b.digest());
}

#[test]
fn digest_of_the_golden_snapshot_is_pinned() {
    // Pins the canonical form and the hash. Cross-checked once with Python: sha256 of
    // json.dumps(golden minus generation/sources, sort_keys=True, separators=(",", ":")).
    // A change here makes every pusher see every broker as changed after an upgrade, which
    // should be a deliberate decision.
    assert_eq!(
        small().digest(),
        "c6f2e6c88529d5de1970f716e879c192f723892dee4a9a24bd9eed8c98f421a7"
    );
}

#[test]
fn a_complete_snapshot_validates() {
    full().validate().unwrap();
}

#[test]
fn duplicate_ports_and_empty_names_name_the_offending_resources() {
    let mut s = full();
    s.listeners.push(Listener {
        id: id("listeners/second"),
        name: "second".into(),
        ports: vec![ListenerPort {
            port: 1883,
            ..s.listeners[0].ports[1].clone()
        }],
    });
    s.listeners.push(Listener {
        id: id("listeners/blank"),
        name: " ".into(),
        ports: vec![],
    });
    let err = s.validate().unwrap_err();
    let got: Vec<(String, String)> = err
        .violations
        .iter()
        .map(|v| (v.resource_id.clone(), v.message.clone()))
        .collect();
    assert!(
        got.contains(&(
            id("listeners/second"),
            format!("port 1883 is already used by {}", id("listeners/main"))
        )),
        "{got:?}"
    );
    assert!(
        got.contains(&(id("listeners/blank"), "listener has an empty name".into())),
        "{got:?}"
    );
    assert!(
        got.contains(&(id("listeners/blank"), "listener has no ports".into())),
        "{got:?}"
    );
}

#[test]
fn dangling_references_are_violations() {
    let mut s = full();
    s.listeners[0].ports[0].authorization_refs = vec!["missing".into()];
    s.namespaces[0].permission_bindings[0].topic_space_name = "nope".into();
    s.namespaces[0].permission_bindings[0].client_group_name = "$all".into();
    let err = s.validate().unwrap_err();
    let msgs: Vec<String> = err.violations.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        msgs,
        vec![
            format!(
                "{}: port 1883: authorization 'missing' does not exist",
                id("listeners/main")
            ),
            format!(
                "{}: topic space 'nope' does not exist",
                s.namespaces[0].permission_bindings[0].id
            ),
        ]
    );
}

#[test]
fn a_bad_password_hash_is_reported_without_echoing_it() {
    let mut s = full();
    let secret = "hunter2-plaintext";
    if let AuthenticationMethod::UsernamePassword(up) = &mut s.authentications[0].methods[1] {
        up.credentials[0].password_hash = secret.into();
    } else {
        panic!("fixture changed");
    }
    let err = s.validate().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("is not an argon2 PHC hash"), "{text}");
    assert!(!text.contains(secret), "{text}");
    assert!(!format!("{:?}", s.authentications[0]).contains("argon2id"));
}

#[test]
fn manual_tls_needs_a_certificate_and_key_together() {
    let mut s = full();
    let port = &mut s.listeners[0].ports[2];
    if let Some(ListenerTls {
        certificate: ServerCertificate::Manual(m),
        ..
    }) = &mut port.tls
    {
        m.private_key_pem = None;
    }
    let err = s.validate().unwrap_err();
    assert_eq!(err.violations.len(), 1, "{err}");
    assert_eq!(
        err.violations[0].message,
        "port 9883: certificatePem and privateKeyPem must be given together"
    );
    assert!(!format!("{:?}", full().listeners[0].ports[2]).contains("MIIE"));
}

#[test]
fn ca_certificate_pem_wraps_bare_base64_and_keeps_pem() {
    let long = "A".repeat(100);
    let bare = CaCertificate {
        id: "x".into(),
        name: "x".into(),
        encoded_certificate: format!(" {long}\n"),
    };
    assert_eq!(
        bare.pem(),
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n{}\n-----END CERTIFICATE-----\n",
            &long[..64],
            &long[64..]
        )
    );
    let pem = CaCertificate {
        encoded_certificate: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----".into(),
        ..bare
    };
    assert_eq!(pem.pem(), format!("{}\n", pem.encoded_certificate));
}

#[test]
fn custom_jwt_authentication_needs_an_issuer_and_one_or_two_certificates() {
    let cert = |c: &str| IssuerCertificate {
        kid: None,
        encoded_certificate: c.into(),
    };
    let mut s = full();
    let ns_id = s.namespaces[0].id.clone();
    let jwt = s.namespaces[0].custom_jwt_authentication.as_mut().unwrap();
    jwt.token_issuer = " ".into();
    jwt.issuer_certificates = vec![cert("a"), cert(""), cert("c")];
    let msgs: Vec<String> = s
        .validate()
        .unwrap_err()
        .violations
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(
        msgs,
        vec![
            format!("{ns_id}: customJwtAuthentication has no tokenIssuer"),
            format!("{ns_id}: customJwtAuthentication has 3 issuer certificates; at most 2"),
            format!("{ns_id}: an issuer certificate has no encodedCertificate"),
        ]
    );
    let jwt = s.namespaces[0].custom_jwt_authentication.as_mut().unwrap();
    jwt.token_issuer = "iss".into();
    jwt.issuer_certificates.clear();
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("no issuer certificate"), "{err}");
}
