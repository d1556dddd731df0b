"""The authorization attack table (issue 5), with real paho-mqtt clients against a real
`meridian broker` node.

The node runs as a control-plane node (`--control-plane`, pointed at a port nothing listens on: it
keeps retrying its report in the background) and gets its desired state the way a control plane
delivers it: `PUT /v1/snapshot` on its admin port with the node token. The snapshot has

- `plain`: MQTT port with inline argon2 `UsernamePassword` credentials and IoT Operations rules;
- `tokens`: MQTT port with the `ServiceAccountToken` method (an ES256 key made here; JWTs minted
  here with PyJWT);
- `eg`: TLS port serving two Event Grid namespaces, `nsa` and `nsb`, each with its own CA
  (certificates made here with `cryptography`), reached by TLS SNI `<namespace>.example.com`,
  and a third, `nsj`, whose clients authenticate with JWTs of its own issuer (custom JWT
  authentication: RS256 tokens minted here, verified with the issuer certificate made here).

Every row is an attack that must be refused with a specific reason code, next to the legitimate
request it imitates, which must pass: a broker that refused everything would fail the table.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import jwt
import paho.mqtt.client as mqtt
import pytest
from argon2 import PasswordHasher
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from conftest import KIND, MERIDIAN_BIN, free_port

pytestmark = pytest.mark.skipif(KIND != "meridian", reason="snapshot-driven policy is Meridian's")

BROKER = "/subscriptions/00000000-0000-0000-0000-0000000000a7/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/i1/brokers/default"
EG = "/subscriptions/00000000-0000-0000-0000-0000000000a7/resourceGroups/rg/providers/Microsoft.EventGrid/namespaces"
TOKEN = "node-token-" + uuid.uuid4().hex
AUD = "meridian-attack-table"

SUCCESS, REFUSED = 0x00, 0x80
BAD_CREDENTIALS, NOT_AUTHORIZED, BAD_METHOD = 0x86, 0x87, 0x8C


def rid(kind: str, name: str) -> str:
    return f"{BROKER}/{kind}/{name}"


# ------------------------------------------------------------------------------------------------
# Key material, made by the test

class Pki:
    """A CA that issues client and server certificates (EC P-256)."""

    def __init__(self, name: str, directory: Path):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        self.path = directory / f"{name}.pem"
        self.path.write_text(self.pem)

    @staticmethod
    def _builder(subject, issuer, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, cn: str, dns: list[str] | None = None) -> tuple[Path, Path, str, str]:
        """(cert file, key file, cert PEM, key PEM) for `cn`; server certificates get `dns` SANs."""
        key = ec.generate_private_key(ec.SECP256R1())
        b = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
                          self.cert.subject, key.public_key())
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if dns:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]),
                                critical=False)
            usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        stem = f"{uuid.uuid4().hex[:8]}-{cn}"
        cert_path, key_path = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert_path.write_text(cert_pem + self.pem)
        key_path.write_text(key_pem)
        return cert_path, key_path, cert_pem, key_pem


class Signer:
    """An ES256 key that mints JWTs."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def token(self, sub: str = "sensor-1", site: str = "plant-1", exp_in: int = 600,
              aud: str = AUD, **extra) -> str:
        claims = {"sub": sub, "aud": aud, "exp": int(time.time()) + exp_in, "site": site, **extra}
        return jwt.encode(claims, self.key, algorithm="ES256")


