//! The engine's rules, through the HTTP surface (in-process, `oneshot`), on SQLite and on a real
//! throwaway Postgres cluster: every test runs once per store.

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Request, StatusCode},
};
use base64::Engine as _;
use http_body_util::BodyExt;
use meridian_api::{
    auth::{Authenticator, Role, RoleGrant},
    engine::{
        Engine, ImmediateProvisioner, Preconditions, RequestContext,
        registry::{NameRule, Presence, ResourceTypeDecl, ValidationError},
    },
    http::{ApiMetrics, AppState, app},
    store::{PostgresStore, SqliteStore, Store},
    test_util::PgCluster,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &[u8] = b"test-secret-test-secret-test-secret";
const V: &str = "2024-01-01";
const RG: &str = "/subscriptions/sub1/resourceGroups/rg1";

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, utoipa::ToSchema)]
enum Mode {
    #[default]
    Fast,
    Slow,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
enum MethodKind {
    X509,
    ServiceAccountToken,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AuthMethod {
    method: MethodKind,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct WidgetProperties {
    size: u32,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    authentication_methods: Vec<AuthMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    provisioning_state: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
struct GadgetProperties {
    #[serde(default)]
    value: String,
}

fn test_types() -> Vec<ResourceTypeDecl> {
    vec![
        ResourceTypeDecl::new::<WidgetProperties>("Microsoft.Test", &["widgets"])
            .api_versions(&["2023-01-01", V])
            .name_rule(NameRule::new(r"^[a-zA-Z0-9-]*$", 2, 20))
            .patch(true)
            .list_by_resource_group(true)
            .list_by_subscription(true)
            .location(Presence::Required)
            .extended_location(Presence::Optional)
            .validate(|p: &WidgetProperties| {
                if p.size > 100 {
                    return Err(ValidationError::new(
                        "properties.size",
                        "size must be at most 100",
                    ));
                }
                Ok(())
            })
            .build(),
        ResourceTypeDecl::new::<GadgetProperties>("Microsoft.Test", &["widgets", "gadgets"])
            .api_versions(&[V])
            .list_by_parent(true)
            .build(),
    ]
}

struct Fixture {
    app: Router,
    engine: Engine,
    auth: Arc<Authenticator>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn with_store(store: Arc<dyn Store>, dir: tempfile::TempDir) -> Self {
        // No inline wait: responses show `Accepted` and clients poll, the path slow provisioners take.
        let engine = Engine::new(store, test_types(), Arc::new(ImmediateProvisioner))
            .with_inline_wait(std::time::Duration::ZERO);
        let auth =
            Arc::new(Authenticator::new("meridian", "meridian-api").with_hs256_secret(SECRET));
        let openapi = Arc::new(meridian_api::openapi::document(engine.registry()));
        let app = app(AppState {
            engine: engine.clone(),
            auth: auth.clone(),
            metrics: Arc::new(ApiMetrics::new()),
            openapi,
        });
        Self {
            app,
            engine,
            auth,
            _dir: dir,
        }
    }

    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        Self::with_store(Arc::new(store), dir).await
    }

    async fn postgres() -> Self {
        let url = PgCluster::shared().fresh_database().await;
        let store = PostgresStore::connect(&url).await.unwrap();
        Self::with_store(Arc::new(store), tempfile::tempdir().unwrap()).await
    }

    fn token(&self, role: Role, scope: &str) -> String {
        self.token_for(
            "alice",
            vec![RoleGrant {
                role,
                scope: scope.into(),
            }],
        )
    }

    fn token_for(&self, subject: &str, grants: Vec<RoleGrant>) -> String {
        self.auth
            .mint(subject, grants, std::time::Duration::from_secs(600))
            .unwrap()
    }

    fn owner(&self) -> String {
        self.token(Role::Owner, "/subscriptions/sub1")
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Body>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .header("content-type", "application/json")
            .body(body.unwrap_or_else(Body::empty))
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, headers, value)
    }

    async fn put(
        &self,
        uri: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let token = self.owner();
        self.call(
            "PUT",
            uri,
            Some(&token),
            Some(Body::from(body.to_string())),
            headers,
        )
        .await
    }

    async fn get(&self, uri: &str) -> (StatusCode, HeaderMap, Value) {
        let token = self.owner();
        self.call("GET", uri, Some(&token), None, &[]).await
    }
}

fn widget(name: &str) -> String {
    format!("{RG}/providers/Microsoft.Test/widgets/{name}")
}

fn q(path: &str) -> String {
    format!("{path}?api-version={V}")
}

fn widget_body(size: u32) -> Value {
    json!({"location": "westeurope", "tags": {"env": "test"}, "properties": {"size": size}})
}

fn assert_arm_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "body: {body}"
    );
}

