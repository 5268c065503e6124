import { openSync, closeSync, writeSync, fsyncSync, ftruncateSync, renameSync, unlinkSync } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { encodeStateFile, writeFileAtomic, tmpName, fsyncDir, PAGE, MEMORY_HASH, type SnapshotBody, type MemoryRange } from './format.js';
import { readFullMemory, applyDiffMemory, TreeHash } from './memfile.js';
import { loadChain } from './restore.js';
import { ioErr } from './errors.js';

export interface MergeResult {
  path: string;
  memoryPath: string;
  sha256: string;
  chain: number;
  memoryBytes: number;
}

/**
 * Merges a diff chain (given by its tip) into one full snapshot at `out`: the tip's state, the base memory
 * with every diff's pages applied in order. Every input file is verified (sha256) on the way.
 */
export function mergeSnapshots(tip: string, out: string): MergeResult {
  const chain = loadChain(tip);
  const last = chain[chain.length - 1]!;
  const base = chain[0]!;
  const outPath = resolve(out);
  const ranges = base.body.memory.ranges;
  // Materialize memory range by range in host buffers (a chain's memory fits in host RAM as the guest did).
  const bufs = ranges.map((r) => new Uint8Array(r.size));
  readFullMemory(base.memoryPath, ranges, base.body.memory.size, base.body.memory.sha256, base.body.memory.hash ?? 'sha256', (i) => bufs[i]!);
  for (const d of chain.slice(1)) applyDiffMemory(d.memoryPath, d.body.memory.ranges, d.body.memory.size, d.body.memory.sha256, d.body.memory.hash ?? 'sha256', (i) => bufs[i]!);
  const memName = `${basename(outPath)}.${randomBytes(6).toString('hex')}.mem`;
  const memPath = resolve(dirname(outPath), memName);
  const tmp = tmpName(memPath);
  const hash = new TreeHash();
  const outRanges: MemoryRange[] = [];
  let pos = 0;
  let fd = -1;
  try {
    fd = openSync(tmp, 'w', 0o600);
    const total = ranges.reduce((s, r) => s + r.size, 0);
    ftruncateSync(fd, total);
    ranges.forEach((r, i) => {
      outRanges.push({ gpa: r.gpa, size: r.size, offset: pos });
      const b = bufs[i]!;
      hash.update(b);
      let off = 0;
      while (off < b.byteLength) off += writeSync(fd, b, off, b.byteLength - off, pos + off);
      pos += r.size;
    });
    fsyncSync(fd);
    closeSync(fd);
    fd = -1;
    renameSync(tmp, memPath);
    fsyncDir(dirname(memPath));
  } catch (e) {
    if (fd >= 0) closeSync(fd);
    try { unlinkSync(tmp); } catch { /* gone */ }
    throw ioErr(e, 'writing merged snapshot memory', memPath);
  }
  const body: SnapshotBody = {
    kind: 'full',
    created: new Date().toISOString(),
    config: last.body.config,
    host: last.body.host,
    memory: { file: memName, size: pos, sha256: hash.digest(), hash: MEMORY_HASH, pageSize: PAGE, ranges: outRanges },
    sections: last.body.sections,
  };
  const { bytes, sha256 } = encodeStateFile(body);
  writeFileAtomic(outPath, bytes);
  return { path: outPath, memoryPath: memPath, sha256, chain: chain.length, memoryBytes: pos };
}

