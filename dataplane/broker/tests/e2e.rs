//! End-to-end tests over real TCP against an in-process broker on an ephemeral port, with a raw
//! client built on the codec (exact reason codes and properties are visible).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use meridian_codec::{
    Disconnect, Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode, Subscribe,
    SubscribeFilter, SubscriptionOptions, Will,
};

fn publish(topic: &str, payload: &'static [u8], qos: QoS, pid: u16, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id: pid,
        payload: Bytes::from_static(payload),
        properties: Properties::default(),
    })
}

#[tokio::test]
async fn qos_0_1_2_flows_in_both_directions() {
    let (b, addr) = start(cfg()).await;
    let mut sub = Raw::connect(addr, "sub", Protocol::V5).await;
    assert_eq!(sub.subscribe("q/#", QoS::ExactlyOnce).await, [2]);
    let mut publ = Raw::connect(addr, "pub", Protocol::V5).await;

    publ.send(publish("q/0", b"zero", QoS::AtMostOnce, 0, false))
        .await;
    let p = sub.recv_publish().await.unwrap();
    assert_eq!((p.qos, &p.payload[..]), (QoS::AtMostOnce, &b"zero"[..]));

    publ.send(publish("q/1", b"one", QoS::AtLeastOnce, 11, false))
        .await;
    assert!(
        matches!(publ.recv().await, Some(Packet::PubAck(r)) if r.packet_id == 11 && r.reason_code.0 == 0)
    );
    let p = sub.recv_publish().await.unwrap();
    assert_eq!(p.qos, QoS::AtLeastOnce);
    sub.puback(p.packet_id).await;

    publ.send(publish("q/2", b"two", QoS::ExactlyOnce, 12, false))
        .await;
    assert!(matches!(publ.recv().await, Some(Packet::PubRec(r)) if r.packet_id == 12));
    publ.send(Packet::PubRel(PubResponse {
        packet_id: 12,
        ..Default::default()
    }))
    .await;
    assert!(
        matches!(publ.recv().await, Some(Packet::PubComp(r)) if r.packet_id == 12 && r.reason_code.0 == 0)
    );
    let p = sub.recv_publish().await.unwrap();
    assert_eq!(p.qos, QoS::ExactlyOnce);
    sub.send(Packet::PubRec(PubResponse {
        packet_id: p.packet_id,
        ..Default::default()
    }))
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::PubRel(r)) if r.packet_id == p.packet_id));
    sub.send(Packet::PubComp(PubResponse {
        packet_id: p.packet_id,
        ..Default::default()
    }))
    .await;

    // A QoS 2 retransmission (same id, DUP) before PUBREL is not delivered twice.
    publ.send(publish("q/2", b"dup", QoS::ExactlyOnce, 13, false))
        .await;
    publ.recv().await;
    let mut again = publish("q/2", b"dup", QoS::ExactlyOnce, 13, false);
    if let Packet::Publish(p) = &mut again {
        p.dup = true;
    }
    publ.send(again).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubRec(r)) if r.packet_id == 13));
    let first = sub.recv_publish().await.unwrap();
    assert_eq!(&first.payload[..], b"dup");
    assert!(
        sub.recv_for(Duration::from_millis(300)).await.is_none(),
        "QoS 2 duplicate delivered"
    );

    // QoS downgrade to the subscription's maximum.
    assert_eq!(sub.subscribe("low", QoS::AtMostOnce).await, [0]);
    publ.send(publish("low", b"x", QoS::ExactlyOnce, 14, false))
        .await;
    assert_eq!(sub.recv_publish().await.unwrap().qos, QoS::AtMostOnce);
    b.shutdown().await;
}

