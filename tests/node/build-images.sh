#!/usr/bin/env bash
# Builds the images of the test node (tests/src/node.rs) as OCI archives, without a registry:
# FROM scratch Containerfiles in this directory, `podman build`, `podman save --format
# oci-archive`. The node imports them with `ctr -n k8s.io images import`; pods use
# `imagePullPolicy: Never`. Idempotent: an archive whose inputs did not change is not rebuilt.
#
#   tests/node/build-images.sh [pause|busybox|vm ...]    (default: all three)
#
# Prints one line per image on stdout: `<image name> <archive path>`. Layout (TAPESTRY_CACHE
# defaults to ~/.cache/tapestry):
#
#   $TAPESTRY_CACHE/node-images/<image>-<sha256 of the inputs, 12 hex>.oci.tar
#   $TAPESTRY_CACHE/node-images/pause-<hash>                (the static pause binary)
#
# Images (tag = the input hash, so a changed input is a new tag):
#   localhost/tapestry-test/pause     pause.c, built with gcc -static (or musl-gcc)
#   localhost/tapestry-test/busybox   Debian's busybox-static and tests/guest/tcp-name
#   localhost/tapestry-test/vm        qemu-system-x86_64 + its libraries and firmware, the guest of
#                                     scripts/build-guest.sh, busybox, vm-launcher
# Needs: podman, gcc (static libc) or musl-gcc, busybox-static, qemu-system-x86 (scripts/setup.sh).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
OUT="$CACHE/node-images"
BUSYBOX=/bin/busybox
QEMU=/usr/bin/qemu-system-x86_64
# Debian's QEMU loads TCG as a module.
QEMU_MODULES=(/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so)
# What QEMU loads for `-M pc -kernel` with -nodefaults and romfile= (SeaBIOS and the Linux
# boot option ROM); the rest of /usr/share/qemu is for other machines.
QEMU_FIRMWARE=(/usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin
  /usr/share/qemu/linuxboot.bin /usr/share/qemu/kvmvapic.bin /usr/share/qemu/multiboot_dma.bin)
log() { printf '\033[1m[node-images]\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1m[node-images]\033[0m error: %s\n' "$*" >&2
  exit 1
}

wanted=("$@")
[ "${#wanted[@]}" -gt 0 ] || wanted=(pause busybox vm)
for w in "${wanted[@]}"; do
  case "$w" in pause | busybox | vm) ;; *) die "unknown image '$w' (pause, busybox, vm)" ;; esac
done
command -v podman >/dev/null || die "podman not found (apt-get install podman; scripts/setup.sh)"
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

hash_of() { cat "$@" | sha256sum | cut -c1-12; }

# podman build + save + rmi: the archive is the product; podman's store keeps nothing.
build() { # $1 = image, $2 = tag, $3 = context dir, $4 = archive
  local image="localhost/tapestry-test/$1:$2" tmp
  podman build -q --no-cache -f "$HERE/Containerfile.$1" -t "$image" "$3" >/dev/null
  tmp="$4.tmp.$$"
  rm -f "$tmp"
  podman save -q --format oci-archive -o "$tmp" "$image"
  podman rmi -f "$image" >/dev/null
  mv "$tmp" "$4"
  # Builds of this image from older inputs.
  find "$OUT" -maxdepth 1 -name "$1-*" ! -name "$1-$2*" -delete
}

cc_static() {
  if command -v musl-gcc >/dev/null 2>&1; then
    echo musl-gcc
  elif command -v gcc >/dev/null 2>&1 && gcc -print-file-name=libc.a | grep -q /; then
    echo gcc
  else
    die "no static C compiler: apt-get install musl-tools (or gcc with libc6-dev)"
  fi
}

busybox_rootfs() { # $1 = rootfs dir: /bin/busybox with a link per applet
  mkdir -p "$1/bin" "$1/etc" "$1/tmp"
  cp "$BUSYBOX" "$1/bin/busybox"
  local a
  for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$1/bin/$a"
  done
  chmod 1777 "$1/tmp"
}

