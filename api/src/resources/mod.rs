//! Declarations of every served resource type: `Microsoft.IoTOperations`, `Microsoft.IoTOperationsMQ`
//! and the `Microsoft.EventGrid` namespaces subset.
//!
//! The engine reads [`all_types`]. A type is a [`ResourceTypeDecl`] (routes, verbs, api-versions, name
//! rule, location flags) plus its typed `properties`. The models (`*_models.rs`) are generated from the
//! staged swagger by `codegen/generate.py` so names, enums, defaults, required and read-only fields are
//! the spec's; [`validate::Validate`] checks what serde cannot (ranges, patterns, lengths).

pub mod eventgrid;
pub mod eventgrid_models;
pub mod iotoperations;
pub mod iotoperations_models;
pub mod iotoperationsmq;
pub mod iotoperationsmq_models;
pub mod validate;

use crate::engine::registry::{ResourceTypeDecl, ValidationError};

/// Every resource type the control plane serves, parents before children.
pub fn all_types() -> Vec<ResourceTypeDecl> {
    let mut types = iotoperations::types();
    types.extend(iotoperationsmq::types());
    types.extend(eventgrid::types());
    types
}

/// The engine's validation hook for a generated model: the first broken constraint, with its JSON
/// path under `properties` as the ARM `target`.
pub(crate) fn check<P: validate::Validate>(p: &P) -> Result<(), ValidationError> {
    match validate::violations(p, "properties").into_iter().next() {
        Some(v) => Err(ValidationError::new(v.target, v.message)),
        None => Ok(()),
    }
}
