//! The config contract ([`meridian_contract::BrokerSnapshot`]) as a [`PolicyModel`]: the one
//! conversion both the broker node (to enforce) and the control plane (to explain) use, so an
//! explanation is about exactly the policy a node enforces.

use std::collections::BTreeMap;

use meridian_contract::{
    AuthorizationPolicy, BrokerMethod, BrokerSnapshot, ClientState, EventGridNamespace,
    PermissionType, ValidationScheme,
};

use crate::model as pm;
use crate::{PolicyEngine, PolicyModel, x509};

/// Why a snapshot's policy cannot be compiled: the resource at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SnapshotPolicyError {
    /// ARM id of the resource at fault.
    pub resource_id: String,
    pub message: String,
}

/// Every authorization of the snapshot plus every enabled Event Grid namespace in one engine:
/// what a port with all of them would enforce. `authorizations` limits the IoT Operations
/// authorizations to those names (case-insensitive); `None` takes them all.
pub fn broker_engine(
    snap: &BrokerSnapshot,
    authorizations: Option<&[String]>,
) -> Result<PolicyEngine, SnapshotPolicyError> {
    let mut model = PolicyModel {
        iot_operations: Vec::new(),
        event_grid: Vec::new(),
    };
    for a in &snap.authorizations {
        if authorizations
            .is_some_and(|names| !names.iter().any(|n| n.eq_ignore_ascii_case(&a.name)))
        {
            continue;
        }
        model
            .iot_operations
            .push(iot_authorization(a).map_err(|message| SnapshotPolicyError {
                resource_id: a.id.clone(),
                message,
            })?);
    }
    for ns in snap.namespaces.iter().filter(|n| n.topic_spaces_enabled) {
        model
            .event_grid
            .push(event_grid_namespace(ns).map_err(|(resource_id, message)| {
                SnapshotPolicyError {
                    resource_id,
                    message,
                }
            })?);
    }
    PolicyEngine::compile(&model).map_err(|e| SnapshotPolicyError {
        resource_id: snap.broker_id.clone(),
        message: e.to_string(),
    })
}

/// An IoT Operations authorization of the contract as the policy model sees it.
pub fn iot_authorization(a: &AuthorizationPolicy) -> Result<pm::IotAuthorization, String> {
    let mut rules = Vec::with_capacity(a.rules.len());
    for (i, r) in a.rules.iter().enumerate() {
        let mut resources = Vec::with_capacity(r.broker_resources.len());
        for (j, b) in r.broker_resources.iter().enumerate() {
            let method = match b.method {
                BrokerMethod::Connect => pm::BrokerMethod::Connect,
                BrokerMethod::Publish => pm::BrokerMethod::Publish,
                BrokerMethod::Subscribe => pm::BrokerMethod::Subscribe,
                BrokerMethod::Unknown => {
                    return Err(format!("rules[{i}].brokerResources[{j}]: unknown method"));
                }
            };
            resources.push(pm::BrokerResourceRule {
                method,
                client_ids: b.client_ids.clone(),
                topics: b.topics.clone(),
            });
        }
        rules.push(pm::AuthorizationRule {
            principals: pm::PrincipalDefinition {
                client_ids: r.principals.client_ids.clone(),
                usernames: r.principals.usernames.clone(),
                attributes: r.principals.attributes.clone(),
            },
            broker_resources: resources,
        });
    }
    Ok(pm::IotAuthorization {
        name: a.name.clone(),
        rules,
    })
}

