//! Shared fixture of the `resources_*` tests: the real app (every declared type, deployments
//! routes merged) on SQLite in a temp dir, an Owner token, and a minimal valid body per type.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different part of this module

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use meridian_api::{
    auth::{Authenticator, Role, RoleGrant},
    deployments::deployments_router,
    engine::{Engine, ImmediateProvisioner},
    http::{ApiMetrics, AppState, app},
    store::SqliteStore,
};
use serde_json::{Value, json};
use tower::ServiceExt;

pub const SECRET: &[u8] = b"resources-test-secret-resources-test-secret";
pub const SUB: &str = "00000000-0000-0000-0000-000000000001";
pub const RG: &str = "rg1";

pub struct Fixture {
    pub app: Router,
    pub engine: Engine,
    pub auth: Arc<Authenticator>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let engine = Engine::new(
            Arc::new(store),
            meridian_api::resources::all_types(),
            Arc::new(ImmediateProvisioner),
        );
        let auth =
            Arc::new(Authenticator::new("meridian", "meridian-api").with_hs256_secret(SECRET));
        let openapi = Arc::new(meridian_api::openapi::document(engine.registry()));
        let state = AppState {
            engine: engine.clone(),
            auth: auth.clone(),
            metrics: Arc::new(ApiMetrics::new()),
            openapi,
        };
        let app = app(state.clone()).merge(deployments_router(state));
        Self {
            app,
            engine,
            auth,
            _dir: dir,
        }
    }

    pub fn owner(&self) -> String {
        self.auth
            .mint(
                "alice",
                vec![RoleGrant {
                    role: Role::Owner,
                    scope: format!("/subscriptions/{SUB}"),
                }],
                std::time::Duration::from_secs(600),
            )
            .unwrap()
    }

    pub async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let token = self.owner();
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(
                body.map(|b| Body::from(b.to_string()))
                    .unwrap_or_else(Body::empty),
            )
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    /// PUT and expect success (200/201); returns the response body.
    pub async fn put_ok(&self, id: &str, api_version: &str, body: Value) -> Value {
        let (status, resp) = self
            .call(
                "PUT",
                &format!("{id}?api-version={api_version}"),
                Some(body),
            )
            .await;
        assert!(status.is_success(), "PUT {id}: {status} {resp}");
        resp
    }

    /// Creates `id` and every missing ancestor with minimal bodies.
    pub async fn ensure(&self, id: &str) {
        let (ns, pairs) = split_id(id);
        for depth in 1..=pairs.len() {
            let path: Vec<&str> = pairs[..depth].iter().map(|(t, _)| t.as_str()).collect();
            let sub_id = id_of(&ns, &pairs[..depth]);
            let (status, _) = self
                .call(
                    "GET",
                    &format!("{sub_id}?api-version={}", version_of(&ns)),
                    None,
                )
                .await;
            if status == StatusCode::OK {
                continue;
            }
            self.put_ok(&sub_id, version_of(&ns), minimal_body(&ns, &path.join("/")))
                .await;
        }
    }
}

/// `(namespace, [(type, name)…])` of a resource id.
pub fn split_id(id: &str) -> (String, Vec<(String, String)>) {
    let after = id.split("/providers/").nth(1).unwrap();
    let mut parts = after.split('/');
    let ns = parts.next().unwrap().to_owned();
    let rest: Vec<&str> = parts.collect();
    let pairs = rest
        .chunks(2)
        .map(|c| (c[0].to_owned(), c[1].to_owned()))
        .collect();
    (ns, pairs)
}

pub fn id_of(ns: &str, pairs: &[(String, String)]) -> String {
    let mut id = format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/{ns}");
    for (t, n) in pairs {
        id.push_str(&format!("/{t}/{n}"));
    }
    id
}

/// The api-version the tests use for a namespace (the one the current SDKs send).
pub fn version_of(ns: &str) -> &'static str {
    match ns {
        "Microsoft.IoTOperations" => "2026-07-01",
        "Microsoft.IoTOperationsMQ" => "2023-10-04-preview",
        "Microsoft.EventGrid" => "2025-02-15",
        other => panic!("unknown namespace {other}"),
    }
}

