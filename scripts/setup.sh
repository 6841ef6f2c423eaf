#!/usr/bin/env bash
# One idempotent set-up for a fresh machine, in two sizes. Everything built from the registries
# is cached outside the checkout under $TAPESTRY_CACHE (default ~/.cache/tapestry), keyed by
# version.
#
#   scripts/setup.sh --demo       `make demo` (make setup-demo): what tapestry-demo uses and
#                                 nothing else: the Debian packages of DEMO_PACKAGES, the nightly
#                                 toolchain with rust-src, bpf-linker built against that nightly's
#                                 own LLVM, bpffs, the QEMU guest's kernel + initramfs.
#   scripts/setup.sh              everything (make setup: make test, make bench, make demo-cluster,
#                                 make demo-node, make images): the above, and the rest of the
#                                 Debian packages, clippy, rustfmt, the musl target (images), the
#                                 CNI reference plugins, the Kubernetes binaries and helm, the real
#                                 node's images.
#   scripts/setup.sh --with-fuzz  everything and cargo-fuzz (make fuzz, make reliability).
set -euo pipefail

CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
BPF_LINKER_VERSION="0.13.0"
CARGO_FUZZ_VERSION="0.13.2"
DEMO_ONLY=false
WITH_FUZZ=false
for arg in "$@"; do
  case "$arg" in
    --demo) DEMO_ONLY=true ;;
    --with-fuzz) WITH_FUZZ=true ;;
    -h | --help)
      sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup: unknown argument '$arg' (--demo, --with-fuzz)" >&2
      exit 2
      ;;
  esac
done
if [ "$DEMO_ONLY" = true ] && [ "$WITH_FUZZ" = true ]; then
  echo "setup: --with-fuzz sets up everything; it does not go with --demo" >&2
  exit 2
fi
mkdir -p "$CACHE"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (network namespaces, bpffs and tc need it)" >&2
    exit 1
  fi
}

