/**
 * The probe guest's virtio-mmio block driver (probe.test=blk) against kvmkit's virtio-blk plugin and,
 * when installed, QEMU microvm's virtio-blk-device. The guest writes a pattern, flushes, reads it back;
 * the HOST then checks the exact bytes in the raw image file.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import virtioBlk from '@kvmkit/plugin-virtio-blk';
import { probeElfPath, runQemuProbe, findExecutable } from '@kvmkit/testkit';
import { hasKvm, runProbeOnKvmkit } from './helpers.js';

const MiB = 1 << 20;
const qemu = hasKvm ? findExecutable('qemu-system-x86_64') : null;
if (hasKvm && !qemu) console.warn('[kvmkit e2e] qemu-system-x86_64 not installed: the QEMU microvm virtio-blk probe test is skipped');

let elf = '';
let dir = '';
beforeAll(() => {
  if (hasKvm) elf = probeElfPath();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmkit-probe-blk-'));
});
afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function image(name: string, size = MiB): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, Buffer.alloc(size));
  return p;
}

/** The probe's pattern: 8-byte word i (0..63) of sector s = seed << 32 | (s & 0xffffff) << 8 | i. */
function expectedSector(seed: bigint, s: number): Buffer {
  const b = Buffer.alloc(512);
  for (let i = 0; i < 64; i++) b.writeBigUInt64LE((seed << 32n) | (BigInt(s & 0xffffff) << 8n) | BigInt(i), i * 8);
  return b;
}

/** Checks the image: sectors [start, start+n) hold the pattern, everything else is still zero. */
function checkImage(file: string, seed: bigint, start: number, n: number): void {
  const img = fs.readFileSync(file);
  for (let s = start; s < start + n; s++) {
    const got = img.subarray(s * 512, (s + 1) * 512);
    expect(got.equals(expectedSector(seed, s)), `sector ${s}`).toBe(true);
  }
  const zero = (a: number, b: number) => img.subarray(a, b).every((x) => x === 0);
  expect(zero(0, start * 512), 'bytes before the written range').toBe(true);
  expect(zero((start + n) * 512, img.length), 'bytes after the written range').toBe(true);
}

async function probeKvmkit(cmdline: string, disk: { path: string; readOnly?: boolean; syncIo?: boolean | undefined }) {
  // syncIo picks one of the two main-thread paths (ioThread false); without it the default I/O thread serves.
  const blkDisk = virtioBlk({ path: disk.path, readOnly: disk.readOnly ?? false, ...(disk.syncIo === undefined ? {} : { syncIo: disk.syncIo, ioThread: false }) });
  const run = await runProbeOnKvmkit({ name: 'probe-blk', cmdline, devices: [blkDisk], kernel: elf });
  return { ...run, blk: run.line('blk'), dev: run.line('blk_dev'), bench: run.line('blkbench') };
}

