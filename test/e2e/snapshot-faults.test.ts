import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, rmSync, mkdirSync, copyFileSync, readFileSync, writeFileSync, truncateSync, statSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, basename } from 'node:path';
import { Machine, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import counter from 'kvmkit-plugin-example-counter';
import snapshotPlugin, { snapshot, restore, readStateFile, encodeStateFile, HEADER_SIZE } from '@kvmkit/plugin-snapshot';
// @ts-expect-error plain ESM fixture without types
import { workloadImage } from '../../plugins/snapshot/fixtures/workload.mjs';
import { hasKvm, exitPort } from './helpers.js';

const log = silentLogger();
const MEM = 16;

describe.skipIf(!hasKvm)('snapshot faults give coded errors', () => {
  let dir: string;
  let good: string;
  let n = 0;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'kvmkit-snapf-'));
    const m = new Machine({ config: { name: 'f', memory: MEM, cpus: 1 }, plugins: [exitPort(), counter({ mmio: false }), snapshotPlugin(), bootFlat({ image: workloadImage({ areaBytes: 65536 }), ring: 3, arg: 2 ** 40 })], log });
    await m.start();
    await new Promise((r) => setTimeout(r, 50));
    good = (await snapshot(m, { path: join(dir, 'good.snap'), then: 'stop' })).path;
    await m.waitForStop();
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** A private copy (state + memory file) of the good snapshot. */
  function copy(): { state: string; mem: string } {
    const d = join(dir, `case${n++}`);
    mkdirSync(d);
    const s = readStateFile(good);
    const state = join(d, 'good.snap');
    copyFileSync(good, state);
    copyFileSync(s.memoryPath, join(d, basename(s.memoryPath)));
    return { state, mem: join(d, basename(s.memoryPath)) };
  }
  const plugins = (): Plugin[] => [exitPort(), counter({ mmio: false }), snapshotPlugin()];
  const tryRestore = async (path: string, mode: 'eager' | 'lazy' = 'eager', memory = MEM, cpus = 1, ps = plugins(), verify = false) => {
    const { machine } = await restore({ path, mode, verify, config: { name: 'r', memory, cpus }, plugins: ps, log });
    await machine.stop();
    return machine;
  };

  it('the untouched copy restores (eager and lazy)', async () => {
    const c = copy();
    await expect(tryRestore(c.state)).resolves.toBeDefined();
    await expect(tryRestore(c.state, 'lazy')).resolves.toBeDefined();
    await expect(tryRestore(c.state, 'lazy', MEM, 1, plugins(), true)).resolves.toBeDefined();
  });
  it('missing state file → KVMKIT_ERR_SNAPSHOT_NOT_FOUND', async () => {
    await expect(tryRestore(join(dir, 'nope.snap'))).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_NOT_FOUND' });
  });
  it('bad magic → KVMKIT_ERR_SNAPSHOT_MAGIC', async () => {
    const c = copy();
    const b = readFileSync(c.state);
    b.write('NOTASNAP', 0, 'latin1');
    writeFileSync(c.state, b);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_MAGIC' });
  });
  it('unknown format version → KVMKIT_ERR_SNAPSHOT_VERSION', async () => {
    const c = copy();
    const b = readFileSync(c.state);
    b.writeUInt32LE(99, 8);
    writeFileSync(c.state, b);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_VERSION', message: expect.stringMatching(/99/) });
  });
  it('truncated state file → KVMKIT_ERR_SNAPSHOT_TRUNCATED (body and header)', async () => {
    const c = copy();
    truncateSync(c.state, statSync(c.state).size - 10);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_TRUNCATED' });
    truncateSync(c.state, 20);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_TRUNCATED' });
  });
  it('one flipped byte in the state body → KVMKIT_ERR_SNAPSHOT_CHECKSUM', async () => {
    const c = copy();
    const b = readFileSync(c.state);
    b[HEADER_SIZE + 100]! ^= 1;
    writeFileSync(c.state, b);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM' });
  });
  it('memory file: flipped byte → CHECKSUM (eager, lazy+verify; plain lazy checks the size only), truncated → TRUNCATED, missing → NOT_FOUND', async () => {
    const c = copy();
    const fd = readFileSync(c.mem);
    fd[0x400000 + 5]! ^= 0xff;
    writeFileSync(c.mem, fd);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM', message: expect.stringMatching(/memory file/) });
    await expect(tryRestore(c.state, 'lazy')).resolves.toBeDefined();
    await expect(tryRestore(c.state, 'lazy', MEM, 1, plugins(), true)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM' });
    truncateSync(c.mem, 4096);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_TRUNCATED' });
    await expect(tryRestore(c.state, 'lazy')).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_TRUNCATED' });
    unlinkSync(c.mem);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_NOT_FOUND' });
  });
  it('another machine shape → KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH naming memory, cpus or the missing plugin', async () => {
    const c = copy();
    await expect(tryRestore(c.state, 'eager', 32)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH', details: { what: 'memory' } });
    await expect(tryRestore(c.state, 'eager', MEM, 2)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH', details: { what: 'cpus' } });
    await expect(tryRestore(c.state, 'eager', MEM, 1, [exitPort()])).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH', message: expect.stringMatching(/counter/) });
  });
  it('another host → KVMKIT_ERR_SNAPSHOT_HOST_MISMATCH naming the field', async () => {
    const c = copy();
    const s = readStateFile(c.state);
    writeFileSync(c.state, encodeStateFile({ ...s.body, host: { ...s.body.host, cpuVendor: 'CyrixInstead' } }).bytes);
    await expect(tryRestore(c.state)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_HOST_MISMATCH', details: { what: 'cpuVendor' } });
  });
  it('diff whose parent was replaced → KVMKIT_ERR_SNAPSHOT_PARENT; diff without a base → NO_BASE; unknown strategy → STRATEGY', async () => {
    const m = new Machine({ config: { name: 'p', memory: MEM, cpus: 1 }, plugins: [exitPort(), snapshotPlugin(), bootFlat({ image: workloadImage({ areaBytes: 65536 }), ring: 3, arg: 2 ** 40 })], log });
    await m.start();
    await expect(snapshot(m, { strategy: 'diff', path: join(dir, 'x.snap') })).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_NO_BASE' });
    await expect(snapshot(m, { strategy: 'postcopy', path: join(dir, 'x.snap') })).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_STRATEGY' });
    expect(m.state).toBe('running');
    const p = join(dir, 'parent.snap');
    await snapshot(m, { path: p });
    const d = await snapshot(m, { strategy: 'diff', path: join(dir, 'child.snap') });
    await snapshot(m, { path: p, track: false }); // overwrite the parent with another full snapshot
    await m.stop();
    await expect(tryRestore(d.path, 'eager', MEM, 1, [exitPort()])).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_PARENT' });
    unlinkSync(p);
    await expect(tryRestore(d.path, 'eager', MEM, 1, [exitPort()])).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_PARENT' });
  });
});