/// Polls an Azure-AsyncOperation URL (relative, exactly as given) to a terminal status.
async fn poll_to_terminal(f: &Fixture, url: &str) -> Value {
    for _ in 0..200 {
        let (status, _, body) = f.get(url).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if matches!(
            body["status"].as_str(),
            Some("Succeeded" | "Failed" | "Canceled")
        ) {
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("operation {url} never finished");
}

async fn put_create_is_201_with_async_operation_then_update_is_200(f: Fixture) {
    let (status, headers, body) = f.put(&q(&widget("w1")), widget_body(3), &[]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let op = headers["azure-asyncoperation"].to_str().unwrap().to_owned();
    let retry: u64 = headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds");
    assert!(retry >= 1);
    assert_eq!(body["id"], widget("w1"));
    assert_eq!(body["name"], "w1");
    assert_eq!(body["type"], "Microsoft.Test/widgets");
    assert_eq!(body["properties"]["mode"], "Fast", "defaults filled in");
    assert_eq!(body["properties"]["provisioningState"], "Accepted");
    assert_eq!(body["systemData"]["createdBy"], "alice");
    assert_eq!(body["tags"]["env"], "test");
    let done = poll_to_terminal(&f, &op).await;
    assert_eq!(done["status"], "Succeeded");
    assert!(done["endTime"].is_string());
    let (_, _, got) = f.get(&q(&widget("w1"))).await;
    assert_eq!(got["properties"]["provisioningState"], "Succeeded");

    let (status, _, updated) = f.put(&q(&widget("w1")), widget_body(4), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["properties"]["size"], 4);
    assert_eq!(
        updated["systemData"]["createdAt"],
        body["systemData"]["createdAt"]
    );
    assert_ne!(updated["etag"], body["etag"], "etag changes on every write");
}

async fn read_only_provisioning_state_in_input_is_ignored(f: Fixture) {
    let mut b = widget_body(1);
    b["properties"]["provisioningState"] = json!("Failed");
    let (status, _, body) = f.put(&q(&widget("w1")), b, &[]).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["properties"]["provisioningState"], "Accepted");
}

async fn if_match_and_if_none_match_give_412(f: Fixture) {
    let uri = q(&widget("w1"));
    let (s, _, _) = f.put(&uri, widget_body(1), &[("if-match", "*")]).await;
    assert_eq!(
        s,
        StatusCode::PRECONDITION_FAILED,
        "If-Match on an absent resource"
    );
    let (s, headers, created) = f.put(&uri, widget_body(1), &[("if-none-match", "*")]).await;
    assert_eq!(s, StatusCode::CREATED);
    let etag = created["etag"].as_str().unwrap().to_owned();
    assert_eq!(headers["etag"].to_str().unwrap(), etag);
    let (s, _, body) = f.put(&uri, widget_body(2), &[("if-none-match", "*")]).await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    assert_arm_error(&body, "PreconditionFailed");
    let (s, _, _) = f
        .put(&uri, widget_body(2), &[("if-match", "\"stale\"")])
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    let (s, _, body) = f.put(&uri, widget_body(2), &[("if-match", &etag)]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = f.put(&uri, widget_body(3), &[("if-match", &etag)]).await;
    assert_eq!(
        s,
        StatusCode::PRECONDITION_FAILED,
        "old etag is stale after a write"
    );
    let (_, _, now) = f.get(&uri).await;
    assert_eq!(now["properties"]["size"], 2);
    assert_eq!(now["etag"], body["etag"]);
    let token = f.owner();
    let (s, _, _) = f
        .call("DELETE", &uri, Some(&token), None, &[("if-match", &etag)])
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
}

async fn concurrent_puts_with_the_same_if_match_one_wins(f: Fixture) {
    let uri = q(&widget("w1"));
    let (_, _, created) = f.put(&uri, widget_body(1), &[]).await;
    let etag = created["etag"].as_str().unwrap().to_owned();
    let ctx = RequestContext::system("racer");
    let mut tasks = Vec::new();
    for i in 0..6u32 {
        let engine = f.engine.clone();
        let ctx = ctx.clone();
        let pre = Preconditions {
            if_match: Some(etag.clone()),
            if_none_match: None,
        };
        tasks.push(tokio::spawn(async move {
            engine
                .put(&ctx, &widget("w1"), V, widget_body(10 + i), &pre)
                .await
        }));
    }
    let mut ok = 0;
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.status, StatusCode::PRECONDITION_FAILED, "{e}");
                failed += 1;
            }
        }
    }
    assert_eq!((ok, failed), (1, 5));
}

