//! The only place in the data plane that owns sockets: MQTT listeners over TCP, TLS (rustls),
//! WebSocket and WSS, each yielding a plain byte stream, plus the admin HTTP endpoint
//! (`/metrics`, `/healthz`, `/readyz`).
//!
//! API CONTRACT (stubs; the implementation keeps these signatures, additions are fine).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::io::{AsyncRead, AsyncWrite};

/// Any accepted byte stream (TCP, TLS over TCP, MQTT-over-WebSocket binary frames, ...).
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// PEM files for a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate chaining to one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// One listener, parsed from `mqtt://host:port`, `mqtts://host:port`, `ws://host:port[/path]`,
/// `wss://host:port[/path]` (WebSocket path defaults to `/mqtt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub ws_path: String,
    pub tls: Option<TlsFiles>,
}

impl ListenerSpec {
    /// Parse a listener URL; `tls` is required for `mqtts`/`wss`.
    pub fn parse(_url: &str, _tls: Option<TlsFiles>) -> Result<ListenerSpec, NetError> {
        unimplemented!("net: ListenerSpec::parse")
    }
}

/// What the TLS layer learned about the client.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    pub sni: Option<String>,
    /// DER of the verified client certificate chain, leaf first (empty without client auth).
    pub peer_certificates: Vec<Vec<u8>>,
    /// The leaf certificate's subject common name, if any.
    pub peer_common_name: Option<String>,
}

/// An accepted connection, ready for MQTT bytes (TLS and WebSocket handshakes are done).
pub struct Accepted {
    pub stream: Box<dyn ByteStream>,
    pub peer: SocketAddr,
    pub transport: Transport,
    pub tls: Option<TlsInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("address {addr} is already in use")]
    AddrInUse { addr: SocketAddr },
    #[error("invalid listener {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A bound listener. Handshakes (TLS, WebSocket upgrade with subprotocol `mqtt`) run inside
/// [`Listener::accept`]'s background tasks so a slow client never blocks accepting others.
pub struct Listener {
    _private: (),
}

impl Listener {
    pub async fn bind(_spec: &ListenerSpec) -> Result<Listener, NetError> {
        unimplemented!("net: Listener::bind")
    }
    pub fn local_addr(&self) -> SocketAddr {
        unimplemented!("net: Listener::local_addr")
    }
    pub fn spec(&self) -> &ListenerSpec {
        unimplemented!("net: Listener::spec")
    }
    /// Next connection whose handshake completed. Failed handshakes are logged and skipped.
    pub async fn accept(&mut self) -> Result<Accepted, NetError> {
        unimplemented!("net: Listener::accept")
    }
}

/// The admin HTTP server: `/metrics` (Prometheus text from `render`), `/healthz` (always 200 while
/// the process runs), `/readyz` (200 once `ready` is true, else 503).
pub mod admin {
    use super::*;

    pub async fn bind(_addr: SocketAddr) -> Result<tokio::net::TcpListener, NetError> {
        unimplemented!("net: admin::bind")
    }

    pub async fn serve(
        _listener: tokio::net::TcpListener,
        _render: Arc<dyn Fn() -> String + Send + Sync>,
        _ready: Arc<AtomicBool>,
    ) -> Result<(), NetError> {
        unimplemented!("net: admin::serve")
    }
}

/// Install the workspace's one rustls crypto provider (ring). Idempotent; call before any TLS use.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
