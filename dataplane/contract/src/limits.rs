//! Broker-wide limits, from the broker resource where its spec has a setting, defaults otherwise.

use serde::{Deserialize, Serialize};

/// Limits a node enforces for every client of the broker.
///
/// Sources: IoT Operations `advanced.clients` (`maxSessionExpirySeconds`, `maxMessageExpirySeconds`,
/// `maxPacketSizeBytes`, `maxReceiveMaximum`, `maxKeepAliveSeconds`, `subscriberQueueLimit`); MQ 2023
/// `cardinality.frontend.temporaryResourceLimits` (`maxSessionExpirySecs`, `maxMessageExpirySecs`,
/// `maxQueuedMessages`). The defaults are the node's own defaults, so an empty broker resource
/// changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Largest Session Expiry Interval granted, seconds.
    #[serde(default = "default_session_expiry")]
    pub max_session_expiry_seconds: u32,
    /// Largest Message Expiry Interval kept, seconds; absent = no maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_expiry_seconds: Option<u32>,
    /// Largest packet accepted, bytes.
    #[serde(default = "default_packet_size")]
    pub max_packet_size_bytes: u32,
    /// Upper bound of the Receive Maximum a client may ask for in CONNECT.
    #[serde(default = "default_receive_maximum")]
    pub max_receive_maximum: u16,
    /// Upper bound of a client's Keep Alive, seconds; absent = no maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keep_alive_seconds: Option<u16>,
    /// Messages queued per subscriber before the strategy applies.
    #[serde(default = "default_queue_length")]
    pub subscriber_queue_length: u64,
    /// What happens to a full subscriber queue.
    #[serde(default)]
    pub subscriber_queue_strategy: QueueStrategy,
}

/// Spec `SubscriberMessageDropStrategy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QueueStrategy {
    /// Nothing already queued is dropped: the node applies backpressure to publishers and counts
    /// what it cannot queue.
    #[default]
    None,
    /// The oldest queued message is dropped (and counted).
    DropOldest,
    /// A strategy this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

fn default_session_expiry() -> u32 {
    u32::MAX
}

fn default_packet_size() -> u32 {
    1_048_576
}

fn default_receive_maximum() -> u16 {
    u16::MAX
}

fn default_queue_length() -> u64 {
    10_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_session_expiry_seconds: default_session_expiry(),
            max_message_expiry_seconds: None,
            max_packet_size_bytes: default_packet_size(),
            max_receive_maximum: default_receive_maximum(),
            max_keep_alive_seconds: None,
            subscriber_queue_length: default_queue_length(),
            subscriber_queue_strategy: QueueStrategy::None,
        }
    }
}
