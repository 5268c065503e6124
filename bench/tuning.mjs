#!/usr/bin/env node
// Per-host tuning benchmarks, side by side in one run (alternating, median of R rounds):
//  1. first touch of 256 MiB from a ring-3 flat guest (one byte per 4 KiB page): plain 4 KiB pages vs THP
//     (@kvmkit/plugin-hugepages mode thp) vs hugetlb 2 MiB (only when run as root: the pool is grown for the run
//     and restored). Timed in the guest with rdtsc and on the host between two port writes.
//  2. exit-latency jitter: a ring-3 PIO loop whose every `out` is timed in the guest with rdtsc (deltas stored
//     in guest memory), answered by a main-thread device: unpinned vs pinned (vCPU and main thread on different
//     CPUs) vs pinned to the same CPU (@kvmkit/plugin-pinning). p50/p90/p99/p99.9/max in µs.
//   node bench/tuning.mjs [--touch-mib 256] [--exits 20000] [--rounds 3]
import { mkdirSync, writeFileSync, readFileSync, existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { Machine, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import hugepages from '@kvmkit/plugin-hugepages';
import pinning from '@kvmkit/plugin-pinning';

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({ options: { 'touch-mib': { type: 'string', default: '256' }, exits: { type: 'string', default: '20000' }, rounds: { type: 'string', default: '3' } } });
const TOUCH_MIB = Number(values['touch-mib']);
const EXITS = Number(values.exits);
const R = Number(values.rounds);
const RESULT = 0xa000; // u64 cycles written by the touch guest
const BUF = 0x200000; // u32 per-exit cycles written by the jitter guest

// rdtsc → rax (64-bit): rdtsc; shl rdx, 32; or rax, rdx
const RDTSC64 = [0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0];

/** Ring 3: out 0xf0 (host t0); t = rdtsc; touch [2 MiB, 2 MiB + RDX) every 4 KiB; [0xa000] = rdtsc − t; out 0xf4. */
function touchGuest() {
  return new Uint8Array([
    0x49, 0x89, 0xd1, //                               mov r9, rdx            (bytes to touch)
    0xe6, 0xf0, //                                     out 0xf0, al           (host timestamp)
    ...RDTSC64,
    0x49, 0x89, 0xc0, //                               mov r8, rax
    0x48, 0xc7, 0xc3, 0x00, 0x00, 0x20, 0x00, //       mov rbx, 0x200000
    0x4c, 0x01, 0xcb, //                               add rbx, r9            (end)
    0x48, 0xc7, 0xc1, 0x00, 0x00, 0x20, 0x00, //       mov rcx, 0x200000
    0xc6, 0x01, 0x01, //                            L: mov byte [rcx], 1
    0x48, 0x81, 0xc1, 0x00, 0x10, 0x00, 0x00, //       add rcx, 0x1000
    0x48, 0x39, 0xd9, //                               cmp rcx, rbx
    0x72, 0xf1, //                                     jb L
    ...RDTSC64,
    0x4c, 0x29, 0xc0, //                               sub rax, r8
    0x48, 0x89, 0x04, 0x25, 0x00, 0xa0, 0x00, 0x00, // mov [0xa000], rax
    0x31, 0xc0, //                                     xor eax, eax
    0xe6, 0xf4, //                                     out 0xf4, al
    0xeb, 0xfe, //                                     jmp $
  ]);
}

/** Ring 3: out 0xf0; RDX times { t = rdtsc; out 0xe0, al; [rdi] = rdtsc − t; rdi += 4 } from 2 MiB; out 0xf4. */
function jitterGuest() {
  const body = [
    ...RDTSC64,
    0x49, 0x89, 0xc0, //       mov r8, rax
    0xe6, 0xe0, //             out 0xe0, al
    ...RDTSC64,
    0x4c, 0x29, 0xc0, //       sub rax, r8
    0x89, 0x07, //             mov [rdi], eax
    0x48, 0x83, 0xc7, 0x04, // add rdi, 4
    0x49, 0xff, 0xc9, //       dec r9
  ];
  const back = -(body.length + 2);
  return new Uint8Array([
    0x49, 0x89, 0xd1, //                         mov r9, rdx
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, // mov rdi, 0x200000
    0xe6, 0xf0, //                               out 0xf0, al          (host timestamp)
    ...body,
    0x75, back & 0xff, //                        jnz L
    0x31, 0xc0, 0xe6, 0xf4, 0xeb, 0xfe, //       xor eax, eax; out 0xf4, al; jmp $
  ]);
}

/** Port devices: 0xf0 marks t0, 0xe0 does nothing (a main-thread exit), 0xf4 reads results and stops. */
function benchPorts(onExit) {
  const t = { t0: 0, t1: 0 };
  return {
    times: t,
    plugin: {
      name: 'bench-ports', version: '1.0.0',
      apply(m) {
        m.hooks.devices.tap('bench-ports', (reg) => {
          reg.addPio(0xf0, 1, { read() {}, write: () => { t.t0 = performance.now(); } }, 'mark');
          reg.addPio(0xe0, 1, { read() {}, write: () => {} }, 'nop');
          reg.addPio(0xf4, 1, { read() {}, write: (_o, d) => { t.t1 = performance.now(); onExit(m.memory); m.requestStop({ reason: 'guest-exit', exitCode: d[0] }); } }, 'exit');
        });
      },
    },
  };
}

async function run(m) {
  await m.start();
  const timer = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99, message: 'bench timeout' }), 120_000);
  const r = await m.waitForStop();
  clearTimeout(timer);
  if (r.reason !== 'guest-exit' || r.exitCode !== 0) throw new Error(`bench guest failed: ${r.reason} ${r.message ?? ''}`);
}

