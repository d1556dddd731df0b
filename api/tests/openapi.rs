//! The committed OpenAPI document must match what the code generates.
//! Regenerate with `UPDATE_OPENAPI=1 cargo test -p meridian-api --test openapi`.

#[test]
fn committed_openapi_json_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    let generated = meridian_api::openapi::current_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.json is stale; regenerate with UPDATE_OPENAPI=1 cargo test -p meridian-api --test openapi"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(
        doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .any(|p| p.contains("Microsoft.Authorization/roleAssignments")),
        "built-in types are documented"
    );
}

/// The node schemas are written by hand (the contract crate has no utoipa); every field the
/// contract types serialize must be documented, and every documented required field present.
#[test]
fn node_schemas_match_the_contract_types() {
    use meridian_contract::{NodeError, NodeHealth, NodeReport, NodeView, ReportAnswer};
    let doc: serde_json::Value =
        serde_json::from_str(&meridian_api::openapi::current_json()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let report = NodeReport {
        broker_id: "b".into(),
        endpoint: "http://n".into(),
        applied_generation: 1,
        applied_digest: "d".into(),
        health: NodeHealth::Degraded,
        connected_clients: 2,
        errors: vec![NodeError {
            generation: 1,
            resource_id: Some("r".into()),
            message: "m".into(),
        }],
    };
    let view = NodeView {
        node_id: "n".into(),
        state: "Unhealthy".into(),
        last_seen: "2026-01-01T00:00:00Z".into(),
        report: report.clone(),
    };
    let answer = ReportAnswer {
        desired_generation: 1,
        report_interval_seconds: 5,
    };
    let samples = [
        ("NodeReport", serde_json::to_value(&report).unwrap()),
        (
            "NodeError",
            serde_json::to_value(&report.errors[0]).unwrap(),
        ),
        ("NodeView", serde_json::to_value(&view).unwrap()),
        ("ReportAnswer", serde_json::to_value(&answer).unwrap()),
    ];
    for (name, sample) in samples {
        let schema = &schemas[name];
        let props = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}"));
        for key in sample.as_object().unwrap().keys() {
            assert!(props.contains_key(key), "{name}.{key} is not documented");
        }
        for req in schema["required"].as_array().unwrap() {
            assert!(
                sample.get(req.as_str().unwrap()).is_some(),
                "{name}.{req} is required but not serialized"
            );
        }
    }
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths["/meridian/nodes"]["get"].is_object());
    assert!(paths["/meridian/nodes/{nodeId}"]["put"].is_object());
}
