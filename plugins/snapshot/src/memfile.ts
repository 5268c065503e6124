import { createHash } from 'node:crypto';
import { openSync, closeSync, writeSync, readSync, fsyncSync, ftruncateSync, renameSync, unlinkSync, fstatSync, write as fsWrite, read as fsRead, constants as fsConstants } from 'node:fs';
import type { MemoryRegion } from '@kvmkit/kernel';
import { PAGE, tmpName, type MemoryRange, pageList, MEMORY_HASH, type MemoryHash } from './format.js';
import { ioErr, snapErr } from './errors.js';
import type { Progress } from './progress.js';

const BLOCK = 64 * 1024;
const CHUNK = 8 * 1024 * 1024;
const ZERO = Buffer.alloc(BLOCK);
/** Writes in flight at once (each up to CHUNK; the guest is paused, so they point straight into its RAM). */
const IN_FLIGHT = 4;

function isZero(b: Uint8Array): boolean {
  return ZERO.subarray(0, b.byteLength).equals(b);
}

function writeAll(fd: number, b: Uint8Array, pos: number): void {
  let off = 0;
  while (off < b.byteLength) off += writeSync(fd, b, off, b.byteLength - off, pos + off);
}


const LEAF = BLOCK;
const ZERO_LEAF = createHash('sha256').update(ZERO).digest();

/**
 * sha256 tree over 64 KiB leaves: sha256(sha256(leaf 0) ‖ sha256(leaf 1) ‖ …), the last leaf possibly shorter.
 * As collision-resistant as a flat sha256, but an all-zero leaf (a hole) costs a 64 KiB compare instead of
 * hashing it, so idle memory is nearly free to checksum.
 */
export class TreeHash {
  private readonly root = createHash('sha256');
  private readonly part = Buffer.allocUnsafe(LEAF);
  private partLen = 0;

  private leaf(b: Uint8Array): void {
    this.root.update(b.byteLength === LEAF && isZero(b) ? ZERO_LEAF : createHash('sha256').update(b).digest());
  }

  update(data: Uint8Array): this {
    let off = 0;
    if (this.partLen > 0) {
      const n = Math.min(LEAF - this.partLen, data.byteLength);
      this.part.set(data.subarray(0, n), this.partLen);
      this.partLen += n;
      off = n;
      if (this.partLen < LEAF) return this;
      this.leaf(this.part);
      this.partLen = 0;
    }
    for (; off + LEAF <= data.byteLength; off += LEAF) this.leaf(data.subarray(off, off + LEAF));
    if (off < data.byteLength) {
      this.part.set(data.subarray(off), 0);
      this.partLen = data.byteLength - off;
    }
    return this;
  }

  digest(): string {
    if (this.partLen > 0) this.leaf(this.part.subarray(0, this.partLen));
    this.partLen = 0;
    return this.root.digest('hex');
  }
}

export interface Hasher {
  update(data: Uint8Array): unknown;
  digest(): string;
}

/** A hasher for a memory file checksummed with `alg`. */
export function memoryHasher(alg: MemoryHash): Hasher {
  if (alg === 'sha256-tree-64k') return new TreeHash();
  const h = createHash('sha256');
  return { update: (d) => h.update(d), digest: () => h.digest('hex') };
}

export interface WrittenMemory {
  size: number;
  sha256: string;
  hash: MemoryHash;
  ranges: MemoryRange[];
}

/**
 * A memory-file writer: O_DIRECT when the file system takes it (guest RAM is page-aligned, so the kernel DMAs
 * straight from it, no page-cache copy: on this host ~10× faster than a buffered write from guest RAM), else
 * buffered. Writes run in libuv's pool, IN_FLIGHT at once, while the caller hashes the next chunk.
 */
class MemWriter {
  /** O_DIRECT fd, or -1 */
  private direct = -1;
  /** buffered fd (opened when O_DIRECT is refused, at open or per write), or -1 */
  private plain = -1;
  private readonly inflight: Array<Promise<void>> = [];
  private failure: unknown;

