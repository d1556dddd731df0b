//! ARM template deployments: dependency order, parameters/variables/functions, reference() and
//! outputs, per-resource status; bad templates rejected with nothing written.

mod resources_support;

use axum::http::StatusCode;
use resources_support::{Fixture, RG, SUB};
use serde_json::{Value, json};

const API: &str = "2024-03-01";

fn deployment(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourcegroups/{RG}/providers/Microsoft.Resources/deployments/{name}?api-version={API}"
    )
}

fn ns_id(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.EventGrid/namespaces/{name}"
    )
}

/// A namespace with a topic space, a client group and a permission binding that needs both; the
/// resources are listed children-first so only dependency ordering makes the deployment work.
fn mqtt_template() -> Value {
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "namespaceName": {"type": "string", "defaultValue": "ns-deploy"},
            "permission": {"type": "string", "defaultValue": "Publisher", "allowedValues": ["Publisher", "Subscriber"]},
            "location": {"type": "string", "defaultValue": "westeurope"}
        },
        "variables": {
            "topicSpace": "[concat(parameters('namespaceName'), '-ts')]",
            "template": "[format('devices/{0}/#', '${client.authenticationName}')]"
        },
        "resources": [
            {
                "type": "Microsoft.EventGrid/namespaces/permissionBindings",
                "apiVersion": "2025-02-15",
                "name": "[concat(parameters('namespaceName'), '/pb1')]",
                "dependsOn": [
                    "[resourceId('Microsoft.EventGrid/namespaces/topicSpaces', parameters('namespaceName'), variables('topicSpace'))]",
                    "[resourceId('Microsoft.EventGrid/namespaces/clientGroups', parameters('namespaceName'), 'sensors')]"
                ],
                "properties": {
                    "topicSpaceName": "[variables('topicSpace')]",
                    "clientGroupName": "sensors",
                    "permission": "[parameters('permission')]",
                    "description": "[concat('host ', reference(parameters('namespaceName')).topicSpacesConfiguration.state)]"
                }
            },
            {
                "type": "Microsoft.EventGrid/namespaces/topicSpaces",
                "apiVersion": "2025-02-15",
                "name": "[format('{0}/{1}', parameters('namespaceName'), variables('topicSpace'))]",
                "dependsOn": ["[resourceId('Microsoft.EventGrid/namespaces', parameters('namespaceName'))]"],
                "properties": {"topicTemplates": ["[variables('template')]"]}
            },
            {
                "type": "Microsoft.EventGrid/namespaces/clientGroups",
                "apiVersion": "2025-02-15",
                "name": "[concat(parameters('namespaceName'), '/sensors')]",
                "properties": {"query": "attributes.type = 'sensor'"}
            },
            {
                "type": "Microsoft.EventGrid/namespaces",
                "apiVersion": "2025-02-15",
                "name": "[parameters('namespaceName')]",
                "location": "[parameters('location')]",
                "sku": {"name": "Standard", "capacity": 1},
                "properties": {"topicSpacesConfiguration": {"state": "Enabled"}}
            }
        ],
        "outputs": {
            "namespaceId": {"type": "string", "value": "[resourceId('Microsoft.EventGrid/namespaces', parameters('namespaceName'))]"},
            "state": {"type": "string", "value": "[reference(parameters('namespaceName')).topicSpacesConfiguration.state]"}
        }
    })
}

