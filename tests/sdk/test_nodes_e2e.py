"""Control plane → broker nodes, end to end with real processes: `meridian api` on Postgres (the
suite's throwaway cluster, a database of its own; SQLite with SDK_STORE=sqlite) and two
`meridian broker` nodes registered to it with `--control-plane`, one binding its snapshot listeners
on 127.0.0.1 and the other on 127.0.0.2 (so both can open the same listener port on one machine).
Resources are PUT over the ARM REST API; what the nodes do is observed with paho-mqtt (MQTT 5)
clients and the async operations' status.

The tests share one cluster and run in file order: each leaves the control plane running and
both nodes serving, and builds on the resources the earlier ones created (the listener of
test a serves the MQTT round trips of the later ones)."""

import re
import time

import pytest

from cluster import (Api, Arm, IotBroker, Mqtt, Node, connects, create_database, free_port, round_trip,
                     wait_until)
from conftest import _binary

SUB = "00000000-0000-0000-0000-0000000000e2"
HOSTS = {"n1": "127.0.0.1", "n2": "127.0.0.2"}
# Refused PUBLISH / SUBSCRIBE (MQTT 5 reason code "Not authorized").
NOT_AUTHORIZED = 0x87


class Cluster:
    def __init__(self, api: Api, arm: Arm, aio: IotBroker, nodes: dict):
        self.api = api
        self.arm = arm
        self.aio = aio
        self.nodes = nodes
        self.main_port = None  # the listener port of test a, served by both nodes

    def healthy_nodes(self):
        return {n["nodeId"] for n in self.arm.nodes(self.aio.broker) if n["state"] == "Healthy"}

    def wait_registered(self, timeout=60):
        wait_until("both nodes to be registered and Healthy",
                   lambda: self.healthy_nodes() == set(self.nodes), timeout=timeout)

    def ensure_api(self):
        if not self.api.running():
            self.api.start()
        for n in self.nodes.values():
            if not n.running():
                n.start()


@pytest.fixture(scope="module")
def cluster(database_url):
    binary = _binary()
    db = create_database(database_url, "meridian_nodes_e2e") if database_url else None
    api = Api(binary, database_url=db, report_interval="1s").start()
    nodes = {}
    try:
        arm = Arm(api, api.token(f"/subscriptions/{SUB}"))
        aio = IotBroker(SUB)
        aio.create(arm)
        # Registering needs Contributor on the broker's scope (a node receives its credentials).
        node_token = api.token(f"/subscriptions/{SUB}/resourceGroups/rg-nodes", role="Contributor", subject="nodes")
        for name, host in HOSTS.items():
            nodes[name] = Node(binary, name, host, api, aio.broker, node_token).start()
        c = Cluster(api, arm, aio, nodes)
        c.wait_registered()
        yield c
    finally:
        for n in nodes.values():
            n.cleanup()
        api.cleanup()


def node_logs(c: Cluster) -> str:
    return "\n".join(f"--- node {n.name} ---\n{n.log()}" for n in c.nodes.values())


def serves_on_both(c: Cluster, port: int, topic: str):
    for name, host in HOSTS.items():
        try:
            round_trip(host, port, topic, client_id=f"rt-{name}")
        except Exception as e:
            raise AssertionError(f"node {name} ({host}:{port}): {e}\n{node_logs(c)}") from e


def assert_rejected_by_a_node(op: dict, rid: str, reason: str):
    assert op["status"] == "Failed", op
    error = op["error"]
    assert error["code"] == "ConfigurationRejected", error
    assert error["target"].lower() == rid.lower(), error
    assert re.search(r"Broker node 'n[12]' rejected the configuration: ", error["message"]), error
    assert reason in error["message"], error


# ---------------------------------------------------------------------------------------------
# a. a listener port opens on both nodes, then the resource is Succeeded


def test_a_listener_port_opens_on_both_nodes_and_provisioning_succeeds(cluster):
    c = cluster
    port = free_port(*HOSTS.values())
    for host in HOSTS.values():
        assert not connects(host, port), f"{host}:{port} serves MQTT before the listener exists"
    rid = c.aio.listener("main")
    response = c.arm.put(rid, c.aio.listener_body(port))
    assert response.status_code == 201, response.text
    # (The answer may already be terminal: the engine holds it up to 200 ms for provisioning.)
    op = c.arm.operation(response)
    assert op["status"] == "Succeeded", op
    assert c.arm.provisioning_state(rid) == "Succeeded"
    # Succeeded means applied by every live node: no waiting here.
    serves_on_both(c, port, "e2e/a")
    views = {n["nodeId"]: n for n in c.arm.nodes(c.aio.broker)}
    assert set(views) == {"n1", "n2"}
    generations = {v["report"]["appliedGeneration"] for v in views.values()}
    assert len(generations) == 1 and generations.pop() > 0, views
    c.main_port = port


