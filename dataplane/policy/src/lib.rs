//! `meridian-policy`: the sans-IO authorization engine of a Meridian broker node, and X.509
//! identity helpers for authentication.
//!
//! **What it owns.** The authorization model ([`model`]): IoT Operations broker authorization
//! rules and Event Grid namespaces (clients, client groups, topic spaces, permission bindings);
//! their compilation into a [`PolicyEngine`]; the decisions for CONNECT, PUBLISH and SUBSCRIBE
//! ([`PolicyEngine::connect`], [`PolicyEngine::publish`], [`PolicyEngine::subscribe`]); the
//! reasoning behind them ([`PolicyEngine::explain`]); the Event Grid client-group query language
//! ([`query`]); and pure certificate helpers ([`x509`]). It has no sockets, no async, no clock and
//! no knowledge of the broker or the control plane: the broker converts the config contract into
//! a [`PolicyModel`] and calls the engine on its hot path.
//!
//! **Invariants.**
//! - **Invariant:** deny by default. A decision is `allowed` only when a rule or binding grants
//!   it, and then `by` names that rule or binding.
//! - **Invariant:** a substituted variable never widens a permission. A client id, username,
//!   authentication name or attribute that is empty or contains `+`, `#`, `/`, `$` (or U+0000)
//!   makes every template using it unusable for that client; on top of that, variables are
//!   compared with topic levels piece by piece and never re-parsed (`docs/policy.md`).
//! - **Invariant:** a SUBSCRIBE filter is allowed only if every topic it can match is allowed:
//!   `+` and `#` in the request never widen a permission, `$share/{group}/{filter}` is judged on
//!   `{filter}`, and `$` topics are never covered by templates starting with a wildcard.
//! - **Invariant:** Event Grid namespaces are isolated: a principal carrying a namespace is judged
//!   by that namespace alone; IoT Operations rules judge only principals without one.
//! - **Invariant:** `explain` reaches the same decision as the fast path.
//!
//! **Hot path.** Templates are compiled once into level matchers (literal, whole-level variable,
//! mixed level, `+`, `#`); variables are compared piece by piece against the topic, never
//! substituted into new strings, so `publish`/`subscribe` allocate nothing (reasons are static,
//! rule names are shared `Arc<str>`). Grants are indexed by their first topic level: a hash map
//! for literal first levels, a bucket per variable for variable first levels (resolved once per
//! request), and short lists for wildcard or mixed first levels. With 1,000 rules spread over
//! distinct first levels a request looks at a handful of candidates; only rules whose topics
//! start with a wildcard are scanned on every request. Event Grid group membership of registered
//! clients is decided at compile time (it depends on registry data only), so a binding's group
//! check is one flag; a client that a token admitted (custom JWT authentication) is not in the
//! registry, so its group queries are evaluated per candidate binding, still without allocating
//! (its attributes' template values are computed once, in [`TokenAttributes`]).

mod engine;
mod error;
pub mod model;
pub mod query;
pub mod snapshot;
mod template;
pub mod topic;
pub mod x509;

pub use engine::{
    ALL_CLIENTS_GROUP, Action, Consideration, Decision, Explanation, MAX_TOPIC_TEMPLATES, Outcome,
    PolicyEngine, Principal, RuleRef, TokenAttributes,
};
pub use error::PolicyError;
pub use model::PolicyModel;
