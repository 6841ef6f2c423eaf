#!/usr/bin/env bash
# Builds what running upstream Kubernetes sig-network Service e2e specs against the real test node
# needs, from the Go module proxy and Debian's archive, using the modules committed in tests/e2e/
# (go.mod + go.sum pin every version; tests/e2e/update.sh keeps it in step with tests/k8s).
# Idempotent: nothing is built again for the same go.sum and inputs. Nothing goes into the
# checkout. Prints the output directory on stdout (logs go to stderr). Layout (TAPESTRY_CACHE
# defaults to ~/.cache/tapestry):
#
#   $TAPESTRY_CACHE/e2e-<k8s version>-<sha256(tests/e2e/go.sum + coredns/go.sum), 12 hex>/
#     bin/e2e.test     the e2e suite with only the sig-network specs (tests/e2e/suite)
#     bin/ginkgo       the ginkgo v2 CLI at the version go.mod requires
#     bin/agnhost      k8s.io/kubernetes/test/images/agnhost, static
#     bin/coredns      a minimal static CoreDNS (tests/e2e/coredns: kubernetes, errors, health,
#                      ready, cache, loadbalance, log, reload, forward, hosts)
#     images/<name>-<tag>-<sha256 of the inputs, 12 hex>.oci.tar
#     images.txt       one line per image: `<image reference> <archive path>`
#   $TAPESTRY_CACHE/e2e-debs/<hash of the package list>/   Debian's curl, wget, bash, dash,
#                      netcat-openbsd and their libraries (apt-get download, once; delete to refresh)
#   $TAPESTRY_CACHE/go/mod, go/build   GOMODCACHE and GOCACHE, shared with scripts/build-k8s.sh
#
# Images (the names test/utils/image/manifest.go gives them, so the node never pulls; import with
# `ctr -n k8s.io images import <archive>`, which keeps the full name podman saved):
#   registry.k8s.io/e2e-test-images/agnhost:<tag>   /agnhost (+ /agnhost-2) and the toolbox
#   registry.k8s.io/e2e-test-images/busybox:<tag>   the toolbox: /bin/sh = dash; Debian's curl,
#                                                   wget, bash, nc (openbsd) and their libraries;
#                                                   busybox-static applets for the rest
#   registry.k8s.io/pause:<tag>                     the static pause of tests/node/build-images.sh
#   localhost/tapestry-test/coredns:<version>       /coredns
# Needs: Go >= the go line of tests/e2e/go.mod, podman + runc, apt-get and dpkg-deb,
# busybox-static, what tests/node/build-images.sh pause needs (scripts/setup.sh installs them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOD="$ROOT/tests/e2e"
DNSMOD="$MOD/coredns"
CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
BUSYBOX=/bin/busybox
# This machine's podman needs runc (crun refuses the hybrid cgroup layout) and cgroupfs.
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
# The toolbox of the agnhost and busybox images: Debian packages and what they ship.
TOOL_PACKAGES=(dash bash curl wget netcat-openbsd)
TOOL_BINARIES=(/bin/dash /bin/bash /usr/bin/curl /usr/bin/wget /bin/nc.openbsd)
# The plugins tests/e2e/coredns/main.go links (`coredns -plugins` also lists debug, dnstap,
# metadata, prometheus and transfer: packages of forward, cache, log and kubernetes register them).
COREDNS_PLUGINS=(kubernetes errors health ready cache loadbalance log reload forward hosts)
# Busybox applets the toolbox has from Debian (sh is dash); the other applets are links.
NOT_BUSYBOX=(sh nc wget curl bash)
log() { printf '\033[1m[build-e2e]\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1m[build-e2e]\033[0m error: %s\n' "$*" >&2
  exit 1
}
case "${1:-}" in
  -h | --help)
    sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  "") ;;
  *) die "no arguments expected (--help)" ;;
esac