# ---------------------------------------------------------------------------------------------
# b. certificates a node cannot use: Failed with the node's reason; the nodes keep serving


def test_b_listener_with_a_certificate_the_node_cannot_load_fails_with_the_nodes_reason(cluster):
    c = cluster
    assert c.main_port, "needs test a"
    port = free_port(*HOSTS.values())
    rid = c.aio.listener("badtls")
    # An IoT Operations listener names its certificate by secret (`tls.manual.secretRef`); the
    # resource carries no PEM, the control plane has no secret store (docs/contract.md), so the
    # node cannot load it: it must refuse the snapshot, not open the port without TLS.
    op = c.arm.put_and_wait(rid, c.aio.listener_body(
        {"port": port, "tls": {"mode": "Manual", "manual": {"secretRef": "no-such-secret"}}}))
    assert_rejected_by_a_node(op, rid, 'the certificate secret "no-such-secret" is not available on this node')
    assert c.arm.provisioning_state(rid) == "Failed"
    for host in HOSTS.values():
        assert not connects(host, port), f"{host}:{port} opened although the snapshot was rejected"
    serves_on_both(c, c.main_port, "e2e/b1")  # the previous snapshot still serves
    c.arm.delete(rid)
    # With the broken listener gone, changes go through again.
    op = c.arm.put_and_wait(c.aio.listener("after-badtls"), c.aio.listener_body(0))
    assert op["status"] == "Succeeded", op


def test_b_a_pem_certificate_that_does_not_parse_fails_with_the_nodes_reason(cluster):
    c = cluster
    assert c.main_port, "needs test a"
    # Certificate PEM a resource does carry: an Event Grid namespace's CA certificates
    # (`encodedCertificate`), compiled into the snapshot of the broker the namespace is bound to.
    ns = f"{c.aio.rg}/providers/Microsoft.EventGrid/namespaces/e2ens"
    op = c.arm.put_and_wait(ns, {"location": "westeurope", "tags": {"meridian.broker": c.aio.broker},
                                 "properties": {}})
    assert op["status"] == "Succeeded", op
    ca = f"{ns}/caCertificates/badca"
    garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGUgYXQgYWxs\n-----END CERTIFICATE-----\n"
    op = c.arm.put_and_wait(ca, {"properties": {"encodedCertificate": garbage}})
    assert_rejected_by_a_node(op, ca, "CA certificate 'badca' certificate 1 does not parse")
    assert c.arm.provisioning_state(ca) == "Failed"
    serves_on_both(c, c.main_port, "e2e/b2")
    c.arm.delete(ns)
    op = c.arm.put_and_wait(c.aio.listener("after-badca"), c.aio.listener_body(0))
    assert op["status"] == "Succeeded", op


# ---------------------------------------------------------------------------------------------
# c. an authorization that forbids a topic: PUBACK 0x87 there, the allowed topic still works


def rules(*publish_topics):
    return [
        {"principals": {"clientIds": ["device1"]},
         "brokerResources": [{"method": "Connect"}, {"method": "Publish", "topics": list(publish_topics)}]},
        {"principals": {"clientIds": ["watcher"]},
         "brokerResources": [{"method": "Connect"}, {"method": "Subscribe", "topics": ["#"]}]},
    ]


