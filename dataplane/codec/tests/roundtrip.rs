//! Property tests: every valid packet survives encode → decode unchanged (both versions), and
//! decoding arbitrary bytes never panics, never consumes on `Ok(None)`, and whatever it accepts can
//! be encoded again.

use bytes::{Bytes, BytesMut};
use meridian_codec::{
    Auth, ConnAck, Connect, DecodeOptions, Disconnect, Packet, Properties, Protocol, PubResponse,
    Publish, QoS, ReasonCode, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will, decode, encode, encoded_len,
};
use proptest::option::weighted;
use proptest::prelude::*;

const ALIAS_MAX: u16 = 10;

fn opts(version: Option<Protocol>) -> DecodeOptions {
    DecodeOptions {
        version,
        max_packet_size: 1 << 24,
        topic_alias_maximum: ALIAS_MAX,
    }
}

/// Any UTF-8 string without U+0000 (which MQTT strings may not carry).
fn text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace('\0', ""))
}

fn bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ é€$/-]{1,24}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        3 => "[a-z0-9é$]{0,6}",
        1 => Just("+".to_owned()),
    ];
    (
        prop::collection::vec(level, 1..5),
        any::<bool>(),
        weighted(0.3, "[a-z]{1,5}"),
    )
        .prop_map(|(levels, hash, share)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str(if f.is_empty() { "#" } else { "/#" });
            }
            if f.is_empty() {
                f.push('x');
            }
            match share {
                Some(group) => format!("$share/{group}/{f}"),
                None => f,
            }
        })
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// Where a property block sits; decides which properties may be set.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ctx {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
}

/// Every property with a legal value, then cleared down to what `ctx` may carry.
fn properties(ctx: Ctx) -> impl Strategy<Value = Properties> {
    let p = 0.25;
    let message = (
        weighted(p, 0u8..=1),
        weighted(p, any::<u32>()),
        weighted(p, text()),
        weighted(p, topic_name()),
        weighted(p, bytes()),
        prop::collection::vec(1u32..=268_435_455, 0..3),
        weighted(p, 1u16..=ALIAS_MAX),
        weighted(p, any::<u32>()),
    );
    let session = (
        weighted(p, any::<u32>()),
        weighted(p, text()),
        weighted(p, any::<u16>()),
        weighted(p, text()),
        weighted(p, bytes()),
        weighted(p, 0u8..=1),
        weighted(p, 0u8..=1),
        weighted(p, text()),
        weighted(p, text()),
        weighted(p, text()),
    );
    let limits = (
        weighted(p, 1u16..),
        weighted(p, any::<u16>()),
        weighted(p, 0u8..=1),
        weighted(p, 0u8..=1),
        prop::collection::vec((text(), text()), 0..3),
        weighted(p, 1u32..),
        weighted(p, 0u8..=1),
        weighted(p, 0u8..=1),
        weighted(p, 0u8..=1),
    );
    (message, session, limits).prop_map(move |(m, s, l)| {
        let all = Properties {
            payload_format_indicator: m.0,
            message_expiry_interval: m.1,
            content_type: m.2,
            response_topic: m.3,
            correlation_data: m.4,
            subscription_identifiers: m.5,
            topic_alias: m.6,
            will_delay_interval: m.7,
            session_expiry_interval: s.0,
            assigned_client_identifier: s.1,
            server_keep_alive: s.2,
            authentication_method: s.3,
            authentication_data: s.4,
            request_problem_information: s.5,
            request_response_information: s.6,
            response_information: s.7,
            server_reference: s.8,
            reason_string: s.9,
            receive_maximum: l.0,
            topic_alias_maximum: l.1,
            maximum_qos: l.2,
            retain_available: l.3,
            user_properties: l.4,
            maximum_packet_size: l.5,
            wildcard_subscription_available: l.6,
            subscription_identifiers_available: l.7,
            shared_subscription_available: l.8,
        };
        restrict(all, ctx)
    })
}

