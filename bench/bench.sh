#!/usr/bin/env bash
# `make bench`: build the release binaries, then run every benchmark, one after another
# (bench/README.md), into bench/results/. summary.json there is started afresh, so every key in
# it comes from this run.
#   --quick     every benchmark's smoke run (few rounds, short runs, small sizes; each binary's
#               --help gives its --quick values), into bench/results/quick/ (git-ignored)
#   --out DIR   somewhere else
# Other arguments go to tapestry-bench (the datapath), e.g. `--rounds 5` or `--no-tapestry`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "make bench: run as root (network namespaces, veths, iptables/nftables, eBPF)" >&2
  exit 1
fi

quick=()
out=
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [ -z "$out" ]; then
  if [ ${#quick[@]} -gt 0 ]; then out=bench/results/quick; else out=bench/results; fi
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out/summary.json"
# What every benchmark binary gets: the same mode and the same output directory.
common=("${quick[@]}" --out "$out")
tapestry=1
for a in "${args[@]}"; do [ "$a" = --no-tapestry ] && tapestry=; done
started=$SECONDS
echo "make bench${quick:+ --quick}: results in $out" >&2

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
# Every binary the run uses, in one build: one feature resolution for all of them (a build of
# each package alone resolves its dependencies' features anew and rebuilds them: minutes each).
# tapestryd needs the eBPF toolchain that scripts/setup.sh installs.
cargo build --release -p tapestry-bench -p tapestry-node-daemon -p tapestry-cni-plugin \
  -p tapestry-cli -p tapestry-controller
if [ -n "$tapestry" ]; then
  args=(--tapestryd "$target_dir/release/tapestryd" "${args[@]}")
fi
"$target_dir/release/tapestry-bench" "${common[@]}" "${args[@]}"
if [ -n "$tapestry" ]; then
  # A client outside the node to a NodePort: Tapestry vs kube-proxy-style iptables with 10,000
  # ClusterIP Services besides it, and the direct path (issue 16's nodeport_crr_ratio_iptables_10000).
  TAPESTRY_BIN_DIR="$target_dir/release" "$target_dir/release/tapestry-bench-nodeport" "${common[@]}"
  # The VM pod's costs: CNI ADD latency and the tap path (bench/VM.md).
  "$target_dir/release/tapestry-bench-vm" --bin-dir "$target_dir/release" "${common[@]}"
  # tapestry-install-cni: re-insert latency after the primary rewrites its config.
  "$target_dir/release/tapestry-bench-install" --bin-dir "$target_dir/release" "${common[@]}"
  # What flow events cost: TCP_CRR with them on vs off, and events/s to a reader.
  "$target_dir/release/tapestry-bench-flows" "${common[@]}"
  # Pod sandbox-to-started on a real node: the chain (helm install) vs the primary alone
  # (bench/NODE.md); the chart runs the images of `make images`.
  bash scripts/build-images.sh
  "$target_dir/release/tapestry-bench-node" "${common[@]}"
fi
# tapestry-controller's full resync and peak RSS at 10,000 Services x 50,000 Guests (real apiserver).
"$target_dir/release/tapestry-bench-controller" "${common[@]}"
# Guest Ready -> datapath map latency through the controller and the daemon (real apiserver).
"$target_dir/release/tapestry-bench-guests" "${common[@]}"
# Three nodes (the lab of tests/src/cluster.rs): cross-node VIP vs direct pod IP, and an
# EndpointSlice change reaching every node's maps with 1,000 Services (real apiserver).
"$target_dir/release/tapestry-bench-cluster" "${common[@]}"
# Live migration on the same lab: the client's blackout beyond QEMU's own downtime, and a hung
# guest leaving every node's maps (issue 12; bench/results/migration.md).
"$target_dir/release/tapestry-bench-migration" "${common[@]}"

elapsed=$((SECONDS - started))
echo "make bench${quick:+ --quick}: done in $((elapsed / 60)) min $((elapsed % 60)) s; summary in $out/summary.json" >&2
# A key without a figure: a benchmark that measured nothing (skipped cases say why in their .md).
if grep -q ': null' "$out/summary.json"; then
  echo "make bench: summary keys without a figure:" >&2
  grep ': null' "$out/summary.json" | sed 's/^ */  /' >&2
fi
