//! meridian-contract: the versioned config contract between the control plane and broker nodes.
//!
//! Owns [`BrokerSnapshot`], everything one node needs to serve one broker resource (listeners,
//! authentication methods, authorization policies, the Event Grid namespaces bound to the broker,
//! bridges, dataflows, limits), plus the rules both sides check: [`BrokerSnapshot::from_json`]
//! (schema version gate), [`BrokerSnapshot::validate`] (structural rules a node checks before
//! applying) and [`BrokerSnapshot::digest`] (content hash, so a pusher can skip no-op changes).
//!
//! The control plane produces snapshots (`meridian_api::compile`); nodes consume them. This crate
//! depends on neither side: it is the only thing they share, and it must stay that way.
//!
//! # Compatibility rules
//!
//! - `schemaVersion` is the contract's major version ([`SCHEMA_VERSION`]). A node refuses a snapshot
//!   whose `schemaVersion` is newer than its own, with [`ContractError::UnsupportedSchemaVersion`],
//!   before looking at anything else (a newer major version may not even parse).
//! - Within one major version changes are additive: a new field is optional (it has a default), so
//!   older readers ignore it (no type here denies unknown fields) and newer readers fill in the
//!   default when it is absent.
//! - Removing or renaming a field, or changing what a value means, bumps the major version.
//! - A new enum value is compatible only for snapshots that do not use it: older nodes read an
//!   unknown value as `Unknown`, and [`BrokerSnapshot::validate`] rejects a snapshot that contains
//!   one, so a node never serves a configuration it does not understand (it fails closed and
//!   reports why).
//! - Field names are camelCase JSON; enum values use the Azure specs' spelling (`Mqtt`,
//!   `WebSockets`, `Publish`, ...).
//!
//! # References Meridian has no store for
//!
//! The Azure resources name Kubernetes secrets, config maps and Key Vault objects (a listener's
//! manual certificate, the password secret of `usernamePassword`, a trusted-CA config map). Meridian
//! has no secret store yet, so the contract carries those references verbatim (`secretRef`,
//! `trustedCaRef`, `keyVault`, ...) next to optional inline material (`certificatePem`,
//! `credentials`, `trustedCaPem`, ...). A node uses the inline material when present and otherwise
//! resolves the reference locally (for example a password file named after the secret), or fails
//! closed. See `docs/contract.md`.

mod auth;
mod connect;
mod digest;
mod eventgrid;
mod limits;
mod listener;
pub mod node;
mod validate;

use serde::{Deserialize, Serialize};

pub use auth::{
    AuthenticationMethod, AuthenticationPolicy, AuthorizationPolicy, AuthorizationRule,
    BrokerMethod, BrokerResourceRule, CustomAuthSettings, PasswordCredential, Principals,
    StateStoreResourceRule, SvidSettings, TokenSettings, UsernamePasswordSettings, X509Attributes,
    X509Settings,
};
pub use connect::{
    Bridge, BridgeRoute, BridgeTopicMap, Dataflow, DataflowDestination, DataflowEndpoint,
    DataflowOperation, DataflowProfile, DataflowSource, MqttEndpointSettings,
    RemoteBrokerConnection,
};
pub use digest::sha256_hex;
pub use eventgrid::{
    CaCertificate, ClientCertificateAuthentication, ClientGroup, ClientState,
    CustomJwtAuthentication, EventGridNamespace, IssuerCertificate, NamespaceClient,
    PermissionBinding, PermissionType, TopicSpace, ValidationScheme,
};
pub use limits::{Limits, QueueStrategy};
pub use listener::{
    AutomaticCertificate, CertificateIssuer, IssuerRef, Listener, ListenerPort, ListenerTls,
    ManualCertificate, Protocol, ServerCertificate, SubjectAltNames,
};
pub use node::{
    Applied, NodeError, NodeHealth, NodeReport, NodeView, Rejection, ReportAnswer, SnapshotSink,
};
pub use validate::{InvalidSnapshot, MAX_ISSUER_CERTIFICATES, Violation};

/// The contract's major version. Bump it only for incompatible changes (see the crate docs).
pub const SCHEMA_VERSION: u32 = 1;

/// Which Azure resource provider the broker resource comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BrokerFlavor {
    /// `Microsoft.IoTOperations/instances/{i}/brokers/{b}`.
    #[default]
    IoTOperations,
    /// `Microsoft.IoTOperationsMQ/mq/{m}/broker/{b}` (2023-10-04-preview).
    IoTOperationsMq,
    /// A flavour this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// One resource a snapshot was compiled from, with the etag it had at that read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// Full ARM id as stored (the casing the client first used).
    pub id: String,
    /// The resource's etag at the time of the read.
    pub etag: String,
}

