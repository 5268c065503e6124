/**
 * virtio-blk on its I/O thread against the probe guest on a real VM (skipped without /dev/kvm): the guest's own
 * drivers (test/guests/probe/blk.c) — the ring-0 `blk` driver (EVENT_IDX, interrupts) and the ring-3 polled
 * `blkbench` driver (NO_NOTIFY / NO_INTERRUPT) — are served entirely by the worker: the main-thread processQueue
 * is never called, the worker's sessions and wake-ups are counted, the image holds what the guest wrote.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Machine, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootLinux from '@kvmkit/plugin-boot-linux';
import platformPc from '@kvmkit/plugin-platform-pc';
import serial from '@kvmkit/plugin-serial';
import { parseProbeOutput, probeElfPath } from '@kvmkit/testkit';
import virtioBlk, { type VirtioBlkApi } from './index.js';

const hasKvm = fs.existsSync('/dev/kvm');
if (!hasKvm) console.warn('[virtio-blk kvm test] /dev/kvm not present: skipped');

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'kvmkit-blk-kvm-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function runProbe(cmdline: string, image: string) {
  const chunks: Uint8Array[] = [];
  let mainCalls = 0;
  let api: VirtioBlkApi | undefined;
  let io: { counters: { sessions: number; wakeups: number; pollHits: number } } | undefined;
  // Counts main-thread processQueue calls (there must be none: the I/O thread serves the queue).
  const observer: Plugin = {
    name: 'blk-observer',
    version: '0.1.0',
    kernel: '^0.1.0',
    apply(machine) {
      machine.hooks.beforeRun.tapPromise('blk-observer', async () => {
        api = machine.use<VirtioBlkApi>('virtio-blk');
        io = api!.registration()!.transport.ioThread;
        const d = api!.device!;
        const orig = d.processQueue.bind(d);
        d.processQueue = (q: number) => {
          mainCalls++;
          orig(q);
        };
      });
    },
  };
  const m = new Machine({
    config: { name: 'blk-kvm', memory: 64, cpus: 1, cmdline },
    plugins: [virtioBlk({ path: image }), observer, platformPc(), serial({ console: false, output: 'none', sink: (b: Uint8Array) => void chunks.push(b) }), bootLinux({ kernel: probeElfPath() })],
    log: silentLogger(),
  });
  let exitCode: number | undefined;
  try {
    await m.start();
    const timer = setTimeout(() => void m.stop({ reason: 'user', exitCode: 124, message: 'test timeout' }), 60_000);
    const r = await m.waitForStop();
    clearTimeout(timer);
    exitCode = r.exitCode;
  } finally {
    await m.stop();
  }
  const probe = parseProbeOutput(Buffer.concat(chunks).toString());
  return { probe, mainCalls, counters: io?.counters, exitCode, stats: { ...api!.device!.stats }, out: Buffer.concat(chunks).toString() };
}

describe.skipIf(!hasKvm)('virtio-blk I/O thread with the probe guest on /dev/kvm', () => {
  it('ring-0 blk driver (EVENT_IDX, interrupts): pattern written, flushed, read back; served by the worker only', async () => {
    const img = path.join(dir, 'blk.img');
    fs.writeFileSync(img, Buffer.alloc(1 << 20));
    const { probe, mainCalls, counters, stats, exitCode } = await runProbe('probe.test=blk probe.blk.sectors=64 probe.blk.start=8 probe.blk.chunk=8 probe.blk.seed=0x77', img);
    const line = probe.lines.find((l) => l.test === 'blk');
    expect(exitCode).toBe(0);
    expect(line?.fields.ok).toBe('1');
    expect(mainCalls).toBe(0);
    expect(counters!.sessions).toBeGreaterThanOrEqual(1);
    expect(counters!.wakeups).toBeGreaterThan(0); // notified through the queue's ioeventfd, in the worker
    expect(stats.writes).toBeGreaterThan(0);
    expect(stats.reads).toBeGreaterThan(0);
    expect(stats.errors).toBe(0);
    const data = fs.readFileSync(img);
    expect(data.subarray(8 * 512, 72 * 512).some((b) => b !== 0)).toBe(true);
    expect(data.subarray(0, 8 * 512).every((b) => b === 0)).toBe(true);
  }, 90_000);

  it('ring-3 polled blkbench (write, then read with verification): every request served by the worker', async () => {
    const img = path.join(dir, 'bench.img');
    fs.writeFileSync(img, Buffer.alloc(4 << 20));
    const w = await runProbe('probe.test=blkbench probe.blk.mode=write probe.blk.req=4096 probe.blk.bytes=2097152 probe.blk.depth=8 probe.blk.verify=1 probe.blk.seed=0x99', img);
    const wl = w.probe.lines.find((l) => l.test === 'blkbench');
    expect(wl?.fields.ok, w.out).toBe('1');
    expect(w.exitCode).toBe(0);
    expect(w.mainCalls).toBe(0);
    expect(w.stats.writes).toBe(512);
    const r = await runProbe('probe.test=blkbench probe.blk.mode=read probe.blk.req=4096 probe.blk.bytes=2097152 probe.blk.depth=8 probe.blk.verify=1 probe.blk.seed=0x99', img);
    const rl = r.probe.lines.find((l) => l.test === 'blkbench');
    expect(rl?.fields.ok, r.out).toBe('1');
    expect(r.exitCode).toBe(0);
    expect(r.mainCalls).toBe(0);
    expect(r.stats.reads).toBe(512);
  }, 90_000);
});
