//! Broker nodes, the pusher and node-backed provisioning, end to end inside the control plane:
//! resources are written through the engine (the path the HTTP handlers take), nodes are either
//! in-process `SnapshotSink`s ([`TestNode`]) or a real HTTP server speaking the node protocol
//! ([`HttpNode`]), and the node routes are called through the router. The provisioning tests run
//! on SQLite and on a throwaway Postgres cluster.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Request, StatusCode},
    response::{IntoResponse, Response},
    routing::put,
};
use http_body_util::BodyExt;
use meridian_api::{
    auth::{Authenticator, Role, RoleGrant},
    engine::{Engine, Preconditions, RequestContext},
    http::{ApiMetrics, AppState, app_with_nodes},
    nodes::{NodeConfig, NodeProvisioner, NodeRegistry},
    store::{OperationRecord, PostgresStore, SqliteStore, Store},
    test_util::PgCluster,
};
use meridian_contract::{
    Applied, BrokerSnapshot, NodeHealth, NodeReport, Rejection, SnapshotSink, node::ApplyFuture,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;

const SECRET: &[u8] = b"nodes-test-secret-nodes-test-secret";
const SUB: &str = "/subscriptions/sub1";
const RG: &str = "/subscriptions/sub1/resourceGroups/rg1";
const AIO_V: &str = "2024-11-01";
const EG_V: &str = "2025-02-15";
const WAIT: Duration = Duration::from_secs(20);

fn instance() -> String {
    format!("{RG}/providers/Microsoft.IoTOperations/instances/inst1")
}

fn broker() -> String {
    format!("{}/brokers/default", instance())
}

fn listener(name: &str) -> String {
    format!("{}/listeners/{name}", broker())
}

fn custom_location() -> Value {
    json!({"name": format!("{RG}/providers/Microsoft.ExtendedLocation/customLocations/edge"), "type": "CustomLocation"})
}

fn instance_body() -> Value {
    json!({"location": "westeurope", "extendedLocation": custom_location(), "properties": {
        "schemaRegistryRef": {"resourceId": format!("{RG}/providers/Microsoft.DeviceRegistry/schemaRegistries/sr")}
    }})
}

fn listener_body(port: u16) -> Value {
    json!({"extendedLocation": custom_location(), "properties": {"ports": [{"port": port}]}})
}

// ---------------------------------------------------------------------------------------------
// An in-process node

#[derive(Default)]
struct TestNodeState {
    applied: u64,
    digest: String,
    snapshots: Vec<BrokerSnapshot>,
    reject: Option<(Option<String>, String)>,
    hold: bool,
}

/// A node that records what it applies and can be told to reject or to never answer.
struct TestNode {
    broker_id: String,
    state: Mutex<TestNodeState>,
    applies: watch::Sender<usize>,
}

impl TestNode {
    fn new(broker_id: &str) -> Arc<Self> {
        Arc::new(Self {
            broker_id: broker_id.to_owned(),
            state: Mutex::new(TestNodeState::default()),
            applies: watch::channel(0).0,
        })
    }

    fn reject_with(&self, resource_id: Option<&str>, message: &str) {
        self.state.lock().unwrap().reject =
            Some((resource_id.map(str::to_owned), message.to_owned()));
    }

    fn accept(&self) {
        self.state.lock().unwrap().reject = None;
    }

    fn hold(&self) {
        self.state.lock().unwrap().hold = true;
    }

    /// Forgets what it serves, like a node restarted without its stored snapshot.
    fn forget(&self) {
        let mut st = self.state.lock().unwrap();
        st.applied = 0;
        st.digest.clear();
    }

    fn applied(&self) -> u64 {
        self.state.lock().unwrap().applied
    }

    fn snapshots(&self) -> Vec<BrokerSnapshot> {
        self.state.lock().unwrap().snapshots.clone()
    }

    fn latest(&self) -> Option<BrokerSnapshot> {
        self.state.lock().unwrap().snapshots.last().cloned()
    }

    /// Waits until the latest applied snapshot satisfies `pred`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&BrokerSnapshot) -> bool) -> BrokerSnapshot {
        let mut rx = self.applies.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(s) = self.latest().filter(|s| pred(s)) {
                return s;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => panic!(
                    "node never applied a snapshot where {what}; it has {:?}",
                    self.latest()
                ),
            }
        }
    }

    /// Waits until it has applied `n` snapshots in all.
    async fn wait_applies(&self, n: usize) {
        let mut rx = self.applies.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|count| *count >= n))
            .await
            .unwrap_or_else(|_| panic!("node applied fewer than {n} snapshots"))
            .unwrap();
    }

    fn report_for(&self, endpoint: &str) -> NodeReport {
        let st = self.state.lock().unwrap();
        NodeReport {
            broker_id: self.broker_id.clone(),
            endpoint: endpoint.to_owned(),
            applied_generation: st.applied,
            applied_digest: st.digest.clone(),
            health: NodeHealth::Healthy,
            connected_clients: 3,
            errors: Vec::new(),
        }
    }

    async fn apply_now(&self, snapshot: BrokerSnapshot) -> Result<Applied, Rejection> {
        let hold = self.state.lock().unwrap().hold;
        if hold {
            std::future::pending::<()>().await;
        }
        let mut st = self.state.lock().unwrap();
        if snapshot.generation <= st.applied {
            return Ok(Applied {
                applied_generation: st.applied,
            });
        }
        if let Some((resource_id, message)) = &st.reject {
            return Err(Rejection {
                generation: snapshot.generation,
                resource_id: resource_id.clone(),
                message: message.clone(),
            });
        }
        let generation = snapshot.generation;
        st.applied = generation;
        st.digest = snapshot.digest();
        st.snapshots.push(snapshot);
        let n = st.snapshots.len();
        drop(st);
        self.applies.send_replace(n);
        Ok(Applied {
            applied_generation: generation,
        })
    }
}

