//! ARM template deployments: `Microsoft.Resources/deployments` at resource-group scope.
//!
//! `PUT …/resourcegroups/{rg}/providers/Microsoft.Resources/deployments/{name}` takes
//! `{"properties": {"mode": "Incremental", "template": {…}, "parameters": {…}}}`. The template is
//! validated completely first ([`template::Plan::new`]): a bad template answers 400 naming the
//! problem and nothing is written. Then the resources are created in dependency order through the
//! engine's Rust API ([`Engine::put`]), so every rule of the engine (validation, parents, LRO,
//! `systemData` from the caller) applies exactly as for a direct PUT; each resource's operation is
//! followed to its end ([`Engine::wait_operation`]) before dependents start. The caller needs
//! Contributor on the resource group to deploy and Reader to read deployments. Per-resource status is served at
//! `GET …/deployments/{name}/operations`; the deployment itself is an LRO with an
//! `Azure-AsyncOperation` monitor.
//!
//! Deployment records live in memory (they are a log of what was applied; the resources themselves
//! are in the engine's store).

pub mod cli;
pub mod expr;
pub mod template;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    auth::{Principal, Role, RoleGrant},
    engine::{AUTHORIZATION_NAMESPACE, Engine, Preconditions, RequestContext},
    error::ApiError,
    http::AppState,
    store::ListScope,
};
use expr::{ExprError, Scope};
use template::{Plan, TemplateError};

/// The `Microsoft.Resources` api-versions accepted for deployments.
pub const API_VERSIONS: &[&str] = &[
    "2019-10-01",
    "2020-06-01",
    "2020-10-01",
    "2021-01-01",
    "2021-04-01",
    "2022-09-01",
    "2023-07-01",
    "2024-03-01",
    "2024-07-01",
    "2024-11-01",
    "2025-03-01",
    "2025-04-01",
];

/// How long one resource's LRO may run before the deployment gives up on it.
const RESOURCE_TIMEOUT: Duration = Duration::from_secs(120);

/// Shared state of the deployments routes: the API's state plus the deployment records.
#[derive(Clone)]
pub struct DeploymentsState {
    app: AppState,
    records: Arc<Mutex<HashMap<String, Deployment>>>,
}

impl DeploymentsState {
    /// Deployments over the API's engine and authenticator.
    pub fn new(app: AppState) -> Self {
        Self {
            app,
            records: Arc::default(),
        }
    }

    fn engine(&self) -> &Engine {
        &self.app.engine
    }
}

/// One deployment as recorded.
#[derive(Debug, Clone)]
struct Deployment {
    id: String,
    name: String,
    state: &'static str,
    mode: String,
    timestamp: String,
    correlation_id: String,
    run_id: String,
    parameters: Map<String, Value>,
    outputs: Option<Value>,
    output_resources: Vec<String>,
    error: Option<Value>,
    operations: Vec<Operation>,
}

/// Per-resource status of a deployment.
#[derive(Debug, Clone)]
struct Operation {
    operation_id: String,
    resource_id: String,
    resource_type: String,
    resource_name: String,
    state: &'static str,
    status_code: Option<u16>,
    status_message: Option<Value>,
    timestamp: String,
}

impl Deployment {
    fn to_json(&self) -> Value {
        let mut props = json!({
            "provisioningState": self.state,
            "mode": self.mode,
            "timestamp": self.timestamp,
            "correlationId": self.correlation_id,
            "parameters": self.parameters,
            "outputResources": self.output_resources.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(),
            "dependencies": [],
        });
        if let Some(outputs) = &self.outputs {
            props["outputs"] = outputs.clone();
        }
        if let Some(error) = &self.error {
            props["error"] = error.clone();
        }
        json!({
            "id": self.id,
            "name": self.name,
            "type": "Microsoft.Resources/deployments",
            "properties": props,
        })
    }

