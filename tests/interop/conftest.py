"""Fixtures for the interop suite: a real broker process on free loopback ports, and a thin
synchronous wrapper around paho-mqtt 2.x.

The broker under test is Meridian by default (binary from $MERIDIAN_BIN, else
<repo>/target/debug/meridian). With BROKER=mosquitto the same tests run against a Mosquitto
started from a generated config; that is how the tests themselves were checked before
Meridian's broker existed.
"""

from __future__ import annotations

import os
import queue
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
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[2]
KIND = os.environ.get("BROKER", "meridian")
MERIDIAN_BIN = Path(os.environ.get("MERIDIAN_BIN", REPO / "target" / "debug" / "meridian"))
MOSQUITTO_BIN = os.environ.get("MOSQUITTO_BIN", shutil.which("mosquitto") or "/usr/sbin/mosquitto")

PROTOCOLS = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, made by the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class Broker:
    """One broker process with TCP, WebSocket (/mqtt) and TLS listeners on free ports.

    `restart()` reuses the same ports and data directory, which is what a durability test needs.
    """

    def __init__(self, workdir: Path, kind: str = KIND, fsync: str | None = None):
        self.kind = kind
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = make_cert(workdir)
        self.port = free_port()
        self.ws_port = free_port()
        self.tls_port = free_port()
        self.admin_port = free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "broker.log"
        self.starts = 0

    def command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                "\n".join(
                    [
                        # Running as root: stay root so the temp dir stays readable/writable.
                        "user root",
                        "per_listener_settings false",
                        "allow_anonymous true",
                        "sys_interval 1",
                        "persistence true",
                        f"persistence_location {self.data_dir}/",
                        "max_queued_messages 100000",
                        "max_inflight_messages 100",
                        f"listener {self.port} 127.0.0.1",
                        f"listener {self.ws_port} 127.0.0.1",
                        "protocol websockets",
                        f"listener {self.tls_port} 127.0.0.1",
                        f"certfile {self.cert}",
                        f"keyfile {self.key}",
                        "",
                    ]
                )
            )
            return [MOSQUITTO_BIN, "-c", str(conf)]
        if not MERIDIAN_BIN.exists():
            pytest.fail(f"Meridian binary not found at {MERIDIAN_BIN} (set MERIDIAN_BIN)")
        cmd = [
            str(MERIDIAN_BIN), "broker",
            "--listen", f"mqtt://127.0.0.1:{self.port}",
            "--listen", f"ws://127.0.0.1:{self.ws_port}/mqtt",
            "--listen", f"mqtts://127.0.0.1:{self.tls_port}",
            "--tls-cert", str(self.cert),
            "--tls-key", str(self.key),
            "--data-dir", str(self.data_dir),
            "--admin", f"127.0.0.1:{self.admin_port}",
            "--allow-anonymous",
        ]
        if self.fsync:
            cmd += ["--fsync", self.fsync]
        return cmd

    def start(self) -> "Broker":
        self.starts += 1
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.kind} exited at start ({self.proc.returncode}):\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    # Every listener must be up, not just the first.
                    with socket.create_connection(("127.0.0.1", self.ws_port), timeout=0.5):
                        with socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.5):
                            return self
            except OSError:
                time.sleep(0.05)
        self.kill9()
        pytest.fail(f"{self.kind} did not listen within 20 s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def restart(self) -> "Broker":
        return self.start()


@pytest.fixture(scope="session")
def broker():
    with tempfile.TemporaryDirectory(prefix="meridian-interop-") as d:
        b = Broker(Path(d)).start()
        yield b
        b.stop()


@pytest.fixture
def fresh_broker_dir():
    with tempfile.TemporaryDirectory(prefix="meridian-interop-") as d:
        yield Path(d)


@pytest.fixture
def topic():
    """A topic prefix no other test uses (the session broker is shared)."""
    return f"it/{uuid.uuid4().hex[:10]}"


class Client:
    """A connected paho client with blocking helpers and a queue of received messages."""

    def __init__(
        self,
        broker: Broker,
        protocol: int,
        client_id: str = "",
        clean: bool = True,
        session_expiry: int | None = None,
        transport: str = "tcp",
        tls: bool = False,
        will: tuple[str, bytes, int, bool] | None = None,
        connect_timeout: float = 10,
    ):
        self.broker = broker
        self.protocol = protocol
        self.clean = clean
        self.session_expiry = session_expiry
        kwargs = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            transport=transport,
            reconnect_on_failure=False,
            **kwargs,
        )
        self.c.max_inflight_messages_set(100)
        self.c.max_queued_messages_set(0)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        if tls:
            self.c.tls_set(ca_certs=str(broker.cert))
        if will:
            self.c.will_set(*will)
        self.messages: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack = None
        self.suback: dict[int, list] = {}
        self.sub_cv = threading.Condition()
        self.acked: dict[int, object] = {}
        self.ack_cv = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        port = {"tcp": broker.port, "websockets": broker.ws_port}[transport]
        if tls:
            port = broker.tls_port
        props = None
        if protocol == mqtt.MQTTv5 and session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        if protocol == mqtt.MQTTv5:
            self.c.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        if not self.connected.wait(connect_timeout):
            self.c.loop_stop()
            raise AssertionError("no CONNACK within timeout")
        rc = self.connack[1]
        assert not rc.is_failure, f"CONNACK refused: {rc}"

    def _on_connect(self, c, u, flags, rc, props):
        self.connack = (flags, rc, props)
        self.connected.set()

    def _on_subscribe(self, c, u, mid, rcs, props):
        with self.sub_cv:
            self.suback[mid] = rcs
            self.sub_cv.notify_all()

    def _on_publish(self, c, u, mid, rc, props):
        with self.ack_cv:
            self.acked[mid] = rc
            self.ack_cv.notify_all()

    @property
    def session_present(self) -> bool:
        return bool(self.connack[0].session_present)

    def subscribe(self, filt: str, qos: int = 0, props: Properties | None = None, **opts):
        if self.protocol == mqtt.MQTTv5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            arg = (filt, SubscribeOptions(qos=qos, **opts))
            rc, mid = self.c.subscribe([arg], properties=props)
        else:
            rc, mid = self.c.subscribe(filt, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self.sub_cv:
            assert self.sub_cv.wait_for(lambda: mid in self.suback, 10), "no SUBACK"
            codes = self.suback[mid]
        for code in codes:
            assert not code.is_failure, f"subscription to {filt} refused: {code}"
        return codes

    def publish(self, topic: str, payload=b"", qos: int = 0, retain: bool = False, props=None,
                wait: bool = True):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed locally: {info.rc}"
        if wait and qos > 0:
            self.wait_acked([info.mid])
        return info

    def wait_acked(self, mids, timeout: float = 30):
        with self.ack_cv:
            ok = self.ack_cv.wait_for(lambda: all(m in self.acked for m in mids), timeout)
        assert ok, f"{sum(m not in self.acked for m in mids)} publishes not acknowledged"

    def recv(self, timeout: float = 5):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def recv_n(self, n: int, timeout: float = 10) -> list:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            m = self.recv(left)
            if m is None:
                break
            out.append(m)
        return out

    def drain(self, quiet: float = 0.5) -> list:
        """Everything that arrives until nothing has arrived for `quiet` seconds."""
        out = []
        while (m := self.recv(quiet)) is not None:
            out.append(m)
        return out

    def disconnect(self):
        self.c.disconnect()
        self.disconnected.wait(5)
        self.c.loop_stop()

    def drop(self):
        """Close the TCP connection without DISCONNECT, as a crashed client would."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.fixture
def clients():
    """Factory for connected clients; all are disconnected after the test."""
    made: list[Client] = []

    def make(broker: Broker, protocol: int, **kw) -> Client:
        c = Client(broker, protocol, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.c.disconnect()
            c.c.loop_stop()
        except Exception:
            pass