#[tokio::test]
async fn retained_set_replace_clear_and_retain_handling() {
    let (b, addr) = start(cfg()).await;
    let mut publ = Raw::connect(addr, "pub", Protocol::V5).await;
    publ.send(publish("r/a", b"first", QoS::AtLeastOnce, 1, true))
        .await;
    publ.recv().await;
    publ.send(publish("r/a", b"second", QoS::AtLeastOnce, 2, true))
        .await;
    publ.recv().await;
    publ.send(publish("r/b", b"bee", QoS::AtMostOnce, 0, true))
        .await;
    publ.ping().await;

    let mut s = Raw::connect(addr, "s", Protocol::V5).await;
    s.subscribe("r/+", QoS::AtLeastOnce).await;
    let mut got = vec![];
    for _ in 0..2 {
        let p = s.recv_publish().await.unwrap();
        assert!(p.retain);
        if p.qos != QoS::AtMostOnce {
            s.puback(p.packet_id).await;
        }
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    got.sort();
    assert_eq!(got, ["bee", "second"]);

    // Retain Handling 2: never; 1: only for a new subscription.
    let mut s2 = Raw::connect(addr, "s2", Protocol::V5).await;
    let opts = |rh| SubscriptionOptions {
        qos: QoS::AtMostOnce,
        retain_handling: rh,
        ..Default::default()
    };
    s2.subscribe_opts("r/a", opts(2), None).await;
    assert!(s2.recv_for(Duration::from_millis(300)).await.is_none());
    s2.subscribe_opts("r/b", opts(1), None).await;
    assert!(s2.recv_publish().await.is_some());
    s2.subscribe_opts("r/b", opts(1), None).await;
    assert!(s2.recv_for(Duration::from_millis(300)).await.is_none());

    // Clear with an empty payload; live delivery of a retained message has RETAIN 0 (no RAP).
    publ.send(publish("r/a", b"", QoS::AtLeastOnce, 3, true))
        .await;
    publ.recv().await;
    let live = s.recv_publish().await.unwrap();
    assert!(!live.retain);
    let mut s3 = Raw::connect(addr, "s3", Protocol::V5).await;
    s3.subscribe("r/a", QoS::AtMostOnce).await;
    assert!(
        s3.recv_for(Duration::from_millis(300)).await.is_none(),
        "cleared retained still sent"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn wildcards_dollar_rule_and_sys_events() {
    let (b, addr) = start(cfg()).await;
    let mut all = Raw::connect(addr, "all", Protocol::V5).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut events = Raw::connect(addr, "ev", Protocol::V5).await;
    events.subscribe("$SYS/events/+", QoS::AtMostOnce).await;
    let _c = Raw::connect(addr, "newcomer", Protocol::V311).await;
    let e = events.recv_publish().await.unwrap();
    assert_eq!(e.topic, "$SYS/events/connected");
    let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
    assert_eq!(v["client_id"], "newcomer");
    // `#` never sees `$SYS` ([MQTT-4.7.2-1]).
    assert!(all.recv_for(Duration::from_millis(300)).await.is_none());
    let mut plus = Raw::connect(addr, "plus", Protocol::V5).await;
    plus.subscribe("a/+/c", QoS::AtMostOnce).await;
    let mut p = Raw::connect(addr, "p", Protocol::V5).await;
    p.send(publish("a/b/c", b"x", QoS::AtMostOnce, 0, false))
        .await;
    assert_eq!(plus.recv_publish().await.unwrap().topic, "a/b/c");
    assert_eq!(all.recv_publish().await.unwrap().topic, "a/b/c");
    b.shutdown().await;
}

#[tokio::test]
async fn shared_subscription_one_member_each_and_redelivery_when_a_member_leaves() {
    let (b, addr) = start(cfg()).await;
    let mut m1 = Raw::connect(addr, "m1", Protocol::V5).await;
    let mut m2 = Raw::connect(addr, "m2", Protocol::V5).await;
    m1.subscribe("$share/g/job/+", QoS::AtLeastOnce).await;
    m2.subscribe("$share/g/job/+", QoS::AtLeastOnce).await;
    let mut p = Raw::connect(addr, "p", Protocol::V5).await;
    for i in 0..4u16 {
        p.send(publish("job/x", b"w", QoS::AtLeastOnce, i + 1, false))
            .await;
        p.recv().await;
    }
    let mut n1 = 0;
    while let Some(Packet::Publish(x)) = m1.recv_for(Duration::from_millis(300)).await {
        m1.puback(x.packet_id).await;
        n1 += 1;
    }
    let mut held = vec![];
    while let Some(Packet::Publish(x)) = m2.recv_for(Duration::from_millis(300)).await {
        held.push(x); // m2 never acknowledges
    }
    assert_eq!(
        n1 + held.len(),
        4,
        "each message goes to exactly one member"
    );
    assert!(n1 > 0 && !held.is_empty(), "round-robin uses both members");
    // m2 leaves with unacknowledged messages: they go to m1.
    m2.send(Packet::Disconnect(Disconnect::default())).await;
    let mut redelivered = 0;
    while let Some(Packet::Publish(x)) = m1.recv_for(Duration::from_millis(500)).await {
        m1.puback(x.packet_id).await;
        redelivered += 1;
    }
    assert_eq!(redelivered, held.len());
    b.shutdown().await;
}

#[tokio::test]
async fn no_local_subscription_ids_and_retain_as_published() {
    let (b, addr) = start(cfg()).await;
    let mut c = Raw::connect(addr, "me", Protocol::V5).await;
    let nl = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        no_local: true,
        ..Default::default()
    };
    c.subscribe_opts("nl/t", nl, Some(7)).await;
    let rap = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        retain_as_published: true,
        ..Default::default()
    };
    c.subscribe_opts("nl/#", rap, Some(9)).await;
    // Own message: only the second subscription matches (No Local), with sub id 9 and RETAIN kept.
    c.send(publish("nl/t", b"mine", QoS::AtMostOnce, 0, true))
        .await;
    let p = c.recv_publish().await.unwrap();
    assert_eq!(p.properties.subscription_identifiers, [9]);
    assert!(p.retain, "Retain As Published keeps RETAIN");
    // Someone else's: one delivery carrying both identifiers ([MQTT-3.3.5-1]).
    let mut o = Raw::connect(addr, "other", Protocol::V5).await;
    o.send(publish("nl/t", b"theirs", QoS::AtMostOnce, 0, false))
        .await;
    let p = c.recv_publish().await.unwrap();
    let mut ids = p.properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, [7, 9]);
    assert!(
        c.recv_for(Duration::from_millis(300)).await.is_none(),
        "one delivery per client"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn topic_aliases_inbound_and_outbound() {
    let (b, addr) = start(cfg()).await;
    let mut conn = connect_packet("sub", Protocol::V5);
    conn.properties.topic_alias_maximum = Some(5);
    let (mut sub, _) = Raw::connect_with(addr, conn).await;
    sub.subscribe("alias/#", QoS::AtMostOnce).await;
    let mut p = Raw::connect(addr, "p", Protocol::V5).await;
    let mut first = Publish {
        topic: "alias/long/topic".into(),
        payload: Bytes::from_static(b"1"),
        ..Default::default()
    };
    first.properties.topic_alias = Some(1);
    p.send(Packet::Publish(first)).await;
    let mut second = Publish {
        topic: String::new(),
        payload: Bytes::from_static(b"2"),
        ..Default::default()
    };
    second.properties.topic_alias = Some(1);
    p.send(Packet::Publish(second)).await;
    let a = sub.recv_publish().await.unwrap();
    let c = sub.recv_publish().await.unwrap();
    assert_eq!(
        (a.topic.as_str(), a.properties.topic_alias),
        ("alias/long/topic", Some(1))
    );
    assert_eq!(
        (c.topic.as_str(), c.properties.topic_alias, &c.payload[..]),
        ("", Some(1), &b"2"[..])
    );
    // An alias never set is a protocol error.
    let mut bad = Publish::default();
    bad.properties.topic_alias = Some(2);
    p.send(Packet::Publish(bad)).await;
    assert!(
        matches!(p.recv().await, Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::PROTOCOL_ERROR)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn message_expiry_decrements_and_expired_messages_are_not_delivered() {
    let (b, addr) = start(cfg()).await;
    let mut c = connect_packet("late", Protocol::V5);
    c.clean_start = true;
    c.properties.session_expiry_interval = Some(60);
    let (mut sub, _) = Raw::connect_with(addr, c.clone()).await;
    sub.subscribe("exp/#", QoS::AtLeastOnce).await;
    sub.send(Packet::Disconnect(Disconnect::default())).await;
    assert!(sub.closed().await);
    let mut p = Raw::connect(addr, "p", Protocol::V5).await;
    for (topic, secs) in [("exp/short", 1u32), ("exp/long", 100)] {
        let mut m = Publish {
            topic: topic.into(),
            qos: QoS::AtLeastOnce,
            packet_id: secs as u16,
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        };
        m.properties.message_expiry_interval = Some(secs);
        p.send(Packet::Publish(m)).await;
        p.recv().await;
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    c.clean_start = false;
    let (mut sub, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present);
    let m = sub.recv_publish().await.unwrap();
    assert_eq!(m.topic, "exp/long");
    let left = m.properties.message_expiry_interval.unwrap();
    assert!((97..=99).contains(&left), "expiry decremented, got {left}");
    assert!(
        sub.recv_for(Duration::from_millis(300)).await.is_none(),
        "expired message delivered"
    );
    assert!(
        b.dropped_messages()
            .iter()
            .any(|(r, n)| *r == "expired" && *n >= 1)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn will_sent_on_abnormal_close_not_on_normal_disconnect_and_delayed() {
    let (b, addr) = start(cfg()).await;
    let mut w = Raw::connect(addr, "watch", Protocol::V5).await;
    w.subscribe("will/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str, topic: &str, delay: Option<u32>| {
        let mut c = connect_packet(id, Protocol::V5);
        let properties = Properties {
            will_delay_interval: delay,
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        c.will = Some(Will {
            topic: topic.into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties,
        });
        c.properties.session_expiry_interval = Some(30);
        c
    };
    // Normal DISCONNECT: no will.
    let (mut a, _) = Raw::connect_with(addr, with_will("a", "will/a", None)).await;
    a.send(Packet::Disconnect(Disconnect::default())).await;
    assert!(w.recv_for(Duration::from_millis(400)).await.is_none());
    // DISCONNECT 0x04: will.
    let (mut c, _) = Raw::connect_with(addr, with_will("c", "will/c", None)).await;
    c.send(Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::DISCONNECT_WITH_WILL,
        ..Default::default()
    }))
    .await;
    let m = w.recv_publish().await.unwrap();
    assert_eq!((m.topic.as_str(), m.qos), ("will/c", QoS::AtLeastOnce));
    assert_eq!(m.properties.content_type.as_deref(), Some("text/plain"));
    w.puback(m.packet_id).await;
    // Dropped TCP with a 1 s will delay: arrives after the delay, not before.
    let (d, _) = Raw::connect_with(addr, with_will("d", "will/d", Some(1))).await;
    drop(d);
    assert!(
        w.recv_for(Duration::from_millis(600)).await.is_none(),
        "will sent before its delay"
    );
    let m = w.recv_publish().await.unwrap();
    assert_eq!(m.topic, "will/d");
    w.puback(m.packet_id).await;
    // Reconnecting within the delay cancels the will.
    let (e, _) = Raw::connect_with(addr, with_will("e", "will/e", Some(2))).await;
    drop(e);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = with_will("e", "will/e", Some(2));
    again.clean_start = false;
    let (_e2, _) = Raw::connect_with(addr, again).await;
    assert!(
        w.recv_for(Duration::from_millis(2500)).await.is_none(),
        "will sent despite resumption"
    );
    // The will was retained.
    let mut late = Raw::connect(addr, "late", Protocol::V5).await;
    late.subscribe("will/d", QoS::AtMostOnce).await;
    assert!(late.recv_publish().await.unwrap().retain);
    b.shutdown().await;
}

#[tokio::test]
async fn session_takeover_sends_0x8e_to_the_old_connection() {
    let (b, addr) = start(cfg()).await;
    let mut old = Raw::connect(addr, "same", Protocol::V5).await;
    let _new = Raw::connect(addr, "same", Protocol::V5).await;
    match old.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::SESSION_TAKEN_OVER),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(old.closed().await);
    b.shutdown().await;
}

#[tokio::test]
async fn persistent_session_gets_queued_messages_after_reconnect_with_dup_for_inflight() {
    let (b, addr) = start(cfg()).await;
    let mut c = connect_packet("durable", Protocol::V311);
    c.clean_start = false;
    let (mut s, ack) = Raw::connect_with(addr, c.clone()).await;
    assert!(!ack.session_present);
    s.subscribe("d/#", QoS::AtLeastOnce).await;
    let mut p = Raw::connect(addr, "p", Protocol::V311).await;
    p.publish("d/1", b"inflight", QoS::AtLeastOnce, 1).await;
    p.recv().await;
    let first = s.recv_publish().await.unwrap();
    assert!(!first.dup);
    drop(s); // never acknowledged
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.publish("d/2", b"queued", QoS::AtLeastOnce, 2).await;
    p.recv().await;
    let (mut s, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present);
    let a = s.recv_publish().await.unwrap();
    assert!(a.dup && &a.payload[..] == b"inflight" && a.packet_id == first.packet_id);
    let q = s.recv_publish().await.unwrap();
    assert!(!q.dup && &q.payload[..] == b"queued");
    b.shutdown().await;
}

#[tokio::test]
async fn restart_with_data_dir_keeps_queued_qos1_qos2_and_retained_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cfg();
    config.data_dir = Some(dir.path().to_path_buf());
    let (b, addr) = start(config.clone()).await;
    let mut c = connect_packet("keeper", Protocol::V5);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(3600);
    let (mut s, _) = Raw::connect_with(addr, c.clone()).await;
    s.subscribe("k/1", QoS::AtLeastOnce).await;
    s.subscribe("k/2", QoS::ExactlyOnce).await;
    s.send(Packet::Disconnect(Disconnect::default())).await;
    assert!(s.closed().await);
    let mut p = Raw::connect(addr, "p", Protocol::V5).await;
    const N: u16 = 50;
    for i in 1..=N {
        let qos = if i % 2 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        let topic = if i % 2 == 0 { "k/2" } else { "k/1" };
        let payload = Bytes::from(i.to_string());
        p.send(Packet::Publish(Publish {
            qos,
            topic: topic.into(),
            packet_id: i,
            payload,
            ..Default::default()
        }))
        .await;
        match p.recv().await {
            Some(Packet::PubAck(_)) => {}
            Some(Packet::PubRec(_)) => {
                p.send(Packet::PubRel(PubResponse {
                    packet_id: i,
                    ..Default::default()
                }))
                .await;
                assert!(matches!(p.recv().await, Some(Packet::PubComp(_))));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    p.send(publish("k/retained", b"kept", QoS::AtLeastOnce, 999, true))
        .await;
    p.recv().await;
    b.shutdown().await;

    let (b, addr) = start(config).await;
    let (mut s, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present, "session survived the restart");
    let mut seen = std::collections::HashMap::<String, u32>::new();
    while let Some(pk) = s.recv_for(Duration::from_millis(800)).await {
        if let Packet::Publish(m) = pk {
            *seen
                .entry(String::from_utf8(m.payload.to_vec()).unwrap())
                .or_default() += 1;
            match m.qos {
                QoS::AtLeastOnce => s.puback(m.packet_id).await,
                QoS::ExactlyOnce => {
                    s.send(Packet::PubRec(PubResponse {
                        packet_id: m.packet_id,
                        ..Default::default()
                    }))
                    .await
                }
                QoS::AtMostOnce => {}
            }
        } else if let Packet::PubRel(r) = pk {
            s.send(Packet::PubComp(PubResponse {
                packet_id: r.packet_id,
                ..Default::default()
            }))
            .await;
        }
    }
    let lost: Vec<u16> = (1..=N)
        .filter(|i| !seen.contains_key(&i.to_string()))
        .collect();
    let duplicated: Vec<&String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(lost.is_empty(), "lost after restart: {lost:?}");
    assert!(
        duplicated.is_empty(),
        "duplicated after restart: {duplicated:?}"
    );
    let mut r = Raw::connect(addr, "r", Protocol::V5).await;
    r.subscribe("k/retained", QoS::AtMostOnce).await;
    assert_eq!(&r.recv_publish().await.unwrap().payload[..], b"kept");
    b.shutdown().await;
}

#[tokio::test]
async fn keepalive_timeout_disconnects_with_0x8d_after_one_and_a_half_intervals() {
    let (b, addr) = start(cfg()).await;
    let mut c = connect_packet("sleepy", Protocol::V5);
    c.keep_alive = 1;
    let (mut s, _) = Raw::connect_with(addr, c).await;
    let t0 = std::time::Instant::now();
    match s.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn connack_properties_server_keep_alive_assigned_id_and_response_information() {
    let mut config = cfg();
    config.limits.server_keep_alive_max = 20;
    let (b, addr) = start(config).await;
    let mut c = connect_packet("", Protocol::V5);
    c.keep_alive = 300;
    c.properties.request_response_information = Some(1);
    let (_s, ack) = Raw::connect_with(addr, c).await;
    let p = &ack.properties;
    assert_eq!(p.server_keep_alive, Some(20));
    assert!(
        p.assigned_client_identifier
            .as_deref()
            .is_some_and(|id| !id.is_empty())
    );
    assert!(p.response_information.is_some());
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert_eq!(p.maximum_packet_size, Some(1_048_576));
    // MQTT 3.1.1: empty id with clean session 0 → return code 2 ([MQTT-3.1.3-8]).
    let mut v3 = connect_packet("", Protocol::V311);
    v3.clean_start = false;
    let (_r, ack) = Raw::connect_with(addr, v3).await;
    assert_eq!(ack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    b.shutdown().await;
}

#[tokio::test]
async fn client_maximum_packet_size_drops_and_counts_large_messages() {
    let (b, addr) = start(cfg()).await;
    let mut c = connect_packet("small", Protocol::V5);
    c.properties.maximum_packet_size = Some(64);
    let (mut s, _) = Raw::connect_with(addr, c).await;
    s.subscribe("big/#", QoS::AtLeastOnce).await;
    let mut p = Raw::connect(addr, "p", Protocol::V5).await;
    p.send(publish("big/x", &[b'x'; 200], QoS::AtLeastOnce, 1, false))
        .await;
    p.recv().await;
    p.send(publish("big/y", b"small", QoS::AtLeastOnce, 2, false))
        .await;
    p.recv().await;
    let m = s.recv_publish().await.unwrap();
    assert_eq!(
        m.topic, "big/y",
        "the oversized message is dropped for this client"
    );
    assert!(
        b.dropped_messages()
            .iter()
            .any(|(r, n)| *r == "packet_too_large" && *n == 1)
    );
    assert!(
        b.render_metrics()
            .contains("meridian_messages_dropped_total")
    );
    b.shutdown().await;
}

#[tokio::test]
async fn exceeding_our_receive_maximum_gets_disconnect_0x93() {
    let mut config = cfg();
    config.limits.receive_maximum = 2;
    let (b, addr) = start(config).await;
    let mut p = Raw::connect(addr, "greedy", Protocol::V5).await;
    for pid in 1..=3u16 {
        // QoS 2 without PUBREL keeps each one unacknowledged.
        p.send(publish("rm", b"x", QoS::ExactlyOnce, pid, false))
            .await;
    }
    let mut got = None;
    while let Some(pk) = p.recv().await {
        if let Packet::Disconnect(d) = pk {
            got = Some(d.reason_code);
            break;
        }
    }
    assert_eq!(got, Some(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
    assert!(round_trip(addr).await);
    b.shutdown().await;
}

#[tokio::test]
async fn acl_file_denies_publish_and_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "deny subscribe secret/#\nallow subscribe #\nallow publish open/#\nallow publish rt/#\n",
    )
    .unwrap();
    let mut config = cfg();
    config.acl_file = Some(acl);
    let (b, addr) = start(config).await;
    let mut c = Raw::connect(addr, "c", Protocol::V5).await;
    assert_eq!(c.subscribe("secret/x", QoS::AtLeastOnce).await, [0x87]);
    assert_eq!(c.subscribe("open/#", QoS::AtLeastOnce).await, [1]);
    c.send(publish("closed/t", b"x", QoS::AtLeastOnce, 5, false))
        .await;
    assert!(
        matches!(c.recv().await, Some(Packet::PubAck(r)) if r.reason_code == ReasonCode::NOT_AUTHORIZED)
    );
    c.send(publish("open/t", b"x", QoS::AtLeastOnce, 6, false))
        .await;
    assert!(c.recv_publish().await.is_some());
    b.shutdown().await;
}

/// Refusals carry a reason string naming the topic or filters, unless the client sent Request
/// Problem Information = 0 ([MQTT-3.1.2-29]: then none on PUBACK/SUBACK).
#[tokio::test]
async fn refusals_say_why_unless_the_client_requested_no_problem_information() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "deny subscribe secret/#\nallow subscribe #\nallow publish open/#\n",
    )
    .unwrap();
    let mut config = cfg();
    config.acl_file = Some(acl);
    let (b, addr) = start(config).await;
    for (rpi, expect_reason) in [(None, true), (Some(1), true), (Some(0), false)] {
        let mut cp = connect_packet("rpi", Protocol::V5);
        cp.properties.request_problem_information = rpi;
        let (mut c, ack) = Raw::connect_with(addr, cp).await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
        c.send(Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: ["open/#", "secret/a", "secret/b"]
                .iter()
                .map(|f| SubscribeFilter {
                    filter: (*f).to_string(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                })
                .collect(),
            properties: Properties::default(),
        }))
        .await;
        match c.recv().await {
            Some(Packet::SubAck(s)) => {
                assert_eq!(
                    s.reason_codes.iter().map(|r| r.0).collect::<Vec<_>>(),
                    [1, 0x87, 0x87]
                );
                let why = s.properties.reason_string;
                if expect_reason {
                    assert_eq!(
                        why.as_deref(),
                        Some("refused filters: secret/a, secret/b"),
                        "rpi {rpi:?}"
                    );
                } else {
                    assert_eq!(why, None, "rpi 0: no reason string on SUBACK");
                }
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
        c.send(publish("closed/t", b"x", QoS::AtLeastOnce, 5, false))
            .await;
        match c.recv().await {
            Some(Packet::PubAck(r)) => {
                assert_eq!(r.reason_code, ReasonCode::NOT_AUTHORIZED);
                let why = r.properties.reason_string;
                if expect_reason {
                    assert_eq!(
                        why.as_deref(),
                        Some("not authorized to publish to 'closed/t'")
                    );
                } else {
                    assert_eq!(why, None, "rpi 0: no reason string on PUBACK");
                }
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    b.shutdown().await;
}

#[tokio::test]
async fn password_file_authenticates_and_refuses() {
    use argon2::PasswordHasher;
    let salt = argon2::password_hash::SaltString::from_b64("c2FsdHNhbHRzYWx0c2FsdA").unwrap();
    let hash = argon2::Argon2::default()
        .hash_password(b"pw", &salt)
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::write(&file, format!("alice:{hash}\n")).unwrap();
    let mut config = cfg();
    config.password_file = Some(file);
    config.allow_anonymous = false;
    let (b, addr) = start(config).await;
    let with = |user: Option<&str>, pw: &str, proto| {
        let mut c = connect_packet("x", proto);
        c.username = user.map(str::to_string);
        c.password = Some(Bytes::copy_from_slice(pw.as_bytes()));
        c
    };
    let (_ok, ack) = Raw::connect_with(addr, with(Some("alice"), "pw", Protocol::V5)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let (_bad, ack) = Raw::connect_with(addr, with(Some("alice"), "nope", Protocol::V5)).await;
    assert_eq!(ack.reason_code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    let mut anon = connect_packet("y", Protocol::V5);
    anon.password = None;
    let (_a, ack) = Raw::connect_with(addr, anon).await;
    assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED);
    let (_v3, ack) = Raw::connect_with(addr, with(Some("alice"), "nope", Protocol::V311)).await;
    assert!(ack.reason_code.is_error() || ack.reason_code.0 == 4);
    b.shutdown().await;
}

#[tokio::test]
async fn limits_connections_topic_subscriptions_and_rate() {
    let mut config = cfg();
    config.limits.max_connections = 2;
    config.limits.max_topic_levels = 3;
    config.limits.max_topic_length = 20;
    config.limits.max_subscriptions_per_client = 1;
    config.limits.max_message_rate = 5;
    let (b, addr) = start(config).await;
    let mut a = Raw::connect(addr, "a", Protocol::V5).await;
    let mut b2 = Raw::connect(addr, "b", Protocol::V5).await;
    let (_c, ack) = Raw::connect_with(addr, connect_packet("c", Protocol::V5)).await;
    assert_eq!(ack.reason_code, ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(a.subscribe("a/b/c/d", QoS::AtMostOnce).await, [0x8F]);
    assert_eq!(a.subscribe("ok", QoS::AtMostOnce).await, [0]);
    assert_eq!(a.subscribe("second", QoS::AtMostOnce).await, [0x97]);
    a.send(publish("x/y/z/w", b"", QoS::AtMostOnce, 0, false))
        .await;
    assert!(
        matches!(a.recv().await, Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::TOPIC_NAME_INVALID)
    );
    for _ in 0..10 {
        b2.send(publish("t", b"", QoS::AtMostOnce, 0, false)).await;
    }
    assert!(
        matches!(b2.recv().await, Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::MESSAGE_RATE_TOO_HIGH)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn taken_port_names_the_flag_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut config = cfg();
    config.listeners = vec![meridian_broker::ListenerConfig::plain(format!(
        "mqtt://127.0.0.1:{port}"
    ))];
    let err = meridian_broker::Broker::start(config)
        .await
        .err()
        .expect("bind fails");
    assert_eq!(
        err.to_string(),
        format!("cannot listen on 127.0.0.1:{port}: address already in use (change --listen)")
    );
    let mut config = cfg();
    config.admin = Some(taken.local_addr().unwrap());
    let err = meridian_broker::Broker::start(config)
        .await
        .err()
        .expect("bind fails");
    assert!(err.to_string().ends_with("(change --admin)"), "{err}");
}

#[tokio::test]
async fn sys_statistics_are_published_and_metrics_served() {
    let mut config = cfg();
    config.sys_interval_secs = 1;
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let (b, addr) = start(config).await;
    let mut s = Raw::connect(addr, "stats", Protocol::V5).await;
    s.subscribe("$SYS/broker/clients/connected", QoS::AtMostOnce)
        .await;
    let m = s.recv_publish().await.unwrap();
    assert_eq!(&m.payload[..], b"1");
    let admin = b.admin_addr().unwrap();
    let mut http = tokio::net::TcpStream::connect(admin).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    http.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).await.unwrap();
    assert!(body.contains("meridian_clients_connected 1"), "{body}");
    b.shutdown().await;
}

#[tokio::test]
async fn slow_subscriber_pauses_the_publisher_instead_of_dropping() {
    let mut config = cfg();
    config.limits.max_queued_messages = 4; // high-water mark 2
    let (b, addr) = start(config).await;
    let mut c = connect_packet("slow", Protocol::V5);
    c.properties.receive_maximum = Some(1);
    let (mut sub, _) = Raw::connect_with(addr, c).await;
    sub.subscribe("bp", QoS::AtLeastOnce).await;
    let mut p = Raw::connect(addr, "fast", Protocol::V5).await;
    let mut burst = bytes::BytesMut::new();
    for pid in 1..=6u16 {
        meridian_codec::encode(
            &publish("bp", b"m", QoS::AtLeastOnce, pid, false),
            Protocol::V5,
            &mut burst,
        )
        .unwrap();
    }
    p.send_raw(&burst).await;
    let mut acks = 0;
    while let Some(Packet::PubAck(_)) = p.recv_for(Duration::from_millis(400)).await {
        acks += 1;
    }
    assert_eq!(
        acks, 3,
        "the publisher is paused once the subscriber's queue reaches the mark"
    );
    // The subscriber catches up: everything arrives, nothing is dropped.
    let mut received = 0;
    while received < 6 {
        let Some(m) = sub.recv_publish().await else {
            panic!("only {received} arrived; drops {:?}", b.dropped_messages());
        };
        received += 1;
        sub.puback(m.packet_id).await;
    }
    while let Some(Packet::PubAck(_)) = p.recv_for(Duration::from_millis(400)).await {
        acks += 1;
    }
    assert_eq!(acks, 6);
    assert!(
        b.dropped_messages().iter().all(|(_, n)| *n == 0),
        "{:?}",
        b.dropped_messages()
    );
    b.shutdown().await;
}

#[tokio::test]
async fn mqtts_listener_serves_mqtt_over_tls() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls_fixture = localhost_tls();
    let mut config = cfg();
    config.listeners = vec![tls_fixture.listener.clone()];
    let b = meridian_broker::Broker::start(config).await.unwrap();
    let addr = b
        .addr(meridian_broker::Transport::Tls)
        .expect("tls listener");
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(tls_fixture.roots.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let mut out = bytes::BytesMut::new();
    let c = connect_packet("tls-client", Protocol::V5);
    meridian_codec::encode(&Packet::Connect(Box::new(c)), Protocol::V5, &mut out).unwrap();
    meridian_codec::encode(&Packet::PingReq, Protocol::V5, &mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let opts = meridian_codec::DecodeOptions {
        version: Some(Protocol::V5),
        ..Default::default()
    };
    let mut got = vec![];
    while got.len() < 2 {
        if let Ok(Some(p)) = meridian_codec::decode(&mut buf, &opts) {
            got.push(p);
            continue;
        }
        let n = tokio::time::timeout(WAIT, tls.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early");
    }
    assert!(matches!(&got[0], Packet::ConnAck(a) if a.reason_code.0 == 0));
    assert_eq!(got[1], Packet::PingResp);
    b.shutdown().await;
}

/// A message to an idle subscriber is written by the publisher's task (counted in
/// `meridian_writes_through_total`), over TCP and TLS alike; a fan-out wider than the write-through
/// bound wakes each subscriber instead. Either way every subscriber gets every message, in order.
#[tokio::test]
async fn lone_messages_are_written_through_and_a_wide_fan_out_wakes_subscribers() {
    let tls_fixture = localhost_tls();
    let mut config = cfg();
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    config.listeners.push(tls_fixture.listener.clone());
    let (b, addr) = start(config).await;
    let tls_addr = b.addr(meridian_broker::Transport::Tls).unwrap();
    let admin = b.admin_addr().unwrap();
    let roots = tls_fixture.roots.clone();

    let mut tcp_sub = Raw::connect(addr, "wt-tcp", Protocol::V5).await;
    tcp_sub.subscribe("wt/tcp", QoS::AtLeastOnce).await;
    let mut tls_sub = Raw::connect_tls(tls_addr, roots.clone(), "wt-tls", Protocol::V5).await;
    tls_sub.subscribe("wt/tls", QoS::AtLeastOnce).await;
    let mut fan = Vec::new();
    for i in 0..8 {
        let mut s = Raw::connect(addr, &format!("wt-fan-{i}"), Protocol::V311).await;
        s.subscribe("wt/fan", QoS::AtMostOnce).await;
        fan.push(s);
    }
    let mut publ = Raw::connect_tls(tls_addr, roots, "wt-pub", Protocol::V5).await;

    let before = metric(admin, "meridian_writes_through_total").await;
    const LONE: u16 = 5;
    for pid in 1..=LONE {
        for (topic, sub) in [("wt/tcp", &mut tcp_sub), ("wt/tls", &mut tls_sub)] {
            let body = format!("{topic} {pid}");
            publ.publish(topic, body.as_bytes(), QoS::AtLeastOnce, pid)
                .await;
            let m = sub.recv_publish().await.expect("delivered");
            assert_eq!(m.payload, body.as_bytes());
            sub.puback(m.packet_id).await;
            assert!(sub.ping().await);
            loop {
                match publ.recv().await {
                    Some(Packet::PubAck(a)) if a.packet_id == pid => break,
                    Some(_) => continue,
                    None => panic!("no PUBACK {pid} on {topic}"),
                }
            }
        }
    }
    let lone = metric(admin, "meridian_writes_through_total").await - before;
    // Each of these deliveries found its subscriber idle; allow one that met it mid-poll.
    assert!(
        lone >= f64::from(2 * LONE - 1) && lone <= f64::from(2 * LONE),
        "{lone} of {} lone deliveries written through",
        2 * LONE
    );

    // PUBLISHes and a DISCONNECT in one read: the loop ends mid-batch, the messages still go.
    let mut last = Raw::connect(addr, "wt-last", Protocol::V311).await;
    let mut batch = bytes::BytesMut::new();
    const LAST: [&[u8]; 3] = [b"0", b"1", b"2"];
    for body in LAST {
        meridian_codec::encode(
            &publish("wt/tcp", body, QoS::AtMostOnce, 0, false),
            Protocol::V311,
            &mut batch,
        )
        .unwrap();
    }
    meridian_codec::encode(
        &Packet::Disconnect(Disconnect::default()),
        Protocol::V311,
        &mut batch,
    )
    .unwrap();
    last.send_raw(&batch).await;
    for body in LAST {
        let m = tcp_sub
            .recv_publish()
            .await
            .expect("delivered before the DISCONNECT");
        assert_eq!(&m.payload[..], body);
    }

    let before = metric(admin, "meridian_writes_through_total").await;
    for n in 0..3u8 {
        publ.publish("wt/fan", &[n], QoS::AtMostOnce, 0).await;
        assert!(publ.ping().await);
    }
    for s in &mut fan {
        for n in 0..3u8 {
            let m = s.recv_publish().await.expect("fan-out delivered");
            assert_eq!(&m.payload[..], &[n]);
        }
    }
    assert_eq!(
        metric(admin, "meridian_writes_through_total").await,
        before,
        "a fan-out to 8 subscribers wakes them, it does not write through"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn shutdown_disconnects_idle_and_busy_clients_with_0x8b_and_completes() {
    let (broker, addr) = start(cfg()).await;
    // Idle clients (v5 gets DISCONNECT 0x8B; v3.1.1 a plain close) and one with a subscription.
    let mut idle_v5 = Raw::connect(addr, "idle5", Protocol::V5).await;
    let mut idle_v3 = Raw::connect(addr, "idle3", Protocol::V311).await;
    let mut sub = Raw::connect(addr, "sub5", Protocol::V5).await;
    sub.subscribe("t/#", QoS::AtLeastOnce).await;
    let stop = tokio::spawn(broker.shutdown());
    for c in [&mut idle_v5, &mut sub] {
        match c.recv_for(Duration::from_secs(3)).await {
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, ReasonCode::SERVER_SHUTTING_DOWN)
            }
            other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
        }
        assert!(c.closed().await, "closed after DISCONNECT");
    }
    assert!(idle_v3.closed().await, "3.1.1 client closed");
    tokio::time::timeout(Duration::from_secs(6), stop)
        .await
        .expect("shutdown completes")
        .unwrap();
}