async fn delete_is_202_with_location_monitor_and_cascades(f: Fixture) {
    f.put(&q(&widget("w1")), widget_body(1), &[]).await;
    let gadget = format!("{}/gadgets/g1", widget("w1"));
    let (s, _, _) = f
        .put(&q(&gadget), json!({"properties": {"value": "x"}}), &[])
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = f.owner();
    let (s, headers, _) = f
        .call("DELETE", &q(&widget("w1")), Some(&token), None, &[])
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    let location = headers["location"].to_str().unwrap().to_owned();
    let (s, _, _) = f.get(&location).await;
    assert!(
        s == StatusCode::NO_CONTENT || s == StatusCode::OK,
        "monitor done: {s}"
    );
    let status_url = headers["azure-asyncoperation"].to_str().unwrap().to_owned();
    assert_eq!(
        poll_to_terminal(&f, &status_url).await["status"],
        "Succeeded"
    );
    let (s, _, body) = f.get(&q(&gadget)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "child deleted with its parent");
    assert_arm_error(&body, "ResourceNotFound");
    let (s, _, _) = f.get(&q(&widget("w1"))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = f
        .call("DELETE", &q(&widget("w1")), Some(&token), None, &[])
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "deleting an absent resource");
}

async fn lists_paginate_with_url_safe_skip_tokens(f: Fixture) {
    for i in 0..7 {
        f.put(&q(&widget(&format!("w-{i}"))), widget_body(1), &[])
            .await;
    }
    // Another resource group's widget must not appear in rg1's list.
    f.put(
        &q("/subscriptions/sub1/resourceGroups/rg2/providers/Microsoft.Test/widgets/other"),
        widget_body(1),
        &[],
    )
    .await;
    let mut next = Some(format!(
        "{RG}/providers/Microsoft.Test/widgets?api-version={V}&$top=3"
    ));
    let mut names = Vec::new();
    let mut pages = 0;
    while let Some(url) = next {
        let (s, _, body) = f.get(&url).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        pages += 1;
        for item in body["value"].as_array().unwrap() {
            names.push(item["name"].as_str().unwrap().to_owned());
        }
        next = body["nextLink"].as_str().map(|l| {
            let token = l
                .split("$skipToken=")
                .nth(1)
                .unwrap()
                .split('&')
                .next()
                .unwrap();
            assert!(
                !token.contains('+') && !token.contains('/') && !token.contains('='),
                "{token}"
            );
            // Clients replace the host and api-version; keep path and query.
            let path = l
                .split_once("://")
                .map(|(_, r)| &r[r.find('/').unwrap()..])
                .unwrap();
            path.to_owned()
        });
    }
    assert_eq!(pages, 3);
    names.sort();
    assert_eq!(names, (0..7).map(|i| format!("w-{i}")).collect::<Vec<_>>());
    let (_, _, all) = f
        .get(&format!(
            "/subscriptions/sub1/providers/Microsoft.Test/widgets?api-version={V}"
        ))
        .await;
    assert_eq!(
        all["value"].as_array().unwrap().len(),
        8,
        "subscription list sees both groups"
    );
}