/// Keep only the properties MQTT 5 (section 2.2.2.2) allows in `ctx`.
fn restrict(all: Properties, ctx: Ctx) -> Properties {
    let mut p = Properties {
        user_properties: all.user_properties.clone(),
        ..Properties::default()
    };
    let message = |p: &mut Properties| {
        p.payload_format_indicator = all.payload_format_indicator;
        p.message_expiry_interval = all.message_expiry_interval;
        p.content_type = all.content_type.clone();
        p.response_topic = all.response_topic.clone();
        p.correlation_data = all.correlation_data.clone();
    };
    let auth = |p: &mut Properties| {
        p.authentication_method = all.authentication_method.clone();
        if p.authentication_method.is_some() {
            p.authentication_data = all.authentication_data.clone();
        }
    };
    match ctx {
        Ctx::Connect => {
            p.session_expiry_interval = all.session_expiry_interval;
            auth(&mut p);
            p.request_problem_information = all.request_problem_information;
            p.request_response_information = all.request_response_information;
            p.receive_maximum = all.receive_maximum;
            p.topic_alias_maximum = all.topic_alias_maximum;
            p.maximum_packet_size = all.maximum_packet_size;
        }
        Ctx::ConnAck => {
            p.session_expiry_interval = all.session_expiry_interval;
            p.assigned_client_identifier = all.assigned_client_identifier.clone();
            p.server_keep_alive = all.server_keep_alive;
            auth(&mut p);
            p.response_information = all.response_information.clone();
            p.server_reference = all.server_reference.clone();
            p.reason_string = all.reason_string.clone();
            p.receive_maximum = all.receive_maximum;
            p.topic_alias_maximum = all.topic_alias_maximum;
            p.maximum_qos = all.maximum_qos;
            p.retain_available = all.retain_available;
            p.maximum_packet_size = all.maximum_packet_size;
            p.wildcard_subscription_available = all.wildcard_subscription_available;
            p.subscription_identifiers_available = all.subscription_identifiers_available;
            p.shared_subscription_available = all.shared_subscription_available;
        }
        Ctx::Publish => {
            message(&mut p);
            p.subscription_identifiers = all.subscription_identifiers.clone();
            p.topic_alias = all.topic_alias;
        }
        Ctx::Will => {
            message(&mut p);
            p.will_delay_interval = all.will_delay_interval;
        }
        Ctx::Ack => p.reason_string = all.reason_string.clone(),
        Ctx::Subscribe => {
            p.subscription_identifiers = all
                .subscription_identifiers
                .iter()
                .take(1)
                .copied()
                .collect();
        }
        Ctx::Unsubscribe => {}
        Ctx::Disconnect => {
            p.session_expiry_interval = all.session_expiry_interval;
            p.server_reference = all.server_reference.clone();
            p.reason_string = all.reason_string.clone();
        }
        Ctx::Auth => {
            auth(&mut p);
            p.reason_string = all.reason_string.clone();
        }
    }
    p
}

/// Properties for `ctx` in v5; none at all in 3.1.1.
fn props_for(v5: bool, ctx: Ctx) -> BoxedStrategy<Properties> {
    if v5 {
        properties(ctx).boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

fn connect(version: Protocol) -> impl Strategy<Value = Packet> {
    let v5 = version == Protocol::V5;
    let will = weighted(
        0.5,
        (
            topic_name(),
            bytes(),
            qos(),
            any::<bool>(),
            props_for(v5, Ctx::Will),
        )
            .prop_map(|(topic, payload, qos, retain, properties)| Will {
                topic,
                payload: utf8_if_announced(&properties, payload),
                qos,
                retain,
                properties,
            }),
    );
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        weighted(0.5, text()),
        weighted(0.5, bytes()),
        will,
        props_for(v5, Ctx::Connect),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, username, password, will, properties)| {
                // 3.1.1 forbids a password without a user name ([MQTT-3.1.2-22]).
                let password = if v5 || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive,
                    client_id,
                    username,
                    password,
                    will,
                    properties,
                }))
            },
        )
}

