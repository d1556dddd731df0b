//! The config compiler against real resources: every resource is PUT through the engine (the
//! same path the HTTP handlers take), then `compile_broker` / `brokers_affected_by` read them back
//! from the store. Every test runs on SQLite and on a throwaway Postgres cluster.

use std::{collections::BTreeMap, sync::Arc};

use meridian_api::{
    compile::{BROKER_TAG, CompileError, LISTENERS_TAG, brokers_affected_by, compile_broker},
    engine::{Engine, ImmediateProvisioner, Preconditions, RequestContext},
    store::{PostgresStore, ReadSelector, SqliteStore, Store},
    test_util::PgCluster,
};
use meridian_contract::{
    AuthenticationMethod, AutomaticCertificate, BridgeRoute, BrokerFlavor, BrokerMethod,
    BrokerSnapshot, CertificateIssuer, ClientState, CustomAuthSettings, IssuerRef, Limits,
    ListenerPort, ListenerTls, ManualCertificate, PermissionType, Protocol, QueueStrategy,
    ServerCertificate, SourceRef, SubjectAltNames, TokenSettings, UsernamePasswordSettings,
    ValidationScheme, X509Attributes, X509Settings,
};
use serde_json::{Value, json};

const SUB: &str = "/subscriptions/sub1/resourceGroups/rg1/providers";
const AIO_V: &str = "2024-11-01";
const MQ_V: &str = "2023-10-04-preview";
const EG_V: &str = "2025-02-15";

fn instance() -> String {
    format!("{SUB}/Microsoft.IoTOperations/instances/inst1")
}

fn aio_broker() -> String {
    format!("{}/brokers/default", instance())
}

fn mq() -> String {
    format!("{SUB}/Microsoft.IoTOperationsMQ/mq/mq1")
}

fn mq_broker() -> String {
    format!("{}/broker/broker", mq())
}

fn namespace() -> String {
    format!("{SUB}/Microsoft.EventGrid/namespaces/fleet")
}

fn custom_location() -> Value {
    json!({"name": "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.ExtendedLocation/customLocations/edge", "type": "CustomLocation"})
}

fn image() -> Value {
    json!({"repository": "mcr.microsoft.com/azureiotoperations/x", "tag": "1.0"})
}

