//! Encoding: a packet and a protocol version in, bytes appended to a buffer.
//!
//! The body length is computed first (no allocation), so the buffer is reserved once and the fixed
//! header written before the body; [`encoded_len`] shares that computation, which keeps the two in
//! step. MQTT 5 short forms are used wherever the spec allows them (acknowledgements with Success
//! and no properties, a normal DISCONNECT).

use bytes::{BufMut, BytesMut};

use crate::decode::MAX_REMAINING_LENGTH;
use crate::{EncodeError, Packet, Properties, Protocol, QoS, ReasonCode};

/// Append the wire form of `packet` for protocol `version` to `buf`.
///
/// On error nothing is appended. For 3.1.1 the MQTT 5-only fields (properties, most reason codes)
/// are left out, CONNACK reason codes become 3.1.1 return codes and SUBACK failures become 0x80.
pub fn encode(packet: &Packet, version: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = version == Protocol::V5;
    if !v5 && matches!(packet, Packet::Auth(_)) {
        return Err(EncodeError::NotInV311("AUTH"));
    }
    let body = body_len(packet, v5);
    let total = 1 + vbi_len(body) + body;
    if body > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge(total));
    }
    let start = buf.len();
    buf.reserve(total);
    buf.put_u8(first_byte(packet));
    put_vbi(buf, body as u32);
    if let Err(e) = write_body(packet, v5, version, buf) {
        buf.truncate(start);
        return Err(e);
    }
    debug_assert_eq!(
        buf.len() - start,
        total,
        "encoded_len out of step with encode"
    );
    Ok(())
}

/// The number of bytes [`encode`] would append (fixed header included), used to honour a peer's
/// Maximum Packet Size without encoding. (For a packet `encode` refuses, the length it would have
/// had.)
pub fn encoded_len(packet: &Packet, version: Protocol) -> usize {
    let body = body_len(packet, version == Protocol::V5);
    1 + vbi_len(body) + body
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Publish(p) => {
            let qos = p.qos as u8;
            // DUP must be 0 on QoS 0 ([MQTT-3.3.1-2]); a downgraded redelivery may still carry it.
            let dup = if qos > 0 && p.dup { 0b1000 } else { 0 };
            0x30 | dup | (qos << 1) | u8::from(p.retain)
        }
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => {
            (packet.packet_type() << 4) | 0b0010
        }
        _ => packet.packet_type() << 4,
    }
}

fn vbi_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_vbi(buf: &mut BytesMut, mut v: u32) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            return;
        }
    }
}

fn put_bin(buf: &mut BytesMut, b: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(b.len()).map_err(|_| EncodeError::StringTooLong(b.len()))?;
    buf.put_u16(len);
    buf.put_slice(b);
    Ok(())
}

fn put_str(buf: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_bin(buf, s.as_bytes())
}

/// Length of a property block's contents (without its own length prefix).
fn props_len(p: &Properties) -> usize {
    fn s(v: &Option<String>) -> usize {
        v.as_ref().map_or(0, |s| 3 + s.len())
    }
    fn b<T>(v: &Option<T>, size: usize) -> usize {
        if v.is_some() { 1 + size } else { 0 }
    }
    b(&p.payload_format_indicator, 1)
        + b(&p.message_expiry_interval, 4)
        + s(&p.content_type)
        + s(&p.response_topic)
        + p.correlation_data.as_ref().map_or(0, |d| 3 + d.len())
        + p.subscription_identifiers
            .iter()
            .map(|&id| 1 + vbi_len(id as usize))
            .sum::<usize>()
        + b(&p.session_expiry_interval, 4)
        + s(&p.assigned_client_identifier)
        + b(&p.server_keep_alive, 2)
        + s(&p.authentication_method)
        + p.authentication_data.as_ref().map_or(0, |d| 3 + d.len())
        + b(&p.request_problem_information, 1)
        + b(&p.will_delay_interval, 4)
        + b(&p.request_response_information, 1)
        + s(&p.response_information)
        + s(&p.server_reference)
        + s(&p.reason_string)
        + b(&p.receive_maximum, 2)
        + b(&p.topic_alias_maximum, 2)
        + b(&p.topic_alias, 2)
        + b(&p.maximum_qos, 1)
        + b(&p.retain_available, 1)
        + p.user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>()
        + b(&p.maximum_packet_size, 4)
        + b(&p.wildcard_subscription_available, 1)
        + b(&p.subscription_identifiers_available, 1)
        + b(&p.shared_subscription_available, 1)
}

/// Length of a property block including its Variable Byte Integer length prefix.
fn props_block_len(p: &Properties) -> usize {
    let n = props_len(p);
    vbi_len(n) + n
}

