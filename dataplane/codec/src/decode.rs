//! Decoding: `&mut BytesMut` in, at most one packet out per call.
//!
//! The whole packet is split off the input buffer as one `Bytes` before parsing, so payloads,
//! passwords and binary properties are zero-copy slices of the received bytes; only strings are
//! copied (the packet model owns them as `String`).

use bytes::{Buf, Bytes, BytesMut};

use crate::topic::{validate_topic_filter, validate_topic_name};
use crate::{
    Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Protocol, PubResponse,
    Publish, QoS, ReasonCode, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will,
};

/// The largest value a Remaining Length can carry (four-byte Variable Byte Integer).
pub(crate) const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Most a single incomplete packet makes `decode` reserve ahead of the bytes actually received.
const RESERVE_CAP: usize = 64 * 1024;

/// Truncated content or trailing bytes: the Remaining Length disagrees with the packet's contents.
const LENGTH_CLAUSE: &str = "[MQTT-2.1.4]";
const VBI_CLAUSE: &str = "[MQTT-1.5.5-1]";
const PACKET_TYPE_CLAUSE: &str = "[MQTT-2.1.2]";
const PROPERTY_CLAUSE: &str = "[MQTT-2.2.2.2]";
const DUPLICATE_PROPERTY_CLAUSE: &str = "[MQTT-2.2.2-2]";
const PACKET_ID_CLAUSE: &str = "[MQTT-2.2.1-3]";

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
pub fn decode(buf: &mut BytesMut, opts: &DecodeOptions) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // The first byte alone decides type, flags and (before CONNECT) acceptability: fail early,
    // before waiting for a body a hostile peer may never finish.
    check_first_byte(first, opts)?;

    let Some((remaining, header_len)) = read_remaining_length(buf)? else {
        return Ok(None);
    };
    let total = header_len + remaining;
    if total > opts.max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: opts.max_packet_size,
        });
    }
    if buf.len() < total {
        // Make room for the rest of this packet so the next read can land it, but never more than
        // RESERVE_CAP at once: an announced length costs nothing to send, memory does.
        buf.reserve((total - buf.len()).min(RESERVE_CAP));
        return Ok(None);
    }

    let mut frame = buf.split_to(total).freeze();
    frame.advance(header_len);
    let mut r = Reader { buf: frame, pos: 0 };
    let version = opts.version.unwrap_or(Protocol::V5);
    let v5 = version == Protocol::V5;
    let flags = first & 0x0f;

    let packet = match first >> 4 {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => Packet::ConnAck(connack(&mut r, v5)?),
        3 => Packet::Publish(publish(&mut r, flags, v5, opts.topic_alias_maximum)?),
        4 => Packet::PubAck(pub_response(&mut r, v5)?),
        5 => Packet::PubRec(pub_response(&mut r, v5)?),
        6 => Packet::PubRel(pub_response(&mut r, v5)?),
        7 => Packet::PubComp(pub_response(&mut r, v5)?),
        8 => Packet::Subscribe(subscribe(&mut r, v5)?),
        9 => Packet::SubAck(suback(&mut r, v5)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        11 => Packet::UnsubAck(unsuback(&mut r, v5)?),
        12 => {
            r.finish("PINGREQ")?;
            Packet::PingReq
        }
        13 => {
            r.finish("PINGRESP")?;
            Packet::PingResp
        }
        14 => Packet::Disconnect(disconnect(&mut r, v5)?),
        // 15: check_first_byte already refused AUTH on 3.1.1.
        _ => Packet::Auth(auth(&mut r)?),
    };
    Ok(Some(packet))
}

