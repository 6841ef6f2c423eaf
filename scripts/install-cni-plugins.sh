#!/usr/bin/env bash
# Installs the CNI reference plugins bridge, ptp, host-local and tuning at a version that speaks
# CNI 1.1.0 (STATUS, GC), which Debian 12's containernetworking-plugins (v1.1.1, CNI <= 1.0.0)
# do not. Built from the Go module proxy with `go install`, cached outside the checkout under
# $TAPESTRY_CACHE keyed by version.
# Idempotent: a complete install is left alone. Prints the plugin directory on stdout.
#
#   scripts/install-cni-plugins.sh            # -> ~/.cache/tapestry/cni-plugins-v1.10.0
#   CNI_PLUGINS_VERSION=v1.10.0 TAPESTRY_CACHE=/somewhere scripts/install-cni-plugins.sh
#
# The tests find the directory through $TAPESTRY_CNI_PLUGINS_DIR, else the same default.
set -euo pipefail

VERSION="${CNI_PLUGINS_VERSION:-v1.10.0}"
CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
DEST="$CACHE/cni-plugins-$VERSION"
MODULE="github.com/containernetworking/plugins"
PLUGINS=(main/bridge main/ptp ipam/host-local meta/tuning)
log() { printf '\033[1m[cni-plugins]\033[0m %s\n' "$*" >&2; }

# A plugin counts as installed when it runs and lists CNI 1.1.0.
installed() {
  local bin="$DEST/$1"
  [ -x "$bin" ] || return 1
  echo '{"cniVersion":"1.1.0"}' | CNI_COMMAND=VERSION "$bin" 2>/dev/null | grep -q '"1.1.0"'
}

missing=()
for p in "${PLUGINS[@]}"; do
  installed "$(basename "$p")" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  command -v go >/dev/null || { echo "install-cni-plugins: go is not installed" >&2; exit 1; }
  log "building CNI plugins $VERSION: ${missing[*]} (about a minute cold)"
  mkdir -p "$CACHE"
  tmp="$(mktemp -d "$CACHE/.cni-plugins-$VERSION.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  for p in "${missing[@]}"; do
    # Static binaries, no toolchain download, no VCS stamping of a module-proxy build.
    GOBIN="$tmp" CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
      go install -trimpath "$MODULE/plugins/$p@$VERSION"
  done
  mkdir -p "$DEST"
  for p in "${missing[@]}"; do
    b="$(basename "$p")"
    # rename(2) within one filesystem: a reader never sees a half-written binary.
    mv -f "$tmp/$b" "$DEST/$b"
  done
  for p in "${PLUGINS[@]}"; do
    installed "$(basename "$p")" || { echo "install-cni-plugins: $p does not work" >&2; exit 1; }
  done
fi
echo "$DEST"
