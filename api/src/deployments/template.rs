//! ARM templates: the document model, the checks that run before anything is written, and the
//! deployment order.
//!
//! [`Plan::new`] takes a template and the deployment's parameter values and either returns a plan
//! (resources in dependency order, with their ids) or a [`TemplateError`] naming what is wrong:
//! a missing or disallowed parameter, an unknown resource type or api-version, an unknown function,
//! parameter or variable, a `dependsOn` that names nothing, a dependency cycle, or (for resources whose
//! body does not depend on `reference()`) a body the type's schema rejects.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::expr::{self, Expr, ExprError, Scope};
use crate::engine::registry::ResourceTypeDecl;

/// Top-level resource fields that are template syntax, not part of the resource body.
const TEMPLATE_ONLY_FIELDS: &[&str] = &[
    "type",
    "apiVersion",
    "name",
    "dependsOn",
    "condition",
    "copy",
    "comments",
    "scope",
    "metadata",
];

/// An ARM template (the subset Meridian deploys).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// Declared parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParameterDecl>,
    /// Variables (values may be expressions).
    #[serde(default)]
    pub variables: Map<String, Value>,
    /// Resources; each is a JSON object with `type`, `apiVersion`, `name`, optional `dependsOn`.
    #[serde(default)]
    pub resources: Vec<Value>,
    /// Outputs: `{name: {type, value}}`.
    #[serde(default)]
    pub outputs: BTreeMap<String, OutputDecl>,
}

/// A template parameter declaration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParameterDecl {
    /// `string`, `int`, `bool`, `object`, `array`, `securestring`, `secureObject`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Used when the deployment gives no value.
    #[serde(default)]
    pub default_value: Option<Value>,
    /// When present, the value must be one of these.
    #[serde(default)]
    pub allowed_values: Option<Vec<Value>>,
}

/// A template output.
#[derive(Debug, Clone, Deserialize)]
pub struct OutputDecl {
    /// The declared type.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The value (usually an expression).
    pub value: Value,
}

/// Why a template cannot be deployed; `target` is the JSON path in the deployment body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    /// ARM error code (`InvalidTemplate`, `InvalidTemplateParameter`, `NoRegisteredProviderFound`…).
    pub code: &'static str,
    /// What is wrong, naming the offending item.
    pub message: String,
    /// JSON path of the offending item, e.g. `properties.template.resources[1].dependsOn[0]`.
    pub target: String,
}

impl TemplateError {
    fn new(code: &'static str, target: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            target: target.into(),
        }
    }
}

/// One resource of the plan, with everything known before deployment.
#[derive(Debug, Clone)]
pub struct PlannedResource {
    /// Position in `template.resources`.
    pub index: usize,
    /// `Microsoft.EventGrid/namespaces/topicSpaces`.
    pub full_type: String,
    /// The api-version to deploy with.
    pub api_version: String,
    /// Name segments (`ns1/ts1` → `["ns1", "ts1"]`).
    pub names: Vec<String>,
    /// The full resource id.
    pub id: String,
    /// The raw resource object from the template (expressions not yet evaluated).
    pub raw: Value,
    /// Indices (into `template.resources`) this one waits for.
    pub depends_on: Vec<usize>,
}

impl PlannedResource {
    /// The last name segment.
    pub fn name(&self) -> String {
        self.names.join("/")
    }
}

/// A validated template ready to deploy: resources in dependency order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Subscription of the deployment.
    pub subscription: String,
    /// Resource group of the deployment.
    pub resource_group: String,
    /// Effective parameter values (given or defaults).
    pub parameters: Map<String, Value>,
    /// Evaluated variables.
    pub variables: Map<String, Value>,
    /// Resources in an order where every dependency comes first.
    pub ordered: Vec<PlannedResource>,
    /// The template's outputs (evaluated after deployment).
    pub outputs: BTreeMap<String, OutputDecl>,
}

/// Scope used while planning: parameters and variables resolve, `reference()` does not (yet).
struct PlanScope<'a> {
    subscription: &'a str,
    resource_group: &'a str,
    parameters: &'a Map<String, Value>,
    raw_variables: &'a Map<String, Value>,
    evaluated: std::cell::RefCell<HashMap<String, Value>>,
    visiting: std::cell::RefCell<HashSet<String>>,
}

