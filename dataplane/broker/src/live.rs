//! Live configuration: applying a [`BrokerSnapshot`] (the config contract) to a running node
//! without a restart, and enforcing it on every connection that arrived through a snapshot
//! listener.
//!
//! **Apply is all or nothing.** [`apply`] validates the snapshot, parses every certificate PEM,
//! checks every password hash, compiles every authorization policy and Event Grid namespace into
//! [`PolicyEngine`]s and binds every new port *before* anything changes. Any failure is a
//! [`Rejection`] naming the resource at fault (a listener, an authentication, an authorization,
//! a namespace or one of its children) and the node keeps serving its previous snapshot. Only
//! then is the snapshot persisted (`DATA_DIR/snapshot.json`, temp file + rename) and the new
//! [`LiveState`] swapped in behind one `RwLock<Arc<_>>`; new listeners start accepting after the
//! swap, so no connection ever sees a port without its policy.
//!
//! **Listeners.** A snapshot port is identified by its number (or, for port 0 in tests, by
//! listener name and index). An unchanged port keeps its socket and its connections; a port whose
//! protocol or TLS material changed is re-bound (its connections stay, under the new policy); a
//! removed port stops accepting and its connections get DISCONNECT 0x8B with a reason string
//! naming the listener. Listeners from CLI flags or the config file are never touched: their
//! connections have no [`Guard`] and keep the password-file/ACL rules.
//!
//! **Enforcement.** Each connection accepted on a snapshot port carries a [`Guard`] (its slot and
//! its [`Principal`]) on its outbox. CONNECT (and the will topic) is checked at admission;
//! PUBLISH, SUBSCRIBE (each filter) and retained messages at delivery ask the port's engine
//! through [`allows`]: one read lock, one hash lookup, no allocation. After a swap every guarded
//! connection is re-checked ([`recheck`]): a client whose credentials, connection or any existing
//! subscription the new snapshot forbids is kicked with 0x87 (v5: DISCONNECT with the reason as
//! reason string; 3.1.1: the connection closes) and `$SYS/events/policy_revoked` says who and
//! why. Everyone else stays connected.
//!
//! **Authentication methods** (per port, the methods of its `authenticationRefs` in order):
//! `UsernamePassword` with inline argon2 PHC hashes (no inline credentials: the node's own
//! `--password-file`, else nobody); `X509`: a client certificate verified by the TLS layer
//! against the port's trust bundle (`clientCaPem`, the X509 methods' `trustedCaPem` and, on ports
//! with authentication, the bound namespaces' CA certificates; a non-empty bundle makes client
//! certificates mandatory on that port), with `authorizationAttributes` as principal attributes;
//! Event Grid clients reach their namespace by TLS SNI `<namespace>.<domain>` and are checked
//! against the registry (validation scheme, thumbprints). `ServiceAccountToken`: MQTT 5 enhanced
//! authentication with method `K8S-SAT`, `OAUTH2-JWT` or `JWT` and the token as authentication
//! data, verified by [`meridian_authn::TokenVerifier`] (the method's keys or JWKS, else the
//! node's `--jwt-key`s); its `sub` is the username, its claims the attributes, and the connection
//! is closed with 0xA0 at `exp` unless it re-authenticates (AUTH 0x19) first. `Custom`: the
//! first custom method's server decides ([`meridian_authn::CustomAuthenticator`]) for clients no
//! other method took, and for enhanced authentication with any other method name. `Svid`
//! authenticates nobody (no SPIFFE agent; fail closed).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use meridian_codec::{Connect, ReasonCode};
use meridian_contract::{
    Applied, AuthenticationMethod, BrokerSnapshot, NodeError, NodeHealth, NodeReport, Protocol,
    Rejection, ServerCertificate, SnapshotSink, node::ApplyFuture,
};
use meridian_net::{ListenerSpec, NetError, TlsFiles, TlsInfo, Transport};
use meridian_policy::model as pm;
use meridian_policy::{Action, PolicyEngine, PolicyModel, Principal, x509};
use parking_lot::{Mutex, RwLock};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

use crate::broker::Shared;
use crate::config::BrokerConfig;

/// Errors kept for the node report.
const MAX_ERRORS: usize = 10;

/// File name of the persisted snapshot inside the data directory.
pub const SNAPSHOT_FILE: &str = "snapshot.json";

// ---------------------------------------------------------------------------------------------
// What connections see

/// How a guarded connection proved who it is; kept to re-check it after a swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The port had authentication disabled.
    Open,
    /// Username and password, verified against this PHC hash.
    Password { username: String, hash: Phc },
    /// A client certificate accepted by an X509 method.
    Certificate,
    /// An Event Grid namespace client (certificate checked against the registry).
    Namespace,
    /// An Event Grid namespace client admitted by the namespace's custom JWT authentication;
    /// kept to re-verify it after a swap.
    NamespaceToken { token: Secret },
    /// A JWT accepted by a `ServiceAccountToken` method; kept to re-verify it after a swap.
    Token { token: Secret },
    /// Admitted by the `Custom` method calling this endpoint.
    Custom { endpoint: String },
}

/// A bearer token; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// MQTT 5 authentication methods whose Authentication Data is a JWT (IoT Operations `K8S-SAT`,
/// Event Grid `OAUTH2-JWT`, and plain `JWT`), verified by the port's `ServiceAccountToken` methods.
pub(crate) const TOKEN_METHODS: [&str; 3] = ["K8S-SAT", "OAUTH2-JWT", "JWT"];

/// MQTT 5 authentication methods of an Event Grid namespace's custom JWT authentication:
/// `CUSTOM-JWT` (what Event Grid documents today) and `OAUTH2-JWT` (its earlier name).
pub(crate) const NAMESPACE_TOKEN_METHODS: [&str; 2] = ["CUSTOM-JWT", "OAUTH2-JWT"];

/// An argon2 PHC string; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Phc(Arc<str>);

impl std::fmt::Debug for Phc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The authorization context of one connection accepted on a snapshot port.
#[derive(Debug)]
pub(crate) struct Guard {
    /// The port it came through (see [`LiveState::ports`]).
    pub(crate) slot: u32,
    pub(crate) principal: Principal,
    credential: Mutex<Credential>,
    /// MQTT 5 enhanced authentication: the method the client authenticated with (an AUTH
    /// re-authentication must name the same one).
    pub(crate) auth_method: Option<String>,
    /// When the credential runs out (unix ms, 0 = never): unless the client re-authenticates
    /// first, its connection is closed with 0xA0 Maximum connect time.
    pub(crate) expires_at_ms: AtomicU64,
    /// The client's address (for custom re-authentication).
    peer: SocketAddr,
    /// This connection's recent PUBLISH/SUBSCRIBE decisions (see [`allows`]).
    decisions: Mutex<DecisionCache>,
    /// Why the node is closing this connection (sent as the DISCONNECT reason string).
    revoked: Mutex<Option<String>>,
    /// The broker's limits as applied when this client connected (negotiated at CONNECT, so a
    /// later snapshot's limits apply to later connections).
    pub(crate) limits: Arc<meridian_contract::Limits>,
}

impl Guard {
    /// The reason string for the DISCONNECT, when the node kicked this connection.
    pub(crate) fn revoked(&self) -> Option<String> {
        self.revoked.lock().clone()
    }

    pub(crate) fn revoke(&self, why: String) {
        *self.revoked.lock() = Some(why);
    }

    /// The credential's expiry (unix ms), if it has one.
    pub(crate) fn expiry_ms(&self) -> Option<u64> {
        Some(self.expires_at_ms.load(Ordering::Acquire)).filter(|&t| t > 0)
    }
}

/// The policy of one open snapshot port.
#[derive(Debug)]
pub(crate) struct PortPolicy {
    /// `None`: authentication disabled (anyone connects).
    authn: Option<Arc<Authn>>,
    /// IoT Operations rules apply (deny by default).
    authz_enabled: bool,
    /// The port's rules plus every enabled namespace; `None` when neither exists.
    engine: Option<Arc<PolicyEngine>>,
    /// Lower-cased name of the namespace a client belongs to when its SNI names none.
    default_namespace: Option<String>,
}

impl PortPolicy {
    /// The engine that judges `p`, `Ok(None)` when nothing restricts it, `Err` when it must be
    /// refused (a namespaced client on a port without an engine).
    fn engine_for(&self, p: &Principal) -> Result<Option<&PolicyEngine>, ()> {
        if p.namespace.is_some() {
            return self.engine.as_deref().map(Some).ok_or(());
        }
        if self.authz_enabled {
            // Enabled without an engine cannot happen (the build makes one); deny if it did.
            return self.engine.as_deref().map(Some).ok_or(());
        }
        Ok(None)
    }

    /// `topic` may be a tenant's internal name (`crate::tenant`): policies are written, and
    /// judged, in the names the client sent.
    fn allows(&self, p: &Principal, action: Action, topic: &str) -> bool {
        let topic = &*crate::tenant::visible(topic);
        match self.engine_for(p) {
            Ok(None) => true,
            Ok(Some(e)) => match action {
                Action::Publish => e.publish(p, topic).allowed,
                Action::Subscribe => e.subscribe(p, topic).allowed,
                Action::Connect => e.connect(p).allowed,
            },
            Err(()) => false,
        }
    }