fn custom_location() -> Value {
    json!({"name": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg1/providers/Microsoft.ExtendedLocation/customLocations/edge", "type": "CustomLocation"})
}

fn image() -> Value {
    json!({"repository": "mcr.microsoft.com/azureiotoperations/x", "tag": "1.0"})
}

/// A minimal valid PUT body for every declared type (`type_path` like `instances/brokers`).
pub fn minimal_body(ns: &str, type_path: &str) -> Value {
    let props = match (ns, type_path) {
        ("Microsoft.IoTOperations", "instances") => {
            json!({"schemaRegistryRef": {"resourceId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg1/providers/Microsoft.DeviceRegistry/schemaRegistries/sr"}})
        }
        ("Microsoft.IoTOperations", "instances/brokers") => json!({}),
        ("Microsoft.IoTOperations", "instances/brokers/listeners") => {
            json!({"ports": [{"port": 1883}]})
        }
        ("Microsoft.IoTOperations", "instances/brokers/authentications") => {
            json!({"authenticationMethods": [{"method": "ServiceAccountToken", "serviceAccountTokenSettings": {"audiences": ["aio-internal"]}}]})
        }
        ("Microsoft.IoTOperations", "instances/brokers/authorizations") => {
            json!({"authorizationPolicies": {"rules": [{"principals": {"clientIds": ["c1"]}, "brokerResources": [{"method": "Connect"}]}]}})
        }
        ("Microsoft.IoTOperations", "instances/dataflowEndpoints") => {
            json!({"endpointType": "Mqtt", "mqttSettings": {"host": "aio-broker:18883", "authentication": {"method": "Anonymous"}}})
        }
        ("Microsoft.IoTOperations", "instances/dataflowProfiles") => json!({"instanceCount": 1}),
        ("Microsoft.IoTOperations", "instances/dataflowProfiles/dataflows") => {
            json!({"operations": [
                {"operationType": "Source", "sourceSettings": {"endpointRef": "default", "dataSources": ["thermostats/+/telemetry"]}},
                {"operationType": "Destination", "destinationSettings": {"endpointRef": "default", "dataDestination": "out"}}
            ]})
        }
        ("Microsoft.IoTOperationsMQ", "mq") => json!({}),
        ("Microsoft.IoTOperationsMQ", "mq/broker") => {
            json!({"authImage": image(), "brokerImage": image(), "healthManagerImage": image(), "mode": "auto"})
        }
        ("Microsoft.IoTOperationsMQ", "mq/broker/listener") => {
            json!({"brokerRef": "broker", "port": 1883})
        }
        ("Microsoft.IoTOperationsMQ", "mq/broker/authentication") => {
            json!({"authenticationMethods": [{"sat": {"audiences": ["aio-mq"]}}], "listenerRef": ["listener"]})
        }
        ("Microsoft.IoTOperationsMQ", "mq/broker/authorization") => {
            json!({"authorizationPolicies": {"enableCache": true, "rules": []}, "listenerRef": ["listener"]})
        }
        ("Microsoft.IoTOperationsMQ", "mq/diagnosticService") => json!({"image": image()}),
        ("Microsoft.IoTOperationsMQ", "mq/mqttBridgeConnector") => {
            json!({"image": image(), "protocol": "v5", "remoteBrokerConnection": {"authentication": {}, "endpoint": "remote:8883", "tls": {"tlsEnabled": true}}})
        }
        ("Microsoft.IoTOperationsMQ", "mq/mqttBridgeConnector/topicMap") => {
            json!({"mqttBridgeConnectorRef": "bridge"})
        }
        ("Microsoft.IoTOperationsMQ", "mq/kafkaConnector") => {
            json!({"kafkaConnection": {"authentication": {"enabled": false}, "endpoint": "kafka:9093", "tls": {"tlsEnabled": true}}})
        }
        ("Microsoft.IoTOperationsMQ", "mq/kafkaConnector/topicMap") => {
            json!({"kafkaConnectorRef": "kafka", "routes": [{"mqttToKafka": {"name": "r1", "mqttTopic": "a/b", "kafkaTopic": "k", "kafkaAcks": "one"}}]})
        }
        ("Microsoft.IoTOperationsMQ", "mq/dataLakeConnector") => {
            json!({"databaseFormat": "delta", "image": image(), "protocol": "v5", "target": {"localStorage": {"volumeName": "vol"}}})
        }
        ("Microsoft.IoTOperationsMQ", "mq/dataLakeConnector/topicMap") => {
            json!({"dataLakeConnectorRef": "lake", "mapping": {
            "allowedLatencySecs": 1, "clientId": "c1", "maxMessagesPerBatch": 10, "messagePayloadType": "json",
            "mqttSourceTopic": "a/b", "table": {"tableName": "t", "schema": [{"format": "utf8", "mapping": "$property.x", "name": "x", "optional": false}]}}})
        }
        ("Microsoft.EventGrid", "namespaces") => {
            json!({"topicSpacesConfiguration": {"state": "Enabled"}})
        }
        ("Microsoft.EventGrid", "namespaces/topicSpaces") => {
            json!({"topicTemplates": ["devices/+/telemetry"]})
        }
        ("Microsoft.EventGrid", "namespaces/clientGroups") => {
            json!({"query": "attributes.type = 'sensor'"})
        }
        ("Microsoft.EventGrid", "namespaces/permissionBindings") => {
            json!({"topicSpaceName": "ts1", "clientGroupName": "cg1", "permission": "Publisher"})
        }
        ("Microsoft.EventGrid", "namespaces/clients") => {
            json!({"authenticationName": "dev1", "state": "Enabled", "attributes": {"type": "sensor"}})
        }
        ("Microsoft.EventGrid", "namespaces/caCertificates") => {
            json!({"encodedCertificate": "MIIBtest"})
        }
        other => panic!("no minimal body for {other:?}"),
    };
    let mut body = json!({ "properties": props });
    match ns {
        "Microsoft.IoTOperations" => {
            body["extendedLocation"] = custom_location();
            if type_path == "instances" {
                body["location"] = json!("westeurope");
            }
        }
        "Microsoft.IoTOperationsMQ" => {
            body["extendedLocation"] = custom_location();
            body["location"] = json!("westeurope");
        }
        _ => {
            if type_path == "namespaces" {
                body["location"] = json!("westeurope");
            }
        }
    }
    body
}

/// Every declared type as `(namespace, type path, sample id)`.
pub fn all_sample_ids() -> Vec<(String, String, String)> {
    meridian_api::resources::all_types()
        .iter()
        .map(|t| {
            let pairs: Vec<(String, String)> = t
                .type_path
                .iter()
                .map(|seg| (seg.to_string(), sample_name(seg)))
                .collect();
            (
                t.namespace.to_string(),
                t.type_path.join("/"),
                id_of(&t.namespace, &pairs),
            )
        })
        .collect()
}

/// Deterministic names that satisfy every name rule and match the refs in [`minimal_body`].
fn sample_name(segment: &str) -> String {
    match segment {
        "broker" | "brokers" => "broker".into(),
        "listener" | "listeners" => "listener".into(),
        "mqttBridgeConnector" => "bridge".into(),
        "kafkaConnector" => "kafka".into(),
        "dataLakeConnector" => "lake".into(),
        "topicSpaces" => "ts1".into(),
        "clientGroups" => "cg1".into(),
        other => format!("{}-1", other.to_lowercase()),
    }
}

/// `actual` contains everything in `expected` (objects by key, arrays element-wise).
pub fn contains(actual: &Value, expected: &Value) -> Result<(), String> {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            for (k, ev) in e {
                let av = a.get(k).ok_or_else(|| format!("missing '{k}'"))?;
                contains(av, ev).map_err(|m| format!("{k}.{m}"))?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(e)) if a.len() == e.len() => {
            for (i, (av, ev)) in a.iter().zip(e).enumerate() {
                contains(av, ev).map_err(|m| format!("[{i}]{m}"))?;
            }
            Ok(())
        }
        (a, e) if a == e => Ok(()),
        (a, e) => Err(format!(": expected {e}, got {a}")),
    }
}