impl Scope for PlanScope<'_> {
    fn parameter(&self, name: &str) -> Result<Value, ExprError> {
        lookup(self.parameters, name).ok_or_else(|| ExprError::UnknownParameter(name.to_owned()))
    }

    fn variable(&self, name: &str) -> Result<Value, ExprError> {
        let key = self
            .raw_variables
            .keys()
            .find(|k| k.eq_ignore_ascii_case(name))
            .ok_or_else(|| ExprError::UnknownVariable(name.to_owned()))?
            .clone();
        if let Some(v) = self.evaluated.borrow().get(&key) {
            return Ok(v.clone());
        }
        if !self.visiting.borrow_mut().insert(key.clone()) {
            return Err(ExprError::VariableCycle(key));
        }
        let v = expr::eval_value(&self.raw_variables[&key], self)?;
        self.visiting.borrow_mut().remove(&key);
        self.evaluated.borrow_mut().insert(key, v.clone());
        Ok(v)
    }

    fn subscription_id(&self) -> &str {
        self.subscription
    }

    fn resource_group(&self) -> &str {
        self.resource_group
    }

    fn reference(&self, id_or_name: &str, _full: bool) -> Result<Value, ExprError> {
        Err(ExprError::UnknownReference(id_or_name.to_owned()))
    }
}

/// Case-insensitive lookup (ARM names of parameters and variables are case-insensitive).
fn lookup(map: &Map<String, Value>, name: &str) -> Option<Value> {
    map.get(name).cloned().or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    })
}

fn type_matches(kind: &str, v: &Value) -> bool {
    match kind.to_ascii_lowercase().as_str() {
        "string" | "securestring" => v.is_string(),
        "int" => v.is_i64() || v.is_u64(),
        "bool" => v.is_boolean(),
        "object" | "secureobject" => v.is_object(),
        "array" => v.is_array(),
        _ => true,
    }
}

fn expr_error(target: &str, e: ExprError) -> TemplateError {
    let code = match e {
        ExprError::UnknownParameter(_) => "InvalidTemplateParameter",
        _ => "InvalidTemplate",
    };
    TemplateError::new(code, target, e.to_string())
}

/// Checks every expression under `v` statically: syntax and function names.
fn check_expressions(v: &Value, target: &str) -> Result<Vec<Expr>, TemplateError> {
    let mut exprs = Vec::new();
    expr::parse_all(v, &mut exprs).map_err(|e| expr_error(target, e))?;
    for e in &exprs {
        let mut unknown = None;
        e.visit_calls(&mut |name, _| {
            if unknown.is_none() && !expr::FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(name)) {
                unknown = Some(name.to_owned());
            }
        });
        if let Some(name) = unknown {
            return Err(expr_error(target, ExprError::UnknownFunction(name)));
        }
    }
    Ok(exprs)
}

/// Does any expression call `reference()`?
fn uses_reference(exprs: &[Expr]) -> bool {
    let mut found = false;
    for e in exprs {
        e.visit_calls(&mut |name, _| found |= name.eq_ignore_ascii_case("reference"));
    }
    found
}

/// Finds the declared type for `full_type` (case-insensitive).
pub fn find_type<'a>(
    types: &'a [ResourceTypeDecl],
    full_type: &str,
) -> Option<&'a ResourceTypeDecl> {
    let mut parts = full_type.split('/');
    let ns = parts.next().unwrap_or_default();
    let path: Vec<&str> = parts.collect();
    types.iter().find(|t| {
        t.namespace.eq_ignore_ascii_case(ns)
            && t.type_path.len() == path.len()
            && t.type_path
                .iter()
                .zip(&path)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    })
}

