//! The generic ARM engine: one implementation of the verbs for every declared resource type.
//!
//! The HTTP layer and the template deployment engine both call [`Engine`]; neither knows any
//! resource type. Request flow for a write: parse the id → find the declaration → check the
//! api-version and name → normalize the body through the typed properties → compare preconditions
//! → one transactional conditional write → hand the resource to the [`Provisioner`], which moves
//! `provisioningState` Accepted → Provisioning → Succeeded/Failed and completes the operation.

pub mod path;
pub mod registry;

use std::{sync::Arc, time::Duration};

use axum::http::StatusCode;
use base64::Engine as _;
use chrono::Utc;
use serde_json::{Map, Value, json};

use crate::{
    error::ApiError,
    store::{Expect, ListScope, OperationRecord, Store, StoreError, StoredResource},
};
use path::{ArmPath, Scope};
use registry::{Presence, Registry, ResourceTypeDecl};

/// Who is making a request (from the bearer token), for `systemData`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// The token's subject.
    pub subject: String,
    /// `User`, `Application`, `ManagedIdentity` or `Key`.
    pub subject_type: String,
}

impl RequestContext {
    /// A context for internal callers (deployments, tests).
    pub fn system(subject: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            subject_type: "Application".to_owned(),
        }
    }
}

/// `If-Match` / `If-None-Match` as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preconditions {
    /// `If-Match` value.
    pub if_match: Option<String>,
    /// `If-None-Match` value.
    pub if_none_match: Option<String>,
}

/// Why provisioning failed: the `error` of the resource's async operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionError {
    /// ARM error code, e.g. `ConfigurationRejected`.
    pub code: String,
    /// What went wrong, for the user (a node's reason verbatim where there is one).
    pub message: String,
    /// The resource at fault (an ARM id), when known.
    pub target: Option<String>,
}

impl ProvisionError {
    /// An error with `code` and `message`, no target.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            target: None,
        }
    }

    /// Sets the resource at fault.
    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// The operation's `error` object.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"code": self.code, "message": self.message});
        if let Some(t) = &self.target {
            v["target"] = Value::String(t.clone());
        }
        v
    }
}

impl From<String> for ProvisionError {
    fn from(message: String) -> Self {
        Self::new("ProvisioningFailed", message)
    }
}

impl std::fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProvisionError {}

/// Boxed future returned by [`Provisioner`] methods.
pub type ProvisionFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Turns a resource into running reality; the seam where the control plane waits for broker
/// nodes (`crate::nodes::NodeProvisioner`).
pub trait Provisioner: Send + Sync + 'static {
    /// Provisions the (created or updated) resource; `Err` makes it `Failed` and becomes the
    /// operation's error.
    fn provision(&self, resource: Value) -> ProvisionFuture<'_, Result<(), ProvisionError>>;

    /// Called after a DELETE removed `id` (and its children), so the running reality can follow.
    /// The delete is already answered and its operation is complete; nothing waits for this.
    fn deprovisioned(&self, id: String) -> ProvisionFuture<'_, ()> {
        let _ = id;
        Box::pin(async {})
    }
}

/// The default provisioner: a stored resource is immediately provisioned.
#[derive(Debug, Default, Clone, Copy)]
pub struct ImmediateProvisioner;

impl Provisioner for ImmediateProvisioner {
    fn provision(&self, _resource: Value) -> ProvisionFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The result of a PUT or PATCH.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// True when the resource did not exist before.
    pub created: bool,
    /// The resource as returned to the client.
    pub resource: Value,
    /// The operation to poll (asynchronous types).
    pub operation: Option<OperationHandle>,
}

/// Where an operation can be polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationHandle {
    /// Operation id.
    pub id: String,
    /// Relative URL of the status resource (for `Azure-AsyncOperation`).
    pub status_url: String,
    /// Relative URL of the Location monitor.
    pub result_url: String,
}

