#!/usr/bin/env node
// virtio-blk throughput (issue 4): the probe guest's ring-3 polled driver (probe.test=blkbench) on kvmkit
// (@kvmkit/plugin-virtio-blk) and on QEMU microvm (virtio-blk-device, virtio-mmio v2), same ELF, same raw image
// in tmpfs (/dev/shm), in ONE run: sequential read and write, 4 KiB and 64 KiB requests. Prints MiB/s and host
// CPU time per GiB with ratios kvmkit/QEMU, and writes bench/results/virtio-blk.json.
//   node bench/virtio-blk.mjs [--rounds R] [--depth D] [--disk-mib M] [--bytes-4k B] [--bytes-64k B]
//                             [--qemu-cache writeback|none] [--no-async] [--no-main] [--poll-us N] [--baseline-root DIR] [--elf path]
// --baseline-root: a tree whose plugins/virtio-blk dist (e.g. an older commit's, with its own @kvmkit/virtio in its
// node_modules, and this tree's kernel) runs with default options as `kvmkit-base` in the same rotation.
//
// Peers: kvmkit (default options: the disk's I/O thread serves the queue; --poll-us sets its busy-poll window),
// kvmkit-main (ioThread: false: tmpfs image → synchronous I/O on the main thread, the default before the I/O
// thread), kvmkit-async (ioThread: false, syncIo: false → libuv threadpool), QEMU (-drive cache=writeback
// aio=threads: its default, page-cache I/O from its thread pool — the same data path as kvmkit's, a copy
// between guest memory and tmpfs pages; `--qemu-cache none` uses cache=none,aio=native instead, i.e. O_DIRECT,
// which tmpfs (Linux ≥ 6.6) serves as the same copy).
// Timing: the guest's TSC cycles from its first submission to its last completion (ring 3), converted with
// the guest's tsc_khz. Host CPU: utime+stime of the VMM process (/proc/<pid>/stat, all threads) sampled when
// the guest prints the `PROBE blk_dev` line (just before the loop) and the `PROBE blkbench` line (just after);
// clock ticks are 10 ms, so runs are sized to last ≥ 0.2 s. The polled guest keeps its vCPU thread busy the whole
// time, so the total is mostly wall time; "w/o vCPU" subtracts the vCPU thread (/proc/<pid>/task/<tid>/stat:
// kvmkit's child reports the tid, QEMU names the thread "CPU 0/KVM") and is the device side's own cost. The image is fully written before the first run,
// so no run pays for tmpfs page allocation. Within each round the VMM order rotates; medians of R rounds.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, openSync, closeSync, readFileSync, readdirSync, rmSync, writeSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');

// ---- child mode: one kvmkit VMM process (spawned by the bench so it is measured like QEMU) ---------------------
if (process.argv[2] === '--child') {
  const o = JSON.parse(process.argv[3]);
  const imp = (p) => import(pathToFileURL(join(root, p)).href);
  const { Machine, silentLogger } = await imp('packages/kernel/dist/index.js');
  const { default: bootLinux } = await imp('plugins/boot-linux/dist/index.js');
  const { default: serial } = await imp('plugins/serial/dist/index.js');
  const { default: platformPc } = await imp('plugins/platform-pc/dist/index.js');
  // --baseline-root: another build's plugins/virtio-blk (and, through its node_modules, its @kvmkit/virtio).
  const { default: virtioBlk } = await import(pathToFileURL(join(o.root ?? root, 'plugins/virtio-blk/dist/index.js')).href);
  const m = new Machine({
    config: { name: 'bench-blk', memory: 64, cpus: 1, cmdline: o.cmdline },
    plugins: [virtioBlk({ path: o.image, ...(o.syncIo === undefined ? {} : { syncIo: o.syncIo }), ...(o.ioThread === undefined ? {} : { ioThread: o.ioThread }), ...(o.pollUs === undefined ? {} : { pollUs: o.pollUs }) }), platformPc(), serial({ console: false, output: 'stdout' }), bootLinux({ kernel: o.elf })],
    log: silentLogger(),
  });
  await m.start();
  process.stderr.write(`KVMKIT_VCPU_TIDS=${m.vcpuThreadIds.join(',')}\n`);
  const t = setTimeout(() => void m.stop({ reason: 'user', exitCode: 124, message: 'timeout' }), o.timeoutMs);
  const r = await m.waitForStop();
  clearTimeout(t);
  await m.stop();
  process.exit(r.exitCode ?? 0);
}

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '1' },
    depth: { type: 'string', default: '8' },
    'disk-mib': { type: 'string', default: '256' },
    // Long enough for steady state (~0.2–0.5 s per run): at 64 MiB / 512 MiB a run lasted 50–150 ms and kvmkit's
    // device path spent much of it warming up in V8 (interpreted, then optimised), which halved its figures.
    'bytes-4k': { type: 'string', default: String(256 << 20) },
    'bytes-64k': { type: 'string', default: String(2 * 1024 ** 3) },
    'qemu-cache': { type: 'string', default: 'writeback' },
    'no-async': { type: 'boolean', default: false },
    'no-main': { type: 'boolean', default: false },
    'poll-us': { type: 'string' },
    'baseline-root': { type: 'string' },
    elf: { type: 'string' },
  },
});
const R = Number(values.rounds);
const DEPTH = Number(values.depth);
const DISK = Number(values['disk-mib']) << 20;
const QCACHE = values['qemu-cache'];
if (!(R >= 1 && DEPTH >= 1 && DISK > 0)) throw new Error('--rounds, --depth and --disk-mib must be positive');
if (QCACHE !== 'writeback' && QCACHE !== 'none') throw new Error('--qemu-cache is writeback or none');

