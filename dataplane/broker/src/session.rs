//! One client's session as a pure state machine: events in, actions out, no I/O and no clock of
//! its own (the caller passes `now` in Unix milliseconds), so every QoS rule is unit-tested without
//! tokio.
//!
//! Outbound (broker → client): each delivery is sent at once when the client is connected and,
//! for QoS 1/2, the in-flight window (the client's Receive Maximum) has room; otherwise QoS 1/2
//! messages wait in the queue and QoS 0 messages to an offline client are dropped (counted).
//! A full queue applies the configured [`OverflowPolicy`]: `drop_new` refuses the new message,
//! `drop_oldest` discards the oldest queued one. Messages whose Message Expiry Interval has passed
//! are dropped instead of sent, and the interval is decremented by the time spent in the broker.
//! A message larger than the client's Maximum Packet Size is dropped for that client. Every drop
//! yields [`Action::Dropped`]. On reconnect, unacknowledged PUBLISHes are resent with DUP and
//! PUBRELs resent before anything queued.
//!
//! Inbound (client → broker): topic alias resolution, our Receive Maximum (exceeding it is
//! DISCONNECT 0x93) and QoS 2 deduplication by packet identifier.
//!
//! Persistent sessions (Session Expiry Interval > 0) emit [`Action::Persist`] store operations
//! for every change to their QoS 1/2 messages; the record format is in [`encode_message`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use meridian_codec::{
    DecodeOptions, Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode,
};
use meridian_store::Op;

use crate::config::OverflowPolicy;
use crate::router::SubOptions;

/// A message as routed: shared by every subscriber it is delivered to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Forwarded unchanged, except Message Expiry (recomputed), Topic Alias and Subscription
    /// Identifiers (per subscriber).
    pub properties: Properties,
    /// Absolute expiry, Unix milliseconds.
    pub expires_at: Option<u64>,
}

impl Msg {
    /// Build from an inbound PUBLISH, clearing per-hop properties.
    pub fn from_publish(p: Publish, now_ms: u64) -> Msg {
        let mut properties = p.properties;
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        let expires_at = properties
            .message_expiry_interval
            .map(|s| now_ms + u64::from(s) * 1000);
        Msg {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            expires_at,
        }
    }
}

/// One message on its way to one subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub msg: Arc<Msg>,
    /// Already downgraded to the subscription's maximum.
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The shared subscription it came through, for redelivery when this member leaves.
    pub shared: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    Queued,
    Sent,
    /// PUBREC received, PUBREL sent.
    Released,
}

#[derive(Debug, Clone)]
struct OutMsg {
    seq: u64,
    pid: u16,
    state: OutState,
    d: Delivery,
}

/// Why a message was not delivered to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
    Expired,
    TooLarge,
    OfflineQos0,
    SlowConsumer,
    NotAuthorized,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "packet_too_large",
            DropReason::OfflineQos0 => "offline_qos0",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::NotAuthorized => "not_authorized",
        }
    }
}

/// What the session asks its owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
// Actions live briefly in a reused vector; boxing `Send` would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    Send(Packet),
    Persist(Op),
    Dropped { reason: DropReason, topic: String },
}

/// What a connected client told us about itself in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    pub protocol: Protocol,
    /// The client's Receive Maximum: our outbound in-flight window.
    pub receive_maximum: u16,
    /// The client's Maximum Packet Size.
    pub maximum_packet_size: u32,
    /// Outbound aliases we may assign (min of client's maximum and our configured count).
    pub topic_alias_maximum: u16,
}

/// Outbound and inbound session events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connected(ClientLimits),
    Disconnected,
    Deliver(Delivery),
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    /// A PUBREC with an error code: the client refused the message; the flow ends.
    Abort(u16),
}

/// What to do with an inbound PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Route it (QoS 1/2: then acknowledge and call [`Session::inbound_done`]).
    Route,
    /// A QoS 2 retransmission already routed: only answer PUBREC.
    Duplicate,
}

/// A protocol violation found by the session: DISCONNECT with this code and reason string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub reason: ReasonCode,
    pub message: &'static str,
}