impl Plan {
    /// Validates `template` with the deployment's `parameters` (`{name: {value}}`) and orders it.
    pub fn new(
        template: &Value,
        parameters: &Map<String, Value>,
        subscription: &str,
        resource_group: &str,
        types: &[ResourceTypeDecl],
    ) -> Result<Plan, TemplateError> {
        const T: &str = "properties.template";
        let tpl: Template = crate::engine::registry::deserialize_at(T, template.clone())
            .map_err(|e| TemplateError::new("InvalidTemplate", e.target, e.message))?;

        // Parameters: given values (each `{value: …}`), defaults, types and allowed values.
        for name in parameters.keys() {
            if !tpl.parameters.keys().any(|k| k.eq_ignore_ascii_case(name)) {
                return Err(TemplateError::new(
                    "InvalidTemplateParameter",
                    format!("properties.parameters.{name}"),
                    format!("the parameter '{name}' is not declared by the template"),
                ));
            }
        }
        let mut effective = Map::new();
        for (name, decl) in &tpl.parameters {
            let target = format!("properties.parameters.{name}");
            let given = parameters
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.get("value").cloned().unwrap_or(Value::Null));
            let value = match (given, &decl.default_value) {
                (Some(v), _) => v,
                (None, Some(default)) => {
                    check_expressions(default, &format!("{T}.parameters.{name}.defaultValue"))?;
                    default.clone()
                }
                (None, None) => {
                    return Err(TemplateError::new(
                        "InvalidTemplateParameter",
                        target,
                        format!("the template parameter '{name}' has no value and no defaultValue"),
                    ));
                }
            };
            effective.insert(name.clone(), value);
        }
        // Defaults may be expressions over other parameters; evaluate them once all are known.
        let snapshot = effective.clone();
        let empty = Map::new();
        for (name, decl) in &tpl.parameters {
            let target = format!("properties.parameters.{name}");
            let scope = PlanScope {
                subscription,
                resource_group,
                parameters: &snapshot,
                raw_variables: &empty,
                evaluated: Default::default(),
                visiting: Default::default(),
            };
            let v =
                expr::eval_value(&snapshot[name], &scope).map_err(|e| expr_error(&target, e))?;
            if !type_matches(&decl.kind, &v) {
                return Err(TemplateError::new(
                    "InvalidTemplateParameter",
                    target,
                    format!(
                        "the value of parameter '{name}' is not of type '{}'",
                        decl.kind
                    ),
                ));
            }
            if let Some(allowed) = &decl.allowed_values
                && !allowed.contains(&v)
            {
                return Err(TemplateError::new(
                    "InvalidTemplateParameter",
                    target,
                    format!(
                        "the value {v} of parameter '{name}' is not one of the allowed values {}",
                        Value::Array(allowed.clone())
                    ),
                ));
            }
            effective.insert(name.clone(), v);
        }

        // Variables: syntax first, then evaluate them all (catches unknown names and cycles).
        for (name, v) in &tpl.variables {
            check_expressions(v, &format!("{T}.variables.{name}"))?;
        }
        let scope = PlanScope {
            subscription,
            resource_group,
            parameters: &effective,
            raw_variables: &tpl.variables,
            evaluated: Default::default(),
            visiting: Default::default(),
        };
        let mut variables = Map::new();
        for name in tpl.variables.keys() {
            let v = scope
                .variable(name)
                .map_err(|e| expr_error(&format!("{T}.variables.{name}"), e))?;
            variables.insert(name.clone(), v);
        }