describe.skipIf(!hasKvm)('probe virtio-blk driver on kvmkit', () => {
  it('writes a pattern, flushes, reads it back; the host sees the exact bytes in the image', async () => {
    const file = image('rw.img');
    const seed = 0x1234abcdn, start = 40, n = 24;
    const { out, r, blk, dev } = await probeKvmkit(`probe.test=blk probe.blk.sectors=${n} probe.blk.start=${start} probe.blk.seed=0x${seed.toString(16)} probe.blk.chunk=8`, { path: file });
    expect(r, out).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(dev?.fields.addr, out).toBe('0xd0000000');
    expect(Number(dev?.fields.capacity)).toBe(MiB / 512);
    expect(blk?.fields).toMatchObject({ sectors: String(n), written: String(n), read: String(n), ok: '1', flush: '0' });
    expect(Number(blk?.fields.cycles_per_req)).toBeGreaterThan(0);
    console.log(`[probe-virtio] kvmkit: ${out.split(/\r?\n/).find((l) => l.startsWith('PROBE blk '))}`);
    checkImage(file, seed, start, n);
  }, 60_000);

  it('flush: FLUSH is offered and completes OK after single-sector writes at the last sectors; a range past the capacity is refused by the guest', async () => {
    const file = image('flush.img');
    const { out, r, blk, dev } = await probeKvmkit('probe.test=blk probe.blk.sectors=2 probe.blk.start=2047 probe.blk.chunk=1', { path: file });
    // 2047 + 2 > 2048 sectors: the guest refuses the range itself (its capacity check).
    expect(r.exitCode, out).toBe(1);
    expect(out).toMatch(/PROBE error blk_range/);
    expect(dev?.fields.capacity).toBe('2048');
    expect(blk).toBeUndefined();
    const ok = await probeKvmkit('probe.test=blk probe.blk.sectors=2 probe.blk.start=2046 probe.blk.chunk=1 probe.blk.seed=7', { path: file });
    expect(ok.r.exitCode, ok.out).toBe(0);
    expect(BigInt(ok.dev?.fields.features ?? '0') & (1n << 9n)).toBe(1n << 9n);  // VIRTIO_BLK_F_FLUSH offered
    expect(ok.blk?.fields.flush).toBe('0');
    expect(Number(ok.blk?.fields.flush_cycles)).toBeGreaterThan(0);
    checkImage(file, 7n, 2046, 2);
  }, 60_000);

  it('read-only disk: the write comes back IOERR, the read works, the image is untouched', async () => {
    const file = image('ro.img');
    const { out, r, blk, dev } = await probeKvmkit('probe.test=blk probe.blk.ro=1 probe.blk.start=5', { path: file, readOnly: true });
    expect(r, out).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(BigInt(dev?.fields.features ?? '0') & (1n << 5n)).toBe(1n << 5n);  // VIRTIO_BLK_F_RO offered
    expect(blk?.fields).toMatchObject({ ro: '1', dev_ro: '1', write_status: '1', read_status: '0', ok: '1' });
    expect(fs.readFileSync(file).every((x) => x === 0)).toBe(true);
  }, 60_000);

  it('ro expectation fails on a writable disk (the write succeeds, the probe exits 1)', async () => {
    const file = image('ro-mismatch.img');
    const { r, blk } = await probeKvmkit('probe.test=blk probe.blk.ro=1', { path: file });
    expect(blk?.fields).toMatchObject({ dev_ro: '0', write_status: '0', ok: '0' });
    expect(r.exitCode).toBe(1);
  }, 60_000);
});

/** An image holding the probe pattern in every sector. */
function patternImage(name: string, seed: bigint, size = MiB): string {
  const p = path.join(dir, name);
  const b = Buffer.alloc(size);
  for (let s = 0; s < size / 512; s++) expectedSector(seed, s).copy(b, s * 512);
  fs.writeFileSync(p, b);
  return p;
}