/// The result of a DELETE.
#[derive(Debug, Clone)]
pub struct DeleteOutcome {
    /// False when nothing existed.
    pub deleted: bool,
    /// The operation to poll (asynchronous deletes that deleted something).
    pub operation: Option<OperationHandle>,
    /// Whether the type deletes asynchronously (202) or not (200).
    pub asynchronous: bool,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Page {
    /// Resources as returned.
    pub value: Vec<Value>,
    /// Opaque URL-safe token for the next page.
    pub skip_token: Option<String>,
}

/// A resolved resource id: its declaration and normalized keys.
#[derive(Debug, Clone)]
pub struct ResolvedId<'a> {
    /// The type.
    pub decl: &'a ResourceTypeDecl,
    /// Canonical id (declared casing for fixed segments, client casing for names).
    pub id: String,
    /// Lower-cased id.
    pub key: String,
    /// Lower-cased parent id.
    pub parent_key: Option<String>,
    /// The last name.
    pub name: String,
    /// Subscription / resource group.
    pub scope: Scope,
}

/// The built-in role-assignment type's namespace.
pub const AUTHORIZATION_NAMESPACE: &str = "Microsoft.Authorization";

/// Default page size and the most a client may ask for with `$top`.
pub const DEFAULT_PAGE: i64 = 100;
/// Largest `$top`.
pub const MAX_PAGE: i64 = 1000;

/// Default time a write waits for the provisioner before answering.
pub const DEFAULT_INLINE_WAIT: Duration = Duration::from_millis(200);

/// `Retry-After` the engine advertises, in whole seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The engine.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    provisioner: Arc<dyn Provisioner>,
    inline_wait: Duration,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("types", &self.registry.types().len())
            .finish_non_exhaustive()
    }
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::internal(e)
}

fn new_etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4())
}

/// Strips `W/` and quotes so etags compare by value.
fn etag_value(s: &str) -> &str {
    s.trim().trim_start_matches("W/").trim_matches('"')
}

fn scope_prefix(scope: &Scope) -> String {
    match &scope.resource_group {
        Some(rg) => format!(
            "/subscriptions/{}/resourceGroups/{}",
            scope.subscription, rg
        ),
        None => format!("/subscriptions/{}", scope.subscription),
    }
}

