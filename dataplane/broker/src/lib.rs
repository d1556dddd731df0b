//! The Meridian broker node: MQTT 3.1.1 and 5.0 sessions, routing, retained messages, durable
//! state, `$SYS` statistics and events, and the `meridian broker` command.
//!
//! Modules: [`config`] (the documented configuration), [`cli`] (flags and the run loop),
//! [`session`] (the pure per-client state machine), [`router`] (subscription index and data
//! flow), [`auth`] (password and ACL files), [`sys`] (`$SYS` topics and metrics), `conn`
//! (connection handling) and `broker` (start-up, shared state, shutdown).
//!
//! Embedding: `Broker::start(BrokerConfig) -> RunningBroker`; `RunningBroker::listener_addrs()`,
//! `admin_addr()`, `shutdown().await`.

pub mod auth;
mod broker;
pub mod cli;
pub mod config;
mod conn;
pub mod router;
pub mod session;
pub mod sys;

pub use broker::{Broker, BrokerError, RunningBroker};
pub use cli::{BrokerArgs, run_cli};
pub use config::{BrokerConfig, FsyncMode, Limits, ListenerConfig, OverflowPolicy};
pub use meridian_net::Transport;
