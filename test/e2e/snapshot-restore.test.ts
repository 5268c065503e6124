import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, rmSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import snapshotPlugin, { snapshot, mergeSnapshots, readStateFile } from '@kvmkit/plugin-snapshot';
// @ts-expect-error plain ESM fixture without types
import { workloadImage, verify, readProgress } from '../../plugins/snapshot/fixtures/workload.mjs';
import { hasKvm, exitPort, spawnJsonChild } from './helpers.js';

const CHILD = fileURLToPath(new URL('../../plugins/snapshot/fixtures/child.mjs', import.meta.url));
const AREA = 256 * 1024;
const MEM = 64;
const log = silentLogger();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Runs the fixture child with `args`; resolves with its last JSON line. */
export async function runChild(args: Record<string, unknown>, onLine?: (o: any, kill: () => void) => void): Promise<any> {
  const d = await spawnJsonChild(CHILD, args, { onLine }).done;
  return { ...d.last, exitCode: d.exitCode, signal: d.signal, stderr: d.stderr };
}

async function workloadMachine(name: string) {
  const m = new Machine({ config: { name, memory: MEM, cpus: 1 }, plugins: [exitPort(), snapshotPlugin(), bootFlat({ image: workloadImage({ areaBytes: AREA }), ring: 3, arg: 2 ** 40 })], log });
  await m.start();
  return m;
}

describe.skipIf(!hasKvm)('snapshot → restore in a new process', () => {
  let dir: string;
  beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'kvmkit-snap-')); });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it.each(['eager', 'lazy'] as const)('full snapshot, %s restore: the counter continues and the checksum matches the host recomputation', async (mode) => {
    const m = await workloadMachine(`full-${mode}`);
    await sleep(150);
    const path = join(dir, `full-${mode}.snap`);
    const res = await snapshot(m, { path, then: 'pause' });
    const at = verify(m.memory!, AREA);
    expect(at.ok).toBe(true);
    expect(at.count).toBeGreaterThan(0);
    expect(res).toMatchObject({ kind: 'full', memoryBytes: MEM << 20 });
    await m.stop();

    const r = await runChild({ op: 'restore', path, mode, memory: MEM, areaBytes: AREA, runMs: 150 });
    expect(r.error).toBeUndefined();
    // Right after restore the guest is where it was (it may have run a few iterations already).
    expect(r.start.count).toBeGreaterThanOrEqual(at.count);
    expect(r.verify.ok).toBe(true);
    expect(r.verify.count).toBeGreaterThan(at.count);
    expect(r.info).toMatchObject({ mode, chain: 1, verified: mode === 'eager' ? 'sha256' : 'size-only', bytesRead: mode === 'eager' ? MEM << 20 : 0 });
  });

  it('diff chain (full → diff → diff) restores, merges into a full snapshot, and a diff taken after restore chains on', async () => {
    const m = await workloadMachine('chain');
    await sleep(100);
    const base = await snapshot(m, { path: join(dir, 'c0.snap') });
    await sleep(100);
    const d1 = await snapshot(m, { strategy: 'diff', path: join(dir, 'c1.snap') });
    await sleep(100);
    const d2 = await snapshot(m, { strategy: 'diff', path: join(dir, 'c2.snap'), then: 'pause' });
    const at = verify(m.memory!, AREA);
    expect(at.ok).toBe(true);
    await m.stop();
    // A diff holds only what the guest dirtied: the workload area (64 pages) + the progress page.
    for (const d of [d1, d2]) {
      expect(d.kind).toBe('diff');
      expect(d.pages).toBeGreaterThan(1);
      expect(d.pages).toBeLessThanOrEqual(AREA / 4096 + 1);
    }
    expect(base.pages).toBe((MEM << 20) / 4096);
    expect(readStateFile(d2.path).body.parent).toMatchObject({ path: 'c1.snap', sha256: d1.sha256 });

    const r = await runChild({ op: 'restore', path: d2.path, mode: 'eager', memory: MEM, areaBytes: AREA, diffTo: join(dir, 'c3.snap') });
    expect(r.error).toBeUndefined();
    expect(r.info.chain).toBe(3);
    expect(r.start.count).toBeGreaterThanOrEqual(at.count);
    expect(r.verify.ok).toBe(true);
    expect(r.verify.count).toBeGreaterThan(at.count);
    // c3 was taken in the child on top of the restored c2.
    expect(r.diff.kind).toBe('diff');
    expect(r.diff.verify.ok).toBe(true);
    const r3 = await runChild({ op: 'restore', path: join(dir, 'c3.snap'), mode: 'lazy', memory: MEM, areaBytes: AREA });
    expect(r3.error).toBeUndefined();
    expect(r3.info.chain).toBe(4);
    expect(r3.verify.ok).toBe(true);
    expect(r3.start.count).toBeGreaterThanOrEqual(r.diff.verify.count);

    const merged = mergeSnapshots(join(dir, 'c3.snap'), join(dir, 'merged.snap'));
    expect(merged.chain).toBe(4);
    expect(readStateFile(merged.path).body.kind).toBe('full');
    const r4 = await runChild({ op: 'restore', path: merged.path, mode: 'lazy', memory: MEM, areaBytes: AREA });
    expect(r4.error).toBeUndefined();
    expect(r4.info.chain).toBe(1);
    expect(r4.verify.ok).toBe(true);
    expect(r4.start.count).toBeGreaterThanOrEqual(r.diff.verify.count);
  });

  it('kill -9 in the middle of a snapshot write leaves the previous snapshot intact and restorable', async () => {
    const path = join(dir, 'atomic.snap');
    const m = await workloadMachine('atomic');
    await sleep(100);
    const first = await snapshot(m, { path, then: 'pause' });
    const at = readProgress(m.memory!);
    await m.stop();
    let killedAt = -1;
    const r = await runChild({ op: 'save', path, memory: 256, areaBytes: AREA, fillMiB: 128, slow: true }, (o, kill) => {
      if (o.progress !== undefined && o.progress < o.total && killedAt < 0) {
        killedAt = o.progress;
        kill();
      }
    });
    expect(r.signal).toBe('SIGKILL');
    expect(killedAt).toBeGreaterThan(0);
    // The child left its temp memory file behind, and nothing else changed.
    expect(readdirSync(dir).some((f) => f.startsWith('atomic.snap.') && f.includes('.tmp-'))).toBe(true);
    expect(readStateFile(path).sha256).toBe(first.sha256);
    const back = await runChild({ op: 'restore', path, mode: 'eager', memory: MEM, areaBytes: AREA });
    expect(back.error).toBeUndefined();
    expect(back.start.count).toBeGreaterThanOrEqual(at.count);
    expect(back.verify.ok).toBe(true);
  });
});
