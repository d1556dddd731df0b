//! The spec's rules on input: enums, required fields, ranges, patterns, name rules, locations and
//! api-versions, each answered 400 with the offending JSON path as `target` and nothing stored.

mod resources_support;

use axum::http::StatusCode;
use resources_support::{Fixture, RG, SUB, minimal_body};
use serde_json::{Value, json};

const IOT: &str = "Microsoft.IoTOperations";
const V: &str = "2026-07-01";

fn instance() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/{IOT}/instances/inst-1")
}

async fn setup() -> Fixture {
    let fx = Fixture::new().await;
    fx.ensure(&format!("{}/brokers/broker", instance())).await;
    fx
}

/// PUT `body` at `id`; expect 400 with `code` and `target`, and that nothing was stored.
async fn rejected(fx: &Fixture, id: &str, version: &str, body: Value, code: &str, target: &str) {
    let (status, err) = fx
        .call("PUT", &format!("{id}?api-version={version}"), Some(body))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{id}: {err}");
    assert_eq!(err["error"]["code"], code, "{err}");
    assert_eq!(err["error"]["target"], target, "{err}");
    let (status, _) = fx
        .call("GET", &format!("{id}?api-version={version}"), None)
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "{id} was stored despite the 400"
    );
}

fn listener_body(ports: Value) -> Value {
    let mut b = minimal_body(IOT, "instances/brokers/listeners");
    b["properties"]["ports"] = ports;
    b
}

#[tokio::test]
async fn wrong_enum_value_names_its_path() {
    let fx = setup().await;
    let id = format!("{}/brokers/broker/listeners/lis1", instance());
    rejected(
        &fx,
        &id,
        V,
        listener_body(json!([{"port": 1883, "protocol": "Gopher"}])),
        "InvalidRequestContent",
        "properties.ports[0].protocol",
    )
    .await;
}

#[tokio::test]
async fn missing_required_field_names_its_path() {
    let fx = setup().await;
    let id = format!("{}/brokers/broker/listeners/lis1", instance());
    let mut body = minimal_body(IOT, "instances/brokers/listeners");
    body["properties"].as_object_mut().unwrap().remove("ports");
    rejected(
        &fx,
        &id,
        V,
        body,
        "InvalidRequestContent",
        "properties.ports",
    )
    .await;
    // A required field inside an array element.
    rejected(
        &fx,
        &id,
        V,
        listener_body(json!([{"protocol": "Mqtt"}])),
        "InvalidRequestContent",
        "properties.ports[0].port",
    )
    .await;
}

#[tokio::test]
async fn out_of_range_number_and_broken_pattern_are_rejected() {
    let fx = setup().await;
    let id = format!("{}/brokers/broker/listeners/lis1", instance());
    rejected(
        &fx,
        &id,
        V,
        listener_body(json!([{"port": 70000}])),
        "InvalidRequestContent",
        "properties.ports[0].port",
    )
    .await;
    let broker = format!("{}/brokers/brk2", instance());
    let mut body = minimal_body(IOT, "instances/brokers");
    body["properties"]["diskBackedMessageBuffer"] = json!({"maxSize": "10 gigabytes"});
    rejected(
        &fx,
        &broker,
        V,
        body,
        "InvalidRequestContent",
        "properties.diskBackedMessageBuffer.maxSize",
    )
    .await;
}

#[tokio::test]
async fn names_breaking_the_spec_pattern_are_rejected() {
    let fx = setup().await;
    let body = minimal_body(IOT, "instances/brokers");
    for bad in ["Upper-Case", "ab", "-leading", "under_score"] {
        let id = format!("{}/brokers/{bad}", instance());
        let (status, err) = fx
            .call("PUT", &format!("{id}?api-version={V}"), Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err}");
        assert_eq!(err["error"]["code"], "InvalidResourceName", "{bad}: {err}");
    }
    // Event Grid client names allow ':' '.' '_' but not '/'-free spaces; MQ names stop at 24.
    let ns = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.EventGrid/namespaces/ns1"
    );
    fx.ensure(&ns).await;
    let client = minimal_body("Microsoft.EventGrid", "namespaces/clients");
    fx.put_ok(
        &format!("{ns}/clients/dev:1.a_b"),
        "2025-02-15",
        client.clone(),
    )
    .await;
    let (status, _) = fx
        .call(
            "PUT",
            &format!("{ns}/clients/dev%20one?api-version=2025-02-15"),
            Some(client),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let mq = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.IoTOperationsMQ/mq/{}",
        "m".repeat(25)
    );
    let (status, err) = fx
        .call(
            "PUT",
            &format!("{mq}?api-version=2023-10-04-preview"),
            Some(minimal_body("Microsoft.IoTOperationsMQ", "mq")),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}

