//! The generic ARM engine: one implementation of the verbs for every declared resource type.

pub mod registry;