    fn connect_verdict(&self, p: &Principal) -> Result<(), Cow<'static, str>> {
        match self.engine_for(p) {
            Ok(None) => Ok(()),
            Ok(Some(e)) => {
                let d = e.connect(p);
                if d.allowed { Ok(()) } else { Err(d.reason) }
            }
            Err(()) => Err(Cow::Borrowed("no authorization engine for this client")),
        }
    }

    /// Re-checks a connected client against this (new) policy.
    fn recheck<'a>(
        &self,
        namespaces: &HashMap<String, Arc<NamespaceAuth>>,
        g: &Guard,
        filters: impl Iterator<Item = &'a String>,
    ) -> Result<(), String> {
        if let Credential::NamespaceToken { token } = &*g.credential.lock() {
            let ns = g.principal.namespace.as_deref().unwrap_or_default();
            let Some(v) = namespaces
                .get(&ns.to_ascii_lowercase())
                .and_then(|n| n.jwt.as_ref())
            else {
                return Err(format!(
                    "namespace '{ns}' no longer accepts tokens (custom JWT authentication removed)"
                ));
            };
            match v.verify_cached(&token.0) {
                // Expiry is the 0xA0 timer's business (the client may re-authenticate).
                Ok(_) | Err(meridian_authn::TokenError::Expired) => {}
                Err(e) => return Err(format!("the client's token is no longer accepted: {e}")),
            }
        }
        if let Some(a) = &self.authn {
            match &*g.credential.lock() {
                Credential::Open => {
                    return Err("authentication is now required on this listener".into());
                }
                Credential::Password { username, hash } => {
                    // Verified against the node's password file (empty hash): valid while the
                    // port still falls back to it. Inline: the same hash must still be there.
                    let still = if hash.0.is_empty() {
                        a.node_password_file
                    } else {
                        a.passwords.get(username).is_some_and(|e| e.hash == *hash)
                    };
                    if !still {
                        return Err(format!(
                            "the credentials of user '{username}' were changed or removed"
                        ));
                    }
                }
                Credential::Certificate => {
                    if !a.has_x509 {
                        return Err("X.509 authentication was removed from this listener".into());
                    }
                }
                Credential::Namespace | Credential::NamespaceToken { .. } => {}
                Credential::Token { token } => {
                    if a.tokens.is_empty() {
                        return Err("token authentication was removed from this listener".into());
                    }
                    // Keys may have changed: the token must still verify with the keys known
                    // now. A key the JWKS has not published yet (as last fetched) is given the
                    // benefit of the doubt until the client's next re-authentication.
                    let mut last = None;
                    let ok = a.tokens.iter().any(|v| match v.verify_cached(&token.0) {
                        Ok(_) => true,
                        Err(meridian_authn::TokenError::UnknownKey(_)) if v.has_jwks() => true,
                        Err(e) => {
                            last = Some(e);
                            false
                        }
                    });
                    if !ok {
                        return Err(format!(
                            "the client's token is no longer accepted: {}",
                            last.map_or_else(|| "no token method".to_string(), |e| e.to_string())
                        ));
                    }
                }
                Credential::Custom { endpoint } => {
                    if !a.custom.iter().any(|c| c.endpoint() == endpoint) {
                        return Err(format!(
                            "custom authentication by {endpoint} was removed from this listener"
                        ));
                    }
                }
            }
        }
        if let Err(why) = self.connect_verdict(&g.principal) {
            return Err(format!("connection no longer authorized: {why}"));
        }
        for f in filters {
            if !self.allows(&g.principal, Action::Subscribe, f) {
                return Err(format!("subscription '{f}' is no longer authorized"));
            }
        }
        Ok(())
    }
}

/// Authentication of one port: the merged methods of its `authenticationRefs`.
#[derive(Debug, Default)]
struct Authn {
    /// username → hash and attributes (the first policy naming a user wins).
    passwords: HashMap<String, PasswordEntry>,
    /// A `UsernamePassword` method without inline credentials: use the node's password file.
    node_password_file: bool,
    /// Some X509 method is present (the TLS layer verified the chain).
    has_x509: bool,
    /// `authorizationAttributes` of each X509 method.
    x509_attributes: Vec<x509::AuthorizationAttributes>,
    /// `ServiceAccountToken` methods: JWTs in MQTT 5 enhanced authentication.
    tokens: Vec<Arc<meridian_authn::TokenVerifier>>,
    /// `Custom` methods, in the resources' order (the first one is asked).
    custom: Vec<Arc<meridian_authn::CustomAuthenticator>>,
    /// The port number (told to custom authentication servers).
    port: u16,
}

#[derive(Debug)]
struct PasswordEntry {
    hash: Phc,
    attributes: BTreeMap<String, String>,
}

/// How clients of a bound namespace are named and whose certificates it trusts (for SNI
/// admission).
struct NamespaceAuth {
    name: String,
    sources: Vec<x509::AuthenticationNameSource>,
    /// The namespace's custom JWT authentication, when configured.
    jwt: Option<Arc<meridian_authn::TokenVerifier>>,
    /// Verifies a client's chain against this namespace's own CA certificates. The TLS port
    /// trusts the union of every bound namespace's CAs (it cannot know the tenant before the
    /// handshake ends), so without this check a certificate issued by namespace A's CA would
    /// pass as a client of namespace B with the same authentication name. `None`: the
    /// namespace has no CA certificate and admits no certificate client.
    trust: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl std::fmt::Debug for NamespaceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceAuth")
            .field("name", &self.name)
            .field("sources", &self.sources)
            .field("trust", &self.trust.is_some())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl NamespaceAuth {
    /// True when `chain` (leaf first, as presented) chains to one of this namespace's CAs.
    fn trusts(&self, chain: &[Vec<u8>]) -> bool {
        let (Some(trust), Some((leaf, rest))) = (&self.trust, chain.split_first()) else {
            return false;
        };
        let leaf = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = rest
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        trust
            .verify_client_cert(&leaf, &intermediates, rustls_pki_types::UnixTime::now())
            .is_ok()
    }
}

/// A client-certificate verifier over `cas` (DER trust anchors), with the provider the TLS
/// layer uses.
fn namespace_trust(
    cas: &[CertificateDer<'static>],
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, String> {
    if cas.is_empty() {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .map_err(|e| format!("is not a usable trust anchor: {e}"))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map(Some)
    .map_err(|e| format!("cannot verify client certificates: {e}"))
}

/// What the last successful apply installed.
#[derive(Debug, Clone)]
struct AppliedMark {
    generation: u64,
    digest: String,
    broker_id: String,
}

/// The swappable part of the node: read on every guarded check, replaced whole by [`apply`].
#[derive(Debug, Default)]
pub(crate) struct LiveState {
    applied: Option<AppliedMark>,
    ports: HashMap<u32, Arc<PortPolicy>>,
    /// Enabled namespaces by lower-case name.
    namespaces: HashMap<String, Arc<NamespaceAuth>>,
    /// The snapshot's broker-wide limits, for clients of snapshot ports.
    limits: Arc<meridian_contract::Limits>,
}

/// Identity of a snapshot port across snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PortKey {
    Fixed(u16),
    /// Port 0: the listener (lower-case name) and the port's index.
    Ephemeral(String, usize),
}

/// An open snapshot port.
#[derive(Debug)]
struct OpenPort {
    slot: u32,
    /// Transport and TLS material: a change re-binds the port.
    fingerprint: String,
    info: SnapshotListener,
    cancel: CancellationToken,
    /// TLS material files the port uses (kept when unused ones are pruned).
    files: Vec<PathBuf>,
}

/// A listener port opened from a snapshot, as tests and the CLI see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotListener {
    /// ARM id of the listener resource.
    pub listener_id: String,
    /// Its name.
    pub listener_name: String,
    /// The port as configured (0 = ephemeral).
    pub port: u16,
    pub transport: Transport,
    /// Where it is bound (port 0 resolved).
    pub addr: SocketAddr,
}

/// The node's live-configuration state, owned by [`Shared`].
pub(crate) struct Live {
    state: RwLock<Arc<LiveState>>,
    /// Bumped after every swap of `state`: connections' cached decisions of an older epoch are
    /// void.
    epoch: AtomicU64,
    /// Open snapshot ports; the lock also serializes applies.
    open: tokio::sync::Mutex<HashMap<PortKey, OpenPort>>,
    /// Mirror of `open` for synchronous readers.
    listeners: Mutex<Vec<SnapshotListener>>,
    errors: Mutex<VecDeque<NodeError>>,
    /// The latest apply attempt failed (the node serves its previous snapshot).
    degraded: Mutex<bool>,
    next_slot: AtomicU32,
    /// Where the snapshot is persisted (`None` without a data dir).
    snapshot_path: Option<PathBuf>,
    /// Where inline TLS material is written for the listeners.
    tls_dir: PathBuf,
    /// `tls_dir` is a temporary directory (no data dir): removed at shutdown.
    tls_dir_is_temp: bool,
    /// The admin endpoint's bound address (the default push endpoint).
    pub(crate) admin_addr: OnceLock<SocketAddr>,
}

impl Live {
    pub(crate) fn new(cfg: &BrokerConfig) -> Live {
        let tls_dir = match &cfg.data_dir {
            Some(d) => d.join("tls"),
            None => std::env::temp_dir().join(format!(
                "meridian-tls-{}-{}",
                std::process::id(),
                crate::broker::now_ms()
            )),
        };
        Live {
            state: RwLock::new(Arc::new(LiveState::default())),
            epoch: AtomicU64::new(0),
            open: tokio::sync::Mutex::new(HashMap::new()),
            listeners: Mutex::new(Vec::new()),
            errors: Mutex::new(VecDeque::new()),
            degraded: Mutex::new(false),
            next_slot: AtomicU32::new(1),
            snapshot_path: cfg.data_dir.as_ref().map(|d| d.join(SNAPSHOT_FILE)),
            tls_dir,
            tls_dir_is_temp: cfg.data_dir.is_none(),
            admin_addr: OnceLock::new(),
        }
    }

    /// The snapshot persisted by the last successful apply, if any (and readable).
    pub(crate) fn persisted(&self) -> Option<BrokerSnapshot> {
        let path = self.snapshot_path.as_ref()?;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read the stored snapshot: {e}");
                return None;
            }
        };
        match BrokerSnapshot::from_json(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring the stored snapshot: {e}");
                None
            }
        }
    }

    /// At shutdown: a temporary TLS directory (and the private keys in it) goes away.
    pub(crate) fn cleanup(&self) {
        if self.tls_dir_is_temp && self.tls_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.tls_dir);
        }
    }

    pub(crate) fn snapshot_listeners(&self) -> Vec<SnapshotListener> {
        self.listeners.lock().clone()
    }

    fn record_error(&self, e: NodeError) {
        let mut errors = self.errors.lock();
        if errors.len() == MAX_ERRORS {
            errors.pop_front();
        }
        errors.push_back(e);
    }
}

