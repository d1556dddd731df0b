//! The resource-type registry: what a resource type *is* to the engine.
//!
//! A resource type is a declaration ([`ResourceTypeDecl`]) plus its typed `properties` struct. The
//! generic engine (routes, verbs, etags, LRO, pagination, storage) reads only this declaration, so
//! adding a type never means writing a handler.
//!
//! # Declaring a type
//!
//! ```
//! use meridian_api::engine::registry::{NameRule, Presence, ResourceTypeDecl, ValidationError};
//! use serde::{Deserialize, Serialize};
//!
//! /// The `properties` of `Microsoft.EventGrid/namespaces/topicSpaces`.
//! #[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
//! #[serde(rename_all = "camelCase", deny_unknown_fields)]
//! pub struct TopicSpaceProperties {
//!     #[serde(default, skip_serializing_if = "Option::is_none")]
//!     pub description: Option<String>,
//!     #[serde(default)]
//!     pub topic_templates: Vec<String>,
//!     /// Read-only: ignored on input (the engine overwrites it on output).
//!     #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
//!     pub provisioning_state: Option<String>,
//! }
//!
//! fn topic_space() -> ResourceTypeDecl {
//!     ResourceTypeDecl::new::<TopicSpaceProperties>("Microsoft.EventGrid", &["namespaces", "topicSpaces"])
//!         .api_versions(&["2023-12-15-preview", "2025-02-15"])
//!         .name_rule(NameRule::new(r"^[a-zA-Z0-9-]*$", 3, 50))
//!         .list_by_parent(true)
//!         .validate(|p: &TopicSpaceProperties| {
//!             if p.topic_templates.is_empty() {
//!                 return Err(ValidationError::new(
//!                     "properties.topicTemplates",
//!                     "at least one topic template is required",
//!                 ));
//!             }
//!             Ok(())
//!         })
//!         .build()
//! }
//! # let t = topic_space();
//! # assert_eq!(t.type_name(), "Microsoft.EventGrid/namespaces/topicSpaces");
//! # assert!(t.properties_from_json(serde_json::json!({"topicTemplates": []})).is_err());
//! ```
//!
//! A child type's parent is implied by its path (`["namespaces", "topicSpaces"]` is a child of
//! `["namespaces"]` in the same namespace); the parent must be declared too.
//!
//! How `properties` are treated:
//! - The body's `properties` (or `{}` when absent) is deserialized into `P` with
//!   `serde_path_to_error`; a failure becomes a 400 whose ARM `target` is the JSON path, e.g.
//!   `properties.authenticationMethods[0].method`.
//! - `P` is serialized back, so defaults are filled in and fields marked `skip_deserializing`
//!   (read-only) are ignored on input.
//! - `provisioningState` inside `properties` is owned by the engine: whatever `P` produced is
//!   overwritten on output (turn this off with [`DeclBuilder::provisioning_state`] for types
//!   without one).
//! - The optional [`DeclBuilder::validate`] hook runs after deserialization for rules serde cannot
//!   express (cross-field checks, ranges).
//! - Other top-level fields (`sku`, `identity`, `kind`, …) are declared with
//!   [`DeclBuilder::top_level`] and validated the same way; undeclared top-level fields are ignored
//!   like ARM ignores them.

use std::{borrow::Cow, fmt, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use utoipa::openapi::{RefOr, schema::Schema};

/// A validation failure: the ARM `target` (JSON path in the request body) and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// JSON path of the offending value, e.g. `properties.authenticationMethods[0].method`.
    pub target: String,
    /// Human-readable reason.
    pub message: String,
}

