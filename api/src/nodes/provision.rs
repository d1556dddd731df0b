//! [`NodeProvisioner`]: the engine's [`Provisioner`] backed by broker nodes.
//!
//! After a PUT it asks for a compile round of every broker the resource affects, then waits until
//! every live node of each broker whose snapshot includes the resource serves a generation at
//! least as new as the one that compiled it in. Outcomes:
//!
//! - no broker's snapshot includes the resource (kafka connectors, an unbound namespace, an
//!   instance before it has brokers, ...) → `Succeeded` as soon as the rounds are done;
//! - a broker with no live node → `Succeeded` once compiled: the desired state is stored and
//!   pushed to nodes when they register;
//! - the compiled snapshot breaks the contract's rules → `Failed` (`InvalidConfiguration`), naming
//!   the resource at fault; nothing is pushed;
//! - a live node rejects the generation → `Failed` (`ConfigurationRejected`) with the node's
//!   reason, `target` = the resource the node named (else this resource);
//! - live nodes that neither apply nor reject within [`super::NodeConfig::provision_timeout`] →
//!   `Failed` (`ProvisioningTimeout`).
//!
//! A DELETE recompiles the affected brokers too ([`Provisioner::deprovisioned`]), including brokers
//! under a deleted instance/mq, which [`brokers_affected_by`] can no longer find in the store.

use std::time::Instant;

use meridian_contract::SourceRef;
use serde_json::Value;

use super::{NodeProgress, NodeRegistry, Outcome};
use crate::{
    compile::brokers_affected_by,
    engine::{ProvisionError, ProvisionFuture, Provisioner},
};

/// Provisioning that waits for the broker nodes of a [`NodeRegistry`].
#[derive(Debug, Clone)]
pub struct NodeProvisioner {
    registry: NodeRegistry,
}

impl NodeProvisioner {
    /// A provisioner over `registry`.
    pub fn new(registry: NodeRegistry) -> Self {
        Self { registry }
    }

    /// The registry.
    pub fn registry(&self) -> &NodeRegistry {
        &self.registry
    }

    async fn provision_id(&self, id: &str) -> Result<(), ProvisionError> {
        let deadline = Instant::now() + self.registry.config().provision_timeout;
        let brokers = brokers_affected_by(self.registry.store().as_ref(), id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, resource = %id, "finding the brokers a change affects failed");
                ProvisionError::new(
                    "InternalError",
                    "The brokers this resource affects could not be determined; retry the request.",
                )
            })?;
        // Ask for every round first, so the brokers compile and push in parallel.
        let tickets: Vec<(String, u64)> = brokers
            .iter()
            .map(|b| (b.to_lowercase(), self.registry.recompile(b)))
            .collect();
        for (broker_key, ticket) in tickets {
            self.wait_broker(&broker_key, ticket, id, deadline).await?;
        }
        Ok(())
    }

    /// Waits for one broker's round `ticket` and then for its live nodes.
    async fn wait_broker(
        &self,
        broker_key: &str,
        ticket: u64,
        id: &str,
        deadline: Instant,
    ) -> Result<(), ProvisionError> {
        // Subscribe before looking, so no change between the look and the wait is missed.
        let mut changes = self.registry.subscribe(broker_key);
        let mut generation = None;
        loop {
            if generation.is_none()
                && let Some(outcome) = self.registry.outcome_after(broker_key, ticket)
            {
                match &*outcome {
                    Outcome::Absent => return Ok(()),
                    Outcome::Failed {
                        resource_id,
                        message,
                    } => {
                        let code = if resource_id.is_some() {
                            "InvalidConfiguration"
                        } else {
                            "InternalError"
                        };
                        let e = ProvisionError::new(code, message.clone());
                        return Err(match resource_id {
                            Some(r) => e.with_target(r.clone()),
                            None => e,
                        });
                    }
                    Outcome::Invalid {
                        sources,
                        violations,
                    } => {
                        if !includes(sources, id) {
                            return Ok(());
                        }
                        let own: Vec<&str> = violations
                            .iter()
                            .filter(|v| v.resource_id.eq_ignore_ascii_case(id))
                            .map(|v| v.message.as_str())
                            .collect();
                        if !own.is_empty() {
                            return Err(ProvisionError::new(
                                "InvalidConfiguration",
                                own.join("; "),
                            )
                            .with_target(id));
                        }
                        let all: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
                        let culprit = violations
                            .first()
                            .map_or(id.to_owned(), |v| v.resource_id.clone());
                        return Err(ProvisionError::new(
                            "InvalidConfiguration",
                            format!(
                                "Not applied: the broker's configuration is invalid: {}",
                                all.join("; ")
                            ),
                        )
                        .with_target(culprit));
                    }
                    Outcome::Desired {
                        generation: g,
                        sources,
                    } => {
                        if !includes(sources, id) {
                            return Ok(());
                        }
                        generation = Some(*g);
                    }
                }
            }
            let mut wake_at = deadline;
            let mut waiting_on = Vec::new();
            if let Some(g) = generation {
                match self.registry.progress(broker_key, g) {
                    NodeProgress::Applied => return Ok(()),
                    NodeProgress::Rejected { node_id, rejection } => {
                        let target = rejection
                            .resource_id
                            .clone()
                            .unwrap_or_else(|| id.to_owned());
                        return Err(ProvisionError::new(
                            "ConfigurationRejected",
                            format!(
                                "Broker node '{node_id}' rejected the configuration: {}",
                                rejection.message
                            ),
                        )
                        .with_target(target));
                    }
                    NodeProgress::Pending { nodes, until } => {
                        waiting_on = nodes;
                        if let Some(u) = until {
                            wake_at = wake_at.min(u);
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                let what = match generation {
                    Some(g) => format!(
                        "broker nodes {} did not apply generation {g}",
                        waiting_on.join(", ")
                    ),
                    None => "the broker's configuration was not compiled".to_owned(),
                };
                return Err(ProvisionError::new(
                    "ProvisioningTimeout",
                    format!(
                        "Provisioning timed out after {} s: {what}.",
                        self.registry.config().provision_timeout.as_secs()
                    ),
                )
                .with_target(id));
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(wake_at.into()).await;
                    }
                }
                _ = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
    }
}

fn includes(sources: &[SourceRef], id: &str) -> bool {
    // By id only: a newer etag of the same resource is a newer state that includes this one.
    sources.iter().any(|s| s.id.eq_ignore_ascii_case(id))
}

impl Provisioner for NodeProvisioner {
    fn provision(&self, resource: Value) -> ProvisionFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            let Some(id) = resource.get("id").and_then(Value::as_str) else {
                return Ok(());
            };
            self.provision_id(id).await
        })
    }

    fn deprovisioned(&self, id: String) -> ProvisionFuture<'_, ()> {
        Box::pin(async move {
            let mut brokers = match brokers_affected_by(self.registry.store().as_ref(), &id).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, resource = %id, "finding the brokers a delete affects failed");
                    Vec::new()
                }
            };
            // Brokers under a deleted instance/mq are gone from the store; the registry still
            // knows them.
            brokers.extend(self.registry.known_brokers_under(&id));
            brokers.sort_by_key(|b| b.to_lowercase());
            brokers.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
            for b in brokers {
                self.registry.recompile(&b);
            }
        })
    }
}