fn put_props(buf: &mut BytesMut, p: &Properties) -> Result<(), EncodeError> {
    put_vbi(buf, props_len(p) as u32);
    let byte = |buf: &mut BytesMut, id: u8, v: Option<u8>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u8(v);
        }
    };
    let two = |buf: &mut BytesMut, id: u8, v: Option<u16>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u16(v);
        }
    };
    let four = |buf: &mut BytesMut, id: u8, v: Option<u32>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u32(v);
        }
    };
    let string = |buf: &mut BytesMut, id: u8, v: &Option<String>| {
        if let Some(v) = v {
            buf.put_u8(id);
            put_str(buf, v)?;
        }
        Ok::<(), EncodeError>(())
    };
    byte(buf, 0x01, p.payload_format_indicator);
    four(buf, 0x02, p.message_expiry_interval);
    string(buf, 0x03, &p.content_type)?;
    string(buf, 0x08, &p.response_topic)?;
    if let Some(d) = &p.correlation_data {
        buf.put_u8(0x09);
        put_bin(buf, d)?;
    }
    for &id in &p.subscription_identifiers {
        buf.put_u8(0x0B);
        put_vbi(buf, id);
    }
    four(buf, 0x11, p.session_expiry_interval);
    string(buf, 0x12, &p.assigned_client_identifier)?;
    two(buf, 0x13, p.server_keep_alive);
    string(buf, 0x15, &p.authentication_method)?;
    if let Some(d) = &p.authentication_data {
        buf.put_u8(0x16);
        put_bin(buf, d)?;
    }
    byte(buf, 0x17, p.request_problem_information);
    four(buf, 0x18, p.will_delay_interval);
    byte(buf, 0x19, p.request_response_information);
    string(buf, 0x1A, &p.response_information)?;
    string(buf, 0x1C, &p.server_reference)?;
    string(buf, 0x1F, &p.reason_string)?;
    two(buf, 0x21, p.receive_maximum);
    two(buf, 0x22, p.topic_alias_maximum);
    two(buf, 0x23, p.topic_alias);
    byte(buf, 0x24, p.maximum_qos);
    byte(buf, 0x25, p.retain_available);
    for (k, v) in &p.user_properties {
        buf.put_u8(0x26);
        put_str(buf, k)?;
        put_str(buf, v)?;
    }
    four(buf, 0x27, p.maximum_packet_size);
    byte(buf, 0x28, p.wildcard_subscription_available);
    byte(buf, 0x29, p.subscription_identifiers_available);
    byte(buf, 0x2A, p.shared_subscription_available);
    Ok(())
}

/// MQTT 5 reason code to the 3.1.1 CONNACK return code.
fn v311_connack_code(rc: ReasonCode) -> u8 {
    match rc {
        ReasonCode::SUCCESS => 0,
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => 1,
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => 2,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD => 4,
        ReasonCode::NOT_AUTHORIZED | ReasonCode::BANNED => 5,
        // Server unavailable, busy, and every other refusal.
        _ => 3,
    }
}

/// MQTT 5 SUBACK reason code to the 3.1.1 return code: granted QoS or 0x80 failure.
fn v311_suback_code(rc: ReasonCode) -> u8 {
    if rc.0 <= 2 { rc.0 } else { 0x80 }
}

fn ack_len(v5: bool, reason: ReasonCode, props: &Properties) -> usize {
    if !v5 {
        return 2;
    }
    match props_len(props) {
        0 if reason == ReasonCode::SUCCESS => 2,
        0 => 3,
        n => 3 + vbi_len(n) + n,
    }
}

fn body_len(packet: &Packet, v5: bool) -> usize {
    let props = |p: &Properties| if v5 { props_block_len(p) } else { 0 };
    match packet {
        Packet::Connect(c) => {
            let will = c.will.as_ref().map_or(0, |w| {
                props(&w.properties) + 2 + w.topic.len() + 2 + w.payload.len()
            });
            // protocol name (2 + 4) + level + flags + keep alive
            10 + props(&c.properties)
                + 2
                + c.client_id.len()
                + will
                + c.username.as_ref().map_or(0, |u| 2 + u.len())
                + c.password.as_ref().map_or(0, |p| 2 + p.len())
        }
        Packet::ConnAck(a) => 2 + props(&a.properties),
        Packet::Publish(p) => {
            2 + p.topic.len()
                + if p.qos == QoS::AtMostOnce { 0 } else { 2 }
                + props(&p.properties)
                + p.payload.len()
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            ack_len(v5, a.reason_code, &a.properties)
        }
        Packet::Subscribe(s) => {
            2 + props(&s.properties) + s.filters.iter().map(|f| 3 + f.filter.len()).sum::<usize>()
        }
        Packet::SubAck(s) => 2 + props(&s.properties) + s.reason_codes.len(),
        Packet::Unsubscribe(u) => {
            2 + props(&u.properties) + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
        }
        Packet::UnsubAck(u) => {
            if v5 {
                2 + props_block_len(&u.properties) + u.reason_codes.len()
            } else {
                2
            }
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if !v5 {
                return 0;
            }
            match props_len(&d.properties) {
                0 if d.reason_code == ReasonCode::NORMAL_DISCONNECTION => 0,
                0 => 1,
                n => 1 + vbi_len(n) + n,
            }
        }
        Packet::Auth(a) => match props_len(&a.properties) {
            0 if a.reason_code == ReasonCode::SUCCESS => 0,
            n => 1 + vbi_len(n) + n,
        },
    }
}