# --- Go --------------------------------------------------------------------------------------
command -v go >/dev/null || die "go not found on PATH (Go >= $(awk '$1=="go"{print $2}' "$MOD/go.mod") is needed)"
for f in "$MOD/go.mod" "$MOD/go.sum" "$DNSMOD/go.mod" "$DNSMOD/go.sum"; do
  [ -f "$f" ] || die "missing $f (tests/e2e/update.sh)"
done
need_go="$(awk '$1 == "go" {print $2; exit}' "$MOD/go.mod")"
have_go="$(go env GOVERSION)"
have_go="${have_go#go}"
if [ "$(printf '%s\n%s\n' "$need_go" "$have_go" | sort -V | head -n1)" != "$need_go" ]; then
  die "Go $have_go is older than $need_go (the go line of tests/e2e/go.mod)"
fi

modver() { awk -v m="$2" '$1 == "require" && $2 == m && $3 ~ /^v/ {print $3; exit} $1 == m && $2 ~ /^v/ {print $2; exit}' "$1"; }
K8S_VERSION="$(modver "$MOD/go.mod" k8s.io/kubernetes)"
GINKGO_VERSION="$(modver "$MOD/go.mod" github.com/onsi/ginkgo/v2)"
COREDNS_VERSION="$(modver "$DNSMOD/go.mod" github.com/coredns/coredns)"
[ -n "$K8S_VERSION" ] || die "tests/e2e/go.mod requires no k8s.io/kubernetes"
[ -n "$GINKGO_VERSION" ] || die "tests/e2e/go.mod requires no github.com/onsi/ginkgo/v2"
[ -n "$COREDNS_VERSION" ] || die "tests/e2e/coredns/go.mod requires no github.com/coredns/coredns"
k8s_of_tests_k8s="$(modver "$ROOT/tests/k8s/go.mod" k8s.io/kubernetes)"
[ "$K8S_VERSION" = "$k8s_of_tests_k8s" ] \
  || die "tests/e2e is at k8s.io/kubernetes $K8S_VERSION, tests/k8s at $k8s_of_tests_k8s: run tests/e2e/update.sh"
SUM="$(cat "$MOD/go.sum" "$DNSMOD/go.sum" | sha256sum | cut -c1-12)"
OUT="$CACHE/e2e-$K8S_VERSION-$SUM"
BIN="$OUT/bin"
IMAGES="$OUT/images"
mkdir -p "$BIN" "$IMAGES"

exec 9>"$OUT/.lock"
flock 9

hash_of() { cat "$@" | sha256sum | cut -c1-12; }
SCRIPT_HASH="$(hash_of "${BASH_SOURCE[0]}")"

# --- binaries --------------------------------------------------------------------------------
go_env() {
  export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
  export GOFLAGS="-mod=readonly -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0
}
k8s_ldflags() {
  local major minor p ldflags="-s -w"
  major="${K8S_VERSION#v}"
  major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"
  minor="${minor%%.*}"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.gitCommit="
  done
  echo "$ldflags"
}