struct Fixture {
    engine: Engine,
    /// Etags by id (lower-cased), as the PUT answers returned them.
    etags: BTreeMap<String, String>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    fn new(store: Arc<dyn Store>, dir: Option<tempfile::TempDir>) -> Self {
        let engine = Engine::new(
            store,
            meridian_api::resources::all_types(),
            Arc::new(ImmediateProvisioner),
        );
        Self {
            engine,
            etags: BTreeMap::new(),
            _dir: dir,
        }
    }

    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        Self::new(Arc::new(store), Some(dir))
    }

    async fn postgres() -> Self {
        let url = PgCluster::shared().fresh_database().await;
        let store = PostgresStore::connect(&url).await.unwrap();
        Self::new(Arc::new(store), None)
    }

    fn store(&self) -> &dyn Store {
        self.engine.store().as_ref()
    }

    async fn put(&mut self, id: &str, body: Value) {
        let version = if id.contains("Microsoft.IoTOperationsMQ") {
            MQ_V
        } else if id.contains("Microsoft.IoTOperations") {
            AIO_V
        } else {
            EG_V
        };
        let out = self
            .engine
            .put(
                &RequestContext::system("test"),
                id,
                version,
                body,
                &Preconditions::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("PUT {id}: {e}"));
        let etag = out.resource["etag"].as_str().unwrap().to_owned();
        self.etags.insert(id.to_lowercase(), etag);
    }

    /// An IoT Operations child resource (extendedLocation required).
    async fn put_aio(&mut self, id: &str, props: Value) {
        self.put(
            id,
            json!({"extendedLocation": custom_location(), "properties": props}),
        )
        .await;
    }

    /// An MQ resource (location and extendedLocation required).
    async fn put_mq(&mut self, id: &str, props: Value) {
        self.put(
            id,
            json!({"location": "westeurope", "extendedLocation": custom_location(), "properties": props}),
        )
        .await;
    }

    async fn delete(&self, id: &str) {
        let version = if id.contains("Microsoft.IoTOperationsMQ") {
            MQ_V
        } else if id.contains("Microsoft.IoTOperations") {
            AIO_V
        } else {
            EG_V
        };
        let out = self
            .engine
            .delete(id, version, &Preconditions::default())
            .await
            .unwrap();
        assert!(out.deleted, "DELETE {id}");
    }

    /// The expected `sources` for these ids: stored casing, PUT etags, sorted by id.
    fn sources(&self, ids: &[String]) -> Vec<SourceRef> {
        let mut v: Vec<SourceRef> = ids
            .iter()
            .map(|id| SourceRef {
                id: id.clone(),
                etag: self.etags[&id.to_lowercase()].clone(),
            })
            .collect();
        v.sort_by_key(|s| s.id.to_lowercase());
        v
    }

    async fn compile(&self, broker: &str) -> BrokerSnapshot {
        let snap = compile_broker(self.store(), broker).await.unwrap();
        snap.validate()
            .unwrap_or_else(|e| panic!("compiled snapshot is invalid: {e}"));
        snap
    }

    /// An IoT Operations instance with broker `default`: limits, two listeners, authentication,
    /// authorization, a dataflow endpoint/profile/dataflow, plus a second broker `other` whose
    /// resources must not leak into `default`.
    async fn aio_world(&mut self) {
        self.put(
            &instance(),
            json!({"location": "westeurope", "extendedLocation": custom_location(), "properties": {
                "schemaRegistryRef": {"resourceId": "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.DeviceRegistry/schemaRegistries/sr"}
            }}),
        )
        .await;
        let b = aio_broker();
        self.put_aio(
            &b,
            json!({"advanced": {"clients": {
                "maxSessionExpirySeconds": 3600,
                "maxMessageExpirySeconds": 600,
                "maxPacketSizeBytes": 65536,
                "maxReceiveMaximum": 100,
                "maxKeepAliveSeconds": 120,
                "subscriberQueueLimit": {"length": 500, "strategy": "DropOldest"}
            }}}),
        )
        .await;
        self.put_aio(
            &format!("{b}/listeners/main"),
            json!({"ports": [
                {"port": 1883, "authenticationRef": "authn", "authorizationRef": "authz"},
                {"port": 8883, "protocol": "WebSockets", "tls": {"mode": "Automatic", "certManagerCertificateSpec": {
                    "issuerRef": {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "ca"},
                    "san": {"dns": ["broker.local"], "ip": ["127.0.0.1"]},
                    "privateKey": {"algorithm": "Ec256", "rotationPolicy": "Always"}
                }}}
            ]}),
        )
        .await;
        self.put_aio(
            &format!("{b}/listeners/secure"),
            json!({"ports": [{"port": 9883, "authenticationRef": "authn",
                "tls": {"mode": "Manual", "manual": {"secretRef": "server-cert"}}}]}),
        )
        .await;
        self.put_aio(
            &format!("{b}/authentications/authn"),
            json!({"authenticationMethods": [
                {"method": "X509", "x509Settings": {"trustedClientCaCert": "my-ca",
                    "authorizationAttributes": {"root": {"subject": "CN=Contoso Root", "attributes": {"org": "contoso"}}}}},
                {"method": "ServiceAccountToken", "serviceAccountTokenSettings": {"audiences": ["aio-internal"]}},
                {"method": "Custom", "customSettings": {"endpoint": "https://auth.example/check",
                    "headers": {"x-key": "v"}, "auth": {"x509": {"secretRef": "client-cert"}}}}
            ]}),
        )
        .await;
        self.put_aio(
            &format!("{b}/authorizations/authz"),
            json!({"authorizationPolicies": {"cache": "Enabled", "rules": [{
                "principals": {"clientIds": ["c1"], "attributes": [{"floor": "1"}]},
                "brokerResources": [
                    {"method": "Connect", "clientIds": ["c1"]},
                    {"method": "Publish", "topics": ["sensors/{principal.clientId}/#"]}
                ],
                "stateStoreResources": [{"keyType": "Pattern", "keys": ["k*"], "method": "Read"}]
            }]}}),
        )
        .await;
        let inst = instance();
        self.put_aio(
            &format!("{inst}/dataflowEndpoints/local"),
            json!({"endpointType": "Mqtt", "mqttSettings": {"host": "localhost:1883", "authentication": {"method": "Anonymous"}, "qos": 1}}),
        )
        .await;
        self.put_aio(
            &format!("{inst}/dataflowProfiles/prof"),
            json!({"instanceCount": 2}),
        )
        .await;
        self.put_aio(
            &format!("{inst}/dataflowProfiles/prof/dataflows/flow1"),
            json!({"operations": [
                {"operationType": "Source", "sourceSettings": {"endpointRef": "local", "dataSources": ["thermostats/+/telemetry"]}},
                {"operationType": "Destination", "destinationSettings": {"endpointRef": "local", "dataDestination": "out"}}
            ]}),
        )
        .await;
        let other = format!("{inst}/brokers/other");
        self.put_aio(&other, json!({})).await;
        self.put_aio(
            &format!("{other}/listeners/extra"),
            json!({"ports": [{"port": 2883}]}),
        )
        .await;
    }

    /// An MQ with broker `broker`: two listeners, authentication and authorization naming one of
    /// them, a bridge connector with a topic map, and a kafka connector (not compiled).
    async fn mq_world(&mut self) {
        self.put_mq(&mq(), json!({})).await;
        let b = mq_broker();
        self.put_mq(
            &b,
            json!({"authImage": image(), "brokerImage": image(), "healthManagerImage": image(), "mode": "auto",
                "cardinality": {"backendChain": {"partitions": 1, "redundancyFactor": 1}, "frontend": {"replicas": 1,
                    "temporaryResourceLimits": {"maxInflightMessages": 10, "maxInflightPatches": 10,
                        "maxInflightPatchesPerClient": 5, "maxQueuedMessages": 250, "maxQueuedQos0Messages": 100,
                        "maxSessionExpirySecs": 7200, "maxMessageExpirySecs": 900}}}}),
        )
        .await;
        self.put_mq(
            &format!("{b}/listener/secure"),
            json!({"brokerRef": "broker", "port": 8883, "authenticationEnabled": true, "authorizationEnabled": true,
                "tls": {"manual": {"secretName": "server-cert", "secretNamespace": "azure-iot-operations"}}}),
        )
        .await;
        self.put_mq(
            &format!("{b}/listener/open"),
            json!({"brokerRef": "broker", "port": 1883}),
        )
        .await;
        self.put_mq(
            &format!("{b}/authentication/authn"),
            json!({"listenerRef": ["SECURE"], "authenticationMethods": [
                {"usernamePassword": {"secretName": "passwords"}},
                {"x509": {"trustedClientCaCertConfigMap": "client-ca", "attributes": {"secretName": "attrs"}}},
                {"sat": {"audiences": ["aio-mq"]}}
            ]}),
        )
        .await;
        self.put_mq(
            &format!("{b}/authorization/authz"),
            json!({"listenerRef": ["secure"], "authorizationPolicies": {"enableCache": false, "rules": [{
                "principals": {"clientids": ["c1"], "usernames": ["u1"]},
                "brokerResources": [{"method": "Connect"}, {"method": "Subscribe", "topics": ["alerts/#"]}]
            }]}}),
        )
        .await;
        let bridge = format!("{}/mqttBridgeConnector/bridge", mq());
        self.put_mq(
            &bridge,
            json!({"image": image(), "protocol": "v5", "clientIdPrefix": "br-",
                "remoteBrokerConnection": {"authentication": {}, "endpoint": "remote:8883", "tls": {"tlsEnabled": true}}}),
        )
        .await;
        self.put_mq(
            &format!("{bridge}/topicMap/map"),
            json!({"mqttBridgeConnectorRef": "bridge", "routes": [
                {"direction": "local-to-remote", "name": "up", "source": "telemetry/#", "qos": 0},
                {"direction": "remote-to-local", "name": "down", "source": "commands/#", "target": "cmd"}
            ]}),
        )
        .await;
        self.put_mq(
            &format!("{}/kafkaConnector/kafka", mq()),
            json!({"kafkaConnection": {"authentication": {"enabled": false}, "endpoint": "kafka:9093", "tls": {"tlsEnabled": true}}}),
        )
        .await;
    }

    /// An Event Grid namespace with one of each child; `tags` decides its binding.
    async fn namespace_world(&mut self, tags: Value) {
        let ns = namespace();
        self.put(
            &ns,
            json!({"location": "westeurope", "tags": tags, "properties": {"topicSpacesConfiguration": {
                "state": "Enabled", "maximumSessionExpiryInHours": 2,
                "clientAuthentication": {"alternativeAuthenticationNameSources": ["ClientCertificateSubject"],
                    "customJwtAuthentication": {"tokenIssuer": "https://idp.example.com",
                        "encodedIssuerCertificates": [{"kid": "k1", "encodedCertificate": "MIIB"}]}}
            }}}),
        )
        .await;
        self.put(
            &format!("{ns}/clients/dev1"),
            json!({"properties": {"authenticationName": "dev1-auth", "state": "Enabled",
                "attributes": {"type": "sensor", "floors": ["1", "2"]},
                "clientCertificateAuthentication": {"validationScheme": "ThumbprintMatch", "allowedThumbprints": ["AB12"]}}}),
        )
        .await;
        self.put(
            &format!("{ns}/clients/dev2"),
            json!({"properties": {"state": "Disabled"}}),
        )
        .await;
        self.put(
            &format!("{ns}/clientGroups/sensors"),
            json!({"properties": {"query": "attributes.type = 'sensor'"}}),
        )
        .await;
        self.put(
            &format!("{ns}/topicSpaces/telemetry"),
            json!({"properties": {"topicTemplates": ["devices/${client.authenticationName}/telemetry"]}}),
        )
        .await;
        self.put(
            &format!("{ns}/permissionBindings/pub"),
            json!({"properties": {"clientGroupName": "sensors", "topicSpaceName": "telemetry", "permission": "Publisher"}}),
        )
        .await;
        self.put(
            &format!("{ns}/caCertificates/root"),
            json!({"properties": {"encodedCertificate": "MIIBtest"}}),
        )
        .await;
    }
}

