//! The running node: shared state (sessions, subscription index, retained messages, store,
//! statistics), start-up (restore from the store, bind listeners and the admin endpoint) and
//! graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use meridian_codec::{Packet, Properties, Protocol, QoS};
use meridian_net::{ListenerSpec, NetError, TlsFiles, Transport};
use meridian_store::{Commit, FsyncPolicy, Op, RedbStore, SessionStore, StoreError};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Acl, AclAction, AuthFileError, PasswordFile};
use crate::config::{BrokerConfig, FsyncMode};
use crate::router::{Match, Router, SubOptions};
use crate::session::{Action, Delivery, DropReason, Event, Msg, Session};
use crate::sys::Stats;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: address already in use (change {flag})")]
    Bind {
        addr: SocketAddr,
        flag: &'static str,
    },
    #[error("listener {url}: {source}")]
    Listener { url: String, source: NetError },
    #[error("admin endpoint {addr}: {source}")]
    Admin { addr: SocketAddr, source: NetError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    AuthFile(#[from] AuthFileError),
    /// A `jwt_keys` file cannot be read or is not a public key.
    #[error("jwt key {path}: {message} (check --jwt-key / jwt_keys)")]
    JwtKey { path: String, message: String },
    /// The control-plane settings cannot be used (unreadable CA file, bad URL, ...).
    #[error("control plane: {0}")]
    ControlPlane(String),
}

/// Unix time in milliseconds (message expiry survives restarts, so it is wall-clock based).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The write side of one network connection: an outbox its connection task drains in one write.
///
/// Kept small (one per connection): the wake-up is an `AtomicWaker` plus a flag rather than a
/// `Notify`, and the "a subscriber drained" notification is one `Notify` shared by the node.
#[derive(Debug)]
pub(crate) struct ConnOut {
    pub(crate) protocol: Protocol,
    pub(crate) buf: Mutex<BytesMut>,
    waker: AtomicWaker,
    /// Something was queued or a kick was set since the connection last looked.
    signalled: AtomicBool,
    /// The connection is in the middle of writing a buffer: new output needs no wake-up (it is
    /// picked up when the write completes), so publishers do not keep re-polling a busy writer.
    pub(crate) writing: AtomicBool,
    /// Set (with [`ConnOut::kick`]) to make the connection send DISCONNECT with this code and
    /// close; 0 = not kicked. The kick wakes the connection like new output does.
    pub(crate) kick_reason: AtomicU8,
    /// Set while this subscriber falls behind (session queue or outbox above its high-water
    /// mark); publishers that feed it pause reading (bounded) until `drained` fires.
    /// Bits: [`PRESSURE_QUEUE`], [`PRESSURE_OUTBOX`]; 0 = keeping up.
    pub(crate) pressured: AtomicU8,
    /// Shared by every connection of the node; waiters re-check `pressured` after a wake-up.
    pub(crate) drained: Arc<Notify>,
    /// A publisher already waited the full pause for this subscriber: stop pausing for it (its
    /// overflow policy applies) until it catches up, so one stuck client cannot throttle all.
    pub(crate) stuck: AtomicBool,
    /// Times this subscriber was relieved (all pressure cleared). A paused publisher resumes as
    /// soon as this moves, even if other publishers have pressed it again since: each drain
    /// lets every waiting publisher make progress, so none waits out the pause bound (and
    /// marks the subscriber stuck) just because 99 others refilled the outbox first.
    pub(crate) drains: AtomicU32,
    /// Set for connections accepted on a snapshot listener: their principal and port, checked
    /// on every PUBLISH/SUBSCRIBE and re-checked when a new snapshot is applied.
    pub(crate) guard: Option<Arc<crate::live::Guard>>,
    /// The client sent Request Problem Information = 0: no Reason String or User Properties on
    /// any packet but PUBLISH, CONNACK and DISCONNECT ([MQTT-3.1.2-29]).
    pub(crate) no_problem_info: bool,
    /// The socket's write side and the buffer being written. The connection's task writes it;
    /// a publisher may write a delivery straight through when the connection is idle
    /// ([`ConnOut::write_now`]). Taken by the teardown, after which nothing writes here.
    pub(crate) outbox: Mutex<Option<crate::conn::Outbox>>,
}

/// A read batch that fed at most this many subscribers is written through to the idle ones by
/// the publisher's task ([`ConnOut::write_now`]), as a single-threaded broker would: no task
/// hop and no wake-up on the path of a message to a few subscribers. A wider fan-out wakes the
/// subscribers' tasks as it goes, so they write in parallel while the publisher routes on.
pub(crate) const WRITE_THROUGH_MAX: usize = 4;

/// Subscribers a publisher's read batch fed and has not woken yet (see [`WRITE_THROUGH_MAX`]).
#[derive(Default)]
pub(crate) struct Touched {
    conns: Vec<Arc<ConnOut>>,
    /// The batch fed more than [`WRITE_THROUGH_MAX`] subscribers: every one was woken.
    spilled: bool,
}

impl Touched {
    pub(crate) fn add(&mut self, c: &Arc<ConnOut>) {
        if self.spilled {
            return c.wake();
        }
        if self.conns.iter().any(|l| Arc::ptr_eq(l, c)) {
            return;
        }
        if self.conns.len() < WRITE_THROUGH_MAX {
            return self.conns.push(c.clone());
        }
        self.spilled = true;
        for held in self.conns.drain(..) {
            held.wake();
        }
        c.wake();
    }

    /// End of the batch: write through to the subscribers held, waking those that are busy.
    pub(crate) fn write_through(&mut self, shared: &Shared) {
        self.spilled = false;
        for c in self.conns.drain(..) {
            if !c.write_now(shared) {
                c.wake();
            }
        }
    }
}

/// A copy of `p` without Reason String and User Properties, when `p` is a packet that may not
/// carry them for a client that asked for no problem information; `None` when `p` can go as is.
fn without_problem_info(p: &Packet) -> Option<Packet> {
    fn props(p: &mut Packet) -> Option<&mut meridian_codec::Properties> {
        match p {
            Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
                Some(&mut r.properties)
            }
            Packet::SubAck(s) => Some(&mut s.properties),
            Packet::UnsubAck(u) => Some(&mut u.properties),
            Packet::Auth(a) => Some(&mut a.properties),
            _ => None,
        }
    }
    let needs = match p {
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            &r.properties
        }
        Packet::SubAck(s) => &s.properties,
        Packet::UnsubAck(u) => &u.properties,
        Packet::Auth(a) => &a.properties,
        _ => return None,
    };
    if needs.reason_string.is_none() && needs.user_properties.is_empty() {
        return None;
    }
    let mut q = p.clone();
    let pr = props(&mut q)?;
    pr.reason_string = None;
    pr.user_properties.clear();
    Some(q)
}