/// How many recent decisions a connection remembers.
const DECISIONS_CACHED: usize = 8;

/// A connection's recent decisions. A decision depends only on the principal (fixed for the
/// connection), the action, the topic and the policy in force, so it stays exact until the next
/// swap, which bumps [`Live::epoch`] and voids the cache.
#[derive(Debug, Default)]
struct DecisionCache {
    epoch: u64,
    entries: Vec<(Action, Box<str>, bool)>,
    /// The entry the next miss replaces once the cache is full.
    next: usize,
}

/// May the guarded connection do `action` on `topic` under the current policy? The hot path:
/// an atomic load, an uncontended lock and a few string compares when the connection asked the
/// same question since the last swap (publishers mostly repeat their topics); otherwise one read
/// lock, one hash lookup and the engine's allocation-free decision.
pub(crate) fn allows(shared: &Shared, guard: &Guard, action: Action, topic: &str) -> bool {
    // Loaded before the state is read: a decision computed from a newer state is at worst
    // tagged with an older epoch (and dropped at the next check), never the other way round.
    let epoch = shared.live.epoch.load(Ordering::Acquire);
    {
        let mut c = guard.decisions.lock();
        if c.epoch != epoch {
            c.entries.clear();
            c.next = 0;
            c.epoch = epoch;
        } else if let Some(&(_, _, allowed)) = c
            .entries
            .iter()
            .find(|(a, t, _)| *a == action && **t == *topic)
        {
            return allowed;
        }
    }
    let allowed = {
        let state = shared.live.state.read();
        state
            .ports
            .get(&guard.slot)
            .is_some_and(|p| p.allows(&guard.principal, action, topic))
    };
    let mut c = guard.decisions.lock();
    if c.epoch == epoch {
        let entry = (action, Box::<str>::from(topic), allowed);
        if c.entries.len() < DECISIONS_CACHED {
            c.entries.push(entry);
        } else {
            let i = c.next;
            c.entries[i] = entry;
            c.next = (i + 1) % DECISIONS_CACHED;
        }
    }
    allowed
}

// ---------------------------------------------------------------------------------------------
// Admission

/// Authenticates and authorizes a CONNECT that arrived on snapshot port `slot`. `Err` is the
/// CONNACK reason code.
pub(crate) async fn admit(
    shared: &Shared,
    slot: u32,
    connect: &Connect,
    client_id: &str,
    peer: SocketAddr,
    tls: Option<&TlsInfo>,
) -> Result<Arc<Guard>, ReasonCode> {
    let state = shared.live.state.read().clone();
    let Some(port) = state.ports.get(&slot).cloned() else {
        // The port was removed while this client was connecting.
        return Err(ReasonCode::SERVER_UNAVAILABLE);
    };
    let mut principal = Principal::new(client_id);
    principal.username = connect.username.clone();
    let sni_namespace = tls
        .and_then(|t| t.sni.as_deref())
        .and_then(|sni| sni.split('.').next())
        .and_then(|label| state.namespaces.get(&label.to_ascii_lowercase()));
    // No namespace in SNI: the port's default namespace, if it names one. A default namespace
    // that is not served (topic spaces disabled) admits nobody rather than falling back.
    let sni_namespace = match (sni_namespace, &port.default_namespace) {
        (Some(ns), _) => Some(ns),
        (None, Some(name)) => Some(
            state
                .namespaces
                .get(name)
                .ok_or(ReasonCode::NOT_AUTHORIZED)?,
        ),
        (None, None) => None,
    };
    let method = connect.properties.authentication_method.clone();
    let (credential, expires_at_ms) = if let Some(ns) = sni_namespace {
        match method.as_deref() {
            None => {
                namespace_client(&port, ns, connect, tls, &mut principal)?;
                (Credential::Namespace, 0)
            }
            Some(m) if NAMESPACE_TOKEN_METHODS.contains(&m) => {
                let data = connect
                    .properties
                    .authentication_data
                    .as_deref()
                    .unwrap_or_default();
                namespace_token_client(ns, client_id, data, &mut principal).await?
            }
            // Certificates and the namespace's tokens are the only ways in.
            Some(_) => return Err(ReasonCode::BAD_AUTHENTICATION_METHOD),
        }
    } else {
        match &port.authn {
            None if method.is_some() => return Err(ReasonCode::BAD_AUTHENTICATION_METHOD),
            None => (Credential::Open, 0),
            Some(authn) => {
                let facts = Facts {
                    client_id,
                    peer,
                    tls,
                };
                authenticate(shared, authn, connect, &facts, &mut principal).await?
            }
        }
    };
    if let Err(why) = port.connect_verdict(&principal) {
        tracing::debug!(client = client_id, %why, "CONNECT not authorized");
        return Err(ReasonCode::NOT_AUTHORIZED);
    }
    if let Some(will) = &connect.will
        && !port.allows(&principal, Action::Publish, &will.topic)
    {
        tracing::debug!(
            client = client_id,
            topic = will.topic,
            "will topic not authorized"
        );
        return Err(ReasonCode::NOT_AUTHORIZED);
    }
    Ok(Arc::new(Guard {
        slot,
        principal,
        credential: Mutex::new(credential),
        auth_method: method,
        expires_at_ms: AtomicU64::new(expires_at_ms),
        peer,
        decisions: Mutex::new(DecisionCache::default()),
        revoked: Mutex::new(None),
        limits: state.limits.clone(),
    }))
}

/// MQTT 5 re-authentication: the client sent AUTH with reason 0x19 and its connection's method.
/// The new data is checked in the background (a JWKS fetch or a custom call must not stall the
/// connection): success answers AUTH 0x00 and moves the expiry; a refusal, or data that proves
/// a different identity, closes the connection with 0x87 (0x8C when the port no longer has the
/// method) and a reason string.
pub(crate) fn reauthenticate(
    shared: &Arc<Shared>,
    out: &Arc<crate::broker::ConnOut>,
    client_id: Arc<str>,
    data: Vec<u8>,
) {
    let Some(guard) = out.guard.clone() else {
        return;
    };
    let out = out.clone();
    let s = shared.clone();
    shared.tracker.spawn(async move {
        match reauth_verdict(&s, &guard, &client_id, data).await {
            Ok((credential, expires_at_ms)) => {
                *guard.credential.lock() = credential;
                guard.expires_at_ms.store(expires_at_ms, Ordering::Release);
                out.send(&meridian_codec::Packet::Auth(meridian_codec::Auth {
                    reason_code: ReasonCode::SUCCESS,
                    properties: meridian_codec::Properties {
                        authentication_method: guard.auth_method.clone(),
                        ..Default::default()
                    },
                }));
                s.event(
                    "reauthenticated",
                    serde_json::json!({"client_id": &*client_id, "expires_at_ms": expires_at_ms}),
                );
            }
            Err((code, why)) => {
                tracing::info!(client = %client_id, reason = why, "re-authentication refused");
                guard.revoke(why);
                out.kick(code.0);
            }
        }
    });
}

