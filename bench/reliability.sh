#!/usr/bin/env bash
# `make reliability`: fuzzing (make fuzz, FUZZ_SECONDS each), the in-kernel checks (the
# differential tests of the four tc programs, the hostile guest), then faults under load on the
# standalone lab (tapestry-reliability), folded into bench/results/reliability.json and
# reliability.md. RELIABILITY_ARGS=--quick shortens the fault rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "make reliability: run as root (network namespaces, veths, eBPF)" >&2
  exit 1
fi
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
results=bench/results
mkdir -p "$results"
lines="$(mktemp "${TMPDIR:-/tmp}/tapestry-reliability.XXXXXX")"
trap 'rm -f "$lines"' EXIT

# A crash fails the fuzz step, but the rest of the report is still worth having: noted, not fatal.
fuzz_status=0
FUZZ_SECONDS="${FUZZ_SECONDS:-30}" bash scripts/fuzz.sh || fuzz_status=$?

cargo build --workspace --bins
cargo test -p tapestry-node-daemon --test datapath --test guest_programs generated -- --nocapture 2>>"$lines"
cargo test -p tapestry-tests --test hostile_guest -- --nocapture 2>>"$lines"

cargo build --release -p tapestry-bench --bin tapestry-reliability
cargo build --release -p tapestry-node-daemon -p tapestry-cni-plugin --bins
"$target_dir/release/tapestry-reliability" --report "$results" --test-lines "$lines" ${RELIABILITY_ARGS:-}
if [ "$fuzz_status" != 0 ]; then
  echo "make reliability: a fuzz target crashed (see above and fuzz/artifacts/)" >&2
  exit "$fuzz_status"
fi