image_pause() {
  local cc tag archive ctx
  cc="$(cc_static)"
  tag="$(printf '%s\n' "$(hash_of "$HERE/pause.c" "$HERE/Containerfile.pause" "${BASH_SOURCE[0]}")" "$cc" | sha256sum | cut -c1-12)"
  archive="$OUT/pause-$tag.oci.tar"
  if [ ! -f "$archive" ]; then
    log "building localhost/tapestry-test/pause:$tag"
    ctx="$(mktemp -d)"
    "$cc" -static -Os -s -o "$ctx/pause" "$HERE/pause.c"
    cp "$ctx/pause" "$OUT/pause-$tag"
    build pause "$tag" "$ctx" "$archive"
    rm -rf "$ctx"
  fi
  echo "localhost/tapestry-test/pause:$tag $archive"
}

image_busybox() {
  local tag archive ctx
  [ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static)"
  tag="$(hash_of "$BUSYBOX" "$ROOT/tests/guest/tcp-name" "$HERE/Containerfile.busybox" "${BASH_SOURCE[0]}")"
  archive="$OUT/busybox-$tag.oci.tar"
  if [ ! -f "$archive" ]; then
    log "building localhost/tapestry-test/busybox:$tag"
    ctx="$(mktemp -d)"
    busybox_rootfs "$ctx/rootfs"
    install -m 0755 "$ROOT/tests/guest/tcp-name" "$ctx/rootfs/bin/tapestry-tcp-name"
    build busybox "$tag" "$ctx" "$archive"
    rm -rf "$ctx"
  fi
  echo "localhost/tapestry-test/busybox:$tag $archive"
}

image_vm() {
  local guest initrd tag archive ctx r lib f
  [ -x "$QEMU" ] || die "$QEMU not found (apt-get install qemu-system-x86)"
  guest="$(readlink -f "$CACHE/guest/current" 2>/dev/null || true)"
  # scripts/build-guest.sh's REV (tests/src/guest.rs's INITRAMFS).
  initrd="$guest/initramfs-2.cpio.gz"
  [ -f "$guest/vmlinuz" ] && [ -f "$initrd" ] \
    || die "no guest in $CACHE/guest/current: run scripts/build-guest.sh"
  for f in "${QEMU_FIRMWARE[@]}" "${QEMU_MODULES[@]}"; do [ -f "$f" ] || die "$f not found (qemu-system-x86, seabios)"; done
  tag="$(hash_of "$QEMU" "${QEMU_MODULES[@]}" "$BUSYBOX" "$guest/vmlinuz" "$initrd" "${QEMU_FIRMWARE[@]}" \
    "$HERE/vm-launcher" "$HERE/Containerfile.vm" "${BASH_SOURCE[0]}")"
  archive="$OUT/vm-$tag.oci.tar"
  if [ ! -f "$archive" ]; then
    log "building localhost/tapestry-test/vm:$tag"
    ctx="$(mktemp -d)"
    r="$ctx/rootfs"
    busybox_rootfs "$r"
    install -D -m 0755 "$QEMU" "$r/usr/bin/qemu-system-x86_64"
    for f in "${QEMU_MODULES[@]}"; do install -D -m 0644 "$f" "$r$f"; done
    # Every shared library at the path the loader looks for it, and the loader itself.
    for lib in $(ldd "$QEMU" "${QEMU_MODULES[@]}" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | sort -u); do
      install -D -m 0644 "$(readlink -f "$lib")" "$r$lib"
    done
    chmod 0755 "$r"/lib64/ld-linux-x86-64.so.2 2>/dev/null || true
    mkdir -p "$r/usr/share/qemu"
    for f in "${QEMU_FIRMWARE[@]}"; do cp -L "$f" "$r/usr/share/qemu/"; done
    install -D -m 0644 "$guest/vmlinuz" "$r/guest/vmlinuz"
    install -D -m 0644 "$initrd" "$r/guest/initramfs.cpio.gz"
    install -m 0755 "$HERE/vm-launcher" "$r/bin/vm-launcher"
    build vm "$tag" "$ctx" "$archive"
    rm -rf "$ctx"
  fi
  echo "localhost/tapestry-test/vm:$tag $archive"
}

for w in "${wanted[@]}"; do
  "image_$w"
done