    fn operations_json(&self) -> Value {
        let value: Vec<Value> = self
            .operations
            .iter()
            .map(|op| {
                let mut props = json!({
                    "provisioningOperation": "Create",
                    "provisioningState": op.state,
                    "timestamp": op.timestamp,
                    "targetResource": {
                        "id": op.resource_id,
                        "resourceType": op.resource_type,
                        "resourceName": op.resource_name,
                    },
                });
                if let Some(code) = op.status_code {
                    props["statusCode"] = json!(status_name(code));
                }
                if let Some(msg) = &op.status_message {
                    props["statusMessage"] = msg.clone();
                }
                json!({
                    "id": format!("{}/operations/{}", self.id, op.operation_id),
                    "operationId": op.operation_id,
                    "properties": props,
                })
            })
            .collect();
        json!({ "value": value })
    }
}

fn status_name(code: u16) -> String {
    StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| r.replace(' ', ""))
        .unwrap_or_else(|| code.to_string())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn key(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "{}/{}/{}",
        sub.to_ascii_lowercase(),
        rg.to_ascii_lowercase(),
        name.to_ascii_lowercase()
    )
}

fn arm_error(status: StatusCode, code: &str, message: &str, target: Option<&str>) -> ApiError {
    let e = ApiError::new(status, code, message);
    match target {
        Some(t) => e.with_target(t),
        None => e,
    }
}

fn template_error(e: &TemplateError) -> ApiError {
    arm_error(StatusCode::BAD_REQUEST, e.code, &e.message, Some(&e.target))
}

#[derive(Debug, Deserialize)]
struct ApiVersion {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

fn check_api_version(q: &ApiVersion) -> Result<(), ApiError> {
    match q.api_version.as_deref() {
        None => Err(arm_error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
            None,
        )),
        Some(v) if API_VERSIONS.contains(&v) => Ok(()),
        Some(v) => Err(arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidApiVersionParameter",
            &format!(
                "The api-version '{v}' is invalid. The supported versions are '{}'.",
                API_VERSIONS.join(",")
            ),
            None,
        )),
    }
}

/// Routes of `Microsoft.Resources/deployments`, to merge next to the resource routes:
/// `http::app(state.clone()).merge(deployments_router(state))` (these fixed routes take precedence
/// over the app's ARM fallback).
pub fn deployments_router(app: AppState) -> Router {
    let state = DeploymentsState::new(app);
    const BASE: &str = "/subscriptions/{sub}/{rgs}/{rg}/providers/Microsoft.Resources/deployments";
    Router::new()
        .route(BASE, get(list_deployments))
        .route(
            &format!("{BASE}/{{name}}"),
            get(get_deployment)
                .put(put_deployment)
                .delete(delete_deployment),
        )
        .route(
            &format!("{BASE}/{{name}}/validate"),
            post(validate_deployment),
        )
        .route(&format!("{BASE}/{{name}}/operations"), get(list_operations))
        .route(
            &format!("{BASE}/{{name}}/operationStatuses/{{run}}"),
            get(operation_status),
        )
        .with_state(state)
}

/// Verifies the bearer token.
fn authenticate(state: &DeploymentsState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| {
            ApiError::unauthorized(
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header must be 'Bearer <token>'.",
            )
        })?;
    state.app.auth.verify(token.trim())
}

/// Role check at resource-group scope, from token grants or stored role assignments (the same
/// rule the resource routes apply).
async fn authorize(
    state: &DeploymentsState,
    principal: &Principal,
    needed: Role,
    subscription: &str,
    resource_group: &str,
) -> Result<(), ApiError> {
    let covered = |g: &RoleGrant| g.role >= needed && g.covers(subscription, Some(resource_group));
    if principal.grants.iter().any(covered) {
        return Ok(());
    }
    let assignments = state
        .engine()
        .store()
        .list(
            &format!("{AUTHORIZATION_NAMESPACE}/roleAssignments").to_lowercase(),
            &ListScope::Subscription(subscription.to_lowercase()),
            None,
            10_000,
        )
        .await
        .map_err(ApiError::internal)?;
    let granted = assignments.iter().any(|a| {
        let props = &a.body["properties"];
        let mine = props["principalId"].as_str() == Some(principal.subject.as_str());
        let role = props["roleDefinitionId"].as_str().and_then(Role::parse);
        let scope = a.id.split("/providers/").next().unwrap_or_default();
        mine && role.is_some_and(|role| {
            covered(&RoleGrant {
                role,
                scope: scope.to_owned(),
            })
        })
    });
    if granted {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "The client '{}' does not have authorization over scope '/subscriptions/{subscription}/resourceGroups/{resource_group}' (needs {needed:?}).",
            principal.subject
        )))
    }
}