fn port(snap: &BrokerSnapshot, listener: &str, i: usize) -> ListenerPort {
    snap.listener(listener)
        .unwrap_or_else(|| panic!("listener {listener} missing"))
        .ports[i]
        .clone()
}

async fn iot_operations_broker_compiles_from_its_resources(mut f: Fixture) {
    f.aio_world().await;
    let b = aio_broker();
    let snap = f.compile(&b).await;

    assert_eq!(snap.broker_id, b);
    assert_eq!(snap.flavor, BrokerFlavor::IoTOperations);
    assert_eq!(snap.generation, 0);
    let inst = instance();
    assert_eq!(
        snap.sources,
        f.sources(&[
            b.clone(),
            format!("{b}/listeners/main"),
            format!("{b}/listeners/secure"),
            format!("{b}/authentications/authn"),
            format!("{b}/authorizations/authz"),
            format!("{inst}/dataflowEndpoints/local"),
            format!("{inst}/dataflowProfiles/prof"),
            format!("{inst}/dataflowProfiles/prof/dataflows/flow1"),
        ]),
        "sources: the broker, its children, the instance's dataflow resources; not the other broker"
    );

    let names: Vec<&str> = snap.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["main", "secure"]);
    assert_eq!(
        port(&snap, "main", 0),
        ListenerPort {
            port: 1883,
            protocol: Protocol::Mqtt,
            tls: None,
            authentication_enabled: true,
            authentication_refs: vec!["authn".into()],
            authorization_enabled: true,
            authorization_refs: vec!["authz".into()],
            default_namespace: None,
        }
    );
    assert_eq!(
        port(&snap, "main", 1),
        ListenerPort {
            port: 8883,
            protocol: Protocol::WebSockets,
            tls: Some(ListenerTls {
                certificate: ServerCertificate::Automatic(AutomaticCertificate {
                    issuer: CertificateIssuer::LocalCa,
                    san: SubjectAltNames {
                        dns: vec!["broker.local".into()],
                        ip: vec!["127.0.0.1".into()],
                    },
                    duration: None,
                    renew_before: None,
                    private_key_algorithm: Some("Ec256".into()),
                    issuer_ref: Some(IssuerRef {
                        group: "cert-manager.io".into(),
                        kind: "ClusterIssuer".into(),
                        name: "ca".into(),
                    }),
                }),
                client_ca_pem: None,
            }),
            authentication_enabled: false,
            authentication_refs: vec![],
            authorization_enabled: false,
            authorization_refs: vec![],
            default_namespace: None,
        }
    );
    assert_eq!(
        port(&snap, "secure", 0).tls.unwrap().certificate,
        ServerCertificate::Manual(ManualCertificate {
            secret_ref: Some("server-cert".into()),
            ..Default::default()
        })
    );

    let authn = snap.authentication("authn").unwrap();
    assert_eq!(authn.id, format!("{b}/authentications/authn"));
    assert_eq!(
        authn.methods,
        vec![
            AuthenticationMethod::X509(X509Settings {
                trusted_ca_ref: Some("my-ca".into()),
                trusted_ca_pem: None,
                authorization_attributes: BTreeMap::from([(
                    "root".into(),
                    X509Attributes {
                        subject: "CN=Contoso Root".into(),
                        attributes: BTreeMap::from([("org".into(), "contoso".into())]),
                    }
                )]),
                attributes_secret_ref: None,
            }),
            AuthenticationMethod::ServiceAccountToken(TokenSettings {
                audiences: vec!["aio-internal".into()],
                ..Default::default()
            }),
            AuthenticationMethod::Custom(CustomAuthSettings {
                endpoint: "https://auth.example/check".into(),
                headers: BTreeMap::from([("x-key".into(), "v".into())]),
                timeout_seconds: CustomAuthSettings::DEFAULT_TIMEOUT_SECONDS,
                ca_cert_ref: None,
                ca_cert_pem: None,
                client_cert_secret_ref: Some("client-cert".into()),
            }),
        ]
    );

    let authz = snap.authorization("authz").unwrap();
    assert!(authz.cache);
    assert_eq!(authz.rules.len(), 1);
    let rule = &authz.rules[0];
    assert_eq!(rule.principals.client_ids, ["c1"]);
    assert_eq!(
        rule.principals.attributes,
        vec![BTreeMap::from([("floor".to_owned(), "1".to_owned())])]
    );
    assert_eq!(rule.broker_resources[0].method, BrokerMethod::Connect);
    assert_eq!(rule.broker_resources[0].client_ids, ["c1"]);
    assert_eq!(rule.broker_resources[1].method, BrokerMethod::Publish);
    assert_eq!(
        rule.broker_resources[1].topics,
        ["sensors/{principal.clientId}/#"]
    );
    assert_eq!(rule.state_store_resources[0].key_type, "Pattern");
    assert_eq!(rule.state_store_resources[0].method, "Read");

    assert_eq!(
        snap.limits,
        Limits {
            max_session_expiry_seconds: 3600,
            max_message_expiry_seconds: Some(600),
            max_packet_size_bytes: 65536,
            max_receive_maximum: 100,
            max_keep_alive_seconds: Some(120),
            subscriber_queue_length: 500,
            subscriber_queue_strategy: QueueStrategy::DropOldest,
        }
    );

    assert_eq!(snap.dataflow_endpoints.len(), 1);
    let ep = &snap.dataflow_endpoints[0];
    assert_eq!(
        (ep.name.as_str(), ep.endpoint_type.as_str()),
        ("local", "Mqtt")
    );
    let mqtt = ep.mqtt_settings.as_ref().unwrap();
    assert_eq!(mqtt.host.as_deref(), Some("localhost:1883"));
    assert_eq!(mqtt.qos, Some(1));
    assert_eq!(mqtt.authentication, Some(json!({"method": "Anonymous"})));
    assert_eq!(snap.dataflow_profiles[0].name, "prof");
    assert_eq!(snap.dataflow_profiles[0].instance_count, Some(2));
    let flow = &snap.dataflows[0];
    assert_eq!(
        (flow.name.as_str(), flow.profile_name.as_str()),
        ("flow1", "prof")
    );
    assert_eq!(flow.mode, "Enabled");
    let source = flow.operations[0].source_settings.as_ref().unwrap();
    assert_eq!(source.endpoint_ref, "local");
    assert_eq!(source.data_sources, ["thermostats/+/telemetry"]);
    let dest = flow.operations[1].destination_settings.as_ref().unwrap();
    assert_eq!(dest.data_destination, "out");

    assert!(snap.namespaces.is_empty() && snap.bridges.is_empty());

    // The other broker of the instance sees its own listener and the shared dataflows.
    let other = f.compile(&format!("{}/brokers/other", instance())).await;
    assert_eq!(other.listeners.len(), 1);
    assert_eq!(other.listeners[0].ports[0].port, 2883);
    assert_eq!(other.dataflows.len(), 1);
    assert_eq!(other.limits, Limits::default());
}

