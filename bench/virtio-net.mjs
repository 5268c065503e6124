#!/usr/bin/env node
// virtio-net and virtio-rng throughput (issue 4): the probe guest's ring-3 polled drivers (probe.test=net, tx and rx
// modes; probe.test=rng) on kvmkit (@kvmkit/plugin-virtio-net / -virtio-rng) and on QEMU microvm (virtio-net-device
// on `-netdev tap,...,vhost=off`, virtio-rng-device; virtio-mmio v2), same ELF, in ONE run. Prints packets/s, host
// CPU seconds per GiB of UDP payload and rng bytes/s with ratios kvmkit/QEMU, writes bench/results/virtio-net.json.
//   node bench/virtio-net.mjs [--rounds R] [--tx-count N] [--rx-count N] [--batch B] [--rng-bytes B] [--elf path]
//                             [--baseline-root DIR] [--cpu-prof DIR] [--only tx,rx,rng]
// --baseline-root: a tree whose plugins/virtio-net and plugins/virtio-rng dist (e.g. an older commit's) run as a
// third peer, `kvmkit-base`, in the same rotation (its packages/ may be a symlink to this checkout's).
//
// Setup: a throwaway network namespace; each VMM's TAP (vnet_hdr, txqueuelen above the datagram count) lives in it
// with the host address, the guest's MAC is a static neighbour entry (no ARP in the timed part of rx).
// tx: the guest sends N UDP datagrams of 64 / 1400 payload bytes to a socket in the namespace that is bound but
//     never read (tiny SO_RCVBUF): the kernel drops them after the TAP write, so no receiver competes for the CPU.
//     Rate = what the VMM accepted from the TX queue (guest TSC, first datagram built → last TX buffer reclaimed).
// rx: a C sender (sendmmsg, 64 per call, compiled here with gcc into a temp dir) blasts N datagrams from the
//     namespace as fast as it can; the TAP queues what the VMM has not read yet (txqueuelen N + 1024), so the
//     guest's rate (first → last datagram seen) is the VMM's delivery rate. lost = datagrams the guest never saw.
// QEMU vhost-net (data path in the host kernel) is a separate row when /dev/vhost-net exists; it does not here.
// Host CPU: utime+stime of the VMM process (/proc/<pid>/stat, all threads; 10 ms ticks) sampled at the guest's
// `PROBE net_dev` line (just before the loop) and at its `PROBE net mode=` line (just after); runs shorter than a
// few ticks give 0 (the ratio then reads n/a): keep the default counts for CPU figures.
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const imp = (p, r = root) => import(pathToFileURL(join(r, p)).href);

// ---- child mode: one kvmkit VMM process (spawned by the bench so it is measured like QEMU) ---------------------
if (process.argv[2] === '--child') {
  const o = JSON.parse(process.argv[3]);
  const r0 = o.root ?? root; // --baseline-root: another build's plugins (same kernel)
  const { Machine, silentLogger } = await imp('packages/kernel/dist/index.js');
  const { default: bootLinux } = await imp('plugins/boot-linux/dist/index.js');
  const { default: serial } = await imp('plugins/serial/dist/index.js');
  const { default: platformPc } = await imp('plugins/platform-pc/dist/index.js');
  const dev = o.net ? (await imp('plugins/virtio-net/dist/index.js', r0)).default({ tap: o.net.tap, mac: o.net.mac, offload: false }) : (await imp('plugins/virtio-rng/dist/index.js', r0)).default({});
  const m = new Machine({
    config: { name: 'bench-net', memory: 64, cpus: 1, cmdline: o.cmdline },
    plugins: [dev, platformPc(), serial({ console: false, output: 'stdout' }), bootLinux({ kernel: o.elf })],
    log: silentLogger(),
  });
  await m.start({ paused: true });
  if (o.net) {
    const ip = (...a) => execFileSync('ip', a, { stdio: ['ignore', 'ignore', 'inherit'] });
    ip('link', 'set', o.net.tap, 'netns', o.net.ns);
    setupTap(ip, o.net);
  }
  const t = setTimeout(() => void m.stop({ reason: 'user', exitCode: 124, message: 'timeout' }), o.timeoutMs);
  await m.resume();
  const r = await m.waitForStop();
  clearTimeout(t);
  await m.stop();
  process.exit(r.exitCode ?? 0);
}

