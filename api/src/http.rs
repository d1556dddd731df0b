//! The HTTP surface: `fn app(state) -> Router`. ARM paths have arbitrary depth and ARM matches
//! `resourceGroups`/`providers` case-insensitively, so one fallback handler parses them
//! ([`ArmPath`]) instead of axum's router; fixed paths (`/healthz`, `/metrics`, `/docs`) are routes.

use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::{
    auth::{Authenticator, Principal, Role, RoleGrant},
    engine::{
        AUTHORIZATION_NAMESPACE, Engine, Preconditions, RETRY_AFTER_SECS, RequestContext,
        path::{ArmPath, Scope, percent_encode},
    },
    error::ApiError,
    store::ListScope,
};

/// Largest accepted request body (ARM's own limit is 4 MiB).
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// Request metrics.
    pub metrics: Arc<ApiMetrics>,
    /// The OpenAPI document served at /openapi.json and /docs.
    pub openapi: Arc<utoipa::openapi::OpenApi>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// The API's own Prometheus registry. It is not installed as the process-global `metrics`
/// recorder: in `meridian dev` the broker may own that, and several apps (tests) may share a
/// process; each app records into and renders its own registry.
pub struct ApiMetrics {
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
    handle: metrics_exporter_prometheus::PrometheusHandle,
}

impl std::fmt::Debug for ApiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiMetrics").finish_non_exhaustive()
    }
}

static METRICS_META: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    /// An empty registry with latency buckets from 1 ms to 5 s.
    pub fn new() -> Self {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        Self { recorder, handle }
    }

    fn record(&self, route: &str, method: &str, status: u16, seconds: f64) {
        use metrics::Recorder;
        let labels = vec![
            metrics::Label::new("route", route.to_owned()),
            metrics::Label::new("method", method.to_owned()),
        ];
        let mut with_status = labels.clone();
        with_status.push(metrics::Label::new("status", status.to_string()));
        self.recorder
            .register_counter(
                &metrics::Key::from_parts("meridian_api_requests_total", with_status),
                &METRICS_META,
            )
            .increment(1);
        self.recorder
            .register_histogram(
                &metrics::Key::from_parts("meridian_api_request_duration_seconds", labels),
                &METRICS_META,
            )
            .record(seconds);
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// A fresh metrics registry for an [`AppState`] (kept for callers written against the first API).
pub fn metrics_handle() -> Arc<ApiMetrics> {
    Arc::new(ApiMetrics::new())
}

/// Builds the router: resource routes, health, metrics, docs (without template deployments).
pub fn app(state: AppState) -> Router {
    base(state.clone()).layer(middleware::from_fn_with_state(state, observe))
}

/// [`app`] plus the template deployment routes (`Microsoft.Resources/deployments`): what
/// [`crate::cli::start`] serves.
pub fn app_with_deployments(state: AppState) -> Router {
    base(state.clone())
        // Fixed routes take precedence over the ARM fallback.
        .merge(crate::deployments::deployments_router(state.clone()))
        .layer(middleware::from_fn_with_state(state, observe))
}

/// [`app_with_deployments`] plus the broker-node routes (`/meridian/nodes`) over `nodes`: what
/// [`crate::cli::start`] serves.
pub fn app_with_nodes(state: AppState, nodes: crate::nodes::NodeRegistry) -> Router {
    base(state.clone())
        .merge(crate::deployments::deployments_router(state.clone()))
        .merge(crate::nodes::routes::router(state.clone(), nodes))
        .merge(crate::explain::router(state.clone()))
        .layer(middleware::from_fn_with_state(state, observe))
}

fn base(state: AppState) -> Router {
    let openapi = (*state.openapi).clone();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(arm)
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.engine.store().get("/readiness-probe").await {
        Ok(_) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness probe failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "The database is not reachable.",
            )
            .into_response()
        }
    }
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// A bounded-cardinality route label: names replaced by placeholders.
pub fn route_template(path: &str) -> String {
    match ArmPath::parse(path) {
        Ok(ArmPath::ProviderOperations { namespace }) => {
            format!("/providers/{namespace}/operations")
        }
        Ok(ArmPath::Operation {
            namespace, results, ..
        }) => format!(
            "/subscriptions/{{subscriptionId}}/providers/{namespace}/{}/{{operationId}}",
            if results {
                "operationResults"
            } else {
                "operationStatuses"
            }
        ),
        Ok(ArmPath::Resource {
            scope,
            namespace,
            pairs,
        }) => {
            let mut t = scope_template(&scope, &namespace);
            for (ty, _) in pairs {
                t.push_str(&format!("/{ty}/{{name}}"));
            }
            t
        }
        Ok(ArmPath::Collection {
            scope,
            namespace,
            parents,
            child_type,
        }) => {
            let mut t = scope_template(&scope, &namespace);
            for (ty, _) in parents {
                t.push_str(&format!("/{ty}/{{name}}"));
            }
            t.push_str(&format!("/{child_type}"));
            t
        }
        Err(_) if matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json") => {
            path.to_owned()
        }
        Err(_) if path.starts_with("/docs") => "/docs".to_owned(),
        Err(_) if path == "/meridian/nodes" || path == "/meridian/authz/explain" => path.to_owned(),
        Err(_) if path.starts_with("/meridian/nodes/") => "/meridian/nodes/{nodeId}".to_owned(),
        Err(_) => "other".to_owned(),
    }
}