describe.skipIf(!hasKvm)('probe blkbench (ring-3 polled throughput driver) on kvmkit: correctness', () => {
  // Every request path of the device: the I/O thread (default), and on the main thread synchronous (syncIo) and
  // the libuv threadpool.
  it.each([
    ['I/O thread', undefined],
    ['main thread, synchronous I/O', true],
    ['main thread, threadpool I/O', false],
  ])('write, %s: depth 8 of 4 KiB with indirect descriptors, wrapping the disk; the host sees the pattern in every sector from start', async (_what, syncIo) => {
    const file = image(`bench-w-${syncIo}.img`);
    const seed = 0x600dn, start = 8;
    // 1 MiB disk = 2048 sectors; span from sector 8 = 2040 sectors; 384 requests of 8 sectors wrap once.
    const { out, r, bench, dev } = await probeKvmkit(
      `probe.test=blkbench probe.blk.mode=write probe.blk.req=4096 probe.blk.bytes=${384 * 4096} probe.blk.depth=8 probe.blk.start=${start} probe.blk.verify=1 probe.blk.seed=0x${seed.toString(16)}`,
      { path: file, syncIo },
    );
    expect(r, out).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(dev?.fields).toMatchObject({ indirect: '1', queue_num: '128' });
    expect(bench?.fields, out).toMatchObject({ mode: 'write', req: '4096', depth: '8', bytes: String(384 * 4096), requests: '384', span_sectors: '2040', verify: '1', bad_words: '0', ok: '1' });
    expect(Number(bench?.fields.cycles)).toBeGreaterThan(0);
    expect(Number(bench?.fields.tsc_khz)).toBeGreaterThan(0);
    checkImage(file, seed, start, 2040);
  }, 60_000);

  it.each([
    ['I/O thread', undefined],
    ['main thread, synchronous I/O', true],
    ['main thread, threadpool I/O', false],
  ])('read, %s: depth 16 of 64 KiB; the guest checks every word against the pattern the host wrote', async (_what, syncIo) => {
    const seed = 0xfeedn;
    const file = patternImage(`bench-r-${syncIo}.img`, seed);
    const { out, r, bench } = await probeKvmkit(
      `probe.test=blkbench probe.blk.mode=read probe.blk.req=65536 probe.blk.bytes=${3 * MiB} probe.blk.depth=16 probe.blk.verify=1 probe.blk.seed=0x${seed.toString(16)}`,
      { path: file, syncIo },
    );
    expect(r, out).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(bench?.fields, out).toMatchObject({ mode: 'read', req: '65536', depth: '16', requests: '48', span_sectors: '2048', bad_words: '0', ok: '1' });
  }, 60_000);

  it('read verification fails on a corrupted sector (status 1, bad_words counted)', async () => {
    const seed = 0xfeedn;
    const file = patternImage('bench-corrupt.img', seed);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(16, 0x77), 0, 16, 1000 * 512 + 64); // two words of sector 1000
    fs.closeSync(fd);
    const { out, r, bench } = await probeKvmkit(`probe.test=blkbench probe.blk.mode=read probe.blk.req=4096 probe.blk.bytes=${MiB} probe.blk.depth=4 probe.blk.verify=1 probe.blk.seed=0x${seed.toString(16)}`, { path: file });
    expect(bench?.fields, out).toMatchObject({ bad_words: '2', ok: '0', requests: '256' });
    expect(r.exitCode).toBe(1);
  }, 60_000);

  it('depth is clamped to the queue size; bad parameters and a write to a read-only disk are refused', async () => {
    const file = image('bench-misc.img');
    const deep = await probeKvmkit(`probe.test=blkbench probe.blk.mode=read probe.blk.req=512 probe.blk.bytes=${512 * 300} probe.blk.depth=1000`, { path: file });
    expect(deep.r.exitCode, deep.out).toBe(0);
    expect(deep.bench?.fields).toMatchObject({ depth: '128', requests: '300', ok: '1' });
    const badReq = await probeKvmkit('probe.test=blkbench probe.blk.req=1000', { path: file });
    expect(badReq.out).toContain('PROBE error blk_bench_req');
    expect(badReq.r.exitCode).toBe(1);
    const badMode = await probeKvmkit('probe.test=blkbench probe.blk.mode=trim', { path: file });
    expect(badMode.out).toContain('PROBE error blkbench_mode=trim');
    expect(badMode.r.exitCode).toBe(2);
    const ro = await probeKvmkit('probe.test=blkbench probe.blk.mode=write probe.blk.bytes=4096', { path: file, readOnly: true });
    expect(ro.out).toContain('PROBE error blk_bench_read_only');
    expect(ro.r.exitCode).toBe(1);
    expect(fs.readFileSync(file).every((x) => x === 0)).toBe(true);
  }, 60_000);
});

