//! kill -9 durability at the binary level with a real client (rumqttc, MQTT 5): with
//! `--fsync always`, every QoS 1/2 message the broker acknowledged is delivered after a crash and
//! restart, and no QoS 2 message is delivered twice.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::BrokerProcess;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

const N: u32 = 300;

fn options(id: &str, port: u16, persistent: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(!persistent);
    if persistent {
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(3600);
        o.set_connect_properties(props);
    }
    o
}

/// Subscribe with a persistent session, then go away.
async fn prepare_subscriber(port: u16) {
    let (client, mut el) = AsyncClient::new(options("durable-sub", port, true), 100);
    client.subscribe("dur/q1", QoS::AtLeastOnce).await.unwrap();
    client.subscribe("dur/q2", QoS::ExactlyOnce).await.unwrap();
    let mut subacks = 0;
    while subacks < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.expect("subscriber poll") {
            subacks += 1;
        }
    }
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while el.poll().await.is_ok() {}
    })
    .await;
}

/// Publish N messages at QoS 1 and N at QoS 2; returns how many the broker acknowledged
/// (PUBACK, PUBCOMP).
async fn publish_all(port: u16) -> (u32, u32) {
    let (client, mut el) = AsyncClient::new(options("durable-pub", port, false), 200);
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            client
                .publish("dur/q1", QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
            client
                .publish("dur/q2", QoS::ExactlyOnce, false, i.to_string())
                .await
                .unwrap();
        }
        client
    });
    let (mut acked1, mut acked2) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked1 < N || acked2 < N {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .expect("acks within 60 s");
        match ev.expect("publisher poll") {
            Event::Incoming(Packet::PubAck(_)) => acked1 += 1,
            Event::Incoming(Packet::PubComp(_)) => acked2 += 1,
            _ => {}
        }
    }
    drop(publisher.await.unwrap());
    (acked1, acked2)
}

/// Reconnect the persistent session and count deliveries per message until the broker is quiet.
async fn collect(port: u16) -> (HashMap<u32, u32>, HashMap<u32, u32>, bool) {
    let (_client, mut el) = AsyncClient::new(options("durable-sub", port, true), 100);
    let mut q1: HashMap<u32, u32> = HashMap::new();
    let mut q2: HashMap<u32, u32> = HashMap::new();
    let mut session_present = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), el.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => panic!("subscriber poll: {e}"),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => session_present = ack.session_present,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let seq: u32 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                let map = if p.topic.as_ref() == b"dur/q1" {
                    &mut q1
                } else {
                    &mut q2
                };
                *map.entry(seq).or_default() += 1;
            }
            Ok(Ok(_)) => {}
        }
    }
    (q1, q2, session_present)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_every_acknowledged_qos1_and_qos2_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--fsync", "always"]);
    let port = broker.mqtt_port;
    prepare_subscriber(port).await;
    let (acked1, acked2) = publish_all(port).await;
    assert_eq!(
        (acked1, acked2),
        (N, N),
        "broker acknowledged every publish"
    );
    broker.kill9();

    let broker = BrokerProcess::start(dir.path(), &["--fsync", "always"]);
    let (q1, q2, session_present) = collect(broker.mqtt_port).await;
    assert!(session_present, "persistent session survived kill -9");
    let lost1 = (0..N).filter(|i| !q1.contains_key(i)).count();
    let lost2 = (0..N).filter(|i| !q2.contains_key(i)).count();
    let dup2 = q2.values().filter(|&&c| c > 1).count();
    let dup1 = q1.values().filter(|&&c| c > 1).count();
    eprintln!("kill -9: QoS1 lost {lost1} dup {dup1}; QoS2 lost {lost2} dup {dup2}");
    assert_eq!(lost1, 0, "acknowledged QoS 1 messages lost");
    assert_eq!(lost2, 0, "acknowledged QoS 2 messages lost");
    assert_eq!(dup2, 0, "QoS 2 messages delivered twice");
}