        // Resources: type, api-version, name, id.
        let mut planned = Vec::new();
        let mut reference_users = Vec::new();
        for (index, raw) in tpl.resources.iter().enumerate() {
            let at = format!("{T}.resources[{index}]");
            let obj = raw.as_object().ok_or_else(|| {
                TemplateError::new("InvalidTemplate", &at, "a resource must be an object")
            })?;
            let exprs = check_expressions(raw, &at)?;
            let field = |f: &str| -> Result<String, TemplateError> {
                let v = obj.get(f).ok_or_else(|| {
                    TemplateError::new(
                        "InvalidTemplate",
                        format!("{at}.{f}"),
                        format!("the resource has no '{f}'"),
                    )
                })?;
                let v =
                    expr::eval_value(v, &scope).map_err(|e| expr_error(&format!("{at}.{f}"), e))?;
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    TemplateError::new(
                        "InvalidTemplate",
                        format!("{at}.{f}"),
                        format!("'{f}' must be a string"),
                    )
                })
            };
            let full_type = field("type")?;
            let api_version = field("apiVersion")?;
            let name = field("name")?;
            let decl = find_type(types, &full_type).ok_or_else(|| {
                TemplateError::new(
                    "NoRegisteredProviderFound",
                    format!("{at}.type"),
                    format!("the resource type '{full_type}' is not served here"),
                )
            })?;
            if !decl.supports_api_version(&api_version) {
                return Err(TemplateError::new(
                    "InvalidApiVersionParameter",
                    format!("{at}.apiVersion"),
                    format!(
                        "the api-version '{api_version}' is not supported by '{full_type}'; supported: {}",
                        decl.api_versions.join(", ")
                    ),
                ));
            }
            let names: Vec<String> = name.split('/').map(str::to_owned).collect();
            if names.len() != decl.type_path.len() {
                return Err(TemplateError::new(
                    "InvalidTemplate",
                    format!("{at}.name"),
                    format!(
                        "the name '{name}' must have {} segment(s) for the type '{full_type}'",
                        decl.type_path.len()
                    ),
                ));
            }
            if let Err(msg) = decl
                .name_rule
                .check(names.last().map(String::as_str).unwrap_or_default())
            {
                return Err(TemplateError::new(
                    "InvalidResourceName",
                    format!("{at}.name"),
                    msg,
                ));
            }
            let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
            let id = expr::resource_id(subscription, resource_group, &full_type, &names_ref)
                .map_err(|e| expr_error(&format!("{at}.name"), e))?;
            if uses_reference(&exprs) {
                reference_users.push(index);
            } else {
                // Nothing in the body waits for another resource: evaluate and validate it now so a
                // bad body fails the whole deployment before anything is written.
                let body = resource_body(raw, &scope).map_err(|e| expr_error(&at, e))?;
                validate_body(decl, &body, &at)?;
            }
            planned.push(PlannedResource {
                index,
                full_type,
                api_version,
                names,
                id,
                raw: raw.clone(),
                depends_on: Vec::new(),
            });
        }

        // Dependencies: explicit dependsOn, implicit parent (a child waits for its parent when the
        // parent is in the template) and implicit reference() targets.
        let resolve = |target: &str| -> Option<usize> {
            planned
                .iter()
                .find(|p| {
                    p.id.eq_ignore_ascii_case(target)
                        || p.name().eq_ignore_ascii_case(target)
                        || format!("{}/{}", p.full_type, p.name()).eq_ignore_ascii_case(target)
                })
                .map(|p| p.index)
        };
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); planned.len()];
        for p in &planned {
            let at = format!("{T}.resources[{}]", p.index);
            if let Some(list) = p.raw.get("dependsOn") {
                let list = list.as_array().ok_or_else(|| {
                    TemplateError::new(
                        "InvalidTemplate",
                        format!("{at}.dependsOn"),
                        "dependsOn must be an array",
                    )
                })?;
                for (j, d) in list.iter().enumerate() {
                    let dat = format!("{at}.dependsOn[{j}]");
                    let v = expr::eval_value(d, &scope).map_err(|e| expr_error(&dat, e))?;
                    let text = v.as_str().unwrap_or_default();
                    let target = resolve(text).ok_or_else(|| {
                        TemplateError::new(
                            "InvalidTemplate",
                            &dat,
                            format!("dependsOn '{text}' does not name a resource of this template"),
                        )
                    })?;
                    deps[p.index].push(target);
                }
            }
            if p.names.len() > 1 {
                let parent_type = p
                    .full_type
                    .rsplit_once('/')
                    .map(|(a, _)| a)
                    .unwrap_or_default();
                let parent_names: Vec<&str> = p.names[..p.names.len() - 1]
                    .iter()
                    .map(String::as_str)
                    .collect();
                if let Ok(parent_id) =
                    expr::resource_id(subscription, resource_group, parent_type, &parent_names)
                    && let Some(i) = resolve(&parent_id)
                {
                    deps[p.index].push(i);
                }
            }
        }
        for &index in &reference_users {
            let mut targets = Vec::new();
            let mut exprs = Vec::new();
            let _ = expr::parse_all(&tpl.resources[index], &mut exprs);
            for e in &exprs {
                e.visit_calls(&mut |name, args| {
                    if name.eq_ignore_ascii_case("reference")
                        && let Some(arg) = args.first()
                        && let Ok(Value::String(s)) = expr::eval(arg, &scope)
                    {
                        targets.push(s);
                    }
                });
            }
            for t in targets {
                match resolve(&t) {
                    Some(i) => deps[index].push(i),
                    None => {
                        return Err(expr_error(
                            &format!("{T}.resources[{index}]"),
                            ExprError::UnknownReference(t),
                        ));
                    }
                }
            }
        }
        for p in &mut planned {
            let mut d = std::mem::take(&mut deps[p.index]);
            d.sort_unstable();
            d.dedup();
            p.depends_on = d;
        }
        for (name, out) in &tpl.outputs {
            check_expressions(&out.value, &format!("{T}.outputs.{name}"))?;
        }

        let ordered = topo_order(planned)?;
        Ok(Plan {
            subscription: subscription.to_owned(),
            resource_group: resource_group.to_owned(),
            parameters: effective,
            variables,
            ordered,
            outputs: tpl.outputs,
        })
    }
}