/** Address, queue length, static neighbour for the guest, up. `ip` runs `ip` with the given args. */
function setupTap(ip, n) {
  ip('-n', n.ns, 'addr', 'add', `${n.host}/24`, 'dev', n.tap);
  ip('-n', n.ns, 'link', 'set', n.tap, 'txqueuelen', String(n.qlen), 'up');
  ip('-n', n.ns, 'neigh', 'replace', n.guest, 'lladdr', n.mac, 'dev', n.tap, 'nud', 'permanent');
}

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '1' },
    // ~1 s per run: at 100k/50k (0.2-0.3 s) JIT warm-up and single scheduling hiccups weighed on the rates
    'tx-count': { type: 'string', default: '400000' },
    'rx-count': { type: 'string', default: '200000' },
    batch: { type: 'string', default: '32' },
    'rng-bytes': { type: 'string', default: String(256 << 10) },
    elf: { type: 'string' },
    'baseline-root': { type: 'string' },
    'cpu-prof': { type: 'string' },
    only: { type: 'string' },
  },
});
const R = Number(values.rounds);
const TXN = Number(values['tx-count']);
const RXN = Number(values['rx-count']);
const BATCH = Number(values.batch);
const RNGB = Number(values['rng-bytes']);
if (!(R >= 1 && TXN >= 1 && RXN >= 1 && BATCH >= 1 && RNGB >= 1)) throw new Error('numeric options must be positive');
// each TAP's txqueuelen is the datagram count + 1024: 601 024 was refused (EPERM) in the namespace here, 401 024 works
if (TXN > 500_000 || RXN > 500_000) throw new Error('--tx-count and --rx-count are at most 500000 (TAP txqueuelen)');

const { findExecutable, parseProbeOutput, probeElfPath, qemuProbeArgs, decodeQemuExit, netnsUnavailable } = await imp('packages/testkit/dist/index.js');
for (const p of ['plugins/virtio-net/dist/index.js', 'plugins/virtio-rng/dist/index.js', 'plugins/boot-linux/dist/index.js', 'plugins/platform-pc/dist/index.js', 'plugins/serial/dist/index.js']) {
  if (!existsSync(join(root, p))) throw new Error(`${p} is missing: build first (npx tsc -b plugins/virtio-net plugins/virtio-rng plugins/boot-linux plugins/platform-pc plugins/serial packages/testkit)`);
}
const noNet = netnsUnavailable();
if (noNet) throw new Error(`cannot run: ${noNet}`);
const qemu = findExecutable('qemu-system-x86_64');
if (!qemu) throw new Error('qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)');
const elf = values.elf ?? probeElfPath();
const vhost = existsSync('/dev/vhost-net');

// ---- host helper: UDP blaster and sink (C, sendmmsg) ----------------------------------------------------------
const HELPER_C = `
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc < 4) return 2;
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
  inet_pton(AF_INET, argv[2], &a.sin_addr);
  if (!strcmp(argv[1], "sink")) {            /* sink ADDR PORT: bound, never read, 4 KiB buffer */
    int sz = 4096; setsockopt(s, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    if (bind(s, (void *)&a, sizeof a)) { perror("bind"); return 1; }
    printf("ready\\n"); fflush(stdout); pause(); return 0;
  }
  int count = atoi(argv[4]), size = atoi(argv[5]), sent = 0, err = 0;   /* blast ADDR PORT COUNT SIZE */
  struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
  if (bind(s, (void *)&me, sizeof me)) { perror("bind"); return 1; }
  enum { B = 64 };
  static unsigned char buf[B][1500]; struct mmsghdr m[B]; struct iovec v[B];
  while (sent < count) {
    int n = count - sent < B ? count - sent : B;
    for (int k = 0; k < n; k++) {
      unsigned seq = sent + k;
      buf[k][0] = seq >> 24; buf[k][1] = seq >> 16; buf[k][2] = seq >> 8; buf[k][3] = seq;
      for (int i = 4; i < size; i++) buf[k][i] = (seq + i) & 255;
      v[k] = (struct iovec){ buf[k], size };
      m[k] = (struct mmsghdr){ .msg_hdr = { .msg_name = &a, .msg_namelen = sizeof a, .msg_iov = &v[k], .msg_iovlen = 1 } };
    }
    int r = sendmmsg(s, m, n, 0);
    if (r < 0) { err++; if (err > 100000) break; usleep(50); continue; }
    sent += r;
  }
  printf("{\\"sent\\":%d,\\"errors\\":%d}\\n", sent, err); return 0;
}
`;
const tmp = mkdtempSync(join(tmpdir(), 'kvmkit-bench-net-'));
writeFileSync(join(tmp, 'h.c'), HELPER_C);
execFileSync('gcc', ['-O2', '-o', join(tmp, 'h'), join(tmp, 'h.c')]);
const helper = join(tmp, 'h');

