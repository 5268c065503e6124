#!/usr/bin/env bash
# Builds examples/linux-microvm/build/rootfs.ext4: a 16 MiB ext4 root filesystem holding the spin /init from
# the guest kernel's initramfs (spin.cpio), for the `linux-net` VM (root=/dev/vda rw).
# usage: examples/linux-microvm/make-rootfs.sh [path/to/spin.cpio]
# Needs mke2fs (e2fsprogs) and cpio. Without an argument the initramfs is found like the tests find it:
# $KVMKIT_GUEST_DIR, ../shared/guest beside the repository, /work/shared/guest, guest-kernel/build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cpio_file="${1:-}"
if [ -z "$cpio_file" ]; then
  for d in "${KVMKIT_GUEST_DIR:-}" "$repo/../shared/guest" /work/shared/guest "$repo/guest-kernel/build"; do
    if [ -n "$d" ] && [ -f "$d/spin.cpio" ]; then cpio_file="$d/spin.cpio"; break; fi
  done
fi
if [ -z "$cpio_file" ] || [ ! -f "$cpio_file" ]; then
  echo "make-rootfs: no spin.cpio found; build one with: scripts/build-guest-kernel.sh --initramfs-only" >&2
  exit 1
fi
for t in mke2fs cpio; do
  command -v "$t" >/dev/null || { echo "make-rootfs: $t is missing (apt-get install e2fsprogs cpio)" >&2; exit 1; }
done
mkdir -p "$here/build"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/root"
(cd "$tmp/root" && cpio -idm --quiet < "$cpio_file")
[ -f "$tmp/root/init" ] || { echo "make-rootfs: $cpio_file has no /init" >&2; exit 1; }
mkdir -p "$tmp/root/dev" "$tmp/root/proc" "$tmp/root/sys" "$tmp/root/tmp"
# Written next to the target and renamed: an interrupted run never leaves a half-made image.
mke2fs -q -F -t ext4 -L kvmkit-root -d "$tmp/root" "$here/build/rootfs.ext4.tmp" 16M >/dev/null
mv "$here/build/rootfs.ext4.tmp" "$here/build/rootfs.ext4"
echo "$here/build/rootfs.ext4 (from $cpio_file)"
