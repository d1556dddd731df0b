#!/usr/bin/env bash
# The whole test suite: Rust unit/integration/end-to-end tests (real Postgres, real MQTT clients),
# the Python interop tests (paho-mqtt, mosquitto_pub/sub, kill -9 durability), the Azure SDK tests,
# the OpenAPI drift check (a Rust test) and a bounded fuzz run of the MQTT decoder.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
VENV=${MERIDIAN_VENV:-/tmp/meridian-venv}
TARGET=${CARGO_TARGET_DIR:-target}
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "build"
cargo build --workspace --all-targets

step "rust tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
cargo test --workspace --doc

export MERIDIAN_BIN="$PWD/$TARGET/debug/meridian"
case "$TARGET" in /*) export MERIDIAN_BIN="$TARGET/debug/meridian" ;; esac

if [ -d tests/interop ]; then
  step "interop: paho-mqtt and mosquitto CLI against meridian broker"
  "$VENV/bin/python" -m pytest tests/interop -q
fi
if [ -d tests/sdk ]; then
  step "Azure SDKs against meridian api (Postgres)"
  "$VENV/bin/python" -m pytest tests/sdk -q
fi
if [ -x dataplane/fuzz/run.sh ]; then
  step "fuzz: MQTT decoder, bounded"
  dataplane/fuzz/run.sh "${FUZZ_SECONDS:-60}"
fi
step "all tests passed"