// ---- namespace ------------------------------------------------------------------------------------------------
const NS = `kvmkit-benchnet-${process.pid}`;
const HOST = '10.79.7.1';
const GUEST = '10.79.7.2';
const MAC = '52:54:00:7e:57:09';
const PORT = 5000;
const ipc = (...a) => execFileSync('ip', a, { stdio: ['ignore', 'pipe', 'pipe'] });
ipc('netns', 'add', NS);
ipc('-n', NS, 'link', 'set', 'lo', 'up');
const cleanup = () => {
  try {
    execFileSync('ip', ['netns', 'del', NS], { stdio: 'ignore' });
  } catch {}
  rmSync(tmp, { recursive: true, force: true });
};
process.on('exit', cleanup);
for (const s of ['SIGINT', 'SIGTERM']) process.on(s, () => process.exit(130));

const TICK = 100; // USER_HZ
function cpuTicks(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return NaN;
  }
}

/** Spawns a VMM; samples CPU at the device line and the result line; `onReady` runs when the device line appears. */
function runVmm(cmd, args, { devLine, resultLine, onReady, timeoutMs }) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let cpu0 = NaN;
    let cpu1 = NaN;
    let ready;
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.on('data', (d) => {
      out += d;
      if (Number.isNaN(cpu0) && out.includes(devLine) && out.indexOf('\n', out.indexOf(devLine)) > 0) {
        cpu0 = cpuTicks(child.pid);
        ready = onReady?.();
      }
      if (Number.isNaN(cpu1) && out.includes(resultLine)) cpu1 = cpuTicks(child.pid);
    });
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('close', async (code) => {
      clearTimeout(timer);
      const side = await Promise.resolve(ready).catch((e) => ({ error: String(e) }));
      const probe = parseProbeOutput(out);
      const test = resultLine.includes('rng') ? 'rng' : 'net';
      const line = probe.lines.find((l) => l.test === test && l.fields.cycles !== undefined);
      if (!line) {
        reject(new Error(`${cmd} ${args.join(' ')}: no PROBE ${test} result line (exit ${code})\n${out.slice(-2000)}\n${err.slice(-2000)}`));
        return;
      }
      resolve({ f: line.fields, raw: line.raw, cpuS: (cpu1 - cpu0) / TICK, exit: code, side });
    });
  });
}

