//! The node protocol: how a broker node and the control plane talk about snapshots.
//!
//! Over HTTP (JSON bodies, camelCase), both directions authenticated by the node token `T` the
//! node was started with (`meridian broker --control-plane URL --broker ARM_ID --token T`):
//!
//! | direction | request | body → answer |
//! |---|---|---|
//! | node → control plane | `PUT {cp}/meridian/nodes/{nodeId}` (bearer `T`, a control-plane JWT) | [`NodeReport`] → [`ReportAnswer`] |
//! | control plane → node | `PUT {endpoint}/v1/snapshot` (bearer `T`, compared by the node) | [`crate::BrokerSnapshot`] → 200 [`Applied`] or 422 [`Rejection`] |
//! | anyone (Reader) | `GET {cp}/meridian/nodes[?brokerId=]` | → `{"value": [NodeView]}` |
//!
//! - A node reports on start (registration) and then every [`ReportAnswer::report_interval_seconds`].
//!   The control plane remembers the bearer token of the report and presents it when it pushes.
//! - A push whose generation is not newer than the node's applied one is answered with
//!   [`Applied`] for the node's current generation, without applying anything (idempotent retries).
//! - A node that rejects a snapshot keeps serving its previous one and answers 422 with the reason;
//!   the control plane marks the resources of that generation `Failed` with that message.
//! - In `meridian dev` the same types cross an in-process [`SnapshotSink`] instead of HTTP.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::BrokerSnapshot;

/// Liveness of a node as the node itself sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeHealth {
    /// Serving its applied snapshot.
    #[default]
    Healthy,
    /// Serving, but something is wrong (see `errors`).
    Degraded,
}

/// One error a node reports (the latest rejection, a listener that failed to open, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeError {
    /// The generation the error is about (0 when not about a snapshot).
    #[serde(default)]
    pub generation: u64,
    /// The resource at fault, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// What went wrong, for an operator.
    pub message: String,
}

/// What a node tells the control plane on start and at every report interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The broker resource this node serves (ARM id).
    pub broker_id: String,
    /// Where the control plane pushes snapshots (`http://host:port`, the node's admin address).
    pub endpoint: String,
    /// Generation of the snapshot the node serves (0 = none yet).
    #[serde(default)]
    pub applied_generation: u64,
    /// [`BrokerSnapshot::digest`] of that snapshot ("" = none).
    #[serde(default)]
    pub applied_digest: String,
    /// Self-assessed health.
    #[serde(default)]
    pub health: NodeHealth,
    /// Currently connected MQTT clients.
    #[serde(default)]
    pub connected_clients: u64,
    /// Recent errors, newest last (bounded by the node).
    #[serde(default)]
    pub errors: Vec<NodeError>,
}

/// The control plane's answer to a [`NodeReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportAnswer {
    /// The newest generation the control plane has for this broker (0 = none yet). A node behind
    /// it will receive a push; it need not fetch.
    pub desired_generation: u64,
    /// How often the node should report.
    pub report_interval_seconds: u64,
}

/// A node's answer to a push it accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    /// The generation the node now serves.
    pub applied_generation: u64,
}

/// A node's answer to a push it refused (HTTP 422): it keeps serving its previous snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// The refused generation.
    pub generation: u64,
    /// The resource at fault, when the node can tell (an ARM id from the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Why, for the operator (ends up in the resource's failed operation).
    pub message: String,
}

/// The control plane's view of one node (`GET /meridian/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    /// The node's id (its name, unique per control plane).
    pub node_id: String,
    /// `Healthy`, `Degraded` (as reported) or `Unhealthy` (stopped reporting).
    pub state: String,
    /// RFC 3339 time of the last report.
    pub last_seen: String,
    /// The last report itself.
    pub report: NodeReport,
}

/// Boxed future returned by [`SnapshotSink::apply`].
pub type ApplyFuture<'a> = Pin<Box<dyn Future<Output = Result<Applied, Rejection>> + Send + 'a>>;

/// Something that applies snapshots: a node's agent, reached in-process (`meridian dev`) or
/// behind the node's HTTP endpoint.
pub trait SnapshotSink: Send + Sync + 'static {
    /// Apply (atomically: all or nothing) and answer with the generation now served.
    fn apply(&self, snapshot: BrokerSnapshot) -> ApplyFuture<'_>;
    /// The node's current report (for in-process nodes that do not send reports over HTTP).
    fn report(&self) -> NodeReport;
}
