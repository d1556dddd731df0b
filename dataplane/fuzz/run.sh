#!/usr/bin/env bash
# Bounded fuzz run of the codec decoder, for CI.
#
#   dataplane/fuzz/run.sh SECONDS      (default 60)
#
# Installs cargo-fuzz if missing. Only stable Rust is available here, so RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass its -Z flags. No sanitizer: the codec forbids `unsafe`, so AddressSanitizer would
# only slow the run down; panics (assertions, overflow checks, debug assertions) are what we hunt.
# Exits non-zero if the fuzzer finds a crash (the input is left in dataplane/fuzz/artifacts/decode/).
set -euo pipefail

secs="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$here"
mkdir -p corpus/decode
exec cargo fuzz run --fuzz-dir "$here" --sanitizer none decode corpus/decode -- \
    -max_total_time="$secs" -max_len=4096 -timeout=10 -print_final_stats=1