fn connack(v5: bool) -> impl Strategy<Value = Packet> {
    let reason = if v5 {
        any::<u8>().prop_map(ReasonCode).boxed()
    } else {
        prop::sample::select(vec![0u8, 0x84, 0x85, 0x88, 0x86, 0x87])
            .prop_map(ReasonCode)
            .boxed()
    };
    (any::<bool>(), reason, props_for(v5, Ctx::ConnAck)).prop_map(
        |(sp, reason_code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present: sp && reason_code == ReasonCode::SUCCESS,
                reason_code,
                properties,
            })
        },
    )
}

/// A payload announced as UTF-8 (Payload Format Indicator 1) must be UTF-8 to be a valid packet
/// ([MQTT-3.3.2.3.2]); keep the random bytes otherwise.
fn utf8_if_announced(properties: &Properties, payload: Bytes) -> Bytes {
    if properties.payload_format_indicator == Some(1) {
        Bytes::from(String::from_utf8_lossy(&payload).into_owned())
    } else {
        payload
    }
}

fn publish(v5: bool) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        1u16..,
        bytes(),
        props_for(v5, Ctx::Publish),
    )
        .prop_map(
            move |(dup, qos, retain, topic, drop_topic, id, payload, properties)| {
                let aliased = properties.topic_alias.is_some();
                Packet::Publish(Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    // v5 may leave the topic empty when an alias stands for it.
                    topic: if v5 && aliased && drop_topic {
                        String::new()
                    } else {
                        topic
                    },
                    packet_id: if qos == QoS::AtMostOnce { 0 } else { id },
                    payload: utf8_if_announced(&properties, payload),
                    properties,
                })
            },
        )
}

fn pub_response(v5: bool) -> impl Strategy<Value = PubResponse> {
    (1u16.., any::<u8>(), props_for(v5, Ctx::Ack)).prop_map(move |(packet_id, rc, properties)| {
        PubResponse {
            packet_id,
            reason_code: ReasonCode(if v5 { rc } else { 0 }),
            properties,
        }
    })
}

fn subscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let one = (topic_filter(), qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(
        move |(filter, qos, no_local, rap, rh)| {
            let shared = filter.starts_with("$share/");
            SubscribeFilter {
                options: SubscriptionOptions {
                    qos,
                    no_local: v5 && no_local && !shared,
                    retain_as_published: v5 && rap,
                    retain_handling: if v5 { rh } else { 0 },
                },
                filter,
            }
        },
    );
    (
        1u16..,
        prop::collection::vec(one, 1..4),
        props_for(v5, Ctx::Subscribe),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn suback(v5: bool) -> impl Strategy<Value = Packet> {
    let code = if v5 {
        any::<u8>().boxed()
    } else {
        prop::sample::select(vec![0u8, 1, 2, 0x80]).boxed()
    };
    (
        1u16..,
        prop::collection::vec(code, 1..5),
        props_for(v5, Ctx::Ack),
    )
        .prop_map(|(packet_id, codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reason_codes: codes.into_iter().map(ReasonCode).collect(),
                properties,
            })
        })
}

fn unsubscribe(v5: bool) -> impl Strategy<Value = Packet> {
    (
        1u16..,
        prop::collection::vec(topic_filter(), 1..4),
        props_for(v5, Ctx::Unsubscribe),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn unsuback(v5: bool) -> impl Strategy<Value = Packet> {
    (
        1u16..,
        prop::collection::vec(any::<u8>(), 1..5),
        props_for(v5, Ctx::Ack),
    )
        .prop_map(move |(packet_id, codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reason_codes: if v5 {
                    codes.into_iter().map(ReasonCode).collect()
                } else {
                    Vec::new()
                },
                properties,
            })
        })
}

fn disconnect(v5: bool) -> impl Strategy<Value = Packet> {
    (any::<u8>(), props_for(v5, Ctx::Disconnect)).prop_map(move |(rc, properties)| {
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode(if v5 { rc } else { 0 }),
            properties,
        })
    })
}