async fn recompiling_is_stable_and_a_change_moves_digest_and_etag(mut f: Fixture) {
    f.aio_world().await;
    let b = aio_broker();
    let first = f.compile(&b).await;
    // Same content again (a new etag, as every PUT gets): digest unchanged, sources updated.
    let body = json!({"ports": [{"port": 9883, "authenticationRef": "authn",
        "tls": {"mode": "Manual", "manual": {"secretRef": "server-cert"}}}]});
    f.put_aio(&format!("{b}/listeners/secure"), body).await;
    let second = f.compile(&b).await;
    assert_eq!(first.digest(), second.digest());
    assert_ne!(first.sources, second.sources);
    let secure = format!("{b}/listeners/secure");
    assert!(second.includes_source(&secure, &f.etags[&secure.to_lowercase()]));
    // A real change: a new port.
    f.put_aio(&secure, json!({"ports": [{"port": 9884}]})).await;
    let third = f.compile(&b).await;
    assert_ne!(second.digest(), third.digest());
    assert_eq!(port(&third, "secure", 0).port, 9884);
    // Uppercase id: same broker.
    let upper = compile_broker(f.store(), &b.to_uppercase()).await.unwrap();
    assert_eq!(upper.digest(), third.digest());
    assert_eq!(upper.broker_id, b, "stored casing, not the caller's");
}