class Issuer:
    """An identity provider for a namespace's custom JWT authentication: an RSA key, the
    certificate that carries its public key, and RS256 tokens (Event Grid's documented format)."""

    ISS = "https://idp.example.com"

    def __init__(self, kid: str = "idp-1"):
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token issuer")])
        self.cert_pem = Pki._builder(name, name, self.key.public_key()).sign(
            self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    def token(self, sub: str = "sensor-7", aud="nsj.example.com", iss: str = ISS,
              exp_in: int = 600, kid: str | None = None, **claims) -> str:
        now = int(time.time())
        body = {"iss": iss, "sub": sub, "aud": aud, "exp": now + exp_in, "nbf": now - 5,
                "role": "sensor", "site": "plant-1", **claims}
        return jwt.encode(body, self.key, algorithm="RS256",
                          headers={"kid": kid or self.kid, "typ": "JWT"})


# ------------------------------------------------------------------------------------------------
# The desired state

def snapshot(ports: dict[str, int], server: tuple[str, str], cas: dict[str, Pki],
             signer: Signer, issuer: Issuer) -> dict:
    ph = PasswordHasher()
    creds = [
        {"username": "alice", "passwordHash": ph.hash("alice-pw"), "attributes": {"floor": "3"}},
        {"username": "monitor", "passwordHash": ph.hash("monitor-pw")},
        {"username": "carol", "passwordHash": ph.hash("carol-pw")},
        # Devices own clients/{clientId}/# and users/{username}/#; "+", "#" and "a/b" are
        # usernames an attacker registered to widen those templates.
        *({"username": u, "passwordHash": ph.hash("dev-pw"), "attributes": {"role": "device"}}
          for u in ["dev", "+", "#", "a/b"]),
    ]
    rules = [
        {"principals": {"usernames": ["alice"]},
         "brokerResources": [{"method": "Connect"},
                             {"method": "Publish", "topics": ["floor/{principal.attributes.floor}/#"]},
                             {"method": "Subscribe", "topics": ["floor/{principal.attributes.floor}/#"]}]},
        {"principals": {"usernames": ["monitor"]},
         "brokerResources": [{"method": "Connect"}, {"method": "Subscribe", "topics": ["#"]}]},
        {"principals": {"attributes": [{"role": "device"}]},
         "brokerResources": [{"method": "Connect"},
                             {"method": "Publish", "topics": ["clients/{principal.clientId}/#",
                                                              "users/{principal.username}/#"]},
                             {"method": "Subscribe", "topics": ["clients/{principal.clientId}/#",
                                                                "users/{principal.username}/#"]}]},
        {"principals": {"attributes": [{"site": "plant-1"}]},
         "brokerResources": [{"method": "Connect"},
                             {"method": "Publish", "topics": ["site/{principal.attributes.site}/#"]}]},
        # carol authenticates but no rule grants her Connect.
    ]

    def namespace(name: str, ca: Pki, clients: list[dict]) -> dict:
        ns = f"{EG}/{name}"
        return {
            "id": ns, "name": name, "topicSpacesEnabled": True,
            "clients": [{"id": f"{ns}/clients/{c['name']}", "authenticationName": c["name"], **c}
                        for c in clients],
            "topicSpaces": [{"id": f"{ns}/topicSpaces/own", "name": "own",
                             "topicTemplates": ["devices/${client.authenticationName}/#", "shared/#"]}],
            "permissionBindings": [
                {"id": f"{ns}/permissionBindings/{p.lower()}", "name": p.lower(),
                 "clientGroupName": "$all", "topicSpaceName": "own", "permission": p}
                for p in ["Publisher", "Subscriber"]],
            "caCertificates": [{"id": f"{ns}/caCertificates/devices", "name": "devices",
                                "encodedCertificate": ca.pem}],
        }

    def jwt_namespace(issuer: Issuer) -> dict:
        """Clients come by token: no registration, no CA. Sensors (by the `role` claim) publish
        under their `site` claim; everyone shares `shared/#`. One registered client, Disabled,
        blocks the token identity of that name."""
        ns = f"{EG}/nsj"
        return {
            "id": ns, "name": "nsj", "topicSpacesEnabled": True,
            "customJwtAuthentication": {"tokenIssuer": Issuer.ISS, "issuerCertificates": [
                {"kid": issuer.kid, "encodedCertificate": issuer.cert_pem}]},
            "clients": [{"id": f"{ns}/clients/blocked", "name": "blocked",
                         "authenticationName": "blocked", "state": "Disabled"}],
            "clientGroups": [{"id": f"{ns}/clientGroups/sensors", "name": "sensors",
                              "query": "attributes.role = 'sensor'"}],
            "topicSpaces": [
                {"id": f"{ns}/topicSpaces/sites", "name": "sites",
                 "topicTemplates": ["sites/${client.attributes.site}/${client.authenticationName}/#"]},
                {"id": f"{ns}/topicSpaces/shared", "name": "shared", "topicTemplates": ["shared/#"]}],
            "permissionBindings": [
                {"id": f"{ns}/permissionBindings/sensors-pub", "name": "sensors-pub",
                 "clientGroupName": "sensors", "topicSpaceName": "sites", "permission": "Publisher"},
                *({"id": f"{ns}/permissionBindings/shared-{p.lower()}", "name": f"shared-{p.lower()}",
                   "clientGroupName": "$all", "topicSpaceName": "shared", "permission": p}
                  for p in ["Publisher", "Subscriber"])],
        }

    return {
        "schemaVersion": 1, "brokerId": BROKER, "generation": 1,
        "listeners": [
            {"id": rid("listeners", "plain"), "name": "plain", "ports": [
                {"port": ports["plain"], "protocol": "Mqtt",
                 "authenticationEnabled": True, "authenticationRefs": ["passwords"],
                 "authorizationEnabled": True, "authorizationRefs": ["rules"]}]},
            {"id": rid("listeners", "tokens"), "name": "tokens", "ports": [
                {"port": ports["tokens"], "protocol": "Mqtt",
                 "authenticationEnabled": True, "authenticationRefs": ["tokens"],
                 "authorizationEnabled": True, "authorizationRefs": ["rules"]}]},
            {"id": rid("listeners", "eg"), "name": "eg", "ports": [
                {"port": ports["eg"], "protocol": "Mqtt", "authenticationEnabled": True,
                 "tls": {"certificate": {"mode": "Manual", "certificatePem": server[0],
                                         "privateKeyPem": server[1]}}}]},
            # A port whose clients belong to nsa unless their SNI names another namespace
            # (compiled from nsa's `meridian.listeners` tag).
            {"id": rid("listeners", "nsa-default"), "name": "nsa-default", "ports": [
                {"port": ports["nsa-default"], "protocol": "Mqtt", "authenticationEnabled": True,
                 "defaultNamespace": "nsa",
                 "tls": {"certificate": {"mode": "Manual", "certificatePem": server[0],
                                         "privateKeyPem": server[1]}}}]},
        ],
        "authentications": [
            {"id": rid("authentications", "passwords"), "name": "passwords",
             "methods": [{"method": "UsernamePassword", "credentials": creds}]},
            {"id": rid("authentications", "tokens"), "name": "tokens",
             "methods": [{"method": "ServiceAccountToken", "audiences": [AUD],
                          "keysPem": [signer.public_pem]}]},
        ],
        "authorizations": [{"id": rid("authorizations", "rules"), "name": "rules", "rules": rules}],
        "namespaces": [
            # Both tenants register a client named dev1: the names are per tenant.
            namespace("nsa", cas["a"], [{"name": "dev1"}, {"name": "dev2"},
                                        {"name": "off", "state": "Disabled"}]),
            namespace("nsb", cas["b"], [{"name": "dev1"}, {"name": "devb"}]),
            jwt_namespace(issuer),
        ],
    }


# ------------------------------------------------------------------------------------------------
# The node

class Node:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.admin = free_port()
        self.log_path = workdir / "node.log"
        cmd = [str(MERIDIAN_BIN), "broker", "--listen", "mqtt://127.0.0.1:0",
               "--data-dir", str(workdir / "data"), "--admin", f"127.0.0.1:{self.admin}",
               # Nothing listens on the discard port: the node keeps retrying its report.
               "--control-plane", "http://127.0.0.1:9", "--broker", BROKER, "--token", TOKEN,
               "--node-id", "attacks", "--snapshot-listener-host", "127.0.0.1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"),
                                     stdin=subprocess.DEVNULL, env=dict(os.environ, NO_COLOR="1"))
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"node exited ({self.proc.returncode}): {self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"node admin port never answered: {self.log()}")
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def push(self, snap: dict) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}/v1/snapshot", data=json.dumps(snap).encode(),
            method="PUT", headers={"Authorization": f"Bearer {TOKEN}",
                                   "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            pytest.fail(f"snapshot refused ({e.code}): {e.read().decode()}\n{self.log()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Env:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.ports = {"plain": free_port(), "tokens": free_port(), "eg": free_port(),
                      "nsa-default": free_port()}
        self.server_ca = Pki("server-ca", workdir)
        _, _, cert_pem, key_pem = self.server_ca.issue(
            "meridian", dns=["nsa.example.com", "nsb.example.com", "nsj.example.com", "localhost"])
        self.cas = {"a": Pki("tenant-a-ca", workdir), "b": Pki("tenant-b-ca", workdir),
                    "x": Pki("stranger-ca", workdir)}
        self.signer = Signer()
        self.issuer = Issuer()
        self.node = Node(workdir)
        applied = self.node.push(snapshot(self.ports, (cert_pem, key_pem), self.cas, self.signer,
                                          self.issuer))
        assert applied.get("appliedGeneration") == 1, applied


@pytest.fixture(scope="module")
def env():
    with tempfile.TemporaryDirectory(prefix="meridian-attacks-") as d:
        e = Env(Path(d))
        yield e
        e.node.stop()


# ------------------------------------------------------------------------------------------------
# A paho client that may be refused

class SniContext(ssl.SSLContext):
    """Sends `sni` as the TLS server name while paho connects to 127.0.0.1: Event Grid clients
    name their namespace in SNI, and there is no DNS for `*.example.com` here."""

    sni = ""

    def wrap_socket(self, sock, *args, server_hostname=None, **kw):  # noqa: D102
        return super().wrap_socket(sock, *args, server_hostname=self.sni, **kw)


class Attempt:
    """One connection attempt. `code` is the CONNACK reason code, or None when the broker
    closed the connection (or the TLS handshake failed) without a CONNACK."""

    def __init__(self, port: int, client_id: str, protocol=mqtt.MQTTv5, username=None,
                 password=None, method=None, data=None, will=None, sni=None, cert=None,
                 ca: Pki | None = None):
        self.protocol = protocol
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                             reconnect_on_failure=False)
        if username is not None:
            self.c.username_pw_set(username, password)
        if will:
            self.c.will_set(*will)
        if sni:
            ctx = SniContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.sni = sni
            ctx.load_verify_locations(cafile=str(ca.path))
            if cert:
                ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            self.c.tls_set_context(ctx)
        self.connack = threading.Event()
        self.closed = threading.Event()
        self.code = None
        self.messages: queue.Queue = queue.Queue()
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self.cv = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda c, u, f, rc, p: self.closed.set()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        props = None
        if method:
            props = Properties(PacketTypes.CONNECT)
            props.AuthenticationMethod = method
            props.AuthenticationData = data.encode() if isinstance(data, str) else data
        try:
            if protocol == mqtt.MQTTv5:
                self.c.connect("127.0.0.1", port, keepalive=30, properties=props)
            else:
                self.c.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError):
            self.closed.set()
            return
        self.c.loop_start()
        deadline = time.monotonic() + 10
        while not (self.connack.is_set() or self.closed.is_set()):
            assert time.monotonic() < deadline, "neither CONNACK nor close within 10 s"
            time.sleep(0.01)
        self.connack.wait(0.2)

    def _on_connect(self, c, u, flags, rc, props):
        # paho reports 3.1.1 return codes as MQTT 5 reason codes (4 → 0x86, 5 → 0x87).
        self.code = rc.value
        self.connack.set()

    def _on_subscribe(self, c, u, mid, rcs, props):
        with self.cv:
            self.subacks[mid] = [r.value for r in rcs]
            self.cv.notify_all()

    def _on_publish(self, c, u, mid, rc, props):
        with self.cv:
            self.pubacks[mid] = rc.value
            self.cv.notify_all()

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        if self.protocol == mqtt.MQTTv5:
            rc, mid = self.c.subscribe([(f, SubscribeOptions(qos=qos)) for f in filters])
        else:
            rc, mid = self.c.subscribe([(f, qos) for f in filters])
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self.cv:
            assert self.cv.wait_for(lambda: mid in self.subacks, 10), f"no SUBACK for {filters}"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> int:
        """QoS 1 publish; the PUBACK reason code."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        with self.cv:
            assert self.cv.wait_for(lambda: info.mid in self.pubacks, 10), f"no PUBACK for {topic}"
            return self.pubacks[info.mid]

    def received(self, quiet: float = 0.7) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                m = self.messages.get(timeout=quiet)
            except queue.Empty:
                return out
            out.append((m.topic, m.payload))

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


@pytest.fixture
def attempts():
    made: list[Attempt] = []

    def make(*a, **kw) -> Attempt:
        at = Attempt(*a, **kw)
        made.append(at)
        return at

    yield make
    for at in made:
        try:
            at.close()
        except Exception:
            pass


def accepted(puback: int) -> bool:
    """A PUBACK that is not a refusal (0x10 "no matching subscribers" is a success)."""
    return puback < 0x80


def ok(at: Attempt) -> Attempt:
    assert at.code == SUCCESS, f"CONNACK {at.code!r}, expected success"
    return at


# ------------------------------------------------------------------------------------------------
# Subscriptions

def test_a_limited_client_cannot_widen_its_subscription_with_wildcards(env, attempts):
    alice = ok(attempts(env.ports["plain"], "alice-1", username="alice", password=b"alice-pw"))
    assert alice.subscribe("floor/3/#") == [1]
    for attack in ["#", "+/#", "floor/+/temp", "floor/#", "+/3/#"]:
        assert alice.subscribe(attack) == [NOT_AUTHORIZED], attack
    # 3.1.1 has no reason codes: the SUBACK return code is 0x80 (Failure).
    v3 = ok(attempts(env.ports["plain"], "alice-3", protocol=mqtt.MQTTv311, username="alice",
                     password=b"alice-pw"))
    assert v3.subscribe("floor/3/+", "#") == [1, REFUSED]


def test_shared_and_sys_subscriptions_are_judged_on_their_real_filter(env, attempts):
    alice = ok(attempts(env.ports["plain"], "alice-2", username="alice", password=b"alice-pw"))
    assert alice.subscribe("$share/g/floor/3/#") == [1]
    for attack in ["$share/x/#", "$share/x/floor/+/t", "$share/floor/3/#", "$SYS/#"]:
        # "$share/floor/3/#" is group "floor" on filter "3/#": not alice's floor.
        assert alice.subscribe(attack) == [NOT_AUTHORIZED], attack
    monitor = ok(attempts(env.ports["plain"], "mon-1", username="monitor", password=b"monitor-pw"))
    # `#` is granted, and so is a shared `#`; but a leading wildcard never reaches `$` topics.
    assert monitor.subscribe("#", "$share/x/#") == [1, 1]
    for attack in ["$SYS/#", "$SYS/broker/uptime", "$share/x/$SYS/#"]:
        assert monitor.subscribe(attack) == [NOT_AUTHORIZED], attack


def test_one_forbidden_filter_in_a_multi_filter_subscribe_is_refused_alone(env, attempts):
    alice = ok(attempts(env.ports["plain"], "alice-m", username="alice", password=b"alice-pw"))
    assert alice.subscribe("floor/3/a", "floor/4/a", "floor/3/+", qos=0) == [0, NOT_AUTHORIZED, 0]
    pub = ok(attempts(env.ports["plain"], "alice-mp", username="alice", password=b"alice-pw"))
    assert accepted(pub.publish("floor/3/a", b"granted"))
    assert ("floor/3/a", b"granted") in alice.received()


# ------------------------------------------------------------------------------------------------
# Publishes: wills and retained messages

def test_a_will_to_a_forbidden_topic_refuses_the_connect(env, attempts):
    refused = attempts(env.ports["plain"], "alice-w", username="alice", password=b"alice-pw",
                       will=("floor/4/last-words", b"bye", 1, False))
    assert refused.code == NOT_AUTHORIZED
    v3 = attempts(env.ports["plain"], "alice-w3", protocol=mqtt.MQTTv311, username="alice",
                  password=b"alice-pw", will=("floor/4/last-words", b"bye", 1, True))
    assert v3.code == NOT_AUTHORIZED  # 3.1.1 return code 5
    # The same will on alice's own floor is fine, and is delivered when she drops.
    monitor = ok(attempts(env.ports["plain"], "mon-w", username="monitor", password=b"monitor-pw"))
    assert monitor.subscribe("floor/3/will") == [1]
    w = ok(attempts(env.ports["plain"], "alice-w-ok", username="alice", password=b"alice-pw",
                    will=("floor/3/will", b"bye", 1, False)))
    w.c.loop_stop()
    w.c.socket().close()  # no DISCONNECT: the will is published
    assert ("floor/3/will", b"bye") in monitor.received(quiet=3)


def test_a_retained_message_to_a_forbidden_topic_is_refused_and_not_stored(env, attempts):
    alice = ok(attempts(env.ports["plain"], "alice-r", username="alice", password=b"alice-pw"))
    assert alice.publish("floor/4/retained", b"sneaky", retain=True) == NOT_AUTHORIZED
    assert accepted(alice.publish("floor/3/retained", b"fine", retain=True))
    monitor = ok(attempts(env.ports["plain"], "mon-r", username="monitor", password=b"monitor-pw"))
    assert monitor.subscribe("floor/+/retained") == [1]
    got = monitor.received()
    assert ("floor/3/retained", b"fine") in got
    assert all(t != "floor/4/retained" for t, _ in got), got
    assert accepted(alice.publish("floor/3/retained", b"", retain=True))  # clear it


# ------------------------------------------------------------------------------------------------
# Injection through client id and username

def test_client_id_and_username_cannot_widen_their_own_templates(env, attempts):
    dev = ok(attempts(env.ports["plain"], "dev-1", username="dev", password=b"dev-pw"))
    assert dev.subscribe("clients/dev-1/#", "users/dev/#") == [1, 1]
    assert accepted(dev.publish("clients/dev-1/t"))
    # A victim with a plain id, and the attacker ids that would cover its topics.
    for client_id, attack in [("+", "clients/+/#"), ("#", "clients/#"),
                              ("dev-1/#", "clients/dev-1/#")]:
        a = ok(attempts(env.ports["plain"], client_id, username="dev", password=b"dev-pw"))
        assert a.subscribe(attack) == [NOT_AUTHORIZED], (client_id, attack)
    a = ok(attempts(env.ports["plain"], "a/b", username="dev", password=b"dev-pw"))
    # Client "a" owns clients/a/#; the id "a/b" must not reach clients/a/b/... through it.
    assert a.publish("clients/a/b/t") == NOT_AUTHORIZED
    for username, attack in [("+", "users/+/#"), ("#", "users/#")]:
        u = ok(attempts(env.ports["plain"], f"u-{uuid.uuid4().hex[:6]}", username=username,
                        password=b"dev-pw"))
        assert u.subscribe(attack) == [NOT_AUTHORIZED], (username, attack)
    u = ok(attempts(env.ports["plain"], "u-ab", username="a/b", password=b"dev-pw"))
    assert u.publish("users/a/b/t") == NOT_AUTHORIZED


# ------------------------------------------------------------------------------------------------
# Credentials

def test_bad_credentials_and_methods_get_their_codes(env, attempts):
    port = env.ports["plain"]
    assert attempts(port, "bad-1", username="alice", password=b"wrong").code == BAD_CREDENTIALS
    assert attempts(port, "bad-2", username="mallory", password=b"x").code == BAD_CREDENTIALS
    assert attempts(port, "bad-3", protocol=mqtt.MQTTv311, username="alice",
                    password=b"wrong").code == BAD_CREDENTIALS  # 3.1.1 return code 4
    # Authenticated, but no rule grants Connect.
    assert attempts(port, "carol-1", username="carol", password=b"carol-pw").code == NOT_AUTHORIZED
    assert attempts(port, "bad-4", method="SCRAM-SHA-1", data=b"x").code == BAD_METHOD
    assert attempts(env.ports["tokens"], "bad-5", method="SCRAM-SHA-1",
                    data=b"x").code == BAD_METHOD


def test_expired_forged_and_misaddressed_tokens_are_refused(env, attempts):
    port = env.ports["tokens"]
    good = ok(attempts(port, "sensor-1", method="K8S-SAT", data=env.signer.token()))
    assert accepted(good.publish("site/plant-1/t"))
    assert good.publish("site/plant-2/t") == NOT_AUTHORIZED
    ok(attempts(port, "sensor-1b", method="OAUTH2-JWT", data=env.signer.token()))
    forger = Signer()
    header, body, _ = env.signer.token().split(".")
    for name, token in [
        ("expired", env.signer.token(exp_in=-120)),
        ("forged: another key", forger.token()),
        ("forged: claims edited under the old signature",
         ".".join([header, jwt.utils.base64url_encode(json.dumps(
             {"sub": "sensor-1", "aud": AUD, "exp": int(time.time()) + 600,
              "site": "plant-2"}).encode()).decode(), env.signer.token().split(".")[2]])),
        ("alg none", jwt.encode({"sub": "s", "aud": AUD, "exp": int(time.time()) + 600,
                                 "site": "plant-1"}, None, algorithm="none")),
        ("wrong audience", env.signer.token(aud="someone-else")),
        ("not a JWT", "definitely-not-a-token"),
    ]:
        assert attempts(port, "sensor-x", method="K8S-SAT", data=token).code == BAD_CREDENTIALS, name
    assert body  # the edited-claims row reused a real header


# ------------------------------------------------------------------------------------------------
# Event Grid namespaces: tenants, CAs, client state

def eg(env, attempts, sni_ns: str, cert_ns: str, name: str, ca_key: str | None = None,
       username: str | None = None) -> Attempt:
    cert = env.cas[ca_key or cert_ns].issue(name)[:2]
    return attempts(env.ports["eg"], f"{name}-{uuid.uuid4().hex[:6]}", username=username or name,
                    sni=f"{sni_ns}.example.com", cert=cert, ca=env.server_ca)


def eg_as(env, attempts, ns: str, name: str, client_id: str) -> Attempt:
    cert = env.cas[ns[-1]].issue(name)[:2]
    return attempts(env.ports["eg"], client_id, username=name, sni=f"{ns}.example.com", cert=cert,
                    ca=env.server_ca)


def test_namespaces_are_isolated_tenants(env, attempts):
    a1 = ok(eg(env, attempts, "nsa", "a", "dev1"))
    a2 = ok(eg(env, attempts, "nsa", "a", "dev2"))
    b1 = ok(eg(env, attempts, "nsb", "b", "dev1"))
    assert a2.subscribe("shared/#") == [1]
    assert b1.subscribe("shared/#") == [1]
    assert accepted(a1.publish("shared/hello", b"from-a"))
    assert ("shared/hello", b"from-a") in a2.received()
    assert b1.received() == [], "a message of namespace A reached namespace B"
    assert accepted(b1.publish("shared/hello", b"from-b"))
    assert ("shared/hello", b"from-b") in b1.received()
    assert a2.received() == [], "a message of namespace B reached namespace A"
    # Retained messages are per tenant too.
    assert accepted(a1.publish("shared/state", b"a-state", retain=True))
    late_b = ok(eg(env, attempts, "nsb", "b", "devb"))
    assert late_b.subscribe("shared/#") == [1]
    assert late_b.received() == [], "namespace B got namespace A's retained message"
    late_a = ok(eg(env, attempts, "nsa", "a", "dev2"))
    assert late_a.subscribe("shared/#") == [1]
    assert ("shared/state", b"a-state") in late_a.received()
    assert accepted(a1.publish("shared/state", b"", retain=True))
    # One client id in both tenants: two sessions, neither takes the other over.
    same_a = ok(eg_as(env, attempts, "nsa", "dev1", "same-id"))
    same_b = ok(eg_as(env, attempts, "nsb", "dev1", "same-id"))
    assert same_a.subscribe("shared/#") == [1]
    assert not same_a.closed.wait(1), "namespace B's client took over namespace A's session"
    assert accepted(a1.publish("shared/after", b"still-here"))
    assert ("shared/after", b"still-here") in same_a.received()
    assert same_b.code == SUCCESS and not same_b.closed.is_set()
    # A client of A, with A's valid certificate, naming B in SNI: B has a client "dev1" too,
    # but B does not trust A's CA.
    # The port trusts both tenants' CAs at the handshake; the namespace checks its own.
    assert eg(env, attempts, "nsb", "a", "dev1").code == BAD_CREDENTIALS
    # A's client name that B does not have.
    assert eg(env, attempts, "nsb", "a", "dev2").code == BAD_CREDENTIALS


def test_untrusted_ca_disabled_client_and_impersonation_are_refused(env, attempts):
    # A certificate from a CA no namespace trusts never gets a session.
    # (TLS 1.3: the handshake fails, or the server closes without a CONNACK.)
    stranger = eg(env, attempts, "nsa", "a", "dev1", ca_key="x")
    assert stranger.code is None, f"CONNACK {stranger.code} for an untrusted certificate"
    # A registered but Disabled client.
    assert eg(env, attempts, "nsa", "a", "off").code == NOT_AUTHORIZED
    # dev2's certificate claiming to be dev1: the subject must match the authentication name.
    assert eg(env, attempts, "nsa", "a", "dev2", username="dev1").code == BAD_CREDENTIALS
    # Namespace clients cannot pick an unknown enhanced-auth method.
    cert = env.cas["a"].issue("dev1")[:2]
    odd = attempts(env.ports["eg"], "dev1-m", username="dev1", sni="nsa.example.com", cert=cert,
                   ca=env.server_ca, method="SCRAM-SHA-1", data=b"x")
    assert odd.code == BAD_METHOD
    # Within its namespace a client is held to its topic space.
    d = ok(eg(env, attempts, "nsa", "a", "dev1"))
    assert accepted(d.publish("devices/dev1/t"))
    assert d.publish("devices/dev2/t") == NOT_AUTHORIZED
    assert d.subscribe("devices/+/t", "#") == [NOT_AUTHORIZED, NOT_AUTHORIZED]


def test_a_listener_default_namespace_takes_clients_without_a_namespace_in_sni(env, attempts):
    def on_default(sni: str, ca: str, name: str) -> Attempt:
        cert = env.cas[ca].issue(name)[:2]
        return attempts(env.ports["nsa-default"], f"{name}-{uuid.uuid4().hex[:6]}", username=name,
                        sni=sni, cert=cert, ca=env.server_ca)

    a = ok(on_default("localhost", "a", "dev1"))
    assert a.subscribe("shared/#") == [1]
    sni_a = ok(eg(env, attempts, "nsa", "a", "dev2"))
    assert accepted(sni_a.publish("shared/default", b"same-tenant"))
    assert ("shared/default", b"same-tenant") in a.received(), "the default namespace is nsa"
    assert accepted(a.publish("devices/dev1/t"))
    assert a.publish("devices/dev2/t") == NOT_AUTHORIZED
    # B's certificate on A's default port: not a client of A.
    assert on_default("localhost", "b", "dev1").code == BAD_CREDENTIALS
    # SNI still wins: naming nsb reaches nsb.
    b = ok(on_default("nsb.example.com", "b", "devb"))
    assert b.subscribe("shared/#") == [1]
    assert accepted(sni_a.publish("shared/default", b"again"))
    assert b.received() == []


# ------------------------------------------------------------------------------------------------
# Event Grid custom JWT authentication (namespace nsj)

def jwt_client(env, attempts, token: str, ns: str = "nsj", method: str = "CUSTOM-JWT",
               client_id: str | None = None) -> Attempt:
    return attempts(env.ports["eg"], client_id or f"jwt-{uuid.uuid4().hex[:6]}",
                    sni=f"{ns}.example.com", ca=env.server_ca, method=method, data=token)


def test_namespace_token_clients_are_who_their_token_says(env, attempts):
    iss = env.issuer
    s7 = ok(jwt_client(env, attempts, iss.token()))  # no client certificate
    # sub is the authentication name, the claims the attributes (group query, template).
    assert accepted(s7.publish("sites/plant-1/sensor-7/temp"))
    assert s7.publish("sites/plant-2/sensor-7/temp") == NOT_AUTHORIZED
    assert s7.publish("sites/plant-1/sensor-8/temp") == NOT_AUTHORIZED
    assert s7.subscribe("shared/#", "#", "sites/+/+/#") == [1, NOT_AUTHORIZED, NOT_AUTHORIZED]
    # The earlier method name works too; an aud naming the namespace's host as an https URL.
    s8 = ok(jwt_client(env, attempts, iss.token(sub="sensor-8",
                                                aud="https://nsj.westeurope-1.ts.eventgrid.azure.net/"),
                       method="OAUTH2-JWT"))
    assert accepted(s8.publish("shared/hi", b"from-8"))
    assert ("shared/hi", b"from-8") in s7.received()
    # Not in the sensors group (role claim): shared only.
    visitor = ok(jwt_client(env, attempts, iss.token(sub="visitor-1", role="visitor")))
    assert visitor.publish("sites/plant-1/visitor-1/t") == NOT_AUTHORIZED
    assert accepted(visitor.publish("shared/v"))
    # Injection through claims: a wildcard sub or site widens nothing.
    for sub, site in [("+", "plant-1"), ("sensor-9", "#"), ("a/b", "plant-1")]:
        c = ok(jwt_client(env, attempts, iss.token(sub=sub, site=site)))
        for topic in ["sites/plant-1/x/t", "sites/x/sensor-9/t", "sites/plant-1/a/b/t"]:
            assert c.publish(topic) == NOT_AUTHORIZED, (sub, site, topic)


def test_namespace_token_attacks_are_refused(env, attempts):
    iss = env.issuer
    good = ok(jwt_client(env, attempts, iss.token(sub="probe")))
    assert accepted(good.publish("shared/probe"))
    stranger = Issuer(kid=iss.kid)  # same kid, another key
    header, _, sig = iss.token().split(".")
    for name, token in [
        ("expired", iss.token(exp_in=-120)),
        ("another issuer", iss.token(iss="https://evil.example.com")),
        ("another namespace's audience", iss.token(aud="nsa.example.com")),
        ("a bare audience", iss.token(aud="nsj")),
        ("forged: another key, same kid", stranger.token()),
        ("forged: claims edited under the old signature",
         ".".join([header, jwt.utils.base64url_encode(json.dumps(
             {"iss": Issuer.ISS, "sub": "sensor-7", "aud": "nsj.example.com",
              "exp": int(time.time()) + 600, "nbf": int(time.time()) - 5, "role": "sensor",
              "site": "plant-2"}).encode()).decode(), sig])),
        ("alg none", jwt.encode({"iss": Issuer.ISS, "sub": "s", "aud": "nsj.example.com",
                                 "exp": int(time.time()) + 600, "nbf": int(time.time())},
                                None, algorithm="none")),
        ("a shared-secret algorithm (HS256)",
         jwt.encode({"iss": Issuer.ISS, "sub": "s", "aud": "nsj.example.com",
                     "exp": int(time.time()) + 600, "nbf": int(time.time())},
                    "a-shared-secret-of-thirty-two-bytes!", algorithm="HS256")),
        ("not a JWT", "definitely-not-a-token"),
    ]:
        assert jwt_client(env, attempts, token).code == BAD_CREDENTIALS, name
    # A registered client of that name that is Disabled blocks the token identity.
    assert jwt_client(env, attempts, iss.token(sub="blocked")).code == NOT_AUTHORIZED
    # nsj's valid token at a namespace without custom JWT authentication: not a method there.
    assert jwt_client(env, attempts, iss.token(aud="nsa.example.com"), ns="nsa").code == BAD_METHOD
    # A method nsj does not offer.
    assert jwt_client(env, attempts, iss.token(), method="K8S-SAT").code == BAD_METHOD
    # Client certificates became optional on this port for nsj's sake: nsa still needs one.
    bare = attempts(env.ports["eg"], "no-cert", username="dev1", sni="nsa.example.com",
                    ca=env.server_ca)
    assert bare.code == NOT_AUTHORIZED
    # nsj's token clients live in nsj's topic tree only.
    a = ok(eg(env, attempts, "nsa", "a", "dev2"))
    assert a.subscribe("shared/#") == [1]
    assert accepted(good.publish("shared/tenant", b"nsj-only"))
    assert a.received() == [], "a message of namespace nsj reached namespace nsa"
