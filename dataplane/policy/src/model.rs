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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Policies {
        rules: Vec<AuthorizationRule>,
    }

    /// `authorizationPolicies` of the 2024-11-01 `BrokerAuthorization_CreateOrUpdate_MaximumSet_Gen`
    /// example, state store resources and all.
    #[test]
    fn iot_operations_2024_example_deserializes() {
        let json = r#"{"cache": "Enabled", "rules": [{
            "brokerResources": [{"method": "Connect", "clientIds": ["nlc"], "topics": ["wvuca"]}],
            "principals": {"attributes": [{"key5526": "nydhzdhbldygqcn"}],
                           "clientIds": ["smopeaeddsygz"], "usernames": ["iozngyqndrteikszkbasinzdjtm"]},
            "stateStoreResources": [{"keyType": "Pattern", "keys": ["tkounsqtwvzyaklxjqoerpu"], "method": "Read"}]
        }]}"#;
        let p: Policies = serde_json::from_str(json).expect("deserializes");
        let rule = &p.rules[0];
        assert_eq!(rule.principals.client_ids, vec!["smopeaeddsygz"]);
        assert_eq!(rule.principals.attributes[0]["key5526"], "nydhzdhbldygqcn");
        assert_eq!(rule.broker_resources[0].method, BrokerMethod::Connect);
        assert_eq!(rule.broker_resources[0].client_ids, vec!["nlc"]);
    }

    /// The 2023-10-04-preview spelling `clientids`.
    #[test]
    fn iot_operations_mq_2023_example_deserializes() {
        let json = r#"{"enableCache": true, "rules": [{
            "brokerResources": [{"method": "Connect", "topics": ["v"]}],
            "principals": {"attributes": [{}], "clientids": ["smrfzvniq"], "usernames": ["jtwwmsrzriat"]}
        }]}"#;
        let p: Policies = serde_json::from_str(json).expect("deserializes");
        assert_eq!(p.rules[0].principals.client_ids, vec!["smrfzvniq"]);
        assert!(p.rules[0].principals.attributes[0].is_empty());
    }

    /// The properties of the `Clients_CreateOrUpdate` example plus the resource name.
    #[test]
    fn event_grid_client_example_deserializes_with_typed_attributes() {
        let json = r#"{"name": "exampleClientName1", "state": "Enabled",
            "clientCertificateAuthentication": {"validationScheme": "SubjectMatchesAuthenticationName"},
            "attributes": {"room": "345", "floor": 3, "deviceTypes": ["Fan", "Light", "AC"], "ok": true},
            "description": "This is a test client"}"#;
        let c: EventGridClient = serde_json::from_str(json).expect("deserializes");
        assert_eq!(c.effective_authentication_name(), "exampleClientName1");
        assert_eq!(c.attributes["room"], AttributeValue::String("345".into()));
        assert_eq!(c.attributes["floor"], AttributeValue::Int(3));
        assert_eq!(c.attributes["ok"], AttributeValue::Bool(true));
        assert_eq!(
            c.attributes["deviceTypes"],
            AttributeValue::StringList(vec!["Fan".into(), "Light".into(), "AC".into()])
        );
        assert_eq!(
            c.attributes["floor"].as_template_value().as_deref(),
            Some("3")
        );
        assert_eq!(c.attributes["deviceTypes"].as_template_value(), None);
        assert_eq!(
            c.client_certificate_authentication
                .expect("present")
                .validation_scheme,
            crate::x509::ValidationScheme::SubjectMatchesAuthenticationName
        );
    }

    #[test]
    fn permission_binding_example_deserializes() {
        let json = r#"{"name": "examplePermissionBindingName1", "topicSpaceName": "exampleTopicSpaceName1",
            "clientGroupName": "exampleClientGroupName1", "permission": "Publisher"}"#;
        let b: PermissionBinding = serde_json::from_str(json).expect("deserializes");
        assert_eq!(b.permission, Permission::Publisher);
        assert_eq!(b.client_group_name, "exampleClientGroupName1");
    }
}
