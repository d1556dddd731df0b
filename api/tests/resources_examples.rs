//! Every declared type accepts a minimal valid body and round-trips it (create → GET → list →
//! delete), and the specs' own x-ms-examples request bodies are accepted and returned.

mod resources_support;

use axum::http::StatusCode;
use resources_support::{Fixture, all_sample_ids, contains, id_of, minimal_body, version_of};
use serde_json::Value;

#[tokio::test]
async fn every_type_round_trips_its_minimal_body() {
    let fx = Fixture::new().await;
    let ids = all_sample_ids();
    assert_eq!(ids.len(), 8 + 12 + 6, "all three contracts are declared");
    for (ns, path, id) in &ids {
        fx.ensure(id).await;
        let v = version_of(ns);
        let body = minimal_body(ns, path);
        // Replace with the same body: 200 and unchanged properties.
        let (status, put) = fx
            .call("PUT", &format!("{id}?api-version={v}"), Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {put}");
        let (status, got) = fx.call("GET", &format!("{id}?api-version={v}"), None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {got}");
        contains(&got["properties"], &body["properties"])
            .unwrap_or_else(|e| panic!("{path}: {e}\n{got}"));
        assert_eq!(
            got["properties"]["provisioningState"], "Succeeded",
            "{path}: {got}"
        );
        assert_eq!(
            got["type"].as_str().unwrap().to_lowercase(),
            format!("{ns}/{path}").to_lowercase()
        );
        // Listed by its parent (or resource group for top-level types).
        let collection = id.rsplit_once('/').unwrap().0;
        let (status, list) = fx
            .call("GET", &format!("{collection}?api-version={v}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "list {path}: {list}");
        assert!(
            list["value"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"].as_str().unwrap().eq_ignore_ascii_case(id)),
            "{path} not listed: {list}"
        );
    }
    // Deleting the roots cascades to every child.
    for root in [
        "Microsoft.IoTOperations/instances/instances-1",
        "Microsoft.IoTOperationsMQ/mq/mq-1",
        "Microsoft.EventGrid/namespaces/namespaces-1",
    ] {
        let (ns, rest) = root.split_once('/').unwrap();
        let (t, n) = rest.split_once('/').unwrap();
        let id = id_of(ns, &[(t.into(), n.into())]);
        let (status, _) = fx
            .call(
                "DELETE",
                &format!("{id}?api-version={}", version_of(ns)),
                None,
            )
            .await;
        assert!(
            status == StatusCode::ACCEPTED || status == StatusCode::OK,
            "{root}: {status}"
        );
    }
    for (ns, path, id) in &ids {
        let mut gone = false;
        for _ in 0..100 {
            let (status, _) = fx
                .call("GET", &format!("{id}?api-version={}", version_of(ns)), None)
                .await;
            if status == StatusCode::NOT_FOUND {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(gone, "{path} survived its root's deletion");
    }
}

/// Maps an example's name parameter to its type segment in `ns`.
fn segment(ns: &str, param: &str) -> Option<&'static str> {
    let mq = ns == "Microsoft.IoTOperationsMQ";
    Some(match param {
        "instanceName" => "instances",
        "brokerName" if mq => "broker",
        "brokerName" => "brokers",
        "listenerName" if mq => "listener",
        "listenerName" => "listeners",
        "authenticationName" if mq => "authentication",
        "authenticationName" => "authentications",
        "authorizationName" if mq => "authorization",
        "authorizationName" => "authorizations",
        "dataflowEndpointName" => "dataflowEndpoints",
        "dataflowProfileName" => "dataflowProfiles",
        "dataflowName" => "dataflows",
        "mqName" => "mq",
        "mqttBridgeConnectorName" => "mqttBridgeConnector",
        "namespaceName" => "namespaces",
        "caCertificateName" => "caCertificates",
        "clientGroupName" => "clientGroups",
        "clientName" => "clients",
        "permissionBindingName" => "permissionBindings",
        "topicSpaceName" => "topicSpaces",
        _ => return None,
    })
}

/// Generated examples whose values break their own spec (enum values the spec does not list);
/// strict validation rejects them at the given path.
const EXAMPLE_ERRATA: &[(&str, &str)] = &[(
    "DataflowEndpoint_CreateOrUpdate_MaximumSet_Gen.json",
    "properties.kafkaSettings.cloudEventAttributes",
)];

/// Depth of a type segment in its provider's hierarchy.
fn depth(segment: &str) -> usize {
    match segment {
        "instances" | "mq" | "namespaces" => 0,
        "listeners" | "authentications" | "authorizations" | "dataflows" | "listener"
        | "authentication" | "authorization" | "topicMap" => 2,
        _ => 1,
    }
}

/// Read-only fields examples show but clients never set (the service fills them).
const READ_ONLY: &[&str] = &[
    "provisioningState",
    "issueTimeInUtc",
    "expiryTimeInUtc",
    "version",
    "status",
    "healthState",
];

fn strip_read_only(v: &mut Value) {
    if let Value::Object(m) = v {
        for k in READ_ONLY {
            m.remove(*k);
        }
    }
}

#[tokio::test]
async fn spec_examples_are_accepted_and_round_tripped() {
    // Verbatim copies of the specs' CreateOrUpdate x-ms-examples (azure-rest-api-specs, MIT).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/resources_fixtures/azure-examples");
    let fx = Fixture::new().await;
    let mut checked = 0;
    for ns in [
        "Microsoft.IoTOperations",
        "Microsoft.IoTOperationsMQ",
        "Microsoft.EventGrid",
    ] {
        let mut files = Vec::new();
        for f in std::fs::read_dir(root.join(ns)).unwrap() {
            files.push(f.unwrap().path());
        }
        files.sort();
        for file in files
            .iter()
            .filter(|f| f.to_string_lossy().contains("_CreateOrUpdate"))
        {
            let example: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
            let params = example["parameters"].as_object().unwrap();
            let mut pairs = Vec::new();
            let mut body = None;
            for (k, v) in params {
                if let Some(seg) = segment(ns, k) {
                    pairs.push((seg.to_owned(), v.as_str().unwrap().to_owned()));
                } else if v.is_object() {
                    body = Some(v.clone());
                }
            }
            // JSON maps are sorted by key here, not in path order: order the pairs by depth.
            pairs.sort_by_key(|(seg, _)| depth(seg));
            let mut body = body.unwrap_or_else(|| panic!("{} has no body", file.display()));
            strip_read_only(&mut body["properties"]);
            let id = id_of(ns, &pairs);
            fx.ensure(&id_of(ns, &pairs[..pairs.len() - 1])).await;
            let v = version_of(ns);
            let (status, put) = fx
                .call("PUT", &format!("{id}?api-version={v}"), Some(body.clone()))
                .await;
            let fname = file.file_name().unwrap().to_string_lossy().into_owned();
            if let Some((_, target)) = EXAMPLE_ERRATA.iter().find(|(f, _)| *f == fname) {
                // The example disagrees with its own spec; strict validation must say where.
                assert_eq!(status, StatusCode::BAD_REQUEST, "{fname}: {put}");
                assert_eq!(put["error"]["target"], *target, "{fname}: {put}");
                continue;
            }
            assert!(status.is_success(), "{}: {status} {put}", file.display());
            let (_, got) = fx.call("GET", &format!("{id}?api-version={v}"), None).await;
            contains(&got["properties"], &body["properties"])
                .unwrap_or_else(|e| panic!("{}: {e}\n{got}", file.display()));
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} examples found");
}