async fn reauth_verdict(
    shared: &Shared,
    guard: &Guard,
    client_id: &str,
    data: Vec<u8>,
) -> Result<(Credential, u64), (ReasonCode, String)> {
    if matches!(&*guard.credential.lock(), Credential::NamespaceToken { .. }) {
        return namespace_reauth_verdict(shared, guard, client_id, &data).await;
    }
    let port = shared.live.state.read().ports.get(&guard.slot).cloned();
    let Some(port) = port else {
        return Err((
            ReasonCode::NOT_AUTHORIZED,
            "the listener was removed".into(),
        ));
    };
    let Some(authn) = port.authn.as_ref() else {
        // Authentication was disabled on this port meanwhile: nothing to prove any more.
        return Ok((Credential::Open, 0));
    };
    let method = guard.auth_method.as_deref().unwrap_or_default();
    let p = &guard.principal;
    let different = || {
        (
            ReasonCode::NOT_AUTHORIZED,
            "re-authentication proved a different identity; reconnect to change it".to_string(),
        )
    };
    if TOKEN_METHODS.contains(&method) && !authn.tokens.is_empty() {
        let token = std::str::from_utf8(&data)
            .map_err(|_| {
                (
                    ReasonCode::NOT_AUTHORIZED,
                    "re-authentication data is not a token".to_string(),
                )
            })?
            .trim();
        let v = verify_token(authn, token).await.map_err(|e| {
            (
                ReasonCode::NOT_AUTHORIZED,
                format!("re-authentication failed: {e}"),
            )
        })?;
        if v.subject != p.username || v.attributes != p.attributes {
            return Err(different());
        }
        return Ok((
            Credential::Token {
                token: Secret(Arc::from(token)),
            },
            unix_ms(v.expires_at),
        ));
    }
    if let Some(custom) = authn.custom.first() {
        let req = meridian_authn::CustomRequest {
            event: "reauthenticate",
            client_id: client_id.to_owned(),
            username: p.username.clone(),
            authentication_method: guard.auth_method.clone(),
            authentication_data: Some(data),
            protocol_version: 5,
            remote_address: guard.peer.to_string(),
            listener_port: authn.port,
            ..Default::default()
        };
        let allow = custom
            .authenticate(&req)
            .await
            .map_err(|d| (ReasonCode::NOT_AUTHORIZED, d.reason))?;
        if allow.attributes != p.attributes {
            return Err(different());
        }
        return Ok((
            Credential::Custom {
                endpoint: custom.endpoint().to_owned(),
            },
            allow.expires_at.map_or(0, unix_ms),
        ));
    }
    Err((
        ReasonCode::BAD_AUTHENTICATION_METHOD,
        format!("authentication method {method:?} is no longer offered on this listener"),
    ))
}

/// Re-authentication of a namespace token client: the new token must verify with the
/// namespace's current settings and prove the same authentication name and attributes.
async fn namespace_reauth_verdict(
    shared: &Shared,
    guard: &Guard,
    client_id: &str,
    data: &[u8],
) -> Result<(Credential, u64), (ReasonCode, String)> {
    let ns_name = guard.principal.namespace.as_deref().unwrap_or_default();
    let ns = shared
        .live
        .state
        .read()
        .namespaces
        .get(&ns_name.to_ascii_lowercase())
        .cloned();
    let Some(ns) = ns.filter(|n| n.jwt.is_some()) else {
        return Err((
            ReasonCode::BAD_AUTHENTICATION_METHOD,
            format!("namespace '{ns_name}' no longer accepts tokens"),
        ));
    };
    let mut proved = Principal::new(client_id);
    let (credential, expires_at_ms) = namespace_token_client(&ns, client_id, data, &mut proved)
        .await
        .map_err(|_| {
            (
                ReasonCode::NOT_AUTHORIZED,
                "re-authentication failed: the token was refused".to_string(),
            )
        })?;
    if proved.authentication_name != guard.principal.authentication_name
        || proved.token_attributes != guard.principal.token_attributes
    {
        return Err((
            ReasonCode::NOT_AUTHORIZED,
            "re-authentication proved a different identity; reconnect to change it".to_string(),
        ));
    }
    Ok((credential, expires_at_ms))
}

/// An Event Grid client presenting a token to namespace `ns` (MQTT 5 authentication method
/// `CUSTOM-JWT`/`OAUTH2-JWT`, the JWT as authentication data): verified by the namespace's
/// custom JWT authentication; `sub` is its authentication name, the claims its attributes.
/// A namespace without custom JWT authentication answers 0x8C; a refused token 0x86.
async fn namespace_token_client(
    ns: &NamespaceAuth,
    client_id: &str,
    data: &[u8],
    principal: &mut Principal,
) -> Result<(Credential, u64), ReasonCode> {
    let verifier = ns
        .jwt
        .as_ref()
        .ok_or(ReasonCode::BAD_AUTHENTICATION_METHOD)?;
    let token = std::str::from_utf8(data)
        .map_err(|_| ReasonCode::BAD_USER_NAME_OR_PASSWORD)?
        .trim();
    let verified = verifier.verify(token).await.map_err(|e| {
        tracing::debug!(
            client = client_id,
            namespace = ns.name,
            "token refused: {e}"
        );
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    })?;
    let name = verified
        .subject
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or(ReasonCode::BAD_USER_NAME_OR_PASSWORD)?;
    let attributes: BTreeMap<String, pm::AttributeValue> = verified
        .event_grid_attributes()
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_value::<pm::AttributeValue>(v).ok()?)))
        .collect();
    principal.namespace = Some(ns.name.clone());
    principal.authentication_name = Some(name);
    principal.token_attributes = Some(meridian_policy::TokenAttributes::from(attributes));
    Ok((
        Credential::NamespaceToken {
            token: Secret(Arc::from(token)),
        },
        unix_ms(verified.expires_at),
    ))
}

/// What authentication may need to know about the connection besides its CONNECT.
struct Facts<'a> {
    client_id: &'a str,
    peer: SocketAddr,
    tls: Option<&'a TlsInfo>,
}

/// Seconds since the epoch → unix ms, saturating.
fn unix_ms(seconds: u64) -> u64 {
    seconds.saturating_mul(1000).max(1)
}

/// The IoT Operations methods of a port. With an MQTT 5 authentication method: a JWT for the
/// token methods, anything else for the `Custom` method, else 0x8C. Without: a verified
/// certificate, else the username's password, else the `Custom` method. Returns the credential
/// and when it expires (unix ms, 0 = never).
async fn authenticate(
    shared: &Shared,
    authn: &Authn,
    connect: &Connect,
    facts: &Facts<'_>,
    principal: &mut Principal,
) -> Result<(Credential, u64), ReasonCode> {
    if let Some(method) = &connect.properties.authentication_method {
        let data = connect
            .properties
            .authentication_data
            .as_deref()
            .unwrap_or_default();
        if TOKEN_METHODS.contains(&method.as_str()) && !authn.tokens.is_empty() {
            let token = std::str::from_utf8(data)
                .map_err(|_| ReasonCode::BAD_USER_NAME_OR_PASSWORD)?
                .trim();
            let verified = verify_token(authn, token).await.map_err(|e| {
                tracing::debug!(client = facts.client_id, method, "token refused: {e}");
                ReasonCode::BAD_USER_NAME_OR_PASSWORD
            })?;
            token_principal(principal, verified.subject, verified.attributes);
            return Ok((
                Credential::Token {
                    token: Secret(Arc::from(token)),
                },
                unix_ms(verified.expires_at),
            ));
        }
        if !authn.custom.is_empty() {
            return ask_custom(authn, connect, facts, principal).await;
        }
        return Err(ReasonCode::BAD_AUTHENTICATION_METHOD);
    }
    let chain = facts
        .tls
        .map(|t| t.peer_certificates.as_slice())
        .unwrap_or(&[]);
    if authn.has_x509 && !chain.is_empty() {
        // The TLS layer verified the chain against the port's trust bundle.
        let identities: Vec<x509::CertificateIdentity> = chain
            .iter()
            .filter_map(|der| x509::identity_from_der(der).ok())
            .collect();
        // The username is the certificate's CN: a CONNECT username proves nothing here and
        // must not reach rules written for a password user of that name.
        principal.username = identities
            .first()
            .and_then(|i| i.common_names.first().cloned());
        if let Some(m) = authn
            .x509_attributes
            .iter()
            .find_map(|a| a.for_chain(&identities))
        {
            principal.attributes = m.attributes.clone();
        }
        return Ok((Credential::Certificate, 0));
    }
    if let Some(username) = &connect.username {
        let password = connect.password.as_deref().unwrap_or_default().to_vec();
        if let Some(entry) = authn.passwords.get(username) {
            if crate::auth::verify_phc(entry.hash.0.to_string(), password).await {
                principal.attributes = entry.attributes.clone();
                return Ok((
                    Credential::Password {
                        username: username.clone(),
                        hash: entry.hash.clone(),
                    },
                    0,
                ));
            }
            return Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD);
        }
        if authn.node_password_file
            && let Some(file) = &shared.passwords
            && file.verify(username, &password).await
        {
            return Ok((
                Credential::Password {
                    username: username.clone(),
                    hash: Phc(Arc::from("")),
                },
                0,
            ));
        }
    }
    if !authn.custom.is_empty() {
        return ask_custom(authn, connect, facts, principal).await;
    }
    Err(if connect.username.is_some() {
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    } else {
        ReasonCode::NOT_AUTHORIZED
    })
}