/// Everything one node needs to serve one broker: the unit of push and of apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSnapshot {
    /// The contract major version this snapshot was written with ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// The broker resource's ARM id, as given.
    pub broker_id: String,
    /// Which provider the broker comes from.
    #[serde(default)]
    pub flavor: BrokerFlavor,
    /// Monotonic per broker, assigned by the pusher; the compiler leaves 0. Not part of the digest.
    #[serde(default)]
    pub generation: u64,
    /// Every resource this snapshot was compiled from, sorted by id (case-insensitively).
    #[serde(default)]
    pub sources: Vec<SourceRef>,
    /// Listeners (each with one or more ports).
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Authentication policies, referenced by name from listener ports.
    #[serde(default)]
    pub authentications: Vec<AuthenticationPolicy>,
    /// Authorization policies, referenced by name from listener ports.
    #[serde(default)]
    pub authorizations: Vec<AuthorizationPolicy>,
    /// Event Grid namespaces bound to this broker (each an isolated tenant).
    #[serde(default)]
    pub namespaces: Vec<EventGridNamespace>,
    /// MQTT bridges (MQ `mqttBridgeConnector` with its topic maps).
    #[serde(default)]
    pub bridges: Vec<Bridge>,
    /// Dataflow endpoints of the broker's instance.
    #[serde(default)]
    pub dataflow_endpoints: Vec<DataflowEndpoint>,
    /// Dataflow profiles of the broker's instance.
    #[serde(default)]
    pub dataflow_profiles: Vec<DataflowProfile>,
    /// Dataflows of the broker's instance (all profiles).
    #[serde(default)]
    pub dataflows: Vec<Dataflow>,
    /// Broker-wide limits.
    #[serde(default)]
    pub limits: Limits,
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The snapshot was written with a newer major version than this node understands.
    #[error(
        "snapshot schemaVersion {found} is newer than this node supports ({supported}); upgrade the node"
    )]
    UnsupportedSchemaVersion {
        /// The snapshot's version.
        found: u64,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// The document has no usable `schemaVersion`.
    #[error("snapshot has no valid schemaVersion (expected an integer from 1 to {supported})")]
    MissingSchemaVersion {
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// Not JSON, or not the shape of a snapshot.
    #[error("snapshot is not valid JSON for schemaVersion {SCHEMA_VERSION}: {0}")]
    Json(#[from] serde_json::Error),
}

impl BrokerSnapshot {
    /// An empty snapshot of `broker_id` at the current schema version, generation 0, default
    /// limits.
    pub fn new(broker_id: impl Into<String>, flavor: BrokerFlavor) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            broker_id: broker_id.into(),
            flavor,
            generation: 0,
            sources: Vec::new(),
            listeners: Vec::new(),
            authentications: Vec::new(),
            authorizations: Vec::new(),
            namespaces: Vec::new(),
            bridges: Vec::new(),
            dataflow_endpoints: Vec::new(),
            dataflow_profiles: Vec::new(),
            dataflows: Vec::new(),
            limits: Limits::default(),
        }
    }

    /// Reads a snapshot, checking `schemaVersion` first so that a newer major version gets
    /// [`ContractError::UnsupportedSchemaVersion`] rather than a confusing parse error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ContractError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)?;
        Self::from_value(value)
    }

    /// [`BrokerSnapshot::from_json`] for an already parsed document.
    pub fn from_value(value: serde_json::Value) -> Result<Self, ContractError> {
        let version = value
            .get("schemaVersion")
            .and_then(serde_json::Value::as_u64)
            .filter(|v| *v >= 1)
            .ok_or(ContractError::MissingSchemaVersion {
                supported: SCHEMA_VERSION,
            })?;
        if version > u64::from(SCHEMA_VERSION) {
            return Err(ContractError::UnsupportedSchemaVersion {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(serde_json::from_value(value)?)
    }

    /// The snapshot as compact JSON (the wire and on-disk form).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Stable SHA-256 (lower-case hex) of the configuration content: everything except
    /// `generation` and `sources`. Two snapshots with equal digests configure a node identically,
    /// so a pusher can skip the push (and count the new sources as applied at the node's current
    /// generation). Object keys are sorted before hashing, so field order never matters; list
    /// order does (the compiler sorts every list).
    pub fn digest(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut value {
            map.remove("generation");
            map.remove("sources");
        }
        let mut canonical = String::new();
        digest::write_canonical(&value, &mut canonical);
        sha256_hex(canonical.as_bytes())
    }

    /// The listener named `name` (case-insensitive).
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners
            .iter()
            .find(|l| l.name.eq_ignore_ascii_case(name))
    }

    /// The authentication policy named `name` (case-insensitive).
    pub fn authentication(&self, name: &str) -> Option<&AuthenticationPolicy> {
        self.authentications
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name))
    }

    /// The authorization policy named `name` (case-insensitive).
    pub fn authorization(&self, name: &str) -> Option<&AuthorizationPolicy> {
        self.authorizations
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name))
    }

    /// The bound namespace named `name` (case-insensitive), e.g. from a client's TLS SNI.
    pub fn namespace(&self, name: &str) -> Option<&EventGridNamespace> {
        self.namespaces
            .iter()
            .find(|n| n.name.eq_ignore_ascii_case(name))
    }

    /// Whether `id` (any casing) with exactly `etag` is among the sources.
    pub fn includes_source(&self, id: &str, etag: &str) -> bool {
        self.sources
            .iter()
            .any(|s| s.id.eq_ignore_ascii_case(id) && s.etag == etag)
    }
}