/// The protocol a CONNECT at the front of `buf` announces, without consuming anything: `V5` for
/// level 5, `V311` for any other level. `None` when `buf` does not (yet) hold a CONNECT's protocol
/// level. Lets a server answer a CONNECT that [`decode`] refused with a CONNACK the client can read
/// (MQTT 5 layout for level 5, the 3.1.1 layout otherwise, as for an unsupported level).
pub fn peek_connect_protocol(buf: &[u8]) -> Option<Protocol> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let mut i = 1;
    while buf.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    i += 1;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    let level = *buf.get(i + 2 + name_len)?;
    Some(if level == 5 {
        Protocol::V5
    } else {
        Protocol::V311
    })
}

fn check_first_byte(first: u8, opts: &DecodeOptions) -> Result<(), DecodeError> {
    let ptype = first >> 4;
    let flags = first & 0x0f;
    if ptype == 0 {
        return Err(DecodeError::malformed(
            PACKET_TYPE_CLAUSE,
            "packet type 0 is reserved",
        ));
    }
    match opts.version {
        None if ptype != 1 => {
            return Err(DecodeError::protocol(
                "[MQTT-3.1.0-1]",
                format!("first packet must be CONNECT, got type {ptype}"),
            ));
        }
        Some(Protocol::V311) if ptype == 15 => {
            return Err(DecodeError::malformed(
                PACKET_TYPE_CLAUSE,
                "packet type 15 is reserved in MQTT 3.1.1",
            ));
        }
        _ => {}
    }
    if ptype == 3 {
        let qos = (flags >> 1) & 0b11;
        if qos == 3 {
            return Err(DecodeError::malformed(
                "[MQTT-3.3.1-4]",
                "PUBLISH with QoS 3",
            ));
        }
        if qos == 0 && flags & 0b1000 != 0 {
            return Err(DecodeError::malformed(
                "[MQTT-3.3.1-2]",
                "DUP set on a QoS 0 PUBLISH",
            ));
        }
        return Ok(());
    }
    let expected = match ptype {
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::malformed(
            "[MQTT-2.1.3-1]",
            format!(
                "packet type {ptype} with fixed-header flags {flags:#06b}, expected {expected:#06b}"
            ),
        ));
    }
    Ok(())
}

/// `Some((remaining_length, fixed_header_len))`, or `None` while the length is incomplete.
fn read_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            if b == 0 && i > 2 {
                return Err(DecodeError::malformed(
                    VBI_CLAUSE,
                    "remaining length is not minimally encoded",
                ));
            }
            return Ok(Some((value, i)));
        }
        if i == 5 {
            return Err(DecodeError::malformed(
                VBI_CLAUSE,
                "remaining length longer than four bytes",
            ));
        }
    }
}

/// A cursor over one packet's variable header and payload.
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::malformed(
                LENGTH_CLAUSE,
                format!("packet ends inside {what}"),
            ));
        }
        Ok(())
    }

    fn finish(&self, what: &str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::malformed(
                LENGTH_CLAUSE,
                format!("{} unexpected trailing bytes in {what}", self.remaining()),
            ));
        }
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        let v = self.buf[self.pos];
        self.pos += 1;
        Ok(v)
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        let v = u16::from_be_bytes([self.buf[self.pos], self.buf[self.pos + 1]]);
        self.pos += 2;
        Ok(v)
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        let b = &self.buf[self.pos..self.pos + 4];
        let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        self.pos += 4;
        Ok(v)
    }

    fn varint(&mut self, what: &str) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8(what)?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(DecodeError::malformed(
                        VBI_CLAUSE,
                        format!("{what} is not minimally encoded"),
                    ));
                }
                return Ok(value);
            }
        }
        Err(DecodeError::malformed(
            VBI_CLAUSE,
            format!("{what} longer than four bytes"),
        ))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], DecodeError> {
        self.need(n, what)?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Binary Data: a zero-copy slice of the packet.
    fn binary(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16(what)?);
        self.need(len, what)?;
        let b = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(b)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(what)?);
        let raw = self.take(len, what)?;
        // from_utf8 rejects overlong forms and encoded surrogates (U+D800..U+DFFF).
        let s = std::str::from_utf8(raw).map_err(|_| {
            DecodeError::malformed("[MQTT-1.5.4-1]", format!("{what} is not well-formed UTF-8"))
        })?;
        if raw.contains(&0) {
            return Err(DecodeError::malformed(
                "[MQTT-1.5.4-2]",
                format!("{what} contains U+0000"),
            ));
        }
        Ok(s.to_owned())
    }

    /// Everything left: the payload, zero-copy.
    fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }

    fn packet_id(&mut self, what: &str) -> Result<u16, DecodeError> {
        let id = self.u16("packet identifier")?;
        if id == 0 {
            return Err(DecodeError::protocol(
                PACKET_ID_CLAUSE,
                format!("{what} with packet identifier 0"),
            ));
        }
        Ok(id)
    }
}

