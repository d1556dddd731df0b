//! Golden byte vectors: for every packet type and both protocol versions, a literal wire form that
//! must decode to the expected packet and that the packet must encode back to, byte for byte.

use bytes::{Bytes, BytesMut};
use meridian_codec::{
    Auth, ConnAck, Connect, DecodeOptions, Disconnect, EncodeError, Packet, Properties, Protocol,
    PubResponse, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will, decode, encode, encoded_len,
};

const V3: Protocol = Protocol::V311;
const V5: Protocol = Protocol::V5;

fn opts(version: Option<Protocol>) -> DecodeOptions {
    DecodeOptions {
        version,
        max_packet_size: 1 << 20,
        topic_alias_maximum: 10,
    }
}

/// Decode `wire` (also split over two reads), compare with `expected`, and encode `expected` back
/// to exactly `wire`.
fn golden(version: Protocol, wire: &[u8], expected: Packet) {
    let mut buf = BytesMut::from(wire);
    let got = decode(&mut buf, &opts(Some(version)))
        .unwrap_or_else(|e| panic!("decode failed: {e}"))
        .expect("a whole packet");
    assert_eq!(got, expected);
    assert!(buf.is_empty(), "decode left {} bytes", buf.len());

    // Every strict prefix is incomplete and consumes nothing.
    for cut in 0..wire.len() {
        let mut part = BytesMut::from(&wire[..cut]);
        assert_eq!(
            decode(&mut part, &opts(Some(version))),
            Ok(None),
            "prefix {cut}"
        );
        assert_eq!(&part[..], &wire[..cut]);
    }

    let mut out = BytesMut::new();
    encode(&expected, version, &mut out).expect("encode");
    assert_eq!(&out[..], wire, "encoded bytes differ");
    assert_eq!(encoded_len(&expected, version), wire.len());
}

fn publish_props() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(256),
        content_type: Some("text/plain".into()),
        response_topic: Some("resp".into()),
        correlation_data: Some(Bytes::from_static(&[1, 2, 3])),
        subscription_identifiers: vec![5, 128],
        topic_alias: Some(2),
        user_properties: vec![("x".into(), "y".into()), ("x".into(), "z".into())],
        ..Properties::default()
    }
}

#[test]
fn connect_v311_with_will_and_credentials() {
    let wire =
        b"\x10\x1e\x00\x04MQTT\x04\xee\x00\x3c\x00\x02c1\x00\x03w/t\x00\x03bye\x00\x01u\x00\x01p";
    let packet = Packet::Connect(Box::new(Connect {
        protocol: V3,
        clean_start: true,
        keep_alive: 60,
        client_id: "c1".into(),
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
        will: Some(Will {
            topic: "w/t".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        }),
        properties: Properties::default(),
    }));
    golden(V3, wire, packet.clone());
    // Before CONNECT the decoder learns the version from the packet itself.
    let mut buf = BytesMut::from(&wire[..]);
    assert_eq!(decode(&mut buf, &opts(None)), Ok(Some(packet)));
}

#[test]
fn connect_v5_with_will_and_properties() {
    let wire: &[u8] = b"\x10\x54\x00\x04MQTT\x05\x16\x00\x1e\
        \x19\x11\x00\x00\x0e\x10\x19\x01\x21\x00\x14\x22\x00\x05\x26\x00\x01k\x00\x01v\x27\x00\x10\x00\x00\
        \x00\x02c5\
        \x25\x01\x01\x02\x00\x00\x00\x3c\x03\x00\x04text\x08\x00\x03r/t\x09\x00\x02\xab\xcd\x18\x00\x00\x00\x0a\x26\x00\x01a\x00\x01b\
        \x00\x01w\x00\x01x";
    let packet = Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 30,
        client_id: "c5".into(),
        username: None,
        password: None,
        will: Some(Will {
            topic: "w".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Properties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text".into()),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(&[0xab, 0xcd])),
                will_delay_interval: Some(10),
                user_properties: vec![("a".into(), "b".into())],
                ..Properties::default()
            },
        }),
        properties: Properties {
            session_expiry_interval: Some(3600),
            request_response_information: Some(1),
            receive_maximum: Some(20),
            topic_alias_maximum: Some(5),
            user_properties: vec![("k".into(), "v".into())],
            maximum_packet_size: Some(1 << 20),
            ..Properties::default()
        },
    }));
    golden(V5, wire, packet.clone());
    let mut buf = BytesMut::from(wire);
    assert_eq!(decode(&mut buf, &opts(None)), Ok(Some(packet)));
}