const { findExecutable, parseProbeOutput, probeElfPath, qemuProbeArgs, decodeQemuExit } = await import(pathToFileURL(join(root, 'packages/testkit/dist/index.js')).href);
for (const p of ['plugins/virtio-blk/dist/index.js', 'plugins/boot-linux/dist/index.js', 'plugins/platform-pc/dist/index.js', 'plugins/serial/dist/index.js']) {
  if (!existsSync(join(root, p))) throw new Error(`${p} is missing: build first (npx tsc -b plugins/virtio-blk plugins/boot-linux plugins/platform-pc plugins/serial packages/testkit)`);
}
const qemu = findExecutable('qemu-system-x86_64');
if (!qemu) throw new Error('qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)');
const elf = values.elf ?? probeElfPath();
if (!existsSync('/dev/shm')) throw new Error('/dev/shm (tmpfs) is missing');

// ---- the image: tmpfs, every page allocated up front ----------------------------------------------------------
const image = `/dev/shm/kvmkit-bench-blk-${process.pid}.img`;
{
  const fd = openSync(image, 'w');
  const chunk = Buffer.alloc(1 << 20);
  for (let i = 0; i < chunk.length; i += 8) chunk.writeUInt32LE(i, i);
  for (let off = 0; off < DISK; off += chunk.length) writeSync(fd, chunk, 0, chunk.length, off);
  closeSync(fd);
}
process.on('exit', () => rmSync(image, { force: true }));
for (const s of ['SIGINT', 'SIGTERM']) process.on(s, () => process.exit(130));

const TICK = 100; // USER_HZ
function cpuTicks(pid, tid) {
  try {
    const s = readFileSync(tid === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${tid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]); // utime, stime (fields 14, 15)
  } catch {
    return NaN;
  }
}

/** The vCPU thread: kvmkit's child reports it (KVMKIT_VCPU_TIDS=), QEMU names it "CPU 0/KVM". */
function vcpuTid(pid, stderr) {
  const m = /KVMKIT_VCPU_TIDS=(\d+)/.exec(stderr);
  if (m) return Number(m[1]);
  try {
    for (const t of readdirSync(`/proc/${pid}/task`)) {
      if (/^CPU \d+\/KVM/.test(readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8'))) return Number(t);
    }
  } catch {
    /* gone */
  }
  return undefined;
}

/**
 * Spawns a VMM, samples its CPU time (whole process and the vCPU thread) at the two probe lines, returns the
 * parsed blkbench line.
 */
function runVmm(cmd, args, timeoutMs) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let tid;
    let cpu0 = NaN, cpu1 = NaN, vcpu0 = NaN, vcpu1 = NaN;
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.on('data', (d) => {
      out += d;
      if (Number.isNaN(cpu0) && out.includes('PROBE blk_dev')) {
        tid = vcpuTid(child.pid, err);
        cpu0 = cpuTicks(child.pid);
        vcpu0 = tid === undefined ? NaN : cpuTicks(child.pid, tid);
      }
      if (Number.isNaN(cpu1) && out.includes('PROBE blkbench')) {
        cpu1 = cpuTicks(child.pid);
        vcpu1 = tid === undefined ? NaN : cpuTicks(child.pid, tid);
      }
    });
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      const probe = parseProbeOutput(out);
      const line = probe.lines.find((l) => l.test === 'blkbench');
      if (!line || line.fields.ok !== '1') {
        reject(new Error(`${cmd} ${args.join(' ')}: no successful PROBE blkbench line (exit ${code})\n${out.slice(-2000)}\n${err.slice(-2000)}`));
        return;
      }
      const f = line.fields;
      const bytes = Number(f.bytes);
      const secs = Number(f.cycles) / (Number(f.tsc_khz) * 1000);
      const cpuS = (cpu1 - cpu0) / TICK;
      const vcpuS = (vcpu1 - vcpu0) / TICK;
      const perGiB = (x) => (x / bytes) * (1 << 30);
      resolve({ mibS: bytes / (1 << 20) / secs, secs, bytes, requests: Number(f.requests), kicks: Number(f.kicks), cpuSPerGiB: perGiB(cpuS), deviceCpuSPerGiB: perGiB(cpuS - vcpuS), cpuS, vcpuS, exit: code, raw: line.raw });
    });
  });
}

