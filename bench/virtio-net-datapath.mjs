#!/usr/bin/env node
// Host-only microbenchmark of the virtio-net data path (no guest, no vCPU): the device (VirtioNet over a
// VirtioMmioTransport) on mmap'd "guest" RAM, a host-side driver that keeps the rings full, a real TAP in a
// throwaway network namespace. Measures main-thread time per packet, which is what bounds the VMM's packet rate.
//   node bench/virtio-net-datapath.mjs [--count N] [--rounds R] [--sizes 64,1400] [--modes tx,rx]
//                                           [--plugin-root DIR]
// tx: the driver refills all 256 TX chains (one 12 + frame descriptor each, like Linux and the probe guest) and
//     notifies; the frames are UDP datagrams to a socket in the namespace that is bound and never read (the kernel
//     drops them after the TAP write, as in bench/virtio-net.mjs).
// rx: a C sender (sendmmsg) first queues the datagrams in the TAP (txqueuelen above the count); the driver posts
//     2 KiB buffers (like the probe guest) and notifies until a block is delivered.
// Blocks of 2048 packets through the device alternate with blocks of bare write(2)/read(2) calls on the same TAP,
// frames and (tx) guest buffers, so both see the same host load; the report gives medians over the blocks.
// "overhead" = device - bare of each block pair: the device's own cost per packet (rings, JS, koffi), the part this
// plugin can cut; "bare" is the kernel's TAP cost plus one koffi call.
// --plugin-root DIR runs another build's plugins/virtio-net/dist (same kernel and virtio) for an A/B on one host.
// Needs root, /dev/net/tun, `ip`, gcc; build first (npx tsc -b plugins/virtio-net).
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const imp = (p) => import(pathToFileURL(join(root, p)).href);
const { GuestMemory, ffi, silentLogger } = await imp('packages/kernel/dist/index.js');
const { VirtioMmioTransport, VirtioTestDriver, VIRTIO_F, bit } = await imp('packages/virtio/dist/index.js');

const { values } = parseArgs({
  options: {
    count: { type: 'string', default: '200000' },
    rounds: { type: 'string', default: '3' },
    sizes: { type: 'string', default: '64,1400' },
    modes: { type: 'string', default: 'tx,rx' },
    'plugin-root': { type: 'string' },
  },
});
// --plugin-root DIR: another build's plugins/virtio-net/dist (e.g. an older commit's, for an A/B on one host)
const pluginRoot = values['plugin-root'] ?? root;
const { Tap, VirtioNet, VIRTIO_NET_F, RXQ, TXQ, parseMac } = await import(pathToFileURL(join(pluginRoot, 'plugins/virtio-net/dist/index.js')).href);
const N = Number(values.count);
const R = Number(values.rounds);
const SIZES = values.sizes.split(',').map(Number);
const MODES = values.modes.split(',');

