//! The authorization model: our own serde types mirroring the resource contracts, which the broker
//! builds from the config contract (or a config file) and hands to [`crate::PolicyEngine::compile`].
//!
//! Field names follow the Azure specs in `shared/reference/azure-specs/` (camelCase) so JSON cut
//! from a resource body deserializes directly:
//! - IoT Operations `brokers/authorizations` (2024-11-01+): `authorizationPolicies.rules[]` with
//!   `principals {clientIds, usernames, attributes}` and `brokerResources[] {method, clientIds,
//!   topics}`. The IoT Operations MQ 2023-10-04-preview spelling `clientids` is accepted too.
//!   `stateStoreResources` are not MQTT topics and are ignored here.
//! - Event Grid namespaces (2023-12-15-preview, 2025-02-15): `clients`, `clientGroups`,
//!   `topicSpaces`, `permissionBindings`, each flattened to the properties that decide access.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything the engine authorizes against.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyModel {
    /// IoT Operations broker authorizations (one per `brokers/authorizations` resource). They
    /// apply to principals without an Event Grid namespace.
    #[serde(default)]
    pub iot_operations: Vec<IotAuthorization>,
    /// Event Grid namespaces, each an isolated tenant.
    #[serde(default)]
    pub event_grid: Vec<EventGridNamespace>,
}

/// One IoT Operations `BrokerAuthorization` resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IotAuthorization {
    /// The resource name; decisions and errors name it.
    pub name: String,
    /// `authorizationPolicies.rules`.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

/// `AuthorizationRule` (2024-11-01) / `AuthorizationBasicRule` (2023-10-04-preview).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    #[serde(default)]
    pub principals: PrincipalDefinition,
    #[serde(default)]
    pub broker_resources: Vec<BrokerResourceRule>,
}

/// Which clients a rule applies to. The lists are alternatives: a client matches when its client
/// id is listed, or its username is listed, or it has every pair of at least one attribute map.
/// An empty attribute map matches no one (generated examples carry `[{}]`; treating it as
/// "everyone" would turn a placeholder into a grant).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrincipalDefinition {
    #[serde(default, alias = "clientids")]
    pub client_ids: Vec<String>,
    #[serde(default)]
    pub usernames: Vec<String>,
    #[serde(default)]
    pub attributes: Vec<BTreeMap<String, String>>,
}

/// `BrokerResourceDefinitionMethods`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BrokerMethod {
    Connect,
    Publish,
    Subscribe,
}

/// `BrokerResourceRule` / `ResourceInfoDefinition`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerResourceRule {
    pub method: BrokerMethod,
    /// For `Connect`: client-id patterns (`*` and `{principal.*}` variables allowed); empty means
    /// any client id. Ignored for other methods.
    #[serde(default, alias = "clientids")]
    pub client_ids: Vec<String>,
    /// For `Publish`/`Subscribe`: topic filters with `{principal.*}` variables. Ignored for
    /// `Connect` (the docs say a Connect resource carries no topics).
    #[serde(default)]
    pub topics: Vec<String>,
}

/// One Event Grid namespace: its client registry and authorization resources.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventGridNamespace {
    pub name: String,
    #[serde(default)]
    pub clients: Vec<EventGridClient>,
    #[serde(default)]
    pub client_groups: Vec<ClientGroup>,
    #[serde(default)]
    pub topic_spaces: Vec<TopicSpace>,
    #[serde(default)]
    pub permission_bindings: Vec<PermissionBinding>,
}

/// A client attribute value: the spec allows int, bool, string and string[].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    Bool(bool),
    Int(i64),
    String(String),
    StringList(Vec<String>),
}

impl AttributeValue {
    /// The text substituted for `${client.attributes.NAME}`; arrays have none (a template using
    /// an array attribute is unusable for that client).
    pub fn as_template_value(&self) -> Option<String> {
        match self {
            AttributeValue::Bool(b) => Some(b.to_string()),
            AttributeValue::Int(n) => Some(n.to_string()),
            AttributeValue::String(s) => Some(s.clone()),
            AttributeValue::StringList(_) => None,
        }
    }
}

/// `ClientState`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientState {
    #[default]
    Enabled,
    Disabled,
}

/// A registered Event Grid client (`namespaces/clients`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventGridClient {
    /// The resource name.
    pub name: String,
    /// Defaults to the resource name. Unique per namespace ignoring ASCII case.
    #[serde(default)]
    pub authentication_name: Option<String>,
    #[serde(default)]
    pub state: ClientState,
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeValue>,
    /// How its certificate is checked at authentication (see [`crate::x509`]); the authorization
    /// engine does not read it.
    #[serde(default)]
    pub client_certificate_authentication: Option<crate::x509::ClientCertificateAuthentication>,
}

impl EventGridClient {
    /// The authentication name, defaulting to the resource name.
    pub fn effective_authentication_name(&self) -> &str {
        self.authentication_name.as_deref().unwrap_or(&self.name)
    }
}

/// `namespaces/clientGroups`. The built-in `$all` group needs no declaration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientGroup {
    pub name: String,
    pub query: String,
}

/// `namespaces/topicSpaces`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicSpace {
    pub name: String,
    #[serde(default)]
    pub topic_templates: Vec<String>,
}

/// `PermissionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Permission {
    Publisher,
    Subscriber,
}

/// `namespaces/permissionBindings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermissionBinding {
    pub name: String,
    pub client_group_name: String,
    pub topic_space_name: String,
    pub permission: Permission,
}
