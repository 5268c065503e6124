import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import snapshotPlugin from '@kvmkit/plugin-snapshot';
import migratePrecopy, { migrate } from '@kvmkit/plugin-migrate-precopy';
// @ts-expect-error plain ESM fixture without types
import { workloadImage, verify, readProgress } from '../../plugins/snapshot/fixtures/workload.mjs';
import { hasKvm, exitPort, spawnJsonChild } from './helpers.js';

const DEST = fileURLToPath(new URL('../../plugins/migrate-precopy/fixtures/dest.mjs', import.meta.url));
const AREA = 1 << 20;
const MEM = 64;
const log = silentLogger();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Starts the destination process; resolves once it listens, with its address and its final result. */
async function startDest(args: Record<string, unknown>): Promise<{ address: any; result: Promise<any>; proc: ChildProcess }> {
  const c = spawnJsonChild(DEST, { memory: MEM, areaBytes: AREA, ...args });
  const result = c.done.then((d) => ({ ...d.last, exitCode: d.exitCode, signal: d.signal, stderr: d.stderr }));
  const hello = await c.next((o) => o.listening !== undefined).catch(async () => { throw new Error(`destination exited before listening: ${JSON.stringify(await result)}`); });
  if (hello.listening === undefined) throw new Error(`destination failed before listening: ${JSON.stringify(hello)}`);
  return { address: hello.listening, result, proc: c.proc };
}

async function source(name: string) {
  const m = new Machine({ config: { name, memory: MEM, cpus: 1 }, plugins: [exitPort(), snapshotPlugin(), migratePrecopy(), bootFlat({ image: workloadImage({ areaBytes: AREA }), ring: 3, arg: 2 ** 40 })], log });
  await m.start();
  await sleep(100);
  return m;
}

/** The source runs on, unchanged: running, its memory matches the host recomputation, and the counter moves. */
async function expectSourceIntact(m: Machine) {
  expect(m.state).toBe('running');
  await m.pause();
  const a = verify(m.memory!, AREA);
  expect(a.ok).toBe(true);
  await m.resume();
  await sleep(50);
  await m.pause();
  const b = verify(m.memory!, AREA);
  expect(b.ok).toBe(true);
  expect(b.count).toBeGreaterThan(a.count);
  await m.resume();
}

describe.skipIf(!hasKvm)('pre-copy live migration between two processes', () => {
  let dir: string;
  beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'kvmkit-mig-')); });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it.each(['unix', 'tcp'] as const)('migrates a guest that keeps writing memory (%s); the destination continues with every checksum right', async (kind) => {
    const m = await source(`mig-${kind}`);
    const d = await startDest({ listen: kind === 'unix' ? join(dir, 'mig.sock') : { host: '127.0.0.1', port: 0 }, runMs: 150 });
    if (kind === 'unix') expect(existsSync(join(dir, 'mig.sock'))).toBe(true);
    const rounds: number[] = [];
    const report = await migrate(m, { to: d.address, then: 'pause', onProgress: (p) => rounds.push(p.dirty) });
    const at = verify(m.memory!, AREA);
    expect(at.ok).toBe(true);
    await m.stop();
    const r = await d.result;
    expect(r.error).toBeUndefined();
    expect(r.start, JSON.stringify(r)).toBeDefined();
    expect(r.start.count).toBeGreaterThanOrEqual(at.count);
    expect(r.verify.ok).toBe(true);
    expect(r.verify.count).toBeGreaterThan(at.count);
    expect(report.rounds).toBeGreaterThanOrEqual(1);
    expect(report.pagesSent).toBeGreaterThan(AREA / 4096 / 2);
    expect(report.zeroSkipped).toBeGreaterThan(((MEM << 20) / 4096) / 2);
    expect(report.downtimeMs).toBeGreaterThan(0);
    expect(report.downtimeMs).toBeLessThan(report.totalMs);
    expect(r.report.pages).toBe(report.pagesSent);
    if (kind === 'unix') expect(existsSync(join(dir, 'mig.sock'))).toBe(false);
    console.log(`migration (${kind}, ${MEM} MiB, busy): ${JSON.stringify({ ...report, totalMs: +report.totalMs.toFixed(1), downtimeMs: +report.downtimeMs.toFixed(1) })}`);
  });

  it('forces several live rounds with a zero downtime budget and stops at maxRounds', async () => {
    const m = await source('mig-rounds');
    const d = await startDest({ listen: join(dir, 'r.sock'), runMs: 50 });
    const report = await migrate(m, { to: d.address, downtimeMs: 0, maxRounds: 4 });
    // With a zero budget only a round that found no dirty page ends early (a busy guest that the loaded host did
    // not schedule during a round); otherwise the round limit ends it.
    expect(report.rounds).toBeGreaterThanOrEqual(1);
    expect(report.rounds).toBeLessThanOrEqual(4);
    expect(m.state).toBe('stopped');
    const r = await d.result;
    expect(r.verify.ok).toBe(true);
    expect(r.report.rounds).toBe(report.rounds - 1);
  });

  it('a stream cut at every phase leaves the source running as before; the destination cleans up', async () => {
    const m = await source('mig-cut');
    for (const fault of ['hello', 'round0', 'round', 'final', 'commit']) {
      const sock = join(dir, `cut-${fault}.sock`);
      const d = await startDest({ listen: sock });
      await expect(migrate(m, { to: d.address, fault, downtimeMs: fault === 'round' ? 0 : 50, maxRounds: 3 })).rejects.toMatchObject({ code: expect.stringMatching(/^KVMKIT_ERR_MIGRATE_/) });
      const r = await d.result;
      expect(r.error?.code, fault).toMatch(/^KVMKIT_ERR_MIGRATE_/);
      expect(r.exitCode).toBe(0);
      expect(existsSync(sock)).toBe(false);
      await expectSourceIntact(m);
    }
    // …and it still migrates afterwards.
    const d = await startDest({ listen: join(dir, 'after.sock') });
    await migrate(m, { to: d.address });
    expect((await d.result).verify.ok).toBe(true);
  });

  it('a destination killed (SIGKILL) at any phase leaves the source running as before', async () => {
    const m = await source('mig-crash');
    for (const crashOn of ['HELLO', 'PAGES', 'STATE', 'END', 'COMMIT']) {
      const d = await startDest({ listen: join(dir, `crash-${crashOn}.sock`), crashOn });
      await expect(migrate(m, { to: d.address, timeoutMs: 5000 })).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_STREAM' });
      expect((await d.result).signal).toBe('SIGKILL');
      await expectSourceIntact(m);
    }
    await m.stop();
  });

  it('refuses a destination of another shape with a coded error; the source keeps running', async () => {
    const m = await source('mig-shape');
    const d = await startDest({ listen: join(dir, 'shape.sock'), memory: 32 });
    await expect(migrate(m, { to: d.address })).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_REFUSED', message: expect.stringMatching(/MiB/) });
    expect((await d.result).error.code).toBe('KVMKIT_ERR_MIGRATE_REFUSED');
    await expectSourceIntact(m);
    await expect(migrate(m, { to: '10.1.2.3:4000' })).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_ADDRESS' });
    await m.stop();
  });
});
