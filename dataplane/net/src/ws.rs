//! MQTT over WebSocket: the server-side upgrade (path and subprotocol checks) and [`WsStream`], an
//! adapter that turns a WebSocket's binary messages into a plain `AsyncRead + AsyncWrite` byte
//! stream for the MQTT codec.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The WebSocket subprotocol MQTT uses ([MQTT-6.0.0-3], [MQTT-6.0.0-4]).
pub const MQTT_SUBPROTOCOL: &str = "mqtt";

/// Outgoing bytes are coalesced up to this size into one binary message before a flush forces
/// them out; bounds memory per connection while keeping frame overhead low for small packets.
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
/// reads as EOF, and a text message is an error ([MQTT-6.0.0-1]). Written bytes are gathered and
/// sent as one binary message on `flush` (or when 64 KiB are pending), so callers must flush, as
/// the `AsyncWrite` contract asks.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the last binary message; `Bytes` lets us hand out slices without copying
    /// the message again.
    read_buf: Bytes,
    write_buf: BytesMut,
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
            write_buf: BytesMut::new(),
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &WebSocketStream<S> {
        &self.inner
    }

    /// Hands the pending output to the WebSocket sink as one binary message.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.inner.poll_ready_unpin(cx)).map_err(into_io)?;
        let payload = self.write_buf.split().freeze();
        self.inner
            .start_send_unpin(Message::Binary(payload))
            .map_err(into_io)?;
        Poll::Ready(Ok(()))
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
        if this.write_buf.len() >= MAX_OUTGOING_MESSAGE {
            ready!(this.poll_send_pending(cx))?;
        }
        let n = buf.len().min(MAX_OUTGOING_MESSAGE - this.write_buf.len());
        this.write_buf.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        this.inner.poll_flush_unpin(cx).map_err(into_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        match ready!(this.inner.poll_close_unpin(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(into_io(e))),
        }
    }
}
