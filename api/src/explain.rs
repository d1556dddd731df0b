//! `POST /meridian/authz/explain`: "may client C, with these attributes, publish/subscribe T on
//! broker B, and which rule or binding decides?"
//!
//! The broker's desired state is compiled from the store exactly as it is pushed to nodes
//! ([`crate::compile::compile_broker`], one consistent read), turned into a policy engine by the
//! same conversion nodes use ([`meridian_policy::snapshot::broker_engine`]) and asked for an
//! [`meridian_policy::Explanation`]. The caller needs **Reader** on the broker's scope.

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use meridian_policy::{Action, Principal};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    auth::Role,
    compile::{CompileError, compile_broker, parse_broker_id},
    error::ApiError,
    http::{AppState, authenticate, authorize},
};

/// The question.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExplainRequest {
    /// ARM id of the broker (`…/instances/{i}/brokers/{b}` or MQ 2023 `…/mq/{m}/broker/{b}`).
    pub broker_id: String,
    /// The MQTT client identifier.
    pub client_id: String,
    /// The username the client authenticated as (password user, certificate CN, token `sub`).
    #[serde(default)]
    pub username: Option<String>,
    /// Attributes from authentication (IoT Operations rules).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// An Event Grid namespace bound to the broker: the client is judged by its bindings.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Event Grid authentication name (with `namespace`; default: the client id).
    #[serde(default)]
    pub authentication_name: Option<String>,
    /// `Connect`, `Publish` or `Subscribe`.
    pub action: String,
    /// Topic (Publish) or filter (Subscribe); ignored for Connect.
    #[serde(default)]
    pub topic: Option<String>,
    /// Only these IoT Operations authorizations (names, as listener ports reference them);
    /// default: all of the broker's.
    #[serde(default)]
    pub authorizations: Option<Vec<String>>,
}

/// The route, authenticated and authorized like the rest of the API.
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/meridian/authz/explain", post(explain))
        .with_state(app)
}

fn invalid(message: impl Into<String>, target: &str) -> ApiError {
    ApiError::bad_request("InvalidRequestContent", message).with_target(target)
}

async fn explain(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let principal = authenticate(&app, &headers)?;
    let req: ExplainRequest = serde_json::from_slice(&body).map_err(|e| {
        let target = e
            .to_string()
            .split('`')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        invalid(
            format!("The request content is not an explain request: {e}."),
            &target,
        )
    })?;
    let action = match req.action.to_ascii_lowercase().as_str() {
        "connect" => Action::Connect,
        "publish" => Action::Publish,
        "subscribe" => Action::Subscribe,
        _ => {
            return Err(invalid(
                format!(
                    "action '{}' is not one of Connect, Publish, Subscribe.",
                    req.action
                ),
                "action",
            ));
        }
    };
    let topic = req.topic.clone().unwrap_or_default();
    if action != Action::Connect && topic.is_empty() {
        return Err(invalid(format!("{:?} needs a topic.", action), "topic"));
    }
    if req.client_id.is_empty() {
        return Err(invalid("clientId must not be empty.", "clientId"));
    }
    let Some((_, _, scope)) = parse_broker_id(&req.broker_id) else {
        return Err(ApiError::bad_request(
            "InvalidBrokerId",
            CompileError::NotABroker(req.broker_id.clone()).to_string(),
        )
        .with_target("brokerId"));
    };
    authorize(
        &app,
        &principal,
        Role::Reader,
        &scope.subscription,
        scope.resource_group.as_deref(),
        "Meridian/authz/explain/action",
    )
    .await?;
    let snap = match compile_broker(app.engine.store().as_ref(), &req.broker_id).await {
        Ok(s) => s,
        Err(CompileError::BrokerNotFound(_)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                format!("The broker '{}' was not found.", req.broker_id),
            )
            .with_target("brokerId"));
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "InvalidConfiguration",
                e.to_string(),
            ));
        }
    };
    let engine = meridian_policy::snapshot::broker_engine(&snap, req.authorizations.as_deref())
        .map_err(|e| {
            ApiError::new(StatusCode::CONFLICT, "InvalidConfiguration", e.message)
                .with_target(e.resource_id)
        })?;
    let mut who = Principal::new(&req.client_id);
    who.username = req.username.clone();
    who.attributes = req.attributes.clone();
    if let Some(ns) = &req.namespace {
        let Some(bound) = snap
            .namespaces
            .iter()
            .find(|n| n.name.eq_ignore_ascii_case(ns))
        else {
            return Err(invalid(
                format!("namespace '{ns}' is not bound to this broker."),
                "namespace",
            ));
        };
        who = who.in_namespace(
            bound.name.clone(),
            req.authentication_name
                .clone()
                .unwrap_or_else(|| req.client_id.clone()),
        );
    }
    let explanation = engine.explain(&who, action, &topic);
    Ok(Json(json!({
        "allowed": explanation.decision.allowed,
        "brokerId": snap.broker_id,
        "principal": who,
        "explanation": explanation,
    })))
}

// ---------------------------------------------------------------------------------------------
// `meridian authz explain`