async fn iot_operations_mq_broker_compiles_listener_refs_and_bridges(mut f: Fixture) {
    f.mq_world().await;
    let b = mq_broker();
    let snap = f.compile(&b).await;
    assert_eq!(snap.flavor, BrokerFlavor::IoTOperationsMq);
    let bridge = format!("{}/mqttBridgeConnector/bridge", mq());
    assert_eq!(
        snap.sources,
        f.sources(&[
            b.clone(),
            format!("{b}/listener/secure"),
            format!("{b}/listener/open"),
            format!("{b}/authentication/authn"),
            format!("{b}/authorization/authz"),
            bridge.clone(),
            format!("{bridge}/topicMap/map"),
        ]),
        "the kafka connector is stored but not compiled"
    );

    let secure = port(&snap, "secure", 0);
    assert_eq!(secure.port, 8883);
    assert_eq!(secure.protocol, Protocol::Mqtt);
    assert!(secure.authentication_enabled && secure.authorization_enabled);
    assert_eq!(
        secure.authentication_refs,
        ["authn"],
        "listenerRef matched case-insensitively"
    );
    assert_eq!(secure.authorization_refs, ["authz"]);
    assert_eq!(
        secure.tls.unwrap().certificate,
        ServerCertificate::Manual(ManualCertificate {
            secret_ref: Some("server-cert".into()),
            secret_namespace: Some("azure-iot-operations".into()),
            ..Default::default()
        })
    );
    let open = port(&snap, "open", 0);
    assert_eq!(open.port, 1883);
    assert!(!open.authentication_enabled && !open.authorization_enabled);
    assert!(open.authentication_refs.is_empty() && open.tls.is_none());

    assert_eq!(
        snap.authentication("authn").unwrap().methods,
        vec![
            AuthenticationMethod::UsernamePassword(UsernamePasswordSettings {
                secret_ref: Some("passwords".into()),
                key_vault: None,
                credentials: vec![],
            }),
            AuthenticationMethod::X509(X509Settings {
                trusted_ca_ref: Some("client-ca".into()),
                trusted_ca_pem: None,
                authorization_attributes: BTreeMap::new(),
                attributes_secret_ref: Some("attrs".into()),
            }),
            AuthenticationMethod::ServiceAccountToken(TokenSettings {
                audiences: vec!["aio-mq".into()],
                ..Default::default()
            }),
        ]
    );
    let authz = snap.authorization("authz").unwrap();
    assert!(!authz.cache);
    let rule = &authz.rules[0];
    assert_eq!(
        rule.principals.client_ids,
        ["c1"],
        "MQ `clientids` maps to clientIds"
    );
    assert_eq!(rule.principals.usernames, ["u1"]);
    assert_eq!(rule.broker_resources[0].method, BrokerMethod::Connect);
    assert_eq!(rule.broker_resources[1].method, BrokerMethod::Subscribe);
    assert_eq!(rule.broker_resources[1].topics, ["alerts/#"]);

    assert_eq!(snap.limits.max_session_expiry_seconds, 7200);
    assert_eq!(snap.limits.max_message_expiry_seconds, Some(900));
    assert_eq!(snap.limits.subscriber_queue_length, 250);
    assert_eq!(
        snap.limits.max_packet_size_bytes,
        Limits::default().max_packet_size_bytes
    );

    assert_eq!(snap.bridges.len(), 1);
    let br = &snap.bridges[0];
    assert_eq!(
        (br.id.as_str(), br.name.as_str()),
        (bridge.as_str(), "bridge")
    );
    assert_eq!(br.protocol, "v5");
    assert_eq!(br.client_id_prefix.as_deref(), Some("br-"));
    assert_eq!(br.remote_broker_connection.endpoint, "remote:8883");
    assert_eq!(
        br.remote_broker_connection.tls,
        Some(json!({"tlsEnabled": true}))
    );
    assert_eq!(
        br.extra.get("image"),
        Some(&image()),
        "unmodelled fields carried"
    );
    assert_eq!(br.topic_maps.len(), 1);
    assert_eq!(br.topic_maps[0].name, "map");
    let routes: Vec<(&str, &str, &str, Option<&str>, u8)> = br.topic_maps[0]
        .routes
        .iter()
        .map(|r: &BridgeRoute| {
            (
                r.name.as_str(),
                r.direction.as_str(),
                r.source.as_str(),
                r.target.as_deref(),
                r.qos,
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            ("up", "local-to-remote", "telemetry/#", None, 0),
            ("down", "remote-to-local", "commands/#", Some("cmd"), 1),
        ]
    );
}

async fn namespaces_bind_by_tag_or_to_the_only_broker(mut f: Fixture) {
    f.aio_world().await;
    // aio_world has two brokers (default, other): an untagged namespace binds to neither.
    f.namespace_world(json!({})).await;
    assert!(f.compile(&aio_broker()).await.namespaces.is_empty());

    // Tagged with `default` (in other casing, key too): bound to `default` only.
    let tag = json!({"Meridian.Broker": aio_broker().to_uppercase()});
    f.namespace_world(tag).await;
    let snap = f.compile(&aio_broker()).await;
    let other = f.compile(&format!("{}/brokers/other", instance())).await;
    assert!(other.namespaces.is_empty());
    assert_eq!(snap.namespaces.len(), 1);
    let ns = &snap.namespaces[0];
    let nsid = namespace();
    assert_eq!((ns.id.as_str(), ns.name.as_str()), (nsid.as_str(), "fleet"));
    assert!(ns.topic_spaces_enabled);
    assert_eq!(ns.maximum_session_expiry_in_hours, Some(2));
    assert_eq!(
        ns.alternative_authentication_name_sources,
        ["ClientCertificateSubject"]
    );
    let jwt = ns.custom_jwt_authentication.as_ref().expect("custom JWT");
    assert_eq!(jwt.token_issuer, "https://idp.example.com");
    assert_eq!(
        jwt.issuer_certificates
            .iter()
            .map(|c| (c.kid.as_deref(), c.encoded_certificate.as_str()))
            .collect::<Vec<_>>(),
        [(Some("k1"), "MIIB")]
    );
    let clients: Vec<(&str, &str, ClientState)> = ns
        .clients
        .iter()
        .map(|c| (c.name.as_str(), c.authentication_name.as_str(), c.state))
        .collect();
    assert_eq!(
        clients,
        [
            ("dev1", "dev1-auth", ClientState::Enabled),
            ("dev2", "dev2", ClientState::Disabled),
        ],
        "authenticationName defaults to the client's name"
    );
    assert_eq!(ns.clients[0].attributes["floors"], json!(["1", "2"]));
    let cert = ns.clients[0].certificate_authentication.as_ref().unwrap();
    assert_eq!(
        cert.validation_scheme,
        Some(ValidationScheme::ThumbprintMatch)
    );
    assert_eq!(cert.allowed_thumbprints, ["AB12"]);
    assert_eq!(ns.client_groups[0].query, "attributes.type = 'sensor'");
    assert_eq!(
        ns.topic_spaces[0].topic_templates,
        ["devices/${client.authenticationName}/telemetry"]
    );
    let pb = &ns.permission_bindings[0];
    assert_eq!(
        (
            pb.client_group_name.as_str(),
            pb.topic_space_name.as_str(),
            pb.permission
        ),
        ("sensors", "telemetry", PermissionType::Publisher)
    );
    assert_eq!(ns.ca_certificates[0].encoded_certificate, "MIIBtest");
    for child in [
        nsid.clone(),
        format!("{nsid}/clients/dev1"),
        format!("{nsid}/clients/dev2"),
        format!("{nsid}/clientGroups/sensors"),
        format!("{nsid}/topicSpaces/telemetry"),
        format!("{nsid}/permissionBindings/pub"),
        format!("{nsid}/caCertificates/root"),
    ] {
        assert!(
            snap.includes_source(&child, &f.etags[&child.to_lowercase()]),
            "{child} missing from sources"
        );
    }

    // A tag naming a broker that does not exist binds to nothing.
    f.namespace_world(json!({BROKER_TAG: format!("{}/brokers/gone", instance())}))
        .await;
    assert!(f.compile(&aio_broker()).await.namespaces.is_empty());
}

async fn a_namespace_tag_makes_it_the_default_namespace_of_listeners(mut f: Fixture) {
    f.aio_world().await;
    let bound = aio_broker();
    f.namespace_world(json!({BROKER_TAG: bound, LISTENERS_TAG: "Secure"}))
        .await;
    let snap = f.compile(&aio_broker()).await;
    for p in &snap.listener("secure").unwrap().ports {
        assert_eq!(p.default_namespace.as_deref(), Some("fleet"));
    }
    assert_eq!(port(&snap, "main", 0).default_namespace, None);

    // A second namespace claiming the same listener: that namespace is invalid, named.
    let second = format!("{SUB}/Microsoft.EventGrid/namespaces/zoo");
    f.put(
        &second,
        json!({"location": "westeurope", "tags": {BROKER_TAG: bound, LISTENERS_TAG: "main, secure"},
               "properties": {"topicSpacesConfiguration": {"state": "Enabled"}}}),
    )
    .await;
    match compile_broker(f.store(), &aio_broker()).await {
        Err(CompileError::InvalidResource { id, message }) => {
            assert_eq!(id, second);
            assert!(
                message.contains("already the default listener of namespace 'fleet'"),
                "{message}"
            );
        }
        other => panic!("expected InvalidResource, got {other:?}"),
    }
    // A listener the broker does not have.
    f.put(
        &second,
        json!({"location": "westeurope", "tags": {BROKER_TAG: bound, LISTENERS_TAG: "nope"},
               "properties": {"topicSpacesConfiguration": {"state": "Enabled"}}}),
    )
    .await;
    match compile_broker(f.store(), &aio_broker()).await {
        Err(CompileError::InvalidResource { id, message }) => {
            assert_eq!(id, second);
            assert!(message.contains("no listener 'nope'"), "{message}");
        }
        other => panic!("expected InvalidResource, got {other:?}"),
    }
}

async fn an_untagged_namespace_binds_to_the_only_broker_of_its_subscription(mut f: Fixture) {
    f.mq_world().await;
    f.namespace_world(json!({})).await;
    // A namespace in another subscription never binds here.
    f.put(
        "/subscriptions/sub2/resourceGroups/rg1/providers/Microsoft.EventGrid/namespaces/elsewhere",
        json!({"location": "westeurope", "properties": {}}),
    )
    .await;
    let snap = f.compile(&mq_broker()).await;
    let names: Vec<&str> = snap.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["fleet"]);
    assert_eq!(snap.namespace("FLEET").unwrap().clients.len(), 2);

    // A second broker in the subscription: the untagged namespace is no longer bound.
    f.put(
        &instance(),
        json!({"location": "westeurope", "extendedLocation": custom_location(), "properties": {
            "schemaRegistryRef": {"resourceId": "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.DeviceRegistry/schemaRegistries/sr"}
        }}),
    )
    .await;
    f.put_aio(&aio_broker(), json!({})).await;
    assert!(f.compile(&mq_broker()).await.namespaces.is_empty());
    assert!(f.compile(&aio_broker()).await.namespaces.is_empty());
}

