//! Fuzz `meridian_codec::decode` with every version option (before CONNECT, 3.1.1, 5.0).
//!
//! Beyond "no panic": `Ok(None)` must leave the buffer untouched, every accepted packet must
//! consume bytes, re-encode (with `encoded_len` agreeing) and decode back to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meridian_codec::{DecodeOptions, Packet, Protocol, decode, encode, encoded_len};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the decoder configuration; the rest is the wire input.
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let version = match selector % 3 {
        0 => None,
        1 => Some(Protocol::V311),
        _ => Some(Protocol::V5),
    };
    let opts = DecodeOptions {
        version,
        max_packet_size: 1 << 16,
        topic_alias_maximum: u16::from(selector >> 2),
    };
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.clone();
        match decode(&mut buf, &opts) {
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) consumed input");
                return;
            }
            Err(_) => return,
            Ok(Some(packet)) => {
                assert!(buf.len() < before.len(), "packet decoded from no bytes");
                let v = match (&packet, version) {
                    (Packet::Connect(c), _) => c.protocol,
                    (_, Some(v)) => v,
                    (_, None) => panic!("non-CONNECT accepted before CONNECT: {packet:?}"),
                };
                let mut out = BytesMut::new();
                encode(&packet, v, &mut out).expect("a decoded packet must re-encode");
                assert_eq!(out.len(), encoded_len(&packet, v), "encoded_len disagrees");
                let again = DecodeOptions {
                    version: Some(v),
                    ..opts
                };
                let back = decode(&mut out, &again).expect("re-encoded packet must decode");
                assert_eq!(back.as_ref(), Some(&packet), "round trip changed the packet");
                assert!(out.is_empty());
                if version.is_none() {
                    // Before CONNECT only one packet is decoded with these options.
                    return;
                }
            }
        }
    }
});
