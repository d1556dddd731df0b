//! meridian-api: the Meridian control plane, an Azure-Resource-Manager-style resource provider.
//!
//! Owns the generic ARM engine ([`engine`]), the resource-type declarations ([`resources`]), storage
//! (SQLite and Postgres behind one trait), access control (JWT + role assignments), the HTTP(S)
//! surface and the OpenAPI document.

pub mod engine;
pub mod resources;
