"""Interop with the mosquitto_pub / mosquitto_sub command-line clients (MQTT 3.1.1 and 5.0).

Same broker fixture as test_paho.py: Meridian by default, Mosquitto with BROKER=mosquitto.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
    reason="mosquitto-clients not installed (apt-get install mosquitto-clients)",
)

VERSIONS = pytest.mark.parametrize("ver", ["mqttv311", "mqttv5"])
SEP = "\x1f"  # field separator in -F output that no payload here contains


def cid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def target(broker, tls: bool = False) -> list[str]:
    if tls:
        return ["-h", "127.0.0.1", "-p", str(broker.tls_port), "--cafile", str(broker.cert)]
    return ["-h", "127.0.0.1", "-p", str(broker.port)]


class Sub:
    """A mosquitto_sub process; `-d` output tells us when the SUBACK arrived."""

    def __init__(self, broker, args: list[str], fmt: str = "%t|%q|%r|%p", tls: bool = False):
        self.p = subprocess.Popen(
            # stdbuf: mosquitto_sub uses stdio, fully buffered on a pipe; we need each line now.
            ["stdbuf", "-oL", "mosquitto_sub", "-d", *target(broker, tls), *args, "-F", "MSG" + SEP + fmt.replace("|", SEP)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue = queue.Queue()
        self.debug: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_subscribed(self, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.debug.append(line)
            # "Subscribed (mid: ...)" is printed after the SUBACK callback has run; a signal
            # sent before that point is sometimes ignored by mosquitto_sub.
            if line.startswith("Subscribed"):
                time.sleep(0.1)
                return self
        raise AssertionError(f"mosquitto_sub never subscribed: {self.debug[-10:]}")

    def messages(self, n: int, timeout: float = 10) -> list[list[str]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("MSG" + SEP):
                out.append(line.split(SEP)[1:])
            else:
                self.debug.append(line)
        return out

    def stop(self, sig=signal.SIGINT):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


@pytest.fixture
def subs():
    made: list[Sub] = []

    def make(*a, **kw) -> Sub:
        s = Sub(*a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(signal.SIGKILL)


def pub(broker, args: list[str], tls: bool = False, stdin: str | None = None):
    r = subprocess.run(
        ["mosquitto_pub", *target(broker, tls), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0, f"mosquitto_pub failed ({r.returncode}): {r.stdout}{r.stderr}"


@VERSIONS
@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_cli_pubsub(broker, subs, topic, ver, qos):
    s = subs(broker, ["-V", ver, "-q", qos, "-t", f"{topic}/c", "-i", cid("sub")]).wait_subscribed()
    lines = "\n".join(f"line {i}" for i in range(5)) + "\n"
    pub(broker, ["-V", ver, "-q", qos, "-t", f"{topic}/c", "-l"], stdin=lines)
    got = s.messages(5)
    assert [g[3] for g in got] == [f"line {i}" for i in range(5)]
    assert all(g[0] == f"{topic}/c" and g[1] == qos for g in got)


@VERSIONS
def test_cli_retained_set_and_clear(broker, subs, topic, ver):
    pub(broker, ["-V", ver, "-q", "1", "-r", "-t", f"{topic}/r", "-m", "kept"])
    s = subs(broker, ["-V", ver, "-t", f"{topic}/r", "-C", "1", "-W", "5"])
    got = s.messages(1)
    assert got and got[0][3] == "kept" and got[0][2] == "1", f"retained not delivered: {got}"
    pub(broker, ["-V", ver, "-q", "1", "-r", "-t", f"{topic}/r", "-n"])
    s2 = subs(broker, ["-V", ver, "-t", f"{topic}/r", "-W", "2"])
    assert s2.messages(1, timeout=3) == [], "cleared retained message delivered"


@VERSIONS
def test_cli_will_on_kill9(broker, subs, topic, ver):
    watcher = subs(broker, ["-V", ver, "-q", "1", "-t", f"{topic}/will"]).wait_subscribed()
    dying = subs(
        broker,
        ["-V", ver, "-t", f"{topic}/other", "--will-topic", f"{topic}/will",
         "--will-payload", "gone", "--will-qos", "1"],
    ).wait_subscribed()
    dying.stop(signal.SIGKILL)
    got = watcher.messages(1, timeout=10)
    assert got and got[0][3] == "gone" and got[0][0] == f"{topic}/will"


@VERSIONS
def test_cli_persistent_session(broker, subs, topic, ver):
    client_id = cid("persist")
    extra = ["-x", "300"] if ver == "mqttv5" else []
    args = ["-V", ver, "-q", "1", "-c", "-i", client_id, "-t", f"{topic}/p", *extra]
    first = subs(broker, args).wait_subscribed()
    first.stop(signal.SIGINT)  # a clean DISCONNECT; the session stays
    pub(broker, ["-V", ver, "-q", "1", "-t", f"{topic}/p", "-l"],
        stdin="".join(f"queued {i}\n" for i in range(5)))
    back = subs(broker, [*args, "-C", "5", "-W", "10"])
    got = back.messages(5)
    assert [g[3] for g in got] == [f"queued {i}" for i in range(5)]


@VERSIONS
def test_cli_tls(broker, subs, topic, ver):
    s = subs(broker, ["-V", ver, "-q", "2", "-t", f"{topic}/tls"], tls=True).wait_subscribed()
    pub(broker, ["-V", ver, "-q", "2", "-t", f"{topic}/tls", "-m", "over tls"], tls=True)
    got = s.messages(1)
    assert got and got[0][3] == "over tls" and got[0][1] == "2"


def test_cli_tls_rejects_untrusted_ca(broker, tmp_path):
    """The client side check works: a CA that did not sign the server certificate fails."""
    from conftest import make_cert

    other_ca, _ = make_cert(tmp_path)
    r = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.tls_port), "--cafile", str(other_ca),
         "-t", "x", "-m", "y"],
        capture_output=True, text=True, timeout=20,
    )
    assert r.returncode != 0


def test_cli_v5_properties_forwarded(broker, subs, topic):
    s = subs(
        broker, ["-V", "mqttv5", "-q", "1", "-t", f"{topic}/props"], fmt="%P|%C|%R|%D|%p"
    ).wait_subscribed()
    pub(broker, [
        "-V", "mqttv5", "-q", "1", "-t", f"{topic}/props", "-m", "body",
        "-D", "publish", "user-property", "k", "v1",
        "-D", "publish", "user-property", "k", "v2",
        "-D", "publish", "content-type", "text/plain",
        "-D", "publish", "response-topic", f"{topic}/reply",
        "-D", "publish", "correlation-data", "corr-42",
    ])
    got = s.messages(1)
    assert got, "message not delivered"
    props, ctype, resp, corr, body = got[0]
    assert props == "k:v1 k:v2", f"user properties: {props!r}"
    assert (ctype, resp, corr, body) == ("text/plain", f"{topic}/reply", "corr-42", "body")


def test_cli_v5_message_expiry(broker, subs, topic):
    client_id = cid("exp")
    args = ["-V", "mqttv5", "-q", "1", "-c", "-x", "300", "-i", client_id, "-t", f"{topic}/e"]
    subs(broker, args).wait_subscribed().stop(signal.SIGINT)
    pub(broker, ["-V", "mqttv5", "-q", "1", "-t", f"{topic}/e", "-m", "short",
                 "-D", "publish", "message-expiry-interval", "1"])
    pub(broker, ["-V", "mqttv5", "-q", "1", "-t", f"{topic}/e", "-m", "long",
                 "-D", "publish", "message-expiry-interval", "60"])
    time.sleep(2.5)
    back = subs(broker, [*args, "-W", "3"])
    assert [g[3] for g in back.messages(2, timeout=4)] == ["long"]