/// Authenticates and checks `needed` over the deployment's resource group.
async fn access(
    state: &DeploymentsState,
    headers: &HeaderMap,
    needed: Role,
    subscription: &str,
    resource_group: &str,
) -> Result<Principal, ApiError> {
    let principal = authenticate(state, headers)?;
    authorize(state, &principal, needed, subscription, resource_group).await?;
    Ok(principal)
}

#[derive(Debug, Deserialize)]
struct DeploymentPath {
    sub: String,
    rgs: String,
    rg: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct ScopePath {
    sub: String,
    rgs: String,
    rg: String,
}

/// Only `resourceGroups` (any case) is a valid middle segment.
fn check_rgs(rgs: &str) -> Result<(), ApiError> {
    if rgs.eq_ignore_ascii_case("resourcegroups") {
        Ok(())
    } else {
        Err(arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "No route matches the request.",
            None,
        ))
    }
}

/// Parsed and validated deployment request.
struct Accepted {
    plan: Plan,
    mode: String,
}

fn accept_body(
    state: &DeploymentsState,
    sub: &str,
    rg: &str,
    body: &[u8],
) -> Result<Accepted, ApiError> {
    let body: Value = serde_json::from_slice(body).map_err(|e| {
        arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            &format!("The request content is not valid JSON: {e}"),
            None,
        )
    })?;
    let props = body
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                "'properties' is required.",
                Some("properties"),
            )
        })?;
    let mode = props
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("Incremental")
        .to_owned();
    if !mode.eq_ignore_ascii_case("Incremental") {
        return Err(arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidDeploymentMode",
            &format!("The deployment mode '{mode}' is not supported; use 'Incremental'."),
            Some("properties.mode"),
        ));
    }
    if props.contains_key("templateLink") {
        return Err(arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidTemplate",
            "templateLink is not supported: send the template inline in 'properties.template'.",
            Some("properties.templateLink"),
        ));
    }
    let template = props
        .get("template")
        .filter(|t| t.is_object())
        .ok_or_else(|| {
            arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                "'properties.template' is required.",
                Some("properties.template"),
            )
        })?;
    let parameters = match props.get("parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                "'properties.parameters' must be an object.",
                Some("properties.parameters"),
            ));
        }
    };
    let plan = Plan::new(
        template,
        &parameters,
        sub,
        rg,
        state.engine().registry().types(),
    )
    .map_err(|e| template_error(&e))?;
    Ok(Accepted { plan, mode })
}

async fn put_deployment(
    State(state): State<DeploymentsState>,
    Path(p): Path<DeploymentPath>,
    Query(q): Query<ApiVersion>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_rgs(&p.rgs)?;
    check_api_version(&q)?;
    let principal = access(&state, &headers, Role::Contributor, &p.sub, &p.rg).await?;
    let accepted = accept_body(&state, &p.sub, &p.rg, &body)?;
    let k = key(&p.sub, &p.rg, &p.name);
    let run_id = uuid::Uuid::new_v4().to_string();
    let id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Resources/deployments/{}",
        p.sub, p.rg, p.name
    );
    let record = Deployment {
        id: id.clone(),
        name: p.name.clone(),
        state: "Accepted",
        mode: accepted.mode.clone(),
        timestamp: now(),
        correlation_id: uuid::Uuid::new_v4().to_string(),
        run_id: run_id.clone(),
        parameters: accepted
            .plan
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), json!({ "value": v })))
            .collect(),
        outputs: None,
        output_resources: Vec::new(),
        error: None,
        operations: Vec::new(),
    };
    let existed = {
        let mut records = state.records.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = records.get(&k)
            && matches!(old.state, "Accepted" | "Running")
        {
            return Err(arm_error(
                StatusCode::CONFLICT,
                "DeploymentActive",
                &format!("The deployment '{}' is still running.", p.name),
                None,
            ));
        }
        records.insert(k.clone(), record.clone()).is_some()
    };
    let ctx = RequestContext {
        subject: principal.subject.clone(),
        subject_type: "User".to_owned(),
    };
    tokio::spawn(run_deployment(state.clone(), k, accepted.plan, ctx));
    let monitor = format!(
        "{id}/operationStatuses/{run_id}?api-version={}",
        q.api_version.unwrap_or_default()
    );
    let mut resp = (
        if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        Json(record.to_json()),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&monitor) {
        resp.headers_mut().insert("azure-asyncoperation", v);
    }
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Ok(resp)
}