/// Tries every token method of the port; the first that accepts the token wins.
async fn verify_token(
    authn: &Authn,
    token: &str,
) -> Result<meridian_authn::VerifiedToken, meridian_authn::TokenError> {
    let mut first_error = None;
    for v in &authn.tokens {
        match v.verify(token).await {
            Ok(t) => return Ok(t),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(meridian_authn::TokenError::UnknownKey(None)))
}

/// A token client is who its token says: `sub` is its username (a username in CONNECT is not
/// proof of anything), the claims its attributes.
fn token_principal(
    principal: &mut Principal,
    subject: Option<String>,
    attributes: BTreeMap<String, String>,
) {
    principal.username = subject;
    principal.attributes = attributes;
}

async fn ask_custom(
    authn: &Authn,
    connect: &Connect,
    facts: &Facts<'_>,
    principal: &mut Principal,
) -> Result<(Credential, u64), ReasonCode> {
    let custom = authn.custom.first().expect("caller checked");
    let req = custom_request("connect", connect, facts, authn.port);
    match custom.authenticate(&req).await {
        Ok(allow) => {
            principal.attributes = allow.attributes;
            Ok((
                Credential::Custom {
                    endpoint: custom.endpoint().to_owned(),
                },
                allow.expires_at.map_or(0, unix_ms),
            ))
        }
        Err(d) => {
            tracing::info!(
                client = facts.client_id,
                reason = d.reason,
                "custom authentication refused the client"
            );
            Err(ReasonCode(d.reason_code))
        }
    }
}

fn custom_request(
    event: &'static str,
    connect: &Connect,
    facts: &Facts<'_>,
    port: u16,
) -> meridian_authn::CustomRequest {
    meridian_authn::CustomRequest {
        event,
        client_id: facts.client_id.to_owned(),
        username: connect.username.clone(),
        password: connect.password.as_ref().map(|p| p.to_vec()),
        authentication_method: connect.properties.authentication_method.clone(),
        authentication_data: connect
            .properties
            .authentication_data
            .as_ref()
            .map(|d| d.to_vec()),
        protocol_version: connect.protocol.level(),
        remote_address: facts.peer.to_string(),
        listener_port: port,
        tls: facts
            .tls
            .map(|t| meridian_authn::CustomTls::new(t.sni.clone(), &t.peer_certificates)),
    }
}

/// An Event Grid client reaching namespace `ns` by SNI: a certificate is required and must
/// identify a registered client by its validation scheme.
fn namespace_client(
    port: &PortPolicy,
    ns: &NamespaceAuth,
    connect: &Connect,
    tls: Option<&TlsInfo>,
    principal: &mut Principal,
) -> Result<(), ReasonCode> {
    let chain = tls
        .map(|t| t.peer_certificates.as_slice())
        .unwrap_or_default();
    let leaf = chain.first().ok_or(ReasonCode::NOT_AUTHORIZED)?;
    if !ns.trusts(chain) {
        // Issued by a CA of another namespace on this port: not a credential here.
        return Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    }
    let identity = x509::identity_from_der(leaf).map_err(|_| ReasonCode::NOT_AUTHORIZED)?;
    let name = match connect.username.as_deref().filter(|u| !u.is_empty()) {
        Some(u) => u.to_owned(),
        None => x509::authentication_name_from_certificate(&identity, &ns.sources)
            .ok_or(ReasonCode::BAD_USER_NAME_OR_PASSWORD)?,
    };
    let engine = port.engine.as_deref().ok_or(ReasonCode::NOT_AUTHORIZED)?;
    let client = engine
        .event_grid_client(&ns.name, &name)
        .ok_or(ReasonCode::NOT_AUTHORIZED)?;
    let settings = client
        .client_certificate_authentication
        .clone()
        .unwrap_or_default();
    x509::validate_client_certificate(&identity, &settings, &name)
        .map_err(|_| ReasonCode::BAD_USER_NAME_OR_PASSWORD)?;
    principal.namespace = Some(ns.name.clone());
    principal.authentication_name = Some(name);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Apply

fn reject(generation: u64, resource_id: &str, message: impl Into<String>) -> Rejection {
    Rejection {
        generation,
        resource_id: (!resource_id.is_empty()).then(|| resource_id.to_owned()),
        message: message.into(),
    }
}

/// Applies a snapshot to the running node (see the module docs). A snapshot whose generation
/// is not newer than the applied one answers with the applied generation and changes nothing.
pub(crate) async fn apply(
    shared: &Arc<Shared>,
    snap: BrokerSnapshot,
) -> Result<Applied, Rejection> {
    let mut open = shared.live.open.lock().await;
    let generation = snap.generation;
    if shared.cancel.is_cancelled() {
        return Err(reject(generation, "", "the node is shutting down"));
    }
    if let Some(a) = &shared.live.state.read().applied
        && generation <= a.generation
    {
        return Ok(Applied {
            applied_generation: a.generation,
        });
    }
    let started = Instant::now();
    let result = apply_locked(shared, &mut open, snap).await;
    match &result {
        Ok(a) => {
            *shared.live.degraded.lock() = false;
            tracing::info!(
                generation = a.applied_generation,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot applied"
            );
        }
        Err(r) => {
            *shared.live.degraded.lock() = true;
            tracing::warn!(
                generation = r.generation,
                resource = r.resource_id.as_deref().unwrap_or(""),
                "snapshot rejected: {}",
                r.message
            );
            shared.live.record_error(NodeError {
                generation: r.generation,
                resource_id: r.resource_id.clone(),
                message: r.message.clone(),
            });
        }
    }
    result
}

/// A port of the new snapshot, built and ready to bind.
struct PlannedPort {
    key: PortKey,
    listener_id: String,
    listener_name: String,
    port: u16,
    transport: Transport,
    /// TLS server material, when the port has TLS.
    tls: Option<PlannedTls>,
    /// Client CA bundle (PEM); empty = no client certificates.
    client_ca: String,
    /// A client may present no certificate (a namespace admits token clients).
    client_cert_optional: bool,
    fingerprint: String,
    policy: PortPolicy,
}

enum PlannedTls {
    Manual {
        cert: String,
        key: String,
    },
    /// Self-signed with these subject alternative names (see the module docs).
    Automatic {
        sans: Vec<String>,
    },
}

async fn apply_locked(
    shared: &Arc<Shared>,
    open: &mut HashMap<PortKey, OpenPort>,
    snap: BrokerSnapshot,
) -> Result<Applied, Rejection> {
    let generation = snap.generation;
    if let Some(cp) = &shared.cfg.control_plane
        && !cp.broker.eq_ignore_ascii_case(&snap.broker_id)
    {
        return Err(reject(
            generation,
            &snap.broker_id,
            format!(
                "this node serves broker {} and cannot apply a snapshot of {}",
                cp.broker, snap.broker_id
            ),
        ));
    }
    if let Err(invalid) = snap.validate() {
        let first = invalid
            .violations
            .first()
            .map(|v| v.resource_id.clone())
            .unwrap_or_default();
        return Err(reject(generation, &first, invalid.to_string()));
    }
    meridian_net::install_crypto_provider();
    let (planned, namespaces) = plan(&snap, &shared.jwt_keys)?;

    // Bind every new or changed port before anything is swapped. A failure drops what was
    // bound so far (closing it) and leaves the node as it was.
    let mut bound: Vec<(usize, meridian_net::Listener)> = Vec::new();
    let mut rebound_slots: HashMap<PortKey, u32> = HashMap::new();
    for (i, p) in planned.iter().enumerate() {
        if open
            .get(&p.key)
            .is_some_and(|o| o.fingerprint == p.fingerprint)
        {
            continue;
        }
        let rebind = open.remove(&p.key);
        if let Some(old) = &rebind {
            // Same port, new protocol or TLS material: the old socket must go first. Its
            // connections stay and follow the port's new policy (same slot).
            old.cancel.cancel();
            rebound_slots.insert(p.key.clone(), old.slot);
        }
        match bind(shared, p, rebind.is_some()).await {
            Ok(l) => bound.push((i, l)),
            Err(message) => return Err(reject(generation, &p.listener_id, message)),
        }
    }

    // Persist before the swap: a node that restarts serves what it acknowledged.
    if let Some(path) = &shared.live.snapshot_path
        && let Err(e) = persist(path, &snap)
    {
        return Err(reject(
            generation,
            "",
            format!("cannot store the snapshot at {}: {e}", path.display()),
        ));
    }

    // Slots: a kept (or re-bound) port keeps its slot, so its connections follow its new policy.
    let slots: Vec<u32> = planned
        .iter()
        .map(|p| match (open.get(&p.key), rebound_slots.get(&p.key)) {
            (Some(o), _) => o.slot,
            (None, Some(s)) => *s,
            (None, None) => shared.live.next_slot.fetch_add(1, Ordering::Relaxed),
        })
        .collect();
    let mut ports = HashMap::new();
    let mut metas = Vec::with_capacity(planned.len());
    for (p, slot) in planned.into_iter().zip(&slots) {
        ports.insert(*slot, Arc::new(p.policy));
        metas.push((
            p.key,
            p.fingerprint,
            p.listener_id,
            p.listener_name,
            p.port,
            p.transport,
        ));
    }
    let digest = snap.digest();
    let new_state = Arc::new(LiveState {
        applied: Some(AppliedMark {
            generation,
            digest: digest.clone(),
            broker_id: snap.broker_id.clone(),
        }),
        ports,
        namespaces,
        limits: Arc::new(snap.limits.clone()),
    });
    *shared.live.state.write() = new_state.clone();
    shared.live.epoch.fetch_add(1, Ordering::AcqRel);

    // Removed ports stop accepting; their connections are closed by `enforce` below.
    let wanted: std::collections::HashSet<&PortKey> = metas.iter().map(|m| &m.0).collect();
    let removed: Vec<PortKey> = open
        .keys()
        .filter(|k| !wanted.contains(k))
        .cloned()
        .collect();
    let mut closed: HashMap<u32, String> = HashMap::new();
    for k in removed {
        if let Some(o) = open.remove(&k) {
            o.cancel.cancel();
            tracing::info!(listener = o.info.listener_name, port = o.info.port, addr = %o.info.addr, "listener closed");
            closed.insert(
                o.slot,
                format!(
                    "listener '{}' port {} was removed",
                    o.info.listener_name, o.info.port
                ),
            );
        }
    }
    // New and re-bound ports start accepting now that their policy is in place.
    for (i, listener) in bound {
        let (key, fingerprint, listener_id, listener_name, port, transport) = metas[i].clone();
        let cancel = shared.cancel.child_token();
        let info = SnapshotListener {
            listener_id,
            listener_name,
            port,
            transport,
            addr: listener.local_addr(),
        };
        tracing::info!(listener = info.listener_name, port, addr = %info.addr, transport = transport.scheme(), "listener opened");
        let files = listener
            .spec()
            .tls
            .iter()
            .flat_map(|t| {
                [
                    Some(t.cert.clone()),
                    Some(t.key.clone()),
                    t.client_ca.clone(),
                ]
            })
            .flatten()
            .collect();
        start_accepting(shared, listener, slots[i], cancel.clone());
        open.insert(
            key,
            OpenPort {
                slot: slots[i],
                fingerprint,
                info,
                cancel,
                files,
            },
        );
    }
    // Private keys of ports that are gone (or re-issued) do not stay on disk.
    let keep: std::collections::HashSet<&PathBuf> = open.values().flat_map(|o| &o.files).collect();
    prune_material(&shared.live.tls_dir, &keep);
    let mut infos: Vec<SnapshotListener> = open.values().map(|o| o.info.clone()).collect();
    infos.sort_by(|a, b| (&a.listener_name, a.port).cmp(&(&b.listener_name, b.port)));
    *shared.live.listeners.lock() = infos;

    let (revoked, dropped) = enforce(shared, &new_state, &closed, generation);
    shared.event(
        "snapshot_applied",
        serde_json::json!({"generation": generation, "digest": digest,
            "listeners": open.len(), "revoked": revoked, "closed": dropped}),
    );
    Ok(Applied {
        applied_generation: generation,
    })
}

/// Accept loop of one snapshot port, until its token is cancelled (port removed or re-bound,
/// or the node shuts down).
fn start_accepting(
    shared: &Arc<Shared>,
    mut listener: meridian_net::Listener,
    slot: u32,
    cancel: CancellationToken,
) {
    let s = shared.clone();
    shared.tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(acc) => {
                        let s2 = s.clone();
                        s.tracker.spawn(crate::conn::serve(s2, acc, Some(slot)));
                    }
                    Err(NetError::Closed) => break,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        // Dropping the listener closes the socket.
    });
}

