//! `Microsoft.EventGrid` declarations, the namespaces MQTT subset: namespaces, topicSpaces,
//! clientGroups, permissionBindings, clients and caCertificates (2023-12-15-preview shapes, which
//! 2025-02-15, the version `azure-mgmt-eventgrid` 10.4.0 sends, keeps).

use crate::engine::registry::{DeclBuilder, NameRule, Presence, ResourceTypeDecl};

use super::check;
use super::eventgrid_models as m;
use crate::engine::registry::ValidationError;

/// Provider namespace.
pub const NAMESPACE: &str = "Microsoft.EventGrid";

/// The api-versions served, oldest first.
pub const API_VERSIONS: &[&str] = &["2023-12-15-preview", "2025-02-15"];

/// Names of namespaces and their children except clients: `^[a-zA-Z0-9-]*$`, 3–50 characters.
fn name_rule() -> NameRule {
    NameRule::new(r"^[a-zA-Z0-9-]*$", 3, 50)
}

/// All Event Grid namespace types, parents before children.
pub fn types() -> Vec<ResourceTypeDecl> {
    vec![
        ResourceTypeDecl::new::<m::NamespaceProperties>(NAMESPACE, &["namespaces"])
            .api_versions(API_VERSIONS)
            .name_rule(name_rule())
            .patch(true)
            .list_by_resource_group(true)
            .list_by_subscription(true)
            .location(Presence::Required)
            .top_level::<m::NamespaceSku>("sku", Presence::Optional)
            .top_level::<m::IdentityInfo>("identity", Presence::Optional)
            .validate(namespace_checks)
            .description("An Event Grid namespace: an MQTT tenant with its own clients and topics.")
            .build(),
        child::<m::TopicSpaceProperties>("topicSpaces", "A topic space: a set of topic templates.")
            .validate(check::<m::TopicSpaceProperties>)
            .build(),
        child::<m::ClientGroupProperties>(
            "clientGroups",
            "A client group: a query over client attributes.",
        )
        .validate(check::<m::ClientGroupProperties>)
        .build(),
        child::<m::PermissionBindingProperties>(
            "permissionBindings",
            "A permission binding: a client group may publish or subscribe in a topic space.",
        )
        .validate(check::<m::PermissionBindingProperties>)
        .build(),
        child::<m::ClientProperties>("clients", "An MQTT client registered in the namespace.")
            .name_rule(NameRule::new(r"^[-a-zA-Z0-9:\._]*$", 1, 128))
            .validate(check::<m::ClientProperties>)
            .build(),
        child::<m::CaCertificateProperties>(
            "caCertificates",
            "A CA certificate that client certificates may chain to.",
        )
        .validate(check::<m::CaCertificateProperties>)
        .build(),
    ]
}

/// The spec's checks plus what Meridian needs of custom JWT authentication: an issuer and the
/// issuer certificates inline (`encodedIssuerCertificates`). Key Vault certificate URLs
/// (`issuerCertificates`) are refused: a Meridian node cannot reach Key Vault, and accepting
/// them would leave the namespace admitting no token while reporting success.
fn namespace_checks(p: &m::NamespaceProperties) -> Result<(), ValidationError> {
    check(p)?;
    let Some(jwt) = p
        .topic_spaces_configuration
        .as_ref()
        .and_then(|t| t.client_authentication.as_ref())
        .and_then(|c| c.custom_jwt_authentication.as_ref())
    else {
        return Ok(());
    };
    const AT: &str =
        "properties.topicSpacesConfiguration.clientAuthentication.customJwtAuthentication";
    if jwt
        .token_issuer
        .as_deref()
        .is_none_or(|i| i.trim().is_empty())
    {
        return Err(ValidationError::new(
            format!("{AT}.tokenIssuer"),
            "custom JWT authentication needs the tokenIssuer that every token's iss must equal",
        ));
    }
    if jwt
        .issuer_certificates
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return Err(ValidationError::new(
            format!("{AT}.issuerCertificates"),
            "Key Vault certificate URLs cannot be resolved by Meridian (there is no Key Vault); give the issuer certificates inline in encodedIssuerCertificates",
        ));
    }
    let encoded = jwt
        .encoded_issuer_certificates
        .as_deref()
        .unwrap_or_default();
    if encoded.is_empty() {
        return Err(ValidationError::new(
            format!("{AT}.encodedIssuerCertificates"),
            "custom JWT authentication needs at least one issuer certificate (at most 2)",
        ));
    }
    for (i, c) in encoded.iter().enumerate() {
        if c.encoded_certificate.trim().is_empty() {
            return Err(ValidationError::new(
                format!("{AT}.encodedIssuerCertificates[{i}].encodedCertificate"),
                "empty certificate",
            ));
        }
    }
    Ok(())
}

/// A child of a namespace: listed by parent, no location.
fn child<P>(segment: &'static str, description: &'static str) -> DeclBuilder<P>
where
    P: serde::de::DeserializeOwned + serde::Serialize + utoipa::ToSchema + Send + Sync + 'static,
{
    ResourceTypeDecl::new::<P>(NAMESPACE, &["namespaces", segment])
        .api_versions(API_VERSIONS)
        .name_rule(name_rule())
        .list_by_parent(true)
        .description(description)
}