impl ValidationError {
    /// Builds a validation error at `target`.
    pub fn new(target: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.target, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Whether a top-level field is required, optional or not part of the type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Presence {
    /// The field must be in every PUT body.
    Required,
    /// The field may be given; it is stored and returned when given.
    Optional,
    /// The field is not part of this type and is ignored on input.
    #[default]
    Absent,
}

/// The rule a resource name must satisfy (the spec's `pattern`, `minLength`, `maxLength`).
#[derive(Debug, Clone)]
pub struct NameRule {
    /// Regular expression the whole name must match (anchor it with `^…$`).
    pub pattern: String,
    /// Minimum length in characters.
    pub min_len: usize,
    /// Maximum length in characters.
    pub max_len: usize,
    regex: regex::Regex,
}

impl NameRule {
    /// A name rule. Panics on an invalid regex: declarations are static and a test loads them all.
    pub fn new(pattern: &str, min_len: usize, max_len: usize) -> Self {
        let regex = regex::Regex::new(pattern)
            .unwrap_or_else(|e| panic!("invalid name pattern {pattern:?}: {e}"));
        Self {
            pattern: pattern.to_owned(),
            min_len,
            max_len,
            regex,
        }
    }

    /// The ARM default when a spec gives no pattern: 1–90 characters, no path or URL metacharacters.
    pub fn any() -> Self {
        Self::new(r"^[^/?#\\]+$", 1, 90)
    }

    /// Checks `name`; the error message says which rule failed.
    pub fn check(&self, name: &str) -> Result<(), String> {
        let len = name.chars().count();
        if len < self.min_len || len > self.max_len {
            return Err(format!(
                "the name '{name}' must be between {} and {} characters long",
                self.min_len, self.max_len
            ));
        }
        if !self.regex.is_match(name) {
            return Err(format!(
                "the name '{name}' does not match the pattern {}",
                self.pattern
            ));
        }
        Ok(())
    }
}

/// Which verbs and list operations a type supports (GET, PUT and DELETE always exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verbs {
    /// `PATCH` (tags and/or properties merge).
    pub patch: bool,
    /// `GET …/{parent}/{type}` lists the children of one parent (child types).
    pub list_by_parent: bool,
    /// `GET /subscriptions/{s}/resourceGroups/{rg}/providers/{ns}/{type}` (top-level types).
    pub list_by_resource_group: bool,
    /// `GET /subscriptions/{s}/providers/{ns}/{type}` (top-level types).
    pub list_by_subscription: bool,
}

/// Long-running-operation behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lro {
    /// PUT answers 201 + `Azure-AsyncOperation` on create (otherwise 201/200 without a monitor).
    pub async_put: bool,
    /// DELETE answers 202 + `Location` (otherwise 200 when deleted).
    pub async_delete: bool,
}

impl Default for Lro {
    fn default() -> Self {
        Self {
            async_put: true,
            async_delete: true,
        }
    }
}

/// The extra-validation hook of a type whose properties are `P`.
pub type ValidateFn<P> = fn(&P) -> Result<(), ValidationError>;

/// OpenAPI component schemas as utoipa collects them: `(component name, schema)`.
pub type SchemaList = Vec<(String, RefOr<Schema>)>;

/// Type-erased codec for one typed JSON section (`properties`, `sku`, …).
trait SectionCodec: Send + Sync {
    fn normalize(&self, path: &str, value: Value) -> Result<Value, ValidationError>;
    fn schema_name(&self) -> String;
    fn schema(&self) -> RefOr<Schema>;
    fn schemas(&self, out: &mut Vec<(String, RefOr<Schema>)>);
}

struct Typed<P> {
    validate: Option<ValidateFn<P>>,
}

impl<P> SectionCodec for Typed<P>
where
    P: DeserializeOwned + Serialize + utoipa::ToSchema + Send + Sync + 'static,
{
    fn normalize(&self, path: &str, value: Value) -> Result<Value, ValidationError> {
        let typed: P = deserialize_at(path, value)?;
        if let Some(validate) = self.validate {
            validate(&typed)?;
        }
        serde_json::to_value(&typed).map_err(|e| ValidationError::new(path, e.to_string()))
    }

    fn schema_name(&self) -> String {
        P::name().into_owned()
    }

    fn schema(&self) -> RefOr<Schema> {
        P::schema()
    }

    fn schemas(&self, out: &mut Vec<(String, RefOr<Schema>)>) {
        P::schemas(out);
    }
}

