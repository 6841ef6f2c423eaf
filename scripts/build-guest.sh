#!/usr/bin/env bash
# Builds the QEMU guest used by tests and the demo (tests/src/guest.rs): a stock Debian cloud
# kernel and a busybox initramfs whose /init configures eth0 (DHCP or static), serves its name
# on TCP 8080 and UDP 5353 and opens a root shell on ttyS0; it carries a raw-frame sender for the
# hostile-guest test (tapestry-raw-send). Idempotent; nothing goes into the
# checkout. Layout (TAPESTRY_CACHE defaults to ~/.cache/tapestry):
#
#   $TAPESTRY_CACHE/guest/current -> <kernel-version>      the newest build (relative symlink)
#   $TAPESTRY_CACHE/guest/<kernel-version>/vmlinuz
#   $TAPESTRY_CACHE/guest/<kernel-version>/initramfs-<rev>.cpio.gz
#   $TAPESTRY_CACHE/guest/<kernel-version>/modules/*.ko    (kept to rebuild the initramfs offline)
#   $TAPESTRY_CACHE/guest/<kernel-version>/src-<rev>/      (copy of tests/guest/ it was built from)
#   $TAPESTRY_CACHE/guest/<kernel-version>/stamp-<rev>     (hash of the initramfs inputs)
#
# <rev> (REV below, tests/src/guest.rs's INITRAMFS_REV) is bumped when the initramfs gains or
# loses a program: checkouts of different revisions share the cache without rebuilding each
# other's initramfs back and forth (2: tapestry-raw-send; before it, unnumbered).
#
# The kernel is the newest linux-image-6.1.0-*-cloud-amd64 that apt-cache lists (old ones leave
# the archive, so none is pinned), fetched with `apt-get download` and unpacked with `dpkg -x`,
# never installed. The initramfs is rebuilt when this script, tests/guest/* or busybox change.
# Needs: qemu-system-x86 busybox-static cpio (apt), and musl-gcc or gcc with a static libc for
# the UDP server and the raw-frame sender (without one the guest serves TCP only, and sends no
# raw frames).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/tests/guest"
CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
GUEST="$CACHE/guest"
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
  failover net_failover virtio_net)
log() { printf '\033[1m[build-guest]\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1m[build-guest]\033[0m error: %s\n' "$*" >&2
  exit 1
}

# --- prerequisites -------------------------------------------------------------------------
missing=()
for p in qemu-system-x86 busybox-static cpio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  die "missing Debian packages: ${missing[*]} (apt-get install --no-install-recommends ${missing[*]}; scripts/setup.sh installs them)"
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (package busybox-static)"
for f in init udhcpc.script tcp-name udp-name.c raw-send.c; do
  [ -f "$SRC/$f" ] || die "missing $SRC/$f"
done

mkdir -p "$GUEST"
exec 9>"$GUEST/.lock"
flock 9

# --- the kernel package --------------------------------------------------------------------
newest_kernel() {
  { apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' 2>/dev/null || true; } \
    | awk '{print $1}' | sort -V | tail -n1
}
newest_built() {
  # Newest cached version with both artifacts, for offline runs.
  local d
  for d in "$GUEST"/6.1.0-*-cloud-amd64; do
    if [ -f "$d/vmlinuz" ] && [ -d "$d/modules" ]; then basename "$d"; fi
  done | sort -V | tail -n1
}

pkg="$(newest_kernel)"
if [ -z "$pkg" ]; then
  log "apt-cache lists no linux-image-6.1.0-*-cloud-amd64: running apt-get update"
  apt-get update -qq || log "apt-get update failed"
  pkg="$(newest_kernel)"
fi
if [ -z "$pkg" ]; then
  kver="$(newest_built)"
  [ -n "$kver" ] || die "no linux-image-6.1.0-*-cloud-amd64 in apt-cache, none cached"
  log "apt-cache lists no cloud kernel; using the cached $kver"
else
  kver="${pkg#linux-image-}"
fi

fetch_kernel() { # $1 = version; fills $GUEST/$1/{vmlinuz,modules/}
  local v="$1" dir="$GUEST/$1" tmp dl deb m ko
  # apt downloads as the _apt user: a directory it can reach (not under a 0700 $HOME) and
  # write, so there is no "unsandboxed" warning.
  dl="$(mktemp -d)"
  if id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
  if ! (cd "$dl" && apt-get download -q "linux-image-$v" >/dev/null); then
    log "apt-get download linux-image-$v failed: running apt-get update and retrying"
    apt-get update -qq || true
    if ! (cd "$dl" && apt-get download -q "linux-image-$v" >/dev/null); then
      rm -rf "$dl"
      return 1
    fi
  fi
  deb="$(ls "$dl"/linux-image-"$v"_*.deb)"
  tmp="$(mktemp -d "$GUEST/.fetch.XXXXXX")"
  dpkg -x "$deb" "$tmp/x"
  mkdir -p "$tmp/out/modules"
  cp "$tmp/x/boot/vmlinuz-$v" "$tmp/out/vmlinuz"
  for m in "${MODULES[@]}"; do
    ko="$(find "$tmp/x/lib/modules/$v" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) | head -n1)"
    if [ -z "$ko" ]; then
      # Built into this kernel, or absent: /init skips modules it does not find.
      log "module $m not in the package (built in?)"
      continue
    fi
    case "$ko" in
      *.xz) xz -dc "$ko" >"$tmp/out/modules/$m.ko" ;;
      *.zst) zstd -dqc "$ko" >"$tmp/out/modules/$m.ko" ;;
      *) cp "$ko" "$tmp/out/modules/$m.ko" ;;
    esac
  done
  basename "$deb" >"$tmp/out/deb"
  rm -rf "$dir"
  mv "$tmp/out" "$dir"
  rm -rf "$tmp" "$dl"
}