/// The session state machine.
#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    /// Seconds; 0 = ends with the connection; `u32::MAX` = never expires.
    pub expiry_interval: u32,
    /// Filter (as sent, `$share/...` included) → options.
    pub subscriptions: BTreeMap<String, SubOptions>,
    max_queued: usize,
    overflow: OverflowPolicy,
    limits: Option<ClientLimits>,
    inflight: BTreeMap<u16, OutMsg>,
    queue: VecDeque<OutMsg>,
    next_pid: u16,
    next_seq: u64,
    // inbound
    server_receive_maximum: u16,
    inbound_pending: usize,
    /// Topic aliases and inbound QoS 2 state: most sessions never use them, so they live in a
    /// box created on first use (an idle session stays small; see docs/benchmarks.md).
    sparse: Option<Box<Sparse>>,
}

/// The parts of a [`Session`] that only some clients use.
#[derive(Debug, Default)]
struct Sparse {
    /// Outbound topic aliases we assigned (topic → alias), for this connection.
    aliases_out: BTreeMap<String, u16>,
    /// Inbound topic aliases the client set (alias → topic), for this connection.
    aliases_in: BTreeMap<u16, String>,
    /// Inbound QoS 2 packet ids awaiting PUBREL (kept across reconnects).
    inbound_qos2: BTreeSet<u16>,
}

impl Session {
    pub fn new(
        client_id: Arc<str>,
        expiry_interval: u32,
        max_queued: usize,
        overflow: OverflowPolicy,
        server_receive_maximum: u16,
    ) -> Session {
        Session {
            client_id,
            expiry_interval,
            subscriptions: BTreeMap::new(),
            max_queued,
            overflow,
            limits: None,
            inflight: BTreeMap::new(),
            queue: VecDeque::new(),
            next_pid: 1,
            next_seq: 1,
            server_receive_maximum,
            inbound_pending: 0,
            sparse: None,
        }
    }

    pub fn persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    pub fn connected(&self) -> bool {
        self.limits.is_some()
    }

