//! The node agent: how a broker node started with `--control-plane URL --broker ARM_ID --token T`
//! talks to the control plane (the node protocol of `meridian_contract::node`).
//!
//! - **Push endpoint.** `PUT /v1/snapshot` on the admin listener. The bearer token must equal
//!   `T` (compared in constant time, on SHA-256 digests so not even the length leaks), else 401.
//!   The body is a [`BrokerSnapshot`]: 200 with [`meridian_contract::Applied`] when applied (or
//!   when its generation is not newer than the applied one), 422 with
//!   [`meridian_contract::Rejection`] when refused (the node keeps serving its previous snapshot),
//!   400 when the body is not JSON or not a snapshot. A snapshot of a newer schema version is a
//!   422 rejection ("upgrade the node"), not a 400, so the control plane marks it `Failed`
//!   instead of retrying forever.
//! - **Report loop.** `PUT {cp}/meridian/nodes/{nodeId}` with a [`NodeReport`] on start
//!   (registration) and then every `reportIntervalSeconds` of the answer (2 s if it says 0). While the control plane is unreachable (or refuses the report) the loop retries
//!   with exponential backoff from 0.5 s, capped at 30 s, each delay jittered to 50–100 % so a
//!   fleet does not retry in step. Failures are logged at the first attempt and then at powers
//!   of two; the token is never logged.
//!
//! The node serves its stored snapshot before this endpoint opens (see `Broker::start`), so a
//! node restarted while the control plane is down serves what it last acknowledged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use meridian_contract::{BrokerSnapshot, ContractError, NodeReport, Rejection, ReportAnswer};

use crate::broker::{BrokerError, Shared};
use crate::config::ControlPlaneConfig;
use crate::live::NodeHandle;

/// Largest snapshot accepted on `PUT /v1/snapshot`.
const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;
/// Report interval when the answer names none (0).
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(2);
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent of one node: its control-plane settings and HTTP client.
pub(crate) struct Agent {
    base: String,
    token: Arc<str>,
    node_id: Option<String>,
    admin_port: u16,
    http: reqwest::Client,
}