/// A namespace as the policy model sees it; errors name the child resource at fault.
pub fn event_grid_namespace(
    ns: &EventGridNamespace,
) -> Result<pm::EventGridNamespace, (String, String)> {
    let mut clients = Vec::with_capacity(ns.clients.len());
    for c in &ns.clients {
        let mut attributes = BTreeMap::new();
        for (k, v) in &c.attributes {
            let value: pm::AttributeValue = serde_json::from_value(v.clone()).map_err(|_| {
                (
                    c.id.clone(),
                    format!("attribute '{k}' must be a string, integer, boolean or string array"),
                )
            })?;
            attributes.insert(k.clone(), value);
        }
        let state = match c.state {
            ClientState::Enabled => pm::ClientState::Enabled,
            ClientState::Disabled => pm::ClientState::Disabled,
            ClientState::Unknown => return Err((c.id.clone(), "unknown client state".into())),
        };
        let cert = match &c.certificate_authentication {
            None => None,
            Some(a) => Some(x509::ClientCertificateAuthentication {
                validation_scheme: match a.validation_scheme {
                    None | Some(ValidationScheme::SubjectMatchesAuthenticationName) => {
                        x509::ValidationScheme::SubjectMatchesAuthenticationName
                    }
                    Some(ValidationScheme::DnsMatchesAuthenticationName) => {
                        x509::ValidationScheme::DnsMatchesAuthenticationName
                    }
                    Some(ValidationScheme::UriMatchesAuthenticationName) => {
                        x509::ValidationScheme::UriMatchesAuthenticationName
                    }
                    Some(ValidationScheme::IpMatchesAuthenticationName) => {
                        x509::ValidationScheme::IpMatchesAuthenticationName
                    }
                    Some(ValidationScheme::EmailMatchesAuthenticationName) => {
                        x509::ValidationScheme::EmailMatchesAuthenticationName
                    }
                    Some(ValidationScheme::ThumbprintMatch) => {
                        x509::ValidationScheme::ThumbprintMatch
                    }
                    Some(ValidationScheme::Unknown) => {
                        return Err((c.id.clone(), "unknown validation scheme".into()));
                    }
                },
                allowed_thumbprints: a.allowed_thumbprints.clone(),
            }),
        };
        clients.push(pm::EventGridClient {
            name: c.name.clone(),
            authentication_name: Some(c.authentication_name.clone()),
            state,
            attributes,
            client_certificate_authentication: cert,
        });
    }
    let mut bindings = Vec::with_capacity(ns.permission_bindings.len());
    for b in &ns.permission_bindings {
        bindings.push(pm::PermissionBinding {
            name: b.name.clone(),
            client_group_name: b.client_group_name.clone(),
            topic_space_name: b.topic_space_name.clone(),
            permission: match b.permission {
                PermissionType::Publisher => pm::Permission::Publisher,
                PermissionType::Subscriber => pm::Permission::Subscriber,
                PermissionType::Unknown => {
                    return Err((b.id.clone(), "unknown permission".into()));
                }
            },
        });
    }
    Ok(pm::EventGridNamespace {
        name: ns.name.clone(),
        clients,
        client_groups: ns
            .client_groups
            .iter()
            .map(|g| pm::ClientGroup {
                name: g.name.clone(),
                query: g.query.clone(),
            })
            .collect(),
        topic_spaces: ns
            .topic_spaces
            .iter()
            .map(|t| pm::TopicSpace {
                name: t.name.clone(),
                topic_templates: t.topic_templates.clone(),
            })
            .collect(),
        permission_bindings: bindings,
    })
}

/// The child of `ns` a compile error is about: the one whose quoted name the error mentions
/// (client groups, topic spaces and bindings first), else the namespace.
pub fn namespace_culprit(ns: &EventGridNamespace, error: &str) -> String {
    let named = |name: &str| error.contains(&format!("{name:?}"));
    ns.client_groups
        .iter()
        .map(|g| (&g.id, &g.name))
        .chain(ns.topic_spaces.iter().map(|t| (&t.id, &t.name)))
        .chain(ns.permission_bindings.iter().map(|b| (&b.id, &b.name)))
        .chain(ns.clients.iter().map(|c| (&c.id, &c.name)))
        .find(|(_, name)| named(name))
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| ns.id.clone())
}
