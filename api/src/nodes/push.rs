//! One pusher task per node: pushes the broker's latest desired snapshot whenever the node is live
//! and behind it, over HTTP (`PUT {endpoint}/v1/snapshot`, bearer = the node's token) or through
//! an in-process [`meridian_contract::SnapshotSink`], and records the node's answer. Transport
//! failures are retried with exponential backoff; a report from the node cuts the wait short.

use std::{sync::Weak, time::Duration};

use meridian_contract::{Applied, BrokerSnapshot, Rejection};

use super::{Inner, Job, NodeRegistry, Transport};

/// Why a push did not end in an answer.
enum Failure {
    /// The node refused the snapshot (HTTP 422): final for that generation.
    Rejected(Rejection),
    /// No usable answer (connection, timeout, other status): retried.
    Unreachable(String),
}

/// The pusher loop of `node_id` (registration `epoch`); ends when the node is removed or the
/// registry is dropped.
pub(super) async fn run(inner: Weak<Inner>, node_id: String, epoch: u64) {
    let mut failures: u32 = 0;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let registry = NodeRegistry { inner: strong };
        match registry.next_job(&node_id, epoch) {
            Job::Stop => return,
            Job::Wait(wake) => {
                drop(registry);
                failures = 0;
                wake.notified().await;
            }
            Job::Push {
                transport,
                snapshot,
                digest,
                body,
                wake,
            } => {
                let generation = snapshot.generation;
                match push(&registry, &transport, snapshot, body).await {
                    Ok(applied) if applied.applied_generation >= generation => {
                        failures = 0;
                        tracing::debug!(node = %node_id, generation, "snapshot applied");
                        registry.record(
                            &node_id,
                            epoch,
                            (generation, &digest),
                            Ok(applied.applied_generation),
                        );
                    }
                    Ok(applied) => {
                        // The protocol answers a stale push with a newer generation, never an
                        // older one: treat it as a broken answer and try again.
                        failures += 1;
                        tracing::warn!(node = %node_id, generation, answered = applied.applied_generation,
                            "node answered an older generation than pushed");
                        backoff(&registry, failures, &wake).await;
                    }
                    Err(Failure::Rejected(mut rejection)) => {
                        failures = 0;
                        rejection.generation = generation;
                        tracing::warn!(node = %node_id, generation, reason = %rejection.message,
                            "node rejected the snapshot");
                        registry.record(&node_id, epoch, (generation, &digest), Err(rejection));
                    }
                    Err(Failure::Unreachable(why)) => {
                        failures += 1;
                        tracing::warn!(node = %node_id, generation, attempt = failures, error = %why,
                            "push failed; retrying");
                        backoff(&registry, failures, &wake).await;
                    }
                }
            }
        }
    }
}

/// Waits `retry_initial × 2^(failures-1)` (capped), or less if the node reports meanwhile.
async fn backoff(registry: &NodeRegistry, failures: u32, wake: &tokio::sync::Notify) {
    let cfg = registry.config();
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    let delay = cfg.retry_initial.saturating_mul(factor).min(cfg.retry_max);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = wake.notified() => {}
    }
}

async fn push(
    registry: &NodeRegistry,
    transport: &Transport,
    snapshot: std::sync::Arc<BrokerSnapshot>,
    body: std::sync::Arc<Vec<u8>>,
) -> Result<Applied, Failure> {
    let limit = registry.config().push_timeout;
    match transport {
        Transport::Local(sink) => {
            match tokio::time::timeout(limit, sink.apply((*snapshot).clone())).await {
                Ok(Ok(applied)) => Ok(applied),
                Ok(Err(rejection)) => Err(Failure::Rejected(rejection)),
                Err(_) => Err(Failure::Unreachable(format!(
                    "no answer within {}",
                    seconds(limit)
                ))),
            }
        }
        Transport::Http { endpoint, token } => {
            let url = format!("{endpoint}/v1/snapshot");
            let response = registry
                .inner
                .http
                .put(&url)
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.as_ref().clone())
                .timeout(limit)
                .send()
                .await
                .map_err(|e| Failure::Unreachable(format!("PUT {url}: {e}")))?;
            match response.status().as_u16() {
                200 => response
                    .json::<Applied>()
                    .await
                    .map_err(|e| Failure::Unreachable(format!("PUT {url}: answer: {e}"))),
                422 => match response.json::<Rejection>().await {
                    Ok(r) => Err(Failure::Rejected(r)),
                    Err(e) => Err(Failure::Unreachable(format!(
                        "PUT {url}: 422 without a rejection body: {e}"
                    ))),
                },
                status => Err(Failure::Unreachable(format!("PUT {url}: HTTP {status}"))),
            }
        }
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