impl Agent {
    pub(crate) fn new(
        cp: &ControlPlaneConfig,
        admin: Option<SocketAddr>,
    ) -> Result<Agent, BrokerError> {
        let bad = |m: String| BrokerError::ControlPlane(m);
        let base = cp.url.trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&base) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(bad(format!(
                    "--control-plane {base:?} is not an http:// or https:// URL"
                )));
            }
        }
        if cp.token.is_empty() {
            return Err(bad("the node token is empty".into()));
        }
        if admin.is_none() {
            return Err(bad(
                "a node with a control plane needs the admin endpoint (--admin): snapshots are pushed to it"
                    .into(),
            ));
        }
        if let Some(id) = &cp.node_id
            && !valid_node_id(id)
        {
            return Err(bad(format!(
                "--node-id {id:?}: use 1-128 letters, digits, '.', '_' or '-'"
            )));
        }
        meridian_net::install_crypto_provider();
        let mut builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
        if let Some(ca) = &cp.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| bad(format!("--control-plane-ca {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("--control-plane-ca {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(bad(format!(
                    "--control-plane-ca {}: no PEM certificate",
                    ca.display()
                )));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        Ok(Agent {
            base,
            token: Arc::from(cp.token.as_str()),
            node_id: cp.node_id.clone(),
            admin_port: admin.map_or(0, |a| a.port()),
            http,
        })
    }

    /// `PUT /v1/snapshot`, to merge into the admin router.
    pub(crate) fn routes(&self, handle: NodeHandle) -> Router {
        Router::new()
            .route("/v1/snapshot", put(put_snapshot))
            .layer(DefaultBodyLimit::max(MAX_SNAPSHOT_BYTES))
            .with_state(PushState {
                handle,
                token_digest: Arc::from(meridian_contract::sha256_hex(self.token.as_bytes())),
            })
    }

    /// Starts the report loop; it ends when the node shuts down.
    pub(crate) fn spawn_reporter(self, shared: &Arc<Shared>, handle: NodeHandle) {
        let port = shared
            .live
            .admin_addr
            .get()
            .map_or(self.admin_port, |a| a.port());
        let node_id = self
            .node_id
            .clone()
            .unwrap_or_else(|| default_node_id(port));
        let cancel = shared.cancel.clone();
        tracing::info!(control_plane = %self.base, node = %node_id, "reporting to the control plane");
        shared.tracker.spawn(async move {
            self.report_loop(node_id, handle, cancel).await;
        });
    }

    async fn report_loop(
        self,
        node_id: String,
        handle: NodeHandle,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let url = format!("{}/meridian/nodes/{node_id}", self.base);
        let mut failures: u32 = 0;
        let mut registered = false;
        loop {
            let report = handle.report();
            let wait = match self.send(&url, &report).await {
                Ok(answer) => {
                    if !registered {
                        tracing::info!(node = %node_id, applied = report.applied_generation,
                            desired = answer.desired_generation, "registered with the control plane");
                        registered = true;
                    } else if failures > 0 {
                        tracing::info!(node = %node_id, failed_reports = failures,
                            "the control plane is reachable again");
                    }
                    failures = 0;
                    let interval = match answer.report_interval_seconds {
                        0 => DEFAULT_REPORT_INTERVAL,
                        n => Duration::from_secs(n.min(3600)),
                    };
                    if answer.desired_generation > report.applied_generation {
                        tracing::debug!(
                            desired = answer.desired_generation,
                            applied = report.applied_generation,
                            "behind the control plane; waiting for its push"
                        );
                    }
                    interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(failures);
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(
                            attempt = failures,
                            retry_in_ms = delay.as_millis() as u64,
                            "report to the control plane failed: {e}"
                        );
                    } else {
                        tracing::debug!(
                            attempt = failures,
                            "report to the control plane failed: {e}"
                        );
                    }
                    delay
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn send(&self, url: &str, report: &NodeReport) -> Result<ReportAnswer, String> {
        let response = self
            .http
            .put(url)
            .bearer_auth(&*self.token)
            .json(report)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let snippet: String = body.chars().take(300).collect();
            return Err(format!("{url}: HTTP {status}: {snippet}"));
        }
        response.json::<ReportAnswer>().await.map_err(|e| {
            format!(
                "{url}: the answer is not a report answer: {}",
                error_chain(&e)
            )
        })
    }
}

/// An error with its causes (`reqwest` keeps "connection refused" in the source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Delay before retry `failures` (1-based): 0.5 s doubling, capped at 30 s, jittered to 50–100 %.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_INITIAL.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(BACKOFF_MAX)
        .mul_f64(0.5 + 0.5 * rand::random::<f64>())
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `{hostname}-{admin port}`, with characters the control plane refuses replaced by `-`.
fn default_node_id(admin_port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    format!("{host}-{admin_port}")
}

#[derive(Clone)]
struct PushState {
    handle: NodeHandle,
    /// SHA-256 (hex) of the node token.
    token_digest: Arc<str>,
}

/// Constant-time equality of the presented token's digest and the expected one.
fn token_matches(presented: &str, expected_digest: &str) -> bool {
    let got = meridian_contract::sha256_hex(presented.as_bytes());
    got.len() == expected_digest.len()
        && got
            .bytes()
            .zip(expected_digest.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .unwrap_or("")
}

fn error_body(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn put_snapshot(State(s): State<PushState>, headers: HeaderMap, body: Bytes) -> Response {
    if !token_matches(bearer(&headers), &s.token_digest) {
        let mut r = error_body(
            StatusCode::UNAUTHORIZED,
            "a bearer token equal to the node token is required".into(),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let snapshot = match BrokerSnapshot::from_json(&body) {
        Ok(s) => s,
        Err(e @ ContractError::UnsupportedSchemaVersion { .. }) => {
            let generation = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("generation").and_then(serde_json::Value::as_u64))
                .unwrap_or(0);
            let rejection = Rejection {
                generation,
                resource_id: None,
                message: e.to_string(),
            };
            return (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(rejection)).into_response();
        }
        Err(e) => return error_body(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match s.handle.apply_snapshot(snapshot).await {
        Ok(applied) => (StatusCode::OK, axum::Json(applied)).into_response(),
        Err(rejection) => (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(rejection)).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_accepts_only_the_exact_token() {
        let digest = meridian_contract::sha256_hex(b"s3cret-token");
        assert!(token_matches("s3cret-token", &digest));
        assert!(!token_matches("s3cret-tokeN", &digest));
        assert!(!token_matches("s3cret-token ", &digest));
        assert!(!token_matches("", &digest));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        for n in 1..40 {
            let d = backoff(n);
            let full = BACKOFF_INITIAL
                .saturating_mul(1u32 << (n - 1).min(16))
                .min(BACKOFF_MAX);
            assert!(d >= full / 2 && d <= full, "attempt {n}: {d:?} vs {full:?}");
        }
        assert!(backoff(30) <= BACKOFF_MAX);
        assert!(backoff(30) >= BACKOFF_MAX / 2);
    }

    #[test]
    fn error_chain_keeps_the_cause() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&e), "error sending request: connection refused");
    }

    #[test]
    fn default_node_id_is_acceptable_to_the_control_plane() {
        let id = default_node_id(9600);
        assert!(valid_node_id(&id), "{id}");
        assert!(id.ends_with("-9600"), "{id}");
    }
}