/// The subscriber's session queue is above its high-water mark.
pub(crate) const PRESSURE_QUEUE: u8 = 1;
/// The subscriber's unwritten outbox is above half of `max_outbound_buffer`.
pub(crate) const PRESSURE_OUTBOX: u8 = 2;

impl ConnOut {
    pub(crate) fn new(
        protocol: Protocol,
        drained: Arc<Notify>,
        outbox: crate::conn::Outbox,
    ) -> ConnOut {
        ConnOut {
            outbox: Mutex::new(Some(outbox)),
            protocol,
            // Empty until used: idle connections hold no buffer memory.
            buf: Mutex::new(BytesMut::new()),
            waker: AtomicWaker::new(),
            signalled: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            kick_reason: AtomicU8::new(0),
            pressured: AtomicU8::new(0),
            drained,
            stuck: AtomicBool::new(false),
            drains: AtomicU32::new(0),
            guard: None,
            no_problem_info: false,
        }
    }

    /// Wake the connection task: output was queued. (SeqCst pairs with the connection clearing
    /// `writing` before it looks at the buffer again: one of the two sees the other.)
    pub(crate) fn wake(&self) {
        self.signalled.store(true, Ordering::SeqCst);
        if !self.writing.load(Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// Ready once [`ConnOut::wake`] was called since the last time it was ready.
    pub(crate) fn poll_signalled(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.signalled.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Re-check after registering: a wake in between would otherwise be missed.
        if self.signalled.swap(false, Ordering::AcqRel) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Encode a packet into the outbox (the caller wakes the writer).
    pub(crate) fn push(&self, p: &Packet) {
        if self.no_problem_info
            && let Some(stripped) = without_problem_info(p)
        {
            return self.push_encoded(&stripped);
        }
        self.push_encoded(p);
    }

    fn push_encoded(&self, p: &Packet) {
        let mut b = self.buf.lock();
        if let Err(e) = meridian_codec::encode(p, self.protocol, &mut b) {
            tracing::warn!("cannot encode outbound packet: {e}");
        }
    }

    pub(crate) fn send(&self, p: &Packet) {
        self.push(p);
        self.wake();
    }

    /// Clear pressure bits; when none is left, wake paused publishers.
    pub(crate) fn relieve(&self, bits: u8) {
        let before = self.pressured.fetch_and(!bits, Ordering::AcqRel);
        if before != 0 && before & !bits == 0 {
            self.stuck.store(false, Ordering::Release);
            self.drains.fetch_add(1, Ordering::AcqRel);
            self.drained.notify_waiters();
        }
    }

    pub(crate) fn kick(&self, reason: u8) {
        self.kick_reason.store(reason, Ordering::Release);
        // Always wake, even mid-write: a client that stopped reading must still be kicked.
        self.signalled.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

pub(crate) struct SessionInner {
    pub(crate) session: Session,
    pub(crate) conn: Option<Arc<ConnOut>>,
    pub(crate) generation: u64,
    /// The authorization context of the last connection from a snapshot listener, kept while
    /// the session is offline so a policy change can prune its subscriptions.
    pub(crate) last_guard: Option<Arc<crate::live::Guard>>,
}

/// One session, shared between its connection task and every publisher that delivers to it.
pub(crate) struct SessionHandle {
    pub(crate) client_id: Arc<str>,
    pub(crate) online: AtomicBool,
    /// True once a record of this session may be in the store (so ending it must delete it);
    /// clean sessions never touch the store.
    pub(crate) stored: AtomicBool,
    pub(crate) inner: Mutex<SessionInner>,
}

/// Router key: a session, compared by identity.
#[derive(Clone)]
pub(crate) struct SessionKey(pub(crate) Arc<SessionHandle>);

impl SessionKey {
    /// The session's client identifier (namespaced for Event Grid tenants).
    pub(crate) fn client_id(&self) -> &Arc<str> {
        &self.0.client_id
    }
}

impl PartialEq for SessionKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for SessionKey {}
impl std::hash::Hash for SessionKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.0) as usize).hash(state)
    }
}

/// Stored session record (JSON: written on connect/subscribe/unsubscribe, not per message).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionRecord {
    pub(crate) expiry: u32,
    pub(crate) subs: Vec<SubRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SubRecord {
    pub(crate) filter: String,
    pub(crate) qos: u8,
    pub(crate) nl: bool,
    pub(crate) rap: bool,
    pub(crate) rh: u8,
    pub(crate) id: Option<u32>,
}

/// Everything the node's tasks share.
pub(crate) struct Shared {
    pub(crate) cfg: BrokerConfig,
    pub(crate) router: RwLock<Router<SessionKey>>,
    pub(crate) retained: RwLock<HashMap<String, Arc<Msg>>>,
    pub(crate) sessions: Mutex<HashMap<Arc<str>, Arc<SessionHandle>>>,
    pub(crate) store: Option<Arc<dyn SessionStore>>,
    pub(crate) passwords: Option<PasswordFile>,
    pub(crate) acl: Option<Acl>,
    /// PEM text of the `jwt_keys` files (checked at start).
    pub(crate) jwt_keys: Vec<String>,
    pub(crate) stats: Stats,
    pub(crate) connections: AtomicUsize,
    pub(crate) cancel: CancellationToken,
    /// Fired when any subscriber stops being pressured (see [`ConnOut::pressured`]).
    pub(crate) drained: Arc<Notify>,
    pub(crate) tracker: TaskTracker,
    pub(crate) started: Instant,
    /// Listeners and policies from applied snapshots (see [`crate::live`]).
    pub(crate) live: crate::live::Live,
}

impl Shared {
    pub(crate) fn new_session(&self, client_id: Arc<str>, expiry: u32) -> Arc<SessionHandle> {
        let l = &self.cfg.limits;
        Arc::new(SessionHandle {
            client_id: client_id.clone(),
            online: AtomicBool::new(false),
            stored: AtomicBool::new(false),
            inner: Mutex::new(SessionInner {
                session: Session::new(
                    client_id,
                    expiry,
                    l.max_queued_messages,
                    l.overflow_policy,
                    l.receive_maximum,
                ),
                conn: None,
                generation: 0,
                last_guard: None,
            }),
        })
    }

