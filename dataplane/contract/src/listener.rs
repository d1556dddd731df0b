//! Listeners: ports, protocols, TLS and which authentication/authorization policies guard them.

use serde::{Deserialize, Serialize};

/// One listener resource (IoT Operations `listeners/{l}`, several ports; MQ `listener/{l}`, one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// ARM id of the listener resource.
    pub id: String,
    /// The listener's name.
    pub name: String,
    /// Ports the node opens for this listener.
    #[serde(default)]
    pub ports: Vec<ListenerPort>,
}

/// One port of a listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerPort {
    /// TCP port. 0 asks the node for an ephemeral port (tests only; never checked for clashes).
    pub port: u16,
    /// MQTT over TCP or over WebSockets.
    #[serde(default)]
    pub protocol: Protocol,
    /// TLS settings; absent means plain TCP/WS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// When false, clients connect without credentials. When true, a client must pass one method
    /// of one of `authenticationRefs` (none named: every CONNECT is refused).
    #[serde(default)]
    pub authentication_enabled: bool,
    /// Names of [`crate::AuthenticationPolicy`]s (IoT Operations `authenticationRef`; MQ
    /// authentications whose `listenerRef` names this listener).
    #[serde(default)]
    pub authentication_refs: Vec<String>,
    /// When false, every authenticated client may do anything. When true, deny by default: an
    /// action is allowed when a rule of one of `authorizationRefs` allows it.
    #[serde(default)]
    pub authorization_enabled: bool,
    /// Names of [`crate::AuthorizationPolicy`]s.
    #[serde(default)]
    pub authorization_refs: Vec<String>,
    /// The Event Grid namespace (name, one of [`crate::BrokerSnapshot::namespaces`]) a client of
    /// this port belongs to when its TLS SNI names no bound namespace. Compiled from the
    /// namespace's `meridian.listeners` tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_namespace: Option<String>,
}

/// The transport protocol of a port (spec `BrokerProtocolType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// MQTT over TCP (or TLS).
    #[default]
    Mqtt,
    /// MQTT over WebSockets (or WSS), subprotocol `mqtt`.
    WebSockets,
    /// A protocol this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// TLS on a port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// Where the server certificate comes from.
    pub certificate: ServerCertificate,
    /// An extra PEM bundle of CAs trusted for client certificates (mTLS). The node also trusts the
    /// CAs of the X.509 methods of the port's authentication policies and, for a client reaching
    /// a namespace, that namespace's CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_pem: Option<String>,
}

/// The server certificate of a TLS port, by the spec's `mode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode")]
pub enum ServerCertificate {
    /// The node (or the control plane) issues the certificate.
    Automatic(AutomaticCertificate),
    /// The operator provides the certificate.
    Manual(ManualCertificate),
    /// A mode this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// Who issues an automatic certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CertificateIssuer {
    /// Issue from Meridian's local CA (the one the control plane serves HTTPS with). The spec's
    /// cert-manager `issuerRef` is carried for reference only.
    #[default]
    LocalCa,
    /// An issuer this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// `mode: Automatic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomaticCertificate {
    /// Who issues the certificate: always the local CA today.
    #[serde(default)]
    pub issuer: CertificateIssuer,
    /// Subject alternative names to put in the certificate.
    #[serde(default)]
    pub san: SubjectAltNames,
    /// Requested lifetime (Go duration syntax as in the spec, e.g. `720h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Renew this long before expiry (Go duration syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<String>,
    /// Key algorithm as the spec names it (`Ec256`, `Rsa2048`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_algorithm: Option<String>,
    /// The spec's cert-manager issuer, carried (Meridian has no cert-manager).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// A cert-manager issuer reference, carried verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// API group.
    #[serde(default)]
    pub group: String,
    /// `Issuer` or `ClusterIssuer`.
    #[serde(default)]
    pub kind: String,
    /// Issuer name.
    #[serde(default)]
    pub name: String,
}

/// Subject alternative names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubjectAltNames {
    /// DNS names.
    #[serde(default)]
    pub dns: Vec<String>,
    /// IP addresses.
    #[serde(default)]
    pub ip: Vec<String>,
}

/// `mode: Manual`: an operator-provided certificate. `Debug` redacts the private key.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManualCertificate {
    /// The Kubernetes secret the resource names (IoT Operations `manual.secretRef`, MQ
    /// `manual.secretName`); a node resolves it locally when no PEM is inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// MQ `manual.secretNamespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_namespace: Option<String>,
    /// MQ `keyVault` certificate reference, carried verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_vault: Option<serde_json::Value>,
    /// The certificate chain, PEM, when the control plane has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    /// The private key, PEM, when the control plane has it (never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
}

impl std::fmt::Debug for ManualCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManualCertificate")
            .field("secret_ref", &self.secret_ref)
            .field("secret_namespace", &self.secret_namespace)
            .field("key_vault", &self.key_vault)
            .field("certificate_pem", &self.certificate_pem)
            .field(
                "private_key_pem",
                &self.private_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}