/// Re-checks every guarded connection against `state`: connections of closed ports get 0x8B,
/// connections the new policy forbids get 0x87 and a `policy_revoked` event. Returns (revoked,
/// closed).
fn enforce(
    shared: &Shared,
    state: &LiveState,
    closed: &HashMap<u32, String>,
    generation: u64,
) -> (usize, usize) {
    let handles: Vec<_> = shared.sessions.lock().values().cloned().collect();
    let (mut revoked, mut dropped) = (0, 0);
    for h in handles {
        let verdict = {
            let inner = h.inner.lock();
            let Some(out) = inner.conn.clone() else {
                // An offline persistent session: stop queueing what its client may no longer
                // read (it cannot be told; it finds out from the events or on resubscribing).
                let last = inner.last_guard.clone();
                drop(inner);
                if let Some(g) = last
                    && let Some(port) = state.ports.get(&g.slot)
                {
                    prune_subscriptions(
                        shared,
                        &h,
                        port,
                        &g,
                        "subscription of an offline session is no longer authorized; removed",
                    );
                }
                continue;
            };
            let Some(guard) = out.guard.clone() else {
                continue;
            };
            let verdict = match state.ports.get(&guard.slot) {
                None => Err((
                    ReasonCode::SERVER_SHUTTING_DOWN,
                    closed
                        .get(&guard.slot)
                        .cloned()
                        .unwrap_or_else(|| "the listener was closed".into()),
                )),
                Some(port) => port
                    .recheck(
                        &state.namespaces,
                        &guard,
                        inner.session.subscriptions.keys(),
                    )
                    .map_err(|why| (ReasonCode::NOT_AUTHORIZED, why)),
            };
            match verdict {
                Ok(()) => None,
                Err(v) => Some((out, guard, v)),
            }
        };
        let Some((out, guard, (code, why))) = verdict else {
            continue;
        };
        guard.revoke(why.clone());
        out.kick(code.0);
        if code == ReasonCode::NOT_AUTHORIZED {
            revoked += 1;
            tracing::info!(client = %h.client_id, reason = %why, generation, "policy revoked a connection");
            shared.event(
                "policy_revoked",
                serde_json::json!({"client_id": &*h.client_id, "reason_code": code.0,
                    "reason": why, "generation": generation}),
            );
        } else {
            dropped += 1;
        }
    }
    (revoked, dropped)
}

/// Right after a guarded connection attached to its session: subscriptions a resumed session
/// holds that the current policy forbids are removed (the client cannot be told in a CONNACK,
/// and kicking it would loop), each with a `policy_revoked` event; and a policy swapped in while
/// the client was connecting is applied to it.
pub(crate) fn after_attach(shared: &Shared, handle: &Arc<crate::broker::SessionHandle>) {
    let (out, guard) = {
        let inner = handle.inner.lock();
        let Some(out) = inner.conn.clone() else {
            return;
        };
        let Some(guard) = out.guard.clone() else {
            return;
        };
        (out, guard)
    };
    let state = shared.live.state.read().clone();
    let Some(port) = state.ports.get(&guard.slot) else {
        guard.revoke("the listener was closed".into());
        out.kick(ReasonCode::SERVER_SHUTTING_DOWN.0);
        return;
    };
    prune_subscriptions(
        shared,
        handle,
        port,
        &guard,
        "subscription of the resumed session is not authorized; removed",
    );
    if let Err(why) = port.recheck(&state.namespaces, &guard, std::iter::empty()) {
        guard.revoke(why);
        out.kick(ReasonCode::NOT_AUTHORIZED.0);
    }
}

/// Removes the subscriptions of `handle` that `port` no longer allows `guard`'s principal, each
/// with a `policy_revoked` event `{client_id, filter, reason}`, and stores the session.
fn prune_subscriptions(
    shared: &Shared,
    handle: &Arc<crate::broker::SessionHandle>,
    port: &PortPolicy,
    guard: &Guard,
    reason: &str,
) {
    let forbidden: Vec<String> = {
        let inner = handle.inner.lock();
        inner
            .session
            .subscriptions
            .keys()
            .filter(|f| !port.allows(&guard.principal, Action::Subscribe, f))
            .cloned()
            .collect()
    };
    if forbidden.is_empty() {
        return;
    }
    let key = crate::broker::SessionKey(handle.clone());
    for f in &forbidden {
        handle.inner.lock().session.subscriptions.remove(f);
        shared.router.write().unsubscribe(&key, f);
        shared.event(
            "policy_revoked",
            serde_json::json!({"client_id": &*handle.client_id, "filter": f, "reason": reason}),
        );
    }
    if let Some(c) = shared.persist_session(handle) {
        drop(c);
    }
}

// ---------------------------------------------------------------------------------------------
// Building a plan (no I/O, no side effects)

/// Parses a PEM bundle of CA certificates: at least one, each a DER certificate rustls accepts
/// as a trust anchor.
fn parse_ca_bundle(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM CERTIFICATE block".into());
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, der) in certs.iter().enumerate() {
        x509::identity_from_der(der)
            .map_err(|e| format!("certificate {} does not parse: {e}", i + 1))?;
        roots
            .add(der.clone())
            .map_err(|e| format!("certificate {} is not a usable CA: {e}", i + 1))?;
    }
    Ok(certs)
}

/// The parts of one authentication policy a port needs.
#[derive(Default)]
struct AuthnParts {
    passwords: Vec<(String, PasswordEntry)>,
    node_password_file: bool,
    has_x509: bool,
    x509_attributes: Vec<x509::AuthorizationAttributes>,
    ca_pem: String,
    tokens: Vec<Arc<meridian_authn::TokenVerifier>>,
    custom: Vec<Arc<meridian_authn::CustomAuthenticator>>,
}

