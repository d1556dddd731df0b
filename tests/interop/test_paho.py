"""Interop with paho-mqtt 2.x (MQTT 3.1.1 and 5.0) against the broker binary.

Run: `pytest tests/interop` (Meridian from $MERIDIAN_BIN or target/debug/meridian), or
`BROKER=mosquitto pytest tests/interop` to check the tests themselves against Mosquitto.
"""

from __future__ import annotations

import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import KIND, PROTOCOLS, Broker

V5 = mqtt.MQTTv5
both = pytest.mark.parametrize("proto", list(PROTOCOLS.values()), ids=list(PROTOCOLS))


def cid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


@both
def test_connect(broker, clients, proto):
    c = clients(broker, proto, client_id=cid("conn"))
    assert c.connack[1].value == 0
    assert not c.session_present, "clean start must not report a session"


def test_v5_empty_client_id_is_assigned(broker, clients):
    c = clients(broker, V5, client_id="")
    props = c.connack[2]
    assert getattr(props, "AssignedClientIdentifier", ""), "v5 CONNACK must assign a client id"


@both
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_pubsub_qos(broker, clients, topic, proto, qos):
    sub = clients(broker, proto, client_id=cid("sub"))
    sub.subscribe(f"{topic}/q", qos)
    pub = clients(broker, proto, client_id=cid("pub"))
    payloads = [f"m{i}".encode() for i in range(20)]
    for p in payloads:
        pub.publish(f"{topic}/q", p, qos=qos)
    got = sub.recv_n(len(payloads))
    assert [m.payload for m in got] == payloads, "every message, once, in order"
    assert all(m.qos == qos and m.topic == f"{topic}/q" for m in got)
    assert sub.drain(0.3) == [], "no duplicates"


@both
def test_qos_downgraded_to_subscription(broker, clients, topic, proto):
    sub = clients(broker, proto, client_id=cid("sub"))
    sub.subscribe(f"{topic}/d", 1)
    pub = clients(broker, proto, client_id=cid("pub"))
    pub.publish(f"{topic}/d", b"x", qos=2)
    m = sub.recv()
    assert m is not None and m.qos == 1


@both
def test_retained_set_replace_clear(broker, clients, topic, proto):
    pub = clients(broker, proto, client_id=cid("pub"))
    pub.publish(f"{topic}/r", b"first", qos=1, retain=True)
    pub.publish(f"{topic}/r", b"second", qos=1, retain=True)
    s1 = clients(broker, proto, client_id=cid("s1"))
    s1.subscribe(f"{topic}/#", 1)
    m = s1.recv()
    assert m is not None and m.payload == b"second" and m.retain, "the replaced value, flagged retained"
    assert s1.drain(0.3) == []
    # A live subscriber gets the empty clearing message; a later one gets nothing.
    pub.publish(f"{topic}/r", b"", qos=1, retain=True)
    s1.recv()
    s2 = clients(broker, proto, client_id=cid("s2"))
    s2.subscribe(f"{topic}/#", 1)
    assert s2.drain(0.7) == [], "cleared retained message must not be delivered"


@both
def test_wildcards(broker, clients, topic, proto):
    plus = clients(broker, proto, client_id=cid("plus"))
    plus.subscribe(f"{topic}/+/x", 0)
    hash_ = clients(broker, proto, client_id=cid("hash"))
    hash_.subscribe(f"{topic}/#", 0)
    pub = clients(broker, proto, client_id=cid("pub"))
    for t in [f"{topic}/a/x", f"{topic}/a/b/x", f"{topic}", f"{topic}/a"]:
        pub.publish(t, t.encode(), qos=1)
    assert sorted(m.topic for m in plus.drain(0.7)) == [f"{topic}/a/x"]
    # `#` also matches the parent level itself [MQTT-4.7.1-2].
    assert sorted(m.topic for m in hash_.drain(0.3)) == sorted(
        [f"{topic}/a/x", f"{topic}/a/b/x", f"{topic}", f"{topic}/a"]
    )