async fn compile_errors_say_what_is_wrong(f: Fixture) {
    let ns = namespace();
    assert!(matches!(
        compile_broker(f.store(), &ns).await,
        Err(CompileError::NotABroker(id)) if id == ns
    ));
    assert!(matches!(
        compile_broker(f.store(), &format!("{}/listeners/extra", aio_broker())).await,
        Err(CompileError::NotABroker(_))
    ));
    let missing = aio_broker();
    let err = compile_broker(f.store(), &missing).await.unwrap_err();
    assert!(matches!(&err, CompileError::BrokerNotFound(id) if *id == missing));
    assert_eq!(
        err.to_string(),
        format!("broker '{missing}' does not exist")
    );
}

async fn brokers_affected_by_maps_each_kind_of_change(mut f: Fixture) {
    f.aio_world().await;
    f.mq_world().await;
    f.namespace_world(json!({})).await;
    let store = f.store();
    let aio = aio_broker();
    let other = format!("{}/brokers/other", instance());
    let mqb = mq_broker();
    let mut everyone = vec![aio.clone(), other.clone(), mqb.clone()];
    everyone.sort_by_key(|s| s.to_lowercase());
    let both_aio = {
        let mut v = vec![aio.clone(), other.clone()];
        v.sort_by_key(|s| s.to_lowercase());
        v
    };
    let inst = instance();
    let bridge = format!("{}/mqttBridgeConnector/bridge", mq());
    let cases: Vec<(String, Vec<String>)> = vec![
        (format!("{aio}/listeners/main"), vec![aio.clone()]),
        (format!("{aio}/authentications/authn"), vec![aio.clone()]),
        (
            format!("{aio}/authorizations/authz").to_uppercase(),
            vec![aio.clone()],
        ),
        (format!("{mqb}/listener/secure"), vec![mqb.clone()]),
        (aio.clone(), everyone.clone()),
        (mqb.clone(), everyone.clone()),
        (format!("{inst}/dataflowEndpoints/local"), both_aio.clone()),
        (
            format!("{inst}/dataflowProfiles/prof/dataflows/flow1"),
            both_aio.clone(),
        ),
        (inst.clone(), both_aio.clone()),
        (bridge.clone(), vec![mqb.clone()]),
        (format!("{bridge}/topicMap/map"), vec![mqb.clone()]),
        (mq(), vec![mqb.clone()]),
        (format!("{}/kafkaConnector/kafka", mq()), vec![]),
        (format!("{}/diagnosticService/diag", mq()), vec![]),
        (namespace(), everyone.clone()),
        (
            format!("{}/permissionBindings/pub", namespace()),
            everyone.clone(),
        ),
        (
            "/subscriptions/sub2/resourceGroups/rg1/providers/Microsoft.EventGrid/namespaces/x"
                .to_owned(),
            vec![],
        ),
        ("/subscriptions/sub1/resourceGroups/rg1".to_owned(), vec![]),
        ("not an id".to_owned(), vec![]),
    ];
    for (id, want) in cases {
        assert_eq!(
            brokers_affected_by(store, &id).await.unwrap(),
            want,
            "brokers affected by {id}"
        );
    }

    // After a DELETE: a deleted listener still maps to its broker; a deleted broker is still
    // named (and no longer compiles); a deleted instance took its brokers with it.
    f.delete(&format!("{aio}/listeners/main")).await;
    assert_eq!(
        brokers_affected_by(f.store(), &format!("{aio}/listeners/main"))
            .await
            .unwrap(),
        vec![aio.clone()]
    );
    f.delete(&other).await;
    let mut after = vec![aio.clone(), other.clone(), mqb.clone()];
    after.sort_by_key(|s| s.to_lowercase());
    assert_eq!(brokers_affected_by(f.store(), &other).await.unwrap(), after);
    assert!(matches!(
        compile_broker(f.store(), &other).await,
        Err(CompileError::BrokerNotFound(_))
    ));
    f.delete(&inst).await;
    assert_eq!(
        brokers_affected_by(f.store(), &inst).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        brokers_affected_by(f.store(), &namespace()).await.unwrap(),
        vec![mqb.clone()],
        "only the MQ broker is left in the subscription"
    );
}

