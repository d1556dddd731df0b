//! Authentication methods and authorization policies of a broker (IoT Operations and MQ 2023
//! shapes normalized into one form).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One authentication resource: a list of methods, any of which may authenticate a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationPolicy {
    /// ARM id of the authentication resource.
    pub id: String,
    /// Its name (what listener ports reference).
    pub name: String,
    /// Methods, in the resource's order (a node tries them in this order).
    #[serde(default)]
    pub methods: Vec<AuthenticationMethod>,
}

/// One authentication method, tagged by `method` as in the IoT Operations spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method")]
pub enum AuthenticationMethod {
    /// MQTT username/password checked against argon2 hashes (MQ 2023 `usernamePassword`).
    UsernamePassword(UsernamePasswordSettings),
    /// X.509 client certificates over mTLS.
    X509(X509Settings),
    /// A JWT in CONNECT (IoT Operations `ServiceAccountToken`, `K8S-SAT`; also plain JWT).
    ServiceAccountToken(TokenSettings),
    /// An HTTPS call to a custom authentication server.
    Custom(CustomAuthSettings),
    /// SPIFFE SVID (MQ 2023 `svid`): carried; nodes have no SPIFFE agent, so it authenticates
    /// nobody.
    Svid(SvidSettings),
    /// A method this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// `UsernamePassword` settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsernamePasswordSettings {
    /// The Kubernetes secret holding the password file, as the resource names it (MQ
    /// `secretName`); resolved by the node when `credentials` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// MQ `keyVault` reference, carried verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_vault: Option<serde_json::Value>,
    /// Inline credentials, when the control plane has them.
    #[serde(default)]
    pub credentials: Vec<PasswordCredential>,
}

/// One username with its password hash. `Debug` redacts the hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PasswordCredential {
    /// MQTT username.
    pub username: String,
    /// Argon2 PHC string (`$argon2id$v=19$...`); never a plain password.
    pub password_hash: String,
    /// Attributes this user gets (usable in authorization rules as `{principal.attributes.X}`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl std::fmt::Debug for PasswordCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordCredential")
            .field("username", &self.username)
            .field("password_hash", &"<redacted>")
            .field("attributes", &self.attributes)
            .finish()
    }
}

/// `X509` settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Settings {
    /// The trusted client CA config map the resource names (IoT Operations `trustedClientCaCert`,
    /// default `client-ca`; MQ `trustedClientCaCertConfigMap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_ca_ref: Option<String>,
    /// The trusted CA bundle, PEM, when the control plane has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_ca_pem: Option<String>,
    /// IoT Operations `authorizationAttributes`: entry name → certificate subject and the
    /// attributes a client whose certificate (or a CA in its chain) has that subject gets.
    #[serde(default)]
    pub authorization_attributes: BTreeMap<String, X509Attributes>,
    /// MQ `attributes.secretName`: a secret holding the attribute map, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes_secret_ref: Option<String>,
}

/// Attributes granted to certificates with one subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attributes {
    /// Certificate subject, e.g. `CN=thermostat-1`.
    pub subject: String,
    /// Attributes granted.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// `ServiceAccountToken` (JWT) settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenSettings {
    /// Accepted `aud` values (at least one must match).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Required `iss`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Verification keys, PEM (RSA/EC public keys). The resources carry none: a node uses its own
    /// configured keys when this and `jwksUrl` are empty.
    #[serde(default)]
    pub keys_pem: Vec<String>,
    /// A JWKS URL to fetch verification keys from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
}

/// `Custom` settings: the node asks an HTTPS server whether to admit a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAuthSettings {
    /// The server's URL (the spec requires `https://`).
    pub endpoint: String,
    /// Extra headers sent with every call.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How long to wait for an answer; a timeout refuses the client (fail closed).
    #[serde(default = "default_custom_timeout")]
    pub timeout_seconds: u32,
    /// The config map with the CA that signs the server's certificate, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_ref: Option<String>,
    /// That CA, PEM, when the control plane has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_pem: Option<String>,
    /// The secret with the client certificate the node presents to the server, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<String>,
}

impl CustomAuthSettings {
    /// The timeout when the resource sets none (the specs define no timeout field).
    pub const DEFAULT_TIMEOUT_SECONDS: u32 = 10;
}

fn default_custom_timeout() -> u32 {
    CustomAuthSettings::DEFAULT_TIMEOUT_SECONDS
}

/// `Svid` settings (MQ 2023), carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SvidSettings {
    /// SPIFFE workload API socket.
    #[serde(default)]
    pub agent_socket_path: String,
}

/// One authorization resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// ARM id of the authorization resource.
    pub id: String,
    /// Its name (what listener ports reference).
    pub name: String,
    /// Whether decisions may be cached (IoT Operations `cache: Enabled`, MQ `enableCache`).
    #[serde(default)]
    pub cache: bool,
    /// Allow rules; anything no rule allows is denied.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

/// One rule: who (principals) may do what (broker resources).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Who the rule applies to (any listed principal matches).
    #[serde(default)]
    pub principals: Principals,
    /// What they may do.
    #[serde(default)]
    pub broker_resources: Vec<BrokerResourceRule>,
    /// IoT Operations state store rules, carried (Meridian has no state store yet).
    #[serde(default)]
    pub state_store_resources: Vec<StateStoreResourceRule>,
}

/// Principals of a rule (spec `PrincipalDefinition`; MQ's `clientids` maps to `clientIds`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Principals {
    /// Client ids.
    #[serde(default)]
    pub client_ids: Vec<String>,
    /// Usernames.
    #[serde(default)]
    pub usernames: Vec<String>,
    /// Attribute sets; a client matches one when it has every attribute of the set.
    #[serde(default)]
    pub attributes: Vec<BTreeMap<String, String>>,
}

/// A broker action and what it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerResourceRule {
    /// Connect, Publish or Subscribe.
    pub method: BrokerMethod,
    /// For Connect: the client ids allowed (may use `{principal.*}` variables).
    #[serde(default)]
    pub client_ids: Vec<String>,
    /// For Publish/Subscribe: topic names or filters (may use `{principal.*}` variables).
    #[serde(default)]
    pub topics: Vec<String>,
}

/// Broker actions (spec `BrokerResourceDefinitionMethods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BrokerMethod {
    /// CONNECT.
    Connect,
    /// PUBLISH (including wills and retained messages).
    Publish,
    /// SUBSCRIBE.
    Subscribe,
    /// A method this node does not know (rejected by `validate`).
    #[serde(other)]
    Unknown,
}

/// A state store rule, carried with the spec's strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateStoreResourceRule {
    /// `Pattern`, `String` or `Binary`.
    #[serde(default)]
    pub key_type: String,
    /// Keys.
    #[serde(default)]
    pub keys: Vec<String>,
    /// `Read`, `Write` or `ReadWrite`.
    #[serde(default)]
    pub method: String,
}
