//! Event Grid namespaces bound to a broker: each is an isolated tenant with its own clients,
//! client groups, topic spaces, permission bindings and CA certificates.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One `Microsoft.EventGrid/namespaces/{n}` with its children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventGridNamespace {
    /// ARM id of the namespace.
    pub id: String,
    /// Namespace name: clients reach it by TLS SNI `<name>.<any domain>`.
    pub name: String,
    /// `topicSpacesConfiguration.state == Enabled`: when false the namespace admits no MQTT client.
    #[serde(default)]
    pub topic_spaces_enabled: bool,
    /// `clientAuthentication.alternativeAuthenticationNameSources`, spec spelling
    /// (`ClientCertificateSubject`, `ClientCertificateDns`, ...).
    #[serde(default)]
    pub alternative_authentication_name_sources: Vec<String>,
    /// `clientAuthentication.customJwtAuthentication`: clients may authenticate with a JWT of
    /// this issuer instead of a certificate (MQTT 5 only: authentication method `CUSTOM-JWT` or
    /// `OAUTH2-JWT`, the token as authentication data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_jwt_authentication: Option<CustomJwtAuthentication>,
    /// `maximumSessionExpiryInHours`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_session_expiry_in_hours: Option<u32>,
    /// `maximumClientSessionsPerAuthenticationName`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_client_sessions_per_authentication_name: Option<u32>,
    /// Clients, sorted by id.
    #[serde(default)]
    pub clients: Vec<NamespaceClient>,
    /// Client groups, sorted by id. The implicit `$all` group is not listed: nodes provide it.
    #[serde(default)]
    pub client_groups: Vec<ClientGroup>,
    /// Topic spaces, sorted by id.
    #[serde(default)]
    pub topic_spaces: Vec<TopicSpace>,
    /// Permission bindings, sorted by id.
    #[serde(default)]
    pub permission_bindings: Vec<PermissionBinding>,
    /// CA certificates trusted for this namespace's client certificates, sorted by id.
    #[serde(default)]
    pub ca_certificates: Vec<CaCertificate>,
}

/// Spec `CustomJwtAuthenticationSettings`, with the issuer certificates inline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomJwtAuthentication {
    /// The `iss` every token must carry.
    pub token_issuer: String,
    /// Certificates whose public keys verify the tokens' signatures (the spec allows two, for
    /// rotation).
    #[serde(default)]
    pub issuer_certificates: Vec<IssuerCertificate>,
}

/// Spec `EncodedIssuerCertificateInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerCertificate {
    /// Key id: a token whose header names a `kid` is checked with this certificate only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The certificate, PEM or bare base64 DER (as [`CaCertificate::encoded_certificate`]).
    pub encoded_certificate: String,
}

impl IssuerCertificate {
    /// The certificate as a PEM block.
    pub fn pem(&self) -> String {
        armoured(&self.encoded_certificate)
    }
}

/// `namespaces/clients/{c}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceClient {
    /// ARM id.
    pub id: String,
    /// Resource name.
    pub name: String,
    /// The name the client authenticates as (the spec's default, the resource name, is filled in).
    pub authentication_name: String,
    /// Disabled clients are refused.
    #[serde(default)]
    pub state: ClientState,
    /// Attributes (strings, integers or string arrays in the spec), used by client-group queries
    /// and `${client.attributes.X}` in topic templates.
    #[serde(default)]
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// How a client certificate proves this client. Absent: Event Grid's default,
    /// `SubjectMatchesAuthenticationName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authentication: Option<ClientCertificateAuthentication>,
}

/// Spec `ClientState`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientState {
    /// May connect.
    #[default]
    Enabled,
    /// Refused.
    Disabled,
    /// A state this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// Spec `ClientCertificateAuthentication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateAuthentication {
    /// Which certificate field must match the authentication name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_scheme: Option<ValidationScheme>,
    /// For `ThumbprintMatch`: accepted certificate thumbprints.
    #[serde(default)]
    pub allowed_thumbprints: Vec<String>,
}

/// Spec `ClientCertificateValidationScheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ValidationScheme {
    /// Subject (CN) equals the authentication name.
    SubjectMatchesAuthenticationName,
    /// A DNS SAN equals it.
    DnsMatchesAuthenticationName,
    /// A URI SAN equals it.
    UriMatchesAuthenticationName,
    /// An IP SAN equals it.
    IpMatchesAuthenticationName,
    /// An email SAN equals it.
    EmailMatchesAuthenticationName,
    /// The certificate's thumbprint is in `allowedThumbprints`.
    ThumbprintMatch,
    /// A scheme this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// `namespaces/clientGroups/{g}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientGroup {
    /// ARM id.
    pub id: String,
    /// Group name (what permission bindings reference).
    pub name: String,
    /// Event Grid client-group query, e.g. `attributes.type = 'sensor'`.
    #[serde(default)]
    pub query: String,
}

/// `namespaces/topicSpaces/{t}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicSpace {
    /// ARM id.
    pub id: String,
    /// Topic space name (what permission bindings reference).
    pub name: String,
    /// Topic templates (with `${client.authenticationName}` / `${client.attributes.X}`).
    #[serde(default)]
    pub topic_templates: Vec<String>,
}

/// `namespaces/permissionBindings/{p}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermissionBinding {
    /// ARM id.
    pub id: String,
    /// Binding name.
    pub name: String,
    /// The client group (`$all` for every client).
    pub client_group_name: String,
    /// The topic space.
    pub topic_space_name: String,
    /// Publisher or Subscriber.
    pub permission: PermissionType,
}

/// Spec `PermissionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PermissionType {
    /// May publish to the topic space.
    Publisher,
    /// May subscribe to the topic space.
    Subscriber,
    /// A permission this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// `namespaces/caCertificates/{c}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    /// ARM id.
    pub id: String,
    /// Certificate name.
    pub name: String,
    /// As the spec carries it: base64 of the certificate (a PEM body without its armour lines),
    /// or a complete PEM block.
    pub encoded_certificate: String,
}

/// The armour line names of a certificate PEM block.
const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const PEM_END: &str = "-----END CERTIFICATE-----";

impl CaCertificate {
    /// The certificate as a PEM block (armour added when the resource holds bare base64).
    pub fn pem(&self) -> String {
        armoured(&self.encoded_certificate)
    }
}

/// A certificate as a PEM block: a PEM block as it is, bare base64 wrapped in armour.
fn armoured(encoded: &str) -> String {
    let text = encoded.trim();
    if text.starts_with("-----BEGIN") {
        return format!("{text}\n");
    }
    let body: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 64);
    pem.push_str(PEM_BEGIN);
    pem.push('\n');
    // PEM wraps base64 at 64 columns (RFC 7468); base64 is ASCII, so byte chunks are chars.
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(PEM_END);
    pem.push('\n');
    pem
}
