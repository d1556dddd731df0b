//! A quick in-process throughput probe (not the benchmark; see bench/): one publisher, one
//! subscriber, N messages over loopback TCP, QoS 0 and QoS 1. `cargo run --release --example
//! loopback_probe -p meridian-broker -- 200000`

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use meridian_broker::{Broker, BrokerConfig, Transport};
use meridian_codec::{
    Connect, DecodeOptions, Packet, Properties, Protocol, PubResponse, Publish, QoS, Subscribe,
    SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(addr: std::net::SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut b = BytesMut::new();
    let c = Connect {
        protocol: Protocol::V5,
        clean_start: true,
        keep_alive: 60,
        client_id: id.into(),
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    };
    meridian_codec::encode(&Packet::Connect(Box::new(c)), Protocol::V5, &mut b).unwrap();
    s.write_all(&b).await.unwrap();
    let mut tmp = [0u8; 64];
    let _ = s.read(&mut tmp).await.unwrap();
    s
}

async fn run(addr: std::net::SocketAddr, n: usize, qos: QoS) {
    let mut sub = connect(addr, "probe-sub").await;
    let mut b = BytesMut::new();
    let s = Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: "probe/#".into(),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
        }],
        properties: Properties::default(),
    };
    meridian_codec::encode(&Packet::Subscribe(s), Protocol::V5, &mut b).unwrap();
    sub.write_all(&b).await.unwrap();
    let mut tmp = [0u8; 64];
    let _ = sub.read(&mut tmp).await.unwrap();

    let publ = connect(addr, "probe-pub").await;
    let (mut pr, mut pw) = publ.into_split();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let payload = Bytes::from(vec![b'x'; 64]);
        let mut b = BytesMut::new();
        for i in 0..n {
            let p = Publish {
                qos,
                topic: "probe/t".into(),
                packet_id: if qos == QoS::AtMostOnce {
                    0
                } else {
                    (i % 60000) as u16 + 1
                },
                payload: payload.clone(),
                ..Default::default()
            };
            meridian_codec::encode(&Packet::Publish(p), Protocol::V5, &mut b).unwrap();
            if b.len() > 32 * 1024 {
                pw.write_all(&b).await.unwrap();
                b.clear();
            }
            if qos != QoS::AtMostOnce && i % 500 == 499 {
                // Stay inside the broker's receive maximum: drain acks.
                tokio::task::yield_now().await;
            }
        }
        pw.write_all(&b).await.unwrap();
        pw
    });
    let acker = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(65536);
        let opts = DecodeOptions {
            version: Some(Protocol::V5),
            ..Default::default()
        };
        let mut acks = 0;
        while acks < n && qos != QoS::AtMostOnce {
            if pr.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
            while let Ok(Some(_)) = meridian_codec::decode(&mut buf, &opts) {
                acks += 1;
            }
        }
    });
    let mut buf = BytesMut::with_capacity(65536);
    let opts = DecodeOptions {
        version: Some(Protocol::V5),
        ..Default::default()
    };
    let mut got = 0;
    let mut out = BytesMut::new();
    while got < n {
        if sub.read_buf(&mut buf).await.unwrap() == 0 {
            break;
        }
        while let Ok(Some(p)) = meridian_codec::decode(&mut buf, &opts) {
            if let Packet::Publish(p) = p {
                got += 1;
                if p.qos == QoS::AtLeastOnce {
                    meridian_codec::encode(
                        &Packet::PubAck(PubResponse {
                            packet_id: p.packet_id,
                            ..Default::default()
                        }),
                        Protocol::V5,
                        &mut out,
                    )
                    .unwrap();
                }
            }
        }
        if !out.is_empty() {
            sub.write_all(&out).await.unwrap();
            out.clear();
        }
    }
    let el = t0.elapsed();
    let _ = writer.await;
    let _ = acker.await;
    println!(
        "{qos:?}: {got} messages in {el:?} = {:.0} msg/s",
        got as f64 / el.as_secs_f64()
    );
}

fn rss_kb() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `idle N`: RSS growth per idle connection (the clients live in the same process, so this
/// overstates the broker's share somewhat).
async fn idle(addr: std::net::SocketAddr, n: usize) {
    let before = rss_kb();
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(connect(addr, &format!("idle-{i}")).await);
    }
    let el = t0.elapsed();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = rss_kb();
    println!(
        "idle: {n} connections in {el:?} ({:.0}/s), RSS +{} KB = {:.2} KB per connection",
        n as f64 / el.as_secs_f64(),
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / n as f64
    );
    drop(conns);
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("idle") {
        let n: usize = std::env::args()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or(5000);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let b = Broker::start(BrokerConfig::ephemeral()).await.unwrap();
            idle(b.addr(Transport::Tcp).unwrap(), n).await;
            b.shutdown().await;
        });
        return;
    }
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cfg = BrokerConfig::ephemeral();
        cfg.limits.receive_maximum = 65535;
        let b = Broker::start(cfg).await.unwrap();
        let addr = b.addr(Transport::Tcp).unwrap();
        run(addr, n, QoS::AtMostOnce).await;
        run(addr, n, QoS::AtLeastOnce).await;
        b.shutdown().await;
    });
}
