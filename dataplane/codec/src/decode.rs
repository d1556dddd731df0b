//! Decoding: `&mut BytesMut` in, at most one packet out per call.

use bytes::BytesMut;

use crate::{DecodeError, Packet, Protocol};

/// What the decoder must know about the connection it decodes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// `None` before CONNECT: the first packet must be CONNECT, and its protocol level is read from
    /// it. `Some(v)` afterwards (and always on the client side).
    pub version: Option<Protocol>,
    /// Largest whole packet (fixed header included) accepted; larger ones fail with
    /// [`DecodeError::PacketTooLarge`] as soon as the remaining length is known.
    pub max_packet_size: u32,
    /// The Topic Alias Maximum this side announced; an inbound alias of 0 or above it is an error
    /// ([MQTT-3.3.2-9], [MQTT-3.3.2-10]).
    pub topic_alias_maximum: u16,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            version: None,
            max_packet_size: 268_435_455 + 5,
            topic_alias_maximum: 0,
        }
    }
}

/// Decode one packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds less than a whole packet (nothing is consumed), `Ok(Some(p))`
/// after consuming exactly that packet's bytes, or an error; after an error the connection must be
/// closed (with the error's reason code where the protocol allows one).
pub fn decode(_buf: &mut BytesMut, _opts: &DecodeOptions) -> Result<Option<Packet>, DecodeError> {
    unimplemented!("codec: decode")
}
