/**
 * The probe guest's virtio-rng driver (probe.test=rng, ring-3 polling) against kvmkit's virtio-rng plugin and,
 * when installed, QEMU microvm's virtio-rng-device. The guest checks every used element (id, 0 < len ≤ buffer)
 * and that the bytes look random (≥ 200 distinct values per 4 KiB, no run of 16 equal bytes).
 */
import { describe, it, expect, beforeAll } from 'vitest';
import type { Plugin } from '@kvmkit/kernel';
import { VIRTIO_ID, VirtioDevice, useVirtioMmio } from '@kvmkit/virtio';
import virtioRng from '@kvmkit/plugin-virtio-rng';
import { probeElfPath, runQemuProbe, findExecutable } from '@kvmkit/testkit';
import { hasKvm, runProbeOnKvmkit } from './helpers.js';

const qemu = hasKvm ? findExecutable('qemu-system-x86_64') : null;
if (hasKvm && !qemu) console.warn('[kvmkit e2e] qemu-system-x86_64 not installed: the QEMU microvm virtio-rng probe test is skipped');

let elf = '';
beforeAll(() => {
  if (hasKvm) elf = probeElfPath();
});

async function probeKvmkit(cmdline: string, devices: Plugin[]) {
  const run = await runProbeOnKvmkit({ name: 'probe-rng', cmdline, devices, kernel: elf });
  return { ...run, rng: run.line('rng'), dev: run.line('rng_dev') };
}

describe.skipIf(!hasKvm)('probe virtio-rng driver on kvmkit', () => {
  it('reads 16 KiB in 256-byte requests; every request valid, data random', async () => {
    const { out, r, rng, dev } = await probeKvmkit('probe.test=rng probe.rng.bytes=16384 probe.rng.chunk=256', [virtioRng()]);
    expect(r, out).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(dev?.fields.addr).toBe('0xd0000000');
    expect(rng?.fields).toMatchObject({ bytes: '16384', chunk: '256', requests: '64', ok: '1' });
    expect(Number(rng?.fields.distinct)).toBeGreaterThanOrEqual(200);
    expect(Number(rng?.fields.max_run)).toBeLessThan(16);
    expect(Number(rng?.fields.cycles_per_req)).toBeGreaterThan(0);
    console.log(`[probe-rng] kvmkit: ${rng?.raw}`);
  }, 60_000);

  it('short device answers are gathered: maxRequest 100 makes 4096 bytes take ≥ 41 requests', async () => {
    const { out, r, rng } = await probeKvmkit('probe.test=rng probe.rng.bytes=4096 probe.rng.chunk=1024', [virtioRng({ maxRequest: 100 })]);
    expect(r.exitCode, out).toBe(0);
    expect(Number(rng?.fields.requests)).toBeGreaterThanOrEqual(41);
    expect(rng?.fields.ok).toBe('1');
  }, 60_000);

  it('a source of zeros fails the randomness check (status 1)', async () => {
    const { out, r, rng } = await probeKvmkit('probe.test=rng', [virtioRng({ source: (b: Uint8Array) => b.fill(0) })]);
    expect(r.exitCode, out).toBe(1);
    expect(rng?.fields).toMatchObject({ ok: '0', distinct: '1', zero_run: '4096' });
  }, 60_000);

  it('no virtio device at all: the probe reports rng_no_virtio_mmio_device_param', async () => {
    const { out, r } = await probeKvmkit('probe.test=rng', []);
    expect(out).toContain('PROBE error rng_no_virtio_mmio_device_param');
    expect(r.exitCode).toBe(1);
  }, 60_000);
});

describe.skipIf(!hasKvm || !qemu)('probe virtio-rng driver on QEMU microvm', () => {
  it('same probe on virtio-rng-device', async () => {
    const res = await runQemuProbe({
      test: 'rng', params: { 'rng.bytes': 16384, 'rng.chunk': 256 },
      extraArgs: ['-global', 'virtio-mmio.force-legacy=false', '-device', 'virtio-rng-device'],
      timeoutMs: 30_000,
    });
    const rng = res.probe.lines.find((l) => l.test === 'rng');
    expect(res.exitStatus, res.output).toBe(0);
    expect(rng?.fields).toMatchObject({ bytes: '16384', ok: '1' });
    expect(Number(rng?.fields.requests)).toBeGreaterThanOrEqual(64);
    console.log(`[probe-rng] qemu: ${rng?.raw}`);
  }, 60_000);
});

/** virtio-rng that completes its second request wrongly. */
class EvilRng extends VirtioDevice {
  readonly deviceId = VIRTIO_ID.RNG;
  readonly name = 'evil-rng';
  readonly queueSizes = [8];
  readonly features = 0n;
  private n = 0;
  constructor(private readonly evil: 'zero' | 'long' | 'id') {
    super();
  }
  processQueue(q: number): void {
    const vq = this.ctx.queue(q);
    for (let c = vq.pop(); c; c = vq.pop()) {
      const len = c.write(this.ctx.memory, Uint8Array.from({ length: c.writableLength }, () => (Math.random() * 256) | 0));
      if (this.n++ === 0) vq.pushUsed(c, len);
      else if (this.evil === 'zero') vq.pushUsed(c, 0);
      else if (this.evil === 'long') vq.pushUsed(c, c.writableLength + 1);
      else vq.pushUsed((c.head + 1) % 8, len);
    }
    this.ctx.signalUsed(q);
  }
}

describe.skipIf(!hasKvm)('probe virtio-rng driver against a misbehaving device (kvmkit)', () => {
  it.each([
    ['zero', 'rng_used_len_zero'],
    ['long', 'rng_used_len'],
    ['id', 'rng_used_id'],
  ] as const)('%s → PROBE error %s', async (evil, err) => {
    const plugin: Plugin = { name: 'evil-rng', version: '0.1.0', kernel: '^0.1.0', provides: ['virtio-device+'], options: {}, apply: (m) => void useVirtioMmio(m, 'evil-rng', () => new EvilRng(evil)) };
    const { out, r } = await probeKvmkit('probe.test=rng', [plugin]);
    expect(out).toContain(`PROBE error ${err} `);
    expect(r.exitCode, out).toBe(1);
  }, 30_000);
});