/// Deserializes `value` into `T`, reporting the failing JSON path prefixed by `root`.
pub fn deserialize_at<T: DeserializeOwned>(root: &str, value: Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let mut target = root.to_owned();
        for segment in err.path().iter() {
            use serde_path_to_error::Segment;
            match segment {
                Segment::Seq { index } => target.push_str(&format!("[{index}]")),
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    push_field(&mut target, key)
                }
                Segment::Unknown => {}
            }
        }
        let message = err.inner().to_string();
        // serde reports a missing field at the enclosing object; point at the field itself.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            push_field(&mut target, field);
        }
        ValidationError::new(target, message)
    })
}

fn push_field(target: &mut String, key: &str) {
    if !target.is_empty() {
        target.push('.');
    }
    target.push_str(key);
}

/// One declared resource type. Build it with [`ResourceTypeDecl::new`].
#[derive(Clone)]
pub struct ResourceTypeDecl {
    /// Provider namespace, e.g. `Microsoft.IoTOperations`.
    pub namespace: Cow<'static, str>,
    /// Type path segments, e.g. `["instances", "brokers"]`.
    pub type_path: Vec<Cow<'static, str>>,
    /// Supported api-versions, oldest first.
    pub api_versions: Vec<Cow<'static, str>>,
    /// The rule the last name segment must satisfy.
    pub name_rule: NameRule,
    /// Supported verbs and list operations.
    pub verbs: Verbs,
    /// Long-running-operation behaviour.
    pub lro: Lro,
    /// Whether `location` is part of the type.
    pub location: Presence,
    /// Whether `extendedLocation` is part of the type.
    pub extended_location: Presence,
    /// Whether the engine owns `properties.provisioningState`.
    pub provisioning_state: bool,
    /// One-line description used in the OpenAPI document.
    pub description: Cow<'static, str>,
    properties: Arc<dyn SectionCodec>,
    top_level: Vec<(Cow<'static, str>, Presence, Arc<dyn SectionCodec>)>,
}

impl fmt::Debug for ResourceTypeDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceTypeDecl")
            .field("type", &self.type_name())
            .field("api_versions", &self.api_versions)
            .finish_non_exhaustive()
    }
}

/// Builder returned by [`ResourceTypeDecl::new`]; finish with [`DeclBuilder::build`].
pub struct DeclBuilder<P> {
    decl: ResourceTypeDecl,
    validate: Option<ValidateFn<P>>,
}

