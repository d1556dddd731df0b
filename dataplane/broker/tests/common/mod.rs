//! Shared fixtures: an in-process broker on an ephemeral port and a raw MQTT client built on the
//! codec, for what rumqttc cannot express (exact reason codes, hostile sequences).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use meridian_broker::{Broker, BrokerConfig, RunningBroker, Transport};
use meridian_codec::{
    ConnAck, Connect, DecodeOptions, Packet, Properties, Protocol, PubResponse, Publish, QoS,
    Subscribe, SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(5);

/// A self-signed `localhost` certificate written to a temporary directory: the `mqtts://`
/// listener that serves it and the roots a client needs to trust it.
pub struct LocalhostTls {
    pub listener: meridian_broker::ListenerConfig,
    pub roots: rustls::RootCertStore,
    _dir: tempfile::TempDir,
}

pub fn localhost_tls() -> LocalhostTls {
    meridian_net::install_crypto_provider();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    LocalhostTls {
        listener: meridian_broker::ListenerConfig {
            url: "mqtts://127.0.0.1:0".into(),
            tls_cert: Some(cert),
            tls_key: Some(key),
            client_ca: None,
        },
        roots,
        _dir: dir,
    }
}

pub fn cfg() -> BrokerConfig {
    let mut c = BrokerConfig::ephemeral();
    c.sys_interval_secs = 0;
    c
}

pub async fn start(cfg: BrokerConfig) -> (RunningBroker, SocketAddr) {
    let b = Broker::start(cfg).await.expect("broker starts");
    let addr = b.addr(Transport::Tcp).expect("tcp listener");
    (b, addr)
}

/// A client byte stream: plain TCP or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub struct Raw {
    pub stream: Box<dyn Io>,
    pub buf: BytesMut,
    pub proto: Protocol,
}

pub fn connect_packet(id: &str, proto: Protocol) -> Connect {
    Connect {
        protocol: proto,
        clean_start: true,
        keep_alive: 30,
        client_id: id.to_string(),
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    }
}

impl Raw {
    pub async fn open(addr: SocketAddr, proto: Protocol) -> Raw {
        Raw {
            stream: Box::new(TcpStream::connect(addr).await.expect("tcp connect")),
            buf: BytesMut::new(),
            proto,
        }
    }

    /// Connect and return the CONNACK.
    pub async fn connect_with(addr: SocketAddr, c: Connect) -> (Raw, ConnAck) {
        let mut raw = Raw::open(addr, c.protocol).await;
        raw.send(Packet::Connect(Box::new(c))).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connect over TLS to `localhost` at `addr`, trusting `roots`.
    pub async fn connect_tls(
        addr: SocketAddr,
        roots: rustls::RootCertStore,
        id: &str,
        proto: Protocol,
    ) -> Raw {
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let mut raw = Raw {
            stream: Box::new(tls),
            buf: BytesMut::new(),
            proto,
        };
        raw.send(Packet::Connect(Box::new(connect_packet(id, proto))))
            .await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.reason_code.0, 0, "{a:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    pub async fn connect(addr: SocketAddr, id: &str, proto: Protocol) -> Raw {
        let (raw, ack) = Raw::connect_with(addr, connect_packet(id, proto)).await;
        assert_eq!(ack.reason_code.0, 0, "{ack:?}");
        raw
    }

    pub async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        meridian_codec::encode(&p, self.proto, &mut b).expect("encode");
        self.stream.write_all(&b).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// Next packet, or None on close/timeout.
    pub async fn recv_for(&mut self, wait: Duration) -> Option<Packet> {
        let opts = DecodeOptions {
            version: Some(self.proto),
            max_packet_size: 268_435_460,
            topic_alias_maximum: u16::MAX,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(Some(p)) = meridian_codec::decode(&mut self.buf, &opts) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_for(WAIT).await
    }

    /// Next PUBLISH, skipping other packets (acks).
    pub async fn recv_publish(&mut self) -> Option<Publish> {
        loop {
            match self.recv().await? {
                Packet::Publish(p) => return Some(p),
                _ => continue,
            }
        }
    }

    /// True when the server closes the connection (EOF) within the wait, after any packets.
    pub async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut tmp = [0u8; 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<u8> {
        self.subscribe_opts(
            filter,
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
            None,
        )
        .await
    }

    pub async fn subscribe_opts(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
    ) -> Vec<u8> {
        let properties = Properties {
            subscription_identifiers: sub_id.into_iter().collect(),
            ..Default::default()
        };
        self.send(Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter {
                filter: filter.to_string(),
                options,
            }],
            properties,
        }))
        .await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(a)) => return a.reason_codes.iter().map(|c| c.0).collect(),
                Some(_) => continue,
                None => panic!("no SUBACK for {filter}"),
            }
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, pid: u16) {
        self.send(Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.to_string(),
            packet_id: pid,
            payload: bytes::Bytes::copy_from_slice(payload),
            properties: Properties::default(),
        }))
        .await;
    }

    pub async fn puback(&mut self, pid: u16) {
        self.send(Packet::PubAck(PubResponse {
            packet_id: pid,
            ..Default::default()
        }))
        .await;
    }

    /// A full round trip proves the connection and the broker still work.
    pub async fn ping(&mut self) -> bool {
        self.send(Packet::PingReq).await;
        loop {
            match self.recv().await {
                Some(Packet::PingResp) => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    }
}

/// Subscribe with one client and publish with another; true if the message arrived.
pub async fn round_trip(addr: SocketAddr) -> bool {
    let mut sub = Raw::connect(addr, "rt-sub", Protocol::V5).await;
    sub.subscribe("rt/check", QoS::AtLeastOnce).await;
    let mut publ = Raw::connect(addr, "rt-pub", Protocol::V311).await;
    publ.publish("rt/check", b"ok", QoS::AtLeastOnce, 1).await;
    matches!(sub.recv_publish().await, Some(p) if &p.payload[..] == b"ok")
}

/// The value of a counter or gauge (without labels) on the broker's admin `/metrics`.
pub async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let mut http = TcpStream::connect(admin).await.expect("admin connect");
    http.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
}
