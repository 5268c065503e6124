import { describe, it, expect, afterAll } from 'vitest';
import { existsSync, statSync, mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import snapshotPlugin, { readStateFile } from '@kvmkit/plugin-snapshot';
import migratePrecopy, { receiveMigration } from '@kvmkit/plugin-migrate-precopy';
import { serveControl, connectControl, controlSocketPath } from './index.js';

const hasKvm = existsSync('/dev/kvm');
const log = silentLogger();
const dir = mkdtempSync(join(tmpdir(), 'kvmkit-ctl-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const spin = new Uint8Array([0xeb, 0xfe]);
const exitPort = (): Plugin => ({ name: 'test-exit', version: '0.1.0', apply() {} });

describe('controlSocketPath', () => {
  it('uses $XDG_RUNTIME_DIR/kvmkit, else /run/kvmkit, and refuses names that are not file names', () => {
    expect(controlSocketPath('vm1', { XDG_RUNTIME_DIR: '/run/user/1000' })).toBe('/run/user/1000/kvmkit/vm1.sock');
    expect(controlSocketPath('vm1', {})).toBe('/run/kvmkit/vm1.sock');
    expect(() => controlSocketPath('../x', {})).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_CONFIG' }));
  });
});

describe.skipIf(!hasKvm)('control channel on a running VM', () => {
  it('status, pause, resume, snapshot, errors, migrate; socket 0600, removed when the VM stops', async () => {
    const m = new Machine({ config: { name: 'ctl', memory: 16, cpus: 1 }, plugins: [exitPort(), snapshotPlugin(), migratePrecopy(), bootFlat({ image: spin })], log });
    await m.start();
    const path = join(dir, 'run', 'ctl.sock');
    const srv = await serveControl(m, { path });
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir, 'run')).mode & 0o777).toBe(0o700);
    await expect(serveControl(m, { path })).rejects.toMatchObject({ code: 'KVMKIT_ERR_CONTROL_IN_USE' });

    const c = await connectControl(path);
    const st = await c.status();
    expect(st).toMatchObject({ name: 'ctl', state: 'running', memoryMiB: 16, cpus: 1, pid: process.pid, strategies: { snapshot: ['diff', 'full'], migration: ['precopy'] } });
    expect(await c.pause()).toEqual({ state: 'paused' });
    expect(await c.resume()).toEqual({ state: 'running' });
    const snap = await c.snapshot({ path: join(dir, 'a.snap') });
    expect(snap).toMatchObject({ kind: 'full', memoryBytes: 16 << 20 });
    expect(readStateFile(join(dir, 'a.snap')).body.kind).toBe('full');
    expect((await c.snapshot({ strategy: 'diff', path: join(dir, 'b.snap') })).kind).toBe('diff');
    await expect(c.snapshot({ strategy: 'nope', path: join(dir, 'c.snap') })).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_STRATEGY' });
    await expect(c.call('format-disk')).rejects.toMatchObject({ code: 'KVMKIT_ERR_CONTROL_METHOD' });
    // two snapshots at once: the second is refused
    const [r1, r2] = await Promise.allSettled([c.snapshot({ path: join(dir, 'd.snap') }), c.snapshot({ path: join(dir, 'e.snap') })]);
    expect(r1.status).toBe('fulfilled');
    expect(r2).toMatchObject({ status: 'rejected', reason: { code: 'KVMKIT_ERR_CONTROL_BUSY' } });

    // garbage lines get a coded error and the connection stays usable
    const raw = createConnection(path);
    const answer = await new Promise<string>((res) => { raw.once('data', (d) => res(d.toString())); raw.write('{nope\n'); });
    expect(JSON.parse(answer).error.code).toBe('KVMKIT_ERR_CONTROL_REQUEST');
    raw.destroy();
    expect((await c.status()).state).toBe('running');

    // migrate through the control channel (destination in this process)
    const dest = receiveMigration({ listen: join(dir, 'mig.sock'), config: { name: 'ctl-dst', memory: 16, cpus: 1 }, plugins: [exitPort(), snapshotPlugin()], log });
    await new Promise((r) => setTimeout(r, 50));
    const rep = await c.migrate({ to: join(dir, 'mig.sock') });
    expect(rep).toMatchObject({ rounds: expect.any(Number), downtimeMs: expect.any(Number) });
    const { machine: d } = await dest;
    expect(d.state).toBe('running');
    await d.stop();
    await m.waitForStop();
    await new Promise((r) => setTimeout(r, 200));
    expect(existsSync(path)).toBe(false);
    await expect(connectControl(path)).rejects.toMatchObject({ code: 'KVMKIT_ERR_CONTROL_CONNECT' });
    await srv.close();
  });

  it('stop through the channel stops the VM; a stale socket file is replaced', async () => {
    const path = join(dir, 'stale.sock');
    const m1 = new Machine({ config: { name: 'c1', memory: 16, cpus: 1 }, plugins: [bootFlat({ image: spin })], log });
    await m1.start();
    const s1 = await serveControl(m1, { path });
    const c = await connectControl(path);
    expect(await c.stop()).toEqual({ state: 'stopped' });
    expect((await m1.waitForStop()).message).toMatch(/control socket/);
    await s1.close();
    // leave a stale socket file behind: a process listening on it is killed with SIGKILL
    const { spawn } = await import('node:child_process');
    const ghost = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => console.log('up'))`]);
    await new Promise((r) => ghost.stdout.once('data', r));
    ghost.kill('SIGKILL');
    await new Promise((r) => ghost.once('close', r));
    expect(existsSync(path)).toBe(true);
    const m2 = new Machine({ config: { name: 'c2', memory: 16, cpus: 1 }, plugins: [bootFlat({ image: spin })], log });
    await m2.start();
    const s2 = await serveControl(m2, { path });
    expect((await (await connectControl(path)).status()).name).toBe('c2');
    await m2.stop();
    await s2.close();
  });
});
