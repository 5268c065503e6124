#!/bin/sh
# Self-test of the C floor VMM: `make -C bench/cfloor test` (needs /dev/kvm; skips without it).
set -u
cd "$(dirname "$0")"
if [ ! -c /dev/kvm ]; then echo "SKIP: /dev/kvm missing"; exit 0; fi
make -s all || exit 1
fail=0
check() {  # check <expected rc> <description> <cfloor args...>
    want=$1; what=$2; shift 2
    out=$(timeout 60 ./build/cfloor "$@" 2>&1); rc=$?
    if [ "$rc" -eq "$want" ]; then echo "ok   $what (rc=$rc)"; else echo "FAIL $what: rc=$rc, want $want"; echo "$out"; fail=1; fi
    LAST="$out"
}
check 42 "flat ring 3: 42 x out 0xe0, exit with counter" flat build/count-exit.bin --arg 42
echo "$LAST" | grep -q '^cfloor exits=44 wall_us=' || { echo "FAIL exit count line: $LAST"; fail=1; }
check 7 "flat ring 0: 263 x out 0xe0 -> exit 263&0xff" flat build/count-exit.bin --arg 263 --ring 0
check 0 "flat ring 3 pio loop, 2 vCPUs" flat build/pio-loop.bin --arg 2000 --cpus 2
check 0 "flat ring 0 pio loop, 2 vCPUs (APs halt)" flat build/pio-loop.bin --arg 2000 --cpus 2 --ring 0
check 0 "flat ring 3 mmio loop" flat build/mmio-loop.bin --arg 2000
check 126 "flat unhandled port 0x80 -> 0x7e" flat build/bad-port.bin
check 126 "flat image larger than RAM" flat build/cfloor --mem 2
PROBE=../../test/guests/probe/build/probe.elf
if make -s -C ../../test/guests/probe; then
    check 0 "pvh probe hello" pvh $PROBE --cmdline "probe.test=hello"
    echo "$LAST" | grep -q '^PROBE hello vcpus=1' || { echo "FAIL hello line: $LAST"; fail=1; }
    check 9 "pvh probe exit status=9" pvh $PROBE --cmdline "probe.test=exit probe.status=9"
    check 0 "pvh probe pio" pvh $PROBE --cmdline "probe.test=pio probe.iters=1000"
    check 0 "pvh probe smp, 2 vCPUs" pvh $PROBE --cpus 2 --cmdline "probe.test=smp"
    echo "$LAST" | grep -q '^PROBE smp cpus=2' || { echo "FAIL smp line: $LAST"; fail=1; }
fi
[ $fail -eq 0 ] && echo "all passed"
exit $fail
