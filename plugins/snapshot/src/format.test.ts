import { afterAll, describe, it, expect } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { encodeStateFile, readStateFile, HEADER_SIZE, type SnapshotBody } from './format.js';
import { bitmapPages } from './memfile.js';
import { Progress } from './progress.js';

const body = (): SnapshotBody => ({
  kind: 'diff', created: 'now', parent: { path: 'p.snap', sha256: 'ab'.repeat(32) },
  config: { name: 'x', memory: 1, cpus: 1, plugins: [] },
  host: { arch: 'x64', cpuVendor: 'GenuineIntel', cpuFamily: 6, cpuModel: 85, kernelRelease: '6' },
  memory: { file: 'x.mem', size: 8192, sha256: '00', hash: 'sha256-tree-64k', pageSize: 4096, ranges: [{ gpa: 0n, size: 1 << 20, offset: 0, pages: new Uint8Array(new Uint32Array([3, 7]).buffer) }] },
  sections: [['kernel', { version: 1, data: { big: 5n, bytes: new Uint8Array([1, 2]) } }]],
});

describe('state file format', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvmkit-fmt-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  it('round-trips a body (bigint, Uint8Array) and identifies it by the body sha256', () => {
    const { bytes, sha256 } = encodeStateFile(body());
    expect(bytes.subarray(0, 8).toString('latin1')).toBe('KVMKSNAP');
    const p = join(dir, 'a.snap');
    writeFileSync(p, bytes);
    const s = readStateFile(p);
    expect(s.sha256).toBe(sha256);
    expect(s.memoryPath).toBe(join(dir, 'x.mem'));
    expect((s.body.sections[0]![1].data as { big: bigint }).big).toBe(5n);
  });
  it('rejects bodies that are well-formed JSON but wrong (page index out of range, memory size, path traversal)', () => {
    const bad = (f: (b: SnapshotBody) => void) => {
      const b = body();
      f(b);
      const p = join(dir, 'b.snap');
      writeFileSync(p, encodeStateFile(b).bytes);
      return () => readStateFile(p);
    };
    expect(bad((b) => { b.memory.ranges[0]!.pages = new Uint8Array(new Uint32Array([1 << 20]).buffer); })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_FORMAT' }));
    expect(bad((b) => { b.memory.size = 4096; })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_FORMAT' }));
    expect(bad((b) => { b.memory.file = '../etc/passwd'; })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_FORMAT' }));
    expect(bad((b) => { b.sections = []; })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_FORMAT' }));
  });
  it('detects trailing garbage as a length mismatch', () => {
    const p = join(dir, 'c.snap');
    writeFileSync(p, Buffer.concat([encodeStateFile(body()).bytes, Buffer.from('x')]));
    expect(() => readStateFile(p)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_TRUNCATED' }));
    expect(readFileSync(p).length).toBeGreaterThan(HEADER_SIZE);
  });
});

describe('helpers', () => {
  it('bitmapPages lists set bits LSB first and ignores bits past the range', () => {
    expect(bitmapPages(new Uint8Array([0b1000_0101, 0, 0xff]), 18)).toEqual([0, 2, 7, 16, 17]);
  });
  it('Progress reports bytes, rate and ETA', () => {
    const seen: number[] = [];
    const p = new Progress('t', 100, (i) => { seen.push(i.bytes); expect(i.total).toBe(100); expect(i.rate).toBeGreaterThanOrEqual(0); }, false);
    p.add(10);
    p.add(90);
    expect(seen).toContain(100);
  });
});