fn packet(version: Protocol) -> BoxedStrategy<Packet> {
    let v5 = version == Protocol::V5;
    let common = prop_oneof![
        connect(version),
        connack(v5),
        publish(v5),
        publish(v5),
        pub_response(v5).prop_map(Packet::PubAck),
        pub_response(v5).prop_map(Packet::PubRec),
        pub_response(v5).prop_map(Packet::PubRel),
        pub_response(v5).prop_map(Packet::PubComp),
        subscribe(v5),
        suback(v5),
        unsubscribe(v5),
        unsuback(v5),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(v5),
    ];
    if v5 {
        let auth = (any::<u8>(), properties(Ctx::Auth)).prop_map(|(rc, properties)| {
            Packet::Auth(Auth {
                reason_code: ReasonCode(rc),
                properties,
            })
        });
        prop_oneof![14 => common, 1 => auth].boxed()
    } else {
        common.boxed()
    }
}

fn roundtrip(version: Protocol, p: &Packet) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    encode(p, version, &mut buf).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    prop_assert_eq!(buf.len(), encoded_len(p, version));
    let wire = buf.clone();
    let decoded = decode(&mut buf, &opts(Some(version)))
        .map_err(|e| TestCaseError::fail(format!("decode of {wire:02x?}: {e}")))?;
    prop_assert_eq!(decoded.as_ref(), Some(p));
    prop_assert!(buf.is_empty());
    if let Packet::Connect(_) = p {
        let mut buf = wire.clone();
        let first = decode(&mut buf, &opts(None)).ok().flatten();
        prop_assert_eq!(first.as_ref(), Some(p));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn v311_packets_roundtrip(p in packet(Protocol::V311)) {
        roundtrip(Protocol::V311, &p)?;
    }

    #[test]
    fn v5_packets_roundtrip(p in packet(Protocol::V5)) {
        roundtrip(Protocol::V5, &p)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_consume_when_incomplete(
        input in prop::collection::vec(any::<u8>(), 0..300),
        which in 0u8..3,
    ) {
        let version = [None, Some(Protocol::V311), Some(Protocol::V5)][usize::from(which)];
        check_arbitrary(&input, version)?;
    }

    /// Random bytes rarely get past the fixed header; this starts from a valid packet and flips
    /// bytes so the variable header and properties get exercised too.
    #[test]
    fn mutated_packets_never_panic(
        p in packet(Protocol::V5),
        v5 in any::<bool>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let version = if v5 { Protocol::V5 } else { Protocol::V311 };
        let mut buf = BytesMut::new();
        if encode(&p, version, &mut buf).is_ok() {
            for (at, byte) in flips {
                let i = at.index(buf.len());
                buf[i] = byte;
            }
            check_arbitrary(&buf, Some(version))?;
        }
    }
}

fn check_arbitrary(input: &[u8], version: Option<Protocol>) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(input);
    let o = opts(version);
    loop {
        let before = buf.clone();
        match decode(&mut buf, &o) {
            Ok(None) => {
                prop_assert_eq!(&buf[..], &before[..]);
                return Ok(());
            }
            Err(_) => return Ok(()),
            Ok(Some(p)) => {
                prop_assert!(
                    buf.len() < before.len(),
                    "a packet was decoded from nothing"
                );
                // Whatever was accepted re-encodes and decodes back to itself.
                let v = match (&p, version) {
                    (Packet::Connect(c), _) => c.protocol,
                    (_, Some(v)) => v,
                    (_, None) => return Err(TestCaseError::fail("non-CONNECT before CONNECT")),
                };
                let mut again = BytesMut::new();
                encode(&p, v, &mut again)
                    .map_err(|e| TestCaseError::fail(format!("re-encode {p:?}: {e}")))?;
                prop_assert_eq!(again.len(), encoded_len(&p, v));
                let back = decode(&mut again, &opts(Some(v)))
                    .map_err(|e| TestCaseError::fail(format!("re-decode {p:?}: {e}")))?;
                prop_assert_eq!(back.as_ref(), Some(&p));
                if version.is_none() {
                    return Ok(());
                }
            }
        }
    }
}
