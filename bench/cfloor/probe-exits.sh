#!/bin/sh
# Exit cost of the probe guest's pio/mmio loops (ring 3 and ring 0) on QEMU microvm, cfloor pvh and
# kvmkit (test/guests/probe/run-kvmkit.mjs, when the packages are built), interleaved, REPS runs each;
# prints the median cycles_per_exit and ns_per_exit per row.   usage: probe-exits.sh [ITERS] [REPS]
set -u
cd "$(dirname "$0")/../.."
ITERS=${1:-10000}; REPS=${2:-3}
make -s -C test/guests/probe && make -s -C bench/cfloor || exit 1
ELF=test/guests/probe/build/probe.elf
qemu() { timeout 120 qemu-system-x86_64 -M microvm,acpi=off,rtc=off -enable-kvm -cpu host,-arch-capabilities -m 64 \
    -nographic -no-reboot -kernel $ELF -device isa-debug-exit,iobase=0xf4,iosize=4 -append "$1"; }
cfloor() { timeout 120 bench/cfloor/build/cfloor pvh $ELF --cmdline "$1" 2>/dev/null; }
kvmkit() { a=${1#probe.test=}; timeout 120 node test/guests/probe/run-kvmkit.mjs "${a%% *}" "${a#* }" 2>/dev/null; }
VMMS="cfloor"
command -v qemu-system-x86_64 >/dev/null && VMMS="qemu $VMMS"
[ -f packages/kernel/dist/index.js ] && [ -f plugins/boot-linux/dist/index.js ] && [ -f plugins/serial/dist/index.js ] && VMMS="$VMMS kvmkit"
tmp=$(mktemp -d); trap 'rm -rf $tmp' EXIT
for rep in $(seq "$REPS"); do
  for t in pio mmio; do for r in 3 0; do for v in $VMMS; do
    $v "probe.test=$t probe.iters=$ITERS probe.ring=$r" | sed -n "s/^PROBE $t ring=\([03]\).*cycles_per_exit=\([0-9]*\) ns_per_exit=\([0-9]*\).*/\1 \2 \3/p" >> "$tmp/$v.$t.$r"
  done; done; done
done
printf '%-7s %-5s %-5s %-6s %16s %12s\n' vmm test ring runs cycles_per_exit ns_per_exit
for t in pio mmio; do for r in 3 0; do for v in $VMMS; do
  f="$tmp/$v.$t.$r"; [ -s "$f" ] || { printf '%-7s %-5s %-5s failed\n' $v $t $r; continue; }
  n=$(wc -l < "$f"); mid=$(( (n + 1) / 2 ))
  printf '%-7s %-5s %-5s %-6s %16s %12s\n' $v $t "$(sort -u -k1,1 "$f" | cut -d' ' -f1 | tr '\n' ',' | sed 's/,$//')" "$n" \
    "$(cut -d' ' -f2 "$f" | sort -n | sed -n "${mid}p")" "$(cut -d' ' -f3 "$f" | sort -n | sed -n "${mid}p")"
done; done; done
