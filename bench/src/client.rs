//! A minimal MQTT client over raw TCP built on `meridian-codec`: just enough protocol for load
//! generation (CONNECT, SUBSCRIBE, PUBLISH at QoS 0/1, PUBACK). It deliberately avoids any
//! third-party MQTT client so the bench measures brokers, not someone else's client library.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use meridian_codec::{
    Connect, DecodeOptions, Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode,
    Subscribe, SubscribeFilter, SubscriptionOptions, decode, encode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// The read side of a connection: plain TCP (the default suite) or TLS (the Event Grid scenario
/// of `meridian-bench authz`). An enum rather than a trait object, so plain TCP pays one match.
pub(crate) enum ReadHalf {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream>),
}

/// The write side of a connection (see [`ReadHalf`]).
pub(crate) enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream>),
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(h) => Pin::new(h).poll_read(cx, buf),
            ReadHalf::Tls(h) => Pin::new(h).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(h) => Pin::new(h).poll_write(cx, buf),
            WriteHalf::Tls(h) => Pin::new(h).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(h) => Pin::new(h).poll_flush(cx),
            WriteHalf::Tls(h) => Pin::new(h).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(h) => Pin::new(h).poll_shutdown(cx),
            WriteHalf::Tls(h) => Pin::new(h).poll_shutdown(cx),
        }
    }
}

/// TLS towards the broker: the connector (trusted server CA, optional client certificate) and
/// the server name sent as SNI (Event Grid clients name their namespace with it).
#[derive(Clone)]
pub(crate) struct TlsClient {
    pub(crate) connector: tokio_rustls::TlsConnector,
    pub(crate) server_name: rustls_pki_types::ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({:?})", self.server_name)
    }
}

impl TlsClient {
    /// A client trusting `server_ca` (DER) and presenting `chain` + `key` (PKCS#8 DER).
    pub(crate) fn new(
        server_ca: rustls_pki_types::CertificateDer<'static>,
        chain: Vec<rustls_pki_types::CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
        sni: &str,
    ) -> anyhow::Result<TlsClient> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_ca)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain,
            rustls_pki_types::PrivateKeyDer::Pkcs8(key_pkcs8.into()),
        )?;
        Ok(TlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: rustls_pki_types::ServerName::try_from(sni.to_owned())?,
        })
    }
}

/// Reads whole packets from one half of a connection.
pub(crate) struct PacketReader {
    half: ReadHalf,
    buf: BytesMut,
    opts: DecodeOptions,
    /// How much room to make before each read: large for streaming clients, tiny for the idle
    /// connections scenario where 10,000 readers must not cost the bench gigabytes.
    chunk: usize,
}

impl PacketReader {
    /// Next packet, or `None` when the broker closed the connection cleanly.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = decode(&mut self.buf, &self.opts).context("decoding from broker")? {
                return Ok(Some(p));
            }
            if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
                self.buf.reserve(self.chunk);
            }
            let n = self.half.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Every packet already buffered or readable with one `read`, so callers can batch their
    /// replies (one `write` of many PUBACKs instead of one per message).
    pub(crate) async fn next_batch(&mut self, out: &mut Vec<Packet>) -> anyhow::Result<bool> {
        loop {
            while let Some(p) = decode(&mut self.buf, &self.opts).context("decoding from broker")? {
                out.push(p);
            }
            if !out.is_empty() {
                return Ok(true);
            }
            if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
                self.buf.reserve(self.chunk);
            }
            let n = self.half.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(false);
            }
        }
    }
}

/// Encodes packets into a buffer and writes them out in batches.
pub(crate) struct PacketWriter {
    half: WriteHalf,
    buf: BytesMut,
    protocol: Protocol,
}

impl PacketWriter {
    /// Queue a packet; nothing is sent until [`PacketWriter::flush`].
    pub(crate) fn push(&mut self, p: &Packet) -> anyhow::Result<()> {
        encode(p, self.protocol, &mut self.buf).context("encoding")?;
        Ok(())
    }

    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.buf.is_empty() {
            self.half.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    pub(crate) async fn send(&mut self, p: &Packet) -> anyhow::Result<()> {
        self.push(p)?;
        self.flush().await
    }
}

/// Options for one client connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientOptions {
    pub(crate) client_id: String,
    pub(crate) protocol: Protocol,
    pub(crate) keep_alive: u16,
    /// Read/write buffer size (see [`PacketReader`]).
    pub(crate) buffer: usize,
    /// CONNECT username (no password), e.g. to be matched by an authorization rule.
    pub(crate) username: Option<String>,
    /// TLS instead of plain TCP.
    pub(crate) tls: Option<TlsClient>,
}

