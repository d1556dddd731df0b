//! `POST /meridian/authz/explain` on the real server (HTTPS, tokens): IoT Operations rules with
//! variables, deny by default with the reason, subscribe filters wider than allowed, an Event
//! Grid binding, bad input in the ARM error shape, RBAC.

use meridian_api::{ApiArgs, auth::Role, cli::start};
use serde_json::{Value, json};

const RG: &str = "/subscriptions/s1/resourceGroups/rg/providers";

struct World {
    api: meridian_api::cli::RunningApi,
    http: reqwest::Client,
    owner: String,
    _dir: tempfile::TempDir,
}

fn broker() -> String {
    format!("{RG}/Microsoft.IoTOperations/instances/inst1/brokers/default")
}

impl World {
    async fn new() -> World {
        meridian_api::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut args = ApiArgs::for_data_dir(dir.path().to_path_buf());
        args.tls_self_signed = true;
        let api = start(args).await.unwrap();
        let ca = std::fs::read(api.ca_path.as_ref().unwrap()).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .build()
            .unwrap();
        let owner = api.token(Role::Owner, "/subscriptions/s1").unwrap();
        World {
            api,
            http,
            owner,
            _dir: dir,
        }
    }

    async fn put(&self, id: &str, body: Value) {
        let version = if id.contains("Microsoft.EventGrid") {
            "2025-02-15"
        } else {
            "2024-11-01"
        };
        let r = self
            .http
            .put(format!("{}{id}?api-version={version}", self.api.base_url))
            .bearer_auth(&self.owner)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "PUT {id}: {}",
            r.text().await.unwrap()
        );
    }

    async fn explain_as(&self, token: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/meridian/authz/explain", self.api.base_url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn explain(&self, body: Value) -> Value {
        let (status, v) = self.explain_as(&self.owner, body).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn setup(&self) {
        let cl = json!({"name": format!("{RG}/Microsoft.ExtendedLocation/customLocations/edge"), "type": "CustomLocation"});
        self.put(
            &format!("{RG}/Microsoft.IoTOperations/instances/inst1"),
            json!({"location": "westeurope", "extendedLocation": cl, "properties": {
                "schemaRegistryRef": {"resourceId": format!("{RG}/Microsoft.DeviceRegistry/schemaRegistries/sr")}}}),
        )
        .await;
        self.put(&broker(), json!({"extendedLocation": cl, "properties": {}}))
            .await;
        self.put(
            &format!("{}/authorizations/authz", broker()),
            json!({"extendedLocation": cl, "properties": {"authorizationPolicies": {"cache": "Enabled", "rules": [
                {"principals": {"usernames": ["ops"]},
                 "brokerResources": [{"method": "Connect"}, {"method": "Subscribe", "topics": ["alerts/#"]}]},
                {"principals": {"attributes": [{"floor": "3"}]},
                 "brokerResources": [{"method": "Connect"},
                     {"method": "Publish", "topics": ["sensors/{principal.clientId}/#"]},
                     {"method": "Subscribe", "topics": ["sensors/+/status"]}]}
            ]}}}),
        )
        .await;
        let ns = format!("{RG}/Microsoft.EventGrid/namespaces/fleet");
        self.put(
            &ns,
            json!({"location": "westeurope", "tags": {"Meridian.Broker": broker()}, "properties": {"topicSpacesConfiguration": {"state": "Enabled"}}}),
        )
        .await;
        self.put(
            &format!("{ns}/clients/dev1"),
            json!({"properties": {"authenticationName": "dev1", "state": "Enabled", "attributes": {"type": "sensor"}}}),
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
    }
}

#[tokio::test]
async fn explain_names_the_deciding_rule_or_binding_and_why_others_do_not_apply() {
    let w = World::new().await;
    w.setup().await;
    let b = broker();

    // Allowed by the floor-3 rule through {principal.clientId}.
    let v = w
        .explain(
            json!({"brokerId": b, "clientId": "pump-7", "attributes": {"floor": "3"},
                        "action": "Publish", "topic": "sensors/pump-7/temp"}),
        )
        .await;
    assert_eq!(v["allowed"], true, "{v}");
    let by = v["explanation"]["decision"]["by"].to_string();
    assert!(
        by.contains("authz"),
        "the deciding rule names its authorization: {by}"
    );
    assert!(
        v["explanation"]["considered"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{v}"
    );

    // Another client's topic: denied by default, with the reason.
    let v = w
        .explain(
            json!({"brokerId": b, "clientId": "pump-7", "attributes": {"floor": "3"},
                        "action": "Publish", "topic": "sensors/pump-8/temp"}),
        )
        .await;
    assert_eq!(v["allowed"], false);
    assert!(v["explanation"]["decision"]["by"].is_null());
    assert!(
        v["explanation"]["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains("no rule"),
        "{v}"
    );

    // A filter wider than the grant: sensors/# is not within sensors/+/status.
    let wide = w
        .explain(
            json!({"brokerId": b, "clientId": "c", "attributes": {"floor": "3"},
                        "action": "Subscribe", "topic": "sensors/#"}),
        )
        .await;
    assert_eq!(wide["allowed"], false, "{wide}");
    let exact = w
        .explain(
            json!({"brokerId": b, "clientId": "c", "attributes": {"floor": "3"},
                        "action": "Subscribe", "topic": "sensors/+/status"}),
        )
        .await;
    assert_eq!(exact["allowed"], true, "{exact}");

    // Principals: a username rule; a client the rules do not name cannot connect.
    let ops = w
        .explain(json!({"brokerId": b, "clientId": "x", "username": "ops", "action": "Subscribe", "topic": "alerts/line-1"}))
        .await;
    assert_eq!(ops["allowed"], true);
    let stranger = w
        .explain(json!({"brokerId": b, "clientId": "x", "action": "Connect"}))
        .await;
    assert_eq!(stranger["allowed"], false);

    // Event Grid: the namespace's binding decides, by the client's registry attributes.
    let eg = w
        .explain(json!({"brokerId": b, "clientId": "dev1", "namespace": "fleet", "authenticationName": "dev1",
                        "action": "Publish", "topic": "devices/dev1/telemetry"}))
        .await;
    assert_eq!(eg["allowed"], true, "{eg}");
    assert!(
        eg["explanation"]["decision"]["by"]
            .to_string()
            .contains("pub"),
        "{eg}"
    );
    let eg_other = w
        .explain(
            json!({"brokerId": b, "clientId": "dev1", "namespace": "fleet",
                        "action": "Publish", "topic": "devices/dev2/telemetry"}),
        )
        .await;
    assert_eq!(eg_other["allowed"], false);
    w.api.shutdown().await;
}

#[tokio::test]
async fn explain_refuses_bad_input_with_arm_errors_and_needs_reader() {
    let w = World::new().await;
    w.setup().await;
    let b = broker();
    for (body, code, target) in [
        (
            json!({"brokerId": b, "clientId": "c", "action": "Delete", "topic": "t"}),
            "InvalidRequestContent",
            "action",
        ),
        (
            json!({"brokerId": b, "clientId": "c", "action": "Publish"}),
            "InvalidRequestContent",
            "topic",
        ),
        (
            json!({"brokerId": b, "clientId": "", "action": "Connect"}),
            "InvalidRequestContent",
            "clientId",
        ),
        (
            json!({"brokerId": "/subscriptions/s1/nope", "clientId": "c", "action": "Connect"}),
            "InvalidBrokerId",
            "brokerId",
        ),
        (
            json!({"brokerId": b, "clientId": "c", "action": "Connect", "colour": "red"}),
            "InvalidRequestContent",
            "colour",
        ),
        (
            json!({"brokerId": b, "clientId": "c", "namespace": "other", "action": "Connect"}),
            "InvalidRequestContent",
            "namespace",
        ),
    ] {
        let (status, v) = w.explain_as(&w.owner, body.clone()).await;
        assert_eq!(status, 400, "{body} → {v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["target"], target, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let missing = format!("{RG}/Microsoft.IoTOperations/instances/inst1/brokers/absent");
    let (status, v) = w
        .explain_as(
            &w.owner,
            json!({"brokerId": missing, "clientId": "c", "action": "Connect"}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("ResourceNotFound")),
        "{v}"
    );

    // RBAC: a Reader of the resource group may ask; a Reader of another subscription may not.
    let reader = w
        .api
        .token(Role::Reader, "/subscriptions/s1/resourceGroups/rg")
        .unwrap();
    let (status, _) = w
        .explain_as(
            &reader,
            json!({"brokerId": b, "clientId": "c", "action": "Connect"}),
        )
        .await;
    assert_eq!(status, 200);
    let outsider = w.api.token(Role::Owner, "/subscriptions/s2").unwrap();
    let (status, v) = w
        .explain_as(
            &outsider,
            json!({"brokerId": b, "clientId": "c", "action": "Connect"}),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    let (status, _) = w
        .explain_as(
            "not-a-token",
            json!({"brokerId": b, "clientId": "c", "action": "Connect"}),
        )
        .await;
    assert_eq!(status, 401);
    w.api.shutdown().await;
}
