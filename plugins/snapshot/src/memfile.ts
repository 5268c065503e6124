import { createHash } from 'node:crypto';
import { openSync, closeSync, writeSync, readSync, fsyncSync, ftruncateSync, renameSync, unlinkSync, fstatSync } from 'node:fs';
import type { MemoryRegion } from '@kvmkit/kernel';
import { PAGE, tmpName, type MemoryRange, pageList } from './format.js';
import { ioErr, snapErr } from './errors.js';
import type { Progress } from './progress.js';

const BLOCK = 64 * 1024;
const CHUNK = 8 * 1024 * 1024;
const ZERO = Buffer.alloc(BLOCK);

function isZero(b: Uint8Array): boolean {
  return ZERO.subarray(0, b.byteLength).equals(b);
}

function writeAll(fd: number, b: Uint8Array, pos: number): void {
  let off = 0;
  while (off < b.byteLength) off += writeSync(fd, b, off, b.byteLength - off, pos + off);
}

export interface WrittenMemory {
  size: number;
  sha256: string;
  ranges: MemoryRange[];
}

/**
 * Writes every region whole (full snapshot) to a temp file, then fsyncs and renames it to `path`. Zero 64 KiB
 * blocks are left as holes (the file is sparse), so an idle guest's memory costs little disk and time.
 */
export function writeFullMemory(path: string, regions: readonly MemoryRegion[], progress?: Progress): WrittenMemory {
  const tmp = tmpName(path);
  const total = regions.reduce((s, r) => s + r.size, 0);
  const hash = createHash('sha256');
  const ranges: MemoryRange[] = [];
  let fd = -1;
  try {
    fd = openSync(tmp, 'w', 0o600);
    ftruncateSync(fd, total);
    let pos = 0;
    for (const r of regions) {
      ranges.push({ gpa: r.gpa, size: r.size, offset: pos });
      for (let off = 0; off < r.size; off += CHUNK) {
        const chunk = r.bytes.subarray(off, Math.min(r.size, off + CHUNK));
        hash.update(chunk);
        let run = -1;
        for (let b = 0; b < chunk.byteLength; b += BLOCK) {
          const blk = chunk.subarray(b, b + BLOCK);
          if (isZero(blk)) {
            if (run >= 0) writeAll(fd, chunk.subarray(run, b), pos + off + run);
            run = -1;
          } else if (run < 0) run = b;
        }
        if (run >= 0) writeAll(fd, chunk.subarray(run), pos + off + run);
        progress?.add(chunk.byteLength);
      }
      pos += r.size;
    }
    fsyncSync(fd);
    closeSync(fd);
    fd = -1;
    renameSync(tmp, path);
    return { size: total, sha256: hash.digest('hex'), ranges };
  } catch (e) {
    if (fd >= 0) closeSync(fd);
    try { unlinkSync(tmp); } catch { /* gone */ }
    throw ioErr(e, 'writing snapshot memory', path);
  }
}

/** Pages set in a KVM dirty bitmap (1 bit per page, LSB first). */
export function bitmapPages(bm: Uint8Array, pages: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < bm.length; i++) {
    const b = bm[i]!;
    if (b === 0) continue;
    for (let k = 0; k < 8; k++) if (b & (1 << k)) {
      const p = i * 8 + k;
      if (p < pages) out.push(p);
    }
  }
  return out;
}

