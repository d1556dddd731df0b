//! `Microsoft.IoTOperations` declarations: instances and their brokers, listeners, authentications,
//! authorizations, dataflow endpoints, dataflow profiles and dataflows, as the 2024-11-01 spec routes
//! them. Later api-versions (up to 2026-07-01, the one `azure-mgmt-iotoperations` 1.2.0 sends) only add
//! optional fields, so the same models serve every listed version.

use crate::engine::registry::{NameRule, Presence, ResourceTypeDecl};

use super::check;
use super::iotoperations_models as m;

/// Provider namespace.
pub const NAMESPACE: &str = "Microsoft.IoTOperations";

/// The api-versions served, oldest first.
pub const API_VERSIONS: &[&str] = &[
    "2024-11-01",
    "2025-04-01",
    "2025-07-01-preview",
    "2025-10-01",
    "2026-03-01",
    "2026-07-01",
];

/// Every name parameter of this spec: `^[a-z0-9][a-z0-9-]*[a-z0-9]$`, 3–63 characters.
fn name_rule() -> NameRule {
    NameRule::new(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$", 3, 63)
}

/// All `Microsoft.IoTOperations` types, parents before children.
pub fn types() -> Vec<ResourceTypeDecl> {
    vec![
        // Tracked: location + tags, PATCH of tags/identity, listed by resource group and subscription.
        ResourceTypeDecl::new::<m::InstanceProperties>(NAMESPACE, &["instances"])
            .api_versions(API_VERSIONS)
            .name_rule(name_rule())
            .patch(true)
            .list_by_resource_group(true)
            .list_by_subscription(true)
            .location(Presence::Required)
            .extended_location(Presence::Required)
            .top_level::<m::ManagedServiceIdentity>("identity", Presence::Optional)
            .validate(check::<m::InstanceProperties>)
            .description(
                "An Azure IoT Operations instance: the container of brokers and dataflows.",
            )
            .build(),
        child::<m::BrokerProperties>(&["instances", "brokers"], "An MQTT broker of an instance.")
            .validate(check::<m::BrokerProperties>)
            .build(),
        child::<m::BrokerListenerProperties>(
            &["instances", "brokers", "listeners"],
            "A broker listener: ports, protocols and TLS.",
        )
        .validate(check::<m::BrokerListenerProperties>)
        .build(),
        child::<m::BrokerAuthenticationProperties>(
            &["instances", "brokers", "authentications"],
            "Broker authentication methods.",
        )
        .validate(check::<m::BrokerAuthenticationProperties>)
        .build(),
        child::<m::BrokerAuthorizationProperties>(
            &["instances", "brokers", "authorizations"],
            "Broker authorization policies.",
        )
        .validate(check::<m::BrokerAuthorizationProperties>)
        .build(),
        child::<m::DataflowEndpointProperties>(
            &["instances", "dataflowEndpoints"],
            "A dataflow endpoint (MQTT, Kafka, storage, ...).",
        )
        .validate(check::<m::DataflowEndpointProperties>)
        .build(),
        child::<m::DataflowProfileProperties>(
            &["instances", "dataflowProfiles"],
            "A dataflow profile: scaling and diagnostics of its dataflows.",
        )
        .validate(check::<m::DataflowProfileProperties>)
        .build(),
        child::<m::DataflowProperties>(
            &["instances", "dataflowProfiles", "dataflows"],
            "A dataflow: source, transformations and destination.",
        )
        .validate(check::<m::DataflowProperties>)
        .build(),
    ]
}

/// A proxy (child) resource of this spec: `extendedLocation` required, no location, listed by parent.
fn child<P>(
    path: &[&'static str],
    description: &'static str,
) -> crate::engine::registry::DeclBuilder<P>
where
    P: serde::de::DeserializeOwned + serde::Serialize + utoipa::ToSchema + Send + Sync + 'static,
{
    ResourceTypeDecl::new::<P>(NAMESPACE, path)
        .api_versions(API_VERSIONS)
        .name_rule(name_rule())
        .list_by_parent(true)
        .extended_location(Presence::Required)
        .description(description)
}