fn write_ack(
    buf: &mut BytesMut,
    v5: bool,
    packet_id: u16,
    reason: ReasonCode,
    props: &Properties,
) -> Result<(), EncodeError> {
    buf.put_u16(packet_id);
    if v5 {
        let n = props_len(props);
        if n > 0 || reason != ReasonCode::SUCCESS {
            buf.put_u8(reason.0);
        }
        if n > 0 {
            put_props(buf, props)?;
        }
    }
    Ok(())
}

fn write_body(
    packet: &Packet,
    v5: bool,
    version: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => {
            put_str(buf, "MQTT")?;
            buf.put_u8(version.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            buf.put_u8(flags);
            buf.put_u16(c.keep_alive);
            if v5 {
                put_props(buf, &c.properties)?;
            }
            put_str(buf, &c.client_id)?;
            if let Some(w) = &c.will {
                if v5 {
                    put_props(buf, &w.properties)?;
                }
                put_str(buf, &w.topic)?;
                put_bin(buf, &w.payload)?;
            }
            if let Some(u) = &c.username {
                put_str(buf, u)?;
            }
            if let Some(p) = &c.password {
                put_bin(buf, p)?;
            }
        }
        Packet::ConnAck(a) => {
            // Session Present must be 0 with a refusal ([MQTT-3.2.2-4] 3.1.1, [MQTT-3.2.2-6] v5).
            let code = if v5 {
                a.reason_code.0
            } else {
                v311_connack_code(a.reason_code)
            };
            buf.put_u8(u8::from(a.session_present && code == 0));
            buf.put_u8(code);
            if v5 {
                put_props(buf, &a.properties)?;
            }
        }
        Packet::Publish(p) => {
            put_str(buf, &p.topic)?;
            if p.qos != QoS::AtMostOnce {
                buf.put_u16(p.packet_id);
            }
            if v5 {
                put_props(buf, &p.properties)?;
            }
            buf.put_slice(&p.payload);
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            write_ack(buf, v5, a.packet_id, a.reason_code, &a.properties)?;
        }
        Packet::Subscribe(s) => {
            buf.put_u16(s.packet_id);
            if v5 {
                put_props(buf, &s.properties)?;
            }
            for f in &s.filters {
                put_str(buf, &f.filter)?;
                let o = &f.options;
                let mut byte = o.qos as u8;
                if v5 {
                    byte |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 0b11) << 4;
                }
                buf.put_u8(byte);
            }
        }
        Packet::SubAck(s) => {
            buf.put_u16(s.packet_id);
            if v5 {
                put_props(buf, &s.properties)?;
                buf.extend(s.reason_codes.iter().map(|rc| rc.0));
            } else {
                buf.extend(s.reason_codes.iter().map(|&rc| v311_suback_code(rc)));
            }
        }
        Packet::Unsubscribe(u) => {
            buf.put_u16(u.packet_id);
            if v5 {
                put_props(buf, &u.properties)?;
            }
            for f in &u.filters {
                put_str(buf, f)?;
            }
        }
        Packet::UnsubAck(u) => {
            buf.put_u16(u.packet_id);
            if v5 {
                put_props(buf, &u.properties)?;
                buf.extend(u.reason_codes.iter().map(|rc| rc.0));
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                let n = props_len(&d.properties);
                if n > 0 || d.reason_code != ReasonCode::NORMAL_DISCONNECTION {
                    buf.put_u8(d.reason_code.0);
                }
                if n > 0 {
                    put_props(buf, &d.properties)?;
                }
            }
        }
        Packet::Auth(a) => {
            if a.reason_code != ReasonCode::SUCCESS || props_len(&a.properties) > 0 {
                buf.put_u8(a.reason_code.0);
                put_props(buf, &a.properties)?;
            }
        }
    }
    Ok(())
}