fn scope_template(scope: &Scope, namespace: &str) -> String {
    if scope.resource_group.is_some() {
        format!(
            "/subscriptions/{{subscriptionId}}/resourceGroups/{{resourceGroupName}}/providers/{namespace}"
        )
    } else {
        format!("/subscriptions/{{subscriptionId}}/providers/{namespace}")
    }
}

/// Request id, tracing span, metrics and client-request-id echo for every request.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let client_request_id = req.headers().get("x-ms-client-request-id").cloned();
    let method = req.method().clone();
    let route = route_template(req.uri().path());
    let span = tracing::info_span!("request", %request_id, %method, %route);
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "done"
        )
    });
    state.metrics.record(
        &route,
        method.as_str(),
        status,
        started.elapsed().as_secs_f64(),
    );
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("x-ms-request-id", v.clone());
        headers.insert("x-ms-correlation-request-id", v);
    }
    if let Some(v) = client_request_id {
        headers.insert("x-ms-client-request-id", v);
    }
    response
}

fn query_map(uri: &axum::http::Uri) -> HashMap<String, String> {
    axum::extract::Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Verifies the request's bearer token (401 in ARM shape).
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let Some(value) = header_str(headers, "authorization") else {
        return Err(ApiError::unauthorized(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
        ));
    };
    let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    else {
        return Err(ApiError::unauthorized(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header must be 'Bearer <token>'.",
        ));
    };
    state.auth.verify(token.trim())
}

/// Checks that `principal` holds at least `needed` over the scope, from token grants or stored
/// role assignments.
pub async fn authorize(
    state: &AppState,
    principal: &Principal,
    needed: Role,
    subscription: &str,
    resource_group: Option<&str>,
    action: &str,
) -> Result<(), ApiError> {
    let covered = |g: &RoleGrant| g.role >= needed && g.covers(subscription, resource_group);
    if principal.grants.iter().any(covered) {
        return Ok(());
    }
    let assignments = state
        .engine
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
            "The client '{}' does not have authorization to perform action '{action}' over scope '/subscriptions/{subscription}{}' (needs {needed:?}).",
            principal.subject,
            resource_group
                .map(|rg| format!("/resourceGroups/{rg}"))
                .unwrap_or_default()
        )))
    }
}

fn parse_json(bytes: &Bytes) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "InvalidRequestContent",
            "The request content is empty.",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(
            "InvalidRequestContent",
            format!("The request content was invalid and could not be deserialized: {e}."),
        )
    })
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, BODY_LIMIT).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("The request body exceeds the limit of {BODY_LIMIT} bytes."),
        )
    })
}

fn base_url(headers: &HeaderMap, uri: &axum::http::Uri, tls: bool) -> String {
    let host = header_str(headers, "host")
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{}://{host}", if tls { "https" } else { "http" })
}

/// Whether this request came over TLS (set by the server as an extension).
#[derive(Debug, Clone, Copy)]
pub struct OverTls(pub bool);