@both
def test_sys_topics_not_matched_by_leading_wildcard(broker, clients, topic, proto):
    everything = clients(broker, proto, client_id=cid("all"))
    everything.subscribe("#", 0)
    plus = clients(broker, proto, client_id=cid("plus"))
    plus.subscribe("+/broker/#", 0)
    sys_ = clients(broker, proto, client_id=cid("sys"))
    sys_.subscribe("$SYS/#", 0)
    # The broker must publish some $SYS statistics (periodically or retained).
    m = sys_.recv(15)
    assert m is not None and m.topic.startswith("$SYS/"), "no $SYS message within 15 s"
    pub = clients(broker, proto, client_id=cid("pub"))
    pub.publish(f"{topic}/visible", b"v", qos=1)
    time.sleep(2)
    seen = everything.drain(0.3)
    assert any(x.topic == f"{topic}/visible" for x in seen), "# must match ordinary topics"
    assert not [x.topic for x in seen if x.topic.startswith("$")], "# matched a $ topic"
    assert not [x.topic for x in plus.drain(0.1) if x.topic.startswith("$")], "+ matched a $ topic"


@both
def test_will_on_abrupt_close(broker, clients, topic, proto):
    watcher = clients(broker, proto, client_id=cid("watch"))
    watcher.subscribe(f"{topic}/will", 1)
    dying = clients(
        broker, proto, client_id=cid("dying"), will=(f"{topic}/will", b"gone", 1, False)
    )
    dying.drop()
    m = watcher.recv(10)
    assert m is not None and m.payload == b"gone" and m.topic == f"{topic}/will"


@both
def test_no_will_on_clean_disconnect(broker, clients, topic, proto):
    watcher = clients(broker, proto, client_id=cid("watch"))
    watcher.subscribe(f"{topic}/will", 1)
    polite = clients(
        broker, proto, client_id=cid("polite"), will=(f"{topic}/will", b"gone", 1, False)
    )
    polite.disconnect()
    assert watcher.drain(1.5) == [], "a normal DISCONNECT discards the will"


@both
def test_persistent_session_queues_qos1(broker, clients, topic, proto):
    client_id = cid("persist")
    kw = dict(client_id=client_id, clean=False, session_expiry=300)
    sub = clients(broker, proto, **kw)
    sub.subscribe(f"{topic}/p", 1)
    sub.disconnect()
    pub = clients(broker, proto, client_id=cid("pub"))
    for i in range(10):
        pub.publish(f"{topic}/p", f"{i}".encode(), qos=1)
    back = clients(broker, proto, **kw)
    assert back.session_present, "the session must survive the disconnect"
    got = back.recv_n(10)
    assert [m.payload for m in got] == [f"{i}".encode() for i in range(10)]
    assert all(m.qos == 1 for m in got)


def test_v5_session_expiry_zero_discards_session(broker, clients, topic):
    client_id = cid("noexp")
    sub = clients(broker, V5, client_id=client_id, clean=False, session_expiry=0)
    sub.subscribe(f"{topic}/p", 1)
    sub.disconnect()
    back = clients(broker, V5, client_id=client_id, clean=False, session_expiry=0)
    assert not back.session_present, "session expiry 0 ends the session at disconnect"


@both
def test_shared_subscription_one_member_per_message(broker, clients, topic, proto):
    members = [clients(broker, proto, client_id=cid(f"m{i}")) for i in range(2)]
    for m in members:
        m.subscribe(f"$share/grp/{topic}/s", 1)
    plain = clients(broker, proto, client_id=cid("plain"))
    plain.subscribe(f"{topic}/s", 1)
    pub = clients(broker, proto, client_id=cid("pub"))
    n = 40
    for i in range(n):
        pub.publish(f"{topic}/s", f"{i}".encode(), qos=1)
    time.sleep(1)
    got = [[x.payload for x in m.drain(0.5)] for m in members]
    everyone = got[0] + got[1]
    assert sorted(everyone) == sorted(f"{i}".encode() for i in range(n)), (
        f"each message to exactly one member (got {len(got[0])} + {len(got[1])})"
    )
    assert len(plain.drain(0.3)) == n, "a non-shared subscriber still gets every message"


