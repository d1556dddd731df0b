//! Real third-party clients: rumqttc speaking MQTT 3.1.1 and 5.0 against an in-process broker.

mod common;

use std::time::Duration;

use common::*;
use tokio::sync::mpsc;

/// Drive a v4 event loop, forwarding received PUBLISHes (topic, payload, qos).
fn spawn_v4(mut el: rumqttc::EventLoop) -> mpsc::UnboundedReceiver<(String, Vec<u8>, u8)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec(), p.qos as u8));
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("v4 event loop ended: {e}");
                    break;
                }
            }
        }
    });
    rx
}

fn spawn_v5(mut el: rumqttc::v5::EventLoop) -> mpsc::UnboundedReceiver<(String, Vec<u8>, u8)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) = ev
            {
                let topic = String::from_utf8_lossy(&p.topic).to_string();
                let _ = tx.send((topic, p.payload.to_vec(), p.qos as u8));
            }
        }
    });
    rx
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>, u8)>) -> (String, Vec<u8>, u8) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("message in time")
        .expect("event loop alive")
}

#[tokio::test]
async fn rumqttc_v4_qos_0_1_2_round_trip_and_persistent_session() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let (b, addr) = start(cfg()).await;
    let mut so = MqttOptions::new("v4-sub", "127.0.0.1", addr.port());
    so.set_clean_session(false);
    let (sub, el) = AsyncClient::new(so.clone(), 100);
    let mut rx = spawn_v4(el);
    sub.subscribe("v4/#", QoS::ExactlyOnce).await.unwrap();
    let (publ, pel) = AsyncClient::new(MqttOptions::new("v4-pub", "127.0.0.1", addr.port()), 100);
    let _prx = spawn_v4(pel);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publ.publish(format!("v4/{i}"), qos, false, vec![i as u8])
            .await
            .unwrap();
        let (topic, payload, got) = next(&mut rx).await;
        assert_eq!(
            (topic, payload, got),
            (format!("v4/{i}"), vec![i as u8], qos as u8)
        );
    }
    // Offline: the persistent session queues QoS 1 until the client is back. (Let the QoS 2 flow
    // finish first: a fresh rumqttc state treats a resent PUBREL as an error.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    sub.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    publ.publish("v4/queued", QoS::AtLeastOnce, false, b"later".to_vec())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_sub2, el2) = AsyncClient::new(so, 100);
    let mut rx2 = spawn_v4(el2);
    let (topic, payload, _) = next(&mut rx2).await;
    assert_eq!((topic.as_str(), &payload[..]), ("v4/queued", &b"later"[..]));
    b.shutdown().await;
}

#[tokio::test]
async fn rumqttc_v5_qos_round_trip_and_last_will() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::LastWill;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let (b, addr) = start(cfg()).await;
    let (sub, el) = AsyncClient::new(MqttOptions::new("v5-sub", "127.0.0.1", addr.port()), 100);
    let mut rx = spawn_v5(el);
    sub.subscribe("v5/#", QoS::ExactlyOnce).await.unwrap();
    let mut po = MqttOptions::new("v5-pub", "127.0.0.1", addr.port());
    po.set_last_will(LastWill::new(
        "v5/will",
        "bye",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (publ, mut pel) = AsyncClient::new(po, 100);
    let driver = tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publ.publish("v5/t", qos, false, vec![qos as u8])
            .await
            .unwrap();
        let (topic, payload, got) = next(&mut rx).await;
        assert_eq!(
            (topic.as_str(), payload, got),
            ("v5/t", vec![qos as u8], qos as u8)
        );
    }
    // Killing the publisher's connection without DISCONNECT publishes its will.
    driver.abort();
    let (topic, payload, _) = next(&mut rx).await;
    assert_eq!((topic.as_str(), &payload[..]), ("v5/will", &b"bye"[..]));
    b.shutdown().await;
}

#[tokio::test]
async fn rumqttc_over_websocket_listener_reaches_tcp_subscribers() {
    use rumqttc::{AsyncClient, MqttOptions, QoS, Transport as ClientTransport};
    let mut config = cfg();
    config
        .listeners
        .push(meridian_broker::ListenerConfig::plain(
            "ws://127.0.0.1:0/mqtt",
        ));
    let (b, addr) = start(config).await;
    let ws = b.addr(meridian_broker::Transport::Ws).expect("ws listener");
    let mut sub = Raw::connect(addr, "tcp-sub", meridian_codec::Protocol::V5).await;
    sub.subscribe("ws/#", meridian_codec::QoS::AtLeastOnce)
        .await;
    let mut o = MqttOptions::new(
        "ws-pub",
        format!("ws://127.0.0.1:{}/mqtt", ws.port()),
        ws.port(),
    );
    o.set_transport(ClientTransport::Ws);
    let (c, el) = AsyncClient::new(o, 10);
    let _rx = spawn_v4(el);
    c.publish("ws/hello", QoS::AtLeastOnce, false, b"over ws".to_vec())
        .await
        .unwrap();
    let m = sub
        .recv_publish()
        .await
        .expect("message from the websocket client");
    assert_eq!(&m.payload[..], b"over ws");
    b.shutdown().await;
}
