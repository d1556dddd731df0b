//! The Meridian broker node: MQTT 3.1.1 and 5.0 sessions, routing, retained messages, durable
//! state, `$SYS` statistics and events, and the `meridian broker` command.
//!
//! Modules: [`config`] (the documented configuration), [`cli`] (flags and the run loop),
//! [`session`] (the pure per-client state machine), [`router`] (subscription index and data
//! flow), [`auth`] (password and ACL files), [`sys`] (`$SYS` topics and metrics), `conn`
//! (connection handling) and `broker` (start-up, shared state, shutdown).
//!
//! Durability: with a data directory, persistent sessions (Session Expiry Interval > 0, or
//! Clean Session 0 in 3.1.1) store their record (JSON: expiry and subscriptions), every QoS 1/2
//! message queued or in flight for them (v5 PUBLISH encoding plus a header with packet id, state
//! and absolute expiry, see `session::encode_message`), inbound QoS 2 packet ids awaiting PUBREL,
//! and retained messages. A publisher's PUBACK/PUBREC is sent only after the store commit of every
//! write its message caused has resolved, which under `fsync = "always"` means it is on disk
//! (the store group-commits concurrent batches). After a restart, unacknowledged messages are
//! resent with DUP under their original packet ids, so a QoS 2 receiver deduplicates them.
//! Without a data directory nothing is written anywhere (no store at all, not an in-memory one).
//!
//! Embedding: `Broker::start(BrokerConfig) -> RunningBroker`; `RunningBroker::listener_addrs()`,
//! `admin_addr()`, `shutdown().await`.
//!
//! Live configuration: [`live`] applies config-contract snapshots (`RunningBroker::apply_snapshot`,
//! or a [`NodeHandle`] as `meridian_contract::SnapshotSink`): listeners open and close, credentials
//! and authorization policies swap in place. `agent` talks to the control plane (push endpoint
//! `PUT /v1/snapshot` on the admin listener, report loop) when the node has `--control-plane`.

mod agent;
pub mod auth;
mod broker;
pub mod cli;
pub mod config;
mod conn;
pub mod live;
pub mod router;
pub mod session;
pub mod sys;
mod tenant;

pub use broker::{Broker, BrokerError, RunningBroker};
pub use cli::{BrokerArgs, run_cli};
pub use config::{
    BrokerConfig, ControlPlaneConfig, FsyncMode, Limits, ListenerConfig, OverflowPolicy,
};
pub use live::{NodeHandle, SnapshotListener};
pub use meridian_net::Transport;