fn authn_parts(
    a: &meridian_contract::AuthenticationPolicy,
    node_jwt_keys: &[String],
) -> Result<AuthnParts, String> {
    let mut parts = AuthnParts::default();
    for (i, m) in a.methods.iter().enumerate() {
        match m {
            AuthenticationMethod::UsernamePassword(s) => {
                if s.credentials.is_empty() {
                    parts.node_password_file = true;
                }
                for c in &s.credentials {
                    argon2::PasswordHash::new(&c.password_hash).map_err(|e| {
                        format!(
                            "methods[{i}]: user '{}': invalid argon2 PHC hash: {e}",
                            c.username
                        )
                    })?;
                    parts.passwords.push((
                        c.username.clone(),
                        PasswordEntry {
                            hash: Phc(Arc::from(c.password_hash.as_str())),
                            attributes: c.attributes.clone(),
                        },
                    ));
                }
            }
            AuthenticationMethod::X509(s) => {
                parts.has_x509 = true;
                if let Some(pem) = &s.trusted_ca_pem {
                    parse_ca_bundle(pem)
                        .map_err(|e| format!("methods[{i}] X509 trustedCaPem {e}"))?;
                    parts.ca_pem.push_str(pem.trim());
                    parts.ca_pem.push('\n');
                }
                let rules: BTreeMap<String, x509::X509AttributeRule> = s
                    .authorization_attributes
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            x509::X509AttributeRule {
                                subject: v.subject.clone(),
                                attributes: v.attributes.clone(),
                            },
                        )
                    })
                    .collect();
                parts.x509_attributes.push(
                    x509::AuthorizationAttributes::compile(&rules)
                        .map_err(|e| format!("methods[{i}] X509: {e}"))?,
                );
            }
            AuthenticationMethod::ServiceAccountToken(s) => {
                let v = meridian_authn::TokenVerifier::new(s, node_jwt_keys)
                    .map_err(|e| format!("methods[{i}] ServiceAccountToken: {e}"))?;
                if !v.has_key_source() {
                    tracing::warn!(
                        authentication = a.name,
                        "ServiceAccountToken method without keys, JWKS URL or node --jwt-key: it admits nobody"
                    );
                }
                parts.tokens.push(Arc::new(v));
            }
            AuthenticationMethod::Custom(s) => {
                let c = meridian_authn::CustomAuthenticator::new(s)
                    .map_err(|e| format!("methods[{i}] Custom: {e}"))?;
                parts.custom.push(Arc::new(c));
            }
            // Carried: nodes have no SPIFFE agent, so it authenticates nobody (fail closed).
            AuthenticationMethod::Svid(_) => {}
            AuthenticationMethod::Unknown => {
                return Err(format!("methods[{i}]: unknown authentication method"));
            }
        }
    }
    Ok(parts)
}

fn name_source(s: &str) -> Option<x509::AuthenticationNameSource> {
    use x509::AuthenticationNameSource as S;
    Some(match s {
        "ClientCertificateSubject" => S::ClientCertificateSubject,
        "ClientCertificateDns" => S::ClientCertificateDns,
        "ClientCertificateUri" => S::ClientCertificateUri,
        "ClientCertificateIp" => S::ClientCertificateIp,
        "ClientCertificateEmail" => S::ClientCertificateEmail,
        _ => return None,
    })
}

type Plan = (Vec<PlannedPort>, HashMap<String, Arc<NamespaceAuth>>);

/// Everything the snapshot needs, parsed and compiled; nothing bound yet.
fn plan(snap: &BrokerSnapshot, node_jwt_keys: &[String]) -> Result<Plan, Rejection> {
    let generation = snap.generation;

    // Authentication policies, by lower-case name.
    let mut authns: HashMap<String, AuthnParts> = HashMap::new();
    for a in &snap.authentications {
        let parts = authn_parts(a, node_jwt_keys).map_err(|e| reject(generation, &a.id, e))?;
        authns.insert(a.name.to_lowercase(), parts);
    }

    // Authorization policies, each compiled alone so an error names its resource.
    let mut authzs: HashMap<String, pm::IotAuthorization> = HashMap::new();
    for a in &snap.authorizations {
        let model = meridian_policy::snapshot::iot_authorization(a)
            .map_err(|e| reject(generation, &a.id, e))?;
        PolicyEngine::compile(&PolicyModel {
            iot_operations: vec![model.clone()],
            event_grid: Vec::new(),
        })
        .map_err(|e| {
            reject(
                generation,
                &a.id,
                format!("authorization '{}': {e}", a.name),
            )
        })?;
        authzs.insert(a.name.to_lowercase(), model);
    }

    // Namespaces: CA certificates always parsed; enabled ones compiled and reachable by SNI.
    let mut namespace_models = Vec::new();
    let mut namespaces = HashMap::new();
    let mut namespace_cas = String::new();
    // Some served namespace admits token clients, who present no certificate.
    let mut namespace_tokens = false;
    for ns in &snap.namespaces {
        let mut anchors = Vec::new();
        for ca in &ns.ca_certificates {
            anchors.extend(parse_ca_bundle(&ca.pem()).map_err(|e| {
                reject(
                    generation,
                    &ca.id,
                    format!("CA certificate '{}' {e}", ca.name),
                )
            })?);
            namespace_cas.push_str(&ca.pem());
        }
        let trust = namespace_trust(&anchors).map_err(|e| {
            reject(
                generation,
                &ns.id,
                format!("namespace '{}': CA certificates {e}", ns.name),
            )
        })?;
        if !ns.topic_spaces_enabled {
            continue;
        }
        let model = meridian_policy::snapshot::event_grid_namespace(ns)
            .map_err(|(id, e)| reject(generation, &id, e))?;
        PolicyEngine::compile(&PolicyModel {
            iot_operations: Vec::new(),
            event_grid: vec![model.clone()],
        })
        .map_err(|e| {
            let msg = e.to_string();
            reject(
                generation,
                &meridian_policy::snapshot::namespace_culprit(ns, &msg),
                msg,
            )
        })?;
        let mut sources = Vec::new();
        for s in &ns.alternative_authentication_name_sources {
            sources.push(name_source(s).ok_or_else(|| {
                reject(
                    generation,
                    &ns.id,
                    format!("unknown alternativeAuthenticationNameSource '{s}'"),
                )
            })?);
        }
        let jwt = match &ns.custom_jwt_authentication {
            None => None,
            Some(settings) => {
                let v = meridian_authn::TokenVerifier::for_event_grid_namespace(&ns.name, settings)
                    .map_err(|e| {
                        reject(
                            generation,
                            &ns.id,
                            format!(
                                "namespace '{}': customJwtAuthentication issuer certificate {e}",
                                ns.name
                            ),
                        )
                    })?;
                namespace_tokens = true;
                Some(Arc::new(v))
            }
        };
        namespaces.insert(
            ns.name.to_lowercase(),
            Arc::new(NamespaceAuth {
                name: ns.name.clone(),
                sources,
                trust,
                jwt,
            }),
        );
        namespace_models.push(model);
    }

    // Ports.
    let mut engines: HashMap<Vec<String>, Arc<PolicyEngine>> = HashMap::new();
    let mut planned = Vec::new();
    for l in &snap.listeners {
        for (index, port) in l.ports.iter().enumerate() {
            let fail = |m: String| reject(generation, &l.id, m);
            let at = format!("port {}", port.port);
            let transport = match (port.protocol, port.tls.is_some()) {
                (Protocol::Mqtt, false) => Transport::Tcp,
                (Protocol::Mqtt, true) => Transport::Tls,
                (Protocol::WebSockets, false) => Transport::Ws,
                (Protocol::WebSockets, true) => Transport::Wss,
                (Protocol::Unknown, _) => return Err(fail(format!("{at}: unknown protocol"))),
            };
            // Authentication.
            let mut client_ca = String::new();
            let authn = if port.authentication_enabled {
                let mut merged = Authn {
                    port: port.port,
                    ..Authn::default()
                };
                for r in &port.authentication_refs {
                    let Some(parts) = authns.get(&r.to_lowercase()) else {
                        return Err(fail(format!("{at}: authentication '{r}' does not exist")));
                    };
                    for (u, e) in &parts.passwords {
                        merged.passwords.entry(u.clone()).or_insert(PasswordEntry {
                            hash: e.hash.clone(),
                            attributes: e.attributes.clone(),
                        });
                    }
                    merged.node_password_file |= parts.node_password_file;
                    merged.has_x509 |= parts.has_x509;
                    merged
                        .x509_attributes
                        .extend(parts.x509_attributes.iter().cloned());
                    merged.tokens.extend(parts.tokens.iter().cloned());
                    merged.custom.extend(parts.custom.iter().cloned());
                    client_ca.push_str(&parts.ca_pem);
                }
                client_ca.push_str(&namespace_cas);
                Some(Arc::new(merged))
            } else {
                None
            };
            // Authorization: the port's rules (when enabled) plus every enabled namespace.
            let engine = if port.authorization_enabled || !namespace_models.is_empty() {
                let mut key: Vec<String> = if port.authorization_enabled {
                    port.authorization_refs
                        .iter()
                        .map(|r| r.to_lowercase())
                        .collect()
                } else {
                    Vec::new()
                };
                key.sort();
                key.dedup();
                key.insert(0, port.authorization_enabled.to_string());
                match engines.get(&key) {
                    Some(e) => Some(e.clone()),
                    None => {
                        let mut model = PolicyModel {
                            iot_operations: Vec::new(),
                            event_grid: namespace_models.clone(),
                        };
                        for r in key.iter().skip(1) {
                            let Some(a) = authzs.get(r) else {
                                return Err(fail(format!(
                                    "{at}: authorization '{r}' does not exist"
                                )));
                            };
                            model.iot_operations.push(a.clone());
                        }
                        let e = Arc::new(
                            PolicyEngine::compile(&model)
                                .map_err(|e| fail(format!("{at}: {e}")))?,
                        );
                        engines.insert(key, e.clone());
                        Some(e)
                    }
                }
            } else {
                None
            };
            // TLS.
            let tls = match &port.tls {
                None => None,
                Some(t) => {
                    if let Some(pem) = &t.client_ca_pem {
                        parse_ca_bundle(pem).map_err(|e| fail(format!("{at}: clientCaPem {e}")))?;
                        client_ca.push_str(pem.trim());
                        client_ca.push('\n');
                    }
                    Some(match &t.certificate {
                        ServerCertificate::Manual(m) => {
                            match (&m.certificate_pem, &m.private_key_pem) {
                                (Some(cert), Some(key)) => {
                                    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                                        .collect::<Result<Vec<_>, _>>()
                                        .map_err(|e| fail(format!("{at}: certificatePem: {e}")))?;
                                    if chain.is_empty() {
                                        return Err(fail(format!(
                                            "{at}: certificatePem holds no certificate"
                                        )));
                                    }
                                    for der in &chain {
                                        x509::identity_from_der(der).map_err(|e| {
                                            fail(format!("{at}: certificatePem: {e}"))
                                        })?;
                                    }
                                    rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
                                        .map_err(|e| fail(format!("{at}: privateKeyPem: {e}")))?;
                                    PlannedTls::Manual {
                                        cert: cert.clone(),
                                        key: key.clone(),
                                    }
                                }
                                _ => {
                                    return Err(fail(format!(
                                        "{at}: the certificate secret {:?} is not available on this node \
                                         (Meridian has no secret store yet; the snapshot must carry \
                                         certificatePem and privateKeyPem)",
                                        m.secret_ref.as_deref().unwrap_or("")
                                    )));
                                }
                            }
                        }
                        ServerCertificate::Automatic(a) => {
                            let mut sans: Vec<String> =
                                a.san.dns.iter().chain(&a.san.ip).cloned().collect();
                            if sans.is_empty() {
                                sans.push("localhost".into());
                            }
                            PlannedTls::Automatic { sans }
                        }
                        ServerCertificate::Unknown => {
                            return Err(fail(format!("{at}: unknown certificate mode")));
                        }
                    })
                }
            };
            if tls.is_none() {
                // Plain ports cannot see client certificates.
                client_ca.clear();
            }
            let client_cert_optional = namespace_tokens && !client_ca.is_empty();
            let fingerprint = {
                let material = match &tls {
                    None => String::new(),
                    Some(PlannedTls::Manual { cert, key }) => {
                        meridian_contract::sha256_hex(format!("{cert}\n{key}").as_bytes())
                    }
                    Some(PlannedTls::Automatic { sans }) => format!("auto:{}", sans.join(",")),
                };
                format!(
                    "{}|{material}|{}|{client_cert_optional}",
                    transport.scheme(),
                    meridian_contract::sha256_hex(client_ca.as_bytes())
                )
            };
            let key = if port.port == 0 {
                PortKey::Ephemeral(l.name.to_lowercase(), index)
            } else {
                PortKey::Fixed(port.port)
            };
            planned.push(PlannedPort {
                key,
                listener_id: l.id.clone(),
                listener_name: l.name.clone(),
                port: port.port,
                transport,
                tls,
                client_ca,
                client_cert_optional,
                fingerprint,
                policy: PortPolicy {
                    authn,
                    authz_enabled: port.authorization_enabled,
                    engine,
                    default_namespace: port.default_namespace.as_ref().map(|n| n.to_lowercase()),
                },
            });
        }
    }
    Ok((planned, namespaces))
}

