#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: Debian packages, the nightly toolchain with
# rust-src, bpf-linker built against that nightly's own LLVM, bpffs, and the test parts. Run by
# `make demo`, `make test` and `make bench` (through `make setup`); `--with-fuzz` adds cargo-fuzz
# (`make fuzz`, `make reliability`). Everything built
# from the registries is cached outside the checkout under $TAPESTRY_CACHE, keyed by version.
set -euo pipefail

CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
BPF_LINKER_VERSION="0.13.0"
CARGO_FUZZ_VERSION="0.13.2"
mkdir -p "$CACHE"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (network namespaces, bpffs and tc need it)" >&2
    exit 1
  fi
}

# --- Debian packages -----------------------------------------------------------------------
DEB_PACKAGES=(
  iproute2 iptables nftables ethtool bpftool procps psmisc util-linux openssl
  # the lab's pods ask the apiserver's /readyz through the kubernetes ClusterIP (tests/tests/cluster.rs)
  curl
  # CNI and runtimes (containerd: the real node of tests/src/node.rs)
  containernetworking-plugins podman runc containerd
  # guests under software emulation (CNI issue)
  qemu-system-x86 busybox-static cpio
  # plots for `make bench`
  gnuplot-nox
  # static (musl) binaries for FROM scratch images (`file` checks they are static)
  musl-tools file
)
install_packages() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
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
install_rust() {
  if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
  fi
  if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
  fi
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
  mkdir -p "$HOME/.cargo/bin"
  ln -sf "$bin" "$HOME/.cargo/bin/bpf-linker"
}

# --- cargo-fuzz (`make fuzz`) --------------------------------------------------------------
install_cargo_fuzz() {
  local prefix="$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
  local bin="$prefix/bin/cargo-fuzz"
  if [ ! -x "$bin" ] || ! "$bin" --version >/dev/null 2>&1; then
    log "building cargo-fuzz $CARGO_FUZZ_VERSION (2-3 min)"
    cargo +stable install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$prefix" -q
  fi
  mkdir -p "$HOME/.cargo/bin"
  ln -sf "$bin" "$HOME/.cargo/bin/cargo-fuzz"
}

# --- bpffs ---------------------------------------------------------------------------------
mount_bpffs() {
  if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    log "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
  fi
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# Go comes with the machine image (Debian's golang-go is too old for the modules built here).
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "setup: Go >= 1.24 is needed (the image has it in /usr/local/go)" >&2; exit 1; }

need_root
install_packages
install_rust
install_bpf_linker
# cargo-fuzz only for `make fuzz` / `make reliability` (`setup.sh --with-fuzz`): 2-3 minutes a
# fresh `make demo` or `make test` does not need (make test replays the corpora without it).
if [ "${1:-}" = "--with-fuzz" ]; then
  install_cargo_fuzz
fi
mount_bpffs
# Test parts built from the registries, each cached by version under $CACHE: CNI reference
# plugins that speak 1.1.0 (STATUS, GC), the QEMU guest's kernel + initramfs, Kubernetes.
"$ROOT/scripts/install-cni-plugins.sh" >/dev/null
"$ROOT/scripts/build-guest.sh" >/dev/null
# A real kube-apiserver, etcd, kubectl and kube-controller-manager for the Kubernetes tests,
# built from the Go module proxy by the committed module in tests/k8s.
"$ROOT/scripts/build-k8s.sh" >/dev/null
# kubelet and kube-scheduler for the real node (tests/src/node.rs), helm for the chart
# (deploy/helm, tests/tests/deploy.rs).
"$ROOT/scripts/build-k8s.sh" kubelet kube-scheduler helm >/dev/null
# The real node's own images (pause, busybox, the VM pod's QEMU), cached by input hash.
"$ROOT/tests/node/build-images.sh" >/dev/null
log "ready"
