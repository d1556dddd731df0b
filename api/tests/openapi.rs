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
