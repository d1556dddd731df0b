//! Malformed and hostile packet sequences over raw TCP. Each is refused with the spec's reason
//! code (DISCONNECT in v5, CONNACK for errors in CONNECT) or a plain close, and afterwards a fresh
//! client still connects and round-trips a message.

mod common;

use bytes::BytesMut;
use common::*;
use meridian_codec::{Packet, Protocol, ReasonCode};

/// How the server must react.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// DISCONNECT with this reason code, then close.
    Disconnect(u8),
    /// CONNACK with this reason code in this version's layout, then close.
    ConnAck(u8, Protocol),
    /// Close without an answer.
    Close,
}

fn connect_bytes(proto: Protocol) -> Vec<u8> {
    let mut b = BytesMut::new();
    meridian_codec::encode(
        &Packet::Connect(Box::new(connect_packet("bad", proto))),
        proto,
        &mut b,
    )
    .unwrap();
    b.to_vec()
}

/// (name, sent after a successful v5 CONNECT?, bytes, expected)
fn cases() -> Vec<(&'static str, bool, Vec<u8>, Expect)> {
    let mut reserved_flag = connect_bytes(Protocol::V5);
    reserved_flag[9] |= 0x01; // [MQTT-3.1.2-3] reserved connect flag
    let mut bad_level = connect_bytes(Protocol::V311);
    bad_level[8] = 7; // unknown protocol level
    let mut bad_name = connect_bytes(Protocol::V5);
    bad_name[4] = b'X'; // protocol name "XQTT"
    vec![
        (
            "publish before connect [MQTT-3.1.0-1]",
            false,
            vec![0x30, 0x03, 0x00, 0x01, b't'],
            Expect::Close,
        ),
        (
            "garbage first byte",
            false,
            vec![0xFF, 0xFF, 0xFF],
            Expect::Close,
        ),
        (
            "connect reserved flag [MQTT-3.1.2-3]",
            false,
            reserved_flag,
            Expect::ConnAck(0x81, Protocol::V5),
        ),
        (
            "connect unsupported protocol level [MQTT-3.1.2-2]",
            false,
            bad_level,
            Expect::ConnAck(0x84, Protocol::V311),
        ),
        (
            "connect bad protocol name [MQTT-3.1.2-1]",
            false,
            bad_name,
            Expect::ConnAck(0x84, Protocol::V5),
        ),
        (
            "second connect [MQTT-3.1.0-2]",
            true,
            connect_bytes(Protocol::V5),
            Expect::Disconnect(0x82),
        ),
        (
            "subscribe with bad fixed-header flags [MQTT-3.8.1-1]",
            true,
            vec![0x80, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x00],
            Expect::Disconnect(0x81),
        ),
        (
            "subscribe without filters [MQTT-3.8.3-2]",
            true,
            vec![0x82, 0x03, 0x00, 0x01, 0x00],
            Expect::Disconnect(0x82),
        ),
        (
            "remaining length over four bytes",
            true,
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            Expect::Disconnect(0x81),
        ),
        (
            "publish announcing UTF-8 with a payload that is not [MQTT-3.3.2.3.2]",
            true,
            vec![0x30, 0x07, 0x00, 0x01, b't', 0x02, 0x01, 0x01, 0xFF],
            Expect::Disconnect(0x99),
        ),
        (
            "packet larger than maximum packet size",
            true,
            vec![0x30, 0xD0, 0x0F],
            Expect::Disconnect(0x95),
        ),
        (
            "publish with QoS 3 [MQTT-3.3.1-4]",
            true,
            vec![0x36, 0x06, 0x00, 0x01, b't', 0x00, 0x01, 0x00],
            Expect::Disconnect(0x81),
        ),
        (
            "publish topic with wildcard [MQTT-3.3.2-2]",
            true,
            vec![0x30, 0x06, 0x00, 0x03, b'a', b'/', b'+', 0x00],
            Expect::Disconnect(0x90),
        ),
        (
            "publish topic invalid UTF-8 [MQTT-1.5.4-1]",
            true,
            vec![0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, 0x00],
            Expect::Disconnect(0x81),
        ),
        (
            "publish topic with U+0000 [MQTT-1.5.4-2]",
            true,
            vec![0x30, 0x05, 0x00, 0x02, b'a', 0x00, 0x00],
            Expect::Disconnect(0x81),
        ),
        (
            "topic alias 0 [MQTT-3.3.2-8]",
            true,
            vec![0x30, 0x07, 0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x00],
            Expect::Disconnect(0x94),
        ),
        (
            "topic alias above maximum [MQTT-3.3.2-9]",
            true,
            vec![0x30, 0x07, 0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x64],
            Expect::Disconnect(0x94),
        ),
        (
            "QoS 1 publish with packet id 0 [MQTT-2.2.1-3]",
            true,
            vec![0x32, 0x06, 0x00, 0x01, b't', 0x00, 0x00, 0x00],
            Expect::Disconnect(0x82),
        ),
        (
            "duplicate property [MQTT-2.2.2-2]",
            true,
            vec![0x30, 0x08, 0x00, 0x01, b't', 0x04, 0x01, 0x00, 0x01, 0x00],
            Expect::Disconnect(0x82),
        ),
        (
            "pingreq with flags [MQTT-2.1.3-1]",
            true,
            vec![0xC1, 0x00],
            Expect::Disconnect(0x81),
        ),
        (
            "reserved packet type 0",
            true,
            vec![0x00, 0x00],
            Expect::Disconnect(0x81),
        ),
        (
            "server-only packet (CONNACK) from a client",
            true,
            vec![0x20, 0x03, 0x00, 0x00, 0x00],
            Expect::Disconnect(0x82),
        ),
        (
            "AUTH without an authentication method [MQTT-4.12.0-1]",
            true,
            vec![0xF0, 0x00],
            Expect::Disconnect(0x82),
        ),
    ]
}

#[tokio::test]
async fn hostile_inputs_are_refused_with_the_right_reason_code_and_the_broker_survives() {
    let mut config = cfg();
    config.limits.max_packet_size = 1024;
    let (b, addr) = start(config).await;
    let mut failures = Vec::new();
    for (name, after_connect, bytes, expect) in cases() {
        let mut raw = if after_connect {
            Raw::connect(addr, "hostile", Protocol::V5).await
        } else {
            Raw::open(addr, Protocol::V5).await
        };
        raw.send_raw(&bytes).await;
        let got = match expect {
            Expect::ConnAck(_, proto) => {
                raw.proto = proto;
                raw.recv().await.map(|p| match p {
                    Packet::ConnAck(a) => format!("CONNACK {:#04x}", a.reason_code.0),
                    other => format!("{other:?}"),
                })
            }
            _ => raw.recv().await.map(|p| match p {
                Packet::Disconnect(d) => format!("DISCONNECT {:#04x}", d.reason_code.0),
                Packet::ConnAck(a) => format!("CONNACK {:#04x}", a.reason_code.0),
                other => format!("{other:?}"),
            }),
        };
        let want = match expect {
            Expect::Disconnect(c) => Some(format!("DISCONNECT {c:#04x}")),
            Expect::ConnAck(c, _) => Some(format!("CONNACK {c:#04x}")),
            Expect::Close => None,
        };
        let closed = raw.closed().await;
        if got != want || !closed {
            failures.push(format!(
                "{name}: expected {want:?} + close, got {got:?}, closed={closed}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        round_trip(addr).await,
        "a fresh client still round-trips after the hostile inputs"
    );
    let _ = ReasonCode::MALFORMED_PACKET;
    b.shutdown().await;
}
