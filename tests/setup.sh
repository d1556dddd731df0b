#!/usr/bin/env bash
# Installs the real peers the test suite uses, only when missing: Mosquitto and its CLI clients,
# the PostgreSQL 15 server, openssl, and a Python venv with paho-mqtt, pytest and the Azure SDKs.
# Idempotent; needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi
# Debian starts a system Mosquitto on 1883 after install; the tests start their own on free ports,
# so a system one is only in the way.
if command -v service >/dev/null 2>&1; then service mosquitto stop >/dev/null 2>&1 || true; fi
pkill -x mosquitto >/dev/null 2>&1 || true

VENV=${MERIDIAN_VENV:-/tmp/meridian-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
reqs=()
for f in tests/interop/requirements.txt tests/sdk/requirements.txt; do [ -f "$f" ] && reqs+=(-r "$f"); done
if [ ${#reqs[@]} -gt 0 ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "${reqs[@]}"
fi