/// A connected client: the CONNACK has been received with a success code.
pub(crate) struct Client {
    pub(crate) reader: PacketReader,
    pub(crate) writer: PacketWriter,
    /// The broker's Receive Maximum (v5), or `u16::MAX` when it announced none.
    pub(crate) server_receive_maximum: u16,
}

impl Client {
    pub(crate) async fn connect(addr: &str, o: &ClientOptions) -> anyhow::Result<Client> {
        match Self::try_connect(addr, o).await? {
            Ok(c) => Ok(c),
            Err(code) => bail!("CONNACK refused: reason code {code:#04x}"),
        }
    }

    /// Like [`Client::connect`], but a refusing CONNACK is `Ok(Err(reason code))`.
    pub(crate) async fn try_connect(
        addr: &str,
        o: &ClientOptions,
    ) -> anyhow::Result<Result<Client, u8>> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (r, w) = match &o.tls {
            None => {
                let (r, w) = stream.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Some(t) => {
                let tls = tokio::time::timeout(
                    Duration::from_secs(30),
                    t.connector.connect(t.server_name.clone(), stream),
                )
                .await
                .context("timed out in the TLS handshake")?
                .context("TLS handshake")?;
                let (r, w) = tokio::io::split(tls);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        };
        let mut reader = PacketReader {
            half: r,
            buf: BytesMut::with_capacity(o.buffer),
            opts: DecodeOptions {
                version: Some(o.protocol),
                ..DecodeOptions::default()
            },
            chunk: o.buffer,
        };
        let mut writer = PacketWriter {
            half: w,
            buf: BytesMut::with_capacity(o.buffer),
            protocol: o.protocol,
        };
        let mut properties = Properties::default();
        if o.protocol == Protocol::V5 {
            // Let the broker queue as much towards us as it likes; our reader never stalls.
            properties.receive_maximum = Some(u16::MAX);
        }
        writer
            .send(&Packet::Connect(Box::new(Connect {
                protocol: o.protocol,
                clean_start: true,
                keep_alive: o.keep_alive,
                client_id: o.client_id.clone(),
                username: o.username.clone(),
                password: None,
                will: None,
                properties,
            })))
            .await?;
        let ack = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .context("timed out waiting for CONNACK")??;
        match ack {
            Some(Packet::ConnAck(a)) if !a.reason_code.is_error() => {
                let server_receive_maximum = a.properties.receive_maximum.unwrap_or(u16::MAX);
                Ok(Ok(Client {
                    reader,
                    writer,
                    server_receive_maximum,
                }))
            }
            Some(Packet::ConnAck(a)) => Ok(Err(a.reason_code.0)),
            Some(other) => bail!("expected CONNACK, got packet type {}", other.packet_type()),
            None => bail!("connection closed before CONNACK"),
        }
    }

    /// Subscribe and wait for the SUBACK; fails when the broker refuses the filter.
    pub(crate) async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let codes = self.subscribe_codes(filter, qos).await?;
        if codes.iter().any(|c| c.is_error()) {
            bail!("SUBACK refused {filter}: {codes:?}");
        }
        Ok(())
    }

    /// Subscribe and return the SUBACK's reason codes (refusals included).
    pub(crate) async fn subscribe_codes(
        &mut self,
        filter: &str,
        qos: QoS,
    ) -> anyhow::Result<Vec<ReasonCode>> {
        self.writer
            .send(&Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![SubscribeFilter {
                    filter: filter.to_string(),
                    options: SubscriptionOptions {
                        qos,
                        ..SubscriptionOptions::default()
                    },
                }],
                properties: Properties::default(),
            }))
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.reader.next())
                .await
                .context("timed out waiting for SUBACK")??
            {
                Some(Packet::SubAck(a)) => return Ok(a.reason_codes),
                Some(_) => continue,
                None => bail!("connection closed before SUBACK"),
            }
        }
    }
}

/// A PUBLISH packet for the bench topic.
pub(crate) fn publish(topic: &str, qos: QoS, packet_id: u16, payload: Bytes) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_string(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
        payload,
        properties: Properties::default(),
    })
}

/// A PUBACK for an inbound QoS 1 message.
pub(crate) fn puback(packet_id: u16) -> Packet {
    Packet::PubAck(PubResponse {
        packet_id,
        reason_code: ReasonCode::SUCCESS,
        properties: Properties::default(),
    })
}
