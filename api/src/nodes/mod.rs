//! Broker nodes: the registry of nodes serving broker resources, the pusher that compiles each
//! broker's desired state and pushes it to them, and the provisioner that waits for them.
//!
//! Data flow (one [`NodeRegistry`], shared by the HTTP routes and the [`NodeProvisioner`]):
//!
//! 1. A write (PUT/DELETE) asks for a **compile round** of every broker it affects
//!    ([`crate::compile::brokers_affected_by`]). Rounds are serialized per broker by one short-lived
//!    worker task: requests that arrive while a round runs are coalesced into the next one, and a
//!    round's read starts after every request it answers, so it sees their writes.
//! 2. A round compiles from one consistent read ([`crate::compile::compile_broker`]), checks
//!    [`meridian_contract::BrokerSnapshot::validate`] (an invalid snapshot is never pushed; the
//!    resources at fault fail, named), and compares the digest with the last desired snapshot: equal
//!    → no new generation (the new etags count as applied at that generation); different → a new
//!    generation `max(last + 1, unix milliseconds)` becomes the broker's desired snapshot.
//! 3. Every node has one pusher task that pushes the broker's latest desired snapshot whenever the
//!    node is live and behind it (`PUT {endpoint}/v1/snapshot` with the node's token, or an
//!    in-process [`SnapshotSink`]), with exponential backoff on transport failures. Pushes to
//!    different nodes run in parallel; a newer generation supersedes one not yet sent.
//! 4. The provisioner waits, on a per-broker change signal (no polling), until every live node of
//!    the broker applied a generation at least as new as the one that compiled the resource in, or
//!    a node rejected it.
//!
//! **Generations** need no table: `max(last + 1, unix ms)` is monotonic per broker while the
//! process runs, and after a restart the clock has moved past every earlier generation (unless more
//! than 1,000 generations per second were made); `last` is also raised to any generation a node
//! reports, so a node never sees a generation go backwards.
//!
//! **The registry lives in memory.** Nodes report every [`NodeConfig::report_interval`], so after
//! a control-plane restart they are all back within one interval; the first report of a broker
//! triggers a compile, and a node whose applied digest equals the compiled one is adopted as-is
//! (no push, no new generation).
//!
//! **Liveness:** a node reached over HTTP is live while its last report is younger than
//! [`NodeConfig::unhealthy_after`]; after that it is `Unhealthy`, gets no pushes and no longer
//! holds up provisioning until it reports again (and is then brought up to date). An in-process
//! node is live while registered.

mod provision;
mod push;
pub mod routes;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat, Utc};
use meridian_contract::{
    BrokerSnapshot, NodeHealth, NodeReport, NodeView, Rejection, ReportAnswer, SnapshotSink,
    SourceRef, Violation,
};
use tokio::sync::{Notify, watch};

use crate::{
    compile::{CompileError, compile_broker, parse_broker_id},
    store::Store,
};

pub use provision::NodeProvisioner;

/// Timing of the node protocol and of provisioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// How often nodes report (sent to them in every [`ReportAnswer`], in whole seconds, at
    /// least 1).
    pub report_interval: Duration,
    /// A node that has not reported for this long is `Unhealthy`: no pushes, and provisioning no
    /// longer waits for it.
    pub unhealthy_after: Duration,
    /// Provisioning that waits longer than this for live nodes fails (`ProvisioningTimeout`).
    pub provision_timeout: Duration,
    /// Time limit of one push (HTTP request or in-process apply).
    pub push_timeout: Duration,
    /// First retry delay after a failed push; doubled per failure up to [`Self::retry_max`].
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self::with_report_interval(Duration::from_secs(5))
    }
}

