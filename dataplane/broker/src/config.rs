//! The broker node's configuration: one documented struct, read from TOML, overridden by CLI flags.
//!
//! Every field has a default (see [`BrokerConfig::default_toml`] for the commented text that
//! `meridian broker --print-default-config` prints). Values of 0 mean "unlimited" where a field's
//! doc says so, because TOML has no null.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One MQTT listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `mqtt://host:port`, `mqtts://host:port`, `ws://host:port[/path]` or `wss://host:port[/path]`.
    pub url: String,
    /// PEM certificate chain (required for `mqtts`/`wss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (required for `mqtts`/`wss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate chaining to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl ListenerConfig {
    /// A listener without TLS files.
    pub fn plain(url: impl Into<String>) -> ListenerConfig {
        ListenerConfig {
            url: url.into(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
        }
    }
}

/// When acknowledged state reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// PUBACK/PUBREC are sent only after the message is fsynced (group commit keeps this fast).
    Always,
    /// Writes are fsynced every `fsync_interval_ms`; a crash loses at most that window.
    Periodic,
}

/// What happens when a session's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// The newest message is not queued for that subscriber.
    DropNew,
    /// The oldest queued (not yet sent) message is discarded to make room.
    DropOldest,
}

/// Limits, each enforced with the reason code named in its doc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent connections; beyond it CONNACK 0x97 Quota exceeded (3.1.1: 3 Server unavailable).
    pub max_connections: usize,
    /// Largest packet accepted (bytes, fixed header included), announced as Maximum Packet Size;
    /// larger → DISCONNECT 0x95.
    pub max_packet_size: u32,
    /// Longest topic name/filter in bytes; longer → 0x90 (PUBLISH) / SUBACK 0x8F.
    pub max_topic_length: usize,
    /// Most topic levels; more → 0x90 (PUBLISH) / SUBACK 0x8F.
    pub max_topic_levels: usize,
    /// Subscriptions per client; beyond it SUBACK 0x97.
    pub max_subscriptions_per_client: usize,
    /// QoS 1/2 messages queued per session (beyond the in-flight window).
    pub max_queued_messages: usize,
    /// What happens when the queue is full (every drop is counted and published as an event).
    pub overflow_policy: OverflowPolicy,
    /// PUBLISH packets per second per client; above it DISCONNECT 0x96. 0 = unlimited.
    pub max_message_rate: u32,
    /// Our Receive Maximum: unacknowledged inbound QoS 1/2 PUBLISHes; beyond it DISCONNECT 0x93.
    pub receive_maximum: u16,
    /// Topic Alias Maximum announced to clients (inbound aliases). 0 disables inbound aliases.
    pub topic_alias_maximum: u16,
    /// Aliases the broker assigns outbound when the client allows them. 0 disables.
    pub outbound_topic_aliases: u16,
    /// Largest keep alive accepted (seconds); a client asking for more (or 0) gets Server Keep
    /// Alive = this. 0 = no maximum.
    pub server_keep_alive_max: u16,
    /// Largest Session Expiry Interval granted (seconds).
    pub session_expiry_max: u32,
    /// Bytes buffered for one slow connection before QoS 0 messages to it are dropped.
    pub max_outbound_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_packet_size: 1_048_576,
            max_topic_length: 4096,
            max_topic_levels: 32,
            max_subscriptions_per_client: 1000,
            max_queued_messages: 10_000,
            overflow_policy: OverflowPolicy::DropNew,
            max_message_rate: 0,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            outbound_topic_aliases: 64,
            server_keep_alive_max: 0,
            session_expiry_max: u32::MAX,
            max_outbound_buffer: 16 * 1024 * 1024,
        }
    }
}