async fn read_consistent_selects_exactly_what_it_is_asked(mut f: Fixture) {
    f.aio_world().await;
    // `defaultx` shares the prefix `…/brokers/default` but not `…/brokers/default/`.
    f.put_aio(&format!("{}/brokers/defaultx", instance()), json!({}))
        .await;
    let key = aio_broker().to_lowercase();
    let rows = f
        .store()
        .read_consistent(&[
            ReadSelector::Id(key.clone()),
            ReadSelector::IdPrefix(format!("{key}/")),
            // Overlaps the prefix: rows must still come back once.
            ReadSelector::Id(format!("{key}/listeners/main")),
            ReadSelector::TypeInSubscription {
                type_key: "microsoft.iotoperations/instances/dataflowprofiles".into(),
                subscription_key: "sub1".into(),
            },
            ReadSelector::TypeInSubscription {
                type_key: "microsoft.iotoperations/instances/dataflowprofiles".into(),
                subscription_key: "sub2".into(),
            },
        ])
        .await
        .unwrap();
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let b = aio_broker();
    assert_eq!(
        ids,
        vec![
            b.clone(),
            format!("{b}/authentications/authn"),
            format!("{b}/authorizations/authz"),
            format!("{b}/listeners/main"),
            format!("{b}/listeners/secure"),
            format!("{}/dataflowProfiles/prof", instance()),
        ]
    );
    assert_eq!(rows[0].etag, f.etags[&key], "rows carry their current etag");
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Fixture::sqlite().await).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Fixture::postgres().await).await })*
        }
    };
}

on_both_stores!(
    iot_operations_broker_compiles_from_its_resources,
    recompiling_is_stable_and_a_change_moves_digest_and_etag,
    iot_operations_mq_broker_compiles_listener_refs_and_bridges,
    namespaces_bind_by_tag_or_to_the_only_broker,
    a_namespace_tag_makes_it_the_default_namespace_of_listeners,
    an_untagged_namespace_binds_to_the_only_broker_of_its_subscription,
    compile_errors_say_what_is_wrong,
    brokers_affected_by_maps_each_kind_of_change,
    read_consistent_selects_exactly_what_it_is_asked,
);