/// `meridian authz explain`: asks a running control plane.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// ARM id of the broker.
    #[arg(long)]
    pub broker: String,
    /// The MQTT client identifier.
    #[arg(long)]
    pub client_id: String,
    /// The authenticated username.
    #[arg(long)]
    pub username: Option<String>,
    /// An attribute `key=value` (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE")]
    pub attributes: Vec<String>,
    /// Judge the client as an Event Grid client of this namespace (bound to the broker).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Event Grid authentication name (default: the client id).
    #[arg(long)]
    pub authentication_name: Option<String>,
    /// Ask about PUBLISH to this topic.
    #[arg(long, group = "what")]
    pub publish: Option<String>,
    /// Ask about SUBSCRIBE to this filter.
    #[arg(long, group = "what")]
    pub subscribe: Option<String>,
    /// Ask about CONNECT.
    #[arg(long, group = "what")]
    pub connect: bool,
    /// Print the control plane's JSON answer instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Base URL of the Meridian API.
    #[arg(long, env = "MERIDIAN_URL", default_value = "https://127.0.0.1:8443")]
    pub url: String,
    /// Bearer token (Reader on the broker's scope; see `meridian token`).
    #[arg(long, env = "MERIDIAN_TOKEN")]
    pub token: String,
    /// PEM file of the CA that signed the API's certificate.
    #[arg(long, env = "MERIDIAN_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// Why `meridian authz explain` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ExplainCliError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The CA file could not be read or parsed.
    #[error("--ca-file {path}: {message}")]
    CaFile { path: String, message: String },
    /// The request failed on the way.
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The control plane refused the question.
    #[error("the control plane answered {status}: {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

/// Sends the question; returns the control plane's answer (`allowed`, `explanation`, ...).
pub async fn run_explain(args: &ExplainArgs) -> Result<Value, ExplainCliError> {
    let (action, topic) = match (&args.publish, &args.subscribe, args.connect) {
        (Some(t), None, false) => ("Publish", Some(t.clone())),
        (None, Some(t), false) => ("Subscribe", Some(t.clone())),
        (None, None, true) => ("Connect", None),
        _ => {
            return Err(ExplainCliError::Usage(
                "give exactly one of --publish TOPIC, --subscribe FILTER, --connect".into(),
            ));
        }
    };
    let mut attributes = BTreeMap::new();
    for a in &args.attributes {
        let Some((k, v)) = a.split_once('=') else {
            return Err(ExplainCliError::Usage(format!(
                "--attr {a:?}: expected KEY=VALUE"
            )));
        };
        attributes.insert(k.to_owned(), v.to_owned());
    }
    let mut client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(ca) = &args.ca_file {
        let fail = |message: String| ExplainCliError::CaFile {
            path: ca.display().to_string(),
            message,
        };
        let pem = std::fs::read(ca).map_err(|e| fail(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(e.to_string()))?;
        client = client.tls_certs_only(certs);
    }
    let resp = client
        .build()?
        .post(format!(
            "{}/meridian/authz/explain",
            args.url.trim_end_matches('/')
        ))
        .bearer_auth(&args.token)
        .json(&json!({
            "brokerId": args.broker, "clientId": args.client_id, "username": args.username,
            "attributes": attributes, "namespace": args.namespace,
            "authenticationName": args.authentication_name, "action": action, "topic": topic,
        }))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status != 200 {
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or("Unknown")
            .to_owned();
        let mut message = body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(t) = body["error"]["target"].as_str() {
            message.push_str(&format!(" (target: {t})"));
        }
        return Err(ExplainCliError::Api {
            status,
            code,
            message,
        });
    }
    Ok(body)
}

/// The answer for people: the verdict, what decided it, and every candidate with its outcome.
pub fn render_explanation(answer: &Value) -> String {
    let e = &answer["explanation"];
    let allowed = answer["allowed"].as_bool().unwrap_or(false);
    let action = e["action"].as_str().unwrap_or("?");
    let topic = e["topic"]
        .as_str()
        .map(|t| format!(" {t}"))
        .unwrap_or_default();
    let who = &answer["principal"];
    let mut out = format!(
        "{} {action}{topic} for client {}{}\n",
        if allowed { "ALLOW" } else { "DENY" },
        who["clientId"].as_str().unwrap_or("?"),
        who["namespace"]
            .as_str()
            .map(|n| format!(" (Event Grid namespace {n})"))
            .unwrap_or_default(),
    );
    match &e["decision"]["by"] {
        Value::Null => out.push_str(&format!(
            "  decided by: nothing grants it ({})\n",
            e["decision"]["reason"]
                .as_str()
                .unwrap_or("deny by default")
        )),
        by => out.push_str(&format!("  decided by: {}\n", compact(by))),
    }
    if let Some(considered) = e["considered"].as_array() {
        for c in considered {
            out.push_str(&format!(
                "  - {}: {} {}\n",
                compact(&c["rule"]),
                c["outcome"].as_str().unwrap_or("?"),
                c["detail"].as_str().unwrap_or_default()
            ));
        }
    }
    out
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={}", compact(other)),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}
