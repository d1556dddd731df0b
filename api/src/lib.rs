//! meridian-api: the Meridian control plane, an Azure-Resource-Manager-style resource provider.
//!
//! Owns the generic ARM engine ([`engine`]), the resource-type declarations ([`resources`]), storage
//! (SQLite and Postgres behind one trait, [`store`]), access control ([`auth`]), the HTTP(S)
//! surface ([`http`], [`tls`]), broker nodes and the pusher ([`nodes`]), the OpenAPI document ([`openapi`]) and the CLI entry points the
//! `meridian` binary calls ([`cli`]).

pub mod auth;
pub mod cli;
pub mod compile;
pub mod deployments;
pub mod engine;
pub mod error;
pub mod explain;
pub mod http;
pub mod nodes;
pub mod openapi;
pub mod resources;
pub mod store;
pub mod tls;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use cli::{ApiArgs, RunningApi, TokenArgs, run_api, run_token, start};