if [ ! -f "$GUEST/$kver/vmlinuz" ] || [ ! -d "$GUEST/$kver/modules" ]; then
  log "downloading linux-image-$kver"
  if ! fetch_kernel "$kver"; then
    prev="$(newest_built)"
    [ -n "$prev" ] || die "could not download linux-image-$kver and no kernel is cached"
    log "could not download linux-image-$kver; using the cached $prev"
    kver="$prev"
  fi
fi
DIR="$GUEST/$kver"
REV=2
INITRD="initramfs-$REV.cpio.gz"

# --- the initramfs -------------------------------------------------------------------------
CC=
if command -v musl-gcc >/dev/null 2>&1; then
  CC=musl-gcc
elif command -v gcc >/dev/null 2>&1 && [ -n "$(gcc -print-file-name=libc.a | grep /)" ]; then
  CC=gcc
fi

stamp="$(
  {
    sha256sum "${BASH_SOURCE[0]}" "$SRC"/init "$SRC"/udhcpc.script "$SRC"/tcp-name "$SRC"/udp-name.c \
      "$SRC"/raw-send.c \
      | awk '{print $1}'
    sha256sum "$BUSYBOX" | awk '{print $1}'
    ls "$DIR/modules"
    echo "cc=$CC"
  } | sha256sum | awk '{print $1}'
)"
if [ -f "$DIR/$INITRD" ] && [ "$(cat "$DIR/stamp-$REV" 2>/dev/null)" = "$stamp" ]; then
  log "guest $kver up to date in $DIR"
else
  log "building the initramfs for $kver"
  work="$(mktemp -d "$GUEST/.initramfs.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  r="$work/root"
  mkdir -p "$r"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,lib/modules}
  cp "$BUSYBOX" "$r/bin/busybox"
  # One link per applet busybox has (the guest uses sh, mount, mdev, dmesg, uname, cat,
  # hostname, insmod, sleep, ip, udhcpc, arping, nc, netstat, grep, setsid, cttyhack, tr, ...).
  for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"
  done
  install -m 0755 "$SRC/init" "$r/init"
  install -m 0755 "$SRC/udhcpc.script" "$r/etc/udhcpc.script"
  install -m 0755 "$SRC/tcp-name" "$r/bin/tapestry-tcp-name"
  cp "$DIR"/modules/*.ko "$r/lib/modules/"
  if [ -n "$CC" ]; then
    "$CC" -static -Os -s -o "$r/bin/tapestry-udp-name" "$SRC/udp-name.c"
    "$CC" -static -Os -s -o "$r/bin/tapestry-raw-send" "$SRC/raw-send.c"
  else
    log "no musl-gcc or static gcc: the guest will not serve UDP 5353 nor send raw frames (apt-get install musl-tools)"
  fi
  # The kernel's built-in initramfs has /dev/console; add it in case this kernel's lacks it.
  if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$r/dev/console" c 5 1
  fi
  (cd "$r" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n >"$work/initramfs.cpio.gz"
  # The sources, so tests/src/guest.rs can tell a stale initramfs from a current one.
  rm -rf "$DIR/src-$REV"
  mkdir -p "$DIR/src-$REV"
  cp "$SRC"/init "$SRC"/udhcpc.script "$SRC"/tcp-name "$SRC"/udp-name.c "$SRC"/raw-send.c "$DIR/src-$REV/"
  mv "$work/initramfs.cpio.gz" "$DIR/$INITRD"
  echo "$stamp" >"$DIR/stamp-$REV"
  log "built $DIR/$INITRD ($(du -h "$DIR/$INITRD" | cut -f1))"
fi

# `current` points at the version this run checked (what tests/src/guest.rs boots).
if [ "$(readlink "$GUEST/current" 2>/dev/null)" != "$kver" ]; then
  ln -sfn "$kver" "$GUEST/.current.tmp"
  mv -T "$GUEST/.current.tmp" "$GUEST/current"
fi
printf '%s\n' "$DIR"