/// Where a property block sits; each property identifier is allowed in a set of these
/// (MQTT 5 section 2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Connect = 1 << 0,
    ConnAck = 1 << 1,
    Publish = 1 << 2,
    Will = 1 << 3,
    PubResponse = 1 << 4,
    Subscribe = 1 << 5,
    SubAck = 1 << 6,
    Unsubscribe = 1 << 7,
    UnsubAck = 1 << 8,
    Disconnect = 1 << 9,
    Auth = 1 << 10,
}

impl Ctx {
    fn name(self) -> &'static str {
        match self {
            Ctx::Connect => "CONNECT",
            Ctx::ConnAck => "CONNACK",
            Ctx::Publish => "PUBLISH",
            Ctx::Will => "Will Properties",
            Ctx::PubResponse => "PUBACK/PUBREC/PUBREL/PUBCOMP",
            Ctx::Subscribe => "SUBSCRIBE",
            Ctx::SubAck => "SUBACK",
            Ctx::Unsubscribe => "UNSUBSCRIBE",
            Ctx::UnsubAck => "UNSUBACK",
            Ctx::Disconnect => "DISCONNECT",
            Ctx::Auth => "AUTH",
        }
    }
}

const fn ctxs(list: &[Ctx]) -> u16 {
    let mut bits = 0;
    let mut i = 0;
    while i < list.len() {
        bits |= list[i] as u16;
        i += 1;
    }
    bits
}

const MESSAGE: u16 = ctxs(&[Ctx::Publish, Ctx::Will]);
const ALL: u16 = 0x7ff;

/// Which contexts may carry property `id`; `None` for an unknown identifier.
fn allowed_in(id: u32) -> Option<u16> {
    use Ctx::*;
    Some(match id {
        0x01..=0x03 | 0x08 | 0x09 => MESSAGE,
        0x0B => ctxs(&[Publish, Subscribe]),
        0x11 => ctxs(&[Connect, ConnAck, Disconnect]),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28..=0x2A => ConnAck as u16,
        0x15 | 0x16 => ctxs(&[Connect, ConnAck, Auth]),
        0x17 | 0x19 => Connect as u16,
        0x18 => Will as u16,
        0x1C => ctxs(&[ConnAck, Disconnect]),
        0x1F => ctxs(&[ConnAck, PubResponse, SubAck, UnsubAck, Disconnect, Auth]),
        0x21 | 0x22 | 0x27 => ctxs(&[Connect, ConnAck]),
        0x23 => Publish as u16,
        0x26 => ALL,
        _ => return None,
    })
}

fn bool_byte(r: &mut Reader, clause: &'static str, what: &str) -> Result<u8, DecodeError> {
    let v = r.u8(what)?;
    if v > 1 {
        return Err(DecodeError::protocol(
            clause,
            format!("{what} must be 0 or 1, got {v}"),
        ));
    }
    Ok(v)
}

fn response_topic(r: &mut Reader) -> Result<String, DecodeError> {
    let t = r.string("response topic")?;
    if t.is_empty() || t.contains(['+', '#']) {
        return Err(DecodeError::protocol(
            "[MQTT-3.3.2-14]",
            format!("response topic {t:?} is not a valid topic name"),
        ));
    }
    Ok(t)
}