#[test]
fn connect_v5_password_without_username_is_allowed() {
    let wire = b"\x10\x12\x00\x04MQTT\x05\x40\x00\x00\x00\x00\x01c\x00\x02pw";
    golden(
        V5,
        wire,
        Packet::Connect(Box::new(Connect {
            protocol: V5,
            clean_start: false,
            keep_alive: 0,
            client_id: "c".into(),
            username: None,
            password: Some(Bytes::from_static(b"pw")),
            will: None,
            properties: Properties::default(),
        })),
    );
}

#[test]
fn connack_v311() {
    golden(
        V3,
        b"\x20\x02\x01\x00",
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }),
    );
    golden(
        V3,
        b"\x20\x02\x00\x05",
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: ReasonCode::NOT_AUTHORIZED,
            properties: Properties::default(),
        }),
    );
}

#[test]
fn connack_v311_maps_v5_reason_codes_to_return_codes() {
    for (rc, code) in [
        (ReasonCode::SUCCESS, 0u8),
        (ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, 1),
        (ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 2),
        (ReasonCode::SERVER_UNAVAILABLE, 3),
        (ReasonCode::SERVER_BUSY, 3),
        (ReasonCode::MALFORMED_PACKET, 3),
        (ReasonCode::BAD_USER_NAME_OR_PASSWORD, 4),
        (ReasonCode::NOT_AUTHORIZED, 5),
        (ReasonCode::BANNED, 5),
    ] {
        let mut out = BytesMut::new();
        let packet = Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: rc,
            properties: Properties::default(),
        });
        encode(&packet, V3, &mut out).unwrap();
        assert_eq!(&out[..], &[0x20, 0x02, 0x00, code], "{rc:?}");
    }
}

#[test]
fn connack_v5_with_properties() {
    let wire: &[u8] = b"\x20\x20\x00\x00\x1d\x12\x00\x02id\x13\x00\x3c\x21\x00\x0a\x22\x00\x08\
        \x24\x01\x25\x01\x27\x00\x00\xff\xff\x28\x01\x29\x01\x2a\x00";
    golden(
        V5,
        wire,
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties {
                assigned_client_identifier: Some("id".into()),
                server_keep_alive: Some(60),
                receive_maximum: Some(10),
                topic_alias_maximum: Some(8),
                maximum_qos: Some(1),
                retain_available: Some(1),
                maximum_packet_size: Some(65535),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(1),
                shared_subscription_available: Some(0),
                ..Properties::default()
            },
        }),
    );
    golden(
        V5,
        b"\x20\x03\x00\x87\x00",
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: ReasonCode::NOT_AUTHORIZED,
            properties: Properties::default(),
        }),
    );
}

#[test]
fn publish_v311() {
    golden(
        V3,
        b"\x3b\x09\x00\x03a/b\x12\x34hi",
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "a/b".into(),
            packet_id: 0x1234,
            payload: Bytes::from_static(b"hi"),
            properties: Properties::default(),
        }),
    );
    golden(
        V3,
        b"\x30\x07\x00\x03a/bhi",
        Packet::Publish(Publish {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hi"),
            ..Publish::default()
        }),
    );
}

#[test]
fn publish_v5_with_every_message_property() {
    let wire: &[u8] = b"\x34\x42\x00\x01t\x00\x01\x37\
        \x01\x01\x02\x00\x00\x01\x00\x03\x00\x0atext/plain\x08\x00\x04resp\x09\x00\x03\x01\x02\x03\
        \x0b\x05\x0b\x80\x01\x23\x00\x02\x26\x00\x01x\x00\x01y\x26\x00\x01x\x00\x01z\
        hello";
    golden(
        V5,
        wire,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 1,
            payload: Bytes::from_static(b"hello"),
            properties: publish_props(),
        }),
    );
}

#[test]
fn publish_v5_empty_topic_with_alias() {
    golden(
        V5,
        b"\x30\x07\x00\x00\x03\x23\x00\x01p",
        Packet::Publish(Publish {
            payload: Bytes::from_static(b"p"),
            properties: Properties {
                topic_alias: Some(1),
                ..Properties::default()
            },
            ..Publish::default()
        }),
    );
}

fn ack(packet_id: u16, reason_code: ReasonCode, properties: Properties) -> PubResponse {
    PubResponse {
        packet_id,
        reason_code,
        properties,
    }
}

#[test]
fn puback_both_versions() {
    golden(
        V3,
        b"\x40\x02\x00\x07",
        Packet::PubAck(ack(7, ReasonCode::SUCCESS, Properties::default())),
    );
    golden(
        V5,
        b"\x40\x02\x00\x07",
        Packet::PubAck(ack(7, ReasonCode::SUCCESS, Properties::default())),
    );
    golden(
        V5,
        b"\x40\x03\x00\x07\x10",
        Packet::PubAck(ack(
            7,
            ReasonCode::NO_MATCHING_SUBSCRIBERS,
            Properties::default(),
        )),
    );
    golden(
        V5,
        b"\x40\x0a\x00\x07\x80\x06\x1f\x00\x03err",
        Packet::PubAck(ack(
            7,
            ReasonCode::UNSPECIFIED_ERROR,
            Properties {
                reason_string: Some("err".into()),
                ..Properties::default()
            },
        )),
    );
}