/** Runs the helper inside the namespace; resolves with its first stdout line, keeps it running for sinks. */
function nsHelper(args) {
  const p = spawn('ip', ['netns', 'exec', NS, helper, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stderr.on('data', (d) => (err += d));
  const first = new Promise((res, rej) => {
    p.stdout.on('data', (d) => {
      out += d;
      if (out.includes('\n')) res(out.split('\n')[0]);
    });
    p.on('close', (c) => rej(new Error(`helper ${args[0]} exited ${c} before answering: ${err.trim()}`)));
  });
  return { p, first };
}

const BASE = values['baseline-root'];
// --cpu-prof DIR: each kvmkit child runs under `node --cpu-prof` (one .cpuprofile per process and thread in DIR).
const nodeArgs = values['cpu-prof'] ? ['--cpu-prof', `--cpu-prof-dir=${values['cpu-prof']}`] : [];
if (BASE && !existsSync(join(BASE, 'plugins/virtio-net/dist/index.js'))) throw new Error(`--baseline-root ${BASE}: plugins/virtio-net/dist/index.js is missing`);
const rootOf = (peer) => (peer === 'kvmkit-base' ? { root: BASE } : {});
let tapSeq = 0;
const netCase = (mode, size, count) => ({
  key: `${mode} ${size} B`,
  kind: 'net',
  mode,
  size,
  count,
  cmdline: `probe.test=net probe.net.mode=${mode} probe.net.ip=${GUEST} probe.net.host=${HOST} probe.net.port=${PORT} probe.net.count=${count} probe.net.size=${size} probe.net.batch=${BATCH} probe.net.secs=60 probe.net.idle_ms=3000`,
});
const cases = [netCase('tx', 64, TXN), netCase('tx', 1400, Math.max(1, TXN >> 1)), netCase('rx', 64, RXN), netCase('rx', 1400, RXN)];
cases.push({ key: `rng 256 B req`, kind: 'rng', cmdline: `probe.test=rng probe.rng.bytes=${RNGB} probe.rng.chunk=256` });
cases.push({ key: `rng 4 KiB req`, kind: 'rng', cmdline: `probe.test=rng probe.rng.bytes=${RNGB} probe.rng.chunk=4096` });
// --only PREFIX[,PREFIX]: just the cases whose name starts with one of them (e.g. `tx`, `rx 64`, `rng`)
if (values.only) {
  const keep = values.only.split(',');
  cases.splice(0, cases.length, ...cases.filter((c) => keep.some((k) => c.key.startsWith(k))));
}

/** One VMM run of one case: TAP made for it, host side started at the guest's device line. */
async function runCase(c, peer) {
  if (c.kind === 'rng') {
    const [cmd, args] =
      peer.startsWith('kvmkit')
        ? [process.execPath, [...nodeArgs, fileURLToPath(import.meta.url), '--child', JSON.stringify({ cmdline: c.cmdline, elf, timeoutMs: 60_000, ...rootOf(peer) })]]
        : [qemu, [...qemuProbeArgs(elf, c.cmdline), '-global', 'virtio-mmio.force-legacy=false', '-device', 'virtio-rng-device']];
    const s = await runVmm(cmd, args, { devLine: 'PROBE rng_dev', resultLine: 'PROBE rng bytes', timeoutMs: 90_000 });
    const secs = Number(s.f.cycles) / (Number(s.f.tsc_khz) * 1000);
    return { cmd: [cmd, ...args].join(' '), ok: s.f.ok === '1', bytesPerS: Number(s.f.bytes) / secs, cyclesPerReq: Number(s.f.cycles_per_req), cpuS: s.cpuS, raw: s.raw };
  }
  const tap = `kbn${process.pid % 10000}${tapSeq++}`;
  const n = { ns: NS, tap, host: HOST, guest: GUEST, mac: MAC, qlen: c.count + 1024 };
  let cmd;
  let args;
  if (peer.startsWith('kvmkit')) {
    [cmd, args] = [process.execPath, [...nodeArgs, fileURLToPath(import.meta.url), '--child', JSON.stringify({ cmdline: c.cmdline, elf, timeoutMs: 120_000, net: n, ...rootOf(peer) })]];
  } else {
    ipc('-n', NS, 'tuntap', 'add', 'dev', tap, 'mode', 'tap', 'vnet_hdr');
    setupTap(ipc, n);
    [cmd, args] = ['ip', ['netns', 'exec', NS, qemu, ...qemuProbeArgs(elf, c.cmdline), '-global', 'virtio-mmio.force-legacy=false', '-netdev', `tap,id=n0,ifname=${tap},script=no,downscript=no,vhost=${peer === 'qemu-vhost' ? 'on' : 'off'}`, '-device', `virtio-net-device,netdev=n0,mac=${MAC}`]];
  }
  let sink;
  if (c.mode === 'tx') {
    sink = nsHelper(['sink', '0.0.0.0', String(PORT)]); // the kvmkit TAP (and HOST) appears only later
    await sink.first;
  }
  try {
    const onReady = c.mode === 'rx' ? () => nsHelper(['blast', GUEST, String(PORT), String(c.count), String(c.size)]).first.then((l) => JSON.parse(l)) : undefined;
    const s = await runVmm(cmd, args, { devLine: 'PROBE net_dev', resultLine: 'PROBE net mode=', onReady, timeoutMs: 150_000 });
    const f = s.f;
    const bytes = Number(f.bytes);
    const packets = c.mode === 'tx' ? Number(f.sent) : Number(f.received);
    return {
      cmd: [cmd, ...args].join(' '),
      ok: f.ok === '1',
      pps: Number(f.pps),
      cyclesPerPkt: Number(f.cycles_per_pkt),
      packets,
      lost: c.mode === 'rx' ? Number(f.lost) : undefined,
      bytes,
      cpuS: s.cpuS,
      cpuSPerGiB: (s.cpuS / bytes) * (1 << 30),
      sender: s.side,
      raw: s.raw,
    };
  } finally {
    sink?.p.kill('SIGTERM');
    try {
      ipc('-n', NS, 'link', 'del', tap);
    } catch {}
  }
}

const peers = ['kvmkit', ...(BASE ? ['kvmkit-base'] : []), 'qemu', ...(vhost ? ['qemu-vhost'] : [])];
const load = () => loadavg().map((x) => +x.toFixed(2));
const results = { date: new Date().toISOString(), rounds: R, batch: BATCH, txCount: TXN, rxCount: RXN, rngBytes: RNGB, elf, baselineRoot: BASE, vhostNet: vhost, loadBefore: load(), samples: {} };
for (const c of cases) {
  const ps = c.kind === 'rng' ? peers.filter((p) => p !== 'qemu-vhost') : peers;
  results.samples[c.key] = Object.fromEntries(ps.map((p) => [p, []]));
  for (let r = 0; r < R; r++) {
    const order = ps.map((_, i) => ps[(i + r + cases.indexOf(c)) % ps.length]);
    for (const p of order) {
      const s = await runCase(c, p);
      if (p.startsWith('qemu') && s.exit !== undefined && decodeQemuExit(s.exit) === null) throw new Error(`QEMU exit ${s.exit}`);
      results.samples[c.key][p].push(s);
      process.stderr.write(
        c.kind === 'rng'
          ? `${c.key} ${p}: ${(s.bytesPerS / 1e6).toFixed(2)} MB/s, ${s.cyclesPerReq} cycles/req${s.ok ? '' : ' (NOT ok)'}\n`
          : `${c.key} ${p}: ${(s.pps / 1000).toFixed(1)} k pps, ${s.cyclesPerPkt} cycles/pkt, ${s.cpuSPerGiB.toFixed(1)} CPU s/GiB${s.lost !== undefined ? `, lost ${s.lost}` : ''}${s.ok ? '' : ' (NOT ok)'}\n`,
      );
    }
  }
}
results.loadAfter = load();

const med = (a) => {
  const s = [...a].sort((x, y) => x - y);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const pad = (s, n) => String(s).padStart(n);
// One row per case: each peer's rate, each kvmkit peer / QEMU (vhost=off); then host CPU s/GiB the same way.
const kv = peers.filter((p) => p.startsWith('kvmkit'));
const qemuName = (p) => (p === 'qemu' ? 'QEMU' : p === 'qemu-vhost' ? 'QEMU vhost' : p);
let hdr = 'case'.padEnd(15) + peers.map((p) => pad(qemuName(p), 13)).join('') + kv.map((p) => pad(`${p}/QEMU`, 18)).join('');
hdr += ' |' + peers.filter((p) => p !== 'qemu-vhost').map((p) => pad(`${qemuName(p)} CPU s/GiB`, 22)).join('') + kv.map((p) => pad(`${p}/QEMU`, 18)).join('');
const lines = [hdr];
results.medians = {};
for (const c of cases) {
  const sm = results.samples[c.key];
  const ps = Object.keys(sm);
  if (c.kind === 'rng') {
    const m = Object.fromEntries(ps.map((p) => [p, { bytesPerS: med(sm[p].map((s) => s.bytesPerS)), cyclesPerReq: med(sm[p].map((s) => s.cyclesPerReq)) }]));
    results.medians[c.key] = m;
    lines.push(c.key.padEnd(15) + peers.map((p) => pad(m[p] ? `${(m[p].bytesPerS / 1e6).toFixed(1)} MB/s` : '-', 13)).join('') + kv.map((p) => pad(`${(m[p].bytesPerS / m.qemu.bytesPerS).toFixed(2)}x`, 18)).join(''));
    continue;
  }
  const m = Object.fromEntries(ps.map((p) => [p, { pps: med(sm[p].map((s) => s.pps)), cpuSPerGiB: med(sm[p].map((s) => s.cpuSPerGiB)), lost: Math.max(...sm[p].map((s) => s.lost ?? 0)) }]));
  results.medians[c.key] = m;
  let l = c.key.padEnd(15) + peers.map((p) => pad(`${(m[p].pps / 1000).toFixed(1)}k pps`, 13)).join('') + kv.map((p) => pad(`${(m[p].pps / m.qemu.pps).toFixed(2)}x`, 18)).join('');
  l += ' |' + peers.filter((p) => p !== 'qemu-vhost').map((p) => pad(m[p].cpuSPerGiB.toFixed(1), 22)).join('') + kv.map((p) => pad(m.qemu.cpuSPerGiB > 0 ? `${(m[p].cpuSPerGiB / m.qemu.cpuSPerGiB).toFixed(2)}x` : 'n/a', 18)).join('');
  lines.push(l);
}
console.log(
  `virtio-net / virtio-rng, probe guest ring-3 polled drivers, tx batch ${BATCH}, tx ${TXN} × 64 B / ${TXN >> 1} × 1400 B, rx ${RXN} blasted; QEMU microvm -netdev tap,vhost=off` +
    `${vhost ? ' (+ vhost=on row)' : ' (/dev/vhost-net absent: no vhost row)'}; median of ${R} round(s); load ${results.loadBefore.join(' ')} → ${results.loadAfter.join(' ')}`,
);
console.log(lines.join('\n'));
mkdirSync(join(here, 'results'), { recursive: true });
writeFileSync(join(here, 'results/virtio-net.json'), JSON.stringify(results, null, 2));
