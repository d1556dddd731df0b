//! Encoding: a packet and a protocol version in, bytes appended to a buffer.

use bytes::BytesMut;

use crate::{EncodeError, Packet, Protocol};

/// Append the wire form of `packet` for protocol `version` to `buf`.
pub fn encode(
    _packet: &Packet,
    _version: Protocol,
    _buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    unimplemented!("codec: encode")
}

/// The number of bytes [`encode`] would append (fixed header included), used to honour a peer's
/// Maximum Packet Size without encoding.
pub fn encoded_len(_packet: &Packet, _version: Protocol) -> usize {
    unimplemented!("codec: encoded_len")
}