def test_v5_properties_forwarded_unchanged(broker, clients, topic):
    sub = clients(broker, V5, client_id=cid("sub"))
    sub.subscribe(f"{topic}/props", 1)
    pub = clients(broker, V5, client_id=cid("pub"))
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v1"), ("k", "v2"), ("ünï", "cødé")]
    props.ContentType = "application/json"
    props.ResponseTopic = f"{topic}/reply"
    props.CorrelationData = b"\x00\x01corr\xff"
    props.PayloadFormatIndicator = 1
    pub.publish(f"{topic}/props", b'{"a":1}', qos=1, props=props)
    m = sub.recv()
    assert m is not None
    p = m.properties
    assert p.UserProperty == [("k", "v1"), ("k", "v2"), ("ünï", "cødé")], "order and duplicates kept"
    assert p.ContentType == "application/json"
    assert p.ResponseTopic == f"{topic}/reply"
    assert p.CorrelationData == b"\x00\x01corr\xff"
    assert p.PayloadFormatIndicator == 1


def test_v5_message_expiry(broker, clients, topic):
    client_id = cid("exp")
    kw = dict(client_id=client_id, clean=False, session_expiry=300)
    sub = clients(broker, V5, **kw)
    sub.subscribe(f"{topic}/e", 1)
    sub.disconnect()
    pub = clients(broker, V5, client_id=cid("pub"))
    short = Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval = 1
    long_ = Properties(PacketTypes.PUBLISH)
    long_.MessageExpiryInterval = 60
    pub.publish(f"{topic}/e", b"short", qos=1, props=short)
    pub.publish(f"{topic}/e", b"long", qos=1, props=long_)
    time.sleep(2.5)
    back = clients(broker, V5, **kw)
    got = back.drain(1.0)
    assert [m.payload for m in got] == [b"long"], "an expired message is never delivered"
    left = got[0].properties.MessageExpiryInterval
    assert left <= 58, f"expiry must be decremented by the time spent queued (got {left})"


def test_v5_topic_alias_from_client(broker, clients, topic):
    sub = clients(broker, V5, client_id=cid("sub"))
    sub.subscribe(f"{topic}/alias", 1)
    pub = clients(broker, V5, client_id=cid("pub"))
    maximum = getattr(pub.connack[2], "TopicAliasMaximum", 0)
    assert maximum >= 1, "broker should accept topic aliases from clients"
    first = Properties(PacketTypes.PUBLISH)
    first.TopicAlias = 1
    pub.publish(f"{topic}/alias", b"one", qos=1, props=first)
    again = Properties(PacketTypes.PUBLISH)
    again.TopicAlias = 1
    pub.publish("", b"two", qos=1, props=again)
    got = sub.recv_n(2)
    assert [(m.topic, m.payload) for m in got] == [
        (f"{topic}/alias", b"one"),
        (f"{topic}/alias", b"two"),
    ]


def test_v5_no_local(broker, clients, topic):
    me = clients(broker, V5, client_id=cid("me"))
    me.subscribe(f"{topic}/nl", 1, noLocal=True)
    me.publish(f"{topic}/nl", b"mine", qos=1)
    other = clients(broker, V5, client_id=cid("other"))
    other.publish(f"{topic}/nl", b"theirs", qos=1)
    assert [m.payload for m in me.drain(0.7)] == [b"theirs"]


def test_v5_subscription_identifiers(broker, clients, topic):
    sub = clients(broker, V5, client_id=cid("sub"))
    p7 = Properties(PacketTypes.SUBSCRIBE)
    p7.SubscriptionIdentifier = 7
    sub.subscribe(f"{topic}/si/#", 1, props=p7)
    p9 = Properties(PacketTypes.SUBSCRIBE)
    p9.SubscriptionIdentifier = 9
    sub.subscribe(f"{topic}/si/a", 1, props=p9)
    pub = clients(broker, V5, client_id=cid("pub"))
    pub.publish(f"{topic}/si/a", b"both", qos=1)
    pub.publish(f"{topic}/si/b", b"one", qos=1)
    got = sub.drain(0.7)
    ids = {}
    for m in got:
        ids.setdefault(m.payload, []).extend(getattr(m.properties, "SubscriptionIdentifier", []))
    assert sorted(ids.get(b"both", [])) == [7, 9], f"got {ids}"
    assert ids.get(b"one") == [7], f"got {ids}"


