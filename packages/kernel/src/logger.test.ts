import { describe, it, expect } from 'vitest';
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { createLogger, silentLogger } from './logger.js';

/** Lines a logger wrote to a file (its fd). */
function capture(fn: (fd: number) => void): Array<Record<string, unknown>> {
  const dir = mkdtempSync(join(tmpdir(), 'kvmkit-log-'));
  const path = join(dir, 'log');
  const fd = openSync(path, 'w');
  try {
    fn(fd);
  } finally {
    closeSync(fd);
  }
  const text = readFileSync(path, 'utf8');
  rmSync(dir, { recursive: true, force: true });
  return text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe('createLogger (lazy pino facade)', () => {
  it('does not load pino while nothing is logged at an enabled level', () => {
    const req = createRequire(import.meta.url);
    const id = req.resolve('pino');
    // First test of the file: nothing here has logged yet.
    expect(req.cache[id]).toBeUndefined();
    const log = silentLogger();
    log.info('x');
    log.child({ a: 1 }).error('y');
    expect(log.level).toBe('silent');
    expect(req.cache[id]).toBeUndefined();
    const w = createLogger({ level: 'error', pretty: false });
    w.warn('not written');
    expect(req.cache[id]).toBeUndefined();
  });
  it('writes pino JSON lines at and above its level, with child bindings', () => {
    const lines = capture((fd) => {
      const log = createLogger({ fd, level: 'info', pretty: false });
      log.debug('dropped');
      log.info({ a: 1 }, 'hello');
      const c = log.child({ plugin: 'serial' });
      c.warn('from child');
      c.trace('dropped too');
      log.error(new Error('boom'), 'failed');
    });
    expect(lines.map((l) => [l.level, l.msg])).toEqual([[30, 'hello'], [40, 'from child'], [50, 'failed']]);
    expect(lines[0]).toMatchObject({ a: 1 });
    expect(typeof lines[0]!.time).toBe('number');
    expect(lines[0]).not.toHaveProperty('pid');
    expect(lines[1]).toMatchObject({ plugin: 'serial' });
    expect((lines[2]!.err as { message: string }).message).toBe('boom');
  });

  it('level get/set, isLevelEnabled and child levels behave like pino', () => {
    const lines = capture((fd) => {
      const log = createLogger({ fd, level: 'warn', pretty: false });
      expect(log.level).toBe('warn');
      expect(log.isLevelEnabled('info')).toBe(false);
      expect(log.isLevelEnabled('error')).toBe(true);
      const early = log.child({ c: 1 }); // level fixed at creation: warn
      const verbose = log.child({ c: 2 }, { level: 'debug' });
      log.level = 'info';
      expect(log.level).toBe('info');
      expect(log.isLevelEnabled('info')).toBe(true);
      log.info('root info');
      early.info('dropped: the child kept warn');
      early.warn('child warn');
      verbose.debug('child debug');
      expect(() => { log.level = 'nope' as 'info'; }).toThrow(/unknown level/);
    });
    expect(lines.map((l) => l.msg)).toEqual(['root info', 'child warn', 'child debug']);
  });

  it('an unknown level throws at creation, as pino does', () => {
    expect(() => createLogger({ level: 'loud' as 'info', pretty: false })).toThrow(/level/);
  });

});