    pub(crate) fn acl_allows(
        &self,
        action: AclAction,
        client: &str,
        user: Option<&str>,
        t: &str,
    ) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.check(action, client, user, t))
    }

    /// Run session actions while the caller holds the session lock: encode sends, submit store
    /// writes (under the lock so a later delete can never overtake this put), collect drops.
    pub(crate) fn apply(
        &self,
        client: &Arc<str>,
        inner: &mut SessionInner,
        actions: &mut Vec<Action>,
        commits: &mut Vec<Commit>,
        drops: &mut Vec<(Arc<str>, DropReason, String)>,
    ) {
        if self.apply_quiet(client, inner, actions, commits, drops)
            && let Some(conn) = &inner.conn
        {
            conn.wake();
        }
    }

    /// [`Shared::apply`] without waking the connection; true when output was queued for it.
    fn apply_quiet(
        &self,
        client: &Arc<str>,
        inner: &mut SessionInner,
        actions: &mut Vec<Action>,
        commits: &mut Vec<Commit>,
        drops: &mut Vec<(Arc<str>, DropReason, String)>,
    ) -> bool {
        if actions.is_empty() {
            return false;
        }
        let mut ops = Vec::new();
        let mut sent = false;
        for a in actions.drain(..) {
            match a {
                Action::Send(p) => {
                    if let Some(conn) = &inner.conn {
                        let mut b = conn.buf.lock();
                        if let Packet::Publish(pb) = &p {
                            if pb.qos == QoS::AtMostOnce
                                && b.len() > self.cfg.limits.max_outbound_buffer
                            {
                                drops.push((
                                    client.clone(),
                                    DropReason::SlowConsumer,
                                    pb.topic.clone(),
                                ));
                                continue;
                            }
                            self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Err(e) = meridian_codec::encode(&p, conn.protocol, &mut b) {
                            tracing::warn!("cannot encode outbound packet: {e}");
                        }
                        sent = true;
                    }
                }
                Action::Persist(op) => ops.push(op),
                Action::Dropped { reason, topic } => drops.push((client.clone(), reason, topic)),
            }
        }
        if !ops.is_empty()
            && let Some(store) = &self.store
        {
            commits.push(store.submit(ops));
        }
        sent
    }

    /// Deliver one message to one session. Its connection is woken, or, with `touched`, added
    /// there for the caller to write through or wake (see [`ConnOut::write_now`]).
    pub(crate) fn deliver(
        &self,
        h: &SessionHandle,
        d: Delivery,
        now: u64,
        commits: &mut Vec<Commit>,
        drops: &mut Vec<(Arc<str>, DropReason, String)>,
        touched: Option<&mut Touched>,
    ) -> Option<Arc<ConnOut>> {
        thread_local! {
            // Reused per thread: a delivery allocates no action vector.
            static ACTIONS: std::cell::RefCell<Vec<Action>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        ACTIONS.with(|cell| {
            let mut actions = cell.take();
            let pressured = {
                let mut inner = h.inner.lock();
                inner.session.handle(Event::Deliver(d), now, &mut actions);
                if self.apply_quiet(&h.client_id, &mut inner, &mut actions, commits, drops)
                    && let Some(c) = &inner.conn
                {
                    match touched {
                        Some(t) => t.add(c),
                        None => c.wake(),
                    }
                }
                let mut bits = 0;
                if inner.session.queued_len() >= self.high_water() {
                    bits |= PRESSURE_QUEUE;
                }
                match &inner.conn {
                    Some(c) => {
                        if c.buf.lock().len() >= self.cfg.limits.max_outbound_buffer / 2 {
                            bits |= PRESSURE_OUTBOX;
                        }
                        if bits != 0 {
                            c.pressured.fetch_or(bits, Ordering::AcqRel);
                            (!c.stuck.load(Ordering::Acquire)).then(|| c.clone())
                        } else {
                            None
                        }
                    }
                    None => None,
                }
            };
            actions.clear();
            cell.replace(actions);
            pressured
        })
    }

    /// Queue length at which a connected subscriber pushes back on its publishers.
    pub(crate) fn high_water(&self) -> usize {
        (self.cfg.limits.max_queued_messages / 2).max(1)
    }

    /// Fan a message out to its subscribers; returns how many matched.
    pub(crate) fn route(
        &self,
        msg: &Arc<Msg>,
        publisher: Option<&SessionKey>,
        commits: &mut Vec<Commit>,
        matches: &mut Vec<Match<SessionKey>>,
    ) -> usize {
        self.route_with_pressure(msg, publisher, commits, matches, &mut Vec::new(), None)
    }

    /// [`Shared::route`], also collecting subscribers whose queues are above the high-water mark
    /// and, with `touched`, leaving the subscribers it fed unwoken there (see [`Shared::deliver`]).
    pub(crate) fn route_with_pressure(
        &self,
        msg: &Arc<Msg>,
        publisher: Option<&SessionKey>,
        commits: &mut Vec<Commit>,
        matches: &mut Vec<Match<SessionKey>>,
        pressured: &mut Vec<Arc<ConnOut>>,
        mut touched: Option<&mut Touched>,
    ) -> usize {
        {
            let r = self.router.read();
            r.matches(
                &msg.topic,
                publisher,
                |k| k.0.online.load(Ordering::Relaxed),
                matches,
            );
        }
        let n = matches.len();
        if n == 0 {
            return 0;
        }
        let now = now_ms();
        let mut drops = Vec::new();
        for m in matches.drain(..) {
            let d = Delivery {
                msg: msg.clone(),
                qos: m.qos.min(msg.qos),
                // [MQTT-3.3.1-12]/[MQTT-3.3.1-13]: live messages keep RETAIN only with RAP.
                retain: msg.retain && m.retain_as_published,
                subscription_ids: m.subscription_ids,
                shared: m.shared,
            };
            if let Some(c) = self.deliver(
                &m.key.0,
                d,
                now,
                commits,
                &mut drops,
                touched.as_deref_mut(),
            ) {
                pressured.push(c);
            }
        }
        self.report_drops(drops);
        n
    }

    /// Count drops and publish `$SYS/events/message_dropped` (never for `$SYS` messages, which
    /// would loop).
    pub(crate) fn report_drops(&self, drops: Vec<(Arc<str>, DropReason, String)>) {
        for (client, reason, topic) in drops {
            self.stats.drop(reason);
            if !topic.starts_with('$') {
                tracing::debug!(client = %client, topic, reason = reason.as_str(), "message dropped");
                self.event(
                    "message_dropped",
                    serde_json::json!({"client_id": &*client, "topic": topic, "reason": reason.as_str()}),
                );
            }
        }
    }

    /// Publish a lifecycle event on `$SYS/events/{kind}`.
    pub(crate) fn event(&self, kind: &str, body: serde_json::Value) {
        let msg = Arc::new(Msg {
            topic: format!("$SYS/events/{kind}"),
            payload: Bytes::from(body.to_string()),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties {
                payload_format_indicator: Some(1),
                content_type: Some("application/json".into()),
                ..Default::default()
            },
            expires_at: None,
        });
        let mut commits = Vec::new();
        let mut matches = Vec::new();
        self.route(&msg, None, &mut commits, &mut matches);
    }

    /// Set, replace or clear (empty payload) a retained message. Returns the store commit.
    pub(crate) fn set_retained(&self, msg: &Arc<Msg>) -> Option<Commit> {
        let persist = self.store.is_some() && !msg.topic.starts_with("$SYS");
        let mut r = self.retained.write();
        let op = if msg.payload.is_empty() {
            r.remove(&msg.topic);
            Op::DeleteRetained {
                topic: msg.topic.clone(),
            }
        } else {
            r.insert(msg.topic.clone(), msg.clone());
            let d = Delivery {
                msg: msg.clone(),
                qos: msg.qos,
                retain: true,
                subscription_ids: vec![],
                shared: None,
            };
            Op::PutRetained {
                topic: msg.topic.clone(),
                value: crate::session::encode_message(0, 0, &d),
            }
        };
        if persist {
            // Submitted under the lock so store order equals memory order.
            self.store.as_ref().map(|s| s.submit(vec![op]))
        } else {
            None
        }
    }

    /// Store the session record of a persistent session; the commit, if anything was written.
    pub(crate) fn persist_session(&self, h: &SessionHandle) -> Option<Commit> {
        let op = self.session_op(&h.inner.lock().session)?;
        h.stored.store(true, Ordering::Release);
        self.store.as_ref().map(|s| s.submit(vec![op]))
    }

    /// The session record to store for a persistent session.
    pub(crate) fn session_op(&self, s: &Session) -> Option<Op> {
        if self.store.is_none() || !s.persistent() {
            return None;
        }
        let rec = SessionRecord {
            expiry: s.expiry_interval,
            subs: s
                .subscriptions
                .iter()
                .map(|(f, o)| SubRecord {
                    filter: f.clone(),
                    qos: o.qos as u8,
                    nl: o.no_local,
                    rap: o.retain_as_published,
                    rh: o.retain_handling,
                    id: o.subscription_id,
                })
                .collect(),
        };
        Some(Op::PutSession {
            client: s.client_id.to_string(),
            value: serde_json::to_vec(&rec).unwrap_or_default(),
        })
    }

    /// End a session: drop its subscriptions, hand shared messages to other members, delete it
    /// from the store. Only if `h` is still the registered session for its client id.
    pub(crate) fn end_session(&self, h: &Arc<SessionHandle>) {
        {
            let mut sessions = self.sessions.lock();
            match sessions.get(&h.client_id) {
                Some(cur) if Arc::ptr_eq(cur, h) => {
                    sessions.remove(&h.client_id);
                }
                _ => return,
            }
        }
        let (filters, shared_msgs) = {
            let mut inner = h.inner.lock();
            let filters: Vec<String> = std::mem::take(&mut inner.session.subscriptions)
                .into_keys()
                .collect();
            let mut actions = Vec::new();
            let taken = inner.session.take_shared(None, &mut actions);
            (filters, taken)
        };
        let key = SessionKey(h.clone());
        {
            let mut r = self.router.write();
            for f in &filters {
                r.unsubscribe(&key, f);
            }
        }
        self.redeliver_shared(&key, shared_msgs);
        if let Some(store) = &self.store
            && h.stored.swap(false, Ordering::AcqRel)
        {
            drop(store.submit(vec![Op::DeleteSession {
                client: h.client_id.to_string(),
            }]));
        }
    }

    /// Give messages a leaving shared-subscription member held to another member.
    pub(crate) fn redeliver_shared(&self, from: &SessionKey, msgs: Vec<Delivery>) {
        if msgs.is_empty() {
            return;
        }
        let now = now_ms();
        let mut commits = Vec::new();
        let mut drops = Vec::new();
        for mut d in msgs {
            let Some(filter) = d.shared.clone() else {
                continue;
            };
            let target = self
                .router
                .read()
                .pick_shared(&filter, from, |k| k.0.online.load(Ordering::Relaxed));
            if let Some((key, opts)) = target {
                d.qos = d.msg.qos.min(opts.qos);
                d.subscription_ids = opts.subscription_id.into_iter().collect();
                let _ = self.deliver(&key.0, d, now, &mut commits, &mut drops, None);
            } else {
                drops.push((
                    from.0.client_id.clone(),
                    DropReason::QueueFull,
                    d.msg.topic.clone(),
                ));
            }
        }
        self.report_drops(drops);
    }

    /// Rebuild sessions, subscriptions, queued messages and retained messages from the store.
    fn restore(&self) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let snap = store.load()?;
        let max = u32::MAX;
        {
            let mut r = self.retained.write();
            for (topic, value) in &snap.retained {
                if let Some((_, _, d)) = crate::session::decode_message(value, max) {
                    r.insert(topic.clone(), d.msg);
                }
            }
        }
        let mut sessions = self.sessions.lock();
        let mut router = self.router.write();
        for (client, value) in &snap.sessions {
            let Ok(rec) = serde_json::from_slice::<SessionRecord>(value) else {
                tracing::warn!(client, "skipping unreadable session record");
                continue;
            };
            let id: Arc<str> = client.as_str().into();
            let h = self.new_session(id.clone(), rec.expiry);
            h.stored.store(true, Ordering::Release);
            {
                let mut inner = h.inner.lock();
                for s in rec.subs {
                    let opts = SubOptions {
                        qos: QoS::from_u8(s.qos).unwrap_or_default(),
                        no_local: s.nl,
                        retain_as_published: s.rap,
                        retain_handling: s.rh,
                        subscription_id: s.id,
                    };
                    router.subscribe(SessionKey(h.clone()), &s.filter, opts);
                    inner.session.subscriptions.insert(s.filter, opts);
                }
                for (seq, v) in snap.messages.get(client).into_iter().flatten() {
                    inner.session.restore_message(*seq, v, max);
                }
                for pid in snap.inbound_qos2.get(client).into_iter().flatten() {
                    inner.session.restore_inbound_qos2(*pid);
                }
            }
            sessions.insert(id, h);
        }
        tracing::info!(
            sessions = sessions.len(),
            retained = snap.retained.len(),
            "restored state from the store"
        );
        Ok(())
    }

    /// Expire restored sessions that nobody resumes (timers start at restore time).
    fn schedule_restored_expiry(self: &Arc<Self>) {
        let handles: Vec<Arc<SessionHandle>> = self.sessions.lock().values().cloned().collect();
        for h in handles {
            let expiry = h.inner.lock().session.expiry_interval;
            crate::conn::schedule_expiry(self, &h, 0, expiry);
        }
    }
}

