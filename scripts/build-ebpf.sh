#!/usr/bin/env bash
# Builds the eBPF object alone, exactly as node-daemon's build.rs (aya-build) does: handy to
# iterate on the programs and read verifier-facing code without rebuilding the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_ENCODED_RUSTFLAGS=$'--cfg=bpf_target_arch="x86_64"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf'
exec cargo +nightly build -p tapestry-ebpf --bins --release --target bpfel-unknown-none \
  -Z build-std=core --target-dir target/ebpf "$@"