build_binaries() {
  local todo=() b tmp start ldflags
  for b in e2e.test ginkgo agnhost coredns; do [ -x "$BIN/$b" ] || todo+=("$b"); done
  [ "${#todo[@]}" -gt 0 ] || return 0
  go_env
  ldflags="$(k8s_ldflags)"
  tmp="$(mktemp -d "$OUT/.build.XXXXXX")"
  # shellcheck disable=SC2064 # expand now: $tmp is local
  trap "rm -rf '$tmp'" EXIT
  log "building ${todo[*]} (k8s $K8S_VERSION, ginkgo $GINKGO_VERSION, coredns $COREDNS_VERSION) into $BIN"
  start=$SECONDS
  if [ ! -x "$BIN/e2e.test" ]; then
    # -vet=off: otherwise vet runs over every dependency and takes far longer.
    (cd "$MOD" && go test -c -vet=off -trimpath -ldflags "$ldflags" -o "$tmp/e2e.test" ./suite)
    mv -f "$tmp/e2e.test" "$BIN/e2e.test"
    log "built e2e.test in $((SECONDS - start)) s"
  fi
  if [ ! -x "$BIN/ginkgo" ] || [ ! -x "$BIN/agnhost" ]; then
    (cd "$MOD" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
      github.com/onsi/ginkgo/v2/ginkgo k8s.io/kubernetes/test/images/agnhost)
    mv -f "$tmp/ginkgo" "$BIN/ginkgo"
    mv -f "$tmp/agnhost" "$BIN/agnhost"
  fi
  if [ ! -x "$BIN/coredns" ]; then
    # The version coremain prints comes from its own constant; GitCommit is set by upstream's
    # Makefile, here left empty.
    (cd "$DNSMOD" && go build -trimpath -ldflags "-s -w" -o "$tmp/coredns" .)
    local p have
    have=" $("$tmp/coredns" -plugins | tr -s ' \n' ' ') "
    for p in "${COREDNS_PLUGINS[@]}"; do
      case "$have" in *" $p "*) ;; *) die "coredns -plugins lacks $p:$have" ;; esac
    done
    mv -f "$tmp/coredns" "$BIN/coredns"
  fi
  rm -rf "$tmp"
  trap - EXIT
  log "built ${todo[*]} in $((SECONDS - start)) s"
}

