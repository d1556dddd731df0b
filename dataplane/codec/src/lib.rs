//! Sans-IO MQTT 3.1.1 and 5.0 codec: bytes in, [`Packet`]s out, and back.
//!
//! This crate owns the wire format and every rule that can be checked while decoding one packet
//! (fixed-header flags, remaining length, UTF-8 validity, wildcard placement, packet identifiers,
//! which properties a packet may carry, duplicate properties, topic-alias bounds). Errors name the
//! spec clause they enforce (`[MQTT-x.y.z-n]`) and the reason code a server answers them with.
//! It never performs I/O, never allocates a task and never awaits.
//!
//! Rules that depend on direction or connection state are not checked here and belong to the
//! broker: a second CONNECT ([MQTT-3.1.0-2]), a client PUBLISH carrying a Subscription Identifier
//! ([MQTT-3.3.4-6]), resolving topic aliases, Receive Maximum, and configured limits (topic length
//! and levels, client identifier rules).

mod packet;

pub use packet::*;
mod decode;
mod encode;
mod error;
pub mod topic;

pub use decode::{DecodeOptions, decode, peek_connect_protocol};
pub use encode::{encode, encoded_len};
pub use error::{DecodeError, EncodeError};