/// The control plane a node registers with and takes snapshots from (`meridian broker
/// --control-plane URL --broker ARM_ID --token T`). `Debug` redacts the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Base URL of the control plane, e.g. `https://127.0.0.1:8443`.
    pub url: String,
    /// ARM id of the broker resource this node serves.
    pub broker: String,
    /// The node token: sent as bearer to the control plane, and required from it on
    /// `PUT /v1/snapshot`.
    pub token: String,
    /// This node's id in the control plane's registry; default `{hostname}-{admin port}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// A PEM CA bundle trusted for the control plane's HTTPS certificate (besides none: the
    /// system roots are not used, the control plane usually runs on a local CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The URL the control plane pushes to; default `http://{admin address}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for ControlPlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneConfig")
            .field("url", &self.url)
            .field("broker", &self.broker)
            .field("token", &"<redacted>")
            .field("node_id", &self.node_id)
            .field("ca_file", &self.ca_file)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where state lives; absent = nothing persists (sessions and retained live in memory only).
    pub data_dir: Option<PathBuf>,
    pub fsync: FsyncMode,
    /// Fsync interval for `fsync = "periodic"`: the loss window after a crash.
    pub fsync_interval_ms: u64,
    /// Admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); absent = none.
    pub admin: Option<SocketAddr>,
    /// Accept clients without a username even when a password file is configured. Without a
    /// password file every client is accepted (there is nothing to check against).
    pub allow_anonymous: bool,
    /// `username:$argon2id$...` lines (PHC strings), `#` comments.
    pub password_file: Option<PathBuf>,
    /// ACL rules (see the `auth` module docs); once given, anything not allowed is denied.
    pub acl_file: Option<PathBuf>,
    /// PEM public keys (RSA, EC, Ed25519) that verify client JWTs for `ServiceAccountToken`
    /// methods whose resource carries neither keys nor a JWKS URL.
    pub jwt_keys: Vec<PathBuf>,
    /// Seconds between `$SYS/broker/...` statistics publications. 0 disables them.
    pub sys_interval_secs: u64,
    pub limits: Limits,
    pub listeners: Vec<ListenerConfig>,
    /// Address the listeners of applied snapshots bind on (their resources give only ports).
    pub snapshot_listener_host: String,
    /// Take configuration from a control plane (absent: standalone).
    pub control_plane: Option<ControlPlaneConfig>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: None,
            fsync: FsyncMode::Always,
            fsync_interval_ms: 100,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9600))),
            allow_anonymous: false,
            password_file: None,
            acl_file: None,
            jwt_keys: Vec::new(),
            sys_interval_secs: 10,
            limits: Limits::default(),
            listeners: vec![ListenerConfig::plain("mqtt://127.0.0.1:1883")],
            snapshot_listener_host: "0.0.0.0".into(),
            control_plane: None,
        }
    }
}

/// A configuration file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
}

impl BrokerConfig {
    /// Parse TOML text (missing fields take their defaults, unknown fields are errors).
    pub fn from_toml(text: &str) -> Result<BrokerConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Read and parse a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        BrokerConfig::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// The store's fsync interval for `periodic`.
    pub fn fsync_interval(&self) -> Duration {
        Duration::from_millis(self.fsync_interval_ms.max(1))
    }

    /// A configuration for tests and embedding: one TCP listener on an ephemeral loopback port,
    /// no admin endpoint, anonymous clients allowed, no persistence.
    pub fn ephemeral() -> BrokerConfig {
        BrokerConfig {
            admin: None,
            allow_anonymous: true,
            listeners: vec![ListenerConfig::plain("mqtt://127.0.0.1:0")],
            snapshot_listener_host: "127.0.0.1".into(),
            ..BrokerConfig::default()
        }
    }

    /// The documented default configuration as commented TOML (parses back to the defaults).
    pub fn default_toml() -> &'static str {
        DEFAULT_TOML
    }
}

const DEFAULT_TOML: &str = r#"# Meridian broker node configuration (defaults shown). CLI flags override these values.

# Directory for the durable store (sessions, queued QoS 1/2 messages, retained messages).
# Commented out = nothing persists across restarts.
# data_dir = "/var/lib/meridian"

# "always": PUBACK/PUBREC only after the message is fsynced (group commit).
# "periodic": fsync every fsync_interval_ms; a crash may lose that window.
fsync = "always"
fsync_interval_ms = 100