/// Start-up entry point.
pub struct Broker;

/// A started node.
pub struct RunningBroker {
    shared: Arc<Shared>,
    listeners: Vec<(Transport, SocketAddr)>,
    admin: Option<SocketAddr>,
    ready: Arc<AtomicBool>,
}

impl Broker {
    /// Open the store, restore state, bind every listener and the admin endpoint, start serving.
    pub async fn start(cfg: BrokerConfig) -> Result<RunningBroker, BrokerError> {
        meridian_net::install_crypto_provider();
        let store: Option<Arc<dyn SessionStore>> = match &cfg.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                    path: dir.display().to_string(),
                    message: e.to_string(),
                })?;
                let policy = match cfg.fsync {
                    FsyncMode::Always => FsyncPolicy::Always,
                    FsyncMode::Periodic => FsyncPolicy::Periodic(cfg.fsync_interval()),
                };
                Some(Arc::new(RedbStore::open(dir, policy)?))
            }
            None => None,
        };
        let passwords = cfg
            .password_file
            .as_deref()
            .map(PasswordFile::load)
            .transpose()?;
        let acl = cfg.acl_file.as_deref().map(Acl::load).transpose()?;
        let mut jwt_keys = Vec::new();
        for path in &cfg.jwt_keys {
            let fail = |message: String| BrokerError::JwtKey {
                path: path.display().to_string(),
                message,
            };
            let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            meridian_authn::TokenVerifier::new(
                &meridian_contract::TokenSettings {
                    audiences: vec![String::new()],
                    ..Default::default()
                },
                std::slice::from_ref(&pem),
            )
            .map_err(|e| fail(e.to_string()))?;
            jwt_keys.push(pem);
        }

        let mut bound = Vec::new();
        for l in &cfg.listeners {
            let tls = match (&l.tls_cert, &l.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: l.client_ca.clone(),
                    client_cert_optional: false,
                }),
                _ => None,
            };
            let spec =
                ListenerSpec::parse(&l.url, tls).map_err(|source| BrokerError::Listener {
                    url: l.url.clone(),
                    source,
                })?;
            let listener =
                meridian_net::Listener::bind(&spec)
                    .await
                    .map_err(|source| match source {
                        NetError::AddrInUse { addr } => BrokerError::Bind {
                            addr,
                            flag: "--listen",
                        },
                        source => BrokerError::Listener {
                            url: l.url.clone(),
                            source,
                        },
                    })?;
            bound.push(listener);
        }
        let admin_listener = match cfg.admin {
            Some(addr) => Some(meridian_net::admin::bind(addr).await.map_err(
                |source| match source {
                    NetError::AddrInUse { addr } => BrokerError::Bind {
                        addr,
                        flag: "--admin",
                    },
                    source => BrokerError::Admin { addr, source },
                },
            )?),
            None => None,
        };

        let live = crate::live::Live::new(&cfg);
        let push = match &cfg.control_plane {
            Some(cp) => Some(crate::agent::Agent::new(cp, cfg.admin)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            live,
            router: RwLock::new(Router::new()),
            retained: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            store,
            passwords,
            jwt_keys,
            acl,
            stats: Stats::default(),
            connections: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
            drained: Arc::new(Notify::new()),
            tracker: TaskTracker::new(),
            started: Instant::now(),
            cfg,
        });
        shared.restore()?;
        shared.schedule_restored_expiry();

        let listeners: Vec<(Transport, SocketAddr)> = bound
            .iter()
            .map(|l| (l.spec().transport, l.local_addr()))
            .collect();
        for mut listener in bound {
            let shared2 = shared.clone();
            shared.tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shared2.cancel.cancelled() => break,
                        r = listener.accept() => match r {
                            Ok(acc) => {
                                let s = shared2.clone();
                                shared2.tracker.spawn(crate::conn::serve(s, acc, None));
                            }
                            Err(e) => {
                                tracing::warn!("accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                }
            });
        }

        // With a control plane, the stored snapshot is served before any push is accepted, so
        // a node restarted while the control plane is down comes back as it was.
        let handle = crate::live::NodeHandle {
            shared: Arc::downgrade(&shared),
        };
        if push.is_some()
            && let Some(snap) = shared.live.persisted()
        {
            let generation = snap.generation;
            match handle.apply_snapshot(snap).await {
                Ok(_) => tracing::info!(generation, "serving the stored snapshot"),
                Err(r) => tracing::warn!(
                    generation,
                    "the stored snapshot cannot be applied: {}",
                    r.message
                ),
            }
        }

        let ready = Arc::new(AtomicBool::new(false));
        let mut admin = None;
        if let Some(l) = admin_listener {
            admin = l.local_addr().ok();
            if let Some(a) = admin {
                let _ = shared.live.admin_addr.set(a);
            }
            let render = crate::sys::metrics_renderer(shared.clone());
            let mut routes = meridian_net::admin::router(render, ready.clone());
            if let Some(agent) = &push {
                routes = routes.merge(agent.routes(handle.clone()));
            }
            let cancel = shared.cancel.clone();
            shared.tracker.spawn(async move {
                let serve = axum::serve(l, routes)
                    .with_graceful_shutdown(async move { cancel.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::warn!("admin endpoint stopped: {e}");
                }
            });
        }
        if let Some(agent) = push {
            agent.spawn_reporter(&shared, handle.clone());
        }
        crate::sys::spawn_publisher(&shared);
        ready.store(true, Ordering::Release);
        Ok(RunningBroker {
            shared,
            listeners,
            admin,
            ready,
        })
    }
}