async fn validation_errors_carry_json_path_targets(f: Fixture) {
    let cases = [
        (
            json!({"location": "x", "properties": {"size": 1, "authenticationMethods": [{"method": "X509"}, {"method": "Kerberos"}]}}),
            "properties.authenticationMethods[1].method",
        ),
        (
            json!({"location": "x", "properties": {}}),
            "properties.size",
        ),
        (
            json!({"location": "x", "properties": {"size": "big"}}),
            "properties.size",
        ),
        (
            json!({"location": "x", "properties": {"size": 1000}}),
            "properties.size",
        ),
        (
            json!({"location": "x", "tags": {"a": 1}, "properties": {"size": 1}}),
            "tags.a",
        ),
        (json!({"properties": {"size": 1}}), "location"),
        (
            json!({"location": "x", "extendedLocation": {"name": 1}, "properties": {"size": 1}}),
            "extendedLocation",
        ),
    ];
    for (body, target) in cases {
        let (s, _, err) = f.put(&q(&widget("w1")), body.clone(), &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {err}");
        assert_eq!(err["error"]["target"], target, "{body} -> {err}");
    }
    let (s, _, err) = f
        .put(&q(&widget("no_underscores")), widget_body(1), &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_arm_error(&err, "InvalidResourceName");
    let (s, _, _) = f.put(&q(&widget("a")), widget_body(1), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "too short");
    let (s, _, _) = f.get(&q(&widget("w1"))).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "nothing stored by rejected writes"
    );
}

async fn api_version_missing_or_unsupported_is_400(f: Fixture) {
    let (s, _, body) = f.put(&widget("w1"), widget_body(1), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_arm_error(&body, "MissingApiVersionParameter");
    let (s, _, body) = f
        .get(&format!("{}?api-version=1999-01-01", widget("w1")))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_arm_error(&body, "InvalidApiVersionParameter");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("2023-01-01") && msg.contains(V), "{msg}");
    let (s, _, _) = f
        .get(&format!("{}?api-version=2023-01-01", widget("w1")))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "older supported version accepted");
}

