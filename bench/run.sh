#!/usr/bin/env bash
# One command for the Meridian vs Mosquitto comparison (docs/benchmarks.md):
# builds the release `meridian` binary and `meridian-bench`, then runs every scenario against a
# Meridian and a Mosquitto that the bench starts itself on free loopback ports.
# Extra arguments go to `meridian-bench compare` (e.g. --duration 10 --scenarios tp-1-1-q0).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"

mosquitto="$(command -v mosquitto || true)"
[ -z "$mosquitto" ] && [ -x /usr/sbin/mosquitto ] && mosquitto=/usr/sbin/mosquitto
if [ -z "$mosquitto" ]; then
  echo "mosquitto not found: apt-get install -y mosquitto (and stop its system service)" >&2
  exit 1
fi

# 10,000 idle connections need ~10k descriptors in the bench and in each broker (inherited).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --manifest-path "$root/Cargo.toml" -p meridian -p meridian-bench
exec "$target/release/meridian-bench" compare \
  --meridian-bin "$target/release/meridian" --mosquitto-bin "$mosquitto" "$@"
