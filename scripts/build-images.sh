#!/usr/bin/env bash
# Builds Tapestry's container images without a registry (`make images`): statically linked (musl)
# release binaries, `FROM scratch` Containerfiles (deploy/images/), podman, and one OCI archive per
# image. Idempotent: an image whose archive is newer than its binaries and Containerfile is not
# built again (only loaded into podman's storage if it is missing there).
#
#   scripts/build-images.sh                        # all three images
#   scripts/build-images.sh install-cni            # some of them: tapestryd controller install-cni
#
# Images (tag = the workspace version in Cargo.toml; the Helm chart's defaults name them):
#   localhost/tapestry/tapestryd:<tag>     /usr/bin/tapestryd (eBPF programs embedded), /usr/bin/tapestry
#   localhost/tapestry/controller:<tag>    /usr/bin/tapestry-controller
#   localhost/tapestry/install-cni:<tag>   /opt/tapestry/bin/tapestry-install-cni, /opt/tapestry/bin/tapestry-cni
# Archives: $TAPESTRY_IMAGES_DIR (default ~/.cache/tapestry/images)/<name>-<tag>.oci.tar, outside
# the checkout. Prints that directory on stdout (logs go to stderr).
#
# Into a node's containerd (the kubelet's namespace is k8s.io):
#   ctr -n k8s.io images import ~/.cache/tapestry/images/install-cni-0.1.0.oci.tar
# podman writes the full name into the archive's index (annotation
# org.opencontainers.image.ref.name = localhost/tapestry/install-cni:0.1.0), and `ctr images
# import` keeps a full reference as it is, so the image is named exactly as the chart expects: no
# --base-name or --index-name is needed. (`--base-name localhost/tapestry/install-cni` also
# works: it only filters by that prefix.) The chart's pullPolicy IfNotPresent then never pulls.
#
# Needs: the x86_64-unknown-linux-musl Rust target, musl-gcc (musl-tools), podman, runc, file
# (scripts/setup.sh installs them). Cargo honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
OUT="${TAPESTRY_IMAGES_DIR:-$CACHE/images}"
TARGET=x86_64-unknown-linux-musl
CARGO="${CARGO:-cargo}"
log() { printf '\033[1m[build-images]\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1m[build-images]\033[0m error: %s\n' "$*" >&2
  exit 1
}

# This machine's podman needs runc (crun refuses the hybrid cgroup layout) and cgroupfs.
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)

# image -> cargo packages, binaries (in the order the Containerfile copies them)
declare -A PACKAGES=(
  [tapestryd]="tapestry-node-daemon tapestry-cli"
  [controller]="tapestry-controller"
  [install-cni]="tapestry-cni-plugin"
)
declare -A BINARIES=(
  [tapestryd]="tapestryd tapestry"
  [controller]="tapestry-controller"
  [install-cni]="tapestry-install-cni tapestry-cni"
)
ALL=(tapestryd controller install-cni)

images=()
if [ "$#" -eq 0 ]; then
  images=("${ALL[@]}")
else
  for a in "$@"; do
    case "$a" in
      -h | --help)
        sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
      *)
        [ -n "${PACKAGES[$a]:-}" ] || die "unknown image '$a' (known: ${ALL[*]})"
        images+=("$a")
        ;;
    esac
  done
fi

TAG="$(awk '/^\[workspace.package\]/ {p = 1; next} /^\[/ {p = 0} p && $1 == "version" {gsub(/"/, "", $3); print $3; exit}' "$ROOT/Cargo.toml")"
[ -n "$TAG" ] || die "no version in [workspace.package] of $ROOT/Cargo.toml"

command -v podman >/dev/null || die "podman not found (apt-get install podman runc)"
command -v musl-gcc >/dev/null || die "musl-gcc not found (apt-get install musl-tools)"
command -v strip >/dev/null || die "strip not found (apt-get install binutils)"
rustup target list --installed 2>/dev/null | grep -qx "$TARGET" \
  || die "the Rust target $TARGET is missing (rustup target add $TARGET)"

# --- static release binaries -----------------------------------------------------------------
packages=()
for i in "${images[@]}"; do
  for p in ${PACKAGES[$i]}; do packages+=(-p "$p"); done
done
log "building ${images[*]}: cargo build --release --target $TARGET ${packages[*]}"
# tapestryd embeds its eBPF object at build time (node-daemon/build.rs): never skip that here.
# No debug info: the images are stripped anyway, and it halves the build (make test builds these).
# Run from a test (`cargo test` sets CARGO_MANIFEST_DIR, CARGO_PKG_*, OUT_DIR, ... for its test
# processes), those variables would reach this cargo, and build scripts that declare them with
# rerun-if-env-changed (ring's, through the cc crate) would see them changed from a run in a
# shell: every crate above ring was rebuilt, twice per make test. Not this cargo's to see.
for v in $(compgen -e); do
  case "$v" in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_NAME | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR | OUT_DIR) unset "$v" ;;
  esac
done
(cd "$ROOT" && env -u AYA_BUILD_SKIP CARGO_PROFILE_RELEASE_DEBUG=0 "$CARGO" build --release --target "$TARGET" "${packages[@]}" >&2)
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/$TARGET/release"

mkdir -p "$OUT"
ctx=""
trap 'rm -rf "$ctx"' EXIT
exec 9>"$OUT/.lock"
flock 9

for i in "${images[@]}"; do
  ref="localhost/tapestry/$i:$TAG"
  archive="$OUT/$i-$TAG.oci.tar"
  containerfile="$ROOT/deploy/images/$i.Containerfile"
  [ -f "$containerfile" ] || die "missing $containerfile"
  fresh=1
  [ -f "$archive" ] || fresh=0
  for b in ${BINARIES[$i]}; do
    f="$BIN/$b"
    [ -x "$f" ] || die "cargo built no $f"
    # A FROM scratch image has no loader and no libc: refuse anything dynamically linked.
    desc="$(file -b "$f")"
    case "$desc" in
      *"statically linked"* | *"static-pie linked"*) ;;
      *) die "$f is not statically linked: $desc" ;;
    esac
    [ "$fresh" = 1 ] && [ "$f" -nt "$archive" ] && fresh=0
  done
  [ "$fresh" = 1 ] && [ "$containerfile" -nt "$archive" ] && fresh=0

  if [ "$fresh" = 1 ]; then
    if ! "${PODMAN[@]}" image exists "$ref"; then
      log "$ref: archive up to date, loading it into podman"
      "${PODMAN[@]}" load -q -i "$archive" >&2
    else
      log "$ref: up to date ($archive)"
    fi
    continue
  fi

  ctx="$(mktemp -d "$OUT/.ctx.XXXXXX")"
  # Without the release profile's debug info (a third of the size); symbols stay for backtraces.
  for b in ${BINARIES[$i]}; do strip --strip-debug -o "$ctx/$b" "$BIN/$b"; done
  log "$ref: podman build"
  # --timestamp 0: the same binaries give the same image id.
  "${PODMAN[@]}" build -q --timestamp 0 -f "$containerfile" -t "$ref" "$ctx" >&2
  rm -rf "$ctx"
  ctx=""
  tmp="$archive.tmp"
  rm -f "$tmp"
  "${PODMAN[@]}" save -q --format oci-archive -o "$tmp" "$ref"
  mv -f "$tmp" "$archive"
  log "$ref: saved $archive ($(du -h "$archive" | cut -f1))"
done
echo "$OUT"
