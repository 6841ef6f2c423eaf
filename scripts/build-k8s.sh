#!/usr/bin/env bash
# Builds the Kubernetes binaries the integration tests run (tests/src/k8s.rs) from the Go module
# proxy, using the module committed in tests/k8s/ (go.mod + go.sum pin every version). Idempotent:
# a binary already built for this go.sum is not built again. Nothing goes into the checkout.
#
#   scripts/build-k8s.sh                 # what the tests use: kube-apiserver etcd kubectl kube-controller-manager
#   scripts/build-k8s.sh kubelet kube-scheduler helm   # those as well, for the real node (or: all)
#
# Prints the bin directory on stdout (logs go to stderr). Layout (TAPESTRY_CACHE defaults to
# ~/.cache/tapestry):
#
#   $TAPESTRY_CACHE/k8s-<k8s version>-<sha256(go.sum), 12 hex>/bin/<binary>
#   $TAPESTRY_CACHE/go/mod     GOMODCACHE (downloaded modules, shared by every key)
#   $TAPESTRY_CACHE/go/build   GOCACHE (compiled packages: a rebuild after a go.sum bump is fast)
#
# tests/src/k8s.rs computes the same key from tests/k8s/ (TAPESTRY_K8S_BIN overrides it).
# Needs Go >= the `go` line of tests/k8s/go.mod; tests/k8s/update.sh moves to a new release.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOD="$ROOT/tests/k8s"
CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
log() { printf '\033[1m[build-k8s]\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1m[build-k8s]\033[0m error: %s\n' "$*" >&2
  exit 1
}

# binary name -> main package
declare -A PKG=(
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
  [kubelet]=k8s.io/kubernetes/cmd/kubelet
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [etcd]=go.etcd.io/etcd/server/v3
  [helm]=helm.sh/helm/v4/cmd/helm
)
DEFAULT=(kube-apiserver etcd kubectl kube-controller-manager)
ALL=(kube-apiserver etcd kubectl kube-controller-manager kubelet kube-scheduler helm)

wanted=()
if [ "$#" -eq 0 ]; then
  wanted=("${DEFAULT[@]}")
else
  for a in "$@"; do
    case "$a" in
      all) wanted+=("${ALL[@]}") ;;
      -h | --help)
        sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
      *)
        [ -n "${PKG[$a]:-}" ] || die "unknown binary '$a' (known: ${ALL[*]}, all)"
        wanted+=("$a")
        ;;
    esac
  done
fi

# --- Go --------------------------------------------------------------------------------------
command -v go >/dev/null || die "go not found on PATH (Go >= $(awk '$1=="go"{print $2}' "$MOD/go.mod") is needed)"
[ -f "$MOD/go.mod" ] && [ -f "$MOD/go.sum" ] || die "missing $MOD/go.mod or go.sum"
need_go="$(awk '$1 == "go" {print $2; exit}' "$MOD/go.mod")"
have_go="$(go env GOVERSION)"
have_go="${have_go#go}"
if [ "$(printf '%s\n%s\n' "$need_go" "$have_go" | sort -V | head -n1)" != "$need_go" ]; then
  die "Go $have_go is older than $need_go (the go line of tests/k8s/go.mod)"
fi

modver() { awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$MOD/go.mod"; }
K8S_VERSION="$(modver k8s.io/kubernetes)"
HELM_VERSION="$(modver helm.sh/helm/v4)"
[ -n "$K8S_VERSION" ] || die "tests/k8s/go.mod requires no k8s.io/kubernetes"
SUM="$(sha256sum "$MOD/go.sum" | cut -c1-12)"
OUT="$CACHE/k8s-$K8S_VERSION-$SUM"
BIN="$OUT/bin"
mkdir -p "$BIN"

exec 9>"$OUT/.lock"
flock 9

todo=()
declare -A seen=()
for b in "${wanted[@]}"; do
  [ -n "${seen[$b]:-}" ] && continue
  seen[$b]=1
  [ -x "$BIN/$b" ] || todo+=("$b")
done

if [ "${#todo[@]}" -gt 0 ]; then
  export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
  export GOFLAGS="-mod=readonly -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0
  major="${K8S_VERSION#v}"
  major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"
  minor="${minor%%.*}"
  ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.gitCommit="
  done
  [ -n "$HELM_VERSION" ] && ldflags+=" -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
  pkgs=()
  for b in "${todo[@]}"; do pkgs+=("${PKG[$b]}"); done

  tmp="$(mktemp -d "$OUT/.build.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  log "building ${todo[*]} ($K8S_VERSION) into $BIN; a cold build takes several minutes"
  start=$SECONDS
  # One `go build` for all of them: packages they share compile once.
  (cd "$MOD" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
  # go.etcd.io/etcd/server/v3 builds as `server` (the element before the major version).
  [ -f "$tmp/server" ] && mv "$tmp/server" "$tmp/etcd"
  for b in "${todo[@]}"; do
    [ -x "$tmp/$b" ] || die "go build produced no $b"
    mv -f "$tmp/$b" "$BIN/$b"
  done
  log "built ${todo[*]} in $((SECONDS - start)) s"
fi
echo "$BIN"
