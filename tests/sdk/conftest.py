"""Fixtures of the SDK test: a throwaway Postgres cluster (or SQLite), a running `meridian api`
over HTTPS with a self-signed local CA, and an Owner token minted by `meridian token`."""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBSCRIPTION = "00000000-0000-0000-0000-0000000000aa"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    path = os.environ.get("MERIDIAN_BIN") or str(
        Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "meridian"
    )
    if not Path(path).exists():
        pytest.fail(f"meridian binary not found at {path}: build it or set MERIDIAN_BIN")
    return path


def _as_postgres(args):
    """Runs args as the postgres OS user when we are root (initdb refuses root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + args
    return args


@pytest.fixture(scope="session")
def database_url():
    if os.environ.get("SDK_STORE", "postgres") == "sqlite":
        yield None
        return
    pg_dir = Path(tempfile.mkdtemp(prefix="meridian-sdk-pg-"))
    if os.geteuid() == 0:
        shutil.chown(pg_dir, "postgres", "postgres")
    port = _free_port()
    subprocess.run(_as_postgres(["initdb", "-D", str(pg_dir / "data"), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres(["pg_ctl", "-D", str(pg_dir / "data"), "-o",
                                 f"-p {port} -k {pg_dir} -c listen_addresses=127.0.0.1",
                                 "-l", str(pg_dir / "log"), "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgres://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(pg_dir / "data"), "-m", "fast", "stop"]),
                       capture_output=True)
        shutil.rmtree(pg_dir, ignore_errors=True)


class Api:
    def __init__(self, base_url: str, ca_path: str, token: str):
        self.base_url = base_url
        self.ca_path = ca_path
        self.token = token


@pytest.fixture(scope="session")
def api(database_url):
    data_dir = Path(tempfile.mkdtemp(prefix="meridian-sdk-data-"))
    binary = _binary()
    cmd = [binary, "api", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--tls-self-signed"]
    if database_url:
        cmd += ["--database-url", database_url]
    log = open(data_dir / "api.log", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    base_url = ca_path = None
    deadline = time.time() + 60
    while time.time() < deadline and (base_url is None or ca_path is None):
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"meridian api exited: {log.read()}")
            continue
        m = re.search(r"listening on (https://\S+)", line)
        if m:
            base_url = m.group(1)
        m = re.search(r"CA certificate \(REQUESTS_CA_BUNDLE\): (\S+)", line)
        if m:
            ca_path = m.group(1)
    if base_url is None or ca_path is None:
        proc.kill()
        pytest.fail("meridian api did not print its URL and CA path")
    token = subprocess.run([binary, "token", "--role", "Owner", "--scope", f"/subscriptions/{SUBSCRIPTION}",
                            "--data-dir", str(data_dir)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield Api(base_url, ca_path, token)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
