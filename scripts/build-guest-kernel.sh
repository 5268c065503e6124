#!/usr/bin/env bash
# Builds kvmkit's Linux guest kernel and a "spin" initramfs into guest-kernel/build/ (git-ignored):
#   vmlinux     ELF with a PVH entry note (plugin boot-linux, format pvh)
#   bzImage     the same kernel for the 64-bit boot protocol (format bzimage)
#   spin.cpio   initramfs whose /init spins in user mode without system calls (works on hosts where
#               user-mode SYSCALL does not reach the guest kernel, see DESIGN.md)
#   kernel.config  the resulting full .config
# Source: Debian's linux-source-6.1, with scripts/guest-kernel.config merged over `make tinyconfig`.
#
# Usage: scripts/build-guest-kernel.sh [--initramfs-only] [OUT_DIR]
#   needs root (apt-get) for the kernel; --initramfs-only needs just gcc and cpio.
#   A full build takes several minutes on 2 cores (-j$(nproc)).
# Tests find the result through @kvmkit/testkit's findGuestKernel().
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
initramfs_only=0
if [[ "${1:-}" == "--initramfs-only" ]]; then initramfs_only=1; shift; fi
out=$(realpath -m "${1:-$root/guest-kernel/build}")
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

need() { command -v "$1" >/dev/null 2>&1 || { echo "build-guest-kernel: '$1' is missing ($2)" >&2; exit 1; }; }

build_initramfs() {
  need gcc "apt-get install gcc"
  need cpio "apt-get install cpio"
  local src="$work/spin-init.S" rootfs="$work/initramfs"
  # /init: never makes a system call; `pause` keeps the spinning vCPU cheap for the host.
  cat > "$src" <<'ASM'
	.globl _start
	.text
_start:
1:	pause
	jmp 1b
ASM
  mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp}
  gcc -nostdlib -static -Wl,--build-id=none -o "$rootfs/init" "$src"
  # newc format, uncompressed (decompression is slow where guest ring 0 is emulated); stable order.
  (cd "$rootfs" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$out/spin.cpio"
  echo "wrote $out/spin.cpio ($(stat -c %s "$out/spin.cpio") bytes)"
}

build_kernel() {
  if [[ $(id -u) -ne 0 ]]; then echo "build-guest-kernel: run as root (apt-get install)" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends linux-source-6.1 bc flex bison libelf-dev libssl-dev cpio \
    make gcc libc6-dev xz-utils >/dev/null
  local tarball
  tarball=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
  [[ -n "$tarball" ]] || { echo "build-guest-kernel: /usr/src/linux-source-6.1.tar.xz not found after install" >&2; exit 1; }
  tar -C "$work" -xf "$tarball"
  cd "$work"/linux-source-6.1
  # Hosts that emulate guest ring 0 with KVM's instruction emulator cannot run INT3 in long mode;
  # the boot-time INT3 self-test would stop the boot there. Skip it (harmless on real KVM).
  sed -i 's/^\tint3_selftest();/\t\/* int3 self-test skipped: emulating hosts cannot run it *\//' arch/x86/kernel/alternative.c
  make tinyconfig >/dev/null
  ./scripts/kconfig/merge_config.sh -m .config "$here/guest-kernel.config" >/dev/null
  make olddefconfig >/dev/null
  # Every option of the fragment must have survived olddefconfig (a typo or a missing dependency would
  # silently drop it).
  local missing=0
  while IFS= read -r line; do
    [[ "$line" =~ ^CONFIG_([A-Za-z0-9_]+)=(.*)$ ]] || continue
    local name=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
    if [[ "$want" == n ]]; then
      grep -q "^CONFIG_${name}=" .config && { echo "  not off: CONFIG_${name}" >&2; missing=1; }
    else
      grep -qx "CONFIG_${name}=${want}" .config || { echo "  not set: CONFIG_${name}=${want}" >&2; missing=1; }
    fi
  done < "$here/guest-kernel.config"
  [[ $missing -eq 0 ]] || { echo "build-guest-kernel: the config fragment did not apply cleanly" >&2; exit 1; }
  make -j"$(nproc)" vmlinux bzImage >/dev/null
  strip -o "$out/vmlinux" vmlinux
  cp arch/x86/boot/bzImage "$out/bzImage"
  cp .config "$out/kernel.config"
  echo "wrote $out/vmlinux and $out/bzImage"
}

build_initramfs
if [[ $initramfs_only -eq 0 ]]; then build_kernel; fi