def test_v5_retain_as_published_and_handling(broker, clients, topic):
    pub = clients(broker, V5, client_id=cid("pub"))
    pub.publish(f"{topic}/rap", b"kept", qos=1, retain=True)
    never = clients(broker, V5, client_id=cid("never"))
    never.subscribe(f"{topic}/rap", 1, retainHandling=2)
    assert never.drain(0.5) == [], "retain handling 2 sends no retained messages"
    rap = clients(broker, V5, client_id=cid("rap"))
    rap.subscribe(f"{topic}/rap", 1, retainAsPublished=True)
    assert rap.recv().retain
    pub.publish(f"{topic}/rap", b"live", qos=1, retain=True)
    live = rap.recv()
    assert live.payload == b"live" and live.retain, "retain-as-published keeps the flag live"
    pub.publish(f"{topic}/rap", b"", qos=1, retain=True)


@both
def test_websocket_transport(broker, clients, topic, proto):
    sub = clients(broker, proto, client_id=cid("wssub"), transport="websockets")
    sub.subscribe(f"{topic}/ws", 1)
    pub = clients(broker, proto, client_id=cid("tcppub"))
    pub.publish(f"{topic}/ws", b"over websocket", qos=1)
    m = sub.recv()
    assert m is not None and m.payload == b"over websocket"
    wpub = clients(broker, proto, client_id=cid("wspub"), transport="websockets")
    wpub.publish(f"{topic}/ws", b"from websocket", qos=2)
    m = sub.recv()
    assert m is not None and m.payload == b"from websocket"


@both
def test_tls_transport(broker, clients, topic, proto):
    sub = clients(broker, proto, client_id=cid("tlssub"), tls=True)
    sub.subscribe(f"{topic}/tls", 2)
    pub = clients(broker, proto, client_id=cid("tlspub"), tls=True)
    pub.publish(f"{topic}/tls", b"secret", qos=2)
    m = sub.recv()
    assert m is not None and m.payload == b"secret" and m.qos == 2


def test_durability_kill9_no_loss_no_qos2_duplicates(fresh_broker_dir, clients):
    """Acknowledged QoS 1/2 messages survive kill -9 with `--fsync always`.

    Against Mosquitto (BROKER=mosquitto) the broker is stopped with SIGTERM instead, since it
    only saves its state on shutdown: that run checks the test's own bookkeeping.
    """
    n = 500
    b = Broker(fresh_broker_dir, fsync="always").start()
    try:
        client_id = cid("durable")
        kw = dict(client_id=client_id, clean=False, session_expiry=3600)
        sub = clients(b, V5, **kw)
        sub.subscribe("dur/q1", 1)
        sub.subscribe("dur/q2", 2)
        sub.disconnect()

        pub = clients(b, V5, client_id=cid("pub"))
        mids = {}
        for i in range(n):
            mids[pub.publish("dur/q1", f"q1-{i}".encode(), qos=1, wait=False).mid] = f"q1-{i}"
            mids[pub.publish("dur/q2", f"q2-{i}".encode(), qos=2, wait=False).mid] = f"q2-{i}"
        pub.wait_acked(list(mids), timeout=120)
        acked = {mids[m] for m, rc in pub.acked.items() if m in mids and not rc.is_failure}
        print(f"acknowledged: {len(acked)} of {2 * n}")
        pub.drop()

        if b.kind == "mosquitto":
            b.stop()
        else:
            b.kill9()
        b.restart()

        back = clients(b, V5, **kw)
        assert back.session_present, "the persistent session must survive the restart"
        got = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            batch = back.drain(3.0)
            got += batch
            if not batch:
                break
        payloads = [m.payload.decode() for m in got]
        received = set(payloads)
        lost = sorted(acked - received)
        dup_q2 = len([p for p in payloads if p.startswith("q2-")]) - len(
            {p for p in payloads if p.startswith("q2-")}
        )
        dup_q1 = len([p for p in payloads if p.startswith("q1-")]) - len(
            {p for p in payloads if p.startswith("q1-")}
        )
        print(
            f"broker={b.kind} acked={len(acked)} delivered={len(payloads)} lost={len(lost)} "
            f"dup_qos2={dup_q2} dup_qos1={dup_q1}"
        )
        assert len(acked) == 2 * n, "every publish must be acknowledged"
        assert lost == [], f"{len(lost)} acknowledged messages lost, e.g. {lost[:5]}"
        assert dup_q2 == 0, f"{dup_q2} QoS 2 messages delivered twice"
    finally:
        b.kill9()