# --- Debian packages -----------------------------------------------------------------------
# What tapestry-demo runs (tests/src/bin/demo.rs): the lab and the daemon need `ip` and mount;
# the VM pod's CNI chain is Debian's ptp + host-local from /usr/lib/cni (CNI 1.0.0 is enough);
# the guest is QEMU with a busybox initramfs (scripts/build-guest.sh: cpio, and musl-gcc for its
# static UDP server, so the initramfs `make setup` would build is the same one).
DEMO_PACKAGES=(
  # the linker and C runtime every Rust build links with (and ring's C parts)
  gcc libc6-dev
  iproute2 util-linux
  containernetworking-plugins
  qemu-system-x86 busybox-static cpio musl-tools
)
# The rest, for make test, make bench, make demo-cluster, make demo-node and make images.
TEST_PACKAGES=(
  iptables nftables ethtool bpftool procps psmisc openssl
  # the lab's pods ask the apiserver's /readyz through the kubernetes ClusterIP (tests/tests/cluster.rs)
  curl
  # runtimes (containerd: the real node of tests/src/node.rs; podman: the images)
  podman runc containerd
  # plots for `make bench`
  gnuplot-nox
  # `file` checks the images' musl binaries are static
  file
)
install_packages() { # $@ = packages
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# --- Rust toolchains -----------------------------------------------------------------------
# The nightly with rust-src builds the eBPF programs (node-daemon's build.rs, -Z build-std=core).
install_rust_nightly() {
  if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
  fi
  if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
  fi
}
# make lint (clippy, rustfmt) and make images (the musl target).
install_rust_tools() {
  rustup component list --installed | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
  rustup target list --installed | grep -q x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
}

# --- bpf-linker against the nightly's own libLLVM --------------------------------------------
install_bpf_linker() {
  local sysroot llvm_major rustc_hash prefix bin
  sysroot="$(rustc +nightly --print sysroot)"
  llvm_major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
  rustc_hash="$(rustc +nightly -vV | sed -n 's/^commit-hash: \(.\{12\}\).*/\1/p')"
  prefix="$CACHE/bpf-linker-$BPF_LINKER_VERSION-llvm$llvm_major-$rustc_hash"
  bin="$prefix/bin/bpf-linker"
  if [ ! -x "$bin" ] || ! "$bin" --version >/dev/null 2>&1; then
    log "building bpf-linker $BPF_LINKER_VERSION against the nightly's LLVM $llvm_major (1-2 min)"
    mkdir -p "$prefix/llvm/lib"
    for f in "$sysroot"/lib/libLLVM*; do ln -sf "$f" "$prefix/llvm/lib/"; done
    ln -sf "$(ls "$sysroot"/lib/libLLVM.so.*-rust-* | head -n1)" "$prefix/llvm/lib/libLLVM.so"
    LLVM_PREFIX="$prefix/llvm" cargo +stable install bpf-linker --locked \
      --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$llvm_major" \
      --root "$prefix" -q
  fi
  mkdir -p "${CARGO_HOME:-$HOME/.cargo}/bin"
  ln -sf "$bin" "${CARGO_HOME:-$HOME/.cargo}/bin/bpf-linker"
}

# --- cargo-fuzz (`make fuzz`) --------------------------------------------------------------
install_cargo_fuzz() {
  local prefix="$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
  local bin="$prefix/bin/cargo-fuzz"
  if [ ! -x "$bin" ] || ! "$bin" --version >/dev/null 2>&1; then
    log "building cargo-fuzz $CARGO_FUZZ_VERSION (2-3 min)"
    cargo +stable install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$prefix" -q
  fi
  mkdir -p "${CARGO_HOME:-$HOME/.cargo}/bin"
  ln -sf "$bin" "${CARGO_HOME:-$HOME/.cargo}/bin/cargo-fuzz"
}

# --- bpffs ---------------------------------------------------------------------------------
mount_bpffs() {
  if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    log "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
  fi
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
need_root

# --- what make demo needs ------------------------------------------------------------------
if [ "$DEMO_ONLY" = true ]; then
  install_packages "${DEMO_PACKAGES[@]}"
else
  install_packages "${DEMO_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
fi
install_rust_nightly
install_bpf_linker
mount_bpffs
# The QEMU guest's kernel + initramfs (the demo's VM pod and the tests' guests).
"$ROOT/scripts/build-guest.sh" >/dev/null
if [ "$DEMO_ONLY" = true ]; then
  log "ready for make demo"
  exit 0
fi

# --- the rest: make test, make bench, make demo-cluster, make demo-node, make images --------
install_rust_tools
# cargo-fuzz only for `make fuzz` / `make reliability` (`setup.sh --with-fuzz`): 2-3 minutes a
# fresh `make demo` or `make test` does not need (make test replays the corpora without it).
if [ "$WITH_FUZZ" = true ]; then
  install_cargo_fuzz
fi
# Go comes with the machine image (Debian's golang-go is too old for the modules built here).
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "setup: Go >= 1.24 is needed (the image has it in /usr/local/go)" >&2; exit 1; }
# Test parts built from the registries, each cached by version under $CACHE: CNI reference
# plugins that speak 1.1.0 (STATUS, GC), Kubernetes.
"$ROOT/scripts/install-cni-plugins.sh" >/dev/null
# A real kube-apiserver, etcd, kubectl and kube-controller-manager for the Kubernetes tests,
# built from the Go module proxy by the committed module in tests/k8s.
"$ROOT/scripts/build-k8s.sh" >/dev/null
# kubelet and kube-scheduler for the real node (tests/src/node.rs), helm for the chart
# (deploy/helm, tests/tests/deploy.rs).
"$ROOT/scripts/build-k8s.sh" kubelet kube-scheduler helm >/dev/null
# The real node's own images (pause, busybox, the VM pod's QEMU), cached by input hash.
"$ROOT/tests/node/build-images.sh" >/dev/null
# Upstream's sig-network e2e binary, ginkgo, CoreDNS and the images of its Service specs.
"$ROOT/scripts/build-e2e.sh" >/dev/null
log "ready"