// ---------------------------------------------------------------------------------------------
// Binding and persisting

/// Writes `content` under the TLS directory, named by its hash (so files of a port still in use
/// are never overwritten), readable by the owner only.
fn write_material(dir: &Path, ext: &str, content: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(
        "{}.{ext}",
        &meridian_contract::sha256_hex(content.as_bytes())[..32]
    ));
    if !path.exists() {
        let tmp = path.with_extension(format!("{ext}.tmp"));
        std::fs::write(&tmp, content)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

async fn bind(
    shared: &Shared,
    p: &PlannedPort,
    rebind: bool,
) -> Result<meridian_net::Listener, String> {
    let at = format!("port {}", p.port);
    let dir = &shared.live.tls_dir;
    let io =
        |e: std::io::Error| format!("{at}: cannot write TLS material to {}: {e}", dir.display());
    let tls = match &p.tls {
        None => None,
        Some(t) => {
            let (cert, key) = match t {
                PlannedTls::Manual { cert, key } => (cert.clone(), key.clone()),
                PlannedTls::Automatic { sans } => {
                    let ck = rcgen::generate_simple_self_signed(sans.clone())
                        .map_err(|e| format!("{at}: cannot issue a certificate: {e}"))?;
                    (ck.cert.pem(), ck.signing_key.serialize_pem())
                }
            };
            let client_ca = if p.client_ca.is_empty() {
                None
            } else {
                Some(write_material(dir, "ca.pem", &p.client_ca).map_err(io)?)
            };
            Some(TlsFiles {
                cert: write_material(dir, "crt.pem", &cert).map_err(io)?,
                key: write_material(dir, "key.pem", &key).map_err(io)?,
                client_ca,
                client_cert_optional: p.client_cert_optional,
            })
        }
    };
    let host = &shared.cfg.snapshot_listener_host;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let path = if p.transport.is_websocket() {
        meridian_net::DEFAULT_WS_PATH
    } else {
        ""
    };
    let url = format!("{}://{host}:{}{path}", p.transport.scheme(), p.port);
    let spec = ListenerSpec::parse(&url, tls).map_err(|e| format!("{at}: {e}"))?;
    // A re-bound port was closed a moment ago: give the old accept loop time to let go.
    let attempts = if rebind { 40 } else { 1 };
    let mut last = String::new();
    for _ in 0..attempts {
        match meridian_net::Listener::bind(&spec).await {
            Ok(l) => return Ok(l),
            Err(NetError::AddrInUse { addr }) => {
                last = format!("{at} cannot be bound: address {addr} is already in use");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => return Err(format!("{at} cannot be opened: {e}")),
        }
    }
    Err(last)
}

/// Deletes TLS material files under `dir` that no open port uses.
fn prune_material(dir: &Path, keep: &std::collections::HashSet<&PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".pem") || n.ends_with(".pem.tmp"));
        if ours
            && !keep.contains(&path)
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::debug!(path = %path.display(), "cannot remove unused TLS material: {e}");
        }
    }
}

/// Atomic write: temp file, fsync, rename, fsync the directory.
fn persist(path: &Path, snap: &BrokerSnapshot) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&snap.to_json())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The handle the agent and `meridian dev` use

/// A cloneable handle on a running node for applying snapshots and reading its report. It
/// holds the node weakly: after shutdown, applies are rejected.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) shared: Weak<Shared>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle").finish_non_exhaustive()
    }
}

impl NodeHandle {
    /// Applies a snapshot (all or nothing); see [`crate::RunningBroker::apply_snapshot`].
    pub async fn apply_snapshot(&self, snapshot: BrokerSnapshot) -> Result<Applied, Rejection> {
        match self.shared.upgrade() {
            Some(shared) => apply(&shared, snapshot).await,
            None => Err(reject(snapshot.generation, "", "the node has stopped")),
        }
    }

    /// The node's current report (what the agent sends the control plane).
    pub fn report(&self) -> NodeReport {
        match self.shared.upgrade() {
            Some(shared) => report(&shared),
            None => NodeReport {
                broker_id: String::new(),
                endpoint: String::new(),
                applied_generation: 0,
                applied_digest: String::new(),
                health: NodeHealth::Degraded,
                connected_clients: 0,
                errors: vec![NodeError {
                    generation: 0,
                    resource_id: None,
                    message: "the node has stopped".into(),
                }],
            },
        }
    }

    /// The generation the node serves (0 = none).
    pub fn applied_generation(&self) -> u64 {
        self.shared
            .upgrade()
            .and_then(|s| s.live.state.read().applied.as_ref().map(|a| a.generation))
            .unwrap_or(0)
    }
}

impl SnapshotSink for NodeHandle {
    fn apply(&self, snapshot: BrokerSnapshot) -> ApplyFuture<'_> {
        Box::pin(self.apply_snapshot(snapshot))
    }

    fn report(&self) -> NodeReport {
        NodeHandle::report(self)
    }
}

pub(crate) fn report(shared: &Shared) -> NodeReport {
    let state = shared.live.state.read().clone();
    let cp = shared.cfg.control_plane.as_ref();
    let broker_id = state
        .applied
        .as_ref()
        .map(|a| a.broker_id.clone())
        .or_else(|| cp.map(|c| c.broker.clone()))
        .unwrap_or_default();
    let endpoint = cp
        .and_then(|c| c.endpoint.clone())
        .or_else(|| shared.live.admin_addr.get().map(|a| format!("http://{a}")))
        .unwrap_or_else(|| "in-process".into());
    NodeReport {
        broker_id,
        endpoint,
        applied_generation: state.applied.as_ref().map_or(0, |a| a.generation),
        applied_digest: state
            .applied
            .as_ref()
            .map(|a| a.digest.clone())
            .unwrap_or_default(),
        health: if *shared.live.degraded.lock() {
            NodeHealth::Degraded
        } else {
            NodeHealth::Healthy
        },
        connected_clients: shared.stats.connected.load(Ordering::Relaxed),
        errors: shared.live.errors.lock().iter().cloned().collect(),
    }
}