async function firstTouch(variant) {
  let cycles = 0n;
  const ports = benchPorts((mem) => { cycles = mem.readU64(RESULT); });
  const extra = variant === 'thp' ? [hugepages({ mode: 'thp' })] : variant === 'hugetlb-2M' ? [hugepages({ mode: 'hugetlb', size: '2M' })] : [];
  const memMiB = TOUCH_MIB + 64;
  const m = new Machine({ config: { name: 'touch', memory: memMiB, cpus: 1 }, plugins: [ports.plugin, ...extra, bootFlat({ image: touchGuest(), ring: 3, arg: TOUCH_MIB * 1024 * 1024 })], log: silentLogger() });
  await run(m);
  return { cycles: Number(cycles), ms: ports.times.t1 - ports.times.t0 };
}

async function jitter(variant) {
  let deltas = new Uint32Array(0);
  const ports = benchPorts((mem) => { deltas = new Uint32Array(mem.read(BUF, EXITS * 4).slice().buffer); });
  const extra = variant === 'pinned-split' ? [pinning({ vcpu0: [1], io: [0] })] : variant === 'pinned-same' ? [pinning({ vcpu0: [0], io: [0] })] : [];
  const m = new Machine({ config: { name: 'jitter', memory: 16, cpus: 1 }, plugins: [ports.plugin, ...extra, bootFlat({ image: jitterGuest(), ring: 3, arg: EXITS })], log: silentLogger() });
  await run(m);
  return { deltas, ms: ports.times.t1 - ports.times.t0 };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

function setNr(n) { writeFileSync('/proc/sys/vm/nr_hugepages', `${n}\n`); }
const canHugetlb = process.getuid?.() === 0 && existsSync('/proc/sys/vm/nr_hugepages');

const online = readFileSync('/sys/devices/system/cpu/online', 'utf8').trim();
const thpState = (() => { try { return /\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'))?.[1]; } catch { return 'unsupported'; } })();
console.log(`host: CPUs ${online}, THP ${thpState}; ${TOUCH_MIB} MiB first touch, ${EXITS} timed exits, ${R} rounds (median)`);

// ---- first touch
const touchVariants = ['4K', ...(thpState === 'never' ? [] : ['thp']), ...(canHugetlb ? ['hugetlb-2M'] : [])];
const touch = Object.fromEntries(touchVariants.map((v) => [v, []]));
const oldNr = canHugetlb ? Number(readFileSync('/proc/sys/vm/nr_hugepages', 'utf8')) : 0;
try {
  if (canHugetlb) setNr(oldNr + (TOUCH_MIB + 64) / 2);
  for (let r = 0; r < R; r++) for (const v of touchVariants) touch[v].push(await firstTouch(v));
} finally {
  if (canHugetlb) setNr(oldNr);
}
// TSC rate from the plain run: guest cycles over host wall time of the same interval (+2 exits, negligible).
const tscPerUs = median(touch['4K'].map((x) => x.cycles / (x.ms * 1000)));
console.log(`\nfirst touch of ${TOUCH_MIB} MiB (ring 3, 1 byte / 4 KiB page); TSC ≈ ${(tscPerUs / 1000).toFixed(3)} GHz`);
console.log('variant      guest ms   host ms   ns/page   vs 4K');
const touchOut = {};
const base = median(touch['4K'].map((x) => x.cycles));
for (const v of touchVariants) {
  const c = median(touch[v].map((x) => x.cycles));
  const ms = median(touch[v].map((x) => x.ms));
  const guestMs = c / tscPerUs / 1000;
  const nsPage = (guestMs * 1e6) / ((TOUCH_MIB * 1024 * 1024) / 4096);
  touchOut[v] = { guestMs, hostMs: ms, nsPerPage: nsPage, runs: touch[v] };
  console.log(`${v.padEnd(12)} ${guestMs.toFixed(1).padStart(8)} ${ms.toFixed(1).padStart(9)} ${nsPage.toFixed(0).padStart(9)} ${(c / base).toFixed(2).padStart(7)}x`);
}

// ---- exit jitter
const jitterVariants = ['unpinned', ...(online === '0' ? [] : ['pinned-split']), 'pinned-same'];
const jit = Object.fromEntries(jitterVariants.map((v) => [v, []]));
for (let r = 0; r < R; r++) for (const v of jitterVariants) jit[v].push(await jitter(v));
console.log(`\nexit latency per PIO exit (main-thread device), µs, from guest rdtsc deltas; ${EXITS} exits × ${R} rounds pooled`);
console.log('variant          p50     p90     p99   p99.9     max   wall µs/exit');
const jitterOut = {};
for (const v of jitterVariants) {
  const all = Float64Array.from(jit[v].flatMap((x) => Array.from(x.deltas, (d) => d / tscPerUs))).sort();
  const wall = median(jit[v].map((x) => (x.ms * 1000) / EXITS));
  const s = { p50: pct(all, 50), p90: pct(all, 90), p99: pct(all, 99), p999: pct(all, 99.9), max: all[all.length - 1], wallPerExit: wall };
  jitterOut[v] = s;
  console.log(`${v.padEnd(14)} ${[s.p50, s.p90, s.p99, s.p999, s.max].map((x) => x.toFixed(1).padStart(7)).join(' ')} ${wall.toFixed(1).padStart(10)}`);
}

mkdirSync(join(here, 'results'), { recursive: true });
const out = join(here, 'results/tuning.json');
writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), host: { online, thp: thpState }, touchMiB: TOUCH_MIB, exits: EXITS, rounds: R, tscPerUs, firstTouch: Object.fromEntries(Object.entries(touchOut).map(([k, v]) => [k, { ...v, runs: v.runs }])), jitter: jitterOut }, null, 2));
console.log(`\nwrote ${out}`);