    /// QoS 1/2 messages held (in flight + queued).
    pub fn pending_len(&self) -> usize {
        self.inflight.len() + self.queue.len()
    }

    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub fn inbound_qos2_ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.sparse
            .iter()
            .flat_map(|s| s.inbound_qos2.iter().copied())
    }

    fn sparse(&mut self) -> &mut Sparse {
        self.sparse.get_or_insert_default()
    }

    /// A connection ends or starts: topic aliases are per connection ([MQTT-3.3.2-7]).
    fn forget_aliases(&mut self) {
        if let Some(s) = &mut self.sparse {
            s.aliases_out.clear();
            s.aliases_in.clear();
            if s.inbound_qos2.is_empty() {
                self.sparse = None;
            }
        }
    }

    /// Run one event.
    pub fn handle(&mut self, event: Event, now_ms: u64, out: &mut Vec<Action>) {
        match event {
            Event::Connected(limits) => self.on_connected(limits, now_ms, out),
            Event::Disconnected => {
                self.limits = None;
                self.forget_aliases();
                self.inbound_pending = 0;
            }
            Event::Deliver(d) => self.deliver(d, now_ms, out),
            Event::PubAck(pid) => {
                if let Some(m) = self.inflight.get(&pid)
                    && m.d.qos == QoS::AtLeastOnce
                {
                    let m = self.inflight.remove(&pid).expect("present");
                    self.forget(&m, out);
                    self.pump(now_ms, out);
                }
            }
            Event::PubRec(pid) => {
                if let Some(m) = self.inflight.get_mut(&pid)
                    && m.d.qos == QoS::ExactlyOnce
                {
                    m.state = OutState::Released;
                    let m = m.clone();
                    self.persist(&m, out);
                    out.push(Action::Send(Packet::PubRel(PubResponse {
                        packet_id: pid,
                        ..Default::default()
                    })));
                } else {
                    // An unknown id: answer so the client can finish its flow.
                    out.push(Action::Send(Packet::PubRel(PubResponse {
                        packet_id: pid,
                        reason_code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                        ..Default::default()
                    })));
                }
            }
            Event::Abort(pid) => {
                if let Some(m) = self.inflight.remove(&pid) {
                    self.forget(&m, out);
                    self.pump(now_ms, out);
                }
            }
            Event::PubComp(pid) => {
                if let Some(m) = self.inflight.get(&pid)
                    && m.state == OutState::Released
                {
                    let m = self.inflight.remove(&pid).expect("present");
                    self.forget(&m, out);
                    self.pump(now_ms, out);
                }
            }
        }
    }

    fn on_connected(&mut self, limits: ClientLimits, now_ms: u64, out: &mut Vec<Action>) {
        self.limits = Some(limits);
        self.forget_aliases();
        self.inbound_pending = 0;
        // Resend in the order they were first sent ([MQTT-4.4.0-1]), with DUP.
        let mut inflight: Vec<&OutMsg> = self.inflight.values().collect();
        inflight.sort_by_key(|m| m.seq);
        let resend: Vec<OutMsg> = inflight.into_iter().cloned().collect();
        for m in resend {
            match m.state {
                OutState::Released => out.push(Action::Send(Packet::PubRel(PubResponse {
                    packet_id: m.pid,
                    ..Default::default()
                }))),
                _ => {
                    let p = self.publish_packet(&m.d, m.pid, true, now_ms, true);
                    out.push(Action::Send(Packet::Publish(p)));
                }
            }
        }
        self.pump(now_ms, out);
    }

    fn deliver(&mut self, d: Delivery, now_ms: u64, out: &mut Vec<Action>) {
        if d.msg.expires_at.is_some_and(|e| e <= now_ms) {
            out.push(dropped(DropReason::Expired, &d));
            return;
        }
        let Some(limits) = self.limits else {
            if d.qos == QoS::AtMostOnce {
                out.push(dropped(DropReason::OfflineQos0, &d));
            } else {
                self.enqueue(d, out);
            }
            return;
        };
        if d.qos == QoS::AtMostOnce {
            if self.fits(&d, limits, now_ms) {
                let p = self.publish_packet(&d, 0, false, now_ms, false);
                out.push(Action::Send(Packet::Publish(p)));
            } else {
                out.push(dropped(DropReason::TooLarge, &d));
            }
            return;
        }
        if self.queue.is_empty() && self.inflight.len() < usize::from(limits.receive_maximum) {
            let seq = self.take_seq();
            self.send_new(d, seq, now_ms, out);
        } else {
            self.enqueue(d, out);
        }
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn enqueue(&mut self, d: Delivery, out: &mut Vec<Action>) {
        if self.queue.len() >= self.max_queued {
            match self.overflow {
                OverflowPolicy::DropNew => {
                    out.push(dropped(DropReason::QueueFull, &d));
                    return;
                }
                OverflowPolicy::DropOldest => {
                    if let Some(old) = self.queue.pop_front() {
                        out.push(dropped(DropReason::QueueFull, &old.d));
                        self.forget(&old, out);
                    }
                }
            }
        }
        let m = OutMsg {
            seq: self.take_seq(),
            pid: 0,
            state: OutState::Queued,
            d,
        };
        self.persist(&m, out);
        self.queue.push_back(m);
    }

    /// Move queued messages into the window while it has room.
    fn pump(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let Some(limits) = self.limits else { return };
        while self.inflight.len() < usize::from(limits.receive_maximum) {
            let Some(m) = self.queue.pop_front() else {
                break;
            };
            if m.d.msg.expires_at.is_some_and(|e| e <= now_ms) {
                out.push(dropped(DropReason::Expired, &m.d));
                self.forget(&m, out);
                continue;
            }
            let seq = m.seq;
            self.send_new(m.d, seq, now_ms, out);
        }
    }

    fn send_new(&mut self, d: Delivery, seq: u64, now_ms: u64, out: &mut Vec<Action>) {
        let limits = self.limits.expect("connected");
        if !self.fits(&d, limits, now_ms) {
            out.push(dropped(DropReason::TooLarge, &d));
            if self.persistent() {
                out.push(Action::Persist(Op::DeleteMessage {
                    client: self.client_id.to_string(),
                    seq,
                }));
            }
            return;
        }
        let pid = self.alloc_pid();
        let m = OutMsg {
            seq,
            pid,
            state: OutState::Sent,
            d,
        };
        self.persist(&m, out);
        let p = self.publish_packet(&m.d, pid, false, now_ms, true);
        self.inflight.insert(pid, m);
        out.push(Action::Send(Packet::Publish(p)));
    }

    fn alloc_pid(&mut self) -> u16 {
        loop {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            if !self.inflight.contains_key(&pid) {
                return pid;
            }
        }
    }

    /// Replaces the queue limit and overflow policy (the broker's limits as of the client's
    /// latest CONNECT). Messages already queued beyond a lower limit stay queued.
    pub fn set_queue_limit(&mut self, max_queued: usize, overflow: OverflowPolicy) {
        self.max_queued = max_queued;
        self.overflow = overflow;
    }

    /// Bytes of a routed topic this session's client does not see (its namespace's prefix).
    fn topic_prefix_len(&self) -> usize {
        crate::tenant::prefix_len_of_key(&self.client_id)
    }

    fn fits(&self, d: &Delivery, limits: ClientLimits, now_ms: u64) -> bool {
        if limits.maximum_packet_size == 0 || limits.maximum_packet_size >= 268_435_460 {
            return true;
        }
        // Cheap upper bound first, so the common case builds nothing: fixed header (5), topic
        // length prefix (2), packet id (2), property block with generous slack for its ids.
        let props = &d.msg.properties;
        let rough = 5
            + 2
            + d.msg.topic.len()
            + 2
            + d.msg.payload.len()
            + 64
            + props.content_type.as_ref().map_or(0, |s| s.len())
            + props.response_topic.as_ref().map_or(0, |s| s.len())
            + props.correlation_data.as_ref().map_or(0, |b| b.len())
            + props
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>()
            + d.subscription_ids.len() * 5;
        if rough <= limits.maximum_packet_size as usize {
            return true;
        }
        // Size without a topic alias: the alias can only make it smaller.
        let p = build_publish(
            d,
            1,
            false,
            now_ms,
            limits.protocol,
            self.topic_prefix_len(),
        );
        let len = meridian_codec::encoded_len(&Packet::Publish(p), limits.protocol);
        len <= limits.maximum_packet_size as usize
    }

    fn publish_packet(
        &mut self,
        d: &Delivery,
        pid: u16,
        dup: bool,
        now_ms: u64,
        _qos_flow: bool,
    ) -> Publish {
        let limits = self.limits.expect("connected");
        let mut p = build_publish(
            d,
            pid,
            dup,
            now_ms,
            limits.protocol,
            self.topic_prefix_len(),
        );
        if limits.protocol == Protocol::V5 && limits.topic_alias_maximum > 0 {
            let aliases = &mut self.sparse().aliases_out;
            if let Some(&alias) = aliases.get(&p.topic) {
                p.properties.topic_alias = Some(alias);
                p.topic = String::new();
            } else if aliases.len() < usize::from(limits.topic_alias_maximum) {
                let alias = aliases.len() as u16 + 1;
                aliases.insert(p.topic.clone(), alias);
                p.properties.topic_alias = Some(alias);
            }
        }
        p
    }

    fn persist(&self, m: &OutMsg, out: &mut Vec<Action>) {
        if self.persistent() && m.d.qos != QoS::AtMostOnce {
            out.push(Action::Persist(Op::PutMessage {
                client: self.client_id.to_string(),
                seq: m.seq,
                value: encode_message(m.pid, state_byte(m.state), &m.d),
            }));
        }
    }

    fn forget(&self, m: &OutMsg, out: &mut Vec<Action>) {
        if self.persistent() && m.d.qos != QoS::AtMostOnce {
            out.push(Action::Persist(Op::DeleteMessage {
                client: self.client_id.to_string(),
                seq: m.seq,
            }));
        }
    }

    /// Take every held message that came through a shared subscription (for redelivery to another
    /// member when this one leaves). `filter` limits it to one subscription.
    pub fn take_shared(&mut self, filter: Option<&str>, out: &mut Vec<Action>) -> Vec<Delivery> {
        let wanted = |d: &Delivery| {
            d.shared
                .as_deref()
                .is_some_and(|s| filter.is_none_or(|f| f == s))
        };
        let mut taken = Vec::new();
        let pids: Vec<u16> = self
            .inflight
            .iter()
            .filter(|(_, m)| m.state == OutState::Sent && wanted(&m.d))
            .map(|(pid, _)| *pid)
            .collect();
        let mut held: Vec<OutMsg> = pids
            .into_iter()
            .filter_map(|p| self.inflight.remove(&p))
            .collect();
        let (shared, keep): (Vec<OutMsg>, Vec<OutMsg>) =
            self.queue.drain(..).partition(|m| wanted(&m.d));
        self.queue = keep.into();
        held.extend(shared);
        held.sort_by_key(|m| m.seq);
        for m in held {
            self.forget(&m, out);
            taken.push(m.d);
        }
        taken
    }

    /// Restore a stored message (after a restart). Records with an unknown layout are skipped.
    pub fn restore_message(&mut self, seq: u64, value: &[u8], max_packet: u32) -> bool {
        let Some((pid, state, d)) = decode_message(value, max_packet) else {
            return false;
        };
        self.next_seq = self.next_seq.max(seq + 1);
        let state = match state {
            1 => OutState::Sent,
            2 => OutState::Released,
            _ => OutState::Queued,
        };
        let m = OutMsg { seq, pid, state, d };
        if state == OutState::Queued || pid == 0 {
            self.queue.push_back(OutMsg {
                state: OutState::Queued,
                ..m
            });
        } else {
            self.next_pid = self.next_pid.max(pid.wrapping_add(1).max(1));
            self.inflight.insert(pid, m);
        }
        true
    }

    /// Restore an inbound QoS 2 id awaiting PUBREL.
    pub fn restore_inbound_qos2(&mut self, pid: u16) {
        self.sparse().inbound_qos2.insert(pid);
    }

    // ---- inbound ----

    /// Check an inbound PUBLISH: resolves/records its topic alias (v5), enforces our Receive
    /// Maximum and deduplicates QoS 2.
    pub fn inbound_publish(&mut self, p: &mut Publish) -> Result<Inbound, Violation> {
        if let Some(alias) = p.properties.topic_alias {
            if p.topic.is_empty() {
                match self.sparse.as_ref().and_then(|s| s.aliases_in.get(&alias)) {
                    Some(t) => p.topic.clone_from(t),
                    None => {
                        return Err(Violation {
                            reason: ReasonCode::PROTOCOL_ERROR,
                            message: "[MQTT-3.3.4-?] unknown topic alias",
                        });
                    }
                }
            } else {
                self.sparse().aliases_in.insert(alias, p.topic.clone());
            }
        } else if p.topic.is_empty() {
            return Err(Violation {
                reason: ReasonCode::PROTOCOL_ERROR,
                message: "[MQTT-3.3.2-1] empty topic without a topic alias",
            });
        }
        match p.qos {
            QoS::AtMostOnce => Ok(Inbound::Route),
            QoS::AtLeastOnce | QoS::ExactlyOnce => {
                if p.qos == QoS::ExactlyOnce
                    && self
                        .sparse
                        .as_ref()
                        .is_some_and(|s| s.inbound_qos2.contains(&p.packet_id))
                {
                    return Ok(Inbound::Duplicate);
                }
                if self.inbound_pending >= usize::from(self.server_receive_maximum) {
                    return Err(Violation {
                        reason: ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                        message: "[MQTT-3.3.4-9] receive maximum exceeded",
                    });
                }
                self.inbound_pending += 1;
                if p.qos == QoS::ExactlyOnce {
                    self.sparse().inbound_qos2.insert(p.packet_id);
                }
                Ok(Inbound::Route)
            }
        }
    }

    /// A QoS 1 PUBLISH was acknowledged (PUBACK sent).
    pub fn inbound_acked(&mut self) {
        self.inbound_pending = self.inbound_pending.saturating_sub(1);
    }

    /// A QoS 2 PUBREL arrived; returns true when the id was known (answer PUBCOMP either way,
    /// with 0x92 when unknown).
    pub fn inbound_pubrel(&mut self, pid: u16) -> bool {
        let known = self
            .sparse
            .as_mut()
            .is_some_and(|s| s.inbound_qos2.remove(&pid));
        if known {
            self.inbound_pending = self.inbound_pending.saturating_sub(1);
        }
        known
    }
}

