#!/usr/bin/env bash
# `make bench`: build the release binaries, then run every datapath case side by side
# (bench/README.md). Extra arguments go to tapestry-bench, e.g. `--rounds 5` or `--no-tapestry`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "make bench: run as root (network namespaces, veths, iptables/nftables, eBPF)" >&2
  exit 1
fi

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p tapestry-bench
args=("$@")
if [[ " $* " != *" --no-tapestry "* ]]; then
  # Needs the eBPF toolchain that scripts/setup.sh installs.
  cargo build --release -p tapestry-node-daemon
  args=(--tapestryd "$target_dir/release/tapestryd" "${args[@]}")
fi
"$target_dir/release/tapestry-bench" "${args[@]}"
if [[ " $* " != *" --no-tapestry "* ]]; then
  # A client outside the node to a NodePort: Tapestry vs kube-proxy-style iptables with 10,000
  # ClusterIP Services besides it, and the direct path (issue 16's nodeport_crr_ratio_iptables_10000).
  TAPESTRY_BIN_DIR="$target_dir/release" "$target_dir/release/tapestry-bench-nodeport"
fi
if [[ " $* " != *" --no-tapestry "* ]]; then
  # The VM pod's costs: CNI ADD latency and the tap path (bench/VM.md).
  cargo build --release -p tapestry-cni-plugin
  "$target_dir/release/tapestry-bench-vm" --bin-dir "$target_dir/release"
  # tapestry-install-cni: re-insert latency after the primary rewrites its config.
  "$target_dir/release/tapestry-bench-install" --bin-dir "$target_dir/release"
  # What flow events cost: TCP_CRR with them on vs off, and events/s to a reader.
  cargo build --release -p tapestry-cli
  "$target_dir/release/tapestry-bench-flows"
  # Pod sandbox-to-started on a real node: the chain (helm install) vs the primary alone
  # (bench/NODE.md); the chart runs the images of `make images`.
  bash scripts/build-images.sh
  "$target_dir/release/tapestry-bench-node"
fi
# tapestry-controller's full resync and peak RSS at 10,000 Services x 50,000 Guests (real apiserver).
cargo build --release -p tapestry-controller && "$target_dir/release/tapestry-bench-controller"
# Guest Ready -> datapath map latency through the controller and the daemon (real apiserver).
cargo build --release -p tapestry-node-daemon -p tapestry-controller -p tapestry-bench && "$target_dir/release/tapestry-bench-guests"
# Three nodes (the lab of tests/src/cluster.rs): cross-node VIP vs direct pod IP, and an
# EndpointSlice change reaching every node's maps with 1,000 Services (real apiserver).
cargo build --release -p tapestry-node-daemon -p tapestry-cni-plugin -p tapestry-controller -p tapestry-bench && "$target_dir/release/tapestry-bench-cluster"
# Live migration on the same lab: the client's blackout beyond QEMU's own downtime, and a hung
# guest leaving every node's maps (issue 12; bench/results/migration.md).
"$target_dir/release/tapestry-bench-migration"