# Admin HTTP endpoint: /metrics (Prometheus), /healthz, /readyz. Comment out to disable.
admin = "127.0.0.1:9600"

# Clients without a username are accepted when true, or when no password_file is set.
allow_anonymous = false
# Lines "username:$argon2id$v=19$..." (PHC strings); '#' starts a comment.
# password_file = "/etc/meridian/passwords"
# Lines "allow|deny publish|subscribe|all <filter> [user <name>|client <id>]"; first match wins;
# once an ACL file is given, anything not allowed is denied.
# acl_file = "/etc/meridian/acl"
# PEM public keys that verify client JWTs (MQTT 5 authentication method K8S-SAT or OAUTH2-JWT)
# for ServiceAccountToken methods from the control plane that carry no keys or JWKS URL.
# jwt_keys = ["/etc/meridian/jwt-issuer.pem"]

# Seconds between $SYS/broker/... statistics; 0 disables them.
sys_interval_secs = 10

# Address that listeners from applied snapshots (control plane) bind on; their resources
# give only ports.
snapshot_listener_host = "0.0.0.0"

# Take configuration from a control plane (flags --control-plane, --broker, --token,
# --node-id, --control-plane-ca, --node-endpoint). The node reports to it, serves
# PUT /v1/snapshot on the admin endpoint and stores the applied snapshot in data_dir.
# [control_plane]
# url = "https://127.0.0.1:8443"
# broker = "/subscriptions/.../providers/Microsoft.IoTOperations/instances/i/brokers/default"
# token = "..."
# node_id = "edge-1"
# ca_file = "/var/lib/meridian/ca.pem"

[limits]
# Concurrent connections (beyond: CONNACK 0x97 Quota exceeded).
max_connections = 100000
# Largest packet in bytes, announced as Maximum Packet Size (beyond: DISCONNECT 0x95).
max_packet_size = 1048576
# Topic length in bytes and number of levels (beyond: 0x90 for PUBLISH, SUBACK 0x8F).
max_topic_length = 4096
max_topic_levels = 32
# Subscriptions per client (beyond: SUBACK 0x97).
max_subscriptions_per_client = 1000
# QoS 1/2 messages queued per session beyond the in-flight window, and what happens when full:
# "drop_new" (the new message is not queued) or "drop_oldest". Every drop is counted.
max_queued_messages = 10000
overflow_policy = "drop_new"
# PUBLISH packets per second per client, 0 = unlimited (beyond: DISCONNECT 0x96).
max_message_rate = 0
# Unacknowledged inbound QoS 1/2 PUBLISHes per client (beyond: DISCONNECT 0x93).
receive_maximum = 1024
# Inbound topic aliases announced to clients; outbound aliases the broker may assign.
topic_alias_maximum = 64
outbound_topic_aliases = 64
# Largest keep alive in seconds (clients asking for more get Server Keep Alive); 0 = no maximum.
server_keep_alive_max = 0
# Largest Session Expiry Interval granted, seconds (4294967295 = never expires).
session_expiry_max = 4294967295
# Bytes buffered for one slow connection before QoS 0 messages to it are dropped.
max_outbound_buffer = 16777216

# One [[listeners]] table per listener: mqtt://, mqtts://, ws://host:port/path, wss://...
# TLS listeners need tls_cert and tls_key (PEM); client_ca enables client certificates.
[[listeners]]
url = "mqtt://127.0.0.1:1883"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_parses_back_to_defaults() {
        let parsed = BrokerConfig::from_toml(BrokerConfig::default_toml()).unwrap();
        assert_eq!(parsed, BrokerConfig::default());
    }

    #[test]
    fn missing_fields_take_defaults_and_unknown_fields_fail() {
        let cfg = BrokerConfig::from_toml("[limits]\nmax_connections = 5\n").unwrap();
        assert_eq!(cfg.limits.max_connections, 5);
        assert_eq!(cfg.limits.receive_maximum, 1024);
        assert!(BrokerConfig::from_toml("bogus = 1\n").is_err());
    }
}
