import { describe, it, expect, afterAll } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseCli } from './args.js';

const BIN = fileURLToPath(new URL('../dist/bin.js', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'kvmkit-cli-ctl-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const children: ChildProcess[] = [];
afterAll(() => { for (const c of children) c.kill('SIGKILL'); });

// A ring-3 guest that counts forever in RAX... and keeps a counter in memory at 0x9000 (so state moves).
const COUNTER = Uint8Array.from([0x48, 0xff, 0x04, 0x25, 0x00, 0x90, 0x00, 0x00, 0xeb, 0xf6]); // inc qword [0x9000]; jmp
writeFileSync(join(dir, 'counter.bin'), COUNTER);
const FLAT = ['--memory', '32', '--plugin', `boot-flat:${JSON.stringify({ image: join(dir, 'counter.bin'), ring: 3 })}`];

function ctl(...args: string[]) {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: dir, encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, out: r.stdout, err: r.stderr, json: (() => { try { return JSON.parse(r.stdout) as Record<string, unknown>; } catch { return undefined; } })() };
}

/** Starts `kvmkit run|restore …` and resolves once its control socket answers. */
async function vm(args: string[], sock: string, waitFor = 'VM running'): Promise<{ child: ChildProcess; exit: Promise<number | null>; err: () => string }> {
  const child = spawn(process.execPath, [BIN, ...args, '--control', sock, '--log-level', 'info'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let err = '';
  child.stderr!.on('data', (b: Buffer) => { err += b.toString(); });
  const exit = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  const t0 = Date.now();
  const incoming = args.includes('--incoming');
  while (!(err.includes(waitFor) && (incoming || existsSync(sock))) && Date.now() - t0 < 30_000) await new Promise((r) => setTimeout(r, 50));
  return { child, exit, err: () => err };
}

describe('control command parsing', () => {
  it('parses snapshot, migrate, status and restore, with usage errors', () => {
    expect(parseCli(['snapshot', 'web', 's.snap', '--diff', '--then', 'stop'])).toMatchObject({ command: 'snapshot', target: 'web', path: 's.snap', diff: true, then: 'stop' });
    expect(parseCli(['migrate', 'web', '127.0.0.1:4444', '--downtime-ms', '20'])).toMatchObject({ command: 'migrate', target: 'web', path: '127.0.0.1:4444', downtimeMs: 20 });
    expect(parseCli(['status', 'web'])).toMatchObject({ command: 'status', target: 'web' });
    expect(parseCli(['restore', 's.snap', '--lazy', '--memory', '64'])).toMatchObject({ command: 'run', restore: 's.snap', lazy: true, memory: 64 });
    expect(() => parseCli(['snapshot', 'web'])).toThrow(/expected VM PATH/);
    expect(() => parseCli(['status', 'web', '--diff'])).toThrow(/--diff goes with snapshot/);
    expect(() => parseCli(['run', '--lazy'])).toThrow(/--lazy goes with --restore/);
    expect(() => parseCli(['run', '--restore', 'a', '--incoming', 'b'])).toThrow(/exclude each other/);
  });

  it('a VM that is not running: exit 1 with KVMKIT_ERR_CONTROL_CONNECT', () => {
    const r = ctl('status', join(dir, 'nobody.sock'));
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/KVMKIT_ERR_CONTROL_CONNECT/);
  });
});

describe.skipIf(!existsSync('/dev/kvm'))('kvmkit snapshot / restore / migrate against running VMs', () => {
  it('snapshots a running VM (full, then diff and stop) and restores it lazily in a new process', async () => {
    const sock = join(dir, 'a.sock');
    const a = await vm(['run', ...FLAT], sock);
    expect(ctl('status', sock).json).toMatchObject({ state: 'running', memoryMiB: 32, strategies: { snapshot: ['diff', 'full'], migration: ['precopy'] } });
    const full = ctl('snapshot', sock, join(dir, 's1.snap'));
    expect(full.code, full.err).toBe(0);
    expect(full.json).toMatchObject({ kind: 'full', pages: 8192 });
    const diff = ctl('snapshot', sock, join(dir, 's2.snap'), '--diff', '--then', 'stop');
    expect(diff.code, diff.err).toBe(0);
    expect(diff.json).toMatchObject({ kind: 'diff', parent: 's1.snap' });
    expect((diff.json!.pages as number)).toBeGreaterThan(0); // the guest's counter page at least
    expect(await a.exit).toBe(0);

    const sockB = join(dir, 'b.sock');
    const b = await vm(['restore', join(dir, 's2.snap'), '--lazy', ...FLAT], sockB);
    expect(b.err()).toMatch(/snapshot restored/);
    expect(ctl('status', sockB).json).toMatchObject({ state: 'running' });
    expect(ctl('stop', sockB).json).toMatchObject({ state: 'stopped' });
    expect(await b.exit).toBe(0);
  });

  it('live-migrates a running VM to a `kvmkit run --incoming` process', async () => {
    const src = join(dir, 'src.sock');
    const dst = join(dir, 'dst.sock');
    const inc = join(dir, 'incoming.sock');
    const s = await vm(['run', ...FLAT], src);
    const d = await vm(['run', '--incoming', inc, ...FLAT], dst, 'listening for a migration');
    const r = ctl('migrate', src, inc);
    expect(r.code, r.err).toBe(0);
    expect(r.json).toMatchObject({ rounds: expect.any(Number), downtimeMs: expect.any(Number) });
    expect(await s.exit).toBe(0);
    const t0 = Date.now();
    while (!existsSync(dst) && Date.now() - t0 < 20_000) await new Promise((res) => setTimeout(res, 50));
    expect(ctl('status', dst).json).toMatchObject({ state: 'running' });
    expect(ctl('stop', dst).json).toMatchObject({ state: 'stopped' });
    expect(await d.exit).toBe(0);
  });
});
