//! Declarations of all served resource types (owned by the api-types work).
//!
//! The engine reads [`all_types`]; each type is a [`ResourceTypeDecl`] plus its typed properties.
//! This file starts with one example type so the engine is testable end to end.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::registry::{NameRule, Presence, ResourceTypeDecl};

/// Every resource type the control plane serves.
pub fn all_types() -> Vec<ResourceTypeDecl> {
    vec![eventgrid_namespace()]
}

/// Whether public network access is allowed.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
pub enum PublicNetworkAccess {
    /// Allowed.
    #[default]
    Enabled,
    /// Denied.
    Disabled,
}

/// `properties` of an Event Grid namespace (minimal example; the full type replaces it).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceProperties {
    /// Public network access.
    #[serde(default)]
    pub public_network_access: PublicNetworkAccess,
    /// Zone redundancy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_zone_redundant: Option<bool>,
    /// Read-only, set by the engine.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub provisioning_state: Option<String>,
}

fn eventgrid_namespace() -> ResourceTypeDecl {
    ResourceTypeDecl::new::<NamespaceProperties>("Microsoft.EventGrid", &["namespaces"])
        .api_versions(&["2023-12-15-preview", "2025-02-15"])
        .name_rule(NameRule::new(r"^[a-zA-Z0-9-]*$", 3, 50))
        .patch(true)
        .list_by_resource_group(true)
        .list_by_subscription(true)
        .location(Presence::Required)
        .description("An Event Grid namespace (MQTT broker tenant).")
        .build()
}