async fn child_without_parent_is_parent_resource_not_found(f: Fixture) {
    let (s, _, body) = f
        .put(
            &q(&format!("{}/gadgets/g1", widget("nope"))),
            json!({"properties": {}}),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_arm_error(&body, "ParentResourceNotFound");
    let (s, _, body) = f.get(&q(&format!("{}/gadgets", widget("nope")))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_arm_error(&body, "ParentResourceNotFound");
}

async fn roles_gate_reads_and_writes(f: Fixture) {
    let uri = q(&widget("w1"));
    let body = || Some(Body::from(widget_body(1).to_string()));
    let (s, _, err) = f.call("GET", &uri, None, None, &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_arm_error(&err, "AuthenticationFailed");
    let reader = f.token(Role::Reader, "/subscriptions/sub1");
    let (s, _, err) = f.call("PUT", &uri, Some(&reader), body(), &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_arm_error(&err, "AuthorizationFailed");
    let other_rg = f.token(Role::Contributor, "/subscriptions/sub1/resourceGroups/rg2");
    let (s, _, _) = f.call("PUT", &uri, Some(&other_rg), body(), &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "grant on another resource group");
    let other_sub = f.token(Role::Owner, "/subscriptions/sub2");
    let (s, _, _) = f.call("GET", &uri, Some(&other_sub), None, &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "grant on another subscription");
    let contributor = f.token(Role::Contributor, "/subscriptions/sub1/resourceGroups/RG1");
    let (s, _, _) = f.call("PUT", &uri, Some(&contributor), body(), &[]).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "resource-group grant, scope compared case-insensitively"
    );
    let (s, _, _) = f.call("GET", &uri, Some(&reader), None, &[]).await;
    assert_eq!(s, StatusCode::OK);

    // Role assignments managed through the API: only Owner may write them.
    let ra = "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.Authorization/roleAssignments/ra1?api-version=2022-04-01";
    let ra_body = json!({"properties": {"roleDefinitionId": "Contributor", "principalId": "bob"}})
        .to_string();
    let (s, _, _) = f
        .call(
            "PUT",
            ra,
            Some(&contributor),
            Some(Body::from(ra_body.clone())),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let bob = f.token_for("bob", vec![]);
    let (s, _, _) = f.call("PUT", &uri, Some(&bob), body(), &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "bob has no role yet");
    let (s, _, b) = f
        .call("PUT", ra, Some(&f.owner()), Some(Body::from(ra_body)), &[])
        .await;
    assert!(s == StatusCode::CREATED || s == StatusCode::OK, "{s} {b}");
    let (s, _, _) = f.call("PUT", &uri, Some(&bob), body(), &[]).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "bob is Contributor through the stored assignment"
    );
    let (s, _, _) = f
        .call(
            "GET",
            &q("/subscriptions/sub1/resourceGroups/rg2/providers/Microsoft.Test/widgets/w2"),
            Some(&bob),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "assignment is scoped to rg1");
    let bad =
        json!({"properties": {"roleDefinitionId": "Emperor", "principalId": "bob"}}).to_string();
    let (s, _, err) = f
        .call("PUT", ra, Some(&f.owner()), Some(Body::from(bad)), &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["target"], "properties.roleDefinitionId");
}

async fn forged_and_expired_tokens_are_401(f: Fixture) {
    let uri = q(&widget("w1"));
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = json!({"sub": "mallory", "iss": "meridian", "aud": "meridian-api",
        "exp": chrono::Utc::now().timestamp() + 600,
        "roles": [{"role": "Owner", "scope": "/subscriptions/sub1"}]});
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims.clone())
    );
    let wrong_key = Authenticator::new("meridian", "meridian-api")
        .with_hs256_secret(b"another-secret-another-secret-00");
    let grants = vec![RoleGrant {
        role: Role::Owner,
        scope: "/subscriptions/sub1".into(),
    }];
    let ten = std::time::Duration::from_secs(600);
    let forged = wrong_key.mint("mallory", grants.clone(), ten).unwrap();
    let wrong_aud = Authenticator::new("meridian", "someone-else")
        .with_hs256_secret(SECRET)
        .mint("m", grants.clone(), ten)
        .unwrap();
    let wrong_iss = Authenticator::new("evil", "meridian-api")
        .with_hs256_secret(SECRET)
        .mint("m", grants.clone(), ten)
        .unwrap();
    let expired = meridian_api::auth::mint_hs256(
        SECRET,
        "meridian",
        "meridian-api",
        "m",
        grants,
        std::time::Duration::ZERO,
    )
    .unwrap();
    // Sleep past the verifier's leeway is too slow; craft an exp far in the past instead.
    let expired = {
        let mut parts: Vec<String> = expired.split('.').map(str::to_owned).collect();
        let mut c: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&parts[1])
                .unwrap(),
        )
        .unwrap();
        c["exp"] = json!(chrono::Utc::now().timestamp() - 3600);
        parts[1] = b64(c);
        let _ = parts;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::from_slice::<Value>(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(&parts[1])
                    .unwrap(),
            )
            .unwrap(),
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    };
    for (what, token, code) in [
        ("alg none", none.as_str(), "InvalidAuthenticationToken"),
        ("wrong key", forged.as_str(), "InvalidAuthenticationToken"),
        (
            "wrong audience",
            wrong_aud.as_str(),
            "InvalidAuthenticationToken",
        ),
        (
            "wrong issuer",
            wrong_iss.as_str(),
            "InvalidAuthenticationToken",
        ),
        ("expired", expired.as_str(), "ExpiredAuthenticationToken"),
        ("garbage", "abc.def", "InvalidAuthenticationToken"),
    ] {
        let (s, _, body) = f
            .call(
                "PUT",
                &uri,
                Some(token),
                Some(Body::from(widget_body(1).to_string())),
                &[],
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_arm_error(&body, code);
    }
    let (s, _, _) = f.get(&uri).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing stored");
}