# --- Debian's toolbox ------------------------------------------------------------------------
# The packages of TOOL_PACKAGES and every library package they depend on (recursively), as
# downloaded .debs, extracted into one tree. Downloaded once per package list.
DEBS="$CACHE/e2e-debs/$(printf '%s\n' "${TOOL_PACKAGES[@]}" | sha256sum | cut -c1-12)"
fetch_debs() {
  [ -f "$DEBS/.done" ] && return 0
  { command -v apt-get && command -v dpkg-deb; } >/dev/null || die "apt-get and dpkg-deb are needed"
  local pkgs tmp d
  mapfile -t pkgs < <(
    printf '%s\n' "${TOOL_PACKAGES[@]}"
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances "${TOOL_PACKAGES[@]}" | grep -E '^(lib|zlib)[^ ]*$' || true
  )
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
  log "downloading ${#pkgs[@]} Debian packages for the toolbox into $DEBS"
  rm -rf "$DEBS"
  mkdir -p "$DEBS"
  tmp="$(mktemp -d "$DEBS.XXXXXX")"
  if ! (cd "$tmp" && apt-get download -qq "${pkgs[@]}" >&2 2>/dev/null); then
    # Empty package lists on a fresh machine.
    [ "$(id -u)" = 0 ] || die "apt-get download failed (and apt-get update needs root)"
    apt-get update -qq
    (cd "$tmp" && apt-get download -qq "${pkgs[@]}" >&2) || die "apt-get download ${pkgs[*]} failed"
  fi
  mkdir -p "$DEBS/debs" "$DEBS/root"
  for d in "$tmp"/*.deb; do
    dpkg-deb -x "$d" "$DEBS/root"
    mv "$d" "$DEBS/debs/"
  done
  rm -rf "$tmp"
  touch "$DEBS/.done"
}

# The toolbox into rootfs $1: busybox applet links, the Debian binaries with every library the
# extracted tree's own loader resolves for them (never one of this machine's), /etc basics.
toolbox_rootfs() {
  local r="$1" st="$DEBS/root" a b lib libpath ld
  mkdir -p "$r/bin" "$r/usr/bin" "$r/sbin" "$r/usr/sbin" "$r/etc" "$r/tmp" "$r/root" "$r/var/tmp"
  chmod 1777 "$r/tmp" "$r/var/tmp"
  cp "$BUSYBOX" "$r/bin/busybox"
  for a in $("$BUSYBOX" --list); do
    case " busybox ${NOT_BUSYBOX[*]} " in *" $a "*) continue ;; esac
    ln -sf busybox "$r/bin/$a"
  done
  for b in "${TOOL_BINARIES[@]}"; do
    [ -x "$st$b" ] || die "$b is not in the downloaded packages ($DEBS)"
    install -D -m 0755 "$st$b" "$r$b"
  done
  ln -sf dash "$r/bin/sh"
  ln -sf nc.openbsd "$r/bin/nc"
  # libc6's /lib64/ld-linux-x86-64.so.2 is an absolute link (to this machine's loader): run the
  # extracted tree's own loader by its real path.
  ld="$st/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
  [ -x "$ld" ] || die "no loader in the downloaded libc6 ($ld)"
  libpath="$st/lib/x86_64-linux-gnu:$st/usr/lib/x86_64-linux-gnu"
  for lib in $(for b in "${TOOL_BINARIES[@]}"; do
    "$ld" --library-path "$libpath" --list "$st$b" \
      | awk '/not found/ {print "MISSING:" $1; next} /=> \// {print $3}'
  done | sort -u); do
    case "$lib" in
      MISSING:*) die "${lib#MISSING:} of the toolbox is in none of the downloaded packages" ;;
      "$st"/*) install -D -m 0644 "$(readlink -f "$lib")" "$r${lib#"$st"}" ;;
      *) die "$lib resolved outside the downloaded packages" ;;
    esac
  done
  install -D -m 0755 "$(readlink -f "$ld")" "$r/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
  mkdir -p "$r/lib64"
  ln -sf ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$r/lib64/ld-linux-x86-64.so.2"
  cp "$MOD/images/etc/passwd" "$MOD/images/etc/group" "$MOD/images/etc/nsswitch.conf" "$r/etc/"
}

# --- images ----------------------------------------------------------------------------------
K8S_MOD_DIR="$CACHE/go/mod/k8s.io/kubernetes@$K8S_VERSION"
# The name and tag upstream's test/utils/image/manifest.go gives an image ("agnhost", ...).
manifest_ref() {
  local line registry
  line="$(grep -E "^\s*configs\[$1\] = Config\{" "$K8S_MOD_DIR/test/utils/image/manifest.go")" \
    || die "no configs[$1] in $K8S_MOD_DIR/test/utils/image/manifest.go"
  # configs[Agnhost] = Config{list.PromoterE2eRegistry, "agnhost", "2.66.1"}
  registry="$(sed -n 's/.*Config{list\.\([A-Za-z0-9]*\),.*/\1/p' <<<"$line")"
  case "$registry" in
    PromoterE2eRegistry) registry=registry.k8s.io/e2e-test-images ;;
    GcRegistry) registry=registry.k8s.io ;;
    *) die "unexpected registry $registry for $1" ;;
  esac
  sed -n 's/.*, "\([^"]*\)", "\([^"]*\)"}.*/\1:\2/p' <<<"$line" | sed "s|^|$registry/|"
}

# podman build + save + rmi: the archive is the product; podman's store keeps nothing.
build_image() { # $1 = reference, $2 = Containerfile, $3 = context dir, $4 = archive
  local tmp="$4.tmp.$$" prefix
  "${PODMAN[@]}" build -q --no-cache -f "$2" -t "$1" "$3" >/dev/null
  rm -f "$tmp"
  "${PODMAN[@]}" save -q --format oci-archive -o "$tmp" "$1"
  "${PODMAN[@]}" rmi -f "$1" >/dev/null
  mv "$tmp" "$4"
  # Archives of this image from older inputs.
  prefix="$(basename "$4")"
  prefix="${prefix%-*.oci.tar}"
  find "$IMAGES" -maxdepth 1 -name "$prefix-*.oci.tar" ! -name "$(basename "$4")" -delete
}