impl ResourceTypeDecl {
    /// Starts a declaration of `{namespace}/{type_path…}` whose `properties` are `P`.
    ///
    /// Defaults: no api-versions (add some), [`NameRule::any`], GET/PUT/DELETE only, async PUT and
    /// DELETE, no `location`, no `extendedLocation`, engine-owned `provisioningState`.
    #[allow(clippy::new_ret_no_self)] // a builder keeps the typed validation hook type-checked
    pub fn new<P>(namespace: &'static str, type_path: &[&'static str]) -> DeclBuilder<P>
    where
        P: DeserializeOwned + Serialize + utoipa::ToSchema + Send + Sync + 'static,
    {
        assert!(!type_path.is_empty(), "a resource type needs a type path");
        DeclBuilder {
            decl: ResourceTypeDecl {
                namespace: Cow::Borrowed(namespace),
                type_path: type_path.iter().map(|s| Cow::Borrowed(*s)).collect(),
                api_versions: Vec::new(),
                name_rule: NameRule::any(),
                verbs: Verbs::default(),
                lro: Lro::default(),
                location: Presence::Absent,
                extended_location: Presence::Absent,
                provisioning_state: true,
                description: Cow::Borrowed(""),
                properties: Arc::new(Typed::<P> { validate: None }),
                top_level: Vec::new(),
            },
            validate: None,
        }
    }

    /// `Microsoft.EventGrid/namespaces/topicSpaces`.
    pub fn type_name(&self) -> String {
        format!("{}/{}", self.namespace, self.type_path.join("/"))
    }

    /// The parent's type path, if this is a child type.
    pub fn parent_path(&self) -> Option<&[Cow<'static, str>]> {
        (self.type_path.len() > 1).then(|| &self.type_path[..self.type_path.len() - 1])
    }

    /// Is `version` one of the declared api-versions?
    pub fn supports_api_version(&self, version: &str) -> bool {
        self.api_versions.iter().any(|v| v == version)
    }

    /// Normalizes a body's `properties` (absent → `{}`): typed deserialization, the validation hook,
    /// re-serialization. Errors carry the JSON path rooted at `properties`.
    pub fn properties_from_json(&self, value: Value) -> Result<Value, ValidationError> {
        self.properties.normalize("properties", value)
    }

    /// Normalizes the declared top-level sections of a body; returns them as `(field, value)`.
    pub fn top_level_from_json(
        &self,
        body: &serde_json::Map<String, Value>,
    ) -> Result<Vec<(String, Value)>, ValidationError> {
        let mut out = Vec::new();
        for (field, presence, codec) in &self.top_level {
            match body.get(field.as_ref()) {
                Some(Value::Null) | None if *presence == Presence::Required => {
                    return Err(ValidationError::new(
                        field.as_ref(),
                        format!("'{field}' is required"),
                    ));
                }
                Some(Value::Null) | None => {}
                Some(v) => out.push((field.to_string(), codec.normalize(field, v.clone())?)),
            }
        }
        Ok(out)
    }

    /// Names of the declared extra top-level fields.
    pub fn top_level_fields(&self) -> impl Iterator<Item = (&str, Presence)> {
        self.top_level.iter().map(|(f, p, _)| (f.as_ref(), *p))
    }

    /// OpenAPI: the properties schema's component name and all component schemas it needs.
    pub fn properties_schema(&self) -> (String, RefOr<Schema>, SchemaList) {
        let mut deps = Vec::new();
        self.properties.schemas(&mut deps);
        (
            self.properties.schema_name(),
            self.properties.schema(),
            deps,
        )
    }

    /// OpenAPI: schemas of the declared top-level sections (`field`, component name, schema, deps).
    pub fn top_level_schemas(&self) -> Vec<(String, String, RefOr<Schema>, SchemaList)> {
        self.top_level
            .iter()
            .map(|(field, _, codec)| {
                let mut deps = Vec::new();
                codec.schemas(&mut deps);
                (field.to_string(), codec.schema_name(), codec.schema(), deps)
            })
            .collect()
    }
}