const NS = `kvmkit-netdpb-${process.pid}`;
const HOST = [10, 79, 11, 1];
const GUEST = [10, 79, 11, 2];
const MAC = '52:54:00:7e:57:0b';
const PORT = 5000;
const ip = (...a) => execFileSync('ip', a, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const tmp = mkdtempSync(join(tmpdir(), 'kvmkit-netdpb-'));
writeFileSync(
  join(tmp, 'h.c'),
  `#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
  inet_pton(AF_INET, argv[2], &a.sin_addr);
  if (!strcmp(argv[1], "sink")) {
    int sz = 4096; setsockopt(s, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    if (bind(s, (void *)&a, sizeof a)) { perror("bind"); return 1; }
    printf("ready\\n"); fflush(stdout); pause(); return 0;
  }
  int count = atoi(argv[4]), size = atoi(argv[5]), sent = 0, err = 0;
  enum { B = 64 };
  static unsigned char buf[B][1500]; struct mmsghdr m[B]; struct iovec v[B];
  while (sent < count) {
    int n = count - sent < B ? count - sent : B;
    for (int k = 0; k < n; k++) {
      v[k] = (struct iovec){ buf[k], size };
      m[k] = (struct mmsghdr){ .msg_hdr = { .msg_name = &a, .msg_namelen = sizeof a, .msg_iov = &v[k], .msg_iovlen = 1 } };
    }
    int r = sendmmsg(s, m, n, 0);
    if (r < 0) { if (++err > 100000) break; usleep(50); continue; }
    sent += r;
  }
  printf("%d\\n", sent); return 0;
}
`,
);
execFileSync('gcc', ['-O2', '-o', join(tmp, 'h'), join(tmp, 'h.c')]);
ip('netns', 'add', NS);
const children = [];
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
  try {
    ip('netns', 'del', NS);
  } catch {}
  rmSync(tmp, { recursive: true, force: true });
});
for (const s of ['SIGINT', 'SIGTERM']) process.on(s, () => process.exit(130));
execFileSync('ip', ['netns', 'exec', NS, 'sysctl', '-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);

function helper(args) {
  const p = spawn('ip', ['netns', 'exec', NS, join(tmp, 'h'), ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(p);
  return new Promise((res, rej) => {
    let out = '';
    p.stdout.on('data', (d) => {
      out += d;
      if (out.includes('\n')) res({ p, line: out.split('\n')[0] });
    });
    p.on('close', (c) => rej(new Error(`helper ${args[0]} exited ${c}`)));
  });
}

function csum(b, s = 0) {
  for (let i = 0; i < b.length; i += 2) s += (b[i] << 8) | (b[i + 1] ?? 0);
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return s;
}
/** vnet header (zero) + Ethernet + IPv4 + UDP(checksum 0) + payload of `size` bytes. */
function udpFrame(dstMac, size) {
  const f = Buffer.alloc(12 + 14 + 20 + 8 + size);
  const e = 12;
  f.set(dstMac, e);
  f.set(parseMac(MAC), e + 6);
  f.writeUInt16BE(0x0800, e + 12);
  const iph = e + 14;
  f[iph] = 0x45;
  f.writeUInt16BE(20 + 8 + size, iph + 2);
  f.writeUInt16BE(0x4000, iph + 6);
  f[iph + 8] = 64;
  f[iph + 9] = 17;
  f.set(GUEST, iph + 12);
  f.set(HOST, iph + 16);
  f.writeUInt16BE(~csum(f.subarray(iph, iph + 20)) & 0xffff, iph + 10);
  const u = iph + 20;
  f.writeUInt16BE(PORT, u);
  f.writeUInt16BE(PORT, u + 2);
  f.writeUInt16BE(8 + size, u + 4);
  for (let i = 0; i < size; i++) f[u + 8 + i] = i & 255;
  return f;
}

const MEM = 32 << 20;
let seq = 0;
/** A NIC on mmap'd guest RAM (host addresses available, like a real VM) with its TAP in the namespace. */
function nic() {
  const tap = Tap.open(`kdb${process.pid % 10000}${seq++}`);
  ip('link', 'set', tap.name, 'netns', NS);
  ip('-n', NS, 'addr', 'add', `${HOST.join('.')}/24`, 'dev', tap.name);
  ip('-n', NS, 'link', 'set', tap.name, 'txqueuelen', String(2 * N + 16384), 'up');
  ip('-n', NS, 'neigh', 'replace', GUEST.join('.'), 'lladdr', MAC, 'dev', tap.name, 'nud', 'permanent');
  const hostMac = JSON.parse(ip('-n', NS, '-j', 'link', 'show', tap.name))[0].address.split(':').map((x) => parseInt(x, 16));
  const hva = ffi.mmap(MEM, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_ANONYMOUS | ffi.MAP_NORESERVE);
  const mem = new GuestMemory([{ gpa: 0n, size: MEM, bytes: new Uint8Array(ffi.viewOf(hva, MEM)), hva, slot: -1, name: 'ram' }]);
  const dev = new VirtioNet(tap, { mac: parseMac(MAC), queueSize: 256, offload: false, log: silentLogger() });
  let irqs = 0;
  const t = new VirtioMmioTransport(dev, { memory: mem, raiseIrq: () => irqs++ });
  const drv = new VirtioTestDriver(t, mem, 0x1000n);
  drv.init({ want: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_NET_F.MAC) | bit(VIRTIO_NET_F.STATUS) });
  const tapStats = () => JSON.parse(ip('-n', NS, '-s', '-j', 'link', 'show', tap.name))[0].stats64;
  const close = async () => {
    await t.close();
    ffi.munmap(hva, MEM);
  };
  return { tap, dev, mem, t, drv, hostMac, tapStats, irqs: () => irqs, close };
}

/** Fixed descriptors (one per ring slot, `len` bytes at bufs[i]) and direct ring access for queue q. */
function ring(n, q, len, write, fill) {
  const dq = n.drv.queues[q];
  const size = dq.size;
  const bufs = [];
  for (let i = 0; i < size; i++) {
    const a = n.drv.alloc(2048, 16);
    bufs.push(a);
    if (fill) n.mem.write(a, fill);
    const d = dq.desc + BigInt(16 * i);
    n.mem.writeU64(d, a);
    n.mem.writeU32(d + 8n, len);
    n.mem.writeU16(d + 12n, write ? 2 : 0);
    n.mem.writeU16(d + 14n, 0);
  }
  const av = n.mem.range(dq.avail, 4 + 2 * size);
  const avail = new Uint16Array(av.buffer, av.byteOffset, 2 + size);
  const us = n.mem.range(dq.used, 4 + 8 * size);
  const used = new Uint16Array(us.buffer, us.byteOffset, 2);
  const usedLen = new Uint32Array(us.buffer, us.byteOffset + 4, 2 * size);
  let availIdx = 0;
  let lastUsed = 0;
  return {
    bufs,
    /** Publishes every free slot (chains complete in order, so slot = avail index mod size). */
    refill(limit = size) {
      const u = Atomics.load(used, 1);
      lastUsed = u;
      let added = 0;
      while (((availIdx - lastUsed) & 0xffff) < size && added < limit) {
        avail[2 + (availIdx % size)] = availIdx % size;
        availIdx = (availIdx + 1) & 0xffff;
        added++;
      }
      Atomics.store(avail, 1, availIdx);
      return added;
    },
    usedIdx: () => Atomics.load(used, 1),
    usedLen: (k) => usedLen[2 * (k % size) + 1],
  };
}

const BLOCK = 2048;

async function tx(size) {
  const n = nic();
  const sink = await helper(['sink', '0.0.0.0', String(PORT)]);
  try {
    const f = udpFrame(n.hostMac, size);
    const r = ring(n, TXQ, f.length, false, f);
    const views = r.bufs.map((a) => n.mem.view(a, f.length));
    const before = n.tapStats().rx.packets;
    let sent = 0;
    let bare = 0;
    const device = (count) => {
      const target = sent + count;
      while (sent < target) {
        sent += r.refill();
        n.t.notify(TXQ);
      }
      for (let k = 0; r.usedIdx() !== (sent & 0xffff); k++) {
        if (k > 1000) throw new Error('TX ring does not drain');
        n.t.notify(TXQ);
      }
    };
    // the same frames from the same guest buffers, one bare write(2) each (no device code)
    const floor = (count) => {
      for (let i = 0; i < count; i++) if (n.tap.write(views[i & 255]) !== f.length) throw new Error('bare write failed');
      bare += count;
    };
    device(BLOCK);
    floor(BLOCK);
    const blocks = alternateBlocks(N, device, floor);
    const got = n.tapStats().rx.packets - before;
    if (n.dev.stats.txDropped) throw new Error(`tx dropped ${n.dev.stats.txDropped}`);
    if (got < sent + bare) throw new Error(`TAP saw ${got} of ${sent + bare} frames`);
    return blocks;
  } finally {
    sink.p.kill('SIGKILL');
    await n.close();
  }
}

/**
 * Alternates BLOCK-sized blocks of device work and bare syscalls (so both see the same host load) until `total`;
 * returns [device ns/frame, bare ns/frame] per block pair.
 */
function alternateBlocks(total, device, floor) {
  const blocks = [];
  for (let done = 0; done < total; done += BLOCK) {
    let t = process.hrtime.bigint();
    device(BLOCK);
    const d = Number(process.hrtime.bigint() - t) / BLOCK;
    t = process.hrtime.bigint();
    floor(BLOCK);
    blocks.push([d, Number(process.hrtime.bigint() - t) / BLOCK]);
  }
  return blocks;
}

async function rx(size) {
  const n = nic();
  try {
    const r = ring(n, RXQ, 2048, true);
    const half = Math.ceil(N / 2 / BLOCK) * BLOCK;
    // the device holds one frame and stops reading until buffers come; the TAP queues the rest
    const { line } = await helper(['blast', GUEST.join('.'), String(PORT), String(2 * half + 1), String(size)]);
    if (Number(line) !== 2 * half + 1) throw new Error(`sender sent ${line}`);
    await new Promise((res) => setTimeout(res, 50));
    const want = 12 + 14 + 20 + 8 + size;
    const buf = Buffer.alloc(65602);
    // the device first delivers the frame it held
    r.refill(1);
    n.t.notify(RXQ);
    if (r.usedIdx() !== 1) throw new Error('the held frame was not delivered');
    let got = 0;
    const device = (count) => {
      const target = got + count;
      // at most `count` buffers beyond what is delivered: the device takes exactly `count` frames
      while (got < target) {
        const u0 = r.usedIdx();
        r.refill(target - got);
        n.t.notify(RXQ);
        const k = (r.usedIdx() - u0) & 0xffff;
        if (k === 0) throw new Error(`device delivered nothing (got ${got}, dropped ${n.dev.stats.rxDropped})`);
        got += k;
      }
    };
    // bare read(2) calls into one host buffer (no device code)
    const floor = (count) => {
      for (let i = 0; i < count; i++) {
        const k = n.tap.read(buf);
        if (k !== want) throw new Error(`bare read returned ${k}`);
      }
    };
    const blocks = alternateBlocks(half, device, floor);
    if (r.usedLen(r.usedIdx() - 1) !== want) throw new Error(`used len ${r.usedLen(r.usedIdx() - 1)} != ${want}`);
    if (n.dev.stats.rxDropped) throw new Error(`rx dropped ${n.dev.stats.rxDropped}`);
    return blocks;
  } finally {
    await n.close();
  }
}

const out = {};
const med = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];
for (let round = 0; round < R; round++) {
  for (const mode of MODES) {
    for (const size of SIZES) {
      const k = `${mode} ${size} B`;
      const blocks = mode === 'tx' ? await tx(size) : await rx(size);
      (out[k] ??= []).push(...blocks);
      process.stderr.write(`${k}: device ${med(blocks.map((b) => b[0])).toFixed(0)} ns/packet, bare ${mode === 'tx' ? 'write' : 'read'}(2) ${med(blocks.map((b) => b[1])).toFixed(0)} ns (block medians)\n`);
    }
  }
}
console.log(`virtio-net data path, host only, ${N} packets per run (rx: ${N / 2}), ${R} round(s); medians over blocks of ${BLOCK}: device = whole data path, bare = read/write(2) alone, overhead = device - bare of the same block pair:`);
for (const [k, v] of Object.entries(out)) {
  const d = med(v.map((x) => x[0]));
  const b = med(v.map((x) => x[1]));
  const o = med(v.map((x) => x[0] - x[1]));
  console.log(`${k.padEnd(12)} device ${d.toFixed(0).padStart(5)} ns/packet   bare ${b.toFixed(0).padStart(5)} ns   overhead ${o.toFixed(0).padStart(5)} ns   (${v.length} block pairs)`);
}
process.exit(0);