fn dropped(reason: DropReason, d: &Delivery) -> Action {
    Action::Dropped {
        reason,
        topic: d.msg.topic.clone(),
    }
}

fn state_byte(s: OutState) -> u8 {
    match s {
        OutState::Queued => 0,
        OutState::Sent => 1,
        OutState::Released => 2,
    }
}

/// The PUBLISH a delivery turns into (no alias yet), its topic without the first `strip` bytes
/// (the tenant prefix of an Event Grid namespace session, see `crate::tenant`).
pub fn build_publish(
    d: &Delivery,
    pid: u16,
    dup: bool,
    now_ms: u64,
    proto: Protocol,
    strip: usize,
) -> Publish {
    let mut properties = if proto == Protocol::V5 {
        d.msg.properties.clone()
    } else {
        Properties::default()
    };
    if proto == Protocol::V5 {
        if let Some(e) = d.msg.expires_at {
            // Round up so a message is never reported as already expired while still valid.
            properties.message_expiry_interval =
                Some(e.saturating_sub(now_ms).div_ceil(1000) as u32);
        }
        properties
            .subscription_identifiers
            .clone_from(&d.subscription_ids);
    }
    Publish {
        dup: dup && d.qos != QoS::AtMostOnce,
        qos: d.qos,
        retain: d.retain,
        topic: d.msg.topic.get(strip..).unwrap_or_default().to_owned(),
        packet_id: if d.qos == QoS::AtMostOnce { 0 } else { pid },
        payload: d.msg.payload.clone(),
        properties,
    }
}