/// Read a property block (length included) for `ctx`.
fn read_properties(r: &mut Reader, ctx: Ctx, alias_max: u16) -> Result<Properties, DecodeError> {
    let len = r.varint("property length")? as usize;
    r.need(len, "properties")?;
    let end = r.pos + len;
    let mut p = Properties::default();
    if len == 0 {
        return Ok(p);
    }
    let mut seen = 0u64;
    while r.pos < end {
        let id = r.varint("property identifier")?;
        let Some(allowed) = allowed_in(id) else {
            return Err(DecodeError::malformed(
                PROPERTY_CLAUSE,
                format!("unknown property identifier {id:#04x}"),
            ));
        };
        if allowed & ctx as u16 == 0 {
            return Err(DecodeError::malformed(
                PROPERTY_CLAUSE,
                format!("property {id:#04x} is not allowed in {}", ctx.name()),
            ));
        }
        let repeatable = id == 0x26 || (id == 0x0B && ctx == Ctx::Publish);
        if !repeatable {
            if seen & (1 << id) != 0 {
                return Err(DecodeError::protocol(
                    DUPLICATE_PROPERTY_CLAUSE,
                    format!("property {id:#04x} appears twice in {}", ctx.name()),
                ));
            }
            seen |= 1 << id;
        }
        match id {
            0x01 => {
                p.payload_format_indicator = Some(bool_byte(
                    r,
                    "[MQTT-3.3.2.3.2]",
                    "payload format indicator",
                )?)
            }
            0x02 => p.message_expiry_interval = Some(r.u32("message expiry interval")?),
            0x03 => p.content_type = Some(r.string("content type")?),
            0x08 => p.response_topic = Some(response_topic(r)?),
            0x09 => p.correlation_data = Some(r.binary("correlation data")?),
            0x0B => {
                let v = r.varint("subscription identifier")?;
                if v == 0 {
                    return Err(DecodeError::protocol(
                        "[MQTT-3.8.2.1.2]",
                        "subscription identifier 0",
                    ));
                }
                p.subscription_identifiers.push(v);
            }
            0x11 => p.session_expiry_interval = Some(r.u32("session expiry interval")?),
            0x12 => p.assigned_client_identifier = Some(r.string("assigned client identifier")?),
            0x13 => p.server_keep_alive = Some(r.u16("server keep alive")?),
            0x15 => p.authentication_method = Some(r.string("authentication method")?),
            0x16 => p.authentication_data = Some(r.binary("authentication data")?),
            0x17 => {
                p.request_problem_information = Some(bool_byte(
                    r,
                    "[MQTT-3.1.2.11.7]",
                    "request problem information",
                )?)
            }
            0x18 => p.will_delay_interval = Some(r.u32("will delay interval")?),
            0x19 => {
                p.request_response_information = Some(bool_byte(
                    r,
                    "[MQTT-3.1.2.11.6]",
                    "request response information",
                )?)
            }
            0x1A => p.response_information = Some(r.string("response information")?),
            0x1C => p.server_reference = Some(r.string("server reference")?),
            0x1F => p.reason_string = Some(r.string("reason string")?),
            0x21 => {
                let v = r.u16("receive maximum")?;
                if v == 0 {
                    return Err(DecodeError::protocol(
                        "[MQTT-3.1.2.11.3]",
                        "receive maximum 0",
                    ));
                }
                p.receive_maximum = Some(v);
            }
            0x22 => p.topic_alias_maximum = Some(r.u16("topic alias maximum")?),
            0x23 => {
                let v = r.u16("topic alias")?;
                if v == 0 {
                    return Err(DecodeError::violation(
                        "[MQTT-3.3.2-8]",
                        ReasonCode::TOPIC_ALIAS_INVALID,
                        "topic alias 0",
                    ));
                }
                if v > alias_max {
                    return Err(DecodeError::violation(
                        "[MQTT-3.3.2-9]",
                        ReasonCode::TOPIC_ALIAS_INVALID,
                        format!("topic alias {v} exceeds the topic alias maximum {alias_max}"),
                    ));
                }
                p.topic_alias = Some(v);
            }
            0x24 => p.maximum_qos = Some(bool_byte(r, "[MQTT-3.2.2.3.4]", "maximum QoS")?),
            0x25 => {
                p.retain_available = Some(bool_byte(r, "[MQTT-3.2.2.3.5]", "retain available")?)
            }
            0x26 => {
                let k = r.string("user property name")?;
                let v = r.string("user property value")?;
                p.user_properties.push((k, v));
            }
            0x27 => {
                let v = r.u32("maximum packet size")?;
                if v == 0 {
                    return Err(DecodeError::protocol(
                        "[MQTT-3.1.2.11.4]",
                        "maximum packet size 0",
                    ));
                }
                p.maximum_packet_size = Some(v);
            }
            0x28 => {
                p.wildcard_subscription_available = Some(bool_byte(
                    r,
                    "[MQTT-3.2.2.3.11]",
                    "wildcard subscription available",
                )?)
            }
            0x29 => {
                p.subscription_identifiers_available = Some(bool_byte(
                    r,
                    "[MQTT-3.2.2.3.12]",
                    "subscription identifiers available",
                )?)
            }
            _ => {
                // 0x2A, the last identifier allowed_in() knows.
                p.shared_subscription_available = Some(bool_byte(
                    r,
                    "[MQTT-3.2.2.3.13]",
                    "shared subscription available",
                )?)
            }
        }
        if r.pos > end {
            return Err(DecodeError::malformed(
                LENGTH_CLAUSE,
                format!("property {id:#04x} runs past the property length"),
            ));
        }
    }
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::protocol(
            "[MQTT-3.1.2.11.10]",
            "authentication data without authentication method",
        ));
    }
    Ok(p)
}

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name_len = usize::from(r.u16("protocol name")?);
    let name = r.take(name_len, "protocol name")?;
    if name != b"MQTT" {
        return Err(DecodeError::violation(
            "[MQTT-3.1.2-1]",
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            format!("protocol name {:?}", String::from_utf8_lossy(name)),
        ));
    }
    let protocol = match r.u8("protocol level")? {
        4 => Protocol::V311,
        5 => Protocol::V5,
        level => {
            return Err(DecodeError::violation(
                "[MQTT-3.1.2-2]",
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                format!("unsupported protocol level {level}"),
            ));
        }
    };
    let v5 = protocol == Protocol::V5;
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::malformed(
            "[MQTT-3.1.2-3]",
            "reserved connect flag is set",
        ));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && will_qos != 0 {
        return Err(DecodeError::malformed(
            "[MQTT-3.1.2-11]",
            "will QoS set without the will flag",
        ));
    }
    if will_qos == 3 {
        return Err(DecodeError::malformed("[MQTT-3.1.2-12]", "will QoS 3"));
    }
    if !will_flag && will_retain {
        return Err(DecodeError::malformed(
            "[MQTT-3.1.2-13]",
            "will retain set without the will flag",
        ));
    }
    if !v5 && has_password && !has_username {
        return Err(DecodeError::malformed(
            "[MQTT-3.1.2-22]",
            "password flag set without the user name flag",
        ));
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if v5 {
        read_properties(r, Ctx::Connect, 0)?
    } else {
        Properties::default()
    };
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = if v5 {
            read_properties(r, Ctx::Will, 0)?
        } else {
            Properties::default()
        };
        let topic = r.string("will topic")?;
        validate_topic_name(&topic)?;
        let payload = r.binary("will payload")?;
        check_payload_format(&properties, &payload, "[MQTT-3.1.3.2.3]")?;
        Some(Will {
            topic,
            payload,
            qos: QoS::from_u8(will_qos).unwrap_or_default(),
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string("user name")?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary("password")?)
    } else {
        None
    };
    r.finish("CONNECT")?;
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        username,
        password,
        will,
        properties,
    })
}