async fn malformed_json_and_oversized_bodies_are_rejected(f: Fixture) {
    let token = f.owner();
    let uri = q(&widget("w1"));
    for bad in ["{\"location\": ", "[1,2]", "", "{'single': 'quotes'}"] {
        let (s, _, body) = f
            .call("PUT", &uri, Some(&token), Some(Body::from(bad)), &[])
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        assert_arm_error(&body, "InvalidRequestContent");
    }
    let big =
        json!({"location": "x", "properties": {"size": 1, "note": "a".repeat(5 * 1024 * 1024)}})
            .to_string();
    let (s, _, body) = f
        .call("PUT", &uri, Some(&token), Some(Body::from(big)), &[])
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_arm_error(&body, "RequestEntityTooLarge");
    let (s, _, _) = f.get(&uri).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn sql_metacharacters_are_stored_verbatim(f: Fixture) {
    f.put(&q(&widget("w1")), widget_body(1), &[]).await;
    let evil_name = "g'); DROP TABLE resources;--%_\"";
    let evil_value = "'; DELETE FROM resources WHERE '1'='1'; -- \\ % _ \u{0}? ";
    let encoded = meridian_api::engine::path::percent_encode(evil_name);
    let gadget = format!("{}/gadgets/{encoded}", widget("w1"));
    let (s, _, body) = f
        .put(
            &q(&gadget),
            json!({"properties": {"value": evil_value}}),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, _, got) = f.get(&q(&gadget)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["name"], evil_name);
    assert_eq!(got["properties"]["value"], evil_value);
    let (_, _, list) = f.get(&q(&format!("{}/gadgets", widget("w1")))).await;
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    let (s, _, _) = f.get(&q(&widget("w1"))).await;
    assert_eq!(s, StatusCode::OK, "table still there");
}

async fn ids_are_case_insensitive_and_keep_first_casing(f: Fixture) {
    f.put(&q(&widget("MyWidget")), widget_body(1), &[]).await;
    let (s, _, got) = f
        .get(&q(
            "/SUBSCRIPTIONS/sub1/resourcegroups/RG1/providers/microsoft.test/WIDGETS/mywidget",
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["id"], widget("MyWidget"));
    let (s, _, _) = f
        .put(
            &q("/subscriptions/sub1/resourcegroups/rg1/providers/Microsoft.Test/widgets/MYWIDGET"),
            widget_body(2),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "same resource, other casing");
}

async fn patch_merges_tags_and_properties(f: Fixture) {
    f.put(&q(&widget("w1")), json!({"location": "x", "tags": {"a": "1"}, "properties": {"size": 5, "mode": "Slow", "note": "keep"}}), &[]).await;
    let token = f.owner();
    let patch = json!({"tags": {"b": "2"}, "properties": {"size": 6}}).to_string();
    let (s, _, body) = f
        .call(
            "PATCH",
            &q(&widget("w1")),
            Some(&token),
            Some(Body::from(patch)),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["tags"], json!({"b": "2"}));
    assert_eq!(body["properties"]["size"], 6);
    assert_eq!(body["properties"]["mode"], "Slow");
    assert_eq!(body["properties"]["note"], "keep");
    let bad = json!({"properties": {"size": 101}}).to_string();
    let (s, _, err) = f
        .call(
            "PATCH",
            &q(&widget("w1")),
            Some(&token),
            Some(Body::from(bad)),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["target"], "properties.size");
    let (s, _, _) = f
        .call(
            "PATCH",
            &q(&widget("absent")),
            Some(&token),
            Some(Body::from("{}")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn operations_ids_headers_and_metrics(f: Fixture) {
    let token = f.owner();
    let (s, _, body) = f
        .call(
            "GET",
            "/providers/Microsoft.Test/operations?api-version=2024-01-01",
            Some(&token),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        body["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["name"] == "Microsoft.Test/widgets/write")
    );
    let (s, h, _) = f
        .call(
            "GET",
            &q(&widget("zzz")),
            Some(&token),
            None,
            &[("x-ms-client-request-id", "abc-123")],
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(h.contains_key("x-ms-request-id"));
    assert_eq!(h["x-ms-client-request-id"], "abc-123");
    let (s, _, _) = f.call("GET", "/healthz", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = f.call("GET", "/readyz", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, metrics) = f.call("GET", "/metrics", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.contains("meridian_api_requests_total")
            && text.contains("/widgets/{name}")
            && text.contains("status=\"404\""),
        "{text}"
    );
    let (s, _, _) = f.call("GET", "/docs/", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK, "Swagger UI served offline");
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Fixture::sqlite().await).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Fixture::postgres().await).await })*
        }
    };
}

on_both_stores!(
    put_create_is_201_with_async_operation_then_update_is_200,
    read_only_provisioning_state_in_input_is_ignored,
    if_match_and_if_none_match_give_412,
    concurrent_puts_with_the_same_if_match_one_wins,
    delete_is_202_with_location_monitor_and_cascades,
    lists_paginate_with_url_safe_skip_tokens,
    validation_errors_carry_json_path_targets,
    api_version_missing_or_unsupported_is_400,
    child_without_parent_is_parent_resource_not_found,
    roles_gate_reads_and_writes,
    forged_and_expired_tokens_are_401,
    malformed_json_and_oversized_bodies_are_rejected,
    sql_metacharacters_are_stored_verbatim,
    ids_are_case_insensitive_and_keep_first_casing,
    patch_merges_tags_and_properties,
    operations_ids_headers_and_metrics,
);

/// The provisioning seam: a provisioner that refuses makes the resource and its operation Failed.
struct Refusing;

impl meridian_api::engine::Provisioner for Refusing {
    fn provision(
        &self,
        _resource: Value,
    ) -> meridian_api::engine::ProvisionFuture<'_, Result<(), meridian_api::engine::ProvisionError>>
    {
        Box::pin(async {
            Err("no broker node accepted the configuration"
                .to_owned()
                .into())
        })
    }
}

#[tokio::test]
async fn a_fast_provisioner_finishes_before_the_put_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    let engine = Engine::new(
        Arc::new(store),
        test_types(),
        Arc::new(ImmediateProvisioner),
    );
    let ctx = RequestContext::system("tester");
    let out = engine
        .put(
            &ctx,
            &widget("w1"),
            V,
            widget_body(1),
            &Preconditions::default(),
        )
        .await
        .unwrap();
    assert_eq!(out.resource["properties"]["provisioningState"], "Succeeded");
    let got = engine.get(&widget("w1"), Some(V)).await.unwrap();
    assert_eq!(got["properties"]["provisioningState"], "Succeeded");
    let op = engine
        .operation(&out.operation.unwrap().id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(op.status, "Succeeded");
}

#[tokio::test]
async fn failed_provisioning_reaches_failed_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    let engine = Engine::new(Arc::new(store), test_types(), Arc::new(Refusing));
    let ctx = RequestContext::system("tester");
    let out = engine
        .put(
            &ctx,
            &widget("w1"),
            V,
            widget_body(1),
            &Preconditions::default(),
        )
        .await
        .unwrap();
    let op = out.operation.expect("asynchronous type");
    let done = engine
        .wait_operation(&op.id, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(done.status, "Failed");
    assert_eq!(
        done.error.unwrap()["message"],
        "no broker node accepted the configuration"
    );
    let got = engine.get(&widget("w1"), Some(V)).await.unwrap();
    assert_eq!(got["properties"]["provisioningState"], "Failed");
}