impl SnapshotSink for TestNode {
    fn apply(&self, snapshot: BrokerSnapshot) -> ApplyFuture<'_> {
        Box::pin(self.apply_now(snapshot))
    }

    fn report(&self) -> NodeReport {
        self.report_for("in-process")
    }
}

// ---------------------------------------------------------------------------------------------
// The same node behind HTTP

#[derive(Clone)]
struct HttpNodeState {
    node: Arc<TestNode>,
    token: Arc<Mutex<String>>,
    fail_next: Arc<AtomicU32>,
    pushes: Arc<AtomicU32>,
}

/// A stand-in for `meridian broker`'s agent: serves `PUT /v1/snapshot` on an ephemeral port and
/// checks the bearer token it reported with.
struct HttpNode {
    state: HttpNodeState,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn snapshot_route(
    State(s): State<HttpNodeState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.pushes.fetch_add(1, Ordering::SeqCst);
    let expected = format!("Bearer {}", s.token.lock().unwrap());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if s.fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let snapshot = match BrokerSnapshot::from_json(&body) {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match s.node.apply_now(snapshot).await {
        Ok(a) => Json(a).into_response(),
        Err(r) => (StatusCode::UNPROCESSABLE_ENTITY, Json(r)).into_response(),
    }
}

impl HttpNode {
    async fn start(node: Arc<TestNode>) -> Self {
        let state = HttpNodeState {
            node,
            token: Arc::new(Mutex::new(String::new())),
            fail_next: Arc::new(AtomicU32::new(0)),
            pushes: Arc::new(AtomicU32::new(0)),
        };
        let app = Router::new()
            .route("/v1/snapshot", put(snapshot_route))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            state,
            addr,
            stop: Some(stop),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn node(&self) -> &Arc<TestNode> {
        &self.state.node
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Reports through the control plane's route, as the node's agent would.
    async fn report(&self, w: &World, node_id: &str, token: &str) -> (StatusCode, Value) {
        *self.state.token.lock().unwrap() = token.to_owned();
        let report = self.node().report_for(&self.endpoint());
        w.call(
            "PUT",
            &format!("/meridian/nodes/{node_id}"),
            Some(token),
            Some(serde_json::to_value(report).unwrap()),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// The control plane under test

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct World {
    engine: Engine,
    nodes: NodeRegistry,
    app: Router,
    auth: Arc<Authenticator>,
    store: Arc<dyn Store>,
    _dir: Option<Arc<tempfile::TempDir>>,
}

fn test_config() -> NodeConfig {
    let mut c = NodeConfig::with_report_interval(Duration::from_secs(1));
    c.provision_timeout = Duration::from_secs(30);
    c.push_timeout = Duration::from_secs(2);
    c.retry_initial = Duration::from_millis(20);
    c.retry_max = Duration::from_millis(200);
    c
}

impl World {
    async fn new(backend: Backend, config: NodeConfig) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
                Self::over(Arc::new(store), Some(Arc::new(dir)), config)
            }
            Backend::Postgres => {
                let url = PgCluster::shared().fresh_database().await;
                let store = PostgresStore::connect(&url).await.unwrap();
                Self::over(Arc::new(store), None, config)
            }
        }
    }

    /// A control plane over `store` (a second one over the same store is a restart).
    fn over(
        store: Arc<dyn Store>,
        dir: Option<Arc<tempfile::TempDir>>,
        config: NodeConfig,
    ) -> Self {
        let nodes = NodeRegistry::new(store.clone(), config);
        let engine = Engine::new(
            store.clone(),
            meridian_api::resources::all_types(),
            Arc::new(NodeProvisioner::new(nodes.clone())),
        );
        let auth =
            Arc::new(Authenticator::new("meridian", "meridian-api").with_hs256_secret(SECRET));
        let app = app_with_nodes(
            AppState {
                engine: engine.clone(),
                auth: auth.clone(),
                metrics: Arc::new(ApiMetrics::new()),
                openapi: Arc::new(meridian_api::openapi::document(engine.registry())),
            },
            nodes.clone(),
        );
        Self {
            engine,
            nodes,
            app,
            auth,
            store,
            _dir: dir,
        }
    }

    fn restart(&self, config: NodeConfig) -> Self {
        Self::over(self.store.clone(), self._dir.clone(), config)
    }

    fn token(&self, role: Role, scope: &str) -> String {
        self.auth
            .mint(
                "node-agent",
                vec![RoleGrant {
                    role,
                    scope: scope.to_owned(),
                }],
                Duration::from_secs(600),
            )
            .unwrap()
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let req = req
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    /// PUTs through the engine; returns (etag, operation id).
    async fn put(&self, id: &str, body: Value) -> (String, String) {
        let version = if id.contains("Microsoft.EventGrid") {
            EG_V
        } else {
            AIO_V
        };
        let out = self
            .engine
            .put(
                &RequestContext::system("test"),
                id,
                version,
                body,
                &Preconditions::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("PUT {id}: {e}"));
        (
            out.resource["etag"].as_str().unwrap().to_owned(),
            out.operation.expect("asynchronous PUT").id,
        )
    }

    async fn delete(&self, id: &str) {
        let out = self
            .engine
            .delete(id, AIO_V, &Preconditions::default())
            .await
            .unwrap();
        assert!(out.deleted, "DELETE {id}");
    }

    async fn finished(&self, op: &str) -> OperationRecord {
        self.engine.wait_operation(op, WAIT).await.unwrap()
    }

    async fn status(&self, op: &str) -> String {
        self.engine.operation(op).await.unwrap().unwrap().status
    }

    async fn provisioning_state(&self, id: &str) -> String {
        let r = self.engine.get(id, Some(AIO_V)).await.unwrap();
        r["properties"]["provisioningState"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The instance and its broker, with no node registered: both provision at once.
    async fn instance_and_broker(&self) {
        let (_, op) = self.put(&instance(), instance_body()).await;
        assert_eq!(self.finished(&op).await.status, "Succeeded");
        let (_, op) = self
            .put(
                &broker(),
                json!({"extendedLocation": custom_location(), "properties": {}}),
            )
            .await;
        assert_eq!(self.finished(&op).await.status, "Succeeded");
    }

    fn local(&self, node_id: &str) -> Arc<TestNode> {
        let node = TestNode::new(&broker());
        self.nodes
            .register_local(node_id, &broker(), node.clone())
            .unwrap();
        node
    }

    fn node_state(&self, node_id: &str) -> String {
        self.nodes
            .nodes(None)
            .into_iter()
            .find(|n| n.node_id == node_id)
            .map(|n| n.state)
            .unwrap_or_default()
    }
}

fn has_listener(s: &BrokerSnapshot, name: &str) -> bool {
    s.listener(name).is_some()
}

// ---------------------------------------------------------------------------------------------
// Tests (on both stores)

async fn a_listener_reaches_both_nodes_and_then_succeeds(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    let desired = w.nodes.desired_generation(&broker());
    assert!(
        desired > 0,
        "a broker without nodes still has its desired state stored"
    );

    let n1 = w.local("n1");
    let n2 = w.local("n2");
    // Newly registered nodes are brought to the current desired snapshot.
    for n in [&n1, &n2] {
        let s = n
            .wait_for("the broker is served", |s| s.generation == desired)
            .await;
        assert_eq!(s.broker_id, broker());
    }

    let (etag, op) = w.put(&listener("one"), listener_body(1883)).await;
    let done = w.finished(&op).await;
    assert_eq!(done.status, "Succeeded", "{:?}", done.error);
    assert_eq!(w.provisioning_state(&listener("one")).await, "Succeeded");
    let generation = w.nodes.desired_generation(&broker());
    assert!(generation > desired);
    for n in [&n1, &n2] {
        // Succeeded means applied already: no waiting here.
        let s = n.latest().unwrap();
        assert_eq!(s.generation, generation);
        assert!(has_listener(&s, "one"));
        assert!(s.includes_source(&listener("one"), &etag));
        assert_eq!(s.listener("one").unwrap().ports[0].port, 1883);
    }
    let views = w.nodes.nodes(Some(&broker().to_uppercase()));
    assert_eq!(views.len(), 2, "broker ids compare case-insensitively");
    assert!(views.iter().all(|v| v.state == "Healthy"));
}

async fn a_rejecting_node_fails_the_resource_with_its_reason(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    let good = w.local("good");
    let picky = w.local("picky");
    picky.reject_with(
        Some(&listener("one")),
        "listener one: certificate does not parse",
    );

    let (_, op) = w.put(&listener("one"), listener_body(1883)).await;
    let done = w.finished(&op).await;
    assert_eq!(done.status, "Failed");
    let error = done.error.unwrap();
    assert_eq!(error["code"], "ConfigurationRejected");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("listener one: certificate does not parse") && message.contains("picky"),
        "{message}"
    );
    assert_eq!(error["target"], listener("one"));
    assert_eq!(w.provisioning_state(&listener("one")).await, "Failed");
    assert!(
        has_listener(&good.latest().unwrap(), "one"),
        "the push went to every node"
    );
    assert!(picky.snapshots().iter().all(|s| !has_listener(s, "one")));

    // Once the node accepts, a corrected PUT goes through.
    picky.accept();
    let (_, op) = w.put(&listener("one"), listener_body(1884)).await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");
    assert_eq!(
        picky.latest().unwrap().listener("one").unwrap().ports[0].port,
        1884
    );
}

async fn a_silent_node_turns_unhealthy_and_stops_holding_up_provisioning(b: Backend) {
    let mut config = test_config();
    config.unhealthy_after = Duration::from_secs(3);
    let w = World::new(b, config).await;
    w.instance_and_broker().await;
    let token = w.token(Role::Contributor, RG);
    let mut remote = HttpNode::start(TestNode::new(&broker())).await;
    let (status, answer) = remote.report(&w, "remote", &token).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let local = w.local("local");

    let (_, op) = w.put(&listener("one"), listener_body(1883)).await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");
    assert!(
        has_listener(&remote.node().latest().unwrap(), "one"),
        "pushed over HTTP with the node's token"
    );

    // The remote node goes away right after a last report.
    remote.stop();
    let before_report = Instant::now();
    let (status, _) = remote.report(&w, "remote", &token).await;
    assert_eq!(status, StatusCode::OK);
    let (_, op) = w.put(&listener("two"), listener_body(1884)).await;
    local
        .wait_for("two is served", |s| has_listener(s, "two"))
        .await;
    // (Only checkable while the node is surely still live: the machine may be slow.)
    if before_report.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            w.status(&op).await,
            "Provisioning",
            "a live node that has not applied holds provisioning up"
        );
        assert_eq!(w.node_state("remote"), "Healthy");
    }
    let done = w.finished(&op).await;
    assert_eq!(done.status, "Succeeded", "{:?}", done.error);
    assert!(
        before_report.elapsed() >= Duration::from_secs(3),
        "provisioning waited for the node until it was unhealthy"
    );
    assert_eq!(w.node_state("remote"), "Unhealthy");
    let (status, list) = w
        .call(
            "GET",
            "/meridian/nodes",
            Some(&w.token(Role::Reader, SUB)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let states: Vec<(&str, &str)> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["nodeId"].as_str().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("local", "Healthy"), ("remote", "Unhealthy")]);

    // While unhealthy it holds nothing up.
    let (_, op) = w.put(&listener("three"), listener_body(1885)).await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");

    // Back (on a new address, behind): it reports its old generation and is brought up to date.
    let back = HttpNode::start(remote.node().clone()).await;
    let (status, answer) = back.report(&w, "remote", &token).await;
    assert_eq!(status, StatusCode::OK);
    let desired = w.nodes.desired_generation(&broker());
    assert_eq!(answer["desiredGeneration"], desired);
    let s = back
        .node()
        .wait_for("it caught up", |s| s.generation == desired)
        .await;
    assert!(has_listener(&s, "two") && has_listener(&s, "three"));
    assert_eq!(w.node_state("remote"), "Healthy");
}

async fn an_identical_re_put_makes_no_new_generation(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    let n1 = w.local("n1");
    let (_, op) = w.put(&listener("one"), listener_body(1883)).await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");
    let generation = w.nodes.desired_generation(&broker());
    let pushes = n1.snapshots().len();

    let (etag, op) = w.put(&listener("one"), listener_body(1883)).await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");
    assert_eq!(w.nodes.desired_generation(&broker()), generation);
    assert_eq!(n1.snapshots().len(), pushes, "nothing was pushed");
    let desired = w.nodes.desired_snapshot(&broker()).unwrap();
    assert!(
        desired.includes_source(&listener("one"), &etag),
        "the new etag counts as applied at the same generation"
    );
}

async fn delete_pushes_a_snapshot_without_the_resource(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    let n1 = w.local("n1");
    for (name, port) in [("one", 1883), ("two", 1884)] {
        let (_, op) = w.put(&listener(name), listener_body(port)).await;
        assert_eq!(w.finished(&op).await.status, "Succeeded");
    }
    let before = n1.applied();

    w.delete(&listener("one")).await;
    let s = n1
        .wait_for("one is gone", |s| !has_listener(s, "one"))
        .await;
    assert!(has_listener(&s, "two"));
    assert!(s.generation > before);
    assert!(
        !s.sources
            .iter()
            .any(|r| r.id.eq_ignore_ascii_case(&listener("one")))
    );

    // Deleting the instance takes its broker with it: the node is told to serve nothing.
    w.delete(&instance()).await;
    let s = n1
        .wait_for("the broker is gone", |s| s.listeners.is_empty())
        .await;
    assert!(s.sources.is_empty());
}

async fn generations_increase_across_changes_and_restarts(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    let n1 = w.local("n1");
    let started = chrono::Utc::now().timestamp_millis() as u64;
    let mut seen = vec![w.nodes.desired_generation(&broker())];
    for port in [1883, 1884, 1885] {
        let (_, op) = w.put(&listener("one"), listener_body(port)).await;
        assert_eq!(w.finished(&op).await.status, "Succeeded");
        seen.push(n1.applied());
    }
    assert!(seen.windows(2).all(|p| p[0] < p[1]), "{seen:?}");
    assert!(seen[1] >= started, "generations follow the clock: {seen:?}");
    let last = *seen.last().unwrap();

    // A restarted control plane adopts a node that already serves the desired state.
    let w2 = w.restart(test_config());
    let pushes = n1.snapshots().len();
    w2.nodes
        .register_local("n1", &broker(), n1.clone())
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while w2.nodes.desired_generation(&broker()) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w2.nodes.desired_generation(&broker()), last, "adopted");
    assert_eq!(
        n1.snapshots().len(),
        pushes,
        "no push for what the node serves"
    );
    let (_, op) = w2.put(&listener("one"), listener_body(1886)).await;
    assert_eq!(w2.finished(&op).await.status, "Succeeded");
    assert!(n1.applied() > last);

    // A node ahead of the clock (skew) is never handed a smaller generation.
    let ahead = TestNode::new(&broker());
    ahead.state.lock().unwrap().applied = n1.applied() + 1_000_000_000;
    let far = ahead.applied();
    let w3 = w.restart(test_config());
    w3.nodes
        .register_local("ahead", &broker(), ahead.clone())
        .unwrap();
    let (_, op) = w3.put(&listener("one"), listener_body(1887)).await;
    assert_eq!(w3.finished(&op).await.status, "Succeeded");
    assert!(ahead.applied() > far, "{} > {far}", ahead.applied());
    assert!(has_listener(&ahead.latest().unwrap(), "one"));
}

async fn an_invalid_snapshot_fails_the_resource_at_fault_and_is_not_pushed(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    let n1 = w.local("n1");
    let (_, op) = w.put(&listener("fine"), listener_body(1883)).await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");
    let generation = w.nodes.desired_generation(&broker());

    let (_, op) = w
        .put(
            &listener("broken"),
            json!({"extendedLocation": custom_location(), "properties": {"ports": [
                {"port": 1884, "authenticationRef": "missing"}
            ]}}),
        )
        .await;
    let done = w.finished(&op).await;
    assert_eq!(done.status, "Failed");
    let error = done.error.unwrap();
    assert_eq!(error["code"], "InvalidConfiguration");
    assert_eq!(error["target"], listener("broken"));
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("authentication 'missing' does not exist"),
        "{error}"
    );
    assert_eq!(
        w.nodes.desired_generation(&broker()),
        generation,
        "not pushed"
    );
    assert!(n1.snapshots().iter().all(|s| !has_listener(s, "broken")));
}

async fn resources_no_snapshot_includes_do_not_wait_for_nodes(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    // A second broker: an untagged namespace then binds to neither.
    let (_, op) = w
        .put(
            &format!("{}/brokers/other", instance()),
            json!({"extendedLocation": custom_location(), "properties": {}}),
        )
        .await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");
    let stuck = w.local("stuck");
    stuck.hold();

    let (_, op) = w
        .put(
            &format!("{RG}/providers/Microsoft.EventGrid/namespaces/fleet"),
            json!({"location": "westeurope", "properties": {}}),
        )
        .await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");

    // What the broker does include waits for its (unresponsive) node...
    let (_, op) = w.put(&listener("one"), listener_body(1883)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.status(&op).await, "Provisioning");
    // ...until the node is gone: a broker with no live node provisions at once.
    assert!(w.nodes.deregister("stuck"));
    assert_eq!(w.finished(&op).await.status, "Succeeded");
}

async fn failed_pushes_are_retried_with_backoff(b: Backend) {
    let w = World::new(b, test_config()).await;
    w.instance_and_broker().await;
    let token = w.token(Role::Contributor, RG);
    let remote = HttpNode::start(TestNode::new(&broker())).await;
    let (status, _) = remote.report(&w, "remote", &token).await;
    assert_eq!(status, StatusCode::OK);
    remote
        .node()
        .wait_for("registered", |s| s.broker_id == broker())
        .await;
    let before = remote.state.pushes.load(Ordering::SeqCst);

    remote.state.fail_next.store(3, Ordering::SeqCst);
    let (_, op) = w.put(&listener("one"), listener_body(1883)).await;
    assert_eq!(w.finished(&op).await.status, "Succeeded");
    assert!(has_listener(&remote.node().latest().unwrap(), "one"));
    assert_eq!(
        remote.state.pushes.load(Ordering::SeqCst) - before,
        4,
        "three failures, then the push that worked"
    );
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

on_both_stores!(
    a_listener_reaches_both_nodes_and_then_succeeds,
    a_rejecting_node_fails_the_resource_with_its_reason,
    a_silent_node_turns_unhealthy_and_stops_holding_up_provisioning,
    an_identical_re_put_makes_no_new_generation,
    delete_pushes_a_snapshot_without_the_resource,
    generations_increase_across_changes_and_restarts,
    an_invalid_snapshot_fails_the_resource_at_fault_and_is_not_pushed,
    resources_no_snapshot_includes_do_not_wait_for_nodes,
    failed_pushes_are_retried_with_backoff,
);

// ---------------------------------------------------------------------------------------------
// The node routes

#[tokio::test]
async fn a_report_is_answered_with_the_desired_generation_and_a_behind_node_is_pushed() {
    let w = World::new(Backend::Sqlite, test_config()).await;
    w.instance_and_broker().await;
    let (_, op) = w.put(&listener("one"), listener_body(1883)).await;
    assert_eq!(
        w.finished(&op).await.status,
        "Succeeded",
        "no nodes: at once"
    );
    let desired = w.nodes.desired_generation(&broker());

    let token = w.token(Role::Contributor, RG);
    let remote = HttpNode::start(TestNode::new(&broker())).await;
    let (status, answer) = remote.report(&w, "edge-1", &token).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer,
        json!({"desiredGeneration": desired, "reportIntervalSeconds": 1})
    );
    let s = remote
        .node()
        .wait_for("the desired snapshot arrived", |s| s.generation == desired)
        .await;
    assert!(has_listener(&s, "one"));

    // Up to date: the same answer, no push.
    let pushes = remote.state.pushes.load(Ordering::SeqCst);
    let (_, answer) = remote.report(&w, "edge-1", &token).await;
    assert_eq!(answer["desiredGeneration"], desired);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(remote.state.pushes.load(Ordering::SeqCst), pushes);

    // Restarted without its stored snapshot: it reports generation 0 and is pushed again.
    remote.node().forget();
    let (_, answer) = remote.report(&w, "edge-1", &token).await;
    assert_eq!(answer["desiredGeneration"], desired);
    remote.node().wait_applies(2).await;
    assert_eq!(remote.node().applied(), desired);
    // The view follows the push answer (which lands just after the node applied).
    let deadline = Instant::now() + WAIT;
    while w.nodes.nodes(None)[0].report.applied_generation != desired {
        assert!(
            Instant::now() < deadline,
            "the push answer was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(remote.node().snapshots().len(), 2);

    let (status, list) = w
        .call(
            "GET",
            &format!("/meridian/nodes?brokerId={}", broker()),
            Some(&w.token(Role::Reader, RG)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let view = &list["value"][0];
    assert_eq!(view["nodeId"], "edge-1");
    assert_eq!(view["state"], "Healthy");
    assert_eq!(view["report"]["endpoint"], remote.endpoint());
    assert_eq!(view["report"]["appliedGeneration"], desired);
    assert_eq!(view["report"]["connectedClients"], 3);
    assert!(
        chrono::DateTime::parse_from_rfc3339(view["lastSeen"].as_str().unwrap()).is_ok(),
        "{view}"
    );
}

#[tokio::test]
async fn node_routes_need_a_token_and_the_right_role() {
    let w = World::new(Backend::Sqlite, test_config()).await;
    let report = TestNode::new(&broker()).report_for("http://127.0.0.1:9");
    let body = serde_json::to_value(&report).unwrap();
    let uri = "/meridian/nodes/n1";

    let (status, e) = w.call("PUT", uri, None, Some(body.clone())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{e}");
    let (status, _) = w
        .call("PUT", uri, Some("not-a-jwt"), Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, e) = w
        .call(
            "PUT",
            uri,
            Some(&w.token(Role::Reader, SUB)),
            Some(body.clone()),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a Reader cannot register: {e}"
    );
    let (status, _) = w
        .call(
            "PUT",
            uri,
            Some(&w.token(Role::Contributor, "/subscriptions/other")),
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "Contributor elsewhere");
    let (status, _) = w
        .call(
            "PUT",
            uri,
            Some(&w.token(Role::Contributor, "/subscriptions/sub1/resourceGroups/rg2")),
            Some(body.clone()),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "Contributor on another group"
    );
    let contributor = w.token(Role::Contributor, RG);
    let (status, answer) = w
        .call("PUT", uri, Some(&contributor), Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["desiredGeneration"], 0,
        "the broker does not exist yet"
    );

    // Bad input is 400 with a target.
    let mut bad = body.clone();
    bad["brokerId"] = json!(instance());
    let (status, e) = w.call("PUT", uri, Some(&contributor), Some(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["target"], "brokerId");
    let mut bad = body.clone();
    bad["endpoint"] = json!("ftp://x");
    let (status, e) = w.call("PUT", uri, Some(&contributor), Some(bad)).await;
    assert_eq!(
        (status, e["error"]["target"].clone()),
        (StatusCode::BAD_REQUEST, json!("endpoint"))
    );
    let (status, e) = w
        .call(
            "PUT",
            "/meridian/nodes/bad%20id",
            Some(&contributor),
            Some(body.clone()),
        )
        .await;
    assert_eq!(
        (status, e["error"]["target"].clone()),
        (StatusCode::BAD_REQUEST, json!("nodeId"))
    );
    let (status, _) = w
        .call("PUT", uri, Some(&contributor), Some(json!({"endpoint": 1})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // An in-process node's id cannot be taken over HTTP.
    w.nodes
        .register_local("local", &broker(), TestNode::new(&broker()))
        .unwrap();
    let (status, _) = w
        .call(
            "PUT",
            "/meridian/nodes/local",
            Some(&contributor),
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Listing: Reader, and only what the caller may read.
    let (status, _) = w.call("GET", "/meridian/nodes", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, list) = w
        .call(
            "GET",
            "/meridian/nodes",
            Some(&w.token(Role::Reader, RG)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["nodeId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["local", "n1"]);
    let other = w.token(Role::Reader, "/subscriptions/other");
    let (status, list) = w.call("GET", "/meridian/nodes", Some(&other), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["value"], json!([]));
    let (status, _) = w
        .call(
            "GET",
            &format!("/meridian/nodes?brokerId={}", broker()),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn meridian_api_provisions_through_nodes_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = meridian_api::ApiArgs::for_data_dir(dir.path().to_path_buf());
    args.node_report_interval = Duration::from_secs(2);
    let api = meridian_api::start(args).await.unwrap();
    assert_eq!(api.nodes.config().unhealthy_after, Duration::from_secs(6));
    let node = TestNode::new(&broker());
    api.nodes
        .register_local("dev", &broker(), node.clone())
        .unwrap();
    let token = api.token(Role::Owner, SUB).unwrap();
    let client = reqwest::Client::new();
    let put = |id: String, body: Value| {
        let client = client.clone();
        let url = format!("{}{id}?api-version={AIO_V}", api.base_url);
        let token = token.clone();
        async move {
            let res = client
                .put(&url)
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "{url}: {}", res.status());
            res.headers()["azure-asyncoperation"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    put(instance(), instance_body()).await;
    put(
        broker(),
        json!({"extendedLocation": custom_location(), "properties": {}}),
    )
    .await;
    let started = Instant::now();
    let status_url = put(listener("one"), listener_body(1883)).await;
    let op = loop {
        let op: Value = client
            .get(&status_url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if op["status"] != "Provisioning" && op["status"] != "Accepted" {
            break op;
        }
        assert!(started.elapsed() < WAIT, "{op}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert!(has_listener(&node.latest().unwrap(), "one"));

    let list: Value = client
        .get(format!("{}/meridian/nodes", api.base_url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["value"][0]["nodeId"], "dev");
    assert_eq!(
        list["value"][0]["report"]["appliedGeneration"],
        node.applied()
    );
    api.shutdown().await;
}

#[test]
fn node_timing_flags_parse_with_units_and_default_from_the_interval() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        api: meridian_api::ApiArgs,
    }
    let c = Cli::try_parse_from(["api"]).unwrap().api.node_config();
    assert_eq!(c.report_interval, Duration::from_secs(5));
    assert_eq!(c.unhealthy_after, Duration::from_secs(15));
    assert_eq!(c.provision_timeout, Duration::from_secs(300));
    let c = Cli::try_parse_from([
        "api",
        "--node-report-interval",
        "500ms",
        "--node-timeout",
        "2",
        "--provision-timeout",
        "1m",
    ])
    .unwrap()
    .api
    .node_config();
    assert_eq!(c.report_interval, Duration::from_millis(500));
    assert_eq!(c.unhealthy_after, Duration::from_secs(2));
    assert_eq!(c.provision_timeout, Duration::from_secs(60));
    let err = Cli::try_parse_from(["api", "--node-timeout", "5h"])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unknown unit"), "{err}");
}
