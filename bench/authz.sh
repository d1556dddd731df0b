#!/usr/bin/env bash
# One command for "Authorization on the hot path" (docs/benchmarks.md, issue 5): builds the release
# `meridian` binary and `meridian-bench`, then `meridian-bench authz` starts a fresh broker node per
# measurement, pushes a snapshot to its admin endpoint (PUT /v1/snapshot) that opens a listener
# with authorization off / 1,000 IoT Operations rules / an Event Grid namespace with 1,000
# bindings, probes that the policy is enforced, and runs the same throughput load against each.
# Extra arguments go to `meridian-bench authz` (e.g. --rounds 5 --modes off,rules).
# Exit status 1 when a mode misses the target or a probe shows authorization not enforced.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --manifest-path "$root/Cargo.toml" -p meridian -p meridian-bench
exec "$target/release/meridian-bench" authz --meridian-bin "$target/release/meridian" "$@"