impl<P> DeclBuilder<P>
where
    P: DeserializeOwned + Serialize + utoipa::ToSchema + Send + Sync + 'static,
{
    /// Supported api-versions (replaces the list).
    pub fn api_versions(mut self, versions: &[&'static str]) -> Self {
        self.decl.api_versions = versions.iter().map(|v| Cow::Borrowed(*v)).collect();
        self
    }

    /// The name rule for this type's resource names.
    pub fn name_rule(mut self, rule: NameRule) -> Self {
        self.decl.name_rule = rule;
        self
    }

    /// All verb flags at once.
    pub fn verbs(mut self, verbs: Verbs) -> Self {
        self.decl.verbs = verbs;
        self
    }

    /// PATCH supported.
    pub fn patch(mut self, yes: bool) -> Self {
        self.decl.verbs.patch = yes;
        self
    }

    /// Listing the children of one parent supported.
    pub fn list_by_parent(mut self, yes: bool) -> Self {
        self.decl.verbs.list_by_parent = yes;
        self
    }

    /// Listing by resource group supported.
    pub fn list_by_resource_group(mut self, yes: bool) -> Self {
        self.decl.verbs.list_by_resource_group = yes;
        self
    }

    /// Listing by subscription supported.
    pub fn list_by_subscription(mut self, yes: bool) -> Self {
        self.decl.verbs.list_by_subscription = yes;
        self
    }

    /// LRO behaviour of PUT and DELETE.
    pub fn lro(mut self, async_put: bool, async_delete: bool) -> Self {
        self.decl.lro = Lro {
            async_put,
            async_delete,
        };
        self
    }

    /// Whether `location` is required/optional/absent.
    pub fn location(mut self, presence: Presence) -> Self {
        self.decl.location = presence;
        self
    }

    /// Whether `extendedLocation` is required/optional/absent.
    pub fn extended_location(mut self, presence: Presence) -> Self {
        self.decl.extended_location = presence;
        self
    }

    /// Whether the engine sets `properties.provisioningState` (default yes).
    pub fn provisioning_state(mut self, yes: bool) -> Self {
        self.decl.provisioning_state = yes;
        self
    }

    /// Description for the OpenAPI document.
    pub fn description(mut self, text: &'static str) -> Self {
        self.decl.description = Cow::Borrowed(text);
        self
    }

    /// Extra validation after deserialization; return the offending path as `target`.
    pub fn validate(mut self, hook: ValidateFn<P>) -> Self {
        self.validate = Some(hook);
        self
    }

    /// Declares a typed top-level field besides `properties`, e.g. `sku` or `identity`.
    pub fn top_level<T>(mut self, field: &'static str, presence: Presence) -> Self
    where
        T: DeserializeOwned + Serialize + utoipa::ToSchema + Send + Sync + 'static,
    {
        self.decl.top_level.push((
            Cow::Borrowed(field),
            presence,
            Arc::new(Typed::<T> { validate: None }),
        ));
        self
    }

    /// Finishes the declaration.
    pub fn build(mut self) -> ResourceTypeDecl {
        assert!(
            !self.decl.api_versions.is_empty(),
            "{} declares no api-version",
            self.decl.type_name()
        );
        self.decl.properties = Arc::new(Typed::<P> {
            validate: self.validate,
        });
        self.decl
    }
}

/// The set of declared types, looked up by namespace and type path (case-insensitively, like ARM).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    types: Vec<ResourceTypeDecl>,
}

impl Registry {
    /// Builds a registry; panics when a child type's parent is not declared (a static mistake).
    pub fn new(types: Vec<ResourceTypeDecl>) -> Self {
        for t in &types {
            if let Some(parent) = t.parent_path() {
                let found = types.iter().any(|p| {
                    p.namespace.eq_ignore_ascii_case(&t.namespace)
                        && p.type_path.len() == parent.len()
                        && p.type_path
                            .iter()
                            .zip(parent)
                            .all(|(a, b)| a.eq_ignore_ascii_case(b))
                });
                assert!(found, "{} is declared without its parent", t.type_name());
            }
        }
        Self { types }
    }

    /// All declared types.
    pub fn types(&self) -> &[ResourceTypeDecl] {
        &self.types
    }

    /// Finds `{namespace}/{segments…}` (case-insensitive).
    pub fn find<S: AsRef<str>>(
        &self,
        namespace: &str,
        segments: &[S],
    ) -> Option<&ResourceTypeDecl> {
        self.types.iter().find(|t| {
            t.namespace.eq_ignore_ascii_case(namespace)
                && t.type_path.len() == segments.len()
                && t.type_path
                    .iter()
                    .zip(segments)
                    .all(|(a, b)| a.eq_ignore_ascii_case(b.as_ref()))
        })
    }

    /// Is `namespace` served at all?
    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.namespace.eq_ignore_ascii_case(namespace))
    }

    /// Declared types that are direct children of `parent`.
    pub fn children_of<'a>(
        &'a self,
        parent: &'a ResourceTypeDecl,
    ) -> impl Iterator<Item = &'a ResourceTypeDecl> + 'a {
        self.types.iter().filter(move |t| {
            t.namespace.eq_ignore_ascii_case(&parent.namespace)
                && t.parent_path().is_some_and(|p| {
                    p.len() == parent.type_path.len()
                        && p.iter()
                            .zip(&parent.type_path)
                            .all(|(a, b)| a.eq_ignore_ascii_case(b))
                })
        })
    }
}
