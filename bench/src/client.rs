//! A minimal MQTT client over raw TCP built on `meridian-codec`: just enough protocol for load
//! generation (CONNECT, SUBSCRIBE, PUBLISH at QoS 0/1, PUBACK). It deliberately avoids any
//! third-party MQTT client so the bench measures brokers, not someone else's client library.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use meridian_codec::{
    Connect, DecodeOptions, Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode,
    Subscribe, SubscribeFilter, SubscriptionOptions, decode, encode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Reads whole packets from one half of a connection.
pub(crate) struct PacketReader {
    half: OwnedReadHalf,
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
    half: OwnedWriteHalf,
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
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
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
                username: None,
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
                Ok(Client {
                    reader,
                    writer,
                    server_receive_maximum,
                })
            }
            Some(Packet::ConnAck(a)) => bail!("CONNACK refused: {:?}", a.reason_code),
            Some(other) => bail!("expected CONNACK, got packet type {}", other.packet_type()),
            None => bail!("connection closed before CONNACK"),
        }
    }

    /// Subscribe and wait for the SUBACK; fails when the broker refuses the filter.
    pub(crate) async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
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
                Some(Packet::SubAck(a)) => {
                    if a.reason_codes.iter().any(|c| c.is_error()) {
                        bail!("SUBACK refused {filter}: {:?}", a.reason_codes);
                    }
                    return Ok(());
                }
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
