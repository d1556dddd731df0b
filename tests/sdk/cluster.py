"""Real processes for control-plane → node tests and benchmarks: a `meridian api` (SQLite or
Postgres) that can be stopped and started again on the same data dir, port and database, broker
nodes (`meridian broker --control-plane ...`) that can be killed and restarted on their data dir,
an ARM client that PUTs IoT Operations resources and waits for their async operations, and
paho-mqtt (v5) probes. Used by tests/sdk/test_nodes_e2e.py and bench/apply_bench.py."""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import requests
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]
AIO_VERSION = "2024-11-01"
EG_VERSION = "2025-02-15"


def free_port(*hosts: str) -> int:
    """A TCP port free on every host given (default 127.0.0.1), e.g. on 127.0.0.1 and 127.0.0.2."""
    hosts = hosts or ("127.0.0.1",)
    for _ in range(200):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        ok = True
        for h in hosts[1:]:
            with socket.socket() as t:
                try:
                    t.bind((h, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def as_postgres(args):
    """Runs args as the postgres OS user when we are root (initdb refuses root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + args
    return args


def wait_until(what: str, pred, timeout: float = 30.0, interval: float = 0.05):
    """Polls pred() until it returns something truthy; fails with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
        except Exception as e:  # noqa: BLE001 - the last error is part of the failure message
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=15):
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Postgres:
    """A throwaway Postgres 15 cluster on a free loopback port."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="meridian-nodes-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        subprocess.run(as_postgres(["initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True)
        subprocess.run(as_postgres(["pg_ctl", "-D", str(self.dir / "data"), "-o",
                                    f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
                                    "-l", str(self.dir / "log"), "-w", "start"]), check=True, capture_output=True)
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self):
        subprocess.run(as_postgres(["pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE name on the server of `server_url` (postgres://user@host:port/db); its URL."""
    m = re.match(r"postgres://([^@]+)@([^:/]+):(\d+)/", server_url)
    assert m, server_url
    user, host, port = m.groups()
    subprocess.run(["psql", "-h", host, "-p", port, "-U", user, "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                    "-c", f'DROP DATABASE IF EXISTS "{name}"', "-c", f'CREATE DATABASE "{name}"'],
                   check=True, capture_output=True)
    return f"postgres://{user}@{host}:{port}/{name}"


class Api:
    """`meridian api` over HTTPS (self-signed local CA in the data dir) on a fixed port, so that a
    restart serves the same URL, CA, JWT secret and database."""

    def __init__(self, binary: str, database_url=None, report_interval="1s", extra=()):
        self.binary = binary
        self.database_url = database_url
        self.report_interval = report_interval
        self.extra = list(extra)
        self.data_dir = Path(tempfile.mkdtemp(prefix="meridian-nodes-api-"))
        self.port = free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.ca_path = None
        self.proc = None
        self.starts = 0

    def start(self, timeout=60):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        out = self.data_dir / f"api-{self.starts}.out"
        err = self.data_dir / f"api-{self.starts}.log"
        cmd = [self.binary, "api", "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir),
               "--tls-self-signed", "--node-report-interval", self.report_interval, *self.extra]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        self.log_path = err
        self.proc = subprocess.Popen(cmd, stdout=open(out, "w"), stderr=open(err, "w"), stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, NO_COLOR="1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = out.read_text()
            m = re.search(r"CA certificate \(REQUESTS_CA_BUNDLE\): (\S+)", text)
            if "listening on" in text and m:
                self.ca_path = m.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"meridian api exited ({self.proc.returncode}): {err.read_text()[-3000:]}")
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"meridian api did not start: {err.read_text()[-3000:]}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is not None:
            _stop(self.proc)

    def token(self, scope: str, role="Owner", subject="admin") -> str:
        return subprocess.run([self.binary, "token", "--role", role, "--scope", scope, "--subject", subject,
                               "--data-dir", str(self.data_dir)],
                              check=True, capture_output=True, text=True).stdout.strip()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class Arm:
    """A bearer-token ARM client for one api."""

    def __init__(self, api: Api, token: str):
        self.api = api
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}"})

    def url(self, rid: str, version: str) -> str:
        return f"{self.api.base_url}{rid}?api-version={version}"

    @staticmethod
    def version(rid: str) -> str:
        return EG_VERSION if "/Microsoft.EventGrid/" in rid else AIO_VERSION

    def put(self, rid: str, body: dict) -> requests.Response:
        r = self.session.put(self.url(rid, self.version(rid)), json=body, verify=self.api.ca_path, timeout=30)
        assert r.status_code in (200, 201), f"PUT {rid}: {r.status_code} {r.text}"
        return r

    def get(self, rid: str) -> requests.Response:
        return self.session.get(self.url(rid, self.version(rid)), verify=self.api.ca_path, timeout=30)

    def delete(self, rid: str, timeout=60) -> None:
        r = self.session.delete(self.url(rid, self.version(rid)), verify=self.api.ca_path, timeout=30)
        assert r.status_code in (200, 202, 204), f"DELETE {rid}: {r.status_code} {r.text}"
        wait_until(f"{rid} to be gone", lambda: self.get(rid).status_code == 404, timeout=timeout)

    def operation(self, response: requests.Response, timeout=60) -> dict:
        """Polls the PUT's Azure-AsyncOperation until it is terminal; the operation body."""
        op_url = response.headers.get("Azure-AsyncOperation")
        if not op_url:
            # A synchronous answer (e.g. a re-PUT with nothing to wait for) is already terminal.
            return {"status": response.json()["properties"].get("provisioningState", "Succeeded")}

        def done():
            r = self.session.get(op_url, verify=self.api.ca_path, timeout=30)
            assert r.status_code == 200, f"GET {op_url}: {r.status_code} {r.text}"
            body = r.json()
            return body if body.get("status") not in ("Accepted", "Running", "Provisioning", "Updating",
                                                        "InProgress", None) else None

        return wait_until(f"operation {op_url}", done, timeout=timeout, interval=0.05)

    def put_and_wait(self, rid: str, body: dict, timeout=60) -> dict:
        return self.operation(self.put(rid, body), timeout=timeout)

    def provisioning_state(self, rid: str) -> str:
        r = self.get(rid)
        assert r.status_code == 200, r.text
        return r.json()["properties"]["provisioningState"]

    def nodes(self, broker_id: str) -> list:
        r = self.session.get(f"{self.api.base_url}/meridian/nodes", params={"brokerId": broker_id},
                             verify=self.api.ca_path, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["value"]


class IotBroker:
    """ARM ids and bodies of one Microsoft.IoTOperations instance/broker and its children."""

    def __init__(self, subscription: str, rg="rg-nodes", instance="inst1", broker="default"):
        self.subscription = subscription
        self.rg = f"/subscriptions/{subscription}/resourceGroups/{rg}"
        self.instance = f"{self.rg}/providers/Microsoft.IoTOperations/instances/{instance}"
        self.broker = f"{self.instance}/brokers/{broker}"
        self.location = {"name": f"{self.rg}/providers/Microsoft.ExtendedLocation/customLocations/edge",
                         "type": "CustomLocation"}

    def listener(self, name):
        return f"{self.broker}/listeners/{name}"

    def authorization(self, name):
        return f"{self.broker}/authorizations/{name}"

    def authentication(self, name):
        return f"{self.broker}/authentications/{name}"

    def instance_body(self):
        return {"location": "westeurope", "extendedLocation": self.location, "properties": {
            "schemaRegistryRef": {"resourceId": f"{self.rg}/providers/Microsoft.DeviceRegistry/schemaRegistries/sr"}}}

    def broker_body(self):
        return {"extendedLocation": self.location, "properties": {}}

    def listener_body(self, *ports):
        """ports: ints or dicts (a port entry of the IoT Operations listener spec)."""
        return {"extendedLocation": self.location,
                "properties": {"ports": [p if isinstance(p, dict) else {"port": p} for p in ports]}}

    def authorization_body(self, rules):
        return {"extendedLocation": self.location,
                "properties": {"authorizationPolicies": {"cache": "Disabled", "rules": rules}}}

    def create(self, arm: Arm):
        for rid, body in ((self.instance, self.instance_body()), (self.broker, self.broker_body())):
            op = arm.put_and_wait(rid, body)
            assert op["status"] == "Succeeded", f"{rid}: {op}"


class Node:
    """`meridian broker` as a node of `broker_id`, snapshot listeners bound on `host`."""

    def __init__(self, binary: str, name: str, host: str, api: Api, broker_id: str, token: str):
        self.binary = binary
        self.name = name
        self.host = host
        self.api = api
        self.broker_id = broker_id
        self.token = token
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"meridian-node-{name}-"))
        self.admin_port = free_port()
        self.proc = None
        self.starts = 0

    def start(self, timeout=60):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.log_path = self.data_dir / f"node-{self.starts}.log"
        cmd = [self.binary, "broker", "--listen", "mqtt://127.0.0.1:0",
               "--data-dir", str(self.data_dir / "store"), "--admin", f"127.0.0.1:{self.admin_port}",
               "--control-plane", self.api.base_url, "--broker", self.broker_id, "--token", self.token,
               "--control-plane-ca", str(self.api.data_dir / "tls" / "ca.pem"),
               "--node-id", self.name, "--snapshot-listener-host", self.host]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        self.proc = subprocess.Popen(cmd, stdout=open(self.data_dir / f"node-{self.starts}.out", "w"),
                                     stderr=open(self.log_path, "w"), stdin=subprocess.DEVNULL, env=env)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited ({self.proc.returncode}): {self.log()}")
            return requests.get(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=2).status_code == 200

        try:
            wait_until(f"node {self.name} to serve its admin endpoint", ready, timeout=timeout)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL: no graceful shutdown, like a crashed or power-cycled node."""
        if self.running():
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self):
        if self.proc is not None:
            _stop(self.proc)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# MQTT probes (paho-mqtt, MQTT 5)


class Mqtt:
    """One paho-mqtt v5 connection with synchronous helpers: publish → PUBACK reason code,
    subscribe, received messages."""

    def __init__(self, host: str, port: int, client_id=None, timeout=10.0):
        self.timeout = timeout
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:8]}"
        self.cond = threading.Condition()
        self.connack = None
        self.acks = {}
        self.subacks = {}
        self.messages = []
        self.disconnected = None
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self.client = c
        c.connect(host, port, keepalive=30)
        c.loop_start()
        self._wait(lambda: self.connack is not None or self.disconnected is not None, "CONNACK")
        if self.connack is None:
            self.close()
            raise ConnectionError(f"{host}:{port}: disconnected before CONNACK ({self.disconnected})")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = reason_code.value
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self.acks[mid] = reason_code.value
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = [rc.value for rc in reason_codes]
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnected = reason_code.value if hasattr(reason_code, "value") else reason_code
            self.cond.notify_all()

    def _wait(self, pred, what, timeout=None):
        with self.cond:
            if not self.cond.wait_for(pred, timeout=timeout or self.timeout):
                raise TimeoutError(f"{self.client_id}: no {what} within {timeout or self.timeout} s")

    def publish(self, topic: str, payload: bytes = b"x", timeout=None) -> int:
        """QoS 1 publish; the PUBACK reason code (0 = success, 0x87 = not authorized)."""
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {topic}: rc {info.rc}"
        self._wait(lambda: info.mid in self.acks or self.disconnected is not None, f"PUBACK for {topic}", timeout)
        if info.mid not in self.acks:
            raise ConnectionError(f"{self.client_id}: disconnected ({self.disconnected}) before PUBACK for {topic}")
        return self.acks[info.mid]

    def subscribe(self, topic_filter: str) -> list:
        rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        self._wait(lambda: mid in self.subacks, f"SUBACK for {topic_filter}")
        return self.subacks[mid]

    def wait_message(self, topic: str, payload: bytes, timeout=None):
        self._wait(lambda: (topic, payload) in self.messages, f"message {payload!r} on {topic}", timeout)

    def close(self):
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def connects(host: str, port: int, client_id=None, timeout=3.0) -> bool:
    """True when an MQTT 5 CONNECT to host:port is answered with CONNACK success."""
    try:
        c = Mqtt(host, port, client_id=client_id, timeout=timeout)
    except (OSError, TimeoutError, ConnectionError):
        return False
    ok = c.connack == 0
    c.close()
    return ok


def round_trip(host: str, port: int, topic: str, client_id=None, timeout=10.0) -> None:
    """Subscribe, publish QoS 1 (PUBACK success) and receive it back on one connection."""
    c = Mqtt(host, port, client_id=client_id, timeout=timeout)
    try:
        assert c.connack == 0, f"CONNACK {c.connack:#x}"
        assert c.subscribe(topic) == [1], f"SUBACK for {topic}"
        payload = uuid.uuid4().hex.encode()
        rc = c.publish(topic, payload)
        assert rc == 0, f"PUBACK {rc:#x} for {topic}"
        c.wait_message(topic, payload)
    finally:
        c.close()