  /** `direct`: try O_DIRECT (the data to write is page-aligned host memory, i.e. mmap'd guest RAM). */
  constructor(private readonly tmp: string, size: number, direct: boolean) {
    if (direct && typeof fsConstants.O_DIRECT === 'number' && fsConstants.O_DIRECT > 0) {
      try {
        this.direct = openSync(tmp, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_TRUNC | fsConstants.O_DIRECT, 0o600);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
      }
    }
    if (this.direct < 0) this.plain = openSync(tmp, 'w', 0o600);
    ftruncateSync(this.direct >= 0 ? this.direct : this.plain, size);
  }

  /** Whether any write went through O_DIRECT's fd. */
  get usedDirect(): boolean {
    return this.direct >= 0;
  }

  private writeAt(b: Uint8Array, pos: number): Promise<void> {
    return new Promise<void>((res, rej) => {
      const step = (off: number): void => {
        if (off >= b.byteLength) return res();
        const useDirect = this.plain < 0;
        fsWrite(useDirect ? this.direct : this.plain, b, off, b.byteLength - off, pos + off, (e, n) => {
          if (!e) return step(off + n);
          if (e.code === 'EINVAL' && useDirect) {
            // O_DIRECT refused (alignment, file system): this and every later write go buffered.
            try { if (this.plain < 0) this.plain = openSync(this.tmp, 'r+'); } catch (e2) { return rej(e2); }
            return step(off);
          }
          rej(e);
        });
      };
      step(0);
    });
  }

  /** Queues a write of `b` (which must stay unchanged until finish()) at `pos`. */
  async write(b: Uint8Array, pos: number): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.inflight.length >= IN_FLIGHT) await this.inflight.shift();
    const p = this.writeAt(b, pos);
    p.catch((e) => { this.failure ??= e; });
    this.inflight.push(p);
  }

  /** Waits for every write, fsyncs and closes. */
  async finish(): Promise<void> {
    await Promise.all(this.inflight.splice(0));
    if (this.failure) throw this.failure;
    if (this.plain >= 0) fsyncSync(this.plain);
    if (this.direct >= 0) fsyncSync(this.direct);
    this.close();
  }

  close(): void {
    if (this.plain >= 0) closeSync(this.plain);
    if (this.direct >= 0) closeSync(this.direct);
    this.plain = this.direct = -1;
  }

  /** After a failure: let queued writes settle (they reference guest RAM) before the caller resumes it. */
  async settle(): Promise<void> {
    await Promise.allSettled(this.inflight.splice(0));
    this.close();
  }
}

/**
 * Writes every region whole (full snapshot) to a temp file, then fsyncs and renames it to `path`. Zero 64 KiB
 * blocks are left as holes (the file is sparse) and hashed as the precomputed zero leaf, so an idle guest's
 * memory costs little disk and time. Non-zero runs go straight from guest RAM to the file (O_DIRECT when
 * possible), overlapped with hashing the next chunk.
 */