image_toolbox() { # $1 = agnhost | busybox, $2 = its name in manifest.go (Agnhost, BusyBox)
  local ref tag archive ctx files
  ref="$(manifest_ref "$2")"
  files=("$BUSYBOX" "$DEBS"/debs/*.deb "$MOD/images/Containerfile.$1" "$MOD"/images/etc/*)
  [ "$1" = agnhost ] && files+=("$BIN/agnhost")
  tag="$(printf '%s\n' "$(hash_of "${files[@]}")" "$SCRIPT_HASH" | sha256sum | cut -c1-12)"
  archive="$IMAGES/$1-${ref##*:}-$tag.oci.tar"
  if [ ! -f "$archive" ]; then
    log "building $ref"
    ctx="$(mktemp -d)"
    toolbox_rootfs "$ctx/rootfs"
    if [ "$1" = agnhost ]; then
      install -m 0755 "$BIN/agnhost" "$ctx/rootfs/agnhost"
      # Upstream's image: the entrypoint-tester specs run /agnhost-2; netexec uploads into
      # /uploads; porter serves TLS with these.
      ln -s agnhost "$ctx/rootfs/agnhost-2"
      mkdir -p "$ctx/rootfs/uploads"
      cp "$K8S_MOD_DIR/test/images/agnhost/porter/localhost.crt" \
        "$K8S_MOD_DIR/test/images/agnhost/porter/localhost.key" "$ctx/rootfs/"
    fi
    build_image "$ref" "$MOD/images/Containerfile.$1" "$ctx" "$archive"
    rm -rf "$ctx"
  fi
  echo "$ref $archive"
}

image_pause() {
  local ref line node_archive binary tag archive ctx
  ref="$(manifest_ref Pause)"
  # tests/node/build-images.sh builds the static pause (and keeps the binary beside its archive).
  line="$("$ROOT/tests/node/build-images.sh" pause)"
  node_archive="${line#* }"
  binary="${node_archive%.oci.tar}"
  [ -x "$binary" ] || die "tests/node/build-images.sh left no pause binary at $binary"
  tag="$(printf '%s\n' "$(hash_of "$binary" "$ROOT/tests/node/Containerfile.pause")" "$SCRIPT_HASH" | sha256sum | cut -c1-12)"
  archive="$IMAGES/pause-${ref##*:}-$tag.oci.tar"
  if [ ! -f "$archive" ]; then
    log "building $ref"
    ctx="$(mktemp -d)"
    cp "$binary" "$ctx/pause"
    build_image "$ref" "$ROOT/tests/node/Containerfile.pause" "$ctx" "$archive"
    rm -rf "$ctx"
  fi
  echo "$ref $archive"
}

image_coredns() {
  local ref="localhost/tapestry-test/coredns:${COREDNS_VERSION#v}" tag archive ctx
  tag="$(printf '%s\n' "$(hash_of "$BIN/coredns" "$MOD/images/Containerfile.coredns")" "$SCRIPT_HASH" | sha256sum | cut -c1-12)"
  archive="$IMAGES/coredns-${ref##*:}-$tag.oci.tar"
  if [ ! -f "$archive" ]; then
    log "building $ref"
    ctx="$(mktemp -d)"
    cp "$BIN/coredns" "$ctx/coredns"
    build_image "$ref" "$MOD/images/Containerfile.coredns" "$ctx" "$archive"
    rm -rf "$ctx"
  fi
  echo "$ref $archive"
}

build_binaries
command -v podman >/dev/null || die "podman not found (apt-get install podman runc; scripts/setup.sh)"
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static)"
[ -f "$K8S_MOD_DIR/test/utils/image/manifest.go" ] || die "k8s.io/kubernetes@$K8S_VERSION is not in $CACHE/go/mod"
fetch_debs
{
  image_toolbox agnhost Agnhost
  image_toolbox busybox BusyBox
  image_pause
  image_coredns
} >"$OUT/images.txt.tmp"
mv "$OUT/images.txt.tmp" "$OUT/images.txt"
echo "$OUT"