/// 3.1.1 CONNACK return code (0..=5) to the equivalent MQTT 5 reason code.
fn v311_connack_reason(code: u8) -> Option<ReasonCode> {
    Some(match code {
        0 => ReasonCode::SUCCESS,
        1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        3 => ReasonCode::SERVER_UNAVAILABLE,
        4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        5 => ReasonCode::NOT_AUTHORIZED,
        _ => return None,
    })
}

fn connack(r: &mut Reader, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("connect acknowledge flags")?;
    if flags & 0xfe != 0 {
        return Err(DecodeError::malformed(
            "[MQTT-3.2.2-1]",
            "reserved connect acknowledge flags are set",
        ));
    }
    let code = r.u8("connect reason code")?;
    let (reason_code, properties) = if v5 {
        (ReasonCode(code), read_properties(r, Ctx::ConnAck, 0)?)
    } else {
        let reason = v311_connack_reason(code).ok_or_else(|| {
            DecodeError::malformed(
                "[MQTT-3.2.2.3]",
                format!("reserved CONNACK return code {code}"),
            )
        })?;
        (reason, Properties::default())
    };
    r.finish("CONNACK")?;
    if flags & 1 != 0 && code != 0 {
        return Err(DecodeError::protocol(
            "[MQTT-3.2.2-6]",
            "session present set on a refused connection",
        ));
    }
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        reason_code,
        properties,
    })
}

