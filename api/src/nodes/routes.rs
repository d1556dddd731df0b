//! The node routes of the control plane (see `meridian_contract::node`):
//!
//! - `PUT /meridian/nodes/{nodeId}`: a node's report ([`NodeReport`] → [`ReportAnswer`]). The
//!   caller needs **Contributor** on the broker's resource group (or subscription): a registered
//!   node receives the broker's whole configuration, credentials included, which is what a
//!   Contributor can already write, and a Reader must not obtain. Taking over a node id that
//!   serves a broker elsewhere needs Contributor there too. The bearer token is remembered and
//!   presented when pushing to the node.
//! - `GET /meridian/nodes[?brokerId=]`: **Reader**; `{"value": [NodeView]}`. With `brokerId`
//!   the caller needs Reader on that broker's scope (403 otherwise); without it the list holds the
//!   nodes of the brokers the caller may read.

use std::collections::HashMap;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    routing::{get, put},
};
use meridian_contract::{NodeReport, NodeView, ReportAnswer};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{NodeRegistry, RegistryError, check_node_id};
use crate::{
    auth::Role,
    compile::parse_broker_id,
    engine::path::Scope,
    error::ApiError,
    http::{AppState, authenticate, authorize},
};

#[derive(Clone)]
struct NodesState {
    app: AppState,
    nodes: NodeRegistry,
}

/// The node routes over `nodes`, authenticated and authorized like the rest of the API.
pub fn router(app: AppState, nodes: NodeRegistry) -> Router {
    Router::new()
        .route("/meridian/nodes", get(list))
        .route("/meridian/nodes/{node_id}", put(report))
        .with_state(NodesState { app, nodes })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

fn broker_scope(broker_id: &str) -> Result<Scope, ApiError> {
    parse_broker_id(broker_id)
        .map(|(_, _, scope)| scope)
        .ok_or_else(|| {
            ApiError::bad_request(
                "InvalidBrokerId",
                RegistryError::NotABroker(broker_id.to_owned()).to_string(),
            )
            .with_target("brokerId")
        })
}

async fn report(
    State(s): State<NodesState>,
    Path(node_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ReportAnswer>, ApiError> {
    let principal = authenticate(&s.app, &headers)?;
    let token = bearer(&headers).unwrap_or_default().to_owned();
    check_node_id(&node_id)
        .map_err(|e| ApiError::bad_request("InvalidNodeId", e.to_string()).with_target("nodeId"))?;
    let report: NodeReport = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "InvalidRequestContent",
            format!("The request content is not a node report: {e}."),
        )
    })?;
    let scope = broker_scope(&report.broker_id)?;
    let endpoint = report.endpoint.trim();
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        || reqwest::Url::parse(endpoint).is_err()
    {
        return Err(ApiError::bad_request(
            "InvalidRequestContent",
            format!("endpoint '{endpoint}' must be an http:// or https:// URL."),
        )
        .with_target("endpoint"));
    }
    let action = "Meridian/nodes/write";
    authorize(
        &s.app,
        &principal,
        Role::Contributor,
        &scope.subscription,
        scope.resource_group.as_deref(),
        action,
    )
    .await?;
    // Re-pointing a node id away from another broker's scope needs rights over that one too.
    let current = s
        .nodes
        .nodes(None)
        .into_iter()
        .find(|n| n.node_id == node_id)
        .map(|n| n.report.broker_id);
    if let Some(current) = current
        && let Ok(old) = broker_scope(&current)
        && !same_scope(&old, &scope)
    {
        authorize(
            &s.app,
            &principal,
            Role::Contributor,
            &old.subscription,
            old.resource_group.as_deref(),
            action,
        )
        .await?;
    }
    let answer = s
        .nodes
        .report(&node_id, &token, report)
        .await
        .map_err(|e| match e {
            RegistryError::NodeIsLocal(_) => {
                ApiError::new(StatusCode::CONFLICT, "NodeIdInUse", e.to_string())
                    .with_target("nodeId")
            }
            RegistryError::InvalidNodeId(_) => {
                ApiError::bad_request("InvalidNodeId", e.to_string()).with_target("nodeId")
            }
            RegistryError::NotABroker(_) => {
                ApiError::bad_request("InvalidBrokerId", e.to_string()).with_target("brokerId")
            }
        })?;
    Ok(Json(answer))
}

fn same_scope(a: &Scope, b: &Scope) -> bool {
    a.subscription.eq_ignore_ascii_case(&b.subscription)
        && match (&a.resource_group, &b.resource_group) {
            (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
            (None, None) => true,
            _ => false,
        }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    broker_id: Option<String>,
}

async fn list(
    State(s): State<NodesState>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&s.app, &headers)?;
    let action = "Meridian/nodes/read";
    let views: Vec<NodeView> = match q.broker_id.as_deref().filter(|b| !b.is_empty()) {
        Some(broker_id) => {
            let scope = broker_scope(broker_id)?;
            authorize(
                &s.app,
                &principal,
                Role::Reader,
                &scope.subscription,
                scope.resource_group.as_deref(),
                action,
            )
            .await?;
            s.nodes.nodes(Some(broker_id))
        }
        None => {
            let mut allowed: HashMap<(String, Option<String>), bool> = HashMap::new();
            let mut out = Vec::new();
            for view in s.nodes.nodes(None) {
                let Ok(scope) = broker_scope(&view.report.broker_id) else {
                    continue;
                };
                let key = (
                    scope.subscription.to_lowercase(),
                    scope.resource_group.as_deref().map(str::to_lowercase),
                );
                let ok = match allowed.get(&key) {
                    Some(ok) => *ok,
                    None => {
                        let ok = authorize(
                            &s.app,
                            &principal,
                            Role::Reader,
                            &scope.subscription,
                            scope.resource_group.as_deref(),
                            action,
                        )
                        .await
                        .is_ok();
                        allowed.insert(key, ok);
                        ok
                    }
                };
                if ok {
                    out.push(view);
                }
            }
            out
        }
    };
    Ok(Json(json!({ "value": views })))
}