describe.skipIf(!hasKvm)('probe virtio-mmio cmdline validation on kvmkit', () => {
  it.each([
    ['an address in RAM', 'virtio_mmio.device=4K@0x100000:5', 'bad_virtio_mmio_device_param'],
    ['a window past 4 GiB', 'virtio_mmio.device=4K@0xfffff800:5', 'bad_virtio_mmio_device_param'],
    ['a missing irq', 'virtio_mmio.device=4K@0xd0000000', 'bad_virtio_mmio_device_param'],
    ['no entry at all', '', 'no_virtio_mmio_device_param'],
  ])('refuses %s before touching it', async (_what, param, err) => {
    // No disk plugin: the only virtio_mmio.device entry is the one given here.
    const { out, r } = await runProbeOnKvmkit({ name: 'probe-blk-bad', cmdline: `probe.test=blk ${param}`.trim(), kernel: elf });
    expect(out).toContain(`PROBE error blk_${err}`);
    expect(r.exitCode).toBe(1);
  }, 30_000);
});

describe.skipIf(!hasKvm || !qemu)('probe virtio-blk driver on QEMU microvm', () => {
  it('same probe on virtio-blk-device: pattern in the image file', async () => {
    const file = image('qemu.img');
    const seed = 0xbeefn, start = 8, n = 24;
    const res = await runQemuProbe({
      test: 'blk', params: { 'blk.sectors': n, 'blk.start': start, 'blk.seed': `0x${seed.toString(16)}`, 'blk.chunk': 8 },
      // microvm's virtio-mmio transports are legacy unless force-legacy is off; the probe drives v2 only.
      extraArgs: ['-global', 'virtio-mmio.force-legacy=false', '-drive', `file=${file},format=raw,if=none,id=d0`, '-device', 'virtio-blk-device,drive=d0'],
      timeoutMs: 30_000,
    });
    const blk = res.probe.lines.find((l) => l.test === 'blk');
    expect(res.exitStatus, res.output).toBe(0);
    expect(blk?.fields).toMatchObject({ written: String(n), read: String(n), ok: '1', flush: '0' });
    console.log(`[probe-virtio] qemu: ${res.output.split(/\r?\n/).find((l) => l.startsWith('PROBE blk '))}`);
    checkImage(file, seed, start, n);
  }, 60_000);

  it('blkbench write (verify) on virtio-blk-device: the host sees the pattern in every sector', async () => {
    const file = image('qemu-bench.img');
    const seed = 0x600dn;
    const res = await runQemuProbe({
      test: 'blkbench', params: { 'blk.mode': 'write', 'blk.req': 65536, 'blk.bytes': 2 * MiB, 'blk.depth': 8, 'blk.verify': 1, 'blk.seed': `0x${seed.toString(16)}` },
      extraArgs: ['-global', 'virtio-mmio.force-legacy=false', '-drive', `file=${file},format=raw,if=none,id=d0`, '-device', 'virtio-blk-device,drive=d0'],
      timeoutMs: 30_000,
    });
    const bench = res.probe.lines.find((l) => l.test === 'blkbench');
    expect(res.exitStatus, res.output).toBe(0);
    expect(bench?.fields).toMatchObject({ mode: 'write', requests: '32', depth: '8', ok: '1' });
    checkImage(file, seed, 0, 2048);
  }, 60_000);

  it('read-only drive (readonly=on): the write comes back IOERR, the image is untouched', async () => {
    const file = image('qemu-ro.img');
    const res = await runQemuProbe({
      test: 'blk', params: { 'blk.ro': 1, 'blk.start': 3 },
      extraArgs: ['-global', 'virtio-mmio.force-legacy=false', '-drive', `file=${file},format=raw,if=none,id=d0,readonly=on`, '-device', 'virtio-blk-device,drive=d0'],
      timeoutMs: 30_000,
    });
    const blk = res.probe.lines.find((l) => l.test === 'blk');
    expect(res.exitStatus, res.output).toBe(0);
    expect(blk?.fields).toMatchObject({ ro: '1', dev_ro: '1', write_status: '1', read_status: '0', ok: '1' });
    expect(fs.readFileSync(file).every((x) => x === 0)).toBe(true);
  }, 60_000);
});