fn publish(r: &mut Reader, flags: u8, v5: bool, alias_max: u16) -> Result<Publish, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 0b11).unwrap_or_default();
    let topic = r.string("topic name")?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        r.packet_id("PUBLISH")?
    };
    let properties = if v5 {
        read_properties(r, Ctx::Publish, alias_max)?
    } else {
        Properties::default()
    };
    if topic.is_empty() && v5 {
        if properties.topic_alias.is_none() {
            return Err(DecodeError::protocol(
                "[MQTT-3.3.2.1]",
                "empty topic name without a topic alias",
            ));
        }
    } else {
        validate_topic_name(&topic)?;
    }
    let payload = r.rest();
    check_payload_format(&properties, &payload, "[MQTT-3.3.2.3.2]")?;
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 1 != 0,
        topic,
        packet_id,
        payload,
        properties,
    })
}

/// Payload Format Indicator 1 announces UTF-8 character data; the receiver may check it and
/// answer 0x99 (Payload format invalid). We check it: a consumer that trusts the indicator must
/// never be handed bytes that are not UTF-8.
fn check_payload_format(
    properties: &Properties,
    payload: &[u8],
    clause: &'static str,
) -> Result<(), DecodeError> {
    if properties.payload_format_indicator == Some(1) && std::str::from_utf8(payload).is_err() {
        return Err(DecodeError::violation(
            clause,
            ReasonCode::PAYLOAD_FORMAT_INVALID,
            "payload format indicator is 1 (UTF-8) but the payload is not valid UTF-8",
        ));
    }
    Ok(())
}

fn pub_response(r: &mut Reader, v5: bool) -> Result<PubResponse, DecodeError> {
    let packet_id = r.packet_id("acknowledgement")?;
    let mut out = PubResponse {
        packet_id,
        ..PubResponse::default()
    };
    if v5 && r.remaining() > 0 {
        out.reason_code = ReasonCode(r.u8("reason code")?);
        if r.remaining() > 0 {
            out.properties = read_properties(r, Ctx::PubResponse, 0)?;
        }
    }
    r.finish("acknowledgement")?;
    Ok(out)
}