/// The api-version error for `decl`, if `api_version` is missing or unsupported.
pub fn api_version_error(decl: &ResourceTypeDecl, api_version: Option<&str>) -> Option<ApiError> {
    let supported = decl.api_versions.join(", ");
    match api_version {
        None | Some("") => Some(
            ApiError::bad_request(
                "MissingApiVersionParameter",
                format!(
                    "The api-version query parameter (?api-version=) is required for all requests. Supported api-versions for '{}' are '{supported}'.",
                    decl.type_name()
                ),
            )
            .with_target("api-version"),
        ),
        Some(v) if !decl.supports_api_version(v) => Some(
            ApiError::bad_request(
                "InvalidApiVersionParameter",
                format!(
                    "The api-version '{v}' is invalid. The supported versions for resource type '{}' are '{supported}'.",
                    decl.type_name()
                ),
            )
            .with_target("api-version"),
        ),
        Some(_) => None,
    }
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// The registry the engine serves for `types`: them plus the built-in role-assignment type.
pub fn full_registry(mut types: Vec<ResourceTypeDecl>) -> Registry {
    types.push(crate::auth::role_assignment_type());
    Registry::new(types)
}

impl Engine {
    /// An engine over `store` serving `types` (the built-in role-assignment type is added).
    pub fn new(
        store: Arc<dyn Store>,
        types: Vec<ResourceTypeDecl>,
        provisioner: Arc<dyn Provisioner>,
    ) -> Self {
        Self {
            store,
            registry: Arc::new(full_registry(types)),
            provisioner,
            inline_wait: DEFAULT_INLINE_WAIT,
        }
    }

    /// How long a write waits for provisioning before answering (default
    /// [`DEFAULT_INLINE_WAIT`]). A provisioner that finishes within it makes the write's response
    /// (and every later GET) already terminal; a slower one leaves the response `Accepted` and the
    /// client polls the operation.
    pub fn with_inline_wait(mut self, wait: Duration) -> Self {
        self.inline_wait = wait;
        self
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Resolves a resource path to its declaration and keys, checking the api-version.
    pub fn resolve<'a>(
        &'a self,
        scope: &Scope,
        namespace: &str,
        pairs: &[(String, String)],
        api_version: Option<&str>,
    ) -> Result<ResolvedId<'a>, ApiError> {
        let types: Vec<&str> = pairs.iter().map(|(t, _)| t.as_str()).collect();
        let decl = self.find_type(namespace, &types)?;
        if let Some(e) = api_version_error(decl, api_version) {
            return Err(e);
        }
        let subscription_scoped = decl.namespace.eq_ignore_ascii_case(AUTHORIZATION_NAMESPACE);
        if scope.resource_group.is_none() && !subscription_scoped {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidResourceType",
                format!("'{}' resources live in a resource group.", decl.type_name()),
            ));
        }
        let mut id = format!("{}/providers/{}", scope_prefix(scope), decl.namespace);
        let mut parent_id = None;
        for (i, (_, name)) in pairs.iter().enumerate() {
            if i + 1 == pairs.len() {
                parent_id = (i > 0).then(|| id.clone());
            }
            id.push_str(&format!("/{}/{}", decl.type_path[i], name));
        }
        let name = pairs.last().map(|(_, n)| n.clone()).unwrap_or_default();
        Ok(ResolvedId {
            decl,
            key: id.to_lowercase(),
            parent_key: parent_id.map(|p| p.to_lowercase()),
            id,
            name,
            scope: scope.clone(),
        })
    }

    /// Parses and resolves a full resource id such as `/subscriptions/…/providers/ns/t/n`.
    pub fn resolve_id<'a>(
        &'a self,
        id: &str,
        api_version: Option<&str>,
    ) -> Result<ResolvedId<'a>, ApiError> {
        match ArmPath::parse(id)? {
            ArmPath::Resource {
                scope,
                namespace,
                pairs,
            } => self.resolve(&scope, &namespace, &pairs, api_version),
            _ => Err(ApiError::bad_request(
                "InvalidResourceId",
                format!("'{id}' is not a resource id."),
            )),
        }
    }

    fn find_type<S: AsRef<str>>(
        &self,
        namespace: &str,
        types: &[S],
    ) -> Result<&ResourceTypeDecl, ApiError> {
        if !self.registry.has_namespace(namespace) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidResourceNamespace",
                format!("The resource namespace '{namespace}' is invalid."),
            ));
        }
        self.registry.find(namespace, types).ok_or_else(|| {
            let path: Vec<&str> = types.iter().map(|t| t.as_ref()).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidResourceType",
                format!(
                    "The resource type '{}' could not be found in the namespace '{namespace}'.",
                    path.join("/")
                ),
            )
        })
    }

    /// The resource JSON a client sees: stored body + etag + provisioningState.
    fn render(&self, decl: &ResourceTypeDecl, stored: &StoredResource) -> Value {
        let mut body = stored.body.clone();
        if let Value::Object(map) = &mut body {
            map.insert("etag".into(), Value::String(stored.etag.clone()));
            if decl.provisioning_state
                && let Some(Value::Object(props)) = map.get_mut("properties")
            {
                props.insert(
                    "provisioningState".into(),
                    Value::String(stored.provisioning_state.clone()),
                );
            }
        }
        body
    }

    fn decl_for_key(&self, type_key: &str) -> Option<&ResourceTypeDecl> {
        self.registry
            .types()
            .iter()
            .find(|t| t.type_name().eq_ignore_ascii_case(type_key))
    }

    /// GET one resource.
    pub async fn get(&self, id: &str, api_version: Option<&str>) -> Result<Value, ApiError> {
        let r = self.resolve_id(id, api_version)?;
        self.get_resolved(&r).await
    }

    /// GET one resolved resource.
    pub async fn get_resolved(&self, r: &ResolvedId<'_>) -> Result<Value, ApiError> {
        match self.store.get(&r.key).await.map_err(store_err)? {
            Some(stored) => Ok(self.render(r.decl, &stored)),
            None => Err(ApiError::not_found(&r.id)),
        }
    }

    /// Builds the stored body of a PUT from the client's body.
    fn normalize_put(
        &self,
        r: &ResolvedId<'_>,
        body: Value,
    ) -> Result<Map<String, Value>, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "InvalidRequestContent",
                "The request body must be a JSON object.",
            ));
        };
        let decl = r.decl;
        let mut out = Map::new();
        out.insert("id".into(), Value::String(r.id.clone()));
        out.insert("name".into(), Value::String(r.name.clone()));
        out.insert("type".into(), Value::String(decl.type_name()));
        for (field, presence) in [
            ("location", decl.location),
            ("extendedLocation", decl.extended_location),
        ] {
            match (body.get(field), presence) {
                (None | Some(Value::Null), Presence::Required) => {
                    return Err(ApiError::bad_request(
                        if field == "location" {
                            "LocationRequired"
                        } else {
                            "InvalidRequestContent"
                        },
                        format!("The '{field}' property is required for this resource type."),
                    )
                    .with_target(field));
                }
                (Some(v), Presence::Required | Presence::Optional) if !v.is_null() => {
                    let ok = if field == "location" {
                        v.as_str().is_some_and(|s| !s.is_empty())
                    } else {
                        v.get("name").is_some_and(Value::is_string)
                            && v.get("type").is_some_and(Value::is_string)
                    };
                    if !ok {
                        return Err(ApiError::bad_request(
                            "InvalidRequestContent",
                            if field == "location" {
                                "'location' must be a non-empty string.".to_owned()
                            } else {
                                "'extendedLocation' must be an object with string 'name' and 'type'."
                                    .to_owned()
                            },
                        )
                        .with_target(field));
                    }
                    out.insert(field.into(), v.clone());
                }
                _ => {}
            }
        }
        match body.get("tags") {
            None | Some(Value::Null) => {}
            Some(Value::Object(tags)) => {
                if let Some((k, _)) = tags.iter().find(|(_, v)| !v.is_string()) {
                    return Err(ApiError::bad_request(
                        "InvalidRequestContent",
                        "Tag values must be strings.",
                    )
                    .with_target(format!("tags.{k}")));
                }
                out.insert("tags".into(), Value::Object(tags.clone()));
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "InvalidRequestContent",
                    "'tags' must be an object of strings.",
                )
                .with_target("tags"));
            }
        }
        for (field, value) in decl.top_level_from_json(&body)? {
            out.insert(field, value);
        }
        let props = match body.get("properties") {
            None | Some(Value::Null) => json!({}),
            Some(v) => v.clone(),
        };
        let mut props = decl.properties_from_json(props)?;
        if let Value::Object(p) = &mut props {
            // Read-only and engine-owned: never stored from input.
            p.remove("provisioningState");
        }
        out.insert("properties".into(), props);
        Ok(out)
    }

    fn check_preconditions(
        existing: Option<&StoredResource>,
        pre: &Preconditions,
    ) -> Result<(), ApiError> {
        if let Some(m) = &pre.if_match {
            match existing {
                None => {
                    return Err(ApiError::precondition_failed(
                        "If-Match was given but the resource does not exist.",
                    ));
                }
                Some(e) if m.trim() != "*" && etag_value(m) != etag_value(&e.etag) => {
                    return Err(ApiError::precondition_failed(
                        "The If-Match etag does not match the resource's current etag.",
                    ));
                }
                _ => {}
            }
        }
        if let Some(m) = &pre.if_none_match
            && let Some(e) = existing
            && (m.trim() == "*" || etag_value(m) == etag_value(&e.etag))
        {
            return Err(ApiError::precondition_failed(
                "If-None-Match was given but the resource exists.",
            ));
        }
        Ok(())
    }

    fn operation_for(
        &self,
        r: &ResolvedId<'_>,
        kind: &str,
        status: &str,
        api_version: &str,
    ) -> (OperationRecord, OperationHandle) {
        let id = uuid::Uuid::new_v4().to_string();
        let terminal = matches!(status, "Succeeded" | "Failed");
        let now = Utc::now();
        let base = format!(
            "/subscriptions/{}/providers/{}",
            path::percent_encode(&r.scope.subscription),
            r.decl.namespace
        );
        (
            OperationRecord {
                id: id.clone(),
                subscription_key: r.scope.subscription.to_lowercase(),
                resource_group_key: r
                    .scope
                    .resource_group
                    .as_deref()
                    .unwrap_or("")
                    .to_lowercase(),
                resource_id: r.id.clone(),
                kind: kind.to_owned(),
                status: status.to_owned(),
                start_time: now,
                end_time: terminal.then_some(now),
                error: None,
            },
            OperationHandle {
                status_url: format!("{base}/operationStatuses/{id}?api-version={api_version}"),
                result_url: format!("{base}/operationResults/{id}?api-version={api_version}"),
                id,
            },
        )
    }

    /// PUT (create or replace). The same path the HTTP handler and deployments take.
    pub async fn put(
        &self,
        ctx: &RequestContext,
        id: &str,
        api_version: &str,
        body: Value,
        pre: &Preconditions,
    ) -> Result<WriteOutcome, ApiError> {
        let r = self.resolve_id(id, Some(api_version))?;
        self.put_resolved(ctx, &r, api_version, body, pre).await
    }

    /// PUT on a resolved id.
    pub async fn put_resolved(
        &self,
        ctx: &RequestContext,
        r: &ResolvedId<'_>,
        api_version: &str,
        body: Value,
        pre: &Preconditions,
    ) -> Result<WriteOutcome, ApiError> {
        if let Err(message) = r.decl.name_rule.check(&r.name) {
            return Err(ApiError::bad_request("InvalidResourceName", message).with_target("name"));
        }
        let normalized = self.normalize_put(r, body)?;
        self.write(ctx, r, api_version, pre, move |_| Ok(normalized.clone()))
            .await
    }

    /// PATCH: tags replaced when given, `properties` and declared top-level sections merged.
    pub async fn patch(
        &self,
        ctx: &RequestContext,
        id: &str,
        api_version: &str,
        body: Value,
        pre: &Preconditions,
    ) -> Result<WriteOutcome, ApiError> {
        let r = self.resolve_id(id, Some(api_version))?;
        self.patch_resolved(ctx, &r, api_version, body, pre).await
    }

    /// PATCH on a resolved id.
    pub async fn patch_resolved(
        &self,
        ctx: &RequestContext,
        r: &ResolvedId<'_>,
        api_version: &str,
        body: Value,
        pre: &Preconditions,
    ) -> Result<WriteOutcome, ApiError> {
        if !r.decl.verbs.patch {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("'{}' does not support PATCH.", r.decl.type_name()),
            ));
        }
        let Value::Object(patch) = body else {
            return Err(ApiError::bad_request(
                "InvalidRequestContent",
                "The request body must be a JSON object.",
            ));
        };
        let decl = r.decl;
        let outcome = self
            .write(ctx, r, api_version, pre, |existing| {
                let Some(existing) = existing else {
                    return Err(ApiError::not_found(&r.id));
                };
                let mut merged = existing.body.clone();
                for (k, v) in &patch {
                    match k.as_str() {
                        "tags" => {
                            merged["tags"] = v.clone();
                        }
                        "properties" => merge_patch(&mut merged["properties"], v),
                        other if decl.top_level_fields().any(|(f, _)| f == other) => {
                            merge_patch(&mut merged[other], v)
                        }
                        _ => {}
                    }
                }
                let normalized = self.normalize_put(r, merged)?;
                Ok(normalized)
            })
            .await?;
        Ok(outcome)
    }

    /// The shared write path: read, build, check, conditional write, provision.
    async fn write(
        &self,
        ctx: &RequestContext,
        r: &ResolvedId<'_>,
        api_version: &str,
        pre: &Preconditions,
        build: impl Fn(Option<&StoredResource>) -> Result<Map<String, Value>, ApiError>,
    ) -> Result<WriteOutcome, ApiError> {
        // Without client preconditions a lost race is retried; with them it is a 412.
        let client_conditional = pre.if_match.is_some() || pre.if_none_match.is_some();
        for _attempt in 0..5 {
            let existing = self.store.get(&r.key).await.map_err(store_err)?;
            Self::check_preconditions(existing.as_ref(), pre)?;
            if existing.is_none()
                && let Some(parent) = &r.parent_key
                && self.store.get(parent).await.map_err(store_err)?.is_none()
            {
                return Err(parent_not_found(r));
            }
            let mut body = build(existing.as_ref())?;
            let now = Utc::now();
            let by = Value::String(ctx.subject.clone());
            let by_type = Value::String(ctx.subject_type.clone());
            let stamp = Value::String(now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            let system_data = match existing.as_ref().and_then(|e| e.body.get("systemData")) {
                Some(Value::Object(old)) => {
                    let mut sd = old.clone();
                    sd.insert("lastModifiedBy".into(), by);
                    sd.insert("lastModifiedByType".into(), by_type);
                    sd.insert("lastModifiedAt".into(), stamp);
                    sd
                }
                _ => {
                    let mut sd = Map::new();
                    sd.insert("createdBy".into(), by.clone());
                    sd.insert("createdByType".into(), by_type.clone());
                    sd.insert("createdAt".into(), stamp.clone());
                    sd.insert("lastModifiedBy".into(), by);
                    sd.insert("lastModifiedByType".into(), by_type);
                    sd.insert("lastModifiedAt".into(), stamp);
                    sd
                }
            };
            body.insert("systemData".into(), Value::Object(system_data));
            // The id keeps the casing of the first write.
            let id = existing.as_ref().map_or(r.id.clone(), |e| e.id.clone());
            body.insert("id".into(), Value::String(id.clone()));
            if let Some(e) = &existing
                && let Some(name) = e.body.get("name")
            {
                body.insert("name".into(), name.clone());
            }
            let asynchronous = r.decl.lro.async_put && r.decl.provisioning_state;
            let state = if asynchronous {
                "Accepted"
            } else {
                "Succeeded"
            };
            let stored = StoredResource {
                id,
                id_key: r.key.clone(),
                parent_key: r.parent_key.clone(),
                subscription_key: r.scope.subscription.to_lowercase(),
                resource_group_key: r
                    .scope
                    .resource_group
                    .as_deref()
                    .unwrap_or("")
                    .to_lowercase(),
                type_key: r.decl.type_name().to_lowercase(),
                body: Value::Object(body),
                etag: new_etag(),
                provisioning_state: state.to_owned(),
                updated_at: now,
            };
            let expect = match &existing {
                Some(e) => Expect::Etag(e.etag.clone()),
                None => Expect::Absent,
            };
            let (op, handle) = self.operation_for(r, "put", state, api_version);
            match self.store.put(&stored, expect, &op).await {
                Ok(()) => {
                    let mut stored = stored;
                    if asynchronous {
                        let task = self.spawn_provisioning(r.decl.clone(), stored.clone(), op);
                        if let Ok(Ok(Some(state))) =
                            tokio::time::timeout(self.inline_wait, task).await
                        {
                            stored.provisioning_state = state;
                        }
                    }
                    return Ok(WriteOutcome {
                        created: existing.is_none(),
                        resource: self.render(r.decl, &stored),
                        operation: asynchronous.then_some(handle),
                    });
                }
                Err(StoreError::Conflict) if client_conditional => {
                    return Err(ApiError::precondition_failed(
                        "The resource was modified concurrently; the precondition no longer holds.",
                    ));
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::ParentMissing) => return Err(parent_not_found(r)),
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            "The resource is being modified concurrently; retry.",
        ))
    }

    /// Runs the provisioner in its own task (so a dropped request cannot abandon it); the task
    /// yields the terminal state it recorded.
    fn spawn_provisioning(
        &self,
        decl: ResourceTypeDecl,
        stored: StoredResource,
        op: OperationRecord,
    ) -> tokio::task::JoinHandle<Option<String>> {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut op = op;
            let store = &engine.store;
            let result: Result<String, StoreError> = async {
                store
                    .set_provisioning_state(&stored.id_key, &stored.etag, "Provisioning")
                    .await?;
                op.status = "Provisioning".into();
                store.update_operation(&op).await?;
                let outcome = engine
                    .provisioner
                    .provision(engine.render(&decl, &stored))
                    .await;
                let state = if outcome.is_ok() {
                    "Succeeded"
                } else {
                    "Failed"
                };
                store
                    .set_provisioning_state(&stored.id_key, &stored.etag, state)
                    .await?;
                op.status = state.into();
                op.end_time = Some(Utc::now());
                if let Err(e) = outcome {
                    op.error = Some(e.to_json());
                }
                store.update_operation(&op).await?;
                Ok(state.to_owned())
            }
            .await;
            match result {
                Ok(state) => Some(state),
                Err(e) => {
                    tracing::error!(error = %e, resource = %stored.id, "provisioning bookkeeping failed");
                    None
                }
            }
        })
    }

    /// DELETE (cascading to children).
    pub async fn delete(
        &self,
        id: &str,
        api_version: &str,
        pre: &Preconditions,
    ) -> Result<DeleteOutcome, ApiError> {
        let r = self.resolve_id(id, Some(api_version))?;
        self.delete_resolved(&r, api_version, pre).await
    }

    /// DELETE on a resolved id.
    pub async fn delete_resolved(
        &self,
        r: &ResolvedId<'_>,
        api_version: &str,
        pre: &Preconditions,
    ) -> Result<DeleteOutcome, ApiError> {
        let asynchronous = r.decl.lro.async_delete;
        let existing = self.store.get(&r.key).await.map_err(store_err)?;
        Self::check_preconditions(existing.as_ref(), pre)?;
        if existing.is_none() {
            return Ok(DeleteOutcome {
                deleted: false,
                operation: None,
                asynchronous,
            });
        }
        // In this issue deletion completes in the transaction, so the operation is born done.
        let (op, handle) = self.operation_for(r, "delete", "Succeeded", api_version);
        let deleted = self.store.delete(&r.key, &op).await.map_err(store_err)?;
        if deleted && let Some(existing) = existing {
            // Its own task, like provisioning: a dropped request must not abandon the follow-up.
            let provisioner = self.provisioner.clone();
            tokio::spawn(async move { provisioner.deprovisioned(existing.id).await });
        }
        Ok(DeleteOutcome {
            deleted,
            operation: (deleted && asynchronous).then_some(handle),
            asynchronous,
        })
    }

    /// Lists a type in a scope (parent, resource group or subscription), one page.
    pub async fn list(
        &self,
        decl: &ResourceTypeDecl,
        scope: ListScope,
        top: Option<i64>,
        skip_token: Option<&str>,
    ) -> Result<Page, ApiError> {
        let limit = top.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        let after = match skip_token {
            None | Some("") => None,
            Some(t) => Some(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request("InvalidSkipToken", "The $skipToken is invalid.")
                            .with_target("$skipToken")
                    })?,
            ),
        };
        let type_key = decl.type_name().to_lowercase();
        // One extra row tells whether another page exists.
        let mut rows = self
            .store
            .list(&type_key, &scope, after.as_deref(), limit + 1)
            .await
            .map_err(store_err)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let skip_token = (more)
            .then(|| rows.last())
            .flatten()
            .map(|last| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&last.id_key));
        Ok(Page {
            value: rows.iter().map(|s| self.render(decl, s)).collect(),
            skip_token,
        })
    }

    /// Reads an operation.
    pub async fn operation(&self, id: &str) -> Result<Option<OperationRecord>, ApiError> {
        self.store.get_operation(id).await.map_err(store_err)
    }

    /// Waits until an operation is terminal (for deployments and tests).
    pub async fn wait_operation(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<OperationRecord, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(op) = self.operation(id).await?
                && matches!(op.status.as_str(), "Succeeded" | "Failed" | "Canceled")
            {
                return Ok(op);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "OperationTimeout",
                    format!("operation {id} did not finish in time"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Finds the declaration for a stored type key (used by authorization and listings).
    pub fn decl_of(&self, stored: &StoredResource) -> Option<&ResourceTypeDecl> {
        self.decl_for_key(&stored.type_key)
    }
}

fn parent_not_found(r: &ResolvedId<'_>) -> ApiError {
    let parent = r.id.rsplitn(3, '/').nth(2).unwrap_or_default().to_owned();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ParentResourceNotFound",
        format!(
            "Can not perform requested operation on nested resource. Parent resource '{parent}' not found."
        ),
    )
}