#[test]
fn pubrec_both_versions() {
    golden(
        V3,
        b"\x50\x02\x00\x08",
        Packet::PubRec(ack(8, ReasonCode::SUCCESS, Properties::default())),
    );
    golden(
        V5,
        b"\x50\x03\x00\x08\x10",
        Packet::PubRec(ack(
            8,
            ReasonCode::NO_MATCHING_SUBSCRIBERS,
            Properties::default(),
        )),
    );
}

#[test]
fn pubrel_both_versions() {
    golden(
        V3,
        b"\x62\x02\x00\x09",
        Packet::PubRel(ack(9, ReasonCode::SUCCESS, Properties::default())),
    );
    golden(
        V5,
        b"\x62\x03\x00\x09\x92",
        Packet::PubRel(ack(
            9,
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            Properties::default(),
        )),
    );
}

#[test]
fn pubcomp_both_versions() {
    golden(
        V3,
        b"\x70\x02\x00\x0a",
        Packet::PubComp(ack(10, ReasonCode::SUCCESS, Properties::default())),
    );
    golden(
        V5,
        b"\x70\x02\x00\x0a",
        Packet::PubComp(ack(10, ReasonCode::SUCCESS, Properties::default())),
    );
}

fn filter(f: &str, options: SubscriptionOptions) -> SubscribeFilter {
    SubscribeFilter {
        filter: f.into(),
        options,
    }
}

#[test]
fn subscribe_v311() {
    golden(
        V3,
        b"\x82\x0c\x00\x01\x00\x03a/+\x01\x00\x01#\x00",
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![
                filter(
                    "a/+",
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                ),
                filter("#", SubscriptionOptions::default()),
            ],
            properties: Properties::default(),
        }),
    );
}