def test_c_an_authorization_that_forbids_a_topic_refuses_publishes_there_on_a_live_connection(cluster):
    c = cluster
    authz = c.aio.authorization("e2e-authz")
    op = c.arm.put_and_wait(authz, c.aio.authorization_body(rules("allowed/#", "secret/#")))
    assert op["status"] == "Succeeded", op
    port = free_port(*HOSTS.values())
    op = c.arm.put_and_wait(c.aio.listener("guarded"), c.aio.listener_body({"port": port, "authorizationRef": "e2e-authz"}))
    assert op["status"] == "Succeeded", op

    clients = []
    try:
        conns = {}
        for name, host in HOSTS.items():
            watcher = Mqtt(host, port, client_id="watcher")
            device = Mqtt(host, port, client_id="device1")
            clients += [watcher, device]
            assert watcher.connack == 0 and device.connack == 0
            assert watcher.subscribe("#") == [1]
            # Both topics are allowed by the first authorization.
            assert device.publish("secret/x", b"before") == 0
            watcher.wait_message("secret/x", b"before")
            conns[name] = (watcher, device)

        # Forbid secret/#: the same connections, now refused there and still allowed elsewhere.
        op = c.arm.put_and_wait(authz, c.aio.authorization_body(rules("allowed/#")))
        assert op["status"] == "Succeeded", op
        for name, (watcher, device) in conns.items():
            rc = device.publish("secret/x", b"after")
            assert rc == NOT_AUTHORIZED, f"node {name}: PUBACK {rc:#x} for a forbidden topic"
            assert device.publish("allowed/y", b"ok") == 0, f"node {name}: the allowed topic is refused"
            watcher.wait_message("allowed/y", b"ok")
            assert ("secret/x", b"after") not in watcher.messages, f"node {name} delivered a refused publish"
            assert device.disconnected is None, f"node {name}: the device was disconnected ({device.disconnected})"
        # A client no rule names cannot even connect.
        for name, host in HOSTS.items():
            stranger = Mqtt(host, port, client_id="stranger")
            clients.append(stranger)
            assert stranger.connack == NOT_AUTHORIZED, f"node {name}: CONNACK {stranger.connack:#x} for a stranger"
    finally:
        for m in clients:
            m.close()


# ---------------------------------------------------------------------------------------------
# d. the control plane stops: the nodes keep serving; it comes back: they re-register


def test_d_nodes_keep_serving_while_the_control_plane_is_down(cluster):
    c = cluster
    assert c.main_port, "needs test a"
    try:
        c.api.stop()
        assert not c.api.running()
        serves_on_both(c, c.main_port, "e2e/d1")
        # Several report intervals (1 s) later, their reports failing, still serving.
        time.sleep(3.5)
        assert all(n.running() for n in c.nodes.values()), node_logs(c)
        serves_on_both(c, c.main_port, "e2e/d2")
        assert "report to the control plane failed" in c.nodes["n1"].log(), "the outage went unnoticed"

        # Back on the same database: the in-memory registry refills from the nodes' reports, and a
        # change reaches both nodes.
        c.api.start()
        c.wait_registered(timeout=90)
        port = free_port(*HOSTS.values())
        op = c.arm.put_and_wait(c.aio.listener("after-outage"), c.aio.listener_body(port))
        assert op["status"] == "Succeeded", op
        serves_on_both(c, port, "e2e/d3")
    finally:
        c.ensure_api()


# ---------------------------------------------------------------------------------------------
# e. a node restarted while the control plane is down serves its stored snapshot, then catches up


def test_e_a_node_restarted_during_an_outage_serves_its_stored_snapshot_and_catches_up(cluster):
    c = cluster
    assert c.main_port, "needs test a"
    n2 = c.nodes["n2"]
    host = HOSTS["n2"]
    guarded = c.arm.get(c.aio.listener("guarded"))
    guarded_port = guarded.json()["properties"]["ports"][0]["port"] if guarded.status_code == 200 else None
    try:
        c.api.stop()
        n2.kill()
        assert not connects(host, c.main_port), "the killed node still serves"
        n2.start()
        # No control plane to ask: the listeners (and the policy) come from the stored snapshot.
        wait_until("the restarted node to serve its stored listener",
                   lambda: connects(host, c.main_port), timeout=30)
        round_trip(host, c.main_port, "e2e/e1", client_id="rt-restarted")
        if guarded_port:  # test c's authorization is part of the stored snapshot too
            device = Mqtt(host, guarded_port, client_id="device1")
            try:
                assert device.publish("secret/x") == NOT_AUTHORIZED
                assert device.publish("allowed/z") < 0x80
            finally:
                device.close()

        c.api.start()
        port = free_port(*HOSTS.values())
        rid = c.aio.listener("catch-up")
        op = c.arm.put_and_wait(rid, c.aio.listener_body(port), timeout=90)
        assert op["status"] == "Succeeded", op
        # Both nodes may register with the restarted control plane only after the PUT (their
        # report backoff; until then the broker has no live node, so the PUT may already be
        # Succeeded): each is pushed the newest snapshot when it reports.
        for name, h in HOSTS.items():
            wait_until(f"node {name} to open the listener made after the restart",
                       lambda: connects(h, port), timeout=90, interval=0.2)
        serves_on_both(c, port, "e2e/e2")
        c.wait_registered(timeout=90)
        wait_until("both nodes to report the same, newest generation",
                   lambda: len({n["report"]["appliedGeneration"] for n in c.arm.nodes(c.aio.broker)}) == 1,
                   timeout=30)
    finally:
        c.ensure_api()