#[tokio::test]
async fn extended_location_and_location_are_required_where_the_spec_says() {
    let fx = setup().await;
    let mut body = minimal_body(IOT, "instances/brokers");
    body.as_object_mut().unwrap().remove("extendedLocation");
    let (status, err) = fx
        .call(
            "PUT",
            &format!("{}/brokers/brk3?api-version={V}", instance()),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["target"], "extendedLocation", "{err}");
    let mut ns = minimal_body("Microsoft.EventGrid", "namespaces");
    ns.as_object_mut().unwrap().remove("location");
    let id = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.EventGrid/namespaces/nsx"
    );
    let (status, err) = fx
        .call("PUT", &format!("{id}?api-version=2025-02-15"), Some(ns))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["target"], "location", "{err}");
}

#[tokio::test]
async fn every_listed_api_version_is_served_and_others_are_refused() {
    let fx = setup().await;
    let id = instance();
    for v in [
        "2024-11-01",
        "2025-04-01",
        "2025-07-01-preview",
        "2025-10-01",
        "2026-03-01",
        "2026-07-01",
    ] {
        let (status, got) = fx.call("GET", &format!("{id}?api-version={v}"), None).await;
        assert_eq!(status, StatusCode::OK, "{v}: {got}");
    }
    let (status, err) = fx
        .call("GET", &format!("{id}?api-version=2023-01-01"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["code"], "InvalidApiVersionParameter", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2026-07-01"),
        "{err}"
    );
}

#[tokio::test]
async fn read_only_fields_are_ignored_and_defaults_filled() {
    let fx = setup().await;
    let id = format!("{}/brokers/brk4", instance());
    let mut body = minimal_body(IOT, "instances/brokers");
    body["properties"]["provisioningState"] = json!("Failed");
    let got = fx.put_ok(&id, V, body).await;
    assert_ne!(got["properties"]["provisioningState"], "Failed", "{got}");
    let (_, got) = fx.call("GET", &format!("{id}?api-version={V}"), None).await;
    assert_eq!(got["properties"]["provisioningState"], "Succeeded", "{got}");
    // The spec's defaults: memoryProfile Medium.
    assert_eq!(got["properties"]["memoryProfile"], "Medium", "{got}");
    // A 2026-07-01-only optional field round-trips.
    let mut body = minimal_body(IOT, "instances/brokers");
    body["properties"]["persistence"] = json!({"maxSize": "1G"});
    let id = format!("{}/brokers/brk5", instance());
    fx.put_ok(&id, V, body).await;
    let (_, got) = fx.call("GET", &format!("{id}?api-version={V}"), None).await;
    assert_eq!(got["properties"]["persistence"]["maxSize"], "1G", "{got}");
}

/// Custom JWT authentication of a namespace (a field of later Event Grid api-versions): an
/// issuer and inline certificates are needed; Key Vault URLs cannot be resolved here and are
/// refused naming the field; a complete one is stored and returned as sent.
#[tokio::test]
async fn namespace_custom_jwt_authentication_is_checked_and_round_trips() {
    let fx = setup().await;
    let id = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.EventGrid/namespaces/jwtns"
    );
    const AT: &str =
        "properties.topicSpacesConfiguration.clientAuthentication.customJwtAuthentication";
    let body = |jwt: Value| {
        let mut ns = minimal_body("Microsoft.EventGrid", "namespaces");
        ns["properties"]["topicSpacesConfiguration"] = json!({
            "state": "Enabled",
            "clientAuthentication": {"customJwtAuthentication": jwt}
        });
        ns
    };
    let cert = json!({"kid": "k1", "encodedCertificate": "MIIBszCCAVmgAwIBAgIU"});
    for (jwt, target) in [
        (
            json!({"encodedIssuerCertificates": [cert]}),
            format!("{AT}.tokenIssuer"),
        ),
        (
            json!({"tokenIssuer": "https://idp", "issuerCertificates": [
                {"certificateUrl": "https://kv.vault.azure.net/certificates/c/1",
                 "identity": {"type": "SystemAssigned"}}]}),
            format!("{AT}.issuerCertificates"),
        ),
        (
            json!({"tokenIssuer": "https://idp"}),
            format!("{AT}.encodedIssuerCertificates"),
        ),
        (
            json!({"tokenIssuer": "https://idp", "encodedIssuerCertificates": [cert, cert, cert]}),
            format!("{AT}.encodedIssuerCertificates"),
        ),
    ] {
        rejected(
            &fx,
            &id,
            "2025-02-15",
            body(jwt),
            "InvalidRequestContent",
            &target,
        )
        .await;
    }
    let jwt = json!({"tokenIssuer": "https://idp", "encodedIssuerCertificates": [cert]});
    let (status, got) = fx
        .call(
            "PUT",
            &format!("{id}?api-version=2025-02-15"),
            Some(body(jwt.clone())),
        )
        .await;
    assert!(status.is_success(), "{status}: {got}");
    let (_, got) = fx
        .call("GET", &format!("{id}?api-version=2025-02-15"), None)
        .await;
    assert_eq!(
        got["properties"]["topicSpacesConfiguration"]["clientAuthentication"]["customJwtAuthentication"],
        jwt,
        "{got}"
    );
}