impl NodeConfig {
    /// Defaults around `interval`: unhealthy after 3 missed reports, provisioning timeout 5
    /// minutes, pushes limited to 10 s, retries from 50 ms up to 5 s.
    pub fn with_report_interval(interval: Duration) -> Self {
        Self {
            report_interval: interval,
            unhealthy_after: interval * 3,
            provision_timeout: Duration::from_secs(300),
            push_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Why the registry refused a registration or report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The broker id names no broker type.
    #[error(
        "'{0}' is not a broker resource id (expected …/Microsoft.IoTOperations/instances/{{i}}/brokers/{{b}} or …/Microsoft.IoTOperationsMQ/mq/{{m}}/broker/{{b}})"
    )]
    NotABroker(String),
    /// The node id is empty, too long or has characters other than letters, digits, `.`, `_`, `-`.
    #[error("node id '{0}' must be 1-128 characters of letters, digits, '.', '_' or '-'")]
    InvalidNodeId(String),
    /// An HTTP report for a node id registered in-process.
    #[error("node '{0}' is registered in-process; it cannot report over HTTP")]
    NodeIsLocal(String),
}

/// Checks a node id (`[A-Za-z0-9._-]{1,128}`).
pub fn check_node_id(node_id: &str) -> Result<(), RegistryError> {
    let ok = !node_id.is_empty()
        && node_id.len() <= 128
        && node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidNodeId(node_id.to_owned()))
    }
}

/// How a node is reached.
#[derive(Clone)]
enum Transport {
    /// `PUT {endpoint}/v1/snapshot` with bearer `token`.
    Http { endpoint: String, token: String },
    /// In-process (`meridian dev`).
    Local(Arc<dyn SnapshotSink>),
}

struct Node {
    broker_key: String,
    transport: Transport,
    report: NodeReport,
    last_seen: Instant,
    last_seen_at: DateTime<Utc>,
    /// The generation the node serves, as far as the control plane knows (reports and push
    /// answers).
    applied: u64,
    /// The node's latest rejection (its `generation` is the refused one).
    rejection: Option<Rejection>,
    /// Wakes the node's pusher.
    wake: Arc<Notify>,
    /// Identifies the pusher task that owns this entry.
    epoch: u64,
}

/// The broker's desired snapshot: what its nodes should serve.
struct Desired {
    snapshot: Arc<BrokerSnapshot>,
    digest: String,
    /// The JSON body, serialized once for every HTTP node.
    body: Arc<Vec<u8>>,
}

/// What one compile round concluded.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The broker's desired snapshot after the round (new, or unchanged by digest).
    Desired {
        generation: u64,
        sources: Vec<SourceRef>,
    },
    /// The broker does not exist and nothing was ever pushed for it: nothing to serve.
    Absent,
    /// The compiled snapshot broke the contract's rules; nothing was pushed.
    Invalid {
        sources: Vec<SourceRef>,
        violations: Vec<Violation>,
    },
    /// Compiling failed (a stored resource of the wrong shape, or the store).
    Failed {
        resource_id: Option<String>,
        message: String,
    },
}

struct Broker {
    /// The id as first seen (compiles use it; the store compares ids case-insensitively).
    id: String,
    requested: u64,
    completed: u64,
    compiling: bool,
    last_generation: u64,
    desired: Option<Desired>,
    outcome: Option<Arc<Outcome>>,
    /// Bumped on every change a provisioning waiter may care about.
    changed: watch::Sender<u64>,
}

impl Broker {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            requested: 0,
            completed: 0,
            compiling: false,
            last_generation: 0,
            desired: None,
            outcome: None,
            changed: watch::channel(0).0,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Node>,
    brokers: HashMap<String, Broker>,
    next_epoch: u64,
}

impl State {
    fn broker(&mut self, id: &str) -> &mut Broker {
        self.brokers
            .entry(id.to_lowercase())
            .or_insert_with(|| Broker::new(id))
    }

    fn wake_nodes_of(&self, broker_key: &str) {
        for n in self.nodes.values().filter(|n| n.broker_key == broker_key) {
            n.wake.notify_one();
        }
    }
}

struct Inner {
    store: Arc<dyn Store>,
    config: NodeConfig,
    http: reqwest::Client,
    state: Mutex<State>,
}

/// The nodes serving broker resources and the pusher that keeps them at their broker's desired
/// snapshot. Cheap to clone (one shared registry).
#[derive(Clone)]
pub struct NodeRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRegistry")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// What a node's pusher should do next.
enum Job {
    /// The node is gone (deregistered or replaced).
    Stop,
    /// Nothing to push now; wait for a wake-up.
    Wait(Arc<Notify>),
    /// Push this generation.
    Push {
        transport: Transport,
        snapshot: Arc<BrokerSnapshot>,
        digest: String,
        body: Arc<Vec<u8>>,
        wake: Arc<Notify>,
    },
}