#[test]
fn subscribe_v5_with_options_and_properties() {
    golden(
        V5,
        b"\x82\x1f\x00\x02\x09\x0b\x07\x26\x00\x01k\x00\x01v\x00\x03a/b\x2d\x00\x0a$share/g/x\x00",
        Packet::Subscribe(Subscribe {
            packet_id: 2,
            filters: vec![
                filter(
                    "a/b",
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                ),
                filter("$share/g/x", SubscriptionOptions::default()),
            ],
            properties: Properties {
                subscription_identifiers: vec![7],
                user_properties: vec![("k".into(), "v".into())],
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn suback_both_versions() {
    golden(
        V3,
        b"\x90\x05\x00\x01\x01\x80\x02",
        Packet::SubAck(SubAck {
            packet_id: 1,
            reason_codes: vec![
                ReasonCode::GRANTED_QOS_1,
                ReasonCode(0x80),
                ReasonCode::GRANTED_QOS_2,
            ],
            properties: Properties::default(),
        }),
    );
    golden(
        V5,
        b"\x90\x0a\x00\x02\x05\x1f\x00\x02no\x01\x87",
        Packet::SubAck(SubAck {
            packet_id: 2,
            reason_codes: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED],
            properties: Properties {
                reason_string: Some("no".into()),
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn suback_v311_sends_every_failure_as_0x80() {
    let packet = Packet::SubAck(SubAck {
        packet_id: 3,
        reason_codes: vec![
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::QUOTA_EXCEEDED,
        ],
        properties: Properties::default(),
    });
    let mut out = BytesMut::new();
    encode(&packet, V3, &mut out).unwrap();
    assert_eq!(&out[..], b"\x90\x05\x00\x03\x80\x00\x80");
}

#[test]
fn unsubscribe_both_versions() {
    golden(
        V3,
        b"\xa2\x0a\x00\x03\x00\x03a/+\x00\x01b",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            filters: vec!["a/+".into(), "b".into()],
            properties: Properties::default(),
        }),
    );
    golden(
        V5,
        b"\xa2\x0d\x00\x04\x07\x26\x00\x01k\x00\x01v\x00\x01a",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: vec!["a".into()],
            properties: Properties {
                user_properties: vec![("k".into(), "v".into())],
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn unsuback_both_versions() {
    golden(
        V3,
        b"\xb0\x02\x00\x03",
        Packet::UnsubAck(UnsubAck {
            packet_id: 3,
            reason_codes: vec![],
            properties: Properties::default(),
        }),
    );
    golden(
        V5,
        b"\xb0\x05\x00\x04\x00\x00\x11",
        Packet::UnsubAck(UnsubAck {
            packet_id: 4,
            reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        }),
    );
}

#[test]
fn pingreq_pingresp_both_versions() {
    for v in [V3, V5] {
        golden(v, b"\xc0\x00", Packet::PingReq);
        golden(v, b"\xd0\x00", Packet::PingResp);
    }
}

#[test]
fn disconnect_both_versions() {
    golden(V3, b"\xe0\x00", Packet::Disconnect(Disconnect::default()));
    golden(V5, b"\xe0\x00", Packet::Disconnect(Disconnect::default()));
    golden(
        V5,
        b"\xe0\x01\x04",
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::DISCONNECT_WITH_WILL,
            properties: Properties::default(),
        }),
    );
    golden(
        V5,
        b"\xe0\x10\x8b\x0e\x11\x00\x00\x00\x00\x1c\x00\x01s\x1f\x00\x02by",
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SERVER_SHUTTING_DOWN,
            properties: Properties {
                session_expiry_interval: Some(0),
                server_reference: Some("s".into()),
                reason_string: Some("by".into()),
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn disconnect_v311_drops_v5_fields() {
    let packet = Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::SESSION_TAKEN_OVER,
        properties: Properties {
            reason_string: Some("x".into()),
            ..Properties::default()
        },
    });
    let mut out = BytesMut::new();
    encode(&packet, V3, &mut out).unwrap();
    assert_eq!(&out[..], b"\xe0\x00");
    assert_eq!(encoded_len(&packet, V3), 2);
}

#[test]
fn auth_v5() {
    golden(V5, b"\xf0\x00", Packet::Auth(Auth::default()));
    golden(
        V5,
        b"\xf0\x0d\x18\x0b\x15\x00\x03scr\x16\x00\x02\x01\x02",
        Packet::Auth(Auth {
            reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties {
                authentication_method: Some("scr".into()),
                authentication_data: Some(Bytes::from_static(&[1, 2])),
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn auth_cannot_be_encoded_for_v311() {
    let mut out = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        encode(&Packet::Auth(Auth::default()), V3, &mut out),
        Err(EncodeError::NotInV311("AUTH"))
    );
    assert_eq!(&out[..], b"keep");
}

#[test]
fn string_longer_than_65535_is_refused_without_writing() {
    let packet = Packet::Publish(Publish {
        topic: "t".repeat(70_000),
        ..Publish::default()
    });
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&packet, V5, &mut out),
        Err(EncodeError::StringTooLong(70_000))
    );
    assert!(out.is_empty());
}

#[test]
fn two_packets_in_one_buffer_decode_one_at_a_time() {
    let mut buf = BytesMut::from(&b"\xc0\x00\xd0\x00\xc0"[..]);
    let o = opts(Some(V5));
    assert_eq!(decode(&mut buf, &o), Ok(Some(Packet::PingReq)));
    assert_eq!(decode(&mut buf, &o), Ok(Some(Packet::PingResp)));
    assert_eq!(decode(&mut buf, &o), Ok(None));
    assert_eq!(&buf[..], b"\xc0");
}

#[test]
fn publish_payload_is_a_zero_copy_slice_of_the_input() {
    let mut buf = BytesMut::from(&b"\x30\x07\x00\x03a/bhi"[..]);
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, &opts(Some(V3))).unwrap() else {
        panic!("expected PUBLISH");
    };
    assert_eq!(p.payload.as_ptr() as usize, base + 7);
}

#[test]
fn remaining_length_multi_byte_boundaries() {
    // 128-byte payload body needs a two-byte remaining length.
    let payload = vec![b'x'; 200];
    let packet = Packet::Publish(Publish {
        topic: "t".into(),
        payload: Bytes::from(payload),
        ..Publish::default()
    });
    let mut out = BytesMut::new();
    encode(&packet, V3, &mut out).unwrap();
    assert_eq!(&out[..3], &[0x30, 0xcb, 0x01]); // 203 = 0x4b | 0x80, 0x01
    assert_eq!(out.len(), encoded_len(&packet, V3));
    assert_eq!(decode(&mut out, &opts(Some(V3))), Ok(Some(packet)));
}

#[test]
fn incomplete_huge_packet_reserves_bounded_memory() {
    // A peer announcing a 256 MiB packet and sending nothing more must not make us allocate it.
    let mut buf = BytesMut::from(&b"\x30\xff\xff\xff\x7f"[..]);
    let o = DecodeOptions {
        version: Some(V5),
        ..DecodeOptions::default()
    };
    assert_eq!(decode(&mut buf, &o), Ok(None));
    assert_eq!(&buf[..], b"\x30\xff\xff\xff\x7f");
    assert!(
        buf.capacity() < 1 << 20,
        "reserved {} bytes",
        buf.capacity()
    );
}