async fn validate_deployment(
    State(state): State<DeploymentsState>,
    headers: HeaderMap,
    Path(p): Path<DeploymentPath>,
    Query(q): Query<ApiVersion>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_rgs(&p.rgs)?;
    check_api_version(&q)?;
    let _principal = access(&state, &headers, Role::Contributor, &p.sub, &p.rg).await?;
    match accept_body(&state, &p.sub, &p.rg, &body) {
        Ok(a) => {
            let resources: Vec<Value> =
                a.plan.ordered.iter().map(|r| json!({"id": r.id})).collect();
            Ok(Json(json!({
                "id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Resources/deployments/{}", p.sub, p.rg, p.name),
                "name": p.name,
                "type": "Microsoft.Resources/deployments",
                "properties": {"provisioningState": "Succeeded", "mode": a.mode, "validatedResources": resources},
            }))
            .into_response())
        }
        Err(r) => Err(r),
    }
}

async fn get_deployment(
    State(state): State<DeploymentsState>,
    headers: HeaderMap,
    Path(p): Path<DeploymentPath>,
    Query(q): Query<ApiVersion>,
) -> Result<Response, ApiError> {
    read_record(&state, &headers, &p, &q, Deployment::to_json).await
}

fn not_found(name: &str) -> ApiError {
    arm_error(
        StatusCode::NOT_FOUND,
        "DeploymentNotFound",
        &format!("Deployment '{name}' could not be found."),
        None,
    )
}

async fn delete_deployment(
    State(state): State<DeploymentsState>,
    headers: HeaderMap,
    Path(p): Path<DeploymentPath>,
    Query(q): Query<ApiVersion>,
) -> Result<Response, ApiError> {
    check_rgs(&p.rgs)?;
    check_api_version(&q)?;
    let _principal = access(&state, &headers, Role::Contributor, &p.sub, &p.rg).await?;
    // Deleting a deployment removes its record only (as in ARM); the resources stay.
    let removed = state
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key(&p.sub, &p.rg, &p.name));
    match removed {
        Some(_) => Ok(StatusCode::OK.into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn list_deployments(
    State(state): State<DeploymentsState>,
    headers: HeaderMap,
    Path(p): Path<ScopePath>,
    Query(q): Query<ApiVersion>,
) -> Result<Response, ApiError> {
    check_rgs(&p.rgs)?;
    check_api_version(&q)?;
    let _principal = access(&state, &headers, Role::Reader, &p.sub, &p.rg).await?;
    let prefix = key(&p.sub, &p.rg, "");
    let records = state.records.lock().unwrap_or_else(|e| e.into_inner());
    let mut value: Vec<(&String, Value)> = records
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, d)| (k, d.to_json()))
        .collect();
    value.sort_by(|a, b| a.0.cmp(b.0));
    Ok(
        Json(json!({"value": value.into_iter().map(|(_, v)| v).collect::<Vec<_>>()}))
            .into_response(),
    )
}