const POLL_US = values['poll-us'] === undefined ? undefined : Number(values['poll-us']);
const BASE = values['baseline-root'];
if (BASE && !existsSync(join(BASE, 'plugins/virtio-blk/dist/index.js'))) throw new Error(`--baseline-root ${BASE}: plugins/virtio-blk/dist/index.js is missing`);
const child = (cmdline, extra) => [process.execPath, [fileURLToPath(import.meta.url), '--child', JSON.stringify({ cmdline, image, elf, timeoutMs: 120_000, ...extra })]];
const peers = {
  kvmkit: (cmdline) => child(cmdline, POLL_US === undefined ? {} : { pollUs: POLL_US }),
  'kvmkit-main': (cmdline) => child(cmdline, { ioThread: false }),
  'kvmkit-async': (cmdline) => child(cmdline, { ioThread: false, syncIo: false }),
  ...(BASE ? { 'kvmkit-base': (cmdline) => child(cmdline, { root: BASE }) } : {}),
  qemu: (cmdline) => [
    qemu,
    [
      ...qemuProbeArgs(elf, cmdline),
      '-name', 'bench-blk,debug-threads=on', // names the vCPU thread "CPU 0/KVM"
      '-global', 'virtio-mmio.force-legacy=false',
      '-drive', `file=${image},format=raw,if=none,id=d0,${QCACHE === 'none' ? 'cache=none,aio=native' : 'cache=writeback,aio=threads'}`,
      '-device', 'virtio-blk-device,drive=d0',
    ],
  ],
};
if (values['no-async']) delete peers['kvmkit-async'];
if (values['no-main']) delete peers['kvmkit-main'];
const names = Object.keys(peers);

const cases = [];
for (const req of [4096, 65536]) for (const mode of ['read', 'write']) cases.push({ mode, req, bytes: Number(req === 4096 ? values['bytes-4k'] : values['bytes-64k']) });

const load = () => loadavg().map((x) => +x.toFixed(2));
const results = { date: new Date().toISOString(), rounds: R, depth: DEPTH, diskBytes: DISK, qemuCache: QCACHE, elf, baselineRoot: BASE, pollUs: POLL_US, commands: {}, loadBefore: load(), samples: {} };
for (const c of cases) {
  const key = `${c.mode} ${c.req / 1024}k`;
  const cmdline = `probe.test=blkbench probe.blk.mode=${c.mode} probe.blk.req=${c.req} probe.blk.bytes=${c.bytes} probe.blk.depth=${DEPTH}`;
  results.commands[key] = Object.fromEntries(names.map((n) => [n, peers[n](cmdline).flat().join(' ')]));
  results.samples[key] = Object.fromEntries(names.map((n) => [n, []]));
  for (let r = 0; r < R; r++) {
    const order = names.map((_, i) => names[(i + r + cases.indexOf(c)) % names.length]);
    for (const n of order) {
      const [cmd, args] = peers[n](cmdline);
      const s = await runVmm(cmd, args, 180_000);
      if (n === 'qemu' && decodeQemuExit(s.exit) !== 0) throw new Error(`QEMU exit ${s.exit}`);
      results.samples[key][n].push(s);
      process.stderr.write(`${key} ${n}: ${s.mibS.toFixed(1)} MiB/s, ${s.cpuSPerGiB.toFixed(2)} CPU s/GiB, ${s.deviceCpuSPerGiB.toFixed(2)} without the vCPU thread (${s.requests} requests, ${s.kicks} notifications, ${s.secs.toFixed(3)} s)\n`);
    }
  }
}
results.loadAfter = load();

const med = (a) => {
  const s = [...a].sort((x, y) => x - y);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const pad = (s, n) => String(s).padStart(n);
const kv = names.filter((n) => n !== 'qemu');
const metrics = [
  ['mibS', 'MiB/s', 1],
  ['cpuSPerGiB', 'CPU s/GiB', 2],
  ['deviceCpuSPerGiB', 'CPU s/GiB w/o vCPU', 2],
];
const lines = [];
results.medians = {};
for (const key of Object.keys(results.samples)) {
  results.medians[key] = Object.fromEntries(names.map((n) => [n, Object.fromEntries(metrics.map(([m]) => [m, med(results.samples[key][n].map((s) => s[m]))]))]));
}
for (const [m, label, digits] of metrics) {
  lines.push('');
  lines.push(`${label.padEnd(20)}` + names.map((n) => pad(n, 14)).join('') + kv.map((n) => pad(`${n}/qemu`, 20)).join(''));
  for (const key of Object.keys(results.samples)) {
    const r = results.medians[key];
    lines.push(key.padEnd(20) + names.map((n) => pad(r[n][m].toFixed(digits), 14)).join('') + kv.map((n) => pad(`${(r[n][m] / r.qemu[m]).toFixed(2)}x`, 20)).join(''));
  }
}
console.log(`virtio-blk sequential throughput, probe blkbench ring-3 polled, depth ${DEPTH}, ${DISK >> 20} MiB raw image in /dev/shm, QEMU cache=${QCACHE}; median of ${R} round(s); load ${results.loadBefore.join(' ')} → ${results.loadAfter.join(' ')}`);
console.log(lines.join('\n'));
mkdirSync(join(here, 'results'), { recursive: true });
writeFileSync(join(here, 'results/virtio-blk.json'), JSON.stringify(results, null, 2));