async fn arm(State(state): State<AppState>, req: Request) -> Response {
    match arm_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Adds the LRO headers. Relative URLs are made absolute with `base`: the Event Grid SDK's poller
/// does not resolve relative `Azure-AsyncOperation`/`Location` URLs (and then refuses to send its
/// token), so absolute URLs are the only form every SDK follows.
fn with_lro_headers(
    base: &str,
    mut response: Response,
    status_url: Option<&str>,
    location: Option<&str>,
) -> Response {
    let absolute = |u: &str| {
        if u.starts_with('/') {
            format!("{base}{u}")
        } else {
            u.to_owned()
        }
    };
    let h = response.headers_mut();
    if let Some(u) = status_url.and_then(|u| HeaderValue::from_str(&absolute(u)).ok()) {
        h.insert("azure-asyncoperation", u);
    }
    if let Some(u) = location.and_then(|u| HeaderValue::from_str(&absolute(u)).ok()) {
        h.insert(header::LOCATION, u);
    }
    if status_url.is_some() || location.is_some() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

fn json_with_etag(status: StatusCode, body: Value) -> Response {
    let etag = body["etag"]
        .as_str()
        .and_then(|e| HeaderValue::from_str(e).ok());
    let mut r = (status, Json(body)).into_response();
    if let Some(e) = etag {
        r.headers_mut().insert(header::ETAG, e);
    }
    r
}

async fn arm_inner(state: AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let tls = parts.extensions.get::<OverTls>().is_some_and(|t| t.0);
    let method = parts.method.clone();
    let headers = parts.headers;
    let uri = parts.uri;
    if let Some(len) = header_str(&headers, "content-length").and_then(|l| l.parse::<usize>().ok())
        && len > BODY_LIMIT
    {
        return Err(read_body(Body::from(vec![0u8; 0]))
            .await
            .err()
            .unwrap_or_else(|| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    format!("The request body exceeds the limit of {BODY_LIMIT} bytes."),
                )
            }));
    }
    let path = ArmPath::parse(uri.path())?;
    let principal = authenticate(&state, &headers)?;
    let query = query_map(&uri);
    let api_version = query.get("api-version").map(String::as_str);
    let pre = Preconditions {
        if_match: header_str(&headers, "if-match"),
        if_none_match: header_str(&headers, "if-none-match"),
    };
    let ctx = RequestContext {
        subject: principal.subject.clone(),
        subject_type: "User".to_owned(),
    };
    let engine = &state.engine;
    match path {
        ArmPath::ProviderOperations { namespace } => {
            if method != Method::GET {
                return Err(method_not_allowed(&method));
            }
            let ops = crate::openapi::provider_operations(engine.registry(), &namespace);
            if ops.is_empty() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "InvalidResourceNamespace",
                    format!("The resource namespace '{namespace}' is invalid."),
                ));
            }
            Ok(Json(json!({ "value": ops })).into_response())
        }
        ArmPath::Operation {
            subscription,
            namespace,
            id,
            results,
        } => {
            if method != Method::GET {
                return Err(method_not_allowed(&method));
            }
            let op = engine
                .operation(&id)
                .await?
                .filter(|op| op.subscription_key == subscription.to_lowercase())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "OperationNotFound",
                        format!("The operation '{id}' was not found."),
                    )
                })?;
            let rg = (!op.resource_group_key.is_empty()).then_some(op.resource_group_key.as_str());
            authorize(&state, &principal, Role::Reader, &subscription, rg, "read").await?;
            let terminal = matches!(op.status.as_str(), "Succeeded" | "Failed" | "Canceled");
            if results {
                // The Location monitor: 202 while running, 204 when done (never 404).
                if !terminal {
                    let here = format!(
                        "{}{}",
                        uri.path(),
                        uri.query().map(|q| format!("?{q}")).unwrap_or_default()
                    );
                    return Ok(with_lro_headers(
                        &base_url(&headers, &uri, tls),
                        StatusCode::ACCEPTED.into_response(),
                        None,
                        Some(&here),
                    ));
                }
                if op.status == "Succeeded" {
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
                let err = op.error.clone().unwrap_or(
                    json!({"code": "OperationFailed", "message": "The operation failed."}),
                );
                return Ok((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "error": err })),
                )
                    .into_response());
            }
            let mut body = json!({
                "id": format!("/subscriptions/{subscription}/providers/{namespace}/operationStatuses/{}", op.id),
                "name": op.id,
                "status": op.status,
                "resourceId": op.resource_id,
                "startTime": op.start_time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            });
            if let Some(end) = op.end_time {
                body["endTime"] = json!(end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                body["percentComplete"] = json!(100);
            }
            if let Some(err) = &op.error {
                body["error"] = err.clone();
            }
            let mut response = Json(body).into_response();
            if !terminal {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            Ok(response)
        }
        ArmPath::Collection {
            scope,
            namespace,
            parents,
            child_type,
        } => {
            if method != Method::GET {
                return Err(method_not_allowed(&method));
            }
            let mut types: Vec<&str> = parents.iter().map(|(t, _)| t.as_str()).collect();
            types.push(&child_type);
            let decl = engine.registry().find(&namespace, &types).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "InvalidResourceType",
                    format!(
                        "The resource type '{}' could not be found in the namespace '{namespace}'.",
                        types.join("/")
                    ),
                )
            })?;
            if let Some(e) = crate::engine::api_version_error(decl, api_version) {
                return Err(e);
            }
            authorize(
                &state,
                &principal,
                Role::Reader,
                &scope.subscription,
                scope.resource_group.as_deref(),
                "read",
            )
            .await?;
            let list_scope = if !parents.is_empty() {
                if !decl.verbs.list_by_parent {
                    return Err(method_not_allowed(&method));
                }
                let parent = engine.resolve(
                    &scope,
                    &namespace,
                    &parents,
                    decl.api_versions.first().map(|v| v.as_ref()),
                )?;
                if engine
                    .store()
                    .get(&parent.key)
                    .await
                    .map_err(ApiError::internal)?
                    .is_none()
                {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "ParentResourceNotFound",
                        format!("Parent resource '{}' not found.", parent.id),
                    ));
                }
                ListScope::Parent(parent.key)
            } else if let Some(rg) = &scope.resource_group {
                if !decl.verbs.list_by_resource_group {
                    return Err(method_not_allowed(&method));
                }
                ListScope::ResourceGroup(scope.subscription.to_lowercase(), rg.to_lowercase())
            } else {
                if !decl.verbs.list_by_subscription {
                    return Err(method_not_allowed(&method));
                }
                ListScope::Subscription(scope.subscription.to_lowercase())
            };
            let top = match query.get("$top") {
                None => None,
                Some(t) => Some(t.parse::<i64>().ok().filter(|t| *t > 0).ok_or_else(|| {
                    ApiError::bad_request(
                        "InvalidQueryParameterValue",
                        "$top must be a positive integer.",
                    )
                    .with_target("$top")
                })?),
            };
            let page = engine
                .list(
                    decl,
                    list_scope,
                    top,
                    query.get("$skipToken").map(String::as_str),
                )
                .await?;
            let mut body = json!({ "value": page.value });
            if let Some(token) = page.skip_token {
                let mut next = format!(
                    "{}{}?api-version={}&$skipToken={token}",
                    base_url(&headers, &uri, tls),
                    uri.path(),
                    percent_encode(api_version.unwrap_or_default())
                );
                if let Some(t) = top {
                    next.push_str(&format!("&$top={t}"));
                }
                body["nextLink"] = json!(next);
            }
            Ok(Json(body).into_response())
        }
        ArmPath::Resource {
            scope,
            namespace,
            pairs,
        } => {
            let r = engine.resolve(&scope, &namespace, &pairs, api_version)?;
            let api_version = api_version.unwrap_or_default();
            let is_authz = r
                .decl
                .namespace
                .eq_ignore_ascii_case(AUTHORIZATION_NAMESPACE);
            let needed = match method {
                Method::GET | Method::HEAD => Role::Reader,
                _ if is_authz => Role::Owner,
                _ => Role::Contributor,
            };
            authorize(
                &state,
                &principal,
                needed,
                &scope.subscription,
                scope.resource_group.as_deref(),
                method.as_str(),
            )
            .await?;
            match method {
                Method::GET => Ok(json_with_etag(
                    StatusCode::OK,
                    engine.get_resolved(&r).await?,
                )),
                Method::PUT => {
                    let bytes = read_body(body).await?;
                    let value = parse_json(&bytes)?;
                    let out = engine
                        .put_resolved(&ctx, &r, api_version, value, &pre)
                        .await?;
                    let status = if out.created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    let response = json_with_etag(status, out.resource);
                    Ok(with_lro_headers(
                        &base_url(&headers, &uri, tls),
                        response,
                        out.operation.as_ref().map(|o| o.status_url.as_str()),
                        None,
                    ))
                }
                Method::PATCH => {
                    let bytes = read_body(body).await?;
                    let value = parse_json(&bytes)?;
                    let out = engine
                        .patch_resolved(&ctx, &r, api_version, value, &pre)
                        .await?;
                    let response = json_with_etag(StatusCode::OK, out.resource);
                    Ok(with_lro_headers(
                        &base_url(&headers, &uri, tls),
                        response,
                        out.operation.as_ref().map(|o| o.status_url.as_str()),
                        None,
                    ))
                }
                Method::DELETE => {
                    let out = engine.delete_resolved(&r, api_version, &pre).await?;
                    if !out.deleted {
                        return Ok(StatusCode::NO_CONTENT.into_response());
                    }
                    match out.operation {
                        Some(op) => Ok(with_lro_headers(
                            &base_url(&headers, &uri, tls),
                            StatusCode::ACCEPTED.into_response(),
                            Some(&op.status_url),
                            Some(&op.result_url),
                        )),
                        None => Ok(StatusCode::OK.into_response()),
                    }
                }
                other => Err(method_not_allowed(&other)),
            }
        }
    }
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("The method '{method}' is not supported on this path."),
    )
}