async fn list_operations(
    State(state): State<DeploymentsState>,
    headers: HeaderMap,
    Path(p): Path<DeploymentPath>,
    Query(q): Query<ApiVersion>,
) -> Result<Response, ApiError> {
    read_record(&state, &headers, &p, &q, Deployment::operations_json).await
}

/// The read endpoints' shared path: check the route and api-version, require Reader, look the
/// deployment up and render it with `render`.
async fn read_record(
    state: &DeploymentsState,
    headers: &HeaderMap,
    p: &DeploymentPath,
    q: &ApiVersion,
    render: fn(&Deployment) -> Value,
) -> Result<Response, ApiError> {
    check_rgs(&p.rgs)?;
    check_api_version(q)?;
    let _principal = access(state, headers, Role::Reader, &p.sub, &p.rg).await?;
    let records = state.records.lock().unwrap_or_else(|e| e.into_inner());
    match records.get(&key(&p.sub, &p.rg, &p.name)) {
        Some(d) => Ok(Json(render(d)).into_response()),
        None => Err(not_found(&p.name)),
    }
}

#[derive(Debug, Deserialize)]
struct RunPath {
    sub: String,
    rgs: String,
    rg: String,
    name: String,
    run: String,
}

async fn operation_status(
    State(state): State<DeploymentsState>,
    headers: HeaderMap,
    Path(p): Path<RunPath>,
) -> Result<Response, ApiError> {
    check_rgs(&p.rgs)?;
    let _principal = access(&state, &headers, Role::Reader, &p.sub, &p.rg).await?;
    let records = state.records.lock().unwrap_or_else(|e| e.into_inner());
    match records
        .get(&key(&p.sub, &p.rg, &p.name))
        .filter(|d| d.run_id == p.run)
    {
        Some(d) => {
            let status = match d.state {
                "Accepted" | "Running" => "Running",
                other => other,
            };
            let mut body = json!({"id": format!("{}/operationStatuses/{}", d.id, d.run_id), "name": d.run_id, "status": status});
            if let Some(e) = &d.error {
                body["error"] = e.clone();
            }
            Ok(Json(body).into_response())
        }
        None => Err(not_found(&p.name)),
    }
}

/// Scope while deploying: the plan's parameters and variables plus the resources deployed so far.
struct DeployScope<'a> {
    plan: &'a Plan,
    deployed: &'a HashMap<String, Value>,
}

impl DeployScope<'_> {
    fn resolve(&self, target: &str) -> Option<&Value> {
        let r = self.plan.ordered.iter().find(|p| {
            p.id.eq_ignore_ascii_case(target)
                || p.name().eq_ignore_ascii_case(target)
                || format!("{}/{}", p.full_type, p.name()).eq_ignore_ascii_case(target)
        })?;
        self.deployed.get(&r.id.to_ascii_lowercase())
    }
}

impl Scope for DeployScope<'_> {
    fn parameter(&self, name: &str) -> Result<Value, ExprError> {
        self.plan
            .parameters
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| ExprError::UnknownParameter(name.to_owned()))
    }

    fn variable(&self, name: &str) -> Result<Value, ExprError> {
        self.plan
            .variables
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| ExprError::UnknownVariable(name.to_owned()))
    }

    fn subscription_id(&self) -> &str {
        &self.plan.subscription
    }

    fn resource_group(&self) -> &str {
        &self.plan.resource_group
    }

    fn reference(&self, id_or_name: &str, full: bool) -> Result<Value, ExprError> {
        let resource = self
            .resolve(id_or_name)
            .ok_or_else(|| ExprError::UnknownReference(id_or_name.to_owned()))?;
        Ok(if full {
            resource.clone()
        } else {
            resource
                .get("properties")
                .cloned()
                .unwrap_or(Value::Object(Map::new()))
        })
    }
}

