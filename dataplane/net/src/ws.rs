//! MQTT over WebSocket: the server-side upgrade (path and subprotocol checks) and [`WsStream`], an
//! adapter that turns a WebSocket's binary messages into a plain `AsyncRead + AsyncWrite` byte
//! stream for the MQTT codec.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The WebSocket subprotocol MQTT uses ([MQTT-6.0.0-3], [MQTT-6.0.0-4]).
pub const MQTT_SUBPROTOCOL: &str = "mqtt";

/// Largest binary message one write produces; a bigger write is split across messages, which
/// MQTT over WebSocket allows (a message may carry part of a packet).
const MAX_OUTGOING_MESSAGE: usize = 64 * 1024;

/// Accepts a WebSocket upgrade on `stream` for MQTT: the request path must equal `path` (else 404)
/// and `Sec-WebSocket-Protocol` must offer `mqtt` (else 400), which the response then selects.
#[allow(
    clippy::result_large_err,
    reason = "tungstenite's Callback signature fixes the error type to an http::Response"
)]
pub(crate) async fn accept<S>(stream: S, path: &str) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            return Err(reject(
                StatusCode::NOT_FOUND,
                format!("no MQTT WebSocket endpoint at {}", req.uri().path()),
            ));
        }
        if !offers_mqtt(req) {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "[MQTT-6.0.0-3] Sec-WebSocket-Protocol must include \"mqtt\"".into(),
            ));
        }
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(MQTT_SUBPROTOCOL),
        );
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, check).await?;
    Ok(WsStream::new(ws))
}

fn offers_mqtt(req: &Request) -> bool {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == MQTT_SUBPROTOCOL)
}

fn reject(status: StatusCode, body: String) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(body));
    *resp.status_mut() = status;
    resp
}

/// A WebSocket connection seen as a byte stream.
///
/// Reading yields the payloads of binary messages back to back (a message may hold part of an MQTT
/// packet or several); pings are answered by tungstenite, a close or the end of the connection
/// reads as EOF, and a text message is an error ([MQTT-6.0.0-1]).
///
/// Writing behaves like a TCP socket: each write becomes one binary message (up to 64 KiB) that is
/// pushed to the connection at once, and while an earlier message is still stuck behind a full
/// socket, writes wait (backpressure). As with TLS streams, a caller that stops writing must
/// `flush` to be sure the last bytes left under backpressure.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the last binary message; `Bytes` lets us hand out slices without copying
    /// the message again.
    read_buf: Bytes,
    /// A sent message is still (partly) buffered in tungstenite because the socket was full.
    unflushed: bool,
    eof: bool,
}

impl<S> WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub fn new(inner: WebSocketStream<S>) -> WsStream<S> {
        WsStream {
            inner,
            read_buf: Bytes::new(),
            unflushed: false,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &WebSocketStream<S> {
        &self.inner
    }

    pub fn into_inner(self) -> WebSocketStream<S> {
        self.inner
    }
}

fn into_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, e)
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.read_buf.is_empty() {
                let n = buf.remaining().min(this.read_buf.len());
                buf.put_slice(&this.read_buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.inner.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(payload))) => this.read_buf = payload,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "[MQTT-6.0.0-1] MQTT over WebSocket must use binary messages",
                    )));
                }
                // tungstenite queues the pong itself; nothing for the byte stream.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_)))
                | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))
                | None => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(into_io(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.unflushed {
            ready!(this.inner.poll_flush_unpin(cx)).map_err(into_io)?;
            this.unflushed = false;
        }
        ready!(this.inner.poll_ready_unpin(cx)).map_err(into_io)?;
        let n = buf.len().min(MAX_OUTGOING_MESSAGE);
        this.inner
            .start_send_unpin(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(into_io)?;
        // Push it out now, as a socket write would; a full socket leaves it for the next call.
        match this.inner.poll_flush_unpin(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(into_io(e))),
            Poll::Pending => this.unflushed = true,
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.inner.poll_flush_unpin(cx)).map_err(into_io)?;
        this.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(this.inner.poll_close_unpin(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(into_io(e))),
        }
    }
}
