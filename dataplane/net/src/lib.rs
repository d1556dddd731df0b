//! The only place in the data plane that owns sockets: MQTT listeners over TCP, TLS (rustls),
//! WebSocket and WSS, each yielding a plain byte stream, plus the admin HTTP endpoint
//! (`/metrics`, `/healthz`, `/readyz`).
//!
//! Module map: [`ListenerSpec::parse`] lives in `spec`, the rustls server configuration and
//! [`TlsInfo`] extraction in `tls`, the MQTT-over-WebSocket upgrade and byte adapter in [`ws`], the
//! accept loop in `listener`, and the HTTP endpoint in [`admin`].
//!
//! **Invariant:** a handshake (TLS, WebSocket upgrade) never runs on the accept loop; each runs in
//! its own task under [`HANDSHAKE_TIMEOUT`], so one slow or hostile client never delays others.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

pub mod admin;
mod listener;
mod spec;
mod tls;
pub mod ws;

pub use listener::{HANDSHAKE_TIMEOUT, Listener};
pub use spec::DEFAULT_WS_PATH;
pub use tls::server_config;

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

impl Transport {
    /// The URL scheme of this transport (`mqtt`, `mqtts`, `ws`, `wss`), for logs and metrics labels.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tcp => "mqtt",
            Transport::Tls => "mqtts",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
}

/// PEM files for a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, a client certificate must chain to one of these CAs.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: clients may also present no certificate at all (and authenticate
    /// otherwise); one they present must still chain to `client_ca`.
    pub client_cert_optional: bool,
}

/// One listener, parsed from `mqtt://host:port`, `mqtts://host:port`, `ws://host:port[/path]`,
/// `wss://host:port[/path]` (WebSocket path defaults to `/mqtt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// The HTTP path a WebSocket upgrade must use; only meaningful for `ws`/`wss`.
    pub ws_path: String,
    /// Present exactly for `mqtts`/`wss`.
    pub tls: Option<TlsFiles>,
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

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("peer", &self.peer)
            .field("transport", &self.transport)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("address {addr} is already in use")]
    AddrInUse { addr: SocketAddr },
    #[error("invalid listener {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The listener's accept loop ended; no more connections will arrive.
    #[error("listener closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl NetError {
    /// Maps a bind error, naming the address when it is taken.
    pub(crate) fn from_bind(addr: SocketAddr, e: std::io::Error) -> NetError {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            NetError::AddrInUse { addr }
        } else {
            NetError::Io(e)
        }
    }
}

/// Install the workspace's one rustls crypto provider (ring). Idempotent; call before any TLS use.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