/// Creates (or replaces) one resource through the engine and waits for its operation; returns the
/// HTTP status the PUT had and the resource as the engine renders it, or the failure.
async fn deploy_one(
    engine: &Engine,
    ctx: &RequestContext,
    r: &template::PlannedResource,
    body: Value,
) -> Result<(u16, Value), (u16, Value)> {
    let fail = |e: ApiError| {
        (
            e.status.as_u16(),
            serde_json::to_value(&e.detail).unwrap_or(Value::Null),
        )
    };
    let outcome = engine
        .put(ctx, &r.id, &r.api_version, body, &Preconditions::default())
        .await
        .map_err(fail)?;
    let code = if outcome.created { 201 } else { 200 };
    if let Some(op) = &outcome.operation {
        let record = engine
            .wait_operation(&op.id, RESOURCE_TIMEOUT)
            .await
            .map_err(fail)?;
        if record.status != "Succeeded" {
            let err = record.error.unwrap_or_else(|| {
                json!({"code": record.status, "message": format!("The operation ended {}.", record.status)})
            });
            return Err((code, err));
        }
    }
    // Read it back so reference() sees what the engine stored (defaults, provisioningState).
    let resource = engine
        .get(&r.id, Some(&r.api_version))
        .await
        .map_err(fail)?;
    Ok((code, resource))
}

fn update(state: &DeploymentsState, key: &str, f: impl FnOnce(&mut Deployment)) {
    if let Some(d) = state
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(key)
    {
        f(d);
    }
}

async fn run_deployment(state: DeploymentsState, key: String, plan: Plan, ctx: RequestContext) {
    update(&state, &key, |d| {
        d.state = "Running";
        d.operations = plan
            .ordered
            .iter()
            .map(|r| Operation {
                operation_id: uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
                resource_id: r.id.clone(),
                resource_type: r.full_type.clone(),
                resource_name: r.name(),
                state: "Accepted",
                status_code: None,
                status_message: None,
                timestamp: now(),
            })
            .collect();
    });
    let mut deployed: HashMap<String, Value> = HashMap::new();
    for (i, r) in plan.ordered.iter().enumerate() {
        let body = {
            let scope = DeployScope {
                plan: &plan,
                deployed: &deployed,
            };
            template::resource_body(&r.raw, &scope)
        };
        update(&state, &key, |d| {
            d.operations[i].state = "Running";
            d.operations[i].timestamp = now();
        });
        let result = match body {
            Ok(body) => deploy_one(state.engine(), &ctx, r, body).await,
            Err(e) => Err((
                400,
                json!({"code": "InvalidTemplate", "message": e.to_string()}),
            )),
        };
        match result {
            Ok((code, resource)) => {
                deployed.insert(r.id.to_ascii_lowercase(), resource);
                update(&state, &key, |d| {
                    let op = &mut d.operations[i];
                    op.state = "Succeeded";
                    op.status_code = Some(code);
                    op.timestamp = now();
                    d.output_resources.push(r.id.clone());
                });
            }
            Err((code, error)) => {
                update(&state, &key, |d| {
                    let op = &mut d.operations[i];
                    op.state = "Failed";
                    op.status_code = Some(code);
                    op.status_message = Some(json!({ "error": error.clone() }));
                    op.timestamp = now();
                    d.state = "Failed";
                    d.timestamp = now();
                    d.error = Some(json!({
                        "code": "DeploymentFailed",
                        "message": format!("The resource '{}' failed to deploy; see details.", r.id),
                        "details": [error],
                    }));
                });
                return;
            }
        }
    }
    let scope = DeployScope {
        plan: &plan,
        deployed: &deployed,
    };
    let mut outputs = Map::new();
    for (name, out) in &plan.outputs {
        match expr::eval_value(&out.value, &scope) {
            Ok(v) => {
                outputs.insert(name.clone(), json!({"type": out.kind, "value": v}));
            }
            Err(e) => {
                update(&state, &key, |d| {
                    d.state = "Failed";
                    d.timestamp = now();
                    d.error = Some(
                        json!({"code": "InvalidTemplate", "message": format!("output '{name}': {e}"), "target": format!("properties.template.outputs.{name}")}),
                    );
                });
                return;
            }
        }
    }
    update(&state, &key, |d| {
        d.state = "Succeeded";
        d.timestamp = now();
        d.outputs = Some(Value::Object(outputs));
    });
}