/** Writes the listed pages of each region (diff snapshot), consecutive pages in one write. */
export function writeDiffMemory(path: string, regions: readonly MemoryRegion[], pagesPerRegion: number[][], progress?: Progress): WrittenMemory {
  const tmp = tmpName(path);
  const hash = createHash('sha256');
  const ranges: MemoryRange[] = [];
  let fd = -1;
  try {
    fd = openSync(tmp, 'w', 0o600);
    let pos = 0;
    regions.forEach((r, ri) => {
      const pages = pagesPerRegion[ri] ?? [];
      ranges.push({ gpa: r.gpa, size: r.size, offset: pos, pages: new Uint8Array(Uint32Array.from(pages).buffer) });
      let i = 0;
      while (i < pages.length) {
        let j = i + 1;
        while (j < pages.length && pages[j] === pages[j - 1]! + 1 && j - i < 256) j++;
        const data = r.bytes.subarray(pages[i]! * PAGE, (pages[j - 1]! + 1) * PAGE);
        hash.update(data);
        writeAll(fd, data, pos);
        pos += data.byteLength;
        progress?.add(data.byteLength);
        i = j;
      }
    });
    fsyncSync(fd);
    closeSync(fd);
    fd = -1;
    renameSync(tmp, path);
    return { size: pos, sha256: hash.digest('hex'), ranges };
  } catch (e) {
    if (fd >= 0) closeSync(fd);
    try { unlinkSync(tmp); } catch { /* gone */ }
    throw ioErr(e, 'writing snapshot memory', path);
  }
}

function openChecked(path: string, size: number): number {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    throw ioErr(e, 'snapshot memory file', path);
  }
  const actual = fstatSync(fd).size;
  if (actual !== size) {
    closeSync(fd);
    throw snapErr('KVMKIT_ERR_SNAPSHOT_TRUNCATED', `memory file ${path} has ${actual} bytes, the state file says ${size}`, { path, size: actual, expected: size });
  }
  return fd;
}

/** Checks only the size of a memory file (lazy restore). */
export function checkMemorySize(path: string, size: number): void {
  closeSync(openChecked(path, size));
}

function readAll(fd: number, into: Uint8Array, pos: number, path: string): void {
  let off = 0;
  while (off < into.byteLength) {
    const n = readSync(fd, into, off, into.byteLength - off, pos + off);
    if (n <= 0) throw snapErr('KVMKIT_ERR_SNAPSHOT_TRUNCATED', `memory file ${path}: short read at ${pos + off}`, { path });
    off += n;
  }
}

/**
 * Reads a full snapshot's memory file into `target(rangeIndex)` views, verifying size and sha256.
 * `target` returns the host bytes of the range (a region view, or a buffer).
 */
export function readFullMemory(path: string, ranges: readonly MemoryRange[], size: number, sha256: string, target: (i: number) => Uint8Array, progress?: Progress): void {
  const fd = openChecked(path, size);
  try {
    const hash = createHash('sha256');
    ranges.forEach((r, i) => {
      const dst = target(i);
      for (let off = 0; off < r.size; off += CHUNK) {
        const view = dst.subarray(off, Math.min(r.size, off + CHUNK));
        readAll(fd, view, r.offset + off, path);
        hash.update(view);
        progress?.add(view.byteLength);
      }
    });
    const got = hash.digest('hex');
    if (got !== sha256) throw snapErr('KVMKIT_ERR_SNAPSHOT_CHECKSUM', `memory file ${path}: sha256 mismatch (file corrupt)`, { path, expected: sha256, actual: got });
  } finally {
    closeSync(fd);
  }
}

/** Reads a diff's memory file (verified: size, sha256) and applies its pages to `target(rangeIndex)`. */
export function applyDiffMemory(path: string, ranges: readonly MemoryRange[], size: number, sha256: string, target: (i: number) => Uint8Array, progress?: Progress): number {
  const fd = openChecked(path, size);
  try {
    const data = Buffer.allocUnsafe(size);
    readAll(fd, data, 0, path);
    const got = createHash('sha256').update(data).digest('hex');
    if (got !== sha256) throw snapErr('KVMKIT_ERR_SNAPSHOT_CHECKSUM', `memory file ${path}: sha256 mismatch (file corrupt)`, { path, expected: sha256, actual: got });
    let pages = 0;
    ranges.forEach((r, i) => {
      const dst = target(i);
      const idx = pageList(r);
      idx.forEach((p, k) => dst.set(data.subarray(r.offset + k * PAGE, r.offset + (k + 1) * PAGE), p * PAGE));
      pages += idx.length;
    });
    progress?.add(size);
    return pages;
  } finally {
    closeSync(fd);
  }
}