impl RunningBroker {
    /// Applies a config-contract snapshot live, all or nothing: listeners open and close,
    /// credentials and policies swap in place, clients the new policy forbids are disconnected
    /// (0x87) and everyone else stays. A generation not newer than the applied one answers with
    /// the applied generation and changes nothing. See [`crate::live`].
    pub async fn apply_snapshot(
        &self,
        snapshot: meridian_contract::BrokerSnapshot,
    ) -> Result<meridian_contract::Applied, meridian_contract::Rejection> {
        crate::live::apply(&self.shared, snapshot).await
    }

    /// A cloneable handle for applying snapshots and reading the node report; it implements
    /// [`meridian_contract::SnapshotSink`] (what `meridian dev` hands the control plane).
    pub fn handle(&self) -> crate::live::NodeHandle {
        crate::live::NodeHandle {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The node's report (applied generation, digest, health, connected clients, errors).
    pub fn report(&self) -> meridian_contract::NodeReport {
        crate::live::report(&self.shared)
    }

    /// Applies the snapshot stored in the data directory by the last successful apply, if any.
    /// `Broker::start` does this itself for nodes with a control plane; an in-process node
    /// (`meridian dev`) can call it to serve its last configuration before the control plane
    /// pushes.
    pub async fn apply_stored_snapshot(
        &self,
    ) -> Option<Result<meridian_contract::Applied, meridian_contract::Rejection>> {
        let snap = self.shared.live.persisted()?;
        Some(crate::live::apply(&self.shared, snap).await)
    }

    /// Listener ports opened from applied snapshots (not the CLI/config-file listeners).
    pub fn snapshot_listeners(&self) -> Vec<crate::live::SnapshotListener> {
        self.shared.live.snapshot_listeners()
    }

    /// Currently connected MQTT clients.
    pub fn connected_clients(&self) -> u64 {
        self.shared.stats.connected.load(Ordering::Relaxed)
    }

    /// Every MQTT listener's transport and bound address (port 0 resolved).
    pub fn listener_addrs(&self) -> Vec<(Transport, SocketAddr)> {
        self.listeners.clone()
    }

    /// The first listener of a transport.
    pub fn addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(t, _)| *t == transport)
            .map(|(_, a)| *a)
    }