fn subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id("SUBSCRIBE")?;
    let properties = if v5 {
        read_properties(r, Ctx::Subscribe, 0)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string("topic filter")?;
        let o = r.u8("subscription options")?;
        let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
        if o & reserved != 0 {
            return Err(DecodeError::malformed(
                "[MQTT-3.8.3-5]",
                format!("reserved subscription option bits set in {o:#010b}"),
            ));
        }
        let Some(qos) = QoS::from_u8(o & 0b11) else {
            return Err(if v5 {
                DecodeError::protocol("[MQTT-3.8.3.1]", "subscription maximum QoS 3")
            } else {
                DecodeError::malformed("[MQTT-3.8.3-5]", "subscription QoS 3")
            });
        };
        let retain_handling = (o >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(DecodeError::protocol("[MQTT-3.8.3.1]", "retain handling 3"));
        }
        validate_topic_filter(&filter)?;
        let no_local = o & 0b100 != 0;
        if no_local && filter.starts_with("$share/") {
            return Err(DecodeError::protocol(
                "[MQTT-3.8.3-4]",
                "No Local set on a shared subscription",
            ));
        }
        filters.push(SubscribeFilter {
            filter,
            options: SubscriptionOptions {
                qos,
                no_local,
                retain_as_published: o & 0b1000 != 0,
                retain_handling,
            },
        });
    }
    if filters.is_empty() {
        return Err(DecodeError::protocol(
            "[MQTT-3.8.3-3]",
            "SUBSCRIBE without topic filters",
        ));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id("SUBACK")?;
    let properties = if v5 {
        read_properties(r, Ctx::SubAck, 0)?
    } else {
        Properties::default()
    };
    let codes = r.rest();
    if codes.is_empty() {
        return Err(DecodeError::malformed(
            "[MQTT-3.9.3]",
            "SUBACK without reason codes",
        ));
    }
    if !v5 && let Some(bad) = codes.iter().find(|&&c| c > 2 && c != 0x80) {
        return Err(DecodeError::malformed(
            "[MQTT-3.9.3-2]",
            format!("reserved SUBACK return code {bad:#04x}"),
        ));
    }
    Ok(SubAck {
        packet_id,
        reason_codes: codes.iter().map(|&c| ReasonCode(c)).collect(),
        properties,
    })
}

fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id("UNSUBSCRIBE")?;
    let properties = if v5 {
        read_properties(r, Ctx::Unsubscribe, 0)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string("topic filter")?;
        validate_topic_filter(&filter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(DecodeError::protocol(
            "[MQTT-3.10.3-2]",
            "UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id("UNSUBACK")?;
    if !v5 {
        r.finish("UNSUBACK")?;
        return Ok(UnsubAck {
            packet_id,
            reason_codes: Vec::new(),
            properties: Properties::default(),
        });
    }
    let properties = read_properties(r, Ctx::UnsubAck, 0)?;
    let codes = r.rest();
    if codes.is_empty() {
        return Err(DecodeError::malformed(
            "[MQTT-3.11.3]",
            "UNSUBACK without reason codes",
        ));
    }
    Ok(UnsubAck {
        packet_id,
        reason_codes: codes.iter().map(|&c| ReasonCode(c)).collect(),
        properties,
    })
}

fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut out = Disconnect::default();
    if v5 && r.remaining() > 0 {
        out.reason_code = ReasonCode(r.u8("reason code")?);
        if r.remaining() > 0 {
            out.properties = read_properties(r, Ctx::Disconnect, 0)?;
        }
    }
    r.finish("DISCONNECT")?;
    Ok(out)
}

fn auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut out = Auth::default();
    if r.remaining() > 0 {
        out.reason_code = ReasonCode(r.u8("reason code")?);
        if r.remaining() > 0 {
            out.properties = read_properties(r, Ctx::Auth, 0)?;
        }
    }
    r.finish("AUTH")?;
    Ok(out)
}