/// How the live nodes of a broker stand against one generation.
pub(crate) enum NodeProgress {
    /// Every live node serves that generation or a newer one (or there is no live node).
    Applied,
    /// A live node refused it.
    Rejected {
        node_id: String,
        rejection: Rejection,
    },
    /// Waiting for these nodes; `until` is when the first of them would turn unhealthy.
    Pending {
        nodes: Vec<String>,
        until: Option<Instant>,
    },
}

fn unix_millis() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

impl NodeRegistry {
    /// A registry compiling from `store`.
    pub fn new(store: Arc<dyn Store>, config: NodeConfig) -> Self {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("an HTTP client builds once the ring provider is installed");
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                http,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The timing settings.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The store the registry compiles from.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_live(&self, node: &Node, now: Instant) -> bool {
        match node.transport {
            Transport::Local(_) => true,
            Transport::Http { .. } => {
                now.saturating_duration_since(node.last_seen) <= self.inner.config.unhealthy_after
            }
        }
    }

    /// Registers (or replaces) an in-process node serving `broker_id`: it is pushed snapshots
    /// exactly like an HTTP node, through [`SnapshotSink::apply`], and is live while registered.
    /// Its [`SnapshotSink::report`] stands in for HTTP reports. Must be called inside a Tokio
    /// runtime.
    pub fn register_local(
        &self,
        node_id: &str,
        broker_id: &str,
        sink: Arc<dyn SnapshotSink>,
    ) -> Result<(), RegistryError> {
        check_node_id(node_id)?;
        let (_, canonical, _) = parse_broker_id(broker_id)
            .ok_or_else(|| RegistryError::NotABroker(broker_id.to_owned()))?;
        let mut report = sink.report();
        report.broker_id = canonical.clone();
        self.upsert(node_id, &canonical, Transport::Local(sink), report);
        Ok(())
    }

    /// Removes a node (HTTP or in-process); its pusher stops. Returns whether it existed.
    pub fn deregister(&self, node_id: &str) -> bool {
        let mut st = self.lock();
        let Some(node) = st.nodes.remove(node_id) else {
            return false;
        };
        node.wake.notify_one();
        if let Some(b) = st.brokers.get(&node.broker_key) {
            b.bump();
        }
        true
    }

    /// Records a node's report (its registration when new), remembering `token` to present when
    /// pushing to it. The first report of a broker this process has not compiled yet waits
    /// (briefly) for that compile, so the answer carries the desired generation.
    pub async fn report(
        &self,
        node_id: &str,
        token: &str,
        report: NodeReport,
    ) -> Result<ReportAnswer, RegistryError> {
        check_node_id(node_id)?;
        let (_, canonical, _) = parse_broker_id(&report.broker_id)
            .ok_or_else(|| RegistryError::NotABroker(report.broker_id.clone()))?;
        if matches!(
            self.lock().nodes.get(node_id).map(|n| &n.transport),
            Some(Transport::Local(_))
        ) {
            return Err(RegistryError::NodeIsLocal(node_id.to_owned()));
        }
        let transport = Transport::Http {
            endpoint: report.endpoint.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        };
        let first_compile = self.upsert(node_id, &canonical, transport, report);
        let key = canonical.to_lowercase();
        if let Some(ticket) = first_compile {
            let wait = self.wait_compiled(&key, ticket);
            let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        }
        Ok(ReportAnswer {
            desired_generation: self.desired_generation(&canonical),
            report_interval_seconds: self.inner.config.report_interval.as_secs().max(1),
        })
    }

    /// Inserts or updates a node; returns the compile ticket when this broker had no compile yet.
    fn upsert(
        &self,
        node_id: &str,
        broker_id: &str,
        transport: Transport,
        report: NodeReport,
    ) -> Option<u64> {
        let key = broker_id.to_lowercase();
        let now = Instant::now();
        let mut spawn = None;
        let first_compile;
        {
            let mut st = self.lock();
            let applied = report.applied_generation;
            let previous_broker = match st.nodes.get_mut(node_id) {
                Some(node) => {
                    let previous = std::mem::replace(&mut node.broker_key, key.clone());
                    if previous != key {
                        node.rejection = None;
                    }
                    node.transport = transport;
                    node.report = report;
                    node.last_seen = now;
                    node.last_seen_at = Utc::now();
                    node.applied = applied;
                    node.wake.notify_one();
                    Some(previous)
                }
                None => {
                    st.next_epoch += 1;
                    let epoch = st.next_epoch;
                    let wake = Arc::new(Notify::new());
                    st.nodes.insert(
                        node_id.to_owned(),
                        Node {
                            broker_key: key.clone(),
                            transport,
                            report,
                            last_seen: now,
                            last_seen_at: Utc::now(),
                            applied,
                            rejection: None,
                            wake,
                            epoch,
                        },
                    );
                    spawn = Some(epoch);
                    None
                }
            };
            if let Some(prev) = previous_broker.filter(|p| *p != key)
                && let Some(b) = st.brokers.get(&prev)
            {
                b.bump();
            }
            let broker = st.broker(broker_id);
            broker.last_generation = broker.last_generation.max(applied);
            first_compile = broker.requested == 0;
            broker.bump();
        }
        if let Some(epoch) = spawn {
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(push::run(weak, node_id.to_owned(), epoch));
        }
        first_compile.then(|| self.request_compile(broker_id))
    }

    /// The newest generation of `broker_id`'s desired snapshot (0 = none yet).
    pub fn desired_generation(&self, broker_id: &str) -> u64 {
        self.lock()
            .brokers
            .get(&broker_id.to_lowercase())
            .and_then(|b| b.desired.as_ref())
            .map_or(0, |d| d.snapshot.generation)
    }

    /// `broker_id`'s desired snapshot, as pushed to its nodes.
    pub fn desired_snapshot(&self, broker_id: &str) -> Option<BrokerSnapshot> {
        self.lock()
            .brokers
            .get(&broker_id.to_lowercase())
            .and_then(|b| b.desired.as_ref())
            .map(|d| (*d.snapshot).clone())
    }

    /// The registered nodes (of one broker, compared case-insensitively, or all), by node id.
    pub fn nodes(&self, broker_id: Option<&str>) -> Vec<NodeView> {
        let want = broker_id.map(str::to_lowercase);
        let now = Instant::now();
        let picked: Vec<(Option<Arc<dyn SnapshotSink>>, NodeView)> = {
            let st = self.lock();
            st.nodes
                .iter()
                .filter(|(_, n)| want.as_ref().is_none_or(|w| *w == n.broker_key))
                .map(|(id, n)| {
                    let state = if !self.is_live(n, now) {
                        "Unhealthy"
                    } else if n.report.health == NodeHealth::Degraded {
                        "Degraded"
                    } else {
                        "Healthy"
                    };
                    let sink = match &n.transport {
                        Transport::Local(s) => Some(s.clone()),
                        Transport::Http { .. } => None,
                    };
                    let view = NodeView {
                        node_id: id.clone(),
                        state: state.to_owned(),
                        last_seen: n.last_seen_at.to_rfc3339_opts(SecondsFormat::Millis, true),
                        report: n.report.clone(),
                    };
                    (sink, view)
                })
                .collect()
        };
        picked
            .into_iter()
            .map(|(sink, mut view)| {
                // In-process nodes are asked now rather than remembered.
                if let Some(sink) = sink {
                    let broker_id = view.report.broker_id.clone();
                    view.report = sink.report();
                    view.report.broker_id = broker_id;
                    view.last_seen = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
                    view.state = match view.report.health {
                        NodeHealth::Degraded => "Degraded",
                        NodeHealth::Healthy => "Healthy",
                    }
                    .to_owned();
                }
                view
            })
            .collect()
    }

    /// Asks for a compile round of `broker_id` that starts after this call; returns its ticket.
    /// Rounds of one broker never overlap; requests made during a round share the next one.
    pub fn recompile(&self, broker_id: &str) -> u64 {
        self.request_compile(broker_id)
    }

    fn request_compile(&self, broker_id: &str) -> u64 {
        let key = broker_id.to_lowercase();
        let (ticket, start) = {
            let mut st = self.lock();
            let b = st.broker(broker_id);
            b.requested += 1;
            let start = !b.compiling;
            b.compiling = true;
            (b.requested, start)
        };
        if start {
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(compile_rounds(weak, key));
        }
        ticket
    }

    /// Brokers this registry knows (compiled or served by a node) whose id is `id` or below it.
    pub(crate) fn known_brokers_under(&self, id: &str) -> Vec<String> {
        let key = id.to_lowercase();
        let prefix = format!("{key}/");
        let st = self.lock();
        st.brokers
            .iter()
            .filter(|(k, _)| **k == key || k.starts_with(&prefix))
            .map(|(_, b)| b.id.clone())
            .collect()
    }

    pub(crate) fn subscribe(&self, broker_id: &str) -> watch::Receiver<u64> {
        self.lock().broker(broker_id).changed.subscribe()
    }

    /// The outcome of the latest round, once round `ticket` is done.
    pub(crate) fn outcome_after(&self, broker_key: &str, ticket: u64) -> Option<Arc<Outcome>> {
        let st = self.lock();
        let b = st.brokers.get(broker_key)?;
        (b.completed >= ticket).then(|| b.outcome.clone()).flatten()
    }

    async fn wait_compiled(&self, broker_key: &str, ticket: u64) -> Option<Arc<Outcome>> {
        let mut rx = self.subscribe(broker_key);
        loop {
            if let Some(o) = self.outcome_after(broker_key, ticket) {
                return Some(o);
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// How the live nodes of `broker_key` stand against `generation`.
    pub(crate) fn progress(&self, broker_key: &str, generation: u64) -> NodeProgress {
        let now = Instant::now();
        let st = self.lock();
        let mut pending = Vec::new();
        let mut until: Option<Instant> = None;
        for (id, n) in st.nodes.iter().filter(|(_, n)| n.broker_key == broker_key) {
            if !self.is_live(n, now) || n.applied >= generation {
                continue;
            }
            if let Some(r) = n.rejection.as_ref().filter(|r| r.generation >= generation) {
                return NodeProgress::Rejected {
                    node_id: id.clone(),
                    rejection: r.clone(),
                };
            }
            pending.push(id.clone());
            if matches!(n.transport, Transport::Http { .. }) {
                let at = n.last_seen + self.inner.config.unhealthy_after;
                until = Some(until.map_or(at, |u| u.min(at)));
            }
        }
        if pending.is_empty() {
            NodeProgress::Applied
        } else {
            NodeProgress::Pending {
                nodes: pending,
                until,
            }
        }
    }

    /// Settles one compile result into the broker's state (under the lock).
    fn settle(&self, broker_key: &str, result: Result<BrokerSnapshot, CompileError>) -> Outcome {
        let mut st = self.lock();
        let had_something = st
            .brokers
            .get(broker_key)
            .is_some_and(|b| b.desired.is_some())
            || st
                .nodes
                .values()
                .any(|n| n.broker_key == broker_key && n.applied > 0);
        let Some(broker) = st.brokers.get(broker_key) else {
            return Outcome::Absent;
        };
        let snapshot = match result {
            Ok(s) => s,
            Err(CompileError::BrokerNotFound(_)) if had_something => {
                // The broker was deleted: its nodes should serve nothing.
                match parse_broker_id(&broker.id) {
                    Some((flavor, canonical, _)) => BrokerSnapshot::new(canonical, flavor),
                    None => return Outcome::Absent,
                }
            }
            Err(CompileError::BrokerNotFound(_)) | Err(CompileError::NotABroker(_)) => {
                return Outcome::Absent;
            }
            Err(CompileError::InvalidResource { id, message }) => {
                return Outcome::Failed {
                    resource_id: Some(id),
                    message,
                };
            }
            Err(e) => {
                tracing::error!(error = %e, broker = %broker.id, "compiling a broker failed");
                return Outcome::Failed {
                    resource_id: None,
                    message: "The broker's configuration could not be read; retry the request."
                        .to_owned(),
                };
            }
        };
        if let Err(invalid) = snapshot.validate() {
            return Outcome::Invalid {
                sources: snapshot.sources,
                violations: invalid.violations,
            };
        }
        let digest = snapshot.digest();
        // Equal digest: the nodes are configured right already; only the sources moved.
        let same = broker
            .desired
            .as_ref()
            .filter(|d| d.digest == digest)
            .map(|d| d.snapshot.generation);
        // After a restart: a node already serving exactly this is adopted at its generation.
        let adopted = if broker.desired.is_none() {
            st.nodes
                .values()
                .filter(|n| {
                    n.broker_key == broker_key && n.applied > 0 && n.report.applied_digest == digest
                })
                .map(|n| n.applied)
                .max()
        } else {
            None
        };
        let Some(broker) = st.brokers.get_mut(broker_key) else {
            return Outcome::Absent;
        };
        let mut snapshot = snapshot;
        let generation = match same.or(adopted) {
            Some(g) => g,
            None => {
                let g = (broker.last_generation + 1).max(unix_millis());
                broker.last_generation = g;
                g
            }
        };
        broker.last_generation = broker.last_generation.max(generation);
        snapshot.generation = generation;
        let sources = snapshot.sources.clone();
        let changed = same.is_none();
        let body = Arc::new(snapshot.to_json());
        broker.desired = Some(Desired {
            snapshot: Arc::new(snapshot),
            digest,
            body,
        });
        if changed {
            tracing::info!(broker = %broker.id, generation, "new desired snapshot");
            st.wake_nodes_of(broker_key);
        }
        Outcome::Desired {
            generation,
            sources,
        }
    }

    /// The pusher's next job for `node_id`.
    fn next_job(&self, node_id: &str, epoch: u64) -> Job {
        let now = Instant::now();
        let st = self.lock();
        let Some(node) = st.nodes.get(node_id).filter(|n| n.epoch == epoch) else {
            return Job::Stop;
        };
        let wait = Job::Wait(node.wake.clone());
        if !self.is_live(node, now) {
            return wait;
        }
        let Some(desired) = st
            .brokers
            .get(&node.broker_key)
            .and_then(|b| b.desired.as_ref())
        else {
            return wait;
        };
        let generation = desired.snapshot.generation;
        let refused = node
            .rejection
            .as_ref()
            .is_some_and(|r| r.generation >= generation);
        if node.applied >= generation || refused {
            return wait;
        }
        Job::Push {
            transport: node.transport.clone(),
            snapshot: desired.snapshot.clone(),
            digest: desired.digest.clone(),
            body: desired.body.clone(),
            wake: node.wake.clone(),
        }
    }

    /// Records a node's answer to a push of `pushed` (generation and digest).
    fn record(
        &self,
        node_id: &str,
        epoch: u64,
        pushed: (u64, &str),
        answer: Result<u64, Rejection>,
    ) {
        let mut st = self.lock();
        let Some(node) = st.nodes.get_mut(node_id).filter(|n| n.epoch == epoch) else {
            return;
        };
        match answer {
            Ok(applied) => {
                node.applied = applied;
                // The view shows what the node serves now, not only what it last reported.
                node.report.applied_generation = applied;
                if applied == pushed.0 {
                    node.report.applied_digest = pushed.1.to_owned();
                }
            }
            Err(rejection) => node.rejection = Some(rejection),
        }
        let key = node.broker_key.clone();
        if let Some(b) = st.brokers.get(&key) {
            b.bump();
        }
    }
}

/// The compile worker of one broker: runs rounds until no request is left.
async fn compile_rounds(inner: Weak<Inner>, broker_key: String) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let registry = NodeRegistry { inner };
        let (target, broker_id) = {
            let mut st = registry.lock();
            let Some(b) = st.brokers.get_mut(&broker_key) else {
                return;
            };
            if b.completed >= b.requested {
                b.compiling = false;
                return;
            }
            (b.requested, b.id.clone())
        };
        let result = compile_broker(registry.inner.store.as_ref(), &broker_id).await;
        let outcome = registry.settle(&broker_key, result);
        if let Outcome::Invalid { violations, .. } = &outcome {
            tracing::warn!(broker = %broker_id, ?violations, "compiled snapshot is invalid; not pushed");
        }
        let mut st = registry.lock();
        if let Some(b) = st.brokers.get_mut(&broker_key) {
            b.completed = target;
            b.outcome = Some(Arc::new(outcome));
            b.bump();
        }
    }
}
