//! [`Listener`]: binds one [`ListenerSpec`], runs the accept loop in a background task and hands out
//! connections whose handshakes (TLS, WebSocket upgrade) completed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::{Accepted, ListenerSpec, NetError, Transport, tls, ws};

/// How long a client may take to finish the TLS handshake and/or WebSocket upgrade.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes running at once per listener. TLS handshakes cost CPU; beyond this the accept loop
/// waits, and the kernel backlog absorbs the burst.
const MAX_CONCURRENT_HANDSHAKES: usize = 1024;

/// Completed connections waiting for [`Listener::accept`].
const ACCEPTED_QUEUE: usize = 256;

/// A bound listener. Handshakes (TLS, WebSocket upgrade with subprotocol `mqtt`) run inside
/// [`Listener::accept`]'s background tasks so a slow client never blocks accepting others.
/// Dropping it stops accepting.
pub struct Listener {
    spec: ListenerSpec,
    local_addr: SocketAddr,
    incoming: mpsc::Receiver<Accepted>,
    accept_loop: JoinHandle<()>,
}

/// What every handshake task of one listener shares.
struct Handshaker {
    transport: Transport,
    ws_path: String,
    tls: Option<TlsAcceptor>,
    timeout: Duration,
}

impl Listener {
    pub async fn bind(spec: &ListenerSpec) -> Result<Listener, NetError> {
        Self::bind_with_handshake_timeout(spec, HANDSHAKE_TIMEOUT).await
    }

    /// [`Listener::bind`] with a handshake timeout other than [`HANDSHAKE_TIMEOUT`].
    pub async fn bind_with_handshake_timeout(
        spec: &ListenerSpec,
        handshake_timeout: Duration,
    ) -> Result<Listener, NetError> {
        // Build the TLS config before binding, so a bad certificate fails start-up cleanly.
        let tls = match (&spec.tls, spec.transport.is_tls()) {
            (Some(files), true) => {
                let alpn: &[&[u8]] = if spec.transport == Transport::Wss {
                    &[b"http/1.1"]
                } else {
                    &[]
                };
                Some(TlsAcceptor::from(tls::server_config(files, alpn)?))
            }
            (None, true) => {
                return Err(NetError::Tls(format!(
                    "{}://{} needs TLS certificate and key files",
                    spec.transport.scheme(),
                    spec.addr
                )));
            }
            (_, false) => None,
        };
        let tcp = TcpListener::bind(spec.addr)
            .await
            .map_err(|e| NetError::from_bind(spec.addr, e))?;
        let local_addr = tcp.local_addr()?;
        let handshaker = Arc::new(Handshaker {
            transport: spec.transport,
            ws_path: spec.ws_path.clone(),
            tls,
            timeout: handshake_timeout,
        });
        let (tx, incoming) = mpsc::channel(ACCEPTED_QUEUE);
        let accept_loop = tokio::spawn(accept_loop(tcp, handshaker, tx));
        tracing::info!(
            transport = spec.transport.scheme(),
            addr = %local_addr,
            ws_path = spec.transport.is_websocket().then_some(spec.ws_path.as_str()),
            "listening"
        );
        Ok(Listener {
            spec: spec.clone(),
            local_addr,
            incoming,
            accept_loop,
        })
    }

    /// The bound address (with the real port when the spec asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn spec(&self) -> &ListenerSpec {
        &self.spec
    }

    /// Next connection whose handshake completed. Failed handshakes are logged and skipped.
    /// Cancel-safe: usable in `tokio::select!` without losing a connection.
    pub async fn accept(&mut self) -> Result<Accepted, NetError> {
        self.incoming.recv().await.ok_or(NetError::Closed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(tcp: TcpListener, handshaker: Arc<Handshaker>, tx: mpsc::Sender<Accepted>) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if tx.is_closed() {
            break;
        }
        // MQTT packets are small and latency matters more than segment count.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "set TCP_NODELAY failed");
        }
        if handshaker.transport == Transport::Tcp {
            let accepted = Accepted {
                stream: Box::new(stream),
                peer,
                transport: Transport::Tcp,
                tls: None,
            };
            if tx.send(accepted).await.is_err() {
                break;
            }
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let handshaker = handshaker.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(handshaker.timeout, handshaker.run(stream, peer)).await {
                Ok(Ok(accepted)) => {
                    // The listener may be gone by now; the connection then just closes.
                    let _ = tx.send(accepted).await;
                }
                Ok(Err(reason)) => tracing::debug!(%peer, %reason, "handshake failed"),
                Err(_) => tracing::debug!(%peer, "handshake timed out"),
            }
        });
    }
}

impl Handshaker {
    async fn run(&self, stream: TcpStream, peer: SocketAddr) -> Result<Accepted, String> {
        let transport = self.transport;
        let accepted = |stream: Box<dyn crate::ByteStream>, tls| Accepted {
            stream,
            peer,
            transport,
            tls,
        };
        match (transport, &self.tls) {
            (Transport::Tcp, _) => Ok(accepted(Box::new(stream), None)),
            (Transport::Ws, _) => {
                let ws = ws::accept(stream, &self.ws_path)
                    .await
                    .map_err(|e| format!("websocket upgrade: {e}"))?;
                Ok(accepted(Box::new(ws), None))
            }
            (Transport::Tls | Transport::Wss, Some(acceptor)) => {
                let tls_stream = acceptor
                    .accept(stream)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                let info = tls::tls_info(tls_stream.get_ref().1);
                if transport == Transport::Tls {
                    return Ok(accepted(Box::new(tls_stream), Some(info)));
                }
                let ws = ws::accept(tls_stream, &self.ws_path)
                    .await
                    .map_err(|e| format!("websocket upgrade: {e}"))?;
                Ok(accepted(Box::new(ws), Some(info)))
            }
            (Transport::Tls | Transport::Wss, None) => Err("no TLS configuration".into()),
        }
    }
}