    /// The admin endpoint's bound address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Prometheus text of the node's metrics (what `/metrics` serves).
    pub fn render_metrics(&self) -> String {
        (crate::sys::metrics_renderer(self.shared.clone()))()
    }

    /// Counts of messages dropped so far, by reason (`queue_full`, `expired`, ...).
    pub fn dropped_messages(&self) -> Vec<(&'static str, u64)> {
        self.shared.stats.drops()
    }

    /// Stop accepting, disconnect clients with 0x8B (Server shutting down), wait for every task
    /// and flush the store.
    pub async fn shutdown(self) {
        self.ready.store(false, Ordering::Release);
        self.shared.cancel.cancel();
        // Connections wait on their kick, not on the cancellation token (it keeps idle
        // connections small): tell each one. One that attaches after this sweep sees the
        // cancelled token itself.
        let handles: Vec<_> = self.shared.sessions.lock().values().cloned().collect();
        for h in handles {
            if let Some(out) = &h.inner.lock().conn {
                out.kick(meridian_codec::ReasonCode::SERVER_SHUTTING_DOWN.0);
            }
        }
        self.shared.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not stop within 5 s");
        }
        if let Some(store) = &self.shared.store
            && let Err(e) = store.flush().await
        {
            tracing::error!("store flush on shutdown failed: {e}");
        }
        self.shared.live.cleanup();
        // Sessions reference no `Shared`, so dropping the last `Arc` here closes the store.
        self.shared.sessions.lock().clear();
        *self.shared.router.write() = Router::new();
    }
}
