//! Statistics, the `$SYS` topic tree and Prometheus metrics.
//!
//! Every `sys_interval_secs` the node publishes these retained QoS 0 messages (decimal text):
//!
//! | topic | value |
//! |---|---|
//! | `$SYS/broker/clients/connected` | connected clients |
//! | `$SYS/broker/messages/received` | PUBLISH packets received since start |
//! | `$SYS/broker/messages/sent` | PUBLISH packets sent since start |
//! | `$SYS/broker/messages/dropped` | messages dropped since start (all reasons) |
//! | `$SYS/broker/bytes/received` | bytes read from clients |
//! | `$SYS/broker/bytes/sent` | bytes written to clients |
//! | `$SYS/broker/subscriptions/count` | subscriptions (shared memberships included) |
//! | `$SYS/broker/retained/count` | retained messages (excluding `$SYS`) |
//! | `$SYS/broker/uptime` | seconds since start |
//!
//! Lifecycle events are JSON, QoS 0, not retained, on `$SYS/events/{kind}`:
//! `connected` `{client_id, username, protocol, transport, peer, clean_start, session_present}`,
//! `disconnected` `{client_id, reason_code, reason}`, `subscribed` `{client_id, filter, qos}`
//! (`reason_code` instead of `qos` when refused), `unsubscribed` `{client_id, filter}`,
//! `session_expired` `{client_id}`, `message_dropped` `{client_id, topic, reason}` with reason one
//! of `queue_full`, `expired`, `packet_too_large`, `offline_qos0`, `slow_consumer`,
//! `not_authorized`. Live configuration adds `snapshot_applied`
//! `{generation, digest, listeners, revoked, closed}` and `policy_revoked`
//! `{client_id, reason_code, reason, generation}` (a connected client the new snapshot forbids) or
//! `{client_id, filter, reason}` (a subscription removed from a resumed session).
//!
//! The same counters are exported as Prometheus metrics (`meridian_*`), with one more:
//! `meridian_writes_through_total`, the deliveries a publisher's task wrote straight to an idle
//! subscriber's socket instead of waking the subscriber's task (the low-latency path). They go
//! through a per-node recorder, so several nodes in one process (tests) never share a global
//! recorder.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use meridian_codec::{Properties, QoS};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use crate::broker::Shared;
use crate::session::{DropReason, Msg};

const REASONS: [DropReason; 6] = [
    DropReason::QueueFull,
    DropReason::Expired,
    DropReason::TooLarge,
    DropReason::OfflineQos0,
    DropReason::SlowConsumer,
    DropReason::NotAuthorized,
];

/// Hot-path counters: plain atomics, read by `$SYS` and the metrics renderer.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) messages_received: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    /// Outbox writes a publisher's task did for an idle subscriber (`ConnOut::write_now`).
    pub(crate) written_through: AtomicU64,
    pub(crate) connected: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    dropped: [AtomicU64; 6],
}

impl Stats {
    pub(crate) fn drop(&self, reason: DropReason) {
        let i = REASONS.iter().position(|r| *r == reason).unwrap_or(0);
        self.dropped[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn drops(&self) -> Vec<(&'static str, u64)> {
        REASONS
            .iter()
            .zip(&self.dropped)
            .map(|(r, c)| (r.as_str(), c.load(Ordering::Relaxed)))
            .collect()
    }

    fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

fn retained_count(shared: &Shared) -> usize {
    shared
        .retained
        .read()
        .keys()
        .filter(|k| !k.starts_with("$SYS"))
        .count()
}

/// A closure rendering the node's Prometheus text.
pub(crate) fn metrics_renderer(shared: Arc<Shared>) -> Arc<dyn Fn() -> String + Send + Sync> {
    let recorder: Arc<PrometheusRecorder> = Arc::new(PrometheusBuilder::new().build_recorder());
    Arc::new(move || {
        let s = &shared.stats;
        let subs = shared.router.read().len() as f64;
        let retained = retained_count(&shared) as f64;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metrics::with_local_recorder(&*recorder, || {
            metrics::gauge!("meridian_clients_connected").set(load(&s.connected) as f64);
            metrics::counter!("meridian_connections_total").absolute(load(&s.connections_total));
            metrics::counter!("meridian_connections_refused_total")
                .absolute(load(&s.connections_refused));
            metrics::counter!("meridian_messages_received_total")
                .absolute(load(&s.messages_received));
            metrics::counter!("meridian_messages_sent_total").absolute(load(&s.messages_sent));
            metrics::counter!("meridian_bytes_received_total").absolute(load(&s.bytes_received));
            metrics::counter!("meridian_bytes_sent_total").absolute(load(&s.bytes_sent));
            metrics::counter!("meridian_writes_through_total").absolute(load(&s.written_through));
            for (reason, n) in s.drops() {
                metrics::counter!("meridian_messages_dropped_total", "reason" => reason)
                    .absolute(n);
            }
            metrics::gauge!("meridian_subscriptions").set(subs);
            metrics::gauge!("meridian_retained_messages").set(retained);
            metrics::gauge!("meridian_uptime_seconds").set(shared.started.elapsed().as_secs_f64());
        });
        recorder.handle().render()
    })
}

/// Publish the `$SYS/broker/...` statistics once.
pub(crate) fn publish_stats(shared: &Shared) {
    let s = &shared.stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let values: [(&str, u64); 9] = [
        ("clients/connected", load(&s.connected)),
        ("messages/received", load(&s.messages_received)),
        ("messages/sent", load(&s.messages_sent)),
        ("messages/dropped", s.dropped_total()),
        ("bytes/received", load(&s.bytes_received)),
        ("bytes/sent", load(&s.bytes_sent)),
        ("subscriptions/count", shared.router.read().len() as u64),
        ("retained/count", retained_count(shared) as u64),
        ("uptime", shared.started.elapsed().as_secs()),
    ];
    for (name, v) in values {
        let msg = Arc::new(Msg {
            topic: format!("$SYS/broker/{name}"),
            payload: Bytes::from(v.to_string()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            expires_at: None,
        });
        shared.set_retained(&msg);
        let mut commits = Vec::new();
        let mut matches = Vec::new();
        shared.route(&msg, None, &mut commits, &mut matches);
    }
}

pub(crate) fn spawn_publisher(shared: &Arc<Shared>) {
    let secs = shared.cfg.sys_interval_secs;
    if secs == 0 {
        return;
    }
    let s = shared.clone();
    shared.tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(secs));
        loop {
            tokio::select! {
                _ = s.cancel.cancelled() => break,
                _ = tick.tick() => publish_stats(&s),
            }
        }
    });
}
