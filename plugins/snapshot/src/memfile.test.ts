import { afterAll, describe, it, expect } from 'vitest';
import { createHash, randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, readFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { MemoryRegion } from '@kvmkit/kernel';
import { encodeStateFile, readStateFile, FORMAT_VERSION, type SnapshotBody } from './format.js';
import { TreeHash, memoryHasher, writeFullMemory, writeDiffMemory, readFullMemory, readFullMemoryAsync, applyDiffMemory, verifyMemoryFile } from './memfile.js';

const LEAF = 64 * 1024;
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

/** The tree hash computed the slow, obvious way. */
function reference(data: Uint8Array): string {
  const root = createHash('sha256');
  for (let off = 0; off < data.byteLength; off += LEAF) root.update(sha(data.subarray(off, Math.min(data.byteLength, off + LEAF))));
  return root.digest('hex');
}

function region(size: number, gpa = 0n): MemoryRegion {
  return { gpa, size, bytes: new Uint8Array(size), hva: 0n, slot: 0, name: 'ram' };
}

describe('TreeHash (format 2 memory checksum)', () => {
  it('equals sha256 over per-64 KiB-leaf sha256 digests, zero leaves included, however the input is split', () => {
    const d = new Uint8Array(5 * LEAF + 12345);
    randomFillSync(d.subarray(LEAF, 2 * LEAF));
    randomFillSync(d.subarray(4 * LEAF + 100, 4 * LEAF + 200));
    d[5 * LEAF + 1] = 7; // short last leaf
    const want = reference(d);
    expect(new TreeHash().update(d).digest()).toBe(want);
    const split = new TreeHash();
    for (const cut of [[0, 1], [1, 70_000], [70_000, 3 * LEAF], [3 * LEAF, d.byteLength]]) split.update(d.subarray(cut[0], cut[1]));
    expect(split.digest()).toBe(want);
    expect(want).not.toBe(createHash('sha256').update(d).digest('hex'));
  });
  it('a single flipped bit in an otherwise zero leaf changes the digest', () => {
    const d = new Uint8Array(4 * LEAF);
    const a = new TreeHash().update(d).digest();
    d[3 * LEAF + 9] = 0x10;
    expect(new TreeHash().update(d).digest()).not.toBe(a);
    expect(new TreeHash().update(d).digest()).toBe(reference(d));
  });
  it("memoryHasher('sha256') is the flat sha256 of format 1", () => {
    const d = randomFillSync(new Uint8Array(100_000));
    const h = memoryHasher('sha256');
    h.update(d);
    expect(h.digest()).toBe(createHash('sha256').update(d).digest('hex'));
  });
});

describe('memory files', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvmkit-memfile-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('full: writes non-zero runs, leaves zero blocks as holes, reads back verified; a flipped byte is CHECKSUM', async () => {
    const a = region(4 << 20);
    const b = region(1 << 20, 0x100000000n);
    randomFillSync(a.bytes.subarray(LEAF, 3 * LEAF));
    a.bytes[(4 << 20) - 1] = 1;
    randomFillSync(b.bytes.subarray(0, 4096));
    const path = join(dir, 'f.mem');
    const w = await writeFullMemory(path, [a, b]);
    expect(w).toMatchObject({ size: 5 << 20, hash: 'sha256-tree-64k', ranges: [{ gpa: 0n, size: 4 << 20, offset: 0 }, { gpa: 0x100000000n, size: 1 << 20, offset: 4 << 20 }] });
    const file = readFileSync(path);
    expect(file.subarray(0, 4 << 20).equals(a.bytes)).toBe(true);
    expect(file.subarray(4 << 20).equals(b.bytes)).toBe(true);
    expect(w.sha256).toBe(reference(file));
    expect(statSync(path).blocks * 512).toBeLessThan(1 << 20); // sparse
    const back = [new Uint8Array(4 << 20), new Uint8Array(1 << 20)];
    readFullMemory(path, w.ranges, w.size, w.sha256, w.hash, (i) => back[i]!);
    expect(Buffer.from(back[0]!).equals(a.bytes)).toBe(true);
    expect(Buffer.from(back[1]!).equals(b.bytes)).toBe(true);
    // zero-block maps: range a has data in blocks 1, 2 and 63 (its last), range b in block 0
    expect(w.ranges[0]!.zero).toEqual(Uint8Array.from([0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]));
    expect(w.ranges[1]!.zero).toEqual(Uint8Array.from([0xfe, 0xff]));
    // the async reader (direct requested on unaligned buffers: falls back), into targets with stale bytes in a zero block
    for (const direct of [false, true]) {
      const t = [new Uint8Array((4 << 20) + 1).subarray(1), new Uint8Array(1 << 20)];
      t[0]![5 * LEAF + 3] = 9;
      t[1]![(1 << 20) - 1] = 9;
      await readFullMemoryAsync(path, w.ranges, w.size, w.sha256, w.hash, (i) => t[i]!, direct);
      expect(Buffer.from(t[0]!).equals(a.bytes)).toBe(true);
      expect(Buffer.from(t[1]!).equals(b.bytes)).toBe(true);
    }
    // lazy + verify's reader: the whole file (holes included) through scratch buffers
    const scratch = Array.from({ length: 3 }, () => new Uint8Array((8 << 20) + 1).subarray(1));
    await verifyMemoryFile(path, w.size, w.sha256, w.hash, scratch, true);
    const holed = readFileSync(path);
    holed[6 * LEAF]! = 1; // inside a hole of range a
    writeFileSync(path, holed);
    await expect(verifyMemoryFile(path, w.size, w.sha256, w.hash, scratch, false)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM' });
    file[2 * LEAF + 5]! ^= 1;
    writeFileSync(path, file);
    expect(() => readFullMemory(path, w.ranges, w.size, w.sha256, w.hash, (i) => back[i]!)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM' }));
    await expect(readFullMemoryAsync(path, w.ranges, w.size, w.sha256, w.hash, (i) => back[i]!, false)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM' });
    writeFileSync(path, file.subarray(0, file.length - 4096));
    await expect(readFullMemoryAsync(path, w.ranges, w.size, w.sha256, w.hash, (i) => back[i]!, false)).rejects.toMatchObject({ code: 'KVMKIT_ERR_SNAPSHOT_TRUNCATED' });
  });

  it('an O_DIRECT write the kernel refuses (unaligned buffer) falls back to buffered writes', async () => {
    const size = 2 << 20;
    const bytes = new Uint8Array(size + 1).subarray(1); // never 512-byte aligned
    randomFillSync(bytes);
    const r: MemoryRegion = { gpa: 0n, size, bytes, hva: 0x7f0000000000n, slot: 0, name: 'ram' };
    const path = join(dir, 'u.mem');
    const w = await writeFullMemory(path, [r]);
    expect(readFileSync(path).equals(bytes)).toBe(true);
    expect(w.sha256).toBe(reference(bytes));
  });

  it('diff: pages round-trip with the tree checksum; a corrupt page is CHECKSUM', () => {
    const r = region(1 << 20);
    randomFillSync(r.bytes);
    const path = join(dir, 'd.mem');
    const w = writeDiffMemory(path, [r], [[1, 2, 3, 200]]);
    expect(w.size).toBe(4 * 4096);
    const dst = new Uint8Array(1 << 20);
    expect(applyDiffMemory(path, w.ranges, w.size, w.sha256, w.hash, () => dst)).toBe(4);
    expect(Buffer.from(dst.subarray(4096, 4 * 4096)).equals(r.bytes.subarray(4096, 4 * 4096))).toBe(true);
    expect(Buffer.from(dst.subarray(200 * 4096, 201 * 4096)).equals(r.bytes.subarray(200 * 4096, 201 * 4096))).toBe(true);
    const f = readFileSync(path);
    f[3 * 4096]! ^= 0x80;
    writeFileSync(path, f);
    expect(() => applyDiffMemory(path, w.ranges, w.size, w.sha256, w.hash, () => dst)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM' }));
  });

  it('format 1 files (flat sha256, no memory.hash) are still read and verified; a hash field out of place is FORMAT', () => {
    expect(FORMAT_VERSION).toBe(2);
    const mem = randomFillSync(new Uint8Array(1 << 20));
    writeFileSync(join(dir, 'v1.mem'), mem);
    const body = (hash?: 'sha256-tree-64k'): SnapshotBody => ({
      kind: 'full', created: 'then', config: { name: 'x', memory: 1, cpus: 1, plugins: [] },
      host: { arch: 'x64', cpuVendor: 'GenuineIntel', cpuFamily: 6, cpuModel: 85, kernelRelease: '6' },
      memory: { file: 'v1.mem', size: 1 << 20, sha256: createHash('sha256').update(mem).digest('hex'), ...(hash ? { hash } : {}), pageSize: 4096, ranges: [{ gpa: 0n, size: 1 << 20, offset: 0 }] },
      sections: [['kernel', { version: 1, data: {} }]],
    });
    const p = join(dir, 'v1.snap');
    writeFileSync(p, encodeStateFile(body(), 1).bytes);
    const s = readStateFile(p);
    expect(s.version).toBe(1);
    expect(s.body.memory.hash).toBe('sha256');
    const dst = new Uint8Array(1 << 20);
    readFullMemory(s.memoryPath, s.body.memory.ranges, s.body.memory.size, s.body.memory.sha256, s.body.memory.hash!, () => dst);
    expect(Buffer.from(dst).equals(mem)).toBe(true);
    // the same flat digest under format 2's tree algorithm does not verify
    expect(() => readFullMemory(s.memoryPath, s.body.memory.ranges, s.body.memory.size, s.body.memory.sha256, 'sha256-tree-64k', () => dst)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_CHECKSUM' }));
    writeFileSync(p, encodeStateFile(body('sha256-tree-64k'), 1).bytes);
    expect(() => readStateFile(p)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_FORMAT' }));
    writeFileSync(p, encodeStateFile(body(), 2).bytes);
    expect(() => readStateFile(p)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_FORMAT' }));
    writeFileSync(p, encodeStateFile(body('sha256-tree-64k'), 3).bytes);
    expect(() => readStateFile(p)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_SNAPSHOT_VERSION' }));
  });
});