export async function writeFullMemory(path: string, regions: readonly MemoryRegion[], progress?: Progress): Promise<WrittenMemory> {
  const tmp = tmpName(path);
  const total = regions.reduce((s, r) => s + r.size, 0);
  const hash = new TreeHash();
  const ranges: MemoryRange[] = [];
  let w: MemWriter | undefined;
  try {
    // O_DIRECT only from mmap'd (page-aligned) guest RAM; plain buffers (tests, tools) write buffered.
    w = new MemWriter(tmp, total, regions.every((r) => r.hva !== 0n && r.hva % 4096n === 0n));
    let pos = 0;
    for (const r of regions) {
      const zero = new Uint8Array(zeroMapBytes(r.size));
      ranges.push({ gpa: r.gpa, size: r.size, offset: pos, zero });
      for (let off = 0; off < r.size; off += CHUNK) {
        const chunk = r.bytes.subarray(off, Math.min(r.size, off + CHUNK));
        let run = -1;
        for (let b = 0; b < chunk.byteLength; b += BLOCK) {
          const blk = chunk.subarray(b, b + BLOCK);
          if (isZero(blk)) {
            const k = (off + b) / BLOCK;
            zero[k >>> 3]! |= 1 << (k & 7);
            if (run >= 0) await w.write(chunk.subarray(run, b), pos + off + run);
            run = -1;
          } else if (run < 0) run = b;
        }
        if (run >= 0) await w.write(chunk.subarray(run), pos + off + run);
        hash.update(chunk);
        progress?.add(chunk.byteLength);
      }
      pos += r.size;
    }
    await w.finish();
    renameSync(tmp, path);
    return { size: total, sha256: hash.digest(), hash: MEMORY_HASH, ranges };
  } catch (e) {
    await w?.settle();
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
  const hash = new TreeHash();
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
    return { size: pos, sha256: hash.digest(), hash: MEMORY_HASH, ranges };
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

/** Bytes of a range's zero-block map (1 bit per 64 KiB block, LSB first). */
export function zeroMapBytes(size: number): number {
  return Math.ceil(Math.ceil(size / BLOCK) / 8);
}

/** The blocks of `r` to read: runs [start, end) of byte offsets within the range, zero blocks left out. */
function dataRuns(r: MemoryRange, from: number, to: number): Array<[number, number]> {
  const z = r.zero;
  if (!z) return [[from, to]];
  const out: Array<[number, number]> = [];
  let run = -1;
  for (let off = from; off < to; off += BLOCK) {
    const k = off / BLOCK;
    if ((z[k >>> 3]! >>> (k & 7)) & 1) {
      if (run >= 0) out.push([run, off]);
      run = -1;
    } else if (run < 0) run = off;
  }
  if (run >= 0) out.push([run, to]);
  return out;
}

/** Zero blocks are not read: the target must hold zeros there (fresh RAM does; anything else is cleared). */
function clearZeroBlocks(r: MemoryRange, view: Uint8Array, from: number): void {
  const z = r.zero;
  if (!z) return;
  for (let b = 0; b < view.byteLength; b += BLOCK) {
    const k = (from + b) / BLOCK;
    if ((z[k >>> 3]! >>> (k & 7)) & 1) {
      const blk = view.subarray(b, b + BLOCK);
      if (!isZero(blk)) blk.fill(0);
    }
  }
}

function checkDigest(path: string, got: string, sha256: string): void {
  if (got !== sha256) throw snapErr('KVMKIT_ERR_SNAPSHOT_CHECKSUM', `memory file ${path}: sha256 mismatch (file corrupt)`, { path, expected: sha256, actual: got });
}

/**
 * Reads a full snapshot's memory file into `target(rangeIndex)` views, verifying size and checksum. Blocks
 * the state file lists as zero (format 2) are not read. `target` returns the host bytes of the range.
 */
export function readFullMemory(path: string, ranges: readonly MemoryRange[], size: number, sha256: string, alg: MemoryHash, target: (i: number) => Uint8Array, progress?: Progress): void {
  const fd = openChecked(path, size);
  try {
    const hash = memoryHasher(alg);
    ranges.forEach((r, i) => {
      const dst = target(i);
      for (let off = 0; off < r.size; off += CHUNK) {
        const end = Math.min(r.size, off + CHUNK);
        const view = dst.subarray(off, end);
        for (const [a, b] of dataRuns(r, off, end)) readAll(fd, dst.subarray(a, b), r.offset + a, path);
        clearZeroBlocks(r, view, off);
        hash.update(view);
        progress?.add(view.byteLength);
      }
    });
    checkDigest(path, hash.digest(), sha256);
  } finally {
    closeSync(fd);
  }
}

/**
 * readFullMemory for guest RAM (`direct`: page-aligned mmap'd targets): O_DIRECT reads (buffered fallback)
 * in libuv's pool, straight into guest RAM, while the main thread hashes the chunk before.
 */
export async function readFullMemoryAsync(path: string, ranges: readonly MemoryRange[], size: number, sha256: string, alg: MemoryHash, target: (i: number) => Uint8Array, direct: boolean, progress?: Progress, depth = IN_FLIGHT): Promise<void> {
  closeSync(openChecked(path, size));
  let dfd = -1;
  let pfd = -1;
  if (direct && typeof fsConstants.O_DIRECT === 'number' && fsConstants.O_DIRECT > 0) {
    try { dfd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_DIRECT); } catch (e) { if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw ioErr(e, 'snapshot memory file', path); }
  }
  const plainFd = (): number => (pfd >= 0 ? pfd : (pfd = openSync(path, 'r')));
  const readAt = (into: Uint8Array, pos: number): Promise<void> =>
    new Promise<void>((res, rej) => {
      const step = (off: number): void => {
        if (off >= into.byteLength) return res();
        const useDirect = dfd >= 0 && pfd < 0;
        let fd: number;
        try { fd = useDirect ? dfd : plainFd(); } catch (e) { return rej(e); }
        fsRead(fd, into, off, into.byteLength - off, pos + off, (e, n) => {
          if (e) {
            if (e.code === 'EINVAL' && useDirect) {
              try { plainFd(); } catch (e2) { return rej(e2); }
              return step(off);
            }
            return rej(e);
          }
          if (n <= 0) return rej(snapErr('KVMKIT_ERR_SNAPSHOT_TRUNCATED', `memory file ${path}: short read at ${pos + off}`, { path }));
          step(off + n);
        });
      };
      step(0);
    });
  const chunks: Array<{ r: MemoryRange; view: Uint8Array; off: number; done: Promise<unknown> }> = [];
  try {
    if (dfd < 0) plainFd();
    const hash = memoryHasher(alg);
    const settle = async (c: (typeof chunks)[number]) => {
      await c.done;
      clearZeroBlocks(c.r, c.view, c.off);
      hash.update(c.view);
      progress?.add(c.view.byteLength);
    };
    for (const [i, r] of ranges.entries()) {
      const dst = target(i);
      for (let off = 0; off < r.size; off += CHUNK) {
        const end = Math.min(r.size, off + CHUNK);
        // settles only when every read of the chunk has (none may still write into `dst` after a failure)
        const done = Promise.allSettled(dataRuns(r, off, end).map(([a, b]) => readAt(dst.subarray(a, b), r.offset + a))).then((rs) => {
          for (const x of rs) if (x.status === 'rejected') throw x.reason;
        });
        done.catch(() => { /* awaited in settle */ });
        chunks.push({ r, view: dst.subarray(off, end), off, done });
        if (chunks.length > depth) await settle(chunks.shift()!);
      }
    }
    while (chunks.length > 0) await settle(chunks.shift()!);
    checkDigest(path, hash.digest(), sha256);
  } catch (e) {
    await Promise.allSettled(chunks.map((c) => c.done));
    throw ioErr(e, 'reading snapshot memory', path);
  } finally {
    if (dfd >= 0) closeSync(dfd);
    if (pfd >= 0) closeSync(pfd);
  }
}

/**
 * Verifies a whole memory file against its checksum without mapping it: reads it in CHUNK pieces into `scratch`
 * buffers (IN_FLIGHT + 1 of them, CHUNK bytes each; page-aligned ones allow O_DIRECT, so nothing goes through
 * the page cache and holes cost no page allocation) in the thread pool while the main thread hashes.
 */
export async function verifyMemoryFile(path: string, size: number, sha256: string, alg: MemoryHash, scratch: readonly Uint8Array[], direct: boolean): Promise<void> {
  if (scratch.length < 2 || scratch.some((b) => b.byteLength < CHUNK)) throw new RangeError('verifyMemoryFile: at least 2 scratch buffers of 8 MiB');
  // One pseudo-range per chunk (no zero map: every byte is read, holes included), read into the scratch
  // buffers in turn; readFullMemoryAsync keeps at most `depth` + 1 of them busy, hashed in order.
  const ranges: MemoryRange[] = [];
  for (let off = 0; off < size; off += CHUNK) ranges.push({ gpa: BigInt(off), size: Math.min(CHUNK, size - off), offset: off });
  const depth = Math.min(IN_FLIGHT, scratch.length - 1);
  await readFullMemoryAsync(path, ranges, size, sha256, alg, (i) => scratch[i % scratch.length]!.subarray(0, ranges[i]!.size), direct, undefined, depth);
}

/** Reads a diff's memory file (verified: size, sha256) and applies its pages to `target(rangeIndex)`. */
export function applyDiffMemory(path: string, ranges: readonly MemoryRange[], size: number, sha256: string, alg: MemoryHash, target: (i: number) => Uint8Array, progress?: Progress): number {
  const fd = openChecked(path, size);
  try {
    const data = Buffer.allocUnsafe(size);
    readAll(fd, data, 0, path);
    const h = memoryHasher(alg);
    h.update(data);
    const got = h.digest();
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