/// Orders resources so dependencies come first (stable: template order among independent ones).
/// A cycle is an error naming the resources on it.
fn topo_order(planned: Vec<PlannedResource>) -> Result<Vec<PlannedResource>, TemplateError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        planned: &[PlannedResource],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
        out: &mut Vec<usize>,
    ) -> Result<(), TemplateError> {
        match marks[i] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                let start = stack.iter().position(|&s| s == i).unwrap_or(0);
                let cycle: Vec<String> = stack[start..]
                    .iter()
                    .chain(std::iter::once(&i))
                    .map(|&s| format!("{} '{}'", planned[s].full_type, planned[s].name()))
                    .collect();
                return Err(TemplateError::new(
                    "InvalidTemplate",
                    format!("properties.template.resources[{i}].dependsOn"),
                    format!("circular dependency: {}", cycle.join(" -> ")),
                ));
            }
            Mark::New => {}
        }
        marks[i] = Mark::Active;
        stack.push(i);
        for &d in &planned[i].depends_on {
            visit(d, planned, marks, stack, out)?;
        }
        stack.pop();
        marks[i] = Mark::Done;
        out.push(i);
        Ok(())
    }
    let mut marks = vec![Mark::New; planned.len()];
    let mut order = Vec::new();
    let mut stack = Vec::new();
    for i in 0..planned.len() {
        visit(i, &planned, &mut marks, &mut stack, &mut order)?;
    }
    let mut slots: Vec<Option<PlannedResource>> = planned.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// The resource body sent to the engine: every field except the template-only ones, evaluated.
pub fn resource_body(raw: &Value, scope: &dyn Scope) -> Result<Value, ExprError> {
    let mut body = Map::new();
    if let Some(obj) = raw.as_object() {
        for (k, v) in obj {
            if !TEMPLATE_ONLY_FIELDS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(k))
            {
                body.insert(k.clone(), expr::eval_value(v, scope)?);
            }
        }
    }
    Ok(Value::Object(body))
}

/// Runs the type's own checks on a body: `properties`, declared top-level sections, location flags.
pub fn validate_body(decl: &ResourceTypeDecl, body: &Value, at: &str) -> Result<(), TemplateError> {
    use crate::engine::registry::Presence;
    let obj = body.as_object().cloned().unwrap_or_default();
    let props = obj
        .get("properties")
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    decl.properties_from_json(props).map_err(|e| {
        TemplateError::new(
            "InvalidRequestContent",
            format!("{at}.{}", e.target),
            e.message,
        )
    })?;
    decl.top_level_from_json(&obj).map_err(|e| {
        TemplateError::new(
            "InvalidRequestContent",
            format!("{at}.{}", e.target),
            e.message,
        )
    })?;
    for (field, presence) in [
        ("location", decl.location),
        ("extendedLocation", decl.extended_location),
    ] {
        if presence == Presence::Required && obj.get(field).is_none_or(Value::is_null) {
            return Err(TemplateError::new(
                "InvalidRequestContent",
                format!("{at}.{field}"),
                format!("'{field}' is required for {}", decl.type_name()),
            ));
        }
    }
    Ok(())
}