/// Stored message record: `[1 version][1 state][2 pid][8 expires_at ms or 0][2 len][shared
/// filter][v5 PUBLISH encoding]`. The PUBLISH carries QoS, retain, topic, payload, properties and
/// subscription identifiers; its packet id is a placeholder (the real one is in the header).
pub fn encode_message(pid: u16, state: u8, d: &Delivery) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(64 + d.msg.payload.len() + d.msg.topic.len());
    buf.put_u8(1);
    buf.put_u8(state);
    buf.put_u16(pid);
    buf.put_u64(d.msg.expires_at.unwrap_or(0));
    let shared = d.shared.as_deref().unwrap_or("");
    buf.put_u16(shared.len() as u16);
    buf.put_slice(shared.as_bytes());
    let mut p = Publish {
        dup: false,
        qos: d.qos,
        retain: d.retain,
        topic: d.msg.topic.clone(),
        packet_id: 1,
        payload: d.msg.payload.clone(),
        properties: d.msg.properties.clone(),
    };
    p.properties.message_expiry_interval = None;
    p.properties
        .subscription_identifiers
        .clone_from(&d.subscription_ids);
    let _ = meridian_codec::encode(&Packet::Publish(p), Protocol::V5, &mut buf);
    buf.to_vec()
}

/// Inverse of [`encode_message`]: `(pid, state, delivery)`.
pub fn decode_message(value: &[u8], max_packet: u32) -> Option<(u16, u8, Delivery)> {
    let mut b = value;
    if b.len() < 14 || b.get_u8() != 1 {
        return None;
    }
    let state = b.get_u8();
    let pid = b.get_u16();
    let exp = b.get_u64();
    let slen = usize::from(b.get_u16());
    if b.len() < slen {
        return None;
    }
    let shared = std::str::from_utf8(&b[..slen]).ok()?.to_string();
    b.advance(slen);
    let mut buf = BytesMut::from(b);
    let opts = DecodeOptions {
        version: Some(Protocol::V5),
        max_packet_size: max_packet.max(buf.len() as u32),
        topic_alias_maximum: 0,
    };
    let Ok(Some(Packet::Publish(mut p))) = meridian_codec::decode(&mut buf, &opts) else {
        return None;
    };
    let subscription_ids = std::mem::take(&mut p.properties.subscription_identifiers);
    let qos = p.qos;
    let retain = p.retain;
    let msg = Msg {
        topic: p.topic,
        payload: p.payload,
        qos,
        retain,
        properties: p.properties,
        expires_at: (exp != 0).then_some(exp),
    };
    Some((
        pid,
        state,
        Delivery {
            msg: Arc::new(msg),
            qos,
            retain,
            subscription_ids,
            shared: (!shared.is_empty()).then_some(shared),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rm: u16) -> ClientLimits {
        ClientLimits {
            protocol: Protocol::V5,
            receive_maximum: rm,
            maximum_packet_size: 0,
            topic_alias_maximum: 0,
        }
    }

    fn delivery(topic: &str, qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Msg {
                topic: topic.into(),
                payload: Bytes::from_static(b"x"),
                qos,
                retain: false,
                properties: Properties::default(),
                expires_at: None,
            }),
            qos,
            retain: false,
            subscription_ids: vec![],
            shared: None,
        }
    }

    fn sent(out: &[Action]) -> Vec<&Publish> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send(Packet::Publish(p)) => Some(p),
                _ => None,
            })
            .collect()
    }

    fn session(expiry: u32) -> Session {
        Session::new("c".into(), expiry, 3, OverflowPolicy::DropNew, 2)
    }

    #[test]
    fn qos1_window_bounded_by_client_receive_maximum() {
        let mut s = session(0);
        let mut out = Vec::new();
        s.handle(Event::Connected(limits(2)), 0, &mut out);
        for _ in 0..4 {
            s.handle(Event::Deliver(delivery("t", QoS::AtLeastOnce)), 0, &mut out);
        }
        let pids: Vec<u16> = sent(&out).iter().map(|p| p.packet_id).collect();
        assert_eq!(pids, [1, 2]);
        assert_eq!(s.queued_len(), 2);
        out.clear();
        s.handle(Event::PubAck(1), 0, &mut out);
        assert_eq!(sent(&out).len(), 1);
        assert_eq!(sent(&out)[0].packet_id, 3);
    }

    #[test]
    fn qos2_outbound_flow_pubrec_pubrel_pubcomp() {
        let mut s = session(0);
        let mut out = Vec::new();
        s.handle(Event::Connected(limits(10)), 0, &mut out);
        s.handle(Event::Deliver(delivery("t", QoS::ExactlyOnce)), 0, &mut out);
        out.clear();
        s.handle(Event::PubAck(1), 0, &mut out); // wrong ack type for QoS 2: ignored
        assert!(out.is_empty());
        s.handle(Event::PubRec(1), 0, &mut out);
        assert!(matches!(&out[0], Action::Send(Packet::PubRel(r)) if r.packet_id == 1));
        out.clear();
        s.handle(Event::PubComp(1), 0, &mut out);
        assert_eq!(s.pending_len(), 0);
    }

    #[test]
    fn redelivery_on_reconnect_sets_dup_and_resends_pubrel() {
        let mut s = session(60);
        let mut out = Vec::new();
        s.handle(Event::Connected(limits(10)), 0, &mut out);
        s.handle(Event::Deliver(delivery("a", QoS::AtLeastOnce)), 0, &mut out);
        s.handle(Event::Deliver(delivery("b", QoS::ExactlyOnce)), 0, &mut out);
        s.handle(Event::PubRec(2), 0, &mut out);
        s.handle(Event::Disconnected, 0, &mut out);
        s.handle(Event::Deliver(delivery("c", QoS::AtLeastOnce)), 0, &mut out);
        out.clear();
        s.handle(Event::Connected(limits(10)), 0, &mut out);
        let p = sent(&out);
        assert_eq!(p.len(), 2);
        assert!(p[0].dup && p[0].topic == "a" && p[0].packet_id == 1);
        assert!(!p[1].dup && p[1].topic == "c");
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Send(Packet::PubRel(r)) if r.packet_id == 2))
        );
    }

    #[test]
    fn offline_qos0_and_queue_overflow_are_counted_drops() {
        let mut s = session(60);
        let mut out = Vec::new();
        s.handle(Event::Deliver(delivery("t", QoS::AtMostOnce)), 0, &mut out);
        assert!(matches!(
            out[0],
            Action::Dropped {
                reason: DropReason::OfflineQos0,
                ..
            }
        ));
        out.clear();
        for _ in 0..4 {
            s.handle(Event::Deliver(delivery("t", QoS::AtLeastOnce)), 0, &mut out);
        }
        let drops = out
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Dropped {
                        reason: DropReason::QueueFull,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(drops, 1);
        assert_eq!(s.queued_len(), 3);
        let puts = out
            .iter()
            .filter(|a| matches!(a, Action::Persist(Op::PutMessage { .. })))
            .count();
        assert_eq!(puts, 3);
    }

    #[test]
    fn drop_oldest_policy_discards_the_head() {
        let mut s = Session::new("c".into(), 60, 1, OverflowPolicy::DropOldest, 2);
        let mut out = Vec::new();
        s.handle(
            Event::Deliver(delivery("old", QoS::AtLeastOnce)),
            0,
            &mut out,
        );
        s.handle(
            Event::Deliver(delivery("new", QoS::AtLeastOnce)),
            0,
            &mut out,
        );
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Dropped { topic, .. } if topic == "old"))
        );
        out.clear();
        s.handle(Event::Connected(limits(10)), 0, &mut out);
        assert_eq!(sent(&out)[0].topic, "new");
    }

    #[test]
    fn message_expiry_is_decremented_and_expired_messages_dropped() {
        let mut s = session(60);
        let mut out = Vec::new();
        let mut d = delivery("t", QoS::AtLeastOnce);
        d.msg = Arc::new(Msg {
            expires_at: Some(10_000),
            ..(*d.msg).clone()
        });
        s.handle(Event::Deliver(d.clone()), 0, &mut out);
        s.handle(Event::Connected(limits(10)), 3_500, &mut out);
        assert_eq!(sent(&out)[0].properties.message_expiry_interval, Some(7));
        out.clear();
        s.handle(Event::Deliver(d), 10_000, &mut out);
        assert!(matches!(
            out[0],
            Action::Dropped {
                reason: DropReason::Expired,
                ..
            }
        ));
    }

    #[test]
    fn outbound_topic_aliases_are_assigned_then_reused() {
        let mut s = session(0);
        let mut out = Vec::new();
        let mut l = limits(10);
        l.topic_alias_maximum = 1;
        s.handle(Event::Connected(l), 0, &mut out);
        for t in ["a", "a", "b"] {
            s.handle(Event::Deliver(delivery(t, QoS::AtMostOnce)), 0, &mut out);
        }
        let p = sent(&out);
        assert_eq!(
            (p[0].topic.as_str(), p[0].properties.topic_alias),
            ("a", Some(1))
        );
        assert_eq!(
            (p[1].topic.as_str(), p[1].properties.topic_alias),
            ("", Some(1))
        );
        assert_eq!(
            (p[2].topic.as_str(), p[2].properties.topic_alias),
            ("b", None)
        );
    }

    #[test]
    fn inbound_receive_maximum_and_qos2_dedupe() {
        let mut s = session(0);
        let mut p = Publish {
            qos: QoS::ExactlyOnce,
            topic: "t".into(),
            packet_id: 7,
            ..Default::default()
        };
        assert_eq!(s.inbound_publish(&mut p), Ok(Inbound::Route));
        assert_eq!(s.inbound_publish(&mut p), Ok(Inbound::Duplicate));
        let mut q = Publish {
            qos: QoS::AtLeastOnce,
            topic: "t".into(),
            packet_id: 8,
            ..Default::default()
        };
        assert_eq!(s.inbound_publish(&mut q), Ok(Inbound::Route));
        q.packet_id = 9;
        let err = s.inbound_publish(&mut q).unwrap_err();
        assert_eq!(err.reason, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
        assert!(s.inbound_pubrel(7));
        assert!(!s.inbound_pubrel(7));
        assert_eq!(s.inbound_publish(&mut q), Ok(Inbound::Route));
    }

    #[test]
    fn inbound_topic_alias_resolution() {
        let mut s = session(0);
        let mut p = Publish {
            topic: "long/topic".into(),
            ..Default::default()
        };
        p.properties.topic_alias = Some(3);
        s.inbound_publish(&mut p).unwrap();
        let mut q = Publish::default();
        q.properties.topic_alias = Some(3);
        s.inbound_publish(&mut q).unwrap();
        assert_eq!(q.topic, "long/topic");
        let mut r = Publish::default();
        r.properties.topic_alias = Some(4);
        assert_eq!(
            s.inbound_publish(&mut r).unwrap_err().reason,
            ReasonCode::PROTOCOL_ERROR
        );
    }

    #[test]
    fn shared_messages_are_handed_back_when_the_member_leaves() {
        let mut s = session(0);
        let mut out = Vec::new();
        s.handle(Event::Connected(limits(10)), 0, &mut out);
        let mut d = delivery("t", QoS::AtLeastOnce);
        d.shared = Some("$share/g/t".into());
        s.handle(Event::Deliver(d), 0, &mut out);
        s.handle(Event::Deliver(delivery("u", QoS::AtLeastOnce)), 0, &mut out);
        let back = s.take_shared(None, &mut out);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].msg.topic, "t");
        assert_eq!(s.pending_len(), 1);
    }
}