async fn wait_terminal(fx: &Fixture, name: &str) -> Value {
    for _ in 0..500 {
        let (status, d) = fx.call("GET", &deployment(name), None).await;
        assert_eq!(status, StatusCode::OK, "{d}");
        if matches!(
            d["properties"]["provisioningState"].as_str(),
            Some("Succeeded" | "Failed")
        ) {
            return d;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("deployment {name} never finished");
}

#[tokio::test]
async fn template_with_dependencies_deploys_in_order() {
    let fx = Fixture::new().await;
    let body = json!({"properties": {"mode": "Incremental", "template": mqtt_template(), "parameters": {"permission": {"value": "Subscriber"}}}});
    let (status, d) = fx.call("PUT", &deployment("mqtt"), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{d}");
    let d = wait_terminal(&fx, "mqtt").await;
    assert_eq!(d["properties"]["provisioningState"], "Succeeded", "{d}");
    assert_eq!(
        d["properties"]["outputs"]["namespaceId"]["value"],
        ns_id("ns-deploy")
    );
    assert_eq!(d["properties"]["outputs"]["state"]["value"], "Enabled");

    // Per-resource status, in deployment order: the namespace first, the binding after its deps.
    let (status, ops) = fx
        .call(
            "GET",
            &deployment("mqtt").replace("?api", "/operations?api"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ops}");
    let order: Vec<String> = ops["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            assert_eq!(o["properties"]["provisioningState"], "Succeeded", "{o}");
            o["properties"]["targetResource"]["resourceType"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let pos = |t: &str| {
        order
            .iter()
            .position(|x| x == t)
            .unwrap_or_else(|| panic!("{t} missing in {order:?}"))
    };
    assert_eq!(pos("Microsoft.EventGrid/namespaces"), 0, "{order:?}");
    assert!(
        pos("Microsoft.EventGrid/namespaces/permissionBindings")
            > pos("Microsoft.EventGrid/namespaces/topicSpaces")
    );
    assert!(
        pos("Microsoft.EventGrid/namespaces/permissionBindings")
            > pos("Microsoft.EventGrid/namespaces/clientGroups")
    );

    // The resources exist with evaluated expressions.
    let (status, pb) = fx
        .call(
            "GET",
            &format!(
                "{}/permissionBindings/pb1?api-version=2025-02-15",
                ns_id("ns-deploy")
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{pb}");
    assert_eq!(pb["properties"]["permission"], "Subscriber");
    assert_eq!(pb["properties"]["topicSpaceName"], "ns-deploy-ts");
    assert_eq!(pb["properties"]["description"], "host Enabled");
    let (_, ts) = fx
        .call(
            "GET",
            &format!(
                "{}/topicSpaces/ns-deploy-ts?api-version=2025-02-15",
                ns_id("ns-deploy")
            ),
            None,
        )
        .await;
    assert_eq!(
        ts["properties"]["topicTemplates"],
        json!(["devices/${client.authenticationName}/#"])
    );
    assert_eq!(pb["systemData"]["createdBy"], "alice", "{pb}");
}

/// PUTs `template` and expects 400 whose target and message name the problem; nothing is written.
async fn refused(fx: &Fixture, template: Value, parameters: Value, target: &str, needle: &str) {
    let body = json!({"properties": {"mode": "Incremental", "template": template, "parameters": parameters}});
    let (status, err) = fx.call("PUT", &deployment("bad"), Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["target"], target, "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains(needle),
        "{needle} not in {err}"
    );
    let (status, _) = fx
        .call(
            "GET",
            &format!("{}?api-version=2025-02-15", ns_id("ns-deploy")),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a rejected template wrote something"
    );
    let (status, _) = fx.call("GET", &deployment("bad"), None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a rejected deployment was recorded"
    );
}

#[tokio::test]
async fn bad_templates_are_rejected_before_anything_is_written() {
    let fx = Fixture::new().await;

    let mut t = mqtt_template();
    t["resources"][2]["type"] = json!("Microsoft.EventGrid/namespaces/widgets");
    refused(
        &fx,
        t,
        json!({}),
        "properties.template.resources[2].type",
        "Microsoft.EventGrid/namespaces/widgets",
    )
    .await;

    let mut t = mqtt_template();
    t["resources"][2]["properties"]["query"] = json!("[frobnicate('x')]");
    refused(
        &fx,
        t,
        json!({}),
        "properties.template.resources[2]",
        "frobnicate",
    )
    .await;

    let mut t = mqtt_template();
    t["resources"][3]["dependsOn"] = json!([
        "[resourceId('Microsoft.EventGrid/namespaces/permissionBindings', parameters('namespaceName'), 'pb1')]"
    ]);
    refused(
        &fx,
        t,
        json!({}),
        "properties.template.resources[0].dependsOn",
        "circular dependency",
    )
    .await;

    refused(
        &fx,
        mqtt_template(),
        json!({"permission": {"value": "Owner"}}),
        "properties.parameters.permission",
        "allowed values",
    )
    .await;

    let mut t = mqtt_template();
    t["parameters"]["namespaceName"]
        .as_object_mut()
        .unwrap()
        .remove("defaultValue");
    refused(
        &fx,
        t,
        json!({}),
        "properties.parameters.namespaceName",
        "namespaceName",
    )
    .await;

    let mut t = mqtt_template();
    t["variables"]["topicSpace"] = json!("[concat(parameters('nope'), '-ts')]");
    refused(
        &fx,
        t,
        json!({}),
        "properties.template.variables.topicSpace",
        "nope",
    )
    .await;

    let mut t = mqtt_template();
    t["resources"][1]["properties"]["topicTemplates"] = json!("not-an-array");
    refused(
        &fx,
        t,
        json!({}),
        "properties.template.resources[1].properties.topicTemplates",
        "",
    )
    .await;

    let mut t = mqtt_template();
    t["resources"][0]["dependsOn"][0] = json!("missing-thing");
    refused(
        &fx,
        t,
        json!({}),
        "properties.template.resources[0].dependsOn[0]",
        "missing-thing",
    )
    .await;

    let mut t = mqtt_template();
    t["variables"]["template"] = json!("[concat('a', ]");
    refused(
        &fx,
        t,
        json!({}),
        "properties.template.variables.template",
        "invalid expression",
    )
    .await;
}
